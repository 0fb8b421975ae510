//! The `quire` binary's library: everything `main.rs` wires together, public so the
//! end-to-end tests drive the same code.
//!
//! # Layout
//! - [`supervisor`]: lays out and runs a whole store as child processes (`quire up`).
//! - [`fleet`]: the autoscaler's process backend: servers launched and stopped as children.
//! - [`status`]: `quire status`, a table (or JSON) of every server of a running store.
//! - [`admin`]: operator commands (replace a dead voter).

pub mod admin;
pub mod fleet;
pub mod status;
pub mod supervisor;
