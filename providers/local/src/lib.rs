//! The `local` provider, built into `capstan`: resources on the machine running the deployment.
//!
//! | type | inputs | outputs |
//! | --- | --- | --- |
//! | `file` | `path`, `content`, `mode` (octal text, optional) | `path`, `content` |
//! | `exec` | `command`, `args`, `env`, `stdin`, `cwd` | `stdout`, `exitCode` |
//! | `memo` | `value` | `value` |
//!
//! Relative paths are relative to the provider's working directory, which `capstan` sets to the
//! directory of the deployment file. `exec` streams the command's output lines live as log
//! events; a non-zero exit is an error carrying the last lines. Parity with NixOps4's `local`
//! provider.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Stdio;

use capstan_provider::schemars::{self, JsonSchema};
use capstan_provider::{Operation, OperationError, Prior, Provider, Resource, ResourceType};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::AsyncWriteExt;

/// The provider, ready to serve.
pub fn provider() -> Provider {
    Provider::new("local", env!("CARGO_PKG_VERSION"))
        .resource(File)
        .resource(Exec)
        .resource(Memo)
}

// ---- file ----------------------------------------------------------------------------------

/// What a temporary file's name carries after the target's name: `NAME.capstan-tmp-PID-N`.
const TEMP_MARK: &str = ".capstan-tmp-";

/// A temporary file, removed when dropped (a failed write, a failed rename, a cancelled
/// operation) unless it was renamed into place.
struct TempFile(PathBuf);

impl TempFile {
    /// It became the real file: nothing to remove.
    fn keep(mut self) {
        self.0 = PathBuf::new();
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.0.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// Whether process `pid` runs: it exists and is not a zombie (a provider killed with its
/// capstan stays one until something reaps it, which in a container may be never).
fn process_running(pid: i32) -> bool {
    let exists = capstan_process::process_exists(pid);
    if !exists {
        return false;
    }
    // /proc/PID/stat: "PID (COMM) STATE …"; COMM may hold spaces and parentheses.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next()),
            Some('Z' | 'X')
        ),
        Err(_) => true,
    }
}

/// Removes temporary files for `path` left by a provider process that no longer runs (one
/// that was SIGKILLed between writing and renaming).
async fn remove_stray_temps(path: &std::path::Path) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return;
    };
    let prefix = format!("{}{TEMP_MARK}", name.to_string_lossy());
    let Ok(mut entries) = tokio::fs::read_dir(dir).await else {
        return;
    };
    while let Ok(Some(entry)) = entries.next_entry().await {
        let entry_name = entry.file_name();
        let Some(rest) = entry_name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        let gone = pid > 0 && !process_running(pid);
        if gone {
            tracing::info!(file = %entry.path().display(), "removing a temporary file left by a killed provider");
            let _ = tokio::fs::remove_file(entry.path()).await;
        }
    }
}

struct File;

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct FileIn {
    /// Where to write, relative to the deployment file's directory
    path: String,
    /// The file's text
    content: String,
    /// Permission bits in octal, e.g. "0644"
    #[serde(default)]
    mode: Option<String>,
}

#[derive(Serialize, Deserialize, JsonSchema)]
struct FileOut {
    /// The absolute path written
    path: String,
    /// The text written
    // Never read back from a request's previous outputs (`prior_unused`: the inputs hold it),
    // so a large file crosses the connection once per request.
    #[serde(default)]
    content: String,
}

/// A file inside the state directory (`CAPSTAN_STATE_DIR`, which capstan tells every provider)
/// would be written over the very record of what was done: refused.
fn refuse_the_state(path: &std::path::Path) -> Result<(), OperationError> {
    let Some(state) = std::env::var_os("CAPSTAN_STATE_DIR").map(PathBuf::from) else {
        return Ok(());
    };
    // Compared as the file system sees them (`./.capstan/../.capstan/journal`, links).
    let real = |p: &std::path::Path| {
        let parent = p.parent().and_then(|d| std::fs::canonicalize(d).ok());
        match (parent, p.file_name()) {
            (Some(parent), Some(name)) => parent.join(name),
            _ => p.to_path_buf(),
        }
    };
    let state = std::fs::canonicalize(&state).unwrap_or(state);
    if real(path).starts_with(&state) {
        return Err(OperationError::invalid_input(format!(
            "{} is inside the state directory {}: writing it would overwrite the record of what was done; choose another path",
            path.display(),
            state.display()
        )));
    }
    Ok(())
}

fn absolute(path: &str) -> Result<PathBuf, OperationError> {
    if path.is_empty() {
        return Err(OperationError::invalid_input(
            "input `path` is empty: give the file to write, relative to the deployment's directory",
        ));
    }
    if path.ends_with('/') || path.ends_with("/.") || path == "." || path.ends_with("/..") {
        return Err(OperationError::invalid_input(format!(
            "input `path` ({path}) names a directory: give the file to write in it"
        )));
    }
    let path = PathBuf::from(path);
    if path.is_absolute() {
        return Ok(path);
    }
    let cwd = std::env::current_dir().map_err(|e| {
        OperationError::permanent(format!("cannot read the working directory: {e}"))
    })?;
    Ok(cwd.join(path))
}

/// A file's outputs as it is now; `not_found` when there is none.
async fn read_file(path: PathBuf) -> Result<FileOut, OperationError> {
    match tokio::fs::read(&path).await {
        Ok(bytes) => Ok(FileOut {
            path: path.display().to_string(),
            content: String::from_utf8_lossy(&bytes).into_owned(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(OperationError::not_found(
            format!("{} does not exist", path.display()),
        )),
        Err(e) => Err(OperationError::transient(format!(
            "cannot read {}: {e}",
            path.display()
        ))),
    }
}

impl Resource for File {
    type Inputs = FileIn;
    type Outputs = FileOut;

    fn resource_type() -> ResourceType {
        ResourceType::new("file")
            .description("A file with the given content; deleting the resource removes it")
            .inputs_from::<FileIn>()
            .outputs_from::<FileOut>()
            // Where it was written is never the secret its content may be.
            .public("path")
            .prior_unused("content")
            .stateful(true)
            .read_checks(true)
    }

    /// The file as it is: edited by hand (its content drifted), or gone.
    async fn read(
        &self,
        _op: &Operation,
        prior: Prior<FileIn, FileOut>,
    ) -> Result<FileOut, OperationError> {
        read_file(PathBuf::from(&prior.outputs.path)).await
    }

    /// The file an interrupted (or failed) create wrote: one at the path with the content it
    /// was to write. A file there with other content is not taken for it (it may be someone
    /// else's, which a later delete must not remove): "not found", and a create writes it.
    async fn find(&self, _op: &Operation, inputs: FileIn) -> Result<FileOut, OperationError> {
        let found = read_file(absolute(&inputs.path)?).await?;
        if found.content == inputs.content {
            Ok(found)
        } else {
            Err(OperationError::not_found(format!(
                "{} holds other content than this resource writes",
                found.path
            )))
        }
    }

    async fn create(&self, op: &Operation, inputs: FileIn) -> Result<FileOut, OperationError> {
        let path = absolute(&inputs.path)?;
        refuse_the_state(&path)?;
        let mode = match &inputs.mode {
            Some(text) => Some(
                u32::from_str_radix(text.trim_start_matches("0o"), 8).map_err(|_| {
                    OperationError::invalid_input(format!(
                        "mode `{text}` is not octal permission bits like \"0644\""
                    ))
                })?,
            ),
            None => None,
        };
        op.phase("writing").await;
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent).await.map_err(|e| {
                OperationError::permanent(format!("cannot create {}: {e}", parent.display()))
            })?;
        }
        // Write beside, then rename: a reader never sees half a file. The temporary name is
        // unique, so two resources writing `x.json` and `x.yaml` at once cannot collide.
        remove_stray_temps(&path).await;
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let unique = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut temp_name = path
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_default();
        temp_name.push(format!("{TEMP_MARK}{}-{unique}", std::process::id()));
        let temp = TempFile(path.with_file_name(temp_name));
        {
            // Private from its first instant when a mode is asked for (the content may be a
            // secret); the exact mode is set before the file takes its name.
            let mut file = tokio::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(if mode.is_some() { 0o600 } else { 0o666 })
                .open(&temp.0)
                .await
                .map_err(|e| {
                    OperationError::permanent(format!("cannot write {}: {e}", temp.0.display()))
                })?;
            // Flushed and synced before the rename: tokio's write only hands the bytes to a
            // blocking task, and a full disk must be an error here, never an empty file later.
            let written = async {
                file.write_all(inputs.content.as_bytes()).await?;
                file.flush().await?;
                file.sync_all().await
            };
            written.await.map_err(|e| {
                OperationError::permanent(format!("cannot write {}: {e}", temp.0.display()))
            })?;
        }
        if let Some(mode) = mode {
            tokio::fs::set_permissions(&temp.0, std::fs::Permissions::from_mode(mode))
                .await
                .map_err(|e| {
                    OperationError::permanent(format!("cannot chmod {}: {e}", temp.0.display()))
                })?;
        }
        tokio::fs::rename(&temp.0, &path).await.map_err(|e| {
            OperationError::permanent(format!("cannot move into {}: {e}", path.display()))
        })?;
        temp.keep();
        tracing::info!(path = %path.display(), bytes = inputs.content.len(), "wrote file");
        Ok(FileOut {
            path: path.display().to_string(),
            content: inputs.content,
        })
    }

    async fn update(
        &self,
        op: &Operation,
        prior: Prior<FileIn, FileOut>,
        inputs: FileIn,
    ) -> Result<FileOut, OperationError> {
        let written = self.create(op, inputs).await?;
        if prior.outputs.path != written.path {
            let _ = tokio::fs::remove_file(&prior.outputs.path).await;
        }
        Ok(written)
    }

    async fn delete(
        &self,
        _op: &Operation,
        prior: Prior<FileIn, FileOut>,
    ) -> Result<(), OperationError> {
        // What a killed provider left beside it goes with it (nothing would write the path
        // again to clean up).
        remove_stray_temps(std::path::Path::new(&prior.outputs.path)).await;
        match tokio::fs::remove_file(&prior.outputs.path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(OperationError::permanent(format!(
                "cannot remove {}: {e}",
                prior.outputs.path
            ))),
        }
    }
}

// ---- exec ----------------------------------------------------------------------------------

struct Exec;

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct ExecIn {
    /// The program, a path or a name on PATH
    command: String,
    /// Arguments, a list of strings
    #[serde(default)]
    args: Vec<String>,
    /// Extra environment variables, an object of strings
    #[serde(default)]
    env: BTreeMap<String, String>,
    /// Text fed to the command's standard input
    #[serde(default)]
    stdin: Option<String>,
    /// Working directory
    #[serde(default)]
    cwd: Option<String>,
}

#[derive(Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
struct ExecOut {
    /// Everything the command wrote to stdout, byte for byte (a command whose stdout is not
    /// UTF-8 fails: pipe it through `base64`)
    stdout: String,
    /// Its exit status (always 0 on success)
    exit_code: i32,
}

impl Resource for Exec {
    type Inputs = ExecIn;
    type Outputs = ExecOut;

    fn resource_type() -> ResourceType {
        ResourceType::new("exec")
            .description("Runs a command; its output lines stream live; stdout is an output")
            .inputs_from::<ExecIn>()
            .outputs_from::<ExecOut>()
            // A secret in its stdin or arguments can reach its stdout, never its status.
            .public("exitCode")
    }

    async fn create(&self, op: &Operation, inputs: ExecIn) -> Result<ExecOut, OperationError> {
        let mut command = tokio::process::Command::new(&inputs.command);
        command
            .args(&inputs.args)
            .envs(&inputs.env)
            .stdin(if inputs.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            });
        if let Some(dir) = &inputs.cwd {
            if !absolute(dir)?.is_dir() {
                return Err(OperationError::invalid_input(format!(
                    "`cwd` {dir:?} is not a directory (relative paths start at the deployment file's directory)"
                )));
            }
            command.current_dir(dir);
        }
        let mut child = capstan_provider::spawn_piped(&mut command).map_err(|e| {
            let why = match e.kind() {
                std::io::ErrorKind::NotFound => {
                    "no such program (give a path, or a name on PATH)".to_string()
                }
                std::io::ErrorKind::PermissionDenied => "it is not executable".to_string(),
                _ => e.to_string(),
            };
            OperationError::invalid_input(format!("cannot run `{}`: {why}", inputs.command))
        })?;
        op.phase(format!("running {}", inputs.command)).await;
        if let (Some(text), Some(mut stdin)) = (inputs.stdin, child.stdin.take()) {
            tokio::task::spawn_local(async move {
                let _ = stdin.write_all(text.as_bytes()).await;
            });
        }
        let output =
            capstan_provider::stream_command(op, child, &format!("`{}`", inputs.command)).await?;
        let code = output.status.code().unwrap_or(-1);
        if !output.status.success() {
            return Err(OperationError::permanent(format!(
                "`{}` exited with status {code}",
                inputs.command
            ))
            .with_details(output.tail.join("\n")));
        }
        let stdout = String::from_utf8(output.stdout).map_err(|e| {
            OperationError::permanent(format!(
                "`{}` wrote bytes to stdout that are not UTF-8 (the first at byte {}); the `stdout` output is text: pipe the command's output through `base64` to pass binary data",
                inputs.command,
                e.utf8_error().valid_up_to()
            ))
        })?;
        Ok(ExecOut {
            stdout,
            exit_code: code,
        })
    }
}

// ---- memo ----------------------------------------------------------------------------------

struct Memo;

#[derive(Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct MemoValue {
    /// The value remembered: any JSON value
    value: Value,
}

impl Resource for Memo {
    type Inputs = MemoValue;
    type Outputs = MemoValue;

    fn resource_type() -> ResourceType {
        ResourceType::new("memo")
            .description("Remembers a value in the deployment's state")
            .inputs_from::<MemoValue>()
            .outputs_from::<MemoValue>()
            .stateful(true)
            // Nothing outside the state: what its inputs say is what there is.
            .read_checks(true)
    }

    async fn find(&self, _op: &Operation, inputs: MemoValue) -> Result<MemoValue, OperationError> {
        Ok(inputs)
    }

    async fn create(
        &self,
        _op: &Operation,
        inputs: MemoValue,
    ) -> Result<MemoValue, OperationError> {
        Ok(inputs)
    }
}
