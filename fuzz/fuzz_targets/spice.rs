//! The SPICE codec against arbitrary bytes: link messages, channel framing with either
//! header and any segmentation, typed decoding of whole messages, the agent stream and
//! the keyboard model (scancodes, lock requests, lock state). Never a panic; spans tile what was consumed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vizor_keys::{spice::Keyboard, Origin};
use vizor_spice::agent::{
    self, AgentEvent, AgentStream, CapsReader, ClipboardReader, XferEvent, XferReader,
};
use vizor_spice::channel::{Decoder, Frame, HeaderKind};
use vizor_spice::handshake::{client, server, Progress};
use vizor_spice::link::{cap, Caps, LinkMess, LinkReply};
use vizor_spice::{msg, Limits};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, input)) = data.split_first() else {
        return;
    };
    let limits = Limits {
        max_link_len: 4096,
        max_message_len: 512,
        max_agent_message_len: 1 << 16,
    };
    match sel % 4 {
        0 => {
            if let Ok(Some((_, n))) = LinkMess::parse(input, &limits) {
                assert!(n <= input.len());
            }
            link_states(input, &limits);
        }
        1 => {
            if let Ok(Some((_, n))) = LinkReply::parse(input, &limits) {
                assert!(n <= input.len());
            }
        }
        _ => {
            let kind = if sel & 4 != 0 {
                HeaderKind::Mini
            } else {
                HeaderKind::Full
            };
            let channel = (sel >> 3) % 12;
            let chunk = usize::from(sel >> 4).max(1);
            let mut d = Decoder::new(kind, limits);
            let mut agent = AgentStream::new(limits);
            let mut xfer = XferReader::default();
            let mut xfer_ok = true;
            let mut readers: Option<(ClipboardReader, CapsReader)> = None;
            let mut pending = Vec::new();
            let mut consumed = 0usize;
            let mut keyboard = Keyboard::new();
            let mut strokes = Vec::new();
            for piece in input.chunks(chunk) {
                pending.extend_from_slice(piece);
                loop {
                    match d.decode(&pending) {
                        Ok(Some((f, n))) => {
                            assert!(n <= pending.len());
                            if let Frame::Whole { header, body } = f {
                                match msg::parse_client(channel, header.msg_type, body) {
                                    Ok(msg::ClientMessage::KeyDown(c)) => {
                                        keyboard.key_down(c, &mut strokes)
                                    }
                                    Ok(msg::ClientMessage::KeyUp(c)) => {
                                        keyboard.key_up(c, &mut strokes)
                                    }
                                    Ok(msg::ClientMessage::KeyModifiers(m)) => {
                                        let p = keyboard.lock_request(m);
                                        assert!(p.bytes().len() <= 6);
                                        keyboard.scancodes(
                                            p.bytes(),
                                            Origin::LockRequest,
                                            &mut strokes,
                                        );
                                    }
                                    _ => {}
                                }
                                if let Ok(msg::ServerMessage::ChannelsList(l)) =
                                    msg::parse_server(channel, header.msg_type, body)
                                {
                                    let kept = l.filtered(|t| t < 7);
                                    assert!(kept.len() <= 4 + 2 * l.iter().count());
                                }
                                if let Ok(
                                    msg::ServerMessage::InputsInit(b)
                                    | msg::ServerMessage::KeyModifiers(b),
                                ) = msg::parse_server(channel, header.msg_type, body)
                                {
                                    keyboard.server_locks(b);
                                    let _ = keyboard.server_releases();
                                }
                                // At most one stroke per byte.
                                assert!(strokes.len() <= 4 + 6);
                                strokes.clear();
                                if let Ok(msg::ServerMessage::AgentData(b)) =
                                    msg::parse_server(channel, header.msg_type, body)
                                {
                                    let mut events = Vec::new();
                                    let _ = agent.feed(b, &mut events);
                                    for e in &events {
                                        let _ = agent::FromClient::of(match e {
                                            AgentEvent::Begin { msg_type, .. }
                                            | AgentEvent::Data { msg_type, .. } => *msg_type,
                                        });
                                        if !xfer_ok {
                                            break;
                                        }
                                        let mut out = Vec::new();
                                        xfer_ok = xfer.feed(e, &mut out).is_ok();
                                        for x in out {
                                            match x {
                                                XferEvent::Start { name, .. } => assert!(
                                                    name.len() <= agent::MAX_XFER_NAME_LEN
                                                        && !name.contains(['/', '\\'])
                                                ),
                                                XferEvent::Data { bytes, .. } => {
                                                    assert!(bytes.len() <= b.len())
                                                }
                                                XferEvent::Status { .. } => {}
                                            }
                                        }
                                    }
                                    for e in events {
                                        if let AgentEvent::Data {
                                            msg_type,
                                            bytes,
                                            last,
                                        } = e
                                        {
                                            let (sel, caps) = readers.get_or_insert_with(|| {
                                                (
                                                    ClipboardReader::new(msg_type & 1 == 0),
                                                    CapsReader::default(),
                                                )
                                            });
                                            let contents = sel.feed(bytes);
                                            assert!(contents.len() <= bytes.len());
                                            caps.feed(bytes);
                                            let _ = caps.has(agent::cap::CLIPBOARD_SELECTION);
                                            if last {
                                                let _ =
                                                    sel.clip_type().map(agent::clipboard_format);
                                                readers = None;
                                            }
                                        }
                                    }
                                }
                                keyboard.scancodes(body, Origin::Browser, &mut strokes);
                                assert!(strokes.len() <= body.len());
                                strokes.clear();
                            }
                            consumed += n;
                            pending.drain(..n);
                        }
                        Ok(None) => break,
                        Err(_) => return,
                    }
                }
            }
            assert_eq!(consumed + pending.len(), input.len());
        }
    }
});

/// The proxy's side of a link toward a browser that sends `input` (link message, then
/// mechanism and ticket), with spice-server's reply fixed: each state consumes within
/// what it was given, and one that refuses says why in what it would send.
fn link_states(input: &[u8], limits: &Limits) {
    let Ok(Progress::Done { next: linking, consumed }) =
        server::ExpectLinkMess::new(*limits).receive(input)
    else {
        return;
    };
    assert!(consumed <= input.len());
    let mut rest = &input[consumed..];
    let mut to_vm = Vec::new();
    let _ = client::start(linking.mess(), *limits, &mut to_vm);
    assert!(LinkMess::parse(&to_vm, limits).is_ok());
    let mut caps = Caps::default();
    for bit in [cap::PROTOCOL_AUTH_SELECTION, cap::AUTH_SPICE, cap::MINI_HEADER] {
        caps.set(bit);
    }
    let reply = LinkReply {
        error: 0,
        pub_key: vec![1; 162],
        common_caps: caps,
        channel_caps: Caps::default(),
    };
    let mut out = Vec::new();
    let auth = linking.reply(&reply, &[2; 162], &mut out);
    assert!(LinkReply::parse(&out, limits).is_ok());
    let mut refusal = Vec::new();
    let ticket = match auth.receive(rest, &mut refusal) {
        Ok(Progress::Done { next, consumed }) => {
            assert!(consumed <= rest.len());
            rest = &rest[consumed..];
            next
        }
        Ok(Progress::NeedMore(_)) => return,
        Err(_) => {
            assert_eq!(refusal.len(), 4, "a refused mechanism is answered");
            return;
        }
    };
    if let Progress::Done { next, consumed } = ticket.receive(rest) {
        assert!(consumed <= rest.len());
        let mut out = Vec::new();
        assert!(next.result(0, &mut out).is_some());
    }
}
