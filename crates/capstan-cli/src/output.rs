//! The process's real stdout, kept apart from fd 1 so nothing else can write to it.

use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;

/// Our private handle on the original stdout.
pub struct Stdout(File);

impl Stdout {
    /// Duplicates fd 1 for our own use and points fd 1 at stderr, so stray prints from any
    /// library end up on stderr.
    pub fn take() -> Self {
        // SAFETY: dup/dup2 on the standard descriptors; the duplicate is ours to own.
        unsafe {
            let copy = libc::fcntl(libc::STDOUT_FILENO, libc::F_DUPFD_CLOEXEC, 3);
            if copy < 0 {
                // No stdout at all (closed): write nowhere rather than fail.
                return Stdout(File::create("/dev/null").expect("/dev/null"));
            }
            libc::dup2(libc::STDERR_FILENO, libc::STDOUT_FILENO);
            Stdout(File::from_raw_fd(copy))
        }
    }

    /// A stdout that discards everything (for commands whose output goes elsewhere).
    pub fn null() -> Self {
        Stdout(File::create("/dev/null").expect("/dev/null"))
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
        let _ = self.0.write_all(text.as_bytes());
    }
}
