//! Plain types: `noop`, `handle`, `sleep`.

use super::*;

// ---- noop ----------------------------------------------------------------------------------

pub(super) struct Noop;

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct NoopIn {
    /// Any JSON value, echoed as the output `value`
    #[serde(default)]
    pub(super) value: Value,
    /// A line to println! (it ends up on stderr, never the socket)
    // (Shows that stdout cannot corrupt the protocol.)
    #[serde(default)]
    pub(super) print: Option<String>,
}

#[derive(Serialize, Deserialize, JsonSchema)]
pub(super) struct NoopOut {
    /// The input `value`
    pub(super) value: Value,
    /// Unique per create
    pub(super) id: String,
    /// The capabilities handed in (not declared: only there when some were).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(skip)]
    pub(super) handles: Vec<Value>,
}

impl Resource for Noop {
    type Inputs = NoopIn;
    type Outputs = NoopOut;

    fn resource_type() -> ResourceType {
        ResourceType::new("noop")
            .description("Does nothing; echoes its input")
            .inputs_from::<NoopIn>()
            .outputs_from::<NoopOut>()
    }

    async fn create(&self, op: &Operation, inputs: NoopIn) -> Result<NoopOut, OperationError> {
        if let Some(line) = &inputs.print {
            println!("{line}");
        }
        let mut handles = Vec::new();
        for (name, handle) in op.capabilities() {
            let (kind, address, summary) = describe_handle(handle).await.map_err(|e| {
                OperationError::transient(format!("capability `{name}` did not answer: {e}"))
            })?;
            handles
                .push(json!({"name": name, "kind": kind, "address": address, "summary": summary}));
        }
        Ok(NoopOut {
            value: inputs.value,
            id: unique_id(),
            handles,
        })
    }
}

// ---- handle --------------------------------------------------------------------------------

pub(super) struct Handle;

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct HandleIn {
    /// Put in the handle's summary
    #[serde(default)]
    pub(super) value: Value,
}

impl Resource for Handle {
    type Inputs = HandleIn;
    type Outputs = NoopOut;

    fn resource_type() -> ResourceType {
        ResourceType::new("handle")
            .description("Returns a capability named `handle` describing `value`")
            .inputs_from::<HandleIn>()
            .outputs_from::<NoopOut>()
    }

    async fn read(
        &self,
        op: &Operation,
        prior: capstan_provider::Prior<HandleIn, NoopOut>,
    ) -> Result<NoopOut, OperationError> {
        // A live handle again, for a run that needs it without re-creating anything.
        op.return_handle(
            "handle",
            "testing-handle",
            json!({"value": prior.inputs.value, "pid": std::process::id()}),
        );
        Ok(prior.outputs)
    }

    async fn create(&self, op: &Operation, inputs: HandleIn) -> Result<NoopOut, OperationError> {
        op.return_handle(
            "handle",
            "testing-handle",
            json!({"value": inputs.value, "pid": std::process::id()}),
        );
        Ok(NoopOut {
            value: inputs.value,
            id: unique_id(),
            handles: Vec::new(),
        })
    }
}

// ---- sleep ---------------------------------------------------------------------------------

pub(super) struct Sleep;

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct SleepIn {
    /// Milliseconds to sleep
    pub(super) ms: u64,
}

#[derive(Serialize, Deserialize, JsonSchema)]
pub(super) struct SleepOut {
    /// The time slept
    pub(super) slept_ms: u64,
}

impl Resource for Sleep {
    type Inputs = SleepIn;
    type Outputs = SleepOut;

    fn resource_type() -> ResourceType {
        ResourceType::new("sleep")
            .description("Sleeps, reporting progress every tenth of the time")
            .inputs_from::<SleepIn>()
            .outputs_from::<SleepOut>()
    }

    async fn create(&self, op: &Operation, inputs: SleepIn) -> Result<SleepOut, OperationError> {
        op.phase("sleeping").await;
        let step = Duration::from_millis(inputs.ms) / 10;
        for done in 0..10u64 {
            op.progress(done, 10, "steps").await;
            tokio::select! {
                () = tokio::time::sleep(step) => {}
                () = op.cancelled() => return Err(OperationError::cancelled("sleep cancelled")),
            }
        }
        op.progress(10, 10, "steps").await;
        Ok(SleepOut {
            slept_ms: inputs.ms,
        })
    }
}
