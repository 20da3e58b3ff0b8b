//! Machines to deploy to, for tests and benchmarks: real OpenSSH servers (Debian's
//! `openssh-server`) on loopback ports, each in a mount namespace of its own with a private
//! `/nix` (its own Nix store and profiles), a private `/run` and an empty home for root
//! (not this computer's shell start-up files), its own host key and one
//! authorized key. A "reboot" is its sshd killed with every session and started again by the
//! supervisor loop that runs it. Needs root (for the mount namespace).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The key the deployer logs in with (shared by every machine of a test).
pub struct ClientKey {
    dir: PathBuf,
}

impl ClientKey {
    /// A new ed25519 key in `dir`.
    pub fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let status = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(dir.join("id"))
            .status()
            .expect("ssh-keygen runs");
        assert!(status.success());
        ClientKey {
            dir: dir.to_path_buf(),
        }
    }

    /// The private key file.
    pub fn identity(&self) -> PathBuf {
        self.dir.join("id")
    }

    fn public(&self) -> String {
        std::fs::read_to_string(self.dir.join("id.pub")).unwrap()
    }
}

/// One machine: an sshd in its own mount namespace, stopped (with everything it started)
/// when dropped.
pub struct Machine {
    pub name: String,
    pub port: u16,
    root: PathBuf,
    supervisor: Child,
}

/// Whether machines can be started here (root, `sshd`, `unshare`); if not, why.
pub fn unavailable() -> Option<String> {
    if !Path::new("/usr/sbin/sshd").exists() {
        return Some(
            "sshd is not installed: install it with `apt-get install -y openssh-server`".into(),
        );
    }
    if !crate::is_root() {
        return Some("the machine tests need root (a mount namespace per machine)".into());
    }
    None
}

/// A free loopback port (the kernel's choice; free a moment later, in practice).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Machine {
    /// Starts machine `name` under `dir`, accepting `key`.
    pub fn start(dir: &Path, name: &str, key: &ClientKey) -> Machine {
        Machine::start_configured(dir, name, key, "")
    }

    /// [`start`](Self::start), with `sshd_lines` first in its sshd's configuration (sshd
    /// keeps the first value it reads of each setting, so these win).
    pub fn start_configured(dir: &Path, name: &str, key: &ClientKey, sshd_lines: &str) -> Machine {
        let root = dir.join(name);
        for sub in ["nix", "etc", "etc-nix"] {
            std::fs::create_dir_all(root.join(sub)).unwrap();
        }
        // Nix's settings of its own: builds as root, without the build users (nixbld1, …)
        // that this computer's Nix uses too. Two stores handing out the same build user at
        // once kill each other's builds (Nix kills every process of a build user it takes).
        std::fs::write(
            root.join("etc-nix/nix.conf"),
            "sandbox = false\nbuild-users-group =\n",
        )
        .unwrap();
        let status = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(root.join("etc/host_key"))
            .status()
            .unwrap();
        assert!(status.success());
        std::fs::write(root.join("etc/authorized_keys"), key.public()).unwrap();
        let port = free_port();
        let config = format!(
            "{sshd_lines}Port {port}\nListenAddress 127.0.0.1\nHostKey {etc}/host_key\nAuthorizedKeysFile {etc}/authorized_keys\nPidFile {etc}/sshd.pid\nStrictModes no\nPermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nLogLevel VERBOSE\nMaxStartups 100\nMaxSessions 100\n",
            etc = root.join("etc").display()
        );
        std::fs::write(root.join("etc/sshd_config"), config).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(root.join("etc"), std::fs::Permissions::from_mode(0o700)).unwrap();
        // The supervisor: private mounts, then sshd again and again until told to stop (a
        // "reboot" kills sshd; the loop brings it back a moment later).
        let script = format!(
            r#"set -u
mount --make-rprivate /
mount --bind {root}/nix /nix
mount --bind {root}/etc-nix /etc/nix
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /root
mkdir -p /run/sshd
while [ ! -e {root}/stop ]; do
  /usr/sbin/sshd -D -f {root}/etc/sshd_config -E {root}/sshd.log
  [ -e {root}/stop ] && break
  sleep 1
done
"#,
            root = root.display()
        );
        let supervisor = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("unshare runs");
        let machine = Machine {
            name: name.to_string(),
            port,
            root,
            supervisor,
        };
        machine.wait_listening();
        machine
    }

    fn wait_listening(&self) {
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "machine {}: sshd does not listen on port {}",
                self.name,
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its host key, as `hostKey` takes it.
    pub fn host_key(&self) -> String {
        let text = std::fs::read_to_string(self.root.join("etc/host_key.pub")).unwrap();
        let mut words = text.split_whitespace();
        format!("{} {}", words.next().unwrap(), words.next().unwrap())
    }

    /// How many logins sshd accepted so far.
    pub fn logins(&self) -> usize {
        std::fs::read_to_string(self.root.join("sshd.log"))
            .unwrap_or_default()
            .matches("Accepted publickey")
            .count()
    }

    /// Its sshd's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.join("sshd.log")).unwrap_or_default()
    }

    /// Runs `script` inside the machine (its mounts), as root; its stdout.
    pub fn run(&self, script: &str) -> String {
        let out = Command::new("nsenter")
            .args([
                "-t",
                &self.supervisor.id().to_string(),
                "-m",
                "sh",
                "-c",
                script,
            ])
            .output()
            .expect("nsenter runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Processes of Capstan's still running on the machine (an activation, a watchdog).
    pub fn capstan_processes(&self) -> Vec<String> {
        let Ok(ours) = std::fs::read_link(format!("/proc/{}/ns/mnt", self.supervisor.id())) else {
            return Vec::new();
        };
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            if std::fs::read_link(entry.path().join("ns/mnt"))
                .ok()
                .as_ref()
                != Some(&ours)
            {
                continue;
            }
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains("/run/capstan/") {
                found.push(cmdline);
            }
        }
        found
    }

    /// What `/run/current-system` points at.
    pub fn running(&self) -> String {
        self.run("[ -L /run/current-system ] && readlink -f /run/current-system")
            .trim()
            .to_string()
    }

    /// What the system profile points at.
    pub fn profile(&self) -> String {
        self.run("[ -L /nix/var/nix/profiles/system ] && readlink -f /nix/var/nix/profiles/system")
            .trim()
            .to_string()
    }

    /// A shell command that "reboots" this machine: the profile's system becomes the running
    /// one, and sshd dies with every session (the supervisor starts it again).
    pub fn reboot_command(&self) -> String {
        let pid = self.root.join("etc/sshd.pid");
        format!(
            "ln -sfn \"$(readlink -f /nix/var/nix/profiles/system)\" /run/current-system; p=$(cat {pid}); pkill -P \"$p\"; kill \"$p\"",
            pid = pid.display()
        )
    }

    /// The directory of its files (sshd config, log).
    pub fn root(&self) -> &Path {
        &self.root
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        let ours = std::fs::read_link(format!("/proc/{}/ns/mnt", self.supervisor.id())).ok();
        let _ = std::fs::write(self.root.join("stop"), "");
        if let Ok(pid) = std::fs::read_to_string(self.root.join("etc/sshd.pid")) {
            let pid = pid.trim();
            let _ = Command::new("pkill").args(["-P", pid]).status();
            let _ = Command::new("kill").arg(pid).status();
        }
        let _ = self.supervisor.kill();
        let _ = self.supervisor.wait();
        // What the machine's sessions left running (a watchdog, say): everything in its
        // mount namespace.
        if let (Ok(entries), Some(ours)) = (std::fs::read_dir("/proc"), ours) {
            for entry in entries.flatten() {
                let ns = std::fs::read_link(entry.path().join("ns/mnt")).ok();
                if ns.as_ref() == Some(&ours) {
                    let _ = Command::new("kill")
                        .args(["-9", &entry.file_name().to_string_lossy()])
                        .status();
                }
            }
        }
    }
}

/// A "system" without nixpkgs: a derivation whose `bin/switch-to-configuration` records the
/// goal and points `/run/current-system` at itself, with `payload_kib` of random bytes so the
/// closure has a real size. `activate` is extra shell run by the activation (a failing
/// command makes it fail). Built by the real `nix-build`; returns its store path.
pub fn build_system(dir: &Path, name: &str, payload_kib: u32, activate: &str) -> String {
    let file = system_expression(dir, name, payload_kib, activate);
    let out = Command::new("nix-build")
        .args(["--option", "substituters", "", "--no-out-link"])
        .arg(&file)
        .output()
        .expect("nix-build runs");
    assert!(
        out.status.success(),
        "building {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The same system's derivation, not built: its `.drv` path.
pub fn instantiate_system(dir: &Path, name: &str, payload_kib: u32, activate: &str) -> String {
    let file = system_expression(dir, name, payload_kib, activate);
    let out = Command::new("nix-instantiate")
        .arg(&file)
        .output()
        .expect("nix-instantiate runs");
    assert!(
        out.status.success(),
        "instantiating {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn system_expression(dir: &Path, name: &str, payload_kib: u32, activate: &str) -> PathBuf {
    let file = dir.join(format!("{name}.nix"));
    let expr = format!(
        r#"builtins.derivation {{
  name = "{name}";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  PATH = "/usr/bin:/bin";
  activate = {activate:?};
  args = [ "-c" ''
    mkdir -p $out/bin
    head -c {bytes} /dev/urandom > $out/payload
    {{
      echo '#!/bin/sh'
      echo 'echo "activating {name} ($1)"'
      printf '%s\n' "$activate"
      echo 'if [ "$1" = switch ] || [ "$1" = test ]; then mkdir -p /run; ln -sfn '$out' /run/current-system; fi'
      echo 'echo "{name} is active"'
    }} > $out/bin/switch-to-configuration
    chmod +x $out/bin/switch-to-configuration
  '' ];
}}
"#,
        bytes = u64::from(payload_kib) * 1024,
    )
    .replace("${", "\\${");
    std::fs::write(&file, expr).unwrap();
    file
}
