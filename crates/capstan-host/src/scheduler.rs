//! The `Scheduler` and `Permit` capabilities a running operation is given: the host serves them
//! over Cap'n Proto and hands each request to whoever runs the operation, through
//! [`RunRequests`]. The host decides nothing here; the run (the engine's driver) does.

use std::cell::RefCell;
use std::rc::Rc;

use capstan_schema::provider_capnp::{permit, scheduler};
use capstan_schema::{Json, OperationError};
use futures::future::LocalBoxFuture;

/// A child resource a provider asks for while its operation runs (`Scheduler.child`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChildRequest {
    /// Its name under the operation's address.
    pub name: String,
    pub provider: String,
    pub resource_type: String,
    /// JSON text, as it came.
    pub inputs: String,
}

/// A job slot the run lent a provider; the run takes it back when this is dropped (the
/// provider called `release`, dropped its `Permit`, or its connection closed).
pub type PermitGuard = Box<dyn std::any::Any>;

/// What a running operation may ask of the run that called it.
pub trait RunRequests {
    /// Makes (or keeps) a child resource and answers with its outputs, or why not.
    fn child(&self, request: ChildRequest)
        -> LocalBoxFuture<'static, Result<Json, OperationError>>;

    /// Waits for a job slot; holding the guard holds the slot.
    fn permit(&self) -> LocalBoxFuture<'static, Result<PermitGuard, OperationError>>;
}

/// The `Scheduler` capability for one operation, served over `requests`.
pub(crate) fn scheduler_client(requests: Rc<dyn RunRequests>) -> scheduler::Client {
    capnp_rpc::new_client(SchedulerServer { requests })
}

struct SchedulerServer {
    requests: Rc<dyn RunRequests>,
}

impl scheduler::Server for SchedulerServer {
    async fn child(
        self: capnp::capability::Rc<Self>,
        params: scheduler::ChildParams,
        mut results: scheduler::ChildResults,
    ) -> Result<(), capnp::Error> {
        let request = params.get()?.get_request()?;
        let request = ChildRequest {
            name: request.get_name()?.to_string()?,
            provider: request.get_provider()?.to_string()?,
            resource_type: request.get_resource_type()?.to_string()?,
            inputs: request.get_inputs()?.to_string()?,
        };
        let result = self.requests.child(request).await;
        let out = results.get().init_result();
        match result {
            Ok(outputs) => out.init_success().set_outputs(outputs.text()),
            Err(error) => error.write(out.init_failure()),
        }
        Ok(())
    }

    async fn permit(
        self: capnp::capability::Rc<Self>,
        _: scheduler::PermitParams,
        mut results: scheduler::PermitResults,
    ) -> Result<(), capnp::Error> {
        match self.requests.permit().await {
            Ok(guard) => {
                results
                    .get()
                    .set_permit(capnp_rpc::new_client(PermitServer {
                        guard: RefCell::new(Some(guard)),
                    }));
                Ok(())
            }
            Err(error) => Err(capnp::Error::failed(error.message)),
        }
    }
}

/// A granted permit: its slot goes back on `release`, or when the provider drops it (this
/// server, and with it the guard, is dropped).
struct PermitServer {
    guard: RefCell<Option<PermitGuard>>,
}

impl permit::Server for PermitServer {
    async fn release(
        self: capnp::capability::Rc<Self>,
        _: permit::ReleaseParams,
        _: permit::ReleaseResults,
    ) -> Result<(), capnp::Error> {
        // Released twice is released once.
        drop(self.guard.borrow_mut().take());
        Ok(())
    }
}
