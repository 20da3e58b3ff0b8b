//! Snapshots: written checksummed, the pair they replace kept in `previous/`, read back
//! checked.

use super::*;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde::ser::{SerializeStruct, Serializer};

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
    // No resource takes fewer than 16 bytes of a snapshot: a count above that is not believed.
    let seed = CountedReader {
        limit: body.len() / 16,
    };
    let mut reader = serde_json::Deserializer::from_slice(body);
    let state = seed
        .deserialize(&mut reader)
        .and_then(|state| reader.end().map(|()| state));
    state.map_err(|e| bad(e.to_string()))
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
            serde_json::to_writer(&mut writer, &Counted(sealed.as_ref().unwrap_or(state)))
                .map_err(|e| StateError::Io {
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

/// A snapshot as written: the state with its number of resources first, so that a reader can
/// make room for them all at once. Growing a map of a million resources by doubling copies it
/// into fresh memory at every step (twice its size in all, each page zeroed by the kernel
/// first): that was a third of the time to load such a state.
struct Counted<'a>(&'a State);

impl Serialize for Counted<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut out = serializer.serialize_struct("State", 3)?;
        out.serialize_field("count", &self.0.resources.len())?;
        out.serialize_field("resources", &self.0.resources)?;
        out.serialize_field("pending", &self.0.pending)?;
        out.end()
    }
}

/// Reads a snapshot: a state, its `count` (when the snapshot has one: older ones do not)
/// sizing the map before the resources are read. `limit` caps what a count may reserve (a
/// resource takes more bytes than this many in any snapshot).
struct CountedReader {
    limit: usize,
}

impl<'de> DeserializeSeed<'de> for CountedReader {
    type Value = State;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<State, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for CountedReader {
    type Value = State;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a state")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<State, A::Error> {
        let mut capacity = 0usize;
        let mut resources = None;
        let mut pending = None;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match &*key {
                "count" => capacity = map.next_value::<usize>()?.min(self.limit),
                "resources" => {
                    if resources.is_some() {
                        return Err(de::Error::duplicate_field("resources"));
                    }
                    resources = Some(map.next_value_seed(Resources { capacity })?);
                }
                "pending" => {
                    if pending.is_some() {
                        return Err(de::Error::duplicate_field("pending"));
                    }
                    pending = Some(map.next_value()?);
                }
                // As the derived reader does: what a newer capstan adds is skipped.
                _ => {
                    map.next_value::<de::IgnoredAny>()?;
                }
            }
        }
        Ok(State {
            resources: resources.ok_or_else(|| de::Error::missing_field("resources"))?,
            pending: pending.ok_or_else(|| de::Error::missing_field("pending"))?,
        })
    }
}

/// The resources of a snapshot, read into a map made with room for `capacity`.
struct Resources {
    capacity: usize,
}

impl<'de> DeserializeSeed<'de> for Resources {
    type Value = AddressMap<ResourceState>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Resources {
    type Value = AddressMap<ResourceState>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the resources, by address")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut resources = AddressMap::with_capacity_and_hasher(self.capacity, Default::default());
        while let Some((address, resource)) = map.next_entry::<String, ResourceState>()? {
            resources.insert(address, resource);
        }
        Ok(resources)
    }
}
