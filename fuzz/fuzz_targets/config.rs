//! The configuration parser against any text: never a panic, and a configuration it
//! accepts keeps the bounds `src/config.rs` documents for its checked values.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::time::Duration;
use vizor::config::{Config, Fsync, MAX_PER_SESSION_SERIES};
use vizor::token::check_ttl;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Ok(c) = Config::parse(&text) else {
        return;
    };
    assert_eq!(check_ttl(c.tokens.ttl), Ok(()));
    assert!(!c.audit.key_file.as_os_str().is_empty());
    assert!((1..=MAX_PER_SESSION_SERIES).contains(&c.metrics.per_session_max));
    if let Some(n) = c.audit.rotate_size {
        assert!(n >= 4096);
    }
    if let Fsync::Interval(d) = c.audit.fsync {
        assert!(!d.is_zero() && d <= Duration::from_secs(3600));
    }
    assert!((4 << 10..=32 << 20).contains(&c.server.ws_message_size));
    // [limits]: counts at least 1, the two windows longer than 0s, "0s" idle is off,
    // message sizes 64KiB to 64MiB.
    let l = &c.limits;
    for n in [
        l.max_sessions,
        l.max_sessions_per_domain,
        l.max_sessions_per_user,
        l.max_connections,
        l.max_connections_per_client,
    ] {
        assert!(n >= 1);
    }
    assert!(!l.send_timeout.is_zero() && !l.failed_tokens_window.is_zero());
    assert_ne!(l.idle_timeout, Some(Duration::ZERO));
    for n in [l.browser_message_max, l.vm_message_max] {
        assert!((64 << 10..=64 << 20).contains(&n));
    }
    for o in &c.server.allowed_origins {
        assert_eq!(*o, o.to_ascii_lowercase());
        let host = o
            .strip_prefix("https://")
            .or_else(|| o.strip_prefix("http://"))
            .expect("an origin has a scheme");
        assert!(!host.is_empty() && !host.contains(['/', '?', '#', '@', ' ']));
    }
});
