//! What `vizor serve` checks at start, what it tells systemd, and `vizor check`, which
//! reports the same without serving.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a panic is a failure

mod common;

use common::http_get;
use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn vizor(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vizor"))
        .args(args)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A directory with two `vizor keygen` keys and a config on `uri`, `extra` appended.
fn setup(dir: &Path, uri: &str, extra: &str) -> PathBuf {
    for key in ["token.key", "audit.key"] {
        let out = vizor(&["keygen", dir.join(key).to_str().unwrap()]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let config = dir.join("vizor.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[libvirt]\nuri = \"{uri}\"\n\
             [tokens]\nkey_file = \"token.key\"\n\
             [audit]\npath = \"audit.jsonl\"\nkey_file = \"audit.key\"\n{extra}"
        ),
    )
    .unwrap();
    config
}

/// `vizor check --config`: (exit status 0, standard output and error).
fn check(config: &Path) -> (bool, String) {
    let out = vizor(&["check", "--config", config.to_str().unwrap()]);
    (
        out.status.success(),
        format!("{}{}", text(&out.stdout), text(&out.stderr)),
    )
}

/// A libvirt URI nothing answers at (a closed port on loopback).
const UNREACHABLE: &str = "qemu+tcp://127.0.0.1:1/system";

#[test]
fn check_passes_a_good_config_and_names_each_mistake() {
    let (_node, uri) = common::test_node(&[
        ("locked".into(), 5991, "locked-pw".into()),
        ("open".into(), 5992, String::new()),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path(), &uri, "");
    let d = dir.path().display().to_string();
    let (ok, said) = check(&config);
    assert!(ok, "{said}");
    assert!(
        said.contains(&format!("ok    [tokens] key_file {d}/token.key")),
        "{said}"
    );
    assert!(
        said.contains("ok    libvirt test://") && said.contains("2 running"),
        "{said}"
    );
    // A console without a password is a warning, not a failure.
    assert!(
        said.contains("warn  domain \"open\": its vnc graphics have no password"),
        "{said}"
    );
    assert!(!said.contains("domain \"locked\""), "{said}");
    // And one more as root: access is checked as the user who runs it.
    assert!(said.contains("warn  checked as root"), "{said}");
    assert!(said.contains("is good (2 warning(s))"), "{said}");

    // Each mistake: a failed check naming it, exit status 1, and nothing created.
    let good = std::fs::read_to_string(&config).unwrap();
    let missing = format!(
        "FAIL  audit log {d}/missing/audit.jsonl: its directory {d}/missing does not exist"
    );
    let no_key = format!("FAIL  audit key file {d}/nokey: No such file or directory");
    let cases: Vec<(String, &str)> = vec![
        (
            good.replace("path = \"audit.jsonl\"", "path = \"missing/audit.jsonl\""),
            &missing,
        ),
        (
            good.replace("key_file = \"audit.key\"", "key_file = \"token.key\""),
            "holds the same key as [tokens] key_file",
        ),
        (
            good.replace("key_file = \"audit.key\"", "key_file = \"nokey\""),
            &no_key,
        ),
        (
            good.replace(&uri, UNREACHABLE),
            "FAIL  libvirt at qemu+tcp://127.0.0.1:1/system is unreachable",
        ),
        (
            good.replace("127.0.0.1:0", "localhost:6444"),
            "a host name is not accepted",
        ),
        (
            good.replace("[server]\n", "[server]\ntls_cert = \"tls.crt\"\n"),
            "FAIL  [server] tls_cert and tls_key go together",
        ),
        (
            good.replace("[libvirt]\n", "[libvirt]\nnot_a_field = 1\n"),
            "unknown field `not_a_field`",
        ),
    ];
    for (config_text, expected) in cases {
        std::fs::write(&config, &config_text).unwrap();
        let (ok, said) = check(&config);
        assert!(!ok, "{expected}: {said}");
        assert!(said.contains(expected), "{expected}: {said}");
        assert!(said.contains("problem(s) that stop vizor serve"), "{said}");
    }
    assert!(!dir.path().join("missing").exists());

    // A key others can read.
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(&config, &good).unwrap();
    let key = dir.path().join("token.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let (ok, said) = check(&config);
    assert!(!ok);
    assert!(
        said.contains(&format!(
            "FAIL  token key file {d}/token.key is readable by group or others"
        )),
        "{said}"
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();

    // Under require_password the open console is one vizor refuses.
    std::fs::write(
        &config,
        good.replace("[libvirt]\n", "[libvirt]\nrequire_password = true\n"),
    )
    .unwrap();
    let (ok, said) = check(&config);
    assert!(ok, "{said}");
    assert!(
        said.contains("no password: refused ([libvirt] require_password)"),
        "{said}"
    );
}

#[test]
fn serve_refuses_to_start_without_libvirt() {
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path(), UNREACHABLE, "");
    let out = vizor(&["serve", "--config", config.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("libvirt at qemu+tcp://127.0.0.1:1/system is unreachable")
            && err.contains("set [libvirt] wait = true"),
        "{err}"
    );
    // Nothing served, nothing written.
    assert!(text(&out.stdout).is_empty(), "{}", text(&out.stdout));
    assert!(!dir.path().join("audit.jsonl").exists());
}

/// A `vizor serve` as systemd runs it (`Type=notify`): its notifications arrive on
/// the returned socket.
fn serve_notified(config: &Path, socket: &Path) -> (Child, std::net::SocketAddr, UnixDatagram) {
    let notify = UnixDatagram::bind(socket).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_vizor"))
        .args(["serve", "--config", config.to_str().unwrap()])
        .env("NOTIFY_SOCKET", socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("vizor did not start: {line:?}"))
        .parse()
        .unwrap();
    (child, addr, notify)
}

/// The next notification.
fn next(notify: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = notify.recv(&mut buf).expect("a notification within 20 s");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn with_wait_it_serves_unready_until_libvirt_answers_and_tells_systemd() {
    let dir = tempfile::tempdir().unwrap();
    // libvirt's test driver on a node file that does not exist yet: unreachable until
    // it is written.
    let node = dir.path().join("node.xml");
    let uri = format!("test://{}", node.display());
    let config = setup(dir.path(), &uri, "");
    std::fs::write(
        &config,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace("[libvirt]\n", "[libvirt]\nwait = true\n"),
    )
    .unwrap();
    let metrics: std::net::SocketAddr = ([127, 0, 0, 1], common::free_port()).into();
    std::fs::write(
        &config,
        std::fs::read_to_string(&config).unwrap().replace(
            "[server]\n",
            &format!("[server]\nmetrics_listen = \"{metrics}\"\n"),
        ),
    )
    .unwrap();
    let (mut child, addr, notify) = serve_notified(&config, &dir.path().join("notify"));
    // Started (systemd would otherwise kill a vizor told to wait), and saying why it
    // is not ready.
    assert_eq!(next(&notify), "READY=1\nSTATUS=waiting for libvirt\n");
    let (status, _, body) = http_get(addr, "/readyz", &[]).await;
    assert_eq!(status, 503, "{body}");
    // Anyone reaching the console port learns only that; libvirt's words (its URI)
    // are for the private metrics listener.
    assert_eq!(body, "not ready: waiting for libvirt (see vizor's log)\n");
    let (status, _, body) = http_get(metrics, "/readyz", &[]).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.starts_with("not ready: libvirt at test://") && body.contains("unreachable"),
        "{body}"
    );
    let (status, _, _) = http_get(addr, "/healthz", &[]).await;
    assert_eq!(status, 200, "alive while not ready");

    // libvirt appears: vizor finds it (within its retry pause) and is ready.
    let (_n, node_uri) = common::test_node(&[("late".into(), 5993, "late-pw".into())]);
    let written = PathBuf::from(node_uri.strip_prefix("test://").unwrap());
    std::fs::copy(written, &node).unwrap();
    let since = Instant::now();
    assert_eq!(next(&notify), "STATUS=serving\n");
    assert!(since.elapsed() < Duration::from_secs(20));
    let (status, _, body) = http_get(addr, "/readyz", &[]).await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));

    // SIGTERM: systemd hears that vizor is stopping.
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    assert_eq!(next(&notify), "STOPPING=1\nSTATUS=shutting down\n");
    assert!(child.wait().unwrap().success());
}

#[tokio::test]
async fn without_wait_it_is_ready_once_listening() {
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path(), "test:///default", "");
    let (mut child, addr, notify) = serve_notified(&config, &dir.path().join("notify"));
    assert_eq!(next(&notify), "READY=1\nSTATUS=serving\n");
    let (status, _, body) = http_get(addr, "/readyz", &[]).await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    child.kill().unwrap();
    child.wait().unwrap();
}
