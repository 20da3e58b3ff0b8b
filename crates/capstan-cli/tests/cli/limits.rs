//! Messages over the size limit: a result too large for the core, an input too large for the
//! provider. Each says what happened and how to raise the limit, and the state says whether
//! the provider may have acted.

use std::process::{Command, Output};

use crate::support::capstan_bin;
use serde_json::json;

fn apply(dir: &std::path::Path, deployment: serde_json::Value, extra: &[&str]) -> Output {
    std::fs::write(dir.join("capstan.json"), deployment.to_string()).unwrap();
    Command::new(capstan_bin())
        .arg("apply")
        .args(extra)
        .current_dir(dir)
        .output()
        .unwrap()
}

fn pending(dir: &std::path::Path) -> String {
    let out = Command::new(capstan_bin())
        .args(["state", "pending"])
        .current_dir(dir)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_result_over_the_limit_is_named_stays_pending_and_a_larger_limit_takes_it() {
    let dir = tempfile::tempdir().unwrap();
    let big = json!({"providers": {"local": {"builtin": "local"}}, "resources": {
        "big": {"provider": "local", "type": "exec",
                "inputs": {"command": "sh", "args": ["-c", "head -c 20000000 /dev/zero | tr '\\0' a"]}}
    }});
    let out = apply(dir.path(), big.clone(), &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr
            .contains("a message from provider `local` was 20.0 MB, over the 16 MiB message limit"),
        "{stderr}"
    );
    assert!(stderr.contains("--max-message-mib"), "{stderr}");
    assert!(
        pending(dir.path()).starts_with("big\tcreate"),
        "the command ran: whether it took effect is unknown"
    );
    let out = apply(dir.path(), big, &["--max-message-mib", "64"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(pending(dir.path()), "");
}

#[test]
fn an_input_over_the_limit_is_never_sent_and_a_provider_may_raise_its_limit() {
    let dir = tempfile::tempdir().unwrap();
    let value = "v".repeat(20_000_000);
    let deployment = |limit: Option<u32>| {
        let mut local = json!({"builtin": "local"});
        if let Some(limit) = limit {
            local["maxMessageMiB"] = json!(limit);
        }
        json!({"providers": {"local": local}, "resources": {
            "m": {"provider": "local", "type": "memo", "inputs": {"value": value}}
        }})
    };
    let out = apply(dir.path(), deployment(None), &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("m: the request is 20.0 MB, over the 16 MiB message limit of provider `local`, so it was not sent (nothing was done)"),
        "{stderr}"
    );
    assert_eq!(
        pending(dir.path()),
        "",
        "known not to have acted: not pending"
    );
    let out = apply(dir.path(), deployment(Some(64)), &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A large file resource crosses the connection as few times as it can: a delete or a
/// refresh sends its recorded inputs once (not again as `inputs`), so 20 MB of content fits
/// a 48 MiB limit on the way out as it did on the way in (three copies would not).
#[test]
fn a_large_resource_is_read_and_deleted_within_the_limit_it_was_made_in() {
    let dir = tempfile::tempdir().unwrap();
    // Each message may carry the content once, never twice: 30 MiB under a 32 MiB limit.
    let content = "x".repeat(30 * 1024 * 1024);
    let deployment = serde_json::json!({
        "providers": {"local": {"builtin": "local"}},
        "resources": {"big": {"provider": "local", "type": "file",
                              "inputs": {"path": "big.txt", "content": content}}}
    });
    let limit = ["--max-message-mib", "32"];
    let made = apply(dir.path(), deployment, &limit);
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let refreshed = Command::new(capstan_bin())
        .args(["apply", "--refresh"])
        .args(limit)
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        refreshed.status.success(),
        "{}",
        String::from_utf8_lossy(&refreshed.stderr)
    );
    let destroyed = Command::new(capstan_bin())
        .args(["destroy", "--yes"])
        .args(limit)
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        destroyed.status.success(),
        "{}",
        String::from_utf8_lossy(&destroyed.stderr)
    );
    assert!(!dir.path().join("big.txt").exists());
}
