//! The failure of one operation, as both sides of the protocol see it.

use crate::provider_capnp;

/// What the core may do about a failed operation (schema: `ErrorKind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// Will fail again the same way; a person must change something.
    Permanent,
    /// The inputs are wrong: the deployment must change.
    InvalidInput,
    /// May succeed if retried.
    Transient,
    /// Stopped because it was cancelled.
    Cancelled,
    /// A bug in the provider, such as a panic.
    Internal,
    /// From `read` only: the resource does not exist.
    NotFound,
    /// The provider's own settings are wrong, not the operation's inputs.
    Settings,
}

impl ErrorKind {
    /// The kind's name as it appears in JSON and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Permanent => "permanent",
            ErrorKind::InvalidInput => "invalid_input",
            ErrorKind::Transient => "transient",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Internal => "internal",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Settings => "settings",
        }
    }

    /// Reads a kind from the wire; values added by a newer schema read as `Permanent`.
    pub fn from_wire(kind: Result<provider_capnp::ErrorKind, capnp::NotInSchema>) -> Self {
        use provider_capnp::ErrorKind as W;
        match kind {
            Ok(W::Permanent) | Err(_) => ErrorKind::Permanent,
            Ok(W::InvalidInput) => ErrorKind::InvalidInput,
            Ok(W::Transient) => ErrorKind::Transient,
            Ok(W::Cancelled) => ErrorKind::Cancelled,
            Ok(W::Internal) => ErrorKind::Internal,
            Ok(W::NotFound) => ErrorKind::NotFound,
            Ok(W::Settings) => ErrorKind::Settings,
        }
    }

    /// The wire value of this kind.
    pub fn to_wire(self) -> provider_capnp::ErrorKind {
        use provider_capnp::ErrorKind as W;
        match self {
            ErrorKind::Permanent => W::Permanent,
            ErrorKind::InvalidInput => W::InvalidInput,
            ErrorKind::Transient => W::Transient,
            ErrorKind::Cancelled => W::Cancelled,
            ErrorKind::Internal => W::Internal,
            ErrorKind::NotFound => W::NotFound,
            ErrorKind::Settings => W::Settings,
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed operation, reported by the provider in the operation's result (schema:
/// `OperationError`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct OperationError {
    /// What the core may do about it.
    pub kind: ErrorKind,
    /// One line a user can act on.
    pub message: String,
    /// Longer context (last lines of output, a backtrace); may be empty.
    pub details: String,
}

impl OperationError {
    /// An error of the given kind with no details.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        OperationError {
            kind,
            message: message.into(),
            details: String::new(),
        }
    }

    /// A permanent error.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Permanent, message)
    }

    /// The inputs are wrong.
    pub fn invalid_input(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidInput, message)
    }

    /// Worth retrying.
    pub fn transient(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Transient, message)
    }

    /// The operation was cancelled.
    pub fn cancelled(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Cancelled, message)
    }

    /// A bug in the provider.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }

    /// From `read`: the resource does not exist.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    /// Adds longer context.
    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// Reads an error from the wire.
    pub fn read(reader: provider_capnp::operation_error::Reader<'_>) -> capnp::Result<Self> {
        Ok(OperationError {
            kind: ErrorKind::from_wire(reader.get_kind()),
            message: reader.get_message()?.to_string()?,
            details: reader.get_details()?.to_string()?,
        })
    }

    /// Writes this error to the wire.
    pub fn write(&self, mut builder: provider_capnp::operation_error::Builder<'_>) {
        builder.set_kind(self.kind.to_wire());
        builder.set_message(&self.message[..]);
        builder.set_details(&self.details[..]);
    }
}
