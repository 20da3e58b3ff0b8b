//! `capstan-bench fleet`: NixOS machines over SSH. Real `sshd`s (each in a mount namespace
//! with its own Nix store, from `capstan-test-support`) receive systems built by the real
//! `nix-build`. Capstan's apply of the fleet is timed against a shell script doing the same
//! steps with `xargs -P` at the same parallelism (`nix copy` then `ssh … switch`), rounds
//! interleaved; then a no-op apply (its SSH logins counted from the sshd logs) against a no-op
//! plan, and a magic rollback's time over its confirmation timeout.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use capstan_test_support::machine::{build_system, unavailable, ClientKey, Machine};
use serde_json::{json, Value};

use super::median;

struct Sizes {
    hosts: usize,
    jobs: usize,
    rounds: usize,
    payload_kib: u32,
}

/// No-op applies and plans per round.
const NOOP_REPEATS: usize = 7;

/// The seconds a confirmation may take in the rollback measurement.
const CONFIRM_TIMEOUT: u64 = 5;

pub(super) fn fleet_bench(json_output: bool, quick: bool) {
    if let Some(why) = unavailable() {
        eprintln!("error: the fleet benchmark starts machines: {why}");
        std::process::exit(2);
    }
    if Command::new("nix-build").arg("--version").output().is_err() {
        eprintln!("error: the fleet benchmark builds systems with nix-build: install Nix (`apt-get install -y nix-bin`)");
        std::process::exit(2);
    }
    let sizes = if quick {
        Sizes {
            hosts: 4,
            jobs: 4,
            rounds: 1,
            payload_kib: 256,
        }
    } else {
        Sizes {
            hosts: 20,
            jobs: 10,
            rounds: 3,
            payload_kib: 4096,
        }
    };
    let capstan = std::env::current_exe().unwrap().with_file_name("capstan");
    let dir = tempfile::tempdir().expect("temp dir");
    let key = ClientKey::new(&dir.path().join("client"));
    eprintln!("starting {} machines …", sizes.hosts);
    let machines: Vec<Machine> = (0..sizes.hosts)
        .map(|i| Machine::start(&dir.path().join("machines"), &format!("host{i}"), &key))
        .collect();
    let fleet = Fleet {
        dir: dir.path().to_path_buf(),
        key: &key,
        machines: &machines,
        capstan: capstan.clone(),
    };
    fleet.write_script();

    // Every timed round changes a running fleet: the first deploy is not timed.
    eprintln!("building systems ({} KiB each) …", sizes.payload_kib);
    let system = |name: &str| build_system(dir.path(), name, sizes.payload_kib, "");
    let base = system("fleet-base");
    fleet.apply(&base, sizes.jobs);

    let (mut capstan_s, mut script_s) = (Vec::new(), Vec::new());
    let (mut noop_apply_s, mut noop_plan_s) = (Vec::new(), Vec::new());
    let mut noop_logins = 0;
    for round in 0..sizes.rounds {
        let ours = system(&format!("fleet-capstan-{round}"));
        let theirs = system(&format!("fleet-script-{round}"));
        // Interleaved, each going first in turn: a slower moment falls on both alike.
        let mut order = [true, false];
        if round % 2 == 1 {
            order.reverse();
        }
        for capstan_first in order {
            if capstan_first {
                eprintln!("round {round}: capstan apply …");
                capstan_s.push(fleet.apply(&ours, sizes.jobs));
                // Nothing changed since: applies and plans (milliseconds each, so several,
                // interleaved), and the logins the applies made.
                let before: usize = machines.iter().map(Machine::logins).sum();
                for _ in 0..NOOP_REPEATS {
                    noop_apply_s.push(fleet.capstan(&["apply", "--json"]).0);
                    noop_plan_s.push(fleet.capstan(&["plan", "--json"]).0);
                }
                noop_logins += machines.iter().map(Machine::logins).sum::<usize>() - before;
            } else {
                eprintln!("round {round}: script …");
                script_s.push(fleet.script(&theirs, sizes.jobs));
            }
        }
    }

    eprintln!("magic rollback …");
    let rollback_s = fleet.rollback(sizes.rounds, sizes.payload_kib);

    let (ours, theirs) = (median(capstan_s), median(script_s));
    let noop_apply_count = noop_apply_s.len();
    let (noop_apply, noop_plan) = (median(noop_apply_s), median(noop_plan_s));
    let rollback = median(rollback_s);
    let figures = json!({
        "hosts": sizes.hosts,
        "jobs": sizes.jobs,
        "payload_kib": sizes.payload_kib,
        "capstan_apply_s": ours,
        "script_s": theirs,
        "fleet_vs_script_ratio": theirs / ours,
        "noop_apply_s": noop_apply,
        "noop_plan_s": noop_plan,
        "noop_ssh_connections": noop_logins,
        "noop_applies": noop_apply_count,
        "noop_vs_plan_ratio": noop_apply / noop_plan,
        "confirm_timeout_s": CONFIRM_TIMEOUT,
        "rollback_seconds_over_timeout": rollback - CONFIRM_TIMEOUT as f64,
        "rounds": sizes.rounds,
    });
    if json_output {
        println!("{figures}");
        return;
    }
    println!(
        "{} hosts, {} at once, systems of {} KiB (median of {} interleaved rounds)",
        sizes.hosts, sizes.jobs, sizes.payload_kib, sizes.rounds
    );
    println!("  capstan apply (copy, activate, confirm) {ours:>8.2} s");
    println!("  xargs -P script (nix copy, ssh switch)   {theirs:>8.2} s");
    println!(
        "  fleet_vs_script_ratio                   {:>8.2}   (goal >= 1.0)",
        theirs / ours
    );
    println!("  no-op apply                             {noop_apply:>8.2} s");
    println!("  no-op plan                              {noop_plan:>8.2} s");
    println!(
        "  noop_vs_plan_ratio                      {:>8.2}   (goal <= 1.5)",
        noop_apply / noop_plan
    );
    println!(
        "  noop_ssh_connections ({noop_apply_count} no-op applies)   {noop_logins:>8}   (goal 0)"
    );
    println!(
        "  rollback_seconds_over_timeout           {:>8.2} s (goal <= 10; timeout {CONFIRM_TIMEOUT} s)",
        rollback - CONFIRM_TIMEOUT as f64
    );
}

struct Fleet<'a> {
    dir: PathBuf,
    key: &'a ClientKey,
    machines: &'a [Machine],
    capstan: PathBuf,
}

impl Fleet<'_> {
    fn deployment_dir(&self) -> PathBuf {
        self.dir.join("deployment")
    }

    fn resource(&self, machine: &Machine, system: &str, confirm_timeout: u64) -> Value {
        json!({
            "provider": "machine",
            "type": "nixos",
            "inputs": {
                "target": "root@127.0.0.1",
                "port": machine.port,
                "hostKey": machine.host_key(),
                "identity": self.key.identity(),
                "system": system,
                "checkSigs": false,
                "confirmTimeout": confirm_timeout,
            }
        })
    }

    fn write(&self, place: &Path, resources: Value) {
        std::fs::create_dir_all(place).unwrap();
        let deployment = json!({
            "providers": {"machine": {"builtin": "machine"}},
            "resources": resources,
        });
        std::fs::write(place.join("capstan.json"), deployment.to_string()).unwrap();
    }

    /// Runs capstan in the fleet's deployment; its time.
    fn capstan(&self, args: &[&str]) -> (f64, Vec<u8>) {
        super::timed(&self.capstan, args, &self.deployment_dir())
    }

    /// Capstan deploys `system` to every machine; the apply's time.
    fn apply(&self, system: &str, jobs: usize) -> f64 {
        let resources: serde_json::Map<String, Value> = self
            .machines
            .iter()
            .map(|m| (m.name.clone(), self.resource(m, system, 30)))
            .collect();
        self.write(&self.deployment_dir(), Value::Object(resources));
        let (seconds, _) = self.capstan(&["apply", "--json", "--jobs", &jobs.to_string()]);
        self.all_run(system, "capstan apply");
        seconds
    }

    fn all_run(&self, system: &str, what: &str) {
        for m in self.machines {
            assert_eq!(
                m.running(),
                system,
                "{what}: {} runs something else",
                m.name
            );
            assert_eq!(m.profile(), system, "{what}: {}'s profile", m.name);
        }
    }

    /// The hand-written baseline: one host's steps, as people write them.
    fn write_script(&self) {
        let known_hosts: String = self
            .machines
            .iter()
            .map(|m| format!("[127.0.0.1]:{} {}\n", m.port, m.host_key()))
            .collect();
        std::fs::write(self.dir.join("known_hosts"), known_hosts).unwrap();
        let script = format!(
            r#"set -eu
port=$1 system=$2
opts="-p $port -i {key} -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=yes -o UserKnownHostsFile={known} -o GlobalKnownHostsFile=/dev/null -o LogLevel=ERROR"
NIX_SSHOPTS="$opts" nix --extra-experimental-features nix-command copy --no-check-sigs --to ssh-ng://root@127.0.0.1 "$system"
ssh $opts root@127.0.0.1 "nix-env -p /nix/var/nix/profiles/system --set $system && $system/bin/switch-to-configuration switch" >/dev/null
"#,
            key = self.key.identity().display(),
            known = self.dir.join("known_hosts").display(),
        );
        std::fs::write(self.dir.join("deploy-host.sh"), script).unwrap();
    }

    /// The script deploys `system` to every machine, `jobs` at once; its time.
    fn script(&self, system: &str, jobs: usize) -> f64 {
        let ports: String = self
            .machines
            .iter()
            .map(|m| format!("{}\n", m.port))
            .collect();
        let started = Instant::now();
        let mut child = Command::new("xargs")
            .args(["-P", &jobs.to_string(), "-I{}", "sh"])
            .arg(self.dir.join("deploy-host.sh"))
            .args(["{}", system])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("xargs runs");
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(ports.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let seconds = started.elapsed().as_secs_f64();
        assert!(
            out.status.success(),
            "the script failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        self.all_run(system, "script");
        seconds
    }

    /// A system that locks the deployer out (its key removed) is activated `rounds` times on a
    /// machine of its own; each time, the seconds from its activation to the previous
    /// generation running again.
    fn rollback(&self, rounds: usize, payload_kib: u32) -> Vec<f64> {
        let m = Machine::start(&self.dir.join("machines"), "cutoff", self.key);
        let keys = m.root().join("etc/authorized_keys");
        let restore = format!("[ -f {k}.off ] && mv {k}.off {k}; true", k = keys.display());
        let lock = format!("mv {k} {k}.off", k = keys.display());
        let good = build_system(&self.dir, "fleet-reachable", payload_kib, &restore);
        let locked = build_system(&self.dir, "fleet-locked-out", payload_kib, &lock);
        let place = self.dir.join("rollback");
        self.write(
            &place,
            json!({"m": self.resource(&m, &good, CONFIRM_TIMEOUT)}),
        );
        super::timed(&self.capstan, &["apply", "--json"], &place);
        let mut seconds = Vec::new();
        for _ in 0..rounds {
            self.write(
                &place,
                json!({"m": self.resource(&m, &locked, CONFIRM_TIMEOUT)}),
            );
            let mut child = Command::new(&self.capstan)
                .args(["apply", "--json"])
                .current_dir(&place)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("capstan runs");
            let activated = wait_for(&m, &locked, Duration::from_secs(120));
            let back = wait_for(&m, &good, Duration::from_secs(CONFIRM_TIMEOUT + 120));
            let status = child.wait().unwrap();
            assert_eq!(status.code(), Some(1), "the locked-out system must fail");
            seconds.push((back - activated).as_secs_f64());
            self.write(
                &place,
                json!({"m": self.resource(&m, &good, CONFIRM_TIMEOUT)}),
            );
        }
        seconds
    }
}

/// Waits until `m` runs `system`; when.
fn wait_for(m: &Machine, system: &str, limit: Duration) -> Instant {
    let started = Instant::now();
    loop {
        if m.running() == system {
            return Instant::now();
        }
        assert!(
            started.elapsed() < limit,
            "{} did not come to run {system} within {} s",
            m.name,
            limit.as_secs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
