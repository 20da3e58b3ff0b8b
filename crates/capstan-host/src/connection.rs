//! A connection to one provider: handshake, concurrent operations, crash reporting, shutdown.

use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use capnp_rpc::rpc_twoparty_capnp::Side;
use capstan_schema::provider_capnp::{
    operation_request, operation_result, provider, resource_handle,
};
use capstan_schema::{OperationError, OperationKind, ProviderInfo, TraceContext};

use crate::Json;
use futures::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

use crate::error::{CallError, ExitDescription, LaunchError, OutputTail};
use crate::process::{ProviderCommand, ProviderLog, ProviderProcess, StopReport};
use crate::sink::{Hub, HubServer, ProgressObserver, SinkServer};

/// Where a provider comes from.
#[derive(Clone, Debug)]
pub enum ProviderSource {
    /// Start this executable, one process for the whole run.
    Command(ProviderCommand),
    /// Connect to a provider already listening at this Unix socket (a standing service),
    /// served by user `owner`, or (when `None`) by this user or root: a socket another user
    /// put there would be sent inputs, secrets among them, and run commands as that user.
    Socket { path: PathBuf, owner: Option<u32> },
}

/// Timeouts and limits for talking to providers.
#[derive(Clone, Debug)]
pub struct HostOptions {
    /// How long the handshake may take.
    pub handshake_timeout: Duration,
    /// After `shutdown`, how long a provider may take to exit before SIGTERM.
    pub shutdown_grace: Duration,
    /// After SIGTERM, how long before SIGKILL.
    pub term_grace: Duration,
    /// The largest message accepted from a provider, in 8-byte words; a larger one closes
    /// that provider's connection.
    pub max_message_words: usize,
    /// Bytes of `-> stream` calls the host may have in flight on one stream it sends (a
    /// provider's progress is limited by the provider's own window: its transport's).
    pub stream_window: usize,
    /// How many lines of a provider's output to keep for error messages.
    pub output_tail_lines: usize,
}

impl Default for HostOptions {
    fn default() -> Self {
        HostOptions {
            handshake_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(2),
            term_grace: Duration::from_secs(2),
            max_message_words: capstan_schema::DEFAULT_MAX_MESSAGE_WORDS,
            stream_window: 64 * 1024,
            output_tail_lines: 20,
        }
    }
}

/// One operation to run.
pub struct OperationCall {
    pub kind: OperationKind,
    pub resource_type: String,
    pub address: String,
    /// JSON text, as it goes on the wire.
    pub inputs: Json,
    pub previous_inputs: Option<Json>,
    pub previous_outputs: Option<Json>,
    /// Capabilities from other resources, by the name this resource knows them under.
    pub capabilities: Vec<(String, Handle)>,
    pub trace: TraceContext,
    /// Cancel the operation (the provider sees it) and fail after this long.
    pub timeout: Option<Duration>,
    /// Where the operation may submit children and borrow permits, served to the provider
    /// as its `Scheduler` capability (`None`: the field is left null, as an older core
    /// leaves it).
    pub scheduler: Option<std::rc::Rc<dyn crate::RunRequests>>,
}

impl OperationCall {
    /// A call with no previous state, capabilities or timeout.
    pub fn new(
        kind: OperationKind,
        resource_type: &str,
        address: &str,
        inputs: impl Into<Json>,
    ) -> Self {
        OperationCall {
            kind,
            resource_type: resource_type.to_string(),
            address: address.to_string(),
            inputs: inputs.into(),
            previous_inputs: None,
            previous_outputs: None,
            capabilities: Vec::new(),
            trace: TraceContext::random(),
            timeout: None,
            scheduler: None,
        }
    }
}

/// A successful operation.
pub struct OperationSuccess {
    /// The resource's outputs (a JSON object), as the provider sent them.
    pub outputs: Json,
    /// Capabilities the provider returned, by name; they stay valid while the connection to
    /// the provider that made them is open.
    pub capabilities: Vec<(String, Handle)>,
    /// The provider deleted the resource and made it anew to apply an update.
    pub replaced: bool,
}

/// A capability a provider returned for a resource it made (a `ResourceHandle`): kept by the
/// core and passed, as it is, to other operations that take it.
pub type Handle = resource_handle::Client;

/// A live connection to a provider.
pub struct ProviderConnection {
    name: String,
    info: ProviderInfo,
    client: provider::Client,
    process: Option<ProviderProcess>,
    /// Set to the reason once the RPC connection has ended.
    closed: watch::Receiver<Option<String>>,
    disconnector: Option<capnp_rpc::Disconnector<capnp_rpc::rpc_twoparty_capnp::Side>>,
    limit: Option<Arc<Semaphore>>,
    options: HostOptions,
    /// The operations running on the connection, for a provider that opens its sinks from
    /// the hub offered in `hello` (`info.opens_progress`).
    hub: Rc<Hub>,
}

/// How a provider was shut down.
#[derive(Clone, Debug, Default)]
pub struct ShutdownReport {
    /// Whether the provider acknowledged `shutdown` in time.
    pub acknowledged: bool,
    /// For a provider process: how it ended.
    pub process: Option<StopReport>,
}

struct Rpc {
    client: provider::Client,
    closed: watch::Receiver<Option<String>>,
    disconnector: capnp_rpc::Disconnector<Side>,
}

fn start_rpc<R, W>(reader: R, writer: W, options: &HostOptions) -> Rpc
where
    R: AsyncRead + Unpin + 'static,
    W: AsyncWrite + Unpin + 'static,
{
    let transport = capstan_transport::TransportOptions {
        max_message_words: options.max_message_words,
        stream_window: options.stream_window,
    };
    let mut system = capstan_transport::rpc_system(reader, writer, Side::Client, None, transport);
    let client: provider::Client = system.bootstrap(Side::Server);
    let disconnector = system.get_disconnector();
    let (closed_tx, closed) = watch::channel(None);
    tokio::task::spawn_local(async move {
        let reason = match system.await {
            Ok(()) => "the provider closed the connection".to_string(),
            Err(e) => e.to_string(),
        };
        let _ = closed_tx.send(Some(reason));
    });
    Rpc {
        client,
        closed,
        disconnector,
    }
}

impl ProviderConnection {
    /// Starts or connects to a provider and completes the handshake. Must run inside a
    /// `tokio::task::LocalSet`. `logs` receives what the provider writes outside operations.
    pub async fn launch(
        name: &str,
        source: &ProviderSource,
        options: HostOptions,
        logs: Option<mpsc::Sender<ProviderLog>>,
    ) -> Result<Self, LaunchError> {
        match source {
            ProviderSource::Command(command) => {
                let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(|source| {
                    LaunchError::Spawn {
                        provider: name.to_string(),
                        path: PathBuf::from(&command.program),
                        source,
                    }
                })?;
                // The provider reads messages up to the same limit (the SDK takes it from
                // here when it is larger than its own).
                let mut command = command.clone();
                command.env.push((
                    capstan_schema::MAX_MESSAGE_ENV.into(),
                    options.max_message_words.to_string().into(),
                ));
                let command = &command;
                let process = ProviderProcess::spawn(
                    name,
                    command,
                    theirs.into(),
                    logs,
                    options.output_tail_lines,
                )?;
                let stream = to_tokio(ours).map_err(|source| LaunchError::Spawn {
                    provider: name.to_string(),
                    path: PathBuf::from(&command.program),
                    source,
                })?;
                let (reader, writer) = stream.into_split();
                let rpc = start_rpc(reader.compat(), writer.compat_write(), &options);
                Self::handshake(name, rpc, Some(process), options).await
            }
            ProviderSource::Socket { path, owner } => {
                let stream = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(|source| LaunchError::Connect {
                        provider: name.to_string(),
                        socket: path.clone(),
                        source,
                    })?;
                check_peer(name, path, &stream, *owner)?;
                let (reader, writer) = stream.into_split();
                let rpc = start_rpc(reader.compat(), writer.compat_write(), &options);
                Self::handshake(name, rpc, None, options).await
            }
        }
    }

    /// Connects over an existing byte stream (in-memory tests, embedding).
    pub async fn from_stream<R, W>(
        name: &str,
        reader: R,
        writer: W,
        options: HostOptions,
    ) -> Result<Self, LaunchError>
    where
        R: AsyncRead + Unpin + 'static,
        W: AsyncWrite + Unpin + 'static,
    {
        let rpc = start_rpc(reader, writer, &options);
        Self::handshake(name, rpc, None, options).await
    }

    async fn handshake(
        name: &str,
        rpc: Rpc,
        process: Option<ProviderProcess>,
        options: HostOptions,
    ) -> Result<Self, LaunchError> {
        let ours = (
            capstan_schema::MIN_PROTOCOL_VERSION,
            capstan_schema::PROTOCOL_VERSION,
        );
        let hub = Rc::new(Hub::default());
        let mut request = rpc.client.hello_request();
        {
            let mut core = request.get().init_core();
            core.set_name("capstan");
            core.set_version(env!("CARGO_PKG_VERSION"));
            core.set_min_protocol(ours.0);
            core.set_max_protocol(ours.1);
            core.set_progress(capnp_rpc::new_client(HubServer(hub.clone())));
        }
        let hello = async {
            let response = request.send().promise.await?;
            ProviderInfo::read(response.get()?.get_provider()?)
        };
        let exited = async {
            match &process {
                Some(p) => p.exited().await,
                None => std::future::pending().await,
            }
        };
        let tail = || {
            process
                .as_ref()
                .map(|p| p.tail.snapshot())
                .unwrap_or_default()
        };
        let info = tokio::select! {
            result = tokio::time::timeout(options.handshake_timeout, hello) => result,
            _ = exited => {
                let p = process.as_ref().expect("only a process can exit");
                let (status, tail) = p.describe_exit(Duration::from_secs(1)).await;
                return Err(LaunchError::ExitedEarly { provider: name.to_string(), status, tail });
            }
        };
        let info = match info {
            Err(_) => {
                return Err(LaunchError::HandshakeTimeout {
                    provider: name.to_string(),
                    after: options.handshake_timeout,
                    tail: tail(),
                })
            }
            Ok(Err(e)) => {
                // A provider that died or spoke garbage: prefer the exit status if it ended.
                if let Some(p) = &process {
                    if let Some(status) = p.wait_exit(Duration::from_millis(500)).await {
                        p.wait_output(Duration::from_millis(250)).await;
                        return Err(LaunchError::ExitedEarly {
                            provider: name.to_string(),
                            status: ExitDescription::from_status(Some(status)),
                            tail: p.tail.snapshot(),
                        });
                    }
                }
                return Err(LaunchError::Protocol {
                    provider: name.to_string(),
                    message: e.to_string(),
                    tail: tail(),
                });
            }
            Ok(Ok(info)) => info,
        };
        if info.protocol == 0 || info.protocol < ours.0 || info.protocol > ours.1 {
            return Err(LaunchError::Incompatible {
                provider: name.to_string(),
                theirs: (info.min_protocol, info.max_protocol),
                ours,
            });
        }
        let limit = (info.max_concurrency > 0)
            .then(|| Arc::new(Semaphore::new(info.max_concurrency as usize)));
        Ok(ProviderConnection {
            name: name.to_string(),
            info,
            client: rpc.client,
            process,
            closed: rpc.closed,
            disconnector: Some(rpc.disconnector),
            limit,
            options,
            hub,
        })
    }

    /// The name the deployment gave this provider.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What the provider said in the handshake.
    pub fn info(&self) -> &ProviderInfo {
        &self.info
    }

    /// The provider process's id, if the host started it.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(|p| p.pid as u32)
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.closed.borrow().is_some()
    }

    /// Runs one operation; its progress goes to `observer` as it happens, all of it before
    /// this returns. Many calls may run at once; at most the provider's declared limit are
    /// sent at a time. Dropping the returned future cancels the operation in the provider.
    pub async fn call(
        &self,
        mut call: OperationCall,
        observer: Rc<dyn ProgressObserver>,
    ) -> Result<OperationSuccess, CallError> {
        if let (Some(previous), Some(info)) = (
            &call.previous_outputs,
            self.info.resource_type(&call.resource_type),
        ) {
            if let Some(kept) = without_unused_outputs(previous, info) {
                call.previous_outputs = Some(kept);
            }
        }
        let _permit = match &self.limit {
            Some(limit) => Some(limit.clone().acquire_owned().await.expect("never closed")),
            None => None,
        };
        if self.is_closed() {
            // Known not sent: whatever ended the provider, this operation did not start.
            let lost = self.connection_lost(&call.address).await;
            let why = match &lost {
                CallError::ProviderExited { status, .. } => status.to_string(),
                other => other
                    .to_string()
                    .trim_start_matches(&format!("{}: ", call.address))
                    .to_string(),
            };
            return Err(CallError::NotSent {
                provider: self.name.clone(),
                address: call.address,
                why,
            });
        }
        // A request over the provider's limit would close the connection (and every other
        // operation on it) without reaching the provider: refuse it here, known not sent.
        let len = |json: &Option<Json>| json.as_ref().map_or(0, |j| j.text().len() as u64);
        let bytes = if sends_inputs(&call, self.info.prior_inputs_once) {
            call.inputs.text().len() as u64
        } else {
            0
        } + len(&call.previous_inputs)
            + len(&call.previous_outputs)
            + 4096;
        let limit = self.options.max_message_words as u64 * 8;
        if bytes > limit {
            return Err(CallError::RequestTooLarge {
                provider: self.name.clone(),
                address: call.address,
                bytes,
                limit,
            });
        }
        // A provider that opens sinks from the hub gets a number, and a sink only if the
        // operation reports something; others get the sink with the request.
        let (progress, _running) = if self.info.opens_progress {
            let running = self.hub.register(observer);
            (Progress::Numbered(running.operation), Some(running))
        } else {
            (
                Progress::Sink(capnp_rpc::new_client(SinkServer { observer })),
                None,
            )
        };
        let address = call.address.clone();
        let timeout = call.timeout;
        let send = async {
            macro_rules! send {
                ($request:ident) => {{
                    let mut request = self.client.$request();
                    fill_request(
                        request.get().init_request(),
                        &call,
                        progress,
                        self.info.prior_inputs_once,
                    );
                    let response = request.send().promise.await?;
                    read_result(response.get()?.get_result()?)
                }};
            }
            match call.kind {
                OperationKind::Create => send!(create_request),
                OperationKind::Read => send!(read_request),
                OperationKind::Update => send!(update_request),
                OperationKind::Delete => send!(delete_request),
            }
        };
        let outcome = match timeout {
            Some(after) => match tokio::time::timeout(after, send).await {
                Ok(outcome) => outcome,
                Err(_) => {
                    return Err(CallError::Timeout {
                        provider: self.name.clone(),
                        address,
                        after,
                    })
                }
            },
            None => send.await,
        };
        match outcome {
            Ok(Ok(success)) => Ok(success),
            Ok(Err(error)) => Err(CallError::Failed { address, error }),
            Err(e) if e.kind == capnp::ErrorKind::Disconnected || self.is_closed() => {
                Err(self.connection_lost(&address).await)
            }
            Err(e) => Err(CallError::BadResponse {
                provider: self.name.clone(),
                address,
                message: e.to_string(),
            }),
        }
    }

    /// Hands the provider its settings for the run (`Provider.configure`): a JSON object's
    /// text. `Ok(false)` from a provider that takes none.
    pub async fn configure(&self, settings: &str) -> Result<bool, String> {
        if self.is_closed() {
            return Err(format!("provider `{}` is no longer running", self.name));
        }
        let mut request = self.client.configure_request();
        request.get().set_settings(settings);
        match request.send().promise.await {
            Ok(_) => Ok(true),
            Err(e) if e.kind == capnp::ErrorKind::Unimplemented => Ok(false),
            Err(e) => Err(format!(
                "provider `{}` refused its settings: {}",
                self.name, e.extra
            )),
        }
    }

    /// Asks the provider to plan `call` (a create, or an update with the previous inputs and
    /// outputs), for a type that declares `plansChanges`. `Ok(None)` from a provider without
    /// the method (an older one). Changes nothing, so it takes no concurrency slot.
    pub async fn plan(
        &self,
        call: &OperationCall,
    ) -> Result<Option<capstan_schema::ProviderPlan>, CallError> {
        if self.is_closed() {
            return Err(self.connection_lost(&call.address).await);
        }
        let mut request = self.client.plan_request();
        fill_request(
            request.get().init_request(),
            call,
            // No progress is expected from a plan: a provider that opens its sinks needs
            // none; an older one is given one that drops what comes.
            if self.info.opens_progress {
                Progress::Unexpected
            } else {
                Progress::Sink(capnp_rpc::new_client(SinkServer {
                    observer: crate::sink::ignore_progress(),
                }))
            },
            self.info.prior_inputs_once,
        );
        let send = async {
            let response = request.send().promise.await?;
            use capstan_schema::provider_capnp::plan_result::Which;
            match response.get()?.get_result()?.which() {
                Ok(Which::Planned(planned)) => {
                    Ok(Ok(capstan_schema::ProviderPlan::read(planned?)?))
                }
                Ok(Which::Failure(failure)) => Ok(Err(OperationError::read(failure?)?)),
                Err(_) => Err(capnp::Error::failed(
                    "the plan is of a kind this capstan does not know; upgrade capstan".into(),
                )),
            }
        };
        let outcome = match call.timeout {
            Some(after) => match tokio::time::timeout(after, send).await {
                Ok(outcome) => outcome,
                Err(_) => {
                    return Err(CallError::Timeout {
                        provider: self.name.clone(),
                        address: call.address.clone(),
                        after,
                    })
                }
            },
            None => send.await,
        };
        match outcome {
            Ok(Ok(plan)) => Ok(Some(plan)),
            Ok(Err(error)) => Err(CallError::Failed {
                address: call.address.clone(),
                error,
            }),
            Err(e) if e.kind == capnp::ErrorKind::Unimplemented => Ok(None),
            Err(e) if e.kind == capnp::ErrorKind::Disconnected || self.is_closed() => {
                Err(self.connection_lost(&call.address).await)
            }
            Err(e) => Err(CallError::BadResponse {
                provider: self.name.clone(),
                address: call.address.clone(),
                message: e.to_string(),
            }),
        }
    }

    /// The error for an operation whose provider went away: its exit status and last output
    /// if the host started it, else the connection's error.
    async fn connection_lost(&self, address: &str) -> CallError {
        // The connection's own error says first whether a message was over the limit (the
        // provider then exits cleanly, which would hide why).
        let reason = self.closed.borrow().clone().unwrap_or_default();
        if let Some(words) = too_large_words(&reason) {
            return CallError::ResponseTooLarge {
                provider: self.name.clone(),
                address: address.to_string(),
                bytes: words * 8,
                limit: self.options.max_message_words as u64 * 8,
            };
        }
        if let Some(process) = &self.process {
            let (status, tail) = process.describe_exit(Duration::from_secs(1)).await;
            if status != ExitDescription::Unknown {
                return CallError::ProviderExited {
                    provider: self.name.clone(),
                    address: address.to_string(),
                    status,
                    tail,
                };
            }
        }
        let mut closed = self.closed.clone();
        let reason = match tokio::time::timeout(
            Duration::from_millis(100),
            closed.wait_for(|c| c.is_some()),
        )
        .await
        {
            Ok(Ok(reason)) => reason.clone().unwrap_or_default(),
            _ => "the connection failed".to_string(),
        };
        CallError::Disconnected {
            provider: self.name.clone(),
            address: address.to_string(),
            reason,
        }
    }

    /// The last lines the provider process wrote.
    pub fn output_tail(&self) -> OutputTail {
        self.process
            .as_ref()
            .map(|p| p.tail.snapshot())
            .unwrap_or_default()
    }

    /// Stops the provider: asks it to shut down, closes the connection, then (for a process
    /// the host started) waits, sends SIGTERM, waits, sends SIGKILL.
    pub async fn shutdown(mut self) -> ShutdownReport {
        let mut report = ShutdownReport::default();
        // Only a provider this host started is asked to stop: a standing service (a socket
        // it connected to) serves other runs and clients too, and only this connection ends.
        if !self.is_closed() && self.process.is_some() {
            let polite = self.client.shutdown_request().send().promise;
            report.acknowledged = tokio::time::timeout(self.options.shutdown_grace, polite)
                .await
                .is_ok_and(|r| r.is_ok());
        }
        if let Some(disconnector) = self.disconnector.take() {
            let _ = tokio::time::timeout(self.options.shutdown_grace, disconnector).await;
        }
        if let Some(process) = &self.process {
            report.process = Some(
                process
                    .stop(
                        &self.name,
                        self.options.shutdown_grace,
                        self.options.term_grace,
                    )
                    .await,
            );
        }
        report
    }
}

fn to_tokio(stream: std::os::unix::net::UnixStream) -> std::io::Result<tokio::net::UnixStream> {
    stream.set_nonblocking(true)?;
    tokio::net::UnixStream::from_std(stream)
}

/// `previous` without the outputs its type never reads back (`priorUnused`), if it has any.
fn without_unused_outputs(
    previous: &Json,
    info: &capstan_schema::info::ResourceTypeInfo,
) -> Option<Json> {
    let unused: Vec<&str> = info
        .outputs
        .iter()
        .filter(|o| o.prior_unused)
        .map(|o| o.name.as_str())
        .collect();
    if unused.is_empty() {
        return None;
    }
    let serde_json::Value::Object(mut outputs) = serde_json::from_str(previous.text()).ok()? else {
        return None;
    };
    let before = outputs.len();
    outputs.retain(|name, _| !unused.contains(&name.as_str()));
    (outputs.len() != before).then(|| serde_json::Value::Object(outputs).into())
}

/// Whether `call` carries `inputs`: a read's or delete's inputs are its previous ones, sent
/// once to a provider that says it reads them there (`priorInputsOnce`).
fn sends_inputs(call: &OperationCall, prior_inputs_once: bool) -> bool {
    !(prior_inputs_once
        && matches!(call.kind, OperationKind::Read | OperationKind::Delete)
        && call.previous_inputs.is_some())
}

/// How a request tells the provider where its progress goes.
enum Progress {
    Sink(capstan_schema::progress_capnp::progress_sink::Client),
    /// Its number, to open a sink from the connection's hub.
    Numbered(u64),
    /// Neither: a plan, to a provider that opens sinks (no progress is expected).
    Unexpected,
}

fn fill_request(
    mut builder: operation_request::Builder<'_>,
    call: &OperationCall,
    progress: Progress,
    prior_inputs_once: bool,
) {
    builder.set_resource_type(&call.resource_type[..]);
    builder.set_address(&call.address[..]);
    if sends_inputs(call, prior_inputs_once) {
        builder.set_inputs(call.inputs.text());
    }
    if let Some(previous) = &call.previous_inputs {
        builder.set_previous_inputs(previous.text());
    }
    if let Some(previous) = &call.previous_outputs {
        builder.set_previous_outputs(previous.text());
    }
    match progress {
        Progress::Sink(sink) => builder.set_progress(sink),
        Progress::Numbered(operation) => builder.set_operation(operation),
        Progress::Unexpected => {}
    }
    if let Some(requests) = &call.scheduler {
        builder.set_scheduler(crate::scheduler::scheduler_client(requests.clone()));
    }
    // This host takes the result as the end of a stream nothing was pushed into.
    builder.set_silent_finish_optional(true);
    call.trace.write(builder.reborrow().init_trace());
    let mut caps = builder.init_capabilities(call.capabilities.len() as u32);
    for (n, (name, client)) in call.capabilities.iter().enumerate() {
        let mut entry = caps.reborrow().get(n as u32);
        entry.set_name(&name[..]);
        entry.set_handle(client.clone());
    }
}

fn read_result(
    reader: operation_result::Reader<'_>,
) -> capnp::Result<Result<OperationSuccess, OperationError>> {
    use operation_result::Which;
    match reader.which() {
        Ok(Which::Success(success)) => {
            let success = success?;
            let text = success.get_outputs()?.to_str()?;
            let outputs = if text.trim().is_empty() {
                Json::empty_object()
            } else {
                Json::from_text(text)
                    .map_err(|e| capnp::Error::failed(format!("outputs are not valid JSON: {e}")))?
            };
            let mut capabilities = Vec::new();
            for named in success.get_capabilities()? {
                capabilities.push((named.get_name()?.to_string()?, named.get_handle()?));
            }
            Ok(Ok(OperationSuccess {
                outputs,
                capabilities,
                replaced: success.get_replaced(),
            }))
        }
        Ok(Which::Failure(failure)) => Ok(Err(OperationError::read(failure?)?)),
        Err(_) => Err(capnp::Error::failed(
            "the result is of a kind this capstan does not know; upgrade capstan".into(),
        )),
    }
}

/// Asks a handle what it refers to: `(kind, address, summary)`.
pub async fn describe_handle(
    handle: &resource_handle::Client,
) -> Result<(String, String, String), capnp::Error> {
    let response = handle.describe_request().send().promise.await?;
    let info = response.get()?.get_info()?;
    Ok((
        info.get_kind()?.to_string()?,
        info.get_address()?.to_string()?,
        info.get_summary()?.to_string()?,
    ))
}

impl ProviderConnection {
    /// Repeats the handshake call and returns how long it took; a bare round trip through the
    /// same connection, used by the benchmark as the protocol's floor.
    #[doc(hidden)]
    pub async fn ping(&self) -> Result<Duration, capnp::Error> {
        let start = std::time::Instant::now();
        let mut request = self.client.hello_request();
        {
            let mut core = request.get().init_core();
            core.set_min_protocol(capstan_schema::MIN_PROTOCOL_VERSION);
            core.set_max_protocol(capstan_schema::PROTOCOL_VERSION);
        }
        request.send().promise.await?;
        Ok(start.elapsed())
    }
}

/// The size in words of a message capnp refused as too large ("Message has N words, which is
/// too large"), from a connection's error.
fn too_large_words(reason: &str) -> Option<u64> {
    let at = reason.find("Message has ")? + "Message has ".len();
    let rest = &reason[at..];
    if !rest.contains("which is too large") {
        return None;
    }
    rest.split_whitespace().next()?.parse().ok()
}

/// Refuses a socket served by anyone but `owner` (by default: this user or root), as the
/// kernel reports the process at its other end (`SO_PEERCRED`).
fn check_peer(
    name: &str,
    path: &std::path::Path,
    stream: &tokio::net::UnixStream,
    owner: Option<u32>,
) -> Result<(), LaunchError> {
    let untrusted = |uid: Option<u32>| LaunchError::UntrustedSocket {
        provider: name.to_string(),
        socket: path.to_path_buf(),
        served_by: uid.map_or_else(
            || "a process whose user cannot be told".to_string(),
            capstan_process::describe_user,
        ),
        expected: match (owner, capstan_process::own_uid()) {
            (Some(uid), _) => capstan_process::describe_user(uid),
            (None, 0) => capstan_process::describe_user(0),
            (None, me) => format!("{} or root", capstan_process::describe_user(me)),
        },
        owner_hint: uid.map_or_else(
            || "USER".to_string(),
            |uid| match capstan_process::user_name(uid) {
                Some(name) => format!("\"{name}\""),
                None => uid.to_string(),
            },
        ),
    };
    let uid = stream.peer_cred().map_err(|_| untrusted(None))?.uid();
    let trusted = match owner {
        Some(expected) => uid == expected,
        None => uid == capstan_process::own_uid() || uid == 0,
    };
    if trusted {
        Ok(())
    } else {
        Err(untrusted(Some(uid)))
    }
}
