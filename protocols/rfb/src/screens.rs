//! Multi-head layouts: the screens of SetDesktopSize (client) and ExtendedDesktopSize
//! (server).

/// The screens of SetDesktopSize or ExtendedDesktopSize.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Screens<'a>(pub(crate) &'a [u8]);

/// One screen of a multi-head layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Screen {
    /// Screen id.
    pub id: u32,
    /// Left edge within the framebuffer.
    pub x: u16,
    /// Top edge within the framebuffer.
    pub y: u16,
    /// Width.
    pub width: u16,
    /// Height.
    pub height: u16,
    /// Flags, preserved.
    pub flags: u32,
}

impl<'a> Screens<'a> {
    /// Number of screens.
    pub fn len(&self) -> usize {
        self.0.len() / 16
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The screens.
    pub fn iter(&self) -> impl Iterator<Item = Screen> + 'a {
        self.0.chunks_exact(16).map(|c| {
            let u16_at = |i: usize| u16::from_be_bytes([c[i], c[i + 1]]);
            let u32_at = |i: usize| u32::from_be_bytes([c[i], c[i + 1], c[i + 2], c[i + 3]]);
            Screen {
                id: u32_at(0),
                x: u16_at(4),
                y: u16_at(6),
                width: u16_at(8),
                height: u16_at(10),
                flags: u32_at(12),
            }
        })
    }
}
