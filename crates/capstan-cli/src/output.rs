//! Where the CLI's output goes: the process's real stdout, kept apart from fd 1 so nothing else
//! can write to it, and stderr. Neither ever panics or blocks the run when its reader has gone
//! away (`capstan apply 2>&1 | head -5`): a failed write marks the output closed, which the run
//! treats like an interrupt (see `closed`), and later writes are dropped.

use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::sync::OnceLock;

use tokio_util::sync::CancellationToken;

/// Fires when a write to stdout or stderr fails (the reader closed the pipe, the terminal
/// went away). Commands that run operations stop gracefully when it fires.
pub fn closed() -> &'static CancellationToken {
    static CLOSED: OnceLock<CancellationToken> = OnceLock::new();
    CLOSED.get_or_init(CancellationToken::new)
}

/// Writes `bytes` to stderr in one call, or marks the output closed.
pub fn to_stderr(bytes: &[u8]) {
    if closed().is_cancelled() {
        return;
    }
    let mut stderr = std::io::stderr().lock();
    if stderr
        .write_all(bytes)
        .and_then(|()| stderr.flush())
        .is_err()
    {
        closed().cancel();
    }
}

/// `eprintln!` that never panics: a line on stderr, or nothing once stderr is closed.
macro_rules! say {
    ($($arg:tt)*) => {{
        let mut line = format!($($arg)*);
        line.push('\n');
        crate::output::to_stderr(line.as_bytes());
    }};
}

/// Our private handle on the original stdout.
pub struct Stdout(Option<File>);

impl Stdout {
    /// Duplicates fd 1 for our own use and points fd 1 at stderr, so stray prints from any
    /// library end up on stderr.
    pub fn take() -> Self {
        // SAFETY: fcntl(F_DUPFD_CLOEXEC) and dup2 on the standard descriptors touch no memory;
        // the duplicate is a fresh descriptor that nothing else owns, so `File` may own it.
        unsafe {
            let copy = libc::fcntl(libc::STDOUT_FILENO, libc::F_DUPFD_CLOEXEC, 3);
            if copy < 0 {
                // No stdout at all (closed): write nowhere rather than fail.
                return Stdout(None);
            }
            libc::dup2(libc::STDERR_FILENO, libc::STDOUT_FILENO);
            Stdout(Some(File::from_raw_fd(copy)))
        }
    }

    /// Whether the real stdout is a terminal.
    pub fn is_terminal(&self) -> bool {
        use std::io::IsTerminal;
        self.0.as_ref().is_some_and(|f| f.is_terminal())
    }

    /// Writes one line, in one `write` (a reader never sees half a line from us before the
    /// rest, and a line costs one system call).
    pub fn line(&mut self, text: &str) {
        let mut line = String::with_capacity(text.len() + 1);
        line.push_str(text);
        self.line_owned(line);
    }

    /// Writes `text` and a newline, reusing `text`'s buffer.
    pub fn line_owned(&mut self, mut text: String) {
        text.push('\n');
        self.write(text.as_bytes());
    }

    /// Writes `bytes` as they are; a failed write closes this output for good and marks the
    /// output closed.
    pub fn write(&mut self, bytes: &[u8]) {
        if let Some(file) = &mut self.0 {
            if file.write_all(bytes).is_err() {
                self.0 = None;
                closed().cancel();
            }
        }
    }
}
