//! The provider host: starts provider processes (or connects to standing provider services),
//! speaks the Capstan protocol to them over Cap'n Proto RPC on Unix sockets, runs operations
//! concurrently with their progress streamed to an observer, and stops them cleanly.
//!
//! It is not the scheduler: it runs the operations it is given, in the order it is given them,
//! and keeps no state between runs. Everything here is `!Send` (capnp-rpc is) and runs on a
//! current-thread runtime inside a `tokio::task::LocalSet`.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use capstan_host::{ignore_progress, HostOptions, OperationCall, ProviderCommand,
//!                    ProviderConnection, ProviderSource};
//! use capstan_schema::OperationKind;
//!
//! let source = ProviderSource::Command(ProviderCommand::new("capstan-provider-testing", ["serve"]));
//! let provider = ProviderConnection::launch("testing", &source, HostOptions::default(), None).await?;
//! let call = OperationCall::new(OperationKind::Create, "noop", "demo", serde_json::json!({"value": 1}));
//! let done = provider.call(call, ignore_progress()).await?;
//! println!("{}", done.outputs);
//! provider.shutdown().await;
//! # Ok(()) }
//! ```

mod connection;
mod error;
mod process;
pub mod reaper;
mod scheduler;
mod sink;

/// JSON kept as text: inputs and outputs of calls (defined with the contract).
pub use capstan_schema::Json;
pub use connection::{
    describe_handle, Handle, HostOptions, OperationCall, OperationSuccess, ProviderConnection,
    ProviderSource, ShutdownReport,
};
pub use error::{CallError, ExitDescription, LaunchError, OutputTail};
pub use process::{ProviderCommand, ProviderLog, StopReport};
pub use scheduler::{ChildRequest, PermitGuard, RunRequests};
pub use sink::{ignore_progress, ProgressObserver};
