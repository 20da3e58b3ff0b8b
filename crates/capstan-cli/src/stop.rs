//! How a command is asked to stop: signals, and the exit codes that say so.

use std::process::ExitCode;
use std::rc::Rc;

use tokio_util::sync::CancellationToken;

/// Exit codes (see `capstan --help`).
pub const EXIT_FAILED: u8 = 1;
pub const EXIT_INVALID: u8 = 2;
pub const EXIT_INTERRUPTED: u8 = 130;
pub const EXIT_OUTPUT_CLOSED: u8 = 128 + capstan_process::Signal::PIPE.as_raw() as u8;

/// What asked a run to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StopCause {
    /// SIGINT (Ctrl-C).
    Interrupt,
    /// SIGTERM (a service manager, `kill`, `timeout`).
    Terminate,
    /// SIGHUP (the terminal went away).
    Hangup,
}

impl StopCause {
    /// A shell's code for a process ended by the signal: 128 + its number.
    fn exit_code(self) -> u8 {
        match self {
            StopCause::Interrupt => 128 + capstan_process::Signal::INT.as_raw() as u8,
            StopCause::Terminate => 128 + capstan_process::Signal::TERM.as_raw() as u8,
            StopCause::Hangup => 128 + capstan_process::Signal::HUP.as_raw() as u8,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            StopCause::Interrupt => "interrupted (SIGINT)",
            StopCause::Terminate => "terminated (SIGTERM)",
            StopCause::Hangup => "hung up (SIGHUP)",
        }
    }
}

/// The stop request of a command: SIGINT, SIGTERM and SIGHUP each cancel `token` (the run
/// stops gracefully: in-flight operations are cancelled in their providers and every result is
/// recorded); a second signal ends the process at once (every record written so far is already
/// durable, and the reaper kills what providers started).
///
/// A closed output (`capstan apply | head`) is not a stop: the run goes on to its end without
/// output, so nothing is left half-done, and the exit code says the output was lost.
pub struct Stop {
    pub token: CancellationToken,
    cause: Rc<std::cell::Cell<Option<StopCause>>>,
}

impl Stop {
    pub fn watch() -> Stop {
        use tokio::signal::unix::{signal, SignalKind};
        let token = CancellationToken::new();
        let cause = Rc::new(std::cell::Cell::new(None));
        let stop = Stop {
            token: token.clone(),
            cause: cause.clone(),
        };
        let listen = |kind: SignalKind| signal(kind).ok();
        let (mut int, mut term, mut hup) = (
            listen(SignalKind::interrupt()),
            listen(SignalKind::terminate()),
            listen(SignalKind::hangup()),
        );
        async fn next(signal: &mut Option<tokio::signal::unix::Signal>) {
            match signal {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::task::spawn_local(async move {
            loop {
                let now = tokio::select! {
                    () = next(&mut int) => StopCause::Interrupt,
                    () = next(&mut term) => StopCause::Terminate,
                    () = next(&mut hup) => StopCause::Hangup,
                };
                match cause.get() {
                    None => {
                        cause.set(Some(now));
                        say!(
                            "{}: stopping gracefully: what runs is cancelled, and the state is saved (signal again to stop at once)",
                            now.describe()
                        );
                        token.cancel();
                    }
                    Some(_) => {
                        say!("{} again: stopping now; recorded state is safe, in-flight operations are left as interrupted", now.describe());
                        crate::output::finish_within(std::time::Duration::from_secs(1));
                        std::process::exit(now.exit_code() as i32);
                    }
                }
            }
        });
        stop
    }

    /// The exit code for a stopped command, if it was stopped.
    pub fn exit_code(&self) -> Option<ExitCode> {
        self.cause.get().map(|c| ExitCode::from(c.exit_code()))
    }

    /// The exit code of a command that stops because it was asked to.
    pub fn stopped_code(&self) -> ExitCode {
        self.exit_code().unwrap_or(ExitCode::from(EXIT_INTERRUPTED))
    }

    /// The exit code of a command that ran to its end: `ok` or not, and 141 (a shell's code
    /// for SIGPIPE) when its output was closed on the way, so nobody mistakes a run whose
    /// report was lost for a clean one.
    pub fn finished(&self, ok: bool) -> ExitCode {
        // Whether the output was closed is known once what was written so far has been.
        crate::output::flush();
        if let Some(code) = self.exit_code() {
            code
        } else if !ok {
            ExitCode::from(EXIT_FAILED)
        } else if crate::output::closed().is_cancelled() {
            ExitCode::from(EXIT_OUTPUT_CLOSED)
        } else {
            ExitCode::SUCCESS
        }
    }
}
