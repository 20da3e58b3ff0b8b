//! `capstan plan / apply / destroy / state` end to end: real `capstan` processes, real
//! provider processes (the built-in `local` provider and the testing provider), real files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::support::{capstan_bin, testing_provider};
use serde_json::{json, Value};

struct Project {
    dir: tempfile::TempDir,
}

impl Project {
    fn new(deployment: Value) -> Self {
        let project = Project {
            dir: tempfile::tempdir().unwrap(),
        };
        project.write(deployment);
        project
    }

    fn write(&self, deployment: Value) {
        std::fs::write(
            self.path("capstan.json"),
            serde_json::to_string_pretty(&deployment).unwrap(),
        )
        .unwrap();
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn capstan(&self, args: &[&str]) -> Output {
        Command::new(capstan_bin())
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Runs with --json and returns the events, checking each against the published schema.
    fn json(&self, args: &[&str]) -> (Option<i32>, Vec<Value>) {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.capstan(&all);
        let events = parse_events(&out.stdout);
        (out.status.code(), events)
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn event_schema() -> jsonschema::Validator {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schema/events.schema.json");
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    jsonschema::validator_for(&schema).expect("a valid JSON Schema")
}

fn parse_events(stdout: &[u8]) -> Vec<Value> {
    let validator = event_schema();
    let events: Vec<Value> = text(stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    for (n, event) in events.iter().enumerate() {
        if let Err(e) = validator.validate(event) {
            panic!("event {n} does not match schema/events.schema.json: {e}\n{event}");
        }
        assert_eq!(event["seq"], json!(n), "seq is monotonic from 0");
    }
    assert_eq!(
        events.first().map(|e| e["type"].clone()),
        Some(json!("version"))
    );
    events
}

fn of_type<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["type"] == kind).collect()
}

fn summary(events: &[Value]) -> Value {
    of_type(events, "summary")
        .last()
        .copied()
        .cloned()
        .expect("a summary")
}

fn quickstart() -> Value {
    json!({
        "providers": {"local": {"builtin": "local"}},
        "resources": {
            "hello": {"provider": "local", "type": "file", "inputs": {"path": "out/hello.txt", "content": {"$param": "greeting"}}},
            "shout": {"provider": "local", "type": "exec", "inputs": {"command": "tr", "args": ["a-z", "A-Z"], "stdin": {"$ref": "hello#content"}}},
            "copy": {"resources": {
                "loud": {"provider": "local", "type": "file", "inputs": {"path": "out/loud.txt", "content": {"$ref": "shout#stdout"}}}
            }}
        }
    })
}

fn params(project: &Project, greeting: &str) -> String {
    let path = project.path("params.json");
    std::fs::write(&path, json!({"greeting": greeting}).to_string()).unwrap();
    path.to_string_lossy().into_owned()
}

#[test]
fn apply_then_reapply_update_delete_and_destroy() {
    let project = Project::new(quickstart());
    let p = params(&project, "hi there\n");

    let (code, events) = project.json(&["apply", "--params", &p]);
    assert_eq!(code, Some(0), "{events:?}");
    assert_eq!(summary(&events)["created"], 3);
    assert_eq!(
        std::fs::read_to_string(project.path("out/loud.txt")).unwrap(),
        "HI THERE\n"
    );
    // The exec resource's output arrived as a live log event.
    assert!(of_type(&events, "resource_progress")
        .iter()
        .any(|e| e["address"] == "shout"
            && e["progress"]["kind"] == "log"
            && e["progress"]["line"] == "HI THERE"));
    // Dependencies were respected: hello completed before shout started.
    let position = |kind: &str, address: &str| {
        events
            .iter()
            .position(|e| e["type"] == kind && e["address"] == address)
            .unwrap()
    };
    assert!(position("resource_complete", "hello") < position("resource_start", "shout"));
    assert!(position("resource_complete", "shout") < position("resource_start", "copy.loud"));

    // Nothing changed: no provider is called.
    let (code, events) = project.json(&["apply", "--params", &p]);
    assert_eq!(code, Some(0));
    assert_eq!(summary(&events)["unchanged"], 3);
    assert!(of_type(&events, "resource_start").is_empty(), "{events:?}");

    // A new parameter changes hello, and through references shout and copy.loud.
    let p = params(&project, "bye\n");
    let plan = project.capstan(&["plan", "--params", &p]);
    assert_eq!(plan.status.code(), Some(0));
    let plan_text = text(&plan.stdout);
    assert!(
        plan_text.contains("~ hello (local.file)  changed: content"),
        "{plan_text}"
    );
    assert!(
        plan_text.contains("~ shout (local.exec)  (inputs known after hello)"),
        "{plan_text}"
    );
    let (code, events) = project.json(&["apply", "--params", &p]);
    assert_eq!(code, Some(0));
    assert_eq!(summary(&events)["updated"], 3);
    assert_eq!(
        std::fs::read_to_string(project.path("out/loud.txt")).unwrap(),
        "BYE\n"
    );

    // Removing a resource from the deployment deletes it.
    let mut smaller = quickstart();
    smaller["resources"].as_object_mut().unwrap().remove("copy");
    project.write(smaller);
    let (code, events) = project.json(&["apply", "--params", &p]);
    assert_eq!(code, Some(0));
    assert_eq!(summary(&events)["deleted"], 1);
    assert!(!project.path("out/loud.txt").exists());

    let list = project.capstan(&["state", "list"]);
    assert_eq!(text(&list.stdout), "hello\tlocal.file\nshout\tlocal.exec\n");
    let show = project.capstan(&["state", "show", "shout"]);
    let shown: Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(shown["outputs"]["stdout"], "BYE\n");
    assert_eq!(shown["dependencies"], json!(["hello"]));

    let (code, events) = project.json(&["destroy", "--params", &p]);
    assert_eq!(code, Some(0));
    assert_eq!(summary(&events)["deleted"], 2);
    // Reverse dependency order: shout before hello.
    let position = |address: &str| {
        events
            .iter()
            .position(|e| e["type"] == "resource_complete" && e["address"] == address)
            .unwrap()
    };
    assert!(position("shout") < position("hello"));
    assert!(!project.path("out/hello.txt").exists());
    assert_eq!(text(&project.capstan(&["state", "list"]).stdout), "");
}

fn testing(resources: Value) -> Value {
    json!({"providers": {"t": {"executable": testing_provider()}}, "resources": resources})
}

#[test]
fn a_failure_skips_its_dependents_and_independent_work_goes_on() {
    let project = Project::new(testing(json!({
        "bad": {"provider": "t", "type": "sleep", "inputs": {"ms": 5000}},
        "child": {"provider": "t", "type": "noop", "inputs": {"value": {"$ref": "bad#slept_ms"}}},
        "grandchild": {"provider": "t", "type": "noop", "inputs": {"value": {"$ref": "child#value"}}},
        "fine": {"provider": "t", "type": "noop", "inputs": {"value": 2}}
    })));
    let (code, events) = project.json(&["apply", "--timeout", "0.3"]);
    assert_eq!(code, Some(1));
    let failed = of_type(&events, "resource_failed");
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["address"], "bad");
    assert_eq!(failed[0]["kind"], "timeout");
    let skipped: Vec<(&str, &str)> = of_type(&events, "resource_skipped")
        .iter()
        .map(|e| {
            (
                e["address"].as_str().unwrap(),
                e["dependency"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(skipped.len(), 2);
    assert!(
        skipped.contains(&("child", "bad")) && skipped.contains(&("grandchild", "bad")),
        "{skipped:?}"
    );
    let s = summary(&events);
    assert_eq!(
        (
            s["failed"].as_u64(),
            s["skipped"].as_u64(),
            s["created"].as_u64()
        ),
        (Some(1), Some(2), Some(1))
    );
    assert_eq!(
        text(&project.capstan(&["state", "list"]).stdout),
        "fine\tt.noop\n"
    );
    // A timeout settles nothing: the provider may have done the work, so it stays pending.
    assert!(text(&project.capstan(&["state", "pending"]).stdout).starts_with("bad\tcreate"));
    assert!(
        failed[0]["error"]
            .as_str()
            .unwrap()
            .contains("stays pending"),
        "{}",
        failed[0]
    );
}

#[test]
fn invalid_deployments_are_refused_with_the_place_and_exit_2() {
    let cases: Vec<(Value, &str)> = vec![
        (testing(json!({"a": {"provider": "nope", "type": "noop"}})), "resources.a.provider: unknown provider `nope`; declared providers: t"),
        (testing(json!({"a": {"provider": "t", "type": "nope"}})), "resources.a.type: provider `t` has no resource type `nope`; it serves: noop"),
        (testing(json!({"a": {"provider": "t", "type": "noop", "inputs": {"colour": 1}}})), "resources.a.inputs.colour: `noop` has no input `colour`; its inputs: value, print"),
        (testing(json!({"a": {"provider": "t", "type": "sleep"}})), "resources.a.inputs: missing required input `ms` of `sleep`"),
        (testing(json!({"a": {"provider": "t", "type": "noop", "inputs": {"value": {"$ref": "ghost#value"}}}})), "resources.a.inputs.value: refers to resource `ghost`, which the deployment does not declare"),
        (testing(json!({"a": {"provider": "t", "type": "noop"}, "b": {"provider": "t", "type": "noop", "inputs": {"value": {"$ref": "a#nope"}}}})), "resources.b.inputs.value: `a` (a `noop`) has no output `nope`; its outputs: value, id"),
        (testing(json!({
            "a": {"provider": "t", "type": "noop", "inputs": {"value": {"$ref": "c#id"}}},
            "b": {"provider": "t", "type": "noop", "inputs": {"value": {"$ref": "a#id"}}},
            "c": {"provider": "t", "type": "noop", "inputs": {"value": {"$ref": "b#id"}}}})), "resources: dependency cycle: a -> c -> b -> a"),
        (testing(json!({"a": {"provider": "t", "type": "noop", "inputs": {"value": {"$param": "size"}}}})), "resources.a.inputs.value: missing parameter `size`; pass it in a JSON object with --params FILE"),
    ];
    for (deployment, message) in cases {
        let project = Project::new(deployment);
        let out = project.capstan(&["apply"]);
        assert_eq!(out.status.code(), Some(2), "{message}");
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains(&format!("capstan.json: {message}")),
            "expected {message:?} in:\n{stderr}"
        );
        assert!(
            !project.path(".capstan/journal").exists()
                || std::fs::read(project.path(".capstan/journal"))
                    .unwrap()
                    .is_empty(),
            "nothing ran"
        );
    }
    let project = Project::new(json!({}));
    std::fs::write(project.path("capstan.json"), "{ \"providers\": ").unwrap();
    let out = project.capstan(&["plan"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("capstan.json: line 1 column"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn the_per_provider_limit_and_the_job_limit_hold() {
    // Measured where it matters, by the provider: `probe` reports the most operations its
    // process ran at once.
    let probes = |count: usize| {
        let mut resources = serde_json::Map::new();
        for n in 0..count {
            resources.insert(
                format!("p{n}"),
                json!({"provider": "t", "type": "probe", "inputs": {"ms": 100}}),
            );
        }
        testing(Value::Object(resources))
    };
    let peak = |events: &[Value]| {
        of_type(events, "resource_complete")
            .iter()
            .map(|e| e["outputs"]["peak"].as_u64().expect("probe outputs a peak"))
            .max()
            .expect("some completed")
    };
    let mut deployment = probes(8);
    deployment["providers"]["t"]["maxConcurrency"] = json!(2);
    let project = Project::new(deployment);
    let (code, events) = project.json(&["apply"]);
    assert_eq!(code, Some(0));
    assert_eq!(
        peak(&events),
        2,
        "the provider's limit of 2 was used and never exceeded"
    );
    let project = Project::new(probes(4));
    let (code, events) = project.json(&["apply", "--jobs", "1"]);
    assert_eq!(code, Some(0));
    assert_eq!(peak(&events), 1, "--jobs 1 means one at a time");
    let (code, events) = project.json(&["destroy", "--jobs", "1"]);
    assert_eq!(code, Some(0));
    assert_eq!(of_type(&events, "resource_complete").len(), 4);
}

#[test]
fn a_second_apply_is_refused_while_the_state_is_locked() {
    // The first apply holds the lock until it is killed (not for a time that must outlast
    // the second one's start).
    let project = Project::new(testing(
        json!({"slow": {"provider": "t", "type": "hang", "inputs": {}}}),
    ));
    let mut first = Command::new(capstan_bin())
        .args(["apply", "--json"])
        .current_dir(project.dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_line(first.stdout.take().unwrap(), "resource_start");
    let second = project.capstan(&["apply"]);
    assert_eq!(second.status.code(), Some(2));
    let stderr = text(&second.stderr);
    assert!(
        stderr.contains(&format!("locked by pid {}", first.id())),
        "{stderr}"
    );
    assert!(
        stderr.contains("capstan apply"),
        "names the holder's command: {stderr}"
    );
    let _ = first.kill();
    let _ = first.wait();
}

/// Every line still to come from a `wait_for_line` reader, up to the end of its output (not
/// merely what has arrived so far: the reader may lag behind the process's exit).
fn rest_of(lines: std::sync::mpsc::Receiver<String>) -> Vec<String> {
    let mut rest = Vec::new();
    loop {
        match lines.recv_timeout(std::time::Duration::from_secs(30)) {
            Ok(line) => rest.push(line),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return rest,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                panic!("the output did not end; so far: {rest:?}")
            }
        }
    }
}

/// Reads lines until one contains `needle`; keeps draining the pipe in the background after.
fn wait_for_line(
    stdout: impl std::io::Read + Send + 'static,
    needle: &str,
) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    let needle = needle.to_string();
    let (found_tx, found_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut found = false;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if !found && line.contains(&needle) {
                found = true;
                let _ = found_tx.send(());
            }
            let _ = tx.send(line);
        }
    });
    found_rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("the line appears");
    rx
}

#[test]
fn a_killed_apply_leaves_its_in_flight_operations_recorded_as_interrupted() {
    let project = Project::new(testing(json!({
        "quick": {"provider": "t", "type": "noop", "inputs": {"value": 1}},
        "stuck": {"provider": "t", "type": "hang", "inputs": {}}
    })));
    let mut apply = Command::new(capstan_bin())
        .args(["apply", "--json"])
        .current_dir(project.dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = wait_for_line(apply.stdout.take().unwrap(), "\"phase\"");
    // Wait until `quick` is recorded too.
    while let Ok(line) = lines.recv_timeout(std::time::Duration::from_secs(30)) {
        if line.contains("resource_complete") && line.contains("\"quick\"") {
            break;
        }
    }
    // SAFETY: signals a process this test started; no memory is touched.
    unsafe { libc::kill(apply.id() as i32, libc::SIGKILL) };
    let _ = apply.wait();

    let pending = project.capstan(&["state", "pending"]);
    assert!(
        text(&pending.stdout).starts_with("stuck\tcreate\tt.hang"),
        "{}",
        text(&pending.stdout)
    );
    assert_eq!(
        text(&project.capstan(&["state", "list"]).stdout),
        "quick\tt.noop\n",
        "the finished resource is not forgotten"
    );
    let plan = project.capstan(&["plan"]);
    assert!(
        text(&plan.stdout).contains("+ stuck (t.hang)  [an earlier create was interrupted]"),
        "{}",
        text(&plan.stdout)
    );
    let resolve = project.capstan(&["state", "resolve", "stuck"]);
    assert_eq!(resolve.status.code(), Some(0));
    assert_eq!(text(&project.capstan(&["state", "pending"]).stdout), "");
}

#[test]
fn ctrl_c_cancels_in_flight_work_saves_state_and_exits_130() {
    let marker_dir = tempfile::tempdir().unwrap();
    let marker = marker_dir.path().join("cancelled");
    let project = Project::new(testing(json!({
        "stuck": {"provider": "t", "type": "hang", "inputs": {"cancelMarker": marker}}
    })));
    let mut apply = Command::new(capstan_bin())
        .args(["apply", "--json"])
        .current_dir(project.dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = wait_for_line(apply.stdout.take().unwrap(), "\"phase\"");
    // SAFETY: signals a process this test started; no memory is touched.
    unsafe { libc::kill(apply.id() as i32, libc::SIGINT) };
    let status = apply.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    let rest = rest_of(lines);
    assert!(
        rest.iter().any(|l| l.contains("\"interrupted\"")),
        "{rest:?}"
    );
    crate::support::wait_until("the cancellation reached the provider", || marker.exists());
    assert!(text(&project.capstan(&["state", "pending"]).stdout).starts_with("stuck\tcreate"));
}

#[test]
fn capabilities_flow_from_one_resource_to_another_across_runs() {
    let project = Project::new(testing(json!({
        "maker": {"provider": "t", "type": "handle", "inputs": {"value": "v1"}},
        "user": {"provider": "t", "type": "noop", "inputs": {"value": 1, "h": {"$cap": "maker#handle"}}}
    })));
    let (code, events) = project.json(&["apply"]);
    assert_eq!(code, Some(0), "{events:?}");
    let user = of_type(&events, "resource_complete")
        .into_iter()
        .find(|e| e["address"] == "user")
        .unwrap()
        .clone();
    assert_eq!(user["outputs"]["handles"][0]["name"], "h");
    assert_eq!(user["outputs"]["handles"][0]["kind"], "testing-handle");
    assert_eq!(user["outputs"]["handles"][0]["address"], "maker");

    // Only the user changes: the maker is unchanged, so it is read (not re-created) to get a
    // live handle again.
    project.write(testing(json!({
        "maker": {"provider": "t", "type": "handle", "inputs": {"value": "v1"}},
        "user": {"provider": "t", "type": "noop", "inputs": {"value": 2, "h": {"$cap": "maker#handle"}}}
    })));
    let (code, events) = project.json(&["apply"]);
    assert_eq!(code, Some(0), "{events:?}");
    let operations: Vec<(String, String)> = of_type(&events, "resource_complete")
        .iter()
        .map(|e| {
            (
                e["address"].as_str().unwrap().to_string(),
                e["operation"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        operations.contains(&("maker".into(), "read".into())),
        "{operations:?}"
    );
    assert!(
        operations.contains(&("user".into(), "update".into())),
        "{operations:?}"
    );
}

#[test]
fn an_operation_left_pending_earlier_stays_pending_when_a_stopped_run_never_sends_it() {
    // Run 1: `stuck` times out, so whether it took effect is unknown: it stays pending.
    let project = Project::new(testing(json!({
        "stuck": {"provider": "t", "type": "sleep", "inputs": {"ms": 5000}}
    })));
    let (code, _) = project.json(&["apply", "--timeout", "0.2"]);
    assert_eq!(code, Some(1));
    assert!(text(&project.capstan(&["state", "pending"]).stdout).starts_with("stuck\tcreate"));
    // Run 2, one job, fail-fast: `a_bad` runs first and fails while `stuck` has journaled its
    // new intent and waits for the job; `stuck` is never sent. Its earlier, unresolved
    // intent must not be settled by that.
    project.write(testing(json!({
        "a_bad": {"provider": "t", "type": "probe", "inputs": {"ms": 100, "fail": true}},
        "stuck": {"provider": "t", "type": "sleep", "inputs": {"ms": 5000}}
    })));
    let (code, events) = project.json(&["apply", "--fail-fast", "--jobs", "1"]);
    assert_eq!(code, Some(1));
    let skipped = of_type(&events, "resource_skipped");
    assert!(
        skipped.iter().any(|e| e["address"] == "stuck"),
        "stuck was never sent: {events:?}"
    );
    assert!(
        text(&project.capstan(&["state", "pending"]).stdout).starts_with("stuck\tcreate"),
        "still pending: nobody has checked it"
    );
}

#[test]
fn fail_fast_stops_starting_new_work() {
    let project = Project::new(testing(json!({
        "a_bad": {"provider": "t", "type": "probe", "inputs": {"fail": true}},
        "b": {"provider": "t", "type": "probe", "inputs": {"ms": 50}},
        "c": {"provider": "t", "type": "probe", "inputs": {"ms": 50}}
    })));
    let (code, events) = project.json(&["apply", "--fail-fast", "--jobs", "1"]);
    assert_eq!(code, Some(1));
    assert_eq!(of_type(&events, "resource_failed").len(), 1);
    let skipped = of_type(&events, "resource_skipped");
    assert_eq!(skipped.len(), 2, "{events:?}");
    assert!(skipped
        .iter()
        .all(|e| e["reason"] == "--fail-fast stopped the run"));
    // An operation whose intent was journaled while it waited for the job slot, then never
    // sent, is settled: nothing is left for a person to check.
    assert_eq!(
        text(&project.capstan(&["state", "pending"]).stdout),
        "",
        "nothing was in flight"
    );
    // Without --fail-fast the independent work runs.
    let (code, events) = project.json(&["apply", "--jobs", "1"]);
    assert_eq!(code, Some(1));
    assert_eq!(summary(&events)["created"], 2);
}

#[test]
fn lock_timeout_waits_for_the_holder_to_finish() {
    // The first apply holds the lock until it is interrupted; the second is seen waiting
    // (its message), then goes on once the first is gone. No timing assumed.
    let project = Project::new(testing(
        json!({"stuck": {"provider": "t", "type": "hang", "inputs": {}}}),
    ));
    let mut first = Command::new(capstan_bin())
        .args(["apply", "--json"])
        .current_dir(project.dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _lines = wait_for_line(first.stdout.take().unwrap(), "resource_start");
    let mut second = Command::new(capstan_bin())
        .args(["destroy", "--lock-timeout", "60"])
        .current_dir(project.dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let waiting = wait_for_line(second.stderr.take().unwrap(), "waiting for the state lock");
    // SAFETY: signals a process this test started; no memory is touched.
    unsafe { libc::kill(first.id() as i32, libc::SIGINT) };
    assert_eq!(first.wait().unwrap().code(), Some(130));
    assert!(second.wait().unwrap().success());
    let said = rest_of(waiting);
    assert!(
        said.iter().any(|l| l.contains("held by pid")),
        "it named the holder: {said:?}"
    );
}

#[test]
fn a_second_ctrl_c_stops_at_once() {
    // A provider that lingers after shutdown keeps the first Ctrl-C's clean stop busy for
    // seconds (grace, SIGTERM ignored, grace, SIGKILL); the second ends capstan right away.
    let mut deployment = testing(json!({"stuck": {"provider": "t", "type": "hang", "inputs": {}}}));
    deployment["providers"]["t"]["args"] = json!(["--linger"]);
    let project = Project::new(deployment);
    let mut apply = Command::new(capstan_bin())
        .args(["apply", "--json"])
        .current_dir(project.dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = wait_for_line(apply.stdout.take().unwrap(), "\"phase\"");
    // SAFETY: signals a process this test started; no memory is touched.
    unsafe { libc::kill(apply.id() as i32, libc::SIGINT) };
    // Wait for the first interrupt to be taken in before sending the second.
    loop {
        let line = lines
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("an interrupted event");
        if line.contains("\"interrupted\"") {
            break;
        }
    }
    // SAFETY: signals a process this test started; no memory is touched.
    unsafe { libc::kill(apply.id() as i32, libc::SIGINT) };
    let output = apply.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(130));
    assert!(
        text(&output.stderr).contains("again: stopping now"),
        "{}",
        text(&output.stderr)
    );
    assert!(
        text(&project.capstan(&["state", "pending"]).stdout).starts_with("stuck\tcreate"),
        "recorded state is intact"
    );
}

#[test]
fn rewiring_without_changing_inputs_is_recorded_so_deletes_stay_ordered() {
    // Run 1: a refers to b. Run 2: a's reference becomes an equal literal (a is unchanged) and
    // b now refers to a. The recorded wiring must follow, or destroy would see a -> b -> a.
    let project = Project::new(testing(json!({
        "a": {"provider": "t", "type": "noop", "inputs": {"value": {"$ref": "b#value"}}},
        "b": {"provider": "t", "type": "noop", "inputs": {"value": "x"}}
    })));
    assert_eq!(project.json(&["apply"]).0, Some(0));
    project.write(testing(json!({
        "a": {"provider": "t", "type": "noop", "inputs": {"value": "x"}},
        "b": {"provider": "t", "type": "noop", "inputs": {"value": "x", "print": {"$ref": "a#id"}}}
    })));
    let (code, events) = project.json(&["apply"]);
    assert_eq!(code, Some(0), "{events:?}");
    let shown: Value =
        serde_json::from_slice(&project.capstan(&["state", "show", "a"]).stdout).unwrap();
    assert_eq!(
        shown["dependencies"],
        json!([]),
        "a's recorded dependencies follow the deployment"
    );
    let (code, events) = project.json(&["destroy"]);
    assert_eq!(code, Some(0), "{events:?}");
    assert_eq!(summary(&events)["deleted"], 2);
    let position = |address: &str| {
        events
            .iter()
            .position(|e| e["type"] == "resource_complete" && e["address"] == address)
            .unwrap()
    };
    assert!(
        position("b") < position("a"),
        "b (which now uses a) goes first"
    );
}

#[test]
fn a_resource_that_stops_using_a_removed_one_moves_off_it_before_the_delete() {
    let project = Project::new(testing(json!({
        "user": {"provider": "t", "type": "probe", "inputs": {"value": {"$ref": "old#id"}}},
        "old": {"provider": "t", "type": "probe", "inputs": {"value": 1}}
    })));
    assert_eq!(project.json(&["apply"]).0, Some(0));
    project.write(testing(json!({
        "user": {"provider": "t", "type": "probe", "inputs": {"value": "standalone", "ms": 200}}
    })));
    let (code, events) = project.json(&["apply"]);
    assert_eq!(code, Some(0), "{events:?}");
    let position = |kind: &str, address: &str| {
        events
            .iter()
            .position(|e| e["type"] == kind && e["address"] == address)
            .unwrap()
    };
    assert!(
        position("resource_complete", "user") < position("resource_start", "old"),
        "old is deleted only after user no longer refers to it"
    );
}

#[test]
fn command_output_that_is_not_utf8_keeps_flowing() {
    // One Latin-1 byte, then far more than a pipe holds: the reader must not stop at the byte.
    let project = Project::new(json!({
        "providers": {"local": {"builtin": "local"}},
        "resources": {"cmd": {"provider": "local", "type": "exec", "inputs": {
            "command": "sh", "args": ["-c", "printf 'caf\\351\\n'; seq 1 30000"]
        }}}
    }));
    let (code, events) = project.json(&["apply", "--timeout", "60"]);
    // Read to the end (no stall, no timeout), then refused: `stdout` is text, byte for byte.
    assert_eq!(code, Some(1));
    let failed = of_type(&events, "resource_failed");
    let error = failed[0]["error"].as_str().unwrap();
    assert!(
        error.contains("wrote bytes to stdout that are not UTF-8 (the first at byte 3)"),
        "{error}"
    );
    // The same on stderr is only a log line: shown lossily, and the command succeeds.
    project.write(json!({
        "providers": {"local": {"builtin": "local"}},
        "resources": {"cmd": {"provider": "local", "type": "exec", "inputs": {
            "command": "sh", "args": ["-c", "printf 'caf\\351\\n' >&2; seq 1 30000"]
        }}}
    }));
    let (code, events) = project.json(&["apply", "--timeout", "60"]);
    assert_eq!(code, Some(0), "{:?}", of_type(&events, "resource_failed"));
    let done = of_type(&events, "resource_complete");
    let stdout = done[0]["outputs"]["stdout"].as_str().unwrap();
    assert!(stdout.starts_with("1\n2\n"), "{}", &stdout[..20]);
    assert!(stdout.ends_with("\n30000\n"));
    assert!(of_type(&events, "resource_progress")
        .iter()
        .any(|e| e["progress"]["line"] == "caf\u{fffd}"));
}

#[test]
fn a_relative_executable_is_found_beside_the_deployment_file() {
    let project = Project::new(json!({}));
    let sub = project.path("sub");
    std::fs::create_dir_all(&sub).unwrap();
    std::os::unix::fs::symlink(testing_provider(), sub.join("prov")).unwrap();
    std::fs::write(
        sub.join("capstan.json"),
        json!({"providers": {"t": {"executable": "./prov"}}, "resources": {"a": {"provider": "t", "type": "noop", "inputs": {"value": 1}}}}).to_string(),
    )
    .unwrap();
    // Run from the parent directory: the path is relative to the deployment file, once.
    let out = project.capstan(&["apply", "-f", "sub/capstan.json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[test]
fn cancelling_a_command_also_stops_what_it_started() {
    let project = Project::new(json!({}));
    let pidfile = project.path("grandchild.pid");
    project.write(json!({
        "providers": {"local": {"builtin": "local"}},
        "resources": {"cmd": {"provider": "local", "type": "exec", "inputs": {
            "command": "sh", "args": ["-c", format!("sleep 300 & echo $! > {}; wait", pidfile.display())]
        }}}
    }));
    let (code, events) = project.json(&["apply", "--timeout", "1"]);
    assert_eq!(code, Some(1), "{events:?}");
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    crate::support::wait_until(
        &format!("the command's background `sleep` (pid {pid}) ends with the cancelled operation"),
        || !crate::support::alive(pid),
    );
}

#[test]
fn changing_a_resources_type_replaces_it_delete_first() {
    let local = |resources: Value| json!({"providers": {"local": {"builtin": "local"}}, "resources": resources});
    let project = Project::new(local(json!({
        "thing": {"provider": "local", "type": "file", "inputs": {"path": "out/a.txt", "content": "x"}},
        "reader": {"provider": "local", "type": "memo", "inputs": {"value": {"$ref": "thing#content"}}}
    })));
    let (code, _) = project.json(&["apply"]);
    assert_eq!(code, Some(0));
    assert!(project.path("out/a.txt").exists());

    project.write(local(json!({
        "thing": {"provider": "local", "type": "memo", "inputs": {"value": "y"}},
        "reader": {"provider": "local", "type": "memo", "inputs": {"value": {"$ref": "thing#value"}}}
    })));
    let (code, events) = project.json(&["plan"]);
    assert_eq!(code, Some(0));
    let plan = &of_type(&events, "plan")[0]["changes"];
    let thing = plan
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["address"] == "thing")
        .unwrap();
    assert_eq!(thing["action"], "replace");
    assert_eq!(
        thing["replaces"],
        json!({"provider": "local", "resource_type": "file"})
    );
    let out = project.capstan(&["plan"]);
    assert!(
        text(&out.stdout).contains("-/+ thing (local.memo)"),
        "{}",
        text(&out.stdout)
    );

    let (code, events) = project.json(&["apply"]);
    assert_eq!(code, Some(0));
    // The old resource is deleted (by its own type: the file goes), then the new one made,
    // and what refers to it is updated with the new outputs.
    let steps: Vec<(&str, &str)> = events
        .iter()
        .filter(|e| e["address"] == "thing" && e["type"] == "resource_complete")
        .map(|e| {
            (
                e["type"].as_str().unwrap(),
                e["operation"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        steps,
        [
            ("resource_complete", "delete"),
            ("resource_complete", "create")
        ]
    );
    assert!(!project.path("out/a.txt").exists(), "the file was deleted");
    let s = summary(&events);
    // A replacement is counted as one, not as a create and a delete.
    assert_eq!(
        (
            s["created"].as_u64(),
            s["deleted"].as_u64(),
            s["updated"].as_u64(),
            s["replaced"].as_u64()
        ),
        (Some(0), Some(0), Some(1), Some(1))
    );
    let out = project.capstan(&["plan"]);
    assert!(
        text(&out.stdout).contains("0 to create"),
        "{}",
        text(&out.stdout)
    );
    let shown: Value =
        serde_json::from_slice(&project.capstan(&["state", "show", "thing"]).stdout).unwrap();
    assert_eq!(shown["type"], "memo");
    let reader: Value =
        serde_json::from_slice(&project.capstan(&["state", "show", "reader"]).stdout).unwrap();
    assert_eq!(reader["outputs"]["value"], "y");
    // And it stays: nothing more to do.
    let (code, events) = project.json(&["apply"]);
    assert_eq!(code, Some(0));
    assert_eq!(summary(&events)["unchanged"].as_u64(), Some(2));
}

#[test]
fn file_writes_leave_no_temporary_files_behind() {
    let project = Project::new(json!({
        "providers": {"local": {"builtin": "local"}},
        "resources": {"f": {"provider": "local", "type": "file", "inputs": {"path": "out/x.txt", "content": "x", "mode": "0600"}}}
    }));
    // One left by a provider that was SIGKILLed mid-write (its pid no longer runs) …
    std::fs::create_dir_all(project.path("out")).unwrap();
    let stray = project.path("out/x.txt.capstan-tmp-999999999-0");
    std::fs::write(&stray, "half").unwrap();
    let (code, _) = project.json(&["apply"]);
    assert_eq!(code, Some(0));
    assert!(
        !stray.exists(),
        "a stray temporary file is removed by the next write"
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(project.path("out/x.txt"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // … and one from a write whose rename fails (the path is a directory).
    project.write(json!({
        "providers": {"local": {"builtin": "local"}},
        "resources": {"f": {"provider": "local", "type": "file", "inputs": {"path": "out/dir", "content": "x"}}}
    }));
    std::fs::create_dir_all(project.path("out/dir/inside")).unwrap();
    let (code, events) = project.json(&["apply"]);
    assert_eq!(code, Some(1), "{events:?}");
    let left: Vec<String> = std::fs::read_dir(project.path("out"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".capstan-tmp-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn colour_follows_clicolor_force_no_color_and_the_flag_in_that_order() {
    let project = Project::new(json!({
        "providers": {"local": {"builtin": "local"}},
        "resources": {"m": {"provider": "local", "type": "memo", "inputs": {"value": 1}}}
    }));
    let plan = |env: &[(&str, &str)], args: &[&str]| {
        let mut command = Command::new(capstan_bin());
        command
            .arg("plan")
            .args(args)
            .current_dir(project.dir.path())
            .env_remove("NO_COLOR")
            .env_remove("CLICOLOR_FORCE")
            .stdin(Stdio::null());
        for (k, v) in env {
            command.env(k, v);
        }
        text(&command.output().unwrap().stdout)
    };
    let coloured = |out: &str| out.contains('\u{1b}');
    // A pipe gets no colour by itself, whatever an empty NO_COLOR says.
    assert!(!coloured(&plan(&[("NO_COLOR", "")], &[])));
    // CLICOLOR_FORCE gives it colour, even past NO_COLOR (as the convention says)...
    assert!(coloured(&plan(&[("CLICOLOR_FORCE", "1")], &[])));
    assert!(coloured(&plan(
        &[("CLICOLOR_FORCE", "1"), ("NO_COLOR", "1")],
        &[]
    )));
    // ... and the flag wins over both.
    assert!(!coloured(&plan(
        &[("CLICOLOR_FORCE", "1")],
        &["--color", "never"]
    )));
    assert!(coloured(&plan(
        &[("NO_COLOR", "1")],
        &["--color", "always"]
    )));
}

#[test]
fn a_deleted_file_takes_the_temporary_files_a_killed_provider_left_beside_it() {
    // Issue 20: stray temporary files were removed only when the same path was written again;
    // a file resource dropped from the deployment left them forever.
    let project = Project::new(json!({
        "providers": {"local": {"builtin": "local"}},
        "resources": {"f": {"provider": "local", "type": "file", "inputs": {"path": "out/x.txt", "content": "x"}}}
    }));
    let (code, _) = project.json(&["apply"]);
    assert_eq!(code, Some(0));
    // Left by a provider SIGKILLed mid-write (its pid no longer runs).
    let stray = project.path("out/x.txt.capstan-tmp-999999999-3");
    std::fs::write(&stray, "half").unwrap();
    project.write(json!({"providers": {"local": {"builtin": "local"}}, "resources": {}}));
    let (code, events) = project.json(&["apply"]);
    assert_eq!(code, Some(0), "{events:?}");
    assert!(!project.path("out/x.txt").exists());
    assert!(
        !stray.exists(),
        "the stray temporary file went with its file"
    );
}

/// A deployment directory copied with its state is refused (its file resources name the
/// original's files); one moved, or renamed, is still its own.
#[test]
fn a_copied_state_is_refused_and_a_moved_one_is_its_own() {
    let top = tempfile::tempdir().unwrap();
    let original = top.path().join("original");
    std::fs::create_dir(&original).unwrap();
    std::fs::write(
        original.join("capstan.json"),
        json!({"providers": {"local": {"builtin": "local"}},
               "resources": {"f": {"provider": "local", "type": "file",
                                   "inputs": {"path": "out.txt", "content": "mine"}}}})
        .to_string(),
    )
    .unwrap();
    let run = |dir: &Path, args: &[&str]| -> Output {
        Command::new(capstan_bin())
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let said = |out: &Output| String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(run(&original, &["apply"]).status.success());

    // A copy, edited: its apply would have rewritten the original's file.
    let copy = top.path().join("copy");
    let copied = Command::new("cp")
        .args(["-a"])
        .arg(&original)
        .arg(&copy)
        .status()
        .unwrap();
    assert!(copied.success());
    let edited = std::fs::read_to_string(copy.join("capstan.json"))
        .unwrap()
        .replace("mine", "the copy's");
    std::fs::write(copy.join("capstan.json"), edited).unwrap();
    for args in [&["plan"][..], &["apply"]] {
        let out = run(&copy, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", said(&out));
        assert!(said(&out).contains("copied here"), "{}", said(&out));
        assert!(
            said(&out).contains(&original.canonicalize().unwrap().display().to_string()),
            "names the original: {}",
            said(&out)
        );
    }
    assert_eq!(
        std::fs::read_to_string(original.join("out.txt")).unwrap(),
        "mine"
    );
    assert_eq!(
        std::fs::read_to_string(copy.join("out.txt")).unwrap(),
        "mine",
        "the copy's own file is as copied"
    );

    // Moved: the same directory under another name plans and applies as before.
    let moved = top.path().join("moved");
    std::fs::rename(&original, &moved).unwrap();
    let plan = run(&moved, &["plan", "--detailed-exitcode"]);
    assert_eq!(
        plan.status.code(),
        Some(0),
        "nothing to do: {}",
        said(&plan)
    );
    assert!(run(&moved, &["apply"]).status.success());
    assert_eq!(
        std::fs::read_to_string(moved.join("out.txt")).unwrap(),
        "mine"
    );
}

/// With `--json`, a command that stops with an error ends its stream with an `error` event
/// (a front end that reads only stdout learns why), and an evaluation that started ends.
#[test]
fn a_fatal_error_ends_the_json_stream_too() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| -> (Option<i32>, Vec<Value>) {
        let out = Command::new(capstan_bin())
            .args(args)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (out.status.code(), crate::support::events(&out.stdout))
    };
    std::fs::write(
        dir.path().join("capstan.json"),
        r#"{"providers": {}, "resources": {"a": {"provider": "nope"}}}"#,
    )
    .unwrap();
    for args in [&["plan", "--json"][..], &["apply", "--json"]] {
        let (code, events) = run(args);
        assert_eq!(code, Some(2), "{args:?}");
        assert_eq!(events[0]["type"], "version", "{events:?}");
        let last = events.last().unwrap();
        assert_eq!(last["type"], "error", "{events:?}");
        assert_eq!(last["exit_code"], 2, "{last}");
        assert!(
            last["message"].as_str().unwrap().contains("resources.a"),
            "{last}"
        );
    }
    // `--detailed-exitcode` makes every error 1, in the stream too.
    let (code, events) = run(&["plan", "--json", "--detailed-exitcode"]);
    assert_eq!(code, Some(1));
    assert_eq!(events.last().unwrap()["exit_code"], 1);
    if !crate::support::nix_tool("nix-instantiate", "the Nix part of the JSON error test") {
        return;
    }
    std::fs::write(
        dir.path().join("bad.nix"),
        "{ capstan, ... }: { resources = 5; }",
    )
    .unwrap();
    let (code, events) = run(&["plan", "--json", "-f", "bad.nix"]);
    assert_eq!(code, Some(2));
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(
        kinds,
        ["version", "evaluation_start", "evaluation_failed", "error"],
        "{events:?}"
    );
}

/// An input of the wrong type is found by `plan`, not first by `apply`: the provider checks
/// the inputs of every create and update while planning (exit 1, resource and input named).
#[test]
fn a_plan_finds_an_input_of_the_wrong_type() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("capstan.json"),
        json!({"providers": {"local": {"builtin": "local"}},
               "resources": {
                   "fine": {"provider": "local", "type": "memo", "inputs": {"value": 1}},
                   "greeting": {"provider": "local", "type": "file",
                                "inputs": {"path": "hello.txt", "content": 42}}}})
        .to_string(),
    )
    .unwrap();
    let out = Command::new(capstan_bin())
        .arg("plan")
        .current_dir(dir.path())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("file `greeting`: input `content` is invalid"),
        "{said}"
    );
    assert!(!said.contains("fine"), "{said}");
    assert!(!dir.path().join(".capstan").exists(), "plan wrote nothing");
}
