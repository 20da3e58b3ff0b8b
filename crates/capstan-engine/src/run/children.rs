//! Work providers hand back while an operation runs: children (resources under the
//! operation's address) and permits (a job slot for the provider's own parallel work).

use super::*;

/// What providers ask of the run through an operation's `Scheduler` capability.
pub(super) enum Ask {
    Child {
        parent: NodeId,
        name: String,
        provider: String,
        resource_type: String,
        inputs: String,
        reply: tokio::sync::oneshot::Sender<Result<Json, OperationError>>,
    },
    Permit {
        parent: NodeId,
        reply: tokio::sync::oneshot::Sender<Result<PermitGuard, OperationError>>,
    },
    Release(NodeId),
}

pub(super) type Asks = tokio::sync::mpsc::UnboundedSender<Ask>;

/// Work the run took on for a running operation: a child resource, or a permit.
pub(super) enum Kid {
    Child {
        inputs: Json,
        /// Where its outcome goes (taken when sent).
        reply: Option<tokio::sync::oneshot::Sender<Result<Json, OperationError>>>,
    },
    Permit {
        reply: Option<tokio::sync::oneshot::Sender<Result<PermitGuard, OperationError>>>,
    },
}

/// An operation's requests to the run (the host serves them to its provider as the
/// `Scheduler` capability): each is handed to the run's loop, and answered from there.
pub(super) struct OperationAsks {
    pub(super) parent: NodeId,
    pub(super) asks: Asks,
}

pub(super) fn run_over() -> OperationError {
    OperationError::cancelled("the run stopped before answering")
}

impl RunRequests for OperationAsks {
    fn child(
        &self,
        request: ChildRequest,
    ) -> LocalBoxFuture<'static, Result<Json, OperationError>> {
        self.ask(|reply| Ask::Child {
            parent: self.parent,
            name: request.name,
            provider: request.provider,
            resource_type: request.resource_type,
            inputs: request.inputs,
            reply,
        })
    }

    fn permit(&self) -> LocalBoxFuture<'static, Result<PermitGuard, OperationError>> {
        self.ask(|reply| Ask::Permit {
            parent: self.parent,
            reply,
        })
    }
}

impl OperationAsks {
    /// Hands an ask to the run's loop and waits for its answer (the run having ended is an
    /// answer too).
    fn ask<T: 'static>(
        &self,
        ask: impl FnOnce(tokio::sync::oneshot::Sender<Result<T, OperationError>>) -> Ask,
    ) -> LocalBoxFuture<'static, Result<T, OperationError>> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let sent = self.asks.send(ask(reply));
        async move {
            match sent {
                Ok(()) => answer.await.unwrap_or_else(|_| Err(run_over())),
                Err(_) => Err(run_over()),
            }
        }
        .boxed_local()
    }
}

/// A granted permit, as the provider holds it: its slot goes back when it is dropped (on
/// `release`, when the provider drops its `Permit`, or when its connection closes).
pub(super) struct HeldPermit {
    pub(super) node: NodeId,
    pub(super) asks: Asks,
}

impl Drop for HeldPermit {
    fn drop(&mut self) {
        // Released twice is released once: the loop ignores a node no longer holding a slot.
        let _ = self.asks.send(Ask::Release(self.node));
    }
}

/// How a failure the run reports maps onto the protocol's error kinds (for a parent).
pub(super) fn error_kind(kind: FailureKind) -> ErrorKind {
    match kind {
        FailureKind::Permanent => ErrorKind::Permanent,
        FailureKind::InvalidInput => ErrorKind::InvalidInput,
        FailureKind::Transient | FailureKind::Timeout | FailureKind::Provider => {
            ErrorKind::Transient
        }
        FailureKind::Cancelled => ErrorKind::Cancelled,
        FailureKind::Internal => ErrorKind::Internal,
    }
}

impl<'a> Driver<'a> {
    pub(super) fn is_permit(&self, i: NodeId) -> bool {
        matches!(self.kin.kids.get(&i), Some(Kid::Permit { .. }))
    }

    /// Sends a child's outcome to the parent waiting for it (once), and forgets the kid.
    pub(super) fn settle_kid(&mut self, i: NodeId, result: Result<Json, OperationError>) {
        self.kin.aborts.remove(&i);
        match self.kin.kids.remove(&i) {
            Some(Kid::Child {
                reply: Some(reply), ..
            }) => {
                let _ = reply.send(result);
            }
            Some(Kid::Permit { reply: Some(reply) }) => {
                let _ = reply.send(Err(result.err().unwrap_or_else(run_over)));
            }
            _ => {}
        }
    }

    /// A provider asked, through an operation's scheduler, for a child or a permit, or gave
    /// a permit back.
    pub(super) fn ask(&mut self, ask: Ask) {
        match ask {
            Ask::Child {
                parent,
                name,
                provider,
                resource_type,
                inputs,
                reply,
            } => match self.add_child(parent, &name, provider, resource_type, &inputs) {
                Ok(i) => {
                    self.kin.kids.insert(
                        i,
                        Kid::Child {
                            inputs: Json::from_text(&inputs).unwrap_or_else(|_| Json::null()),
                            reply: Some(reply),
                        },
                    );
                }
                Err(error) => {
                    let _ = reply.send(Err(error));
                }
            },
            Ask::Permit { parent, reply } => {
                if self.scheduler.state(parent) != Some(NodeState::Dispatched(Phase::Called)) {
                    let _ = reply.send(Err(OperationError::invalid_input(
                        "a permit was asked for by an operation that has ended",
                    )));
                    return;
                }
                let Ok(i) = self.scheduler.add_child(parent) else {
                    return;
                };
                let address = format!("{}#permit", self.changes[parent].address);
                self.push_node(PlannedChange {
                    provider: String::new(),
                    resource_type: String::new(),
                    ..planned(address, Action::Noop)
                });
                debug_assert_eq!(i + 1, self.changes.len());
                self.kin.kids.insert(i, Kid::Permit { reply: Some(reply) });
                self.kin.permits_of.entry(parent).or_default().push(i);
            }
            Ask::Release(i) => self.release_permit(i),
        }
    }

    /// A permit given back (or a parent that ended while holding it).
    pub(super) fn release_permit(&mut self, i: NodeId) {
        if !self.is_permit(i) {
            return;
        }
        match self.scheduler.state(i) {
            Some(NodeState::Dispatched(Phase::Called)) => {
                obey(self.scheduler.answered(i, true));
                obey(self.scheduler.end(i, End::Succeeded));
                self.settle_kid(i, Ok(Json::null()));
            }
            Some(NodeState::Dispatched(_)) => {
                obey(
                    self.scheduler
                        .end(i, End::Skipped(Skip::Stopped(Stop::Interrupted))),
                );
                self.settle_kid(i, Err(run_over()));
            }
            _ => {}
        }
    }

    /// Checks a child asked for by `parent` and adds it to the run.
    pub(super) fn add_child(
        &mut self,
        parent: NodeId,
        name: &str,
        provider: String,
        resource_type: String,
        inputs: &str,
    ) -> Result<NodeId, OperationError> {
        let invalid = |message: String| Err(OperationError::invalid_input(message));
        if self.scheduler.state(parent) != Some(NodeState::Dispatched(Phase::Called)) {
            return invalid("a child was asked for by an operation that has ended".into());
        }
        let parent_address = &self.changes[parent].address;
        let making = self.ops.get(&parent).is_some_and(|op| {
            matches!(op.operation, OperationKind::Create | OperationKind::Update)
        });
        if !making {
            return invalid(format!(
                "{parent_address}: only a create or an update may ask for children"
            ));
        }
        if name.is_empty() || name.contains('/') || name.chars().any(char::is_control) {
            return invalid(format!(
                "{parent_address}: child name {name:?} must be non-empty, without `/` or control characters"
            ));
        }
        let address = format!("{parent_address}/{name}");
        let provider = if provider.is_empty() {
            match self.ops.get(&parent) {
                Some(op) => op.provider.clone(),
                None => return invalid(format!("{address}: its parent has no provider")),
            }
        } else {
            provider
        };
        if !self.providers.connections.contains_key(&provider) {
            return invalid(format!(
                "{address}: provider `{provider}` is not one of this run's (declare it in the deployment)"
            ));
        }
        let Ok(inputs) = Json::from_text(inputs) else {
            return invalid(format!("{address}: its inputs are not JSON"));
        };
        if !inputs.text().trim_start().starts_with('{') {
            return invalid(format!("{address}: its inputs must be a JSON object"));
        }
        let declared = self.declares(&address)
            || self
                .state
                .resources
                .get(&address)
                .is_some_and(|r| r.parent.as_deref() != Some(parent_address.as_str()));
        if declared {
            return invalid(format!(
                "{address}: a resource of the deployment (or another parent's child) has this address; give the child another name"
            ));
        }
        if self.kin.deleting.contains(&address) {
            return invalid(format!(
                "{address}: it is being deleted in this run; ask for it again in the next"
            ));
        }
        if !self.kin.child_addresses.insert(address.clone()) {
            return invalid(format!("{address}: asked for twice in this run"));
        }
        let action = match self.state.resources.get(&address) {
            None => Action::Create,
            Some(r) if r.provider != provider || r.resource_type != resource_type => {
                self.kin.child_addresses.remove(&address);
                return invalid(format!(
                    "{address}: recorded as a `{}` of provider `{}`; delete its parent first, or `capstan state forget` it",
                    r.resource_type, r.provider
                ));
            }
            Some(r) if r.inputs == inputs => Action::Noop,
            Some(_) => Action::Update,
        };
        let Ok(i) = self.scheduler.add_child(parent) else {
            return invalid(format!("{address}: its parent has ended"));
        };
        let interrupted = self.state.pending.get(&address).map(|p| p.operation);
        self.push_node(PlannedChange {
            provider,
            resource_type,
            interrupted,
            ..planned(address, action)
        });
        debug_assert_eq!(i + 1, self.changes.len());
        Ok(i)
    }

    /// After `parent` was made again: the children it had that it did not ask for this time
    /// (and theirs) are deleted, each before its parent — added to the run as it goes on.
    pub(super) fn delete_stale_children(&mut self, parent: &str, work: &mut Work) {
        let mut stale = Vec::new();
        let mut stack: Vec<String> = self
            .kin
            .recorded_children
            .get(parent)
            .into_iter()
            .flatten()
            .filter(|c| !self.kin.child_addresses.contains(*c))
            .cloned()
            .collect();
        while let Some(address) = stack.pop() {
            // Not a declared resource at that address, not another parent's child (it may
            // have been recorded anew since), not already being deleted.
            let still_ours = self
                .state
                .resources
                .get(&address)
                .and_then(|r| r.parent.as_deref())
                .is_some_and(|p| p == parent || stale.iter().any(|s: &String| s.as_str() == p));
            if self.declares(&address) || !still_ours || self.kin.deleting.contains(&address) {
                continue;
            }
            if let Some(theirs) = self.kin.recorded_children.get(&address) {
                stack.extend(theirs.iter().cloned());
            }
            stale.push(address);
        }
        // Recorded as orphans first: if a delete below does not happen (it fails, the run
        // stops), the next plan deletes them, as it does any resource nothing declares.
        let mut orphans = Vec::new();
        for address in &stale {
            if let Some(recorded) = self.state.resources.get_mut(address) {
                recorded.parent = None;
                orphans.push(Record::Done {
                    address: address.clone(),
                    state: recorded.clone(),
                });
            }
            self.kin.deleting.insert(address.clone());
        }
        if !orphans.is_empty() {
            let backend = self.backend.clone();
            work.push(
                async move {
                    let _ = append_durably(&*backend, orphans).await;
                    None
                }
                .boxed_local(),
            );
        }
        let mut node_of = FastMap::default();
        for address in &stale {
            let Some(recorded) = self.state.resources.get(address) else {
                continue;
            };
            let Ok(i) = self.scheduler.add(&[]) else {
                continue;
            };
            let change = PlannedChange {
                provider: recorded.provider.clone(),
                resource_type: recorded.resource_type.clone(),
                interrupted: self.state.pending.get(address).map(|p| p.operation),
                ..planned(address.clone(), Action::Delete)
            };
            self.push_node(change);
            node_of.insert(address.clone(), i);
        }
        for address in &stale {
            let parent_node = self
                .state
                .resources
                .get(address)
                .and_then(|r| r.parent.as_ref())
                .and_then(|p| node_of.get(p));
            if let (Some(&waits), Some(&child)) = (parent_node, node_of.get(address)) {
                obey(self.scheduler.depend(waits, child));
            }
        }
    }

    /// A child prepared: unchanged (its parent gets what is recorded), or an operation.
    pub(super) fn child_op(&mut self, i: NodeId) -> Result<Option<Op>, CoreFailure> {
        let change = &self.changes[i];
        let address = change.address.clone();
        let Some(Kid::Child { inputs, .. }) = self.kin.kids.get(&i) else {
            return Err(CoreFailure::new(
                format!("{address}: not a child of this run"),
                FailureKind::Internal,
            ));
        };
        let inputs = inputs.clone();
        let parent = self
            .scheduler
            .parent(i)
            .map(|p| self.changes[p].address.clone());
        let recorded = self.state.resources.get(&address).cloned();
        if let (Action::Noop, Some(recorded)) = (change.action, &recorded) {
            self.summary.unchanged += 1;
            self.settle_kid(i, Ok(recorded.outputs.clone()));
            obey(self.scheduler.end(i, End::Succeeded));
            return Ok(None);
        }
        let (operation, recorded) = match recorded {
            Some(r) => (OperationKind::Update, r),
            None => (OperationKind::Create, unrecorded()),
        };
        let desired = Desired {
            provider: change.provider.clone(),
            resource_type: change.resource_type.clone(),
            inputs,
            capabilities: Vec::new(),
            // Deleted before its parent.
            dependencies: parent.iter().cloned().collect(),
        };
        let was_pending = change.interrupted.is_some();
        let mut op = self.op(&address, operation, &recorded, Some(desired), was_pending)?;
        op.parent = parent;
        Ok(Some(op))
    }

    /// A child whose parent ended without succeeding: its work is dropped.
    pub(super) fn cancel(&mut self, i: NodeId, work: &mut Work) {
        let Some(NodeState::Dispatched(phase)) = self.scheduler.state(i) else {
            return;
        };
        if phase == Phase::Finishing {
            // Its provider answered: its result is being journaled, and ends it as usual.
            return;
        }
        if let Some(handle) = self.kin.aborts.remove(&i) {
            handle.abort();
        }
        let op = self.ops.remove(&i);
        if let (Some(op), Phase::Recording | Phase::Recorded) = (&op, phase) {
            if op.has_intent() && !op.was_pending {
                // Its intent is (or is about to be) durable, but it never reached its
                // provider: settled, so the next run does not ask anyone to check it.
                let settled = Record::Failed {
                    address: self.changes[i].address.clone(),
                    operation: op.operation,
                    error: "cancelled with its parent before it was sent to its provider".into(),
                };
                let backend = self.backend.clone();
                let work_done = async move {
                    let _ = append_durably(&*backend, vec![settled]).await;
                    None
                };
                work.push(work_done.boxed_local());
            }
        }
        if self.is_permit(i) {
            self.release_permit(i);
            return;
        }
        let parent = self.scheduler.parent(i).unwrap_or(i);
        let parent_address = self.changes[parent].address.clone();
        match phase {
            Phase::Called | Phase::Finishing => {
                let change = &self.changes[i];
                self.summary.interrupted += 1;
                self.events.emit(Event::ResourceFailed {
                    address: change.address.clone(),
                    operation: change.action.as_str(),
                    error: format!(
                        "{}: cancelled because its parent `{parent_address}` ended without it (whether it took effect is unknown: it stays pending)",
                        change.address
                    ),
                    kind: FailureKind::Cancelled,
                    details: String::new(),
                    elapsed_seconds: 0.0,
                });
                obey(self.scheduler.end(i, End::Interrupted));
                self.settle_kid(
                    i,
                    Err(OperationError::cancelled("cancelled with its parent")),
                );
            }
            _ => {
                obey(self.scheduler.end(i, End::Skipped(Skip::Parent(parent))));
                self.report_skip(i, Skip::Parent(parent));
            }
        }
    }
}
