//! The link stage that opens every SPICE channel.
//!
//! ```text
//! client: SpiceLinkHeader + SpiceLinkMess          (channel type/id, connection id, caps)
//! server: SpiceLinkHeader + SpiceLinkReply         (error, RSA public key, caps)
//! client: [auth mechanism, U32, when both sides have PROTOCOL_AUTH_SELECTION]
//!         encrypted ticket (128 bytes: RSA-OAEP/SHA-1 of the password)
//! server: link result (U32, 0 = OK)
//! ```

use crate::error::{Error, Limits};
use crate::le_u32;

/// "REDQ".
pub const MAGIC: [u8; 4] = *b"REDQ";
/// Protocol major version.
pub const VERSION_MAJOR: u32 = 2;
/// Protocol minor version.
pub const VERSION_MINOR: u32 = 2;
/// Size of `SpiceLinkHeader`.
pub const HEADER_LEN: usize = 16;
/// Size of the RSA public key in `SpiceLinkReply` (1024-bit key as DER
/// SubjectPublicKeyInfo).
pub const PUBKEY_LEN: usize = 162;
/// Size of the encrypted ticket.
pub const TICKET_LEN: usize = 128;
/// Longest password a ticket carries.
pub const MAX_PASSWORD_LEN: usize = 60;

/// Common capability bits.
pub mod cap {
    /// The client sends an auth-mechanism word before the ticket.
    pub const PROTOCOL_AUTH_SELECTION: u32 = 0;
    /// Ticket (SPICE) authentication.
    pub const AUTH_SPICE: u32 = 1;
    /// SASL authentication.
    pub const AUTH_SASL: u32 = 2;
    /// Channel messages use the 6-byte mini header.
    pub const MINI_HEADER: u32 = 3;
}

/// Channel types.
pub mod channel_type {
    /// Main.
    pub const MAIN: u8 = 1;
    /// Display.
    pub const DISPLAY: u8 = 2;
    /// Inputs.
    pub const INPUTS: u8 = 3;
    /// Cursor.
    pub const CURSOR: u8 = 4;
    /// Audio playback.
    pub const PLAYBACK: u8 = 5;
    /// Audio record.
    pub const RECORD: u8 = 6;
    /// Smartcard.
    pub const SMARTCARD: u8 = 8;
    /// USB redirection.
    pub const USBREDIR: u8 = 9;
    /// Port.
    pub const PORT: u8 = 10;
    /// WebDAV.
    pub const WEBDAV: u8 = 11;

    /// Whether spice-server has channels of type `t` (the tunnel, 7, is long gone).
    pub fn exists(t: u8) -> bool {
        matches!(t, MAIN..=RECORD | SMARTCARD..=WEBDAV)
    }

    /// A name for logs.
    pub fn name(t: u8) -> &'static str {
        match t {
            MAIN => "main",
            DISPLAY => "display",
            INPUTS => "inputs",
            CURSOR => "cursor",
            PLAYBACK => "playback",
            RECORD => "record",
            7 => "tunnel",
            SMARTCARD => "smartcard",
            USBREDIR => "usbredir",
            PORT => "port",
            WEBDAV => "webdav",
            _ => "unknown",
        }
    }
}

/// Link results (`SPICE_LINK_ERR_*`).
pub mod link_error {
    /// Success.
    pub const OK: u32 = 0;
    /// Generic error.
    pub const ERROR: u32 = 1;
    /// Bad magic.
    pub const INVALID_MAGIC: u32 = 2;
    /// Bad data.
    pub const INVALID_DATA: u32 = 3;
    /// Version mismatch.
    pub const VERSION_MISMATCH: u32 = 4;
    /// TLS required.
    pub const NEED_SECURED: u32 = 5;
    /// TLS not allowed.
    pub const NEED_UNSECURED: u32 = 6;
    /// Wrong ticket.
    pub const PERMISSION_DENIED: u32 = 7;
    /// Unknown connection id.
    pub const BAD_CONNECTION_ID: u32 = 8;
    /// No such channel.
    pub const CHANNEL_NOT_AVAILABLE: u32 = 9;

    /// What a link result means, for logs and for the browser.
    pub fn describe(code: u32) -> &'static str {
        match code {
            OK => "ok",
            ERROR => "error",
            INVALID_MAGIC => "invalid magic",
            INVALID_DATA => "invalid data",
            VERSION_MISMATCH => "version mismatch",
            NEED_SECURED => "a TLS connection is required",
            NEED_UNSECURED => "a plain connection is required",
            PERMISSION_DENIED => "permission denied (wrong password)",
            BAD_CONNECTION_ID => "bad connection id",
            CHANNEL_NOT_AVAILABLE => "channel not available",
            _ => "unknown link error",
        }
    }
}

/// A capability set: bit `n` of word `n / 32`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caps(pub Vec<u32>);

impl Caps {
    /// Whether bit `bit` is set.
    pub fn has(&self, bit: u32) -> bool {
        self.0
            .get((bit / 32) as usize)
            .is_some_and(|w| w & (1 << (bit % 32)) != 0)
    }

    /// Sets bit `bit` (bits beyond 255 are ignored).
    pub fn set(&mut self, bit: u32) {
        let i = (bit / 32) as usize;
        if i >= 8 {
            return;
        }
        if self.0.len() <= i {
            self.0.resize(i + 1, 0);
        }
        self.0[i] |= 1 << (bit % 32);
    }

    /// Clears bit `bit`.
    pub fn clear(&mut self, bit: u32) {
        if let Some(w) = self.0.get_mut((bit / 32) as usize) {
            *w &= !(1 << (bit % 32));
        }
    }
}

/// Parses a `SpiceLinkHeader` at the start of `buf`; returns the size of what follows.
pub fn parse_header(buf: &[u8], limits: &Limits) -> Result<Option<u32>, Error> {
    let Some(h) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let magic: [u8; 4] = [h[0], h[1], h[2], h[3]];
    if magic != MAGIC {
        return Err(Error::BadMagic(magic));
    }
    let major = le_u32(h, 4).unwrap_or(0);
    let minor = le_u32(h, 8).unwrap_or(0);
    if major != VERSION_MAJOR {
        return Err(Error::VersionMismatch { major, minor });
    }
    let size = le_u32(h, 12).unwrap_or(0);
    Limits::check(
        "SPICE link message",
        u64::from(size),
        limits.max_link_len as u64,
    )?;
    Ok(Some(size))
}

fn write_header(size: usize, out: &mut Vec<u8>) {
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION_MAJOR.to_le_bytes());
    out.extend_from_slice(&VERSION_MINOR.to_le_bytes());
    out.extend_from_slice(&(size as u32).to_le_bytes());
}

/// Reads the two capability arrays that end both link messages.
fn parse_caps(body: &[u8], counts_at: usize, what: &'static str) -> Result<(Caps, Caps), Error> {
    let malformed = |why| Error::Malformed { what, why };
    let n_common = le_u32(body, counts_at).ok_or(malformed("truncated"))? as usize;
    let n_channel = le_u32(body, counts_at + 4).ok_or(malformed("truncated"))? as usize;
    let offset = le_u32(body, counts_at + 8).ok_or(malformed("truncated"))? as usize;
    if n_common > 64 || n_channel > 64 {
        return Err(malformed("more than 64 capability words"));
    }
    if offset < counts_at + 12 {
        return Err(malformed("capabilities overlap the fixed fields"));
    }
    let words = |start: usize, n: usize| -> Result<Caps, Error> {
        (0..n)
            .map(|i| {
                le_u32(body, start + 4 * i).ok_or(malformed("capabilities beyond the message"))
            })
            .collect::<Result<Vec<u32>, Error>>()
            .map(Caps)
    };
    Ok((
        words(offset, n_common)?,
        words(offset + 4 * n_common, n_channel)?,
    ))
}

fn write_caps(common: &Caps, channel: &Caps, out: &mut Vec<u8>, offset: usize) {
    out.extend_from_slice(&(common.0.len() as u32).to_le_bytes());
    out.extend_from_slice(&(channel.0.len() as u32).to_le_bytes());
    out.extend_from_slice(&(offset as u32).to_le_bytes());
    for w in common.0.iter().chain(&channel.0) {
        out.extend_from_slice(&w.to_le_bytes());
    }
}

/// `SpiceLinkMess`: the client asks for a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkMess {
    /// 0 for a session's main channel, else the session id from the main channel.
    pub connection_id: u32,
    /// Channel type.
    pub channel_type: u8,
    /// Channel id.
    pub channel_id: u8,
    /// Common capabilities.
    pub common_caps: Caps,
    /// Channel capabilities.
    pub channel_caps: Caps,
}

impl LinkMess {
    /// Parses header and message at the start of `buf`.
    pub fn parse(buf: &[u8], limits: &Limits) -> Result<Option<(LinkMess, usize)>, Error> {
        let Some(size) = parse_header(buf, limits)? else {
            return Ok(None);
        };
        let Some(body) = buf.get(HEADER_LEN..HEADER_LEN + size as usize) else {
            return Ok(None);
        };
        let malformed = |why| Error::Malformed {
            what: "SpiceLinkMess",
            why,
        };
        if body.len() < 18 {
            return Err(malformed("shorter than its fixed fields"));
        }
        let (common_caps, channel_caps) = parse_caps(body, 6, "SpiceLinkMess")?;
        Ok(Some((
            LinkMess {
                connection_id: le_u32(body, 0).ok_or(malformed("truncated"))?,
                channel_type: body[4],
                channel_id: body[5],
                common_caps,
                channel_caps,
            },
            HEADER_LEN + body.len(),
        )))
    }

    /// Appends header and message.
    pub fn write(&self, out: &mut Vec<u8>) {
        let size = 18 + 4 * (self.common_caps.0.len() + self.channel_caps.0.len());
        write_header(size, out);
        out.extend_from_slice(&self.connection_id.to_le_bytes());
        out.extend_from_slice(&[self.channel_type, self.channel_id]);
        write_caps(&self.common_caps, &self.channel_caps, out, 18);
    }
}

/// `SpiceLinkReply`: the server's answer, with its RSA key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkReply {
    /// 0 for success, else a [`link_error`].
    pub error: u32,
    /// The server's 1024-bit RSA public key, DER SubjectPublicKeyInfo.
    pub pub_key: Vec<u8>,
    /// Common capabilities.
    pub common_caps: Caps,
    /// Channel capabilities.
    pub channel_caps: Caps,
}

impl LinkReply {
    const FIXED: usize = 4 + PUBKEY_LEN + 12;

    /// Parses header and reply at the start of `buf`.
    pub fn parse(buf: &[u8], limits: &Limits) -> Result<Option<(LinkReply, usize)>, Error> {
        let Some(size) = parse_header(buf, limits)? else {
            return Ok(None);
        };
        let Some(body) = buf.get(HEADER_LEN..HEADER_LEN + size as usize) else {
            return Ok(None);
        };
        let error = le_u32(body, 0).ok_or(Error::Malformed {
            what: "SpiceLinkReply",
            why: "truncated",
        })?;
        if error != link_error::OK {
            // A refusal carries nothing else of use: spice-server sends a whole reply,
            // zero but for the error (reds_send_link_error: no key, capability offset
            // 0), and another server may send the error word alone.
            return Ok(Some((
                LinkReply {
                    error,
                    pub_key: Vec::new(),
                    common_caps: Caps::default(),
                    channel_caps: Caps::default(),
                },
                HEADER_LEN + body.len(),
            )));
        }
        if body.len() < Self::FIXED {
            return Err(Error::Malformed {
                what: "SpiceLinkReply",
                why: "shorter than its fixed fields",
            });
        }
        let (common_caps, channel_caps) = parse_caps(body, 4 + PUBKEY_LEN, "SpiceLinkReply")?;
        Ok(Some((
            LinkReply {
                error,
                pub_key: body[4..4 + PUBKEY_LEN].to_vec(),
                common_caps,
                channel_caps,
            },
            HEADER_LEN + body.len(),
        )))
    }

    /// Appends header and reply (`pub_key` padded or cut to 162 bytes).
    pub fn write(&self, out: &mut Vec<u8>) {
        let size = Self::FIXED + 4 * (self.common_caps.0.len() + self.channel_caps.0.len());
        write_header(size, out);
        out.extend_from_slice(&self.error.to_le_bytes());
        let mut key = self.pub_key.clone();
        key.resize(PUBKEY_LEN, 0);
        out.extend_from_slice(&key);
        write_caps(&self.common_caps, &self.channel_caps, out, Self::FIXED);
    }
}

/// Reads a U32 (auth mechanism or link result) at the start of `buf`.
pub fn parse_u32(buf: &[u8]) -> Option<(u32, usize)> {
    Some((le_u32(buf, 0)?, 4))
}

/// Reads the 128-byte encrypted ticket at the start of `buf`.
pub fn parse_ticket(buf: &[u8]) -> Option<([u8; TICKET_LEN], usize)> {
    Some((buf.get(..TICKET_LEN)?.try_into().ok()?, TICKET_LEN))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_types_that_exist_are_the_named_ones_but_the_tunnel() {
        for t in 0..=u8::MAX {
            let named = !matches!(channel_type::name(t), "unknown" | "tunnel");
            assert_eq!(channel_type::exists(t), named, "{t}");
        }
    }

    fn caps(bits: &[u32]) -> Caps {
        let mut c = Caps::default();
        for b in bits {
            c.set(*b);
        }
        c
    }

    #[test]
    fn link_mess_round_trips_and_frames_at_any_split() {
        let m = LinkMess {
            connection_id: 0x1234_5678,
            channel_type: channel_type::INPUTS,
            channel_id: 0,
            common_caps: caps(&[cap::PROTOCOL_AUTH_SELECTION, cap::MINI_HEADER]),
            channel_caps: caps(&[0]),
        };
        let mut b = Vec::new();
        m.write(&mut b);
        assert_eq!(&b[..4], b"REDQ");
        assert_eq!(b.len(), 16 + 18 + 8);
        for k in 0..b.len() {
            assert_eq!(
                LinkMess::parse(&b[..k], &Limits::default()),
                Ok(None),
                "{k}"
            );
        }
        assert_eq!(
            LinkMess::parse(&b, &Limits::default()),
            Ok(Some((m.clone(), b.len())))
        );
        assert!(m.common_caps.has(cap::MINI_HEADER) && !m.common_caps.has(cap::AUTH_SASL));
    }

    #[test]
    fn spice_html5s_link_message() {
        // spice-html5 0.3 (spiceconn.js) for the main channel: common caps
        // PROTOCOL_AUTH_SELECTION | MINI_HEADER, channel caps 0.
        let mut b = b"REDQ".to_vec();
        for v in [2u32, 2, 26] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&[1, 0]);
        for v in [1u32, 1, 18, 0b1001, 0] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        let (m, n) = LinkMess::parse(&b, &Limits::default()).unwrap().unwrap();
        assert_eq!(n, b.len());
        assert_eq!(m.channel_type, channel_type::MAIN);
        assert!(
            m.common_caps.has(cap::PROTOCOL_AUTH_SELECTION) && m.common_caps.has(cap::MINI_HEADER)
        );
    }

    #[test]
    fn link_reply_round_trips_and_refusals_may_be_short() {
        let r = LinkReply {
            error: 0,
            pub_key: vec![0x30; PUBKEY_LEN],
            common_caps: caps(&[cap::AUTH_SPICE, cap::MINI_HEADER]),
            channel_caps: Caps(vec![0b11]),
        };
        let mut b = Vec::new();
        r.write(&mut b);
        assert_eq!(
            LinkReply::parse(&b, &Limits::default()),
            Ok(Some((r, b.len())))
        );
        let mut short = b"REDQ".to_vec();
        for v in [2u32, 2, 4, link_error::VERSION_MISMATCH] {
            short.extend_from_slice(&v.to_le_bytes());
        }
        let (r, _) = LinkReply::parse(&short, &Limits::default())
            .unwrap()
            .unwrap();
        assert_eq!(link_error::describe(r.error), "version mismatch");
        // spice-server's refusal (reds_send_link_error): a whole reply, zero but for
        // the error, capability offset 0 included.
        let mut whole = b"REDQ".to_vec();
        for v in [2u32, 2, LinkReply::FIXED as u32] {
            whole.extend_from_slice(&v.to_le_bytes());
        }
        whole.extend_from_slice(&link_error::NEED_SECURED.to_le_bytes());
        whole.resize(HEADER_LEN + LinkReply::FIXED, 0);
        let (r, used) = LinkReply::parse(&whole, &Limits::default())
            .unwrap()
            .unwrap();
        assert_eq!((r.error, used), (link_error::NEED_SECURED, whole.len()));
    }

    #[test]
    fn refusals() {
        let l = Limits::default();
        assert_eq!(
            parse_header(b"RFB 003.008\nxxxx", &l),
            Err(Error::BadMagic(*b"RFB "))
        );
        let mut h = b"REDQ".to_vec();
        for v in [1u32, 0, 0] {
            h.extend_from_slice(&v.to_le_bytes());
        }
        assert_eq!(
            parse_header(&h, &l),
            Err(Error::VersionMismatch { major: 1, minor: 0 })
        );
        let mut h = b"REDQ".to_vec();
        for v in [2u32, 2, 1 << 30] {
            h.extend_from_slice(&v.to_le_bytes());
        }
        assert!(matches!(
            parse_header(&h, &l),
            Err(Error::LengthTooLarge { .. })
        ));
        // Capabilities claimed beyond the message.
        let mut b = b"REDQ".to_vec();
        for v in [2u32, 2, 18] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&[0, 0, 0, 0, 1, 0]);
        for v in [3u32, 0, 18] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        assert!(matches!(
            LinkMess::parse(&b, &l),
            Err(Error::Malformed { .. })
        ));
    }
}
