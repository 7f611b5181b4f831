//! The rules of a SPICE channel, one test each (numbered as in the module doc), fed
//! the bytes of real messages without sockets.

use super::*;
use crate::config::{FileTransfer, OpaqueChannel};
use vizor_spice::agent::{kind, write_message as agent_message};

const KIND: HeaderKind = HeaderKind::Mini;

/// One channel's rules with the VM's keyboard, fed whole messages.
struct Channel {
    rules: Rules,
    keyboard: Mutex<Keyboard>,
}

impl Channel {
    fn new(channel: u8) -> Channel {
        Channel::with(channel, Participant::OWNER, &SpiceConfig::default())
    }

    fn with(channel: u8, participant: Participant, spice: &SpiceConfig) -> Channel {
        let l = Limits::default();
        Channel {
            rules: Rules::new(channel, KIND, l, l, participant, spice, true),
            keyboard: Mutex::new(Keyboard::new()),
        }
    }

    fn browser(&mut self, msg_type: u16, body: &[u8]) -> Step {
        let wire = message(msg_type, body);
        let step = self
            .rules
            .from_browser(&wire, &self.keyboard)
            .expect("no end")
            .expect("whole");
        assert_eq!(step.len, wire.len());
        step
    }

    fn vm(&mut self, msg_type: u16, body: &[u8]) -> Step {
        let wire = message(msg_type, body);
        let step = self
            .rules
            .from_vm(&wire, &self.keyboard)
            .expect("no end")
            .expect("whole");
        assert_eq!(step.len, wire.len());
        step
    }
}

fn message(msg_type: u16, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    write_message(KIND, 1, msg_type, body, &mut out).unwrap();
    out
}

/// The keys the notes record, as (down, name).
fn keys(notes: &[Note]) -> Vec<(bool, &'static str)> {
    notes
        .iter()
        .filter_map(|n| match n {
            Note::Key(k) => Some((k.stroke.down, k.stroke.key.name().unwrap_or("?"))),
            _ => None,
        })
        .collect()
}

#[test]
fn rule_1_an_inputs_channel_first_resets_qemus_decoder() {
    let mut c = Channel::new(channel_type::INPUTS);
    let (out, notes) = c.rules.start(&c.keyboard).unwrap();
    assert_eq!(
        out,
        message(msg::inputs::MSGC_KEY_SCANCODE, &[vizor_keys::spice::RESET]),
        "one KEY_SCANCODE with the reset byte"
    );
    // On record as QEMU takes it: the byte of no key, its origin the reset.
    match &notes[..] {
        [Note::Key(k)] => {
            assert_eq!(k.stroke.origin, Origin::Reset);
            assert!(k.stroke.ignored.is_some(), "{k:?}");
        }
        other => panic!("{other:?}"),
    }
    // Other channels send nothing of vizor's.
    let mut main = Channel::new(channel_type::MAIN);
    assert_eq!(main.rules.start(&main.keyboard).unwrap(), (vec![], vec![]));
}

#[test]
fn rule_2_key_messages_record_each_stroke_qemu_takes() {
    let mut c = Channel::new(channel_type::INPUTS);
    let down = c.browser(msg::inputs::MSGC_KEY_DOWN, &0x1eu32.to_le_bytes());
    assert_eq!(down.verdict, Verdict::Forward);
    assert!(down.input);
    assert_eq!(keys(&down.notes), [(true, "a")]);
    let up = c.browser(msg::inputs::MSGC_KEY_UP, &0x9eu32.to_le_bytes());
    assert_eq!(keys(&up.notes), [(false, "a")]);
    // KEY_SCANCODE: every key its bytes make.
    let both = c.browser(msg::inputs::MSGC_KEY_SCANCODE, &[0x30, 0xb0]);
    assert_eq!(keys(&both.notes), [(true, "b"), (false, "b")]);
}

#[test]
fn rule_3_key_modifiers_become_recorded_lock_presses() {
    let mut c = Channel::new(channel_type::INPUTS);
    // Caps Lock wanted, none on: vizor presses it itself.
    let step = c.browser(msg::inputs::MSGC_KEY_MODIFIERS, &4u16.to_le_bytes());
    let Verdict::Rewrite(out) = &step.verdict else {
        panic!("{:?}", step.verdict);
    };
    assert_eq!(
        *out,
        message(msg::inputs::MSGC_KEY_SCANCODE, &[0x3a, 0xba]),
        "Caps Lock pressed and released, as scancodes"
    );
    assert_eq!(
        keys(&step.notes),
        [(true, "Caps_Lock"), (false, "Caps_Lock")]
    );
    // spice-server says Caps Lock is on now: asking for it again presses nothing, and
    // nothing goes.
    c.vm(msg::inputs::MSG_KEY_MODIFIERS, &4u16.to_le_bytes());
    let again = c.browser(msg::inputs::MSGC_KEY_MODIFIERS, &4u16.to_le_bytes());
    assert_eq!(again.verdict, Verdict::Rewrite(Vec::new()));
    assert!(keys(&again.notes).is_empty());
}

#[test]
fn rule_4_a_mouse_press_records_its_button() {
    let mut c = Channel::new(channel_type::INPUTS);
    let step = c.browser(msg::inputs::MSGC_MOUSE_PRESS, &[3, 4, 0]);
    assert_eq!(step.verdict, Verdict::Forward);
    assert_eq!(
        step.notes,
        [Note::Button {
            button: "right",
            at: None
        }]
    );
    // A release records nothing.
    let release = c.browser(msg::inputs::MSGC_MOUSE_RELEASE, &[3, 0, 0]);
    assert!(release.notes.is_empty() && release.input);
}

#[test]
fn rule_5_input_from_a_participant_without_input_is_dropped_unrecorded() {
    let mut c = Channel::with(
        channel_type::INPUTS,
        Participant::OBSERVER,
        &SpiceConfig::default(),
    );
    for (t, body) in [
        (msg::inputs::MSGC_KEY_DOWN, 0x1eu32.to_le_bytes().to_vec()),
        (msg::inputs::MSGC_KEY_SCANCODE, vec![0x1e]),
        (msg::inputs::MSGC_KEY_MODIFIERS, 4u16.to_le_bytes().to_vec()),
        (msg::inputs::MSGC_MOUSE_PRESS, vec![1, 1, 0]),
        (msg::inputs::MSGC_MOUSE_POSITION, vec![0; 11]),
    ] {
        let step = c.browser(t, &body);
        assert_eq!(step.verdict, Verdict::Drop(DropReason::NoInput), "type {t}");
        assert!(step.notes.is_empty() && !step.input, "type {t}");
    }
    // What is not input still goes.
    let ack = c.browser(msg::common::MSGC_ACK, &[]);
    assert_eq!(ack.verdict, Verdict::Forward);
}

#[test]
fn rule_6_an_oversized_or_broken_browser_message_is_refused() {
    let small = Limits {
        max_message_len: 64,
        ..Limits::default()
    };
    let mut rules = Rules::new(
        channel_type::INPUTS,
        KIND,
        small,
        Limits::default(),
        Participant::OWNER,
        &SpiceConfig::default(),
        false,
    );
    let keyboard = Mutex::new(Keyboard::new());
    let big = message(msg::inputs::MSGC_KEY_SCANCODE, &[0x1e; 65]);
    let end = rules.from_browser(&big[..10], &keyboard).unwrap_err();
    assert_eq!(end.protocol().map(|(d, _)| d), Some(Direction::BrowserToVm));
    // A KEY_DOWN shorter than its scancode.
    let mut c = Channel::new(channel_type::INPUTS);
    let short = message(msg::inputs::MSGC_KEY_DOWN, &[0x1e, 0]);
    let end = c.rules.from_browser(&short, &c.keyboard).unwrap_err();
    assert!(end.reason().contains("KEY_DOWN"), "{end}");
    // Half a message: wait for the rest.
    let whole = message(msg::inputs::MSGC_KEY_DOWN, &0x1eu32.to_le_bytes());
    let mut c = Channel::new(channel_type::INPUTS);
    assert_eq!(c.rules.from_browser(&whole[..5], &c.keyboard), Ok(None));
}

#[test]
fn rule_7_agent_traffic_a_browser_may_not_send_is_refused_on_record() {
    // Agent data before AGENT_START.
    let mut c = Channel::new(channel_type::MAIN);
    let mut clip = Vec::new();
    agent_message(kind::CLIPBOARD_RELEASE, &[], &mut clip);
    let step = c.browser(msg::main::MSGC_AGENT_DATA, &clip);
    assert_eq!(step.end.map(|e| e.label()), Some("agent_refused"));
    // A message type a browser has no reason to send (MOUSE_STATE).
    let mut c = Channel::new(channel_type::MAIN);
    c.browser(msg::main::MSGC_AGENT_START, &10u32.to_le_bytes());
    let mut mouse = Vec::new();
    agent_message(kind::MOUSE_STATE, &[0; 16], &mut mouse);
    let step = c.browser(msg::main::MSGC_AGENT_DATA, &mouse);
    assert_eq!(step.end.map(|e| e.label()), Some("agent_refused"));
    // A file transfer under file_transfer = "refuse": refused, and on record as such.
    let mut c = Channel::new(channel_type::MAIN);
    c.browser(msg::main::MSGC_AGENT_START, &10u32.to_le_bytes());
    let mut start = 7u32.to_le_bytes().to_vec();
    start.extend_from_slice(b"[vdagent-file-xfer]\nname=a.txt\nsize=3\n");
    let mut xfer = Vec::new();
    agent_message(kind::FILE_XFER_START, &start, &mut xfer);
    let step = c.browser(msg::main::MSGC_AGENT_DATA, &xfer);
    assert_eq!(
        step.notes,
        [Note::FileTransferRefused {
            way: transfers::Way::ToVm,
            start: Some((7, "a.txt".to_owned(), 3))
        }]
    );
    assert_eq!(step.end.map(|e| e.label()), Some("file_transfer_refused"));
}

#[test]
fn rule_8_agent_clipboard_and_transfers_are_recorded_both_ways() {
    let spice = SpiceConfig {
        file_transfer: FileTransfer::Audit,
        ..SpiceConfig::default()
    };
    let mut c = Channel::with(channel_type::MAIN, Participant::OWNER, &spice);
    c.browser(msg::main::MSGC_AGENT_START, &10u32.to_le_bytes());
    let mut body = 1u32.to_le_bytes().to_vec(); // UTF-8 text, no selection word
    body.extend_from_slice(b"hello");
    let mut clip = Vec::new();
    agent_message(kind::CLIPBOARD, &body, &mut clip);
    let from_browser = c.browser(msg::main::MSGC_AGENT_DATA, &clip);
    let from_vm = c.vm(msg::main::MSG_AGENT_DATA, &clip);
    for (step, dir) in [
        (from_browser, Direction::BrowserToVm),
        (from_vm, Direction::VmToBrowser),
    ] {
        assert_eq!(step.verdict, Verdict::Forward);
        match &step.notes[..] {
            [Note::Clipboard(c, d)] => {
                assert_eq!(
                    (c.length, c.content.as_deref(), *d),
                    (5, Some("hello"), dir)
                );
            }
            other => panic!("{other:?}"),
        }
    }
    // A transfer is recorded as it starts, before any of the file passes.
    let mut start = 9u32.to_le_bytes().to_vec();
    start.extend_from_slice(b"[vdagent-file-xfer]\nname=b.txt\nsize=2\n");
    let mut xfer = Vec::new();
    agent_message(kind::FILE_XFER_START, &start, &mut xfer);
    let step = c.browser(msg::main::MSGC_AGENT_DATA, &xfer);
    match &step.notes[..] {
        [Note::FileTransfer(r)] => assert_eq!((r.id, r.status), (9, "started")),
        other => panic!("{other:?}"),
    }
    // The other way too: the guest sends the browser a file.
    let mut start = 11u32.to_le_bytes().to_vec();
    start.extend_from_slice(b"[vdagent-file-xfer]\nname=c.txt\nsize=4\n");
    let mut xfer = Vec::new();
    agent_message(kind::FILE_XFER_START, &start, &mut xfer);
    let step = c.vm(msg::main::MSG_AGENT_DATA, &xfer);
    match &step.notes[..] {
        [Note::FileTransfer(r)] => assert_eq!(
            (r.id, r.status, r.way),
            (11, "started", transfers::Way::ToBrowser)
        ),
        other => panic!("{other:?}"),
    }
    // Rule 13: cut short by the channel's end, it is recorded as incomplete.
    let closing = c.rules.closing(&c.keyboard, false);
    assert!(
        closing
            .notes
            .iter()
            .any(|n| matches!(n, Note::FileTransfer(r) if r.id == 9 && r.status == "incomplete")),
        "{closing:?}"
    );
}

#[test]
fn rule_9_the_channel_list_loses_what_vizor_does_not_relay() {
    let list = |pairs: &[(u8, u8)]| {
        let mut b = (pairs.len() as u32).to_le_bytes().to_vec();
        for (t, id) in pairs {
            b.extend_from_slice(&[*t, *id]);
        }
        b
    };
    let offered = list(&[
        (channel_type::MAIN, 0),
        (channel_type::DISPLAY, 0),
        (channel_type::USBREDIR, 0),
        (channel_type::INPUTS, 0),
    ]);
    let mut c = Channel::new(channel_type::MAIN);
    let step = c.vm(msg::main::MSG_CHANNELS_LIST, &offered);
    assert_eq!(
        step.verdict,
        Verdict::Rewrite(message(
            msg::main::MSG_CHANNELS_LIST,
            &list(&[
                (channel_type::MAIN, 0),
                (channel_type::DISPLAY, 0),
                (channel_type::INPUTS, 0)
            ])
        ))
    );
    // Allowed, it stays, and the list goes as it came.
    let spice = SpiceConfig {
        allow_channels: vec![OpaqueChannel::Usbredir],
        ..SpiceConfig::default()
    };
    let mut c = Channel::with(channel_type::MAIN, Participant::OWNER, &spice);
    assert_eq!(
        c.vm(msg::main::MSG_CHANNELS_LIST, &offered).verdict,
        Verdict::Forward
    );
}

#[test]
fn rule_10_main_init_gives_the_session_id() {
    let mut c = Channel::new(channel_type::MAIN);
    let mut body = 0x5eed_u32.to_le_bytes().to_vec();
    body.resize(32, 0);
    let step = c.vm(msg::main::MSG_INIT, &body);
    assert_eq!(
        (step.session_id, &step.verdict),
        (Some(0x5eed), &Verdict::Forward)
    );
}

#[test]
fn rule_11_main_channel_pings_and_pongs_are_round_trips() {
    let ping = |id: u32| {
        let mut b = id.to_le_bytes().to_vec();
        b.extend_from_slice(&0u64.to_le_bytes());
        b
    };
    let mut c = Channel::new(channel_type::MAIN);
    assert_eq!(
        c.vm(msg::common::MSG_PING, &ping(3)).ping,
        Some(Ping::Sent(3))
    );
    assert_eq!(
        c.browser(msg::common::MSGC_PONG, &ping(3)).ping,
        Some(Ping::Answered(3))
    );
    // Another channel's pings are not the session's round trips.
    let mut d = Channel::new(channel_type::DISPLAY);
    assert_eq!(d.vm(msg::common::MSG_PING, &ping(4)).ping, None);
}

#[test]
fn rule_12_reported_locks_are_recorded_when_they_change() {
    let mut c = Channel::new(channel_type::INPUTS);
    let init = c.vm(msg::inputs::MSG_INIT, &2u16.to_le_bytes());
    assert!(matches!(
        &init.notes[..],
        [Note::Locks { source: "qemu", locks }] if *locks == Locks::from_bits(2)
    ));
    // The same state again: nothing new on record.
    assert!(c
        .vm(msg::inputs::MSG_KEY_MODIFIERS, &2u16.to_le_bytes())
        .notes
        .is_empty());
    let changed = c.vm(msg::inputs::MSG_KEY_MODIFIERS, &6u16.to_le_bytes());
    assert!(matches!(
        &changed.notes[..],
        [Note::Locks {
            source: "spice_server",
            ..
        }]
    ));
    // And the keyboard model follows: Caps Lock is on, so asking for it presses nothing.
    let again = c.browser(msg::inputs::MSGC_KEY_MODIFIERS, &6u16.to_le_bytes());
    assert_eq!(again.verdict, Verdict::Rewrite(Vec::new()));
}

#[test]
fn rule_13_a_closing_channel_records_released_keys_and_completes_display_init() {
    // A key held on the inputs channel: spice-server releases it at the close.
    let mut c = Channel::new(channel_type::INPUTS);
    c.browser(msg::inputs::MSGC_KEY_DOWN, &0x1eu32.to_le_bytes());
    let closing = c.rules.closing(&c.keyboard, false);
    assert_eq!(keys(&closing.notes), [(false, "a")]);
    assert_eq!(closing.display_init, None);
    // A display channel whose browser never sent DISPLAY_INIT gets vizor's, numbered
    // after the browser's last message; none when QEMU is gone, or when it was sent.
    let mut d = Channel::new(channel_type::DISPLAY);
    d.browser(msg::common::MSGC_ACK, &[]);
    let init = d
        .rules
        .closing(&d.keyboard, false)
        .display_init
        .expect("owed");
    let mut want = Vec::new();
    write_message(
        KIND,
        2,
        msg::display::MSGC_INIT,
        &msg::display::default_init(),
        &mut want,
    )
    .unwrap();
    assert_eq!(init, want);
    assert_eq!(d.rules.closing(&d.keyboard, true).display_init, None);
    let mut sent = Channel::new(channel_type::DISPLAY);
    sent.browser(msg::display::MSGC_INIT, &msg::display::default_init());
    assert_eq!(sent.rules.closing(&sent.keyboard, false).display_init, None);
}

#[test]
fn rule_13_the_main_channel_closing_records_the_keys_spice_server_releases() {
    // One VM keyboard, shared by the session's channels: a key held through the
    // inputs channel is released when the main channel (the client) goes.
    let keyboard = Mutex::new(Keyboard::new());
    let l = Limits::default();
    let rules = |channel| {
        Rules::new(
            channel,
            KIND,
            l,
            l,
            Participant::OWNER,
            &SpiceConfig::default(),
            false,
        )
    };
    let mut inputs = rules(channel_type::INPUTS);
    let down = message(msg::inputs::MSGC_KEY_DOWN, &0x1eu32.to_le_bytes());
    inputs.from_browser(&down, &keyboard).unwrap().unwrap();
    // A display channel's close releases nothing.
    assert!(keys(&rules(channel_type::DISPLAY).closing(&keyboard, false).notes).is_empty());
    let closing = rules(channel_type::MAIN).closing(&keyboard, false);
    assert_eq!(keys(&closing.notes), [(false, "a")]);
}

/// Full headers number messages: what vizor writes in a message's place keeps its
/// serial, and vizor's own DISPLAY_INIT follows the browser's last.
#[test]
fn what_vizor_writes_keeps_the_serials_of_full_headers() {
    let full = |serial: u64, msg_type: u16, body: &[u8]| {
        let mut out = Vec::new();
        write_message(HeaderKind::Full, serial, msg_type, body, &mut out).unwrap();
        out
    };
    let l = Limits::default();
    let keyboard = Mutex::new(Keyboard::new());
    let rules = |channel| {
        Rules::new(
            channel,
            HeaderKind::Full,
            l,
            l,
            Participant::OWNER,
            &SpiceConfig::default(),
            false,
        )
    };
    // Rule 3 under full headers.
    let mut inputs = rules(channel_type::INPUTS);
    let wire = full(41, msg::inputs::MSGC_KEY_MODIFIERS, &4u16.to_le_bytes());
    let step = inputs.from_browser(&wire, &keyboard).unwrap().unwrap();
    assert_eq!(
        step.verdict,
        Verdict::Rewrite(full(41, msg::inputs::MSGC_KEY_SCANCODE, &[0x3a, 0xba]))
    );
    // Rule 9 under full headers.
    let mut main = rules(channel_type::MAIN);
    let mut list = 2u32.to_le_bytes().to_vec();
    list.extend_from_slice(&[channel_type::MAIN, 0, channel_type::USBREDIR, 0]);
    let wire = full(7, msg::main::MSG_CHANNELS_LIST, &list);
    let step = main.from_vm(&wire, &keyboard).unwrap().unwrap();
    let mut kept = 1u32.to_le_bytes().to_vec();
    kept.extend_from_slice(&[channel_type::MAIN, 0]);
    assert_eq!(
        step.verdict,
        Verdict::Rewrite(full(7, msg::main::MSG_CHANNELS_LIST, &kept))
    );
    // Rule 13 under full headers.
    let mut display = rules(channel_type::DISPLAY);
    let ack = full(9, msg::common::MSGC_ACK, &[]);
    display.from_browser(&ack, &keyboard).unwrap().unwrap();
    assert_eq!(
        display.closing(&keyboard, false).display_init,
        Some(full(
            10,
            msg::display::MSGC_INIT,
            &msg::display::default_init()
        ))
    );
}

#[test]
fn the_display_init_after_the_last_serial_wraps_around() {
    // A browser's serial at the top of its range (found by the spice_rules fuzz target).
    let l = Limits::default();
    let keyboard = Mutex::new(Keyboard::new());
    let mut display = Rules::new(
        channel_type::DISPLAY,
        HeaderKind::Full,
        l,
        l,
        Participant::OWNER,
        &SpiceConfig::default(),
        false,
    );
    let mut ack = Vec::new();
    write_message(
        HeaderKind::Full,
        u64::MAX,
        msg::common::MSGC_ACK,
        &[],
        &mut ack,
    )
    .unwrap();
    display.from_browser(&ack, &keyboard).unwrap().unwrap();
    let mut want = Vec::new();
    write_message(
        HeaderKind::Full,
        0,
        msg::display::MSGC_INIT,
        &msg::display::default_init(),
        &mut want,
    )
    .unwrap();
    assert_eq!(display.closing(&keyboard, false).display_init, Some(want));
}

/// An owner's rules for a channel of type `channel` whose VM messages over 64 bytes
/// stream.
fn streaming(channel: u8) -> Rules {
    let small = Limits {
        max_message_len: 64,
        ..Limits::default()
    };
    Rules::new(
        channel,
        KIND,
        Limits::default(),
        small,
        Participant::OWNER,
        &SpiceConfig::default(),
        false,
    )
}

#[test]
fn a_large_vm_message_is_forwarded_in_pieces_as_it_comes() {
    let mut rules = streaming(channel_type::DISPLAY);
    let keyboard = Mutex::new(Keyboard::new());
    let big = message(msg::display::MSG_MARK, &[7; 200]);
    let mut at = 0;
    while at < big.len() {
        let step = rules
            .from_vm(&big[at..], &keyboard)
            .unwrap()
            .expect("a piece");
        assert_eq!(step.verdict, Verdict::Forward);
        at += step.len;
    }
    assert_eq!(at, big.len());
}

/// Rule 15: a message vizor reads is refused when it is too large to hold, not passed
/// on unread; display data that large may be spliced on a display channel, only once
/// nothing read before it waits, and the decoder then stands after what was spliced.
#[test]
fn rule_15_only_unread_display_data_is_streamed_and_spliced() {
    let keyboard = Mutex::new(Keyboard::new());
    let rules = streaming;
    let agent = message(msg::main::MSG_AGENT_DATA, &[0; 200]);
    let mut main = rules(channel_type::MAIN);
    assert!(matches!(
        main.from_vm(&agent, &keyboard),
        Err(End::Protocol { .. })
    ));
    let mut inputs = rules(channel_type::INPUTS);
    let modifiers = message(msg::inputs::MSG_KEY_MODIFIERS, &[0; 100]);
    assert!(inputs.from_vm(&modifiers, &keyboard).is_err());
    // spice-server's network-test ping (12 bytes and 256,000 of padding) goes on
    // unread at any bound: it only carries a round-trip sample.
    let mut net_test = 7u32.to_le_bytes().to_vec();
    net_test.extend_from_slice(&99u64.to_le_bytes());
    net_test.extend_from_slice(&[0; 256_000]);
    let ping = message(msg::common::MSG_PING, &net_test);
    let mut main = rules(channel_type::MAIN);
    let step = main.from_vm(&ping, &keyboard).unwrap().expect("its header");
    assert_eq!((step.len, step.ping), (6, None));
    // The same size of something vizor does not read goes on, but is not spliced off
    // the main channel.
    let mark = message(msg::display::MSG_MARK, &[7; 200]);
    let mut other = rules(channel_type::MAIN);
    let step = other
        .from_vm(&mark, &keyboard)
        .unwrap()
        .expect("its header");
    assert_eq!(step.len, 6);
    assert_eq!(other.may_splice(0, 1), None, "only display channels splice");

    let mut display = rules(channel_type::DISPLAY);
    let mut wire = mark.clone();
    wire.extend_from_slice(&message(msg::display::MSG_MARK, &[1]));
    let step = display
        .from_vm(&wire, &keyboard)
        .unwrap()
        .expect("its header");
    assert_eq!(step.len, 6);
    assert_eq!(display.may_splice(0, 201), None, "shorter than the least");
    assert_eq!(display.may_splice(10, 1), None, "bytes are buffered");
    assert_eq!(display.may_splice(0, 200), Some(200));
    let step = display.from_vm(&wire[6..56], &keyboard).unwrap().unwrap();
    assert_eq!(step.len, 50);
    assert_eq!(display.may_splice(0, 1), Some(150));
    assert!(display.spliced(151).is_err(), "beyond the message");
    display.spliced(150).unwrap();
    assert_eq!(display.may_splice(0, 1), None);
    let step = display.from_vm(&wire[206..], &keyboard).unwrap().unwrap();
    assert_eq!(step.len, 7, "the next message, whole");
}

/// Rule 14: a paste's key events go as KEY_DOWN and KEY_UP with the key's scancode (0xE0
/// first for an extended key such as AltGr, the break code on release), judged as the
/// browser's own: the strokes on record are a paste's and keep the character's keysym,
/// and an observer's reach nothing.
#[test]
fn rule_14_a_paste_is_typed_as_scancodes_on_record_as_a_pastes() {
    use vizor_keys::layout::{events, Layout};
    // German: z is the US y key (0x15); @ is AltGr (right Alt, E0 38) with q (0x10).
    let presses = Layout::De.plan("z@", false).unwrap();
    let mut c = Channel::new(channel_type::INPUTS);
    let mut sent = Vec::new();
    let mut notes = Vec::new();
    for ev in events(&presses) {
        let (bytes, step) = c.rules.from_paste(ev, &c.keyboard).unwrap();
        assert_eq!(step.verdict, Verdict::Forward);
        assert!(step.input);
        sent.extend(bytes);
        notes.extend(step.notes);
    }
    let key = |t, code: u32| message(t, &code.to_le_bytes());
    let (down, up) = (msg::inputs::MSGC_KEY_DOWN, msg::inputs::MSGC_KEY_UP);
    let mut want = key(down, 0x15);
    want.extend(key(up, 0x95));
    want.extend(key(down, 0x38e0));
    want.extend(key(down, 0x10));
    want.extend(key(up, 0x90));
    want.extend(key(up, 0xb8e0));
    // The headers carry the serial of the browser's last message (none yet: 0).
    let want: Vec<u8> = {
        let mut w = Vec::new();
        let mut at = 0;
        while at < want.len() {
            let size = u32::from_le_bytes(want[at + 2..at + 6].try_into().unwrap()) as usize;
            let body = &want[at + 6..at + 6 + size];
            let t = u16::from_le_bytes([want[at], want[at + 1]]);
            write_message(KIND, 0, t, body, &mut w).unwrap();
            at += 6 + size;
        }
        w
    };
    assert_eq!(sent, want);
    let recorded: Vec<_> = notes
        .iter()
        .map(|n| match n {
            Note::Key(k) => (
                k.stroke.origin,
                k.stroke.down,
                k.keysym,
                k.stroke.key.name(),
            ),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        recorded,
        [
            (Origin::Paste, true, Some(0x7a), Some("y")),
            (Origin::Paste, false, Some(0x7a), Some("y")),
            (Origin::Paste, true, Some(0xfe03), Some("Alt_R")),
            (Origin::Paste, true, Some(0x40), Some("q")),
            (Origin::Paste, false, Some(0x40), Some("q")),
            (Origin::Paste, false, Some(0xfe03), Some("Alt_R")),
        ]
    );
    // An observer's paste reaches nothing (the API refuses it first).
    let mut c = Channel::with(
        channel_type::INPUTS,
        Participant::OBSERVER,
        &SpiceConfig::default(),
    );
    let (_, step) = c
        .rules
        .from_paste(events(&presses)[0], &c.keyboard)
        .unwrap();
    assert!(matches!(step.verdict, Verdict::Drop(_)));
}
