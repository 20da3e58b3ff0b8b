//! Figures through Capstan's host: round trips, operations in flight, progress events,
//! spawn and handshake, a slow observer's memory; and the `rpc` report.

use super::*;

// ---- through the host ----------------------------------------------------------------------

/// The no-op create round trip through the host, in microseconds.
pub(super) fn host_rtt_us(calls: u32) -> f64 {
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
pub(super) const IN_FLIGHT: u32 = 64;

/// No-op operations per second through the host, 64 in flight (unpinned: as the engine
/// runs them, for `apply`'s same-run baseline).
pub(super) fn ops_per_s_64(calls: u32) -> f64 {
    inflight_per_s(calls, false)
}

/// No-op operations per second through the host with [`IN_FLIGHT`] outstanding on one
/// connection to the testing provider. `pinned`: host on CPU 0, provider on CPU 1, as the
/// baselines are.
pub(super) fn inflight_per_s(calls: u32, pinned: bool) -> f64 {
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
pub(super) fn raw_inflight_per_s(messages: u32) -> f64 {
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

pub(super) fn chatty(events: u64, observer: Rc<dyn ProgressObserver>) -> f64 {
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
pub(super) fn progress_events_per_s(events: u64) -> (f64, Vec<u64>) {
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
pub(super) fn cpu_seconds(clock: libc::clockid_t) -> f64 {
    let mut time = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `time` is a valid, writable timespec.
    unsafe { libc::clock_gettime(clock, &mut time) };
    time.tv_sec as f64 + time.tv_nsec as f64 / 1e9
}

pub(super) fn thread_cpu_seconds() -> f64 {
    cpu_seconds(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// CPU seconds (user and system) used by child processes that have ended and been waited for.
pub(super) fn children_cpu_seconds() -> f64 {
    // SAFETY: an all-zero rusage is valid, and getrusage only writes into it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable rusage.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// Seconds the calling thread has spent runnable but waiting for a CPU (from
/// `/proc/thread-self/schedstat`; 0 where that is not available).
pub(super) fn thread_runqueue_wait_seconds() -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0.0, |ns| ns as f64 / 1e9)
}

pub(super) fn rss_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Runs in a child process so its peak RSS is the host's alone.
pub(super) fn slow_sink_child(events: u64) {
    let before = rss_kib("VmRSS:");
    let observer =
        Rc::new(|_batch: Vec<ProgressEvent>| tokio::time::sleep(Duration::from_micros(500)));
    chatty(events, observer);
    println!("{} {}", before, rss_kib("VmHWM:"));
}

pub(super) fn slow_sink_peak_rss_mib(events: u64) -> (f64, f64) {
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

pub(super) fn spawn_handshake_ms(spawns: u32) -> f64 {
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

pub(super) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

pub(super) fn rpc(json_output: bool, quick: bool) {
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
    let figures = rpc_figures(&sizes);
    if json_output {
        println!("{figures}");
    } else {
        print_rpc_table(&figures);
    }
}

/// Every `rpc` figure beside its baseline, measured in interleaved rounds.
fn rpc_figures(sizes: &Sizes) -> serde_json::Value {
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
    figures
}

/// The `rpc` figures as a table, each with its baseline and goal.
fn print_rpc_table(figures: &serde_json::Value) {
    let f = |key: &str| figures[key].as_f64().unwrap_or(f64::NAN);
    let (raw_rtt, host_rtt, capnp_ping) = (f("raw_rtt_us"), f("host_rtt_us"), f("capnp_ping_us"));
    let (ops, bare64, raw64) = (
        f("ops_per_s_64"),
        f("capnp_calls_per_s_64"),
        f("raw_messages_per_s_64"),
    );
    let (progress, raw_stream) = (f("progress_events_per_s"), f("raw_stream_events_per_s"));
    let batches = figures["progress_batches"].as_u64().unwrap_or(0);
    let (rss_before, rss_peak) = (f("slow_sink_rss_before_mib"), f("slow_sink_peak_rss_mib"));
    let spawn = f("spawn_handshake_ms");
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
        format!("raw, same {batches} batches {raw_stream:.0}/s"),
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
