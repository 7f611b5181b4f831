//! `vizor serve` end to end: a browser-like RFB-over-WebSocket client, vizor, a real
//! libvirtd and real QEMU (the test host of `scripts/test.sh`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a panic is a failure

mod common;

use common::rfb::{full_update, msg, open_session, rfb_handshake, update_request};
use common::{Browser, Closed, Vizor};
use vizor::token::ConsoleKind;
use vizor_rfb::client::ClientMessage;
use vizor_rfb::handshake::ServerInit;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn a_browser_sees_the_console_and_its_keys_are_audited() {
    let live = common::live_domain();
    let v = Vizor::start("");
    let (mut b, si) = open_session(&v, &live.name).await;
    assert!(
        si.name_lossy().contains(&live.name),
        "desktop {:?}",
        si.name_lossy()
    );
    let (pixels, frame) = full_update(&mut b, &si).await;
    assert_eq!(pixels, frame, "a complete frame");
    for (down, keysym) in [(true, 0xff1b), (false, 0xff1b), (true, 0x61), (false, 0x61)] {
        b.send(&msg(ClientMessage::KeyEvent { down, keysym })).await;
    }
    b.send(&msg(ClientMessage::QemuExtendedKeyEvent {
        down: true,
        keysym: 0xffbf,
        keycode: 0x3c,
    }))
    .await;
    b.send(&msg(ClientMessage::ClientCutText(
        vizor_rfb::client::CutText::Latin1(b"clip"),
    )))
    .await;
    // A round trip proves everything before it was relayed (and so audited).
    b.send(&update_request(1, 1)).await;
    b.read().await.unwrap();
    let received = std::mem::take(&mut b.received);
    drop(b);
    let audit = v.wait_for_audit("session_end");
    let events: Vec<&str> = audit.iter().map(|r| r["event"].as_str().unwrap()).collect();
    // The token is spent on record before anything of the session goes on.
    assert_eq!(events[..2], ["token_used", "session_start"], "{events:?}");
    assert_eq!(events.last(), Some(&"session_end"), "{events:?}");
    assert_eq!(audit[0]["token_id"], audit[1]["token_id"]);
    let start = &audit[1];
    assert_eq!(start["domain"], live.name.as_str());
    assert_eq!(start["user"], "tester");
    assert_eq!(start["upstream"], live.vnc_addr.as_str());
    assert_eq!(
        common::audited_keys(&audit),
        [
            (true, "Escape"),
            (false, "Escape"),
            (true, "a"),
            (false, "a"),
            (true, "F2"),
            // F2 was still down when the browser left: QEMU releases it then.
            (false, "F2"),
        ]
        .map(|(d, k)| (d, k.to_owned()))
    );
    let lifted = audit.iter().rfind(|r| r["event"] == "key").unwrap();
    assert_eq!(lifted["origin"], "disconnect", "{lifted}");
    let clip = audit.iter().find(|r| r["event"] == "clipboard").unwrap();
    assert_eq!(clip["length"], 4);
    assert_eq!(clip["format"], "text");
    assert!(clip.get("content").is_none(), "digest only by default");
    let end = audit.last().unwrap();
    assert!(end["bytes_vm_to_browser"].as_u64().unwrap() > pixels);
    assert_eq!(end["reason"], "browser closed the connection");

    // The password never reaches the browser nor the log; the browser's handshake had
    // no challenge at all: version, [1 type: None], SecurityResult OK, ServerInit.
    assert!(!common::holds(&received, live.vnc_password.as_bytes()));
    let mut expected = b"RFB 003.008\n".to_vec();
    expected.extend_from_slice(&[1, 1, 0, 0, 0, 0]);
    si.write(&mut expected);
    assert_eq!(
        &received[..expected.len()],
        &expected[..],
        "no challenge ever reached the browser"
    );
    v.assert_never_logged(&live.vnc_password);
}

async fn refused(v: &Vizor, path: &str) -> Closed {
    let mut b = Browser::connect(v.addr, path).await;
    b.closed().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn bad_tokens_and_unusable_domains_are_refused_with_a_reason() {
    let live = common::live_domain();
    common::test_host(&["domain", "vizor-test-off", "--no-spice", "--shutoff"]);
    let v = Vizor::start("");
    let good = v.token(&live.name, ConsoleKind::Vnc, 60);
    let mut flipped = good.clone().into_bytes();
    let i = flipped.len() / 2;
    flipped[i] = if flipped[i] == b'A' { b'B' } else { b'A' };
    let flipped = String::from_utf8(flipped).unwrap();
    let cases: Vec<(String, u16, &str)> = vec![
        ("/websockify".into(), 1008, "missing token"),
        ("/websockify?token=".into(), 1008, "missing token"),
        (
            format!(
                "/websockify?token={}",
                v.token(&live.name, ConsoleKind::Vnc, -5)
            ),
            1008,
            "token expired",
        ),
        (
            format!("/websockify?token={flipped}"),
            1008,
            "invalid token",
        ),
        (
            "/websockify?token=not-a-token".into(),
            1008,
            "invalid token",
        ),
        (
            format!(
                "/websockify?token={}",
                v.token(&live.name, ConsoleKind::Spice, 60)
            ),
            1011,
            "the VM has no console of this kind",
        ),
        (
            format!(
                "/websockify?token={}",
                v.token("vizor-test-nonexistent", ConsoleKind::Vnc, 60)
            ),
            1011,
            "no such VM",
        ),
        (
            format!(
                "/websockify?token={}",
                v.token("vizor-test-off", ConsoleKind::Vnc, 60)
            ),
            1011,
            "the VM is not running",
        ),
    ];
    for (path, code, reason) in &cases {
        let c = refused(&v, path).await;
        assert_eq!((c.code, c.reason.as_str()), (*code, *reason), "{path:.40}");
    }
    // A token admits one session: the second use is refused.
    let (b, _) = open_session_with(&v, &good).await;
    drop(b);
    let c = refused(&v, &format!("/websockify?token={good}")).await;
    assert_eq!((c.code, c.reason.as_str()), (1008, "token already used"));

    // Refusals are queued without waiting for the disk; one per client and reason is
    // recorded in each interval (the second missing token is counted for the
    // interval's summary).
    let audit = v.wait_for_records("token_refused", 5);
    let refusals: Vec<&str> = audit
        .iter()
        .filter(|r| r["event"] == "token_refused")
        .map(|r| r["reason"].as_str().unwrap())
        .collect();
    assert_eq!(
        refusals,
        [
            "missing_token",
            "expired",
            "bad_signature",
            "malformed",
            "replayed"
        ]
    );
    // Only the one good token started a session; refused tokens never reached QEMU.
    assert_eq!(
        audit
            .iter()
            .filter(|r| r["event"] == "session_start")
            .count(),
        1
    );
    // Logs name tokens by id only.
    assert!(!v.log.lock().unwrap().contains(&good));
}

async fn open_session_with(v: &Vizor, token: &str) -> (Browser, ServerInit) {
    let mut b = Browser::connect(v.addr, &format!("/websockify?token={token}")).await;
    let si = rfb_handshake(&mut b).await.unwrap();
    (b, si)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn a_console_without_a_password_is_said_and_recorded_or_refused() {
    let live = common::live_domain();
    // Graphics without passwd: QEMU offers VNC's "None" security type.
    common::test_host(&["domain", "vizor-test-nopw", "--no-spice"]);
    let v = Vizor::start("");
    let (mut b, si) = open_session(&v, "vizor-test-nopw").await;
    full_update(&mut b, &si).await;
    drop(b);
    let (mut b, si) = open_session(&v, &live.name).await;
    full_update(&mut b, &si).await;
    drop(b);
    let starts = v.records("session_start", 2);
    let by_domain = |d: &str| {
        starts
            .iter()
            .find(|r| r["domain"] == d)
            .unwrap_or_else(|| panic!("no session_start for {d}: {starts:?}"))
            .clone()
    };
    assert_eq!(by_domain("vizor-test-nopw")["vm_password"], false);
    assert_eq!(by_domain(&live.name)["vm_password"], true);
    assert!(v.wait_for_log("the VM console has no password in libvirt"));

    // Refused under require_password, before anything reaches QEMU; other consoles open.
    let strict = Vizor::start_libvirt("qemu:///system", "require_password = true", "", |_| {});
    let token = strict.token("vizor-test-nopw", ConsoleKind::Vnc, 60);
    let c = refused(&strict, &format!("/websockify?token={token}")).await;
    assert_eq!(
        (c.code, c.reason.as_str()),
        (1011, "the VM console has no password, which vizor requires")
    );
    let failure = &strict.records("upstream_failure", 1)[0];
    assert_eq!(failure["reason"], "no_password");
    assert_eq!(failure["domain"], "vizor-test-nopw");
    let (mut b, si) = open_session(&strict, &live.name).await;
    full_update(&mut b, &si).await;
    assert_eq!(strict.records("session_start", 1)[0]["vm_password"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn a_wrong_password_in_libvirt_reaches_the_browser_as_an_rfb_failure() {
    let _live = common::live_domain();
    // QEMU's password changed behind libvirt's back: libvirt still stores the old one.
    common::test_host(&[
        "domain",
        "vizor-test-pw",
        "--vnc-passwd",
        "right1",
        "--no-spice",
    ]);
    common::hmp("vizor-test-pw", "change vnc password other99");
    let v = Vizor::start("");
    let token = v.token("vizor-test-pw", ConsoleKind::Vnc, 60);
    let mut b = Browser::connect(v.addr, &format!("/websockify?token={token}")).await;
    let err = rfb_handshake(&mut b).await.unwrap_err();
    assert_eq!(
        err,
        "server refused the connection: authentication to the VM failed"
    );
    assert!(v.wait_for_log("authentication to the VM failed (QEMU said: "));
    // Said once, at warn, with what to do about it.
    assert!(v.wait_for_log("changed outside libvirt"));
    let log = v.log.lock().unwrap().clone();
    let said: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("authentication to the VM failed"))
        .collect();
    assert_eq!(said.len(), 1, "{said:?}");
    assert!(said[0].contains("WARN"), "{said:?}");
    let audit = v.wait_for_audit("upstream_failure");
    let failure = audit
        .iter()
        .find(|r| r["event"] == "upstream_failure")
        .unwrap();
    assert_eq!(failure["reason"], "upstream_auth");
    assert_eq!(failure["domain"], "vizor-test-pw");
    assert!(failure["detail"]
        .as_str()
        .unwrap()
        .starts_with("authentication to the VM failed"));
}

/// A console vizor may not connect to: the browser's close words, the audit's
/// `upstream_failure` and the session counter say why. (That vizor refuses before
/// dialling is `session::tests::a_console_outside_the_allow_list_is_never_dialled`.)
async fn refused_as_not_allowed(v: &Vizor, domain: &str, at: &str) {
    let token = v.token(domain, ConsoleKind::Vnc, 60);
    let mut b = Browser::connect(v.addr, &format!("/websockify?token={token}")).await;
    // The browser: RFB's refusal in words, then the close frame with the cause.
    let e = rfb_handshake(&mut b).await.unwrap_err();
    assert!(
        e.contains("the VM console's address is outside [upstream] allow"),
        "{e}"
    );
    let c = b.closed().await;
    assert_eq!(c.code, 1011, "{c:?}");
    assert!(
        c.reason.starts_with(&format!(
            "outside [upstream] allow: the VM console's address {at}"
        )),
        "{c:?}"
    );
    let failure = v.records("upstream_failure", 1).remove(0);
    assert_eq!(failure["reason"], "upstream_not_allowed", "{failure}");
    assert_eq!(failure["domain"], domain, "{failure}");
    let m = v.metrics().await;
    assert_eq!(
        common::metric(
            &m,
            "vizor_sessions_total{kind=\"vnc\",outcome=\"upstream_not_allowed\"}"
        ),
        Some(1.0),
        "{m}"
    );
}

/// A console on a UNIX socket outside libvirt's socket directories is refused by
/// default (`[upstream] allow`); allowed, it relays beside a TCP console.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn unix_socket_consoles_and_concurrent_sessions() {
    let live = common::live_domain();
    common::test_host(&[
        "domain",
        "vizor-test-sock",
        "--vnc-socket",
        "/run/vizor-test-sock.vnc",
        "--vnc-passwd",
        "sockpw1",
        "--no-spice",
    ]);
    let v = Vizor::start("");
    refused_as_not_allowed(&v, "vizor-test-sock", "unix:/run/vizor-test-sock.vnc").await;
    drop(v);
    let v = Vizor::start_full(
        "",
        "",
        "[upstream]\nallow = [\"127.0.0.1\", \"unix:/run/\"]\n",
        |_| {},
    );
    let (mut a, si_a) = open_session(&v, &live.name).await;
    let (mut s, si_s) = open_session(&v, "vizor-test-sock").await;
    assert!(si_s.name_lossy().contains("vizor-test-sock"));
    let (pa, ps) = tokio::join!(full_update(&mut a, &si_a), full_update(&mut s, &si_s));
    assert_eq!(pa.0, pa.1, "a complete frame");
    assert_eq!(ps.0, ps.1, "a complete frame");
    let starts: Vec<String> = v
        .records("session_start", 2)
        .iter()
        .map(|r| r["upstream"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        starts.contains(&"unix:/run/vizor-test-sock.vnc".to_owned()),
        "{starts:?}"
    );
    assert!(starts.contains(&live.vnc_addr), "{starts:?}");
}

/// A domain whose XML puts its console on an address outside `[upstream] allow` (here
/// one the test adds to this machine: a real address, where QEMU really listens) is
/// refused by default, and reached once the list names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn a_console_outside_the_allow_list_is_refused() {
    common::live_domain();
    let _addr = common::TestAddress::add("192.0.2.77");
    let port = common::test_host(&[
        "domain",
        "vizor-test-allow",
        "--vnc-listen",
        "192.0.2.77",
        "--vnc-passwd",
        "allowpw1",
        "--no-spice",
    ]);
    let port = port.lines().last().unwrap().trim_start_matches("vnc_port=");
    let at = format!("192.0.2.77:{port}");
    let v = Vizor::start("");
    refused_as_not_allowed(&v, "vizor-test-allow", &at).await;
    drop(v);
    let v = Vizor::start_full("", "", "[upstream]\nallow = [\"192.0.2.0/24\"]\n", |_| {});
    let (mut b, si) = open_session(&v, "vizor-test-allow").await;
    let (raw, frame) = full_update(&mut b, &si).await;
    assert_eq!(raw, frame, "a complete frame");
    let start = v.records("session_start", 1).remove(0);
    assert_eq!(start["upstream"], at.as_str(), "{start}");
    drop(b);
    common::virsh(&["destroy", "vizor-test-allow"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn sigterm_ends_live_sessions_cleanly_with_their_records() {
    let live = common::live_domain();
    let mut v = Vizor::start("shutdown_grace = \"1s\"");
    let (mut b, si) = open_session(&v, &live.name).await;
    full_update(&mut b, &si).await;
    let pid_exit = tokio::task::spawn_blocking(move || {
        let status = v.terminate();
        (status, v)
    });
    let c = b.closed().await;
    assert_eq!(
        (c.code, c.reason.as_str()),
        (1001, "vizor is shutting down")
    );
    let (status, v) = pid_exit.await.unwrap();
    assert!(status.success(), "vizor exit: {status}");
    let audit = v.audit();
    let end = audit
        .iter()
        .find(|r| r["event"] == "session_end")
        .expect("session_end written");
    assert_eq!(end["reason"], "vizor is shutting down");
    // Everything was written, the log closed, and its chain verifies.
    let all = v.audit_all();
    assert_eq!(all.last().unwrap()["event"], "audit_close");
    let (ok, said) = v.verify(&[v.audit_path()]);
    assert!(ok, "{said}");
    assert!(
        said.contains(&format!("ok: {} records verified", all.len())),
        "{said}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn the_token_api_healthz_and_static_files() {
    let live = common::live_domain();
    let admin = "k3y-0123456789abcdef-admin";
    let v = Vizor::start_with(
        "web_root = \"www\"",
        "[api]\nadmin_key_file = \"admin.key\"",
        |dir| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::write(dir.join("admin.key"), format!("{admin}\n")).unwrap();
            std::fs::set_permissions(
                dir.join("admin.key"),
                std::fs::Permissions::from_mode(0o600),
            )
            .unwrap();
            std::fs::create_dir(dir.join("www")).unwrap();
            std::fs::write(dir.join("www/index.html"), "<title>console</title>").unwrap();
            std::fs::write(dir.join("www/app.js"), "export {}").unwrap();
            std::fs::write(dir.join("secret.txt"), "outside the web root").unwrap();
        },
    );
    let addr = v.addr;
    let get = move |path: &'static str, hdr: &'static [(&'static str, &'static str)]| {
        common::http_get(addr, path, hdr)
    };
    assert_eq!(get("/healthz", &[]).await.0, 200);
    let (status, head, body) = get("/", &[]).await;
    assert_eq!((status, body.as_str()), (200, "<title>console</title>"));
    assert!(head
        .to_ascii_lowercase()
        .contains("content-type: text/html"));
    let (status, head, _) = get("/app.js", &[]).await;
    assert_eq!(status, 200);
    assert!(head
        .to_ascii_lowercase()
        .contains("content-type: text/javascript"));
    for bad in [
        "/../secret.txt",
        "/www/../../secret.txt",
        "/%2e%2e/secret.txt",
        "/missing.js",
    ] {
        let (status, _, body) = get(bad, &[]).await;
        assert!(matches!(status, 400 | 404), "{bad}: {status}");
        assert!(!body.contains("outside the web root"), "{bad}");
    }

    let api = format!("/api/v1/domains/{}/console", live.name);
    assert_eq!(common::http_get(v.addr, &api, &[]).await.0, 401);
    assert_eq!(
        common::http_get(
            v.addr,
            &api,
            &[("Authorization", "Bearer wrong-key-0123456789")]
        )
        .await
        .0,
        401
    );
    let bearer = format!("Bearer {admin}");
    let auth = [("Authorization", bearer.as_str())];
    let (status, _, body) = common::http_get(v.addr, &format!("{api}?kind=rdp"), &auth).await;
    assert_eq!(status, 400, "{body}");
    let (status, _, body) = common::http_get(
        v.addr,
        "/api/v1/domains/vizor-test-nonexistent/console",
        &auth,
    )
    .await;
    assert_eq!(status, 404, "{body}");
    let (status, _, body) = common::http_get(v.addr, &api, &auth).await;
    assert_eq!(status, 200, "{body}");
    let j: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(j["kind"], "vnc");
    let token = j["token"].as_str().unwrap();
    assert_eq!(j["ws_path"], format!("/websockify?token={token}"));
    assert!(j["expires_at"].as_str().unwrap().ends_with('Z'));
    let mut b = Browser::connect(v.addr, j["ws_path"].as_str().unwrap()).await;
    let si = rfb_handshake(&mut b).await.unwrap();
    assert!(si.name_lossy().contains(&live.name));
    assert!(
        !v.log.lock().unwrap().contains(token),
        "the log names tokens by id only"
    );
    assert!(!v.log.lock().unwrap().contains(admin));
    // The management plane names the user (percent-encoded): the session is theirs.
    let (status, _, body) =
        common::http_get(v.addr, &format!("{api}?user=ann%20o%27neil"), &auth).await;
    assert_eq!(status, 200, "{body}");
    let j: serde_json::Value = serde_json::from_str(&body).unwrap();
    let mut b2 = Browser::connect(v.addr, j["ws_path"].as_str().unwrap()).await;
    rfb_handshake(&mut b2).await.unwrap();
    let users: Vec<_> = v
        .records("session_start", 2)
        .into_iter()
        .map(|r| r["user"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(users, ["api", "ann o'neil"]);
    for bad in ["", "%00x", &"u".repeat(257)] {
        let (status, _, body) = common::http_get(v.addr, &format!("{api}?user={bad}"), &auth).await;
        assert_eq!(status, 400, "{bad:?}: {body}");
    }
    drop((b, b2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn metrics_count_sessions_bytes_latency_and_refusals() {
    let live = common::live_domain();
    let v = Vizor::start("ping_interval = \"100ms\"");
    let (mut b, si) = open_session(&v, &live.name).await;
    full_update(&mut b, &si).await;
    // vizor pings the browser; the client answers while it reads.
    let until = tokio::time::Instant::now() + std::time::Duration::from_millis(600);
    while tokio::time::Instant::now() < until {
        let _ = tokio::time::timeout(std::time::Duration::from_millis(100), b.read()).await;
    }
    // Input, then an update: input-to-display latency.
    b.send(&msg(ClientMessage::KeyEvent {
        down: true,
        keysym: 0x61,
    }))
    .await;
    b.send(&msg(ClientMessage::KeyEvent {
        down: false,
        keysym: 0x61,
    }))
    .await;
    b.send(&update_request(8, 8)).await;
    b.read().await.unwrap();
    drop(b);
    v.wait_for_audit("session_end");
    refused(
        &v,
        &format!(
            "/websockify?token={}",
            v.token(&live.name, ConsoleKind::Vnc, -5)
        ),
    )
    .await;
    let (status, head, text) = common::http_get(v.addr, "/metrics", &[common::METRICS_AUTH]).await;
    assert_eq!(status, 200);
    assert!(head
        .to_ascii_lowercase()
        .contains("content-type: text/plain; version=0.0.4"));
    let at_least = |series: &str, min: f64| {
        let value = common::metric(&text, series).unwrap_or_else(|| panic!("{series} missing"));
        assert!(value >= min, "{series} = {value}, expected at least {min}");
    };
    at_least(
        "vizor_sessions_total{kind=\"vnc\",outcome=\"browser_closed\"}",
        1.0,
    );
    at_least("vizor_sessions_active{kind=\"vnc\"}", 0.0);
    at_least(
        "vizor_session_bytes_total{direction=\"vm_to_browser\",kind=\"vnc\"}",
        1000.0,
    );
    at_least(
        "vizor_session_bytes_total{direction=\"browser_to_vm\",kind=\"vnc\"}",
        20.0,
    );
    at_least("vizor_frame_latency_seconds_count{kind=\"vnc\"}", 2.0);
    at_least("vizor_input_to_display_seconds_count{kind=\"vnc\"}", 1.0);
    at_least("vizor_handshake_seconds_count{kind=\"vnc\"}", 1.0);
    at_least("vizor_client_rtt_seconds_count{kind=\"vnc\"}", 2.0);
    at_least("vizor_upstream_connect_seconds_count{kind=\"vnc\"}", 1.0);
    at_least("vizor_libvirt_lookup_seconds_count{host=\"default\"}", 1.0);
    at_least("vizor_audit_events_total{event=\"key\"}", 2.0);
    at_least("vizor_audit_events_total{event=\"session_start\"}", 1.0);
    at_least(
        "vizor_auth_refusals_total{reason=\"expired\",stage=\"token\"}",
        1.0,
    );
    assert_eq!(
        common::metric(&text, "vizor_audit_write_errors_total"),
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn metrics_move_to_metrics_listen_when_set() {
    let _live = common::live_domain();
    let port = common::free_port();
    let v = Vizor::start(&format!("metrics_listen = \"127.0.0.1:{port}\""));
    // The main listener asks for the key; metrics_listen, a private address, does not.
    assert_eq!(common::http_get(v.addr, "/metrics", &[]).await.0, 401);
    let metrics_addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let (status, _, text) = common::http_get(metrics_addr, "/metrics", &[]).await;
    assert_eq!(status, 200);
    assert!(text.contains("# HELP vizor_sessions_active "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn live_sessions_are_listed_and_their_series_go_when_they_end() {
    let live = common::live_domain();
    let v = Vizor::start_admin(
        "ping_interval = \"100ms\"",
        "[metrics]\nper_session = true\nper_session_max = 5",
    );
    // The list is the admin's only.
    let (status, _, _) = common::http_get(v.addr, "/api/v1/sessions", &[]).await;
    assert_eq!(status, 401);
    assert!(v.sessions().await.is_empty());
    let (mut b, si) = open_session(&v, &live.name).await;
    let (bytes, _) = full_update(&mut b, &si).await;
    b.send(&msg(ClientMessage::PointerEvent {
        buttons: 0,
        x: 3,
        y: 3,
    }))
    .await;
    b.send(&update_request(8, 8)).await;
    b.read().await.unwrap();
    // Long enough for a few browser round trips (the client answers while it reads).
    let until = tokio::time::Instant::now() + std::time::Duration::from_millis(500);
    while tokio::time::Instant::now() < until {
        let _ = tokio::time::timeout(std::time::Duration::from_millis(100), b.read()).await;
    }
    let sessions = v.sessions().await;
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    let s = &sessions[0];
    let start = v.records("session_start", 1).remove(0);
    assert_eq!(s["id"], start["session"], "the audit log's session id");
    assert_eq!(s["domain"], live.name.as_str());
    assert_eq!(s["kind"], "vnc");
    assert_eq!(s["user"], "tester");
    assert_eq!(s["client"], start["client"]);
    assert_eq!(s["token_id"], start["token_id"]);
    assert!(s["started_at"].as_str().unwrap().ends_with('Z'));
    // Byte counts are integers, as the README shows them.
    let vm_bytes = s["bytes"]["vm_to_browser"].as_u64().unwrap();
    assert!(vm_bytes >= bytes, "{s}");
    assert!(s["bytes"]["browser_to_vm"].as_u64().unwrap() > 0, "{s}");
    assert!(s["bytes_per_second"]["vm_to_browser"].as_f64().unwrap() > 0.0);
    for latency in ["frame_latency_ms", "input_to_display_ms", "client_rtt_ms"] {
        let l = &s[latency];
        assert!(l["samples"].as_u64().unwrap() >= 1, "{latency}: {s}");
        let (p50, p99) = (l["p50"].as_f64().unwrap(), l["p99"].as_f64().unwrap());
        assert!(p50 > 0.0 && p50 <= p99 && p99 < 10_000.0, "{latency}: {l}");
    }
    // The per-session series, labelled by the same id.
    let id = s["id"].as_u64().unwrap();
    let text = v.metrics().await;
    let series = |name: &str, labels: &str| common::metric(&text, &format!("{name}{{{labels}}}"));
    assert_eq!(
        series(
            "vizor_per_session_info",
            &format!(
                "domain=\"{}\",kind=\"vnc\",session=\"{id}\",user=\"tester\"",
                live.name
            )
        ),
        Some(1.0)
    );
    let exported = series(
        "vizor_per_session_bytes_total",
        &format!("direction=\"vm_to_browser\",session=\"{id}\""),
    )
    .expect("per-session bytes");
    assert!(exported >= vm_bytes as f64, "{exported} < {vm_bytes}");
    for name in [
        "vizor_per_session_frame_latency_seconds",
        "vizor_per_session_client_rtt_seconds",
    ] {
        let p99 = series(name, &format!("quantile=\"0.99\",session=\"{id}\""));
        assert!(p99.is_some_and(|x| x > 0.0), "{name}: {text}");
    }
    assert_eq!(
        common::metric(&text, "vizor_per_session_omitted"),
        Some(0.0)
    );
    // Ended: gone from the list and from the metrics.
    drop(b);
    v.wait_for_audit("session_end");
    for _ in 0..50 {
        if v.sessions().await.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(v.sessions().await.is_empty());
    let text = v.metrics().await;
    assert!(
        !text.contains("session=\""),
        "per-session series left:\n{text}"
    );
    assert!(text.contains("vizor_per_session_omitted 0"));
}

/// Presses and releases `keysym`, with Shift held around it when `shifted`, as noVNC
/// does for a character typed with Shift.
fn typed(keysym: u32, shifted: bool) -> Vec<u8> {
    const SHIFT_L: u32 = 0xffe1;
    let mut out = Vec::new();
    let mut key = |down, keysym| out.extend(msg(ClientMessage::KeyEvent { down, keysym }));
    if shifted {
        key(true, SHIFT_L);
    }
    key(true, keysym);
    key(false, keysym);
    if shifted {
        key(false, SHIFT_L);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn what_was_typed_comes_back_from_the_audit_log_and_tampering_is_found() {
    let live = common::live_domain();
    let v = Vizor::start_full("", "clipboard = \"content\"", "", |_| {});
    let (mut b, si) = open_session(&v, &live.name).await;
    full_update(&mut b, &si).await;
    // With clipboard = "content", the text itself is recorded (Latin-1 decoded).
    b.send(&msg(ClientMessage::ClientCutText(
        vizor_rfb::client::CutText::Latin1(b"caf\xe9"),
    )))
    .await;
    const BACKSPACE: u32 = 0xff08;
    const RETURN: u32 = 0xff0d;
    const CONTROL_L: u32 = 0xffe3;
    // "Hello, Wolrd", three BackSpaces, "rld!", Return, Ctrl+c.
    let mut keys = Vec::new();
    for c in "Hello, Wolrd".chars() {
        keys.extend(typed(c as u32, c.is_ascii_uppercase()));
    }
    for _ in 0..3 {
        keys.extend(typed(BACKSPACE, false));
    }
    for c in "rld!".chars() {
        keys.extend(typed(c as u32, c == '!'));
    }
    keys.extend(typed(RETURN, false));
    keys.extend(msg(ClientMessage::KeyEvent {
        down: true,
        keysym: CONTROL_L,
    }));
    keys.extend(typed('c' as u32, false));
    keys.extend(msg(ClientMessage::KeyEvent {
        down: false,
        keysym: CONTROL_L,
    }));
    // A click: its press is recorded with the position, not its release or motion.
    for buttons in [0, 1, 1, 0] {
        keys.extend(msg(ClientMessage::PointerEvent {
            buttons,
            x: 17,
            y: 23,
        }));
    }
    b.send(&keys).await;
    drop(b);
    let audit = v.wait_for_audit("session_end");
    let session = audit
        .iter()
        .find_map(|r| r["session"].as_u64())
        .unwrap()
        .to_string();
    let clip = audit.iter().find(|r| r["event"] == "clipboard").unwrap();
    assert_eq!(clip["content"], "caf\u{e9}");
    assert_eq!(clip["length"], 4);
    let clicks: Vec<_> = audit.iter().filter(|r| r["event"] == "button").collect();
    assert_eq!(clicks.len(), 1, "{clicks:?}");
    assert_eq!(
        (&clicks[0]["button"], &clicks[0]["x"], &clicks[0]["y"]),
        (&"left".into(), &17.into(), &23.into())
    );
    // A protocol error is recorded with its direction and cause.
    let (mut bad, _) = open_session(&v, &live.name).await;
    bad.send(&[0xEE, 0, 0, 0]).await;
    bad.closed().await;
    let audit = v.wait_for_audit("protocol_error");
    let error = audit
        .iter()
        .find(|r| r["event"] == "protocol_error")
        .unwrap();
    assert_eq!(error["direction"], "browser_to_vm");
    assert!(error["detail"]
        .as_str()
        .unwrap()
        .contains("browser protocol error"));
    let vizor = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_vizor"))
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let config = v.dir.path().join("vizor.toml");
    let (config, log) = (config.to_str().unwrap(), v.audit_path());
    let log = log.to_str().unwrap();
    let (ok, text, err) = vizor(&[
        "audit",
        "text",
        "--config",
        config,
        "--session",
        &session,
        log,
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("chain verified"), "{err}");
    assert_eq!(text, "Hello, World!\n<Ctrl+c>");
    let (ok, list, err) = vizor(&["audit", "sessions", log]);
    assert!(ok, "{err}");
    let row = list.lines().nth(1).unwrap();
    for field in [
        session.as_str(),
        "tester",
        live.name.as_str(),
        "vnc",
        "browser closed",
    ] {
        assert!(row.contains(field), "{field} in {row}");
    }
    // 12 characters and 2 Shifts, 3 BackSpaces, 4 characters and a Shift, Return, Ctrl, c.
    let presses = 12 + 2 + 3 + 4 + 1 + 1 + 2;
    assert!(
        row.contains(&format!(" {presses}  ")),
        "{presses} keys in {row}"
    );

    // The chain verifies; an edited key record breaks it at that record.
    let (ok, said) = v.verify(&[v.audit_path()]);
    assert!(ok, "{said}");
    let original = std::fs::read_to_string(log).unwrap();
    let line = original
        .lines()
        .position(|l| l.contains("\"key\":\"w\""))
        .unwrap();
    let copy = v.dir.path().join("edited.jsonl");
    std::fs::write(
        &copy,
        original.replacen("\"key\":\"w\"", "\"key\":\"v\"", 1),
    )
    .unwrap();
    let (ok, said) = v.verify(std::slice::from_ref(&copy));
    assert!(!ok);
    assert!(
        said.contains(&format!("BROKEN at {}:{}", copy.display(), line + 1)),
        "{said}"
    );
    // And a reader refuses to read it as true.
    let (ok, _, err) = vizor(&[
        "audit",
        "text",
        "--config",
        config,
        "--session",
        &session,
        copy.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("BROKEN"), "{err}");
}

/// A 64 KiB tmpfs holding the audit log, so the test can fill the log's disk: a write
/// error a real disk produces, made on demand. Unmounted on drop.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    /// Mounts it at `dir/disk` and points `dir/audit.jsonl` into it.
    fn prepare(dir: &std::path::Path) {
        let disk = dir.join("disk");
        std::fs::create_dir(&disk).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs"])
            .arg(&disk)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mounting a tmpfs (the test runs as root)");
        std::os::unix::fs::symlink(disk.join("audit.jsonl"), dir.join("audit.jsonl")).unwrap();
    }

    fn of(v: &Vizor) -> SmallDisk {
        SmallDisk(v.dir.path().join("disk"))
    }

    /// Fills the disk to its last byte.
    fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.0.join("filler")).unwrap();
        let block = [0u8; 512];
        while f.write_all(&block).is_ok() {}
        while f.write_all(&block[..1]).is_ok() {}
    }

    fn free(&self) {
        std::fs::remove_file(self.0.join("filler")).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

async fn write_errors(v: &Vizor) -> f64 {
    common::metric(&v.metrics().await, "vizor_audit_write_errors_total").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn a_full_audit_disk_closes_sessions_and_refuses_new_ones_until_it_has_room() {
    let live = common::live_domain();
    let v = Vizor::start_with("", "", SmallDisk::prepare);
    let disk = SmallDisk::of(&v);
    let (mut live_session, si) = open_session(&v, &live.name).await;
    full_update(&mut live_session, &si).await;
    disk.fill();
    // The log's last page may still have room for a few records: type until a key
    // cannot be recorded. Such a key is not relayed: the session closes.
    let mut keys = 0;
    let closed = loop {
        live_session.send(&typed('a' as u32, false)).await;
        keys += 1;
        assert!(keys < 200, "the audit log never filled");
        match tokio::time::timeout(std::time::Duration::from_millis(50), live_session.read()).await
        {
            Ok(Err(closed)) => break closed,
            _ => continue,
        }
    };
    assert_eq!(closed.code, 1011, "{}", closed.reason);
    assert!(
        closed.reason.starts_with("audit log cannot be written"),
        "{}",
        closed.reason
    );
    // A new session is refused with the same reason.
    let token = v.token(&live.name, ConsoleKind::Vnc, 60);
    let mut refused = Browser::connect(v.addr, &format!("/websockify?token={token}")).await;
    let hs = rfb_handshake(&mut refused).await;
    let closed = match hs {
        Ok(_) => refused.closed().await,
        Err(e) => {
            assert!(e.contains("audit log cannot be written"), "{e}");
            Closed {
                code: 1011,
                reason: e,
            }
        }
    };
    assert!(
        closed.reason.contains("audit log cannot be written"),
        "{}",
        closed.reason
    );
    assert!(write_errors(&v).await >= 2.0);
    assert!(v.wait_for_log("audit log write failed"));
    // Room again: sessions work, and the chain has no gap.
    disk.free();
    let (mut b, si) = open_session(&v, &live.name).await;
    full_update(&mut b, &si).await;
    b.send(&typed('z' as u32, false)).await;
    drop(b);
    let audit = v.wait_for_audit("session_end");
    let keys_audited = common::audited_keys(&audit);
    assert!(keys_audited.contains(&(true, "z".to_owned())));
    // The key event that could not be recorded (and what followed it) is missing.
    let a_events = keys_audited.iter().filter(|k| k.1 == "a").count();
    assert!(a_events < 2 * keys, "{a_events} of {}", 2 * keys);
    let (ok, said) = v.verify(&[v.audit_path()]);
    assert!(ok, "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn with_on_error_continue_sessions_go_on_and_the_loss_is_counted() {
    let live = common::live_domain();
    let v = Vizor::start_full("", "on_error = \"continue\"", "", SmallDisk::prepare);
    let disk = SmallDisk::of(&v);
    let (mut b, si) = open_session(&v, &live.name).await;
    full_update(&mut b, &si).await;
    disk.fill();
    let mut keys = 0;
    while write_errors(&v).await == 0.0 {
        b.send(&typed('a' as u32, false)).await;
        keys += 1;
        assert!(keys < 200, "the audit log never filled");
        let _ = tokio::time::timeout(std::time::Duration::from_millis(50), b.read()).await;
    }
    // Still relaying: a full update comes back.
    full_update(&mut b, &si).await;
    assert!(v.wait_for_log("audit record lost (on_error = continue)"));
    drop(disk);
}

/// What went through a [`witness`], each way.
#[derive(Clone, Default)]
struct Witnessed {
    /// vizor to QEMU.
    sent: Arc<Mutex<Vec<u8>>>,
    /// QEMU to vizor.
    received: Arc<Mutex<Vec<u8>>>,
}

/// A TCP relay between vizor and QEMU that keeps everything each side sent: the witness
/// of which key events reached the VM (QEMU keeps no record of keys it received), and
/// of the bytes QEMU sent.
async fn witness(qemu: String) -> (std::net::SocketAddr, Witnessed) {
    cutting_witness(qemu, usize::MAX).await
}

/// A [`witness`] that hangs up on vizor once QEMU sent `cut` bytes, as if the VM's
/// console closed there: a test double for a console that stops mid-message, which
/// QEMU does not do at will.
async fn cutting_witness(qemu: String, cut: usize) -> (std::net::SocketAddr, Witnessed) {
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    async fn pass(
        mut from: impl AsyncRead + Unpin,
        mut to: impl AsyncWrite + Unpin,
        keep: Arc<Mutex<Vec<u8>>>,
        mut cut: usize,
    ) {
        let mut buf = vec![0u8; 65536];
        while cut > 0 {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let n = n.min(cut);
                    cut -= n;
                    keep.lock().unwrap().extend_from_slice(&buf[..n]);
                    if to.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Witnessed::default();
    let keep = seen.clone();
    tokio::spawn(async move {
        let (from_vizor, _) = listener.accept().await.unwrap();
        let to_qemu = tokio::net::TcpStream::connect(qemu).await.unwrap();
        let (vr, vw) = from_vizor.into_split();
        let (qr, qw) = to_qemu.into_split();
        // Either way ending ends both: the cut closes the connection to vizor.
        tokio::select! {
            _ = pass(vr, qw, keep.sent, usize::MAX) => {}
            _ = pass(qr, vw, keep.received, cut) => {}
        }
    });
    (addr, seen)
}

/// vizor with libvirt's test driver naming `addr` (a witness) as the console of the
/// domain `vizor-witness`, with the live domain's password.
fn witnessed_vizor(
    addr: std::net::SocketAddr,
    live: &common::LiveDomain,
    audit_extra: &str,
) -> (Vizor, tempfile::TempDir) {
    let (dir, uri) = common::test_node(&[(
        "vizor-witness".to_owned(),
        addr.port(),
        live.vnc_password.clone(),
    )]);
    let v = Vizor::start_uri(&uri, "", audit_extra, "", |_| {});
    (v, dir)
}

use std::sync::{Arc, Mutex};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn sigkill_mid_session_loses_no_key_event_that_reached_the_vm() {
    let live = common::live_domain();
    let (addr, seen) = witness(live.vnc_addr.clone()).await;
    // libvirt's test driver names the witness as the domain's console, with the real
    // password: vizor looks it up as it would any domain. Durability against SIGKILL
    // needs no fsync.
    let (mut v, _dir) = witnessed_vizor(addr, &live, "fsync = \"interval:10s\"");
    let (mut b, si) = open_session(&v, "vizor-witness").await;
    full_update(&mut b, &si).await;
    // Keys flow in small bursts; vizor is killed while they do.
    let typing = tokio::spawn(async move {
        for i in 0u32.. {
            let mut burst = Vec::new();
            for j in 0..8 {
                burst.extend(typed(0x61 + (i * 8 + j) % 26, false));
            }
            b.send(&burst).await;
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    v.kill();
    typing.abort();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;

    // What reached QEMU: after the 30 bytes of vizor's RFB client handshake (version,
    // security type, VNC authentication response, ClientInit), client messages.
    let sent = seen.sent.lock().unwrap().clone();
    assert!(sent.len() > 30, "vizor never talked to QEMU");
    let mut dec = vizor_rfb::client::ClientDecoder::new(vizor_rfb::Limits::default());
    let mut reached = Vec::new();
    let mut pos = 30;
    while let Some((m, n)) = dec.decode(&sent[pos..]).unwrap() {
        if let ClientMessage::KeyEvent { down, keysym } = m {
            reached.push((down, vizor_rfb::keysym::keysym_name(keysym).into_owned()));
        }
        pos += n;
    }
    assert!(
        reached.len() > 16,
        "only {} key events reached QEMU",
        reached.len()
    );
    // The audit log may end in an incomplete record; every complete one is read.
    let audited: Vec<(bool, String)> = std::fs::read_to_string(v.audit_path())
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["event"] == "key")
        .map(|r| (r["down"] == true, r["key"].as_str().unwrap().to_owned()))
        .collect();
    assert!(
        audited.len() >= reached.len() && audited[..reached.len()] == reached[..],
        "{} key events reached QEMU, {} audited; first difference at {:?}",
        reached.len(),
        audited.len(),
        reached.iter().zip(&audited).position(|(a, b)| a != b)
    );
    let (ok, said) = v.verify(&[v.audit_path()]);
    assert!(ok, "{said}");
    eprintln!(
        "{} key events reached QEMU, {} were audited",
        reached.len(),
        audited.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn a_recorded_session_replays_byte_for_byte() {
    let live = common::live_domain();
    let v = Vizor::start_full("", "record_dir = \"rec\"", "", |dir| {
        std::fs::create_dir(dir.join("rec")).unwrap();
    });
    let (mut b, si) = open_session(&v, &live.name).await;
    full_update(&mut b, &si).await;
    b.send(&typed(0xff1b, false)).await;
    full_update(&mut b, &si).await;
    let live_stream = b.received.clone();
    drop(b);
    let audit = v.wait_for_audit("session_end");
    let end = audit.iter().find(|r| r["event"] == "session_end").unwrap();
    let rec = &end["recording"];
    let path = v.dir.path().join("rec").join(rec["file"].as_str().unwrap());
    let file = std::fs::read(&path).unwrap();
    // The audit chain vouches for the recording: its length and digest.
    use sha2::Digest;
    assert_eq!(rec["bytes"], file.len());
    let digest: String = sha2::Sha256::digest(&file)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(rec["sha256"], digest.as_str());
    let (ok, said) = v.verify(&[v.audit_path()]);
    assert!(ok, "{said}");

    // Replayed to a client as noVNC would connect: the same ServerInit, then the same
    // bytes the live browser received, in order (the live client may have left
    // before reading the last of them).
    let mut replay = std::process::Command::new(env!("CARGO_BIN_EXE_vizor"))
        .args(["replay", "--listen", "127.0.0.1:0", "--speed", "0"])
        .arg(&path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(replay.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let addr: std::net::SocketAddr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .parse()
        .unwrap();
    let mut r = Browser::connect(addr, "/websockify").await;
    let replay_si = rfb_handshake(&mut r).await.unwrap();
    assert_eq!((replay_si.width, replay_si.height), (si.width, si.height));
    assert_eq!(replay_si.name, si.name);
    let handshake = r.received.len() - r.pending.len();
    let recorded_len = file.len(); // an upper bound on what is replayed
    while r.received.len() - handshake < live_stream.len() - handshake {
        match tokio::time::timeout(std::time::Duration::from_secs(5), r.read()).await {
            Ok(Ok(())) => {}
            _ => break,
        }
        assert!(r.received.len() <= recorded_len + handshake);
    }
    let _ = replay.kill();
    let _ = replay.wait();
    let live_after = &live_stream[handshake..];
    let replayed = &r.received[handshake..];
    assert!(live_after.len() > 1000, "the live session showed a screen");
    assert!(
        replayed.len() >= live_after.len() && replayed[..live_after.len()] == *live_after,
        "replayed {} bytes, live {}; first difference at {:?}",
        replayed.len(),
        live_after.len(),
        replayed.iter().zip(live_after).position(|(a, b)| a != b)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn the_extended_clipboard_as_novnc_uses_it_is_relayed_and_audited() {
    use std::io::Write;
    use vizor_rfb::client::{clipboard, write_set_encodings, CutText};
    use vizor_rfb::server::{ServerDecoder, ServerEvent};
    use vizor_rfb::{Encoding, Limits};
    let live = common::live_domain();
    let v = Vizor::start_full("", "clipboard = \"content\"", "", |_| {});
    let (mut b, si) = open_session(&v, &live.name).await;
    // As noVNC: offer the extended clipboard; QEMU answers with its caps, whose action
    // bits (provide among them) say what it supports: no contents, no record.
    let encodings = [Encoding::RAW, Encoding::EXTENDED_CLIPBOARD];
    let mut out = Vec::new();
    write_set_encodings(encodings, &mut out);
    out.extend(update_request(8, 8));
    b.send(&out).await;
    let mut dec = ServerDecoder::new(&si, Limits::default());
    dec.set_encodings(encodings);
    let mut caps = None;
    let mut updated = false;
    while caps.is_none() || !updated {
        while let Some((ev, n)) = dec.decode(&b.pending).unwrap() {
            match ev {
                ServerEvent::ServerCutText(CutText::Extended { flags, .. }) => caps = Some(flags),
                ServerEvent::UpdateEnd => updated = true,
                _ => {}
            }
            b.pending.drain(..n);
        }
        if caps.is_none() || !updated {
            b.read().await.unwrap();
        }
    }
    assert!(caps.unwrap() & clipboard::CAPS != 0);
    // noVNC's caps, then a provide deflated with a flush and never finished.
    let mut caps_data = Vec::new();
    caps_data.extend(0x0010_0000u32.to_be_bytes());
    let mut out = msg(ClientMessage::ClientCutText(CutText::Extended {
        flags: clipboard::CAPS | clipboard::TEXT | clipboard::PROVIDE | clipboard::NOTIFY,
        data: &caps_data,
    }));
    let text = "hello from noVNC";
    let mut plain = ((text.len() + 1) as u32).to_be_bytes().to_vec();
    plain.extend_from_slice(text.as_bytes());
    plain.push(0);
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(&plain).unwrap();
    z.flush().unwrap();
    out.extend(msg(ClientMessage::ClientCutText(CutText::Extended {
        flags: clipboard::PROVIDE | clipboard::TEXT,
        data: z.get_ref(),
    })));
    out.extend(update_request(8, 8));
    b.send(&out).await;
    b.read().await.unwrap();
    drop(b);
    let audit = v.wait_for_audit("session_end");
    let clips: Vec<_> = audit.iter().filter(|r| r["event"] == "clipboard").collect();
    assert_eq!(clips.len(), 1, "{clips:?}");
    assert_eq!(clips[0]["direction"], "browser_to_vm");
    assert_eq!(clips[0]["format"], "text");
    assert_eq!(clips[0]["content"], text);
    assert_eq!(clips[0]["length"], text.len());
    let end = audit.iter().find(|r| r["event"] == "session_end").unwrap();
    assert_eq!(end["reason"], "browser closed the connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn a_token_bound_to_a_client_admits_that_client_alone() {
    let live = common::live_domain();
    // Other clients are told apart by their loopback source address.
    let (holder, thief): (std::net::IpAddr, std::net::IpAddr) =
        ("127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap());
    let v = Vizor::start_admin("", "");
    let bearer = format!("Bearer {}", common::ADMIN_KEY);
    let auth = [("Authorization", bearer.as_str())];
    let api = format!("/api/v1/domains/{}/console", live.name);
    let (status, _, body) =
        common::http_get(v.addr, &format!("{api}?client=host.example"), &auth).await;
    assert_eq!(
        (status, body.as_str()),
        (
            400,
            "{\"error\":\"client must be an IPv4 or IPv6 address\",\"reason\":\"bad_request\"}"
        )
    );
    let (status, _, body) =
        common::http_get(v.addr, &format!("{api}?client={holder}"), &auth).await;
    assert_eq!(status, 200, "{body}");
    let j: serde_json::Value = serde_json::from_str(&body).unwrap();
    let ws_path = j["ws_path"].as_str().unwrap();
    let token = j["token"].as_str().unwrap();

    // Whoever copied the link gets nowhere: not the console page, not the console.
    let (status, _, page) = common::http_get_over(
        common::tcp_from(thief, v.addr).await,
        v.addr,
        &format!("/console?token={token}"),
        &[],
    )
    .await;
    assert_eq!(status, 403);
    assert!(
        page.contains("This console link is for another computer"),
        "{page}"
    );
    let mut b = Browser::connect_from(thief, v.addr, ws_path).await;
    assert_eq!(
        rfb_handshake(&mut b).await.unwrap_err(),
        "closed 1008: token issued for another address"
    );
    // ...nor spends the token: its holder still opens the console with it.
    let mut b = Browser::connect_from(holder, v.addr, ws_path).await;
    let si = rfb_handshake(&mut b).await.unwrap();
    let (pixels, frame) = full_update(&mut b, &si).await;
    assert_eq!(pixels, frame);

    // Precise in the audit log and metrics, where the operator looks.
    // Both refusals recorded: a token that opened gets its record each time, whoever
    // tried it before.
    let refused = v.records("token_refused", 2);
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert!(
        refused.iter().all(|r| r["reason"] == "wrong_client"
            && r["client"].as_str().unwrap().starts_with("127.0.0.3:")),
        "{refused:?}"
    );
    v.wait_for_metric(
        "vizor_auth_refusals_total{reason=\"wrong_client\",stage=\"token\"}",
        2.0,
    )
    .await;
    let log = v.log.lock().unwrap().clone();
    assert!(
        log.contains("token bound to client 127.0.0.2, presented by 127.0.0.3"),
        "{log}"
    );
    assert!(
        !log.contains('\u{1b}'),
        "no terminal colours in a log to a pipe"
    );
    let start = v.records("session_start", 1).remove(0);
    assert_eq!(
        start["client"].as_str().unwrap().split(':').next(),
        Some("127.0.0.2")
    );
}

/// Rectangles of 64 KiB or more go from QEMU's socket to the browser's by splice(2),
/// never read into vizor, in WebSocket messages of `[server] ws_message_size` at most.
/// The browser must still receive, from ServerInit on, exactly the bytes QEMU sent (a
/// witness between vizor and QEMU keeps them), and the metric says most of the pixels
/// went that way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn large_rectangles_are_spliced_and_arrive_exactly_as_qemu_sent_them() {
    let live = common::live_domain();
    let (addr, seen) = witness(live.vnc_addr.clone()).await;
    let (_dir, uri) = common::test_node(&[(
        "vizor-witness".to_owned(),
        addr.port(),
        live.vnc_password.clone(),
    )]);
    let v = Vizor::start_uri(&uri, "ws_message_size = \"100KiB\"", "", "", |_| {});
    let (mut b, si) = open_session(&v, "vizor-witness").await;
    let mut pixels = 0;
    for _ in 0..4 {
        pixels += full_update(&mut b, &si).await.0;
    }
    let spliced = common::metric(
        &v.metrics().await,
        "vizor_spliced_bytes_total{kind=\"vnc\"}",
    )
    .unwrap();
    assert!(
        spliced >= pixels as f64 / 2.0,
        "{spliced} of {pixels} pixel bytes spliced"
    );
    // A full frame of the test VM (640x400, 32 bits) is a million bytes, in one
    // rectangle: ten messages or more.
    assert!(pixels / 4 >= 1_000_000, "{pixels} bytes in 4 frames");
    assert!(b.largest <= 100 << 10, "a message of {} bytes", b.largest);
    assert!(b.largest > 64 << 10, "a message of {} bytes", b.largest);
    let mut init = Vec::new();
    si.write(&mut init);
    let after_init = |s: &[u8]| {
        s.windows(init.len())
            .position(|w| w == init)
            .map(|i| i + init.len())
            .expect("ServerInit in the stream")
    };
    let received = b.received.clone();
    let to_browser = &received[after_init(&received)..];
    let from_qemu = seen.received.lock().unwrap().clone();
    // vizor asks QEMU for its LED state, which this browser did not ask for: those
    // updates (one LED rectangle each) are QEMU's alone.
    let from_qemu = without_led_updates(&from_qemu[after_init(&from_qemu)..]);
    let from_qemu = &from_qemu[..];
    assert!(to_browser.len() as u64 > pixels);
    assert!(from_qemu.len() >= to_browser.len());
    assert!(
        to_browser == &from_qemu[..to_browser.len()],
        "the browser's bytes differ from QEMU's at {:?} (of {})",
        to_browser.iter().zip(from_qemu).position(|(a, b)| a != b),
        to_browser.len()
    );
    eprintln!(
        "{} bytes relayed as QEMU sent them, {spliced} spliced",
        to_browser.len()
    );
}

/// A console that closes in the middle of a spliced rectangle breaks the WebSocket
/// frame carrying it: nothing can follow on that connection, not even a close frame,
/// so vizor drops it. The session is on record as the VM closing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn a_console_closing_mid_rectangle_drops_the_browser_and_is_on_record() {
    let live = common::live_domain();
    // A full Raw frame of the test VM is over a megabyte: 300,000 bytes in, its
    // rectangle is being spliced.
    let (addr, seen) = cutting_witness(live.vnc_addr.clone(), 300_000).await;
    let (v, _dir) = witnessed_vizor(addr, &live, "");
    let (mut b, si) = open_session(&v, "vizor-witness").await;
    b.send(&update_request(si.width, si.height)).await;
    let closed = b.closed().await;
    assert_eq!(closed.code, 0, "no close frame: {closed:?}");
    assert!(closed.reason.starts_with("WebSocket error"), "{closed:?}");
    assert_eq!(seen.received.lock().unwrap().len(), 300_000);
    let end = v.wait_for_records("session_end", 1);
    let end = end.iter().find(|r| r["event"] == "session_end").unwrap();
    assert_eq!(end["reason"], "the VM closed the console connection");
    // Of a splice cut short, the messages the browser got whole are counted, and no
    // more: 300,000 bytes in, one 256 KiB message at most.
    let m = v.metrics().await;
    let spliced = common::metric(&m, "vizor_spliced_bytes_total{kind=\"vnc\"}").unwrap();
    assert!(
        spliced == 0.0 || spliced == f64::from(256u32 << 10),
        "{spliced} bytes counted of a splice cut short"
    );
    v.wait_for_metric(
        "vizor_sessions_total{kind=\"vnc\",outcome=\"vm_closed\"}",
        1.0,
    )
    .await;
}

/// `stream` without QEMU's LED state updates: a FramebufferUpdate of one 1x1 rectangle
/// of encoding -261 and its state byte.
fn without_led_updates(stream: &[u8]) -> Vec<u8> {
    const LED: [u8; 16] = [0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 1, 0xff, 0xff, 0xfe, 0xfb];
    let mut out = Vec::with_capacity(stream.len());
    let mut i = 0;
    while i < stream.len() {
        if stream[i..].starts_with(&LED) && i + LED.len() < stream.len() {
            i += LED.len() + 1;
        } else {
            out.push(stream[i]);
            i += 1;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn a_token_opens_the_domain_it_was_issued_for_not_a_namesake() {
    common::live_domain();
    let d = "vizor-test-namesake";
    common::test_host(&["domain", d, "--vnc-passwd", "name1", "--no-spice"]);
    let v = Vizor::start("");
    let old = v.token(d, ConsoleKind::Vnc, 60);
    let before = common::domain_uuid("qemu:///system", d);
    // The domain is deleted and another defined under its name (test-host.sh undefines
    // and defines it afresh: a new UUID).
    common::test_host(&["domain", d, "--vnc-passwd", "name2", "--no-spice"]);
    assert_ne!(common::domain_uuid("qemu:///system", d), before);
    let mut b = Browser::connect(v.addr, &format!("/websockify?token={old}")).await;
    let closed = b.closed().await;
    assert_eq!((closed.code, closed.reason.as_str()), (1011, "no such VM"));
    let failure = v.records("upstream_failure", 1).remove(0);
    assert_eq!(failure["reason"], "no_such_domain");
    // A token issued for the new domain opens it.
    let (mut b, si) = open_session(&v, d).await;
    full_update(&mut b, &si).await;
}
