//! Types for state and reality: `made` (a file it can find again), `stash`/`usestash`
//! (capabilities across operations), `faulty`.

use super::*;

// ---- made ----------------------------------------------------------------------------------

/// A file made slowly, whose reads look at the real file (`readChecks`): for interrupted
/// operations and drift. It waits `before_ms`, writes the file, then waits `after_ms` before
/// answering (a kill in either wait leaves the create interrupted, without or with the file).
pub(super) struct Made;

#[derive(Serialize, Deserialize, JsonSchema)]
pub(super) struct MadeIn {
    /// The file
    pub(super) path: String,
    /// Wait before writing
    #[serde(default)]
    pub(super) before_ms: u64,
    /// Wait after writing, before answering
    #[serde(default)]
    pub(super) after_ms: u64,
}

#[derive(Serialize, Deserialize, JsonSchema)]
pub(super) struct MadeOut {
    /// The file
    pub(super) path: String,
    /// What it holds now
    pub(super) content: String,
}

pub(super) fn read_made(path: &str) -> Result<MadeOut, OperationError> {
    match std::fs::read_to_string(path) {
        Ok(content) => Ok(MadeOut {
            path: path.to_string(),
            content,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(OperationError::not_found(format!("{path} does not exist")))
        }
        Err(e) => Err(OperationError::transient(format!(
            "cannot read {path}: {e}"
        ))),
    }
}

impl Resource for Made {
    type Inputs = MadeIn;
    type Outputs = MadeOut;

    fn resource_type() -> ResourceType {
        ResourceType::new("made")
            .description("Writes a file slowly; its reads look at the file")
            .inputs_from::<MadeIn>()
            .outputs_from::<MadeOut>()
            .read_checks(true)
    }

    async fn create(&self, _op: &Operation, inputs: MadeIn) -> Result<MadeOut, OperationError> {
        tokio::time::sleep(Duration::from_millis(inputs.before_ms)).await;
        std::fs::write(&inputs.path, "made\n")
            .map_err(|e| OperationError::permanent(format!("cannot write {}: {e}", inputs.path)))?;
        tokio::time::sleep(Duration::from_millis(inputs.after_ms)).await;
        read_made(&inputs.path)
    }

    async fn find(&self, _op: &Operation, inputs: MadeIn) -> Result<MadeOut, OperationError> {
        read_made(&inputs.path)
    }

    async fn read(
        &self,
        _op: &Operation,
        prior: capstan_provider::Prior<MadeIn, MadeOut>,
    ) -> Result<MadeOut, OperationError> {
        read_made(&prior.outputs.path)
    }

    async fn delete(
        &self,
        _op: &Operation,
        prior: capstan_provider::Prior<MadeIn, MadeOut>,
    ) -> Result<(), OperationError> {
        match std::fs::remove_file(&prior.outputs.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(OperationError::permanent(
                format!("cannot remove {}: {e}", prior.outputs.path),
            )),
            _ => Ok(()),
        }
    }
}

// ---- stash / usestash ------------------------------------------------------------------------

thread_local! {
    /// The capability a `stash` was handed, kept past its operation (and its run).
    static STASH: std::cell::RefCell<Option<capstan_schema::provider_capnp::resource_handle::Client>> =
        const { std::cell::RefCell::new(None) };
}

/// Keeps the first capability it is handed, as a provider trying to hold on to one would.
pub(super) struct Stash;

#[derive(Serialize, Deserialize, JsonSchema)]
pub(super) struct StashOut {
    /// Whether it was handed one
    pub(super) stashed: bool,
}

impl Resource for Stash {
    type Inputs = Value;
    type Outputs = StashOut;

    fn resource_type() -> ResourceType {
        ResourceType::new("stash")
            .description("Keeps the capability it is handed, past the operation")
            .open_inputs(true)
            .outputs_from::<StashOut>()
    }

    async fn create(&self, op: &Operation, _inputs: Value) -> Result<StashOut, OperationError> {
        let handle = op.capabilities().first().map(|(_, c)| c.clone());
        let stashed = handle.is_some();
        STASH.with(|s| *s.borrow_mut() = handle);
        Ok(StashOut { stashed })
    }
}

/// Tries the capability a `stash` kept (in this run or an earlier one).
pub(super) struct UseStash;

#[derive(Serialize, Deserialize, JsonSchema)]
pub(super) struct UseStashOut {
    /// Whether the call answered
    pub(super) reachable: bool,
    /// Its answer, or why not
    pub(super) detail: String,
}

impl Resource for UseStash {
    type Inputs = Value;
    type Outputs = UseStashOut;

    fn resource_type() -> ResourceType {
        ResourceType::new("usestash")
            .description("Calls the capability a `stash` kept")
            .open_inputs(true)
            .outputs_from::<UseStashOut>()
    }

    async fn create(&self, _op: &Operation, _inputs: Value) -> Result<UseStashOut, OperationError> {
        let Some(handle) = STASH.with(|s| s.borrow().clone()) else {
            return Ok(UseStashOut {
                reachable: false,
                detail: "nothing stashed".into(),
            });
        };
        let call = tokio::time::timeout(Duration::from_secs(5), describe_handle(&handle)).await;
        Ok(match call {
            Ok(Ok((kind, address, summary))) => UseStashOut {
                reachable: true,
                detail: format!("{kind} {address} {summary}"),
            },
            Ok(Err(e)) => UseStashOut {
                reachable: false,
                detail: e.to_string(),
            },
            Err(_) => UseStashOut {
                reachable: false,
                detail: "no answer in 5 s".into(),
            },
        })
    }
}

// ---- faulty --------------------------------------------------------------------------------

/// For the fault campaign: does its side effect (a marker file named after the resource) or
/// one of the faults a provider can have.
pub(super) struct Faulty;

#[derive(Serialize, Deserialize, JsonSchema)]
pub(super) struct FaultyIn {
    /// Where markers go
    // The marker's directory.
    pub(super) dir: String,
    /// The marker's name
    pub(super) name: String,
    /// none | slow | error | partial | crash | hang | garbage
    #[serde(default)]
    pub(super) fault: String,
    /// Anything
    // What it depends on, say; echoed.
    #[serde(default)]
    pub(super) after: Value,
}

#[derive(Serialize, Deserialize, JsonSchema)]
pub(super) struct FaultyOut {
    /// The marker file
    pub(super) marker: String,
}

impl Faulty {
    fn mark(inputs: &FaultyIn) -> Result<String, OperationError> {
        let path = std::path::Path::new(&inputs.dir).join(&inputs.name);
        std::fs::write(&path, "made\n").map_err(|e| {
            OperationError::permanent(format!("cannot write {}: {e}", path.display()))
        })?;
        Ok(path.display().to_string())
    }
}

impl Resource for Faulty {
    type Inputs = FaultyIn;
    type Outputs = FaultyOut;

    fn resource_type() -> ResourceType {
        ResourceType::new("faulty")
            .description("Writes a marker file, or fails in one of the ways a provider can")
            .inputs_from::<FaultyIn>()
            .outputs_from::<FaultyOut>()
            .read_checks(true)
    }

    async fn create(&self, op: &Operation, inputs: FaultyIn) -> Result<FaultyOut, OperationError> {
        match inputs.fault.as_str() {
            "error" => Err(OperationError::permanent("failed on purpose")),
            "partial" => {
                Self::mark(&inputs)?;
                Err(OperationError::permanent("made its marker, then failed"))
            }
            "crash" => {
                // The side effect happened; the result never arrives.
                Self::mark(&inputs)?;
                std::process::exit(3)
            }
            "hang" => std::future::pending().await,
            "garbage" => {
                let fd: RawFd = RAW_SOCKET.load(Ordering::Relaxed);
                if fd >= 0 {
                    let garbage = [0xffu8; 64];
                    // SAFETY: writes to a descriptor this process owns.
                    unsafe {
                        libc::write(fd, garbage.as_ptr().cast(), garbage.len());
                    }
                }
                std::future::pending().await
            }
            "slow" => {
                for n in 0..5 {
                    op.log(LogStream::Stdout, format!("slowly {n}")).await;
                    tokio::time::sleep(Duration::from_millis(40)).await;
                }
                Ok(FaultyOut {
                    marker: Self::mark(&inputs)?,
                })
            }
            _ => Ok(FaultyOut {
                marker: Self::mark(&inputs)?,
            }),
        }
    }

    async fn find(&self, _op: &Operation, inputs: FaultyIn) -> Result<FaultyOut, OperationError> {
        let path = std::path::Path::new(&inputs.dir).join(&inputs.name);
        if path.exists() {
            Ok(FaultyOut {
                marker: path.display().to_string(),
            })
        } else {
            Err(OperationError::not_found("no marker"))
        }
    }

    async fn delete(
        &self,
        _op: &Operation,
        prior: capstan_provider::Prior<FaultyIn, FaultyOut>,
    ) -> Result<(), OperationError> {
        let _ = std::fs::remove_file(&prior.outputs.marker);
        Ok(())
    }
}
