//! The run's state machine on its own: every rule of ordering, limits, failure, stopping and
//! interrupting, with nodes added before and during the run. No providers, no journal: the
//! test plays the driver.

use capstan_engine::scheduler::{End, NodeId, NodeState, Phase, Scheduler, Skip, Step, Stop};

/// Every step handed out now, in order.
fn drain(s: &mut Scheduler) -> Vec<Step> {
    std::iter::from_fn(|| s.next_step()).collect()
}

/// Takes `id` from `Prepare` through its call (journaled), as a driver would.
fn call(s: &mut Scheduler, id: NodeId, provider: &str) -> Vec<Step> {
    s.queue(id, Some(provider), true).unwrap();
    let mut steps = drain(s);
    if steps.contains(&Step::Record(id)) {
        s.recorded(id).unwrap();
        steps.extend(drain(s));
    }
    steps
}

fn chain(s: &mut Scheduler, n: usize) -> Vec<NodeId> {
    let mut ids: Vec<NodeId> = Vec::new();
    for _ in 0..n {
        let deps: Vec<NodeId> = ids.last().copied().into_iter().collect();
        ids.push(s.add(&deps).unwrap());
    }
    ids
}

#[test]
fn a_node_is_prepared_only_once_its_dependencies_succeeded() {
    let mut s = Scheduler::new(4, 32, false);
    let ids = chain(&mut s, 3);
    assert_eq!(drain(&mut s), vec![Step::Prepare(ids[0])]);
    assert_eq!(
        call(&mut s, ids[0], "p"),
        vec![Step::Record(ids[0]), Step::Call(ids[0])]
    );
    s.answered(ids[0], true).unwrap();
    // Answered, but not yet ended (its result is being journaled): the next still waits.
    assert_eq!(drain(&mut s), vec![]);
    assert_eq!(s.state(ids[1]), Some(NodeState::Waiting(1)));
    s.end(ids[0], End::Succeeded).unwrap();
    assert_eq!(drain(&mut s), vec![Step::Prepare(ids[1])]);
    // Ended at prepare (unchanged): its dependent goes on.
    s.end(ids[1], End::Succeeded).unwrap();
    assert_eq!(drain(&mut s), vec![Step::Prepare(ids[2])]);
    s.end(ids[2], End::Succeeded).unwrap();
    assert!(s.idle());
    assert_eq!(s.unfinished(), vec![]);
    assert_eq!(s.unended(), 0);
}

#[test]
fn the_global_job_limit_holds_and_frees_on_answer_not_on_end() {
    let mut s = Scheduler::new(2, 16, false);
    let ids: Vec<NodeId> = (0..5).map(|_| s.add(&[]).unwrap()).collect();
    assert_eq!(drain(&mut s).len(), 5);
    let mut calls = Vec::new();
    for &id in &ids {
        for step in call(&mut s, id, "p") {
            if let Step::Call(n) = step {
                calls.push(n);
            }
        }
    }
    assert_eq!(calls, vec![ids[0], ids[1]]);
    assert_eq!(s.jobs_in_use(), 2);
    s.answered(ids[0], true).unwrap();
    // The job is free while the first one's result is journaled.
    assert_eq!(drain(&mut s), vec![Step::Call(ids[2])]);
    assert_eq!(s.jobs_in_use(), 2);
}

#[test]
fn a_provider_limit_holds_from_its_intent_until_its_answer_without_holding_jobs() {
    let mut s = Scheduler::new(4, 16, false);
    s.set_limit("slow", 1);
    let a = s.add(&[]).unwrap();
    let b = s.add(&[]).unwrap();
    let c = s.add(&[]).unwrap();
    drain(&mut s);
    s.queue(a, Some("slow"), true).unwrap();
    s.queue(b, Some("slow"), true).unwrap();
    s.queue(c, Some("fast"), true).unwrap();
    // One intent for `slow` at a time; `fast` is not held up behind it.
    assert_eq!(drain(&mut s), vec![Step::Record(c), Step::Record(a)]);
    s.recorded(a).unwrap();
    assert_eq!(drain(&mut s), vec![Step::Call(a)]);
    assert_eq!(s.permits_in_use("slow"), 1);
    assert_eq!(s.state(b), Some(NodeState::Dispatched(Phase::Queued)));
    s.answered(a, false).unwrap();
    assert_eq!(s.permits_in_use("slow"), 0);
    assert_eq!(drain(&mut s), vec![Step::Record(b)]);
    assert_eq!(s.permits_in_use("slow"), 1);
}

#[test]
fn reads_need_no_intent() {
    let mut s = Scheduler::new(1, 8, false);
    let a = s.add(&[]).unwrap();
    drain(&mut s);
    s.queue(a, Some("p"), false).unwrap();
    assert_eq!(drain(&mut s), vec![Step::Call(a)]);
}

#[test]
fn the_dispatch_window_bounds_what_is_prepared() {
    let mut s = Scheduler::new(1, 3, false);
    for _ in 0..10 {
        s.add(&[]).unwrap();
    }
    assert_eq!(drain(&mut s).len(), 3);
    assert_eq!(s.dispatched(), 3);
    s.end(0, End::Succeeded).unwrap();
    assert_eq!(drain(&mut s), vec![Step::Prepare(3)]);
}

#[test]
fn a_failure_skips_everything_that_depends_on_it_and_nothing_else() {
    let mut s = Scheduler::new(4, 32, false);
    let a = s.add(&[]).unwrap();
    let b = s.add(&[a]).unwrap();
    let c = s.add(&[b]).unwrap();
    let d = s.add(&[]).unwrap();
    let e = s.add(&[a, d]).unwrap();
    assert_eq!(drain(&mut s), vec![Step::Prepare(a), Step::Prepare(d)]);
    s.end(a, End::Failed).unwrap();
    let mut skipped = drain(&mut s);
    skipped.sort_by_key(|s| format!("{s:?}"));
    assert_eq!(
        skipped,
        vec![
            Step::Skipped(b, Skip::Dependency(a)),
            Step::Skipped(c, Skip::Dependency(a)),
            Step::Skipped(e, Skip::Dependency(a)),
        ]
    );
    // d is independent and goes on.
    s.end(d, End::Succeeded).unwrap();
    assert_eq!(s.state(d), Some(NodeState::Ended(End::Succeeded)));
    assert!(s.idle());
    assert_eq!(s.unfinished(), vec![]);
    assert_eq!(s.unended(), 0);
}

#[test]
fn fail_fast_settles_what_was_recorded_drops_what_was_queued_and_lets_calls_finish() {
    let mut s = Scheduler::new(2, 16, true);
    s.set_limit("p", 1);
    let [a, b, c, d, e] = [(); 5].map(|_| s.add(&[]).unwrap());
    let later = s.add(&[a]).unwrap();
    drain(&mut s);
    call(&mut s, a, "q");
    call(&mut s, b, "q");
    // c: recorded, waiting for a job; e likewise, holding p's permit; d queued for it.
    call(&mut s, c, "q");
    call(&mut s, e, "p");
    s.queue(d, Some("p"), true).unwrap();
    assert_eq!(s.state(c), Some(NodeState::Dispatched(Phase::Recorded)));
    assert_eq!(s.state(e), Some(NodeState::Dispatched(Phase::Recorded)));
    // a's call fails: nothing else may be sent, though a's job is free now.
    s.answered(a, false).unwrap();
    assert_eq!(s.stopped(), Some(Stop::FailFast));
    let steps = drain(&mut s);
    assert!(
        steps.contains(&Step::Settle(c, Stop::FailFast)),
        "{steps:?}"
    );
    assert!(
        steps.contains(&Step::Settle(e, Stop::FailFast)),
        "{steps:?}"
    );
    assert!(
        steps.contains(&Step::Skipped(d, Skip::NotSent(Stop::FailFast))),
        "{steps:?}"
    );
    assert!(!steps
        .iter()
        .any(|s| matches!(s, Step::Call(_) | Step::Prepare(_))));
    s.end(c, End::Skipped(Skip::NotSent(Stop::FailFast)))
        .unwrap();
    s.end(e, End::Skipped(Skip::NotSent(Stop::FailFast)))
        .unwrap();
    s.end(a, End::Failed).unwrap();
    assert_eq!(
        drain(&mut s),
        vec![Step::Skipped(later, Skip::Dependency(a))]
    );
    // b was in its provider: it finishes.
    s.answered(b, true).unwrap();
    s.end(b, End::Succeeded).unwrap();
    assert!(s.idle());
    assert_eq!(s.unfinished(), vec![]);
    assert_eq!(s.unended(), 0);
}

#[test]
fn fail_fast_skips_what_never_started_with_the_reason() {
    let mut s = Scheduler::new(1, 1, true);
    let a = s.add(&[]).unwrap();
    let b = s.add(&[]).unwrap();
    drain(&mut s);
    s.end(a, End::Failed).unwrap();
    assert_eq!(drain(&mut s), vec![]);
    assert!(s.idle());
    assert_eq!(s.unfinished(), vec![(b, Skip::Stopped(Stop::FailFast))]);
}

#[test]
fn an_intent_recorded_after_the_stop_is_settled_not_sent() {
    let mut s = Scheduler::new(2, 16, false);
    let a = s.add(&[]).unwrap();
    drain(&mut s);
    s.queue(a, None, true).unwrap();
    assert_eq!(drain(&mut s), vec![Step::Record(a)]);
    s.stop(Stop::StateError);
    s.recorded(a).unwrap();
    assert_eq!(drain(&mut s), vec![Step::Settle(a, Stop::StateError)]);

    // A node prepared before the stop and queued after it is not sent.
    let mut s = Scheduler::new(2, 16, false);
    let b = s.add(&[]).unwrap();
    drain(&mut s);
    s.stop(Stop::StateError);
    s.queue(b, Some("p"), true).unwrap();
    assert_eq!(
        drain(&mut s),
        vec![Step::Skipped(b, Skip::NotSent(Stop::StateError))]
    );
}

#[test]
fn an_interrupt_ends_every_dispatched_node_by_its_phase() {
    let mut s = Scheduler::new(2, 16, false);
    s.set_limit("one", 1);
    let [called, finishing, recorded, recording, queued, preparing] =
        [(); 6].map(|_| s.add(&[]).unwrap());
    let dependent = s.add(&[called]).unwrap();
    drain(&mut s);
    call(&mut s, finishing, "p");
    s.answered(finishing, true).unwrap();
    call(&mut s, called, "p");
    call(&mut s, recorded, "p");
    s.queue(recording, Some("one"), true).unwrap();
    s.queue(queued, Some("one"), true).unwrap();
    drain(&mut s);
    assert_eq!(
        s.state(recorded),
        Some(NodeState::Dispatched(Phase::Called))
    );
    let mut cut = s.interrupt();
    cut.sort_by_key(|(n, _)| *n);
    assert_eq!(
        cut,
        vec![
            (called, Phase::Called),
            (finishing, Phase::Finishing),
            (recorded, Phase::Called),
            (recording, Phase::Recording),
            (queued, Phase::Queued),
            (preparing, Phase::Preparing),
        ]
    );
    assert_eq!(s.state(called), Some(NodeState::Ended(End::Interrupted)));
    assert_eq!(s.state(finishing), Some(NodeState::Ended(End::Interrupted)));
    assert_eq!(
        s.state(recording),
        Some(NodeState::Ended(End::Skipped(Skip::NotSent(
            Stop::Interrupted
        ))))
    );
    assert_eq!(drain(&mut s), vec![]);
    assert!(s.idle());
    assert_eq!(
        s.unfinished(),
        vec![(dependent, Skip::Stopped(Stop::Interrupted))]
    );
    assert_eq!(s.unended(), 0);
    assert_eq!(s.jobs_in_use(), 0);
    assert_eq!(s.permits_in_use("one"), 0);
}

#[test]
fn nodes_added_mid_run_wait_for_running_nodes_and_start_after_done_ones() {
    let mut s = Scheduler::new(2, 16, false);
    let a = s.add(&[]).unwrap();
    let b = s.add(&[]).unwrap();
    drain(&mut s);
    call(&mut s, a, "p");
    s.answered(a, true).unwrap();
    s.end(a, End::Succeeded).unwrap();
    call(&mut s, b, "p");
    // On a done node: ready at once. On a running one: waits.
    let after_a = s.add(&[a]).unwrap();
    let after_b = s.add(&[a, b]).unwrap();
    assert_eq!(s.state(after_b), Some(NodeState::Waiting(1)));
    assert_eq!(drain(&mut s), vec![Step::Prepare(after_a)]);
    // A node whose dependent already exists: `after_b` now waits for it too.
    let first = s.add(&[]).unwrap();
    s.depend(after_b, first).unwrap();
    assert_eq!(s.state(after_b), Some(NodeState::Waiting(2)));
    assert_eq!(drain(&mut s), vec![Step::Prepare(first)]);
    s.answered(b, true).unwrap();
    s.end(b, End::Succeeded).unwrap();
    assert_eq!(drain(&mut s), vec![]);
    s.end(first, End::Succeeded).unwrap();
    assert_eq!(drain(&mut s), vec![Step::Prepare(after_b)]);
    // A dispatched node cannot be made to wait; a node must exist to be waited for.
    assert!(s.depend(after_b, a).is_err());
    assert!(s.add(&[999]).is_err());
}

#[test]
fn a_ready_node_made_to_wait_is_not_dispatched_until_its_new_dependency_is_done() {
    let mut s = Scheduler::new(1, 1, false);
    let a = s.add(&[]).unwrap();
    let b = s.add(&[]).unwrap();
    assert_eq!(drain(&mut s), vec![Step::Prepare(a)]);
    assert_eq!(s.state(b), Some(NodeState::Ready));
    let c = s.add(&[]).unwrap();
    s.depend(b, c).unwrap();
    s.end(a, End::Succeeded).unwrap();
    assert_eq!(drain(&mut s), vec![Step::Prepare(c)]);
    s.end(c, End::Succeeded).unwrap();
    assert_eq!(drain(&mut s), vec![Step::Prepare(b)]);
}

#[test]
fn a_node_added_on_a_failed_one_is_skipped_and_limits_apply_to_new_nodes() {
    let mut s = Scheduler::new(1, 16, true);
    let a = s.add(&[]).unwrap();
    let b = s.add(&[]).unwrap();
    drain(&mut s);
    call(&mut s, a, "p");
    // Added while a runs: it waits for the one job like anyone.
    let c = s.add(&[]).unwrap();
    assert_eq!(drain(&mut s), vec![Step::Prepare(c)]);
    call(&mut s, c, "p");
    assert_eq!(s.state(c), Some(NodeState::Dispatched(Phase::Recorded)));
    s.answered(a, false).unwrap();
    s.end(a, End::Failed).unwrap();
    let late = s.add(&[a]).unwrap();
    let steps = drain(&mut s);
    assert!(
        steps.contains(&Step::Settle(c, Stop::FailFast)),
        "{steps:?}"
    );
    assert!(
        steps.contains(&Step::Skipped(late, Skip::Dependency(a))),
        "{steps:?}"
    );
    s.end(c, End::Skipped(Skip::NotSent(Stop::FailFast)))
        .unwrap();
    // b was prepared but not yet queued: queued now, it is not sent.
    s.queue(b, Some("p"), true).unwrap();
    assert_eq!(
        drain(&mut s),
        vec![Step::Skipped(b, Skip::NotSent(Stop::FailFast))]
    );
    assert!(s.idle());
    assert_eq!(s.unended(), 0);
}

#[test]
fn a_cycle_is_reported_when_nothing_else_can_run() {
    let mut s = Scheduler::new(2, 16, false);
    let a = s.add(&[]).unwrap();
    let b = s.add(&[a]).unwrap();
    s.depend(a, b).unwrap();
    let c = s.add(&[]).unwrap();
    assert_eq!(drain(&mut s), vec![Step::Prepare(c)]);
    s.end(c, End::Succeeded).unwrap();
    assert!(s.idle());
    assert_eq!(s.unfinished(), vec![(a, Skip::Cycle), (b, Skip::Cycle)]);
}

#[test]
fn a_replace_queues_its_second_operation_under_the_new_providers_limit() {
    let mut s = Scheduler::new(2, 16, false);
    s.set_limit("new", 1);
    let a = s.add(&[]).unwrap();
    let other = s.add(&[]).unwrap();
    drain(&mut s);
    call(&mut s, other, "new");
    call(&mut s, a, "old");
    s.answered(a, true).unwrap();
    s.queue(a, Some("new"), true).unwrap();
    assert_eq!(drain(&mut s), vec![]);
    s.answered(other, true).unwrap();
    assert_eq!(drain(&mut s), vec![Step::Record(a)]);
}

#[test]
fn misuse_is_an_error_not_a_panic() {
    let mut s = Scheduler::new(1, 1, false);
    let a = s.add(&[]).unwrap();
    assert!(s.recorded(a).is_err());
    assert!(s.answered(a, true).is_err());
    assert!(s.end(a, End::Succeeded).is_err());
    assert!(s.queue(7, None, true).is_err());
    assert!(s.depend(a, 7).is_err());
}

/// A parent in its provider, with one job of one (the case that would deadlock).
fn parent_called(s: &mut Scheduler) -> NodeId {
    let p = s.add(&[]).unwrap();
    drain(s);
    call(s, p, "p");
    assert_eq!(s.state(p), Some(NodeState::Dispatched(Phase::Called)));
    p
}

#[test]
fn a_child_borrows_its_waiting_parents_seat_one_at_a_time() {
    let mut s = Scheduler::new(1, 1, false);
    s.set_limit("p", 1);
    let p = parent_called(&mut s);
    assert_eq!((s.jobs_in_use(), s.permits_in_use("p")), (1, 1));
    // Children are prepared although the window (1) is full.
    let a = s.add_child(p).unwrap();
    let b = s.add_child(p).unwrap();
    assert_eq!(drain(&mut s), vec![Step::Prepare(a), Step::Prepare(b)]);
    s.queue(a, Some("p"), true).unwrap();
    s.queue(b, Some("p"), true).unwrap();
    // a takes the parent's seat (its job and its provider's permit); b waits for it.
    assert_eq!(drain(&mut s), vec![Step::Record(a)]);
    s.recorded(a).unwrap();
    assert_eq!(drain(&mut s), vec![Step::Call(a)]);
    assert_eq!((s.jobs_in_use(), s.permits_in_use("p")), (1, 1));
    s.answered(a, true).unwrap();
    s.end(a, End::Succeeded).unwrap();
    assert_eq!(drain(&mut s), vec![Step::Record(b)]);
    s.recorded(b).unwrap();
    assert_eq!(drain(&mut s), vec![Step::Call(b)]);
    s.answered(b, true).unwrap();
    s.end(b, End::Succeeded).unwrap();
    s.answered(p, true).unwrap();
    s.end(p, End::Succeeded).unwrap();
    assert_eq!((s.jobs_in_use(), s.permits_in_use("p")), (0, 0));
    assert!(s.idle());
    assert_eq!(s.unended(), 0);
}

#[test]
fn a_child_of_another_provider_borrows_only_the_job() {
    let mut s = Scheduler::new(1, 1, false);
    s.set_limit("q", 1);
    let p = parent_called(&mut s);
    let c = s.add_child(p).unwrap();
    drain(&mut s);
    s.queue(c, Some("q"), false).unwrap();
    // Its own provider's permit, the parent's job.
    assert_eq!(drain(&mut s), vec![Step::Call(c)]);
    assert_eq!((s.jobs_in_use(), s.permits_in_use("q")), (1, 1));
    s.answered(c, true).unwrap();
    assert_eq!((s.jobs_in_use(), s.permits_in_use("q")), (1, 0));
}

#[test]
fn a_parent_that_leaves_its_provider_hands_its_seat_to_the_child_on_it() {
    // (A window of 2: the child holds a slot of it.)
    let mut s = Scheduler::new(1, 2, false);
    let p = parent_called(&mut s);
    let c = s.add_child(p).unwrap();
    drain(&mut s);
    s.queue(c, Some("p"), false).unwrap();
    assert_eq!(drain(&mut s), vec![Step::Call(c)]);
    s.answered(p, true).unwrap();
    s.end(p, End::Succeeded).unwrap();
    // The child still runs on that job: nothing else may take it.
    assert_eq!(s.jobs_in_use(), 1);
    let other = s.add(&[]).unwrap();
    drain(&mut s);
    s.queue(other, Some("p"), false).unwrap();
    assert_eq!(drain(&mut s), vec![]);
    s.answered(c, true).unwrap();
    assert_eq!(drain(&mut s), vec![Step::Call(other)]);
    assert_eq!(s.jobs_in_use(), 1);
}

#[test]
fn children_are_skipped_or_cancelled_when_their_parent_fails() {
    let mut s = Scheduler::new(2, 4, false);
    let p = parent_called(&mut s);
    let running = s.add_child(p).unwrap();
    let waiting = s.add_child(p).unwrap();
    assert_eq!(
        drain(&mut s),
        vec![Step::Prepare(running), Step::Prepare(waiting)]
    );
    s.queue(running, Some("p"), false).unwrap();
    assert_eq!(drain(&mut s), vec![Step::Call(running)]);
    let late = s.add_child(p).unwrap();
    s.answered(p, false).unwrap();
    s.end(p, End::Failed).unwrap();
    let steps = drain(&mut s);
    assert!(steps.contains(&Step::Cancel(running)), "{steps:?}");
    assert!(steps.contains(&Step::Cancel(waiting)), "{steps:?}");
    assert!(
        steps.contains(&Step::Skipped(late, Skip::Parent(p))),
        "{steps:?}"
    );
    s.end(running, End::Interrupted).unwrap();
    s.end(waiting, End::Skipped(Skip::Parent(p))).unwrap();
    assert!(s.idle());
    assert_eq!(s.unended(), 0);
    assert_eq!(s.jobs_in_use(), 0);
    // Only a running node takes children.
    assert!(s.add_child(p).is_err());
}

#[test]
fn a_child_asked_for_after_the_run_stopped_is_skipped_at_once() {
    let mut s = Scheduler::new(2, 4, true);
    let p = parent_called(&mut s);
    let other = s.add(&[]).unwrap();
    drain(&mut s);
    s.queue(other, None, false).unwrap();
    assert_eq!(drain(&mut s), vec![Step::Call(other)]);
    s.answered(other, false).unwrap();
    assert_eq!(s.stopped(), Some(Stop::FailFast));
    // The parent still runs, but nothing new may start: its child is skipped, not left
    // waiting for a dispatch that never comes.
    let c = s.add_child(p).unwrap();
    assert_eq!(
        drain(&mut s),
        vec![Step::Skipped(c, Skip::Stopped(Stop::FailFast))]
    );
}

#[test]
fn a_stop_skips_children_not_yet_prepared() {
    let mut s = Scheduler::new(2, 4, false);
    let p = parent_called(&mut s);
    let c = s.add_child(p).unwrap();
    s.stop(Stop::StateError);
    assert_eq!(
        drain(&mut s),
        vec![Step::Skipped(c, Skip::Stopped(Stop::StateError))]
    );
}

/// One job, held by a parent `p` in its provider; `y` holds the only permit of `u` and waits
/// for a job; `p`'s child `c` needs `u` and takes y's permit. Returns (p, y, c).
fn child_takes_a_waiting_nodes_permit(s: &mut Scheduler) -> (NodeId, NodeId, NodeId) {
    s.set_limit("u", 1);
    let p = s.add(&[]).unwrap();
    let y = s.add(&[]).unwrap();
    drain(s);
    call(s, p, "t");
    s.queue(y, Some("u"), true).unwrap();
    assert_eq!(drain(s), vec![Step::Record(y)]);
    s.recorded(y).unwrap();
    assert_eq!(s.state(y), Some(NodeState::Dispatched(Phase::Recorded)));
    let c = s.add_child(p).unwrap();
    assert_eq!(drain(s), vec![Step::Prepare(c)]);
    s.queue(c, Some("u"), false).unwrap();
    assert_eq!(drain(s), vec![Step::Call(c)]);
    (p, y, c)
}

#[test]
fn a_child_stuck_on_a_full_provider_takes_the_permit_of_a_node_waiting_for_a_job() {
    // Without taking y's permit, each would wait on another.
    let mut s = Scheduler::new(1, 4, false);
    let (p, y, c) = child_takes_a_waiting_nodes_permit(&mut s);
    assert_eq!(s.permits_in_use("u"), 1);
    s.answered(c, true).unwrap();
    s.end(c, End::Succeeded).unwrap();
    s.answered(p, true).unwrap();
    s.end(p, End::Succeeded).unwrap();
    // y gets the permit back and is called, with no second intent.
    assert_eq!(drain(&mut s), vec![Step::Call(y)]);
}

#[test]
fn a_grandchild_borrows_the_seat_its_parent_borrowed() {
    let mut s = Scheduler::new(1, 1, false);
    s.set_limit("t", 1);
    let gp = parent_called(&mut s);
    let c = s.add_child(gp).unwrap();
    drain(&mut s);
    s.queue(c, Some("t"), false).unwrap();
    assert_eq!(drain(&mut s), vec![Step::Call(c)]);
    let g = s.add_child(c).unwrap();
    drain(&mut s);
    s.queue(g, Some("t"), false).unwrap();
    assert_eq!(drain(&mut s), vec![Step::Call(g)]);
    assert_eq!((s.jobs_in_use(), s.permits_in_use("t")), (1, 1));
}

#[test]
fn a_node_that_gave_its_permit_to_a_child_is_settled_not_forgotten_on_a_stop() {
    let mut s = Scheduler::new(1, 4, false);
    let (_, y, _) = child_takes_a_waiting_nodes_permit(&mut s);
    assert_eq!(s.state(y), Some(NodeState::Dispatched(Phase::Queued)));
    s.stop(Stop::StateError);
    // Its intent is durable: settled, not skipped as if never recorded.
    assert_eq!(drain(&mut s), vec![Step::Settle(y, Stop::StateError)]);
}
