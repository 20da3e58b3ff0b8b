//! Write a Capstan provider in Rust.
//!
//! A provider is a long-lived process that manages resources for the Capstan core over Cap'n
//! Proto RPC on a Unix socket. With this crate, a provider author implements [`Resource`] for
//! each resource type (async `create`, and optionally `read`, `update`, `delete`, with typed
//! inputs and outputs through serde) and calls [`Provider::serve`]. The SDK takes care of:
//!
//! - the connection: a socket inherited by socket activation (how `capstan` starts a provider,
//!   and how systemd starts a socket-activated service), or a path given in
//!   `CAPSTAN_PROVIDER_LISTEN` for a standing service;
//! - the handshake, version negotiation, and the provider's concurrency limit;
//! - progress: `tracing` spans and events inside an operation reach the user's live view with
//!   their structure, plus [`Operation::log`], [`Operation::progress`] and [`Operation::phase`];
//!   all flow-controlled;
//! - cancellation ([`Operation::cancelled`]), panics (an error for that operation, never a hung
//!   connection) and a clean stdout (fd 1 is pointed at stderr).
//!
//! It is not the host side: starting providers and calling them is `capstan-host`'s job.
//!
//! ```no_run
//! use capstan_provider::{Operation, OperationError, Provider, Resource, ResourceType};
//! use serde::{Deserialize, Serialize};
//!
//! struct Greeting;
//!
//! #[derive(Deserialize)]
//! struct In { name: String }
//! #[derive(Serialize, Deserialize)]
//! struct Out { text: String }
//!
//! impl Resource for Greeting {
//!     type Inputs = In;
//!     type Outputs = Out;
//!     fn resource_type() -> ResourceType {
//!         ResourceType::new("greeting").required("name", "Who to greet").output("text", "")
//!     }
//!     async fn create(&self, op: &Operation, inputs: In) -> Result<Out, OperationError> {
//!         tracing::info!(name = %inputs.name, "composing a greeting");
//!         op.phase("writing").await;
//!         Ok(Out { text: format!("Hello, {}!", inputs.name) })
//!     }
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     Provider::new("greeter", env!("CARGO_PKG_VERSION")).resource(Greeting).serve()
//! }
//! ```

mod bridge;
mod command;
mod operation;
mod progress;
mod resource;
mod serve;
mod server;

use std::collections::HashMap;
use std::process::ExitCode;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

pub use capstan_schema::{
    ErrorKind, Level, LogStream, OperationError, OperationKind, ProviderInfo, TraceContext,
};
use futures::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

pub use bridge::ProgressLayer;
pub use command::{
    read_line_lossy, spawn_piped, stream_command, CommandOutput, LastLines, ProcessGroupGuard,
};
pub use operation::{Operation, Permit};
pub use resource::{Planned, Prior, Resource, ResourceType};
pub use serve::{Endpoint, ServeError, LISTEN_ENV};

/// Re-exported so provider code can name capabilities without depending on the schema crate.
pub use capstan_schema;
/// For `#[derive(JsonSchema)]` on inputs and outputs ([`ResourceType::inputs_from`]).
pub use schemars;

/// A provider: its name, version, resource types and limits. Build it, then [`serve`](Self::serve).
pub struct Provider {
    info: ProviderInfo,
    resources: HashMap<String, Rc<dyn resource::ErasedResource>>,
    cancel_grace: Duration,
    max_message_words: usize,
    at_exit: Option<AtExit>,
    on_configure: Option<OnConfigure>,
}

/// What [`Provider::on_configure`] runs.
pub(crate) type OnConfigure = Rc<dyn Fn(String) -> Result<(), OperationError>>;

/// What [`Provider::at_exit`] runs.
type AtExit = Box<dyn FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>>;

impl Provider {
    /// A provider with no resource types yet.
    pub fn new(name: impl Into<String>, version: impl Into<String>) -> Self {
        Provider {
            info: ProviderInfo {
                name: name.into(),
                version: version.into(),
                protocol: 0,
                min_protocol: capstan_schema::MIN_PROTOCOL_VERSION,
                max_protocol: capstan_schema::PROTOCOL_VERSION,
                resource_types: Vec::new(),
                max_concurrency: 0,
                // `build_call` takes a read's or delete's inputs from `previousInputs`.
                prior_inputs_once: true,
                // Said per connection, in `hello`, when the core offers a hub.
                opens_progress: false,
            },
            resources: HashMap::new(),
            cancel_grace: Duration::from_secs(5),
            max_message_words: capstan_schema::DEFAULT_MAX_MESSAGE_WORDS,
            at_exit: None,
            on_configure: None,
        }
    }

    /// Takes the settings the core hands over with `Provider.configure` (a JSON object's
    /// text), for a provider whose deployment settings are known only during the run. It is
    /// called before the first operation that needs them. An error is the core's to report.
    pub fn on_configure(
        mut self,
        f: impl Fn(String) -> Result<(), OperationError> + 'static,
    ) -> Self {
        self.on_configure = Some(Rc::new(f));
        self
    }

    /// Runs `f` when [`serve`](Self::serve) ends (the core disconnected or asked it to shut
    /// down, or a SIGTERM came), on the provider's runtime: for a provider that keeps
    /// processes of its own and must stop them in order.
    pub fn at_exit<F, Fut>(mut self, f: F) -> Self
    where
        F: FnOnce() -> Fut + 'static,
        Fut: std::future::Future<Output = ()> + 'static,
    {
        self.at_exit = Some(Box::new(move || Box::pin(f())));
        self
    }

    /// Adds a resource type.
    ///
    /// # Panics
    /// If a type of the same name was added before: that is a bug in the provider.
    pub fn resource<R: Resource>(mut self, resource: R) -> Self {
        let erased = resource::Erased::new(resource);
        let info = resource::ErasedResource::info(&erased).clone();
        assert!(
            !self.resources.contains_key(&info.name),
            "resource type `{}` added twice",
            info.name
        );
        self.resources.insert(info.name.clone(), Rc::new(erased));
        self.info.resource_types.push(info);
        self
    }

    /// Adds a resource type described at run time rather than by `R::resource_type()`: one
    /// implementation serving several types (a bridge to another protocol, for example).
    ///
    /// # Panics
    /// If a type of the same name was added before.
    pub fn resource_as<R: Resource>(mut self, resource: R, resource_type: ResourceType) -> Self {
        let erased = resource::Erased::with_type(resource, resource_type);
        let info = resource::ErasedResource::info(&erased).clone();
        assert!(
            !self.resources.contains_key(&info.name),
            "resource type `{}` added twice",
            info.name
        );
        self.resources.insert(info.name.clone(), Rc::new(erased));
        self.info.resource_types.push(info);
        self
    }

    /// At most `limit` operations run at once (0: no limit). Declared in the handshake, so
    /// the core respects it too.
    pub fn max_concurrency(mut self, limit: u32) -> Self {
        self.info.max_concurrency = limit;
        self
    }

    /// How long a cancelled operation may take to stop before its future is dropped.
    pub fn cancel_grace(mut self, grace: Duration) -> Self {
        self.cancel_grace = grace;
        self
    }

    /// The largest message accepted from the core, in 8-byte words.
    pub fn max_message_words(mut self, words: usize) -> Self {
        self.max_message_words = words;
        self
    }

    /// Overrides the protocol versions the provider claims to speak. For testing how the
    /// core handles incompatible providers; real providers never need it.
    #[doc(hidden)]
    pub fn protocol_range(mut self, min: u32, max: u32) -> Self {
        self.info.min_protocol = min;
        self.info.max_protocol = max;
        self
    }

    /// What the handshake will say.
    pub fn info(&self) -> &ProviderInfo {
        &self.info
    }

    fn into_server(self, shutdown: CancellationToken) -> (server::ProviderServer, usize) {
        let limit = (self.info.max_concurrency > 0).then(|| {
            Arc::new(tokio::sync::Semaphore::new(
                self.info.max_concurrency as usize,
            ))
        });
        let server = server::ProviderServer {
            on_configure: self.on_configure,
            info: self.info,
            resources: self.resources,
            limit,
            cancel_grace: self.cancel_grace,
            shutdown,
            hub: Rc::default(),
        };
        (server, self.max_message_words)
    }

    /// Serves the endpoint given by the environment (see [`Endpoint::from_env`]) until the
    /// core disconnects or a SIGTERM arrives. Sets up logging to stderr (`RUST_LOG`, default
    /// `info`) and the progress bridge unless a global `tracing` subscriber exists already.
    pub fn serve(self) -> ExitCode {
        redirect_and_init();
        match Endpoint::from_env() {
            Ok(endpoint) => self.serve_at(endpoint),
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        }
    }

    /// Serves a given endpoint; see [`serve`](Self::serve).
    pub fn serve_at(self, endpoint: Endpoint) -> ExitCode {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(e) => {
                eprintln!("cannot start the provider's runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
        self.serve_at_on(endpoint, runtime)
    }

    /// As [`serve`](Self::serve), on a current-thread `runtime` the provider already used
    /// (to start a process of its own before serving, say): what it spawned there lives on.
    pub fn serve_on(self, runtime: tokio::runtime::Runtime) -> ExitCode {
        redirect_and_init();
        match Endpoint::from_env() {
            Ok(endpoint) => self.serve_at_on(endpoint, runtime),
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        }
    }

    fn serve_at_on(mut self, endpoint: Endpoint, runtime: tokio::runtime::Runtime) -> ExitCode {
        redirect_and_init();
        // A host that accepts larger messages says so; take the larger limit.
        if let Some(words) = std::env::var(capstan_schema::MAX_MESSAGE_ENV)
            .ok()
            .and_then(|w| w.trim().parse::<usize>().ok())
        {
            self.max_message_words = self.max_message_words.max(words);
        }
        let local = tokio::task::LocalSet::new();
        let name = self.info.name.clone();
        let shutdown = CancellationToken::new();
        let at_exit = self.at_exit.take();
        let (server, max_words) = self.into_server(shutdown.clone());
        let result = local.block_on(&runtime, async {
            let result = serve::serve_endpoint(endpoint, server, max_words, shutdown).await;
            if let Some(at_exit) = at_exit {
                at_exit().await;
            }
            result
        });
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("provider `{name}`: {e}");
                ExitCode::FAILURE
            }
        }
    }

    /// Serves one connection on an existing byte stream until it closes, then runs what
    /// [`at_exit`](Self::at_exit) gave. For tests and for embedding a provider in another
    /// program; must run inside a `tokio::task::LocalSet`.
    pub async fn serve_stream<R, W>(mut self, reader: R, writer: W) -> Result<(), capnp::Error>
    where
        R: AsyncRead + Unpin + 'static,
        W: AsyncWrite + Unpin + 'static,
    {
        let at_exit = self.at_exit.take();
        let (server, max_words) = self.into_server(CancellationToken::new());
        let (client, connected) = server.connect();
        let result = serve::rpc_system(reader, writer, client, max_words).await;
        drop(connected);
        if let Some(at_exit) = at_exit {
            at_exit().await;
        }
        result
    }
}

/// The layer that carries `tracing` spans and events inside operations to the core. Add it to
/// your own subscriber if you install one before calling [`Provider::serve`].
pub fn progress_layer<S>() -> impl Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    ProgressLayer::new().with_filter(tracing_subscriber::filter::LevelFilter::DEBUG)
}

fn redirect_and_init() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        serve::redirect_stdout_to_stderr();
        let env = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        // Operation spans and what happens inside them go to the core, not to stderr.
        let outside_operations = tracing_subscriber::filter::dynamic_filter_fn(|meta, _| {
            meta.target() != bridge::ROOT_TARGET && !bridge::inside_operation()
        });
        let stderr = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .with_filter(tracing_subscriber::filter::FilterExt::and(
                env,
                outside_operations,
            ));
        // The debug chatter of the transport crates a provider may use for its own peers
        // (gRPC, HTTP/2, TLS) is not the operation's progress. (A `Targets` filter, so that
        // those call sites are switched off once, not checked at every event.)
        let not_transport_chatter = ["h2", "hyper", "hyper_util", "tower", "tonic", "rustls"]
            .into_iter()
            .fold(
                tracing_subscriber::filter::Targets::new()
                    .with_default(tracing::level_filters::LevelFilter::TRACE),
                |targets, t| targets.with_target(t, tracing::Level::INFO),
            );
        let _ = tracing_subscriber::registry()
            .with(progress_layer().with_filter(not_transport_chatter))
            .with(stderr)
            .try_init();
    });
}
