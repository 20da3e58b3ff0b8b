//! Types that measure or use concurrency: `probe`, `fanout` (children), `permits`.

use super::*;

// ---- probe ---------------------------------------------------------------------------------

pub(super) static RUNNING: AtomicU64 = AtomicU64::new(0);
pub(super) static PEAK: AtomicU64 = AtomicU64::new(0);

pub(super) struct Probe;

// The fields are in the order the handshake lists the inputs.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct ProbeIn {
    /// How long to take
    #[serde(default)]
    pub(super) ms: u64,
    /// Fail instead of succeeding
    #[serde(default)]
    pub(super) fail: bool,
    /// Echoed as the output `value`
    // Anything; lets a deployment wire references through a probe.
    #[serde(default)]
    pub(super) value: Value,
    /// Counts operations at once among probes of this group too
    // (In `group_peak`.)
    #[serde(default)]
    pub(super) group: String,
    /// A path: deleting fails while a file exists there
    #[serde(default, rename = "blockDelete")]
    pub(super) block_delete: Option<String>,
}

#[derive(Serialize, Deserialize, JsonSchema)]
pub(super) struct ProbeOut {
    /// The input `value`
    pub(super) value: Value,
    /// Unique per operation
    pub(super) id: String,
    /// The most operations this process has run at once so far
    pub(super) peak: u64,
    /// The most operations of this probe's group run at once so far
    pub(super) group_peak: u64,
}

/// Operations running and the most at once, per probe group.
pub(super) static GROUPS: std::sync::Mutex<BTreeMap<String, (u64, u64)>> =
    std::sync::Mutex::new(BTreeMap::new());

/// Counts this operation as running, in the process and in its group, for as long as it lives.
pub(super) struct Running(pub(super) String);

impl Running {
    fn enter(group: &str) -> Self {
        let now = RUNNING.fetch_add(1, Ordering::SeqCst) + 1;
        PEAK.fetch_max(now, Ordering::SeqCst);
        let mut groups = GROUPS.lock().unwrap_or_else(|e| e.into_inner());
        let (running, peak) = groups.entry(group.to_string()).or_default();
        *running += 1;
        *peak = (*peak).max(*running);
        Running(group.to_string())
    }

    fn group_peak(&self) -> u64 {
        let groups = GROUPS.lock().unwrap_or_else(|e| e.into_inner());
        groups.get(&self.0).map(|(_, peak)| *peak).unwrap_or(0)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        RUNNING.fetch_sub(1, Ordering::SeqCst);
        let mut groups = GROUPS.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((running, _)) = groups.get_mut(&self.0) {
            *running -= 1;
        }
    }
}

impl Resource for Probe {
    type Inputs = ProbeIn;
    type Outputs = ProbeOut;

    fn resource_type() -> ResourceType {
        ResourceType::new("probe")
            .description("Measures how many operations the provider runs at once")
            .inputs_from::<ProbeIn>()
            .outputs_from::<ProbeOut>()
            .stateful(true)
    }

    async fn create(&self, _op: &Operation, inputs: ProbeIn) -> Result<ProbeOut, OperationError> {
        let running = Running::enter(&inputs.group);
        if inputs.ms > 0 {
            tokio::time::sleep(Duration::from_millis(inputs.ms)).await;
        } else {
            tokio::task::yield_now().await;
        }
        if inputs.fail {
            return Err(OperationError::permanent("probe failed as asked"));
        }
        Ok(ProbeOut {
            value: inputs.value,
            id: unique_id(),
            peak: PEAK.load(Ordering::SeqCst),
            group_peak: running.group_peak(),
        })
    }

    async fn delete(
        &self,
        _op: &Operation,
        prior: capstan_provider::Prior<ProbeIn, ProbeOut>,
    ) -> Result<(), OperationError> {
        match &prior.inputs.block_delete {
            Some(path) if std::path::Path::new(path).exists() => Err(OperationError::transient(
                format!("deletion is blocked while {path} exists"),
            )),
            _ => Ok(()),
        }
    }
}

// ---- fanout / permits ------------------------------------------------------------------------

pub(super) struct Fanout;

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct FanoutIn {
    /// How many children
    pub(super) count: u32,
    /// The children's type (default `probe`)
    #[serde(default = "probe_type", rename = "type")]
    pub(super) child_type: String,
    /// Every child's inputs
    // Each also gets `index` (for a `noop`'s `value`, or a probe's).
    #[serde(default)]
    pub(super) inputs: serde_json::Map<String, Value>,
    /// Indices of children asked to fail
    // Their inputs get `"fail": true` (for probes).
    #[serde(default)]
    pub(super) fail: Vec<u32>,
    /// The children's provider (default this one)
    #[serde(default)]
    pub(super) provider: Option<String>,
    /// Succeed although children failed
    // (Reporting them.)
    #[serde(default)]
    pub(super) tolerate: bool,
    /// The child input set to its index (default `value`; "": none)
    #[serde(default = "value_key")]
    pub(super) index: String,
    /// End the provider process once the children are done
    // (A crash mid-way.)
    #[serde(default)]
    pub(super) crash: bool,
}

pub(super) fn probe_type() -> String {
    "probe".into()
}

pub(super) fn value_key() -> String {
    "value".into()
}

#[derive(Serialize, Deserialize, JsonSchema)]
pub(super) struct FanoutOut {
    /// Each child's outputs, or its error
    // In order; an error as `{"error": message}`.
    pub(super) children: Vec<Value>,
    /// How many children failed
    pub(super) failed: u32,
}

pub(super) async fn fan_out(
    op: &Operation,
    inputs: &FanoutIn,
) -> Result<FanoutOut, OperationError> {
    let children = (0..inputs.count).map(|n| {
        let mut child = inputs.inputs.clone();
        if !inputs.index.is_empty() {
            child.insert(inputs.index.clone(), json!(n));
        }
        if inputs.fail.contains(&n) {
            child.insert("fail".into(), json!(true));
        }
        let child = Value::Object(child);
        async move {
            op.child(
                &format!("c{n}"),
                inputs.provider.as_deref(),
                &inputs.child_type,
                &child,
            )
            .await
        }
    });
    let mut out = FanoutOut {
        children: Vec::new(),
        failed: 0,
    };
    let mut first_error = None;
    let results = futures::future::join_all(children).await;
    if inputs.crash {
        eprintln!("testing provider: crashing after the children, as asked");
        std::process::exit(3);
    }
    for (n, result) in results.into_iter().enumerate() {
        match result {
            Ok(outputs) => out.children.push(outputs),
            Err(e) => {
                out.failed += 1;
                out.children.push(json!({"error": e.message}));
                first_error.get_or_insert((n, e));
            }
        }
    }
    match first_error {
        Some((n, e)) if !inputs.tolerate => Err(OperationError::new(
            e.kind,
            format!("child c{n} failed: {}", e.message),
        )),
        _ => Ok(out),
    }
}

impl Resource for Fanout {
    type Inputs = FanoutIn;
    type Outputs = FanoutOut;

    fn resource_type() -> ResourceType {
        ResourceType::new("fanout")
            .description("Runs children through the core's scheduler")
            .inputs_from::<FanoutIn>()
            .outputs_from::<FanoutOut>()
            .stateful(true)
            .uses_scheduler(true)
    }

    async fn create(&self, op: &Operation, inputs: FanoutIn) -> Result<FanoutOut, OperationError> {
        fan_out(op, &inputs).await
    }

    async fn update(
        &self,
        op: &Operation,
        _prior: capstan_provider::Prior<FanoutIn, FanoutOut>,
        inputs: FanoutIn,
    ) -> Result<FanoutOut, OperationError> {
        fan_out(op, &inputs).await
    }
}

pub(super) struct Permits;

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct PermitsIn {
    /// How many pieces of work, each under a permit
    pub(super) count: u32,
    /// How long each takes
    #[serde(default)]
    pub(super) ms: u64,
    /// The probe group they count in
    #[serde(default)]
    pub(super) group: String,
    /// End the provider process while holding the permits
    #[serde(default)]
    pub(super) crash: bool,
}

#[derive(Serialize, Deserialize, JsonSchema)]
pub(super) struct PermitsOut {
    /// The most run at once
    // The most permits' work this process ran at once (in `group`).
    pub(super) group_peak: u64,
}

impl Resource for Permits {
    type Inputs = PermitsIn;
    type Outputs = PermitsOut;

    fn resource_type() -> ResourceType {
        ResourceType::new("permits")
            .description("Does work of its own under permits borrowed from the core")
            .inputs_from::<PermitsIn>()
            .outputs_from::<PermitsOut>()
            .uses_scheduler(true)
    }

    async fn create(
        &self,
        op: &Operation,
        inputs: PermitsIn,
    ) -> Result<PermitsOut, OperationError> {
        if inputs.crash {
            let mut held = Vec::new();
            for _ in 0..inputs.count {
                held.push(op.permit().await?);
            }
            eprintln!("testing provider: crashing while holding permits, as asked");
            std::process::exit(3);
        }
        let work = (0..inputs.count).map(|_| async {
            let permit = op.permit().await?;
            let running = Running::enter(&inputs.group);
            tokio::time::sleep(Duration::from_millis(inputs.ms)).await;
            let peak = running.group_peak();
            drop(running);
            permit.release().await?;
            Ok::<u64, OperationError>(peak)
        });
        let mut group_peak = 0;
        for peak in futures::future::join_all(work).await {
            group_peak = group_peak.max(peak?);
        }
        Ok(PermitsOut { group_peak })
    }
}
