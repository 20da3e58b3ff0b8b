//! The run's graph: a scheduler node per planned change and the edges between them.

use super::*;

/// Adds a node per change to `scheduler` (node `i` is change `i`), and the edges between them.
pub(super) fn graph(
    changes: &[PlannedChange],
    deployment: &Deployment,
    state: &State,
    scheduler: &mut Scheduler,
) -> Vec<Node> {
    let nodes = nodes(changes, deployment);
    let mut edges = edges(changes, &nodes, deployment, state);
    if changes.iter().any(|c| c.action == Action::Replace) {
        replace_edges(changes, state, &mut edges);
    }
    scheduler.reserve(nodes.len());
    for _ in &nodes {
        obey(scheduler.add(&[]).map(drop));
    }
    for (waits, first) in edges {
        obey(scheduler.depend(waits, first));
    }
    nodes
}

/// What the driver keeps per change: where it is declared, and whether another resource of
/// the run takes a capability from it.
fn nodes(changes: &[PlannedChange], deployment: &Deployment) -> Vec<Node> {
    // Resources some resource of this run takes a capability from (usually none).
    let capability_sources: BTreeSet<&str> = if deployment
        .resources
        .values()
        .any(|r| !r.capabilities.is_empty())
    {
        changes
            .iter()
            .filter(|c| c.action != Action::Delete)
            .filter_map(|c| deployment.resources.get(&c.address))
            .flat_map(|r| r.capabilities.iter().map(|c| c.address.as_str()))
            .collect()
    } else {
        BTreeSet::new()
    };
    changes
        .iter()
        .map(|change| {
            let decl = match change.action {
                Action::Delete => None,
                // The plan's index, if it is of this deployment; else looked up.
                _ => change
                    .declared
                    .filter(|&d| {
                        deployment
                            .resources
                            .get_index(d)
                            .is_some_and(|(address, _)| *address == change.address)
                    })
                    .or_else(|| deployment.resources.get_index_of(&change.address)),
            };
            Node {
                // Indices are `u32` in the model too (`ResourceDecl::depends_on`).
                decl: decl.and_then(|d| u32::try_from(d).ok()).unwrap_or(NO_DECL),
                capability_source: capability_sources.contains(change.address.as_str()),
            }
        })
        .collect()
}

/// The edges as (waits, first): `waits` starts only after `first` is done. Creates and
/// updates wait for what they depend on; deletes for the deletes of what depends on them; a
/// delete of what a resource that stays used to depend on, for that resource's change.
fn edges(
    changes: &[PlannedChange],
    nodes: &[Node],
    deployment: &Deployment,
    state: &State,
) -> Vec<(usize, usize)> {
    // Edges as (waits, first): `waits` starts only after `first` is done.
    let mut edges: Vec<(usize, usize)> = Vec::with_capacity(nodes.len() * 2);
    // Declared dependencies are indices into the deployment; only deletes (and recorded
    // wiring) need addresses looked up, and only deletes can be found that way.
    let mut node_of_decl = vec![usize::MAX; deployment.resources.len()];
    for (n, node) in nodes.iter().enumerate() {
        if let Some(d) = node.decl() {
            node_of_decl[d] = n;
        }
    }
    let deletes = deletes_of(changes);
    for (i, node) in nodes.iter().enumerate() {
        match node.decl() {
            // Creates and updates wait for what they depend on.
            Some(d) => {
                for &j in &deployment.resources[d].depends_on {
                    let n = node_of_decl[j as usize];
                    if n != usize::MAX {
                        edges.push((i, n));
                    }
                }
            }
            // Deletes wait for the deletes of what depends on them.
            None => {
                let recorded = state.resources.get(&changes[i].address);
                for dep in recorded.iter().flat_map(|r| &r.dependencies) {
                    if let Some(&j) = deletes.get(dep.as_str()) {
                        edges.push((j, i));
                    }
                }
                continue;
            }
        }
        // A resource that stays but used to depend on one being deleted must move off it
        // first: the delete waits for its create/update (and is skipped if that fails).
        if deletes.is_empty() {
            continue;
        }
        let Some(recorded) = state.resources.get(&changes[i].address) else {
            continue;
        };
        for dep in &recorded.dependencies {
            if let Some(&j) = deletes.get(dep.as_str()) {
                edges.push((j, i));
            }
        }
    }
    edges
}

/// A replace deletes first: what was recorded as depending on it (its children, say) and is
/// deleted in this run goes before.
fn replace_edges(changes: &[PlannedChange], state: &State, edges: &mut Vec<(usize, usize)>) {
    let deletes = deletes_of(changes);
    let mut deleted_dependents: FastMap<&str, Vec<usize>> = FastMap::default();
    for (&address, &j) in &deletes {
        for dep in state
            .resources
            .get(address)
            .iter()
            .flat_map(|r| &r.dependencies)
        {
            deleted_dependents.entry(dep.as_str()).or_default().push(j);
        }
    }
    for (i, change) in changes.iter().enumerate() {
        if change.action == Action::Replace {
            for &j in deleted_dependents
                .get(change.address.as_str())
                .into_iter()
                .flatten()
            {
                edges.push((i, j));
            }
        }
    }
}

/// The node of each delete, by address.
fn deletes_of(changes: &[PlannedChange]) -> FastMap<&str, usize> {
    changes
        .iter()
        .enumerate()
        .filter(|(_, change)| change.action == Action::Delete)
        .map(|(n, change)| (change.address.as_str(), n))
        .collect()
}
