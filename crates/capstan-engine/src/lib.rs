//! Capstan's deployment engine: reads a deployment ([`model`]), plans it against durable state
//! ([`plan`]; the state itself is the `capstan-state` crate, re-exported as [`state`]), and
//! runs the plan through long-lived providers ([`run`], a driver around the I/O-free
//! [`scheduler`]), reporting every step as an [`events::Event`].
//!
//! [`session::Session`] is the pipeline every deploying command goes through: the deployment
//! read and planned, providers started, interrupted operations reconciled, the plan's reads,
//! the run.
//!
//! It is not the CLI (rendering, signals and flags live in `capstan-cli`), it does not speak
//! the provider protocol (that is `capstan-host`, which also serves the `Scheduler` and
//! `Permit` capabilities over the run's [`run`] requests), and it does not know how the
//! program embedding it starts built-in providers ([`run::ProviderLauncher`]).

#![forbid(unsafe_code)]

pub mod events;
pub mod model;
pub mod nix;
pub mod plan;
pub mod reconcile;
pub mod run;
pub mod scheduler;
pub mod secrets;
pub mod select;
pub mod session;
pub mod strict_json;
pub mod trace;

/// The durable state the engine plans against and records into (its own crate, so another
/// backend can sit beside the embedded journal).
pub use capstan_state as state;
pub use capstan_state::maps;
