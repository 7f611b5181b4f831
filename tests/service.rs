//! `vizor serve` as a service runs it: one process per audit log and recording
//! directory, and what holds across a restart.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a panic is a failure

mod common;

use common::{Browser, Vizor};
use std::path::Path;
use std::process::{Command, Output};
use vizor::token::ConsoleKind;

/// `vizor serve` on `config`, to its end: one that starts serves until killed, so
/// a start is a timeout here.
fn serve_once(config: &Path) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vizor"))
        .args(["serve", "--config", config.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    for _ in 0..100 {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    panic!(
        "a second vizor serve started: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_second_vizor_on_one_audit_log_or_recording_directory_refuses_to_start() {
    let v = Vizor::start_uri("test:///default", "", "record_dir = \"rec\"", "", |dir| {
        std::fs::create_dir(dir.join("rec")).unwrap();
    });
    let config = v.path().join("vizor.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let before = v.audit_all().len();

    // The same config: the audit log is the first one's.
    let out = serve_once(&config);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let log = v.audit_path();
    assert!(
        err.contains(&format!("audit log {}", log.display()))
            || err.contains(&format!("record_dir {}", v.path().join("rec").display())),
        "{err}"
    );
    assert!(err.contains(&format!("in use by pid {}", v.pid())), "{err}");

    // Its own audit log, the first one's recording directory.
    let other = v.path().join("other.toml");
    std::fs::write(
        &other,
        text.replace("path = \"audit.jsonl\"", "path = \"audit2.jsonl\""),
    )
    .unwrap();
    let out = serve_once(&other);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "[audit] record_dir {}",
            v.path().join("rec").display()
        )) && err.contains(&format!("in use by pid {}", v.pid())),
        "{err}"
    );
    assert!(
        !v.path().join("audit2.jsonl").exists(),
        "nothing was written"
    );

    // Its own recording directory, the first one's audit log.
    std::fs::create_dir(v.path().join("rec2")).unwrap();
    std::fs::write(
        &other,
        text.replace("record_dir = \"rec\"", "record_dir = \"rec2\""),
    )
    .unwrap();
    let out = serve_once(&other);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("audit log {}", log.display()))
            && err.contains(&format!("in use by pid {}", v.pid())),
        "{err}"
    );

    // The first one's log: untouched by either, its chain whole, still written.
    let after = v.audit_all();
    assert_eq!(after.len(), before, "{after:?}");
    let (ok, report) = v.verify(std::slice::from_ref(&log));
    assert!(ok, "{report}");
    assert!(
        std::fs::read_dir(v.path())
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().starts_with("audit.jsonl.")),
        "nothing was moved aside"
    );

    // Once the first is gone, the lock goes with it: the next start continues the chain.
    let mut v = v;
    v.kill();
    v.start_again();
    v.kill();
    let (ok, report) = v.verify(&[log]);
    assert!(ok, "{report}");
    let records = v.audit_all();
    assert_eq!(
        records.last().unwrap()["event"],
        "audit_open",
        "{records:?}"
    );
}

#[tokio::test]
async fn a_token_spent_before_a_restart_is_refused_after_it() {
    // test:///default's domain has no console: the session ends at its lookup, after
    // the token was spent, which is all this needs.
    let mut v = Vizor::start_uri("test:///default", "", "", "", |_| {});
    let token = v.token("test", ConsoleKind::Vnc, 60);
    let path = format!("/websockify?token={token}");
    let first = Browser::connect(v.addr, &path).await.closed().await;
    assert_ne!(first.reason, "token already used");
    let used = v.records("token_used", 1);
    assert_eq!(
        (&used[0]["user"], &used[0]["domain"], &used[0]["kind"]),
        (&"tester".into(), &"test".into(), &"vnc".into())
    );
    let expires = humantime::parse_rfc3339(used[0]["expires_at"].as_str().unwrap()).unwrap();
    assert!(expires > std::time::SystemTime::now());

    v.restart();
    assert!(v.wait_for_log("spent tokens restored"));
    let again = Browser::connect(v.addr, &path).await.closed().await;
    assert_eq!(
        (again.code, again.reason.as_str()),
        (1008, "token already used")
    );
    let refused = v.records("token_refused", 1);
    assert_eq!(refused[0]["reason"], "replayed");
    assert_eq!(refused[0]["token_id"], used[0]["token_id"]);
    // Another token is not.
    let fresh = v.token("test", ConsoleKind::Vnc, 60);
    let other = Browser::connect(v.addr, &format!("/websockify?token={fresh}"))
        .await
        .closed()
        .await;
    assert_eq!(other.reason, first.reason);
    let (ok, report) = v.verify(&[v.audit_path()]);
    assert!(ok, "{report}");
}
