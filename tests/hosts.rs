//! Many libvirt hosts through one vizor, against two real hosts: the test host's
//! libvirtd (`qemu:///system`) and a second, separate libvirtd with its own QEMU in its
//! own network and mount namespaces (`scripts/second-host.sh`), reached over
//! `qemu+tcp` at a veth address. Live: `#[ignore]`d, run by scripts/test.sh.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a panic is a failure

mod common;

use common::rfb::rfb_handshake;
use common::{http_get, live_domain, Browser, Vizor, ADMIN_API};
use std::time::{Duration, Instant};

const SECOND_URI: &str = "qemu+tcp://10.213.0.2/system";
const SECOND_PASSWORD: &str = "h2pw0rd";

/// Runs `scripts/second-host.sh` with `args`; its last stdout line.
fn second_host(args: &[&str]) -> String {
    if args.first() == Some(&"domain") {
        common::run::secret("second host's VNC password", SECOND_PASSWORD);
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/second-host.sh");
    let out = std::process::Command::new(script)
        .args(args)
        .output()
        .expect("run second-host.sh");
    assert!(
        out.status.success(),
        "second-host.sh {}: {}",
        args.first().unwrap_or(&""),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or("")
        .to_owned()
}

/// The second host serves one test at a time.
static SECOND_HOST: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A vizor in front of both hosts (`local` and `h2`), its allow-list the default:
/// loopback and libvirt's sockets for `local`, 10.213.0.2 for `h2`.
fn vizor() -> Vizor {
    let hosts = format!(
        "[[libvirt.hosts]]\nname = \"local\"\nuri = \"qemu:///system\"\n\
         [[libvirt.hosts]]\nname = \"h2\"\nuri = \"{SECOND_URI}\"\n"
    );
    Vizor::start_libvirt("", &hosts, ADMIN_API, common::write_admin_key)
}

/// Asks the console API for a token; the status and answer.
async fn console(v: &Vizor, domain: &str, query: &str) -> (u16, serde_json::Value) {
    v.api(
        "GET",
        &format!("/api/v1/domains/{domain}/console{query}"),
        "",
    )
    .await
}

/// Opens a VNC console with the API's answer `a` and runs the RFB handshake.
async fn open(v: &Vizor, a: &serde_json::Value) -> Browser {
    let mut b = Browser::connect(v.addr, a["ws_path"].as_str().unwrap()).await;
    rfb_handshake(&mut b).await.expect("RFB handshake");
    b
}

async fn host_state(v: &Vizor, name: &str) -> serde_json::Value {
    let (status, hosts) = v.api("GET", "/api/v1/hosts", "").await;
    assert_eq!(status, 200, "{hosts}");
    hosts["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no host {name} in {hosts}"))
}

#[tokio::test]
#[ignore = "live: needs the test host and scripts/second-host.sh (root); run by scripts/test.sh"]
async fn a_console_on_each_host_and_a_name_on_both_is_ambiguous() {
    let _one = SECOND_HOST.lock().await;
    let live = live_domain();
    second_host(&["start"]);
    // The second host has a domain of the same name as the test host's.
    let port = second_host(&["domain", &live.name, SECOND_PASSWORD]);
    assert!(port.starts_with("vnc_port="), "{port}");
    let v = vizor();

    let (status, a) = console(&v, &live.name, "").await;
    assert_eq!(status, 409, "{a}");
    assert_eq!(a["reason"], "ambiguous_domain");
    assert_eq!(a["hosts"], serde_json::json!(["local", "h2"]));

    // Named, each host's console opens, through its own QEMU.
    for (n, (host, upstream)) in [("h2", "10.213.0.2:"), ("local", "127.0.0.1:")]
        .into_iter()
        .enumerate()
    {
        let (status, a) = console(&v, &live.name, &format!("?host={host}")).await;
        assert_eq!(status, 200, "{a}");
        assert_eq!(a["host"], host);
        let mut b = open(&v, &a).await;
        let start = v.records("session_start", n + 1);
        let last = &start[n];
        assert!(
            last["upstream"].as_str().unwrap().starts_with(upstream),
            "{last}"
        );
        assert_eq!(last["host"], host, "{last}");
        b.close(1000, "done").await;
        let _ = b.closed().await;
        v.records("session_end", n + 1);
    }

    // A UUID is one domain on one host: no host needed.
    let uuid = common::virsh(&["domuuid", &live.name]).trim().to_owned();
    let (status, a) = console(&v, &uuid, "").await;
    assert_eq!((status, a["host"].as_str()), (200, Some("local")), "{a}");

    // A host that is not configured, and a domain on no host.
    let (status, a) = console(&v, &live.name, "?host=h3").await;
    assert_eq!(
        (status, a["reason"].as_str()),
        (404, Some("no_such_host")),
        "{a}"
    );
    let (status, a) = console(&v, "vizor-test-none", "").await;
    assert_eq!(
        (status, a["reason"].as_str()),
        (404, Some("no_such_domain")),
        "{a}"
    );

    // Both hosts answer, and say so.
    for name in ["local", "h2"] {
        let h = host_state(&v, name).await;
        assert_eq!(h["reachable"], true, "{h}");
        assert!(h["running_domains"].as_u64().unwrap() >= 1, "{h}");
    }
    let m = v.metrics().await;
    for name in ["local", "h2"] {
        assert_eq!(
            common::metric(&m, &format!("vizor_libvirt_up{{host=\"{name}\"}}")),
            Some(1.0)
        );
    }
    v.assert_never_logged(SECOND_PASSWORD);
    v.assert_never_logged(&live.vnc_password);
}

#[tokio::test]
#[ignore = "live: needs the test host and scripts/second-host.sh (root); run by scripts/test.sh"]
async fn a_second_host_that_hangs_or_dies_costs_the_first_nothing_and_comes_back() {
    let _one = SECOND_HOST.lock().await;
    let live = live_domain();
    second_host(&["start"]);
    second_host(&["domain", "vizor-test-h2", SECOND_PASSWORD]);
    let v = vizor();
    let (status, a) = console(&v, "vizor-test-h2", "").await;
    assert_eq!((status, a["host"].as_str()), (200, Some("h2")), "{a}");

    // The second libvirtd hangs (SIGSTOP): lookups on the first host do not wait
    // for it. Timed and printed, not asserted (shared machines are noisy).
    let pid = second_host(&["pid"]);
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {pid}");
    };
    // A few connections to the second host, so that the lookups below find one even
    // if the prober holds another when it hangs.
    let warm = (0..3).map(|_| console(&v, "vizor-test-h2", "?host=h2"));
    for (status, a) in futures_util::future::join_all(warm).await {
        assert_eq!(status, 200, "{a}");
    }
    signal("-STOP");
    // Lookups on the hung host give up at their bound, and libvirt's keepalive ends
    // the calls still waiting on its connections: no turn of the host stays taken
    // (without keepalive, a call waited until the host answered again), and a lookup
    // then fails at once. libvirt's words are in vizor's log. Meanwhile the first
    // host's lookups do not wait for it.
    let hung =
        futures_util::future::join_all((0..8).map(|_| console(&v, "vizor-test-h2", "?host=h2")));
    let first = async {
        let mut took = Vec::new();
        for _ in 0..5 {
            let since = Instant::now();
            let (status, a) = console(&v, &live.name, "?host=local").await;
            took.push(since.elapsed());
            assert_eq!(status, 200, "{a}");
            let mut b = open(&v, &a).await;
            b.close(1000, "done").await;
        }
        took
    };
    let (answers, took) = tokio::join!(hung, first);
    eprintln!("lookups on the first host while the second hangs: {took:?}");
    // The first host's tokens open while the second hangs, and vizor stays ready.
    let (status, _, body) = http_get(v.addr, "/readyz", &[]).await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    for (status, a) in answers {
        assert_eq!(
            (status, a["reason"].as_str()),
            (502, Some("unreachable")),
            "{a}"
        );
    }
    let running = r#"vizor_libvirt_lookups_running{host="h2"}"#;
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        let now = common::metric(&v.metrics().await, running);
        if now == Some(0.0) && v.logged("keepalive timeout") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{running} = {now:?}, keepalive in the log: {}",
            v.logged("keepalive timeout")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let since = Instant::now();
    let (status, a) = console(&v, "vizor-test-h2", "?host=h2").await;
    assert_eq!(
        (status, a["reason"].as_str()),
        (502, Some("unreachable")),
        "{a}"
    );
    let took = since.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "a lookup on the hung host took {took:?}"
    );
    // It thaws (where libvirt's client once crashed vizor): back within a probe.
    signal("-CONT");
    let deadline = Instant::now() + Duration::from_secs(40);
    while host_state(&v, "h2").await["reachable"] != true {
        assert!(Instant::now() < deadline, "h2 not reachable after SIGCONT");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (status, a) = console(&v, "vizor-test-h2", "?host=h2").await;
    assert_eq!(status, 200, "{a}");
    open(&v, &a).await.close(1000, "done").await;

    // It dies (SIGKILL): vizor notices within a probe, says so, and stays ready.
    signal("-KILL");
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let h = host_state(&v, "h2").await;
        if h["reachable"] == false {
            assert!(h["error"].as_str().is_some_and(|e| !e.is_empty()), "{h}");
            break;
        }
        assert!(Instant::now() < deadline, "h2 still reachable: {h}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let m = v.metrics().await;
    assert_eq!(
        common::metric(&m, r#"vizor_libvirt_up{host="h2"}"#),
        Some(0.0)
    );
    let (status, _, _) = http_get(v.addr, "/readyz", &[]).await;
    assert_eq!(status, 200);
    let since = Instant::now();
    let (status, a) = console(&v, &live.name, "?host=local").await;
    assert_eq!(status, 200, "{a}");
    eprintln!(
        "a lookup on the first host while the second is down: {:?}",
        since.elapsed()
    );
    // A name on no host that answers may be on the one that does not.
    let (status, a) = console(&v, "vizor-test-h2", "").await;
    assert_eq!(
        (status, a["reason"].as_str()),
        (503, Some("hosts_unreachable")),
        "{a}"
    );
    assert_eq!(a["hosts"], serde_json::json!(["h2"]));

    // Back: vizor reconnects by itself, and the console opens again.
    second_host(&["start"]);
    let deadline = Instant::now() + Duration::from_secs(40);
    while host_state(&v, "h2").await["reachable"] != true {
        assert!(Instant::now() < deadline, "h2 not reachable again");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (status, a) = console(&v, "vizor-test-h2", "").await;
    assert_eq!((status, a["host"].as_str()), (200, Some("h2")), "{a}");
    let mut b = open(&v, &a).await;
    b.close(1000, "done").await;
    second_host(&["stop"]);
}

#[tokio::test]
#[ignore = "live: needs the test host and scripts/second-host.sh (root); run by scripts/test.sh"]
async fn a_console_outside_the_allow_list_is_refused() {
    let _one = SECOND_HOST.lock().await;
    second_host(&["start"]);
    second_host(&["domain", "vizor-test-h2", SECOND_PASSWORD]);
    // The operator allows loopback alone: the second host's consoles are outside.
    let hosts = format!(
        "[[libvirt.hosts]]\nname = \"local\"\nuri = \"qemu:///system\"\n\
         [[libvirt.hosts]]\nname = \"h2\"\nuri = \"{SECOND_URI}\"\n"
    );
    let v = Vizor::start_libvirt(
        "",
        &hosts,
        &format!("{ADMIN_API}[upstream]\nallow = [\"127.0.0.0/8\"]\n"),
        common::write_admin_key,
    );
    let (status, a) = console(&v, "vizor-test-h2", "").await;
    assert_eq!(status, 200, "{a}");
    let mut b = Browser::connect(v.addr, a["ws_path"].as_str().unwrap()).await;
    let e = rfb_handshake(&mut b).await.unwrap_err();
    assert!(e.contains("outside [upstream] allow"), "{e}");
    let failed = v.records("upstream_failure", 1);
    assert_eq!(failed[0]["reason"], "upstream_not_allowed", "{failed:?}");
    assert!(
        failed[0]["detail"].as_str().unwrap().contains("10.213.0.2"),
        "{failed:?}"
    );

    // A domain of the second host whose console listens on that host's loopback: vizor
    // would reach its own machine's loopback instead (where the allow-list, here,
    // allows it): refused before anything is dialled, whatever the list says.
    second_host(&[
        "domain",
        "vizor-test-h2lo",
        SECOND_PASSWORD,
        "--listen",
        "127.0.0.1",
    ]);
    let (status, a) = console(&v, "vizor-test-h2lo", "?host=h2").await;
    assert_eq!(
        (status, a["reason"].as_str()),
        (502, Some("listens_locally")),
        "{a}"
    );
    v.assert_never_logged(SECOND_PASSWORD);
}

#[tokio::test]
#[ignore = "live: needs the test host and scripts/second-host.sh (root); run by scripts/test.sh"]
async fn each_host_has_its_own_tls_toward_qemu() {
    let _one = SECOND_HOST.lock().await;
    live_domain();
    // On the first host a console that speaks VeNCrypt X.509 alone; on the second a
    // plain one.
    common::test_host(&[
        "domain",
        "vizor-test-htls",
        "--vnc-passwd",
        "htls1pw",
        "--vnc-tls",
        "--no-spice",
    ]);
    second_host(&["start"]);
    second_host(&["domain", "vizor-test-h2", SECOND_PASSWORD]);
    // TLS toward the first host's QEMU only, with its CA; no [upstream_tls]: were the
    // first host's settings everyone's, the second host's plain console would be
    // refused (`require` is on by default).
    let pki = "/var/lib/vizor-test/pki";
    let hosts = format!(
        "[[libvirt.hosts]]\nname = \"local\"\nuri = \"qemu:///system\"\n\
         [libvirt.hosts.upstream_tls]\nca = \"{pki}/ca-cert.pem\"\n\
         [[libvirt.hosts]]\nname = \"h2\"\nuri = \"{SECOND_URI}\"\n"
    );
    let v = Vizor::start_libvirt("", &hosts, ADMIN_API, common::write_admin_key);
    for (n, (domain, host, tls)) in [
        ("vizor-test-htls", "local", true),
        ("vizor-test-h2", "h2", false),
    ]
    .into_iter()
    .enumerate()
    {
        let (status, a) = console(&v, domain, &format!("?host={host}")).await;
        assert_eq!(status, 200, "{a}");
        let mut b = open(&v, &a).await;
        let start = v.records("session_start", n + 1);
        assert_eq!(
            (
                start[n]["host"].as_str(),
                start[n]["upstream_tls"].as_bool()
            ),
            (Some(host), Some(tls)),
            "{}",
            start[n]
        );
        b.close(1000, "done").await;
        let _ = b.closed().await;
    }
    v.assert_never_logged("htls1pw");
    v.assert_never_logged(SECOND_PASSWORD);
}
