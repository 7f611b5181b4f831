//! The guest agent's message stream, carried in chunks by the main channel's
//! AGENT_DATA messages. A `VDAgentMessage` (`protocol U32 = 1, type U32, opaque U64,
//! size U32`, then `size` bytes) may span several chunks; [`AgentStream`] follows the
//! stream so a proxy can audit clipboard transfers without buffering them.

use crate::error::{Error, Limits};
use crate::{le_u32, le_u64};

/// `VDAgentMessage` header size.
pub const HEADER_LEN: usize = 20;
/// `VD_AGENT_PROTOCOL`.
pub const PROTOCOL: u32 = 1;

/// Agent message types a proxy audits.
pub mod kind {
    /// Clipboard contents.
    pub const CLIPBOARD: u32 = 4;
    /// The sender owns the clipboard.
    pub const CLIPBOARD_GRAB: u32 = 7;
    /// The sender asks for the clipboard.
    pub const CLIPBOARD_REQUEST: u32 = 8;
    /// The sender gives up the clipboard.
    pub const CLIPBOARD_RELEASE: u32 = 9;
    /// The sender's capabilities.
    pub const ANNOUNCE_CAPABILITIES: u32 = 6;
}

/// `VD_AGENT_CAP_*` bit numbers.
pub mod cap {
    /// Clipboard messages start with a selection byte and 3 reserved bytes. The guest
    /// agent (spice-vdagentd) reads and writes them, both ways, when the client
    /// announced this capability, whatever it announced itself.
    pub const CLIPBOARD_SELECTION: u32 = 6;
}

/// The short name of a `VD_AGENT_CLIPBOARD_*` type, as an audit record names it.
pub fn clipboard_format(clip_type: u32) -> &'static str {
    match clip_type {
        0 => "none",
        1 => "text",
        2 => "png",
        3 => "bmp",
        4 => "tiff",
        5 => "jpeg",
        6 => "files",
        _ => "unknown",
    }
}

/// `VD_AGENT_CLIPBOARD_UTF8_TEXT`.
pub const CLIPBOARD_UTF8_TEXT: u32 = 1;

/// Reads a `VDAgentClipboard` (an optional selection word, the type, then the
/// contents) from the data of one CLIPBOARD message as it streams in.
#[derive(Debug, Clone)]
pub struct ClipboardReader {
    header: [u8; 8],
    header_len: usize,
    got: usize,
}

impl ClipboardReader {
    /// A reader for one message; `selection` when it carries the selection word.
    pub fn new(selection: bool) -> Self {
        ClipboardReader {
            header: [0; 8],
            header_len: if selection { 8 } else { 4 },
            got: 0,
        }
    }

    /// Takes the next data bytes; returns those that are clipboard contents.
    pub fn feed<'a>(&mut self, bytes: &'a [u8]) -> &'a [u8] {
        let take = (self.header_len - self.got).min(bytes.len());
        self.header[self.got..self.got + take].copy_from_slice(&bytes[..take]);
        self.got += take;
        &bytes[take..]
    }

    /// The clipboard type, once the header has been read; at the message's end a
    /// header cut short is an error.
    pub fn clip_type(&self) -> Result<u32, Error> {
        if self.got < self.header_len {
            return Err(Error::Malformed {
                what: "VDAgentClipboard",
                why: "shorter than its header",
            });
        }
        Ok(le_u32(&self.header, self.header_len - 4).unwrap_or(0))
    }
}

/// Reads the first capability word of a `VDAgentAnnounceCapabilities` (`request`,
/// then the capability words) as it streams in.
#[derive(Debug, Clone, Default)]
pub struct CapsReader {
    head: [u8; 8],
    got: usize,
}

impl CapsReader {
    /// Takes the next data bytes.
    pub fn feed(&mut self, bytes: &[u8]) {
        let take = (8 - self.got).min(bytes.len());
        self.head[self.got..self.got + take].copy_from_slice(&bytes[..take]);
        self.got += take;
    }

    /// Whether capability `bit` (below 32) was announced.
    pub fn has(&self, bit: u32) -> bool {
        self.got == 8 && bit < 32 && le_u32(&self.head, 4).unwrap_or(0) & (1 << bit) != 0
    }
}

/// What the stream yielded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEvent<'a> {
    /// A message began.
    Begin {
        /// `VD_AGENT_*` type.
        msg_type: u32,
        /// Opaque value.
        opaque: u64,
        /// Data bytes that follow.
        size: u32,
    },
    /// Data of the current message; `last` marks its final bytes.
    Data {
        /// `VD_AGENT_*` type of the message.
        msg_type: u32,
        /// The bytes.
        bytes: &'a [u8],
        /// Whether the message is complete with these bytes.
        last: bool,
    },
}

/// Follows one direction's agent message stream.
#[derive(Debug, Clone)]
pub struct AgentStream {
    limits: Limits,
    header: Vec<u8>,
    msg_type: u32,
    remaining: u64,
}

impl AgentStream {
    /// A stream at a message boundary.
    pub fn new(limits: Limits) -> Self {
        AgentStream {
            limits,
            header: Vec::with_capacity(HEADER_LEN),
            msg_type: 0,
            remaining: 0,
        }
    }

    /// Feeds one AGENT_DATA body; appends what it held to `out`.
    pub fn feed<'a>(
        &mut self,
        mut chunk: &'a [u8],
        out: &mut Vec<AgentEvent<'a>>,
    ) -> Result<(), Error> {
        while !chunk.is_empty() {
            if self.remaining > 0 {
                let n = usize::try_from(self.remaining)
                    .unwrap_or(usize::MAX)
                    .min(chunk.len());
                self.remaining -= n as u64;
                out.push(AgentEvent::Data {
                    msg_type: self.msg_type,
                    bytes: &chunk[..n],
                    last: self.remaining == 0,
                });
                chunk = &chunk[n..];
                continue;
            }
            let take = (HEADER_LEN - self.header.len()).min(chunk.len());
            self.header.extend_from_slice(&chunk[..take]);
            chunk = &chunk[take..];
            if self.header.len() < HEADER_LEN {
                break;
            }
            let h = std::mem::take(&mut self.header);
            if le_u32(&h, 0) != Some(PROTOCOL) {
                return Err(Error::Malformed {
                    what: "VDAgentMessage",
                    why: "protocol is not 1",
                });
            }
            let msg_type = le_u32(&h, 4).unwrap_or(0);
            let size = le_u32(&h, 16).unwrap_or(0);
            Limits::check(
                "agent message",
                u64::from(size),
                self.limits.max_agent_message_len,
            )?;
            self.msg_type = msg_type;
            self.remaining = u64::from(size);
            out.push(AgentEvent::Begin {
                msg_type,
                opaque: le_u64(&h, 8).unwrap_or(0),
                size,
            });
            if size == 0 {
                out.push(AgentEvent::Data {
                    msg_type,
                    bytes: &[],
                    last: true,
                });
            }
        }
        Ok(())
    }
}

/// Appends a `VDAgentMessage` header and data.
pub fn write_message(msg_type: u32, data: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&PROTOCOL.to_le_bytes());
    out.extend_from_slice(&msg_type.to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(data);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_messages_across_any_chunking() {
        let mut stream = Vec::new();
        write_message(kind::CLIPBOARD_GRAB, &[1, 0, 0, 0], &mut stream);
        let mut clip = 1u32.to_le_bytes().to_vec(); // VD_AGENT_CLIPBOARD_UTF8_TEXT
        clip.extend_from_slice(b"secret text from the guest");
        write_message(kind::CLIPBOARD, &clip, &mut stream);
        write_message(kind::CLIPBOARD_RELEASE, &[], &mut stream);
        for chunk in [1, 3, 7, 20, 2048] {
            let mut a = AgentStream::new(Limits::default());
            let mut evs = Vec::new();
            let mut clip_bytes = Vec::new();
            let mut begins = Vec::new();
            for c in stream.chunks(chunk) {
                a.feed(c, &mut evs).unwrap();
                for e in evs.drain(..) {
                    match e {
                        AgentEvent::Begin { msg_type, size, .. } => begins.push((msg_type, size)),
                        AgentEvent::Data {
                            msg_type: kind::CLIPBOARD,
                            bytes,
                            ..
                        } => clip_bytes.extend_from_slice(bytes),
                        AgentEvent::Data { .. } => {}
                    }
                }
            }
            assert_eq!(
                begins,
                [(7, 4), (4, clip.len() as u32), (9, 0)],
                "chunk {chunk}"
            );
            assert_eq!(clip_bytes, clip);
        }
    }

    #[test]
    fn clipboard_headers_with_and_without_the_selection_word() {
        let mut data = vec![1, 0, 0, 0]; // selection PRIMARY, reserved
        data.extend_from_slice(&CLIPBOARD_UTF8_TEXT.to_le_bytes());
        data.extend_from_slice(b"hello");
        for chunk in [1, 3, 8, 64] {
            let mut r = ClipboardReader::new(true);
            let mut contents = Vec::new();
            for c in data.chunks(chunk) {
                contents.extend_from_slice(r.feed(c));
            }
            assert_eq!(contents, b"hello", "chunk {chunk}");
            assert_eq!(r.clip_type().unwrap(), CLIPBOARD_UTF8_TEXT);
        }
        let mut r = ClipboardReader::new(false);
        assert_eq!(r.feed(&data[4..]), b"hello");
        assert_eq!(clipboard_format(r.clip_type().unwrap()), "text");
        let mut short = ClipboardReader::new(true);
        assert!(short.feed(&data[..6]).is_empty());
        assert!(short.clip_type().is_err());
        assert_eq!(clipboard_format(99), "unknown");
    }

    #[test]
    fn capabilities_are_read_from_the_first_word() {
        let mut data = 1u32.to_le_bytes().to_vec();
        data.extend_from_slice(&(1u32 << cap::CLIPBOARD_SELECTION | 1 << 3).to_le_bytes());
        data.extend_from_slice(&u32::MAX.to_le_bytes());
        let mut c = CapsReader::default();
        for b in data.chunks(3) {
            c.feed(b);
        }
        assert!(c.has(cap::CLIPBOARD_SELECTION));
        assert!(!c.has(4));
        assert!(!c.has(40));
        let mut short = CapsReader::default();
        short.feed(&data[..7]);
        assert!(!short.has(cap::CLIPBOARD_SELECTION));
    }

    #[test]
    fn refusals() {
        let mut a = AgentStream::new(Limits::default());
        let mut bad = Vec::new();
        write_message(4, b"x", &mut bad);
        bad[0] = 2;
        assert!(a.feed(&bad, &mut Vec::new()).is_err());
        let mut a = AgentStream::new(Limits {
            max_agent_message_len: 10,
            ..Limits::default()
        });
        let mut big = Vec::new();
        write_message(4, &[0; 11], &mut big);
        assert!(matches!(
            a.feed(&big, &mut Vec::new()),
            Err(Error::LengthTooLarge { .. })
        ));
    }
}
