//! Looking without the lock: the state now, as a run left it, and the runs, each read in one
//! read-only `REPEATABLE READ` transaction that writes nothing, not even Capstan's tables.

use super::*;
use crate::fold::{fold, holder, never_sent, open_folded, open_keys};

/// One consistent, read-only look: a `REPEATABLE READ` transaction, and the deployment's id if
/// Capstan's tables and the deployment are there (nothing is written, not even the tables).
pub(crate) fn look_at<'a>(
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
