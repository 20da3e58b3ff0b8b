//! Where the CLI's output goes: the process's real stdout, kept apart from fd 1 so nothing else
//! can write to it, and stderr.
//!
//! Both are written by a thread of their own, so the run never waits on a terminal or a pipe
//! (a slow `ssh` session, a terminal paused with Ctrl-S, a consumer of `--json` that falls
//! behind): output is queued, up to `QUEUE_LIMIT` bytes, and only a consumer that stays that
//! far behind slows the run down. Neither ever panics when its reader has gone away (`capstan
//! apply 2>&1 | head -5`): a failed write marks the output closed (see `closed`), later output
//! is dropped, and the run finishes without it.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// Fires when a write to stdout or stderr fails (the reader closed the pipe, the terminal
/// went away).
pub fn closed() -> &'static CancellationToken {
    static CLOSED: OnceLock<CancellationToken> = OnceLock::new();
    CLOSED.get_or_init(CancellationToken::new)
}

/// Set once stderr cannot be written (stdout may still be fine, and the other way round).
static STDERR_CLOSED: AtomicBool = AtomicBool::new(false);
/// Set once stdout cannot be written: what the command was asked to print was lost.
static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);

/// Whether some of what the command printed on stdout could not be written (ask after
/// [`flush`]).
pub fn stdout_lost() -> bool {
    STDOUT_CLOSED.load(Ordering::Relaxed)
}

/// The live view, while it is up: every other write to stderr goes through it, so that its
/// block of running resources is cleared first and drawn again below (see `to_stderr`).
static LIVE_VIEW: Mutex<Option<indicatif::MultiProgress>> = Mutex::new(None);

/// Output waiting for the writer beyond this many bytes makes a writer wait for room.
const QUEUE_LIMIT: usize = 64 * 1024 * 1024;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Stdout,
    Stderr,
}

#[derive(Default)]
struct Queue {
    items: VecDeque<(Target, Vec<u8>)>,
    bytes: usize,
    /// The writer is gone or asked to stop: nothing more is queued.
    ended: bool,
    /// The writer is writing an item it took off the queue.
    busy: bool,
}

struct Writer {
    queue: Mutex<Queue>,
    /// Signalled when something was queued, or the end asked for.
    more: Condvar,
    /// Signalled when the writer took something off the queue (room, or an empty queue).
    taken: Condvar,
}

static WRITER: OnceLock<Writer> = OnceLock::new();

/// Starts the writer thread, which owns `stdout` from now on. Until it is started (and in
/// processes that never start it), output is written directly.
fn start(stdout: Option<File>) {
    let writer = WRITER.get_or_init(|| Writer {
        queue: Mutex::new(Queue::default()),
        more: Condvar::new(),
        taken: Condvar::new(),
    });
    let spawned = std::thread::Builder::new()
        .name("capstan-output".into())
        .spawn(move || write_until_ended(writer, stdout));
    if spawned.is_err() {
        // No thread: mark the queue ended, so output is written directly instead.
        if let Ok(mut queue) = writer.queue.lock() {
            queue.ended = true;
        }
    }
}

fn write_until_ended(writer: &'static Writer, mut stdout: Option<File>) {
    let mut stderr_open = true;
    loop {
        let (target, bytes) = {
            let Ok(mut queue) = writer.queue.lock() else {
                return;
            };
            loop {
                if let Some(item) = queue.items.pop_front() {
                    queue.bytes -= item.1.len();
                    queue.busy = true;
                    break item;
                }
                queue.busy = false;
                writer.taken.notify_all();
                if queue.ended {
                    return;
                }
                queue = match writer.more.wait(queue) {
                    Ok(queue) => queue,
                    Err(_) => return,
                };
            }
        };
        writer.taken.notify_all();
        let failed = match target {
            Target::Stdout => match &mut stdout {
                Some(file) => file.write_all(&bytes).is_err(),
                None => false,
            },
            Target::Stderr if stderr_open => {
                let mut stderr = std::io::stderr().lock();
                stderr
                    .write_all(&bytes)
                    .and_then(|()| stderr.flush())
                    .is_err()
            }
            Target::Stderr => false,
        };
        if failed {
            match target {
                Target::Stdout => {
                    stdout = None;
                    STDOUT_CLOSED.store(true, Ordering::Relaxed);
                }
                Target::Stderr => {
                    stderr_open = false;
                    STDERR_CLOSED.store(true, Ordering::Relaxed);
                }
            }
            closed().cancel();
        }
    }
}

fn send(target: Target, bytes: Vec<u8>) {
    if let Some(writer) = WRITER.get() {
        if let Ok(mut queue) = writer.queue.lock() {
            if !queue.ended {
                while queue.bytes > QUEUE_LIMIT && !queue.ended {
                    queue = match writer.taken.wait(queue) {
                        Ok(queue) => queue,
                        Err(_) => return,
                    };
                }
                queue.bytes += bytes.len();
                queue.items.push_back((target, bytes));
                writer.more.notify_one();
                return;
            }
        }
    }
    // No writer thread: write here (stdout has no handle outside the writer; it is only
    // written through it).
    if target == Target::Stderr && !STDERR_CLOSED.load(Ordering::Relaxed) {
        let mut stderr = std::io::stderr().lock();
        if stderr
            .write_all(&bytes)
            .and_then(|()| stderr.flush())
            .is_err()
        {
            STDERR_CLOSED.store(true, Ordering::Relaxed);
            closed().cancel();
        }
    }
}

/// At the end of the process: lets the writer write everything queued (as long as its reader
/// takes it: `capstan plan | less` waits for less, as any program would), then stops it.
pub fn finish() {
    drain(None, true);
}

/// On the way out at once (a second signal): like `finish`, but waiting at most `limit`.
pub fn finish_within(limit: Duration) {
    drain(Some(limit), true);
}

/// Waits until everything queued so far is written, so that `closed` tells whether it could
/// be.
pub fn flush() {
    drain(None, false);
}

/// Ends the output when dropped: every return from `main` (and an unwinding panic) first
/// writes what is queued.
pub struct Finish;

impl Drop for Finish {
    fn drop(&mut self) {
        finish();
    }
}

fn drain(limit: Option<Duration>, end: bool) {
    let Some(writer) = WRITER.get() else { return };
    let Ok(mut queue) = writer.queue.lock() else {
        return;
    };
    if end {
        queue.ended = true;
        writer.more.notify_all();
    }
    let deadline = limit.map(|limit| Instant::now() + limit);
    while !queue.items.is_empty() || queue.busy {
        queue = match deadline {
            None => match writer.taken.wait(queue) {
                Ok(queue) => queue,
                Err(_) => return,
            },
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return;
                }
                match writer.taken.wait_timeout(queue, left) {
                    Ok((queue, _)) => queue,
                    Err(_) => return,
                }
            }
        };
    }
}

/// Queues `bytes` for stderr (written in one call), or drops them once stderr is closed.
/// While the live view is up, its block of running resources is cleared first and drawn
/// again below, so that what is written stays.
pub fn to_stderr(bytes: &[u8]) {
    if STDERR_CLOSED.load(Ordering::Relaxed) {
        return;
    }
    let view = LIVE_VIEW.lock().ok().and_then(|view| view.clone());
    match view {
        Some(view) => view.suspend(|| send(Target::Stderr, bytes.to_vec())),
        None => send(Target::Stderr, bytes.to_vec()),
    }
}

/// Queues `bytes` for stderr as they are: for the live view itself, which draws its block.
pub fn to_stderr_under_view(bytes: Vec<u8>) {
    if !bytes.is_empty() && !STDERR_CLOSED.load(Ordering::Relaxed) {
        send(Target::Stderr, bytes);
    }
}

/// From now on, writes to stderr go through `view` (the live view is up), or directly again.
pub fn route_stderr_through(view: Option<indicatif::MultiProgress>) {
    if let Ok(mut routed) = LIVE_VIEW.lock() {
        *routed = view;
    }
}

/// Whether stderr output is still waiting to be written (a live view skips a redraw then).
pub fn stderr_backlog() -> bool {
    WRITER.get().is_some_and(|writer| {
        writer.queue.lock().is_ok_and(|queue| {
            queue
                .items
                .iter()
                .any(|(target, _)| *target == Target::Stderr)
        })
    })
}

/// `tracing`'s writer: its lines go through the same queue (after the live view's block is
/// cleared), never straight to fd 2 ahead of what is queued.
pub struct TracingWriter;

impl Write for TracingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        to_stderr(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `eprintln!` that never panics or blocks: a line on stderr, or nothing once it is closed.
macro_rules! say {
    ($($arg:tt)*) => {{
        let mut line = crate::output::scrubbed(format!($($arg)*));
        line.push('\n');
        crate::output::to_stderr(line.as_bytes());
    }};
}

thread_local! {
    /// The command's secrets, once it knows them: no message names one.
    static SECRETS: std::cell::RefCell<Option<std::rc::Rc<capstan_engine::secrets::Secrets>>> =
        const { std::cell::RefCell::new(None) };
}

/// Hides the secrets in every message `say!` prints from now on (errors and warnings carry
/// providers' and Nix's words, which may hold one).
pub fn hide_in_messages(secrets: std::rc::Rc<capstan_engine::secrets::Secrets>) {
    SECRETS.with(|s| *s.borrow_mut() = Some(secrets));
}

pub fn scrubbed(text: String) -> String {
    SECRETS.with(|s| match &*s.borrow() {
        Some(secrets) => secrets.scrub(&text).into_owned(),
        None => text,
    })
}

/// Our private handle on the original stdout (written by the output thread).
pub struct Stdout {
    terminal: bool,
}

impl Stdout {
    /// Duplicates fd 1 for our own use (handed to the output thread, which it starts) and
    /// points fd 1 at stderr, so stray prints from any library end up on stderr.
    pub fn take() -> Self {
        // No stdout at all (closed): write nowhere rather than fail.
        let file = rustix::io::fcntl_dupfd_cloexec(std::io::stdout(), 3)
            .ok()
            .map(|copy| {
                let _ = rustix::stdio::dup2_stdout(std::io::stderr());
                File::from(copy)
            });
        let terminal = file.as_ref().is_some_and(|f| f.is_terminal());
        start(file);
        Stdout { terminal }
    }

    /// Whether the real stdout is a terminal.
    pub fn is_terminal(&self) -> bool {
        self.terminal
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
        send(Target::Stdout, text.into_bytes());
    }

    /// Writes `bytes` as they are.
    pub fn write(&mut self, bytes: &[u8]) {
        send(Target::Stdout, bytes.to_vec());
    }
}
