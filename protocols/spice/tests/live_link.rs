//! The link stage against QEMU's real spice-server: vizor's link message for the main
//! channel is answered with an OK reply carrying a 1024-bit RSA key (DER
//! SubjectPublicKeyInfo) and the capabilities vizor relies on.
//!
//! Needs the test host of `scripts/test.sh`, which runs this `#[ignore]`d test with
//! `--include-ignored`.

use std::io::Write;
use vizor_spice::link::{cap, channel_type, link_error, Caps, LinkMess, LinkReply};
use vizor_spice::Limits;
use vizor_testkit::Blocking;

fn test_host(args: &[&str]) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/test-host.sh");
    let out = std::process::Command::new(script)
        .args(args)
        .output()
        .expect("test-host.sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
fn qemu_answers_vizors_link_message() {
    assert!(
        std::env::var("VIZOR_TEST_VNC_DOMAIN").is_ok(),
        "a live test without its test host: run scripts/test.sh"
    );
    test_host(&[
        "domain",
        "vizor-test-spice",
        "--vnc-passwd",
        "vncpw1",
        "--spice-passwd",
        "sp1ce",
    ]);
    let xml = std::process::Command::new("virsh")
        .args(["-c", "qemu:///system", "dumpxml", "vizor-test-spice"])
        .output()
        .unwrap();
    let xml = String::from_utf8_lossy(&xml.stdout);
    let port: u16 = xml
        .lines()
        .find(|l| l.contains("graphics type='spice'"))
        .and_then(|l| l.split("port='").nth(1))
        .and_then(|p| p.split('\'').next())
        .and_then(|p| p.parse().ok())
        .expect("live SPICE port");
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut common = Caps::default();
    common.set(cap::PROTOCOL_AUTH_SELECTION);
    common.set(cap::AUTH_SPICE);
    common.set(cap::MINI_HEADER);
    let mut out = Vec::new();
    LinkMess {
        connection_id: 0,
        channel_type: channel_type::MAIN,
        channel_id: 0,
        common_caps: common,
        channel_caps: Caps::default(),
    }
    .write(&mut out);
    s.write_all(&out).unwrap();
    let mut buf = Vec::new();
    let reply = vizor_testkit::drive_blocking(&mut Blocking(&mut s), &mut buf, (), |(), b| {
        LinkReply::parse(b, &Limits::default())
    })
    .unwrap_or_else(|e| panic!("spice-server's link reply: {e}"));
    assert!(buf.is_empty(), "nothing follows the reply");
    assert_eq!(reply.error, link_error::OK);
    // DER SEQUENCE of a 1024-bit RSA SubjectPublicKeyInfo: 30 81 9f 30 0d 06 09 2a 86 48 86 f7 0d 01 01 01
    assert_eq!(&reply.pub_key[..4], &[0x30, 0x81, 0x9f, 0x30]);
    assert!(reply.common_caps.has(cap::AUTH_SPICE));
    assert!(reply.common_caps.has(cap::MINI_HEADER));
    assert!(reply.common_caps.has(cap::PROTOCOL_AUTH_SELECTION));
}
