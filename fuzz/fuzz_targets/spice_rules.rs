//! A SPICE channel's rules ([`vizor::policy::spice::Rules`]) fed what a browser and a
//! VM might send, interleaved and cut anywhere, carried out as the relay does. Never a
//! panic; every step stays within the bytes it was given; a participant without input
//! never has a key pressed in the VM's keyboard or a key or button on record; what
//! vizor writes in a message's place is whole messages; once a step ends the session,
//! it is over; only a display channel splices, and only what its message has left.
//!
//! Input: mode (1: bits 0-2 the channel type 1-7 (0 is main), bit 3 viewer, bit 4
//! full headers) | then chunks of head (1: bit 7 the VM's, bits 0-6 the length) and
//! that many bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::Mutex;
use vizor::config::{FileTransfer, SpiceConfig};
use vizor::policy::spice::Rules;
use vizor::policy::{Note, Participant, Verdict};
use vizor_keys::spice::Keyboard;
use vizor_spice::channel::{Decoder, Frame, HeaderKind};
use vizor_spice::Limits;

/// Whether `bytes` are whole messages of `kind` headers.
fn whole_messages(kind: HeaderKind, bytes: &[u8]) -> bool {
    let mut dec = Decoder::new(kind, Limits::default());
    let mut pos = 0;
    while pos < bytes.len() {
        match dec.decode(&bytes[pos..]) {
            Ok(Some((Frame::Whole { .. }, n))) => pos += n,
            _ => return false,
        }
    }
    true
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    let channel = match mode & 7 {
        0 => 1,
        c => c,
    };
    let participant = if mode & 8 == 0 {
        Participant::OWNER
    } else {
        Participant::OBSERVER
    };
    let kind = if mode & 16 == 0 {
        HeaderKind::Mini
    } else {
        HeaderKind::Full
    };
    let small = Limits {
        max_message_len: 256,
        ..Limits::default()
    };
    let spice = SpiceConfig {
        file_transfer: FileTransfer::Audit,
        ..SpiceConfig::default()
    };
    let mut rules = Rules::new(channel, kind, small, small, participant, &spice, true);
    let keyboard = Mutex::new(Keyboard::new());
    let Ok((first, _)) = rules.start(&keyboard) else {
        return;
    };
    assert!(whole_messages(kind, &first));
    let (mut from_browser, mut from_vm) = (Vec::new(), Vec::new());
    while let Some((&head, tail)) = rest.split_first() {
        let len = usize::from(head & 0x7f).min(tail.len());
        let (chunk, tail) = tail.split_at(len);
        rest = tail;
        let (buf, browser) = if head & 0x80 == 0 {
            (&mut from_browser, true)
        } else {
            (&mut from_vm, false)
        };
        buf.extend_from_slice(chunk);
        let mut pos = 0;
        loop {
            let step = if browser {
                rules.from_browser(&buf[pos..], &keyboard)
            } else {
                rules.from_vm(&buf[pos..], &keyboard)
            };
            let step = match step {
                Ok(Some(s)) => s,
                Ok(None) => break,
                Err(_) => return,
            };
            assert!(step.len > 0 && pos + step.len <= buf.len());
            if browser && !participant.input {
                assert!(!step.notes.iter().any(|n| matches!(n, Note::Key(_) | Note::Button { .. })));
            }
            if let Verdict::Rewrite(b) = &step.verdict {
                assert!(whole_messages(kind, b));
            }
            if step.end.is_some() {
                return;
            }
            pos += step.len;
        }
        buf.drain(..pos);
        // The relay splices the rest of a long display message past the rules: only
        // on a display channel, only with nothing buffered, and the rules then stand
        // after it (no more than the message holds is taken).
        if !browser {
            if let Some(pending) = rules.may_splice(buf.len(), 1) {
                assert_eq!(channel, 2, "only display channels splice");
                assert!(buf.is_empty() && pending > 0);
                assert!(rules.spliced(pending + 1).is_err());
                assert!(rules.spliced(pending).is_ok());
                assert_eq!(rules.may_splice(0, 1), None);
            }
        }
    }
    let closing = rules.closing(&keyboard, false);
    if let Some(init) = &closing.display_init {
        assert!(whole_messages(kind, init));
    }
    if !participant.input {
        let pressed = closing.notes.iter().any(|n| matches!(n, Note::Key(k) if k.stroke.down));
        assert!(!pressed, "a viewer's key was down");
    }
});
