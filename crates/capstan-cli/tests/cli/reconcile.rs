//! State reconciled with reality: an interrupted create is checked with its provider's `read`
//! before anything is planned on it (found: adopted and updated; not found: created; a type
//! that cannot tell: left pending), and `--refresh` reads every recorded resource and plans
//! what drifted (an edited file is written again, a removed one made again). Real `capstan`
//! processes, real provider processes, a real SIGKILL in the middle of a create.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use crate::support::{capstan_bin, events, shown, testing_provider};
use serde_json::{json, Value};

fn capstan(dir: &Path, args: &[&str]) -> Output {
    crate::support::capstan_in(dir, args)
}

fn write(dir: &Path, resources: Value) {
    let deployment = json!({
        "providers": {"local": {"builtin": "local"}, "t": {"executable": testing_provider()}},
        "resources": resources,
    });
    std::fs::write(dir.join("capstan.json"), deployment.to_string()).unwrap();
}

fn pending(dir: &Path) -> Vec<String> {
    let out = capstan(dir, &["state", "pending", "--json"]);
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .map(|p| {
            format!(
                "{} {}",
                p["address"].as_str().unwrap(),
                p["operation"].as_str().unwrap()
            )
        })
        .collect()
}

/// Starts `capstan apply` and kills it (SIGKILL) once `ready` holds.
fn apply_killed(dir: &Path, ready: impl Fn() -> bool) {
    let mut child = Command::new(capstan_bin())
        .args(["apply"])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    crate::support::wait_until("the apply gets there", || {
        assert!(child.try_wait().unwrap().is_none(), "apply ended early");
        ready()
    });
    child.kill().unwrap();
    child.wait().unwrap();
}

fn planned(dir: &Path, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["plan", "--json"];
    all.extend_from_slice(args);
    let out = capstan(dir, &all);
    assert!(out.status.success(), "{}", shown(&out));
    let evs = events(&out.stdout);
    evs.iter().find(|e| e["type"] == "plan").expect("a plan")["changes"]
        .as_array()
        .unwrap()
        .clone()
}

fn change<'a>(changes: &'a [Value], address: &str) -> &'a Value {
    changes
        .iter()
        .find(|c| c["address"] == address)
        .unwrap_or_else(|| panic!("{address} not planned: {changes:?}"))
}

#[test]
fn an_interrupted_create_is_checked_before_it_is_planned() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let made = dir.join("made.txt");
    // Killed after the file was written, before the result was recorded.
    write(
        dir,
        json!({"m": {"provider": "t", "type": "made", "inputs": {"path": made, "after_ms": 60000}}}),
    );
    apply_killed(dir, || made.exists());
    assert_eq!(pending(dir), ["m create"]);

    // The plan asks the provider, says what it found, and writes nothing.
    let plan = capstan(dir, &["plan"]);
    assert!(plan.status.success(), "{}", shown(&plan));
    assert!(
        shown(&plan).contains("an interrupted create was checked: the resource exists"),
        "{}",
        shown(&plan)
    );
    assert_eq!(pending(dir), ["m create"], "plan wrote the state");
    let changes = planned(dir, &[]);
    assert_eq!(change(&changes, "m")["action"], "update");

    // The apply adopts it and makes sure it is as declared: nothing pending, recorded.
    write(
        dir,
        json!({"m": {"provider": "t", "type": "made", "inputs": {"path": made, "after_ms": 0}}}),
    );
    let apply = capstan(dir, &["apply"]);
    assert!(apply.status.success(), "{}", shown(&apply));
    assert!(pending(dir).is_empty());
    let again = capstan(dir, &["plan", "--detailed-exitcode"]);
    assert_eq!(again.status.code(), Some(0), "{}", shown(&again));
}

#[test]
fn an_interrupted_create_that_made_nothing_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let made = dir.join("made.txt");
    // Killed while the create waits before writing: nothing was made.
    write(
        dir,
        json!({"m": {"provider": "t", "type": "made", "inputs": {"path": made, "before_ms": 60000}}}),
    );
    // Killed once the call was sent (an intent never sent is settled, not pending).
    let sent = dir.join(".capstan/sent");
    apply_killed(dir, || {
        std::fs::read_to_string(&sent).is_ok_and(|j| j.lines().any(|l| l == "\"m\""))
    });
    assert_eq!(pending(dir), ["m create"]);
    assert!(!made.exists());
    let plan = capstan(dir, &["plan"]);
    assert!(
        shown(&plan).contains(
            "an interrupted create was checked: the resource does not exist, and is created"
        ),
        "{}",
        shown(&plan)
    );
    write(
        dir,
        json!({"m": {"provider": "t", "type": "made", "inputs": {"path": made}}}),
    );
    let apply = capstan(dir, &["apply"]);
    assert!(apply.status.success(), "{}", shown(&apply));
    assert!(made.exists());
    assert!(pending(dir).is_empty());
}

#[test]
fn an_interrupted_operation_nobody_can_check_stays_pending() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    // `sleep` cannot tell whether it ran: its reads only echo the state.
    write(
        dir,
        json!({"s": {"provider": "t", "type": "sleep", "inputs": {"ms": 60000}}}),
    );
    // Killed once the call was sent (an intent never sent is settled, not pending).
    let sent = dir.join(".capstan/sent");
    apply_killed(dir, || {
        std::fs::read_to_string(&sent).is_ok_and(|j| j.lines().any(|l| l == "\"s\""))
    });
    let plan = capstan(dir, &["plan"]);
    assert!(shown(&plan).contains("interrupted"), "{}", shown(&plan));
    assert!(!shown(&plan).contains("was checked"), "{}", shown(&plan));
    assert_eq!(pending(dir), ["s create"]);
}

#[test]
fn refresh_finds_what_changed_behind_capstan_s_back() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    write(
        dir,
        json!({
            "edited": {"provider": "local", "type": "file", "inputs": {"path": "edited.txt", "content": "as declared\n"}},
            "removed": {"provider": "local", "type": "file", "inputs": {"path": "removed.txt", "content": "here\n"}},
            "user": {"provider": "local", "type": "memo", "inputs": {"value": {"$ref": "removed#content"}}},
            "kept": {"provider": "local", "type": "file", "inputs": {"path": "kept.txt", "content": "same\n"}}
        }),
    );
    let apply = capstan(dir, &["apply"]);
    assert!(apply.status.success(), "{}", shown(&apply));
    std::fs::write(dir.join("edited.txt"), "edited by hand\n").unwrap();
    std::fs::remove_file(dir.join("removed.txt")).unwrap();

    // Without --refresh nothing is read: nothing to do.
    let changes = planned(dir, &[]);
    assert!(changes.iter().all(|c| c["action"] == "noop"), "{changes:?}");
    // With it: the edit is an update, the removal a create; the rest stays.
    let changes = planned(dir, &["--refresh"]);
    assert_eq!(change(&changes, "edited")["action"], "update");
    assert!(change(&changes, "edited")["note"]
        .as_str()
        .unwrap()
        .contains("`content`"));
    assert_eq!(change(&changes, "removed")["action"], "create");
    assert!(change(&changes, "removed")["note"]
        .as_str()
        .unwrap()
        .contains("deleted outside Capstan"));
    assert_eq!(change(&changes, "kept")["action"], "noop");
    // A plan writes nothing: the state still holds the removed file.
    let show = capstan(dir, &["state", "show", "removed"]);
    assert!(show.status.success());

    let apply = capstan(dir, &["apply", "--refresh"]);
    assert!(apply.status.success(), "{}", shown(&apply));
    assert_eq!(
        std::fs::read_to_string(dir.join("edited.txt")).unwrap(),
        "as declared\n"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("removed.txt")).unwrap(),
        "here\n"
    );
    let changes = planned(dir, &["--refresh"]);
    assert!(changes.iter().all(|c| c["action"] == "noop"), "{changes:?}");

    // Destroy with --refresh does not delete twice what is already gone.
    std::fs::remove_file(dir.join("kept.txt")).unwrap();
    let destroy = capstan(dir, &["destroy", "--yes", "--refresh", "--json"]);
    assert!(destroy.status.success(), "{}", shown(&destroy));
    let deleted: Vec<String> = events(&destroy.stdout)
        .iter()
        .filter(|e| e["type"] == "resource_complete")
        .map(|e| e["address"].as_str().unwrap().to_string())
        .collect();
    assert!(!deleted.contains(&"kept".to_string()), "{deleted:?}");
    let list = capstan(dir, &["state", "list"]);
    assert!(String::from_utf8_lossy(&list.stdout).trim().is_empty());
}

#[test]
fn a_create_that_failed_after_making_something_is_recorded_and_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let markers = dir.join("markers");
    std::fs::create_dir(&markers).unwrap();
    let deployment = |fault: &str| {
        json!({"p": {"provider": "t", "type": "faulty",
                     "inputs": {"dir": markers, "name": "p", "fault": fault}}})
    };
    write(dir, deployment("partial"));
    let apply = capstan(dir, &["apply"]);
    assert_eq!(apply.status.code(), Some(1), "{}", shown(&apply));
    assert!(markers.join("p").exists());
    // What it made is known to the state, marked to be replaced.
    let show = capstan(dir, &["state", "show", "p"]);
    let recorded: Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(recorded["tainted"], true, "{recorded}");
    assert!(pending(dir).is_empty());
    let changes = planned(dir, &[]);
    assert_eq!(change(&changes, "p")["action"], "replace");
    assert!(change(&changes, "p")["note"]
        .as_str()
        .unwrap()
        .contains("a create failed after making part of it"));
    write(dir, deployment("none"));
    let apply = capstan(dir, &["apply"]);
    assert!(apply.status.success(), "{}", shown(&apply));
    let show = capstan(dir, &["state", "show", "p"]);
    let recorded: Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(recorded.get("tainted"), None, "{recorded}");
    assert!(markers.join("p").exists());
}
