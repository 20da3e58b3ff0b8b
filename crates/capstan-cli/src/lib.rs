//! The parts of the `capstan` command that other programs of this workspace (the benchmarks,
//! the integration tests) start providers with: [`served`], the hidden `__provider`
//! subcommand and the launcher that re-executes `capstan` with it.

#![forbid(unsafe_code)]

pub mod served;
