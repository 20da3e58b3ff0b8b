//! Whole scenarios: NixOps4 v0 providers through the bridge, children handed back through
//! the scheduler, deployments written in Nix.

use super::*;

// ---- v0: the headline comparison --------------------------------------------------------------

/// Applies `size` independent no-op resources with the engine, in this process; returns
/// resources per second (load, plan, provider start and run included).
/// Resources per second of one apply of `deployment` (load, plan, provider start, run), in a
/// fresh child process.
pub(super) fn apply_in_child(deployment: &serde_json::Value, size: usize, jobs: usize) -> f64 {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("capstan.json");
    std::fs::write(&file, deployment.to_string()).unwrap();
    let figures = run_apply_child(&file, size, jobs);
    figures["resources_per_s"].as_f64().expect("a rate")
}

/// Lines per second from a real Nix build that prints many, through the nix provider.
pub(super) fn nix_log_lines_per_s(lines: usize) -> Option<f64> {
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

pub(super) fn v0_bench(json_output: bool, quick: bool) {
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
pub(super) fn children_bench(json_output: bool, quick: bool) {
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
pub(super) fn wide_nix(count: usize) -> String {
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
pub(super) fn chain_nix(length: usize, computed: bool) -> String {
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
pub(super) fn timed(program: &Path, args: &[&str], dir: &Path) -> (f64, Vec<u8>) {
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

pub(super) fn nix_bench(json_output: bool, quick: bool) {
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
    // A no-op plan after an apply: of the chain computing on the previous, and of the design
    // meeting's expression (a nested deployment whose members depend on an output, one of
    // them a nested deployment using another member's output).
    let noop_evaluations = |dir: &Path, params: &[&str]| -> usize {
        let mut apply = vec!["apply"];
        apply.extend_from_slice(params);
        timed(&capstan, &apply, dir);
        let mut plan = vec!["plan", "--json"];
        plan.extend_from_slice(params);
        let (_, stdout) = timed(&capstan, &plan, dir);
        String::from_utf8_lossy(&stdout)
            .lines()
            .filter(|l| l.contains("\"type\":\"evaluation_complete\""))
            .count()
    };
    let noop_chain = {
        let place = dir.path().join("noop-chain");
        std::fs::create_dir(&place).unwrap();
        std::fs::write(place.join("capstan.nix"), chain_nix(chain, true)).unwrap();
        noop_evaluations(&place, &[])
    };
    let noop_meeting = {
        let place = dir.path().join("noop-meeting");
        std::fs::create_dir(&place).unwrap();
        std::fs::write(place.join("capstan.nix"), MEETING_NIX).unwrap();
        std::fs::write(place.join("on.json"), r#"{"vm": true, "name": "web"}"#).unwrap();
        noop_evaluations(&place, &["--params", "on.json"])
    };
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
        "noop_plan_evaluations": {"chain": noop_chain, "meeting": noop_meeting},
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
    println!("{:<62} {:>10.2}   ≤ 1.3", "nix_eval_ratio", plan / eval);
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
    println!(
        "{:<62} {:>10}   1",
        format!("noop_plan_evaluations: chain of {chain}, after its apply"),
        noop_chain
    );
    println!(
        "{:<62} {:>10}   1",
        "noop_plan_evaluations: the meeting's expression", noop_meeting
    );
}

/// The design meeting's expression, written with the library: `config` decides whether `vm`
/// exists; `deeper`, nested in the nested deployment, uses `vm`'s outputs.
const MEETING_NIX: &str = r#"{ capstan, params, resources, ... }:
let
  f = config: config.outputs.value.vm;
  g = resources: {
    provider = "local";
    type = "file";
    inputs = { path = "out/vm.txt"; content = "vm for ${resources.config.outputs.value.name}"; };
  };
in
{
  providers.local = capstan.builtin "local";
  resources = {
    config = { provider = "local"; type = "memo"; inputs.value = { inherit (params) vm name; }; };
    machines = capstan.nested ({ resources, ... }:
      if f resources.config then {
        vm = g resources;
        deeper = capstan.nested ({ resources, ... }: {
          leaf = { provider = "local"; type = "file";
                   inputs = { path = "out/leaf.txt"; content = builtins.readFile resources.machines.vm.outputs.path; }; };
        });
      } else { });
  };
}
"#;
