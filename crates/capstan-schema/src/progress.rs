//! Progress items as plain Rust values (schema: `ProgressItem`), shared by the provider SDK,
//! which writes them, and the host, which reads them.

use serde::{Deserialize, Serialize};

use crate::progress_capnp::{self, progress_item};

/// Severity, in tracing's order.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

impl Level {
    fn from_wire(level: Result<progress_capnp::Level, capnp::NotInSchema>) -> Self {
        use progress_capnp::Level as W;
        match level {
            Ok(W::Trace) => Level::Trace,
            Ok(W::Debug) => Level::Debug,
            Ok(W::Info) | Err(_) => Level::Info,
            Ok(W::Warn) => Level::Warn,
            Ok(W::Error) => Level::Error,
        }
    }

    fn to_wire(self) -> progress_capnp::Level {
        use progress_capnp::Level as W;
        match self {
            Level::Trace => W::Trace,
            Level::Debug => W::Debug,
            Level::Info => W::Info,
            Level::Warn => W::Warn,
            Level::Error => W::Error,
        }
    }

    /// The level's name, lower case.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Trace => "trace",
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }
}

/// Where a raw log line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    Stdout,
    Stderr,
    Other,
}

impl LogStream {
    fn from_wire(stream: Result<progress_capnp::LogStream, capnp::NotInSchema>) -> Self {
        match stream {
            Ok(progress_capnp::LogStream::Stdout) => LogStream::Stdout,
            Ok(progress_capnp::LogStream::Stderr) => LogStream::Stderr,
            Ok(progress_capnp::LogStream::Other) | Err(_) => LogStream::Other,
        }
    }

    fn to_wire(self) -> progress_capnp::LogStream {
        match self {
            LogStream::Stdout => progress_capnp::LogStream::Stdout,
            LogStream::Stderr => progress_capnp::LogStream::Stderr,
            LogStream::Other => progress_capnp::LogStream::Other,
        }
    }
}

/// One thing that happened during an operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ProgressEvent {
    /// Provider clock, nanoseconds since the Unix epoch; 0 if unknown.
    pub time_unix_nanos: u64,
    #[serde(flatten)]
    pub kind: ProgressKind,
}

/// What happened. Span ids are unique within one operation; span 0 is the operation itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ProgressKind {
    SpanStart {
        id: u64,
        parent: u64,
        name: String,
        level: Level,
        target: String,
        fields: Vec<(String, String)>,
    },
    SpanEnd {
        id: u64,
    },
    Event {
        span: u64,
        level: Level,
        message: String,
        target: String,
        fields: Vec<(String, String)>,
    },
    Log {
        span: u64,
        stream: LogStream,
        line: String,
    },
    Counter {
        span: u64,
        done: u64,
        expected: u64,
        unit: String,
    },
    Phase {
        span: u64,
        name: String,
    },
}

/// Nanoseconds since the Unix epoch, now.
pub fn now_unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn read_fields(
    list: capnp::struct_list::Reader<'_, progress_capnp::field::Owned>,
) -> capnp::Result<Vec<(String, String)>> {
    list.iter()
        .map(|f| Ok((f.get_name()?.to_string()?, f.get_value()?.to_string()?)))
        .collect()
}

fn write_fields(
    fields: &[(String, String)],
    mut list: capnp::struct_list::Builder<'_, progress_capnp::field::Owned>,
) {
    for (n, (name, value)) in fields.iter().enumerate() {
        let mut f = list.reborrow().get(n as u32);
        f.set_name(&name[..]);
        f.set_value(&value[..]);
    }
}

impl ProgressEvent {
    /// An event stamped with the current time.
    pub fn now(kind: ProgressKind) -> Self {
        ProgressEvent {
            time_unix_nanos: now_unix_nanos(),
            kind,
        }
    }

    /// Reads an item from the wire. `Ok(None)` is an item of a kind added by a newer schema,
    /// which consumers skip.
    pub fn read(reader: progress_item::Reader<'_>) -> capnp::Result<Option<Self>> {
        use progress_item::Which;
        let kind = match reader.which() {
            Err(_) => return Ok(None),
            Ok(Which::SpanStart(s)) => {
                let s = s?;
                ProgressKind::SpanStart {
                    id: s.get_id(),
                    parent: s.get_parent(),
                    name: s.get_name()?.to_string()?,
                    level: Level::from_wire(s.get_level()),
                    target: s.get_target()?.to_string()?,
                    fields: read_fields(s.get_fields()?)?,
                }
            }
            Ok(Which::SpanEnd(id)) => ProgressKind::SpanEnd { id },
            Ok(Which::Event(e)) => {
                let e = e?;
                ProgressKind::Event {
                    span: e.get_span(),
                    level: Level::from_wire(e.get_level()),
                    message: e.get_message()?.to_string()?,
                    target: e.get_target()?.to_string()?,
                    fields: read_fields(e.get_fields()?)?,
                }
            }
            Ok(Which::Log(l)) => {
                let l = l?;
                ProgressKind::Log {
                    span: l.get_span(),
                    stream: LogStream::from_wire(l.get_stream()),
                    line: l.get_line()?.to_string()?,
                }
            }
            Ok(Which::Counter(c)) => {
                let c = c?;
                ProgressKind::Counter {
                    span: c.get_span(),
                    done: c.get_done(),
                    expected: c.get_expected(),
                    unit: c.get_unit()?.to_string()?,
                }
            }
            Ok(Which::Phase(p)) => {
                let p = p?;
                ProgressKind::Phase {
                    span: p.get_span(),
                    name: p.get_name()?.to_string()?,
                }
            }
        };
        Ok(Some(ProgressEvent {
            time_unix_nanos: reader.get_time_unix_nanos(),
            kind,
        }))
    }

    /// Writes this event to the wire.
    pub fn write(&self, mut builder: progress_item::Builder<'_>) {
        builder.set_time_unix_nanos(self.time_unix_nanos);
        match &self.kind {
            ProgressKind::SpanStart {
                id,
                parent,
                name,
                level,
                target,
                fields,
            } => {
                let mut s = builder.init_span_start();
                s.set_id(*id);
                s.set_parent(*parent);
                s.set_name(&name[..]);
                s.set_level(level.to_wire());
                s.set_target(&target[..]);
                write_fields(fields, s.init_fields(fields.len() as u32));
            }
            ProgressKind::SpanEnd { id } => builder.set_span_end(*id),
            ProgressKind::Event {
                span,
                level,
                message,
                target,
                fields,
            } => {
                let mut e = builder.init_event();
                e.set_span(*span);
                e.set_level(level.to_wire());
                e.set_message(&message[..]);
                e.set_target(&target[..]);
                write_fields(fields, e.init_fields(fields.len() as u32));
            }
            ProgressKind::Log { span, stream, line } => {
                let mut l = builder.init_log();
                l.set_span(*span);
                l.set_stream(stream.to_wire());
                l.set_line(&line[..]);
            }
            ProgressKind::Counter {
                span,
                done,
                expected,
                unit,
            } => {
                let mut c = builder.init_counter();
                c.set_span(*span);
                c.set_done(*done);
                c.set_expected(*expected);
                c.set_unit(&unit[..]);
            }
            ProgressKind::Phase { span, name } => {
                let mut p = builder.init_phase();
                p.set_span(*span);
                p.set_name(&name[..]);
            }
        }
    }

    /// A rough size of the event on the wire, for batching.
    pub fn approximate_size(&self) -> usize {
        let fields =
            |f: &[(String, String)]| f.iter().map(|(a, b)| a.len() + b.len() + 24).sum::<usize>();
        48 + match &self.kind {
            ProgressKind::SpanStart {
                name,
                target,
                fields: f,
                ..
            } => name.len() + target.len() + fields(f),
            ProgressKind::Event {
                message,
                target,
                fields: f,
                ..
            } => message.len() + target.len() + fields(f),
            ProgressKind::Log { line, .. } => line.len(),
            ProgressKind::Counter { unit, .. } => unit.len(),
            ProgressKind::Phase { name, .. } => name.len(),
            ProgressKind::SpanEnd { .. } => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(event: &ProgressEvent) -> ProgressEvent {
        let mut message = capnp::message::Builder::new_default();
        event.write(message.init_root());
        let reader = message
            .get_root_as_reader::<progress_item::Reader>()
            .unwrap();
        ProgressEvent::read(reader).unwrap().unwrap()
    }

    #[test]
    fn every_kind_round_trips_through_the_wire() {
        let kinds = vec![
            ProgressKind::SpanStart {
                id: 7,
                parent: 3,
                name: "build".into(),
                level: Level::Debug,
                target: "nix".into(),
                fields: vec![("drv".into(), "/nix/store/x.drv".into())],
            },
            ProgressKind::SpanEnd { id: 7 },
            ProgressKind::Event {
                span: 7,
                level: Level::Warn,
                message: "careful".into(),
                target: "t".into(),
                fields: vec![],
            },
            ProgressKind::Log {
                span: 0,
                stream: LogStream::Stderr,
                line: "hello".into(),
            },
            ProgressKind::Counter {
                span: 1,
                done: 3,
                expected: 10,
                unit: "steps".into(),
            },
            ProgressKind::Phase {
                span: 1,
                name: "activating".into(),
            },
        ];
        for kind in kinds {
            let event = ProgressEvent {
                time_unix_nanos: 42,
                kind,
            };
            assert_eq!(round_trip(&event), event);
        }
    }
}
