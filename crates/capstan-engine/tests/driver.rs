//! The run's driver (`capstan_engine::run`) against providers in this process, over in-memory
//! pipes: no processes, a real journal. What the scheduler decides must reach the journal
//! and the events: timeouts leave intents pending, fail-fast and interrupts settle intents
//! that were never sent, limits hold in the provider itself.

use std::cell::Cell;
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

use capstan_engine::events::CollectEvents;
use capstan_engine::events::{Event, FailureKind, Summary};
use capstan_engine::model::Deployment;
use capstan_engine::plan;
use capstan_engine::run::{self, Providers, RunOptions};
use capstan_engine::state::{DirectoryBackend, State, StateBackend};
use capstan_host::{HostOptions, ProviderConnection};
use capstan_provider::{Operation, OperationError, Provider, Resource, ResourceType};
use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};
use tokio_util::sync::CancellationToken;

fn run_local<F: std::future::Future>(f: F) -> F::Output {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    tokio::task::LocalSet::new().block_on(&runtime, f)
}

#[derive(Default)]
struct Probe {
    /// `hang` operations that started.
    hanging: Cell<u32>,
    started: Notify,
    running: Cell<u32>,
    max_running: Cell<u32>,
    calls: Cell<u32>,
    /// How many `echo` calls had been made when `fail` failed.
    failed_after: Cell<Option<u32>>,
}

struct Echo(Rc<Probe>);
impl Resource for Echo {
    type Inputs = Value;
    type Outputs = Value;
    fn resource_type() -> ResourceType {
        ResourceType::new("echo").optional("value", "")
    }
    async fn create(&self, _op: &Operation, inputs: Value) -> Result<Value, OperationError> {
        let p = &self.0;
        p.calls.set(p.calls.get() + 1);
        p.running.set(p.running.get() + 1);
        p.max_running.set(p.max_running.get().max(p.running.get()));
        tokio::time::sleep(Duration::from_millis(5)).await;
        p.running.set(p.running.get() - 1);
        Ok(inputs)
    }
}

struct Hang(Rc<Probe>);
impl Resource for Hang {
    type Inputs = Value;
    type Outputs = Value;
    fn resource_type() -> ResourceType {
        ResourceType::new("hang").optional("value", "")
    }
    async fn create(&self, _op: &Operation, _inputs: Value) -> Result<Value, OperationError> {
        hang_forever(&self.0).await
    }
}

/// Counts the operation as hanging, says so, and never answers.
async fn hang_forever(probe: &Probe) -> Result<Value, OperationError> {
    probe.hanging.set(probe.hanging.get() + 1);
    probe.started.notify_waiters();
    std::future::pending().await
}

/// A lookup that never answers: a type that changes nothing outside the state (as a
/// Terraform data source), so it journals no intent.
struct Lookup(Rc<Probe>);
impl Resource for Lookup {
    type Inputs = Value;
    type Outputs = Value;
    fn resource_type() -> ResourceType {
        ResourceType::new("lookup")
            .optional("value", "")
            .read_only(true)
    }
    async fn create(&self, _op: &Operation, _inputs: Value) -> Result<Value, OperationError> {
        hang_forever(&self.0).await
    }
}

struct Fail(Rc<Probe>);
impl Resource for Fail {
    type Inputs = Value;
    type Outputs = Value;
    fn resource_type() -> ResourceType {
        ResourceType::new("fail").optional("value", "")
    }
    async fn create(&self, _op: &Operation, _inputs: Value) -> Result<Value, OperationError> {
        self.0.failed_after.set(Some(self.0.calls.get()));
        Err(OperationError::permanent("this one never works"))
    }
}

/// Makes a child `c` (an `echo` of its own `value`) through the run's scheduler, then a
/// permit it gives back; answers with the child's outputs.
struct Parent(Rc<Probe>);
impl Resource for Parent {
    type Inputs = Value;
    type Outputs = Value;
    fn resource_type() -> ResourceType {
        ResourceType::new("parent")
            .optional("value", "")
            .uses_scheduler(true)
    }
    async fn create(&self, op: &Operation, inputs: Value) -> Result<Value, OperationError> {
        let child = op.child("c", None, "echo", &inputs).await?;
        let permit = op.permit().await?;
        self.0.calls.set(self.0.calls.get() + 1);
        permit.release().await?;
        Ok(json!({"value": inputs["value"], "child": child}))
    }
}

/// A provider in this process, connected over an in-memory pipe.
async fn connect(probe: &Rc<Probe>, max_concurrency: u32) -> ProviderConnection {
    let provider = Provider::new("mem", "0.0.1")
        .resource(Echo(probe.clone()))
        .resource(Hang(probe.clone()))
        .resource(Lookup(probe.clone()))
        .resource(Fail(probe.clone()))
        .resource(Parent(probe.clone()))
        .max_concurrency(max_concurrency);
    let (host_end, provider_end) = tokio::io::duplex(64 * 1024);
    let (pr, pw) = tokio::io::split(provider_end);
    tokio::task::spawn_local(provider.serve_stream(pr.compat(), pw.compat_write()));
    let (hr, hw) = tokio::io::split(host_end);
    ProviderConnection::from_stream(
        "mem",
        hr.compat(),
        hw.compat_write(),
        HostOptions::default(),
    )
    .await
    .expect("handshake")
}

struct Fixture {
    dir: tempfile::TempDir,
    backend: Rc<DirectoryBackend>,
    state: State,
    deployment: Deployment,
}

/// `resources`: name → (type, dependencies).
fn fixture(provider: Value, resources: &[(&str, &str, &[&str])]) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut decls = serde_json::Map::new();
    for (name, resource_type, deps) in resources {
        let mut inputs = serde_json::Map::new();
        for dep in *deps {
            inputs.insert(
                format!("from_{dep}"),
                json!({"$ref": format!("{dep}#value")}),
            );
        }
        inputs.insert("value".into(), json!(name));
        decls.insert(
            name.to_string(),
            json!({"provider": "mem", "type": resource_type, "inputs": inputs}),
        );
    }
    let text = json!({"providers": {"mem": provider}, "resources": decls}).to_string();
    let deployment =
        Deployment::parse(&dir.path().join("capstan.json"), &text, &Default::default()).unwrap();
    let mut backend = DirectoryBackend::open(&dir.path().join("state"), Duration::ZERO).unwrap();
    let (state, _) = backend.load().unwrap();
    Fixture {
        dir,
        backend: Rc::new(backend),
        state,
        deployment,
    }
}

async fn apply(
    f: &mut Fixture,
    probe: &Rc<Probe>,
    max_concurrency: u32,
    options: RunOptions,
    interrupt: CancellationToken,
) -> (Summary, Vec<Event>) {
    let changes = plan::plan(&f.deployment, &f.state).unwrap();
    let connection = connect(probe, max_concurrency).await;
    let providers = Providers::from_connections(&f.deployment, [("mem".to_string(), connection)]);
    let events = Rc::new(CollectEvents(Default::default()));
    let summary = run::Run {
        deployment: &f.deployment,
        state: &mut f.state,
        backend: f.backend.clone() as Rc<dyn StateBackend>,
        providers: &providers,
        options: &options,
        events: events.clone(),
        interrupt,
        stages: None,
    }
    .execute(changes)
    .await
    .unwrap();
    let events = events.0.borrow().clone();
    (summary, events)
}

/// The state as the next run would find it on disk.
fn reloaded(dir: &Path) -> State {
    capstan_engine::state::read_only(&dir.join("state"))
        .unwrap()
        .0
}

fn skipped_reason<'a>(events: &'a [Event], address: &str) -> Option<&'a str> {
    events.iter().find_map(|e| match e {
        Event::ResourceSkipped {
            address: a, reason, ..
        } if a == address => Some(reason.as_str()),
        _ => None,
    })
}

#[test]
fn a_timeout_leaves_the_intent_pending_and_skips_only_dependents() {
    run_local(async {
        let probe = Rc::new(Probe::default());
        let mut f = fixture(
            json!({"executable": "unused", "timeout": 0.2}),
            &[
                ("slow", "hang", &[]),
                ("after", "echo", &["slow"]),
                ("other", "echo", &[]),
            ],
        );
        let (summary, events) = apply(
            &mut f,
            &probe,
            0,
            RunOptions::default(),
            CancellationToken::new(),
        )
        .await;
        assert_eq!(
            (summary.created, summary.failed, summary.skipped),
            (1, 1, 1)
        );
        let timed_out = events.iter().find_map(|e| match e {
            Event::ResourceFailed {
                address,
                kind,
                error,
                ..
            } if address == "slow" => Some((*kind, error.clone())),
            _ => None,
        });
        let (kind, error) = timed_out.expect("slow failed");
        assert_eq!(kind, FailureKind::Timeout);
        assert!(error.contains("stays pending"), "{error}");
        assert_eq!(
            skipped_reason(&events, "after"),
            Some("dependency `slow` failed")
        );
        // Nobody knows what the provider did: the next run must ask.
        let state = reloaded(f.dir.path());
        assert!(state.pending.contains_key("slow"), "{:?}", state.pending);
        assert!(state.resources.contains_key("other"));
    });
}

#[test]
fn fail_fast_settles_intents_never_sent_and_skips_what_never_started() {
    run_local(async {
        let probe = Rc::new(Probe::default());
        // One job: `bad` is called first; the others journal their intents and wait.
        let mut f = fixture(
            json!({"executable": "unused"}),
            &[
                ("bad", "fail", &[]),
                ("a", "echo", &[]),
                ("b", "echo", &[]),
                ("c", "echo", &["a"]),
            ],
        );
        let options = RunOptions {
            jobs: 1,
            fail_fast: true,
            ..RunOptions::default()
        };
        let (summary, events) = apply(&mut f, &probe, 0, options, CancellationToken::new()).await;
        assert_eq!(summary.failed, 1);
        // Whichever intents were durable first ran first; nothing is sent after the failure.
        assert_eq!(probe.failed_after.get(), Some(probe.calls.get()));
        assert_eq!(summary.created, probe.calls.get() as usize);
        assert_eq!(summary.created + summary.skipped, 3, "{events:?}");
        assert!(
            summary.skipped >= 1,
            "c waits for a, so at least one is skipped"
        );
        for address in ["a", "b", "c"] {
            let created = events
                .iter()
                .any(|e| matches!(e, Event::ResourceComplete { address: a, .. } if a == address));
            if !created {
                assert_eq!(
                    skipped_reason(&events, address),
                    Some("--fail-fast stopped the run"),
                    "{address}"
                );
            }
        }
        // No resource is left for a person to check: intents written for what was not sent
        // are settled as never sent.
        let state = reloaded(f.dir.path());
        assert!(state.pending.is_empty(), "{:?}", state.pending);
        assert_eq!(state.resources.len(), summary.created);
    });
}

#[test]
fn an_interrupt_keeps_calls_in_flight_pending_and_settles_the_rest() {
    run_local(async {
        let probe = Rc::new(Probe::default());
        let mut f = fixture(
            json!({"executable": "unused"}),
            &[
                ("stuck", "hang", &[]),
                ("waiting", "echo", &[]),
                ("later", "echo", &["waiting"]),
            ],
        );
        let options = RunOptions {
            jobs: 1,
            ..RunOptions::default()
        };
        let interrupt = CancellationToken::new();
        let cancel = interrupt.clone();
        let probe2 = probe.clone();
        tokio::task::spawn_local(async move {
            while probe2.hanging.get() == 0 {
                probe2.started.notified().await;
            }
            // `waiting`'s intent is journaled by now or soon: either way it is settled.
            tokio::task::yield_now().await;
            cancel.cancel();
        });
        let (summary, events) = apply(&mut f, &probe, 0, options, interrupt).await;
        assert_eq!(summary.interrupted, 1, "{events:?}");
        // With one job, `waiting` (and then `later`) ran only if its intent was durable
        // before `stuck`'s; whatever did not run is skipped, none of it left pending.
        assert_eq!(summary.created + summary.skipped, 2, "{events:?}");
        assert!(events
            .iter()
            .any(|e| matches!(e, Event::Interrupted { .. })));
        if summary.created == 0 {
            assert_eq!(
                skipped_reason(&events, "waiting"),
                Some("the run was interrupted before it was sent to its provider")
            );
            assert_eq!(
                skipped_reason(&events, "later"),
                Some("the run was interrupted")
            );
        }
        let state = reloaded(f.dir.path());
        // Only the call that reached its provider is left to check.
        assert_eq!(
            state.pending.keys().collect::<Vec<_>>(),
            vec!["stuck"],
            "{:?}",
            state.pending
        );
    });
}

#[test]
fn a_lookup_cut_short_is_never_left_pending_but_a_create_is() {
    run_local(async {
        let probe = Rc::new(Probe::default());
        let mut f = fixture(
            json!({"executable": "unused"}),
            &[("stuck", "hang", &[]), ("looking", "lookup", &[])],
        );
        let interrupt = CancellationToken::new();
        let cancel = interrupt.clone();
        let probe2 = probe.clone();
        tokio::task::spawn_local(async move {
            while probe2.hanging.get() < 2 {
                probe2.started.notified().await;
            }
            cancel.cancel();
        });
        let (summary, events) = apply(&mut f, &probe, 0, RunOptions::default(), interrupt).await;
        assert_eq!(summary.interrupted, 2, "{events:?}");
        // Both were in their providers when the run stopped; only the one that may have
        // changed something is left for a person to check.
        let journal = std::fs::read_to_string(f.dir.path().join("state/journal")).unwrap();
        assert!(
            !journal.contains("\"looking\""),
            "no intent for a lookup: {journal}"
        );
        let state = reloaded(f.dir.path());
        assert_eq!(
            state.pending.keys().collect::<Vec<_>>(),
            vec!["stuck"],
            "{:?}",
            state.pending
        );
    });
}

#[test]
fn a_providers_limit_holds_in_the_provider_under_many_jobs() {
    run_local(async {
        let probe = Rc::new(Probe::default());
        let names: Vec<String> = (0..24).map(|n| format!("r{n}")).collect();
        let resources: Vec<(&str, &str, &[&str])> = names
            .iter()
            .map(|n| (n.as_str(), "echo", &[][..]))
            .collect();
        let mut f = fixture(
            json!({"executable": "unused", "maxConcurrency": 3}),
            &resources,
        );
        let options = RunOptions {
            jobs: 16,
            ..RunOptions::default()
        };
        let (summary, _) = apply(&mut f, &probe, 0, options, CancellationToken::new()).await;
        assert_eq!(summary.created, 24);
        assert_eq!(probe.max_running.get(), 3);
        // The provider's own declared limit is enforced the same way.
        let probe = Rc::new(Probe::default());
        let mut f = fixture(json!({"executable": "unused"}), &resources);
        let options = RunOptions {
            jobs: 16,
            ..RunOptions::default()
        };
        let (summary, _) = apply(&mut f, &probe, 2, options, CancellationToken::new()).await;
        assert_eq!(summary.created, 24);
        assert_eq!(probe.max_running.get(), 2);
    });
}

#[test]
fn a_child_and_a_permit_asked_for_by_a_running_operation_are_run_and_recorded_under_it() {
    run_local(async {
        let probe = Rc::new(Probe::default());
        let mut f = fixture(json!({"executable": "unused"}), &[("p", "parent", &[])]);
        let options = RunOptions {
            jobs: 1,
            ..RunOptions::default()
        };
        let (summary, events) = apply(&mut f, &probe, 0, options, CancellationToken::new()).await;
        assert!(summary.succeeded(), "{summary:?} {events:#?}");
        assert_eq!(summary.created, 2, "the parent and its child");
        // The parent got the child's outputs, and its permit came back (or the parent,
        // holding the only job, would never have finished).
        let parent = &f.state.resources["p"];
        assert_eq!(parent.outputs.value()["child"]["value"], "p");
        assert_eq!(
            probe.calls.get(),
            2,
            "the child's echo and the parent's own work"
        );
        // The child is recorded under its parent, and so is the next run's state.
        for state in [&f.state, &reloaded(f.dir.path())] {
            let child = &state.resources["p/c"];
            assert_eq!(child.parent.as_deref(), Some("p"));
            assert_eq!(child.resource_type, "echo");
        }
        let completed: Vec<&str> = events
            .iter()
            .filter_map(|e| match e {
                Event::ResourceComplete { address, .. } => Some(address.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(
            completed,
            ["p/c", "p"],
            "the child ends before its parent answers"
        );
    });
}

/// A state that takes nothing: every append fails, as on a full disk.
struct FullDisk;

impl StateBackend for FullDisk {
    fn load(
        &mut self,
    ) -> Result<(State, capstan_engine::state::LoadReport), capstan_engine::state::StateError> {
        Ok(Default::default())
    }
    fn append(
        &self,
        _: Vec<capstan_engine::state::Record>,
    ) -> tokio::sync::oneshot::Receiver<Result<(), String>> {
        let (tell, told) = tokio::sync::oneshot::channel();
        let _ = tell.send(Err("No space left on device".into()));
        told
    }
    fn compact(&mut self, _: &State) -> Result<(), capstan_engine::state::StateError> {
        Ok(())
    }
}

#[test]
fn a_run_the_state_stops_still_ends_with_its_summary() {
    run_local(async {
        let probe = Rc::new(Probe::default());
        let f = fixture(
            json!({"executable": "unused"}),
            &[("a", "echo", &[]), ("b", "echo", &["a"])],
        );
        let mut state = State::default();
        let changes = plan::plan(&f.deployment, &state).unwrap();
        let connection = connect(&probe, 0).await;
        let providers =
            Providers::from_connections(&f.deployment, [("mem".to_string(), connection)]);
        let events = Rc::new(CollectEvents(Default::default()));
        let result = run::Run {
            deployment: &f.deployment,
            state: &mut state,
            backend: Rc::new(FullDisk),
            providers: &providers,
            options: &RunOptions::default(),
            events: events.clone(),
            interrupt: CancellationToken::new(),
            stages: None,
        }
        .execute(changes)
        .await;
        assert!(result.is_err(), "the state error comes back");
        let events = events.0.borrow();
        assert!(
            matches!(events.last(), Some(Event::Summary { .. })),
            "{events:#?}"
        );
        assert_eq!(
            probe.calls.get(),
            0,
            "nothing reached the provider unrecorded"
        );
    });
}
