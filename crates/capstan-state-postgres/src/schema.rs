//! Capstan's tables, in a schema of their own (`capstan`) so that they sit beside anything else
//! in the database; created on first use and checked every time.
//!
//! Nothing here is ever updated in place: runs, records and sent marks are only inserted, and a
//! snapshot is a new row (the older ones past the last two are dropped: they are a cache of
//! what the records say).

use postgres::{Client, GenericClient};

/// The version of the tables this Capstan writes.
pub const SCHEMA_VERSION: i64 = 2;

/// The advisory lock class of Capstan's locks (`CAPS`): `(CLASS, deployment id)` is a
/// deployment's lock, `(CLASS, 0)` is held while the tables are made.
pub const LOCK_CLASS: i32 = 0x4341_5053;
/// The class of a run's own lock (`CAPR`), `(RUN_CLASS, run)`: held by the connection that
/// writes its sent marks for as long as it may send anything.
pub const RUN_LOCK_CLASS: i32 = 0x4341_5052;

const CREATE: &str = r#"
CREATE TABLE capstan.meta (
    key text PRIMARY KEY,
    value text NOT NULL
);
CREATE TABLE capstan.deployments (
    id integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name text NOT NULL UNIQUE,
    created timestamptz NOT NULL DEFAULT now()
);
-- One row per command that held a deployment's lock: who, where, what.
CREATE TABLE capstan.runs (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    deployment integer NOT NULL REFERENCES capstan.deployments,
    started timestamptz NOT NULL DEFAULT now(),
    db_user text NOT NULL DEFAULT current_user,
    holder jsonb NOT NULL,
    backend_pid integer NOT NULL DEFAULT pg_backend_pid(),
    postmaster_start timestamptz NOT NULL DEFAULT pg_postmaster_start_time()
);
-- The journal: every record, in order, with its time and run.
CREATE TABLE capstan.records (
    deployment integer NOT NULL,
    seq bigint GENERATED ALWAYS AS IDENTITY,
    run bigint NOT NULL,
    time timestamptz NOT NULL DEFAULT now(),
    address text NOT NULL,
    kind text NOT NULL,
    operation text,
    record text NOT NULL,
    PRIMARY KEY (deployment, seq)
);
-- The state folded from the records up to `upto`.
CREATE TABLE capstan.snapshots (
    deployment integer NOT NULL,
    upto bigint NOT NULL,
    run bigint,
    time timestamptz NOT NULL DEFAULT now(),
    state text NOT NULL,
    PRIMARY KEY (deployment, upto)
);
-- Operations a run sent to their providers (see capstan-state's `sent.rs`).
CREATE TABLE capstan.sent (
    run bigint NOT NULL,
    address text NOT NULL
);
CREATE INDEX sent_by_run ON capstan.sent (run);
"#;

/// What takes the tables from the version before each to it.
const MIGRATIONS: &[(i64, &str)] = &[(
    2,
    // The state's data keys, sealed with age (see capstan-state's `crypt.rs`).
    r#"
CREATE TABLE capstan.keys (
    deployment integer NOT NULL,
    seq bigint GENERATED ALWAYS AS IDENTITY,
    id text NOT NULL,
    sealed text NOT NULL,
    time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (deployment, id)
);
-- One row per run whose sent marks may be trusted: UNLOGGED, so that any crash recovery of the
-- server (which may lose marks committed without waiting for the disk) empties it.
CREATE UNLOGGED TABLE capstan.alive (
    run bigint PRIMARY KEY
);
"#,
)];

/// What the database holds.
pub enum Found {
    /// No `capstan` schema (or an empty one): nothing of Capstan's yet.
    Nothing,
    /// Capstan's tables at this version.
    Capstan(i64),
    /// A `capstan` schema with tables that are not Capstan's.
    Other(String),
}

/// Looks, without writing.
pub fn inspect(client: &mut impl GenericClient) -> Result<Found, postgres::Error> {
    let schema = client.query_opt("SELECT 1 FROM pg_namespace WHERE nspname = 'capstan'", &[])?;
    if schema.is_none() {
        return Ok(Found::Nothing);
    }
    let meta = client.query_one("SELECT to_regclass('capstan.meta') IS NOT NULL", &[])?;
    if !meta.get::<_, bool>(0) {
        let tables: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = 'capstan'",
                &[],
            )?
            .get(0);
        return Ok(if tables == 0 {
            Found::Nothing
        } else {
            Found::Other(format!(
                "its schema `capstan` holds {tables} table(s) and no capstan.meta"
            ))
        });
    }
    let rows = client.query(
        "SELECT key, value FROM capstan.meta WHERE key IN ('made_by', 'schema_version')",
        &[],
    )?;
    let get = |key: &str| {
        rows.iter()
            .find(|r| r.get::<_, &str>(0) == key)
            .map(|r| r.get::<_, String>(1))
    };
    if get("made_by").as_deref() != Some("capstan") {
        return Ok(Found::Other(
            "capstan.meta does not say it was made by Capstan".into(),
        ));
    }
    match get("schema_version").and_then(|v| v.parse().ok()) {
        Some(version) => Ok(Found::Capstan(version)),
        None => Ok(Found::Other("capstan.meta has no schema version".into())),
    }
}

/// Makes the tables if there are none (once, whoever else starts at the same time); checks
/// them otherwise. Says what is wrong in words for the user.
pub fn ensure(client: &mut Client) -> Result<(), String> {
    let describe = |e: postgres::Error| crate::describe(&e);
    let mut tx = client.transaction().map_err(describe)?;
    tx.execute("SELECT pg_advisory_xact_lock($1, 0)", &[&LOCK_CLASS])
        .map_err(describe)?;
    let found = inspect(&mut tx).map_err(describe)?;
    match found {
        Found::Nothing => {
            tx.batch_execute("CREATE SCHEMA IF NOT EXISTS capstan")
                .map_err(describe)?;
            tx.batch_execute(CREATE).map_err(|e| {
                format!(
                    "cannot make Capstan's tables (the user needs CREATE on the database): {}",
                    crate::describe(&e)
                )
            })?;
            tx.execute(
                "INSERT INTO capstan.meta (key, value) VALUES ('made_by', 'capstan'), ('schema_version', '1')",
                &[],
            )
            .map_err(describe)?;
            migrate(&mut tx, 1)?;
        }
        Found::Capstan(version) if version < SCHEMA_VERSION => {
            check(&found)?;
            migrate(&mut tx, version)?;
        }
        found => check(&found)?,
    }
    tx.commit().map_err(describe)
}

/// Takes the tables from `from` to this Capstan's version, in the caller's transaction.
fn migrate(tx: &mut postgres::Transaction<'_>, from: i64) -> Result<(), String> {
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > from) {
        tx.batch_execute(sql).map_err(|e| {
            format!(
                "cannot take Capstan's tables to version {version}: {}",
                crate::describe(&e)
            )
        })?;
        tx.execute(
            "UPDATE capstan.meta SET value = $1 WHERE key = 'schema_version'",
            &[&version.to_string()],
        )
        .map_err(|e| crate::describe(&e))?;
    }
    Ok(())
}

/// Whether Capstan can use what it found.
pub fn check(found: &Found) -> Result<(), String> {
    match found {
        Found::Nothing => Ok(()),
        Found::Capstan(version) if *version == SCHEMA_VERSION => Ok(()),
        Found::Capstan(version) if *version > SCHEMA_VERSION => Err(format!(
            "this database's Capstan tables are at schema version {version}, made by a newer Capstan; this one knows version {SCHEMA_VERSION}: upgrade capstan (nothing was written)"
        )),
        // Older tables read as they are; the next command that writes migrates them.
        Found::Capstan(version) if *version >= 1 => Ok(()),
        Found::Capstan(version) => Err(format!(
            "this database's Capstan tables are at schema version {version}, which this Capstan cannot read"
        )),
        Found::Other(why) => Err(format!(
            "this database is not Capstan's ({why}): give --state a database of Capstan's, or a new one (nothing was written)"
        )),
    }
}
