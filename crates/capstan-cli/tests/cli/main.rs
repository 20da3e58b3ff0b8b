//! The `capstan` command end to end, in one test binary: real `capstan` processes, real
//! provider processes over real sockets, real files (and real Nix, Python, Terraform where a
//! module says so). One module per area; `support` is what they share.

mod support;

mod capabilities;
mod children;
mod confirm;
mod corpus;
mod crash;
mod deploy;
mod encryption;
mod examples;
mod limits;
mod machines;
mod nix;
mod nix_deployments;
mod nixops4_v0;
mod postgres;
mod python_provider;
mod reconcile;
mod scheduler_properties;
mod secrets;
mod selection;
mod signals;
mod state_lock;
mod telemetry;
mod terraform;
mod usage;
