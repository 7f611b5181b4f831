//! vizor: a protocol-aware, terminating WebSocket proxy for the VNC and SPICE consoles
//! of libvirt-managed QEMU virtual machines.
//!
//! The protocol codecs live in their own sans-IO crates under `protocols/`; this crate
//! will hold the proxy that drives them (front, tokens, libvirt lookup, sessions,
//! audit, metrics).

#![forbid(unsafe_code)]

pub use vizor_rfb as rfb;
