//! `capstan`: the command-line front of Capstan. Thin glue over `capstan-host`.

mod output;
mod provider_cmd;

/// glibc's allocator spends a large share of each RPC in malloc/free; mimalloc does not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Capstan drives long-lived provider processes over Cap'n Proto RPC on Unix sockets.
#[derive(Parser)]
#[command(name = "capstan", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Try a provider directly, without a deployment.
    #[command(subcommand)]
    Provider(provider_cmd::ProviderCmd),
}

fn main() -> ExitCode {
    // Only what a command means to print may reach stdout: point fd 1 at stderr and keep the
    // real stdout for our own output.
    let stdout = output::Stdout::take();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let local = tokio::task::LocalSet::new();
    let result = match cli.command {
        Command::Provider(command) => local.block_on(&runtime, command.run(stdout)),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
