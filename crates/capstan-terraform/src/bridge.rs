//! A Terraform provider served as a Capstan provider (`capstan __provider terraform -- PATH`):
//! its resource types from its schema, each operation through its life cycle. The provider
//! process is started once, before serving (its schema gives the handshake's types), on the
//! runtime that then serves; it is configured on the first operation, and shut down
//! (go-plugin's `GRPCController.Shutdown`, then a kill) when the run ends. Its private bytes and the schema
//! version a state was made with ride in each resource's outputs under [`PRIVATE`] and
//! [`SCHEMA_VERSION`], so they are kept in Capstan's state and passed back; a state of an older
//! version is upgraded (`UpgradeResourceState`) before it is used.
//!
//! What the provider logs (stderr, `GRPCStdio`) goes to the operation it is about: the one
//! operation of its resource type in flight (hclog's `tf_resource_type`), or the one operation
//! in flight at all; otherwise to the bridge's own stderr, which the core keeps as the
//! provider's. Lines with a level are `tracing` events at that level (shown as `-v` asks);
//! others are the operation's log. Warnings are `warn` events of the operation. A cancelled
//! operation sends `StopProvider` (which, as in Terraform, asks every operation of the
//! provider to stop). If the provider process dies, the bridge exits at once: what was in
//! flight stays pending in Capstan's state, as after any provider crash.

use std::cell::Cell;
use std::future::Future;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use capstan_provider::{
    Level, LogStream, Operation, OperationError, Planned, Prior, Provider, Resource, ResourceType,
};
use serde_json::Value;

use crate::{wire, Channel, LogLine, Plugin, StartOptions, TerraformError};

/// The output that carries the provider's private bytes (base64).
pub const PRIVATE: &str = "__terraform_private";

/// The output that carries the schema version the state was made with.
pub const SCHEMA_VERSION: &str = "__terraform_schema_version";

/// Operations in flight, by number: their resource type and where their log lines go.
type InFlight = Arc<Mutex<Vec<(u64, String, tokio::sync::mpsc::UnboundedSender<LogLine>)>>>;

/// The running plugin of a run, started on first use, and its schema.
struct Shared {
    program: PathBuf,
    /// The provider block's settings: from the environment, or (for settings that refer to
    /// resources the run makes) from the core's `Provider.configure`.
    config: std::cell::RefCell<Value>,
    /// The provider block's sensitive settings (by its schema), never shown by the bridge;
    /// shared with the tasks that read its log lines.
    config_secrets: Arc<Mutex<Vec<String>>>,
    /// What a failed create made all the same (Apply answered a state with its error), by
    /// address: what the core's read of it finds (`find`), to record it tainted.
    made_anyway: std::cell::RefCell<std::collections::HashMap<String, Value>>,
    schema: wire::GetProviderSchemaResponse,
    plugin: Plugin,
    configured: tokio::sync::OnceCell<()>,
    in_flight: InFlight,
    next_op: Cell<u64>,
    host: Host,
}

/// Where the bridge's own lines go: each with its level (`None`: as it is).
pub type OwnLines = Arc<dyn Fn(Option<&str>, String) + Send + Sync>;

/// What the bridge runs in: where its own lines go (those of no operation: the Terraform
/// provider's, the bridge's warnings), and what ends it when the Terraform provider is lost.
#[derive(Clone)]
pub struct Host {
    /// A line of the bridge's or of the provider's own, with its level (`None`: as it is).
    pub own: OwnLines,
    /// The provider was lost while in use (it exited, or stopped answering), for the reason
    /// given: the bridge must serve nothing more, so that the core keeps what was in flight
    /// pending.
    pub lost: Rc<dyn Fn(String)>,
    /// Where the Terraform provider runs (the deployment's directory); `None`: here.
    pub dir: Option<PathBuf>,
    /// Told the provider's pid once started; with it the provider gets a session of its own
    /// (so whoever is told can kill everything it starts, as capstan's reaper does), without
    /// it a process group in the bridge's session.
    pub spawned: Option<crate::Spawned>,
}

impl Host {
    /// A bridge that is a process of its own (`capstan __provider terraform`): its lines go to
    /// its stderr, which the core shows as the provider's, and losing the provider ends it.
    pub fn process() -> Host {
        Host {
            own: Arc::new(|level, message| match level {
                None => eprintln!("{message}"),
                Some("trace") => tracing::trace!(target: "terraform", "{message}"),
                Some("debug") => tracing::debug!(target: "terraform", "{message}"),
                // Below `warn`, a provider's own lines are go-plugin's and the SDK's chatter
                // ("configuring server automatic mTLS" at every start): Terraform shows none
                // of them unless `TF_LOG` asks; here `RUST_LOG=terraform=debug` does.
                Some("info") => tracing::debug!(target: "terraform", "{message}"),
                Some("warn") => tracing::warn!(target: "terraform", "{message}"),
                Some(_) => tracing::error!(target: "terraform", "{message}"),
            }),
            lost: Rc::new(|why| {
                eprintln!("{why}");
                std::process::exit(70);
            }),
            dir: None,
            spawned: None,
        }
    }
}

impl Shared {
    /// The plugin, configured (on first use).
    async fn plugin(self: &Rc<Self>) -> Result<&Plugin, OperationError> {
        self.configured
            .get_or_try_init(|| async {
                let mut warnings = Vec::new();
                let config = self.config.borrow().clone();
                self.plugin
                    .configure(&self.schema, &config, &mut warnings)
                    .await?;
                for w in warnings {
                    (self.host.own)(
                        Some("warn"),
                        format!("{}: warning: {}", self.program.display(), self.scrub(&w)),
                    );
                }
                Ok::<_, TerraformError>(())
            })
            .await
            // The provider block is wrong, not this operation's inputs.
            .map_err(|e| OperationError {
                kind: capstan_schema::ErrorKind::Settings,
                ..self.failure(e)
            })?;
        let plugin = &self.plugin;
        if self.next_op.get() == 0 {
            // Once: a provider that dies takes the bridge with it (see the module's notes).
            self.next_op.set(1);
            let shared = self.clone();
            tokio::task::spawn_local(async move {
                let status = shared.plugin.unexpected_exit().await;
                (shared.host.lost)(format!(
                    "the Terraform provider {} exited ({status}) while Capstan was using it; \
                     what it was doing stays pending",
                    shared.program.display()
                ));
            });
        }
        Ok(plugin)
    }

    /// Runs `call` (one use of the plugin by `op`, handed where to put the provider's
    /// warnings): the provider's log lines about it become the operation's, its warnings the
    /// operation's `warn` events, and a cancellation sends `StopProvider`.
    async fn traced<T>(
        &self,
        op: &Operation,
        plugin: &Plugin,
        type_name: &str,
        call: impl AsyncFnOnce(&mut Vec<String>) -> Result<T, TerraformError>,
    ) -> Result<T, TerraformError> {
        let mut warnings = Vec::new();
        let result = self
            .traced_call(op, plugin, type_name, call(&mut warnings))
            .await;
        self.warn(op, warnings).await;
        result
    }

    async fn traced_call<T>(
        &self,
        op: &Operation,
        plugin: &Plugin,
        type_name: &str,
        call: impl Future<Output = Result<T, TerraformError>>,
    ) -> Result<T, TerraformError> {
        let id = self.next_op.get() + 1;
        self.next_op.set(id);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        self.in_flight
            .lock()
            .expect("not poisoned")
            .push((id, type_name.to_string(), tx));
        let _registered = Registered(&self.in_flight, id);
        tokio::pin!(call);
        let mut stop_sent = false;
        let result = loop {
            tokio::select! {
                result = &mut call => break result,
                Some(line) = rx.recv() => emit(op, line).await,
                _ = op.cancelled(), if !stop_sent => {
                    stop_sent = true;
                    plugin.stop_operations().await;
                }
            }
        };
        while let Ok(line) = rx.try_recv() {
            emit(op, line).await;
        }
        if let Err(TerraformError::Transport(why, _)) = &result {
            if !plugin.is_shutting_down() {
                // No answer: whether it took effect is unknown, for this call and for every
                // other one on the connection. The bridge ends, so the core keeps them pending
                // (a provider that died is reported by the watcher first, if it is quick).
                let _ = tokio::time::timeout(
                    std::time::Duration::from_secs(2),
                    plugin.unexpected_exit(),
                )
                .await;
                // It may still run (it answered nothing, or wrongly): it goes, with the bridge.
                plugin.kill();
                (self.host.lost)(format!(
                    "lost the Terraform provider {} during `{}` of {} ({why}); what was in flight stays pending",
                    self.program.display(),
                    type_name,
                    op.address()
                ));
            }
        }
        result
    }

    /// `text` with the provider block's sensitive settings hidden.
    fn scrub(&self, text: &str) -> String {
        let mut text = text.to_string();
        for secret in self.config_secrets.lock().expect("not poisoned").iter() {
            text = text.replace(secret.as_str(), "(sensitive)");
        }
        text
    }

    /// An error of the plugin as the operation's, its secrets hidden.
    fn failure(&self, e: TerraformError) -> OperationError {
        let e = failure(e);
        OperationError {
            message: self.scrub(&e.message),
            details: self.scrub(&e.details),
            ..e
        }
    }
}

/// Takes an operation off the in-flight list when it ends, however it ends.
struct Registered<'a>(&'a InFlight, u64);

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        if let Ok(mut in_flight) = self.0.lock() {
            in_flight.retain(|(id, _, _)| *id != self.1);
        }
    }
}

/// `line` with the provider block's sensitive settings hidden.
fn scrubbed(mut line: LogLine, hidden: &Mutex<Vec<String>>) -> LogLine {
    let Ok(hidden) = hidden.lock() else {
        return line;
    };
    for secret in hidden.iter() {
        if line.message.contains(secret.as_str()) {
            line.message = line.message.replace(secret.as_str(), "(sensitive)");
        }
    }
    line
}

/// Sends a log line to the operation it is about, or to the bridge's stderr.
fn route(in_flight: &InFlight, line: LogLine, own: &(dyn Fn(Option<&str>, String) + Send + Sync)) {
    let Ok(in_flight) = in_flight.lock() else {
        return;
    };
    let of_type: Vec<_> = match &line.resource_type {
        Some(t) => in_flight.iter().filter(|(_, ty, _)| ty == t).collect(),
        None => Vec::new(),
    };
    let target = match (of_type.as_slice(), in_flight.as_slice()) {
        ([one], _) => Some(&one.2),
        ([], [one]) => Some(&one.2),
        _ => None,
    };
    let line = match target {
        Some(tx) => match tx.send(line) {
            Ok(()) => return,
            Err(e) => e.0,
        },
        None => line,
    };
    // The provider's own: at its level (debug lines show only as RUST_LOG asks), or as is.
    own(line.level, line.message);
}

/// Reports a log line as `op`'s.
async fn emit(op: &Operation, line: LogLine) {
    if line.message.trim().is_empty() {
        return;
    }
    let message = line.message;
    match (line.channel, line.level) {
        (Channel::StdioOut, _) => op.log(LogStream::Stdout, message).await,
        (_, None) => op.log(LogStream::Stderr, message).await,
        // As a bridge process's progress layer did: from `debug` up.
        (_, Some("trace")) => {}
        (_, Some("debug")) => op.event(Level::Debug, message).await,
        (_, Some("info")) => op.event(Level::Info, message).await,
        (_, Some("warn")) => op.event(Level::Warn, message).await,
        (_, Some(_)) => op.event(Level::Error, message).await,
    }
}

fn failure(e: TerraformError) -> OperationError {
    match e {
        TerraformError::Diagnostic {
            summary, detail, ..
        } => OperationError::permanent(summary).with_details(
            detail
                .trim_start_matches(": ")
                .trim_start_matches(' ')
                .to_string(),
        ),
        other => OperationError::transient(other.to_string()),
    }
}

/// The string values of the provider block's settings its schema marks sensitive (and those
/// inside them), at least 4 characters long.
fn config_secrets(schema: &wire::GetProviderSchemaResponse, config: &Value) -> Vec<String> {
    fn strings(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::String(s) if s.chars().count() >= 4 => out.push(s.clone()),
            Value::Array(items) => items.iter().for_each(|i| strings(i, out)),
            Value::Object(map) => map.values().for_each(|i| strings(i, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    let Some(block) = schema.provider.as_ref().and_then(|p| p.block.as_ref()) else {
        return out;
    };
    for a in block.attributes.iter().filter(|a| a.sensitive) {
        if let Some(v) = config.get(&a.name) {
            strings(v, &mut out);
        }
    }
    out
}

/// How long the bridge waits for a Terraform provider's go-plugin handshake line:
/// `CAPSTAN_TERRAFORM_HANDSHAKE_TIMEOUT` seconds, else 20 — well inside the time the core
/// gives the bridge for its own handshake (a minute: `TERRAFORM_BRIDGE_HANDSHAKE` in the
/// engine), so that a program that is no Terraform provider is reported as such, not as a
/// bridge that did not answer.
pub fn handshake_timeout() -> std::time::Duration {
    std::env::var(HANDSHAKE_TIMEOUT_ENV)
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map_or(
            std::time::Duration::from_secs(20),
            std::time::Duration::from_secs_f64,
        )
}

/// Overrides how long the bridge waits for a Terraform provider's handshake line (seconds).
pub const HANDSHAKE_TIMEOUT_ENV: &str = "CAPSTAN_TERRAFORM_HANDSHAKE_TIMEOUT";

/// Starts the provider and reads its schema, and builds the Capstan provider, to be served
/// on the runtime returned (where the provider's process is watched and its logs read).
pub fn provider(
    program: PathBuf,
    config: Value,
) -> Result<(Provider, tokio::runtime::Runtime), TerraformError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let local = tokio::task::LocalSet::new();
    let provider = local.block_on(&runtime, provider_in(program, config, Host::process()))?;
    Ok((provider, runtime))
}

/// Starts the provider and reads its schema, and builds the Capstan provider, on the current
/// runtime (inside a `LocalSet`), hosted as `host` says: [`provider`] for a process of its
/// own, or the bridge served inside the core's process.
pub async fn provider_in(
    program: PathBuf,
    config: Value,
    host: Host,
) -> Result<Provider, TerraformError> {
    let in_flight: InFlight = Arc::default();
    let routes = in_flight.clone();
    // Known once the schema is: the sensitive settings its log lines must not show.
    let hidden: Arc<Mutex<Vec<String>>> = Arc::default();
    let hide = hidden.clone();
    let own = host.own.clone();
    let (plugin, schema) = async {
        let options = StartOptions {
            logs: Some(Arc::new(move |line| {
                route(&routes, scrubbed(line, &hide), &*own)
            })),
            timeout: handshake_timeout(),
            dir: host.dir.clone(),
            spawned: host.spawned.clone(),
            ..StartOptions::default()
        };
        let plugin = Plugin::start_with(&program, options).await?;
        let schema = plugin.schema().await?;
        Ok::<_, TerraformError>((plugin, schema))
    }
    .await?;
    let info = crate::provider_info("terraform", &schema);
    *hidden.lock().expect("not poisoned") = config_secrets(&schema, &config);
    let shared = Rc::new(Shared {
        program: program.clone(),
        config: std::cell::RefCell::new(config),
        schema,
        config_secrets: hidden,
        made_anyway: Default::default(),
        plugin,
        configured: tokio::sync::OnceCell::new(),
        in_flight,
        next_op: Cell::new(0),
        host,
    });
    let at_exit = shared.clone();
    let settings = shared.clone();
    let mut provider = Provider::new("terraform", env!("CARGO_PKG_VERSION"))
        .at_exit(move || async move {
            at_exit.plugin.shutdown().await;
        })
        .on_configure(move |text| {
            // Settings known only during the run (they refer to what it made): they replace
            // those of the environment, before the provider is configured with them.
            if settings.configured.get().is_some() {
                return Err(OperationError::permanent(
                    "the Terraform provider is configured already; it takes its settings once",
                ));
            }
            let config: Value = serde_json::from_str(&text).map_err(|e| {
                OperationError::invalid_input(format!("the settings are not JSON: {e}"))
            })?;
            *settings.config_secrets.lock().expect("not poisoned") =
                config_secrets(&settings.schema, &config);
            *settings.config.borrow_mut() = config;
            Ok(())
        });
    for t in &info.resource_types {
        let data = t.name.starts_with("data.");
        let mut description = ResourceType::new(&t.name)
            .description(format!(
                "Terraform {} `{}` of {}",
                if data { "data source" } else { "resource" },
                t.name,
                program.display()
            ))
            .stateful(!data)
            .read_checks(!data)
            .plans_changes(!data)
            // What a data source reads changes while its configuration does not: declared so,
            // the core runs it again whenever something it waits on changed in the run (as
            // Terraform reads it after what it depends on). Its plan-time read answers what
            // was read, so that a plan is not a change for a data source alone.
            .read_on_plan(data);
        for i in &t.inputs {
            description = if i.required {
                description.required(&i.name, &i.description)
            } else {
                description.optional(&i.name, &i.description)
            };
            if i.sensitive {
                description = description.sensitive(&i.name);
            }
        }
        for o in &t.outputs {
            description = description.output(&o.name, &o.description);
            if o.sensitive {
                description = description.sensitive(&o.name);
            }
        }
        provider = provider.resource_as(
            TfResource {
                name: t.name.clone(),
                shared: SharedRc(shared.clone()),
            },
            description,
        );
    }
    Ok(provider)
}

/// `Rc` marked as the SDK needs (every operation runs on one thread).
struct SharedRc(Rc<Shared>);

struct TfResource {
    name: String,
    shared: SharedRc,
}

/// A recorded state: the provider's attributes, its private bytes and the schema version.
struct Recorded {
    state: Value,
    private: Vec<u8>,
    version: i64,
}

/// A recorded state from a resource's outputs; `current` is the schema version taken for a
/// state made before the version was kept (made with the schema of then: the current one).
fn split(outputs: &Value, current: i64) -> Recorded {
    use base64::Engine;
    let mut state = outputs.clone();
    let object = state.as_object_mut();
    let (private, version) = match object {
        Some(o) => (o.remove(PRIVATE), o.remove(SCHEMA_VERSION)),
        None => (None, None),
    };
    Recorded {
        state,
        private: private
            .and_then(|v| v.as_str().map(str::to_string))
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .unwrap_or_default(),
        version: version.and_then(|v| v.as_i64()).unwrap_or(current),
    }
}

fn join(mut state: Value, private: &[u8], version: i64) -> Value {
    use base64::Engine;
    if let Some(o) = state.as_object_mut() {
        o.insert(
            PRIVATE.into(),
            Value::String(base64::engine::general_purpose::STANDARD.encode(private)),
        );
        o.insert(SCHEMA_VERSION.into(), Value::from(version));
    }
    state
}

impl Shared {
    /// Reports the provider's warnings as the current operation's `warn` events.
    async fn warn(&self, op: &Operation, warnings: Vec<String>) {
        for w in warnings {
            op.event(Level::Warn, self.scrub(&w)).await;
        }
    }
}

impl TfResource {
    /// The recorded state, upgraded to the current schema version if it is older.
    async fn recorded(
        &self,
        op: &Operation,
        plugin: &Plugin,
        outputs: &Value,
    ) -> Result<Recorded, OperationError> {
        let shared = &self.shared.0;
        let current = crate::schema_version(&shared.schema, &self.name);
        let mut recorded = split(outputs, current);
        if recorded.version != current {
            op.phase(format!(
                "upgrade state from schema version {} to {current}",
                recorded.version
            ))
            .await;
            recorded.state = shared
                .traced(op, plugin, &self.name, async |w| {
                    let (schema, name) = (&shared.schema, &self.name);
                    plugin
                        .upgrade(schema, name, recorded.version, &recorded.state, w)
                        .await
                })
                .await
                .map_err(|e| shared.failure(e))?;
            recorded.version = current;
        }
        Ok(recorded)
    }

    /// Deletes what `recorded` describes.
    async fn delete_recorded(
        &self,
        op: &Operation,
        plugin: &Plugin,
        recorded: &Recorded,
    ) -> Result<(), OperationError> {
        let shared = &self.shared.0;
        shared
            .traced(op, plugin, &self.name, async |w| {
                let (state, private) = (&recorded.state, &recorded.private);
                plugin
                    .delete(&shared.schema, &self.name, state, private, w)
                    .await
            })
            .await
            .map_err(|e| shared.failure(e))
    }

    async fn create_new(
        &self,
        op: &Operation,
        plugin: &Plugin,
        inputs: &Value,
    ) -> Result<Value, OperationError> {
        let shared = &self.shared.0;
        let made = shared
            .traced(op, plugin, &self.name, async |w| {
                plugin.create(&shared.schema, &self.name, inputs, w).await
            })
            .await;
        let version = crate::schema_version(&shared.schema, &self.name);
        let (state, private) = match made {
            Ok(made) => made,
            Err(TerraformError::AppliedWithError {
                program,
                summary,
                detail,
                made,
            }) => {
                let (state, private) = *made;
                // Failed, but made: the core's read after a failed create finds it (`find`),
                // and records it tainted, to be replaced (as Terraform core does).
                shared
                    .made_anyway
                    .borrow_mut()
                    .insert(op.address().to_string(), join(state, &private, version));
                return Err(shared.failure(TerraformError::Diagnostic {
                    program,
                    summary,
                    detail,
                }));
            }
            Err(e) => return Err(shared.failure(e)),
        };
        Ok(join(state, &private, version))
    }
}

impl Resource for TfResource {
    type Inputs = Value;
    type Outputs = Value;

    fn resource_type() -> ResourceType {
        // Never used: each type is added with its own description (`resource_as`).
        ResourceType::new("terraform")
    }

    async fn create(&self, op: &Operation, inputs: Value) -> Result<Value, OperationError> {
        let shared = &self.shared.0;
        let plugin = shared.plugin().await?;
        if let Some(data) = self.name.strip_prefix("data.") {
            // A data source is read, never made: each create or update reads it again.
            return shared
                .traced(op, plugin, data, async |w| {
                    plugin.read_data(&shared.schema, data, &inputs, w).await
                })
                .await
                .map_err(|e| shared.failure(e));
        }
        self.create_new(op, plugin, &inputs).await
    }

    async fn update(
        &self,
        op: &Operation,
        prior: Prior<Value, Value>,
        inputs: Value,
    ) -> Result<Value, OperationError> {
        if self.name.starts_with("data.") {
            return self.create(op, inputs).await;
        }
        let shared = &self.shared.0;
        let plugin = shared.plugin().await?;
        let recorded = self.recorded(op, plugin, &prior.outputs).await?;
        let updated = shared
            .traced(op, plugin, &self.name, async |w| {
                let (state, private) = (&recorded.state, &recorded.private);
                plugin
                    .update(&shared.schema, &self.name, state, private, &inputs, w)
                    .await
            })
            .await;
        match updated {
            // Attributes that force a new resource changed: replaced as Terraform does by
            // default, the old one deleted, then the new one created.
            Err(TerraformError::ReplaceRequired { paths, .. }) => {
                op.phase(format!(
                    "replace ({} changed): delete, then create",
                    paths.join(", ")
                ))
                .await;
                self.delete_recorded(op, plugin, &recorded).await?;
                let made = self.create_new(op, plugin, &inputs).await;
                op.replaced();
                made
            }
            Err(other) => Err(failure(other)),
            Ok((state, private)) => Ok(join(state, &private, recorded.version)),
        }
    }

    async fn read(
        &self,
        op: &Operation,
        prior: Prior<Value, Value>,
    ) -> Result<Value, OperationError> {
        if self.name.starts_with("data.") {
            // What was read (see `read_on_plan` above): a data source is read by its create
            // and update.
            return Ok(prior.outputs);
        }
        let shared = &self.shared.0;
        let plugin = shared.plugin().await?;
        let recorded = self.recorded(op, plugin, &prior.outputs).await?;
        let read = shared
            .traced(op, plugin, &self.name, async |w| {
                let (state, private) = (&recorded.state, &recorded.private);
                plugin
                    .read(&shared.schema, &self.name, state, private, w)
                    .await
            })
            .await;
        match read.map_err(|e| shared.failure(e))? {
            // Unchanged: as recorded (a provider's read may answer other private bytes for
            // the same resource, which is no change of it).
            Some((now, _)) if now == recorded.state => Ok(prior.outputs),
            // Changed: as read, with the private bytes the read answered (as Terraform core
            // keeps them), or the recorded ones when it answered none.
            Some((now, private)) if private.is_empty() => {
                Ok(join(now, &recorded.private, recorded.version))
            }
            Some((now, private)) => Ok(join(now, &private, recorded.version)),
            None => Err(OperationError::not_found(format!(
                "its Terraform provider no longer finds this `{}`",
                self.name
            ))),
        }
    }

    async fn find(&self, op: &Operation, _inputs: Value) -> Result<Value, OperationError> {
        // A Terraform provider cannot find a resource from its configuration; what a failed
        // create of this run made (Apply answered its state) is known.
        match self.shared.0.made_anyway.borrow_mut().remove(op.address()) {
            Some(made) => Ok(made),
            None => Err(OperationError::permanent(
                "a Terraform provider cannot find a resource from its configuration alone",
            )),
        }
    }

    async fn plan(
        &self,
        prior: Option<Prior<Value, Value>>,
        inputs: Value,
    ) -> Result<Planned, OperationError> {
        let shared = &self.shared.0;
        let plugin = shared.plugin().await?;
        let mut warnings = Vec::new();
        let recorded = match prior {
            None => None,
            Some(prior) => {
                let mut recorded = split(
                    &prior.outputs,
                    crate::schema_version(&shared.schema, &self.name),
                );
                let current = crate::schema_version(&shared.schema, &self.name);
                if recorded.version != current {
                    recorded.state = plugin
                        .upgrade(
                            &shared.schema,
                            &self.name,
                            recorded.version,
                            &recorded.state,
                            &mut warnings,
                        )
                        .await
                        .map_err(|e| shared.failure(e))?;
                }
                Some(recorded)
            }
        };
        let planned = plugin
            .plan(
                &shared.schema,
                &self.name,
                recorded.as_ref().map(|r| (&r.state, r.private.as_slice())),
                &inputs,
                &mut warnings,
            )
            .await
            .map_err(|e| shared.failure(e))?;
        for w in warnings {
            (shared.host.own)(
                Some("warn"),
                format!("{}: warning: {}", self.name, shared.scrub(&w)),
            );
        }
        Ok(Planned {
            outputs: planned.state,
            unknown: planned.unknown,
            replace: planned.replace,
        })
    }

    async fn delete(
        &self,
        op: &Operation,
        prior: Prior<Value, Value>,
    ) -> Result<(), OperationError> {
        if self.name.starts_with("data.") {
            // Nothing was made.
            return Ok(());
        }
        let shared = &self.shared.0;
        let plugin = shared.plugin().await?;
        let recorded = self.recorded(op, plugin, &prior.outputs).await?;
        self.delete_recorded(op, plugin, &recorded).await
    }
}
