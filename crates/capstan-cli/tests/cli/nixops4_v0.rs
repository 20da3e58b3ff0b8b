//! NixOps4 version-0 providers run unchanged through the bridge: real `capstan`, the bridge as
//! its own process, and a v0 provider (Python, written from the published protocol) started
//! once per operation.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::support::capstan_bin;
use serde_json::{json, Value};

fn v0_provider() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/cli/fixtures/v0_provider.py")
        .display()
        .to_string()
}

struct Project {
    dir: tempfile::TempDir,
}

impl Project {
    fn new(resources: Value) -> Self {
        let project = Project {
            dir: tempfile::tempdir().unwrap(),
        };
        project.write(resources);
        project
    }

    fn write(&self, resources: Value) {
        let deployment = json!({
            "providers": {
                "v0": {"executable": "python3", "args": [v0_provider()], "protocol": "nixops4-v0"},
                "local": {"builtin": "local"}
            },
            "resources": resources
        });
        std::fs::write(self.dir.path().join("capstan.json"), deployment.to_string()).unwrap();
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("v0.log")
    }

    fn starts(&self) -> usize {
        std::fs::read_to_string(self.log())
            .map(|t| t.lines().count())
            .unwrap_or(0)
    }

    /// Runs capstan here (failing, not hanging, if it never ends).
    fn capstan(&self, args: &[&str]) -> Output {
        let child = Command::new(capstan_bin())
            .args(args)
            .current_dir(self.dir.path())
            .env("V0_LOG", self.log())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        crate::support::output_within(child, &format!("capstan {args:?}"))
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn memo(value: &str) -> Value {
    json!({"provider": "v0", "type": "memo", "inputs": {"initialize_with": value}, "outputs": ["value"]})
}

#[test]
fn a_v0_provider_runs_unchanged_with_its_logs_attributed() {
    let project = Project::new(json!({
        "greeting": memo("hello"),
        "file": {"provider": "local", "type": "file", "inputs": {"path": "out.txt", "content": {"$ref": "greeting#value"}}}
    }));
    let out = project.capstan(&["apply", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        std::fs::read_to_string(project.dir.path().join("out.txt")).unwrap(),
        "hello"
    );
    let events = crate::support::events(&out.stdout);
    let logs: Vec<&str> = events
        .iter()
        .filter(|e| {
            e["type"] == "resource_progress"
                && e["address"] == "greeting"
                && e["progress"]["kind"] == "log"
        })
        .map(|e| e["progress"]["line"].as_str().unwrap())
        .collect();
    assert_eq!(
        logs,
        vec![r#"memo: createResourceRequest for {"initialize_with": "hello"}"#],
        "stderr is the resource's log"
    );
    assert_eq!(project.starts(), 1, "one process for the one operation");

    // Unchanged: the v0 provider is not started at all.
    let out = project.capstan(&["apply"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(project.starts(), 1);

    // Changed inputs: an updateResourceRequest with the previous inputs and outputs.
    project.write(json!({
        "greeting": memo("bonjour"),
        "file": {"provider": "local", "type": "file", "inputs": {"path": "out.txt", "content": {"$ref": "greeting#value"}}}
    }));
    let out = project.capstan(&["apply", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        std::fs::read_to_string(project.dir.path().join("out.txt")).unwrap(),
        "bonjour"
    );
    let events = crate::support::events(&out.stdout);
    assert!(events
        .iter()
        .any(|e| e["address"] == "greeting" && e["progress"]["line"] == "previous value: hello"));
    assert!(events.iter().any(|e| e["type"] == "resource_complete"
        && e["address"] == "greeting"
        && e["operation"] == "update"));
}

#[test]
fn v0_type_and_output_names_may_hold_any_character() {
    // The engine hands the bridge its types as JSON: `=` and `,` (once separators) are fine.
    let project = Project::new(json!({
        "odd": {"provider": "v0", "type": "echo=1,2", "inputs": {"a,b": "x", "c=d": "y"}, "outputs": ["a,b", "c=d"]},
        "file": {"provider": "local", "type": "file", "inputs": {"path": "out.txt", "content": {"$ref": "odd#a,b"}}}
    }));
    let out = project.capstan(&["apply"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        std::fs::read_to_string(project.dir.path().join("out.txt")).unwrap(),
        "x"
    );
}

#[test]
fn v0_output_names_are_declared_and_checked_before_anything_runs() {
    let project = Project::new(json!({
        "greeting": memo("hello"),
        "file": {"provider": "local", "type": "file", "inputs": {"path": "out.txt", "content": {"$ref": "greeting#nope"}}}
    }));
    let out = project.capstan(&["apply"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("resources.file.inputs.content: `greeting` declares no output `nope`; its declared outputs: value"), "{}", text(&out.stderr));

    project.write(
        json!({"greeting": {"provider": "v0", "type": "memo", "inputs": {"initialize_with": "x"}}}),
    );
    let out = project.capstan(&["apply"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("resources.greeting.outputs: missing: `v0` speaks NixOps4 v0"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(project.starts(), 0);
}

#[test]
fn v0_errors_and_silent_exits_are_reported_with_the_providers_words() {
    let project = Project::new(json!({
        "typo": {"provider": "v0", "type": "memo", "inputs": {"initialise_with": "x"}, "outputs": ["value"]},
        "refused": {"provider": "v0", "type": "fail", "inputs": {}, "outputs": []},
        "mute": {"provider": "v0", "type": "silent", "inputs": {}, "outputs": []}
    }));
    let out = project.capstan(&["apply", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let events = crate::support::events(&out.stdout);
    let error = |address: &str| -> Value {
        events
            .iter()
            .find(|e| e["type"] == "resource_failed" && e["address"] == address)
            .cloned()
            .unwrap_or_else(|| panic!("{address} failed"))
    };
    assert!(
        error("typo")["error"]
            .as_str()
            .unwrap()
            .contains("unknown input properties: initialise_with"),
        "the provider rejects unknown inputs itself"
    );
    assert!(error("refused")["error"]
        .as_str()
        .unwrap()
        .contains("the fail type always fails"));
    let mute = error("mute");
    assert!(
        mute["error"]
            .as_str()
            .unwrap()
            .contains("exited with status 3 without a response"),
        "{mute}"
    );
    assert!(
        mute["details"]
            .as_str()
            .unwrap()
            .contains("about to exit without answering"),
        "{mute}"
    );
}

#[test]
fn v0_has_no_delete_and_plan_and_destroy_say_so() {
    let project = Project::new(json!({"greeting": memo("hello")}));
    assert_eq!(project.capstan(&["apply"]).status.code(), Some(0));
    project.write(json!({}));
    let plan = project.capstan(&["plan"]);
    assert!(
        text(&plan.stdout).contains(
            "- greeting (v0.memo)  (provider `v0` cannot delete (NixOps4 v0 has no delete)"
        ),
        "{}",
        text(&plan.stdout)
    );
    let destroy = project.capstan(&["destroy"]);
    assert_eq!(destroy.status.code(), Some(1));
    assert!(
        text(&destroy.stderr).contains("NixOps4 v0 providers have no delete operation"),
        "{}",
        text(&destroy.stderr)
    );
    assert_eq!(
        text(&project.capstan(&["state", "list"]).stdout),
        "greeting\tv0.memo\n",
        "still recorded: nothing pretends it was deleted"
    );
    let forget = project.capstan(&["state", "forget", "greeting"]);
    assert_eq!(forget.status.code(), Some(0));
    assert_eq!(text(&project.capstan(&["state", "list"]).stdout), "");
}

#[test]
fn a_v0_program_that_leaves_a_process_behind_does_not_hang_the_operation() {
    let project = Project::new(json!({
        "l": {"provider": "v0", "type": "lingering", "inputs": {}, "outputs": ["value"]}
    }));
    // The background process lives for an hour: had the bridge waited for it to close the
    // pipes, the run would never end (and `capstan` would fail as hung, not time out: no
    // --timeout here).
    let out = project.capstan(&["apply", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let events = crate::support::events(&out.stdout);
    let done = events
        .iter()
        .find(|e| e["type"] == "resource_complete")
        .expect("completed");
    assert_eq!(done["outputs"]["value"], "done", "{done}");
}

#[test]
fn a_result_without_a_declared_output_fails_at_once_and_is_still_recorded() {
    // The deployment says `memo` returns `value` and `port`; the v0 program returns only
    // `value`. The resource exists (recorded), and its dependent is skipped right away.
    let project = Project::new(json!({
        "greeting": {"provider": "v0", "type": "memo", "inputs": {"initialize_with": "hi"}, "outputs": ["value", "port"]},
        "file": {"provider": "local", "type": "file", "inputs": {"path": "out.txt", "content": {"$ref": "greeting#value"}}}
    }));
    let out = project.capstan(&["apply"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("greeting: provider `v0` returned no output `port`, which `memo` declares"),
        "{stderr}"
    );
    assert!(stderr.contains("file: skipped"), "{stderr}");
    assert_eq!(
        text(&project.capstan(&["state", "list"]).stdout),
        "greeting\tv0.memo\n",
        "what the provider made is recorded"
    );
    assert_eq!(text(&project.capstan(&["state", "pending"]).stdout), "");
}

#[test]
fn a_delete_held_back_by_a_failed_dependent_names_it_as_the_dependent() {
    // `greeting` (v0: cannot be deleted) depends on `base`; destroying deletes `greeting`
    // first, which fails, so `base` is kept — because of its dependent, not a dependency.
    let project = Project::new(json!({
        "base": {"provider": "local", "type": "memo", "inputs": {"value": "x"}},
        "greeting": {"provider": "v0", "type": "memo", "inputs": {"initialize_with": {"$ref": "base#value"}}, "outputs": ["value"]}
    }));
    assert_eq!(project.capstan(&["apply"]).status.code(), Some(0));
    let destroy = project.capstan(&["destroy"]);
    let stderr = text(&destroy.stderr);
    assert_eq!(destroy.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("base: skipped (`greeting`, which depends on it, was not deleted)"),
        "{stderr}"
    );
}

#[test]
fn a_type_nixops4_keeps_no_state_is_created_again_instead_of_updated() {
    let sfile = |contents: &str| json!({"provider": "v0s", "type": "sfile", "inputs": {"contents": contents}, "outputs": ["contents"]});
    let write = |project: &Project, stateless: bool, contents: &str| {
        let mut v0 =
            json!({"executable": "python3", "args": [v0_provider()], "protocol": "nixops4-v0"});
        if stateless {
            v0["statelessTypes"] = json!(["sfile"]);
        }
        let deployment = json!({"providers": {"v0s": v0}, "resources": {"f": sfile(contents)}});
        std::fs::write(
            project.dir.path().join("capstan.json"),
            deployment.to_string(),
        )
        .unwrap();
    };
    let project = Project::new(json!({}));
    write(&project, true, "one");
    let out = project.capstan(&["apply"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    write(&project, true, "two");
    let out = project.capstan(&["apply"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("sfile: writing two"),
        "{}",
        text(&out.stderr)
    );
    let shown = project.capstan(&["state", "show", "f"]);
    assert!(text(&shown.stdout).contains("\"contents\": \"two\""));

    // Undeclared, the type is updated as a stateful one, which such a provider refuses: its
    // multi-line error is a one-line message with the rest as details.
    write(&project, false, "three");
    let out = project.capstan(&["apply", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let events = crate::support::events(&out.stdout);
    let failed = events
        .iter()
        .find(|e| e["type"] == "resource_failed")
        .expect("a failure");
    assert_eq!(
        failed["error"],
        "f: Internal error: update called on stateless file resource"
    );
    assert!(failed["details"]
        .as_str()
        .unwrap()
        .starts_with("stack backtrace:\n   0: nixops4_resource_local::main"));
}

#[test]
fn a_v0_program_and_what_it_started_do_not_outlive_capstan_stopped_by_sigterm() {
    // What `timeout` or a service manager does: SIGTERM. capstan stops gracefully (143), and
    // neither the v0 program nor the `sleep` it runs is left behind.
    let marker = format!("301.{}", std::process::id() % 100_000);
    let project = Project::new(json!({
        "nap": {"provider": "v0", "type": "slow", "inputs": {"marker": marker}, "outputs": ["value"]}
    }));
    let running = || -> Vec<String> {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .filter(|c| c.contains(&marker))
            .collect()
    };
    let apply = Command::new(capstan_bin())
        .arg("apply")
        .current_dir(project.dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    crate::support::wait_until("the v0 program runs", || !running().is_empty());
    // SAFETY: signals the child we started.
    unsafe { libc::kill(apply.id() as i32, libc::SIGTERM) };
    let out = apply.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(143), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("terminated (SIGTERM): stopping gracefully"));
    assert!(running().is_empty(), "left running: {:?}", running());
}
