//! The `tracing` bridge: spans and events that provider code emits inside an operation go to
//! that operation's progress stream, with their parent/child structure.
//!
//! Each operation runs inside a root span (`capstan.operation`) whose extensions hold the
//! operation's progress queue. When a span opens under it, the layer gives it a fresh progress
//! span id and copies the queue into its extensions, so every descendant span and event finds
//! its way to the right operation, from any thread.

use std::fmt::Debug;
use std::sync::Arc;

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

/// The root span of an operation whose progress goes to `queue`. The queue is stored in the
/// span's extensions right away, so every span and event opened under it finds its way there.
pub(crate) fn root_span(queue: Arc<ProgressQueue>) -> tracing::Span {
    let span = tracing::info_span!(target: ROOT_TARGET, ROOT_NAME);
    span.with_subscriber(|(id, dispatch)| {
        if let Some(registry) = dispatch.downcast_ref::<tracing_subscriber::Registry>() {
            if let Some(data) = registry.span(id) {
                data.extensions_mut().insert(Route { queue, span: 0 });
            }
        }
    });
    span
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

/// The progress span id of `span` if it belongs to the operation with `queue`, else 0.
pub(crate) fn span_of(queue: &Arc<ProgressQueue>, span: &tracing::Span) -> u64 {
    let mut found = 0;
    span.with_subscriber(|(id, dispatch)| {
        if let Some(registry) = dispatch.downcast_ref::<tracing_subscriber::Registry>() {
            if let Some(data) = registry.span(id) {
                if let Some(route) = data.extensions().get::<Route>() {
                    if Arc::ptr_eq(&route.queue, queue) {
                        found = route.span;
                    }
                }
            }
        }
    });
    found
}

/// Whether the current span belongs to some operation (used to keep operation events off
/// stderr, where they would be reported twice). Asks the registry directly: a per-layer
/// filter's own context hides spans that layer does not record, such as operation roots.
pub(crate) fn inside_operation() -> bool {
    tracing::dispatcher::get_default(|dispatch| {
        let Some(id) = dispatch.current_span().id().cloned() else {
            return false;
        };
        dispatch
            .downcast_ref::<tracing_subscriber::Registry>()
            .and_then(|registry| registry.span(&id))
            .is_some_and(|span| span.extensions().get::<Route>().is_some())
    })
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
        if meta.target() == ROOT_TARGET {
            return; // `root_span` routes it.
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
