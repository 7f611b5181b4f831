//! Framing of channel messages after the link: the 6-byte mini header (`type U16,
//! size U32`) when both sides have `MINI_HEADER`, else the 18-byte full header
//! (`serial U64, type U16, size U32, sub_list U32`).
//!
//! A message up to [`Limits::max_message_len`] comes whole, so the proxy can decode
//! what it acts on; a larger one (display data) comes as [`Frame::Begin`] and
//! [`Frame::Data`] chunks that are forwarded as they arrive.

use crate::error::{Error, Limits};
use crate::{le_u16, le_u32, le_u64};

/// Which header the channel uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderKind {
    /// `SpiceMiniDataHeader`, 6 bytes.
    Mini,
    /// `SpiceDataHeader`, 18 bytes.
    Full,
}

impl HeaderKind {
    /// Header size on the wire.
    pub fn len(self) -> usize {
        match self {
            HeaderKind::Mini => 6,
            HeaderKind::Full => 18,
        }
    }

    /// Never zero; for clippy's `len_without_is_empty`.
    pub fn is_empty(self) -> bool {
        false
    }
}

/// A message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Message serial (full header only).
    pub serial: Option<u64>,
    /// Message type.
    pub msg_type: u16,
    /// Body size.
    pub size: u32,
    /// Offset of the sub-message list in the body, 0 for none (full header only).
    pub sub_list: u32,
}

/// One decoded item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A whole message.
    Whole {
        /// Its header.
        header: Header,
        /// Its body.
        body: &'a [u8],
    },
    /// The header of a message too large to return whole; its body follows as data.
    Begin {
        /// Its header.
        header: Header,
    },
    /// Body bytes of the message announced by the last [`Frame::Begin`].
    Data(&'a [u8]),
}

/// Decoder of one direction of one channel.
#[derive(Debug, Clone)]
pub struct Decoder {
    kind: HeaderKind,
    limits: Limits,
    streaming: u64,
}

impl Decoder {
    /// A decoder for a channel using `kind` headers.
    pub fn new(kind: HeaderKind, limits: Limits) -> Self {
        Decoder {
            kind,
            limits,
            streaming: 0,
        }
    }

    /// Body bytes of a streamed message still to come.
    pub fn pending_data(&self) -> u64 {
        self.streaming
    }

    /// Skips `n` body bytes of the streamed message that the caller moved past the
    /// decoder (spliced from socket to socket); more than are still to come is refused.
    pub fn consume_payload(&mut self, n: u64) -> Result<(), Error> {
        if n > self.streaming {
            return Err(Error::Malformed {
                what: "SPICE message",
                why: "more body consumed than the message has left",
            });
        }
        self.streaming -= n;
        Ok(())
    }

    /// Decodes the next item at the start of `buf`, with the bytes it spans; `Ok(None)`
    /// when `buf` does not hold enough.
    pub fn decode<'a>(&mut self, buf: &'a [u8]) -> Result<Option<(Frame<'a>, usize)>, Error> {
        if self.streaming > 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            let n = usize::try_from(self.streaming)
                .unwrap_or(usize::MAX)
                .min(buf.len());
            self.streaming -= n as u64;
            return Ok(Some((Frame::Data(&buf[..n]), n)));
        }
        let hlen = self.kind.len();
        if buf.len() < hlen {
            return Ok(None);
        }
        let header = match self.kind {
            HeaderKind::Mini => Header {
                serial: None,
                msg_type: le_u16(buf, 0).unwrap_or(0),
                size: le_u32(buf, 2).unwrap_or(0),
                sub_list: 0,
            },
            HeaderKind::Full => Header {
                serial: le_u64(buf, 0),
                msg_type: le_u16(buf, 8).unwrap_or(0),
                size: le_u32(buf, 10).unwrap_or(0),
                sub_list: le_u32(buf, 14).unwrap_or(0),
            },
        };
        if header.sub_list != 0 && header.sub_list >= header.size {
            return Err(Error::Malformed {
                what: "SPICE message header",
                why: "sub-message list beyond the body",
            });
        }
        let size = header.size as usize;
        if size <= self.limits.max_message_len {
            let Some(body) = buf.get(hlen..hlen + size) else {
                return Ok(None);
            };
            return Ok(Some((Frame::Whole { header, body }, hlen + size)));
        }
        self.streaming = u64::from(header.size);
        Ok(Some((Frame::Begin { header }, hlen)))
    }
}

/// Appends a message with a header of `kind` (the serial is only written in full
/// headers).
pub fn write_message(
    kind: HeaderKind,
    serial: u64,
    msg_type: u16,
    body: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), Error> {
    let size = u32::try_from(body.len()).map_err(|_| Error::LengthTooLarge {
        what: "SPICE message",
        len: body.len() as u64,
        max: u64::from(u32::MAX),
    })?;
    if kind == HeaderKind::Full {
        out.extend_from_slice(&serial.to_le_bytes());
    }
    out.extend_from_slice(&msg_type.to_le_bytes());
    out.extend_from_slice(&size.to_le_bytes());
    if kind == HeaderKind::Full {
        out.extend_from_slice(&0u32.to_le_bytes());
    }
    out.extend_from_slice(body);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(
        kind: HeaderKind,
        limits: Limits,
        stream: &[u8],
        chunk: usize,
    ) -> Result<Vec<String>, Error> {
        let mut d = Decoder::new(kind, limits);
        let (mut pending, mut out, mut spans) = (Vec::new(), Vec::new(), Vec::new());
        for piece in stream.chunks(chunk) {
            pending.extend_from_slice(piece);
            while let Some((f, n)) = d.decode(&pending)? {
                spans.extend_from_slice(&pending[..n]);
                match f {
                    Frame::Data(b) => out.push(format!("data {}", b.len())),
                    other => out.push(format!("{other:?}")),
                }
                pending.drain(..n);
            }
        }
        assert_eq!(spans, stream, "spans tile the stream");
        Ok(out)
    }

    #[test]
    fn both_headers_whole_and_streamed() {
        for kind in [HeaderKind::Mini, HeaderKind::Full] {
            let mut s = Vec::new();
            write_message(kind, 1, 4, &[1, 2, 3], &mut s).unwrap();
            write_message(kind, 2, 102, &[], &mut s).unwrap();
            write_message(kind, 3, 302, &[9; 100], &mut s).unwrap();
            let limits = Limits {
                max_message_len: 10,
                ..Limits::default()
            };
            let whole = run(kind, limits, &s, s.len()).unwrap();
            let split = run(kind, limits, &s, 1).unwrap();
            assert_eq!(whole.len(), 4, "{whole:?}");
            assert!(whole[0].contains("msg_type: 4") && whole[0].contains("body: [1, 2, 3]"));
            assert!(whole[2].starts_with("Begin"));
            assert_eq!(whole[3], "data 100");
            assert_eq!(split.iter().filter(|e| e.starts_with("data")).count(), 100);
            if kind == HeaderKind::Full {
                assert!(whole[0].contains("serial: Some(1)"));
            }
        }
    }

    #[test]
    fn a_streamed_body_consumed_past_the_decoder_leaves_it_at_the_next_header() {
        let mut s = Vec::new();
        write_message(HeaderKind::Mini, 0, 302, &[9; 100], &mut s).unwrap();
        write_message(HeaderKind::Mini, 0, 4, &[1], &mut s).unwrap();
        let limits = Limits {
            max_message_len: 10,
            ..Limits::default()
        };
        let mut d = Decoder::new(HeaderKind::Mini, limits);
        let (f, n) = d.decode(&s).unwrap().unwrap();
        assert!(matches!(f, Frame::Begin { .. }) && n == 6);
        assert_eq!(d.pending_data(), 100);
        // 30 bytes decoded, 70 moved past the decoder.
        let (_, m) = d.decode(&s[6..36]).unwrap().unwrap();
        assert_eq!(m, 30);
        assert!(d.consume_payload(71).is_err(), "beyond the body");
        d.consume_payload(70).unwrap();
        assert_eq!(d.pending_data(), 0);
        let (f, _) = d.decode(&s[106..]).unwrap().unwrap();
        assert!(matches!(f, Frame::Whole { header, body: [1] } if header.msg_type == 4));
    }

    #[test]
    fn sub_list_beyond_the_body_is_refused() {
        let mut s = Vec::new();
        s.extend_from_slice(&1u64.to_le_bytes());
        s.extend_from_slice(&4u16.to_le_bytes());
        s.extend_from_slice(&4u32.to_le_bytes());
        s.extend_from_slice(&9u32.to_le_bytes());
        s.extend_from_slice(&[0; 4]);
        assert!(matches!(
            run(HeaderKind::Full, Limits::default(), &s, 1),
            Err(Error::Malformed { .. })
        ));
    }
}
