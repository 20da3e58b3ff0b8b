//! `capstan plan`, `apply` and `destroy`: deployments, end to end.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::rc::Rc;
use std::time::Duration;

use anyhow::{bail, Context};
use capstan_engine::events::{Event, EventSink};
use capstan_engine::model::Deployment;
use capstan_engine::nix;
use capstan_engine::plan::{self, Action, PlannedChange};
use capstan_engine::reconcile;
use capstan_engine::run::{self, BuiltinLauncher, Providers, RunOptions};
use capstan_engine::state::{self, DirectoryBackend, State, StateBackend, StateError};
use clap::Args;
use serde_json::{Map, Value};

use crate::output::Stdout;
use crate::render::{HumanEvents, JsonEvents, LiveEvents};
use crate::stop::{Stop, EXIT_FAILED, EXIT_INVALID};
use std::io::IsTerminal;

/// Where a deployment and its state are.
#[derive(Args, Clone)]
pub struct Place {
    /// The deployment file: JSON, or Nix when it ends in `.nix` (evaluated with
    /// `nix-instantiate`) [default: capstan.json, else capstan.nix if only that exists].
    #[arg(short = 'f', long = "file", value_name = "FILE", global = true)]
    file: Option<PathBuf>,
    /// The state directory [default: .capstan beside the deployment file].
    #[arg(long, value_name = "DIR", global = true)]
    pub state: Option<PathBuf>,
}

impl Place {
    /// The deployment file: `-f`, else `capstan.json`, else `capstan.nix` when only that exists.
    pub fn file(&self) -> PathBuf {
        if let Some(file) = &self.file {
            return file.clone();
        }
        let json = PathBuf::from("capstan.json");
        let nix = PathBuf::from("capstan.nix");
        if !json.exists() && nix.exists() {
            nix
        } else {
            json
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.state
            .clone()
            .unwrap_or_else(|| capstan_engine::model::dir_of(&self.file()).join(".capstan"))
    }

    /// The state directory, or why it cannot be one (something else is at its path).
    pub fn checked_state_dir(&self) -> Result<PathBuf, String> {
        let dir = self.state_dir();
        if dir.exists() && !dir.is_dir() {
            return Err(format!(
                "{} is not a directory, so it cannot hold the state; give --state a directory",
                dir.display()
            ));
        }
        Ok(dir)
    }
}

/// The deployment to read.
#[derive(Args, Clone)]
pub struct DeploymentArgs {
    #[command(flatten)]
    pub place: Place,
    /// Deployment parameters: a JSON object file, read by `{"$param": NAME}`.
    #[arg(long, value_name = "FILE")]
    params: Option<PathBuf>,
    /// Sensitive parameters (passwords, keys): a JSON object file like --params, whose values
    /// are passed and stored but shown nowhere (keep it 0600).
    #[arg(long, value_name = "FILE")]
    secrets: Option<PathBuf>,
}

impl DeploymentArgs {
    /// `--params` and `--secrets` together, and the secret values alone.
    fn parameters(&self) -> anyhow::Result<(Map<String, Value>, Vec<Value>)> {
        let mut params = load_params(self.params.as_deref(), "--params")?;
        let secrets = load_params(self.secrets.as_deref(), "--secrets")?;
        let mut values = Vec::with_capacity(secrets.len());
        for (name, value) in secrets {
            if params.contains_key(&name) {
                bail!("parameter `{name}` is in both --params and --secrets; give it once");
            }
            values.push(value.clone());
            params.insert(name, value);
        }
        Ok((params, values))
    }
}

/// How a command shows what it does.
#[derive(Args, Clone)]
pub struct ViewArgs {
    /// Print newline-delimited JSON events on stdout (schema/events.schema.json) instead of
    /// the live view.
    #[arg(long)]
    json: bool,
    /// More detail: -v shows counters and debug events, -vv spans.
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Colour: auto (on a terminal, unless NO_COLOR is set), always, never.
    #[arg(long, value_name = "WHEN", value_enum, default_value_t = ColorChoice::Auto)]
    color: ColorChoice,
}

/// Waiting for the state lock, for commands that write the state.
#[derive(Args, Clone)]
pub struct LockArgs {
    /// Wait this long for another capstan holding the state lock (0: fail at once).
    #[arg(long, value_name = "SECONDS", default_value = "0", value_parser = wait_seconds)]
    pub lock_timeout: Duration,
}

/// Options of commands that run operations.
#[derive(Args, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    lock: LockArgs,
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
    /// The largest message to or from a provider, in MiB (default 16): raise it for outputs
    /// or inputs larger than that. A provider's `maxMessageMiB` in the deployment wins.
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u32).range(1..=capstan_engine::model::MAX_MESSAGE_MIB as i64))]
    max_message_mib: Option<u32>,
    /// Do not ask before deleting everything (destroy, or an apply whose plan deletes every
    /// resource). Capstan asks only on a terminal.
    #[arg(short = 'y', long)]
    yes: bool,
    /// Read every recorded resource whose provider can look at the real thing first: what
    /// drifted is updated, what is gone is made again (or, for destroy, not deleted twice).
    #[arg(long)]
    refresh: bool,
}

/// Options of `plan` alone.
#[derive(Args, Clone)]
pub struct PlanArgs {
    /// Exit 0 when nothing would change, 2 when something would, 1 on any error (as
    /// Terraform's -detailed-exitcode).
    #[arg(long)]
    pub detailed_exitcode: bool,
    /// Read every recorded resource whose provider can look at the real thing first, and
    /// plan what changed behind Capstan's back: an update where it drifted, a create where it
    /// is gone (writes nothing).
    #[arg(long)]
    pub refresh: bool,
    /// At most this many reads in providers at once (the plan's reads, and those of
    /// interrupted operations).
    #[arg(short, long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=MAX_JOBS))]
    pub jobs: u32,
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

impl ColorChoice {
    fn forced(self) -> Option<bool> {
        match self {
            ColorChoice::Always => Some(true),
            ColorChoice::Never => Some(false),
            ColorChoice::Auto => None,
        }
    }
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

/// What a deployment command works on.
struct Session {
    deployment: Deployment,
    state: State,
    /// The locked, writable state; `None` for `plan`, which only reads.
    backend: Option<Rc<DirectoryBackend>>,
    events: Rc<dyn EventSink>,
    /// For a deployment in Nix: its plan (made while evaluating) and what is left for later.
    nix: Option<NixSession>,
    /// The sensitive values known (hidden from `events`).
    secrets: Rc<capstan_engine::secrets::Secrets>,
    /// What the checks before planning found, applied to `state` and journaled only when the
    /// run starts (after any "delete everything?" question; `plan` never journals).
    unjournaled: Vec<capstan_engine::state::Record>,
}

/// A deployment in Nix between evaluations.
struct NixSession {
    file: PathBuf,
    params: Map<String, Value>,
    /// The plan of the first evaluations (`None` for destroy).
    changes: Option<Vec<PlannedChange>>,
    deferred: Vec<nix::Deferred>,
    /// Evaluations so far.
    stage: usize,
    /// What deferred items waited for, so that once read they depend on it.
    uses: nix::Uses,
}

/// Which command opens a session.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Plan,
    Apply,
    Destroy,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Plan => "plan",
            Mode::Apply => "apply",
            Mode::Destroy => "destroy",
        }
    }
}

fn load_params(path: Option<&Path>, flag: &str) -> anyhow::Result<Map<String, Value>> {
    let Some(path) = path else {
        return Ok(Map::new());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {flag} {}", path.display()))?;
    match capstan_engine::strict_json::parse(&text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => bail!(
            "{}: parameters must be a JSON object of names to values",
            path.display()
        ),
        Err(e) => bail!("{}: {e}", path.display()),
    }
}

fn events(view: &ViewArgs, stdout: Stdout, mode: Mode) -> Rc<dyn EventSink> {
    if view.json {
        return Rc::new(JsonEvents::new(Rc::new(RefCell::new(stdout)), mode.name()));
    }
    if mode == Mode::Plan {
        // The plan is the command's output: on stdout, so `capstan plan > plan.txt` works.
        return Rc::new(
            HumanEvents::new(view.verbose, view.color.forced())
                .plan_to(stdout, view.color.forced()),
        );
    }
    let human = HumanEvents::new(view.verbose, view.color.forced());
    if std::io::stderr().is_terminal() {
        LiveEvents::new(human)
    } else {
        Rc::new(human)
    }
}

/// Reads the deployment and the state; `Err(code)` after reporting why not. `plan` reads
/// the state without the lock and writes nothing; `destroy` needs only the providers the
/// deployment declares.
async fn open(
    args: &DeploymentArgs,
    view: &ViewArgs,
    lock: Option<&LockArgs>,
    stdout: Stdout,
    mode: Mode,
    stop: &Stop,
) -> Result<Session, ExitCode> {
    let fail = |e: &dyn std::fmt::Display| {
        say!("error: {e}");
        ExitCode::from(EXIT_INVALID)
    };
    let file = &args.place.file();
    let in_nix = nix::is_nix(file);
    let mut params = Map::new();
    let secret_params;
    let deployment = if in_nix {
        // Destroy too: a provider declaration may use a parameter.
        (params, secret_params) = args.parameters().map_err(|e| fail(&format!("{e:#}")))?;
        if !file.is_file() {
            return Err(fail(&format!(
                "{}: cannot read it: no such file",
                file.display()
            )));
        }
        // Read once the state is: which outputs exist comes from it.
        None
    } else if mode == Mode::Destroy {
        // A provider's configuration may use a parameter.
        let (params, secret) = args.parameters().map_err(|e| fail(&format!("{e:#}")))?;
        secret_params = secret;
        Some(Deployment::load_providers(file, &params).map_err(|e| {
            fail(&format!(
                "{e}\n  destroy starts the providers that file declares to delete what the state holds; point -f at the deployment"
            ))
        })?)
    } else {
        let (params, secret) = args.parameters().map_err(|e| fail(&format!("{e:#}")))?;
        secret_params = secret;
        Some(Deployment::load(file, &params).map_err(|e| fail(&e))?)
    };
    let dir = args.place.checked_state_dir().map_err(|e| fail(&e))?;
    let owner = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (state, backend) = match lock {
        None => {
            state::check_owner(&dir, &owner, false).map_err(|e| fail(&e))?;
            let (state, report) = state::read_only(&dir).map_err(|e| fail(&e))?;
            if !report.damaged.is_empty() {
                return Err(fail(&StateError::Damaged {
                    path: dir.join("journal"),
                    lines: report.damaged,
                }));
            }
            (state, None)
        }
        Some(lock) => {
            let mut backend = DirectoryBackend::open_with(&dir, lock.lock_timeout, &mut |holder| {
                say!("waiting for the state lock, held by {holder} …");
            })
            .map_err(|e| fail(&e))?;
            state::check_owner(&dir, &owner, false).map_err(|e| fail(&e))?;
            let (state, report) = backend.load().map_err(|e| fail(&e))?;
            state::check_owner(&dir, &owner, true).map_err(|e| fail(&e))?;
            if let Some(line) = report.torn_tail {
                say!(
                    "note: {}: line {line} was torn by a crash in the middle of a write and was set aside; every whole record was kept",
                    dir.join("journal").display()
                );
            }
            (state, Some(Rc::new(backend)))
        }
    };
    if !state.pending.is_empty() && !view.json {
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
    // Every event passes through the redaction of the secrets known by then.
    let secrets = capstan_engine::secrets::Secrets::new();
    crate::output::hide_in_messages(secrets.clone());
    capstan_engine::secrets::learn(&secrets, &state, None);
    for value in &secret_params {
        secrets.add_value(value);
    }
    let events: Rc<dyn EventSink> = Rc::new(capstan_engine::secrets::Redacting::new(
        events(view, stdout, mode),
        secrets.clone(),
    ));
    let (deployment, nix) = match deployment {
        Some(deployment) => (deployment, None),
        None => {
            let mut session = NixSession {
                file: file.clone(),
                params,
                changes: None,
                deferred: Vec::new(),
                stage: 0,
                uses: Default::default(),
            };
            let deployment = tokio::select! {
                read = read_nix(&mut session, &state, mode, &*events) => read.map_err(|e| fail(&e))?,
                () = stop.token.cancelled() => return Err(stop.stopped_code()),
            };
            (deployment, Some(session))
        }
    };
    capstan_engine::secrets::learn(&secrets, &state, Some(&deployment));
    Ok(Session {
        deployment,
        state,
        backend,
        events,
        nix,
        secrets,
        unjournaled: Vec::new(),
    })
}

/// Evaluates a deployment in Nix: for `destroy` its providers alone, else as far as the
/// outputs recorded in the state allow (and plans it).
async fn read_nix(
    session: &mut NixSession,
    state: &State,
    mode: Mode,
    events: &dyn EventSink,
) -> Result<Deployment, String> {
    if mode == Mode::Destroy {
        let evaluation = nix::evaluate(&nix::Request {
            file: &session.file,
            params: &session.params,
            known: &Default::default(),
            providers_only: true,
            settled: &Default::default(),
        })
        .await
        .map_err(|e| {
            format!("{e}\n  destroy evaluates the providers that file declares to delete what the state holds; point -f at the deployment")
        })?;
        return Deployment::parse(&session.file, &evaluation.document, &session.params)
            .map_err(|e| e.to_string());
    }
    let staged = nix::evaluate_and_plan(
        &session.file,
        &session.params,
        state,
        Default::default(),
        &mut session.uses,
        events,
        &mut session.stage,
    )
    .await
    .map_err(|e| e.to_string())?;
    session.changes = Some(staged.changes);
    session.deferred = staged.deferred;
    Ok(staged.deployment)
}

/// Starts every provider the deployment or the plan uses and checks the deployment against
/// their handshakes.
#[allow(clippy::too_many_arguments)]
async fn start_providers(
    session: &mut Session,
    changes: &mut Vec<PlannedChange>,
    stop: &Stop,
    max_message_mib: Option<u32>,
    jobs: usize,
    timeout: Option<Duration>,
    mode: Mode,
    refresh: bool,
) -> Result<Providers, ExitCode> {
    // Every provider the deployment declares: one no declared resource uses may be there for
    // children that another resource's provider asks for while it runs.
    let mut names: std::collections::BTreeSet<String> =
        session.deployment.providers.keys().cloned().collect();
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
    let launch = Providers::launch_with(
        &names,
        &session.deployment,
        &session.state,
        &builtin,
        logs_tx,
        max_message_mib,
    );
    // A stop during start-up (a provider may take seconds to answer its handshake) ends the
    // command at once: dropping the launch stops every provider process it started.
    let launched = tokio::select! {
        launched = launch => launched,
        () = stop.token.cancelled() => {
            return Err(stop.stopped_code());
        }
    };
    let providers = launched.map_err(|e| {
        say!("error: {e}");
        ExitCode::from(EXIT_INVALID)
    })?;
    // Interrupted operations, checked with their providers before anything is planned on them.
    if !session.state.pending.is_empty() {
        let check = reconcile::check_interrupted(
            &session.state,
            &session.deployment,
            &providers,
            &session.secrets,
            jobs,
            timeout,
        );
        let checked = tokio::select! {
            checked = check => checked,
            () = stop.token.cancelled() => {
                providers.shutdown().await;
                return Err(stop.stopped_code());
            }
        };
        for warning in &checked.warnings {
            say!("warning: {warning}");
        }
        for (address, note) in &checked.notes {
            say!("note: {address}: {note}");
        }
        if !checked.records.is_empty() {
            if let Err(code) = settle(session, checked.records.clone()).await {
                providers.shutdown().await;
                return Err(code);
            }
            match replan(session, mode).await {
                Ok(again) => *changes = again,
                Err(e) => {
                    say!("error: {e}");
                    providers.shutdown().await;
                    return Err(ExitCode::from(EXIT_INVALID));
                }
            }
            for change in changes.iter_mut() {
                if let Some((_, note)) = checked.notes.iter().find(|(a, _)| *a == change.address) {
                    change.note = Some(note.clone());
                }
                if change.action == Action::Noop && checked.adopted.contains(&change.address) {
                    change.action = Action::Update;
                    change.read_changed = true;
                }
            }
        }
    }
    plan::annotate(changes, &providers.infos());
    let reads = run::read_on_plan(
        changes,
        &session.deployment,
        &session.state,
        &providers,
        jobs,
        timeout,
        refresh,
    );
    let reads = tokio::select! {
        reads = reads => reads,
        () = stop.token.cancelled() => {
            providers.shutdown().await;
            return Err(stop.stopped_code());
        }
    };
    for warning in reads.warnings {
        say!("warning: {warning}");
    }
    if !reads.gone.is_empty() {
        // What its provider no longer finds is no longer in the state.
        let records = reads
            .gone
            .into_iter()
            .map(|address| capstan_engine::state::Record::Deleted { address })
            .collect();
        if let Err(code) = settle(session, records).await {
            providers.shutdown().await;
            return Err(code);
        }
    }
    if let Err(e) = session.deployment.check_against(&providers.infos()) {
        say!("error: {e}");
        providers.shutdown().await;
        return Err(ExitCode::from(EXIT_INVALID));
    }
    Ok(providers)
}

pub async fn plan_cmd(
    args: DeploymentArgs,
    view: ViewArgs,
    plan_args: PlanArgs,
    stdout: Stdout,
) -> ExitCode {
    let code = plan_inner(
        args,
        view,
        stdout,
        plan_args.refresh,
        plan_args.jobs as usize,
    )
    .await;
    if !plan_args.detailed_exitcode {
        return code.map_or_else(|code| code, |_| ExitCode::SUCCESS);
    }
    match code {
        Ok(false) => ExitCode::SUCCESS,
        Ok(true) => ExitCode::from(2),
        // Every error is 1, so that 2 means "changes" alone.
        Err(code) if code == ExitCode::from(EXIT_INVALID) => ExitCode::from(EXIT_FAILED),
        Err(code) => code,
    }
}

/// `Ok(whether anything would change)`, or the exit code of a failure.
async fn plan_inner(
    args: DeploymentArgs,
    view: ViewArgs,
    stdout: Stdout,
    refresh: bool,
    jobs: usize,
) -> Result<bool, ExitCode> {
    let stop = Stop::watch();
    let mut session = open(&args, &view, None, stdout, Mode::Plan, &stop).await?;
    let mut changes = match session.nix.as_mut().and_then(|n| n.changes.take()) {
        Some(changes) => changes,
        None => plan::plan(&session.deployment, &session.state).map_err(|e| {
            say!("error: {e}");
            ExitCode::from(EXIT_INVALID)
        })?,
    };
    let providers = start_providers(
        &mut session,
        &mut changes,
        &stop,
        None,
        jobs,
        None,
        Mode::Plan,
        refresh,
    )
    .await?;
    if let Some(nix) = session.nix.as_mut() {
        nix::defer_stale(&mut changes, &session.deployment, &mut nix.deferred);
    }
    // What providers that plan their own changes (Terraform's) say each change will make.
    let warnings = run::plan_with_providers(
        &mut changes,
        &session.deployment,
        &session.state,
        &providers,
        jobs,
    )
    .await;
    for warning in warnings {
        say!("warning: {warning}");
    }
    providers.shutdown().await;
    if let Some(code) = stop.exit_code() {
        return Err(code);
    }
    let deferred = session.nix.map(|n| n.deferred).unwrap_or_default();
    let changed = changes.iter().any(|c| c.action != Action::Noop) || !deferred.is_empty();
    session.events.emit(Event::Plan {
        changes: Rc::new(changes),
    });
    show_deferred(&*session.events, &deferred);
    // A closed output turns success into 141 (`finished` waits for what was written).
    match stop.finished(true) {
        code if code == ExitCode::SUCCESS => Ok(changed),
        code => Err(code),
    }
}

pub async fn apply_cmd(
    args: DeploymentArgs,
    view: ViewArgs,
    run_args: RunArgs,
    stdout: Stdout,
    destroy: bool,
) -> ExitCode {
    let mode = if destroy { Mode::Destroy } else { Mode::Apply };
    let stop = Stop::watch();
    let mut session = match open(&args, &view, Some(&run_args.lock), stdout, mode, &stop).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    let staged = session.nix.as_mut().and_then(|n| n.changes.take());
    let mut changes = if destroy {
        plan::plan_destroy(&session.state)
    } else if let Some(changes) = staged {
        changes
    } else {
        match plan::plan(&session.deployment, &session.state) {
            Ok(c) => c,
            Err(e) => {
                say!("error: {e}");
                return ExitCode::from(EXIT_INVALID);
            }
        }
    };
    let providers = match start_providers(
        &mut session,
        &mut changes,
        &stop,
        run_args.max_message_mib,
        run_args.jobs as usize,
        run_args.timeout,
        mode,
        run_args.refresh,
    )
    .await
    {
        Ok(p) => p,
        Err(code) => return code,
    };
    if let Some(nix) = session.nix.as_mut() {
        nix::defer_stale(&mut changes, &session.deployment, &mut nix.deferred);
    }
    // Shown, then run: the sinks here do not keep events, so the run gets the plan back
    // without a copy.
    let changes = Rc::new(changes);
    session.events.emit(Event::Plan {
        changes: changes.clone(),
    });
    if let Some(nix) = &session.nix {
        show_deferred(&*session.events, &nix.deferred);
    }
    let deletes = changes
        .iter()
        .filter(|c| c.action == Action::Delete)
        .count();
    let everything = deletes > 0 && changes.iter().all(|c| c.action == Action::Delete);
    if everything && !run_args.yes {
        match confirm(deletes, &stop).await {
            Confirmed::Yes => {}
            Confirmed::No => {
                providers.shutdown().await;
                say!("Nothing was deleted.");
                return ExitCode::from(EXIT_FAILED);
            }
            Confirmed::Stopped => {
                providers.shutdown().await;
                return stop.finished(false);
            }
        }
    }
    let changes = Rc::try_unwrap(changes).unwrap_or_else(|shared| (*shared).clone());
    let options = RunOptions {
        jobs: run_args.jobs as usize,
        fail_fast: run_args.fail_fast,
        timeout: run_args.timeout,
        secrets: session.secrets.clone(),
    };
    let Some(backend) = session.backend.take() else {
        unreachable!("apply and destroy open the state for writing");
    };
    // What the checks before the plan found (interrupted operations settled, resources gone).
    let found = std::mem::take(&mut session.unjournaled);
    if !found.is_empty() {
        if let Err(e) = state::append_durably(&*backend, found).await {
            providers.shutdown().await;
            say!("error: the state could not be written: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    }
    // A deployment in Nix with items left for later evaluates again as the run goes on.
    let stages = session
        .nix
        .take()
        .filter(|_| !destroy)
        .map(|n| nix::Stages {
            file: n.file,
            params: n.params,
            deferred: n.deferred,
            uses: n.uses,
            stage: n.stage,
        });
    let result = run::run_staged(
        changes,
        &session.deployment,
        &mut session.state,
        backend.clone() as Rc<dyn StateBackend>,
        &providers,
        &options,
        session.events.clone(),
        stop.token.clone(),
        stages,
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
    compact_if_large(backend);
    stop.finished(summary.succeeded())
}

/// Applies records found before the run to the state's copy; an apply journals them when
/// its run starts (`plan` only looks).
async fn settle(
    session: &mut Session,
    records: Vec<capstan_engine::state::Record>,
) -> Result<(), ExitCode> {
    for record in records {
        session.state.apply_owned(record.clone());
        session.unjournaled.push(record);
    }
    Ok(())
}

/// Plans again, after the state changed under the plan.
async fn replan(session: &mut Session, mode: Mode) -> Result<Vec<PlannedChange>, String> {
    if mode == Mode::Destroy {
        return Ok(plan::plan_destroy(&session.state));
    }
    let Some(nix) = session.nix.as_mut() else {
        return plan::plan(&session.deployment, &session.state).map_err(|e| e.to_string());
    };
    let staged = nix::evaluate_and_plan(
        &nix.file,
        &nix.params,
        &session.state,
        Default::default(),
        &mut nix.uses,
        &*session.events,
        &mut nix.stage,
    )
    .await
    .map_err(|e| e.to_string())?;
    session.deployment = staged.deployment;
    nix.deferred = staged.deferred;
    Ok(staged.changes)
}

/// Shows what a deployment in Nix left for a later evaluation.
fn show_deferred(events: &dyn EventSink, deferred: &[nix::Deferred]) {
    for d in deferred {
        events.emit(Event::Deferred {
            address: d.address.clone(),
            what: d.kind,
            waits_for: d.waits_for.clone(),
        });
    }
}

/// A person's answer to "delete everything?".
enum Confirmed {
    Yes,
    No,
    Stopped,
}

/// Asks on the terminal before deleting every resource; without a terminal (a script, CI)
/// there is nobody to ask and the command goes on.
async fn confirm(deletes: usize, stop: &Stop) -> Confirmed {
    use tokio::io::AsyncBufReadExt;
    if !(std::io::stdin().is_terminal() && std::io::stderr().is_terminal()) {
        return Confirmed::Yes;
    }
    crate::output::to_stderr(
        format!(
            "This deletes all {deletes} resource(s) in the state. Type `yes` to go on (or pass --yes): "
        )
        .as_bytes(),
    );
    let mut line = String::new();
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin());
    tokio::select! {
        read = stdin.read_line(&mut line) => match read {
            Ok(_) if line.trim() == "yes" => Confirmed::Yes,
            _ => Confirmed::No,
        },
        () = stop.token.cancelled() => Confirmed::Stopped,
    }
}

/// Folds a long journal into the snapshot: a rewrite per run at most, never per resource.
fn compact_if_large(backend: Rc<DirectoryBackend>) {
    const JOURNAL_LIMIT: u64 = 4 * 1024 * 1024;
    let mut backend = backend;
    let journal = backend.dir().join("journal");
    let large = std::fs::metadata(&journal)
        .map(|m| m.len() > JOURNAL_LIMIT)
        .unwrap_or(false);
    if large {
        if let Some(backend) = Rc::get_mut(&mut backend) {
            if let Err(e) = backend.compact_stored() {
                say!("warning: could not compact the state journal (nothing is lost): {e}");
            }
        }
    }
}
