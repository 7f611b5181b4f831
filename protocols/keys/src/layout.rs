//! Typing text as key presses: which keys a guest with a given keyboard layout needs to
//! receive, in order, to type each character (for "Paste as keys": a guest without a
//! clipboard agent gets the text typed).
//!
//! A guest decodes scancodes by its own layout, so the same character is a different
//! key on each: `z` is the US `y` key on a German guest, `@` is AltGr+Q there and
//! AltGr+0 on a French one. [`Layout::plan`] turns text into [`Press`]es: a key with the
//! modifiers it needs (Shift, AltGr), after a dead key when the character is composed
//! (`ê` on a French layout is the dead circumflex, then `e`). Each press carries the
//! keysym of what it types, so a record of it reads back as the text.
//!
//! The layouts are the X11/Linux ones (xkb `us`, `de`, `fr`), which Windows shares but
//! for two keys of `fr`: there AltGr+2 (`~`) and AltGr+7 (`` ` ``) are dead keys.

use crate::Key;

/// A keyboard layout a guest may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layout {
    /// US (QWERTY).
    Us,
    /// German (QWERTZ).
    De,
    /// French (AZERTY).
    Fr,
}

/// Shift, as noVNC sends it.
pub const SHIFT: Key = Key(0x2A);
/// AltGr: the right Alt key (behind 0xE0).
pub const ALTGR: Key = Key(0xB8);
/// The keysym of Shift_L.
pub const SHIFT_KEYSYM: u32 = 0xffe1;
/// The keysym a browser sends for AltGr (ISO_Level3_Shift).
pub const ALTGR_KEYSYM: u32 = 0xfe03;
/// Return.
const RETURN: Key = Key(0x1C);
/// Tab.
const TAB: Key = Key(0x0F);
/// Space.
const SPACE: Key = Key(0x39);
/// A press of Caps Lock.
pub const CAPS_LOCK: Press = Press {
    key: Key(0x3A),
    level: Level {
        shift: false,
        altgr: false,
    },
    keysym: 0xffe5,
};

/// Which modifiers a key needs to type a character.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Level {
    /// Shift held.
    pub shift: bool,
    /// AltGr held.
    pub altgr: bool,
}

/// One key to press and release, with the modifiers held around it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Press {
    /// The key.
    pub key: Key,
    /// Held while it is pressed.
    pub level: Level,
    /// The X11 keysym of what it types: the character (Latin-1, or 0x01000000 plus
    /// its code point), a dead key's keysym, or Return's and Tab's.
    pub keysym: u32,
}

/// One key event of a paste: the key, pressed or released, and its keysym.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    /// The key.
    pub key: Key,
    /// Pressed (true) or released.
    pub down: bool,
    /// Its keysym.
    pub keysym: u32,
}

/// The key events of `presses`, in order: for each, its modifiers down, the key down
/// and up, the modifiers up.
pub fn events(presses: &[Press]) -> Vec<Event> {
    let mut out = Vec::with_capacity(presses.len() * 2);
    for p in presses {
        let mods = [
            (p.level.shift, SHIFT, SHIFT_KEYSYM),
            (p.level.altgr, ALTGR, ALTGR_KEYSYM),
        ];
        for &(held, key, keysym) in &mods {
            if held {
                out.push(Event {
                    key,
                    down: true,
                    keysym,
                });
            }
        }
        out.push(Event {
            key: p.key,
            down: true,
            keysym: p.keysym,
        });
        out.push(Event {
            key: p.key,
            down: false,
            keysym: p.keysym,
        });
        for &(held, key, keysym) in mods.iter().rev() {
            if held {
                out.push(Event {
                    key,
                    down: false,
                    keysym,
                });
            }
        }
    }
    out
}

/// A character the layout cannot type, and where it is in the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Untypeable {
    /// The character.
    pub ch: char,
    /// Its index in the text, in characters.
    pub at: usize,
    /// The layout's name.
    pub layout: &'static str,
}

impl std::fmt::Display for Untypeable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:?} (character {}) cannot be typed on the {} layout",
            self.ch,
            self.at + 1,
            self.layout
        )
    }
}

impl std::error::Error for Untypeable {}

/// What one key types at each level.
struct Entry {
    key: u8,
    plain: Sym,
    shift: Sym,
    altgr: Sym,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Sym {
    None,
    Char(char),
    /// A dead key for this spacing diacritic (`^`, `` ` ``, `´`, `¨`, `~`).
    Dead(char),
}

use Sym::{Char as C, Dead as D, None as N};

const fn e(key: u8, plain: Sym, shift: Sym, altgr: Sym) -> Entry {
    Entry {
        key,
        plain,
        shift,
        altgr,
    }
}

/// A letter key: lower case plain, upper case shifted.
const fn l(key: u8, c: char) -> Entry {
    e(key, C(c), C(c.to_ascii_uppercase()), N)
}

/// German (xkb `de`).
static DE: &[Entry] = &[
    e(0x02, C('1'), C('!'), N),
    e(0x03, C('2'), C('"'), C('²')),
    e(0x04, C('3'), C('§'), C('³')),
    e(0x05, C('4'), C('$'), N),
    e(0x06, C('5'), C('%'), N),
    e(0x07, C('6'), C('&'), N),
    e(0x08, C('7'), C('/'), C('{')),
    e(0x09, C('8'), C('('), C('[')),
    e(0x0A, C('9'), C(')'), C(']')),
    e(0x0B, C('0'), C('='), C('}')),
    e(0x0C, C('ß'), C('?'), C('\\')),
    e(0x0D, D('´'), D('`'), N),
    e(0x10, C('q'), C('Q'), C('@')),
    l(0x11, 'w'),
    e(0x12, C('e'), C('E'), C('€')),
    l(0x13, 'r'),
    l(0x14, 't'),
    l(0x15, 'z'),
    l(0x16, 'u'),
    l(0x17, 'i'),
    l(0x18, 'o'),
    l(0x19, 'p'),
    e(0x1A, C('ü'), C('Ü'), N),
    e(0x1B, C('+'), C('*'), C('~')),
    l(0x1E, 'a'),
    l(0x1F, 's'),
    l(0x20, 'd'),
    l(0x21, 'f'),
    l(0x22, 'g'),
    l(0x23, 'h'),
    l(0x24, 'j'),
    l(0x25, 'k'),
    l(0x26, 'l'),
    e(0x27, C('ö'), C('Ö'), N),
    e(0x28, C('ä'), C('Ä'), N),
    e(0x29, D('^'), C('°'), N),
    e(0x2B, C('#'), C('\''), N),
    e(0x56, C('<'), C('>'), C('|')),
    l(0x2C, 'y'),
    l(0x2D, 'x'),
    l(0x2E, 'c'),
    l(0x2F, 'v'),
    l(0x30, 'b'),
    l(0x31, 'n'),
    e(0x32, C('m'), C('M'), C('µ')),
    e(0x33, C(','), C(';'), N),
    e(0x34, C('.'), C(':'), N),
    e(0x35, C('-'), C('_'), N),
];

/// French (xkb `fr`).
static FR: &[Entry] = &[
    e(0x02, C('&'), C('1'), N),
    e(0x03, C('é'), C('2'), C('~')),
    e(0x04, C('"'), C('3'), C('#')),
    e(0x05, C('\''), C('4'), C('{')),
    e(0x06, C('('), C('5'), C('[')),
    e(0x07, C('-'), C('6'), C('|')),
    e(0x08, C('è'), C('7'), C('`')),
    e(0x09, C('_'), C('8'), C('\\')),
    e(0x0A, C('ç'), C('9'), C('^')),
    e(0x0B, C('à'), C('0'), C('@')),
    e(0x0C, C(')'), C('°'), C(']')),
    e(0x0D, C('='), C('+'), C('}')),
    l(0x10, 'a'),
    l(0x11, 'z'),
    e(0x12, C('e'), C('E'), C('€')),
    l(0x13, 'r'),
    l(0x14, 't'),
    l(0x15, 'y'),
    l(0x16, 'u'),
    l(0x17, 'i'),
    l(0x18, 'o'),
    l(0x19, 'p'),
    e(0x1A, D('^'), D('¨'), N),
    e(0x1B, C('$'), C('£'), C('¤')),
    l(0x1E, 'q'),
    l(0x1F, 's'),
    l(0x20, 'd'),
    l(0x21, 'f'),
    l(0x22, 'g'),
    l(0x23, 'h'),
    l(0x24, 'j'),
    l(0x25, 'k'),
    l(0x26, 'l'),
    l(0x27, 'm'),
    e(0x28, C('ù'), C('%'), N),
    e(0x29, C('²'), N, N),
    e(0x2B, C('*'), C('µ'), N),
    e(0x56, C('<'), C('>'), N),
    l(0x2C, 'w'),
    l(0x2D, 'x'),
    l(0x2E, 'c'),
    l(0x2F, 'v'),
    l(0x30, 'b'),
    l(0x31, 'n'),
    e(0x32, C(','), C('?'), N),
    e(0x33, C(';'), C('.'), N),
    e(0x34, C(':'), C('/'), N),
    e(0x35, C('!'), C('§'), N),
];

/// Whether `keysym` is a dead key's (the first half of a composed character).
pub fn is_dead(keysym: u32) -> bool {
    (0xfe50..=0xfe8f).contains(&keysym)
}

/// The X11 keysym of a dead key for a spacing diacritic.
fn dead_keysym(diacritic: char) -> u32 {
    match diacritic {
        '`' => 0xfe50,
        '´' => 0xfe51,
        '^' => 0xfe52,
        '~' => 0xfe53,
        '¨' => 0xfe57,
        _ => 0,
    }
}

/// The character a dead key for `diacritic` followed by `base` composes.
fn compose(diacritic: char, base: char) -> Option<char> {
    let (from, to) = match diacritic {
        '^' => ("aeiouAEIOU", "âêîôûÂÊÎÔÛ"),
        '`' => ("aeiouAEIOU", "àèìòùÀÈÌÒÙ"),
        '´' => ("aeiouyAEIOUY", "áéíóúýÁÉÍÓÚÝ"),
        '¨' => ("aeiouyAEIOU", "äëïöüÿÄËÏÖÜ"),
        '~' => ("anoANO", "ãñõÃÑÕ"),
        _ => return None,
    };
    let i = from.chars().position(|c| c == base)?;
    to.chars().nth(i)
}

/// The X11 keysym of a character.
pub fn char_keysym(c: char) -> u32 {
    match u32::from(c) {
        n @ (0x20..=0x7e | 0xa0..=0xff) => n,
        n => 0x0100_0000 + n,
    }
}

impl Layout {
    /// Every layout.
    pub const ALL: [Layout; 3] = [Layout::Us, Layout::De, Layout::Fr];

    /// Its name: `us`, `de`, `fr`.
    pub fn name(self) -> &'static str {
        match self {
            Layout::Us => "us",
            Layout::De => "de",
            Layout::Fr => "fr",
        }
    }

    /// The layout of that name.
    pub fn from_name(name: &str) -> Option<Layout> {
        Layout::ALL.into_iter().find(|l| l.name() == name)
    }

    /// The key and level that type `c` directly, if one does.
    fn direct(self, c: char) -> Option<(Key, Level)> {
        match c {
            ' ' => return Some((SPACE, Level::default())),
            '\n' => return Some((RETURN, Level::default())),
            '\t' => return Some((TAB, Level::default())),
            _ => {}
        }
        match self {
            Layout::Us => (0u8..0x80).map(Key).find_map(|k| {
                if k.class() != crate::Class::Printable || k.chars().numpad.is_some() {
                    return None;
                }
                let chars = k.chars();
                if chars.plain == Some(c) {
                    Some((k, Level::default()))
                } else if chars.shifted == Some(c) {
                    Some((
                        k,
                        Level {
                            shift: true,
                            altgr: false,
                        },
                    ))
                } else {
                    None
                }
            }),
            Layout::De | Layout::Fr => self.find(|s| s == C(c)),
        }
    }

    /// The key and level of the dead key for `diacritic`, if the layout has one.
    fn dead(self, diacritic: char) -> Option<(Key, Level)> {
        match self {
            Layout::Us => None,
            Layout::De | Layout::Fr => self.find(|s| s == D(diacritic)),
        }
    }

    fn find(self, want: impl Fn(Sym) -> bool) -> Option<(Key, Level)> {
        let table = match self {
            Layout::Us => return None,
            Layout::De => DE,
            Layout::Fr => FR,
        };
        table.iter().find_map(|en| {
            let levels = [
                (en.plain, Level::default()),
                (
                    en.shift,
                    Level {
                        shift: true,
                        altgr: false,
                    },
                ),
                (
                    en.altgr,
                    Level {
                        shift: false,
                        altgr: true,
                    },
                ),
            ];
            levels
                .into_iter()
                .find(|(s, _)| want(*s))
                .map(|(_, level)| (Key(en.key), level))
        })
    }

    /// The presses that type `text` on this layout, in order; a carriage return is
    /// skipped (a CR LF line end is one Return). With `caps` (Caps Lock on in the
    /// guest) Caps Lock is pressed before and after, as a person would: how Caps Lock
    /// changes a key differs between layouts and systems.
    pub fn plan(self, text: &str, caps: bool) -> Result<Vec<Press>, Untypeable> {
        let caps_lock = CAPS_LOCK;
        let mut out = Vec::new();
        if caps {
            out.push(caps_lock);
        }
        for (at, c) in text.chars().enumerate() {
            if c == '\r' {
                continue;
            }
            let press = |key: Key, level: Level, keysym: u32| Press { key, level, keysym };
            if let Some((key, level)) = self.direct(c) {
                let keysym = match c {
                    '\n' => 0xff0d,
                    '\t' => 0xff09,
                    _ => char_keysym(c),
                };
                out.push(press(key, level, keysym));
                continue;
            }
            // A dead key, then the base character or a space for the diacritic alone.
            let composed = ['^', '`', '´', '¨', '~'].into_iter().find_map(|d| {
                let dead = self.dead(d)?;
                // X11's Compose makes a dead circumflex or grave and Space the
                // character itself, but a dead acute and Space an apostrophe, a dead
                // diaeresis and Space a quotation mark: those two alone are not typed.
                if c == d {
                    return matches!(d, '^' | '`').then_some((dead, d, (SPACE, Level::default())));
                }
                let base = "aeiouyAEIOUYnN"
                    .chars()
                    .find(|&b| compose(d, b) == Some(c))?;
                Some((dead, d, self.direct(base)?))
            });
            let Some(((dkey, dlevel), d, (key, level))) = composed else {
                return Err(Untypeable {
                    ch: c,
                    at,
                    layout: self.name(),
                });
            };
            out.push(Press {
                key: dkey,
                level: dlevel,
                keysym: dead_keysym(d),
            });
            out.push(press(key, level, char_keysym(c)));
        }
        if caps {
            out.push(caps_lock);
        }
        Ok(out)
    }

    /// What a press of `key` at `level` types on this layout, for reading a record
    /// back: the character, or the diacritic of a dead key (`dead` true).
    pub fn typed(self, key: Key, level: Level) -> Option<(char, bool)> {
        match key {
            SPACE => return Some((' ', false)),
            RETURN => return Some(('\n', false)),
            TAB => return Some(('\t', false)),
            _ => {}
        }
        let table = match self {
            Layout::Us => {
                if level.altgr {
                    return None;
                }
                let chars = key.chars();
                let c = if level.shift {
                    chars.shifted
                } else {
                    chars.plain
                };
                return c.map(|c| (c, false));
            }
            Layout::De => DE,
            Layout::Fr => FR,
        };
        let en = table.iter().find(|en| en.key == key.number())?;
        let sym = match (level.shift, level.altgr) {
            (false, false) => en.plain,
            (true, false) => en.shift,
            (false, true) => en.altgr,
            (true, true) => N,
        };
        match sym {
            N => None,
            C(c) => Some((c, false)),
            D(d) => Some((d, true)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the presses type, read back through the same layout, dead keys composed.
    fn read_back(layout: Layout, presses: &[Press]) -> String {
        let mut out = String::new();
        let mut dead = None;
        for p in presses {
            let (c, is_dead) = layout.typed(p.key, p.level).expect("a key that types");
            if is_dead {
                dead = Some(c);
                continue;
            }
            match dead.take() {
                Some(d) if c == ' ' => out.push(d),
                Some(d) => out.push(compose(d, c).expect("composes")),
                None => out.push(c),
            }
        }
        out
    }

    #[test]
    fn every_printable_ascii_character_types_on_every_layout() {
        let ascii: String = (0x20u8..0x7f).map(char::from).collect();
        for layout in Layout::ALL {
            let presses = layout.plan(&ascii, false).unwrap();
            assert_eq!(read_back(layout, &presses), ascii, "{layout:?}");
        }
    }

    #[test]
    fn german_text_is_typed_with_german_keys() {
        let text = "Hello, World! äöü ß@€ {[]}\\ ^1 ê";
        let presses = Layout::De.plan(text, false).unwrap();
        assert_eq!(read_back(Layout::De, &presses), text);
        // z and y trade places; @ is AltGr+Q; ä is the US apostrophe key.
        let z = &Layout::De.plan("z", false).unwrap()[0];
        assert_eq!((z.key, z.keysym), (Key(0x15), u32::from('z')));
        let at = &Layout::De.plan("@", false).unwrap()[0];
        assert_eq!(
            (at.key, at.level.altgr, at.level.shift),
            (Key(0x10), true, false)
        );
        let ae = &Layout::De.plan("ä", false).unwrap()[0];
        assert_eq!((ae.key, ae.keysym), (Key(0x28), 0xe4));
        // ^ alone is the dead circumflex and a space whose keysym is ^.
        let caret = Layout::De.plan("^", false).unwrap();
        assert_eq!(caret.len(), 2);
        assert_eq!((caret[0].key, caret[0].keysym), (Key(0x29), 0xfe52));
        assert_eq!((caret[1].key, caret[1].keysym), (SPACE, u32::from('^')));
    }

    #[test]
    fn french_text_composes_with_dead_keys() {
        let text = "Où est l'hôtel ? A 1€, ça ne coûte rien : ça va ! Noël";
        let presses = Layout::Fr.plan(text, false).unwrap();
        assert_eq!(read_back(Layout::Fr, &presses), text);
        // ô is the dead circumflex, then o; digits take Shift.
        let o = Layout::Fr.plan("ô", false).unwrap();
        assert_eq!(o[0].keysym, 0xfe52);
        assert_eq!((o[1].key, o[1].keysym), (Key(0x18), 0xf4));
        let one = &Layout::Fr.plan("1", false).unwrap()[0];
        assert!(one.level.shift);
    }

    #[test]
    fn what_a_layout_cannot_type_is_named_with_its_place() {
        let e = Layout::Us.plan("abc ä", false).unwrap_err();
        assert_eq!((e.ch, e.at, e.layout), ('ä', 4, "us"));
        assert!(Layout::De.plan("日本", false).is_err());
        assert!(Layout::Fr.plan("ñ", false).is_err());
    }

    #[test]
    fn caps_lock_is_turned_off_around_the_text() {
        let p = Layout::Us.plan("aA", true).unwrap();
        let keys: Vec<(Key, bool)> = p.iter().map(|p| (p.key, p.level.shift)).collect();
        assert_eq!(
            keys,
            [
                (CAPS_LOCK.key, false),
                (Key(0x1E), false),
                (Key(0x1E), true),
                (CAPS_LOCK.key, false)
            ]
        );
    }

    #[test]
    fn line_ends_are_returns() {
        let p = Layout::Us.plan("a\r\nb\tc", false).unwrap();
        let keys: Vec<Key> = p.iter().map(|p| p.key).collect();
        assert_eq!(keys, [Key(0x1E), RETURN, Key(0x30), TAB, Key(0x2E)]);
    }
}
