//! The reaper: a small helper process that outlives the host just long enough to kill
//! everything its providers started, however the host ends — SIGKILL included.
//!
//! Each provider process starts a session of its own (`setsid`), and everything it starts
//! (commands, `nix-build` and its builders, a v0 provider program and *its* children) stays in
//! that session unless it deliberately leaves it. The host tells the reaper each provider's
//! session over a pipe; when the pipe closes — the host exited, crashed or was killed — the
//! reaper kills every process still in those sessions and exits. Process groups alone are not
//! enough: a provider's commands run in process groups of their own (so that a cancelled
//! operation can kill one command's tree), and `PR_SET_PDEATHSIG` reaches only a direct child.
//!
//! The reaper is optional: a host that never calls [`install`] (a test, a benchmark, an
//! embedding program with its own supervision) gets none, and [`watch_session`] does nothing.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::io::{BufRead, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

struct Reaper {
    child: Mutex<Child>,
    /// The write end of the reaper's stdin; `None` once closed by [`finish`].
    pipe: Mutex<Option<ChildStdin>>,
}

static REAPER: OnceLock<Reaper> = OnceLock::new();

/// Starts the reaper for this process: `program args…` must end up calling [`serve`] (the
/// `capstan` binary runs it as `capstan __reaper`). Call it once, before starting providers.
pub fn install<I, S>(program: &std::path::Path, args: I) -> std::io::Result<()>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    use std::os::unix::process::CommandExt;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        // Out of the terminal's foreground group: a Ctrl-C is for the host, not the reaper.
        .process_group(0)
        .spawn()?;
    let pipe = child.stdin.take();
    let _ = REAPER.set(Reaper {
        child: Mutex::new(child),
        pipe: Mutex::new(pipe),
    });
    Ok(())
}

/// Tells the reaper about a provider process that leads a session of its own.
pub fn watch_session(sid: libc::pid_t) {
    let Some(reaper) = REAPER.get() else { return };
    let Ok(mut pipe) = reaper.pipe.lock() else {
        return;
    };
    if let Some(stdin) = pipe.as_mut() {
        // One short line per write: atomic on a pipe.
        let _ = stdin.write_all(format!("{sid}\n").as_bytes());
    }
}

/// At the end of the host's run: closes the pipe and waits until the reaper has killed what
/// is left (its work is bounded: about a second at most), so that nothing started for the run
/// outlives the host's exit.
pub fn finish() {
    let Some(reaper) = REAPER.get() else { return };
    if let Ok(mut pipe) = reaper.pipe.lock() {
        pipe.take();
    }
    if let Ok(mut child) = reaper.child.lock() {
        let _ = child.wait();
    }
}

/// The reaper's own main: reads session ids from stdin until it closes, then kills every
/// process left in those sessions. Returns the process's exit code.
pub fn serve() -> std::process::ExitCode {
    // SAFETY: setting signal dispositions to SIG_IGN before any thread exists. The reaper
    // must not die with the host's terminal or its process group; it ends on its own.
    unsafe {
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGPIPE] {
            libc::signal(signal, libc::SIG_IGN);
        }
    }
    let (lines, registered) = std::sync::mpsc::channel::<libc::pid_t>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if let Ok(sid) = line.trim().parse::<libc::pid_t>() {
                if sid > 1 && lines.send(sid).is_err() {
                    break;
                }
            }
        }
        // Dropping `lines` tells the loop below that the host is gone.
    });
    let mut sessions = BTreeSet::new();
    loop {
        match registered.recv_timeout(FORGET_EVERY) {
            Ok(sid) => {
                sessions.insert(sid);
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                // A session id can be handed out again once nothing is left in it: forget
                // empty sessions, so that a new, unrelated session with a reused id is never
                // killed.
                if !sessions.is_empty() {
                    let alive: BTreeSet<libc::pid_t> = processes().map(|(_, sid)| sid).collect();
                    sessions.retain(|sid| alive.contains(sid));
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    if !sessions.is_empty() {
        kill_sessions(&sessions);
    }
    std::process::ExitCode::SUCCESS
}

/// How often the reaper forgets sessions that have emptied.
const FORGET_EVERY: Duration = Duration::from_secs(1);

/// SIGKILLs every process in `sessions` until none is left (a process may fork between a
/// scan and its kill, so scan again), for at most about a second.
fn kill_sessions(sessions: &BTreeSet<libc::pid_t>) {
    let own = capstan_process::own_pid();
    for _ in 0..100 {
        let found: Vec<libc::pid_t> = processes()
            .filter(|&(pid, sid)| pid != own && sessions.contains(&sid))
            .map(|(pid, _)| pid)
            .collect();
        if found.is_empty() {
            return;
        }
        for pid in found {
            // `pid` was in a session we were told about.
            capstan_process::signal_process(pid, capstan_process::Signal::KILL);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Every process on the machine as (pid, session id), from /proc. Zombies are left out:
/// they are dead already and only wait for their parent.
fn processes() -> impl Iterator<Item = (libc::pid_t, libc::pid_t)> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let pid: libc::pid_t = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            session_of(&stat).map(|sid| (pid, sid))
        })
}

/// The session id in a `/proc/PID/stat` line, unless the process is a zombie.
fn session_of(stat: &str) -> Option<libc::pid_t> {
    capstan_process::stat_fields(stat)
        .filter(|fields| !fields.is_dead())
        .map(|fields| fields.session)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_gives_its_session_even_with_odd_command_names() {
        let line = "4242 (a) b (c)) S 1 4242 4240 34816 4242 4194560 0 0";
        assert_eq!(session_of(line), Some(4240));
        assert_eq!(session_of("77 (sleep) Z 1 77 77 0"), None, "a zombie");
        assert_eq!(session_of("garbage"), None);
    }

    #[test]
    fn this_process_is_found_in_its_own_session() {
        let (pid, sid) = (capstan_process::own_pid(), capstan_process::own_session());
        assert!(processes().any(|p| p == (pid, sid)));
    }
}
