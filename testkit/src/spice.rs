//! A synthetic SPICE server, and the client side of its display stream.
//!
//! **It is a test double**, for load generation: spice-server draws what the guest
//! draws, compressed as it sees fit, at the rate QEMU's display updates come, so it
//! cannot stream full-screen drawings at the rate a benchmark of a proxy needs. Real
//! QEMU is used wherever that is what is measured (the live tests, the browser
//! benchmark against a SPICE domain).
//!
//! What it speaks, from the SPICE protocol (spice-protocol's `spice.proto`, spice-server's
//! `reds.cpp` and `red-channel-client.cpp`):
//! - the link, as spice-server does: its own 1024-bit RSA key in the reply, the ticket
//!   decrypted (RSA-OAEP with SHA-1) and checked against its password, a wrong one
//!   answered with `PERMISSION_DENIED`; the mini header only (a client without it is
//!   refused);
//! - the main channel: MAIN_INIT with the session id the display channel must name,
//!   then whatever the client sends is read and dropped;
//! - the display channel: SET_ACK (window [`WINDOW`]), and once the client's
//!   DISPLAY_INIT came, SURFACE_CREATE for the primary surface, MARK, and then
//!   full-screen DRAW_COPY messages with an uncompressed 32-bit bitmap, one after the
//!   other, as spice-server's flow control allows: at most two windows unacknowledged.
//!   Each drawing's image id is its sequence number, so a client sees a lost or
//!   reordered one.
//!
//! [`DisplayStream`] is the client's side of a display channel: it frames what arrives,
//! checks every drawing and says what to answer (ACK_SYNC, ACK) as spice-html5 does.

use rand::rngs::StdRng;
use rand::SeedableRng;
use rsa::pkcs8::EncodePublicKey;
use rsa::{Oaep, RsaPrivateKey, RsaPublicKey};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use vizor_spice::channel::{write_message, Decoder, Frame, HeaderKind};
use vizor_spice::link::{self, cap, channel_type, link_error, Caps, LinkMess, LinkReply};
use vizor_spice::msg::{common, display, main};
use vizor_spice::Limits;

/// Messages the client acknowledges at a time (spice-server's `CLIENT_ACK_WINDOW`).
pub const WINDOW: u32 = 20;

/// SPICE_MSG_DISPLAY_SURFACE_CREATE.
const MSG_SURFACE_CREATE: u16 = 314;
/// SPICE_MSG_DISPLAY_DRAW_COPY.
pub const MSG_DRAW_COPY: u16 = 304;
/// SPICE_SURFACE_FMT_32_xRGB.
const SURFACE_FMT_32_XRGB: u32 = 32;
/// SPICE_SURFACE_FLAGS_PRIMARY.
const SURFACE_FLAGS_PRIMARY: u32 = 1;
/// SPICE_BITMAP_FMT_32BIT.
const BITMAP_FMT_32BIT: u8 = 8;
/// SPICE_BITMAP_FLAGS_TOP_DOWN.
const BITMAP_FLAGS_TOP_DOWN: u8 = 1 << 2;
/// SPICE_ROPD_OP_PUT.
const ROPD_OP_PUT: u16 = 1 << 3;
/// The DRAW_COPY body before the image: SpiceMsgDisplayBase (surface id, box, clip
/// type NONE) and SpiceCopy (image offset, source area, rop, scale mode, an empty
/// mask): 21 + 36 bytes.
const DRAW_COPY_FIXED: usize = 57;
/// SpiceImageDescriptor (id, type, flags, width, height) and SpiceBitmap (format,
/// flags, x, y, stride, no palette).
const IMAGE_HEAD: usize = 18 + 18;
/// Where the image id (a drawing's sequence number) lies in a DRAW_COPY body.
const IMAGE_ID_AT: usize = DRAW_COPY_FIXED;

/// The screen a [`Spice`] draws, and its counters.
#[derive(Debug)]
pub struct Screen {
    width: u32,
    height: u32,
    /// The pixels every drawing carries, built once.
    pixels: Vec<u8>,
    draws: AtomicU64,
    bytes: AtomicU64,
}

impl Screen {
    /// A `width` x `height` screen of 32-bit pixels.
    pub fn new(width: u32, height: u32) -> Screen {
        let pixels = (0..width as usize * height as usize * 4)
            .map(|i| (i % 251) as u8)
            .collect();
        Screen {
            width,
            height,
            pixels,
            draws: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        }
    }

    /// The bytes of one drawing on the wire, header included.
    pub fn draw_len(&self) -> u64 {
        6 + (DRAW_COPY_FIXED + IMAGE_HEAD + self.pixels.len()) as u64
    }

    /// Drawings written so far, and their bytes (all connections).
    pub fn sent(&self) -> (u64, u64) {
        (
            self.draws.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }

    /// The header and body of drawing number `seq` up to its pixels.
    fn draw_head(&self, seq: u64) -> Vec<u8> {
        let (w, h) = (self.width, self.height);
        let body_len = DRAW_COPY_FIXED + IMAGE_HEAD + self.pixels.len();
        let mut b = Vec::with_capacity(6 + DRAW_COPY_FIXED + IMAGE_HEAD);
        b.extend_from_slice(&MSG_DRAW_COPY.to_le_bytes());
        b.extend_from_slice(&(body_len as u32).to_le_bytes());
        // SpiceMsgDisplayBase: surface 0, box (top, left, bottom, right), no clip.
        b.extend_from_slice(&0u32.to_le_bytes());
        for v in [0, 0, h, w] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.push(0);
        // SpiceCopy: the image right after, the whole of it, put as it is.
        b.extend_from_slice(&(DRAW_COPY_FIXED as u32).to_le_bytes());
        for v in [0, 0, h, w] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&ROPD_OP_PUT.to_le_bytes());
        b.push(0);
        b.push(0);
        b.extend_from_slice(&[0; 8]);
        b.extend_from_slice(&0u32.to_le_bytes());
        debug_assert_eq!(b.len(), 6 + DRAW_COPY_FIXED);
        // SpiceImageDescriptor: id, type BITMAP, no flags, width, height.
        b.extend_from_slice(&seq.to_le_bytes());
        b.push(0);
        b.push(0);
        b.extend_from_slice(&w.to_le_bytes());
        b.extend_from_slice(&h.to_le_bytes());
        // SpiceBitmap: 32 bits, top down, no palette.
        b.push(BITMAP_FMT_32BIT);
        b.push(BITMAP_FLAGS_TOP_DOWN);
        b.extend_from_slice(&w.to_le_bytes());
        b.extend_from_slice(&h.to_le_bytes());
        b.extend_from_slice(&(w * 4).to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b
    }
}

/// A synthetic SPICE console with a password.
pub struct Spice {
    password: String,
    key: RsaPrivateKey,
    der: Vec<u8>,
    session_id: u32,
    screen: Arc<Screen>,
}

/// A [`Spice`] serving a listener; dropping it stops it.
#[derive(Debug)]
pub struct Served {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Served {
    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

impl Spice {
    /// A console asking for `password`, drawing `screen`.
    pub fn new(password: &str, screen: Arc<Screen>) -> io::Result<Spice> {
        // Seeded from the OS: the key only has to be a valid one.
        let mut rng = StdRng::from_entropy();
        let key = RsaPrivateKey::new(&mut rng, 1024).map_err(io_err)?;
        let der = RsaPublicKey::from(&key)
            .to_public_key_der()
            .map_err(io_err)?
            .as_bytes()
            .to_vec();
        Ok(Spice {
            password: password.to_owned(),
            key,
            der,
            session_id: rand::random::<u32>() | 1,
            screen,
        })
    }

    /// Binds a port on 127.0.0.1 and serves it, each connection in a task of its own.
    pub async fn listen(self) -> io::Result<Served> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let me = Arc::new(self);
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let me = me.clone();
                tokio::spawn(async move {
                    let _ = me.connection(s).await;
                });
            }
        });
        Ok(Served { port, task })
    }

    async fn connection(&self, mut s: TcpStream) -> io::Result<()> {
        s.set_nodelay(true)?;
        let limits = Limits::default();
        let mut buf = Vec::new();
        let mess = loop {
            if let Some((mess, n)) = LinkMess::parse(&buf, &limits).map_err(io_err)? {
                buf.drain(..n);
                break mess;
            }
            read_more(&mut s, &mut buf).await?;
        };
        let refuse = |code: u32| {
            let mut out = Vec::new();
            vizor_spice::handshake::write_refusal(code, &mut out);
            out
        };
        let wanted_session = match mess.channel_type {
            channel_type::MAIN => 0,
            channel_type::DISPLAY => self.session_id,
            _ => {
                s.write_all(&refuse(link_error::CHANNEL_NOT_AVAILABLE))
                    .await?;
                return Ok(());
            }
        };
        if mess.connection_id != wanted_session || !mess.common_caps.has(cap::MINI_HEADER) {
            s.write_all(&refuse(link_error::BAD_CONNECTION_ID)).await?;
            return Ok(());
        }
        let mut offered = Caps::default();
        for c in [
            cap::PROTOCOL_AUTH_SELECTION,
            cap::AUTH_SPICE,
            cap::MINI_HEADER,
        ] {
            offered.set(c);
        }
        let mut out = Vec::new();
        LinkReply {
            error: link_error::OK,
            pub_key: self.der.clone(),
            common_caps: offered,
            channel_caps: Caps::default(),
        }
        .write(&mut out);
        s.write_all(&out).await?;
        let selects = mess.common_caps.has(cap::PROTOCOL_AUTH_SELECTION);
        let need = if selects { 4 } else { 0 } + link::TICKET_LEN;
        while buf.len() < need {
            read_more(&mut s, &mut buf).await?;
        }
        if selects && buf[..4] != cap::AUTH_SPICE.to_le_bytes() {
            s.write_all(&link_error::PERMISSION_DENIED.to_le_bytes())
                .await?;
            return Ok(());
        }
        let ticket: Vec<u8> = buf.drain(..need).skip(need - link::TICKET_LEN).collect();
        let ok = self
            .key
            .decrypt(Oaep::new::<sha1::Sha1>(), &ticket)
            .is_ok_and(|plain| {
                let given = plain.split(|&b| b == 0).next().unwrap_or(&[]);
                given == self.password.as_bytes()
            });
        let result = if ok {
            link_error::OK
        } else {
            link_error::PERMISSION_DENIED
        };
        s.write_all(&result.to_le_bytes()).await?;
        if !ok {
            return Ok(());
        }
        match mess.channel_type {
            channel_type::MAIN => self.main(s).await,
            _ => self.display(s, buf).await,
        }
    }

    async fn main(&self, mut s: TcpStream) -> io::Result<()> {
        // MAIN_INIT: session id, one display, client mouse mode offered and current,
        // no agent, a multimedia time, a RAM hint.
        let mut body = Vec::new();
        for v in [self.session_id, 1, 2, 2, 0, 0, 0, 0] {
            body.extend_from_slice(&v.to_le_bytes());
        }
        let mut out = Vec::new();
        write_message(HeaderKind::Mini, 0, main::MSG_INIT, &body, &mut out).map_err(io_err)?;
        s.write_all(&out).await?;
        let mut sink = [0u8; 4096];
        while s.read(&mut sink).await? > 0 {}
        Ok(())
    }

    async fn display(&self, s: TcpStream, early: Vec<u8>) -> io::Result<()> {
        let (mut rd, mut wr) = s.into_split();
        let mut out = Vec::new();
        let mut ack = WINDOW.to_le_bytes().to_vec();
        ack.splice(0..0, 1u32.to_le_bytes());
        write_message(HeaderKind::Mini, 0, common::MSG_SET_ACK, &ack, &mut out).map_err(io_err)?;
        wr.write_all(&out).await?;
        // The client's side: DISPLAY_INIT, then ACKs, counted for the writer.
        let acks = Arc::new((AtomicU64::new(0), Notify::new()));
        let (init_tx, init_rx) = tokio::sync::oneshot::channel();
        let reader = {
            let acks = acks.clone();
            async move {
                let mut d = Decoder::new(HeaderKind::Mini, Limits::default());
                let mut buf = early;
                let mut init_tx = Some(init_tx);
                loop {
                    while let Some((frame, n)) = d.decode(&buf).map_err(io_err)? {
                        if let Frame::Whole { header, .. } = frame {
                            match header.msg_type {
                                display::MSGC_INIT => {
                                    if let Some(tx) = init_tx.take() {
                                        let _ = tx.send(());
                                    }
                                }
                                common::MSGC_ACK => {
                                    acks.0.fetch_add(1, Ordering::Relaxed);
                                    acks.1.notify_one();
                                }
                                _ => {}
                            }
                        }
                        buf.drain(..n);
                    }
                    let mut tmp = [0u8; 4096];
                    let n = rd.read(&mut tmp).await?;
                    if n == 0 {
                        return Ok::<(), io::Error>(());
                    }
                    buf.extend_from_slice(&tmp[..n]);
                }
            }
        };
        let screen = &self.screen;
        let writer = async {
            if init_rx.await.is_err() {
                return Ok(());
            }
            let (w, h) = (screen.width, screen.height);
            let mut out = Vec::new();
            let mut body = Vec::new();
            for v in [0, w, h, SURFACE_FMT_32_XRGB, SURFACE_FLAGS_PRIMARY] {
                body.extend_from_slice(&v.to_le_bytes());
            }
            write_message(HeaderKind::Mini, 0, MSG_SURFACE_CREATE, &body, &mut out)
                .map_err(io_err)?;
            write_message(HeaderKind::Mini, 0, display::MSG_MARK, &[], &mut out).map_err(io_err)?;
            wr.write_all(&out).await?;
            let window = u64::from(WINDOW);
            for seq in 0u64.. {
                // SURFACE_CREATE and MARK count toward the window as spice-server's do.
                let sent = seq + 2;
                // spice-server waits once two windows are unacknowledged.
                loop {
                    let notified = acks.1.notified();
                    if sent < (acks.0.load(Ordering::Relaxed) + 2) * window {
                        break;
                    }
                    notified.await;
                }
                let head = screen.draw_head(seq);
                wr.write_all(&head).await?;
                wr.write_all(&screen.pixels).await?;
                screen.draws.fetch_add(1, Ordering::Relaxed);
                screen
                    .bytes
                    .fetch_add((head.len() + screen.pixels.len()) as u64, Ordering::Relaxed);
            }
            Ok::<(), io::Error>(())
        };
        // The client closing ends both.
        tokio::select! {
            r = reader => r,
            r = writer => r,
        }
    }
}

async fn read_more(s: &mut TcpStream, buf: &mut Vec<u8>) -> io::Result<()> {
    let mut tmp = [0u8; 4096];
    let n = s.read(&mut tmp).await?;
    if n == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    buf.extend_from_slice(&tmp[..n]);
    Ok(())
}

/// A client's link message for a channel of `channel_type` in session
/// `connection_id` (0 for the main channel), asking for the mini header and ticket
/// authentication.
pub fn link_mess(connection_id: u32, channel_type: u8) -> Vec<u8> {
    let mut caps = Caps::default();
    for c in [
        cap::PROTOCOL_AUTH_SELECTION,
        cap::AUTH_SPICE,
        cap::MINI_HEADER,
    ] {
        caps.set(c);
    }
    let mut out = Vec::new();
    LinkMess {
        connection_id,
        channel_type,
        channel_id: 0,
        common_caps: caps,
        channel_caps: Caps::default(),
    }
    .write(&mut out);
    out
}

/// The client's answer to a link reply `reply` (as [`LinkReply::parse`] gave it): the
/// auth mechanism and the ticket, `password` encrypted with the reply's key.
pub fn ticket(reply: &LinkReply, password: &str) -> Result<Vec<u8>, String> {
    use rsa::pkcs8::DecodePublicKey;
    let key = RsaPublicKey::from_public_key_der(&reply.pub_key).map_err(|e| e.to_string())?;
    let mut plain = password.as_bytes().to_vec();
    plain.push(0);
    let mut rng = StdRng::from_entropy();
    let encrypted = key
        .encrypt(&mut rng, Oaep::new::<sha1::Sha1>(), &plain)
        .map_err(|e| e.to_string())?;
    let mut out = cap::AUTH_SPICE.to_le_bytes().to_vec();
    out.extend_from_slice(&encrypted);
    Ok(out)
}

/// The session id in a MAIN_INIT, when `msg` (one whole message with a mini header)
/// is one.
pub fn main_init_session(msg: &[u8]) -> Option<u32> {
    let t = u16::from_le_bytes(msg.get(..2)?.try_into().ok()?);
    if t != main::MSG_INIT {
        return None;
    }
    Some(u32::from_le_bytes(msg.get(6..10)?.try_into().ok()?))
}

/// DISPLAY_INIT as spice-html5 sends it (no caches).
pub fn display_init() -> Vec<u8> {
    let mut body = vec![0u8];
    body.extend_from_slice(&0i64.to_le_bytes());
    body.push(0);
    body.extend_from_slice(&0i32.to_le_bytes());
    let mut out = Vec::new();
    let _ = write_message(HeaderKind::Mini, 0, display::MSGC_INIT, &body, &mut out);
    out
}

/// What a display channel's client has seen: drawings and their bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Drawn {
    /// Whole DRAW_COPY messages, each checked.
    pub draws: u64,
    /// Their bytes, headers included.
    pub bytes: u64,
}

/// The client's side of a display channel, fed the bytes as they arrive: frames every
/// message without holding a drawing's pixels, checks that drawings come whole, in
/// order and of the screen's size, and says what to answer (the ACK_SYNC SET_ACK asks
/// for, an ACK every window).
#[derive(Debug)]
pub struct DisplayStream {
    decoder: Decoder,
    /// Bytes of the current message held until its header and image head are whole.
    held: Vec<u8>,
    /// The current drawing: its body bytes still to come.
    current: Option<u64>,
    /// The current drawing's first bytes, up to its image id.
    head: Vec<u8>,
    window: u64,
    messages: u64,
    draw_len: u64,
    next_seq: u64,
    /// What was drawn.
    pub drawn: Drawn,
}

impl DisplayStream {
    /// A stream whose drawings are `draw_len` bytes each (see [`Screen::draw_len`]).
    pub fn new(draw_len: u64) -> DisplayStream {
        DisplayStream {
            // Everything over 64 bytes streams: only the heads are held.
            decoder: Decoder::new(
                HeaderKind::Mini,
                Limits {
                    max_message_len: 64,
                    ..Limits::default()
                },
            ),
            held: Vec::new(),
            current: None,
            head: Vec::new(),
            window: 0,
            messages: 0,
            draw_len,
            next_seq: 0,
            drawn: Drawn::default(),
        }
    }

    /// Takes `data`; appends to `answer` what the client sends back.
    pub fn feed(&mut self, data: &[u8], answer: &mut Vec<u8>) -> Result<(), String> {
        if self.held.is_empty() {
            return self.feed_all(data, answer);
        }
        // A message head came in pieces (rare: the decoder wants it whole).
        let mut joined = std::mem::take(&mut self.held);
        joined.extend_from_slice(data);
        self.feed_all(&joined, answer)
    }

    fn feed_all(&mut self, input: &[u8], answer: &mut Vec<u8>) -> Result<(), String> {
        let mut at = 0;
        while at < input.len() {
            let Some((frame, n)) = self
                .decoder
                .decode(&input[at..])
                .map_err(|e| e.to_string())?
            else {
                self.held = input[at..].to_vec();
                return Ok(());
            };
            self.take(frame, answer)?;
            at += n;
        }
        Ok(())
    }

    fn take(&mut self, frame: Frame<'_>, answer: &mut Vec<u8>) -> Result<(), String> {
        match frame {
            Frame::Whole { header, body } => {
                if header.msg_type == common::MSG_SET_ACK {
                    let generation = body.get(..4).ok_or("a short SET_ACK")?;
                    let window = body.get(4..8).ok_or("a short SET_ACK")?;
                    self.window = u64::from(u32::from_le_bytes(
                        window.try_into().map_err(|_| "SET_ACK")?,
                    ));
                    let _ = write_message(
                        HeaderKind::Mini,
                        0,
                        common::MSGC_ACK_SYNC,
                        generation,
                        answer,
                    );
                } else {
                    self.counted(answer);
                }
                if header.msg_type == MSG_DRAW_COPY {
                    return Err("a drawing of 64 bytes or less".into());
                }
            }
            Frame::Begin { header } => {
                if header.msg_type != MSG_DRAW_COPY {
                    return Err(format!("an unexpected message of type {}", header.msg_type));
                }
                if 6 + u64::from(header.size) != self.draw_len {
                    return Err(format!(
                        "a drawing of {} bytes, {} expected",
                        6 + u64::from(header.size),
                        self.draw_len
                    ));
                }
                self.current = Some(u64::from(header.size));
                self.head.clear();
            }
            Frame::Data(d) => {
                let Some(left) = self.current.as_mut() else {
                    return Err("data outside a message".into());
                };
                let done_before = self.draw_len - 6 - *left;
                // The image id: the drawing's sequence number.
                let want = (IMAGE_ID_AT + 8) as u64;
                if done_before < want {
                    let take = (want - done_before).min(d.len() as u64) as usize;
                    self.head.extend_from_slice(&d[..take]);
                }
                *left -= d.len() as u64;
                if *left == 0 {
                    self.current = None;
                    let id = self
                        .head
                        .get(IMAGE_ID_AT..IMAGE_ID_AT + 8)
                        .and_then(|b| b.try_into().ok())
                        .map(u64::from_le_bytes)
                        .ok_or("a drawing without its image head")?;
                    if id != self.next_seq {
                        return Err(format!("drawing {id} where {} was next", self.next_seq));
                    }
                    self.next_seq += 1;
                    self.drawn.draws += 1;
                    self.drawn.bytes += self.draw_len;
                    self.counted(answer);
                }
            }
        }
        Ok(())
    }

    /// One more message: an ACK once a window is full.
    fn counted(&mut self, answer: &mut Vec<u8>) {
        self.messages += 1;
        if self.window > 0 && self.messages % self.window == 0 {
            let _ = write_message(HeaderKind::Mini, 0, common::MSGC_ACK, &[], answer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Links a channel straight to the double; returns the stream, the bytes after the
    /// link result, and the result.
    async fn link(
        port: u16,
        session: u32,
        channel: u8,
        password: &str,
    ) -> (TcpStream, Vec<u8>, u32) {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(&link_mess(session, channel)).await.unwrap();
        let mut buf = Vec::new();
        let reply = loop {
            if let Some((r, n)) = LinkReply::parse(&buf, &Limits::default()).unwrap() {
                buf.drain(..n);
                break r;
            }
            read_more(&mut s, &mut buf).await.unwrap();
        };
        assert_eq!(reply.error, link_error::OK);
        s.write_all(&ticket(&reply, password).unwrap())
            .await
            .unwrap();
        while buf.len() < 4 {
            read_more(&mut s, &mut buf).await.unwrap();
        }
        let result = u32::from_le_bytes(buf[..4].try_into().unwrap());
        buf.drain(..4);
        (s, buf, result)
    }

    #[tokio::test]
    async fn it_checks_the_ticket_and_draws_as_acks_allow() {
        let screen = Arc::new(Screen::new(64, 32));
        let served = Spice::new("s3cret", screen.clone())
            .unwrap()
            .listen()
            .await
            .unwrap();
        let (_, _, refused) = link(served.port(), 0, channel_type::MAIN, "wrong").await;
        assert_eq!(refused, link_error::PERMISSION_DENIED);

        let (mut main, mut buf, ok) = link(served.port(), 0, channel_type::MAIN, "s3cret").await;
        assert_eq!(ok, link_error::OK);
        while buf.len() < 6 + 32 {
            read_more(&mut main, &mut buf).await.unwrap();
        }
        let session = main_init_session(&buf).expect("MAIN_INIT");

        let (mut display, early, ok) =
            link(served.port(), session, channel_type::DISPLAY, "s3cret").await;
        assert_eq!(ok, link_error::OK);
        display.write_all(&display_init()).await.unwrap();
        let mut stream = DisplayStream::new(screen.draw_len());
        let mut answer = Vec::new();
        stream.feed(&early, &mut answer).unwrap();
        let mut tmp = vec![0u8; 1000];
        // More than two windows: only ACKs let the double go on.
        while stream.drawn.draws < 100 {
            if !answer.is_empty() {
                display.write_all(&answer).await.unwrap();
                answer.clear();
            }
            let n = display.read(&mut tmp).await.unwrap();
            assert!(n > 0, "the double closed");
            stream.feed(&tmp[..n], &mut answer).unwrap();
        }
        assert_eq!(stream.drawn.bytes, 100 * screen.draw_len());
        let (draws, _) = screen.sent();
        assert!(
            (100..100 + 2 * u64::from(WINDOW)).contains(&draws),
            "{draws} drawn: flow control holds the double to two windows ahead"
        );
    }
}
