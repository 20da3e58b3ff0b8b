//! Whatever ends a run — SIGINT, SIGTERM, SIGHUP, SIGKILL, or its output closing — no process
//! started for it outlives it, and what it did is recorded. Each test checks the machine's
//! process table for the commands it started (by a marker no other process has).

use std::path::Path;
use std::process::{Child, Command, Stdio};

use crate::support::capstan_bin;

/// Live (not zombie) processes whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let path = entry.path();
        let Ok(stat) = std::fs::read_to_string(path.join("stat")) else {
            continue;
        };
        let state = stat
            .rfind(')')
            .and_then(|at| stat[at + 1..].split_whitespace().next());
        if state == Some("Z") {
            continue;
        }
        let Ok(cmdline) = std::fs::read(path.join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(marker) {
            found.push(format!(
                "{}: {cmdline}",
                entry.file_name().to_string_lossy()
            ));
        }
    }
    found
}

use crate::support::wait_until;

/// A unique marker: a sleep duration no other test or process uses.
fn marker(tag: u32) -> String {
    format!("{}.{tag}{}", 300 + tag, std::process::id() % 100_000)
}

/// A deployment with one `exec` that starts a shell which starts `sleep MARKER`: a grandchild
/// of the provider, in a process group of its own.
fn sleeping_deployment(dir: &Path, marker: &str) -> std::path::PathBuf {
    let file = dir.join("capstan.json");
    let deployment = serde_json::json!({
        "providers": {"local": {"builtin": "local"}},
        "resources": {
            "nap": {"provider": "local", "type": "exec",
                    "inputs": {"command": "sh", "args": ["-c", format!("sleep {marker}; echo done")]}}
        }
    });
    std::fs::write(&file, deployment.to_string()).unwrap();
    file
}

fn start_apply(file: &Path) -> Child {
    Command::new(capstan_bin())
        .args(["apply", "-f"])
        .arg(file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn pending(file: &Path) -> String {
    let out = Command::new(capstan_bin())
        .args(["state", "pending", "-f"])
        .arg(file)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A signal in the middle of an operation: graceful stop with the signal's exit code, the
/// operation recorded as interrupted, and no process left.
fn graceful_stop_on(signal: libc::c_int, tag: u32) {
    let dir = tempfile::tempdir().unwrap();
    let marker = marker(tag);
    let file = sleeping_deployment(dir.path(), &marker);
    let apply = start_apply(&file);
    wait_until("the command runs", || !processes_with(&marker).is_empty());
    // SAFETY: signals the child we started.
    unsafe { libc::kill(apply.id() as i32, signal) };
    let out = apply.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(128 + signal),
        "exit code after signal {signal}:\n{stderr}"
    );
    assert!(stderr.contains("stopping gracefully"), "{stderr}");
    let said = stderr
        .lines()
        .filter(|l| l.contains("stopping") || l.contains("cancelling"))
        .count();
    assert_eq!(said, 1, "the stop is said once:\n{stderr}");
    assert!(
        processes_with(&marker).is_empty(),
        "processes outlived capstan: {:?}",
        processes_with(&marker)
    );
    assert!(
        pending(&file).starts_with("nap\tcreate"),
        "the interrupted create is recorded as pending"
    );
    let json = Command::new(capstan_bin())
        .args(["state", "pending", "--json", "-f"])
        .arg(&file)
        .output()
        .unwrap();
    let pending: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(pending[0]["address"], "nap");
    assert_eq!(pending[0]["operation"], "create");
    let started = pending[0]["started"].as_str().unwrap();
    assert!(
        started.len() == 20 && started.ends_with('Z') && started.as_bytes()[10] == b'T',
        "RFC 3339: {started}"
    );
}

#[test]
fn sigterm_stops_gracefully_and_leaves_no_process() {
    graceful_stop_on(libc::SIGTERM, 1);
}

#[test]
fn sighup_stops_gracefully_and_leaves_no_process() {
    graceful_stop_on(libc::SIGHUP, 2);
}

#[test]
fn sigint_stops_gracefully_and_leaves_no_process() {
    graceful_stop_on(libc::SIGINT, 3);
}

#[test]
fn after_sigkill_nothing_capstan_started_survives() {
    let dir = tempfile::tempdir().unwrap();
    let marker = marker(4);
    let file = sleeping_deployment(dir.path(), &marker);
    let mut apply = start_apply(&file);
    wait_until("the command runs", || !processes_with(&marker).is_empty());
    apply.kill().unwrap();
    apply.wait().unwrap();
    wait_until("the command started for the run is gone", || {
        processes_with(&marker).is_empty()
    });
    assert!(
        pending(&file).starts_with("nap\tcreate"),
        "the create that was running is pending"
    );
}

#[test]
fn after_sigkill_only_the_operations_that_were_sent_are_pending() {
    // 16 creates with `-j 2`: the run journals intents a window ahead of its calls, but only
    // two calls are out when it is killed.
    let dir = tempfile::tempdir().unwrap();
    let marker = marker(6);
    let file = dir.path().join("capstan.json");
    let resources: serde_json::Map<String, serde_json::Value> = (0..16)
        .map(|i| {
            (
                format!("nap{i:02}"),
                serde_json::json!({"provider": "local", "type": "exec",
                    "inputs": {"command": "sh", "args": ["-c", format!("sleep {marker}")]}}),
            )
        })
        .collect();
    std::fs::write(
        &file,
        serde_json::json!({"providers": {"local": {"builtin": "local"}}, "resources": resources})
            .to_string(),
    )
    .unwrap();
    let mut apply = Command::new(capstan_bin())
        .args(["apply", "-j", "2", "-f"])
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("two commands run", || processes_with(&marker).len() >= 2);
    // The intents journaled ahead are durable by now.
    std::thread::sleep(std::time::Duration::from_millis(300));
    apply.kill().unwrap();
    apply.wait().unwrap();
    wait_until("the commands are gone", || {
        processes_with(&marker).is_empty()
    });
    let journal = std::fs::read_to_string(dir.path().join(".capstan/journal")).unwrap();
    assert!(
        journal.matches("\"intent\"").count() > 2,
        "the run journaled intents ahead of its calls:\n{journal}"
    );
    let pending = pending(&file);
    assert_eq!(
        pending.lines().count(),
        2,
        "only the two operations sent are pending:\n{pending}"
    );
    // A command that takes the lock settles the others for good (the next run's `sent` file
    // no longer tells about them): after resolving one, the other is all that is left.
    let first = pending.split('\t').next().unwrap().to_string();
    let out = Command::new(capstan_bin())
        .args(["state", "resolve", &first, "-f"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let pending = self::pending(&file);
    assert_eq!(pending.lines().count(), 1, "{pending}");
    assert!(!pending.contains(&first), "{pending}");
}

#[test]
fn a_stop_while_a_provider_starts_up_ends_the_command_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let marker = marker(5);
    // A "provider" that never answers its handshake.
    let script = dir.path().join("silent-provider");
    std::fs::write(&script, format!("#!/bin/sh\nexec sleep {marker}\n")).unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let file = dir.path().join("capstan.json");
    let deployment = serde_json::json!({
        "providers": {"silent": {"executable": script}},
        "resources": {"x": {"provider": "silent", "type": "t"}}
    });
    std::fs::write(&file, deployment.to_string()).unwrap();
    let apply = start_apply(&file);
    wait_until("the provider starts", || {
        !processes_with(&marker).is_empty()
    });
    // SAFETY: signals the child we started.
    unsafe { libc::kill(apply.id() as i32, libc::SIGINT) };
    let out = crate::support::output_within(apply, "capstan stopped while a provider starts");
    // 130, not the handshake timeout's error (exit 2): the stop cut the wait short.
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(processes_with(&marker).is_empty());
}

/// A command whose output cannot be written (a full disk) does not report success.
#[test]
fn every_command_whose_output_is_lost_exits_141() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("capstan.json"),
        r#"{"providers": {"local": {"builtin": "local"}}, "resources": {"m": {"provider": "local", "type": "memo", "inputs": {"value": 1}}}}"#,
    )
    .unwrap();
    let run = |args: &[&str], stdout: Stdio| {
        Command::new(capstan_bin())
            .args(args)
            .current_dir(dir.path())
            .stdout(stdout)
            .stderr(Stdio::null())
            .status()
            .unwrap()
    };
    assert!(run(&["apply"], Stdio::null()).success());
    for args in [
        &["state", "list"][..],
        &["state", "list", "--json"],
        &["state", "show", "m"],
        &["provider", "describe", "local"],
        &["--help"],
        &["--version"],
        &["plan"],
    ] {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        assert_eq!(run(args, full.into()).code(), Some(141), "{args:?}");
        // And the same, written where it can be, succeeds.
        assert_eq!(run(args, Stdio::null()).code(), Some(0), "{args:?}");
    }
}

#[test]
fn a_closed_output_lets_the_run_finish_and_exits_141() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("capstan.json");
    let resources: serde_json::Map<String, serde_json::Value> = (0..5)
        .map(|i| {
            (
                format!("r{i}"),
                serde_json::json!({"provider": "local", "type": "exec",
                    "inputs": {"command": "sh", "args": ["-c", "for i in 1 2 3 4 5; do echo line $i; sleep 0.05; done"]}}),
            )
        })
        .collect();
    std::fs::write(
        &file,
        serde_json::json!({"providers": {"local": {"builtin": "local"}}, "resources": resources})
            .to_string(),
    )
    .unwrap();
    for json in [false, true] {
        let _ = std::fs::remove_dir_all(dir.path().join(".capstan"));
        let mut command = Command::new(capstan_bin());
        command.args(["apply", "-f"]).arg(&file);
        if json {
            command.arg("--json");
        }
        let mut apply = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The reader goes away before the first line (as `| head -0` would).
        drop(apply.stdout.take());
        drop(apply.stderr.take());
        let status = apply.wait().unwrap();
        assert_eq!(status.code(), Some(141), "--json {json}");
        let list = Command::new(capstan_bin())
            .args(["state", "list", "-f"])
            .arg(&file)
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&list.stdout).lines().count(),
            5,
            "every resource was created and recorded (--json {json})"
        );
        assert_eq!(
            pending(&file),
            "",
            "nothing is left pending (--json {json})"
        );
    }
}

#[test]
fn a_reader_that_falls_behind_does_not_hold_the_run_back() {
    // Nobody reads the --json stream until the run is over: far more than a pipe holds. The
    // run still finishes (the state says so) while its output waits.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("capstan.json");
    let resources: serde_json::Map<String, serde_json::Value> = (0..2000)
        .map(|i| {
            (
                format!("r{i}"),
                serde_json::json!({"provider": "t", "type": "noop", "inputs": {"value": "x".repeat(200)}}),
            )
        })
        .collect();
    std::fs::write(
        &file,
        serde_json::json!({"providers": {"t": {"executable": crate::support::testing_provider()}}, "resources": resources})
            .to_string(),
    )
    .unwrap();
    let mut apply = Command::new(capstan_bin())
        .args(["apply", "--json", "-f"])
        .arg(&file)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("every resource is recorded while stdout is unread", || {
        let out = Command::new(capstan_bin())
            .args(["state", "list", "-f"])
            .arg(&file)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).lines().count() == 2000
    });
    let mut stdout = apply.stdout.take().unwrap();
    let mut all = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut all).unwrap();
    assert!(apply.wait().unwrap().success());
    assert!(
        all.contains("\"type\":\"summary\""),
        "the whole stream arrives"
    );
}

#[test]
fn a_command_dies_with_its_provider_even_when_every_capstan_process_is_killed_at_once() {
    // `pkill -9` of the core, the reaper and the provider together: nobody is left to clean
    // up, so the provider's command must go with the provider by itself.
    let dir = tempfile::tempdir().unwrap();
    let marker = marker(7);
    let file = dir.path().join("capstan.json");
    let deployment = serde_json::json!({
        "providers": {"local": {"builtin": "local"}},
        "resources": {
            "nap": {"provider": "local", "type": "exec", "inputs": {"command": "sleep", "args": [marker]}}
        }
    });
    std::fs::write(&file, deployment.to_string()).unwrap();
    let mut apply = Command::new(capstan_bin())
        .args(["apply", "-f"])
        .arg(&file)
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the command runs", || !processes_with(&marker).is_empty());
    // Every capstan process working in this directory: the core, its reaper, the provider.
    let ours: Vec<i32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let exe = std::fs::read_link(entry.path().join("exe")).ok()?;
            let cwd = std::fs::read_link(entry.path().join("cwd")).ok()?;
            (exe == Path::new(capstan_bin()) && cwd == dir.path()).then_some(pid)
        })
        .collect();
    assert!(ours.len() >= 3, "core, reaper and provider: {ours:?}");
    for pid in &ours {
        // SAFETY: SIGKILL to processes this test started.
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
    let _ = apply.wait();
    wait_until("the provider's command is gone with it", || {
        processes_with(&marker).is_empty()
    });
}
