//! Cross-site WebSocket hijacking: a page of a foreign origin cannot open a console,
//! even with a good token. No VM is needed: the origin is checked before the token.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Vizor;
use std::io::{Read, Write};
use vizor::token::ConsoleKind;

/// Sends a WebSocket upgrade for `/websockify?token=` with `origin`; the status code.
fn upgrade(v: &Vizor, token: &str, origin: Option<&str>) -> u16 {
    let mut s = std::net::TcpStream::connect(v.addr).unwrap();
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
    for (origin, status) in [
        (Some("http://evil.example"), 403),
        (Some("null"), 403),
        (Some("https://cloud.example.com.evil.example"), 403),
        (Some(own.as_str()), 101),
        (Some("https://cloud.example.com"), 101),
        (Some("HTTPS://CLOUD.EXAMPLE.COM"), 101),
        (None, 101),
    ] {
        assert_eq!(upgrade(&v, &token(&v), origin), status, "{origin:?}");
    }
    // Refused before the token is read: the foreign page's token is still good.
    let kept = token(&v);
    assert_eq!(upgrade(&v, &kept, Some("http://evil.example")), 403);
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
    assert_eq!(upgrade(&v, &kept, None), 101);
    let metrics = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(v.metrics());
    assert_eq!(
        common::metric(
            &metrics,
            "vizor_auth_refusals_total{reason=\"origin_not_allowed\",stage=\"origin\"}"
        ),
        Some(4.0)
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
