//! `capstan state …`: look at the state, and resolve what an interrupted run left.
//!
//! Looking (`list`, `show`, `pending`, `history`) needs only the state — not the deployment,
//! its parameters or the lock — and never writes: it works on a read-only directory, a
//! read-only database user, and while an apply runs. Changing (`resolve`, `forget`, `repair`,
//! `push`, `pull`) takes the lock.

use std::process::ExitCode;

use capstan_engine::state::{self, append_durably, rfc3339, Record, State, StateBackend};
use clap::Subcommand;
use serde_json::json;

use crate::deploy_cmd::{warn_damage, LockArgs, Place};
use crate::error::CliError;
use crate::output::Stdout;
use crate::store::{Locked, Store};
use capstan_engine::state::crypt::{self, Keys};
use std::sync::Arc;

#[derive(Subcommand)]
pub enum StateCmd {
    /// List the resources in the state: address and provider.type, one per line.
    List {
        /// A JSON array of {"address", "provider", "type"} instead.
        #[arg(long)]
        json: bool,
    },
    /// Show one resource's recorded inputs, outputs and dependencies as JSON. Sensitive
    /// values (marked by the deployment or the provider) show as "(sensitive)".
    Show {
        address: String,
        /// Show sensitive values as they are (the state's files are private; this prints them).
        #[arg(long)]
        show_sensitive: bool,
        /// As it was when run RUN ended (`capstan state history` lists the runs; a PostgreSQL
        /// state keeps them).
        #[arg(long, value_name = "RUN")]
        at: Option<i64>,
    },
    /// List operations that were interrupted (crash, kill, Ctrl-C) and never finished.
    Pending {
        /// A JSON array of {"address", "operation", "provider", "type", "started"} instead
        /// (`started` in RFC 3339).
        #[arg(long)]
        json: bool,
    },
    /// List the runs that changed the state, oldest first: who, when, what changed (a
    /// PostgreSQL state keeps every run; a directory keeps only the state now).
    History {
        /// A JSON array of {"run", "started", "user", "host", "pid", "command", "db_user",
        /// "operations", "failed", "recorded", "deleted"} instead.
        #[arg(long)]
        json: bool,
    },
    /// Mark an interrupted operation as dealt with (after checking the real resource).
    Resolve {
        address: String,
        #[command(flatten)]
        lock: LockArgs,
    },
    /// Remove a resource from the state without asking its provider (after removing it by hand,
    /// or when its provider cannot delete).
    Forget {
        address: String,
        #[command(flatten)]
        lock: LockArgs,
    },
    /// Repair a damaged journal: set its damaged lines aside, byte for byte, in
    /// `journal.damaged-TIME` beside it, and keep every intact record.
    Repair {
        #[command(flatten)]
        lock: LockArgs,
    },
    /// Encrypt the state's secrets with a new key: the new one from
    /// CAPSTAN_STATE_NEW_IDENTITY (an age identity file; CAPSTAN_STATE_NEW_RECIPIENTS adds a
    /// team's age1… recipients) or CAPSTAN_STATE_NEW_PASSPHRASE; the current one from
    /// CAPSTAN_STATE_IDENTITY or CAPSTAN_STATE_PASSPHRASE (none for a state kept in clear,
    /// which this encrypts for the first time).
    Rekey {
        #[command(flatten)]
        lock: LockArgs,
    },
    /// Copy this state (--state) to another place, e.g. a directory's to PostgreSQL:
    /// `capstan state push --to 'postgres://db.example/infra?deployment=web'`. Refuses to
    /// overwrite a state that changed after this one, unless --force.
    Push {
        /// Where to: a directory or a postgres:// URL.
        #[arg(long, value_name = "DIR|URL")]
        to: String,
        /// Overwrite it even if it is newer.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        lock: LockArgs,
    },
    /// Copy a state from another place into this one (--state), e.g. from PostgreSQL into a
    /// directory. Refuses to overwrite a state that changed after that one, unless --force.
    Pull {
        /// Where from: a directory or a postgres:// URL.
        #[arg(long, value_name = "DIR|URL")]
        from: String,
        /// Overwrite this state even if it is newer.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        lock: LockArgs,
    },
}

pub async fn state_cmd(
    place: Place,
    command: StateCmd,
    mut stdout: Stdout,
) -> Result<ExitCode, CliError> {
    let store = place.store().map_err(CliError::Invalid)?;
    let keys = Keys::from_env().map_err(CliError::Invalid)?;
    let keys = keys.as_ref();
    match command {
        StateCmd::List { json } => {
            let state = look(&store, keys)?.state;
            if json {
                let list: Vec<_> = state
                    .resources
                    .iter()
                    .map(|(address, r)| {
                        json!({"address": address, "provider": r.provider, "type": r.resource_type})
                    })
                    .collect();
                stdout.line(&serde_json::Value::Array(list).to_string());
            } else {
                for (address, r) in &state.resources {
                    stdout.line(&format!("{address}\t{}.{}", r.provider, r.resource_type));
                }
            }
        }
        StateCmd::Show {
            address,
            show_sensitive,
            at,
        } => {
            let (state, locked) = match at {
                None => {
                    let look = look(&store, keys)?;
                    (look.state, look.report.locked)
                }
                Some(run) => match &store {
                    Store::Postgres(location) => {
                        let (state, report) =
                            capstan_state_postgres::state_at(location, run, keys.cloned())
                                .map_err(state_error)?;
                        (state, report.locked)
                    }
                    Store::Dir(dir) => return Err(no_history(dir)),
                },
            };
            if show_sensitive && locked.contains(&address) {
                say!(
                    "note: `{address}`'s secrets are encrypted and no key given opens them; set {} or {} to see them",
                    crypt::IDENTITY_ENV,
                    crypt::PASSPHRASE_ENV
                );
            }
            show(&state, &address, show_sensitive, &mut stdout)?
        }
        StateCmd::Pending { json } => {
            let look = look(&store, keys)?;
            pending(&look.state, json, look.running.as_deref(), &mut stdout)
        }
        StateCmd::History { json } => match &store {
            Store::Postgres(location) => {
                let runs = capstan_state_postgres::history(location).map_err(state_error)?;
                history(&runs, json, &mut stdout);
            }
            Store::Dir(dir) => return Err(no_history(dir)),
        },
        StateCmd::Resolve { address, lock } => {
            let (backend, state) = change(&store, &lock, keys)?;
            if !state.pending.contains_key(&address) {
                return Err(CliError::Invalid(format!(
                    "`{address}` has no interrupted operation; `capstan state pending` lists them"
                )));
            }
            record(
                &backend,
                Record::Resolved {
                    address: address.clone(),
                },
            )
            .await?;
            say!("resolved the interrupted operation on `{address}`");
        }
        StateCmd::Forget { address, lock } => {
            let (backend, state) = change(&store, &lock, keys)?;
            if !state.resources.contains_key(&address) {
                return Err(no_resource(&address));
            }
            let dependents: Vec<&str> = state
                .resources
                .iter()
                .filter(|(_, r)| r.dependencies.contains(&address))
                .map(|(a, _)| a.as_str())
                .collect();
            record(
                &backend,
                Record::Deleted {
                    address: address.clone(),
                },
            )
            .await?;
            say!("forgot `{address}`: it is no longer in the state (nothing was deleted)");
            if !dependents.is_empty() {
                say!(
                    "warning: {} depend(s) on `{address}`, which the state no longer holds: \
                     deleting them will not wait for it, and their inputs may refer to what it was",
                    dependents
                        .iter()
                        .map(|a| format!("`{a}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
        StateCmd::Repair { lock } => {
            let Locked::Dir(mut backend) = open_locked(&store, &lock, keys)? else {
                return Err(CliError::Invalid(format!(
                    "{}: a PostgreSQL state has no journal file to repair (the database checks its own pages); `capstan state pending` and `resolve` deal with interrupted operations",
                    store.shown()
                )));
            };
            let dir = backend.dir().to_path_buf();
            let repaired = backend.repair().map_err(state_error)?;
            if let Some(aside) = &repaired.damaged_snapshot {
                say!(
                    "repaired {}: rebuilt from the previous snapshot and the journals; the damaged one is in {}",
                    dir.join("snapshot.json").display(),
                    aside.display()
                );
            }
            match &repaired.damaged_lines {
                Some(aside) => say!(
                    "repaired {}: the damaged lines are in {}; every intact record was kept",
                    dir.join("journal").display(),
                    aside.display()
                ),
                None if repaired.damaged_snapshot.is_none() => {
                    say!("{}: nothing is damaged", dir.join("journal").display())
                }
                None => {}
            }
        }
        StateCmd::Rekey { lock } => {
            let new = Keys::from_values(
                env(NEW_IDENTITY_ENV).as_deref(),
                env(NEW_RECIPIENTS_ENV).as_deref(),
                env(NEW_PASSPHRASE_ENV),
            )
            .map_err(|e| CliError::Invalid(e.replace("CAPSTAN_STATE_", "CAPSTAN_STATE_NEW_")))?
            .ok_or_else(|| {
                CliError::Invalid(format!(
                    "give the new key: {NEW_IDENTITY_ENV}=FILE (an age identity; add {NEW_RECIPIENTS_ENV}=FILE of age1… recipients for a team) or {NEW_PASSPHRASE_ENV}; the current one comes from {} or {}",
                    crypt::IDENTITY_ENV,
                    crypt::PASSPHRASE_ENV
                ))
            })?;
            let (mut backend, _) = change(&store, &lock, keys)?;
            backend.rekey(new).map_err(state_error)?;
            say!(
                "sealed the secrets of {} with a new key; from now on {} (or {}) opens them",
                store.shown(),
                crypt::IDENTITY_ENV,
                crypt::PASSPHRASE_ENV
            );
        }
        StateCmd::Push { to, force, lock } => {
            let to = Store::parse(&to).map_err(CliError::Invalid)?;
            copy(&store, &to, force, &lock, &place, keys).await?;
        }
        StateCmd::Pull { from, force, lock } => {
            let from = Store::parse(&from).map_err(CliError::Invalid)?;
            copy(&from, &store, force, &lock, &place, keys).await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

const NEW_IDENTITY_ENV: &str = "CAPSTAN_STATE_NEW_IDENTITY";
const NEW_RECIPIENTS_ENV: &str = "CAPSTAN_STATE_NEW_RECIPIENTS";
const NEW_PASSPHRASE_ENV: &str = "CAPSTAN_STATE_NEW_PASSPHRASE";

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn no_history(dir: &std::path::Path) -> CliError {
    CliError::Invalid(format!(
        "{} is a state directory, which keeps the state as it is now, not its history (its journal is folded into a snapshot); a PostgreSQL state keeps every run: see `capstan state push`",
        dir.display()
    ))
}

/// `state push` / `state pull`: makes `to` hold what `from` holds, unless `to` changed after
/// `from` did (then only with `force`). Interrupted operations are copied as interrupted.
async fn copy(
    from: &Store,
    to: &Store,
    force: bool,
    lock: &LockArgs,
    place: &Place,
    keys: Option<&Arc<Keys>>,
) -> Result<(), CliError> {
    if from.shown() == to.shown() {
        return Err(CliError::Invalid(format!(
            "{} is both where to copy from and to",
            from.shown()
        )));
    }
    if let Store::Dir(dir) = from {
        if !dir.exists() {
            return Err(CliError::Invalid(format!(
                "no state in {} to copy",
                dir.display()
            )));
        }
    }
    let source = from.look(keys).map_err(state_error)?;
    if let Some(holder) = &source.running {
        return Err(CliError::Invalid(format!(
            "{} is held by {holder}: copy it once that command ends",
            from.shown()
        )));
    }
    if !source.report.damaged.is_empty() {
        return Err(CliError::Invalid(format!(
            "{} has damaged records ({}): `capstan state repair` there first",
            from.shown(),
            state::list_lines(&source.report.damaged)
        )));
    }
    if !source.report.locked.is_empty() {
        return Err(CliError::Invalid(format!(
            "the secrets of {} in {} do not open without their key: set {} or {}",
            source.report.locked.join(", "),
            from.shown(),
            crypt::IDENTITY_ENV,
            crypt::PASSPHRASE_ENV
        )));
    }
    let target = to.look(keys).map_err(state_error)?;
    let mut backend = to
        .lock(
            lock.lock_timeout,
            &mut |holder| {
                say!("waiting for the state lock, held by {holder} …");
            },
            keys,
        )
        .map_err(state_error)?;
    let owner = place
        .file()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if let Some(dir) = to.dir() {
        state::check_owner(dir, &owner, false).map_err(state_error)?;
    }
    let (now, _) = backend.load().map_err(state_error)?;
    let mut wanted = source.state.clone();
    // Their runs are not this state's: nothing may settle them as "never sent".
    for op in wanted.pending.values_mut() {
        op.run = None;
    }
    if now == wanted {
        say!("{} already holds what {} holds", to.shown(), from.shown());
        return Ok(());
    }
    let holds_something = !now.resources.is_empty() || !now.pending.is_empty();
    if holds_something && !force {
        if let (Some(theirs), Some(ours)) = (target.changed, source.changed) {
            if theirs > ours {
                return Err(CliError::Invalid(format!(
                    "{} changed at {}, after {} (at {}): it is newer, so it was not overwritten; pass --force to overwrite it",
                    to.shown(),
                    rfc3339(theirs),
                    from.shown(),
                    rfc3339(ours)
                )));
            }
        }
        if wanted.resources.is_empty() && wanted.pending.is_empty() {
            return Err(CliError::Invalid(format!(
                "{} is empty and {} is not: pass --force to empty it",
                from.shown(),
                to.shown()
            )));
        }
    }
    // Records too, so that a database's history tells what the copy changed.
    let mut records: Vec<Record> = now
        .resources
        .keys()
        .filter(|a| !wanted.resources.contains_key(*a))
        .map(|address| Record::Deleted {
            address: address.clone(),
        })
        .collect();
    for (address, resource) in &wanted.resources {
        if now.resources.get(address) != Some(resource) {
            records.push(Record::Done {
                address: address.clone(),
                state: resource.clone(),
            });
        }
    }
    if matches!(backend, Locked::Postgres(_)) && !records.is_empty() {
        append_durably(&backend as &dyn StateBackend, records)
            .await
            .map_err(|e| CliError::Failed(e.to_string()))?;
    }
    backend.compact(&wanted).map_err(state_error)?;
    if let Some(dir) = to.dir() {
        state::check_owner(dir, &owner, true).map_err(state_error)?;
    }
    say!(
        "copied {} resource(s) and {} interrupted operation(s) from {} to {}",
        wanted.resources.len(),
        wanted.pending.len(),
        from.shown(),
        to.shown()
    );
    Ok(())
}

/// `state history`: one line per run.
fn history(runs: &[capstan_state_postgres::RunSummary], json: bool, stdout: &mut Stdout) {
    if json {
        let list: Vec<_> = runs
            .iter()
            .map(|r| {
                json!({"run": r.run, "started": rfc3339(r.started), "user": r.holder["user"],
                       "host": r.holder["host"], "pid": r.holder["pid"],
                       "command": r.holder["command"], "db_user": r.db_user,
                       "operations": r.operations, "failed": r.failed,
                       "recorded": r.recorded, "deleted": r.deleted})
            })
            .collect();
        stdout.line(&serde_json::Value::Array(list).to_string());
        return;
    }
    for r in runs {
        // Operations started, by kind; then how they ended (an interrupted run's may not have).
        let mut changes: Vec<String> = r
            .operations
            .iter()
            .map(|(kind, n)| format!("{n} {kind}"))
            .collect();
        if r.recorded + r.deleted < r.operations.values().sum::<i64>() {
            changes.push(format!("{} recorded", r.recorded + r.deleted));
        }
        if r.failed > 0 {
            changes.push(format!("{} failed", r.failed));
        }
        let changes = if changes.is_empty() {
            "no changes".to_string()
        } else {
            changes.join(", ")
        };
        stdout.line(&format!(
            "{}\t{}\t{}@{}\t{}\t{changes}",
            r.run,
            rfc3339(r.started),
            r.holder["user"].as_str().unwrap_or("?"),
            r.holder["host"].as_str().unwrap_or("?"),
            r.holder["command"].as_str().unwrap_or("?"),
        ));
    }
}

/// A state that is not as it must be (a snapshot that does not read, a file of another user)
/// is the user's to fix, as everywhere else (exit 2); one that could not be written failed
/// (exit 1).
fn state_error(e: capstan_engine::state::StateError) -> CliError {
    use capstan_engine::state::StateError;
    match e {
        StateError::Io { .. } | StateError::WriterGone(_) | StateError::Backend { .. } => {
            CliError::Failed(e.to_string())
        }
        _ => CliError::Invalid(e.to_string()),
    }
}

/// `state show ADDRESS`: the resource as recorded, its secrets hidden unless asked.
fn show(
    state: &State,
    address: &str,
    show_sensitive: bool,
    stdout: &mut Stdout,
) -> Result<(), CliError> {
    match state.resources.get(address) {
        Some(r) if show_sensitive => stdout.line(&pretty(r)),
        Some(r) => {
            let mut value = serde_json::to_value(r).unwrap_or_default();
            capstan_engine::secrets::redact_at(&mut value, &r.sensitive);
            // Secrets of other resources that this one holds too.
            let secrets = capstan_engine::secrets::Secrets::default();
            capstan_engine::secrets::learn(&secrets, state, None);
            for key in ["inputs", "outputs"] {
                if let Some(v) = value.get_mut(key) {
                    secrets.redact_value(v);
                }
            }
            stdout.line(&serde_json::to_string_pretty(&value).unwrap_or_default());
        }
        None => return Err(no_resource(address)),
    }
    Ok(())
}

/// `state pending`: the operations interrupted in an earlier run.
/// `running`: the command holding the state now, whose operations these may be.
fn pending(state: &State, json: bool, running: Option<&str>, stdout: &mut Stdout) {
    if let (Some(holder), false) = (running, state.pending.is_empty()) {
        say!(
            "note: a command holds the state now ({holder}): these operations may be in flight in it, not interrupted; look again once it ends before resolving any"
        );
    }
    if json {
        let list: Vec<_> = state
            .pending
            .iter()
            .map(|(address, op)| {
                json!({"address": address, "operation": op.operation, "provider": op.provider,
                       "type": op.resource_type, "started": rfc3339(op.started),
                       "running": running.is_some()})
            })
            .collect();
        stdout.line(&serde_json::Value::Array(list).to_string());
    } else {
        for (address, op) in &state.pending {
            stdout.line(&format!(
                "{address}\t{}\t{}.{}\tstarted {}",
                op.operation,
                op.provider,
                op.resource_type,
                rfc3339(op.started)
            ));
        }
    }
}

fn no_resource(address: &str) -> CliError {
    CliError::Invalid(format!(
        "no resource `{address}` in the state; `capstan state list` shows what there is"
    ))
}

/// The state as it is now, for a command that only looks.
fn look(store: &Store, keys: Option<&Arc<Keys>>) -> Result<crate::store::Look, CliError> {
    if !store.exists() {
        say!(
            "note: no state in {} yet (nothing was applied there; -f FILE or --state DIR|URL picks another)",
            store.shown()
        );
        return Ok(crate::store::Look {
            state: State::default(),
            report: Default::default(),
            running: None,
            changed: None,
        });
    }
    let look = store.look(keys).map_err(state_error)?;
    warn_damage(store, &look.report);
    Ok(look)
}

fn open_locked(
    store: &Store,
    lock: &LockArgs,
    keys: Option<&Arc<Keys>>,
) -> Result<Locked, CliError> {
    if !store.exists() {
        return Err(CliError::Invalid(format!(
            "no state in {}; nothing to change",
            store.shown()
        )));
    }
    store
        .lock(
            lock.lock_timeout,
            &mut |holder| {
                say!("waiting for the state lock, held by {holder} …");
            },
            keys,
        )
        .map_err(state_error)
}

/// The state, locked for a change.
fn change(
    store: &Store,
    lock: &LockArgs,
    keys: Option<&Arc<Keys>>,
) -> Result<(Locked, State), CliError> {
    let mut backend = open_locked(store, lock, keys)?;
    let (state, _) = backend.load().map_err(state_error)?;
    Ok((backend, state))
}

/// Makes one record durable.
async fn record(backend: &Locked, record: Record) -> Result<(), CliError> {
    append_durably(backend as &dyn StateBackend, vec![record])
        .await
        .map_err(|e| CliError::Failed(e.to_string()))
}

/// Indented JSON of `value`, including the inputs and outputs it keeps as compact text.
fn pretty(value: &capstan_engine::state::ResourceState) -> String {
    serde_json::to_value(value)
        .and_then(|v| serde_json::to_string_pretty(&v))
        .unwrap_or_default()
}
