//! Tokens with one fixed key. Any text opened as a token: never a panic, and what opens
//! holds claims within their bounds, unexpired, admitted once. Claims built from the
//! input: sealed exactly when they are within bounds, opened back to themselves (or
//! refused as expired), and refused once any single byte of the token is altered or it
//! is cut short.
//!
//! Input (the second use): flags (1: kind, role, view_only, clipboard, max_duration) |
//! domain length (U16) | user length (U16) | expires_at (U64) | index (U16) | mask (1) |
//! UUID (16, also the joined session and its owner) | domain and user bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::borrow::Cow;
use std::sync::OnceLock;
use vizor::token::{
    Claims, ClipboardWays, ConsoleKind, Joins, Policy, ReplayCache, Role, TokenError, TokenKey,
    MAX_DOMAIN_LEN, MAX_DURATION, MAX_LIFETIME, MAX_TOKEN_LEN, MAX_USER_LEN,
};

/// A throwaway key (the bytes 0 to 63): the sealed tokens in `fuzz/seeds/token` were
/// sealed with it.
const KEY_FILE: &str =
    "vizor-token-key-v1\nAAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8gISIjJCUmJygpKissLS4vMDEyMzQ1Njc4OTo7PD0-Pw\n";
/// The time every token is opened at (Unix seconds); the seeds expire after it.
const NOW: u64 = 1_700_000_000;
const HEADER: usize = 32;

/// `TokenKey` is only loaded from a file: write the fixed key to a private file once.
fn key() -> &'static TokenKey {
    static KEY: OnceLock<TokenKey> = OnceLock::new();
    KEY.get_or_init(|| {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path =
            std::env::temp_dir().join(format!("vizor-fuzz-token-{}.key", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .expect("write the fuzz key file");
        file.write_all(KEY_FILE.as_bytes())
            .expect("write the fuzz key file");
        let key = TokenKey::load(&path).expect("the fuzz key loads");
        let _ = std::fs::remove_file(&path);
        key
    })
}

fn check_opened(claims: &Claims) {
    assert!(claims.expires_at > NOW);
    assert!(!claims.domain.is_empty() && claims.domain.len() <= MAX_DOMAIN_LEN);
    assert!(claims.user.len() <= MAX_USER_LEN);
    assert_eq!(claims.token_id().len(), 16);
    // An owner's token joins no session; a participant's always one.
    assert_eq!(claims.role == Role::Owner, claims.joins.is_none());
    assert!(claims.policy.max_duration.is_none_or(|d| d.as_secs() >= 1 && d <= MAX_DURATION));
    let mut cache = ReplayCache::new(1);
    assert_eq!(cache.admit(claims, NOW), Ok(()));
    assert!(cache.is_used(claims, NOW));
    assert_eq!(cache.admit(claims, NOW), Err(TokenError::Replayed));
}

/// An altered or shortened token never opens, whatever the time: its tag is checked
/// before its claims, so it fails as malformed, of an unknown version or forged.
fn assert_refused(key: &TokenKey, token: &str) {
    match key.open(token, 0) {
        Err(TokenError::Malformed | TokenError::UnknownVersion(_) | TokenError::BadSignature) => {}
        other => panic!("altered token {token:?} gave {other:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let key = key();

    // Any input as token text.
    let text = String::from_utf8_lossy(data);
    if let Ok(claims) = key.open(&text, NOW) {
        assert!(text.len() <= MAX_TOKEN_LEN);
        check_opened(&claims);
        // No token outlives the end of time.
        assert!(key.open(&text, u64::MAX).is_err());
    }

    // The input as claims to seal.
    let Some((head, pool)) = data.split_at_checked(HEADER) else {
        return;
    };
    let kind = if head[0] & 1 == 0 {
        ConsoleKind::Vnc
    } else {
        ConsoleKind::Spice
    };
    let domain_len = usize::from(u16::from_be_bytes([head[1], head[2]])).min(pool.len());
    let (domain, rest) = pool.split_at(domain_len);
    let user_len = usize::from(u16::from_be_bytes([head[3], head[4]])).min(rest.len());
    let user = &rest[..user_len];
    let expires_at = u64::from_be_bytes(head[5..13].try_into().unwrap());
    let index = usize::from(u16::from_be_bytes([head[13], head[14]]));
    // Within ASCII, so an altered token is still text.
    let mask = (head[15] & 0x7f).max(1);
    let uuid: [u8; 16] = head[16..32].try_into().unwrap();

    let domain: Cow<str> = String::from_utf8_lossy(domain);
    let user: Cow<str> = String::from_utf8_lossy(user);
    let role = match (head[0] >> 1) & 3 {
        0 => Role::Owner,
        1 => Role::Operator,
        _ => Role::Observer,
    };
    // With bit 6, a max_duration of the index's value in seconds (0 is out of range).
    let max_duration = (head[0] & 0x40 != 0)
        .then(|| std::time::Duration::from_secs(u64::from(u16::from_be_bytes([head[13], head[14]]))));
    let policy = Policy {
        view_only: head[0] & 8 != 0,
        clipboard: ClipboardWays {
            to_vm: head[0] & 0x10 != 0,
            from_vm: head[0] & 0x20 != 0,
        },
        max_duration,
    };
    let mut claims = Claims::new(&domain, uuid, kind, &user, expires_at)
        .expect("randomness")
        .with_policy(policy);
    if role != Role::Owner {
        let joins = Joins {
            session: u64::from_be_bytes(uuid[..8].try_into().unwrap()),
            owner: uuid[8..].try_into().unwrap(),
        };
        claims = claims.joining(role, joins);
    }
    let in_bounds = !domain.is_empty()
        && domain.len() <= MAX_DOMAIN_LEN
        && user.len() <= MAX_USER_LEN
        && max_duration.is_none_or(|d| !d.is_zero());
    let token = match key.seal(&claims) {
        Ok(t) => t,
        Err(e) => {
            assert!(!in_bounds, "claims within bounds refused: {e}");
            assert_eq!(e, TokenError::Malformed);
            return;
        }
    };
    assert!(in_bounds, "claims out of bounds sealed");
    // Whatever can be sealed can be opened.
    assert!(token.len() <= MAX_TOKEN_LEN);
    match key.open(&token, NOW) {
        Ok(opened) => {
            assert!(expires_at > NOW && expires_at <= NOW + MAX_LIFETIME.as_secs());
            assert_eq!(opened, claims);
            check_opened(&opened);
        }
        Err(e) if expires_at <= NOW => {
            assert_eq!(e, TokenError::Expired { expires_at, now: NOW });
        }
        Err(e) => {
            assert!(expires_at > NOW + MAX_LIFETIME.as_secs(), "fresh token refused: {e}");
            assert_eq!(e, TokenError::TooLong { expires_at });
        }
    }

    // One altered byte.
    let mut altered = token.clone().into_bytes();
    let i = index % altered.len();
    altered[i] ^= mask;
    let altered = String::from_utf8(altered).expect("ASCII stays ASCII");
    assert_refused(key, &altered);
    // Cut short.
    assert_refused(key, &token[..index % token.len()]);
});
