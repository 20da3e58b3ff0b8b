//! Interrupted operations checked against the world. A create, update or delete whose intent
//! was journaled but whose result never was (a crash, a kill, Ctrl-C) may or may not have
//! happened. Where the resource's type reads the real resource (`readChecks`), its provider is
//! asked before anything is planned: the resource is found (adopted as it is, then updated to
//! be sure it is as declared), or not (the intent is settled: created again, or deleted
//! already). Where it cannot tell, the operation stays pending, as before.

use std::time::Duration;

use capstan_host::{CallError, OperationCall};
use capstan_schema::{ErrorKind, OperationKind};
use futures::stream::StreamExt;

use crate::run::Providers;
use crate::state::{Record, ResourceState, State};

/// What checking the interrupted operations found.
#[derive(Debug, Default)]
pub struct Checked {
    /// To journal (an apply) and apply to the state (every command): each settles one
    /// interrupted operation.
    pub records: Vec<Record>,
    /// Resources an interrupted create or update was found to have made: planned as an
    /// update, so that they are surely as declared.
    pub adopted: Vec<String>,
    /// What was found, per address, for the plan to say.
    pub notes: Vec<(String, String)>,
    /// Operations that could not be checked (they stay pending).
    pub warnings: Vec<String>,
}

/// Asks the providers about every interrupted operation they can check (at most `jobs` at
/// once).
pub async fn check_interrupted(
    state: &State,
    deployment: &crate::model::Deployment,
    providers: &Providers,
    secrets: &crate::secrets::Secrets,
    jobs: usize,
    timeout: Option<Duration>,
) -> Checked {
    let checks = state.pending.iter().filter_map(|(address, pending)| {
        let connection = providers.connections.get(&pending.provider)?;
        let info = connection.info().resource_type(&pending.resource_type)?;
        if !info.read_checks {
            return None;
        }
        let recorded = state.resources.get(address);
        // A create has nothing recorded: the provider finds it from the inputs it was given.
        let (inputs, outputs) = match recorded {
            Some(r) if pending.operation != OperationKind::Create => {
                (r.inputs.clone(), Some(r.outputs.clone()))
            }
            _ => (pending.inputs.clone(), None),
        };
        let call = OperationCall {
            previous_inputs: Some(inputs.clone()),
            previous_outputs: outputs,
            timeout: providers
                .timeouts
                .get(&pending.provider)
                .copied()
                .or(timeout),
            trace: crate::trace::call(),
            ..OperationCall::new(
                OperationKind::Read,
                &pending.resource_type,
                address,
                inputs.clone(),
            )
        };
        let connection = connection.clone();
        Some(async move {
            let read = connection.call(call, capstan_host::ignore_progress()).await;
            (address, pending, inputs, read, connection)
        })
    });
    let mut found = futures::stream::iter(checks).buffer_unordered(jobs.max(1));
    let mut checked = Checked::default();
    while let Some((address, pending, inputs, read, connection)) = found.next().await {
        let operation = pending.operation;
        match read {
            Ok(now) => {
                if operation == OperationKind::Delete {
                    checked.records.push(Record::Failed {
                        address: address.clone(),
                        operation,
                        error: "interrupted; a read found the resource still there".into(),
                    });
                    checked.notes.push((
                        address.clone(),
                        format!(
                            "an interrupted {operation} was checked: the resource is still there"
                        ),
                    ));
                    continue;
                }
                let recorded = state.resources.get(address);
                // What it depends on: as recorded, else as the deployment declares it now.
                let dependencies = recorded
                    .map(|r| r.dependencies.clone())
                    .or_else(|| deployment.resources.get(address).map(|d| d.dependencies()))
                    .unwrap_or_default();
                let mut resource = ResourceState {
                    provider: pending.provider.clone(),
                    resource_type: pending.resource_type.clone(),
                    inputs: recorded.map(|r| r.inputs.clone()).unwrap_or(inputs),
                    outputs: now.outputs,
                    dependencies,
                    parent: recorded.and_then(|r| r.parent.clone()),
                    sensitive: Vec::new(),
                    tainted: false,
                };
                crate::run::note_sensitive(address, &mut resource, &connection, secrets);
                checked.records.push(Record::Done {
                    address: address.clone(),
                    state: resource,
                });
                checked.adopted.push(address.clone());
                checked.notes.push((
                    address.clone(),
                    format!("an interrupted {operation} was checked: the resource exists, and is updated to be as declared"),
                ));
            }
            Err(CallError::Failed { error, .. }) if error.kind == ErrorKind::NotFound => {
                if state.resources.contains_key(address) {
                    checked.records.push(Record::Deleted {
                        address: address.clone(),
                    });
                } else {
                    checked.records.push(Record::Failed {
                        address: address.clone(),
                        operation,
                        error: "interrupted; a read found nothing made".into(),
                    });
                }
                let what = if operation == OperationKind::Delete {
                    "it is gone (deleted)"
                } else {
                    "the resource does not exist, and is created"
                };
                checked.notes.push((
                    address.clone(),
                    format!("an interrupted {operation} was checked: {what}"),
                ));
            }
            Err(e) => checked.warnings.push(format!(
                "could not check the interrupted {operation} of `{address}` ({e}); it stays pending"
            )),
        }
    }
    checked
}
