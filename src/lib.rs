//! vizor: a protocol-aware, terminating WebSocket proxy for the VNC and SPICE consoles
//! of libvirt-managed QEMU virtual machines.
//!
//! The protocol codecs live in their own sans-IO crates under `protocols/`; this crate
//! drives them. Modules follow a session's data path: `config` and `cli` at start,
//! then `token` (the browser's credential).

#![forbid(unsafe_code)]

pub mod admins;
pub mod audit;
pub mod check;
pub mod cli;
pub mod config;
pub mod console;
pub mod end;
pub mod forwarded;
pub mod front;
pub mod libvirt;
pub mod limits;
pub mod live;
pub mod lockfile;
pub mod metrics;
pub mod paste;
pub mod policy;
pub mod recording;
pub mod refusals;
pub mod serve;
pub mod session;
pub mod state;
pub mod tls;
pub mod token;
pub mod upstream;

pub use vizor_rfb as rfb;
