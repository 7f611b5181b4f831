//! The systemd unit's syscall filter (`SystemCallFilter=` in packaging/vizor.service)
//! against what vizor really calls. Under systemd a call outside the filter fails with
//! EPERM; systemd is not PID 1 where the suite runs, so vizor is traced with strace
//! through a live console session instead: recording, keys, metrics, a SIGHUP reload
//! and a SIGTERM shutdown, and every syscall it made must be one the unit allows.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a panic is a failure

mod common;

use common::rfb::{full_update, msg, open_session, update_request};
use common::{http_get, Vizor, METRICS_AUTH};
use std::collections::BTreeSet;
use std::process::Command;
use vizor_rfb::client::ClientMessage;

/// The syscalls of a systemd syscall set (`@system-service`), its nested sets resolved.
fn syscalls_of(set: &str, out: &mut BTreeSet<String>) {
    let listed = Command::new("systemd-analyze")
        .args(["syscall-filter", set])
        .output()
        .expect("systemd-analyze");
    assert!(
        listed.status.success(),
        "systemd-analyze syscall-filter {set}"
    );
    for line in String::from_utf8_lossy(&listed.stdout).lines().skip(1) {
        let item = line.trim();
        if item.is_empty() || item.starts_with('#') {
            continue;
        }
        if item.starts_with('@') {
            syscalls_of(item, out);
        } else {
            out.insert(item.to_owned());
        }
    }
}

/// What the unit's `SystemCallFilter=` lines allow: their allow lists, less their `~`
/// deny lists (which win).
fn unit_allows() -> BTreeSet<String> {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/packaging/vizor.service"
    ))
    .unwrap();
    let (mut allow, mut deny) = (BTreeSet::new(), BTreeSet::new());
    for value in unit
        .lines()
        .filter_map(|l| l.strip_prefix("SystemCallFilter="))
    {
        let (set, items) = match value.strip_prefix('~') {
            Some(rest) => (&mut deny, rest),
            None => (&mut allow, value),
        };
        for item in items.split_whitespace() {
            if item.starts_with('@') {
                syscalls_of(item, set);
            } else {
                set.insert(item.to_owned());
            }
        }
    }
    assert!(
        !allow.is_empty(),
        "the unit has no SystemCallFilter allow list"
    );
    allow.difference(&deny).cloned().collect()
}

/// The syscall names in an `strace -f` log.
fn traced(log: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in log.lines() {
        // "PID name(args) = r", "PID <... name resumed> ...", signals and exits.
        let rest = line.split_once(' ').map_or(line, |(_, r)| r).trim_start();
        let rest = rest.strip_prefix("<... ").unwrap_or(rest);
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() && rest[name.len()..].starts_with(['(', ' ']) {
            out.insert(name);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn every_syscall_of_a_live_session_is_one_the_unit_allows() {
    let live = common::live_domain();
    let allowed = unit_allows();
    let mut v = Vizor::start_full("", "record_dir = \"rec\"", "", |dir| {
        std::fs::create_dir(dir.join("rec")).unwrap();
    });
    v.terminate();
    let trace = v.path().join("strace.log");
    v.start_again_under(&["strace", "-f", "-qq", "-o", trace.to_str().unwrap()]);

    let (mut b, si) = open_session(&v, &live.name).await;
    let (pixels, frame) = full_update(&mut b, &si).await;
    assert_eq!(pixels, frame);
    for (down, keysym) in [(true, 0xffe1), (false, 0xffe1)] {
        b.send(&msg(ClientMessage::KeyEvent { down, keysym })).await;
    }
    b.send(&update_request(1, 1)).await;
    b.read().await.unwrap();
    let (status, _, _) = http_get(v.addr, "/metrics", &[METRICS_AUTH]).await;
    assert_eq!(status, 200);
    let (status, _, _) = http_get(v.addr, "/readyz", &[]).await;
    assert_eq!(status, 200);
    v.signal("HUP");
    assert!(v.wait_for_log("SIGHUP"));
    drop(b);
    v.wait_for_audit("session_end");
    assert!(v.terminate().success());

    let used = traced(&std::fs::read_to_string(&trace).unwrap());
    // The trace saw the session: its socket relaying and the audit log's syncs.
    for expected in ["accept4", "connect", "fdatasync", "epoll_wait"] {
        assert!(used.contains(expected), "{expected} not traced: {used:?}");
    }
    let outside: Vec<&String> = used.difference(&allowed).collect();
    assert!(
        outside.is_empty(),
        "vizor made syscalls packaging/vizor.service's SystemCallFilter refuses \
         (EPERM under systemd): {outside:?}"
    );
}
