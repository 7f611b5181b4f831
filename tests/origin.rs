//! Cross-site WebSocket hijacking: a page of a foreign origin cannot open a console,
//! even with a good token. No VM is needed: the origin is checked before the token.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Vizor;
use std::io::{Read, Write};
use vizor::token::ConsoleKind;

/// Sends a WebSocket upgrade for `/websockify?token=` with `origin` from 127.0.0.`src`;
/// the status code. (Refusals are recorded once per client and reason per interval:
/// each case comes from its own address.)
fn upgrade(v: &Vizor, token: &str, origin: Option<&str>, src: u8) -> u16 {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let s = rt.block_on(common::tcp_from(
        std::net::IpAddr::from([127, 0, 0, src]),
        v.addr,
    ));
    let mut s = s.into_std().unwrap();
    s.set_nonblocking(false).unwrap();
    let origin = origin
        .map(|o| format!("Origin: {o}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET /websockify?token={token} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n{origin}\r\n",
        v.addr
    )
    .unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    std::str::from_utf8(&head[9..12]).unwrap().parse().unwrap()
}

#[test]
fn only_vizors_own_and_listed_origins_may_open_consoles() {
    let v = Vizor::start_uri(
        "test:///default",
        "allowed_origins = [\"https://Cloud.example.com\"]",
        "",
        "",
        |_| {},
    );
    let token = |v: &Vizor| v.token("test", ConsoleKind::Vnc, 60);
    let own = format!("http://{}", v.addr);
    for (i, (origin, status)) in [
        (Some("http://evil.example"), 403),
        (Some("null"), 403),
        (Some("https://cloud.example.com.evil.example"), 403),
        (Some(own.as_str()), 101),
        (Some("https://cloud.example.com"), 101),
        (Some("HTTPS://CLOUD.EXAMPLE.COM"), 101),
        (None, 101),
    ]
    .into_iter()
    .enumerate()
    {
        let src = 10 + i as u8;
        assert_eq!(upgrade(&v, &token(&v), origin, src), status, "{origin:?}");
    }
    // Refused before the token is read: the foreign page's token is still good.
    let kept = token(&v);
    assert_eq!(upgrade(&v, &kept, Some("http://evil.example"), 50), 403);
    let audit = v.wait_for_records("origin_refused", 4);
    let refused: Vec<&str> = audit
        .iter()
        .filter(|r| r["event"] == "origin_refused")
        .map(|r| r["origin"].as_str().unwrap())
        .collect();
    assert_eq!(
        refused,
        [
            "http://evil.example",
            "null",
            "https://cloud.example.com.evil.example",
            "http://evil.example"
        ]
    );
    assert!(!audit
        .iter()
        .any(|r| r["event"] == "token_refused" && r["token_id"].is_string()));
    assert_eq!(upgrade(&v, &kept, None, 51), 101);
    // More from one address: recorded once, the rest counted for its summary.
    for _ in 0..3 {
        assert_eq!(
            upgrade(&v, &token(&v), Some("http://evil.example"), 60),
            403
        );
    }
    let metrics = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(v.metrics());
    assert_eq!(
        common::metric(
            &metrics,
            "vizor_auth_refusals_total{reason=\"origin_not_allowed\",stage=\"origin\"}"
        ),
        Some(7.0)
    );
    assert_eq!(
        v.audit()
            .iter()
            .filter(|r| r["event"] == "origin_refused")
            .count(),
        5
    );
}

#[test]
fn an_allowed_origin_must_be_an_origin() {
    for bad in [
        "cloud.example.com",
        "https://cloud.example.com/console",
        "ftp://x",
    ] {
        let e = vizor::config::Config::parse(&format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nallowed_origins = [\"{bad}\"]\n\
             [libvirt]\nuri = \"test:///default\"\n[tokens]\nkey_file = \"k\"\n\
             [audit]\npath = \"a\"\nkey_file = \"ak\"\n"
        ))
        .unwrap_err();
        assert!(e.contains("allowed_origins") && e.contains(bad), "{e}");
    }
}
