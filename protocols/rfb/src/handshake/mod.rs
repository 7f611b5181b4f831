//! The RFB handshake in both roles, as explicit states that consume themselves.
//!
//! vizor is the RFB *server* toward the browser ([`server`]) and the RFB *client*
//! toward QEMU ([`client`]). Each state is named for what it waits for
//! (`ExpectServerVersion`, `ExpectChallenge` ...). A state that reads input has a
//! `receive(self, input, out)` method: it returns [`Progress::NeedMore`] with the state
//! itself when `input` does not yet hold a whole message (feed it again with more
//! bytes, from the same start), or [`Progress::Done`] with the next state and the
//! number of bytes of `input` it consumed. Replies to send are appended to `out`.
//! States that wait for a decision of the caller (which security type, which
//! password) have methods named for the decision instead.

pub mod client;
pub mod server;
mod vnc_auth;

pub use vnc_auth::{vnc_auth_response, Challenge, ChallengeResponse};

use crate::error::{Error, Limits};
use crate::pixel::PixelFormat;
use crate::wire::{display_string, need, Reader};

/// The outcome of feeding bytes to a state (shared with the other protocol crate, so
/// one loop drives both).
pub use vizor_sansio::Progress;

/// An RFB protocol version vizor implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Version {
    /// RFB 3.3: the server chooses the security type.
    V3_3,
    /// RFB 3.7: security type list; no SecurityResult after None.
    V3_7,
    /// RFB 3.8: SecurityResult always sent, with a reason on failure.
    V3_8,
}

impl Version {
    /// Length of the ProtocolVersion message.
    pub const LEN: usize = 12;

    /// The ProtocolVersion message for this version.
    pub fn to_bytes(self) -> [u8; 12] {
        match self {
            Version::V3_3 => *b"RFB 003.003\n",
            Version::V3_7 => *b"RFB 003.007\n",
            Version::V3_8 => *b"RFB 003.008\n",
        }
    }

    /// Whether a SecurityResult follows a successful None authentication.
    fn result_after_none(self) -> bool {
        self == Version::V3_8
    }

    /// Whether a failed SecurityResult carries a reason string.
    fn result_has_reason(self) -> bool {
        self == Version::V3_8
    }
}

/// Parses a ProtocolVersion message into its (major, minor) numbers.
pub fn parse_version(b: &[u8; 12]) -> Result<(u16, u16), Error> {
    let malformed = || Error::MalformedVersion(String::from_utf8_lossy(b).into_owned());
    if &b[..4] != b"RFB " || b[7] != b'.' || b[11] != b'\n' {
        return Err(malformed());
    }
    let num = |d: &[u8]| -> Result<u16, Error> {
        if !d.iter().all(u8::is_ascii_digit) {
            return Err(malformed());
        }
        Ok(d.iter().fold(0u16, |n, c| n * 10 + u16::from(c - b'0')))
    };
    Ok((num(&b[4..7])?, num(&b[8..11])?))
}

/// A security type number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SecurityType(pub u8);

impl SecurityType {
    /// No authentication.
    pub const NONE: SecurityType = SecurityType(1);
    /// VNC authentication: DES challenge/response.
    pub const VNC_AUTH: SecurityType = SecurityType(2);
    /// VeNCrypt: TLS with a sub-type.
    pub const VENCRYPT: SecurityType = SecurityType(19);
}

/// VeNCrypt sub-types vizor can continue with (TLS itself is the caller's job).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VencryptSubtype(pub u32);

impl VencryptSubtype {
    /// Anonymous TLS, no authentication.
    pub const TLS_NONE: VencryptSubtype = VencryptSubtype(257);
    /// Anonymous TLS, then VNC authentication.
    pub const TLS_VNC: VencryptSubtype = VencryptSubtype(258);
    /// X.509 TLS, no authentication.
    pub const X509_NONE: VencryptSubtype = VencryptSubtype(260);
    /// X.509 TLS, then VNC authentication.
    pub const X509_VNC: VencryptSubtype = VencryptSubtype(261);

    /// Whether the sub-type wraps the stream in TLS before authenticating.
    pub fn uses_tls(self) -> bool {
        matches!(self.0, 257..=264 | 266 | 267)
    }
}

/// The ClientInit message: whether other clients may stay connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientInit {
    /// Non-zero on the wire: share the desktop.
    pub shared: bool,
}

/// The ServerInit message.
#[derive(Clone, PartialEq, Eq)]
pub struct ServerInit {
    /// Framebuffer width.
    pub width: u16,
    /// Framebuffer height.
    pub height: u16,
    /// The server's natural pixel format.
    pub pixel_format: PixelFormat,
    /// The desktop name, as sent.
    pub name: Vec<u8>,
}

impl std::fmt::Debug for ServerInit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerInit")
            .field("width", &self.width)
            .field("height", &self.height)
            .field("pixel_format", &self.pixel_format)
            .field("name", &display_string(&self.name))
            .finish()
    }
}

impl ServerInit {
    /// Parses a ServerInit from the start of `buf`; `None` until it is complete.
    pub fn parse(buf: &[u8], limits: &Limits) -> Result<Option<(ServerInit, usize)>, Error> {
        let mut r = Reader::new(buf);
        let width = need!(r.u16());
        let height = need!(r.u16());
        let pf = need!(r.array::<16>());
        let name_len = need!(r.u32());
        limits.check("ServerInit desktop name", u64::from(name_len) + 24)?;
        let pixel_format = PixelFormat::parse(&pf)?;
        let name = need!(r.bytes(name_len as usize)).to_vec();
        Ok(Some((
            ServerInit {
                width,
                height,
                pixel_format,
                name,
            },
            r.pos(),
        )))
    }

    /// Appends the wire form.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.width.to_be_bytes());
        out.extend_from_slice(&self.height.to_be_bytes());
        self.pixel_format.write(out);
        out.extend_from_slice(&(self.name.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.name);
    }

    /// The desktop name for display.
    pub fn name_lossy(&self) -> String {
        display_string(&self.name)
    }
}

/// Reads a `U32 length` + bytes reason string.
fn read_reason(r: &mut Reader<'_>, limits: &Limits) -> Result<Option<String>, Error> {
    let len = need!(r.u32());
    limits.check("reason string", u64::from(len))?;
    Ok(Some(display_string(need!(r.bytes(len as usize)))))
}

/// Appends a `U32 length` + bytes reason string.
fn write_reason(reason: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(&(reason.len() as u32).to_be_bytes());
    out.extend_from_slice(reason.as_bytes());
}

#[cfg(test)]
mod tests;
