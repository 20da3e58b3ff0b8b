//! The built-in `nix` provider with the real Nix tools (Debian's nix-bin), offline: builds
//! whose builder is /bin/sh, Nix's progress arriving while the build runs, activation of a
//! profile, rollback on a failed activation, and clear errors.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use crate::support::capstan_bin;
use serde_json::{json, Value};

fn nix_available() -> bool {
    crate::support::nix_tool("nix-build", "the Nix provider tests")
}

const OFFLINE: [&str; 4] = ["--option", "substituters", "", "--option"];

fn build_inputs(file: &str) -> Value {
    json!({"file": file, "args": [OFFLINE[0], OFFLINE[1], OFFLINE[2], OFFLINE[3], "sandbox", "false"]})
}

/// A derivation that prints lines with pauses; `nonce` makes it a new build every time.
fn derivation(nonce: &str, activate_status: u8, fail_build: bool) -> String {
    format!(
        r#"derivation {{
  name = "capstan-test";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  PATH = "/usr/bin:/bin";
  nonce = "{nonce}";
  args = [ "-c" ''
    echo "step one"
    sleep 0.6
    echo "step two"
    sleep 0.6
    echo "step three"
    {fail}
    mkdir -p $out/bin
    printf '#!/bin/sh\necho "activated {nonce}"\nexit {activate_status}\n' > $out/bin/activate
    chmod +x $out/bin/activate
  '' ];
}}"#,
        fail = if fail_build {
            "echo 'the compiler is unhappy' >&2; exit 7"
        } else {
            ""
        },
    )
}

fn nonce() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

fn run(dir: &Path, args: &[&str]) -> (Output, Vec<Value>) {
    let out = Command::new(capstan_bin())
        .args(args)
        .arg("--json")
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let events = crate::support::events(&out.stdout);
    (out, events)
}

/// `capstan apply`, which must succeed.
fn apply_ok(dir: &Path) -> Vec<Value> {
    let (out, events) = run(dir, &["apply"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    events
}

fn write(dir: &Path, resources: Value) {
    std::fs::write(
        dir.join("capstan.json"),
        json!({"providers": {"nix": {"builtin": "nix"}}, "resources": resources}).to_string(),
    )
    .unwrap();
}

#[test]
fn a_build_streams_nixs_progress_while_it_runs_and_activation_switches_the_profile() {
    if !nix_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let nonce = nonce();
    std::fs::write(dir.path().join("good.nix"), derivation(&nonce, 0, false)).unwrap();
    write(
        dir.path(),
        json!({
            "build": {"provider": "nix", "type": "build", "inputs": build_inputs("good.nix")},
            "switch": {"provider": "nix", "type": "activate", "inputs": {"profile": "profiles/test", "path": {"$ref": "build#outPath"}}}
        }),
    );
    let (out, events) = run(dir.path(), &["apply"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let line_at = |line: &str| -> (f64, u64) {
        let e = events
            .iter()
            .find(|e| {
                e["type"] == "resource_progress"
                    && e["address"] == "build"
                    && e["progress"]["kind"] == "log"
                    && e["progress"]["line"] == line
            })
            .unwrap_or_else(|| panic!("no log line {line:?}"));
        (
            e["timestamp"].as_f64().unwrap(),
            e["progress"]["span"].as_u64().unwrap(),
        )
    };
    let (one, span) = line_at("step one");
    let (three, _) = line_at("step three");
    let done = events
        .iter()
        .find(|e| e["type"] == "resource_complete" && e["address"] == "build")
        .unwrap();
    assert!(
        three - one >= 0.9,
        "the lines arrived as they were printed ({:.2}s apart), not at the end",
        three - one
    );
    assert!(
        done["timestamp"].as_f64().unwrap() - one >= 0.9,
        "the first line arrived well before the build finished"
    );
    // The log lines hang under the span of Nix's build activity.
    let build_span = events
        .iter()
        .find(|e| {
            e["progress"]["kind"] == "span_start" && e["progress"]["id"].as_u64() == Some(span)
        })
        .expect("the build activity is a span");
    assert!(
        build_span["progress"]["fields"]
            .to_string()
            .contains("\"build\""),
        "{build_span}"
    );

    let out_path = done["outputs"]["outPath"].as_str().unwrap().to_string();
    assert!(out_path.starts_with("/nix/store/"), "{out_path}");
    let profile = dir.path().join("profiles/test");
    assert_eq!(
        std::fs::canonicalize(&profile).unwrap(),
        Path::new(&out_path)
    );
    assert!(
        events
            .iter()
            .any(|e| e["address"] == "switch"
                && e["progress"]["line"] == format!("activated {nonce}"))
    );

    // Destroy removes the generation the activation made.
    let (out, _) = run(dir.path(), &["destroy"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!dir.path().join("profiles/test-1-link").exists());
}

#[test]
fn a_failed_activation_rolls_the_profile_back() {
    if !nix_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("good.nix"), derivation(&nonce(), 0, false)).unwrap();
    std::fs::write(dir.path().join("bad.nix"), derivation(&nonce(), 3, false)).unwrap();
    write(
        dir.path(),
        json!({
            "good": {"provider": "nix", "type": "build", "inputs": build_inputs("good.nix")},
            "switch": {"provider": "nix", "type": "activate", "inputs": {"profile": "p/sys", "path": {"$ref": "good#outPath"}}}
        }),
    );
    apply_ok(dir.path());
    let first = std::fs::canonicalize(dir.path().join("p/sys")).unwrap();

    write(
        dir.path(),
        json!({
            "good": {"provider": "nix", "type": "build", "inputs": build_inputs("good.nix")},
            "bad": {"provider": "nix", "type": "build", "inputs": build_inputs("bad.nix")},
            "switch": {"provider": "nix", "type": "activate", "inputs": {"profile": "p/sys", "path": {"$ref": "bad#outPath"}}}
        }),
    );
    let (out, events) = run(dir.path(), &["apply"]);
    assert_eq!(out.status.code(), Some(1));
    let failed = events
        .iter()
        .find(|e| e["type"] == "resource_failed" && e["address"] == "switch")
        .expect("activation failed");
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("the profile was rolled back"),
        "{failed}"
    );
    assert_eq!(
        std::fs::canonicalize(dir.path().join("p/sys")).unwrap(),
        first,
        "the profile points where it did before"
    );
    assert!(
        !dir.path().join("p/sys-2-link").exists(),
        "the failed generation was removed"
    );
    // A second failure must again return to the first generation, not to a failed one.
    let (out, _) = run(dir.path(), &["apply"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        std::fs::canonicalize(dir.path().join("p/sys")).unwrap(),
        first
    );
}

#[test]
fn a_failed_build_reports_nixs_own_error_and_the_last_lines() {
    if !nix_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("broken.nix"), derivation(&nonce(), 0, true)).unwrap();
    std::fs::write(dir.path().join("typo.nix"), "derivation { name = ; }").unwrap();
    write(
        dir.path(),
        json!({
            "broken": {"provider": "nix", "type": "build", "inputs": build_inputs("broken.nix")},
            "typo": {"provider": "nix", "type": "build", "inputs": build_inputs("typo.nix")}
        }),
    );
    let (out, events) = run(dir.path(), &["apply"]);
    assert_eq!(out.status.code(), Some(1));
    let failed = |address: &str| {
        events
            .iter()
            .find(|e| e["type"] == "resource_failed" && e["address"] == address)
            .cloned()
            .unwrap()
    };
    let broken = failed("broken");
    assert!(
        broken["error"]
            .as_str()
            .unwrap()
            .contains("nix-build failed: builder for"),
        "{broken}"
    );
    assert!(
        broken["details"]
            .as_str()
            .unwrap()
            .contains("the compiler is unhappy"),
        "{broken}"
    );
    let typo = failed("typo");
    assert!(
        typo["error"].as_str().unwrap().contains("syntax error"),
        "{typo}"
    );
}

#[test]
fn without_nix_the_error_says_how_to_install_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("x.nix"), "1").unwrap();
    write(
        dir.path(),
        json!({"b": {"provider": "nix", "type": "build", "inputs": {"file": "x.nix"}}}),
    );
    let out = Command::new(capstan_bin())
        .args(["apply", "--json"])
        .current_dir(dir.path())
        .env("PATH", "/nonexistent")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let events = crate::support::events(&out.stdout);
    let failed = events
        .iter()
        .find(|e| e["type"] == "resource_failed")
        .unwrap();
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("apt-get install nix-bin"),
        "{failed}"
    );
}

#[test]
fn editing_the_nix_file_is_a_change_the_plan_sees_and_apply_builds() {
    if !nix_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("sys.nix"), derivation(&nonce(), 0, false)).unwrap();
    write(
        dir.path(),
        json!({
            "build": {"provider": "nix", "type": "build", "inputs": build_inputs("sys.nix")},
            "switch": {"provider": "nix", "type": "activate", "inputs": {"profile": "profiles/sys", "path": {"$ref": "build#outPath"}}}
        }),
    );
    apply_ok(dir.path());
    let before = std::fs::canonicalize(dir.path().join("profiles/sys")).unwrap();
    let (out, events) = run(dir.path(), &["plan"]);
    assert_eq!(out.status.code(), Some(0));
    let plan = &events.iter().find(|e| e["type"] == "plan").unwrap()["changes"];
    assert!(
        plan.as_array()
            .unwrap()
            .iter()
            .all(|c| c["action"] == "noop"),
        "nothing changed yet: {plan}"
    );

    // The same inputs (the file's name), a different derivation in it.
    let nonce = nonce();
    std::fs::write(dir.path().join("sys.nix"), derivation(&nonce, 0, false)).unwrap();
    let out = Command::new(capstan_bin())
        .arg("plan")
        .current_dir(dir.path())
        .output()
        .unwrap();
    let plan = String::from_utf8_lossy(&out.stdout);
    assert!(
        plan.contains("~ build (nix.build)  (changed while its inputs did not: read now, its `drvPaths` differs"),
        "{plan}"
    );
    assert!(
        plan.contains("~ switch (nix.activate)  (inputs known after build)"),
        "{plan}"
    );
    apply_ok(dir.path());
    let after = std::fs::canonicalize(dir.path().join("profiles/sys")).unwrap();
    assert_ne!(before, after, "the new build was activated");
    let (_, events) = run(dir.path(), &["plan"]);
    let plan = &events.iter().find(|e| e["type"] == "plan").unwrap()["changes"];
    assert!(
        plan.as_array()
            .unwrap()
            .iter()
            .all(|c| c["action"] == "noop"),
        "and then nothing is left to do: {plan}"
    );
}

#[test]
fn refresh_notices_a_profile_switched_or_removed_behind_capstan_s_back() {
    if !nix_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let nonce = nonce();
    std::fs::write(dir.path().join("good.nix"), derivation(&nonce, 0, false)).unwrap();
    write(
        dir.path(),
        json!({
            "build": {"provider": "nix", "type": "build", "inputs": build_inputs("good.nix")},
            "switch": {"provider": "nix", "type": "activate", "inputs": {"profile": "profiles/test", "path": {"$ref": "build#outPath"}}}
        }),
    );
    apply_ok(dir.path());
    let profiles = dir.path().join("profiles");
    let out_path = std::fs::canonicalize(profiles.join("test")).unwrap();
    let action = |args: &[&str]| -> (String, String) {
        let (out, events) = run(dir.path(), args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let change = events
            .iter()
            .find(|e| e["type"] == "plan")
            .and_then(|p| {
                p["changes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|c| c["address"] == "switch")
                    .cloned()
            })
            .expect("switch is planned");
        (
            change["action"].as_str().unwrap().to_string(),
            change["note"].as_str().unwrap_or_default().to_string(),
        )
    };
    // Switched by hand to a generation of someone else's.
    std::os::unix::fs::symlink(&out_path, profiles.join("test-7-link")).unwrap();
    std::fs::remove_file(profiles.join("test")).unwrap();
    std::os::unix::fs::symlink("test-7-link", profiles.join("test")).unwrap();
    assert_eq!(
        action(&["plan"]).0,
        "noop",
        "nothing is read without --refresh"
    );
    let (what, note) = action(&["plan", "--refresh"]);
    assert_eq!(what, "update", "{note}");
    assert!(note.contains("`generation`"), "{note}");
    // Removed by hand: made again.
    std::fs::remove_file(profiles.join("test")).unwrap();
    let (what, note) = action(&["plan", "--refresh"]);
    assert_eq!(what, "create", "{note}");
    let (out, _) = run(dir.path(), &["apply", "--refresh"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::canonicalize(profiles.join("test")).unwrap(),
        out_path
    );
    assert_eq!(action(&["plan", "--refresh"]).0, "noop");
}
