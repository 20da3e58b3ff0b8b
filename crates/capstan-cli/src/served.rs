//! The hidden `capstan __provider` subcommand: the built-in providers and the bridges to other
//! protocols' providers, each served as a Capstan provider on the socket it is given (fd 3),
//! and [`SelfLauncher`], which starts them by re-executing `capstan`. This module alone knows
//! the subcommand's arguments; the engine asks for a [`Served`] provider through
//! [`ProviderLauncher`].

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use capstan_engine::run::{InProcess, ProviderLauncher, Served};
use capstan_host::{LaunchError, ProviderCommand, ProviderConnection};
use clap::Subcommand;
use futures::future::LocalBoxFuture;
use futures::FutureExt;

/// Writes a line to stderr, ignoring a stderr that is gone (the host may have exited).
macro_rules! say_stderr {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// The name of the hidden subcommand.
pub const SUBCOMMAND: &str = "__provider";

/// Starts what the engine cannot start by itself by running `program` (this `capstan`)
/// again with `__provider …`.
#[derive(Clone, Debug)]
pub struct SelfLauncher {
    pub program: PathBuf,
}

impl SelfLauncher {
    /// The running `capstan` itself.
    pub fn current() -> std::io::Result<Self> {
        Ok(SelfLauncher {
            program: std::env::current_exe()?,
        })
    }
}

/// The providers built into `capstan`, by the name a deployment gives them.
pub const BUILTINS: [&str; 3] = ["local", "nix", "machine"];

impl ProviderLauncher for SelfLauncher {
    fn builtins(&self) -> Option<&[&str]> {
        Some(&BUILTINS)
    }

    fn in_process(
        &self,
        provider: InProcess<'_>,
    ) -> Option<LocalBoxFuture<'static, Result<ProviderConnection, LaunchError>>> {
        let Served::Terraform { program } = provider.served else {
            return None;
        };
        match std::env::var(TERRAFORM_BRIDGE_ENV).as_deref() {
            Ok("process") => return None,
            Err(_) | Ok("" | "inside") => {}
            // A typo is an error, not the default.
            Ok(other) => {
                let error = LaunchError::InProcess {
                    provider: provider.name.to_string(),
                    message: format!(
                        "{TERRAFORM_BRIDGE_ENV}={other}: say `process` (the bridge a process of its own) or `inside` (inside capstan, the default)"
                    ),
                };
                return Some(async move { Err(error) }.boxed_local());
            }
        }
        Some(
            terraform_here(
                provider.name.to_string(),
                program.to_path_buf(),
                provider.settings,
                provider.dir.to_path_buf(),
                provider.options,
                provider.logs,
            )
            .boxed_local(),
        )
    }

    fn command(&self, served: Served<'_>) -> ProviderCommand {
        let mut args: Vec<OsString> = vec![SUBCOMMAND.into()];
        match served {
            Served::Builtin(name) => args.push(name.into()),
            Served::Terraform { program } => {
                args.extend(["terraform".into(), "--".into(), program.into()]);
            }
            Served::NixOps4V0 {
                program,
                args: program_args,
                types,
                stateless_types,
            } => {
                args.push("nixops4-v0".into());
                if let Some(types) = types {
                    // JSON, so type and output names may hold any character.
                    args.push("--types".into());
                    args.push(json_arg(types));
                }
                if !stateless_types.is_empty() {
                    args.push("--stateless-types".into());
                    args.push(json_arg(&stateless_types));
                }
                args.extend(["--".into(), program.into()]);
                args.extend(program_args.iter().map(OsString::from));
            }
        }
        ProviderCommand::new(self.program.clone(), args)
    }
}

/// `CAPSTAN_TERRAFORM_BRIDGE=process` serves the Terraform bridge as a process of its own
/// (`capstan __provider terraform`), as before it moved into capstan's process; `inside` (or
/// unset) serves it inside capstan; anything else is an error.
pub const TERRAFORM_BRIDGE_ENV: &str = "CAPSTAN_TERRAFORM_BRIDGE";

/// The Terraform bridge served in this process, on an in-memory connection: the Terraform
/// provider is started (in the deployment's directory) and its schema read, then the bridge
/// answers the core's handshake. Its own lines go where a provider process's stderr would;
/// if the Terraform provider is lost, the connection closes, so that what was in flight stays
/// pending (a bridge process exits instead).
async fn terraform_here(
    name: String,
    program: PathBuf,
    settings: Option<serde_json::Value>,
    dir: PathBuf,
    options: capstan_host::HostOptions,
    logs: tokio::sync::mpsc::Sender<capstan_host::ProviderLog>,
) -> Result<ProviderConnection, LaunchError> {
    use std::cell::RefCell;
    use std::rc::Rc;
    use std::sync::Arc;
    use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};
    // Its own lines are relayed in order to the core's channel, waiting for room as a
    // provider process's stderr pipe would (lines come from tasks that cannot wait for it).
    let (lines, mut relay) = tokio::sync::mpsc::unbounded_channel::<String>();
    {
        let name = name.clone();
        tokio::task::spawn_local(async move {
            while let Some(line) = relay.recv().await {
                let log = capstan_host::ProviderLog {
                    provider: name.clone(),
                    stream: capstan_schema::LogStream::Stderr,
                    line,
                };
                if logs.send(log).await.is_err() {
                    break;
                }
            }
        });
    }
    let own = Arc::new(move |level: Option<&str>, line: String| match level {
        // As a bridge process shows them: from `warn` up (and lines without a level) as the
        // provider's; below, go-plugin's and the SDK's chatter ("configuring server automatic
        // mTLS" at every start), which Terraform shows only when asked: with
        // `RUST_LOG=terraform=debug` here.
        Some("trace") => tracing::trace!(target: "terraform", "{line}"),
        Some("debug" | "info") => tracing::debug!(target: "terraform", "{line}"),
        _ => {
            let _ = lines.send(line);
        }
    });
    let serving: Rc<RefCell<Option<tokio::task::AbortHandle>>> = Rc::default();
    let lost = {
        let (own, serving) = (own.clone(), serving.clone());
        Rc::new(move |why: String| {
            own(Some("error"), why);
            if let Some(serving) = serving.borrow_mut().take() {
                serving.abort();
            }
        })
    };
    let host = capstan_terraform::bridge::Host {
        own,
        lost,
        dir: Some(dir),
        // A session of its own, which capstan's reaper kills however capstan ends: what the
        // Terraform provider starts (a credentials helper, ssh) goes with it.
        spawned: Some(Arc::new(capstan_host::reaper::watch_session)),
    };
    let config = settings.unwrap_or_else(|| serde_json::json!({}));
    let failed = |message: String| LaunchError::InProcess {
        provider: name.clone(),
        message,
    };
    // Bounded as a bridge process's whole start-up was (by the handshake's timeout), and a
    // panic in it (a schema the bridge cannot take) is this provider's failure, not capstan's.
    let start = std::panic::AssertUnwindSafe(capstan_terraform::bridge::provider_in(
        program, config, host,
    ))
    .catch_unwind();
    let bridge =
        match tokio::time::timeout(options.handshake_timeout, start).await {
            Err(_) => {
                return Err(failed(format!(
                    "the Terraform provider did not start and give its schema within {:?}",
                    options.handshake_timeout
                )))
            }
            Ok(Err(_panic)) => return Err(failed(
                "the Terraform bridge failed on this provider's schema (a bug: please report it)"
                    .into(),
            )),
            Ok(Ok(Err(e))) => return Err(failed(e.to_string())),
            Ok(Ok(Ok(bridge))) => bridge.max_message_words(options.max_message_words),
        };
    let (core_end, bridge_end) = tokio::io::duplex(1 << 16);
    let (reader, writer) = tokio::io::split(bridge_end);
    let task = tokio::task::spawn_local(async move {
        let _ = bridge
            .serve_stream(reader.compat(), writer.compat_write())
            .await;
    });
    *serving.borrow_mut() = Some(task.abort_handle());
    let (reader, writer) = tokio::io::split(core_end);
    ProviderConnection::from_stream(&name, reader.compat(), writer.compat_write(), options).await
}

fn json_arg(value: &impl serde::Serialize) -> OsString {
    // Maps of strings to sets of strings, and lists of strings, always encode.
    serde_json::to_string(value).unwrap_or_default().into()
}

/// The providers `capstan __provider` serves.
#[derive(Subcommand)]
pub enum BuiltinProvider {
    /// Files, commands, memoized values.
    Local,
    /// Nix builds and activations.
    Nix,
    /// NixOS machines over SSH.
    Machine,
    /// The bridge to a NixOps4 version-0 provider program.
    #[command(name = "nixops4-v0")]
    Nixops4V0(V0Args),
    /// The bridge to a Terraform provider binary.
    Terraform(TerraformArgs),
}

/// `capstan __provider terraform -- PROGRAM`; the provider block's configuration (a JSON
/// object) comes in `CAPSTAN_TERRAFORM_CONFIG`, never on the command line, which any user can
/// read.
#[derive(clap::Args)]
pub struct TerraformArgs {
    /// The Terraform provider binary.
    #[arg(last = true, required = true, value_name = "PROGRAM")]
    pub program: Vec<String>,
}

pub fn serve_terraform_bridge(args: TerraformArgs) -> ExitCode {
    let config = match std::env::var(capstan_engine::model::TERRAFORM_CONFIG_ENV) {
        Err(_) => serde_json::json!({}),
        Ok(config) => match serde_json::from_str(&config) {
            Ok(config) => config,
            Err(e) => {
                say_stderr!(
                    "error: {} is not JSON: {e}",
                    capstan_engine::model::TERRAFORM_CONFIG_ENV
                );
                return ExitCode::from(2);
            }
        },
    };
    // Not passed on to the Terraform provider it starts.
    std::env::remove_var(capstan_engine::model::TERRAFORM_CONFIG_ENV);
    let Some(program) = args.program.into_iter().next() else {
        say_stderr!("error: give the Terraform provider binary after `--`");
        return ExitCode::from(2);
    };
    match capstan_terraform::bridge::provider(program.into(), config) {
        Ok((provider, runtime)) => provider.serve_on(runtime),
        Err(e) => {
            say_stderr!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// `capstan __provider nixops4-v0 [--type NAME=OUT,… | --types JSON]… [--stateless-types
/// JSON] -- PROGRAM ARGS…` (the engine passes `--types`: names may hold any character).
#[derive(clap::Args)]
pub struct V0Args {
    /// A resource type and its output names, `NAME=OUT,OUT` (repeat for more).
    #[arg(long = "type", value_name = "NAME=OUTPUTS", value_parser = type_spec)]
    pub type_specs: Vec<capstan_provider_nixops4_v0::TypeSpec>,
    /// Resource types as JSON: `{"NAME": ["OUT", …], …}` (repeat for more).
    #[arg(long = "types", value_name = "JSON", value_parser = type_specs_json)]
    pub types_json: Vec<TypeSpecs>,
    /// The types NixOps4 keeps no state for, as a JSON list of names.
    #[arg(long, value_name = "JSON", value_parser = names_json)]
    pub stateless_types: Option<TypeNames>,
    /// The v0 provider program and its arguments.
    #[arg(last = true, required = true, value_name = "PROGRAM [ARGS]...")]
    pub program: Vec<String>,
}

fn type_spec(text: &str) -> Result<capstan_provider_nixops4_v0::TypeSpec, String> {
    capstan_provider_nixops4_v0::TypeSpec::parse(text)
        .ok_or_else(|| "give NAME=OUTPUT,OUTPUT".to_string())
}

/// One `--types` value (a newtype: clap reads a bare `Vec` as repeated values).
#[derive(Clone)]
pub struct TypeSpecs(Vec<capstan_provider_nixops4_v0::TypeSpec>);

/// The `--stateless-types` value.
#[derive(Clone)]
pub struct TypeNames(Vec<String>);

fn type_specs_json(text: &str) -> Result<TypeSpecs, String> {
    capstan_provider_nixops4_v0::TypeSpec::parse_all_json(text)
        .map(TypeSpecs)
        .ok_or_else(|| "give a JSON object of type names to lists of output names".to_string())
}

fn names_json(text: &str) -> Result<TypeNames, String> {
    serde_json::from_str(text)
        .map(TypeNames)
        .map_err(|_| "give a JSON list of type names".to_string())
}

/// Serves the NixOps4 v0 bridge.
pub fn serve_v0_bridge(args: V0Args) -> ExitCode {
    let mut types = args.type_specs;
    types.extend(args.types_json.into_iter().flat_map(|specs| specs.0));
    let stateless = args
        .stateless_types
        .map(|names| names.0)
        .unwrap_or_default();
    for spec in &mut types {
        spec.stateless = stateless.contains(&spec.name);
    }
    let mut program = args.program.into_iter();
    let Some(path) = program.next() else {
        say_stderr!("error: give the NixOps4 v0 provider program after `--`");
        return ExitCode::from(2);
    };
    capstan_provider_nixops4_v0::provider(path.into(), program.collect(), &types).serve()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    /// `capstan`'s command line, as far as the hidden subcommand goes.
    #[derive(Parser)]
    struct Capstan {
        #[command(subcommand)]
        command: Top,
    }

    #[derive(clap::Subcommand)]
    enum Top {
        #[command(name = "__provider", subcommand)]
        Served(BuiltinProvider),
    }

    fn parsed(served: Served<'_>) -> BuiltinProvider {
        let command = SelfLauncher {
            program: "/bin/capstan".into(),
        }
        .command(served);
        assert_eq!(command.program, "/bin/capstan");
        let argv = std::iter::once(OsString::from("capstan")).chain(command.args);
        let Top::Served(provider) = Capstan::try_parse_from(argv).expect("parses").command;
        provider
    }

    #[test]
    fn every_served_provider_starts_with_arguments_the_subcommand_reads() {
        assert!(matches!(
            parsed(Served::Builtin("local")),
            BuiltinProvider::Local
        ));
        assert!(matches!(
            parsed(Served::Builtin("nix")),
            BuiltinProvider::Nix
        ));
        let BuiltinProvider::Terraform(tf) = parsed(Served::Terraform {
            program: Path::new("/x/terraform-provider-null"),
        }) else {
            panic!("not the Terraform bridge");
        };
        assert_eq!(tf.program, ["/x/terraform-provider-null"]);
        let types: BTreeMap<String, BTreeSet<String>> = [(
            "odd = name,".to_string(),
            ["out, put".to_string()].into_iter().collect(),
        )]
        .into_iter()
        .collect();
        let BuiltinProvider::Nixops4V0(v0) = parsed(Served::NixOps4V0 {
            program: Path::new("./v0"),
            args: &["--flag".to_string(), "--".to_string()],
            types: Some(&types),
            stateless_types: &["file".to_string()],
        }) else {
            panic!("not the v0 bridge");
        };
        assert_eq!(v0.program, ["./v0", "--flag", "--"]);
        let read: Vec<_> = v0.types_json.iter().flat_map(|t| &t.0).collect();
        assert_eq!(read.len(), 1);
        assert_eq!(read[0].name, "odd = name,");
        assert_eq!(
            v0.stateless_types.map(|n| n.0),
            Some(vec!["file".to_string()])
        );
    }
}
