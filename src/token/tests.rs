use super::*;

fn claims(expires_at: u64) -> Claims {
    Claims {
        host: "default".into(),
        domain: "demo1".into(),
        uuid: [0x5a; 16],
        kind: ConsoleKind::Vnc,
        user: "alice".into(),
        expires_at,
        nonce: [7; 16],
        client: None,
        role: Role::Owner,
        joins: None,
        policy: Policy::default(),
    }
}

#[test]
fn seals_and_opens() {
    let key = TokenKey::generate().unwrap();
    let c = Claims::new(
        "demo2",
        parse_uuid("0d3c5e4a-6b1f-4c2e-9a55-1b2c3d4e5f60").unwrap(),
        ConsoleKind::Spice,
        "bob",
        1000,
    )
    .unwrap();
    let t = key.seal(&c).unwrap();
    assert!(t
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
    assert_eq!(key.open(&t, 999).unwrap(), c);
    // Fresh IV and nonce: the same claims never seal to the same token.
    assert_ne!(key.seal(&c).unwrap(), t);
}

#[test]
fn claims_are_not_readable() {
    let key = TokenKey::generate().unwrap();
    let t = key.seal(&claims(100)).unwrap();
    let raw = URL_SAFE_NO_PAD.decode(&t).unwrap();
    assert!(!raw.windows(5).any(|w| w == b"demo1"));
    assert!(!raw.windows(5).any(|w| w == b"alice"));
}

#[test]
fn every_bit_flip_is_refused() {
    let key = TokenKey::generate().unwrap();
    let t = key.seal_with_iv(&claims(100), [3; 16]).unwrap();
    let raw = URL_SAFE_NO_PAD.decode(&t).unwrap();
    for i in 0..raw.len() * 8 {
        let mut bad = raw.clone();
        bad[i / 8] ^= 1 << (i % 8);
        let r = key.open(&URL_SAFE_NO_PAD.encode(&bad), 0);
        assert!(
            matches!(
                r,
                Err(TokenError::BadSignature | TokenError::UnknownVersion(_))
            ),
            "bit {i}: {r:?}"
        );
    }
}

#[test]
fn another_key_cannot_open() {
    let t = TokenKey::generate().unwrap().seal(&claims(100)).unwrap();
    let other = TokenKey::generate().unwrap();
    assert_eq!(other.open(&t, 0), Err(TokenError::BadSignature));
}

#[test]
fn expiry_is_exclusive() {
    let key = TokenKey::generate().unwrap();
    let t = key.seal(&claims(100)).unwrap();
    assert!(key.open(&t, 99).is_ok());
    assert_eq!(
        key.open(&t, 100),
        Err(TokenError::Expired {
            expires_at: 100,
            now: 100
        })
    );
    assert_eq!(key.open(&t, u64::MAX).unwrap_err().reason(), "expired");
    assert_eq!(
        key.open(&t, 400).unwrap_err().to_string(),
        "token expired at 1970-01-01T00:01:40Z (5m ago)"
    );
}

#[test]
fn a_token_that_opens_for_longer_than_vizor_issues_is_refused() {
    // A restarted vizor rebuilds its spent set from the last MAX_LIFETIME of audit
    // records: a token must not open beyond it.
    let key = TokenKey::generate().unwrap();
    let now = 1_000_000;
    let longest = now + MAX_LIFETIME.as_secs();
    assert!(key.open(&key.seal(&claims(longest)).unwrap(), now).is_ok());
    let e = key
        .open(&key.seal(&claims(longest + 1)).unwrap(), now)
        .unwrap_err();
    assert_eq!(e.reason(), "too_long");
    assert!(e.to_string().contains("more than 24h from now"), "{e}");
}

#[test]
fn malformed_tokens() {
    let key = TokenKey::generate().unwrap();
    let t = key.seal(&claims(100)).unwrap();
    for bad in [
        String::new(),
        "not base64!".to_owned(),
        t[..t.len() - 1].to_owned() + "=",
        t[..20].to_owned(),
        "A".repeat(MAX_TOKEN_LEN + 1),
    ] {
        assert_eq!(key.open(&bad, 0), Err(TokenError::Malformed), "{bad:.30}");
    }
    assert!(key
        .seal(&Claims {
            domain: String::new(),
            ..claims(1)
        })
        .is_err());
    assert!(key
        .seal(&Claims {
            user: "u".repeat(MAX_USER_LEN + 1),
            ..claims(1)
        })
        .is_err());
}

#[test]
fn replay_cache_admits_once_until_expiry() {
    let mut cache = ReplayCache::new(2);
    let a = claims(100);
    cache.admit(&a, 10).unwrap();
    assert_eq!(cache.admit(&a, 11), Err(TokenError::Replayed));
    let b = Claims {
        nonce: [8; 16],
        expires_at: 200,
        ..claims(0)
    };
    cache.admit(&b, 12).unwrap();
    let c = Claims {
        nonce: [9; 16],
        expires_at: 300,
        ..claims(0)
    };
    assert_eq!(cache.admit(&c, 13), Err(TokenError::ReplayCacheFull));
    // At a's expiry its nonce is dropped, making room.
    cache.admit(&c, 100).unwrap();
    assert_eq!(cache.len(), 2);
}

#[test]
fn tokens_spent_before_a_restart_stay_spent_until_they_expire() {
    let mut cache = ReplayCache::new(1);
    let spent = claims(100);
    let mut id = [0u8; 8];
    id.copy_from_slice(&spent.nonce[..8]);
    // As the audit log's token_used records give them back.
    cache.restore([(id, 100)]);
    assert!(cache.is_used(&spent, 10));
    assert_eq!(cache.admit(&spent, 10), Err(TokenError::Replayed));
    // They take no room from new tokens.
    let fresh = Claims {
        nonce: [1; 16],
        ..claims(200)
    };
    cache.admit(&fresh, 10).unwrap();
    // Expired, it is forgotten (it would be refused as expired first).
    assert!(!cache.is_used(&spent, 100));
    let mut later = ReplayCache::new(1);
    later.restore([(id, 100)]);
    later.admit(&spent, 100).unwrap();
}

#[test]
fn key_files() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token.key");
    TokenKey::write_new(&path).unwrap();
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(
        matches!(TokenKey::write_new(&path), Err(KeyError::Io { .. })),
        "must not overwrite"
    );
    let key = TokenKey::load(&path).unwrap();
    assert_eq!(format!("{key:?}"), "TokenKey(<redacted>)");
    let t = key.seal(&claims(100)).unwrap();
    assert!(
        TokenKey::load(&path).unwrap().open(&t, 0).is_ok(),
        "a second replica opens it"
    );

    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = TokenKey::load(&path).unwrap_err();
    assert!(err.to_string().contains("chmod 600"), "{err}");

    for (text, want) in [
        ("nope\n", "first line"),
        ("vizor-token-key-v1\n", "key line missing"),
        ("vizor-token-key-v1\nAAAA\n", "64 bytes"),
        ("vizor-token-key-v1\n!!!\n", "base64url"),
    ] {
        let err = TokenKey::parse("k", text).unwrap_err().to_string();
        assert!(err.contains(want), "{text:?}: {err}");
    }
    let err = TokenKey::load(&dir.path().join("missing"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing"), "{err}");
}

#[test]
fn a_bound_token_admits_its_client_alone() {
    let key = TokenKey::generate().unwrap();
    let v4: IpAddr = "192.0.2.7".parse().unwrap();
    let v6: IpAddr = "2001:db8::7".parse().unwrap();
    for bound in [v4, v6] {
        let opened = key
            .open(&key.seal(&claims(100).bound_to(bound)).unwrap(), 0)
            .unwrap();
        assert_eq!(opened.client, Some(bound));
        assert_eq!(opened.admits(bound), Ok(()));
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        assert_eq!(
            opened.admits(other),
            Err(TokenError::WrongClient {
                bound,
                presented: other
            })
        );
    }
    // An IPv4 client reaching an IPv6 socket is the same client, bound either way.
    let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
    assert_eq!(claims(1).bound_to(v4).admits(mapped), Ok(()));
    assert_eq!(claims(1).bound_to(mapped).client, Some(v4));
    // An unbound token admits anyone, and reads as before binding existed.
    let unbound = key.open(&key.seal(&claims(100)).unwrap(), 0).unwrap();
    assert_eq!((unbound.client, unbound.admits(v6)), (None, Ok(())));
    // A trailing field of any other length is not a client address.
    let mut body = claims(100).encode().unwrap();
    body.extend_from_slice(&[1, 2, 3]);
    assert_eq!(Claims::decode(VERSION, &body), Err(TokenError::Malformed));
}

#[test]
fn a_token_names_its_domain_by_uuid() {
    let key = TokenKey::generate().unwrap();
    let uuid = parse_uuid("0D3C5E4A-6B1F-4C2E-9A55-1B2C3D4E5F60").unwrap();
    let c = Claims::new("demo", uuid, ConsoleKind::Vnc, "u", 100).unwrap();
    let opened = key.open(&key.seal(&c).unwrap(), 0).unwrap();
    assert_eq!(opened.uuid, uuid);
    assert_eq!(opened.uuid_string(), "0d3c5e4a-6b1f-4c2e-9a55-1b2c3d4e5f60");
    assert_eq!(parse_uuid("0d3c5e4a6b1f4c2e9a551b2c3d4e5f60"), Some(uuid));
    for bad in [
        "",
        "0d3c5e4a",
        "0d3c5e4a-6b1f-4c2e-9a55-1b2c3d4e5f6x",
        "0d3c5e4a--6b1f-4c2e-9a55-1b2c3d4e5f60-",
    ] {
        assert_eq!(parse_uuid(bad), None, "{bad}");
    }
}

#[test]
fn a_version_1_token_which_named_its_domain_alone_is_refused() {
    // A version 1 token, sealed with the same key: the layout it had, no UUID.
    let key = TokenKey::generate().unwrap();
    let mut body = vec![0u8];
    body.extend_from_slice(&100u64.to_be_bytes());
    body.extend_from_slice(&[7; 16]);
    for s in ["demo1", "alice"] {
        body.extend_from_slice(&(s.len() as u16).to_be_bytes());
        body.extend_from_slice(s.as_bytes());
    }
    let iv = [1u8; IV_LEN];
    Aes256Ctr::new((&*key.enc).into(), (&iv).into()).apply_keystream(&mut body);
    let mut raw = vec![1u8];
    raw.extend_from_slice(&iv);
    raw.extend_from_slice(&body);
    let tag = key.tag(&raw).finalize().into_bytes();
    raw.extend_from_slice(&tag);
    assert_eq!(
        key.open(&URL_SAFE_NO_PAD.encode(raw), 0),
        Err(TokenError::UnknownVersion(1))
    );
}

#[test]
fn issue_makes_a_token_that_opens_to_its_grant() {
    let key = TokenKey::generate().unwrap();
    let client: IpAddr = "192.0.2.9".parse().unwrap();
    let grant = Grant {
        host: "default",
        domain: "demo3",
        uuid: [0x11; 16],
        kind: ConsoleKind::Spice,
        user: "carol",
        client: Some(client),
        ttl: std::time::Duration::from_secs(60),
        role: Role::Owner,
        joins: None,
        policy: Policy::default(),
    };
    let Issued { token, claims } = key.issue(&grant, 1_000).unwrap();
    let opened = key.open(&token, 1_059).unwrap();
    assert_eq!(opened, claims);
    assert_eq!(
        (
            opened.domain.as_str(),
            opened.uuid,
            opened.kind,
            opened.user.as_str(),
            opened.client,
            opened.expires_at
        ),
        (
            "demo3",
            [0x11; 16],
            ConsoleKind::Spice,
            "carol",
            Some(client),
            1_060
        )
    );
    assert!(matches!(
        key.open(&token, 1_060),
        Err(TokenError::Expired { .. })
    ));
}

#[test]
fn issue_refuses_a_bad_grant() {
    let key = TokenKey::generate().unwrap();
    let good = Grant {
        host: "default",
        domain: "demo3",
        uuid: [0x11; 16],
        kind: ConsoleKind::Vnc,
        user: "carol",
        client: None,
        ttl: std::time::Duration::from_secs(60),
        role: Role::Owner,
        joins: None,
        policy: Policy::default(),
    };
    let long_user = "u".repeat(MAX_USER_LEN + 1);
    let long_domain = "d".repeat(MAX_DOMAIN_LEN + 1);
    for (grant, want) in [
        (
            Grant {
                user: "",
                ..good.clone()
            },
            IssueError::User,
        ),
        (
            Grant {
                user: &long_user,
                ..good.clone()
            },
            IssueError::User,
        ),
        (
            Grant {
                user: "eve\nadmin",
                ..good.clone()
            },
            IssueError::User,
        ),
        (
            Grant {
                domain: "",
                ..good.clone()
            },
            IssueError::Domain,
        ),
        (
            Grant {
                domain: &long_domain,
                ..good.clone()
            },
            IssueError::Domain,
        ),
        (
            Grant {
                host: "Node1",
                ..good.clone()
            },
            IssueError::Host,
        ),
        (
            Grant {
                host: "",
                ..good.clone()
            },
            IssueError::Host,
        ),
    ] {
        assert_eq!(key.issue(&grant, 0).err(), Some(want), "{grant:?}");
    }
    for ttl in [0, 24 * 3600 + 1] {
        let grant = Grant {
            ttl: std::time::Duration::from_secs(ttl),
            ..good.clone()
        };
        assert!(
            matches!(key.issue(&grant, 0), Err(IssueError::Ttl(_))),
            "{ttl}"
        );
    }
    assert_eq!(check_user(&"u".repeat(MAX_USER_LEN)), Ok(()));
    let joins = Joins {
        session: 4,
        owner: [9; 8],
    };
    for (grant, want) in [
        (
            Grant {
                role: Role::Operator,
                ..good.clone()
            },
            "role",
        ),
        (
            Grant {
                joins: Some(joins),
                ..good.clone()
            },
            "role",
        ),
        (
            Grant {
                policy: Policy {
                    max_duration: Some(std::time::Duration::ZERO),
                    ..Policy::default()
                },
                ..good.clone()
            },
            "max_duration",
        ),
        (
            Grant {
                policy: Policy {
                    max_duration: Some(MAX_DURATION + std::time::Duration::from_secs(1)),
                    ..Policy::default()
                },
                ..good.clone()
            },
            "max_duration",
        ),
    ] {
        let e = key.issue(&grant, 0).err();
        let label = match e {
            Some(IssueError::Role) => "role",
            Some(IssueError::MaxDuration(_)) => "max_duration",
            _ => "other",
        };
        assert_eq!(label, want, "{grant:?}: {e:?}");
    }
}

/// Seals `body` (plaintext claims) as a token of `version`, as a build of that version
/// would.
fn seal_raw(key: &TokenKey, version: u8, mut body: Vec<u8>) -> String {
    let iv = [1u8; IV_LEN];
    Aes256Ctr::new((&*key.enc).into(), (&iv).into()).apply_keystream(&mut body);
    let mut raw = vec![version];
    raw.extend_from_slice(&iv);
    raw.extend_from_slice(&body);
    let tag = key.tag(&raw).finalize().into_bytes();
    raw.extend_from_slice(&tag);
    URL_SAFE_NO_PAD.encode(raw)
}

/// Version 2's plaintext: up to the user, then the client address.
fn version_2_body(client: &[u8]) -> Vec<u8> {
    let mut body = vec![0u8];
    body.extend_from_slice(&100u64.to_be_bytes());
    body.extend_from_slice(&[7; 16]);
    body.extend_from_slice(&[0x5a; 16]);
    for s in ["demo1", "alice"] {
        body.extend_from_slice(&(s.len() as u16).to_be_bytes());
        body.extend_from_slice(s.as_bytes());
    }
    body.extend_from_slice(client);
    body
}

#[test]
fn a_version_2_token_opens_as_an_owners_with_the_default_policy() {
    let key = TokenKey::generate().unwrap();
    let t = seal_raw(&key, 2, version_2_body(&[]));
    assert_eq!(key.open(&t, 0), Ok(claims(100)));
    let t = seal_raw(&key, 2, version_2_body(&[192, 0, 2, 1]));
    assert_eq!(
        key.open(&t, 0),
        Ok(claims(100).bound_to("192.0.2.1".parse().unwrap()))
    );
}

#[test]
fn a_participants_token_carries_its_role_session_and_policy() {
    let key = TokenKey::generate().unwrap();
    let joins = Joins {
        session: 0x0102_0304_0506_0708,
        owner: [0xab; 8],
    };
    for (role, policy) in [
        (
            Role::Observer,
            Policy {
                view_only: true,
                clipboard: ClipboardWays::NONE,
                max_duration: None,
            },
        ),
        (
            Role::Operator,
            Policy {
                view_only: false,
                clipboard: ClipboardWays {
                    to_vm: true,
                    from_vm: false,
                },
                max_duration: Some(std::time::Duration::from_secs(3600)),
            },
        ),
    ] {
        let c = claims(100)
            .joining(role, joins)
            .with_policy(policy)
            .bound_to("2001:db8::7".parse().unwrap());
        let opened = key.open(&key.seal(&c).unwrap(), 0).unwrap();
        assert_eq!(opened, c);
        assert_eq!(opened.joins.unwrap().owner_token_id(), "abababababababab");
    }
    // An owner's token with policy, unbound.
    let c = claims(100).with_policy(Policy {
        view_only: true,
        clipboard: ClipboardWays {
            to_vm: false,
            from_vm: true,
        },
        max_duration: Some(MAX_DURATION),
    });
    assert_eq!(key.open(&key.seal(&c).unwrap(), 0), Ok(c));
    // An owner's token never names a session; a participant's always does.
    let owner_joining = Claims {
        joins: Some(joins),
        ..claims(100)
    };
    assert_eq!(key.seal(&owner_joining), Err(TokenError::Malformed));
    let operator_alone = Claims {
        role: Role::Operator,
        ..claims(100)
    };
    assert_eq!(key.seal(&operator_alone), Err(TokenError::Malformed));
}

#[test]
fn version_3_fields_out_of_range_are_malformed() {
    let key = TokenKey::generate().unwrap();
    let good = claims(100).encode().unwrap();
    // The fields after the user: role, view_only, clipboard, max_duration.
    let at = good.len() - 7;
    for (offset, value) in [(0, 3u8), (0, 0xff), (1, 2), (2, 4), (2, 0x80)] {
        let mut body = good.clone();
        body[at + offset] = value;
        assert_eq!(
            key.open(&seal_raw(&key, 3, body), 0),
            Err(TokenError::Malformed),
            "byte {offset} = {value}"
        );
    }
    // A max_duration past the longest.
    let mut body = good.clone();
    body[at + 3..at + 7].copy_from_slice(&(MAX_DURATION.as_secs() as u32 + 1).to_be_bytes());
    assert_eq!(
        key.open(&seal_raw(&key, 3, body), 0),
        Err(TokenError::Malformed)
    );
    // A participant's role without its session, and cut short.
    let mut body = good.clone();
    body[at] = 1;
    assert_eq!(
        key.open(&seal_raw(&key, 3, body), 0),
        Err(TokenError::Malformed)
    );
    for cut in 1..=7 {
        let body = good[..good.len() - cut].to_vec();
        assert_eq!(
            key.open(&seal_raw(&key, 3, body), 0),
            Err(TokenError::Malformed),
            "cut {cut}"
        );
    }
    assert_eq!(key.open(&seal_raw(&key, 3, good), 0), Ok(claims(100)));
}

#[test]
fn token_ids_parse_back() {
    let c = claims(100);
    assert_eq!(parse_token_id(&c.token_id()), Some([7; 8]));
    for bad in ["", "0707", "zz07070707070707", "070707070707070707"] {
        assert_eq!(parse_token_id(bad), None, "{bad}");
    }
}

/// One of each variant: a new one must be added here, and its reason to `REASONS`.
#[test]
fn every_refusal_reason_is_listed() {
    let ip: IpAddr = "127.0.0.1".parse().unwrap();
    let each = [
        TokenError::Malformed,
        TokenError::UnknownVersion(0),
        TokenError::BadSignature,
        TokenError::Expired {
            expires_at: 0,
            now: 0,
        },
        TokenError::TooLong { expires_at: 0 },
        TokenError::Replayed,
        TokenError::ReplayCacheFull,
        TokenError::WrongClient {
            bound: ip,
            presented: ip,
        },
        TokenError::StateUnavailable,
    ];
    let reasons: Vec<_> = each.iter().map(TokenError::reason).collect();
    assert_eq!(reasons, TokenError::REASONS);
}

#[test]
fn a_token_names_its_host_and_the_default_host_keeps_version_3() {
    let key = TokenKey::generate().unwrap();
    let grant = Grant {
        host: "node-2",
        domain: "web",
        uuid: [0x22; 16],
        kind: ConsoleKind::Vnc,
        user: "carol",
        client: None,
        ttl: std::time::Duration::from_secs(60),
        role: Role::Owner,
        joins: None,
        policy: Policy::default(),
    };
    let Issued { token, claims } = key.issue(&grant, 1_000).unwrap();
    let raw = URL_SAFE_NO_PAD.decode(&token).unwrap();
    assert_eq!(raw[0], 4);
    let opened = key.open(&token, 1_001).unwrap();
    assert_eq!(opened, claims);
    assert_eq!(opened.host, "node-2");
    // The host `default` is sealed as version 3, which builds before hosts open.
    let Issued { token, .. } = key
        .issue(
            &Grant {
                host: "default",
                ..grant.clone()
            },
            1_000,
        )
        .unwrap();
    let raw = URL_SAFE_NO_PAD.decode(&token).unwrap();
    assert_eq!(raw[0], 3);
    assert_eq!(key.open(&token, 1_001).unwrap().host, "default");
    // A participant's token and a bound one carry the host too.
    let Issued { token, .. } = key
        .issue(
            &Grant {
                role: Role::Observer,
                joins: Some(Joins {
                    session: 3,
                    owner: [1; 8],
                }),
                client: Some("2001:db8::1".parse().unwrap()),
                ..grant.clone()
            },
            1_000,
        )
        .unwrap();
    let opened = key.open(&token, 1_001).unwrap();
    assert_eq!(
        (opened.host.as_str(), opened.role, opened.client),
        (
            "node-2",
            Role::Observer,
            Some("2001:db8::1".parse().unwrap())
        )
    );
}

#[test]
fn a_version_4_token_naming_the_default_host_or_a_bad_name_is_malformed() {
    let claims = Claims::new("web", [3; 16], ConsoleKind::Vnc, "u", 2_000)
        .unwrap()
        .on_host("default");
    // Sealed by hand as version 4 with the host `default`: one token, one encoding.
    let mut body = claims.encode().unwrap();
    let at = 41 + 2 + 3 + 2 + 1;
    for (host, want) in [
        ("default", TokenError::Malformed),
        ("Bad", TokenError::Malformed),
    ] {
        let mut b = body[..at].to_vec();
        b.extend_from_slice(&(host.len() as u16).to_be_bytes());
        b.extend_from_slice(host.as_bytes());
        b.extend_from_slice(&body[at..]);
        assert_eq!(Claims::decode(4, &b).err(), Some(want), "{host}");
    }
    body.truncate(at);
    assert_eq!(Claims::decode(4, &body).err(), Some(TokenError::Malformed));
}
