//! NixOS machines over SSH, end to end: real `sshd` (Debian's openssh-server) as several
//! machines, each in a mount namespace with its own Nix store; systems built by the real
//! `nix-build`; `capstan apply` with the built-in `machine` provider as a real process. Logins
//! are counted from each sshd's log.

use capstan_test_support::machine::{
    build_system, instantiate_system, unavailable, ClientKey, Machine,
};
use serde_json::{json, Value};
use std::path::Path;

use crate::support::{events, shown};

/// Machines can run here (root, sshd, Nix); otherwise the test says why and skips (fails
/// under CI).
fn available() -> bool {
    if let Some(why) = unavailable() {
        capstan_test_support::skip_or_fail(&why);
        return false;
    }
    crate::support::nix_tool("nix-build", "the machine tests")
}

struct Fleet {
    dir: tempfile::TempDir,
    key: ClientKey,
}

impl Fleet {
    fn new() -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let key = ClientKey::new(&dir.path().join("client"));
        Fleet { dir, key }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn machine(&self, name: &str) -> Machine {
        Machine::start(&self.path().join("machines"), name, &self.key)
    }

    fn system(&self, name: &str, activate: &str) -> String {
        build_system(self.path(), name, 64, activate)
    }

    /// A `nixos` resource deploying `system` to `machine`, with `extra` inputs.
    fn resource(&self, machine: &Machine, system: &str, extra: Value) -> Value {
        let mut inputs = json!({
            "target": "root@127.0.0.1",
            "port": machine.port,
            "hostKey": machine.host_key(),
            "identity": self.key.identity(),
            "system": system,
            "checkSigs": false,
            "confirmTimeout": 5,
        });
        for (k, v) in extra.as_object().unwrap() {
            inputs[k] = v.clone();
        }
        json!({"provider": "machine", "type": "nixos", "inputs": inputs})
    }

    fn write(&self, resources: Value) {
        let deployment = json!({
            "providers": {"machine": {"builtin": "machine"}},
            "resources": resources
        });
        std::fs::write(self.path().join("capstan.json"), deployment.to_string()).unwrap();
    }

    fn capstan(&self, args: &[&str]) -> std::process::Output {
        crate::support::capstan_in(self.path(), args)
    }

    fn apply(&self) -> (std::process::Output, Vec<Value>) {
        let out = self.capstan(&["apply", "--json"]);
        let events = events(&out.stdout);
        (out, events)
    }

    fn outputs(&self, address: &str) -> Value {
        let out = self.capstan(&["state", "show", address]);
        assert!(out.status.success(), "{}", shown(&out));
        serde_json::from_slice::<Value>(&out.stdout).unwrap()["outputs"].clone()
    }
}

fn failure<'a>(events: &'a [Value], address: &str) -> &'a str {
    events
        .iter()
        .find(|e| e["type"] == "resource_failed" && e["address"] == address)
        .and_then(|e| e["error"].as_str())
        .unwrap_or("")
}

fn phases(events: &[Value], address: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["type"] == "resource_progress" && e["address"] == address)
        .filter(|e| e["progress"]["kind"] == "phase")
        .filter_map(|e| e["progress"]["name"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn a_machine_is_deployed_changed_and_a_no_op_apply_never_logs_in() {
    if !available() {
        return;
    }
    let fleet = Fleet::new();
    let web = fleet.machine("web");
    let one = fleet.system("one", "");
    let two = fleet.system("two", "");
    fleet.write(json!({"web": fleet.resource(&web, &one, json!({}))}));

    // First deploy: copied into the machine's own store, activated, confirmed.
    let (out, events) = fleet.apply();
    assert!(out.status.success(), "{}", shown(&out));
    assert_eq!(web.running(), one);
    assert_eq!(web.profile(), one);
    let seen = phases(&events, "web");
    for phase in ["connecting", "copying", "activating", "confirming"] {
        assert!(seen.iter().any(|p| p == phase), "no `{phase}` in {seen:?}");
    }
    let outputs = fleet.outputs("web");
    assert_eq!(outputs["system"], one.as_str());
    assert_eq!(outputs["generation"], 1);
    assert_eq!(outputs["running"], one.as_str());
    // Confirmed: the watchdog was stopped, and no activation is left running on the machine.
    assert!(
        web.capstan_processes().is_empty(),
        "left running: {:?}",
        web.capstan_processes()
    );
    assert!(
        web.run("ls /run/capstan 2>/dev/null").trim().is_empty(),
        "an activation's notes were left"
    );
    // A small copy counts paths (bytes are counted from 16 MiB on).
    let counters: Vec<(String, u64, u64)> = events
        .iter()
        .filter(|e| e["type"] == "resource_progress" && e["progress"]["kind"] == "counter")
        .map(|e| {
            let p = &e["progress"];
            let unit = p["unit"].as_str().unwrap().to_string();
            (
                unit,
                p["done"].as_u64().unwrap(),
                p["expected"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        counters.last(),
        Some(&("paths".to_string(), 1, 1)),
        "{counters:?}"
    );
    // The activation's own output reached the log, line by line.
    assert!(
        events.iter().any(|e| e["type"] == "resource_progress"
            && e["progress"]["line"].as_str() == Some("one is active")),
        "{events:?}"
    );

    // Nothing changed: no login at all.
    let before = web.logins();
    let (out, _) = fleet.apply();
    assert!(out.status.success(), "{}", shown(&out));
    assert_eq!(web.logins(), before, "a no-op apply logged in");

    // A change: generation 2, the previous system named.
    fleet.write(json!({"web": fleet.resource(&web, &two, json!({}))}));
    let (out, _) = fleet.apply();
    assert!(out.status.success(), "{}", shown(&out));
    assert_eq!(web.running(), two);
    let outputs = fleet.outputs("web");
    assert_eq!(outputs["generation"], 2);
    assert_eq!(outputs["previous"], one.as_str());

    // Switched back by hand: `--refresh` sees it, and the apply puts `two` back.
    web.run(&format!(
        "nix-env -p /nix/var/nix/profiles/system --switch-generation 1 && {one}/bin/switch-to-configuration switch"
    ));
    assert_eq!(web.running(), one);
    let plan = fleet.capstan(&["plan", "--refresh", "--detailed-exitcode"]);
    assert_eq!(plan.status.code(), Some(2), "{}", shown(&plan));
    let out = fleet.capstan(&["apply", "--refresh"]);
    assert!(out.status.success(), "{}", shown(&out));
    assert_eq!(web.running(), two);

    // Asked for what the machine already runs (switched by hand again): nothing is
    // activated, and the outputs say what runs.
    web.run(&format!(
        "nix-env -p /nix/var/nix/profiles/system --set {one} && {one}/bin/switch-to-configuration switch"
    ));
    fleet.write(json!({"web": fleet.resource(&web, &one, json!({}))}));
    let (out, events) = fleet.apply();
    assert!(out.status.success(), "{}", shown(&out));
    assert!(
        phases(&events, "web")
            .iter()
            .any(|p| p == "already running"),
        "{events:?}"
    );
    assert!(
        !events.iter().any(|e| e["progress"]["line"]
            .as_str()
            .is_some_and(|l| l.starts_with("activating one"))),
        "activated again: {events:?}"
    );
    assert_eq!((web.running(), web.profile()), (one.clone(), one.clone()));
    assert_eq!(fleet.outputs("web")["running"], one.as_str());
}

#[test]
fn each_goal_does_what_nixos_rebuild_does() {
    if !available() {
        return;
    }
    let fleet = Fleet::new();
    let m = fleet.machine("goals");
    let one = fleet.system("g-one", "");
    let two = fleet.system("g-two", "");
    let three = fleet.system("g-three", "");
    fleet.write(json!({"m": fleet.resource(&m, &one, json!({}))}));
    assert!(fleet.apply().0.status.success());

    // test: runs now, the profile (what boots) stays.
    fleet.write(json!({"m": fleet.resource(&m, &two, json!({"goal": "test"}))}));
    let (out, _) = fleet.apply();
    assert!(out.status.success(), "{}", shown(&out));
    assert_eq!((m.running(), m.profile()), (two.clone(), one.clone()));

    // boot: the profile moves, what runs stays.
    fleet.write(json!({"m": fleet.resource(&m, &three, json!({"goal": "boot"}))}));
    let (out, _) = fleet.apply();
    assert!(out.status.success(), "{}", shown(&out));
    assert_eq!((m.running(), m.profile()), (two.clone(), three.clone()));

    // dry-activate: nothing moves, its output is shown.
    fleet.write(json!({"m": fleet.resource(&m, &one, json!({"goal": "dry-activate"}))}));
    let (out, events) = fleet.apply();
    assert!(out.status.success(), "{}", shown(&out));
    assert_eq!((m.running(), m.profile()), (two, three));
    assert!(
        events.iter().any(|e| e["progress"]["line"]
            .as_str()
            .is_some_and(|l| l.contains("activating g-one (dry-activate)"))),
        "{events:?}"
    );
}

#[test]
fn a_failing_activation_is_rolled_back() {
    if !available() {
        return;
    }
    let fleet = Fleet::new();
    let m = fleet.machine("fails");
    let good = fleet.system("good", "");
    let bad = fleet.system("bad", "echo 'unit foo.service failed' >&2; exit 4");
    fleet.write(json!({"m": fleet.resource(&m, &good, json!({}))}));
    assert!(fleet.apply().0.status.success());
    fleet.write(json!({"m": fleet.resource(&m, &bad, json!({}))}));
    let (out, events) = fleet.apply();
    assert_eq!(out.status.code(), Some(1), "{}", shown(&out));
    let message = failure(&events, "m");
    assert!(message.contains("rolled back"), "{message}");
    assert!(message.contains(&good), "{message}");
    assert_eq!((m.running(), m.profile()), (good.clone(), good.clone()));
    // The state keeps what really runs.
    assert_eq!(fleet.outputs("m")["system"], good.as_str());
}

#[test]
fn a_configuration_that_breaks_ssh_rolls_itself_back() {
    if !available() {
        return;
    }
    let fleet = Fleet::new();
    let m = fleet.machine("cutoff");
    let keys = m.root().join("etc/authorized_keys");
    // Each system sets who may log in: `good` restores the key, `locked` removes it (the
    // master connection, already in, keeps working; a new one cannot).
    let restore = format!("[ -f {k}.off ] && mv {k}.off {k}; true", k = keys.display());
    let lock = format!("mv {k} {k}.off", k = keys.display());
    let good = fleet.system("reachable", &restore);
    let locked = fleet.system("locked-out", &lock);
    fleet.write(json!({"m": fleet.resource(&m, &good, json!({}))}));
    assert!(fleet.apply().0.status.success());
    fleet.write(json!({"m": fleet.resource(&m, &locked, json!({"confirmTimeout": 4}))}));
    let (out, events) = fleet.apply();
    assert_eq!(out.status.code(), Some(1), "{}", shown(&out));
    let message = failure(&events, "m");
    assert!(message.contains("rolled"), "{message}");
    assert!(message.contains("new SSH connection"), "{message}");
    assert_eq!((m.running(), m.profile()), (good.clone(), good.clone()));
    assert!(
        keys.exists(),
        "the previous generation's activation gave the key back"
    );
    assert_eq!(fleet.outputs("m")["system"], good.as_str());
}

#[test]
fn a_failing_health_check_rolls_back_and_skips_dependents() {
    if !available() {
        return;
    }
    let fleet = Fleet::new();
    let m = fleet.machine("checked");
    // A service the deployer checks over HTTP: healthy until `unhealthy` runs (each system's
    // activation writes its health where the service reads it).
    let health = m.root().join("health");
    let one = fleet.system("healthy", &format!("echo fine > {}", health.display()));
    let two = fleet.system("unhealthy", &format!("echo failing > {}", health.display()));
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "http://127.0.0.1:{}/health",
        server.local_addr().unwrap().port()
    );
    std::thread::spawn(move || {
        for mut stream in server.incoming().flatten() {
            use std::io::{Read, Write};
            let mut buffer = [0u8; 1024];
            let _ = stream.read(&mut buffer);
            let now = std::fs::read_to_string(&health).unwrap_or_default();
            let status = if now.contains("fine") {
                "200 OK"
            } else {
                "503 Service Unavailable"
            };
            let _ = write!(stream, "HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
        }
    });
    let checks = json!({
        "checks": [{"command": "test -e /run/current-system"}, {"http": url}],
        "checkTimeout": 3, "checkInterval": 1
    });
    fleet.write(json!({"m": fleet.resource(&m, &one, checks.clone())}));
    let (out, _) = fleet.apply();
    assert!(out.status.success(), "{}", shown(&out));
    fleet.write(json!({
        "m": fleet.resource(&m, &two, checks),
        "after": {"provider": "machine", "type": "nixos",
                  "inputs": {"target": "x", "hostKey": "ssh-ed25519 AAAA", "system": {"$ref": "m#system"}}}
    }));
    let (out, events) = fleet.apply();
    assert_eq!(out.status.code(), Some(1), "{}", shown(&out));
    let message = failure(&events, "m");
    assert!(
        message.contains("health check"),
        "{message}: {}",
        shown(&out)
    );
    assert!(message.contains("503"), "{message}");
    assert!(message.contains("rolled back"), "{message}");
    assert_eq!(m.running(), one);
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "resource_skipped" && e["address"] == "after"),
        "the dependent is skipped: {events:?}"
    );
}

#[test]
fn an_https_check_trusts_this_computer_or_the_given_authority() {
    if !available() {
        return;
    }
    let fleet = Fleet::new();
    let trusting = fleet.machine("trusting");
    let default = fleet.machine("default-roots");
    let server = capstan_test_support::https::HttpsServer::start(fleet.path(), || "200 OK".into());
    let url = format!("https://127.0.0.1:{}/health", server.port);
    let system = fleet.system("served", "");
    let check = |ca: Option<&Path>| {
        let mut check = json!({"http": url});
        if let Some(ca) = ca {
            check["caFile"] = json!(ca);
        }
        json!({"checks": [check], "checkTimeout": 2, "checkInterval": 1})
    };
    fleet.write(json!({
        "trusting": fleet.resource(&trusting, &system, check(Some(&server.ca_file))),
        "default-roots": fleet.resource(&default, &system, check(None)),
    }));
    let (out, events) = fleet.apply();
    assert_eq!(out.status.code(), Some(1), "{}", shown(&out));
    // Trusting the authority that signed the server's certificate: passes.
    assert!(failure(&events, "trusting").is_empty(), "{events:?}");
    assert_eq!(trusting.running(), system);
    // This computer's authorities never signed it: the TLS check fails, saying why.
    let refused = failure(&events, "default-roots");
    assert!(refused.contains("TLS"), "{refused}");
    assert!(refused.contains("UnknownIssuer"), "{refused}");
    // A first deploy rolled back: nothing boots it (there was nothing before to go back to).
    assert!(default.profile().is_empty(), "its profile was reset");

    // `caFile` belongs to https:// checks.
    fleet.write(json!({
        "trusting": fleet.resource(&trusting, &system, json!({
            "checks": [{"http": "http://127.0.0.1:1/", "caFile": server.ca_file}]
        })),
    }));
    let out = fleet.capstan(&["plan"]);
    assert_eq!(out.status.code(), Some(1), "{}", shown(&out));
    assert!(
        shown(&out).contains("`caFile` is for https:// checks"),
        "{}",
        shown(&out)
    );
}

#[test]
fn a_key_reaches_the_machine_with_its_owner_and_mode_and_nowhere_else() {
    if !available() {
        return;
    }
    let fleet = Fleet::new();
    let m = fleet.machine("keyed");
    let system = fleet.system("with-key", "");
    let secret = "hunter2-do-not-leak-7f3a";
    std::fs::write(
        fleet.path().join("secrets.json"),
        json!({"db": secret}).to_string(),
    )
    .unwrap();
    fleet.write(json!({"m": fleet.resource(&m, &system, json!({
        "keys": {"db-password": {"value": {"$param": "db"}, "user": "nobody", "group": "nogroup", "mode": "0440"}}
    }))}));
    let out = fleet.capstan(&["apply", "--json", "--secrets", "secrets.json"]);
    assert!(out.status.success(), "{}", shown(&out));
    assert_eq!(m.run("cat /run/keys/db-password"), secret);
    assert_eq!(
        m.run("stat -c '%U %G %a' /run/keys/db-password").trim(),
        "nobody nogroup 440"
    );
    // Not in the machine's store, nor in anything capstan printed.
    assert!(m
        .run(&format!("grep -rl {secret} /nix/store || true"))
        .trim()
        .is_empty());
    assert!(!shown(&out).contains(secret));
    assert!(!m.log().contains(secret), "sshd logged it");
    assert_eq!(
        fleet.outputs("m")["keyPaths"]["db-password"],
        "/run/keys/db-password"
    );

    // Destroyed: the key goes, the system stays.
    let out = fleet.capstan(&["destroy", "--yes", "--secrets", "secrets.json"]);
    assert!(out.status.success(), "{}", shown(&out));
    assert!(m.run("ls /run/keys").trim().is_empty());
    assert_eq!(m.running(), system);
}

#[test]
fn a_reboot_waits_for_the_machine_and_checks_what_it_runs() {
    if !available() {
        return;
    }
    let fleet = Fleet::new();
    let m = fleet.machine("rebooted");
    let one = fleet.system("before-reboot", "");
    let two = fleet.system("after-reboot", "");
    fleet.write(json!({"m": fleet.resource(&m, &one, json!({}))}));
    assert!(fleet.apply().0.status.success());
    fleet.write(json!({"m": fleet.resource(&m, &two, json!({
        "goal": "boot", "reboot": true, "rebootCommand": m.reboot_command(), "rebootTimeout": 30
    }))}));
    let (out, events) = fleet.apply();
    assert!(out.status.success(), "{}", shown(&out));
    assert!(phases(&events, "m").iter().any(|p| p == "rebooting"));
    assert_eq!(m.running(), two);
    assert_eq!(fleet.outputs("m")["running"], two.as_str());
}

/// The key exchange of each connection sshd accepted, in order.
fn key_exchanges(m: &Machine) -> Vec<String> {
    m.log()
        .lines()
        .filter_map(|l| {
            l.split_once("kex: algorithm: ")
                .map(|(_, k)| k.trim_end_matches("[preauth]").trim().to_string())
        })
        .collect()
}

#[test]
fn the_confirmation_alone_prefers_the_cheaper_key_exchange_and_a_server_may_refuse_it() {
    if !available() {
        return;
    }
    let fleet = Fleet::new();
    let dir = fleet.path().join("machines");
    let plain = Machine::start_configured(&dir, "plain", &fleet.key, "LogLevel DEBUG1\n");
    // A server that allows the post-quantum exchange only.
    let strict = Machine::start_configured(
        &dir,
        "strict",
        &fleet.key,
        "LogLevel DEBUG1\nKexAlgorithms sntrup761x25519-sha512@openssh.com\n",
    );
    let system = fleet.system("kex-sys", "");
    fleet.write(json!({
        "plain": fleet.resource(&plain, &system, json!({})),
        "strict": fleet.resource(&strict, &system, json!({})),
    }));
    let (out, _) = fleet.apply();
    assert!(out.status.success(), "{}", shown(&out));
    assert_eq!(
        (plain.running(), strict.running()),
        (system.clone(), system)
    );
    // The master (the copy, the activation) as OpenSSH's default; the confirmation over a
    // new connection, which carries nothing secret, the classical one.
    let default = std::process::Command::new("ssh")
        .args(["-G", "-F", "/dev/null", "localhost"])
        .output()
        .unwrap();
    let default = String::from_utf8_lossy(&default.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("kexalgorithms "))
        .and_then(|list| list.split(',').next())
        .unwrap()
        .to_string();
    let seen = key_exchanges(&plain);
    if default.starts_with("sntrup761x25519") {
        assert_eq!(
            seen,
            [default.as_str(), "curve25519-sha256"],
            "{}",
            plain.log()
        );
    }
    // The strict server agreed on what it allows, and the confirmation got through.
    assert_eq!(
        key_exchanges(&strict),
        ["sntrup761x25519-sha512@openssh.com"; 2],
        "{}",
        strict.log()
    );
}

#[test]
fn an_unreachable_machine_and_a_wrong_host_key_fail_clearly_and_the_others_go_on() {
    if !available() {
        return;
    }
    let fleet = Fleet::new();
    let good = fleet.machine("fine");
    let impostor = fleet.machine("impostor");
    let system = fleet.system("fleet-sys", "");
    let mut wrong_key = fleet.resource(&impostor, &system, json!({}));
    // The impostor shows its own key, not the one pinned (the good machine's).
    wrong_key["inputs"]["hostKey"] = json!(good.host_key());
    let mut gone = fleet.resource(&good, &system, json!({}));
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    gone["inputs"]["port"] = json!(closed.local_addr().unwrap().port());
    drop(closed);
    fleet.write(json!({
        "fine": fleet.resource(&good, &system, json!({})),
        "impostor": wrong_key,
        "gone": gone,
    }));
    let (out, events) = fleet.apply();
    assert_eq!(out.status.code(), Some(1), "{}", shown(&out));
    assert_eq!(good.running(), system);
    let refused = failure(&events, "impostor");
    assert!(refused.contains("pinned host key"), "{refused}");
    assert!(impostor.running().is_empty());
    let unreachable = failure(&events, "gone");
    assert!(unreachable.contains("cannot reach"), "{unreachable}");
}

#[test]
fn a_derivation_is_built_here_or_on_the_machine() {
    if !available() {
        return;
    }
    let fleet = Fleet::new();
    let here = fleet.machine("built-here");
    let there = fleet.machine("built-there");
    // Names of their own, so neither output exists anywhere yet.
    let unique = std::process::id();
    let local_drv = instantiate_system(fleet.path(), &format!("local-{unique}"), 16, "");
    let remote_drv = instantiate_system(fleet.path(), &format!("remote-{unique}"), 16, "");
    fleet.write(json!({
        "here": fleet.resource(&here, &local_drv, json!({})),
        "there": fleet.resource(&there, &remote_drv, json!({"buildOn": "target"})),
    }));
    let (out, events) = fleet.apply();
    assert!(out.status.success(), "{}", shown(&out));
    for (address, machine) in [("here", &here), ("there", &there)] {
        assert!(phases(&events, address).iter().any(|p| p == "building"));
        let system = fleet.outputs(address)["system"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(!system.ends_with(".drv") && system.contains(&format!("{unique}")));
        assert_eq!(machine.running(), system);
    }
    // Built on the machine: the deployer's store never had it.
    let built_there = fleet.outputs("there")["system"]
        .as_str()
        .unwrap()
        .to_string();
    let valid_here = std::process::Command::new("nix-store")
        .args(["--check-validity", &built_there])
        .output()
        .unwrap();
    assert!(!valid_here.status.success(), "{built_there} was built here");

    // On Nix's remote builders (`builders`, Nix's own syntax, its host key pinned there):
    // built on the builder machine, then copied here and on to the target.
    let builder = fleet.machine("builder");
    let farmed = fleet.machine("farmed");
    let drv = instantiate_system(fleet.path(), &format!("farmed-{unique}"), 16, "");
    let host_key = {
        use std::io::Write;
        let mut child = std::process::Command::new("base64")
            .arg("-w0")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(builder.host_key().as_bytes())
            .unwrap();
        String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap()
    };
    let builders = format!(
        "ssh-ng://root@127.0.0.1 x86_64-linux {} 1 1 - - {host_key}",
        fleet.key.identity().display()
    );
    fleet.write(json!({
        "farmed": fleet.resource(&farmed, &drv, json!({"builders": builders})),
    }));
    // Nix's own SSH settings reach its builders (here: the builder's port).
    let out = std::process::Command::new(crate::support::capstan_bin())
        .args(["apply", "--json"])
        .current_dir(fleet.path())
        .env("NIX_SSHOPTS", format!("-p {}", builder.port))
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", shown(&out));
    let system = fleet.outputs("farmed")["system"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(farmed.running(), system);
    assert_eq!(
        builder
            .run(&format!("[ -e {system} ] && echo built"))
            .trim(),
        "built",
        "{system} was not built on the builder"
    );
    assert!(builder.logins() > 0);
}

/// Deployer processes of this test's runs: ssh and nix copy through its control sockets.
fn deployer_processes() -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let zombie = stat
            .rsplit(')')
            .next()
            .is_some_and(|s| s.trim_start().starts_with('Z'));
        let ours = [
            "capstan-ssh-",
            "__provider machine",
            "ssh-ng://root@127.0.0.1",
        ];
        if !zombie && ours.iter().any(|o| cmdline.contains(o)) {
            found.push(cmdline);
        }
    }
    found
}

#[test]
fn a_run_killed_mid_copy_or_mid_activation_leaves_nothing_and_the_next_converges() {
    if !available() {
        return;
    }
    let fleet = Fleet::new();
    let m = fleet.machine("killed");
    let one = fleet.system("calm", "");
    fleet.write(json!({"m": fleet.resource(&m, &one, json!({}))}));
    assert!(fleet.apply().0.status.success());
    let marker = m.root().join("activating");
    // A large closure (a copy that takes a moment) and an activation that takes a while.
    let big = build_system(
        fleet.path(),
        "slow",
        48 * 1024,
        &format!("touch {}; sleep 4", marker.display()),
    );
    fleet.write(json!({"m": fleet.resource(&m, &big, json!({"confirmTimeout": 3}))}));
    let start = || {
        std::process::Command::new(crate::support::capstan_bin())
            .args(["apply"])
            .current_dir(fleet.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };

    // Each signal that ends a run, while copying and while activating. A copy stopped
    // leaves the machine as it was; an activation stopped finishes on the machine (it is
    // detached there), nobody confirms it, and the machine's watchdog rolls it back.
    let cases = [
        (libc::SIGKILL, "copy"),
        (libc::SIGINT, "copy"),
        (libc::SIGTERM, "activation"),
        (libc::SIGKILL, "activation"),
        (libc::SIGHUP, "activation"),
    ];
    for (signal, during) in cases {
        let _ = std::fs::remove_file(&marker);
        let apply = start();
        if during == "copy" {
            crate::support::wait_until("the copy runs", || {
                deployer_processes().iter().any(|p| p.contains("copy --to"))
            });
        } else {
            crate::support::wait_until("the activation runs", || marker.exists());
        }
        // SAFETY: signals the child this test started.
        unsafe { libc::kill(apply.id() as i32, signal) };
        let out = crate::support::output_within(apply, "capstan stops on a signal");
        if signal != libc::SIGKILL {
            assert_eq!(
                out.status.code(),
                Some(128 + signal),
                "signal {signal} during the {during}"
            );
        }
        crate::support::wait_until("no deployer process is left", || {
            deployer_processes().is_empty()
        });
        crate::support::wait_until("the machine's watchdog is done", || {
            m.capstan_processes().is_empty()
        });
        assert_eq!(
            m.running(),
            one,
            "signal {signal} during the {during}: the machine runs what it ran"
        );
        assert_eq!(m.profile(), one, "signal {signal} during the {during}");
    }

    // The next apply settles what was interrupted and converges.
    std::fs::remove_file(&marker).unwrap();
    let (out, _) = fleet.apply();
    assert!(out.status.success(), "{}", shown(&out));
    assert_eq!(m.running(), big);

    // To a machine that lacks it, the copy counts bytes against what the machine lacked.
    let fresh = fleet.machine("fresh");
    fleet.write(json!({
        "m": fleet.resource(&m, &big, json!({"confirmTimeout": 3})),
        "fresh": fleet.resource(&fresh, &big, json!({})),
    }));
    let (out, events) = fleet.apply();
    assert!(out.status.success(), "{}", shown(&out));
    assert_eq!(fresh.running(), big);
    let last = |unit: &str| {
        events
            .iter()
            .filter(|e| e["type"] == "resource_progress" && e["address"] == "fresh")
            .filter(|e| e["progress"]["kind"] == "counter")
            .filter(|e| e["progress"]["unit"] == unit)
            .map(|e| {
                (
                    e["progress"]["done"].as_u64().unwrap(),
                    e["progress"]["expected"].as_u64().unwrap(),
                )
            })
            .next_back()
    };
    assert_eq!(last("paths"), None, "one counter per copy: {events:?}");
    let (done, expected) = last("bytes").expect("a bytes counter");
    assert_eq!(done, expected);
    assert!(expected > 48 * 1024 * 1024, "{expected} bytes");
    assert!(
        m.capstan_processes().is_empty(),
        "{:?}",
        m.capstan_processes()
    );
    // A run killed while its activation waits for confirmation, then the next run: it
    // supersedes the waiting watchdog (which must not roll back later what the next run
    // confirmed) and confirms the system itself. The system keeps new logins out for 2 s
    // after its activation, so the killed run cannot have confirmed it yet.
    let keys = m.root().join("etc/authorized_keys");
    let shy = fleet.system(
        "shy",
        &format!(
            "mv {k} {k}.off; (sleep 2; mv {k}.off {k}) </dev/null >/dev/null 2>&1 &",
            k = keys.display()
        ),
    );
    let fresh_resource = fleet.resource(&fresh, &big, json!({}));
    fleet.write(json!({"m": fleet.resource(&m, &one, json!({})), "fresh": fresh_resource.clone()}));
    assert!(fleet.apply().0.status.success());
    assert_eq!(m.running(), one);
    fleet.write(json!({
        "m": fleet.resource(&m, &shy, json!({"confirmTimeout": 8})),
        "fresh": fresh_resource,
    }));
    let mut apply = start();
    crate::support::wait_until("the watchdog waits for a confirmation", || {
        let waiting = "for d in /run/capstan/*; do [ -f $d/watchdog.pid ] && [ ! -d $d/claim ] && echo $d; done";
        !m.run(waiting).trim().is_empty()
    });
    let armed = std::time::Instant::now();
    apply.kill().unwrap();
    apply.wait().unwrap();
    crate::support::wait_until("logins are back", || keys.exists());
    let (out, _) = fleet.apply();
    assert!(out.status.success(), "{}", shown(&out));
    assert_eq!(m.running(), shy);
    // Past the killed run's deadline: still the system the second run confirmed.
    let deadline = std::time::Duration::from_secs(8 + 2);
    std::thread::sleep(deadline.saturating_sub(armed.elapsed()));
    assert_eq!((m.running(), m.profile()), (shy.clone(), shy.clone()));
    assert!(
        m.capstan_processes().is_empty(),
        "{:?}",
        m.capstan_processes()
    );

    // Its payload is not left in the deployer's store (nothing roots it).
    let _ = std::process::Command::new("nix-store")
        .args(["--delete", &big])
        .output();
}
