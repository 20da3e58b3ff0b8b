//! `capstan`: the command-line front of Capstan. Thin glue over `capstan-engine` and
//! `capstan-host`.

#![forbid(unsafe_code)]

#[macro_use]
mod output;
mod deploy_cmd;
mod error;
mod live;
mod provider_cmd;
mod render;
mod state_cmd;
mod stop;
mod store;
mod style;

use std::process::ExitCode;

use capstan_cli::served;
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
/// Built-in providers: `local` (types file, exec, memo), `nix` (build, activate) and
/// `machine` (nixos: NixOS machines over SSH); `capstan provider describe local` shows their
/// inputs and outputs.
///
/// Exit codes: 0 success, 1 some resource failed (or "delete everything?" was declined), 2
/// invalid deployment or usage, 130 / 143 / 129 stopped by SIGINT / SIGTERM / SIGHUP, 141
/// finished but its output was closed. With `plan --detailed-exitcode`: 0 no changes, 2
/// changes, 1 any error.
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
    #[command(name = served::SUBCOMMAND, hide = true, subcommand)]
    BuiltinProvider(served::BuiltinProvider),
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
            if !e.use_stderr() {
                // --help and --version: on stdout, which may not take it (a full disk). Not on
                // a terminal, in one write, so `capstan --help | head -1` does not depend on
                // when head exits.
                use std::io::{IsTerminal, Write};
                let printed = if std::io::stdout().is_terminal() {
                    e.print()
                } else {
                    let mut stdout = std::io::stdout().lock();
                    stdout
                        .write_all(e.render().to_string().as_bytes())
                        .and_then(|()| stdout.flush())
                };
                return match printed {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(_) => ExitCode::from(stop::EXIT_OUTPUT_CLOSED),
                };
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
                served::BuiltinProvider::Local => capstan_provider_local::provider().serve(),
                served::BuiltinProvider::Nix => capstan_provider_nix::provider().serve(),
                served::BuiltinProvider::Machine => capstan_provider_machine::provider().serve(),
                served::BuiltinProvider::Nixops4V0(args) => served::serve_v0_bridge(args),
                served::BuiltinProvider::Terraform(args) => served::serve_terraform_bridge(args),
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
        run(cli.command, stdout)
            .await
            .unwrap_or_else(error::CliError::report)
    });
    // Providers are stopped by now; wait until the reaper has made sure of it.
    drop(local);
    // Without waiting for blocking tasks: one may be a read of the terminal (the question
    // before deleting everything) that a Ctrl-C abandoned.
    runtime.shutdown_background();
    capstan_host::reaper::finish();
    // A command whose output could not all be written (`capstan state list --json >
    // full-disk/inventory.json`) did not do what it was asked: 141, as for a run (plan and
    // apply say so themselves). Only stdout counts here: it holds what was asked for.
    output::flush();
    if code == ExitCode::SUCCESS && output::stdout_lost() {
        return ExitCode::from(stop::EXIT_OUTPUT_CLOSED);
    }
    code
}

/// Runs a command; every error comes back here, to be printed once.
async fn run(command: Command, stdout: output::Stdout) -> Result<ExitCode, error::CliError> {
    match command {
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
        Command::Provider(command) => Ok(command.run(stdout).await?),
        Command::BuiltinProvider(_) | Command::Reaper => {
            unreachable!("served before the runtime starts")
        }
    }
}
