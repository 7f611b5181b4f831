//! An RFB session's rules ([`vizor::policy::rfb::Rules`]) fed what a browser and a VM
//! might send, interleaved and cut anywhere, carried out as the relay does. Never a
//! panic; every step stays within the bytes it was given; a participant without input
//! rights never reaches the VM's keyboard or has input on record; once a side's bytes
//! are refused the session is over.
//!
//! Input: participant (1: bit 0 viewer, bit 1 an unmodelled keymap) | then chunks of
//! head (1: bit 7 the VM's, bits 0-6 the length) and that many bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use vizor::policy::rfb::Rules;
use vizor::policy::{Note, Participant, Verdict};
use vizor::policy::keyboards::VmKeyboard;
use vizor_keys::vnc::{Keyboard, Keymap, Pacer};
use vizor_rfb::handshake::ServerInit;
use vizor_rfb::{Limits, PixelFormat};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    let participant = if mode & 1 == 0 {
        Participant::OWNER
    } else {
        Participant::OBSERVER
    };
    let keymap = if mode & 2 == 0 {
        Keymap::Default
    } else {
        Keymap::Other("de".into())
    };
    let si = ServerInit {
        width: 64,
        height: 48,
        pixel_format: PixelFormat::RGB888,
        name: Vec::new(),
    };
    let small = Limits {
        max_message_len: 256,
    };
    let mut rules = Rules::new(&si, small, small, participant, true);
    let keyboard = Mutex::new(VmKeyboard {
        vnc: Keyboard::new(keymap),
        pacer: Pacer::default(),
    });
    assert!(!rules.start().is_empty());
    let mut now = Instant::now();
    let (mut from_browser, mut from_vm) = (Vec::new(), Vec::new());
    while let Some((&head, tail)) = rest.split_first() {
        let len = usize::from(head & 0x7f).min(tail.len());
        let (chunk, tail) = tail.split_at(len);
        rest = tail;
        // An empty chunk is a pause long enough to end a burst of dropped input.
        now += Duration::from_millis(if len == 0 { 2000 } else { 1 });
        if head & 0x80 == 0 {
            from_browser.extend_from_slice(chunk);
            let mut pos = 0;
            loop {
                match rules.from_browser(&from_browser[pos..], &keyboard, now) {
                    Ok(Some(j)) => {
                        assert!(j.len > 0 && pos + j.len <= from_browser.len());
                        if !participant.input {
                            assert!(!j.input && j.queued_keys.is_none());
                            // What it sent is dropped and counted, never recorded as
                            // reaching the VM.
                            assert!(j.notes.iter().all(|n| matches!(n, Note::InputDropped(_))));
                            assert!(!matches!(j.verdict, Verdict::Forward) || !j.input);
                        }
                        if let Verdict::Rewrite(b) = &j.verdict {
                            assert!(!b.is_empty());
                        }
                        pos += j.len;
                    }
                    Ok(None) => break,
                    Err(_) => return,
                }
            }
            from_browser.drain(..pos);
        } else {
            from_vm.extend_from_slice(chunk);
            loop {
                let step = match rules.from_vm(&from_vm, now) {
                    Ok(s) => s,
                    Err(_) => return,
                };
                assert!(step.send + step.skip <= from_vm.len());
                from_vm.drain(..step.send + step.skip);
                if !step.again {
                    break;
                }
            }
            if let Some(n) = rules.may_splice(from_vm.len(), 1) {
                // Half the time, as if spliced past vizor.
                if n % 2 == 0 && rules.spliced(n).is_err() {
                    return;
                }
            }
        }
    }
    let closing = rules.closing();
    assert!(closing.len() <= 1 && closing.iter().all(|n| matches!(n, Note::InputDropped(_))));
    assert!(rules.closing().is_empty(), "a burst is closed once");
    if !participant.input {
        assert!(
            keyboard.lock().unwrap().vnc.disconnect().is_empty(),
            "an observer pressed a key"
        );
    }
});
