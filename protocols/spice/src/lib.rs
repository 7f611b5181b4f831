//! A sans-IO codec for SPICE, as QEMU's spice-server and spice-html5 speak it.
//!
//! Like `vizor-rfb`, it owns no socket or clock: bytes in, typed values or a typed
//! [`Error`] out; it never panics on any input and bounds what it buffers. All SPICE
//! integers are little endian.
//!
//! - [`link`]: the link stage: `SpiceLinkHeader` ("REDQ" 2.2), `SpiceLinkMess`,
//!   `SpiceLinkReply` (RSA public key, capabilities), the auth-mechanism word, the
//!   128-byte encrypted ticket and the link result.
//! - [`handshake`]: the link stage in both roles as states that consume themselves,
//!   for a proxy between a browser and spice-server.
//! - [`channel`]: framing after the link, with the mini or the full header; small
//!   messages come whole, large ones as a header and data chunks.
//! - [`msg`]: typed decoding of what a proxy acts on: main init, ping/pong, set-ack and
//!   ack, input keys and mouse buttons, agent data.
//! - [`agent`]: the guest-agent messages carried in agent data, reassembled across
//!   chunks (for clipboard audit).
//!
//! What QEMU makes of the inputs channel's scancodes is `vizor-keys`' business.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod agent;
pub mod channel;
mod error;
pub mod handshake;
pub mod link;
pub mod msg;

pub use error::{Error, Limits};

/// Little-endian reads that fail as "not enough bytes" with `None`.
pub(crate) fn le_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

pub(crate) fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

pub(crate) fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}
