//! The synthetic VM: an RFB 3.8 server that demands VNC authentication and answers
//! every FramebufferUpdateRequest at once with one Raw rectangle covering exactly the
//! requested area. It must outrun any proxy (QEMU cannot reach GB/s), so the two
//! answers the cases ask for, the full 1920x1080x32 screen and a 16x16 tile, are built
//! once and written whole with one `write_all` each; anything else is built on demand.
//!
//! Every listener is one libvirt test domain (its own port and password). Counters
//! of what was sent after ServerInit let a case check the client's account.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use vizor_rfb::client::{ClientDecoder, ClientMessage};
use vizor_rfb::handshake::server::{self as rfb_server, SecurityChosen};
use vizor_rfb::handshake::{Challenge, Progress, SecurityType, ServerInit, Version};
use vizor_rfb::server::{write_rect_header, write_update_header};
use vizor_rfb::{Encoding, Limits, PixelFormat};

/// The synthetic screen.
pub const WIDTH: u16 = 1920;
/// The synthetic screen.
pub const HEIGHT: u16 = 1080;
/// Bytes per pixel of [`PixelFormat::RGB888`] (32 bits per pixel).
pub const BYTES_PER_PIXEL: u64 = 4;
/// The desktop name in ServerInit, which clients check.
pub const DESKTOP: &str = "vizor-bench";
/// The small update's tile.
pub const TILE: u16 = 16;

/// The bytes of a FramebufferUpdate with one Raw rectangle `w` x `h` at `x`,`y`.
pub fn update_len(w: u16, h: u16) -> u64 {
    4 + 12 + u64::from(w) * u64::from(h) * BYTES_PER_PIXEL
}

fn build_update(x: u16, y: u16, w: u16, h: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(update_len(w, h) as usize);
    write_update_header(1, &mut out);
    write_rect_header(x, y, w, h, Encoding::RAW, &mut out);
    // A pattern rather than zeros, so nothing on the way can treat the pixels as empty.
    let pixels = usize::from(w) * usize::from(h) * BYTES_PER_PIXEL as usize;
    out.extend((0..pixels).map(|i| (i * 7 + i / 4096) as u8));
    out
}

/// What all listeners sent and saw, after ServerInit.
#[derive(Debug, Default)]
pub struct Counters {
    /// Console connections accepted.
    pub accepted: AtomicU64,
    /// Handshakes completed (ServerInit sent).
    pub sessions: AtomicU64,
    /// Connections that failed before or during the handshake, or broke the protocol.
    pub failures: AtomicU64,
    /// FramebufferUpdates sent.
    pub updates: AtomicU64,
    /// Bytes sent after ServerInit.
    pub bytes: AtomicU64,
}

/// A snapshot of [`Counters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sent {
    /// FramebufferUpdates sent.
    pub updates: u64,
    /// Bytes sent after ServerInit.
    pub bytes: u64,
}

impl Counters {
    /// The updates and bytes sent so far.
    pub fn sent(&self) -> Sent {
        Sent {
            updates: self.updates.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
        }
    }
}

/// One domain's console: where it listens and its VNC password.
#[derive(Debug, Clone)]
pub struct Console {
    /// The libvirt domain name.
    pub domain: String,
    /// The port on 127.0.0.1.
    pub port: u16,
    /// The VNC password (8 characters: VNC authentication uses 8).
    pub password: String,
}

/// The running synthetic VMs.
pub struct Upstream {
    /// One per domain.
    pub consoles: Vec<Console>,
    /// Shared by all of them.
    pub counters: Arc<Counters>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

struct Prebuilt {
    full: Vec<u8>,
    tile: Vec<u8>,
}

impl Upstream {
    /// Starts `domains` listeners on 127.0.0.1, each with a fresh random password.
    pub async fn start(domains: usize) -> std::io::Result<Upstream> {
        let prebuilt = Arc::new(Prebuilt {
            full: build_update(0, 0, WIDTH, HEIGHT),
            tile: build_update(0, 0, TILE, TILE),
        });
        let counters = Arc::new(Counters::default());
        let mut consoles = Vec::new();
        let mut tasks = Vec::new();
        for d in 0..domains {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let console = Console {
                domain: format!("bench-{d:02}"),
                port: listener.local_addr()?.port(),
                password: password(),
            };
            tasks.push(tokio::spawn(listen(
                listener,
                console.password.clone(),
                prebuilt.clone(),
                counters.clone(),
            )));
            consoles.push(console);
        }
        Ok(Upstream {
            consoles,
            counters,
            tasks,
        })
    }
}

/// Eight random alphanumeric characters.
fn password() -> String {
    use rand::distributions::{Alphanumeric, DistString};
    Alphanumeric.sample_string(&mut rand::thread_rng(), 8)
}

async fn listen(
    listener: TcpListener,
    password: String,
    prebuilt: Arc<Prebuilt>,
    counters: Arc<Counters>,
) {
    let password: Arc<str> = password.into();
    loop {
        let Ok((s, _)) = listener.accept().await else {
            // Out of files, most likely: the case that caused it reports the failure.
            counters.failures.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        counters.accepted.fetch_add(1, Ordering::Relaxed);
        let (password, prebuilt, counters) = (password.clone(), prebuilt.clone(), counters.clone());
        tokio::spawn(async move {
            if serve(s, &password, &prebuilt, &counters).await.is_err() {
                counters.failures.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
}

/// Why a console connection ended other than by the client closing it.
#[derive(Debug)]
struct Broken;

impl From<std::io::Error> for Broken {
    fn from(_: std::io::Error) -> Self {
        Broken
    }
}

impl From<vizor_rfb::Error> for Broken {
    fn from(_: vizor_rfb::Error) -> Self {
        Broken
    }
}

/// Feeds a handshake state until it completes.
async fn step<S, N>(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    mut state: S,
    mut receive: impl FnMut(S, &[u8]) -> Result<Progress<S, N>, vizor_rfb::Error>,
) -> Result<N, Broken> {
    loop {
        match receive(state, buf)? {
            Progress::Done { next, consumed } => {
                buf.drain(..consumed);
                return Ok(next);
            }
            Progress::NeedMore(st) => state = st,
        }
        if s.read_buf(buf).await? == 0 {
            return Err(Broken);
        }
    }
}

async fn send(s: &mut TcpStream, out: &mut Vec<u8>) -> Result<(), Broken> {
    s.write_all(out).await?;
    out.clear();
    Ok(())
}

/// One console connection: VNC authentication, ServerInit, then an update for every
/// request until the client closes. A client closing is the normal end (`Ok`).
async fn serve(
    mut s: TcpStream,
    password: &str,
    prebuilt: &Prebuilt,
    counters: &Counters,
) -> Result<(), Broken> {
    s.set_nodelay(true)?;
    let (mut buf, mut out) = (Vec::with_capacity(256), Vec::new());
    let start = rfb_server::start(Version::V3_8, Limits::default(), &mut out);
    send(&mut s, &mut out).await?;
    let offer = step(&mut s, &mut buf, start, |st, b| st.receive(b)).await?;
    let choice = offer.offer(&[SecurityType::VNC_AUTH], &mut out)?;
    send(&mut s, &mut out).await?;
    let SecurityChosen::VncAuth(challenge) =
        step(&mut s, &mut buf, choice, |st, b| st.receive(b)).await?
    else {
        return Err(Broken);
    };
    let expect = challenge.send(Challenge(rand::random()), &mut out);
    send(&mut s, &mut out).await?;
    let response = step(&mut s, &mut buf, expect, |st, b| st.receive(b)).await?;
    if !response.verify(password.as_bytes()) {
        response.into_result().refuse("wrong password", &mut out);
        send(&mut s, &mut out).await?;
        return Err(Broken);
    }
    let init = response.into_result().accept(&mut out);
    send(&mut s, &mut out).await?;
    step(&mut s, &mut buf, init, |st, b| st.receive(b)).await?;
    ServerInit {
        width: WIDTH,
        height: HEIGHT,
        pixel_format: PixelFormat::RGB888,
        name: DESKTOP.as_bytes().to_vec(),
    }
    .write(&mut out);
    send(&mut s, &mut out).await?;
    counters.sessions.fetch_add(1, Ordering::Relaxed);

    let mut dec = ClientDecoder::new(Limits::default());
    loop {
        let mut pos = 0;
        while let Some((msg, n)) = dec.decode(&buf[pos..])? {
            pos += n;
            match msg {
                // This server only ever speaks its own pixel format and Raw.
                ClientMessage::SetPixelFormat(pf) if pf != PixelFormat::RGB888 => {
                    return Err(Broken)
                }
                ClientMessage::FramebufferUpdateRequest {
                    x,
                    y,
                    width,
                    height,
                    ..
                } => {
                    let (w, h) = (
                        width.min(WIDTH.saturating_sub(x)),
                        height.min(HEIGHT.saturating_sub(y)),
                    );
                    let built;
                    let update: &[u8] = match (x, y, w, h) {
                        (0, 0, WIDTH, HEIGHT) => &prebuilt.full,
                        (0, 0, TILE, TILE) => &prebuilt.tile,
                        _ => {
                            built = build_update(x, y, w, h);
                            &built
                        }
                    };
                    // Counted before it is written: a client that has the whole update
                    // must find it counted (a write that fails ends the session, which
                    // the harness reports anyway).
                    counters.updates.fetch_add(1, Ordering::Relaxed);
                    counters
                        .bytes
                        .fetch_add(update.len() as u64, Ordering::Relaxed);
                    s.write_all(update).await?;
                }
                _ => {}
            }
        }
        buf.drain(..pos);
        if s.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
    }
}
