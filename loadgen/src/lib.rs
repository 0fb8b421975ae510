//! The load generator: simulated clients, load profiles, reports and charts
//! (docs/ARCHITECTURE.md, "quire load").
//!
//! # Layout
//! - [`profile`]: load profiles (`c-20-30s,ramp-5-50-60s,...`) and their Poisson arrivals.
//! - [`model`]: what a client does, how requests and clients end, and the oracle.
//! - [`live`]: `quire load`, the clients against a running store ([`run`], [`LoadArgs`]).
//! - [`report`]: the [`Recorder`] fed by a run and the [`Report`] it yields; `chart` draws
//!   the report as SVG, `histogram` keeps its latencies.
//!
//! The simulator (in the autoscaler crate) drives the same profile, model and recorder, so a
//! simulated run and a live one report alike.

mod chart;
mod histogram;
pub mod live;
pub mod model;
pub mod profile;
pub mod report;

pub use live::{run, LoadArgs};
pub use model::{oracle_load, oracle_servers, ClientModel, Op, Outcome, Status, TIERS, TIER_FLOORS};
pub use profile::Profile;
pub use report::{OpLatency, Point, Recorder, Report};
