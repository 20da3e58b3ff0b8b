//! Child processes that die with their parent, and the process and file-lock calls Capstan
//! makes beyond std (signals to a process or a group, who we are, an exclusive `flock`): one
//! place, through `rustix`, so the crates that use them need no `unsafe` and no raw `libc`.
//!
//! A command that Capstan starts for a run (a Nix evaluation, a Terraform provider) must not
//! outlive the process that started it, even one killed with SIGKILL, which runs no cleanup:
//! the kernel's parent-death signal does that. Each such child also gets a process group of
//! its own, so a Ctrl-C at the terminal reaches Capstan alone, which decides how to stop it.
//!
//! ```no_run
//! let mut command = tokio::process::Command::new("sleep");
//! command.arg("60");
//! capstan_process::dies_with_parent(&mut command);
//! let child = command.spawn()?;
//! # Ok::<(), std::io::Error>(())
//! ```

use std::os::fd::AsFd;

pub use rustix::process::Signal;
use rustix::process::{set_parent_process_death_signal, Pid};

/// Makes `command`'s child get SIGKILL when the thread that spawned it ends (its parent
/// died), puts it in a process group of its own, and kills it when its `Child` is dropped.
pub fn dies_with_parent(command: &mut tokio::process::Command) -> &mut tokio::process::Command {
    command.process_group(0).kill_on_drop(true);
    // SAFETY: the closure runs between fork and exec and makes one system call (`prctl`),
    // which is async-signal-safe; it allocates nothing and takes no lock.
    unsafe {
        command.pre_exec(|| {
            set_parent_process_death_signal(Some(Signal::KILL)).map_err(std::io::Error::from)
        });
    }
    command
}

/// As [`dies_with_parent`], but in a session of its own instead of a process group (which
/// also leaves the terminal: it can neither read from it nor stop on it): everything the child
/// starts stays in that session, which can then be killed as one.
pub fn dies_with_parent_in_session(
    command: &mut tokio::process::Command,
) -> &mut tokio::process::Command {
    command.kill_on_drop(true);
    // SAFETY: the closure runs between fork and exec and makes two system calls (`setsid`,
    // `prctl`), both async-signal-safe; it allocates nothing and takes no lock.
    unsafe {
        command.pre_exec(|| {
            rustix::process::setsid().map_err(std::io::Error::from)?;
            set_parent_process_death_signal(Some(Signal::KILL)).map_err(std::io::Error::from)
        });
    }
    command
}

/// Whether the environment variable `name` is capstan's own and secret: where its state is
/// (`CAPSTAN_STATE`, whose URL may hold a password) and the state's keys
/// (`CAPSTAN_STATE_IDENTITY`, `…_PASSPHRASE`, `…_RECIPIENTS`, and the `CAPSTAN_STATE_NEW_…`
/// of a rekey). What capstan starts — providers, the Terraform provider, Nix, their commands —
/// never inherits them.
pub fn is_capstans_secret(name: &std::ffi::OsStr) -> bool {
    let name = name.as_encoded_bytes();
    matches!(
        name,
        b"CAPSTAN_STATE"
            | b"CAPSTAN_STATE_IDENTITY"
            | b"CAPSTAN_STATE_PASSPHRASE"
            | b"CAPSTAN_STATE_RECIPIENTS"
    ) || name.starts_with(b"CAPSTAN_STATE_NEW_")
}

/// Leaves out of `command`'s environment what [`is_capstans_secret`] names.
pub fn without_capstans_secrets(
    command: &mut tokio::process::Command,
) -> &mut tokio::process::Command {
    for (name, _) in std::env::vars_os() {
        if is_capstans_secret(&name) {
            command.env_remove(name);
        }
    }
    command
}

/// A process or group id (0 and negative ones mean other things to `kill`: never sent).
fn valid(id: i32) -> Option<Pid> {
    if id > 0 {
        Pid::from_raw(id)
    } else {
        None
    }
}

/// Sends `signal` to process group `pgid` (a group leader's pid); a group that is gone, or not
/// a valid id, is left alone.
pub fn signal_group(pgid: i32, signal: Signal) {
    if let Some(pgid) = valid(pgid) {
        let _ = rustix::process::kill_process_group(pgid, signal);
    }
}

/// Whether any process is left in group `pgid` that we may signal.
pub fn group_exists(pgid: i32) -> bool {
    valid(pgid).is_some_and(|pgid| rustix::process::test_kill_process_group(pgid).is_ok())
}

/// Sends `signal` to process `pid`, if there is one.
pub fn signal_process(pid: i32, signal: Signal) {
    if let Some(pid) = valid(pid) {
        let _ = rustix::process::kill_process(pid, signal);
    }
}

/// Whether process `pid` exists (ours to signal or not; a zombie counts).
pub fn process_exists(pid: i32) -> bool {
    let Some(pid) = valid(pid) else {
        return false;
    };
    match rustix::process::test_kill_process(pid) {
        Ok(()) => true,
        Err(e) => e != rustix::io::Errno::SRCH,
    }
}

/// This process's id.
pub fn own_pid() -> i32 {
    rustix::process::getpid().as_raw_nonzero().get()
}

/// This process's session id, as `/proc/self/stat` gives it: 0 when the session's leader is
/// outside our PID namespace (a container started inside someone else's session). Not
/// `getsid`: rustix turns its result into a `Pid`, which cannot be 0, and panics on it.
pub fn own_session() -> i32 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| stat_fields(&stat).map(|fields| fields.session))
        .unwrap_or(0)
}

/// What Capstan reads of a `/proc/PID/stat` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatFields {
    /// The state letter (`R`, `S`, `Z`, ...).
    pub state: char,
    /// The session id (0 when its leader is outside our PID namespace).
    pub session: i32,
}

impl StatFields {
    /// Whether the process has exited and only waits for its parent (`Z`, `X`).
    pub fn is_dead(self) -> bool {
        matches!(self.state, 'Z' | 'X')
    }
}

/// The state and session of a `/proc/PID/stat` line. The command name (field 2) is in
/// parentheses and may itself contain `)` and spaces: the fields are read after the last one.
pub fn stat_fields(stat: &str) -> Option<StatFields> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?.chars().next()?;
    // state, ppid, pgrp, session
    let session = fields.nth(2)?.parse().ok()?;
    Some(StatFields { state, session })
}

/// The real user id this process runs as.
pub fn own_uid() -> u32 {
    rustix::process::getuid().as_raw()
}

/// Makes `options` refuse to open a symbolic link (`O_NOFOLLOW`): a state file another user
/// replaced with a link to some file of theirs (or of root's) is never written through.
pub fn no_follow(options: &mut std::fs::OpenOptions) -> &mut std::fs::OpenOptions {
    use std::os::unix::fs::OpenOptionsExt;
    options.custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
}

/// Whether `error` is an open refused by [`no_follow`] because the path is a symbolic link.
pub fn is_symlink_refusal(error: &std::io::Error) -> bool {
    error.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error())
}

/// The uid of user `name` in `/etc/passwd`, if there is one.
pub fn uid_of(name: &str) -> Option<u32> {
    passwd_entries()
        .find(|(n, _)| n == name)
        .map(|(_, uid)| uid)
}

/// The name of the user with `uid` in `/etc/passwd`, if there is one.
pub fn user_name(uid: u32) -> Option<String> {
    passwd_entries().find(|(_, u)| *u == uid).map(|(n, _)| n)
}

/// A user as a message names it: "user `alice` (uid 1000)", or "uid 1000" for one with no
/// name.
pub fn describe_user(uid: u32) -> String {
    match user_name(uid) {
        Some(name) => format!("user `{name}` (uid {uid})"),
        None => format!("uid {uid}"),
    }
}

/// `(name, uid)` of every well-formed line of `/etc/passwd`.
fn passwd_entries() -> impl Iterator<Item = (String, u32)> {
    let text = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let uid = fields.nth(1)?.parse().ok()?;
            Some((name.to_string(), uid))
        })
        .collect::<Vec<_>>()
        .into_iter()
}

/// Takes an exclusive `flock` on `file`: `Ok(false)` if someone else holds it and `wait` is
/// false; with `wait`, blocks until it is ours.
pub fn lock_exclusive(file: impl AsFd, wait: bool) -> std::io::Result<bool> {
    use rustix::fs::FlockOperation;
    let operation = if wait {
        FlockOperation::LockExclusive
    } else {
        FlockOperation::NonBlockingLockExclusive
    };
    match rustix::fs::flock(file, operation) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::WOULDBLOCK) if !wait => Ok(false),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_child_runs_in_a_group_of_its_own() {
        let mut command = tokio::process::Command::new("sh");
        command
            .args(["-c", "ps -o pgid= -p $$"])
            .stdout(std::process::Stdio::piped());
        dies_with_parent(&mut command);
        let child = command.spawn().expect("sh starts");
        let pid = child.id().expect("a pid");
        let output = child.wait_with_output().await.expect("sh ends");
        let group: u32 = String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .expect("a pgid");
        assert_eq!(group, pid, "its own process group, led by itself");
    }

    #[test]
    fn a_stat_line_gives_state_and_session_even_with_odd_command_names() {
        let line = "4242 (a) b (c)) S 1 4242 4240 34816 4242 4194560 0 0";
        let fields = stat_fields(line).expect("parsed");
        assert_eq!((fields.state, fields.session), ('S', 4240));
        assert!(!fields.is_dead());
        assert!(stat_fields("77 (sleep) Z 1 77 77 0").unwrap().is_dead());
        let outside = stat_fields("9 (sh) S 1 9 0 0").expect("session 0 parses");
        assert_eq!(outside.session, 0, "a leader outside the namespace");
        assert_eq!(stat_fields("garbage"), None);
    }

    #[test]
    fn root_is_found_by_name_and_by_uid() {
        assert_eq!(uid_of("root"), Some(0));
        assert_eq!(user_name(0).as_deref(), Some("root"));
        assert_eq!(uid_of("no-such-user-here"), None);
    }

    #[test]
    fn a_lock_is_refused_while_another_descriptor_holds_it() {
        let dir = std::env::temp_dir().join(format!("capstan-process-lock-{}", own_pid()));
        let first = std::fs::File::create(&dir).unwrap();
        let second = std::fs::File::open(&dir).unwrap();
        assert!(lock_exclusive(&first, false).unwrap());
        assert!(
            !lock_exclusive(&second, false).unwrap(),
            "held by the first"
        );
        drop(first);
        assert!(
            lock_exclusive(&second, false).unwrap(),
            "free once the first closed"
        );
        let _ = std::fs::remove_file(&dir);
    }

    #[test]
    fn this_process_exists_in_a_session_of_its_own_and_a_made_up_one_does_not() {
        assert!(process_exists(own_pid()));
        assert!(!process_exists(i32::MAX - 1) || own_pid() == i32::MAX - 1);
        assert!(!process_exists(0) && !process_exists(-1) && !group_exists(-own_pid()));
        assert!(
            own_session() >= 0,
            "0 where the leader is outside our namespace"
        );
        let _ = own_uid();
    }
}
