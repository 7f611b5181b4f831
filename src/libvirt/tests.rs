use super::*;
use std::time::Duration;

fn at(unix: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(unix)
}

fn domain_xml(graphics: &str) -> String {
    format!(
        "<domain type='kvm'><name>demo1</name><uuid>0d3c5e4a-6b1f-4c2e-9a55-1b2c3d4e5f60</uuid>\
         <devices><video/>{graphics}</devices></domain>"
    )
}

#[test]
fn reads_the_live_port_listen_and_password() {
    let xml = domain_xml(
        "<graphics type='spice' port='5901' autoport='yes' listen='127.0.0.1' passwd='sp1ce'/>\
         <graphics type='vnc' port='5900' autoport='yes' listen='127.0.0.1' passwd='p&amp;w&lt;'>\
         <listen type='address' address='127.0.0.1'/></graphics>",
    );
    let c = console_from_xml(&xml, ConsoleKind::Vnc, None, at(0)).unwrap();
    assert_eq!(c.domain, "demo1");
    assert_eq!(c.uuid, "0d3c5e4a-6b1f-4c2e-9a55-1b2c3d4e5f60");
    assert_eq!(
        c.target,
        Target::Tcp {
            host: "127.0.0.1".into(),
            port: 5900
        }
    );
    assert_eq!(
        c.password.as_deref().map(String::as_str),
        Some("p&w<"),
        "XML entities decoded"
    );
    assert!(
        !format!("{c:?}").contains("p&w"),
        "Debug must not show the password"
    );
    let s = console_from_xml(&xml, ConsoleKind::Spice, None, at(0)).unwrap();
    assert_eq!(
        s.target,
        Target::Tcp {
            host: "127.0.0.1".into(),
            port: 5901
        }
    );
}

#[test]
fn spice_tls_ports() {
    let tcp = |port| Target::Tcp {
        host: "127.0.0.1".into(),
        port,
    };
    // Both ports (defaultMode='any'): plain target, and the TLS one beside it.
    let both = domain_xml(
        "<graphics type='spice' port='5901' tlsPort='5902' autoport='yes' listen='127.0.0.1'/>",
    );
    let c = console_from_xml(&both, ConsoleKind::Spice, None, at(0)).unwrap();
    assert_eq!((c.target, c.tls_target), (tcp(5901), Some(tcp(5902))));
    // TLS only (defaultMode='secure').
    let secure = domain_xml("<graphics type='spice' tlsPort='5903' listen='127.0.0.1'/>");
    let c = console_from_xml(&secure, ConsoleKind::Spice, None, at(0)).unwrap();
    assert_eq!((c.target, c.tls_target), (tcp(5903), Some(tcp(5903))));
    // A VNC console has no TLS port; a shut-off SPICE one has neither.
    let vnc = domain_xml("<graphics type='vnc' port='5900' tlsPort='5999'/>");
    let c = console_from_xml(&vnc, ConsoleKind::Vnc, None, at(0)).unwrap();
    assert_eq!(c.tls_target, None);
    let off = domain_xml("<graphics type='spice' port='-1' tlsPort='-1'/>");
    assert!(matches!(
        console_from_xml(&off, ConsoleKind::Spice, None, at(0)),
        Err(LookupError::NoListener { .. })
    ));
    let bad = domain_xml("<graphics type='spice' port='5901' tlsPort='x'/>");
    assert!(matches!(
        console_from_xml(&bad, ConsoleKind::Spice, None, at(0)),
        Err(LookupError::BadXml { .. })
    ));
}

#[test]
fn listen_elements_sockets_and_wildcards() {
    for any in [
        "",
        "0.0.0.0",
        "::",
        "[::]",
        "::0",
        "0:0:0:0:0:0:0:0",
        "::ffff:0.0.0.0",
    ] {
        assert!(super::is_wildcard(any), "{any:?}");
    }
    for not in ["127.0.0.1", "::1", "192.0.2.7", "host"] {
        assert!(!super::is_wildcard(not), "{not:?}");
    }
    let net = domain_xml("<graphics type='vnc' port='5907'><listen type='network' network='default' address='192.0.2.7'/></graphics>");
    assert_eq!(
        console_from_xml(&net, ConsoleKind::Vnc, None, at(0))
            .unwrap()
            .target,
        Target::Tcp {
            host: "192.0.2.7".into(),
            port: 5907
        }
    );
    let sock = domain_xml(
        "<graphics type='vnc'><listen type='socket' socket='/run/vnc.sock'/></graphics>",
    );
    assert_eq!(
        console_from_xml(&sock, ConsoleKind::Vnc, None, at(0))
            .unwrap()
            .target,
        Target::Unix("/run/vnc.sock".into())
    );
    let old_sock = domain_xml("<graphics type='vnc' socket='/run/old.sock'/>");
    assert_eq!(
        console_from_xml(&old_sock, ConsoleKind::Vnc, None, at(0))
            .unwrap()
            .target,
        Target::Unix("/run/old.sock".into())
    );
    for (listen, host, want) in [
        ("0.0.0.0", None, "127.0.0.1"),
        ("::", None, "::1"),
        ("0.0.0.0", Some("hv1.example"), "hv1.example"),
    ] {
        let xml = domain_xml(&format!(
            "<graphics type='vnc' port='5900' listen='{listen}'/>"
        ));
        let c = console_from_xml(&xml, ConsoleKind::Vnc, host, at(0)).unwrap();
        assert_eq!(
            c.target,
            Target::Tcp {
                host: want.into(),
                port: 5900
            },
            "{listen} {host:?}"
        );
    }
    let no_listen = domain_xml("<graphics type='vnc' port='5900'/>");
    assert!(matches!(
        console_from_xml(&no_listen, ConsoleKind::Vnc, None, at(0))
            .unwrap()
            .target,
        Target::Tcp { port: 5900, .. }
    ));
}

#[test]
fn password_validity() {
    let xml = domain_xml(
        "<graphics type='vnc' port='5900' passwd='x' passwdValidTo='2026-11-24T12:00:00'/>",
    );
    let noon = parse_valid_to("2026-11-24T12:00:00").unwrap() as u64;
    // Cross-checked: date -u -d 2026-11-24T12:00:00 +%s
    assert_eq!(noon, 1_795_521_600);
    assert!(console_from_xml(&xml, ConsoleKind::Vnc, None, at(noon - 1)).is_ok());
    let err = console_from_xml(&xml, ConsoleKind::Vnc, None, at(noon)).unwrap_err();
    assert_eq!(err.reason(), "password_expired");
    assert!(err.to_string().contains("2026-11-24T12:00:00"));
    let bad = domain_xml("<graphics type='vnc' port='5900' passwdValidTo='tomorrow'/>");
    assert_eq!(
        console_from_xml(&bad, ConsoleKind::Vnc, None, at(0))
            .unwrap_err()
            .reason(),
        "bad_xml"
    );
    assert_eq!(parse_valid_to("1970-01-01T00:00:00"), Some(0));
    assert_eq!(parse_valid_to("2000-03-01T00:00:00"), Some(951_868_800));
}

#[test]
fn distinct_errors() {
    let spice_only = domain_xml("<graphics type='spice' port='5901'/>");
    assert_eq!(
        console_from_xml(&spice_only, ConsoleKind::Vnc, None, at(0))
            .unwrap_err()
            .reason(),
        "no_graphics"
    );
    let shut_off = domain_xml("<graphics type='vnc' port='-1' autoport='yes'/>");
    assert_eq!(
        console_from_xml(&shut_off, ConsoleKind::Vnc, None, at(0))
            .unwrap_err()
            .reason(),
        "no_listener"
    );
    let garbage = "<domain><devices>";
    assert_eq!(
        console_from_xml(garbage, ConsoleKind::Vnc, None, at(0))
            .unwrap_err()
            .reason(),
        "bad_xml"
    );
}

#[test]
fn uri_hosts() {
    for (uri, host) in [
        ("qemu:///system", None),
        ("qemu+ssh://root@hv1.example/system", Some("hv1.example")),
        ("qemu+tcp://hv2:16509/system", Some("hv2")),
        ("qemu+tls://[2001:db8::1]:16514/system", Some("2001:db8::1")),
        ("test:///tmp/node.xml", None),
        ("qemu+unix:///system?socket=/run/x", None),
    ] {
        assert_eq!(uri_host(uri).as_deref(), host, "{uri}");
    }
}

const NODE: &str = "<node>
  <domain type='test'>
    <name>vnc-pass</name><uuid>6695eb01-f6a4-8304-79aa-97f2502e193f</uuid>
    <memory>65536</memory><os><type>hvm</type></os>
    <devices>
      <graphics type='vnc' port='5944' listen='0.0.0.0' passwd='s3cr&amp;t'/>
      <graphics type='spice' port='5945' listen='127.0.0.1' passwd='sp1ce'/>
    </devices>
  </domain>
  <domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>
    <name>stopped</name><memory>65536</memory><os><type>hvm</type></os>
    <devices><graphics type='vnc' port='5946' listen='127.0.0.1'/></devices>
    <test:runstate>5</test:runstate>
  </domain>
  <domain type='test'>
    <name>headless</name><memory>65536</memory><os><type>hvm</type></os>
    <devices/>
  </domain>
</node>";

fn by_name(domain: &str) -> DomainRef {
    DomainRef::NameOrUuid(domain.to_owned())
}

#[test]
fn looks_up_through_libvirts_test_driver() {
    let dir = tempfile::tempdir().unwrap();
    let node = dir.path().join("node.xml");
    std::fs::write(&node, NODE).unwrap();
    let lv = Libvirt::new(&format!("test://{}", node.display()));
    let now = SystemTime::now();
    let c = lv
        .lookup_blocking(&by_name("vnc-pass"), ConsoleKind::Vnc, now)
        .unwrap();
    assert_eq!(
        c.target,
        Target::Tcp {
            host: "127.0.0.1".into(),
            port: 5944
        }
    );
    assert_eq!(c.password.as_deref().map(String::as_str), Some("s3cr&t"));
    let by_uuid = lv
        .lookup_blocking(
            &by_name("6695eb01-f6a4-8304-79aa-97f2502e193f"),
            ConsoleKind::Spice,
            now,
        )
        .unwrap();
    assert_eq!(by_uuid.domain, "vnc-pass");
    // What a token names: that UUID alone.
    let uuid = crate::token::parse_uuid("6695eb01-f6a4-8304-79aa-97f2502e193f").unwrap();
    let bound = lv
        .lookup_blocking(&DomainRef::Uuid(uuid), ConsoleKind::Vnc, now)
        .unwrap();
    assert_eq!(bound.domain, "vnc-pass");
    assert_eq!(
        lv.identify_blocking("vnc-pass").unwrap(),
        ("vnc-pass".to_owned(), uuid)
    );
    assert_eq!(
        lv.identify_blocking("stopped").unwrap().0,
        "stopped",
        "a domain need not run to be named"
    );
    assert_eq!(
        lv.identify_blocking("nosuch").unwrap_err().reason(),
        "no_such_domain"
    );
    // A UUID-bound lookup never falls back to a name.
    let err = lv
        .lookup_blocking(&DomainRef::Uuid([0x42; 16]), ConsoleKind::Vnc, now)
        .unwrap_err();
    assert_eq!(err.reason(), "no_such_domain");
    assert_eq!(
        by_uuid.target,
        Target::Tcp {
            host: "127.0.0.1".into(),
            port: 5945
        }
    );
    for (domain, kind, reason) in [
        ("nosuch", ConsoleKind::Vnc, "no_such_domain"),
        (
            "00000000-0000-0000-0000-000000000000",
            ConsoleKind::Vnc,
            "no_such_domain",
        ),
        ("stopped", ConsoleKind::Vnc, "not_running"),
        ("headless", ConsoleKind::Vnc, "no_graphics"),
    ] {
        let err = lv.lookup_blocking(&by_name(domain), kind, now).unwrap_err();
        assert_eq!(err.reason(), reason, "{domain}: {err}");
    }
}

#[test]
fn unreachable_libvirt_is_reported_as_such() {
    let lv = Libvirt::new("qemu+unix:///system?socket=/nonexistent/libvirt-sock");
    let err = lv
        .lookup_blocking(&by_name("demo1"), ConsoleKind::Vnc, SystemTime::now())
        .unwrap_err();
    assert_eq!(err.reason(), "unreachable", "{err}");
    assert!(err.to_string().contains("qemu+unix:///system"), "{err}");
}

/// One of each variant: a new one must be added here, and its reason to `REASONS`.
#[test]
fn every_lookup_reason_is_listed() {
    let s = String::new;
    let k = ConsoleKind::Vnc;
    let each = [
        LookupError::NoSuchDomain(s()),
        LookupError::NotRunning(s()),
        LookupError::NoGraphics {
            domain: s(),
            kind: k,
            has: vec![],
        },
        LookupError::NoListener {
            domain: s(),
            kind: k,
        },
        LookupError::PasswordExpired {
            domain: s(),
            kind: k,
            valid_to: s(),
        },
        LookupError::NoPassword {
            domain: s(),
            kind: k,
        },
        LookupError::Unreachable {
            uri: s(),
            message: s(),
        },
        LookupError::BadXml {
            domain: s(),
            why: s(),
        },
        LookupError::ListensLocally {
            domain: s(),
            host: s(),
            target: s(),
        },
        LookupError::UnknownHost(s()),
        LookupError::Ambiguous {
            domain: s(),
            hosts: vec![s()],
        },
        LookupError::HostsUnreachable {
            domain: s(),
            hosts: vec![s()],
        },
    ];
    let reasons: Vec<_> = each.iter().map(LookupError::reason).collect();
    assert_eq!(reasons, LookupError::REASONS);
}
