//! Where the state is: a `postgres://` URL with the deployment's name, completed as libpq
//! completes a connection (the `PG*` variables, `~/.pgpass`), and shown without its password.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use postgres::config::Host;

/// A deployment's state in a PostgreSQL database.
#[derive(Clone)]
pub struct Location {
    pub(crate) config: postgres::Config,
    /// The deployment's name in the database (many deployments share one).
    pub name: String,
}

/// Whether `text` names a PostgreSQL state (`postgres://…` or `postgresql://…`).
pub fn is_postgres(text: &str) -> bool {
    text.starts_with("postgres://") || text.starts_with("postgresql://")
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_string())
    }
}

/// Shown everywhere (messages, events): user, host, port, database and name, never the
/// password.
impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let user = self.config.get_user().unwrap_or("?");
        let host = match self.config.get_hosts().first() {
            Some(Host::Tcp(host)) => host.clone(),
            Some(Host::Unix(path)) => path.display().to_string(),
            None => String::new(),
        };
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        let db = self.config.get_dbname().unwrap_or("?");
        write!(
            f,
            "postgres://{user}@{host}:{port}/{db} (deployment `{}`)",
            self.name
        )
    }
}

impl Location {
    /// Reads `url` (`postgres://[user[:password]@][host][:port][/database][?param=value&…]`,
    /// libpq's form) with one parameter of Capstan's own, `deployment=NAME`; what the URL leaves
    /// out comes from `PGHOST`, `PGPORT`, `PGUSER`, `PGDATABASE`, `PGPASSWORD`, then the
    /// password file (`PGPASSFILE`, else `~/.pgpass`), as libpq does. The error never repeats
    /// the password.
    pub fn parse(url: &str) -> Result<Location, String> {
        Self::parse_with(url, &|name| std::env::var(name).ok())
    }

    pub(crate) fn parse_with(
        url: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Location, String> {
        if !is_postgres(url) {
            return Err("a PostgreSQL state is a URL starting with postgres://".into());
        }
        let (base, query) = match url.split_once('?') {
            Some((base, query)) => (base, Some(query)),
            None => (url, None),
        };
        let mut name = None;
        let mut kept = Vec::new();
        for pair in query.into_iter().flat_map(|q| q.split('&')) {
            match pair.split_once('=') {
                Some(("deployment", value)) => name = Some(percent_decode(value)?),
                _ if pair.is_empty() => {}
                _ => kept.push(pair),
            }
        }
        let rebuilt = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        let mut config = postgres::Config::from_str(&rebuilt).map_err(|e| {
            format!(
                "{} is not a PostgreSQL URL libpq would take: {}",
                without_password(url),
                crate::describe(&e)
            )
        })?;
        let Some(name) = name.filter(|n| !n.trim().is_empty()) else {
            return Err(format!(
                "{}: name the deployment whose state this is, as many share one database: add ?deployment=NAME (e.g. {}{}deployment=web)",
                without_password(url),
                without_password(url),
                if url.contains('?') { "&" } else { "?" }
            ));
        };
        if name.len() > 200 || name.chars().any(char::is_control) {
            return Err(format!(
                "deployment name `{}` must be at most 200 printable characters",
                name.escape_debug()
            ));
        }
        fill_from_env(&mut config, env);
        if config.get_ssl_mode() == postgres::config::SslMode::Require {
            return Err(format!(
                "{}: sslmode=require: this capstan does not speak TLS to PostgreSQL yet; connect over a Unix socket (host=/run/postgresql) or an SSH tunnel, or leave sslmode out",
                without_password(url)
            ));
        }
        Ok(Location { config, name })
    }

    /// The host to look up in a password file: the TCP host, or `localhost` for a socket.
    fn pgpass_host(&self) -> Vec<String> {
        match self.config.get_hosts().first() {
            Some(Host::Tcp(host)) => vec![host.clone()],
            Some(Host::Unix(path)) => vec!["localhost".into(), path.display().to_string()],
            None => vec!["localhost".into()],
        }
    }
}

/// What the URL left out, from the environment, as libpq fills it.
fn fill_from_env(config: &mut postgres::Config, env: &dyn Fn(&str) -> Option<String>) {
    let set = |name: &str| env(name).filter(|v| !v.is_empty());
    if config.get_hosts().is_empty() {
        match set("PGHOST") {
            Some(host) if host.starts_with('/') => {
                config.host_path(host);
            }
            Some(host) => {
                config.host(&host);
            }
            None => {
                // libpq's default: the socket directory it was built with (Debian's, then
                // the upstream one).
                let dir = ["/var/run/postgresql", "/tmp"]
                    .into_iter()
                    .find(|d| Path::new(d).is_dir())
                    .unwrap_or("/tmp");
                config.host_path(dir);
            }
        }
    }
    if config.get_ports().is_empty() {
        if let Some(port) = set("PGPORT").and_then(|p| p.parse().ok()) {
            config.port(port);
        }
    }
    if config.get_user().is_none() {
        let user = set("PGUSER")
            .or_else(|| set("USER"))
            .or_else(|| set("LOGNAME"))
            .unwrap_or_else(|| "postgres".into());
        config.user(&user);
    }
    if config.get_dbname().is_none() {
        let db = set("PGDATABASE").unwrap_or_else(|| config.get_user().unwrap_or("").to_string());
        config.dbname(&db);
    }
    if config.get_connect_timeout().is_none() {
        let secs = set("PGCONNECT_TIMEOUT")
            .and_then(|s| s.parse().ok())
            .unwrap_or(10);
        config.connect_timeout(Duration::from_secs(secs));
    }
    if config.get_application_name().is_none() {
        config.application_name("capstan");
    }
    if config.get_password().is_none() {
        if let Some(password) = set("PGPASSWORD") {
            config.password(password);
        } else {
            let location = Location {
                config: config.clone(),
                name: String::new(),
            };
            let file = set("PGPASSFILE")
                .map(PathBuf::from)
                .or_else(|| set("HOME").map(|h| Path::new(&h).join(".pgpass")));
            if let Some(password) = file.and_then(|f| password_from_file(&f, &location)) {
                config.password(password);
            }
        }
    }
}

/// The first line of a password file that matches (`host:port:database:user:password`, `*`
/// for any, `\:` and `\\` escaped). As libpq, a file others can read is ignored.
fn password_from_file(path: &Path, location: &Location) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    if meta.mode() & 0o077 != 0 {
        eprintln!(
            "warning: password file {} has group or world access; permissions should be u=rw (0600) or less: it is not read",
            path.display()
        );
        return None;
    }
    let text = std::fs::read_to_string(path).ok()?;
    let hosts = location.pgpass_host();
    let port = location
        .config
        .get_ports()
        .first()
        .copied()
        .unwrap_or(5432)
        .to_string();
    let db = location.config.get_dbname().unwrap_or("");
    let user = location.config.get_user().unwrap_or("");
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let fields = split_pgpass(line);
        let [h, p, d, u, password] = fields.as_slice() else {
            continue;
        };
        let matches = |field: &str, value: &str| field == "*" || field == value;
        if (h == "*" || hosts.iter().any(|host| h == host))
            && matches(p, &port)
            && matches(d, db)
            && matches(u, user)
        {
            return Some(password.clone());
        }
    }
    None
}

fn split_pgpass(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next() {
                    fields.last_mut().unwrap().push(next);
                }
            }
            ':' if fields.len() < 5 => fields.push(String::new()),
            c => fields.last_mut().unwrap().push(c),
        }
    }
    fields
}

fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("`{text}`: a % must be followed by two hex digits"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("`{text}` is not UTF-8 once decoded"))
}

/// `url` with any password replaced by `***`, to quote it in a message.
pub fn without_password(url: &str) -> String {
    // The same scrubbing as the command lines a lock's holder records.
    capstan_state::scrub_command(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn the_name_is_required_and_the_password_never_shown() {
        let e =
            Location::parse_with("postgres://u:hunter2@db.example/team", &env(&[])).unwrap_err();
        assert!(e.contains("?deployment=NAME"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        let l = Location::parse_with(
            "postgres://u:hunter2@db.example:6543/team?deployment=web%20fleet&sslmode=disable",
            &env(&[]),
        )
        .unwrap();
        assert_eq!(l.name, "web fleet");
        let shown = l.to_string();
        assert_eq!(
            shown,
            "postgres://u@db.example:6543/team (deployment `web fleet`)"
        );
        assert_eq!(format!("{l:?}"), shown);
        let e = Location::parse_with(
            "postgres://u:hunter2@db/x?deployment=a&nonsense=1",
            &env(&[]),
        )
        .unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
        assert!(e.contains("u:***@db"), "{e}");
    }

    #[test]
    fn tls_required_is_refused_clearly() {
        let e = Location::parse_with("postgres://h/x?deployment=a&sslmode=require", &env(&[]))
            .unwrap_err();
        assert!(e.contains("TLS"), "{e}");
    }

    #[test]
    fn what_the_url_leaves_out_comes_from_the_pg_variables() {
        let l = Location::parse_with(
            "postgres://?deployment=a",
            &env(&[
                ("PGHOST", "/run/pg"),
                ("PGPORT", "5433"),
                ("PGUSER", "alice"),
                ("PGDATABASE", "infra"),
                ("PGPASSWORD", "s3cret"),
            ]),
        )
        .unwrap();
        assert_eq!(l.config.get_user(), Some("alice"));
        assert_eq!(l.config.get_dbname(), Some("infra"));
        assert_eq!(l.config.get_ports(), &[5433]);
        assert_eq!(l.config.get_password(), Some(&b"s3cret"[..]));
        assert!(matches!(&l.config.get_hosts()[0], Host::Unix(p) if p == Path::new("/run/pg")));
        assert!(!l.to_string().contains("s3cret"));
    }

    #[test]
    fn a_password_file_is_read_as_libpq_reads_it() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pgpass");
        std::fs::write(
            &file,
            "# comment\nother:*:*:*:no\ndb.example:5432:infra:bob:pa\\:ss\n*:*:*:*:fallback\n",
        )
        .unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let path: &'static str = Box::leak(file.display().to_string().into_boxed_str());
        let vars: &'static [(&str, &str)] = Box::leak(Box::new([("PGPASSFILE", path)]));
        let l = Location::parse_with("postgres://bob@db.example/infra?deployment=a", &env(vars))
            .unwrap();
        assert_eq!(l.config.get_password(), Some(&b"pa:ss"[..]));
        let l =
            Location::parse_with("postgres://eve@elsewhere/x?deployment=a", &env(vars)).unwrap();
        assert_eq!(l.config.get_password(), Some(&b"fallback"[..]));
        // Readable by others: ignored, as libpq does.
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let l = Location::parse_with("postgres://bob@db.example/infra?deployment=a", &env(vars))
            .unwrap();
        assert_eq!(l.config.get_password(), None);
    }
}
