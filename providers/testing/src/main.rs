//! `capstan-provider-testing`: a provider whose resource types exist to exercise the core.
//!
//! | type | does |
//! | --- | --- |
//! | `noop` | echoes `value`; returns a unique `id`; describes any capabilities handed in |
//! | `handle` | returns a capability (`handle`) that describes itself |
//! | `sleep` | sleeps `ms` milliseconds, reporting phases and a counter |
//! | `fail` | fails with the given `kind` and `message` |
//! | `panic` | panics |
//! | `crash` | kills its own process (`mode`: `exit`, `abort`, `sigkill`) |
//! | `hang` | never finishes; on cancellation writes `cancelMarker` (if given) |
//! | `chatty` | emits `count` progress events through tracing or explicit log lines |
//! | `big` | returns an output of `bytes` bytes (for message-size limits) |
//! | `corrupt` | writes garbage bytes onto its own RPC socket |
//! | `probe` | waits `ms`, reports how many operations this process ran at once (`peak`) and how many of its `group` (`group_peak`); fails if `fail`; its delete fails while a file is at `blockDelete` |
//! | `fanout` | runs `count` children (`type`, default `probe`, with `inputs`, and the input named by `index` set to the child's number) through the core's scheduler, all at once; fails if one does, unless `tolerate` |
//! | `permits` | borrows `count` permits from the core at once, each held `ms` while counted in probe group `group` |
//!
//! Options (`--help` lists them): `--listen PATH` serves as a standing service at PATH; `--max-concurrency N`
//! declares a limit; `--protocol MIN:MAX` claims other protocol versions (to test refusal);
//! `--stderr-lines N` writes N lines to stderr at start-up; `--linger` stays alive, ignoring
//! SIGTERM, after the core disconnects (to test escalation to SIGKILL); `--leak-child` starts a
//! `sleep` that outlives the provider (to test leaked-process cleanup).

/// glibc's allocator spends a large share of each RPC in malloc/free; mimalloc does not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::BTreeMap;
use std::os::fd::RawFd;
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::time::Duration;

use capstan_host::describe_handle;
use capstan_provider::{
    Endpoint, ErrorKind, LogStream, Operation, OperationError, Provider, Resource, ResourceType,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// A duplicate of the inherited connection socket, for `corrupt`.
static RAW_SOCKET: AtomicI32 = AtomicI32::new(-1);
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn unique_id() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

// ---- noop ----------------------------------------------------------------------------------

struct Noop;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoopIn {
    #[serde(default)]
    value: Value,
    /// Printed with `println!`, to show that stdout cannot corrupt the protocol.
    #[serde(default)]
    print: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct NoopOut {
    value: Value,
    id: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    handles: Vec<Value>,
}

impl Resource for Noop {
    type Inputs = NoopIn;
    type Outputs = NoopOut;

    fn resource_type() -> ResourceType {
        ResourceType::new("noop")
            .description("Does nothing; echoes its input")
            .optional("value", "Any JSON value, echoed as the output `value`")
            .optional(
                "print",
                "A line to println! (it ends up on stderr, never the socket)",
            )
            .output("value", "The input `value`")
            .output("id", "Unique per create")
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

struct Handle;

impl Resource for Handle {
    type Inputs = NoopIn;
    type Outputs = NoopOut;

    fn resource_type() -> ResourceType {
        ResourceType::new("handle")
            .description("Returns a capability named `handle` describing `value`")
            .optional("value", "Put in the handle's summary")
            .output("value", "The input `value`")
            .output("id", "Unique per create")
    }

    async fn read(
        &self,
        op: &Operation,
        prior: capstan_provider::Prior<NoopIn, NoopOut>,
    ) -> Result<NoopOut, OperationError> {
        // A live handle again, for a run that needs it without re-creating anything.
        op.return_handle(
            "handle",
            "testing-handle",
            json!({"value": prior.inputs.value, "pid": std::process::id()}),
        );
        Ok(prior.outputs)
    }

    async fn create(&self, op: &Operation, inputs: NoopIn) -> Result<NoopOut, OperationError> {
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

struct Sleep;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SleepIn {
    ms: u64,
}

#[derive(Serialize, Deserialize)]
struct SleepOut {
    slept_ms: u64,
}

impl Resource for Sleep {
    type Inputs = SleepIn;
    type Outputs = SleepOut;

    fn resource_type() -> ResourceType {
        ResourceType::new("sleep")
            .description("Sleeps, reporting progress every tenth of the time")
            .required("ms", "Milliseconds to sleep")
            .output("slept_ms", "The time slept")
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

// ---- fail / panic / crash ------------------------------------------------------------------

struct Fail;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FailIn {
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

impl Resource for Fail {
    type Inputs = FailIn;
    type Outputs = Value;

    fn resource_type() -> ResourceType {
        ResourceType::new("fail")
            .description("Always fails")
            .optional(
                "kind",
                "permanent | invalid_input | transient | cancelled | internal",
            )
            .optional("message", "The error message")
    }

    async fn create(&self, _op: &Operation, inputs: FailIn) -> Result<Value, OperationError> {
        let kind = match inputs.kind.as_deref().unwrap_or("permanent") {
            "invalid_input" => ErrorKind::InvalidInput,
            "transient" => ErrorKind::Transient,
            "cancelled" => ErrorKind::Cancelled,
            "internal" => ErrorKind::Internal,
            _ => ErrorKind::Permanent,
        };
        Err(OperationError::new(
            kind,
            inputs.message.unwrap_or_else(|| "failed as asked".into()),
        )
        .with_details("details: line 1\ndetails: line 2"))
    }
}

struct Panic;

impl Resource for Panic {
    type Inputs = FailIn;
    type Outputs = Value;

    fn resource_type() -> ResourceType {
        ResourceType::new("panic")
            .description("Panics in the middle of the operation")
            .optional("message", "The panic message")
    }

    async fn create(&self, _op: &Operation, inputs: FailIn) -> Result<Value, OperationError> {
        tokio::task::yield_now().await;
        panic!(
            "{}",
            inputs.message.unwrap_or_else(|| "testing panic".into())
        );
    }
}

struct Crash;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CrashIn {
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    code: Option<i32>,
}

impl Resource for Crash {
    type Inputs = CrashIn;
    type Outputs = Value;

    fn resource_type() -> ResourceType {
        ResourceType::new("crash")
            .description("Ends the provider process mid-operation")
            .optional("mode", "exit (default) | abort | sigkill")
            .optional("code", "Exit status for mode exit (default 3)")
    }

    async fn create(&self, op: &Operation, inputs: CrashIn) -> Result<Value, OperationError> {
        op.phase("about to crash").await;
        eprintln!("testing provider: crashing on purpose ({})", op.address());
        match inputs.mode.as_deref().unwrap_or("exit") {
            // SAFETY: raise/abort end this process, as asked.
            "sigkill" => unsafe {
                libc::raise(libc::SIGKILL);
            },
            "abort" => std::process::abort(),
            _ => std::process::exit(inputs.code.unwrap_or(3)),
        }
        unreachable!("the process is gone")
    }
}

// ---- hang ----------------------------------------------------------------------------------

struct Hang;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HangIn {
    #[serde(default)]
    cancel_marker: Option<String>,
    #[serde(default)]
    ignore_cancel: bool,
}

impl Resource for Hang {
    type Inputs = HangIn;
    type Outputs = Value;

    fn resource_type() -> ResourceType {
        ResourceType::new("hang")
            .description("Never finishes; notices cancellation")
            .optional(
                "cancelMarker",
                "A file written when the operation sees its cancellation",
            )
            .optional(
                "ignoreCancel",
                "Keep hanging after cancellation (tests the grace period)",
            )
    }

    async fn create(&self, op: &Operation, inputs: HangIn) -> Result<Value, OperationError> {
        op.phase("hanging").await;
        op.cancelled().await;
        if let Some(marker) = &inputs.cancel_marker {
            let _ = std::fs::write(marker, format!("cancelled {}\n", op.address()));
        }
        if inputs.ignore_cancel {
            std::future::pending::<()>().await;
        }
        Err(OperationError::cancelled("hang cancelled"))
    }
}

// ---- chatty --------------------------------------------------------------------------------

struct Chatty;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChattyIn {
    #[serde(default = "default_count")]
    count: u64,
    #[serde(default)]
    via: Option<String>,
    #[serde(default)]
    delay_ms: u64,
}

fn default_count() -> u64 {
    1000
}

#[derive(Serialize, Deserialize)]
struct ChattyOut {
    count: u64,
}

impl Resource for Chatty {
    type Inputs = ChattyIn;
    type Outputs = ChattyOut;

    fn resource_type() -> ResourceType {
        ResourceType::new("chatty")
            .description("Emits many progress events inside a span")
            .optional("count", "How many events (default 1000)")
            .optional("via", "tracing (default) | log")
            .optional("delay_ms", "Pause between events")
            .output("count", "How many were emitted")
    }

    async fn create(&self, op: &Operation, inputs: ChattyIn) -> Result<ChattyOut, OperationError> {
        let via_log = inputs.via.as_deref() == Some("log");
        let span = tracing::info_span!("chatter", count = inputs.count);
        let _entered = span.enter();
        for n in 0..inputs.count {
            if via_log {
                op.log(LogStream::Stdout, format!("line {n}")).await;
            } else {
                tracing::info!(n, "event {n}");
                if n % 256 == 255 {
                    op.ready().await;
                }
            }
            if inputs.delay_ms > 0 {
                tokio::time::sleep(Duration::from_millis(inputs.delay_ms)).await;
            }
            if n % 100 == 99 {
                op.progress(n + 1, inputs.count, "events").await;
            }
            if op.is_cancelled() {
                return Err(OperationError::cancelled("chatty cancelled"));
            }
        }
        Ok(ChattyOut {
            count: inputs.count,
        })
    }
}

// ---- probe ---------------------------------------------------------------------------------

static RUNNING: AtomicU64 = AtomicU64::new(0);
static PEAK: AtomicU64 = AtomicU64::new(0);

struct Probe;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProbeIn {
    #[serde(default)]
    ms: u64,
    /// Deleting fails while a file exists at this path.
    #[serde(default, rename = "blockDelete")]
    block_delete: Option<String>,
    #[serde(default)]
    fail: bool,
    /// Anything; lets a deployment wire references through a probe.
    #[serde(default)]
    value: Value,
    /// Also counts operations at once among probes of this group (`group_peak`).
    #[serde(default)]
    group: String,
}

#[derive(Serialize, Deserialize)]
struct ProbeOut {
    value: Value,
    id: String,
    peak: u64,
    group_peak: u64,
}

/// Operations running and the most at once, per probe group.
static GROUPS: std::sync::Mutex<BTreeMap<String, (u64, u64)>> =
    std::sync::Mutex::new(BTreeMap::new());

/// Counts this operation as running, in the process and in its group, for as long as it lives.
struct Running(String);

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
            .optional("ms", "How long to take")
            .optional("fail", "Fail instead of succeeding")
            .optional("value", "Echoed as the output `value`")
            .optional(
                "group",
                "Counts operations at once among probes of this group too",
            )
            .optional(
                "blockDelete",
                "A path: deleting fails while a file exists there",
            )
            .output("value", "The input `value`")
            .output("id", "Unique per operation")
            .output(
                "peak",
                "The most operations this process has run at once so far",
            )
            .output(
                "group_peak",
                "The most operations of this probe's group run at once so far",
            )
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

struct Fanout;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FanoutIn {
    count: u32,
    #[serde(default = "probe_type", rename = "type")]
    child_type: String,
    /// Every child's inputs (each also gets `index` for a `noop`'s `value`, or a probe's).
    #[serde(default)]
    inputs: serde_json::Map<String, Value>,
    /// Children whose inputs get `"fail": true` (for probes).
    #[serde(default)]
    fail: Vec<u32>,
    #[serde(default)]
    provider: Option<String>,
    /// Succeed although children failed (reporting them).
    #[serde(default)]
    tolerate: bool,
    /// The child input that gets the child's index (`""`: none).
    #[serde(default = "value_key")]
    index: String,
    /// End the provider process once the children are done (a crash mid-way).
    #[serde(default)]
    crash: bool,
}

fn probe_type() -> String {
    "probe".into()
}

fn value_key() -> String {
    "value".into()
}

#[derive(Serialize, Deserialize)]
struct FanoutOut {
    /// Each child's outputs (or `{"error": message}`), in order.
    children: Vec<Value>,
    failed: u32,
}

async fn fan_out(op: &Operation, inputs: &FanoutIn) -> Result<FanoutOut, OperationError> {
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
            .required("count", "How many children")
            .optional("type", "The children's type (default `probe`)")
            .optional("inputs", "Every child's inputs")
            .optional("fail", "Indices of children asked to fail")
            .optional("provider", "The children's provider (default this one)")
            .optional("tolerate", "Succeed although children failed")
            .optional(
                "index",
                "The child input set to its index (default `value`; \"\": none)",
            )
            .optional(
                "crash",
                "End the provider process once the children are done",
            )
            .output("children", "Each child's outputs, or its error")
            .output("failed", "How many children failed")
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

struct Permits;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PermitsIn {
    count: u32,
    #[serde(default)]
    ms: u64,
    #[serde(default)]
    group: String,
    /// End the provider process while holding the permits.
    #[serde(default)]
    crash: bool,
}

#[derive(Serialize, Deserialize)]
struct PermitsOut {
    /// The most permits' work this process ran at once (in `group`).
    group_peak: u64,
}

impl Resource for Permits {
    type Inputs = PermitsIn;
    type Outputs = PermitsOut;

    fn resource_type() -> ResourceType {
        ResourceType::new("permits")
            .description("Does work of its own under permits borrowed from the core")
            .required("count", "How many pieces of work, each under a permit")
            .optional("ms", "How long each takes")
            .optional("group", "The probe group they count in")
            .optional(
                "crash",
                "End the provider process while holding the permits",
            )
            .output("group_peak", "The most run at once")
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

// ---- big / corrupt -------------------------------------------------------------------------

struct Big;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BigIn {
    bytes: usize,
}

#[derive(Serialize, Deserialize)]
struct BigOut {
    data: String,
}

impl Resource for Big {
    type Inputs = BigIn;
    type Outputs = BigOut;

    fn resource_type() -> ResourceType {
        ResourceType::new("big")
            .description("Returns a large output")
            .required("bytes", "Size of the output `data`")
            .output("data", "`bytes` characters")
    }

    async fn create(&self, _op: &Operation, inputs: BigIn) -> Result<BigOut, OperationError> {
        Ok(BigOut {
            data: "x".repeat(inputs.bytes),
        })
    }
}

struct Corrupt;

impl Resource for Corrupt {
    type Inputs = Value;
    type Outputs = Value;

    fn resource_type() -> ResourceType {
        ResourceType::new("corrupt").description("Writes garbage onto its own connection")
    }

    async fn create(&self, _op: &Operation, _inputs: Value) -> Result<Value, OperationError> {
        let fd: RawFd = RAW_SOCKET.load(Ordering::Relaxed);
        if fd < 0 {
            return Err(OperationError::permanent(
                "corrupt needs a socket-activated connection",
            ));
        }
        let garbage = [0xffu8; 64];
        // SAFETY: writes to a descriptor this process owns.
        unsafe {
            libc::write(fd, garbage.as_ptr().cast(), garbage.len());
        }
        std::future::pending().await
    }
}

// ---- main ----------------------------------------------------------------------------------

/// A provider whose resource types exist to exercise the core (see the crate documentation).
/// Normally started by capstan: capstan provider describe -- capstan-provider-testing
#[derive(clap::Parser)]
#[command(name = "capstan-provider-testing", version)]
struct Args {
    /// Serve as a standing service listening at this Unix socket path.
    #[arg(long, value_name = "PATH")]
    listen: Option<std::path::PathBuf>,
    /// Declare this concurrency limit in the handshake.
    #[arg(long, value_name = "N")]
    max_concurrency: Option<u32>,
    /// Claim these protocol versions (to test the core's refusal), as MIN:MAX.
    #[arg(long, value_name = "MIN:MAX", value_parser = protocol_range)]
    protocol: Option<(u32, u32)>,
    /// Write this many lines to stderr at start-up.
    #[arg(long, value_name = "N", default_value_t = 0)]
    stderr_lines: usize,
    /// Stay alive, ignoring SIGTERM, after the core disconnects (to test escalation).
    #[arg(long)]
    linger: bool,
    /// Start a `sleep` that outlives the provider (to test leaked-process cleanup).
    #[arg(long)]
    leak_child: bool,
    /// Behave as a NixOps4 version-0 no-op provider instead: one request, one response.
    #[arg(long)]
    v0: bool,
}

fn protocol_range(text: &str) -> Result<(u32, u32), String> {
    text.split_once(':')
        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
        .ok_or_else(|| format!("`{text}` is not MIN:MAX, e.g. 1:2"))
}

/// `--v0`: behave as a NixOps4 version-0 no-op provider instead (one request line on stdin,
/// one response line on stdout, then exit), for the benchmark of the v0 bridge.
fn serve_v0_once() -> ExitCode {
    use std::io::{BufRead, Write};
    let mut line = String::new();
    if std::io::stdin().lock().read_line(&mut line).is_err() {
        return ExitCode::FAILURE;
    }
    let request: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
    let (response, body) = if let Some(create) = request.get("createResourceRequest") {
        ("createResourceResponse", create)
    } else if let Some(update) = request.get("updateResourceRequest") {
        ("updateResourceResponse", update)
    } else {
        println!(
            "{}",
            json!({"errorResponse": {"message": "unsupported request"}})
        );
        return ExitCode::SUCCESS;
    };
    let value = body["inputProperties"]
        .get("value")
        .cloned()
        .unwrap_or(Value::Null);
    let answer = json!({response: {"outputProperties": {"value": value, "id": unique_id()}}});
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{answer}");
    ExitCode::SUCCESS
}

// ---- made ----------------------------------------------------------------------------------

/// A file made slowly, whose reads look at the real file (`readChecks`): for interrupted
/// operations and drift. It waits `before_ms`, writes the file, then waits `after_ms` before
/// answering (a kill in either wait leaves the create interrupted, without or with the file).
struct Made;

#[derive(Serialize, Deserialize)]
struct MadeIn {
    path: String,
    #[serde(default)]
    before_ms: u64,
    #[serde(default)]
    after_ms: u64,
}

#[derive(Serialize, Deserialize)]
struct MadeOut {
    path: String,
    content: String,
}

fn read_made(path: &str) -> Result<MadeOut, OperationError> {
    match std::fs::read_to_string(path) {
        Ok(content) => Ok(MadeOut {
            path: path.to_string(),
            content,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(OperationError::not_found(format!("{path} does not exist")))
        }
        Err(e) => Err(OperationError::transient(format!(
            "cannot read {path}: {e}"
        ))),
    }
}

impl Resource for Made {
    type Inputs = MadeIn;
    type Outputs = MadeOut;

    fn resource_type() -> ResourceType {
        ResourceType::new("made")
            .description("Writes a file slowly; its reads look at the file")
            .required("path", "The file")
            .optional("before_ms", "Wait before writing")
            .optional("after_ms", "Wait after writing, before answering")
            .output("path", "The file")
            .output("content", "What it holds now")
            .read_checks(true)
    }

    async fn create(&self, _op: &Operation, inputs: MadeIn) -> Result<MadeOut, OperationError> {
        tokio::time::sleep(Duration::from_millis(inputs.before_ms)).await;
        std::fs::write(&inputs.path, "made\n")
            .map_err(|e| OperationError::permanent(format!("cannot write {}: {e}", inputs.path)))?;
        tokio::time::sleep(Duration::from_millis(inputs.after_ms)).await;
        read_made(&inputs.path)
    }

    async fn find(&self, _op: &Operation, inputs: MadeIn) -> Result<MadeOut, OperationError> {
        read_made(&inputs.path)
    }

    async fn read(
        &self,
        _op: &Operation,
        prior: capstan_provider::Prior<MadeIn, MadeOut>,
    ) -> Result<MadeOut, OperationError> {
        read_made(&prior.outputs.path)
    }

    async fn delete(
        &self,
        _op: &Operation,
        prior: capstan_provider::Prior<MadeIn, MadeOut>,
    ) -> Result<(), OperationError> {
        match std::fs::remove_file(&prior.outputs.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(OperationError::permanent(
                format!("cannot remove {}: {e}", prior.outputs.path),
            )),
            _ => Ok(()),
        }
    }
}

// ---- stash / usestash ------------------------------------------------------------------------

thread_local! {
    /// The capability a `stash` was handed, kept past its operation (and its run).
    static STASH: std::cell::RefCell<Option<capstan_schema::provider_capnp::resource_handle::Client>> =
        const { std::cell::RefCell::new(None) };
}

/// Keeps the first capability it is handed, as a provider trying to hold on to one would.
struct Stash;

#[derive(Serialize, Deserialize)]
struct StashOut {
    stashed: bool,
}

impl Resource for Stash {
    type Inputs = Value;
    type Outputs = StashOut;

    fn resource_type() -> ResourceType {
        ResourceType::new("stash")
            .description("Keeps the capability it is handed, past the operation")
            .open_inputs(true)
            .output("stashed", "Whether it was handed one")
    }

    async fn create(&self, op: &Operation, _inputs: Value) -> Result<StashOut, OperationError> {
        let handle = op.capabilities().first().map(|(_, c)| c.clone());
        let stashed = handle.is_some();
        STASH.with(|s| *s.borrow_mut() = handle);
        Ok(StashOut { stashed })
    }
}

/// Tries the capability a `stash` kept (in this run or an earlier one).
struct UseStash;

#[derive(Serialize, Deserialize)]
struct UseStashOut {
    reachable: bool,
    detail: String,
}

impl Resource for UseStash {
    type Inputs = Value;
    type Outputs = UseStashOut;

    fn resource_type() -> ResourceType {
        ResourceType::new("usestash")
            .description("Calls the capability a `stash` kept")
            .open_inputs(true)
            .output("reachable", "Whether the call answered")
            .output("detail", "Its answer, or why not")
    }

    async fn create(&self, _op: &Operation, _inputs: Value) -> Result<UseStashOut, OperationError> {
        let Some(handle) = STASH.with(|s| s.borrow().clone()) else {
            return Ok(UseStashOut {
                reachable: false,
                detail: "nothing stashed".into(),
            });
        };
        let call = tokio::time::timeout(Duration::from_secs(5), describe_handle(&handle)).await;
        Ok(match call {
            Ok(Ok((kind, address, summary))) => UseStashOut {
                reachable: true,
                detail: format!("{kind} {address} {summary}"),
            },
            Ok(Err(e)) => UseStashOut {
                reachable: false,
                detail: e.to_string(),
            },
            Err(_) => UseStashOut {
                reachable: false,
                detail: "no answer in 5 s".into(),
            },
        })
    }
}

// ---- faulty --------------------------------------------------------------------------------

/// For the fault campaign: does its side effect (a marker file named after the resource) or
/// one of the faults a provider can have.
struct Faulty;

#[derive(Serialize, Deserialize)]
struct FaultyIn {
    /// The marker's directory.
    dir: String,
    name: String,
    /// none | slow | error | partial | crash | hang | garbage
    #[serde(default)]
    fault: String,
    /// Anything (what it depends on, say); echoed.
    #[serde(default)]
    after: Value,
}

#[derive(Serialize, Deserialize)]
struct FaultyOut {
    marker: String,
}

impl Faulty {
    fn mark(inputs: &FaultyIn) -> Result<String, OperationError> {
        let path = std::path::Path::new(&inputs.dir).join(&inputs.name);
        std::fs::write(&path, "made\n").map_err(|e| {
            OperationError::permanent(format!("cannot write {}: {e}", path.display()))
        })?;
        Ok(path.display().to_string())
    }
}

impl Resource for Faulty {
    type Inputs = FaultyIn;
    type Outputs = FaultyOut;

    fn resource_type() -> ResourceType {
        ResourceType::new("faulty")
            .description("Writes a marker file, or fails in one of the ways a provider can")
            .required("dir", "Where markers go")
            .required("name", "The marker's name")
            .optional(
                "fault",
                "none | slow | error | partial | crash | hang | garbage",
            )
            .optional("after", "Anything")
            .output("marker", "The marker file")
            .read_checks(true)
    }

    async fn create(&self, op: &Operation, inputs: FaultyIn) -> Result<FaultyOut, OperationError> {
        match inputs.fault.as_str() {
            "error" => Err(OperationError::permanent("failed on purpose")),
            "partial" => {
                Self::mark(&inputs)?;
                Err(OperationError::permanent("made its marker, then failed"))
            }
            "crash" => {
                // The side effect happened; the result never arrives.
                Self::mark(&inputs)?;
                std::process::exit(3)
            }
            "hang" => std::future::pending().await,
            "garbage" => {
                let fd: RawFd = RAW_SOCKET.load(Ordering::Relaxed);
                if fd >= 0 {
                    let garbage = [0xffu8; 64];
                    // SAFETY: writes to a descriptor this process owns.
                    unsafe {
                        libc::write(fd, garbage.as_ptr().cast(), garbage.len());
                    }
                }
                std::future::pending().await
            }
            "slow" => {
                for n in 0..5 {
                    op.log(LogStream::Stdout, format!("slowly {n}")).await;
                    tokio::time::sleep(Duration::from_millis(40)).await;
                }
                Ok(FaultyOut {
                    marker: Self::mark(&inputs)?,
                })
            }
            _ => Ok(FaultyOut {
                marker: Self::mark(&inputs)?,
            }),
        }
    }

    async fn find(&self, _op: &Operation, inputs: FaultyIn) -> Result<FaultyOut, OperationError> {
        let path = std::path::Path::new(&inputs.dir).join(&inputs.name);
        if path.exists() {
            Ok(FaultyOut {
                marker: path.display().to_string(),
            })
        } else {
            Err(OperationError::not_found("no marker"))
        }
    }

    async fn delete(
        &self,
        _op: &Operation,
        prior: capstan_provider::Prior<FaultyIn, FaultyOut>,
    ) -> Result<(), OperationError> {
        let _ = std::fs::remove_file(&prior.outputs.marker);
        Ok(())
    }
}

// ---- secret --------------------------------------------------------------------------------

/// A type whose output is a secret, and which leaks it everywhere a careless provider could:
/// its log, a tracing event, its stderr, and its error message. The core must hide it in all.
struct Secret;

#[derive(Serialize, Deserialize)]
struct SecretIn {
    /// The token to issue (else one is made up).
    #[serde(default)]
    seed: Option<String>,
    /// Fail after issuing, with the token in the error.
    #[serde(default)]
    fail: bool,
}

#[derive(Serialize, Deserialize)]
struct SecretOut {
    token: String,
    length: usize,
}

impl Resource for Secret {
    type Inputs = SecretIn;
    type Outputs = SecretOut;

    fn resource_type() -> ResourceType {
        ResourceType::new("secret")
            .description("Issues a token (a sensitive output), and carelessly prints it too")
            .optional(
                "seed",
                "The token to issue (sensitive); made up when absent",
            )
            .optional("fail", "Fail after issuing, with the token in the error")
            .output("token", "The token (sensitive)")
            .output("length", "The token's length")
            .sensitive("seed")
            .sensitive("token")
    }

    async fn create(&self, op: &Operation, inputs: SecretIn) -> Result<SecretOut, OperationError> {
        let token = inputs
            .seed
            .unwrap_or_else(|| format!("tok-{}", unique_id()));
        op.log(LogStream::Stdout, format!("issued {token}")).await;
        tracing::info!(token = %token, "issued token {token}");
        eprintln!("testing provider: issued {token}");
        if inputs.fail {
            return Err(
                OperationError::permanent(format!("could not store {token}"))
                    .with_details(format!("token was {token}")),
            );
        }
        Ok(SecretOut {
            length: token.len(),
            token,
        })
    }
}

fn main() -> ExitCode {
    let args = <Args as clap::Parser>::parse();
    if args.v0 {
        return serve_v0_once();
    }
    let mut provider = Provider::new("testing", env!("CARGO_PKG_VERSION"))
        .resource(Noop)
        .resource(Handle)
        .resource(Sleep)
        .resource(Fail)
        .resource(Panic)
        .resource(Crash)
        .resource(Hang)
        .resource(Chatty)
        .resource(Big)
        .resource(Corrupt)
        .resource(Probe)
        .resource(Fanout)
        .resource(Permits)
        .resource(Secret)
        .resource(Made)
        .resource(Stash)
        .resource(UseStash)
        .resource(Faulty)
        .cancel_grace(Duration::from_secs(2));
    if let Some(n) = args.max_concurrency {
        provider = provider.max_concurrency(n);
    }
    if let Some((min, max)) = args.protocol {
        provider = provider.protocol_range(min, max);
    }
    for k in 0..args.stderr_lines {
        eprintln!("testing provider: start-up line {k}");
    }
    let leaked_child = args
        .leak_child
        .then(|| {
            std::process::Command::new("sleep")
                .arg("1000")
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .ok()
        })
        .flatten();
    let (listen, linger) = (args.listen, args.linger);
    let endpoint = match listen {
        Some(path) => Endpoint::Listen(path),
        None => match Endpoint::from_env() {
            Ok(endpoint) => endpoint,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(2);
            }
        },
    };
    if let Endpoint::Inherited(fd) = &endpoint {
        use std::os::fd::AsRawFd;
        // SAFETY: duplicates a descriptor this process owns.
        let dup = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 10) };
        RAW_SOCKET.store(dup, Ordering::Relaxed);
    }
    let code = provider.serve_at(endpoint);
    if let Some(child) = leaked_child {
        // Left running on purpose (dropping a `Child` neither kills nor waits for it): the
        // host must find and kill it.
        drop(child);
    }
    if linger {
        // SAFETY: ignoring a signal has no preconditions.
        unsafe {
            libc::signal(libc::SIGTERM, libc::SIG_IGN);
        }
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    code
}
