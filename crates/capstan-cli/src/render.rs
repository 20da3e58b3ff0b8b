//! Turning engine events into what the user sees: lines on a terminal, or JSON lines.

use std::cell::{Cell, RefCell};
use std::io::IsTerminal;
use std::rc::Rc;
use std::time::{SystemTime, UNIX_EPOCH};

use capstan_engine::events::{Event, EventSink};
use capstan_engine::plan::Action;
use capstan_schema::{Level, ProgressKind};
use serde_json::{json, Value};

use crate::output::Stdout;

/// The JSON stream's version; minor versions only add fields and event types.
pub const JSON_STREAM_VERSION: &str = "1.0";

/// Newline-delimited JSON on stdout: a `version` line, then one line per event, each with
/// `type`, a monotonic `seq` and a `timestamp`.
pub struct JsonEvents {
    out: Rc<RefCell<Stdout>>,
    seq: Cell<u64>,
}

fn timestamp() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl JsonEvents {
    pub fn new(out: Rc<RefCell<Stdout>>, command: &str) -> Self {
        let sink = JsonEvents {
            out,
            seq: Cell::new(0),
        };
        sink.write(json!({"type": "version", "capstan": env!("CARGO_PKG_VERSION"), "ui": JSON_STREAM_VERSION, "command": command}));
        sink
    }

    fn write(&self, mut value: Value) {
        let seq = self.seq.get();
        self.seq.set(seq + 1);
        if let Some(object) = value.as_object_mut() {
            object.insert("seq".into(), json!(seq));
            object.insert("timestamp".into(), json!(timestamp()));
        }
        self.out.borrow_mut().line(&value.to_string());
    }
}

impl EventSink for JsonEvents {
    fn emit(&self, event: Event) {
        self.write(serde_json::to_value(&event).unwrap_or(Value::Null));
    }
}

/// Lines for a person, on stderr. Shows what starts, finishes, fails and is skipped, each
/// resource's log lines and messages as they arrive, and (with -v) spans and counters.
pub struct HumanEvents {
    verbose: u8,
    color: bool,
}

impl HumanEvents {
    pub fn new(verbose: u8, color: Option<bool>) -> Self {
        let color = color.unwrap_or_else(|| {
            std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none()
        });
        HumanEvents { verbose, color }
    }

    fn paint(&self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }
}

fn past(operation: &str) -> &'static str {
    match operation {
        "create" => "created",
        "update" => "updated",
        "delete" => "deleted",
        "read" => "read",
        _ => "done",
    }
}

impl EventSink for HumanEvents {
    fn emit(&self, event: Event) {
        match event {
            Event::Plan { changes } => {
                let count = |a: Action| changes.iter().filter(|c| c.action == a).count();
                eprintln!(
                    "Plan: {} to create, {} to update, {} to delete, {} unchanged.",
                    count(Action::Create),
                    count(Action::Update),
                    count(Action::Delete),
                    count(Action::Noop)
                );
                for change in changes
                    .iter()
                    .filter(|c| c.action != Action::Noop || self.verbose > 0)
                {
                    let (sign, code) = match change.action {
                        Action::Create => ("+", "32"),
                        Action::Update => ("~", "33"),
                        Action::Delete => ("-", "31"),
                        Action::Noop => ("=", "2"),
                    };
                    let mut line = format!(
                        "  {} {} ({}.{})",
                        self.paint(code, sign),
                        change.address,
                        change.provider,
                        change.resource_type
                    );
                    if !change.changed_inputs.is_empty() {
                        line.push_str(&format!("  changed: {}", change.changed_inputs.join(", ")));
                    }
                    if !change.waits_on.is_empty() {
                        line.push_str(&format!(
                            "  (inputs known after {})",
                            change.waits_on.join(", ")
                        ));
                    }
                    if let Some(op) = &change.interrupted {
                        line.push_str(&format!("  [an earlier {op} was interrupted]"));
                    }
                    eprintln!("{line}");
                }
            }
            Event::ResourceStart {
                address, operation, ..
            } => {
                eprintln!("  {} {address}: {operation}…", self.paint("2", "·"));
            }
            Event::ResourceProgress {
                address, progress, ..
            } => match progress.kind {
                ProgressKind::Log { line, .. } => {
                    eprintln!("  {} {line}", self.paint("2", &format!("{address} │")))
                }
                ProgressKind::Event { level, message, .. }
                    if level >= Level::Info || self.verbose > 0 =>
                {
                    eprintln!(
                        "  {} {}: {message}",
                        self.paint("2", &format!("{address} │")),
                        level.as_str()
                    );
                }
                ProgressKind::Phase { name, .. } => {
                    eprintln!("  {} {name}", self.paint("2", &format!("{address} ▸")))
                }
                ProgressKind::Counter {
                    done,
                    expected,
                    unit,
                    ..
                } if self.verbose > 0 => {
                    eprintln!(
                        "  {} {done}/{expected} {unit}",
                        self.paint("2", &format!("{address} ▸"))
                    );
                }
                ProgressKind::SpanStart { name, .. } if self.verbose > 1 => {
                    eprintln!("  {} ▶ {name}", self.paint("2", &format!("{address} │")))
                }
                _ => {}
            },
            Event::ResourceComplete {
                address,
                operation,
                elapsed_seconds,
                ..
            } => {
                eprintln!(
                    "  {} {address}: {} in {elapsed_seconds:.2}s",
                    self.paint("32", "✓"),
                    past(&operation)
                );
            }
            Event::ResourceFailed { error, details, .. } => {
                eprintln!("  {} {error}", self.paint("31", "✗"));
                for line in details.lines() {
                    eprintln!("      {line}");
                }
            }
            Event::ResourceSkipped {
                address, reason, ..
            } => {
                eprintln!("  {} {address}: skipped ({reason})", self.paint("33", "↷"));
            }
            Event::ProviderLog { provider, line, .. } => {
                eprintln!(
                    "  {} {line}",
                    self.paint("2", &format!("provider {provider}:"))
                );
            }
            Event::Interrupted { message } => eprintln!("{}", self.paint("33", &message)),
            Event::Summary {
                counts,
                elapsed_seconds,
            } => {
                eprintln!(
                    "{}: {} created, {} updated, {} deleted, {} unchanged, {} failed, {} skipped{} in {elapsed_seconds:.2}s.",
                    if counts.succeeded() { "Done" } else { "Finished with problems" },
                    counts.created, counts.updated, counts.deleted, counts.unchanged, counts.failed, counts.skipped,
                    if counts.interrupted > 0 { format!(", {} interrupted", counts.interrupted) } else { String::new() },
                );
            }
        }
    }
}
