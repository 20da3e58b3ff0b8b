//! The benchmarks still run and report every figure they promise (not how fast: timing belongs
//! to the benchmark itself, on a quiet machine, never to a test).

use std::process::Command;

fn bench_json(args: &[&str]) -> serde_json::Value {
    let output = Command::new(env!("CARGO_BIN_EXE_capstan-bench"))
        .args(args)
        .output()
        .expect("run capstan-bench");
    assert!(
        output.status.success(),
        "capstan-bench {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "capstan-bench {args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

fn positive(figures: &serde_json::Value, key: &str) -> f64 {
    let value = figures[key]
        .as_f64()
        .unwrap_or_else(|| panic!("`{key}` missing from {figures}"));
    assert!(value > 0.0 && value.is_finite(), "`{key}` = {value}");
    value
}

#[test]
fn apply_reports_the_engine_figures() {
    let figures = bench_json(&["apply", "--quick", "--json"]);
    for key in [
        "apply_resources_per_s_100k",
        "plan_100k_s",
        "scaling_10k_100k",
        "peak_rss_mib_100k",
        "state_bytes_per_resource",
        "rpc_ops_per_s",
    ] {
        positive(&figures, key);
    }
    // The share of the protocol's capacity the engine delivers, from the same run.
    let ratio = positive(&figures, "apply_vs_rpc_ratio");
    let apply = positive(&figures, "apply_resources_per_s_100k");
    let rpc = positive(&figures, "rpc_ops_per_s");
    assert!((ratio - apply / rpc).abs() < 1e-9 * ratio.max(1.0));
    // Two journal lines (intent and result) per resource, each well under a kilobyte.
    let state = positive(&figures, "state_bytes_per_resource");
    assert!(
        (100.0..2048.0).contains(&state),
        "{state} bytes per resource"
    );
    // Where the time went: the phases add up to the apply, the engine's CPU is measured.
    let large = &figures["large"];
    let split = &large["apply_split_seconds"];
    let phases: f64 = ["load", "plan", "launch_providers", "run"]
        .iter()
        .map(|key| {
            split[key]
                .as_f64()
                .unwrap_or_else(|| panic!("`{key}` in {split}"))
        })
        .sum();
    let apply = positive(large, "apply_seconds");
    assert!((phases - apply).abs() < 1e-6 * apply, "{phases} vs {apply}");
    positive(split, "run_engine_thread_cpu");
    positive(split, "run_engine_process_cpu");
    positive(split, "providers_cpu");
}

#[test]
fn help_is_usage_on_stdout_and_runs_nothing() {
    let output = Command::new(env!("CARGO_BIN_EXE_capstan-bench"))
        .args(["apply", "--help"])
        .output()
        .expect("run capstan-bench");
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("Usage: capstan-bench apply"), "{stdout}");
    assert!(
        !stdout.contains("resources/s"),
        "it ran the benchmark: {stdout}"
    );
    // A typo is an error, not some other benchmark.
    let output = Command::new(env!("CARGO_BIN_EXE_capstan-bench"))
        .args(["aply"])
        .output()
        .expect("run capstan-bench");
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("apply"));
}

#[test]
fn v0_reports_both_ways_and_their_ratio() {
    let figures = bench_json(&["v0", "--quick", "--json"]);
    let v0 = positive(&figures, "v0_resources_per_s");
    let capnp = positive(&figures, "capnp_resources_per_s");
    let ratio = positive(&figures, "capnp_vs_v0_ratio");
    assert!((ratio - capnp / v0).abs() < 1e-6 * ratio);
}

#[test]
fn rpc_reports_every_figure_beside_its_same_run_baseline() {
    let figures = bench_json(&["rpc", "--quick", "--json"]);
    for key in [
        "raw_rtt_us",
        "host_rtt_us",
        "capnp_ping_us",
        "ops_per_s_64",
        "capnp_calls_per_s_64",
        "raw_messages_per_s_64",
        "progress_events_per_s",
        "raw_stream_events_per_s",
        "slow_sink_peak_rss_mib",
        "spawn_handshake_ms",
    ] {
        positive(&figures, key);
    }
    // Each ratio is its two figures' quotient, from the same run.
    for (ratio, over, under) in [
        ("rtt_ratio", "host_rtt_us", "raw_rtt_us"),
        ("host_vs_capnp_ratio", "host_rtt_us", "capnp_ping_us"),
        (
            "ops64_vs_capnp_ratio",
            "ops_per_s_64",
            "capnp_calls_per_s_64",
        ),
        (
            "ops64_vs_raw_ratio",
            "ops_per_s_64",
            "raw_messages_per_s_64",
        ),
        (
            "progress_ratio",
            "progress_events_per_s",
            "raw_stream_events_per_s",
        ),
    ] {
        let (r, a, b) = (
            positive(&figures, ratio),
            positive(&figures, over),
            positive(&figures, under),
        );
        assert!((r - a / b).abs() < 1e-9 * r.max(1.0), "{ratio}");
    }
    // The raw stream replays the batches the host received: more than one, fewer than events.
    let batches = positive(&figures, "progress_batches");
    let mean = positive(&figures, "progress_batch_mean");
    assert!(batches > 1.0 && mean > 1.0, "{batches} batches of {mean}");
}

#[test]
fn children_reports_children_beside_the_same_resources_declared() {
    let figures = bench_json(&["children", "--quick", "--json"]);
    let ratio = positive(&figures, "children_vs_direct_ratio");
    let children = positive(&figures, "children_per_s");
    let direct = positive(&figures, "direct_resources_per_s");
    assert!((ratio - children / direct).abs() < 1e-9 * ratio.max(1.0));
}

#[test]
fn nix_reports_the_evaluation_figures() {
    if Command::new("nix-instantiate")
        .arg("--version")
        .output()
        .is_err()
    {
        capstan_test_support::skip_or_fail(
            "nix-instantiate is not installed (apt-get install nix-bin)",
        );
        return;
    }
    let figures = bench_json(&["nix", "--quick", "--json"]);
    for key in [
        "capstan_plan_s",
        "nix_instantiate_s",
        "nix_eval_ratio",
        "staged_apply_s",
        "reference_apply_s",
    ] {
        positive(&figures, key);
    }
    // The chain is evaluated in stages, one per resource whose inputs compute on an output;
    // the references need one.
    assert_eq!(figures["staged_evaluations"], 10, "{figures}");
    assert_eq!(figures["reference_evaluations"], 1, "{figures}");
}
