//! Shared vocabulary of every quire server.
//!
//! # Layout
//! - [`announce`]: servers registering with their balancers.
//! - [`api`]: the JSON types of the public API and of the internal service APIs.
//! - [`error`]: [`ApiError`], the one error body every server answers with.
//! - [`headers`]: names of the headers that travel between tiers (token, deadline, leader hint).
//! - [`deadline`]: a request's absolute deadline, carried hop to hop.
//! - [`http`]: the JSON extractor with documented rejections, fallbacks, the token guard.
//! - [`node`]: Raft node ids (seats and incarnations).
//! - [`capacity`]: the cost of work under `--profile cloud-sim`.
//! - [`samples`]: per-tier samples from the balancers, the autoscaler's fleet view.
//! - [`batch`]: coalescing concurrent requests into shared network rounds.
//! - [`client`]: the shared `reqwest` client and a typed call helper.
//! - [`status`]: the `/status` body every server serves.
//! - [`telemetry`]: tracing to stderr and to a per-server file.
//! - [`timings`]: every span timed and summed by name, for `/metrics`.
//! - [`shutdown`]: the Ctrl-C / SIGTERM future handed to every `run`.

pub mod announce;
pub mod api;
pub mod batch;
pub mod capacity;
pub mod client;
pub mod deadline;
pub mod error;
pub mod headers;
pub mod http;
pub mod node;
pub mod samples;
pub mod shutdown;
pub mod status;
pub mod telemetry;
pub mod timings;

pub use deadline::Deadline;
pub use error::ApiError;
