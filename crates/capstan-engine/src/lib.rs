//! Capstan's deployment engine: reads a deployment ([`model`]), plans it against durable state
//! ([`plan`]; the state itself is the `capstan-state` crate, re-exported as [`state`]), and
//! runs the plan through long-lived providers ([`run`], a driver around the I/O-free
//! [`scheduler`]), reporting every step as an [`events::Event`].
//!
//! It is not the CLI (rendering, signals and flags live in `capstan-cli`) and it does not speak
//! the provider protocol itself (that is `capstan-host`), except to serve the `Scheduler` and
//! `Permit` capabilities through which running operations hand work back to the run.

pub mod events;
pub mod model;
pub mod nix;
pub mod plan;
pub mod reconcile;
pub mod run;
pub mod scheduler;
pub mod secrets;
pub mod strict_json;

/// The durable state the engine plans against and records into (its own crate, so another
/// backend can sit beside the embedded journal).
pub use capstan_state as state;
pub use capstan_state::maps;
