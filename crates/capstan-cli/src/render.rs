//! Turning engine events into what the user sees: lines on a terminal, or JSON lines.

use crate::style;
use std::cell::{Cell, RefCell};
use std::io::IsTerminal;
use std::rc::Rc;
use std::time::{SystemTime, UNIX_EPOCH};

use capstan_engine::events::{Event, EventSink};
use capstan_engine::plan::Action;
use capstan_schema::{Level, ProgressKind};
use serde_json::json;

use crate::output::Stdout;

/// The JSON stream's version; minor versions only add fields and event types.
pub const JSON_STREAM_VERSION: &str = "1.6";

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
        sink.write(json!({"type": "version", "capstan": env!("CARGO_PKG_VERSION"), "ui": JSON_STREAM_VERSION, "command": command}).to_string());
        sink
    }

    /// Writes one event, given as the text of a JSON object, with `seq` and `timestamp` added
    /// as its last members. Events are serialized straight to text: going through a `Value`
    /// cost a tree of allocations per event (and hundreds of megabytes for the plan of a
    /// large deployment).
    fn write(&self, mut object: String) {
        use std::fmt::Write;
        let seq = self.seq.get();
        self.seq.set(seq + 1);
        debug_assert!(object.starts_with('{') && object.ends_with('}'));
        object.pop();
        if object.len() > 1 {
            object.push(',');
        }
        // `f64`'s Display is the shortest text that reads back the same, never an exponent:
        // a JSON number.
        let _ = write!(object, "\"seq\":{seq},\"timestamp\":{}}}", timestamp());
        self.out.borrow_mut().line_owned(object);
    }
}

impl EventSink for JsonEvents {
    fn emit(&self, event: Event) {
        // Events hold strings, numbers and JSON values only: encoding cannot fail.
        let mut object = serde_json::to_string(&event).expect("events always encode");
        // The trace and span it belongs to, so a front end can join it with the trace.
        if let Some((trace, span)) = capstan_engine::trace::ids_of(&event) {
            object.pop();
            object.push_str(&format!(
                ",\"trace_id\":\"{trace}\",\"span_id\":\"{span}\"}}"
            ));
        }
        self.write(object);
    }
}

/// Lines for a person, on stderr. Shows what starts, finishes, fails and is skipped, each
/// resource's log lines and messages as they arrive, and (with -v) spans and counters.
pub struct HumanEvents {
    verbose: u8,
    color: bool,
    /// Where the plan goes, when it is the command's output (`capstan plan`); else stderr.
    plan_out: Option<RefCell<Stdout>>,
    /// What failed or was skipped so far, one line each: listed again under the summary of
    /// a run of several resources (a fleet's failures are far apart in its log).
    not_done: RefCell<Vec<String>>,
}

/// At most this many resources are listed again under the summary.
const NOT_DONE_LISTED: usize = 20;

impl HumanEvents {
    pub fn new(verbose: u8, color: Option<bool>) -> Self {
        let color = crate::style::enabled(std::io::stderr().is_terminal(), color);
        HumanEvents {
            verbose,
            color,
            plan_out: None,
            not_done: RefCell::new(Vec::new()),
        }
    }

    /// Prints the plan on `stdout` (coloured only if that is a terminal, when the colour is
    /// not forced), everything else on stderr.
    pub fn plan_to(mut self, stdout: Stdout, color: Option<bool>) -> Self {
        self.color = crate::style::enabled(stdout.is_terminal(), color);
        self.plan_out = Some(RefCell::new(stdout));
        self
    }

    pub(crate) fn paint(&self, style: anstyle::Style, text: &str) -> String {
        crate::style::paint(self.color, style, text)
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
        // The plan, with what it left for a later evaluation.
        let to_stdout = matches!(
            event,
            Event::Plan { .. } | Event::Deferred { .. } | Event::NotSelected { .. }
        ) && self.plan_out.is_some();
        let mut text = String::new();
        for line in self.lines(event, false) {
            text.push_str(&line);
            text.push('\n');
        }
        if text.is_empty() {
            return;
        }
        match &self.plan_out {
            Some(out) if to_stdout => out.borrow_mut().write(text.as_bytes()),
            _ => crate::output::to_stderr(text.as_bytes()),
        }
    }
}

impl HumanEvents {
    /// The lines an event prints. In the live view (`live`), starts, phases and messages
    /// update the running resource's status line instead (messages still print with -v).
    pub(crate) fn lines(&self, event: Event, live: bool) -> Vec<String> {
        let mut out = Vec::new();
        macro_rules! put {
            ($($arg:tt)*) => { out.push(format!($($arg)*)) };
        }
        match event {
            Event::Plan { changes } => self.plan_lines(&changes, &mut out),
            Event::ResourceStart { .. } if live => {}
            Event::ResourceStart {
                address, operation, ..
            } => {
                put!("  {} {address}: {operation}…", self.paint(style::DIM, "·"));
            }
            Event::ResourceProgress {
                address, progress, ..
            } => self.progress_lines(&address, progress.kind, live, &mut out),
            Event::ResourceComplete {
                address,
                operation,
                elapsed_seconds,
                ..
            } => {
                put!(
                    "  {} {address}: {} in {elapsed_seconds:.2}s",
                    self.paint(style::GREEN, "✓"),
                    past(operation)
                );
            }
            Event::ResourceFailed { error, details, .. } => {
                let first = error.lines().next().unwrap_or_default();
                self.not_done
                    .borrow_mut()
                    .push(format!("  {} {first}", self.paint(style::RED, "✗")));
                put!("  {} {error}", self.paint(style::RED, "✗"));
                for line in details.lines() {
                    put!("      {line}");
                }
            }
            Event::ResourceSkipped {
                address, reason, ..
            } => {
                let line = format!(
                    "  {} {address}: skipped ({reason})",
                    self.paint(style::YELLOW, "↷")
                );
                self.not_done.borrow_mut().push(line.clone());
                out.push(line);
            }
            event @ (Event::EvaluationStart { .. }
            | Event::EvaluationComplete { .. }
            | Event::EvaluationFailed { .. }
            | Event::Deferred { .. }
            | Event::EvaluationLog { .. }) => self.evaluation_lines(event, live, &mut out),
            Event::NotSelected { addresses } => {
                let mut shown: Vec<&str> = addresses.iter().take(10).map(String::as_str).collect();
                let more = addresses.len().saturating_sub(10);
                let more = if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                };
                shown.sort_unstable();
                put!(
                    "  {} not selected by --target, left as they are: {}{more}",
                    self.paint(style::DIM, "·"),
                    shown.join(", ")
                );
            }
            Event::ProviderLog { provider, line, .. } => {
                put!(
                    "  {} {line}",
                    self.paint(style::DIM, &format!("provider {provider}:"))
                );
            }
            // The signal that stopped the run already said so, once (`stop.rs`); the JSON
            // stream carries the event.
            Event::Interrupted { .. } => {}
            // Only the JSON stream carries it: the error itself is printed once, on stderr.
            Event::Error { .. } => {}
            Event::Summary {
                counts,
                elapsed_seconds,
            } => {
                put!(
                    "{}: {} created, {} updated, {}{} deleted, {} unchanged, {} failed, {} skipped{} in {elapsed_seconds:.2}s.",
                    if counts.succeeded() { "Done" } else { "Finished with problems" },
                    counts.created, counts.updated,
                    if counts.replaced > 0 { format!("{} replaced, ", counts.replaced) } else { String::new() },
                    counts.deleted, counts.unchanged, counts.failed, counts.skipped,
                    if counts.interrupted > 0 { format!(", {} interrupted", counts.interrupted) } else { String::new() },
                );
                if counts.evaluations > 0 {
                    let s = if counts.evaluations == 1 { "" } else { "s" };
                    put!(
                        "  {} {} evaluation{s} of the deployment",
                        self.paint(style::DIM, "·"),
                        counts.evaluations
                    );
                }
                let ran = counts.created
                    + counts.updated
                    + counts.deleted
                    + counts.unchanged
                    + counts.failed
                    + counts.skipped;
                let not_done = self.not_done.take();
                if ran > 1 && !not_done.is_empty() {
                    let more = not_done.len().saturating_sub(NOT_DONE_LISTED);
                    out.extend(not_done.into_iter().take(NOT_DONE_LISTED));
                    if more > 0 {
                        put!("  … and {more} more above");
                    }
                }
            }
        }
        out
    }

    /// The lines of a Nix evaluation's events: its stages, what it deferred, its own lines.
    fn evaluation_lines(&self, event: Event, live: bool, out: &mut Vec<String>) {
        macro_rules! put {
            ($($arg:tt)*) => { out.push(format!($($arg)*)) };
        }
        match event {
            Event::EvaluationStart { .. } if live => {}
            Event::EvaluationStart { file, stage } => {
                put!(
                    "  {} {file}: evaluating (stage {stage})…",
                    self.paint(style::DIM, "·")
                );
            }
            Event::EvaluationComplete {
                file,
                stage,
                resources,
                deferred,
                elapsed_seconds,
            } => {
                let deferred = match deferred {
                    0 => String::new(),
                    n => format!(", {n} deferred"),
                };
                put!(
                    "  {} {file}: evaluated (stage {stage}) in {elapsed_seconds:.2}s: {resources} resource(s){deferred}",
                    self.paint(style::GREEN, "✓"),
                );
            }
            Event::EvaluationFailed {
                file,
                stage,
                error,
                stops_command,
                retried,
            } => {
                let failed = self.paint(style::RED, "✗");
                if retried {
                    // Expected when an output changes the deployment's shape: nothing failed.
                    put!(
                        "  {} {file}: evaluation (stage {stage}) with the recorded outputs stopped on one that no longer holds; evaluating from no output",
                        self.paint(style::DIM, "·")
                    );
                } else if stops_command {
                    // The command's error, printed once, right after.
                    put!("  {failed} {file}: evaluation (stage {stage}) failed");
                } else {
                    put!("  {failed} {file}: evaluation (stage {stage}) failed:");
                    for line in error.lines() {
                        put!("      {line}");
                    }
                }
            }
            Event::Deferred {
                address,
                what,
                waits_for,
                may_delete,
            } => {
                let what = match what {
                    capstan_engine::nix::DeferredKind::Resource => "its inputs use",
                    capstan_engine::nix::DeferredKind::Nested => "its members depend on",
                    capstan_engine::nix::DeferredKind::Member => "its declaration uses",
                };
                let outputs = waits_for
                    .iter()
                    .map(|w| format!("`{w}`"))
                    .collect::<Vec<_>>()
                    .join(", ");
                put!(
                    "  {} {address}  (deferred: {what} outputs of {outputs}; evaluated again once they exist)",
                    self.paint(style::CYAN, "…"),
                );
                for member in may_delete {
                    put!(
                        "  {} {member}  (may be deleted: depends on the new outputs of {outputs})",
                        self.paint(style::RED, "?"),
                    );
                }
            }
            Event::EvaluationLog { file, line } => {
                put!("  {} {line}", self.paint(style::DIM, &format!("{file}:")));
            }
            _ => {}
        }
    }

    /// The plan: counts, then a line per change (unchanged ones with -v).
    fn plan_lines(&self, changes: &[capstan_engine::plan::PlannedChange], out: &mut Vec<String>) {
        macro_rules! put {
            ($($arg:tt)*) => { out.push(format!($($arg)*)) };
        }
        let count = |a: Action| changes.iter().filter(|c| c.action == a).count();
        let replace = match count(Action::Replace) {
            0 => String::new(),
            n => format!(", {n} to replace"),
        };
        put!(
            "Plan: {} to create, {} to update, {} to delete{replace}, {} unchanged.",
            count(Action::Create),
            count(Action::Update),
            count(Action::Delete),
            count(Action::Noop)
        );
        for change in changes
            .iter()
            .filter(|c| c.action != Action::Noop || self.verbose > 0)
        {
            let replaced = change
                .planned
                .as_ref()
                .is_some_and(|p| !p.replace.is_empty());
            let (sign, code) = match change.action {
                Action::Update if replaced => ("-/+", style::MAGENTA),
                Action::Create => ("+", style::GREEN),
                Action::Update => ("~", style::YELLOW),
                Action::Delete => ("-", style::RED),
                Action::Noop => ("=", style::DIM),
                Action::Replace => ("-/+", style::MAGENTA),
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
            if let Some(note) = &change.note {
                line.push_str(&format!("  ({note})"));
            }
            if let Some(op) = &change.interrupted {
                line.push_str(&format!("  [an earlier {op} was interrupted]"));
            }
            if let Some(planned) = change.planned.as_ref().filter(|p| !p.replace.is_empty()) {
                line.push_str(&format!(
                    "  (replaced: changing {} forces a new resource)",
                    planned
                        .replace
                        .iter()
                        .map(|p| format!("`{p}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            put!("{line}");
            if let Some(planned) = &change.planned {
                for line in planned_outputs(planned) {
                    put!("      {line}");
                }
            }
        }
    }

    /// A provider's progress report, as far as it is shown in this mode.
    fn progress_lines(&self, address: &str, kind: ProgressKind, live: bool, out: &mut Vec<String>) {
        macro_rules! put {
            ($($arg:tt)*) => { out.push(format!($($arg)*)) };
        }
        match kind {
            ProgressKind::Log { line, .. } => {
                put!(
                    "  {} {line}",
                    self.paint(style::DIM, &format!("{address} │"))
                )
            }
            ProgressKind::Event { level, message, .. }
                if (level >= Level::Info && !live) || self.verbose > 0 =>
            {
                put!(
                    "  {} {}: {message}",
                    self.paint(style::DIM, &format!("{address} │")),
                    level.as_str()
                );
            }
            ProgressKind::Phase { name, .. } if !live => {
                put!(
                    "  {} {name}",
                    self.paint(style::DIM, &format!("{address} ▸"))
                )
            }
            ProgressKind::Counter {
                done,
                expected,
                unit,
                ..
            } if self.verbose > 0 => {
                let counted = if unit == "bytes" {
                    format!(
                        "{}/{}",
                        indicatif::HumanBytes(done),
                        indicatif::HumanBytes(expected)
                    )
                } else {
                    format!("{done}/{expected} {unit}")
                };
                put!(
                    "  {} {counted}",
                    self.paint(style::DIM, &format!("{address} ▸"))
                );
            }
            ProgressKind::SpanStart { name, .. } if self.verbose > 1 => {
                put!(
                    "  {} ▶ {name}",
                    self.paint(style::DIM, &format!("{address} │"))
                )
            }
            _ => {}
        }
    }
}

/// A provider's planned outputs, one per line: those known only after the run as such, the
/// others (not null) as compact JSON, long values cut.
fn planned_outputs(planned: &capstan_engine::plan::ProviderPlanned) -> Vec<String> {
    let Some(outputs) = planned.outputs.as_object() else {
        return Vec::new();
    };
    let mut names: Vec<&String> = outputs.keys().collect();
    names.sort();
    names
        .into_iter()
        .filter_map(|name| {
            if planned.unknown.contains(name) {
                return Some(format!("{name} = (known after apply)"));
            }
            let value = &outputs[name];
            if value.is_null() {
                return None;
            }
            let mut text = value.to_string();
            if text.chars().count() > 72 {
                text = text.chars().take(71).collect::<String>() + "…";
            }
            Some(format!("{name} = {text}"))
        })
        .collect()
}
