//! The `machine` provider, built into `capstan`: NixOS machines over SSH.
//!
//! | type | inputs | outputs |
//! | --- | --- | --- |
//! | `nixos` | `target`, `port`, `hostKey`, `system`, `goal`, … (see [`MachineIn`]) | `system`, `generation`, `running`, `previous`, `keyPaths` |
//!
//! A deploy opens one SSH connection to the machine (OpenSSH's ControlMaster, the host key
//! pinned in a known-hosts file made for it) and reuses it for every step: build (a `.drv`,
//! here or on the machine), copy (`nix copy` to `ssh-ng://`, Nix's activity tree as
//! progress), keys (secrets over stdin into files outside the store), activation (detached on
//! the machine, its output line by line), confirmation over a *new* connection (magic
//! rollback: a watchdog on the machine rolls back unless it comes in time), health checks,
//! and a reboot when asked. A machine already running the system is not activated again.
//! Deleting the resource removes the keys it uploaded and leaves the system running.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use capstan_provider::{Operation, OperationError, Prior, Provider, Resource, ResourceType};

mod checks;
mod inputs;
mod remote;
mod ssh;

use inputs::{key_path, BuildOn, Goal, MachineIn, MachineOut};
use ssh::Ssh;

/// The provider, ready to serve.
pub fn provider() -> Provider {
    Provider::new("machine", env!("CARGO_PKG_VERSION")).resource(Nixos::default())
}

#[derive(Default)]
struct Nixos {
    /// The NAR size of every path of each system's closure, asked of the local store once
    /// per system (a fleet copies the same closure to many machines).
    closures: std::cell::RefCell<HashMap<String, std::rc::Rc<HashMap<String, u64>>>>,
}

/// From this size on, a copy asks the machine which paths it lacks so that its progress
/// counts bytes against a known total (one more command; a small copy counts paths only).
const COUNT_BYTES_FROM: u64 = 16 * 1024 * 1024;

/// What a machine runs, as [`remote::PROBE`] says.
#[derive(Debug, Default)]
struct Probe {
    /// The profile's generation link (`system-3-link`) and what it points at.
    profile_link: Option<String>,
    profile_target: Option<String>,
    running: Option<String>,
}

impl Probe {
    /// From what `remote::PROBE` printed.
    fn parse(out: &str) -> Probe {
        let mut probe = Probe::default();
        let some = |s: &str| (s != "-").then(|| s.to_string());
        for line in out.lines() {
            let words: Vec<&str> = line.split(' ').collect();
            match words.as_slice() {
                ["profile", link, target] => {
                    probe.profile_link = some(link);
                    probe.profile_target = some(target);
                }
                ["running", target] => probe.running = some(target),
                _ => {}
            }
        }
        probe
    }

    fn generation(&self) -> u64 {
        self.profile_link
            .as_deref()
            .and_then(|l| l.strip_suffix("-link")?.rsplit('-').next()?.parse().ok())
            .unwrap_or(0)
    }
}

async fn probe(ssh: &Ssh, profile: &str, sudo: bool) -> Result<Probe, OperationError> {
    let out = ssh.output(sudo, remote::PROBE, &[profile], None).await?;
    Ok(Probe::parse(&out))
}

/// Removes an activation's notes (`dir`) and probes, over one command.
async fn finish(ssh: &Ssh, profile: &str, sudo: bool, dir: &str) -> Result<Probe, OperationError> {
    let out = ssh
        .output(sudo, remote::FINISH, &[profile, dir], None)
        .await?;
    Ok(Probe::parse(&out))
}

/// A name for one activation's notes on the machine.
fn activation_dir() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    hasher.write_u32(std::process::id());
    format!("/run/capstan/{:016x}", hasher.finish())
}

/// How an activation went, as the machine told.
struct Activated {
    dir: String,
    generation: u64,
    /// What ran before.
    previous: String,
    /// The machine already ran the system: nothing was activated.
    already: bool,
    /// What the machine runs, when the confirmation asked (and removed the notes).
    finished: Option<Probe>,
}

impl Nixos {
    async fn deploy(
        &self,
        op: &Operation,
        inputs: &MachineIn,
        prior: Option<&MachineOut>,
    ) -> Result<MachineOut, OperationError> {
        let target = inputs.check()?;
        let mut ssh = Ssh::new(target, &inputs.host_key, inputs.identity.as_deref())?;
        op.phase("connecting").await;
        ssh.open().await?;
        let system = if inputs.system.ends_with(".drv") {
            op.phase("building").await;
            self.build(op, &ssh, inputs).await?
        } else {
            inputs.system.clone()
        };
        let key_paths = self.upload_keys(op, &ssh, inputs, prior).await?;
        // Built on the machine: it is there already (and not here). Copying what the
        // machine has is one question Nix asks it.
        if !(inputs.system.ends_with(".drv") && inputs.build_on == BuildOn::Target) {
            op.phase("copying").await;
            self.copy(op, &ssh, &system, inputs).await?;
        }
        // The activation itself finds a machine that already runs the system (switched by
        // hand, or by an interrupted run) and leaves it be.
        op.phase("activating").await;
        let mut done = self.activate(op, &mut ssh, inputs, &system).await?;
        if done.already {
            op.phase("already running").await;
            tracing::info!(system = %system, "the machine already runs this system: nothing to activate");
        }
        if inputs.reboot && !done.already {
            self.reboot(op, &mut ssh, inputs, &system).await?;
        }
        if !inputs.checks.is_empty() {
            op.phase("checking").await;
            let checked = checks::run(
                op,
                &ssh,
                &inputs.checks,
                Duration::from_secs(inputs.check_timeout),
                Duration::from_secs(inputs.check_interval),
            )
            .await;
            if let Err(failed) = checked {
                let error = self
                    .after_failed_checks(
                        op,
                        &ssh,
                        inputs,
                        &system,
                        Some(&done).filter(|d| !d.already),
                        failed,
                    )
                    .await;
                // The activation's notes go, whatever the checks led to.
                let _ = ssh
                    .output(inputs.sudo, remote::CLEAN, &[&done.dir], None)
                    .await;
                return Err(error);
            }
        }
        // What it runs now, and the activation's notes removed, in one command.
        let after = match done.finished.take() {
            Some(after) => after,
            None => finish(&ssh, &inputs.profile, inputs.sudo, &done.dir).await?,
        };
        ssh.close().await;
        Ok(MachineOut {
            generation: if done.generation > 0 {
                done.generation
            } else if inputs.goal.sets_profile() {
                after.generation()
            } else {
                0
            },
            running: after.running.unwrap_or_default(),
            previous: if done.already {
                prior.map(|p| p.previous.clone()).unwrap_or(done.previous)
            } else {
                done.previous
            },
            system,
            key_paths,
        })
    }

    /// Builds a `.drv`: here (or on Nix's remote builders), or on the machine.
    async fn build(
        &self,
        op: &Operation,
        ssh: &Ssh,
        inputs: &MachineIn,
    ) -> Result<String, OperationError> {
        match inputs.build_on {
            BuildOn::Local => {
                let mut command = tokio::process::Command::new("nix-store");
                command.args(["--realise", &inputs.system]).args([
                    "--log-format",
                    "internal-json",
                    "-v",
                ]);
                if let Some(builders) = &inputs.builders {
                    command.args(["--builders", builders]);
                }
                let printed =
                    capstan_provider_nix::run_nix_logged(op, command, "nix-store --realise")
                        .await?;
                first_path(printed, &inputs.system)
            }
            BuildOn::Target => {
                let mut command = nix_copy(ssh, inputs);
                command.args(["--derivation", &inputs.system]);
                capstan_provider_nix::run_nix_logged(op, command, "nix copy --derivation").await?;
                let mut realise =
                    ssh.command(false, r#"nix-store --realise "$1""#, &[&inputs.system]);
                realise.stdin(std::process::Stdio::null());
                let child =
                    capstan_provider::spawn_piped(&mut realise).map_err(ssh::missing_ssh)?;
                let output =
                    capstan_provider::stream_command(op, child, "the build on the machine").await?;
                if !output.status.success() {
                    return Err(OperationError::permanent(format!(
                        "building {} on {} failed ({})",
                        inputs.system,
                        ssh.target.shown(),
                        output.status
                    ))
                    .with_details(output.tail.join("\n")));
                }
                let printed = String::from_utf8_lossy(&output.stdout)
                    .lines()
                    .map(|l| l.trim().to_string())
                    .filter(|l| !l.is_empty())
                    .collect();
                first_path(printed, &inputs.system)
            }
        }
    }

    async fn copy(
        &self,
        op: &Operation,
        ssh: &Ssh,
        system: &str,
        inputs: &MachineIn,
    ) -> Result<(), OperationError> {
        let sizes = self.copy_sizes(ssh, system, inputs.sudo).await;
        let mut command = nix_copy(ssh, inputs);
        command.arg(system);
        capstan_provider_nix::run_nix_copy(op, command, sizes.as_ref())
            .await
            .map(drop)
    }

    /// For a large closure, what the copy will send: the NAR sizes of its paths (from the
    /// local store) and the sum over those the machine lacks. Best effort: `None` when small
    /// or when either store cannot say.
    async fn copy_sizes(
        &self,
        ssh: &Ssh,
        system: &str,
        sudo: bool,
    ) -> Option<capstan_provider_nix::CopySizes> {
        let cached = self.closures.borrow().get(system).cloned();
        let nar_size = match cached {
            Some(sizes) => sizes,
            None => {
                let sizes = std::rc::Rc::new(closure_sizes(system).await?);
                self.closures
                    .borrow_mut()
                    .insert(system.to_string(), sizes.clone());
                sizes
            }
        };
        if nar_size.values().sum::<u64>() < COUNT_BYTES_FROM {
            return None;
        }
        let paths: String = nar_size.keys().map(|p| format!("{p}\n")).collect();
        let missing = ssh
            .output(sudo, remote::INVALID, &[], Some(paths.as_bytes()))
            .await
            .map_err(|e| tracing::debug!("cannot ask which paths the machine lacks: {}", e.message))
            .ok()?;
        let expected_bytes = missing.lines().filter_map(|p| nar_size.get(p.trim())).sum();
        Some(capstan_provider_nix::CopySizes {
            nar_size,
            expected_bytes,
        })
    }

    /// Uploads the keys (and removes those the resource no longer has).
    async fn upload_keys(
        &self,
        op: &Operation,
        ssh: &Ssh,
        inputs: &MachineIn,
        prior: Option<&MachineOut>,
    ) -> Result<BTreeMap<String, String>, OperationError> {
        let mut paths = BTreeMap::new();
        if !inputs.keys.is_empty() {
            op.phase("keys").await;
        }
        for (name, key) in &inputs.keys {
            let path = key_path(name, key)?;
            let mode = format!("{:0>4}", key.mode.trim_start_matches("0o"));
            ssh.output(
                inputs.sudo,
                remote::UPLOAD_KEY,
                &[&path, &key.user, &key.group, &mode],
                Some(key.value.as_bytes()),
            )
            .await
            .map_err(|e| {
                OperationError::new(e.kind, format!("uploading key `{name}`: {}", e.message))
            })?;
            tracing::info!(key = %name, path = %path, "key uploaded");
            paths.insert(name.clone(), path);
        }
        let stale: Vec<&str> = prior
            .map(|p| {
                p.key_paths
                    .values()
                    .filter(|old| !paths.values().any(|new| new == *old))
                    .map(String::as_str)
                    .collect()
            })
            .unwrap_or_default();
        if !stale.is_empty() {
            ssh.output(inputs.sudo, remote::REMOVE_KEYS, &stale, None)
                .await?;
        }
        Ok(paths)
    }

    /// Activates on the machine (detached there), and confirms over a new connection when
    /// the goal changes what runs now.
    async fn activate(
        &self,
        op: &Operation,
        ssh: &mut Ssh,
        inputs: &MachineIn,
        system: &str,
    ) -> Result<Activated, OperationError> {
        let dir = activation_dir();
        let confirm = inputs.confirm_timeout > 0 && inputs.goal.activates_now();
        let timeout = inputs.confirm_timeout.to_string();
        let launcher = remote::launcher();
        let mut command = ssh.command(
            inputs.sudo,
            &launcher,
            &[
                &inputs.profile,
                system,
                inputs.goal.as_str(),
                &dir,
                if confirm { "1" } else { "0" },
                &timeout,
            ],
        );
        command.stdin(std::process::Stdio::null());
        let child = capstan_provider::spawn_piped(&mut command).map_err(ssh::missing_ssh)?;
        let output = stream_activation(op, child).await?;
        let generation = output.generation;
        let previous = output.previous.clone();
        let host = ssh.target.shown();
        let details = output.tail.join("\n");
        match output.status.code() {
            Some(0) => {}
            Some(3) if inputs.goal == Goal::DryActivate => {
                return Err(OperationError::permanent(format!(
                    "the dry activation of {system} on {host} failed (nothing was changed)"
                ))
                .with_details(details));
            }
            Some(3) => {
                let back = if previous.is_empty() {
                    "the profile was reset".to_string()
                } else {
                    format!("it runs {previous} again")
                };
                return Err(OperationError::permanent(format!(
                    "`switch-to-configuration {}` of {system} failed on {host}, so it was rolled back: {back}",
                    inputs.goal.as_str()
                ))
                .with_details(details));
            }
            Some(2) => {
                return Err(OperationError::permanent(format!(
                    "{host}: nix-env could not point {} at {system} (is the SSH user root, or `sudo` set?)",
                    inputs.profile
                ))
                .with_details(details));
            }
            Some(255) => {
                // The connection broke while the activation ran (it goes on, detached): ask
                // over a new connection how it ended.
                tracing::warn!("the connection broke during the activation; asking how it ended");
                let outcome = ssh
                    .fresh_output(inputs.sudo, remote::OUTCOME, &[&dir])
                    .await
                    .unwrap_or_default();
                if outcome.lines().next().map(str::trim) != Some("0") {
                    return Err(OperationError::permanent(format!(
                        "the SSH connection to {host} broke during the activation of {system}, and how it ended is unknown ({}); run `capstan apply --refresh` to see what the machine runs",
                        outcome.lines().next().unwrap_or("no answer over a new connection")
                    ))
                    .with_details(details));
                }
                let _ = ssh.open().await;
            }
            _ => {
                return Err(OperationError::permanent(format!(
                    "the activation on {host} failed ({}): {}",
                    output.status,
                    output.tail.last().cloned().unwrap_or_default()
                ))
                .with_details(details));
            }
        }
        let mut finished = None;
        if confirm && !output.already {
            op.phase("confirming").await;
            finished = self
                .confirm(op, ssh, inputs, system, &dir, &previous)
                .await?;
        }
        Ok(Activated {
            dir,
            generation,
            previous,
            already: output.already,
            finished,
        })
    }

    /// Confirms the activation over a new connection before the machine's watchdog rolls it
    /// back; if none gets through, waits for the rollback and says so.
    async fn confirm(
        &self,
        op: &Operation,
        ssh: &Ssh,
        inputs: &MachineIn,
        system: &str,
        dir: &str,
        previous: &str,
    ) -> Result<Option<Probe>, OperationError> {
        // With nothing to do after it, the confirmation also says what runs and removes the
        // activation's notes: one command fewer.
        let finish = inputs.checks.is_empty() && !inputs.reboot;
        let timeout = Duration::from_secs(inputs.confirm_timeout);
        let started = Instant::now();
        let host = ssh.target.shown();
        let mut last = String::new();
        while started.elapsed() < timeout {
            let finish = if finish { "1" } else { "0" };
            match ssh
                .fresh_output(
                    inputs.sudo,
                    remote::CONFIRM,
                    &[dir, &inputs.profile, finish],
                )
                .await
            {
                Ok(out) if out.lines().next() == Some("confirmed") => {
                    tracing::info!("confirmed over a new SSH connection");
                    return Ok((finish == "1").then(|| Probe::parse(&out)));
                }
                Ok(out) => {
                    last = format!(
                        "the machine's watchdog had already rolled back ({})",
                        out.trim()
                    );
                    break;
                }
                Err(e) => {
                    last = e.message;
                    tracing::warn!("no confirmation yet: {last}");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = op.cancelled() => return Err(OperationError::cancelled("the confirmation was cancelled (the machine rolls back by itself)")),
            }
        }
        // The watchdog rolls back at its deadline; wait for it, then look.
        op.phase("waiting for the rollback").await;
        let deadline = timeout + ROLLBACK_GRACE;
        loop {
            if let Ok(outcome) = ssh.fresh_output(inputs.sudo, remote::OUTCOME, &[dir]).await {
                let why: Vec<&str> = outcome.lines().skip(1).collect();
                if !why.is_empty() {
                    let now = ssh
                        .fresh_output(inputs.sudo, remote::PROBE, &[&inputs.profile])
                        .await
                        .ok()
                        .and_then(|p| {
                            p.lines()
                                .find_map(|l| l.strip_prefix("running ").map(str::to_string))
                        })
                        .unwrap_or_else(|| previous.to_string());
                    return Err(OperationError::permanent(format!(
                        "{host} rolled {system} back by itself: {} (the last attempt: {last}); it runs {now} again",
                        why.join(" ")
                    )));
                }
            }
            if started.elapsed() > deadline {
                return Err(OperationError::permanent(format!(
                    "{system} was not confirmed on {host} over a new SSH connection within {} s ({last}), and the machine cannot be reached since: whether it rolled back is unknown",
                    timeout.as_secs()
                )));
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = op.cancelled() => return Err(OperationError::cancelled("waiting for the rollback was cancelled")),
            }
        }
    }

    /// Reboots, waits until the machine is back over SSH, and checks it runs `system`.
    async fn reboot(
        &self,
        op: &Operation,
        ssh: &mut Ssh,
        inputs: &MachineIn,
        system: &str,
    ) -> Result<(), OperationError> {
        op.phase("rebooting").await;
        let host = ssh.target.shown();
        let boot_id = |out: &str| out.trim().to_string();
        let before = ssh
            .output(false, "cat /proc/sys/kernel/random/boot_id", &[], None)
            .await
            .map(|out| boot_id(&out))
            .unwrap_or_default();
        ssh.output(inputs.sudo, remote::REBOOT, &[&inputs.reboot_command], None)
            .await?;
        ssh.close().await;
        let started = Instant::now();
        let limit = Duration::from_secs(inputs.reboot_timeout);
        // Down first (or up with another boot id), then up.
        let mut went_down = false;
        loop {
            let answer = ssh
                .fresh_output(false, "cat /proc/sys/kernel/random/boot_id", &[])
                .await;
            match answer {
                Ok(id) if went_down || (!before.is_empty() && boot_id(&id) != before) => break,
                Ok(_) => {}
                Err(_) => went_down = true,
            }
            if started.elapsed() > limit {
                return Err(OperationError::permanent(format!(
                    "{host} {} within {} s of `{}`",
                    if went_down {
                        "did not come back"
                    } else {
                        "did not go down"
                    },
                    limit.as_secs(),
                    inputs.reboot_command
                )));
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(250)) => {}
                () = op.cancelled() => return Err(OperationError::cancelled("waiting for the reboot was cancelled")),
            }
        }
        tracing::info!("back after {:.1} s", started.elapsed().as_secs_f64());
        ssh.open().await?;
        let now = probe(ssh, &inputs.profile, inputs.sudo).await?;
        if now.running.as_deref() != Some(system) {
            return Err(OperationError::permanent(format!(
                "after the reboot {host} runs {}, not {system}: the boot loader did not start the new generation",
                now.running.as_deref().unwrap_or("no system")
            )));
        }
        Ok(())
    }

    /// A health check failed: roll back if asked (and if this run activated something).
    async fn after_failed_checks(
        &self,
        op: &Operation,
        ssh: &Ssh,
        inputs: &MachineIn,
        system: &str,
        activated: Option<&Activated>,
        failed: OperationError,
    ) -> OperationError {
        let host = ssh.target.shown();
        let Some(done) = activated.filter(|_| inputs.rollback_on_failure) else {
            return OperationError::permanent(format!("{host}: {}", failed.message));
        };
        op.phase("rolling back").await;
        let why = format!("a health check failed: {}", failed.message);
        let rolled = ssh
            .output(
                inputs.sudo,
                remote::ROLLBACK,
                &[
                    &inputs.profile,
                    system,
                    inputs.goal.as_str(),
                    &done.dir,
                    &why,
                ],
                None,
            )
            .await;
        match rolled {
            Ok(_) => {
                let now = probe(ssh, &inputs.profile, inputs.sudo)
                    .await
                    .ok()
                    .and_then(|p| p.running)
                    .unwrap_or_default();
                OperationError::permanent(format!(
                    "{host}: {}; {system} was rolled back, it runs {now} again",
                    failed.message
                ))
            }
            Err(e) => OperationError::permanent(format!(
                "{host}: {}; rolling back failed too: {}",
                failed.message, e.message
            )),
        }
    }
}

/// What the activation said: its exit status, its last lines, and its notes (`@capstan KEY
/// VALUE` lines on stdout, which become events instead of log lines).
struct ActivationOutput {
    status: std::process::ExitStatus,
    tail: Vec<String>,
    generation: u64,
    previous: String,
    /// The machine already ran the system, so nothing was activated.
    already: bool,
}

/// Follows the activation's output: every line to the operation's log as it arrives, except
/// the notes of Capstan's own script on the machine.
async fn stream_activation(
    op: &Operation,
    mut child: tokio::process::Child,
) -> Result<ActivationOutput, OperationError> {
    use capstan_provider::LogStream;
    let group = capstan_provider::ProcessGroupGuard::new(child.id());
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().expect("stdout is piped"));
    let mut stderr = tokio::io::BufReader::new(child.stderr.take().expect("stderr is piped"));
    let (mut out_buffer, mut err_buffer) = (Vec::new(), Vec::new());
    let (mut out_open, mut err_open) = (true, true);
    let mut tail = capstan_provider::LastLines::default();
    let (mut generation, mut previous, mut already) = (0, String::new(), false);
    while out_open || err_open {
        let (stream, line) = tokio::select! {
            line = capstan_provider::read_line_lossy(&mut stdout, &mut out_buffer), if out_open => (LogStream::Stdout, line),
            line = capstan_provider::read_line_lossy(&mut stderr, &mut err_buffer), if err_open => (LogStream::Stderr, line),
            () = op.cancelled() => return Err(OperationError::cancelled("the activation was cancelled (it goes on on the machine, which rolls back unless it is confirmed)")),
        };
        let Ok(Some(line)) = line else {
            match stream {
                LogStream::Stdout => out_open = false,
                _ => err_open = false,
            }
            continue;
        };
        let Some(note) = line.strip_prefix("@capstan ") else {
            tail.push(line.clone());
            op.log(stream, line).await;
            continue;
        };
        let (key, value) = note.split_once(' ').unwrap_or((note, ""));
        match key {
            "previous" => {
                previous = value.trim().to_string();
                if !previous.is_empty() {
                    tracing::info!(system = %previous, "it ran this before");
                }
            }
            "generation" => {
                generation = value.trim().parse().unwrap_or(0);
                tracing::info!(generation, "the profile's new generation");
            }
            "already" => already = true,
            "waiting" => {
                tracing::info!(
                    "it rolls back unless confirmed over a new SSH connection within {value} s"
                )
            }
            "rollback" => {
                tail.push(format!("rolling back: {value}"));
                tracing::warn!("rolling back: {value}");
            }
            _ => {
                tail.push(value.to_string());
                tracing::error!("{value}");
            }
        }
    }
    let status = child
        .wait()
        .await
        .map_err(|e| OperationError::permanent(format!("waiting for ssh: {e}")))?;
    group.disarm();
    Ok(ActivationOutput {
        status,
        tail: tail.into_vec(),
        generation,
        previous,
        already,
    })
}

/// How long after its deadline the watchdog's rollback may take before the machine counts as
/// lost.
const ROLLBACK_GRACE: Duration = Duration::from_secs(60);

/// The NAR size of every path in `system`'s closure, from the local store.
async fn closure_sizes(system: &str) -> Option<HashMap<String, u64>> {
    let out = tokio::process::Command::new("nix")
        .args([
            "--extra-experimental-features",
            "nix-command",
            "path-info",
            "--json",
            "-r",
        ])
        .arg(system)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .ok()
        .filter(|o| o.status.success())?;
    // Nix before 2.19 prints a list of objects with a `path`; later ones an object keyed by
    // path.
    let infos: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let size = |i: &serde_json::Value| i["narSize"].as_u64();
    match infos {
        serde_json::Value::Array(list) => Some(
            list.iter()
                .filter_map(|i| Some((i["path"].as_str()?.to_string(), size(i)?)))
                .collect(),
        ),
        serde_json::Value::Object(map) => Some(
            map.iter()
                .filter_map(|(path, i)| Some((path.clone(), size(i)?)))
                .collect(),
        ),
        _ => None,
    }
}

/// `nix copy` to the machine over the master connection, its activities as JSON.
fn nix_copy(ssh: &Ssh, inputs: &MachineIn) -> tokio::process::Command {
    let mut command = tokio::process::Command::new("nix");
    command
        .args(["--extra-experimental-features", "nix-command", "copy"])
        .args(["--to", &ssh.store_url()])
        .args(["--log-format", "internal-json", "-v"])
        .env("NIX_SSHOPTS", ssh.nix_sshopts());
    if inputs.substitute_on_destination {
        command.arg("--substitute-on-destination");
    }
    if !inputs.check_sigs {
        command.arg("--no-check-sigs");
    }
    command
}

fn first_path(printed: Vec<String>, drv: &str) -> Result<String, OperationError> {
    printed
        .into_iter()
        .find(|l| l.starts_with('/'))
        .ok_or_else(|| OperationError::permanent(format!("building {drv} printed no store path")))
}

impl Resource for Nixos {
    type Inputs = MachineIn;
    type Outputs = MachineOut;

    fn resource_type() -> ResourceType {
        let mut t = ResourceType::new("nixos")
            .description("A NixOS machine over SSH: its system copied, activated, confirmed over a new connection (else rolled back), checked; keys uploaded")
            .inputs_from::<MachineIn>()
            .outputs_from::<MachineOut>()
            .sensitive("keys")
            .stateful(true)
            .read_checks(true);
        for output in ["system", "generation", "running", "previous", "keyPaths"] {
            t = t.public(output);
        }
        t
    }

    fn validate(&self, inputs: &MachineIn) -> Result<(), OperationError> {
        inputs.check().map(drop)
    }

    async fn create(
        &self,
        op: &Operation,
        inputs: MachineIn,
    ) -> Result<MachineOut, OperationError> {
        self.deploy(op, &inputs, None).await
    }

    async fn update(
        &self,
        op: &Operation,
        prior: Prior<MachineIn, MachineOut>,
        inputs: MachineIn,
    ) -> Result<MachineOut, OperationError> {
        self.deploy(op, &inputs, Some(&prior.outputs)).await
    }

    /// What the machine runs now: a system switched by hand shows as a change.
    async fn read(
        &self,
        _op: &Operation,
        prior: Prior<MachineIn, MachineOut>,
    ) -> Result<MachineOut, OperationError> {
        let inputs = prior.inputs;
        let target = inputs.check()?;
        let mut ssh = Ssh::new(target, &inputs.host_key, inputs.identity.as_deref())?;
        ssh.open().await?;
        let now = probe(&ssh, &inputs.profile, inputs.sudo).await?;
        ssh.close().await;
        let mut outputs = prior.outputs;
        match inputs.goal {
            Goal::Switch => {
                outputs.system = now.profile_target.clone().unwrap_or_default();
                outputs.generation = now.generation();
                outputs.running = now.running.unwrap_or_default();
            }
            Goal::Boot => {
                outputs.system = now.profile_target.clone().unwrap_or_default();
                outputs.generation = now.generation();
            }
            Goal::Test => outputs.running = now.running.unwrap_or_default(),
            Goal::DryActivate => {}
        }
        Ok(outputs)
    }

    /// What an interrupted deploy left: the machine has the system, or not.
    async fn find(&self, _op: &Operation, inputs: MachineIn) -> Result<MachineOut, OperationError> {
        let target = inputs.check()?;
        let mut ssh = Ssh::new(target, &inputs.host_key, inputs.identity.as_deref())?;
        ssh.open().await?;
        let now = probe(&ssh, &inputs.profile, inputs.sudo).await?;
        ssh.close().await;
        let has = match inputs.goal {
            Goal::Switch => {
                now.running.as_deref() == Some(&inputs.system)
                    && now.profile_target.as_deref() == Some(&inputs.system)
            }
            Goal::Boot => now.profile_target.as_deref() == Some(&inputs.system),
            Goal::Test => now.running.as_deref() == Some(&inputs.system),
            Goal::DryActivate => false,
        };
        if !has {
            return Err(OperationError::not_found(format!(
                "{} does not run {}",
                inputs.target, inputs.system
            )));
        }
        // Keys are uploaded again by the next deploy: none are known to be there.
        Ok(MachineOut {
            system: inputs.system.clone(),
            generation: if inputs.goal.sets_profile() {
                now.generation()
            } else {
                0
            },
            running: now.running.unwrap_or_default(),
            previous: String::new(),
            key_paths: BTreeMap::new(),
        })
    }

    /// Removes the keys it uploaded; the machine keeps running its system.
    async fn delete(
        &self,
        _op: &Operation,
        prior: Prior<MachineIn, MachineOut>,
    ) -> Result<(), OperationError> {
        if prior.outputs.key_paths.is_empty() {
            return Ok(());
        }
        let inputs = prior.inputs;
        let target = inputs.check()?;
        let mut ssh = Ssh::new(target, &inputs.host_key, inputs.identity.as_deref())?;
        ssh.open().await?;
        let paths: Vec<&str> = prior
            .outputs
            .key_paths
            .values()
            .map(String::as_str)
            .collect();
        ssh.output(inputs.sudo, remote::REMOVE_KEYS, &paths, None)
            .await?;
        ssh.close().await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_numbers_come_from_the_profile_link() {
        let probe = Probe {
            profile_link: Some("system-12-link".into()),
            ..Probe::default()
        };
        assert_eq!(probe.generation(), 12);
        assert_eq!(Probe::default().generation(), 0);
    }
}
