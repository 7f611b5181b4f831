//! An RFB-over-WebSocket client as noVNC behaves, for the tests.

use super::{Browser, Closed, Vizor};
use vizor::token::ConsoleKind;
use vizor_rfb::client::{write_set_encodings, ClientMessage};
use vizor_rfb::handshake::{client, SecurityType, ServerInit};
use vizor_rfb::server::{ServerDecoder, ServerEvent};
use vizor_rfb::{Encoding, Limits};
use vizor_testkit::DriveError;

/// Runs the client handshake over the WebSocket as noVNC would.
pub async fn rfb_handshake(b: &mut Browser) -> Result<ServerInit, String> {
    let limits = Limits::default();
    let mut out = Vec::new();
    let failed = |e: DriveError<vizor_rfb::Error, Closed>| match e {
        DriveError::Step(e) => e.to_string(),
        DriveError::Source(c) => format!("closed {}: {}", c.code, c.reason),
    };
    let sec = b
        .drive(client::ExpectServerVersion::new(limits), |s, buf| {
            s.receive(buf, &mut out)
        })
        .await
        .map_err(failed)?;
    b.send(&std::mem::take(&mut out)).await;
    let choose = b
        .drive(sec, |s, buf| s.receive(buf))
        .await
        .map_err(failed)?;
    assert_eq!(
        choose.offered(),
        &[SecurityType::NONE],
        "the browser is offered None only"
    );
    let result = choose.choose_none(&mut out).unwrap();
    b.send(&std::mem::take(&mut out)).await;
    let init = b
        .drive(result, |s, buf| s.receive(buf))
        .await
        .map_err(failed)?;
    let expect = init.send(true, &mut out);
    b.send(&std::mem::take(&mut out)).await;
    b.drive(expect, |s, buf| s.receive(buf))
        .await
        .map_err(failed)
}

/// A FramebufferUpdateRequest (not incremental) for the `width` x `height` rectangle
/// at the origin.
pub fn update_request(width: u16, height: u16) -> Vec<u8> {
    msg(ClientMessage::FramebufferUpdateRequest {
        incremental: false,
        x: 0,
        y: 0,
        width,
        height,
    })
}

pub fn msg(m: ClientMessage<'_>) -> Vec<u8> {
    let mut v = Vec::new();
    m.write(&mut v).unwrap();
    v
}

/// Requests a full update in Raw and reads it to its end; returns the pixel bytes and
/// the bytes of a complete frame at the framebuffer size the update ended with (a guest
/// still booting may switch modes after ServerInit).
pub async fn full_update(b: &mut Browser, si: &ServerInit) -> (u64, u64) {
    let mut set = Vec::new();
    // Raw plus encodings vizor must strip (JPEG 21, H.264 50): QEMU never sees them.
    write_set_encodings(
        [
            Encoding::RAW,
            Encoding(21),
            Encoding(50),
            Encoding::EXTENDED_DESKTOP_SIZE,
            Encoding::QEMU_EXTENDED_KEY_EVENT,
        ],
        &mut set,
    );
    b.send(&set).await;
    b.send(&update_request(si.width, si.height)).await;
    let mut dec = ServerDecoder::new(si, Limits::default());
    dec.set_encodings([
        Encoding::RAW,
        Encoding::EXTENDED_DESKTOP_SIZE,
        Encoding::QEMU_EXTENDED_KEY_EVENT,
    ]);
    let mut raw_bytes = 0u64;
    loop {
        while let Some((ev, n)) = dec.decode(&b.pending).unwrap() {
            if let ServerEvent::Rect(r) = &ev {
                if r.encoding == Encoding::RAW {
                    raw_bytes += u64::from(r.width) * u64::from(r.height) * 4;
                }
            }
            let done = ev == ServerEvent::UpdateEnd && raw_bytes > 0;
            b.pending.drain(..n);
            if done {
                let (w, h) = dec.framebuffer_size();
                return (raw_bytes, u64::from(w) * u64::from(h) * 4);
            }
        }
        b.read().await.unwrap();
    }
}

pub async fn open_session(v: &Vizor, domain: &str) -> (Browser, ServerInit) {
    let token = v.token(domain, ConsoleKind::Vnc, 60);
    let mut b = Browser::connect(v.addr, &format!("/websockify?token={token}")).await;
    let si = rfb_handshake(&mut b).await.unwrap();
    (b, si)
}
