//! What can go wrong starting, calling and stopping a provider. Every message names the
//! provider, and where it helps, the resource, the exit status and the provider's last words.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use capstan_schema::OperationError;

/// How a provider process ended, in words.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ExitDescription {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
    /// Still running, or its status could not be learned in time.
    #[default]
    Unknown,
}

impl ExitDescription {
    pub(crate) fn from_status(status: Option<ExitStatus>) -> Self {
        use std::os::unix::process::ExitStatusExt;
        match status {
            Some(s) => match (s.code(), s.signal()) {
                (Some(code), _) => ExitDescription::Code(code),
                (None, Some(signal)) => ExitDescription::Signal(signal),
                (None, None) => ExitDescription::Unknown,
            },
            None => ExitDescription::Unknown,
        }
    }
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}

impl std::fmt::Display for ExitDescription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitDescription::Code(code) => write!(f, "exited with status {code}"),
            ExitDescription::Signal(signal) => {
                write!(f, "was killed by {} ({signal})", signal_name(*signal))
            }
            ExitDescription::Unknown => write!(f, "stopped answering (exit status unknown)"),
        }
    }
}

/// The last lines a provider wrote to stderr/stdout, formatted for an error message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OutputTail(pub Vec<String>);

impl std::fmt::Display for OutputTail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            return write!(f, " (it wrote nothing to stderr)");
        }
        write!(f, "; its last output:")?;
        for line in &self.0 {
            write!(f, "\n    {line}")?;
        }
        Ok(())
    }
}

/// A provider could not be started or connected to.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("provider `{provider}`: executable `{program}` not found{}",
        if *.searched_path { " on PATH; give a path, or install it" } else { "; check the path" })]
    NotFound {
        provider: String,
        program: String,
        searched_path: bool,
    },
    #[error("provider `{provider}`: {} is not executable; run `chmod +x {}`", .path.display(), .path.display())]
    NotExecutable { provider: String, path: PathBuf },
    #[error("provider `{provider}`: cannot start {}: {source}", .path.display())]
    Spawn {
        provider: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("provider `{provider}`: cannot connect to {}: {source}; is the provider service running?", .socket.display())]
    Connect {
        provider: String,
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("provider `{provider}`: the socket {} is served by {served_by}, not by {expected}: refused (it would be sent inputs, secrets among them). If that user's service is the one meant, name it in the provider's declaration: \"owner\": {owner_hint}", .socket.display())]
    UntrustedSocket {
        provider: String,
        socket: PathBuf,
        served_by: String,
        expected: String,
        /// The peer as the deployment would name it (`"alice"`, or a uid).
        owner_hint: String,
    },
    #[error("provider `{provider}` {status} before completing the handshake{tail}")]
    ExitedEarly {
        provider: String,
        status: ExitDescription,
        tail: OutputTail,
    },
    /// A provider served in the core's own process could not be set up (the Terraform
    /// bridge: the Terraform provider did not start, or its schema could not be read).
    #[error("provider `{provider}`: {message}")]
    InProcess { provider: String, message: String },
    #[error("provider `{provider}` did not answer the handshake within {after:?}; is it a Capstan provider?{tail}")]
    HandshakeTimeout {
        provider: String,
        after: Duration,
        tail: OutputTail,
    },
    #[error("provider `{provider}` does not speak the Capstan protocol: {message}{tail}")]
    Protocol {
        provider: String,
        message: String,
        tail: OutputTail,
    },
    #[error("provider `{provider}` speaks protocol versions {}..={} but this capstan speaks {}..={}; {}",
        .theirs.0, .theirs.1, .ours.0, .ours.1,
        if .theirs.1 < .ours.0 { "upgrade the provider" } else { "upgrade capstan" })]
    Incompatible {
        provider: String,
        theirs: (u32, u32),
        ours: (u32, u32),
    },
}

/// An operation did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The provider ran the operation and reported a failure.
    #[error("{address}: {error}")]
    Failed {
        address: String,
        error: OperationError,
    },
    #[error("{address}: provider `{provider}` {status} during the operation{tail}")]
    ProviderExited {
        provider: String,
        address: String,
        status: ExitDescription,
        tail: OutputTail,
    },
    #[error("{address}: lost the connection to provider `{provider}`: {reason}")]
    Disconnected {
        provider: String,
        address: String,
        reason: String,
    },
    #[error("{address}: provider `{provider}` did not finish within {after:?}; the operation was cancelled")]
    Timeout {
        provider: String,
        address: String,
        after: Duration,
    },
    #[error("{address}: the request is {}, over the {} message limit of provider `{provider}`, so it was not sent (nothing was done); raise the limit with --max-message-mib N or the provider's `maxMessageMiB`", size(*.bytes), size(*.limit))]
    RequestTooLarge {
        provider: String,
        address: String,
        bytes: u64,
        limit: u64,
    },
    #[error("{address}: a message from provider `{provider}` was {}, over the {} message limit — most likely this operation's result — so the connection was closed; raise the limit with --max-message-mib N or the provider's `maxMessageMiB`", size(*.bytes), size(*.limit))]
    ResponseTooLarge {
        provider: String,
        address: String,
        bytes: u64,
        limit: u64,
    },
    /// The provider was gone before the request was sent: nothing was done.
    #[error("{address}: not sent, so nothing was done: provider `{provider}` is no longer running ({why})")]
    NotSent {
        provider: String,
        address: String,
        /// How it went (its exit, or the connection's end).
        why: String,
    },
    #[error("{address}: provider `{provider}` sent a malformed response: {message}")]
    BadResponse {
        provider: String,
        address: String,
        message: String,
    },
}

/// A size for a message: "20.3 MB" (decimal, as `ls -l --si` and most people count) or
/// "16 MiB" for a limit set in MiB.
fn size(bytes: u64) -> String {
    if bytes & (1024 * 1024 - 1) == 0 {
        format!("{} MiB", bytes / (1024 * 1024))
    } else {
        format!("{:.1} MB", bytes as f64 / 1e6)
    }
}

impl CallError {
    /// The error kind the core may act on, for failures the provider reported itself.
    pub fn kind(&self) -> Option<capstan_schema::ErrorKind> {
        match self {
            CallError::Failed { error, .. } => Some(error.kind),
            _ => None,
        }
    }
}
