//! The rules of an RFB session once both handshakes are done, sans-IO.
//!
//! [`Rules`] holds everything a relay must know about the session to frame and judge
//! its messages: both codecs (each direction's framing depends on what the other
//! negotiated), the LED-state filter, update timing and the participant's policy. The
//! relay feeds it the bytes it read and carries out what comes back:
//!
//! - [`Rules::from_browser`]: one browser message at a time, with its [`Verdict`], the
//!   [`Note`]s to record before it goes on, and how many key events it puts in QEMU's
//!   key queue;
//! - [`Rules::from_vm`]: what the VM sent, as bytes to send and bytes to skip at the
//!   front of the relay's buffer, with notes and latencies.
//!
//! The rules, each unit-tested below:
//! 1. vizor asks QEMU for its LED state before the browser speaks ([`Rules::start`]);
//! 2. SetPixelFormat before the first update request is forwarded and reframes what
//!    the VM sends; 3. after it, the session is refused;
//! 4. SetEncodings loses what vizor cannot frame and always keeps the LED state;
//! 5. SetDesktopSize without ExtendedDesktopSize is dropped;
//! 6. a pointer event records each button that went down (edge, not level);
//! 7. a key event records each stroke QEMU's keyboard takes, and counts QEMU's queue;
//! 8. on a keymap vizor does not model, the keysym is recorded;
//! 9. browser clipboard is recorded before it goes on;
//! 10. input and clipboard from a participant without the right are dropped, counted
//!     in bursts, one note each ([`super::Dropped`]);
//! 11. LED-state updates the browser did not ask for are dropped, the state recorded;
//! 12. VM clipboard is recorded; 13. beyond the bound (on the wire, or inflated) it is
//!     dropped, on record with its length, and the session goes on;
//! 14. what the VM confirms (extended mouse buttons, fence...) frames the browser's
//!     messages from then on;
//! 15. an update answers the oldest request and the first input since the last update:
//!     frame and input-to-display latency;
//! 16. a broken message either way ends the session as that side's protocol error.

use super::keyboards::VmKeyboard;
use super::{DropReason, Dropped, Input, KeyNote, Note, Participant, Verdict};
use crate::end::{End, Refusal};
use crate::live::{Direction, Latency};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use vizor_keys::vnc::{Keymap, Outcome};
use vizor_keys::{Locks, Origin};
use vizor_rfb::client::{write_set_encodings, ClientDecoder, ClientMessage, Confirmations};
use vizor_rfb::handshake::ServerInit;
use vizor_rfb::server::{RectInfo, ServerDecoder, ServerEvent};
use vizor_rfb::{Encoding, Limits};

/// An extended clipboard message's flags; `None` for legacy text.
fn extended_flags(text: &vizor_rfb::client::CutText<'_>) -> Option<u32> {
    match text {
        vizor_rfb::client::CutText::Extended { flags, .. } => Some(*flags),
        vizor_rfb::client::CutText::Latin1(_) => None,
    }
}

/// The state of one RFB session, between its browser participant and QEMU.
#[derive(Debug)]
pub struct Rules {
    server: ServerDecoder,
    client: ClientDecoder,
    participant: Participant,
    /// `[audit] clipboard = "content"`.
    keep_clipboard: bool,
    /// The browser asked for an update: its pixel format is fixed from now on.
    requested: bool,
    /// The browser offered ExtendedDesktopSize.
    offered_ext_desktop: bool,
    /// Pointer buttons held, as the last pointer event said.
    buttons_down: u16,
    /// The browser asked for QEMU's LED state itself.
    browser_leds: bool,
    leds: LedUpdates,
    /// Bytes at the front of the relay's buffer already decoded but held back.
    held: usize,
    timing: Timing,
    /// Input the participant may not give, in bursts.
    dropped: Dropped,
}

/// What to do with one message from the browser.
#[derive(Debug, PartialEq)]
pub struct FromBrowser {
    /// Bytes the message spans at the front of the buffer.
    pub len: usize,
    /// Forward, rewrite or drop.
    pub verdict: Verdict,
    /// On record before it goes on.
    pub notes: Vec<Note>,
    /// It is the participant's input (the session is not idle).
    pub input: bool,
    /// Key events it puts in QEMU's key queue, which the relay paces.
    pub queued_keys: Option<u32>,
}

impl FromBrowser {
    fn forward(len: usize) -> FromBrowser {
        FromBrowser {
            len,
            verdict: Verdict::Forward,
            notes: Vec::new(),
            input: false,
            queued_keys: None,
        }
    }

    fn drop(len: usize, why: DropReason) -> FromBrowser {
        FromBrowser {
            verdict: Verdict::Drop(why),
            ..FromBrowser::forward(len)
        }
    }
}

/// What to do with what the VM sent: the relay sends `send` bytes from the front of
/// its buffer to the browser, then skips `skip` bytes; with `again`, it decodes what is
/// left before it reads more.
#[derive(Debug, Default, PartialEq)]
pub struct FromVm {
    /// Bytes from the front of the buffer to the browser.
    pub send: usize,
    /// Bytes after those that go nowhere.
    pub skip: usize,
    /// Decode again before reading: something was skipped.
    pub again: bool,
    /// On record before the bytes go on.
    pub notes: Vec<Note>,
    /// Latencies measured.
    pub latencies: Vec<(Latency, Duration)>,
    /// Payload of the current rectangle still to come, which the relay may splice
    /// (see [`Rules::spliced`]).
    pub pending: u64,
}

impl Rules {
    /// The rules of a session whose ServerInit is `si`, with codec bounds per side.
    pub fn new(
        si: &ServerInit,
        browser_limits: Limits,
        vm_limits: Limits,
        participant: Participant,
        keep_clipboard: bool,
    ) -> Rules {
        Rules {
            server: ServerDecoder::new(si, vm_limits),
            client: ClientDecoder::new(browser_limits),
            participant,
            keep_clipboard,
            requested: false,
            offered_ext_desktop: false,
            buttons_down: 0,
            browser_leds: false,
            leds: LedUpdates::default(),
            held: 0,
            timing: Timing::default(),
            dropped: Dropped::default(),
        }
    }

    /// What goes on record as the connection closes: the burst of dropped input still
    /// open.
    pub fn closing(&mut self) -> Vec<Note> {
        self.dropped.close().into_iter().collect()
    }

    /// What vizor sends QEMU first, before the browser says anything: a request for its
    /// LED state. Without that extension QEMU presses Caps Lock and Num Lock itself
    /// (`lock-key-sync`) whenever a keysym's case or keypad meaning disagrees with what
    /// it believes the locks are: key presses no browser sent, from a lock state no one
    /// can see. With it QEMU injects nothing, and reports the guest's LED state, which
    /// is recorded. The browser's own SetEncodings keeps it (rule 4).
    pub fn start(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        write_set_encodings([Encoding::QEMU_LED_STATE], &mut out);
        self.server.set_encodings([Encoding::QEMU_LED_STATE]);
        out
    }

    /// The next whole message at the front of `buf`, judged; `None` when `buf` holds
    /// no whole message. `keyboard` is the VM's keyboard, shared with its other
    /// sessions.
    pub fn from_browser(
        &mut self,
        buf: &[u8],
        keyboard: &Mutex<VmKeyboard>,
        now: Instant,
    ) -> Result<Option<FromBrowser>, End> {
        let Some((msg, n)) = self.client.decode(buf).map_err(|e| End::from_browser(&e))? else {
            return Ok(None);
        };
        let input = self.participant.input;
        let judged = match msg {
            ClientMessage::SetPixelFormat(pf) => {
                // After the first request an update in the old format may be on its way
                // (QEMU also sends cursors unasked): the proxy could no longer tell
                // where the server's messages begin.
                if self.requested {
                    return Err(End::refused(
                        Refusal::PixelFormatChange,
                        "changing the pixel format after the first update request is not supported",
                    ));
                }
                self.server.set_pixel_format(pf);
                FromBrowser::forward(n)
            }
            ClientMessage::SetEncodings(list) => {
                let mut kept: Vec<Encoding> = list.iter().filter(|e| e.is_framable()).collect();
                if kept.len() != list.len() {
                    tracing::debug!(
                        dropped = list.len() - kept.len(),
                        "SetEncodings: encodings vizor cannot frame removed"
                    );
                }
                self.offered_ext_desktop = kept.contains(&Encoding::EXTENDED_DESKTOP_SIZE);
                self.browser_leds = kept.contains(&Encoding::QEMU_LED_STATE);
                if !self.browser_leds {
                    // See `start`: QEMU must never press lock keys itself.
                    kept.push(Encoding::QEMU_LED_STATE);
                }
                // The decoder learns the list before QEMU can answer it.
                self.server.set_encodings(kept.iter().copied());
                let mut out = Vec::new();
                write_set_encodings(kept, &mut out);
                FromBrowser {
                    verdict: Verdict::Rewrite(out),
                    ..FromBrowser::forward(n)
                }
            }
            ClientMessage::FramebufferUpdateRequest { .. } => {
                self.requested = true;
                self.timing.request(now);
                FromBrowser::forward(n)
            }
            ClientMessage::PointerEvent { .. }
            | ClientMessage::KeyEvent { .. }
            | ClientMessage::QemuExtendedKeyEvent { .. }
            | ClientMessage::SetDesktopSize { .. }
            | ClientMessage::Xvp { .. }
                if !input =>
            {
                let kind = match msg {
                    ClientMessage::PointerEvent { .. } => Input::Pointer,
                    ClientMessage::KeyEvent { .. } | ClientMessage::QemuExtendedKeyEvent { .. } => {
                        Input::Key
                    }
                    _ => Input::Other,
                };
                FromBrowser {
                    notes: self.dropped.count(kind, now).into_iter().collect(),
                    ..FromBrowser::drop(n, DropReason::NoInput)
                }
            }
            ClientMessage::PointerEvent { buttons, x, y } => {
                self.timing.input(now);
                let pressed = buttons & !self.buttons_down;
                self.buttons_down = buttons;
                let notes = (0..16)
                    .filter(|b| pressed & (1 << b) != 0)
                    .map(|bit| Note::Button {
                        button: vizor_rfb::client::button_name(bit),
                        at: Some((x, y)),
                    })
                    .collect();
                FromBrowser {
                    notes,
                    input: true,
                    ..FromBrowser::forward(n)
                }
            }
            ClientMessage::KeyEvent { down, keysym } => {
                self.key(n, keyboard, now, down, keysym, |k| {
                    k.key_event(down, keysym)
                })?
            }
            ClientMessage::QemuExtendedKeyEvent {
                down,
                keysym,
                keycode,
            } => self.key(n, keyboard, now, down, keysym, |k| {
                k.ext_key_event(down, keysym, keycode)
            })?,
            ClientMessage::ClientCutText(text) => {
                let clips = crate::audit::Clipboard::of_cut_text(&text, self.keep_clipboard)
                    .map_err(|e| End::from_browser(&e))?;
                if !super::clipboard_message_passes(
                    self.participant.clipboard,
                    Direction::BrowserToVm,
                    extended_flags(&text),
                ) {
                    let length = clips.iter().map(|c| c.length as u64).sum();
                    FromBrowser {
                        notes: self
                            .dropped
                            .count(Input::Clipboard(length), now)
                            .into_iter()
                            .collect(),
                        ..FromBrowser::drop(n, DropReason::Clipboard)
                    }
                } else {
                    FromBrowser {
                        notes: clips
                            .into_iter()
                            .map(|c| Note::Clipboard(c, Direction::BrowserToVm))
                            .collect(),
                        input: true,
                        ..FromBrowser::forward(n)
                    }
                }
            }
            // QEMU answers SetDesktopSize with an ExtendedDesktopSize rectangle even to
            // a client that never offered it, which the decoder would rightly refuse:
            // such a request is dropped instead.
            ClientMessage::SetDesktopSize { .. } if !self.offered_ext_desktop => {
                FromBrowser::drop(n, DropReason::Unanswerable)
            }
            _ => FromBrowser::forward(n),
        };
        Ok(Some(judged))
    }

    /// A key event: the strokes the VM's keyboard takes, on record, and its place in
    /// QEMU's key queue.
    fn key(
        &mut self,
        n: usize,
        keyboard: &Mutex<VmKeyboard>,
        now: Instant,
        down: bool,
        keysym: u32,
        press: impl FnOnce(&mut vizor_keys::vnc::Keyboard) -> Outcome,
    ) -> Result<FromBrowser, End> {
        self.timing.input(now);
        let (outcome, keymap) = {
            let mut k = keyboard
                .lock()
                .map_err(|_| End::Internal("keyboard lock poisoned"))?;
            (press(&mut k.vnc), k.vnc.keymap().clone())
        };
        Ok(FromBrowser {
            notes: key_notes(&keymap, &outcome, down, keysym),
            input: true,
            queued_keys: Some(outcome.queued()),
            ..FromBrowser::forward(n)
        })
    }

    /// Whether the guest's Caps Lock is on, as QEMU's LED state last said.
    pub fn caps_lock(&self) -> bool {
        self.leds
            .last
            .is_some_and(|v| Locks::from_bits(u16::from(v)).caps)
    }

    /// A key event vizor types for the participant's paste ("Paste as keys"): the
    /// message QEMU gets, judged as the browser's own would be (the participant's input
    /// right, QEMU's keyboard, its queue), its strokes on record as a paste's. Without
    /// a keymap QEMU acts on the key number of an extended key event; with one it maps
    /// the keysym itself, so a plain key event goes.
    pub fn from_paste(
        &mut self,
        ev: vizor_keys::layout::Event,
        keyboard: &Mutex<VmKeyboard>,
        now: Instant,
    ) -> Result<(Vec<u8>, FromBrowser), End> {
        let keymap = keyboard
            .lock()
            .map_err(|_| End::Internal("keyboard lock poisoned"))?
            .vnc
            .keymap()
            .clone();
        let msg = match keymap {
            Keymap::Default => ClientMessage::QemuExtendedKeyEvent {
                down: ev.down,
                keysym: ev.keysym,
                keycode: u32::from(ev.key.number()),
            },
            Keymap::EnUs | Keymap::Other(_) => ClientMessage::KeyEvent {
                down: ev.down,
                keysym: ev.keysym,
            },
        };
        let mut bytes = Vec::with_capacity(12);
        msg.write(&mut bytes)
            .map_err(|_| End::Internal("a paste's key event could not be written"))?;
        let mut judged = self
            .from_browser(&bytes, keyboard, now)?
            .ok_or(End::Internal("a paste's key event was not whole"))?;
        for note in &mut judged.notes {
            if let Note::Key(k) = note {
                if k.stroke.origin == Origin::Browser {
                    k.stroke.origin = Origin::Paste;
                }
            }
        }
        Ok((bytes, judged))
    }

    /// Judges what the VM sent: `buf` is the relay's buffer, whose first bytes may be
    /// decoded already and held back (an update that may be LED state alone).
    pub fn from_vm(&mut self, buf: &[u8], now: Instant) -> Result<FromVm, End> {
        let mut step = FromVm::default();
        let mut consumed = self.held;
        let mut cut = None;
        while let Some((ev, n)) = self
            .server
            .decode(&buf[consumed..])
            .map_err(|e| End::from_vm(&e))?
        {
            let confirms = Confirmations::of(&ev);
            if confirms != Confirmations::default() {
                self.client.confirm(confirms);
            }
            // A guest clipboard beyond vm_message_max is not held: it goes nowhere, on
            // record with its size, and the session goes on.
            match ev {
                ServerEvent::ServerCutTextDropped { len } => {
                    step.notes.push(Note::ClipboardDropped {
                        dir: Direction::VmToBrowser,
                        length: len,
                    });
                    cut = Some((consumed, consumed + n));
                    break;
                }
                ServerEvent::Dropped(_) => {
                    cut = Some((consumed, consumed + n));
                    break;
                }
                _ => {}
            }
            match self.leds.event(&ev, consumed, n, self.browser_leds) {
                LedStep::Changed(v) => step.notes.push(Note::Locks {
                    locks: Locks::from_bits(u16::from(v)),
                    source: "qemu",
                }),
                LedStep::Drop(range) => {
                    cut = Some(range);
                    break;
                }
                LedStep::None => {}
            }
            match ev {
                ServerEvent::UpdateEnd => {
                    let (frame, input) = self.timing.update_relayed(now);
                    step.latencies.extend(frame.map(|d| (Latency::Frame, d)));
                    step.latencies
                        .extend(input.map(|d| (Latency::InputToDisplay, d)));
                }
                ServerEvent::ServerCutText(text) => {
                    let passes = super::clipboard_message_passes(
                        self.participant.clipboard,
                        Direction::VmToBrowser,
                        extended_flags(&text),
                    );
                    match crate::audit::Clipboard::of_cut_text(&text, self.keep_clipboard) {
                        Ok(clips) if passes => step.notes.extend(
                            clips
                                .into_iter()
                                .map(|c| Note::Clipboard(c, Direction::VmToBrowser)),
                        ),
                        Ok(clips) => {
                            // Contents held back are on record; a control message
                            // held back withholds nothing.
                            if !clips.is_empty() {
                                step.notes.push(Note::ClipboardDropped {
                                    dir: Direction::VmToBrowser,
                                    length: clips.iter().map(|c| c.length as u64).sum(),
                                });
                            }
                            cut = Some((consumed, consumed + n));
                            break;
                        }
                        // An extended clipboard that inflates past the bound is dropped
                        // like one too long on the wire.
                        Err(vizor_rfb::Error::LengthTooLarge { len, .. }) => {
                            step.notes.push(Note::ClipboardDropped {
                                dir: Direction::VmToBrowser,
                                length: len,
                            });
                            cut = Some((consumed, consumed + n));
                            break;
                        }
                        Err(e) => return Err(End::from_vm(&e)),
                    }
                }
                _ => {}
            }
            consumed += n;
        }
        step.pending = self.server.pending_payload();
        if let Some((from, to)) = cut {
            // What came before goes on; the cut goes nowhere.
            step.send = from;
            step.skip = to - from;
            step.again = true;
            self.held = 0;
            return Ok(step);
        }
        // Everything decoded goes on, but for an update that may be LED state alone.
        let upto = self.leds.held_from().unwrap_or(consumed);
        self.leds.advanced(upto);
        self.held = consumed - upto;
        step.send = upto;
        Ok(step)
    }

    /// Whether the relay may splice the rest of the current rectangle now: nothing
    /// decoded is held back and enough payload is still to come.
    pub fn may_splice(&self, buffered: usize, min: u64) -> Option<u64> {
        let pending = self.server.pending_payload();
        (buffered == 0 && self.held == 0 && pending >= min).then_some(pending)
    }

    /// The relay spliced `n` bytes of the current rectangle past vizor: the decoder
    /// then stands after them.
    pub fn spliced(&mut self, n: u64) -> Result<(), End> {
        self.server.consume_payload(n).map_err(|e| End::from_vm(&e))
    }
}

/// The notes of a key event: one per stroke the guest's keyboard gets (or is denied),
/// the browser's keysym on its own.
fn key_notes(keymap: &Keymap, outcome: &Outcome, down: bool, keysym: u32) -> Vec<Note> {
    if outcome.strokes.is_empty() {
        return match keymap {
            Keymap::Other(name) => vec![Note::Keysym {
                down,
                keysym,
                keymap: name.clone(),
            }],
            _ => Vec::new(),
        };
    }
    outcome
        .strokes
        .iter()
        .map(|stroke| {
            let own = matches!(stroke.origin, Origin::Browser | Origin::Paste);
            Note::Key(KeyNote {
                stroke: *stroke,
                via: Some(outcome.via.as_str()),
                keysym: own.then_some(keysym),
                mismatch: own && outcome.mismatch,
            })
        })
        .collect()
}

/// QEMU's keyboard LED state reaches vizor as an update of one LED rectangle. vizor asks
/// QEMU for it on every connection ([`Rules::start`]), so such an update goes to the
/// browser only if the browser asked for it too; its values are recorded either way.
#[derive(Debug, Default)]
struct LedUpdates {
    /// Where an update of one rectangle begins, while it may be LED state alone and
    /// the browser did not ask for it.
    start: Option<usize>,
    /// The update's rectangle is LED state.
    led: bool,
    /// The last state seen.
    last: Option<u8>,
}

/// What an event means for LED updates.
#[derive(Debug, PartialEq, Eq)]
enum LedStep {
    None,
    /// The guest's lock state is new.
    Changed(u8),
    /// The update in this range (of the buffer the events came from) is LED state the
    /// browser did not ask for: drop it.
    Drop((usize, usize)),
}

impl LedUpdates {
    /// `ev` was decoded from `at`, `n` bytes long.
    fn event(&mut self, ev: &ServerEvent<'_>, at: usize, n: usize, browser_asked: bool) -> LedStep {
        match ev {
            ServerEvent::UpdateBegin { rects: 1 } if !browser_asked => {
                self.start = Some(at);
                self.led = false;
            }
            ServerEvent::UpdateBegin { .. } => self.start = None,
            ServerEvent::Rect(r) => {
                if let RectInfo::LedState(v) = r.info {
                    self.led = true;
                    if self.last != Some(v) {
                        self.last = Some(v);
                        return LedStep::Changed(v);
                    }
                } else {
                    self.start = None;
                }
            }
            ServerEvent::UpdateEnd => {
                if let (Some(start), true) = (self.start.take(), std::mem::take(&mut self.led)) {
                    return LedStep::Drop((start, at + n));
                }
            }
            _ => {}
        }
        LedStep::None
    }

    /// Where bytes must be held back from: the start of an update that may be dropped.
    fn held_from(&self) -> Option<usize> {
        self.start
    }

    /// `n` bytes left the front of the buffer.
    fn advanced(&mut self, n: usize) {
        if let Some(s) = &mut self.start {
            *s = s.saturating_sub(n);
        }
    }
}

/// When update requests and input went to QEMU, for the latency histograms.
#[derive(Debug, Default)]
struct Timing {
    /// The oldest update request not yet answered (one update answers every request
    /// received before it).
    requested: Option<Instant>,
    /// The first key or pointer event since the last update.
    input: Option<Instant>,
}

impl Timing {
    fn request(&mut self, now: Instant) {
        self.requested.get_or_insert(now);
    }

    fn input(&mut self, now: Instant) {
        self.input.get_or_insert(now);
    }

    /// An update was relayed at `now`: how long since the request it answers, and
    /// since the input it may show.
    fn update_relayed(&mut self, now: Instant) -> (Option<Duration>, Option<Duration>) {
        (
            self.requested
                .take()
                .map(|t| now.saturating_duration_since(t)),
            self.input.take().map(|t| now.saturating_duration_since(t)),
        )
    }
}

#[cfg(test)]
mod tests;
