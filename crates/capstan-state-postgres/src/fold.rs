//! The state from the records: the latest snapshot and the records after it, their secrets
//! opened, and which pending operations were never sent (and whether anyone holds the lock).

use super::*;

/// Folds the latest snapshot and the records after it (up to run `upto_run`'s end, if given:
/// then from the beginning). Returns the state, what was read, and the last record's number.
pub(crate) fn fold(
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
pub(crate) fn stored_keys(
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
pub(crate) fn open_keys(
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
pub(crate) fn open_folded(
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
pub(crate) fn never_sent(
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
pub(crate) fn holder(
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
