//! QEMU 7.2's VNC keyboard: which key a VNC key event presses, and what QEMU drops or
//! adds.
//!
//! The rules, from `ui/vnc.c`, `ui/kbd-state.c` and `ui/keymaps.c`, each seen on a real
//! QEMU 7.2:
//! - A QEMU extended key event is acted on by its keycode alone (truncated to 16 bits);
//!   the keysym is not read. With any keymap (`-k`, libvirt's graphics `keymap`, even
//!   `en-us`) QEMU maps the keysym instead and ignores the keycode.
//! - A plain KeyEvent is mapped by keysym through the keymap (en-us when libvirt sets
//!   none): A-Z as a-z, the keysym cut to 16 bits; a keysym the keymap does not hold
//!   presses nothing. A keysym on several keys takes, when pressed, the first whose
//!   modifiers (Shift, AltGr, Ctrl) are those held, else the first; when released, the
//!   first held key among those listed without modifiers, else the first listed.
//! - QEMU keeps which keys are down; a release of a key that is not down reaches no
//!   guest.
//! - Ctrl (either) with the left Alt held and 1 to 9 pressed switches QEMU's console:
//!   QEMU releases every key it holds and drops the digit.
//! - QEMU follows each key event it passes on with a 10 ms pause (`key-delay-ms`), in
//!   a queue of at most 1024 entries, three per key event; past that it drops key events
//!   silently. [`Pacer`] keeps a relay's key events within what QEMU keeps.
//! - With the LED state extension negotiated QEMU injects nothing; without it, it would
//!   press Caps Lock and Num Lock itself to match the keysym's case (`lock-key-sync`).
//!   vizor always negotiates it toward QEMU, so that rule never applies.

use crate::{table, Ignored, Key, Origin, Stroke};
use std::time::{Duration, Instant};

const SHIFT: u8 = 1;
const ALTGR: u8 = 2;
const CTRL: u8 = 4;

/// How QEMU read a key event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// By the extended key event's keycode.
    Keycode,
    /// By the keysym, through the keymap.
    Keysym,
}

impl Via {
    /// The name audit records use.
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Keycode => "keycode",
            Via::Keysym => "keysym",
        }
    }
}

/// What one VNC key event does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// How QEMU read it.
    pub via: Via,
    /// The keysym is not one a US layout produces with the key QEMU acts on (extended
    /// key events only: a plain event's key comes from its keysym).
    pub mismatch: bool,
    /// What the guest's keyboard gets, in order: keys QEMU releases itself first (for a
    /// console switch), then the key event itself. Empty when the console has a keymap
    /// this model does not hold: QEMU then maps the keysym by that keymap.
    pub strokes: Vec<Stroke>,
}

impl Outcome {
    /// How many key events QEMU queues for this one (each with its pause): every stroke
    /// it passes to its keyboard state, which excludes releases of keys not down and
    /// the digit of a console switch; one for an event not modelled.
    pub fn queued(&self) -> u32 {
        if self.strokes.is_empty() {
            return 1;
        }
        self.strokes
            .iter()
            .filter(|s| {
                !matches!(
                    s.ignored,
                    Some(Ignored::NotPressed | Ignored::ConsoleSwitch)
                )
            })
            .count() as u32
    }
}

/// QEMU's pause after each key event it passes on (`key-delay-ms`, 10 ms by default;
/// libvirt does not set it).
pub const KEY_DELAY: Duration = Duration::from_millis(10);

/// The most key events a relay lets wait in QEMU's queue. QEMU drops key events beyond
/// about 340 waiting (1024 queue entries, three per key event); 64 (0.64 s of typing)
/// leaves room for QEMU's timer to run five times slower than it should.
pub const MAX_BACKLOG: u32 = 64;

/// Paces key events toward QEMU so that its queue never overflows: a key event QEMU
/// drops would be on record without reaching the VM. Sans-IO: the caller passes the
/// time and does the waiting (which holds the browser back).
#[derive(Debug, Clone, Default)]
pub struct Pacer {
    /// When QEMU's queue will have run dry, by this model.
    free_at: Option<Instant>,
}

impl Pacer {
    /// How long to wait at `now` before sending key events that QEMU queues `n` of
    /// (zero when there is room).
    pub fn wait(&self, now: Instant, n: u32) -> Duration {
        let Some(free_at) = self.free_at.filter(|f| *f > now) else {
            return Duration::ZERO;
        };
        let room = KEY_DELAY * MAX_BACKLOG.saturating_sub(n.min(MAX_BACKLOG));
        (free_at - now).saturating_sub(room)
    }

    /// Key events that QEMU queues `n` of were sent at `now`.
    pub fn sent(&mut self, now: Instant, n: u32) {
        let start = self.free_at.filter(|f| *f > now).unwrap_or(now);
        self.free_at = Some(start + KEY_DELAY * n);
    }
}

/// How QEMU maps key events: whether it was given a keymap (`-k`, from libvirt's
/// graphics `keymap`), and which.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Keymap {
    /// No keymap (libvirt's default): extended key events by keycode, plain ones by
    /// keysym through en-us.
    Default,
    /// `-k en-us`: every key event by keysym through en-us, extended ones too.
    EnUs,
    /// Another keymap: QEMU maps every keysym through it, and this model does not hold
    /// it.
    Other(String),
}

impl Keymap {
    /// The keymap libvirt gives QEMU (`None`: none).
    pub fn from_libvirt(keymap: Option<&str>) -> Keymap {
        match keymap {
            None | Some("") => Keymap::Default,
            Some("en-us") => Keymap::EnUs,
            Some(other) => Keymap::Other(other.to_owned()),
        }
    }
}

/// QEMU's VNC keyboard state for one console connection: which keys are down.
#[derive(Debug, Clone)]
pub struct Keyboard {
    keymap: Keymap,
    /// Keys down, by [`Key::qcode`] (bit 0: a number that names no key, which QEMU
    /// tracks as one more key).
    down: [bool; 256],
}

/// Numbers of the keys QEMU's console switch needs held.
const SHIFT_L: u8 = 0x2a;
const SHIFT_R: u8 = 0x36;
const CTRL_L: u8 = 0x1d;
const CTRL_R: u8 = 0x9d;
const ALT_L: u8 = 0x38;
const ALT_R: u8 = 0xb8;

/// The order QEMU releases held keys in (its key enumeration begins with these); the
/// rest follow by number.
const LIFT_FIRST: [u8; 8] = [SHIFT_L, SHIFT_R, ALT_L, ALT_R, CTRL_L, CTRL_R, 0x9e, 0x01];

impl Keyboard {
    /// No key down (QEMU releases every key when a client disconnects).
    pub fn new(keymap: Keymap) -> Keyboard {
        Keyboard {
            keymap,
            down: [false; 256],
        }
    }

    /// The keymap.
    pub fn keymap(&self) -> &Keymap {
        &self.keymap
    }

    fn held(&self, n: u8) -> bool {
        self.down[usize::from(Key::from_number(n).qcode())]
    }

    fn modifiers(&self) -> u8 {
        let mut m = 0;
        if self.held(SHIFT_L) || self.held(SHIFT_R) {
            m |= SHIFT;
        }
        if self.held(ALT_R) {
            m |= ALTGR;
        }
        if self.held(CTRL_L) || self.held(CTRL_R) {
            m |= CTRL;
        }
        m
    }

    /// A QEMU extended key event (`down` is its 16-bit flag, non-zero).
    pub fn ext_key_event(&mut self, down: bool, keysym: u32, keycode: u32) -> Outcome {
        if self.keymap != Keymap::Default {
            // With a keymap QEMU reads the keysym alone (`keyboard_layout` set).
            return self.by_keysym(down, keysym);
        }
        // QEMU takes the keycode as 16 bits; numbers past 255 name no key.
        let number = keycode as u16;
        let key = Key::from_number(u8::try_from(number).unwrap_or(0));
        Outcome {
            via: Via::Keycode,
            mismatch: keysym != 0 && !key.produces(keysym),
            strokes: self.key(key, down),
        }
    }

    /// A plain RFB KeyEvent.
    pub fn key_event(&mut self, down: bool, keysym: u32) -> Outcome {
        self.by_keysym(down, keysym)
    }

    fn by_keysym(&mut self, down: bool, keysym: u32) -> Outcome {
        if let Keymap::Other(_) = self.keymap {
            return Outcome {
                via: Via::Keysym,
                mismatch: false,
                strokes: Vec::new(),
            };
        }
        // The console is graphic: QEMU maps capitals as lower case letters.
        let sym = match keysym {
            0x41..=0x5a => keysym + 0x20,
            other => other,
        };
        let key = Key::from_number(self.keysym_to_number(sym as u16, down));
        Outcome {
            via: Via::Keysym,
            mismatch: false,
            strokes: self.key(key, down),
        }
    }

    /// QEMU's `keysym2scancode` over the en-us keymap: the key number, modifiers cut off.
    fn keysym_to_number(&self, sym: u16, down: bool) -> u8 {
        // QEMU keeps at most four keys per keysym, in keymap order.
        let mut entries = table::EN_US
            .iter()
            .filter(|(k, _, _)| *k == sym)
            .map(|&(_, n, m)| (n, m))
            .take(4);
        let Some(first) = entries.clone().next() else {
            return 0;
        };
        if entries.clone().count() == 1 {
            return first.0;
        }
        if down {
            let mods = self.modifiers();
            return entries.find(|(_, m)| *m == mods).unwrap_or(first).0;
        }
        // A key that is actually down: QEMU looks the listed value up as a key number,
        // modifier bits included, so only entries without modifiers can match, and
        // those with modifiers match the "no key" key.
        entries
            .find(|&(n, m)| {
                let qcode = if m == 0 {
                    Key::from_number(n).qcode()
                } else {
                    0
                };
                self.down[usize::from(qcode)]
            })
            .unwrap_or(first)
            .0
    }

    /// QEMU's `do_key_event` and `qkbd_state_key_event` for `key`.
    fn key(&mut self, key: Key, down: bool) -> Vec<Stroke> {
        let qcode = key.qcode();
        let digit = (0x02..=0x0a).contains(&qcode);
        let ctrl = self.held(CTRL_L) || self.held(CTRL_R);
        if digit && down && ctrl && self.held(ALT_L) {
            let mut strokes = self.lift_all();
            strokes.push(Stroke {
                key,
                down,
                ignored: Some(Ignored::ConsoleSwitch),
                origin: Origin::Browser,
            });
            return strokes;
        }
        let slot = &mut self.down[usize::from(qcode)];
        if !down && !*slot {
            return vec![Stroke {
                key,
                down,
                ignored: Some(Ignored::NotPressed),
                origin: Origin::Browser,
            }];
        }
        *slot = down;
        vec![Stroke {
            key,
            down,
            ignored: (qcode == 0).then_some(Ignored::NoKey),
            origin: Origin::Browser,
        }]
    }

    /// What QEMU does when a VNC client of the VM disconnects (any client: the state
    /// is the VM's): it releases every key held.
    pub fn disconnect(&mut self) -> Vec<Stroke> {
        let mut strokes = self.lift_all();
        for s in &mut strokes {
            s.origin = Origin::Disconnect;
        }
        strokes
    }

    /// Releases every key held, as QEMU does before a console switch.
    fn lift_all(&mut self) -> Vec<Stroke> {
        let mut order: Vec<u8> = LIFT_FIRST.to_vec();
        order.extend((1..=255u8).filter(|n| !LIFT_FIRST.contains(n)));
        let mut out = Vec::new();
        for n in order {
            let q = usize::from(n);
            // Keys are held by the number that names them; "no key" releases nothing.
            if Key::from_number(n).qcode() == n && self.down[q] {
                self.down[q] = false;
                out.push(Stroke {
                    key: Key::from_number(n),
                    down: false,
                    ignored: None,
                    origin: Origin::ConsoleSwitch,
                });
            }
        }
        self.down[0] = false;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(o: &Outcome) -> Vec<(Option<&'static str>, bool, Option<Ignored>)> {
        o.strokes
            .iter()
            .map(|s| (s.key.name(), s.down, s.ignored))
            .collect()
    }

    fn kb() -> Keyboard {
        Keyboard::new(Keymap::Default)
    }

    #[test]
    fn extended_events_press_the_keycode_whatever_the_keysym() {
        let mut k = kb();
        // The example: keysym z with keycode b types b.
        let o = k.ext_key_event(true, u32::from(b'z'), 0x30);
        assert_eq!((o.via, o.mismatch), (Via::Keycode, true));
        assert_eq!(keys(&o), [(Some("b"), true, None)]);
        // Shift_L's keysym with c's keycode is c.
        let o = k.ext_key_event(true, 0xffe1, 0x2e);
        assert!(o.mismatch);
        assert_eq!(keys(&o), [(Some("c"), true, None)]);
        // Agreeing pairs: a shifted letter, a keypad key by either keysym, keysym 0.
        assert!(!k.ext_key_event(true, u32::from(b'A'), 0x1e).mismatch);
        assert!(!k.ext_key_event(true, 0xff95, 0x47).mismatch);
        assert!(!k.ext_key_event(true, 0xffb7, 0x47).mismatch);
        assert!(!k.ext_key_event(true, 0, 0x1c).mismatch);
        // QEMU keeps 16 bits of the keycode.
        assert_eq!(
            keys(&k.ext_key_event(true, 0, 0x1_001e)),
            [(Some("a"), true, None)]
        );
        // A number past 255, or one QEMU maps to nothing, presses no key.
        assert_eq!(
            keys(&k.ext_key_event(true, 0, 0x1ff)),
            [(None, true, Some(Ignored::NoKey))]
        );
        assert_eq!(
            keys(&k.ext_key_event(true, 0, 0x5a)),
            [(None, true, Some(Ignored::NoKey))]
        );
    }

    #[test]
    fn plain_events_are_mapped_by_the_en_us_keymap() {
        let mut k = kb();
        let press = |k: &mut Keyboard, sym: u32| {
            let o = k.key_event(true, sym);
            k.key_event(false, sym);
            assert_eq!((o.via, o.mismatch), (Via::Keysym, false));
            o.strokes[0].key.name()
        };
        // Seen on QEMU 7.2: '!' presses 1 (no Shift), 'A' presses a.
        assert_eq!(press(&mut k, u32::from(b'!')), Some("1"));
        assert_eq!(press(&mut k, u32::from(b'A')), Some("a"));
        // 16 bits of the keysym: a Unicode 'a' is 'a'; XF86AudioRaiseVolume is Pause.
        assert_eq!(press(&mut k, 0x0100_0061), Some("a"));
        assert_eq!(press(&mut k, 0x1008_ff13), Some("Pause"));
        // Keysyms QEMU's keymap does not load press nothing.
        for sym in [0xfe20, 0xff0a, 0xff6a, 0x20ac] {
            let o = k.key_event(true, sym);
            assert_eq!(o.strokes[0].ignored, Some(Ignored::NoKey), "{sym:#x}");
            k.key_event(false, sym);
        }
        // '<' is on the 102nd key, or on the comma key with Shift held.
        assert_eq!(press(&mut k, u32::from(b'<')), Some("less"));
        k.ext_key_event(true, 0, 0x2a);
        assert_eq!(press(&mut k, u32::from(b'<')), Some("comma"));
        k.ext_key_event(false, 0, 0x2a);
    }

    #[test]
    fn a_release_follows_qemus_search_for_a_held_key() {
        // Seen on QEMU 7.2: with AltGr held, '|' presses the 102nd key; its release
        // looks for a held key among the entries without modifiers, finds none, and
        // releases the backslash key, which is not down: nothing. The 102nd key stays
        // down, so releasing '<' (pressed on the comma key) releases the 102nd key.
        let mut k = kb();
        k.ext_key_event(true, 0, 0xb8);
        assert_eq!(keys(&k.key_event(true, 0x7c)), [(Some("less"), true, None)]);
        assert_eq!(
            keys(&k.key_event(false, 0x7c)),
            [(Some("backslash"), false, Some(Ignored::NotPressed))]
        );
        assert_eq!(
            keys(&k.key_event(true, 0x3c)),
            [(Some("comma"), true, None)]
        );
        assert_eq!(
            keys(&k.key_event(false, 0x3c)),
            [(Some("less"), false, None)]
        );
    }

    #[test]
    fn releases_of_keys_not_down_reach_no_guest() {
        let mut k = kb();
        assert_eq!(
            keys(&k.ext_key_event(false, 0, 0x1e)),
            [(Some("a"), false, Some(Ignored::NotPressed))]
        );
        k.ext_key_event(true, 0, 0x1e);
        // Autorepeat: a second press passes.
        assert_eq!(
            keys(&k.ext_key_event(true, 0, 0x1e)),
            [(Some("a"), true, None)]
        );
        assert_eq!(
            keys(&k.ext_key_event(false, 0, 0x1e)),
            [(Some("a"), false, None)]
        );
        // Print is one key under two numbers.
        k.ext_key_event(true, 0, 0x54);
        assert_eq!(
            keys(&k.ext_key_event(false, 0, 0xb7)),
            [(Some("Print"), false, None)]
        );
    }

    #[test]
    fn ctrl_alt_digit_switches_the_console() {
        // Seen on QEMU 7.2: Ctrl_L, Alt_L, 2 gave Ctrl and Alt pressed, then both
        // released, and no 2; the later releases reached nothing.
        let mut k = kb();
        k.ext_key_event(true, 0, 0x1d);
        k.ext_key_event(true, 0, 0x38);
        assert_eq!(
            keys(&k.ext_key_event(true, 0, 0x03)),
            [
                (Some("Alt_L"), false, None),
                (Some("Control_L"), false, None),
                (Some("2"), true, Some(Ignored::ConsoleSwitch)),
            ]
        );
        for n in [0x03, 0x38, 0x1d] {
            assert_eq!(
                k.ext_key_event(false, 0, n).strokes[0].ignored,
                Some(Ignored::NotPressed)
            );
        }
        // The right Alt is AltGr: no switch.
        let mut k = kb();
        k.ext_key_event(true, 0, 0x9d);
        k.ext_key_event(true, 0, 0xb8);
        assert_eq!(
            keys(&k.ext_key_event(true, 0, 0x03)),
            [(Some("2"), true, None)]
        );
        // Right Ctrl with left Alt does switch.
        let mut k = kb();
        k.ext_key_event(true, 0, 0x9d);
        k.ext_key_event(true, 0, 0x38);
        let o = k.ext_key_event(true, 0, 0x02);
        assert_eq!(
            o.strokes.last().unwrap().ignored,
            Some(Ignored::ConsoleSwitch)
        );
        assert!(o.strokes[..2]
            .iter()
            .all(|s| s.origin == Origin::ConsoleSwitch && !s.down));
    }

    #[test]
    fn an_explicit_en_us_keymap_reads_extended_events_by_keysym() {
        // libvirt's keymap='en-us' gives QEMU -k en-us: keysym z with b's keycode is z.
        let mut k = Keyboard::new(Keymap::from_libvirt(Some("en-us")));
        let o = k.ext_key_event(true, u32::from(b'z'), 0x30);
        assert_eq!((o.via, o.mismatch), (Via::Keysym, false));
        assert_eq!(keys(&o), [(Some("z"), true, None)]);
        // A keysym the keymap lacks presses nothing, whatever the keycode.
        let o = k.ext_key_event(true, 0x20ac, 0x1e);
        assert_eq!(keys(&o), [(None, true, Some(Ignored::NoKey))]);
    }

    #[test]
    fn a_disconnect_releases_every_key_held() {
        let mut k = kb();
        k.ext_key_event(true, 0, 0x2a);
        k.ext_key_event(true, 0, 0x1e);
        let lifted = k.disconnect();
        assert_eq!(
            lifted
                .iter()
                .map(|s| (s.key.name(), s.down, s.origin))
                .collect::<Vec<_>>(),
            [
                (Some("Shift_L"), false, Origin::Disconnect),
                (Some("a"), false, Origin::Disconnect)
            ]
        );
        assert!(k.disconnect().is_empty());
        assert_eq!(
            k.ext_key_event(false, 0, 0x1e).strokes[0].ignored,
            Some(Ignored::NotPressed)
        );
    }

    #[test]
    fn another_keymap_is_not_modelled() {
        let mut k = Keyboard::new(Keymap::from_libvirt(Some("de")));
        let o = k.ext_key_event(true, u32::from(b'z'), 0x30);
        assert_eq!((o.via, o.strokes.len()), (Via::Keysym, 0));
        assert_eq!(Keymap::from_libvirt(Some("en-us")), Keymap::EnUs);
        assert_eq!(Keymap::from_libvirt(None), Keymap::Default);
    }

    #[test]
    fn the_pacer_keeps_qemus_queue_short() {
        let t0 = Instant::now();
        let mut p = Pacer::default();
        // A burst: the first 64 go at once, the 65th waits for one to drain.
        for i in 0..MAX_BACKLOG {
            assert_eq!(p.wait(t0, 1), Duration::ZERO, "event {i}");
            p.sent(t0, 1);
        }
        assert_eq!(p.wait(t0, 1), KEY_DELAY);
        assert_eq!(p.wait(t0 + KEY_DELAY, 1), Duration::ZERO);
        // Two strokes at once need room for two.
        assert_eq!(p.wait(t0 + KEY_DELAY, 2), KEY_DELAY);
        // Once the queue has run dry, no wait at all.
        let later = t0 + KEY_DELAY * (MAX_BACKLOG + 5);
        assert_eq!(p.wait(later, 3), Duration::ZERO);
        p.sent(later, 3);
        assert_eq!(p.wait(later + KEY_DELAY * 3, 1), Duration::ZERO);
        // Never more than the backlog queued, whatever is asked.
        assert!(p.wait(later, 1000) <= KEY_DELAY * 3);
    }

    #[test]
    fn queued_counts_what_qemu_passes_on() {
        let mut k = kb();
        assert_eq!(k.ext_key_event(true, 0, 0x1e).queued(), 1);
        assert_eq!(k.ext_key_event(false, 0, 0x30).queued(), 0, "not pressed");
        assert_eq!(
            k.ext_key_event(true, 0, 0x5a).queued(),
            1,
            "no key: queued all the same"
        );
        k.ext_key_event(true, 0, 0x1d);
        k.ext_key_event(true, 0, 0x38);
        // Three keys lifted (a, Ctrl, Alt), the digit dropped.
        assert_eq!(k.ext_key_event(true, 0, 0x04).queued(), 3);
        let mut other = Keyboard::new(Keymap::Other("fr".into()));
        assert_eq!(other.key_event(true, 0x61).queued(), 1);
    }

    #[test]
    fn never_panics() {
        let mut k = kb();
        for sym in (0..0x1_0000u32).step_by(7).chain([u32::MAX, 0x0100_0000]) {
            k.key_event(sym % 2 == 0, sym);
            k.ext_key_event(sym % 3 == 0, sym, sym.rotate_left(5));
        }
    }
}
