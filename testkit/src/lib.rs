//! vizor's test tooling, in one crate (as h2 keeps its `h2-support`): used by the
//! root package's integration tests, by vizor-rfb's and vizor-spice's tests, and by
//! vizor-bench. Not published; nothing in vizor itself depends on it.
//!
//! - [`drive()`]: the one loop that drives a sans-IO handshake state (vizor-rfb's or
//!   vizor-spice's) over a [`Source`] of bytes: a socket, a WebSocket client, a
//!   recording; [`drive_blocking`] for blocking std streams; [`until`] for a plain
//!   parse function.
//! - [`vnc`]: the synthetic VNC server, a test double for load generation and for the
//!   faults real QEMU cannot be made to produce.
//! - [`spice`]: the synthetic SPICE server, a test double for load generation, and
//!   the client's side of its display stream.
//! - [`libvirt`]: node files for libvirt's test driver naming such servers as the
//!   consoles of running domains.

pub mod drive;
pub mod libvirt;
pub mod spice;
pub mod vnc;

pub use drive::{
    drive, drive_blocking, until, Blocking, DriveError, Exhausted, Immediate, Source, Stepped,
};
