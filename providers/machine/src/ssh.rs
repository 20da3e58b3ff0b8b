//! OpenSSH, driven as a program: a host key pinned in a known-hosts file made for the
//! operation, one multiplexed connection per host (ControlMaster) for everything but the
//! confirmation, which must prove that a *new* connection still works.
//!
//! That new connection carries nothing secret (a claim on the activation, and what runs; no
//! agent, X11, GSSAPI credentials or port forwardings either, whatever the configuration
//! says), so when OpenSSH's own order would open it with `sntrup761x25519` (OpenSSH 8.9–9.8:
//! ~35 ms of the deployer's CPU per connection, and a fleet makes one per host) and neither
//! the user's nor the system's configuration chose the key exchanges, it puts
//! `curve25519-sha256` first. A configured `KexAlgorithms` is left as it is (one that lists
//! exactly OpenSSH's own order cannot be told from none), and so is OpenSSH 10's cheap
//! post-quantum `mlkem768x25519`. The master connection, which carries the closure and the
//! keys, keeps the configured order.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use capstan_provider::{LastLines, OperationError};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Where to connect: `user@host` and a port.
#[derive(Clone, Debug)]
pub(crate) struct Target {
    pub user: String,
    pub host: String,
    pub port: u16,
}

impl Target {
    pub(crate) fn parse(target: &str, port: u16) -> Result<Self, OperationError> {
        let (user, host) = match target.rsplit_once('@') {
            Some((user, host)) => (user.to_string(), host.to_string()),
            None => ("root".to_string(), target.to_string()),
        };
        let bad = |what: &str| {
            OperationError::invalid_input(format!(
                "input `target` ({target:?}): {what}; write it as `user@host` or `host` (user root)"
            ))
        };
        if host.is_empty() {
            return Err(bad("the host is empty"));
        }
        if user.is_empty() {
            return Err(bad("the user is empty"));
        }
        // Nothing ssh would read as an option, nothing a shell or a store URL would split.
        let fine = |s: &str| {
            !s.starts_with('-')
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-:[]%".contains(c))
        };
        if !fine(&host) || !fine(&user) {
            return Err(bad("it holds characters no user or host name has"));
        }
        if port == 0 {
            return Err(OperationError::invalid_input("input `port` is 0"));
        }
        Ok(Target {
            user,
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port,
        })
    }

    pub(crate) fn destination(&self) -> String {
        format!("{}@{}", self.user, self.host)
    }

    /// How the host is named in a known-hosts file.
    fn known_hosts_name(&self) -> String {
        if self.port == 22 {
            self.host.clone()
        } else {
            format!("[{}]:{}", self.host, self.port)
        }
    }

    /// `host:port`, for messages.
    pub(crate) fn shown(&self) -> String {
        format!("{}:{}", self.destination(), self.port)
    }
}

/// A pinned host key as a known-hosts line's key part (`ssh-ed25519 AAAA…`).
fn host_key(key: &str) -> Result<String, OperationError> {
    let mut words = key.split_whitespace();
    let (Some(kind), Some(blob)) = (words.next(), words.next()) else {
        return Err(OperationError::invalid_input(
            "input `hostKey` is not a public key: give the host's key as `ssh-ed25519 AAAA…` (the contents of /etc/ssh/ssh_host_ed25519_key.pub, or `ssh-keyscan HOST`)",
        ));
    };
    let blob_ok = blob
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "+/=".contains(c));
    if !(kind.starts_with("ssh-") || kind.starts_with("ecdsa-") || kind.starts_with("sk-"))
        || !blob_ok
    {
        return Err(OperationError::invalid_input(format!(
            "input `hostKey` (`{kind} …`) is not an OpenSSH public key: give it as `ssh-ed25519 AAAA…`"
        )));
    }
    Ok(format!("{kind} {blob}"))
}

/// One host's SSH: its known-hosts file and control socket (in a private directory made for
/// the operation), and the master connection once opened. Dropping it closes the connection.
pub(crate) struct Ssh {
    pub target: Target,
    dir: tempfile::TempDir,
    identity: Option<PathBuf>,
    master: Option<tokio::process::Child>,
    connect_timeout: u64,
    /// The key exchanges a connection of its own offers (`None`: as configured), found once.
    fresh_kex: tokio::sync::OnceCell<Option<String>>,
}

/// How long one connection attempt may take.
const CONNECT_TIMEOUT: u64 = 10;

impl Ssh {
    pub(crate) fn new(
        target: Target,
        pinned_key: &str,
        identity: Option<&str>,
    ) -> Result<Self, OperationError> {
        let key = host_key(pinned_key)?;
        // Short, private: a control socket's path must fit in 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("capstan-ssh-")
            .tempdir_in("/tmp")
            .map_err(|e| OperationError::permanent(format!("cannot make a directory: {e}")))?;
        let known = format!("{} {key}\n", target.known_hosts_name());
        std::fs::write(dir.path().join("known_hosts"), known)
            .map_err(|e| OperationError::permanent(format!("cannot write known_hosts: {e}")))?;
        let identity = identity.map(PathBuf::from);
        if let Some(path) = &identity {
            if !path.exists() {
                return Err(OperationError::invalid_input(format!(
                    "input `identity`: {} does not exist",
                    path.display()
                )));
            }
            if path.to_string_lossy().contains(char::is_whitespace) {
                return Err(OperationError::invalid_input(format!(
                    "input `identity` ({}) holds a space: Nix splits NIX_SSHOPTS at spaces, so copies could not use it; move the key",
                    path.display()
                )));
            }
        }
        Ok(Ssh {
            target,
            dir,
            identity,
            master: None,
            connect_timeout: CONNECT_TIMEOUT,
            fresh_kex: tokio::sync::OnceCell::new(),
        })
    }

    fn control_path(&self) -> PathBuf {
        self.dir.path().join("cm")
    }

    /// Options every connection uses: the pinned key and nothing else, no prompts.
    fn base_options(&self) -> Vec<String> {
        let mut options: Vec<String> = [
            "BatchMode=yes".to_string(),
            "StrictHostKeyChecking=yes".into(),
            format!(
                "UserKnownHostsFile={}",
                self.dir.path().join("known_hosts").display()
            ),
            "GlobalKnownHostsFile=/dev/null".into(),
            "UpdateHostKeys=no".into(),
            format!("ConnectTimeout={}", self.connect_timeout),
            "ServerAliveInterval=5".into(),
            "ServerAliveCountMax=3".into(),
            "LogLevel=ERROR".into(),
        ]
        .into_iter()
        .flat_map(|o| ["-o".to_string(), o])
        .collect();
        options.extend(["-p".to_string(), self.target.port.to_string()]);
        if let Some(identity) = &self.identity {
            options.extend([
                "-i".to_string(),
                identity.display().to_string(),
                "-o".into(),
                "IdentitiesOnly=yes".into(),
            ]);
        }
        options
    }

    /// Options of a command that goes through the master connection.
    fn multiplexed(&self) -> Vec<String> {
        let mut options = self.base_options();
        options.extend([
            "-o".to_string(),
            "ControlMaster=no".into(),
            "-o".into(),
            format!("ControlPath={}", self.control_path().display()),
        ]);
        options
    }

    /// `NIX_SSHOPTS` for Nix's own ssh (copies): through the master connection.
    pub(crate) fn nix_sshopts(&self) -> String {
        self.multiplexed().join(" ")
    }

    /// The Nix store URL of the host.
    pub(crate) fn store_url(&self) -> String {
        format!("ssh-ng://{}", self.target.destination())
    }

    /// Opens the master connection (waits until it is up, or says why it is not).
    pub(crate) async fn open(&mut self) -> Result<(), OperationError> {
        // An old master (a broken connection) is stopped first: exiting later, it would
        // remove the control socket the new one made.
        self.close().await;
        let _ = std::fs::remove_file(self.control_path());
        let mut command = tokio::process::Command::new("ssh");
        command
            .args(self.base_options())
            .args(["-o", "ControlMaster=yes", "-o"])
            .arg(format!("ControlPath={}", self.control_path().display()))
            .args(["-o", "ControlPersist=no", "-N"])
            .arg(self.target.destination())
            .stdin(Stdio::null());
        let mut master = capstan_provider::spawn_piped(&mut command).map_err(missing_ssh)?;
        let started = Instant::now();
        let deadline = Duration::from_secs(self.connect_timeout + 5);
        loop {
            // OpenSSH puts the control socket in place (a link made after `listen`) only
            // once the login succeeded: its presence means the master is up.
            if self.control_path().exists() {
                self.master = Some(master);
                return Ok(());
            }
            if let Ok(Some(status)) = master.try_wait() {
                let mut said = String::new();
                if let Some(mut stderr) = master.stderr.take() {
                    let _ = tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut said).await;
                }
                return Err(self.connect_error(&said, &status.to_string()));
            }
            if started.elapsed() > deadline {
                return Err(OperationError::transient(format!(
                    "cannot reach {}: no SSH connection within {} s",
                    self.target.shown(),
                    deadline.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Closes the master connection.
    pub(crate) async fn close(&mut self) {
        if let Some(mut master) = self.master.take() {
            let _ = master.start_kill();
            let _ = master.wait().await;
        }
    }

    /// What a failed connection means, from what ssh said.
    fn connect_error(&self, said: &str, status: &str) -> OperationError {
        let said = said.trim();
        let host = self.target.shown();
        if said.contains("Host key verification failed")
            || said.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
            || said.contains("No ED25519 host key is known")
            || said.contains("host key is known")
        {
            OperationError::permanent(format!(
                "{host} did not show the pinned host key (`hostKey`): refused. If the machine was reinstalled, check its new key out of band and update `hostKey`"
            ))
            .with_details(said.to_string())
        } else if said.contains("Permission denied") {
            OperationError::permanent(format!(
                "{host} refused the login (no key of ours is authorized for user `{}`): {said}",
                self.target.user
            ))
        } else {
            let why = if said.is_empty() {
                format!("ssh exited with {status}")
            } else {
                said.lines().last().unwrap_or(said).to_string()
            };
            OperationError::transient(format!("cannot reach {host}: {why}"))
        }
    }

    /// A command on the host through the master connection: `script` run by `sh -c` with
    /// `args` (every word quoted for the remote shell), as root with `sudo` when asked.
    pub(crate) fn command(
        &self,
        sudo: bool,
        script: &str,
        args: &[&str],
    ) -> tokio::process::Command {
        self.remote(self.multiplexed(), sudo, script, args)
    }

    /// Options of a connection of its own (not the master): it runs one short command and
    /// forwards nothing (no agent, X11, GSSAPI credentials or ports a configuration may ask
    /// for), so that nothing secret crosses it.
    fn own_connection(&self) -> Vec<String> {
        let mut options = self.base_options();
        for option in [
            "ControlMaster=no",
            "ControlPath=none",
            "ForwardAgent=no",
            "ForwardX11=no",
            "ClearAllForwardings=yes",
            "GSSAPIDelegateCredentials=no",
            "PermitLocalCommand=no",
        ] {
            options.extend(["-o".to_string(), option.to_string()]);
        }
        options
    }

    /// The same over a connection of its own (not the master): proof that a new login works.
    /// Only for what carries no secret: its key exchange may be the cheaper classical one
    /// (see the module's documentation).
    async fn fresh_command(
        &self,
        sudo: bool,
        script: &str,
        args: &[&str],
    ) -> tokio::process::Command {
        let mut options = self.own_connection();
        let kex = self
            .fresh_kex
            .get_or_init(|| async {
                let configured = kex_of(self.own_connection(), self.target.destination()).await?;
                let built_in = BUILT_IN_KEX
                    .get_or_init(|| {
                        kex_of(vec!["-F".into(), "/dev/null".into()], "localhost".into())
                    })
                    .await
                    .as_deref()?;
                classical_first(&configured, built_in)
            })
            .await;
        if let Some(kex) = kex {
            options.extend(["-o".to_string(), format!("KexAlgorithms={kex}")]);
        }
        self.remote(options, sudo, script, args)
    }

    fn remote(
        &self,
        options: Vec<String>,
        sudo: bool,
        script: &str,
        args: &[&str],
    ) -> tokio::process::Command {
        let mut remote = String::new();
        if sudo {
            remote.push_str("sudo -n ");
        }
        remote.push_str("sh -c ");
        remote.push_str(&quote(script));
        remote.push_str(" capstan");
        for arg in args {
            remote.push(' ');
            remote.push_str(&quote(arg));
        }
        let mut command = tokio::process::Command::new("ssh");
        command
            .args(options)
            .arg(self.target.destination())
            .arg("--")
            .arg(remote);
        command
    }

    /// Runs a short command through the master connection; its stdout, or why it failed.
    pub(crate) async fn output(
        &self,
        sudo: bool,
        script: &str,
        args: &[&str],
        stdin: Option<&[u8]>,
    ) -> Result<String, OperationError> {
        run(self.command(sudo, script, args), stdin, &self.target).await
    }

    /// The same over a new connection.
    pub(crate) async fn fresh_output(
        &self,
        sudo: bool,
        script: &str,
        args: &[&str],
    ) -> Result<String, OperationError> {
        run(
            self.fresh_command(sudo, script, args).await,
            None,
            &self.target,
        )
        .await
    }
}

/// OpenSSH's own key exchanges, in its order (no configuration read), once per process.
static BUILT_IN_KEX: tokio::sync::OnceCell<Option<String>> = tokio::sync::OnceCell::const_new();

/// The key exchanges `ssh` would offer `destination` with `options`, as `ssh -G` says (`None`
/// if it cannot say: an OpenSSH older than 6.8, or a configuration whose `Match exec` or
/// name lookups take longer than a confirmation should wait for an optional saving).
async fn kex_of(options: Vec<String>, destination: String) -> Option<String> {
    let asked = tokio::process::Command::new("ssh")
        .arg("-G")
        .args(options)
        .arg(destination)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(2), asked)
        .await
        .ok()?
        .ok()
        .filter(|out| out.status.success())?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|line| line.strip_prefix("kexalgorithms "))
        .map(|list| list.trim().to_string())
}

/// The key exchanges a connection that carries no secret offers: OpenSSH's own list with
/// `curve25519-sha256` first, when the configuration left that list as it is (`configured`
/// is `built_in`), it would begin with the costly `sntrup761x25519`, and it has
/// `curve25519-sha256` and no cheap post-quantum `mlkem*`; otherwise `None` (as configured).
/// A server without it agrees on the next one, as ever.
fn classical_first(configured: &str, built_in: &str) -> Option<String> {
    const CLASSICAL: &str = "curve25519-sha256";
    if configured != built_in
        || !built_in.starts_with("sntrup761x25519")
        || built_in.split(',').any(|k| k.starts_with("mlkem"))
    {
        return None;
    }
    let others: Vec<&str> = built_in.split(',').filter(|k| *k != CLASSICAL).collect();
    if others.len() == built_in.split(',').count() {
        return None;
    }
    Some(
        std::iter::once(CLASSICAL)
            .chain(others)
            .collect::<Vec<_>>()
            .join(","),
    )
}

impl Drop for Ssh {
    fn drop(&mut self) {
        if let Some(master) = &mut self.master {
            let _ = master.start_kill();
        }
    }
}

async fn run(
    mut command: tokio::process::Command,
    stdin: Option<&[u8]>,
    target: &Target,
) -> Result<String, OperationError> {
    command.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = capstan_provider::spawn_piped(&mut command).map_err(missing_ssh)?;
    let group = capstan_provider::ProcessGroupGuard::new(child.id());
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(data).await.map_err(|e| {
            OperationError::transient(format!("writing to ssh for {}: {e}", target.shown()))
        })?;
        drop(pipe);
    }
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let (out, err) = tokio::join!(read_all(stdout), read_lines(stderr));
    let status = child
        .wait()
        .await
        .map_err(|e| OperationError::permanent(format!("waiting for ssh: {e}")))?;
    group.disarm();
    if status.success() {
        return Ok(out);
    }
    let said = err.joined();
    if status.code() == Some(255) {
        return Err(OperationError::transient(format!(
            "the SSH connection to {} failed: {}",
            target.shown(),
            said.lines().last().unwrap_or("ssh exited with 255")
        ))
        .with_details(said));
    }
    Err(OperationError::permanent(format!(
        "a command on {} failed ({status}): {}",
        target.shown(),
        said.lines().last().unwrap_or("")
    ))
    .with_details(said))
}

async fn read_all(mut pipe: impl tokio::io::AsyncRead + Unpin) -> String {
    let mut bytes = Vec::new();
    let _ = tokio::io::AsyncReadExt::read_to_end(&mut pipe, &mut bytes).await;
    String::from_utf8_lossy(&bytes).into_owned()
}

async fn read_lines(pipe: impl tokio::io::AsyncRead + Unpin) -> LastLines {
    let mut lines = BufReader::new(pipe).lines();
    let mut tail = LastLines::default();
    while let Ok(Some(line)) = lines.next_line().await {
        tail.push(line);
    }
    tail
}

pub(crate) fn missing_ssh(e: std::io::Error) -> OperationError {
    if e.kind() == std::io::ErrorKind::NotFound {
        OperationError::permanent(
            "`ssh` is not installed or not on PATH; install OpenSSH (on Debian: apt-get install openssh-client)",
        )
    } else {
        OperationError::permanent(format!("cannot run ssh: {e}"))
    }
}

/// `word` quoted for a POSIX shell.
pub(crate) fn quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_read_and_odd_ones_refused() {
        let t = Target::parse("deploy@10.0.0.5", 2222).unwrap();
        assert_eq!(
            (t.user.as_str(), t.host.as_str(), t.port),
            ("deploy", "10.0.0.5", 2222)
        );
        assert_eq!(t.known_hosts_name(), "[10.0.0.5]:2222");
        assert_eq!(
            Target::parse("web1", 22).unwrap().destination(),
            "root@web1"
        );
        for bad in ["", "a@", "@b", "-oProxyCommand=x", "a b", "x;rm"] {
            assert!(Target::parse(bad, 22).is_err(), "{bad}");
        }
    }

    #[test]
    fn host_keys_must_look_like_keys() {
        assert_eq!(
            host_key("ssh-ed25519 AAAAC3Nza+/= comment").unwrap(),
            "ssh-ed25519 AAAAC3Nza+/="
        );
        assert!(host_key("").is_err());
        assert!(host_key("hello world").is_err());
        // Only the first two words are kept: a line break cannot reach the known-hosts file.
        assert_eq!(host_key("ssh-ed25519 AA\nevil").unwrap(), "ssh-ed25519 AA");
    }

    #[test]
    fn a_new_connection_prefers_the_classical_key_exchange_only_when_nothing_chose_one() {
        let openssh_9 = "sntrup761x25519-sha512@openssh.com,curve25519-sha256,curve25519-sha256@libssh.org,ecdh-sha2-nistp256";
        assert_eq!(
            classical_first(openssh_9, openssh_9).as_deref(),
            Some("curve25519-sha256,sntrup761x25519-sha512@openssh.com,curve25519-sha256@libssh.org,ecdh-sha2-nistp256")
        );
        // The user's or the system's configuration chose: as chosen.
        let post_quantum_only = "sntrup761x25519-sha512@openssh.com";
        assert_eq!(classical_first(post_quantum_only, openssh_9), None);
        let reordered = "curve25519-sha256,sntrup761x25519-sha512@openssh.com";
        assert_eq!(classical_first(reordered, openssh_9), None);
        // Already first (OpenSSH 8), or not offered at all: nothing to change.
        let openssh_8 = "curve25519-sha256,curve25519-sha256@libssh.org,ecdh-sha2-nistp256";
        assert_eq!(classical_first(openssh_8, openssh_8), None);
        // OpenSSH 10: the first is post-quantum and cheap; keep it.
        let openssh_10 = "mlkem768x25519-sha256,sntrup761x25519-sha512,sntrup761x25519-sha512@openssh.com,curve25519-sha256";
        assert_eq!(classical_first(openssh_10, openssh_10), None);
        // OpenSSH 9.9: sntrup761 first, but mlkem offered too; keep the order.
        let openssh_9_9 = "sntrup761x25519-sha512,mlkem768x25519-sha256,curve25519-sha256";
        assert_eq!(classical_first(openssh_9_9, openssh_9_9), None);
        let without = "sntrup761x25519-sha512@openssh.com,ecdh-sha2-nistp256";
        assert_eq!(classical_first(without, without), None);
        // A name that merely starts like it is not it.
        let lookalike = "sntrup761x25519-sha512@openssh.com,curve25519-sha256@libssh.org";
        assert_eq!(classical_first(lookalike, lookalike), None);
    }

    #[test]
    fn quoting_survives_quotes() {
        assert_eq!(quote("it's"), r"'it'\''s'");
    }
}
