//! The host's side of an operation's progress stream: a sink per operation, handed over with
//! the request or opened from the connection's hub.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::rc::Rc;

use capnp::capability::Rc as CapRc;
use capstan_schema::progress_capnp::{progress_hub, progress_sink};
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

/// The connection's `ProgressHub`: the observers of its running operations, by number, for a
/// provider that opens sinks only when an operation reports something.
#[derive(Default)]
pub(crate) struct Hub {
    running: RefCell<HashMap<u64, Rc<dyn ProgressObserver>>>,
    next: Cell<u64>,
}

impl Hub {
    /// Numbers an operation whose progress goes to `observer`; the number is forgotten when
    /// the returned guard is dropped (the call ended, or was dropped).
    pub(crate) fn register(self: &Rc<Self>, observer: Rc<dyn ProgressObserver>) -> Running {
        let operation = self.next.get() + 1;
        self.next.set(operation);
        self.running.borrow_mut().insert(operation, observer);
        Running {
            hub: self.clone(),
            operation,
        }
    }
}

/// A numbered operation, registered with the hub while it runs.
pub(crate) struct Running {
    hub: Rc<Hub>,
    pub(crate) operation: u64,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.hub.running.borrow_mut().remove(&self.operation);
    }
}

pub(crate) struct HubServer(pub(crate) Rc<Hub>);

impl progress_hub::Server for HubServer {
    async fn open(
        self: CapRc<Self>,
        params: progress_hub::OpenParams,
        mut results: progress_hub::OpenResults,
    ) -> Result<(), capnp::Error> {
        let operation = params.get()?.get_operation();
        let observer = self.0.running.borrow().get(&operation).cloned();
        let Some(observer) = observer else {
            return Err(capnp::Error::failed(format!(
                "operation {operation} is not running on this connection"
            )));
        };
        results
            .get()
            .set_sink(capnp_rpc::new_client(SinkServer { observer }));
        Ok(())
    }
}
