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

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Stdio;

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

struct File;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileIn {
    path: String,
    content: String,
    #[serde(default)]
    mode: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct FileOut {
    path: String,
    content: String,
}

fn absolute(path: &str) -> Result<PathBuf, OperationError> {
    let path = PathBuf::from(path);
    if path.is_absolute() {
        return Ok(path);
    }
    let cwd = std::env::current_dir().map_err(|e| {
        OperationError::permanent(format!("cannot read the working directory: {e}"))
    })?;
    Ok(cwd.join(path))
}

impl Resource for File {
    type Inputs = FileIn;
    type Outputs = FileOut;

    fn resource_type() -> ResourceType {
        ResourceType::new("file")
            .description("A file with the given content; deleting the resource removes it")
            .required(
                "path",
                "Where to write, relative to the deployment file's directory",
            )
            .required("content", "The file's text")
            .optional("mode", "Permission bits in octal, e.g. \"0644\"")
            .output("path", "The absolute path written")
            .output("content", "The text written")
            .stateful(true)
    }

    async fn create(&self, op: &Operation, inputs: FileIn) -> Result<FileOut, OperationError> {
        let path = absolute(&inputs.path)?;
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
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let unique = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut temp_name = path
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_default();
        temp_name.push(format!(".capstan-tmp-{}-{unique}", std::process::id()));
        let temp = path.with_file_name(temp_name);
        tokio::fs::write(&temp, inputs.content.as_bytes())
            .await
            .map_err(|e| {
                OperationError::permanent(format!("cannot write {}: {e}", temp.display()))
            })?;
        if let Some(mode) = mode {
            tokio::fs::set_permissions(&temp, std::fs::Permissions::from_mode(mode))
                .await
                .map_err(|e| {
                    OperationError::permanent(format!("cannot chmod {}: {e}", temp.display()))
                })?;
        }
        tokio::fs::rename(&temp, &path).await.map_err(|e| {
            OperationError::permanent(format!("cannot move into {}: {e}", path.display()))
        })?;
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecIn {
    command: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    stdin: Option<String>,
    #[serde(default)]
    cwd: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ExecOut {
    stdout: String,
    exit_code: i32,
}

impl Resource for Exec {
    type Inputs = ExecIn;
    type Outputs = ExecOut;

    fn resource_type() -> ResourceType {
        ResourceType::new("exec")
            .description("Runs a command; its output lines stream live; stdout is an output")
            .required("command", "The program, a path or a name on PATH")
            .optional("args", "Arguments, a list of strings")
            .optional("env", "Extra environment variables, an object of strings")
            .optional("stdin", "Text fed to the command's standard input")
            .optional("cwd", "Working directory")
            .output("stdout", "Everything the command wrote to stdout")
            .output("exitCode", "Its exit status (always 0 on success)")
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
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(dir) = &inputs.cwd {
            command.current_dir(dir);
        }
        let mut child = command.spawn().map_err(|e| {
            OperationError::invalid_input(format!("cannot run `{}`: {e}", inputs.command))
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
        Ok(ExecOut {
            stdout: output.stdout,
            exit_code: code,
        })
    }
}

// ---- memo ----------------------------------------------------------------------------------

struct Memo;

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MemoValue {
    value: Value,
}

impl Resource for Memo {
    type Inputs = MemoValue;
    type Outputs = MemoValue;

    fn resource_type() -> ResourceType {
        ResourceType::new("memo")
            .description("Remembers a value in the deployment's state")
            .required("value", "Any JSON value")
            .output("value", "The value remembered")
            .stateful(true)
    }

    async fn create(
        &self,
        _op: &Operation,
        inputs: MemoValue,
    ) -> Result<MemoValue, OperationError> {
        Ok(inputs)
    }
}
