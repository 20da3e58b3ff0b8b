//! Capstan's deployment engine: reads a deployment ([`model`]), plans it against durable state
//! ([`plan`], [`state`]), and runs the plan through long-lived providers ([`run`]), reporting
//! every step as an [`events::Event`].
//!
//! It is not the CLI (rendering, signals and flags live in `capstan-cli`) and it does not speak
//! the provider protocol itself (that is `capstan-host`).

pub mod events;
pub mod maps;
pub mod model;
pub mod plan;
pub mod run;
pub mod scheduler;
pub mod state;
pub mod strict_json;
