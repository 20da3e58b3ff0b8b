//! A real PostgreSQL server for a test: Debian's `postgresql`, a cluster made by `initdb` in a
//! temporary directory, listening on a Unix socket in that directory only (no TCP), run as a
//! user that is not root (PostgreSQL refuses root: as root the test runs it as `nobody`).
//!
//! The postmaster is a child of the test, with a parent-death signal (SIGQUIT: PostgreSQL's
//! immediate shutdown), so a test killed in the middle leaves no server behind; dropping the
//! [`Postgres`] stops it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where Debian puts the server's programs (`/usr/lib/postgresql/VERSION/bin`), the newest.
pub fn bin_dir() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin)
}

/// Whether a server can be started here; if not, why and how to get one.
pub fn unavailable() -> Option<String> {
    if bin_dir().is_none() {
        return Some(
            "PostgreSQL is not installed (/usr/lib/postgresql/*/bin/postgres): apt-get install -y postgresql"
                .into(),
        );
    }
    None
}

/// A running server.
pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    child: Option<Child>,
    /// Whether the server runs as `nobody` (the test runs as root).
    as_nobody: bool,
    password: Option<String>,
}

/// The superuser `initdb` makes.
pub const SUPERUSER: &str = "capstan";

impl Postgres {
    /// Starts a new cluster whose local connections need no password.
    pub fn start() -> Postgres {
        Self::start_with(None)
    }

    /// Starts a new cluster; with `password`, every connection must give it (SCRAM).
    pub fn start_with(password: Option<&str>) -> Postgres {
        let bin = bin_dir().expect("PostgreSQL is installed (see `unavailable`)");
        let dir = tempfile::Builder::new()
            .prefix("capstan-pg-")
            .tempdir()
            .expect("temporary directory");
        let as_nobody = crate::is_root();
        if as_nobody {
            chown_nobody(dir.path());
        }
        let mut pg = Postgres {
            dir,
            bin,
            child: None,
            as_nobody,
            password: password.map(str::to_string),
        };
        let mut initdb = pg.command("initdb");
        initdb.arg("-D").arg(pg.data()).args([
            "-U",
            SUPERUSER,
            "-E",
            "UTF8",
            "--no-sync",
            "--locale=C",
        ]);
        if let Some(password) = password {
            let file = pg.dir.path().join("pwfile");
            std::fs::write(&file, password).unwrap();
            if as_nobody {
                chown_nobody(&file);
            }
            initdb
                .arg("--auth=scram-sha-256")
                .arg(format!("--pwfile={}", file.display()));
        } else {
            initdb.arg("--auth=trust");
        }
        let out = initdb.output().expect("initdb runs");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg.run();
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The directory of its Unix socket.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// A program of the server's, as the server's user.
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if self.as_nobody {
            let mut command = Command::new("setpriv");
            command
                .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
                .args(["--pdeathsig", "SIGQUIT", "--"])
                .arg(path);
            command
        } else {
            Command::new(path)
        }
    }

    /// Starts the postmaster and waits until it takes connections.
    fn run(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("log")).unwrap();
        let mut command = self.command("postgres");
        command
            .arg("-D")
            .arg(self.data())
            .arg("-k")
            .arg(self.socket_dir())
            .args(["-c", "listen_addresses=", "-c", "fsync=on"])
            .args(["-c", "max_connections=200"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = command.spawn().expect("postgres starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.ready() {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("postgres exited ({status}): {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "postgres is not ready after 30 s: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A client program of the server's, connecting to `database` as the superuser.
    fn client(&self, program: &str, database: &str) -> Command {
        let mut command = self.command(program);
        command
            .arg("-h")
            .arg(self.socket_dir())
            .args(["-U", SUPERUSER, "-d", database]);
        if let Some(password) = &self.password {
            command.env("PGPASSWORD", password);
        }
        command
    }

    /// Whether the server takes connections (`pg_isready`).
    fn ready(&self) -> bool {
        self.client("pg_isready", "postgres")
            .arg("-q")
            .status()
            .is_ok_and(|s| s.success())
    }

    /// The server's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    /// A connection URL for `database` as the superuser, over the socket (no password in it).
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://{SUPERUSER}@/{database}?host={}",
            self.socket_dir().display()
        )
    }

    /// The password connections need, if one was set.
    pub fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    /// Runs SQL with `psql` in `database`; its output (unaligned, tuples only).
    pub fn psql(&self, database: &str, sql: &str) -> String {
        let out = self
            .client("psql", database)
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c"])
            .arg(sql)
            .output()
            .expect("psql runs");
        assert!(
            out.status.success(),
            "psql failed on {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Makes a database.
    pub fn create_database(&self, name: &str) {
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""));
    }

    /// Everything in `database`, as `pg_dump` writes it.
    pub fn dump(&self, database: &str) -> String {
        let out = self
            .client("pg_dump", database)
            .output()
            .expect("pg_dump runs");
        assert!(
            out.status.success(),
            "pg_dump failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `pg_ctl stop -m immediate`: the server stops at once, as in a crash (no checkpoint,
    /// every connection cut; it recovers from its WAL when started again).
    pub fn stop_immediately(&mut self) {
        let status = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["stop", "-m", "immediate", "-s"])
            .status()
            .expect("pg_ctl runs");
        assert!(status.success(), "pg_ctl stop failed: {}", self.log());
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }

    /// Kills one server process (a session's) with SIGKILL: the postmaster resets every
    /// session and recovers from its WAL, without restarting itself. Waits until it takes
    /// connections again.
    pub fn crash_one_backend(&self) {
        let mut sleeper = self
            .client("psql", "postgres")
            .args(["-X", "-q", "-c", "SELECT pg_sleep(60)"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("psql runs");
        let deadline = Instant::now() + Duration::from_secs(30);
        let pid = loop {
            let pid = self.psql(
                "postgres",
                "SELECT pid FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)'",
            );
            if let Ok(pid) = pid.trim().parse::<u32>() {
                break pid;
            }
            assert!(
                Instant::now() < deadline,
                "the sleeping session never showed"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
        let _ = sleeper.wait();
        // The reset takes a moment to start: wait until it has been through recovery.
        std::thread::sleep(Duration::from_millis(300));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.ready() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no recovery after 30 s: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts the server again after [`stop_immediately`](Self::stop_immediately).
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the server is running");
        self.run();
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGQUIT: immediate shutdown (the cluster is thrown away with the directory).
            let _ = Command::new("kill")
                .args(["-QUIT", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }
}

fn chown_nobody(path: &Path) {
    let status = Command::new("chown")
        .arg("nobody:nogroup")
        .arg(path)
        .status()
        .expect("chown runs");
    assert!(status.success(), "chown nobody {}", path.display());
}
