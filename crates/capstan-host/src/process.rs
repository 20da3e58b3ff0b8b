//! Provider processes: started with a connected socket as fd 3 (socket activation), in their
//! own process group, killed if the host dies, their output captured line by line, and stopped
//! politely, then firmly.

use capstan_process::Signal;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::rc::Rc;
use std::time::Duration;

use capstan_schema::LogStream;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::{mpsc, watch};

use crate::error::{ExitDescription, LaunchError, OutputTail};

/// How to start a provider executable.
#[derive(Clone, Debug)]
pub struct ProviderCommand {
    /// A path (relative to `cwd` or the current directory) or a name looked up on `PATH`.
    pub program: OsString,
    pub args: Vec<OsString>,
    /// Extra environment variables; the rest is inherited.
    pub env: Vec<(OsString, OsString)>,
    pub cwd: Option<PathBuf>,
}

impl ProviderCommand {
    /// A command with arguments and no extra environment.
    pub fn new(
        program: impl Into<OsString>,
        args: impl IntoIterator<Item = impl Into<OsString>>,
    ) -> Self {
        ProviderCommand {
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            cwd: None,
        }
    }
}

/// One line a provider wrote outside any operation (its stderr or stdout).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProviderLog {
    pub provider: String,
    pub stream: LogStream,
    pub line: String,
}

/// Finds the executable the way a shell would, with errors that say what to do.
pub(crate) fn resolve_program(
    provider: &str,
    program: &OsStr,
    cwd: Option<&Path>,
) -> Result<PathBuf, LaunchError> {
    let not_found = |searched_path| LaunchError::NotFound {
        provider: provider.to_string(),
        program: program.to_string_lossy().into_owned(),
        searched_path,
    };
    let check = |path: PathBuf| -> Result<PathBuf, LaunchError> {
        let meta = std::fs::metadata(&path).map_err(|_| not_found(false))?;
        if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
            return Err(LaunchError::NotExecutable {
                provider: provider.to_string(),
                path,
            });
        }
        Ok(path)
    };
    if program.as_bytes().contains(&b'/') {
        let path = Path::new(program);
        let path = match cwd {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path.to_path_buf(),
        };
        return check(path);
    }
    let search = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&search) {
        let candidate = dir.join(program);
        if candidate.is_file() {
            return check(candidate);
        }
    }
    Err(not_found(true))
}

/// Everything the child needs after `fork`, prepared before it, so the child only makes
/// async-signal-safe calls: dup2, prctl, getpid, writing digits into a buffer it owns, execve.
struct ExecPlan {
    path: CString,
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    _envp: Vec<CString>,
    envp_ptrs: Vec<*const libc::c_char>,
    /// "LISTEN_PID=" followed by room for the digits, filled in by the child.
    listen_pid: Vec<u8>,
    socket_fd: libc::c_int,
    parent_pid: libc::pid_t,
}

// SAFETY: the raw pointers point into the CStrings owned by the same struct; the plan is only
// used in the forked child, which has a single thread.
unsafe impl Send for ExecPlan {}
unsafe impl Sync for ExecPlan {}

const LISTEN_PID_PREFIX: &[u8] = b"LISTEN_PID=";

impl ExecPlan {
    fn new(
        path: &Path,
        command: &ProviderCommand,
        socket_fd: libc::c_int,
    ) -> std::io::Result<Self> {
        let cstring = |bytes: &[u8]| {
            CString::new(bytes).map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "argument contains a NUL byte",
                )
            })
        };
        let path_c = cstring(path.as_os_str().as_bytes())?;
        let mut argv = vec![cstring(command.program.as_bytes())?];
        for arg in &command.args {
            argv.push(cstring(arg.as_bytes())?);
        }
        let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
            .filter(|(k, _)| !k.as_bytes().starts_with(b"LISTEN_"))
            // The state's location and keys are capstan's, never a provider's.
            .filter(|(k, _)| !capstan_process::is_capstans_secret(k))
            .collect();
        for (k, v) in &command.env {
            env.retain(|(old, _)| old != k);
            env.push((k.clone(), v.clone()));
        }
        let mut envp = Vec::with_capacity(env.len() + 1);
        for (k, v) in &env {
            let mut entry = k.as_bytes().to_vec();
            entry.push(b'=');
            entry.extend_from_slice(v.as_bytes());
            envp.push(cstring(&entry)?);
        }
        envp.push(cstring(b"LISTEN_FDS=1")?);
        let mut listen_pid = LISTEN_PID_PREFIX.to_vec();
        listen_pid.resize(LISTEN_PID_PREFIX.len() + 24, 0);
        let mut plan = ExecPlan {
            path: path_c,
            argv_ptrs: Vec::new(),
            _argv: argv,
            envp_ptrs: Vec::new(),
            _envp: envp,
            listen_pid,
            socket_fd,
            // SAFETY: getpid cannot fail.
            parent_pid: unsafe { libc::getpid() },
        };
        plan.argv_ptrs = plan._argv.iter().map(|a| a.as_ptr()).collect();
        plan.argv_ptrs.push(std::ptr::null());
        plan.envp_ptrs = plan._envp.iter().map(|e| e.as_ptr()).collect();
        plan.envp_ptrs.push(plan.listen_pid.as_ptr().cast());
        plan.envp_ptrs.push(std::ptr::null());
        Ok(plan)
    }

    /// Runs in the child between fork and exec. Returns only on failure.
    fn exec_in_child(&mut self) -> std::io::Error {
        // SAFETY: async-signal-safe calls only; every buffer was allocated before fork.
        unsafe {
            // A session of its own (so also a process group of its own: a Ctrl-C at the
            // terminal reaches the host, which decides). Everything the provider starts stays
            // in this session, which the reaper kills whatever ends the host.
            if libc::setsid() < 0 {
                return std::io::Error::last_os_error();
            }
            // Die with the host, even if it is SIGKILLed.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::getppid() != self.parent_pid {
                // The host died before prctl took effect.
                libc::_exit(1);
            }
            if self.socket_fd == 3 {
                let flags = libc::fcntl(3, libc::F_GETFD);
                libc::fcntl(3, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            } else if libc::dup2(self.socket_fd, 3) < 0 {
                return std::io::Error::last_os_error();
            }
            // LISTEN_PID must name the child itself, which only the child knows.
            let mut pid = libc::getpid() as u64;
            let mut digits = [0u8; 20];
            let mut n = 0;
            loop {
                digits[n] = b'0' + (pid % 10) as u8;
                n += 1;
                pid /= 10;
                if pid == 0 {
                    break;
                }
            }
            let start = LISTEN_PID_PREFIX.len();
            for k in 0..n {
                self.listen_pid[start + k] = digits[n - 1 - k];
            }
            self.listen_pid[start + n] = 0;
            libc::execve(
                self.path.as_ptr(),
                self.argv_ptrs.as_ptr(),
                self.envp_ptrs.as_ptr(),
            );
            std::io::Error::last_os_error()
        }
    }
}

/// The last lines of a provider's output, shared with the readers that fill it.
#[derive(Clone, Default)]
pub(crate) struct TailBuffer {
    lines: Rc<RefCell<VecDeque<String>>>,
    limit: usize,
}

impl TailBuffer {
    fn new(limit: usize) -> Self {
        TailBuffer {
            lines: Default::default(),
            limit,
        }
    }

    fn push(&self, line: String) {
        let mut lines = self.lines.borrow_mut();
        if lines.len() == self.limit {
            lines.pop_front();
        }
        lines.push_back(line);
    }

    pub(crate) fn snapshot(&self) -> OutputTail {
        OutputTail(self.lines.borrow().iter().cloned().collect())
    }
}

/// A running provider process.
pub(crate) struct ProviderProcess {
    pub(crate) pid: libc::pid_t,
    exit: watch::Receiver<Option<ExitStatus>>,
    output_closed: watch::Receiver<usize>,
    pub(crate) tail: TailBuffer,
    /// Set once the provider has exited and its process group was seen empty: from then on
    /// its id is never signalled again (it could be reused).
    group_gone: Rc<std::cell::Cell<bool>>,
}

impl ProviderProcess {
    /// Starts `command` with `socket` as its fd 3.
    pub(crate) fn spawn(
        provider: &str,
        command: &ProviderCommand,
        socket: OwnedFd,
        logs: Option<mpsc::Sender<ProviderLog>>,
        tail_lines: usize,
    ) -> Result<Self, LaunchError> {
        let path = resolve_program(provider, &command.program, command.cwd.as_deref())?;
        let spawn_error = |source| LaunchError::Spawn {
            provider: provider.to_string(),
            path: path.clone(),
            source,
        };
        let mut plan = ExecPlan::new(&path, command, socket.as_raw_fd()).map_err(spawn_error)?;
        let mut cmd = tokio::process::Command::new(&path);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own session and process group: see `exec_in_child`.
            .kill_on_drop(false);
        if let Some(dir) = &command.cwd {
            cmd.current_dir(dir);
        }
        // SAFETY: the closure only makes async-signal-safe calls (see ExecPlan).
        unsafe {
            cmd.pre_exec(move || Err(plan.exec_in_child()));
        }
        let mut child = cmd.spawn().map_err(spawn_error)?;
        drop(socket);
        let pid = child.id().expect("a freshly spawned child has a pid") as libc::pid_t;
        crate::reaper::watch_session(pid);

        let tail = TailBuffer::new(tail_lines);
        let (closed_tx, output_closed) = watch::channel(0usize);
        let closed_tx = Rc::new(closed_tx);
        if let Some(stdout) = child.stdout.take() {
            spawn_reader(
                provider,
                LogStream::Stdout,
                stdout,
                &tail,
                &logs,
                &closed_tx,
            );
        }
        if let Some(stderr) = child.stderr.take() {
            spawn_reader(
                provider,
                LogStream::Stderr,
                stderr,
                &tail,
                &logs,
                &closed_tx,
            );
        }
        let (exit_tx, exit) = watch::channel(None);
        let group_gone = Rc::new(std::cell::Cell::new(false));
        let gone = group_gone.clone();
        tokio::task::spawn_local(async move {
            if let Ok(status) = child.wait().await {
                // Checked right at exit, before the id can be handed out again.
                if !capstan_process::group_exists(pid) {
                    gone.set(true);
                }
                let _ = exit_tx.send(Some(status));
            }
        });
        Ok(ProviderProcess {
            pid,
            exit,
            output_closed,
            tail,
            group_gone,
        })
    }

    /// The exit status, once the process has exited.
    pub(crate) fn status(&self) -> Option<ExitStatus> {
        *self.exit.borrow()
    }

    /// Waits up to `limit` for the process to exit.
    pub(crate) async fn wait_exit(&self, limit: Duration) -> Option<ExitStatus> {
        let mut exit = self.exit.clone();
        let waited = tokio::time::timeout(limit, exit.wait_for(|s| s.is_some())).await;
        match waited {
            Ok(Ok(status)) => *status,
            _ => None,
        }
    }

    /// Resolves when the process has exited.
    pub(crate) async fn exited(&self) -> Option<ExitStatus> {
        let mut exit = self.exit.clone();
        exit.wait_for(|s| s.is_some()).await.ok().and_then(|s| *s)
    }

    /// Waits up to `limit` until both output pipes reached end of file, so the tail is complete.
    pub(crate) async fn wait_output(&self, limit: Duration) {
        let mut closed = self.output_closed.clone();
        let _ = tokio::time::timeout(limit, closed.wait_for(|n| *n >= 2)).await;
    }

    /// How the process ended, after waiting up to `limit`, and its last output.
    pub(crate) async fn describe_exit(&self, limit: Duration) -> (ExitDescription, OutputTail) {
        let status = self.wait_exit(limit).await;
        self.wait_output(Duration::from_millis(250)).await;
        (ExitDescription::from_status(status), self.tail.snapshot())
    }

    pub(crate) fn signal_group(&self, signal: Signal) {
        if self.group_gone.get() {
            // The group emptied once: its id may belong to someone else by now.
            return;
        }
        // The provider's own process group: its pid is the group id.
        capstan_process::signal_group(self.pid, signal);
    }

    /// Whether any process is left in the provider's process group.
    pub(crate) fn group_alive(&self) -> bool {
        if self.group_gone.get() {
            return false;
        }
        let alive = capstan_process::group_exists(self.pid);
        if !alive && self.status().is_some() {
            self.group_gone.set(true);
        }
        alive
    }

    /// Stops the process: waits `grace` for it to exit by itself (after the core closed the
    /// connection), then SIGTERM, waits `term_grace`, then SIGKILL. Also kills anything the
    /// provider left running in its process group, and says so.
    pub(crate) async fn stop(
        &self,
        provider: &str,
        grace: Duration,
        term_grace: Duration,
    ) -> StopReport {
        let mut report = StopReport::default();
        let mut status = self.wait_exit(grace).await;
        if status.is_none() {
            report.escalated_to = Some(Signal::TERM.as_raw());
            self.signal_group(Signal::TERM);
            status = self.wait_exit(term_grace).await;
        }
        if status.is_none() {
            report.escalated_to = Some(Signal::KILL.as_raw());
            self.signal_group(Signal::KILL);
            status = self.wait_exit(Duration::from_secs(5)).await;
        }
        if self.group_alive() {
            tracing::warn!(
                "provider `{provider}` left processes running in its process group; killing them"
            );
            report.leaked_processes = true;
            self.signal_group(Signal::KILL);
        }
        report.status = ExitDescription::from_status(status);
        report
    }
}

impl Drop for ProviderProcess {
    fn drop(&mut self) {
        // Providers never outlive their host's handle on them.
        if self.status().is_none() || self.group_alive() {
            self.signal_group(Signal::KILL);
        }
    }
}

/// How a provider process was stopped.
#[derive(Clone, Debug, Default)]
pub struct StopReport {
    /// How it ended.
    pub status: ExitDescription,
    /// The signal the host had to send because it did not exit by itself, if any.
    pub escalated_to: Option<libc::c_int>,
    /// Whether processes it started were still running after it exited.
    pub leaked_processes: bool,
}

fn spawn_reader(
    provider: &str,
    stream: LogStream,
    pipe: impl AsyncRead + Unpin + 'static,
    tail: &TailBuffer,
    logs: &Option<mpsc::Sender<ProviderLog>>,
    closed: &Rc<watch::Sender<usize>>,
) {
    let provider = provider.to_string();
    let tail = tail.clone();
    let logs = logs.clone();
    let closed = closed.clone();
    tokio::task::spawn_local(async move {
        let mut reader = BufReader::new(pipe);
        let mut buf = Vec::new();
        let mut flood = Flood::new();
        let send = |line: String| {
            let logs = logs.clone();
            let provider = provider.clone();
            async move {
                if let Some(logs) = &logs {
                    // Awaiting here applies backpressure: a provider that floods its stderr
                    // blocks on the pipe instead of growing the host's memory.
                    let _ = logs
                        .send(ProviderLog {
                            provider,
                            stream,
                            line,
                        })
                        .await;
                }
            }
        };
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let line = String::from_utf8_lossy(&buf)
                .trim_end_matches(['\n', '\r'])
                .to_string();
            tail.push(line.clone());
            match flood.admit(std::time::Instant::now()) {
                Admit::Pass { dropped } => {
                    if dropped > 0 {
                        send(Flood::notice(dropped)).await;
                    }
                    send(line).await;
                }
                Admit::Drop => {}
            }
        }
        if flood.dropped > 0 {
            send(Flood::notice(flood.dropped)).await;
        }
        closed.send_modify(|n| *n += 1);
    });
}

/// How many of a provider's own output lines are passed on: a burst of `FLOOD_BURST`, then
/// `FLOOD_RATE` a second. A program that floods its output (`yes`, a provider stuck in a
/// loop that logs) would otherwise bury the terminal and the event stream in it; what is
/// left out is counted and said, and its last lines still reach its error message (the tail).
const FLOOD_BURST: f64 = 2000.0;
const FLOOD_RATE: f64 = 100.0;
/// How often, at most, a flood is said to go on.
const FLOOD_NOTICE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// A token bucket over output lines.
struct Flood {
    tokens: f64,
    at: std::time::Instant,
    /// Lines left out and not yet said.
    dropped: u64,
    noticed: Option<std::time::Instant>,
}

enum Admit {
    /// Pass the line on, after saying how many were left out before it.
    Pass {
        dropped: u64,
    },
    Drop,
}

impl Flood {
    fn new() -> Self {
        Flood {
            tokens: FLOOD_BURST,
            at: std::time::Instant::now(),
            dropped: 0,
            noticed: None,
        }
    }

    fn admit(&mut self, now: std::time::Instant) -> Admit {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * FLOOD_RATE).min(FLOOD_BURST);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            // What was left out is said once a second at most, before a line passed on.
            let due = self
                .noticed
                .is_none_or(|at| now.saturating_duration_since(at) >= FLOOD_NOTICE_EVERY);
            let dropped = if self.dropped > 0 && due {
                self.noticed = Some(now);
                std::mem::take(&mut self.dropped)
            } else {
                0
            };
            Admit::Pass { dropped }
        } else {
            self.dropped += 1;
            Admit::Drop
        }
    }

    fn notice(dropped: u64) -> String {
        format!(
            "({dropped} line(s) of output not shown: written faster than {FLOOD_RATE} a second)"
        )
    }
}
