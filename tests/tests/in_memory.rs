//! The protocol end to end in one process: the SDK's provider and the host's connection, two
//! RPC systems over an in-memory duplex pipe. Exercises flow control, cancellation (Finish),
//! capabilities and disconnects, without processes.

use std::cell::Cell;
use std::rc::Rc;

use capstan_host::{CallError, HostOptions, OperationCall, ProviderConnection};
use capstan_provider::{Operation, OperationError, Provider, Resource, ResourceType};
use capstan_schema::{ErrorKind, OperationKind, ProgressKind};
use capstan_tests::{run_local, Recorder};
use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};
use tracing_subscriber::layer::SubscriberExt;

/// Shared between a test and its in-process provider.
#[derive(Default)]
struct Probe {
    started: Notify,
    cancelled: Notify,
    saw_cancel: Cell<bool>,
    emitted: Cell<u64>,
    running: Cell<u32>,
    max_running: Cell<u32>,
    release: Notify,
}

struct Echo;
impl Resource for Echo {
    type Inputs = Value;
    type Outputs = Value;
    fn resource_type() -> ResourceType {
        ResourceType::new("echo")
            .optional("value", "")
            .output("value", "")
    }
    async fn create(&self, _op: &Operation, inputs: Value) -> Result<Value, OperationError> {
        Ok(inputs)
    }
    async fn update(
        &self,
        _op: &Operation,
        prior: capstan_provider::Prior<Value, Value>,
        inputs: Value,
    ) -> Result<Value, OperationError> {
        Ok(json!({"before": prior.outputs, "after": inputs}))
    }
    async fn delete(
        &self,
        _op: &Operation,
        prior: capstan_provider::Prior<Value, Value>,
    ) -> Result<(), OperationError> {
        if prior.outputs.get("undeletable").is_some() {
            return Err(OperationError::permanent("this one stays"));
        }
        Ok(())
    }
}

struct Nested;
impl Resource for Nested {
    type Inputs = Value;
    type Outputs = Value;
    fn resource_type() -> ResourceType {
        ResourceType::new("nested")
    }
    async fn create(&self, op: &Operation, _inputs: Value) -> Result<Value, OperationError> {
        let outer = tracing::info_span!("outer", step = 1);
        async {
            tracing::info!("in outer");
            let inner = tracing::info_span!("inner");
            async {
                tracing::warn!(detail = "x", "in inner");
                op.progress(1, 2, "things").await;
            }
            .instrument_in(inner)
            .await;
            op.phase("finishing").await;
        }
        .instrument_in(outer)
        .await;
        Ok(json!({}))
    }
}

/// `tracing::Instrument`, renamed so it does not clash with anything in scope here.
trait InstrumentIn: Sized {
    fn instrument_in(self, span: tracing::Span) -> tracing::instrument::Instrumented<Self>;
}
impl<F: std::future::Future> InstrumentIn for F {
    fn instrument_in(self, span: tracing::Span) -> tracing::instrument::Instrumented<Self> {
        tracing::Instrument::instrument(self, span)
    }
}

struct Blocker(Rc<Probe>);
impl Resource for Blocker {
    type Inputs = Value;
    type Outputs = Value;
    fn resource_type() -> ResourceType {
        ResourceType::new("blocker")
    }
    async fn create(&self, op: &Operation, _inputs: Value) -> Result<Value, OperationError> {
        // Reported before it blocks: its sink is open (from the core's hub) when the call is
        // dropped.
        op.event(capstan_schema::Level::Info, "blocking").await;
        self.0.started.notify_one();
        op.cancelled().await;
        self.0.saw_cancel.set(true);
        self.0.cancelled.notify_one();
        Err(OperationError::cancelled("stopped"))
    }
}

struct Panicker;
impl Resource for Panicker {
    type Inputs = Value;
    type Outputs = Value;
    fn resource_type() -> ResourceType {
        ResourceType::new("panicker")
    }
    async fn create(&self, _op: &Operation, _inputs: Value) -> Result<Value, OperationError> {
        panic!("boom in provider code");
    }
}

struct Flood(Rc<Probe>);
impl Resource for Flood {
    type Inputs = Value;
    type Outputs = Value;
    fn resource_type() -> ResourceType {
        ResourceType::new("flood").required("count", "")
    }
    async fn create(&self, op: &Operation, inputs: Value) -> Result<Value, OperationError> {
        let count = inputs["count"].as_u64().unwrap_or(0);
        let span = tracing::info_span!("flood");
        let _entered = span.enter();
        for n in 0..count {
            tracing::info!(n, "event");
            self.0.emitted.set(n + 1);
            if n % 64 == 63 {
                op.ready().await;
            }
        }
        Ok(json!({"count": count}))
    }
}

struct Maker;
impl Resource for Maker {
    type Inputs = Value;
    type Outputs = Value;
    fn resource_type() -> ResourceType {
        ResourceType::new("maker")
    }
    async fn create(&self, op: &Operation, inputs: Value) -> Result<Value, OperationError> {
        op.return_handle("made", "thing", inputs.clone());
        Ok(json!({}))
    }
}

struct User;
impl Resource for User {
    type Inputs = Value;
    type Outputs = Value;
    fn resource_type() -> ResourceType {
        ResourceType::new("user").output("seen", "")
    }
    async fn create(&self, op: &Operation, _inputs: Value) -> Result<Value, OperationError> {
        let handle = op
            .capability("input")
            .ok_or_else(|| OperationError::invalid_input("no capability `input`"))?;
        let (kind, address, summary) = capstan_host::describe_handle(handle)
            .await
            .map_err(|e| OperationError::transient(e.to_string()))?;
        Ok(json!({"seen": {"kind": kind, "address": address, "summary": summary}}))
    }
}

struct Limited(Rc<Probe>);
impl Resource for Limited {
    type Inputs = Value;
    type Outputs = Value;
    fn resource_type() -> ResourceType {
        ResourceType::new("limited")
    }
    async fn create(&self, _op: &Operation, _inputs: Value) -> Result<Value, OperationError> {
        let probe = &self.0;
        probe.running.set(probe.running.get() + 1);
        probe
            .max_running
            .set(probe.max_running.get().max(probe.running.get()));
        probe.release.notified().await;
        probe.running.set(probe.running.get() - 1);
        Ok(json!({}))
    }
}

fn provider(probe: &Rc<Probe>) -> Provider {
    Provider::new("mem", "0.0.1")
        .resource(Echo)
        .resource(Nested)
        .resource(Blocker(probe.clone()))
        .resource(Panicker)
        .resource(Flood(probe.clone()))
        .resource(Maker)
        .resource(User)
        .resource(Limited(probe.clone()))
        .max_concurrency(2)
}

struct Harness {
    connection: ProviderConnection,
    server: tokio::task::JoinHandle<Result<(), capnp::Error>>,
    _tracing: tracing::subscriber::DefaultGuard,
}

async fn connect(provider: Provider, window: usize) -> Harness {
    let tracing = tracing::subscriber::set_default(
        tracing_subscriber::registry().with(capstan_provider::progress_layer()),
    );
    let (host_end, provider_end) = tokio::io::duplex(64 * 1024);
    let (pr, pw) = tokio::io::split(provider_end);
    let server = tokio::task::spawn_local(provider.serve_stream(pr.compat(), pw.compat_write()));
    let (hr, hw) = tokio::io::split(host_end);
    let options = HostOptions {
        stream_window: window,
        ..HostOptions::default()
    };
    let connection =
        ProviderConnection::from_stream("mem", hr.compat(), hw.compat_write(), options)
            .await
            .expect("handshake");
    Harness {
        connection,
        server,
        _tracing: tracing,
    }
}

fn create(resource_type: &str, inputs: Value) -> OperationCall {
    OperationCall::new(
        OperationKind::Create,
        resource_type,
        &format!("test.{resource_type}"),
        inputs,
    )
}

#[test]
fn handshake_describes_the_provider() {
    run_local(async {
        let h = connect(provider(&Rc::default()), 65536).await;
        let info = h.connection.info();
        assert_eq!(info.name, "mem");
        assert_eq!(info.protocol, capstan_schema::PROTOCOL_VERSION);
        assert_eq!(info.max_concurrency, 2);
        let echo = info.resource_type("echo").expect("echo is served");
        assert_eq!(echo.outputs[0].name, "value");
        assert!(!echo.inputs[0].required);
        assert!(info.resource_type("flood").unwrap().inputs[0].required);
    });
}

#[test]
fn create_update_read_delete_round_trip_json() {
    run_local(async {
        let h = connect(provider(&Rc::default()), 65536).await;
        let rec = Recorder::default();
        let created = h
            .connection
            .call(create("echo", json!({"value": [1, 2]})), rec.observer())
            .await
            .unwrap();
        assert_eq!(created.outputs, json!({"value": [1, 2]}));

        let mut update =
            OperationCall::new(OperationKind::Update, "echo", "a", json!({"value": 3}));
        update.previous_inputs = Some(json!({"value": [1, 2]}).into());
        update.previous_outputs = Some(created.outputs.clone());
        let updated = h.connection.call(update, rec.observer()).await.unwrap();
        assert_eq!(
            updated.outputs,
            json!({"before": {"value": [1, 2]}, "after": {"value": 3}})
        );

        let mut read = OperationCall::new(OperationKind::Read, "echo", "a", json!({"value": 3}));
        read.previous_outputs = Some(json!({"value": 3}).into());
        let read = h.connection.call(read, rec.observer()).await.unwrap();
        assert_eq!(
            read.outputs,
            json!({"value": 3}),
            "the default read returns recorded outputs"
        );

        let mut delete = OperationCall::new(OperationKind::Delete, "echo", "a", json!({}));
        delete.previous_outputs = Some(json!({"value": 3}).into());
        let deleted = h.connection.call(delete, rec.observer()).await.unwrap();
        assert_eq!(deleted.outputs, json!({}));

        let mut refused = OperationCall::new(OperationKind::Delete, "echo", "b", json!({}));
        refused.previous_outputs = Some(json!({"undeletable": true}).into());
        match h.connection.call(refused, rec.observer()).await {
            Err(CallError::Failed { error, address }) => {
                assert_eq!(address, "b");
                assert_eq!(error.kind, ErrorKind::Permanent);
                assert_eq!(error.message, "this one stays");
            }
            other => panic!("expected a provider failure, got {:?}", other.err()),
        }
    });
}

#[test]
fn unknown_types_and_bad_inputs_are_invalid_input_errors() {
    run_local(async {
        let h = connect(provider(&Rc::default()), 65536).await;
        let rec = Recorder::default();
        let err = h
            .connection
            .call(create("nope", json!({})), rec.observer())
            .await
            .err()
            .unwrap();
        assert_eq!(err.kind(), Some(ErrorKind::InvalidInput));
        assert!(err.to_string().contains("no resource type `nope`"), "{err}");
        assert!(
            err.to_string().contains("echo"),
            "lists what it serves: {err}"
        );

        let mut update = OperationCall::new(OperationKind::Update, "echo", "x", json!({}));
        update.previous_outputs = None;
        let err = h
            .connection
            .call(update, rec.observer())
            .await
            .err()
            .unwrap();
        assert_eq!(err.kind(), Some(ErrorKind::InvalidInput), "{err}");

        // An array is not an object, even where serde could fill a struct from one.
        let err = h
            .connection
            .call(create("limited", json!([1])), rec.observer())
            .await
            .err()
            .unwrap();
        assert_eq!(err.kind(), Some(ErrorKind::InvalidInput), "{err}");
        assert!(
            err.to_string().contains("inputs must be a JSON object"),
            "{err}"
        );
    });
}

#[test]
fn tracing_spans_arrive_as_a_tree_in_order_before_the_result() {
    run_local(async {
        let h = connect(provider(&Rc::default()), 65536).await;
        let rec = Recorder::default();
        h.connection
            .call(create("nested", json!({})), rec.observer())
            .await
            .unwrap();
        let events: Vec<ProgressKind> = rec.events().into_iter().map(|e| e.kind).collect();
        let (outer, inner) = match (&events[0], &events[2]) {
            (
                ProgressKind::SpanStart {
                    id: outer,
                    parent: 0,
                    name: o,
                    fields,
                    ..
                },
                ProgressKind::SpanStart {
                    id: inner,
                    parent,
                    name: i,
                    ..
                },
            ) => {
                assert_eq!((o.as_str(), i.as_str()), ("outer", "inner"));
                assert_eq!(fields, &vec![("step".to_string(), "1".to_string())]);
                assert_eq!(parent, outer, "inner's parent is outer");
                (*outer, *inner)
            }
            other => panic!("unexpected start: {other:?}"),
        };
        assert!(
            matches!(&events[1], ProgressKind::Event { span, message, .. } if *span == outer && message == "in outer")
        );
        assert!(
            matches!(&events[3], ProgressKind::Event { span, message, level: capstan_schema::Level::Warn, fields, .. }
            if *span == inner && message == "in inner" && fields[0] == ("detail".into(), "x".into()))
        );
        assert!(
            matches!(&events[4], ProgressKind::Counter { span, done: 1, expected: 2, unit } if *span == inner && unit == "things")
        );
        assert!(matches!(&events[5], ProgressKind::SpanEnd { id } if *id == inner));
        assert!(
            matches!(&events[6], ProgressKind::Phase { span, name } if *span == outer && name == "finishing")
        );
        assert!(matches!(&events[7], ProgressKind::SpanEnd { id } if *id == outer));
        assert_eq!(events.len(), 8);
    });
}

#[test]
fn a_slow_observer_holds_the_provider_back_and_loses_nothing() {
    run_local(async {
        let probe: Rc<Probe> = Rc::default();
        let h = connect(provider(&probe), 16 * 1024).await;
        let gate = Rc::new(Notify::new());
        let received = Rc::new(Cell::new(0u64));
        let order_ok = Rc::new(Cell::new(true));
        let observer = {
            let (gate, received, order_ok) = (gate.clone(), received.clone(), order_ok.clone());
            Rc::new(move |batch: Vec<capstan_schema::ProgressEvent>| {
                let (gate, received, order_ok) = (gate.clone(), received.clone(), order_ok.clone());
                async move {
                    if received.get() == 0 {
                        gate.notified().await; // the first batch waits for the test
                    }
                    for event in batch {
                        if let ProgressKind::Event { fields, .. } = &event.kind {
                            let n: u64 = fields[0].1.parse().unwrap();
                            if n != received.get() {
                                order_ok.set(false);
                            }
                            received.set(received.get() + 1);
                        }
                    }
                }
            })
        };
        const COUNT: u64 = 200_000;
        let call = tokio::task::spawn_local({
            let connection = Rc::new(h.connection);
            let c = connection.clone();
            async move {
                c.call(create("flood", json!({"count": COUNT})), observer)
                    .await
                    .map(|s| s.outputs)
            }
        });
        // Give the provider every chance to run ahead while the observer is stuck.
        for _ in 0..20_000 {
            tokio::task::yield_now().await;
        }
        let emitted_while_stuck = probe.emitted.get();
        assert!(emitted_while_stuck > 0, "the provider started");
        assert!(
            emitted_while_stuck < 20_000,
            "the provider ran {emitted_while_stuck} events ahead of a stuck observer; flow control should stop it far sooner"
        );
        gate.notify_one();
        let outputs = call.await.unwrap().unwrap();
        assert_eq!(outputs, json!({"count": COUNT}));
        assert_eq!(received.get(), COUNT, "every event arrived");
        assert!(order_ok.get(), "events arrived in order");
    });
}

#[test]
fn dropping_a_call_cancels_the_operation_in_the_provider() {
    run_local(async {
        let probe: Rc<Probe> = Rc::default();
        let h = connect(provider(&probe), 65536).await;
        let connection = Rc::new(h.connection);
        let c = connection.clone();
        let rec = Recorder::default();
        let call = tokio::task::spawn_local(async move {
            c.call(create("blocker", json!({})), rec.observer())
                .await
                .is_ok()
        });
        probe.started.notified().await;
        call.abort();
        probe.cancelled.notified().await;
        assert!(probe.saw_cancel.get());
        // The connection is still good, its progress too.
        let ok = connection
            .call(
                create("echo", json!({"value": 1})),
                Recorder::default().observer(),
            )
            .await;
        assert!(ok.is_ok());
        let rec = Recorder::default();
        connection
            .call(create("flood", json!({"count": 10})), rec.observer())
            .await
            .expect("a reporting operation after the cancelled one");
        let events = rec
            .events()
            .into_iter()
            .filter(|e| matches!(e.kind, ProgressKind::Event { .. }))
            .count();
        assert_eq!(events, 10);
    });
}

#[test]
fn a_panic_fails_only_its_operation() {
    run_local(async {
        let h = connect(provider(&Rc::default()), 65536).await;
        let err = h
            .connection
            .call(
                create("panicker", json!({})),
                Recorder::default().observer(),
            )
            .await
            .err()
            .unwrap();
        assert_eq!(err.kind(), Some(ErrorKind::Internal));
        assert!(err.to_string().contains("boom in provider code"), "{err}");
        let ok = h
            .connection
            .call(
                create("echo", json!({"value": 2})),
                Recorder::default().observer(),
            )
            .await
            .unwrap();
        assert_eq!(ok.outputs, json!({"value": 2}));
    });
}

#[test]
fn capabilities_returned_by_one_operation_can_be_passed_to_another() {
    run_local(async {
        let h = connect(provider(&Rc::default()), 65536).await;
        let made = h
            .connection
            .call(
                create("maker", json!({"colour": "blue"})),
                Recorder::default().observer(),
            )
            .await
            .unwrap();
        assert_eq!(made.capabilities.len(), 1);
        let (name, handle) = made.capabilities.into_iter().next().unwrap();
        assert_eq!(name, "made");
        let mut call = create("user", json!({}));
        call.capabilities.push(("input".into(), handle));
        let used = h
            .connection
            .call(call, Recorder::default().observer())
            .await
            .unwrap();
        assert_eq!(
            used.outputs,
            json!({"seen": {"kind": "thing", "address": "test.maker", "summary": "{\"colour\":\"blue\"}"}})
        );
    });
}

#[test]
fn the_declared_concurrency_limit_holds() {
    run_local(async {
        let probe: Rc<Probe> = Rc::default();
        let h = connect(provider(&probe), 65536).await;
        let connection = Rc::new(h.connection);
        let mut calls = Vec::new();
        for _ in 0..6 {
            let c = connection.clone();
            calls.push(tokio::task::spawn_local(async move {
                c.call(create("limited", json!({})), Recorder::default().observer())
                    .await
                    .is_ok()
            }));
        }
        for _ in 0..6 {
            // Let everything that can start, start; then release one.
            for _ in 0..200 {
                tokio::task::yield_now().await;
            }
            assert!(probe.running.get() <= 2);
            probe.release.notify_one();
        }
        for call in calls {
            assert!(call.await.unwrap());
        }
        assert_eq!(probe.max_running.get(), 2);
    });
}

#[test]
fn a_vanished_provider_fails_pending_calls_with_a_disconnect() {
    run_local(async {
        let probe: Rc<Probe> = Rc::default();
        let h = connect(provider(&probe), 65536).await;
        let connection = Rc::new(h.connection);
        let c = connection.clone();
        let call = tokio::task::spawn_local(async move {
            c.call(create("blocker", json!({})), Recorder::default().observer())
                .await
        });
        probe.started.notified().await;
        h.server.abort();
        let err = call.await.unwrap().err().expect("the call fails");
        assert!(matches!(err, CallError::Disconnected { .. }), "{err:?}");
        assert!(err.to_string().contains("mem"), "names the provider: {err}");
        // Later calls fail at once, too, known not sent (nothing was done).
        let err = connection
            .call(create("echo", json!({})), Recorder::default().observer())
            .await
            .err()
            .unwrap();
        assert!(matches!(err, CallError::NotSent { .. }), "{err:?}");
        assert!(err.to_string().contains("nothing was done"), "{err}");
    });
}

/// The SDK's provider served in memory to a host written against the schema alone (plain
/// capnp-rpc over Capstan's transport, no `ProviderConnection`): its `Provider` capability.
async fn raw_connection() -> capstan_schema::provider_capnp::provider::Client {
    let (host_end, provider_end) = tokio::io::duplex(64 * 1024);
    let (pr, pw) = tokio::io::split(provider_end);
    let probe = Rc::default();
    tokio::task::spawn_local(provider(&probe).serve_stream(pr.compat(), pw.compat_write()));
    let (hr, hw) = tokio::io::split(host_end);
    let mut rpc = capstan_transport::rpc_system(
        hr.compat(),
        hw.compat_write(),
        capnp_rpc::rpc_twoparty_capnp::Side::Client,
        None,
        capstan_transport::TransportOptions::default(),
    );
    let client = rpc.bootstrap(capnp_rpc::rpc_twoparty_capnp::Side::Server);
    tokio::task::spawn_local(rpc);
    client
}

/// A host written against the schema alone, whose progress sink counts `finish()` and only
/// takes a result once `finish()` has arrived: the SDK must call it for every operation,
/// including one that reported nothing and one refused before it ran (a type the provider
/// does not serve).
#[test]
fn finish_is_called_for_every_operation_even_one_that_reported_nothing() {
    use capstan_schema::progress_capnp::progress_sink;

    struct CountingSink(Rc<Cell<u32>>, Rc<Notify>);
    impl progress_sink::Server for CountingSink {
        async fn push(
            self: capnp::capability::Rc<Self>,
            _: progress_sink::PushParams,
        ) -> Result<(), capnp::Error> {
            Ok(())
        }
        async fn finish(
            self: capnp::capability::Rc<Self>,
            _: progress_sink::FinishParams,
            _: progress_sink::FinishResults,
        ) -> Result<(), capnp::Error> {
            self.0.set(self.0.get() + 1);
            self.1.notify_one();
            Ok(())
        }
    }

    run_local(async {
        let client = raw_connection().await;
        for (resource_type, inputs, succeeds) in [
            ("echo", r#"{"value": 1}"#, true),
            ("nested", "{}", true),
            ("no-such-type", "{}", false),
        ] {
            let finished = Rc::new(Cell::new(0));
            let arrived = Rc::new(Notify::new());
            let sink: progress_sink::Client =
                capnp_rpc::new_client(CountingSink(finished.clone(), arrived.clone()));
            let mut request = client.create_request();
            {
                let mut op = request.get().init_request();
                op.set_resource_type(resource_type);
                op.set_address("raw");
                op.set_inputs(inputs);
                op.set_progress(sink);
            }
            let response = request.send().promise.await.expect("a result");
            assert_eq!(
                response.get().unwrap().get_result().unwrap().has_success(),
                succeeds,
                "`{resource_type}`"
            );
            // This host waits for finish() before it takes the result; a bounded wait, so a
            // provider that never calls it fails the test instead of hanging it.
            tokio::time::timeout(std::time::Duration::from_secs(10), async {
                while finished.get() == 0 {
                    arrived.notified().await;
                }
            })
            .await
            .unwrap_or_else(|_| panic!("`{resource_type}`: finish() never came"));
            assert_eq!(
                finished.get(),
                1,
                "`{resource_type}`: finish() exactly once"
            );
        }
    });
}

/// A host written against the schema alone that offers a `ProgressHub` in `hello`: the SDK
/// says `opensProgress` (and only to a host that offered one), and then takes requests that
/// carry no sink but a number. An operation that reports nothing opens no sink — its call is
/// all it costs; one that reports opens exactly one, its progress arrives there and ends with
/// `finish()` before the result; a request with neither a sink nor a number is refused.
#[test]
fn a_core_with_a_hub_gets_a_sink_opened_only_by_operations_that_report() {
    use capstan_schema::progress_capnp::{progress_hub, progress_sink};
    use capstan_schema::provider_capnp::provider;
    use std::cell::RefCell;

    #[derive(Default)]
    struct Seen {
        opened: RefCell<Vec<u64>>,
        items: Cell<u32>,
        finished: Cell<u32>,
    }
    struct Sink(Rc<Seen>);
    impl progress_sink::Server for Sink {
        async fn push(
            self: capnp::capability::Rc<Self>,
            params: progress_sink::PushParams,
        ) -> Result<(), capnp::Error> {
            let n = params.get()?.get_items()?.len();
            self.0.items.set(self.0.items.get() + n);
            Ok(())
        }
        async fn finish(
            self: capnp::capability::Rc<Self>,
            _: progress_sink::FinishParams,
            _: progress_sink::FinishResults,
        ) -> Result<(), capnp::Error> {
            self.0.finished.set(self.0.finished.get() + 1);
            Ok(())
        }
    }
    struct HubServer(Rc<Seen>);
    impl progress_hub::Server for HubServer {
        async fn open(
            self: capnp::capability::Rc<Self>,
            params: progress_hub::OpenParams,
            mut results: progress_hub::OpenResults,
        ) -> Result<(), capnp::Error> {
            self.0
                .opened
                .borrow_mut()
                .push(params.get()?.get_operation());
            results
                .get()
                .set_sink(capnp_rpc::new_client(Sink(self.0.clone())));
            Ok(())
        }
    }

    async fn hello(client: &provider::Client, hub: Option<progress_hub::Client>) -> bool {
        let mut request = client.hello_request();
        {
            let mut core = request.get().init_core();
            core.set_min_protocol(capstan_schema::MIN_PROTOCOL_VERSION);
            core.set_max_protocol(capstan_schema::PROTOCOL_VERSION);
            if let Some(hub) = hub {
                core.set_progress(hub);
            }
        }
        let response = request.send().promise.await.expect("hello");
        let info = response.get().unwrap().get_provider().unwrap();
        info.get_opens_progress()
    }

    let _tracing = tracing::subscriber::set_default(
        tracing_subscriber::registry().with(capstan_provider::progress_layer()),
    );
    run_local(async {
        // A host that offers no hub (an older core) is never told the provider opens sinks.
        let older = raw_connection().await;
        assert!(!hello(&older, None).await, "opensProgress without a hub");

        let client = raw_connection().await;
        let seen = Rc::new(Seen::default());
        let hub: progress_hub::Client = capnp_rpc::new_client(HubServer(seen.clone()));
        assert!(hello(&client, Some(hub)).await, "opensProgress with a hub");
        let create = |resource_type: &str, inputs: &str, operation: u64| {
            let mut request = client.create_request();
            {
                let mut op = request.get().init_request();
                op.set_resource_type(resource_type);
                op.set_address("raw");
                op.set_inputs(inputs);
                op.set_operation(operation);
                op.set_silent_finish_optional(true);
            }
            request
        };

        let response = create("echo", r#"{"value": 1}"#, 1)
            .send()
            .promise
            .await
            .expect("a result");
        assert!(response.get().unwrap().get_result().unwrap().has_success());
        assert!(
            seen.opened.borrow().is_empty(),
            "a silent operation opened a sink"
        );
        assert_eq!(seen.finished.get(), 0, "finish() from a silent operation");

        let response = create("flood", r#"{"count": 100}"#, 7)
            .send()
            .promise
            .await
            .expect("a result");
        assert!(response.get().unwrap().get_result().unwrap().has_success());
        assert_eq!(
            *seen.opened.borrow(),
            vec![7],
            "one sink, opened by its number"
        );
        assert!(
            seen.items.get() >= 100,
            "the events arrived before the result: {}",
            seen.items.get()
        );
        assert_eq!(seen.finished.get(), 1, "finish() before the result");

        let response = create("echo", r#"{"value": 1}"#, 0)
            .send()
            .promise
            .await
            .expect("a result");
        let result = response.get().unwrap().get_result().unwrap();
        assert!(
            !result.has_success(),
            "a request with no sink and no number"
        );
        let capstan_schema::provider_capnp::operation_result::Which::Failure(failure) =
            result.which().unwrap()
        else {
            unreachable!()
        };
        let message = failure.unwrap().get_message().unwrap().to_string().unwrap();
        assert!(message.contains("no progress sink"), "{message}");
    });
}

/// A connection that ended lets go of everything it held: the provider's resources are
/// dropped once the host has gone. (The progress hub a host offers is a capability that holds
/// the connection, and the connection holds the provider: kept past the end, that cycle kept
/// every connection a standing provider ever served.)
#[test]
fn a_connection_that_ended_frees_the_provider_it_served() {
    struct Tracked(Rc<Cell<bool>>);
    impl Drop for Tracked {
        fn drop(&mut self) {
            self.0.set(true);
        }
    }
    impl Resource for Tracked {
        type Inputs = Value;
        type Outputs = Value;
        fn resource_type() -> ResourceType {
            ResourceType::new("tracked")
        }
        async fn create(&self, op: &Operation, inputs: Value) -> Result<Value, OperationError> {
            // Reports something, so the operation opens a sink from the hub.
            op.event(capstan_schema::Level::Info, "made").await;
            Ok(inputs)
        }
    }
    run_local(async {
        let dropped = Rc::new(Cell::new(false));
        let provider = Provider::new("mem", "0.0.1").resource(Tracked(dropped.clone()));
        let h = connect(provider, 65536).await;
        assert!(
            h.connection.info().opens_progress,
            "the SDK opens its sinks"
        );
        let recorder = Recorder::default();
        h.connection
            .call(create("tracked", json!({"a": 1})), recorder.observer())
            .await
            .expect("created");
        assert!(!dropped.get());
        h.connection.shutdown().await;
        tokio::time::timeout(std::time::Duration::from_secs(10), h.server)
            .await
            .expect("the provider's side ends with the connection")
            .unwrap()
            .ok();
        // Whatever the RPC system's tasks still had to do with the ended connection.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(
            dropped.get(),
            "the provider's resources outlived its connection"
        );
    });
}
