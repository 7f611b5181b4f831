//! Frames a recorded session end to end with the codec, as a relay would: both
//! directions decoded in the order the bytes crossed the wire, with the facts that
//! cross directions passed along.

use super::capture::{Capture, Dir};
use std::collections::BTreeMap;
use vizor_rfb::client::{ClientDecoder, ClientMessage};
use vizor_rfb::handshake::{client, SecurityType};
use vizor_rfb::server::{RectInfo, ServerDecoder, ServerEvent};
use vizor_rfb::{Encoding, Limits};
use vizor_testkit::{drive_blocking, DriveError, Exhausted};

/// What a capture held, for assertions.
#[derive(Debug, Default)]
pub struct Framed {
    pub updates: usize,
    pub rects: BTreeMap<i32, usize>,
    pub pixel_bytes: u64,
    pub client_messages: BTreeMap<&'static str, usize>,
    pub server_messages: usize,
    pub handshake_s2c: usize,
    pub handshake_c2s: usize,
    /// Pseudo-rectangles in order, for the reader of a failure.
    pub pseudo: Vec<String>,
}

fn client_name(m: &ClientMessage<'_>) -> &'static str {
    match m {
        ClientMessage::SetPixelFormat(_) => "SetPixelFormat",
        ClientMessage::SetEncodings(_) => "SetEncodings",
        ClientMessage::FramebufferUpdateRequest { .. } => "FramebufferUpdateRequest",
        ClientMessage::KeyEvent { .. } => "KeyEvent",
        ClientMessage::PointerEvent { .. } => "PointerEvent",
        ClientMessage::ClientCutText(_) => "ClientCutText",
        ClientMessage::EnableContinuousUpdates { .. } => "EnableContinuousUpdates",
        ClientMessage::ClientFence { .. } => "ClientFence",
        ClientMessage::Xvp { .. } => "Xvp",
        ClientMessage::SetDesktopSize { .. } => "SetDesktopSize",
        ClientMessage::QemuExtendedKeyEvent { .. } => "QemuExtendedKeyEvent",
        ClientMessage::QemuAudio(_) => "QemuAudio",
    }
}

/// Replays the client handshake against the recorded server bytes; returns the bytes
/// each side spent on it and the ServerInit.
fn handshake(
    s2c: &[u8],
    c2s: &[u8],
) -> Result<(usize, usize, vizor_rfb::handshake::ServerInit), String> {
    let limits = Limits::default();
    // The whole recording at once: a state that needs more is an incomplete handshake.
    let mut src = s2c;
    let mut buf = Vec::new();
    let mut out = Vec::new();
    let mut redacted = None;
    macro_rules! step {
        ($state:expr, $recv:expr) => {
            drive_blocking(&mut src, &mut buf, $state, $recv).map_err(|e| match e {
                DriveError::Step(e) => format!("handshake: {e}"),
                DriveError::Source(Exhausted) => {
                    format!("handshake incomplete at byte {}", s2c.len() - buf.len())
                }
            })?
        };
    }
    let st = step!(client::ExpectServerVersion::new(limits), |s, b| s
        .receive(b, &mut out));
    let choose = step!(st, |s, b| s.receive(b));
    let result = if choose.offered().contains(&SecurityType::VNC_AUTH) {
        let ch = choose
            .choose_vnc_auth(&mut out)
            .map_err(|e| e.to_string())?;
        let respond = step!(ch, |s, b| s.receive(b));
        redacted = Some(out.len());
        respond.respond(b"not-the-password", &mut out)
    } else {
        choose.choose_none(&mut out).map_err(|e| e.to_string())?
    };
    let init = step!(result, |s, b| s.receive(b));
    let expect = init.send(true, &mut out);
    let si = step!(expect, |s, b| s.receive(b));
    let pos = s2c.len() - buf.len();
    // The recorded client bytes must be exactly what the codec's client sends, apart
    // from the (zeroed) authentication response.
    let recorded = c2s
        .get(..out.len())
        .ok_or("client handshake bytes missing")?;
    for (i, (a, b)) in recorded.iter().zip(&out).enumerate() {
        let in_response = redacted.is_some_and(|r| (r..r + 16).contains(&i));
        if !in_response && a != b {
            return Err(format!("client handshake byte {i} differs"));
        }
    }
    Ok((pos, out.len(), si))
}

/// The capture with every recorded read or write split into pieces of at most `max`
/// bytes: a relay must frame the same stream whatever the segmentation.
pub fn rechunk(cap: &Capture, max: usize) -> Capture {
    let chunks = cap
        .chunks
        .iter()
        .flat_map(|c| {
            c.bytes.chunks(max.max(1)).map(|b| super::capture::Chunk {
                dir: c.dir,
                micros: c.micros,
                bytes: b.to_vec(),
            })
        })
        .collect();
    Capture {
        meta: cap.meta.clone(),
        chunks,
    }
}

/// The scenario name recorded in a capture's metadata.
pub fn scenario_name(cap: &Capture) -> Option<&str> {
    let start = cap.meta.find("\"scenario\":\"")? + 12;
    let len = cap.meta[start..].find('"')?;
    Some(&cap.meta[start..start + len])
}

/// Frames the whole capture. Every byte must be accounted for by a span.
pub fn frame(cap: &Capture) -> Result<Framed, String> {
    frame_with(cap, true)
}

/// Frames a capture still being recorded: what it holds so far, to its last whole
/// message.
pub fn frame_so_far(cap: &Capture) -> Result<Framed, String> {
    frame_with(cap, false)
}

fn frame_with(cap: &Capture, whole: bool) -> Result<Framed, String> {
    let s2c = cap.stream(Dir::S2C);
    let c2s = cap.stream(Dir::C2S);
    let (hs_s, hs_c, si) = handshake(&s2c, &c2s)?;
    let limits = Limits::default();
    let mut server = ServerDecoder::new(&si, limits);
    let mut clientd = ClientDecoder::new(limits);
    let mut f = Framed {
        handshake_s2c: hs_s,
        handshake_c2s: hs_c,
        ..Framed::default()
    };
    let (mut s_pos, mut c_pos) = (hs_s, hs_c);
    let (mut s_avail, mut c_avail) = (0usize, 0usize);
    let (mut s_spans, mut c_spans) = (hs_s, hs_c);
    for chunk in &cap.chunks {
        match chunk.dir {
            Dir::C2S => {
                c_avail += chunk.bytes.len();
                while c_pos < c_avail {
                    let Some((m, n)) = clientd
                        .decode(&c2s[c_pos..c_avail])
                        .map_err(|e| format!("client byte {c_pos}: {e}"))?
                    else {
                        break;
                    };
                    *f.client_messages.entry(client_name(&m)).or_default() += 1;
                    match &m {
                        ClientMessage::SetPixelFormat(pf) => server.set_pixel_format(*pf),
                        ClientMessage::SetEncodings(list) => server.set_encodings(list.iter()),
                        _ => {}
                    }
                    c_pos += n;
                    c_spans += n;
                }
            }
            Dir::S2C => {
                s_avail += chunk.bytes.len();
                while s_pos <= s_avail {
                    let Some((ev, n)) = server
                        .decode(&s2c[s_pos..s_avail])
                        .map_err(|e| format!("server byte {s_pos}: {e}"))?
                    else {
                        break;
                    };
                    match ev {
                        ServerEvent::UpdateBegin { .. } => f.updates += 1,
                        ServerEvent::Rect(r) => {
                            *f.rects.entry(r.encoding.0).or_default() += 1;
                            if r.info != RectInfo::Pixels {
                                f.pseudo.push(format!(
                                    "{} {},{} {}x{}",
                                    r.encoding.name(),
                                    r.x,
                                    r.y,
                                    r.width,
                                    r.height
                                ));
                            }
                            if r.info == RectInfo::ExtendedMouseButtons {
                                clientd.enable_extended_pointer();
                            }
                        }
                        ServerEvent::Data(d) => f.pixel_bytes += d.len() as u64,
                        ServerEvent::UpdateEnd => {}
                        _ => f.server_messages += 1,
                    }
                    s_pos += n;
                    s_spans += n;
                    if s_pos == s_avail && server.is_idle() {
                        break;
                    }
                }
            }
        }
    }
    if !whole {
        return Ok(f);
    }
    if s_pos != s2c.len() || s_spans != s2c.len() {
        return Err(format!(
            "server stream: framed {s_pos} of {} bytes",
            s2c.len()
        ));
    }
    if c_pos != c2s.len() || c_spans != c2s.len() {
        return Err(format!(
            "client stream: framed {c_pos} of {} bytes",
            c2s.len()
        ));
    }
    if !server.is_idle() {
        return Err("server stream ends inside a FramebufferUpdate".into());
    }
    Ok(f)
}

/// Client messages every recorder scenario sends.
pub const RECORDER_MESSAGES: &[&str] = &[
    "SetEncodings",
    "FramebufferUpdateRequest",
    "KeyEvent",
    "QemuExtendedKeyEvent",
    "PointerEvent",
    "ClientCutText",
];

/// Client messages noVNC sends in the recorded noVNC session (keys go as QEMU extended
/// key events once QEMU acknowledged them).
pub const NOVNC_MESSAGES: &[&str] = &[
    "SetPixelFormat",
    "SetEncodings",
    "FramebufferUpdateRequest",
    "QemuExtendedKeyEvent",
    "PointerEvent",
    "ClientCutText",
];

/// Checks what a capture must show: real updates in the expected encodings and the
/// expected kinds of client message.
pub fn check(f: &Framed, expect: &[Encoding]) -> Result<(), String> {
    let mut messages = RECORDER_MESSAGES.to_vec();
    // The recorder sends SetDesktopSize once ExtendedDesktopSize was offered.
    if f.rects.contains_key(&Encoding::EXTENDED_DESKTOP_SIZE.0) {
        messages.push("SetDesktopSize");
    }
    check_with(f, expect, &messages)
}

/// [`check`] with an explicit list of required client messages.
pub fn check_with(
    f: &Framed,
    expect: &[Encoding],
    messages: &[&'static str],
) -> Result<(), String> {
    if f.updates == 0 {
        return Err("no FramebufferUpdate in the capture".into());
    }
    for e in expect {
        if f.rects.get(&e.0).copied().unwrap_or(0) == 0 {
            return Err(format!(
                "no {e} rectangle in the capture (rects: {:?}; pseudo-rects: {:?})",
                f.rects, f.pseudo
            ));
        }
    }
    for &m in messages {
        if !f.client_messages.contains_key(m) {
            return Err(format!("no {m} in the capture"));
        }
    }
    Ok(())
}
