//! Health checks after an activation: commands on the machine (through the master
//! connection) and HTTP requests from the deployer, retried until all pass or time runs out.

use std::time::{Duration, Instant};

use capstan_provider::schemars::{self, JsonSchema};
use capstan_provider::{Operation, OperationError};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::remote;
use crate::ssh::Ssh;

/// One check: a `command` run on the machine (it passes when it exits 0), or an `http` URL
/// (`http://` or `https://`) requested from the deployer (it passes on `status`, or any 2xx
/// or 3xx).
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct Check {
    /// A shell command run on the machine as the SSH user
    #[serde(default)]
    pub command: Option<String>,
    /// An `http://` or `https://` URL requested from the deployer
    #[serde(default)]
    pub http: Option<String>,
    /// For an `https://` check: a PEM file (on the deployer) of the certificate authorities
    /// to trust instead of this computer's
    #[serde(default)]
    pub ca_file: Option<String>,
    /// The HTTP status that passes (default: any 2xx or 3xx)
    #[serde(default)]
    pub status: Option<u16>,
}

impl Check {
    pub(crate) fn validate(&self) -> Result<(), OperationError> {
        match (&self.command, &self.http) {
            (Some(_), None) => Ok(()),
            (None, Some(url)) => {
                let parsed = parse_url(url)?;
                match &self.ca_file {
                    Some(_) if !parsed.tls => Err(OperationError::invalid_input(format!(
                        "check `http` {url:?}: `caFile` is for https:// checks"
                    ))),
                    Some(file) if !std::path::Path::new(file).is_file() => {
                        Err(OperationError::invalid_input(format!(
                            "check `http` {url:?}: `caFile` {file} is not a file here (the deployer)"
                        )))
                    }
                    _ => Ok(()),
                }
            }
            _ => Err(OperationError::invalid_input(
                "each entry of `checks` gives exactly one of `command` and `http`",
            )),
        }
    }

    fn shown(&self) -> String {
        match (&self.command, &self.http) {
            (Some(command), _) => format!("`{command}`"),
            (_, Some(url)) => format!("GET {url}"),
            _ => "?".into(),
        }
    }
}

/// Runs `checks` until every one has passed, retrying the others every `interval`, for at
/// most `timeout`. The error names the checks that never passed and what they said last.
pub(crate) async fn run(
    op: &Operation,
    ssh: &Ssh,
    checks: &[Check],
    timeout: Duration,
    interval: Duration,
) -> Result<(), OperationError> {
    let started = Instant::now();
    let mut left: Vec<&Check> = checks.iter().collect();
    let mut attempt = 0u64;
    loop {
        attempt += 1;
        let mut failing = Vec::new();
        for check in left {
            match one(ssh, check).await {
                Ok(()) => {
                    tracing::info!(check = %check.shown(), "health check passed");
                }
                Err(why) => failing.push((check, why)),
            }
        }
        op.progress(
            (checks.len() - failing.len()) as u64,
            checks.len() as u64,
            "checks",
        )
        .await;
        if failing.is_empty() {
            return Ok(());
        }
        if started.elapsed() + interval > timeout {
            let list: Vec<String> = failing
                .iter()
                .map(|(check, why)| format!("{}: {why}", check.shown()))
                .collect();
            return Err(OperationError::permanent(format!(
                "{} health check(s) did not pass within {} s ({attempt} attempts): {}",
                failing.len(),
                timeout.as_secs(),
                list.join("; ")
            )));
        }
        for (check, why) in &failing {
            tracing::info!(check = %check.shown(), "health check not passing yet: {why}");
        }
        left = failing.into_iter().map(|(check, _)| check).collect();
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = op.cancelled() => return Err(OperationError::cancelled("the health checks were cancelled")),
        }
    }
}

async fn one(ssh: &Ssh, check: &Check) -> Result<(), String> {
    if let Some(command) = &check.command {
        return ssh
            .output(false, remote::CHECK, &[command], None)
            .await
            .map(drop)
            .map_err(|e| e.message);
    }
    let url = check.http.as_deref().unwrap_or_default();
    let status = tokio::time::timeout(Duration::from_secs(5), get(url, check.ca_file.as_deref()))
        .await
        .map_err(|_| "no answer within 5 s".to_string())??;
    let passes = match check.status {
        Some(wanted) => status == wanted,
        None => (200..400).contains(&status),
    };
    if passes {
        Ok(())
    } else {
        Err(format!("status {status}"))
    }
}

/// A URL a check requests.
#[derive(Debug, PartialEq)]
struct Url {
    tls: bool,
    host: String,
    port: u16,
    path: String,
}

impl Url {
    /// The `Host` header: an IPv6 address in brackets, the port unless the scheme's own.
    fn authority(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        match (self.tls, self.port) {
            (false, 80) | (true, 443) => host,
            (_, port) => format!("{host}:{port}"),
        }
    }
}

/// `http://host[:port]/path` or `https://…`.
fn parse_url(url: &str) -> Result<Url, OperationError> {
    let (tls, rest) = match (url.strip_prefix("http://"), url.strip_prefix("https://")) {
        (Some(rest), _) => (false, rest),
        (_, Some(rest)) => (true, rest),
        _ => {
            return Err(OperationError::invalid_input(format!(
                "check `http` {url:?}: give an http:// or https:// URL"
            )))
        }
    };
    let (authority, path) = match rest.find('/') {
        Some(at) => (&rest[..at], &rest[at..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || authority.starts_with('[') => {
            let port = port.parse().map_err(|_| {
                OperationError::invalid_input(format!("check `http` {url:?}: bad port `{port}`"))
            })?;
            (host, port)
        }
        _ => (authority, if tls { 443 } else { 80 }),
    };
    if host.is_empty() || path.contains(char::is_whitespace) {
        return Err(OperationError::invalid_input(format!(
            "check `http` {url:?} is not a URL"
        )));
    }
    Ok(Url {
        tls,
        host: host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        port,
        path: path.to_string(),
    })
}

/// One `GET`: the status code.
async fn get(url: &str, ca_file: Option<&str>) -> Result<u16, String> {
    let url = parse_url(url).map_err(|e| e.message)?;
    let stream = tokio::net::TcpStream::connect((url.host.as_str(), url.port))
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    if !url.tls {
        return exchange(stream, &url).await;
    }
    let config = match ca_file {
        Some(_) => tls_config(ca_file)?,
        None => system_tls_config().await?,
    };
    let name = rustls::pki_types::ServerName::try_from(url.host.clone())
        .map_err(|e| format!("{}: not a name TLS can check: {e}", url.host))?;
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, stream)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    exchange(stream, &url).await
}

/// TLS trusting this computer's certificate authorities: read once (off the async thread, so
/// other machines' operations go on meanwhile) and kept.
async fn system_tls_config() -> Result<std::sync::Arc<rustls::ClientConfig>, String> {
    static CONFIG: std::sync::OnceLock<Result<std::sync::Arc<rustls::ClientConfig>, String>> =
        std::sync::OnceLock::new();
    if let Some(config) = CONFIG.get() {
        return config.clone();
    }
    let built = tokio::task::spawn_blocking(|| tls_config(None))
        .await
        .map_err(|e| format!("reading this computer's certificate authorities: {e}"))?;
    CONFIG.get_or_init(|| built).clone()
}

/// TLS trusting `ca_file`'s certificate authorities, or else this computer's.
fn tls_config(ca_file: Option<&str>) -> Result<std::sync::Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(file) => {
            let certs = CertificateDer::pem_file_iter(file)
                .map_err(|e| format!("reading caFile {file}: {e}"))?;
            for cert in certs {
                let cert = cert.map_err(|e| format!("reading caFile {file}: {e}"))?;
                roots.add(cert).map_err(|e| format!("caFile {file}: {e}"))?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    if roots.is_empty() {
        return Err(match ca_file {
            Some(file) => format!("caFile {file} holds no certificate"),
            None => "this computer trusts no certificate authority (install `ca-certificates`), and the check gives no `caFile`".into(),
        });
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(std::sync::Arc::new(config))
}

/// Sends the request, reads the status line.
async fn exchange<S>(mut stream: S, url: &Url) -> Result<u16, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: capstan\r\nConnection: close\r\n\r\n",
        url.path,
        url.authority()
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("cannot send the request: {e}"))?;
    let mut head = Vec::new();
    let mut buffer = [0u8; 512];
    while !head.contains(&b'\n') && head.len() < 4096 {
        let n = stream
            .read(&mut buffer)
            .await
            .map_err(|e| format!("cannot read the answer: {e}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buffer[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let line = line.lines().next().unwrap_or("");
    let mut words = line.split_whitespace();
    match (
        words.next(),
        words.next().and_then(|s| s.parse::<u16>().ok()),
    ) {
        (Some(version), Some(status)) if version.starts_with("HTTP/") => Ok(status),
        _ => Err(format!("not an HTTP answer: {line:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_read() {
        let url = |tls, host: &str, port, path: &str| Url {
            tls,
            host: host.into(),
            port,
            path: path.into(),
        };
        assert_eq!(
            parse_url("http://10.0.0.1:8080/health").unwrap(),
            url(false, "10.0.0.1", 8080, "/health")
        );
        assert_eq!(parse_url("http://web").unwrap(), url(false, "web", 80, "/"));
        assert_eq!(
            parse_url("https://web/").unwrap(),
            url(true, "web", 443, "/")
        );
        assert_eq!(
            parse_url("https://[::1]:8443/x").unwrap(),
            url(true, "::1", 8443, "/x")
        );
        assert!(parse_url("ftp://web/").is_err());
        assert_eq!(
            parse_url("https://[::1]:8443/x").unwrap().authority(),
            "[::1]:8443"
        );
        assert_eq!(parse_url("http://web:80/").unwrap().authority(), "web");
        assert_eq!(
            parse_url("http://web:8080/").unwrap().authority(),
            "web:8080"
        );
        assert!(parse_url("http://:80/").is_err());
    }
}
