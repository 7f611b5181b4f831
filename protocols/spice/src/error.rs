//! The crate's error type and buffering bounds.

/// What a peer did that the codec refuses; final for the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The link header does not start with "REDQ".
    #[error("not a SPICE link header (magic {0:02x?})")]
    BadMagic([u8; 4]),
    /// A protocol major version other than 2.
    #[error("unsupported SPICE protocol version {major}.{minor}")]
    VersionMismatch {
        /// Major version.
        major: u32,
        /// Minor version.
        minor: u32,
    },
    /// A length field exceeds a bound.
    #[error("{what} of {len} bytes exceeds the limit of {max} bytes")]
    LengthTooLarge {
        /// Which field or message.
        what: &'static str,
        /// The length announced.
        len: u64,
        /// The bound.
        max: u64,
    },
    /// A structurally invalid message.
    #[error("malformed {what}: {why}")]
    Malformed {
        /// Which message.
        what: &'static str,
        /// What is wrong.
        why: &'static str,
    },
}

/// Bounds on what the codec buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest link message (`SpiceLinkMess` or `SpiceLinkReply` body).
    pub max_link_len: usize,
    /// Largest channel message returned whole; larger ones are streamed.
    pub max_message_len: usize,
    /// Largest guest-agent message (clipboard) followed across chunks.
    pub max_agent_message_len: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_link_len: 4096,
            // spice-server's bandwidth test sends pings carrying 250000 bytes.
            max_message_len: 1 << 20,
            max_agent_message_len: 64 << 20,
        }
    }
}

impl Limits {
    pub(crate) fn check(what: &'static str, len: u64, max: u64) -> Result<(), Error> {
        if len > max {
            return Err(Error::LengthTooLarge { what, len, max });
        }
        Ok(())
    }
}
