//! A sans-IO codec for RFB, the VNC protocol, as QEMU and noVNC speak it.
//!
//! It owns no socket, clock or runtime: it takes bytes and returns typed messages, or
//! a typed [`Error`] that says what the peer did wrong. It never panics on any input
//! and bounds everything it buffers ([`Limits`]).
//!
//! - [`handshake`]: ProtocolVersion, security negotiation (None, VNC authentication,
//!   VeNCrypt up to the TLS hand-off), ClientInit and ServerInit, in both roles.
//! - [`client`]: client-to-server messages, decoded whole with their byte length.
//! - [`server`]: server-to-client messages. FramebufferUpdate is decoded as a stream of
//!   events (update, rectangle, encoded data), so a relay forwards pixel data as it
//!   arrives and never buffers a whole update; compressed rectangles are framed by
//!   their length fields, never inflated.
//! - [`cut_text`]: clipboard contents, the same in both directions; [`screens`]:
//!   multi-head layouts, the same in both directions.
//! - [`confirm`]: what a server message confirms for the client decoder.
//! - [`encoding`]: encoding numbers and which of them can be framed.
//! - [`keysym`]: names of X11 keysyms for audit logs.
//!
//! Every decoded item carries the number of bytes it spans, so the spans of a stream
//! concatenate back to the stream and a relay forwards the original bytes.
//!
//! ## Facts that cross directions
//! The two directions are decoded independently; a relay passes these facts across:
//! - a client SetPixelFormat or SetEncodings it forwards goes to
//!   [`server::ServerDecoder::set_pixel_format`] / [`server::ServerDecoder::set_encodings`];
//! - what a server event confirms ([`confirm::Confirmations::of`]: ExtendedMouseButtons,
//!   ServerFence, EndOfContinuousUpdates, xvp init) goes to
//!   [`client::ClientDecoder::confirm`]; the client messages of those extensions are
//!   refused until then.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod client;
pub mod confirm;
pub mod cut_text;
pub mod encoding;
mod error;
pub mod handshake;
pub mod keysym;
pub mod pixel;
mod rect;
pub mod screens;
pub mod server;
mod wire;

pub use encoding::{Encoding, EncodingKind, EncodingSet};
pub use error::{Error, Limits};
pub use pixel::PixelFormat;
