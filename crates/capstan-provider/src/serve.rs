//! Where a provider's connections come from: a socket inherited by socket activation (from the
//! Capstan host, or from systemd), or a socket path it listens on as a standing service.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::server::ProviderServer;
use capnp_rpc::{rpc_twoparty_capnp::Side, RpcSystem};
use capstan_schema::provider_capnp::provider;
use futures::{AsyncRead, AsyncWrite};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};
use tokio_util::sync::CancellationToken;

/// The first file descriptor passed by socket activation (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// The environment variable naming a socket path to listen on, when not socket-activated.
pub const LISTEN_ENV: &str = "CAPSTAN_PROVIDER_LISTEN";

/// Where a provider accepts the core's connections.
#[derive(Debug)]
pub enum Endpoint {
    /// A socket passed in as fd 3: either one already-connected stream (how the Capstan host
    /// starts a provider: serve it, exit when it closes) or a listening socket (systemd
    /// socket activation with `Accept=no`: serve every connection).
    Inherited(OwnedFd),
    /// A Unix socket path to create and listen on (a standing service). A missing parent
    /// directory is created private (0700); the socket is 0600 and removed on exit.
    Listen(PathBuf),
}

/// Why a provider could not serve.
#[derive(Debug)]
pub enum ServeError {
    /// Neither socket activation nor a listen path was given.
    NoEndpoint,
    /// A socket operation failed.
    Io(String, std::io::Error),
    /// Something else already listens at the path.
    InUse(PathBuf),
    /// `LISTEN_FDS` was set, but `LISTEN_PID` does not name this process.
    NotOurSocket { listen_pid: Option<String> },
    /// The listen path holds something that is not a socket (a file, a directory), which is
    /// never deleted.
    NotASocket(PathBuf),
}

impl std::error::Error for ServeError {}

impl std::fmt::Display for ServeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServeError::NoEndpoint => write!(
                f,
                "this program is a Capstan provider and talks Cap'n Proto on a socket, not on \
                 the terminal.\n  Try it with:   capstan provider describe -- {exe}\n  \
                 Or serve at a path: {LISTEN_ENV}=/run/user/$UID/my-provider.sock {exe}",
                exe = std::env::args().next().unwrap_or_else(|| "PROVIDER".into())
            ),
            ServeError::Io(what, e) => write!(f, "{what}: {e}"),
            ServeError::InUse(path) => write!(
                f,
                "another process is already listening at {}; stop it or choose another path",
                path.display()
            ),
            ServeError::NotOurSocket { listen_pid } => write!(
                f,
                "LISTEN_FDS is set, but LISTEN_PID is {} and this process is {}: socket \
                 activation hands fd 3 only to the process LISTEN_PID names. The host must set \
                 LISTEN_PID to the provider's own pid (between fork and exec; or start it with \
                 sh -c 'LISTEN_PID=$$ exec \"$0\" \"$@\"' PROVIDER ARGS…), and a wrapper must \
                 exec the provider rather than start it as a child",
                listen_pid
                    .as_deref()
                    .map_or("not set".to_string(), |p| format!("`{p}`")),
                std::process::id()
            ),
            ServeError::NotASocket(path) => write!(
                f,
                "{} exists and is not a socket; the provider will not delete it. Remove it or \
                 choose another path",
                path.display()
            ),
        }
    }
}

impl Endpoint {
    /// Reads the endpoint from the environment: `LISTEN_FDS`/`LISTEN_PID` (socket activation)
    /// first, then `CAPSTAN_PROVIDER_LISTEN`. Only reads: the variables stay (they name this
    /// process's pid, so a child started later ignores them, as socket activation specifies),
    /// and no environment is changed under threads that may be reading it.
    pub fn from_env() -> Result<Endpoint, ServeError> {
        let fds = std::env::var("LISTEN_FDS").ok();
        let pid = std::env::var("LISTEN_PID").ok();
        let for_us = pid
            .as_deref()
            .is_some_and(|p| p.trim().parse::<u32>().ok() == Some(std::process::id()));
        let listen = std::env::var_os(LISTEN_ENV);
        match (fds, for_us) {
            (Some(fds), true) => {
                let count: i32 = fds.trim().parse().unwrap_or(0);
                if count >= 1 {
                    // SAFETY: socket activation hands this process fd 3 to own, and nothing
                    // else in it has taken fd 3 (it was open before main).
                    let fd = unsafe { OwnedFd::from_raw_fd(LISTEN_FDS_START) };
                    set_cloexec(&fd);
                    return Ok(Endpoint::Inherited(fd));
                }
            }
            (Some(_), false) if listen.is_none() => {
                return Err(ServeError::NotOurSocket { listen_pid: pid });
            }
            _ => {}
        }
        if let Some(path) = listen {
            return Ok(Endpoint::Listen(PathBuf::from(path)));
        }
        Err(ServeError::NoEndpoint)
    }
}

fn set_cloexec(fd: &OwnedFd) {
    use rustix::io::{fcntl_getfd, fcntl_setfd, FdFlags};
    if let Ok(flags) = fcntl_getfd(fd) {
        let _ = fcntl_setfd(fd, flags | FdFlags::CLOEXEC);
    }
}

fn is_listening(fd: &OwnedFd) -> bool {
    rustix::net::sockopt::socket_acceptconn(fd).unwrap_or(false)
}

/// Builds the RPC system for one connection, offering `bootstrap`.
pub(crate) fn rpc_system<R, W>(
    reader: R,
    writer: W,
    bootstrap: provider::Client,
    max_message_words: usize,
) -> RpcSystem<Side>
where
    R: AsyncRead + Unpin + 'static,
    W: AsyncWrite + Unpin + 'static,
{
    let options = capstan_transport::TransportOptions {
        max_message_words,
        ..Default::default()
    };
    capstan_transport::rpc_system(
        reader,
        writer,
        Side::Server,
        Some(bootstrap.client),
        options,
    )
}

fn stream_system(
    stream: UnixStream,
    bootstrap: provider::Client,
    max_message_words: usize,
) -> RpcSystem<Side> {
    let (reader, writer) = stream.into_split();
    rpc_system(
        reader.compat(),
        writer.compat_write(),
        bootstrap,
        max_message_words,
    )
}

/// Removes the socket file it names when dropped.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn bind_private(path: &Path) -> Result<(UnixListener, SocketFile), ServeError> {
    let io = |what: String| move |e| ServeError::Io(what, e);
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.exists() {
            std::fs::create_dir_all(parent)
                .map_err(io(format!("cannot create {}", parent.display())))?;
            std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o700))
                .map_err(io(format!("cannot make {} private", parent.display())))?;
        }
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            // A file, a directory or a link: never ours to delete.
            return Err(ServeError::NotASocket(path.to_path_buf()));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ServeError::InUse(path.to_path_buf()));
        }
        // A stale socket from a provider that did not clean up.
        std::fs::remove_file(path)
            .map_err(io(format!("cannot remove stale {}", path.display())))?;
    }
    // Bound under a temporary name and renamed into place once listening: a socket file at
    // `path` always accepts (between bind and listen a connect is refused), which is what a
    // client waiting for the file to appear needs.
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = path.with_file_name(format!(".{name}.{}.binding", std::process::id()));
    let _ = std::fs::remove_file(&temporary);
    // Bind with a umask that leaves the socket 0600 from its first instant.
    let old_mask = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let bound = UnixListener::bind(&temporary);
    rustix::process::umask(old_mask);
    let listener = bound.map_err(io(format!("cannot listen at {}", path.display())))?;
    if let Err(e) = std::fs::rename(&temporary, path) {
        let _ = std::fs::remove_file(&temporary);
        return Err(ServeError::Io(
            format!("cannot listen at {}", path.display()),
            e,
        ));
    }
    Ok((listener, SocketFile(path.to_path_buf())))
}

async fn accept_loop(
    listener: UnixListener,
    server: ProviderServer,
    max_message_words: usize,
    stop: CancellationToken,
) -> Result<(), ServeError> {
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = accepted
                    .map_err(|e| ServeError::Io("accepting a connection".into(), e))?;
                let (client, connected) = server.connect();
                let system = stream_system(stream, client, max_message_words);
                tokio::task::spawn_local(async move {
                    if let Err(e) = system.await {
                        tracing::debug!("connection ended: {e}");
                    }
                    drop(connected);
                });
            }
            () = stop.cancelled() => return Ok(()),
        }
    }
}

/// Serves `endpoint` until its connection closes (inherited stream) or a SIGTERM/SIGINT
/// arrives (listening socket). SIGTERM also cancels every operation in flight.
pub(crate) async fn serve_endpoint(
    endpoint: Endpoint,
    server: ProviderServer,
    max_message_words: usize,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let stop = CancellationToken::new();
    {
        let stop = stop.clone();
        let shutdown = shutdown.clone();
        tokio::task::spawn_local(async move {
            wait_for_signal().await;
            tracing::debug!("signal received: stopping");
            shutdown.cancel();
            stop.cancel();
        });
    }
    match endpoint {
        Endpoint::Inherited(fd) if is_listening(&fd) => {
            let listener = std::os::unix::net::UnixListener::from(fd);
            listener
                .set_nonblocking(true)
                .map_err(|e| ServeError::Io("inherited listening socket".into(), e))?;
            let listener = UnixListener::from_std(listener)
                .map_err(|e| ServeError::Io("inherited listening socket".into(), e))?;
            accept_loop(listener, server, max_message_words, stop).await
        }
        Endpoint::Inherited(fd) => {
            let stream = std::os::unix::net::UnixStream::from(fd);
            stream
                .set_nonblocking(true)
                .map_err(|e| ServeError::Io("inherited socket".into(), e))?;
            let stream = UnixStream::from_std(stream)
                .map_err(|e| ServeError::Io("inherited socket".into(), e))?;
            let (client, _connected) = server.connect();
            let system = stream_system(stream, client, max_message_words);
            tokio::select! {
                ended = system => {
                    if let Err(e) = ended {
                        tracing::debug!("connection ended: {e}");
                    }
                }
                () = stop.cancelled() => {}
            }
            Ok(())
        }
        Endpoint::Listen(path) => {
            let (listener, _socket_file) = bind_private(&path)?;
            tracing::info!("listening at {}", path.display());
            accept_loop(listener, server, max_message_words, stop).await
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Points fd 1 at fd 2, so that nothing in the provider process (its own code, a dependency,
/// capnp-rpc's task reaper) can write to stdout. The protocol is on its own socket; stdout is
/// never needed, and the host shows stderr as the provider's log.
pub(crate) fn redirect_stdout_to_stderr() {
    let _ = rustix::stdio::dup2_stdout(std::io::stderr());
}
