//! The per-operation progress queue and the pump that drains it into the core's `ProgressSink`.
//!
//! Producers (the tracing bridge, the explicit helpers on `Operation`) push into a queue that
//! any thread may touch. One pump task per operation drains it in batches with flow-controlled
//! `push` calls, so while the core is slow the queue fills, and the operation's future is not
//! polled again until the queue has drained below its high-water mark (`Gated`). That is how a
//! slow consumer slows the provider down instead of growing memory.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use capstan_schema::progress_capnp::{progress_hub, progress_sink};
use capstan_schema::ProgressEvent;
use futures::future::LocalBoxFuture;

/// Past this many queued items, the operation waits for the pump.
const HIGH_WATER: usize = 4096;
/// A batch is cut at this many items or bytes, whichever comes first.
const MAX_BATCH_ITEMS: usize = 1024;
const MAX_BATCH_BYTES: usize = 32 * 1024;

pub(crate) struct ProgressQueue {
    state: Mutex<QueueState>,
    next_span: AtomicU64,
}

#[derive(Default)]
struct QueueState {
    items: VecDeque<ProgressEvent>,
    closed: bool,
    pump: Option<Waker>,
    producers: Vec<Waker>,
}

impl ProgressQueue {
    pub(crate) fn new() -> Self {
        ProgressQueue {
            state: Mutex::new(QueueState::default()),
            next_span: AtomicU64::new(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        // A panic while holding this lock cannot leave the queue inconsistent: every critical
        // section is a single push or drain.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh span id for this operation (never 0, never reused).
    pub(crate) fn next_span_id(&self) -> u64 {
        self.next_span.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn push(&self, event: ProgressEvent) {
        let mut state = self.lock();
        if state.closed {
            return;
        }
        state.items.push_back(event);
        if let Some(waker) = state.pump.take() {
            waker.wake();
        }
    }

    /// Ready when the queue is below its high-water mark.
    pub(crate) fn poll_space(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut state = self.lock();
        if state.items.len() < HIGH_WATER || state.closed {
            Poll::Ready(())
        } else {
            if !state.producers.iter().any(|w| w.will_wake(cx.waker())) {
                state.producers.push(cx.waker().clone());
            }
            Poll::Pending
        }
    }

    /// Waits until the queue is below its high-water mark.
    pub(crate) async fn space(&self) {
        futures::future::poll_fn(|cx| self.poll_space(cx)).await
    }

    fn poll_batch(&self, cx: &mut Context<'_>) -> Poll<Option<Vec<ProgressEvent>>> {
        let mut state = self.lock();
        if state.items.is_empty() {
            if state.closed {
                return Poll::Ready(None);
            }
            state.pump = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let mut batch = Vec::with_capacity(state.items.len().min(MAX_BATCH_ITEMS));
        let mut bytes = 0;
        while let Some(event) = state.items.front() {
            if batch.len() == MAX_BATCH_ITEMS || bytes >= MAX_BATCH_BYTES {
                break;
            }
            bytes += event.approximate_size();
            batch.push(state.items.pop_front().expect("front exists"));
        }
        if state.items.len() < HIGH_WATER {
            for waker in state.producers.drain(..) {
                waker.wake();
            }
        }
        Poll::Ready(Some(batch))
    }

    /// No more items will be accepted; the pump drains what is queued and ends.
    pub(crate) fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        if let Some(waker) = state.pump.take() {
            waker.wake();
        }
        for waker in state.producers.drain(..) {
            waker.wake();
        }
    }
}

/// Where an operation's progress goes: the sink its request carried, or one opened from the
/// connection's hub (`ProgressHub.open`) when the operation first has something to send, so
/// an operation that reports nothing makes no capability at all.
pub(crate) enum SinkSource {
    Given(progress_sink::Client),
    Hub {
        hub: progress_hub::Client,
        operation: u64,
    },
}

type OpenCall = capnp::capability::Promise<
    capnp::capability::Response<progress_hub::open_results::Owned>,
    capnp::Error,
>;

/// An operation's stream, its sink opened on first use.
struct Stream {
    source: SinkSource,
    /// The `open` call, kept until the stream ends (its pipeline carries the sink).
    opening: Option<OpenCall>,
}

impl Stream {
    fn new(source: SinkSource) -> Self {
        Stream {
            source,
            opening: None,
        }
    }

    /// The sink, opened now if it comes from the hub and was not opened yet. The first
    /// `push` is pipelined on the `open` call: opening costs no round trip of its own.
    fn sink(&mut self) -> progress_sink::Client {
        let sink = match &self.source {
            SinkSource::Given(sink) => return sink.clone(),
            SinkSource::Hub { hub, operation } => {
                let mut request = hub.open_request();
                request.get().set_operation(*operation);
                let capnp::capability::RemotePromise { promise, pipeline } = request.send();
                self.opening = Some(promise);
                pipeline.get_sink()
            }
        };
        self.source = SinkSource::Given(sink.clone());
        sink
    }

    /// `finish()` on the sink (opened for it if need be); an error from `open` wins, as the
    /// one that says why.
    async fn finish(mut self) -> Result<(), capnp::Error> {
        let finished = self.sink().finish_request().send().promise.await;
        if let Some(opening) = self.opening.take() {
            opening.await?;
        }
        finished.map(drop)
    }
}

/// Drains `queue` into the operation's sink until the queue is closed and empty, then calls
/// `finish()` — always, as `progress.capnp` asks: also when nothing was reported, and after a
/// failed push (a host may wait for `finish()` before it takes the result). The one
/// exception: when the core said `finish()` is optional for a silent operation
/// (`silent_finish_optional`) and nothing was pushed, the call is skipped — a round trip per
/// operation, a fifth of the throughput of no-op operations — and a sink from the hub is
/// never opened. Returns the first error the stream hit; after an error it keeps draining
/// (and discarding) so producers never wait on a dead stream.
pub(crate) async fn pump(
    queue: Arc<ProgressQueue>,
    source: SinkSource,
    silent_finish_optional: bool,
) -> Result<(), capnp::Error> {
    let mut stream = Stream::new(source);
    let mut failure = None;
    let mut pushed = false;
    while let Some(batch) = futures::future::poll_fn(|cx| queue.poll_batch(cx)).await {
        if failure.is_some() {
            continue;
        }
        pushed = true;
        let mut request = stream.sink().push_request();
        {
            let mut items = request.get().init_items(batch.len() as u32);
            for (n, event) in batch.iter().enumerate() {
                event.write(items.reborrow().get(n as u32));
            }
        }
        if let Err(e) = request.send().await {
            failure = Some(e);
        }
    }
    if !pushed && silent_finish_optional {
        return Ok(());
    }
    let finished = stream.finish().await;
    match (failure, finished) {
        (Some(e), _) | (None, Err(e)) => Err(e),
        (None, Ok(())) => Ok(()),
    }
}

/// Ends the stream of an operation refused before it ran (a type the provider does not serve,
/// a provider shutting down): `finish()`, as for any other, unless the core made it optional
/// for an operation that pushed nothing. Its own error is not the operation's: ignored.
pub(crate) async fn finish_unstarted(source: SinkSource, silent_finish_optional: bool) {
    if !silent_finish_optional {
        let _ = Stream::new(source).finish().await;
    }
}

/// Polls the operation's future only while its progress queue has room.
pub(crate) struct Gated<T> {
    inner: LocalBoxFuture<'static, T>,
    queue: Arc<ProgressQueue>,
}

impl<T> Gated<T> {
    pub(crate) fn new(inner: LocalBoxFuture<'static, T>, queue: Arc<ProgressQueue>) -> Self {
        Gated { inner, queue }
    }
}

impl<T> Future for Gated<T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        if self.queue.poll_space(cx).is_pending() {
            return Poll::Pending;
        }
        self.inner.as_mut().poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capstan_schema::ProgressKind;

    fn phase(n: usize) -> ProgressEvent {
        ProgressEvent::now(ProgressKind::Phase {
            span: 0,
            name: format!("p{n}"),
        })
    }

    #[test]
    fn batches_keep_order_and_respect_their_limits() {
        let queue = ProgressQueue::new();
        let total = 3 * MAX_BATCH_ITEMS;
        for n in 0..total {
            queue.push(phase(n));
        }
        queue.close();
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut seen = Vec::new();
        let mut batches = 0;
        while let Poll::Ready(Some(batch)) = queue.poll_batch(&mut cx) {
            batches += 1;
            assert!(batch.len() <= MAX_BATCH_ITEMS);
            let bytes: usize = batch.iter().map(|e| e.approximate_size()).sum();
            let last = batch.last().unwrap().approximate_size();
            assert!(
                bytes - last < MAX_BATCH_BYTES,
                "cut once over the byte limit"
            );
            seen.extend(batch.into_iter().map(|e| match e.kind {
                ProgressKind::Phase { name, .. } => name,
                _ => unreachable!(),
            }));
        }
        assert!(batches >= 3);
        let expected: Vec<String> = (0..total).map(|n| format!("p{n}")).collect();
        assert_eq!(seen, expected, "nothing lost, nothing reordered");
    }

    #[test]
    fn a_full_queue_holds_producers_until_drained() {
        let queue = ProgressQueue::new();
        for n in 0..HIGH_WATER {
            queue.push(phase(n));
        }
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(queue.poll_space(&mut cx).is_pending());
        let _ = queue.poll_batch(&mut cx);
        assert!(queue.poll_space(&mut cx).is_ready());
    }
}
