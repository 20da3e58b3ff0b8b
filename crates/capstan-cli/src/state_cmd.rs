//! `capstan state …`: look at the state, and resolve what an interrupted run left.
//!
//! Looking (`list`, `show`, `pending`) needs only the state directory — not the deployment,
//! its parameters or the lock — and never writes: it works on a read-only directory and while
//! an apply runs. Changing (`resolve`, `forget`, `repair`) takes the lock.

use std::process::ExitCode;

use capstan_engine::state::{
    self, append_durably, rfc3339, DirectoryBackend, Record, State, StateBackend,
};
use clap::Subcommand;
use serde_json::json;

use crate::deploy_cmd::{warn_damage, LockArgs, Place};
use crate::error::CliError;
use crate::output::Stdout;

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
    },
    /// List operations that were interrupted (crash, kill, Ctrl-C) and never finished.
    Pending {
        /// A JSON array of {"address", "operation", "provider", "type", "started"} instead
        /// (`started` in RFC 3339).
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
}

pub async fn state_cmd(
    place: Place,
    command: StateCmd,
    mut stdout: Stdout,
) -> Result<ExitCode, CliError> {
    let dir = place.checked_state_dir().map_err(CliError::Invalid)?;
    match command {
        StateCmd::List { json } => {
            let state = look(&place)?;
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
        } => show(&look(&place)?, &address, show_sensitive, &mut stdout)?,
        StateCmd::Pending { json } => {
            let running = state::running_holder(&place.state_dir());
            pending(&look(&place)?, json, running.as_deref(), &mut stdout)
        }
        StateCmd::Resolve { address, lock } => {
            let (backend, state) = change(&dir, &lock)?;
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
            let (backend, state) = change(&dir, &lock)?;
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
            let mut backend = open_locked(&dir, &lock)?;
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
    }
    Ok(ExitCode::SUCCESS)
}

/// A state that is not as it must be (a snapshot that does not read, a file of another user)
/// is the user's to fix, as everywhere else (exit 2); one that could not be written failed
/// (exit 1).
fn state_error(e: capstan_engine::state::StateError) -> CliError {
    use capstan_engine::state::StateError;
    match e {
        StateError::Io { .. } | StateError::WriterGone(_) => CliError::Failed(e.to_string()),
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
fn look(place: &Place) -> Result<State, CliError> {
    let dir = place.state_dir();
    if !dir.exists() {
        say!(
            "note: no state in {} yet (nothing was applied there; -f FILE or --state DIR picks another)",
            dir.display()
        );
        return Ok(State::default());
    }
    let (state, report) = state::read_only(&dir).map_err(|e| CliError::Invalid(e.to_string()))?;
    warn_damage(&dir, &report);
    Ok(state)
}

fn open_locked(dir: &std::path::Path, lock: &LockArgs) -> Result<DirectoryBackend, CliError> {
    if !dir.exists() {
        return Err(CliError::Invalid(format!(
            "no state in {}; nothing to change",
            dir.display()
        )));
    }
    DirectoryBackend::open_with(dir, lock.lock_timeout, &mut |holder| {
        say!("waiting for the state lock, held by {holder} …");
    })
    .map_err(|e| CliError::Invalid(e.to_string()))
}

/// The state, locked for a change.
fn change(dir: &std::path::Path, lock: &LockArgs) -> Result<(DirectoryBackend, State), CliError> {
    let mut backend = open_locked(dir, lock)?;
    let (state, _) = backend
        .load()
        .map_err(|e| CliError::Invalid(e.to_string()))?;
    Ok((backend, state))
}

/// Makes one record durable.
async fn record(backend: &DirectoryBackend, record: Record) -> Result<(), CliError> {
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
