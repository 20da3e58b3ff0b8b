//! The plan: for every resource, what `apply` would do, and which changes wait on outputs that
//! do not exist yet.

use std::collections::BTreeSet;

use capstan_schema::Json;
use serde::Serialize;

use crate::model::{Deployment, ModelError};
use crate::state::State;

/// What happens to one resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Create,
    Update,
    /// Unchanged: the provider is not called.
    Noop,
    Delete,
    /// The provider or type changed: delete the recorded resource, then create the new one.
    Replace,
}

impl Action {
    /// The verb for messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Update => "update",
            Action::Noop => "noop",
            Action::Delete => "delete",
            Action::Replace => "replace",
        }
    }

    /// The first operation a provider is asked for to carry it out (a replace deletes first;
    /// nothing is asked for an unchanged resource but, at most, a read).
    pub fn first_operation(self) -> capstan_schema::OperationKind {
        use capstan_schema::OperationKind as K;
        match self {
            Action::Create => K::Create,
            Action::Update => K::Update,
            Action::Delete | Action::Replace => K::Delete,
            Action::Noop => K::Read,
        }
    }
}

/// One resource's line in the plan.
#[derive(Clone, Debug, PartialEq, Serialize, schemars::JsonSchema)]
pub struct PlannedChange {
    pub address: String,
    pub action: Action,
    pub provider: String,
    pub resource_type: String,
    /// Inputs whose value changes (for updates whose inputs are known).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub changed_inputs: Vec<String>,
    /// Resources whose new outputs this change waits for; its inputs are known only then.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub waits_on: Vec<String>,
    /// An operation on this resource was interrupted in an earlier run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interrupted: Option<capstan_schema::OperationKind>,
    /// Something the user must know about this change (e.g. a delete the provider cannot do).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// For a replace: the provider and type of the resource as recorded, deleted first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replaces: Option<Replaced>,
    /// Its index in the planned deployment's resources (not for deletes), so a run need not
    /// look every address up again.
    #[serde(skip)]
    pub declared: Option<usize>,
    /// Planned as an update although its inputs are the same: reading it while planning found
    /// it is no longer what is recorded (`readOnPlan` types).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub read_changed: bool,
    /// What its provider plans for it (`capstan plan`, types that declare `plansChanges`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub planned: Option<Box<ProviderPlanned>>,
}

/// A provider's own plan for a create or update: the outputs it will make (those not known
/// until it runs, and sensitive ones, shown as such), and whether it replaces the resource.
#[derive(Clone, Debug, PartialEq, Serialize, schemars::JsonSchema)]
pub struct ProviderPlanned {
    /// The outputs as planned: unknown ones null, sensitive ones `"(sensitive)"`.
    pub outputs: serde_json::Value,
    /// Outputs known only after the operation runs.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unknown: Vec<String>,
    /// For an update: the attributes whose change forces a new resource (deleted, then made
    /// again by the same operation).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub replace: Vec<String>,
}

/// What a replace deletes.
#[derive(Clone, Debug, PartialEq, Serialize, schemars::JsonSchema)]
pub struct Replaced {
    pub provider: String,
    pub resource_type: String,
}

/// Adds what the providers' handshakes tell about the plan: deletes they cannot do.
pub fn annotate(
    changes: &mut [PlannedChange],
    infos: &std::collections::BTreeMap<String, capstan_schema::ProviderInfo>,
) {
    let no_delete = |provider: &str, resource_type: &str| {
        infos
            .get(provider)
            .and_then(|i| i.resource_type(resource_type))
            .is_some_and(|t| t.no_delete)
    };
    for change in changes.iter_mut() {
        let deleted = match (&change.action, &change.replaces) {
            (Action::Delete, _) => (change.provider.clone(), change.resource_type.clone()),
            (Action::Replace, Some(old)) => (old.provider.clone(), old.resource_type.clone()),
            _ => continue,
        };
        if no_delete(&deleted.0, &deleted.1) {
            change.note = Some(format!(
                "provider `{}` cannot delete (NixOps4 v0 has no delete): it will report a failure and leave the resource in place",
                deleted.0
            ));
        }
    }
}

/// Resources in dependency order (dependencies first), as indices into
/// `deployment.resources`; among resources ready at the same time, in address order, so the
/// order is stable from run to run.
pub fn topological_order(deployment: &Deployment) -> Vec<usize> {
    let resources = &deployment.resources;
    let count = resources.len();
    let mut remaining = vec![0u32; count];
    // Edges as (dependency, dependent), then grouped by dependency.
    let mut edges: Vec<(u32, u32)> = Vec::with_capacity(count * 2);
    for (i, r) in resources.values().enumerate() {
        remaining[i] = r.depends_on.len() as u32;
        edges.extend(r.depends_on.iter().map(|&d| (d, i as u32)));
    }
    let mut first = vec![0u32; count + 1];
    for &(d, _) in &edges {
        first[d as usize + 1] += 1;
    }
    for i in 0..count {
        first[i + 1] += first[i];
    }
    let mut dependents = vec![0u32; edges.len()];
    let mut fill = first.clone();
    for &(d, i) in &edges {
        dependents[fill[d as usize] as usize] = i;
        fill[d as usize] += 1;
    }
    drop(edges);
    let mut ready: Vec<usize> = (0..count).rev().filter(|&i| remaining[i] == 0).collect();
    let mut order = Vec::with_capacity(count);
    while let Some(i) = ready.pop() {
        order.push(i);
        for &j in &dependents[first[i] as usize..first[i + 1] as usize] {
            let n = &mut remaining[j as usize];
            *n -= 1;
            if *n == 0 {
                ready.push(j as usize);
            }
        }
    }
    order
}

/// The keys of two JSON objects whose values differ, in order.
pub fn changed_keys(old: &Json, new: &Json) -> Vec<String> {
    let (old, new) = (old.object(), new.object());
    let keys: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    keys.into_iter()
        .filter(|k| old.get(*k) != new.get(*k))
        .cloned()
        .collect()
}

/// Plans an apply of `deployment` over `state`.
pub fn plan(deployment: &Deployment, state: &State) -> Result<Vec<PlannedChange>, ModelError> {
    let resources = &deployment.resources;
    let mut changes = Vec::with_capacity(resources.len() + state.resources.len());
    // By index into `resources`: each resource's recorded state, and its action once planned.
    let recorded_of: Vec<Option<&crate::state::ResourceState>> =
        resources.keys().map(|a| state.resources.get(a)).collect();
    let mut actions: Vec<Option<Action>> = vec![None; resources.len()];
    for i in topological_order(deployment) {
        let (address, r) = resources.get_index(i).expect("an index of the deployment");
        let recorded = recorded_of[i];
        // A new provider or type cannot take over what the old one made: replace it.
        let replaces = recorded
            .filter(|old| {
                old.provider != r.provider || old.resource_type != r.resource_type || old.tainted
            })
            .map(|old| Replaced {
                provider: old.provider.clone(),
                resource_type: old.resource_type.clone(),
            });
        // Outputs are known now only of resources that stay as they are.
        let known = |target: &str, output: &str| -> Option<&serde_json::value::RawValue> {
            let j = resources.get_index_of(target)?;
            if actions[j] == Some(Action::Noop) {
                recorded_of[j]?.outputs.get_raw(output)
            } else {
                None
            }
        };
        let (action, changed_inputs) = match recorded {
            _ if replaces.is_some() => (Action::Replace, Vec::new()),
            None => (Action::Create, Vec::new()),
            Some(old) => match r.resolve(&known) {
                // Equal text first (the usual case: written from the same deployment), then
                // equal meaning.
                Some(new) if new == old.inputs => (Action::Noop, Vec::new()),
                Some(new) => (Action::Update, changed_keys(&old.inputs, &new)),
                // Waits on a resource that changes: its inputs cannot be known yet.
                None => (Action::Update, Vec::new()),
            },
        };
        // The references whose values come from resources that change (capabilities are
        // never known ahead). `depends_on` is in address order, each once.
        let waits_on: Vec<String> = if action == Action::Noop || r.refs.is_empty() {
            Vec::new()
        } else {
            r.depends_on
                .iter()
                .map(|&j| j as usize)
                .filter(|&j| actions[j] != Some(Action::Noop))
                .map(|j| resources.get_index(j).expect("an index").0)
                .filter(|a| r.refs.iter().any(|x| &x.address == *a))
                .cloned()
                .collect()
        };
        actions[i] = Some(action);
        changes.push(PlannedChange {
            address: address.clone(),
            action,
            provider: r.provider.clone(),
            resource_type: r.resource_type.clone(),
            changed_inputs,
            waits_on,
            interrupted: state.pending.get(address).map(|p| p.operation),
            note: replaces.as_ref().map(|old| {
                if recorded.is_some_and(|r| r.tainted) {
                    "a create failed after making part of it: it is deleted, then created anew"
                        .to_string()
                } else {
                    format!(
                        "was a `{}` of provider `{}`: it is deleted, then created anew",
                        old.resource_type, old.provider
                    )
                }
            }),
            replaces,
            declared: Some(i),
            read_changed: false,
            planned: None,
        });
    }
    for (address, old) in &state.resources {
        if !resources.contains_key(address)
            && !old
                .parent
                .as_deref()
                .is_some_and(|p| kept_parent(deployment, &actions, state, p))
        {
            changes.push(delete_change(address, old, state));
        }
    }
    Ok(changes)
}

/// Whether a child whose parent is `parent` stays: as long as its parent (or the parent's
/// parent) is declared and not replaced — only its parent's provider knows whether it is
/// still wanted.
fn kept_parent<'a>(
    deployment: &Deployment,
    actions: &[Option<Action>],
    state: &'a State,
    mut parent: &'a str,
) -> bool {
    for _ in 0..=state.resources.len() {
        if let Some(j) = deployment.resources.get_index_of(parent) {
            return actions[j] != Some(Action::Replace);
        }
        match state
            .resources
            .get(parent)
            .and_then(|r| r.parent.as_deref())
        {
            Some(up) => parent = up,
            None => return false,
        }
    }
    false
}

fn delete_change(address: &str, old: &crate::state::ResourceState, state: &State) -> PlannedChange {
    PlannedChange {
        address: address.to_string(),
        action: Action::Delete,
        provider: old.provider.clone(),
        resource_type: old.resource_type.clone(),
        changed_inputs: Vec::new(),
        waits_on: Vec::new(),
        interrupted: state.pending.get(address).map(|p| p.operation),
        note: None,
        replaces: None,
        declared: None,
        read_changed: false,
        planned: None,
    }
}

/// Plans deleting everything in the state.
pub fn plan_destroy(state: &State) -> Vec<PlannedChange> {
    state
        .resources
        .iter()
        .map(|(address, old)| delete_change(address, old, state))
        .collect()
}
