//! `--target`: a run limited to some resources (address, glob, tag) and what they depend on
//! (for destroy: what depends on them); everything else left as it is, and listed.

use std::path::Path;

use serde_json::{json, Value};

use crate::support::{capstan_in, events, shown};

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

fn deployment() -> Value {
    let memo =
        |value: Value| json!({"provider": "local", "type": "memo", "inputs": {"value": value}});
    let mut web = memo(json!({"db": {"$ref": "db#value"}}));
    web["tags"] = json!(["front"]);
    let mut cache = memo(json!("cache"));
    cache["tags"] = json!(["front", "eu"]);
    json!({
        "providers": {"local": {"builtin": "local"}},
        "resources": {
            "db": memo(json!("db")),
            "web": web,
            "cache": cache,
            "batch": {"resources": {"one": memo(json!(1)), "two": memo(json!(2))}},
            "lonely": memo(json!("alone")),
        }
    })
}

fn recorded(dir: &Path) -> Vec<String> {
    let out = capstan_in(dir, &["state", "list"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split('\t').next().map(str::to_string))
        .collect()
}

fn json_of(out: &std::process::Output, kind: &str) -> Vec<Value> {
    events(&out.stdout)
        .into_iter()
        .filter(|e| e["type"] == kind)
        .collect()
}

#[test]
fn a_target_applies_what_it_selects_with_its_dependencies_and_lists_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    write(dir, "capstan.json", &deployment().to_string());

    // By address: `web` and the `db` it uses.
    let out = capstan_in(dir, &["apply", "--target", "web", "--json"]);
    assert!(out.status.success(), "{}", shown(&out));
    assert_eq!(recorded(dir), ["db", "web"]);
    let left = json_of(&out, "not_selected");
    assert_eq!(left.len(), 1, "{}", shown(&out));
    let mut names: Vec<&str> = left[0]["addresses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["batch.one", "batch.two", "cache", "lonely"]);

    // By glob, then by tag (`web` is there already: only `cache` is new).
    let out = capstan_in(dir, &["apply", "--target", "batch.*"]);
    assert!(out.status.success(), "{}", shown(&out));
    assert_eq!(recorded(dir), ["batch.one", "batch.two", "db", "web"]);
    let out = capstan_in(dir, &["plan", "--target", "@front"]);
    assert!(out.status.success(), "{}", shown(&out));
    let plan = String::from_utf8_lossy(&out.stdout);
    assert!(plan.contains("+ cache"), "{plan}");
    assert!(
        plan.contains("not selected by --target, left as they are: lonely"),
        "{plan}"
    );
    assert!(!plan.contains("+ lonely"), "{plan}");

    // A typo selects nothing: an error, nothing done.
    let out = capstan_in(dir, &["apply", "--target", "wbe"]);
    assert_eq!(out.status.code(), Some(2), "{}", shown(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--target `wbe`: selects no resource"),
        "{}",
        shown(&out)
    );
    let out = capstan_in(dir, &["apply", "--target", "@nope"]);
    assert_eq!(out.status.code(), Some(2), "{}", shown(&out));

    // Destroy: the selected resource and what depends on it, nothing else.
    let out = capstan_in(dir, &["destroy", "--yes", "--target", "db"]);
    assert!(out.status.success(), "{}", shown(&out));
    assert_eq!(recorded(dir), ["batch.one", "batch.two"]);
}

#[test]
fn tags_are_checked_and_work_in_nix_too() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let mut bad = deployment();
    bad["resources"]["db"]["tags"] = json!("front");
    write(dir, "capstan.json", &bad.to_string());
    let out = capstan_in(dir, &["plan"]);
    assert_eq!(out.status.code(), Some(2), "{}", shown(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("resources.db.tags: must be a list of tags"),
        "{}",
        shown(&out)
    );
    if !crate::support::nix_tool("nix-instantiate", "the Nix selection test") {
        return;
    }
    write(
        dir,
        "capstan.nix",
        r#"{ capstan, ... }: {
  providers.local = capstan.builtin "local";
  resources = {
    web = { provider = "local"; type = "memo"; inputs.value = "w"; tags = [ "front" ]; };
    db = { provider = "local"; type = "memo"; inputs.value = "d"; };
  };
}"#,
    );
    let out = capstan_in(
        dir,
        &[
            "apply",
            "-f",
            "capstan.nix",
            "--state",
            ".capstan-nix",
            "--target",
            "@front",
        ],
    );
    assert!(out.status.success(), "{}", shown(&out));
    let list = capstan_in(dir, &["state", "list", "--state", ".capstan-nix"]);
    let listed = String::from_utf8_lossy(&list.stdout);
    assert!(listed.contains("web") && !listed.contains("db"), "{listed}");
}
