//! Names of PC AT set 1 scancodes, as SPICE inputs carry them, for the audit log.
//!
//! A SPICE KEY_DOWN or KEY_UP code packs up to four scancode bytes little endian; the
//! server pushes them to the guest's keyboard one by one, stopping at a zero byte.
//! Extended keys are prefixed by 0xE0; a break (release) code has bit 7 set. So
//! spice-html5 sends `0xE0 | 0x4D << 8` for pressing Right and `0xE0 | 0xCD << 8` for
//! releasing it. Names follow the X11 keysym names the RFB audit uses.

/// One key transition decoded from scancode bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyStroke {
    /// The key's name (`Return`, `a`, `Control_R`, `F5`...), or `None` when the code
    /// has no name in the table.
    pub name: Option<&'static str>,
    /// Pressed (make code) or released (break code).
    pub down: bool,
    /// The make code, with 0xE000 added for extended keys.
    pub code: u16,
}

/// Set 1 make codes 0x01..=0x58.
const BASE: [&str; 0x59] = [
    "",
    "Escape",
    "1",
    "2",
    "3",
    "4",
    "5",
    "6",
    "7",
    "8",
    "9",
    "0",
    "minus",
    "equal",
    "BackSpace",
    "Tab", // 0x00
    "q",
    "w",
    "e",
    "r",
    "t",
    "y",
    "u",
    "i",
    "o",
    "p",
    "bracketleft",
    "bracketright",
    "Return",
    "Control_L",
    "a",
    "s", // 0x10
    "d",
    "f",
    "g",
    "h",
    "j",
    "k",
    "l",
    "semicolon",
    "apostrophe",
    "grave",
    "Shift_L",
    "backslash",
    "z",
    "x",
    "c",
    "v", // 0x20
    "b",
    "n",
    "m",
    "comma",
    "period",
    "slash",
    "Shift_R",
    "KP_Multiply",
    "Alt_L",
    "space",
    "Caps_Lock",
    "F1",
    "F2",
    "F3",
    "F4",
    "F5", // 0x30
    "F6",
    "F7",
    "F8",
    "F9",
    "F10",
    "Num_Lock",
    "Scroll_Lock",
    "KP_7",
    "KP_8",
    "KP_9",
    "KP_Subtract",
    "KP_4",
    "KP_5",
    "KP_6",
    "KP_Add",
    "KP_1", // 0x40
    "KP_2",
    "KP_3",
    "KP_0",
    "KP_Decimal",
    "Sys_Req",
    "",
    "less",
    "F11",
    "F12", // 0x50
];

fn extended(code: u8) -> Option<&'static str> {
    Some(match code {
        0x1C => "KP_Enter",
        0x1D => "Control_R",
        0x35 => "KP_Divide",
        0x37 => "Print",
        0x38 => "Alt_R",
        0x46 => "Break",
        0x47 => "Home",
        0x48 => "Up",
        0x49 => "Page_Up",
        0x4B => "Left",
        0x4D => "Right",
        0x4F => "End",
        0x50 => "Down",
        0x51 => "Page_Down",
        0x52 => "Insert",
        0x53 => "Delete",
        0x5B => "Super_L",
        0x5C => "Super_R",
        0x5D => "Menu",
        _ => return None,
    })
}

/// Decodes a sequence of scancode bytes (KEY_SCANCODE data, or the bytes of a
/// KEY_DOWN/KEY_UP code) into key transitions. Bytes of the Pause sequence (0xE1 ...)
/// yield one `Pause` press.
pub fn decode(bytes: &[u8]) -> Vec<KeyStroke> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == 0xE1 {
            // Pause: E1 1D 45 E1 9D C5, a press with no release.
            out.push(KeyStroke {
                name: Some("Pause"),
                down: true,
                code: 0xE11D,
            });
            i += 6.min(bytes.len() - i);
            continue;
        }
        let (ext, b) = if b == 0xE0 {
            match bytes.get(i + 1) {
                Some(&next) => {
                    i += 1;
                    (true, next)
                }
                None => break,
            }
        } else {
            (false, b)
        };
        i += 1;
        let make = b & 0x7f;
        // 0xE0 0x2A / 0xE0 0xAA are fake shifts some keyboards add around extended
        // keys; they are not keys of their own.
        if ext && make == 0x2A {
            continue;
        }
        let name = if ext {
            extended(make)
        } else {
            BASE.get(usize::from(make))
                .copied()
                .filter(|n| !n.is_empty())
        };
        out.push(KeyStroke {
            name,
            down: b & 0x80 == 0,
            code: if ext {
                0xE000 | u16::from(make)
            } else {
                u16::from(make)
            },
        });
    }
    out
}

/// Decodes a KEY_DOWN or KEY_UP code: its little-endian bytes up to the first zero.
pub fn decode_code(code: u32) -> Vec<KeyStroke> {
    let bytes = code.to_le_bytes();
    let len = bytes.iter().position(|&b| b == 0).unwrap_or(4);
    decode(&bytes[..len])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(code: u32) -> (Option<&'static str>, bool) {
        let k = decode_code(code);
        assert_eq!(k.len(), 1, "{code:#x}: {k:?}");
        (k[0].name, k[0].down)
    }

    #[test]
    fn spice_html5_codes() {
        assert_eq!(one(0x01), (Some("Escape"), true));
        assert_eq!(one(0x81), (Some("Escape"), false));
        assert_eq!(one(0x1C), (Some("Return"), true));
        assert_eq!(one(0x1E), (Some("a"), true));
        assert_eq!(one(0x2A), (Some("Shift_L"), true));
        assert_eq!(one(0x3F), (Some("F5"), true));
        assert_eq!(one(0x58), (Some("F12"), true));
        // Extended keys as spice-html5 packs them: 0xE0 | code << 8, release | 0x8000.
        assert_eq!(one(0xE0 | 0x4D << 8), (Some("Right"), true));
        assert_eq!(one(0xE0 | 0xCD << 8), (Some("Right"), false));
        assert_eq!(one(0xE0 | 0x1D << 8), (Some("Control_R"), true));
        assert_eq!(one(0xE0 | 0x53 << 8), (Some("Delete"), true));
    }

    #[test]
    fn raw_sequences() {
        let k = decode(&[0x1D, 0x38, 0xE0, 0x53, 0xE0, 0xD3, 0xB8, 0x9D]);
        let names: Vec<_> = k.iter().map(|k| (k.name.unwrap_or("?"), k.down)).collect();
        assert_eq!(
            names,
            [
                ("Control_L", true),
                ("Alt_L", true),
                ("Delete", true),
                ("Delete", false),
                ("Alt_L", false),
                ("Control_L", false)
            ]
        );
        assert_eq!(
            decode(&[0xE1, 0x1D, 0x45, 0xE1, 0x9D, 0xC5])[0].name,
            Some("Pause")
        );
        assert_eq!(
            decode(&[0xE0, 0x2A, 0xE0, 0x37]).len(),
            1,
            "fake shift skipped"
        );
        assert_eq!(decode(&[0x7F])[0].name, None);
        assert!(decode(&[0xE0]).is_empty());
        // Never panics, whatever the bytes.
        for a in 0..=255u8 {
            for b in [0u8, 0x1C, 0x80, 0xE0, 0xE1, 0xFF] {
                let _ = decode(&[a, b, a]);
                let _ = decode_code(u32::from_le_bytes([a, b, 0xE0, a]));
            }
        }
    }
}
