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
/// requested from the deployer (it passes on `status`, or any 2xx or 3xx).
#[derive(Clone, Debug, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct Check {
    /// A shell command run on the machine as the SSH user
    #[serde(default)]
    pub command: Option<String>,
    /// An `http://` URL requested from the deployer
    #[serde(default)]
    pub http: Option<String>,
    /// The HTTP status that passes (default: any 2xx or 3xx)
    #[serde(default)]
    pub status: Option<u16>,
}

impl Check {
    pub(crate) fn validate(&self) -> Result<(), OperationError> {
        match (&self.command, &self.http) {
            (Some(_), None) => Ok(()),
            (None, Some(url)) => parse_url(url).map(drop),
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
    let status = tokio::time::timeout(Duration::from_secs(5), get(url))
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

/// `http://host[:port]/path` as host, port and path.
fn parse_url(url: &str) -> Result<(String, u16, String), OperationError> {
    let Some(rest) = url.strip_prefix("http://") else {
        return Err(OperationError::invalid_input(format!(
            "check `http` {url:?}: only http:// URLs are requested from the deployer so far; check an https service with a `command` on the machine (e.g. `curl -fsS https://localhost/`)"
        )));
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
        _ => (authority, 80),
    };
    if host.is_empty() || path.contains(char::is_whitespace) {
        return Err(OperationError::invalid_input(format!(
            "check `http` {url:?} is not a URL"
        )));
    }
    Ok((
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        port,
        path.to_string(),
    ))
}

/// One `GET`: the status code.
async fn get(url: &str) -> Result<u16, String> {
    let (host, port, path) = parse_url(url).map_err(|e| e.message)?;
    let mut stream = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: capstan\r\nConnection: close\r\n\r\n"
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
        assert_eq!(
            parse_url("http://10.0.0.1:8080/health").unwrap(),
            ("10.0.0.1".into(), 8080, "/health".into())
        );
        assert_eq!(
            parse_url("http://web").unwrap(),
            ("web".into(), 80, "/".into())
        );
        assert!(parse_url("https://web/").is_err());
        assert!(parse_url("http://:80/").is_err());
    }
}
