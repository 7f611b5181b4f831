//! vizor behind a real nginx running the README's example (packaging/nginx/vizor.conf),
//! TLS at nginx: the console page and a VNC console through it, the page's Origin
//! checked against the Host nginx passes on, and the client on record the one nginx
//! saw, not nginx.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a panic is a failure

mod common;

use common::rfb::{full_update, rfb_handshake};
use common::{tcp_from, tls, Browser, Vizor};
use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, Stdio};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vizor::token::ConsoleKind;

/// An nginx process, stopped when dropped.
struct Nginx(Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers (SIGKILL would orphan them).
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

/// nginx in `dir` on the example configuration, listening on 127.0.0.1:`port` with
/// `cert`/`key`, in front of vizor at `upstream`.
fn start_nginx(
    dir: &std::path::Path,
    port: u16,
    upstream: SocketAddr,
    cert: &str,
    key: &str,
) -> Nginx {
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/packaging/nginx/vizor.conf"
    ))
    .unwrap();
    std::fs::write(dir.join("tls.crt"), cert).unwrap();
    std::fs::write(dir.join("tls.key"), key).unwrap();
    // Only what must differ on a test machine: the addresses and the certificate.
    let site = example
        .replace("server 127.0.0.1:6080;", &format!("server {upstream};"))
        .replace("listen 443 ssl;", &format!("listen 127.0.0.1:{port} ssl;"))
        .replace(
            "/etc/ssl/certs/console.example.com.pem",
            dir.join("tls.crt").to_str().unwrap(),
        )
        .replace(
            "/etc/ssl/private/console.example.com.key",
            dir.join("tls.key").to_str().unwrap(),
        );
    assert_ne!(site, example);
    std::fs::write(dir.join("vizor.conf"), site).unwrap();
    let d = dir.display();
    std::fs::write(
        dir.join("nginx.conf"),
        format!(
            "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
               include {d}/vizor.conf;\n}}\n"
        ),
    )
    .unwrap();
    let child = Command::new("nginx")
        .args(["-p", dir.to_str().unwrap(), "-c"])
        .arg(dir.join("nginx.conf"))
        .args(["-g", "daemon off;"])
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run nginx (scripts/test.sh installs it)");
    let nginx = Nginx(child);
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return nginx;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!(
        "nginx did not listen: {}",
        std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
    );
}

/// The status line of a WebSocket upgrade to `path` through nginx from `origin`.
async fn upgrade_status(addr: SocketAddr, der: &[u8], path: &str, origin: &str) -> String {
    let mut s = tls::connect(addr, der).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Origin: {origin}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn consoles_work_through_nginx_and_the_audit_names_the_real_client() {
    let live = common::live_domain();
    let novnc = concat!(env!("CARGO_MANIFEST_DIR"), "/web/node_modules/@novnc/novnc");
    let v = Vizor::start_with(
        "trusted_proxies = [\"127.0.0.1/32\"]",
        &format!("[console]\nnovnc = \"{novnc}\"\n"),
        |_| {},
    );
    let (cert, key, der) = tls::certificate();
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let _nginx = start_nginx(dir.path(), port, v.addr, &cert, &key);
    let public: SocketAddr = ([127, 0, 0, 1], port).into();
    let page_origin = format!("https://{public}");

    // The console page, over https from nginx.
    let token = v.token(&live.name, ConsoleKind::Vnc, 60);
    let mut s = tls::connect(public, &der).await.unwrap();
    s.write_all(
        format!(
            "GET /console?token={token} HTTP/1.1\r\nHost: {public}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut page = String::new();
    s.read_to_string(&mut page).await.unwrap();
    assert!(page.starts_with("HTTP/1.1 200"), "{page:.300}");
    assert!(page.contains("data-client=\"novnc\""), "{page:.300}");

    // Another site's page may not open a console through nginx either.
    let refused = upgrade_status(
        public,
        &der,
        &format!("/websockify?token={token}"),
        "https://elsewhere.example",
    )
    .await;
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");

    // The console itself, from 127.0.0.9 with the page's origin, over wss.
    let client: IpAddr = [127, 0, 0, 9].into();
    let tcp = tcp_from(client, public).await;
    let stream = tls::connect_over(tcp, public, &der).await.unwrap();
    let mut b = Browser::connect_with(
        stream,
        public,
        &format!("/websockify?token={token}"),
        &[("Origin", &page_origin)],
    )
    .await;
    let si = rfb_handshake(&mut b).await.unwrap();
    let (pixels, frame) = full_update(&mut b, &si).await;
    assert_eq!(pixels, frame, "a complete frame through nginx");
    drop(b);

    // On record: the browser's address as nginx saw it, not nginx's.
    let start = &v.records("session_start", 1)[0];
    assert!(
        start["client"].as_str().unwrap().starts_with("127.0.0.9:"),
        "{start}"
    );
    let refusal = &v.records("origin_refused", 1)[0];
    assert_eq!(refusal["origin"], "https://elsewhere.example");
}
