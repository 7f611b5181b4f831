//! The rules of a SPICE channel once it is linked, sans-IO.
//!
//! [`Rules`] holds what a relay must know about one channel to frame and judge its
//! messages: both directions' decoders, QEMU's keyboard as the channel moves it, the
//! guest agent's stream both ways (on the main channel), and the participant's policy.
//! The relay feeds it the bytes it read and carries out each [`Step`]: the notes go on
//! record first, then the verdict (forward, rewrite, drop) or the end.
//!
//! The rules, each unit-tested in `spice/tests.rs`:
//! 1. an inputs channel first resets QEMU's scancode decoder (an earlier client may
//!    have left a prefix half-sent), the strokes that makes on record
//!    ([`Rules::start`]);
//! 2. a key message (KEY_DOWN, KEY_UP, KEY_SCANCODE) records each stroke QEMU's
//!    decoder takes from it;
//! 3. KEY_MODIFIERS becomes the lock-key presses spice-server would make unrecorded,
//!    sent by vizor as KEY_SCANCODE with those strokes on record (nothing when nothing
//!    differs);
//! 4. a mouse press records its button;
//! 5. keyboard and pointer messages from a participant without input are dropped,
//!    unrecorded;
//! 6. a browser message beyond the bound is refused (what the browser sends is parsed
//!    whole), and so is one that does not parse;
//! 7. agent data before AGENT_START and agent messages a browser has no reason to send
//!    are refused, and so are file transfers under `file_transfer = "refuse"` (on
//!    record with what their start said);
//! 8. clipboard contents and file transfers through the agent are recorded both ways;
//! 9. the VM's channel list loses the channels vizor does not relay;
//! 10. MAIN_INIT gives the session id the session's other channels must name;
//! 11. pings and pongs on the main channel are the session's round trips;
//! 12. the lock state QEMU (INPUTS_INIT) or spice-server (KEY_MODIFIERS) reports is
//!     recorded when it changes;
//! 13. when the channel closes, the keys spice-server releases are recorded (inputs
//!     and main channels), the main channel's transfers in flight are recorded as
//!     incomplete, and a display channel whose browser never sent DISPLAY_INIT gets
//!     one from vizor (spice-server 0.15 can crash without it) ([`Rules::closing`]);
//! 14. a page's "Paste as keys" is typed as KEY_DOWN and KEY_UP messages judged as the
//!     browser's own (rules 2 and 5), their strokes on record as a paste's with the
//!     character's keysym ([`Rules::from_paste`]);
//! 15. a VM message too large to hold whole (`[limits] vm_message_max`; on a display
//!     channel 64 KiB) is streamed to the browser unread only when vizor has no reason
//!     to read it: display data, or a ping (spice-server's network test pads one to
//!     256,012 bytes; it goes unmeasured). One it reads (MAIN_INIT, agent data, the
//!     channel list, the lock state, SET_ACK) is refused. On a display channel the
//!     rest of a streamed message may be spliced past vizor once 64 KiB or more of it
//!     remain ([`Rules::may_splice`]).
//!
//! Not yet: a participant's clipboard ways. Agent data cannot be dropped message by
//! message without putting the agent stream out of step with spice-server's, so a
//! participant without clipboard rights must not get a main channel of its own to
//! QEMU; only owners exist today.

mod agent;
#[cfg(test)]
mod tests;
pub mod transfers;

use self::agent::{AgentFollower, AgentRecord, AgentShared, AgentSide};
use super::{DropReason, KeyNote, Note, Participant, Verdict};
use crate::config::SpiceConfig;
use crate::end::End;
use crate::live::Direction;
use std::sync::Mutex;
use vizor_keys::spice::Keyboard;
use vizor_keys::{Locks, Origin, Stroke};
use vizor_spice::agent::AgentStream;
use vizor_spice::channel::{write_message, Decoder, Frame, HeaderKind};
use vizor_spice::link::channel_type;
use vizor_spice::{msg, Limits};

/// Whether vizor relays channels of type `t`: the ones it parses always, the ones
/// whose contents it cannot audit (USB redirection, WebDAV, smartcard, port) only
/// when `[spice] allow_channels` names them.
pub fn relays(config: &SpiceConfig, t: u8) -> bool {
    matches!(t, channel_type::MAIN..=channel_type::RECORD)
        || config.allow_channels.iter().any(|c| c.channel_type() == t)
}

/// The largest display message held whole (rule 15): a larger one (a drawing) goes on
/// as it comes, so the browser gets its first bytes at once and vizor holds none of it.
/// The display messages vizor reads (SET_ACK, PING) are a few bytes.
const DISPLAY_WHOLE_MAX: usize = 64 << 10;

/// The state of one SPICE channel, between its browser participant and QEMU.
pub struct Rules {
    channel: u8,
    kind: HeaderKind,
    participant: Participant,
    spice: SpiceConfig,
    keep_clipboard: bool,
    browser_limits: Limits,
    /// The VM's bounds on this channel (a display channel holds less whole).
    vm_whole: Limits,
    browser: Decoder,
    vm: Decoder,
    agent: AgentShared,
    agent_in: (AgentFollower, AgentStream),
    agent_out: (AgentFollower, AgentStream),
    /// The browser sent DISPLAY_INIT (or this is no display channel).
    display_init_seen: bool,
    /// The serial of the browser's last message (full headers number them).
    last_serial: u64,
    /// The lock state last recorded.
    last_locks: Option<Locks>,
}

/// A main-channel ping, which the session's round trips are measured from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ping {
    /// The VM pinged the browser.
    Sent(u32),
    /// The browser answered.
    Answered(u32),
}

/// What one message (or, from the VM, one piece of a large one) comes to.
#[derive(Debug, PartialEq)]
pub struct Step {
    /// Bytes it spans at the front of the buffer.
    pub len: usize,
    /// Forward, rewrite (with no bytes: nothing goes in its place) or drop.
    pub verdict: Verdict,
    /// On record before it goes on, or before the session ends.
    pub notes: Vec<Note>,
    /// The session ends here, after the notes are on record: nothing of the message
    /// goes on, nor anything before it in the relay's buffer that was not sent yet
    /// (on record, then, though the VM never got it: the record holds no less than
    /// what reached the VM).
    pub end: Option<End>,
    /// It is the participant's input (the session is not idle).
    pub input: bool,
    /// A ping or its answer on the main channel.
    pub ping: Option<Ping>,
    /// QEMU's id of the session (MAIN_INIT).
    pub session_id: Option<u32>,
}

impl Step {
    fn forward(len: usize) -> Step {
        Step {
            len,
            verdict: Verdict::Forward,
            notes: Vec::new(),
            end: None,
            input: false,
            ping: None,
            session_id: None,
        }
    }
}

/// What is owed when a channel closes.
#[derive(Debug, Default, PartialEq)]
pub struct Closing {
    /// To record.
    pub notes: Vec<Note>,
    /// A DISPLAY_INIT for QEMU, for a display channel whose browser never sent one
    /// (while QEMU is there to take it).
    pub display_init: Option<Vec<u8>>,
}

/// The SPICE inputs message and code for QEMU's key `number` (set 1, 0x80 set for an
/// extended key): spice-server hands QEMU the code's bytes, low first, up to the first
/// zero byte.
fn paste_scancode(number: u8, down: bool) -> (u16, u32) {
    // Zero ends a code, and E0 to E2 are prefixes: no layout presses such a key.
    debug_assert!(!matches!(number & 0x7f, 0x00 | 0x60..=0x62), "{number:#x}");
    let brk = if down { 0 } else { 0x80 };
    let code = if number & 0x80 == 0 {
        u32::from(number | brk)
    } else {
        0xe0 | (u32::from((number & 0x7f) | brk) << 8)
    };
    let msg_type = if down {
        msg::inputs::MSGC_KEY_DOWN
    } else {
        msg::inputs::MSGC_KEY_UP
    };
    (msg_type, code)
}

fn key_notes(strokes: Vec<Stroke>) -> Vec<Note> {
    strokes
        .into_iter()
        .map(|stroke| {
            Note::Key(KeyNote {
                stroke,
                via: Some("scancode"),
                keysym: None,
                mismatch: false,
            })
        })
        .collect()
}

fn locked<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>, End> {
    m.lock()
        .map_err(|_| End::Internal("keyboard lock poisoned"))
}

impl Rules {
    /// The rules of a channel of type `channel` with `kind` headers, codec bounds per
    /// side, for `participant`.
    pub fn new(
        channel: u8,
        kind: HeaderKind,
        browser_limits: Limits,
        vm_limits: Limits,
        participant: Participant,
        spice: &SpiceConfig,
        keep_clipboard: bool,
    ) -> Rules {
        // Rule 15: a display channel holds less whole (drawings go on as they come).
        let vm_whole = if channel == channel_type::DISPLAY {
            Limits {
                max_message_len: vm_limits.max_message_len.min(DISPLAY_WHOLE_MAX),
                ..vm_limits
            }
        } else {
            vm_limits
        };
        // The browser's agent stream starts at its AGENT_START; the VM's at once.
        Rules {
            channel,
            kind,
            participant,
            spice: spice.clone(),
            keep_clipboard,
            browser_limits,
            vm_whole,
            browser: Decoder::new(kind, browser_limits),
            vm: Decoder::new(kind, vm_whole),
            agent: AgentShared::new(spice.file_transfer),
            agent_in: (AgentFollower::default(), AgentStream::new(browser_limits)),
            agent_out: (AgentFollower::default(), AgentStream::new(vm_limits)),
            display_init_seen: channel != channel_type::DISPLAY,
            last_serial: 0,
            last_locks: None,
        }
    }

    /// What vizor sends QEMU before anything of the browser's (rule 1), with the notes
    /// to record first.
    pub fn start(&mut self, keyboard: &Mutex<Keyboard>) -> Result<(Vec<u8>, Vec<Note>), End> {
        if self.channel != channel_type::INPUTS {
            return Ok((Vec::new(), Vec::new()));
        }
        let reset = [vizor_keys::spice::RESET];
        let mut strokes = Vec::new();
        locked(keyboard)?.scancodes(&reset, Origin::Reset, &mut strokes);
        let mut out = Vec::new();
        write_message(
            self.kind,
            0,
            msg::inputs::MSGC_KEY_SCANCODE,
            &reset,
            &mut out,
        )
        .map_err(|e| End::spice_protocol(Direction::BrowserToVm, &e))?;
        Ok((out, key_notes(strokes)))
    }

    /// A key event vizor types for the page's paste (rule 14): the KEY_DOWN or KEY_UP
    /// message QEMU's SPICE keyboard gets (the key's PC scancode, 0xE0 first for an
    /// extended key, the break code on release, as spice-html5 sends them), judged as
    /// the browser's own, its strokes on record as a paste's with the character's
    /// keysym.
    pub fn from_paste(
        &mut self,
        ev: vizor_keys::layout::Event,
        keyboard: &Mutex<Keyboard>,
    ) -> Result<(Vec<u8>, Step), End> {
        let number = ev.key.number();
        let (msg_type, code) = paste_scancode(number, ev.down);
        let mut bytes = Vec::new();
        write_message(
            self.kind,
            self.last_serial,
            msg_type,
            &code.to_le_bytes(),
            &mut bytes,
        )
        .map_err(|e| End::spice_protocol(Direction::BrowserToVm, &e))?;
        let mut step = self
            .from_browser(&bytes, keyboard)?
            .ok_or(End::Internal("a paste's key message was not whole"))?;
        for note in &mut step.notes {
            if let Note::Key(k) = note {
                if k.stroke.origin == Origin::Browser {
                    k.stroke.origin = Origin::Paste;
                    k.keysym = Some(ev.keysym);
                    // A prefix another message left in QEMU's decoder makes it another
                    // key: on record as what the guest gets, marked.
                    k.mismatch = k.stroke.key != ev.key;
                }
            }
        }
        Ok((bytes, step))
    }

    /// Judges the browser's next message at the front of `buf`; `None` until it is
    /// whole.
    pub fn from_browser(
        &mut self,
        buf: &[u8],
        keyboard: &Mutex<Keyboard>,
    ) -> Result<Option<Step>, End> {
        let protocol = |e: vizor_spice::Error| End::spice_protocol(Direction::BrowserToVm, &e);
        let Some((frame, len)) = self.browser.decode(buf).map_err(protocol)? else {
            return Ok(None);
        };
        let (header, body) = match frame {
            Frame::Whole { header, body } => (header, body),
            // Rule 6: what the browser sends is parsed whole; a message beyond the
            // bound is refused, not streamed on unread.
            Frame::Begin { header } => {
                return Err(protocol(vizor_spice::Error::LengthTooLarge {
                    what: "SPICE message",
                    len: u64::from(header.size),
                    max: self.browser_limits.max_message_len as u64,
                }))
            }
            Frame::Data(_) => return Err(End::Internal("browser message data after a refusal")),
        };
        if let Some(serial) = header.serial {
            self.last_serial = serial;
        }
        if self.channel == channel_type::DISPLAY && header.msg_type == msg::display::MSGC_INIT {
            self.display_init_seen = true;
        }
        let message = msg::parse_client(self.channel, header.msg_type, body).map_err(protocol)?;
        let mut step = Step::forward(len);
        let pointer_or_keys =
            message.is_input() && !matches!(message, msg::ClientMessage::AgentData(_));
        if pointer_or_keys && !self.participant.input {
            // Rule 5.
            step.verdict = Verdict::Drop(DropReason::NoInput);
            return Ok(Some(step));
        }
        step.input = message.is_input();
        let mut strokes = Vec::new();
        match message {
            // Rule 2.
            msg::ClientMessage::KeyDown(code) => locked(keyboard)?.key_down(code, &mut strokes),
            msg::ClientMessage::KeyUp(code) => locked(keyboard)?.key_up(code, &mut strokes),
            msg::ClientMessage::KeyScancode(bytes) => {
                locked(keyboard)?.scancodes(bytes, Origin::Browser, &mut strokes)
            }
            // Rule 3: spice-server would press the lock keys that differ from its view
            // of them, unrecorded: vizor sends those presses itself, as scancodes, so
            // the guest gets exactly what is on record.
            msg::ClientMessage::KeyModifiers(requested) => {
                let presses = {
                    let mut k = locked(keyboard)?;
                    let presses = k.lock_request(requested);
                    k.scancodes(presses.bytes(), Origin::LockRequest, &mut strokes);
                    presses
                };
                let mut out = Vec::new();
                // Nothing to press: nothing goes (an empty KEY_SCANCODE would do
                // nothing either).
                if !presses.bytes().is_empty() {
                    write_message(
                        self.kind,
                        header.serial.unwrap_or(0),
                        msg::inputs::MSGC_KEY_SCANCODE,
                        presses.bytes(),
                        &mut out,
                    )
                    .map_err(protocol)?;
                }
                step.verdict = Verdict::Rewrite(out);
            }
            msg::ClientMessage::AgentStart { .. } => self.agent_in.0.started = true,
            // Rules 7 and 8.
            msg::ClientMessage::AgentData(chunk) => {
                self.follow_agent(chunk, AgentSide::Browser, &mut step);
            }
            // Rule 4.
            msg::ClientMessage::MousePress { button, .. } => step.notes.push(Note::Button {
                button: msg::inputs::button_name(button),
                at: None,
            }),
            // Rule 11.
            msg::ClientMessage::Pong { id, .. } if self.channel == channel_type::MAIN => {
                step.ping = Some(Ping::Answered(id));
            }
            _ => {}
        }
        step.notes.extend(key_notes(strokes));
        Ok(Some(step))
    }

    /// Judges what the VM sent at the front of `buf`: a whole message, or a piece of
    /// one too large to hold (forwarded as it comes); `None` until there is one.
    pub fn from_vm(&mut self, buf: &[u8], keyboard: &Mutex<Keyboard>) -> Result<Option<Step>, End> {
        let protocol = |e: vizor_spice::Error| End::spice_protocol(Direction::VmToBrowser, &e);
        let Some((frame, len)) = self.vm.decode(buf).map_err(protocol)? else {
            return Ok(None);
        };
        let mut step = Step::forward(len);
        let (header, body) = match frame {
            Frame::Whole { header, body } => (header, body),
            // Rule 15: a message too large to hold is streamed on unread, so it must
            // be one vizor does not read (display data); one it reads is refused,
            // never passed on unread.
            Frame::Begin { header } if msg::server_read_whole(self.channel, header.msg_type) => {
                return Err(protocol(vizor_spice::Error::LengthTooLarge {
                    what: "SPICE message",
                    len: u64::from(header.size),
                    max: self.vm_whole.max_message_len as u64,
                }))
            }
            Frame::Begin { .. } | Frame::Data(_) => return Ok(Some(step)),
        };
        match msg::parse_server(self.channel, header.msg_type, body).map_err(protocol)? {
            // Rule 9: the channels vizor refuses are not offered, so a browser does not
            // try them (spice-html5 links every port channel listed).
            msg::ServerMessage::ChannelsList(list)
                if list.iter().any(|(t, _)| !relays(&self.spice, t)) =>
            {
                let body = list.filtered(|t| relays(&self.spice, t));
                let mut out = Vec::new();
                write_message(
                    self.kind,
                    header.serial.unwrap_or(0),
                    msg::main::MSG_CHANNELS_LIST,
                    &body,
                    &mut out,
                )
                .map_err(protocol)?;
                step.verdict = Verdict::Rewrite(out);
            }
            // Rule 10.
            msg::ServerMessage::MainInit { session_id, .. } => step.session_id = Some(session_id),
            msg::ServerMessage::AgentData(chunk) => {
                self.follow_agent(chunk, AgentSide::Vm, &mut step)
            }
            msg::ServerMessage::Ping { id, .. } if self.channel == channel_type::MAIN => {
                step.ping = Some(Ping::Sent(id));
            }
            // Rule 12: INPUTS_INIT carries the guest's LEDs; KEY_MODIFIERS may carry
            // spice-server's own view, and repeats it after input: the audit keeps
            // changes, and says which.
            msg::ServerMessage::InputsInit(bits) => {
                self.locks(bits, "qemu", keyboard, &mut step)?
            }
            msg::ServerMessage::KeyModifiers(bits) => {
                self.locks(bits, "spice_server", keyboard, &mut step)?
            }
            _ => {}
        }
        Ok(Some(step))
    }

    fn locks(
        &mut self,
        bits: u16,
        source: &'static str,
        keyboard: &Mutex<Keyboard>,
        step: &mut Step,
    ) -> Result<(), End> {
        locked(keyboard)?.server_locks(bits);
        let locks = Locks::from_bits(bits);
        if self.last_locks.replace(locks) != Some(locks) {
            step.notes.push(Note::Locks { locks, source });
        }
        Ok(())
    }

    /// Follows an AGENT_DATA chunk from `from`: what it completed goes on record, and
    /// what it refused ends the session after that.
    fn follow_agent(&mut self, chunk: &[u8], from: AgentSide, step: &mut Step) {
        let (follower, stream) = match from {
            AgentSide::Browser => &mut self.agent_in,
            AgentSide::Vm => &mut self.agent_out,
        };
        let fed = follower.feed(stream, chunk, from, &self.agent, self.keep_clipboard);
        for r in fed.records {
            step.notes.push(match r {
                AgentRecord::Clipboard(clip) => Note::Clipboard(clip, from.dir()),
                AgentRecord::FileTransfer(t) => Note::FileTransfer(t),
                AgentRecord::Refused { way, start } => Note::FileTransferRefused { way, start },
            });
        }
        step.end = fed.end;
    }

    /// How many body bytes of the VM's current message may go from socket to socket
    /// past vizor (spliced), with `buffered` bytes read and not yet judged: on a
    /// display channel, the rest of a streamed message of at least `min` bytes, and
    /// nothing while bytes are buffered (they come first). Only messages vizor does
    /// not read are streamed (rule 15).
    pub fn may_splice(&self, buffered: usize, min: u64) -> Option<u64> {
        let pending = self.vm.pending_data();
        (self.channel == channel_type::DISPLAY && buffered == 0 && pending >= min)
            .then_some(pending)
    }

    /// The relay spliced `n` bytes of the VM's current message past vizor: the decoder
    /// then stands after them.
    pub fn spliced(&mut self, n: u64) -> Result<(), End> {
        self.vm
            .consume_payload(n)
            .map_err(|e| End::spice_protocol(Direction::VmToBrowser, &e))
    }

    /// What the channel owes as it closes (rule 13); `vm_gone`: QEMU's side is closed
    /// already.
    pub fn closing(&mut self, keyboard: &Mutex<Keyboard>, vm_gone: bool) -> Closing {
        let mut closing = Closing::default();
        if self.channel == channel_type::INPUTS || self.channel == channel_type::MAIN {
            // When this connection closes (the inputs channel, or the main channel and
            // with it the client), spice-server releases the keys it holds, through
            // QEMU's decoder.
            let mut strokes = Vec::new();
            if let Ok(mut k) = keyboard.lock() {
                k.disconnect(&mut strokes);
            }
            closing.notes.extend(key_notes(strokes));
        }
        if self.channel == channel_type::MAIN {
            // Transfers the session's end cut short: on record with what passed.
            let open = self
                .agent
                .transfers
                .lock()
                .map(|mut t| t.end_all())
                .unwrap_or_default();
            closing
                .notes
                .extend(open.into_iter().map(Note::FileTransfer));
        }
        if !self.display_init_seen && !vm_gone {
            let mut out = Vec::new();
            let init = msg::display::default_init();
            if write_message(
                self.kind,
                self.last_serial.wrapping_add(1),
                msg::display::MSGC_INIT,
                &init,
                &mut out,
            )
            .is_ok()
            {
                closing.display_init = Some(out);
            }
        }
        closing
    }
}
