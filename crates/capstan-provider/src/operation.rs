//! The context a resource method receives: who it is working for, how to report progress, how
//! to notice cancellation, and the capabilities that flow in and out.

use std::cell::RefCell;
use std::sync::Arc;

use capstan_schema::provider_capnp::resource_handle;
use capstan_schema::{LogStream, OperationKind, ProgressEvent, ProgressKind, TraceContext};
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

    pub(crate) fn take_returned(&self) -> Vec<(String, resource_handle::Client)> {
        std::mem::take(&mut *self.returned.borrow_mut())
    }
}
