//! Running a plan: every operation as soon as what it depends on exists, under a global job
//! limit and per-provider limits, journaling an intent before each mutating call and its result
//! after. A failure skips what depends on it; everything independent goes on.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use capstan_host::Json;
use capstan_host::{
    CallError, HostOptions, LaunchError, OperationCall, OperationSuccess, ProviderCommand,
    ProviderConnection, ProviderLog, ProviderSource,
};
use capstan_schema::provider_capnp::resource_handle;
use capstan_schema::{OperationKind, ProgressEvent, ProviderInfo};
use futures::future::LocalBoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::events::{Event, EventSink, FailureKind, Summary};
use crate::maps::FastMap;
use crate::model::{Deployment, ProviderDecl, ProviderSourceDecl};
use crate::plan::{Action, PlannedChange};
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
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            jobs: 16,
            fail_fast: false,
            timeout: None,
        }
    }
}

/// The providers of one run: one connection each, started once.
pub struct Providers {
    connections: BTreeMap<String, Rc<ProviderConnection>>,
    limits: BTreeMap<String, Arc<Semaphore>>,
    timeouts: BTreeMap<String, Duration>,
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
            .is_some_and(|p| p.protocol.is_some())
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
            .is_some_and(|p| p.protocol.is_some())
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

fn source_for(
    decl: &ProviderDecl,
    dir: &Path,
    builtin: &BuiltinLauncher,
    v0_types: Option<&BTreeMap<String, BTreeSet<String>>>,
) -> ProviderSource {
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
        let launches = names.iter().map(|name| {
            let decl = &deployment.providers[name];
            let source = source_for(decl, &dir, builtin, v0.get(name));
            let logs = logs.clone();
            let mut options = HostOptions::default();
            if let Some(mib) = decl.max_message_mib.or(max_message_mib) {
                options.max_message_words = mib as usize * (1024 * 1024 / 8);
            }
            async move {
                ProviderConnection::launch(name, &source, options, Some(logs))
                    .await
                    .map(|c| (name.clone(), c))
            }
        });
        let mut connections = BTreeMap::new();
        let mut limits = BTreeMap::new();
        let mut timeouts = BTreeMap::new();
        for launched in futures::future::join_all(launches).await {
            let (name, connection) = launched?;
            let decl = &deployment.providers[&name];
            // The provider's own limit (from its handshake), lowered by `maxConcurrency`:
            // enforced here, before an operation journals its intent or takes a job, so a
            // queue at a busy provider never holds `--jobs` slots. (The host enforces the
            // declared limit too, as a last line.)
            let declared = Some(connection.info().max_concurrency).filter(|&n| n > 0);
            let limit = match (decl.max_concurrency, declared) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if let Some(limit) = limit {
                limits.insert(name.clone(), Arc::new(Semaphore::new(limit as usize)));
            }
            if let Some(timeout) = decl.timeout {
                timeouts.insert(name.clone(), timeout);
            }
            connections.insert(name, Rc::new(connection));
        }
        Ok(Providers {
            connections,
            limits,
            timeouts,
        })
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

/// What the run keeps per change (indexed like the changes), beside the change itself.
struct Node {
    /// Its index in `deployment.resources` (creates, updates, no-ops).
    decl: Option<usize>,
    remaining: usize,
    dependents: Vec<usize>,
    /// For deletes, the dependencies recorded with the resource (the others' come from their
    /// declaration: see `dependency_addresses`).
    dependencies: Vec<String>,
    /// Needed as a capability source by some resource in this run.
    capability_source: bool,
}

enum Outcome {
    /// Created, updated or read: the resource as it is now (as journaled, unless a read).
    Done {
        state: ResourceState,
        handles: Vec<(String, resource_handle::Client)>,
        counted: Action,
    },
    Deleted,
    Failed {
        error: String,
        kind: FailureKind,
        details: String,
        /// The provider reported the failure (journaled as such); otherwise the intent stays
        /// pending.
        settled: bool,
        /// The resource as journaled, when the provider did act but its result is unusable
        /// (a declared output missing): it exists, so the state keeps it.
        recorded: Option<Box<ResourceState>>,
    },
    State(StateError),
    /// Dispatched, but the run stopped (`--fail-fast`, a state error) before it was sent.
    NotSent,
    /// A replace deleted the recorded resource (durably); then its create ended so.
    Replaced(Box<Outcome>),
}

/// What the loop needs from a run, shared with each operation's future.
struct Shared {
    backend: Rc<dyn StateBackend>,
    events: Rc<dyn EventSink>,
    jobs: Arc<Semaphore>,
    /// Operations dispatched and not yet returned from the provider: those in a provider
    /// (at most `jobs`) and those journaling their intent or waiting for a job.
    active: std::cell::Cell<usize>,
    /// How far each operation got (indexed like the nodes).
    phases: RefCell<Vec<Phase>>,
    /// The run stops: nothing more is sent to providers.
    stopping: std::cell::Cell<bool>,
    /// Signalled when an operation gives its slot back (before its result is journaled, so
    /// the next operation's call overlaps that fsync).
    slot_freed: tokio::sync::Notify,
}

/// How far an operation got, for what an interrupt reports.
#[derive(Clone, Copy, PartialEq)]
enum Phase {
    NotStarted,
    /// Its intent is on its way to the journal.
    Recording,
    /// Its intent is durable; it waits for a job.
    Recorded,
    /// It is in its provider (`resource_start` was emitted).
    Called,
}

/// How many operations may be dispatched per job: while `jobs` operations are in providers,
/// up to seven times as many more journal their intents and wait, so intents are durable by
/// the time a slot frees up and many share one fsync. At `--jobs 64` and 100k no-ops: 2 → 4
/// gave ~15 % more throughput, 4 → 8 another ~9-20 % (16: ~4 % more again). The cost: after a
/// crash, up to that many intents of operations that were never sent are reported as
/// interrupted, for a person to check (Ctrl-C settles them).
const DISPATCH_PER_JOB: usize = 8;

/// One dispatch slot, given back on drop (also when an interrupt drops the operation).
struct Slot(Rc<Shared>);

impl Slot {
    fn take(shared: &Rc<Shared>) -> Self {
        shared.active.set(shared.active.get() + 1);
        Slot(shared.clone())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.active.set(self.0.active.get() - 1);
        self.0.slot_freed.notify_one();
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
    let run_started = Instant::now();
    // Room for every resource this run may create, so recording them never regrows the map.
    state.resources.reserve(
        changes
            .iter()
            .filter(|c| c.action == Action::Create)
            .count(),
    );
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
    let mut nodes: Vec<Node> = changes
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
            let dependencies = match decl {
                None => state
                    .resources
                    .get(&change.address)
                    .map(|r| r.dependencies.clone())
                    .unwrap_or_default(),
                Some(_) => Vec::new(),
            };
            Node {
                decl,
                remaining: 0,
                dependents: Vec::new(),
                dependencies,
                capability_source: capability_sources.contains(change.address.as_str()),
            }
        })
        .collect();
    drop(capability_sources);
    // Edges as (waits, first): `waits` starts only after `first` is done.
    let mut edges: Vec<(usize, usize)> = Vec::with_capacity(nodes.len() * 2);
    {
        // Declared dependencies are indices into the deployment; only deletes (and recorded
        // wiring) need addresses looked up, and only deletes can be found that way.
        let mut node_of_decl = vec![usize::MAX; deployment.resources.len()];
        for (n, node) in nodes.iter().enumerate() {
            if let Some(d) = node.decl {
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
            match node.decl {
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
                    for dep in &node.dependencies {
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
    }
    for (waits, first) in edges {
        nodes[waits].remaining += 1;
        nodes[first].dependents.push(waits);
    }

    let shared = Rc::new(Shared {
        backend,
        events: events.clone(),
        jobs: Arc::new(Semaphore::new(options.jobs.max(1))),
        active: std::cell::Cell::new(0),
        phases: RefCell::new(vec![Phase::NotStarted; nodes.len()]),
        stopping: std::cell::Cell::new(false),
        slot_freed: tokio::sync::Notify::new(),
    });
    let mut summary = Summary::default();
    let mut handles: HashMap<String, Vec<(String, resource_handle::Client)>> = HashMap::new();
    let mut finished = vec![false; nodes.len()];
    let mut started = vec![false; nodes.len()];
    let mut ready: VecDeque<usize> = (0..nodes.len())
        .filter(|&i| nodes[i].remaining == 0)
        .collect();
    let mut running: FuturesUnordered<LocalBoxFuture<'_, (usize, Outcome)>> =
        FuturesUnordered::new();
    let mut stopping = false;
    let mut state_error = None;

    let window = options.jobs.max(1) * DISPATCH_PER_JOB;
    loop {
        // Only as many operations exist as may soon run: a future per ready resource would
        // hold thousands of requests in memory on a wide graph.
        while shared.active.get() < window {
            let Some(i) = ready.pop_front() else { break };
            // `shared.stopping` is set as soon as a call fails under --fail-fast, before its
            // outcome (and `stopping`) reaches this loop.
            if stopping || shared.stopping.get() {
                ready.push_front(i);
                break;
            }
            let node = &nodes[i];
            let change = &changes[i];
            let address = change.address.clone();
            // Left pending by an earlier run: its intent must not be settled as "never sent".
            let was_pending = change.interrupted.is_some();
            started[i] = true;
            match change.action {
                Action::Delete => {
                    let recorded = state.resources[&address].clone();
                    let slot = Slot::take(&shared);
                    running.push(
                        delete(i, address, recorded, was_pending, slot, providers, options)
                            .boxed_local(),
                    );
                }
                action => {
                    let decl = &deployment.resources[node.decl.expect("declared")];
                    let lookup = |target: &str, output: &str| {
                        // Every finished resource's outputs are in the state by now.
                        state
                            .resources
                            .get(target)
                            .and_then(|r| r.outputs.get_raw(output))
                    };
                    let Some(inputs) = decl.resolve(&lookup) else {
                        // A dependency finished without the output: the provider broke its
                        // handshake's promise.
                        let missing: Vec<String> = decl
                            .refs
                            .iter()
                            .filter(|r| lookup(&r.address, &r.output).is_none())
                            .map(|r| format!("{}#{}", r.address, r.output))
                            .collect();
                        events.emit(Event::ResourceFailed {
                            address: address.clone(),
                            operation: action.as_str(),
                            error: format!(
                                "{address}: the outputs it refers to were not produced: {}",
                                missing.join(", ")
                            ),
                            kind: FailureKind::InvalidInput,
                            details: String::new(),
                            elapsed_seconds: 0.0,
                        });
                        summary.failed += 1;
                        finished[i] = true;
                        skip_dependents(i, &changes, &nodes, &mut finished, &mut summary, &*events);
                        continue;
                    };
                    // The plan creates only what the state does not hold.
                    debug_assert!(
                        action != Action::Create || !state.resources.contains_key(&address),
                        "{address}: planned as a create but recorded in the state"
                    );
                    let recorded = match action {
                        Action::Create => None,
                        _ => state.resources.get(&address),
                    };
                    let unchanged = action != Action::Replace
                        && !changes[i].read_changed
                        && recorded.is_some_and(|r| r.inputs == inputs);
                    if unchanged && !node.capability_source {
                        let recorded = recorded.expect("unchanged means recorded");
                        let mut old = recorded.dependencies.clone();
                        let mut new = dependency_addresses(node, deployment);
                        old.sort();
                        new.sort();
                        if old != new {
                            // Same inputs, new wiring (a `$ref` became an equal literal, or a
                            // `$cap` went): record the dependencies, so deletes stay ordered.
                            let mut updated = recorded.clone();
                            updated.dependencies = dependency_addresses(node, deployment);
                            let backend = shared.backend.clone();
                            running.push(
                                async move {
                                    let done = Record::Done {
                                        address,
                                        state: updated.clone(),
                                    };
                                    match append_durably(&*backend, vec![done]).await {
                                        Ok(()) => (
                                            i,
                                            Outcome::Done {
                                                state: updated,
                                                handles: Vec::new(),
                                                counted: Action::Noop,
                                            },
                                        ),
                                        Err(e) => (i, Outcome::State(e)),
                                    }
                                }
                                .boxed_local(),
                            );
                            continue;
                        }
                        summary.unchanged += 1;
                        finished[i] = true;
                        release(i, &mut nodes, &mut ready);
                        continue;
                    }
                    let mut capabilities = Vec::new();
                    for cap in &decl.capabilities {
                        let found = handles
                            .get(&cap.address)
                            .and_then(|hs| hs.iter().find(|(n, _)| n == &cap.name))
                            .map(|(_, c)| c.clone());
                        match found {
                            Some(client) => capabilities.push((cap.input.clone(), client)),
                            None => {
                                events.emit(Event::ResourceFailed {
                                    address: address.clone(),
                                    operation: action.as_str(),
                                    error: format!(
                                        "{address}: `{}` returned no capability named `{}`",
                                        cap.address, cap.name
                                    ),
                                    kind: FailureKind::InvalidInput,
                                    details: String::new(),
                                    elapsed_seconds: 0.0,
                                });
                            }
                        }
                    }
                    if capabilities.len() != decl.capabilities.len() {
                        summary.failed += 1;
                        finished[i] = true;
                        skip_dependents(i, &changes, &nodes, &mut finished, &mut summary, &*events);
                        continue;
                    }
                    let recorded = recorded.cloned();
                    let dependencies = dependency_addresses(node, deployment);
                    if action == Action::Replace {
                        // Delete what the old provider or type made, then create anew.
                        let old = recorded.expect("a replace has a recorded resource");
                        let delete_slot = Slot::take(&shared);
                        let create_slot = Slot::take(&shared);
                        let (provider, resource_type) =
                            (decl.provider.clone(), decl.resource_type.clone());
                        running.push(
                            async move {
                                let deleted = delete(
                                    i,
                                    address.clone(),
                                    old,
                                    was_pending,
                                    delete_slot,
                                    providers,
                                    options,
                                )
                                .await;
                                if !matches!(deleted.1, Outcome::Deleted) {
                                    return deleted;
                                }
                                let (i, created) = create_or_update(
                                    i,
                                    address,
                                    provider,
                                    resource_type,
                                    inputs,
                                    None,
                                    capabilities,
                                    dependencies,
                                    OperationKind::Create,
                                    false,
                                    create_slot,
                                    providers,
                                    options,
                                )
                                .await;
                                (i, Outcome::Replaced(Box::new(created)))
                            }
                            .boxed_local(),
                        );
                        continue;
                    }
                    let operation = match (unchanged, &recorded) {
                        (true, _) => OperationKind::Read,
                        (false, None) => OperationKind::Create,
                        (false, Some(_)) => OperationKind::Update,
                    };
                    let slot = Slot::take(&shared);
                    running.push(
                        create_or_update(
                            i,
                            address,
                            decl.provider.clone(),
                            decl.resource_type.clone(),
                            inputs,
                            recorded,
                            capabilities,
                            dependencies,
                            operation,
                            was_pending,
                            slot,
                            providers,
                            options,
                        )
                        .boxed_local(),
                    );
                }
            }
        }
        if running.is_empty() {
            break;
        }
        tokio::select! {
            () = shared.slot_freed.notified(), if shared.active.get() < window && !ready.is_empty() => {}
            Some((i, outcome)) = running.next() => {
                finished[i] = true;
                let address = changes[i].address.clone();
                let outcome = match outcome {
                    Outcome::Replaced(created) => {
                        // The old resource is gone whatever became of the new one.
                        summary.deleted += 1;
                        state.apply_owned(Record::Deleted { address: address.clone() });
                        *created
                    }
                    outcome => outcome,
                };
                match outcome {
                    Outcome::Done { state: now, handles: returned, counted } => {
                        match counted {
                            Action::Create => summary.created += 1,
                            Action::Update => summary.updated += 1,
                            _ => summary.unchanged += 1,
                        }
                        if counted != Action::Noop {
                            state.apply_owned(Record::Done { address: address.clone(), state: now });
                        } else if let Some(recorded) = state.resources.get_mut(&address) {
                            // A read (what the provider says now) or re-recorded wiring.
                            recorded.outputs = now.outputs;
                            recorded.dependencies = now.dependencies;
                        }
                        if !returned.is_empty() {
                            handles.insert(address, returned);
                        }
                        release(i, &mut nodes, &mut ready);
                    }
                    Outcome::Deleted => {
                        summary.deleted += 1;
                        state.apply_owned(Record::Deleted { address });
                        release(i, &mut nodes, &mut ready);
                    }
                    Outcome::Failed { recorded, .. } => {
                        summary.failed += 1;
                        state.pending.remove(&address);
                        if let Some(now) = recorded {
                            state.apply_owned(Record::Done { address: address.clone(), state: *now });
                        }
                        skip_dependents(i, &changes, &nodes, &mut finished, &mut summary, &*events);
                        if options.fail_fast {
                            stopping = true;
                            shared.stopping.set(true);
                        }
                    }
                    Outcome::State(e) => {
                        // Without durable records nothing else may run.
                        summary.failed += 1;
                        state_error = Some(e);
                        stopping = true;
                        shared.stopping.set(true);
                    }
                    Outcome::Replaced(_) => unreachable!("unwrapped above"),
                    Outcome::NotSent => {
                        summary.skipped += 1;
                        state.pending.remove(&address);
                        events.emit(Event::ResourceSkipped {
                            address: address.clone(),
                            operation: changes[i].action.as_str(),
                            reason: stop_reason(&state_error),
                            dependency: String::new(),
                        });
                    }
                }
            }
            // Also while stopping for --fail-fast: an interrupt must not wait on hung calls.
            () = interrupt.cancelled() => {
                stopping = true;
                events.emit(Event::Interrupted { message: "interrupted: cancelling operations in flight; state is saved (press Ctrl-C again to stop at once)".into() });
                // Dropping the calls cancels them in the providers; their intents stay in the
                // journal, so the next run reports them as interrupted.
                running.clear();
                let phases = shared.phases.borrow().clone();
                let mut never_sent = Vec::new();
                for (i, change) in changes.iter().enumerate() {
                    if started[i] && !finished[i] {
                        finished[i] = true;
                        if phases[i] == Phase::Called {
                            summary.interrupted += 1;
                            events.emit(Event::ResourceFailed {
                                address: change.address.clone(),
                                operation: change.action.as_str(),
                                error: format!("{}: interrupted", change.address),
                                kind: FailureKind::Cancelled,
                                details: String::new(),
                                elapsed_seconds: 0.0,
                            });
                        } else {
                            let recorded = matches!(phases[i], Phase::Recording | Phase::Recorded);
                            if recorded && change.interrupted.is_none() {
                                // Its intent is (or is about to be) in the journal, but it never
                                // reached its provider: settle it, so the next run does not ask
                                // anyone to check. (Not if an earlier run left it pending: that
                                // one still needs a check.)
                                never_sent.push(Record::Failed {
                                    address: change.address.clone(),
                                    operation: change.action.first_operation(),
                                    error: "interrupted before it was sent to its provider".into(),
                                });
                            }
                            summary.skipped += 1;
                            events.emit(Event::ResourceSkipped {
                                address: change.address.clone(),
                                operation: change.action.as_str(),
                                reason: "the run was interrupted before it was sent to its provider".into(),
                                dependency: String::new(),
                            });
                        }
                    }
                }
                // The state takes the records as the journal does (if that fails the intents stay
                // pending, which only asks for a check).
                if !never_sent.is_empty()
                    && append_durably(&*shared.backend, never_sent.clone()).await.is_ok()
                {
                    for record in never_sent {
                        state.apply_owned(record);
                    }
                }
                break;
            }
        }
        if stopping && running.is_empty() {
            break;
        }
    }
    // Nodes that never became ready although nothing stopped the run: the recorded
    // dependencies of deletes form a cycle. Say so rather than finish silently.
    if !stopping {
        for (i, change) in changes.iter().enumerate() {
            if !finished[i] && !started[i] {
                summary.skipped += 1;
                events.emit(Event::ResourceSkipped {
                    address: change.address.clone(),
                    operation: change.action.as_str(),
                    reason: "its recorded dependencies form a cycle; delete it with `capstan state forget` after removing it by hand".into(),
                    dependency: String::new(),
                });
            }
        }
    }
    // Whatever never started because of fail-fast or an interrupt.
    if stopping {
        for (i, change) in changes.iter().enumerate() {
            if !finished[i] && !started[i] {
                summary.skipped += 1;
                events.emit(Event::ResourceSkipped {
                    address: change.address.clone(),
                    operation: change.action.as_str(),
                    reason: if interrupt.is_cancelled() {
                        "the run was interrupted".into()
                    } else {
                        stop_reason(&state_error)
                    },
                    dependency: String::new(),
                });
            }
        }
    }
    if let Some(e) = state_error {
        return Err(e);
    }
    events.emit(Event::Summary {
        counts: summary.clone(),
        elapsed_seconds: run_started.elapsed().as_secs_f64(),
    });
    Ok(summary)
}

/// What a node's resource depends on, by address, in address order: from its declaration, or
/// for a delete as recorded.
fn dependency_addresses(node: &Node, deployment: &Deployment) -> Vec<String> {
    match node.decl {
        Some(d) => deployment.resources[d].dependencies(),
        None => node.dependencies.clone(),
    }
}

fn release(i: usize, nodes: &mut [Node], ready: &mut VecDeque<usize>) {
    let dependents = std::mem::take(&mut nodes[i].dependents);
    for &j in &dependents {
        nodes[j].remaining -= 1;
        if nodes[j].remaining == 0 {
            ready.push_back(j);
        }
    }
    nodes[i].dependents = dependents;
}

fn skip_dependents(
    i: usize,
    changes: &[PlannedChange],
    nodes: &[Node],
    finished: &mut [bool],
    summary: &mut Summary,
    events: &dyn EventSink,
) {
    let failed = changes[i].address.clone();
    let mut stack = nodes[i].dependents.clone();
    while let Some(j) = stack.pop() {
        if finished[j] {
            continue;
        }
        finished[j] = true;
        summary.skipped += 1;
        events.emit(Event::ResourceSkipped {
            address: changes[j].address.clone(),
            operation: changes[j].action.as_str(),
            // A delete waits for the deletes of what depends on it: the one that failed is
            // a dependent, not a dependency.
            reason: if changes[j].action == Action::Delete {
                format!("`{failed}`, which depends on it, was not deleted")
            } else {
                format!("dependency `{failed}` failed")
            },
            dependency: failed.clone(),
        });
        stack.extend(nodes[j].dependents.iter().copied());
    }
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

fn stop_reason(state_error: &Option<StateError>) -> String {
    match state_error {
        Some(_) => "the state could not be written, so the run stopped".into(),
        None => "--fail-fast stopped the run".into(),
    }
}

/// Settles an operation that was dispatched (its intent perhaps journaled) but never sent
/// because the run stopped.
async fn not_sent(
    i: usize,
    address: String,
    operation: OperationKind,
    recorded: bool,
    shared: &Shared,
) -> (usize, Outcome) {
    if recorded {
        let settled = Record::Failed {
            address,
            operation,
            error: "not sent to its provider: the run stopped".into(),
        };
        if let Err(e) = append_durably(&*shared.backend, vec![settled]).await {
            return (i, Outcome::State(e));
        }
    }
    (i, Outcome::NotSent)
}

/// The provider's own limit, taken before the intent is journaled: an intent is written only
/// for an operation its provider is ready to take.
async fn provider_permit(
    providers: &Providers,
    provider: &str,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    match providers.limits.get(provider) {
        Some(limit) => Some(limit.clone().acquire_owned().await.expect("never closed")),
        None => None,
    }
}

/// One of the `--jobs` slots, taken after the intent is durable, just before the call;
/// `None` if the run is stopping by then.
async fn job_permit(shared: &Shared, i: usize) -> Option<tokio::sync::OwnedSemaphorePermit> {
    let job = shared
        .jobs
        .clone()
        .acquire_owned()
        .await
        .expect("never closed");
    if shared.stopping.get() {
        return None;
    }
    shared.phases.borrow_mut()[i] = Phase::Called;
    Some(job)
}

/// For unchanged resources of types that ask for it (`readOnPlan`): asks each provider what
/// the resource is now (`read`, at most `jobs` at once) and plans an update where that differs
/// from what the state records. Returns a warning for each resource that could not be read
/// (it stays unchanged in the plan).
pub async fn read_on_plan(
    changes: &mut [PlannedChange],
    deployment: &Deployment,
    state: &State,
    providers: &Providers,
    jobs: usize,
    timeout: Option<Duration>,
) -> Vec<String> {
    let reads = changes.iter().enumerate().filter_map(|(i, change)| {
        if change.action != Action::Noop {
            return None;
        }
        let connection = providers.connections.get(&change.provider)?;
        connection
            .info()
            .resource_type(&change.resource_type)
            .filter(|t| t.read_on_plan)?;
        let recorded = state.resources.get(&change.address)?;
        let call = OperationCall {
            previous_inputs: Some(recorded.inputs.clone()),
            previous_outputs: Some(recorded.outputs.clone()),
            // As for any operation: the provider's timeout, else the run's.
            timeout: providers
                .timeouts
                .get(&change.provider)
                .copied()
                .or(timeout),
            ..OperationCall::new(
                OperationKind::Read,
                &change.resource_type,
                &change.address,
                recorded.inputs.clone(),
            )
        };
        let connection = connection.clone();
        Some(async move {
            let read = connection.call(call, capstan_host::ignore_progress()).await;
            (i, recorded, read)
        })
    });
    let mut found = futures::stream::iter(reads).buffer_unordered(jobs.max(1));
    let mut warnings = Vec::new();
    let mut updates = Vec::new();
    while let Some((i, recorded, read)) = found.next().await {
        match read {
            Ok(now) if now.outputs != recorded.outputs => updates.push((
                i,
                crate::plan::changed_keys(&recorded.outputs, &now.outputs),
            )),
            Ok(_) => {}
            Err(e) => warnings.push(format!(
                "could not read `{}` to see whether it changed ({e}); it is planned as unchanged",
                changes[i].address
            )),
        }
    }
    drop(found);
    if updates.is_empty() {
        return warnings;
    }
    let mut changing: std::collections::HashSet<String> = Default::default();
    for (i, keys) in updates {
        let change = &mut changes[i];
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
        if waits.is_empty() || change.read_changed {
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
    warnings
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

/// A failure the core found itself, settled (nothing unknown happened in a provider): none
/// was started, or what one returned cannot be used.
struct CoreFailure {
    error: String,
    kind: FailureKind,
    details: String,
    elapsed: f64,
    /// What the provider made, to keep in the state although the operation failed.
    recorded: Option<Box<ResourceState>>,
}

impl CoreFailure {
    fn new(error: String, kind: FailureKind) -> Self {
        CoreFailure {
            error,
            kind,
            details: String::new(),
            elapsed: 0.0,
            recorded: None,
        }
    }

    /// Tells the user, and makes it the operation's outcome.
    fn report(
        self,
        i: usize,
        address: String,
        operation: &'static str,
        shared: &Shared,
    ) -> (usize, Outcome) {
        shared.events.emit(Event::ResourceFailed {
            address,
            operation,
            error: self.error.clone(),
            kind: self.kind,
            details: self.details,
            elapsed_seconds: self.elapsed,
        });
        let outcome = Outcome::Failed {
            error: self.error,
            kind: self.kind,
            details: String::new(),
            settled: true,
            recorded: self.recorded,
        };
        (i, outcome)
    }
}

/// A failed call as an outcome. Only a failure the provider reported itself is settled (the
/// resource is as it was); after a timeout, a crash or a lost connection nobody knows what the
/// provider did, so the intent stays pending and the next run says so.
fn failure(address: &str, error: CallError, was_pending: bool) -> Outcome {
    // Reported by the provider, or refused before it was sent: nothing unknown happened in
    // this run. (A refused request leaves an earlier run's interruption as it was.)
    let settled = match error {
        CallError::Failed { .. } => true,
        CallError::RequestTooLarge { .. } => !was_pending,
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
    Outcome::Failed {
        error: message,
        kind,
        details,
        settled,
        recorded: None,
    }
}

/// One call's way to its provider and back, the same for every operation: the provider's
/// permit; the intent made durable (when `journaled`); a job; `resource_start`; the call, with
/// the provider's timeout. When the provider answers, the job, the permit and the dispatch
/// slot are given back, and the caller journals the result. `Err` when the run stopped before
/// the call was sent (its intent then settled, unless an earlier run left it pending).
#[allow(clippy::too_many_arguments)]
async fn send(
    i: usize,
    connection: &ProviderConnection,
    provider: &str,
    operation: OperationKind,
    journaled: bool,
    was_pending: bool,
    mut call: OperationCall,
    slot: Slot,
    providers: &Providers,
    options: &RunOptions,
) -> Result<(Result<OperationSuccess, CallError>, f64), (usize, Outcome)> {
    let shared = slot.0.clone();
    call.timeout = providers
        .timeouts
        .get(provider)
        .copied()
        .or(options.timeout);
    let own = provider_permit(providers, provider).await;
    if shared.stopping.get() {
        return Err((i, Outcome::NotSent));
    }
    if journaled {
        shared.phases.borrow_mut()[i] = Phase::Recording;
        let intent = Record::Intent {
            address: call.address.clone(),
            operation,
            provider: provider.to_string(),
            resource_type: call.resource_type.clone(),
            inputs: call.inputs.clone(),
            time: now_unix(),
        };
        if let Err(e) = append_durably(&*shared.backend, vec![intent]).await {
            return Err((i, Outcome::State(e)));
        }
        shared.phases.borrow_mut()[i] = Phase::Recorded;
    }
    let Some(job) = job_permit(&shared, i).await else {
        let settle = journaled && !was_pending;
        return Err(not_sent(i, call.address, operation, settle, &shared).await);
    };
    let started = Instant::now();
    // Started means recorded: the intent is durable before anyone is told.
    shared.events.emit(Event::ResourceStart {
        address: call.address.clone(),
        operation: operation.as_str(),
        provider: provider.to_string(),
        resource_type: call.resource_type.clone(),
    });
    let observer = progress_observer(
        shared.events.clone(),
        call.address.clone(),
        operation.as_str(),
    );
    let result = connection.call(call, observer).await;
    let elapsed = started.elapsed().as_secs_f64();
    if result.is_err() && options.fail_fast {
        // Before the job is given back: nothing waiting for it may be sent now.
        shared.stopping.set(true);
    }
    // The provider is done: give its job and permit back, and let the next operation be
    // dispatched, while this result is journaled. (`resource_complete` still waits for it.)
    drop(job);
    drop(own);
    drop(slot);
    Ok((result, elapsed))
}

#[allow(clippy::too_many_arguments)]
async fn create_or_update(
    i: usize,
    address: String,
    provider: String,
    resource_type: String,
    inputs: Json,
    recorded: Option<ResourceState>,
    capabilities: Vec<(String, resource_handle::Client)>,
    dependencies: Vec<String>,
    operation: OperationKind,
    was_pending: bool,
    slot: Slot,
    providers: &Providers,
    options: &RunOptions,
) -> (usize, Outcome) {
    let shared = slot.0.clone();
    let kind = operation;
    let verb = operation.as_str();
    let counted = match operation {
        OperationKind::Create => Action::Create,
        OperationKind::Update => Action::Update,
        _ => Action::Noop,
    };
    let Some(connection) = providers.connections.get(&provider).cloned() else {
        // A caller that started fewer providers than the run needs (e.g. only those of the
        // changes, when an unchanged resource must be read for its capabilities).
        let error = format!(
            "{address}: provider `{provider}` was not started for this run, so `{address}` cannot be {}",
            if verb == "read" { "read for its capabilities" } else { "changed" }
        );
        let failure = CoreFailure::new(error, FailureKind::Provider);
        return failure.report(i, address, verb, &shared);
    };
    let call = OperationCall {
        previous_inputs: recorded.as_ref().map(|r| r.inputs.clone()),
        previous_outputs: recorded.as_ref().map(|r| r.outputs.clone()),
        capabilities,
        ..OperationCall::new(kind, &resource_type, &address, inputs.clone())
    };
    // Reads change nothing: no intent.
    let journaled = operation != OperationKind::Read;
    let (result, elapsed) = match send(
        i,
        &connection,
        &provider,
        operation,
        journaled,
        was_pending,
        call,
        slot,
        providers,
        options,
    )
    .await
    {
        Ok(answered) => answered,
        Err(never_sent) => return never_sent,
    };
    match result {
        Ok(success) => {
            let now = ResourceState {
                provider,
                resource_type,
                inputs,
                outputs: success.outputs,
                dependencies,
            };
            if operation != OperationKind::Read {
                let done = Record::Done {
                    address: address.clone(),
                    state: now.clone(),
                };
                if let Err(e) = append_durably(&*shared.backend, vec![done]).await {
                    return (i, Outcome::State(e));
                }
            }
            if let Some(missing) = missing_outputs(&connection, &now) {
                // The provider acted (the resource is recorded), but what depends on these
                // outputs cannot run: say so now, not when a dependent fails to resolve.
                let error = format!(
                    "{address}: provider `{}` returned no {missing}, which `{}` declares; the resource is recorded as it was returned, and what depends on it is skipped",
                    now.provider, now.resource_type
                );
                let failure = CoreFailure {
                    // Names only: values may be secrets, or megabytes.
                    details: format!("outputs returned: {}", now.outputs.keys().join(", ")),
                    elapsed,
                    recorded: (operation != OperationKind::Read).then(|| Box::new(now)),
                    ..CoreFailure::new(error, FailureKind::Provider)
                };
                return failure.report(i, address, verb, &shared);
            }
            shared.events.emit(Event::ResourceComplete {
                address,
                operation: verb,
                elapsed_seconds: elapsed,
                outputs: now.outputs.clone(),
            });
            (
                i,
                Outcome::Done {
                    state: now,
                    handles: success.capabilities,
                    counted,
                },
            )
        }
        Err(error) => {
            fail(
                i,
                address,
                operation,
                error,
                journaled,
                was_pending,
                &shared,
                elapsed,
            )
            .await
        }
    }
}

async fn delete(
    i: usize,
    address: String,
    recorded: ResourceState,
    was_pending: bool,
    slot: Slot,
    providers: &Providers,
    options: &RunOptions,
) -> (usize, Outcome) {
    let shared = slot.0.clone();
    let Some(connection) = providers.connections.get(&recorded.provider).cloned() else {
        let error = format!(
            "{address}: its provider `{}` is not declared in the deployment any more; declare it again until its resources are deleted",
            recorded.provider
        );
        let failure = CoreFailure::new(error, FailureKind::InvalidInput);
        return failure.report(i, address, "delete", &shared);
    };
    let call = OperationCall {
        previous_inputs: Some(recorded.inputs.clone()),
        previous_outputs: Some(recorded.outputs.clone()),
        ..OperationCall::new(
            OperationKind::Delete,
            &recorded.resource_type,
            &address,
            recorded.inputs.clone(),
        )
    };
    let (result, elapsed) = match send(
        i,
        &connection,
        &recorded.provider,
        OperationKind::Delete,
        true,
        was_pending,
        call,
        slot,
        providers,
        options,
    )
    .await
    {
        Ok(answered) => answered,
        Err(never_sent) => return never_sent,
    };
    match result {
        Ok(_) => {
            if let Err(e) = append_durably(
                &*shared.backend,
                vec![Record::Deleted {
                    address: address.clone(),
                }],
            )
            .await
            {
                return (i, Outcome::State(e));
            }
            shared.events.emit(Event::ResourceComplete {
                address,
                operation: "delete",
                elapsed_seconds: elapsed,
                outputs: Json::null(),
            });
            (i, Outcome::Deleted)
        }
        Err(error) => {
            fail(
                i,
                address,
                OperationKind::Delete,
                error,
                true,
                was_pending,
                &shared,
                elapsed,
            )
            .await
        }
    }
}

/// Reports a failed call: journals it when it is settled (and `journal` is set: reads change
/// nothing), and emits the event.
#[allow(clippy::too_many_arguments)]
async fn fail(
    i: usize,
    address: String,
    operation: OperationKind,
    error: CallError,
    journal: bool,
    was_pending: bool,
    shared: &Shared,
    elapsed: f64,
) -> (usize, Outcome) {
    let outcome = failure(&address, error, was_pending);
    if let Outcome::Failed {
        error,
        kind,
        details,
        settled,
        ..
    } = &outcome
    {
        if journal && *settled {
            let failed = Record::Failed {
                address: address.clone(),
                operation,
                error: error.clone(),
            };
            if let Err(e) = append_durably(&*shared.backend, vec![failed]).await {
                return (i, Outcome::State(e));
            }
        }
        shared.events.emit(Event::ResourceFailed {
            address,
            operation: operation.as_str(),
            error: error.clone(),
            kind: *kind,
            details: details.clone(),
            elapsed_seconds: elapsed,
        });
    }
    (i, outcome)
}

/// Keeps `RefCell` out of the public API while letting tests collect events.
pub struct CollectEvents(pub RefCell<Vec<Event>>);

impl EventSink for CollectEvents {
    fn emit(&self, event: Event) {
        self.0.borrow_mut().push(event);
    }
}
