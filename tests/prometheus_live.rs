//! vizor's metrics in a real Prometheus (Debian's `prometheus`), fed by real VNC and
//! SPICE sessions to real QEMU through vizor; then every query of the Grafana
//! dashboard (`grafana/vizor.json`) is run against that Prometheus.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a panic is a failure

mod common;

use common::rfb::{full_update, msg, open_session, update_request};
use common::spice::{answer_pings, domain, session};
use common::{metric_names, Browser, Vizor};
use serde_json::Value;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use vizor::token::ConsoleKind;
use vizor_rfb::client::ClientMessage;

const PROMETHEUS: &str = "/usr/bin/prometheus";

/// A Prometheus server of its own, scraping one vizor every second.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Prometheus {
    async fn start(target: SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: vizor\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", common::free_port())
            .parse()
            .unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(PROMETHEUS)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let p = Prometheus { child, addr, dir };
        for _ in 0..300 {
            if p.get("/-/ready").await.0 == 200 {
                return p;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("prometheus did not become ready:\n{}", p.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// An HTTP/1.0 GET (no chunked encoding to undo): status and body.
    async fn get(&self, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(mut s) = tokio::net::TcpStream::connect(self.addr).await else {
            return (0, String::new());
        };
        let req = format!("GET {path} HTTP/1.0\r\nHost: {}\r\n\r\n", self.addr);
        s.write_all(req.as_bytes()).await.unwrap();
        let mut resp = Vec::new();
        let _ = s.read_to_end(&mut resp).await;
        let text = String::from_utf8_lossy(&resp).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head.split(' ').nth(1).unwrap_or("0").parse().unwrap_or(0);
        (status, body.to_owned())
    }

    /// An instant query: the result vector, or Prometheus's error.
    async fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let (_, body) = self
            .get(&format!("/api/v1/query?query={}", encode(expr)))
            .await;
        let v: Value =
            serde_json::from_str(&body).map_err(|e| format!("not JSON ({e}): {body}"))?;
        if v["status"] != "success" {
            return Err(format!("{}: {}", v["errorType"], v["error"]));
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// Waits (up to 30 s) until `expr` returns data.
    async fn wait_for(&self, expr: &str) -> Vec<Value> {
        for _ in 0..150 {
            match self.query(expr).await {
                Ok(r) if !r.is_empty() => return r,
                Ok(_) => {}
                Err(e) => panic!("{expr}: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("no data for {expr} within 30 s")
    }
}

/// The value of each series of a result.
fn values(result: &[Value]) -> Vec<f64> {
    result
        .iter()
        .map(|r| r["value"][1].as_str().unwrap().parse().unwrap())
        .collect()
}

/// Every panel query of the dashboard, with Grafana's variables given values that
/// cover this test: all instances, and a one-minute rate window.
fn dashboard_queries() -> Vec<(String, String)> {
    let d: Value =
        serde_json::from_str(&std::fs::read_to_string(common::DASHBOARD).unwrap()).unwrap();
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "1m")
                .replace("$instance", ".*");
            assert!(!expr.contains('$'), "an unknown variable in {expr}");
            out.push((p["title"].as_str().unwrap().to_owned(), expr));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn metrics_and_every_dashboard_query_work_in_a_real_prometheus() {
    let live = common::live_domain();
    assert!(
        std::path::Path::new(PROMETHEUS).exists(),
        "{PROMETHEUS} is missing: scripts/test.sh installs Debian's prometheus"
    );
    let spice_domain = domain("vizor-test-prom");
    let metrics_addr: SocketAddr = format!("127.0.0.1:{}", common::free_port())
        .parse()
        .unwrap();
    let v = Vizor::start_with(
        &format!("metrics_listen = \"{metrics_addr}\"\nping_interval = \"200ms\""),
        "[metrics]\nper_session = true",
        |_| {},
    );
    let prom = Prometheus::start(metrics_addr).await;
    prom.wait_for("up{job=\"vizor\"} == 1").await;

    // A refused token, a domain libvirt does not know, and a protocol error: the
    // failure panels then have series of their own.
    let expired = v.token(&live.name, ConsoleKind::Vnc, -5);
    let mut b = Browser::connect(v.addr, &format!("/websockify?token={expired}")).await;
    assert_eq!(b.closed().await.code, 1008);
    let unknown = v.token("vizor-test-no-such-domain", ConsoleKind::Vnc, 60);
    let mut b = Browser::connect(v.addr, &format!("/websockify?token={unknown}")).await;
    assert_eq!(b.closed().await.code, 1011);
    let (mut b, _) = open_session(&v, &live.name).await;
    b.send(&[0xEE, 0, 0, 0]).await; // no such client message type
    let closed = b.closed().await;
    assert_ne!(closed.code, 1000, "{}", closed.reason);
    v.wait_for_audit("session_end");

    // A VNC session with input and a SPICE session answering spice-server's pings,
    // both live over several scrapes.
    let (mut b, si) = open_session(&v, &live.name).await;
    full_update(&mut b, &si).await;
    let vnc = async {
        let until = tokio::time::Instant::now() + Duration::from_secs(5);
        while tokio::time::Instant::now() < until {
            for down in [true, false] {
                b.send(&msg(ClientMessage::KeyEvent {
                    down,
                    keysym: 0xffe1, // Shift: nothing happens in SeaBIOS
                }))
                .await;
            }
            b.send(&update_request(16, 16)).await;
            let _ = tokio::time::timeout(Duration::from_millis(250), b.read()).await;
        }
    };
    let token = v.token(spice_domain, ConsoleKind::Spice, 60);
    let (mut main, _, kind) = session(&v, &token, true).await;
    let spice = answer_pings(&mut main, kind, Duration::from_secs(5));
    let ((), pings) = tokio::join!(vnc, spice);
    assert!(pings > 0, "spice-server pings the main channel");
    // Prometheus has the sessions, each with its own series.
    for kind in ["vnc", "spice"] {
        prom.wait_for(&format!("vizor_per_session_info{{kind=\"{kind}\"}}"))
            .await;
        for series in [
            format!("vizor_session_bytes_total{{kind=\"{kind}\",direction=\"vm_to_browser\"}}"),
            format!("vizor_session_bytes_total{{kind=\"{kind}\",direction=\"browser_to_vm\"}}"),
            format!("vizor_frame_latency_seconds_count{{kind=\"{kind}\"}}"),
            format!("vizor_frame_latency_seconds_sum{{kind=\"{kind}\"}}"),
            format!("vizor_client_rtt_seconds_count{{kind=\"{kind}\"}}"),
            format!("vizor_handshake_seconds_count{{kind=\"{kind}\"}}"),
        ] {
            let r = prom.wait_for(&format!("{series} > 0")).await;
            assert!(values(&r).iter().all(|x| *x > 0.0), "{series}: {r:?}");
        }
    }
    prom.wait_for("vizor_input_to_display_seconds_count{kind=\"vnc\"} > 0")
        .await;
    prom.wait_for("vizor_per_session_bytes_total{direction=\"vm_to_browser\"} > 0")
        .await;
    prom.wait_for("vizor_per_session_frame_latency_seconds{quantile=\"0.99\"} > 0")
        .await;

    // Every dashboard query parses and returns data, or reads counters that exist
    // (a rate over a counter that has not moved in the window is still data).
    let mut report = Vec::new();
    let mut with_data = 0;
    for (panel, expr) in dashboard_queries() {
        let result = prom
            .query(&expr)
            .await
            .unwrap_or_else(|e| panic!("panel {panel:?}: {expr}: {e}"));
        if result.is_empty() {
            for name in metric_names(&expr) {
                let exists = prom.query(&format!("count({name})")).await.unwrap();
                assert!(
                    !exists.is_empty(),
                    "panel {panel:?}: {expr} returns nothing and {name} does not exist"
                );
            }
        } else {
            with_data += 1;
        }
        report.push(format!("{} series  {panel}: {expr}", result.len()));
    }
    eprintln!("{}", report.join("\n"));
    assert_eq!(
        with_data,
        report.len(),
        "every dashboard query has data in this test:\n{}",
        report.join("\n")
    );
    // The dashboard's instance variable finds this vizor.
    let (_, body) = prom
        .get(&format!(
            "/api/v1/label/instance/values?{}",
            encode_pair("match[]", "vizor_sessions_active")
        ))
        .await;
    assert!(body.contains(&metrics_addr.to_string()), "{body}");

    // Ended sessions take their per-session series with them.
    drop(b);
    drop(main);
    for _ in 0..100 {
        if per_session_infos(metrics_addr).await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut gone = false;
    for _ in 0..100 {
        if prom
            .query("vizor_per_session_info")
            .await
            .unwrap()
            .is_empty()
        {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        gone,
        "per-session series still in Prometheus after the sessions ended"
    );
    assert!(prom
        .query("vizor_per_session_bytes_total")
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        values(&prom.wait_for("vizor_per_session_omitted").await),
        [0.0]
    );
    assert!(!prom.log().contains("level=error"), "{}", prom.log());
}

fn encode_pair(k: &str, v: &str) -> String {
    format!("{}={}", encode(k), encode(v))
}

/// How many sessions have per-session series on vizor's metrics listener now.
async fn per_session_infos(addr: SocketAddr) -> usize {
    let (_, _, text) = common::http_get(addr, "/metrics", &[]).await;
    text.lines()
        .filter(|l| l.starts_with("vizor_per_session_info{"))
        .count()
}
