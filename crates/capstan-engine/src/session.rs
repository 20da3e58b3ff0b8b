//! A deployment session: the pipeline between reading a deployment and running its plan, the
//! one every command that plans or deploys goes through (the CLI, the tests, the benchmarks).
//!
//! [`Session::open`] reads the deployment (JSON, or Nix evaluated as far as the recorded
//! outputs allow) against its state and plans it. [`Session::start`] starts its providers,
//! checks interrupted operations with them and settles what they find, plans again if that
//! changed the state, reads what the plan must read (`readOnPlan`, `--refresh`) and checks the
//! deployment against the providers' handshakes. Then [`Session::plan_with_providers`] (for a
//! plan) or [`Session::run`]. Every failure is one [`SessionError`]; the session prints
//! nothing: what a person should read comes back as [`Notice`]s, even when it fails.

use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use crate::events::{Event, EventSink, Summary};
use crate::model::Deployment;
use crate::nix;
use crate::plan::{self, Action, PlannedChange};
use crate::reconcile;
use crate::run::{self, ProviderLauncher, Providers, RunOptions};
use crate::secrets::Secrets;
use crate::state::{self, Record, State, StateBackend, StateError};

/// Which command the session serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Plan only: reads, writes nothing, takes no lock.
    Plan,
    Apply,
    /// Delete everything the state holds; needs only the deployment's providers.
    Destroy,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Plan => "plan",
            Mode::Apply => "apply",
            Mode::Destroy => "destroy",
        }
    }
}

/// Why a session ended before (or instead of) its run.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The deployment, a parameter, a provider or the state is not as it must be: nothing
    /// was done. The message names the file, the resource or the provider.
    #[error("{0}")]
    Invalid(String),
    /// The state could not be written, so nothing more was done.
    #[error("the state could not be written, so the run stopped: {0}")]
    State(#[from] StateError),
    /// An interrupt came before the run.
    #[error("stopped before the run")]
    Stopped,
}

/// What the checks before the plan found that a person should read, in the order found:
/// warnings (something could not be checked) and notes (something was found and settled).
#[derive(Debug)]
pub enum Notice {
    Warning(String),
    Note(String),
}

/// How the session's providers are started and how many reads it runs at once.
#[derive(Clone, Debug)]
pub struct StartOptions {
    /// At most this many checks and reads in providers at once.
    pub jobs: usize,
    pub timeout: Option<Duration>,
    /// Read every recorded resource whose provider can look at the real thing.
    pub refresh: bool,
    /// Every provider's message limit (a provider's own `maxMessageMiB` wins).
    pub max_message_mib: Option<u32>,
    /// Where the state lives, told to the built-in providers (`CAPSTAN_STATE_DIR`), so the
    /// one that writes files refuses to write over it.
    pub state_dir: Option<PathBuf>,
}

/// A deployment read against its state, planned, and (after [`start`](Session::start)) with
/// its providers running.
pub struct Session {
    pub deployment: Deployment,
    pub state: State,
    /// The plan, as far as it is known now.
    pub changes: Vec<PlannedChange>,
    mode: Mode,
    /// The locked, writable state; `None` for a plan, which only reads.
    backend: Option<Rc<dyn StateBackend>>,
    events: Rc<dyn EventSink>,
    secrets: Rc<Secrets>,
    interrupt: CancellationToken,
    /// For a deployment in Nix: what is left for later evaluations.
    nix: Option<NixSession>,
    /// What the checks before planning found, applied to `state` and journaled only when the
    /// run starts (after any "delete everything?" question; a plan never journals).
    unjournaled: Vec<Record>,
    /// `--target`: what the run is limited to, and what it leaves that would change.
    selection: Option<crate::select::Selection>,
    not_selected: Vec<String>,
}

/// A deployment in Nix between evaluations.
struct NixSession {
    file: PathBuf,
    params: Map<String, Value>,
    /// Its Nix files as they were before the first evaluation.
    sources: nix::Sources,
    deferred: Vec<nix::Deferred>,
    /// Evaluations so far.
    stage: usize,
    /// What deferred items waited for, so that once read they depend on it.
    uses: nix::Uses,
}

/// What `destroy` needs of the deployment, said with its errors.
const DESTROY_HINT: &str = "destroy starts the providers that file declares to delete what the state holds; point -f at the deployment";
/// The same, for a deployment in Nix.
const DESTROY_HINT_NIX: &str = "destroy evaluates the providers that file declares to delete what the state holds; point -f at the deployment";

/// A deployment read, before its state is opened ([`Session::read`]).
pub struct Reading {
    file: PathBuf,
    params: Map<String, Value>,
    mode: Mode,
    /// `None` for a deployment in Nix, which is evaluated against the state.
    deployment: Option<Deployment>,
}

impl Reading {
    /// The deployment as read, when it is JSON (a deployment in Nix is evaluated later).
    pub fn deployment(&self) -> Option<&Deployment> {
        self.deployment.as_ref()
    }
}

/// Where the deployment is and what it is given.
pub struct Source {
    pub file: PathBuf,
    /// Parameters (`--params` and `--secrets` together).
    pub params: Map<String, Value>,
}

/// What a session needs besides its deployment: the state as loaded, where to write it, where
/// its events go, the secrets known, and the interrupt that stops it.
pub struct Context {
    pub state: State,
    pub backend: Option<Rc<dyn StateBackend>>,
    pub events: Rc<dyn EventSink>,
    pub secrets: Rc<Secrets>,
    pub interrupt: CancellationToken,
}

impl Session {
    /// Reads the deployment at `source` for `mode`, before the state is touched, so that a
    /// deployment that does not read is an error that changes nothing: a JSON file is read
    /// now (for `destroy` only its providers); a Nix file is evaluated by [`open`](Self::open),
    /// which needs the recorded outputs.
    pub fn read(source: Source, mode: Mode) -> Result<Reading, SessionError> {
        let Source { file, params } = source;
        let deployment = if nix::is_nix(&file) {
            if !file.is_file() {
                return Err(SessionError::Invalid(format!(
                    "{}: cannot read it: no such file",
                    file.display()
                )));
            }
            None
        } else if mode == Mode::Destroy {
            Some(
                Deployment::load_providers(&file, &params)
                    .map_err(|e| SessionError::Invalid(format!("{e}\n  {DESTROY_HINT}")))?,
            )
        } else {
            Some(
                Deployment::load(&file, &params)
                    .map_err(|e| SessionError::Invalid(e.to_string()))?,
            )
        };
        Ok(Reading {
            file,
            params,
            mode,
            deployment,
        })
    }

    /// Opens what [`read`](Self::read) read against the state and plans it; a deployment in
    /// Nix is evaluated as far as the recorded outputs allow (for `destroy`, its providers
    /// alone).
    pub async fn open(reading: Reading, cx: Context) -> Result<Session, SessionError> {
        let Reading {
            file,
            params,
            mode,
            deployment,
        } = reading;
        let mut session = Session {
            // A deployment in Nix until it is evaluated (below): nothing.
            deployment: deployment.unwrap_or_else(|| Deployment {
                file: file.clone(),
                providers: Default::default(),
                resources: Default::default(),
            }),
            state: cx.state,
            changes: Vec::new(),
            mode,
            backend: cx.backend,
            events: cx.events,
            secrets: cx.secrets,
            interrupt: cx.interrupt,
            nix: None,
            unjournaled: Vec::new(),
            selection: None,
            not_selected: Vec::new(),
        };
        if nix::is_nix(&file) && mode == Mode::Destroy {
            let (known, settled) = (Default::default(), Default::default());
            let request = nix::Request {
                file: &file,
                params: &params,
                known: &known,
                providers_only: true,
                settled: &settled,
            };
            let evaluation = unless_stopped(&session.interrupt.clone(), nix::evaluate(&request))
                .await?
                .map_err(|e| SessionError::Invalid(format!("{e}\n  {DESTROY_HINT_NIX}")))?;
            session.deployment = Deployment::parse(&file, &evaluation.document, &params)
                .map_err(|e| SessionError::Invalid(e.to_string()))?;
        } else if nix::is_nix(&file) {
            session.nix = Some(NixSession {
                sources: nix::Sources::of(&file),
                file,
                params,
                deferred: Vec::new(),
                stage: 0,
                uses: Default::default(),
            });
        }
        session.changes = session.replan().await?;
        crate::secrets::learn(&session.secrets, &session.state, Some(&session.deployment));
        Ok(session)
    }

    /// Limits the session to what `selection` selects (`--target`) and what that depends on;
    /// a pattern that selects nothing is an error (a typo, most likely).
    pub fn select(&mut self, selection: crate::select::Selection) -> Result<(), SessionError> {
        selection
            .check(&self.deployment, &self.state)
            .map_err(SessionError::Invalid)?;
        let changes = std::mem::take(&mut self.changes);
        let (kept, left) = selection.apply(&self.deployment, &self.state, self.mode, changes);
        self.changes = kept;
        self.not_selected = left;
        self.selection = Some(selection);
        Ok(())
    }

    /// The plan, limited to the selection if there is one.
    fn selected(&mut self, changes: Vec<PlannedChange>) -> Vec<PlannedChange> {
        match &self.selection {
            None => changes,
            Some(selection) => {
                let (kept, left) =
                    selection.apply(&self.deployment, &self.state, self.mode, changes);
                self.not_selected = left;
                kept
            }
        }
    }

    /// Plans (again): the state changed under the plan, or nothing is planned yet.
    async fn replan(&mut self) -> Result<Vec<PlannedChange>, SessionError> {
        let changes = self.replan_all().await?;
        Ok(self.selected(changes))
    }

    async fn replan_all(&mut self) -> Result<Vec<PlannedChange>, SessionError> {
        if self.mode == Mode::Destroy {
            return Ok(plan::plan_destroy(&self.state));
        }
        let Some(nix) = self.nix.as_mut() else {
            return plan::plan(&self.deployment, &self.state)
                .map_err(|e| SessionError::Invalid(e.to_string()));
        };
        let staged = nix::evaluate_and_plan(
            &nix.file,
            &nix.params,
            &self.state,
            &mut nix.uses,
            &*self.events,
            &mut nix.stage,
        );
        let staged = tokio::select! {
            staged = staged => staged,
            () = self.interrupt.cancelled() => return Err(SessionError::Stopped),
        }
        .map_err(|e| SessionError::Invalid(e.to_string()))?;
        self.deployment = staged.deployment;
        nix.deferred = staged.deferred;
        Ok(staged.changes)
    }

    /// Starts every provider the deployment declares or the plan uses, then checks what the
    /// plan stands on with them (interrupted operations, the plan's reads) and the deployment
    /// against their handshakes. What a person should read is added to `notices` as it is
    /// found, whatever happens next. On an error, the providers started are stopped.
    pub async fn start(
        &mut self,
        launcher: &dyn ProviderLauncher,
        logs: tokio::sync::mpsc::Sender<capstan_host::ProviderLog>,
        options: &StartOptions,
        notices: &mut Vec<Notice>,
    ) -> Result<Providers, SessionError> {
        let names = self.providers_to_start()?;
        check_builtins(&self.deployment, launcher)?;
        let launcher = StateDirLauncher {
            inner: launcher,
            state_dir: options.state_dir.as_deref(),
        };
        let launch = Providers::launch(
            &names,
            &self.deployment,
            &self.state,
            &launcher,
            logs,
            options.max_message_mib,
        );
        // A stop during start-up (a provider may take seconds to answer its handshake) ends
        // at once: dropping the launch stops every provider process it started.
        let providers = unless_stopped(&self.interrupt.clone(), launch)
            .await?
            .map_err(|e| SessionError::Invalid(e.to_string()))?;
        match self.check(&providers, options, notices).await {
            Ok(()) => Ok(providers),
            Err(e) => {
                providers.shutdown().await;
                Err(e)
            }
        }
    }

    /// Every provider the deployment declares (one no declared resource uses may be there for
    /// children another resource's provider asks for), and every one the plan needs.
    fn providers_to_start(&self) -> Result<std::collections::BTreeSet<String>, SessionError> {
        let mut names: std::collections::BTreeSet<String> =
            self.deployment.providers.keys().cloned().collect();
        for (change, provider) in self.changes.iter().flat_map(|c| {
            std::iter::once((c, &c.provider))
                .chain(c.replaces.as_ref().map(|old| (c, &old.provider)))
        }) {
            if !self.deployment.providers.contains_key(provider) {
                return Err(SessionError::Invalid(format!(
                    "{}: `{}` in the state uses provider `{}`, which the deployment no longer declares; \
                     declare it again until its resources are deleted",
                    self.deployment.file.display(),
                    change.address,
                    provider
                )));
            }
            names.insert(provider.clone());
        }
        Ok(names)
    }

    /// What [`start`](Self::start) checks once the providers run.
    async fn check(
        &mut self,
        providers: &Providers,
        options: &StartOptions,
        notices: &mut Vec<Notice>,
    ) -> Result<(), SessionError> {
        if !self.state.pending.is_empty() {
            self.reconcile(providers, options, notices).await?;
        }
        plan::annotate(&mut self.changes, &providers.infos());
        let reads = run::read_on_plan(
            &mut self.changes,
            &self.deployment,
            &self.state,
            providers,
            options.jobs,
            options.timeout,
            options.refresh,
        );
        let reads = unless_stopped(&self.interrupt.clone(), reads).await?;
        notices.extend(reads.warnings.into_iter().map(Notice::Warning));
        // What its provider no longer finds is no longer in the state.
        self.settle(
            reads
                .gone
                .into_iter()
                .map(|address| Record::Deleted { address })
                .collect(),
        );
        // What a refresh found changed is recorded as it is, so an update starts from it.
        let refreshed = reads
            .refreshed
            .into_iter()
            .filter_map(|(address, outputs)| {
                let mut now = self.state.resources.get(&address)?.clone();
                now.outputs = outputs;
                if let Some(connection) = providers.connections.get(&now.provider) {
                    run::note_sensitive(&address, &mut now, connection, &self.secrets);
                }
                Some(Record::Done {
                    address,
                    state: now,
                })
            })
            .collect();
        self.settle(refreshed);
        self.deployment
            .check_against(&providers.infos())
            .map_err(|e| SessionError::Invalid(e.to_string()))?;
        if let Some(nix) = self.nix.as_mut() {
            nix::defer_stale(&mut self.changes, &self.deployment, &mut nix.deferred);
        }
        Ok(())
    }

    /// Interrupted operations, checked with their providers before anything is planned on
    /// them: what they find is settled and the deployment planned again.
    async fn reconcile(
        &mut self,
        providers: &Providers,
        options: &StartOptions,
        notices: &mut Vec<Notice>,
    ) -> Result<(), SessionError> {
        let check = reconcile::check_interrupted(
            &self.state,
            &self.deployment,
            providers,
            &self.secrets,
            options.jobs,
            options.timeout,
        );
        let checked = unless_stopped(&self.interrupt.clone(), check).await?;
        notices.extend(checked.warnings.iter().cloned().map(Notice::Warning));
        notices.extend(
            checked
                .notes
                .iter()
                .map(|(address, note)| Notice::Note(format!("{address}: {note}"))),
        );
        if checked.records.is_empty() {
            return Ok(());
        }
        self.settle(checked.records);
        self.changes = self.replan().await?;
        for change in self.changes.iter_mut() {
            if let Some((_, note)) = checked.notes.iter().find(|(a, _)| *a == change.address) {
                change.note = Some(note.clone());
            }
            if change.action == Action::Noop && checked.adopted.contains(&change.address) {
                change.action = Action::Update;
                change.read_changed = true;
            }
        }
        Ok(())
    }

    /// Applies records found before the run to the state's copy; a run journals them when it
    /// starts (a plan only looks).
    fn settle(&mut self, records: Vec<Record>) {
        for record in records {
            self.state.apply_owned(record.clone());
            self.unjournaled.push(record);
        }
    }

    /// Where the session's events go (through the secrets' redaction).
    pub fn events(&self) -> Rc<dyn EventSink> {
        self.events.clone()
    }

    /// The sensitive values known so far.
    pub fn secrets(&self) -> Rc<Secrets> {
        self.secrets.clone()
    }

    /// What a deployment in Nix left for a later evaluation.
    pub fn deferred(&self) -> &[nix::Deferred] {
        self.nix.as_ref().map_or(&[], |n| &n.deferred)
    }

    /// Whether the plan changes anything (a deferred item will).
    pub fn changes_anything(&self) -> bool {
        self.changes.iter().any(|c| c.action != Action::Noop) || !self.deferred().is_empty()
    }

    /// Emits the plan (and what is deferred) as events. The changes are shared with the
    /// event, not copied.
    pub fn show_plan(&mut self) {
        let changes = Rc::new(std::mem::take(&mut self.changes));
        self.events.emit(Event::Plan {
            changes: changes.clone(),
        });
        if !self.not_selected.is_empty() {
            self.events.emit(Event::NotSelected {
                addresses: self.not_selected.clone(),
            });
        }
        for d in self.deferred() {
            self.events.emit(Event::Deferred {
                address: d.address.clone(),
                what: d.kind,
                waits_for: d.waits_for.clone(),
                may_delete: d.may_delete(&self.state),
            });
        }
        // The sinks here do not keep events, so the plan comes back without a copy.
        self.changes = Rc::try_unwrap(changes).unwrap_or_else(|shared| (*shared).clone());
    }

    /// Asks providers that plan their own changes (Terraform's) what each change will make
    /// (for a plan; changes nothing). Returns what could not be planned, as warnings.
    pub async fn plan_with_providers(
        &mut self,
        providers: &Providers,
        jobs: usize,
    ) -> run::ProviderChecks {
        run::plan_with_providers(
            &mut self.changes,
            &self.deployment,
            &self.state,
            providers,
            jobs,
        )
        .await
    }

    /// Runs the plan: journals what the checks before it found, then every change (a
    /// deployment in Nix evaluates again as the run goes on).
    pub async fn run(
        mut self,
        providers: &Providers,
        options: &RunOptions,
    ) -> Result<Summary, SessionError> {
        let Some(backend) = self.backend.take() else {
            return Err(SessionError::Invalid(format!(
                "{} opened the state read-only; it cannot run",
                self.mode.name()
            )));
        };
        let found = std::mem::take(&mut self.unjournaled);
        if !found.is_empty() {
            state::append_durably(&*backend, found).await?;
        }
        let stages = self
            .nix
            .take()
            .filter(|_| self.mode != Mode::Destroy)
            .map(|n| nix::Stages {
                file: n.file,
                params: n.params,
                sources: n.sources,
                deferred: n.deferred,
                uses: n.uses,
                stage: n.stage,
                selection: self.selection.clone(),
            });
        let run = run::Run {
            deployment: &self.deployment,
            state: &mut self.state,
            backend,
            providers,
            options,
            events: self.events.clone(),
            interrupt: self.interrupt.clone(),
            stages,
        };
        Ok(run.execute(std::mem::take(&mut self.changes)).await?)
    }
}

/// The environment variable that tells a provider where the state lives.
pub const STATE_DIR_ENV: &str = "CAPSTAN_STATE_DIR";

/// A launcher whose built-in providers (and bridges) are told where the state lives.
struct StateDirLauncher<'a> {
    inner: &'a dyn ProviderLauncher,
    state_dir: Option<&'a std::path::Path>,
}

impl ProviderLauncher for StateDirLauncher<'_> {
    fn command(&self, served: run::Served<'_>) -> capstan_host::ProviderCommand {
        let mut command = self.inner.command(served);
        if let Some(dir) = self.state_dir {
            let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
            command
                .env
                .push((STATE_DIR_ENV.into(), dir.into_os_string()));
        }
        command
    }

    fn builtins(&self) -> Option<&[&str]> {
        self.inner.builtins()
    }

    fn in_process(
        &self,
        provider: run::InProcess<'_>,
    ) -> Option<
        futures::future::LocalBoxFuture<
            'static,
            Result<capstan_host::ProviderConnection, capstan_host::LaunchError>,
        >,
    > {
        self.inner.in_process(provider)
    }
}

/// Every `{"builtin": NAME}` of `deployment` names a provider the launcher has.
fn check_builtins(
    deployment: &Deployment,
    launcher: &dyn ProviderLauncher,
) -> Result<(), SessionError> {
    let Some(known) = launcher.builtins() else {
        return Ok(());
    };
    for (name, decl) in &deployment.providers {
        if let crate::model::ProviderSourceDecl::Builtin(builtin) = &decl.source {
            if !known.contains(&builtin.as_str()) {
                return Err(SessionError::Invalid(format!(
                    "{}: providers.{name}: unknown builtin `{builtin}`; built in: {}",
                    deployment.file.display(),
                    known.join(", ")
                )));
            }
        }
    }
    Ok(())
}

impl Reading {
    /// Checks what can be checked of the providers before the state is opened: that every
    /// built-in one exists (a deployment in Nix is checked once evaluated, when it starts).
    pub fn check_providers(&self, launcher: &dyn ProviderLauncher) -> Result<(), SessionError> {
        match &self.deployment {
            Some(deployment) => check_builtins(deployment, launcher),
            None => Ok(()),
        }
    }
}

/// Waits for `future` unless `interrupt` comes first.
async fn unless_stopped<T>(
    interrupt: &CancellationToken,
    future: impl std::future::Future<Output = T>,
) -> Result<T, SessionError> {
    tokio::select! {
        done = future => Ok(done),
        () = interrupt.cancelled() => Err(SessionError::Stopped),
    }
}
