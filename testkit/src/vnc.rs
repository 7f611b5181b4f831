//! A synthetic VNC server: an RFB 3.8 server written for the tests and the benchmark.
//!
//! **It is a test double.** Real QEMU is used wherever a test can use it (the live
//! tests of `scripts/test.sh`); this double stands in only where QEMU cannot:
//!
//! - load generation: a thousand QEMU consoles do not fit on a CI machine, and QEMU
//!   cannot send updates at the rate a benchmark of the proxy needs ([`Screen`]);
//! - faults QEMU cannot be made to produce: a replaced ProtocolVersion, a refusal
//!   during the handshake ([`Fault`]), a lying ServerInit or update (whatever a
//!   session writes after [`Conn`]);
//! - console configurations QEMU keeps from happening (security type None behind a
//!   password libvirt still stores: [`Auth::None`]).
//!
//! A [`Double`] runs the server side of the handshake with vizor-rfb's sans-IO
//! states (through [`crate::drive()`]) up to ClientInit and hands the connection
//! ([`Conn`]) to the caller's session, which writes its own ServerInit: a scripted
//! exchange, a fault, or [`Screen::serve`]. [`Double::serve`] accepts connections and
//! counts them in [`Stats`], which several doubles may share.

use crate::drive::{drive, DriveError};
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use vizor_rfb::client::{ClientDecoder, ClientMessage};
use vizor_rfb::handshake::server::{self as rfb_server, SecurityChosen};
use vizor_rfb::handshake::{Challenge, ClientInit, SecurityType, ServerInit, Version};
use vizor_rfb::server::{write_rect_header, write_update_header};
use vizor_rfb::{Encoding, Limits, PixelFormat};

/// How the double authenticates its client (vizor).
#[derive(Debug, Clone)]
pub enum Auth {
    /// Security type None, alone.
    None,
    /// VNC authentication, alone, with this password (VNC uses its first 8 bytes).
    Password(String),
}

/// A fault the double commits during the handshake in place of a stage, after which
/// it reads until the client closes.
#[derive(Debug, Clone)]
pub enum Fault {
    /// These bytes in place of its ProtocolVersion.
    Version(Vec<u8>),
    /// Agrees on the version, then refuses with no security types and this reason.
    Refuse(String),
}

/// A console connection past ClientInit: the caller's session writes ServerInit (or
/// whatever it wants in its place) and goes on from there.
#[derive(Debug)]
pub struct Conn {
    /// The connection from the client.
    pub stream: TcpStream,
    /// Bytes the client sent after ClientInit, already read.
    pub buf: Vec<u8>,
    /// The client's ClientInit.
    pub client_init: ClientInit,
}

impl Conn {
    /// Writes `bytes`.
    pub async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Writes `init`.
    pub async fn send_server_init(&mut self, init: &ServerInit) -> io::Result<()> {
        let mut out = Vec::new();
        init.write(&mut out);
        self.send(&out).await
    }

    /// The client's next `n` bytes (those in [`Conn::buf`] first).
    pub async fn take(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.buf.len() < n {
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// Reads and drops whatever the client sends until it closes.
    pub async fn drain(mut self) -> io::Result<()> {
        drain(&mut self.stream).await
    }
}

/// Reads until the peer closes.
async fn drain(s: &mut TcpStream) -> io::Result<()> {
    let mut tmp = [0u8; 4096];
    while s.read(&mut tmp).await? > 0 {}
    Ok(())
}

/// How a handshake ended.
#[derive(Debug)]
pub enum Handshake {
    /// Past ClientInit: the session's turn.
    Relay(Conn),
    /// The double committed its [`Fault`] and the client has closed.
    Faulted,
}

/// What doubles accepted and why connections failed; several doubles may share one.
#[derive(Debug, Default)]
pub struct Stats {
    /// Console connections accepted.
    pub accepted: AtomicUsize,
    /// Handshakes that reached ClientInit.
    pub sessions: AtomicUsize,
    failures: Mutex<Vec<String>>,
}

impl Stats {
    /// Connections that failed (or could not be accepted), each with the double's
    /// label and why.
    pub fn failures(&self) -> Vec<String> {
        self.failures.lock().map(|f| f.clone()).unwrap_or_default()
    }

    fn fail(&self, label: &str, why: String) {
        let line = if label.is_empty() {
            why
        } else {
            format!("{label}: {why}")
        };
        if let Ok(mut f) = self.failures.lock() {
            f.push(line);
        }
    }
}

/// One synthetic VNC console: how it authenticates, the fault it commits if any, and
/// where it counts.
#[derive(Debug, Clone)]
pub struct Double {
    auth: Auth,
    fault: Option<Fault>,
    label: String,
    stats: Arc<Stats>,
}

/// A [`Double`] serving a listener; dropping it stops accepting (sessions under way
/// go on).
#[derive(Debug)]
pub struct Served {
    port: u16,
    stats: Arc<Stats>,
    task: tokio::task::JoinHandle<()>,
}

impl Served {
    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its [`Stats`].
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Writes what a handshake state appended to `out`, and empties it.
async fn send(s: &mut TcpStream, out: &mut Vec<u8>) -> Result<(), String> {
    s.write_all(out).await.map_err(|e| e.to_string())?;
    out.clear();
    Ok(())
}

fn step_error(e: DriveError<vizor_rfb::Error, io::Error>) -> String {
    match e {
        DriveError::Step(e) => e.to_string(),
        DriveError::Source(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            "the client closed the connection during the handshake".into()
        }
        DriveError::Source(e) => e.to_string(),
    }
}

impl Double {
    /// A well-behaved console authenticating with `auth`, with stats of its own.
    pub fn new(auth: Auth) -> Double {
        Double {
            auth,
            fault: None,
            label: String::new(),
            stats: Arc::default(),
        }
    }

    /// Commits `fault` on every connection.
    pub fn fault(mut self, fault: Fault) -> Double {
        self.fault = Some(fault);
        self
    }

    /// Names its failures in [`Stats::failures`] (such as its domain's name).
    pub fn label(mut self, label: &str) -> Double {
        self.label = label.to_owned();
        self
    }

    /// Counts in `stats`, shared with other doubles.
    pub fn stats(mut self, stats: Arc<Stats>) -> Double {
        self.stats = stats;
        self
    }

    /// Runs the server side of the handshake on `s`: RFB 3.8, the security type of
    /// its [`Auth`], up to ClientInit, or its [`Fault`]. `Err` says what went wrong
    /// (the client closed, broke the protocol, gave the wrong password).
    pub async fn handshake(&self, mut s: TcpStream) -> Result<Handshake, String> {
        let (mut buf, mut out) = (Vec::with_capacity(256), Vec::new());
        if let Some(Fault::Version(bytes)) = &self.fault {
            s.write_all(bytes).await.map_err(|e| e.to_string())?;
            drain(&mut s).await.map_err(|e| e.to_string())?;
            return Ok(Handshake::Faulted);
        }
        let start = rfb_server::start(Version::V3_8, Limits::default(), &mut out);
        send(&mut s, &mut out).await?;
        let offer = drive(&mut s, &mut buf, start, |st, b| st.receive(b))
            .await
            .map_err(step_error)?;
        if let Some(Fault::Refuse(reason)) = &self.fault {
            offer.refuse(reason, &mut out);
            send(&mut s, &mut out).await?;
            drain(&mut s).await.map_err(|e| e.to_string())?;
            return Ok(Handshake::Faulted);
        }
        let offered = match self.auth {
            Auth::None => SecurityType::NONE,
            Auth::Password(_) => SecurityType::VNC_AUTH,
        };
        let choice = offer
            .offer(&[offered], &mut out)
            .map_err(|e| e.to_string())?;
        send(&mut s, &mut out).await?;
        let chosen = drive(&mut s, &mut buf, choice, |st, b| st.receive(b))
            .await
            .map_err(step_error)?;
        let result = match (chosen, &self.auth) {
            (SecurityChosen::None(result), Auth::None) => result,
            (SecurityChosen::VncAuth(challenge), Auth::Password(password)) => {
                let expect = challenge.send(Challenge(rand::random()), &mut out);
                send(&mut s, &mut out).await?;
                let response = drive(&mut s, &mut buf, expect, |st, b| st.receive(b))
                    .await
                    .map_err(step_error)?;
                if !response.verify(password.as_bytes()) {
                    response
                        .into_result()
                        .refuse("the VM double was given the wrong password", &mut out);
                    send(&mut s, &mut out).await?;
                    return Err("the client gave the wrong password".into());
                }
                response.into_result()
            }
            // The codec accepts only a type that was offered.
            _ => return Err("the client chose a security type not offered".into()),
        };
        let init = result.accept(&mut out);
        send(&mut s, &mut out).await?;
        let client_init = drive(&mut s, &mut buf, init, |st, b| st.receive(b))
            .await
            .map_err(step_error)?;
        Ok(Handshake::Relay(Conn {
            stream: s,
            buf,
            client_init,
        }))
    }

    /// Binds a port on 127.0.0.1 and [`Double::serve`]s it.
    pub async fn listen<F, Fut>(self, session: F) -> io::Result<Served>
    where
        F: Fn(Conn) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        self.serve(listener, session)
    }

    /// Accepts connections on `listener`, each in a task of its own: the handshake,
    /// then `session` once past ClientInit. Counts them in its [`Stats`], with every
    /// connection that failed, in the handshake or in `session`.
    pub fn serve<F, Fut>(self, listener: TcpListener, session: F) -> io::Result<Served>
    where
        F: Fn(Conn) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        let port = listener.local_addr()?.port();
        let stats = self.stats.clone();
        let double = Arc::new(self);
        let session = Arc::new(session);
        let task = tokio::spawn(async move {
            loop {
                let s = match listener.accept().await {
                    Ok((s, _)) => s,
                    Err(e) => {
                        // Out of files, most likely: whoever caused it sees the failure.
                        double.stats.fail(&double.label, format!("accept: {e}"));
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                double.stats.accepted.fetch_add(1, Ordering::Relaxed);
                let (double, session) = (double.clone(), session.clone());
                tokio::spawn(async move {
                    if let Err(e) = double.run(s, &*session).await {
                        double.stats.fail(&double.label, e);
                    }
                });
            }
        });
        Ok(Served { port, stats, task })
    }

    async fn run<F, Fut>(&self, s: TcpStream, session: &F) -> Result<(), String>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = Result<(), String>>,
    {
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        match self.handshake(s).await? {
            Handshake::Faulted => Ok(()),
            Handshake::Relay(conn) => {
                self.stats.sessions.fetch_add(1, Ordering::Relaxed);
                session(conn).await
            }
        }
    }
}

/// Bytes per pixel of [`PixelFormat::RGB888`], the only format a [`Screen`] speaks.
pub const BYTES_PER_PIXEL: u64 = 4;

/// The bytes of a FramebufferUpdate with one Raw rectangle `w` x `h` (32 bits per
/// pixel).
pub fn raw_update_len(w: u16, h: u16) -> u64 {
    4 + 12 + u64::from(w) * u64::from(h) * BYTES_PER_PIXEL
}

/// A FramebufferUpdate with one Raw rectangle `w` x `h` at `x`,`y` (32 bits per pixel),
/// its pixels a pattern rather than zeros, so nothing on the way can treat them as
/// empty.
pub fn raw_update(x: u16, y: u16, w: u16, h: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw_update_len(w, h) as usize);
    write_update_header(1, &mut out);
    write_rect_header(x, y, w, h, Encoding::RAW, &mut out);
    let pixels = usize::from(w) * usize::from(h) * BYTES_PER_PIXEL as usize;
    out.extend((0..pixels).map(|i| (i * 7 + i / 4096) as u8));
    out
}

/// A rectangle: x, y, width, height.
type Rect = (u16, u16, u16, u16);

/// What a [`Screen`] sent after ServerInit, over all its sessions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sent {
    /// FramebufferUpdates sent.
    pub updates: u64,
    /// Bytes sent after ServerInit.
    pub bytes: u64,
}

/// A fast screen for load and benchmarks: answers every FramebufferUpdateRequest at
/// once with one Raw rectangle covering exactly the requested area (clipped to the
/// screen), and counts what it sent. It must outrun any proxy (QEMU cannot reach GB/s),
/// so the updates it is told to expect are built once and written whole with one
/// The third byte of an update's first pixel once the client has pointed: the first
/// two are the pointer's x, little-endian (with noVNC's pixel format: red and green).
pub const POINTER_MARK: u8 = 0xA5;

/// `write_all` each; anything else is built on demand.
#[derive(Debug)]
pub struct Screen {
    width: u16,
    height: u16,
    name: Vec<u8>,
    /// Updates built once, each with its rectangle (x, y, width, height).
    prebuilt: Vec<(Rect, Vec<u8>)>,
    updates: AtomicU64,
    bytes: AtomicU64,
}

impl Screen {
    /// A `width` x `height` screen in [`PixelFormat::RGB888`] named `name` in its
    /// ServerInit, its whole-screen update prebuilt.
    pub fn new(width: u16, height: u16, name: &str) -> Screen {
        Screen {
            width,
            height,
            name: name.as_bytes().to_vec(),
            prebuilt: vec![((0, 0, width, height), raw_update(0, 0, width, height))],
            updates: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        }
    }

    /// Prebuilds the update of the `w` x `h` rectangle at `x`,`y` too.
    pub fn prebuild(mut self, x: u16, y: u16, w: u16, h: u16) -> Screen {
        self.prebuilt.push(((x, y, w, h), raw_update(x, y, w, h)));
        self
    }

    /// Its ServerInit.
    pub fn server_init(&self) -> ServerInit {
        ServerInit {
            width: self.width,
            height: self.height,
            pixel_format: PixelFormat::RGB888,
            name: self.name.clone(),
        }
    }

    /// The updates and bytes sent so far.
    pub fn sent(&self) -> Sent {
        Sent {
            updates: self.updates.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
        }
    }

    /// One session: ServerInit, then an update for every request until the client
    /// closes, which is the normal end (`Ok`). A client asking for another pixel
    /// format, or breaking the protocol, is an `Err`.
    pub async fn serve(&self, mut conn: Conn) -> Result<(), String> {
        let broken = |e: &dyn std::fmt::Display| e.to_string();
        conn.send_server_init(&self.server_init())
            .await
            .map_err(|e| broken(&e))?;
        let Conn {
            stream: mut s,
            mut buf,
            ..
        } = conn;
        let mut dec = ClientDecoder::new(Limits::default());
        // The last pointer position the client sent: drawn into the first pixel of
        // each update from the screen's corner, so a client can tell which of its
        // inputs a frame answers (the benchmark's input-to-display measure).
        let mut pointer: Option<u16> = None;
        loop {
            let mut pos = 0;
            while let Some((msg, n)) = dec.decode(&buf[pos..]).map_err(|e| broken(&e))? {
                pos += n;
                match msg {
                    // Its updates are 32 bits a pixel; how the channels lie in them
                    // (noVNC asks for red in the low byte) costs the same bytes.
                    ClientMessage::SetPixelFormat(pf)
                        if pf.bits_per_pixel != 32 || !pf.true_colour =>
                    {
                        return Err(format!("the client asked for pixel format {pf:?}"));
                    }
                    ClientMessage::PointerEvent { x, .. } => pointer = Some(x),
                    ClientMessage::FramebufferUpdateRequest {
                        x,
                        y,
                        width,
                        height,
                        ..
                    } => {
                        let (w, h) = (
                            width.min(self.width.saturating_sub(x)),
                            height.min(self.height.saturating_sub(y)),
                        );
                        let built;
                        let update: &[u8] =
                            match self.prebuilt.iter().find(|(at, _)| *at == (x, y, w, h)) {
                                Some((_, update)) => update,
                                None => {
                                    built = raw_update(x, y, w, h);
                                    &built
                                }
                            };
                        // Counted before it is written: a client that has the whole
                        // update must find it counted (a write that fails ends the
                        // session, which the caller reports anyway).
                        self.updates.fetch_add(1, Ordering::Relaxed);
                        self.bytes.fetch_add(update.len() as u64, Ordering::Relaxed);
                        // Header (4 bytes), rectangle header (12), then the pixels.
                        match pointer {
                            Some(px) if (x, y) == (0, 0) && update.len() >= 20 => {
                                let [lo, hi] = px.to_le_bytes();
                                s.write_all(&update[..16]).await.map_err(|e| broken(&e))?;
                                s.write_all(&[lo, hi, POINTER_MARK, 0])
                                    .await
                                    .map_err(|e| broken(&e))?;
                                s.write_all(&update[20..]).await.map_err(|e| broken(&e))?;
                            }
                            _ => s.write_all(update).await.map_err(|e| broken(&e))?,
                        }
                    }
                    _ => {}
                }
            }
            buf.drain(..pos);
            if s.read_buf(&mut buf).await.map_err(|e| broken(&e))? == 0 {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drive::drive;
    use vizor_rfb::client::write_set_encodings;
    use vizor_rfb::handshake::client;

    /// A client handshake against `port`; returns the stream, what followed and the
    /// ServerInit, or the codec's error as text.
    async fn connect(
        port: u16,
        password: Option<&str>,
    ) -> Result<(TcpStream, Vec<u8>, ServerInit), String> {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let (mut buf, mut out) = (Vec::new(), Vec::new());
        let st = client::ExpectServerVersion::new(Limits::default());
        let sec = drive(&mut s, &mut buf, st, |s, b| s.receive(b, &mut out))
            .await
            .map_err(|e| e.to_string())?;
        s.write_all(&std::mem::take(&mut out)).await.unwrap();
        let choose = drive(&mut s, &mut buf, sec, |s, b| s.receive(b))
            .await
            .map_err(|e| e.to_string())?;
        let result = match password {
            Some(p) => {
                let ch = choose.choose_vnc_auth(&mut out).unwrap();
                s.write_all(&std::mem::take(&mut out)).await.unwrap();
                let respond = drive(&mut s, &mut buf, ch, |s, b| s.receive(b))
                    .await
                    .map_err(|e| e.to_string())?;
                respond.respond(p.as_bytes(), &mut out)
            }
            None => choose.choose_none(&mut out).unwrap(),
        };
        s.write_all(&std::mem::take(&mut out)).await.unwrap();
        let init = drive(&mut s, &mut buf, result, |s, b| s.receive(b))
            .await
            .map_err(|e| e.to_string())?;
        let expect = init.send(true, &mut out);
        s.write_all(&std::mem::take(&mut out)).await.unwrap();
        let si = drive(&mut s, &mut buf, expect, |s, b| s.receive(b))
            .await
            .map_err(|e| e.to_string())?;
        Ok((s, buf, si))
    }

    #[tokio::test]
    async fn a_screen_answers_requests_and_counts() {
        let screen = Arc::new(Screen::new(32, 16, "kit").prebuild(0, 0, 4, 4));
        let s2 = screen.clone();
        let served = Double::new(Auth::Password("pw".into()))
            .listen(move |conn| {
                let screen = s2.clone();
                async move { screen.serve(conn).await }
            })
            .await
            .unwrap();
        let (mut s, mut buf, si) = connect(served.port(), Some("pw")).await.unwrap();
        assert_eq!((si.width, si.height, &si.name[..]), (32, 16, &b"kit"[..]));
        let mut out = Vec::new();
        write_set_encodings([Encoding::RAW], &mut out);
        for (x, y, w, h) in [(0, 0, 4, 4), (30, 0, 8, 8)] {
            ClientMessage::FramebufferUpdateRequest {
                incremental: false,
                x,
                y,
                width: w,
                height: h,
            }
            .write(&mut out)
            .unwrap();
        }
        s.write_all(&out).await.unwrap();
        let want = [raw_update(0, 0, 4, 4), raw_update(30, 0, 2, 8)].concat();
        while buf.len() < want.len() {
            assert!(s.read_buf(&mut buf).await.unwrap() > 0);
        }
        assert_eq!(buf, want);
        assert_eq!(
            screen.sent(),
            Sent {
                updates: 2,
                bytes: raw_update_len(4, 4) + raw_update_len(2, 8)
            }
        );
        assert_eq!(served.stats().accepted.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn faults_and_a_wrong_password() {
        let keep = |conn: Conn| async move { conn.drain().await.map_err(|e| e.to_string()) };
        let served = Double::new(Auth::Password("pw".into()))
            .label("vm")
            .listen(keep)
            .await
            .unwrap();
        let err = connect(served.port(), Some("not-pw")).await.unwrap_err();
        assert_eq!(
            err,
            "authentication failed: the VM double was given the wrong password"
        );
        let refusing = Double::new(Auth::None)
            .fault(Fault::Refuse("go away".into()))
            .listen(keep)
            .await
            .unwrap();
        assert_eq!(
            connect(refusing.port(), None).await.unwrap_err(),
            "server refused the connection: go away"
        );
        let garbled = Double::new(Auth::None)
            .fault(Fault::Version(b"SSH-2.0-x\r\n\0".to_vec()))
            .listen(keep)
            .await
            .unwrap();
        assert!(connect(garbled.port(), None)
            .await
            .unwrap_err()
            .starts_with("malformed RFB protocol version"));
        let open = Double::new(Auth::None)
            .listen(move |mut conn| async move {
                conn.send_server_init(&Screen::new(64, 48, "open").server_init())
                    .await
                    .map_err(|e| e.to_string())?;
                conn.drain().await.map_err(|e| e.to_string())
            })
            .await
            .unwrap();
        let (_, _, si) = connect(open.port(), None).await.unwrap();
        assert_eq!(&si.name[..], b"open");
        for _ in 0..100 {
            if !served.stats().failures().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            served.stats().failures(),
            ["vm: the client gave the wrong password"]
        );
    }
}
