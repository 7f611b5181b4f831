//! Human-readable names and coarse classes for X11 keysyms.
//!
//! Every RFB `KeyEvent` carries a raw X11 keysym. The proxy audits each one,
//! and a bare `0xff0d` in an audit log is useless to the person reading it, so
//! this module owns the translation from keysym to a stable, log-safe name
//! (`Return`, `a`, `€`, …) and to a [`KeyClass`] that lets redacted logs record
//! *that* a printable key was typed without recording *which* one.
//!
//! Names follow X11's `keysymdef.h` (without the `XK_` prefix) so they match
//! what `xev`, QEMU and noVNC report. Only the Latin-1 and the `0x0100_0000`
//! Unicode keysym ranges are decoded to characters; the legacy national
//! ranges (Latin-2, Cyrillic, Greek, …) fall back to hex, which is lossless.
//!
//! Keypad keys (`KP_0`, `KP_Add`, …) are deliberately *not* treated as
//! characters: [`keysym_char`] returns `None` for them and [`keysym_class`]
//! classifies them as [`KeyClass::Control`]. Their meaning depends on the
//! Num_Lock state, which the proxy does not track, so the name is the only
//! honest description.

use std::borrow::Cow;

/// Coarse category of a keysym, for audit logs that must not reveal typed
/// text.
///
/// The classes partition all `u32` values: [`KeyClass::Printable`] holds
/// exactly when [`keysym_char`] returns `Some`; every keysym with a table name
/// is one of [`KeyClass::Control`], [`KeyClass::Function`] or
/// [`KeyClass::Modifier`]; everything else is [`KeyClass::Unknown`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyClass {
    /// Types a character (Latin-1 or Unicode keysym), including space.
    Printable,
    /// A named non-printing key: editing, navigation, keypad, Menu, Print, …
    /// Keypad digits and operators are included here because their effect
    /// depends on Num_Lock state.
    Control,
    /// One of the function keys F1..F35 (not the keypad's KP_F1..KP_F4, which
    /// are [`KeyClass::Control`]).
    Function,
    /// Shift, Control, Caps_Lock, Shift_Lock, Meta, Alt, Super, Hyper,
    /// ISO_Level3_Shift, Mode_switch or Num_Lock.
    Modifier,
    /// Any keysym this module has no name or character for.
    Unknown,
}

impl KeyClass {
    /// The name audit records use (the same names as the scancode classes of
    /// `vizor-keys`).
    pub fn as_str(self) -> &'static str {
        match self {
            KeyClass::Printable => "printable",
            KeyClass::Control => "control",
            KeyClass::Function => "function",
            KeyClass::Modifier => "modifier",
            KeyClass::Unknown => "unknown",
        }
    }
}

use KeyClass::{Control as C, Function as F, Modifier as M};

/// Named keysyms, sorted by value so lookups can binary-search.
///
/// Where `keysymdef.h` has aliases, the one an auditor recognises wins
/// (`Page_Up` rather than `Prior`).
const NAMED: &[(u32, &str, KeyClass)] = &[
    (0xfe03, "ISO_Level3_Shift", M),
    (0xfe20, "ISO_Left_Tab", C),
    (0xff08, "BackSpace", C),
    (0xff09, "Tab", C),
    (0xff0a, "Linefeed", C),
    (0xff0b, "Clear", C),
    (0xff0d, "Return", C),
    (0xff13, "Pause", C),
    (0xff14, "Scroll_Lock", C),
    (0xff15, "Sys_Req", C),
    (0xff1b, "Escape", C),
    (0xff20, "Multi_key", C),
    (0xff50, "Home", C),
    (0xff51, "Left", C),
    (0xff52, "Up", C),
    (0xff53, "Right", C),
    (0xff54, "Down", C),
    (0xff55, "Page_Up", C),
    (0xff56, "Page_Down", C),
    (0xff57, "End", C),
    (0xff58, "Begin", C),
    (0xff60, "Select", C),
    (0xff61, "Print", C),
    (0xff62, "Execute", C),
    (0xff63, "Insert", C),
    (0xff65, "Undo", C),
    (0xff66, "Redo", C),
    (0xff67, "Menu", C),
    (0xff68, "Find", C),
    (0xff69, "Cancel", C),
    (0xff6a, "Help", C),
    (0xff6b, "Break", C),
    (0xff7e, "Mode_switch", M),
    (0xff7f, "Num_Lock", M),
    (0xff80, "KP_Space", C),
    (0xff89, "KP_Tab", C),
    (0xff8d, "KP_Enter", C),
    (0xff91, "KP_F1", C),
    (0xff92, "KP_F2", C),
    (0xff93, "KP_F3", C),
    (0xff94, "KP_F4", C),
    (0xff95, "KP_Home", C),
    (0xff96, "KP_Left", C),
    (0xff97, "KP_Up", C),
    (0xff98, "KP_Right", C),
    (0xff99, "KP_Down", C),
    (0xff9a, "KP_Prior", C),
    (0xff9b, "KP_Next", C),
    (0xff9c, "KP_End", C),
    (0xff9d, "KP_Begin", C),
    (0xff9e, "KP_Insert", C),
    (0xff9f, "KP_Delete", C),
    (0xffaa, "KP_Multiply", C),
    (0xffab, "KP_Add", C),
    (0xffac, "KP_Separator", C),
    (0xffad, "KP_Subtract", C),
    (0xffae, "KP_Decimal", C),
    (0xffaf, "KP_Divide", C),
    (0xffb0, "KP_0", C),
    (0xffb1, "KP_1", C),
    (0xffb2, "KP_2", C),
    (0xffb3, "KP_3", C),
    (0xffb4, "KP_4", C),
    (0xffb5, "KP_5", C),
    (0xffb6, "KP_6", C),
    (0xffb7, "KP_7", C),
    (0xffb8, "KP_8", C),
    (0xffb9, "KP_9", C),
    (0xffbd, "KP_Equal", C),
    (0xffbe, "F1", F),
    (0xffbf, "F2", F),
    (0xffc0, "F3", F),
    (0xffc1, "F4", F),
    (0xffc2, "F5", F),
    (0xffc3, "F6", F),
    (0xffc4, "F7", F),
    (0xffc5, "F8", F),
    (0xffc6, "F9", F),
    (0xffc7, "F10", F),
    (0xffc8, "F11", F),
    (0xffc9, "F12", F),
    (0xffca, "F13", F),
    (0xffcb, "F14", F),
    (0xffcc, "F15", F),
    (0xffcd, "F16", F),
    (0xffce, "F17", F),
    (0xffcf, "F18", F),
    (0xffd0, "F19", F),
    (0xffd1, "F20", F),
    (0xffd2, "F21", F),
    (0xffd3, "F22", F),
    (0xffd4, "F23", F),
    (0xffd5, "F24", F),
    (0xffd6, "F25", F),
    (0xffd7, "F26", F),
    (0xffd8, "F27", F),
    (0xffd9, "F28", F),
    (0xffda, "F29", F),
    (0xffdb, "F30", F),
    (0xffdc, "F31", F),
    (0xffdd, "F32", F),
    (0xffde, "F33", F),
    (0xffdf, "F34", F),
    (0xffe0, "F35", F),
    (0xffe1, "Shift_L", M),
    (0xffe2, "Shift_R", M),
    (0xffe3, "Control_L", M),
    (0xffe4, "Control_R", M),
    (0xffe5, "Caps_Lock", M),
    (0xffe6, "Shift_Lock", M),
    (0xffe7, "Meta_L", M),
    (0xffe8, "Meta_R", M),
    (0xffe9, "Alt_L", M),
    (0xffea, "Alt_R", M),
    (0xffeb, "Super_L", M),
    (0xffec, "Super_R", M),
    (0xffed, "Hyper_L", M),
    (0xffee, "Hyper_R", M),
    (0xffff, "Delete", C),
];

/// Keysyms `0x0100_0000 + codepoint` denote Unicode characters directly.
const UNICODE_BASE: u32 = 0x0100_0000;
/// Highest Unicode keysym (`0x0100_0000 + 0x10FFFF`).
const UNICODE_MAX: u32 = UNICODE_BASE + 0x0010_ffff;

fn lookup(keysym: u32) -> Option<(&'static str, KeyClass)> {
    NAMED
        .binary_search_by_key(&keysym, |&(k, _, _)| k)
        .ok()
        .and_then(|i| NAMED.get(i))
        .map(|&(_, name, class)| (name, class))
}

/// Returns a human-readable name for an X11 keysym as used in RFB KeyEvent
/// messages.
///
/// * Named keys use their `keysymdef.h` name (`Return`, `Page_Up`, `KP_0`,
///   `F12`, `Shift_L`, …).
/// * Printable characters name as the character itself (`a`, `é`, `€`),
///   except space, which is `space`, and invisible or text-direction
///   altering characters (other whitespace, zero-width and bidi controls,
///   BOM, tag characters), which are written `U+XXXX` so they cannot hide or
///   rearrange text in an audit log.
/// * Everything else is the keysym in lowercase hex, e.g. `0x00001234`.
///
/// Never panics.
pub fn keysym_name(keysym: u32) -> Cow<'static, str> {
    if let Some((name, _)) = lookup(keysym) {
        return Cow::Borrowed(name);
    }
    match keysym_char(keysym) {
        Some(' ') => Cow::Borrowed("space"),
        Some(c) if is_invisible(c) => Cow::Owned(format!("U+{:04X}", u32::from(c))),
        Some(c) => Cow::Owned(c.to_string()),
        None => Cow::Owned(format!("0x{keysym:08x}")),
    }
}

/// The character a keysym types, if it denotes a printable character.
///
/// Decoded ranges: Latin-1 (`0x20..=0x7e`, `0xa0..=0xff`) and Unicode keysyms
/// (`0x0100_0000 + codepoint` for any codepoint that is a valid `char` and not
/// a C0/C1 control). The legacy national ranges (Latin-2, Cyrillic, Greek,
/// Katakana, …) are not decoded and return `None`.
///
/// Keypad keys (`KP_0`, `KP_Add`, `KP_Space`, …) return `None` even though
/// they often type a character: what they produce depends on Num_Lock, which
/// the proxy cannot see. Function and modifier keys also return `None`.
pub fn keysym_char(keysym: u32) -> Option<char> {
    match keysym {
        0x20..=0x7e | 0xa0..=0xff => char::from_u32(keysym),
        UNICODE_BASE..=UNICODE_MAX => {
            char::from_u32(keysym - UNICODE_BASE).filter(|c| !c.is_control())
        }
        _ => None,
    }
}

/// Classifies a keysym for redacted audit logs.
///
/// Consistent with [`keysym_char`] and [`keysym_name`]: `Printable` exactly
/// when `keysym_char` returns `Some`; keys with a `keysymdef.h` name are
/// `Function` (F1..F35), `Modifier` (Shift, Control, Caps_Lock, Shift_Lock,
/// Meta, Alt, Super, Hyper, ISO_Level3_Shift, Mode_switch, Num_Lock) or
/// `Control` (everything else named, including all `KP_` keys); all other
/// keysyms are `Unknown`.
pub fn keysym_class(keysym: u32) -> KeyClass {
    if let Some((_, class)) = lookup(keysym) {
        return class;
    }
    if keysym_char(keysym).is_some() {
        KeyClass::Printable
    } else {
        KeyClass::Unknown
    }
}

/// Characters that render as nothing (or as blank space) or that reorder
/// surrounding text; printing them raw would let a client make audit lines
/// misleading.
fn is_invisible(c: char) -> bool {
    c.is_whitespace()
        || matches!(
            c,
            '\u{00ad}'
                | '\u{034f}'
                | '\u{061c}'
                | '\u{115f}'..='\u{1160}'
                | '\u{17b4}'..='\u{17b5}'
                | '\u{180b}'..='\u{180f}'
                | '\u{200b}'..='\u{200f}'
                | '\u{202a}'..='\u{202e}'
                | '\u{2060}'..='\u{206f}'
                | '\u{3164}'
                | '\u{fe00}'..='\u{fe0f}'
                | '\u{feff}'
                | '\u{ffa0}'
                | '\u{fff9}'..='\u{fffb}'
                | '\u{1d173}'..='\u{1d17a}'
                | '\u{e0000}'..='\u{e0fff}'
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Required names with their `keysymdef.h` values, written out
    /// independently of `NAMED` so a typo in the table is caught.
    const REQUIRED: &[(u32, &str)] = &[
        (0xff08, "BackSpace"),
        (0xff09, "Tab"),
        (0xff0a, "Linefeed"),
        (0xff0b, "Clear"),
        (0xff0d, "Return"),
        (0xff13, "Pause"),
        (0xff14, "Scroll_Lock"),
        (0xff15, "Sys_Req"),
        (0xff1b, "Escape"),
        (0xffff, "Delete"),
        (0xff20, "Multi_key"),
        (0xff50, "Home"),
        (0xff51, "Left"),
        (0xff52, "Up"),
        (0xff53, "Right"),
        (0xff54, "Down"),
        (0xff55, "Page_Up"),
        (0xff56, "Page_Down"),
        (0xff57, "End"),
        (0xff58, "Begin"),
        (0xff60, "Select"),
        (0xff61, "Print"),
        (0xff62, "Execute"),
        (0xff63, "Insert"),
        (0xff65, "Undo"),
        (0xff66, "Redo"),
        (0xff67, "Menu"),
        (0xff68, "Find"),
        (0xff69, "Cancel"),
        (0xff6a, "Help"),
        (0xff6b, "Break"),
        (0xff7e, "Mode_switch"),
        (0xff7f, "Num_Lock"),
        (0xff80, "KP_Space"),
        (0xff89, "KP_Tab"),
        (0xff8d, "KP_Enter"),
        (0xff91, "KP_F1"),
        (0xff92, "KP_F2"),
        (0xff93, "KP_F3"),
        (0xff94, "KP_F4"),
        (0xff95, "KP_Home"),
        (0xff96, "KP_Left"),
        (0xff97, "KP_Up"),
        (0xff98, "KP_Right"),
        (0xff99, "KP_Down"),
        (0xff9a, "KP_Prior"),
        (0xff9b, "KP_Next"),
        (0xff9c, "KP_End"),
        (0xff9d, "KP_Begin"),
        (0xff9e, "KP_Insert"),
        (0xff9f, "KP_Delete"),
        (0xffbd, "KP_Equal"),
        (0xffaa, "KP_Multiply"),
        (0xffab, "KP_Add"),
        (0xffac, "KP_Separator"),
        (0xffad, "KP_Subtract"),
        (0xffae, "KP_Decimal"),
        (0xffaf, "KP_Divide"),
        (0xffe1, "Shift_L"),
        (0xffe2, "Shift_R"),
        (0xffe3, "Control_L"),
        (0xffe4, "Control_R"),
        (0xffe5, "Caps_Lock"),
        (0xffe6, "Shift_Lock"),
        (0xffe7, "Meta_L"),
        (0xffe8, "Meta_R"),
        (0xffe9, "Alt_L"),
        (0xffea, "Alt_R"),
        (0xffeb, "Super_L"),
        (0xffec, "Super_R"),
        (0xffed, "Hyper_L"),
        (0xffee, "Hyper_R"),
        (0xfe03, "ISO_Level3_Shift"),
        (0xfe20, "ISO_Left_Tab"),
    ];

    #[test]
    fn every_required_key_has_its_name() {
        for &(keysym, name) in REQUIRED {
            assert_eq!(keysym_name(keysym), name, "keysym {keysym:#x}");
            assert_eq!(keysym_char(keysym), None, "{name}");
            assert_ne!(keysym_class(keysym), KeyClass::Unknown, "{name}");
        }
    }

    #[test]
    fn keypad_digits_are_contiguous() {
        for d in 0..=9u32 {
            assert_eq!(keysym_name(0xffb0 + d), format!("KP_{d}"));
            assert_eq!(keysym_class(0xffb0 + d), KeyClass::Control);
            assert_eq!(keysym_char(0xffb0 + d), None);
        }
    }

    #[test]
    fn function_keys_f1_to_f35() {
        for n in 1..=35u32 {
            let keysym = 0xffbe + n - 1;
            assert_eq!(keysym_name(keysym), format!("F{n}"));
            assert_eq!(keysym_class(keysym), KeyClass::Function);
        }
        assert_eq!(keysym_name(0xffc9), "F12");
        assert_eq!(keysym_name(0xffe0), "F35");
    }

    #[test]
    fn named_names_are_borrowed() {
        assert!(matches!(keysym_name(0xff0d), Cow::Borrowed("Return")));
        assert!(matches!(keysym_name(0x20), Cow::Borrowed("space")));
    }

    #[test]
    fn table_is_sorted_without_duplicates() {
        for pair in NAMED.windows(2) {
            assert!(
                pair[0].0 < pair[1].0,
                "{:#x} ({}) not before {:#x} ({})",
                pair[0].0,
                pair[0].1,
                pair[1].0,
                pair[1].1
            );
        }
    }

    #[test]
    fn table_names_are_unique_and_plain() {
        let mut names: Vec<&str> = NAMED.iter().map(|&(_, n, _)| n).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(names.len(), before, "duplicate name in table");
        for name in names {
            assert!(!name.is_empty());
            assert!(name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
        }
    }

    #[test]
    fn table_entries_are_never_printable() {
        for &(keysym, name, class) in NAMED {
            assert_ne!(class, KeyClass::Printable, "{name}");
            assert_ne!(class, KeyClass::Unknown, "{name}");
            assert_eq!(keysym_char(keysym), None, "{name}");
        }
    }

    #[test]
    fn latin1_characters() {
        assert_eq!(keysym_name(0x61), "a");
        assert_eq!(keysym_name(0x41), "A");
        assert_eq!(keysym_name(0x30), "0");
        assert_eq!(keysym_name(0x7e), "~");
        assert_eq!(keysym_name(0xe9), "é");
        assert_eq!(keysym_name(0xff), "ÿ");
        assert_eq!(keysym_name(0xa9), "©");
        assert_eq!(keysym_char(0x61), Some('a'));
        assert_eq!(keysym_char(0xe9), Some('é'));
        for keysym in (0x20..=0x7e).chain(0xa0..=0xff) {
            let c = keysym_char(keysym);
            assert_eq!(c, char::from_u32(keysym), "{keysym:#x}");
            assert_eq!(keysym_class(keysym), KeyClass::Printable);
        }
    }

    #[test]
    fn space_is_named() {
        assert_eq!(keysym_name(0x20), "space");
        assert_eq!(keysym_char(0x20), Some(' '));
        assert_eq!(keysym_class(0x20), KeyClass::Printable);
        assert_eq!(keysym_name(0x0100_0020), "space");
    }

    #[test]
    fn latin1_gaps_are_hex() {
        for keysym in (0x00..0x20).chain(0x7f..0xa0) {
            assert_eq!(keysym_char(keysym), None);
            assert_eq!(keysym_class(keysym), KeyClass::Unknown);
            assert_eq!(keysym_name(keysym), format!("0x{keysym:08x}"));
        }
        assert_eq!(keysym_name(0x7f), "0x0000007f");
    }

    #[test]
    fn unicode_keysyms() {
        assert_eq!(keysym_name(0x0100_20ac), "€");
        assert_eq!(keysym_char(0x0100_20ac), Some('€'));
        assert_eq!(keysym_class(0x0100_20ac), KeyClass::Printable);
        assert_eq!(keysym_name(0x0100_0041), "A");
        assert_eq!(keysym_char(0x0100_0041), Some('A'));
        assert_eq!(keysym_name(0x0100_0416), "Ж");
        assert_eq!(keysym_name(0x0101_f600), "😀");
        assert_eq!(keysym_name(0x0110_ffff), "\u{10ffff}");
    }

    #[test]
    fn unicode_control_and_invalid_codepoints_are_hex() {
        for keysym in [0x0100_0007, 0x0100_0000, 0x0100_007f, 0x0100_009f] {
            assert_eq!(keysym_char(keysym), None);
            assert_eq!(keysym_class(keysym), KeyClass::Unknown);
            assert_eq!(keysym_name(keysym), format!("0x{keysym:08x}"));
        }
        assert_eq!(keysym_name(0x0100_0007), "0x01000007");
        // Surrogates are not chars.
        assert_eq!(keysym_char(0x0100_d800), None);
        assert_eq!(keysym_name(0x0100_dfff), "0x0100dfff");
        // Just past the Unicode range.
        assert_eq!(keysym_char(0x0111_0000), None);
        assert_eq!(keysym_name(0x0111_0000), "0x01110000");
        assert_eq!(keysym_char(0x00ff_ffff), None);
    }

    #[test]
    fn unicode_range_decodes_exactly_non_control_chars() {
        for cp in 0..=0x10_ffffu32 {
            let expected = char::from_u32(cp).filter(|c| !c.is_control());
            assert_eq!(keysym_char(UNICODE_BASE + cp), expected, "U+{cp:04X}");
        }
    }

    #[test]
    fn invisible_characters_are_escaped() {
        assert_eq!(keysym_name(0xa0), "U+00A0");
        assert_eq!(keysym_name(0xad), "U+00AD");
        assert_eq!(keysym_name(0x0100_202e), "U+202E");
        assert_eq!(keysym_name(0x0100_200b), "U+200B");
        assert_eq!(keysym_name(0x0100_2028), "U+2028");
        assert_eq!(keysym_name(0x0100_feff), "U+FEFF");
        assert_eq!(keysym_name(0x010e_0041), "U+E0041");
        // Still printable: they do type a character.
        assert_eq!(keysym_class(0x0100_202e), KeyClass::Printable);
        assert_eq!(keysym_char(0x0100_202e), Some('\u{202e}'));
    }

    #[test]
    fn unknown_values_are_hex() {
        assert_eq!(keysym_name(0x1234), "0x00001234");
        assert_eq!(keysym_name(0), "0x00000000");
        assert_eq!(keysym_name(0xff64), "0x0000ff64");
        assert_eq!(keysym_name(0xfe00), "0x0000fe00");
        assert_eq!(keysym_name(0x01a1), "0x000001a1");
        assert_eq!(keysym_name(u32::MAX), "0xffffffff");
        assert_eq!(keysym_class(0x1234), KeyClass::Unknown);
        assert_eq!(keysym_class(u32::MAX), KeyClass::Unknown);
    }

    #[test]
    fn classes_of_representative_keys() {
        use KeyClass::*;
        let cases = [
            (0x61, Printable),
            (0x20, Printable),
            (0xe9, Printable),
            (0x0100_20ac, Printable),
            (0xff08, Control),
            (0xff09, Control),
            (0xff0d, Control),
            (0xff1b, Control),
            (0xffff, Control),
            (0xff51, Control),
            (0xff55, Control),
            (0xff63, Control),
            (0xff67, Control),
            (0xff61, Control),
            (0xff13, Control),
            (0xfe20, Control),
            (0xff8d, Control),
            (0xffab, Control),
            (0xffb5, Control),
            (0xff91, Control),
            (0xffbe, Function),
            (0xffc9, Function),
            (0xffe0, Function),
            (0xffe1, Modifier),
            (0xffe4, Modifier),
            (0xffe5, Modifier),
            (0xffe6, Modifier),
            (0xffe7, Modifier),
            (0xffea, Modifier),
            (0xffeb, Modifier),
            (0xffee, Modifier),
            (0xfe03, Modifier),
            (0xff7e, Modifier),
            (0xff7f, Modifier),
            (0x1234, Unknown),
            (0x0100_0007, Unknown),
            (0xfe50, Unknown),
        ];
        for (keysym, class) in cases {
            assert_eq!(keysym_class(keysym), class, "keysym {keysym:#x}");
        }
    }

    fn check_consistent(keysym: u32) {
        let name = keysym_name(keysym);
        let class = keysym_class(keysym);
        let ch = keysym_char(keysym);
        assert!(!name.is_empty());
        assert!(!name.chars().any(char::is_control), "{keysym:#x}");
        assert_eq!(class == KeyClass::Printable, ch.is_some(), "{keysym:#x}");
        if class == KeyClass::Unknown {
            assert_eq!(name, format!("0x{keysym:08x}"));
        }
    }

    #[test]
    fn no_panic_low_range_exhaustive() {
        for keysym in 0..=0x1_0000u32 {
            check_consistent(keysym);
        }
        for keysym in 0xfe00..=0x1_0000u32 {
            check_consistent(keysym);
        }
    }

    #[test]
    fn no_panic_sampled_high_range() {
        let mut keysym = 0u32;
        loop {
            check_consistent(keysym);
            match keysym.checked_add(0x0001_0001) {
                Some(next) => keysym = next,
                None => break,
            }
        }
        for keysym in [
            UNICODE_BASE - 1,
            UNICODE_BASE,
            UNICODE_MAX,
            UNICODE_MAX + 1,
            0x1000_0000,
            0x8000_0000,
            u32::MAX - 1,
            u32::MAX,
        ] {
            check_consistent(keysym);
        }
    }
}
