//! Both roles against each other, fed one byte at a time, for every version and
//! security type; and the refusal paths.

use super::client::{self, Authenticate, VencryptChosen};
use super::server::{self, SecurityChosen};
use super::*;

/// Feeds `bytes` to a state one prefix at a time: every strict prefix must ask for
/// more, the whole message must complete and consume exactly all of it.
fn feed<S, N>(
    mut state: S,
    bytes: &[u8],
    mut recv: impl FnMut(S, &[u8]) -> Result<Progress<S, N>, Error>,
) -> Result<N, Error> {
    for k in 0..bytes.len() {
        match recv(state, &bytes[..k])? {
            Progress::NeedMore(s) => state = s,
            Progress::Done { consumed, .. } => {
                panic!("completed after {k} of {} bytes ({consumed})", bytes.len())
            }
        }
    }
    match recv(state, bytes)? {
        Progress::NeedMore(_) => panic!("incomplete after all {} bytes", bytes.len()),
        Progress::Done { next, consumed } => {
            assert_eq!(consumed, bytes.len());
            Ok(next)
        }
    }
}

fn server_init() -> ServerInit {
    ServerInit {
        width: 720,
        height: 400,
        pixel_format: PixelFormat::RGB888,
        name: b"QEMU (demo1)".to_vec(),
    }
}

/// Runs a full handshake between the two roles and returns what went each way.
fn converse(
    version: Version,
    security: SecurityType,
    password_ok: bool,
) -> Result<ServerInit, Error> {
    let limits = Limits::default();
    let (mut to_client, mut to_server) = (Vec::new(), Vec::new());
    let srv = server::start(version, limits, &mut to_client);
    let cli = client::ExpectServerVersion::new(limits);
    let cli = feed(cli, &to_client, |s, b| s.receive(b, &mut to_server))?;
    to_client.clear();
    let srv = feed(srv, &to_server, |s, b| s.receive(b))?;
    to_server.clear();
    assert_eq!(srv.version(), version);
    let srv = srv.offer(&[security], &mut to_client)?;
    let choose = feed(cli, &to_client, |s, b| s.receive(b))?;
    to_client.clear();
    assert_eq!(choose.offered(), &[security]);
    let (srv_chosen, cli_result) = if security == SecurityType::NONE {
        let r = choose.choose_none(&mut to_server)?;
        let chosen = if version == Version::V3_3 {
            match srv.receive(&[])? {
                Progress::Done { next, consumed: 0 } => next,
                _ => panic!("3.3 choice must be immediate"),
            }
        } else {
            feed(srv, &to_server, |s, b| s.receive(b))?
        };
        to_server.clear();
        let SecurityChosen::None(result) = chosen else {
            panic!("server saw another type")
        };
        (result, r)
    } else {
        let ch = choose.choose_vnc_auth(&mut to_server)?;
        let chosen = if version == Version::V3_3 {
            match srv.receive(&[])? {
                Progress::Done { next, .. } => next,
                _ => panic!("3.3 choice must be immediate"),
            }
        } else {
            feed(srv, &to_server, |s, b| s.receive(b))?
        };
        to_server.clear();
        let SecurityChosen::VncAuth(send) = chosen else {
            panic!("server saw another type")
        };
        let expect = send.send(Challenge(*b"0123456789abcdef"), &mut to_client);
        let respond = feed(ch, &to_client, |s, b| s.receive(b))?;
        to_client.clear();
        let r = respond.respond(
            if password_ok { b"s3cret" } else { b"wrong" },
            &mut to_server,
        );
        assert!(!to_server.windows(6).any(|w| w == b"s3cret"));
        let verify = feed(expect, &to_server, |s, b| s.receive(b))?;
        to_server.clear();
        assert_eq!(verify.verify(b"s3cret"), password_ok);
        (verify.into_result(), r)
    };
    if !password_ok {
        srv_chosen.refuse("wrong password", &mut to_client);
        return feed(cli_result, &to_client, |s, b| s.receive(b)).map(|_| server_init());
    }
    let srv = srv_chosen.accept(&mut to_client);
    let init = if to_client.is_empty() {
        match cli_result.receive(&[])? {
            Progress::Done { next, consumed: 0 } => next,
            _ => panic!("no SecurityResult expected"),
        }
    } else {
        feed(cli_result, &to_client, |s, b| s.receive(b))?
    };
    to_client.clear();
    let expect_si = init.send(true, &mut to_server);
    let ci = feed(srv, &to_server, |s, b| s.receive(b))?;
    assert!(ci.shared);
    server_init().write(&mut to_client);
    feed(expect_si, &to_client, |s, b| s.receive(b))
}

#[test]
fn every_version_and_security_type_completes() {
    for version in [Version::V3_3, Version::V3_7, Version::V3_8] {
        for security in [SecurityType::NONE, SecurityType::VNC_AUTH] {
            let si = converse(version, security, true)
                .unwrap_or_else(|e| panic!("{version:?} {security:?}: {e}"));
            assert_eq!(si, server_init());
            assert_eq!(si.name_lossy(), "QEMU (demo1)");
        }
    }
}

#[test]
fn wrong_password_fails_with_reason_in_3_8_only() {
    assert_eq!(
        converse(Version::V3_8, SecurityType::VNC_AUTH, false).err(),
        Some(Error::AuthenticationFailed {
            reason: "wrong password".into()
        })
    );
    for v in [Version::V3_3, Version::V3_7] {
        assert_eq!(
            converse(v, SecurityType::VNC_AUTH, false).err(),
            Some(Error::AuthenticationFailed { reason: "".into() })
        );
    }
}

#[test]
fn refusal_at_offer_reaches_the_client_in_every_version() {
    for version in [Version::V3_3, Version::V3_7, Version::V3_8] {
        let limits = Limits::default();
        let (mut to_client, mut to_server) = (Vec::new(), Vec::new());
        let srv = server::start(version, limits, &mut to_client);
        // A client that speaks exactly `version`.
        to_server.extend_from_slice(&version.to_bytes());
        let Progress::Done { next: offer, .. } = srv.receive(&to_server).unwrap() else {
            panic!()
        };
        to_client.clear();
        offer.refuse("authentication to the VM failed", &mut to_client);
        let mut sink = Vec::new();
        let expect = client::ExpectServerVersion::new(limits);
        let Progress::Done { next, .. } = expect.receive(&version.to_bytes(), &mut sink).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            feed(next, &to_client, |s, b| s.receive(b)).err(),
            Some(Error::ConnectionRefused {
                reason: "authentication to the VM failed".into()
            }),
            "{version:?}"
        );
    }
}

#[test]
fn client_picks_the_highest_common_version() {
    let cases: &[(&[u8; 12], Option<Version>)] = &[
        (b"RFB 003.003\n", Some(Version::V3_3)),
        (b"RFB 003.005\n", Some(Version::V3_3)),
        (b"RFB 003.007\n", Some(Version::V3_7)),
        (b"RFB 003.008\n", Some(Version::V3_8)),
        (b"RFB 003.889\n", Some(Version::V3_8)),
        (b"RFB 004.001\n", Some(Version::V3_8)),
        (b"RFB 002.000\n", None),
        (b"RFB 003.002\n", None),
    ];
    for (bytes, want) in cases {
        let mut out = Vec::new();
        let r = client::ExpectServerVersion::new(Limits::default()).receive(*bytes, &mut out);
        match (r, want) {
            (Ok(Progress::Done { next, consumed: 12 }), Some(v)) => {
                assert_eq!(next.version(), *v);
                assert_eq!(out, v.to_bytes());
            }
            (Err(Error::UnsupportedVersion { .. }), None) => {}
            (other, _) => panic!("{bytes:?}: {other:?}"),
        }
    }
    for bad in [b"RFB 003.00x\n", b"RFX 003.008\n", b"RFB 003.008 "] {
        let mut out = Vec::new();
        assert!(matches!(
            client::ExpectServerVersion::new(Limits::default()).receive(bad, &mut out),
            Err(Error::MalformedVersion(_))
        ));
    }
}

#[test]
fn server_refuses_versions_above_its_offer_and_unknown_ones() {
    let mut out = Vec::new();
    let s = server::start(Version::V3_7, Limits::default(), &mut out);
    assert!(matches!(
        s.receive(b"RFB 003.008\n"),
        Err(Error::UnsupportedVersion { major: 3, minor: 8 })
    ));
    let s = server::start(Version::V3_8, Limits::default(), &mut out);
    assert!(matches!(
        s.receive(b"RFB 003.009\n"),
        Err(Error::UnsupportedVersion { major: 3, minor: 9 })
    ));
}

#[test]
fn choices_outside_the_offer_are_refused() {
    let limits = Limits::default();
    let mut out = Vec::new();
    let s = server::start(Version::V3_8, limits, &mut out);
    let Progress::Done { next: offer, .. } = s.receive(b"RFB 003.008\n").unwrap() else {
        panic!()
    };
    let expect = offer.offer(&[SecurityType::NONE], &mut out).unwrap();
    assert!(matches!(
        expect.receive(&[2]),
        Err(Error::SecurityTypeNotOffered(2))
    ));

    let mut sink = Vec::new();
    let c = client::ExpectServerVersion::new(limits);
    let Progress::Done { next, .. } = c.receive(b"RFB 003.008\n", &mut sink).unwrap() else {
        panic!()
    };
    let Progress::Done { next: choose, .. } = next.receive(&[1, 2]).unwrap() else {
        panic!()
    };
    assert!(matches!(
        choose.choose_vencrypt(&mut sink),
        Err(Error::SecurityTypeNotOffered(19))
    ));
}

#[test]
fn server_init_is_bounded_and_validated() {
    let limits = Limits {
        max_message_len: 100,
    };
    let mut b = Vec::new();
    ServerInit {
        name: vec![b'x'; 200],
        ..server_init()
    }
    .write(&mut b);
    assert!(matches!(
        ServerInit::parse(&b[..24], &limits),
        Err(Error::LengthTooLarge { .. })
    ));
    let mut b = Vec::new();
    server_init().write(&mut b);
    b[4] = 24; // 24 bits per pixel does not exist on the wire
    assert!(matches!(
        ServerInit::parse(&b, &limits),
        Err(Error::InvalidPixelFormat(_))
    ));
}

#[test]
fn security_result_failure_codes() {
    let limits = Limits::default();
    let mut sink = Vec::new();
    let c = client::ExpectServerVersion::new(limits);
    let Progress::Done { next, .. } = c.receive(b"RFB 003.008\n", &mut sink).unwrap() else {
        panic!()
    };
    let Progress::Done { next: choose, .. } = next.receive(&[1, 2]).unwrap() else {
        panic!()
    };
    let ch = choose.choose_vnc_auth(&mut sink).unwrap();
    let Progress::Done { next: resp, .. } = ch.receive(&[9; 16]).unwrap() else {
        panic!()
    };
    let result = resp.respond(b"pw", &mut sink);
    assert_eq!(
        result.receive(&7u32.to_be_bytes()).err(),
        Some(Error::InvalidSecurityResult(7))
    );
    // QEMU's reason carries a trailing NUL; it is not part of the reason.
    let mut qemu = vec![0, 0, 0, 1, 0, 0, 0, 22];
    qemu.extend_from_slice(b"Authentication failed\0");
    let c = client::ExpectServerVersion::new(limits);
    let Progress::Done { next, .. } = c.receive(b"RFB 003.008\n", &mut sink).unwrap() else {
        panic!()
    };
    let Progress::Done { next: choose, .. } = next.receive(&[1, 2]).unwrap() else {
        panic!()
    };
    let ch = choose.choose_vnc_auth(&mut sink).unwrap();
    let Progress::Done { next: resp, .. } = ch.receive(&[9; 16]).unwrap() else {
        panic!()
    };
    let result = resp.respond(b"pw", &mut sink);
    assert_eq!(
        feed(result, &qemu, |s, b| s.receive(b)).err(),
        Some(Error::AuthenticationFailed {
            reason: "Authentication failed".into()
        })
    );
}

#[test]
fn vencrypt_sub_negotiation_to_tls_and_vnc_auth() {
    let limits = Limits::default();
    let mut out = Vec::new();
    let c = client::ExpectServerVersion::new(limits);
    let Progress::Done { next, .. } = c.receive(b"RFB 003.008\n", &mut out).unwrap() else {
        panic!()
    };
    let choose = feed(next, &[1, 19], |s, b| s.receive(b)).unwrap();
    out.clear();
    let v = choose.choose_vencrypt(&mut out).unwrap();
    assert_eq!(out, [19]);
    out.clear();
    let ack = feed(v, &[0, 2], |s, b| s.receive(b, &mut out)).unwrap();
    assert_eq!(out, [0, 2]);
    let subtypes = feed(ack, &[0], |s, b| s.receive(b)).unwrap();
    let mut list = vec![2u8];
    list.extend_from_slice(&261u32.to_be_bytes());
    list.extend_from_slice(&260u32.to_be_bytes());
    let choose = feed(subtypes, &list, |s, b| s.receive(b)).unwrap();
    assert_eq!(
        choose.offered(),
        &[VencryptSubtype::X509_VNC, VencryptSubtype::X509_NONE]
    );
    out.clear();
    let VencryptChosen::Tls(ack) = choose.choose(VencryptSubtype::X509_VNC, &mut out).unwrap()
    else {
        panic!()
    };
    assert_eq!(out, 261u32.to_be_bytes());
    let tls = feed(ack, &[1], |s, b| s.receive(b)).unwrap();
    assert!(tls.subtype().uses_tls());
    let Authenticate::VncAuth(challenge) = tls.tls_established() else {
        panic!("X509Vnc continues with VNC authentication")
    };
    assert!(matches!(
        challenge.receive(&[0; 15]),
        Ok(Progress::NeedMore(_))
    ));
}

#[test]
fn vencrypt_rejections() {
    let limits = Limits::default();
    let start = || {
        let mut out = Vec::new();
        let c = client::ExpectServerVersion::new(limits);
        let Progress::Done { next, .. } = c.receive(b"RFB 003.008\n", &mut out).unwrap() else {
            panic!()
        };
        let Progress::Done { next: choose, .. } = next.receive(&[1, 19]).unwrap() else {
            panic!()
        };
        choose.choose_vencrypt(&mut out).unwrap()
    };
    let mut out = Vec::new();
    assert_eq!(
        start().receive(&[0, 1], &mut out).err(),
        Some(Error::UnsupportedVencryptVersion { major: 0, minor: 1 })
    );
    let Progress::Done { next: ack, .. } = start().receive(&[0, 2], &mut out).unwrap() else {
        panic!()
    };
    assert!(matches!(ack.receive(&[1]), Err(Error::VencryptRejected(_))));
    let Progress::Done { next: ack, .. } = start().receive(&[0, 2], &mut out).unwrap() else {
        panic!()
    };
    let Progress::Done { next: subtypes, .. } = ack.receive(&[0]).unwrap() else {
        panic!()
    };
    let mut list = vec![1u8];
    list.extend_from_slice(&256u32.to_be_bytes()); // Plain: never over an open channel
    let Progress::Done { next: choose, .. } = subtypes.receive(&list).unwrap() else {
        panic!()
    };
    assert_eq!(
        choose.choose(VencryptSubtype(256), &mut out).err(),
        Some(Error::UnsupportedVencryptSubtype(256))
    );
}

#[test]
fn vencrypt_tls_none_ends_with_security_result_even_in_3_7() {
    let limits = Limits::default();
    let mut out = Vec::new();
    let c = client::ExpectServerVersion::new(limits);
    let Progress::Done { next, .. } = c.receive(b"RFB 003.007\n", &mut out).unwrap() else {
        panic!()
    };
    let choose = feed(next, &[1, 19], |s, b| s.receive(b)).unwrap();
    let v = choose.choose_vencrypt(&mut out).unwrap();
    let ack = feed(v, &[0, 2], |s, b| s.receive(b, &mut out)).unwrap();
    let subtypes = feed(ack, &[0], |s, b| s.receive(b)).unwrap();
    let mut list = vec![1u8];
    list.extend_from_slice(&257u32.to_be_bytes());
    let choose = feed(subtypes, &list, |s, b| s.receive(b)).unwrap();
    let VencryptChosen::Tls(ack) = choose.choose(VencryptSubtype::TLS_NONE, &mut out).unwrap()
    else {
        panic!()
    };
    let tls = feed(ack, &[1], |s, b| s.receive(b)).unwrap();
    let Authenticate::None(result) = tls.tls_established() else {
        panic!()
    };
    // Four bytes of SecurityResult, not the start of ServerInit.
    feed(result, &0u32.to_be_bytes(), |s, b| s.receive(b)).unwrap();
}
