//! Faults of the real parts under a live session: QEMU killed, the domain shut off,
//! libvirtd restarted, the network to QEMU stalled. Each time the browser gets a clean close with a reason, the
//! audit log the session's end, the metrics the outcome, and a new session works as
//! soon as the VM is back, with no restart of vizor. The tests run one at a time: a
//! libvirtd restart would fail the others' lookups.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a panic is a failure

mod common;

use common::rfb::{full_update, msg, open_session, rfb_handshake};
use common::{Browser, Vizor};
use std::time::Duration;
use vizor::token::ConsoleKind;

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn qemu_pid(domain: &str) -> i32 {
    std::fs::read_to_string(format!("/run/libvirt/qemu/{domain}.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// A live session on `domain`; then `fault`; then what the browser, the audit log and
/// the metrics say.
async fn session_through(v: &Vizor, domain: &str, fault: impl FnOnce()) {
    let (mut b, si) = open_session(v, domain).await;
    full_update(&mut b, &si).await;
    fault();
    let closed = tokio::time::timeout(Duration::from_secs(10), b.closed())
        .await
        .expect("the browser is told");
    assert_eq!(
        (closed.code, closed.reason.as_str()),
        (1000, "the VM closed the console connection")
    );
    let end = v.records("session_end", 1).remove(0);
    assert_eq!(end["reason"], "the VM closed the console connection");
    assert!(end["bytes_vm_to_browser"].as_u64().unwrap() > 0);
    v.wait_for_metric(
        "vizor_sessions_total{kind=\"vnc\",outcome=\"vm_closed\"}",
        1.0,
    )
    .await;
}

/// Until the VM is back, a new session is refused as not running; after, it works.
async fn refused_then_back(v: &Vizor, domain: &str) {
    let token = v.token(domain, ConsoleKind::Vnc, 60);
    let mut b = Browser::connect(v.addr, &format!("/websockify?token={token}")).await;
    let closed = b.closed().await;
    assert_eq!(
        (closed.code, closed.reason.as_str()),
        (1011, "the VM is not running")
    );
    common::virsh(&["start", domain]);
    let (mut b, si) = open_session(v, domain).await;
    let (pixels, frame) = full_update(&mut b, &si).await;
    assert_eq!(pixels, frame);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn qemu_killed_mid_session() {
    common::live_domain();
    let _one = ONE_AT_A_TIME.lock().await;
    let d = "vizor-test-fkill";
    common::test_host(&["domain", d, "--vnc-passwd", "kill1", "--no-spice"]);
    let v = Vizor::start("");
    session_through(&v, d, || {
        let pid = qemu_pid(d);
        let ok = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    })
    .await;
    // libvirt notices the dead QEMU and marks the domain shut off (until then its live
    // XML names no console, which a lookup reports as such): wait for that.
    let mut state = String::new();
    for _ in 0..100 {
        state = common::virsh(&["domstate", d]);
        if state.trim() == "shut off" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        state.trim(),
        "shut off",
        "libvirt did not notice the dead QEMU"
    );
    refused_then_back(&v, d).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn domain_shut_off_mid_session() {
    common::live_domain();
    let _one = ONE_AT_A_TIME.lock().await;
    let d = "vizor-test-foff";
    common::test_host(&["domain", d, "--vnc-passwd", "off1", "--no-spice"]);
    let v = Vizor::start("");
    session_through(&v, d, || {
        common::virsh(&["destroy", d]);
    })
    .await;
    refused_then_back(&v, d).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn libvirtd_restarted_mid_session() {
    let live = common::live_domain();
    let _one = ONE_AT_A_TIME.lock().await;
    let v = Vizor::start("");
    // A lookup first, so vizor holds a libvirt connection that the restart breaks.
    let (mut b, si) = open_session(&v, &live.name).await;
    full_update(&mut b, &si).await;
    common::test_host(&["restart-libvirtd"]);
    // The live session does not need libvirt: it goes on.
    full_update(&mut b, &si).await;
    // A new one reconnects to libvirt by itself.
    let token = v.token(&live.name, ConsoleKind::Vnc, 60);
    let mut b2 = Browser::connect(v.addr, &format!("/websockify?token={token}")).await;
    let si2 = rfb_handshake(&mut b2)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", v.log.lock().unwrap()));
    full_update(&mut b2, &si2).await;
    assert!(v.audit().iter().all(|r| r["event"] != "upstream_failure"));
}

/// Lets packets through again when the test ends, passed or not.
struct Unstall;

impl Drop for Unstall {
    fn drop(&mut self) {
        common::test_host(&["unstall-port"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn the_network_to_qemu_stalls_mid_session() {
    common::live_domain();
    let _one = ONE_AT_A_TIME.lock().await;
    let d = "vizor-test-fstall";
    let out = common::test_host(&["domain", d, "--vnc-passwd", "stall1", "--no-spice"]);
    let port = out.trim().rsplit('=').next().unwrap().to_owned();
    let v = Vizor::start_with("", "[limits]\nvm_stall_timeout = \"3s\"\n", |_| {});
    // One browser keeps sending (the data to QEMU goes unacknowledged), the other is
    // quiet (only keepalive probes go unanswered): both must be told.
    let (mut busy, si) = open_session(&v, d).await;
    full_update(&mut busy, &si).await;
    let (mut quiet, si_quiet) = open_session(&v, d).await;
    full_update(&mut quiet, &si_quiet).await;
    let _unstall = Unstall;
    common::test_host(&["stall-port", &port]);
    let stalled = std::time::Instant::now();
    let pointer = msg(vizor_rfb::client::ClientMessage::PointerEvent {
        buttons: 0,
        x: 5,
        y: 5,
    });
    let busy_closed = async {
        loop {
            busy.send(&pointer).await;
            if let Ok(Err(c)) = tokio::time::timeout(Duration::from_millis(200), busy.read()).await
            {
                return c;
            }
        }
    };
    let within = Duration::from_secs(15);
    let (busy_closed, quiet_closed) =
        tokio::time::timeout(within, async { tokio::join!(busy_closed, quiet.closed()) })
            .await
            .unwrap_or_else(|_| panic!("no close within {within:?}\n{}", v.log.lock().unwrap()));
    let took = stalled.elapsed();
    for c in [&busy_closed, &quiet_closed] {
        assert_eq!(
            (c.code, c.reason.as_str()),
            (1011, "the network to the VM console stalled")
        );
    }
    assert!(
        took >= Duration::from_secs(2),
        "told after {took:?}: too soon to be the stall timeout"
    );
    let ends = v.records("session_end", 2);
    assert!(
        ends.iter()
            .all(|e| e["reason"] == "the network to the VM console stalled"),
        "{ends:?}"
    );
    let failures = v.records("upstream_failure", 2);
    assert!(
        failures.iter().all(|f| f["reason"] == "upstream_stalled"),
        "{failures:?}"
    );
    v.wait_for_metric(
        "vizor_sessions_total{kind=\"vnc\",outcome=\"upstream_stalled\"}",
        2.0,
    )
    .await;
    // Once the network carries packets again, a new session works.
    drop(_unstall);
    let (mut b, si) = open_session(&v, d).await;
    let (pixels, frame) = full_update(&mut b, &si).await;
    assert_eq!(pixels, frame);
}
