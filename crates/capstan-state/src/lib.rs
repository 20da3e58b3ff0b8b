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
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

mod claim;
pub mod crypt;
mod files;
mod sent;
mod snapshot;
#[cfg(test)]
mod tests;

pub use claim::{check_owner, LOCATION_FILE, OWNER_FILE};
use files::*;
pub use snapshot::PREVIOUS_DIR;
use snapshot::*;

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
    /// The run that journaled it (see `sent.rs`), when its backend says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<u64>,
    /// JSON pointers (`/inputs/password`) of its sensitive inputs (encrypted when stored).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sensitive: Vec<String>,
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
        /// The run that journals it: stamped by the backend, so leave it `None`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        run: Option<u64>,
        /// JSON pointers (`/inputs/password`) of the inputs that are secrets: encrypted when
        /// a key is configured (see `crypt.rs`).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        sensitive: Vec<String>,
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
                run,
                sensitive,
            } => {
                // Over an operation an earlier run left pending (still unchecked), the new
                // intent cannot be settled as "never sent": that one may have run.
                let run = match self.pending.get(&address) {
                    Some(earlier) if earlier.run != run => None,
                    _ => run,
                };
                self.pending.insert(
                    address,
                    PendingOperation {
                        operation,
                        provider,
                        resource_type,
                        inputs,
                        started: time,
                        run,
                        sensitive,
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
    /// A state kept elsewhere than a directory (a database) could not be read or written.
    #[error("{place}: {message}")]
    Backend { place: String, message: String },
    #[error("the state {place} is locked by {holder}; wait for it to finish, or pass --lock-timeout SECONDS to wait")]
    LockedBy { place: String, holder: String },
    /// The key for the state's secrets is missing, wrong, or cannot be used.
    #[error("{place}: {message}")]
    Keys { place: String, message: String },
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
    /// Operations a killed run journaled but never sent to their providers (it journals
    /// intents a little ahead of its calls): settled, no longer pending.
    pub never_sent: Vec<String>,
    /// Resources holding encrypted values that no key given opens (none was given, or not
    /// the one): they are as stored, `{"$encrypted": …}`.
    pub locked: Vec<String>,
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
    /// Notes, before their calls are sent, that the operations on `addresses` (whose intents
    /// are durable) are being sent, so the next load can tell intents journaled ahead and
    /// never sent from operations that may have run. A backend that does not keep this says
    /// nothing, and every intent without a result stays pending.
    fn mark_sent(&self, addresses: &[String]) -> Result<(), StateError> {
        let _ = addresses;
        Ok(())
    }
}

/// Encoded records and who to tell once they are durable.
type WriteRequest = (Vec<Record>, oneshot::Sender<Result<(), String>>);

/// The embedded backend: a directory with a journal, a snapshot and a lock.
pub struct DirectoryBackend {
    dir: PathBuf,
    writer: Option<mpsc::Sender<WriteRequest>>,
    writer_thread: Option<std::thread::JoinHandle<()>>,
    /// This run's number, stamped on its intents, and its `sent` file (from `load`).
    run: u64,
    sent: Option<sent::SentLog>,
    /// The key the user gave, and the state's data keys it opened (from `load`).
    keys: Option<Arc<crypt::Keys>>,
    crypt: Option<Arc<crypt::Crypt>>,
    /// The state's secrets are encrypted (it has a data key): none may be written in clear.
    sealed: bool,
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

/// Who holds a lock, written into the lock file.
pub fn holder_description() -> String {
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
        "command": scrub_command(&command.join(" ")),
        "since": now_unix(),
    })
    .to_string()
}

/// A command line with any password in it hidden (`scheme://user:PASSWORD@host`, and
/// `password=…` as libpq takes it), for the lock's holder and a database's run rows.
pub fn scrub_command(command: &str) -> String {
    command
        .split(' ')
        .map(|word| {
            let mut out = word.to_string();
            if let Some(at) = word.find("://") {
                let rest = &word[at + 3..];
                let end = rest.find(['/', '?']).unwrap_or(rest.len());
                if let Some(user_end) = rest[..end].rfind('@') {
                    if let Some(colon) = rest[..user_end].find(':') {
                        out = format!(
                            "{}{}:***{}",
                            &word[..at + 3],
                            &rest[..colon],
                            &rest[user_end..]
                        );
                    }
                }
            }
            if let Some(p) = out.find("password=") {
                let start = p + "password=".len();
                let end = out[start..].find('&').map_or(out.len(), |e| start + e);
                out.replace_range(start..end, "***");
            }
            out
        })
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn describe_holder(text: &str) -> String {
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
    let command = scrub_command(&String::from_utf8_lossy(&cmdline).replace('\0', " "));
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
            run: sent::new_run_id(),
            sent: None,
            keys: None,
            crypt: None,
            sealed: false,
            _lock: lock,
        })
    }

    /// The key that seals and opens the state's secrets (before `load`); with none, a state
    /// whose secrets are encrypted loads with them as they are, and takes no new one.
    pub fn set_keys(&mut self, keys: Option<Arc<crypt::Keys>>) {
        self.keys = keys;
    }

    /// Opens the state's data keys with the key given; makes the first one if there is none
    /// and a key was given.
    fn open_keys(&mut self) -> Result<(), StateError> {
        let stored = read_keys(&self.dir)?;
        self.sealed = !stored.is_empty();
        let Some(keys) = &self.keys else {
            return Ok(());
        };
        let crypt = if stored.is_empty() {
            let (key, crypt) =
                crypt::Crypt::new_key(keys, None).map_err(|message| StateError::Keys {
                    place: self.dir.display().to_string(),
                    message,
                })?;
            write_keys(&self.dir, &[key])?;
            self.sealed = true;
            crypt
        } else {
            crypt::Crypt::open(&stored, keys).map_err(|message| StateError::Keys {
                place: self.dir.display().to_string(),
                message,
            })?
        };
        self.crypt = Some(Arc::new(crypt));
        Ok(())
    }

    /// Seals the state's secrets with a new data key, sealed to the key given now (and opened
    /// with the one given before, `old`): every secret is encrypted again, in a new snapshot.
    pub fn rekey(&mut self, new: Arc<crypt::Keys>) -> Result<(), StateError> {
        self.stop_writer();
        let (state, report) = self.read_stored()?;
        if !report.locked.is_empty() {
            return Err(StateError::Keys {
                place: self.dir.display().to_string(),
                message: format!(
                    "the secrets of {} do not open with the key given, so they cannot be sealed again",
                    report.locked.join(", ")
                ),
            });
        }
        let (key, crypt) =
            crypt::Crypt::new_key(&new, None).map_err(|message| StateError::Keys {
                place: self.dir.display().to_string(),
                message,
            })?;
        // The key list first (the new key beside the older ones, which still open what the
        // previous snapshots hold), then the snapshot sealed with it.
        let mut keys = read_keys(&self.dir)?;
        keys.push(key);
        write_keys(&self.dir, &keys)?;
        self.crypt = Some(Arc::new(crypt));
        self.keys = Some(new);
        self.sealed = true;
        self.write_snapshot(&state, false)?;
        // The pair compaction kept holds what the old key (or none) sealed: it goes, so that
        // no secret stays behind in clear or under a key that was meant to be left.
        let previous = self.dir.join(PREVIOUS_DIR);
        if std::fs::symlink_metadata(&previous).is_ok() {
            std::fs::remove_dir_all(&previous).map_err(io(&previous))?;
            fsync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Whether a secret given now would be refused (after `load`): the state's secrets are
    /// encrypted and no key was given to encrypt more.
    pub fn refuses_clear_secrets(&self) -> bool {
        self.sealed && self.crypt.is_none()
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn journal_path(&self) -> PathBuf {
        self.dir.join("journal")
    }

    fn read_stored(&self) -> Result<(State, LoadReport), StateError> {
        read_stored(&self.dir, self.crypt.as_deref())
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
        let crypt = self.crypt.clone();
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
                    // Encoded (and secrets encrypted) here, off the thread that runs the
                    // operations.
                    let mut bytes = Vec::with_capacity(512 * batch.len());
                    for (records, _) in &batch {
                        for record in records {
                            match &crypt {
                                Some(crypt) if crypt::needs_sealing(record) => {
                                    encode_into(&crypt::seal_record(crypt, record), &mut bytes)
                                }
                                _ => encode_into(record, &mut bytes),
                            }
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

/// Reads the state stored in `dir` (snapshot, then journal) as it is now.
fn read_stored(
    dir: &Path,
    crypt: Option<&crypt::Crypt>,
) -> Result<(State, LoadReport), StateError> {
    let mut opening = crypt::Opening::default();
    let (mut state, mut report) = read_stored_sealed(dir)?;
    crypt::open_state(crypt, &mut state, &mut opening);
    if !opening.damaged.is_empty() {
        return Err(StateError::Keys {
            place: dir.display().to_string(),
            message: format!(
                "encrypted values that do not open: {}",
                opening.damaged.join("; ")
            ),
        });
    }
    report.locked = opening.locked.into_iter().collect();
    Ok((state, report))
}

/// The state stored in `dir`, its secrets as stored.
fn read_stored_sealed(dir: &Path) -> Result<(State, LoadReport), StateError> {
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
            let metadata = file.metadata().map_err(io(&journal_path))?;
            let opened = metadata.ino();
            // Room for what the journal may add, made once (growing a map of a million
            // resources by doubling copies it into fresh memory at each step): a resource's
            // records take a few hundred bytes; a guess too low only grows the map, and room
            // that cannot be had is not taken.
            let _ = state
                .resources
                .try_reserve((metadata.len() / JOURNAL_BYTES_PER_RESOURCE) as usize);
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

/// About how many journal bytes one resource's records take, at the least that matters (an
/// intent and a result of a small resource).
const JOURNAL_BYTES_PER_RESOURCE: u64 = 256;

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
    read_only_with(dir, None)
}

/// [`read_only`], opening the state's secrets with `keys` (a key that does not open them is
/// an error; without one they stay as stored and `LoadReport::locked` names their resources).
pub fn read_only_with(
    dir: &Path,
    keys: Option<&crypt::Keys>,
) -> Result<(State, LoadReport), StateError> {
    let stored = read_keys(dir)?;
    let crypt = match keys {
        Some(keys) if !stored.is_empty() => Some(crypt::Crypt::open(&stored, keys).map_err(
            |message| StateError::Keys {
                place: dir.display().to_string(),
                message,
            },
        )?),
        _ => None,
    };
    let (mut state, mut report) = read_stored(dir, crypt.as_ref())?;
    // While a command holds the state, its intents are its own business (in flight, or about
    // to be); once it is gone, those it never sent are not pending.
    if running_holder(dir).is_none() {
        report.never_sent = sent::never_sent(dir, &state)?;
        for address in &report.never_sent {
            state.pending.remove(address);
        }
    }
    Ok((state, report))
}

/// The longest the journal writer waits for more records before a group commit, when records
/// are arriving faster than fsyncs complete (it waits at most half the last fsync's time).
const GROUP_COMMIT_LINGER: Duration = Duration::from_micros(200);
/// A wait for the next write at least this long ends a busy spell: the write after it is not
/// held back.
const GROUP_COMMIT_IDLE: Duration = Duration::from_millis(1);

impl StateBackend for DirectoryBackend {
    fn load(&mut self) -> Result<(State, LoadReport), StateError> {
        self.open_keys()?;
        let (state, report) = self.read_stored()?;
        if !report.damaged.is_empty() {
            return Err(StateError::Damaged {
                path: self.journal_path(),
                lines: report.damaged,
            });
        }
        make_private(&self.dir)?;
        let mut state = state;
        let mut report = report;
        report.never_sent = sent::never_sent(&self.dir, &state)?;
        for address in &report.never_sent {
            state.pending.remove(address);
        }
        if report.torn_tail.is_some() || report.unterminated_tail || !report.never_sent.is_empty() {
            // Start a clean journal so appends never follow a torn or unended line; and
            // settle, in the snapshot, what was never sent (before `sent` starts anew).
            self.compact(&state)?;
        }
        self.sent = Some(sent::SentLog::start(&self.dir, self.run)?);
        self.start_writer()?;
        Ok((state, report))
    }

    fn append(&self, mut records: Vec<Record>) -> oneshot::Receiver<Result<(), String>> {
        for record in &mut records {
            if let Record::Intent { run, .. } = record {
                *run = Some(self.run);
            }
        }
        let (ack, done) = oneshot::channel();
        if self.sealed && self.crypt.is_none() && records.iter().any(crypt::needs_sealing) {
            let _ = ack.send(Err(in_clear_refused()));
            return done;
        }
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
        let has_secrets = state.resources.values().any(|r| !r.sensitive.is_empty())
            || state.pending.values().any(|p| !p.sensitive.is_empty());
        if has_secrets && self.refuses_clear_secrets() {
            return Err(StateError::Keys {
                place: self.dir.display().to_string(),
                message: in_clear_refused(),
            });
        }
        self.write_snapshot(state, true)
    }

    fn mark_sent(&self, addresses: &[String]) -> Result<(), StateError> {
        match &self.sent {
            Some(sent) => sent.mark(&self.dir, addresses),
            None => Err(StateError::WriterGone(
                "the state was not loaded before writing".into(),
            )),
        }
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

/// Why a record with a secret is not written: the state's secrets are encrypted and no key
/// was given to encrypt this one.
pub fn in_clear_refused() -> String {
    format!(
        "a secret would have been written in clear, which this state does not take (PostgreSQL never does; a directory whose secrets are encrypted neither): set {} (an age identity file) or {} to encrypt it",
        crypt::IDENTITY_ENV,
        crypt::PASSPHRASE_ENV
    )
}

/// The state's data keys, sealed (`keys` in the directory: one JSON object a line).
fn read_keys(dir: &Path) -> Result<Vec<crypt::StoredKey>, StateError> {
    let path = dir.join(KEYS_FILE);
    let Some(mut file) = open_existing(&path)? else {
        return Ok(Vec::new());
    };
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(io(&path))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            serde_json::from_str(line).map_err(|e| StateError::Keys {
                place: path.display().to_string(),
                message: format!("a line does not read as a sealed key: {e}"),
            })
        })
        .collect()
}

fn write_keys(dir: &Path, keys: &[crypt::StoredKey]) -> Result<(), StateError> {
    let text: String = keys
        .iter()
        .map(|k| format!("{}\n", serde_json::to_string(k).expect("keys serialize")))
        .collect();
    write_whole(dir, &dir.join(KEYS_FILE), &text)
}

/// The file of the state's sealed data keys.
pub const KEYS_FILE: &str = "keys";
