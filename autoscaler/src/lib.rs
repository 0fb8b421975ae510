//! The autoscaler: pure policies that turn samples into decisions, the simulator that
//! replays a load profile against them, and the backends that act on their decisions.
//!
//! # Layout
//! - [`policy`]: the [`Policy`] trait, what it observes and decides, and the four policies.
//! - [`live`]: the control loop of a running store: samples in, servers launched and drained
//!   through a [`live::Backend`] (local processes, Docker containers).
//! - [`sim`]: a discrete-event model of the tiers, driven by the same policies.
//! - [`docker`]: the Docker backend ([`docker::Containers`], a compose project's containers
//!   through the Engine API) and `quire autoscale`, the autoscaler as a container of the stack.

pub mod docker;
pub mod live;
pub mod policy;
pub mod sim;

pub use policy::{Decision, Observation, Policy, TierKind, TierState};
