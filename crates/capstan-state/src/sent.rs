//! Which journaled intents reached their providers.
//!
//! A run journals intents ahead of its calls (a window of several per job, so intent fsyncs
//! overlap calls), so after a SIGKILL most of the intents without a result were never sent.
//! Just before a batch of calls is sent, the run appends their addresses to `sent`: a plain
//! `write` into the page cache, no fsync. A killed process loses nothing it wrote; a machine
//! that crashed may, so the file names the boot it was written in (the kernel's `boot_id`) and
//! the run (a number the journal writer stamps on that run's intents). The next command that
//! loads the state trusts it only for the same boot and the same run: an intent of that run
//! whose address is not in it was never sent, and is settled as such; anything else stays
//! pending, to be checked.

use std::collections::HashSet;
use std::fs::File;
use std::io::Write;
use std::path::Path;

use crate::files::{open_existing, open_owned, private_file};
use crate::{io, State, StateError};

pub(crate) const SENT_FILE: &str = "sent";
const MAGIC: &str = "capstan-sent-1";

/// This boot of this machine, if the kernel says.
fn boot_id() -> Option<String> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let id = id.trim();
    (!id.is_empty()).then(|| id.to_string())
}

/// A number for one run, distinct from the runs before it in the same directory (they hold
/// its lock one after another).
pub(crate) fn new_run_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(nanos);
    hasher.write_u32(std::process::id());
    // Never 0, so it reads as a run on any journal.
    hasher.finish().max(1)
}

/// The `sent` file of the run now holding the state: started empty, with its header.
pub(crate) struct SentLog {
    file: File,
}

impl SentLog {
    pub(crate) fn start(dir: &Path, run: u64) -> Result<Self, StateError> {
        let path = dir.join(SENT_FILE);
        let mut file = open_owned(
            private_file().write(true).create(true).truncate(true),
            &path,
        )?;
        // Without a boot id the header says so, and nothing is ever trusted from it.
        let boot = boot_id().unwrap_or_else(|| "-".into());
        file.write_all(format!("{MAGIC} {run} {boot}\n").as_bytes())
            .map_err(io(&path))?;
        Ok(SentLog { file })
    }

    /// Appends `addresses` in one write, before their calls go out.
    pub(crate) fn mark(&self, dir: &Path, addresses: &[String]) -> Result<(), StateError> {
        let mut line = Vec::with_capacity(addresses.len() * 32);
        for address in addresses {
            serde_json::to_writer(&mut line, address).expect("strings always serialize");
            line.push(b'\n');
        }
        (&self.file)
            .write_all(&line)
            .map_err(io(&dir.join(SENT_FILE)))
    }
}

/// The pending operations in `state` that the `sent` file in `dir` proves were never sent: of
/// the run it was written by, in this boot, and not in it. Empty when it proves nothing.
pub(crate) fn never_sent(dir: &Path, state: &State) -> Result<Vec<String>, StateError> {
    if state.pending.is_empty() {
        return Ok(Vec::new());
    }
    let path = dir.join(SENT_FILE);
    let Some(mut file) = open_existing(&path)? else {
        return Ok(Vec::new());
    };
    let mut text = Vec::new();
    std::io::Read::read_to_end(&mut file, &mut text).map_err(io(&path))?;
    let Ok(text) = std::str::from_utf8(&text) else {
        return Ok(Vec::new());
    };
    let mut lines = text.split_inclusive('\n');
    let Some(header) = lines.next() else {
        return Ok(Vec::new());
    };
    let mut words = header.trim_end_matches('\n').split(' ');
    let (Some(MAGIC), Some(run), Some(boot), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return Ok(Vec::new());
    };
    let (Ok(run), Some(now)) = (run.parse::<u64>(), boot_id()) else {
        return Ok(Vec::new());
    };
    if boot != now || !header.ends_with('\n') {
        return Ok(Vec::new());
    }
    let mut sent = HashSet::new();
    for line in lines {
        // A line without its line break was being written when the process died: its calls
        // were not sent yet. One that does not decode proves nothing.
        let Some(line) = line.strip_suffix('\n') else {
            break;
        };
        match serde_json::from_str::<String>(line) {
            Ok(address) => {
                sent.insert(address);
            }
            Err(_) => return Ok(Vec::new()),
        }
    }
    Ok(state
        .pending
        .iter()
        .filter(|(address, op)| op.run == Some(run) && !sent.contains(address.as_str()))
        .map(|(address, _)| address.clone())
        .collect())
}
