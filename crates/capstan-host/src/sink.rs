//! The host's side of an operation's progress stream.

use std::future::Future;
use std::rc::Rc;

use capnp::capability::Rc as CapRc;
use capstan_schema::progress_capnp::progress_sink;
use capstan_schema::ProgressEvent;
use futures::future::LocalBoxFuture;
use futures::FutureExt;

/// Receives an operation's progress, batch by batch, in order. The future it returns is
/// awaited before the next batch is read, so a slow observer slows the provider down (through
/// the stream's flow-control window) instead of growing memory.
pub trait ProgressObserver {
    fn observe(&self, events: Vec<ProgressEvent>) -> LocalBoxFuture<'static, ()>;
}

impl<F, Fut> ProgressObserver for F
where
    F: Fn(Vec<ProgressEvent>) -> Fut,
    Fut: Future<Output = ()> + 'static,
{
    fn observe(&self, events: Vec<ProgressEvent>) -> LocalBoxFuture<'static, ()> {
        self(events).boxed_local()
    }
}

/// An observer that drops everything.
pub fn ignore_progress() -> Rc<dyn ProgressObserver> {
    Rc::new(|_events: Vec<ProgressEvent>| async {})
}

pub(crate) struct SinkServer {
    pub(crate) observer: Rc<dyn ProgressObserver>,
}

impl progress_sink::Server for SinkServer {
    async fn push(
        self: CapRc<Self>,
        params: progress_sink::PushParams,
    ) -> Result<(), capnp::Error> {
        let items = params.get()?.get_items()?;
        let mut events = Vec::with_capacity(items.len() as usize);
        for item in items {
            if let Some(event) = ProgressEvent::read(item)? {
                events.push(event);
            }
        }
        self.observer.observe(events).await;
        Ok(())
    }

    async fn finish(
        self: CapRc<Self>,
        _params: progress_sink::FinishParams,
        _results: progress_sink::FinishResults,
    ) -> Result<(), capnp::Error> {
        Ok(())
    }
}
