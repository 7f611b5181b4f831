//! TLS toward QEMU (`[upstream_tls]`) against real QEMU under real libvirtd: VNC over
//! VeNCrypt X.509 (with and without VNC authentication inside, with and without
//! QEMU demanding a client certificate) and SPICE on its TLS port. The certificates
//! are the test CA's that `scripts/test-host.sh start` makes; QEMU verifies and is
//! verified with them as libvirt's `vnc_tls`/`spice_tls` set it up.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: a panic is a failure

mod common;

use common::rfb::{full_update, msg, open_session, rfb_handshake};
use common::Vizor;
use vizor::token::ConsoleKind;
use vizor_rfb::client::ClientMessage;

const PKI: &str = "/var/lib/vizor-test/pki";

fn upstream_tls(extra: &str) -> String {
    format!("[upstream_tls]\nca = \"{PKI}/ca-cert.pem\"\n{extra}\n")
}

/// Opens a VNC session that vizor must refuse toward the VM; returns the
/// `upstream_failure` record's detail.
async fn refused(v: &Vizor, domain: &str) -> String {
    let token = v.token(domain, ConsoleKind::Vnc, 60);
    let mut b = common::Browser::connect(v.addr, &format!("/websockify?token={token}")).await;
    let err = rfb_handshake(&mut b).await.unwrap_err();
    assert!(err.contains("the VM console cannot be reached"), "{err}");
    let failure = v.records("upstream_failure", 1).remove(0);
    assert_eq!(failure["reason"], "upstream_tls", "{failure}");
    failure["detail"].as_str().unwrap().to_owned()
}

fn session_start(v: &Vizor) -> serde_json::Value {
    v.records("session_start", 1).remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn vnc_over_vencrypt_x509_with_the_password_inside_tls() {
    common::live_domain();
    let d = "vizor-test-vtls";
    common::test_host(&[
        "domain",
        d,
        "--vnc-passwd",
        "tlspw1",
        "--vnc-tls",
        "--no-spice",
    ]);
    let v = Vizor::start_with("", &upstream_tls(""), |_| {});
    let (mut b, si) = open_session(&v, d).await;
    let (pixels, frame) = full_update(&mut b, &si).await;
    assert_eq!(pixels, frame, "a complete frame through TLS");
    for down in [true, false] {
        b.send(&msg(ClientMessage::KeyEvent {
            down,
            keysym: 0xff1b,
        }))
        .await;
    }
    full_update(&mut b, &si).await;
    drop(b);
    let audit = v.wait_for_records("session_end", 1);
    let start = audit
        .iter()
        .find(|r| r["event"] == "session_start")
        .unwrap();
    assert_eq!(start["upstream_tls"], true);
    assert_eq!(
        common::audited_keys(&audit),
        [(true, "Escape".to_owned()), (false, "Escape".to_owned())]
    );
    v.assert_never_logged("tlspw1");

    // Without [upstream_tls], vizor says what is missing.
    let v = Vizor::start("");
    let detail = refused(&v, d).await;
    assert!(
        detail.contains("requires TLS (VeNCrypt); configure [upstream_tls]"),
        "{detail}"
    );
    // A certificate from another CA, or for another name, is refused.
    let other = rcgen::CertificateParams::new(vec!["other CA".into()])
        .unwrap()
        .self_signed(&rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let v = Vizor::start_with("", "[upstream_tls]\nca = \"other-ca.pem\"\n", |dir| {
        std::fs::write(dir.join("other-ca.pem"), other.pem()).unwrap();
    });
    let detail = refused(&v, d).await;
    assert!(
        detail.contains("invalid peer certificate") && detail.contains("UnknownIssuer"),
        "{detail}"
    );
    let v = Vizor::start_with(
        "",
        &upstream_tls("server_name = \"vm1.example.com\""),
        |_| {},
    );
    let detail = refused(&v, d).await;
    assert!(
        detail.contains("certificate not valid for name \"vm1.example.com\""),
        "{detail}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn x509_none_with_a_client_certificate_when_qemu_demands_one() {
    common::live_domain();
    // No VNC password: the X509None sub-type, TLS alone. QEMU verifies its clients.
    let d = "vizor-test-vtlsv";
    common::test_host(&["domain", d, "--vnc-tls-verify", "--no-spice"]);
    let v = Vizor::start_with("", &upstream_tls(""), |_| {});
    let detail = refused(&v, d).await;
    assert!(
        detail.contains("does QEMU demand a client certificate"),
        "{detail}"
    );
    let v = Vizor::start_with(
        "",
        &upstream_tls(&format!(
            "client_cert = \"{PKI}/client-cert.pem\"\nclient_key = \"{PKI}/client-key.pem\""
        )),
        |_| {},
    );
    let (mut b, si) = open_session(&v, d).await;
    let (pixels, frame) = full_update(&mut b, &si).await;
    assert_eq!(pixels, frame);
    assert_eq!(session_start(&v)["upstream_tls"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn a_vm_without_tls_is_refused_unless_tls_is_optional() {
    let live = common::live_domain();
    let v = Vizor::start_with("", &upstream_tls(""), |_| {});
    let detail = refused(&v, &live.name).await;
    assert!(
        detail.contains("offers no TLS (security types 2)"),
        "{detail}"
    );
    let v = Vizor::start_with("", &upstream_tls("require = false"), |_| {});
    let (mut b, si) = open_session(&v, &live.name).await;
    full_update(&mut b, &si).await;
    assert_eq!(session_start(&v)["upstream_tls"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "live: needs the test host (scripts/test.sh runs it with --include-ignored)"]
async fn spice_channels_go_to_the_tls_port() {
    common::live_domain();
    use common::spice::{link, session};
    use vizor_spice::link::channel_type;
    let d = common::spice::domain("vizor-test-stls");
    let xml = common::virsh(&["dumpxml", d]);
    let tls_port = xml
        .split("tlsPort='")
        .nth(1)
        .and_then(|r| r.split('\'').next())
        .unwrap_or_else(|| panic!("no tlsPort in {xml}"))
        .to_owned();
    let v = Vizor::start_with("", &upstream_tls(""), |_| {});
    let token = v.token(d, ConsoleKind::Spice, 60);
    let (_main, session_id, _) = session(&v, &token, true).await;
    let mut inputs = common::spice::open(&v, &token).await;
    link(&mut inputs, channel_type::INPUTS, session_id, true)
        .await
        .unwrap();
    let starts = v.records("session_start", 2);
    assert_eq!(starts.len(), 2, "{starts:?}");
    for s in &starts {
        assert_eq!(s["upstream"], format!("127.0.0.1:{tls_port}"), "{s}");
        assert_eq!(s["upstream_tls"], true, "{s}");
    }
}
