//! Properties of the scheduler over random runs: random DAGs, providers and limits, random
//! failures at every stage, random completion orders, nodes and edges added while the run
//! goes on, `--fail-fast`, state errors and interrupts. The test plays a driver that does
//! each step in a random order and checks, after every step:
//! - nothing is called before all its dependencies succeeded;
//! - the job limit, every provider's limit and the dispatch window are never exceeded;
//! - a journaled operation is called only after its intent was recorded;
//! - nothing is prepared or called after the run stopped.
//!
//! And, at the end, that every node ended exactly once, and that every node depending on a
//! failure was skipped, never run.

use std::collections::{BTreeMap, BTreeSet};

use capstan_engine::scheduler::{End, NodeId, NodeState, Phase, Scheduler, Skip, Step, Stop};
use proptest::prelude::*;

#[derive(Clone, Debug)]
struct Plan {
    jobs: usize,
    window: usize,
    fail_fast: bool,
    /// Limits of providers 0..3 (`None`: unlimited).
    limits: Vec<Option<usize>>,
    nodes: Vec<NodeSpec>,
    /// Random numbers steering the driver: which piece of work finishes next, when to add
    /// nodes, when to interrupt.
    choices: Vec<u32>,
    interrupt_at: Option<usize>,
    state_error_at: Option<usize>,
}

#[derive(Clone, Debug)]
struct NodeSpec {
    /// Indices of earlier nodes (taken modulo the nodes existing when it is added).
    deps: Vec<usize>,
    provider: usize,
    journaled: bool,
    /// What happens to it: 0 succeeds, 1 fails in its provider, 2 fails at prepare,
    /// 3 ends at prepare (unchanged), 4 is a two-step operation (a replace).
    fate: u8,
    /// Added before the run (else when the driver's choice says so).
    initial: bool,
    /// Also make this (existing, not yet dispatched) node wait for it.
    make_wait: Option<usize>,
}

fn plan() -> impl Strategy<Value = Plan> {
    let node = (
        proptest::collection::vec(0usize..64, 0..4),
        0usize..3,
        any::<bool>(),
        prop_oneof![6 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8), 1 => Just(3u8), 1 => Just(4u8)],
        prop_oneof![3 => Just(true), 1 => Just(false)],
        proptest::option::weighted(0.2, 0usize..64),
    )
        .prop_map(
            |(deps, provider, journaled, fate, initial, make_wait)| NodeSpec {
                deps,
                provider,
                journaled,
                fate,
                initial,
                make_wait,
            },
        );
    (
        1usize..5,
        0usize..4,
        any::<bool>(),
        proptest::collection::vec(proptest::option::of(1usize..3), 3),
        proptest::collection::vec(node, 1..40),
        proptest::collection::vec(any::<u32>(), 400),
        proptest::option::weighted(0.2, 0usize..200),
        proptest::option::weighted(0.1, 0usize..200),
    )
        .prop_map(
            |(jobs, extra, fail_fast, limits, nodes, choices, interrupt_at, state_error_at)| Plan {
                jobs,
                window: jobs + extra,
                fail_fast,
                limits,
                nodes,
                choices,
                interrupt_at,
                state_error_at,
            },
        )
}

/// Work the driver has in flight, finished in a random order.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Pending {
    Recording(NodeId),
    Calling(NodeId),
    Finishing(NodeId),
    Settling(NodeId, Stop),
}

struct Driver {
    s: Scheduler,
    plan: Plan,
    /// Spec index of each scheduler node.
    spec: Vec<usize>,
    deps: Vec<BTreeSet<NodeId>>,
    pending: Vec<Pending>,
    ended: BTreeMap<NodeId, End>,
    recorded: BTreeSet<NodeId>,
    /// Replaces whose first step is done.
    second_step: BTreeSet<NodeId>,
    next_spec: usize,
    steps: usize,
    /// Children added while their parent ran: child → parent.
    parent_of: BTreeMap<NodeId, NodeId>,
}

impl Driver {
    fn provider(&self, id: NodeId) -> String {
        let spec = &self.plan.nodes[self.spec[id]];
        // A replace's second step goes to another provider.
        let provider = if self.second_step.contains(&id) {
            (spec.provider + 1) % 3
        } else {
            spec.provider
        };
        format!("p{provider}")
    }

    fn end(&mut self, id: NodeId, end: End) {
        self.s.end(id, end).unwrap();
        self.ended_once(id, end);
    }

    fn ended_once(&mut self, id: NodeId, end: End) {
        assert!(
            self.ended.insert(id, end).is_none(),
            "node {id} ended twice (now {end:?})"
        );
        assert_eq!(self.s.state(id), Some(NodeState::Ended(end)));
    }

    fn add_next(&mut self) {
        let index = self.next_spec;
        self.next_spec += 1;
        let spec = self.plan.nodes[index].clone();
        let existing = self.s.len();
        let deps: BTreeSet<NodeId> = if existing == 0 {
            BTreeSet::new()
        } else {
            spec.deps.iter().map(|d| d % existing).collect()
        };
        let list: Vec<NodeId> = deps.iter().copied().collect();
        let id = self.s.add(&list).unwrap();
        self.spec.push(index);
        self.deps.push(deps);
        if let Some(w) = spec.make_wait {
            let waits = w % existing.max(1);
            if waits < id
                && matches!(
                    self.s.state(waits),
                    Some(NodeState::Waiting(_) | NodeState::Ready)
                )
            {
                self.s.depend(waits, id).unwrap();
                self.deps[waits].insert(id);
            }
        }
    }

    fn check_limits(&self) {
        assert!(self.s.jobs_in_use() <= self.plan.jobs);
        // A replace's second operation takes a slot again, over the window if it must.
        let second_steps = self
            .second_step
            .iter()
            .filter(|n| !self.ended.contains_key(n))
            .count();
        // Children are prepared ahead of the window (their parents may hold all of it).
        let children = self
            .parent_of
            .keys()
            .filter(|n| !self.ended.contains_key(n))
            .count();
        assert!(
            self.s.dispatched() <= self.plan.window.max(self.plan.jobs) + second_steps + children
        );
        let finishing = self
            .pending
            .iter()
            .filter(|p| matches!(p, Pending::Finishing(_)))
            .count();
        assert_eq!(finishing, self.s.finishing());
        for (p, limit) in self.plan.limits.iter().enumerate() {
            if let Some(limit) = limit {
                let used = self.s.permits_in_use(&format!("p{p}"));
                assert!(used <= *limit, "p{p}: {used} permits of {limit}");
            }
        }
        let calls = self
            .pending
            .iter()
            .filter(|p| matches!(p, Pending::Calling(_)))
            .count();
        // A parent in its provider lends its job to one child at a time: beyond the jobs, at
        // most one call per such parent.
        let calling: BTreeSet<NodeId> = self
            .pending
            .iter()
            .filter_map(|p| match p {
                Pending::Calling(id) => Some(*id),
                _ => None,
            })
            .collect();
        // (A seat passes up: a child whose parent left keeps borrowing from the grandparent.)
        let nearest_calling_ancestor = |mut n: NodeId| {
            while let Some(&p) = self.parent_of.get(&n) {
                if calling.contains(&p) {
                    return Some(p);
                }
                n = p;
            }
            None
        };
        let lending = calling
            .iter()
            .filter_map(|&c| nearest_calling_ancestor(c))
            .collect::<BTreeSet<_>>()
            .len();
        assert!(self.s.jobs_in_use() <= calls, "{calls} calls");
        assert!(
            calls <= self.s.jobs_in_use() + lending,
            "{calls} calls on {} jobs and {lending} lent",
            self.s.jobs_in_use()
        );
    }

    fn step(&mut self, step: Step) {
        let stopped = self.s.stopped();
        match step {
            Step::Prepare(id) => {
                assert_eq!(stopped, None, "prepared after the stop");
                for d in &self.deps[id] {
                    assert_eq!(
                        self.ended.get(d),
                        Some(&End::Succeeded),
                        "{id} prepared before its dependency {d}"
                    );
                }
                let spec = &self.plan.nodes[self.spec[id]];
                match spec.fate {
                    2 => self.end(id, End::Failed),
                    3 => self.end(id, End::Succeeded),
                    _ => {
                        let (provider, journaled) = (self.provider(id), spec.journaled);
                        self.s.queue(id, Some(&provider), journaled).unwrap();
                    }
                }
            }
            Step::Record(id) => {
                assert_eq!(stopped, None, "recording after the stop");
                assert!(self.plan.nodes[self.spec[id]].journaled || self.second_step.contains(&id));
                self.pending.push(Pending::Recording(id));
            }
            Step::Call(id) => {
                assert_eq!(stopped, None, "called after the stop");
                for d in &self.deps[id] {
                    assert_eq!(self.ended.get(d), Some(&End::Succeeded));
                }
                let spec = &self.plan.nodes[self.spec[id]];
                if spec.journaled || self.second_step.contains(&id) {
                    assert!(self.recorded.remove(&id), "{id} called before its intent");
                }
                self.pending.push(Pending::Calling(id));
            }
            Step::Settle(id, stop) => {
                assert_eq!(stopped, Some(stop));
                self.pending.push(Pending::Settling(id, stop));
            }
            Step::Cancel(id) => {
                let parent = self.parent_of[&id];
                assert!(
                    matches!(self.ended.get(&parent), Some(e) if *e != End::Succeeded),
                    "{id} cancelled although its parent {parent} did not fail"
                );
                self.pending.retain(|p| {
                    !matches!(p, Pending::Recording(n) | Pending::Calling(n) | Pending::Finishing(n) | Pending::Settling(n, _) if *n == id)
                });
                self.recorded.remove(&id);
                let end = match self.s.state(id) {
                    Some(NodeState::Dispatched(Phase::Called | Phase::Finishing)) => {
                        End::Interrupted
                    }
                    _ => End::Skipped(Skip::Parent(parent)),
                };
                self.end(id, end);
            }
            Step::Skipped(id, skip) => {
                if let Skip::Dependency(root) = skip {
                    assert_eq!(self.ended.get(&root), Some(&End::Failed));
                }
                if let Skip::Parent(parent) = skip {
                    // (Or a node waiting on such a child.)
                    assert!(self.parent_of.contains_key(&id) || !self.deps[id].is_empty());
                    assert!(
                        matches!(self.ended.get(&parent), Some(e) if *e != End::Succeeded),
                        "{id} skipped for its parent {parent}, which is {:?} / {:?}",
                        self.ended.get(&parent),
                        self.s.state(parent)
                    );
                }
                self.ended_once(id, End::Skipped(skip));
            }
        }
        self.check_limits();
    }

    fn finish_one(&mut self, choice: u32) {
        let k = choice as usize % self.pending.len();
        let work = self.pending.swap_remove(k);
        match work {
            Pending::Recording(id) => {
                if self.plan.state_error_at == Some(self.steps) {
                    self.s.stop(Stop::StateError);
                    self.end(id, End::Failed);
                } else {
                    self.recorded.insert(id);
                    self.s.recorded(id).unwrap();
                }
            }
            Pending::Calling(id) => {
                let ok = self.plan.nodes[self.spec[id]].fate != 1;
                self.s.answered(id, ok).unwrap();
                assert_eq!(
                    self.s.state(id),
                    Some(NodeState::Dispatched(Phase::Finishing))
                );
                self.pending.push(Pending::Finishing(id));
            }
            Pending::Finishing(id) => {
                let spec = &self.plan.nodes[self.spec[id]];
                if spec.fate == 1 {
                    self.end(id, End::Failed);
                } else if spec.fate == 4 && self.second_step.insert(id) {
                    let provider = self.provider(id);
                    self.s.queue(id, Some(&provider), true).unwrap();
                } else {
                    self.end(id, End::Succeeded);
                }
            }
            Pending::Settling(id, stop) => {
                self.recorded.remove(&id);
                self.end(id, End::Skipped(Skip::NotSent(stop)));
            }
        }
    }

    fn run(&mut self) {
        while self.next_spec < self.plan.nodes.len() && self.plan.nodes[self.next_spec].initial {
            self.add_next();
        }
        let mut interrupted = false;
        loop {
            while let Some(step) = self.s.next_step() {
                self.step(step);
            }
            let choice = self.plan.choices[self.steps % self.plan.choices.len()];
            self.steps += 1;
            if self.plan.interrupt_at == Some(self.steps) && !interrupted {
                interrupted = true;
                self.pending.clear();
                self.recorded.clear();
                for (id, phase) in self.s.interrupt() {
                    let end = match phase {
                        Phase::Called | Phase::Finishing => End::Interrupted,
                        _ => End::Skipped(Skip::NotSent(Stop::Interrupted)),
                    };
                    self.ended_once(id, end);
                }
                self.check_limits();
                continue;
            }
            // Sometimes an operation in its provider asks for a child (or a permit).
            if choice % 7 == 1 {
                let parents: Vec<NodeId> = self
                    .pending
                    .iter()
                    .filter_map(|p| match p {
                        Pending::Calling(id) => Some(*id),
                        _ => None,
                    })
                    .collect();
                if !parents.is_empty() && self.s.len() < 200 {
                    let parent = parents[(choice as usize / 7) % parents.len()];
                    let child = self.s.add_child(parent).unwrap();
                    self.spec
                        .push((choice as usize / 11) % self.plan.nodes.len());
                    self.deps.push(BTreeSet::new());
                    self.parent_of.insert(child, parent);
                    continue;
                }
            }
            // Sometimes a node joins the run now.
            if self.next_spec < self.plan.nodes.len()
                && (choice.is_multiple_of(4) || self.pending.is_empty())
            {
                self.add_next();
                continue;
            }
            if self.pending.is_empty() {
                break;
            }
            self.finish_one(choice / 4);
        }
        assert!(self.s.idle());
        for (id, skip) in self.s.unfinished() {
            match skip {
                Skip::Stopped(_) => assert!(self.s.stopped().is_some()),
                Skip::Cycle => assert!(self.s.stopped().is_none()),
                other => panic!("{id} left unfinished as {other:?}"),
            }
            self.ended_once(id, End::Skipped(skip));
        }
        assert_eq!(self.s.unended(), 0);
        assert_eq!(
            self.ended.len(),
            self.s.len(),
            "every node ends exactly once"
        );
        assert_eq!(self.s.jobs_in_use(), 0);
        assert_eq!(self.s.dispatched(), 0);
        // Dependents of a failure never ran.
        for (id, deps) in self.deps.iter().enumerate() {
            if deps.iter().any(|d| {
                matches!(
                    self.ended[d],
                    End::Failed | End::Skipped(Skip::Dependency(_))
                )
            }) {
                assert!(
                    matches!(self.ended[&id], End::Skipped(_)),
                    "{id} ran although a dependency failed"
                );
            }
        }
        if self.s.stopped() == Some(Stop::FailFast) {
            // (A failed call whose node was then cancelled with its parent ends interrupted.)
            assert!(self
                .ended
                .values()
                .any(|e| matches!(e, End::Failed | End::Interrupted)));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn every_random_run_keeps_the_invariants(plan in plan()) {
        let mut s = Scheduler::new(plan.jobs, plan.window, plan.fail_fast);
        for (p, limit) in plan.limits.iter().enumerate() {
            if let Some(limit) = limit {
                s.set_limit(&format!("p{p}"), *limit);
            }
        }
        let mut driver = Driver {
            s,
            plan,
            spec: Vec::new(),
            deps: Vec::new(),
            pending: Vec::new(),
            ended: BTreeMap::new(),
            recorded: BTreeSet::new(),
            second_step: BTreeSet::new(),
            next_spec: 0,
            steps: 0,
            parent_of: BTreeMap::new(),
        };
        driver.run();
    }
}
