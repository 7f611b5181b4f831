//! The one error type of the crate, and the limits that bound what a peer may make
//! the codec buffer.

use crate::encoding::Encoding;

/// What a peer did that the codec refuses. Every variant is final for the
/// connection: the caller closes both legs, since a byte stream that failed to frame
/// cannot be resynchronised.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The 12-byte ProtocolVersion message is not of the form `RFB xxx.yyy\n`.
    #[error("malformed RFB protocol version message {0:?}")]
    MalformedVersion(String),
    /// The peer speaks a protocol version this codec does not implement.
    #[error("unsupported RFB protocol version {major}.{minor}")]
    UnsupportedVersion {
        /// Major version number sent by the peer.
        major: u16,
        /// Minor version number sent by the peer.
        minor: u16,
    },
    /// The server refused the connection before authentication (zero security types,
    /// or security type 0 in RFB 3.3), giving this reason.
    #[error("server refused the connection: {reason}")]
    ConnectionRefused {
        /// The server's reason string, lossily decoded.
        reason: String,
    },
    /// The security type chosen is not one that was offered.
    #[error("security type {0} was chosen but not offered")]
    SecurityTypeNotOffered(u8),
    /// Authentication failed; the server's reason where the protocol version carries one.
    #[error("authentication failed: {reason}")]
    AuthenticationFailed {
        /// The server's reason string (empty before RFB 3.8).
        reason: String,
    },
    /// A SecurityResult word other than 0 (OK), 1 (failed) or 2 (too many attempts).
    #[error("invalid SecurityResult status {0}")]
    InvalidSecurityResult(u32),
    /// The VeNCrypt server speaks a version below 0.2.
    #[error("unsupported VeNCrypt version {major}.{minor}")]
    UnsupportedVencryptVersion {
        /// VeNCrypt major version.
        major: u8,
        /// VeNCrypt minor version.
        minor: u8,
    },
    /// The VeNCrypt server rejected the version or sub-type chosen.
    #[error("VeNCrypt server rejected the {0}")]
    VencryptRejected(&'static str),
    /// The VeNCrypt sub-type is not one this codec can continue with.
    #[error("VeNCrypt sub-type {0} is not supported")]
    UnsupportedVencryptSubtype(u32),
    /// A message type byte that is not defined (or not framable) in this direction.
    #[error("unknown message type {0}")]
    UnknownMessageType(u8),
    /// A QEMU (255) message with an unknown sub-message type.
    #[error("unknown QEMU sub-message type {0}")]
    UnknownQemuSubmessage(u8),
    /// A QEMU audio message with an unknown operation.
    #[error("unknown QEMU audio operation {0}")]
    UnknownQemuAudioOperation(u16),
    /// A message that is only valid after an extension was negotiated arrived without it.
    #[error("{0} received, but its extension was never negotiated")]
    NotNegotiated(&'static str),
    /// A rectangle uses an encoding the client never offered in SetEncodings.
    #[error("rectangle encoding {0} was never offered by the client")]
    EncodingNotOffered(Encoding),
    /// A rectangle uses an encoding this codec cannot frame.
    #[error("rectangle encoding {0} cannot be framed")]
    UnframableEncoding(Encoding),
    /// A length field exceeds a configured or protocol bound.
    #[error("{what} of {len} bytes exceeds the limit of {max} bytes")]
    LengthTooLarge {
        /// Which field or message.
        what: &'static str,
        /// The length the peer announced.
        len: u64,
        /// The bound in force.
        max: u64,
    },
    /// A rectangle (or its CopyRect source) does not fit in the framebuffer.
    #[error(
        "rectangle {x},{y} {width}x{height} lies outside the {fb_width}x{fb_height} framebuffer"
    )]
    RectOutOfBounds {
        /// Left edge.
        x: u16,
        /// Top edge.
        y: u16,
        /// Width.
        width: u16,
        /// Height.
        height: u16,
        /// Framebuffer width in force.
        fb_width: u16,
        /// Framebuffer height in force.
        fb_height: u16,
    },
    /// A pixel format that is impossible or ambiguous on the wire.
    #[error("invalid pixel format: {0}")]
    InvalidPixelFormat(&'static str),
    /// A structurally invalid message.
    #[error("malformed {what}: {why}")]
    Malformed {
        /// Which message or field.
        what: &'static str,
        /// What is wrong with it.
        why: &'static str,
    },
}

impl Error {
    /// Every [`Error::label`], so that metrics can export each at zero before it
    /// happens. Kept in step with `label` (a test checks each variant's is here).
    pub const LABELS: &'static [&'static str] = &[
        "malformed_version",
        "unsupported_version",
        "connection_refused",
        "security_type_not_offered",
        "authentication_failed",
        "invalid_security_result",
        "unsupported_vencrypt_version",
        "vencrypt_rejected",
        "unsupported_vencrypt_subtype",
        "unknown_message_type",
        "unknown_qemu_submessage",
        "unknown_qemu_audio_operation",
        "not_negotiated",
        "encoding_not_offered",
        "unframable_encoding",
        "length_too_large",
        "rect_out_of_bounds",
        "invalid_pixel_format",
        "malformed",
    ];

    /// A short, stable name of the variant, for metrics labels.
    pub fn label(&self) -> &'static str {
        match self {
            Error::MalformedVersion(_) => "malformed_version",
            Error::UnsupportedVersion { .. } => "unsupported_version",
            Error::ConnectionRefused { .. } => "connection_refused",
            Error::SecurityTypeNotOffered(_) => "security_type_not_offered",
            Error::AuthenticationFailed { .. } => "authentication_failed",
            Error::InvalidSecurityResult(_) => "invalid_security_result",
            Error::UnsupportedVencryptVersion { .. } => "unsupported_vencrypt_version",
            Error::VencryptRejected(_) => "vencrypt_rejected",
            Error::UnsupportedVencryptSubtype(_) => "unsupported_vencrypt_subtype",
            Error::UnknownMessageType(_) => "unknown_message_type",
            Error::UnknownQemuSubmessage(_) => "unknown_qemu_submessage",
            Error::UnknownQemuAudioOperation(_) => "unknown_qemu_audio_operation",
            Error::NotNegotiated(_) => "not_negotiated",
            Error::EncodingNotOffered(_) => "encoding_not_offered",
            Error::UnframableEncoding(_) => "unframable_encoding",
            Error::LengthTooLarge { .. } => "length_too_large",
            Error::RectOutOfBounds { .. } => "rect_out_of_bounds",
            Error::InvalidPixelFormat(_) => "invalid_pixel_format",
            Error::Malformed { .. } => "malformed",
        }
    }
}

/// Bounds on what a peer can make the codec buffer. Pixel payloads are streamed and
/// never buffered; these bound the messages that are returned whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The largest message (or pseudo-rectangle payload, such as a cursor image or a
    /// desktop name) that is returned whole, in bytes, header included.
    pub max_message_len: usize,
}

impl Limits {
    /// 1 MiB plus headers: QEMU itself refuses client cut text over 1 MiB.
    pub const DEFAULT_MAX_MESSAGE_LEN: usize = (1 << 20) + 64;
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_len: Self::DEFAULT_MAX_MESSAGE_LEN,
        }
    }
}

impl Limits {
    /// Refuses `len` when it exceeds the bound for whole messages.
    pub(crate) fn check(&self, what: &'static str, len: u64) -> Result<(), Error> {
        if len > self.max_message_len as u64 {
            return Err(Error::LengthTooLarge {
                what,
                len,
                max: self.max_message_len as u64,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoding::Encoding;

    /// One of each variant: adding a variant means adding it here, and its label to
    /// `LABELS`.
    #[test]
    fn every_label_is_listed() {
        let each = [
            Error::MalformedVersion(String::new()),
            Error::UnsupportedVersion { major: 0, minor: 0 },
            Error::ConnectionRefused {
                reason: String::new(),
            },
            Error::SecurityTypeNotOffered(0),
            Error::AuthenticationFailed {
                reason: String::new(),
            },
            Error::InvalidSecurityResult(0),
            Error::UnsupportedVencryptVersion { major: 0, minor: 0 },
            Error::VencryptRejected(""),
            Error::UnsupportedVencryptSubtype(0),
            Error::UnknownMessageType(0),
            Error::UnknownQemuSubmessage(0),
            Error::UnknownQemuAudioOperation(0),
            Error::NotNegotiated(""),
            Error::EncodingNotOffered(Encoding(0)),
            Error::UnframableEncoding(Encoding(0)),
            Error::LengthTooLarge {
                what: "",
                len: 0,
                max: 0,
            },
            Error::RectOutOfBounds {
                x: 0,
                y: 0,
                width: 0,
                height: 0,
                fb_width: 0,
                fb_height: 0,
            },
            Error::InvalidPixelFormat(""),
            Error::Malformed { what: "", why: "" },
        ];
        let labels: Vec<_> = each.iter().map(Error::label).collect();
        assert_eq!(labels, Error::LABELS);
    }
}
