//! Client-to-server framing: any bytes, any segmentation, with or without the
//! extended pointer confirmed. Never a panic; spans tile what was consumed; a message
//! decoded from a prefix re-encodes to exactly its span; key events go through QEMU's
//! keyboard model (never more than the keys it holds plus one stroke).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vizor_keys::vnc::{Keyboard, Keymap};
use vizor_rfb::client::{ClientDecoder, ClientMessage};
use vizor_rfb::Limits;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(flags & 0x7f).max(1);
    let mut d = ClientDecoder::new(Limits {
        max_message_len: 1 << 16,
    });
    if flags & 0x80 != 0 {
        d.confirm(vizor_rfb::client::Confirmations::ALL);
    }
    let mut keyboard = Keyboard::new(Keymap::Default);
    let mut pending: Vec<u8> = Vec::new();
    let mut consumed = 0usize;
    for piece in stream.chunks(chunk) {
        pending.extend_from_slice(piece);
        loop {
            match d.decode(&pending) {
                Ok(Some((m, n))) => {
                    assert!(n > 0 && n <= pending.len());
                    // Encoding is canonical except for padding and flag bytes that
                    // carry any non-zero value; compare lengths, and bytes where the
                    // message has no such field.
                    let mut again = Vec::new();
                    m.write(&mut again).expect("a decoded message re-encodes");
                    assert_eq!(again.len(), n, "{m:?}");
                    if matches!(
                        m,
                        ClientMessage::KeyEvent { .. } | ClientMessage::QemuExtendedKeyEvent { .. }
                    ) {
                        assert_eq!(again[4..], pending[4..n]);
                    }
                    let outcome = match m {
                        ClientMessage::KeyEvent { down, keysym } => {
                            Some(keyboard.key_event(down, keysym))
                        }
                        ClientMessage::QemuExtendedKeyEvent {
                            down,
                            keysym,
                            keycode,
                        } => Some(keyboard.ext_key_event(down, keysym, keycode)),
                        _ => None,
                    };
                    if let Some(o) = outcome {
                        assert!(!o.strokes.is_empty() && o.strokes.len() <= 256);
                    }
                    // Clipboard contents are bounded and never panic.
                    if let ClientMessage::ClientCutText(t) = &m {
                        if let Ok(clips) = t.contents(1 << 16) {
                            assert!(clips.iter().map(|c| c.data.len()).sum::<usize>() <= 1 << 16);
                        }
                    }
                    consumed += n;
                    pending.drain(..n);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    assert_eq!(consumed + pending.len(), stream.len());
});
