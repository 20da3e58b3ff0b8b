//! A team's state in a real PostgreSQL (Debian's `postgresql`, a cluster per test): two clones
//! of one deployment share it, the lock names its holder and dies with it, looks write nothing,
//! history and `--at`, push and pull, a password shown nowhere, the server restarted mid-apply.

use std::path::Path;
use std::process::{Command, Stdio};

use capstan_test_support::postgres::{self as pg, Postgres};
use serde_json::json;

use crate::support::{capstan_bin, shown, testing_provider, wait_until};

fn server(password: Option<&str>) -> Option<Postgres> {
    if let Some(why) = pg::unavailable() {
        capstan_test_support::skip_or_fail(&why);
        return None;
    }
    let pg = Postgres::start_with(password);
    pg.create_database("team");
    Some(pg)
}

fn state_url(pg: &Postgres, name: &str) -> String {
    format!("{}&deployment={name}", pg.url("team"))
}

/// `capstan ARGS` in `dir` with the state in `url`.
fn capstan(dir: &Path, url: &str, args: &[&str]) -> std::process::Output {
    Command::new(capstan_bin())
        .args(args)
        .current_dir(dir)
        .env("CAPSTAN_STATE", url)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn count(pg: &Postgres, table: &str) -> String {
    pg.psql("team", &format!("SELECT count(*) FROM capstan.{table}"))
        .trim()
        .to_string()
}

/// A deployment of `faulty` markers in `dir` (the testing provider's resource type).
fn deployment(dir: &Path, markers: &Path, faults: &[(&str, &str)]) {
    let resources: serde_json::Map<String, serde_json::Value> = faults
        .iter()
        .map(|(name, fault)| {
            (
                name.to_string(),
                json!({"provider": "t", "type": "faulty",
                       "inputs": {"dir": markers, "name": name, "fault": fault}}),
            )
        })
        .collect();
    std::fs::write(
        dir.join("capstan.json"),
        json!({"providers": {"t": {"executable": testing_provider()}}, "resources": resources})
            .to_string(),
    )
    .unwrap();
}

#[test]
fn two_clones_share_one_state_and_a_killed_holder_frees_the_lock_at_once() {
    let Some(pg) = server(None) else { return };
    let url = state_url(&pg, "web");
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let markers = tempfile::tempdir().unwrap();
    deployment(
        a.path(),
        markers.path(),
        &[("one", "none"), ("two", "hang")],
    );
    deployment(
        b.path(),
        markers.path(),
        &[("one", "none"), ("two", "hang")],
    );

    let mut first = Command::new(capstan_bin())
        .arg("apply")
        .current_dir(a.path())
        .env("CAPSTAN_STATE", &url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the first clone's apply sent `two`", || {
        let out = capstan(b.path(), &url, &["state", "pending"]);
        String::from_utf8_lossy(&out.stdout).starts_with("two\t")
    });
    // The other clone sees what the first recorded, plans without waiting, and is refused
    // when it would write, told who holds the state.
    let out = capstan(b.path(), &url, &["state", "list"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "one\tt.faulty\n");
    let out = capstan(b.path(), &url, &["plan"]);
    assert!(out.status.success(), "{}", shown(&out));
    assert!(shown(&out).contains("in flight"), "{}", shown(&out));
    let out = capstan(b.path(), &url, &["apply"]);
    let said = shown(&out);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(
        said.contains(&format!("locked by pid {}", first.id())) && said.contains("capstan apply"),
        "{said}"
    );
    assert!(said.contains("database user capstan"), "{said}");

    // Killed with -9: its connection ends, and the lock with it.
    first.kill().unwrap();
    first.wait().unwrap();
    deployment(
        b.path(),
        markers.path(),
        &[("one", "none"), ("two", "none")],
    );
    let mut converged = None;
    // (The server notices the closed connection as soon as the kernel tells it.)
    wait_until("the killed holder's lock is gone", || {
        let out = capstan(b.path(), &url, &["apply"]);
        let locked = shown(&out).contains("locked by");
        if !locked {
            converged = Some(out);
        }
        !locked
    });
    let out = converged.unwrap();
    assert!(out.status.success(), "{}", shown(&out));
    // The first clone, brought up to date, finds nothing to do.
    deployment(
        a.path(),
        markers.path(),
        &[("one", "none"), ("two", "none")],
    );
    let out = capstan(a.path(), &url, &["plan", "--detailed-exitcode"]);
    assert_eq!(out.status.code(), Some(0), "{}", shown(&out));
    let out = capstan(a.path(), &url, &["state", "history"]);
    let history = String::from_utf8_lossy(&out.stdout);
    assert_eq!(history.lines().count(), 2, "{history}");
    assert!(
        history.lines().all(|l| l.contains("capstan apply")),
        "{history}"
    );
    assert!(
        history.lines().nth(1).unwrap().contains("1 create"),
        "{history}"
    );
}

#[test]
fn looking_writes_nothing_not_even_the_tables() {
    let Some(pg) = server(None) else { return };
    let url = state_url(&pg, "web");
    let dir = tempfile::tempdir().unwrap();
    let markers = tempfile::tempdir().unwrap();
    deployment(dir.path(), markers.path(), &[("one", "none")]);
    let looks: [&[&str]; 5] = [
        &["plan"],
        &["state", "list"],
        &["state", "pending"],
        &["state", "history"],
        &["plan", "--json"],
    ];
    for args in looks {
        let out = capstan(dir.path(), &url, args);
        assert!(out.status.success(), "{args:?}: {}", shown(&out));
    }
    let schemas = pg.psql(
        "team",
        "SELECT count(*) FROM pg_namespace WHERE nspname = 'capstan'",
    );
    assert_eq!(schemas.trim(), "0", "a look made Capstan's tables");
    assert!(capstan(dir.path(), &url, &["apply"]).status.success());
    // (pg_dump's `\restrict` lines carry a new random key each time.)
    let dump = || {
        pg.dump("team")
            .lines()
            .filter(|l| !l.contains("restrict "))
            .map(|l| format!("{l}\n"))
            .collect::<String>()
    };
    let before = dump();
    for args in looks {
        let out = capstan(dir.path(), &url, args);
        assert!(out.status.success(), "{args:?}: {}", shown(&out));
    }
    let out = capstan(dir.path(), &url, &["state", "show", "one"]);
    assert!(out.status.success(), "{}", shown(&out));
    assert!(dump() == before, "a look wrote to the database");
    assert!(!dir.path().join(".capstan").exists());
}

#[test]
fn the_password_is_shown_nowhere() {
    let password = "correct-horse-battery";
    let Some(pg) = server(Some(password)) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let markers = tempfile::tempdir().unwrap();
    deployment(dir.path(), markers.path(), &[("one", "none")]);
    let with = |pw: &str| state_url(&pg, "web").replacen("capstan@", &format!("capstan:{pw}@"), 1);
    // Wrong: refused, saying so, without the password, nothing written.
    let out = capstan(dir.path(), &with("wrong-staple"), &["apply", "--json"]);
    let said = shown(&out);
    assert_ne!(out.status.code(), Some(0), "{said}");
    assert!(said.contains("password authentication failed"), "{said}");
    assert!(!said.contains("wrong-staple"), "{said}");
    // Right, in the URL on the command line too: the password is not in what capstan says,
    // nor in the run it records.
    for args in [
        &["apply", "--json"][..],
        &["apply"],
        &["plan"],
        &["state", "history", "--json"],
    ] {
        let mut full = args.to_vec();
        let url = with(password);
        full.extend(["--state", &url]);
        let out = capstan(dir.path(), &url, &full);
        let said = shown(&out);
        assert!(out.status.success(), "{args:?}: {said}");
        assert!(!said.contains(password), "{args:?}: {said}");
    }
    // The password from PGPASSWORD, as libpq takes it.
    let out = Command::new(capstan_bin())
        .args(["state", "list"])
        .current_dir(dir.path())
        .env("CAPSTAN_STATE", state_url(&pg, "web"))
        .env("PGPASSWORD", password)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "one\tt.faulty\n");
    let dump = pg.dump("team");
    assert!(dump.contains("capstan apply"), "the runs are recorded");
    assert!(!dump.contains(password));
}

#[test]
fn history_push_and_pull_and_a_newer_state_is_not_overwritten() {
    let Some(pg) = server(None) else { return };
    let url = state_url(&pg, "web");
    let dir = tempfile::tempdir().unwrap();
    let markers = tempfile::tempdir().unwrap();
    let local = dir.path().join(".capstan");
    let local = local.to_str().unwrap();
    let run = |args: &[&str]| {
        Command::new(capstan_bin())
            .args(args)
            .current_dir(dir.path())
            .env_remove("CAPSTAN_STATE")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    deployment(dir.path(), markers.path(), &[("one", "none")]);
    assert!(run(&["apply"]).status.success());
    // A directory's state goes to the database.
    let out = run(&["state", "push", "--to", &url]);
    assert!(out.status.success(), "{}", shown(&out));
    assert_eq!(
        String::from_utf8_lossy(&capstan(dir.path(), &url, &["state", "list"]).stdout),
        "one\tt.faulty\n"
    );
    // The team goes on in the database.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    deployment(
        dir.path(),
        markers.path(),
        &[("one", "none"), ("two", "none")],
    );
    assert!(capstan(dir.path(), &url, &["apply"]).status.success());
    let out = capstan(dir.path(), &url, &["state", "history", "--json"]);
    let runs: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert!(runs[0]["command"].as_str().unwrap().contains("state push"));
    let pushed = runs[0]["run"].to_string();
    let out = capstan(dir.path(), &url, &["state", "show", "two", "--at", &pushed]);
    assert_eq!(out.status.code(), Some(2), "{}", shown(&out));
    let out = capstan(dir.path(), &url, &["state", "show", "one", "--at", &pushed]);
    assert!(out.status.success(), "{}", shown(&out));
    // The old directory is older: pushing it would lose `two`.
    let out = run(&["state", "push", "--to", &url]);
    let said = shown(&out);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(said.contains("newer") && said.contains("--force"), "{said}");
    assert_eq!(
        String::from_utf8_lossy(&capstan(dir.path(), &url, &["state", "list"]).stdout)
            .lines()
            .count(),
        2
    );
    // Pulling brings it back.
    let out = run(&["state", "pull", "--from", &url]);
    assert!(out.status.success(), "{}", shown(&out));
    let out = run(&["state", "list"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "one\tt.faulty\ntwo\tt.faulty\n"
    );
    let out = run(&["plan", "--detailed-exitcode"]);
    assert_eq!(out.status.code(), Some(0), "{}", shown(&out));
    // A directory keeps no history, and says where to find one.
    let out = run(&["state", "history", "--state", local]);
    assert_eq!(out.status.code(), Some(2));
    assert!(shown(&out).contains("PostgreSQL"), "{}", shown(&out));
}

#[test]
fn the_server_restarted_mid_apply_stops_the_run_and_the_next_converges() {
    let Some(mut pg) = server(None) else { return };
    fault_mid_apply(&mut pg, |pg| {
        pg.stop_immediately();
        pg.start_again();
    });
}

#[test]
fn connections_cut_mid_apply_stop_the_run_and_the_next_converges() {
    let Some(mut pg) = server(None) else { return };
    fault_mid_apply(&mut pg, |pg| {
        pg.psql(
            "postgres",
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'capstan'",
        );
    });
}

/// An apply of 60 slow resources, `fault` once a few are made: the run stops (exit 1, saying
/// the state failed), nothing made is unknown to the state, the next apply converges.
fn fault_mid_apply(pg: &mut Postgres, fault: impl FnOnce(&mut Postgres)) {
    let url = state_url(pg, "web");
    let dir = tempfile::tempdir().unwrap();
    let markers = tempfile::tempdir().unwrap();
    let names: Vec<String> = (0..60).map(|i| format!("r{i}")).collect();
    let faults: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "slow")).collect();
    deployment(dir.path(), markers.path(), &faults);
    let child = Command::new(capstan_bin())
        .args(["apply", "--jobs", "2"])
        .current_dir(dir.path())
        .env("CAPSTAN_STATE", &url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("some operations are recorded", || {
        std::fs::read_dir(markers.path()).unwrap().count() >= 4
    });
    fault(pg);
    let out = crate::support::output_within(child, "the apply whose database failed");
    let said = shown(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("state"), "{said}");
    // Nothing recorded is lost: every marker made is recorded or pending.
    let listed = capstan(dir.path(), &url, &["state", "list"]);
    let pending = capstan(dir.path(), &url, &["state", "pending"]);
    let known = format!(
        "{}{}",
        String::from_utf8_lossy(&listed.stdout),
        String::from_utf8_lossy(&pending.stdout)
    );
    for made in std::fs::read_dir(markers.path()).unwrap() {
        let name = made.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            known.lines().any(|l| l.starts_with(&format!("{name}\t"))),
            "{name} was made but is neither recorded nor pending:\n{known}"
        );
    }
    let out = capstan(dir.path(), &url, &["apply", "--jobs", "8"]);
    assert!(out.status.success(), "{}", shown(&out));
    let out = capstan(dir.path(), &url, &["plan", "--detailed-exitcode"]);
    assert_eq!(out.status.code(), Some(0), "{}", shown(&out));
    let done: usize = count(pg, "records WHERE kind = 'done'").parse().unwrap();
    assert!(done >= 60, "{done} results recorded");
}

#[test]
fn a_deployment_can_say_where_its_state_is() {
    let Some(pg) = server(None) else { return };
    let url = state_url(&pg, "declared");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("capstan.json"),
        json!({"state": url, "providers": {"local": {"builtin": "local"}},
               "resources": {"m": {"provider": "local", "type": "memo", "inputs": {"value": 1}}}})
        .to_string(),
    )
    .unwrap();
    let run = |args: &[&str]| {
        Command::new(capstan_bin())
            .args(args)
            .current_dir(dir.path())
            .env_remove("CAPSTAN_STATE")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = run(&["apply"]);
    assert!(out.status.success(), "{}", shown(&out));
    assert!(!dir.path().join(".capstan").exists());
    assert_eq!(count(&pg, "records"), "2");
    let out = run(&["state", "list"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "m\tlocal.memo\n");
    // --state comes first.
    let out = run(&["state", "list", "--state", "elsewhere"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "");
}
