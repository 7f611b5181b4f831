//! Resuming a console after a network blip, against a real QEMU (VNC, and SPICE by its
//! main channel): the credential in
//! a text message on the console's own WebSocket, the drop and the resume on record
//! under one session id, the key held at the drop released as QEMU lets it go (on
//! record, and in QEMU's keyboard trace), the credential spent by its resume and
//! refused from another address, a resume that takes over a connection that still
//! looks open, and the window's end.
//!
//! The blip is the test's own WebSocket client dropping its TCP connection without a
//! close frame. The console page doing the same in Chromium is tests/browser.rs's.
//!
//! Needs the live test host (`scripts/test.sh`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a panic is a failure

mod common;

use common::guest::Ps2Trace;
use common::rfb::{full_update, msg, rfb_handshake};
use common::spice;
use common::{metric, Browser, Vizor};
use std::net::IpAddr;
use std::time::{Duration, Instant};
use vizor::token::ConsoleKind;
use vizor_rfb::client::ClientMessage;
use vizor_rfb::handshake::ServerInit;
use vizor_spice::channel::{write_message, Decoder, HeaderKind};
use vizor_spice::link::{channel_type, link_error};
use vizor_spice::{msg as smsg, Limits};

const LOCAL: &str = "127.0.0.1";

/// The resume credential vizor sent on `b` (a text message after ServerInit).
async fn credential(b: &mut Browser) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    while b.texts.is_empty() {
        assert!(Instant::now() < deadline, "no resume credential came");
        tokio::time::timeout(Duration::from_secs(10), b.read())
            .await
            .unwrap()
            .unwrap();
    }
    let words: serde_json::Value = serde_json::from_str(&b.texts.remove(0)).unwrap();
    let c = words["resume"].as_str().unwrap().to_owned();
    common::run::secret("resume credential", &c);
    c
}

/// A resume vizor refused: its close code and words.
async fn refused(v: &Vizor, src: &str, credential: &str) -> String {
    match resume(v, src, credential).await {
        Ok(_) => panic!("the resume with {credential:?} from {src} was taken"),
        Err(e) => e,
    }
}

/// Opens `/websockify?resume=` from `src` and runs the browser's handshake; `Err`
/// holds vizor's close code and words.
async fn resume(v: &Vizor, src: &str, credential: &str) -> Result<(Browser, ServerInit), String> {
    let src: IpAddr = src.parse().unwrap();
    let path = format!("/websockify?resume={credential}");
    let mut b = Browser::connect_from(src, v.addr, &path).await;
    let si = rfb_handshake(&mut b).await?;
    Ok((b, si))
}

/// Presses (or releases) the A key as noVNC does with QEMU's extended key events.
fn key_a(down: bool) -> Vec<u8> {
    msg(ClientMessage::QemuExtendedKeyEvent {
        down,
        keysym: 0x61,
        keycode: 0x1e,
    })
}

/// Waits until a record of `event` that `matches` is in the audit log.
async fn record(
    v: &Vizor,
    event: &str,
    matches: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    for _ in 0..200 {
        if let Some(r) = v
            .audit()
            .into_iter()
            .find(|r| r["event"] == event && matches(r))
        {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no {event} record as expected: {:#?}", v.audit());
}

async fn resumes(v: &Vizor, outcome: &str) -> f64 {
    let text = v.metrics().await;
    metric(
        &text,
        &format!("vizor_session_resumes_total{{outcome=\"{outcome}\"}}"),
    )
    .unwrap_or_else(|| panic!("vizor_session_resumes_total{{outcome={outcome:?}}} exported"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn a_dropped_console_resumes_as_the_same_session_and_only_with_its_credential() {
    common::live_domain();
    let d = "vizor-test-resume";
    common::test_host(&["domain", d, "--vnc-passwd", "resume1", "--no-spice"]);
    let trace = Ps2Trace::start(d);
    let mark = trace.mark();
    let v = Vizor::start_tokens(
        "resume_window = \"4s\"",
        common::ADMIN_API,
        common::write_admin_key,
    );
    let token = v.token(d, ConsoleKind::Vnc, 60);
    // As vizor's console page asks: resumable, the credential in a text message.
    let path = format!("/websockify?token={token}&resumable=1");
    let mut first = Browser::connect(v.addr, &path).await;
    let si = rfb_handshake(&mut first).await.unwrap();
    let c1 = credential(&mut first).await;
    full_update(&mut first, &si).await;
    let start = record(&v, "session_start", |_| true).await;
    let session = start["session"].as_u64().unwrap();
    assert!(c1.starts_with(&format!("{session}.")), "{c1}");

    // A held at the moment the connection drops (no close frame).
    first.send(&key_a(true)).await;
    record(&v, "key", |r| r["session"] == session && r["down"] == true).await;
    drop(first);
    let dropped = record(&v, "session_drop", |r| r["session"] == session).await;
    assert_eq!(dropped["cause"], "browser_closed", "{dropped}");
    assert_eq!(dropped["window_ms"], 4000, "{dropped}");
    // An operator sees it waiting.
    let listed = v.sessions().await;
    assert!(listed[0]["parked_since"].is_string(), "{listed:?}");
    assert_eq!(
        dropped["client"].as_str().unwrap().split(':').next(),
        Some(LOCAL)
    );
    // The session's connection to QEMU closed with it: QEMU let A go, on record.
    let released = record(&v, "key", |r| r["origin"] == "disconnect").await;
    assert_eq!(
        (
            released["session"].as_u64(),
            &released["down"],
            &released["scancode"]
        ),
        (
            Some(session),
            &serde_json::json!(false),
            &serde_json::json!(0x1e)
        ),
        "{released}"
    );

    // From another address the credential is refused, and not used up; nonsense and
    // a credential of no console are refused alike.
    let e = refused(&v, "127.0.0.2", &c1).await;
    assert!(e.contains("1008") && e.contains("another address"), "{e}");
    let other = format!("{}.{}", session + 1, c1.split_once('.').unwrap().1);
    for bad in [other.as_str(), "garbage", "1.AAAA"] {
        let e = refused(&v, LOCAL, bad).await;
        assert!(
            e.contains("1008") && e.contains("no longer be resumed"),
            "{bad}: {e}"
        );
    }

    // The page comes back, and its connection drops again before it says anything:
    // it may not have read the next credential, so the one it used is still good.
    let (blip, _) = resume(&v, LOCAL, &c1).await.unwrap();
    drop(blip);
    record(&v, "session_drop", |r| {
        r["session"] == session && r["cause"] == "browser_closed" && r != &dropped
    })
    .await;
    // It comes back again: the same console (a new connection to QEMU each time), a
    // full screen.
    let (mut second, si2) = resume(&v, LOCAL, &c1).await.unwrap();
    assert_eq!(si2, si, "a resumed browser is told the same console");
    second
        .send(&msg(ClientMessage::SetPixelFormat(si.pixel_format)))
        .await;
    let (raw, frame) = full_update(&mut second, &si2).await;
    assert_eq!(raw, frame, "a whole frame after the resume");
    let resumed = record(&v, "session_resume", |r| r["rotation"] == 2).await;
    assert_eq!(resumed["session"].as_u64(), Some(session), "{resumed}");
    assert!(resumed["parked_ms"].as_u64().unwrap() < 4000, "{resumed}");
    assert_eq!(resumed["vm_password"], true, "{resumed}");
    let listed = v.sessions().await;
    assert!(listed[0]["parked_since"].is_null(), "{listed:?}");
    // The page spoke on the new connection: the credential it used is spent, and it
    // has the next one.
    let c2 = credential(&mut second).await;
    assert_ne!(c2, c1);
    let e = refused(&v, LOCAL, &c1).await;
    assert!(
        e.contains("no longer be resumed"),
        "a spent credential: {e}"
    );
    // Keys go on, in the same session.
    second.send(&key_a(true)).await;
    second.send(&key_a(false)).await;
    record(&v, "key", |r| {
        r["session"] == session && r["down"] == false && r.get("origin").is_none()
    })
    .await;

    // A resume while the last connection still looks open takes over from it (the
    // browser may see its connection dead before vizor does).
    let (mut third, _) = resume(&v, LOCAL, &c2).await.unwrap();
    let replaced = record(&v, "session_drop", |r| r["cause"] == "replaced").await;
    assert_eq!(replaced["session"].as_u64(), Some(session));
    let closed = second.closed().await;
    assert_eq!(closed.code, 0, "let go without a close frame: {closed:?}");
    let c3 = credential(&mut third).await;
    full_update(&mut third, &si).await;

    // Dropped again, and not back within the window: the session ends.
    drop(third);
    record(&v, "session_drop", |r| {
        r["session"] == session && r["cause"] == "browser_closed" && r != &dropped
    })
    .await;
    let waited = Instant::now();
    let end = record(&v, "session_end", |r| r["session"] == session).await;
    assert!(
        waited.elapsed() > Duration::from_secs(2),
        "ended at the window's end"
    );
    assert_eq!(end["cause"], "browser_closed", "{end}");
    let e = refused(&v, LOCAL, &c3).await;
    assert!(e.contains("no longer be resumed"), "after the window: {e}");

    // One session in the log, from its start to its end.
    let audit = v.audit();
    let starts = audit
        .iter()
        .filter(|r| r["event"] == "session_start")
        .count();
    assert_eq!(starts, 1, "one session, resumed twice");
    let order: Vec<&str> = audit
        .iter()
        .filter(|r| r["session"].as_u64() == Some(session))
        .map(|r| r["event"].as_str().unwrap())
        .filter(|e| e.starts_with("session_"))
        .collect();
    assert_eq!(
        order,
        [
            "session_start",
            "session_drop",
            "session_resume",
            "session_drop",
            "session_resume",
            "session_drop",
            "session_resume",
            "session_drop",
            "session_end"
        ]
    );
    // QEMU's keyboard got exactly what the key records say, the release at the drop
    // included.
    trace.assert_matches(mark, &audit, &[session]);
    assert_eq!(resumes(&v, "dropped").await, 4.0);
    assert_eq!(resumes(&v, "resumed").await, 3.0);
    assert_eq!(resumes(&v, "window_expired").await, 1.0);
    assert_eq!(resumes(&v, "wrong_client").await, 1.0);
    assert!(resumes(&v, "invalid").await >= 5.0);
    let (ok, out) = v.verify(&[v.audit_path()]);
    assert!(ok, "{out}");
}

/// A browser that leaves with a close frame leaves, and one that did not ask for
/// resuming (any client but vizor's console page) ends its session when its connection
/// drops: nothing waits for either, and the latter is sent no text message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn a_browser_that_says_goodbye_or_never_asked_ends_its_session_at_once() {
    let d = common::live_domain().name;
    let v = Vizor::start("");
    for (asks, goodbye) in [(true, true), (false, false)] {
        let token = v.token(&d, ConsoleKind::Vnc, 60);
        let tail = if asks { "&resumable=1" } else { "" };
        let mut b = Browser::connect(v.addr, &format!("/websockify?token={token}{tail}")).await;
        let si = rfb_handshake(&mut b).await.unwrap();
        let start = record(&v, "session_start", |r| {
            !v.audit()
                .iter()
                .any(|e| e["event"] == "session_end" && e["session"] == r["session"])
        })
        .await;
        let session = start["session"].as_u64().unwrap();
        if asks {
            credential(&mut b).await;
        } else {
            full_update(&mut b, &si).await;
            assert!(b.texts.is_empty(), "{:?}", b.texts);
        }
        if goodbye {
            b.close(1000, "bye").await;
        } else {
            drop(b);
        }
        let end = record(&v, "session_end", |r| r["session"] == session).await;
        assert_eq!(end["cause"], "browser_closed", "{end}");
    }
    assert!(
        !v.audit().iter().any(|r| r["event"] == "session_drop"),
        "no drop"
    );
}

/// A VM restarted while its console was parked is another run of it (another VM may
/// even listen on its port by then): the resume ends the session and tells the page
/// why, rather than relay the new run under the old session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn a_resume_after_the_vm_restarted_ends_the_session_and_says_why() {
    common::live_domain();
    let d = "vizor-test-resume-restart";
    common::test_host(&["domain", d, "--vnc-passwd", "resume2", "--no-spice"]);
    let v = Vizor::start_tokens("resume_window = \"60s\"", "", |_| {});
    let token = v.token(d, ConsoleKind::Vnc, 60);
    let path = format!("/websockify?token={token}&resumable=1");
    let mut b = Browser::connect(v.addr, &path).await;
    rfb_handshake(&mut b).await.unwrap();
    let c = credential(&mut b).await;
    let start = record(&v, "session_start", |_| true).await;
    let session = start["session"].as_u64().unwrap();
    drop(b);
    record(&v, "session_drop", |r| r["session"] == session).await;
    common::virsh(&["destroy", d]);
    common::virsh(&["start", d]);
    let e = refused(&v, LOCAL, &c).await;
    assert!(e.contains("restarted"), "{e}");
    let end = record(&v, "session_end", |r| r["session"] == session).await;
    assert!(
        end["reason"].as_str().unwrap().contains("restarted"),
        "{end}"
    );
    assert!(
        !v.audit().iter().any(|r| r["event"] == "session_resume"),
        "no resume"
    );
}

/// A SPICE session's main channel at `path` (mini headers), and QEMU's session id.
async fn spice_main(v: &Vizor, path: &str) -> (Browser, u32) {
    let (main, session_id, _, _) = spice::main_at(v, path, true).await;
    (main, session_id)
}

/// The session's inputs channel, joined with the token and QEMU's session id, ready.
async fn spice_inputs(v: &Vizor, token: &str, session_id: u32) -> Result<Browser, u32> {
    let mut inputs = spice::open(v, token).await;
    spice::link(&mut inputs, channel_type::INPUTS, session_id, true).await?;
    let mut dec = Decoder::new(HeaderKind::Mini, Limits::default());
    spice::until(&mut inputs, &mut dec, 101).await; // SPICE_MSG_INPUTS_INIT
    Ok(inputs)
}

/// The A key (scancode 0x1e) down or up on a SPICE inputs channel.
fn spice_key_a(down: bool) -> Vec<u8> {
    let (t, code) = if down {
        (smsg::inputs::MSGC_KEY_DOWN, 0x1eu32)
    } else {
        (smsg::inputs::MSGC_KEY_UP, 0x9e)
    };
    let mut out = Vec::new();
    write_message(HeaderKind::Mini, 1, t, &code.to_le_bytes(), &mut out).unwrap();
    out
}

/// A SPICE session resumes as a VNC one does, by its main channel: the credential in a
/// text message on the main channel's WebSocket, the drop with the key held released on
/// record (and in QEMU's keyboard trace), a resume that links a new main channel to
/// spice-server, the session's other channels linked again under its new session id
/// with the token (expired by then, and good for nothing else), all under one session
/// id; a resume that is not a main channel is refused and does not use the credential
/// up; then the window's end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn a_dropped_spice_session_resumes_by_its_main_channel() {
    common::live_domain();
    let d = spice::domain("vizor-test-spresume");
    let trace = Ps2Trace::start(d);
    let mark = trace.mark();
    let v = Vizor::start_tokens(
        "resume_window = \"5s\"",
        common::ADMIN_API,
        common::write_admin_key,
    );
    // A token that expires while the session is parked.
    let token = v.token(d, ConsoleKind::Spice, 4);
    let issued = Instant::now();
    let path = format!("/websockify?token={token}&resumable=1");
    let (mut main, sid1) = spice_main(&v, &path).await;
    let c1 = credential(&mut main).await;
    let start = record(&v, "session_start", |r| r["channel"] == "spice:main:0").await;
    let session = start["session"].as_u64().unwrap();
    assert!(c1.starts_with(&format!("{session}.")), "{c1}");
    let mut inputs = spice_inputs(&v, &token, sid1).await.unwrap();
    assert!(inputs.texts.is_empty(), "only the main channel is told");

    // A held as both connections drop (no close frames).
    inputs.send(&spice_key_a(true)).await;
    record(&v, "key", |r| r["session"] == session && r["down"] == true).await;
    drop((main, inputs));
    let dropped = record(&v, "session_drop", |r| r["session"] == session).await;
    assert_eq!(dropped["cause"], "browser_closed", "{dropped}");
    let released = record(&v, "key", |r| r["origin"] == "disconnect").await;
    assert_eq!(
        (released["session"].as_u64(), &released["down"]),
        (Some(session), &serde_json::json!(false)),
        "{released}"
    );
    assert!(v.sessions().await[0]["parked_since"].is_string());

    // Not a main channel: refused, and the credential is still good.
    let mut wrong = Browser::connect(v.addr, &format!("/websockify?resume={c1}")).await;
    let e = spice::link(&mut wrong, channel_type::INPUTS, sid1, true).await;
    assert_eq!(e.err(), Some(link_error::BAD_CONNECTION_ID));
    let e = refused_spice(&v, "127.0.0.2", &c1).await;
    assert!(e.contains("another address"), "{e}");
    // A resume whose link breaks on the browser's side (its connection lost again
    // before its ticket): the session waits on, the credential still good.
    let mut broken = Browser::connect(v.addr, &format!("/websockify?resume={c1}")).await;
    spice::link_reply(&mut broken, channel_type::MAIN, 0, true)
        .await
        .unwrap();
    drop(broken);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(v.sessions().await[0]["parked_since"].is_string());

    // Back after the token expired: the main channel resumes with the credential.
    tokio::time::sleep(
        Duration::from_secs(4).saturating_sub(issued.elapsed()) + Duration::from_millis(200),
    )
    .await;
    let (mut main, sid2) = spice_main(&v, &format!("/websockify?resume={c1}")).await;
    let resumed = record(&v, "session_resume", |r| r["session"] == session).await;
    assert_eq!(resumed["rotation"], 1, "{resumed}");
    assert_eq!(resumed["vm_password"], true, "{resumed}");
    assert!(v.sessions().await[0]["parked_since"].is_null());
    let c2 = credential(&mut main).await;
    assert_ne!(c2, c1);
    // The expired token joins its own session's channels, and starts nothing.
    let mut inputs = spice_inputs(&v, &token, sid2).await.unwrap();
    let mut again = spice::open(&v, &token).await;
    assert_eq!(
        spice::link(&mut again, channel_type::MAIN, 0, true)
            .await
            .err(),
        Some(link_error::PERMISSION_DENIED),
        "an expired token opens no session"
    );
    // Keys go on, in the same session.
    inputs.send(&spice_key_a(true)).await;
    inputs.send(&spice_key_a(false)).await;
    record(&v, "key", |r| {
        r["session"] == session && r["down"] == false && r.get("origin").is_none()
    })
    .await;
    // The page spoke on the new connection: the credential it used is spent.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let e = refused_spice(&v, LOCAL, &c1).await;
    assert!(
        e.contains("no longer be resumed"),
        "a spent credential: {e}"
    );

    // Dropped again, and not back within the window: the session ends.
    drop((main, inputs));
    let end = record(&v, "session_end", |r| {
        r["session"] == session && r["channel"] == "spice:main:0"
    })
    .await;
    assert_eq!(end["cause"], "browser_closed", "{end}");
    let e = refused_spice(&v, LOCAL, &c2).await;
    assert!(e.contains("no longer be resumed"), "after the window: {e}");
    // Its session over, the expired token is only expired.
    let mut late = spice::open(&v, &token).await;
    let c = tokio::time::timeout(Duration::from_secs(10), late.closed())
        .await
        .unwrap();
    assert!(c.code == 1008 && c.reason.contains("expired"), "{c:?}");

    // One session in the log: its channels before the drop and after the resume.
    let audit = v.audit();
    let order: Vec<String> = audit
        .iter()
        .filter(|r| r["session"].as_u64() == Some(session))
        .filter(|r| r["event"].as_str().unwrap().starts_with("session_"))
        .map(|r| match r["channel"].as_str() {
            Some(c) => format!("{} {c}", r["event"].as_str().unwrap()),
            None => r["event"].as_str().unwrap().to_owned(),
        })
        .collect();
    // Each drop cut both channels at once: the inputs channel's end and the main
    // channel's drop are two connections lost together, in either order; everything
    // else has one order (a channel after its main channel, a resume after its drop,
    // the end after the window).
    let steps: [(&[&str], bool); 5] = [
        (
            &["session_start spice:main:0", "session_start spice:inputs:0"],
            true,
        ),
        (&["session_end spice:inputs:0", "session_drop"], false),
        (&["session_resume", "session_start spice:inputs:0"], true),
        (&["session_end spice:inputs:0", "session_drop"], false),
        (&["session_end spice:main:0"], true),
    ];
    let mut at = 0;
    for (want, ordered) in steps {
        let mut got: Vec<&str> = order
            .get(at..at + want.len())
            .unwrap_or_else(|| panic!("{order:?}"))
            .iter()
            .map(String::as_str)
            .collect();
        let mut want = want.to_vec();
        if !ordered {
            got.sort_unstable();
            want.sort_unstable();
        }
        assert_eq!(got, want, "{order:?}\n{audit:#?}");
        at += want.len();
    }
    assert_eq!(at, order.len(), "{order:?}");
    trace.assert_matches(mark, &audit, &[session]);
    assert_eq!(resumes(&v, "resumed").await, 1.0);
    assert_eq!(resumes(&v, "window_expired").await, 1.0);
    let (ok, out) = v.verify(&[v.audit_path()]);
    assert!(ok, "{out}");
}

/// A SPICE resume vizor refused as it came, before any link: its close code and words.
async fn refused_spice(v: &Vizor, src: &str, credential: &str) -> String {
    let src: IpAddr = src.parse().unwrap();
    let path = format!("/websockify?resume={credential}");
    let mut b = Browser::connect_from(src, v.addr, &path).await;
    let c = tokio::time::timeout(Duration::from_secs(10), b.closed())
        .await
        .expect("the resume refused at once");
    format!("{} {}", c.code, c.reason)
}
