//! Terraform providers, unchanged, as seen by Capstan. This crate starts a provider binary as
//! HashiCorp's go-plugin does (the magic cookie, the protocol versions, the handshake line on
//! its stdout, gRPC over the unix socket or loopback TCP it names) and reads its schema
//! (`GetSchema`, protocol 5), mapped to Capstan resource types: what `capstan provider
//! describe --terraform` shows.
//!
//! AutoMTLS as go-plugin does it: a client certificate made for the run is handed over in
//! `PLUGIN_CLIENT_CERT`, and the server certificate the handshake line carries is trusted for
//! that connection only (P-521 included: rustls with aws-lc-rs).
//!
//! The life cycle as Terraform core drives it: `Configure`; a create is `PlanResourceChange`
//! (with the proposed new state core would compute) then `ApplyResourceChange`; a read is
//! `ReadResource` (null: gone); a delete applies a null planned state. Values travel in
//! MessagePack shaped by the schema (`values`).
//!
//! [`bridge`] serves all this as a Capstan provider in deployments (a change that requires
//! replacing is a delete, then a create; data sources are read with `ReadDataSource`). Not yet:
//! `UpgradeResourceState`, protocol 6.

mod tls;

pub mod bridge;
#[doc(hidden)]
pub mod fetch;
pub mod values;
pub mod wire;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use capstan_schema::info::{InputInfo, OutputInfo};
use capstan_schema::{ProviderInfo, ResourceTypeInfo};
use tokio::io::{AsyncBufReadExt, AsyncReadExt};

/// go-plugin's magic cookie for Terraform providers: without it a provider prints a message for
/// humans and exits.
const MAGIC_COOKIE_KEY: &str = "TF_PLUGIN_MAGIC_COOKIE";
const MAGIC_COOKIE_VALUE: &str = "d602bf8f470bc67ca7faa0386276bbdd4330efaf76d1a219cb4d6991ca9872b2";

/// The tfplugin versions this crate speaks.
const PROTOCOLS: &str = "5";

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
        "{program} speaks Terraform plugin protocol {version}; Capstan speaks {PROTOCOLS} so far"
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
    /// A change of attributes that force a new resource: the caller replaces it.
    #[error("{program}: changing the `{type_name}` requires replacing it", program = .program.display())]
    ReplaceRequired { program: PathBuf, type_name: String },
    #[error("{program}: {summary}{detail}", program = .program.display())]
    Diagnostic {
        program: PathBuf,
        summary: String,
        detail: String,
    },
}

/// go-plugin's handshake line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handshake {
    pub core_version: String,
    pub protocol: String,
    pub network: String,
    pub address: String,
    pub server_cert: String,
}

impl Handshake {
    /// Reads `CORE|APP|NETWORK|ADDRESS|PROTOCOL|CERT` (the certificate may be absent).
    pub fn parse(line: &str) -> Option<Handshake> {
        let fields: Vec<&str> = line.trim().split('|').collect();
        if !(5..=6).contains(&fields.len()) || fields[0] != "1" || fields[4] != "grpc" {
            return None;
        }
        Some(Handshake {
            core_version: fields[0].to_string(),
            protocol: fields[1].to_string(),
            network: fields[2].to_string(),
            address: fields[3].to_string(),
            server_cert: fields.get(5).unwrap_or(&"").to_string(),
        })
    }
}

/// A running Terraform provider: its process and a gRPC channel to it.
pub struct Plugin {
    program: PathBuf,
    child: tokio::process::Child,
    channel: tonic::transport::Channel,
    pub handshake: Handshake,
    /// Whether the connection is mutual TLS.
    pub tls: bool,
}

impl Plugin {
    /// Starts `program` as go-plugin does (with AutoMTLS) and connects to it.
    pub async fn start(program: &Path, timeout: Duration) -> Result<Plugin, TerraformError> {
        Self::start_with(program, timeout, true).await
    }

    /// As [`Plugin::start`]; without `mtls`, no client certificate is offered (the plugin then
    /// serves plain gRPC, as go-plugin does without AutoMTLS).
    pub async fn start_with(
        program: &Path,
        timeout: Duration,
        mtls: bool,
    ) -> Result<Plugin, TerraformError> {
        let program = program.to_path_buf();
        let client = if mtls {
            Some(tls::ClientIdentity::generate().map_err(|e| {
                TerraformError::Grpc(
                    format!("cannot make a client certificate: {e}"),
                    program.clone(),
                )
            })?)
        } else {
            None
        };
        let mut command = tokio::process::Command::new(&program);
        if let Some(client) = &client {
            command.env("PLUGIN_CLIENT_CERT", &client.pem);
        }
        command
            .env(MAGIC_COOKIE_KEY, MAGIC_COOKIE_VALUE)
            .env("PLUGIN_PROTOCOL_VERSIONS", PROTOCOLS)
            .env("PLUGIN_MIN_PORT", "10000")
            .env("PLUGIN_MAX_PORT", "25000")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = command.spawn().map_err(|error| TerraformError::Spawn {
            program: program.clone(),
            error,
        })?;
        let stdout = child.stdout.take().expect("piped");
        let mut stderr = child.stderr.take().expect("piped");
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = match tokio::time::timeout(timeout, lines.next_line()).await {
            Err(_) => {
                return Err(TerraformError::HandshakeTimeout {
                    program,
                    after: timeout,
                })
            }
            Ok(Ok(Some(line))) => line,
            Ok(_) => {
                let status = child
                    .wait()
                    .await
                    .map(|s| s.to_string())
                    .unwrap_or_else(|e| e.to_string());
                let mut tail = String::new();
                let _ =
                    tokio::time::timeout(Duration::from_secs(1), stderr.read_to_string(&mut tail))
                        .await;
                let tail: Vec<&str> = tail.lines().rev().take(5).collect();
                let tail: String = tail.into_iter().rev().map(|l| format!("\n  {l}")).collect();
                return Err(TerraformError::NoHandshake {
                    program,
                    status,
                    tail,
                });
            }
        };
        let Some(handshake) = Handshake::parse(&line) else {
            return Err(TerraformError::BadHandshake { program, line });
        };
        if handshake.protocol != "5" {
            return Err(TerraformError::Protocol {
                program,
                version: handshake.protocol,
            });
        }
        // Its logs go on after the line; drained so it never blocks on a full pipe.
        tokio::spawn(async move {
            let mut sink = Vec::new();
            let _ = stderr.read_to_end(&mut sink).await;
        });
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let tls = match (&client, handshake.server_cert.is_empty()) {
            (Some(client), false) => Some(
                tls::client_config(client, &handshake.server_cert).map_err(|e| {
                    TerraformError::Grpc(format!("its server certificate: {e}"), program.clone())
                })?,
            ),
            (None, false) => {
                return Err(TerraformError::Grpc(
                    "it serves TLS without having been given a client certificate".into(),
                    program,
                ))
            }
            (_, true) => None,
        };
        let mtls = tls.is_some();
        let channel = connect(&program, &handshake, tls).await?;
        Ok(Plugin {
            program,
            child,
            channel,
            handshake,
            tls: mtls,
        })
    }

    /// `GetSchema`: the provider's resource and data source types.
    pub async fn schema(&self) -> Result<wire::GetProviderSchemaResponse, TerraformError> {
        let response: wire::GetProviderSchemaResponse = self
            .unary(wire::GET_SCHEMA, wire::GetProviderSchemaRequest {})
            .await?;
        if let Some(error) = response.diagnostics.iter().find(|d| d.severity == 1) {
            return Err(TerraformError::Diagnostic {
                program: self.program.clone(),
                summary: error.summary.clone(),
                detail: if error.detail.is_empty() {
                    String::new()
                } else {
                    format!(": {}", error.detail)
                },
            });
        }
        Ok(response)
    }

    /// `Configure`, once per run, with the provider block's configuration (JSON).
    pub async fn configure(
        &self,
        schema: &wire::GetProviderSchemaResponse,
        config: &serde_json::Value,
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
        let config = values::encode(&values::block_type(&block), config);
        let response: wire::ConfigureResponse = self
            .unary(
                wire::CONFIGURE,
                wire::ConfigureRequest {
                    terraform_version: "1.0.3".into(),
                    config: Some(values::dynamic(&config)),
                },
            )
            .await?;
        self.errors(&response.diagnostics)
    }

    /// Creates a resource of `type_name` from its configuration (JSON): plans it, then applies
    /// the plan. Returns its state (JSON: every attribute) and the provider's private bytes.
    pub async fn create(
        &self,
        schema: &wire::GetProviderSchemaResponse,
        type_name: &str,
        config: &serde_json::Value,
    ) -> Result<(serde_json::Value, Vec<u8>), TerraformError> {
        let block = self.block(schema, type_name)?;
        let proposed = values::proposed_create(&block, config);
        let config = values::encode(&values::block_type(&block), config);
        self.plan_and_apply(type_name, rmpv::Value::Nil, proposed, config, Vec::new())
            .await
    }

    /// Changes a resource to match a new configuration: plans from its prior state (the
    /// proposed new state keeps the computed attributes the configuration leaves null), then
    /// applies. A plan that requires replacing it is [`TerraformError::ReplaceRequired`].
    pub async fn update(
        &self,
        schema: &wire::GetProviderSchemaResponse,
        type_name: &str,
        prior: &serde_json::Value,
        private: &[u8],
        config: &serde_json::Value,
    ) -> Result<(serde_json::Value, Vec<u8>), TerraformError> {
        let block = self.block(schema, type_name)?;
        let t = values::block_type(&block);
        let prior_mp = values::encode(&t, prior);
        let config_mp = values::encode(&t, config);
        let mut proposed = config.clone();
        if let (Some(proposed), Some(prior)) = (proposed.as_object_mut(), prior.as_object()) {
            for a in block.attributes.iter().filter(|a| a.computed) {
                if proposed.get(&a.name).is_none_or(|v| v.is_null()) {
                    if let Some(v) = prior.get(&a.name) {
                        proposed.insert(a.name.clone(), v.clone());
                    }
                }
            }
        }
        let proposed = values::encode(&t, &proposed);
        self.plan_and_apply(type_name, prior_mp, proposed, config_mp, private.to_vec())
            .await
    }

    /// `PlanResourceChange`, then `ApplyResourceChange` of that plan: the new state (JSON)
    /// and private bytes. A change that requires replacing the resource is
    /// [`TerraformError::ReplaceRequired`], before anything is applied.
    async fn plan_and_apply(
        &self,
        type_name: &str,
        prior: rmpv::Value,
        proposed: rmpv::Value,
        config: rmpv::Value,
        prior_private: Vec<u8>,
    ) -> Result<(serde_json::Value, Vec<u8>), TerraformError> {
        // On a create, providers report the attributes that would force a replacement too;
        // only a change of an existing resource is refused for them (as Terraform core does).
        let creating = prior.is_nil();
        let prior = values::dynamic(&prior);
        let config = values::dynamic(&config);
        let plan: wire::PlanResourceChangeResponse = self
            .unary(
                wire::PLAN_RESOURCE_CHANGE,
                wire::PlanResourceChangeRequest {
                    type_name: type_name.to_string(),
                    prior_state: Some(prior.clone()),
                    proposed_new_state: Some(values::dynamic(&proposed)),
                    config: Some(config.clone()),
                    prior_private,
                    provider_meta: None,
                },
            )
            .await?;
        self.errors(&plan.diagnostics)?;
        if !creating && !plan.requires_replace.is_empty() {
            return Err(TerraformError::ReplaceRequired {
                program: self.program.clone(),
                type_name: type_name.to_string(),
            });
        }
        let applied: wire::ApplyResourceChangeResponse = self
            .unary(
                wire::APPLY_RESOURCE_CHANGE,
                wire::ApplyResourceChangeRequest {
                    type_name: type_name.to_string(),
                    prior_state: Some(prior),
                    planned_state: plan.planned_state,
                    config: Some(config),
                    planned_private: plan.planned_private,
                    provider_meta: None,
                },
            )
            .await?;
        self.errors(&applied.diagnostics)?;
        let state = self.state_of(applied.new_state.as_ref())?;
        Ok((state.unwrap_or_default(), applied.private))
    }

    /// `ReadResource`: the resource as it is now, or `None` when it is gone.
    pub async fn read(
        &self,
        schema: &wire::GetProviderSchemaResponse,
        type_name: &str,
        state: &serde_json::Value,
        private: &[u8],
    ) -> Result<Option<serde_json::Value>, TerraformError> {
        let block = self.block(schema, type_name)?;
        let current = values::encode(&values::block_type(&block), state);
        let read: wire::ReadResourceResponse = self
            .unary(
                wire::READ_RESOURCE,
                wire::ReadResourceRequest {
                    type_name: type_name.to_string(),
                    current_state: Some(values::dynamic(&current)),
                    private: private.to_vec(),
                    provider_meta: None,
                },
            )
            .await?;
        self.errors(&read.diagnostics)?;
        self.state_of(read.new_state.as_ref())
    }

    /// `ReadDataSource`: what the data source `type_name` (without `data.`) reads for its
    /// configuration (computed attributes unknown in the request, known in the answer).
    pub async fn read_data(
        &self,
        schema: &wire::GetProviderSchemaResponse,
        type_name: &str,
        config: &serde_json::Value,
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
        let config = values::encode(&values::block_type(&block), config);
        let read: wire::ReadDataSourceResponse = self
            .unary(
                wire::READ_DATA_SOURCE,
                wire::ReadDataSourceRequest {
                    type_name: type_name.to_string(),
                    config: Some(values::dynamic(&config)),
                    provider_meta: None,
                },
            )
            .await?;
        self.errors(&read.diagnostics)?;
        Ok(self.state_of(read.state.as_ref())?.unwrap_or_default())
    }

    /// Deletes a resource: applies a plan whose new state is null.
    pub async fn delete(
        &self,
        schema: &wire::GetProviderSchemaResponse,
        type_name: &str,
        state: &serde_json::Value,
        private: &[u8],
    ) -> Result<(), TerraformError> {
        let block = self.block(schema, type_name)?;
        let prior = values::encode(&values::block_type(&block), state);
        let applied: wire::ApplyResourceChangeResponse = self
            .unary(
                wire::APPLY_RESOURCE_CHANGE,
                wire::ApplyResourceChangeRequest {
                    type_name: type_name.to_string(),
                    prior_state: Some(values::dynamic(&prior)),
                    planned_state: Some(values::dynamic(&rmpv::Value::Nil)),
                    config: Some(values::dynamic(&rmpv::Value::Nil)),
                    planned_private: private.to_vec(),
                    provider_meta: None,
                },
            )
            .await?;
        self.errors(&applied.diagnostics)
    }

    fn block(
        &self,
        schema: &wire::GetProviderSchemaResponse,
        type_name: &str,
    ) -> Result<wire::Block, TerraformError> {
        schema
            .resource_schemas
            .get(type_name)
            .and_then(|s| s.block.clone())
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

    /// The first error among `diagnostics` (warnings are not failures).
    fn errors(&self, diagnostics: &[wire::Diagnostic]) -> Result<(), TerraformError> {
        match diagnostics.iter().find(|d| d.severity == 1) {
            None => Ok(()),
            Some(error) => Err(TerraformError::Diagnostic {
                program: self.program.clone(),
                summary: error.summary.clone(),
                detail: if error.detail.is_empty() {
                    String::new()
                } else {
                    format!(": {}", error.detail)
                },
            }),
        }
    }

    async fn unary<Q, R>(&self, path: &'static str, request: Q) -> Result<R, TerraformError>
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
                tonic::codegen::http::uri::PathAndQuery::from_static(path),
                tonic::codec::ProstCodec::default(),
            )
            .await
            .map_err(|status| grpc_error(status.message().to_string()))?;
        Ok(response.into_inner())
    }

    /// Asks the plugin to exit (go-plugin's controller), then makes sure it did.
    pub async fn stop(mut self) {
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.unary::<wire::Empty, wire::Empty>(wire::CONTROLLER_SHUTDOWN, wire::Empty {}),
        )
        .await;
        if tokio::time::timeout(Duration::from_secs(2), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// The plugin's socket.
enum Socket {
    Unix(PathBuf),
    Tcp(std::net::SocketAddr),
}

async fn connect(
    program: &Path,
    handshake: &Handshake,
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
) -> Result<tonic::transport::Channel, TerraformError> {
    let bad = |why| TerraformError::Address {
        program: program.to_path_buf(),
        network: handshake.network.clone(),
        address: handshake.address.clone(),
        why,
    };
    let socket = match handshake.network.as_str() {
        "unix" => Socket::Unix(PathBuf::from(&handshake.address)),
        "tcp" => {
            let addr: std::net::SocketAddr = handshake
                .address
                .parse()
                .map_err(|_| bad("not an address"))?;
            if !addr.ip().is_loopback() {
                return Err(bad("only loopback addresses are trusted"));
            }
            Socket::Tcp(addr)
        }
        _ => return Err(bad("the network is neither unix nor tcp")),
    };
    let socket = std::sync::Arc::new(socket);
    // HTTP/2 with prior knowledge, over the plain or the TLS stream.
    tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let (socket, tls) = (socket.clone(), tls.clone());
            async move {
                let stream: Box<dyn tls::Stream> = match &*socket {
                    Socket::Unix(path) => Box::new(tokio::net::UnixStream::connect(path).await?),
                    Socket::Tcp(addr) => Box::new(tokio::net::TcpStream::connect(addr).await?),
                };
                let stream: Box<dyn tls::Stream> = match tls {
                    None => stream,
                    Some(config) => {
                        let name =
                            rustls::pki_types::ServerName::try_from("localhost").expect("a name");
                        Box::new(
                            tokio_rustls::TlsConnector::from(config)
                                .connect(name, stream)
                                .await?,
                        )
                    }
                };
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|e| TerraformError::Grpc(format!("cannot connect: {e}"), program.to_path_buf()))
}

/// A Terraform provider's schema as Capstan's handshake describes it: each resource type's
/// required and optional attributes are inputs, all its attributes (computed ones too)
/// outputs; nested blocks are inputs and outputs holding JSON objects or arrays; sensitive
/// attributes are marked so. Data sources are types named `data.NAME` (read-only).
pub fn provider_info(name: &str, schema: &wire::GetProviderSchemaResponse) -> ProviderInfo {
    let mut types: Vec<ResourceTypeInfo> = Vec::new();
    let mut add = |type_name: String, schema: &wire::Schema, data: bool| {
        let block = schema.block.clone().unwrap_or_default();
        let mut info = ResourceTypeInfo {
            name: type_name,
            description: block.description.clone(),
            stateful: !data,
            ..Default::default()
        };
        for a in &block.attributes {
            let settable = a.required || a.optional;
            if settable {
                info.inputs.push(InputInfo {
                    name: a.name.clone(),
                    required: a.required,
                    description: a.description.clone(),
                    sensitive: a.sensitive,
                });
            }
            info.outputs.push(OutputInfo {
                name: a.name.clone(),
                description: a.description.clone(),
                sensitive: a.sensitive,
            });
        }
        for b in &block.block_types {
            let kind = match b.nesting {
                1 | 5 => "an object",
                4 => "an object of objects",
                _ => "a list of objects",
            };
            info.inputs.push(InputInfo {
                name: b.type_name.clone(),
                required: b.min_items > 0,
                description: format!("a nested block: {kind}"),
                sensitive: false,
            });
            info.outputs.push(OutputInfo {
                name: b.type_name.clone(),
                description: format!("a nested block: {kind}"),
                sensitive: false,
            });
        }
        types.push(info);
    };
    let mut resources: Vec<_> = schema.resource_schemas.iter().collect();
    resources.sort_by(|a, b| a.0.cmp(b.0));
    for (type_name, s) in resources {
        add(type_name.clone(), s, false);
    }
    let mut data: Vec<_> = schema.data_source_schemas.iter().collect();
    data.sort_by(|a, b| a.0.cmp(b.0));
    for (type_name, s) in data {
        add(format!("data.{type_name}"), s, true);
    }
    ProviderInfo {
        name: name.to_string(),
        version: String::new(),
        min_protocol: 0,
        max_protocol: 0,
        protocol: 0,
        max_concurrency: 0,
        resource_types: types,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
