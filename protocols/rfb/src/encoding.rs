//! Encoding and pseudo-encoding numbers, and which of them this codec can frame.
//!
//! A proxy that parses every byte must not let the client ask the server for an
//! encoding it cannot frame: [`Encoding::is_framable`] tells which entries of a
//! SetEncodings message may be forwarded.

use std::fmt;

/// An encoding or pseudo-encoding number (`S32` on the wire).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Encoding(pub i32);

/// What an encoding number stands for, as far as framing is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncodingKind {
    /// A real encoding: rectangles carry framebuffer pixels.
    Pixels,
    /// A pseudo-encoding the server sends as a rectangle (cursor, resize, LED ...).
    PseudoRect,
    /// A pseudo-encoding that only declares a capability or a preference (JPEG
    /// quality, fences, extended clipboard ...); it never appears as a rectangle.
    Declaration,
    /// Not framable by this codec.
    Unsupported,
}

impl Encoding {
    /// Raw pixels.
    pub const RAW: Encoding = Encoding(0);
    /// CopyRect.
    pub const COPY_RECT: Encoding = Encoding(1);
    /// Rise-and-run-length encoding.
    pub const RRE: Encoding = Encoding(2);
    /// Compact RRE.
    pub const CORRE: Encoding = Encoding(4);
    /// Hextile.
    pub const HEXTILE: Encoding = Encoding(5);
    /// zlib-compressed raw pixels.
    pub const ZLIB: Encoding = Encoding(6);
    /// Tight.
    pub const TIGHT: Encoding = Encoding(7);
    /// Zlib run-length encoding.
    pub const ZRLE: Encoding = Encoding(16);
    /// Tight with PNG instead of basic compression.
    pub const TIGHT_PNG: Encoding = Encoding(-260);
    /// JPEG quality level 0 (lowest); levels 0..=9 are -32..=-23.
    pub const JPEG_QUALITY_0: Encoding = Encoding(-32);
    /// JPEG quality level 9 (highest).
    pub const JPEG_QUALITY_9: Encoding = Encoding(-23);
    /// Compression level 0; levels 0..=9 are -256..=-247.
    pub const COMPRESS_LEVEL_0: Encoding = Encoding(-256);
    /// Compression level 9.
    pub const COMPRESS_LEVEL_9: Encoding = Encoding(-247);
    /// DesktopSize pseudo-encoding.
    pub const DESKTOP_SIZE: Encoding = Encoding(-223);
    /// LastRect pseudo-encoding.
    pub const LAST_RECT: Encoding = Encoding(-224);
    /// Rich cursor pseudo-encoding.
    pub const CURSOR: Encoding = Encoding(-239);
    /// X cursor pseudo-encoding.
    pub const X_CURSOR: Encoding = Encoding(-240);
    /// QEMU pointer motion change pseudo-encoding.
    pub const QEMU_POINTER_MOTION_CHANGE: Encoding = Encoding(-257);
    /// QEMU extended key event pseudo-encoding.
    pub const QEMU_EXTENDED_KEY_EVENT: Encoding = Encoding(-258);
    /// QEMU audio pseudo-encoding.
    pub const QEMU_AUDIO: Encoding = Encoding(-259);
    /// QEMU LED state pseudo-encoding.
    pub const QEMU_LED_STATE: Encoding = Encoding(-261);
    /// DesktopName pseudo-encoding.
    pub const DESKTOP_NAME: Encoding = Encoding(-307);
    /// ExtendedDesktopSize pseudo-encoding.
    pub const EXTENDED_DESKTOP_SIZE: Encoding = Encoding(-308);
    /// xvp pseudo-encoding.
    pub const XVP: Encoding = Encoding(-309);
    /// Fence pseudo-encoding.
    pub const FENCE: Encoding = Encoding(-312);
    /// ContinuousUpdates pseudo-encoding.
    pub const CONTINUOUS_UPDATES: Encoding = Encoding(-313);
    /// Cursor with alpha pseudo-encoding.
    pub const CURSOR_WITH_ALPHA: Encoding = Encoding(-314);
    /// ExtendedMouseButtons pseudo-encoding.
    pub const EXTENDED_MOUSE_BUTTONS: Encoding = Encoding(-316);
    /// Tight encoding without zlib pseudo-encoding.
    pub const TIGHT_WITHOUT_ZLIB: Encoding = Encoding(-317);
    /// JPEG fine-grained quality 0; 0..=100 are -512..=-412.
    pub const FINE_QUALITY_0: Encoding = Encoding(-512);
    /// JPEG fine-grained quality 100.
    pub const FINE_QUALITY_100: Encoding = Encoding(-412);
    /// JPEG subsampling 1X; the six levels are -768..=-763.
    pub const SUBSAMPLING_1X: Encoding = Encoding(-768);
    /// JPEG subsampling 16X.
    pub const SUBSAMPLING_16X: Encoding = Encoding(-763);
    /// VMware cursor pseudo-encoding.
    pub const VMWARE_CURSOR: Encoding = Encoding(0x574d_5664);
    /// VMware display mode change pseudo-encoding ("WMVi"): a new pixel format.
    pub const VMWARE_DISPLAY_MODE_CHANGE: Encoding = Encoding(0x574d_5669);
    /// Extended clipboard pseudo-encoding.
    pub const EXTENDED_CLIPBOARD: Encoding = Encoding(0xc0a1_e5ce_u32 as i32);

    /// Whether the codec can frame rectangles of this encoding, or, for declarations,
    /// frame every message the declaration enables.
    pub fn is_framable(self) -> bool {
        self.kind() != EncodingKind::Unsupported
    }

    /// Classifies the number.
    pub fn kind(self) -> EncodingKind {
        match self {
            Self::RAW
            | Self::COPY_RECT
            | Self::RRE
            | Self::CORRE
            | Self::HEXTILE
            | Self::ZLIB
            | Self::TIGHT
            | Self::ZRLE
            | Self::TIGHT_PNG => EncodingKind::Pixels,
            Self::DESKTOP_SIZE
            | Self::LAST_RECT
            | Self::CURSOR
            | Self::X_CURSOR
            | Self::QEMU_POINTER_MOTION_CHANGE
            | Self::QEMU_EXTENDED_KEY_EVENT
            | Self::QEMU_AUDIO
            | Self::QEMU_LED_STATE
            | Self::DESKTOP_NAME
            | Self::EXTENDED_DESKTOP_SIZE
            | Self::CURSOR_WITH_ALPHA
            | Self::EXTENDED_MOUSE_BUTTONS
            | Self::VMWARE_CURSOR
            | Self::VMWARE_DISPLAY_MODE_CHANGE => EncodingKind::PseudoRect,
            Self::XVP
            | Self::FENCE
            | Self::CONTINUOUS_UPDATES
            | Self::TIGHT_WITHOUT_ZLIB
            | Self::EXTENDED_CLIPBOARD => EncodingKind::Declaration,
            Encoding(n)
                if (Self::JPEG_QUALITY_0.0..=Self::JPEG_QUALITY_9.0).contains(&n)
                    || (Self::COMPRESS_LEVEL_0.0..=Self::COMPRESS_LEVEL_9.0).contains(&n)
                    || (Self::FINE_QUALITY_0.0..=Self::FINE_QUALITY_100.0).contains(&n)
                    || (Self::SUBSAMPLING_1X.0..=Self::SUBSAMPLING_16X.0).contains(&n) =>
            {
                EncodingKind::Declaration
            }
            _ => EncodingKind::Unsupported,
        }
    }

    /// A short human-readable name, for logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::RAW => "Raw",
            Self::COPY_RECT => "CopyRect",
            Self::RRE => "RRE",
            Self::CORRE => "CoRRE",
            Self::HEXTILE => "Hextile",
            Self::ZLIB => "Zlib",
            Self::TIGHT => "Tight",
            Self::ZRLE => "ZRLE",
            Self::TIGHT_PNG => "TightPNG",
            Self::DESKTOP_SIZE => "DesktopSize",
            Self::LAST_RECT => "LastRect",
            Self::CURSOR => "Cursor",
            Self::X_CURSOR => "XCursor",
            Self::QEMU_POINTER_MOTION_CHANGE => "QEMUPointerMotionChange",
            Self::QEMU_EXTENDED_KEY_EVENT => "QEMUExtendedKeyEvent",
            Self::QEMU_AUDIO => "QEMUAudio",
            Self::QEMU_LED_STATE => "QEMULEDState",
            Self::DESKTOP_NAME => "DesktopName",
            Self::EXTENDED_DESKTOP_SIZE => "ExtendedDesktopSize",
            Self::XVP => "xvp",
            Self::FENCE => "Fence",
            Self::CONTINUOUS_UPDATES => "ContinuousUpdates",
            Self::CURSOR_WITH_ALPHA => "CursorWithAlpha",
            Self::EXTENDED_MOUSE_BUTTONS => "ExtendedMouseButtons",
            Self::TIGHT_WITHOUT_ZLIB => "TightWithoutZlib",
            Self::VMWARE_CURSOR => "VMwareCursor",
            Self::VMWARE_DISPLAY_MODE_CHANGE => "VMwareDisplayModeChange",
            Self::EXTENDED_CLIPBOARD => "ExtendedClipboard",
            Encoding(n) if (Self::JPEG_QUALITY_0.0..=Self::JPEG_QUALITY_9.0).contains(&n) => {
                "JPEGQualityLevel"
            }
            Encoding(n) if (Self::COMPRESS_LEVEL_0.0..=Self::COMPRESS_LEVEL_9.0).contains(&n) => {
                "CompressionLevel"
            }
            Encoding(n) if (Self::FINE_QUALITY_0.0..=Self::FINE_QUALITY_100.0).contains(&n) => {
                "JPEGFineQualityLevel"
            }
            Encoding(n) if (Self::SUBSAMPLING_1X.0..=Self::SUBSAMPLING_16X.0).contains(&n) => {
                "JPEGSubsamplingLevel"
            }
            _ => "unknown",
        }
    }
}

impl fmt::Display for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.0, self.name())
    }
}

impl fmt::Debug for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Encoding({}, {})", self.0, self.name())
    }
}

/// Every encoding number the codec can frame, ranges expanded: what a proxy may
/// forward in SetEncodings.
pub fn framable_encodings() -> impl Iterator<Item = Encoding> {
    // The numbers span from the subsampling range to the extended clipboard; checking
    // each candidate keeps this list and `kind` from ever disagreeing.
    let named = [
        Encoding::VMWARE_CURSOR,
        Encoding::VMWARE_DISPLAY_MODE_CHANGE,
        Encoding::EXTENDED_CLIPBOARD,
    ];
    (Encoding::SUBSAMPLING_1X.0..=Encoding::ZRLE.0)
        .map(Encoding)
        .chain(named)
        .filter(|e| e.is_framable())
}

/// The encodings a client offered in its last SetEncodings, as the server decoder
/// needs them: a rectangle may only use an encoding that was offered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncodingSet {
    offered: Vec<Encoding>,
}

impl EncodingSet {
    /// Builds the set from the encodings of a SetEncodings message.
    pub fn new(encodings: impl IntoIterator<Item = Encoding>) -> Self {
        let mut offered: Vec<Encoding> = encodings.into_iter().collect();
        offered.sort_unstable();
        offered.dedup();
        EncodingSet { offered }
    }

    /// The encodings, sorted and without duplicates.
    pub fn into_vec(self) -> Vec<Encoding> {
        self.offered
    }

    /// Whether the client offered `e`. Raw is always allowed, as the spec requires.
    pub fn contains(&self, e: Encoding) -> bool {
        e == Encoding::RAW || self.offered.binary_search(&e).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_what_qemu_and_novnc_use() {
        for e in [
            Encoding::RAW,
            Encoding::COPY_RECT,
            Encoding::RRE,
            Encoding::HEXTILE,
            Encoding::ZLIB,
            Encoding::TIGHT,
            Encoding::ZRLE,
            Encoding::TIGHT_PNG,
        ] {
            assert_eq!(e.kind(), EncodingKind::Pixels, "{e}");
        }
        for e in [-32, -23, -256, -247, -312, -313, -309, -317] {
            assert_eq!(Encoding(e).kind(), EncodingKind::Declaration, "{e}");
        }
        assert_eq!(
            Encoding::EXTENDED_CLIPBOARD.kind(),
            EncodingKind::Declaration
        );
        assert_eq!(Encoding::EXTENDED_CLIPBOARD.0, -1_063_131_698);
        // Encodings noVNC or QEMU know but this codec does not frame: stripped.
        for e in [21, 50, 15, 17, 8, -232, -305, 0x574d_5668, -24_000] {
            assert!(!Encoding(e).is_framable(), "{e}");
        }
    }

    #[test]
    fn framable_list_matches_kind() {
        let list: Vec<Encoding> = framable_encodings().collect();
        assert!(list.contains(&Encoding::TIGHT));
        assert!(list.contains(&Encoding::EXTENDED_CLIPBOARD));
        assert!(list.contains(&Encoding(-500)));
        assert!(!list.contains(&Encoding(21)));
        assert!(list.iter().all(|e| e.is_framable()));
        // 9 pixel encodings, 14 pseudo-rects, 5 declarations, 10+10+101+6 levels.
        assert_eq!(list.len(), 9 + 14 + 5 + 10 + 10 + 101 + 6);
    }

    #[test]
    fn encoding_set_always_allows_raw() {
        let set = EncodingSet::new([Encoding::TIGHT, Encoding::CURSOR, Encoding::TIGHT]);
        assert!(set.contains(Encoding::RAW));
        assert!(set.contains(Encoding::TIGHT));
        assert!(set.contains(Encoding::CURSOR));
        assert!(!set.contains(Encoding::ZRLE));
    }
}
