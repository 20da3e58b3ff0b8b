//! Helpers for providers whose operations run commands: read their output as it comes, as
//! the operation's log, and make sure a cancelled operation stops everything they started.

use std::collections::VecDeque;
use std::process::ExitStatus;

use capstan_schema::{LogStream, OperationError};
use tokio::io::BufReader;

use crate::Operation;

/// Kills a command's whole process group when dropped before [`disarm`](Self::disarm). Start
/// the command with `.process_group(0)` and hold one of these while it runs: if the operation is
/// cancelled (its future dropped), what the command started goes too, not only the command.
pub struct ProcessGroupGuard {
    pgid: i32,
    armed: bool,
}

impl ProcessGroupGuard {
    /// Guards the group led by `pid` (as returned by `Child::id`); `None` guards nothing.
    pub fn new(pid: Option<u32>) -> Self {
        ProcessGroupGuard {
            pgid: pid.map(|p| p as i32).unwrap_or(0),
            armed: pid.is_some(),
        }
    }

    /// The command ended normally: leave its group alone.
    pub fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for ProcessGroupGuard {
    fn drop(&mut self) {
        if self.armed && self.pgid > 0 {
            // The group this guard's command leads.
            capstan_process::signal_group(self.pgid, capstan_process::Signal::KILL);
        }
    }
}

/// The last lines a command wrote, for an error's details: at most `LastLines::LIMIT`, the
/// oldest dropped first.
#[derive(Clone, Debug, Default)]
pub struct LastLines(VecDeque<String>);

impl LastLines {
    /// How many lines are kept.
    pub const LIMIT: usize = 20;

    /// Keeps `line`, dropping the oldest beyond the limit.
    pub fn push(&mut self, line: impl Into<String>) {
        if self.0.len() == Self::LIMIT {
            self.0.pop_front();
        }
        self.0.push_back(line.into());
    }

    /// The lines, oldest first, one per line.
    pub fn joined(&self) -> String {
        self.0.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// The lines, oldest first.
    pub fn into_vec(self) -> Vec<String> {
        self.0.into()
    }
}

/// Starts `command` the way a provider should run a command for an operation: stdout and
/// stderr piped (to read them as they come), in a process group of its own (so that a
/// [`ProcessGroupGuard`], or [`stream_command`], can stop everything it started), killed if
/// its `Child` is dropped, and killed by the kernel if the provider dies (even of SIGKILL,
/// with its core and reaper at once: nothing is left to clean up after it). Set stdin
/// yourself.
pub fn spawn_piped(
    command: &mut tokio::process::Command,
) -> std::io::Result<tokio::process::Child> {
    command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    capstan_process::dies_with_parent(command).spawn()
}

/// Reads one line from a child process's output, without its line ending; bytes that are not
/// UTF-8 are replaced rather than ending the stream (a command that prints one Latin-1 byte
/// must not stop being read, or it blocks on a full pipe). `Ok(None)` at end of file; a last
/// line without a line ending is still a line.
///
/// Cancel-safe, so it can race other reads in `tokio::select!`: pass the same `buffer` every
/// time; the part of a line read before a cancellation stays in it and the next call finishes
/// the line.
pub async fn read_line_lossy<R>(
    reader: &mut R,
    buffer: &mut Vec<u8>,
) -> std::io::Result<Option<String>>
where
    R: tokio::io::AsyncBufRead + Unpin,
{
    Ok(read_line_raw(reader, buffer, &mut Vec::new())
        .await?
        .then(|| line_text(buffer))
        .inspect(|_| buffer.clear()))
}

/// Reads one line as [`read_line_lossy`] does, appending its bytes exactly as they came (line
/// ending included) to `raw` as well; `false` at end of file. The line stays in `buffer` for
/// the caller, who clears it.
async fn read_line_raw<R>(
    reader: &mut R,
    buffer: &mut Vec<u8>,
    raw: &mut Vec<u8>,
) -> std::io::Result<bool>
where
    R: tokio::io::AsyncBufRead + Unpin,
{
    use tokio::io::AsyncBufReadExt;
    reader.read_until(b'\n', buffer).await?;
    if buffer.is_empty() {
        return Ok(false);
    }
    raw.extend_from_slice(buffer);
    Ok(true)
}

/// A line's text for a log: lossy UTF-8, without its line ending.
fn line_text(line: &[u8]) -> String {
    String::from_utf8_lossy(line)
        .trim_end_matches(['\n', '\r'])
        .to_string()
}

/// What a command printed, as [`stream_command`] saw it.
pub struct CommandOutput {
    pub status: ExitStatus,
    /// Everything it wrote to stdout, byte for byte (line endings as written, a last line
    /// without one kept so).
    pub stdout: Vec<u8>,
    /// Its last lines (stdout and stderr interleaved), for an error's details.
    pub tail: Vec<String>,
}

/// Runs a spawned command to its end: every line of its stdout and stderr goes to the
/// operation's log as it arrives. The command must have been started with piped stdout and
/// stderr and `.process_group(0)`; if the operation is cancelled meanwhile, its whole process
/// group is killed and the error names it as `what`.
pub async fn stream_command(
    op: &Operation,
    mut child: tokio::process::Child,
    what: &str,
) -> Result<CommandOutput, OperationError> {
    let group = ProcessGroupGuard::new(child.id());
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout is piped"));
    let mut stdout_buffer = Vec::new();
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr is piped"));
    let mut stderr_buffer = Vec::new();
    let mut captured = Vec::new();
    let mut ignored = Vec::new();
    let mut tail = LastLines::default();
    let (mut out_open, mut err_open) = (true, true);
    while out_open || err_open {
        let (stream, line) = tokio::select! {
            more = read_line_raw(&mut stdout, &mut stdout_buffer, &mut captured), if out_open => {
                (LogStream::Stdout, more.map(|more| more.then(|| {
                    let line = line_text(&stdout_buffer);
                    stdout_buffer.clear();
                    line
                })))
            }
            more = read_line_raw(&mut stderr, &mut stderr_buffer, &mut ignored), if err_open => {
                ignored.clear();
                (LogStream::Stderr, more.map(|more| more.then(|| {
                    let line = line_text(&stderr_buffer);
                    stderr_buffer.clear();
                    line
                })))
            }
            () = op.cancelled() => return Err(OperationError::cancelled(format!("{what} was cancelled"))),
        };
        match line {
            Ok(Some(line)) => {
                tail.push(line.clone());
                op.log(stream, line).await;
            }
            _ if stream == LogStream::Stdout => out_open = false,
            _ => err_open = false,
        }
    }
    let status = child
        .wait()
        .await
        .map_err(|e| OperationError::permanent(format!("waiting for {what}: {e}")))?;
    group.disarm();
    Ok(CommandOutput {
        status,
        stdout: captured,
        tail: tail.into_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_line_read_in_pieces_survives_a_cancelled_read() {
        let (mut writer, reader) = tokio::io::duplex(64);
        let mut reader = BufReader::new(reader);
        let mut buffer = Vec::new();
        writer.write_all(b"half a li").await.unwrap();
        // Another branch of a select! wins while the line is incomplete.
        let cancelled = tokio::time::timeout(
            Duration::from_millis(20),
            read_line_lossy(&mut reader, &mut buffer),
        )
        .await;
        assert!(cancelled.is_err(), "no whole line yet");
        writer.write_all(b"ne\n\xffnext\r\nlast").await.unwrap();
        drop(writer);
        let mut lines = Vec::new();
        while let Some(line) = read_line_lossy(&mut reader, &mut buffer).await.unwrap() {
            lines.push(line);
        }
        assert_eq!(lines, ["half a line", "\u{fffd}next", "last"]);
    }
}
