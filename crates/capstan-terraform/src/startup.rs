//! Starting a plugin as go-plugin does: the magic cookie, the protocol versions, AutoMTLS,
//! the handshake line, the gRPC channel over the socket it names, its exit watched.

use super::*;

/// go-plugin's handshake line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handshake {
    pub core_version: String,
    pub protocol: String,
    pub network: String,
    pub address: String,
    pub server_cert: String,
}

impl Handshake {
    /// Reads `CORE|APP|NETWORK|ADDRESS|PROTOCOL|CERT` (the certificate may be absent).
    pub fn parse(line: &str) -> Option<Handshake> {
        let fields: Vec<&str> = line.trim().split('|').collect();
        if !(5..=6).contains(&fields.len()) || fields[0] != "1" || fields[4] != "grpc" {
            return None;
        }
        Some(Handshake {
            core_version: fields[0].to_string(),
            protocol: fields[1].to_string(),
            network: fields[2].to_string(),
            address: fields[3].to_string(),
            server_cert: fields.get(5).unwrap_or(&"").to_string(),
        })
    }
}

/// How to start a plugin.
#[derive(Clone)]
pub struct StartOptions {
    /// How long to wait for the handshake line.
    pub timeout: Duration,
    /// AutoMTLS: offer a client certificate (the plugin then serves TLS). Without it, plain
    /// gRPC, as go-plugin does without AutoMTLS.
    pub mtls: bool,
    /// Where its output goes; without a sink it is read and dropped.
    pub logs: Option<LogSink>,
    /// Extra environment for the plugin.
    pub env: Vec<(String, String)>,
    /// Where it runs (the deployment's directory); `None`: here.
    pub dir: Option<std::path::PathBuf>,
    /// Told its pid once it started; with it the plugin gets a session of its own (see
    /// [`Spawned`]), without it a process group of its own.
    pub spawned: Option<Spawned>,
}

/// Told a started plugin's pid, which is then also its session's id: everything the plugin
/// starts stays in that session unless it leaves it deliberately, so killing the session
/// kills them all (capstan's reaper does, however capstan ends).
pub type Spawned = std::sync::Arc<dyn Fn(i32) + Send + Sync>;

impl Default for StartOptions {
    fn default() -> Self {
        StartOptions {
            timeout: Duration::from_secs(30),
            mtls: true,
            logs: None,
            env: Vec::new(),
            dir: None,
            spawned: None,
        }
    }
}

impl Plugin {
    /// Starts `program` as go-plugin does (with AutoMTLS) and connects to it.
    pub async fn start(program: &Path, timeout: Duration) -> Result<Plugin, TerraformError> {
        Self::start_with(
            program,
            StartOptions {
                timeout,
                ..StartOptions::default()
            },
        )
        .await
    }

    /// As [`Plugin::start`], as `options` say.
    pub async fn start_with(
        program: &Path,
        options: StartOptions,
    ) -> Result<Plugin, TerraformError> {
        let StartOptions {
            timeout,
            mtls,
            logs,
            env,
            dir,
            spawned,
        } = options;
        let program = program.to_path_buf();
        let client = if mtls {
            Some(tls::ClientIdentity::generate().map_err(|e| {
                TerraformError::Grpc(
                    format!("cannot make a client certificate: {e}"),
                    program.clone(),
                )
            })?)
        } else {
            None
        };
        let mut command = tokio::process::Command::new(&program);
        if let Some(client) = &client {
            command.env("PLUGIN_CLIENT_CERT", &client.pem);
        }
        command
            .env(MAGIC_COOKIE_KEY, MAGIC_COOKIE_VALUE)
            .env("PLUGIN_PROTOCOL_VERSIONS", PROTOCOLS)
            .env("PLUGIN_MIN_PORT", "10000")
            .env("PLUGIN_MAX_PORT", "25000")
            .envs(env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(dir) = &dir {
            command.current_dir(dir);
        }
        // Started by capstan itself (the bridge inside it), it must not see capstan's secrets.
        capstan_process::without_capstans_secrets(&mut command);
        // The plugin dies with the bridge, even a bridge killed with SIGKILL.
        if spawned.is_some() {
            capstan_process::dies_with_parent_in_session(&mut command);
        } else {
            capstan_process::dies_with_parent(&mut command);
        }
        let mut child = command.spawn().map_err(|error| TerraformError::Spawn {
            program: program.clone(),
            error,
        })?;
        if let (Some(spawned), Some(pid)) = (&spawned, child.id()) {
            spawned(pid as i32);
        }
        let (handshake, protocol, mut lines, stderr) =
            read_handshake(&mut child, timeout, program.clone()).await?;
        // Its logs go on after the line: read on, so it never blocks on a full pipe.
        let sink = logs.clone();
        tokio::spawn(async move {
            let mut stderr = tokio::io::BufReader::new(stderr);
            let mut line = Vec::new();
            while matches!(stderr.read_until(b'\n', &mut line).await, Ok(n) if n > 0) {
                if let Some(sink) = &sink {
                    sink(LogLine::parse(
                        Channel::Stderr,
                        &String::from_utf8_lossy(&line),
                    ));
                }
                line.clear();
            }
        });
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let tls = match (&client, handshake.server_cert.is_empty()) {
            (Some(client), false) => Some(
                tls::client_config(client, &handshake.server_cert).map_err(|e| {
                    TerraformError::Grpc(format!("its server certificate: {e}"), program.clone())
                })?,
            ),
            (None, false) => {
                return Err(TerraformError::Grpc(
                    "it serves TLS without having been given a client certificate".into(),
                    program,
                ))
            }
            (_, true) => None,
        };
        let mtls = tls.is_some();
        let channel = connect(&program, &handshake, tls).await?;
        let (exit, kill) = watch_exit(child);
        let plugin = Plugin {
            program,
            exit,
            kill,
            shutting_down: std::sync::atomic::AtomicBool::new(false),
            channel,
            handshake,
            protocol,
            tls: mtls,
            stopped: std::sync::atomic::AtomicBool::new(false),
        };
        plugin.stream_stdio(logs);
        Ok(plugin)
    }

    /// Reads go-plugin's `GRPCStdio` stream (called once, early, as go-plugin asks) into
    /// `logs`. A plugin without the service (older go-plugin) has nothing to read.
    pub(crate) fn stream_stdio(&self, logs: Option<LogSink>) {
        let channel = self.channel.clone();
        let path = self.protocol.path(wire::Method::StreamStdio);
        tokio::spawn(async move {
            let mut grpc = tonic::client::Grpc::new(channel);
            if grpc.ready().await.is_err() {
                return;
            }
            let Ok(response) = grpc
                .server_streaming(
                    tonic::Request::new(wire::Empty {}),
                    tonic::codegen::http::uri::PathAndQuery::from_static(path),
                    tonic::codec::ProstCodec::<wire::Empty, wire::StdioData>::default(),
                )
                .await
            else {
                return;
            };
            let mut stream = response.into_inner();
            let (mut out, mut err) = (Vec::new(), Vec::new());
            while let Ok(Some(chunk)) = stream.message().await {
                let (buffer, channel) = match chunk.channel {
                    1 => (&mut out, Channel::StdioOut),
                    _ => (&mut err, Channel::StdioErr),
                };
                buffer.extend_from_slice(&chunk.data);
                while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buffer.drain(..=end).collect();
                    if let Some(sink) = &logs {
                        sink(LogLine::parse(channel, &String::from_utf8_lossy(&line)));
                    }
                }
            }
        });
    }
}

/// The plugin's socket.
pub(crate) enum Socket {
    Unix(PathBuf),
    Tcp(std::net::SocketAddr),
}

pub(crate) async fn connect(
    program: &Path,
    handshake: &Handshake,
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
) -> Result<tonic::transport::Channel, TerraformError> {
    let bad = |why| TerraformError::Address {
        program: program.to_path_buf(),
        network: handshake.network.clone(),
        address: handshake.address.clone(),
        why,
    };
    let socket = match handshake.network.as_str() {
        "unix" => Socket::Unix(PathBuf::from(&handshake.address)),
        "tcp" => {
            let addr: std::net::SocketAddr = handshake
                .address
                .parse()
                .map_err(|_| bad("not an address"))?;
            if !addr.ip().is_loopback() {
                return Err(bad("only loopback addresses are trusted"));
            }
            Socket::Tcp(addr)
        }
        _ => return Err(bad("the network is neither unix nor tcp")),
    };
    let socket = std::sync::Arc::new(socket);
    // HTTP/2 with prior knowledge, over the plain or the TLS stream.
    tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let (socket, tls) = (socket.clone(), tls.clone());
            async move {
                let stream: Box<dyn tls::Stream> = match &*socket {
                    Socket::Unix(path) => Box::new(tokio::net::UnixStream::connect(path).await?),
                    Socket::Tcp(addr) => Box::new(tokio::net::TcpStream::connect(addr).await?),
                };
                let stream: Box<dyn tls::Stream> = match tls {
                    None => stream,
                    Some(config) => {
                        let name =
                            rustls::pki_types::ServerName::try_from("localhost").expect("a name");
                        Box::new(
                            tokio_rustls::TlsConnector::from(config)
                                .connect(name, stream)
                                .await?,
                        )
                    }
                };
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|e| TerraformError::Grpc(format!("cannot connect: {e}"), program.to_path_buf()))
}

/// The handshake line the plugin prints first (within `timeout`), and the protocol it
/// names; with what is left of its stdout and its stderr, for reading on.
async fn read_handshake(
    child: &mut tokio::process::Child,
    timeout: Duration,
    program: PathBuf,
) -> Result<
    (
        Handshake,
        wire::Protocol,
        PluginLines,
        tokio::process::ChildStderr,
    ),
    TerraformError,
> {
    let stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = match tokio::time::timeout(timeout, lines.next_line()).await {
        Err(_) => {
            return Err(TerraformError::HandshakeTimeout {
                program,
                after: timeout,
            })
        }
        Ok(Ok(Some(line))) => line,
        Ok(_) => {
            let status = child
                .wait()
                .await
                .map(|s| s.to_string())
                .unwrap_or_else(|e| e.to_string());
            let mut tail = String::new();
            let _ = tokio::time::timeout(Duration::from_secs(1), stderr.read_to_string(&mut tail))
                .await;
            let tail: Vec<&str> = tail.lines().rev().take(5).collect();
            let tail: String = tail.into_iter().rev().map(|l| format!("\n  {l}")).collect();
            return Err(TerraformError::NoHandshake {
                program,
                status,
                tail,
            });
        }
    };
    let Some(handshake) = Handshake::parse(&line) else {
        return Err(TerraformError::BadHandshake { program, line });
    };
    let Some(protocol) = wire::Protocol::parse(&handshake.protocol) else {
        return Err(TerraformError::Protocol {
            program,
            version: handshake.protocol,
        });
    };
    Ok((handshake, protocol, lines, stderr))
}

/// The plugin's stdout after its handshake line.
type PluginLines = tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>;

/// Waits for the plugin (and kills it when told) on a task of its own, so its exit is seen
/// whenever it happens.
fn watch_exit(
    mut child: tokio::process::Child,
) -> (
    tokio::sync::watch::Receiver<Option<String>>,
    std::sync::Arc<tokio::sync::Notify>,
) {
    // The process is waited for (and killed when asked) by a task of its own, so its exit
    // is seen whenever it happens.
    let (exited, exit) = tokio::sync::watch::channel(None);
    let kill = std::sync::Arc::new(tokio::sync::Notify::new());
    let killer = kill.clone();
    tokio::spawn(async move {
        let status = tokio::select! {
            status = child.wait() => status,
            _ = killer.notified() => {
                let _ = child.start_kill();
                child.wait().await
            }
        };
        let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
        let _ = exited.send(Some(status));
    });
    (exit, kill)
}
