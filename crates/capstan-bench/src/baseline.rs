//! The raw baselines each figure is compared with, measured in the same run: Unix-socket
//! ping-pong, raw `-> stream` calls, bare capnp-rpc calls (child processes of this binary).

use super::*;

// ---- raw baselines (child processes of this binary) ----------------------------------------

/// Pins a process (0: this one) to one CPU. Round trips between two processes depend a lot on
/// whether the scheduler puts them on one core or two; every round-trip figure here is taken
/// with the two sides on different cores, the case a real deployment has.
pub(super) fn online_cpus() -> usize {
    // Not available_parallelism(): that shrinks to the current affinity mask.
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }).max(1) as usize
}

pub(super) fn pin(pid: u32, cpu: usize) {
    let cpus = online_cpus();
    if cpus < 2 {
        return;
    }
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET and sched_setaffinity only read/write it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu % cpus, &mut set);
        libc::sched_setaffinity(
            pid as libc::pid_t,
            std::mem::size_of::<libc::cpu_set_t>(),
            &set,
        );
    }
}

pub(super) fn unpin() {
    let cpus = online_cpus();
    // SAFETY: as in `pin`.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for cpu in 0..cpus {
            libc::CPU_SET(cpu, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// A child process echoing 64-byte messages on a Unix socket, pinned to CPU 1 with this thread
/// on CPU 0 (as the host and the provider are); unpinned and reaped on drop.
pub(super) struct EchoPeer {
    pub(super) stream: UnixStream,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl EchoPeer {
    pub(super) fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("echo.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let child = Command::new(std::env::current_exe().unwrap())
            .args(["raw-echo", path.to_str().unwrap()])
            .spawn()
            .expect("spawn echo child");
        let (stream, _) = listener.accept().expect("accept");
        pin(0, 0);
        pin(child.id(), 1);
        EchoPeer {
            stream,
            child,
            _dir: dir,
        }
    }
}

impl Drop for EchoPeer {
    fn drop(&mut self) {
        unpin();
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        let _ = self.child.wait();
    }
}

pub(super) fn raw_rtt_us(pings: u32) -> f64 {
    let mut peer = EchoPeer::start();
    let stream = &mut peer.stream;
    let mut buf = [7u8; 64];
    for _ in 0..100 {
        stream.write_all(&buf).unwrap();
        stream.read_exact(&mut buf).unwrap();
    }
    let start = Instant::now();
    for _ in 0..pings {
        stream.write_all(&buf).unwrap();
        stream.read_exact(&mut buf).unwrap();
    }
    start.elapsed().as_secs_f64() * 1e6 / pings as f64
}

pub(super) fn raw_echo_child(path: &str) {
    let mut stream = UnixStream::connect(path).expect("connect");
    let mut buf = [0u8; 64];
    while stream.read_exact(&mut buf).is_ok() {
        if stream.write_all(&buf).is_err() {
            break;
        }
    }
}

pub(super) struct CountingSink(pub(super) Rc<Cell<u64>>);

impl progress_sink::Server for CountingSink {
    async fn push(
        self: CapRc<Self>,
        params: progress_sink::PushParams,
    ) -> Result<(), capnp::Error> {
        let items = params.get()?.get_items()?;
        for item in items {
            if ProgressEvent::read(item)?.is_some() {
                self.0.set(self.0.get() + 1);
            }
        }
        Ok(())
    }
    async fn finish(
        self: CapRc<Self>,
        _: progress_sink::FinishParams,
        _: progress_sink::FinishResults,
    ) -> Result<(), capnp::Error> {
        Ok(())
    }
}

/// Serves `sink` as the bootstrap capability on `stream`, with plain `twoparty` (nothing of
/// Capstan's), on this thread's local set.
pub(super) fn serve_sink(stream: tokio::net::UnixStream, sink: CountingSink) {
    let (r, w) = stream.into_split();
    let client: progress_sink::Client = capnp_rpc::new_client(sink);
    let network = twoparty::VatNetwork::new(
        futures::io::BufReader::new(r.compat()),
        futures::io::BufWriter::new(w.compat_write()),
        Side::Server,
        Default::default(),
    );
    tokio::task::spawn_local(RpcSystem::new(Box::new(network), Some(client.client)));
}

/// The sink [`serve_sink`] offers at `path`, from another process.
pub(super) async fn connect_sink(path: &str) -> progress_sink::Client {
    let stream = tokio::net::UnixStream::connect(path)
        .await
        .expect("connect");
    let (r, w) = stream.into_split();
    let network = twoparty::VatNetwork::new(
        futures::io::BufReader::new(r.compat()),
        futures::io::BufWriter::new(w.compat_write()),
        Side::Client,
        Default::default(),
    );
    let mut system = RpcSystem::new(Box::new(network), None);
    let sink: progress_sink::Client = system.bootstrap(Side::Server);
    tokio::task::spawn_local(system);
    sink
}

/// Raw `-> stream` calls from a child process to a sink in this one, in `batches` (the
/// sizes Capstan's pipeline sent, in order), so both send the same batches.
pub(super) fn raw_stream_events_per_s(batches: &[u64]) -> f64 {
    let events: u64 = batches.iter().sum();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("stream.sock");
    let batch_file = dir.path().join("batches");
    std::fs::write(
        &batch_file,
        batches
            .iter()
            .map(|b| b.to_string())
            .collect::<Vec<_>>()
            .join("\n"),
    )
    .expect("write the batch sizes");
    local(async {
        let listener = tokio::net::UnixListener::bind(&path).expect("bind");
        let child = tokio::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "raw-stream-sender",
                path.to_str().unwrap(),
                batch_file.to_str().unwrap(),
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn sender");
        let (stream, _) = listener.accept().await.expect("accept");
        let count = Rc::new(Cell::new(0));
        serve_sink(stream, CountingSink(count.clone()));
        let output = child.wait_with_output().await.expect("sender output");
        let rate: f64 = String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .expect("sender prints a rate");
        assert_eq!(count.get(), events, "the sink saw every event");
        rate
    })
}

pub(super) fn raw_stream_sender(path: &str, batch_file: &Path) {
    let batches: Vec<u64> = std::fs::read_to_string(batch_file)
        .expect("read the batch sizes")
        .lines()
        .map(|l| l.parse().expect("a batch size"))
        .collect();
    let events: u64 = batches.iter().sum();
    let rate = local(async {
        let sink = connect_sink(path).await;
        let start = Instant::now();
        let mut n = 0u64;
        for &size in &batches {
            // Made as the provider makes them, per event, then sent as one push.
            let batch: Vec<ProgressEvent> = (n..n + size)
                .map(|n| {
                    ProgressEvent::now(ProgressKind::Event {
                        span: 1,
                        level: capstan_schema::Level::Info,
                        message: format!("event {n}"),
                        target: "capstan_provider_testing".into(),
                        fields: vec![("n".into(), n.to_string())],
                    })
                })
                .collect();
            n += size;
            let mut request = sink.push_request();
            let mut items = request.get().init_items(batch.len() as u32);
            for (k, event) in batch.iter().enumerate() {
                event.write(items.reborrow().get(k as u32));
            }
            request.send().await.expect("push");
        }
        sink.finish_request().send().promise.await.expect("finish");
        events as f64 / start.elapsed().as_secs_f64()
    });
    println!("{rate}");
}

/// Bare Cap'n Proto calls (`ProgressSink.finish()`: no parameters, no results) from a child
/// process to a server in this one, over one Unix socket with plain `twoparty` and nothing of
/// Capstan's: the protocol's floor. The caller on CPU 0 and the server on CPU 1, as the host
/// and the provider are pinned. Returns the sequential round trip in µs, or (`inflight`) calls
/// per second with [`IN_FLIGHT`] outstanding.
pub(super) fn bare_capnp(calls: u32, inflight: bool) -> f64 {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("bare.sock");
    local(async {
        let listener = tokio::net::UnixListener::bind(&path).expect("bind");
        let child = tokio::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "bare-caller",
                path.to_str().unwrap(),
                &calls.to_string(),
                if inflight { "inflight" } else { "sequential" },
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the caller");
        let (stream, _) = listener.accept().await.expect("accept");
        pin(0, 1);
        if let Some(pid) = child.id() {
            pin(pid, 0);
        }
        serve_sink(stream, CountingSink(Rc::new(Cell::new(0))));
        let output = child.wait_with_output().await.expect("caller output");
        unpin();
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .expect("the caller prints a figure")
    })
}

pub(super) fn bare_caller(path: &str, calls: u32, mode: &str) {
    let figure = local(async {
        let sink = connect_sink(path).await;
        for _ in 0..200 {
            sink.finish_request().send().promise.await.expect("finish");
        }
        if mode == "sequential" {
            let start = Instant::now();
            for _ in 0..calls {
                sink.finish_request().send().promise.await.expect("finish");
            }
            return start.elapsed().as_secs_f64() * 1e6 / calls as f64;
        }
        let per_task = calls / IN_FLIGHT;
        let start = Instant::now();
        let tasks: Vec<_> = (0..IN_FLIGHT)
            .map(|_| {
                let sink = sink.clone();
                tokio::task::spawn_local(async move {
                    for _ in 0..per_task {
                        sink.finish_request().send().promise.await.expect("finish");
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("caller task");
        }
        (per_task * IN_FLIGHT) as f64 / start.elapsed().as_secs_f64()
    });
    println!("{figure}");
}
