//! The plan: for every resource, what `apply` would do, and which changes wait on outputs that
//! do not exist yet.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use serde_json::{Map, Value};

use crate::model::{resolve_inputs, Deployment, ModelError};
use crate::state::State;

/// What happens to one resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Create,
    Update,
    /// Unchanged: the provider is not called.
    Noop,
    Delete,
}

impl Action {
    /// The verb for messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Update => "update",
            Action::Noop => "noop",
            Action::Delete => "delete",
        }
    }
}

/// One resource's line in the plan.
#[derive(Clone, Debug, PartialEq, Serialize)]
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
    pub interrupted: Option<String>,
}

/// Resources in dependency order (dependencies first).
pub fn topological_order(deployment: &Deployment) -> Vec<String> {
    let mut remaining: BTreeMap<&str, usize> = BTreeMap::new();
    let mut dependents: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (address, r) in &deployment.resources {
        let deps = r.dependencies();
        remaining.insert(address, deps.len());
        for dep in deps {
            let dep = deployment
                .resources
                .get_key_value(&dep)
                .map(|(k, _)| k.as_str())
                .unwrap_or_default();
            dependents.entry(dep).or_default().push(address);
        }
    }
    let mut ready: Vec<&str> = remaining
        .iter()
        .filter(|(_, n)| **n == 0)
        .map(|(a, _)| *a)
        .collect();
    ready.reverse();
    let mut order = Vec::with_capacity(remaining.len());
    while let Some(address) = ready.pop() {
        order.push(address.to_string());
        for dependent in dependents.get(address).into_iter().flatten() {
            let n = remaining.get_mut(dependent).expect("known");
            *n -= 1;
            if *n == 0 {
                ready.push(dependent);
            }
        }
    }
    order
}

fn changed_keys(old: &Map<String, Value>, new: &Map<String, Value>) -> Vec<String> {
    let keys: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    keys.into_iter()
        .filter(|k| old.get(*k) != new.get(*k))
        .cloned()
        .collect()
}

/// Plans an apply of `deployment` over `state`.
pub fn plan(deployment: &Deployment, state: &State) -> Result<Vec<PlannedChange>, ModelError> {
    let mut actions: BTreeMap<String, Action> = BTreeMap::new();
    let mut changes = Vec::new();
    for address in topological_order(deployment) {
        let r = &deployment.resources[&address];
        let recorded = state.resources.get(&address);
        if let Some(old) = recorded {
            if old.provider != r.provider || old.resource_type != r.resource_type {
                return Err(ModelError {
                    file: deployment.file.clone(),
                    place: format!("resources.{address}"),
                    message: format!(
                        "was a `{}` of provider `{}` and is now a `{}` of `{}`; changing that is not supported yet: \
                         remove the resource, apply, then add it back",
                        old.resource_type, old.provider, r.resource_type, r.provider
                    ),
                });
            }
        }
        let known = |target: &str, output: &str| -> Option<Value> {
            (actions.get(target) == Some(&Action::Noop))
                .then(|| state.resources.get(target)?.outputs.get(output).cloned())
                .flatten()
        };
        let resolved = resolve_inputs(&r.inputs, &known);
        let waits_on: Vec<String> = r
            .refs
            .iter()
            .map(|x| x.address.clone())
            .filter(|a| actions.get(a) != Some(&Action::Noop))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let (action, changed_inputs) = match (recorded, resolved) {
            (None, _) => (Action::Create, Vec::new()),
            (Some(old), Some(new)) if old.inputs == new => (Action::Noop, Vec::new()),
            (Some(old), Some(new)) => (Action::Update, changed_keys(&old.inputs, &new)),
            (Some(_), None) => (Action::Update, Vec::new()),
        };
        actions.insert(address.clone(), action);
        changes.push(PlannedChange {
            address: address.clone(),
            action,
            provider: r.provider.clone(),
            resource_type: r.resource_type.clone(),
            changed_inputs,
            waits_on: if action == Action::Noop {
                Vec::new()
            } else {
                waits_on
            },
            interrupted: state.pending.get(&address).map(|p| p.operation.clone()),
        });
    }
    for (address, old) in &state.resources {
        if !deployment.resources.contains_key(address) {
            changes.push(delete_change(address, old, state));
        }
    }
    Ok(changes)
}

fn delete_change(address: &str, old: &crate::state::ResourceState, state: &State) -> PlannedChange {
    PlannedChange {
        address: address.to_string(),
        action: Action::Delete,
        provider: old.provider.clone(),
        resource_type: old.resource_type.clone(),
        changed_inputs: Vec::new(),
        waits_on: Vec::new(),
        interrupted: state.pending.get(address).map(|p| p.operation.clone()),
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
