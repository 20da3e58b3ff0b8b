//! `capstan plan`, `apply`, `destroy` and `state …`: deployments, end to end.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::rc::Rc;
use std::time::Duration;

use anyhow::{bail, Context};
use capstan_engine::events::{Event, EventSink};
use capstan_engine::model::Deployment;
use capstan_engine::plan::{self, Action, PlannedChange};
use capstan_engine::run::{self, BuiltinLauncher, Providers, RunOptions};
use capstan_engine::state::{append_durably, DirectoryBackend, Record, State, StateBackend};
use clap::{Args, Subcommand};
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use crate::output::Stdout;
use crate::render::{HumanEvents, JsonEvents, LiveEvents};
use std::io::IsTerminal;

/// Exit codes.
const EXIT_FAILED: u8 = 1;
const EXIT_INVALID: u8 = 2;
const EXIT_INTERRUPTED: u8 = 130;

/// Options every deployment command takes.
#[derive(Args, Clone)]
pub struct Common {
    /// The deployment file (JSON).
    #[arg(
        short = 'f',
        long = "file",
        value_name = "FILE",
        default_value = "capstan.json",
        global = true
    )]
    file: PathBuf,
    /// The state directory [default: .capstan beside the deployment file].
    #[arg(long, value_name = "DIR", global = true)]
    state: Option<PathBuf>,
    /// Deployment parameters: a JSON object file, read by `{"$param": NAME}`.
    #[arg(long, value_name = "FILE", global = true)]
    params: Option<PathBuf>,
    /// Print newline-delimited JSON events on stdout instead of the live view.
    #[arg(long, global = true)]
    json: bool,
    /// Wait this long for another capstan holding the state lock.
    #[arg(long, value_name = "SECONDS", default_value_t = 0.0, global = true)]
    lock_timeout: f64,
    /// More detail: -v shows counters and debug events, -vv spans.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Colour: auto (terminal and no NO_COLOR), always, never.
    #[arg(long, value_name = "WHEN", default_value = "auto", global = true)]
    color: String,
}

/// Options of commands that run operations.
#[derive(Args, Clone)]
pub struct RunArgs {
    /// At most this many operations in providers at once, across all providers (a provider's
    /// own limit, or its `maxConcurrency`, can lower it for that provider).
    #[arg(short, long, default_value_t = 16)]
    jobs: usize,
    /// Stop starting new operations after the first failure.
    #[arg(long)]
    fail_fast: bool,
    /// Cancel any operation that takes longer than this many seconds.
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<f64>,
}

#[derive(Subcommand)]
pub enum StateCmd {
    /// List the resources in the state.
    List,
    /// Show one resource's recorded inputs and outputs as JSON.
    Show { address: String },
    /// List operations that were interrupted (crash, kill, Ctrl-C) and never finished.
    Pending,
    /// Mark an interrupted operation as dealt with (after checking the real resource).
    Resolve { address: String },
    /// Remove a resource from the state without asking its provider (after removing it by hand,
    /// or when its provider cannot delete).
    Forget { address: String },
}

struct Session {
    deployment: Deployment,
    backend: Rc<DirectoryBackend>,
    state: State,
    events: Rc<dyn EventSink>,
}

fn load_params(path: Option<&Path>) -> anyhow::Result<Map<String, Value>> {
    let Some(path) = path else {
        return Ok(Map::new());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read --params {}", path.display()))?;
    match serde_json::from_str(&text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => bail!("{}: parameters must be a JSON object", path.display()),
        Err(e) => bail!("{}: not valid JSON: {e}", path.display()),
    }
}

fn state_dir(common: &Common, deployment: &Deployment) -> PathBuf {
    common
        .state
        .clone()
        .unwrap_or_else(|| deployment.dir().join(".capstan"))
}

fn events(common: &Common, stdout: Stdout, command: &str) -> Rc<dyn EventSink> {
    if common.json {
        Rc::new(JsonEvents::new(Rc::new(RefCell::new(stdout)), command))
    } else {
        let color = match common.color.as_str() {
            "always" => Some(true),
            "never" => Some(false),
            _ => None,
        };
        let human = HumanEvents::new(common.verbose, color);
        if std::io::stderr().is_terminal() {
            LiveEvents::new(human)
        } else {
            Rc::new(human)
        }
    }
}

/// Reads the deployment and the state; `Err(code)` after reporting why not.
fn open(common: &Common, stdout: Stdout, command: &str) -> Result<Session, ExitCode> {
    let fail = |e: &dyn std::fmt::Display| {
        eprintln!("error: {e}");
        ExitCode::from(EXIT_INVALID)
    };
    let params = load_params(common.params.as_deref()).map_err(|e| fail(&format!("{e:#}")))?;
    let deployment = Deployment::load(&common.file, &params).map_err(|e| fail(&e))?;
    let dir = state_dir(common, &deployment);
    let mut backend =
        DirectoryBackend::open(&dir, Duration::from_secs_f64(common.lock_timeout.max(0.0)))
            .map_err(|e| fail(&e))?;
    let (state, report) = backend.load().map_err(|e| fail(&e))?;
    if !report.dropped.is_empty() {
        eprintln!(
            "warning: {}: dropped {} damaged journal line(s) ({:?}); every intact record was kept",
            dir.join("journal").display(),
            report.dropped.len(),
            report.dropped
        );
    }
    if !state.pending.is_empty() && !common.json {
        eprintln!(
            "warning: {} operation(s) were interrupted in an earlier run:",
            state.pending.len()
        );
        for (address, op) in &state.pending {
            eprintln!(
                "  {address}: {} ({}.{})",
                op.operation, op.provider, op.resource_type
            );
        }
        eprintln!(
            "  Check those resources; `capstan state resolve ADDRESS` marks one as dealt with."
        );
    }
    Ok(Session {
        deployment,
        backend: Rc::new(backend),
        state,
        events: events(common, stdout, command),
    })
}

/// Starts every provider the deployment or the plan uses and checks the deployment against
/// their handshakes.
async fn start_providers(
    session: &Session,
    changes: &mut [PlannedChange],
) -> Result<Providers, ExitCode> {
    let mut names: std::collections::BTreeSet<String> = Default::default();
    for r in session.deployment.resources.values() {
        if !names.contains(&r.provider) {
            names.insert(r.provider.clone());
        }
    }
    for (change, provider) in changes.iter().flat_map(|c| {
        std::iter::once((c, &c.provider)).chain(c.replaces.as_ref().map(|old| (c, &old.provider)))
    }) {
        if !session.deployment.providers.contains_key(provider) {
            eprintln!(
                "error: {}: `{}` in the state uses provider `{}`, which the deployment no longer declares; \
                 declare it again until its resources are deleted",
                session.deployment.file.display(), change.address, provider
            );
            return Err(ExitCode::from(EXIT_INVALID));
        }
        if !names.contains(provider) {
            names.insert(provider.clone());
        }
    }
    let program = std::env::current_exe().map_err(|e| {
        eprintln!("error: cannot find the capstan executable to start built-in providers: {e}");
        ExitCode::from(EXIT_INVALID)
    })?;
    let (logs_tx, mut logs_rx) = tokio::sync::mpsc::channel::<capstan_host::ProviderLog>(256);
    let events = session.events.clone();
    tokio::task::spawn_local(async move {
        while let Some(log) = logs_rx.recv().await {
            events.emit(Event::ProviderLog {
                provider: log.provider,
                stream: log.stream,
                line: log.line,
            });
        }
    });
    let providers = Providers::launch(
        &names,
        &session.deployment,
        &session.state,
        &BuiltinLauncher { program },
        logs_tx,
    )
    .await
    .map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(EXIT_INVALID)
    })?;
    plan::annotate(changes, &providers.infos());
    if let Err(e) = session.deployment.check_against(&providers.infos()) {
        eprintln!("error: {e}");
        providers.shutdown().await;
        return Err(ExitCode::from(EXIT_INVALID));
    }
    Ok(providers)
}

/// Ctrl-C: the first cancels the run gracefully, the second ends the process at once (every
/// record written so far is already durable).
fn watch_interrupts() -> CancellationToken {
    let token = CancellationToken::new();
    let first = token.clone();
    tokio::task::spawn_local(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            first.cancel();
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("interrupted again: stopping now; recorded state is safe, in-flight operations are left as interrupted");
                std::process::exit(EXIT_INTERRUPTED as i32);
            }
        }
    });
    token
}

pub async fn plan_cmd(common: Common, stdout: Stdout) -> ExitCode {
    let session = match open(&common, stdout, "plan") {
        Ok(s) => s,
        Err(code) => return code,
    };
    let mut changes = match plan::plan(&session.deployment, &session.state) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_INVALID);
        }
    };
    let providers = match start_providers(&session, &mut changes).await {
        Ok(p) => p,
        Err(code) => return code,
    };
    providers.shutdown().await;
    session.events.emit(Event::Plan {
        changes: Rc::new(changes),
    });
    ExitCode::SUCCESS
}

pub async fn apply_cmd(common: Common, args: RunArgs, stdout: Stdout, destroy: bool) -> ExitCode {
    let mut session = match open(&common, stdout, if destroy { "destroy" } else { "apply" }) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let mut changes = if destroy {
        plan::plan_destroy(&session.state)
    } else {
        match plan::plan(&session.deployment, &session.state) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(EXIT_INVALID);
            }
        }
    };
    let providers = match start_providers(&session, &mut changes).await {
        Ok(p) => p,
        Err(code) => return code,
    };
    // Shown, then run: the sinks here do not keep events, so the run gets the plan back
    // without a copy.
    let changes = Rc::new(changes);
    session.events.emit(Event::Plan {
        changes: changes.clone(),
    });
    let changes = Rc::try_unwrap(changes).unwrap_or_else(|shared| (*shared).clone());
    let interrupt = watch_interrupts();
    let options = RunOptions {
        jobs: args.jobs,
        fail_fast: args.fail_fast,
        timeout: args.timeout.map(Duration::from_secs_f64),
    };
    let backend: Rc<dyn StateBackend> = session.backend.clone();
    let result = run::run(
        changes,
        &session.deployment,
        &mut session.state,
        backend,
        &providers,
        &options,
        session.events.clone(),
        interrupt.clone(),
    )
    .await;
    providers.shutdown().await;
    let summary = match result {
        Ok(summary) => summary,
        Err(e) => {
            eprintln!("error: the state could not be written, so the run stopped: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    compact_if_large(&mut session);
    if interrupt.is_cancelled() {
        ExitCode::from(EXIT_INTERRUPTED)
    } else if summary.succeeded() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILED)
    }
}

/// Folds a long journal into the snapshot: a rewrite per run at most, never per resource.
fn compact_if_large(session: &mut Session) {
    const JOURNAL_LIMIT: u64 = 4 * 1024 * 1024;
    let journal = state_dir_of(session).join("journal");
    let large = std::fs::metadata(&journal)
        .map(|m| m.len() > JOURNAL_LIMIT)
        .unwrap_or(false);
    if large {
        if let Some(backend) = Rc::get_mut(&mut session.backend) {
            if let Err(e) = backend.compact_stored() {
                eprintln!("warning: could not compact the state journal (nothing is lost): {e}");
            }
        }
    }
}

fn state_dir_of(session: &Session) -> PathBuf {
    session.backend.dir().to_path_buf()
}

/// Makes one record durable, or reports why not.
async fn record(session: &Session, record: Record) -> Result<(), ExitCode> {
    append_durably(&*session.backend, vec![record])
        .await
        .map_err(|e| {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_FAILED)
        })
}

pub async fn state_cmd(common: Common, command: StateCmd, mut stdout: Stdout) -> ExitCode {
    let session = match open(
        &Common {
            json: false,
            ..common
        },
        Stdout::null(),
        "state",
    ) {
        Ok(s) => s,
        Err(code) => return code,
    };
    match command {
        StateCmd::List => {
            for (address, r) in &session.state.resources {
                stdout.line(&format!("{address}\t{}.{}", r.provider, r.resource_type));
            }
        }
        StateCmd::Show { address } => match session.state.resources.get(&address) {
            Some(r) => stdout.line(&pretty(r)),
            None => {
                eprintln!("error: no resource `{address}` in the state; `capstan state list` shows what there is");
                return ExitCode::from(EXIT_INVALID);
            }
        },
        StateCmd::Pending => {
            for (address, op) in &session.state.pending {
                stdout.line(&format!(
                    "{address}\t{}\t{}.{}\tstarted {}",
                    op.operation, op.provider, op.resource_type, op.started
                ));
            }
        }
        StateCmd::Resolve { address } => {
            if !session.state.pending.contains_key(&address) {
                eprintln!("error: `{address}` has no interrupted operation; `capstan state pending` lists them");
                return ExitCode::from(EXIT_INVALID);
            }
            if let Err(code) = record(
                &session,
                Record::Resolved {
                    address: address.clone(),
                },
            )
            .await
            {
                return code;
            }
            eprintln!("resolved the interrupted operation on `{address}`");
        }
        StateCmd::Forget { address } => {
            if !session.state.resources.contains_key(&address) {
                eprintln!("error: no resource `{address}` in the state; `capstan state list` shows what there is");
                return ExitCode::from(EXIT_INVALID);
            }
            if let Err(code) = record(
                &session,
                Record::Deleted {
                    address: address.clone(),
                },
            )
            .await
            {
                return code;
            }
            eprintln!("forgot `{address}`: it is no longer in the state (nothing was deleted)");
        }
    }
    ExitCode::SUCCESS
}

/// Used by tests to check the plan without a terminal.
#[allow(dead_code)]
pub fn summarize(changes: &[PlannedChange]) -> String {
    changes
        .iter()
        .filter(|c| c.action != Action::Noop)
        .map(|c| format!("{} {}", c.action.as_str(), c.address))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Indented JSON of `value`, including the inputs and outputs it keeps as compact text.
fn pretty(value: &capstan_engine::state::ResourceState) -> String {
    serde_json::to_value(value)
        .and_then(|v| serde_json::to_string_pretty(&v))
        .unwrap_or_default()
}
