//! Commands that only read the state never wait for, or take, the lock an apply holds; those
//! that write say who holds it, and since when, readably.

use std::os::fd::AsRawFd;
use std::process::Command;

use crate::support::capstan_bin;

#[test]
fn reading_commands_work_while_another_holds_the_lock_and_writers_name_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("capstan.json"),
        r#"{"providers": {"local": {"builtin": "local"}}, "resources": {
            "m": {"provider": "local", "type": "memo", "inputs": {"value": 1}}}}"#,
    )
    .unwrap();
    let capstan = |args: &[&str]| {
        Command::new(capstan_bin())
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    assert!(capstan(&["apply"]).status.success());
    // Hold the lock as a running apply would, with its holder description.
    let lock = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.path().join(".capstan/lock"))
        .unwrap();
    std::fs::write(
        dir.path().join(".capstan/lock"),
        r#"{"pid": 4242, "host": "h", "user": "u", "command": "capstan apply", "since": 1795963487}"#,
    )
    .unwrap();
    // SAFETY: flock on a descriptor we own.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);

    for args in [
        &["state", "list"][..],
        &["state", "show", "m"],
        &["state", "pending"],
        &["plan"],
    ] {
        let out = capstan(args);
        assert!(
            out.status.success(),
            "`{}` while locked: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = capstan(&["apply"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "locked by pid 4242 on h (user u, `capstan apply`, since 2026-11-29T14:44:47Z)"
        ),
        "{stderr}"
    );
    let out = capstan(&["state", "forget", "m", "--lock-timeout", "0.2"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("waiting for the state lock, held by pid 4242"),
        "{stderr}"
    );
    assert_eq!(out.status.code(), Some(2), "{stderr}");
}

#[test]
fn operations_of_a_running_apply_are_in_flight_not_interrupted() {
    // Issue 20: plan and state pending called the running apply's operation "interrupted in
    // an earlier run" and advised resolving it.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("capstan.json"),
        serde_json::json!({
            "providers": {"t": {"executable": crate::support::testing_provider()}},
            "resources": {"stuck": {"provider": "t", "type": "hang", "inputs": {}}}
        })
        .to_string(),
    )
    .unwrap();
    let capstan = |args: &[&str]| {
        Command::new(capstan_bin())
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let mut apply = Command::new(capstan_bin())
        .arg("apply")
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    crate::support::wait_until("the apply's operation is recorded as started", || {
        String::from_utf8_lossy(&capstan(&["state", "pending"]).stdout).starts_with("stuck\t")
    });
    let pending = capstan(&["state", "pending"]);
    let said = String::from_utf8_lossy(&pending.stderr);
    assert!(said.contains("may be in flight"), "{said}");
    let plan = capstan(&["plan"]);
    let said = String::from_utf8_lossy(&plan.stderr);
    assert!(said.contains("in flight"), "{said}");
    assert!(!said.contains("interrupted in an earlier run"), "{said}");
    assert!(!said.contains("state resolve"), "{said}");
    // SAFETY: signals the child we started.
    unsafe { libc::kill(apply.id() as i32, libc::SIGINT) };
    let _ = apply.wait();
    // Once it is gone, what it left pending is what an earlier run left.
    let plan = capstan(&["plan"]);
    let said = String::from_utf8_lossy(&plan.stderr);
    assert!(!said.contains("in flight"), "{said}");
}

/// A deployment that says where its state is (`"state": DIR`, relative to the deployment)
/// has it kept there, and every command finds it there; nothing is made at the default place.
#[test]
fn a_state_directory_the_deployment_declares_is_used_by_every_command() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("deploy")).unwrap();
    std::fs::write(
        dir.path().join("deploy/capstan.json"),
        r#"{"state": "../kept", "providers": {"local": {"builtin": "local"}}, "resources": {
            "m": {"provider": "local", "type": "memo", "inputs": {"value": 1}}}}"#,
    )
    .unwrap();
    let capstan = |args: &[&str]| crate::support::capstan_in(dir.path(), args);
    let apply = capstan(&["apply", "-f", "deploy/capstan.json"]);
    assert!(apply.status.success(), "{}", crate::support::shown(&apply));
    assert!(
        dir.path().join("kept/journal").exists(),
        "the state is where it says"
    );
    assert!(!dir.path().join("deploy/.capstan").exists());
    assert!(!dir.path().join(".capstan").exists());
    let list = capstan(&["state", "list", "-f", "deploy/capstan.json"]);
    assert_eq!(
        String::from_utf8_lossy(&list.stdout).trim(),
        "m\tlocal.memo"
    );
    let plan = capstan(&["plan", "-f", "deploy/capstan.json", "--detailed-exitcode"]);
    assert_eq!(
        plan.status.code(),
        Some(0),
        "{}",
        crate::support::shown(&plan)
    );
}

/// A path that is not UTF-8 cannot be recorded as text: refused, before anything is written,
/// rather than recorded lossily (a file resource's path would then name another file).
#[test]
fn a_deployment_or_state_under_a_path_that_is_not_utf8_is_refused() {
    use std::os::unix::ffi::OsStrExt;
    let tmp = tempfile::tempdir().unwrap();
    let odd = tmp.path().join(std::ffi::OsStr::from_bytes(b"deploy-\xff"));
    std::fs::create_dir(&odd).unwrap();
    let deployment = r#"{"providers": {"l": {"builtin": "local"}}, "resources": {"f": {"provider": "l", "type": "file", "inputs": {"path": "out/f.txt", "content": "x"}}}}"#;
    std::fs::write(odd.join("capstan.json"), deployment).unwrap();
    for args in [&["apply"][..], &["plan"]] {
        let out = Command::new(capstan_bin())
            .args(args)
            .current_dir(&odd)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(said.contains("not valid UTF-8"), "{args:?}: {said}");
    }
    assert!(!odd.join(".capstan").exists() && !odd.join("out").exists());
    // Reading a state needs no path of the deployment's: allowed (there is none here).
    let out = Command::new(capstan_bin())
        .args(["state", "list"])
        .current_dir(&odd)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A state directory reached through a link whose target is such a path.
    let fine = tmp.path().join("fine");
    std::fs::create_dir(&fine).unwrap();
    std::fs::write(fine.join("capstan.json"), deployment).unwrap();
    let state = odd.join("state");
    std::fs::create_dir(&state).unwrap();
    std::os::unix::fs::symlink(&state, tmp.path().join("link")).unwrap();
    let out = Command::new(capstan_bin())
        .args(["apply", "--state"])
        .arg(tmp.path().join("link"))
        .current_dir(&fine)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("not valid UTF-8"), "{said}");
    assert!(!state.join("location").exists() && !fine.join("out").exists());
}
