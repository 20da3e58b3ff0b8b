//! What providers are asked while planning: reads of resources whose reality can change
//! while their inputs do not, and the planned outcome of creates and updates.

use super::*;

/// What the plan's reads found.
#[derive(Debug, Default)]
pub struct PlanReads {
    /// Reads that failed (the resource is planned as if unread).
    pub warnings: Vec<String>,
    /// Recorded resources their providers no longer find: made again (or, for a delete,
    /// already gone). The caller drops them from the state (and journals it, for an apply).
    pub gone: Vec<String>,
    /// Recorded resources a refresh found changed behind Capstan's back, with the outputs it
    /// read: the caller records them, so that what is planned on them (an update) starts
    /// from what is there, as Terraform's refresh does.
    pub refreshed: Vec<(String, capstan_schema::Json)>,
}

/// What providers said of the plan: what they refuse (the apply would fail on it: a `plan`
/// fails), and what they could not plan (the change is shown without their plan).
#[derive(Debug, Default)]
pub struct ProviderChecks {
    /// Each as "ADDRESS: what is wrong" (the provider's message names the input).
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
}

/// Asks the providers of types that declare `plansChanges` what each create and update whose
/// inputs are known now will make (for `capstan plan`): the planned outputs, which are known
/// only after the run, and whether an update replaces the resource; and those that declare
/// `checksInputs` whether the inputs fit. Changes nothing.
pub async fn plan_with_providers(
    changes: &mut [PlannedChange],
    deployment: &Deployment,
    state: &State,
    providers: &Providers,
    jobs: usize,
) -> ProviderChecks {
    let lookup = |target: &str, output: &str| {
        state
            .resources
            .get(target)
            .and_then(|r| r.outputs.get_raw(output))
    };
    // A provider configured only during the run cannot plan yet.
    let late = config_late(deployment, state, changes);
    let asks = changes.iter().enumerate().filter_map(|(i, change)| {
        if !matches!(change.action, Action::Create | Action::Update)
            || !change.waits_on.is_empty()
            || late.contains(&change.provider)
        {
            return None;
        }
        let connection = providers.connections.get(&change.provider)?;
        let info = connection.info().resource_type(&change.resource_type)?;
        if !info.plans_changes && !info.checks_inputs {
            return None;
        }
        let plans = info.plans_changes;
        let (_, decl) = deployment.resources.get_index(change.declared?)?;
        let inputs = decl.resolve(&lookup)?;
        let recorded = state
            .resources
            .get(&change.address)
            .filter(|_| change.action == Action::Update);
        let call = OperationCall {
            previous_inputs: recorded.map(|r| r.inputs.clone()),
            previous_outputs: recorded.map(|r| r.outputs.clone()),
            timeout: providers.timeouts.get(&change.provider).copied(),
            trace: crate::trace::call(),
            ..OperationCall::new(
                change.action.first_operation(),
                &change.resource_type,
                &change.address,
                inputs,
            )
        };
        let sensitive: Vec<String> = info
            .outputs
            .iter()
            .filter(|o| o.sensitive)
            .map(|o| o.name.clone())
            .collect();
        let connection = connection.clone();
        Some(async move { (i, connection.plan(&call).await, sensitive, plans) })
    });
    let asks: Vec<_> = asks.collect();
    let mut answers = futures::stream::iter(asks).buffer_unordered(jobs.max(1));
    let mut checks = ProviderChecks::default();
    let warnings = &mut checks.warnings;
    let mut errors = Vec::new();
    // A provider's own settings refused: said once, for the provider.
    let mut settings: BTreeMap<String, String> = BTreeMap::new();
    while let Some((i, answer, sensitive, plans)) = answers.next().await {
        let change = &mut changes[i];
        match answer {
            // Asked only whether the inputs fit: they do.
            Ok(Some(_)) if !plans => {}
            Err(CallError::Failed { error, .. })
                if error.kind == capstan_schema::ErrorKind::Settings =>
            {
                settings
                    .entry(change.provider.clone())
                    .or_insert_with(|| with_details(&error));
            }
            // Refused: the apply would fail the same way.
            Err(CallError::Failed { error, .. })
                if matches!(
                    error.kind,
                    capstan_schema::ErrorKind::InvalidInput | capstan_schema::ErrorKind::Permanent
                ) =>
            {
                // Named once: the provider's message may name it already.
                let said = with_details(&error);
                errors.push(
                    if error.message.contains(&format!("`{}`", change.address)) {
                        said
                    } else {
                        format!("{}: {said}", change.address)
                    },
                );
            }
            Ok(Some(plan)) => {
                let mut outputs = match serde_json::from_str::<serde_json::Value>(&plan.outputs) {
                    Ok(outputs @ serde_json::Value::Object(_)) => outputs,
                    _ => {
                        warnings.push(format!(
                            "its provider planned `{}` with outputs that are not a JSON object; it is shown without the provider's plan",
                            change.address
                        ));
                        continue;
                    }
                };
                if let Some(o) = outputs.as_object_mut() {
                    for name in &sensitive {
                        if let Some(v) = o.get_mut(name).filter(|v| !v.is_null()) {
                            *v = serde_json::Value::String("(sensitive)".into());
                        }
                    }
                }
                change.planned = Some(Box::new(crate::plan::ProviderPlanned {
                    outputs,
                    unknown: plan.unknown,
                    replace: plan.replace,
                }));
            }
            Ok(None) => {}
            Err(e) => warnings.push(format!(
                "its provider could not plan `{}` ({e}); it is shown without the provider's plan",
                change.address
            )),
        }
    }
    errors.sort();
    checks.errors = settings
        .into_iter()
        .map(|(provider, said)| format!("provider `{provider}`: its settings are refused: {said}"))
        .chain(errors)
        .collect();
    checks
}

/// A provider's error as one line: its message, then its details (in parentheses, unless
/// they are already).
fn with_details(error: &OperationError) -> String {
    match error.details.trim() {
        "" => error.message.clone(),
        d if d.starts_with('(') => format!("{} {d}", error.message),
        d => format!("{} ({d})", error.message),
    }
}

/// Reads recorded resources while planning, and plans what it finds: an update when the
/// outputs differ from those recorded, a create when the resource is gone. Without
/// `refresh`, only unchanged resources of types that declare `readOnPlan`; with it, also
/// every recorded resource (to be updated, replaced, deleted or left) of a type whose reads
/// look at the real resource (`readChecks`): drift made behind Capstan's back.
pub async fn read_on_plan(
    changes: &mut Vec<PlannedChange>,
    deployment: &Deployment,
    state: &State,
    providers: &Providers,
    jobs: usize,
    timeout: Option<Duration>,
    refresh: bool,
) -> PlanReads {
    let (updates, gone, warnings) = read_all(
        changes, deployment, state, providers, jobs, timeout, refresh,
    )
    .await;
    let mut reads = PlanReads {
        warnings,
        refreshed: updates
            .iter()
            .filter_map(|(i, _, now)| now.clone().map(|now| (changes[*i].address.clone(), now)))
            .collect(),
        ..PlanReads::default()
    };
    let updates = updates.into_iter().map(|(i, keys, _)| (i, keys)).collect();
    let changing = plan_what_was_read(changes, updates, gone, &mut reads.gone);
    if !changing.is_empty() {
        wait_on_changing(changes, deployment, changing);
    }
    reads
}

/// What the reads found: the changes whose resource drifted (with the outputs that differ,
/// and, when the read looked at the real resource, the outputs it found), those whose
/// provider no longer finds it, and the reads that failed.
type Found = (
    Vec<(usize, Vec<String>, Option<capstan_schema::Json>)>,
    Vec<usize>,
    Vec<String>,
);

/// Reads, concurrently under `jobs`, every recorded resource that the plan must read.
async fn read_all(
    changes: &[PlannedChange],
    deployment: &Deployment,
    state: &State,
    providers: &Providers,
    jobs: usize,
    timeout: Option<Duration>,
    refresh: bool,
) -> Found {
    let mut warnings = Vec::new();
    // A provider configured only during the run cannot read yet.
    let late = config_late(deployment, state, changes);
    let reads = changes.iter().enumerate().filter_map(|(i, change)| {
        let recorded = state.resources.get(&change.address)?;
        if late.contains(&recorded.provider) {
            return None;
        }
        // The recorded resource's own provider and type (a replace changes them).
        let connection = providers.connections.get(&recorded.provider)?;
        let info = connection.info().resource_type(&recorded.resource_type)?;
        // A refresh looks at the real resource; a read on plan says what it would be now (a
        // build of an edited file), which is not what exists.
        let refreshing = refresh && info.read_checks && change.action != Action::Create;
        let wanted = (change.action == Action::Noop && info.read_on_plan) || refreshing;
        if !wanted {
            return None;
        }
        let call = OperationCall {
            previous_inputs: Some(recorded.inputs.clone()),
            previous_outputs: Some(recorded.outputs.clone()),
            // As for any operation: the provider's timeout, else the run's.
            timeout: providers
                .timeouts
                .get(&recorded.provider)
                .copied()
                .or(timeout),
            trace: crate::trace::call(),
            ..OperationCall::new(
                OperationKind::Read,
                &recorded.resource_type,
                &change.address,
                recorded.inputs.clone(),
            )
        };
        let connection = connection.clone();
        // Only a type whose reads look at the real thing is believed when it says "gone".
        let checks = info.read_checks;
        Some(async move {
            let read = connection.call(call, capstan_host::ignore_progress()).await;
            (i, recorded, read, checks, refreshing)
        })
    });
    let mut found = futures::stream::iter(reads).buffer_unordered(jobs.max(1));
    let mut updates = Vec::new();
    let mut gone = Vec::new();
    while let Some((i, recorded, read, checks, refreshing)) = found.next().await {
        match read {
            Ok(now) if now.outputs != recorded.outputs => updates.push((
                i,
                crate::plan::changed_keys(&recorded.outputs, &now.outputs),
                refreshing.then_some(now.outputs),
            )),
            Ok(_) => {}
            Err(CallError::Failed { error, .. })
                if error.kind == capstan_schema::ErrorKind::NotFound && checks =>
            {
                gone.push(i);
            }
            Err(e) => warnings.push(format!(
                "could not read `{}` to see whether it changed ({e}); it is planned as if unread",
                changes[i].address
            )),
        }
    }
    drop(found);
    (updates, gone, warnings)
}

/// Turns what the reads found into the plan: gone is made again (or, for a delete, no longer
/// deleted), drifted is updated. Returns the addresses that now change.
fn plan_what_was_read(
    changes: &mut Vec<PlannedChange>,
    updates: Vec<(usize, Vec<String>)>,
    gone: Vec<usize>,
    gone_addresses: &mut Vec<String>,
) -> std::collections::HashSet<String> {
    let mut changing: std::collections::HashSet<String> = Default::default();
    let mut drop_changes = Vec::new();
    for i in gone {
        let change = &mut changes[i];
        gone_addresses.push(change.address.clone());
        if change.action == Action::Delete {
            // Nothing left to delete.
            drop_changes.push(i);
            continue;
        }
        change.action = Action::Create;
        change.replaces = None;
        change.changed_inputs = Vec::new();
        change.note =
            Some("not found by its provider (deleted outside Capstan): made again".into());
        changing.insert(change.address.clone());
    }
    for (i, keys) in updates {
        let change = &mut changes[i];
        if change.action != Action::Noop {
            // Drift of one that changes anyway: said, and made as declared.
            change
                .note
                .get_or_insert_with(|| format!("changed outside Capstan: {}", differ(&keys)));
            continue;
        }
        change.action = Action::Update;
        change.read_changed = true;
        change.note = Some(format!(
            "changed while its inputs did not: read now, {}",
            differ(&keys)
        ));
        changing.insert(change.address.clone());
    }
    if !drop_changes.is_empty() {
        drop_changes.sort_unstable();
        for i in drop_changes.into_iter().rev() {
            changes.remove(i);
        }
    }
    changing
}

/// What refers to resources that now change may change with them: known only once they ran
/// (the plan lists changes dependencies first, so one pass reaches every dependent).
fn wait_on_changing(
    changes: &mut [PlannedChange],
    deployment: &Deployment,
    mut changing: std::collections::HashSet<String>,
) {
    for change in changes.iter_mut() {
        let Some(decl) = change
            .declared
            .and_then(|d| deployment.resources.get_index(d))
        else {
            continue;
        };
        let waits: Vec<String> = decl
            .1
            .refs
            .iter()
            .map(|r| r.address.clone())
            .filter(|a| changing.contains(a))
            .collect();
        if waits.is_empty() || change.read_changed || change.action == Action::Create {
            continue;
        }
        if change.action == Action::Noop {
            change.action = Action::Update;
        }
        for address in waits {
            if !change.waits_on.contains(&address) {
                change.waits_on.push(address);
            }
        }
        changing.insert(change.address.clone());
    }
}

/// "its `a` differs from what is recorded", or "its `a`, `b` differ …".
fn differ(keys: &[String]) -> String {
    let names: Vec<String> = keys.iter().map(|k| format!("`{k}`")).collect();
    let verb = if names.len() == 1 {
        "differs"
    } else {
        "differ"
    };
    format!("its {} {verb} from what is recorded", names.join(", "))
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_output_differs_and_several_differ() {
        assert_eq!(
            super::differ(&["content".into()]),
            "its `content` differs from what is recorded"
        );
        assert_eq!(
            super::differ(&["a".into(), "b".into()]),
            "its `a`, `b` differ from what is recorded"
        );
    }
}
