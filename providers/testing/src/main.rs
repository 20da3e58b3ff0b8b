//! `capstan-provider-testing`: a provider whose resource types exist to exercise the core.
//!
//! | type | does |
//! | --- | --- |
//! | `noop` | echoes `value`; returns a unique `id`; describes any capabilities handed in |
//! | `handle` | returns a capability (`handle`) that describes itself |
//! | `sleep` | sleeps `ms` milliseconds, reporting phases and a counter |
//! | `fail` | fails with the given `kind` and `message` |
//! | `panic` | panics |
//! | `crash` | kills its own process (`mode`: `exit`, `abort`, `sigkill`) |
//! | `hang` | never finishes; on cancellation writes `cancelMarker` (if given) |
//! | `chatty` | emits `count` progress events through tracing or explicit log lines |
//! | `big` | returns an output of `bytes` bytes (for message-size limits) |
//! | `corrupt` | writes garbage bytes onto its own RPC socket |
//! | `probe` | waits `ms`, reports how many operations this process ran at once (`peak`) and how many of its `group` (`group_peak`); fails if `fail`; its delete fails while a file is at `blockDelete` |
//! | `fanout` | runs `count` children (`type`, default `probe`, with `inputs`, and the input named by `index` set to the child's number) through the core's scheduler, all at once; fails if one does, unless `tolerate` |
//! | `permits` | borrows `count` permits from the core at once, each held `ms` while counted in probe group `group` |
//!
//! Options (`--help` lists them): `--listen PATH` serves as a standing service at PATH; `--max-concurrency N`
//! declares a limit; `--protocol MIN:MAX` claims other protocol versions (to test refusal);
//! `--stderr-lines N` writes N lines to stderr at start-up; `--linger` stays alive, ignoring
//! SIGTERM, after the core disconnects (to test escalation to SIGKILL); `--leak-child` starts a
//! `sleep` that outlives the provider (to test leaked-process cleanup).

/// glibc's allocator spends a large share of each RPC in malloc/free; mimalloc does not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::BTreeMap;
use std::os::fd::RawFd;
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::time::Duration;

use capstan_host::describe_handle;
use capstan_provider::schemars::{self, JsonSchema};
use capstan_provider::{
    Endpoint, ErrorKind, LogStream, Operation, OperationError, Provider, Resource, ResourceType,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// A duplicate of the inherited connection socket, for `corrupt`.
static RAW_SOCKET: AtomicI32 = AtomicI32::new(-1);
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn unique_id() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

mod basic;
mod concurrency;
mod faults;
mod secret;
mod state;

use basic::*;
use concurrency::*;
use faults::*;
use secret::*;
use state::*;

// ---- main ----------------------------------------------------------------------------------

/// A provider whose resource types exist to exercise the core (see the crate documentation).
/// Normally started by capstan: capstan provider describe -- capstan-provider-testing
#[derive(clap::Parser)]
#[command(name = "capstan-provider-testing", version)]
struct Args {
    /// Serve as a standing service listening at this Unix socket path.
    #[arg(long, value_name = "PATH")]
    listen: Option<std::path::PathBuf>,
    /// Declare this concurrency limit in the handshake.
    #[arg(long, value_name = "N")]
    max_concurrency: Option<u32>,
    /// Claim these protocol versions (to test the core's refusal), as MIN:MAX.
    #[arg(long, value_name = "MIN:MAX", value_parser = protocol_range)]
    protocol: Option<(u32, u32)>,
    /// Write this many lines to stderr at start-up.
    #[arg(long, value_name = "N", default_value_t = 0)]
    stderr_lines: usize,
    /// Stay alive, ignoring SIGTERM, after the core disconnects (to test escalation).
    #[arg(long)]
    linger: bool,
    /// Start a `sleep` that outlives the provider (to test leaked-process cleanup).
    #[arg(long)]
    leak_child: bool,
    /// Behave as a NixOps4 version-0 no-op provider instead: one request, one response.
    #[arg(long)]
    v0: bool,
}

fn protocol_range(text: &str) -> Result<(u32, u32), String> {
    text.split_once(':')
        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
        .ok_or_else(|| format!("`{text}` is not MIN:MAX, e.g. 1:2"))
}

/// `--v0`: behave as a NixOps4 version-0 no-op provider instead (one request line on stdin,
/// one response line on stdout, then exit), for the benchmark of the v0 bridge.
fn serve_v0_once() -> ExitCode {
    use std::io::{BufRead, Write};
    let mut line = String::new();
    if std::io::stdin().lock().read_line(&mut line).is_err() {
        return ExitCode::FAILURE;
    }
    let request: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
    let (response, body) = if let Some(create) = request.get("createResourceRequest") {
        ("createResourceResponse", create)
    } else if let Some(update) = request.get("updateResourceRequest") {
        ("updateResourceResponse", update)
    } else {
        println!(
            "{}",
            json!({"errorResponse": {"message": "unsupported request"}})
        );
        return ExitCode::SUCCESS;
    };
    let value = body["inputProperties"]
        .get("value")
        .cloned()
        .unwrap_or(Value::Null);
    let answer = json!({response: {"outputProperties": {"value": value, "id": unique_id()}}});
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{answer}");
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let args = <Args as clap::Parser>::parse();
    if args.v0 {
        return serve_v0_once();
    }
    let mut provider = Provider::new("testing", env!("CARGO_PKG_VERSION"))
        .resource(Noop)
        .resource(Handle)
        .resource(Sleep)
        .resource(Fail)
        .resource(Panic)
        .resource(Crash)
        .resource(Hang)
        .resource(Chatty)
        .resource(Big)
        .resource(Corrupt)
        .resource(Probe)
        .resource(Fanout)
        .resource(Permits)
        .resource(Secret)
        .resource(Made)
        .resource(Stash)
        .resource(UseStash)
        .resource(Faulty)
        .cancel_grace(Duration::from_secs(2));
    if let Some(n) = args.max_concurrency {
        provider = provider.max_concurrency(n);
    }
    if let Some((min, max)) = args.protocol {
        provider = provider.protocol_range(min, max);
    }
    for k in 0..args.stderr_lines {
        eprintln!("testing provider: start-up line {k}");
    }
    let leaked_child = args
        .leak_child
        .then(|| {
            std::process::Command::new("sleep")
                .arg("1000")
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .ok()
        })
        .flatten();
    let (listen, linger) = (args.listen, args.linger);
    let endpoint = match listen {
        Some(path) => Endpoint::Listen(path),
        None => match Endpoint::from_env() {
            Ok(endpoint) => endpoint,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(2);
            }
        },
    };
    if let Endpoint::Inherited(fd) = &endpoint {
        use std::os::fd::AsRawFd;
        // SAFETY: duplicates a descriptor this process owns.
        let dup = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 10) };
        RAW_SOCKET.store(dup, Ordering::Relaxed);
    }
    let code = provider.serve_at(endpoint);
    if let Some(child) = leaked_child {
        // Left running on purpose (dropping a `Child` neither kills nor waits for it): the
        // host must find and kill it.
        drop(child);
    }
    if linger {
        // SAFETY: ignoring a signal has no preconditions.
        unsafe {
            libc::signal(libc::SIGTERM, libc::SIG_IGN);
        }
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    code
}
