//! Where a deployment's state is kept: a directory (the default, `.capstan` beside the
//! deployment) or a PostgreSQL database shared by a team (`--state postgres://…`, or
//! `CAPSTAN_STATE`). The commands ask this one seam to look, or to lock and load.

use std::path::{Path, PathBuf};
use std::time::Duration;

use std::sync::Arc;

use capstan_engine::state::crypt::Keys;
use capstan_engine::state::{self, DirectoryBackend, LoadReport, Record, State, StateBackend};
use capstan_state_postgres::{Location, PgBackend};
use tokio::sync::oneshot;

/// A deployment's state, wherever it is.
#[derive(Clone, Debug)]
pub enum Store {
    Dir(PathBuf),
    Postgres(Box<Location>),
}

/// What a command that only looks reads.
pub struct Look {
    pub state: State,
    pub report: LoadReport,
    /// The command holding the state now, whose operations the pending ones may be.
    pub running: Option<String>,
    /// When the state last changed (seconds since the epoch), if it ever did.
    pub changed: Option<u64>,
}

impl Store {
    /// `--state` (or `CAPSTAN_STATE`): a `postgres://` URL, else a directory.
    pub fn parse(text: &str) -> Result<Store, String> {
        if capstan_state_postgres::is_postgres(text) {
            Location::parse(text).map(|l| Store::Postgres(Box::new(l)))
        } else if text.contains("://") || looks_like_a_url(text) {
            Err(format!(
                "{}: a state is a directory or a postgres:// URL",
                capstan_state_postgres::without_password(text)
            ))
        } else {
            Ok(Store::Dir(PathBuf::from(text)))
        }
    }

    /// The directory, for a state kept in one.
    pub fn dir(&self) -> Option<&Path> {
        match self {
            Store::Dir(dir) => Some(dir),
            Store::Postgres(_) => None,
        }
    }

    /// Whether there is a state to look at (a database is asked when read).
    pub fn exists(&self) -> bool {
        match self {
            Store::Dir(dir) => dir.exists(),
            Store::Postgres(_) => true,
        }
    }

    /// For messages.
    pub fn shown(&self) -> String {
        match self {
            Store::Dir(dir) => dir.display().to_string(),
            Store::Postgres(location) => location.to_string(),
        }
    }

    /// The state as it is now: no lock, nothing written; its secrets opened with `keys`.
    pub fn look(&self, keys: Option<&Arc<Keys>>) -> Result<Look, state::StateError> {
        match self {
            Store::Dir(dir) => {
                let (state, report) = state::read_only_with(dir, keys.map(|k| &**k))?;
                let changed = ["journal", "snapshot.json"]
                    .iter()
                    .filter_map(|name| std::fs::metadata(dir.join(name)).ok()?.modified().ok())
                    .max()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_secs());
                Ok(Look {
                    state,
                    report,
                    running: state::running_holder(dir),
                    changed,
                })
            }
            Store::Postgres(location) => {
                let look = capstan_state_postgres::read_only(location, keys.cloned())?;
                Ok(Look {
                    state: look.state,
                    report: look.report,
                    running: look.running,
                    changed: look.changed,
                })
            }
        }
    }

    /// Takes the lock (waiting up to `timeout`, telling `waiting` who holds it); `keys` will
    /// seal and open the state's secrets when it loads.
    pub fn lock(
        &self,
        timeout: Duration,
        waiting: &mut dyn FnMut(&str),
        keys: Option<&Arc<Keys>>,
    ) -> Result<Locked, state::StateError> {
        match self {
            Store::Dir(dir) => {
                let mut backend = DirectoryBackend::open_with(dir, timeout, waiting)?;
                backend.set_keys(keys.cloned());
                Ok(Locked::Dir(backend))
            }
            Store::Postgres(location) => {
                let mut backend = PgBackend::open(location, timeout, waiting)?;
                backend.set_keys(keys.cloned());
                Ok(Locked::Postgres(Box::new(backend)))
            }
        }
    }
}

/// A state locked by this command.
pub enum Locked {
    Dir(DirectoryBackend),
    Postgres(Box<PgBackend>),
}

impl Locked {
    /// Folds a long journal into a snapshot: once per run at most, never per resource.
    pub fn compact_if_large(&mut self) -> Result<(), state::StateError> {
        match self {
            Locked::Dir(backend) => {
                const JOURNAL_LIMIT: u64 = 4 * 1024 * 1024;
                let large = std::fs::metadata(backend.dir().join("journal"))
                    .map(|m| m.len() > JOURNAL_LIMIT)
                    .unwrap_or(false);
                if large {
                    backend.compact_stored()?;
                }
                Ok(())
            }
            Locked::Postgres(backend) => backend.compact_if_large(),
        }
    }

    /// Seals the state's secrets anew, with a data key sealed to `new` (after `load`).
    pub fn rekey(&mut self, new: Arc<Keys>) -> Result<(), state::StateError> {
        match self {
            Locked::Dir(backend) => backend.rekey(new),
            Locked::Postgres(backend) => backend.rekey(new),
        }
    }

    /// Whether a secret given now would be refused (after `load`): PostgreSQL without a key,
    /// a directory whose secrets are encrypted without one.
    pub fn refuses_clear_secrets(&self) -> bool {
        match self {
            Locked::Dir(backend) => backend.refuses_clear_secrets(),
            Locked::Postgres(backend) => !backend.can_seal(),
        }
    }

    fn inner(&self) -> &dyn StateBackend {
        match self {
            Locked::Dir(backend) => backend,
            Locked::Postgres(backend) => backend.as_ref(),
        }
    }
}

impl StateBackend for Locked {
    fn load(&mut self) -> Result<(State, LoadReport), state::StateError> {
        match self {
            Locked::Dir(backend) => backend.load(),
            Locked::Postgres(backend) => backend.load(),
        }
    }

    fn append(&self, records: Vec<Record>) -> oneshot::Receiver<Result<(), String>> {
        self.inner().append(records)
    }

    fn compact(&mut self, state: &State) -> Result<(), state::StateError> {
        match self {
            Locked::Dir(backend) => backend.compact(state),
            Locked::Postgres(backend) => backend.compact(state),
        }
    }

    fn mark_sent(&self, addresses: &[String]) -> Result<(), state::StateError> {
        self.inner().mark_sent(addresses)
    }
}

/// `postgres:/db`, `postgresql:host/db`: a scheme (letters, then `:`) — a URL mistyped, never a
/// directory to make.
fn looks_like_a_url(text: &str) -> bool {
    match text.split_once(':') {
        Some((scheme, _)) => {
            !scheme.is_empty()
                && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        }
        None => false,
    }
}
