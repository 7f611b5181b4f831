//! "Paste as keys" planning against any text on each layout: never a panic; text it
//! accepts becomes presses each of which types on that layout, and key events whose
//! every press is released, of keys SPICE's KEY_DOWN and KEY_UP can carry (no key
//! whose number or break code is a zero byte or a prefix).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vizor_keys::layout::{events, Layout};

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let layout = Layout::ALL[usize::from(which) % Layout::ALL.len()];
    let caps = which & 0x80 != 0;
    let text = String::from_utf8_lossy(rest);
    let Ok(presses) = layout.plan(&text, caps) else {
        return;
    };
    for p in &presses {
        // Caps Lock (around the text) types nothing; every other press does.
        assert!(p.key.number() == 0x3A || layout.typed(p.key, p.level).is_some(), "{p:?}");
    }
    let evs = events(&presses);
    assert_eq!(evs.iter().filter(|e| e.down).count(), evs.len() / 2);
    let mut held = std::collections::HashMap::new();
    for e in &evs {
        assert!(
            !matches!(e.key.number() & 0x7f, 0x00 | 0x60..=0x62),
            "{e:?}"
        );
        let n = held.entry(e.key).or_insert(0i32);
        *n += if e.down { 1 } else { -1 };
        assert!((0..=1).contains(n), "{e:?}");
    }
    assert!(held.values().all(|&n| n == 0));
});
