//! Finishing operations: the provider's answer journaled and reported, failures and skips
//! told, an interrupt settled.

use super::*;

impl<'a> Driver<'a> {
    pub(super) fn done(&mut self, done: Done, work: &mut Work) {
        match done {
            Done::Recorded(i) => obey(self.scheduler.recorded(i)),
            Done::Answered(i, result, elapsed) => {
                obey(self.scheduler.answered(i, result.is_ok()));
                // Permits are lent to an operation while it runs.
                if let Some(permits) = self.kin.permits_of.remove(&i) {
                    for k in permits {
                        self.release_permit(k);
                    }
                }
                let Some(mut op) = self.ops.remove(&i) else {
                    return;
                };
                if result.is_ok() {
                    if let Some(then) = op.then.take() {
                        self.ops.insert(i, *then);
                    }
                }
                let address = self.changes[i].address.clone();
                self.spawn(
                    work,
                    i,
                    finish(
                        i,
                        address,
                        op,
                        result,
                        elapsed,
                        Outlets {
                            backend: self.backend.clone(),
                            events: self.events.clone(),
                            secrets: self.options.secrets.clone(),
                        },
                    ),
                );
            }
            Done::Finished(i, outcome) => {
                self.finished(i, outcome, work);
            }
            Done::Settled(i, stop) => {
                self.ops.remove(&i);
                obey(self.scheduler.end(i, End::Skipped(Skip::NotSent(stop))));
                self.report_skip(i, Skip::NotSent(stop));
            }
            Done::Evaluated(result) => self.evaluated(result),
        }
    }

    pub(super) fn finished(&mut self, i: NodeId, outcome: Outcome, work: &mut Work) {
        let address = self.changes[i].address.clone();
        match outcome {
            Outcome::Done {
                state: now,
                handles,
                counted,
            } => {
                match counted {
                    // The second half of a replace: its delete was counted as one till now.
                    Action::Create if self.changes[i].action == Action::Replace => {
                        self.summary.deleted = self.summary.deleted.saturating_sub(1);
                        self.summary.replaced += 1;
                    }
                    Action::Create => self.summary.created += 1,
                    // An update the provider could only make by making the resource anew.
                    Action::Replace => self.summary.replaced += 1,
                    Action::Update => self.summary.updated += 1,
                    _ => self.summary.unchanged += 1,
                }
                if counted != Action::Noop {
                    self.state.apply_owned(Record::Done {
                        address: address.clone(),
                        state: now,
                    });
                } else if let Some(recorded) = self.state.resources.get_mut(&address) {
                    // A read (what the provider says now) or re-recorded wiring.
                    recorded.outputs = now.outputs;
                    recorded.dependencies = now.dependencies;
                }
                if self.kin.kids.contains_key(&i) {
                    let outputs = self
                        .state
                        .resources
                        .get(&address)
                        .map(|r| r.outputs.clone());
                    self.settle_kid(i, Ok(outputs.unwrap_or_else(Json::empty_object)));
                }
                let made = matches!(counted, Action::Create | Action::Update | Action::Replace);
                if made && self.kin.recorded_children.contains_key(&address) {
                    self.delete_stale_children(&address, work);
                }
                if !handles.is_empty() {
                    self.handles.insert(address, handles);
                }
                obey(self.scheduler.end(i, End::Succeeded));
            }
            Outcome::Deleted => {
                self.summary.deleted += 1;
                self.state.apply_owned(Record::Deleted { address });
                match self.ops.get(&i) {
                    // A replace: the old resource is gone; now its create.
                    Some(then) => {
                        let provider = then.provider.clone();
                        obey(self.scheduler.queue(i, Some(&provider), true));
                    }
                    None => obey(self.scheduler.end(i, End::Succeeded)),
                }
            }
            Outcome::Failed { recorded, error } => {
                self.ops.remove(&i);
                self.settle_kid(i, Err(*error));
                self.summary.failed += 1;
                self.state.pending.remove(&address);
                if let Some(now) = recorded {
                    self.state.apply_owned(Record::Done {
                        address,
                        state: *now,
                    });
                }
                obey(self.scheduler.end(i, End::Failed));
            }
            Outcome::State(e) => {
                // Without durable records nothing else may run.
                self.ops.remove(&i);
                self.settle_kid(
                    i,
                    Err(OperationError::internal(format!(
                        "the state could not be written: {e}"
                    ))),
                );
                self.summary.failed += 1;
                self.state_error.get_or_insert(e);
                self.scheduler.stop(Stop::StateError);
                obey(self.scheduler.end(i, End::Failed));
            }
        }
    }

    /// Reports a node the scheduler (or the driver) ended without running it.
    pub(super) fn report_skip(&mut self, i: NodeId, skip: Skip) {
        self.ops.remove(&i);
        if self.is_permit(i) {
            self.settle_kid(i, Err(run_over()));
            return;
        }
        self.settle_kid(
            i,
            Err(OperationError::cancelled(format!(
                "{}: not run ({skip:?})",
                self.changes[i].address
            ))),
        );
        let change = &self.changes[i];
        self.summary.skipped += 1;
        let stop_reason = |stop: Stop| match stop {
            Stop::FailFast => "--fail-fast stopped the run".to_string(),
            Stop::StateError => "the state could not be written, so the run stopped".to_string(),
            Stop::Interrupted => "the run was interrupted".to_string(),
        };
        let (reason, dependency) = match skip {
            Skip::Dependency(root) => {
                let failed = self.changes[root].address.clone();
                // A delete waits for the deletes of what depends on it: the one that failed
                // is a dependent, not a dependency.
                let reason = if change.action == Action::Delete {
                    format!("`{failed}`, which depends on it, was not deleted")
                } else {
                    format!("dependency `{failed}` failed")
                };
                (reason, failed)
            }
            Skip::NotSent(Stop::Interrupted) => (
                "the run was interrupted before it was sent to its provider".into(),
                String::new(),
            ),
            Skip::NotSent(stop) => {
                self.state.pending.remove(&change.address);
                (stop_reason(stop), String::new())
            }
            Skip::Stopped(stop) => (stop_reason(stop), String::new()),
            Skip::Parent(parent) => {
                let parent = self.changes[parent].address.clone();
                (format!("its parent `{parent}` ended without it"), parent)
            }
            Skip::Cycle => (
                "its recorded dependencies form a cycle; delete it with `capstan state forget` after removing it by hand".into(),
                String::new(),
            ),
        };
        self.events.emit(Event::ResourceSkipped {
            address: change.address.clone(),
            operation: change.action.as_str(),
            reason,
            dependency,
        });
    }

    /// After an interrupt (the work already dropped): says what was cut short, and settles
    /// intents that never reached a provider.
    pub(super) async fn interrupted(&mut self) {
        self.events.emit(Event::Interrupted {
            message: "interrupted: cancelling operations in flight; state is saved (press Ctrl-C again to stop at once)".into(),
        });
        let mut never_sent = Vec::new();
        for (i, phase) in self.scheduler.interrupt() {
            if self.is_permit(i) {
                self.settle_kid(i, Err(run_over()));
                continue;
            }
            let change = &self.changes[i];
            match phase {
                Phase::Called | Phase::Finishing => {
                    self.ops.remove(&i);
                    self.settle_kid(i, Err(OperationError::cancelled("interrupted")));
                    let change = &self.changes[i];
                    self.summary.interrupted += 1;
                    self.events.emit(Event::ResourceFailed {
                        address: change.address.clone(),
                        operation: change.action.as_str(),
                        error: format!("{}: interrupted", change.address),
                        kind: FailureKind::Cancelled,
                        details: String::new(),
                        elapsed_seconds: 0.0,
                    });
                }
                _ => {
                    let has_intent = self.ops.get(&i).is_some_and(|op| op.has_intent());
                    if has_intent
                        && matches!(phase, Phase::Recording | Phase::Recorded)
                        && change.interrupted.is_none()
                    {
                        // As `Step::Settle`: its intent is (or is about to be) durable.
                        let operation = self
                            .ops
                            .get(&i)
                            .map_or(change.action.first_operation(), |op| op.operation);
                        never_sent.push(Record::Failed {
                            address: change.address.clone(),
                            operation,
                            error: "interrupted before it was sent to its provider".into(),
                        });
                    }
                    self.report_skip(i, Skip::NotSent(Stop::Interrupted));
                }
            }
        }
        // Skips the scheduler found before the interrupt.
        while let Some(step) = self.scheduler.next_step() {
            if let Step::Skipped(i, skip) = step {
                self.report_skip(i, skip);
            }
        }
        // The state takes the records as the journal does (if that fails the intents stay
        // pending, which only asks for a check).
        if !never_sent.is_empty()
            && append_durably(&*self.backend, never_sent.clone())
                .await
                .is_ok()
        {
            for record in never_sent {
                self.state.apply_owned(record);
            }
        }
    }
}

/// Journals what the provider answered and reports it.
pub(super) async fn finish(
    i: NodeId,
    address: String,
    op: Op,
    result: Result<OperationSuccess, CallError>,
    elapsed: f64,
    outlets: Outlets,
) -> Done {
    let success = match result {
        Ok(success) => success,
        Err(error) => return finish_failed(i, address, op, error, elapsed, outlets).await,
    };
    let Outlets {
        backend,
        events,
        secrets,
    } = outlets;
    let verb = op.operation.as_str();
    if op.operation == OperationKind::Delete {
        let deleted = Record::Deleted {
            address: address.clone(),
        };
        if let Err(e) = append_durably(&*backend, vec![deleted]).await {
            return Done::Finished(i, Outcome::State(e));
        }
        events.emit(Event::ResourceComplete {
            address,
            operation: verb,
            elapsed_seconds: elapsed,
            outputs: Json::null(),
        });
        return Done::Finished(i, Outcome::Deleted);
    }
    let journaled = op.journaled();
    let mut now = ResourceState {
        provider: op.provider,
        resource_type: op.resource_type,
        inputs: op.inputs,
        outputs: success.outputs,
        dependencies: op.dependencies,
        parent: op.parent,
        sensitive: Vec::new(),
        tainted: false,
    };
    note_sensitive(&address, &mut now, &op.connection, &secrets);
    if journaled {
        let done = Record::Done {
            address: address.clone(),
            state: now.clone(),
        };
        if let Err(e) = append_durably(&*backend, vec![done]).await {
            return Done::Finished(i, Outcome::State(e));
        }
    }
    if let Some(missing) = missing_outputs(&op.connection, &now) {
        // The provider acted (the resource is recorded), but what depends on these outputs
        // cannot run: say so now, not when a dependent fails to resolve.
        let message = format!(
            "{address}: provider `{}` returned no {missing}, which `{}` declares; the resource is recorded as it was returned, and what depends on it is skipped",
            now.provider, now.resource_type
        );
        let error = Box::new(OperationError::internal(message.clone()));
        events.emit(Event::ResourceFailed {
            address: address.clone(),
            operation: verb,
            error: message,
            kind: FailureKind::Provider,
            // Names only: values may be secrets, or megabytes.
            details: format!("outputs returned: {}", now.outputs.keys().join(", ")),
            elapsed_seconds: elapsed,
        });
        let recorded = (op.operation != OperationKind::Read).then(|| Box::new(now));
        return Done::Finished(i, Outcome::Failed { recorded, error });
    }
    events.emit(Event::ResourceComplete {
        address,
        operation: verb,
        elapsed_seconds: elapsed,
        outputs: now.outputs.clone(),
    });
    let counted = match op.operation {
        OperationKind::Create => Action::Create,
        OperationKind::Update if success.replaced => Action::Replace,
        OperationKind::Update => Action::Update,
        _ => Action::Noop,
    };
    Done::Finished(
        i,
        Outcome::Done {
            state: now,
            handles: success.capabilities,
            counted,
        },
    )
}

/// Journals and reports a failed call: settled where the provider said it failed (with what
/// a create made anyway, recorded tainted), left pending where nobody knows what it did.
async fn finish_failed(
    i: NodeId,
    address: String,
    op: Op,
    error: CallError,
    elapsed: f64,
    outlets: Outlets,
) -> Done {
    let Outlets {
        backend,
        events,
        secrets,
    } = outlets;
    let verb = op.operation.as_str();
    let failure = failure(&address, error, op.was_pending);
    // A create its provider reports failed may have made part of the resource: where
    // its reads can tell, what it made is recorded (tainted: the next plan replaces it),
    // so no side effect is left unknown to the state.
    let made = if op.operation == OperationKind::Create && failure.settled {
        made_anyway(&address, &op).await
    } else {
        None
    };
    let recorded = made.map(|outputs| {
        let mut state = ResourceState {
            provider: op.provider.clone(),
            resource_type: op.resource_type.clone(),
            inputs: op.inputs.clone(),
            outputs,
            dependencies: op.dependencies.clone(),
            parent: op.parent.clone(),
            sensitive: Vec::new(),
            tainted: true,
        };
        note_sensitive(&address, &mut state, &op.connection, &secrets);
        Box::new(state)
    });
    if op.journaled() && failure.settled {
        let settle = match &recorded {
            Some(state) => Record::Done {
                address: address.clone(),
                state: (**state).clone(),
            },
            // The error as every other channel shows it: a provider may have echoed a secret.
            None => Record::Failed {
                address: address.clone(),
                operation: op.operation,
                error: secrets.scrub(&failure.error).into_owned(),
            },
        };
        if let Err(e) = append_durably(&*backend, vec![settle]).await {
            return Done::Finished(i, Outcome::State(e));
        }
    }
    let error = Box::new(
        OperationError::new(error_kind(failure.kind), failure.error.clone())
            .with_details(failure.details.clone()),
    );
    events.emit(Event::ResourceFailed {
        address,
        operation: verb,
        error: failure.error,
        kind: failure.kind,
        details: failure.details,
        elapsed_seconds: elapsed,
    });
    Done::Finished(i, Outcome::Failed { recorded, error })
}

/// After a create its provider reports failed: what the provider finds was made anyway, for
/// types whose reads look at the real resource.
pub(super) async fn made_anyway(address: &str, op: &Op) -> Option<Json> {
    let checks = op
        .connection
        .info()
        .resource_type(&op.resource_type)
        .is_some_and(|t| t.read_checks);
    if !checks {
        return None;
    }
    let call = OperationCall {
        previous_inputs: Some(op.inputs.clone()),
        previous_outputs: None,
        trace: crate::trace::call(),
        ..OperationCall::new(
            OperationKind::Read,
            &op.resource_type,
            address,
            op.inputs.clone(),
        )
    };
    let read = op.connection.call(call, capstan_host::ignore_progress());
    match tokio::time::timeout(Duration::from_secs(60), read).await {
        Ok(Ok(found)) => Some(found.outputs),
        _ => None,
    }
}

/// Where a finished operation's result goes: the journal, the events, and the secrets it
/// reveals.
pub(super) struct Outlets {
    pub(super) backend: Rc<dyn StateBackend>,
    pub(super) events: Rc<dyn EventSink>,
    pub(super) secrets: Rc<crate::secrets::Secrets>,
}

/// A failure the core found itself, settled (nothing unknown happened in a provider).
pub(super) struct CoreFailure {
    pub(super) error: String,
    pub(super) kind: FailureKind,
}

impl CoreFailure {
    pub(super) fn new(error: String, kind: FailureKind) -> Self {
        CoreFailure { error, kind }
    }
}

/// How a failed call is reported.
pub(super) struct CallFailure {
    pub(super) error: String,
    pub(super) kind: FailureKind,
    pub(super) details: String,
    /// The provider reported the failure (journaled as such); otherwise the intent stays
    /// pending.
    pub(super) settled: bool,
}

/// A failed call as a failure. Only a failure the provider reported itself is settled (the
/// resource is as it was); after a timeout, a crash or a lost connection nobody knows what the
/// provider did, so the intent stays pending and the next run says so.
pub(super) fn failure(address: &str, error: CallError, was_pending: bool) -> CallFailure {
    // Reported by the provider, or refused before it was sent: nothing unknown happened in
    // this run. (A refused request leaves an earlier run's interruption as it was.)
    let settled = match error {
        CallError::Failed { .. } => true,
        CallError::RequestTooLarge { .. } | CallError::NotSent { .. } => !was_pending,
        _ => false,
    };
    let (kind, details) = match &error {
        CallError::Failed { error, .. } => (error.kind.into(), error.details.clone()),
        CallError::RequestTooLarge { .. } => (FailureKind::InvalidInput, String::new()),
        CallError::Timeout { .. } => (FailureKind::Timeout, String::new()),
        _ => (FailureKind::Provider, String::new()),
    };
    let mut message = error.to_string();
    if !settled {
        message.push_str(&format!(
            " (whether it took effect is unknown: it stays pending; check the resource, then `capstan state resolve {address}` or apply again)"
        ));
    }
    CallFailure {
        error: message,
        kind,
        details,
        settled,
    }
}
