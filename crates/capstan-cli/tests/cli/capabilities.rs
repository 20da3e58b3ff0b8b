//! Capabilities stay where they are handed: a provider gets only the handles the deployment
//! passes it with `$cap` (other resources' handles, even of its own process, are out of its
//! reach), and a handle it keeps past its run is dead in the next one. Real provider processes,
//! one of them a standing service that outlives the runs. (A handle handed back to the very
//! provider that made it is that provider's own object, not the core's to take away.)

use std::path::Path;
use std::process::{Command, Output, Stdio};

use crate::support::{events, testing_provider};
use serde_json::{json, Value};

/// The service, stopped however the test ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn capstan(dir: &Path, args: &[&str]) -> Output {
    crate::support::capstan_in(dir, args)
}

fn outputs(events: &[Value], address: &str) -> Value {
    events
        .iter()
        .find(|e| e["type"] == "resource_complete" && e["address"] == address)
        .unwrap_or_else(|| panic!("{address} was not made"))["outputs"]
        .clone()
}

#[test]
fn a_provider_reaches_only_the_handles_it_is_handed_and_only_in_their_run() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    // A standing service: the same process serves both runs, so it could keep a handle.
    let socket = dir.join("run/testing.sock");
    let service = Command::new(testing_provider())
        .env("CAPSTAN_PROVIDER_LISTEN", &socket)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _service = KillOnDrop(service);
    crate::support::wait_until("the service listens", || socket.exists());
    let deployment = |resources: Value| {
        json!({
            "providers": {
                "s": {"socket": socket},
                "other": {"executable": testing_provider()}
            },
            "resources": resources
        })
    };
    std::fs::write(
        dir.join("capstan.json"),
        deployment(json!({
            // The handle is made by one provider process (started for the run) …
            "h": {"provider": "other", "type": "handle", "inputs": {"value": "the vault"}},
            // … the same process, nothing handed: nothing in reach.
            "blind": {"provider": "other", "type": "noop", "inputs": {"value": 1}},
            // Handed `h`'s handle: it can use it.
            "given": {"provider": "s", "type": "noop", "inputs": {"vault": {"$cap": "h#handle"}}},
            // The standing service, likewise.
            "other_blind": {"provider": "s", "type": "noop", "inputs": {"value": 1}},
            "other_given": {"provider": "s", "type": "noop", "inputs": {"vault": {"$cap": "h#handle"}}},
            // Keeps the handle past its operation, and uses it in the same run: it works.
            "keep": {"provider": "s", "type": "stash", "inputs": {"vault": {"$cap": "h#handle"}}},
            "use_now": {"provider": "s", "type": "usestash", "inputs": {"after": {"$ref": "keep#stashed"}}}
        }))
        .to_string(),
    )
    .unwrap();
    let first = capstan(dir, &["apply", "--json"]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let all = events(&first.stdout);
    for blind in ["blind", "other_blind"] {
        assert_eq!(
            outputs(&all, blind).get("handles"),
            None,
            "{blind} saw a handle"
        );
    }
    for given in ["given", "other_given"] {
        let handles = &outputs(&all, given)["handles"];
        assert_eq!(handles[0]["address"], "h", "{given}: {handles}");
        assert!(handles[0]["summary"]
            .as_str()
            .unwrap()
            .contains("the vault"));
    }
    let now = outputs(&all, "use_now");
    assert_eq!(now["reachable"], true, "{now}");

    // The next run: the service still holds the handle it kept (made by another provider,
    // handed through the core in the last run), and it is dead.
    std::fs::write(
        dir.join("capstan.json"),
        deployment(json!({
            "h": {"provider": "other", "type": "handle", "inputs": {"value": "the vault"}},
            "use_later": {"provider": "s", "type": "usestash", "inputs": {}}
        }))
        .to_string(),
    )
    .unwrap();
    let second = capstan(dir, &["apply", "--json"]);
    assert!(
        second.status.success(),
        "{}{}",
        String::from_utf8_lossy(&second.stdout),
        String::from_utf8_lossy(&second.stderr)
    );
    let later = outputs(&events(&second.stdout), "use_later");
    assert_eq!(
        later["reachable"], false,
        "a handle outlived its run: {later}"
    );
    assert_ne!(later["detail"], "nothing stashed", "{later}");
}
