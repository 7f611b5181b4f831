//! `PIXEL_FORMAT`: how many bytes a pixel takes on the wire, which is what framing of
//! every pixel-carrying rectangle depends on.

use crate::error::Error;

/// The 16-byte `PIXEL_FORMAT` structure of ServerInit, SetPixelFormat and the VMware
/// display-mode-change pseudo-rectangle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PixelFormat {
    /// Bits per pixel on the wire: 8, 16 or 32.
    pub bits_per_pixel: u8,
    /// Useful bits in a pixel value.
    pub depth: u8,
    /// Multi-byte pixels are big endian.
    pub big_endian: bool,
    /// Pixels are RGB values rather than colour-map indices.
    pub true_colour: bool,
    /// Maximum red value (2^n - 1).
    pub red_max: u16,
    /// Maximum green value (2^n - 1).
    pub green_max: u16,
    /// Maximum blue value (2^n - 1).
    pub blue_max: u16,
    /// Shift of the red value within a pixel.
    pub red_shift: u8,
    /// Shift of the green value within a pixel.
    pub green_shift: u8,
    /// Shift of the blue value within a pixel.
    pub blue_shift: u8,
}

impl PixelFormat {
    /// Size of the structure on the wire.
    pub const LEN: usize = 16;

    /// 32 bits per pixel, depth 24, little endian, 8 bits per channel: QEMU's natural
    /// format and the one noVNC asks for.
    pub const RGB888: PixelFormat = PixelFormat {
        bits_per_pixel: 32,
        depth: 24,
        big_endian: false,
        true_colour: true,
        red_max: 255,
        green_max: 255,
        blue_max: 255,
        red_shift: 16,
        green_shift: 8,
        blue_shift: 0,
    };

    /// 16 bits per pixel, 5-6-5 little endian.
    pub const RGB565: PixelFormat = PixelFormat {
        bits_per_pixel: 16,
        depth: 16,
        big_endian: false,
        true_colour: true,
        red_max: 31,
        green_max: 63,
        blue_max: 31,
        red_shift: 11,
        green_shift: 5,
        blue_shift: 0,
    };

    /// 8 bits per pixel, 3-3-2 (blue in the top bits).
    pub const BGR233: PixelFormat = PixelFormat {
        bits_per_pixel: 8,
        depth: 8,
        big_endian: false,
        true_colour: true,
        red_max: 7,
        green_max: 7,
        blue_max: 3,
        red_shift: 0,
        green_shift: 3,
        blue_shift: 6,
    };

    /// Parses and validates the 16 wire bytes.
    pub fn parse(b: &[u8; Self::LEN]) -> Result<Self, Error> {
        let pf = PixelFormat {
            bits_per_pixel: b[0],
            depth: b[1],
            big_endian: b[2] != 0,
            true_colour: b[3] != 0,
            red_max: u16::from_be_bytes([b[4], b[5]]),
            green_max: u16::from_be_bytes([b[6], b[7]]),
            blue_max: u16::from_be_bytes([b[8], b[9]]),
            red_shift: b[10],
            green_shift: b[11],
            blue_shift: b[12],
        };
        pf.validate()?;
        Ok(pf)
    }

    /// Appends the 16 wire bytes.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&[
            self.bits_per_pixel,
            self.depth,
            u8::from(self.big_endian),
            u8::from(self.true_colour),
        ]);
        out.extend_from_slice(&self.red_max.to_be_bytes());
        out.extend_from_slice(&self.green_max.to_be_bytes());
        out.extend_from_slice(&self.blue_max.to_be_bytes());
        out.extend_from_slice(&[self.red_shift, self.green_shift, self.blue_shift, 0, 0, 0]);
    }

    /// Bytes per pixel on the wire (`PIXEL`).
    pub fn bytes_per_pixel(&self) -> usize {
        usize::from(self.bits_per_pixel / 8)
    }

    /// Bytes per Tight pixel (`TPIXEL`): 3 for 8-bit-per-channel true colour at 32 bits
    /// per pixel, otherwise `PIXEL`.
    ///
    /// The spec also requires depth 24; QEMU checks only the channel maxima. Formats
    /// where the two rules disagree are refused by [`PixelFormat::validate`], so the
    /// framing never has to guess.
    pub fn tight_pixel_len(&self) -> usize {
        if self.bits_per_pixel == 32
            && self.true_colour
            && self.red_max == 255
            && self.green_max == 255
            && self.blue_max == 255
        {
            3
        } else {
            self.bytes_per_pixel()
        }
    }

    /// Checks that the format is one a server can produce and both peers read alike.
    pub fn validate(&self) -> Result<(), Error> {
        if !matches!(self.bits_per_pixel, 8 | 16 | 32) {
            return Err(Error::InvalidPixelFormat(
                "bits-per-pixel must be 8, 16 or 32",
            ));
        }
        if self.depth == 0 || self.depth > self.bits_per_pixel {
            return Err(Error::InvalidPixelFormat(
                "depth must be between 1 and bits-per-pixel",
            ));
        }
        if !self.true_colour && self.bits_per_pixel != 8 {
            // QEMU serves colour-mapped clients at 8 bits per pixel whatever they ask;
            // a proxy framing 16 or 32 would disagree with the server.
            return Err(Error::InvalidPixelFormat(
                "colour-map formats must be 8 bits per pixel",
            ));
        }
        if self.true_colour {
            if self.red_max == 0 || self.green_max == 0 || self.blue_max == 0 {
                // QEMU reads a zero maximum as 255, which changes Tight's pixel size.
                return Err(Error::InvalidPixelFormat("a colour maximum is zero"));
            }
            let bits = u32::from(self.bits_per_pixel);
            for (max, shift) in [
                (self.red_max, self.red_shift),
                (self.green_max, self.green_shift),
                (self.blue_max, self.blue_shift),
            ] {
                let max = u32::from(max);
                if max & max.wrapping_add(1) != 0 {
                    return Err(Error::InvalidPixelFormat("colour maximum is not 2^n - 1"));
                }
                let width = 32 - max.leading_zeros();
                if u32::from(shift) + width > bits {
                    return Err(Error::InvalidPixelFormat(
                        "colour channel does not fit in bits-per-pixel",
                    ));
                }
            }
            let all_255 = self.red_max == 255 && self.green_max == 255 && self.blue_max == 255;
            if self.bits_per_pixel == 32 && all_255 && self.depth != 24 {
                // Tight's 3-byte TPIXEL: the spec says depth 24 is required, QEMU does
                // not look at depth. Such a format would be framed differently by the
                // two, so it is refused rather than guessed.
                return Err(Error::InvalidPixelFormat(
                    "8-bit channels at 32 bits per pixel require depth 24",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(pf: &PixelFormat) -> [u8; 16] {
        let mut v = Vec::new();
        pf.write(&mut v);
        let mut a = [0u8; 16];
        a.copy_from_slice(&v);
        a
    }

    #[test]
    fn rgb888_round_trips() {
        let b = bytes(&PixelFormat::RGB888);
        assert_eq!(b, [32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0]);
        assert_eq!(PixelFormat::parse(&b), Ok(PixelFormat::RGB888));
        assert_eq!(PixelFormat::RGB888.bytes_per_pixel(), 4);
        assert_eq!(PixelFormat::RGB888.tight_pixel_len(), 3);
    }

    #[test]
    fn sixteen_and_eight_bit_formats() {
        let rgb565 = PixelFormat::RGB565;
        assert_eq!(PixelFormat::parse(&bytes(&rgb565)), Ok(rgb565));
        assert_eq!(rgb565.tight_pixel_len(), 2);
        let bgr233 = PixelFormat::BGR233;
        assert_eq!(PixelFormat::parse(&bytes(&bgr233)), Ok(bgr233));
        assert_eq!(bgr233.tight_pixel_len(), 1);
        let indexed = PixelFormat {
            true_colour: false,
            red_max: 0,
            green_max: 0,
            blue_max: 0,
            ..bgr233
        };
        assert_eq!(PixelFormat::parse(&bytes(&indexed)), Ok(indexed));
    }

    #[test]
    fn refuses_impossible_formats() {
        let bad = [
            PixelFormat {
                bits_per_pixel: 24,
                ..PixelFormat::RGB888
            },
            PixelFormat {
                depth: 0,
                ..PixelFormat::RGB888
            },
            PixelFormat {
                depth: 33,
                ..PixelFormat::RGB888
            },
            PixelFormat {
                red_max: 254,
                ..PixelFormat::RGB888
            },
            PixelFormat {
                red_shift: 25,
                ..PixelFormat::RGB888
            },
            PixelFormat {
                depth: 32,
                ..PixelFormat::RGB888
            },
            PixelFormat {
                blue_max: 0,
                ..PixelFormat::RGB888
            },
            PixelFormat {
                true_colour: false,
                ..PixelFormat::RGB888
            },
        ];
        for pf in bad {
            assert!(
                matches!(
                    PixelFormat::parse(&bytes(&pf)),
                    Err(Error::InvalidPixelFormat(_))
                ),
                "{pf:?}"
            );
        }
    }
}
