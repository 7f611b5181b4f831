//! `[limits]` against real QEMU and libvirtd: session slots, idle sessions, message
//! sizes, failed-token throttling, browsers that stop reading, slow and flooding
//! clients. Other clients are told apart by their loopback source address (any of
//! 127.0.0.0/8 reaches vizor as a client of its own).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a panic is a failure

mod common;

use common::rfb::{full_update, msg, open_session, rfb_handshake, update_request};
use common::{Browser, Vizor};
use std::net::IpAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vizor::token::ConsoleKind;
use vizor_rfb::client::{ClientMessage, CutText};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

async fn open_as(v: &Vizor, domain: &str, user: &str) -> Browser {
    let token = v.token_as(domain, ConsoleKind::Vnc, user, 60);
    Browser::connect(v.addr, &format!("/websockify?token={token}")).await
}

/// Opens a session of `user` and expects the refusal `reason` (close code 1008).
async fn refused_as(v: &Vizor, domain: &str, user: &str, reason: &str) {
    let mut b = open_as(v, domain, user).await;
    let err = rfb_handshake(&mut b).await.unwrap_err();
    assert_eq!(err, format!("closed 1008: {reason}"));
}

/// The limits named by the session_refused records, once there are `n` of them (the
/// record is written after the browser has its close frame, so it is waited for).
fn refusals(v: &Vizor, n: usize) -> Vec<String> {
    v.records("session_refused", n)
        .iter()
        .map(|r| r["reason"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn sessions_are_limited_per_user_per_domain_and_in_all() {
    let live = common::live_domain();
    let d = live.name.as_str();
    // Per user: alice may hold one session, bob is not held back by her.
    let v = Vizor::start_with("", "[limits]\nmax_sessions_per_user = 1\n", |_| {});
    let mut a = open_as(&v, d, "alice").await;
    rfb_handshake(&mut a).await.unwrap();
    refused_as(
        &v,
        d,
        "alice",
        "you have as many console sessions open as allowed",
    )
    .await;
    let (mut b, si) = {
        let mut b = open_as(&v, d, "bob").await;
        let si = rfb_handshake(&mut b).await.unwrap();
        (b, si)
    };
    full_update(&mut b, &si).await;
    // Her slot is free again once her session has ended.
    drop(a);
    v.records("session_end", 1);
    let mut again = open_as(&v, d, "alice").await;
    rfb_handshake(&mut again).await.unwrap();
    assert_eq!(refusals(&v, 1), ["limit_user_sessions"]);
    let refused = v.records("session_refused", 1).remove(0);
    assert_eq!(
        (&refused["user"], &refused["domain"]),
        (&"alice".into(), &d.into())
    );
    v.wait_for_metric(
        "vizor_sessions_total{kind=\"vnc\",outcome=\"limit_user_sessions\"}",
        1.0,
    )
    .await;
    drop((b, again));

    // Per domain, then in all.
    let v = Vizor::start_with(
        "",
        "[limits]\nmax_sessions_per_domain = 2\nmax_sessions = 3\n",
        |_| {},
    );
    let (_s1, _) = open_session(&v, d).await;
    let (_s2, _) = open_session(&v, d).await;
    refused_as(
        &v,
        d,
        "carol",
        "this VM has as many console sessions as allowed",
    )
    .await;
    common::test_host(&[
        "domain",
        "vizor-test-lim2",
        "--vnc-passwd",
        "lim2pw",
        "--no-spice",
    ]);
    let (_s3, _) = open_session(&v, "vizor-test-lim2").await;
    refused_as(
        &v,
        "vizor-test-lim2",
        "dave",
        "vizor has as many sessions as it allows; try again later",
    )
    .await;
    assert_eq!(
        refusals(&v, 2),
        ["limit_domain_sessions", "limit_sessions"],
        "each refusal is audited with its limit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn a_spice_session_takes_one_slot_whatever_its_channels() {
    common::live_domain();
    use common::spice::{link, session};
    use vizor_spice::link::{channel_type, link_error};
    let d = common::spice::domain("vizor-test-limsp");
    let v = Vizor::start_with("", "[limits]\nmax_sessions_per_user = 1\n", |_| {});
    let token = v.token(d, ConsoleKind::Spice, 60);
    let (_main, session_id, _) = session(&v, &token, true).await;
    // Its other channels ride on the session's slot.
    let mut channels = Vec::new();
    for channel in [channel_type::INPUTS, channel_type::CURSOR] {
        let mut b = common::spice::open(&v, &token).await;
        link(&mut b, channel, session_id, true)
            .await
            .unwrap_or_else(|e| panic!("channel {channel} refused: {e}"));
        channels.push(b);
    }
    // A second session of the same user is refused at its main channel.
    let second = v.token(d, ConsoleKind::Spice, 60);
    let mut b = common::spice::open(&v, &second).await;
    assert_eq!(
        link(&mut b, channel_type::MAIN, 0, true).await.unwrap_err(),
        link_error::PERMISSION_DENIED
    );
    assert_eq!(
        b.closed().await.reason,
        "you have as many console sessions open as allowed"
    );
    v.records("session_refused", 1);
    assert_eq!(refusals(&v, 1), ["limit_user_sessions"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn sessions_without_input_are_closed_and_input_keeps_them_open() {
    let live = common::live_domain();
    let v = Vizor::start_with("", "[limits]\nidle_timeout = \"2s\"\n", |_| {});
    let (mut idle, _) = open_session(&v, &live.name).await;
    let (mut busy, si) = open_session(&v, &live.name).await;
    let started = Instant::now();
    // The busy session moves the pointer every half second; update requests and the
    // frames they bring are not input.
    let mover = async {
        for i in 0..8u16 {
            busy.send(&msg(ClientMessage::PointerEvent {
                buttons: 0,
                x: i,
                y: i,
            }))
            .await;
            busy.send(&update_request(1, 1)).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    let watcher = async {
        idle.send(&update_request(1, 1)).await;
        idle.closed().await
    };
    let ((), closed) = tokio::join!(mover, watcher);
    assert_eq!(
        (closed.code, closed.reason.as_str()),
        (1000, "closed after 2s without input")
    );
    assert!(started.elapsed() >= Duration::from_secs(2));
    // Four seconds on, the busy session is still there.
    assert!(started.elapsed() >= Duration::from_secs(4));
    full_update(&mut busy, &si).await;
    let ends = v.records("session_end", 1);
    assert_eq!(ends[0]["reason"], "closed after 2s without input");
    v.wait_for_metric(
        "vizor_sessions_total{kind=\"vnc\",outcome=\"idle_timeout\"}",
        1.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn browser_messages_beyond_the_limit_are_refused() {
    let live = common::live_domain();
    let v = Vizor::start_with("", "[limits]\nbrowser_message_max = \"64KiB\"\n", |_| {});
    // Within the limit: relayed.
    let (mut b, si) = open_session(&v, &live.name).await;
    let text = vec![b'x'; 60 << 10];
    b.send(&msg(ClientMessage::ClientCutText(CutText::Latin1(&text))))
        .await;
    full_update(&mut b, &si).await;
    // Beyond it: refused by its header alone, before a byte of text arrived.
    let (mut b, _) = open_session(&v, &live.name).await;
    let mut header = vec![6u8, 0, 0, 0];
    header.extend_from_slice(&(100u32 << 10).to_be_bytes());
    b.send(&header).await;
    let closed = b.closed().await;
    assert_eq!(closed.code, 1008);
    assert!(
        closed.reason.starts_with("browser protocol error")
            && closed.reason.contains("exceeds the limit of 65536 bytes"),
        "{closed:?}"
    );
    // A lying 4 GiB length is refused the same way, at once.
    let (mut b, _) = open_session(&v, &live.name).await;
    b.send(&[6, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]).await;
    let closed = tokio::time::timeout(Duration::from_secs(5), b.closed())
        .await
        .unwrap();
    assert!(
        closed.reason.contains("ClientCutText of 4294967303 bytes"),
        "{closed:?}"
    );
    // A WebSocket message beyond the limit is refused by its frame header.
    let (mut b, _) = open_session(&v, &live.name).await;
    b.send(&vec![0u8; 70 << 10]).await;
    let closed = b.closed().await;
    assert_ne!(closed.code, 1000, "{closed:?}");
    let errors: Vec<_> = v
        .records("protocol_error", 2)
        .into_iter()
        .map(|r| r["direction"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(errors, ["browser_to_vm", "browser_to_vm"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn a_client_that_fails_tokens_is_throttled_and_others_are_not() {
    let live = common::live_domain();
    let v = Vizor::start_with("", "[limits]\nfailed_tokens_per_client = 3\n", |_| {});
    let guesser = ip("127.0.0.2");
    for i in 0..3 {
        let mut b =
            Browser::connect_from(guesser, v.addr, &format!("/websockify?token=guess{i}")).await;
        assert_eq!(b.closed().await.reason, "invalid token");
    }
    // Now even a good token from that address is refused unheard, page and socket.
    let good = v.token(&live.name, ConsoleKind::Vnc, 60);
    for path in [
        format!("/websockify?token={good}"),
        format!("/console?token={good}"),
    ] {
        let s = common::tcp_from(guesser, v.addr).await;
        let (status, head, _) = common::http_get_over(
            s,
            v.addr,
            &path,
            &[
                ("Upgrade", "websocket"),
                ("Connection", "Upgrade"),
                ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
                ("Sec-WebSocket-Version", "13"),
            ],
        )
        .await;
        assert_eq!(status, 429, "{head}");
        let retry: u64 = head
            .lines()
            .find_map(|l| l.strip_prefix("retry-after: "))
            .unwrap_or_else(|| panic!("no Retry-After in {head}"))
            .parse()
            .unwrap();
        assert!((1..=60).contains(&retry), "{retry}");
    }
    // Another client is heard, with the very same token.
    let mut b = Browser::connect(v.addr, &format!("/websockify?token={good}")).await;
    rfb_handshake(&mut b).await.unwrap();
    let throttled = v.records("client_throttled", 1);
    assert_eq!(throttled.len(), 1, "{throttled:?}");
    assert_eq!(throttled[0]["client"], "127.0.0.2");
    assert_eq!(throttled[0]["failures"], 3);
    let m = v.metrics().await;
    assert_eq!(
        common::metric(
            &m,
            "vizor_auth_refusals_total{reason=\"throttled\",stage=\"token\"}"
        ),
        Some(2.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn a_browser_that_stops_reading_is_dropped_and_others_go_on() {
    let live = common::live_domain();
    let v = Vizor::start_with("", "[limits]\nsend_timeout = \"2s\"\n", |_| {});
    // A small receive buffer, so the socket fills after a few frames.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(v.addr).await.unwrap();
    let token = v.token(&live.name, ConsoleKind::Vnc, 60);
    let mut stalled =
        Browser::connect_over(stream, v.addr, &format!("/websockify?token={token}")).await;
    let si = rfb_handshake(&mut stalled).await.unwrap();
    // Ask for whole frames, and never read them. A whole frame is over a megabyte,
    // most of it spliced: the writer is stuck in a splice when the timeout comes.
    for _ in 0..40 {
        stalled.send(&update_request(si.width, si.height)).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Meanwhile another browser is served.
    let (mut b, si2) = open_session(&v, &live.name).await;
    full_update(&mut b, &si2).await;
    let ends = v.records("session_end", 1);
    assert_eq!(ends[0]["reason"], "the browser took no data for 2s");
    v.wait_for_metric(
        "vizor_sessions_total{kind=\"vnc\",outcome=\"browser_stalled\"}",
        1.0,
    )
    .await;
    full_update(&mut b, &si2).await;
}

/// Sends a request head a byte at a time, every `gap`; returns how it ended: `true`
/// when vizor closed the connection.
async fn drip(mut s: tokio::net::TcpStream, gap: Duration, until: Instant) -> bool {
    let head = b"GET /websockify?token=x HTTP/1.1\r\nHost: vizor\r\nX-Slow: ";
    let mut sent = 0;
    let mut buf = [0u8; 256];
    while Instant::now() < until {
        let byte = head.get(sent).copied().unwrap_or(b'a');
        if s.write_all(&[byte]).await.is_err() {
            return true;
        }
        sent += 1;
        match tokio::time::timeout(gap, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // A 408 or 400 before the close is fine too.
            Ok(Ok(_)) => {}
            Err(_) => {}
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn slow_and_flooding_clients_do_not_starve_sessions_or_grow_vizor() {
    let live = common::live_domain();
    let v = Vizor::start_with(
        "handshake_timeout = \"2s\"",
        "[limits]\nmax_connections_per_client = 20\nfailed_tokens_per_client = 10\n",
        |_| {},
    );
    // Warm up, then measure what vizor holds at rest.
    let (b, _) = open_session(&v, &live.name).await;
    drop(b);
    v.records("session_end", 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (fds_before, rss_before) = (v.open_fds(), v.rss_kib());

    // Slowloris: 60 connections from one address, each dripping a request head. 20
    // are let in and cut off by the 2 s header timeout; 40 are closed at accept.
    let slow = ip("127.0.0.3");
    let until = Instant::now() + Duration::from_secs(8);
    let mut drips = Vec::new();
    for _ in 0..60 {
        let s = common::tcp_from(slow, v.addr).await;
        drips.push(tokio::spawn(drip(s, Duration::from_millis(300), until)));
    }
    // An upgrade flood from another address: 300 bad tokens at once. The first ten
    // are refused as invalid, the rest unheard (429).
    let flooder = ip("127.0.0.4");
    let mut flood = Vec::new();
    for i in 0..300 {
        let addr = v.addr;
        flood.push(tokio::spawn(async move {
            let mut s = common::tcp_from(flooder, addr).await;
            let req = format!(
                "GET /websockify?token=flood{i} HTTP/1.1\r\nHost: vizor\r\n\
                 Upgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            );
            // Closed at accept (the per-client connection limit): status 0.
            let mut resp = Vec::new();
            if s.write_all(req.as_bytes()).await.is_err() || s.read_to_end(&mut resp).await.is_err()
            {
                return 0u16;
            }
            let text = String::from_utf8_lossy(&resp);
            text.split(' ')
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or(0)
        }));
    }
    // Meanwhile a real session works from start to a full frame.
    let (mut b, si) = open_session(&v, &live.name).await;
    let (pixels, frame) = full_update(&mut b, &si).await;
    assert_eq!(pixels, frame);

    let started = Instant::now();
    let mut closed = 0;
    for d in drips {
        if d.await.unwrap() {
            closed += 1;
        }
    }
    assert_eq!(closed, 60, "every slow connection was closed");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "before the drip ended"
    );
    let mut statuses = std::collections::BTreeMap::new();
    for f in flood {
        *statuses.entry(f.await.unwrap()).or_insert(0) += 1;
    }
    // Upgraded and closed for its bad token, refused unheard, or closed at accept:
    // how many of each depends on timing, but the throttle did engage.
    assert!(
        statuses.keys().all(|s| [0, 101, 429].contains(s)),
        "{statuses:?}"
    );
    assert!(statuses.get(&429).copied().unwrap_or(0) > 0, "{statuses:?}");
    let m = v.metrics().await;
    let refused = common::metric(
        &m,
        "vizor_connections_refused_total{reason=\"max_connections_per_client\"}",
    )
    .unwrap();
    assert!(refused >= 40.0, "{refused}");
    // The session is still served, and vizor holds what it held before.
    full_update(&mut b, &si).await;
    drop(b);
    v.records("session_end", 2);
    let deadline = Instant::now() + Duration::from_secs(5);
    while v.open_fds() > fds_before && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        v.open_fds() <= fds_before,
        "fds {} > {fds_before}",
        v.open_fds()
    );
    let rss = v.rss_kib();
    assert!(
        rss < rss_before + 32 * 1024,
        "RSS grew from {rss_before} KiB to {rss} KiB"
    );
}
