//! The engine driven as a library would drive it (not through the CLI), over real provider
//! processes: what a caller may get wrong must come back as an error, never a panic.

use std::collections::BTreeSet;
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

use capstan_cli::served::SelfLauncher;
use capstan_engine::events::CollectEvents;
use capstan_engine::events::Event;
use capstan_engine::model::Deployment;
use capstan_engine::plan;
use capstan_engine::run::{self, Providers, RunOptions};
use capstan_engine::state::{DirectoryBackend, StateBackend};
use capstan_tests::{run_local, testing_provider};
use serde_json::json;

fn deployment(dir: &Path, value: u32) -> Deployment {
    let provider = json!({"executable": testing_provider()});
    let text = json!({
        "providers": {"a": provider, "b": provider},
        "resources": {
            "h": {"provider": "a", "type": "handle", "inputs": {"value": "made by a"}},
            "u": {"provider": "b", "type": "noop", "inputs": {"value": value, "h": {"$cap": "h#handle"}}}
        }
    })
    .to_string();
    Deployment::parse(&dir.join("capstan.json"), &text, &Default::default()).unwrap()
}

async fn apply(
    deployment: &Deployment,
    backend: &Rc<DirectoryBackend>,
    state: &mut capstan_engine::state::State,
    names: &BTreeSet<String>,
) -> Vec<Event> {
    let changes = plan::plan(deployment, state).unwrap();
    let (logs, _) = tokio::sync::mpsc::channel(16);
    let launcher = SelfLauncher {
        program: capstan_tests::workspace_binary("capstan"),
    };
    let providers = Providers::launch(names, deployment, state, &launcher, logs, None)
        .await
        .unwrap();
    let events = Rc::new(CollectEvents(Default::default()));
    run::Run {
        deployment,
        state,
        backend: backend.clone() as Rc<dyn StateBackend>,
        providers: &providers,
        options: &RunOptions::default(),
        events: events.clone(),
        interrupt: Default::default(),
        stages: None,
    }
    .execute(changes)
    .await
    .unwrap();
    providers.shutdown().await;
    Rc::try_unwrap(events).ok().unwrap().0.into_inner()
}

#[test]
fn a_caller_that_starts_only_the_changed_providers_gets_an_error_not_a_panic() {
    run_local(async {
        let dir = tempfile::tempdir().unwrap();
        let mut backend =
            DirectoryBackend::open(&dir.path().join("state"), Duration::ZERO).unwrap();
        let (mut state, _) = backend.load().unwrap();
        let backend = Rc::new(backend);
        let first = deployment(dir.path(), 1);
        let all: BTreeSet<String> = ["a", "b"].map(String::from).into();
        let events = apply(&first, &backend, &mut state, &all).await;
        assert!(
            !events
                .iter()
                .any(|e| matches!(e, Event::ResourceFailed { .. })),
            "{events:?}"
        );

        // Only `u` changes, so a caller starts only its provider, `b`; but `h` (unchanged)
        // must be read for the capability `u` takes from it, and `a` was not started.
        let second = deployment(dir.path(), 2);
        let changes = plan::plan(&second, &state).unwrap();
        let needed = run::providers_needed(&changes);
        assert_eq!(needed, ["b"].map(String::from).into());
        let events = apply(&second, &backend, &mut state, &needed).await;
        let failed: Vec<&String> = events
            .iter()
            .filter_map(|e| match e {
                Event::ResourceFailed { error, .. } => Some(error),
                _ => None,
            })
            .collect();
        assert_eq!(failed.len(), 1, "{events:?}");
        assert!(
            failed[0].contains("provider `a` was not started for this run"),
            "{}",
            failed[0]
        );
        assert!(events
            .iter()
            .any(|e| matches!(e, Event::ResourceSkipped { address, .. } if address == "u")));
    });
}

/// An embedder's whole job through the engine's `Session`: open, start, run; then a plan of
/// nothing; then destroy. Real provider processes, a real journal.
#[test]
fn a_deployment_driven_through_a_session_applies_plans_to_nothing_and_destroys() {
    use capstan_engine::session::{Context, Mode, Session, Source, StartOptions};
    run_local(async {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("capstan.json");
        let provider = json!({"executable": testing_provider()});
        std::fs::write(
            &file,
            json!({
                "providers": {"t": provider},
                "resources": {
                    "a": {"provider": "t", "type": "noop", "inputs": {"value": 1}},
                    "b": {"provider": "t", "type": "noop", "inputs": {"value": {"$ref": "a#id"}}}
                }
            })
            .to_string(),
        )
        .unwrap();
        let launcher = SelfLauncher {
            program: capstan_tests::workspace_binary("capstan"),
        };
        let session_for = |mode: Mode| {
            let mut backend =
                DirectoryBackend::open(&dir.path().join(".capstan"), Duration::ZERO).unwrap();
            let (state, _) = backend.load().unwrap();
            let events = Rc::new(CollectEvents(Default::default()));
            let cx = Context {
                state,
                backend: Some(Rc::new(backend) as Rc<dyn StateBackend>),
                events: events.clone(),
                secrets: capstan_engine::secrets::Secrets::new(),
                interrupt: Default::default(),
            };
            let source = Source {
                file: file.clone(),
                params: Default::default(),
            };
            (Session::read(source, mode).unwrap(), cx, events)
        };
        let options = StartOptions {
            jobs: 4,
            timeout: None,
            refresh: false,
            max_message_mib: None,
            state_dir: Some(dir.path().join(".capstan")),
        };
        for (mode, expect_changes) in [
            (Mode::Apply, true),
            (Mode::Apply, false),
            (Mode::Destroy, true),
        ] {
            let (reading, cx, events) = session_for(mode);
            let mut session = Session::open(reading, cx).await.unwrap();
            assert_eq!(session.changes_anything(), expect_changes, "{mode:?}");
            let (logs, _) = tokio::sync::mpsc::channel(16);
            let mut notices = Vec::new();
            let providers = session
                .start(&launcher, logs, &options, &mut notices)
                .await
                .unwrap();
            assert!(notices.is_empty(), "{notices:?}");
            let summary = session
                .run(&providers, &RunOptions::default())
                .await
                .unwrap();
            providers.shutdown().await;
            assert!(summary.succeeded(), "{:?}", events.0.borrow());
            match (mode, expect_changes) {
                (Mode::Apply, true) => assert_eq!(summary.created, 2),
                (Mode::Apply, false) => assert_eq!(summary.unchanged, 2),
                _ => assert_eq!(summary.deleted, 2),
            }
        }
    });
}
