//! W3C trace-context identifiers carried with every operation.

use crate::provider_capnp;

/// The trace context of one operation: a W3C `traceparent` in structured form.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceContext {
    /// The 128-bit trace id.
    pub trace_id: u128,
    /// The core's span for the operation; the provider's spans are its children.
    pub span_id: u64,
    /// Whether the trace is sampled.
    pub sampled: bool,
}

impl TraceContext {
    /// A fresh context with random ids.
    pub fn random() -> Self {
        TraceContext {
            trace_id: random_nonzero_u128(),
            span_id: random_nonzero_u128() as u64 | 1,
            sampled: true,
        }
    }

    /// The same trace, a new span under it.
    pub fn child(&self) -> Self {
        TraceContext {
            span_id: random_nonzero_u128() as u64 | 1,
            ..*self
        }
    }

    /// The W3C `traceparent` header value, e.g.
    /// `00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01`.
    pub fn traceparent(&self) -> String {
        format!(
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.span_id, self.sampled as u8
        )
    }

    /// Parses a `traceparent` header value (version 00).
    pub fn from_traceparent(value: &str) -> Option<Self> {
        let mut parts = value.trim().split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if version != "00" || trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
            return None;
        }
        let context = TraceContext {
            trace_id: u128::from_str_radix(trace, 16).ok()?,
            span_id: u64::from_str_radix(span, 16).ok()?,
            sampled: u8::from_str_radix(flags, 16).ok()? & 1 == 1,
        };
        (context.trace_id != 0 && context.span_id != 0).then_some(context)
    }

    /// Reads a context from the wire.
    pub fn read(reader: provider_capnp::trace_context::Reader<'_>) -> Self {
        TraceContext {
            trace_id: ((reader.get_trace_id_high() as u128) << 64)
                | reader.get_trace_id_low() as u128,
            span_id: reader.get_span_id(),
            sampled: reader.get_sampled(),
        }
    }

    /// Writes this context to the wire.
    pub fn write(&self, mut builder: provider_capnp::trace_context::Builder<'_>) {
        builder.set_trace_id_high((self.trace_id >> 64) as u64);
        builder.set_trace_id_low(self.trace_id as u64);
        builder.set_span_id(self.span_id);
        builder.set_sampled(self.sampled);
    }
}

/// Random enough for trace ids: the standard library's per-process random hash keys, mixed
/// with a counter and the clock. Not for secrets.
fn random_nonzero_u128() -> u128 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    // A random key per process (the OS seeds `RandomState`), mixed once with the pid and the
    // time; each id then hashes a counter under that key: unique within the process, and
    // unpredictable across processes, without a system call per id.
    static KEY: OnceLock<(RandomState, u64)> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let (state, salt) = KEY.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        (
            RandomState::new(),
            nanos ^ ((std::process::id() as u64) << 32),
        )
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let half = |part: u64| {
        let mut h = state.build_hasher();
        h.write_u64(*salt);
        h.write_u64(n);
        h.write_u64(part);
        h.finish()
    };
    let value = ((half(1) as u128) << 64) | half(2) as u128;
    value.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips() {
        let context = TraceContext::random();
        let text = context.traceparent();
        assert_eq!(text.len(), 55);
        assert_eq!(TraceContext::from_traceparent(&text), Some(context));
    }

    #[test]
    fn traceparent_rejects_malformed_values() {
        assert_eq!(TraceContext::from_traceparent("00-00-00-00"), None);
        let zero_trace = format!("00-{}-00f067aa0ba902b7-01", "0".repeat(32));
        assert_eq!(TraceContext::from_traceparent(&zero_trace), None);
    }

    #[test]
    fn child_keeps_the_trace_and_changes_the_span() {
        let parent = TraceContext::random();
        let child = parent.child();
        assert_eq!(child.trace_id, parent.trace_id);
        assert_ne!(child.span_id, parent.span_id);
    }
}
