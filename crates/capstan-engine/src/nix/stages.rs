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
/// The first evaluation is given every recorded output ([`with_recorded_outputs`]); when it
/// shows that nothing used an output of what the plan does not leave as it is, it is the plan.
/// Else the plan is made as it always was ([`from_no_output`]). `stage` counts evaluations
/// (for events).
pub async fn evaluate_and_plan(
    file: &Path,
    params: &Map<String, Value>,
    state: &crate::state::State,
    uses: &mut Uses,
    events: &dyn crate::events::EventSink,
    stage: &mut usize,
) -> Result<Staged, StagedError> {
    let planning = Planning {
        file,
        params,
        state,
        events,
    };
    let before = uses.clone();
    if let Some(staged) = with_recorded_outputs(planning, uses, stage).await? {
        return Ok(staged);
    }
    *uses = before;
    from_no_output(planning, uses, stage).await
}

/// What every evaluation of one plan is of, and where each reports.
#[derive(Clone, Copy)]
struct Planning<'a> {
    file: &'a Path,
    params: &'a Map<String, Value>,
    state: &'a crate::state::State,
    events: &'a dyn crate::events::EventSink,
}

/// One evaluation given every recorded output, and its plan if that stands: if nothing used
/// an output of a resource the plan does not leave as it is (what was computed from recorded
/// outputs is what the run would compute), and every output used is accounted for.
///
/// A recorded resource is not read again in an instance of its own for what it uses: one the
/// plan leaves as it is is taken to use what its recorded dependencies say, less what nothing
/// used (its inputs are the recorded ones, computed from the same outputs); one that changes,
/// every output anything used (a superset: all of them stay as they are, so no cycle). What
/// is new is traced as in every evaluation. `None` when it does not stand, or when the
/// evaluation stopped on an output that no longer holds (a branch naming a resource that is
/// gone): then the plan starts from no output.
async fn with_recorded_outputs(
    planning: Planning<'_>,
    uses: &mut Uses,
    stage: &mut usize,
) -> Result<Option<Staged>, StagedError> {
    let Planning {
        file,
        state,
        events,
        ..
    } = planning;
    use crate::events::Event;
    use crate::plan::Action;
    let known = outputs_of(state, state.resources.keys());
    if known.values().all(|outputs| outputs.text() == "{}") {
        return Ok(None);
    }
    let name = file.display().to_string();
    let settled: BTreeSet<String> = state.resources.keys().cloned().collect();
    let parsed = evaluate_stage(planning, &known, &settled, stage).await;
    let (evaluation, mut deployment) = match parsed {
        Ok(both) => both,
        Err(e) => {
            // Nix could not run: no other evaluation would do better.
            let fatal = matches!(
                e,
                StagedError::Eval(
                    EvalError::NixMissing { .. }
                        | EvalError::Spawn { .. }
                        | EvalError::Answer { .. }
                )
            );
            events.emit(Event::EvaluationFailed {
                file: name,
                stage: *stage,
                error: e.to_string(),
                stops_command: fatal,
                retried: !fatal,
            });
            return if fatal { Err(e) } else { Ok(None) };
        }
    };
    let found = &evaluation.found;
    // What each recorded resource read now is taken to use.
    let mut assumed: Uses = state
        .resources
        .iter()
        .filter(|(address, _)| deployment.resources.contains_key(*address))
        .map(|(address, recorded)| {
            let used = recorded
                .dependencies
                .iter()
                .filter(|d| found.contains(*d))
                .cloned()
                .collect();
            (address.clone(), used)
        })
        .collect();
    let effective = with_assumed(uses, &assumed, &evaluation);
    record_uses(&mut deployment, &effective);
    completed(planning, *stage, &evaluation, &deployment);
    let changes = crate::plan::plan(&deployment, state)?;
    let unchanged: BTreeSet<&str> = changes
        .iter()
        .filter(|c| c.action == Action::Noop)
        .map(|c| c.address.as_str())
        .collect();
    // An output used whose resource is not planned unchanged (it changes, is deferred or is
    // gone): what used it was computed from a value that may not hold.
    if found.iter().any(|a| !unchanged.contains(a.as_str())) {
        return Ok(None);
    }
    // An output used that no item is known to use: something now uses what it did not.
    let accounted: BTreeSet<&String> = effective.values().flatten().collect();
    if found.iter().any(|a| !accounted.contains(a)) {
        return Ok(None);
    }
    let deferred = evaluation.deferred;
    if let Some(path) = output_cycle(&deferred) {
        return Err(EvalError::OutputCycle {
            file: file.to_path_buf(),
            path,
        }
        .into());
    }
    // A recorded resource that changes may use other outputs than it did: all those used.
    for change in &changes {
        if change.action != Action::Noop && assumed.contains_key(&change.address) {
            let all = found.iter().filter(|a| **a != change.address).cloned();
            assumed.insert(change.address.clone(), all.collect());
        }
    }
    for (address, used) in assumed {
        if !used.is_empty() {
            let entry = uses.entry(address).or_default();
            entry.extend(used);
        }
    }
    record_uses(&mut deployment, uses);
    let mut changes = crate::plan::plan(&deployment, state)?;
    let kept = kept_for_deferred(state, &deferred);
    changes.retain(|c| c.action != Action::Delete || !kept.contains(c.address.as_str()));
    Ok(Some(Staged {
        deployment,
        changes,
        deferred,
    }))
}

/// Starts the next evaluation (`stage` counts them) with `known` outputs, announced in the
/// stream, and reads the deployment it gives. The caller reports how it ended ([`completed`],
/// or an `evaluation_failed`).
async fn evaluate_stage(
    planning: Planning<'_>,
    known: &BTreeMap<String, capstan_schema::Json>,
    settled: &BTreeSet<String>,
    stage: &mut usize,
) -> Result<(Evaluation, crate::model::Deployment), StagedError> {
    let Planning {
        file,
        params,
        events,
        ..
    } = planning;
    *stage += 1;
    events.emit(crate::events::Event::EvaluationStart {
        file: file.display().to_string(),
        stage: *stage,
    });
    let evaluation = evaluate(&Request {
        file,
        params,
        known,
        providers_only: false,
        settled,
    })
    .await?;
    let deployment = crate::model::Deployment::parse(file, &evaluation.document, params)?;
    Ok((evaluation, deployment))
}

/// Says in the stream that evaluation `stage` gave `deployment`, with Nix's own lines.
fn completed(
    planning: Planning<'_>,
    stage: usize,
    evaluation: &Evaluation,
    deployment: &crate::model::Deployment,
) {
    let Planning { file, events, .. } = planning;
    use crate::events::Event;
    let name = file.display().to_string();
    events.emit(Event::EvaluationComplete {
        file: name.clone(),
        stage,
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
}

/// Adds to `uses` what `evaluation` traced and what each item it deferred waited for.
fn fold_uses(uses: &mut Uses, evaluation: &Evaluation) {
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
}

/// What each item uses: what was traced (this evaluation's folded into `uses`, with what each
/// deferred item waited for), and what it is assumed to use.
fn with_assumed(uses: &mut Uses, assumed: &Uses, evaluation: &Evaluation) -> Uses {
    fold_uses(uses, evaluation);
    let mut effective = assumed.clone();
    for (address, used) in uses.iter() {
        effective
            .entry(address.clone())
            .or_default()
            .extend(used.iter().cloned());
    }
    effective
}

/// Evaluates and plans from no output: again with the outputs of each resource the plan
/// leaves unchanged that a deferred item waits for, until none is left.
async fn from_no_output(
    planning: Planning<'_>,
    uses: &mut Uses,
    stage: &mut usize,
) -> Result<Staged, StagedError> {
    let Planning {
        file,
        state,
        events,
        ..
    } = planning;
    use crate::events::Event;
    use crate::plan::Action;
    let name = file.display().to_string();
    let mut known = BTreeMap::new();
    let mut settled = BTreeSet::new();
    loop {
        let parsed = evaluate_stage(planning, &known, &settled, stage).await;
        let (evaluation, mut deployment) = match parsed {
            Ok(both) => both,
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
        note_uses(&mut deployment, uses, &evaluation);
        settled = deployment.resources.keys().cloned().collect();
        completed(planning, *stage, &evaluation, &deployment);
        let mut changes = crate::plan::plan(&deployment, state)?;
        let deferred = evaluation.deferred;
        let kept = kept_for_deferred(state, &deferred);
        changes.retain(|c| c.action != Action::Delete || !kept.contains(c.address.as_str()));
        let waited: BTreeSet<&str> = deferred
            .iter()
            .flat_map(|d| d.waits_for.iter().map(String::as_str))
            .collect();
        let newly: Vec<&String> = changes
            .iter()
            .filter(|c| c.action == Action::Noop)
            .map(|c| &c.address)
            .filter(|a| waited.contains(a.as_str()) && !known.contains_key(*a))
            .collect();
        if newly.is_empty() {
            if let Some(path) = output_cycle(&deferred) {
                return Err(EvalError::OutputCycle {
                    file: file.to_path_buf(),
                    path,
                }
                .into());
            }
            return Ok(Staged {
                deployment,
                changes,
                deferred,
            });
        }
        known.extend(outputs_of(state, newly));
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
    fold_uses(uses, evaluation);
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
