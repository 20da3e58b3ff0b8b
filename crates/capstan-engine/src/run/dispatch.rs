//! Preparing and dispatching a node's steps: the operation a change needs, its intent in the
//! journal, the call to its provider.

use super::*;

impl<'a> Driver<'a> {
    pub(super) fn step(&mut self, step: Step, work: &mut Work) {
        match step {
            Step::Prepare(i) => self.prepare(i, work),
            Step::Record(i) => self.record_intent(i, work),
            Step::Call(i) if self.is_permit(i) => self.grant_permit(i),
            Step::Call(i) => self.send_call(i, work),
            Step::Settle(i, stop) => self.settle_unsent(i, stop, work),
            Step::Skipped(i, skip) => self.report_skip(i, skip),
            Step::Cancel(i) => {
                self.cancel(i, work);
            }
        }
    }

    /// Journals the intent of node `i`'s operation.
    fn record_intent(&mut self, i: NodeId, work: &mut Work) {
        let Some(op) = self.ops.get(&i) else { return };
        // Where its inputs hold secrets, so the state can encrypt them (a look only when any
        // secret is known).
        let mut sensitive = Vec::new();
        if !self.options.secrets.is_empty() {
            self.options
                .secrets
                .pointers(&op.inputs.value(), "/inputs", &mut sensitive);
        }
        let intent = Record::Intent {
            address: self.changes[i].address.clone(),
            operation: op.operation,
            provider: op.provider.clone(),
            resource_type: op.resource_type.clone(),
            inputs: op.inputs.clone(),
            time: now_unix(),
            run: None,
            sensitive,
        };
        let backend = self.backend.clone();
        self.spawn(work, i, async move {
            match append_durably(&*backend, vec![intent]).await {
                Ok(()) => Done::Recorded(i),
                Err(e) => Done::Finished(i, Outcome::State(e)),
            }
        });
    }

    /// Lends node `i`'s slot to the provider that asked for a permit: it holds it until it
    /// gives the permit back.
    fn grant_permit(&mut self, i: NodeId) {
        let held: PermitGuard = Box::new(HeldPermit {
            node: i,
            asks: self.kin.asks.clone(),
        });
        if let Some(Kid::Permit { reply }) = self.kin.kids.get_mut(&i) {
            if let Some(reply) = reply.take() {
                if let Err(unsent) = reply.send(Ok(held)) {
                    // Nobody waits for it any more (the ask was cancelled).
                    drop(unsent);
                    self.release_permit(i);
                }
            }
        }
    }

    /// Sends node `i`'s operation to its provider (handing the provider its settings first,
    /// if they wait for this run).
    fn send_call(&mut self, i: NodeId, work: &mut Work) {
        let Some(op) = self.ops.get_mut(&i) else {
            return;
        };
        let Some(mut call) = op.call.take() else {
            return;
        };
        let info = op.connection.info().resource_type(&op.resource_type);
        if info.is_some_and(|t| t.uses_scheduler) {
            call.scheduler = Some(Rc::new(OperationAsks {
                parent: i,
                asks: self.kin.asks.clone(),
            }));
        }
        let address = self.changes[i].address.clone();
        // Started means recorded: the intent is durable before anyone is told.
        self.events.emit(Event::ResourceStart {
            address: address.clone(),
            operation: op.operation.as_str(),
            provider: op.provider.clone(),
            resource_type: call.resource_type.clone(),
        });
        // A provider whose settings refer to what this run makes gets them now, once,
        // before its first operation (which waited for what they refer to).
        let settings = self.late_config.get(&op.provider).map(|once| {
            let config = self
                .deployment
                .providers
                .get(&op.provider)
                .and_then(|d| recorded_settings(d, self.state))
                .unwrap_or_default();
            (once.clone(), config.to_string())
        });
        let failed_address = address.clone();
        let marked = op.has_intent().then(|| address.clone());
        let observer = progress_observer(self.events.clone(), address, op.operation.as_str());
        let connection = op.connection.clone();
        let call = async move {
            let started = Instant::now();
            if let Some((once, settings)) = settings {
                let configured = once
                    .get_or_init(|| async { connection.configure(&settings).await.map(|_| ()) })
                    .await;
                if let Err(why) = configured {
                    let error = OperationError::permanent(format!(
                        "its provider's settings were not taken: {why}"
                    ));
                    let failed = CallError::Failed {
                        address: failed_address,
                        error,
                    };
                    return Done::Answered(i, Err(failed), 0.0);
                }
            }
            let result = connection.call(call, observer).await;
            Done::Answered(i, result, started.elapsed().as_secs_f64())
        };
        match marked {
            // Held until the backend has noted that it is sent ([`Self::send_held`]).
            Some(address) => self.held.push((i, address, Box::pin(call))),
            None => self.spawn(work, i, call),
        }
    }

    /// Sends the calls held since the last turn, once the backend has noted them as sent (one
    /// write for all of them), so the next run can tell the intents journaled ahead that a kill
    /// left unsent. If it cannot note them, they are not sent: the run stops on a state error.
    pub(super) fn send_held(&mut self, work: &mut Work) {
        if self.held.is_empty() {
            return;
        }
        let held = std::mem::take(&mut self.held);
        let addresses: Vec<String> = held.iter().map(|(_, a, _)| a.clone()).collect();
        match self.backend.mark_sent(&addresses) {
            Ok(()) => {
                for (i, _, call) in held {
                    self.spawn(work, i, call);
                }
            }
            Err(e) => {
                // The run reports the first state error; the others only need to stop.
                let mut first = Some(e);
                for (i, _, _) in held {
                    let e = first.take().unwrap_or_else(|| {
                        StateError::WriterGone("an earlier state write failed".into())
                    });
                    self.spawn(work, i, async move { Done::Finished(i, Outcome::State(e)) });
                }
            }
        }
    }

    /// Node `i` was dispatched but never sent (the run stopped).
    fn settle_unsent(&mut self, i: NodeId, stop: Stop, work: &mut Work) {
        let change = &self.changes[i];
        // Its intent is in the journal, but it never reached its provider: settle it,
        // so the next run does not ask anyone to check. (Not if an earlier run left it
        // pending: that one still needs a check.)
        let settle =
            self.ops.get(&i).is_some_and(|op| op.has_intent()) && change.interrupted.is_none();
        let settled = settle.then(|| Record::Failed {
            address: change.address.clone(),
            operation: self
                .ops
                .get(&i)
                .map_or(OperationKind::Read, |op| op.operation),
            error: "not sent to its provider: the run stopped".into(),
        });
        let backend = self.backend.clone();
        self.spawn(work, i, async move {
            if let Some(settled) = settled {
                if let Err(e) = append_durably(&*backend, vec![settled]).await {
                    return Done::Finished(i, Outcome::State(e));
                }
            }
            Done::Settled(i, stop)
        });
    }

    /// What a dispatched node does: nothing (unchanged), fail at once (what it needs is
    /// missing), re-record its wiring, or call its provider.
    pub(super) fn prepare(&mut self, i: NodeId, work: &mut Work) {
        let change = &self.changes[i];
        let address = change.address.clone();
        let was_pending = change.interrupted.is_some();
        let action = change.action;
        if self.is_permit(i) {
            obey(self.scheduler.queue(i, None, false));
            return;
        }
        let prepared = match action {
            _ if self.kin.kids.contains_key(&i) => self.child_op(i),
            Action::Delete => self.delete_op(i, was_pending),
            _ => self.change_op(i, was_pending, work),
        };
        match prepared {
            Ok(Some(op)) => {
                let provider = op.provider.clone();
                let has_intent = op.has_intent();
                self.ops.insert(i, op);
                obey(self.scheduler.queue(i, Some(&provider), has_intent));
            }
            // Ended, or a future of its own.
            Ok(None) => {}
            Err(failure) => {
                self.settle_kid(
                    i,
                    Err(OperationError::new(
                        error_kind(failure.kind),
                        failure.error.clone(),
                    )),
                );
                self.events.emit(Event::ResourceFailed {
                    address,
                    operation: action.as_str(),
                    error: failure.error,
                    kind: failure.kind,
                    details: String::new(),
                    elapsed_seconds: 0.0,
                });
                self.summary.failed += 1;
                obey(self.scheduler.end(i, End::Failed));
            }
        }
    }

    pub(super) fn delete_op(
        &self,
        i: NodeId,
        was_pending: bool,
    ) -> Result<Option<Op>, CoreFailure> {
        let address = &self.changes[i].address;
        let Some(recorded) = self.state.resources.get(address) else {
            return Err(CoreFailure::new(
                format!("{address}: planned for deletion but not in the state (was it forgotten meanwhile?)"),
                FailureKind::InvalidInput,
            ));
        };
        self.op(address, OperationKind::Delete, recorded, None, was_pending)
            .map(Some)
    }

    /// A delete, or (with `desired`: inputs and capabilities) a create, update or read of
    /// the resource at `address`, `recorded` as it is (for deletes and reads) or was.
    pub(super) fn op(
        &self,
        address: &str,
        operation: OperationKind,
        recorded: &ResourceState,
        desired: Option<Desired>,
        was_pending: bool,
    ) -> Result<Op, CoreFailure> {
        let (provider, resource_type) = match &desired {
            Some(d) => (d.provider.clone(), d.resource_type.clone()),
            None => (recorded.provider.clone(), recorded.resource_type.clone()),
        };
        let Some(connection) = self.providers.connections.get(&provider).cloned() else {
            let error = match operation {
                OperationKind::Delete => format!(
                    "{address}: its provider `{provider}` is not declared in the deployment any more; declare it again until its resources are deleted"
                ),
                // A caller that started fewer providers than the run needs (e.g. only those
                // of the changes, when an unchanged resource must be read for its
                // capabilities).
                OperationKind::Read => format!(
                    "{address}: provider `{provider}` was not started for this run, so `{address}` cannot be read for its capabilities"
                ),
                _ => format!(
                    "{address}: provider `{provider}` was not started for this run, so `{address}` cannot be changed"
                ),
            };
            let kind = match operation {
                OperationKind::Delete => FailureKind::InvalidInput,
                _ => FailureKind::Provider,
            };
            return Err(CoreFailure::new(error, kind));
        };
        let timeout = self
            .providers
            .timeouts
            .get(&provider)
            .copied()
            .or(self.options.timeout);
        let previous = operation != OperationKind::Create;
        let (inputs, capabilities, dependencies) = match desired {
            Some(d) => (d.inputs, d.capabilities, d.dependencies),
            None => (
                recorded.inputs.clone(),
                Vec::new(),
                recorded.dependencies.clone(),
            ),
        };
        let call = OperationCall {
            previous_inputs: previous.then(|| recorded.inputs.clone()),
            previous_outputs: previous.then(|| recorded.outputs.clone()),
            capabilities,
            timeout,
            trace: crate::trace::operation(address),
            ..OperationCall::new(operation, &resource_type, address, inputs.clone())
        };
        Ok(Op {
            operation,
            provider,
            connection,
            call: Some(call),
            resource_type,
            inputs,
            dependencies,
            was_pending,
            then: None,
            parent: None,
        })
    }

    /// A create, update, replace or (unchanged) nothing, a re-recorded wiring or a read.
    pub(super) fn change_op(
        &mut self,
        i: NodeId,
        was_pending: bool,
        work: &mut Work,
    ) -> Result<Option<Op>, CoreFailure> {
        let change = &self.changes[i];
        let address = change.address.clone();
        let action = change.action;
        let node = &self.nodes[i];
        let Some(decl) = node.decl().and_then(|d| self.decl_at(d)) else {
            return Err(CoreFailure::new(
                format!("{address}: planned as a change but not declared in the deployment"),
                FailureKind::InvalidInput,
            ));
        };
        let inputs = self.inputs_of(&decl, &address)?;
        let state = &*self.state;
        // The plan creates only what the state does not hold.
        debug_assert!(
            action != Action::Create || !state.resources.contains_key(&address),
            "{address}: planned as a create but recorded in the state"
        );
        let recorded = match action {
            Action::Create => None,
            _ => state.resources.get(&address),
        };
        // A type whose result can change while its inputs stay the same (`readOnPlan`: a
        // Terraform data source, a build) is run again when something it waited on changed,
        // even if its inputs came out the same.
        let reads_the_world = !change.waits_on.is_empty()
            && self
                .providers
                .connections
                .get(&decl.provider)
                .and_then(|c| c.info().resource_type(&decl.resource_type))
                .is_some_and(|t| t.read_on_plan);
        let unchanged = action != Action::Replace
            && !change.read_changed
            && !reads_the_world
            && recorded.is_some_and(|r| r.inputs == inputs);
        let dependencies = decl.dependencies();
        if unchanged
            && !node.capability_source
            && self.leave_alone(i, &address, &decl.provider, &dependencies, work)
        {
            return Ok(None);
        }
        let desired = Desired {
            provider: decl.provider.clone(),
            resource_type: decl.resource_type.clone(),
            capabilities: self.capabilities_for(&decl, &address)?,
            inputs,
            dependencies,
        };
        let state = &*self.state;
        let recorded = match action {
            Action::Create => None,
            _ => state.resources.get(&address),
        };
        let empty;
        let (operation, recorded) = match (action, unchanged, recorded) {
            (Action::Replace, _, Some(old)) => {
                // Delete what the old provider or type made, then create anew.
                let create = self.op(&address, OperationKind::Create, old, Some(desired), false)?;
                let mut delete =
                    self.op(&address, OperationKind::Delete, old, None, was_pending)?;
                delete.then = Some(Box::new(create));
                return Ok(Some(delete));
            }
            (_, true, Some(recorded)) => (OperationKind::Read, recorded),
            (_, false, Some(recorded)) => (OperationKind::Update, recorded),
            (_, _, None) => {
                empty = unrecorded();
                (OperationKind::Create, &empty)
            }
        };
        self.op(&address, operation, recorded, Some(desired), was_pending)
            .map(Some)
    }

    /// `decl`'s inputs with every reference filled in from the state (every finished
    /// resource's outputs are there by now); the secrets among them learned.
    fn inputs_of(&self, decl: &ResourceDecl, address: &str) -> Result<Json, CoreFailure> {
        let state = &*self.state;
        let lookup = |target: &str, output: &str| {
            state
                .resources
                .get(target)
                .and_then(|r| r.outputs.get_raw(output))
        };
        if !decl.sensitive.is_empty() {
            learn_sensitive(decl, &self.options.secrets, &lookup);
        }
        let Some(inputs) = decl.resolve(&lookup) else {
            // A dependency finished without the output: the provider broke its handshake's
            // promise.
            let missing: Vec<String> = decl
                .refs
                .iter()
                .filter(|r| lookup(&r.address, &r.output).is_none())
                .map(|r| format!("{}#{}", r.address, r.output))
                .collect();
            return Err(CoreFailure::new(
                format!(
                    "{address}: the outputs it refers to were not produced: {}",
                    missing.join(", ")
                ),
                FailureKind::InvalidInput,
            ));
        };
        // Inputs its provider marks sensitive are secrets from now on.
        if let Some(connection) = self.providers.connections.get(&decl.provider) {
            let marked = connection
                .info()
                .resource_type(&decl.resource_type)
                .is_some_and(|t| t.inputs.iter().any(|i| i.sensitive));
            if marked {
                learn_sensitive_inputs(
                    &inputs,
                    connection,
                    &decl.resource_type,
                    &self.options.secrets,
                );
            }
        }
        // Inputs that hold a secret: what the operation prints waits for its outputs.
        let secrets = &self.options.secrets;
        if !secrets.is_empty() && secrets.found_in(&inputs.value()) {
            secrets.taint(address);
        }
        Ok(inputs)
    }

    /// A resource whose inputs are as recorded: nothing to ask its provider. If its wiring
    /// changed (a `$ref` became an equal literal, a `$cap` went) or a value of it became known
    /// as a secret, the record is updated, so deletes stay ordered and `state show` hides it.
    /// `false` if the state records no such resource (nothing done).
    fn leave_alone(
        &mut self,
        i: NodeId,
        address: &str,
        provider: &str,
        dependencies: &[String],
        work: &mut Work,
    ) -> bool {
        let Some(recorded) = self.state.resources.get(address) else {
            return false;
        };
        let mut old = recorded.dependencies.clone();
        let mut new = dependencies.to_vec();
        old.sort();
        new.sort();
        // Where its secrets are, as known now (a value newly marked sensitive).
        let sensitive = match self.providers.connections.get(provider) {
            Some(connection) if !self.options.secrets.is_empty() => {
                let mut probe = recorded.clone();
                note_sensitive(address, &mut probe, connection, &self.options.secrets);
                probe.sensitive
            }
            _ => recorded.sensitive.clone(),
        };
        if old == new && sensitive == recorded.sensitive {
            self.summary.unchanged += 1;
            obey(self.scheduler.end(i, End::Succeeded));
            return true;
        }
        let mut updated = recorded.clone();
        updated.dependencies = dependencies.to_vec();
        updated.sensitive = sensitive;
        let address = address.to_string();
        let backend = self.backend.clone();
        self.spawn(work, i, async move {
            let done = Record::Done {
                address,
                state: updated.clone(),
            };
            let outcome = match append_durably(&*backend, vec![done]).await {
                Ok(()) => Outcome::Done {
                    state: updated,
                    handles: Vec::new(),
                    counted: Action::Noop,
                },
                Err(e) => Outcome::State(e),
            };
            Done::Finished(i, outcome)
        });
        true
    }

    /// The capabilities `decl` takes from other resources, by the input names it knows them
    /// under.
    fn capabilities_for(
        &self,
        decl: &ResourceDecl,
        address: &str,
    ) -> Result<Vec<(String, Handle)>, CoreFailure> {
        decl.capabilities
            .iter()
            .map(|cap| {
                self.handles
                    .get(&cap.address)
                    .and_then(|hs| hs.iter().find(|(n, _)| n == &cap.name))
                    .map(|(_, c)| (cap.input.clone(), c.clone()))
                    .ok_or_else(|| {
                        CoreFailure::new(
                            format!(
                                "{address}: `{}` returned no capability named `{}`",
                                cap.address, cap.name
                            ),
                            FailureKind::InvalidInput,
                        )
                    })
            })
            .collect()
    }
}

/// What a create, update or read is asked to make the resource.
pub(super) struct Desired {
    pub(super) provider: String,
    pub(super) resource_type: String,
    pub(super) inputs: Json,
    pub(super) capabilities: Vec<(String, Handle)>,
    pub(super) dependencies: Vec<String>,
}

pub(super) fn progress_observer(
    events: Rc<dyn EventSink>,
    address: String,
    operation: &'static str,
) -> Rc<dyn capstan_host::ProgressObserver> {
    Rc::new(move |batch: Vec<ProgressEvent>| {
        for progress in batch {
            events.emit(Event::ResourceProgress {
                address: address.clone(),
                operation,
                progress,
            });
        }
        async {}
    })
}
