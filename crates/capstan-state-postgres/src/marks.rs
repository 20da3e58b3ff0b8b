//! The sent marks' connection: one of its own, so that a mark never waits behind a group
//! commit's flush; it holds the run's own advisory lock from the run's load on.

use super::*;

/// The connection that writes sent marks: one of its own, so that a mark never waits behind a
/// group commit's flush, and committing without waiting for the server's disk. One prepared
/// statement, one round trip per mark.
pub(crate) struct Marks {
    jobs: mpsc::Sender<MarkJob>,
    thread: Option<std::thread::JoinHandle<()>>,
}

pub(crate) enum MarkJob {
    /// Take the run's own lock (before its first intent), held while this connection lives.
    Hold(i64, mpsc::Sender<Result<(), String>>),
    Mark(i64, Vec<String>, mpsc::Sender<Result<(), String>>),
}

impl Marks {
    /// Runs one job on the connection and waits for its answer (`None`: the thread is gone).
    pub(crate) fn ask(
        &self,
        job: impl FnOnce(mpsc::Sender<Result<(), String>>) -> MarkJob,
    ) -> Option<Result<(), String>> {
        let (reply, answer) = mpsc::channel();
        self.jobs.send(job(reply)).ok()?;
        answer.recv().ok()
    }

    /// Connects (at the same time as the main connection: it waits for nothing); the
    /// statement is prepared at the first mark, once the tables surely exist.
    pub(crate) fn start(location: &Location) -> Marks {
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
