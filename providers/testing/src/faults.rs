//! Types that go wrong on purpose: `fail`, `panic`, `crash`, `hang`, `chatty`, `big`,
//! `corrupt`.

use super::*;

// ---- fail / panic / crash ------------------------------------------------------------------

pub(super) struct Fail;

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct FailIn {
    /// permanent | invalid_input | transient | cancelled | internal
    #[serde(default)]
    pub(super) kind: Option<String>,
    /// The error message
    #[serde(default)]
    pub(super) message: Option<String>,
}

impl Resource for Fail {
    type Inputs = FailIn;
    type Outputs = Value;

    fn resource_type() -> ResourceType {
        ResourceType::new("fail")
            .description("Always fails")
            .inputs_from::<FailIn>()
    }

    async fn create(&self, _op: &Operation, inputs: FailIn) -> Result<Value, OperationError> {
        let kind = match inputs.kind.as_deref().unwrap_or("permanent") {
            "invalid_input" => ErrorKind::InvalidInput,
            "transient" => ErrorKind::Transient,
            "cancelled" => ErrorKind::Cancelled,
            "internal" => ErrorKind::Internal,
            _ => ErrorKind::Permanent,
        };
        Err(OperationError::new(
            kind,
            inputs.message.unwrap_or_else(|| "failed as asked".into()),
        )
        .with_details("details: line 1\ndetails: line 2"))
    }
}

pub(super) struct Panic;

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct PanicIn {
    /// The panic message
    #[serde(default)]
    pub(super) message: Option<String>,
}

impl Resource for Panic {
    type Inputs = PanicIn;
    type Outputs = Value;

    fn resource_type() -> ResourceType {
        ResourceType::new("panic")
            .description("Panics in the middle of the operation")
            .inputs_from::<PanicIn>()
    }

    async fn create(&self, _op: &Operation, inputs: PanicIn) -> Result<Value, OperationError> {
        tokio::task::yield_now().await;
        panic!(
            "{}",
            inputs.message.unwrap_or_else(|| "testing panic".into())
        );
    }
}

pub(super) struct Crash;

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct CrashIn {
    /// exit (default) | abort | sigkill
    #[serde(default)]
    pub(super) mode: Option<String>,
    /// Exit status for mode exit (default 3)
    #[serde(default)]
    pub(super) code: Option<i32>,
}

impl Resource for Crash {
    type Inputs = CrashIn;
    type Outputs = Value;

    fn resource_type() -> ResourceType {
        ResourceType::new("crash")
            .description("Ends the provider process mid-operation")
            .inputs_from::<CrashIn>()
    }

    async fn create(&self, op: &Operation, inputs: CrashIn) -> Result<Value, OperationError> {
        op.phase("about to crash").await;
        eprintln!("testing provider: crashing on purpose ({})", op.address());
        match inputs.mode.as_deref().unwrap_or("exit") {
            // SAFETY: raise/abort end this process, as asked.
            "sigkill" => unsafe {
                libc::raise(libc::SIGKILL);
            },
            "abort" => std::process::abort(),
            _ => std::process::exit(inputs.code.unwrap_or(3)),
        }
        unreachable!("the process is gone")
    }
}

// ---- hang ----------------------------------------------------------------------------------

pub(super) struct Hang;

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct HangIn {
    /// A file written when the operation sees its cancellation
    #[serde(default)]
    pub(super) cancel_marker: Option<String>,
    /// Keep hanging after cancellation (tests the grace period)
    #[serde(default)]
    pub(super) ignore_cancel: bool,
}

impl Resource for Hang {
    type Inputs = HangIn;
    type Outputs = Value;

    fn resource_type() -> ResourceType {
        ResourceType::new("hang")
            .description("Never finishes; notices cancellation")
            .inputs_from::<HangIn>()
    }

    async fn create(&self, op: &Operation, inputs: HangIn) -> Result<Value, OperationError> {
        op.phase("hanging").await;
        op.cancelled().await;
        if let Some(marker) = &inputs.cancel_marker {
            let _ = std::fs::write(marker, format!("cancelled {}\n", op.address()));
        }
        if inputs.ignore_cancel {
            std::future::pending::<()>().await;
        }
        Err(OperationError::cancelled("hang cancelled"))
    }
}

// ---- chatty --------------------------------------------------------------------------------

pub(super) struct Chatty;

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct ChattyIn {
    /// How many events (default 1000)
    #[serde(default = "default_count")]
    pub(super) count: u64,
    /// tracing (default) | log
    #[serde(default)]
    pub(super) via: Option<String>,
    /// Pause between events
    #[serde(default)]
    pub(super) delay_ms: u64,
}

pub(super) fn default_count() -> u64 {
    1000
}

#[derive(Serialize, Deserialize, JsonSchema)]
pub(super) struct ChattyOut {
    /// How many were emitted
    pub(super) count: u64,
}

impl Resource for Chatty {
    type Inputs = ChattyIn;
    type Outputs = ChattyOut;

    fn resource_type() -> ResourceType {
        ResourceType::new("chatty")
            .description("Emits many progress events inside a span")
            .inputs_from::<ChattyIn>()
            .outputs_from::<ChattyOut>()
    }

    async fn create(&self, op: &Operation, inputs: ChattyIn) -> Result<ChattyOut, OperationError> {
        let via_log = inputs.via.as_deref() == Some("log");
        let span = tracing::info_span!("chatter", count = inputs.count);
        let _entered = span.enter();
        for n in 0..inputs.count {
            if via_log {
                op.log(LogStream::Stdout, format!("line {n}")).await;
            } else {
                tracing::info!(n, "event {n}");
                if n % 256 == 255 {
                    op.ready().await;
                }
            }
            if inputs.delay_ms > 0 {
                tokio::time::sleep(Duration::from_millis(inputs.delay_ms)).await;
            }
            if n % 100 == 99 {
                op.progress(n + 1, inputs.count, "events").await;
            }
            if op.is_cancelled() {
                return Err(OperationError::cancelled("chatty cancelled"));
            }
        }
        Ok(ChattyOut {
            count: inputs.count,
        })
    }
}

// ---- big / corrupt -------------------------------------------------------------------------

pub(super) struct Big;

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct BigIn {
    /// Size of the output `data`
    pub(super) bytes: usize,
}

#[derive(Serialize, Deserialize, JsonSchema)]
pub(super) struct BigOut {
    /// `bytes` characters
    pub(super) data: String,
}

impl Resource for Big {
    type Inputs = BigIn;
    type Outputs = BigOut;

    fn resource_type() -> ResourceType {
        ResourceType::new("big")
            .description("Returns a large output")
            .inputs_from::<BigIn>()
            .outputs_from::<BigOut>()
    }

    async fn create(&self, _op: &Operation, inputs: BigIn) -> Result<BigOut, OperationError> {
        Ok(BigOut {
            data: "x".repeat(inputs.bytes),
        })
    }
}

pub(super) struct Corrupt;

impl Resource for Corrupt {
    type Inputs = Value;
    type Outputs = Value;

    fn resource_type() -> ResourceType {
        ResourceType::new("corrupt").description("Writes garbage onto its own connection")
    }

    async fn create(&self, _op: &Operation, _inputs: Value) -> Result<Value, OperationError> {
        let fd: RawFd = RAW_SOCKET.load(Ordering::Relaxed);
        if fd < 0 {
            return Err(OperationError::permanent(
                "corrupt needs a socket-activated connection",
            ));
        }
        let garbage = [0xffu8; 64];
        // SAFETY: writes to a descriptor this process owns.
        unsafe {
            libc::write(fd, garbage.as_ptr().cast(), garbage.len());
        }
        std::future::pending().await
    }
}
