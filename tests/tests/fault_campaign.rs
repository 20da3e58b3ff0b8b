//! The fault campaign: provider faults, host kills and a full disk, each checked against the
//! invariants that make Capstan trustworthy, with the figures printed (runs, faults injected,
//! invariant violations). Modest sizes here (CI); `CAPSTAN_FAULTS_FULL=1` runs the full size
//! that RELIABILITY.md records:
//!
//!     CAPSTAN_FAULTS_FULL=1 cargo test --release -p capstan-tests --test fault_campaign -- --nocapture --test-threads 1
//!
//! Real `capstan` processes, real provider processes over real sockets, real SIGKILLs, a real
//! (small) tmpfs for the disk.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use capstan_tests::{testing_provider, workspace_binary};
use serde_json::{json, Value};

fn full() -> bool {
    std::env::var("CAPSTAN_FAULTS_FULL").is_ok_and(|v| v == "1")
}

/// Where a campaign keeps the state: `None` for the directory beside the deployment, or a
/// `postgres://` URL (a real server the test started), passed as `CAPSTAN_STATE`.
type StateAt<'a> = Option<&'a str>;

fn capstan(dir: &Path, args: &[&str]) -> Output {
    capstan_at(dir, args, None)
}

fn capstan_at(dir: &Path, args: &[&str], at: StateAt) -> Output {
    let mut command = Command::new(workspace_binary("capstan"));
    command.args(args).current_dir(dir).stdin(Stdio::null());
    if let Some(url) = at {
        command.env("CAPSTAN_STATE", url);
    }
    command.output().unwrap()
}

/// A real PostgreSQL for a campaign, and the URL of a deployment's state in it.
fn postgres(name: &str) -> Option<(capstan_test_support::postgres::Postgres, String)> {
    use capstan_test_support::postgres::{unavailable, Postgres};
    if let Some(why) = unavailable() {
        capstan_test_support::skip_or_fail(&why);
        return None;
    }
    let pg = Postgres::start();
    pg.create_database("campaign");
    let url = format!("{}&deployment={name}", pg.url("campaign"));
    Some((pg, url))
}

fn events(stdout: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// xorshift64*.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The state as `capstan state list/pending` read it (read-only), or why it cannot be read.
struct Seen {
    recorded: BTreeSet<String>,
    pending: BTreeSet<String>,
}

fn state(dir: &Path, extra: &[&str]) -> Result<Seen, String> {
    state_at(dir, extra, None)
}

fn state_at(dir: &Path, extra: &[&str], at: StateAt) -> Result<Seen, String> {
    let read = |what: &str| -> Result<Vec<Value>, String> {
        let mut args = vec!["state", what, "--json"];
        args.extend_from_slice(extra);
        let out = capstan_at(dir, &args, at);
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        serde_json::from_slice::<Value>(&out.stdout)
            .map_err(|e| e.to_string())
            .map(|v| v.as_array().cloned().unwrap_or_default())
    };
    let names = |list: Vec<Value>| {
        list.iter()
            .filter_map(|r| r["address"].as_str().map(str::to_string))
            .collect()
    };
    Ok(Seen {
        recorded: names(read("list")?),
        pending: names(read("pending")?),
    })
}

/// Processes still running that belong to the run in `dir` (its capstan, providers, reaper).
fn survivors(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let cwd = std::fs::read_link(entry.path().join("cwd")).unwrap_or_default();
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
        if status.contains("State:\tZ") {
            continue;
        }
        if cwd.starts_with(dir) || cmdline.contains(&needle) {
            found.push(format!("{pid} {}", cmdline.trim()));
        }
    }
    found
}

fn wait_no_survivors(dir: &Path) -> Vec<String> {
    let start = Instant::now();
    loop {
        let left = survivors(dir);
        if left.is_empty() || start.elapsed() > Duration::from_secs(10) {
            return left;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Files under `dir` that a crash could leave: sockets and temporary files.
fn leftovers(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().to_string();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                stack.push(path);
            } else if {
                use std::os::unix::fs::FileTypeExt;
                kind.is_socket()
            } || name.contains(".capstan-tmp")
                || name.ends_with(".tmp")
                || name.contains(".binding")
            {
                found.push(path.display().to_string());
            }
        }
    }
    found
}

#[derive(Default)]
struct Figures {
    runs: usize,
    operations: usize,
    faults: BTreeMap<&'static str, usize>,
    kills: usize,
    violations: Vec<String>,
}

impl Figures {
    fn print(&self, title: &str) {
        eprintln!("\n== {title} ==");
        eprintln!("runs: {}", self.runs);
        eprintln!("operations: {}", self.operations);
        if !self.faults.is_empty() {
            let faults: Vec<String> = self
                .faults
                .iter()
                .filter(|(_, v)| **v > 0)
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            eprintln!(
                "faults injected: {} ({})",
                self.faults.values().sum::<usize>(),
                faults.join(", ")
            );
        }
        if self.kills > 0 {
            eprintln!("SIGKILLs: {}", self.kills);
        }
        eprintln!("invariant violations: {}", self.violations.len());
        for v in self.violations.iter().take(20) {
            let short: String = v.chars().take(600).collect();
            eprintln!("  - {short}");
        }
    }
}

// ---- provider faults ---------------------------------------------------------------------

const FAULTS: [&str; 6] = ["error", "partial", "slow", "hang", "crash", "garbage"];

#[test]
fn provider_faults_lose_nothing_and_skip_only_what_depends_on_them() {
    provider_faults(None, "provider faults");
}

#[test]
fn provider_faults_lose_nothing_with_the_state_in_postgres() {
    let Some((_pg, url)) = postgres("faults") else {
        return;
    };
    provider_faults(Some(&url), "provider faults, state in PostgreSQL");
}

fn provider_faults(at: StateAt, title: &str) {
    let (runs, size) = if full() { (5, 1000) } else { (2, 150) };
    let mut figures = Figures::default();
    for run in 0..runs {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path().canonicalize().unwrap();
        let markers = dir.join("markers");
        std::fs::create_dir(&markers).unwrap();
        let mut rng = Rng(0xfa_u64.wrapping_mul(run as u64 + 7) ^ 0x1234_5678);
        let mut resources = serde_json::Map::new();
        let mut fault_of = BTreeMap::new();
        let mut provider_of = BTreeMap::new();
        let mut deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for i in 0..size {
            let name = format!("r{i}");
            let fault = if rng.below(100) < 6 {
                FAULTS[rng.below(FAULTS.len() as u64) as usize]
            } else {
                "none"
            };
            *figures.faults.entry(fault).or_default() += usize::from(fault != "none");
            // A crash or garbage ends its provider's connection: those go to `fragile`, with
            // some innocent resources beside them; the rest to `sturdy`.
            let provider = if matches!(fault, "crash" | "garbage") || rng.below(100) < 8 {
                "fragile"
            } else {
                "sturdy"
            };
            let mut after = Vec::new();
            for _ in 0..rng.below(3) {
                if i > 0 {
                    let j = rng.below(i as u64) as usize;
                    after.push(format!("r{j}"));
                }
            }
            after.sort();
            after.dedup();
            let refs: Vec<Value> = after
                .iter()
                .map(|a| json!({"$ref": format!("{a}#marker")}))
                .collect();
            resources.insert(
                name.clone(),
                json!({"provider": provider, "type": "faulty",
                       "inputs": {"dir": markers, "name": name, "fault": fault, "after": refs}}),
            );
            fault_of.insert(name.clone(), fault);
            provider_of.insert(name.clone(), provider);
            deps.insert(name, after);
        }
        let provider = |extra: Value| {
            let mut p = json!({"executable": testing_provider(), "timeout": 1});
            p.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            p
        };
        let deployment = json!({
            "providers": {"sturdy": provider(json!({})), "fragile": provider(json!({"maxConcurrency": 2}))},
            "resources": resources,
        });
        std::fs::write(dir.join("capstan.json"), deployment.to_string()).unwrap();
        // Each run a deployment of its own (in one database: a name each).
        let url = at.map(|url| format!("{url}-{run}"));
        let out = capstan_at(&dir, &["apply", "--json", "--jobs", "16"], url.as_deref());
        figures.runs += 1;
        figures.operations += size;
        let all = events(&out.stdout);
        let mut v = |text: String| figures.violations.push(format!("run {run}: {text}"));
        // The state reads.
        let seen = match state_at(&dir, &[], url.as_deref()) {
            Ok(seen) => seen,
            Err(e) => {
                v(format!("the state does not read: {e}"));
                continue;
            }
        };
        let ended: BTreeMap<String, &Value> = all
            .iter()
            .filter(|e| {
                matches!(
                    e["type"].as_str(),
                    Some("resource_complete" | "resource_failed" | "resource_skipped")
                )
            })
            .filter_map(|e| Some((e["address"].as_str()?.to_string(), e)))
            .collect();
        for (name, fault) in &fault_of {
            let marker = markers.join(name).exists();
            let recorded = seen.recorded.contains(name);
            let pending = seen.pending.contains(name);
            // Every side effect of a completed operation is recorded; of an interrupted one,
            // pending; of a create that failed after making it, recorded (tainted).
            if marker && !recorded && !pending {
                v(format!(
                    "{name} ({fault}) made its marker but is neither recorded nor pending"
                ));
            }
            if recorded && !marker {
                v(format!("{name} is recorded but made nothing"));
            }
            // Every resource ended with an event, and one that did not succeed says why.
            match ended.get(name) {
                None => v(format!("{name} has no end event")),
                Some(e) if e["type"] != "resource_complete" => {
                    let why = e["reason"].as_str().or(e["error"].as_str()).unwrap_or("");
                    if why.is_empty() {
                        v(format!("{name} ended without a reason: {e}"));
                    }
                }
                Some(_) => {}
            }
        }
        // Independent work completed: on `sturdy`, with no fault upstream, never on `fragile`.
        let mut clean: BTreeMap<&str, bool> = BTreeMap::new();
        for i in 0..size {
            let name = format!("r{i}");
            let ok = fault_of[&name] == "none"
                && provider_of[&name] == "sturdy"
                && deps[&name].iter().all(|d| clean[d.as_str()]);
            let key: &str = fault_of.get_key_value(&name).unwrap().0;
            clean.insert(key, ok);
            if ok && !seen.recorded.contains(&name) {
                v(format!(
                    "{name} depends on nothing that failed, yet was not made"
                ));
            }
        }
        // Dependents of a failure are skipped, naming it.
        for e in all.iter().filter(|e| e["type"] == "resource_skipped") {
            if e["dependency"].as_str().unwrap_or("").is_empty() {
                v(format!("skipped without naming what failed: {e}"));
            }
        }
    }
    figures.print(title);
    assert!(figures.violations.is_empty(), "{:#?}", figures.violations);
}

// ---- host faults -------------------------------------------------------------------------

/// The deployment of the host-fault runs, generation `generation` (each rewrites everything,
/// so that every run has work to be killed in).
fn host_deployment(dir: &Path, size: usize, generation: usize) {
    let mut resources = serde_json::Map::new();
    let mut rng = Rng(0xdead_beef);
    for i in 0..size {
        let name = format!("f{i}");
        if i % 5 == 4 {
            // A command, as a side effect too (slower: it sleeps a little), after a file.
            let file = (rng.below(i as u64) as usize / 5) * 5;
            resources.insert(
                name.clone(),
                json!({"provider": "local", "type": "exec",
                       "inputs": {"command": "sh", "args": ["-c", format!("sleep 0.02; echo '{i} gen {generation}' > cmd-{i}.txt")],
                                  "env": {"AFTER": {"$ref": format!("f{file}#path")}}}}),
            );
        } else {
            resources.insert(
                name.clone(),
                json!({"provider": "local", "type": "file",
                       "inputs": {"path": format!("files/{name}.txt"), "content": format!("{i} gen {generation}\n"), "mode": "0644"}}),
            );
        }
    }
    std::fs::write(
        dir.join("capstan.json"),
        json!({"providers": {"local": {"builtin": "local"}}, "resources": resources}).to_string(),
    )
    .unwrap();
}

#[test]
fn sigkill_at_random_moments_loses_nothing_and_the_next_apply_converges() {
    let (size, kills) = if full() { (1000, 50) } else { (200, 8) };
    sigkills(None, size, kills, "host faults (SIGKILL)");
}

/// Issue 22: 50 kills with the state in PostgreSQL, in CI too.
#[test]
fn sigkill_with_the_state_in_postgres_loses_nothing_and_the_next_apply_converges() {
    let Some((_pg, url)) = postgres("kills") else {
        return;
    };
    let size = if full() { 1000 } else { 200 };
    sigkills(
        Some(&url),
        size,
        50,
        "host faults (SIGKILL), state in PostgreSQL",
    );
}

/// The state as it is now, read without a lock.
fn read_state(
    dir: &Path,
    at: StateAt,
) -> Result<(capstan_engine::state::State, Vec<usize>), String> {
    match at {
        None => capstan_engine::state::read_only(&dir.join(".capstan"))
            .map(|(state, report)| (state, report.damaged))
            .map_err(|e| e.to_string()),
        Some(url) => {
            let location = capstan_state_postgres::Location::parse(url)?;
            capstan_state_postgres::read_only(&location, None)
                .map(|look| (look.state, look.report.damaged))
                .map_err(|e| e.to_string())
        }
    }
}

fn sigkills(at: StateAt, size: usize, kills: usize, title: &str) {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().canonicalize().unwrap();
    let mut rng = Rng(0xfee1_dead);
    let mut figures = Figures::default();
    let mut generation = 0;
    while figures.kills < kills && figures.runs < kills * 3 {
        generation += 1;
        host_deployment(&dir, size, generation);
        let mut command = Command::new(workspace_binary("capstan"));
        command
            .args(["apply", "--jobs", "4"])
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(url) = at {
            command.env("CAPSTAN_STATE", url);
        }
        let mut child = command.spawn().unwrap();
        std::thread::sleep(Duration::from_millis(
            5 + rng.below(if full() { 1500 } else { 300 }),
        ));
        let finished = child.try_wait().unwrap().is_some();
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        let _ = child.wait();
        figures.runs += 1;
        figures.operations += size;
        figures.kills += usize::from(!finished);
        let k = figures.runs;
        let mut v = |text: String| figures.violations.push(format!("run {k}: {text}"));
        let left = wait_no_survivors(&dir);
        if !left.is_empty() {
            v(format!("processes survived: {left:?}"));
        }
        let state = match read_state(&dir, at) {
            Ok((state, damaged)) if damaged.is_empty() => state,
            Ok((_, damaged)) => {
                v(format!("damaged journal lines: {damaged:?}"));
                continue;
            }
            Err(e) => {
                v(format!("the state does not read: {e}"));
                continue;
            }
        };
        // Every side effect on disk is known to the state: what is there is what a recorded
        // or a pending operation says.
        for i in 0..size {
            let name = format!("f{i}");
            let exec = i % 5 == 4;
            let effect = if exec {
                dir.join(format!("cmd-{i}.txt"))
            } else {
                dir.join(format!("files/{name}.txt"))
            };
            let Ok(content) = std::fs::read_to_string(&effect) else {
                continue;
            };
            let generation = content.trim().to_string();
            let says = |inputs: &capstan_schema::Json| inputs.text().contains(&generation);
            // (A resource an interrupted operation was found to have changed is recorded with
            // what was found: its outputs say so.)
            let recorded = state
                .resources
                .get(&name)
                .is_some_and(|r| says(&r.inputs) || says(&r.outputs));
            // Or its resource is pending: an operation on it was interrupted and nobody can
            // tell what it did (a command cannot be read back), so the state says it is
            // uncertain — a later intent for it replaces the earlier one.
            let pending = state.pending.contains_key(&name);
            if !recorded && !pending {
                v(format!("{} holds `{generation}`, which nothing recorded of {name} says, and {name} is not pending", effect.display()));
            }
        }
        for s in leftovers(&dir).into_iter().filter(|p| p.ends_with(".sock")) {
            v(format!("socket left: {s}"));
        }
    }
    // The next apply converges, and a plan after it is a no-op.
    let out = capstan_at(&dir, &["apply", "--jobs", "8"], at);
    figures.runs += 1;
    if !out.status.success() {
        figures.violations.push(format!(
            "the apply after the kills failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let plan = capstan_at(&dir, &["plan", "--detailed-exitcode"], at);
    if plan.status.code() != Some(0) {
        figures.violations.push(format!(
            "the plan after converging is not a no-op: {}",
            String::from_utf8_lossy(&plan.stdout)
        ));
    }
    for left in leftovers(&dir) {
        figures
            .violations
            .push(format!("left behind after converging: {left}"));
    }
    if let Ok(seen) = state_at(&dir, &[], at) {
        if seen.recorded.len() != size || !seen.pending.is_empty() {
            figures.violations.push(format!(
                "after converging: {} recorded, {} pending",
                seen.recorded.len(),
                seen.pending.len()
            ));
        }
    }
    figures.print(title);
    assert!(
        figures.kills >= kills,
        "only {} of the runs were killed before they ended",
        figures.kills
    );
    assert!(figures.violations.is_empty(), "{:#?}", figures.violations);
}

// ---- disk faults -------------------------------------------------------------------------

/// A small tmpfs at `at`, unmounted on drop.
struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_stops_the_run_before_anything_unrecorded_happens() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().canonicalize().unwrap();
    let mount = dir.join("state-disk");
    std::fs::create_dir(&mount).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&mount)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        let message = "cannot mount a tmpfs (needs root): the disk faults cannot run";
        capstan_test_support::skip_or_fail(message);
        return;
    }
    let _tmpfs = Tmpfs(mount.clone());
    let markers = dir.join("markers");
    std::fs::create_dir(&markers).unwrap();
    let size = if full() { 600 } else { 300 };
    let runs = if full() { 3 } else { 1 };
    let mut figures = Figures::default();
    for run in 0..runs {
        let state_dir = mount.join(format!(".capstan-{run}"));
        let state_arg = state_dir.to_string_lossy().to_string();
        let mut resources = serde_json::Map::new();
        for i in 0..size {
            let name = format!("d{run}-{i}");
            resources.insert(
                name.clone(),
                json!({"provider": "t", "type": "faulty",
                       "inputs": {"dir": markers, "name": name, "after": "x".repeat(500)}}),
            );
        }
        std::fs::write(
            dir.join("capstan.json"),
            json!({"providers": {"t": {"executable": testing_provider()}}, "resources": resources})
                .to_string(),
        )
        .unwrap();
        // Nearly full: what the journal can take is far less than the run needs.
        let filler = mount.join("filler");
        let _ = std::fs::remove_file(&filler);
        let free = 1024 * 1024 - 96 * 1024;
        std::fs::write(&filler, vec![0u8; free]).unwrap();
        let out = capstan(&dir, &["apply", "--state", &state_arg, "--jobs", "8"]);
        figures.runs += 1;
        figures.operations += size;
        *figures.faults.entry("disk full").or_default() += 1;
        let mut v = |text: String| figures.violations.push(format!("run {run}: {text}"));
        if out.status.success() {
            v("the apply succeeded on a full disk (the test did not fill it)".into());
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !stderr.contains("state could not be written") && !stderr.contains("No space") {
            v(format!("no clear error: {stderr}"));
        }
        match state(&dir, &["--state", &state_arg]) {
            Err(e) => v(format!("the state does not read: {e}")),
            Ok(seen) => {
                for i in 0..size {
                    let name = format!("d{run}-{i}");
                    if markers.join(&name).exists()
                        && !seen.recorded.contains(&name)
                        && !seen.pending.contains(&name)
                    {
                        v(format!("{name} ran without its intent recorded"));
                    }
                }
            }
        }
        // Space again: the next run converges, and a plan after it is a no-op.
        std::fs::remove_file(&filler).unwrap();
        let out = capstan(&dir, &["apply", "--state", &state_arg, "--jobs", "8"]);
        figures.runs += 1;
        if !out.status.success() {
            v(format!(
                "the apply with space again failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let plan = capstan(
            &dir,
            &["plan", "--state", &state_arg, "--detailed-exitcode"],
        );
        if plan.status.code() != Some(0) {
            v(format!(
                "the plan after converging is not a no-op: {}",
                String::from_utf8_lossy(&plan.stdout)
            ));
        }
        let _ = std::fs::remove_dir_all(&state_dir);
    }
    figures.print("disk faults");
    assert!(figures.violations.is_empty(), "{:#?}", figures.violations);
}
