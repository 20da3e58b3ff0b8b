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

mod location;
mod schema;

pub use location::{is_postgres, without_password, Location};
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

/// One consistent, read-only look: a `REPEATABLE READ` transaction, and the deployment's id if
/// Capstan's tables and the deployment are there (nothing is written, not even the tables).
fn look_at<'a>(
    client: &'a mut Client,
    location: &Location,
) -> Result<(postgres::Transaction<'a>, Option<i32>), StateError> {
    let mut tx = client
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .map_err(|e| failed(location, describe(&e)))?;
    let deployment = find_deployment(&mut tx, location)?;
    Ok((tx, deployment))
}

/// What a command that only looks reads.
pub struct Look {
    pub state: State,
    pub report: LoadReport,
    /// The command holding the deployment's lock now, if one does: the pending operations may
    /// be its own, in flight.
    pub running: Option<String>,
    /// When the last record was written (seconds since the epoch), if any was.
    pub changed: Option<u64>,
}

/// The state as it is now, for a command that only looks: no lock, nothing written (not even
/// Capstan's tables), one consistent snapshot. A database without this deployment is an empty
/// state.
pub fn read_only(location: &Location, keys: Option<Arc<Keys>>) -> Result<Look, StateError> {
    with_connection(location, move |client, location| {
        let db = |e: postgres::Error| failed(location, describe(&e));
        let (mut tx, deployment) = look_at(client, location)?;
        let Some(deployment) = deployment else {
            return Ok(Look {
                state: State::default(),
                report: LoadReport::default(),
                running: None,
                changed: None,
            });
        };
        // Who holds it, before the snapshot and after: one that ended in between had its
        // operations in flight in what was read.
        let before = holder(&mut tx, deployment).map_err(db)?;
        let (mut state, mut report, _) =
            fold(&mut tx, deployment, None).map_err(|e| failed(location, e))?;
        let crypt = open_keys(&mut tx, location, deployment, keys.as_deref())?;
        open_folded(location, &mut state, &mut report, crypt.as_ref())?;
        let running = holder(&mut tx, deployment).map_err(db)?.or(before);
        if running.is_none() {
            report.never_sent = never_sent(&mut tx, &state).map_err(db)?;
            for address in &report.never_sent {
                state.pending.remove(address);
            }
        }
        let changed = tx
            .query_one(
                "SELECT extract(epoch FROM max(time))::bigint FROM capstan.records WHERE deployment = $1",
                &[&deployment],
            )
            .map_err(db)?
            .get::<_, Option<i64>>(0)
            .map(|t| t.max(0) as u64);
        tx.commit().map_err(db)?;
        Ok(Look {
            state,
            report,
            running,
            changed,
        })
    })
}

/// The state as it was when run `run` ended (every record of that run and the runs before).
pub fn state_at(
    location: &Location,
    run: i64,
    keys: Option<Arc<Keys>>,
) -> Result<(State, LoadReport), StateError> {
    with_connection(location, move |client, location| {
        let db = |e: postgres::Error| failed(location, describe(&e));
        let (mut tx, deployment) = look_at(client, location)?;
        let Some(deployment) = deployment else {
            return Err(failed(location, "no state here yet, so no runs"));
        };
        let known = tx
            .query_opt(
                "SELECT 1 FROM capstan.runs WHERE deployment = $1 AND id = $2",
                &[&deployment, &run],
            )
            .map_err(db)?;
        if known.is_none() {
            return Err(failed(
                location,
                format!(
                    "no run {run} in this deployment's history; `capstan state history` lists them"
                ),
            ));
        }
        let (mut state, mut report, _) =
            fold(&mut tx, deployment, Some(run)).map_err(|e| failed(location, e))?;
        let crypt = open_keys(&mut tx, location, deployment, keys.as_deref())?;
        open_folded(location, &mut state, &mut report, crypt.as_ref())?;
        Ok((state, report))
    })
}

/// One run in a deployment's history.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RunSummary {
    pub run: i64,
    /// Seconds since the Unix epoch.
    pub started: u64,
    /// The database user.
    pub db_user: String,
    /// Who ran it: `user`, `host`, `pid`, `command`.
    pub holder: serde_json::Value,
    /// Operations started, by kind (`create`, `update`, `delete`, `read`).
    pub operations: std::collections::BTreeMap<String, i64>,
    pub failed: i64,
    /// Resources recorded as they now are / as gone.
    pub recorded: i64,
    pub deleted: i64,
}

/// Every run of the deployment, oldest first.
pub fn history(location: &Location) -> Result<Vec<RunSummary>, StateError> {
    with_connection(location, |client, location| {
        let db = |e: postgres::Error| failed(location, describe(&e));
        let (mut tx, deployment) = look_at(client, location)?;
        let Some(deployment) = deployment else {
            return Ok(Vec::new());
        };
        let mut runs: Vec<RunSummary> = tx
            .query(
                "SELECT id, extract(epoch FROM started)::bigint, db_user, holder::text \
                 FROM capstan.runs WHERE deployment = $1 ORDER BY id",
                &[&deployment],
            )
            .map_err(db)?
            .into_iter()
            .map(|row| RunSummary {
                run: row.get(0),
                started: row.get::<_, i64>(1).max(0) as u64,
                db_user: row.get(2),
                holder: serde_json::from_str(row.get(3)).unwrap_or_default(),
                operations: Default::default(),
                failed: 0,
                recorded: 0,
                deleted: 0,
            })
            .collect();
        let counts = tx
            .query(
                "SELECT run, kind, coalesce(operation, ''), count(*) FROM capstan.records \
                 WHERE deployment = $1 GROUP BY 1, 2, 3",
                &[&deployment],
            )
            .map_err(db)?;
        for row in counts {
            let run: i64 = row.get(0);
            let Some(summary) = runs.iter_mut().find(|r| r.run == run) else {
                continue;
            };
            let n: i64 = row.get(3);
            match row.get::<_, &str>(1) {
                "intent" => *summary.operations.entry(row.get(2)).or_default() += n,
                "failed" => summary.failed += n,
                "done" => summary.recorded += n,
                "deleted" => summary.deleted += n,
                _ => {}
            }
        }
        Ok(runs)
    })
}

/// Folds the latest snapshot and the records after it (up to run `upto_run`'s end, if given:
/// then from the beginning). Returns the state, what was read, and the last record's number.
fn fold(
    client: &mut impl GenericClient,
    deployment: i32,
    upto_run: Option<i64>,
) -> Result<(State, LoadReport, i64), String> {
    fold_rows(client, deployment, upto_run).map_err(|e| match e {
        Folding::Db(e) => describe(&e),
        Folding::BadSnapshot(upto) => format!(
            "the snapshot of the records up to {upto} does not read as a state; nothing was changed (the records it folds are all kept: delete that row of capstan.snapshots to fold them again)"
        ),
    })
}

enum Folding {
    Db(postgres::Error),
    BadSnapshot(i64),
}

impl From<postgres::Error> for Folding {
    fn from(e: postgres::Error) -> Self {
        Folding::Db(e)
    }
}

fn fold_rows(
    client: &mut impl GenericClient,
    deployment: i32,
    upto_run: Option<i64>,
) -> Result<(State, LoadReport, i64), Folding> {
    let mut state = State::default();
    let mut after: i64 = 0;
    if upto_run.is_none() {
        if let Some(row) = client.query_opt(
            "SELECT upto, state FROM capstan.snapshots WHERE deployment = $1 \
             ORDER BY upto DESC LIMIT 1",
            &[&deployment],
        )? {
            after = row.get(0);
            state = match serde_json::from_str(row.get(1)) {
                Ok(state) => state,
                // Never an empty state in its place: everything before it would be forgotten.
                Err(_) => return Err(Folding::BadSnapshot(after)),
            };
        }
    }
    let rows = client.query(
        "SELECT seq, record FROM capstan.records WHERE deployment = $1 AND seq > $2 \
         AND ($3::bigint IS NULL OR run <= $3) ORDER BY seq",
        &[&deployment, &after, &upto_run],
    )?;
    let mut report = LoadReport::default();
    let mut last = after;
    for row in rows {
        last = row.get(0);
        match serde_json::from_str::<Record>(row.get(1)) {
            Ok(record) => {
                state.apply_owned(record);
                report.records += 1;
            }
            // Written by a newer Capstan of the same schema version, or by hand.
            Err(_) => report.damaged.push(last as usize),
        }
    }
    state.resources.sort_unstable_keys();
    Ok((state, report, last))
}

/// The deployment's sealed data keys, oldest first (none before the tables had them).
fn stored_keys(
    client: &mut impl GenericClient,
    deployment: i32,
) -> Result<Vec<StoredKey>, postgres::Error> {
    let table: bool = client
        .query_one("SELECT to_regclass('capstan.keys') IS NOT NULL", &[])?
        .get(0);
    if !table {
        return Ok(Vec::new());
    }
    Ok(client
        .query(
            "SELECT id, sealed, extract(epoch FROM time)::bigint FROM capstan.keys \
             WHERE deployment = $1 ORDER BY seq",
            &[&deployment],
        )?
        .iter()
        .map(|row| StoredKey {
            id: row.get(0),
            sealed: row.get(1),
            time: row.get::<_, i64>(2).max(0) as u64,
        })
        .collect())
}

/// The data keys `keys` opens, if the state has any and a key was given.
fn open_keys(
    client: &mut impl GenericClient,
    location: &Location,
    deployment: i32,
    keys: Option<&Keys>,
) -> Result<Option<Crypt>, StateError> {
    let stored = stored_keys(client, deployment).map_err(|e| failed(location, describe(&e)))?;
    match keys {
        Some(keys) if !stored.is_empty() => {
            Crypt::open(&stored, keys)
                .map(Some)
                .map_err(|message| StateError::Keys {
                    place: location.to_string(),
                    message,
                })
        }
        _ => Ok(None),
    }
}

/// Opens the secrets of a folded state; notes in `report` the resources whose secrets no key
/// given opens.
fn open_folded(
    location: &Location,
    state: &mut State,
    report: &mut LoadReport,
    crypt: Option<&Crypt>,
) -> Result<(), StateError> {
    let mut opening = crypt::Opening::default();
    crypt::open_state(crypt, state, &mut opening);
    if !opening.damaged.is_empty() {
        return Err(StateError::Keys {
            place: location.to_string(),
            message: format!(
                "encrypted values that do not open: {}",
                opening.damaged.join("; ")
            ),
        });
    }
    report.locked = opening.locked.into_iter().collect();
    Ok(())
}

/// The pending operations of runs whose sent marks can be trusted (written while the server
/// ran as it runs now: a crash since may have lost them), that those runs never sent.
fn never_sent(
    client: &mut impl GenericClient,
    state: &State,
) -> Result<Vec<String>, postgres::Error> {
    let runs: BTreeSet<i64> = state
        .pending
        .values()
        .filter_map(|p| p.run)
        .map(|r| r as i64)
        .collect();
    if runs.is_empty() {
        return Ok(Vec::new());
    }
    let runs: Vec<i64> = runs.into_iter().collect();
    // Trusted: the run's marks survived (its `alive` row is there: no crash recovery since,
    // which empties that UNLOGGED table and may have lost marks committed without waiting for
    // the disk), and nothing of it can still send (its marks connection, which holds the run's
    // lock, is gone).
    let alive = client
        .query_one("SELECT to_regclass('capstan.alive') IS NOT NULL", &[])?
        .get::<_, bool>(0);
    if !alive {
        return Ok(Vec::new());
    }
    let trusted: HashSet<i64> = client
        .query(
            "SELECT r.id FROM capstan.runs r JOIN capstan.alive a ON a.run = r.id \
             WHERE r.id = ANY($1) AND r.postmaster_start = pg_postmaster_start_time() \
             AND NOT EXISTS (SELECT 1 FROM pg_locks l WHERE l.locktype = 'advisory' \
                 AND l.classid = $2::int4::oid AND l.objid = (r.id % 2147483647)::int4::oid \
                 AND l.objsubid = 2)",
            &[&runs, &schema::RUN_LOCK_CLASS],
        )?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if trusted.is_empty() {
        return Ok(Vec::new());
    }
    let trusted_list: Vec<i64> = trusted.iter().copied().collect();
    let sent: HashSet<(i64, String)> = client
        .query(
            "SELECT run, address FROM capstan.sent WHERE run = ANY($1)",
            &[&trusted_list],
        )?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    Ok(state
        .pending
        .iter()
        .filter_map(|(address, op)| {
            let run = op.run? as i64;
            (trusted.contains(&run) && !sent.contains(&(run, address.clone())))
                .then(|| address.clone())
        })
        .collect())
}

/// Who holds the deployment's lock now, if anyone.
fn holder(
    client: &mut impl GenericClient,
    deployment: i32,
) -> Result<Option<String>, postgres::Error> {
    let pid: Option<i32> = client
        .query_opt(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted \
             AND classid = $1::int4::oid AND objid = $2::int4::oid AND objsubid = 2",
            &[&LOCK_CLASS, &deployment],
        )?
        .and_then(|r| r.get(0));
    let Some(pid) = pid else {
        return Ok(None);
    };
    let run = client.query_opt(
        "SELECT holder::text, db_user FROM capstan.runs WHERE deployment = $1 AND backend_pid = $2 \
         ORDER BY id DESC LIMIT 1",
        &[&deployment, &pid],
    )?;
    Ok(Some(match run {
        Some(row) => format!(
            "{} as database user {}",
            capstan_state::describe_holder(row.get(0)),
            row.get::<_, &str>(1)
        ),
        None => format!("another capstan (database session {pid})"),
    }))
}

/// What this process tells others about itself (the lock holder's description; any password
/// on its command line hidden).
fn holder_json() -> String {
    capstan_state::holder_description()
}

/// Work for the connection's thread.
enum Job {
    Append(Vec<Record>, oneshot::Sender<Result<(), String>>),
    Call(Box<dyn FnOnce(&mut Conn) + Send>),
}

/// The connection that holds the lock and writes.
struct Conn {
    client: Client,
    /// The group commit's statement, prepared once.
    insert_records: Option<postgres::Statement>,
    deployment: i32,
    run: i64,
    /// The first failed write: nothing is written after it.
    broken: Option<String>,
    /// Records since the last snapshot.
    since_snapshot: i64,
    /// The state's data keys, opened (from `load`, with a key given).
    crypt: Option<Arc<Crypt>>,
}

/// A deployment's state in PostgreSQL, locked by this process while it lives.
pub struct PgBackend {
    location: Location,
    /// The sent marks' connection, from `load` on.
    marks: Option<Marks>,
    /// The key given for the state's secrets, and whether it could seal them (after `load`).
    keys: Option<Arc<Keys>>,
    can_seal: bool,
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
    run: i64,
}

impl PgBackend {
    /// Connects, makes or checks Capstan's tables, and takes the deployment's lock, waiting up
    /// to `lock_timeout` for another holder (telling `waiting` once who that is).
    pub fn open(
        location: &Location,
        lock_timeout: Duration,
        waiting: &mut dyn FnMut(&str),
    ) -> Result<PgBackend, StateError> {
        let (ready, opened) = mpsc::channel();
        let (jobs, queue) = mpsc::channel::<Job>();
        let for_thread = location.clone();
        let thread = std::thread::Builder::new()
            .name("capstan-postgres".into())
            .spawn(move || {
                let location = for_thread;
                let setup = (|| {
                    let mut client = connect(&location)?;
                    // The lock lives with this session: it must not end on its own.
                    let _ = client.batch_execute("SET idle_session_timeout = 0");
                    schema::ensure(&mut client).map_err(|e| failed(&location, e))?;
                    let db = |e: postgres::Error| failed(&location, describe(&e));
                    client
                        .execute(
                            "INSERT INTO capstan.deployments (name) VALUES ($1) ON CONFLICT (name) DO NOTHING",
                            &[&location.name],
                        )
                        .map_err(db)?;
                    let deployment: i32 = client
                        .query_one(
                            "SELECT id FROM capstan.deployments WHERE name = $1",
                            &[&location.name],
                        )
                        .map_err(db)?
                        .get(0);
                    Ok::<_, StateError>(Conn {
                        client,
                        insert_records: None,
                        deployment,
                        run: 0,
                        broken: None,
                        since_snapshot: 0,
                        crypt: None,
                    })
                })();
                match setup {
                    Ok(conn) => {
                        let _ = ready.send(Ok(()));
                        serve(conn, queue);
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                    }
                }
            })
            .map_err(|e| StateError::WriterGone(e.to_string()))?;
        let mut backend = PgBackend {
            location: location.clone(),
            marks: Some(Marks::start(location)),
            keys: None,
            can_seal: false,
            jobs: Some(jobs),
            thread: Some(thread),
            run: 0,
        };
        opened.recv().unwrap_or_else(|_| {
            Err(StateError::WriterGone("the database thread stopped".into()))
        })?;
        let started = Instant::now();
        let mut told = false;
        loop {
            let holder = backend.call(|conn| {
                let db = |e: postgres::Error| describe(&e);
                let got: bool = conn
                    .client
                    .query_one(
                        "SELECT pg_try_advisory_lock($1, $2)",
                        &[&LOCK_CLASS, &conn.deployment],
                    )
                    .map_err(db)?
                    .get(0);
                if got {
                    return Ok(None);
                }
                let holder = holder(&mut conn.client, conn.deployment).map_err(db)?;
                // Let go between its check and ours: try again at once.
                Ok(Some(holder.unwrap_or_default()))
            })?;
            let Some(holder) = holder else { break };
            if holder.is_empty() {
                continue;
            }
            if lock_timeout.is_zero() || started.elapsed() >= lock_timeout {
                return Err(StateError::LockedBy {
                    place: location.to_string(),
                    holder,
                });
            }
            if !told {
                waiting(&holder);
                told = true;
            }
            std::thread::sleep(Duration::from_millis(100).min(lock_timeout));
        }
        let holder = holder_json();
        backend.run = backend.call(move |conn| {
            let run: i64 = conn
                .client
                .query_one(
                    "INSERT INTO capstan.runs (deployment, holder) VALUES ($1, $2::text::jsonb) RETURNING id",
                    &[&conn.deployment, &holder],
                )
                .map_err(|e| describe(&e))?
                .get(0);
            conn.run = run;
            Ok(run)
        })?;
        Ok(backend)
    }

    /// The key that seals and opens the state's secrets (before `load`). Without one, a
    /// secret is never written: PostgreSQL's state holds none in clear.
    pub fn set_keys(&mut self, keys: Option<Arc<Keys>>) {
        self.keys = keys;
    }

    /// Seals the state's secrets with a new data key sealed to `new` (after `load`, which
    /// opened the current ones): a new key row and a new snapshot sealed with it. Earlier
    /// records keep what they were sealed with (nothing is rewritten).
    pub fn rekey(&mut self, new: Arc<Keys>) -> Result<(), StateError> {
        let location = self.location.clone();
        let sealing = new.clone();
        self.call(move |conn| {
            let db = |e: postgres::Error| describe(&e);
            let mut tx = conn.client.transaction().map_err(db)?;
            let (mut state, mut report, last) = fold(&mut tx, conn.deployment, None)?;
            open_folded(&location, &mut state, &mut report, conn.crypt.as_deref())
                .map_err(|e| e.to_string())?;
            if !report.locked.is_empty() {
                return Err(format!(
                    "the secrets of {} do not open with the key given, so they cannot be sealed again",
                    report.locked.join(", ")
                ));
            }
            let (key, crypt) = Crypt::new_key(&sealing, None)?;
            tx.execute(
                "INSERT INTO capstan.keys (deployment, id, sealed) VALUES ($1, $2, $3)",
                &[&conn.deployment, &key.id, &key.sealed],
            )
            .map_err(db)?;
            let text = serde_json::to_string(&crypt::seal_state(&crypt, &state))
                .expect("states serialize");
            tx.execute(
                "INSERT INTO capstan.snapshots (deployment, upto, run, state) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (deployment, upto) DO UPDATE SET state = excluded.state, run = excluded.run",
                &[&conn.deployment, &last, &conn.run, &text],
            )
            .map_err(db)?;
            tx.commit().map_err(db)?;
            conn.crypt = Some(Arc::new(crypt));
            conn.since_snapshot = 0;
            Ok(())
        })?;
        self.keys = Some(new);
        self.can_seal = true;
        Ok(())
    }

    /// Whether secrets can be written (after `load`): only sealed, with a key given.
    pub fn can_seal(&self) -> bool {
        self.can_seal
    }

    /// Where the state is.
    pub fn location(&self) -> &Location {
        &self.location
    }

    /// This run's number in the history.
    pub fn run(&self) -> i64 {
        self.run
    }

    /// Runs `work` on the connection's thread and waits for it.
    fn call<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Conn) -> Result<T, String> + Send + 'static,
    ) -> Result<T, StateError> {
        let (reply, answer) = mpsc::channel();
        let job = Job::Call(Box::new(move |conn: &mut Conn| {
            let _ = reply.send(work(conn));
        }));
        let gone = || StateError::WriterGone("the database connection's thread stopped".into());
        self.jobs
            .as_ref()
            .ok_or_else(gone)?
            .send(job)
            .map_err(|_| gone())?;
        answer
            .recv()
            .map_err(|_| gone())?
            .map_err(|message| failed(&self.location, message))
    }

    /// Writes a snapshot of what is stored when many records follow the last one, so loading
    /// stays quick; the records stay.
    pub fn compact_if_large(&mut self) -> Result<(), StateError> {
        self.call(|conn| {
            if conn.since_snapshot < SNAPSHOT_AFTER_RECORDS {
                return Ok(());
            }
            snapshot_stored(conn)
        })
    }

    /// When the deployment's state last changed here (seconds since the epoch), if it has.
    pub fn last_written(&self) -> Result<Option<u64>, StateError> {
        self.call(|conn| {
            let row = conn
                .client
                .query_one(
                    "SELECT extract(epoch FROM max(time))::bigint FROM capstan.records WHERE deployment = $1",
                    &[&conn.deployment],
                )
                .map_err(|e| describe(&e))?;
            Ok(row.get::<_, Option<i64>>(0).map(|t| t.max(0) as u64))
        })
    }
}

/// Folds what is stored and writes it as a new snapshot (keeping the last two).
fn snapshot_stored(conn: &mut Conn) -> Result<(), String> {
    let db = |e: postgres::Error| describe(&e);
    let mut tx = conn.client.transaction().map_err(db)?;
    let (state, _, last) = fold(&mut tx, conn.deployment, None)?;
    let text = serde_json::to_string(&state).expect("states serialize");
    tx.execute(
        "INSERT INTO capstan.snapshots (deployment, upto, run, state) VALUES ($1, $2, $3, $4) \
         ON CONFLICT DO NOTHING",
        &[&conn.deployment, &last, &conn.run, &text],
    )
    .map_err(db)?;
    tx.execute(
        "DELETE FROM capstan.snapshots WHERE deployment = $1 AND upto < \
         (SELECT min(upto) FROM (SELECT upto FROM capstan.snapshots WHERE deployment = $1 \
          ORDER BY upto DESC LIMIT 2) AS newest)",
        &[&conn.deployment],
    )
    .map_err(db)?;
    tx.commit().map_err(db)?;
    conn.since_snapshot = 0;
    Ok(())
}

/// The connection's thread: jobs in order; appends queued together go in one transaction.
fn serve(mut conn: Conn, queue: mpsc::Receiver<Job>) {
    let mut next: Option<Job> = None;
    loop {
        let job = match next.take() {
            Some(job) => job,
            None => match queue.recv() {
                Ok(job) => job,
                Err(_) => {
                    // The deployment's lock goes now, not when the server notices.
                    let _ = conn.client.batch_execute("SELECT pg_advisory_unlock_all()");
                    return;
                }
            },
        };
        match job {
            Job::Call(work) => work(&mut conn),
            Job::Append(records, ack) => {
                let mut batch = vec![(records, ack)];
                loop {
                    match queue.try_recv() {
                        Ok(Job::Append(records, ack)) => batch.push((records, ack)),
                        Ok(other) => {
                            next = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let result = match &conn.broken {
                    Some(e) => Err(format!("an earlier state write failed: {e}")),
                    None => write_records(&mut conn, batch.iter().flat_map(|(r, _)| r)),
                };
                if let Err(e) = &result {
                    conn.broken.get_or_insert_with(|| e.clone());
                }
                for (_, ack) in batch {
                    let _ = ack.send(result.clone());
                }
            }
        }
    }
}

/// One transaction, one statement, for every record of a batch.
fn write_records<'a>(
    conn: &mut Conn,
    records: impl Iterator<Item = &'a Record> + Clone,
) -> Result<(), String> {
    let count = records.clone().count();
    let mut addresses = Vec::with_capacity(count);
    let mut kinds = Vec::with_capacity(count);
    let mut operations: Vec<Option<&'static str>> = Vec::with_capacity(count);
    let mut texts = Vec::with_capacity(count);
    for record in records {
        let (address, kind, operation) = match record {
            Record::Intent {
                address, operation, ..
            } => (address, "intent", Some(operation.as_str())),
            Record::Done { address, .. } => (address, "done", None),
            Record::Deleted { address } => (address, "deleted", None),
            Record::Failed {
                address, operation, ..
            } => (address, "failed", Some(operation.as_str())),
            Record::Resolved { address } => (address, "resolved", None),
        };
        addresses.push(address.as_str());
        kinds.push(kind);
        operations.push(operation);
        let text = match (&conn.crypt, crypt::needs_sealing(record)) {
            (Some(crypt), true) => serde_json::to_string(&crypt::seal_record(crypt, record)),
            // Never in clear (`append` refuses first; this is the last line).
            (None, true) => return Err(in_clear_refused()),
            (_, false) => serde_json::to_string(record),
        };
        texts.push(text.expect("records always serialize"));
    }
    let insert = match &conn.insert_records {
        Some(insert) => insert.clone(),
        None => {
            let insert = conn.client.prepare(
                "INSERT INTO capstan.records (deployment, run, address, kind, operation, record) \
                 SELECT $1, $2, a, k, o, r FROM unnest($3::text[], $4::text[], $5::text[], $6::text[]) \
                 WITH ORDINALITY AS t(a, k, o, r, n) ORDER BY n",
            ).map_err(|e| describe(&e))?;
            conn.insert_records.insert(insert).clone()
        }
    };
    // One statement is one transaction: the batch is committed whole or not at all.
    conn.client
        .execute(
            &insert,
            &[
                &conn.deployment,
                &conn.run,
                &addresses,
                &kinds,
                &operations,
                &texts,
            ],
        )
        .map_err(|e| describe(&e))?;
    conn.since_snapshot += count as i64;
    Ok(())
}

impl StateBackend for PgBackend {
    fn load(&mut self) -> Result<(State, LoadReport), StateError> {
        // Before anything of this run is written: its marks connection holds the run's lock,
        // so no later run trusts its marks while it may still send.
        let gone = || StateError::WriterGone("the sent marks' connection stopped".into());
        let (reply, answer) = mpsc::channel();
        self.marks
            .as_ref()
            .ok_or_else(gone)?
            .jobs
            .send(MarkJob::Hold(self.run, reply))
            .map_err(|_| gone())?;
        answer
            .recv()
            .map_err(|_| gone())?
            .map_err(|message| failed(&self.location, message))?;
        let keys = self.keys.clone();
        let location = self.location.clone();
        let (state, report, can_seal) = self.call(move |conn| {
            let db = |e: postgres::Error| describe(&e);
            let mut tx = conn.client.transaction().map_err(db)?;
            // The state's data keys: opened with the key given, or the first one made.
            let stored = stored_keys(&mut tx, conn.deployment).map_err(db)?;
            conn.crypt = match &keys {
                Some(keys) if stored.is_empty() => {
                    let (key, crypt) = Crypt::new_key(keys, None)?;
                    tx.execute(
                        "INSERT INTO capstan.keys (deployment, id, sealed) VALUES ($1, $2, $3)",
                        &[&conn.deployment, &key.id, &key.sealed],
                    )
                    .map_err(db)?;
                    Some(Arc::new(crypt))
                }
                Some(keys) => Some(Arc::new(Crypt::open(&stored, keys)?)),
                None => None,
            };
            let (mut state, mut report, last) = fold(&mut tx, conn.deployment, None)?;
            open_folded(&location, &mut state, &mut report, conn.crypt.as_deref())
                .map_err(|e| e.to_string())?;
            report.never_sent = never_sent(&mut tx, &state).map_err(db)?;
            // Marks of earlier runs that left nothing pending are of no more use.
            let pending_runs: Vec<i64> = state
                .pending
                .values()
                .filter_map(|p| p.run.map(|r| r as i64))
                .collect();
            tx.execute(
                "DELETE FROM capstan.sent WHERE run IN (SELECT id FROM capstan.runs \
                 WHERE deployment = $1 AND id < $2) AND run <> ALL($3)",
                &[&conn.deployment, &conn.run, &pending_runs],
            )
            .map_err(db)?;
            tx.execute(
                "DELETE FROM capstan.alive WHERE run IN (SELECT id FROM capstan.runs \
                 WHERE deployment = $1 AND id < $2) AND run <> ALL($3)",
                &[&conn.deployment, &conn.run, &pending_runs],
            )
            .map_err(db)?;
            // This run's marks can be trusted until a crash recovery empties this table.
            tx.execute(
                "INSERT INTO capstan.alive (run) VALUES ($1) ON CONFLICT DO NOTHING",
                &[&conn.run],
            )
            .map_err(db)?;
            tx.commit().map_err(db)?;
            for address in &report.never_sent {
                state.pending.remove(address);
            }
            let after: i64 = conn
                .client
                .query_one(
                    "SELECT coalesce(max(upto), 0) FROM capstan.snapshots WHERE deployment = $1",
                    &[&conn.deployment],
                )
                .map_err(db)?
                .get(0);
            conn.since_snapshot = last - after;
            Ok((state, report, conn.crypt.is_some()))
        })?;
        self.can_seal = can_seal;
        if !report.damaged.is_empty() {
            return Err(failed(
                &self.location,
                format!(
                    "record(s) {} do not read as Capstan's records; nothing was changed",
                    capstan_state::list_lines(&report.damaged)
                ),
            ));
        }
        // What was never sent is settled in the records too, as the directory's snapshot
        // settles it.
        if !report.never_sent.is_empty() {
            let records: Vec<Record> = report
                .never_sent
                .iter()
                .map(|address| Record::Resolved {
                    address: address.clone(),
                })
                .collect();
            self.call(move |conn| write_records(conn, records.iter()))?;
        }
        Ok((state, report))
    }

    fn append(&self, mut records: Vec<Record>) -> oneshot::Receiver<Result<(), String>> {
        for record in &mut records {
            if let Record::Intent { run, .. } = record {
                *run = Some(self.run as u64);
            }
        }
        let (ack, done) = oneshot::channel();
        if !self.can_seal && records.iter().any(crypt::needs_sealing) {
            let _ = ack.send(Err(in_clear_refused()));
            return done;
        }
        match &self.jobs {
            Some(jobs) => {
                if let Err(mpsc::SendError(Job::Append(_, ack))) =
                    jobs.send(Job::Append(records, ack))
                {
                    let _ = ack.send(Err("the database connection's thread stopped".into()));
                }
            }
            None => {
                let _ = ack.send(Err("the state is closed".into()));
            }
        }
        done
    }

    fn compact(&mut self, state: &State) -> Result<(), StateError> {
        let state = state.clone();
        let location = self.location.clone();
        self.call(move |conn| {
            let has_secrets = state.resources.values().any(|r| !r.sensitive.is_empty())
                || state.pending.values().any(|p| !p.sensitive.is_empty());
            let text = match &conn.crypt {
                Some(crypt) => serde_json::to_string(&crypt::seal_state(crypt, &state)),
                None if has_secrets => {
                    return Err(format!("{location}: {}", in_clear_refused()))
                }
                None => serde_json::to_string(&state),
            }
            .expect("states serialize");
            let db = |e: postgres::Error| describe(&e);
            let last: i64 = conn
                .client
                .query_one(
                    "SELECT coalesce(max(seq), 0) FROM capstan.records WHERE deployment = $1",
                    &[&conn.deployment],
                )
                .map_err(db)?
                .get(0);
            conn.client
                .execute(
                    "INSERT INTO capstan.snapshots (deployment, upto, run, state) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (deployment, upto) DO UPDATE SET state = excluded.state, run = excluded.run",
                    &[&conn.deployment, &last, &conn.run, &text],
                )
                .map_err(db)?;
            conn.since_snapshot = 0;
            Ok(())
        })
    }

    /// A round trip before the calls go out; committed without waiting for the server's disk
    /// (a crash of the server may lose it, and then nothing of that run is trusted: see
    /// `never_sent`).
    fn mark_sent(&self, addresses: &[String]) -> Result<(), StateError> {
        let gone = || StateError::WriterGone("the sent marks' connection stopped".into());
        let marks = self.marks.as_ref().ok_or_else(gone)?;
        let (reply, answer) = mpsc::channel();
        marks
            .jobs
            .send(MarkJob::Mark(self.run, addresses.to_vec(), reply))
            .map_err(|_| gone())?;
        answer
            .recv()
            .map_err(|_| gone())?
            .map_err(|message| failed(&self.location, message))
    }
}

/// The connection that writes sent marks: one of its own, so that a mark never waits behind a
/// group commit's flush, and committing without waiting for the server's disk. One prepared
/// statement, one round trip per mark.
struct Marks {
    jobs: mpsc::Sender<MarkJob>,
    thread: Option<std::thread::JoinHandle<()>>,
}

enum MarkJob {
    /// Take the run's own lock (before its first intent), held while this connection lives.
    Hold(i64, mpsc::Sender<Result<(), String>>),
    Mark(i64, Vec<String>, mpsc::Sender<Result<(), String>>),
}

impl Marks {
    /// Connects (at the same time as the main connection: it waits for nothing); the
    /// statement is prepared at the first mark, once the tables surely exist.
    fn start(location: &Location) -> Marks {
        let (jobs, queue) = mpsc::channel::<MarkJob>();
        let location = location.clone();
        let thread = std::thread::Builder::new()
            .name("capstan-postgres-sent".into())
            .spawn(move || {
                let connected = connect(&location).and_then(|mut client| {
                    client
                        .batch_execute("SET synchronous_commit TO OFF")
                        .map_err(|e| failed(&location, describe(&e)))?;
                    // This session must not end on its own while the run may send.
                    let _ = client.batch_execute("SET idle_session_timeout = 0");
                    Ok(client)
                });
                let mut client = match connected {
                    Ok(client) => Ok(client),
                    Err(e) => Err(e.to_string()),
                };
                let mut insert: Option<postgres::Statement> = None;
                let mut broken: Option<String> = None;
                while let Ok(job) = queue.recv() {
                    let (run, addresses, reply) = match job {
                        MarkJob::Mark(run, addresses, reply) => (run, addresses, reply),
                        MarkJob::Hold(run, reply) => {
                            let held = match &mut client {
                                Ok(client) => client
                                    .execute(
                                        "SELECT pg_advisory_lock($1, ($2::bigint % 2147483647)::int4)",
                                        &[&schema::RUN_LOCK_CLASS, &run],
                                    )
                                    .map(drop)
                                    .map_err(|e| describe(&e)),
                                Err(e) => Err(format!("no connection for the sent marks: {e}")),
                            };
                            let _ = reply.send(held);
                            continue;
                        }
                    };
                    let result = match (&mut client, &broken) {
                        (Err(e), _) => Err(format!("no connection for the sent marks: {e}")),
                        (_, Some(e)) => Err(format!("an earlier sent mark failed: {e}")),
                        (Ok(client), None) => (|| {
                            let statement = match &insert {
                                Some(statement) => statement.clone(),
                                None => insert
                                    .insert(client.prepare(
                                        "INSERT INTO capstan.sent (run, address) SELECT $1, unnest($2::text[])",
                                    )?)
                                    .clone(),
                            };
                            client.execute(&statement, &[&run, &addresses]).map(drop)
                        })()
                        .map_err(|e| describe(&e)),
                    };
                    if let Err(e) = &result {
                        broken.get_or_insert_with(|| e.clone());
                    }
                    let _ = reply.send(result);
                }
                // Let go at once (the server would notice the closed connection a moment
                // later): the next run trusts these marks only once this lock is free.
                if let Ok(client) = &mut client {
                    let _ = client.batch_execute("SELECT pg_advisory_unlock_all()");
                }
            })
            .expect("a thread starts");
        Marks {
            jobs,
            thread: Some(thread),
        }
    }
}

impl Drop for Marks {
    fn drop(&mut self) {
        let (closed, _) = mpsc::channel();
        drop(std::mem::replace(&mut self.jobs, closed));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for PgBackend {
    fn drop(&mut self) {
        self.marks = None;
        // The thread ends once its queue is closed; its connection (and the lock) with it.
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
