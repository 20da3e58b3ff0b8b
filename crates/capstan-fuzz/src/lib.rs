//! Fuzz targets: every reader Capstan points at bytes it did not write. Each takes arbitrary
//! bytes and must return (an error is fine) without panicking, hanging or growing without
//! bound. `fuzz/` runs them under cargo-fuzz (nightly, by hand, for as long as you like);
//! `tests/fuzz.rs` runs them on stable over the corpus in `fuzz/corpus/` and a bounded number
//! of mutations of it, in CI.

#![forbid(unsafe_code)]

use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

use capstan_provider::{Operation, OperationError, Provider, Resource, ResourceType};
use capstan_schema::{progress_capnp, provider_capnp};
use serde::{Deserialize, Serialize};
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

/// A fuzz target: any bytes in, no panic out.
pub type Target = fn(&[u8]);

/// The targets, by name (as the corpus directories and cargo-fuzz binaries are named).
pub const TARGETS: [(&str, Target); 6] = [
    ("deployment", deployment),
    ("journal", journal),
    ("nix_output", nix_output),
    ("wire_values", wire_values),
    ("provider_stream", provider_stream),
    ("host_stream", host_stream),
];

/// The deployment reader and its static checks, on a file's text.
pub fn deployment(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut params = serde_json::Map::new();
    params.insert("greeting".into(), serde_json::json!("hello"));
    params.insert("n".into(), serde_json::json!(3));
    if let Ok(deployment) =
        capstan_engine::model::Deployment::parse(Path::new("fuzz.json"), &text, &params)
    {
        let _ = deployment.find_cycle();
        let _ = capstan_engine::plan::plan(&deployment, &Default::default());
    }
}

thread_local! {
    static STATE_DIR: tempfile::TempDir = tempfile::tempdir().expect("a temporary directory");
}

/// The journal reader (what `plan` and `state` read without the lock), on a journal's bytes:
/// truncated, bit-flipped, reordered records among them.
pub fn journal(data: &[u8]) {
    STATE_DIR.with(|dir| {
        let dir = dir.path();
        let _ = std::fs::remove_file(dir.join("snapshot"));
        if std::fs::write(dir.join("journal"), data).is_ok() {
            let _ = capstan_state::read_only(dir);
        }
    });
}

/// The reader of a Nix evaluation's output: standard output, a NUL byte, standard error.
pub fn nix_output(data: &[u8]) {
    let (stdout, stderr) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let _ = capstan_engine::nix::read_output(stdout, stderr);
}

/// The readers of the values either side takes off the wire: a provider's handshake, a
/// progress item, an error, a trace context (each from the same bytes as a Cap'n Proto
/// message).
pub fn wire_values(data: &[u8]) {
    let options = capnp::message::ReaderOptions {
        traversal_limit_in_words: Some(1 << 16),
        nesting_limit: 32,
    };
    let mut bytes = data;
    let Ok(message) = capnp::serialize::read_message(&mut bytes, options) else {
        return;
    };
    if let Ok(info) = message.get_root::<provider_capnp::provider_info::Reader>() {
        let _ = capstan_schema::ProviderInfo::read(info);
    }
    if let Ok(item) = message.get_root::<progress_capnp::progress_item::Reader>() {
        let _ = capstan_schema::ProgressEvent::read(item);
    }
    if let Ok(error) = message.get_root::<provider_capnp::operation_error::Reader>() {
        let _ = capstan_schema::OperationError::read(error);
    }
    if let Ok(trace) = message.get_root::<provider_capnp::trace_context::Reader>() {
        let _ = capstan_schema::TraceContext::read(trace);
    }
}

/// A provider (the SDK) fed arbitrary bytes as from its socket.
pub fn provider_stream(data: &[u8]) {
    let data = data.to_vec();
    local(async move {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let (reader, writer) = tokio::io::split(theirs);
        let serve = tokio::task::spawn_local(async move {
            let _ = provider()
                .serve_stream(reader.compat(), writer.compat_write())
                .await;
        });
        feed(ours, data).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), serve).await;
    });
}

/// The host fed arbitrary bytes as from a provider's socket (its handshake must fail or
/// succeed, never hang past its timeout or panic).
pub fn host_stream(data: &[u8]) {
    let _ = host_handshake_succeeds(data);
}

/// Whether a host fed `data` as its provider's side completes the handshake (for checking
/// that recorded traffic seeds reach past it).
pub fn host_handshake_succeeds(data: &[u8]) -> bool {
    let data = data.to_vec();
    let done = Rc::new(std::cell::Cell::new(false));
    let flag = done.clone();
    local(async move {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let (reader, writer) = tokio::io::split(theirs);
        let options = capstan_host::HostOptions {
            handshake_timeout: Duration::from_secs(2),
            ..Default::default()
        };
        let connect = capstan_host::ProviderConnection::from_stream(
            "fuzz",
            reader.compat(),
            writer.compat_write(),
            options,
        );
        let (connected, ()) = tokio::join!(connect, feed(ours, data));
        flag.set(connected.is_ok());
    });
    done.get()
}

/// Writes `data`, then reads (and drops) whatever comes back until the other side is done.
async fn feed(stream: tokio::io::DuplexStream, data: Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut reader, mut writer) = tokio::io::split(stream);
    let drain = async move {
        let mut sink = vec![0u8; 16 * 1024];
        while let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(200), reader.read(&mut sink)).await
        {
            if n == 0 {
                break;
            }
        }
    };
    let write = async move {
        let _ = writer.write_all(&data).await;
        let _ = writer.shutdown().await;
    };
    tokio::join!(write, drain);
}

fn local(future: impl std::future::Future<Output = ()>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    tokio::task::LocalSet::new().block_on(&runtime, future);
}

/// A provider with one type, as small as a real one.
fn provider() -> Provider {
    Provider::new("fuzz", "0").resource(Echo)
}

struct Echo;

#[derive(Serialize, Deserialize)]
struct EchoValue {
    #[serde(default)]
    value: serde_json::Value,
}

impl Resource for Echo {
    type Inputs = EchoValue;
    type Outputs = EchoValue;

    fn resource_type() -> ResourceType {
        ResourceType::new("echo")
            .optional("value", "Any JSON")
            .output("value", "The input")
    }

    async fn create(
        &self,
        _op: &Operation,
        inputs: EchoValue,
    ) -> Result<EchoValue, OperationError> {
        Ok(inputs)
    }
}

/// Real traffic to seed the stream targets: what a host sends a provider, and what the
/// provider answers, for a handshake and a create.
pub fn recorded_traffic() -> (Vec<u8>, Vec<u8>) {
    let to_provider = Rc::new(RefCell::new(Vec::new()));
    let to_host = Rc::new(RefCell::new(Vec::new()));
    let (a, b) = (to_provider.clone(), to_host.clone());
    local(async move {
        let (host_side, provider_side) = tokio::io::duplex(64 * 1024);
        let (pr, pw) = tokio::io::split(provider_side);
        tokio::task::spawn_local(async move {
            let _ = provider()
                .serve_stream(pr.compat(), Tap(pw, b).compat_write())
                .await;
        });
        let (hr, hw) = tokio::io::split(host_side);
        let connection = capstan_host::ProviderConnection::from_stream(
            "fuzz",
            hr.compat(),
            Tap(hw, a).compat_write(),
            capstan_host::HostOptions::default(),
        )
        .await
        .expect("the handshake");
        let call = capstan_host::OperationCall::new(
            capstan_schema::OperationKind::Create,
            "echo",
            "e",
            capstan_schema::Json::from_text(r#"{"value":[1,"two",{"three":3}]}"#).expect("JSON"),
        );
        let _ = connection
            .call(call, capstan_host::ignore_progress())
            .await
            .expect("the create");
        connection.shutdown().await;
    });
    let host_bytes = to_provider.borrow().clone();
    let provider_bytes = to_host.borrow().clone();
    (host_bytes, provider_bytes)
}

/// A writer that keeps a copy of everything written through it.
struct Tap<W>(W, Rc<RefCell<Vec<u8>>>);

impl<W: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Tap<W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let poll = std::pin::Pin::new(&mut self.0).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &poll {
            self.1.borrow_mut().extend_from_slice(&buf[..*n]);
        }
        poll
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Real values as Cap'n Proto messages, to seed `wire_values`: a handshake, progress, an error.
pub fn wire_seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    let info = capstan_schema::ProviderInfo {
        name: "seed".into(),
        version: "1".into(),
        min_protocol: 1,
        max_protocol: 1,
        protocol: 1,
        max_concurrency: 4,
        prior_inputs_once: false,
        opens_progress: false,
        resource_types: vec![capstan_schema::ResourceTypeInfo {
            name: "file".into(),
            description: "a file".into(),
            inputs: vec![capstan_schema::info::InputInfo {
                name: "path".into(),
                required: true,
                description: "where".into(),
                sensitive: false,
            }],
            outputs: vec![capstan_schema::info::OutputInfo {
                name: "hash".into(),
                description: String::new(),
                sensitive: true,
                public: false,
                prior_unused: false,
            }],
            stateful: true,
            ..Default::default()
        }],
    };
    let mut message = capnp::message::Builder::new_default();
    info.write(message.init_root());
    seeds.push(capnp::serialize::write_message_to_words(&message));
    let event = capstan_schema::ProgressEvent {
        time_unix_nanos: 1,
        kind: capstan_schema::ProgressKind::Log {
            span: 0,
            stream: capstan_schema::LogStream::Stdout,
            line: "a line".into(),
        },
    };
    let mut message = capnp::message::Builder::new_default();
    event.write(message.init_root());
    seeds.push(capnp::serialize::write_message_to_words(&message));
    let mut message = capnp::message::Builder::new_default();
    capstan_schema::OperationError::permanent("no")
        .with_details("at all")
        .write(message.init_root());
    seeds.push(capnp::serialize::write_message_to_words(&message));
    seeds
}
