//! Capstan's state in PostgreSQL, so that a team shares it: `--state postgres://…?deployment=NAME`.
//!
//! It keeps the journal's promises (see `capstan-state`): an operation's intent is committed
//! before its provider is called and its result right after; records that finish together are
//! committed in one transaction (group commit); nothing is updated in place — every record stays,
//! with its time and the run it came from, which is what `capstan state history` and
//! `state show --at RUN` read. Many deployments share one database, each under its name.
//!
//! The lock is a session-level advisory lock per deployment, held by the connection that
//! writes: a holder killed with `-9` loses its connection and the lock with it, at once. The
//! one refused is told who holds it (the holder's run row: user, host, pid, command, since).
//! Commands that only look take no lock and read one consistent snapshot (a `REPEATABLE READ`,
//! read-only transaction), and write nothing, not even Capstan's tables.
//!
//! `postgres::Client` runs its own Tokio runtime, which cannot be entered from a thread that
//! already runs one: every connection here lives on a thread of its own, and callers wait on
//! channels.

#![forbid(unsafe_code)]

use std::collections::{BTreeSet, HashSet};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use capstan_state::crypt::{self, Crypt, Keys, StoredKey};
use capstan_state::{in_clear_refused, LoadReport, Record, State, StateBackend, StateError};
use postgres::{Client, GenericClient, NoTls};
use std::sync::Arc;
use tokio::sync::oneshot;

mod backend;
mod fold;
mod location;
mod look;
mod marks;
mod schema;

pub use backend::PgBackend;
pub use location::{is_postgres, without_password, Location};
pub use look::{history, read_only, state_at, Look, RunSummary};
pub use schema::SCHEMA_VERSION;
use schema::{Found, LOCK_CLASS};

/// A new snapshot once this many records follow the last one.
const SNAPSHOT_AFTER_RECORDS: i64 = 20_000;

/// A PostgreSQL error in words: the server's message (with its detail and hint), else the
/// client's, with its cause.
pub(crate) fn describe(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut text = db.message().to_string();
        if let Some(detail) = db.detail() {
            text.push_str(&format!(" ({detail})"));
        }
        if let Some(hint) = db.hint() {
            text.push_str(&format!("; {hint}"));
        }
        return text;
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let said = cause.to_string();
        if !text.contains(&said) {
            text.push_str(&format!(": {said}"));
        }
        source = cause.source();
    }
    text
}

fn failed(location: &Location, message: impl Into<String>) -> StateError {
    StateError::Backend {
        place: location.to_string(),
        message: message.into(),
    }
}

/// Opens a connection.
fn connect(location: &Location) -> Result<Client, StateError> {
    location.config.connect(NoTls).map_err(|e| {
        failed(
            location,
            format!(
                "cannot connect to PostgreSQL: {}{}",
                describe(&e),
                if e.as_db_error().is_none() {
                    " (is the server running there, and does it take connections from here?)"
                } else {
                    ""
                }
            ),
        )
    })
}

/// Runs `work` with a new connection, on a thread of its own.
fn with_connection<T: Send + 'static>(
    location: &Location,
    work: impl FnOnce(&mut Client, &Location) -> Result<T, StateError> + Send + 'static,
) -> Result<T, StateError> {
    let location = location.clone();
    std::thread::Builder::new()
        .name("capstan-postgres".into())
        .spawn(move || {
            let mut client = connect(&location)?;
            work(&mut client, &location)
        })
        .map_err(|e| StateError::WriterGone(e.to_string()))?
        .join()
        .unwrap_or_else(|_| {
            Err(StateError::WriterGone(
                "the database thread panicked".into(),
            ))
        })
}

/// The deployment's id, if Capstan's tables and the deployment are there (nothing written).
fn find_deployment(
    client: &mut impl GenericClient,
    location: &Location,
) -> Result<Option<i32>, StateError> {
    let found = schema::inspect(client).map_err(|e| failed(location, describe(&e)))?;
    schema::check(&found).map_err(|e| failed(location, e))?;
    if matches!(found, Found::Nothing) {
        return Ok(None);
    }
    let row = client
        .query_opt(
            "SELECT id FROM capstan.deployments WHERE name = $1",
            &[&location.name],
        )
        .map_err(|e| failed(location, describe(&e)))?;
    Ok(row.map(|r| r.get(0)))
}
