//! Shared by the capture tests and the `rfb-record` example.
// Test tooling: a panic here is a test failure, not a crash on peer input.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod capture;
pub mod recorder;
pub mod replay;
