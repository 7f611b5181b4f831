//! What QEMU does with a key event: which key the VM acts on, which events it drops, and
//! which it adds, so that an audit record names what reached the VM.
//!
//! A browser names a key in ways QEMU does not take at face value. Over VNC it sends an
//! X11 keysym, and with QEMU's extended key event also an XT keycode; QEMU acts on the
//! keycode and ignores the keysym, or maps the keysym through its keymap, and drops or
//! adds events by rules of its own. Over SPICE it sends PC scancode bytes, which
//! spice-server hands to QEMU one by one, and QEMU decodes them with state that spans
//! messages. This crate models those rules, sans-IO: bytes and values in, the strokes
//! the guest's keyboard receives out.
//!
//! - [`Key`]: one of QEMU's key numbers (PC set 1 scancodes, with 0x80 added for keys
//!   behind an 0xE0 prefix), with its name, class, US-layout characters and the PS/2
//!   bytes a guest receives for it.
//! - [`vnc::Keyboard`]: QEMU 7.2's VNC server (`ui/vnc.c`, `ui/kbd-state.c`,
//!   `ui/keymaps.c`).
//! - [`spice::Keyboard`]: spice-server's inputs channel (`server/inputs-channel.cpp`)
//!   and QEMU's `ui/spice-input.c`.
//!
//! The tables come from QEMU 7.2's en-us keymap and from a measurement of a real QEMU
//! 7.2 (`tools/gen-table.py`, `data/qemu-7.2.json`); vizor's `tests/keys_qemu.rs`
//! checks them, and what the audit says, against the keys a live guest receives.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod layout;
pub mod spice;
mod table;
pub mod vnc;

/// One of QEMU's key numbers: a PC set 1 scancode, with 0x80 added for keys sent behind
/// an 0xE0 prefix (`0x48` is keypad 8, `0xC8` is Up).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(u8);

/// What kind of key a key is, as redacted audit records tell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Types a character (letters, digits, punctuation, space, keypad digits and
    /// operators).
    Printable,
    /// Return, BackSpace, Escape, arrows and other keys that type nothing.
    Control,
    /// F1 to F24.
    Function,
    /// Shift, Control, Alt, Super and the lock keys.
    Modifier,
    /// A number QEMU maps to no key.
    Unknown,
}

impl Class {
    /// The name audit records use.
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Printable => "printable",
            Class::Control => "control",
            Class::Function => "function",
            Class::Modifier => "modifier",
            Class::Unknown => "unknown",
        }
    }
}

/// What a key types on a US layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Chars {
    /// Without Shift.
    pub plain: Option<char>,
    /// With Shift.
    pub shifted: Option<char>,
    /// A keypad key with Num Lock on.
    pub numpad: Option<char>,
}

/// A table entry (generated in `table.rs`).
pub(crate) struct Def {
    /// QEMU's key for the number, as the number that names it (two numbers can name one
    /// key); 0 when QEMU maps the number to no key.
    pub(crate) qcode: u8,
    pub(crate) name: &'static str,
    pub(crate) class: Class,
    pub(crate) plain: Option<char>,
    pub(crate) shifted: Option<char>,
    pub(crate) numpad: Option<char>,
    /// Every keysym QEMU's en-us keymap produces with this key.
    pub(crate) keysyms: &'static [u32],
    pub(crate) press: &'static [u8],
    pub(crate) release: &'static [u8],
}

impl Def {
    pub(crate) const NONE: Def = Def {
        qcode: 0,
        name: "",
        class: Class::Unknown,
        plain: None,
        shifted: None,
        numpad: None,
        keysyms: &[],
        press: &[],
        release: &[],
    };
}

impl Key {
    /// Pause (what QEMU sends for the whole pause sequence and for Ctrl+Break).
    pub const PAUSE: Key = Key(0xC6);

    /// The key of QEMU key number `n`.
    pub const fn from_number(n: u8) -> Key {
        Key(n)
    }

    /// Its number.
    pub const fn number(self) -> u8 {
        self.0
    }

    fn def(self) -> &'static Def {
        &table::KEYS[usize::from(self.0)]
    }

    /// Whether QEMU maps the number to a key (a number it does not map reaches no
    /// guest).
    pub fn is_key(self) -> bool {
        self.def().qcode != 0
    }

    /// QEMU's key, as the number that names it: two numbers name one key when QEMU maps
    /// both to it (0x54 and 0xB7 are both Print).
    pub(crate) fn qcode(self) -> u8 {
        self.def().qcode
    }

    /// The key's name in X11 keysym terms as a US layout labels it (`a`, `Return`,
    /// `Shift_L`, `KP_7`, `Up`, `Print`), or `None` when QEMU maps the number to no key.
    pub fn name(self) -> Option<&'static str> {
        Some(self.def().name).filter(|n| !n.is_empty() && self.is_key())
    }

    /// The name, or `key 0xNN` for a number that names nothing.
    pub fn label(self) -> String {
        match self.name() {
            Some(n) => n.to_owned(),
            None => format!("key {:#04x}", self.0),
        }
    }

    /// What kind of key it is.
    pub fn class(self) -> Class {
        if self.is_key() {
            self.def().class
        } else {
            Class::Unknown
        }
    }

    /// What it types on a US layout.
    pub fn chars(self) -> Chars {
        let d = self.def();
        Chars {
            plain: d.plain,
            shifted: d.shifted,
            numpad: d.numpad,
        }
    }

    /// Whether a US layout produces `keysym` with this key (with any modifiers).
    pub fn produces(self, keysym: u32) -> bool {
        self.is_key() && self.def().keysyms.contains(&keysym)
    }

    /// The PS/2 bytes (scan code set 2) a real QEMU 7.2 guest received for pressing and
    /// for releasing this key with no modifier held; both empty for a key that reaches
    /// the guest's PS/2 keyboard as nothing (a USB keyboard may still get it).
    pub fn ps2(self) -> (&'static [u8], &'static [u8]) {
        let d = self.def();
        (d.press, d.release)
    }
}

/// Why QEMU passes nothing to the guest for a key event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ignored {
    /// The number names no key.
    NoKey,
    /// A release of a key QEMU does not hold down (VNC).
    NotPressed,
    /// Ctrl+Alt+1 to 9 over VNC: QEMU switches its console instead.
    ConsoleSwitch,
}

impl Ignored {
    /// The name audit records use.
    pub fn as_str(self) -> &'static str {
        match self {
            Ignored::NoKey => "no_key",
            Ignored::NotPressed => "not_pressed",
            Ignored::ConsoleSwitch => "console_switch",
        }
    }
}

/// Where a stroke came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The browser's key event.
    Browser,
    /// QEMU released the key itself, before a VNC console switch.
    ConsoleSwitch,
    /// vizor's translation of a SPICE KEY_MODIFIERS request (the lock keys to press).
    LockRequest,
    /// Released because a client left: QEMU releases every key of the VM's VNC
    /// keyboard when any VNC client disconnects; vizor releases the keys of a SPICE
    /// session itself before it leaves (spice-server would, unrecorded).
    Disconnect,
    /// vizor's byte that ends a half-sent prefix (0xE0, the Pause sequence) left in
    /// QEMU's SPICE decoder by an earlier client; it reaches the guest as nothing.
    Reset,
    /// Typed by vizor for the participant's "Paste as keys" ([`layout`]).
    Paste,
}

impl Origin {
    /// The name audit records use (`None` for the browser's own events).
    pub fn as_str(self) -> Option<&'static str> {
        match self {
            Origin::Browser => None,
            Origin::ConsoleSwitch => Some("console_switch"),
            Origin::LockRequest => Some("lock_request"),
            Origin::Disconnect => Some("disconnect"),
            Origin::Reset => Some("reset"),
            Origin::Paste => Some("paste"),
        }
    }
}

/// One key transition as QEMU takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stroke {
    /// The key.
    pub key: Key,
    /// Pressed or released.
    pub down: bool,
    /// Why the guest gets nothing for it, when it does not.
    pub ignored: Option<Ignored>,
    /// Where it came from.
    pub origin: Origin,
}

/// Keyboard lock state, as SPICE and QEMU's LED messages carry it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Locks {
    /// Scroll Lock.
    pub scroll: bool,
    /// Num Lock.
    pub num: bool,
    /// Caps Lock.
    pub caps: bool,
}

impl Locks {
    /// From SPICE's modifier flags (`SPICE_KEYBOARD_MODIFIER_FLAGS_*`: scroll 1, num 2,
    /// caps 4), which QEMU's VNC LED state also uses.
    pub fn from_bits(bits: u16) -> Locks {
        Locks {
            scroll: bits & 1 != 0,
            num: bits & 2 != 0,
            caps: bits & 4 != 0,
        }
    }

    /// The flags.
    pub fn bits(self) -> u8 {
        u8::from(self.scroll) | u8::from(self.num) << 1 | u8::from(self.caps) << 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_name_their_keys() {
        let name = |n| Key::from_number(n).name();
        assert_eq!(name(0x01), Some("Escape"));
        assert_eq!(name(0x1e), Some("a"));
        assert_eq!(name(0x2a), Some("Shift_L"));
        assert_eq!(name(0x48), Some("KP_8"));
        assert_eq!(name(0xc8), Some("Up"));
        assert_eq!(name(0x9c), Some("KP_Enter"));
        assert_eq!(name(0xc6), Some("Pause"));
        // QEMU maps both Print numbers to one key.
        assert_eq!(name(0x54), Some("Print"));
        assert_eq!(name(0xb7), Some("Print"));
        assert_eq!(
            Key::from_number(0x54).qcode(),
            Key::from_number(0xb7).qcode()
        );
        // Numbers QEMU maps to nothing.
        for n in [0x00, 0x55, 0x5a, 0x61, 0xaa, 0xb6, 0xc5, 0xfe, 0xff] {
            assert_eq!(name(n), None, "{n:#x}");
            assert_eq!(Key::from_number(n).class(), Class::Unknown);
            assert_eq!(Key::from_number(n).label(), format!("key {n:#04x}"));
        }
    }

    #[test]
    fn classes_and_characters() {
        let k = Key::from_number;
        assert_eq!(k(0x1e).class(), Class::Printable);
        assert_eq!(k(0x39).class(), Class::Printable); // space
        assert_eq!(k(0x48).class(), Class::Printable); // keypad 8
        assert_eq!(k(0x1c).class(), Class::Control); // Return
        assert_eq!(k(0x3b).class(), Class::Function); // F1
        assert_eq!(k(0x2a).class(), Class::Modifier);
        assert_eq!(k(0x3a).class(), Class::Modifier); // Caps Lock
        assert_eq!(k(0xb8).class(), Class::Modifier); // Alt_R
        let c = k(0x02).chars();
        assert_eq!((c.plain, c.shifted), (Some('1'), Some('!')));
        let c = k(0x48).chars();
        assert_eq!((c.plain, c.numpad), (None, Some('8')));
        assert_eq!(k(0x37).chars().plain, Some('*'));
        assert!(k(0x1e).produces(u32::from(b'A')));
        assert!(k(0x1e).produces(u32::from(b'a')));
        assert!(!k(0x1e).produces(u32::from(b'b')));
        assert!(k(0x47).produces(0xff95)); // KP_Home
        assert!(k(0x47).produces(0xffb7)); // KP_7
    }

    #[test]
    fn the_table_holds_what_qemu_was_measured_to_do() {
        // data/qemu-7.2.json, one line per key number: "NN": ["press", "release"].
        let data = include_str!("../data/qemu-7.2.json");
        let bytes = |s: &str| -> Vec<u8> {
            s.split_whitespace()
                .map(|b| u8::from_str_radix(b, 16).unwrap())
                .collect()
        };
        let mut measured = 0;
        for line in data.lines() {
            let parts: Vec<&str> = line.split('"').collect();
            let Some(n) = parts
                .get(1)
                .filter(|p| p.len() == 2)
                .and_then(|p| u8::from_str_radix(p, 16).ok())
            else {
                continue;
            };
            let (press, release) = Key::from_number(n).ps2();
            assert_eq!(
                (press.to_vec(), release.to_vec()),
                (bytes(parts[3]), bytes(parts[5])),
                "{n:#x}"
            );
            measured += 1;
        }
        // Every number with bytes in the table was measured.
        let with_bytes = (0..=255u8)
            .filter(|&n| Key::from_number(n).ps2() != (&[][..], &[][..]))
            .count();
        assert_eq!(measured, with_bytes);
        assert!(measured > 100);
    }

    #[test]
    fn the_table_is_whole() {
        // Every number QEMU maps has a name and PS/2 bytes unless it reaches the PS/2
        // keyboard as nothing; every named key's class is known.
        for n in 0..=255u8 {
            let key = Key::from_number(n);
            if key.is_key() {
                assert!(key.name().is_some(), "{n:#x}");
                assert_ne!(key.class(), Class::Unknown, "{n:#x}");
            } else {
                assert_eq!(key.ps2(), (&[][..], &[][..]), "{n:#x}");
            }
        }
        assert_eq!(Key::PAUSE.ps2().1, &[] as &[u8], "Pause has no release");
    }
}
