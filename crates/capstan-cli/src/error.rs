//! The CLI's one error path: every command returns `Result<ExitCode, CliError>`, and
//! [`CliError::report`] is the one place an error is printed and turned into an exit code.

use std::process::ExitCode;

use capstan_engine::session::SessionError;

use crate::stop::{Stop, EXIT_FAILED, EXIT_INVALID};

/// Why a command stopped, with the exit code it means.
#[derive(Debug)]
pub enum CliError {
    /// The deployment, a flag, a parameter, a provider or the state is wrong (exit 2).
    Invalid(String),
    /// Something that was tried failed: the state could not be written (exit 1).
    Failed(String),
    /// Already said (a signal, a closed output, a declined question): exit with this code.
    Exit(ExitCode),
}

impl CliError {
    /// Prints the error (once, through the secrets' redaction) and gives its exit code.
    pub fn report(self) -> ExitCode {
        match self {
            CliError::Invalid(message) => {
                say!("error: {message}");
                ExitCode::from(EXIT_INVALID)
            }
            CliError::Failed(message) => {
                say!("error: {message}");
                ExitCode::from(EXIT_FAILED)
            }
            CliError::Exit(code) => code,
        }
    }

    /// The message and exit code of an error not yet said; `None` for one already said.
    pub fn message_and_code(&self) -> Option<(&str, u8)> {
        match self {
            CliError::Invalid(message) => Some((message, EXIT_INVALID)),
            CliError::Failed(message) => Some((message, EXIT_FAILED)),
            CliError::Exit(_) => None,
        }
    }

    pub fn from_session(error: SessionError, stop: &Stop) -> Self {
        match error {
            SessionError::Invalid(message) => CliError::Invalid(message),
            SessionError::State(e) => CliError::Failed(format!(
                "the state could not be written, so the run stopped: {e}"
            )),
            SessionError::Stopped => CliError::Exit(stop.stopped_code()),
        }
    }
}

impl From<anyhow::Error> for CliError {
    /// A usage or input error from a command that reports with `anyhow`: the chain of
    /// causes, each once (many messages already quote their cause).
    fn from(e: anyhow::Error) -> Self {
        let mut text = e.to_string();
        for cause in e.chain().skip(1) {
            let cause = cause.to_string();
            if !text.contains(&cause) {
                text.push_str(": ");
                text.push_str(&cause);
            }
        }
        CliError::Invalid(text)
    }
}
