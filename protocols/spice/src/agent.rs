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
/// `VD_AGENT_MAX_DATA_SIZE`: the largest AGENT_DATA body.
pub const MAX_CHUNK_LEN: usize = 2048;

/// `VD_AGENT_*` message types (spice-protocol `vd_agent.h`).
pub mod kind {
    /// Pointer position and buttons: spice-vdagentd injects them into the guest.
    pub const MOUSE_STATE: u32 = 1;
    /// The client's monitor layout.
    pub const MONITORS_CONFIG: u32 = 2;
    /// The agent's reply to a request.
    pub const REPLY: u32 = 3;
    /// Clipboard contents.
    pub const CLIPBOARD: u32 = 4;
    /// Display settings (wallpaper, font smoothing, animations).
    pub const DISPLAY_CONFIG: u32 = 5;
    /// The sender's capabilities.
    pub const ANNOUNCE_CAPABILITIES: u32 = 6;
    /// The sender owns the clipboard.
    pub const CLIPBOARD_GRAB: u32 = 7;
    /// The sender asks for the clipboard.
    pub const CLIPBOARD_REQUEST: u32 = 8;
    /// The sender gives up the clipboard.
    pub const CLIPBOARD_RELEASE: u32 = 9;
    /// A file transfer begins: its id and a key file naming the file and its size.
    pub const FILE_XFER_START: u32 = 10;
    /// A file transfer's state (can send, cancelled, error, success...).
    pub const FILE_XFER_STATUS: u32 = 11;
    /// Bytes of a file being transferred.
    pub const FILE_XFER_DATA: u32 = 12;
    /// The client left (sent by spice-server).
    pub const CLIENT_DISCONNECTED: u32 = 13;
    /// The largest clipboard the client takes.
    pub const MAX_CLIPBOARD: u32 = 14;
    /// The client's audio volume, for the guest to follow.
    pub const AUDIO_VOLUME_SYNC: u32 = 15;
    /// The graphics devices' addresses (sent by spice-server).
    pub const GRAPHICS_DEVICE_INFO: u32 = 16;

    /// A type's name, for logs and audit records.
    pub fn name(t: u32) -> &'static str {
        match t {
            MOUSE_STATE => "mouse_state",
            MONITORS_CONFIG => "monitors_config",
            REPLY => "reply",
            CLIPBOARD => "clipboard",
            DISPLAY_CONFIG => "display_config",
            ANNOUNCE_CAPABILITIES => "announce_capabilities",
            CLIPBOARD_GRAB => "clipboard_grab",
            CLIPBOARD_REQUEST => "clipboard_request",
            CLIPBOARD_RELEASE => "clipboard_release",
            FILE_XFER_START => "file_xfer_start",
            FILE_XFER_STATUS => "file_xfer_status",
            FILE_XFER_DATA => "file_xfer_data",
            CLIENT_DISCONNECTED => "client_disconnected",
            MAX_CLIPBOARD => "max_clipboard",
            AUDIO_VOLUME_SYNC => "audio_volume_sync",
            GRAPHICS_DEVICE_INFO => "graphics_device_info",
            _ => "unknown",
        }
    }
}

/// What an agent message from the client is to a proxy that audits the guest's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FromClient {
    /// Settings and clipboard traffic the proxy follows (clipboard is audited).
    Pass,
    /// A file transfer message: moves a file into the guest.
    FileTransfer,
    /// Nothing a client has reason to send: pointer input that would bypass the
    /// inputs channel (MOUSE_STATE, which spice-vdagentd injects), messages only the
    /// agent or spice-server send, and unknown types.
    Refuse,
}

impl FromClient {
    /// How to treat a client's agent message of type `t`. spice-server passes every
    /// type on to spice-vdagentd (only clipboard and file transfer can be switched
    /// off there), so the proxy decides.
    pub fn of(t: u32) -> FromClient {
        match t {
            kind::MONITORS_CONFIG
            | kind::CLIPBOARD
            | kind::DISPLAY_CONFIG
            | kind::ANNOUNCE_CAPABILITIES
            | kind::CLIPBOARD_GRAB
            | kind::CLIPBOARD_REQUEST
            | kind::CLIPBOARD_RELEASE
            | kind::MAX_CLIPBOARD
            | kind::AUDIO_VOLUME_SYNC => FromClient::Pass,
            kind::FILE_XFER_START | kind::FILE_XFER_STATUS | kind::FILE_XFER_DATA => {
                FromClient::FileTransfer
            }
            _ => FromClient::Refuse,
        }
    }
}

/// `VD_AGENT_FILE_XFER_STATUS_*` results, by name.
pub fn xfer_status_name(result: u32) -> &'static str {
    match result {
        0 => "can_send_data",
        1 => "cancelled",
        2 => "error",
        3 => "success",
        4 => "not_enough_space",
        5 => "session_locked",
        6 => "vdagent_not_connected",
        7 => "disabled",
        _ => "unknown",
    }
}

/// The longest FILE_XFER_START a reader takes (its key file names one file).
pub const MAX_XFER_START_LEN: u32 = 8192;
/// The longest file name a reader keeps (a longer one is cut in the middle, and says
/// so).
pub const MAX_XFER_NAME_LEN: usize = 255;

/// What a file transfer message said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XferEvent<'a> {
    /// A transfer begins.
    Start {
        /// The transfer's id.
        id: u32,
        /// The file's name as spice-vdagent reads it (at most [`MAX_XFER_NAME_LEN`]
        /// bytes: a longer one is its start and end around "...").
        name: String,
        /// The file's size as the key file gives it.
        size: u64,
    },
    /// A transfer's state.
    Status {
        /// The transfer's id.
        id: u32,
        /// `VD_AGENT_FILE_XFER_STATUS_*`.
        result: u32,
    },
    /// File bytes of a transfer.
    Data {
        /// The transfer's id.
        id: u32,
        /// The bytes, in order.
        bytes: &'a [u8],
    },
}

/// Reads the file transfer messages of one direction from the agent stream's events
/// (it ignores every other type). Data is handed on as it streams; the other
/// messages are small and read whole.
#[derive(Debug, Clone, Default)]
pub struct XferReader {
    msg_type: u32,
    size: u32,
    head: Vec<u8>,
    want: usize,
    data_id: Option<u32>,
}

impl XferReader {
    /// Takes one event of the agent stream.
    pub fn feed<'a>(
        &mut self,
        ev: &AgentEvent<'a>,
        out: &mut Vec<XferEvent<'a>>,
    ) -> Result<(), Error> {
        match *ev {
            AgentEvent::Begin { msg_type, size, .. } => {
                self.head.clear();
                self.data_id = None;
                self.msg_type = msg_type;
                self.size = size;
                self.want = match msg_type {
                    kind::FILE_XFER_START => {
                        Limits::check(
                            "FILE_XFER_START",
                            u64::from(size),
                            u64::from(MAX_XFER_START_LEN),
                        )?;
                        size as usize
                    }
                    kind::FILE_XFER_STATUS => 8,
                    kind::FILE_XFER_DATA => 12,
                    _ => 0,
                };
                let short = match msg_type {
                    kind::FILE_XFER_START => size < 4,
                    kind::FILE_XFER_STATUS => size < 8,
                    kind::FILE_XFER_DATA => size < 12,
                    _ => false,
                };
                if short {
                    return Err(Error::Malformed {
                        what: "file transfer message",
                        why: "shorter than its fixed fields",
                    });
                }
                Ok(())
            }
            AgentEvent::Data {
                msg_type,
                mut bytes,
                last,
            } => {
                if !matches!(
                    msg_type,
                    kind::FILE_XFER_START | kind::FILE_XFER_STATUS | kind::FILE_XFER_DATA
                ) {
                    return Ok(());
                }
                if self.head.len() < self.want {
                    let take = (self.want - self.head.len()).min(bytes.len());
                    self.head.extend_from_slice(&bytes[..take]);
                    bytes = &bytes[take..];
                    if self.head.len() < self.want {
                        return Ok(());
                    }
                    let id = le_u32(&self.head, 0).unwrap_or(0);
                    match msg_type {
                        kind::FILE_XFER_START => {
                            let (name, size) =
                                read_key_file(&self.head[4..]).map_err(|why| Error::Malformed {
                                    what: "FILE_XFER_START",
                                    why,
                                })?;
                            out.push(XferEvent::Start { id, name, size });
                        }
                        kind::FILE_XFER_STATUS => out.push(XferEvent::Status {
                            id,
                            result: le_u32(&self.head, 4).unwrap_or(0),
                        }),
                        _ => {
                            // The size field says how many bytes spice-vdagentd
                            // writes: it must be what the message holds, or the
                            // record would not be what reaches the file.
                            let declared = le_u64(&self.head, 4).unwrap_or(0);
                            if declared != u64::from(self.size) - 12 {
                                return Err(Error::Malformed {
                                    what: "FILE_XFER_DATA",
                                    why: "its size field is not the size of its data",
                                });
                            }
                            self.data_id = Some(id);
                        }
                    }
                }
                if let Some(id) = self.data_id {
                    if !bytes.is_empty() {
                        out.push(XferEvent::Data { id, bytes });
                    }
                }
                if last {
                    self.data_id = None;
                }
                Ok(())
            }
        }
    }
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
    msg_type: u32,
    remaining: u64,
}

impl AgentStream {
    /// A stream at a message boundary.
    pub fn new(limits: Limits) -> Self {
        AgentStream {
            limits,
            msg_type: 0,
            remaining: 0,
        }
    }

    /// Feeds one AGENT_DATA body; appends what it held to `out`. Chunks are framed as
    /// spice-server's agent filter frames them, or refused: at most
    /// [`MAX_CHUNK_LEN`] bytes; a chunk at a message boundary starts with a whole
    /// header; no chunk holds bytes past the end of its message (spice-server ends a
    /// client that breaks these, and ignores bytes after an empty message: read any
    /// other way, the stream could say one thing to vizor and another to the agent).
    pub fn feed<'a>(
        &mut self,
        chunk: &'a [u8],
        out: &mut Vec<AgentEvent<'a>>,
    ) -> Result<(), Error> {
        if chunk.len() > MAX_CHUNK_LEN {
            return Err(Error::LengthTooLarge {
                what: "AGENT_DATA",
                len: chunk.len() as u64,
                max: MAX_CHUNK_LEN as u64,
            });
        }
        let beyond = Error::Malformed {
            what: "AGENT_DATA",
            why: "bytes past the end of its agent message",
        };
        if self.remaining > 0 {
            if chunk.len() as u64 > self.remaining {
                return Err(beyond);
            }
            self.remaining -= chunk.len() as u64;
            out.push(AgentEvent::Data {
                msg_type: self.msg_type,
                bytes: chunk,
                last: self.remaining == 0,
            });
            return Ok(());
        }
        let Some((h, data)) = chunk.split_at_checked(HEADER_LEN) else {
            return Err(Error::Malformed {
                what: "AGENT_DATA",
                why: "a message that does not start with its whole header",
            });
        };
        if le_u32(h, 0) != Some(PROTOCOL) {
            return Err(Error::Malformed {
                what: "VDAgentMessage",
                why: "protocol is not 1",
            });
        }
        let msg_type = le_u32(h, 4).unwrap_or(0);
        let size = le_u32(h, 16).unwrap_or(0);
        Limits::check(
            "agent message",
            u64::from(size),
            self.limits.max_agent_message_len,
        )?;
        if data.len() as u64 > u64::from(size) {
            return Err(beyond);
        }
        self.msg_type = msg_type;
        self.remaining = u64::from(size) - data.len() as u64;
        out.push(AgentEvent::Begin {
            msg_type,
            opaque: le_u64(h, 8).unwrap_or(0),
            size,
        });
        if size == 0 || !data.is_empty() {
            out.push(AgentEvent::Data {
                msg_type,
                bytes: data,
                last: self.remaining == 0,
            });
        }
        Ok(())
    }
}

/// Splits one agent message (header and data, as [`write_message`] writes it) into
/// AGENT_DATA bodies as clients send them: the header and the first data in the
/// first, at most [`MAX_CHUNK_LEN`] bytes each.
pub fn chunks(message: &[u8]) -> impl Iterator<Item = &[u8]> {
    message.chunks(MAX_CHUNK_LEN)
}

/// The `name` and `size` of a FILE_XFER_START key file, read as spice-vdagent reads
/// it (GKeyFile: group `[vdagent-file-xfer]`, escapes undone), or refused when it is
/// not the one plain form clients write (`name=...` and `size=...` once each, nothing
/// after the closing NUL, no whitespace GKeyFile would trim, no other escapes): any
/// other form could be read one way here and another by the agent. A name with a
/// path in it (`/`, `\`, `.`, `..`) is refused: spice-vdagent joins it to its save
/// directory as it is. A name longer than [`MAX_XFER_NAME_LEN`] bytes is recorded as
/// its start and end around "...".
fn read_key_file(text: &[u8]) -> Result<(String, u64), &'static str> {
    let end = text.iter().position(|b| *b == 0).unwrap_or(text.len());
    if text[end..].iter().any(|b| *b != 0) {
        return Err("bytes after the key file's end");
    }
    let text = std::str::from_utf8(&text[..end]).map_err(|_| "a key file that is not UTF-8")?;
    let (mut name, mut size) = (None, None);
    let mut in_group = false;
    for line in text.split('\n') {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with(char::is_whitespace) || line.ends_with(char::is_whitespace) {
            return Err("a key file line with whitespace around it");
        }
        if line.starts_with('[') {
            in_group = line == "[vdagent-file-xfer]";
            continue;
        }
        if !in_group {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err("a key file line that is not key=value");
        };
        if key.ends_with(char::is_whitespace) || value.starts_with(char::is_whitespace) {
            return Err("a key file line with whitespace around its =");
        }
        match key {
            "name" if name.is_none() => name = Some(unescape(value)?),
            "size" if size.is_none() => {
                size = Some(
                    value
                        .parse::<u64>()
                        .map_err(|_| "a file size that is not a number")?,
                )
            }
            "name" | "size" => return Err("a key file naming the file or its size twice"),
            _ => {}
        }
    }
    let (Some(name), Some(size)) = (name, size) else {
        return Err("a key file without the file's name and size");
    };
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.contains(['/', '\\'])
        || name.contains(char::is_control)
    {
        return Err("a file name that is empty, a path, or holds control characters");
    }
    Ok((shorten(name), size))
}

/// Undoes GKeyFile's escapes (`\s`, `\n`, `\t`, `\r`, `\\`); any other is refused.
fn unescape(value: &str) -> Result<String, &'static str> {
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        out.push(match chars.next() {
            Some('s') => ' ',
            Some('n') => '\n',
            Some('t') => '\t',
            Some('r') => '\r',
            Some('\\') => '\\',
            _ => return Err("a key file escape GKeyFile does not have"),
        });
    }
    Ok(out)
}

/// A name cut to [`MAX_XFER_NAME_LEN`] bytes: its start and its end (the extension)
/// around "...".
fn shorten(name: String) -> String {
    if name.len() <= MAX_XFER_NAME_LEN {
        return name;
    }
    let half = (MAX_XFER_NAME_LEN - 3) / 2;
    let mut head = half;
    while !name.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = name.len() - half;
    while !name.is_char_boundary(tail) {
        tail += 1;
    }
    format!("{}...{}", &name[..head], &name[tail..])
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

    fn message(t: u32, data: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        write_message(t, data, &mut m);
        m
    }

    /// The messages as AGENT_DATA bodies of at most `chunk` bytes, each message's
    /// header whole in its first, as clients send them.
    fn split(messages: &[Vec<u8>], chunk: usize) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for m in messages {
            let first = m.len().min(chunk.max(HEADER_LEN));
            out.push(m[..first].to_vec());
            out.extend(m[first..].chunks(chunk).map(<[u8]>::to_vec));
        }
        out
    }

    #[test]
    fn follows_messages_across_any_chunking() {
        let mut clip = 1u32.to_le_bytes().to_vec(); // VD_AGENT_CLIPBOARD_UTF8_TEXT
        clip.extend_from_slice(b"secret text from the guest");
        let messages = [
            message(kind::CLIPBOARD_GRAB, &[1, 0, 0, 0]),
            message(kind::CLIPBOARD, &clip),
            message(kind::CLIPBOARD_RELEASE, &[]),
        ];
        for chunk in [1, 3, 7, 20, 2048] {
            let mut a = AgentStream::new(Limits::default());
            let mut evs = Vec::new();
            let mut clip_bytes = Vec::new();
            let mut begins = Vec::new();
            for c in &split(&messages, chunk) {
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

    fn xfer_stream() -> Vec<Vec<u8>> {
        let mut stream = Vec::new();
        let mut start = 7u32.to_le_bytes().to_vec();
        start.extend_from_slice(b"[vdagent-file-xfer]\nname=report.pdf\nsize=10\n\0");
        stream.push(message(kind::FILE_XFER_START, &start));
        stream.push(message(kind::CLIPBOARD_RELEASE, &[]));
        for part in [&b"0123"[..], b"456789"] {
            let mut data = 7u32.to_le_bytes().to_vec();
            data.extend_from_slice(&(part.len() as u64).to_le_bytes());
            data.extend_from_slice(part);
            stream.push(message(kind::FILE_XFER_DATA, &data));
        }
        let mut status = 7u32.to_le_bytes().to_vec();
        status.extend_from_slice(&3u32.to_le_bytes());
        stream.push(message(kind::FILE_XFER_STATUS, &status));
        stream
    }

    fn read_xfer(
        messages: &[Vec<u8>],
        chunk: usize,
    ) -> Result<(Vec<XferEvent<'static>>, Vec<u8>), Error> {
        let mut a = AgentStream::new(Limits::default());
        let mut x = XferReader::default();
        let (mut events, mut data) = (Vec::new(), Vec::new());
        for c in &split(messages, chunk) {
            let mut evs = Vec::new();
            a.feed(c, &mut evs)?;
            for e in &evs {
                let mut out = Vec::new();
                x.feed(e, &mut out)?;
                for o in out {
                    match o {
                        XferEvent::Data { id, bytes } => {
                            assert_eq!(id, 7);
                            data.extend_from_slice(bytes);
                        }
                        XferEvent::Start { id, name, size } => {
                            events.push(XferEvent::Start { id, name, size })
                        }
                        XferEvent::Status { id, result } => {
                            events.push(XferEvent::Status { id, result })
                        }
                    }
                }
            }
        }
        Ok((events, data))
    }

    #[test]
    fn file_transfers_are_read_across_any_chunking() {
        let stream = xfer_stream();
        for chunk in [1, 2, 5, 13, 64, 4096] {
            let (events, data) = read_xfer(&stream, chunk).unwrap();
            assert_eq!(
                events,
                [
                    XferEvent::Start {
                        id: 7,
                        name: "report.pdf".into(),
                        size: 10
                    },
                    XferEvent::Status { id: 7, result: 3 }
                ],
                "chunk {chunk}"
            );
            assert_eq!(data, b"0123456789", "chunk {chunk}");
        }
        assert_eq!(xfer_status_name(3), "success");
        // A long name keeps its start and its extension.
        let (name, size) = read_key_file(
            format!(
                "[vdagent-file-xfer]\nname={}.pdf\nsize=3\n",
                "\u{e9}".repeat(200)
            )
            .as_bytes(),
        )
        .unwrap();
        assert!(
            name.ends_with("\u{e9}.pdf") && name.contains("...") && name.len() <= MAX_XFER_NAME_LEN,
            "{name}"
        );
        assert_eq!(size, 3);
        // Escapes are undone as spice-vdagent undoes them; other groups are not read.
        assert_eq!(
            read_key_file(b"[other]\nname=x\n[vdagent-file-xfer]\nname=a\\sb\\tc\nsize=1\n\0\0"),
            Err("a file name that is empty, a path, or holds control characters"),
            "a tab is a control character"
        );
        assert_eq!(
            read_key_file(b"[other]\nname=x\n[vdagent-file-xfer]\nname=a\\sb.txt\nsize=1\n\0\0"),
            Ok(("a b.txt".to_owned(), 1))
        );
    }

    #[test]
    fn key_files_the_agent_could_read_otherwise_are_refused() {
        // Each would give spice-vdagent another name than a naive reader, or a path.
        for bad in [
            &b"[vdagent-file-xfer]\nname=real.sh\0name=fake.txt\nsize=1\n"[..],
            b"[vdagent-file-xfer]\nname=harmless.txt\nname =evil.sh\nsize=1\n",
            b"[vdagent-file-xfer]\nname=a\nname=b\nsize=1\n",
            b"[vdagent-file-xfer]\n  name=a\nsize=1\n",
            b"[vdagent-file-xfer] \nname=a\nsize=1\n",
            b"[vdagent-file-xfer]\nname= a\nsize=1\n",
            b"[vdagent-file-xfer]\nname=a\\x\nsize=1\n",
            b"[vdagent-file-xfer]\nname=../.config/autostart/x.desktop\nsize=1\n",
            b"[vdagent-file-xfer]\nname=..\nsize=1\n",
            b"[vdagent-file-xfer]\nname=a\\\\b\nsize=1\n",
            b"[vdagent-file-xfer]\nname=a\\nb\nsize=1\n",
            b"[vdagent-file-xfer]\nname=a\nsize=-1\n",
            b"[vdagent-file-xfer]\nname=a\n",
            b"[vdagent-file-xfer]\nsize=1\n",
            b"[vdagent-file-xfer]\nname=\xff\nsize=1\n",
        ] {
            assert!(
                read_key_file(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn chunks_are_framed_as_spice_server_frames_them() {
        // The desync a looser reader allows: an empty message with a header after it
        // in the same chunk (spice-server ignores bytes after an empty message).
        let mut bad = message(kind::CLIPBOARD_RELEASE, &[]);
        bad.extend(message(kind::CLIPBOARD, &[0; 13])[..20].iter());
        let mut a = AgentStream::new(Limits::default());
        assert!(a.feed(&bad, &mut Vec::new()).is_err());
        // Two messages in one chunk.
        let mut two = message(kind::CLIPBOARD_GRAB, &[1, 0, 0, 0]);
        two.extend(message(kind::CLIPBOARD_RELEASE, &[]));
        assert!(AgentStream::new(Limits::default())
            .feed(&two, &mut Vec::new())
            .is_err());
        // A header split across chunks.
        let m = message(kind::CLIPBOARD_GRAB, &[1, 0, 0, 0]);
        assert!(AgentStream::new(Limits::default())
            .feed(&m[..19], &mut Vec::new())
            .is_err());
        // A chunk beyond VD_AGENT_MAX_DATA_SIZE.
        let big = message(kind::CLIPBOARD, &[0; 4096]);
        assert!(matches!(
            AgentStream::new(Limits::default()).feed(&big[..2049], &mut Vec::new()),
            Err(Error::LengthTooLarge { .. })
        ));
        // Data past the message's end in a later chunk.
        let m = message(kind::CLIPBOARD, &[0; 30]);
        let mut a = AgentStream::new(Limits::default());
        a.feed(&m[..40], &mut Vec::new()).unwrap();
        let mut over = m[40..].to_vec();
        over.push(0);
        assert!(a.feed(&over, &mut Vec::new()).is_err());
        // As clients send them: fine.
        let mut a = AgentStream::new(Limits::default());
        for c in chunks(&big) {
            a.feed(c, &mut Vec::new()).unwrap();
        }
    }

    #[test]
    fn file_transfer_refusals() {
        // A DATA message whose size field is not its data's size.
        let mut data = 1u32.to_le_bytes().to_vec();
        data.extend_from_slice(&100u64.to_le_bytes());
        data.extend_from_slice(b"abc");
        assert!(read_xfer(&[message(kind::FILE_XFER_DATA, &data)], 5).is_err());
        // Messages shorter than their fixed fields.
        for (t, len) in [
            (kind::FILE_XFER_START, 3),
            (kind::FILE_XFER_STATUS, 7),
            (kind::FILE_XFER_DATA, 11),
        ] {
            assert!(
                read_xfer(&[message(t, &vec![0; len])], 64).is_err(),
                "type {t}"
            );
        }
        // A START beyond the bound.
        let start = message(
            kind::FILE_XFER_START,
            &vec![b'a'; MAX_XFER_START_LEN as usize + 1],
        );
        assert!(matches!(
            read_xfer(&[start], 64),
            Err(Error::LengthTooLarge { .. })
        ));
    }

    #[test]
    fn what_a_client_may_send_the_agent() {
        assert_eq!(FromClient::of(kind::MOUSE_STATE), FromClient::Refuse);
        assert_eq!(FromClient::of(kind::REPLY), FromClient::Refuse);
        assert_eq!(
            FromClient::of(kind::CLIENT_DISCONNECTED),
            FromClient::Refuse
        );
        assert_eq!(
            FromClient::of(kind::GRAPHICS_DEVICE_INFO),
            FromClient::Refuse
        );
        assert_eq!(FromClient::of(17), FromClient::Refuse);
        assert_eq!(FromClient::of(kind::CLIPBOARD), FromClient::Pass);
        assert_eq!(FromClient::of(kind::MONITORS_CONFIG), FromClient::Pass);
        for t in [
            kind::FILE_XFER_START,
            kind::FILE_XFER_STATUS,
            kind::FILE_XFER_DATA,
        ] {
            assert_eq!(FromClient::of(t), FromClient::FileTransfer);
        }
        assert_eq!(kind::name(kind::MOUSE_STATE), "mouse_state");
        assert_eq!(kind::name(99), "unknown");
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
