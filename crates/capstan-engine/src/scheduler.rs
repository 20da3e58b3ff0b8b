//! Which operation may go next: the run's state machine, with no I/O in it.
//!
//! A [`Scheduler`] holds one [`NodeState`] per node (a resource's change) and hands out
//! [`Step`]s: prepare a node whose dependencies are done, journal its intent once its
//! provider's permit is held, call its provider once a job is free. The driver
//! (`run.rs`) does each step and reports back (`queue`, `recorded`, `answered`, `end`); the
//! scheduler counts every limit, skips the dependents of a failure, stops dispatching under
//! `--fail-fast` or after a state error, and says what an interrupt cut short.
//!
//! Nodes and dependencies may be added while the run goes on (`add`, `depend`), also on nodes
//! already running or done: they obey the same limits and the same rules.
//!
//! Limits, all counted here:
//! - the dispatch window: at most `window` nodes between `Prepare` and their provider's
//!   answer (so the driver holds work in memory only for what may soon run, and prepares the
//!   next node while a result is journaled);
//! - a provider's permits: held from `Record` (before the intent is journaled, so an intent is
//!   written only for an operation its provider is ready to take) until `answered`;
//! - the `--jobs` limit: held from `Call` until `answered` (so the next call overlaps the
//!   journaling of this one's result).

use std::collections::{HashMap, VecDeque};

/// A node's index, in the order nodes were added.
pub type NodeId = usize;

/// Where a dispatched node is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Handed out as `Prepare`: the driver decides what it does.
    Preparing,
    /// Queued for its provider's permit.
    Queued,
    /// Its provider's permit is held; its intent is on its way to the journal.
    Recording,
    /// Its intent is durable (or it needs none); it waits for a job.
    Recorded,
    /// In its provider.
    Called,
    /// Answered; its result is on its way to the journal.
    Finishing,
}

/// Why the run stops dispatching.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stop {
    FailFast,
    /// A record could not be made durable: nothing more may run.
    StateError,
    Interrupted,
}

/// Why a node was skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Skip {
    /// A node it depends on (directly or not) failed: this one.
    Dependency(NodeId),
    /// Dispatched, but the run stopped before it was sent to its provider.
    NotSent(Stop),
    /// Never dispatched: the run stopped first.
    Stopped(Stop),
    /// Its dependencies never finished although the run did not stop: they form a cycle.
    Cycle,
    /// Its parent ended without succeeding before it ran.
    Parent(NodeId),
}

/// How a node ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum End {
    Succeeded,
    Failed,
    Skipped(Skip),
    /// Cut short in its provider (or while its result was being journaled) by an interrupt.
    Interrupted,
}

/// A node's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeState {
    /// Waiting for this many dependencies.
    Waiting(usize),
    /// Its dependencies are done; not yet dispatched.
    Ready,
    Dispatched(Phase),
    Ended(End),
}

/// What the driver is to do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// A dispatch slot is taken: decide what the node does, then `queue` it for a call or
    /// `end` it.
    Prepare(NodeId),
    /// Its provider's permit is held: journal its intent, then `recorded`. (A node queued
    /// without one goes straight on to `Call`.)
    Record(NodeId),
    /// A job is held: send the call, then `answered` when the provider answers.
    Call(NodeId),
    /// Its intent may be durable but the run stopped before it was sent: settle it, then
    /// `end` it with `Skipped(NotSent(stop))`.
    Settle(NodeId, Stop),
    /// The scheduler ended the node itself: report it.
    Skipped(NodeId, Skip),
    /// Its parent ended without succeeding: drop its work (cancelling its call), then `end`
    /// it (`Interrupted` if it was in its provider, else `Skipped(Parent(..))`).
    Cancel(NodeId),
}

/// A call the scheduler refused: the driver broke the protocol of steps (a bug, not input).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Misuse {
    #[error("node {0} does not exist")]
    NoSuchNode(NodeId),
    #[error("node {node} is {state:?}, not {expected}")]
    WrongState {
        node: NodeId,
        state: NodeState,
        expected: &'static str,
    },
}

struct Node {
    state: NodeState,
    dependents: Vec<NodeId>,
    /// The limit its current operation counts against (an index into `limits`; `NO_LIMIT`
    /// for none). A `u32`, not an `Option<usize>`: a run holds a node per resource.
    limit: u32,
    /// Its current operation journals an intent.
    journaled: bool,
    /// The node that added it as a child (or permit), or `NO_NODE`.
    parent: u32,
    /// The child its seat (job, and permit for a child of its provider) is lent to, or
    /// `NO_NODE`.
    lent_to: u32,
    /// Whose seat it runs on (`NO_NODE`: its own): its parent's, or — once the parent left its
    /// provider while lending — the seat's lender further up.
    lender: u32,
    /// What it borrowed: `BORROWS_JOB` or `BORROWS_SEAT` (job and permit).
    borrowing: u8,
    /// Its intent is durable (it may be queued again, having given its permit to a child).
    intent_durable: bool,
}

const NO_NODE: u32 = u32::MAX;
const BORROWS_JOB: u8 = 1;
const BORROWS_SEAT: u8 = 2;

const NO_LIMIT: u32 = u32::MAX;

struct Limit {
    max: usize,
    used: usize,
    queue: VecDeque<NodeId>,
}

/// The run's state machine. See the module's documentation.
pub struct Scheduler {
    nodes: Vec<Node>,
    ready: VecDeque<NodeId>,
    /// Nodes whose intent is durable, waiting for a job.
    recorded: VecDeque<NodeId>,
    limits: Vec<Limit>,
    limit_of: HashMap<String, usize>,
    /// Providers with queued nodes and (perhaps) a free permit, to look at next.
    limits_to_grant: VecDeque<usize>,
    /// Queued nodes whose provider has no limit.
    unlimited: VecDeque<NodeId>,
    jobs: usize,
    jobs_used: usize,
    window: usize,
    /// Nodes between `Prepare` and `answered`: what the window bounds.
    dispatched: usize,
    /// Nodes between `answered` and their end.
    finishing: usize,
    fail_fast: bool,
    stopped: Option<Stop>,
    /// Steps found while handling a report, handed out before anything new.
    outbox: VecDeque<Step>,
    /// Children ready to be prepared (ahead of the window).
    ready_children: VecDeque<NodeId>,
    children_of: HashMap<NodeId, Vec<NodeId>>,
    unended: usize,
}

impl Scheduler {
    /// At most `jobs` calls at once, and `window` (≥ `jobs`) nodes dispatched.
    pub fn new(jobs: usize, window: usize, fail_fast: bool) -> Self {
        let jobs = jobs.max(1);
        Scheduler {
            nodes: Vec::new(),
            ready: VecDeque::new(),
            recorded: VecDeque::new(),
            limits: Vec::new(),
            limit_of: HashMap::new(),
            limits_to_grant: VecDeque::new(),
            unlimited: VecDeque::new(),
            jobs,
            jobs_used: 0,
            window: window.max(jobs),
            dispatched: 0,
            finishing: 0,
            fail_fast,
            stopped: None,
            outbox: VecDeque::new(),
            ready_children: VecDeque::new(),
            children_of: HashMap::new(),
            unended: 0,
        }
    }

    /// Room for `additional` more nodes, so adding them never regrows the table.
    pub fn reserve(&mut self, additional: usize) {
        self.nodes.reserve_exact(additional);
        self.ready.reserve(additional);
    }

    /// At most `max` (≥ 1) operations of `provider` between `Record` and `answered`.
    pub fn set_limit(&mut self, provider: &str, max: usize) {
        match self.limit_of.get(provider) {
            Some(&l) => self.limits[l].max = max.max(1),
            None => {
                self.limit_of
                    .insert(provider.to_string(), self.limits.len());
                self.limits.push(Limit {
                    max: max.max(1),
                    used: 0,
                    queue: VecDeque::new(),
                });
            }
        }
    }

    /// Adds a node that waits for `dependencies` (nodes already added: waiting, running or
    /// done). If one of them failed or was skipped, so is the new node (a `Skipped` step).
    pub fn add(&mut self, dependencies: &[NodeId]) -> Result<NodeId, Misuse> {
        let id = self.nodes.len();
        for &d in dependencies {
            if d >= id {
                return Err(Misuse::NoSuchNode(d));
            }
        }
        self.nodes.push(Node {
            state: NodeState::Waiting(0),
            dependents: Vec::new(),
            limit: NO_LIMIT,
            journaled: false,
            parent: NO_NODE,
            lent_to: NO_NODE,
            lender: NO_NODE,
            borrowing: 0,
            intent_durable: false,
        });
        self.unended += 1;
        for &d in dependencies {
            self.link(id, d);
            if matches!(self.nodes[id].state, NodeState::Ended(_)) {
                return Ok(id);
            }
        }
        if self.nodes[id].state == NodeState::Waiting(0) {
            self.nodes[id].state = NodeState::Ready;
            self.ready.push_back(id);
        }
        Ok(id)
    }

    /// Adds a child of `parent` (a dispatched node): work its provider asked for while it
    /// runs, or a permit. It waits for nothing, is prepared ahead of the dispatch window (its
    /// parent may hold a slot of the window waiting for it), and may borrow its parent's seat
    /// while the parent is in its provider (so a parent waiting on children never starves
    /// them). It is cancelled (`Step::Cancel`) if the parent ends without succeeding.
    pub fn add_child(&mut self, parent: NodeId) -> Result<NodeId, Misuse> {
        match self.nodes.get(parent).map(|n| n.state) {
            None => return Err(Misuse::NoSuchNode(parent)),
            Some(NodeState::Dispatched(_)) => {}
            Some(state) => {
                return Err(Misuse::WrongState {
                    node: parent,
                    state,
                    expected: "dispatched",
                })
            }
        }
        let id = self.nodes.len();
        self.nodes.push(Node {
            state: NodeState::Ready,
            dependents: Vec::new(),
            limit: NO_LIMIT,
            journaled: false,
            parent: parent as u32,
            lent_to: NO_NODE,
            lender: NO_NODE,
            borrowing: 0,
            intent_durable: false,
        });
        self.unended += 1;
        self.children_of.entry(parent).or_default().push(id);
        if let Some(stop) = self.stopped {
            // Nothing new starts once the run stops: its parent hears so at once.
            self.skip(id, Skip::Stopped(stop));
            return Ok(id);
        }
        // Ahead of the window (not in `ready`, which may hold thousands).
        self.ready_children.push_back(id);
        Ok(id)
    }

    /// The node that added `id` as a child, if any.
    pub fn parent(&self, id: NodeId) -> Option<NodeId> {
        let p = self.nodes.get(id)?.parent;
        (p != NO_NODE).then_some(p as usize)
    }

    /// Makes `waits` wait for `first` too. `waits` must not be dispatched yet; `first` may be
    /// in any state (done: nothing to wait for; failed or skipped: `waits` is skipped).
    pub fn depend(&mut self, waits: NodeId, first: NodeId) -> Result<(), Misuse> {
        for n in [waits, first] {
            if n >= self.nodes.len() {
                return Err(Misuse::NoSuchNode(n));
            }
        }
        match self.nodes[waits].state {
            NodeState::Waiting(_) | NodeState::Ready => {}
            state => {
                return Err(Misuse::WrongState {
                    node: waits,
                    state,
                    expected: "waiting or ready",
                })
            }
        }
        if self.nodes[waits].state == NodeState::Ready {
            // Its stale entry in `ready` is passed over when popped.
            self.nodes[waits].state = NodeState::Waiting(0);
        }
        self.link(waits, first);
        if self.nodes[waits].state == NodeState::Waiting(0) {
            self.nodes[waits].state = NodeState::Ready;
            self.ready.push_back(waits);
        }
        Ok(())
    }

    /// `waits` (waiting) on `first`.
    fn link(&mut self, waits: NodeId, first: NodeId) {
        match self.nodes[first].state {
            NodeState::Ended(End::Succeeded) => {}
            NodeState::Ended(End::Failed) => self.skip(waits, Skip::Dependency(first)),
            NodeState::Ended(End::Skipped(skip @ (Skip::Dependency(_) | Skip::Parent(_)))) => {
                self.skip(waits, skip)
            }
            NodeState::Ended(_) => {
                // Cut short by a stop: so is the run, and `unfinished` reports `waits`.
                if let NodeState::Waiting(n) = &mut self.nodes[waits].state {
                    *n += 1;
                }
            }
            _ => {
                if let NodeState::Waiting(n) = &mut self.nodes[waits].state {
                    *n += 1;
                }
                self.nodes[first].dependents.push(waits);
            }
        }
    }

    /// The next thing to do, if any can be done now.
    pub fn next_step(&mut self) -> Option<Step> {
        loop {
            if let Some(step) = self.outbox.pop_front() {
                // A node may end (cancelled with its parent) after a step for it was queued.
                let stale = match step {
                    Step::Record(id) | Step::Call(id) | Step::Settle(id, _) | Step::Cancel(id) => {
                        !matches!(self.nodes[id].state, NodeState::Dispatched(_))
                    }
                    Step::Prepare(_) | Step::Skipped(..) => false,
                };
                if stale {
                    continue;
                }
                if let Some(stop) = self.stopped {
                    match step {
                        // Queued (for a borrower) before the stop: not sent after it.
                        Step::Record(id) => {
                            self.release_permit(id);
                            self.return_seat(id);
                            self.outbox
                                .push_back(Step::Skipped(id, Skip::NotSent(stop)));
                            self.end_dispatched(id, End::Skipped(Skip::NotSent(stop)));
                            continue;
                        }
                        Step::Call(id) => {
                            self.nodes[id].state = NodeState::Dispatched(Phase::Recorded);
                            if self.nodes[id].borrowing != 0 {
                                self.return_seat(id);
                            } else {
                                self.jobs_used -= 1;
                            }
                            self.release_permit(id);
                            self.outbox.push_back(Step::Settle(id, stop));
                            continue;
                        }
                        _ => {}
                    }
                }
                return Some(step);
            }
            // Granting a permit may put a call in the outbox without returning it.
            match self.grant() {
                Some(step) => return Some(step),
                None if self.outbox.is_empty() => return None,
                None => {}
            }
        }
    }

    /// The next recorded node, if a job is free for it.
    fn call_recorded(&mut self) -> Option<Step> {
        if self.jobs_used >= self.jobs {
            return None;
        }
        let id = self.recorded.pop_front()?;
        self.jobs_used += 1;
        self.nodes[id].state = NodeState::Dispatched(Phase::Called);
        Some(Step::Call(id))
    }

    fn grant(&mut self) -> Option<Step> {
        if self.stopped.is_none() {
            // Calls first: they hold intents that are already durable.
            if let Some(step) = self.call_recorded() {
                return Some(step);
            }
            while let Some(id) = self.unlimited.pop_front() {
                if let Some(step) = self.permitted(id) {
                    return Some(step);
                }
            }
            while let Some(&l) = self.limits_to_grant.front() {
                let limit = &mut self.limits[l];
                if limit.used < limit.max {
                    if let Some(id) = limit.queue.pop_front() {
                        limit.used += 1;
                        match self.permitted(id) {
                            Some(step) => return Some(step),
                            None => continue,
                        }
                    }
                }
                self.limits_to_grant.pop_front();
            }
            // Reads need no intent: straight to a job.
            if let Some(step) = self.call_recorded() {
                return Some(step);
            }
            while let Some(id) = self.ready_children.pop_front() {
                if self.nodes[id].state == NodeState::Ready {
                    self.dispatched += 1;
                    self.nodes[id].state = NodeState::Dispatched(Phase::Preparing);
                    return Some(Step::Prepare(id));
                }
            }
            while self.dispatched < self.window {
                let Some(id) = self.ready.pop_front() else {
                    break;
                };
                if self.nodes[id].state != NodeState::Ready {
                    continue;
                }
                self.dispatched += 1;
                self.nodes[id].state = NodeState::Dispatched(Phase::Preparing);
                return Some(Step::Prepare(id));
            }
        }
        None
    }

    /// Its provider's permit is held: record its intent, or (if it needs none) wait for a job.
    fn permitted(&mut self, id: NodeId) -> Option<Step> {
        if self.nodes[id].journaled {
            self.nodes[id].state = NodeState::Dispatched(Phase::Recording);
            Some(Step::Record(id))
        } else {
            self.ready_to_call(id);
            None
        }
    }

    /// Its intent is durable (or it needs none): called at once on a borrowed seat or job,
    /// else queued for a job.
    fn ready_to_call(&mut self, id: NodeId) {
        self.nodes[id].state = NodeState::Dispatched(Phase::Recorded);
        if self.nodes[id].borrowing == 0 {
            match self.free_seat_of_parent(id) {
                Some(p) => {
                    self.nodes[id].borrowing = BORROWS_JOB;
                    self.nodes[id].lender = p as u32;
                    self.nodes[p].lent_to = id as u32;
                }
                None => {
                    self.recorded.push_back(id);
                    return;
                }
            }
        }
        self.nodes[id].state = NodeState::Dispatched(Phase::Called);
        self.outbox.push_back(Step::Call(id));
    }

    /// The limit whose permit `id`'s seat holds: its own, or (for a seat it borrowed whole)
    /// its lender's.
    fn seat_limit(&self, mut id: NodeId) -> u32 {
        for _ in 0..self.nodes.len() {
            let node = &self.nodes[id];
            if node.borrowing != BORROWS_SEAT || node.lender == NO_NODE {
                return node.limit;
            }
            id = node.lender as usize;
        }
        NO_LIMIT
    }

    /// `id`'s parent, if it is in its provider.
    fn called_parent(&self, id: NodeId) -> Option<NodeId> {
        let p = self.parent(id)?;
        (self.nodes[p].state == NodeState::Dispatched(Phase::Called)).then_some(p)
    }

    /// `id`'s parent, if it is in its provider with its seat not lent.
    fn free_seat_of_parent(&self, id: NodeId) -> Option<NodeId> {
        let p = self.parent(id)?;
        let parent = &self.nodes[p];
        (parent.state == NodeState::Dispatched(Phase::Called) && parent.lent_to == NO_NODE)
            .then_some(p)
    }

    /// A borrower gives the seat back to its lender, who lends it to its next waiting child.
    fn return_seat(&mut self, id: NodeId) {
        if self.nodes[id].borrowing == 0 {
            return;
        }
        self.nodes[id].borrowing = 0;
        let lender = std::mem::replace(&mut self.nodes[id].lender, NO_NODE);
        if lender == NO_NODE || self.nodes[lender as usize].lent_to != id as u32 {
            return;
        }
        let p = lender as usize;
        self.nodes[p].lent_to = NO_NODE;
        if self.stopped.is_some() || self.nodes[p].state != NodeState::Dispatched(Phase::Called) {
            return;
        }
        let is_child = |n: &NodeId, nodes: &[Node]| nodes[*n].parent == p as u32;
        // A child recorded and waiting for a job: its job.
        if let Some(pos) = self.recorded.iter().position(|n| is_child(n, &self.nodes)) {
            let c = self.recorded.remove(pos).expect("found");
            self.nodes[c].borrowing = BORROWS_JOB;
            self.nodes[c].lender = p as u32;
            self.nodes[p].lent_to = c as u32;
            self.nodes[c].state = NodeState::Dispatched(Phase::Called);
            self.outbox.push_back(Step::Call(c));
            return;
        }
        // A child queued for the parent's provider's permit: the whole seat.
        let limit = self.seat_limit(p);
        let queue = match limit {
            NO_LIMIT => &mut self.unlimited,
            l => &mut self.limits[l as usize].queue,
        };
        let Some(pos) = queue.iter().position(|n| self.nodes[*n].parent == p as u32) else {
            return;
        };
        let c = queue.remove(pos).expect("found");
        self.nodes[c].limit = NO_LIMIT;
        self.nodes[c].borrowing = BORROWS_SEAT;
        self.nodes[c].lender = p as u32;
        self.nodes[p].lent_to = c as u32;
        if let Some(step) = self.permitted(c) {
            self.outbox.push_back(step);
        }
    }

    /// `from` leaves its provider while its seat is lent to `to`: `to` keeps the seat. A
    /// permit `from` owned and `to` borrowed becomes `to`'s; a job `from` owned becomes `to`'s
    /// (or, if `to` is not in its provider yet, goes back to the run); a seat `from` had
    /// borrowed itself is borrowed by `to` from the same lender.
    fn pass_seat(&mut self, from: NodeId, to: NodeId) {
        if self.nodes[to].borrowing == BORROWS_SEAT && self.nodes[from].limit != NO_LIMIT {
            self.nodes[to].limit = std::mem::replace(&mut self.nodes[from].limit, NO_LIMIT);
            self.nodes[to].borrowing = BORROWS_JOB;
        }
        let lender = std::mem::replace(&mut self.nodes[from].lender, NO_NODE);
        if self.nodes[from].borrowing != 0 && lender != NO_NODE {
            self.nodes[from].borrowing = 0;
            self.nodes[to].lender = lender;
            self.nodes[lender as usize].lent_to = to as u32;
            return;
        }
        self.nodes[from].borrowing = 0;
        self.nodes[to].lender = NO_NODE;
        let seat_only = self.nodes[to].borrowing == BORROWS_SEAT;
        self.nodes[to].borrowing = 0;
        if self.nodes[to].state != NodeState::Dispatched(Phase::Called) {
            // Not in its provider yet: it will take a job of its own.
            self.jobs_used -= 1;
            if seat_only {
                // It borrowed a permit `from` did not hold (no limit): none to keep.
                self.nodes[to].limit = NO_LIMIT;
            }
        }
    }

    /// A prepared node (or one whose earlier operation finished: the create after a
    /// replace's delete) is to call `provider`, journaling an intent first if `journaled`.
    pub fn queue(
        &mut self,
        id: NodeId,
        provider: Option<&str>,
        journaled: bool,
    ) -> Result<(), Misuse> {
        self.expect(
            id,
            &[Phase::Preparing, Phase::Finishing],
            "preparing or finishing",
        )?;
        if self.nodes[id].state == NodeState::Dispatched(Phase::Finishing) {
            // Its next operation takes a slot of the window again (it may go over by one).
            self.finishing -= 1;
            self.dispatched += 1;
            self.nodes[id].state = NodeState::Dispatched(Phase::Preparing);
        }
        if let Some(stop) = self.stopped {
            self.nodes[id].state = NodeState::Dispatched(Phase::Queued);
            // Reported before what ending it skips (its children).
            self.outbox
                .push_back(Step::Skipped(id, Skip::NotSent(stop)));
            self.end_dispatched(id, End::Skipped(Skip::NotSent(stop)));
            return Ok(());
        }
        let limit = provider.and_then(|p| self.limit_of.get(p).copied());
        let node = &mut self.nodes[id];
        node.state = NodeState::Dispatched(Phase::Queued);
        node.limit = limit.map_or(NO_LIMIT, |l| l as u32);
        node.journaled = journaled;
        if let Some(p) = self.free_seat_of_parent(id) {
            if self.seat_limit(p) == self.nodes[id].limit {
                // Its parent's seat: no permit or job of its own.
                self.nodes[id].limit = NO_LIMIT;
                self.nodes[id].borrowing = BORROWS_SEAT;
                self.nodes[id].lender = p as u32;
                self.nodes[p].lent_to = id as u32;
                if let Some(step) = self.permitted(id) {
                    self.outbox.push_back(step);
                }
                return Ok(());
            }
        }
        if let (Some(l), Some(_)) = (limit, self.called_parent(id)) {
            if self.limits[l].used >= self.limits[l].max {
                if let Some(pos) = self
                    .recorded
                    .iter()
                    .position(|&n| self.nodes[n].limit == l as u32 && self.nodes[n].borrowing == 0)
                {
                    // That node's intent is durable and it only waits for a job, which the
                    // child's parent may hold: the child takes its permit, and it queues for
                    // the permit again, first in line, with no second intent.
                    let x = self.recorded.remove(pos).expect("found");
                    self.nodes[x].journaled = false;
                    self.nodes[x].state = NodeState::Dispatched(Phase::Queued);
                    self.limits[l].queue.push_front(x);
                    if let Some(step) = self.permitted(id) {
                        self.outbox.push_back(step);
                    }
                    return Ok(());
                }
            }
        }
        match limit {
            Some(l) => {
                self.limits[l].queue.push_back(id);
                if !self.limits_to_grant.contains(&l) {
                    self.limits_to_grant.push_back(l);
                }
            }
            None => self.unlimited.push_back(id),
        }
        Ok(())
    }

    /// The node's intent is durable (or it needed none): it may be called.
    pub fn recorded(&mut self, id: NodeId) -> Result<(), Misuse> {
        self.expect(id, &[Phase::Recording], "recording")?;
        self.nodes[id].state = NodeState::Dispatched(Phase::Recorded);
        self.nodes[id].intent_durable = true;
        match self.stopped {
            Some(stop) => {
                self.release_permit(id);
                self.return_seat(id);
                self.outbox.push_back(Step::Settle(id, stop));
            }
            None => self.ready_to_call(id),
        }
        Ok(())
    }

    /// The provider answered (`ok` or with a failure): its job and permit are free. Under
    /// `--fail-fast` a failure stops the run before anything else is sent.
    pub fn answered(&mut self, id: NodeId, ok: bool) -> Result<(), Misuse> {
        self.expect(id, &[Phase::Called], "called")?;
        if !ok && self.fail_fast {
            self.stop(Stop::FailFast);
        }
        self.nodes[id].state = NodeState::Dispatched(Phase::Finishing);
        self.leave_job(id);
        // Its slot of the window too: the next node is prepared while this result is
        // journaled.
        self.dispatched -= 1;
        self.finishing += 1;
        self.release_permit(id);
        Ok(())
    }

    /// A dispatched node ended. Success releases its dependents; anything else skips them.
    /// Under `--fail-fast` a failure stops the run.
    pub fn end(&mut self, id: NodeId, end: End) -> Result<(), Misuse> {
        let phase = match self.nodes.get(id).map(|n| n.state) {
            None => return Err(Misuse::NoSuchNode(id)),
            Some(NodeState::Dispatched(phase)) => phase,
            Some(state) => {
                return Err(Misuse::WrongState {
                    node: id,
                    state,
                    expected: "dispatched",
                })
            }
        };
        if phase == Phase::Called {
            self.leave_job(id);
        } else {
            // A seat borrowed before the call.
            self.return_seat(id);
        }
        if matches!(phase, Phase::Recording | Phase::Recorded | Phase::Called) {
            self.release_permit(id);
        }
        match phase {
            Phase::Queued => self.unqueue(id),
            Phase::Recorded => self.recorded.retain(|&n| n != id),
            _ => {}
        }
        if end == End::Failed && self.fail_fast {
            self.stop(Stop::FailFast);
        }
        self.end_dispatched(id, end);
        Ok(())
    }

    /// Stops dispatching: what is queued for a permit is skipped, intents waiting for a job
    /// are to be settled; calls in providers go on (unless interrupted).
    pub fn stop(&mut self, stop: Stop) {
        if self.stopped.is_some() {
            return;
        }
        self.stopped = Some(stop);
        // Children not yet prepared: their parents hear at once that they will not run.
        for c in std::mem::take(&mut self.ready_children) {
            self.skip(c, Skip::Stopped(stop));
        }
        let mut queued: Vec<NodeId> = self.unlimited.drain(..).collect();
        for limit in &mut self.limits {
            queued.extend(limit.queue.drain(..));
        }
        self.limits_to_grant.clear();
        for id in queued {
            if self.nodes[id].intent_durable {
                // Queued again after giving its permit to a child: its intent is durable.
                // (Queued, it holds no permit: its limit only named the queue.)
                self.nodes[id].limit = NO_LIMIT;
                self.nodes[id].state = NodeState::Dispatched(Phase::Recorded);
                self.outbox.push_back(Step::Settle(id, stop));
                continue;
            }
            // Reported before what ending it skips (its children).
            self.outbox
                .push_back(Step::Skipped(id, Skip::NotSent(stop)));
            self.end_dispatched(id, End::Skipped(Skip::NotSent(stop)));
        }
        for id in std::mem::take(&mut self.recorded) {
            self.release_permit(id);
            self.outbox.push_back(Step::Settle(id, stop));
        }
    }

    /// Stops at once: every dispatched node ends (`Interrupted` if in or answered by its
    /// provider, else not sent) and is returned with the phase it was in, for the driver to
    /// drop its work and settle intents. Steps not yet handed out are dropped.
    pub fn interrupt(&mut self) -> Vec<(NodeId, Phase)> {
        self.stopped = Some(Stop::Interrupted);
        self.outbox.retain(|s| matches!(s, Step::Skipped(..)));
        self.unlimited.clear();
        for limit in &mut self.limits {
            limit.queue.clear();
            limit.used = 0;
        }
        self.limits_to_grant.clear();
        self.recorded.clear();
        self.jobs_used = 0;
        let mut cut = Vec::new();
        for id in 0..self.nodes.len() {
            if let NodeState::Dispatched(phase) = self.nodes[id].state {
                let end = match phase {
                    Phase::Called | Phase::Finishing => End::Interrupted,
                    _ => End::Skipped(Skip::NotSent(Stop::Interrupted)),
                };
                let durable = self.nodes[id].intent_durable && phase == Phase::Queued;
                self.end_dispatched(id, end);
                // A node queued again with its intent durable is, for what to settle, recorded.
                cut.push((id, if durable { Phase::Recorded } else { phase }));
            }
        }
        // Every dispatched child ended above: nothing to cancel.
        self.outbox.retain(|s| matches!(s, Step::Skipped(..)));
        cut
    }

    /// Whether nothing is dispatched and nothing can be, once `next_step` returned `None`: the
    /// run is over (call `unfinished`).
    pub fn idle(&self) -> bool {
        self.dispatched == 0
            && self.finishing == 0
            && self.outbox.is_empty()
            && (self.stopped.is_some() || (self.ready.is_empty() && self.ready_children.is_empty()))
    }

    /// Ends every node that never ran, once the run is [`idle`](Self::idle): stopped before
    /// it was dispatched, or (if nothing stopped the run) in a cycle.
    pub fn unfinished(&mut self) -> Vec<(NodeId, Skip)> {
        let skip = match self.stopped {
            Some(stop) => Skip::Stopped(stop),
            None => Skip::Cycle,
        };
        let mut left = Vec::new();
        for id in 0..self.nodes.len() {
            if matches!(
                self.nodes[id].state,
                NodeState::Waiting(_) | NodeState::Ready
            ) {
                self.nodes[id].state = NodeState::Ended(End::Skipped(skip));
                self.unended -= 1;
                left.push((id, skip));
            }
        }
        self.ready.clear();
        self.ready_children.clear();
        left
    }

    /// Why the run stopped, if it did.
    pub fn stopped(&self) -> Option<Stop> {
        self.stopped
    }

    pub fn state(&self, id: NodeId) -> Option<NodeState> {
        self.nodes.get(id).map(|n| n.state)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Nodes not ended yet.
    pub fn unended(&self) -> usize {
        self.unended
    }

    /// Calls in providers now (at most `jobs`).
    pub fn jobs_in_use(&self) -> usize {
        self.jobs_used
    }

    /// Permits of `provider` held now.
    pub fn permits_in_use(&self, provider: &str) -> usize {
        self.limit_of
            .get(provider)
            .map_or(0, |&l| self.limits[l].used)
    }

    /// Nodes dispatched and not yet answered (at most the window, plus one for each node
    /// gone on to its next operation).
    pub fn dispatched(&self) -> usize {
        self.dispatched
    }

    /// Nodes answered whose result is not yet journaled.
    pub fn finishing(&self) -> usize {
        self.finishing
    }

    fn expect(&self, id: NodeId, phases: &[Phase], expected: &'static str) -> Result<(), Misuse> {
        match self.nodes.get(id).map(|n| n.state) {
            None => Err(Misuse::NoSuchNode(id)),
            Some(NodeState::Dispatched(p)) if phases.contains(&p) => Ok(()),
            Some(state) => Err(Misuse::WrongState {
                node: id,
                state,
                expected,
            }),
        }
    }

    /// `id` leaves its provider: its job goes back (to its parent if borrowed, to a child on
    /// its seat if lent, else to the run).
    fn leave_job(&mut self, id: NodeId) {
        let to = std::mem::replace(&mut self.nodes[id].lent_to, NO_NODE);
        if to != NO_NODE {
            self.pass_seat(id, to as usize);
        } else if self.nodes[id].borrowing != 0 {
            self.return_seat(id);
        } else {
            self.jobs_used -= 1;
        }
    }

    /// Takes the node's limit away from it (it holds or waits for that limit's permit).
    fn take_limit(&mut self, id: NodeId) -> Option<usize> {
        let l = std::mem::replace(&mut self.nodes[id].limit, NO_LIMIT);
        (l != NO_LIMIT).then_some(l as usize)
    }

    fn release_permit(&mut self, id: NodeId) {
        if let Some(l) = self.take_limit(id) {
            let limit = &mut self.limits[l];
            limit.used -= 1;
            if !limit.queue.is_empty() && !self.limits_to_grant.contains(&l) {
                self.limits_to_grant.push_back(l);
            }
        }
    }

    fn unqueue(&mut self, id: NodeId) {
        match self.take_limit(id) {
            Some(l) => self.limits[l].queue.retain(|&n| n != id),
            None => self.unlimited.retain(|&n| n != id),
        }
    }

    /// Ends a dispatched node: frees its slot, then releases or skips its dependents.
    fn end_dispatched(&mut self, id: NodeId, end: End) {
        if self.nodes[id].state == NodeState::Dispatched(Phase::Finishing) {
            self.finishing -= 1;
        } else {
            self.dispatched -= 1;
        }
        self.nodes[id].limit = NO_LIMIT;
        self.nodes[id].state = NodeState::Ended(end);
        self.unended -= 1;
        self.after_end(id, end);
        if end == End::Succeeded {
            self.children_of.remove(&id);
        } else {
            self.cancel_children(id);
        }
    }

    fn after_end(&mut self, id: NodeId, end: End) {
        let dependents = std::mem::take(&mut self.nodes[id].dependents);
        match end {
            // Cut short by a stop: what depends on it never runs, and `unfinished` says why.
            End::Interrupted | End::Skipped(Skip::NotSent(_) | Skip::Stopped(_)) => {}
            End::Succeeded => {
                for &d in &dependents {
                    if let NodeState::Waiting(n) = &mut self.nodes[d].state {
                        *n -= 1;
                        if *n == 0 {
                            self.nodes[d].state = NodeState::Ready;
                            self.ready.push_back(d);
                        }
                    }
                }
            }
            _ => {
                let skip = match end {
                    End::Skipped(skip @ (Skip::Dependency(_) | Skip::Parent(_))) => skip,
                    _ => Skip::Dependency(id),
                };
                for &d in &dependents {
                    self.skip(d, skip);
                }
            }
        }
        self.nodes[id].dependents = dependents;
    }

    /// A parent ended without succeeding: its children not dispatched are skipped, those
    /// dispatched are to be cancelled by the driver (`Step::Cancel`).
    fn cancel_children(&mut self, parent: NodeId) {
        let Some(children) = self.children_of.remove(&parent) else {
            return;
        };
        for c in children {
            match self.nodes[c].state {
                NodeState::Waiting(_) | NodeState::Ready => self.skip(c, Skip::Parent(parent)),
                NodeState::Dispatched(_) => self.outbox.push_back(Step::Cancel(c)),
                NodeState::Ended(_) => {}
            }
        }
    }

    /// Skips a node that was not dispatched, and (through `after_end`) what depends on it.
    fn skip(&mut self, id: NodeId, skip: Skip) {
        if !matches!(
            self.nodes[id].state,
            NodeState::Waiting(_) | NodeState::Ready
        ) {
            return;
        }
        // Iteratively: a long chain must not overflow the stack.
        let mut stack = vec![id];
        while let Some(n) = stack.pop() {
            if !matches!(
                self.nodes[n].state,
                NodeState::Waiting(_) | NodeState::Ready
            ) {
                continue;
            }
            self.nodes[n].state = NodeState::Ended(End::Skipped(skip));
            self.unended -= 1;
            self.outbox.push_back(Step::Skipped(n, skip));
            stack.extend(self.nodes[n].dependents.iter().rev().copied());
        }
    }
}
