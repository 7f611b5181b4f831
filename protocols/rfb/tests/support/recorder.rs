//! A scripted RFB client that records both directions of a real session.
//!
//! It authenticates with the codec's client handshake, then sends a fixed script of
//! client messages (pixel format, encodings, update requests, keys, pointer, clipboard,
//! desktop size) and records every byte the server sends *without parsing it*, so a
//! capture does not inherit the codec's mistakes. The VNC authentication response is
//! zeroed in the record: it is password-equivalent against an offline attack.

use super::capture::{Capture, Chunk, Dir};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vizor_rfb::client::{clipboard, write_set_encodings, ClientMessage, CutText};
use vizor_rfb::handshake::{client, SecurityType};
use vizor_rfb::{Encoding, Limits, PixelFormat};
use vizor_testkit::{drive_blocking, Blocking, DriveError, Stepped};

/// One recorded session's script.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: &'static str,
    /// SetPixelFormat sent first, if any.
    pub pixel_format: Option<PixelFormat>,
    pub encodings: Vec<Encoding>,
    /// Encodings whose rectangles the capture must contain.
    pub expect: Vec<Encoding>,
    /// A SetPixelFormat sent mid-session, once no update is outstanding.
    pub switch_to: Option<PixelFormat>,
    /// Reset the guest mid-session: its display switches modes, which makes QEMU send
    /// resizes (and, when offered, a VMware display-mode change).
    pub reset_guest: bool,
}

/// Resets the guest of the VNC server being recorded.
pub type ResetHook<'a> = &'a dyn Fn() -> Result<(), String>;

/// Resets a libvirt domain's guest (`virsh reset`): the usual [`ResetHook`].
pub fn virsh_reset(domain: &str) -> Result<(), String> {
    let status = std::process::Command::new("virsh")
        .args(["-c", "qemu:///system", "reset", domain])
        .stdout(std::process::Stdio::null())
        .status()
        .map_err(|e| format!("virsh: {e}"))?;
    status
        .success()
        .then_some(())
        .ok_or(format!("virsh reset {domain} failed"))
}

pub const RGB565: PixelFormat = PixelFormat::RGB565;

pub const BGR233: PixelFormat = PixelFormat::BGR233;

/// The pseudo-encodings QEMU implements, offered in every scenario.
fn qemu_pseudo() -> Vec<Encoding> {
    vec![
        Encoding::DESKTOP_SIZE,
        Encoding::EXTENDED_DESKTOP_SIZE,
        Encoding::LAST_RECT,
        Encoding::CURSOR,
        Encoding::QEMU_POINTER_MOTION_CHANGE,
        Encoding::QEMU_EXTENDED_KEY_EVENT,
        Encoding::QEMU_AUDIO,
        Encoding::QEMU_LED_STATE,
        Encoding::EXTENDED_CLIPBOARD,
        Encoding::DESKTOP_NAME,
        Encoding::XVP,
    ]
}

fn scenario(
    name: &'static str,
    pixel_format: Option<PixelFormat>,
    main: &[Encoding],
    extra: &[Encoding],
) -> Scenario {
    let mut encodings = main.to_vec();
    encodings.extend_from_slice(extra);
    encodings.extend(qemu_pseudo());
    Scenario {
        name,
        pixel_format,
        encodings,
        expect: main.to_vec(),
        switch_to: None,
        reset_guest: false,
    }
}

/// One session per encoding QEMU supports, plus pixel-format variations.
pub fn scenarios() -> Vec<Scenario> {
    let level = |l: i32| Encoding(Encoding::COMPRESS_LEVEL_0.0 + l);
    // A guest reset switches display modes: QEMU resets the client to its own pixel
    // format with a VMware display-mode change, then resizes.
    let mut wmvi = scenario(
        "reset-wmvi-zrle-16",
        Some(RGB565),
        &[Encoding::ZRLE],
        &[Encoding::VMWARE_DISPLAY_MODE_CHANGE],
    );
    wmvi.reset_guest = true;
    wmvi.switch_to = Some(RGB565);
    wmvi.expect.push(Encoding::VMWARE_DISPLAY_MODE_CHANGE);
    // Without ExtendedDesktopSize, QEMU resizes with the plain DesktopSize rectangle.
    let mut resize = scenario("reset-desktopsize-hextile", None, &[Encoding::HEXTILE], &[]);
    resize
        .encodings
        .retain(|e| *e != Encoding::EXTENDED_DESKTOP_SIZE);
    resize.reset_guest = true;
    resize.expect.push(Encoding::DESKTOP_SIZE);
    vec![
        scenario("raw-32", Some(PixelFormat::RGB888), &[Encoding::RAW], &[]),
        scenario("raw-8", Some(BGR233), &[Encoding::RAW], &[]),
        scenario("hextile-32", None, &[Encoding::HEXTILE], &[]),
        scenario("hextile-16", Some(RGB565), &[Encoding::HEXTILE], &[]),
        scenario("zlib-32", None, &[Encoding::ZLIB], &[level(6)]),
        scenario("zrle-32", None, &[Encoding::ZRLE], &[]),
        scenario("zrle-16", Some(RGB565), &[Encoding::ZRLE], &[]),
        scenario(
            "tight-32",
            None,
            &[Encoding::TIGHT],
            &[level(9), Encoding::JPEG_QUALITY_9],
        ),
        scenario("tight-16", Some(RGB565), &[Encoding::TIGHT], &[level(1)]),
        scenario("tight-8", Some(BGR233), &[Encoding::TIGHT], &[]),
        scenario(
            "tightpng-32",
            None,
            &[Encoding::TIGHT_PNG],
            &[Encoding::JPEG_QUALITY_9],
        ),
        scenario(
            "alpha-cursor",
            None,
            &[Encoding::ZRLE],
            &[Encoding::CURSOR_WITH_ALPHA],
        ),
        wmvi,
        resize,
    ]
}

struct Log {
    start: Instant,
    chunks: Mutex<Vec<Chunk>>,
    last_s2c: AtomicU64,
}

impl Log {
    fn now(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }
    fn push(&self, dir: Dir, bytes: &[u8]) {
        let micros = self.now();
        if dir == Dir::S2C {
            self.last_s2c.store(micros, Ordering::SeqCst);
        }
        self.chunks.lock().unwrap().push(Chunk {
            dir,
            micros,
            bytes: bytes.to_vec(),
        });
    }
    fn quiet_for(&self, d: Duration) -> bool {
        self.now()
            .saturating_sub(self.last_s2c.load(Ordering::SeqCst))
            >= d.as_micros() as u64
    }
}

/// The server's side of the socket with every read recorded.
struct Recorded<'a> {
    sock: &'a mut TcpStream,
    log: &'a Log,
}

impl Read for Recorded<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.sock.read(buf)?;
        if n > 0 {
            self.log.push(Dir::S2C, &buf[..n]);
        }
        Ok(n)
    }
}

/// Reads until the handshake state completes; every read is recorded.
fn pump<S, P>(
    sock: &mut TcpStream,
    log: &Log,
    buf: &mut Vec<u8>,
    state: S,
    step: impl FnMut(S, &[u8]) -> Result<P, vizor_rfb::Error>,
) -> Result<P::Next, String>
where
    P: Stepped<State = S>,
{
    let mut src = Blocking(Recorded { sock, log });
    drive_blocking(&mut src, buf, state, step).map_err(|e| match e {
        DriveError::Step(e) => format!("handshake: {e}"),
        DriveError::Source(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            "server closed the connection during the handshake".into()
        }
        DriveError::Source(e) => format!("read: {e}"),
    })
}

/// Whether the session so far holds every resize rectangle in `resizes`.
fn resized(log: &Log, resizes: &[Encoding]) -> bool {
    let mut chunks = log.chunks.lock().unwrap().clone();
    chunks.sort_by_key(|c| c.micros);
    let so_far = Capture {
        meta: String::new(),
        chunks,
    };
    match super::replay::frame_so_far(&so_far) {
        Ok(f) => resizes.iter().all(|e| f.rects.contains_key(&e.0)),
        Err(_) => false,
    }
}

fn send(sock: &mut TcpStream, log: &Log, bytes: &[u8]) -> Result<(), String> {
    log.push(Dir::C2S, bytes);
    sock.write_all(bytes).map_err(|e| format!("write: {e}"))
}

fn msg(m: ClientMessage<'_>) -> Vec<u8> {
    let mut v = Vec::new();
    m.write(&mut v).expect("recorder messages fit the wire");
    v
}

/// Records one session against the VNC server at `addr`.
pub fn record(
    addr: &str,
    password: Option<&[u8]>,
    sc: &Scenario,
    reset: Option<ResetHook<'_>>,
) -> Result<Capture, String> {
    if sc.reset_guest && reset.is_none() {
        return Err(format!("scenario {} needs a guest reset hook", sc.name));
    }
    let mut sock = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    sock.set_nodelay(true).ok();
    sock.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let log = Arc::new(Log {
        start: Instant::now(),
        chunks: Mutex::new(Vec::new()),
        last_s2c: AtomicU64::new(0),
    });
    let limits = Limits::default();
    let mut buf = Vec::new();
    let mut out = Vec::new();

    let st = client::ExpectServerVersion::new(limits);
    let st = pump(&mut sock, &log, &mut buf, st, |s, b| s.receive(b, &mut out))?;
    send(&mut sock, &log, &out)?;
    out.clear();
    let choose = pump(&mut sock, &log, &mut buf, st, |s, b| s.receive(b))?;
    let version = choose.version();
    let result = if choose.offered().contains(&SecurityType::VNC_AUTH) {
        let password = password.ok_or("server wants VNC authentication: no password given")?;
        let ch = choose
            .choose_vnc_auth(&mut out)
            .map_err(|e| e.to_string())?;
        send(&mut sock, &log, &out)?;
        out.clear();
        let respond = pump(&mut sock, &log, &mut buf, ch, |s, b| s.receive(b))?;
        let result = respond.respond(password, &mut out);
        // The real response goes on the wire; the record holds zeros.
        log.push(Dir::C2S, &[0u8; 16]);
        sock.write_all(&out).map_err(|e| format!("write: {e}"))?;
        out.clear();
        result
    } else {
        let r = choose.choose_none(&mut out).map_err(|e| e.to_string())?;
        if !out.is_empty() {
            send(&mut sock, &log, &out)?;
            out.clear();
        }
        r
    };
    let init = pump(&mut sock, &log, &mut buf, result, |s, b| s.receive(b))?;
    let expect = init.send(true, &mut out);
    send(&mut sock, &log, &out)?;
    out.clear();
    let server_init = pump(&mut sock, &log, &mut buf, expect, |s, b| s.receive(b))?;
    if !buf.is_empty() {
        return Err("server sent data before the client's first message".into());
    }

    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let mut sock = sock.try_clone().map_err(|e| e.to_string())?;
        sock.set_read_timeout(Some(Duration::from_millis(50))).ok();
        let (log, stop) = (log.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut tmp = vec![0u8; 65536];
            loop {
                match sock.read(&mut tmp) {
                    Ok(0) => break,
                    Ok(n) => log.push(Dir::S2C, &tmp[..n]),
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
        })
    };

    let (w, h) = (server_init.width, server_init.height);
    let full = |incremental| {
        msg(ClientMessage::FramebufferUpdateRequest {
            incremental,
            x: 0,
            y: 0,
            width: w,
            height: h,
        })
    };
    let wait_quiet = |log: &Log| {
        let deadline = Instant::now() + Duration::from_secs(8);
        std::thread::sleep(Duration::from_millis(100));
        while !log.quiet_for(Duration::from_millis(600)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    if let Some(pf) = sc.pixel_format {
        send(&mut sock, &log, &msg(ClientMessage::SetPixelFormat(pf)))?;
    }
    let mut set = Vec::new();
    write_set_encodings(sc.encodings.iter().copied(), &mut set);
    send(&mut sock, &log, &set)?;
    send(&mut sock, &log, &full(false))?;
    wait_quiet(&log);
    for (down, keysym) in [(true, 0xff1bu32), (false, 0xff1b)] {
        send(
            &mut sock,
            &log,
            &msg(ClientMessage::KeyEvent { down, keysym }),
        )?;
    }
    for down in [true, false] {
        send(
            &mut sock,
            &log,
            &msg(ClientMessage::QemuExtendedKeyEvent {
                down,
                keysym: 0x61,
                keycode: 0x1e,
            }),
        )?;
    }
    for (buttons, x) in [(0u16, 10u16), (1, 12), (0, 14)] {
        send(
            &mut sock,
            &log,
            &msg(ClientMessage::PointerEvent { buttons, x, y: 20 }),
        )?;
    }
    send(
        &mut sock,
        &log,
        &msg(ClientMessage::ClientCutText(CutText::Latin1(b"vizor"))),
    )?;
    send(
        &mut sock,
        &log,
        &msg(ClientMessage::ClientCutText(CutText::Extended {
            flags: clipboard::NOTIFY | clipboard::TEXT,
            data: &[],
        })),
    )?;
    // SetDesktopSize only after offering ExtendedDesktopSize, as the spec requires
    // (QEMU answers it either way, with a rectangle the client never asked for).
    if sc.encodings.contains(&Encoding::EXTENDED_DESKTOP_SIZE) {
        let mut sds = vec![251, 0];
        sds.extend_from_slice(&w.to_be_bytes());
        sds.extend_from_slice(&h.to_be_bytes());
        sds.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        sds.extend_from_slice(&w.to_be_bytes());
        sds.extend_from_slice(&h.to_be_bytes());
        sds.extend_from_slice(&[0, 0, 0, 0]);
        send(&mut sock, &log, &sds)?;
    }
    for _ in 0..10 {
        send(&mut sock, &log, &full(true))?;
        std::thread::sleep(Duration::from_millis(100));
    }
    if let (true, Some(reset)) = (sc.reset_guest, reset) {
        reset()?;
        // Keep asking while the guest's display goes through its modes: at least 3 s,
        // and on until the resize the scenario expects has come (a guest booting under
        // CPU load can take longer to switch mode), then 1 s more to settle; 30 s at
        // most.
        let resizes: Vec<Encoding> = sc
            .expect
            .iter()
            .copied()
            .filter(|e| {
                [
                    Encoding::DESKTOP_SIZE,
                    Encoding::EXTENDED_DESKTOP_SIZE,
                    Encoding::VMWARE_DISPLAY_MODE_CHANGE,
                ]
                .contains(e)
            })
            .collect();
        let mut settle = None;
        for i in 0..300 {
            send(&mut sock, &log, &full(true))?;
            std::thread::sleep(Duration::from_millis(100));
            if i < 30 {
                continue;
            }
            match settle {
                Some(0) => break,
                Some(n) => settle = Some(n - 1),
                None if i % 10 == 0 && resized(&log, &resizes) => settle = Some(10),
                None => {}
            }
        }
    }
    if let Some(pf) = sc.switch_to {
        // SetPixelFormat only with no update outstanding, as the spec requires.
        wait_quiet(&log);
        send(&mut sock, &log, &msg(ClientMessage::SetPixelFormat(pf)))?;
        send(&mut sock, &log, &full(false))?;
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(100));
            send(&mut sock, &log, &full(true))?;
        }
    }
    wait_quiet(&log);
    stop.store(true, Ordering::SeqCst);
    let _ = sock.shutdown(std::net::Shutdown::Both);
    reader.join().map_err(|_| "reader thread panicked")?;

    let mut chunks = std::mem::take(&mut *log.chunks.lock().unwrap());
    chunks.sort_by_key(|c| c.micros);
    let meta = format!(
        "{{\"scenario\":\"{}\",\"desktop\":\"{}\",\"size\":\"{}x{}\",\"version\":\"{:?}\",\"encodings\":{:?},\"redacted\":\"the 16-byte VNC authentication response is zeroed\"}}",
        sc.name,
        server_init.name_lossy().replace(['"', '\\'], "_"),
        w,
        h,
        version,
        sc.encodings.iter().map(|e| e.0).collect::<Vec<_>>(),
    );
    Ok(Capture { meta, chunks })
}
