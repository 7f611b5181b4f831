//! The SPICE keyboard path: spice-server's inputs channel hands each scancode byte to
//! QEMU, which decodes the stream with state that spans messages.
//!
//! The rules, from spice-server (`server/inputs-channel.cpp`) and QEMU 7.2
//! (`ui/spice-input.c`):
//! - KEY_DOWN and KEY_UP carry up to four bytes, least significant first, up to the
//!   first zero; KEY_SCANCODE carries any number. Every byte goes to QEMU.
//! - QEMU takes 0xE0 as a prefix for the next byte (0x80 is added to its number), even
//!   across messages. It swallows the bytes of the Pause sequence `E1 1D 45 E1 9D C5`
//!   while they match, sends Pause when all six did, and at the first byte that does not
//!   match forgets the bytes swallowed so far and takes that byte as a key of its own:
//!   `E1 1E 9E` is a (pressed, released), not Pause.
//! - spice-server keeps its own view of the lock keys: it toggles Caps, Num or Scroll
//!   Lock on each press of that key that is not already down, and takes the guest's LED
//!   state whenever QEMU reports it. A KEY_MODIFIERS request makes it press and release
//!   (Scroll, then Num, then Caps) each lock that differs from the request and is not
//!   held. vizor sends those presses itself instead (as KEY_SCANCODE), so that what the
//!   guest gets is exactly what vizor recorded ([`Keyboard::lock_request`]).
//! - QEMU's decoder state and spice-server's record of keys down outlive a client:
//!   when one leaves, spice-server releases the keys it records as down, through that
//!   decoder ([`Keyboard::disconnect`] says what the guest then gets, for the record).
//!   vizor sends [`RESET`] when a session's inputs channel links (an earlier client may
//!   have left a prefix half-sent), so its model starts where QEMU's decoder is.

use crate::{Ignored, Key, Locks, Origin, Stroke};

/// The Pause sequence, as QEMU matches it.
const PAUSE: [u8; 6] = [0xe1, 0x1d, 0x45, 0xe1, 0x9d, 0xc5];

const SCROLL: u8 = 1;
const NUM: u8 = 2;
const CAPS: u8 = 4;

/// The keyboard state of one SPICE inputs channel: QEMU's decoder, and spice-server's
/// lock keys and its record of keys down.
#[derive(Debug, Clone)]
pub struct Keyboard {
    /// An 0xE0 prefix is pending.
    emul0: bool,
    /// Bytes of the Pause sequence matched so far.
    pause: usize,
    /// spice-server's view of the locks (its `modifiers`).
    locks: u8,
    /// Lock keys down (its `modifiers_pressed`).
    held: u8,
    /// spice-server's record of keys down (`key`, `key_ext`), by set 1 make code;
    /// it releases them itself when the client leaves.
    keys: [bool; 128],
    keys_ext: [bool; 128],
    /// spice-server's pending prefix (`push_ext_type`: 0xE0 to 0xE2, or 0).
    push_ext: u8,
}

impl Default for Keyboard {
    fn default() -> Keyboard {
        Keyboard {
            emul0: false,
            pause: 0,
            locks: 0,
            held: 0,
            keys: [false; 128],
            keys_ext: [false; 128],
            push_ext: 0,
        }
    }
}

/// A byte that ends any half-sent prefix, in QEMU's decoder (0xE0, a partial Pause
/// sequence) and in spice-server's record, and reaches the guest as nothing: the
/// release of key 0x55 (or 0xD5 behind a prefix), numbers QEMU maps to no key.
pub const RESET: u8 = 0xD5;

/// The lock key presses that carry out a KEY_MODIFIERS request: at most three keys,
/// pressed and released.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LockPresses {
    bytes: [u8; 6],
    len: usize,
}

impl LockPresses {
    /// The scancode bytes, to send as KEY_SCANCODE (possibly none).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl Keyboard {
    /// A new channel: no prefix pending, locks off until the server says otherwise.
    pub fn new() -> Keyboard {
        Keyboard::default()
    }

    /// The guest's lock state as the server reported it (INPUTS_INIT, or the server's
    /// KEY_MODIFIERS when the guest's LEDs changed).
    pub fn server_locks(&mut self, modifiers: u16) {
        self.locks = (modifiers & 7) as u8;
    }

    /// The locks as spice-server sees them now.
    pub fn locks(&self) -> Locks {
        Locks::from_bits(u16::from(self.locks))
    }

    /// KEY_DOWN: the strokes the guest gets, appended to `out`.
    pub fn key_down(&mut self, code: u32, out: &mut Vec<Stroke>) {
        // spice-server looks at the low byte for the locks first.
        self.sync_locks(code as u8);
        self.code(code, out);
    }

    /// KEY_UP.
    pub fn key_up(&mut self, code: u32, out: &mut Vec<Stroke>) {
        self.code(code, out);
    }

    fn code(&mut self, code: u32, out: &mut Vec<Stroke>) {
        for b in code.to_le_bytes() {
            if b == 0 {
                break;
            }
            self.byte(b, Origin::Browser, out);
        }
    }

    /// KEY_SCANCODE (or vizor's own lock presses, `origin`).
    pub fn scancodes(&mut self, bytes: &[u8], origin: Origin, out: &mut Vec<Stroke>) {
        for &b in bytes {
            self.byte(b, origin, out);
        }
    }

    /// The presses spice-server would make for a KEY_MODIFIERS request of `requested`
    /// (flags: scroll 1, num 2, caps 4): for each lock that differs from its view and
    /// whose key is not held, a press and a release, Scroll, Num, then Caps. Feed them
    /// back through [`Keyboard::scancodes`] with [`Origin::LockRequest`] once sent.
    pub fn lock_request(&self, requested: u16) -> LockPresses {
        let mut p = LockPresses::default();
        for (flag, code) in [(SCROLL, 0x46u8), (NUM, 0x45), (CAPS, 0x3a)] {
            let wanted = requested & u16::from(flag) != 0;
            let now = self.locks & flag != 0;
            if wanted != now && self.held & flag == 0 {
                p.bytes[p.len] = code;
                p.bytes[p.len + 1] = code | 0x80;
                p.len += 2;
            }
        }
        p
    }

    fn byte(&mut self, b: u8, origin: Origin, out: &mut Vec<Stroke>) {
        self.track(b);
        self.qemu_byte(b, origin, out);
        self.sync_locks(b);
    }

    /// spice-server's record of keys down (`kbd_push_scan`): plain and 0xE0 keys are
    /// tracked, 0xE1 and 0xE2 sequences are not.
    fn track(&mut self, b: u8) {
        if (0xe0..=0xe2).contains(&b) {
            self.push_ext = b;
            return;
        }
        let state = match self.push_ext {
            0 => Some(&mut self.keys),
            0xe0 => Some(&mut self.keys_ext),
            _ => None,
        };
        if let Some(state) = state {
            state[usize::from(b & 0x7f)] = b & 0x80 == 0;
        }
        self.push_ext = 0;
    }

    /// The bytes spice-server pushes through QEMU's decoder when the client leaves
    /// (`inputs_release_keys`): the release of every key it records as down, plain
    /// keys first, then 0xE0 keys each behind its prefix.
    pub fn server_releases(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, _) in self.keys.iter().enumerate().filter(|(_, d)| **d) {
            out.push(i as u8 | 0x80);
        }
        for (i, _) in self.keys_ext.iter().enumerate().filter(|(_, d)| **d) {
            out.extend_from_slice(&[0xe0, i as u8 | 0x80]);
        }
        out
    }

    /// What the guest gets when the client leaves and spice-server releases what it
    /// holds ([`Keyboard::server_releases`]), through QEMU's decoder as it stands (a
    /// pending prefix included): appended to `out`, with [`Origin::Disconnect`].
    /// Afterwards spice-server holds nothing.
    pub fn disconnect(&mut self, out: &mut Vec<Stroke>) {
        let bytes = self.server_releases();
        self.scancodes(&bytes, Origin::Disconnect, out);
        // It clears its record as it goes, whatever a pending prefix made of a byte.
        self.keys = [false; 128];
        self.keys_ext = [false; 128];
    }

    /// QEMU's `kbd_push_key`.
    fn qemu_byte(&mut self, b: u8, origin: Origin, out: &mut Vec<Stroke>) {
        if b == 0xe0 {
            self.emul0 = true;
            return;
        }
        if b == PAUSE[self.pause] {
            self.pause += 1;
            if self.pause == PAUSE.len() {
                self.pause = 0;
                out.push(Stroke {
                    key: Key::PAUSE,
                    down: true,
                    ignored: None,
                    origin,
                });
            }
            return;
        }
        self.pause = 0;
        let mut number = b & 0x7f;
        if self.emul0 {
            self.emul0 = false;
            number |= 0x80;
        }
        let key = Key::from_number(number);
        out.push(Stroke {
            key,
            down: b & 0x80 == 0,
            ignored: (!key.is_key()).then_some(Ignored::NoKey),
            origin,
        });
    }

    /// spice-server's `sync_locks`.
    fn sync_locks(&mut self, b: u8) {
        let flag = match b & 0x7f {
            0x3a => CAPS,
            0x45 => NUM,
            0x46 => SCROLL,
            _ => return,
        };
        if b & 0x80 != 0 {
            self.held &= !flag;
        } else if self.held & flag == 0 {
            self.locks ^= flag;
            self.held |= flag;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(k: &mut Keyboard, bytes: &[u8]) -> Vec<(String, bool)> {
        let mut out = Vec::new();
        k.scancodes(bytes, Origin::Browser, &mut out);
        out.iter().map(|s| (s.key.label(), s.down)).collect()
    }

    fn s(name: &str, down: bool) -> (String, bool) {
        (name.to_owned(), down)
    }

    #[test]
    fn bytes_after_a_broken_pause_sequence_are_keys() {
        // The examples, as QEMU 7.2 took them: E1 then a, b, c; E1 then s, d.
        let mut k = Keyboard::new();
        assert_eq!(
            names(&mut k, &[0xe1, 0x1e, 0x9e, 0x30, 0xb0, 0x2e]),
            [
                s("a", true),
                s("a", false),
                s("b", true),
                s("b", false),
                s("c", true)
            ]
        );
        assert_eq!(
            names(&mut k, &[0xe1, 0x1f, 0x9f, 0x20, 0xa0]),
            [s("s", true), s("s", false), s("d", true), s("d", false)]
        );
        // Matched bytes are swallowed even when the sequence then breaks: E1 1D (a
        // Control press) then s is s alone.
        assert_eq!(names(&mut k, &[0xe1, 0x1d, 0x1f]), [s("s", true)]);
        // A byte that breaks the sequence is not tried as its start: E1 E1 is a
        // release of 0x61, which names no key.
        let mut out = Vec::new();
        k.scancodes(&[0xe1, 0xe1], Origin::Browser, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].down, out[0].ignored), (false, Some(Ignored::NoKey)));
    }

    #[test]
    fn the_whole_pause_sequence_is_one_press_across_messages() {
        let mut k = Keyboard::new();
        assert!(names(&mut k, &[0xe1, 0x1d, 0x45]).is_empty());
        assert_eq!(names(&mut k, &[0xe1, 0x9d, 0xc5]), [s("Pause", true)]);
        // Ctrl+Break is Pause too.
        assert_eq!(
            names(&mut k, &[0xe0, 0x46, 0xe0, 0xc6]),
            [s("Pause", true), s("Pause", false)]
        );
    }

    #[test]
    fn a_trailing_prefix_carries_into_the_next_message() {
        let mut k = Keyboard::new();
        assert!(names(&mut k, &[0xe0]).is_empty());
        assert_eq!(names(&mut k, &[0x48]), [s("Up", true)]);
        assert_eq!(names(&mut k, &[0x48]), [s("KP_8", true)]);
        // And into a KEY_DOWN.
        let mut out = Vec::new();
        k.scancodes(&[0xe0], Origin::Browser, &mut out);
        k.key_down(0x4d, &mut out);
        assert_eq!(out[0].key.name(), Some("Right"));
    }

    #[test]
    fn key_down_and_up_codes() {
        let mut k = Keyboard::new();
        let mut out = Vec::new();
        // spice-html5's extended keys: E0 | code << 8; bytes after a zero are not sent.
        k.key_down(0xe0 | 0x4d << 8, &mut out);
        k.key_up(0xe0 | 0xcd << 8, &mut out);
        k.key_down(0x1e | 0x30 << 16, &mut out);
        let got: Vec<_> = out.iter().map(|s| (s.key.label(), s.down)).collect();
        assert_eq!(got, [s("Right", true), s("Right", false), s("a", true)]);
        // Four bytes: all go.
        out.clear();
        k.key_down(u32::from_le_bytes([0x1e, 0x9e, 0x30, 0xb0]), &mut out);
        assert_eq!(out.len(), 4);
    }

    #[test]
    fn lock_requests_press_what_differs_and_is_not_held() {
        let mut k = Keyboard::new();
        k.server_locks(2); // Num Lock on
        assert_eq!(k.lock_request(2).bytes(), &[] as &[u8]);
        // Caps on, Num off: Num first, then Caps.
        let p = k.lock_request(4);
        assert_eq!(p.bytes(), &[0x45, 0xc5, 0x3a, 0xba]);
        let mut out = Vec::new();
        k.scancodes(p.bytes(), Origin::LockRequest, &mut out);
        assert_eq!(out.len(), 4);
        assert!(out.iter().all(|s| s.origin == Origin::LockRequest));
        assert_eq!(
            k.locks(),
            Locks {
                scroll: false,
                num: false,
                caps: true
            }
        );
        // A lock key held down is left alone.
        let mut out = Vec::new();
        k.key_down(0x46, &mut out);
        assert_eq!(k.locks().bits(), 4 | 1);
        assert_eq!(k.lock_request(4).bytes(), &[] as &[u8]);
        k.key_up(0xc6, &mut out);
        assert_eq!(k.lock_request(4).bytes(), &[0x46, 0xc6]);
        // A held key toggles once, however often it repeats.
        let mut k = Keyboard::new();
        for _ in 0..3 {
            k.key_down(0x3a, &mut out);
        }
        assert!(k.locks().caps);
    }

    #[test]
    fn a_leaving_client_has_spice_server_release_what_it_holds() {
        let mut k = Keyboard::new();
        let mut out = Vec::new();
        // Ctrl down, Right down (0xE0 key), then an unfinished Pause sequence.
        k.scancodes(
            &[0x1d, 0xe0, 0x4d, 0xe1, 0x1d, 0x45, 0xe1],
            Origin::Browser,
            &mut out,
        );
        // spice-server took the 45 after E1 1D for Num Lock pressed (the 1D after E1
        // ended its prefix), so it releases that too.
        assert_eq!(k.server_releases(), [0x9d, 0xc5, 0xe0, 0xcd]);
        out.clear();
        k.disconnect(&mut out);
        // Through QEMU's decoder mid-Pause: 9D continues the sequence (swallowed), C5
        // completes it (a Pause press), then Right is released.
        let got: Vec<_> = out
            .iter()
            .map(|s| (s.key.label(), s.down, s.origin))
            .collect();
        assert_eq!(
            got,
            [
                ("Pause".to_owned(), true, Origin::Disconnect),
                ("Right".to_owned(), false, Origin::Disconnect),
            ]
        );
        assert!(k.server_releases().is_empty());
        // An 0xE1 sequence is not on spice-server's record.
        let mut k = Keyboard::new();
        k.scancodes(
            &[0xe1, 0x1d, 0x45, 0xe1, 0x9d, 0xc5],
            Origin::Browser,
            &mut out,
        );
        assert!(k.server_releases().is_empty());
        // A pending 0xE0 turns a plain release into an extended one.
        let mut k = Keyboard::new();
        k.scancodes(&[0x1d, 0xe0], Origin::Browser, &mut out);
        out.clear();
        k.disconnect(&mut out);
        assert_eq!(out[0].key.name(), Some("Control_R"));
        // A reset clears a trailing prefix and reaches no key.
        let mut k = Keyboard::new();
        k.scancodes(&[0xe0], Origin::Browser, &mut out);
        out.clear();
        k.scancodes(&[RESET], Origin::Reset, &mut out);
        assert_eq!(out[0].ignored, Some(Ignored::NoKey));
        out.clear();
        k.scancodes(&[0x48], Origin::Browser, &mut out);
        assert_eq!(out[0].key.name(), Some("KP_8"));
    }

    #[test]
    fn never_panics() {
        let mut k = Keyboard::new();
        let mut out = Vec::new();
        for a in 0..=255u8 {
            for b in [0u8, 0x1c, 0x80, 0xe0, 0xe1, 0xff, 0x1d, 0x45, 0x9d, 0xc5] {
                k.scancodes(&[a, b, a], Origin::Browser, &mut out);
                k.key_down(u32::from_le_bytes([a, b, 0xe0, a]), &mut out);
                k.key_up(u32::from_le_bytes([b, a, 0, a]), &mut out);
                let _ = k.lock_request(u16::from(a) << 8 | u16::from(b));
            }
            out.clear();
        }
    }
}
