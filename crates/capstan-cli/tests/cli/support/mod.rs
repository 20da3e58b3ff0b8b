//! Shared by the deployment tests: random DAGs of testing-provider resources, and reading the
//! JSON event stream.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde_json::{json, Value};

pub fn capstan_bin() -> &'static str {
    env!("CARGO_BIN_EXE_capstan")
}

pub fn testing_provider() -> String {
    let path = PathBuf::from(capstan_bin()).with_file_name("capstan-provider-testing");
    assert!(
        path.exists(),
        "{} is missing: run `cargo test --workspace`",
        path.display()
    );
    path.to_string_lossy().into_owned()
}

/// A small deterministic PRNG (xorshift64*), so every failure names a reproducible seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// One node of a random graph.
pub struct Node {
    pub address: String,
    pub provider: String,
    pub deps: Vec<usize>,
    pub fail: bool,
}

/// A random DAG: node i depends on up to `max_deps` earlier nodes.
pub fn random_graph(
    rng: &mut Rng,
    size: usize,
    max_deps: u64,
    fail_percent: u64,
    providers: &[&str],
) -> Vec<Node> {
    (0..size)
        .map(|i| {
            let mut deps = BTreeSet::new();
            if i > 0 {
                for _ in 0..rng.below(max_deps + 1) {
                    deps.insert(rng.below(i as u64) as usize);
                }
            }
            Node {
                address: format!("g{}.n{i}", i % 3),
                provider: providers[rng.below(providers.len() as u64) as usize].to_string(),
                deps: deps.into_iter().collect(),
                fail: rng.below(100) < fail_percent,
            }
        })
        .collect()
}

/// The deployment of a graph: `probe` resources whose `value` refers to each dependency's id.
pub fn deployment(nodes: &[Node], providers: &[(&str, u32)], rng: &mut Rng, max_ms: u64) -> Value {
    let mut groups: BTreeMap<String, serde_json::Map<String, Value>> = BTreeMap::new();
    for node in nodes {
        let refs: Vec<Value> = node
            .deps
            .iter()
            .map(|&d| json!({"$ref": format!("{}#id", nodes[d].address)}))
            .collect();
        let (group, name) = node.address.split_once('.').unwrap();
        groups.entry(group.to_string()).or_default().insert(
            name.to_string(),
            json!({"provider": node.provider, "type": "probe", "inputs": {"value": refs, "ms": rng.below(max_ms + 1), "fail": node.fail}}),
        );
    }
    let resources: serde_json::Map<String, Value> = groups
        .into_iter()
        .map(|(g, r)| (g, json!({"resources": r})))
        .collect();
    let providers: serde_json::Map<String, Value> = providers
        .iter()
        .map(|(name, limit)| {
            (
                name.to_string(),
                json!({"executable": testing_provider(), "maxConcurrency": limit}),
            )
        })
        .collect();
    json!({"providers": providers, "resources": resources})
}

pub fn events(stdout: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Whether `program` (a Nix tool) runs here. Without it a test says so loudly and skips;
/// under `CI=true` a missing Nix is a failure.
pub fn nix_tool(program: &str, what: &str) -> bool {
    let found = std::process::Command::new(program)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        let message = format!(
            "{program} is not installed: {what} cannot run. Install it with: apt-get install -y nix-bin"
        );
        capstan_test_support::skip_or_fail(&message);
    }
    found
}

/// Runs `capstan ARGS` in `dir` with no standard input.
pub fn capstan_in(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(capstan_bin())
        .args(args)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

/// Everything a command printed, stdout then stderr.
pub fn shown(output: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// How long the tests wait for anything before calling it hung. Generous, since these
/// machines are shared and slow at times: it guards against a hang, it never measures speed
/// (no test here asserts how fast something is; a wrong behaviour takes forever instead).
pub const HANG: std::time::Duration = std::time::Duration::from_secs(90);

/// Waits until `check` holds, or fails naming `what` once [`HANG`] has passed. The one
/// polling loop of these tests.
pub fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + HANG;
    while !check() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Kills a child that is still running after [`HANG`], so that a test reading its output
/// fails instead of hanging; [`Watchdog::finish`] says whether it had to.
pub struct Watchdog {
    what: String,
    done: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<bool>,
}

impl Watchdog {
    pub fn new(child: &std::process::Child, what: &str) -> Self {
        let pid = child.id() as i32;
        let (done, finished) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let hung = finished.recv_timeout(HANG).is_err();
            if hung {
                // SAFETY: a plain kill of a child this test started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            hung
        });
        Watchdog {
            what: what.to_string(),
            done,
            thread,
        }
    }

    /// Call once the child has ended: fails the test if it was killed as hung.
    pub fn finish(self) {
        let _ = self.done.send(());
        assert!(
            !self.thread.join().unwrap(),
            "{} hung (killed after {HANG:?})",
            self.what
        );
    }
}

/// Waits for `child` to end, killing it and failing (naming `what`) if it is still running
/// after [`HANG`].
pub fn output_within(child: std::process::Child, what: &str) -> std::process::Output {
    let watchdog = Watchdog::new(&child, what);
    let output = child.wait_with_output().unwrap();
    watchdog.finish();
    output
}

/// Whether a process with this pid runs (and is not a zombie).
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}
