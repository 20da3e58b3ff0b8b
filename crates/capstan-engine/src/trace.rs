//! One trace per run: the run is a span (a child of the caller's, with `TRACEPARENT`), and each
//! operation a span under it whose id goes to the provider as its `traceparent`. Whoever shows
//! the run (the JSON stream, the OpenTelemetry export) asks here which span an event belongs to,
//! so the ids a provider sees, the stream carries and a trace viewer shows are the same.
//!
//! One run per process (a command runs one), so this is process-wide, like `tracing`'s
//! dispatcher; before [`start_run`], operations get a trace of their own each, as before.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::OnceLock;

use capstan_schema::TraceContext;

use crate::events::Event;

/// The run's trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunTrace {
    pub trace_id: u128,
    /// The run's own span.
    pub span_id: u64,
    /// The caller's span, when the run continues a trace (`TRACEPARENT`).
    pub parent: Option<u64>,
    pub sampled: bool,
}

struct Registry {
    run: Option<RunTrace>,
    /// The span of each resource's current operation.
    operations: HashMap<String, u64>,
}

static REGISTRY: OnceLock<Mutex<Registry>> = OnceLock::new();

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    REGISTRY
        .get_or_init(|| {
            Mutex::new(Registry {
                run: None,
                operations: HashMap::new(),
            })
        })
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// Starts the run's trace: a child of `parent` (the caller's `TRACEPARENT`), else a new one.
pub fn start_run(parent: Option<TraceContext>) -> RunTrace {
    let fresh = TraceContext::random();
    let run = match parent {
        Some(parent) => RunTrace {
            trace_id: parent.trace_id,
            span_id: fresh.span_id,
            parent: Some(parent.span_id),
            sampled: parent.sampled,
        },
        None => RunTrace {
            trace_id: fresh.trace_id,
            span_id: fresh.span_id,
            parent: None,
            sampled: true,
        },
    };
    let mut registry = registry();
    registry.run = Some(run);
    registry.operations.clear();
    run
}

/// The run's trace, once started.
pub fn run() -> Option<RunTrace> {
    registry().run
}

/// The trace context of a new operation on `address`: a span of the run's trace (recorded as
/// the resource's current operation), or a trace of its own before any run started.
pub fn operation(address: &str) -> TraceContext {
    let mut registry = registry();
    let Some(run) = registry.run else {
        return TraceContext::random();
    };
    let context = TraceContext {
        trace_id: run.trace_id,
        sampled: run.sampled,
        ..TraceContext::random()
    };
    match registry.operations.get_mut(address) {
        Some(span) => *span = context.span_id,
        None => {
            registry
                .operations
                .insert(address.to_string(), context.span_id);
        }
    }
    context
}

/// A trace context in the run's trace for a call that is not one of the run's operations (a
/// read while planning, a check): not recorded as any resource's operation.
pub fn call() -> TraceContext {
    match registry().run {
        Some(run) => TraceContext {
            trace_id: run.trace_id,
            sampled: run.sampled,
            ..TraceContext::random()
        },
        None => TraceContext::random(),
    }
}

/// The span of `address`'s current operation.
pub fn operation_span(address: &str) -> Option<u64> {
    registry().operations.get(address).copied()
}

/// The resource an event is about, if it is about one.
pub fn address_of(event: &Event) -> Option<&str> {
    match event {
        Event::ResourceStart { address, .. }
        | Event::ResourceProgress { address, .. }
        | Event::ResourceComplete { address, .. }
        | Event::ResourceFailed { address, .. }
        | Event::ResourceSkipped { address, .. } => Some(address),
        _ => None,
    }
}

/// The trace and span an event belongs to (hex, as W3C writes them): its operation's span, or
/// the run's.
pub fn ids_of(event: &Event) -> Option<(String, String)> {
    let registry = registry();
    let run = registry.run?;
    let span = address_of(event)
        .and_then(|a| registry.operations.get(a).copied())
        .unwrap_or(run.span_id);
    Some((format!("{:032x}", run.trace_id), format!("{span:016x}")))
}

/// The caller's trace context from the environment (`TRACEPARENT`, as CI systems and
/// OpenTelemetry's environment-carrier convention set it).
pub fn parent_from_env() -> Option<TraceContext> {
    TraceContext::from_traceparent(&std::env::var("TRACEPARENT").ok()?)
}
