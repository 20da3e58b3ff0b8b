//! Secrets encrypted before they are written (age): in a state directory with a key given, in
//! PostgreSQL always. The secret is grepped for in every file and in the database dump.

use std::path::Path;
use std::process::{Command, Stdio};

use age::secrecy::ExposeSecret;
use capstan_test_support::postgres::{self as pg, Postgres};

use crate::support::{capstan_bin, shown};

const SECRET: &str = "hunter2-do-not-leak";

/// An age identity file (0600) and its path.
fn identity(dir: &Path, name: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let identity = age::x25519::Identity::generate();
    let path = dir.join(name);
    std::fs::write(&path, format!("{}\n", identity.to_string().expose_secret())).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path.display().to_string()
}

fn deployment(dir: &Path) {
    std::fs::write(
        dir.join("capstan.json"),
        r#"{"providers": {"local": {"builtin": "local"}}, "resources": {
            "db": {"provider": "local", "type": "memo", "inputs": {"value": {"$param": "password"}}},
            "web": {"provider": "local", "type": "memo", "inputs": {"value": "public"}}}}"#,
    )
    .unwrap();
    std::fs::write(dir.join("s.json"), format!(r#"{{"password": "{SECRET}"}}"#)).unwrap();
}

fn capstan(dir: &Path, env: &[(&str, &str)], args: &[&str]) -> std::process::Output {
    let mut command = Command::new(capstan_bin());
    command
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .env_remove("CAPSTAN_STATE_IDENTITY")
        .env_remove("CAPSTAN_STATE_PASSPHRASE")
        .env_remove("CAPSTAN_STATE");
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().unwrap()
}

/// Every file under `dir`, searched for `needle`.
fn files_holding(dir: &Path, needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(files_holding(&path, needle));
        } else if std::fs::read(&path)
            .unwrap_or_default()
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
        {
            found.push(path.display().to_string());
        }
    }
    found
}

#[test]
fn a_state_directory_with_a_key_holds_no_secret_and_needs_the_key_only_where_it_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let keys = tempfile::tempdir().unwrap();
    deployment(dir.path());
    let alice = identity(keys.path(), "alice");
    let with_key = [("CAPSTAN_STATE_IDENTITY", alice.as_str())];
    let out = capstan(dir.path(), &with_key, &["apply", "--secrets", "s.json"]);
    assert!(out.status.success(), "{}", shown(&out));
    let state = dir.path().join(".capstan");
    assert!(state.join("keys").exists());
    assert_eq!(files_holding(&state, SECRET), Vec::<String>::new());
    // Compacted into a snapshot too: still none.
    let out = capstan(dir.path(), &with_key, &["state", "forget", "web"]);
    assert!(out.status.success(), "{}", shown(&out));
    assert_eq!(files_holding(&state, SECRET), Vec::<String>::new());
    let out = capstan(dir.path(), &with_key, &["apply", "--secrets", "s.json"]);
    assert!(out.status.success(), "{}", shown(&out));
    assert_eq!(files_holding(&state, SECRET), Vec::<String>::new());

    // With the key: the secret is there for whoever asks for it, and the plan is a no-op.
    let out = capstan(
        dir.path(),
        &with_key,
        &["state", "show", "db", "--show-sensitive"],
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(SECRET),
        "{}",
        shown(&out)
    );
    let out = capstan(
        dir.path(),
        &with_key,
        &["plan", "--secrets", "s.json", "--detailed-exitcode"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", shown(&out));

    // Without it: listed, shown (redacted), planned where no secret is needed; refused,
    // saying which key, where one is.
    let out = capstan(dir.path(), &[], &["state", "list"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "db\tlocal.memo\nweb\tlocal.memo\n"
    );
    let out = capstan(dir.path(), &[], &["state", "show", "db"]);
    assert!(out.status.success(), "{}", shown(&out));
    let out = capstan(dir.path(), &[], &["plan", "--secrets", "s.json"]);
    let said = shown(&out);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(
        said.contains("`db`") && said.contains("CAPSTAN_STATE_IDENTITY"),
        "{said}"
    );
    let out = capstan(
        dir.path(),
        &[],
        &[
            "plan",
            "--secrets",
            "s.json",
            "--target",
            "web",
            "--detailed-exitcode",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", shown(&out));
    // A key that is not this state's.
    let eve = identity(keys.path(), "eve");
    let out = capstan(
        dir.path(),
        &[("CAPSTAN_STATE_IDENTITY", eve.as_str())],
        &["state", "list"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", shown(&out));
    assert!(shown(&out).contains("does not open"), "{}", shown(&out));

    // Rekey to Bob: Bob's key opens it, Alice's no longer does, and still no secret in clear.
    let bob = identity(keys.path(), "bob");
    let out = capstan(
        dir.path(),
        &[
            ("CAPSTAN_STATE_IDENTITY", alice.as_str()),
            ("CAPSTAN_STATE_NEW_IDENTITY", bob.as_str()),
        ],
        &["state", "rekey"],
    );
    assert!(out.status.success(), "{}", shown(&out));
    let out = capstan(
        dir.path(),
        &[("CAPSTAN_STATE_IDENTITY", bob.as_str())],
        &["plan", "--secrets", "s.json", "--detailed-exitcode"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", shown(&out));
    let out = capstan(dir.path(), &with_key, &["plan", "--secrets", "s.json"]);
    assert!(shown(&out).contains("does not open"), "{}", shown(&out));
    assert_eq!(files_holding(&state, SECRET), Vec::<String>::new());
    // Without a key, a new secret is not written in clear into a state whose secrets are
    // encrypted.
    std::fs::write(
        dir.path().join("s.json"),
        r#"{"password": "another-secret-value"}"#,
    )
    .unwrap();
    let out = capstan(
        dir.path(),
        &[],
        &["apply", "--secrets", "s.json", "--target", "web"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", shown(&out));
    assert!(
        shown(&out).contains("never holds a secret in clear"),
        "{}",
        shown(&out)
    );
    assert_eq!(
        files_holding(&state, "another-secret-value"),
        Vec::<String>::new()
    );
}

#[test]
fn postgres_never_holds_a_secret_in_clear() {
    if let Some(why) = pg::unavailable() {
        capstan_test_support::skip_or_fail(&why);
        return;
    }
    let server = Postgres::start();
    server.create_database("team");
    let url = format!("{}&deployment=web", server.url("team"));
    let dir = tempfile::tempdir().unwrap();
    deployment(dir.path());
    let state = [("CAPSTAN_STATE", url.as_str())];
    // No key: refused before any operation, naming why and what to set.
    let out = capstan(dir.path(), &state, &["apply", "--secrets", "s.json"]);
    let said = shown(&out);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(said.contains("never holds a secret in clear"), "{said}");
    assert!(said.contains("CAPSTAN_STATE_IDENTITY"), "{said}");
    assert_eq!(
        server
            .psql("team", "SELECT count(*) FROM capstan.records")
            .trim(),
        "0"
    );
    // A passphrase (a team's shared one, from the environment).
    let with_key = [
        ("CAPSTAN_STATE", url.as_str()),
        ("CAPSTAN_STATE_PASSPHRASE", "a long team passphrase"),
    ];
    let out = capstan(dir.path(), &with_key, &["apply", "--secrets", "s.json"]);
    assert!(out.status.success(), "{}", shown(&out));
    assert!(!server.dump("team").contains(SECRET));
    let out = capstan(
        dir.path(),
        &with_key,
        &["plan", "--secrets", "s.json", "--detailed-exitcode"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", shown(&out));
    // Pulled into a directory: sealed there too.
    let local = dir.path().join("local-state");
    let out = capstan(
        dir.path(),
        &[("CAPSTAN_STATE_PASSPHRASE", "a long team passphrase")],
        &[
            "state",
            "pull",
            "--from",
            &url,
            "--state",
            local.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", shown(&out));
    assert_eq!(files_holding(&local, SECRET), Vec::<String>::new());
    assert!(local.join("keys").exists());
}

#[test]
fn a_type_that_marks_outputs_sensitive_is_stopped_before_it_runs_without_a_key() {
    if let Some(why) = pg::unavailable() {
        capstan_test_support::skip_or_fail(&why);
        return;
    }
    let server = Postgres::start();
    server.create_database("team");
    let url = format!("{}&deployment=tokens", server.url("team"));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("capstan.json"),
        serde_json::json!({
            "providers": {"t": {"executable": crate::support::testing_provider()}},
            "resources": {"token": {"provider": "t", "type": "secret", "inputs": {}}}
        })
        .to_string(),
    )
    .unwrap();
    let out = capstan(dir.path(), &[("CAPSTAN_STATE", url.as_str())], &["apply"]);
    let said = shown(&out);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(
        said.contains("`token` (t.secret)") && said.contains("Nothing was changed"),
        "{said}"
    );
    assert_eq!(
        server
            .psql("team", "SELECT count(*) FROM capstan.records")
            .trim(),
        "0"
    );
    let out = capstan(
        dir.path(),
        &[
            ("CAPSTAN_STATE", url.as_str()),
            ("CAPSTAN_STATE_PASSPHRASE", "team passphrase"),
        ],
        &["apply"],
    );
    assert!(out.status.success(), "{}", shown(&out));
    let token = server.psql(
        "team",
        "SELECT record FROM capstan.records WHERE kind = 'done'",
    );
    assert!(token.contains("$encrypted"), "{token}");
}

#[test]
fn the_state_key_never_reaches_what_capstan_starts() {
    let dir = tempfile::tempdir().unwrap();
    let passphrase = "a passphrase only capstan may hold";
    let with_key = [("CAPSTAN_STATE_PASSPHRASE", passphrase)];
    // A command the local provider runs: what a provider (and what it starts) inherits.
    std::fs::write(
        dir.path().join("capstan.json"),
        r#"{"providers": {"local": {"builtin": "local"}}, "resources": {
            "env": {"provider": "local", "type": "exec", "inputs": {"command": "env"}}}}"#,
    )
    .unwrap();
    let out = capstan(dir.path(), &with_key, &["apply"]);
    assert!(out.status.success(), "{}", shown(&out));
    let out = capstan(dir.path(), &with_key, &["state", "show", "env"]);
    assert!(out.status.success(), "{}", shown(&out));
    let seen = String::from_utf8_lossy(&out.stdout);
    assert!(seen.contains("PATH="), "{seen}");
    assert!(!seen.contains("CAPSTAN_STATE_PASSPHRASE"), "{seen}");
    assert!(!seen.contains(passphrase), "{seen}");
    // Nix evaluating a deployment: `builtins.getEnv` finds nothing.
    if !crate::support::nix_tool("nix-instantiate", "the state key and Nix") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("capstan.nix"),
        r#"{ capstan, ... }: {
  providers.local = capstan.builtin "local";
  resources.env = { provider = "local"; type = "memo"; inputs.value = builtins.getEnv "CAPSTAN_STATE_PASSPHRASE"; };
}"#,
    )
    .unwrap();
    let out = capstan(dir.path(), &with_key, &["apply"]);
    assert!(out.status.success(), "{}", shown(&out));
    let out = capstan(dir.path(), &with_key, &["state", "show", "env"]);
    let recorded: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(recorded["outputs"]["value"], "", "{recorded}");
}
