//! What a run reports as it goes: one event per thing that happened. The CLI renders them as a
//! live view or as newline-delimited JSON (`schema/events.schema.json`).

use capstan_schema::{LogStream, ProgressEvent};
use serde::Serialize;

use crate::plan::PlannedChange;

/// Counts for the end of a run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub struct Summary {
    pub created: usize,
    pub updated: usize,
    /// Deleted and made again: a change of provider or type, or of an input its provider
    /// cannot change in place (counted here, not as created, updated or deleted).
    pub replaced: usize,
    pub deleted: usize,
    pub unchanged: usize,
    pub failed: usize,
    pub skipped: usize,
    pub interrupted: usize,
    /// Evaluations of a deployment in Nix, the plan's and the run's (0 for JSON).
    pub evaluations: usize,
}

impl Summary {
    /// Whether everything that was asked for happened.
    pub fn succeeded(&self) -> bool {
        self.failed == 0 && self.skipped == 0 && self.interrupted == 0
    }
}

/// What kind of failure ended an operation (`schema/events.schema.json` lists them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// Reported by the provider: it will not work as asked.
    Permanent,
    /// Reported by the provider, or found by the core: the deployment must change.
    InvalidInput,
    /// Reported by the provider: trying again later may work (the core never retries).
    Transient,
    /// Reported by the provider: it was cancelled.
    Cancelled,
    /// Reported by the provider: a bug in it (a panic, say).
    Internal,
    /// The operation outlived its timeout and was cancelled.
    Timeout,
    /// The provider crashed, lost its connection, broke the protocol or returned a result
    /// without a declared output.
    Provider,
}

impl From<capstan_schema::ErrorKind> for FailureKind {
    fn from(kind: capstan_schema::ErrorKind) -> Self {
        use capstan_schema::ErrorKind as K;
        match kind {
            K::Permanent => FailureKind::Permanent,
            K::InvalidInput => FailureKind::InvalidInput,
            K::Transient => FailureKind::Transient,
            K::Cancelled => FailureKind::Cancelled,
            K::Internal => FailureKind::Internal,
            // Only a read may say so; from any other operation it is a plain failure.
            K::NotFound => FailureKind::Permanent,
            // The deployment's provider settings must change.
            K::Settings => FailureKind::InvalidInput,
        }
    }
}

/// One event. Field names are part of the JSON stream's contract: only ever add.
#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// The plan: one change per resource (before a run; during a run, what a later
    /// evaluation of a deployment in Nix adds).
    Plan {
        // Shared with the run that follows, so a large plan is not copied to be shown.
        changes: std::rc::Rc<Vec<PlannedChange>>,
    },
    /// An operation was recorded as started and sent to its provider.
    ResourceStart {
        address: String,
        #[schemars(with = "OperationName")]
        operation: &'static str,
        provider: String,
        #[serde(rename = "resource_type")]
        resource_type: String,
    },
    /// What the provider reported while the operation ran.
    ResourceProgress {
        address: String,
        #[schemars(with = "OperationName")]
        operation: &'static str,
        progress: ProgressEvent,
    },
    /// The operation succeeded, and its result is recorded.
    ResourceComplete {
        address: String,
        #[schemars(with = "OperationName")]
        operation: &'static str,
        elapsed_seconds: f64,
        /// The resource's outputs (null after a delete).
        outputs: capstan_schema::Json,
    },
    /// The operation failed (`kind` says how; the core never retries on its own).
    ResourceFailed {
        address: String,
        #[schemars(with = "OperationName")]
        operation: &'static str,
        error: String,
        kind: FailureKind,
        details: String,
        elapsed_seconds: f64,
    },
    /// The operation was not run: something it depends on did not succeed, or the run
    /// stopped first.
    ResourceSkipped {
        address: String,
        #[schemars(with = "OperationName")]
        operation: &'static str,
        reason: String,
        dependency: String,
    },
    /// A deployment written in Nix is being evaluated (stage 1 first; a stage again once
    /// outputs that deferred resources used exist).
    EvaluationStart { file: String, stage: usize },
    EvaluationComplete {
        file: String,
        stage: usize,
        /// Resources read in this stage, and those left for a later one.
        resources: usize,
        deferred: usize,
        elapsed_seconds: f64,
    },
    /// An evaluation failed: during the run, what still waits on it is skipped; before it
    /// (`stops_command`), the command stops with this error (the `error` event follows).
    EvaluationFailed {
        file: String,
        stage: usize,
        error: String,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        stops_command: bool,
        /// An evaluation given the recorded outputs, which took the deployment where one of
        /// them no longer holds: it is evaluated again from no output (nothing failed).
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        retried: bool,
    },
    /// A resource or nested deployment left for a later evaluation (after the plan).
    Deferred {
        address: String,
        what: DeferredKind,
        /// The resources whose outputs it used before they existed.
        waits_for: Vec<String>,
        /// For a nested deployment (or a member whose declaration waits): its recorded
        /// members, which the apply deletes if the evaluation with the new outputs no longer
        /// yields them (whether it will is known only then).
        #[serde(skip_serializing_if = "Vec::is_empty")]
        may_delete: Vec<String>,
    },
    /// With `--target`: the resources the plan would change that the selection leaves as they
    /// are (after the plan).
    NotSelected { addresses: Vec<String> },
    /// A line a provider process wrote outside any operation.
    ProviderLog {
        provider: String,
        stream: LogStream,
        line: String,
    },
    /// A line Nix printed while evaluating the deployment: a `builtins.trace` of its author, a
    /// warning (never a provider's).
    EvaluationLog { file: String, line: String },
    /// The command stopped with this error (written by the CLI with `--json`, as the last
    /// event: no summary follows). The same message goes to stderr.
    Error { message: String, exit_code: u8 },
    /// The run was told to stop (a signal): operations in flight are being cancelled.
    Interrupted { message: String },
    /// The last event of a run: how many resources ended how.
    Summary {
        #[serde(flatten)]
        counts: Summary,
        elapsed_seconds: f64,
    },
}

/// The operation an event is about, as written in the stream (for the schema: the events
/// carry it as text).
#[derive(schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)]
enum OperationName {
    Create,
    Read,
    Update,
    Delete,
    /// A read on an unchanged resource.
    Noop,
    /// A replace: its delete, then its create.
    Replace,
}

/// The JSON Schema of the stream `--json` writes: one object per line, a `version` line first,
/// then one per [`Event`], each with `type`, a monotonic `seq` and a `timestamp`. Derived from
/// the types themselves (`schema/events.schema.json` is this, checked for drift by a test).
pub fn stream_schema() -> serde_json::Value {
    use serde_json::json;
    // As the stream is written: a field left out when empty is not required.
    let generator = schemars::generate::SchemaSettings::draft2020_12()
        .for_serialize()
        .into_generator();
    let event = serde_json::to_value(generator.into_root_schema_for::<Event>()).unwrap_or_default();
    let mut variants = event["oneOf"].as_array().cloned().unwrap_or_default();
    variants.insert(
        0,
        json!({
            "description": "The first line: the capstan that wrote the stream, the stream's version, and the command.",
            "type": "object",
            "required": ["type", "capstan", "ui", "command"],
            "properties": {
                "type": {"type": "string", "const": "version"},
                "capstan": {"type": "string"},
                "ui": {"type": "string", "description": "The stream's version: a minor version only adds fields and event types."},
                "command": {"type": "string", "enum": ["plan", "apply", "destroy"]}
            }
        }),
    );
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://capstan.invalid/schema/events.schema.json",
        "title": "Capstan JSON event stream (capstan plan|apply|destroy --json)",
        "description": "Generated from the Rust types (capstan_engine::events::stream_schema); do not edit by hand. One JSON object per line on stdout. The first line is a `version` event. Every line has `type`, a monotonic `seq` (from 0) and a `timestamp` (seconds since the Unix epoch, fractional); every line after the first, `trace_id` and `span_id`. Consumers must ignore fields and event types they do not know.",
        "type": "object",
        "required": ["type", "seq", "timestamp"],
        "properties": {
            "type": {"type": "string"},
            "seq": {"type": "integer", "minimum": 0},
            "timestamp": {"type": "number"},
            "trace_id": {"type": "string", "pattern": "^[0-9a-f]{32}$", "description": "The run's OpenTelemetry trace (W3C hex; the caller's with TRACEPARENT). On every event after the version line."},
            "span_id": {"type": "string", "pattern": "^[0-9a-f]{16}$", "description": "The span the event belongs to: its operation's (the traceparent its provider was given) for a resource's events, else the run's."}
        },
        "oneOf": variants,
        "$defs": event["$defs"],
    })
}

/// Where events go.
pub trait EventSink {
    fn emit(&self, event: Event);
}

/// What a deferred item of a deployment in Nix is (see `crate::nix`).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, Serialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum DeferredKind {
    /// A resource whose inputs use outputs that do not exist yet.
    Resource,
    /// A nested deployment whose members depend on such outputs.
    Nested,
    /// A member whose very declaration depends on them (not known to be either).
    Member,
}

/// Keeps `RefCell` out of the public API while letting tests collect events.
pub struct CollectEvents(pub std::cell::RefCell<Vec<Event>>);

impl EventSink for CollectEvents {
    fn emit(&self, event: Event) {
        self.0.borrow_mut().push(event);
    }
}
