//! Running a plan: every operation as soon as what it depends on exists, under a global job
//! limit and per-provider limits, journaling an intent before each mutating call and its result
//! after. A failure skips what depends on it; everything independent goes on.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use capstan_host::{
    CallError, HostOptions, LaunchError, OperationCall, OperationSuccess, ProviderCommand,
    ProviderConnection, ProviderLog, ProviderSource,
};
use capstan_schema::provider_capnp::{permit, resource_handle, scheduler as scheduler_capnp};
use capstan_schema::Json;
use capstan_schema::{ErrorKind, OperationError};
use capstan_schema::{OperationKind, ProgressEvent, ProviderInfo};
use futures::future::LocalBoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use std::future::Future;
use tokio_util::sync::CancellationToken;

use crate::events::{Event, EventSink, FailureKind, Summary};
use crate::maps::FastMap;
use crate::model::{Deployment, ProviderDecl, ProviderSourceDecl, ResourceDecl};
use crate::plan::{Action, PlannedChange};
use crate::scheduler::{End, NodeId, NodeState, Phase, Scheduler, Skip, Step, Stop};
use crate::state::{
    append_durably, now_unix, Record, ResourceState, State, StateBackend, StateError,
};

/// How to run.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// At most this many operations at once, across all providers.
    pub jobs: usize,
    /// Stop dispatching after the first failure.
    pub fail_fast: bool,
    /// Per-operation timeout unless the provider declaration sets one.
    pub timeout: Option<Duration>,
    /// The sensitive values known so far; the run adds those it learns (marked inputs,
    /// outputs their providers mark) and records where they are in the state.
    pub secrets: Rc<crate::secrets::Secrets>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            jobs: 16,
            fail_fast: false,
            timeout: None,
            secrets: crate::secrets::Secrets::new(),
        }
    }
}

/// The providers of one run: one connection each, started once.
pub struct Providers {
    pub(crate) connections: BTreeMap<String, Rc<ProviderConnection>>,
    /// Each provider's concurrency limit, if it has one.
    limits: BTreeMap<String, usize>,
    pub(crate) timeouts: BTreeMap<String, Duration>,
}

/// How to start built-in providers: this program, re-executed with `__provider NAME`.
#[derive(Clone, Debug)]
pub struct BuiltinLauncher {
    pub program: PathBuf,
}

/// The resource types (with declared output names) each NixOps4 v0 provider must serve: those
/// of the deployment's resources, and those recorded in the state (for deletes).
pub fn v0_types(
    deployment: &Deployment,
    state: &State,
) -> BTreeMap<String, BTreeMap<String, BTreeSet<String>>> {
    let mut types: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for r in deployment.resources.values() {
        if deployment
            .providers
            .get(&r.provider)
            .is_some_and(|p| p.protocol.as_deref() == Some(crate::model::NIXOPS4_V0))
        {
            types
                .entry(r.provider.clone())
                .or_default()
                .entry(r.resource_type.clone())
                .or_default()
                .extend(r.outputs.iter().flatten().cloned());
        }
    }
    for r in state.resources.values() {
        if deployment
            .providers
            .get(&r.provider)
            .is_some_and(|p| p.protocol.as_deref() == Some(crate::model::NIXOPS4_V0))
        {
            let outputs = r.outputs.keys();
            types
                .entry(r.provider.clone())
                .or_default()
                .entry(r.resource_type.clone())
                .or_default()
                .extend(outputs);
        }
    }
    types
}

/// A provider's settings with each reference filled in from the state (null where it records
/// nothing yet: a provider configured during the run, [`config_late`]).
fn recorded_settings(decl: &ProviderDecl, state: &State) -> Option<serde_json::Value> {
    static NULL: std::sync::OnceLock<Box<serde_json::value::RawValue>> = std::sync::OnceLock::new();
    let null = NULL.get_or_init(|| {
        serde_json::value::RawValue::from_string("null".into()).expect("null is JSON")
    });
    decl.settings(&|address, output| {
        let recorded = state
            .resources
            .get(address)
            .and_then(|r| r.outputs.get_raw(output));
        Some(recorded.unwrap_or(null))
    })
}

/// The providers whose `config` refers to outputs not known when they start (not recorded
/// yet, or changed by this run): started with those settings null, they are handed their
/// settings (`Provider.configure`) before their first operation in the run, once what they
/// refer to is made; nothing else may use them before (plan-time reads and plans skip them).
pub fn config_late(
    deployment: &Deployment,
    state: &State,
    changes: &[PlannedChange],
) -> BTreeSet<String> {
    deployment
        .providers
        .iter()
        .filter(|(_, decl)| {
            decl.config_refs.iter().any(|r| {
                let recorded = state
                    .resources
                    .get(&r.address)
                    .is_some_and(|res| res.outputs.get_raw(&r.output).is_some());
                let changing = changes
                    .iter()
                    .any(|c| c.address == r.address && c.action != Action::Noop);
                !recorded || changing
            })
        })
        .map(|(name, _)| name.clone())
        .collect()
}

fn source_for(
    decl: &ProviderDecl,
    state: &State,
    dir: &Path,
    builtin: &BuiltinLauncher,
    v0_types: Option<&BTreeMap<String, BTreeSet<String>>>,
) -> ProviderSource {
    if let (Some(crate::model::TERRAFORM), ProviderSourceDecl::Executable { program, .. }) =
        (decl.protocol.as_deref(), &decl.source)
    {
        // The bridge serves the Terraform provider as a Capstan provider.
        let mut bridge: Vec<String> = vec!["__provider".into(), crate::model::TERRAFORM.into()];
        bridge.push("--".into());
        let resolved = if program.contains('/') && Path::new(program).is_relative() {
            dir.join(program).display().to_string()
        } else {
            program.clone()
        };
        bridge.push(resolved);
        let mut command = ProviderCommand::new(builtin.program.clone(), bridge);
        command.cwd = Some(dir.to_path_buf());
        if let Some(settings) = recorded_settings(decl, state) {
            // In the environment, which only this user can read (a command line is anyone's):
            // the configuration may hold secrets. References are filled in from the state.
            command.env.push((
                crate::model::TERRAFORM_CONFIG_ENV.into(),
                settings.to_string().into(),
            ));
        }
        return ProviderSource::Command(command);
    }
    if let (Some(_), ProviderSourceDecl::Executable { program, args }) =
        (&decl.protocol, &decl.source)
    {
        // The bridge is a Capstan provider; it starts the v0 program once per operation.
        let mut bridge: Vec<String> = vec!["__provider".into(), crate::model::NIXOPS4_V0.into()];
        if let Some(types) = v0_types {
            // JSON, so type and output names may hold any character.
            bridge.push("--types".into());
            bridge.push(serde_json::to_string(types).expect("names and lists encode"));
        }
        if !decl.stateless_types.is_empty() {
            bridge.push("--stateless-types".into());
            bridge.push(serde_json::to_string(&decl.stateless_types).expect("names encode"));
        }
        bridge.push("--".into());
        let resolved = if program.contains('/') && Path::new(program).is_relative() {
            dir.join(program).display().to_string()
        } else {
            program.clone()
        };
        bridge.push(resolved);
        bridge.extend(args.iter().cloned());
        let mut command = ProviderCommand::new(builtin.program.clone(), bridge);
        command.cwd = Some(dir.to_path_buf());
        return ProviderSource::Command(command);
    }
    match &decl.source {
        ProviderSourceDecl::Builtin(name) => {
            let mut command =
                ProviderCommand::new(builtin.program.clone(), ["__provider", name.as_str()]);
            command.cwd = Some(dir.to_path_buf());
            ProviderSource::Command(command)
        }
        ProviderSourceDecl::Executable { program, args } => {
            let resolved = if program.contains('/') && Path::new(program).is_relative() {
                dir.join(program).into_os_string()
            } else {
                program.into()
            };
            let mut command = ProviderCommand::new(resolved, args.iter().cloned());
            command.cwd = Some(dir.to_path_buf());
            ProviderSource::Command(command)
        }
        ProviderSourceDecl::Socket(path) => ProviderSource::Socket(dir.join(path)),
    }
}

impl Providers {
    /// Starts (or connects to) each named provider, all at once.
    pub async fn launch(
        names: &BTreeSet<String>,
        deployment: &Deployment,
        state: &State,
        builtin: &BuiltinLauncher,
        logs: tokio::sync::mpsc::Sender<ProviderLog>,
    ) -> Result<Self, LaunchError> {
        Self::launch_with(names, deployment, state, builtin, logs, None).await
    }

    /// [`launch`](Self::launch), with every provider's message limit raised to
    /// `max_message_mib` (a provider's own `maxMessageMiB` in the deployment wins).
    pub async fn launch_with(
        names: &BTreeSet<String>,
        deployment: &Deployment,
        state: &State,
        builtin: &BuiltinLauncher,
        logs: tokio::sync::mpsc::Sender<ProviderLog>,
        max_message_mib: Option<u32>,
    ) -> Result<Self, LaunchError> {
        let dir = deployment.dir();
        let v0 = v0_types(deployment, state);
        // A name the deployment does not declare starts nothing: its resources then fail
        // with "not started", naming it.
        let launches = names.iter().filter_map(|name| {
            let decl = deployment.providers.get(name)?;
            let source = source_for(decl, state, &dir, builtin, v0.get(name));
            let logs = logs.clone();
            let mut options = HostOptions::default();
            if let Some(mib) = decl.max_message_mib.or(max_message_mib) {
                options.max_message_words = mib as usize * (1024 * 1024 / 8);
            }
            Some(async move {
                ProviderConnection::launch(name, &source, options, Some(logs))
                    .await
                    .map(|c| (name.clone(), c))
            })
        });
        let mut connections = Vec::new();
        for launched in futures::future::join_all(launches).await {
            connections.push(launched?);
        }
        Ok(Self::from_connections(deployment, connections))
    }

    /// The providers of a run from connections made elsewhere (in-process providers,
    /// embedding), each under its name in `deployment`, whose declarations give their limits
    /// and timeouts.
    pub fn from_connections(
        deployment: &Deployment,
        launched: impl IntoIterator<Item = (String, ProviderConnection)>,
    ) -> Self {
        let mut connections = BTreeMap::new();
        let mut limits = BTreeMap::new();
        let mut timeouts = BTreeMap::new();
        for (name, connection) in launched {
            let decl = deployment.providers.get(&name);
            // The provider's own limit (from its handshake), lowered by `maxConcurrency`:
            // enforced here, before an operation journals its intent or takes a job, so a
            // queue at a busy provider never holds `--jobs` slots. (The host enforces the
            // declared limit too, as a last line.)
            let declared = Some(connection.info().max_concurrency).filter(|&n| n > 0);
            let limit = match (decl.and_then(|d| d.max_concurrency), declared) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if let Some(limit) = limit {
                limits.insert(name.clone(), limit as usize);
            }
            if let Some(timeout) = decl.and_then(|d| d.timeout) {
                timeouts.insert(name.clone(), timeout);
            }
            connections.insert(name, Rc::new(connection));
        }
        Providers {
            connections,
            limits,
            timeouts,
        }
    }

    /// Each provider's handshake.
    pub fn infos(&self) -> BTreeMap<String, ProviderInfo> {
        self.connections
            .iter()
            .map(|(n, c)| (n.clone(), c.info().clone()))
            .collect()
    }

    /// Stops every provider.
    pub async fn shutdown(self) {
        let stops = self
            .connections
            .into_values()
            .filter_map(|c| Rc::try_unwrap(c).ok())
            .map(|c| c.shutdown());
        futures::future::join_all(stops).await;
    }
}

/// The providers a plan needs.
pub fn providers_needed(changes: &[PlannedChange]) -> BTreeSet<String> {
    changes
        .iter()
        .filter(|c| c.action != Action::Noop)
        .flat_map(|c| {
            std::iter::once(c.provider.clone())
                .chain(c.replaces.as_ref().map(|old| old.provider.clone()))
        })
        .collect()
}

/// How many operations may be dispatched per job: while `jobs` operations are in providers,
/// up to seven times as many more journal their intents and wait, so intents are durable by
/// the time a slot frees up and many share one fsync. At `--jobs 64` and 100k no-ops: 2 → 4
/// gave ~15 % more throughput, 4 → 8 another ~9-20 % (16: ~4 % more again). The cost: after a
/// crash, up to that many intents of operations that were never sent are reported as
/// interrupted, for a person to check (Ctrl-C settles them).
const DISPATCH_PER_JOB: usize = 8;

/// What the driver keeps per node (indexed like the changes), beside the change itself.
/// Kept small: a run holds one per resource.
struct Node {
    /// Its index in `deployment.resources` (creates, updates, no-ops), or `NO_DECL`.
    decl: u32,
    /// Needed as a capability source by some resource in this run.
    capability_source: bool,
}

const NO_DECL: u32 = u32::MAX;

impl Node {
    fn decl(&self) -> Option<usize> {
        (self.decl != NO_DECL).then_some(self.decl as usize)
    }
}

/// One operation of a node, from `Prepare` until its result is journaled.
struct Op {
    operation: OperationKind,
    provider: String,
    connection: Rc<ProviderConnection>,
    /// Taken when it is sent.
    call: Option<OperationCall>,
    /// The resource as it will be recorded (for creates, updates and reads).
    resource_type: String,
    inputs: Json,
    dependencies: Vec<String>,
    /// Left pending by an earlier run: its intent must not be settled as "never sent".
    was_pending: bool,
    /// A replace's create, queued once its delete is done.
    then: Option<Box<Op>>,
    /// For a child: its parent's address (recorded with it).
    parent: Option<String>,
}

impl Op {
    fn journaled(&self) -> bool {
        // Reads change nothing: no intent.
        self.operation != OperationKind::Read
    }
}

/// How an operation ended, once its result is journaled.
enum Outcome {
    /// Created, updated or read: the resource as it is now (as journaled, unless a read).
    Done {
        state: ResourceState,
        handles: Vec<(String, resource_handle::Client)>,
        counted: Action,
    },
    Deleted,
    Failed {
        /// The resource as journaled, when the provider did act but its result is unusable
        /// (a declared output missing): it exists, so the state keeps it.
        recorded: Option<Box<ResourceState>>,
        /// What went wrong, for a parent waiting on this child.
        error: Box<OperationError>,
    },
    /// A record could not be made durable.
    State(StateError),
}

/// What an operation's future reports back to the loop.
enum Done {
    /// Its intent is durable.
    Recorded(NodeId),
    /// Its provider answered.
    Answered(NodeId, Result<OperationSuccess, CallError>, f64),
    /// Its result is journaled (or it failed before it was sent).
    Finished(NodeId, Outcome),
    /// The run stopped before it was sent; its intent is settled.
    Settled(NodeId, Stop),
    /// A deployment in Nix was evaluated again, with outputs made in this run.
    Evaluated(Result<crate::nix::Evaluation, crate::nix::EvalError>),
}

/// `None`: the work of a cancelled child, aborted.
type Work = FuturesUnordered<LocalBoxFuture<'static, Option<Done>>>;

/// What providers ask of the run through an operation's `Scheduler` capability.
enum Ask {
    Child {
        parent: NodeId,
        name: String,
        provider: String,
        resource_type: String,
        inputs: String,
        reply: tokio::sync::oneshot::Sender<Result<Json, OperationError>>,
    },
    Permit {
        parent: NodeId,
        reply: tokio::sync::oneshot::Sender<Result<permit::Client, OperationError>>,
    },
    Release(NodeId),
}

type Asks = tokio::sync::mpsc::UnboundedSender<Ask>;

/// Work the run took on for a running operation: a child resource, or a permit.
enum Kid {
    Child {
        inputs: Json,
        /// Where its outcome goes (taken when sent).
        reply: Option<tokio::sync::oneshot::Sender<Result<Json, OperationError>>>,
    },
    Permit {
        reply: Option<tokio::sync::oneshot::Sender<Result<permit::Client, OperationError>>>,
    },
}

/// An operation's `Scheduler`: hands its asks to the run's loop and awaits the answers.
struct SchedulerServer {
    parent: NodeId,
    asks: Asks,
}

fn run_over() -> OperationError {
    OperationError::cancelled("the run stopped before answering")
}

impl scheduler_capnp::Server for SchedulerServer {
    async fn child(
        self: capnp::capability::Rc<Self>,
        params: scheduler_capnp::ChildParams,
        mut results: scheduler_capnp::ChildResults,
    ) -> Result<(), capnp::Error> {
        let request = params.get()?.get_request()?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        let ask = Ask::Child {
            parent: self.parent,
            name: request.get_name()?.to_string()?,
            provider: request.get_provider()?.to_string()?,
            resource_type: request.get_resource_type()?.to_string()?,
            inputs: request.get_inputs()?.to_string()?,
            reply,
        };
        let result = match self.asks.send(ask) {
            Ok(()) => answer.await.unwrap_or_else(|_| Err(run_over())),
            Err(_) => Err(run_over()),
        };
        let out = results.get().init_result();
        match result {
            Ok(outputs) => out.init_success().set_outputs(outputs.text()),
            Err(error) => error.write(out.init_failure()),
        }
        Ok(())
    }

    async fn permit(
        self: capnp::capability::Rc<Self>,
        _: scheduler_capnp::PermitParams,
        mut results: scheduler_capnp::PermitResults,
    ) -> Result<(), capnp::Error> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let granted = match self.asks.send(Ask::Permit {
            parent: self.parent,
            reply,
        }) {
            Ok(()) => answer.await.unwrap_or_else(|_| Err(run_over())),
            Err(_) => Err(run_over()),
        };
        match granted {
            Ok(permit) => {
                results.get().set_permit(permit);
                Ok(())
            }
            Err(error) => Err(capnp::Error::failed(error.message)),
        }
    }
}

/// A granted permit: its slot goes back on `release`, or when the provider drops it (or its
/// connection closes, which drops it).
struct PermitServer {
    node: NodeId,
    asks: Asks,
}

impl permit::Server for PermitServer {
    async fn release(
        self: capnp::capability::Rc<Self>,
        _: permit::ReleaseParams,
        _: permit::ReleaseResults,
    ) -> Result<(), capnp::Error> {
        let _ = self.asks.send(Ask::Release(self.node));
        Ok(())
    }
}

impl Drop for PermitServer {
    fn drop(&mut self) {
        // Released twice is released once: the loop ignores a node no longer holding a slot.
        let _ = self.asks.send(Ask::Release(self.node));
    }
}

/// How a failure the run reports maps onto the protocol's error kinds (for a parent).
fn error_kind(kind: FailureKind) -> ErrorKind {
    match kind {
        FailureKind::Permanent => ErrorKind::Permanent,
        FailureKind::InvalidInput => ErrorKind::InvalidInput,
        FailureKind::Transient | FailureKind::Timeout | FailureKind::Provider => {
            ErrorKind::Transient
        }
        FailureKind::Cancelled => ErrorKind::Cancelled,
        FailureKind::Internal => ErrorKind::Internal,
    }
}

/// Runs `changes` (from `plan` or `plan_destroy`). `deployment` gives the desired inputs of
/// creates and updates; `state` is updated as records become durable.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    changes: Vec<PlannedChange>,
    deployment: &Deployment,
    state: &mut State,
    backend: Rc<dyn StateBackend>,
    providers: &Providers,
    options: &RunOptions,
    events: Rc<dyn EventSink>,
    interrupt: CancellationToken,
) -> Result<Summary, StateError> {
    run_staged(
        changes, deployment, state, backend, providers, options, events, interrupt, None,
    )
    .await
}

/// [`run`] for a deployment in Nix with items left for later (`stages`): each time a
/// resource they wait for is made, the deployment is evaluated again (one evaluation at a
/// time) while the run goes on, and what it now yields joins the running scheduler: new
/// resources as nodes after what they depend on, members a nested deployment no longer
/// yields as deletes. What is still deferred at the end is reported as skipped.
#[allow(clippy::too_many_arguments)]
pub async fn run_staged(
    changes: Vec<PlannedChange>,
    deployment: &Deployment,
    state: &mut State,
    backend: Rc<dyn StateBackend>,
    providers: &Providers,
    options: &RunOptions,
    events: Rc<dyn EventSink>,
    interrupt: CancellationToken,
    stages: Option<crate::nix::Stages>,
) -> Result<Summary, StateError> {
    let run_started = Instant::now();
    // Room for every resource this run may create, so recording them never regrows the map.
    state.resources.reserve(
        changes
            .iter()
            .filter(|c| c.action == Action::Create)
            .count(),
    );
    // Types whose outputs are secrets: their progress waits for their result to be shown.
    for (name, connection) in &providers.connections {
        for t in &connection.info().resource_types {
            if t.outputs.iter().any(|o| o.sensitive) {
                options.secrets.hold_type(name, &t.name);
            }
        }
    }
    let jobs = options.jobs.max(1);
    let mut scheduler = Scheduler::new(jobs, jobs * DISPATCH_PER_JOB, options.fail_fast);
    for (provider, &limit) in &providers.limits {
        scheduler.set_limit(provider, limit);
    }
    let nodes = graph(&changes, deployment, state, &mut scheduler);
    let late = config_late(deployment, state, &changes);
    let (asks, mut asked) = tokio::sync::mpsc::unbounded_channel();
    let mut driver = Driver {
        ops: FastMap::default(),
        kids: FastMap::default(),
        aborts: FastMap::default(),
        deleting: Default::default(),
        recorded_children: recorded_children(state),
        permits_of: FastMap::default(),
        child_addresses: Default::default(),
        asks,
        changes,
        nodes,
        deployment,
        state,
        backend,
        providers,
        options,
        events: events.clone(),
        handles: HashMap::new(),
        summary: Summary::default(),
        state_error: None,
        scheduler,
        added: Vec::new(),
        added_index: FastMap::default(),
        node_of: FastMap::default(),
        stages: None,
        late_config: FastMap::default(),
        evaluating: false,
        given: Default::default(),
        evaluation_failed: false,
    };
    for provider in late {
        driver.late_config.insert(provider, Rc::default());
    }
    if let Some(stages) = stages {
        driver.start_stages(stages);
    }
    if !driver.recorded_children.is_empty() {
        // (Only a recorded child's address can be asked for again while being deleted.)
        driver.deleting = driver
            .changes
            .iter()
            .filter(|c| c.action == Action::Delete)
            .filter(|c| {
                driver
                    .state
                    .resources
                    .get(&c.address)
                    .is_some_and(|r| r.parent.is_some())
            })
            .map(|c| c.address.clone())
            .collect();
    }
    let mut work: Work = FuturesUnordered::new();
    let cancelled = interrupt.cancelled();
    tokio::pin!(cancelled);
    loop {
        while let Some(step) = driver.scheduler.next_step() {
            driver.step(step, &mut work);
        }
        driver.maybe_evaluate(&mut work);
        if work.is_empty() {
            break;
        }
        tokio::select! {
            Some(done) = work.next() => {
                if let Some(done) = done {
                    driver.done(done, &mut work);
                }
                // Everything else that is done by now, before handing out more steps.
                while let Some(Some(done)) = work.next().now_or_never() {
                    if let Some(done) = done {
                        driver.done(done, &mut work);
                    }
                }
            }
            Some(ask) = asked.recv() => driver.ask(ask),
            // Also while stopping for --fail-fast: an interrupt must not wait on hung calls.
            () = &mut cancelled => {
                // Dropping the calls cancels them in the providers; their intents stay in the
                // journal, so the next run reports them as interrupted.
                work.clear();
                driver.interrupted().await;
                break;
            }
        }
    }
    debug_assert!(
        driver.scheduler.idle(),
        "the run ended with work dispatched"
    );
    for (i, skip) in driver.scheduler.unfinished() {
        driver.report_skip(i, skip);
    }
    driver.report_deferred(interrupt.is_cancelled());
    debug_assert_eq!(driver.scheduler.unended(), 0);
    if let Some(e) = driver.state_error {
        return Err(e);
    }
    events.emit(Event::Summary {
        counts: driver.summary.clone(),
        elapsed_seconds: run_started.elapsed().as_secs_f64(),
    });
    Ok(driver.summary)
}

/// Adds a node per change to `scheduler` (node `i` is change `i`), and the edges between them.
fn graph(
    changes: &[PlannedChange],
    deployment: &Deployment,
    state: &State,
    scheduler: &mut Scheduler,
) -> Vec<Node> {
    // Resources some resource of this run takes a capability from (usually none).
    let capability_sources: BTreeSet<&str> = if deployment
        .resources
        .values()
        .any(|r| !r.capabilities.is_empty())
    {
        changes
            .iter()
            .filter(|c| c.action != Action::Delete)
            .filter_map(|c| deployment.resources.get(&c.address))
            .flat_map(|r| r.capabilities.iter().map(|c| c.address.as_str()))
            .collect()
    } else {
        BTreeSet::new()
    };
    let nodes: Vec<Node> = changes
        .iter()
        .map(|change| {
            let decl = match change.action {
                Action::Delete => None,
                // The plan's index, if it is of this deployment; else looked up.
                _ => change
                    .declared
                    .filter(|&d| {
                        deployment
                            .resources
                            .get_index(d)
                            .is_some_and(|(address, _)| *address == change.address)
                    })
                    .or_else(|| deployment.resources.get_index_of(&change.address)),
            };
            Node {
                // Indices are `u32` in the model too (`ResourceDecl::depends_on`).
                decl: decl.and_then(|d| u32::try_from(d).ok()).unwrap_or(NO_DECL),
                capability_source: capability_sources.contains(change.address.as_str()),
            }
        })
        .collect();
    drop(capability_sources);
    // Edges as (waits, first): `waits` starts only after `first` is done.
    let mut edges: Vec<(usize, usize)> = Vec::with_capacity(nodes.len() * 2);
    // Declared dependencies are indices into the deployment; only deletes (and recorded
    // wiring) need addresses looked up, and only deletes can be found that way.
    let mut node_of_decl = vec![usize::MAX; deployment.resources.len()];
    for (n, node) in nodes.iter().enumerate() {
        if let Some(d) = node.decl() {
            node_of_decl[d] = n;
        }
    }
    let deletes: FastMap<&str, usize> = changes
        .iter()
        .enumerate()
        .filter(|(_, change)| change.action == Action::Delete)
        .map(|(n, change)| (change.address.as_str(), n))
        .collect();
    for (i, node) in nodes.iter().enumerate() {
        match node.decl() {
            // Creates and updates wait for what they depend on.
            Some(d) => {
                for &j in &deployment.resources[d].depends_on {
                    let n = node_of_decl[j as usize];
                    if n != usize::MAX {
                        edges.push((i, n));
                    }
                }
            }
            // Deletes wait for the deletes of what depends on them.
            None => {
                let recorded = state.resources.get(&changes[i].address);
                for dep in recorded.iter().flat_map(|r| &r.dependencies) {
                    if let Some(&j) = deletes.get(dep.as_str()) {
                        edges.push((j, i));
                    }
                }
                continue;
            }
        }
        // A resource that stays but used to depend on one being deleted must move off it
        // first: the delete waits for its create/update (and is skipped if that fails).
        if deletes.is_empty() {
            continue;
        }
        let Some(recorded) = state.resources.get(&changes[i].address) else {
            continue;
        };
        for dep in &recorded.dependencies {
            if let Some(&j) = deletes.get(dep.as_str()) {
                edges.push((j, i));
            }
        }
    }
    // A replace deletes first: what was recorded as depending on it (its children, say) and is
    // deleted in this run goes before.
    if changes.iter().any(|c| c.action == Action::Replace) {
        let mut deleted_dependents: FastMap<&str, Vec<usize>> = FastMap::default();
        for (&address, &j) in &deletes {
            for dep in state
                .resources
                .get(address)
                .iter()
                .flat_map(|r| &r.dependencies)
            {
                deleted_dependents.entry(dep.as_str()).or_default().push(j);
            }
        }
        for (i, change) in changes.iter().enumerate() {
            if change.action == Action::Replace {
                for &j in deleted_dependents
                    .get(change.address.as_str())
                    .into_iter()
                    .flatten()
                {
                    edges.push((i, j));
                }
            }
        }
    }
    scheduler.reserve(nodes.len());
    for _ in &nodes {
        obey(scheduler.add(&[]).map(drop));
    }
    for (waits, first) in edges {
        obey(scheduler.depend(waits, first));
    }
    nodes
}

/// The scheduler refuses only a driver that breaks its protocol (a bug here, not input): a
/// test build stops on it; a release build says so on capstan's own log and goes on, since the
/// scheduler left its state as it was.
fn obey(result: Result<(), crate::scheduler::Misuse>) {
    if let Err(e) = result {
        tracing::error!(
            "the run's driver misused its scheduler (a bug in capstan; please report it): {e}"
        );
        debug_assert!(false, "the run's driver misused its scheduler: {e}");
    }
}

/// The glue between the scheduler and the world: does each step (through providers and the
/// journal) and tells the scheduler how it went.
struct Driver<'a> {
    changes: Vec<PlannedChange>,
    nodes: Vec<Node>,
    /// The operations of nodes in flight (at most the window, and those finishing).
    ops: FastMap<NodeId, Op>,
    deployment: &'a Deployment,
    state: &'a mut State,
    backend: Rc<dyn StateBackend>,
    providers: &'a Providers,
    options: &'a RunOptions,
    events: Rc<dyn EventSink>,
    /// The capabilities each resource returned, for those that take them.
    handles: HashMap<String, Vec<(String, resource_handle::Client)>>,
    summary: Summary,
    state_error: Option<StateError>,
    scheduler: Scheduler,
    /// Children and permits operations asked for, until they end.
    kids: FastMap<NodeId, Kid>,
    /// How to drop a child's work when its parent ends without it.
    aborts: FastMap<NodeId, futures::future::AbortHandle>,
    /// Addresses deleted in this run (planned, or stale children): no child may take them.
    deleting: std::collections::HashSet<String>,
    /// The children recorded in the state, by parent address (those not asked for again
    /// when their parent is made anew are deleted).
    recorded_children: FastMap<String, Vec<String>>,
    /// The permits each operation asked for (given back when it answers, at the latest).
    permits_of: FastMap<NodeId, Vec<NodeId>>,
    /// Every child address of this run, so a name is used once.
    child_addresses: std::collections::HashSet<String>,
    asks: Asks,
    /// Resources a later evaluation of a deployment in Nix declared while the run went on;
    /// node `decl` indices past the deployment's resources point here.
    added: Vec<Rc<ResourceDecl>>,
    added_index: FastMap<String, usize>,
    /// For a deployment in Nix: the node of each address of this run (creates, updates,
    /// no-ops, replaces; deletes too, so nothing is planned twice).
    node_of: FastMap<String, NodeId>,
    stages: Option<crate::nix::Stages>,
    /// Providers handed their settings before their first operation ([`config_late`]), and
    /// whether that went well, once it is done.
    late_config: FastMap<String, Rc<tokio::sync::OnceCell<Result<(), String>>>>,
    evaluating: bool,
    /// The outputs given to the last evaluation.
    given: std::collections::HashSet<String>,
    evaluation_failed: bool,
}

/// A resource's declaration, from the deployment (borrowed for the run) or added while it
/// ran (shared): either way, held without borrowing the driver.
enum DeclRef<'a> {
    Base(&'a ResourceDecl),
    Added(Rc<ResourceDecl>),
}

impl std::ops::Deref for DeclRef<'_> {
    type Target = ResourceDecl;
    fn deref(&self) -> &ResourceDecl {
        match self {
            DeclRef::Base(d) => d,
            DeclRef::Added(d) => d,
        }
    }
}

impl<'a> Driver<'a> {
    /// The declaration at `d` (see [`Node::decl`]).
    fn decl_at(&self, d: usize) -> Option<DeclRef<'a>> {
        let deployment: &'a Deployment = self.deployment;
        let base = deployment.resources.len();
        if d < base {
            deployment
                .resources
                .get_index(d)
                .map(|(_, r)| DeclRef::Base(r))
        } else {
            self.added.get(d - base).cloned().map(DeclRef::Added)
        }
    }

    /// Whether the deployment (as evaluated so far) declares `address`.
    fn declares(&self, address: &str) -> bool {
        self.deployment.resources.contains_key(address) || self.added_index.contains_key(address)
    }

    fn start_stages(&mut self, stages: crate::nix::Stages) {
        self.node_of = self
            .changes
            .iter()
            .enumerate()
            .map(|(i, c)| (c.address.clone(), i))
            .collect();
        self.stages = Some(stages);
    }

    /// Starts an evaluation when something deferred waits for a resource that was made (or
    /// left as it is) since the last one, and none is running.
    fn maybe_evaluate(&mut self, work: &mut Work) {
        let Some(stages) = &self.stages else { return };
        if self.evaluating || self.evaluation_failed || self.scheduler.stopped().is_some() {
            return;
        }
        // Made in this run, or left as it is (its recorded outputs stand, as the plan's
        // evaluations were told), and not failed since.
        let made = |address: &str| {
            self.node_of
                .get(address)
                .is_some_and(|&i| match self.scheduler.state(i) {
                    Some(NodeState::Ended(End::Succeeded)) => true,
                    Some(NodeState::Ended(_)) => false,
                    _ => self.changes[i].action == Action::Noop,
                })
        };
        let ready = stages.deferred.iter().any(|d| {
            d.waits_for
                .iter()
                .any(|w| !self.given.contains(w) && made(w))
        });
        if !ready {
            return;
        }
        // Every resource of the run that ended well gives its outputs.
        let known = crate::nix::outputs_of(
            self.state,
            self.node_of
                .iter()
                .filter(|(a, _)| self.declares(a) && made(a))
                .map(|(a, _)| a),
        );
        self.given = known.keys().cloned().collect();
        let Some(stages) = &mut self.stages else {
            return;
        };
        stages.stage += 1;
        self.events.emit(Event::EvaluationStart {
            file: stages.file.display().to_string(),
            stage: stages.stage,
        });
        let (file, params) = (stages.file.clone(), stages.params.clone());
        let settled: BTreeSet<String> = self.node_of.keys().cloned().collect();
        self.evaluating = true;
        work.push(
            async move {
                let evaluation = crate::nix::evaluate(&crate::nix::Request {
                    file: &file,
                    params: &params,
                    known: &known,
                    providers_only: false,
                    settled: &settled,
                })
                .await;
                Some(Done::Evaluated(evaluation))
            }
            .boxed_local(),
        );
    }

    /// Takes in what an evaluation during the run yields: new resources join the scheduler
    /// after what they depend on; recorded members nothing declares any more are deleted.
    fn evaluated(&mut self, result: Result<crate::nix::Evaluation, crate::nix::EvalError>) {
        self.evaluating = false;
        let Some(stages) = self.stages.as_mut() else {
            return;
        };
        let file = stages.file.display().to_string();
        let stage = stages.stage;
        let fail = |driver: &mut Self, error: String| {
            driver.events.emit(Event::EvaluationFailed {
                file: file.clone(),
                stage,
                error,
            });
            driver.summary.failed += 1;
            driver.evaluation_failed = true;
        };
        let evaluation = match result {
            Ok(evaluation) => evaluation,
            Err(e) => return fail(self, e.to_string()),
        };
        let mut parsed = match Deployment::parse(&stages.file, &evaluation.document, &stages.params)
        {
            Ok(parsed) => parsed,
            Err(e) => return fail(self, e.to_string()),
        };
        crate::nix::note_uses(&mut parsed, &mut stages.uses, &evaluation);
        self.events.emit(Event::EvaluationComplete {
            file: file.clone(),
            stage,
            resources: parsed.resources.len(),
            deferred: evaluation.deferred.len(),
            elapsed_seconds: evaluation.elapsed.as_secs_f64(),
        });
        for message in evaluation.messages.iter().filter(|m| !m.trim().is_empty()) {
            self.events.emit(Event::ProviderLog {
                provider: "nix".into(),
                stream: capstan_schema::LogStream::Stderr,
                line: message.clone(),
            });
        }
        if let Err(e) = parsed.check_against(&self.providers.infos()) {
            return fail(self, e.to_string());
        }
        if self.scheduler.stopped().is_some() {
            return;
        }
        let planned = match crate::plan::plan(&parsed, self.state) {
            Ok(planned) => planned,
            Err(e) => return fail(self, e.to_string()),
        };
        // What is in the run already is not deferred, whatever this evaluation (given only
        // the outputs made so far) says.
        let deferred: Vec<crate::nix::Deferred> = evaluation
            .deferred
            .into_iter()
            .filter(|d| !self.node_of.contains_key(&d.address))
            .collect();
        let kept = crate::nix::kept_for_deferred(self.state, &deferred);
        let new: Vec<PlannedChange> = planned
            .into_iter()
            .filter(|c| !self.node_of.contains_key(&c.address))
            .filter(|c| {
                c.action != Action::Delete
                    || (!kept.contains(c.address.as_str()) && !self.deleting.contains(&c.address))
            })
            .collect();
        drop(kept);
        let mut shown = Vec::with_capacity(new.len());
        let mut deletes: Vec<NodeId> = Vec::new();
        for mut change in new {
            let address = change.address.clone();
            let i = if change.action == Action::Delete {
                let Ok(i) = self.scheduler.add(&[]) else {
                    continue;
                };
                deletes.push(i);
                i
            } else {
                let Some((_, decl)) = parsed.resources.get_key_value(&address) else {
                    continue;
                };
                // Its dependencies, as nodes of this run (all planned before it).
                let firsts: Vec<NodeId> = decl
                    .dependencies()
                    .iter()
                    .filter_map(|a| self.node_of.get(a).copied())
                    .collect();
                let mut decl = decl.clone();
                // Indices into the evaluation's deployment mean nothing here; the driver
                // reads dependencies by address.
                decl.depends_on = Vec::new();
                let index = self.deployment.resources.len() + self.added.len();
                self.added_index.insert(address.clone(), index);
                self.added.push(Rc::new(decl));
                let Ok(i) = self.scheduler.add(&firsts) else {
                    continue;
                };
                self.nodes.push(Node {
                    decl: u32::try_from(index).unwrap_or(NO_DECL),
                    capability_source: false,
                });
                change.declared = None;
                self.changes.push(change.clone());
                self.node_of.insert(address, i);
                shown.push(change);
                debug_assert_eq!(i + 1, self.changes.len());
                continue;
            };
            self.nodes.push(Node {
                decl: NO_DECL,
                capability_source: false,
            });
            self.deleting.insert(address.clone());
            self.changes.push(change.clone());
            self.node_of.insert(address, i);
            shown.push(change);
        }
        // A delete waits for what was recorded as depending on it: its delete, or its create
        // or update (which moves it off), as `graph` orders them at the start.
        for &j in &deletes {
            let address = self.changes[j].address.clone();
            let dependents: Vec<NodeId> = self
                .state
                .resources
                .iter()
                .filter(|(_, r)| r.dependencies.contains(&address))
                .filter_map(|(a, _)| self.node_of.get(a).copied())
                .filter(|&k| k != j)
                .collect();
            for k in dependents {
                obey(self.scheduler.depend(j, k));
            }
        }
        crate::plan::annotate(&mut shown, &self.providers.infos());
        self.events.emit(Event::Plan {
            changes: Rc::new(shown),
        });
        for d in &deferred {
            self.events.emit(Event::Deferred {
                address: d.address.clone(),
                what: d.kind,
                waits_for: d.waits_for.clone(),
            });
        }
        if let Some(stages) = self.stages.as_mut() {
            stages.deferred = deferred;
        }
    }

    /// What is still deferred at the end never had what it waited for: reported as skipped
    /// (unless the run was interrupted, which says so itself).
    fn report_deferred(&mut self, interrupted: bool) {
        let Some(stages) = self.stages.take() else {
            return;
        };
        if interrupted {
            return;
        }
        for d in &stages.deferred {
            let ended_badly = |a: &String| {
                self.node_of.get(a).is_some_and(|&i| {
                    matches!(
                        self.scheduler.state(i),
                        Some(NodeState::Ended(End::Failed | End::Skipped(_)))
                    )
                })
            };
            let dependency = d
                .waits_for
                .iter()
                .find(|a| ended_badly(a))
                .or(d.waits_for.first())
                .cloned()
                .unwrap_or_default();
            let reason = if self.evaluation_failed {
                "deferred, and the deployment's evaluation failed".to_string()
            } else if ended_badly(&dependency) {
                format!("deferred: its evaluation uses outputs of `{dependency}`, which did not succeed")
            } else if self.scheduler.stopped().is_some() {
                "deferred, and the run stopped before what it waits for was made".to_string()
            } else {
                format!(
                    "deferred: its evaluation uses outputs of `{dependency}`, which were not made"
                )
            };
            self.events.emit(Event::ResourceSkipped {
                address: d.address.clone(),
                operation: "create",
                reason,
                dependency,
            });
            self.summary.skipped += 1;
        }
    }

    /// Adds an operation's work (abortable for children, which their parent may take along).
    fn spawn(&mut self, work: &mut Work, i: NodeId, future: impl Future<Output = Done> + 'static) {
        if self.kids.contains_key(&i) {
            let (handle, registration) = futures::future::AbortHandle::new_pair();
            self.aborts.insert(i, handle);
            work.push(
                futures::future::Abortable::new(future, registration)
                    .map(Result::ok)
                    .boxed_local(),
            );
        } else {
            work.push(future.map(Some).boxed_local());
        }
    }

    fn is_permit(&self, i: NodeId) -> bool {
        matches!(self.kids.get(&i), Some(Kid::Permit { .. }))
    }

    /// Sends a child's outcome to the parent waiting for it (once), and forgets the kid.
    fn settle_kid(&mut self, i: NodeId, result: Result<Json, OperationError>) {
        self.aborts.remove(&i);
        match self.kids.remove(&i) {
            Some(Kid::Child {
                reply: Some(reply), ..
            }) => {
                let _ = reply.send(result);
            }
            Some(Kid::Permit { reply: Some(reply) }) => {
                let _ = reply.send(Err(result.err().unwrap_or_else(run_over)));
            }
            _ => {}
        }
    }

    /// A provider asked, through an operation's scheduler, for a child or a permit, or gave
    /// a permit back.
    fn ask(&mut self, ask: Ask) {
        match ask {
            Ask::Child {
                parent,
                name,
                provider,
                resource_type,
                inputs,
                reply,
            } => match self.add_child(parent, &name, provider, resource_type, &inputs) {
                Ok(i) => {
                    self.kids.insert(
                        i,
                        Kid::Child {
                            inputs: Json::from_text(&inputs).unwrap_or_else(|_| Json::null()),
                            reply: Some(reply),
                        },
                    );
                }
                Err(error) => {
                    let _ = reply.send(Err(error));
                }
            },
            Ask::Permit { parent, reply } => {
                if self.scheduler.state(parent) != Some(NodeState::Dispatched(Phase::Called)) {
                    let _ = reply.send(Err(OperationError::invalid_input(
                        "a permit was asked for by an operation that has ended",
                    )));
                    return;
                }
                let Ok(i) = self.scheduler.add_child(parent) else {
                    return;
                };
                let address = format!("{}#permit", self.changes[parent].address);
                self.push_node(PlannedChange {
                    provider: String::new(),
                    resource_type: String::new(),
                    ..planned(address, Action::Noop)
                });
                debug_assert_eq!(i + 1, self.changes.len());
                self.kids.insert(i, Kid::Permit { reply: Some(reply) });
                self.permits_of.entry(parent).or_default().push(i);
            }
            Ask::Release(i) => self.release_permit(i),
        }
    }

    /// A permit given back (or a parent that ended while holding it).
    fn release_permit(&mut self, i: NodeId) {
        if !self.is_permit(i) {
            return;
        }
        match self.scheduler.state(i) {
            Some(NodeState::Dispatched(Phase::Called)) => {
                obey(self.scheduler.answered(i, true));
                obey(self.scheduler.end(i, End::Succeeded));
                self.settle_kid(i, Ok(Json::null()));
            }
            Some(NodeState::Dispatched(_)) => {
                obey(
                    self.scheduler
                        .end(i, End::Skipped(Skip::Stopped(Stop::Interrupted))),
                );
                self.settle_kid(i, Err(run_over()));
            }
            _ => {}
        }
    }

    fn push_node(&mut self, change: PlannedChange) {
        self.changes.push(change);
        self.nodes.push(Node {
            decl: NO_DECL,
            capability_source: false,
        });
    }

    /// Checks a child asked for by `parent` and adds it to the run.
    fn add_child(
        &mut self,
        parent: NodeId,
        name: &str,
        provider: String,
        resource_type: String,
        inputs: &str,
    ) -> Result<NodeId, OperationError> {
        let invalid = |message: String| Err(OperationError::invalid_input(message));
        if self.scheduler.state(parent) != Some(NodeState::Dispatched(Phase::Called)) {
            return invalid("a child was asked for by an operation that has ended".into());
        }
        let parent_address = &self.changes[parent].address;
        let making = self.ops.get(&parent).is_some_and(|op| {
            matches!(op.operation, OperationKind::Create | OperationKind::Update)
        });
        if !making {
            return invalid(format!(
                "{parent_address}: only a create or an update may ask for children"
            ));
        }
        if name.is_empty() || name.contains('/') || name.chars().any(char::is_control) {
            return invalid(format!(
                "{parent_address}: child name {name:?} must be non-empty, without `/` or control characters"
            ));
        }
        let address = format!("{parent_address}/{name}");
        let provider = if provider.is_empty() {
            match self.ops.get(&parent) {
                Some(op) => op.provider.clone(),
                None => return invalid(format!("{address}: its parent has no provider")),
            }
        } else {
            provider
        };
        if !self.providers.connections.contains_key(&provider) {
            return invalid(format!(
                "{address}: provider `{provider}` is not one of this run's (declare it in the deployment)"
            ));
        }
        let Ok(inputs) = Json::from_text(inputs) else {
            return invalid(format!("{address}: its inputs are not JSON"));
        };
        if !inputs.text().trim_start().starts_with('{') {
            return invalid(format!("{address}: its inputs must be a JSON object"));
        }
        let declared = self.declares(&address)
            || self
                .state
                .resources
                .get(&address)
                .is_some_and(|r| r.parent.as_deref() != Some(parent_address.as_str()));
        if declared {
            return invalid(format!(
                "{address}: a resource of the deployment (or another parent's child) has this address; give the child another name"
            ));
        }
        if self.deleting.contains(&address) {
            return invalid(format!(
                "{address}: it is being deleted in this run; ask for it again in the next"
            ));
        }
        if !self.child_addresses.insert(address.clone()) {
            return invalid(format!("{address}: asked for twice in this run"));
        }
        let action = match self.state.resources.get(&address) {
            None => Action::Create,
            Some(r) if r.provider != provider || r.resource_type != resource_type => {
                self.child_addresses.remove(&address);
                return invalid(format!(
                    "{address}: recorded as a `{}` of provider `{}`; delete its parent first, or `capstan state forget` it",
                    r.resource_type, r.provider
                ));
            }
            Some(r) if r.inputs == inputs => Action::Noop,
            Some(_) => Action::Update,
        };
        let Ok(i) = self.scheduler.add_child(parent) else {
            return invalid(format!("{address}: its parent has ended"));
        };
        let interrupted = self.state.pending.get(&address).map(|p| p.operation);
        self.push_node(PlannedChange {
            provider,
            resource_type,
            interrupted,
            ..planned(address, action)
        });
        debug_assert_eq!(i + 1, self.changes.len());
        Ok(i)
    }

    /// After `parent` was made again: the children it had that it did not ask for this time
    /// (and theirs) are deleted, each before its parent — added to the run as it goes on.
    fn delete_stale_children(&mut self, parent: &str, work: &mut Work) {
        let mut stale = Vec::new();
        let mut stack: Vec<String> = self
            .recorded_children
            .get(parent)
            .into_iter()
            .flatten()
            .filter(|c| !self.child_addresses.contains(*c))
            .cloned()
            .collect();
        while let Some(address) = stack.pop() {
            // Not a declared resource at that address, not another parent's child (it may
            // have been recorded anew since), not already being deleted.
            let still_ours = self
                .state
                .resources
                .get(&address)
                .and_then(|r| r.parent.as_deref())
                .is_some_and(|p| p == parent || stale.iter().any(|s: &String| s.as_str() == p));
            if self.declares(&address) || !still_ours || self.deleting.contains(&address) {
                continue;
            }
            if let Some(theirs) = self.recorded_children.get(&address) {
                stack.extend(theirs.iter().cloned());
            }
            stale.push(address);
        }
        // Recorded as orphans first: if a delete below does not happen (it fails, the run
        // stops), the next plan deletes them, as it does any resource nothing declares.
        let mut orphans = Vec::new();
        for address in &stale {
            if let Some(recorded) = self.state.resources.get_mut(address) {
                recorded.parent = None;
                orphans.push(Record::Done {
                    address: address.clone(),
                    state: recorded.clone(),
                });
            }
            self.deleting.insert(address.clone());
        }
        if !orphans.is_empty() {
            let backend = self.backend.clone();
            work.push(
                async move {
                    let _ = append_durably(&*backend, orphans).await;
                    None
                }
                .boxed_local(),
            );
        }
        let mut node_of = FastMap::default();
        for address in &stale {
            let Some(recorded) = self.state.resources.get(address) else {
                continue;
            };
            let Ok(i) = self.scheduler.add(&[]) else {
                continue;
            };
            let change = PlannedChange {
                provider: recorded.provider.clone(),
                resource_type: recorded.resource_type.clone(),
                interrupted: self.state.pending.get(address).map(|p| p.operation),
                ..planned(address.clone(), Action::Delete)
            };
            self.push_node(change);
            node_of.insert(address.clone(), i);
        }
        for address in &stale {
            let parent_node = self
                .state
                .resources
                .get(address)
                .and_then(|r| r.parent.as_ref())
                .and_then(|p| node_of.get(p));
            if let (Some(&waits), Some(&child)) = (parent_node, node_of.get(address)) {
                obey(self.scheduler.depend(waits, child));
            }
        }
    }

    /// A child prepared: unchanged (its parent gets what is recorded), or an operation.
    fn child_op(&mut self, i: NodeId) -> Result<Option<Op>, CoreFailure> {
        let change = &self.changes[i];
        let address = change.address.clone();
        let Some(Kid::Child { inputs, .. }) = self.kids.get(&i) else {
            return Err(CoreFailure::new(
                format!("{address}: not a child of this run"),
                FailureKind::Internal,
            ));
        };
        let inputs = inputs.clone();
        let parent = self
            .scheduler
            .parent(i)
            .map(|p| self.changes[p].address.clone());
        let recorded = self.state.resources.get(&address).cloned();
        if let (Action::Noop, Some(recorded)) = (change.action, &recorded) {
            self.summary.unchanged += 1;
            self.settle_kid(i, Ok(recorded.outputs.clone()));
            obey(self.scheduler.end(i, End::Succeeded));
            return Ok(None);
        }
        let (operation, recorded) = match recorded {
            Some(r) => (OperationKind::Update, r),
            None => (OperationKind::Create, unrecorded()),
        };
        let desired = Desired {
            provider: change.provider.clone(),
            resource_type: change.resource_type.clone(),
            inputs,
            capabilities: Vec::new(),
            // Deleted before its parent.
            dependencies: parent.iter().cloned().collect(),
        };
        let was_pending = change.interrupted.is_some();
        let mut op = self.op(&address, operation, &recorded, Some(desired), was_pending)?;
        op.parent = parent;
        Ok(Some(op))
    }

    /// A child whose parent ended without succeeding: its work is dropped.
    fn cancel(&mut self, i: NodeId, work: &mut Work) {
        let Some(NodeState::Dispatched(phase)) = self.scheduler.state(i) else {
            return;
        };
        if phase == Phase::Finishing {
            // Its provider answered: its result is being journaled, and ends it as usual.
            return;
        }
        if let Some(handle) = self.aborts.remove(&i) {
            handle.abort();
        }
        let op = self.ops.remove(&i);
        if let (Some(op), Phase::Recording | Phase::Recorded) = (&op, phase) {
            if op.journaled() && !op.was_pending {
                // Its intent is (or is about to be) durable, but it never reached its
                // provider: settled, so the next run does not ask anyone to check it.
                let settled = Record::Failed {
                    address: self.changes[i].address.clone(),
                    operation: op.operation,
                    error: "cancelled with its parent before it was sent to its provider".into(),
                };
                let backend = self.backend.clone();
                let work_done = async move {
                    let _ = append_durably(&*backend, vec![settled]).await;
                    None
                };
                work.push(work_done.boxed_local());
            }
        }
        if self.is_permit(i) {
            self.release_permit(i);
            return;
        }
        let parent = self.scheduler.parent(i).unwrap_or(i);
        let parent_address = self.changes[parent].address.clone();
        match phase {
            Phase::Called | Phase::Finishing => {
                let change = &self.changes[i];
                self.summary.interrupted += 1;
                self.events.emit(Event::ResourceFailed {
                    address: change.address.clone(),
                    operation: change.action.as_str(),
                    error: format!(
                        "{}: cancelled because its parent `{parent_address}` ended without it (whether it took effect is unknown: it stays pending)",
                        change.address
                    ),
                    kind: FailureKind::Cancelled,
                    details: String::new(),
                    elapsed_seconds: 0.0,
                });
                obey(self.scheduler.end(i, End::Interrupted));
                self.settle_kid(
                    i,
                    Err(OperationError::cancelled("cancelled with its parent")),
                );
            }
            _ => {
                obey(self.scheduler.end(i, End::Skipped(Skip::Parent(parent))));
                self.report_skip(i, Skip::Parent(parent));
            }
        }
    }
    fn step(&mut self, step: Step, work: &mut Work) {
        match step {
            Step::Prepare(i) => self.prepare(i, work),
            Step::Record(i) => {
                let Some(op) = self.ops.get(&i) else { return };
                let intent = Record::Intent {
                    address: self.changes[i].address.clone(),
                    operation: op.operation,
                    provider: op.provider.clone(),
                    resource_type: op.resource_type.clone(),
                    inputs: op.inputs.clone(),
                    time: now_unix(),
                };
                let backend = self.backend.clone();
                self.spawn(work, i, async move {
                    match append_durably(&*backend, vec![intent]).await {
                        Ok(()) => Done::Recorded(i),
                        Err(e) => Done::Finished(i, Outcome::State(e)),
                    }
                });
            }
            Step::Call(i) if self.is_permit(i) => {
                // Granted: the provider holds the slot until it gives the permit back.
                let client: permit::Client = capnp_rpc::new_client(PermitServer {
                    node: i,
                    asks: self.asks.clone(),
                });
                if let Some(Kid::Permit { reply }) = self.kids.get_mut(&i) {
                    if let Some(reply) = reply.take() {
                        if reply.send(Ok(client)).is_err() {
                            // Nobody waits for it any more (the ask was cancelled).
                            self.release_permit(i);
                        }
                    }
                }
            }
            Step::Call(i) => {
                let Some(op) = self.ops.get_mut(&i) else {
                    return;
                };
                let Some(mut call) = op.call.take() else {
                    return;
                };
                let info = op.connection.info().resource_type(&op.resource_type);
                if info.is_some_and(|t| t.uses_scheduler) {
                    call.scheduler = Some(capnp_rpc::new_client(SchedulerServer {
                        parent: i,
                        asks: self.asks.clone(),
                    }));
                }
                let address = self.changes[i].address.clone();
                // Started means recorded: the intent is durable before anyone is told.
                self.events.emit(Event::ResourceStart {
                    address: address.clone(),
                    operation: op.operation.as_str(),
                    provider: op.provider.clone(),
                    resource_type: call.resource_type.clone(),
                });
                // A provider whose settings refer to what this run makes gets them now, once,
                // before its first operation (which waited for what they refer to).
                let settings = self.late_config.get(&op.provider).map(|once| {
                    let config = self
                        .deployment
                        .providers
                        .get(&op.provider)
                        .and_then(|d| recorded_settings(d, self.state))
                        .unwrap_or_default();
                    (once.clone(), config.to_string())
                });
                let failed_address = address.clone();
                let observer =
                    progress_observer(self.events.clone(), address, op.operation.as_str());
                let connection = op.connection.clone();
                self.spawn(work, i, async move {
                    let started = Instant::now();
                    if let Some((once, settings)) = settings {
                        let configured = once
                            .get_or_init(|| async {
                                connection.configure(&settings).await.map(|_| ())
                            })
                            .await;
                        if let Err(why) = configured {
                            let error = OperationError::permanent(format!(
                                "its provider's settings were not taken: {why}"
                            ));
                            let failed = CallError::Failed {
                                address: failed_address,
                                error,
                            };
                            return Done::Answered(i, Err(failed), 0.0);
                        }
                    }
                    let result = connection.call(call, observer).await;
                    Done::Answered(i, result, started.elapsed().as_secs_f64())
                });
            }
            Step::Settle(i, stop) => {
                let change = &self.changes[i];
                // Its intent is in the journal, but it never reached its provider: settle it,
                // so the next run does not ask anyone to check. (Not if an earlier run left it
                // pending: that one still needs a check.)
                let settle = self.ops.get(&i).is_some_and(|op| op.journaled())
                    && change.interrupted.is_none();
                let settled = settle.then(|| Record::Failed {
                    address: change.address.clone(),
                    operation: self
                        .ops
                        .get(&i)
                        .map_or(OperationKind::Read, |op| op.operation),
                    error: "not sent to its provider: the run stopped".into(),
                });
                let backend = self.backend.clone();
                self.spawn(work, i, async move {
                    if let Some(settled) = settled {
                        if let Err(e) = append_durably(&*backend, vec![settled]).await {
                            return Done::Finished(i, Outcome::State(e));
                        }
                    }
                    Done::Settled(i, stop)
                });
            }
            Step::Skipped(i, skip) => self.report_skip(i, skip),
            Step::Cancel(i) => {
                self.cancel(i, work);
            }
        }
    }

    fn done(&mut self, done: Done, work: &mut Work) {
        match done {
            Done::Recorded(i) => obey(self.scheduler.recorded(i)),
            Done::Answered(i, result, elapsed) => {
                obey(self.scheduler.answered(i, result.is_ok()));
                // Permits are lent to an operation while it runs.
                if let Some(permits) = self.permits_of.remove(&i) {
                    for k in permits {
                        self.release_permit(k);
                    }
                }
                let Some(mut op) = self.ops.remove(&i) else {
                    return;
                };
                if result.is_ok() {
                    if let Some(then) = op.then.take() {
                        self.ops.insert(i, *then);
                    }
                }
                let address = self.changes[i].address.clone();
                self.spawn(
                    work,
                    i,
                    finish(
                        i,
                        address,
                        op,
                        result,
                        elapsed,
                        Outlets {
                            backend: self.backend.clone(),
                            events: self.events.clone(),
                            secrets: self.options.secrets.clone(),
                        },
                    ),
                );
            }
            Done::Finished(i, outcome) => {
                self.finished(i, outcome, work);
            }
            Done::Settled(i, stop) => {
                self.ops.remove(&i);
                obey(self.scheduler.end(i, End::Skipped(Skip::NotSent(stop))));
                self.report_skip(i, Skip::NotSent(stop));
            }
            Done::Evaluated(result) => self.evaluated(result),
        }
    }

    fn finished(&mut self, i: NodeId, outcome: Outcome, work: &mut Work) {
        let address = self.changes[i].address.clone();
        match outcome {
            Outcome::Done {
                state: now,
                handles,
                counted,
            } => {
                match counted {
                    Action::Create => self.summary.created += 1,
                    Action::Update => self.summary.updated += 1,
                    _ => self.summary.unchanged += 1,
                }
                if counted != Action::Noop {
                    self.state.apply_owned(Record::Done {
                        address: address.clone(),
                        state: now,
                    });
                } else if let Some(recorded) = self.state.resources.get_mut(&address) {
                    // A read (what the provider says now) or re-recorded wiring.
                    recorded.outputs = now.outputs;
                    recorded.dependencies = now.dependencies;
                }
                if self.kids.contains_key(&i) {
                    let outputs = self
                        .state
                        .resources
                        .get(&address)
                        .map(|r| r.outputs.clone());
                    self.settle_kid(i, Ok(outputs.unwrap_or_else(Json::empty_object)));
                }
                let made = matches!(counted, Action::Create | Action::Update);
                if made && self.recorded_children.contains_key(&address) {
                    self.delete_stale_children(&address, work);
                }
                if !handles.is_empty() {
                    self.handles.insert(address, handles);
                }
                obey(self.scheduler.end(i, End::Succeeded));
            }
            Outcome::Deleted => {
                self.summary.deleted += 1;
                self.state.apply_owned(Record::Deleted { address });
                match self.ops.get(&i) {
                    // A replace: the old resource is gone; now its create.
                    Some(then) => {
                        let provider = then.provider.clone();
                        obey(self.scheduler.queue(i, Some(&provider), true));
                    }
                    None => obey(self.scheduler.end(i, End::Succeeded)),
                }
            }
            Outcome::Failed { recorded, error } => {
                self.ops.remove(&i);
                self.settle_kid(i, Err(*error));
                self.summary.failed += 1;
                self.state.pending.remove(&address);
                if let Some(now) = recorded {
                    self.state.apply_owned(Record::Done {
                        address,
                        state: *now,
                    });
                }
                obey(self.scheduler.end(i, End::Failed));
            }
            Outcome::State(e) => {
                // Without durable records nothing else may run.
                self.ops.remove(&i);
                self.settle_kid(
                    i,
                    Err(OperationError::internal(format!(
                        "the state could not be written: {e}"
                    ))),
                );
                self.summary.failed += 1;
                self.state_error.get_or_insert(e);
                self.scheduler.stop(Stop::StateError);
                obey(self.scheduler.end(i, End::Failed));
            }
        }
    }

    /// What a dispatched node does: nothing (unchanged), fail at once (what it needs is
    /// missing), re-record its wiring, or call its provider.
    fn prepare(&mut self, i: NodeId, work: &mut Work) {
        let change = &self.changes[i];
        let address = change.address.clone();
        let was_pending = change.interrupted.is_some();
        let action = change.action;
        if self.is_permit(i) {
            obey(self.scheduler.queue(i, None, false));
            return;
        }
        let prepared = match action {
            _ if self.kids.contains_key(&i) => self.child_op(i),
            Action::Delete => self.delete_op(i, was_pending),
            _ => self.change_op(i, was_pending, work),
        };
        match prepared {
            Ok(Some(op)) => {
                let provider = op.provider.clone();
                let journaled = op.journaled();
                self.ops.insert(i, op);
                obey(self.scheduler.queue(i, Some(&provider), journaled));
            }
            // Ended, or a future of its own.
            Ok(None) => {}
            Err(failure) => {
                self.settle_kid(
                    i,
                    Err(OperationError::new(
                        error_kind(failure.kind),
                        failure.error.clone(),
                    )),
                );
                self.events.emit(Event::ResourceFailed {
                    address,
                    operation: action.as_str(),
                    error: failure.error,
                    kind: failure.kind,
                    details: String::new(),
                    elapsed_seconds: 0.0,
                });
                self.summary.failed += 1;
                obey(self.scheduler.end(i, End::Failed));
            }
        }
    }

    fn delete_op(&self, i: NodeId, was_pending: bool) -> Result<Option<Op>, CoreFailure> {
        let address = &self.changes[i].address;
        let Some(recorded) = self.state.resources.get(address) else {
            return Err(CoreFailure::new(
                format!("{address}: planned for deletion but not in the state (was it forgotten meanwhile?)"),
                FailureKind::InvalidInput,
            ));
        };
        self.op(address, OperationKind::Delete, recorded, None, was_pending)
            .map(Some)
    }

    /// A delete, or (with `desired`: inputs and capabilities) a create, update or read of
    /// the resource at `address`, `recorded` as it is (for deletes and reads) or was.
    fn op(
        &self,
        address: &str,
        operation: OperationKind,
        recorded: &ResourceState,
        desired: Option<Desired>,
        was_pending: bool,
    ) -> Result<Op, CoreFailure> {
        let (provider, resource_type) = match &desired {
            Some(d) => (d.provider.clone(), d.resource_type.clone()),
            None => (recorded.provider.clone(), recorded.resource_type.clone()),
        };
        let Some(connection) = self.providers.connections.get(&provider).cloned() else {
            let error = match operation {
                OperationKind::Delete => format!(
                    "{address}: its provider `{provider}` is not declared in the deployment any more; declare it again until its resources are deleted"
                ),
                // A caller that started fewer providers than the run needs (e.g. only those
                // of the changes, when an unchanged resource must be read for its
                // capabilities).
                OperationKind::Read => format!(
                    "{address}: provider `{provider}` was not started for this run, so `{address}` cannot be read for its capabilities"
                ),
                _ => format!(
                    "{address}: provider `{provider}` was not started for this run, so `{address}` cannot be changed"
                ),
            };
            let kind = match operation {
                OperationKind::Delete => FailureKind::InvalidInput,
                _ => FailureKind::Provider,
            };
            return Err(CoreFailure::new(error, kind));
        };
        let timeout = self
            .providers
            .timeouts
            .get(&provider)
            .copied()
            .or(self.options.timeout);
        let previous = operation != OperationKind::Create;
        let (inputs, capabilities, dependencies) = match desired {
            Some(d) => (d.inputs, d.capabilities, d.dependencies),
            None => (
                recorded.inputs.clone(),
                Vec::new(),
                recorded.dependencies.clone(),
            ),
        };
        let call = OperationCall {
            previous_inputs: previous.then(|| recorded.inputs.clone()),
            previous_outputs: previous.then(|| recorded.outputs.clone()),
            capabilities,
            timeout,
            ..OperationCall::new(operation, &resource_type, address, inputs.clone())
        };
        Ok(Op {
            operation,
            provider,
            connection,
            call: Some(call),
            resource_type,
            inputs,
            dependencies,
            was_pending,
            then: None,
            parent: None,
        })
    }

    /// A create, update, replace or (unchanged) nothing, a re-recorded wiring or a read.
    fn change_op(
        &mut self,
        i: NodeId,
        was_pending: bool,
        work: &mut Work,
    ) -> Result<Option<Op>, CoreFailure> {
        let change = &self.changes[i];
        let address = change.address.clone();
        let action = change.action;
        let node = &self.nodes[i];
        let Some(decl) = node.decl().and_then(|d| self.decl_at(d)) else {
            return Err(CoreFailure::new(
                format!("{address}: planned as a change but not declared in the deployment"),
                FailureKind::InvalidInput,
            ));
        };
        let state = &*self.state;
        let lookup = |target: &str, output: &str| {
            // Every finished resource's outputs are in the state by now.
            state
                .resources
                .get(target)
                .and_then(|r| r.outputs.get_raw(output))
        };
        if !decl.sensitive.is_empty() {
            learn_sensitive(&decl, &self.options.secrets, &lookup);
        }
        let Some(inputs) = decl.resolve(&lookup) else {
            // A dependency finished without the output: the provider broke its handshake's
            // promise.
            let missing: Vec<String> = decl
                .refs
                .iter()
                .filter(|r| lookup(&r.address, &r.output).is_none())
                .map(|r| format!("{}#{}", r.address, r.output))
                .collect();
            return Err(CoreFailure::new(
                format!(
                    "{address}: the outputs it refers to were not produced: {}",
                    missing.join(", ")
                ),
                FailureKind::InvalidInput,
            ));
        };
        // Inputs its provider marks sensitive are secrets from now on.
        let marked = self
            .providers
            .connections
            .get(&decl.provider)
            .and_then(|c| c.info().resource_type(&decl.resource_type))
            .is_some_and(|t| t.inputs.iter().any(|i| i.sensitive));
        if marked {
            learn_sensitive_inputs(
                &inputs,
                &self.providers.connections[&decl.provider],
                &decl.resource_type,
                &self.options.secrets,
            );
        }
        // The plan creates only what the state does not hold.
        debug_assert!(
            action != Action::Create || !state.resources.contains_key(&address),
            "{address}: planned as a create but recorded in the state"
        );
        let recorded = match action {
            Action::Create => None,
            _ => state.resources.get(&address),
        };
        // A type whose result can change while its inputs stay the same (`readOnPlan`: a
        // Terraform data source, a build) is run again when something it waited on changed,
        // even if its inputs came out the same.
        let reads_the_world = !change.waits_on.is_empty()
            && self
                .providers
                .connections
                .get(&decl.provider)
                .and_then(|c| c.info().resource_type(&decl.resource_type))
                .is_some_and(|t| t.read_on_plan);
        let unchanged = action != Action::Replace
            && !change.read_changed
            && !reads_the_world
            && recorded.is_some_and(|r| r.inputs == inputs);
        let dependencies = decl.dependencies();
        if let (true, false, Some(recorded)) = (unchanged, node.capability_source, recorded) {
            let mut old = recorded.dependencies.clone();
            let mut new = dependencies.clone();
            old.sort();
            new.sort();
            // Where its secrets are, as known now (a value newly marked sensitive).
            let sensitive = match self.providers.connections.get(&decl.provider) {
                Some(connection) if !self.options.secrets.is_empty() => {
                    let mut probe = recorded.clone();
                    note_sensitive(&address, &mut probe, connection, &self.options.secrets);
                    probe.sensitive
                }
                _ => recorded.sensitive.clone(),
            };
            if old == new && sensitive == recorded.sensitive {
                self.summary.unchanged += 1;
                obey(self.scheduler.end(i, End::Succeeded));
                return Ok(None);
            }
            // Same inputs, new wiring (a `$ref` became an equal literal, or a `$cap` went) or
            // newly known secrets: recorded, so deletes stay ordered and `state show` hides them.
            let mut updated = recorded.clone();
            updated.dependencies = dependencies;
            updated.sensitive = sensitive;
            let backend = self.backend.clone();
            self.spawn(work, i, async move {
                let done = Record::Done {
                    address,
                    state: updated.clone(),
                };
                let outcome = match append_durably(&*backend, vec![done]).await {
                    Ok(()) => Outcome::Done {
                        state: updated,
                        handles: Vec::new(),
                        counted: Action::Noop,
                    },
                    Err(e) => Outcome::State(e),
                };
                Done::Finished(i, outcome)
            });
            return Ok(None);
        }
        let mut capabilities = Vec::new();
        for cap in &decl.capabilities {
            let found = self
                .handles
                .get(&cap.address)
                .and_then(|hs| hs.iter().find(|(n, _)| n == &cap.name))
                .map(|(_, c)| c.clone());
            match found {
                Some(client) => capabilities.push((cap.input.clone(), client)),
                None => {
                    return Err(CoreFailure::new(
                        format!(
                            "{address}: `{}` returned no capability named `{}`",
                            cap.address, cap.name
                        ),
                        FailureKind::InvalidInput,
                    ))
                }
            }
        }
        let desired = Desired {
            provider: decl.provider.clone(),
            resource_type: decl.resource_type.clone(),
            inputs,
            capabilities,
            dependencies,
        };
        let empty;
        let (operation, recorded) = match (action, unchanged, recorded) {
            (Action::Replace, _, Some(old)) => {
                // Delete what the old provider or type made, then create anew.
                let create = self.op(&address, OperationKind::Create, old, Some(desired), false)?;
                let mut delete =
                    self.op(&address, OperationKind::Delete, old, None, was_pending)?;
                delete.then = Some(Box::new(create));
                return Ok(Some(delete));
            }
            (_, true, Some(recorded)) => (OperationKind::Read, recorded),
            (_, false, Some(recorded)) => (OperationKind::Update, recorded),
            (_, _, None) => {
                empty = unrecorded();
                (OperationKind::Create, &empty)
            }
        };
        self.op(&address, operation, recorded, Some(desired), was_pending)
            .map(Some)
    }

    /// Reports a node the scheduler (or the driver) ended without running it.
    fn report_skip(&mut self, i: NodeId, skip: Skip) {
        self.ops.remove(&i);
        if self.is_permit(i) {
            self.settle_kid(i, Err(run_over()));
            return;
        }
        self.settle_kid(
            i,
            Err(OperationError::cancelled(format!(
                "{}: not run ({skip:?})",
                self.changes[i].address
            ))),
        );
        let change = &self.changes[i];
        self.summary.skipped += 1;
        let stop_reason = |stop: Stop| match stop {
            Stop::FailFast => "--fail-fast stopped the run".to_string(),
            Stop::StateError => "the state could not be written, so the run stopped".to_string(),
            Stop::Interrupted => "the run was interrupted".to_string(),
        };
        let (reason, dependency) = match skip {
            Skip::Dependency(root) => {
                let failed = self.changes[root].address.clone();
                // A delete waits for the deletes of what depends on it: the one that failed
                // is a dependent, not a dependency.
                let reason = if change.action == Action::Delete {
                    format!("`{failed}`, which depends on it, was not deleted")
                } else {
                    format!("dependency `{failed}` failed")
                };
                (reason, failed)
            }
            Skip::NotSent(Stop::Interrupted) => (
                "the run was interrupted before it was sent to its provider".into(),
                String::new(),
            ),
            Skip::NotSent(stop) => {
                self.state.pending.remove(&change.address);
                (stop_reason(stop), String::new())
            }
            Skip::Stopped(stop) => (stop_reason(stop), String::new()),
            Skip::Parent(parent) => {
                let parent = self.changes[parent].address.clone();
                (format!("its parent `{parent}` ended without it"), parent)
            }
            Skip::Cycle => (
                "its recorded dependencies form a cycle; delete it with `capstan state forget` after removing it by hand".into(),
                String::new(),
            ),
        };
        self.events.emit(Event::ResourceSkipped {
            address: change.address.clone(),
            operation: change.action.as_str(),
            reason,
            dependency,
        });
    }

    /// After an interrupt (the work already dropped): says what was cut short, and settles
    /// intents that never reached a provider.
    async fn interrupted(&mut self) {
        self.events.emit(Event::Interrupted {
            message: "interrupted: cancelling operations in flight; state is saved (press Ctrl-C again to stop at once)".into(),
        });
        let mut never_sent = Vec::new();
        for (i, phase) in self.scheduler.interrupt() {
            if self.is_permit(i) {
                self.settle_kid(i, Err(run_over()));
                continue;
            }
            let change = &self.changes[i];
            match phase {
                Phase::Called | Phase::Finishing => {
                    self.ops.remove(&i);
                    self.settle_kid(i, Err(OperationError::cancelled("interrupted")));
                    let change = &self.changes[i];
                    self.summary.interrupted += 1;
                    self.events.emit(Event::ResourceFailed {
                        address: change.address.clone(),
                        operation: change.action.as_str(),
                        error: format!("{}: interrupted", change.address),
                        kind: FailureKind::Cancelled,
                        details: String::new(),
                        elapsed_seconds: 0.0,
                    });
                }
                _ => {
                    let journaled = self.ops.get(&i).is_some_and(|op| op.journaled());
                    if journaled
                        && matches!(phase, Phase::Recording | Phase::Recorded)
                        && change.interrupted.is_none()
                    {
                        // As `Step::Settle`: its intent is (or is about to be) durable.
                        let operation = self
                            .ops
                            .get(&i)
                            .map_or(change.action.first_operation(), |op| op.operation);
                        never_sent.push(Record::Failed {
                            address: change.address.clone(),
                            operation,
                            error: "interrupted before it was sent to its provider".into(),
                        });
                    }
                    self.report_skip(i, Skip::NotSent(Stop::Interrupted));
                }
            }
        }
        // Skips the scheduler found before the interrupt.
        while let Some(step) = self.scheduler.next_step() {
            if let Step::Skipped(i, skip) = step {
                self.report_skip(i, skip);
            }
        }
        // The state takes the records as the journal does (if that fails the intents stay
        // pending, which only asks for a check).
        if !never_sent.is_empty()
            && append_durably(&*self.backend, never_sent.clone())
                .await
                .is_ok()
        {
            for record in never_sent {
                self.state.apply_owned(record);
            }
        }
    }
}

/// What a create starts from: nothing recorded.
fn unrecorded() -> ResourceState {
    ResourceState {
        provider: String::new(),
        resource_type: String::new(),
        inputs: Json::null(),
        outputs: Json::null(),
        dependencies: Vec::new(),
        parent: None,
        sensitive: Vec::new(),
        tainted: false,
    }
}

/// The children recorded in `state`, by parent address.
fn recorded_children(state: &State) -> FastMap<String, Vec<String>> {
    let mut children: FastMap<String, Vec<String>> = FastMap::default();
    for (address, r) in &state.resources {
        if let Some(parent) = &r.parent {
            children
                .entry(parent.clone())
                .or_default()
                .push(address.clone());
        }
    }
    children
}

/// A change with nothing but its address and action (the rest to fill in).
fn planned(address: String, action: Action) -> PlannedChange {
    PlannedChange {
        address,
        action,
        provider: String::new(),
        resource_type: String::new(),
        changed_inputs: Vec::new(),
        waits_on: Vec::new(),
        interrupted: None,
        note: None,
        replaces: None,
        declared: None,
        read_changed: false,
        planned: None,
    }
}

/// What a create, update or read is asked to make the resource.
struct Desired {
    provider: String,
    resource_type: String,
    inputs: Json,
    capabilities: Vec<(String, resource_handle::Client)>,
    dependencies: Vec<String>,
}

fn progress_observer(
    events: Rc<dyn EventSink>,
    address: String,
    operation: &'static str,
) -> Rc<dyn capstan_host::ProgressObserver> {
    Rc::new(move |batch: Vec<ProgressEvent>| {
        for progress in batch {
            events.emit(Event::ResourceProgress {
                address: address.clone(),
                operation,
                progress,
            });
        }
        async {}
    })
}

/// Journals what the provider answered and reports it.
async fn finish(
    i: NodeId,
    address: String,
    op: Op,
    result: Result<OperationSuccess, CallError>,
    elapsed: f64,
    outlets: Outlets,
) -> Done {
    let Outlets {
        backend,
        events,
        secrets,
    } = outlets;
    let verb = op.operation.as_str();
    let success = match result {
        Ok(success) => success,
        Err(error) => {
            let failure = failure(&address, error, op.was_pending);
            // A create its provider reports failed may have made part of the resource: where
            // its reads can tell, what it made is recorded (tainted: the next plan replaces it),
            // so no side effect is left unknown to the state.
            let made = if op.operation == OperationKind::Create && failure.settled {
                made_anyway(&address, &op).await
            } else {
                None
            };
            let recorded = made.map(|outputs| {
                let mut state = ResourceState {
                    provider: op.provider.clone(),
                    resource_type: op.resource_type.clone(),
                    inputs: op.inputs.clone(),
                    outputs,
                    dependencies: op.dependencies.clone(),
                    parent: op.parent.clone(),
                    sensitive: Vec::new(),
                    tainted: true,
                };
                note_sensitive(&address, &mut state, &op.connection, &secrets);
                Box::new(state)
            });
            if op.journaled() && failure.settled {
                let settle = match &recorded {
                    Some(state) => Record::Done {
                        address: address.clone(),
                        state: (**state).clone(),
                    },
                    None => Record::Failed {
                        address: address.clone(),
                        operation: op.operation,
                        error: failure.error.clone(),
                    },
                };
                if let Err(e) = append_durably(&*backend, vec![settle]).await {
                    return Done::Finished(i, Outcome::State(e));
                }
            }
            let error = Box::new(
                OperationError::new(error_kind(failure.kind), failure.error.clone())
                    .with_details(failure.details.clone()),
            );
            events.emit(Event::ResourceFailed {
                address,
                operation: verb,
                error: failure.error,
                kind: failure.kind,
                details: failure.details,
                elapsed_seconds: elapsed,
            });
            return Done::Finished(i, Outcome::Failed { recorded, error });
        }
    };
    if op.operation == OperationKind::Delete {
        let deleted = Record::Deleted {
            address: address.clone(),
        };
        if let Err(e) = append_durably(&*backend, vec![deleted]).await {
            return Done::Finished(i, Outcome::State(e));
        }
        events.emit(Event::ResourceComplete {
            address,
            operation: verb,
            elapsed_seconds: elapsed,
            outputs: Json::null(),
        });
        return Done::Finished(i, Outcome::Deleted);
    }
    let journaled = op.journaled();
    let mut now = ResourceState {
        provider: op.provider,
        resource_type: op.resource_type,
        inputs: op.inputs,
        outputs: success.outputs,
        dependencies: op.dependencies,
        parent: op.parent,
        sensitive: Vec::new(),
        tainted: false,
    };
    note_sensitive(&address, &mut now, &op.connection, &secrets);
    if journaled {
        let done = Record::Done {
            address: address.clone(),
            state: now.clone(),
        };
        if let Err(e) = append_durably(&*backend, vec![done]).await {
            return Done::Finished(i, Outcome::State(e));
        }
    }
    if let Some(missing) = missing_outputs(&op.connection, &now) {
        // The provider acted (the resource is recorded), but what depends on these outputs
        // cannot run: say so now, not when a dependent fails to resolve.
        let message = format!(
            "{address}: provider `{}` returned no {missing}, which `{}` declares; the resource is recorded as it was returned, and what depends on it is skipped",
            now.provider, now.resource_type
        );
        let error = Box::new(OperationError::internal(message.clone()));
        events.emit(Event::ResourceFailed {
            address: address.clone(),
            operation: verb,
            error: message,
            kind: FailureKind::Provider,
            // Names only: values may be secrets, or megabytes.
            details: format!("outputs returned: {}", now.outputs.keys().join(", ")),
            elapsed_seconds: elapsed,
        });
        let recorded = (op.operation != OperationKind::Read).then(|| Box::new(now));
        return Done::Finished(i, Outcome::Failed { recorded, error });
    }
    events.emit(Event::ResourceComplete {
        address,
        operation: verb,
        elapsed_seconds: elapsed,
        outputs: now.outputs.clone(),
    });
    let counted = match op.operation {
        OperationKind::Create => Action::Create,
        OperationKind::Update => Action::Update,
        _ => Action::Noop,
    };
    Done::Finished(
        i,
        Outcome::Done {
            state: now,
            handles: success.capabilities,
            counted,
        },
    )
}

/// After a create its provider reports failed: what the provider finds was made anyway, for
/// types whose reads look at the real resource.
async fn made_anyway(address: &str, op: &Op) -> Option<Json> {
    let checks = op
        .connection
        .info()
        .resource_type(&op.resource_type)
        .is_some_and(|t| t.read_checks);
    if !checks {
        return None;
    }
    let call = OperationCall {
        previous_inputs: Some(op.inputs.clone()),
        previous_outputs: None,
        ..OperationCall::new(
            OperationKind::Read,
            &op.resource_type,
            address,
            op.inputs.clone(),
        )
    };
    let read = op.connection.call(call, capstan_host::ignore_progress());
    match tokio::time::timeout(Duration::from_secs(60), read).await {
        Ok(Ok(found)) => Some(found.outputs),
        _ => None,
    }
}

/// Where a finished operation's result goes: the journal, the events, and the secrets it
/// reveals.
struct Outlets {
    backend: Rc<dyn StateBackend>,
    events: Rc<dyn EventSink>,
    secrets: Rc<crate::secrets::Secrets>,
}

/// A failure the core found itself, settled (nothing unknown happened in a provider).
struct CoreFailure {
    error: String,
    kind: FailureKind,
}

impl CoreFailure {
    fn new(error: String, kind: FailureKind) -> Self {
        CoreFailure { error, kind }
    }
}

/// How a failed call is reported.
struct CallFailure {
    error: String,
    kind: FailureKind,
    details: String,
    /// The provider reported the failure (journaled as such); otherwise the intent stays
    /// pending.
    settled: bool,
}

/// A failed call as a failure. Only a failure the provider reported itself is settled (the
/// resource is as it was); after a timeout, a crash or a lost connection nobody knows what the
/// provider did, so the intent stays pending and the next run says so.
fn failure(address: &str, error: CallError, was_pending: bool) -> CallFailure {
    // Reported by the provider, or refused before it was sent: nothing unknown happened in
    // this run. (A refused request leaves an earlier run's interruption as it was.)
    let settled = match error {
        CallError::Failed { .. } => true,
        CallError::RequestTooLarge { .. } | CallError::NotSent { .. } => !was_pending,
        _ => false,
    };
    let (kind, details) = match &error {
        CallError::Failed { error, .. } => (error.kind.into(), error.details.clone()),
        CallError::RequestTooLarge { .. } => (FailureKind::InvalidInput, String::new()),
        CallError::Timeout { .. } => (FailureKind::Timeout, String::new()),
        _ => (FailureKind::Provider, String::new()),
    };
    let mut message = error.to_string();
    if !settled {
        message.push_str(&format!(
            " (whether it took effect is unknown: it stays pending; check the resource, then `capstan state resolve {address}` or apply again)"
        ));
    }
    CallFailure {
        error: message,
        kind,
        details,
        settled,
    }
}

/// What the plan's reads found.
#[derive(Debug, Default)]
pub struct PlanReads {
    /// Reads that failed (the resource is planned as if unread).
    pub warnings: Vec<String>,
    /// Recorded resources their providers no longer find: made again (or, for a delete,
    /// already gone). The caller drops them from the state (and journals it, for an apply).
    pub gone: Vec<String>,
}

/// Asks the providers of types that declare `plansChanges` what each create and update whose
/// inputs are known now will make (for `capstan plan`): the planned outputs, which are known
/// only after the run, and whether an update replaces the resource. Changes nothing. Returns
/// what could not be planned, as warnings (the change is shown without the provider's plan).
pub async fn plan_with_providers(
    changes: &mut [PlannedChange],
    deployment: &Deployment,
    state: &State,
    providers: &Providers,
    jobs: usize,
) -> Vec<String> {
    let lookup = |target: &str, output: &str| {
        state
            .resources
            .get(target)
            .and_then(|r| r.outputs.get_raw(output))
    };
    // A provider configured only during the run cannot plan yet.
    let late = config_late(deployment, state, changes);
    let asks = changes.iter().enumerate().filter_map(|(i, change)| {
        if !matches!(change.action, Action::Create | Action::Update)
            || !change.waits_on.is_empty()
            || late.contains(&change.provider)
        {
            return None;
        }
        let connection = providers.connections.get(&change.provider)?;
        let info = connection.info().resource_type(&change.resource_type)?;
        if !info.plans_changes {
            return None;
        }
        let (_, decl) = deployment.resources.get_index(change.declared?)?;
        let inputs = decl.resolve(&lookup)?;
        let recorded = state
            .resources
            .get(&change.address)
            .filter(|_| change.action == Action::Update);
        let call = OperationCall {
            previous_inputs: recorded.map(|r| r.inputs.clone()),
            previous_outputs: recorded.map(|r| r.outputs.clone()),
            timeout: providers.timeouts.get(&change.provider).copied(),
            ..OperationCall::new(
                change.action.first_operation(),
                &change.resource_type,
                &change.address,
                inputs,
            )
        };
        let sensitive: Vec<String> = info
            .outputs
            .iter()
            .filter(|o| o.sensitive)
            .map(|o| o.name.clone())
            .collect();
        let connection = connection.clone();
        Some(async move { (i, connection.plan(&call).await, sensitive) })
    });
    let asks: Vec<_> = asks.collect();
    let mut answers = futures::stream::iter(asks).buffer_unordered(jobs.max(1));
    let mut warnings = Vec::new();
    while let Some((i, answer, sensitive)) = answers.next().await {
        let change = &mut changes[i];
        match answer {
            Ok(Some(plan)) => {
                let mut outputs = match serde_json::from_str::<serde_json::Value>(&plan.outputs) {
                    Ok(outputs @ serde_json::Value::Object(_)) => outputs,
                    _ => {
                        warnings.push(format!(
                            "its provider planned `{}` with outputs that are not a JSON object; it is shown without the provider's plan",
                            change.address
                        ));
                        continue;
                    }
                };
                if let Some(o) = outputs.as_object_mut() {
                    for name in &sensitive {
                        if let Some(v) = o.get_mut(name).filter(|v| !v.is_null()) {
                            *v = serde_json::Value::String("(sensitive)".into());
                        }
                    }
                }
                change.planned = Some(Box::new(crate::plan::ProviderPlanned {
                    outputs,
                    unknown: plan.unknown,
                    replace: plan.replace,
                }));
            }
            Ok(None) => {}
            Err(e) => warnings.push(format!(
                "its provider could not plan `{}` ({e}); it is shown without the provider's plan",
                change.address
            )),
        }
    }
    warnings
}

/// Reads recorded resources while planning, and plans what it finds: an update when the
/// outputs differ from those recorded, a create when the resource is gone. Without
/// `refresh`, only unchanged resources of types that declare `readOnPlan`; with it, also
/// every recorded resource (to be updated, replaced, deleted or left) of a type whose reads
/// look at the real resource (`readChecks`): drift made behind Capstan's back.
pub async fn read_on_plan(
    changes: &mut Vec<PlannedChange>,
    deployment: &Deployment,
    state: &State,
    providers: &Providers,
    jobs: usize,
    timeout: Option<Duration>,
    refresh: bool,
) -> PlanReads {
    // A provider configured only during the run cannot read yet.
    let late = config_late(deployment, state, changes);
    let reads = changes.iter().enumerate().filter_map(|(i, change)| {
        let recorded = state.resources.get(&change.address)?;
        if late.contains(&recorded.provider) {
            return None;
        }
        // The recorded resource's own provider and type (a replace changes them).
        let connection = providers.connections.get(&recorded.provider)?;
        let info = connection.info().resource_type(&recorded.resource_type)?;
        let wanted = (change.action == Action::Noop && info.read_on_plan)
            || (refresh && info.read_checks && change.action != Action::Create);
        if !wanted {
            return None;
        }
        let call = OperationCall {
            previous_inputs: Some(recorded.inputs.clone()),
            previous_outputs: Some(recorded.outputs.clone()),
            // As for any operation: the provider's timeout, else the run's.
            timeout: providers
                .timeouts
                .get(&recorded.provider)
                .copied()
                .or(timeout),
            ..OperationCall::new(
                OperationKind::Read,
                &recorded.resource_type,
                &change.address,
                recorded.inputs.clone(),
            )
        };
        let connection = connection.clone();
        // Only a type whose reads look at the real thing is believed when it says "gone".
        let checks = info.read_checks;
        Some(async move {
            let read = connection.call(call, capstan_host::ignore_progress()).await;
            (i, recorded, read, checks)
        })
    });
    let mut found = futures::stream::iter(reads).buffer_unordered(jobs.max(1));
    let mut reads = PlanReads::default();
    let mut updates = Vec::new();
    let mut gone = Vec::new();
    while let Some((i, recorded, read, checks)) = found.next().await {
        match read {
            Ok(now) if now.outputs != recorded.outputs => updates.push((
                i,
                crate::plan::changed_keys(&recorded.outputs, &now.outputs),
            )),
            Ok(_) => {}
            Err(CallError::Failed { error, .. })
                if error.kind == capstan_schema::ErrorKind::NotFound && checks =>
            {
                gone.push(i);
            }
            Err(e) => reads.warnings.push(format!(
                "could not read `{}` to see whether it changed ({e}); it is planned as if unread",
                changes[i].address
            )),
        }
    }
    drop(found);
    let mut changing: std::collections::HashSet<String> = Default::default();
    let mut drop_changes = Vec::new();
    for i in gone {
        let change = &mut changes[i];
        reads.gone.push(change.address.clone());
        if change.action == Action::Delete {
            // Nothing left to delete.
            drop_changes.push(i);
            continue;
        }
        change.action = Action::Create;
        change.replaces = None;
        change.changed_inputs = Vec::new();
        change.note =
            Some("not found by its provider (deleted outside Capstan): made again".into());
        changing.insert(change.address.clone());
    }
    for (i, keys) in updates {
        let change = &mut changes[i];
        if change.action != Action::Noop {
            // Drift of one that changes anyway: said, and made as declared.
            change.note.get_or_insert_with(|| {
                format!(
                    "changed outside Capstan: its {} differ from what is recorded",
                    keys.iter()
                        .map(|k| format!("`{k}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            });
            continue;
        }
        change.action = Action::Update;
        change.read_changed = true;
        change.note = Some(format!(
            "changed while its inputs did not: read now, its {} differ from what is recorded",
            keys.iter()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        changing.insert(change.address.clone());
    }
    if !drop_changes.is_empty() {
        drop_changes.sort_unstable();
        for i in drop_changes.into_iter().rev() {
            changes.remove(i);
        }
    }
    if changing.is_empty() {
        return reads;
    }
    // What refers to them may change with them: known only once they ran (the plan lists
    // changes dependencies first, so one pass reaches every dependent).
    for change in changes.iter_mut() {
        let Some(decl) = change
            .declared
            .and_then(|d| deployment.resources.get_index(d))
        else {
            continue;
        };
        let waits: Vec<String> = decl
            .1
            .refs
            .iter()
            .map(|r| r.address.clone())
            .filter(|a| changing.contains(a))
            .collect();
        if waits.is_empty() || change.read_changed || change.action == Action::Create {
            continue;
        }
        if change.action == Action::Noop {
            change.action = Action::Update;
        }
        for address in waits {
            if !change.waits_on.contains(&address) {
                change.waits_on.push(address);
            }
        }
        changing.insert(change.address.clone());
    }
    reads
}

/// Learns the outputs `now`'s provider marks sensitive, and records where the known secrets
/// are in its inputs and outputs.
pub(crate) fn note_sensitive(
    address: &str,
    now: &mut ResourceState,
    connection: &ProviderConnection,
    secrets: &crate::secrets::Secrets,
) {
    // Marked by its provider, or by the deployment (`{"$sensitive": {"$ref": …}}`).
    let mut marked: Vec<String> = connection
        .info()
        .resource_type(&now.resource_type)
        .map(|t| {
            t.outputs
                .iter()
                .filter(|o| o.sensitive)
                .map(|o| o.name.clone())
                .collect()
        })
        .unwrap_or_default();
    marked.extend(secrets.marked_outputs(address));
    if marked.is_empty() && secrets.is_empty() {
        return;
    }
    let outputs = now.outputs.value();
    for name in &marked {
        if let Some(value) = outputs.get(name) {
            secrets.add_value(value);
        }
    }
    let mut pointers = Vec::new();
    secrets.pointers(&now.inputs.value(), "/inputs", &mut pointers);
    secrets.pointers(&outputs, "/outputs", &mut pointers);
    for name in marked {
        let pointer = format!("/outputs/{}", name.replace('~', "~0").replace('/', "~1"));
        if outputs.get(&name).is_some() && !pointers.contains(&pointer) {
            pointers.push(pointer);
        }
    }
    now.sensitive = pointers;
}

/// Learns the inputs a provider's handshake marks sensitive.
fn learn_sensitive_inputs(
    inputs: &Json,
    connection: &ProviderConnection,
    resource_type: &str,
    secrets: &crate::secrets::Secrets,
) {
    let Some(t) = connection.info().resource_type(resource_type) else {
        return;
    };
    let value = inputs.value();
    for input in t.inputs.iter().filter(|i| i.sensitive) {
        if let Some(v) = value.get(&input.name) {
            secrets.add_value(v);
        }
    }
}

/// Learns what `decl` marks sensitive, with the outputs its marked references name.
fn learn_sensitive<'a>(
    decl: &ResourceDecl,
    secrets: &crate::secrets::Secrets,
    lookup: &impl Fn(&str, &str) -> Option<&'a serde_json::value::RawValue>,
) {
    fn walk<'a>(
        value: &serde_json::Value,
        secrets: &crate::secrets::Secrets,
        lookup: &impl Fn(&str, &str) -> Option<&'a serde_json::value::RawValue>,
    ) {
        use serde_json::Value;
        match value {
            Value::Object(map) => {
                if let (1, Some(Value::String(target))) = (map.len(), map.get("$ref")) {
                    if let Some((address, output)) = target.split_once('#') {
                        if let Some(raw) = lookup(address, output) {
                            if let Ok(v) = serde_json::from_str::<Value>(raw.get()) {
                                secrets.add_value(&v);
                            }
                        }
                    }
                    return;
                }
                map.values().for_each(|v| walk(v, secrets, lookup));
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, secrets, lookup)),
            other => secrets.add_value(other),
        }
    }
    for value in &decl.sensitive {
        walk(value, secrets, lookup);
    }
}

/// The outputs `now`'s type declares that its result lacks, as "output(s) `a`, `b`", if any.
/// Runs for every result, so it reads the outputs' top-level keys in one pass without
/// allocating (keys are compared where they lie in the text).
fn missing_outputs(connection: &ProviderConnection, now: &ResourceState) -> Option<String> {
    let declared = &connection.info().resource_type(&now.resource_type)?.outputs;
    if declared.is_empty() {
        return None;
    }
    let missing: Vec<String> = if declared.len() <= 128 {
        let found = found_keys(now.outputs.text(), declared);
        declared
            .iter()
            .enumerate()
            .filter(|(n, _)| found & (1u128 << n) == 0)
            .map(|(_, o)| format!("`{}`", o.name))
            .collect()
    } else {
        let returned: std::collections::HashSet<String> = now.outputs.keys().into_iter().collect();
        declared
            .iter()
            .filter(|o| !returned.contains(&o.name))
            .map(|o| format!("`{}`", o.name))
            .collect()
    };
    match missing.len() {
        0 => None,
        1 => Some(format!("output {}", missing[0])),
        _ => Some(format!("outputs {}", missing.join(", "))),
    }
}

/// Which of `declared` (the first 128) are top-level keys of the JSON object `text`, as bits.
fn found_keys(text: &str, declared: &[capstan_schema::info::OutputInfo]) -> u128 {
    use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
    struct Keys<'a>(&'a [capstan_schema::info::OutputInfo]);
    struct Key<'a>(&'a [capstan_schema::info::OutputInfo]);
    impl<'de> DeserializeSeed<'de> for Key<'_> {
        type Value = u128;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<u128, D::Error> {
            d.deserialize_str(self)
        }
    }
    impl<'de> Visitor<'de> for Key<'_> {
        type Value = u128;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a key")
        }
        fn visit_str<E>(self, key: &str) -> Result<u128, E> {
            Ok(self
                .0
                .iter()
                .take(128)
                .position(|o| o.name == key)
                .map_or(0, |n| 1u128 << n))
        }
    }
    impl<'de> Visitor<'de> for Keys<'_> {
        type Value = u128;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<u128, A::Error> {
            let mut found = 0;
            while let Some(bit) = map.next_key_seed(Key(self.0))? {
                found |= bit;
                map.next_value::<IgnoredAny>()?;
            }
            Ok(found)
        }
    }
    let mut de = serde_json::Deserializer::from_str(text);
    de.deserialize_map(Keys(declared)).unwrap_or(0)
}

/// Keeps `RefCell` out of the public API while letting tests collect events.
pub struct CollectEvents(pub RefCell<Vec<Event>>);

impl EventSink for CollectEvents {
    fn emit(&self, event: Event) {
        self.0.borrow_mut().push(event);
    }
}
