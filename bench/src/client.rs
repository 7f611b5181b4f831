//! The benchmark's console client: RFB over plain TCP (the `direct` path) or over a
//! binary WebSocket (every proxy), as noVNC speaks it, built so that it is never the
//! bottleneck. After ServerInit it parses the server's stream incrementally
//! ([`UpdateStream`]): message and rectangle headers are read, Raw pixel bytes are
//! counted and skipped where they lie, never copied. The WebSocket is fastwebsockets
//! in the client role (frames masked), opened with a hand-written HTTP/1.1 upgrade on
//! the TCP stream itself, so nothing sits between the socket and the frame reader.

use base64::Engine;
use fastwebsockets::{Frame, OpCode, Payload, Role, WebSocket};
use sha1::{Digest, Sha1};
use std::net::{IpAddr, SocketAddr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use vizor_rfb::client::{write_set_encodings, ClientMessage};
use vizor_rfb::handshake::{client, SecurityType, ServerInit};
use vizor_rfb::{Encoding, Limits};

/// How a client reaches the console.
#[derive(Debug, Clone)]
pub enum Route {
    /// RFB straight over TCP; the client authenticates with `password`.
    Tcp {
        /// The console.
        addr: SocketAddr,
        /// Its VNC password.
        password: String,
    },
    /// RFB over a WebSocket opened at `path`; with a password the client
    /// authenticates through the proxy (a splicer), without one it expects the
    /// proxy to have authenticated already and to offer security type None (vizor).
    Ws {
        /// The proxy.
        addr: SocketAddr,
        /// Such as `/websockify?token=...`.
        path: String,
        /// The VM's VNC password, for splicers.
        password: Option<String>,
    },
}

/// Anything that ended a client session early.
#[derive(Debug)]
pub struct ClientError(pub String);

/// The harness reports failures as text.
impl From<ClientError> for String {
    fn from(e: ClientError) -> String {
        e.0
    }
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn err(what: &str, e: impl std::fmt::Display) -> ClientError {
    ClientError(format!("{what}: {e}"))
}

type Result<T> = std::result::Result<T, ClientError>;

/// The transport under RFB (or SPICE).
pub enum Link {
    Tcp {
        s: TcpStream,
        buf: Box<[u8]>,
    },
    /// The upgrade reads the response head alone (peeking), so nothing of the
    /// WebSocket stream is left behind in a buffer.
    Ws(Box<WebSocket<TcpStream>>),
}

/// How much the TCP client reads at once: large enough that a GB/s stream costs few
/// system calls.
const TCP_READ: usize = 1 << 20;

impl Link {
    /// Connects from `src` along `route`; with the password the client itself must
    /// give (direct, and through a splicer).
    pub async fn open(route: &Route, src: IpAddr) -> Result<(Link, Option<&str>)> {
        Ok(match route {
            Route::Tcp { addr, password } => (
                Link::Tcp {
                    s: tcp_from(src, *addr).await?,
                    buf: vec![0u8; TCP_READ].into_boxed_slice(),
                },
                Some(password.as_str()),
            ),
            Route::Ws {
                addr,
                path,
                password,
            } => (
                upgrade(tcp_from(src, *addr).await?, *addr, path).await?,
                password.as_deref(),
            ),
        })
    }

    /// Sends `bytes` (over a WebSocket, as one binary message).
    pub async fn send(&mut self, bytes: &[u8]) -> Result<()> {
        match self {
            Link::Tcp { s, .. } => s.write_all(bytes).await.map_err(|e| err("send", e)),
            Link::Ws(ws) => ws
                .write_frame(Frame::binary(Payload::Owned(bytes.to_vec())))
                .await
                .map_err(|e| err("send", e)),
        }
    }

    /// Waits for the next bytes and hands them to `f`, in place.
    pub async fn recv<R>(&mut self, mut f: impl FnMut(&[u8]) -> R) -> Result<R> {
        match self {
            Link::Tcp { s, buf } => {
                let n = s.read(buf).await.map_err(|e| err("receive", e))?;
                if n == 0 {
                    return Err(ClientError("the connection was closed".into()));
                }
                Ok(f(&buf[..n]))
            }
            Link::Ws(ws) => {
                loop {
                    let frame = ws.read_frame().await.map_err(|e| err("receive", e))?;
                    match frame.opcode {
                        OpCode::Binary | OpCode::Continuation => return Ok(f(&frame.payload)),
                        OpCode::Close => {
                            let p = &frame.payload[..];
                            let reason = String::from_utf8_lossy(p.get(2..).unwrap_or(&[]));
                            return Err(ClientError(format!("WebSocket closed: {reason}")));
                        }
                        OpCode::Text => return Err(ClientError("a text WebSocket message".into())),
                        // Pings are answered inside read_frame.
                        OpCode::Ping | OpCode::Pong => {}
                    }
                }
            }
        }
    }

    /// Receives into `pending` (during the handshake, where copies do not matter).
    pub async fn recv_into(&mut self, pending: &mut Vec<u8>) -> Result<()> {
        self.recv(|b| pending.extend_from_slice(b)).await
    }
}

/// The transport as a byte source for the testkit's handshake driver.
impl vizor_testkit::Source for Link {
    type Error = ClientError;

    async fn more(&mut self, buf: &mut Vec<u8>) -> Result<()> {
        self.recv_into(buf).await
    }
}

/// A TCP connection from `src` (any address of 127.0.0.0/8) to `addr`.
pub async fn tcp_from(src: IpAddr, addr: SocketAddr) -> Result<TcpStream> {
    let socket = TcpSocket::new_v4().map_err(|e| err("socket", e))?;
    // Sessions come and go by the thousand: a source port in TIME_WAIT may be taken again.
    socket.set_reuseaddr(true).map_err(|e| err("socket", e))?;
    socket
        .bind(SocketAddr::new(src, 0))
        .map_err(|e| err(&format!("bind {src}"), e))?;
    let s = socket
        .connect(addr)
        .await
        .map_err(|e| err(&format!("connect to {addr}"), e))?;
    s.set_nodelay(true).map_err(|e| err("socket", e))?;
    Ok(s)
}

/// The HTTP/1.1 WebSocket upgrade, as a browser sends it (same origin, `binary`
/// offered). The response is peeked first and only its head is read, so whatever
/// follows stays in the socket for the frame reader.
async fn upgrade(mut s: TcpStream, addr: SocketAddr, path: &str) -> Result<Link> {
    let key: [u8; 16] = rand::random();
    let key = base64::engine::general_purpose::STANDARD.encode(key);
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nOrigin: http://{addr}\r\n\
         Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: binary\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| err("upgrade", e))?;
    let mut head = Vec::new();
    let mut peek = vec![0u8; 4096];
    loop {
        let n = s.peek(&mut peek).await.map_err(|e| err("upgrade", e))?;
        if n == 0 {
            return Err(ClientError(
                "the proxy closed the connection during the WebSocket upgrade".into(),
            ));
        }
        let before = head.len();
        head.extend_from_slice(&peek[..n]);
        // The head ends here, or in a later segment.
        let end = head.windows(4).position(|w| w == b"\r\n\r\n");
        let take = match end {
            Some(e) => e + 4 - before,
            None => n,
        };
        head.truncate(before + take);
        s.read_exact(&mut peek[..take])
            .await
            .map_err(|e| err("upgrade", e))?;
        if end.is_some() {
            break;
        }
        if head.len() > 16 * 1024 {
            return Err(ClientError("an HTTP response head over 16 KiB".into()));
        }
    }
    let text = String::from_utf8_lossy(&head);
    let status = text.split(' ').nth(1).unwrap_or("");
    if status != "101" {
        let first = text.lines().next().unwrap_or("");
        return Err(ClientError(format!("WebSocket upgrade refused: {first}")));
    }
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    let accept = base64::engine::general_purpose::STANDARD.encode(sha.finalize());
    let accepted = text.lines().any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("sec-websocket-accept") && v.trim() == accept
        })
    });
    if !accepted {
        return Err(ClientError(
            "the upgrade response lacks the right Sec-WebSocket-Accept".into(),
        ));
    }
    let mut ws = WebSocket::after_handshake(s, Role::Client);
    ws.set_max_message_size(64 << 20);
    Ok(Link::Ws(Box::new(ws)))
}

/// Counts of the server's stream after ServerInit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Received {
    /// Complete FramebufferUpdates.
    pub updates: u64,
    /// Bytes (RFB, not WebSocket framing).
    pub bytes: u64,
}

/// Where [`UpdateStream`] stands.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// A message type byte.
    Message,
    /// The rest of a FramebufferUpdate header (padding, rectangle count).
    UpdateHeader,
    /// A rectangle header; `left` rectangles remain, this one included.
    Rect { left: u16 },
    /// Pixel bytes of a rectangle, then `left` more rectangles.
    Pixels { remaining: u64, left: u16 },
    /// The rest of a ServerCutText header.
    CutHeader,
    /// Clipboard bytes to skip.
    CutText { remaining: u64 },
}

/// An incremental parser of the server-to-client stream for servers that send Raw
/// rectangles (and bells, clipboard, DesktopSize): headers are gathered in a 12-byte
/// array, pixel bytes are skipped in whatever chunks they arrive in.
#[derive(Debug)]
pub struct UpdateStream {
    bytes_per_pixel: u64,
    expect: Expect,
    head: [u8; 12],
    have: usize,
    /// What was received.
    pub received: Received,
}

impl UpdateStream {
    /// A parser for the stream after `si`.
    pub fn new(si: &ServerInit) -> UpdateStream {
        UpdateStream {
            bytes_per_pixel: u64::from(si.pixel_format.bits_per_pixel / 8),
            expect: Expect::Message,
            head: [0; 12],
            have: 0,
            received: Received::default(),
        }
    }

    /// Gathers `n` header bytes from `data`; true once they are all in `head`.
    fn gather(&mut self, data: &mut &[u8], n: usize) -> bool {
        let take = (n - self.have).min(data.len());
        self.head[self.have..self.have + take].copy_from_slice(&data[..take]);
        self.have += take;
        *data = &data[take..];
        if self.have == n {
            self.have = 0;
            true
        } else {
            false
        }
    }

    fn rect_done(&mut self, left: u16) {
        if left <= 1 {
            self.received.updates += 1;
            self.expect = Expect::Message;
        } else {
            self.expect = Expect::Rect { left: left - 1 };
        }
    }

    /// Consumes the next chunk of the stream.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<()> {
        self.received.bytes += data.len() as u64;
        while !data.is_empty() {
            match self.expect {
                Expect::Message => {
                    let t = data[0];
                    data = &data[1..];
                    self.expect = match t {
                        0 => Expect::UpdateHeader,
                        2 => Expect::Message, // Bell
                        3 => Expect::CutHeader,
                        _ => return Err(ClientError(format!("server message type {t}"))),
                    };
                }
                Expect::UpdateHeader => {
                    if self.gather(&mut data, 3) {
                        let rects = u16::from_be_bytes([self.head[1], self.head[2]]);
                        if rects == 0 {
                            self.received.updates += 1;
                            self.expect = Expect::Message;
                        } else {
                            self.expect = Expect::Rect { left: rects };
                        }
                    }
                }
                Expect::Rect { left } => {
                    if self.gather(&mut data, 12) {
                        let h = &self.head;
                        let w = u64::from(u16::from_be_bytes([h[4], h[5]]));
                        let ht = u64::from(u16::from_be_bytes([h[6], h[7]]));
                        let enc = i32::from_be_bytes([h[8], h[9], h[10], h[11]]);
                        match Encoding(enc) {
                            Encoding::RAW if w * ht > 0 => {
                                self.expect = Expect::Pixels {
                                    remaining: w * ht * self.bytes_per_pixel,
                                    left,
                                };
                            }
                            // An empty Raw rectangle, or DesktopSize (-223): no payload.
                            Encoding::RAW | Encoding::DESKTOP_SIZE => self.rect_done(left),
                            other => {
                                return Err(ClientError(format!(
                                    "a rectangle in encoding {other:?}, not asked for"
                                )))
                            }
                        }
                    }
                }
                Expect::Pixels { remaining, left } => {
                    let n = remaining.min(data.len() as u64);
                    data = &data[n as usize..];
                    if n == remaining {
                        self.rect_done(left);
                    } else {
                        self.expect = Expect::Pixels {
                            remaining: remaining - n,
                            left,
                        };
                    }
                }
                Expect::CutHeader => {
                    if self.gather(&mut data, 7) {
                        let len = u32::from_be_bytes([
                            self.head[3],
                            self.head[4],
                            self.head[5],
                            self.head[6],
                        ]);
                        self.expect = Expect::CutText {
                            remaining: u64::from(len),
                        };
                    }
                }
                Expect::CutText { remaining } => {
                    let n = remaining.min(data.len() as u64);
                    data = &data[n as usize..];
                    self.expect = if n == remaining {
                        Expect::Message
                    } else {
                        Expect::CutText {
                            remaining: remaining - n,
                        }
                    };
                }
            }
        }
        Ok(())
    }
}

/// An open console: past ServerInit, the server's stream counted by [`UpdateStream`].
pub struct Session {
    link: Link,
    /// The parsed stream.
    pub stream: UpdateStream,
    /// The console's ServerInit.
    pub server_init: ServerInit,
}

/// Feeds a client handshake state until it completes (see [`vizor_testkit::drive()`]).
async fn step<S, P>(
    link: &mut Link,
    pending: &mut Vec<u8>,
    state: S,
    receive: impl FnMut(S, &[u8]) -> std::result::Result<P, vizor_rfb::Error>,
) -> Result<P::Next>
where
    P: vizor_testkit::Stepped<State = S>,
{
    vizor_testkit::drive(link, pending, state, receive)
        .await
        .map_err(|e| match e {
            vizor_testkit::DriveError::Step(e) => err("RFB handshake", e),
            vizor_testkit::DriveError::Source(e) => e,
        })
}

impl Session {
    /// Connects from `src` along `route` and runs the RFB handshake up to ServerInit.
    pub async fn open(route: &Route, src: IpAddr) -> Result<Session> {
        let (mut link, password) = Link::open(route, src).await?;
        let limits = Limits::default();
        let mut pending = Vec::new();
        let mut out = Vec::new();
        let security = step(
            &mut link,
            &mut pending,
            client::ExpectServerVersion::new(limits),
            |s, b| s.receive(b, &mut out),
        )
        .await?;
        link.send(&std::mem::take(&mut out)).await?;
        let choose = step(&mut link, &mut pending, security, |s, b| s.receive(b)).await?;
        let result = match password {
            Some(p) if choose.offered().contains(&SecurityType::VNC_AUTH) => {
                let challenge = choose
                    .choose_vnc_auth(&mut out)
                    .map_err(|e| err("RFB handshake", e))?;
                link.send(&std::mem::take(&mut out)).await?;
                let respond = step(&mut link, &mut pending, challenge, |s, b| s.receive(b)).await?;
                respond.respond(p.as_bytes(), &mut out)
            }
            None if choose.offered().contains(&SecurityType::NONE) => choose
                .choose_none(&mut out)
                .map_err(|e| err("RFB handshake", e))?,
            _ => {
                return Err(ClientError(format!(
                    "security types offered: {:?}",
                    choose.offered()
                )))
            }
        };
        link.send(&std::mem::take(&mut out)).await?;
        let init = step(&mut link, &mut pending, result, |s, b| s.receive(b)).await?;
        let expect = init.send(true, &mut out);
        link.send(&std::mem::take(&mut out)).await?;
        let server_init = step(&mut link, &mut pending, expect, |s, b| s.receive(b)).await?;
        let mut stream = UpdateStream::new(&server_init);
        if !pending.is_empty() {
            stream.feed(&pending)?;
        }
        Ok(Session {
            link,
            stream,
            server_init,
        })
    }

    /// Sends SetEncodings: Raw only, as the parser expects.
    pub async fn set_encodings_raw(&mut self) -> Result<()> {
        let mut out = Vec::new();
        write_set_encodings([Encoding::RAW], &mut out);
        self.link.send(&out).await
    }

    /// Asks for the whole screen in `encodings` (QEMU takes the first it supports) again
    /// each time the last answer is whole, until `until`; every rectangle is framed by
    /// vizor's own decoder, nothing is decoded. Returns the full frames received.
    pub async fn full_frames(
        &mut self,
        encodings: &[Encoding],
        until: std::time::Instant,
    ) -> Result<u64> {
        use vizor_rfb::server::{ServerDecoder, ServerEvent};
        let mut out = Vec::new();
        write_set_encodings(encodings.iter().copied(), &mut out);
        self.link.send(&out).await?;
        let mut dec = ServerDecoder::new(&self.server_init, Limits::default());
        dec.set_encodings(encodings.iter().copied());
        let (w, h) = (self.server_init.width, self.server_init.height);
        let mut buf: Vec<u8> = Vec::new();
        let mut frames = 0;
        while std::time::Instant::now() < until {
            self.request(false, 0, 0, w, h).await?;
            'frame: loop {
                let mut used = 0;
                while let Some((ev, n)) = dec.decode(&buf[used..]).map_err(|e| err("decode", e))? {
                    used += n;
                    if ev == ServerEvent::UpdateEnd {
                        frames += 1;
                        buf.drain(..used);
                        break 'frame;
                    }
                }
                buf.drain(..used);
                self.link.recv(|b| buf.extend_from_slice(b)).await?;
            }
        }
        Ok(frames)
    }

    /// Sends a FramebufferUpdateRequest.
    pub async fn request(
        &mut self,
        incremental: bool,
        x: u16,
        y: u16,
        w: u16,
        h: u16,
    ) -> Result<()> {
        let mut out = Vec::with_capacity(10);
        ClientMessage::FramebufferUpdateRequest {
            incremental,
            x,
            y,
            width: w,
            height: h,
        }
        .write(&mut out)
        .map_err(|e| err("request", e))?;
        self.link.send(&out).await
    }

    /// Reads until `updates` complete FramebufferUpdates have arrived in all.
    pub async fn wait_updates(&mut self, updates: u64) -> Result<()> {
        while self.stream.received.updates < updates {
            let stream = &mut self.stream;
            self.link.recv(|b| stream.feed(b)).await??;
        }
        Ok(())
    }

    /// Reads until the proxy closes or something fails (an idle session's watch: pings
    /// are answered, and anything the proxy sends is counted, meanwhile). Returns why
    /// it ended.
    pub async fn idle(&mut self) -> ClientError {
        loop {
            let stream = &mut self.stream;
            match self.link.recv(|b| stream.feed(b)).await {
                Err(e) | Ok(Err(e)) => return e,
                Ok(Ok(())) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vizor_rfb::server::{write_rect_header, write_update_header};
    use vizor_rfb::PixelFormat;

    fn init() -> ServerInit {
        ServerInit {
            width: 64,
            height: 64,
            pixel_format: PixelFormat::RGB888,
            name: Vec::new(),
        }
    }

    #[test]
    fn counts_updates_in_any_cut() {
        let mut wire = Vec::new();
        for (w, h) in [(16u16, 16u16), (3, 5), (64, 64)] {
            write_update_header(2, &mut wire);
            write_rect_header(0, 0, w, h, Encoding::RAW, &mut wire);
            wire.extend(std::iter::repeat_n(
                9u8,
                usize::from(w) * usize::from(h) * 4,
            ));
            write_rect_header(0, 0, 64, 64, Encoding::DESKTOP_SIZE, &mut wire);
            wire.push(2); // a bell between updates
        }
        write_update_header(0, &mut wire);
        for cut in [1, 2, 7, 13, 1000, wire.len()] {
            let mut s = UpdateStream::new(&init());
            for chunk in wire.chunks(cut) {
                s.feed(chunk).unwrap_or_else(|e| panic!("cut {cut}: {e}"));
            }
            assert_eq!(
                s.received,
                Received {
                    updates: 4,
                    bytes: wire.len() as u64
                },
                "cut {cut}"
            );
        }
    }

    #[test]
    fn refuses_what_it_cannot_frame() {
        let mut wire = Vec::new();
        write_update_header(1, &mut wire);
        write_rect_header(0, 0, 1, 1, Encoding::TIGHT, &mut wire);
        assert!(UpdateStream::new(&init()).feed(&wire).is_err());
        assert!(UpdateStream::new(&init()).feed(&[7]).is_err());
    }
}
