//! Deployments written in Nix, end to end: real `capstan` processes evaluating with the real
//! Nix evaluator (Debian's nix-bin), the built-in `local` provider as a real process. The
//! design meeting's expression (the set of resources depends on one resource's outputs)
//! applied both ways, deferred resources, nested deployments inside nested ones, and the
//! errors a Nix author meets.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use crate::support::{capstan_bin, events};
use serde_json::Value;

fn nix_available() -> bool {
    crate::support::nix_tool("nix-instantiate", "the Nix deployment tests")
}

fn capstan(dir: &Path, args: &[&str]) -> Output {
    crate::support::capstan_in(dir, args)
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn of_type<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["type"] == kind).collect()
}

/// The seed's expression, written with the library: `config` decides whether `vm` exists.
/// `rest.deeper` is a nested deployment inside the nested one, using `rest.vm`'s outputs.
const SEED: &str = r#"
{ capstan, params, resources, ... }:
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

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

fn state_list(dir: &Path) -> Vec<String> {
    let out = capstan(dir, &["state", "list", "-f", "capstan.nix"]);
    assert!(out.status.success(), "{}", stderr(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split('\t').next().unwrap().to_string())
        .collect()
}

#[test]
fn the_seed_expression_applies_and_unapplies() {
    if !nix_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    // No capstan.json: capstan.nix is the default.
    write(dir, "capstan.nix", SEED);
    write(dir, "on.json", r#"{"vm": true, "name": "web"}"#);
    write(dir, "off.json", r#"{"vm": false, "name": "web"}"#);

    let plan = capstan(dir, &["plan", "--params", "on.json", "--json"]);
    assert!(plan.status.success(), "{}", stderr(&plan));
    let plan_events = events(&plan.stdout);
    let deferred = of_type(&plan_events, "deferred");
    assert_eq!(deferred.len(), 1, "{deferred:?}");
    assert_eq!(deferred[0]["address"], "machines");
    assert_eq!(deferred[0]["what"], "nested");
    assert_eq!(deferred[0]["waits_for"], serde_json::json!(["config"]));
    assert!(!dir.join(".capstan").exists(), "plan wrote the state");

    let apply = capstan(dir, &["apply", "--params", "on.json", "--json"]);
    assert!(apply.status.success(), "{}", stderr(&apply));
    let applied = events(&apply.stdout);
    let stages = of_type(&applied, "evaluation_complete");
    assert_eq!(
        stages.len(),
        3,
        "config, then machines, then machines.deeper: {stages:?}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("out/vm.txt")).unwrap(),
        "vm for web"
    );
    // The nested-in-nested member computed with the file the vm wrote.
    assert_eq!(
        std::fs::read_to_string(dir.join("out/leaf.txt")).unwrap(),
        "vm for web"
    );
    assert_eq!(
        state_list(dir),
        ["config", "machines.deeper.leaf", "machines.vm"]
    );
    let summary = of_type(&applied, "summary");
    assert_eq!(summary.len(), 1, "one summary for all waves");
    assert_eq!(summary[0]["created"], 3);

    // Nothing to do now, and one evaluation tells (given the recorded outputs).
    let again = capstan(dir, &["plan", "--params", "on.json", "--detailed-exitcode"]);
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
    let again = capstan(dir, &["plan", "--params", "on.json", "--json"]);
    let again = events(&again.stdout);
    assert_eq!(of_type(&again, "evaluation_complete").len(), 1, "{again:?}");
    assert!(of_type(&again, "deferred").is_empty(), "{again:?}");

    // `f` false: the plan cannot know yet (it depends on `config`'s new outputs), but it
    // names every member the apply may delete.
    let plan = capstan(dir, &["plan", "--params", "off.json"]);
    assert!(plan.status.success(), "{}", stderr(&plan));
    let shown = String::from_utf8_lossy(&plan.stdout);
    for member in ["machines.vm", "machines.deeper.leaf"] {
        assert!(
            shown.contains(&format!(
                "? {member}  (may be deleted: depends on the new outputs of `config`)"
            )),
            "{member} not named:\n{shown}"
        );
    }
    let plan = capstan(dir, &["plan", "--params", "off.json", "--json"]);
    let deferred = of_type(&events(&plan.stdout), "deferred")
        .into_iter()
        .find(|e| e["address"] == "machines")
        .cloned()
        .unwrap();
    assert_eq!(
        deferred["may_delete"],
        serde_json::json!(["machines.deeper.leaf", "machines.vm"]),
        "{deferred}"
    );
    // The next apply deletes `vm` (and what was nested under it), leaf first.
    let off = capstan(dir, &["apply", "--params", "off.json", "--json"]);
    assert!(off.status.success(), "{}", stderr(&off));
    assert!(!dir.join("out/vm.txt").exists());
    assert!(!dir.join("out/leaf.txt").exists());
    assert_eq!(state_list(dir), ["config"]);
    let off_events = events(&off.stdout);
    let deleted: Vec<&str> = of_type(&off_events, "resource_complete")
        .into_iter()
        .filter(|e| e["operation"] == "delete")
        .map(|e| e["address"].as_str().unwrap())
        .collect();
    assert_eq!(deleted, ["machines.deeper.leaf", "machines.vm"]);
    let again = capstan(
        dir,
        &["plan", "--params", "off.json", "--detailed-exitcode"],
    );
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));

    // And back.
    let on = capstan(dir, &["apply", "--params", "on.json"]);
    assert!(on.status.success(), "{}", stderr(&on));
    assert!(dir.join("out/leaf.txt").exists());

    let destroy = capstan(dir, &["destroy", "--yes"]);
    assert!(destroy.status.success(), "{}", stderr(&destroy));
    assert!(state_list(dir).is_empty());
    assert!(!dir.join("out/vm.txt").exists());
}

#[test]
fn a_computed_output_defers_its_resource_and_a_reference_does_not() {
    if !nix_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    write(
        dir,
        "deploy.nix",
        r#"
{ capstan, resources, ... }:
let upper = s: builtins.replaceStrings [ "a" "b" "c" "d" "e" "f" "g" "h" "i" "j" "k" "l" "m" "n" "o" "p" "q" "r" "s" "t" "u" "v" "w" "x" "y" "z" ]
                                       [ "A" "B" "C" "D" "E" "F" "G" "H" "I" "J" "K" "L" "M" "N" "O" "P" "Q" "R" "S" "T" "U" "V" "W" "X" "Y" "Z" ] s;
in {
  providers.local = capstan.builtin "local";
  resources = {
    name = { provider = "local"; type = "memo"; inputs.value = "db"; };
    shout = { provider = "local"; type = "memo"; inputs.value = upper resources.name.outputs.value; };
    choice = { provider = "local"; type = "memo"; inputs.value = if resources.name.outputs.value == "db" then "yes" else "no"; };
    url = { provider = "local"; type = "memo"; inputs.value = "postgres://${resources.name.outputs.value}:5432"; };
    passed = { provider = "local"; type = "memo"; inputs.value = resources.name.output "value"; };
  };
}
"#,
    );
    let plan = capstan(dir, &["plan", "-f", "deploy.nix", "--json"]);
    assert!(plan.status.success(), "{}", stderr(&plan));
    let plan_events = events(&plan.stdout);
    let mut deferred: Vec<&str> = of_type(&plan_events, "deferred")
        .iter()
        .map(|d| {
            assert_eq!(d["waits_for"], serde_json::json!(["name"]));
            assert_eq!(d["what"], "resource");
            d["address"].as_str().unwrap()
        })
        .collect();
    deferred.sort();
    assert_eq!(deferred, ["choice", "shout", "url"]);
    let planned = &of_type(&plan_events, "plan")[0]["changes"];
    let passed = planned
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["address"] == "passed")
        .expect("the reference is planned at once");
    assert_eq!(passed["waits_on"], serde_json::json!(["name"]));

    let apply = capstan(dir, &["apply", "-f", "deploy.nix", "--json"]);
    assert!(apply.status.success(), "{}", stderr(&apply));
    let outputs = |address: &str| -> Value {
        let out = capstan(dir, &["state", "show", address, "-f", "deploy.nix"]);
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_slice::<Value>(&out.stdout).unwrap()["outputs"]["value"].clone()
    };
    // Each computed from the real value, never from a stand-in.
    assert_eq!(outputs("shout"), "DB");
    assert_eq!(outputs("choice"), "yes");
    assert_eq!(outputs("url"), "postgres://db:5432");
    assert_eq!(outputs("passed"), "db");
    // Recorded as depending on what they were computed from (so deleted before it).
    let shown = capstan(dir, &["state", "show", "shout", "-f", "deploy.nix"]);
    let shown: Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown["dependencies"], serde_json::json!(["name"]));
}

/// Runs `plan` on a file and returns its stderr, checking it failed with exit code 2.
fn plan_fails(dir: &Path, file: &str, text: &str) -> String {
    write(dir, file, text);
    let out = capstan(dir, &["plan", "-f", file]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{file}: {err}");
    assert!(!err.contains("trace: capstan-"), "{err}");
    err
}

#[test]
fn nix_errors_are_shown_with_nix_s_message_and_place() {
    if !nix_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let err = plan_fails(
        dir,
        "syntax.nix",
        "{ resources = { a = { provider = \"local\"; type = \"memo\" ",
    );
    assert!(err.contains("syntax error"), "{err}");
    assert!(err.contains("syntax.nix:1:"), "{err}");

    let err = plan_fails(
        dir,
        "throws.nix",
        "{ capstan, ... }: {\n  providers.local = capstan.builtin \"local\";\n  resources.a = { provider = \"local\"; type = \"memo\"; inputs.value = throw \"no value for a\"; };\n}\n",
    );
    assert!(err.contains("no value for a"), "{err}");
    assert!(err.contains("throws.nix:3:"), "{err}");
    assert!(
        !err.contains("«stdin»"),
        "the library's frames are left out: {err}"
    );

    let err = plan_fails(
        dir,
        "typo.nix",
        "{ capstan, ... }: { providers.local = capstan.builtin \"local\"; resources.a = { provider = \"local\"; type = \"memo\"; input.value = 1; }; }",
    );
    assert!(err.contains("unknown key `input`"), "{err}");

    let err = plan_fails(
        dir,
        "cycle.nix",
        "{ capstan, ... }: { providers.local = capstan.builtin \"local\";\n  resources.n = capstan.nested ({ resources }: if resources.n ? x then { } else { x = { provider = \"local\"; type = \"memo\"; }; });\n}",
    );
    assert!(
        err.contains("nested deployment `n` depend on themselves: n → n"),
        "{err}"
    );
    assert!(!err.contains("infinite recursion"), "{err}");

    let err = plan_fails(
        dir,
        "mutual.nix",
        "{ capstan, ... }: { providers.local = capstan.builtin \"local\"; resources = {\n  a = capstan.nested ({ resources }: if resources.b ? y then { x = { provider = \"local\"; type = \"memo\"; }; } else { });\n  b = capstan.nested ({ resources }: if resources.a ? x then { y = { provider = \"local\"; type = \"memo\"; }; } else { });\n}; }",
    );
    assert!(err.contains("a → b → a"), "{err}");

    let err = plan_fails(
        dir,
        "noprovider.nix",
        "{ capstan, ... }: { providers.local = capstan.builtin \"local\"; resources.a = { provider = \"nope\"; type = \"memo\"; }; }",
    );
    assert!(err.contains("nope"), "{err}");

    // Issue 20 item 16: what goes wrong in the shape of a deployment is said in its words,
    // never as a place in the library, and no error advises a flag capstan does not take.
    let shapes = [
        ("five.nix", "{ capstan, ... }: { resources = 5; }", "`resources` must be an attribute set of resources (name = { provider = …; type = …; inputs = …; }), not an integer"),
        ("nested.nix", "{ capstan, ... }: { providers.local = capstan.builtin \"local\"; resources.n = capstan.nested (_: 42); }", "nested deployment `n`: its function must return an attribute set of members"),
        ("import.nix", "{ capstan, ... }: { providers.local = capstan.builtin \"local\"; resources.a = import ./nope.nix; }", "nope.nix': No such file or directory\n  (while reading `a`)"),
        ("add.nix", "{ capstan, ... }: { providers.local = capstan.builtin \"local\";\n  resources.a = { provider = \"local\"; type = \"memo\"; inputs.value = 1 + \"x\"; }; }", "add.nix:2:"),
    ];
    for (file, text, said) in shapes {
        let err = plan_fails(dir, file, text);
        assert!(err.contains(said), "{file}: {err}");
        assert!(!err.contains("«stdin»"), "{file}: {err}");
        assert!(!err.contains("--show-trace"), "{file}: {err}");
    }
    assert!(!dir.join(".capstan").exists(), "plan wrote the state");
}

#[test]
fn a_missing_attribute_found_in_a_later_stage_stops_what_depends_on_it() {
    if !nix_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    write(
        dir,
        "capstan.nix",
        "{ capstan, resources, ... }: { providers.local = capstan.builtin \"local\"; resources = {\n  a = { provider = \"local\"; type = \"memo\"; inputs.value = 1; };\n  b = { provider = \"local\"; type = \"memo\"; inputs.value = resources.a.outputs.nosuch; };\n}; }\n",
    );
    let out = capstan(dir, &["apply"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("attribute 'nosuch' missing"), "{err}");
    assert!(err.contains("capstan.nix:3:"), "{err}");
    assert!(err.contains("b: skipped"), "{err}");
    // What was made is recorded.
    assert_eq!(state_list(dir), ["a"]);
}

#[test]
fn without_nix_the_error_names_the_package() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    write(dir, "capstan.nix", "{ }");
    let out = Command::new(capstan_bin())
        .args(["plan"])
        .current_dir(dir)
        .env("CAPSTAN_NIX_INSTANTIATE", "/nonexistent/nix-instantiate")
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("apt-get install nix-bin"), "{err}");
    assert!(err.contains("/nonexistent/nix-instantiate"), "{err}");
}

#[test]
fn evaluation_is_reported_in_the_event_stream() {
    if !nix_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    write(
        dir,
        "capstan.nix",
        "{ capstan, params, ... }: { providers.local = capstan.builtin \"local\"; resources.g = capstan.group { a = { provider = \"local\"; type = \"memo\"; inputs.value = params.greeting; }; }; }",
    );
    write(dir, "params.json", r#"{"greeting": "hi"}"#);
    let out = capstan(dir, &["apply", "--params", "params.json", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let all = events(&out.stdout);
    let start = of_type(&all, "evaluation_start");
    let done = of_type(&all, "evaluation_complete");
    assert_eq!(start.len(), 1);
    assert_eq!(done[0]["resources"], 1);
    assert_eq!(done[0]["deferred"], 0);
    assert!(done[0]["elapsed_seconds"].as_f64().unwrap() > 0.0);
    let created = of_type(&all, "resource_complete");
    assert_eq!(created[0]["address"], "g.a");
    assert_eq!(created[0]["outputs"]["value"], "hi");
    // A parameter that is not given is Nix's missing attribute, never a null.
    let out = capstan(dir, &["plan"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("attribute 'greeting' missing"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn deferred_resources_join_the_run_while_it_goes_on() {
    if !nix_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    // `after` waits for `fast` only: it is evaluated and made while `slow` still runs, not
    // in a wave after everything.
    write(
        dir,
        "capstan.nix",
        r#"{ capstan, resources, ... }: {
  providers.local = capstan.builtin "local";
  resources = {
    slow = { provider = "local"; type = "exec"; inputs = { command = "sleep"; args = [ "3" ]; }; };
    fast = { provider = "local"; type = "memo"; inputs.value = "x"; };
    after = { provider = "local"; type = "memo"; inputs.value = "${resources.fast.outputs.value}!"; };
    more = capstan.nested ({ resources, ... }: { m = { provider = "local"; type = "memo"; inputs.value = resources.after.outputs.value; }; });
  };
}"#,
    );
    let out = capstan(dir, &["apply", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let all = events(&out.stdout);
    let position = |address: &str| {
        all.iter()
            .position(|e| e["type"] == "resource_complete" && e["address"] == address)
            .unwrap_or_else(|| panic!("{address} was not made"))
    };
    assert!(
        position("after") < position("slow"),
        "after waited for slow"
    );
    assert!(
        position("more.m") < position("slow"),
        "more.m waited for slow"
    );
    let summary = of_type(&all, "summary");
    assert_eq!(summary.len(), 1);
    assert_eq!(summary[0]["created"], 4);
    assert_eq!(of_type(&all, "evaluation_complete").len(), 3);
}

/// The processes whose working directory is `dir` (an evaluation runs there).
fn processes_in(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let cwd = std::fs::read_link(entry.path().join("cwd"));
        if cwd.is_ok_and(|c| c == dir) {
            let name = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            found.push(format!(
                "{} {}",
                entry.file_name().to_string_lossy(),
                name.trim()
            ));
        }
    }
    found
}

#[test]
fn a_signal_during_an_evaluation_leaves_no_process_behind() {
    if !nix_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().canonicalize().unwrap();
    // Seconds of evaluation.
    write(
        &dir,
        "capstan.nix",
        "{ capstan, ... }: { providers.local = capstan.builtin \"local\"; resources.a = { provider = \"local\"; type = \"memo\"; inputs.value = builtins.foldl' (a: b: a + b) 0 (builtins.genList (i: i) 30000000); }; }",
    );
    for (signal, code) in [(libc::SIGTERM, 143), (libc::SIGKILL, -1)] {
        let mut child = Command::new(capstan_bin())
            .args(["apply"])
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Until Nix runs.
        crate::support::wait_until("an evaluation starts", || {
            processes_in(&dir)
                .iter()
                .any(|p| p.contains("nix-instantiate"))
        });
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(child.id() as i32, signal) };
        let status = child.wait().unwrap();
        if code > 0 {
            assert_eq!(status.code(), Some(code));
        }
        crate::support::wait_until(&format!("nothing is left after signal {signal}"), || {
            processes_in(&dir).is_empty()
        });
    }
    // Nothing was recorded by a run that never started.
    let out = capstan(&dir, &["state", "list"]);
    assert!(String::from_utf8_lossy(&out.stdout).trim().is_empty());
}

#[test]
fn what_a_deferred_member_depends_on_is_not_deleted_before_it() {
    if !nix_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let deployment = |with_d: bool, flag: bool| {
        let d = if with_d {
            r#"d = { provider = "local"; type = "memo"; inputs.value = "dep"; };"#
        } else {
            ""
        };
        format!(
            r#"{{ capstan, resources, ... }}: {{
  providers.local = capstan.builtin "local";
  resources = {{
    {d}
    c = {{ provider = "local"; type = "memo"; inputs.value = {flag}; }};
    n = capstan.nested ({{ resources, ... }}: if resources.c.outputs.value then {{
      old = {{ provider = "local"; type = "memo"; inputs.value = resources.d.output "value"; }};
    }} else {{ }});
  }};
}}"#
        )
    };
    write(dir, "capstan.nix", &deployment(true, true));
    let first = capstan(dir, &["apply"]);
    assert!(first.status.success(), "{}", stderr(&first));
    assert_eq!(state_list(dir), ["c", "d", "n.old"]);
    // `d` goes, and `c` changes, so `n` is deferred again while the plan is made: `n.old`
    // (recorded as depending on `d`) may still be declared, so `d` must stay.
    write(dir, "capstan.nix", &deployment(false, false));
    let plan = capstan(dir, &["plan", "--json"]);
    assert!(plan.status.success(), "{}", stderr(&plan));
    let plan_events = events(&plan.stdout);
    // Given the recorded outputs, `c`'s old `true` takes `n` to `resources.d`, which is gone:
    // that evaluation stops, and the plan evaluates again from no output (nothing failed).
    let retried = of_type(&plan_events, "evaluation_failed");
    assert!(
        retried.len() == 1 && retried[0]["retried"] == true,
        "{retried:?}"
    );
    let planned = &of_type(&plan_events, "plan")[0]["changes"];
    assert!(
        !planned
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["address"] == "d"),
        "d is planned while n.old may need it: {planned}"
    );
    let second = capstan(dir, &["apply", "--json"]);
    assert!(second.status.success(), "{}", stderr(&second));
    // Once `c` is made, `n` yields nothing: `n.old` is deleted, and then `d`, in this run.
    let second_events = events(&second.stdout);
    let deleted: Vec<&str> = of_type(&second_events, "resource_complete")
        .into_iter()
        .filter(|e| e["operation"] == "delete")
        .map(|e| e["address"].as_str().unwrap())
        .collect();
    assert_eq!(deleted, ["n.old", "d"]);
    assert_eq!(state_list(dir), ["c"]);
    let again = capstan(dir, &["plan", "--detailed-exitcode"]);
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
}

#[test]
fn an_output_caught_with_try_eval_still_defers() {
    if !nix_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    // Without care, `b` would be declared with the fallback "none" before `a` exists.
    write(
        dir,
        "capstan.nix",
        r#"{ capstan, resources, ... }: {
  providers.local = capstan.builtin "local";
  resources = {
    a = { provider = "local"; type = "memo"; inputs.value = "real"; };
    b = { provider = "local"; type = "memo";
          inputs.value = let t = builtins.tryEval resources.a.outputs.value; in if t.success then t.value else "none"; };
    # A trace that is not UTF-8 does not stop capstan reading Nix's answer.
    a0 = { provider = "local"; type = "memo"; inputs.value = builtins.trace (builtins.readFile ./bytes.bin) 1; };
  };
}"#,
    );
    std::fs::write(dir.join("bytes.bin"), b"\xff\xfe not UTF-8\n").unwrap();
    let plan = capstan(dir, &["plan", "--json"]);
    assert!(plan.status.success(), "{}", stderr(&plan));
    let deferred: Vec<String> = of_type(&events(&plan.stdout), "deferred")
        .iter()
        .map(|d| d["address"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(deferred, ["b"]);
    let apply = capstan(dir, &["apply"]);
    assert!(apply.status.success(), "{}", stderr(&apply));
    let b = capstan(dir, &["state", "show", "b"]);
    let b: Value = serde_json::from_slice(&b.stdout).unwrap();
    assert_eq!(b["outputs"]["value"], "real");
}

#[test]
fn a_name_that_would_make_addresses_ambiguous_is_an_error() {
    if !nix_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let err = plan_fails(
        dir,
        "dotted.nix",
        r#"{ capstan, resources, ... }: { providers.local = capstan.builtin "local"; resources = {
  c = { provider = "local"; type = "memo"; inputs.value = 1; };
  n = capstan.nested ({ resources, ... }: { "a.b" = { provider = "local"; type = "memo"; inputs.value = resources.c.outputs.value; }; });
}; }"#,
    );
    assert!(err.contains("`a.b`"), "{err}");
    assert!(err.contains("must not contain"), "{err}");
}

#[test]
fn a_member_read_later_depends_on_every_output_it_used() {
    if !nix_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    // `gate` waits for `db` (a reference), so `db` exists when `n` is read: `n.vm` uses
    // `db`'s output without ever waiting for it, and must still be recorded as depending on
    // it (so that it is deleted first).
    write(
        dir,
        "capstan.nix",
        r#"{ capstan, resources, ... }: {
  providers.local = capstan.builtin "local";
  resources = {
    db = { provider = "local"; type = "memo"; inputs.value = "10.0.0.1"; };
    gate = { provider = "local"; type = "memo"; inputs.value = resources.db.output "value"; };
    n = capstan.nested ({ resources, ... }: if resources.gate.outputs.value != null then {
      vm = { provider = "local"; type = "memo"; inputs.value = "ip ${resources.db.outputs.value}"; };
    } else { });
  };
}"#,
    );
    let apply = capstan(dir, &["apply"]);
    assert!(apply.status.success(), "{}", stderr(&apply));
    let vm = capstan(dir, &["state", "show", "n.vm"]);
    let vm: Value = serde_json::from_slice(&vm.stdout).unwrap();
    assert_eq!(vm["outputs"]["value"], "ip 10.0.0.1");
    assert_eq!(vm["dependencies"], serde_json::json!(["db", "gate"]));
    let again = capstan(dir, &["plan", "--detailed-exitcode"]);
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
    // Destroy deletes it before what it used.
    let destroy = capstan(dir, &["destroy", "--yes", "--json"]);
    assert!(destroy.status.success(), "{}", stderr(&destroy));
    let destroy_events = events(&destroy.stdout);
    let order: Vec<&str> = of_type(&destroy_events, "resource_complete")
        .into_iter()
        .map(|e| e["address"].as_str().unwrap())
        .collect();
    let at = |a: &str| order.iter().position(|x| *x == a).unwrap();
    assert!(
        at("n.vm") < at("db") && at("n.vm") < at("gate"),
        "{order:?}"
    );
}

#[test]
fn a_large_nested_deployment_records_what_its_members_used_in_one_pass() {
    if !nix_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    // More members than are read one instance each: one instance reads them all.
    write(
        dir,
        "capstan.nix",
        r#"{ capstan, resources, ... }: {
  providers.local = capstan.builtin "local";
  resources = {
    base = { provider = "local"; type = "memo"; inputs.value = 7; };
    gate = { provider = "local"; type = "memo"; inputs.value = resources.base.output "value"; };
    n = capstan.nested ({ resources, ... }: builtins.listToAttrs (builtins.genList (i: {
      name = "m${toString i}";
      value = { provider = "local"; type = "memo"; inputs.value = i + resources.base.outputs.value; };
    }) (if resources.gate.outputs.value > 0 then 100 else 0)));
  };
}"#,
    );
    let apply = capstan(dir, &["apply"]);
    assert!(apply.status.success(), "{}", stderr(&apply));
    assert_eq!(state_list(dir).len(), 102);
    let m = capstan(dir, &["state", "show", "n.m42"]);
    let m: Value = serde_json::from_slice(&m.stdout).unwrap();
    assert_eq!(m["outputs"]["value"], 49);
    assert_eq!(m["dependencies"], serde_json::json!(["base", "gate"]));
}

/// A derivation that builds at once (builder /bin/sh, offline), different for each `nonce`.
fn quick_derivation(nonce: &str) -> String {
    format!(
        r#"derivation {{
  name = "capstan-stale-test";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  nonce = "{nonce}";
  args = [ "-c" "echo {nonce} > $out" ];
}}"#
    )
}

#[test]
fn a_value_computed_from_a_build_that_changed_behind_its_inputs_is_computed_again() {
    if !nix_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let unique = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    write(dir, "drv.nix", &quick_derivation(&format!("one-{unique}")));
    write(
        dir,
        "capstan.nix",
        r#"{ capstan, resources, ... }: {
  providers.nix = capstan.builtin "nix";
  providers.local = capstan.builtin "local";
  resources = {
    build = { provider = "nix"; type = "build";
              inputs = { file = "drv.nix"; args = [ "--option" "substituters" "" ]; }; };
    # Computed from the build's output: its inputs are the store path itself.
    path = { provider = "local"; type = "memo"; inputs.value = "${resources.build.outputs.outPath}"; };
  };
}"#,
    );
    let first = capstan(dir, &["apply"]);
    assert!(first.status.success(), "{}", stderr(&first));
    let recorded = |address: &str| -> Value {
        let out = capstan(dir, &["state", "show", address]);
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let old_path = recorded("build")["outputs"]["outPath"].clone();
    assert_eq!(recorded("path")["outputs"]["value"], old_path);
    // The derivation changes; the build's inputs (the file's name) do not.
    write(dir, "drv.nix", &quick_derivation(&format!("two-{unique}")));
    let plan = capstan(dir, &["plan", "--json"]);
    assert!(plan.status.success(), "{}", stderr(&plan));
    let plan_events = events(&plan.stdout);
    let deferred: Vec<&Value> = of_type(&plan_events, "deferred");
    assert!(
        deferred.iter().any(|d| d["address"] == "path"),
        "`path` holds the old store path and must wait for the build: {plan_events:?}"
    );
    let second = capstan(dir, &["apply"]);
    assert!(second.status.success(), "{}", stderr(&second));
    let new_path = recorded("build")["outputs"]["outPath"].clone();
    assert_ne!(new_path, old_path);
    assert_eq!(recorded("path")["outputs"]["value"], new_path);
}

#[test]
fn a_deployments_own_trace_cannot_pass_for_the_librarys() {
    // Issue 20: `builtins.trace "capstan-touch#b"` made `a` wait for `b`'s outputs forever.
    if !nix_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    write(
        dir,
        "capstan.nix",
        r#"{ capstan, resources, ... }: {
  providers.local = { builtin = "local"; };
  resources.a = { provider = "local"; type = "memo"; inputs.value = builtins.trace "capstan-touch#b" 1; };
  resources.b = { provider = "local"; type = "memo"; inputs.value = 2; };
}"#,
    );
    let out = capstan(dir, &["apply"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(state_list(dir), ["a", "b"], "{}", stderr(&out));
    // The author's trace is shown as the evaluation's, not as a provider's (the built-in
    // provider called `nix` is another thing).
    assert!(
        stderr(&out).contains("capstan.nix: trace: capstan-touch#b"),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains("provider nix"), "{}", stderr(&out));
    let json = capstan(dir, &["plan", "--json"]);
    let traced = events(&json.stdout)
        .into_iter()
        .find(|e| e["type"] == "evaluation_log")
        .unwrap_or_else(|| panic!("{}", String::from_utf8_lossy(&json.stdout)));
    assert_eq!(traced["file"], "capstan.nix", "{traced}");
    let plan = capstan(dir, &["plan", "--detailed-exitcode"]);
    assert_eq!(plan.status.code(), Some(0), "{}", stderr(&plan));
}

#[test]
fn an_interrupt_during_a_later_evaluation_names_and_counts_what_was_deferred() {
    if !nix_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().canonicalize().unwrap();
    // `b` waits for `a`'s output, and its evaluation then takes seconds; `c` waits for `b`.
    write(
        &dir,
        "capstan.nix",
        r#"{ capstan, resources, ... }: { providers.local = capstan.builtin "local"; resources = {
  a = { provider = "local"; type = "memo"; inputs.value = "a"; };
  b = { provider = "local"; type = "memo";
        inputs.value = "${resources.a.outputs.value}-${toString (builtins.foldl' (x: y: x + y) 0 (builtins.genList (i: i) 40000000))}"; };
  c = { provider = "local"; type = "memo"; inputs.value = resources.b.outputs.value; };
}; }"#,
    );
    let child = Command::new(capstan_bin())
        .args(["apply", "--json"])
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // `a` is made; then the second evaluation runs.
    crate::support::wait_until("`a` is recorded", || {
        String::from_utf8_lossy(&capstan(&dir, &["state", "list"]).stdout).contains("a\t")
    });
    crate::support::wait_until("the second evaluation runs", || {
        processes_in(&dir)
            .iter()
            .any(|p| p.contains("nix-instantiate"))
    });
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = crate::support::output_within(child, "apply interrupted in an evaluation");
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    let events = events(&out.stdout);
    let skipped: Vec<&str> = of_type(&events, "resource_skipped")
        .iter()
        .filter(|e| {
            e["reason"]
                .as_str()
                .is_some_and(|r| r.contains("interrupted"))
        })
        .filter_map(|e| e["address"].as_str())
        .collect();
    assert!(skipped.contains(&"b"), "`b` is named: {events:?}");
    let summary = of_type(&events, "summary")[0];
    assert!(
        summary["skipped"].as_u64().unwrap_or(0) >= 1,
        "what was deferred is counted: {summary}"
    );
}

#[test]
fn a_cycle_through_outputs_is_a_cycle_in_the_plan() {
    if !nix_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let two = plan_fails(
        dir,
        "two.nix",
        r#"{ capstan, resources, ... }: { providers.local = capstan.builtin "local"; resources = {
  a = { provider = "local"; type = "memo"; inputs.value = resources.b.outputs.value; };
  b = { provider = "local"; type = "memo"; inputs.value = resources.a.outputs.value; };
  fine = { provider = "local"; type = "memo"; inputs.value = 1; };
}; }"#,
    );
    assert!(
        two.contains("dependency cycle through outputs: a -> b -> a")
            || two.contains("dependency cycle through outputs: b -> a -> b"),
        "{two}"
    );
    let own = plan_fails(
        dir,
        "own.nix",
        r#"{ capstan, resources, ... }: { providers.local = capstan.builtin "local"; resources = {
  a = { provider = "local"; type = "memo"; inputs.value = resources.a.outputs.value; };
}; }"#,
    );
    assert!(
        own.contains("dependency cycle through outputs: a -> a"),
        "{own}"
    );
    // Waiting on something that will be made is no cycle.
    write(
        dir,
        "chain.nix",
        r#"{ capstan, resources, ... }: { providers.local = capstan.builtin "local"; resources = {
  a = { provider = "local"; type = "memo"; inputs.value = 1; };
  b = { provider = "local"; type = "memo"; inputs.value = resources.a.outputs.value; };
  c = { provider = "local"; type = "memo"; inputs.value = resources.b.outputs.value; };
}; }"#,
    );
    let out = capstan(dir, &["plan", "-f", "chain.nix"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn an_edit_during_the_run_is_not_half_applied() {
    if !nix_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().canonicalize().unwrap();
    let started = dir.join("started");
    let deployment = |second: &str| {
        format!(
            r#"{{ capstan, resources, ... }}: {{ providers.local = capstan.builtin "local"; resources = {{
  slow = {{ provider = "local"; type = "exec"; inputs = {{ command = "sh"; args = [ "-c" "touch {}; sleep 2; echo made" ]; }}; }};
  {second}
}}; }}"#,
            started.display()
        )
    };
    write(
        &dir,
        "capstan.nix",
        &deployment(
            r#"later = { provider = "local"; type = "memo"; inputs.value = "from ${resources.slow.outputs.stdout}"; };"#,
        ),
    );
    let child = Command::new(capstan_bin())
        .args(["apply", "--json"])
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // While `slow` runs, `later` is removed and another resource takes its place.
    crate::support::wait_until("`slow` runs", || started.exists());
    write(
        &dir,
        "capstan.nix",
        &deployment(
            r#"other = { provider = "local"; type = "memo"; inputs.value = "new ${resources.slow.outputs.stdout}"; };"#,
        ),
    );
    let out = crate::support::output_within(child, "apply while its deployment is edited");
    let events = events(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(
        state_list(&dir),
        ["slow"],
        "neither the old nor the new: {events:?}"
    );
    let failed = of_type(&events, "evaluation_failed");
    assert!(
        failed.iter().any(|e| e["error"]
            .as_str()
            .is_some_and(|m| m.contains("changed since the run started"))),
        "{events:?}"
    );
    let skipped = of_type(&events, "resource_skipped");
    assert!(
        skipped.iter().any(|e| e["address"] == "later"
            && e["reason"]
                .as_str()
                .is_some_and(|r| r.contains("changed during the run"))),
        "{events:?}"
    );
}

/// A chain of `length` memo resources, each computing on the previous one's output.
fn computed_chain(length: usize, first: i64) -> String {
    let mut text = format!(
        "{{ capstan, resources, ... }}: {{\n  providers.local = capstan.builtin \"local\";\n  resources = {{\n    r0 = {{ provider = \"local\"; type = \"memo\"; inputs.value = {first}; }};\n"
    );
    for i in 1..length {
        text.push_str(&format!(
            "    r{i} = {{ provider = \"local\"; type = \"memo\"; inputs.value = resources.r{}.outputs.value + 1; }};\n",
            i - 1
        ));
    }
    text.push_str("  };\n}\n");
    text
}

#[test]
fn a_no_op_plan_is_one_evaluation_and_a_change_defers_only_what_it_reaches() {
    if !nix_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    write(dir, "capstan.nix", &computed_chain(10, 0));
    let first = capstan(dir, &["apply", "--json"]);
    assert!(first.status.success(), "{}", stderr(&first));
    let first = events(&first.stdout);
    // From nothing, each level waits for the one before it.
    assert_eq!(of_type(&first, "summary")[0]["evaluations"], 10);

    // Unchanged: one evaluation, given every recorded output, and nothing deferred.
    let plan = capstan(dir, &["plan", "--json"]);
    assert!(plan.status.success(), "{}", stderr(&plan));
    let plan = events(&plan.stdout);
    assert_eq!(of_type(&plan, "evaluation_complete").len(), 1, "{plan:?}");
    assert!(of_type(&plan, "deferred").is_empty());
    let noop = capstan(dir, &["apply", "--json"]);
    assert!(noop.status.success(), "{}", stderr(&noop));
    let noop = events(&noop.stdout);
    let summary = &of_type(&noop, "summary")[0];
    assert_eq!(summary["evaluations"], 1, "{summary}");
    assert_eq!(summary["unchanged"], 10, "{summary}");
    let human = capstan(dir, &["apply"]);
    let shown = format!(
        "{}{}",
        String::from_utf8_lossy(&human.stdout),
        stderr(&human)
    );
    assert!(shown.contains("1 evaluation of the deployment"), "{shown}");

    // The middle of the chain changes: what comes before it is planned unchanged from the
    // first evaluation; what follows is deferred (its recorded outputs no longer stand).
    let text = computed_chain(10, 0).replace(
        "inputs.value = resources.r4.outputs.value + 1;",
        "inputs.value = resources.r4.outputs.value + 100;",
    );
    write(dir, "capstan.nix", &text);
    let plan = capstan(dir, &["plan", "--json"]);
    assert!(plan.status.success(), "{}", stderr(&plan));
    let plan = events(&plan.stdout);
    let changes = &of_type(&plan, "plan")[0]["changes"];
    let action = |address: &str| {
        changes
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["address"] == address)
            .map(|c| c["action"].as_str().unwrap().to_string())
    };
    for unchanged in ["r0", "r1", "r2", "r3", "r4"] {
        assert_eq!(action(unchanged).as_deref(), Some("noop"), "{changes}");
    }
    assert_eq!(action("r5").as_deref(), Some("update"), "{changes}");
    let mut deferred: Vec<&str> = of_type(&plan, "deferred")
        .iter()
        .map(|d| d["address"].as_str().unwrap())
        .collect();
    deferred.sort();
    assert_eq!(deferred, ["r6", "r7", "r8", "r9"]);
    let apply = capstan(dir, &["apply"]);
    assert!(apply.status.success(), "{}", stderr(&apply));
    let out = capstan(dir, &["state", "show", "r9"]);
    let r9: Value = serde_json::from_slice(&out.stdout).unwrap();
    // 0 + 1 * 4 + 100 + 1 * 4: computed from the real values, never from the old ones.
    assert_eq!(r9["outputs"]["value"], 108);
    // And recorded as depending on what it computed from.
    assert_eq!(r9["dependencies"], serde_json::json!(["r8"]));
    let again = capstan(dir, &["plan", "--detailed-exitcode"]);
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
}

fn recorded(dir: &Path, address: &str) -> Value {
    let out = capstan(dir, &["state", "show", address]);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn memo(name: &str, value: &str) -> String {
    format!("    {name} = {{ provider = \"local\"; type = \"memo\"; inputs.value = {value}; }};\n")
}

fn memos(members: &[String]) -> String {
    format!(
        "{{ capstan, resources, ... }}: {{\n  providers.local = capstan.builtin \"local\";\n  resources = {{\n{}  }};\n}}\n",
        members.concat()
    )
}

#[test]
fn recorded_outputs_are_trusted_only_where_nothing_computed_from_a_changing_one() {
    if !nix_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    // `web` starts using `config`'s output, whose recorded value it already holds, while
    // `config` is deferred (it now uses a new resource's output): `web` must wait for it.
    write(
        dir,
        "capstan.nix",
        &memos(&[
            memo("config", "{ port = 8080; }"),
            memo("web", "\"port=8080\""),
        ]),
    );
    assert!(capstan(dir, &["apply"]).status.success());
    write(
        dir,
        "capstan.nix",
        &memos(&[
            memo("base", "9090"),
            memo("config", "{ port = resources.base.outputs.value; }"),
            memo(
                "web",
                "\"port=${toString resources.config.outputs.value.port}\"",
            ),
        ]),
    );
    let apply = capstan(dir, &["apply"]);
    assert!(apply.status.success(), "{}", stderr(&apply));
    assert_eq!(recorded(dir, "web")["outputs"]["value"], "port=9090");
    assert_eq!(
        recorded(dir, "web")["dependencies"],
        serde_json::json!(["config"])
    );
    let again = capstan(dir, &["plan", "--detailed-exitcode"]);
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));

    // A resource that now computes what it held as a literal, with the same value: planned
    // unchanged, and recorded as depending on what it computes from.
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    write(
        dir,
        "capstan.nix",
        &memos(&[memo("config", "8080"), memo("web", "8080")]),
    );
    assert!(capstan(dir, &["apply"]).status.success());
    write(
        dir,
        "capstan.nix",
        &memos(&[
            memo("config", "8080"),
            memo("web", "resources.config.outputs.value"),
        ]),
    );
    let plan = capstan(dir, &["plan", "--detailed-exitcode"]);
    assert_eq!(plan.status.code(), Some(0), "{}", stderr(&plan));
    assert!(capstan(dir, &["apply"]).status.success());
    assert_eq!(
        recorded(dir, "web")["dependencies"],
        serde_json::json!(["config"])
    );

    // More new resources than are traced one by one (64), while a recorded one changes to
    // use one of them and a new one uses it: no dependency cycle is recorded.
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    write(dir, "capstan.nix", &memos(&[memo("u", "1")]));
    assert!(capstan(dir, &["apply"]).status.success());
    let mut members: Vec<String> = (0..64)
        .map(|i| memo(&format!("f{i}"), &i.to_string()))
        .collect();
    members.push(memo("u", "resources.f0.outputs.value"));
    members.push(memo("reader", "resources.u.outputs.value"));
    write(dir, "capstan.nix", &memos(&members));
    let apply = capstan(dir, &["apply"]);
    assert!(apply.status.success(), "{}", stderr(&apply));
    assert_eq!(recorded(dir, "f0")["dependencies"], serde_json::json!([]));
    assert_eq!(
        recorded(dir, "u")["dependencies"],
        serde_json::json!(["f0"])
    );
    assert_eq!(recorded(dir, "reader")["outputs"]["value"], 0);
    let again = capstan(dir, &["plan", "--detailed-exitcode"]);
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
    let destroy = capstan(dir, &["destroy", "--yes"]);
    assert!(destroy.status.success(), "{}", stderr(&destroy));
    assert!(state_list(dir).is_empty());
}
