//! Staged evaluation: a deployment in Nix evaluated again while the run goes on, what it now
//! yields joining the running scheduler.

use super::*;

impl<'a> Driver<'a> {
    pub(super) fn start_stages(&mut self, stages: crate::nix::Stages) {
        self.staging.node_of = self
            .changes
            .iter()
            .enumerate()
            .map(|(i, c)| (c.address.clone(), i))
            .collect();
        self.summary.evaluations = stages.stage;
        self.staging.stages = Some(stages);
    }

    /// Starts an evaluation when something deferred waits for a resource that was made (or
    /// left as it is) since the last one, and none is running.
    pub(super) fn maybe_evaluate(&mut self, work: &mut Work) {
        let Some(stages) = &self.staging.stages else {
            return;
        };
        if self.staging.evaluating
            || self.staging.evaluation_failed
            || self.scheduler.stopped().is_some()
        {
            return;
        }
        // Made in this run, or left as it is (its recorded outputs stand, as the plan's
        // evaluations were told), and not failed since.
        let made = |address: &str| {
            self.staging
                .node_of
                .get(address)
                .is_some_and(|&i| match self.scheduler.state(i) {
                    Some(NodeState::Ended(End::Succeeded)) => true,
                    Some(NodeState::Ended(_)) => false,
                    _ => self.changes[i].action == Action::Noop,
                })
        };
        let ready = stages.deferred.iter().any(|d| {
            d.waits_for
                .iter()
                .any(|w| !self.staging.given.contains(w) && made(w))
        });
        if !ready {
            return;
        }
        // Every resource of the run that ended well gives its outputs.
        let known = crate::nix::outputs_of(
            self.state,
            self.staging
                .node_of
                .iter()
                .filter(|(a, _)| self.declares(a) && made(a))
                .map(|(a, _)| a),
        );
        self.staging.given = known.keys().cloned().collect();
        let Some(stages) = &mut self.staging.stages else {
            return;
        };
        stages.stage += 1;
        self.summary.evaluations = stages.stage;
        // Evaluated as it was when the run started, or not at all: half an edit is never
        // applied.
        if let Some(changed) = crate::nix::Sources::of(&stages.file).changed_since(&stages.sources)
        {
            let file = stages.file.display().to_string();
            self.events.emit(Event::EvaluationFailed {
                file,
                stage: stages.stage,
                error: format!(
                    "{} changed since the run started, so what still waited for a later evaluation is not read from it (the edit would be half applied); apply again to apply the edit",
                    changed.display()
                ),
                stops_command: false,
                retried: false,
            });
            self.summary.failed += 1;
            self.staging.evaluation_failed = true;
            self.staging.deployment_changed = true;
            return;
        }
        self.events.emit(Event::EvaluationStart {
            file: stages.file.display().to_string(),
            stage: stages.stage,
        });
        let (file, params) = (stages.file.clone(), stages.params.clone());
        let settled: BTreeSet<String> = self.staging.node_of.keys().cloned().collect();
        self.staging.evaluating = true;
        work.push(
            async move {
                let evaluation = crate::nix::evaluate(&crate::nix::Request {
                    file: &file,
                    params: &params,
                    known: &known,
                    providers_only: false,
                    settled: &settled,
                })
                .await;
                Some(Done::Evaluated(evaluation))
            }
            .boxed_local(),
        );
    }

    /// Takes in what an evaluation during the run yields: new resources join the scheduler
    /// after what they depend on; recorded members nothing declares any more are deleted.
    pub(super) fn evaluated(
        &mut self,
        result: Result<crate::nix::Evaluation, crate::nix::EvalError>,
    ) {
        self.staging.evaluating = false;
        let Some(stages) = self.staging.stages.as_mut() else {
            return;
        };
        let file = stages.file.display().to_string();
        let stage = stages.stage;
        let fail = |driver: &mut Self, error: String| {
            driver.events.emit(Event::EvaluationFailed {
                file: file.clone(),
                stage,
                error,
                stops_command: false,
                retried: false,
            });
            driver.summary.failed += 1;
            driver.staging.evaluation_failed = true;
        };
        let evaluation = match result {
            Ok(evaluation) => evaluation,
            Err(e) => return fail(self, e.to_string()),
        };
        let mut parsed = match Deployment::parse(&stages.file, &evaluation.document, &stages.params)
        {
            Ok(parsed) => parsed,
            Err(e) => return fail(self, e.to_string()),
        };
        crate::nix::note_uses(&mut parsed, &mut stages.uses, &evaluation);
        self.events.emit(Event::EvaluationComplete {
            file: file.clone(),
            stage,
            resources: parsed.resources.len(),
            deferred: evaluation.deferred.len(),
            elapsed_seconds: evaluation.elapsed.as_secs_f64(),
        });
        for message in evaluation.messages.iter().filter(|m| !m.trim().is_empty()) {
            self.events.emit(Event::EvaluationLog {
                file: file.clone(),
                line: message.clone(),
            });
        }
        if let Err(e) = parsed.check_against(&self.providers.infos()) {
            return fail(self, e.to_string());
        }
        if self.scheduler.stopped().is_some() {
            return;
        }
        let planned = match crate::plan::plan(&parsed, self.state) {
            Ok(planned) => planned,
            Err(e) => return fail(self, e.to_string()),
        };
        // What is in the run already is not deferred, whatever this evaluation (given only
        // the outputs made so far) says.
        let deferred: Vec<crate::nix::Deferred> = evaluation
            .deferred
            .into_iter()
            .filter(|d| !self.staging.node_of.contains_key(&d.address))
            .collect();
        let kept = crate::nix::kept_for_deferred(self.state, &deferred);
        let new: Vec<PlannedChange> = planned
            .into_iter()
            .filter(|c| !self.staging.node_of.contains_key(&c.address))
            .filter(|c| {
                c.action != Action::Delete
                    || (!kept.contains(c.address.as_str())
                        && !self.kin.deleting.contains(&c.address))
            })
            .collect();
        drop(kept);
        let selection = self
            .staging
            .stages
            .as_ref()
            .and_then(|s| s.selection.as_ref());
        let new = match selection {
            None => new,
            Some(selection) => {
                let mode = crate::session::Mode::Apply;
                let (kept, left) = selection.apply(&parsed, self.state, mode, new);
                if !left.is_empty() {
                    self.events.emit(Event::NotSelected { addresses: left });
                }
                kept
            }
        };
        let mut shown = self.join(new, &parsed);
        crate::plan::annotate(&mut shown, &self.providers.infos());
        self.events.emit(Event::Plan {
            changes: Rc::new(shown),
        });
        for d in &deferred {
            self.events.emit(Event::Deferred {
                address: d.address.clone(),
                what: d.kind,
                waits_for: d.waits_for.clone(),
                may_delete: d.may_delete(self.state),
            });
        }
        if let Some(stages) = self.staging.stages.as_mut() {
            stages.deferred = deferred;
        }
    }

    /// Adds what a later evaluation yields to the running scheduler: new resources as nodes
    /// after what they depend on, stale members as deletes (each after what was recorded as
    /// depending on it, as `graph` orders them at the start). Returns what joined, to show.
    fn join(&mut self, new: Vec<PlannedChange>, parsed: &Deployment) -> Vec<PlannedChange> {
        let mut shown = Vec::with_capacity(new.len());
        let mut deletes: Vec<NodeId> = Vec::new();
        for mut change in new {
            let address = change.address.clone();
            let i = if change.action == Action::Delete {
                let Ok(i) = self.scheduler.add(&[]) else {
                    continue;
                };
                deletes.push(i);
                i
            } else {
                let Some((_, decl)) = parsed.resources.get_key_value(&address) else {
                    continue;
                };
                // Its dependencies, as nodes of this run (all planned before it).
                let firsts: Vec<NodeId> = decl
                    .dependencies()
                    .iter()
                    .filter_map(|a| self.staging.node_of.get(a).copied())
                    .collect();
                let mut decl = decl.clone();
                // Indices into the evaluation's deployment mean nothing here; the driver
                // reads dependencies by address.
                decl.depends_on = Vec::new();
                let index = self.deployment.resources.len() + self.staging.added.len();
                self.staging.added_index.insert(address.clone(), index);
                self.staging.added.push(Rc::new(decl));
                let Ok(i) = self.scheduler.add(&firsts) else {
                    continue;
                };
                self.nodes.push(Node {
                    decl: u32::try_from(index).unwrap_or(NO_DECL),
                    capability_source: false,
                });
                change.declared = None;
                self.changes.push(change.clone());
                self.staging.node_of.insert(address, i);
                shown.push(change);
                debug_assert_eq!(i + 1, self.changes.len());
                continue;
            };
            self.nodes.push(Node {
                decl: NO_DECL,
                capability_source: false,
            });
            self.kin.deleting.insert(address.clone());
            self.changes.push(change.clone());
            self.staging.node_of.insert(address, i);
            shown.push(change);
        }
        // A delete waits for what was recorded as depending on it: its delete, or its create
        // or update (which moves it off), as `graph` orders them at the start.
        for &j in &deletes {
            let address = self.changes[j].address.clone();
            let dependents: Vec<NodeId> = self
                .state
                .resources
                .iter()
                .filter(|(_, r)| r.dependencies.contains(&address))
                .filter_map(|(a, _)| self.staging.node_of.get(a).copied())
                .filter(|&k| k != j)
                .collect();
            for k in dependents {
                obey(self.scheduler.depend(j, k));
            }
        }
        shown
    }

    /// What is still deferred at the end never had what it waited for: reported as skipped,
    /// each named with why (an interrupt too: it is not done).
    pub(super) fn report_deferred(&mut self, interrupted: bool) {
        let Some(stages) = self.staging.stages.take() else {
            return;
        };
        for d in &stages.deferred {
            let ended_badly = |a: &String| {
                self.staging.node_of.get(a).is_some_and(|&i| {
                    matches!(
                        self.scheduler.state(i),
                        Some(NodeState::Ended(End::Failed | End::Skipped(_)))
                    )
                })
            };
            let dependency = d
                .waits_for
                .iter()
                .find(|a| ended_badly(a))
                .or(d.waits_for.first())
                .cloned()
                .unwrap_or_default();
            let reason = if interrupted {
                "deferred, and the run was interrupted before its evaluation".to_string()
            } else if self.staging.deployment_changed {
                "deferred, and the deployment changed during the run".to_string()
            } else if self.staging.evaluation_failed {
                "deferred, and the deployment's evaluation failed".to_string()
            } else if ended_badly(&dependency) {
                format!("deferred: its evaluation uses outputs of `{dependency}`, which did not succeed")
            } else if self.scheduler.stopped().is_some() {
                "deferred, and the run stopped before what it waits for was made".to_string()
            } else {
                format!(
                    "deferred: its evaluation uses outputs of `{dependency}`, which were not made"
                )
            };
            self.events.emit(Event::ResourceSkipped {
                address: d.address.clone(),
                operation: "create",
                reason,
                dependency,
            });
            self.summary.skipped += 1;
        }
    }
}
