//! Secrets never leak: a password from `--params` marked `$sensitive`, and a token a provider
//! marks sensitive in its handshake (and then carelessly prints in its log, a tracing event,
//! its stderr and its error message), are planted; every output channel is searched for them,
//! and every file's mode is checked. A second user (made by the test, when it runs as root)
//! can neither read the state nor connect to a standing provider socket.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use crate::support::{capstan_bin, testing_provider};
use serde_json::{json, Value};

const PASSWORD: &str = "hunter2-correct-horse";
const SEED: &str = "seeded-secret-token";
const API_KEY: &str = "api-key-from-the-secrets-file";
const DB_PASSWORD: &str = "db-password-made-plain";
const KEY: &str =
    "-----BEGIN KEY-----\nline-one-of-the-key\nline-two-of-the-key\n-----END KEY-----\n";

/// Runs capstan with umask 000: the state must be private whatever the umask.
fn capstan(dir: &Path, args: &[&str]) -> Output {
    let mut command = Command::new(capstan_bin());
    command.args(args).current_dir(dir).stdin(Stdio::null());
    // SAFETY: umask only, between fork and exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    command.output().unwrap()
}

/// Everything a command showed.
fn shown(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn project() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let deployment = json!({
        "providers": {
            "local": {"builtin": "local"},
            "t": {"executable": testing_provider()}
        },
        "resources": {
            // The password, marked; the memo echoes it as its output.
            "login": {"provider": "local", "type": "memo",
                      "inputs": {"value": {"user": "admin", "password": {"$sensitive": {"$param": "pw"}}}}},
            // A command that prints it in its log and on its stderr.
            "echo": {"provider": "local", "type": "exec",
                     "inputs": {"command": "sh", "args": ["-c", "read p; echo \"the password is $p\"; echo \"also $p\" >&2"],
                                "stdin": {"$sensitive": {"$param": "pw"}}}},
            // A parameter from --secrets, used without any marker.
            "api": {"provider": "local", "type": "memo", "inputs": {"value": {"key": {"$param": "api_key"}}}},
            // A token its provider marks sensitive (made up by the provider).
            "tok": {"provider": "t", "type": "secret", "inputs": {}},
            // The token passed on by reference.
            "uses": {"provider": "local", "type": "memo", "inputs": {"value": {"$ref": "tok#token"}}},
            // An input the provider marks sensitive, and an error that prints it.
            "bad": {"provider": "t", "type": "secret", "inputs": {"seed": SEED, "fail": true}},
            // A token made up, printed, then never returned (the create fails): what it
            // printed is not shown at all.
            "lost": {"provider": "t", "type": "secret", "inputs": {"fail": true}},
            // A plain output, made sensitive by the deployment where it is used: hidden where
            // it is made too.
            "db": {"provider": "local", "type": "memo", "inputs": {"value": DB_PASSWORD}},
            "conn": {"provider": "local", "type": "memo",
                     "inputs": {"value": {"pw": {"$sensitive": {"$ref": "db#value"}}, "port": 5432}}},
            // A marked object with a number in it, and a secret of many lines.
            "mixed": {"provider": "local", "type": "exec",
                      "inputs": {"command": "sh", "args": ["-c", "cat"],
                                 "stdin": {"$sensitive": KEY}}},
            "numbers": {"provider": "local", "type": "memo",
                        "inputs": {"value": {"$sensitive": {"n": 1, "word": "numbers-secret-word"}}}},
            "says": {"provider": "local", "type": "exec",
                     "inputs": {"command": "sh", "args": ["-c", "echo the word is numbers-secret-word"]}}
        }
    });
    std::fs::write(
        dir.path().join("capstan.json"),
        serde_json::to_string_pretty(&deployment).unwrap(),
    )
    .unwrap();
    let params = dir.path().join("params.json");
    std::fs::write(&params, json!({"pw": PASSWORD}).to_string()).unwrap();
    std::fs::set_permissions(&params, std::fs::Permissions::from_mode(0o600)).unwrap();
    let secrets = dir.path().join("secrets.json");
    std::fs::write(&secrets, json!({"api_key": API_KEY}).to_string()).unwrap();
    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o600)).unwrap();
    dir
}

#[test]
fn a_planted_secret_reaches_no_output_and_no_readable_file() {
    let dir = project();
    let dir = dir.path();
    let p = ["--params", "params.json", "--secrets", "secrets.json"];
    let mut channels: Vec<(String, String)> = Vec::new();
    let mut run = |name: &str, args: &[&str]| -> Output {
        let out = capstan(dir, args);
        channels.push((name.to_string(), shown(&out)));
        out
    };
    let plan = run("plan", &["plan", p[0], p[1], p[2], p[3], "-v"]);
    assert_eq!(plan.status.code(), Some(0), "{}", shown(&plan));
    // `bad` fails on purpose (after printing its seed); everything else is made.
    let apply = run(
        "apply --json",
        &["apply", p[0], p[1], p[2], p[3], "--json", "-vv"],
    );
    assert_eq!(apply.status.code(), Some(1), "{}", shown(&apply));
    let events: Vec<Value> = crate::support::events(&apply.stdout);
    let complete = |address: &str| -> Value {
        events
            .iter()
            .find(|e| e["type"] == "resource_complete" && e["address"] == address)
            .unwrap_or_else(|| panic!("{address} was not made"))["outputs"]
            .clone()
    };
    // Redacted where the value was, so a front end sees that there is one.
    assert_eq!(complete("tok")["token"], "(sensitive)");
    assert_eq!(
        complete("tok")["length"].as_u64().map(|n| n > 0),
        Some(true)
    );
    assert_eq!(complete("login")["value"]["password"], "(sensitive)");
    assert_eq!(complete("login")["value"]["user"], "admin");
    assert_eq!(complete("uses")["value"], "(sensitive)");
    assert_eq!(complete("api")["value"]["key"], "(sensitive)");
    assert_eq!(complete("db")["value"], "(sensitive)");
    assert_eq!(complete("conn")["value"]["pw"], "(sensitive)");
    assert_eq!(complete("conn")["value"]["port"], 5432);
    let failed = events
        .iter()
        .find(|e| e["type"] == "resource_failed" && e["address"] == "bad")
        .expect("bad fails");
    assert!(
        failed["error"].as_str().unwrap().contains("(sensitive)"),
        "{failed}"
    );
    // Human output, and a second apply that changes nothing (secrets known from the state).
    run("apply (human)", &["apply", p[0], p[1], p[2], p[3], "-vv"]);
    run("plan again", &["plan", p[0], p[1], p[2], p[3], "-vv"]);
    run("plan --json", &["plan", p[0], p[1], p[2], p[3], "--json"]);
    for address in [
        "login", "echo", "tok", "uses", "bad", "api", "db", "conn", "mixed",
    ] {
        run(
            &format!("state show {address}"),
            &["state", "show", address],
        );
    }
    run("state list", &["state", "list", "--json"]);
    run("state pending", &["state", "pending", "--json"]);

    // The token the provider made up, as only --show-sensitive shows it.
    let shown_tok = capstan(dir, &["state", "show", "tok", "--show-sensitive"]);
    let tok: Value = serde_json::from_slice(&shown_tok.stdout).unwrap();
    let token = tok["outputs"]["token"].as_str().unwrap().to_string();
    assert!(token.starts_with("tok-"), "{tok}");
    assert_eq!(tok["sensitive"], json!(["/outputs/token"]));
    let login = capstan(dir, &["state", "show", "login", "--show-sensitive"]);
    assert!(shown(&login).contains(PASSWORD));
    let login = capstan(dir, &["state", "show", "login"]);
    let login: Value = serde_json::from_slice(&login.stdout).unwrap();
    assert_eq!(login["inputs"]["value"]["password"], "(sensitive)");
    assert_eq!(login["inputs"]["value"]["user"], "admin");

    for (name, text) in &channels {
        for secret in [
            PASSWORD,
            SEED,
            API_KEY,
            DB_PASSWORD,
            "line-one-of-the-key",
            "line-two-of-the-key",
            "numbers-secret-word",
            "issued tok-",
            token.as_str(),
        ] {
            assert!(
                !text.contains(secret),
                "`{secret}` leaked in {name}:\n{text}"
            );
        }
    }
    // The secrets were there to hide: the log and the error did print them. (Its stdout,
    // which holds the password, is an output made of a secret, so the whole line is one; its
    // stderr is no output, so only the password in it is hidden.)
    let all: String = channels.iter().map(|(_, t)| t.as_str()).collect();
    assert!(
        all.contains(r#""stream":"stdout","line":"(sensitive)""#),
        "{all}"
    );
    assert!(all.contains("also (sensitive)"), "{all}");

    // Files: the state directory is private, whatever the umask.
    let state = dir.join(".capstan");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&state), 0o700);
    for entry in std::fs::read_dir(&state).unwrap().flatten() {
        let path = entry.path();
        if path.is_file() {
            assert_eq!(mode(&path), 0o600, "{}", path.display());
        }
    }
    // No file anywhere else under the project holds a secret but the state and the params
    // (the `file`-less deployment writes none).
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        let name = path.file_name().unwrap();
        if path.is_file() && name != "params.json" && name != "secrets.json" {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(!text.contains(PASSWORD), "{}", path.display());
        }
    }
}

#[test]
fn another_user_can_neither_read_the_state_nor_reach_a_standing_socket() {
    let Some(user) = other_user() else { return };
    let dir = project();
    let root = dir.path();
    // The project itself is open to all; only what Capstan makes is private.
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
    let apply = capstan(
        root,
        &[
            "apply",
            "--params",
            "params.json",
            "--secrets",
            "secrets.json",
            "--json",
        ],
    );
    assert!(root.join(".capstan/journal").exists(), "{}", shown(&apply));
    let as_other = |args: &[&str]| {
        Command::new("runuser")
            .args(["-u", user, "--"])
            .args(args)
            .output()
            .unwrap()
    };
    // The check itself works: the other user can read what is readable.
    std::fs::write(root.join("open.txt"), "open").unwrap();
    let open = as_other(&["cat", root.join("open.txt").to_str().unwrap()]);
    assert!(open.status.success(), "{}", shown(&open));
    let journal = as_other(&["cat", root.join(".capstan/journal").to_str().unwrap()]);
    assert!(!journal.status.success(), "another user read the journal");
    assert!(!shown(&journal).contains(PASSWORD));
    let list = as_other(&["ls", root.join(".capstan").to_str().unwrap()]);
    assert!(
        !list.status.success(),
        "another user listed the state directory"
    );

    // A standing provider socket made by a provider Capstan serves.
    let socket = root.join("run/provider.sock");
    let mut service = Command::new(testing_provider())
        .env("CAPSTAN_PROVIDER_LISTEN", &socket)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    crate::support::wait_until("the socket appears", || socket.exists());
    let connect = format!(
        "import socket; s = socket.socket(socket.AF_UNIX); s.connect({:?}); print('connected')",
        socket.to_str().unwrap()
    );
    // Root can connect (the check works) …
    let mine = Command::new("python3")
        .args(["-c", &connect])
        .output()
        .unwrap();
    assert!(shown(&mine).contains("connected"), "{}", shown(&mine));
    // … the other user cannot.
    let theirs = as_other(&["python3", "-c", &connect]);
    let _ = service.kill();
    let _ = service.wait();
    assert!(
        !theirs.status.success(),
        "another user connected: {}",
        shown(&theirs)
    );
    assert!(!shown(&theirs).contains("connected"));
}

#[test]
fn provider_call_hides_what_the_provider_marks_sensitive() {
    let dir = tempfile::tempdir().unwrap();
    let inputs = dir.path().join("inputs.json");
    std::fs::write(&inputs, json!({"seed": SEED}).to_string()).unwrap();
    let call = |args: &[&str]| {
        let mut all = vec!["provider", "call", "--type", "secret"];
        all.extend_from_slice(args);
        let provider = testing_provider();
        all.extend_from_slice(&["--", provider.as_str()]);
        capstan(dir.path(), &all)
    };
    // Inputs from a file (not the process list); the seed is hidden in every line.
    let out = call(&["--inputs", &format!("@{}", inputs.display())]);
    assert!(out.status.success(), "{}", shown(&out));
    assert!(!shown(&out).contains(SEED), "{}", shown(&out));
    assert!(shown(&out).contains("(sensitive)"));
    // A token it makes up is hidden in its log and stderr, printed before it is returned.
    let out = call(&["--inputs", "{}", "--json"]);
    let text = shown(&out);
    assert!(!text.contains("issued tok-"), "{text}");
    // Asked for, it is shown.
    let out = call(&[
        "--inputs",
        &format!("@{}", inputs.display()),
        "--show-sensitive",
    ]);
    assert!(shown(&out).contains(SEED));
}

/// A command that turns a secret into something else (`tr`, `base64`): what it prints and
/// what it returns are secrets too (every output of an operation whose inputs hold a secret,
/// except those its type declares public, as `exec`'s exit status), wherever they go next.
#[test]
fn what_a_command_makes_of_a_secret_is_a_secret_too() {
    use base64_of as b64;
    fn base64_of(text: &str) -> String {
        let out = Command::new("base64")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write;
                child.stdin.take().unwrap().write_all(text.as_bytes())?;
                child.wait_with_output()
            })
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }
    const TOKEN: &str = "quiet-token-for-tr";
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("capstan.json"),
        json!({
            "providers": {"local": {"builtin": "local"}},
            "resources": {
                "upper": {"provider": "local", "type": "exec",
                          "inputs": {"command": "tr", "args": ["a-z", "A-Z"], "stdin": {"$param": "token"}}},
                "encoded": {"provider": "local", "type": "exec",
                            "inputs": {"command": "base64", "stdin": {"$param": "token"}}},
                // Fails after printing what it made of the secret.
                "broken": {"provider": "local", "type": "exec",
                           "inputs": {"command": "sh", "args": ["-c", "tr a-z A-Z; exit 3"],
                                      "stdin": {"$param": "token"}}},
                "copy": {"provider": "local", "type": "memo", "inputs": {"value": {"$ref": "upper#stdout"}}},
                "plain": {"provider": "local", "type": "exec", "inputs": {"command": "echo", "args": ["nothing-secret-here"]}}
            }
        })
        .to_string(),
    )
    .unwrap();
    let secrets = dir.path().join("secrets.json");
    std::fs::write(&secrets, json!({"token": TOKEN}).to_string()).unwrap();
    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o600)).unwrap();
    let secrets = secrets.to_str().unwrap();
    let derived = [TOKEN.to_uppercase(), b64(TOKEN)];

    let mut seen = String::new();
    for args in [
        vec!["apply", "--secrets", secrets, "-v"],
        vec!["apply", "--secrets", secrets, "--json"],
        vec!["plan", "--secrets", secrets],
        vec!["state", "show", "upper"],
        vec!["state", "show", "copy"],
        vec!["state", "list"],
    ] {
        seen.push_str(&shown(&capstan(dir.path(), &args)));
    }
    for value in &derived {
        assert!(
            !seen.contains(value.as_str()),
            "`{value}` was shown:\n{seen}"
        );
    }
    assert!(
        seen.contains("nothing-secret-here"),
        "an operation without a secret is shown as it is:\n{seen}"
    );

    // Recorded as secrets, with the exit status (declared public) left plain.
    let shown_upper: Value =
        serde_json::from_slice(&capstan(dir.path(), &["state", "show", "upper"]).stdout).unwrap();
    let marked: Vec<&str> = shown_upper["sensitive"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(marked.contains(&"/outputs/stdout"), "{shown_upper}");
    assert!(!marked.contains(&"/outputs/exitCode"), "{shown_upper}");
    assert_eq!(shown_upper["outputs"]["exitCode"], 0, "{shown_upper}");
}

/// A child process killed (and reaped) when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A second user for the isolation tests (made once, when the tests run as root); `None`
/// when they cannot make one (not root: skipped, or failed in CI).
fn other_user() -> Option<&'static str> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        capstan_test_support::skip_or_fail("not root: cannot make a second user");
        return None;
    }
    let user = "capstan-probe";
    let exists = Command::new("id")
        .arg(user)
        .output()
        .unwrap()
        .status
        .success();
    if !exists {
        // Another test may be making it at the same moment: check again after a failure.
        let made = Command::new("useradd")
            .args(["--no-create-home", "--shell", "/usr/sbin/nologin", user])
            .status()
            .unwrap();
        let exists = Command::new("id")
            .arg(user)
            .output()
            .unwrap()
            .status
            .success();
        assert!(made.success() || exists, "useradd failed");
    }
    Some(user)
}

#[test]
fn a_socket_another_user_serves_is_refused_unless_the_deployment_names_them() {
    let Some(user) = other_user() else { return };
    let dir = tempfile::tempdir().unwrap();
    // A place the other user can make a socket in.
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o777)).unwrap();
    let socket = run.join("squatted.sock");
    // Started as that user directly (no `runuser` in between), so that killing it at the end
    // kills the service itself and leaves nothing behind.
    let id = |flag: &str| -> u32 {
        let out = Command::new("id").args([flag, user]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    };
    let _service = {
        use std::os::unix::process::CommandExt;
        let child = Command::new(testing_provider())
            .env("CAPSTAN_PROVIDER_LISTEN", &socket)
            .uid(id("-u"))
            .gid(id("-g"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Killed however the test ends (a failed assertion too).
        KillOnDrop(child)
    };
    crate::support::wait_until("the other user's socket appears", || socket.exists());
    let deployment = |owner: Option<&str>| {
        let mut provider = json!({"socket": socket});
        if let Some(owner) = owner {
            provider["owner"] = json!(owner);
        }
        json!({
            "providers": {"t": provider},
            "resources": {"n": {"provider": "t", "type": "noop",
                                "inputs": {"value": {"$sensitive": {"$param": "pw"}}}}}
        })
        .to_string()
    };
    std::fs::write(
        dir.path().join("params.json"),
        json!({"pw": PASSWORD}).to_string(),
    )
    .unwrap();
    std::fs::write(dir.path().join("capstan.json"), deployment(None)).unwrap();
    let refused = capstan(dir.path(), &["apply", "--params", "params.json"]);
    let text = shown(&refused);
    assert!(!refused.status.success(), "{text}");
    assert!(
        text.contains(&format!("served by user `{user}`")) && text.contains("refused"),
        "{text}"
    );
    assert!(text.contains("\"owner\""), "says how to trust it: {text}");
    let listed = capstan(dir.path(), &["state", "list"]);
    assert_eq!(
        String::from_utf8_lossy(&listed.stdout),
        "",
        "nothing was done"
    );

    // Named as the owner, it is trusted.
    std::fs::write(dir.path().join("capstan.json"), deployment(Some(user))).unwrap();
    let trusted = capstan(dir.path(), &["apply", "--params", "params.json"]);
    assert!(trusted.status.success(), "{}", shown(&trusted));

    // An owner that is no user is a mistake in the deployment, said as such.
    std::fs::write(
        dir.path().join("capstan.json"),
        deployment(Some("no-such-user-here")),
    )
    .unwrap();
    let typo = capstan(dir.path(), &["plan", "--params", "params.json"]);
    assert_eq!(typo.status.code(), Some(2), "{}", shown(&typo));
    assert!(
        shown(&typo).contains("no user `no-such-user-here`"),
        "{}",
        shown(&typo)
    );
}

#[test]
fn a_state_another_user_planted_is_refused_and_nothing_is_written_through_it() {
    let Some(user) = other_user() else { return };
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::write(
        root.join("capstan.json"),
        json!({"providers": {"local": {"builtin": "local"}},
               "resources": {"m": {"provider": "local", "type": "memo",
                                   "inputs": {"value": {"$sensitive": {"$param": "pw"}}}}}})
        .to_string(),
    )
    .unwrap();
    std::fs::write(
        root.join("params.json"),
        json!({"pw": PASSWORD}).to_string(),
    )
    .unwrap();
    // The other user made `.capstan` (a directory they control), with a journal of theirs.
    let chown = |path: &Path| {
        let made = Command::new("chown").arg(user).arg(path).status().unwrap();
        assert!(made.success());
    };
    let state = root.join(".capstan");
    std::fs::create_dir(&state).unwrap();
    std::fs::write(state.join("journal"), "").unwrap();
    chown(&state.join("journal"));
    chown(&state);
    let apply = capstan(root, &["apply", "--params", "params.json"]);
    assert_eq!(apply.status.code(), Some(2), "{}", shown(&apply));
    assert!(
        shown(&apply).contains(&format!("belongs to user `{user}`")),
        "{}",
        shown(&apply)
    );
    assert_eq!(std::fs::read(state.join("journal")).unwrap(), b"");

    // A directory of ours, but a journal of theirs in it: the secret is not written into it.
    let made = Command::new("chown")
        .arg("root")
        .arg(&state)
        .status()
        .unwrap();
    assert!(made.success());
    let apply = capstan(root, &["apply", "--params", "params.json"]);
    assert_eq!(apply.status.code(), Some(2), "{}", shown(&apply));
    assert_eq!(std::fs::read(state.join("journal")).unwrap(), b"");

    // A lock that is a link to a file of root's: refused, the file untouched.
    std::fs::remove_file(state.join("journal")).unwrap();
    let _ = std::fs::remove_file(state.join("lock"));
    let victim = root.join("victim");
    std::fs::write(&victim, "precious").unwrap();
    std::os::unix::fs::symlink(&victim, state.join("lock")).unwrap();
    let apply = capstan(root, &["apply", "--params", "params.json"]);
    assert_eq!(apply.status.code(), Some(2), "{}", shown(&apply));
    assert!(
        shown(&apply).contains("is a symbolic link"),
        "{}",
        shown(&apply)
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
}
