//! Whose and where a state is: the deployment file it belongs to, and the directory it lives
//! in (a copy elsewhere is refused).

use super::*;

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
pub(crate) fn write_claim(dir: &Path, path: &Path, deployment: &str) -> Result<(), StateError> {
    write_whole(dir, path, &format!("{deployment}\n"))
}

/// The file in a state directory that says where it lives: its path, and the device and inode
/// of the directory (which a move keeps and a copy does not).
pub const LOCATION_FILE: &str = "location";

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub(crate) struct Location {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

/// Refuses a state copied from another directory: its file resources record absolute paths,
/// so it would plan the original's files as unchanged and change them. A state moved (the
/// same directory, renamed) or restored where it was is its own; `claim` records where it
/// lives now (for commands that write, holding the lock).
pub(crate) fn check_location(dir: &Path, claim: bool) -> Result<(), StateError> {
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
    if here.path.to_str().is_none() {
        // Where it lives is recorded as text; an unreadable record would let a copy pass.
        return Err(StateError::Io {
            path: here.path,
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "this path is not valid UTF-8, and Capstan records where a state lives as text: rename the directory, or give --state one whose path is",
            ),
        });
    }
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
            let text = serde_json::to_string(&here).map_err(|e| StateError::Io {
                path: path.clone(),
                source: e.into(),
            })?;
            write_whole(dir, &path, &format!("{text}\n"))
        }
        _ => Ok(()),
    }
}
