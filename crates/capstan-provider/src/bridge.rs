//! The `tracing` bridge: spans and events that provider code emits inside an operation go to
//! that operation's progress stream, with their parent/child structure.
//!
//! Each operation runs inside a root span (`capstan.operation`) that carries a key into a
//! process-wide table of live operations. When a span opens under it, the layer gives it a
//! fresh progress span id and stores the operation's queue in the span's extensions, so every
//! descendant span and event finds its way to the right operation, from any thread.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use capstan_schema::{Level as ProgressLevel, ProgressEvent, ProgressKind};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::registry::LookupSpan;

use crate::progress::ProgressQueue;

/// Target and name of the span each operation runs in.
pub(crate) const ROOT_TARGET: &str = "capstan_provider::operation";
pub(crate) const ROOT_NAME: &str = "capstan.operation";
const ROOT_KEY_FIELD: &str = "capstan.op";

static OPERATIONS: LazyLock<Mutex<HashMap<u64, Arc<ProgressQueue>>>> =
    LazyLock::new(Default::default);
static NEXT_KEY: AtomicU64 = AtomicU64::new(1);

fn operations() -> std::sync::MutexGuard<'static, HashMap<u64, Arc<ProgressQueue>>> {
    OPERATIONS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Keeps an operation reachable from its root span; dropping it unregisters the operation.
pub(crate) struct Registration(u64);

impl Registration {
    pub(crate) fn new(queue: Arc<ProgressQueue>) -> Self {
        let key = NEXT_KEY.fetch_add(1, Ordering::Relaxed);
        operations().insert(key, queue);
        Registration(key)
    }

    /// The root span of this operation.
    pub(crate) fn root_span(&self) -> tracing::Span {
        tracing::info_span!(target: ROOT_TARGET, ROOT_NAME, capstan.op = self.0)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        operations().remove(&self.0);
    }
}

/// Stored in the extensions of every span that belongs to an operation.
struct Route {
    queue: Arc<ProgressQueue>,
    span: u64,
}

/// The innermost span of the current context that belongs to the operation with `queue`,
/// or 0 (the operation itself).
pub(crate) fn current_span_of(queue: &Arc<ProgressQueue>) -> u64 {
    tracing::dispatcher::get_default(|dispatch| {
        let Some(id) = dispatch.current_span().id().cloned() else {
            return 0;
        };
        let Some(registry) = dispatch.downcast_ref::<tracing_subscriber::Registry>() else {
            return 0;
        };
        registry
            .span(&id)
            .and_then(|span| {
                span.extensions()
                    .get::<Route>()
                    .filter(|route| Arc::ptr_eq(&route.queue, queue))
                    .map(|route| route.span)
            })
            .unwrap_or(0)
    })
}

/// Whether the current span belongs to some operation (used to keep operation events off
/// stderr, where they would be reported twice).
pub(crate) fn in_operation<S>(cx: &Context<'_, S>) -> bool
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    cx.lookup_current()
        .is_some_and(|span| span.extensions().get::<Route>().is_some())
}

/// The layer that forwards spans and events inside operations to their progress streams.
/// `serve` installs it; a provider that sets up its own subscriber adds it with
/// [`progress_layer`](crate::progress_layer).
#[derive(Debug, Default, Clone, Copy)]
pub struct ProgressLayer {
    _private: (),
}

impl ProgressLayer {
    pub(crate) fn new() -> Self {
        ProgressLayer { _private: () }
    }
}

fn level(level: &tracing::Level) -> ProgressLevel {
    match *level {
        tracing::Level::TRACE => ProgressLevel::Trace,
        tracing::Level::DEBUG => ProgressLevel::Debug,
        tracing::Level::INFO => ProgressLevel::Info,
        tracing::Level::WARN => ProgressLevel::Warn,
        tracing::Level::ERROR => ProgressLevel::Error,
    }
}

impl<S> Layer<S> for ProgressLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, cx: Context<'_, S>) {
        let Some(span) = cx.span(id) else { return };
        let meta = attrs.metadata();
        if meta.target() == ROOT_TARGET && meta.name() == ROOT_NAME {
            let mut key = KeyVisitor(None);
            attrs.record(&mut key);
            let queue = key.0.and_then(|k| operations().get(&k).cloned());
            if let Some(queue) = queue {
                span.extensions_mut().insert(Route { queue, span: 0 });
            }
            return;
        }
        let Some(parent) = span.parent() else { return };
        let Some((queue, parent_id)) = parent
            .extensions()
            .get::<Route>()
            .map(|r| (r.queue.clone(), r.span))
        else {
            return;
        };
        let span_id = queue.next_span_id();
        let mut fields = FieldVisitor::default();
        attrs.record(&mut fields);
        queue.push(ProgressEvent::now(ProgressKind::SpanStart {
            id: span_id,
            parent: parent_id,
            name: meta.name().to_string(),
            level: level(meta.level()),
            target: meta.target().to_string(),
            fields: fields.fields,
        }));
        span.extensions_mut().insert(Route {
            queue,
            span: span_id,
        });
    }

    fn on_event(&self, event: &Event<'_>, cx: Context<'_, S>) {
        let Some(span) = cx.event_span(event) else {
            return;
        };
        let extensions = span.extensions();
        let Some(route) = extensions.get::<Route>() else {
            return;
        };
        let mut fields = FieldVisitor::default();
        event.record(&mut fields);
        let meta = event.metadata();
        route.queue.push(ProgressEvent::now(ProgressKind::Event {
            span: route.span,
            level: level(meta.level()),
            message: fields.message.unwrap_or_default(),
            target: meta.target().to_string(),
            fields: fields.fields,
        }));
    }

    fn on_close(&self, id: Id, cx: Context<'_, S>) {
        let Some(span) = cx.span(&id) else { return };
        let extensions = span.extensions();
        if let Some(route) = extensions.get::<Route>().filter(|r| r.span != 0) {
            route
                .queue
                .push(ProgressEvent::now(ProgressKind::SpanEnd { id: route.span }));
        }
    }
}

struct KeyVisitor(Option<u64>);

impl Visit for KeyVisitor {
    fn record_u64(&mut self, field: &Field, value: u64) {
        if field.name() == ROOT_KEY_FIELD {
            self.0 = Some(value);
        }
    }

    fn record_debug(&mut self, _field: &Field, _value: &dyn Debug) {}
}

#[derive(Default)]
struct FieldVisitor {
    message: Option<String>,
    fields: Vec<(String, String)>,
}

impl FieldVisitor {
    fn put(&mut self, field: &Field, value: String) {
        if field.name() == "message" {
            self.message = Some(value);
        } else {
            self.fields.push((field.name().to_string(), value));
        }
    }
}

impl Visit for FieldVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.to_string());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.to_string());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.to_string());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.to_string());
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, value.to_string());
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        self.put(field, format!("{value:?}"));
    }
}
