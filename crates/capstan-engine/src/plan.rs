//! The plan: for every resource, what `apply` would do, and which changes wait on outputs that
//! do not exist yet.

use std::collections::{BTreeSet, HashMap};

use capstan_schema::Json;
use serde::Serialize;
use serde_json::Value;

use crate::model::{Deployment, ModelError};
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
    /// Something the user must know about this change (e.g. a delete the provider cannot do).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Adds what the providers' handshakes tell about the plan: deletes they cannot do.
pub fn annotate(
    changes: &mut [PlannedChange],
    infos: &std::collections::BTreeMap<String, capstan_schema::ProviderInfo>,
) {
    for change in changes.iter_mut().filter(|c| c.action == Action::Delete) {
        let no_delete = infos
            .get(&change.provider)
            .and_then(|i| i.resource_type(&change.resource_type))
            .is_some_and(|t| t.no_delete);
        if no_delete {
            change.note = Some(format!(
                "provider `{}` cannot delete (NixOps4 v0 has no delete): it will report a failure and leave the resource in place",
                change.provider
            ));
        }
    }
}

/// FNV-1a: planning hashes a few short addresses per resource, where SipHash's DoS resistance
/// buys nothing (the keys come from the user's own deployment) and costs a third of the time.
#[derive(Default, Clone, Copy)]
pub(crate) struct Fnv(u64);

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut hash = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for byte in bytes {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = hash;
    }
}

pub(crate) type FastMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<Fnv>>;

/// Resources in dependency order (dependencies first).
pub fn topological_order(deployment: &Deployment) -> Vec<&str> {
    let count = deployment.resources.len();
    let mut remaining: FastMap<&str, usize> =
        FastMap::with_capacity_and_hasher(count, Default::default());
    let mut dependents: FastMap<&str, Vec<&str>> =
        FastMap::with_capacity_and_hasher(count, Default::default());
    for (address, r) in &deployment.resources {
        let mut deps: Vec<&str> = r
            .refs
            .iter()
            .map(|x| x.address.as_str())
            .chain(r.capabilities.iter().map(|c| c.address.as_str()))
            .collect();
        deps.sort_unstable();
        deps.dedup();
        remaining.insert(address, deps.len());
        for dep in deps {
            dependents.entry(dep).or_default().push(address);
        }
    }
    // Seed in address order, so the order is stable from run to run.
    let mut ready: Vec<&str> = deployment
        .resources
        .keys()
        .map(String::as_str)
        .filter(|a| remaining[a] == 0)
        .collect();
    ready.reverse();
    let mut order = Vec::with_capacity(count);
    while let Some(address) = ready.pop() {
        order.push(address);
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

fn changed_keys(old: &Json, new: &Json) -> Vec<String> {
    let (old, new) = (old.object(), new.object());
    let keys: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    keys.into_iter()
        .filter(|k| old.get(*k) != new.get(*k))
        .cloned()
        .collect()
}

/// Plans an apply of `deployment` over `state`.
pub fn plan(deployment: &Deployment, state: &State) -> Result<Vec<PlannedChange>, ModelError> {
    let mut actions: FastMap<&str, Action> =
        FastMap::with_capacity_and_hasher(deployment.resources.len(), Default::default());
    let mut changes = Vec::with_capacity(deployment.resources.len() + state.resources.len());
    // Each resource with its recorded state, joined once (both maps are sorted by address), so
    // the walk below does hash lookups rather than ordered-map string comparisons.
    let mut entries: FastMap<
        &str,
        (
            &crate::model::ResourceDecl,
            Option<&crate::state::ResourceState>,
        ),
    > = FastMap::with_capacity_and_hasher(deployment.resources.len(), Default::default());
    let mut recorded_iter = state.resources.iter().peekable();
    for (address, decl) in &deployment.resources {
        while recorded_iter
            .peek()
            .is_some_and(|(a, _)| a.as_str() < address.as_str())
        {
            recorded_iter.next();
        }
        let recorded = recorded_iter
            .peek()
            .filter(|(a, _)| *a == address)
            .map(|(_, r)| *r);
        entries.insert(address, (decl, recorded));
    }
    for address in topological_order(deployment) {
        let (r, recorded) = entries[address];
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
        // Outputs are known now only of resources that stay as they are.
        let known = |target: &str, output: &str| -> Option<Value> {
            if actions.get(target) == Some(&Action::Noop) {
                entries.get(target)?.1?.outputs.get(output)
            } else {
                None
            }
        };
        let (action, changed_inputs) = match recorded {
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
        let waits_on: Vec<String> = if action == Action::Noop {
            Vec::new()
        } else {
            r.refs
                .iter()
                .map(|x| x.address.as_str())
                .filter(|a| actions.get(a) != Some(&Action::Noop))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .map(str::to_string)
                .collect()
        };
        actions.insert(address, action);
        changes.push(PlannedChange {
            address: address.to_string(),
            action,
            provider: r.provider.clone(),
            resource_type: r.resource_type.clone(),
            changed_inputs,
            waits_on,
            interrupted: state.pending.get(address).map(|p| p.operation.clone()),
            note: None,
        });
    }
    for (address, old) in &state.resources {
        if !entries.contains_key(address.as_str()) {
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
        note: None,
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
