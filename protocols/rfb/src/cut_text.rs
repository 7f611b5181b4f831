//! Clipboard contents: the cut-text body ClientCutText and ServerCutText share, in
//! its Latin-1 form and the extended clipboard's (flags, formats, zlib-deflated
//! contents), read and written the same way in both directions.

use crate::error::{Error, Limits};
use crate::wire::{need, Reader};

/// Clipboard contents of ClientCutText or ServerCutText.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutText<'a> {
    /// The original form: ISO 8859-1 text.
    Latin1(&'a [u8]),
    /// The extended clipboard form (negative length on the wire).
    Extended {
        /// Format and action bits.
        flags: u32,
        /// What follows the flags: sizes for `caps`, a zlib stream for `provide`.
        data: &'a [u8],
    },
}

/// Extended clipboard flag bits.
pub mod clipboard {
    /// UTF-8 text format.
    pub const TEXT: u32 = 1;
    /// Rich text format.
    pub const RTF: u32 = 1 << 1;
    /// HTML format.
    pub const HTML: u32 = 1 << 2;
    /// Device-independent bitmap.
    pub const DIB: u32 = 1 << 3;
    /// Files.
    pub const FILES: u32 = 1 << 4;
    /// The message lists capabilities.
    pub const CAPS: u32 = 1 << 24;
    /// Asks the peer to provide data.
    pub const REQUEST: u32 = 1 << 25;
    /// Asks the peer which formats it has.
    pub const PEEK: u32 = 1 << 26;
    /// Says which formats are available.
    pub const NOTIFY: u32 = 1 << 27;
    /// Carries clipboard data (zlib).
    pub const PROVIDE: u32 = 1 << 28;
}

impl CutText<'_> {
    /// The bytes after the length field (for `Extended`, after the flags too).
    pub fn payload(&self) -> &[u8] {
        match self {
            CutText::Latin1(t) => t,
            CutText::Extended { data, .. } => data,
        }
    }

    /// The clipboard contents this message transfers: the text of the original form,
    /// or each format of an extended `provide` (its zlib stream inflated, at most
    /// `limit` bytes in all). Extended `caps`, `request`, `peek` and `notify` messages
    /// transfer no contents: `Ok(vec![])`.
    pub fn contents(&self, limit: usize) -> Result<Vec<Clip>, Error> {
        let (flags, data) = match self {
            CutText::Latin1(t) => {
                return Ok(vec![Clip {
                    format: clipboard::TEXT,
                    data: t.to_vec(),
                }])
            }
            CutText::Extended { flags, data } => (*flags, *data),
        };
        // In a `caps` message the action bits list what the sender supports: it
        // provides nothing itself.
        if flags & clipboard::CAPS != 0 || flags & clipboard::PROVIDE == 0 {
            return Ok(Vec::new());
        }
        let malformed = |why| Error::Malformed {
            what: "extended clipboard provide",
            why,
        };
        let inflated = inflate(data, limit)?;
        // One `u32 size` and data per format flag set, lowest bit first.
        let mut rest = &inflated[..];
        let mut out = Vec::new();
        for bit in 0..16 {
            let format = 1u32 << bit;
            if flags & format == 0 {
                continue;
            }
            let Some((size, tail)) = rest.split_first_chunk::<4>() else {
                return Err(malformed("a format's size is missing"));
            };
            let size = u32::from_be_bytes(*size) as usize;
            if size > tail.len() {
                return Err(malformed("a format's size exceeds the data"));
            }
            let (mut body, tail) = tail.split_at(size);
            if format == clipboard::TEXT {
                // UTF-8, NUL-terminated.
                body = body.strip_suffix(&[0]).unwrap_or(body);
            }
            out.push(Clip {
                format,
                data: body.to_vec(),
            });
            rest = tail;
        }
        Ok(out)
    }
}

/// Inflates one zlib stream, finished or only flushed (noVNC flushes each provide
/// and never finishes its stream), into at most `limit` bytes.
fn inflate(data: &[u8], limit: usize) -> Result<Vec<u8>, Error> {
    use flate2::{Decompress, FlushDecompress, Status};
    let too_large = |len: usize| Error::LengthTooLarge {
        what: "extended clipboard contents",
        len: len as u64,
        max: limit as u64,
    };
    let mut d = Decompress::new(true);
    let mut out: Vec<u8> = Vec::new();
    loop {
        if out.len() == out.capacity() {
            out.reserve((limit + 1 - out.len()).clamp(1, 64 * 1024));
        }
        let (consumed, produced) = (d.total_in() as usize, out.len());
        let input = data.get(consumed..).unwrap_or_default();
        let status = d
            .decompress_vec(input, &mut out, FlushDecompress::Sync)
            .map_err(|_| Error::Malformed {
                what: "extended clipboard provide",
                why: "not a zlib stream",
            })?;
        if out.len() > limit {
            return Err(too_large(out.len()));
        }
        if status == Status::StreamEnd {
            return Ok(out);
        }
        if d.total_in() as usize == consumed && out.len() == produced {
            // No progress: all input used (a flushed stream ends here), or stuck.
            return if consumed == data.len() {
                Ok(out)
            } else {
                Err(Error::Malformed {
                    what: "extended clipboard provide",
                    why: "the zlib stream does not decode",
                })
            };
        }
    }
}

/// One format of clipboard contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Clip {
    /// The format ([`clipboard::TEXT`], [`clipboard::RTF`]...).
    pub format: u32,
    /// Its data (text without its terminating NUL).
    pub data: Vec<u8>,
}

impl Clip {
    /// The format's name: text, rtf, html, dib or files.
    pub fn format_name(&self) -> &'static str {
        match self.format {
            clipboard::TEXT => "text",
            clipboard::RTF => "rtf",
            clipboard::HTML => "html",
            clipboard::DIB => "dib",
            clipboard::FILES => "files",
            _ => "other",
        }
    }
}

/// Parses the cut-text body shared by both directions: `pad[3] S32 length` then data.
pub(crate) fn parse_cut_text<'a>(
    r: &mut Reader<'a>,
    extended_allowed: bool,
    limits: &Limits,
    what: &'static str,
) -> Result<Option<CutText<'a>>, Error> {
    need!(r.skip(3));
    let raw = need!(r.u32());
    let signed = raw as i32;
    if signed < 0 && extended_allowed {
        let len = signed.unsigned_abs();
        limits.check(what, u64::from(len) + 8)?;
        if len < 4 {
            return Err(Error::Malformed {
                what,
                why: "extended clipboard message shorter than its flags",
            });
        }
        let flags = need!(r.u32());
        let data = need!(r.bytes(len as usize - 4));
        return Ok(Some(CutText::Extended { flags, data }));
    }
    limits.check(what, u64::from(raw) + 8)?;
    Ok(Some(CutText::Latin1(need!(r.bytes(raw as usize)))))
}

/// The wire cannot carry `len`: refuse rather than truncate.
pub(crate) fn too_long(what: &'static str, len: usize, max: u64) -> Error {
    Error::LengthTooLarge {
        what,
        len: len as u64,
        max,
    }
}

pub(crate) fn write_cut_text(id: u8, text: &CutText<'_>, out: &mut Vec<u8>) -> Result<(), Error> {
    match text {
        CutText::Latin1(t) => {
            let len = u32::try_from(t.len())
                .map_err(|_| too_long("cut text", t.len(), u32::MAX.into()))?;
            out.extend_from_slice(&[id, 0, 0, 0]);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(t);
        }
        CutText::Extended { flags, data } => {
            let max = i32::MAX as u64 - 4;
            let len = data
                .len()
                .checked_add(4)
                .and_then(|n| i32::try_from(n).ok())
                .ok_or_else(|| too_long("extended cut text", data.len(), max))?;
            out.extend_from_slice(&[id, 0, 0, 0]);
            out.extend_from_slice(&(-len).to_be_bytes());
            out.extend_from_slice(&flags.to_be_bytes());
            out.extend_from_slice(data);
        }
    }
    Ok(())
}
