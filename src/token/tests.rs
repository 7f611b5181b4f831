use super::*;

fn claims(expires_at: u64) -> Claims {
    Claims {
        domain: "demo1".into(),
        kind: ConsoleKind::Vnc,
        user: "alice".into(),
        expires_at,
        nonce: [7; 16],
        client: None,
    }
}

#[test]
fn seals_and_opens() {
    let key = TokenKey::generate().unwrap();
    let c = Claims::new(
        "0d3c5e4a-6b1f-4c2e-9a55-1b2c3d4e5f60",
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
        Err(TokenError::Expired { expires_at: 100 })
    );
    assert_eq!(key.open(&t, u64::MAX).unwrap_err().reason(), "expired");
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
    assert_eq!(Claims::decode(&body), Err(TokenError::Malformed));
}
