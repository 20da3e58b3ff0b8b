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
const EXIT_OUTPUT_CLOSED: u8 = 128 + libc::SIGPIPE as u8;

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
    /// Wait this long for another capstan holding the state lock (0: fail at once).
    #[arg(long, value_name = "SECONDS", default_value = "0", value_parser = wait_seconds, global = true)]
    lock_timeout: Duration,
    /// More detail: -v shows counters and debug events, -vv spans.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Colour: auto (on a terminal, unless NO_COLOR is set), always, never.
    #[arg(long, value_name = "WHEN", value_enum, default_value_t = ColorChoice::Auto, global = true)]
    color: ColorChoice,
}

/// Options of commands that run operations.
#[derive(Args, Clone)]
pub struct RunArgs {
    /// At most this many operations in providers at once, across all providers (a provider's
    /// own limit, or its `maxConcurrency`, can lower it for that provider).
    #[arg(short, long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=MAX_JOBS))]
    jobs: u32,
    /// Stop starting new operations after the first failure.
    #[arg(long)]
    fail_fast: bool,
    /// Cancel any operation that takes longer than this many seconds (a provider's
    /// `timeout` in the deployment takes precedence for its operations).
    #[arg(long, value_name = "SECONDS", value_parser = timeout_seconds)]
    timeout: Option<Duration>,
}

/// The most `--jobs` Capstan takes (far beyond what one machine's providers can use).
const MAX_JOBS: i64 = 100_000;

/// `--color`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ColorChoice {
    Auto,
    Always,
    Never,
}

/// A number of seconds for a flag: `Err` is clap's usage error (exit 2), naming the flag.
fn flag_seconds(text: &str, zero_ok: bool) -> Result<Duration, String> {
    let value: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a number of seconds"))?;
    capstan_engine::model::seconds(value, zero_ok)
}

pub(crate) fn timeout_seconds(text: &str) -> Result<Duration, String> {
    flag_seconds(text, false)
}

fn wait_seconds(text: &str) -> Result<Duration, String> {
    flag_seconds(text, true)
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
    match capstan_engine::strict_json::parse(&text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => bail!(
            "{}: parameters must be a JSON object of names to values",
            path.display()
        ),
        Err(e) => bail!("{}: {e}", path.display()),
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
        let color = match common.color {
            ColorChoice::Always => Some(true),
            ColorChoice::Never => Some(false),
            ColorChoice::Auto => None,
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
        say!("error: {e}");
        ExitCode::from(EXIT_INVALID)
    };
    let params = load_params(common.params.as_deref()).map_err(|e| fail(&format!("{e:#}")))?;
    let deployment = Deployment::load(&common.file, &params).map_err(|e| fail(&e))?;
    let dir = state_dir(common, &deployment);
    let mut backend = DirectoryBackend::open(&dir, common.lock_timeout).map_err(|e| fail(&e))?;
    let (state, report) = backend.load().map_err(|e| fail(&e))?;
    if !report.dropped.is_empty() {
        say!(
            "warning: {}: dropped {} damaged journal line(s) ({:?}); every intact record was kept",
            dir.join("journal").display(),
            report.dropped.len(),
            report.dropped
        );
    }
    if !state.pending.is_empty() && !common.json {
        say!(
            "warning: {} operation(s) were interrupted in an earlier run:",
            state.pending.len()
        );
        for (address, op) in &state.pending {
            say!(
                "  {address}: {} ({}.{})",
                op.operation,
                op.provider,
                op.resource_type
            );
        }
        say!("  Check those resources; `capstan state resolve ADDRESS` marks one as dealt with.");
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
    stop: &Stop,
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
            say!(
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
        say!("error: cannot find the capstan executable to start built-in providers: {e}");
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
    let builtin = BuiltinLauncher { program };
    let launch = Providers::launch(
        &names,
        &session.deployment,
        &session.state,
        &builtin,
        logs_tx,
    );
    // A stop during start-up (a provider may take seconds to answer its handshake) ends the
    // command at once: dropping the launch stops every provider process it started.
    let launched = tokio::select! {
        launched = launch => launched,
        () = stop.token.cancelled() => {
            return Err(stop.exit_code().unwrap_or(ExitCode::from(EXIT_INTERRUPTED)));
        }
    };
    let providers = launched.map_err(|e| {
        say!("error: {e}");
        ExitCode::from(EXIT_INVALID)
    })?;
    plan::annotate(changes, &providers.infos());
    if let Err(e) = session.deployment.check_against(&providers.infos()) {
        say!("error: {e}");
        providers.shutdown().await;
        return Err(ExitCode::from(EXIT_INVALID));
    }
    Ok(providers)
}

/// What asked a run to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StopCause {
    /// SIGINT (Ctrl-C).
    Interrupt,
    /// SIGTERM (a service manager, `kill`, `timeout`).
    Terminate,
    /// SIGHUP (the terminal went away).
    Hangup,
}

impl StopCause {
    /// A shell's code for a process ended by the signal: 128 + its number.
    fn exit_code(self) -> u8 {
        match self {
            StopCause::Interrupt => 128 + libc::SIGINT as u8,
            StopCause::Terminate => 128 + libc::SIGTERM as u8,
            StopCause::Hangup => 128 + libc::SIGHUP as u8,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            StopCause::Interrupt => "interrupted (SIGINT)",
            StopCause::Terminate => "terminated (SIGTERM)",
            StopCause::Hangup => "hung up (SIGHUP)",
        }
    }
}

/// The stop request of a command: SIGINT, SIGTERM and SIGHUP each cancel `token` (the run
/// stops gracefully: in-flight operations are cancelled in their providers and every result is
/// recorded); a second signal ends the process at once (every record written so far is already
/// durable, and the reaper kills what providers started).
///
/// A closed output (`capstan apply | head`) is not a stop: the run goes on to its end without
/// output, so nothing is left half-done, and the exit code says the output was lost.
struct Stop {
    token: CancellationToken,
    cause: Rc<std::cell::Cell<Option<StopCause>>>,
}

impl Stop {
    fn watch() -> Stop {
        use tokio::signal::unix::{signal, SignalKind};
        let token = CancellationToken::new();
        let cause = Rc::new(std::cell::Cell::new(None));
        let stop = Stop {
            token: token.clone(),
            cause: cause.clone(),
        };
        let listen = |kind: SignalKind| signal(kind).ok();
        let (mut int, mut term, mut hup) = (
            listen(SignalKind::interrupt()),
            listen(SignalKind::terminate()),
            listen(SignalKind::hangup()),
        );
        async fn next(signal: &mut Option<tokio::signal::unix::Signal>) {
            match signal {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::task::spawn_local(async move {
            loop {
                let now = tokio::select! {
                    () = next(&mut int) => StopCause::Interrupt,
                    () = next(&mut term) => StopCause::Terminate,
                    () = next(&mut hup) => StopCause::Hangup,
                };
                match cause.get() {
                    None => {
                        cause.set(Some(now));
                        say!(
                            "{}: stopping gracefully (signal again to stop at once)",
                            now.describe()
                        );
                        token.cancel();
                    }
                    Some(_) => {
                        say!("{} again: stopping now; recorded state is safe, in-flight operations are left as interrupted", now.describe());
                        std::process::exit(now.exit_code() as i32);
                    }
                }
            }
        });
        stop
    }

    /// The exit code for a stopped command, if it was stopped.
    fn exit_code(&self) -> Option<ExitCode> {
        self.cause.get().map(|c| ExitCode::from(c.exit_code()))
    }

    /// The exit code of a command that ran to its end: `ok` or not, and 141 (a shell's code
    /// for SIGPIPE) when its output was closed on the way, so nobody mistakes a run whose
    /// report was lost for a clean one.
    fn finished(&self, ok: bool) -> ExitCode {
        if let Some(code) = self.exit_code() {
            code
        } else if !ok {
            ExitCode::from(EXIT_FAILED)
        } else if crate::output::closed().is_cancelled() {
            ExitCode::from(EXIT_OUTPUT_CLOSED)
        } else {
            ExitCode::SUCCESS
        }
    }
}

pub async fn plan_cmd(common: Common, stdout: Stdout) -> ExitCode {
    let session = match open(&common, stdout, "plan") {
        Ok(s) => s,
        Err(code) => return code,
    };
    let mut changes = match plan::plan(&session.deployment, &session.state) {
        Ok(c) => c,
        Err(e) => {
            say!("error: {e}");
            return ExitCode::from(EXIT_INVALID);
        }
    };
    let stop = Stop::watch();
    let providers = match start_providers(&session, &mut changes, &stop).await {
        Ok(p) => p,
        Err(code) => return code,
    };
    providers.shutdown().await;
    if let Some(code) = stop.exit_code() {
        return code;
    }
    session.events.emit(Event::Plan {
        changes: Rc::new(changes),
    });
    stop.finished(true)
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
                say!("error: {e}");
                return ExitCode::from(EXIT_INVALID);
            }
        }
    };
    let stop = Stop::watch();
    let providers = match start_providers(&session, &mut changes, &stop).await {
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
    let options = RunOptions {
        jobs: args.jobs as usize,
        fail_fast: args.fail_fast,
        timeout: args.timeout,
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
        stop.token.clone(),
    )
    .await;
    providers.shutdown().await;
    let summary = match result {
        Ok(summary) => summary,
        Err(e) => {
            say!("error: the state could not be written, so the run stopped: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    compact_if_large(&mut session);
    stop.finished(summary.succeeded())
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
                say!("warning: could not compact the state journal (nothing is lost): {e}");
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
            say!("error: {e}");
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
                say!("error: no resource `{address}` in the state; `capstan state list` shows what there is");
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
                say!("error: `{address}` has no interrupted operation; `capstan state pending` lists them");
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
            say!("resolved the interrupted operation on `{address}`");
        }
        StateCmd::Forget { address } => {
            if !session.state.resources.contains_key(&address) {
                say!("error: no resource `{address}` in the state; `capstan state list` shows what there is");
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
            say!("forgot `{address}`: it is no longer in the state (nothing was deleted)");
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
