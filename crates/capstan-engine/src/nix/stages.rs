//! Planning a deployment in Nix: how many evaluations it takes, what each is given, what
//! is deferred and what each item is recorded as using; and what a run needs to evaluate
//! again while it goes on ([`Stages`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::{evaluate, Deferred, DeferredKind, EvalError, Evaluation, Request, Sources};

/// A deployment in Nix, read as far as the outputs that exist allow, and planned.
pub struct Staged {
    pub deployment: crate::model::Deployment,
    /// The plan of what could be read. Deletes of what a deferred item may still declare are
    /// left out (see [`Deferred::covers`]).
    pub changes: Vec<crate::plan::PlannedChange>,
    pub deferred: Vec<Deferred>,
}

#[derive(Debug, thiserror::Error)]
pub enum StagedError {
    #[error(transparent)]
    Eval(#[from] EvalError),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
}

/// Evaluates and plans a deployment in Nix: once, when nothing changes.
///
/// The first evaluation is given every recorded output. A resource the plan leaves as it is
/// keeps its outputs, so what was computed from them stands; and a recorded resource is taken
/// to use what it used when it was last applied (its recorded dependencies, less what nothing
/// used now): its inputs are the recorded ones, computed from the same outputs. The outputs
/// of what the plan does not leave as it is are taken back, with those of everything that
/// used them (transitively), and the deployment is evaluated again without them: what used
/// them is then deferred, to be evaluated during the run once they are made. A recorded
/// resource that changes is read again, traced, for what it uses now. `stage` counts
/// evaluations (for events).
pub async fn evaluate_and_plan(
    file: &Path,
    params: &Map<String, Value>,
    state: &crate::state::State,
    uses: &mut Uses,
    events: &dyn crate::events::EventSink,
    stage: &mut usize,
) -> Result<Staged, StagedError> {
    use crate::events::Event;
    use crate::plan::Action;
    let name = file.display().to_string();
    let mut known = outputs_of(state, state.resources.keys());
    // What each recorded resource is taken to use until it is read anew.
    let mut assumed: Uses = state
        .resources
        .iter()
        .map(|(address, recorded)| {
            let used = recorded
                .dependencies
                .iter()
                .filter(|d| known.contains_key(d.as_str()))
                .cloned()
                .collect();
            (address.clone(), used)
        })
        .collect();
    // Not traced for what they use: recorded resources (until they change), and what an
    // evaluation read already.
    let mut settled: BTreeSet<String> = state.resources.keys().cloned().collect();
    // Until an evaluation with recorded outputs fails: a value that no longer holds can take
    // a deployment where it cannot go (a branch naming a resource that is gone). Then the
    // evaluations start from no output, each given those of what the last one planned
    // unchanged and something waited for.
    let mut optimistic = !known.is_empty();
    // Outputs given and then found not to stand: not given again.
    let mut taken_back: BTreeSet<String> = BTreeSet::new();
    let uses_before = uses.clone();
    loop {
        *stage += 1;
        events.emit(Event::EvaluationStart {
            file: name.clone(),
            stage: *stage,
        });
        let evaluated = evaluate(&Request {
            file,
            params,
            known: &known,
            providers_only: false,
            settled: &settled,
        })
        .await;
        let parsed = evaluated.map_err(StagedError::from).and_then(|evaluation| {
            crate::model::Deployment::parse(file, &evaluation.document, params)
                .map(|deployment| (evaluation, deployment))
                .map_err(StagedError::from)
        });
        let (evaluation, mut deployment) = match parsed {
            Ok(both) => both,
            Err(e) if optimistic => {
                events.emit(Event::EvaluationFailed {
                    file: name.clone(),
                    stage: *stage,
                    error: e.to_string(),
                    stops_command: false,
                    retried: true,
                });
                optimistic = false;
                known.clear();
                assumed.clear();
                settled.clear();
                *uses = uses_before.clone();
                continue;
            }
            Err(e) => {
                // Every evaluation that starts ends, in the stream too.
                events.emit(Event::EvaluationFailed {
                    file: name.clone(),
                    stage: *stage,
                    error: e.to_string(),
                    stops_command: true,
                    retried: false,
                });
                return Err(e);
            }
        };
        // What was read anew was traced: what it uses is known, not assumed.
        for address in deployment.resources.keys() {
            if !settled.contains(address) {
                assumed.remove(address);
            }
        }
        for used in assumed.values_mut() {
            used.retain(|a| evaluation.found.contains(a));
        }
        let effective = with_assumed(uses, &assumed, &evaluation);
        record_uses(&mut deployment, &effective);
        settled.extend(deployment.resources.keys().cloned());
        events.emit(Event::EvaluationComplete {
            file: name.clone(),
            stage: *stage,
            resources: deployment.resources.len(),
            deferred: evaluation.deferred.len(),
            elapsed_seconds: evaluation.elapsed.as_secs_f64(),
        });
        for message in evaluation.messages.iter().filter(|m| !m.trim().is_empty()) {
            events.emit(Event::EvaluationLog {
                file: name.clone(),
                line: message.clone(),
            });
        }
        let mut changes = crate::plan::plan(&deployment, state)?;
        let deferred = evaluation.deferred;
        let kept = kept_for_deferred(state, &deferred);
        changes.retain(|c| c.action != Action::Delete || !kept.contains(c.address.as_str()));
        // Given outputs that do not stand: of what the plan does not leave as it is, and of
        // what used those (transitively).
        let unchanged: BTreeSet<&str> = changes
            .iter()
            .filter(|c| c.action == Action::Noop)
            .map(|c| c.address.as_str())
            .collect();
        let mut unstable: BTreeSet<String> = known
            .keys()
            .filter(|a| !unchanged.contains(a.as_str()))
            .cloned()
            .collect();
        loop {
            let more: Vec<String> = known
                .keys()
                .filter(|a| !unstable.contains(*a) && uses_any(&effective, a, &unstable))
                .cloned()
                .collect();
            if more.is_empty() {
                break;
            }
            unstable.extend(more);
        }
        let used_unstable = effective
            .values()
            .any(|used| used.iter().any(|u| unstable.contains(u)));
        // A recorded resource that changes may use other outputs than it did: read it again,
        // traced (unless nothing used any output at all: then it used none either).
        let retrace: Vec<String> = if evaluation.found.is_empty() {
            Vec::new()
        } else {
            changes
                .iter()
                .filter(|c| c.action != Action::Noop && c.action != Action::Delete)
                .filter(|c| assumed.contains_key(&c.address))
                .map(|c| c.address.clone())
                .collect()
        };
        if used_unstable || !retrace.is_empty() {
            known.retain(|a, _| !unstable.contains(a));
            taken_back.extend(unstable);
            for address in retrace {
                settled.remove(&address);
                assumed.remove(&address);
            }
            continue;
        }
        // Outputs that exist and stand, which something deferred waits for (from no output,
        // after a failed evaluation with all of them).
        let waited: BTreeSet<&str> = deferred
            .iter()
            .flat_map(|d| d.waits_for.iter().map(String::as_str))
            .collect();
        let newly: Vec<&String> = changes
            .iter()
            .filter(|c| c.action == Action::Noop)
            .map(|c| &c.address)
            .filter(|a| {
                waited.contains(a.as_str()) && !known.contains_key(*a) && !taken_back.contains(*a)
            })
            .collect();
        if !newly.is_empty() {
            known.extend(outputs_of(state, newly));
            continue;
        }
        if let Some(path) = output_cycle(&deferred) {
            return Err(EvalError::OutputCycle {
                file: file.to_path_buf(),
                path,
            }
            .into());
        }
        // What is read now keeps what it was taken to use.
        for (address, used) in assumed {
            if !used.is_empty() && deployment.resources.contains_key(&address) {
                uses.entry(address).or_insert(used);
            }
        }
        return Ok(Staged {
            deployment,
            changes,
            deferred,
        });
    }
}

/// What each item uses: what was traced (this evaluation's folded into `uses`, with what each
/// deferred item waited for), else what it is assumed to use.
fn with_assumed(uses: &mut Uses, assumed: &Uses, evaluation: &Evaluation) -> Uses {
    for (address, used) in &evaluation.uses {
        uses.entry(address.clone())
            .or_default()
            .extend(used.iter().cloned());
    }
    for d in &evaluation.deferred {
        uses.entry(d.address.clone())
            .or_default()
            .extend(d.waits_for.iter().cloned());
    }
    let mut effective = assumed.clone();
    for (address, used) in uses.iter() {
        effective.insert(address.clone(), used.clone());
    }
    effective
}

/// Whether `address` (or a nested deployment or group it is a member of) used outputs of
/// any of `these` (other than its own).
fn uses_any(uses: &Uses, address: &str, these: &BTreeSet<String>) -> bool {
    let mut prefix = address;
    loop {
        if let Some(used) = uses.get(prefix) {
            if used.iter().any(|u| u != address && these.contains(u)) {
                return true;
            }
        }
        match prefix.rfind('.') {
            Some(dot) => prefix = &prefix[..dot],
            None => return false,
        }
    }
}

/// A cycle among deferred items, each waiting for outputs of the next (which is itself
/// deferred, so never made), as a path that ends where it starts; `None` if there is none.
fn output_cycle(deferred: &[Deferred]) -> Option<Vec<String>> {
    // What each deferred item waits for that is deferred too (or inside one that is).
    let next = |d: &Deferred| -> Vec<usize> {
        deferred
            .iter()
            .enumerate()
            .filter(|(_, e)| d.waits_for.iter().any(|w| e.covers(w)))
            .map(|(n, _)| n)
            .collect()
    };
    let edges: Vec<Vec<usize>> = deferred.iter().map(next).collect();
    // Depth first, colouring: 0 unseen, 1 on the current path, 2 done.
    let mut colour = vec![0u8; deferred.len()];
    fn visit(
        n: usize,
        edges: &[Vec<usize>],
        colour: &mut [u8],
        path: &mut Vec<usize>,
    ) -> Option<Vec<usize>> {
        colour[n] = 1;
        path.push(n);
        for &m in &edges[n] {
            if colour[m] == 1 {
                let start = path.iter().position(|&p| p == m).unwrap_or(0);
                let mut cycle = path[start..].to_vec();
                cycle.push(m);
                return Some(cycle);
            }
            if colour[m] == 0 {
                if let Some(cycle) = visit(m, edges, colour, path) {
                    return Some(cycle);
                }
            }
        }
        path.pop();
        colour[n] = 2;
        None
    }
    for start in 0..deferred.len() {
        if colour[start] == 0 {
            let mut path = Vec::new();
            if let Some(cycle) = visit(start, &edges, &mut colour, &mut path) {
                return Some(
                    cycle
                        .into_iter()
                        .map(|n| deferred[n].address.clone())
                        .collect(),
                );
            }
        }
    }
    None
}

/// After the plan's reads (`run::read_on_plan`): a resource computed with the recorded outputs
/// of one found changed (`read_changed`) holds stale values, so it is deferred, to be
/// evaluated again once that one is made; and so is what used its outputs, or refers to it.
pub fn defer_stale(
    changes: &mut Vec<crate::plan::PlannedChange>,
    deployment: &crate::model::Deployment,
    deferred: &mut Vec<Deferred>,
) {
    let mut changing: BTreeSet<String> = changes
        .iter()
        .filter(|c| c.read_changed)
        .map(|c| c.address.clone())
        .collect();
    if changing.is_empty() {
        return;
    }
    let mut stale: BTreeMap<String, Vec<String>> = BTreeMap::new();
    loop {
        let mut found = Vec::new();
        for change in changes.iter() {
            if stale.contains_key(&change.address) || change.read_changed {
                continue;
            }
            let Some(decl) = deployment.resources.get(&change.address) else {
                continue;
            };
            let waits: Vec<String> = decl
                .uses
                .iter()
                .filter(|u| changing.contains(*u))
                .chain(
                    decl.refs
                        .iter()
                        .map(|r| &r.address)
                        .filter(|a| stale.contains_key(*a)),
                )
                .cloned()
                .collect();
            if !waits.is_empty() {
                found.push((change.address.clone(), waits));
            }
        }
        if found.is_empty() {
            break;
        }
        for (address, waits) in found {
            changing.insert(address.clone());
            stale.insert(address, waits);
        }
    }
    changes.retain(|c| !stale.contains_key(&c.address));
    for (address, waits_for) in stale {
        deferred.push(Deferred {
            address,
            kind: DeferredKind::Resource,
            waits_for,
        });
    }
}

/// The recorded resources a deferred item may still declare, and what they depend on (so
/// that it stays until they are deleted first): none of them is deleted as undeclared.
pub fn kept_for_deferred<'a>(
    state: &'a crate::state::State,
    deferred: &[Deferred],
) -> BTreeSet<&'a str> {
    let mut kept: BTreeSet<&str> = BTreeSet::new();
    if deferred.is_empty() {
        return kept;
    }
    let mut stack: Vec<&str> = state
        .resources
        .keys()
        .filter(|a| deferred.iter().any(|d| d.covers(a)))
        .map(String::as_str)
        .collect();
    while let Some(address) = stack.pop() {
        if !kept.insert(address) {
            continue;
        }
        if let Some((_, r)) = state.resources.get_key_value(address) {
            for dep in &r.dependencies {
                if let Some((key, _)) = state.resources.get_key_value(dep.as_str()) {
                    stack.push(key.as_str());
                }
            }
        }
    }
    kept
}

/// What each deferred item waited for, over all evaluations of a command: once it is read, it
/// depends on those (a member of a nested deployment, on what its deployment waited for too).
pub type Uses = BTreeMap<String, BTreeSet<String>>;

/// A deployment in Nix while it is applied: what the run needs to evaluate it again.
pub struct Stages {
    pub file: PathBuf,
    pub params: Map<String, Value>,
    /// The deployment's Nix files as they were when the run started: a later evaluation of
    /// files edited since would apply half of the edit.
    pub sources: Sources,
    /// What the last evaluation left for later.
    pub deferred: Vec<Deferred>,
    pub uses: Uses,
    /// Evaluations so far (for events).
    pub stage: usize,
    /// `--target`: later evaluations add only what it selects.
    pub selection: Option<crate::select::Selection>,
}

/// Adds what `deferred` waited for to `uses`, and gives each resource of `deployment` the
/// dependencies `uses` holds for it.
pub fn note_uses(
    deployment: &mut crate::model::Deployment,
    uses: &mut Uses,
    evaluation: &Evaluation,
) {
    for (address, used) in &evaluation.uses {
        uses.entry(address.clone())
            .or_default()
            .extend(used.iter().cloned());
    }
    for d in &evaluation.deferred {
        uses.entry(d.address.clone())
            .or_default()
            .extend(d.waits_for.iter().cloned());
    }
    record_uses(deployment, uses);
}

fn record_uses(deployment: &mut crate::model::Deployment, uses: &Uses) {
    if uses.is_empty() {
        return;
    }
    let resources = &mut deployment.resources;
    for i in 0..resources.len() {
        let (address, _) = resources.get_index(i).expect("an index");
        // Itself, and each nested deployment (or group) it is a member of.
        let mut used: BTreeSet<String> = BTreeSet::new();
        let mut prefix = address.as_str();
        loop {
            if let Some(u) = uses.get(prefix) {
                used.extend(u.iter().filter(|u| u.as_str() != address).cloned());
            }
            match prefix.rfind('.') {
                Some(dot) => prefix = &prefix[..dot],
                None => break,
            }
        }
        if used.is_empty() {
            continue;
        }
        let indices: Vec<u32> = used
            .iter()
            .filter_map(|u| resources.get_index_of(u))
            .filter_map(|j| u32::try_from(j).ok())
            .collect();
        let (_, decl) = resources.get_index_mut(i).expect("an index");
        decl.uses = used.into_iter().collect();
        decl.depends_on.extend(indices);
        decl.depends_on.sort_unstable();
        decl.depends_on.dedup();
    }
}

/// The outputs recorded for `addresses` that exist in `state`, as [`Request::known`] takes them.
pub fn outputs_of<'a>(
    state: &crate::state::State,
    addresses: impl IntoIterator<Item = &'a String>,
) -> BTreeMap<String, capstan_schema::Json> {
    addresses
        .into_iter()
        .filter_map(|a| {
            state
                .resources
                .get(a)
                .map(|r| (a.clone(), r.outputs.clone()))
        })
        .collect()
}
