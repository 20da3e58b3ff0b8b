//! Every run as one OpenTelemetry trace, exported over OTLP — and nothing at all when off.
//!
//! Turned on as Terraform and OpenTofu turn theirs on, by OpenTelemetry's own variables:
//! `OTEL_TRACES_EXPORTER=otlp`, `OTEL_EXPORTER_OTLP_ENDPOINT` (or `…_TRACES_ENDPOINT`),
//! `OTEL_EXPORTER_OTLP_PROTOCOL` (`grpc` or `http/protobuf`), `OTEL_EXPORTER_OTLP_HEADERS`,
//! `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`; `TRACEPARENT` makes the run a child of the
//! caller's trace (see `capstan_engine::trace`).
//!
//! The spans are made from the run's events ([`TraceEvents`] sits in the event pipeline, after
//! the redaction every other channel gets, so a secret is never exported): the run; each
//! evaluation stage of a deployment in Nix; each resource operation, with the span id its
//! provider was given as `traceparent`; under it, the spans the provider reported through the
//! progress protocol with their parents kept (its SDK's `tracing` spans, the nix provider's
//! activity tree: builds, substitutions, copies); log lines and events become span events,
//! counters attributes. Finished spans go to a bounded queue that a thread of its own exports:
//! a collector that is down or slow never slows or fails a run, and what could not be sent is
//! counted and reported once, at the end.

#![forbid(unsafe_code)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use capstan_engine::events::{Event, EventSink};
use capstan_engine::trace::RunTrace;
use capstan_schema::progress::ProgressKind;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter, SpanLinks};

/// How many finished spans may wait for the exporter; more are dropped (and counted).
const QUEUE: usize = 16384;
/// The exporter thread's niceness: it yields to the run's threads when the machine is busy.
const NICE: i32 = 10;
/// Spans sent in one export.
const BATCH: usize = 2048;
/// How long a batch waits to fill before it is sent anyway (the run's end sends at once).
const LINGER: Duration = Duration::from_millis(500);
/// How long the end of a run waits for the last spans to go out.
const FLUSH: Duration = Duration::from_secs(5);

/// The protocols OTLP speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
}

/// What the environment asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub protocol: Protocol,
}

impl Config {
    /// `None` unless `OTEL_TRACES_EXPORTER` says `otlp` (OpenTelemetry's default is also
    /// `otlp`, but a deployment tool that starts sending its runs somewhere unasked would
    /// surprise: it is off unless set). A value it does not know is an error, not ignored.
    pub fn from_env() -> Result<Option<Config>, String> {
        Self::from_values(&|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
    }

    pub fn from_values(env: &dyn Fn(&str) -> Option<String>) -> Result<Option<Config>, String> {
        match env("OTEL_TRACES_EXPORTER").as_deref() {
            None | Some("none") => return Ok(None),
            Some("otlp") => {}
            Some(other) => {
                return Err(format!(
                    "OTEL_TRACES_EXPORTER={other}: capstan exports traces over OTLP (`otlp`) or not at all (`none`)"
                ))
            }
        }
        let protocol = env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"));
        let protocol = match protocol.as_deref() {
            None | Some("http/protobuf") => Protocol::HttpProtobuf,
            Some("grpc") => Protocol::Grpc,
            Some(other) => {
                return Err(format!(
                    "OTEL_EXPORTER_OTLP_PROTOCOL={other}: capstan speaks `grpc` and `http/protobuf`"
                ))
            }
        };
        // The exporter falls back to its default (`localhost`) on an endpoint it cannot read:
        // traces would go wherever that is, unasked.
        for name in [
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ] {
            if let Some(endpoint) = env(name) {
                check_endpoint(&endpoint).map_err(|why| format!("{name}={endpoint}: {why}"))?;
            }
        }
        Ok(Some(Config { protocol }))
    }
}

/// An OTLP endpoint is an `http://` or `https://` URL with a host (`http://collector:4318`).
fn check_endpoint(endpoint: &str) -> Result<(), String> {
    let hint = "give the collector's URL, such as `http://localhost:4318` (http/protobuf) or `http://localhost:4317` (grpc)";
    // The URL parser forgives spaces and control characters (a CRLF `.env` file's `\r`)
    // that the exporter's does not, which then falls back to localhost.
    if endpoint
        .chars()
        .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(format!("it holds a space or a control character; {hint}"));
    }
    let url = url::Url::parse(endpoint).map_err(|e| format!("not a URL ({e}); {hint}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "the scheme must be `http` or `https`, not `{}`; {hint}",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("no host; {hint}"));
    }
    Ok(())
}

/// What the export did, told once at the end of a run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub exported: u64,
    /// Spans that never reached the collector: the queue was full, an export failed, or the
    /// end of the run could not wait longer.
    pub dropped: u64,
    /// The first export error, if any.
    pub error: Option<String>,
}

#[derive(Default)]
struct Counts {
    /// Spans queued and not yet taken by the exporter.
    pending: AtomicU64,
    exported: AtomicU64,
    dropped: AtomicU64,
    error: std::sync::Mutex<Option<String>>,
    /// Set with every wake-up of the exporter's thread, beside the thread's park token. The
    /// token alone is not enough: the HTTP exporter runs each request with
    /// `futures::executor::block_on`, which parks and is unparked on the same thread, so a
    /// wake-up arriving during an export was taken by it, and the exporter then slept its
    /// whole `LINGER` before the run's last spans went out (0.5 s added to one run in ~15).
    woken: AtomicBool,
}

impl Counts {
    /// Wakes the exporter's `thread` (a batch is full, or the run ended).
    fn wake(&self, thread: &std::thread::Thread) {
        self.woken.store(true, Ordering::Release);
        thread.unpark();
    }

    /// On the exporter's thread: sleeps until woken or `timeout` has passed — not at all when
    /// woken since the last call or when a batch is already waiting.
    fn sleep(&self, timeout: Duration) {
        if self.woken.swap(false, Ordering::AcqRel)
            || self.pending.load(Ordering::Acquire) >= BATCH as u64
        {
            return;
        }
        std::thread::park_timeout(timeout);
    }
}

/// The exporter's side: a bounded queue and the thread that empties it.
pub struct Telemetry {
    queue: Option<mpsc::SyncSender<SpanData>>,
    counts: Arc<Counts>,
    /// The exporter's thread, woken when a batch is full or the run ends.
    exporter: std::thread::Thread,
    done: mpsc::Receiver<()>,
    /// Spans handed to the queue.
    queued: Rc<AtomicU64>,
}

impl Telemetry {
    /// Starts the export described by `config` (the exporter reads the endpoint, headers and
    /// timeout from OpenTelemetry's variables itself).
    pub fn start(config: &Config) -> Result<Telemetry, String> {
        let (queue, spans) = mpsc::sync_channel::<SpanData>(QUEUE);
        let counts = Arc::new(Counts::default());
        let (ready, started) = mpsc::channel::<Result<(), String>>();
        let (finished, done) = mpsc::channel();
        let for_thread = counts.clone();
        let protocol = config.protocol;
        let exporter = std::thread::Builder::new()
            .name("capstan-otlp".into())
            .spawn(move || {
                // Below the run's own threads: the export takes what they leave, and the end
                // of the run waits for the rest (a failure to lower it changes nothing else).
                let _ = rustix::process::setpriority_process(Some(rustix::thread::gettid()), NICE);
                // gRPC (tonic) needs a Tokio runtime, built and run here; HTTP's blocking
                // client must not run inside one (it has its own).
                let runtime = match protocol {
                    Protocol::Grpc => match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(runtime) => Some(runtime),
                        Err(e) => {
                            let _ = ready.send(Err(e.to_string()));
                            return;
                        }
                    },
                    Protocol::HttpProtobuf => None,
                };
                let exporter = match &runtime {
                    Some(runtime) => runtime.block_on(async { build_exporter(protocol) }),
                    None => build_exporter(protocol),
                };
                let mut exporter = match exporter {
                    Ok(exporter) => {
                        let _ = ready.send(Ok(()));
                        exporter
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                };
                exporter.set_resource(&resource());
                export_loop(runtime.as_ref(), &mut exporter, spans, &for_thread);
                let _ = exporter.shutdown_with_timeout(Duration::from_secs(1));
                let _ = finished.send(());
            })
            .map_err(|e| e.to_string())?
            .thread()
            .clone();
        started
            .recv()
            .unwrap_or_else(|_| Err("the exporter's thread stopped".into()))?;
        Ok(Telemetry {
            queue: Some(queue),
            counts,
            exporter,
            done,
            queued: Rc::new(AtomicU64::new(0)),
        })
    }

    /// The sink that turns `inner`'s events into spans too (put it where the events are
    /// already redacted); `command` names the run (`apply`, …).
    pub fn sink(&self, inner: Rc<dyn EventSink>, command: &str) -> Rc<TraceEvents> {
        Rc::new(TraceEvents {
            inner,
            builder: RefCell::new(Builder::new(capstan_engine::trace::run(), command)),
            queue: RefCell::new(self.queue.clone()),
            counts: self.counts.clone(),
            exporter: self.exporter.clone(),
            queued: self.queued.clone(),
        })
    }

    /// Sends what is left and says what happened (waits at most a few seconds).
    pub fn finish(mut self) -> Report {
        self.queue = None;
        self.counts.wake(&self.exporter);
        let waited = self.done.recv_timeout(FLUSH).is_ok();
        let exported = self.counts.exported.load(Ordering::Relaxed);
        let mut dropped = self.counts.dropped.load(Ordering::Relaxed);
        if !waited {
            // Whatever was queued and not exported by now is not going to be.
            let queued = self.queued.load(Ordering::Relaxed);
            dropped = dropped.max(queued.saturating_sub(exported));
        }
        Report {
            exported,
            dropped,
            error: self.counts.error.lock().ok().and_then(|e| e.clone()),
        }
    }
}

fn build_exporter(protocol: Protocol) -> Result<opentelemetry_otlp::SpanExporter, String> {
    use opentelemetry_otlp::WithExportConfig;
    let built = match protocol {
        Protocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_timeout(Duration::from_secs(3))
            .build(),
        Protocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_timeout(Duration::from_secs(3))
            .build(),
    };
    built.map_err(|e| format!("cannot set up the OTLP exporter: {e}"))
}

/// The service (`capstan`, unless `OTEL_SERVICE_NAME` says) and `OTEL_RESOURCE_ATTRIBUTES`.
fn resource() -> opentelemetry_sdk::Resource {
    let builder = opentelemetry_sdk::Resource::builder();
    let builder = if std::env::var_os("OTEL_SERVICE_NAME").is_some() {
        builder
    } else {
        builder.with_service_name("capstan")
    };
    builder
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build()
}

fn export_loop(
    runtime: Option<&tokio::runtime::Runtime>,
    exporter: &mut opentelemetry_otlp::SpanExporter,
    spans: mpsc::Receiver<SpanData>,
    counts: &Counts,
) {
    // The thread sleeps until a batch is full, the run ends (both wake it) or `LINGER` has
    // passed, then sends what is queued in batches. Waking it per span (a blocking `recv`)
    // costs the engine's thread a futex call per span and sends a request per handful of
    // spans; a request costs far more than the spans in it.
    loop {
        counts.sleep(LINGER);
        let mut closed = false;
        loop {
            let waiting = counts.pending.load(Ordering::Acquire) as usize;
            let mut batch = Vec::with_capacity(waiting.clamp(1, BATCH));
            while batch.len() < BATCH {
                match spans.try_recv() {
                    Ok(span) => batch.push(span),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                }
            }
            if batch.is_empty() {
                break;
            }
            let n = batch.len() as u64;
            counts.pending.fetch_sub(n, Ordering::AcqRel);
            let exported = match runtime {
                Some(runtime) => runtime.block_on(exporter.export(batch)),
                None => futures::executor::block_on(exporter.export(batch)),
            };
            match exported {
                Ok(()) => {
                    counts.exported.fetch_add(n, Ordering::Relaxed);
                }
                Err(e) => {
                    counts.dropped.fetch_add(n, Ordering::Relaxed);
                    if let Ok(mut first) = counts.error.lock() {
                        first.get_or_insert_with(|| e.to_string());
                    }
                }
            }
            if n < BATCH as u64 {
                break;
            }
        }
        if closed {
            return;
        }
    }
}

/// The event sink that makes spans of the events it passes on.
pub struct TraceEvents {
    inner: Rc<dyn EventSink>,
    builder: RefCell<Builder>,
    /// Until the run ends (then closed, so that the exporter's thread can finish).
    queue: RefCell<Option<mpsc::SyncSender<SpanData>>>,
    counts: Arc<Counts>,
    exporter: std::thread::Thread,
    queued: Rc<AtomicU64>,
}

impl TraceEvents {
    /// The command failed with `message` (exit code `code`): the run's span says so.
    pub fn failed(&self, message: &str, code: u8) {
        if let Some(run) = &mut self.builder.borrow_mut().run {
            run.data.status = Status::error(message.to_string());
            run.data
                .attributes
                .push(KeyValue::new("process.exit.code", code as i64));
        }
    }

    /// Ends the run's span (and any left open) now: the run is over, and nothing more is
    /// exported.
    pub fn end(&self) {
        let spans = self.builder.borrow_mut().end(SystemTime::now());
        self.send(spans);
        self.queue.borrow_mut().take();
        self.counts.wake(&self.exporter);
    }

    fn send(&self, spans: Vec<SpanData>) {
        let queue = self.queue.borrow();
        let Some(queue) = queue.as_ref() else { return };
        for span in spans {
            if !span.span_context.is_sampled() {
                continue;
            }
            match queue.try_send(span) {
                Ok(()) => {
                    self.queued.fetch_add(1, Ordering::Relaxed);
                    if self.counts.pending.fetch_add(1, Ordering::AcqRel) + 1 == BATCH as u64 {
                        self.counts.wake(&self.exporter);
                    }
                }
                Err(_) => {
                    self.counts.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

impl EventSink for TraceEvents {
    fn emit(&self, event: Event) {
        let finished = self.builder.borrow_mut().event(&event, SystemTime::now());
        self.send(finished);
        self.inner.emit(event);
    }
}

/// A span being built.
struct Open {
    data: SpanData,
}

impl Open {
    /// Its span id, as the events and providers give ids.
    fn id(&self) -> u64 {
        u64::from_be_bytes(self.data.span_context.span_id().to_bytes())
    }
}

/// Spans from events: those open, by what they belong to.
struct Builder {
    trace_id: TraceId,
    flags: TraceFlags,
    run: Option<Open>,
    /// Each resource's open operation span.
    operations: HashMap<String, Open>,
    /// Spans a provider reported, by (resource, the provider's id for it).
    reported: HashMap<(String, u64), Open>,
    /// Each evaluation stage's span, by stage.
    stages: HashMap<usize, Open>,
}

impl Builder {
    fn new(run: Option<RunTrace>, command: &str) -> Builder {
        let run = run.unwrap_or_else(|| capstan_engine::trace::start_run(None));
        let trace_id = TraceId::from(run.trace_id);
        let flags = if run.sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        let mut root = span(
            trace_id,
            flags,
            run.span_id,
            run.parent.unwrap_or(0),
            format!("capstan {command}"),
            SystemTime::now(),
            SpanKind::Internal,
        );
        root.parent_span_is_remote = run.parent.is_some();
        // The subcommand's name only: the command line may hold a password (a state's URL).
        root.attributes
            .push(KeyValue::new("capstan.command", command.to_string()));

        Builder {
            trace_id,
            flags,
            run: Some(Open { data: root }),
            operations: HashMap::new(),
            reported: HashMap::new(),
            stages: HashMap::new(),
        }
    }

    fn root_id(&self) -> u64 {
        self.run.as_ref().map(Open::id).unwrap_or(0)
    }

    fn child(&self, id: u64, parent: u64, name: String, at: SystemTime) -> SpanData {
        span(
            self.trace_id,
            self.flags,
            id,
            parent,
            name,
            at,
            SpanKind::Internal,
        )
    }

    /// Takes in one event; returns the spans it finished.
    fn event(&mut self, event: &Event, now: SystemTime) -> Vec<SpanData> {
        let mut done = Vec::new();
        match event {
            Event::Plan { changes } => {
                if let Some(run) = &mut self.run {
                    run.data
                        .attributes
                        .push(KeyValue::new("capstan.plan.changes", changes.len() as i64));
                }
            }
            Event::EvaluationStart { file, stage } => {
                let mut data = self.child(
                    random_id(),
                    self.root_id(),
                    format!("evaluate stage {stage}"),
                    now,
                );
                data.attributes.extend([
                    KeyValue::new("code.filepath", file.clone()),
                    KeyValue::new("capstan.evaluation.stage", *stage as i64),
                ]);
                self.stages.insert(*stage, Open { data });
            }
            Event::EvaluationComplete {
                stage,
                resources,
                deferred,
                ..
            } => {
                if let Some(mut open) = self.stages.remove(stage) {
                    open.data.attributes.extend([
                        KeyValue::new("capstan.evaluation.resources", *resources as i64),
                        KeyValue::new("capstan.evaluation.deferred", *deferred as i64),
                    ]);
                    open.data.status = Status::Ok;
                    open.data.end_time = now;
                    done.push(open.data);
                }
            }
            Event::EvaluationFailed { stage, error, .. } => {
                if let Some(mut open) = self.stages.remove(stage) {
                    open.data.status = Status::error(error.clone());
                    open.data.end_time = now;
                    done.push(open.data);
                }
            }
            Event::EvaluationLog { line, .. } => {
                self.event_on_run("log", now, vec![KeyValue::new("log.message", line.clone())])
            }
            Event::ResourceStart {
                address,
                operation,
                provider,
                resource_type,
            } => {
                let id = capstan_engine::trace::operation_span(address).unwrap_or_else(random_id);
                // A child a provider asked for (`parent/child`) is part of its parent's
                // operation while that runs.
                let parent = address
                    .rsplit_once('/')
                    .and_then(|(parent, _)| self.operations.get(parent))
                    .map(Open::id)
                    .unwrap_or_else(|| self.root_id());
                let mut data = self.child(id, parent, format!("{operation} {address}"), now);
                data.attributes.extend([
                    KeyValue::new("capstan.resource.address", address.clone()),
                    KeyValue::new("capstan.resource.type", resource_type.clone()),
                    KeyValue::new("capstan.provider", provider.clone()),
                    KeyValue::new("capstan.operation", *operation),
                ]);
                if let Some(old) = self.operations.insert(address.clone(), Open { data }) {
                    done.push(old.data);
                }
            }
            Event::ResourceProgress {
                address, progress, ..
            } => self.progress(address, progress, &mut done),
            Event::ResourceComplete {
                address,
                elapsed_seconds,
                ..
            } => self.end_operation(address, now, Status::Ok, None, *elapsed_seconds, &mut done),
            Event::ResourceFailed {
                address,
                error,
                kind,
                elapsed_seconds,
                ..
            } => {
                let kind = serde_json::to_value(kind)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                self.end_operation(
                    address,
                    now,
                    Status::error(error.clone()),
                    Some(kind),
                    *elapsed_seconds,
                    &mut done,
                );
            }
            Event::ResourceSkipped {
                address,
                operation,
                reason,
                dependency,
            } => {
                let mut data = self.child(
                    random_id(),
                    self.root_id(),
                    format!("{operation} {address}"),
                    now,
                );
                data.attributes.extend([
                    KeyValue::new("capstan.resource.address", address.clone()),
                    KeyValue::new("capstan.operation", *operation),
                    KeyValue::new("capstan.outcome", "skipped"),
                    KeyValue::new("capstan.skipped.reason", reason.clone()),
                    KeyValue::new("capstan.skipped.dependency", dependency.clone()),
                ]);
                data.end_time = now;
                done.push(data);
            }
            Event::ProviderLog {
                provider,
                stream,
                line,
            } => self.event_on_run(
                "log",
                now,
                vec![
                    KeyValue::new("capstan.provider", provider.clone()),
                    KeyValue::new("log.iostream", stream_name(*stream)),
                    KeyValue::new("log.message", line.clone()),
                ],
            ),
            Event::Interrupted { message } => self.event_on_run(
                "interrupted",
                now,
                vec![KeyValue::new("message", message.clone())],
            ),
            Event::Error { message, exit_code } => {
                if let Some(run) = &mut self.run {
                    run.data.status = Status::error(message.clone());
                    run.data
                        .attributes
                        .push(KeyValue::new("process.exit.code", *exit_code as i64));
                }
            }
            Event::Summary { counts, .. } => {
                if let Some(run) = &mut self.run {
                    if let Ok(serde_json::Value::Object(map)) = serde_json::to_value(counts) {
                        for (name, value) in &map {
                            if let Some(n) = value.as_i64() {
                                run.data
                                    .attributes
                                    .push(KeyValue::new(format!("capstan.summary.{name}"), n));
                            }
                        }
                        let failed = map.get("failed").and_then(|v| v.as_i64()).unwrap_or(0);
                        run.data.status = if failed > 0 {
                            Status::error(format!("{failed} resource(s) failed"))
                        } else {
                            Status::Ok
                        };
                    }
                }
                done.extend(self.end(now));
            }
            Event::Deferred { .. } | Event::NotSelected { .. } => {}
        }
        done
    }

    fn event_on_run(&mut self, name: &'static str, at: SystemTime, attributes: Vec<KeyValue>) {
        if let Some(run) = &mut self.run {
            run.data
                .events
                .events
                .push(opentelemetry::trace::Event::new(name, at, attributes, 0));
        }
    }

    fn progress(
        &mut self,
        address: &str,
        progress: &capstan_schema::ProgressEvent,
        done: &mut Vec<SpanData>,
    ) {
        let at = UNIX_EPOCH + Duration::from_nanos(progress.time_unix_nanos);
        let operation_id = match self.operations.get(address) {
            Some(open) => open.id(),
            None => return,
        };
        let key = |id: u64| (address.to_string(), id);
        match &progress.kind {
            ProgressKind::SpanStart {
                id,
                parent,
                name,
                level,
                target,
                fields,
            } => {
                let parent_id = match self.reported.get(&key(*parent)) {
                    Some(open) if *parent != 0 => open.id(),
                    _ => operation_id,
                };
                let mut data = self.child(random_id(), parent_id, span_name(name, fields), at);
                data.attributes
                    .push(KeyValue::new("code.namespace", target.clone()));
                data.attributes
                    .push(KeyValue::new("capstan.level", level.as_str()));
                for (field, value) in fields {
                    data.attributes
                        .push(KeyValue::new(field.clone(), value.clone()));
                }
                if let Some(old) = self.reported.insert(key(*id), Open { data }) {
                    done.push(old.data);
                }
            }
            ProgressKind::SpanEnd { id } => {
                if let Some(mut open) = self.reported.remove(&key(*id)) {
                    open.data.end_time = at;
                    done.push(open.data);
                }
            }
            ProgressKind::Event {
                span,
                level,
                message,
                target,
                fields,
            } => {
                let mut attributes = vec![
                    KeyValue::new("capstan.level", level.as_str()),
                    KeyValue::new("code.namespace", target.clone()),
                ];
                for (field, value) in fields {
                    attributes.push(KeyValue::new(field.clone(), value.clone()));
                }
                let event = opentelemetry::trace::Event::new(message.clone(), at, attributes, 0);
                self.target(address, *span).events.events.push(event);
            }
            ProgressKind::Log { span, stream, line } => {
                let event = opentelemetry::trace::Event::new(
                    "log",
                    at,
                    vec![
                        KeyValue::new("log.iostream", stream_name(*stream)),
                        KeyValue::new("log.message", line.clone()),
                    ],
                    0,
                );
                self.target(address, *span).events.events.push(event);
            }
            ProgressKind::Counter {
                span,
                done: count,
                expected,
                unit,
            } => {
                let data = self.target(address, *span);
                set_attribute(data, "capstan.progress.done", *count as i64);
                set_attribute(data, "capstan.progress.expected", *expected as i64);
                if !unit.is_empty() {
                    data.attributes
                        .retain(|kv| kv.key.as_str() != "capstan.progress.unit");
                    data.attributes
                        .push(KeyValue::new("capstan.progress.unit", unit.clone()));
                }
            }
            ProgressKind::Phase { span, name } => {
                let event = opentelemetry::trace::Event::new(
                    "phase",
                    at,
                    vec![KeyValue::new("capstan.phase", name.clone())],
                    0,
                );
                self.target(address, *span).events.events.push(event);
            }
        }
    }

    /// The span a provider's item is about: one it reported, else the operation's.
    fn target(&mut self, address: &str, span: u64) -> &mut SpanData {
        let key = (address.to_string(), span);
        if span != 0 && self.reported.contains_key(&key) {
            return &mut self.reported.get_mut(&key).expect("just looked").data;
        }
        &mut self
            .operations
            .get_mut(address)
            .expect("progress comes between an operation's start and end")
            .data
    }

    fn end_operation(
        &mut self,
        address: &str,
        at: SystemTime,
        status: Status,
        error_kind: Option<String>,
        elapsed_seconds: f64,
        done: &mut Vec<SpanData>,
    ) {
        // What the provider left open ends with its operation.
        let left: Vec<(String, u64)> = self
            .reported
            .keys()
            .filter(|(a, _)| a == address)
            .cloned()
            .collect();
        for key in left {
            if let Some(mut open) = self.reported.remove(&key) {
                open.data.end_time = at;
                done.push(open.data);
            }
        }
        if let Some(mut open) = self.operations.remove(address) {
            // The status says it succeeded, the span's times how long it took: only a failure
            // adds attributes (every attribute is encoded and sent once per operation).
            open.data.status = status;
            if let Some(kind) = error_kind {
                open.data.attributes.extend([
                    KeyValue::new("capstan.outcome", "failed"),
                    KeyValue::new("error.type", kind),
                    KeyValue::new("capstan.elapsed_seconds", elapsed_seconds),
                ]);
            }
            open.data.end_time = at;
            done.push(open.data);
        }
    }

    /// Ends everything still open, the run last.
    fn end(&mut self, at: SystemTime) -> Vec<SpanData> {
        let mut done = Vec::new();
        for (_, mut open) in self.reported.drain() {
            open.data.end_time = at;
            done.push(open.data);
        }
        for (_, mut open) in self.operations.drain() {
            open.data.end_time = at;
            open.data
                .attributes
                .push(KeyValue::new("capstan.outcome", "unfinished"));
            done.push(open.data);
        }
        for (_, mut open) in self.stages.drain() {
            open.data.end_time = at;
            done.push(open.data);
        }
        if let Some(mut run) = self.run.take() {
            run.data.end_time = at;
            done.push(run.data);
        }
        done
    }
}

fn set_attribute(data: &mut SpanData, key: &'static str, value: i64) {
    data.attributes.retain(|kv| kv.key.as_str() != key);
    data.attributes.push(KeyValue::new(key, value));
}

/// A reported span's name: Nix's activities are all `nix`, told apart by their `activity`.
fn span_name(name: &str, fields: &[(String, String)]) -> String {
    match fields.iter().find(|(f, _)| f == "activity") {
        Some((_, activity)) if name == "nix" => format!("nix {activity}"),
        _ => name.to_string(),
    }
}

fn stream_name(stream: capstan_schema::progress::LogStream) -> &'static str {
    use capstan_schema::progress::LogStream;
    match stream {
        LogStream::Stdout => "stdout",
        LogStream::Stderr => "stderr",
        LogStream::Other => "other",
    }
}

fn span(
    trace_id: TraceId,
    flags: TraceFlags,
    id: u64,
    parent: u64,
    name: String,
    start: SystemTime,
    kind: SpanKind,
) -> SpanData {
    SpanData {
        span_context: SpanContext::new(
            trace_id,
            SpanId::from(id),
            flags,
            false,
            TraceState::default(),
        ),
        parent_span_id: SpanId::from(parent),
        parent_span_is_remote: false,
        span_kind: kind,
        name: name.into(),
        start_time: start,
        end_time: start,
        attributes: Vec::new(),
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: Status::Unset,
        instrumentation_scope: scope(),
    }
}

/// Capstan's instrumentation scope, made once.
fn scope() -> InstrumentationScope {
    static SCOPE: std::sync::OnceLock<InstrumentationScope> = std::sync::OnceLock::new();
    SCOPE
        .get_or_init(|| {
            InstrumentationScope::builder("capstan")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build()
        })
        .clone()
}

fn random_id() -> u64 {
    capstan_schema::TraceContext::random().span_id
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A wake-up whose park token something else on the exporter's thread took (the HTTP
    /// exporter's `block_on` parks while its request is out) still wakes the exporter: it
    /// does not sleep on. Before the flag, this slept the whole timeout.
    #[test]
    fn a_wake_up_taken_by_another_park_on_the_thread_is_not_lost() {
        let counts = Counts::default();
        counts.wake(&std::thread::current());
        // What `futures::executor::block_on` does during an export: parks, and returns at
        // once on the token the wake-up left.
        std::thread::park();
        let started = std::time::Instant::now();
        counts.sleep(Duration::from_secs(60));
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the exporter slept through its wake-up"
        );
    }

    #[test]
    fn off_unless_asked_and_unknown_values_are_errors() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(Config::from_values(&env(&[])), Ok(None));
        assert_eq!(
            Config::from_values(&env(&[("OTEL_TRACES_EXPORTER", "none")])),
            Ok(None)
        );
        assert_eq!(
            Config::from_values(&env(&[("OTEL_TRACES_EXPORTER", "otlp")])),
            Ok(Some(Config {
                protocol: Protocol::HttpProtobuf
            }))
        );
        assert_eq!(
            Config::from_values(&env(&[
                ("OTEL_TRACES_EXPORTER", "otlp"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
            ])),
            Ok(Some(Config {
                protocol: Protocol::Grpc
            }))
        );
        assert!(Config::from_values(&env(&[("OTEL_TRACES_EXPORTER", "zipkin")])).is_err());
        // An endpoint the exporter would silently replace by localhost is an error.
        for bad in [
            "collector.example:4999",
            "::::",
            "http://[::1",
            "ftp://collector",
            "http://",
            "http://collector:4318\r",
            " http://collector:4318",
        ] {
            for name in [
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            ] {
                let vars: &'static [(&'static str, &'static str)] =
                    Box::leak(Box::new([("OTEL_TRACES_EXPORTER", "otlp"), (name, bad)]));
                let error = Config::from_values(&env(vars)).unwrap_err();
                assert!(error.starts_with(&format!("{name}={bad}: ")), "{error}");
            }
        }
        for good in [
            "http://localhost:4318",
            "https://collector.example/otlp",
            "http://[::1]:4317",
        ] {
            let vars: &'static [(&'static str, &'static str)] = Box::leak(Box::new([
                ("OTEL_TRACES_EXPORTER", "otlp"),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", good),
            ]));
            assert!(Config::from_values(&env(vars)).is_ok(), "{good}");
        }
        assert!(Config::from_values(&env(&[
            ("OTEL_TRACES_EXPORTER", "otlp"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/jsonx")
        ]))
        .is_err());
    }
}
