//! `capstan`: the command-line front of Capstan. Thin glue over `capstan-engine` and
//! `capstan-host`.

#[macro_use]
mod output;
mod deploy_cmd;
mod provider_cmd;
mod render;
mod state_cmd;
mod stop;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// glibc's allocator spends a large share of each RPC in malloc/free; mimalloc does not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Capstan deploys resources through long-lived provider processes that report their progress
/// as they work.
///
/// A deployment (capstan.json) declares providers and resources; inputs may refer to other
/// resources' outputs with {"$ref": "ADDRESS#OUTPUT"}, to parameters with {"$param": "NAME"}
/// and to capabilities with {"$cap": "ADDRESS#NAME"}. Any other key starting with `$` is an
/// error; `$$` writes a literal `$` at the start of a key.
///
/// Ctrl-C, SIGTERM and SIGHUP stop a run gracefully: operations in flight are cancelled in
/// their providers and every result is recorded; a second signal stops at once. Whatever ends
/// capstan (SIGKILL included), no process started for the run outlives it. A closed output
/// (`capstan apply | head`) does not stop a run: it finishes without output.
///
/// Built-in providers: `local` (types file, exec, memo) and `nix` (build, activate);
/// `capstan provider describe local` shows their inputs and outputs.
///
/// Exit codes: 0 success, 1 some resource failed, 2 invalid deployment or usage, 130 / 143 /
/// 129 stopped by SIGINT / SIGTERM / SIGHUP, 141 finished but its output was closed.
#[derive(Parser)]
#[command(name = "capstan", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show what apply would create, update, delete or leave alone (on stdout). Reads the
    /// state without locking it and never writes it.
    Plan {
        #[command(flatten)]
        deployment: deploy_cmd::DeploymentArgs,
        #[command(flatten)]
        view: deploy_cmd::ViewArgs,
        #[command(flatten)]
        plan: deploy_cmd::PlanArgs,
    },
    /// Create, update and delete resources until they match the deployment.
    Apply {
        #[command(flatten)]
        deployment: deploy_cmd::DeploymentArgs,
        #[command(flatten)]
        view: deploy_cmd::ViewArgs,
        #[command(flatten)]
        run: deploy_cmd::RunArgs,
    },
    /// Delete every resource in the state, in reverse dependency order. Needs only the
    /// providers the deployment declares (not its resources or parameters).
    Destroy {
        #[command(flatten)]
        deployment: deploy_cmd::DeploymentArgs,
        #[command(flatten)]
        view: deploy_cmd::ViewArgs,
        #[command(flatten)]
        run: deploy_cmd::RunArgs,
    },
    /// Inspect the state; find and resolve interrupted operations; repair a damaged journal.
    State {
        #[command(flatten)]
        place: deploy_cmd::Place,
        #[command(subcommand)]
        command: state_cmd::StateCmd,
    },
    /// Try a provider directly, without a deployment.
    #[command(subcommand)]
    Provider(provider_cmd::ProviderCmd),
    /// Kill what providers left behind once capstan exits (started by capstan itself).
    #[command(name = "__reaper", hide = true)]
    Reaper,
    /// Serve a built-in provider on the socket capstan passes in (used by capstan itself).
    #[command(name = "__provider", hide = true, subcommand)]
    BuiltinProvider(BuiltinProvider),
}

/// The providers `capstan __provider` serves.
#[derive(Subcommand)]
enum BuiltinProvider {
    /// Files, commands, memoized values.
    Local,
    /// Nix builds and activations.
    Nix,
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
struct TerraformArgs {
    /// The Terraform provider binary.
    #[arg(last = true, required = true, value_name = "PROGRAM")]
    program: Vec<String>,
}

fn serve_terraform_bridge(args: TerraformArgs) -> ExitCode {
    let config = match std::env::var(capstan_engine::model::TERRAFORM_CONFIG_ENV) {
        Err(_) => serde_json::json!({}),
        Ok(config) => match serde_json::from_str(&config) {
            Ok(config) => config,
            Err(e) => {
                say!(
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
        say!("error: give the Terraform provider binary after `--`");
        return ExitCode::from(2);
    };
    match capstan_terraform::bridge::provider(program.into(), config) {
        Ok((provider, runtime)) => provider.serve_on(runtime),
        Err(e) => {
            say!("error: {e}");
            ExitCode::from(1)
        }
    }
}

/// `capstan __provider nixops4-v0 [--type NAME=OUT,… | --types JSON]… [--stateless-types
/// JSON] -- PROGRAM ARGS…` (the engine passes `--types`: names may hold any character).
#[derive(clap::Args)]
struct V0Args {
    /// A resource type and its output names, `NAME=OUT,OUT` (repeat for more).
    #[arg(long = "type", value_name = "NAME=OUTPUTS", value_parser = type_spec)]
    type_specs: Vec<capstan_provider_nixops4_v0::TypeSpec>,
    /// Resource types as JSON: `{"NAME": ["OUT", …], …}` (repeat for more).
    #[arg(long = "types", value_name = "JSON", value_parser = type_specs_json)]
    types_json: Vec<TypeSpecs>,
    /// The types NixOps4 keeps no state for, as a JSON list of names.
    #[arg(long, value_name = "JSON", value_parser = names_json)]
    stateless_types: Option<TypeNames>,
    /// The v0 provider program and its arguments.
    #[arg(last = true, required = true, value_name = "PROGRAM [ARGS]...")]
    program: Vec<String>,
}

fn type_spec(text: &str) -> Result<capstan_provider_nixops4_v0::TypeSpec, String> {
    capstan_provider_nixops4_v0::TypeSpec::parse(text)
        .ok_or_else(|| "give NAME=OUTPUT,OUTPUT".to_string())
}

/// One `--types` value (a newtype: clap reads a bare `Vec` as repeated values).
#[derive(Clone)]
struct TypeSpecs(Vec<capstan_provider_nixops4_v0::TypeSpec>);

/// The `--stateless-types` value.
#[derive(Clone)]
struct TypeNames(Vec<String>);

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
fn serve_v0_bridge(args: V0Args) -> ExitCode {
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
        say!("error: give the NixOps4 v0 provider program after `--`");
        return ExitCode::from(2);
    };
    capstan_provider_nixops4_v0::provider(path.into(), program.collect(), &types).serve()
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // With --detailed-exitcode, 2 means "changes": a usage error is 1 there.
            let detailed = std::env::args_os().any(|a| a == "--detailed-exitcode");
            if detailed && e.use_stderr() {
                let _ = e.print();
                return ExitCode::from(stop::EXIT_FAILED);
            }
            e.exit()
        }
    };
    if let Command::Reaper = &cli.command {
        return capstan_host::reaper::serve();
    }
    let cli = match cli.command {
        Command::BuiltinProvider(provider) => {
            return match provider {
                BuiltinProvider::Local => capstan_provider_local::provider().serve(),
                BuiltinProvider::Nix => capstan_provider_nix::provider().serve(),
                BuiltinProvider::Nixops4V0(args) => serve_v0_bridge(args),
                BuiltinProvider::Terraform(args) => serve_terraform_bridge(args),
            }
        }
        command => Cli { command },
    };
    // capstan's own diagnostics: RUST_LOG as tracing users expect (default: warnings), on stderr.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| output::TracingWriter)
        .try_init();
    // Only what a command means to print may reach stdout: point fd 1 at stderr and keep the
    // real stdout for our own output.
    let stdout = output::Stdout::take();
    // From here on, every way out of main writes what is queued first.
    let _finish = output::Finish;
    // Whatever ends this process, even SIGKILL, nothing a provider started outlives it.
    let starts_providers = !matches!(cli.command, Command::State { .. });
    if starts_providers {
        match std::env::current_exe() {
            Ok(exe) => {
                if let Err(e) = capstan_host::reaper::install(&exe, ["__reaper"]) {
                    say!(
                        "error: cannot start capstan's process reaper ({}): {e}",
                        exe.display()
                    );
                    return ExitCode::FAILURE;
                }
            }
            Err(e) => {
                say!("error: cannot find the capstan executable: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            say!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let local = tokio::task::LocalSet::new();
    let code = local.block_on(&runtime, async move {
        match cli.command {
            Command::Plan {
                deployment,
                view,
                plan,
            } => deploy_cmd::plan_cmd(deployment, view, plan, stdout).await,
            Command::Apply {
                deployment,
                view,
                run,
            } => deploy_cmd::apply_cmd(deployment, view, run, stdout, false).await,
            Command::Destroy {
                deployment,
                view,
                run,
            } => deploy_cmd::apply_cmd(deployment, view, run, stdout, true).await,
            Command::State { place, command } => state_cmd::state_cmd(place, command, stdout).await,
            Command::Provider(command) => match command.run(stdout).await {
                Ok(code) => code,
                Err(e) => {
                    // The chain of causes, each once (many messages already quote their cause).
                    let mut text = e.to_string();
                    for cause in e.chain().skip(1) {
                        let cause = cause.to_string();
                        if !text.contains(&cause) {
                            text.push_str(": ");
                            text.push_str(&cause);
                        }
                    }
                    say!("error: {text}");
                    ExitCode::from(2)
                }
            },
            Command::BuiltinProvider(_) | Command::Reaper => unreachable!("handled above"),
        }
    });
    // Providers are stopped by now; wait until the reaper has made sure of it.
    drop(local);
    // Without waiting for blocking tasks: one may be a read of the terminal (the question
    // before deleting everything) that a Ctrl-C abandoned.
    runtime.shutdown_background();
    capstan_host::reaper::finish();
    code
}
