//! Running a plan: every operation as soon as what it depends on exists, under a global job
//! limit and per-provider limits, journaling an intent before each mutating call and its result
//! after. A failure skips what depends on it; everything independent goes on.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use capstan_host::{
    CallError, ChildRequest, Handle, HostOptions, LaunchError, OperationCall, OperationSuccess,
    PermitGuard, ProviderCommand, ProviderConnection, ProviderLog, ProviderSource, RunRequests,
};
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
mod children;
mod dispatch;
mod finish;
mod graph;
mod outputs;
mod plan_reads;
mod providers;
mod staged;

use children::*;
use dispatch::*;
use finish::*;
use graph::*;
use outputs::*;
use providers::*;

pub(crate) use outputs::note_sensitive;
pub use plan_reads::{plan_with_providers, read_on_plan, PlanReads, ProviderChecks};
pub use providers::{
    config_late, providers_needed, v0_types, InProcess, ProviderLauncher, Providers, Served,
};

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
    /// Whether its result is journaled (a read's is not: it changes nothing).
    fn journaled(&self) -> bool {
        self.operation != OperationKind::Read
    }

    /// Whether its intent is journaled before the call, to be settled if it is never sent:
    /// not for a read, nor for a type that changes nothing outside the state (a data source),
    /// which a crash can cut short without leaving anything to check.
    fn has_intent(&self) -> bool {
        self.journaled()
            && !self
                .connection
                .info()
                .resource_type(&self.resource_type)
                .is_some_and(|t| t.read_only)
    }
}

/// How an operation ended, once its result is journaled.
enum Outcome {
    /// Created, updated or read: the resource as it is now (as journaled, unless a read).
    Done {
        state: ResourceState,
        handles: Vec<(String, Handle)>,
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

/// One run of a plan: what it works on, where it records and reports, and what stops it.
/// `deployment` gives the desired inputs of creates and updates; `state` is updated as
/// records become durable.
pub struct Run<'a> {
    pub deployment: &'a Deployment,
    pub state: &'a mut State,
    pub backend: Rc<dyn StateBackend>,
    pub providers: &'a Providers,
    pub options: &'a RunOptions,
    pub events: Rc<dyn EventSink>,
    /// Cancelled: operations in flight are cancelled in their providers, every result is
    /// recorded, and intents never sent are settled.
    pub interrupt: CancellationToken,
    /// For a deployment in Nix with items left for later: each time a resource they wait
    /// for is made, the deployment is evaluated again (one evaluation at a time) while the
    /// run goes on, and what it now yields joins the running scheduler: new resources as
    /// nodes after what they depend on, members a nested deployment no longer yields as
    /// deletes. What is still deferred at the end is reported as skipped.
    pub stages: Option<crate::nix::Stages>,
}

impl<'a> Run<'a> {
    /// Runs `changes` (from `plan` or `plan_destroy`) to the end, or until interrupted.
    pub async fn execute(self, changes: Vec<PlannedChange>) -> Result<Summary, StateError> {
        let run_started = Instant::now();
        let interrupt = self.interrupt.clone();
        let events = self.events.clone();
        let mut driver = Driver::new(self, changes);
        driver.drive(&interrupt).await;
        for (i, skip) in driver.scheduler.unfinished() {
            driver.report_skip(i, skip);
        }
        driver.report_deferred(interrupt.is_cancelled());
        debug_assert_eq!(driver.scheduler.unended(), 0);
        // Said even when the state stopped the run (a full disk): what happened until then.
        events.emit(Event::Summary {
            counts: driver.summary.clone(),
            elapsed_seconds: run_started.elapsed().as_secs_f64(),
        });
        match driver.state_error {
            Some(e) => Err(e),
            None => Ok(driver.summary),
        }
    }
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
    handles: HashMap<String, Vec<(String, Handle)>>,
    summary: Summary,
    state_error: Option<StateError>,
    scheduler: Scheduler,
    /// What running operations handed back: children and permits.
    kin: Kin,
    /// For a deployment in Nix: what later evaluations added, and where they stand.
    staging: Staging,
    /// Providers handed their settings before their first operation ([`config_late`]), and
    /// whether that went well, once it is done.
    late_config: FastMap<String, Rc<tokio::sync::OnceCell<Result<(), String>>>>,
    /// Calls whose intents are durable, held until the backend notes them as sent.
    held: Vec<(NodeId, String, HeldCall)>,
}

/// A call whose intent is durable, not sent yet.
type HeldCall = std::pin::Pin<Box<dyn Future<Output = Done>>>;

/// What running operations hand back to the run (`children.rs`).
struct Kin {
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
    /// What operations ask (taken by the loop).
    asked: Option<tokio::sync::mpsc::UnboundedReceiver<Ask>>,
}

/// A deployment in Nix evaluated again while the run goes on (`staged.rs`).
#[derive(Default)]
struct Staging {
    /// Resources a later evaluation of a deployment in Nix declared while the run went on;
    /// node `decl` indices past the deployment's resources point here.
    added: Vec<Rc<ResourceDecl>>,
    added_index: FastMap<String, usize>,
    /// For a deployment in Nix: the node of each address of this run (creates, updates,
    /// no-ops, replaces; deletes too, so nothing is planned twice).
    node_of: FastMap<String, NodeId>,
    stages: Option<crate::nix::Stages>,
    evaluating: bool,
    /// The outputs given to the last evaluation.
    given: std::collections::HashSet<String>,
    evaluation_failed: bool,
    /// The deployment's files changed during the run: no later evaluation reads them.
    deployment_changed: bool,
}

impl<'a> Driver<'a> {
    /// The driver of `run`, with a node per change and its edges.
    fn new(run: Run<'a>, changes: Vec<PlannedChange>) -> Self {
        let Run {
            deployment,
            state,
            backend,
            providers,
            options,
            events,
            interrupt: _,
            stages,
        } = run;
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
        let (asks, asked) = tokio::sync::mpsc::unbounded_channel();
        let mut driver = Driver {
            ops: FastMap::default(),
            kin: Kin {
                kids: FastMap::default(),
                aborts: FastMap::default(),
                deleting: Default::default(),
                recorded_children: recorded_children(state),
                permits_of: FastMap::default(),
                child_addresses: Default::default(),
                asks,
                asked: Some(asked),
            },
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
            staging: Staging::default(),
            late_config: FastMap::default(),
            held: Vec::new(),
        };
        for provider in late {
            driver.late_config.insert(provider, Rc::default());
        }
        if let Some(stages) = stages {
            driver.start_stages(stages);
        }
        if !driver.kin.recorded_children.is_empty() {
            // (Only a recorded child's address can be asked for again while being deleted.)
            driver.kin.deleting = driver
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
        driver
    }

    /// Hands out steps and takes in what is done until nothing is left, or the interrupt.
    async fn drive(&mut self, interrupt: &CancellationToken) {
        let mut asked = self.kin.asked.take().expect("driven once");
        let mut work: Work = FuturesUnordered::new();
        let cancelled = interrupt.cancelled();
        tokio::pin!(cancelled);
        loop {
            while let Some(step) = self.scheduler.next_step() {
                self.step(step, &mut work);
            }
            self.send_held(&mut work);
            self.maybe_evaluate(&mut work);
            if work.is_empty() {
                break;
            }
            tokio::select! {
                Some(done) = work.next() => {
                    if let Some(done) = done {
                        self.done(done, &mut work);
                    }
                    // Everything else that is done by now, before handing out more steps.
                    while let Some(Some(done)) = work.next().now_or_never() {
                        if let Some(done) = done {
                            self.done(done, &mut work);
                        }
                    }
                }
                Some(ask) = asked.recv() => self.ask(ask),
                // Also while stopping for --fail-fast: an interrupt must not wait on hung calls.
                () = &mut cancelled => {
                    // Dropping the calls cancels them in the providers; their intents stay in the
                    // journal, so the next run reports them as interrupted.
                    work.clear();
                    self.interrupted().await;
                    break;
                }
            }
        }
        debug_assert!(self.scheduler.idle(), "the run ended with work dispatched");
    }
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
            self.staging
                .added
                .get(d - base)
                .cloned()
                .map(DeclRef::Added)
        }
    }

    /// Whether the deployment (as evaluated so far) declares `address`.
    fn declares(&self, address: &str) -> bool {
        self.deployment.resources.contains_key(address)
            || self.staging.added_index.contains_key(address)
    }

    /// Adds an operation's work (abortable for children, which their parent may take along).
    fn spawn(&mut self, work: &mut Work, i: NodeId, future: impl Future<Output = Done> + 'static) {
        if self.kin.kids.contains_key(&i) {
            let (handle, registration) = futures::future::AbortHandle::new_pair();
            self.kin.aborts.insert(i, handle);
            work.push(
                futures::future::Abortable::new(future, registration)
                    .map(Result::ok)
                    .boxed_local(),
            );
        } else {
            work.push(future.map(Some).boxed_local());
        }
    }

    fn push_node(&mut self, change: PlannedChange) {
        self.changes.push(change);
        self.nodes.push(Node {
            decl: NO_DECL,
            capability_source: false,
        });
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
