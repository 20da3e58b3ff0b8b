//! Durable state: what exists, and what was in flight when a run stopped.
//!
//! The embedded backend keeps a directory (`.capstan/` beside the deployment by default):
//! - `journal` — one record per line, `CRC32 JSON`, appended; an intent record is durable
//!   before every mutating call, its result after it. Appends from concurrent operations are
//!   written and fsynced together (group commit), so durability costs one fsync per batch.
//! - `snapshot.json` — the state folded from the journal, written by compaction with temp file,
//!   fsync, rename and a directory fsync; the journal then starts empty.
//! - `lock` — held with `flock` for a whole command, with who holds it written inside.
//!
//! The directory is private to its owner (0700, files 0600, whatever the umask): inputs and
//! outputs may hold secrets.
//!
//! Reading never panics on bad input. A torn last line (a crash in the middle of a write) is
//! the one damage repaired automatically, by the next command that writes. Any other damaged
//! line stops every command that would write, until `repair` (on the user's say-so) sets the
//! damaged lines aside in a file of their own and keeps every intact record. Commands that only
//! read use [`read_only`]: no lock, no writes, a consistent view even while a run appends.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use capstan_schema::Json;
use capstan_schema::OperationKind;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::oneshot;

pub mod maps;

use crate::maps::AddressMap;

/// A resource as recorded after its last successful operation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResourceState {
    pub provider: String,
    #[serde(rename = "type")]
    pub resource_type: String,
    /// JSON object, kept as text (see `capstan_schema::Json`).
    pub inputs: Json,
    pub outputs: Json,
    /// Addresses it depended on, so deletion can run in reverse order without the deployment.
    pub dependencies: Vec<String>,
    /// For a child (made through its parent's scheduler capability): the parent's address. A
    /// child stays while its parent does, and is deleted before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// JSON pointers (`/inputs/password`, `/outputs/token`) of its sensitive values: kept as
    /// they are here (the state is private), redacted wherever they are shown.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sensitive: Vec<String>,
    /// Made by a create that then failed (its provider found what it had made): the next
    /// plan replaces it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tainted: bool,
}

/// An operation that started and has no recorded end: interrupted by a crash or Ctrl-C.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PendingOperation {
    pub operation: OperationKind,
    pub provider: String,
    #[serde(rename = "type")]
    pub resource_type: String,
    pub inputs: Json,
    pub started: u64,
}

/// Everything the state knows.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// In address order when loaded; resources recorded later are appended.
    pub resources: AddressMap<ResourceState>,
    pub pending: BTreeMap<String, PendingOperation>,
}

/// One journal record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
// Externally tagged and without `flatten`: both of those make serde buffer every record
// before decoding it, which doubled the time to load a large journal.
#[serde(rename_all = "snake_case")]
pub enum Record {
    /// About to call the provider.
    Intent {
        address: String,
        operation: OperationKind,
        provider: String,
        #[serde(rename = "type")]
        resource_type: String,
        inputs: Json,
        time: u64,
    },
    /// The resource exists with these inputs and outputs.
    Done {
        address: String,
        state: ResourceState,
    },
    /// The resource no longer exists.
    Deleted { address: String },
    /// The operation failed; the resource is as it was before.
    Failed {
        address: String,
        operation: OperationKind,
        error: String,
    },
    /// A person resolved an interrupted operation (`capstan state resolve`).
    Resolved { address: String },
}

impl State {
    /// Applies one record.
    pub fn apply(&mut self, record: &Record) {
        self.apply_owned(record.clone())
    }

    /// Applies one record, taking its contents (no copies).
    pub fn apply_owned(&mut self, record: Record) {
        match record {
            Record::Intent {
                address,
                operation,
                provider,
                resource_type,
                inputs,
                time,
            } => {
                self.pending.insert(
                    address,
                    PendingOperation {
                        operation,
                        provider,
                        resource_type,
                        inputs,
                        started: time,
                    },
                );
            }
            Record::Done { address, state } => {
                self.pending.remove(&address);
                self.resources.insert(address, state);
            }
            Record::Deleted { address } => {
                self.pending.remove(&address);
                // O(1); loading sorts again.
                self.resources.swap_remove(&address);
            }
            Record::Failed { address, .. } | Record::Resolved { address } => {
                self.pending.remove(&address);
            }
        }
    }
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What went wrong with the state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: the snapshot is not valid ({message}); `capstan state repair` rebuilds it from the previous snapshot and the journals (kept beside it since this capstan's first compaction), else restore it from a backup", .path.display())]
    BadSnapshot { path: PathBuf, message: String },
    #[error("{}: the snapshot is not valid ({message}), and it cannot be rebuilt: {why}", .path.display())]
    Unrepairable {
        path: PathBuf,
        message: String,
        why: String,
    },
    #[error("the state in {} is locked by {holder}; wait for it to finish, or pass --lock-timeout SECONDS to wait", .dir.display())]
    Locked { dir: PathBuf, holder: String },
    #[error("the state journal writer stopped: {0}")]
    WriterGone(String),
    #[error("{} holds the state of deployment `{owner}`, not `{deployment}`: planning one deployment against another's state would delete its resources. Give `{deployment}` a state of its own with --state DIR (e.g. --state .capstan-{}); if `{deployment}` is `{owner}` renamed, delete {} so that it takes over", .dir.display(), .deployment.trim_end_matches(".json"), .dir.join(OWNER_FILE).display())]
    OtherDeployment {
        dir: PathBuf,
        owner: String,
        deployment: String,
    },
    #[error("{}: {why}. Capstan refuses a state another user could have changed or could read (as OpenSSH refuses a loose authorized_keys): if it is yours, make it a plain file or directory of yours again (chown, or remove the link); else give this deployment a state of its own with --state DIR", .path.display())]
    Untrusted { path: PathBuf, why: String },
    #[error("{} is the state of the deployment in {}, copied here: its file resources record absolute paths, so a plan here would call that deployment's files unchanged and an apply would change them. Give this copy a state of its own (--state DIR, or remove {} to start empty); if the original is gone (moved to another disk, restored from a backup), delete {} so that this state takes its place", .dir.display(), .original.display(), .dir.display(), .dir.join(LOCATION_FILE).display())]
    Copied { dir: PathBuf, original: PathBuf },
    #[error("{}: line(s) {} are damaged (they fail their checksum, or hold a record this capstan cannot read), so nothing was changed. Every intact record is still there: `capstan state repair` keeps them and sets the damaged lines aside in a file beside the journal", .path.display(), list_lines(.lines))]
    Damaged { path: PathBuf, lines: Vec<usize> },
}

/// Line numbers for a message: the first ten, and how many more.
pub fn list_lines(lines: &[usize]) -> String {
    let mut shown: Vec<String> = lines.iter().take(10).map(|n| n.to_string()).collect();
    if lines.len() > 10 {
        shown.push(format!("and {} more", lines.len() - 10));
    }
    shown.join(", ")
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What `state repair` set aside.
#[derive(Debug, Default)]
pub struct Repaired {
    /// The journal's damaged lines, copied out byte for byte.
    pub damaged_lines: Option<PathBuf>,
    /// A damaged snapshot, replaced by one rebuilt from the previous one and the journals.
    pub damaged_snapshot: Option<PathBuf>,
}

/// What loading found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    pub records: usize,
    /// The last journal line, if it was torn (no line ending and not a whole record): a crash
    /// in the middle of a write. Repaired by the next command that writes.
    pub torn_tail: Option<usize>,
    /// Numbers of the other journal lines that are damaged (they fail their checksum or do not
    /// decode); every intact record around them was read.
    pub damaged: Vec<usize>,
    /// The last line is a whole record without its line break (a write cut just before it):
    /// kept, and ended by the next command that writes.
    pub unterminated_tail: bool,
}

/// Seconds since the Unix epoch as RFC 3339 in UTC, e.g. `2026-11-29T14:50:12Z`.
pub fn rfc3339(unix_seconds: u64) -> String {
    // Howard Hinnant's days-to-civil algorithm, for the proleptic Gregorian calendar.
    let days = (unix_seconds / 86_400) as i64;
    let secs = unix_seconds % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Storage for the state. The directory backend is the embedded default; a shared database
/// for teams implements the same operations.
pub trait StateBackend {
    /// Reads the state.
    fn load(&mut self) -> Result<(State, LoadReport), StateError>;
    /// Appends records; the returned receiver fires once they are durable.
    fn append(&self, records: Vec<Record>) -> oneshot::Receiver<Result<(), String>>;
    /// Rewrites the stored state as one snapshot of `state`.
    fn compact(&mut self, state: &State) -> Result<(), StateError>;
}

/// Encoded records and who to tell once they are durable.
type WriteRequest = (Vec<Record>, oneshot::Sender<Result<(), String>>);

/// The embedded backend: a directory with a journal, a snapshot and a lock.
pub struct DirectoryBackend {
    dir: PathBuf,
    writer: Option<mpsc::Sender<WriteRequest>>,
    writer_thread: Option<std::thread::JoinHandle<()>>,
    _lock: File,
}

/// Appends one journal line for `record` to `out`: `CRC32 JSON\n`.
fn encode_into(record: &Record, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(b"00000000 ");
    serde_json::to_writer(&mut *out, record).expect("records always serialize");
    let crc = crc32fast::hash(&out[start + 9..]);
    out[start..start + 8].copy_from_slice(format!("{crc:08x}").as_bytes());
    out.push(b'\n');
}

#[cfg(test)]
fn encode(record: &Record) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(record, &mut out);
    out
}

fn decode(line: &str) -> Option<Record> {
    let (crc, json) = line.split_once(' ')?;
    let crc = u32::from_str_radix(crc, 16).ok()?;
    (crc32fast::hash(json.as_bytes()) == crc).then_some(())?;
    serde_json::from_str(json).ok()
}

fn fsync_dir(dir: &Path) -> Result<(), StateError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// Who holds a lock, written into the lock file.
pub(crate) fn holder_description() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let user =
        std::env::var("USER").unwrap_or_else(|_| format!("uid {}", capstan_process::own_uid()));
    let command: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    serde_json::json!({
        "pid": std::process::id(),
        "host": host.trim(),
        "user": user,
        "command": command.join(" "),
        "since": now_unix(),
    })
    .to_string()
}

fn describe_holder(text: &str) -> String {
    match serde_json::from_str::<Value>(text) {
        Ok(v) => format!(
            "pid {} on {} (user {}, `{}`, since {})",
            v["pid"],
            v["host"].as_str().unwrap_or("?"),
            v["user"].as_str().unwrap_or("?"),
            v["command"].as_str().unwrap_or("?"),
            v["since"]
                .as_u64()
                .map(rfc3339)
                .unwrap_or_else(|| "?".into())
        ),
        Err(_) => "another capstan process".to_string(),
    }
}

/// Who holds the state in `dir` right now, if a capstan on this machine does (read from the
/// lock file, without taking the lock: a command that only looks must not get in a writer's
/// way). Its interrupted-looking operations are then in flight in that command.
pub fn running_holder(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("lock")).ok()?;
    let holder: Value = serde_json::from_str(&text).ok()?;
    let pid = i32::try_from(holder["pid"].as_u64()?).ok()?;
    let here = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    if holder["host"].as_str() != Some(here.trim()) || !capstan_process::process_exists(pid) {
        return None;
    }
    // The same command still (a pid can be handed out again once it exits).
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let command = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    (command.trim() == holder["command"].as_str()?.trim()).then(|| describe_holder(&text))
}

impl DirectoryBackend {
    /// Opens (creating if needed) the state directory and takes its lock, waiting up to
    /// `lock_timeout` for another holder.
    pub fn open(dir: &Path, lock_timeout: Duration) -> Result<Self, StateError> {
        Self::open_with(dir, lock_timeout, &mut |_| {})
    }

    /// [`open`](Self::open), telling `waiting` once (with who holds the lock) when it has to
    /// wait for another holder.
    pub fn open_with(
        dir: &Path,
        lock_timeout: Duration,
        waiting: &mut dyn FnMut(&str),
    ) -> Result<Self, StateError> {
        make_private_dir(dir)?;
        check_dir(dir)?;
        let lock_path = dir.join("lock");
        let mut lock = open_owned(
            private_file()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false),
            &lock_path,
        )?;
        let holder = || {
            use std::os::unix::fs::FileExt;
            let mut bytes = vec![0; 4096];
            let n = lock.read_at(&mut bytes, 0).unwrap_or(0);
            describe_holder(&String::from_utf8_lossy(&bytes[..n]))
        };
        if !capstan_process::lock_exclusive(&lock, false).map_err(io(&lock_path))? {
            let locked = || StateError::Locked {
                dir: dir.to_path_buf(),
                holder: holder(),
            };
            if lock_timeout.is_zero() {
                return Err(locked());
            }
            waiting(&holder());
            // A blocking flock, on a thread of its own, woken by the kernel when the holder
            // lets go (no polling). It locks through a duplicate of our descriptor (the same
            // open file, so the lock is ours); if we stop waiting first, the thread gives the
            // lock back as soon as it gets it, by closing that duplicate.
            let duplicate = lock.try_clone().map_err(io(&lock_path))?;
            let (got, get) = mpsc::channel();
            std::thread::Builder::new()
                .name("capstan-lock-wait".into())
                .spawn(move || {
                    let locked = capstan_process::lock_exclusive(&duplicate, true).map(drop);
                    let _ = got.send(locked);
                })
                .map_err(io(&lock_path))?;
            match get.recv_timeout(lock_timeout) {
                Ok(Ok(())) => {}
                // flock itself failed (no locks on this filesystem, say): not "locked".
                Ok(Err(e)) => return Err(io(&lock_path)(e)),
                Err(_) => return Err(locked()),
            }
        }
        lock.set_len(0).map_err(io(&lock_path))?;
        lock.rewind().map_err(io(&lock_path))?;
        lock.write_all(holder_description().as_bytes())
            .map_err(io(&lock_path))?;
        Ok(DirectoryBackend {
            dir: dir.to_path_buf(),
            writer: None,
            writer_thread: None,
            _lock: lock,
        })
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn journal_path(&self) -> PathBuf {
        self.dir.join("journal")
    }

    fn read_stored(&self) -> Result<(State, LoadReport), StateError> {
        read_stored(&self.dir)
    }

    /// Folds what is stored (snapshot and journal, as read back from disk) into a new
    /// snapshot. Unlike `compact`, it does not trust anyone's copy in memory, so it is right
    /// even after an interrupted run whose in-flight records were still being written.
    pub fn compact_stored(&mut self) -> Result<(), StateError> {
        self.stop_writer();
        let (state, _) = self.read_stored()?;
        self.compact(&state)
    }

    /// Repairs a damaged state, as the user asked: a snapshot that does not read (a changed
    /// byte fails its checksum) is rebuilt from the previous snapshot and the journals, and set
    /// aside as `snapshot.json.damaged-TIME`; every damaged journal line is copied, byte for
    /// byte, into `journal.damaged-TIME` (0600); then every intact record is folded into a new
    /// snapshot. Says where what was damaged went.
    pub fn repair(&mut self) -> Result<Repaired, StateError> {
        self.stop_writer();
        let snapshot = self.dir.join("snapshot.json");
        let rebuilt = match read_snapshot(&snapshot) {
            Ok(_) => None,
            Err(StateError::BadSnapshot { message, .. }) => {
                let state =
                    self.rebuild_from_previous()
                        .map_err(|why| StateError::Unrepairable {
                            path: snapshot.clone(),
                            message,
                            why,
                        })?;
                Some(state)
            }
            Err(e) => return Err(e),
        };
        let journal = self.journal_path();
        let mut damaged = Vec::new();
        if let Ok(file) = File::open(&journal) {
            for_each_line(file, &journal, |_, line, _| {
                if decode_bytes(line).is_none() {
                    damaged.extend_from_slice(line);
                    damaged.push(b'\n');
                }
            })?;
        }
        let aside = if damaged.is_empty() {
            None
        } else {
            let path = self.dir.join(format!("journal.damaged-{}", now_unix()));
            let mut file = open_owned(private_file().write(true).create_new(true), &path)?;
            file.write_all(&damaged)
                .and_then(|()| file.sync_all())
                .map_err(io(&path))?;
            fsync_dir(&self.dir)?;
            Some(path)
        };
        let Some(state) = rebuilt else {
            let (state, _) = self.read_stored()?;
            self.compact(&state)?;
            return Ok(Repaired {
                damaged_lines: aside,
                damaged_snapshot: None,
            });
        };
        // The damaged snapshot goes aside first, so that it is not kept as the previous one.
        let snapshot_aside = self
            .dir
            .join(format!("snapshot.json.damaged-{}", now_unix()));
        std::fs::rename(&snapshot, &snapshot_aside).map_err(io(&snapshot))?;
        fsync_dir(&self.dir)?;
        self.write_snapshot(&state, false)?;
        Ok(Repaired {
            damaged_lines: aside,
            damaged_snapshot: Some(snapshot_aside),
        })
    }

    /// The state as the previous snapshot and journal (kept by the last compaction) and the
    /// journal since give it; why not, if they are not there.
    fn rebuild_from_previous(&self) -> Result<State, String> {
        let previous = self.dir.join(PREVIOUS_DIR);
        if std::fs::symlink_metadata(&previous).is_err() {
            return Err(format!(
                "there is no previous snapshot ({} is made by compaction); restore the state from a backup",
                previous.display()
            ));
        }
        let mut state =
            read_snapshot(&previous.join("snapshot.json")).map_err(|e| e.to_string())?;
        for journal in [previous.join("journal"), self.journal_path()] {
            if let Some(file) = open_existing(&journal).map_err(|e| e.to_string())? {
                for_each_line(file, &journal, |_, line, _| {
                    if let Some(record) = decode_bytes(line) {
                        state.apply_owned(record);
                    }
                })
                .map_err(|e| e.to_string())?;
            }
        }
        state.resources.sort_unstable_keys();
        Ok(state)
    }

    fn stop_writer(&mut self) {
        self.writer = None;
        if let Some(thread) = self.writer_thread.take() {
            let _ = thread.join();
        }
    }

    fn start_writer(&mut self) -> Result<(), StateError> {
        let path = self.journal_path();
        let mut file = open_owned(private_file().create(true).append(true), &path)?;
        let (tx, rx) = mpsc::channel::<WriteRequest>();
        let thread = std::thread::Builder::new()
            .name("capstan-journal".into())
            .spawn(move || {
                // Group commit: take everything queued, write it, one fsync, acknowledge all.
                // After a failed write or fsync nothing more is written: a torn line must stay
                // the last one, and a later fsync could report success for lost data.
                let mut broken: Option<String> = None;
                // Whether writes keep coming (the last group had more than one, and no pause
                // since), and how long the last fsync took.
                let mut busy = false;
                let mut last_sync = Duration::ZERO;
                loop {
                    let first = match rx.try_recv() {
                        Ok(first) => first,
                        Err(mpsc::TryRecvError::Disconnected) => break,
                        Err(mpsc::TryRecvError::Empty) => {
                            let waiting = Instant::now();
                            let first = match rx.recv() {
                                Ok(first) => first,
                                Err(_) => break,
                            };
                            // After a real pause the next write is a fresh start, never held
                            // back. (Not merely an empty queue: right after an fsync it often
                            // is, under full load, and lingering less then cost ~8 %.)
                            if waiting.elapsed() >= GROUP_COMMIT_IDLE {
                                busy = false;
                            }
                            first
                        }
                    };
                    let mut batch = vec![first];
                    while let Ok(more) = rx.try_recv() {
                        batch.push(more);
                    }
                    if busy {
                        // Writes are arriving faster than fsyncs finish: give them a moment
                        // to gather, so fewer fsyncs carry them. At most half the last fsync
                        // (a fast disk is barely held back) and at most 200 µs. Asleep rather
                        // than waiting on the channel, so senders need not wake this thread
                        // for each write.
                        std::thread::sleep((last_sync / 2).min(GROUP_COMMIT_LINGER));
                        while let Ok(more) = rx.try_recv() {
                            batch.push(more);
                        }
                    }
                    busy = batch.len() > 1;
                    // Encoded here, off the thread that runs the operations.
                    let mut bytes = Vec::with_capacity(512 * batch.len());
                    for (records, _) in &batch {
                        for record in records {
                            encode_into(record, &mut bytes);
                        }
                    }
                    let started = Instant::now();
                    let result = match &broken {
                        Some(e) => Err(format!("an earlier journal write failed: {e}")),
                        None => file
                            .write_all(&bytes)
                            .and_then(|()| file.sync_data())
                            .map_err(|e| e.to_string()),
                    };
                    last_sync = started.elapsed();
                    if let Err(e) = &result {
                        broken.get_or_insert_with(|| e.clone());
                    }
                    for (_, ack) in batch {
                        let _ = ack.send(result.clone());
                    }
                }
            })
            .map_err(io(&path))?;
        self.writer = Some(tx);
        self.writer_thread = Some(thread);
        Ok(())
    }
}

/// Creates `dir` if needed, private to its owner (0700).
fn make_private_dir(dir: &Path) -> Result<(), StateError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))
}

/// Makes an existing state directory and its files private (as an older capstan, or a
/// permissive umask, may have left them), before the first write.
fn make_private(dir: &Path) -> Result<(), StateError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(dir).map_err(io(dir))?;
    if meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
    }
    // Files made before the state was private: ours alone, never through a link (a chmod
    // follows one, to whatever file it names).
    for name in ["journal", "snapshot.json", "lock", OWNER_FILE] {
        let path = dir.join(name);
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            if !meta.is_file() {
                return Err(untrusted(&path, "is not a plain file".into()));
            }
            check_owned(&meta, &path)?;
            if meta.permissions().mode() & 0o077 != 0 {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                    .map_err(io(&path))?;
            }
        }
    }
    Ok(())
}

/// A state file opened as its owner's alone: never through a symbolic link, and refused if
/// another user owns it (root writing secrets into a file another user can read, or into one
/// a link points at, is what this prevents).
fn open_owned(options: &mut OpenOptions, path: &Path) -> Result<File, StateError> {
    let file = capstan_process::no_follow(options)
        .open(path)
        .map_err(|e| {
            if capstan_process::is_symlink_refusal(&e) {
                untrusted(path, "is a symbolic link".into())
            } else {
                io(path)(e)
            }
        })?;
    check_owned(&file.metadata().map_err(io(path))?, path)?;
    Ok(file)
}

/// A temporary file made anew (`O_EXCL`): whatever was left at its name (a crash's, or a link
/// another user put there) is removed first, never written through.
fn create_temporary(path: &Path) -> Result<File, StateError> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(path)(e)),
    }
    open_owned(private_file().write(true).create_new(true), path)
}

/// Refuses what another user owns.
fn check_owned(meta: &std::fs::Metadata, path: &Path) -> Result<(), StateError> {
    use std::os::unix::fs::MetadataExt;
    if meta.uid() == capstan_process::own_uid() {
        Ok(())
    } else {
        Err(untrusted(
            path,
            format!(
                "belongs to {}, not to you ({})",
                user(meta.uid()),
                user(capstan_process::own_uid())
            ),
        ))
    }
}

/// The state directory is ours (and so is the link to it, if it is one).
fn check_dir(dir: &Path) -> Result<(), StateError> {
    let link = std::fs::symlink_metadata(dir).map_err(io(dir))?;
    if link.file_type().is_symlink() {
        check_owned(&link, dir)?;
    }
    check_owned(&std::fs::metadata(dir).map_err(io(dir))?, dir)
}

fn untrusted(path: &Path, why: String) -> StateError {
    StateError::Untrusted {
        path: path.to_path_buf(),
        why,
    }
}

/// "user `alice` (uid 1000)", or "uid 1000" for a uid with no name.
fn user(uid: u32) -> String {
    match capstan_process::user_name(uid) {
        Some(name) => format!("user `{name}` (uid {uid})"),
        None => format!("uid {uid}"),
    }
}

/// Options for a state file: created 0600, whatever the umask.
fn private_file() -> OpenOptions {
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = OpenOptions::new();
    options.mode(0o600);
    options
}

/// Reads the state stored in `dir` (snapshot, then journal) as it is now.
fn read_stored(dir: &Path) -> Result<(State, LoadReport), StateError> {
    // Retried when a compaction replaced the journal while we read (its inode changed).
    loop {
        let journal_path = dir.join("journal");
        // The journal is opened before the snapshot: a compaction in between then gives an old
        // journal over a new snapshot that already holds it, and replaying records is
        // idempotent; the other order could miss the records folded away.
        let journal = open_existing(&journal_path)?;
        let snapshot_path = dir.join("snapshot.json");
        let mut state = read_snapshot(&snapshot_path)?;
        let mut report = LoadReport::default();
        if let Some(file) = journal {
            use std::os::unix::fs::MetadataExt;
            let opened = file.metadata().map_err(io(&journal_path))?.ino();
            for_each_line(file, &journal_path, |number, line, whole| {
                match decode_bytes(line) {
                    Some(record) => {
                        state.apply_owned(record);
                        report.records += 1;
                        // A whole record cut just before its line break: kept, and the line
                        // ended before anything is appended after it.
                        report.unterminated_tail |= !whole;
                    }
                    // Only the last line can be torn; `whole` is false only for it.
                    None if !whole => report.torn_tail = Some(number),
                    None => report.damaged.push(number),
                }
            })?;
            let now = std::fs::metadata(&journal_path).map(|m| m.ino()).ok();
            if now.is_some() && now != Some(opened) {
                continue;
            }
        }
        state.resources.sort_unstable_keys();
        return Ok((state, report));
    }
}

/// The last line of a snapshot: its checksum (CRC-32 of every byte before this line).
const SNAPSHOT_CHECKSUM: &str = "capstan-snapshot-crc32 ";

/// The state a snapshot holds (an empty one if there is none), its checksum verified (a
/// snapshot written before snapshots had one is read as it is).
fn read_snapshot(path: &Path) -> Result<State, StateError> {
    let Some(mut file) = open_existing(path)? else {
        return Ok(State::default());
    };
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(io(path))?;
    let bad = |message: String| StateError::BadSnapshot {
        path: path.to_path_buf(),
        message,
    };
    let body = match checksummed_body(&bytes) {
        Some(Ok(body)) => body,
        Some(Err(())) => {
            return Err(bad(
                "it fails its checksum: it was changed or damaged on disk".into(),
            ))
        }
        None => &bytes[..],
    };
    serde_json::from_slice(body).map_err(|e| bad(e.to_string()))
}

/// A snapshot's body if its last line is a checksum: `Ok` if the body matches it, `Err` if
/// not; `None` for a snapshot without one.
fn checksummed_body(bytes: &[u8]) -> Option<Result<&[u8], ()>> {
    let text = bytes.strip_suffix(b"\n")?;
    let at = text.iter().rposition(|&b| b == b'\n')? + 1;
    let line = std::str::from_utf8(&text[at..]).ok()?;
    let sum = line.strip_prefix(SNAPSHOT_CHECKSUM)?;
    let body = &bytes[..at];
    Some(match u32::from_str_radix(sum, 16) {
        Ok(sum) if sum == crc32fast::hash(body) => Ok(body),
        _ => Err(()),
    })
}

/// Where compaction keeps the snapshot and journal it replaces (which, replayed, give the new
/// snapshot): what `state repair` rebuilds from when the snapshot is damaged.
pub const PREVIOUS_DIR: &str = "previous";

/// A state file to read, if it exists, never through a symbolic link (what a link points at
/// is not this state's).
fn open_existing(path: &Path) -> Result<Option<File>, StateError> {
    match capstan_process::no_follow(OpenOptions::new().read(true)).open(path) {
        Ok(file) => Ok(Some(file)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) if capstan_process::is_symlink_refusal(&e) => {
            Err(untrusted(path, "is a symbolic link".into()))
        }
        Err(e) => Err(io(path)(e)),
    }
}

/// Calls `each(number, text, whole)` for every non-empty line of a journal, where `whole`
/// says whether the line ended with a line break (only the last one can lack it).
fn for_each_line(
    file: File,
    path: &Path,
    mut each: impl FnMut(usize, &[u8], bool),
) -> Result<(), StateError> {
    let mut reader = BufReader::new(file);
    let mut line = Vec::new();
    let mut number = 0;
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) => return Err(io(path)(e)),
        }
        number += 1;
        let whole = line.last() == Some(&b'\n');
        let bytes = line.strip_suffix(b"\n").unwrap_or(&line);
        if !bytes.is_empty() {
            each(number, bytes, whole);
        }
    }
}

/// A journal line's record, if it is one (text that is not UTF-8 is damage).
fn decode_bytes(line: &[u8]) -> Option<Record> {
    decode(std::str::from_utf8(line).ok()?)
}

/// The state in `dir` for a command that only reads: no lock taken, nothing created or
/// written (a missing directory is an empty state), consistent even while another command
/// appends or compacts. A torn last line is left out (it may be a write in progress).
pub fn read_only(dir: &Path) -> Result<(State, LoadReport), StateError> {
    read_stored(dir)
}

/// The file in a state directory that names the deployment it belongs to.
pub const OWNER_FILE: &str = "deployment";

/// Checks that the state in `dir` belongs to the deployment file named `deployment` (its
/// file name, e.g. `capstan.json`), so two deployments in one directory never share a state
/// by accident. A state that names no deployment yet (new, or made by an older capstan) is
/// claimed for `deployment` when `claim` is set — by commands that write, holding the lock.
pub fn check_owner(dir: &Path, deployment: &str, claim: bool) -> Result<(), StateError> {
    check_location(dir, claim)?;
    let path = dir.join(OWNER_FILE);
    let read = |path: &Path| -> Result<String, StateError> {
        let mut text = String::new();
        open_owned(OpenOptions::new().read(true), path)?
            .read_to_string(&mut text)
            .map_err(io(path))?;
        Ok(text)
    };
    let read = match read(&path) {
        Ok(text) => Ok(text),
        Err(StateError::Io { source, .. }) => Err(source),
        Err(other) if claim => return Err(other),
        // A command that only reads reads what it can.
        Err(_) => std::fs::read_to_string(&path),
    };
    match read {
        Ok(owner) if owner.trim() == deployment => Ok(()),
        // A claim a full disk left empty claims nothing.
        Ok(owner) if owner.trim().is_empty() => {
            if claim {
                write_claim(dir, &path, deployment)?;
            }
            Ok(())
        }
        Ok(owner) => Err(StateError::OtherDeployment {
            dir: dir.to_path_buf(),
            owner: owner.trim().to_string(),
            deployment: deployment.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if claim {
                write_claim(dir, &path, deployment)?;
            }
            Ok(())
        }
        Err(e) => Err(io(&path)(e)),
    }
}

/// Writes the claim whole or not at all: a temporary file, synced, renamed into place, the
/// directory synced (a full disk leaves no empty claim behind).
fn write_claim(dir: &Path, path: &Path, deployment: &str) -> Result<(), StateError> {
    write_whole(dir, path, &format!("{deployment}\n"))
}

/// The file in a state directory that says where it lives: its path, and the device and inode
/// of the directory (which a move keeps and a copy does not).
pub const LOCATION_FILE: &str = "location";

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Location {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

/// Refuses a state copied from another directory: its file resources record absolute paths,
/// so it would plan the original's files as unchanged and change them. A state moved (the
/// same directory, renamed) or restored where it was is its own; `claim` records where it
/// lives now (for commands that write, holding the lock).
fn check_location(dir: &Path, claim: bool) -> Result<(), StateError> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(dir) else {
        // No state yet: nothing to compare.
        return Ok(());
    };
    let here = Location {
        path: std::fs::canonicalize(dir).map_err(io(dir))?,
        dev: meta.dev(),
        ino: meta.ino(),
    };
    let path = dir.join(LOCATION_FILE);
    let recorded: Option<Location> = match open_existing(&path) {
        Ok(Some(mut file)) => {
            let mut text = String::new();
            file.read_to_string(&mut text).map_err(io(&path))?;
            serde_json::from_str(&text).ok()
        }
        Ok(None) => None,
        Err(e) if claim => return Err(e),
        Err(_) => None,
    };
    match recorded {
        Some(r) if r == here => Ok(()),
        Some(r) if r.path != here.path && (r.dev, r.ino) != (here.dev, here.ino) => {
            Err(StateError::Copied {
                dir: dir.to_path_buf(),
                original: r.path,
            })
        }
        // New, made by an older capstan, moved, or restored in place.
        _ if claim => {
            let text = serde_json::to_string(&here).unwrap_or_default();
            write_whole(dir, &path, &format!("{text}\n"))
        }
        _ => Ok(()),
    }
}

/// Writes a small state file whole or not at all.
fn write_whole(dir: &Path, path: &Path, contents: &str) -> Result<(), StateError> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let temporary = dir.join(format!("{}.tmp", name.unwrap_or_default()));
    let written = create_temporary(&temporary).and_then(|mut file| {
        file.write_all(contents.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(io(&temporary))
    });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temporary);
        return Err(e);
    }
    std::fs::rename(&temporary, path).map_err(io(path))?;
    fsync_dir(dir)
}

/// The longest the journal writer waits for more records before a group commit, when records
/// are arriving faster than fsyncs complete (it waits at most half the last fsync's time).
const GROUP_COMMIT_LINGER: Duration = Duration::from_micros(200);
/// A wait for the next write at least this long ends a busy spell: the write after it is not
/// held back.
const GROUP_COMMIT_IDLE: Duration = Duration::from_millis(1);

impl StateBackend for DirectoryBackend {
    fn load(&mut self) -> Result<(State, LoadReport), StateError> {
        let (state, report) = self.read_stored()?;
        if !report.damaged.is_empty() {
            return Err(StateError::Damaged {
                path: self.journal_path(),
                lines: report.damaged,
            });
        }
        make_private(&self.dir)?;
        if report.torn_tail.is_some() || report.unterminated_tail {
            // Start a clean journal so appends never follow a torn or unended line.
            self.compact(&state)?;
        }
        self.start_writer()?;
        Ok((state, report))
    }

    fn append(&self, records: Vec<Record>) -> oneshot::Receiver<Result<(), String>> {
        let (ack, done) = oneshot::channel();
        match &self.writer {
            Some(writer) => {
                if let Err(mpsc::SendError((_, ack))) = writer.send((records, ack)) {
                    let _ = ack.send(Err("the journal writer has stopped".into()));
                }
            }
            None => {
                let _ = ack.send(Err("the state was not loaded before writing".into()));
            }
        }
        done
    }

    fn compact(&mut self, state: &State) -> Result<(), StateError> {
        self.write_snapshot(state, true)
    }
}

impl DirectoryBackend {
    /// Writes `state` as the snapshot and empties the journal; `keep` keeps the snapshot and
    /// journal it replaces in `previous/` (not when what it replaces is damaged).
    fn write_snapshot(&mut self, state: &State, keep: bool) -> Result<(), StateError> {
        // Stop the writer so nothing is appended to the journal being replaced.
        self.stop_writer();
        let snapshot = self.dir.join("snapshot.json");
        let temp = self.dir.join("snapshot.json.tmp");
        {
            let file = create_temporary(&temp)?;
            // Buffered: serde_json writes token by token, a system call each on a bare file.
            // Checksummed on the way (a last line holds it), so a byte changed on disk later
            // is found, not read as another state.
            let mut writer = Checksummed {
                inner: std::io::BufWriter::with_capacity(1 << 20, file),
                hasher: crc32fast::Hasher::new(),
            };
            serde_json::to_writer(&mut writer, state).map_err(|e| StateError::Io {
                path: temp.clone(),
                source: e.into(),
            })?;
            writer.write_all(b"\n").map_err(io(&temp))?;
            let sum = writer.hasher.clone().finalize();
            let mut inner = writer.inner;
            inner
                .write_all(format!("{SNAPSHOT_CHECKSUM}{sum:08x}\n").as_bytes())
                .map_err(io(&temp))?;
            let file = inner.into_inner().map_err(|e| StateError::Io {
                path: temp.clone(),
                source: e.into_error(),
            })?;
            file.sync_all().map_err(io(&temp))?;
        }
        if keep {
            self.keep_previous()?;
        }
        std::fs::rename(&temp, &snapshot).map_err(io(&snapshot))?;
        // The new snapshot must be durable before the journal it replaces is emptied.
        fsync_dir(&self.dir)?;
        let journal = self.journal_path();
        let empty = self.dir.join("journal.tmp");
        create_temporary(&empty)?.sync_all().map_err(io(&empty))?;
        std::fs::rename(&empty, &journal).map_err(io(&journal))?;
        fsync_dir(&self.dir)?;
        self.start_writer()
    }
}

impl DirectoryBackend {
    /// Keeps the snapshot and journal about to be replaced in `previous/` (hard links: no
    /// copy), as one pair made whole before it replaces the pair before it.
    fn keep_previous(&self) -> Result<(), StateError> {
        let previous = self.dir.join(PREVIOUS_DIR);
        let making = self.dir.join(format!("{PREVIOUS_DIR}.tmp"));
        let replaced = self.dir.join(format!("{PREVIOUS_DIR}.old"));
        for leftover in [&making, &replaced] {
            if std::fs::symlink_metadata(leftover).is_ok() {
                std::fs::remove_dir_all(leftover).map_err(io(leftover))?;
            }
        }
        let mut kept = false;
        for name in ["snapshot.json", "journal"] {
            let from = self.dir.join(name);
            if std::fs::symlink_metadata(&from).is_err() {
                continue;
            }
            if !kept {
                make_private_dir(&making)?;
                kept = true;
            }
            std::fs::hard_link(&from, making.join(name)).map_err(io(&from))?;
        }
        if !kept {
            return Ok(());
        }
        fsync_dir(&making)?;
        if std::fs::symlink_metadata(&previous).is_ok() {
            std::fs::rename(&previous, &replaced).map_err(io(&previous))?;
        }
        std::fs::rename(&making, &previous).map_err(io(&making))?;
        fsync_dir(&self.dir)?;
        if std::fs::symlink_metadata(&replaced).is_ok() {
            std::fs::remove_dir_all(&replaced).map_err(io(&replaced))?;
        }
        Ok(())
    }
}

/// Hashes what passes through it.
struct Checksummed<W> {
    inner: W,
    hasher: crc32fast::Hasher,
}

impl<W: Write> Write for Checksummed<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl Drop for DirectoryBackend {
    fn drop(&mut self) {
        self.writer = None;
        if let Some(thread) = self.writer_thread.take() {
            let _ = thread.join();
        }
    }
}

/// Writes records and waits until they are durable.
pub async fn append_durably(
    backend: &dyn StateBackend,
    records: Vec<Record>,
) -> Result<(), StateError> {
    match backend.append(records).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(StateError::WriterGone(e)),
        Err(_) => Err(StateError::WriterGone("no acknowledgement".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn done(address: &str, n: i64) -> Record {
        Record::Done {
            address: address.into(),
            state: ResourceState {
                parent: None,
                sensitive: vec![],
                tainted: false,
                provider: "p".into(),
                resource_type: "t".into(),
                inputs: json!({"n": n}).into(),
                outputs: json!({"n": n}).into(),
                dependencies: vec![],
            },
        }
    }

    fn intent(address: &str) -> Record {
        Record::Intent {
            address: address.into(),
            operation: OperationKind::Create,
            provider: "p".into(),
            resource_type: "t".into(),
            inputs: Json::empty_object(),
            time: 1,
        }
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn records_survive_reopening_and_pending_operations_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut backend = DirectoryBackend::open(dir.path(), Duration::ZERO).unwrap();
            backend.load().unwrap();
            block_on(append_durably(
                &backend,
                vec![intent("a"), done("a", 1), intent("b")],
            ))
            .unwrap();
        }
        let mut backend = DirectoryBackend::open(dir.path(), Duration::ZERO).unwrap();
        let (state, report) = backend.load().unwrap();
        assert_eq!(report.records, 3);
        assert_eq!(state.resources["a"].outputs, json!({"n": 1}));
        assert!(state.pending.contains_key("b"), "b was in flight");
    }

    #[test]
    fn a_burst_of_writes_is_grouped_and_every_one_is_kept_in_order() {
        // Thousands of writes in flight at once: the writer groups them (and, once busy,
        // gathers before each fsync); each is acknowledged, none is lost or reordered, and a
        // write after a pause is acknowledged too.
        let dir = tempfile::tempdir().unwrap();
        {
            let mut backend = DirectoryBackend::open(dir.path(), Duration::ZERO).unwrap();
            backend.load().unwrap();
            block_on(async {
                let acks: Vec<_> = (0..3000)
                    .map(|i| backend.append(vec![done(&format!("r{}", i % 1000), i)]))
                    .collect();
                for ack in acks {
                    ack.await.unwrap().unwrap();
                }
                std::thread::sleep(Duration::from_millis(5));
                append_durably(&backend, vec![done("last", -1)])
                    .await
                    .unwrap();
            });
        }
        let mut backend = DirectoryBackend::open(dir.path(), Duration::ZERO).unwrap();
        let (state, report) = backend.load().unwrap();
        assert_eq!(report.records, 3001);
        assert!(report.damaged.is_empty() && report.torn_tail.is_none());
        // Each address's last write wins: written in order, read back in order.
        for i in 0..1000 {
            assert_eq!(
                state.resources[format!("r{i}").as_str()].outputs,
                json!({"n": 2000 + i})
            );
        }
        assert_eq!(state.resources["last"].outputs, json!({"n": -1}));
    }

    #[test]
    fn a_torn_or_damaged_journal_keeps_every_intact_record() {
        let dir = tempfile::tempdir().unwrap();
        let journal = dir.path().join("journal");
        let mut text = String::new();
        for n in 0..3 {
            text.push_str(&String::from_utf8(encode(&done(&format!("r{n}"), n))).unwrap());
        }
        let damaged = String::from_utf8(encode(&done("bad", 9)))
            .unwrap()
            .replace("\"n\":9", "\"n\":8");
        text.push_str(&damaged);
        text.push_str(&String::from_utf8(encode(&done("r3", 3))).unwrap());
        text.push_str("0badc0de {\"done\":{\"addr"); // torn last line
        std::fs::write(&journal, &text).unwrap();
        // A read-only look sees every intact record and names the damage, and writes nothing.
        let (state, report) = read_only(dir.path()).unwrap();
        assert_eq!(report.records, 4);
        assert_eq!(report.damaged, vec![4]);
        assert_eq!(report.torn_tail, Some(6));
        assert_eq!(
            state.resources.keys().cloned().collect::<Vec<_>>(),
            vec!["r0", "r1", "r2", "r3"]
        );
        assert_eq!(std::fs::read_to_string(&journal).unwrap(), text);
        // A command that would write stops, and changes nothing.
        let mut backend = DirectoryBackend::open(dir.path(), Duration::ZERO).unwrap();
        match backend.load() {
            Err(StateError::Damaged { lines, .. }) => assert_eq!(lines, vec![4]),
            other => panic!("expected the damage to stop it: {other:?}"),
        }
        assert_eq!(std::fs::read_to_string(&journal).unwrap(), text);
        // Repair, on the user's say-so: the damaged line is kept aside, byte for byte.
        let aside = backend
            .repair()
            .unwrap()
            .damaged_lines
            .expect("a file of damaged lines");
        assert_eq!(
            std::fs::read_to_string(&aside).unwrap(),
            format!("{damaged}0badc0de {{\"done\":{{\"addr\n"),
            "the damaged line and the torn one"
        );
        drop(backend);
        let mut backend = DirectoryBackend::open(dir.path(), Duration::ZERO).unwrap();
        let (again, report) = backend.load().unwrap();
        assert_eq!(report, LoadReport::default());
        assert_eq!(again, state);
    }

    #[test]
    fn only_a_torn_last_line_is_repaired_without_asking() {
        let dir = tempfile::tempdir().unwrap();
        let journal = dir.path().join("journal");
        let mut text = String::from_utf8(encode(&done("r0", 0))).unwrap();
        text.push_str("0badc0de {\"done\":{\"addr");
        std::fs::write(&journal, &text).unwrap();
        let mut backend = DirectoryBackend::open(dir.path(), Duration::ZERO).unwrap();
        let (state, report) = backend.load().unwrap();
        assert_eq!(report.torn_tail, Some(2));
        assert_eq!(state.resources.len(), 1);
        drop(backend);
        assert_eq!(read_only(dir.path()).unwrap().1, LoadReport::default());
    }

    #[test]
    fn a_permissive_state_left_by_an_older_capstan_is_made_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        // As an older capstan left it: world-readable.
        std::fs::create_dir(&state).unwrap();
        std::fs::write(state.join("journal"), "").unwrap();
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(
            state.join("journal"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let mut backend = DirectoryBackend::open(&state, Duration::ZERO).unwrap();
        let (mut s, _) = backend.load().unwrap();
        block_on(append_durably(&backend, vec![done("a", 1)])).unwrap();
        s.apply(&done("a", 1));
        backend.compact(&s).unwrap();
        check_owner(&state, "capstan.json", true).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&state), 0o700);
        for name in ["journal", "snapshot.json", "lock", OWNER_FILE] {
            assert_eq!(mode(&state.join(name)), 0o600, "{name}");
        }
    }

    #[test]
    fn a_record_cut_just_before_its_line_break_is_kept_and_ended() {
        let dir = tempfile::tempdir().unwrap();
        let journal = dir.path().join("journal");
        let mut text = encode(&done("r0", 0));
        text.pop();
        std::fs::write(&journal, &text).unwrap();
        let mut backend = DirectoryBackend::open(dir.path(), Duration::ZERO).unwrap();
        let (state, report) = backend.load().unwrap();
        assert!(report.unterminated_tail && report.damaged.is_empty());
        assert_eq!(state.resources.len(), 1);
        block_on(append_durably(&backend, vec![done("r1", 1)])).unwrap();
        drop(backend);
        let (state, report) = read_only(dir.path()).unwrap();
        assert_eq!(state.resources.len(), 2, "both records, neither damaged");
        assert_eq!(
            report,
            LoadReport {
                records: 1,
                ..LoadReport::default()
            }
        );
    }

    #[test]
    fn journals_keep_their_format_and_old_ones_still_read() {
        // Operations are a type now, written as the same words as before.
        let line = String::from_utf8(encode(&intent("a"))).unwrap();
        assert!(line.contains(r#""operation":"create""#), "{line}");
        // Older runs recorded an interrupted replace as "replace".
        let json = r#"{"failed":{"address":"a","operation":"replace","error":"interrupted"}}"#;
        let old = format!("{:08x} {json}\n", crc32fast::hash(json.as_bytes()));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("journal"), format!("{line}{old}")).unwrap();
        let (state, report) = read_only(dir.path()).unwrap();
        assert_eq!(report.records, 2);
        assert!(report.damaged.is_empty());
        assert!(state.pending.is_empty(), "the failure settled the intent");
    }

    #[test]
    fn times_are_written_as_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_963_487), "2026-11-29T14:44:47Z");
    }

    #[test]
    fn garbage_of_any_kind_never_panics() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = Vec::new();
        for n in 0..2000u32 {
            bytes.push((n.wrapping_mul(2654435761) >> 13) as u8);
        }
        std::fs::write(dir.path().join("journal"), &bytes).unwrap();
        let (state, report) = read_only(dir.path()).unwrap();
        assert!(state.resources.is_empty());
        assert!(!report.damaged.is_empty(), "{report:?}");
        let mut backend = DirectoryBackend::open(dir.path(), Duration::ZERO).unwrap();
        assert!(matches!(backend.load(), Err(StateError::Damaged { .. })));
        let aside = backend
            .repair()
            .unwrap()
            .damaged_lines
            .expect("damage set aside");
        // Byte for byte, even where the bytes are not text (line breaks are the separators).
        let mut expected = bytes.clone();
        if expected.last() != Some(&b'\n') {
            expected.push(b'\n');
        }
        let kept = std::fs::read(&aside).unwrap();
        let strip = |b: &[u8]| {
            b.iter()
                .copied()
                .filter(|c| *c != b'\n')
                .collect::<Vec<u8>>()
        };
        assert_eq!(strip(&kept), strip(&expected));
        assert!(backend.load().unwrap().0.resources.is_empty());
    }

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_identity() {
        let dir = tempfile::tempdir().unwrap();
        let _first = DirectoryBackend::open(dir.path(), Duration::ZERO).unwrap();
        let second = DirectoryBackend::open(dir.path(), Duration::from_millis(100));
        let message = second.err().expect("locked").to_string();
        assert!(
            message.contains(&format!("pid {}", std::process::id())),
            "{message}"
        );
        assert!(message.contains("--lock-timeout"), "{message}");
    }

    #[test]
    fn compaction_keeps_the_state_and_empties_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let mut backend = DirectoryBackend::open(dir.path(), Duration::ZERO).unwrap();
        let (mut state, _) = backend.load().unwrap();
        let records = vec![
            done("a", 1),
            done("b", 2),
            Record::Deleted {
                address: "a".into(),
            },
        ];
        block_on(append_durably(&backend, records.clone())).unwrap();
        for r in &records {
            state.apply(r);
        }
        backend.compact(&state).unwrap();
        assert_eq!(
            std::fs::metadata(dir.path().join("journal")).unwrap().len(),
            0
        );
        drop(backend);
        let mut backend = DirectoryBackend::open(dir.path(), Duration::ZERO).unwrap();
        assert_eq!(backend.load().unwrap().0, state);
    }

    /// Another user's uid to give files to; `None` (skipped, or failed in CI) when this test
    /// cannot, not being root.
    fn other_uid() -> Option<u32> {
        if capstan_process::own_uid() != 0 {
            capstan_test_support::skip_or_fail("not root: cannot give a file to another user");
            return None;
        }
        Some(65534)
    }

    #[test]
    fn a_lock_or_journal_that_is_a_link_is_refused_and_its_target_untouched() {
        for name in ["lock", "journal"] {
            let dir = tempfile::tempdir().unwrap();
            let state = dir.path().join("state");
            std::fs::create_dir(&state).unwrap();
            let victim = dir.path().join("victim");
            std::fs::write(&victim, "precious\n").unwrap();
            std::os::unix::fs::symlink(&victim, state.join(name)).unwrap();
            let opened = DirectoryBackend::open(&state, Duration::ZERO)
                .and_then(|mut backend| backend.load().map(drop));
            let message = opened.err().map(|e| e.to_string()).unwrap_or_default();
            assert!(message.contains("is a symbolic link"), "{name}: {message}");
            assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
        }
    }

    #[test]
    fn temporary_files_left_as_links_are_replaced_not_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious\n").unwrap();
        let mut backend = DirectoryBackend::open(&state, Duration::ZERO).unwrap();
        let (state_now, _) = backend.load().unwrap();
        for name in ["snapshot.json.tmp", "journal.tmp", "deployment.tmp"] {
            std::os::unix::fs::symlink(&victim, state.join(name)).unwrap();
        }
        backend.compact(&state_now).unwrap();
        check_owner(&state, "capstan.json", true).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
        assert_eq!(
            std::fs::read_to_string(state.join(OWNER_FILE)).unwrap(),
            "capstan.json\n"
        );
    }

    #[test]
    fn a_dangling_claim_link_creates_nothing_where_it_points() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        let target = dir.path().join("made-by-root");
        std::os::unix::fs::symlink(&target, state.join(OWNER_FILE)).unwrap();
        let claimed = check_owner(&state, "capstan.json", true);
        assert!(
            claimed
                .as_ref()
                .is_err_and(|e| e.to_string().contains("is a symbolic link")),
            "{claimed:?}"
        );
        assert!(!target.exists(), "nothing made through the link");
    }

    #[test]
    fn a_state_directory_or_journal_of_another_user_is_refused() {
        let Some(other) = other_uid() else { return };
        // The directory itself.
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        std::os::unix::fs::chown(&state, Some(other), Some(other)).unwrap();
        let refused = DirectoryBackend::open(&state, Duration::ZERO).err();
        let message = refused.map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains("belongs to"), "{message}");
        assert!(!state.join("lock").exists(), "nothing made in it");

        // A journal someone else owns in a directory of ours.
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        std::fs::write(state.join("journal"), "").unwrap();
        std::os::unix::fs::chown(state.join("journal"), Some(other), Some(other)).unwrap();
        let loaded = DirectoryBackend::open(&state, Duration::ZERO)
            .and_then(|mut backend| backend.load().map(drop));
        let message = loaded.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            message.contains("journal") && message.contains("belongs to uid 65534")
                || message.contains("belongs to user"),
            "{message}"
        );
    }

    #[test]
    fn a_state_restored_where_it_was_is_its_own_and_a_copy_elsewhere_is_not() {
        let top = tempfile::tempdir().unwrap();
        let state = top.path().join("state");
        std::fs::create_dir(&state).unwrap();
        check_owner(&state, "capstan.json", true).unwrap();
        let saved = top.path().join("saved");
        std::fs::rename(&state, &saved).unwrap();
        // Copied elsewhere: refused, naming where it came from.
        let elsewhere = top.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        for name in [OWNER_FILE, LOCATION_FILE] {
            std::fs::copy(saved.join(name), elsewhere.join(name)).unwrap();
        }
        let refused = check_owner(&elsewhere, "capstan.json", false);
        assert!(
            matches!(&refused, Err(StateError::Copied { original, .. }) if original.ends_with("state")),
            "{refused:?}"
        );
        // Restored where it was (a new directory, the same path): its own.
        std::fs::create_dir(&state).unwrap();
        for name in [OWNER_FILE, LOCATION_FILE] {
            std::fs::copy(saved.join(name), state.join(name)).unwrap();
        }
        check_owner(&state, "capstan.json", true).unwrap();
    }

    #[test]
    fn a_flipped_byte_in_the_snapshot_is_found_and_repair_rebuilds_it_from_the_previous_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut backend = DirectoryBackend::open(dir.path(), Duration::ZERO).unwrap();
        let (mut state, _) = backend.load().unwrap();
        let append = |backend: &DirectoryBackend, state: &mut State, records: Vec<Record>| {
            block_on(append_durably(backend, records.clone())).unwrap();
            for r in &records {
                state.apply(r);
            }
        };
        append(&backend, &mut state, vec![done("a", 1), done("b", 2)]);
        backend.compact(&state).unwrap();
        append(&backend, &mut state, vec![done("c", 3)]);
        backend.compact(&state).unwrap();
        append(
            &backend,
            &mut state,
            vec![
                done("d", 4),
                Record::Deleted {
                    address: "a".into(),
                },
            ],
        );
        drop(backend);

        // One byte changed on disk, inside a value: still JSON, another state.
        let snapshot = dir.path().join("snapshot.json");
        let text = std::fs::read_to_string(&snapshot).unwrap();
        let changed = text.replacen("\"c\"", "\"x\"", 1);
        assert_ne!(text, changed);
        std::fs::write(&snapshot, changed).unwrap();
        let refused = read_only(dir.path())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(refused.contains("fails its checksum"), "{refused}");
        assert!(
            refused.contains("state repair"),
            "says what to do: {refused}"
        );

        let mut backend = DirectoryBackend::open(dir.path(), Duration::ZERO).unwrap();
        let repaired = backend.repair().unwrap();
        assert!(repaired.damaged_snapshot.is_some_and(|p| p.exists()));
        drop(backend);
        let mut backend = DirectoryBackend::open(dir.path(), Duration::ZERO).unwrap();
        assert_eq!(backend.load().unwrap().0, state, "every record is back");
    }

    #[test]
    fn a_damaged_snapshot_with_nothing_to_rebuild_from_says_so() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("snapshot.json"),
            "{\"resources\": {}}\ncapstan-snapshot-crc32 00000000\n",
        )
        .unwrap();
        let mut backend = DirectoryBackend::open(dir.path(), Duration::ZERO).unwrap();
        let message = backend
            .repair()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(message.contains("no previous snapshot"), "{message}");
        assert!(dir.path().join("snapshot.json").exists(), "left as it was");
    }
}
