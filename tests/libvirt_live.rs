//! The libvirt lookup against the real libvirtd and QEMU of the test host.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a panic is a failure

mod common;

use std::time::SystemTime;
use vizor::libvirt::{DomainRef, Libvirt, Target};
use vizor::token::ConsoleKind;

#[test]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
fn finds_the_live_console_and_survives_a_libvirtd_restart() {
    let live = common::live_domain();
    let lv = Libvirt::new("qemu:///system");
    let c = lv
        .lookup_blocking(
            &DomainRef::NameOrUuid(live.name.clone()),
            ConsoleKind::Vnc,
            SystemTime::now(),
        )
        .unwrap();
    let port: u16 = live.vnc_addr.rsplit(':').next().unwrap().parse().unwrap();
    assert_eq!(
        c.target,
        Target::Tcp {
            host: "127.0.0.1".into(),
            port
        }
    );
    assert_eq!(
        c.password.as_deref().map(String::as_str),
        Some(live.vnc_password.as_str())
    );
    let by_uuid = lv
        .lookup_blocking(
            &DomainRef::NameOrUuid(c.uuid.clone()),
            ConsoleKind::Vnc,
            SystemTime::now(),
        )
        .unwrap();
    assert_eq!(by_uuid.domain, live.name);
    let err = lv
        .lookup_blocking(
            &DomainRef::NameOrUuid(live.name.clone()),
            ConsoleKind::Spice,
            SystemTime::now(),
        )
        .unwrap_err();
    assert_eq!(err.reason(), "no_graphics", "{err}");
    let err = lv
        .lookup_blocking(
            &DomainRef::NameOrUuid("vizor-test-no-such-domain".into()),
            ConsoleKind::Vnc,
            SystemTime::now(),
        )
        .unwrap_err();
    assert_eq!(err.reason(), "no_such_domain", "{err}");

    // libvirtd goes away (QEMU keeps running): a clear error, then recovery on its own
    // once libvirtd is back, with the same client.
    stop_libvirtd();
    let err = lv
        .lookup_blocking(
            &DomainRef::NameOrUuid(live.name.clone()),
            ConsoleKind::Vnc,
            SystemTime::now(),
        )
        .unwrap_err();
    assert_eq!(err.reason(), "unreachable", "{err}");
    common::test_host(&["start"]);
    let again = lv
        .lookup_blocking(
            &DomainRef::NameOrUuid(live.name.clone()),
            ConsoleKind::Vnc,
            SystemTime::now(),
        )
        .unwrap();
    assert_eq!(again.target, c.target);
}

fn stop_libvirtd() {
    let pid = std::fs::read_to_string("/run/libvirtd.pid").expect("libvirtd pid file");
    let pid = pid.trim();
    assert!(std::process::Command::new("kill")
        .arg(pid)
        .status()
        .unwrap()
        .success());
    for _ in 0..100 {
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("libvirtd {pid} did not stop");
}
