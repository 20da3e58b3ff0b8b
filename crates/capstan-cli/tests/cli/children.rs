//! Work handed back to the scheduler by providers, end to end: real `capstan` processes, the
//! testing provider as a real process over a real socket. A `fanout` resource submits child
//! resources through its operation's `Scheduler` capability; a `permits` resource borrows
//! `--jobs` slots for work of its own.

use std::process::{Command, Output, Stdio};

use crate::support::{capstan_bin, testing_provider};
use serde_json::{json, Value};

struct Project {
    dir: tempfile::TempDir,
}

impl Project {
    fn new(resources: Value) -> Self {
        let project = Project {
            dir: tempfile::tempdir().unwrap(),
        };
        project.write(resources, json!({}));
        project
    }

    fn write(&self, resources: Value, provider: Value) {
        let mut declaration = json!({"executable": testing_provider()});
        if let (Some(d), Some(extra)) = (declaration.as_object_mut(), provider.as_object()) {
            d.extend(extra.clone());
        }
        let deployment = json!({"providers": {"t": declaration}, "resources": resources});
        std::fs::write(
            self.dir.path().join("capstan.json"),
            serde_json::to_string_pretty(&deployment).unwrap(),
        )
        .unwrap();
    }

    /// Runs with `--json` (and a deadline: a hang fails the test instead of blocking it).
    fn json(&self, args: &[&str]) -> (Option<i32>, Vec<Value>) {
        let mut all = args.to_vec();
        all.push("--json");
        let child = Command::new(capstan_bin())
            .args(&all)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out: Output = crate::support::output_within(child, &format!("capstan {all:?}"));
        (out.status.code(), crate::support::events(&out.stdout))
    }

    fn state(&self) -> Value {
        let out = Command::new(capstan_bin())
            .args(["state", "list", "--json"])
            .current_dir(self.dir.path())
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "state list --json: {e}: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }
}

fn of_type<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["type"] == kind).collect()
}

fn summary(events: &[Value]) -> Value {
    of_type(events, "summary")
        .last()
        .map(|e| (*e).clone())
        .expect("a summary")
}

/// Each `resource_failed` event as "ADDRESS \"ERROR\"".
fn failures(events: &[Value]) -> Vec<String> {
    of_type(events, "resource_failed")
        .iter()
        .map(|e| format!("{} {}", e["address"].as_str().unwrap_or(""), e["error"]))
        .collect()
}

fn addresses(state: &Value) -> Vec<String> {
    let list = state
        .as_array()
        .or_else(|| state["resources"].as_array())
        .cloned()
        .unwrap_or_default();
    let mut names: Vec<String> = list
        .iter()
        .filter_map(|r| r["address"].as_str().map(String::from))
        .collect();
    names.sort();
    names
}

#[test]
fn a_parent_runs_its_children_through_the_scheduler_and_they_are_recorded_under_it() {
    let project = Project::new(json!({
        "fleet": {"provider": "t", "type": "fanout", "inputs": {"count": 4, "inputs": {"ms": 20, "group": "kids"}}}
    }));
    let (code, events) = project.json(&["apply", "--jobs", "8"]);
    assert_eq!(code, Some(0), "{events:#?}");
    let counts = &summary(&events);
    assert_eq!(counts["created"], 5, "{counts}");
    // Children show in the event stream like any resource, under their parent.
    let started: Vec<&str> = of_type(&events, "resource_start")
        .iter()
        .filter_map(|e| e["address"].as_str())
        .collect();
    for n in 0..4 {
        assert!(
            started.contains(&format!("fleet/c{n}").as_str()),
            "{started:?}"
        );
    }
    // The parent saw each child's outputs.
    let parent = of_type(&events, "resource_complete")
        .into_iter()
        .find(|e| e["address"] == "fleet")
        .expect("fleet completed");
    let children = parent["outputs"]["children"].as_array().unwrap();
    assert_eq!(children.len(), 4);
    assert_eq!(children[2]["value"], 2);
    assert_eq!(
        addresses(&project.state()),
        ["fleet", "fleet/c0", "fleet/c1", "fleet/c2", "fleet/c3"]
    );

    // Unchanged parent: nothing runs, the children stay.
    let (code, events) = project.json(&["apply"]);
    assert_eq!(code, Some(0));
    let counts = &summary(&events);
    assert_eq!(
        (counts["created"].clone(), counts["deleted"].clone()),
        (json!(0), json!(0))
    );
    assert_eq!(addresses(&project.state()).len(), 5);

    // Asked again with the same inputs (the parent updates), a child is left as recorded.
    project.write(
        json!({"fleet": {"provider": "t", "type": "fanout", "inputs": {"count": 4, "inputs": {"ms": 20, "group": "kids"}, "tolerate": true}}}),
        json!({}),
    );
    let (code, events) = project.json(&["apply"]);
    assert_eq!(code, Some(0), "{events:#?}");
    let counts = &summary(&events);
    assert_eq!(counts["updated"], 1, "{counts}");
    assert_eq!(counts["unchanged"], 4, "{counts}");

    // Made again asking for fewer: the children not asked for are deleted.
    project.write(
        json!({"fleet": {"provider": "t", "type": "fanout", "inputs": {"count": 2, "inputs": {"ms": 20, "group": "kids"}}}}),
        json!({}),
    );
    let (code, events) = project.json(&["apply"]);
    assert_eq!(code, Some(0), "{events:#?}");
    let counts = &summary(&events);
    assert_eq!(
        (counts["updated"].clone(), counts["deleted"].clone()),
        (json!(1), json!(2)),
        "{counts}"
    );
    assert_eq!(
        addresses(&project.state()),
        ["fleet", "fleet/c0", "fleet/c1"]
    );

    // Removing the parent deletes its children first.
    project.write(json!({}), json!({}));
    let (code, events) = project.json(&["apply"]);
    assert_eq!(code, Some(0), "{events:#?}");
    assert_eq!(summary(&events)["deleted"], 3);
    let deleted: Vec<&str> = of_type(&events, "resource_complete")
        .iter()
        .filter_map(|e| e["address"].as_str())
        .collect();
    assert_eq!(deleted.last(), Some(&"fleet"), "{deleted:?}");
    assert!(addresses(&project.state()).is_empty());
}

#[test]
fn with_one_job_a_parent_waiting_on_its_children_still_finishes() {
    let project = Project::new(json!({
        "fleet": {"provider": "t", "type": "fanout", "inputs": {"count": 3, "inputs": {"ms": 10}}},
        "other": {"provider": "t", "type": "probe", "inputs": {"ms": 10}}
    }));
    let (code, events) = project.json(&["apply", "--jobs", "1"]);
    assert_eq!(code, Some(0), "{events:#?}");
    assert_eq!(summary(&events)["created"], 5);
}

#[test]
fn a_failed_child_is_reported_to_its_parent_which_decides() {
    let project = Project::new(json!({
        "strict": {"provider": "t", "type": "fanout", "inputs": {"count": 3, "fail": [1]}},
        "lenient": {"provider": "t", "type": "fanout", "inputs": {"count": 3, "fail": [0], "tolerate": true}}
    }));
    let (code, events) = project.json(&["apply"]);
    assert_eq!(code, Some(1));
    let failed = failures(&events);
    assert!(
        failed
            .iter()
            .any(|f| f.starts_with("strict ") && f.contains("child c1 failed")),
        "{failed:#?}"
    );
    assert!(
        failed.iter().any(|f| f.starts_with("strict/c1 ")),
        "{failed:#?}"
    );
    assert!(
        !failed.iter().any(|f| f.starts_with("lenient ")),
        "{failed:#?}"
    );
    let lenient = of_type(&events, "resource_complete")
        .into_iter()
        .find(|e| e["address"] == "lenient")
        .expect("lenient completed");
    assert_eq!(lenient["outputs"]["failed"], 1);
    // The children that succeeded are recorded, under either parent.
    let state = addresses(&project.state());
    for kept in [
        "strict/c0",
        "strict/c2",
        "lenient",
        "lenient/c1",
        "lenient/c2",
    ] {
        assert!(state.contains(&kept.to_string()), "{state:?}");
    }
}

#[test]
fn children_are_cancelled_when_their_parent_is() {
    // The parent times out while its children hang: they are cancelled with it, so the run
    // ends (were they not, it would never end, and the runner's deadline would fail it).
    let project = Project::new(json!({
        "fleet": {"provider": "t", "type": "fanout", "inputs": {"count": 2, "type": "hang", "index": "", "inputs": {}}}
    }));
    project.write(
        json!({"fleet": {"provider": "t", "type": "fanout", "inputs": {"count": 2, "type": "hang", "index": "", "inputs": {}}}}),
        json!({"timeout": 1}),
    );
    let (code, events) = project.json(&["apply"]);
    assert_eq!(code, Some(1), "{events:#?}");
    let failed = failures(&events);
    for n in 0..2 {
        assert!(
            failed
                .iter()
                .any(|f| f.starts_with(&format!("fleet/c{n} ")) && f.contains("cancelled")),
            "{failed:#?}"
        );
    }
}

#[test]
fn permits_bound_a_providers_own_work_by_jobs_and_never_deadlock() {
    for (jobs, peak) in [("2", 2), ("1", 1)] {
        let project = Project::new(json!({
            "work": {"provider": "t", "type": "permits", "inputs": {"count": 5, "ms": 50, "group": "w"}}
        }));
        let (code, events) = project.json(&["apply", "--jobs", jobs]);
        assert_eq!(code, Some(0), "{events:#?}");
        let done = of_type(&events, "resource_complete")
            .into_iter()
            .find(|e| e["address"] == "work")
            .expect("work completed");
        assert_eq!(done["outputs"]["group_peak"], peak, "--jobs {jobs}");
    }
}

#[test]
fn a_crash_mid_way_keeps_the_childrens_state_and_gives_permits_back() {
    let project = Project::new(json!({}));
    let provider = json!({"executable": testing_provider()});
    let deployment = json!({
        "providers": {"t": provider, "u": provider, "v": provider},
        "resources": {
            // Children on `u`; the parent's own provider `t` dies once they are done.
            "fleet": {"provider": "t", "type": "fanout", "inputs": {"count": 3, "provider": "u", "crash": true}},
            // `v` dies holding a permit (on the only job): it must come back for `after`.
            "work": {"provider": "v", "type": "permits", "inputs": {"count": 1, "crash": true}},
            "after": {"provider": "u", "type": "probe", "inputs": {}}
        }
    });
    std::fs::write(
        project.dir.path().join("capstan.json"),
        serde_json::to_string_pretty(&deployment).unwrap(),
    )
    .unwrap();
    let (code, events) = project.json(&["apply", "--jobs", "1"]);
    assert_eq!(code, Some(1), "{events:#?}");
    let failed: Vec<&str> = of_type(&events, "resource_failed")
        .iter()
        .filter_map(|e| e["address"].as_str())
        .collect();
    assert!(
        failed.contains(&"fleet") && failed.contains(&"work"),
        "{failed:?}"
    );
    let state = addresses(&project.state());
    for kept in ["fleet/c0", "fleet/c1", "fleet/c2", "after"] {
        assert!(state.contains(&kept.to_string()), "{kept}: {state:?}");
    }
}

#[test]
fn a_declared_resource_may_not_take_a_childs_address() {
    // `/` separates a child from its parent: a declared name with one is refused before
    // anything runs, instead of colliding with a child at run time.
    let project = Project::new(json!({
        "a": {"provider": "t", "type": "fanout", "inputs": {"count": 1}},
        "a/c0": {"provider": "t", "type": "probe", "inputs": {}}
    }));
    let (code, events) = project.json(&["apply"]);
    assert_eq!(code, Some(2), "{events:#?}");
    assert!(
        !events.iter().any(|e| e["type"] == "resource_start"),
        "{events:#?}"
    );
    let out = crate::support::capstan_in(project.dir.path(), &["plan"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("resources.a/c0") && said.contains("`/`"),
        "{said}"
    );
}

#[test]
fn children_may_use_a_provider_that_no_declared_resource_uses() {
    let project = Project::new(json!({}));
    let provider = json!({"executable": testing_provider()});
    let deployment = json!({
        "providers": {"t": provider, "only_for_children": provider},
        "resources": {
            "fleet": {"provider": "t", "type": "fanout", "inputs": {"count": 2, "provider": "only_for_children"}}
        }
    });
    std::fs::write(
        project.dir.path().join("capstan.json"),
        serde_json::to_string_pretty(&deployment).unwrap(),
    )
    .unwrap();
    let (code, events) = project.json(&["apply"]);
    assert_eq!(code, Some(0), "{events:#?}");
    assert_eq!(
        addresses(&project.state()),
        ["fleet", "fleet/c0", "fleet/c1"]
    );
    // And they are deleted through it when the parent goes.
    std::fs::write(
        project.dir.path().join("capstan.json"),
        serde_json::to_string_pretty(
            &json!({"providers": deployment["providers"], "resources": {}}),
        )
        .unwrap(),
    )
    .unwrap();
    let (code, events) = project.json(&["apply"]);
    assert_eq!(code, Some(0), "{events:#?}");
    assert!(addresses(&project.state()).is_empty());
}

#[test]
fn a_stale_child_whose_delete_fails_is_deleted_by_a_later_run() {
    let project = Project::new(json!({}));
    let block = project.dir.path().join("block");
    let fleet = |count: u32| {
        json!({"fleet": {"provider": "t", "type": "fanout", "inputs": {
            "count": count,
            "inputs": {"blockDelete": block.display().to_string()}
        }}})
    };
    project.write(fleet(3), json!({}));
    let (code, events) = project.json(&["apply"]);
    assert_eq!(code, Some(0), "{events:#?}");
    // Asked for one child now; deleting the other two fails.
    std::fs::write(&block, "").unwrap();
    project.write(fleet(1), json!({}));
    let (code, events) = project.json(&["apply"]);
    assert_eq!(code, Some(1), "{events:#?}");
    assert_eq!(
        addresses(&project.state()),
        ["fleet", "fleet/c0", "fleet/c1", "fleet/c2"]
    );
    // The parent is unchanged now, yet the next run still deletes them.
    std::fs::remove_file(&block).unwrap();
    let (code, events) = project.json(&["apply"]);
    assert_eq!(code, Some(0), "{events:#?}");
    assert_eq!(summary(&events)["deleted"], 2, "{events:#?}");
    assert_eq!(addresses(&project.state()), ["fleet", "fleet/c0"]);
}
