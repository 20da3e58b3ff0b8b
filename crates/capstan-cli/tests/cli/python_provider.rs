//! A provider in another language: `providers/python/provider.py`, on pycapnp (PyPI), written
//! from the published schema alone, driven by `capstan apply`. The test makes its own
//! virtualenv.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::support::capstan_bin;
use serde_json::json;

use capstan_test_support::skip_or_fail;

/// A virtualenv with pycapnp, made once per target directory (and once per test process:
/// the tests here run in parallel, and two `venv`s into one directory fail).
fn python_with_pycapnp() -> Option<PathBuf> {
    static VENV: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    VENV.get_or_init(make_venv).clone()
}

fn make_venv() -> Option<PathBuf> {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("python-venv");
    let python = venv.join("bin/python");
    let ready = venv.join(".pycapnp-installed");
    if ready.exists() {
        return Some(python);
    }
    let made = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !made {
        skip_or_fail("python3 -m venv failed: install python3 and python3-venv");
        return None;
    }
    let installed = Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "pycapnp"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !installed {
        skip_or_fail("pip install pycapnp failed (PyPI unreachable?)");
        return None;
    }
    std::fs::write(&ready, "").unwrap();
    Some(python)
}

fn provider_script() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../providers/python/provider.py")
        .display()
        .to_string()
}

#[test]
fn capstan_applies_resources_of_a_python_provider_with_its_progress() {
    let Some(python) = python_with_pycapnp() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let long_name = "Ada Lovelace ".repeat(1000);
    let deployment = json!({
        "providers": {
            "py": {"executable": python.display().to_string(), "args": [provider_script()]},
            "local": {"builtin": "local"}
        },
        "resources": {
            "hello": {"provider": "py", "type": "greeting", "inputs": {"name": "Ada"}},
            "saved": {"provider": "local", "type": "file", "inputs": {"path": "greeting.txt", "content": {"$ref": "hello#text"}}},
            // Larger than a first segment: the message crosses to pycapnp in several.
            "long": {"provider": "py", "type": "greeting", "inputs": {"name": long_name}},
            "saved_long": {"provider": "local", "type": "file", "inputs": {"path": "long.txt", "content": {"$ref": "long#text"}}}
        }
    });
    std::fs::write(dir.path().join("capstan.json"), deployment.to_string()).unwrap();
    let out = Command::new(capstan_bin())
        .args(["apply", "--json"])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("greeting.txt")).unwrap(),
        "Hello, Ada!"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("long.txt")).unwrap(),
        format!("Hello, {long_name}!")
    );
    let events = crate::support::events(&out.stdout);
    let progress: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["type"] == "resource_progress" && e["address"] == "hello")
        .map(|e| &e["progress"])
        .collect();
    assert!(
        progress
            .iter()
            .any(|p| p["kind"] == "span_start" && p["name"] == "compose"),
        "{progress:?}"
    );
    assert!(
        progress
            .iter()
            .any(|p| p["kind"] == "log" && p["line"] == "word 2: Ada!"),
        "{progress:?}"
    );
    assert!(
        progress
            .iter()
            .any(|p| p["kind"] == "counter" && p["done"] == 2 && p["expected"] == 2),
        "{progress:?}"
    );
    // The provider's own stderr is attributed to it.
    assert!(
        events.iter().any(|e| e["type"] == "provider_log"
            && e["provider"] == "py"
            && e["line"].as_str().unwrap().contains("composed")),
        "{events:?}"
    );

    // Its handshake is checked like any other: an input it does not declare is refused.
    let bad = json!({
        "providers": {"py": {"executable": python.display().to_string(), "args": [provider_script()]}},
        "resources": {"hello": {"provider": "py", "type": "greeting", "inputs": {"nam": "Ada"}}}
    });
    let fresh = tempfile::tempdir().unwrap();
    std::fs::write(fresh.path().join("capstan.json"), bad.to_string()).unwrap();
    let out = Command::new(capstan_bin())
        .args(["plan"])
        .current_dir(fresh.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("`greeting` has no input `nam`; its inputs: name, shout"));
}

#[test]
fn a_python_provider_hands_children_and_permits_back_to_the_scheduler() {
    let Some(python) = python_with_pycapnp() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let deployment = json!({
        "providers": {"py": {"executable": python.display().to_string(), "args": [provider_script()]}},
        "resources": {"crew": {"provider": "py", "type": "team", "inputs": {"names": ["Ada", "Grace", "Linus"]}}}
    });
    std::fs::write(dir.path().join("capstan.json"), deployment.to_string()).unwrap();
    // One job: the team holds it (and a permit on top), its children borrow it in turn.
    let out = Command::new(capstan_bin())
        .args(["apply", "--json", "--jobs", "1"])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events = crate::support::events(&out.stdout);
    let crew = events
        .iter()
        .find(|e| e["type"] == "resource_complete" && e["address"] == "crew")
        .expect("crew completed");
    assert_eq!(
        crew["outputs"]["texts"],
        json!(["Hello, Ada!", "Hello, Grace!", "Hello, Linus!"])
    );
    for name in ["Ada", "Grace", "Linus"] {
        let address = format!("crew/{name}");
        assert!(
            events
                .iter()
                .any(|e| e["type"] == "resource_complete" && e["address"] == address.as_str()),
            "{address}: {events:?}"
        );
    }
    let state = Command::new(capstan_bin())
        .args(["state", "list", "--json"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&state.stdout);
    assert!(listed.contains("crew/Grace"), "{listed}");
}
