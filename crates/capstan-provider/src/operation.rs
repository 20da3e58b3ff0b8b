//! The context a resource method receives: who it is working for, how to report progress, how
//! to notice cancellation, and the capabilities that flow in and out.

use std::cell::RefCell;
use std::sync::Arc;

use capstan_schema::provider_capnp::{permit, resource_handle, scheduler};
use capstan_schema::OperationError;
use capstan_schema::{Level, LogStream, OperationKind, ProgressEvent, ProgressKind, TraceContext};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use crate::bridge;
use crate::progress::ProgressQueue;
use crate::server::HandleServer;

/// One running operation. Progress reported here (and through `tracing` inside the method)
/// appears in the user's live view and JSON stream, under this resource.
pub struct Operation {
    pub(crate) kind: OperationKind,
    pub(crate) resource_type: String,
    pub(crate) address: String,
    pub(crate) trace: TraceContext,
    pub(crate) cancel: CancellationToken,
    pub(crate) queue: Arc<ProgressQueue>,
    pub(crate) capabilities: Vec<(String, resource_handle::Client)>,
    pub(crate) returned: RefCell<Vec<(String, resource_handle::Client)>>,
    pub(crate) scheduler: Option<scheduler::Client>,
    /// Set by [`Operation::replaced`].
    pub(crate) replaced: std::cell::Cell<bool>,
}

/// A share of the run's concurrency lent to the provider (see [`Operation::permit`]). The slot
/// goes back when this is dropped (or [`release`](Permit::release)d).
pub struct Permit {
    client: Option<permit::Client>,
}

impl Permit {
    /// Gives the slot back now, and waits until the core has it.
    pub async fn release(mut self) -> Result<(), OperationError> {
        if let Some(client) = self.client.take() {
            client
                .release_request()
                .send()
                .promise
                .await
                .map_err(|e| OperationError::transient(format!("releasing a permit: {e}")))?;
        }
        Ok(())
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        // Dropping the client releases the capability; the core gives the slot back then.
        self.client.take();
    }
}

impl Operation {
    /// Create, read, update or delete.
    pub fn kind(&self) -> OperationKind {
        self.kind
    }

    /// The resource type being operated on.
    pub fn resource_type(&self) -> &str {
        &self.resource_type
    }

    /// The resource's address in the deployment, e.g. `web.db`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The core's trace context for this operation (W3C-compatible).
    pub fn trace(&self) -> TraceContext {
        self.trace
    }

    /// Resolves when the core cancels the operation (or the provider is shutting down).
    pub fn cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.cancel.cancelled()
    }

    /// Whether the operation has been cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    fn scheduler(&self) -> Result<&scheduler::Client, OperationError> {
        self.scheduler.as_ref().ok_or_else(|| {
            OperationError::permanent(
                "this core offers no scheduler (children and permits need a newer capstan)",
            )
        })
    }

    /// Runs a child resource through the core and waits for it: the core schedules it like
    /// any resource (under `--jobs` and its provider's limit; shown and recorded as
    /// `<this address>/<name>`), and returns its outputs, or why it failed — the parent
    /// decides what that means. `provider`: a provider of the deployment, `None` for this
    /// one. Children are deleted with their parent and cancelled when it is.
    pub async fn child(
        &self,
        name: &str,
        provider: Option<&str>,
        resource_type: &str,
        inputs: &serde_json::Value,
    ) -> Result<serde_json::Value, OperationError> {
        let mut request = self.scheduler()?.child_request();
        {
            let mut child = request.get().init_request();
            child.set_name(name);
            child.set_provider(provider.unwrap_or(""));
            child.set_resource_type(resource_type);
            child.set_inputs(&inputs.to_string()[..]);
        }
        let lost = |e: capnp::Error| OperationError::transient(format!("child `{name}`: {e}"));
        let response = request.send().promise.await.map_err(lost)?;
        let result = response.get().and_then(|r| r.get_result()).map_err(lost)?;
        use capstan_schema::provider_capnp::operation_result::Which;
        match result.which() {
            Ok(Which::Success(success)) => {
                let text = success
                    .and_then(|s| s.get_outputs())
                    .and_then(|t| Ok(t.to_str()?.to_string()))
                    .map_err(lost)?;
                if text.trim().is_empty() {
                    return Ok(serde_json::Value::Object(Default::default()));
                }
                serde_json::from_str(&text).map_err(|e| {
                    OperationError::internal(format!("child `{name}`: outputs are not JSON: {e}"))
                })
            }
            Ok(Which::Failure(failure)) => {
                Err(failure.and_then(OperationError::read).unwrap_or_else(lost))
            }
            Err(_) => Err(OperationError::permanent(format!(
                "child `{name}`: a result this provider does not know; upgrade it"
            ))),
        }
    }

    /// Borrows one of the run's `--jobs` slots for work this provider runs itself (a build, a
    /// machine), waiting until one is free: the deployment's limit then bounds that work too.
    /// The operation's own slot is lent to its first permit at a time, so this never waits on
    /// itself. Dropping the permit gives the slot back. Do not hold one while waiting on a
    /// [`child`](Self::child): the child may need that very slot.
    pub async fn permit(&self) -> Result<Permit, OperationError> {
        let response = self
            .scheduler()?
            .permit_request()
            .send()
            .promise
            .await
            .map_err(|e| OperationError::transient(format!("asking for a permit: {e}")))?;
        let client = response
            .get()
            .and_then(|r| r.get_permit())
            .map_err(|e| OperationError::transient(format!("asking for a permit: {e}")))?;
        Ok(Permit {
            client: Some(client),
        })
    }

    /// A token that fires on cancellation, for tasks the operation spawns.
    pub fn cancellation_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    async fn report(&self, kind: impl FnOnce(u64) -> ProgressKind) {
        self.queue.space().await;
        let span = bridge::current_span_of(&self.queue);
        self.queue.push(ProgressEvent::now(kind(span)));
    }

    /// Reports one line of output (from a command the operation runs, say), under the
    /// current span. Waits while the core is behind.
    pub async fn log(&self, stream: LogStream, line: impl Into<String>) {
        let line = line.into();
        self.report(|span| ProgressKind::Log { span, stream, line })
            .await
    }

    /// Reports an event of the operation at `level`, under the current span: what
    /// `tracing::info!` and its kin inside an operation report, without going through a
    /// `tracing` subscriber (a provider served inside another program has none of its own).
    pub async fn event(&self, level: Level, message: impl Into<String>) {
        let message = message.into();
        self.report(|span| ProgressKind::Event {
            span,
            level,
            message,
            target: String::new(),
            fields: Vec::new(),
        })
        .await
    }

    /// Reports how far along the current span is: `done` of `expected` (0 if not known yet)
    /// units, e.g. `op.progress(3, 10, "paths")`.
    pub async fn progress(&self, done: u64, expected: u64, unit: &str) {
        let unit = unit.to_string();
        self.report(|span| ProgressKind::Counter {
            span,
            done,
            expected,
            unit,
        })
        .await
    }

    /// Reports that the current span entered a new phase, e.g. "building".
    pub async fn phase(&self, name: impl Into<String>) {
        let name = name.into();
        self.report(|span| ProgressKind::Phase { span, name }).await
    }

    /// Like [`log`](Self::log), under `span` instead of the current span: for code that keeps
    /// spans of its own (a translator of another tool's activity tree, for example).
    pub async fn log_in(&self, span: &tracing::Span, stream: LogStream, line: impl Into<String>) {
        let line = line.into();
        self.queue.space().await;
        let span = bridge::span_of(&self.queue, span);
        self.queue
            .push(ProgressEvent::now(ProgressKind::Log { span, stream, line }));
    }

    /// Like [`progress`](Self::progress), under `span`.
    pub async fn progress_in(&self, span: &tracing::Span, done: u64, expected: u64, unit: &str) {
        self.queue.space().await;
        let span = bridge::span_of(&self.queue, span);
        self.queue.push(ProgressEvent::now(ProgressKind::Counter {
            span,
            done,
            expected,
            unit: unit.to_string(),
        }));
    }

    /// Like [`phase`](Self::phase), under `span`.
    pub async fn phase_in(&self, span: &tracing::Span, name: impl Into<String>) {
        let name = name.into();
        self.queue.space().await;
        let span = bridge::span_of(&self.queue, span);
        self.queue
            .push(ProgressEvent::now(ProgressKind::Phase { span, name }));
    }

    /// Waits until the core has caught up with this operation's progress. A loop that reports
    /// through `tracing` without awaiting anything else can call this to stay flow-controlled.
    pub async fn ready(&self) {
        self.queue.space().await
    }

    /// The capability another resource handed to this one under `name`, if any.
    pub fn capability(&self, name: &str) -> Option<&resource_handle::Client> {
        self.capabilities
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, c)| c)
    }

    /// All capabilities handed to this operation, by name.
    pub fn capabilities(&self) -> &[(String, resource_handle::Client)] {
        &self.capabilities
    }

    /// Returns a capability with the operation's result; the core keeps it for the run and
    /// can pass it to other resources.
    pub fn return_capability(&self, name: impl Into<String>, handle: resource_handle::Client) {
        self.returned.borrow_mut().push((name.into(), handle));
    }

    /// Returns a simple handle to what this operation made: `describe()` on it answers with
    /// `kind`, this resource's address and `summary`.
    pub fn return_handle(
        &self,
        name: impl Into<String>,
        kind: impl Into<String>,
        summary: serde_json::Value,
    ) {
        let handle = HandleServer::client(kind.into(), self.address.clone(), summary.to_string());
        self.return_capability(name, handle);
    }

    /// Says that this update deleted the resource and made it anew (a change it cannot make
    /// in place): the core counts a replacement, as the plan said.
    pub fn replaced(&self) {
        self.replaced.set(true);
    }

    pub(crate) fn take_returned(&self) -> Vec<(String, resource_handle::Client)> {
        std::mem::take(&mut *self.returned.borrow_mut())
    }
}
