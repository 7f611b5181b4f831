//! Every rule of [`Rules`], without sockets: a [`Pair`] stands for the relay, carrying
//! out what the rules decide on a browser's messages and a VM's bytes, in pieces of
//! any size.

use super::*;
use crate::policy::ClipboardWays;
use vizor_keys::vnc::{Keyboard, Pacer};
use vizor_rfb::server::{write_rect_header, write_update_header};
use vizor_rfb::PixelFormat;

/// The relay, in memory: what the rules let through each way, and what they put on
/// record, in order.
struct Pair {
    rules: Rules,
    keyboard: Mutex<VmKeyboard>,
    now: Instant,
    /// The relay's buffer of VM bytes.
    vm_buf: Vec<u8>,
    /// What reached the browser.
    to_browser: Vec<u8>,
    /// What reached the VM (after `start`).
    to_vm: Vec<u8>,
    /// On record, in order.
    notes: Vec<Note>,
    latencies: Vec<(Latency, Duration)>,
    /// What the browser's messages came to, one per message.
    judged: Vec<FromBrowser>,
}

impl Pair {
    fn new() -> Pair {
        Pair::with(Participant::OWNER, Keymap::Default)
    }

    fn with(participant: Participant, keymap: Keymap) -> Pair {
        let si = ServerInit {
            width: 64,
            height: 64,
            pixel_format: PixelFormat::RGB888,
            name: Vec::new(),
        };
        let mut rules = Rules::new(&si, Limits::default(), small(), participant, false);
        let first = rules.start();
        Pair {
            rules,
            keyboard: Mutex::new(VmKeyboard {
                vnc: Keyboard::new(keymap),
                pacer: Pacer::default(),
            }),
            now: Instant::now(),
            vm_buf: Vec::new(),
            to_browser: Vec::new(),
            to_vm: first,
            notes: Vec::new(),
            latencies: Vec::new(),
            judged: Vec::new(),
        }
    }

    /// The browser sends `bytes`: every whole message is judged and carried out.
    fn browser(&mut self, bytes: &[u8]) -> Result<(), End> {
        let mut pos = 0;
        while let Some(j) = self
            .rules
            .from_browser(&bytes[pos..], &self.keyboard, self.now)?
        {
            self.notes.extend(j.notes.iter().cloned());
            match &j.verdict {
                Verdict::Forward => self.to_vm.extend_from_slice(&bytes[pos..pos + j.len]),
                Verdict::Rewrite(b) => self.to_vm.extend_from_slice(b),
                Verdict::Drop(_) => {}
            }
            pos += j.len;
            self.judged.push(j);
        }
        assert_eq!(pos, bytes.len(), "the test sends whole messages");
        Ok(())
    }

    /// The VM sends `bytes` in pieces of `cut`, each carried out as the relay does.
    fn vm(&mut self, bytes: &[u8], cut: usize) -> Result<(), End> {
        for piece in bytes.chunks(cut) {
            self.vm_buf.extend_from_slice(piece);
            loop {
                let step = self.rules.from_vm(&self.vm_buf, self.now)?;
                self.notes.extend(step.notes);
                self.latencies.extend(step.latencies);
                self.to_browser.extend(self.vm_buf.drain(..step.send));
                self.vm_buf.drain(..step.skip);
                if !step.again {
                    break;
                }
            }
        }
        Ok(())
    }

    fn verdicts(&self) -> Vec<&Verdict> {
        self.judged.iter().map(|j| &j.verdict).collect()
    }
}

/// VM messages of at most 64 bytes are held whole.
fn small() -> Limits {
    Limits {
        max_message_len: 64,
    }
}

fn key(down: bool, keysym: u32) -> Vec<u8> {
    let mut v = vec![4, u8::from(down), 0, 0];
    v.extend_from_slice(&keysym.to_be_bytes());
    v
}

fn ext_key(down: bool, keysym: u32, keycode: u32) -> Vec<u8> {
    let mut v = vec![255, 0, 0, u8::from(down)];
    v.extend_from_slice(&keysym.to_be_bytes());
    v.extend_from_slice(&keycode.to_be_bytes());
    v
}

fn pointer(buttons: u8, x: u16, y: u16) -> Vec<u8> {
    let mut v = vec![5, buttons];
    v.extend_from_slice(&x.to_be_bytes());
    v.extend_from_slice(&y.to_be_bytes());
    v
}

fn update_request() -> Vec<u8> {
    vec![3, 1, 0, 0, 0, 0, 0, 64, 0, 64]
}

fn set_pixel_format(pf: &PixelFormat) -> Vec<u8> {
    let mut v = vec![0, 0, 0, 0];
    pf.write(&mut v);
    v
}

fn set_encodings(list: &[Encoding]) -> Vec<u8> {
    let mut v = Vec::new();
    write_set_encodings(list.iter().copied(), &mut v);
    v
}

fn cut_text(text: &[u8]) -> Vec<u8> {
    let mut v = vec![6, 0, 0, 0];
    v.extend_from_slice(&(text.len() as u32).to_be_bytes());
    v.extend_from_slice(text);
    v
}

fn server_cut_text(text: &[u8]) -> Vec<u8> {
    let mut v = vec![3, 0, 0, 0];
    v.extend_from_slice(&(text.len() as u32).to_be_bytes());
    v.extend_from_slice(text);
    v
}

fn set_desktop_size() -> Vec<u8> {
    let mut v = vec![251, 0, 0, 128, 0, 96, 1, 0];
    // One screen: id, x, y, width, height, flags.
    v.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 128, 0, 96, 0, 0, 0, 0]);
    v
}

fn led_update(state: u8) -> Vec<u8> {
    let mut v = Vec::new();
    write_update_header(1, &mut v);
    write_rect_header(0, 0, 1, 1, Encoding::QEMU_LED_STATE, &mut v);
    v.push(state);
    v
}

fn pixel_update(pixel: [u8; 4]) -> Vec<u8> {
    let mut v = Vec::new();
    write_update_header(1, &mut v);
    write_rect_header(0, 0, 1, 1, Encoding::RAW, &mut v);
    v.extend_from_slice(&pixel);
    v
}

fn button_notes(p: &Pair) -> Vec<&'static str> {
    p.notes
        .iter()
        .filter_map(|n| match n {
            Note::Button { button, .. } => Some(*button),
            _ => None,
        })
        .collect()
}

#[test]
fn rule_1_vizor_asks_for_the_led_state_first() {
    let p = Pair::new();
    assert_eq!(p.to_vm, set_encodings(&[Encoding::QEMU_LED_STATE]));
}

#[test]
fn rule_2_a_pixel_format_before_the_first_request_is_forwarded_and_reframes_updates() {
    let mut p = Pair::new();
    p.browser(&set_pixel_format(&PixelFormat::RGB565)).unwrap();
    assert_eq!(p.verdicts(), [&Verdict::Forward]);
    // A 1x1 raw rectangle is now 2 bytes: a 4-byte one would not frame.
    let mut update = Vec::new();
    write_update_header(1, &mut update);
    write_rect_header(0, 0, 1, 1, Encoding::RAW, &mut update);
    update.extend_from_slice(&[7, 7]);
    update.push(2); // Bell
    p.vm(&update, 3).unwrap();
    assert_eq!(p.to_browser, update);
}

#[test]
fn rule_3_a_pixel_format_after_the_first_request_ends_the_session() {
    let mut p = Pair::new();
    p.browser(&update_request()).unwrap();
    let end = p
        .browser(&set_pixel_format(&PixelFormat::RGB888))
        .unwrap_err();
    assert_eq!(end.label(), "pixel_format_change");
    assert_eq!(end.side(), crate::end::Side::Vizor);
}

#[test]
fn rule_4_set_encodings_loses_what_vizor_cannot_frame_and_keeps_the_led_state() {
    let mut p = Pair::new();
    p.to_vm.clear();
    let unframable = Encoding(0x1234);
    p.browser(&set_encodings(&[
        Encoding::TIGHT,
        unframable,
        Encoding::RAW,
    ]))
    .unwrap();
    assert_eq!(
        p.to_vm,
        set_encodings(&[Encoding::TIGHT, Encoding::RAW, Encoding::QEMU_LED_STATE])
    );
    // A browser that asked for the LED state itself keeps its own order.
    p.to_vm.clear();
    p.browser(&set_encodings(&[Encoding::QEMU_LED_STATE, Encoding::RAW]))
        .unwrap();
    assert_eq!(
        p.to_vm,
        set_encodings(&[Encoding::QEMU_LED_STATE, Encoding::RAW])
    );
}

#[test]
fn rule_5_set_desktop_size_goes_only_to_a_browser_that_offered_extended_desktop_size() {
    let mut p = Pair::new();
    p.browser(&set_desktop_size()).unwrap();
    assert_eq!(
        p.verdicts(),
        [&Verdict::Drop(DropReason::Unanswerable)],
        "QEMU would answer with a rectangle the browser cannot read"
    );
    let mut p = Pair::new();
    p.browser(&set_encodings(&[
        Encoding::RAW,
        Encoding::EXTENDED_DESKTOP_SIZE,
    ]))
    .unwrap();
    p.browser(&set_desktop_size()).unwrap();
    assert_eq!(p.judged[1].verdict, Verdict::Forward);
}

#[test]
fn rule_6_a_pointer_event_records_each_button_that_went_down() {
    let mut p = Pair::new();
    p.browser(&pointer(0, 1, 1)).unwrap();
    p.browser(&pointer(0b001, 2, 2)).unwrap(); // left down
    p.browser(&pointer(0b001, 3, 3)).unwrap(); // held: a drag, not a click
    p.browser(&pointer(0b101, 4, 4)).unwrap(); // right down too
    p.browser(&pointer(0, 5, 5)).unwrap(); // both up
    p.browser(&pointer(0b01000, 6, 6)).unwrap(); // wheel up
    assert_eq!(button_notes(&p), ["left", "right", "wheel_up"]);
    assert_eq!(
        p.notes[0],
        Note::Button {
            button: "left",
            at: Some((2, 2))
        }
    );
    assert!(p
        .judged
        .iter()
        .all(|j| j.verdict == Verdict::Forward && j.input));
}

#[test]
fn rule_7_a_key_event_records_the_strokes_qemu_takes_and_counts_its_queue() {
    let mut p = Pair::new();
    p.browser(&key(true, 0x61)).unwrap(); // a
    p.browser(&key(false, 0x61)).unwrap();
    let strokes: Vec<_> = p
        .notes
        .iter()
        .map(|n| match n {
            Note::Key(k) => (k.stroke.down, k.keysym, k.via),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        strokes,
        [
            (true, Some(0x61), Some("keysym")),
            (false, Some(0x61), Some("keysym"))
        ]
    );
    assert!(p.judged.iter().all(|j| j.queued_keys == Some(1) && j.input));
    // An extended key event: QEMU reads its keycode.
    let mut p = Pair::new();
    p.browser(&set_encodings(&[
        Encoding::RAW,
        Encoding::QEMU_EXTENDED_KEY_EVENT,
    ]))
    .unwrap();
    p.browser(&ext_key(true, 0x61, 0x1e)).unwrap();
    match &p.notes[..] {
        [Note::Key(k)] => assert_eq!((k.via, k.keysym), (Some("keycode"), Some(0x61))),
        other => panic!("{other:?}"),
    }
}

/// A paste's key events go through rule 7 (and 10) like the browser's own: without a
/// keymap as extended key events by key number, with one as keysyms; the strokes on
/// record are marked as a paste's and keep the keysym of the character typed.
#[test]
fn rule_7_a_paste_is_typed_as_key_events_on_record_as_a_pastes() {
    use vizor_keys::layout::{events, Layout};
    let presses = Layout::De.plan("zä", false).unwrap();
    let evs = events(&presses);
    let mut p = Pair::new();
    let mut sent = Vec::new();
    for ev in &evs {
        let (bytes, judged) = p.rules.from_paste(*ev, &p.keyboard, p.now).unwrap();
        assert_eq!(judged.verdict, Verdict::Forward);
        assert!(judged.input && judged.queued_keys == Some(1));
        p.notes.extend(judged.notes);
        sent.extend(bytes);
    }
    // German z is the US y key (0x15); ä is the US apostrophe key (0x28).
    let mut want = ext_key(true, 0x7a, 0x15);
    want.extend(ext_key(false, 0x7a, 0x15));
    want.extend(ext_key(true, 0xe4, 0x28));
    want.extend(ext_key(false, 0xe4, 0x28));
    assert_eq!(sent, want);
    let strokes: Vec<_> = p
        .notes
        .iter()
        .map(|n| match n {
            Note::Key(k) => (k.stroke.origin, k.stroke.down, k.keysym, k.via),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        strokes,
        [
            (Origin::Paste, true, Some(0x7a), Some("keycode")),
            (Origin::Paste, false, Some(0x7a), Some("keycode")),
            (Origin::Paste, true, Some(0xe4), Some("keycode")),
            (Origin::Paste, false, Some(0xe4), Some("keycode")),
        ]
    );
    // With a keymap, QEMU maps keysyms: plain key events go.
    let mut p = Pair::with(Participant::OWNER, Keymap::EnUs);
    let (bytes, _) = p.rules.from_paste(evs[0], &p.keyboard, p.now).unwrap();
    assert_eq!(bytes, key(true, 0x7a));
    // An observer's paste reaches nothing (the API refuses it first).
    let mut p = Pair::with(Participant::OBSERVER, Keymap::Default);
    let (_, judged) = p.rules.from_paste(evs[0], &p.keyboard, p.now).unwrap();
    assert!(matches!(judged.verdict, Verdict::Drop(_)));
}

#[test]
fn rule_8_on_a_keymap_vizor_does_not_model_the_keysym_is_recorded() {
    let mut p = Pair::with(Participant::OWNER, Keymap::Other("de".into()));
    p.browser(&key(true, 0x7a)).unwrap();
    assert_eq!(
        p.notes,
        [Note::Keysym {
            down: true,
            keysym: 0x7a,
            keymap: "de".into()
        }]
    );
}

#[test]
fn rule_9_browser_clipboard_is_recorded_before_it_goes_on() {
    let mut p = Pair::new();
    p.browser(&cut_text(b"secret")).unwrap();
    assert_eq!(p.verdicts(), [&Verdict::Forward]);
    match &p.notes[..] {
        [Note::Clipboard(c, Direction::BrowserToVm)] => {
            assert_eq!((c.format, c.length), ("text", 6));
            assert_eq!(c.content, None, "contents only when configured");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn rule_10_an_observer_reaches_nothing() {
    let mut p = Pair::with(Participant::OBSERVER, Keymap::Default);
    p.to_vm.clear();
    p.browser(&set_encodings(&[
        Encoding::RAW,
        Encoding::EXTENDED_DESKTOP_SIZE,
    ]))
    .unwrap();
    p.browser(&update_request()).unwrap();
    let before = p.to_vm.len();
    p.browser(&key(true, 0x61)).unwrap();
    p.browser(&pointer(1, 2, 2)).unwrap();
    p.browser(&set_desktop_size()).unwrap();
    p.browser(&cut_text(b"paste")).unwrap();
    assert_eq!(p.to_vm.len(), before, "the screen, nothing more");
    assert!(p.judged[2..]
        .iter()
        .all(|j| !j.input && j.queued_keys.is_none()));
    // Nothing reached the VM, so no key is on record; what was dropped is, once the
    // burst ends.
    assert_eq!(p.notes, []);
    // A second's pause ends the burst: its note comes with the next drop.
    p.now += Duration::from_millis(1500);
    p.browser(&pointer(0, 3, 3)).unwrap();
    assert_eq!(
        p.notes,
        [Note::InputDropped(crate::policy::Burst {
            keys: 1,
            pointer: 1,
            other: 1,
            clipboard: 1,
            clipboard_bytes: 5,
            lasted: Duration::ZERO,
        })]
    );
    // The connection's close ends the open one.
    assert_eq!(
        p.rules.closing(),
        [Note::InputDropped(crate::policy::Burst {
            pointer: 1,
            ..Default::default()
        })]
    );
    assert_eq!(p.rules.closing(), [], "once");
    assert_eq!(
        p.keyboard.lock().unwrap().vnc.disconnect(),
        [],
        "QEMU's keyboard never saw the key"
    );
    // The VM's clipboard does not reach it either; the session goes on.
    let mut stream = server_cut_text(b"guest");
    stream.push(2);
    p.vm(&stream, 4).unwrap();
    assert_eq!(p.to_browser, [2]);
    // One with input but no clipboard types and pastes nothing.
    let typist = Participant {
        clipboard: ClipboardWays::NONE,
        ..Participant::OWNER
    };
    let mut p = Pair::with(typist, Keymap::Default);
    p.browser(&key(true, 0x61)).unwrap();
    p.browser(&cut_text(b"x")).unwrap();
    assert_eq!(
        p.verdicts(),
        [&Verdict::Forward, &Verdict::Drop(DropReason::Clipboard)]
    );
}

#[test]
fn rule_10_each_clipboard_way_passes_its_direction_alone() {
    for (ways, to_vm, from_vm) in [
        ("both", true, true),
        ("to_vm", true, false),
        ("from_vm", false, true),
        ("none", false, false),
    ] {
        let participant = Participant {
            clipboard: ways.parse().unwrap(),
            ..Participant::OWNER
        };
        let mut p = Pair::with(participant, Keymap::Default);
        // Browser to VM: forwarded and on record, or dropped and counted.
        p.browser(&cut_text(b"paste")).unwrap();
        let passed = p.verdicts() == [&Verdict::Forward];
        assert_eq!(passed, to_vm, "{ways}: to the VM");
        match (&p.notes[..], to_vm) {
            ([Note::Clipboard(c, Direction::BrowserToVm)], true) => assert_eq!(c.length, 5),
            ([], false) => {
                assert_eq!(
                    p.rules.closing(),
                    [Note::InputDropped(crate::policy::Burst {
                        clipboard: 1,
                        clipboard_bytes: 5,
                        ..Default::default()
                    })],
                    "{ways}"
                );
            }
            (other, _) => panic!("{ways}: {other:?}"),
        }
        // VM to browser: relayed and on record, or held back and on record.
        p.notes.clear();
        let mut stream = server_cut_text(b"guest");
        stream.push(2);
        p.vm(&stream, 4).unwrap();
        if from_vm {
            let mut want = server_cut_text(b"guest");
            want.push(2);
            assert_eq!(p.to_browser, want, "{ways}: from the VM");
            assert!(
                matches!(&p.notes[..], [Note::Clipboard(c, Direction::VmToBrowser)] if c.length == 5),
                "{ways}: {:?}",
                p.notes
            );
        } else {
            assert_eq!(p.to_browser, [2], "{ways}: from the VM");
            assert_eq!(
                p.notes,
                [Note::ClipboardDropped {
                    dir: Direction::VmToBrowser,
                    length: 5
                }],
                "{ways}"
            );
        }
    }
}

/// An extended clipboard message (ClientCutText 6 or ServerCutText 3) with `flags`
/// and no contents.
fn ext_cut(msg_type: u8, flags: u32) -> Vec<u8> {
    let mut v = vec![msg_type, 0, 0, 0];
    v.extend_from_slice(&(-4i32).to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v
}

#[test]
fn rule_10_extended_clipboard_control_messages_follow_the_contents_they_lead_to() {
    use vizor_rfb::client::clipboard::{NOTIFY, REQUEST, TEXT};
    // A reader (from_vm) asks for the VM's clipboard and is told of it; it may not
    // announce contents of its own.
    let reader = Participant {
        clipboard: "from_vm".parse().unwrap(),
        ..Participant::OWNER
    };
    let mut p = Pair::with(reader, Keymap::Default);
    p.browser(&set_encodings(&[
        Encoding::RAW,
        Encoding::EXTENDED_CLIPBOARD,
    ]))
    .unwrap();
    p.browser(&ext_cut(6, REQUEST | TEXT)).unwrap();
    p.browser(&ext_cut(6, NOTIFY | TEXT)).unwrap();
    assert_eq!(
        p.verdicts()[1..],
        [&Verdict::Forward, &Verdict::Drop(DropReason::Clipboard)]
    );
    let mut stream = ext_cut(3, NOTIFY | TEXT);
    stream.push(2);
    p.vm(&stream, 3).unwrap();
    let mut want = ext_cut(3, NOTIFY | TEXT);
    want.push(2);
    assert_eq!(p.to_browser, want, "the VM's notify reaches the reader");
    // A writer (to_vm) is asked for its clipboard, never told of the VM's.
    let writer = Participant {
        clipboard: "to_vm".parse().unwrap(),
        ..Participant::OWNER
    };
    let mut p = Pair::with(writer, Keymap::Default);
    p.browser(&set_encodings(&[
        Encoding::RAW,
        Encoding::EXTENDED_CLIPBOARD,
    ]))
    .unwrap();
    let mut stream = ext_cut(3, NOTIFY | TEXT);
    stream.extend(ext_cut(3, REQUEST | TEXT));
    stream.push(2);
    p.vm(&stream, 5).unwrap();
    let mut want = ext_cut(3, REQUEST | TEXT);
    want.push(2);
    assert_eq!(
        p.to_browser, want,
        "the VM's request reaches the writer, its notify not"
    );
    assert_eq!(p.notes, [], "no contents were held back");
}

#[test]
fn rule_11_led_state_the_browser_did_not_ask_for_is_recorded_and_dropped() {
    let mut stream = pixel_update([1, 2, 3, 4]);
    stream.extend(led_update(4));
    stream.extend(pixel_update([5, 6, 7, 8]));
    stream.extend(led_update(4));
    stream.extend(led_update(6));
    stream.push(2); // Bell
    let mut expected = pixel_update([1, 2, 3, 4]);
    expected.extend(pixel_update([5, 6, 7, 8]));
    expected.push(2);
    let locks = |p: &Pair| -> Vec<u8> {
        p.notes
            .iter()
            .filter_map(|n| match n {
                Note::Locks { locks, source } => {
                    assert_eq!(*source, "qemu");
                    Some(locks.bits())
                }
                _ => None,
            })
            .collect()
    };
    // Whatever the reads' boundaries.
    for cut in [1, 2, 3, 5, 7, 13, 64, 4096] {
        let mut p = Pair::new();
        p.vm(&stream, cut).unwrap();
        assert_eq!(p.to_browser, expected, "cut {cut}");
        assert_eq!(locks(&p), [4, 6], "cut {cut}: changes only");
        // A browser that asked gets them all.
        let mut p = Pair::new();
        p.browser(&set_encodings(&[Encoding::RAW, Encoding::QEMU_LED_STATE]))
            .unwrap();
        p.vm(&stream, cut).unwrap();
        assert_eq!(p.to_browser, stream, "cut {cut}");
        assert_eq!(locks(&p), [4, 6]);
    }
}

#[test]
fn rule_12_vm_clipboard_is_recorded_as_it_goes_on() {
    let mut p = Pair::new();
    let stream = server_cut_text(b"from the guest");
    p.vm(&stream, 5).unwrap();
    assert_eq!(p.to_browser, stream);
    match &p.notes[..] {
        [Note::Clipboard(c, Direction::VmToBrowser)] => assert_eq!(c.length, 14),
        other => panic!("{other:?}"),
    }
}

#[test]
fn rule_13_vm_clipboard_beyond_the_bound_is_dropped_on_record_and_the_session_goes_on() {
    for cut in [1, 7, 64, 4096] {
        let mut p = Pair::new();
        let mut stream = pixel_update([1, 1, 1, 1]);
        stream.extend(server_cut_text(&[b'x'; 100])); // beyond the 64 of `small`
        stream.extend(pixel_update([2, 2, 2, 2]));
        p.vm(&stream, cut).unwrap();
        let mut expected = pixel_update([1, 1, 1, 1]);
        expected.extend(pixel_update([2, 2, 2, 2]));
        assert_eq!(p.to_browser, expected, "cut {cut}");
        assert_eq!(
            p.notes,
            [Note::ClipboardDropped {
                dir: Direction::VmToBrowser,
                length: 100
            }],
            "cut {cut}"
        );
    }
}

#[test]
fn rule_14_what_the_vm_confirms_frames_the_browsers_messages() {
    let mut p = Pair::new();
    p.browser(&set_encodings(&[Encoding::RAW, Encoding::FENCE]))
        .unwrap();
    let fence = [248, 0, 0, 0, 0, 0, 0, 1, 2, 9, 9];
    // Before the VM sent a fence, the browser may not.
    let mut early = Pair::new();
    early
        .browser(&set_encodings(&[Encoding::RAW, Encoding::FENCE]))
        .unwrap();
    let end = early.browser(&fence).unwrap_err();
    assert_eq!(
        end.protocol(),
        Some((Direction::BrowserToVm, "not_negotiated"))
    );
    p.vm(&fence, 4).unwrap();
    assert_eq!(p.to_browser, fence);
    p.browser(&fence).unwrap();
    assert_eq!(p.judged.last().map(|j| &j.verdict), Some(&Verdict::Forward));
}

#[test]
fn rule_15_an_update_answers_the_oldest_request_and_the_first_input() {
    let mut p = Pair::new();
    let t0 = p.now;
    p.browser(&update_request()).unwrap();
    p.now = t0 + Duration::from_millis(5);
    p.browser(&update_request()).unwrap();
    p.browser(&key(true, 0x61)).unwrap();
    p.now = t0 + Duration::from_millis(8);
    p.browser(&key(false, 0x61)).unwrap();
    p.now = t0 + Duration::from_millis(20);
    p.vm(&pixel_update([1, 2, 3, 4]), 4096).unwrap();
    assert_eq!(
        p.latencies,
        [
            (Latency::Frame, Duration::from_millis(20)),
            (Latency::InputToDisplay, Duration::from_millis(15)),
        ]
    );
    // The next update answers nothing measured.
    p.vm(&pixel_update([1, 2, 3, 4]), 4096).unwrap();
    assert_eq!(p.latencies.len(), 2);
}

#[test]
fn rule_16_a_broken_message_ends_the_session_as_that_sides_protocol_error() {
    let mut p = Pair::new();
    let end = p.browser(&[200, 0, 0, 0]).unwrap_err();
    assert_eq!(end.side(), crate::end::Side::Browser);
    assert_eq!(end.close_code(), 1008);
    let end = p.vm(&[77], 1).unwrap_err();
    assert_eq!(end.side(), crate::end::Side::Vm);
    assert_eq!(
        end.protocol(),
        Some((Direction::VmToBrowser, "unknown_message_type"))
    );
}

#[test]
fn a_long_rectangle_may_be_spliced_once_nothing_is_held() {
    let mut p = Pair::with(Participant::OWNER, Keymap::Default);
    // A 64x64 raw rectangle: 16 KiB of payload after its header.
    let mut head = Vec::new();
    write_update_header(1, &mut head);
    write_rect_header(0, 0, 64, 64, Encoding::RAW, &mut head);
    p.vm(&head, 4096).unwrap();
    assert_eq!(p.to_browser, head);
    assert_eq!(p.rules.may_splice(0, 1024), Some(64 * 64 * 4));
    assert_eq!(p.rules.may_splice(1, 1024), None, "bytes buffered");
    p.rules.spliced(64 * 64 * 4).unwrap();
    // The decoder stands after the rectangle: the next message frames.
    p.to_browser.clear();
    p.vm(&[2], 1).unwrap();
    assert_eq!(p.to_browser, [2]);
}
