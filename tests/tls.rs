//! TLS toward browsers: `wss://` consoles to real QEMU with a certificate from the
//! config, reloaded on SIGHUP while a console session on the old one goes on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::rfb::{full_update, rfb_handshake, update_request};
use common::{tls, Browser, Vizor};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vizor::token::ConsoleKind;

fn tls_vizor(cert: &str, key: &str) -> Vizor {
    let (cert, key) = (cert.to_owned(), key.to_owned());
    Vizor::start_full(
        // Small messages: over TLS nothing is spliced, and what is relayed is cut to
        // this size without a copy.
        "tls_cert = \"tls.crt\"\ntls_key = \"tls.key\"\nws_message_size = \"4KiB\"",
        "",
        "",
        move |dir| tls::write(dir, &cert, &key),
    )
}

async fn healthz(v: &Vizor, trusted: &[u8]) -> std::io::Result<String> {
    let mut s = tls::connect(v.addr, trusted).await?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

/// Plain HTTP to the TLS listener: a 400 that says to use https, and nothing served.
async fn assert_plain_http_is_told_to_use_https(v: &Vizor) {
    let mut plain = tokio::net::TcpStream::connect(v.addr).await.unwrap();
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let _ = plain.read_to_end(&mut got).await;
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{got:?}");
    assert!(
        got.ends_with("use https:// (and wss:// for WebSockets).\n"),
        "{got:?}"
    );
    assert!(!got.contains("ok\n"), "{got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn a_wss_console_survives_a_certificate_reload() {
    let live = common::live_domain();
    let (cert_a, key_a, der_a) = tls::certificate();
    let (cert_b, key_b, der_b) = tls::certificate();
    let v = tls_vizor(&cert_a, &key_a);
    assert!(healthz(&v, &der_a).await.unwrap().ends_with("ok\n"));
    assert_plain_http_is_told_to_use_https(&v).await;

    // A console over wss to the real VM.
    let token = v.token(&live.name, ConsoleKind::Vnc, 60);
    let stream = tls::connect(v.addr, &der_a).await.unwrap();
    let mut b = Browser::connect_over(stream, v.addr, &format!("/websockify?token={token}")).await;
    let si = rfb_handshake(&mut b).await.unwrap();
    let (pixels, _) = full_update(&mut b, &si).await;
    assert!(pixels > 64 << 10, "{pixels} bytes of pixels");
    assert!(b.largest <= 4 << 10, "a message of {} bytes", b.largest);

    // New certificate files and SIGHUP: new connections get B, A is no longer served.
    tls::write(&v.path(), &cert_b, &key_b);
    v.signal("HUP");
    assert!(v.wait_for_log("TLS certificate reloaded"));
    assert!(healthz(&v, &der_b).await.unwrap().ends_with("ok\n"));
    assert!(healthz(&v, &der_a).await.is_err());

    // The session opened on A goes on.
    b.send(&update_request(si.width, si.height)).await;
    let before = b.received.len();
    while b.received.len() == before {
        b.read().await.expect("the session outlives the reload");
    }

    // A reload that cannot read the key keeps B.
    std::fs::write(v.path().join("tls.key"), "not a key").unwrap();
    v.signal("HUP");
    assert!(v.wait_for_log("TLS reload failed; keeping the certificate in use"));
    assert!(healthz(&v, &der_b).await.unwrap().ends_with("ok\n"));
    drop(b);
    v.assert_never_logged(&key_b);
}

#[test]
fn tls_settings_are_checked_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, _) = tls::certificate();
    tls::write(dir.path(), &cert, &key);
    vizor::token::TokenKey::write_new(&dir.path().join("token.key")).unwrap();
    vizor::token::TokenKey::write_new(&dir.path().join("audit.key")).unwrap();
    let run = |server: &str| {
        let config = dir.path().join("vizor.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\n{server}\n[libvirt]\nuri = \"test:///default\"\n\
                 [tokens]\nkey_file = \"token.key\"\n[audit]\npath = \"audit.jsonl\"\nkey_file = \"audit.key\"\n"
            ),
        )
        .unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_vizor"))
            .args(["serve", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = run("tls_cert = \"tls.crt\"");
    assert!(e.contains("tls_cert and tls_key go together"), "{e}");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        dir.path().join("tls.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let e = run("tls_cert = \"tls.crt\"\ntls_key = \"tls.key\"");
    assert!(e.contains("readable by others"), "{e}");
    // [upstream_tls]: the same care for vizor's client key, and clear errors.
    let e = run("[upstream_tls]\nca = \"absent.pem\"");
    assert!(
        e.contains("[upstream_tls] ca") && e.contains("absent.pem"),
        "{e}"
    );
    let e = run("[upstream_tls]\nca = \"tls.crt\"\nclient_cert = \"tls.crt\"");
    assert!(e.contains("client_cert and client_key go together"), "{e}");
    let e = run(
        "[upstream_tls]\nca = \"tls.crt\"\nclient_cert = \"tls.crt\"\nclient_key = \"tls.key\"",
    );
    assert!(
        e.contains("[upstream_tls] client_key") && e.contains("readable by others"),
        "{e}"
    );
    let e = run("[upstream_tls]\nca = \"tls.crt\"\nserver_name = \"not a name!\"");
    assert!(e.contains("server_name"), "{e}");
    std::fs::write(dir.path().join("tls.crt"), "no certificate here\n").unwrap();
    let e = run("tls_cert = \"tls.crt\"\ntls_key = \"tls.key\"");
    assert!(e.contains("no PEM certificate"), "{e}");
    assert!(!e.contains("PRIVATE KEY"), "{e}");
}

/// How long until vizor closes a connection that sent `sent` and then nothing.
async fn closed_after(v: &Vizor, sent: &[u8]) -> std::time::Duration {
    let mut s = tokio::net::TcpStream::connect(v.addr).await.unwrap();
    s.write_all(sent).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 1024];
    let read_until_closed = async {
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), read_until_closed)
        .await
        .expect("vizor closed the connection");
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stalls_its_tls_handshake_is_cut_off() {
    let (cert, key, der) = tls::certificate();
    let v = Vizor::start_full(
        "tls_cert = \"tls.crt\"\ntls_key = \"tls.key\"\nhandshake_timeout = \"1s\"",
        "",
        "",
        move |dir| tls::write(dir, &cert, &key),
    );
    // Silent from the start, or stalled halfway through a ClientHello record.
    for sent in [&b""[..], &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]] {
        let waited = closed_after(&v, sent).await;
        assert!(
            waited >= std::time::Duration::from_millis(900),
            "{sent:?}: {waited:?}"
        );
    }
    // Others are served meanwhile and after.
    assert!(healthz(&v, &der).await.unwrap().ends_with("ok\n"));
    assert_plain_http_is_told_to_use_https(&v).await;
}
