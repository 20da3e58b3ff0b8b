//! The hidden `capstan __provider` subcommand: the built-in providers and the bridges to other
//! protocols' providers, each served as a Capstan provider on the socket it is given (fd 3),
//! and [`SelfLauncher`], which starts them by re-executing `capstan`. This module alone knows
//! the subcommand's arguments; the engine asks for a [`Served`] provider through
//! [`ProviderLauncher`].

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use capstan_engine::run::{ProviderLauncher, Served};
use capstan_host::ProviderCommand;
use clap::Subcommand;

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
