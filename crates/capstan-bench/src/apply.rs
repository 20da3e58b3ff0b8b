//! The engine applying deployments of no-op resources, from small to a million.

use super::*;
use std::collections::BTreeMap;

// ---- apply: the engine ---------------------------------------------------------------------

/// Counts events and nothing else.
pub(super) struct CountEvents(pub(super) Cell<u64>);

impl capstan_engine::events::EventSink for CountEvents {
    fn emit(&self, _event: capstan_engine::events::Event) {
        self.0.set(self.0.get() + 1);
    }
}

/// A deployment of `size` no-op resources in a random DAG (each refers to up to two earlier
/// ones), all served by one testing provider.
pub(super) fn noop_deployment(size: usize) -> String {
    noop_deployment_with(size, None)
}

/// [`noop_deployment`], with `secret` among every resource's inputs.
pub(super) fn noop_deployment_with(size: usize, secret: Option<&str>) -> String {
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
        let value = match secret {
            Some(secret) => json!([i, refs, secret]),
            None => json!([i, refs]),
        };
        resources.insert(
            format!("r{i}"),
            json!({"provider": "t", "type": "noop", "inputs": {"value": value}}),
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
/// The secret the deployment holds (`CAPSTAN_BENCH_SECRET`), known as one, as `--secrets`
/// makes it.
fn bench_secrets() -> Rc<capstan_engine::secrets::Secrets> {
    let secrets = capstan_engine::secrets::Secrets::new();
    if let Ok(secret) = std::env::var("CAPSTAN_BENCH_SECRET") {
        secrets.add_value(&serde_json::Value::String(secret));
    }
    secrets
}

/// Where a benchmark's state is.
pub(super) enum StateAt {
    Dir(PathBuf),
    Postgres(Box<capstan_state_postgres::Location>),
}

impl StateAt {
    /// Locked, with the key the environment gives (as `capstan` takes it).
    fn open(&self) -> Box<dyn capstan_engine::state::StateBackend> {
        let keys = capstan_engine::state::crypt::Keys::from_env().unwrap();
        match self {
            StateAt::Dir(dir) => {
                let mut backend =
                    capstan_engine::state::DirectoryBackend::open(dir, Duration::ZERO).unwrap();
                backend.set_keys(keys);
                Box::new(backend)
            }
            StateAt::Postgres(location) => {
                let mut backend =
                    capstan_state_postgres::PgBackend::open(location, Duration::ZERO, &mut |_| {})
                        .unwrap();
                backend.set_keys(keys);
                Box::new(backend)
            }
        }
    }

    /// The state as a plan reads it: no lock, nothing written.
    fn look(&self) -> capstan_engine::state::State {
        let keys = capstan_engine::state::crypt::Keys::from_env().unwrap();
        match self {
            StateAt::Dir(dir) => {
                capstan_engine::state::read_only_with(dir, keys.as_deref())
                    .unwrap()
                    .0
            }
            StateAt::Postgres(location) => {
                capstan_state_postgres::read_only(location, keys)
                    .unwrap()
                    .state
            }
        }
    }
}

pub(super) fn engine_apply_at(
    file: &Path,
    state_at: &StateAt,
    capstan: PathBuf,
    size: usize,
    jobs: usize,
) -> (f64, serde_json::Value, u64) {
    use capstan_cli::served::SelfLauncher;
    use capstan_engine::run::RunOptions;
    use capstan_engine::session::{Context, Mode, Session, Source, StartOptions};
    use capstan_engine::state::StateBackend;
    local(async {
        let start = Instant::now();
        let source = Source {
            file: file.to_path_buf(),
            params: serde_json::Map::new(),
        };
        let reading = Session::read(source, Mode::Apply).unwrap();
        let mut backend = state_at.open();
        let (state, _) = backend.load().unwrap();
        let loaded = start.elapsed();
        let backend: Rc<dyn StateBackend> = Rc::from(backend);
        // As `capstan` does: the run's trace always; its export when asked
        // (`CAPSTAN_BENCH_OTEL`, with OpenTelemetry's variables saying where).
        capstan_engine::trace::start_run(None);
        let counted = Rc::new(CountEvents(Cell::new(0)));
        let telemetry_started = Instant::now();
        let telemetry = std::env::var_os("CAPSTAN_BENCH_OTEL").map(|_| {
            let config = capstan_telemetry::Config::from_env()
                .unwrap()
                .expect("OTEL_TRACES_EXPORTER=otlp");
            let telemetry = capstan_telemetry::Telemetry::start(&config).unwrap();
            let traced = telemetry.sink(counted.clone(), "apply");
            (telemetry, traced)
        });
        let telemetry_start = telemetry_started.elapsed();
        let events: Rc<dyn capstan_engine::events::EventSink> = match &telemetry {
            Some((_, traced)) => traced.clone(),
            None => counted,
        };
        let context = Context {
            state,
            backend: Some(backend),
            events,
            secrets: bench_secrets(),
            interrupt: tokio_util::sync::CancellationToken::new(),
        };
        let mut session = Session::open(reading, context).await.unwrap();
        let planned = start.elapsed();
        let (logs, _ignored) = tokio::sync::mpsc::channel(1024);
        let start_options = StartOptions {
            jobs,
            timeout: None,
            refresh: false,
            max_message_mib: None,
            state_dir: match state_at {
                StateAt::Dir(dir) => Some(dir.clone()),
                StateAt::Postgres(_) => None,
            },
        };
        let mut notices = Vec::new();
        let providers = session
            .start(
                &SelfLauncher { program: capstan },
                logs,
                &start_options,
                &mut notices,
            )
            .await
            .unwrap();
        let launched = start.elapsed();
        let cpu_before_run = thread_cpu_seconds();
        let wait_before_run = thread_runqueue_wait_seconds();
        let process_cpu_before_run = cpu_seconds(libc::CLOCK_PROCESS_CPUTIME_ID);
        let options = RunOptions {
            jobs,
            ..RunOptions::default()
        };
        let summary = session.run(&providers, &options).await.unwrap();
        // With the export on, the run is over once its spans are out (as `capstan` waits).
        let flush_started = Instant::now();
        let exported = telemetry.map(|(telemetry, traced)| {
            traced.end();
            let report = telemetry.finish();
            assert_eq!(report.dropped, 0, "spans dropped: {report:?}");
            report.exported
        });
        let telemetry_flush = flush_started.elapsed();
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
            "spans_exported": exported,
            "telemetry_start": telemetry_start.as_secs_f64(),
            "telemetry_flush": telemetry_flush.as_secs_f64(),
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

pub(super) fn apply_child(file: PathBuf, size: usize, jobs: usize, state: Option<String>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let state_at = match state {
        Some(url) => StateAt::Postgres(Box::new(
            capstan_state_postgres::Location::parse(&url).unwrap(),
        )),
        None => StateAt::Dir(dir.path().join("state")),
    };
    let rss_before = rss_kib("VmRSS:");
    let (apply_seconds, apply_split, peak_after_apply) = engine_apply_at(
        &file,
        &state_at,
        std::env::current_exe().unwrap().with_file_name("capstan"),
        size,
        jobs,
    );
    let journal_bytes = std::fs::metadata(dir.path().join("state/journal"))
        .map(|m| m.len())
        .unwrap_or(0);
    let (plan_seconds, split) = plan_unchanged(&file, &state_at);
    // The same plan in a process of its own, as `capstan plan` runs: its peak memory is the
    // plan's alone (the one above runs where the apply's heap still is).
    // Three times, the median run kept (with every run's seconds): one run alone moved the
    // 100k plan by half from one benchmark to the next, and `scaling_100k_1m` with it.
    let fresh = match &state_at {
        StateAt::Dir(state) => {
            let mut runs: Vec<serde_json::Value> = (0..PLAN_CHILD_RUNS)
                .map(|_| {
                    let output = Command::new(std::env::current_exe().unwrap())
                        .args([
                            "plan-child",
                            file.to_str().unwrap(),
                            state.to_str().unwrap(),
                        ])
                        .stderr(Stdio::inherit())
                        .output()
                        .expect("run plan child");
                    serde_json::from_slice(&output.stdout).unwrap_or(serde_json::Value::Null)
                })
                .collect();
            let seconds = |v: &serde_json::Value| v["seconds"].as_f64().unwrap_or(f64::NAN);
            let all: Vec<f64> = runs.iter().map(seconds).collect();
            runs.sort_by(|a, b| seconds(a).total_cmp(&seconds(b)));
            let mut median = runs.swap_remove(runs.len() / 2);
            median["runs_seconds"] = json!(all);
            median
        }
        StateAt::Postgres(_) => serde_json::Value::Null,
    };
    let figures = (
        apply_seconds,
        plan_seconds,
        journal_bytes,
        peak_after_apply,
        split,
    );
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
            "plan_process": fresh,
            "state_bytes_per_resource": journal_bytes as f64 / size as f64,
            "peak_rss_mib": peak as f64 / 1024.0,
            "host_bytes_per_resource": (peak.saturating_sub(rss_before)) as f64 * 1024.0 / size as f64,
        })
    );
}

/// Plans the deployment in `file` over the state at `state_at`, as `capstan plan` does (the
/// state read without the lock), checking that nothing changes. Seconds in all, and split:
/// reading the deployment, loading the state, planning.
fn plan_unchanged(file: &Path, state_at: &StateAt) -> (f64, (f64, f64, f64)) {
    use capstan_engine::session::{Context, Mode, Session, Source};
    local(async {
        let start = Instant::now();
        let source = Source {
            file: file.to_path_buf(),
            params: serde_json::Map::new(),
        };
        let reading = Session::read(source, Mode::Plan).unwrap();
        let t1 = start.elapsed();
        let state = state_at.look();
        let t2 = start.elapsed();
        let context = Context {
            state,
            backend: None,
            events: Rc::new(CountEvents(Cell::new(0))),
            secrets: bench_secrets(),
            interrupt: tokio_util::sync::CancellationToken::new(),
        };
        let changes = Session::open(reading, context).await.unwrap().changes;
        let seconds = start.elapsed().as_secs_f64();
        assert!(changes
            .iter()
            .all(|c| c.action == capstan_engine::plan::Action::Noop));
        (
            seconds,
            (
                t1.as_secs_f64(),
                (t2 - t1).as_secs_f64(),
                seconds - t2.as_secs_f64(),
            ),
        )
    })
}

/// How many times the plan of the unchanged state runs in a process of its own.
const PLAN_CHILD_RUNS: usize = 3;

/// `plan-child FILE STATE_DIR`: [`plan_unchanged`] in a process of its own; prints its
/// seconds and peak memory as one JSON line.
pub(super) fn plan_child(file: PathBuf, state_dir: PathBuf) {
    let (seconds, split) = plan_unchanged(&file, &StateAt::Dir(state_dir));
    println!(
        "{}",
        json!({
            "seconds": seconds,
            "split_seconds": {"load_deployment": split.0, "load_state": split.1, "plan": split.2},
            "peak_rss_mib": rss_kib("VmHWM:") as f64 / 1024.0,
        })
    );
}

/// Runs `apply-child` on `file` and returns its figures.
pub(super) fn run_apply_child(file: &Path, size: usize, jobs: usize) -> serde_json::Value {
    run_apply_child_at(file, size, jobs, None, &[])
}

/// [`run_apply_child`] with the state at a `postgres://` URL.
pub(super) fn run_apply_child_at(
    file: &Path,
    size: usize,
    jobs: usize,
    state: Option<&str>,
    envs: &[(&str, &str)],
) -> serde_json::Value {
    let output = Command::new(std::env::current_exe().unwrap())
        .envs(envs.iter().copied())
        .args([
            "apply-child",
            file.to_str().unwrap(),
            &size.to_string(),
            &jobs.to_string(),
        ])
        .args(state)
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

pub(super) fn apply_bench(json_output: bool, quick: bool, million: bool) {
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
    // The keys (named for the full sizes; with --quick they hold the quick sizes'
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
    // The key: how plan and apply grow from the large size to ten times it, in time
    // and memory (the plan's in a process of its own).
    let scaling = huge.as_ref().map(|c| {
        let f = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
        json!({
            "apply_time": f(&c["apply_seconds"]) / f(&b["apply_seconds"]),
            "apply_memory": f(&c["peak_rss_mib"]) / f(&b["peak_rss_mib"]),
            "plan_time": f(&c["plan_process"]["seconds"]) / f(&b["plan_process"]["seconds"]),
            "plan_memory": f(&c["plan_process"]["peak_rss_mib"]) / f(&b["plan_process"]["peak_rss_mib"]),
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
        "scaling_100k_1m": scaling,
        "huge": huge,
    });
    if json_output {
        println!("{figures}");
    } else {
        print_apply_table(&figures, small, large);
    }
}

/// The `apply` figures as a table: each size's, the ratios, and the growth to ten times.
fn print_apply_table(figures: &serde_json::Value, small: usize, large: usize) {
    let (a, b) = (&figures["small"], &figures["large"]);
    let ratio = figures["scaling_ratio"].as_f64().unwrap_or(f64::NAN);
    let rpc_ops = figures["rpc_ops_per_s"].as_f64().unwrap_or(f64::NAN);
    let growth = figures["growth_to_10x_large"]
        .as_object()
        .map(|_| &figures["growth_to_10x_large"]);
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
    let scaling = &figures["scaling_100k_1m"];
    if scaling.is_object() {
        let f = |k: &str| scaling[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "{:<40} {:>33}   ≤ 11 each",
            "scaling_100k_1m: apply, plan (time, mem)",
            format!(
                "×{:.2} ×{:.2}, ×{:.2} ×{:.2}",
                f("apply_time"),
                f("apply_memory"),
                f("plan_time"),
                f("plan_memory")
            )
        );
    }
}

/// `apply --state postgres`: the same applies (10k and 100k no-ops, as `apply`) and no-op plans
/// with the state in a PostgreSQL started here and in a directory, interleaved round by round
/// (each side going first in turn), medians. Same process layout for both: the child applies,
/// then plans; PostgreSQL's server is the one process more, as it is for a team.
pub(super) fn postgres_bench(json_output: bool, quick: bool) {
    use capstan_test_support::postgres::{unavailable, Postgres};
    if let Some(why) = unavailable() {
        eprintln!("capstan-bench apply --state postgres: {why}");
        std::process::exit(2);
    }
    let pg = Postgres::start();
    pg.create_database("bench");
    let (small, large) = if quick {
        (1_000, 10_000)
    } else {
        (10_000, 100_000)
    };
    let rounds = if quick { 1 } else { 3 };
    let jobs = 64;
    let mut figures: BTreeMap<(usize, &str), Vec<serde_json::Value>> = BTreeMap::new();
    let mut n = 0;
    interleaved(
        rounds,
        &[small, large],
        ["dir", "postgres"],
        noop_deployment,
        &mut figures,
        |file, size, side| {
            n += 1;
            // A deployment of its own each time, so every apply creates everything.
            let url = format!("{}&deployment=bench-{n}", pg.url("bench"));
            let state = (side == "postgres").then_some(url.as_str());
            run_apply_child_at(file, size, jobs, state, &[])
        },
    );
    // Encryption's cost: 10k resources each with a secret among its inputs, in a directory,
    // with a key (every secret encrypted) and without (kept in clear), interleaved.
    let key_dir = tempfile::tempdir().expect("temp dir");
    let identity = key_dir.path().join("identity");
    {
        use age::secrecy::ExposeSecret;
        use std::os::unix::fs::PermissionsExt;
        let key = age::x25519::Identity::generate();
        std::fs::write(&identity, format!("{}\n", key.to_string().expose_secret())).unwrap();
        std::fs::set_permissions(&identity, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let secret = "bench-secret-value-0123456789";
    interleaved(
        rounds,
        &[small],
        ["clear", "encrypted"],
        |size| noop_deployment_with(size, Some(secret)),
        &mut figures,
        |file, size, side| {
            let mut envs = vec![("CAPSTAN_BENCH_SECRET", secret)];
            if side == "encrypted" {
                envs.push(("CAPSTAN_STATE_IDENTITY", identity.to_str().unwrap()));
            }
            run_apply_child_at(file, size, jobs, None, &envs)
        },
    );
    let median_of = |size: usize, side: &str, key: &str| {
        median(
            figures[&(size, side)]
                .iter()
                .map(|f| f[key].as_f64().unwrap())
                .collect(),
        )
    };
    let ratio =
        |size: usize, key: &str| median_of(size, "dir", key) / median_of(size, "postgres", key);
    let out = json!({
        "pg_vs_dir_ratio_10k": ratio(small, "apply_seconds"),
        "pg_vs_dir_ratio_100k": ratio(large, "apply_seconds"),
        "pg_plan_vs_dir_ratio": ratio(large, "plan_unchanged_seconds"),
        "encrypted_vs_clear_ratio": median_of(small, "clear", "apply_seconds")
            / median_of(small, "encrypted", "apply_seconds"),
        "sizes": [small, large],
        "rounds": rounds,
        "jobs": jobs,
        "seconds": {
            "apply_dir": [median_of(small, "dir", "apply_seconds"), median_of(large, "dir", "apply_seconds")],
            "apply_postgres": [median_of(small, "postgres", "apply_seconds"), median_of(large, "postgres", "apply_seconds")],
            "plan_dir": [median_of(small, "dir", "plan_unchanged_seconds"), median_of(large, "dir", "plan_unchanged_seconds")],
            "plan_postgres": [median_of(small, "postgres", "plan_unchanged_seconds"), median_of(large, "postgres", "plan_unchanged_seconds")],
            "apply_secrets_clear": median_of(small, "clear", "apply_seconds"),
            "apply_secrets_encrypted": median_of(small, "encrypted", "apply_seconds"),
        },
    });
    if json_output {
        println!("{out}");
        return;
    }
    println!(
        "{:<44} {:>10} {:>10}   goal",
        "state in PostgreSQL vs a directory", small, large
    );
    let s = &out["seconds"];
    for (what, key) in [
        ("apply, directory: seconds", "apply_dir"),
        ("apply, PostgreSQL: seconds", "apply_postgres"),
        ("no-op plan, directory: seconds", "plan_dir"),
        ("no-op plan, PostgreSQL: seconds", "plan_postgres"),
    ] {
        println!(
            "{what:<44} {:>10.3} {:>10.3}",
            s[key][0].as_f64().unwrap(),
            s[key][1].as_f64().unwrap()
        );
    }
    println!(
        "{:<44} {:>10.2} {:>10.2}   ≥ 0.5",
        "pg_vs_dir_ratio (apply)",
        out["pg_vs_dir_ratio_10k"].as_f64().unwrap(),
        out["pg_vs_dir_ratio_100k"].as_f64().unwrap()
    );
    println!(
        "{:<44} {:>21.2}   ≥ 0.5",
        "pg_plan_vs_dir_ratio (no-op plan, 100k)",
        out["pg_plan_vs_dir_ratio"].as_f64().unwrap()
    );
    println!(
        "{:<44} {:>10.3}",
        "apply, a secret each, in clear: seconds",
        s["apply_secrets_clear"].as_f64().unwrap()
    );
    println!(
        "{:<44} {:>10.3}",
        "apply, a secret each, encrypted: seconds",
        s["apply_secrets_encrypted"].as_f64().unwrap()
    );
    println!(
        "{:<44} {:>10.2}   ≥ 0.9",
        "encrypted_vs_clear_ratio",
        out["encrypted_vs_clear_ratio"].as_f64().unwrap()
    );
}

/// `apply --otel`: the same applies (10k and 100k no-ops) with the run's trace exported over
/// OTLP/HTTP to a receiver in this process (it takes every request and answers 200) and with
/// the export off, interleaved round by round (each side first in turn), medians.
pub(super) fn otel_bench(json_output: bool, quick: bool) {
    const SMALL_ROUNDS: usize = 3;
    let (small, large) = if quick {
        (1_000, 10_000)
    } else {
        (10_000, 100_000)
    };
    let rounds = if quick { 1 } else { 5 };
    let jobs = 64;
    let port = receiver();
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut figures: BTreeMap<(usize, &str), Vec<serde_json::Value>> = BTreeMap::new();
    let run = |file: &Path, size: usize, side: &str| {
        let envs: Vec<(&str, &str)> = if side == "on" {
            vec![
                ("CAPSTAN_BENCH_OTEL", "1"),
                ("OTEL_TRACES_EXPORTER", "otlp"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ]
        } else {
            Vec::new()
        };
        run_apply_child_at(file, size, jobs, None, &envs)
    };
    // A 10k apply lasts ~0.15 s, and on a shared machine one pair of runs moves its ratio by
    // ±0.1: three times the rounds there (they are cheap) for a median that holds still.
    interleaved(
        rounds * SMALL_ROUNDS,
        &[small],
        ["off", "on"],
        noop_deployment,
        &mut figures,
        run,
    );
    interleaved(
        rounds,
        &[large],
        ["off", "on"],
        noop_deployment,
        &mut figures,
        run,
    );
    let median_of = |size: usize, side: &str| {
        median(
            figures[&(size, side)]
                .iter()
                .map(|f| f["apply_seconds"].as_f64().unwrap())
                .collect(),
        )
    };
    let spans = figures[&(large, "on")][0]["apply_split_seconds"]["spans_exported"].clone();
    // The engine process's CPU during the run, export included: what a span costs whatever
    // the machine's other load.
    let cpu_of = |size: usize, side: &str, key: &str| {
        median(
            figures[&(size, side)]
                .iter()
                .map(|f| f["apply_split_seconds"][key].as_f64().unwrap())
                .collect(),
        )
    };
    let per_span_us =
        |key: &str| (cpu_of(large, "on", key) - cpu_of(large, "off", key)) * 1e6 / large as f64;
    let cpu_per_span_us = per_span_us("run_engine_process_cpu");
    let out = json!({
        "otel_on_ratio_10k": median_of(small, "off") / median_of(small, "on"),
        "otel_on_ratio_100k": median_of(large, "off") / median_of(large, "on"),
        "apply_seconds": {
            "off": [median_of(small, "off"), median_of(large, "off")],
            "on": [median_of(small, "on"), median_of(large, "on")],
        },
        "spans_exported_100k": spans,
        "engine_cpu_seconds_100k": {
            "off": cpu_of(large, "off", "run_engine_process_cpu"),
            "on": cpu_of(large, "on", "run_engine_process_cpu"),
        },
        "export_cpu_us_per_span": cpu_per_span_us,
        "export_cpu_us_per_span_engine_thread": per_span_us("run_engine_thread_cpu"),
        "export_start_flush_seconds_10k": [
            median(figures[&(small, "on")].iter().map(|f| f["apply_split_seconds"]["telemetry_start"].as_f64().unwrap()).collect()),
            median(figures[&(small, "on")].iter().map(|f| f["apply_split_seconds"]["telemetry_flush"].as_f64().unwrap()).collect()),
        ],
        "sizes": [small, large],
        "rounds": rounds,
        "rounds_10k": rounds * SMALL_ROUNDS,
        // Each round's pair on its own: how far one pair strays from the median.
        "otel_on_ratio_10k_pairs": figures[&(small, "off")]
            .iter()
            .zip(&figures[&(small, "on")])
            .map(|(off, on)| {
                let seconds = |f: &serde_json::Value| f["apply_seconds"].as_f64().unwrap();
                (seconds(off) / seconds(on) * 100.0).round() / 100.0
            })
            .collect::<Vec<_>>(),
        "jobs": jobs,
    });
    if json_output {
        println!("{out}");
        return;
    }
    println!(
        "{:<44} {:>10} {:>10}   goal",
        "apply, trace exported over OTLP", small, large
    );
    for side in ["off", "on"] {
        println!(
            "{:<44} {:>10.3} {:>10.3}",
            format!("apply seconds, export {side}"),
            median_of(small, side),
            median_of(large, side)
        );
    }
    println!(
        "{:<44} {:>21.2}",
        "export CPU per span, µs (100k)", cpu_per_span_us
    );
    println!(
        "{:<44} {:>10.2} {:>10.2}   ≥ 0.9",
        "otel_on_ratio",
        out["otel_on_ratio_10k"].as_f64().unwrap(),
        out["otel_on_ratio_100k"].as_f64().unwrap()
    );
}

/// An OTLP/HTTP receiver that takes every request and answers 200 with an empty
/// `ExportTraceServiceResponse` (a valid one: every field is optional). Its port.
fn receiver() -> u16 {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut stream = stream;
                loop {
                    let mut length = 0usize;
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let header = line.trim_end();
                        if header.is_empty() {
                            break;
                        }
                        if let Some((name, value)) = header.split_once(':') {
                            if name.eq_ignore_ascii_case("content-length") {
                                length = value.trim().parse().unwrap_or(0);
                            }
                        }
                    }
                    let mut body = vec![0; length];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    let reply = "HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n";
                    if stream.write_all(reply.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// Like-for-like rounds: each round, for each size, one deployment (`deployment(size)`) applied
/// once per side, each side going first in turn; the figures go to `figures` by (size, side).
fn interleaved<'a>(
    rounds: usize,
    sizes: &[usize],
    sides: [&'a str; 2],
    deployment: impl Fn(usize) -> String,
    figures: &mut BTreeMap<(usize, &'a str), Vec<serde_json::Value>>,
    mut run: impl FnMut(&Path, usize, &'a str) -> serde_json::Value,
) {
    for round in 0..rounds {
        for &size in sizes {
            let dir = tempfile::tempdir().expect("temp dir");
            let file = dir.path().join("capstan.json");
            std::fs::write(&file, deployment(size)).unwrap();
            let [first, second] = sides;
            let order = if round % 2 == 0 {
                [first, second]
            } else {
                [second, first]
            };
            for side in order {
                let figure = run(&file, size, side);
                figures.entry((size, side)).or_default().push(figure);
            }
        }
    }
}
