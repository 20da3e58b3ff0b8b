//! The providers of a run: how each declared provider is started (or reached), one
//! connection each for the whole run, and the settings handed to those configured late.

use super::*;

/// The providers of one run: one connection each, started once.
pub struct Providers {
    pub(crate) connections: BTreeMap<String, Rc<ProviderConnection>>,
    /// Each provider's concurrency limit, if it has one.
    pub(crate) limits: BTreeMap<String, usize>,
    pub(crate) timeouts: BTreeMap<String, Duration>,
}

impl Providers {
    /// Whether `provider`'s `resource_type` marks any input or output sensitive.
    pub fn declares_sensitive(&self, provider: &str, resource_type: &str) -> bool {
        self.connections
            .get(provider)
            .and_then(|c| c.info().resource_type(resource_type).cloned())
            .is_some_and(|t| {
                t.inputs.iter().any(|i| i.sensitive) || t.outputs.iter().any(|o| o.sensitive)
            })
    }
}

/// A provider the engine cannot start by itself: one built into the program that embeds the
/// engine, or a program another protocol's bridge serves as a Capstan provider.
#[derive(Clone, Copy, Debug)]
pub enum Served<'a> {
    /// A built-in provider, by its name (`{"builtin": NAME}`).
    Builtin(&'a str),
    /// A Terraform provider binary (path resolved against the deployment's directory),
    /// served through the Terraform bridge. Its settings reach the bridge in its environment.
    Terraform { program: &'a Path },
    /// A NixOps4 v0 program and its arguments, served through the v0 bridge, which starts the
    /// program once per operation: the types it must serve (each with its output names) and
    /// those NixOps4 keeps no state for.
    NixOps4V0 {
        program: &'a Path,
        args: &'a [String],
        types: Option<&'a BTreeMap<String, BTreeSet<String>>>,
        stateless_types: &'a [String],
    },
}

/// How the program that embeds the engine starts what it serves itself ([`Served`]). The
/// `capstan` command re-executes itself with a hidden subcommand; an embedder may start
/// anything that speaks the protocol on fd 3. The engine sets the working directory and the
/// environment it needs on the command returned.
/// How long the core waits for a Terraform bridge's handshake: the bridge starts the Terraform
/// provider and reads its schema first (seconds, for the largest providers), and gives up on
/// a program that prints no go-plugin handshake line itself, well within this.
const TERRAFORM_BRIDGE_HANDSHAKE: std::time::Duration = std::time::Duration::from_secs(60);

pub trait ProviderLauncher {
    fn command(&self, served: Served<'_>) -> ProviderCommand;

    /// What this program serves in its own process instead of a process of its own (the
    /// `capstan` command: the Terraform bridge, one process fewer between the core and the
    /// Terraform provider): the connection to it. `None` (the default): start `command`'s.
    fn in_process(
        &self,
        _provider: InProcess<'_>,
    ) -> Option<LocalBoxFuture<'static, Result<ProviderConnection, capstan_host::LaunchError>>>
    {
        None
    }

    /// The names `{"builtin": NAME}` may take, if the launcher knows them (a name outside
    /// them is then an error before anything starts).
    fn builtins(&self) -> Option<&[&str]> {
        None
    }
}

/// A provider [`ProviderLauncher::in_process`] may serve in this process.
pub struct InProcess<'a> {
    /// Its name in the deployment.
    pub name: &'a str,
    pub served: Served<'a>,
    /// Its settings, references filled in from the state (what a Terraform bridge process
    /// finds in its environment).
    pub settings: Option<serde_json::Value>,
    /// The deployment's directory, where what it starts runs.
    pub dir: &'a Path,
    pub options: HostOptions,
    /// Where its own lines go (those of no operation), as a provider process's stderr does.
    pub logs: tokio::sync::mpsc::Sender<ProviderLog>,
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
pub(super) fn recorded_settings(decl: &ProviderDecl, state: &State) -> Option<serde_json::Value> {
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

/// How the provider `decl` is started or reached.
pub(super) fn source_for(
    decl: &ProviderDecl,
    state: &State,
    dir: &Path,
    launcher: &dyn ProviderLauncher,
    v0_types: Option<&BTreeMap<String, BTreeSet<String>>>,
) -> ProviderSource {
    // A relative path with a slash is the deployment's; a bare name is looked up in PATH.
    let resolve = |program: &str| {
        if program.contains('/') && Path::new(program).is_relative() {
            dir.join(program)
        } else {
            PathBuf::from(program)
        }
    };
    let mut command = match (&decl.source, decl.protocol.as_deref()) {
        (ProviderSourceDecl::Socket { path, owner }, _) => {
            return ProviderSource::Socket {
                path: dir.join(path),
                owner: *owner,
            }
        }
        (ProviderSourceDecl::Builtin(name), _) => launcher.command(Served::Builtin(name)),
        (ProviderSourceDecl::Executable { program, .. }, Some(crate::model::TERRAFORM)) => {
            let program = resolve(program);
            let mut command = launcher.command(Served::Terraform { program: &program });
            if let Some(settings) = recorded_settings(decl, state) {
                // In the environment, which only this user can read (a command line is
                // anyone's): the configuration may hold secrets. References are filled in
                // from the state.
                command.env.push((
                    crate::model::TERRAFORM_CONFIG_ENV.into(),
                    settings.to_string().into(),
                ));
            }
            command
        }
        (ProviderSourceDecl::Executable { program, args }, Some(_)) => {
            let program = resolve(program);
            launcher.command(Served::NixOps4V0 {
                program: &program,
                args,
                types: v0_types,
                stateless_types: &decl.stateless_types,
            })
        }
        (ProviderSourceDecl::Executable { program, args }, None) => {
            ProviderCommand::new(resolve(program), args.iter())
        }
    };
    command.cwd = Some(dir.to_path_buf());
    ProviderSource::Command(command)
}

impl Providers {
    /// Starts (or connects to) each named provider, all at once, with every provider's
    /// message limit raised to `max_message_mib` if given (a provider's own `maxMessageMiB`
    /// in the deployment wins).
    pub async fn launch(
        names: &BTreeSet<String>,
        deployment: &Deployment,
        state: &State,
        launcher: &dyn ProviderLauncher,
        logs: tokio::sync::mpsc::Sender<ProviderLog>,
        max_message_mib: Option<u32>,
    ) -> Result<Self, LaunchError> {
        let dir = deployment.dir();
        let v0 = v0_types(deployment, state);
        // A name the deployment does not declare starts nothing: its resources then fail
        // with "not started", naming it.
        let launches = names.iter().filter_map(|name| {
            let decl = deployment.providers.get(name)?;
            let source = source_for(decl, state, &dir, launcher, v0.get(name));
            let logs = logs.clone();
            let mut options = HostOptions::default();
            if decl.protocol.as_deref() == Some(crate::model::TERRAFORM) {
                // The bridge starts the Terraform provider and reads its schema before it
                // answers; it reports a program that is no Terraform provider itself, sooner.
                options.handshake_timeout = TERRAFORM_BRIDGE_HANDSHAKE;
            }
            if let Some(mib) = decl.max_message_mib.or(max_message_mib) {
                options.max_message_words = mib as usize * (1024 * 1024 / 8);
            }
            let here = match (&decl.source, decl.protocol.as_deref()) {
                (ProviderSourceDecl::Executable { program, .. }, Some(crate::model::TERRAFORM)) => {
                    let program = if program.contains('/') && Path::new(program).is_relative() {
                        dir.join(program)
                    } else {
                        PathBuf::from(program)
                    };
                    launcher.in_process(InProcess {
                        name,
                        served: Served::Terraform { program: &program },
                        settings: recorded_settings(decl, state),
                        dir: &dir,
                        options: options.clone(),
                        logs: logs.clone(),
                    })
                }
                _ => None,
            };
            if let Some(here) = here {
                return Some(async move { here.await.map(|c| (name.clone(), c)) }.boxed_local());
            }
            Some(
                async move {
                    ProviderConnection::launch(name, &source, options, Some(logs))
                        .await
                        .map(|c| (name.clone(), c))
                }
                .boxed_local(),
            )
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
