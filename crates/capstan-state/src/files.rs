//! The state directory's files, opened as their owner's alone: never through a symbolic link,
//! never one another user owns, temporaries made anew, small files written whole.

use super::*;

pub(crate) fn fsync_dir(dir: &Path) -> Result<(), StateError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// Creates `dir` if needed, private to its owner (0700).
pub(crate) fn make_private_dir(dir: &Path) -> Result<(), StateError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))
}

/// Makes an existing state directory and its files private (as an older capstan, or a
/// permissive umask, may have left them), before the first write.
pub(crate) fn make_private(dir: &Path) -> Result<(), StateError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(dir).map_err(io(dir))?;
    if meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
    }
    // Files made before the state was private: ours alone, never through a link (a chmod
    // follows one, to whatever file it names).
    for name in ["journal", "snapshot.json", "lock", OWNER_FILE, KEYS_FILE] {
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
pub(crate) fn open_owned(options: &mut OpenOptions, path: &Path) -> Result<File, StateError> {
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
pub(crate) fn create_temporary(path: &Path) -> Result<File, StateError> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(path)(e)),
    }
    open_owned(private_file().write(true).create_new(true), path)
}

/// Refuses what another user owns.
pub(crate) fn check_owned(meta: &std::fs::Metadata, path: &Path) -> Result<(), StateError> {
    use std::os::unix::fs::MetadataExt;
    if meta.uid() == capstan_process::own_uid() {
        Ok(())
    } else {
        Err(untrusted(
            path,
            format!(
                "belongs to {}, not to you ({})",
                capstan_process::describe_user(meta.uid()),
                capstan_process::describe_user(capstan_process::own_uid())
            ),
        ))
    }
}

/// The state directory is ours (and so is the link to it, if it is one).
pub(crate) fn check_dir(dir: &Path) -> Result<(), StateError> {
    let link = std::fs::symlink_metadata(dir).map_err(io(dir))?;
    if link.file_type().is_symlink() {
        check_owned(&link, dir)?;
    }
    check_owned(&std::fs::metadata(dir).map_err(io(dir))?, dir)
}

pub(crate) fn untrusted(path: &Path, why: String) -> StateError {
    StateError::Untrusted {
        path: path.to_path_buf(),
        why,
    }
}

/// Options for a state file: created 0600, whatever the umask.
pub(crate) fn private_file() -> OpenOptions {
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = OpenOptions::new();
    options.mode(0o600);
    options
}

/// A state file to read, if it exists, never through a symbolic link (what a link points at
/// is not this state's).
pub(crate) fn open_existing(path: &Path) -> Result<Option<File>, StateError> {
    match capstan_process::no_follow(OpenOptions::new().read(true)).open(path) {
        Ok(file) => Ok(Some(file)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) if capstan_process::is_symlink_refusal(&e) => {
            Err(untrusted(path, "is a symbolic link".into()))
        }
        Err(e) => Err(io(path)(e)),
    }
}

/// Writes a small state file whole or not at all.
pub(crate) fn write_whole(dir: &Path, path: &Path, contents: &str) -> Result<(), StateError> {
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
