//! `capstan plan`, `apply` and `destroy`: deployments, end to end.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::rc::Rc;
use std::time::Duration;

use anyhow::{bail, Context};
use capstan_cli::served::SelfLauncher;
use capstan_engine::events::{Event, EventSink};
use capstan_engine::plan::Action;
use capstan_engine::run::{Providers, RunOptions};
use capstan_engine::session::{self, Mode, Notice, Session, Source, StartOptions};
use capstan_engine::state::{self, StateBackend};
use clap::Args;
use serde_json::{Map, Value};

use crate::error::CliError;
use crate::live::LiveEvents;
use crate::output::Stdout;
use crate::render::{HumanEvents, JsonEvents};
use crate::stop::{Stop, EXIT_FAILED};
use std::io::IsTerminal;

use crate::store::{Locked, Store};

/// Where a deployment and its state are.
#[derive(Args, Clone)]
pub struct Place {
    /// The deployment file: JSON, or Nix when it ends in `.nix` (evaluated with
    /// `nix-instantiate`) [default: capstan.json, else capstan.nix if only that exists].
    #[arg(short = 'f', long = "file", value_name = "FILE", global = true)]
    file: Option<PathBuf>,
    /// Where the state is kept: a directory [default: .capstan beside the deployment file],
    /// or a PostgreSQL database a team shares, `postgres://[USER@]HOST[:PORT]/DB?deployment=NAME`
    /// (libpq's URL; what it leaves out comes from PGHOST, PGPORT, PGUSER, PGDATABASE,
    /// PGPASSWORD and ~/.pgpass — keep the password out of the URL).
    #[arg(
        long,
        value_name = "DIR|URL",
        global = true,
        env = "CAPSTAN_STATE",
        hide_env_values = true
    )]
    pub state: Option<String>,
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

    /// Where the state is, or why `--state` cannot be one (something else is at a
    /// directory's path, a URL that does not read).
    pub fn store(&self) -> Result<Store, String> {
        let store = match &self.state {
            Some(text) if text.is_empty() => {
                return Err("--state is empty: give a directory or a postgres:// URL".into())
            }
            Some(text) => Store::parse(text).map_err(|e| format!("--state {e}"))?,
            None => match self.declared_state()? {
                Some(store) => store,
                None => Store::Dir(capstan_engine::model::dir_of(&self.file()).join(".capstan")),
            },
        };
        if let Some(dir) = store.dir() {
            if dir.exists() && !dir.is_dir() {
                return Err(format!(
                    "{} is not a directory, so it cannot hold the state; give --state a directory",
                    dir.display()
                ));
            }
        }
        Ok(store)
    }

    /// Where a JSON deployment says its state is (`"state": DIR|URL`; a directory relative to
    /// the deployment's). Only the top level is read here: the deployment's own reading says
    /// what else is wrong with it.
    fn declared_state(&self) -> Result<Option<Store>, String> {
        let file = self.file();
        if file.extension().is_some_and(|e| e == "nix") {
            return Ok(None);
        }
        let Ok(text) =
            capstan_engine::model::read_file_capped(&file, capstan_engine::model::DEPLOYMENT_LIMIT)
        else {
            return Ok(None);
        };
        // The top level's members as raw text: the resources are scanned, not built into a
        // tree (a deployment of a million resources would be parsed twice more).
        let Ok(members) = capstan_schema::json::object_members(&text) else {
            return Ok(None);
        };
        let state = members
            .iter()
            .find(|(key, _)| key == "state")
            .map(|(_, raw)| serde_json::from_str::<Value>(raw.get()).unwrap_or(Value::Null));
        match state {
            Some(Value::String(text)) if !text.trim().is_empty() => {
                let store =
                    Store::parse(&text).map_err(|e| format!("{}: `state`: {e}", file.display()))?;
                Ok(Some(match store {
                    Store::Dir(dir) if dir.is_relative() => {
                        Store::Dir(capstan_engine::model::dir_of(&file).join(dir))
                    }
                    other => other,
                }))
            }
            Some(_) => Err(format!(
                "{}: `state` must be a directory or a postgres:// URL, as a string",
                file.display()
            )),
            None => Ok(None),
        }
    }

    /// The state directory, when the state is kept in one.
    pub fn state_dir(&self) -> Option<PathBuf> {
        self.store().ok()?.dir().map(PathBuf::from)
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
    /// Only these resources and what they depend on (for destroy: and what depends on them):
    /// an address (`web`, `machines.web`), a glob (`machines.*`) or a tag declared with
    /// `"tags"` (`@frontend`); repeatable. Everything else is left as it is, and listed.
    #[arg(long = "target", value_name = "PATTERN")]
    targets: Vec<String>,
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
    /// Colour: auto (on a terminal, unless NO_COLOR is set and not empty; CLICOLOR_FORCE=1
    /// forces it), always, never.
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
    /// The largest message to or from a provider, in MiB (default 16): a read (`--refresh`)
    /// of a large resource may need more. A provider's `maxMessageMiB` wins.
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u32).range(1..=capstan_engine::model::MAX_MESSAGE_MIB as i64))]
    pub max_message_mib: Option<u32>,
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

fn load_params(path: Option<&Path>, flag: &str) -> anyhow::Result<Map<String, Value>> {
    let Some(path) = path else {
        return Ok(Map::new());
    };
    let text = capstan_engine::model::read_file_capped(path, capstan_engine::model::VALUES_LIMIT)
        .with_context(|| format!("cannot read {flag} {}", path.display()))?;
    match capstan_engine::strict_json::parse_document(&text) {
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

/// Reads the parameters and the state (`plan` without the lock, writing nothing), then the
/// deployment (`destroy` needs only the providers it declares), and plans it.
async fn open(
    args: &DeploymentArgs,
    view: &ViewArgs,
    lock: Option<&LockArgs>,
    sink: Rc<dyn EventSink>,
    mode: Mode,
    stop: &Stop,
) -> Result<(Session, Option<Rc<Locked>>), CliError> {
    let invalid = |e: &dyn std::fmt::Display| CliError::Invalid(e.to_string());
    let file = args.place.file();
    let here = capstan_engine::model::dir_of(&file);
    if here.to_str().is_none() {
        // Providers get paths under it as text (a file resource records its path): a lossy
        // one would name another file, which a refresh would call deleted.
        return Err(invalid(&format!(
            "{}: the deployment's directory has a path that is not valid UTF-8; Capstan and its providers record paths as text: rename the directory",
            here.display()
        )));
    }
    let (params, secret_params) = args.parameters().map_err(|e| invalid(&format!("{e:#}")))?;
    // Before the state is touched: a deployment that does not read changes nothing.
    let reading = Session::read(
        Source {
            file: file.clone(),
            params,
        },
        mode,
    )
    .map_err(|e| CliError::from_session(e, stop))?;
    if let Ok(launcher) = SelfLauncher::current() {
        reading
            .check_providers(&launcher)
            .map_err(|e| CliError::from_session(e, stop))?;
    }
    let store = args.place.store().map_err(|e| invalid(&e))?;
    let keys = state::crypt::Keys::from_env().map_err(|e| invalid(&e))?;
    let selection = if args.targets.is_empty() {
        None
    } else {
        let selection =
            capstan_engine::select::Selection::parse(&args.targets).map_err(|e| invalid(&e))?;
        // A typo is found before the state is touched (a deployment in Nix is evaluated
        // first, so its selection is checked once it is).
        if let Some(deployment) = reading.deployment() {
            let recorded = store
                .look(keys.as_ref())
                .map(|l| l.state)
                .unwrap_or_default();
            selection
                .check(deployment, &recorded)
                .map_err(|e| invalid(&e))?;
        }
        Some(selection)
    };
    let owner = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let check_owner = |loaded: bool| match store.dir() {
        Some(dir) => state::check_owner(dir, &owner, loaded).map_err(|e| invalid(&e)),
        None => Ok(()),
    };
    let (state, backend, running, locked) = match lock {
        None => {
            check_owner(false)?;
            let look = store.look(keys.as_ref()).map_err(|e| invalid(&e))?;
            // A plan writes nothing: it plans from every intact record, and says which lines
            // it could not read (an apply would stop on them).
            warn_damage(&store, &look.report);
            (look.state, None, look.running, look.report.locked)
        }
        Some(lock) => {
            let mut backend = store
                .lock(
                    lock.lock_timeout,
                    &mut |holder| {
                        say!("waiting for the state lock, held by {holder} …");
                    },
                    keys.as_ref(),
                )
                .map_err(|e| invalid(&e))?;
            check_owner(false)?;
            let (state, report) = backend.load().map_err(|e| invalid(&e))?;
            check_owner(true)?;
            if let Some(line) = report.torn_tail {
                say!(
                    "note: {}: line {line} was torn by a crash in the middle of a write and was set aside; every whole record was kept",
                    store.dir().map(|d| d.join("journal").display().to_string()).unwrap_or_default()
                );
            }
            if !report.never_sent.is_empty() {
                say!(
                    "note: {} operation(s) a stopped run had journaled ahead of its calls were never sent to their providers; they are settled, not pending",
                    report.never_sent.len()
                );
            }
            (state, Some(Rc::new(backend)), None, report.locked)
        }
    };
    if let (false, false, Some(holder)) = (state.pending.is_empty(), view.json, &running) {
        say!(
            "note: {} operation(s) are in flight in the command holding the state now ({holder}); this plan is of the state as it was before them:",
            state.pending.len()
        );
        for (address, op) in &state.pending {
            say!("  {address}: {}", op.operation);
        }
    } else if !state.pending.is_empty() && !view.json {
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
        sink,
        secrets.clone(),
    ));
    let cx = session::Context {
        state,
        backend: backend.clone().map(|b| b as Rc<dyn StateBackend>),
        events,
        secrets,
        interrupt: stop.token.clone(),
    };
    let mut session = Session::open(reading, cx)
        .await
        .map_err(|e| CliError::from_session(e, stop))?;
    if let Some(selection) = selection {
        session
            .select(selection)
            .map_err(|e| CliError::from_session(e, stop))?;
    }
    // What the plan covers must be readable: a secret that no key opens cannot be compared,
    // nor handed to a provider.
    let needed: Vec<&str> = session
        .changes
        .iter()
        .map(|c| c.address.as_str())
        .filter(|a| locked.iter().any(|l| l == a))
        .collect();
    if !needed.is_empty() {
        return Err(invalid(&format!(
            "the secrets of {} are encrypted in {} and no key given opens them: set {} (an age identity file) or {} to the key this state was sealed to; or leave them out with --target (the rest needs no key)",
            needed.iter().map(|a| format!("`{a}`")).collect::<Vec<_>>().join(", "),
            store.shown(),
            state::crypt::IDENTITY_ENV,
            state::crypt::PASSPHRASE_ENV
        )));
    }
    // PostgreSQL never holds a secret in clear, nor a directory whose secrets are encrypted:
    // without a key, an apply that would record one stops here, before any operation.
    if mode != Mode::Plan && backend.as_ref().is_some_and(|b| b.refuses_clear_secrets()) {
        let mut why: Vec<String> = Vec::new();
        if !secret_params.is_empty() {
            why.push("--secrets".into());
        }
        for change in session.changes.iter().filter(|c| c.action != Action::Noop) {
            let marked = session
                .deployment
                .resources
                .get(&change.address)
                .is_some_and(|decl| !decl.sensitive.is_empty());
            if marked {
                why.push(format!("`{}` (marked $sensitive)", change.address));
            }
        }
        if !why.is_empty() {
            return Err(invalid(&format!(
                "{} never holds a secret in clear, and no key was given to encrypt those of {}: set {} (an age identity file; `age-keygen -o FILE` makes one) or {}. Nothing was changed",
                store.shown(),
                why.join(", "),
                state::crypt::IDENTITY_ENV,
                state::crypt::PASSPHRASE_ENV
            )));
        }
    }
    Ok((session, backend))
}

/// Starts the session's providers (their log lines become events) and prints what the checks
/// before the plan found.
async fn start(
    session: &mut Session,
    options: &StartOptions,
    stop: &Stop,
) -> Result<Providers, CliError> {
    let launcher = SelfLauncher::current().map_err(|e| {
        CliError::Invalid(format!(
            "cannot find the capstan executable to start built-in providers: {e}"
        ))
    })?;
    let (logs_tx, mut logs_rx) = tokio::sync::mpsc::channel::<capstan_host::ProviderLog>(256);
    let events = session.events();
    tokio::task::spawn_local(async move {
        while let Some(log) = logs_rx.recv().await {
            events.emit(Event::ProviderLog {
                provider: log.provider,
                stream: log.stream,
                line: log.line,
            });
        }
    });
    let mut notices = Vec::new();
    let started = session
        .start(&launcher, logs_tx, options, &mut notices)
        .await;
    // Said whether or not the start went on to succeed.
    for notice in notices {
        match notice {
            Notice::Warning(warning) => say!("warning: {warning}"),
            Notice::Note(note) => say!("note: {note}"),
        }
    }
    let providers = started.map_err(|e| CliError::from_session(e, stop))?;
    Ok(providers)
}

pub async fn plan_cmd(
    args: DeploymentArgs,
    view: ViewArgs,
    plan_args: PlanArgs,
    stdout: Stdout,
) -> Result<ExitCode, CliError> {
    let options = StartOptions {
        jobs: plan_args.jobs as usize,
        timeout: None,
        refresh: plan_args.refresh,
        max_message_mib: plan_args.max_message_mib,
        state_dir: args.place.state_dir(),
    };
    let detailed = plan_args.detailed_exitcode;
    // With --detailed-exitcode, every error is 1, so that 2 means "changes" alone.
    let error = |e: CliError| match e {
        CliError::Invalid(message) if detailed => CliError::Failed(message),
        e => e,
    };
    capstan_engine::trace::start_run(capstan_engine::trace::parent_from_env());
    let (sink, tracing) =
        Tracing::start(events(&view, stdout, Mode::Plan), Mode::Plan).map_err(error)?;
    let json = view.json;
    let changed = plan_inner(args, view, sink.clone(), options).await;
    let result = match (changed, detailed) {
        (Ok(_), false) => Ok(ExitCode::SUCCESS),
        (Ok(false), true) => Ok(ExitCode::SUCCESS),
        (Ok(true), true) => Ok(ExitCode::from(2)),
        (Err(e), _) => Err(error(e)),
    };
    report_on_stream(&sink, json, &result);
    tracing.finish(&result);
    result
}

/// With `--json`, a command that stops with an error says so on its stream too, as its last
/// event, so a front end that reads only stdout learns why (stderr has it as well).
fn report_on_stream(sink: &Rc<dyn EventSink>, json: bool, result: &Result<ExitCode, CliError>) {
    if let (true, Err(error)) = (json, result) {
        if let Some((message, exit_code)) = error.message_and_code() {
            sink.emit(Event::Error {
                message: crate::output::scrubbed(message.to_string()),
                exit_code,
            });
        }
    }
}

/// Whether anything would change.
async fn plan_inner(
    args: DeploymentArgs,
    view: ViewArgs,
    sink: Rc<dyn EventSink>,
    options: StartOptions,
) -> Result<bool, CliError> {
    let stop = Stop::watch();
    let (mut session, _) = open(&args, &view, None, sink, Mode::Plan, &stop).await?;
    let providers = start(&mut session, &options, &stop).await?;
    // What providers that plan their own changes (Terraform's) say each change will make.
    let checks = session.plan_with_providers(&providers, options.jobs).await;
    providers.shutdown().await;
    for warning in checks.warnings {
        say!("warning: {warning}");
    }
    if let Some(code) = stop.exit_code() {
        return Err(CliError::Exit(code));
    }
    let changed = session.changes_anything();
    session.show_plan();
    // What a provider refuses now, an apply would fail on: the plan fails (exit 1), as
    // Terraform's does, naming each resource and what is wrong.
    if !checks.errors.is_empty() {
        return Err(CliError::Failed(format!(
            "the plan cannot be applied: its providers found {} problem(s):\n  {}",
            checks.errors.len(),
            checks.errors.join("\n  ")
        )));
    }
    // A closed output turns success into 141 (`finished` waits for what was written).
    match stop.finished(true) {
        code if code == ExitCode::SUCCESS => Ok(changed),
        code => Err(CliError::Exit(code)),
    }
}

pub async fn apply_cmd(
    args: DeploymentArgs,
    view: ViewArgs,
    run_args: RunArgs,
    stdout: Stdout,
    destroy: bool,
) -> Result<ExitCode, CliError> {
    let mode = if destroy { Mode::Destroy } else { Mode::Apply };
    capstan_engine::trace::start_run(capstan_engine::trace::parent_from_env());
    let (sink, tracing) = Tracing::start(events(&view, stdout, mode), mode)?;
    let result = apply_inner(args, &view, run_args, sink.clone(), mode).await;
    report_on_stream(&sink, view.json, &result);
    tracing.finish(&result);
    result
}

/// The run as an OpenTelemetry trace, when OpenTelemetry's variables ask for one
/// (`OTEL_TRACES_EXPORTER=otlp`); else nothing at all.
struct Tracing(
    Option<(
        capstan_telemetry::Telemetry,
        Rc<capstan_telemetry::TraceEvents>,
    )>,
);

impl Tracing {
    /// Starts the export and puts its sink in front of `sink`.
    fn start(
        sink: Rc<dyn EventSink>,
        mode: Mode,
    ) -> Result<(Rc<dyn EventSink>, Tracing), CliError> {
        let config = capstan_telemetry::Config::from_env().map_err(CliError::Invalid)?;
        let Some(config) = config else {
            return Ok((sink, Tracing(None)));
        };
        let telemetry = capstan_telemetry::Telemetry::start(&config).map_err(CliError::Invalid)?;
        let traced = telemetry.sink(sink, mode.name());
        Ok((traced.clone(), Tracing(Some((telemetry, traced)))))
    }

    /// Ends the trace (the run's span says how the command ended) and says what could not be
    /// exported, once.
    fn finish(self, result: &Result<ExitCode, CliError>) {
        let Some((telemetry, traced)) = self.0 else {
            return;
        };
        if let Err(error) = result {
            if let Some((message, code)) = error.message_and_code() {
                traced.failed(&crate::output::scrubbed(message.to_string()), code);
            }
        }
        traced.end();
        drop(traced);
        let report = telemetry.finish();
        if report.dropped > 0 {
            say!(
                "note: {} of the run's trace spans could not be exported ({}); the run itself is unaffected",
                report.dropped,
                report.error.as_deref().unwrap_or("the collector did not take them in time")
            );
        }
    }
}

async fn apply_inner(
    args: DeploymentArgs,
    view: &ViewArgs,
    run_args: RunArgs,
    sink: Rc<dyn EventSink>,
    mode: Mode,
) -> Result<ExitCode, CliError> {
    let stop = Stop::watch();
    let (mut session, backend) = open(&args, view, Some(&run_args.lock), sink, mode, &stop).await?;
    let options = StartOptions {
        jobs: run_args.jobs as usize,
        timeout: run_args.timeout,
        refresh: run_args.refresh,
        max_message_mib: run_args.max_message_mib,
        state_dir: args.place.state_dir(),
    };
    let providers = start(&mut session, &options, &stop).await?;
    // A state that takes no secret in clear (PostgreSQL, or a directory whose secrets are
    // encrypted) with no key: a type that marks its inputs or outputs sensitive would have
    // one recorded, after its operation. Stopped before any.
    if backend.as_ref().is_some_and(|b| b.refuses_clear_secrets()) {
        let marked: Vec<String> = session
            .changes
            .iter()
            .filter(|c| c.action != Action::Noop)
            .filter(|c| providers.declares_sensitive(&c.provider, &c.resource_type))
            .map(|c| format!("`{}` ({}.{})", c.address, c.provider, c.resource_type))
            .collect();
        if !marked.is_empty() {
            providers.shutdown().await;
            return Err(CliError::Invalid(format!(
                "{} would record secrets (their types mark inputs or outputs sensitive), and this state takes none in clear while no key is given: set {} (an age identity file) or {}. Nothing was changed",
                marked.join(", "),
                state::crypt::IDENTITY_ENV,
                state::crypt::PASSPHRASE_ENV
            )));
        }
    }
    // From here the providers run: every way out stops them first.
    let ended = apply_with(session, &providers, &run_args, &stop).await;
    providers.shutdown().await;
    // The exit code once everything is stopped and written: a signal or a closed output
    // during the shutdown still counts.
    match ended? {
        Ended::Ran { succeeded } => {
            if let Some(backend) = backend {
                compact_if_large(backend);
            }
            Ok(stop.finished(succeeded))
        }
        Ended::Declined => {
            say!("Nothing was deleted.");
            Err(CliError::Exit(ExitCode::from(EXIT_FAILED)))
        }
        Ended::Stopped => Ok(stop.finished(false)),
    }
}

/// How an apply ended, before its providers are stopped.
enum Ended {
    Ran {
        succeeded: bool,
    },
    /// "Delete everything?" was answered no.
    Declined,
    /// Stopped at that question.
    Stopped,
}

/// Shows the plan, asks before deleting everything, and runs it.
async fn apply_with(
    mut session: Session,
    providers: &Providers,
    run_args: &RunArgs,
    stop: &Stop,
) -> Result<Ended, CliError> {
    session.show_plan();
    let deletes = session
        .changes
        .iter()
        .filter(|c| c.action == Action::Delete)
        .count();
    let everything = deletes > 0 && session.changes.iter().all(|c| c.action == Action::Delete);
    if everything && !run_args.yes {
        match confirm(deletes, stop).await {
            Confirmed::Yes => {}
            Confirmed::No => return Ok(Ended::Declined),
            Confirmed::Stopped => return Ok(Ended::Stopped),
        }
    }
    let options = RunOptions {
        jobs: run_args.jobs as usize,
        fail_fast: run_args.fail_fast,
        timeout: run_args.timeout,
        secrets: session.secrets(),
    };
    let summary = session
        .run(providers, &options)
        .await
        .map_err(|e| CliError::from_session(e, stop))?;
    Ok(Ended::Ran {
        succeeded: summary.succeeded(),
    })
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

/// Folds a long journal into a snapshot: a rewrite per run at most, never per resource.
fn compact_if_large(backend: Rc<Locked>) {
    let mut backend = backend;
    if let Some(backend) = Rc::get_mut(&mut backend) {
        if let Err(e) = backend.compact_if_large() {
            say!("warning: could not compact the state journal (nothing is lost): {e}");
        }
    }
}

/// Says which journal lines (or records) a command that only reads could not read.
pub(crate) fn warn_damage(store: &Store, report: &state::LoadReport) {
    if !report.damaged.is_empty() {
        let place = match store.dir() {
            Some(dir) => format!("{}: line(s)", dir.join("journal").display()),
            None => format!("{}: record(s)", store.shown()),
        };
        say!(
            "warning: {place} {} are damaged; this shows every intact record. \
             Commands that change the state refuse until `capstan state repair`.",
            state::list_lines(&report.damaged)
        );
    }
}
