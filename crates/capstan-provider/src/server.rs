//! The `Provider` capability: reads each request, runs the resource's method in its own task,
//! and writes the result. Everything that can go wrong in provider code (bad JSON, a panic, a
//! cancelled call) becomes an `OperationError` in the result; the RPC connection never sees it.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use capnp::capability::Rc as CapRc;
use capstan_schema::info::negotiate_protocol;
use capstan_schema::progress_capnp::{progress_hub, progress_sink};
use capstan_schema::provider_capnp::{
    operation_request, operation_result, provider, resource_handle,
};
use capstan_schema::{OperationError, ProviderInfo, TraceContext};
use futures::FutureExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::operation::Operation;
use crate::progress::{finish_unstarted, pump, Gated, ProgressQueue, SinkSource};
use crate::resource::{Call, ErasedResource};
use capstan_schema::OperationKind;

/// One connection's `Provider`: every connection gets its own (see [`ProviderServer::connect`]),
/// sharing the resources, the concurrency limit and the shutdown token.
#[derive(Clone)]
pub(crate) struct ProviderServer {
    pub(crate) info: ProviderInfo,
    pub(crate) resources: HashMap<String, Rc<dyn ErasedResource>>,
    pub(crate) limit: Option<Arc<Semaphore>>,
    /// Takes settings from `Provider.configure` (none: the method is unimplemented).
    pub(crate) on_configure: Option<crate::OnConfigure>,
    pub(crate) cancel_grace: Duration,
    /// Fires on `shutdown()` (or SIGTERM): every operation's token is a child of it.
    pub(crate) shutdown: CancellationToken,
    /// Where this connection's operations open their progress sinks: set by a `hello` that
    /// offered one (`CoreInfo.progress`), after which requests carry no sink.
    pub(crate) hub: Rc<RefCell<Option<progress_hub::Client>>>,
}

impl ProviderServer {
    /// A `Provider` capability for one more connection: the same provider, with a progress
    /// hub of its own (a hub belongs to the connection that offered it). Keep the returned
    /// [`Connected`] until the connection has ended.
    pub(crate) fn connect(&self) -> (provider::Client, Connected) {
        let mut server = self.clone();
        server.hub = Rc::default();
        let connected = Connected(server.hub.clone());
        (capnp_rpc::new_client(server), connected)
    }
}

/// One connection's hold on its progress hub; dropped when the connection has ended, it lets
/// the hub go. Without it the connection would never be freed: its state holds this
/// `Provider` (the bootstrap capability, kept to the end), which held the hub, a capability
/// that holds the connection's state.
pub(crate) struct Connected(Rc<RefCell<Option<progress_hub::Client>>>);

impl Drop for Connected {
    fn drop(&mut self) {
        self.0.borrow_mut().take();
    }
}

/// A request read off the wire into owned values.
struct Request {
    resource_type: String,
    address: String,
    inputs: String,
    previous_inputs: String,
    previous_outputs: String,
    /// The sink the request carried; none when the core numbers requests for its hub.
    progress: Option<progress_sink::Client>,
    /// The number to open the sink with from the hub (0: the request carried its sink).
    operation: u64,
    /// The core does not need `finish()` when nothing was pushed.
    silent_finish_optional: bool,
    trace: TraceContext,
    capabilities: Vec<(String, resource_handle::Client)>,
    /// Null from a core that does not offer children and permits.
    scheduler: Option<capstan_schema::provider_capnp::scheduler::Client>,
}

impl Request {
    fn read(reader: operation_request::Reader<'_>) -> capnp::Result<Self> {
        let mut capabilities = Vec::new();
        for named in reader.get_capabilities()? {
            capabilities.push((named.get_name()?.to_string()?, named.get_handle()?));
        }
        Ok(Request {
            resource_type: reader.get_resource_type()?.to_string()?,
            address: reader.get_address()?.to_string()?,
            inputs: reader.get_inputs()?.to_string()?,
            previous_inputs: reader.get_previous_inputs()?.to_string()?,
            previous_outputs: reader.get_previous_outputs()?.to_string()?,
            progress: if reader.has_progress() {
                Some(reader.get_progress()?)
            } else {
                None
            },
            operation: reader.get_operation(),
            silent_finish_optional: reader.get_silent_finish_optional(),
            trace: TraceContext::read(reader.get_trace()?),
            capabilities,
            scheduler: if reader.has_scheduler() {
                reader.get_scheduler().ok()
            } else {
                None
            },
        })
    }
}

struct Success {
    /// JSON text.
    outputs: String,
    capabilities: Vec<(String, resource_handle::Client)>,
    replaced: bool,
}

/// The call for `kind`, taking the request's JSON texts (read into the resource's types only
/// inside the operation, which says what does not fit). A read, update or delete without
/// recorded inputs (an older core) takes its new inputs as the prior ones.
fn build_call(kind: OperationKind, request: &mut Request) -> Call {
    let inputs = std::mem::take(&mut request.inputs);
    let mut prior = |inputs: &str| {
        let prior_inputs = match std::mem::take(&mut request.previous_inputs) {
            prior if prior.trim().is_empty() => inputs.to_string(),
            prior => prior,
        };
        (prior_inputs, std::mem::take(&mut request.previous_outputs))
    };
    match kind {
        OperationKind::Create => Call::Create { inputs },
        OperationKind::Read => {
            let (prior_inputs, prior_outputs) = prior(&inputs);
            Call::Read {
                prior_inputs,
                prior_outputs,
            }
        }
        OperationKind::Update => {
            let (prior_inputs, prior_outputs) = prior(&inputs);
            Call::Update {
                prior_inputs,
                prior_outputs,
                inputs,
            }
        }
        OperationKind::Delete => {
            let (prior_inputs, prior_outputs) = prior(&inputs);
            Call::Delete {
                prior_inputs,
                prior_outputs,
            }
        }
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(a panic without a message)".to_string())
}

impl ProviderServer {
    async fn run(
        &self,
        kind: OperationKind,
        mut request: Request,
    ) -> Result<Success, OperationError> {
        let hub = self.hub.borrow().clone();
        let source = match (request.progress.take(), hub) {
            (Some(sink), _) => SinkSource::Given(sink),
            (None, Some(hub)) if request.operation != 0 => SinkSource::Hub {
                hub,
                operation: request.operation,
            },
            _ => {
                return Err(OperationError::invalid_input(format!(
                    "malformed {} request: no progress sink, and no operation number to open \
                     one from the core's hub",
                    kind.as_str()
                )))
            }
        };
        let found = self.resources.get(&request.resource_type).cloned();
        let Some(resource) = found else {
            let mut known: Vec<&str> = self.resources.keys().map(|k| k.as_str()).collect();
            known.sort();
            let refused = OperationError::invalid_input(format!(
                "provider `{}` has no resource type `{}` (it serves: {})",
                self.info.name,
                request.resource_type,
                known.join(", ")
            ));
            // Refused before it ran, but its stream is ended like any other's.
            finish_unstarted(source, request.silent_finish_optional).await;
            return Err(refused);
        };
        let call = build_call(kind, &mut request);
        let permit = match &self.limit {
            Some(limit) => Some(limit.clone().acquire_owned().await.expect("never closed")),
            None => None,
        };
        if self.shutdown.is_cancelled() {
            finish_unstarted(source, request.silent_finish_optional).await;
            return Err(OperationError::cancelled(format!(
                "provider `{}` is shutting down",
                self.info.name
            )));
        }

        let queue = Arc::new(ProgressQueue::new());
        let silent_finish_optional = request.silent_finish_optional;
        let cancel = self.shutdown.child_token();
        let op = Operation {
            kind,
            resource_type: request.resource_type,
            address: request.address,
            trace: request.trace,
            cancel: cancel.clone(),
            queue: queue.clone(),
            capabilities: request.capabilities,
            returned: RefCell::new(Vec::new()),
            scheduler: request.scheduler,
            replaced: std::cell::Cell::new(false),
        };
        let grace = self.cancel_grace;
        let root_span = crate::bridge::root_span(queue.clone());
        let work = async move {
            // The concurrency slot belongs to the work, which may outlive a cancelled call by
            // its grace period.
            let _permit = permit;
            let method = async {
                let outputs = resource.call(&op, call).await?;
                Ok(Success {
                    outputs,
                    capabilities: op.take_returned(),
                    replaced: op.replaced.get(),
                })
            };
            let deadline = async {
                op.cancel.cancelled().await;
                tokio::time::sleep(grace).await;
            };
            tokio::select! {
                result = method => result,
                () = deadline => Err(OperationError::cancelled(format!(
                    "{} `{}` was cancelled and did not stop within {grace:?}",
                    op.resource_type, op.address
                ))),
            }
        }
        .instrument(root_span);
        let task = tokio::task::spawn_local(Gated::new(work.boxed_local(), queue.clone()));

        // If the core drops this call, this future is dropped: tell the operation, and stop
        // holding it back for progress nobody will read.
        let mut on_drop = CancelOnDrop {
            cancel,
            queue: queue.clone(),
            armed: true,
        };
        // The pump runs beside the operation in this future rather than in a task of its own.
        let (outcome, pumped) = futures::join!(
            async {
                let outcome = task.await;
                queue.close();
                outcome
            },
            pump(queue.clone(), source, silent_finish_optional)
        );
        on_drop.armed = false;
        if let Err(e) = pumped {
            tracing::warn!("progress stream failed: {e}");
        }

        let result = match outcome {
            Ok(result) => result,
            Err(e) if e.is_panic() => Err(OperationError::internal(format!(
                "provider `{}` panicked during {}: {}",
                self.info.name,
                kind.as_str(),
                panic_message(e.into_panic())
            ))),
            Err(_) => Err(OperationError::cancelled(
                "the operation's task was aborted",
            )),
        };
        result
    }

    /// `plan` for one request: no progress, no concurrency slot (a plan changes nothing and
    /// is quick); a panic is an internal error, never the connection's end.
    async fn plan_one(
        &self,
        request: Request,
    ) -> Result<capstan_schema::ProviderPlan, OperationError> {
        let resource = self
            .resources
            .get(&request.resource_type)
            .cloned()
            .ok_or_else(|| {
                OperationError::invalid_input(format!(
                    "provider `{}` has no resource type `{}`",
                    self.info.name, request.resource_type
                ))
            })?;
        if !resource.info().plans_changes && !resource.info().checks_inputs {
            return Err(OperationError::permanent(format!(
                "provider `{}` does not plan `{}` changes (it does not declare plansChanges)",
                self.info.name, request.resource_type
            )));
        }
        let prior = (!matches!(request.previous_outputs.trim(), "" | "null")).then(|| {
            (
                request.previous_inputs.clone(),
                request.previous_outputs.clone(),
            )
        });
        let planned = std::panic::AssertUnwindSafe(resource.plan(
            &request.address,
            prior,
            request.inputs.clone(),
        ))
        .catch_unwind()
        .await;
        match planned {
            Ok(result) => result,
            Err(panic) => Err(OperationError::internal(format!(
                "provider `{}` panicked while planning: {}",
                self.info.name,
                panic_message(panic)
            ))),
        }
    }

    async fn operation(
        &self,
        kind: OperationKind,
        request: capnp::Result<operation_request::Reader<'_>>,
        results: operation_result::Builder<'_>,
    ) -> Result<(), capnp::Error> {
        let outcome = match request.and_then(Request::read) {
            Ok(request) => self.run(kind, request).await,
            Err(e) => Err(OperationError::invalid_input(format!(
                "malformed {} request: {e}",
                kind.as_str()
            ))),
        };
        match outcome {
            Ok(success) => {
                let mut s = results.init_success();
                s.set_outputs(&success.outputs[..]);
                s.set_replaced(success.replaced);
                let mut caps = s.init_capabilities(success.capabilities.len() as u32);
                for (n, (name, client)) in success.capabilities.into_iter().enumerate() {
                    let mut entry = caps.reborrow().get(n as u32);
                    entry.set_name(&name[..]);
                    entry.set_handle(client);
                }
            }
            Err(error) => error.write(results.init_failure()),
        }
        Ok(())
    }
}

/// Fires an operation's cancellation when the call that runs it is dropped.
struct CancelOnDrop {
    cancel: CancellationToken,
    queue: Arc<ProgressQueue>,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.armed {
            self.cancel.cancel();
            self.queue.close();
        }
    }
}

/// Generates the four operation methods, which differ only in their kind and types.
macro_rules! operation_methods {
    ($($method:ident => $kind:ident, $params:ident, $results:ident;)*) => {$(
        async fn $method(
            self: CapRc<Self>,
            params: provider::$params,
            mut results: provider::$results,
        ) -> Result<(), capnp::Error> {
            let params = params.get()?;
            self.operation(
                OperationKind::$kind,
                params.get_request(),
                results.get().init_result(),
            )
            .await
        }
    )*};
}

impl provider::Server for ProviderServer {
    async fn hello(
        self: CapRc<Self>,
        params: provider::HelloParams,
        mut results: provider::HelloResults,
    ) -> Result<(), capnp::Error> {
        let core = params.get()?.get_core()?;
        if core.has_progress() {
            *self.hub.borrow_mut() = Some(core.get_progress()?);
        }
        let mut info = self.info.clone();
        info.opens_progress = self.hub.borrow().is_some();
        info.protocol = negotiate_protocol(
            (info.min_protocol, info.max_protocol),
            (core.get_min_protocol(), core.get_max_protocol()),
        )
        .unwrap_or(0);
        info.write(results.get().init_provider());
        Ok(())
    }

    operation_methods! {
        create => Create, CreateParams, CreateResults;
        read => Read, ReadParams, ReadResults;
        update => Update, UpdateParams, UpdateResults;
        delete => Delete, DeleteParams, DeleteResults;
    }

    async fn configure(
        self: CapRc<Self>,
        params: provider::ConfigureParams,
        _results: provider::ConfigureResults,
    ) -> Result<(), capnp::Error> {
        let Some(on_configure) = self.on_configure.clone() else {
            return Err(capnp::Error::unimplemented(format!(
                "provider `{}` takes no settings",
                self.info.name
            )));
        };
        let settings = params.get()?.get_settings()?.to_string()?;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| on_configure(settings))) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(capnp::Error::failed(e.message)),
            Err(panic) => Err(capnp::Error::failed(format!(
                "provider `{}` panicked taking its settings: {}",
                self.info.name,
                panic_message(panic)
            ))),
        }
    }

    async fn plan(
        self: CapRc<Self>,
        params: provider::PlanParams,
        mut results: provider::PlanResults,
    ) -> Result<(), capnp::Error> {
        let planned = match params
            .get()
            .and_then(|p| p.get_request())
            .and_then(Request::read)
        {
            Ok(request) => self.plan_one(request).await,
            Err(e) => Err(OperationError::invalid_input(format!(
                "malformed plan request: {e}"
            ))),
        };
        let result = results.get().init_result();
        match planned {
            Ok(planned) => planned.write(result.init_planned()),
            Err(error) => error.write(result.init_failure()),
        }
        Ok(())
    }

    async fn shutdown(
        self: CapRc<Self>,
        _params: provider::ShutdownParams,
        _results: provider::ShutdownResults,
    ) -> Result<(), capnp::Error> {
        tracing::debug!("shutdown requested by the core");
        self.shutdown.cancel();
        Ok(())
    }
}

/// A handle with fixed information, made by [`Operation::return_handle`].
pub(crate) struct HandleServer {
    kind: String,
    address: String,
    summary: String,
}

impl HandleServer {
    pub(crate) fn client(
        kind: String,
        address: String,
        summary: String,
    ) -> resource_handle::Client {
        capnp_rpc::new_client(HandleServer {
            kind,
            address,
            summary,
        })
    }
}

impl resource_handle::Server for HandleServer {
    async fn describe(
        self: CapRc<Self>,
        _params: resource_handle::DescribeParams,
        mut results: resource_handle::DescribeResults,
    ) -> Result<(), capnp::Error> {
        let mut info = results.get().init_info();
        info.set_kind(&self.kind[..]);
        info.set_address(&self.address[..]);
        info.set_summary(&self.summary[..]);
        Ok(())
    }
}
