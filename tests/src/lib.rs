//! Helpers shared by Capstan's cross-crate integration tests (in `tests/`).

use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use capstan_host::{
    HostOptions, ProgressObserver, ProviderCommand, ProviderConnection, ProviderSource,
};
use capstan_schema::ProgressEvent;

/// A binary built from this workspace, next to the test executable's `deps/` directory.
/// `cargo test --workspace` builds every workspace binary that has tests of its own.
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace` (or `cargo build --workspace` first)",
        path.display()
    );
    path
}

/// The testing provider's executable.
pub fn testing_provider() -> PathBuf {
    workspace_binary("capstan-provider-testing")
}

/// A source that starts the testing provider with `args`.
pub fn testing_source(args: &[&str]) -> ProviderSource {
    ProviderSource::Command(ProviderCommand::new(
        testing_provider(),
        args.iter().copied(),
    ))
}

/// Starts the testing provider.
pub async fn launch_testing(args: &[&str]) -> ProviderConnection {
    ProviderConnection::launch(
        "testing",
        &testing_source(args),
        HostOptions::default(),
        None,
    )
    .await
    .expect("the testing provider starts")
}

/// Runs `f` on a current-thread runtime inside a LocalSet, as capnp-rpc requires.
pub fn run_local<F: std::future::Future>(f: F) -> F::Output {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    tokio::task::LocalSet::new().block_on(&runtime, f)
}

/// An observer that records every event, in order.
#[derive(Clone, Default)]
pub struct Recorder(pub Rc<RefCell<Vec<ProgressEvent>>>);

impl Recorder {
    pub fn observer(&self) -> Rc<dyn ProgressObserver> {
        let events = self.0.clone();
        Rc::new(move |batch: Vec<ProgressEvent>| {
            events.borrow_mut().extend(batch);
            async {}
        })
    }

    pub fn events(&self) -> Vec<ProgressEvent> {
        self.0.borrow().clone()
    }
}

/// Waits until `condition` holds, checking every few milliseconds, for at most `limit`.
/// For events only visible from outside (a file appearing, a process disappearing).
pub async fn wait_until(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    condition()
}

/// Whether a process with this pid exists (and is not a zombie).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().next());
            state != Some("Z")
        }
        Err(_) => false,
    }
}

/// A child process a test started, killed and reaped when dropped (also when the test
/// panics), so a failed test leaves no process behind.
pub struct KillOnDrop(pub std::process::Child);

impl std::ops::Deref for KillOnDrop {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
