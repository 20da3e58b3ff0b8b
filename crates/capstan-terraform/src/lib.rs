//! Terraform providers, unchanged, as seen by Capstan. This crate starts a provider binary as
//! HashiCorp's go-plugin does (the magic cookie, the protocol versions, the handshake line on
//! its stdout, gRPC over the unix socket or loopback TCP it names) and reads its schema
//! (`GetProviderSchema`), mapped to Capstan resource types: what `capstan provider describe
//! --terraform` shows. Protocols 5 (the older SDK: most providers) and 6 (the plugin
//! framework) are both spoken; the plugin picks.
//!
//! AutoMTLS as go-plugin does it: a client certificate made for the run is handed over in
//! `PLUGIN_CLIENT_CERT`, and the server certificate the handshake line carries is trusted for
//! that connection only (P-521 included: rustls with aws-lc-rs).
//!
//! The life cycle as Terraform core drives it: `ValidateProviderConfig` and
//! `ConfigureProvider`; a create or update is `ValidateResourceConfig`, `PlanResourceChange`
//! (with the proposed new state core would compute) then `ApplyResourceChange`; a read is
//! `ReadResource` (null: gone); a delete applies a null planned state; a state recorded with an
//! older schema version goes through `UpgradeResourceState` first; `provider_meta` is sent
//! whenever the schema declares one. Values travel in MessagePack shaped by the schema
//! (`values`). Error diagnostics are errors (with their attribute path); warnings are handed
//! back to the caller. The plugin's stderr and its `GRPCStdio` stream are handed, line by
//! line, to a [`LogSink`].
//!
//! [`bridge`] serves all this as a Capstan provider in deployments (a change that requires
//! replacing is a delete, then a create; data sources are read with `ReadDataSource`).

#![forbid(unsafe_code)]

mod info;
mod logs;
mod startup;
mod tls;

pub mod bridge;
#[doc(hidden)]
pub mod values;
pub mod wire;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use capstan_schema::info::{InputInfo, OutputInfo};
use capstan_schema::{ProviderInfo, ResourceTypeInfo};
use tokio::io::{AsyncBufReadExt, AsyncReadExt};

pub use info::{describe, provider_info, schema_version};
pub use logs::{Channel, LogLine, LogSink};
pub use startup::{Handshake, Spawned, StartOptions};

/// go-plugin's magic cookie for Terraform providers: without it a provider prints a message for
/// humans and exits.
const MAGIC_COOKIE_KEY: &str = "TF_PLUGIN_MAGIC_COOKIE";
const MAGIC_COOKIE_VALUE: &str = "d602bf8f470bc67ca7faa0386276bbdd4330efaf76d1a219cb4d6991ca9872b2";

/// The tfplugin versions this crate speaks (go-plugin's `PLUGIN_PROTOCOL_VERSIONS`: the plugin
/// picks the highest it speaks too).
const PROTOCOLS: &str = "5,6";

/// Why a Terraform provider could not be started or read.
#[derive(Debug, thiserror::Error)]
pub enum TerraformError {
    #[error("cannot start {program}: {error}")]
    Spawn {
        program: PathBuf,
        error: std::io::Error,
    },
    #[error(
        "{program} exited ({status}) without printing go-plugin's handshake line \
         (CORE|PROTOCOL|NETWORK|ADDRESS|grpc|CERT): is it a Terraform provider?{tail}"
    )]
    NoHandshake {
        program: PathBuf,
        status: String,
        tail: String,
    },
    #[error(
        "{program} printed no go-plugin handshake line within {after:?}; a Terraform provider \
         prints one at once (is it one?)"
    )]
    HandshakeTimeout { program: PathBuf, after: Duration },
    #[error(
        "{program} printed `{line}` where go-plugin's handshake line \
         (CORE|PROTOCOL|NETWORK|ADDRESS|grpc|CERT) was expected"
    )]
    BadHandshake { program: PathBuf, line: String },
    #[error(
        "{program} speaks Terraform plugin protocol {version}; Capstan speaks 5 and 6 (a \
         provider built for Terraform 0.12 or later speaks one of them)"
    )]
    Protocol { program: PathBuf, version: String },
    #[error("{program} listens on {network} {address}, which Capstan does not connect to: {why}")]
    Address {
        program: PathBuf,
        network: String,
        address: String,
        why: &'static str,
    },
    #[error("{program}: gRPC: {0}", program = .1.display())]
    Grpc(String, PathBuf),
    /// The call got no answer (the connection failed, or the plugin died): whether it took
    /// effect is unknown.
    #[error("{program}: no answer: {0}", program = .1.display())]
    Transport(String, PathBuf),
    /// `ApplyResourceChange` failed but answered a state: the resource exists (partly made),
    /// as Terraform core records it (tainted).
    #[error("{program}: {summary}{detail}", program = .program.display())]
    AppliedWithError {
        program: PathBuf,
        summary: String,
        detail: String,
        /// What exists: its state and private bytes.
        made: Box<(serde_json::Value, Vec<u8>)>,
    },
    /// A change of attributes that force a new resource: the caller replaces it.
    #[error(
        "{program}: changing {paths} of the `{type_name}` requires replacing it",
        program = .program.display(),
        paths = .paths.join(", ")
    )]
    ReplaceRequired {
        program: PathBuf,
        type_name: String,
        /// The attributes whose change forces it, as Terraform writes them.
        paths: Vec<String>,
    },
    #[error("{program}: {summary}{detail}", program = .program.display())]
    Diagnostic {
        program: PathBuf,
        summary: String,
        /// `: ` and the diagnostic's detail, with its attribute path (or nothing).
        detail: String,
    },
}

/// A running Terraform provider: its process and a gRPC channel to it.
pub struct Plugin {
    pub(crate) program: PathBuf,
    /// Its exit status, once it exited.
    pub(crate) exit: tokio::sync::watch::Receiver<Option<String>>,
    /// Kills it.
    pub(crate) kill: std::sync::Arc<tokio::sync::Notify>,
    /// Whether [`Plugin::shutdown`] was called (its exit is then expected).
    pub(crate) shutting_down: std::sync::atomic::AtomicBool,
    pub(crate) channel: tonic::transport::Channel,
    pub handshake: Handshake,
    /// The protocol it speaks.
    pub protocol: wire::Protocol,
    /// Whether the connection is mutual TLS.
    pub tls: bool,
    /// Whether a `StopProvider` is being sent.
    pub(crate) stopped: std::sync::atomic::AtomicBool,
}

impl Plugin {
    /// `GetProviderSchema`: the provider's resource and data source types.
    pub async fn schema(&self) -> Result<wire::GetProviderSchemaResponse, TerraformError> {
        let response: wire::GetProviderSchemaResponse = self
            .unary(
                wire::Method::GetProviderSchema,
                wire::GetProviderSchemaRequest {},
            )
            .await?;
        self.errors(&response.diagnostics, &mut Vec::new())?;
        Ok(response)
    }

    /// `ValidateProviderConfig` (protocol 5: `PrepareProviderConfig`, whose prepared
    /// configuration is the one used), then `ConfigureProvider`: once per run, with the
    /// provider block's configuration (JSON).
    pub async fn configure(
        &self,
        schema: &wire::GetProviderSchemaResponse,
        config: &serde_json::Value,
        warnings: &mut Vec<String>,
    ) -> Result<(), TerraformError> {
        let block = schema
            .provider
            .as_ref()
            .and_then(|s| s.block.clone())
            .unwrap_or_default();
        // A key the provider block does not have is a typo, never data to drop.
        let known: Vec<&str> = block
            .attributes
            .iter()
            .map(|a| a.name.as_str())
            .chain(block.block_types.iter().map(|b| b.type_name.as_str()))
            .collect();
        if let Some(unknown) = config
            .as_object()
            .and_then(|c| c.keys().find(|k| !known.contains(&k.as_str())))
        {
            return Err(TerraformError::Diagnostic {
                program: self.program.clone(),
                summary: format!("the provider's `config` has no setting `{unknown}`"),
                detail: if known.is_empty() {
                    ": it takes none".into()
                } else {
                    format!(": it takes {}", known.join(", "))
                },
            });
        }
        let mut config = values::dynamic(&self.config_of(&block, config)?);
        let validated: wire::ValidateProviderConfigResponse = self
            .unary(
                wire::Method::ValidateProviderConfig,
                wire::ValidateProviderConfigRequest {
                    config: Some(config.clone()),
                },
            )
            .await?;
        self.errors(&validated.diagnostics, warnings)?;
        if let Some(prepared) = validated.prepared_config {
            if !prepared.msgpack.is_empty() || !prepared.json.is_empty() {
                config = prepared;
            }
        }
        let response: wire::ConfigureResponse = self
            .unary(
                wire::Method::ConfigureProvider,
                wire::ConfigureRequest {
                    terraform_version: "1.0.3".into(),
                    config: Some(config),
                },
            )
            .await?;
        self.errors(&response.diagnostics, warnings)
    }

    /// `ValidateResourceConfig` (or, for a data source, `ValidateDataResourceConfig`) of a
    /// configuration in MessagePack.
    async fn validate(
        &self,
        type_name: &str,
        data: bool,
        config: &rmpv::Value,
        warnings: &mut Vec<String>,
    ) -> Result<(), TerraformError> {
        let method = if data {
            wire::Method::ValidateDataResourceConfig
        } else {
            wire::Method::ValidateResourceConfig
        };
        let validated: wire::ValidateConfigResponse = self
            .unary(
                method,
                wire::ValidateConfigRequest {
                    type_name: type_name.to_string(),
                    config: Some(values::dynamic(config)),
                },
            )
            .await?;
        self.errors(&validated.diagnostics, warnings)
    }

    /// Creates a resource of `type_name` from its configuration (JSON): validates and plans
    /// it, then applies the plan. Returns its state (JSON: every attribute) and the provider's
    /// private bytes.
    pub async fn create(
        &self,
        schema: &wire::GetProviderSchemaResponse,
        type_name: &str,
        config: &serde_json::Value,
        warnings: &mut Vec<String>,
    ) -> Result<(serde_json::Value, Vec<u8>), TerraformError> {
        self.plan_and_apply(schema, type_name, None, config, warnings)
            .await
    }

    /// Changes a resource (its state and private bytes) to match a new configuration: plans
    /// from its prior state, then applies. A plan that requires replacing it is
    /// [`TerraformError::ReplaceRequired`].
    pub async fn update(
        &self,
        schema: &wire::GetProviderSchemaResponse,
        type_name: &str,
        prior: &serde_json::Value,
        private: &[u8],
        config: &serde_json::Value,
        warnings: &mut Vec<String>,
    ) -> Result<(serde_json::Value, Vec<u8>), TerraformError> {
        self.plan_and_apply(schema, type_name, Some((prior, private)), config, warnings)
            .await
    }

    /// Plans a create (`prior` is `None`) or an update of a resource (its state and private
    /// bytes) to a new configuration, applying nothing: `ValidateResourceConfig`, then
    /// `PlanResourceChange`. When the update requires replacing it, the attributes that force
    /// that are named and the new resource's plan is the one returned (as Terraform shows).
    pub async fn plan(
        &self,
        schema: &wire::GetProviderSchemaResponse,
        type_name: &str,
        prior: Option<(&serde_json::Value, &[u8])>,
        config: &serde_json::Value,
        warnings: &mut Vec<String>,
    ) -> Result<Planned, TerraformError> {
        let (mut plan, replace) = self
            .validate_and_plan(schema, type_name, prior, config, warnings)
            .await?;
        if !replace.is_empty() {
            // What replaces it: planned as a create.
            plan = self
                .validate_and_plan(schema, type_name, None, config, warnings)
                .await?
                .0;
        }
        let state = values::from_dynamic(plan.response.planned_state.as_ref())
            .map_err(|e| TerraformError::Grpc(format!("its plan: {e}"), self.program.clone()))?;
        let unknown = match &state {
            rmpv::Value::Map(entries) => entries
                .iter()
                .filter(|(_, v)| values::has_unknown(v))
                .filter_map(|(k, _)| k.as_str().map(str::to_string))
                .collect(),
            _ => Vec::new(),
        };
        Ok(Planned {
            state: values::decode(&state),
            unknown,
            replace,
        })
    }

    /// `ValidateResourceConfig`, then `PlanResourceChange` with the proposed new state
    /// Terraform core computes from the prior state (none: a create) and the configuration.
    /// Also returns the attributes whose change forces a new resource (never for a create:
    /// providers report those attributes then too, and core ignores them).
    async fn validate_and_plan(
        &self,
        schema: &wire::GetProviderSchemaResponse,
        type_name: &str,
        prior: Option<(&serde_json::Value, &[u8])>,
        config: &serde_json::Value,
        warnings: &mut Vec<String>,
    ) -> Result<(PlannedChange, Vec<String>), TerraformError> {
        let block = self.block(schema, type_name)?;
        let config = self.config_of(block, config)?;
        self.validate(type_name, false, &config, warnings).await?;
        let (prior, prior_private) = match prior {
            Some((state, private)) => (
                values::encode(&values::block_type(block), state),
                private.to_vec(),
            ),
            None => (rmpv::Value::Nil, Vec::new()),
        };
        let proposed = values::proposed_new(block, &prior, &config);
        let response: wire::PlanResourceChangeResponse = self
            .unary(
                wire::Method::PlanResourceChange,
                wire::PlanResourceChangeRequest {
                    type_name: type_name.to_string(),
                    prior_state: Some(values::dynamic(&prior)),
                    proposed_new_state: Some(values::dynamic(&proposed)),
                    config: Some(values::dynamic(&config)),
                    prior_private,
                    provider_meta: provider_meta(schema),
                },
            )
            .await?;
        self.errors(&response.diagnostics, warnings)?;
        let replace = if prior.is_nil() {
            Vec::new()
        } else {
            forcing(&response, &prior)
        };
        Ok((
            PlannedChange {
                response,
                prior,
                config,
            },
            replace,
        ))
    }

    /// [`validate_and_plan`](Self::validate_and_plan), then `ApplyResourceChange` of that
    /// plan: the new state (JSON) and private bytes. A change that requires replacing the
    /// resource is [`TerraformError::ReplaceRequired`], before anything is applied.
    async fn plan_and_apply(
        &self,
        schema: &wire::GetProviderSchemaResponse,
        type_name: &str,
        prior: Option<(&serde_json::Value, &[u8])>,
        config: &serde_json::Value,
        warnings: &mut Vec<String>,
    ) -> Result<(serde_json::Value, Vec<u8>), TerraformError> {
        let (plan, paths) = self
            .validate_and_plan(schema, type_name, prior, config, warnings)
            .await?;
        if !paths.is_empty() {
            return Err(TerraformError::ReplaceRequired {
                program: self.program.clone(),
                type_name: type_name.to_string(),
                paths,
            });
        }
        let PlannedChange {
            response: plan,
            prior,
            config,
        } = plan;
        let (prior, config) = (values::dynamic(&prior), values::dynamic(&config));
        let applied: wire::ApplyResourceChangeResponse = self
            .unary(
                wire::Method::ApplyResourceChange,
                wire::ApplyResourceChangeRequest {
                    type_name: type_name.to_string(),
                    prior_state: Some(prior),
                    planned_state: plan.planned_state,
                    config: Some(config),
                    planned_private: plan.planned_private,
                    provider_meta: provider_meta(schema),
                },
            )
            .await?;
        if let Err(error) = self.errors(&applied.diagnostics, warnings) {
            // Made in part: the state it answered says what exists.
            if let (
                TerraformError::Diagnostic {
                    summary, detail, ..
                },
                Ok(Some(state)),
            ) = (&error, self.state_of(applied.new_state.as_ref()))
            {
                return Err(TerraformError::AppliedWithError {
                    program: self.program.clone(),
                    summary: summary.clone(),
                    detail: detail.clone(),
                    made: Box::new((state, applied.private)),
                });
            }
            return Err(error);
        }
        let state = self.state_of(applied.new_state.as_ref())?;
        Ok((state.unwrap_or_default(), applied.private))
    }

    /// `ReadResource`: the resource as it is now (and its private bytes), or `None` when it
    /// is gone.
    pub async fn read(
        &self,
        schema: &wire::GetProviderSchemaResponse,
        type_name: &str,
        state: &serde_json::Value,
        private: &[u8],
        warnings: &mut Vec<String>,
    ) -> Result<Option<(serde_json::Value, Vec<u8>)>, TerraformError> {
        let block = self.block(schema, type_name)?;
        let current = values::encode(&values::block_type(block), state);
        let read: wire::ReadResourceResponse = self
            .unary(
                wire::Method::ReadResource,
                wire::ReadResourceRequest {
                    type_name: type_name.to_string(),
                    current_state: Some(values::dynamic(&current)),
                    private: private.to_vec(),
                    provider_meta: provider_meta(schema),
                },
            )
            .await?;
        self.errors(&read.diagnostics, warnings)?;
        // As Terraform core: the private bytes are those the read answered.
        Ok(self
            .state_of(read.new_state.as_ref())?
            .map(|state| (state, read.private)))
    }

    /// `ReadDataSource`: what the data source `type_name` (without `data.`) reads for its
    /// configuration (computed attributes unknown in the request, known in the answer).
    pub async fn read_data(
        &self,
        schema: &wire::GetProviderSchemaResponse,
        type_name: &str,
        config: &serde_json::Value,
        warnings: &mut Vec<String>,
    ) -> Result<serde_json::Value, TerraformError> {
        let block = schema
            .data_source_schemas
            .get(type_name)
            .and_then(|s| s.block.clone())
            .ok_or_else(|| TerraformError::Diagnostic {
                program: self.program.clone(),
                summary: format!("no data source `{type_name}`"),
                detail: String::new(),
            })?;
        let config = self.config_of(&block, config)?;
        self.validate(type_name, true, &config, warnings).await?;
        let read: wire::ReadDataSourceResponse = self
            .unary(
                wire::Method::ReadDataSource,
                wire::ReadDataSourceRequest {
                    type_name: type_name.to_string(),
                    config: Some(values::dynamic(&config)),
                    provider_meta: provider_meta(schema),
                },
            )
            .await?;
        self.errors(&read.diagnostics, warnings)?;
        Ok(self.state_of(read.state.as_ref())?.unwrap_or_default())
    }

    /// Deletes a resource: applies a plan whose new state is null.
    pub async fn delete(
        &self,
        schema: &wire::GetProviderSchemaResponse,
        type_name: &str,
        state: &serde_json::Value,
        private: &[u8],
        warnings: &mut Vec<String>,
    ) -> Result<(), TerraformError> {
        let block = self.block(schema, type_name)?;
        let prior = values::encode(&values::block_type(block), state);
        let applied: wire::ApplyResourceChangeResponse = self
            .unary(
                wire::Method::ApplyResourceChange,
                wire::ApplyResourceChangeRequest {
                    type_name: type_name.to_string(),
                    prior_state: Some(values::dynamic(&prior)),
                    planned_state: Some(values::dynamic(&rmpv::Value::Nil)),
                    config: Some(values::dynamic(&rmpv::Value::Nil)),
                    planned_private: private.to_vec(),
                    provider_meta: provider_meta(schema),
                },
            )
            .await?;
        self.errors(&applied.diagnostics, warnings)
    }

    /// `UpgradeResourceState`: a state recorded (as JSON) with schema `version` of the type,
    /// as the current schema has it. A state of the current version is returned as it is.
    pub async fn upgrade(
        &self,
        schema: &wire::GetProviderSchemaResponse,
        type_name: &str,
        version: i64,
        state: &serde_json::Value,
        warnings: &mut Vec<String>,
    ) -> Result<serde_json::Value, TerraformError> {
        let current = schema_version(schema, type_name);
        if version == current {
            return Ok(state.clone());
        }
        if version > current {
            return Err(TerraformError::Diagnostic {
                program: self.program.clone(),
                summary: format!(
                    "the recorded `{type_name}` was made with schema version {version}, newer than this provider's {current}"
                ),
                detail: ": use the provider version that made it (or newer)".into(),
            });
        }
        self.upgrade_state(type_name, version, state, warnings)
            .await
    }

    /// `UpgradeResourceState` itself, whatever the versions (Terraform core calls it for every
    /// state it reads; Capstan only when the version moved).
    pub async fn upgrade_state(
        &self,
        type_name: &str,
        version: i64,
        state: &serde_json::Value,
        warnings: &mut Vec<String>,
    ) -> Result<serde_json::Value, TerraformError> {
        let upgraded: wire::UpgradeResourceStateResponse = self
            .unary(
                wire::Method::UpgradeResourceState,
                wire::UpgradeResourceStateRequest {
                    type_name: type_name.to_string(),
                    version,
                    raw_state: Some(wire::RawState {
                        json: serde_json::to_vec(state).expect("JSON"),
                        flatmap: Default::default(),
                    }),
                },
            )
            .await?;
        self.errors(&upgraded.diagnostics, warnings)?;
        Ok(self
            .state_of(upgraded.upgraded_state.as_ref())?
            .unwrap_or_default())
    }

    /// `StopProvider`: asks the plugin to stop what it is doing (every operation in it, as
    /// Terraform asks on an interrupt). Sent for each cancellation (providers re-arm after
    /// one), not again while one is being sent.
    pub async fn stop_operations(&self) {
        if self.stopped.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            self.unary::<wire::Empty, wire::StopProviderResponse>(
                wire::Method::StopProvider,
                wire::Empty {},
            ),
        )
        .await;
        self.stopped
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// A configuration (JSON) encoded for the plugin, checked against its block's schema.
    fn config_of(
        &self,
        block: &wire::Block,
        config: &serde_json::Value,
    ) -> Result<rmpv::Value, TerraformError> {
        values::encode_config(block, config).map_err(|why| TerraformError::Diagnostic {
            program: self.program.clone(),
            summary: why,
            detail: String::new(),
        })
    }

    fn block<'s>(
        &self,
        schema: &'s wire::GetProviderSchemaResponse,
        type_name: &str,
    ) -> Result<&'s wire::Block, TerraformError> {
        schema
            .resource_schemas
            .get(type_name)
            .and_then(|s| s.block.as_ref())
            .ok_or_else(|| TerraformError::Diagnostic {
                program: self.program.clone(),
                summary: format!("no resource type `{type_name}`"),
                detail: String::new(),
            })
    }

    /// A state the plugin answered with, as JSON; `None` for a null one.
    fn state_of(
        &self,
        value: Option<&wire::DynamicValue>,
    ) -> Result<Option<serde_json::Value>, TerraformError> {
        let value = values::from_dynamic(value)
            .map_err(|e| TerraformError::Grpc(format!("its state: {e}"), self.program.clone()))?;
        Ok((!value.is_nil()).then(|| values::decode(&value)))
    }

    /// The first error among `diagnostics`; the warnings among them are added to
    /// `warnings` (they are not failures).
    fn errors(
        &self,
        diagnostics: &[wire::Diagnostic],
        warnings: &mut Vec<String>,
    ) -> Result<(), TerraformError> {
        for warning in diagnostics.iter().filter(|d| d.severity == 2) {
            warnings.push(format!("{}{}", warning.summary, detail_of(warning)));
        }
        match diagnostics.iter().find(|d| d.severity == 1) {
            None => Ok(()),
            Some(error) => Err(TerraformError::Diagnostic {
                program: self.program.clone(),
                summary: error.summary.clone(),
                detail: detail_of(error),
            }),
        }
    }

    async fn unary<Q, R>(&self, method: wire::Method, request: Q) -> Result<R, TerraformError>
    where
        Q: prost::Message + Send + Sync + 'static,
        R: prost::Message + Default + Send + Sync + 'static,
    {
        let grpc_error = |e: String| TerraformError::Grpc(e, self.program.clone());
        let mut grpc =
            tonic::client::Grpc::new(self.channel.clone()).max_decoding_message_size(256 << 20);
        grpc.ready().await.map_err(|e| grpc_error(e.to_string()))?;
        let response = grpc
            .unary(
                tonic::Request::new(request),
                tonic::codegen::http::uri::PathAndQuery::from_static(self.protocol.path(method)),
                tonic::codec::ProstCodec::default(),
            )
            .await
            .map_err(|status| {
                use tonic::Code;
                match status.code() {
                    // No answer from the provider's code: the connection or the process failed.
                    Code::Unavailable
                    | Code::Unknown
                    | Code::Cancelled
                    | Code::DeadlineExceeded => TerraformError::Transport(
                        status.message().to_string(),
                        self.program.clone(),
                    ),
                    _ => grpc_error(status.message().to_string()),
                }
            })?;
        Ok(response.into_inner())
    }

    /// The gRPC channel to the plugin, for calls Capstan does not make itself (go-plugin's
    /// broker, say).
    pub fn channel(&self) -> tonic::transport::Channel {
        self.channel.clone()
    }

    /// Whether [`Plugin::shutdown`] was called.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The plugin's program.
    pub fn program(&self) -> &Path {
        &self.program
    }

    /// Waits until the plugin process exits when nobody asked it to (it crashed, or was
    /// killed from outside), and says how it ended. Never returns after [`Plugin::shutdown`].
    pub async fn unexpected_exit(&self) -> String {
        let mut exit = self.exit.clone();
        let status = match exit.wait_for(|s| s.is_some()).await {
            Ok(status) => status.clone().unwrap_or_default(),
            Err(_) => "gone".to_string(),
        };
        if self.shutting_down.load(std::sync::atomic::Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        status
    }

    /// Asks the plugin to exit (go-plugin's `GRPCController.Shutdown`), then makes sure it did:
    /// killed after two seconds.
    pub async fn shutdown(&self) {
        self.shutting_down
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.unary::<wire::Empty, wire::Empty>(wire::Method::Shutdown, wire::Empty {}),
        )
        .await;
        let mut exit = self.exit.clone();
        if tokio::time::timeout(Duration::from_secs(2), exit.wait_for(|s| s.is_some()))
            .await
            .is_err()
        {
            self.kill.notify_one();
            let _ = exit.wait_for(|s| s.is_some()).await;
        }
    }

    /// Kills the plugin now (it was lost: it stopped answering), without asking it first.
    pub fn kill(&self) {
        self.shutting_down
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.kill.notify_one();
    }

    /// [`Plugin::shutdown`], taking it.
    pub async fn stop(self) {
        self.shutdown().await
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        // The process never outlives its handle.
        self.kill.notify_one();
    }
}

/// The attributes among a plan's `requires_replace` whose value changes from `prior` to the
/// planned state (or is not known yet), as Terraform core counts them: a provider may name
/// attributes that would force a new resource if they changed (the old SDK names `id`).
fn forcing(plan: &wire::PlanResourceChangeResponse, prior: &rmpv::Value) -> Vec<String> {
    let planned = values::from_dynamic(plan.planned_state.as_ref()).unwrap_or(rmpv::Value::Nil);
    plan.requires_replace
        .iter()
        .filter(|path| {
            let before = values::at_path(prior, path);
            let after = values::at_path(&planned, path);
            // As JSON: maps compare whatever their order, and missing is null.
            let json = |v: Option<&rmpv::Value>| v.map_or(serde_json::Value::Null, values::decode);
            after.is_some_and(values::has_unknown) || json(before) != json(after)
        })
        .map(|path| path.to_string())
        .collect()
}

/// A `PlanResourceChange` answer, with the prior state and configuration it was asked for.
struct PlannedChange {
    response: wire::PlanResourceChangeResponse,
    prior: rmpv::Value,
    config: rmpv::Value,
}

/// A planned create or update ([`Plugin::plan`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Planned {
    /// Every attribute as planned; those not known until applied are null.
    pub state: serde_json::Value,
    /// The attributes (top-level) holding a value not known until applied.
    pub unknown: Vec<String>,
    /// For an update: the attributes whose change forces a new resource.
    pub replace: Vec<String>,
}

/// A diagnostic's detail and attribute path, as `: …` (or nothing).
fn detail_of(d: &wire::Diagnostic) -> String {
    let path = d
        .attribute
        .as_ref()
        .map(|p| p.to_string())
        .filter(|p| !p.is_empty());
    match (d.detail.is_empty(), path) {
        (true, None) => String::new(),
        (false, None) => format!(": {}", d.detail),
        (true, Some(path)) => format!(" (at `{path}`)"),
        (false, Some(path)) => format!(" (at `{path}`): {}", d.detail),
    }
}

/// `provider_meta` as Terraform sends it when the schema declares one and the deployment sets
/// none: an object of nulls.
fn provider_meta(schema: &wire::GetProviderSchemaResponse) -> Option<wire::DynamicValue> {
    let block = schema.provider_meta.as_ref()?.block.as_ref()?;
    Some(values::dynamic(&values::encode(
        &values::block_type(block),
        &serde_json::json!({}),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_are_read_in_hclog_json_or_plain() {
        let json = LogLine::parse(
            Channel::Stderr,
            r#"{"@level":"debug","@message":"Calling downstream","@module":"sdk.proto","tf_resource_type":"null_resource","tf_rpc":"ApplyResourceChange"}"#,
        );
        assert_eq!(json.level, Some("debug"));
        assert_eq!(json.message, "Calling downstream");
        assert_eq!(json.resource_type.as_deref(), Some("null_resource"));
        let plain = LogLine::parse(
            Channel::Stderr,
            "2026-11-29T10:00:00.000Z [WARN]  provider: something odd\n",
        );
        assert_eq!(plain.level, Some("warn"));
        assert_eq!(
            plain.message,
            "2026-11-29T10:00:00.000Z [WARN]  provider: something odd"
        );
        let bare = LogLine::parse(Channel::StdioOut, "step 3 of 10 [done]");
        assert_eq!(bare.level, None, "a bracket that is no level is no level");
        assert_eq!(bare.resource_type, None);
        // JSON that is not hclog's is a plain line.
        let other = LogLine::parse(Channel::Stderr, r#"{"a":1}"#);
        assert_eq!(other.message, r#"{"a":1}"#);
    }

    #[test]
    fn handshake_lines_are_read_or_refused() {
        let h = Handshake::parse("1|5|unix|/tmp/plugin123|grpc|\n").unwrap();
        assert_eq!(h.protocol, "5");
        assert_eq!(h.network, "unix");
        assert_eq!(h.address, "/tmp/plugin123");
        assert_eq!(h.server_cert, "");
        let h = Handshake::parse("1|6|tcp|127.0.0.1:10000|grpc|MIIB").unwrap();
        assert_eq!(h.server_cert, "MIIB");
        assert!(Handshake::parse("This binary is a plugin. These are not meant").is_none());
        assert!(Handshake::parse("1|5|unix|/tmp/x|netrpc|").is_none());
        assert!(Handshake::parse("2|5|unix|/tmp/x|grpc|").is_none());
    }
}
