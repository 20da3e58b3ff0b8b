//! The locked backend: the connection that holds the deployment's lock and writes (group
//! commit, snapshots, keys), on a thread of its own.

use super::*;
use crate::fold::{fold, holder, never_sent, open_folded, stored_keys};
use crate::marks::{MarkJob, Marks};

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

    /// Runs a job on the sent marks' connection and waits for it.
    fn on_marks(
        &self,
        job: impl FnOnce(mpsc::Sender<Result<(), String>>) -> MarkJob,
    ) -> Result<(), StateError> {
        self.marks
            .as_ref()
            .and_then(|marks| marks.ask(job))
            .ok_or_else(|| StateError::WriterGone("the sent marks' connection stopped".into()))?
            .map_err(|message| failed(&self.location, message))
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
        let run = self.run;
        self.on_marks(|reply| MarkJob::Hold(run, reply))?;
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
        let run = self.run;
        self.on_marks(|reply| MarkJob::Mark(run, addresses.to_vec(), reply))
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
