//! Behind a reverse proxy: the client is the one its trusted proxy names, for limits,
//! token binding and audit; anyone else's forwarding headers are ignored. No VM is
//! needed: everything here happens before a console is looked up.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a panic is a failure

mod common;

use common::{http_get_over, tcp_from, Vizor};
use std::net::IpAddr;
use vizor::token::ConsoleKind;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// `GET path` from 127.0.0.`src` with `X-Forwarded-For: xff` (when given).
async fn get(v: &Vizor, src: u8, xff: Option<&str>, path: &str) -> (u16, String) {
    let headers: Vec<(&str, &str)> = xff.map(|x| ("X-Forwarded-For", x)).into_iter().collect();
    let s = tcp_from(IpAddr::from([127, 0, 0, src]), v.addr).await;
    let (status, _, body) = http_get_over(s, v.addr, path, &headers).await;
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_binding_and_audit_follow_the_client_a_trusted_proxy_names() {
    let v = Vizor::start_uri(
        "test:///default",
        "trusted_proxies = [\"127.0.0.1/32\"]",
        "refusal_summary_interval = \"1h\"",
        "[limits]\nfailed_tokens_per_client = 3\nmax_connections_per_client = 2\n",
        |_| {},
    );
    let bad = "/console?token=not-a-token";
    // Three bad links from one client behind the proxy use up its allowance...
    for _ in 0..3 {
        assert_eq!(get(&v, 1, Some("203.0.113.7"), bad).await.0, 403);
    }
    assert_eq!(get(&v, 1, Some("203.0.113.7"), bad).await.0, 429);
    // ...and only its own: other clients of the same proxy are heard.
    assert_eq!(get(&v, 1, Some("203.0.113.8"), bad).await.0, 403);
    // A client that sends its own X-Forwarded-For to look like someone else: the
    // proxy appends the real address on the right, which is what counts.
    assert_eq!(
        get(&v, 1, Some("203.0.113.7, 203.0.113.9"), bad).await.0,
        403
    );
    // Not from the proxy: the header is ignored, the TCP peer is the client.
    assert_eq!(get(&v, 2, Some("203.0.113.8"), bad).await.0, 403);
    let audit = v.records("client_throttled", 1);
    assert_eq!(audit[0]["client"], "203.0.113.7");
    // One record per client (the rest counted for its summary).
    let clients: Vec<String> = v
        .records("token_refused", 4)
        .iter()
        .map(|r| {
            r["client"]
                .as_str()
                .unwrap()
                .split(':')
                .next()
                .unwrap()
                .to_owned()
        })
        .collect();
    for c in ["203.0.113.7", "203.0.113.8", "203.0.113.9", "127.0.0.2"] {
        assert!(clients.iter().any(|x| x == c), "{c} in {clients:?}");
    }
    assert!(!clients.iter().any(|x| x == "127.0.0.1"), "{clients:?}");

    // A token bound to a client admits it through the proxy, and no one else.
    let token = v.token_bound("test", ConsoleKind::Vnc, ip("203.0.113.20"));
    let page = format!("/console?token={token}");
    let (status, body) = get(&v, 1, Some("203.0.113.21"), &page).await;
    assert_eq!(status, 403);
    assert!(body.contains("for another computer"), "{body}");
    // Its client passes the binding: what stops it then is only that this vizor has
    // no noVNC configured.
    let (_, body) = get(&v, 1, Some("203.0.113.20"), &page).await;
    assert!(body.contains("serves no console page"), "{body}");

    // The proxy's connections are not capped per client (it carries many): more
    // than max_connections_per_client of them at once are all served.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(tcp_from(ip("127.0.0.1"), v.addr).await);
    }
    for s in held {
        let (status, _, _) = http_get_over(s, v.addr, "/healthz", &[]).await;
        assert_eq!(status, 200);
    }
}

#[test]
fn trusted_proxies_must_be_addresses_or_cidrs() {
    for bad in ["proxy.example", "10.0.0.0/33", "10.0.0.0/8/8"] {
        let e = vizor::config::Config::parse(&format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ntrusted_proxies = [\"{bad}\"]\n\
             [libvirt]\nuri = \"test:///default\"\n[tokens]\nkey_file = \"k\"\n\
             [audit]\npath = \"a\"\nkey_file = \"ak\"\n"
        ))
        .unwrap_err();
        assert!(e.contains("trusted_proxies") && e.contains(bad), "{e}");
    }
    let c = vizor::config::Config::parse(
        "[server]\nlisten = \"127.0.0.1:0\"\ntrusted_proxies = [\"10.1.2.3/8\", \"::1\"]\n\
         [libvirt]\nuri = \"test:///default\"\n[tokens]\nkey_file = \"k\"\n\
         [audit]\npath = \"a\"\nkey_file = \"ak\"\n",
    )
    .unwrap();
    let shown: Vec<String> = c
        .server
        .trusted_proxies
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(shown, ["10.0.0.0/8", "::1/128"]);
}
