//! What a run reports as it goes: one event per thing that happened. The CLI renders them as a
//! live view or as newline-delimited JSON (`schema/events.schema.json`).

use capstan_schema::{LogStream, ProgressEvent};
use serde::Serialize;

use crate::plan::PlannedChange;

/// Counts for the end of a run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub created: usize,
    pub updated: usize,
    pub deleted: usize,
    pub unchanged: usize,
    pub failed: usize,
    pub skipped: usize,
    pub interrupted: usize,
}

impl Summary {
    /// Whether everything that was asked for happened.
    pub fn succeeded(&self) -> bool {
        self.failed == 0 && self.skipped == 0 && self.interrupted == 0
    }
}

/// What kind of failure ended an operation (`schema/events.schema.json` lists them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
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
        }
    }
}

/// One event. Field names are part of the JSON stream's contract: only ever add.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    Plan {
        /// Shared with the run that follows, so a large plan is not copied to be shown.
        changes: std::rc::Rc<Vec<PlannedChange>>,
    },
    ResourceStart {
        address: String,
        operation: &'static str,
        provider: String,
        #[serde(rename = "resource_type")]
        resource_type: String,
    },
    ResourceProgress {
        address: String,
        operation: &'static str,
        progress: ProgressEvent,
    },
    ResourceComplete {
        address: String,
        operation: &'static str,
        elapsed_seconds: f64,
        /// The resource's outputs (null after a delete).
        outputs: capstan_schema::Json,
    },
    ResourceFailed {
        address: String,
        operation: &'static str,
        error: String,
        kind: FailureKind,
        details: String,
        elapsed_seconds: f64,
    },
    ResourceSkipped {
        address: String,
        operation: &'static str,
        reason: String,
        dependency: String,
    },
    /// A deployment written in Nix is being evaluated (stage 1 first; a stage again once
    /// outputs that deferred resources used exist).
    EvaluationStart {
        file: String,
        stage: usize,
    },
    EvaluationComplete {
        file: String,
        stage: usize,
        /// Resources read in this stage, and those left for a later one.
        resources: usize,
        deferred: usize,
        elapsed_seconds: f64,
    },
    /// An evaluation during the run failed: what still waits on it is skipped.
    EvaluationFailed {
        file: String,
        stage: usize,
        error: String,
    },
    /// A resource or nested deployment left for a later evaluation (after the plan).
    Deferred {
        address: String,
        what: DeferredKind,
        /// The resources whose outputs it used before they existed.
        waits_for: Vec<String>,
    },
    ProviderLog {
        provider: String,
        stream: LogStream,
        line: String,
    },
    Interrupted {
        message: String,
    },
    Summary {
        #[serde(flatten)]
        counts: Summary,
        elapsed_seconds: f64,
    },
}

/// Where events go.
pub trait EventSink {
    fn emit(&self, event: Event);
}

/// What a deferred item of a deployment in Nix is (see `crate::nix`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, Serialize)]
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
