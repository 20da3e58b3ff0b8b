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
pub const JSON_STREAM_VERSION: &str = "1.2";

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
        self.write(serde_json::to_string(&event).expect("events always encode"));
    }
}

/// Lines for a person, on stderr. Shows what starts, finishes, fails and is skipped, each
/// resource's log lines and messages as they arrive, and (with -v) spans and counters.
pub struct HumanEvents {
    verbose: u8,
    color: bool,
    /// Where the plan goes, when it is the command's output (`capstan plan`); else stderr.
    plan_out: Option<RefCell<Stdout>>,
}

impl HumanEvents {
    pub fn new(verbose: u8, color: Option<bool>) -> Self {
        let color = crate::style::enabled(std::io::stderr().is_terminal(), color);
        HumanEvents {
            verbose,
            color,
            plan_out: None,
        }
    }

    /// Prints the plan on `stdout` (coloured only if that is a terminal, when the colour is
    /// not forced), everything else on stderr.
    pub fn plan_to(mut self, stdout: Stdout, color: Option<bool>) -> Self {
        self.color = crate::style::enabled(stdout.is_terminal(), color);
        self.plan_out = Some(RefCell::new(stdout));
        self
    }

    fn paint(&self, style: anstyle::Style, text: &str) -> String {
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
        let to_stdout =
            matches!(event, Event::Plan { .. } | Event::Deferred { .. }) && self.plan_out.is_some();
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
    fn lines(&self, event: Event, live: bool) -> Vec<String> {
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
                put!("  {} {error}", self.paint(style::RED, "✗"));
                for line in details.lines() {
                    put!("      {line}");
                }
            }
            Event::ResourceSkipped {
                address, reason, ..
            } => {
                put!(
                    "  {} {address}: skipped ({reason})",
                    self.paint(style::YELLOW, "↷")
                );
            }
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
            Event::EvaluationFailed { file, stage, error } => {
                put!(
                    "  {} {file}: evaluation (stage {stage}) failed:",
                    self.paint(style::RED, "✗")
                );
                for line in error.lines() {
                    put!("      {line}");
                }
            }
            Event::Deferred {
                address,
                what,
                waits_for,
            } => {
                let what = match what {
                    capstan_engine::nix::DeferredKind::Resource => "its inputs use",
                    capstan_engine::nix::DeferredKind::Nested => "its members depend on",
                    capstan_engine::nix::DeferredKind::Member => "its declaration uses",
                };
                put!(
                    "  {} {address}  (deferred: {what} outputs of {}; evaluated again once they exist)",
                    self.paint(style::CYAN, "…"),
                    waits_for
                        .iter()
                        .map(|w| format!("`{w}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            Event::ProviderLog { provider, line, .. } => {
                put!(
                    "  {} {line}",
                    self.paint(style::DIM, &format!("provider {provider}:"))
                );
            }
            Event::Interrupted { message } => put!("{}", self.paint(style::YELLOW, &message)),
            Event::Summary {
                counts,
                elapsed_seconds,
            } => {
                put!(
                    "{}: {} created, {} updated, {} deleted, {} unchanged, {} failed, {} skipped{} in {elapsed_seconds:.2}s.",
                    if counts.succeeded() { "Done" } else { "Finished with problems" },
                    counts.created, counts.updated, counts.deleted, counts.unchanged, counts.failed, counts.skipped,
                    if counts.interrupted > 0 { format!(", {} interrupted", counts.interrupted) } else { String::new() },
                );
            }
        }
        out
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
                put!(
                    "  {} {done}/{expected} {unit}",
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

/// The live view on a terminal: finished resources, failures and log lines scroll by, and
/// under them one line per running resource shows its address, operation, elapsed time, a
/// progress bar when the provider reports done/expected, and its phase or latest message.
pub struct LiveEvents {
    lines: HumanEvents,
    live: RefCell<Live>,
}

#[derive(Default)]
struct Live {
    running: std::collections::BTreeMap<String, Running>,
    /// Lines to print above the block at the next redraw.
    pending: String,
}

/// How often the live view is redrawn (events in between are gathered: drawing on every
/// event made a run of 10,000 quick resources 2.5 times slower than without the view).
const REDRAW_EVERY: std::time::Duration = std::time::Duration::from_millis(100);
/// Lines gathered beyond this are printed at once rather than at the next tick.
const PENDING_LIMIT: usize = 256 * 1024;
/// At most this many running resources are drawn; the rest are counted.
const MAX_DRAWN: usize = 20;

struct Running {
    operation: &'static str,
    started: std::time::Instant,
    status: String,
    counter: Option<(u64, u64, String)>,
}

/// The terminal's columns and rows (100 × 40 when it does not say).
fn terminal_size() -> (usize, usize) {
    match rustix::termios::tcgetwinsize(std::io::stderr()) {
        Ok(size) if size.ws_col > 0 => {
            let rows = if size.ws_row > 0 {
                size.ws_row as usize
            } else {
                40
            };
            (size.ws_col as usize, rows)
        }
        _ => (100, 40),
    }
}

fn fit(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        text.to_string()
    } else {
        text.chars()
            .take(width.saturating_sub(1))
            .chain(std::iter::once('…'))
            .collect()
    }
}

impl LiveEvents {
    /// A live view, redrawn every 100 ms while anything runs or lines wait to be printed,
    /// and at once for the plan, an interrupt and the summary.
    pub fn new(lines: HumanEvents) -> Rc<Self> {
        let view = Rc::new(LiveEvents {
            lines,
            live: RefCell::new(Live::default()),
        });
        let weak = Rc::downgrade(&view);
        tokio::task::spawn_local(async move {
            let mut tick = tokio::time::interval(REDRAW_EVERY);
            loop {
                tick.tick().await;
                let Some(view) = weak.upgrade() else { return };
                let busy = {
                    let live = view.live.borrow();
                    !live.running.is_empty() || !live.pending.is_empty()
                };
                // A terminal that does not keep up (paused with Ctrl-S, a slow link) gets no
                // more redraws to queue until it has taken the last one.
                if busy && !crate::output::stderr_backlog() {
                    view.redraw();
                }
            }
        });
        view
    }

    /// Clears the block of running lines, prints the lines gathered since, draws the block
    /// again.
    fn redraw(&self) {
        let mut live = self.live.borrow_mut();
        let (width, height) = terminal_size();
        // The block never reaches the top of the window (the cursor cannot move above it to
        // erase it again).
        let most = MAX_DRAWN.min(height.saturating_sub(3));
        let mut out = String::new();
        out.push_str(&std::mem::take(&mut live.pending));
        let mut drawn = 0;
        let hidden = live.running.len().saturating_sub(most);
        for (address, r) in live.running.iter().take(most) {
            let elapsed = r.started.elapsed().as_secs_f64();
            let bar = match &r.counter {
                Some((done, expected, unit)) if *expected > 0 => {
                    let filled = (*done * 20 / expected).min(20) as usize;
                    format!(
                        " [{}{}] {done}/{expected} {unit}",
                        "█".repeat(filled),
                        "░".repeat(20 - filled)
                    )
                }
                Some((done, _, unit)) => format!(" {done} {unit}"),
                None => String::new(),
            };
            let spinner =
                ["⠋", "⠙", "⠹", "⠸", "⠼", "⠴", "⠦", "⠧", "⠇", "⠏"][(elapsed * 10.0) as usize % 10];
            let line = format!(
                "{spinner} {address} {} {elapsed:5.1}s{bar} {}",
                r.operation, r.status
            );
            out.push_str(
                &self
                    .lines
                    .paint(style::CYAN, &fit(&line, width.saturating_sub(1))),
            );
            out.push('\n');
            drawn += 1;
        }
        if hidden > 0 {
            let more = fit(
                &format!("  … and {hidden} more running"),
                width.saturating_sub(1),
            );
            out.push_str(&self.lines.paint(style::DIM, &more));
            out.push('\n');
            drawn += 1;
        }
        // `to_stderr` erases the block drawn before (or nothing, if something else already
        // wrote below it); this one is then the block to erase next.
        crate::output::to_stderr(out.as_bytes());
        crate::output::set_live_lines(drawn);
    }
}

impl Drop for LiveEvents {
    /// Whatever ends the view, no gathered line is lost, and the block of running resources
    /// (if it is still the last thing written) goes.
    fn drop(&mut self) {
        let live = self.live.get_mut();
        let pending = std::mem::take(&mut live.pending);
        let mut out = crate::output::erase_live_lines();
        out.extend_from_slice(pending.as_bytes());
        if !out.is_empty() {
            crate::output::to_stderr(&out);
        }
    }
}

impl EventSink for LiveEvents {
    fn emit(&self, event: Event) {
        {
            let mut live = self.live.borrow_mut();
            match &event {
                Event::ResourceStart {
                    address, operation, ..
                } => {
                    live.running.insert(
                        address.clone(),
                        Running {
                            operation,
                            started: std::time::Instant::now(),
                            status: String::new(),
                            counter: None,
                        },
                    );
                }
                Event::ResourceProgress {
                    address, progress, ..
                } => {
                    if let Some(r) = live.running.get_mut(address) {
                        match &progress.kind {
                            ProgressKind::Phase { name, .. } => r.status = name.clone(),
                            ProgressKind::Event { message, .. } => r.status = message.clone(),
                            ProgressKind::Log { line, .. } => r.status = line.clone(),
                            ProgressKind::Counter {
                                done,
                                expected,
                                unit,
                                ..
                            } => r.counter = Some((*done, *expected, unit.clone())),
                            _ => {}
                        }
                    }
                }
                Event::ResourceComplete { address, .. } | Event::ResourceFailed { address, .. } => {
                    live.running.remove(address);
                }
                Event::EvaluationStart { file, stage } => {
                    live.running.insert(
                        file.clone(),
                        Running {
                            operation: "evaluate",
                            started: std::time::Instant::now(),
                            status: format!("stage {stage}"),
                            counter: None,
                        },
                    );
                }
                Event::EvaluationComplete { file, .. } | Event::EvaluationFailed { file, .. } => {
                    live.running.remove(file);
                }
                Event::Interrupted { .. } => {}
                _ => {}
            }
        }
        let now = matches!(
            event,
            Event::Plan { .. } | Event::Interrupted { .. } | Event::Summary { .. }
        );
        let above = self.lines.lines(event, true);
        let full = {
            let mut live = self.live.borrow_mut();
            for line in above {
                live.pending.push_str(&line);
                live.pending.push('\n');
            }
            live.pending.len() > PENDING_LIMIT
        };
        if now || full {
            self.redraw();
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
