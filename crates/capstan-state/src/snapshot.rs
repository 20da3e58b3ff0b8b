//! Snapshots: written checksummed, the pair they replace kept in `previous/`, read back
//! checked.

use super::*;

/// The last line of a snapshot: its checksum (CRC-32 of every byte before this line).
pub(crate) const SNAPSHOT_CHECKSUM: &str = "capstan-snapshot-crc32 ";

/// The state a snapshot holds (an empty one if there is none), its checksum verified (a
/// snapshot written before snapshots had one is read as it is).
pub(crate) fn read_snapshot(path: &Path) -> Result<State, StateError> {
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
pub(crate) fn checksummed_body(bytes: &[u8]) -> Option<Result<&[u8], ()>> {
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

impl DirectoryBackend {
    /// Writes `state` as the snapshot and empties the journal; `keep` keeps the snapshot and
    /// journal it replaces in `previous/` (not when what it replaces is damaged).
    pub(crate) fn write_snapshot(&mut self, state: &State, keep: bool) -> Result<(), StateError> {
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
            let sealed = self
                .crypt
                .as_ref()
                .map(|crypt| crypt::seal_state(crypt, state));
            serde_json::to_writer(&mut writer, sealed.as_ref().unwrap_or(state)).map_err(|e| {
                StateError::Io {
                    path: temp.clone(),
                    source: e.into(),
                }
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
    pub(crate) fn keep_previous(&self) -> Result<(), StateError> {
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
pub(crate) struct Checksummed<W> {
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
