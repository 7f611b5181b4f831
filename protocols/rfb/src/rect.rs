//! Framing of a rectangle's encoded data, one encoding at a time.
//!
//! A framer looks at the structured parts of an encoding (a Hextile tile header, a
//! Tight control byte and palette, a ZRLE length) and says how many opaque bytes follow
//! them. It never looks inside the opaque bytes, so pixel data can be forwarded (or
//! spliced) as it arrives, and compressed data is never inflated.

use crate::encoding::{Encoding, EncodingSet};
use crate::error::{Error, Limits};
use crate::pixel::PixelFormat;
use crate::wire::{need, Reader};

/// What a framer needs to know of the session.
pub(crate) struct Ctx<'s> {
    pub(crate) pf: &'s PixelFormat,
    pub(crate) offered: &'s EncodingSet,
    pub(crate) limits: &'s Limits,
}

/// One step of framing: `header` structured bytes were parsed, `payload` opaque bytes
/// follow them, then `next` frames the rest.
pub(crate) struct Step {
    pub(crate) header: usize,
    pub(crate) payload: u64,
    pub(crate) next: Framer,
}

/// The framing state of the rectangle being decoded.
#[derive(Debug, Clone)]
pub(crate) enum Framer {
    /// Nothing more in this rectangle.
    Done,
    /// RRE (`compact` = CoRRE): the subrectangle count and background.
    Rre {
        width: u16,
        height: u16,
        compact: bool,
    },
    /// Hextile: the header of tile `index`.
    Hextile { width: u16, height: u16, index: u32 },
    /// Zlib or ZRLE: the 4-byte length of the compressed data, at most `bound`.
    LengthPrefixed { what: &'static str, bound: u64 },
    /// Tight or TightPNG: control byte and what follows it.
    Tight { width: u16, height: u16, png: bool },
    /// Cursor with alpha: the encoding of the cursor image.
    AlphaCursor { width: u16, height: u16 },
    /// VMware cursor: cursor type and padding.
    VmwareCursor { width: u16, height: u16 },
}

/// Bytes of `w * h` pixels of `bpp` bytes each.
pub(crate) fn pixels(w: u16, h: u16, bpp: usize) -> u64 {
    u64::from(w) * u64::from(h) * bpp as u64
}

/// A generous bound on compressed or image data for `raw` bytes of pixels: zlib with a
/// sync flush stays far below it, and so do JPEG and PNG of anything but tiny
/// rectangles, which the constant covers (their headers and tables). It exists to
/// refuse lying lengths, such as 4 GiB for a 16x16 rectangle.
pub(crate) fn compressed_bound(raw: u64) -> u64 {
    raw + raw / 2 + 4096
}

/// The largest ZRLE tile data for a rectangle: each 64x64 tile takes one
/// sub-encoding byte plus at worst a run of length one per pixel (a CPIXEL and a
/// length byte each), or a 127-entry palette and an index per pixel.
pub(crate) fn zrle_raw_bound(w: u16, h: u16, bpp: usize) -> u64 {
    let tiles = u64::from(w).div_ceil(64) * u64::from(h).div_ceil(64);
    pixels(w, h, bpp + 1) + tiles * (1 + 127 * bpp as u64)
}

impl Framer {
    /// Frames the next structured part at the start of `buf`; `None` until it is all
    /// buffered.
    pub(crate) fn step(&self, buf: &[u8], ctx: &Ctx<'_>) -> Result<Option<Step>, Error> {
        let bpp = ctx.pf.bytes_per_pixel();
        let mut r = Reader::new(buf);
        let (payload, next) = match *self {
            Framer::Done => (0, Framer::Done),
            Framer::Rre {
                width,
                height,
                compact,
            } => {
                let count = need!(r.u32());
                need!(r.skip(bpp));
                if u64::from(count) > u64::from(width) * u64::from(height) {
                    return Err(Error::Malformed {
                        what: "RRE rectangle",
                        why: "more subrectangles than pixels",
                    });
                }
                let each = bpp as u64 + if compact { 4 } else { 8 };
                (u64::from(count) * each, Framer::Done)
            }
            Framer::Hextile {
                width,
                height,
                index,
            } => return hextile_tile(&mut r, width, height, index, bpp),
            Framer::LengthPrefixed { what, bound } => {
                let len = u64::from(need!(r.u32()));
                if len > bound {
                    return Err(Error::LengthTooLarge {
                        what,
                        len,
                        max: bound,
                    });
                }
                (len, Framer::Done)
            }
            Framer::Tight { width, height, png } => {
                need!(tight(&mut r, width, height, png, ctx)?)
            }
            Framer::AlphaCursor { width, height } => {
                let inner = Encoding(need!(r.i32()));
                if inner != Encoding::RAW {
                    // The image may use any offered encoding, but one that shares
                    // decoder state with the framebuffer (ZRLE's zlib stream) cannot be
                    // framed without state; QEMU only ever sends Raw.
                    return Err(Error::UnframableEncoding(inner));
                }
                let len = pixels(width, height, 4);
                ctx.limits.check("alpha cursor image", len)?;
                (len, Framer::Done)
            }
            Framer::VmwareCursor { width, height } => {
                let kind = need!(r.u8());
                need!(r.skip(1));
                let len = match kind {
                    0 => 2 * pixels(width, height, bpp),
                    1 => pixels(width, height, 4),
                    _ => {
                        return Err(Error::Malformed {
                            what: "VMware cursor",
                            why: "cursor type is neither 0 (classic) nor 1 (alpha)",
                        })
                    }
                };
                ctx.limits.check("VMware cursor image", len)?;
                (len, Framer::Done)
            }
        };
        Ok(Some(Step {
            header: r.pos(),
            payload,
            next,
        }))
    }
}

fn hextile_tile(
    r: &mut Reader<'_>,
    width: u16,
    height: u16,
    index: u32,
    bpp: usize,
) -> Result<Option<Step>, Error> {
    const RAW: u8 = 1;
    const BACKGROUND: u8 = 2;
    const FOREGROUND: u8 = 4;
    const ANY_SUBRECTS: u8 = 8;
    const COLOURED: u8 = 16;
    let cols = u32::from(width).div_ceil(16);
    let rows = u32::from(height).div_ceil(16);
    if index >= cols * rows {
        return Ok(Some(Step {
            header: 0,
            payload: 0,
            next: Framer::Done,
        }));
    }
    let tile_w = (u32::from(width) - (index % cols) * 16).min(16) as u16;
    let tile_h = (u32::from(height) - (index / cols) * 16).min(16) as u16;
    let mask = need!(r.u8());
    if mask & !0x1f != 0 {
        // ZlibHex bits (32, 64) or garbage: not Hextile.
        return Err(Error::Malformed {
            what: "Hextile tile",
            why: "unknown sub-encoding bits",
        });
    }
    let payload = if mask & RAW != 0 {
        pixels(tile_w, tile_h, bpp)
    } else {
        if mask & BACKGROUND != 0 {
            need!(r.skip(bpp));
        }
        if mask & FOREGROUND != 0 {
            need!(r.skip(bpp));
        }
        if mask & ANY_SUBRECTS != 0 {
            let n = u64::from(need!(r.u8()));
            let each = if mask & COLOURED != 0 {
                bpp as u64 + 2
            } else {
                2
            };
            n * each
        } else {
            0
        }
    };
    let next = if index + 1 == cols * rows {
        Framer::Done
    } else {
        Framer::Hextile {
            width,
            height,
            index: index + 1,
        }
    };
    Ok(Some(Step {
        header: r.pos(),
        payload,
        next,
    }))
}

/// Reads Tight's compact length: 1 to 3 bytes, 7 + 7 + 8 bits.
fn compact_len(r: &mut Reader<'_>) -> Option<u64> {
    let b0 = r.u8()?;
    let mut len = u64::from(b0 & 0x7f);
    if b0 & 0x80 != 0 {
        let b1 = r.u8()?;
        len |= u64::from(b1 & 0x7f) << 7;
        if b1 & 0x80 != 0 {
            len |= u64::from(r.u8()?) << 14;
        }
    }
    Some(len)
}

fn tight(
    r: &mut Reader<'_>,
    width: u16,
    height: u16,
    png: bool,
    ctx: &Ctx<'_>,
) -> Result<Option<(u64, Framer)>, Error> {
    const MIN_TO_COMPRESS: u64 = 12;
    let malformed = |why| Error::Malformed {
        what: if png {
            "TightPNG rectangle"
        } else {
            "Tight rectangle"
        },
        why,
    };
    let tpixel = ctx.pf.tight_pixel_len();
    let image_bound = compressed_bound(pixels(width, height, 4));
    let control = need!(r.u8());
    let method = control >> 4;
    let without_zlib = !png && ctx.offered.contains(Encoding::TIGHT_WITHOUT_ZLIB);
    let bounded = |len: u64, bound: u64, what| {
        if len > bound {
            Err(Error::LengthTooLarge {
                what,
                len,
                max: bound,
            })
        } else {
            Ok(len)
        }
    };
    match method {
        0x8 => {
            need!(r.skip(tpixel));
            return Ok(Some((0, Framer::Done)));
        }
        0x9 => {
            if ctx.pf.bits_per_pixel < 16 {
                return Err(malformed("JPEG needs 16 or 32 bits per pixel"));
            }
            let len = need!(compact_len(r));
            return Ok(Some((
                bounded(len, image_bound, "Tight JPEG data")?,
                Framer::Done,
            )));
        }
        0xA if png => {
            let len = need!(compact_len(r));
            return Ok(Some((
                bounded(len, image_bound, "TightPNG PNG data")?,
                Framer::Done,
            )));
        }
        0..=7 if png => return Err(malformed("basic compression is not allowed in TightPNG")),
        0..=7 => {}
        0xA | 0xE if without_zlib => {}
        _ => return Err(malformed("invalid compression control")),
    }
    // Basic compression, with zlib (method 0-7) or without (0xA, 0xE).
    let zlib = method < 8;
    let has_filter = control & 0x40 != 0;
    let filter = if has_filter { need!(r.u8()) } else { 0 };
    let data_len = match filter {
        0 => pixels(width, height, tpixel),
        1 => {
            let colours = usize::from(need!(r.u8())) + 1;
            if colours < 2 {
                return Err(malformed("palette of fewer than 2 colours"));
            }
            need!(r.skip(colours * tpixel));
            if colours == 2 {
                u64::from(width).div_ceil(8) * u64::from(height)
            } else {
                pixels(width, height, 1)
            }
        }
        2 => {
            if ctx.pf.bits_per_pixel < 16 {
                return Err(malformed("gradient filter needs 16 or 32 bits per pixel"));
            }
            pixels(width, height, tpixel)
        }
        _ => return Err(malformed("unknown filter")),
    };
    if !zlib || data_len < MIN_TO_COMPRESS {
        // Short data is sent as is; so is everything without zlib.
        return Ok(Some((data_len, Framer::Done)));
    }
    let len = need!(compact_len(r));
    Ok(Some((
        bounded(len, compressed_bound(data_len), "Tight zlib data")?,
        Framer::Done,
    )))
}
