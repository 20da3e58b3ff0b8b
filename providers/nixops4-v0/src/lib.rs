//! The bridge to NixOps4 version-0 providers.
//!
//! A v0 provider speaks one JSON line in, one JSON line out, on stdio, one process per
//! operation (`../shared/reference/nixops4-v0-protocol.md` in the project's shared notes). This
//! crate is itself a Capstan provider: `capstan` starts it (as `capstan __provider nixops4-v0`)
//! like any other, and for each operation it starts the v0 program, writes the request, streams
//! the program's stderr lines live as the operation's log, and turns the response (or the lack
//! of one) into the operation's result. So v0 providers get Capstan's concurrency, limits,
//! timeouts, cancellation and attributed logs without changing a line.
//!
//! v0 has no handshake: the deployment declares each v0 resource's output names, and the core
//! passes them in ([`TypeSpec`]); inputs are the v0 program's to check. v0 has no delete: every
//! type says so in the handshake, and a delete fails with a message saying why.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::Stdio;

use capstan_provider::{
    LogStream, Operation, OperationError, Prior, Provider, Resource, ResourceType,
};
use serde_json::{json, Value};
use tokio::io::{AsyncWriteExt, BufReader};

/// One resource type served through the bridge, with the output names the deployment declared.
#[derive(Clone, Debug)]
pub struct TypeSpec {
    pub name: String,
    pub outputs: Vec<String>,
    /// NixOps4 keeps no state for it (`requireState = false`, like the upstream local
    /// provider's `file`): every create says `isStateful: false`, and a change of inputs is
    /// a fresh create — v0 providers refuse `update` for such types.
    pub stateless: bool,
}

impl TypeSpec {
    /// Parses `NAME=OUT1,OUT2` (outputs may be empty: `NAME=`).
    pub fn parse(text: &str) -> Option<Self> {
        let (name, outputs) = text.split_once('=')?;
        (!name.is_empty()).then(|| TypeSpec {
            name: name.to_string(),
            outputs: outputs
                .split(',')
                .filter(|o| !o.is_empty())
                .map(str::to_string)
                .collect(),
            stateless: false,
        })
    }

    /// Parses `{"NAME": ["OUT1", "OUT2"], …}`: any names, including ones with `=` or `,`.
    pub fn parse_all_json(text: &str) -> Option<Vec<Self>> {
        let types: std::collections::BTreeMap<String, Vec<String>> =
            serde_json::from_str(text).ok()?;
        types
            .into_iter()
            .map(|(name, outputs)| {
                (!name.is_empty()).then_some(TypeSpec {
                    name,
                    outputs,
                    stateless: false,
                })
            })
            .collect()
    }
}

/// The bridge provider for the v0 program `program args…`.
pub fn provider(program: PathBuf, args: Vec<String>, types: &[TypeSpec]) -> Provider {
    let mut provider = Provider::new("nixops4-v0", env!("CARGO_PKG_VERSION"));
    for spec in types {
        let mut description = ResourceType::new(&spec.name)
            .description(format!(
                "NixOps4 v0 resource type `{}` of {}",
                spec.name,
                program.display()
            ))
            .open_inputs(true)
            .no_delete(true)
            .stateful(!spec.stateless);
        for output in &spec.outputs {
            description = description.output(output, "declared by the deployment");
        }
        provider = provider.resource_as(
            V0Type {
                name: spec.name.clone(),
                program: program.clone(),
                args: args.clone(),
                stateless: spec.stateless,
            },
            description,
        );
    }
    provider
}

struct V0Type {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    stateless: bool,
}

impl V0Type {
    /// One v0 exchange: start the program, send `request`, read the `expected` response.
    async fn exchange(
        &self,
        op: &Operation,
        request: Value,
        expected: &str,
    ) -> Result<Value, OperationError> {
        let program = self.program.display().to_string();
        let mut command = tokio::process::Command::new(&self.program);
        command.args(&self.args).stdin(Stdio::piped());
        let mut child = capstan_provider::spawn_piped(&mut command).map_err(|e| {
            OperationError::permanent(format!("cannot start the v0 provider `{program}`: {e}"))
        })?;
        let group = capstan_provider::ProcessGroupGuard::new(child.id());
        let mut stdin = child.stdin.take().expect("piped");
        let mut line = request.to_string();
        line.push('\n');
        // Write (then close) stdin beside the reading, as NixOps4 does: a program that logs a
        // lot before reading its request must not deadlock against a large request.
        let writer = tokio::task::spawn_local(async move {
            let _ = stdin.write_all(line.as_bytes()).await;
        });
        let mut pipes = Pipes {
            stdout: BufReader::new(child.stdout.take().expect("piped")),
            stdout_buffer: Vec::new(),
            stdout_done: false,
            stderr: BufReader::new(child.stderr.take().expect("piped")),
            stderr_buffer: Vec::new(),
            stderr_done: false,
            response: None,
        };
        let mut tail = capstan_provider::LastLines::default();
        // Read the one response line and the log until the program exits. Like NixOps4, wait
        // for the exit rather than for end-of-file: a background process the program left
        // behind may hold its pipes open.
        let status = loop {
            tokio::select! {
                log = pipes.next(), if !pipes.done() => {
                    if let Some(text) = log {
                        log_line(op, &mut tail, text).await;
                    }
                }
                status = child.wait() => {
                    break status.map_err(|e| OperationError::permanent(format!("waiting for `{program}`: {e}")))?;
                }
                () = op.cancelled() => {
                    writer.abort();
                    return Err(OperationError::cancelled(format!("`{program}` was cancelled")));
                }
            }
        };
        group.disarm();
        writer.abort();
        // What the program wrote just before exiting is still in the pipes: take it, briefly.
        let drain = async {
            while !pipes.done() {
                if let Some(text) = pipes.next().await {
                    log_line(op, &mut tail, text).await;
                }
            }
        };
        let _ = tokio::time::timeout(std::time::Duration::from_millis(500), drain).await;
        let details = tail.joined();
        let Some(first) = pipes.response.as_deref() else {
            let how = match status.code() {
                Some(code) => format!("exited with status {code}"),
                None => "was killed by a signal".to_string(),
            };
            return Err(OperationError::permanent(format!(
                "the v0 provider `{program}` {how} without a response for `{}`",
                op.address()
            ))
            .with_details(details));
        };
        let message: Value = serde_json::from_str(first).map_err(|e| {
            OperationError::permanent(format!("the v0 provider `{program}` answered with something that is not JSON ({e}): {first}"))
                .with_details(details.clone())
        })?;
        if let Some(error) = message.get("errorResponse") {
            let text = error
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("(no message)");
            // A message is one line; a v0 error may carry many (a backtrace with
            // RUST_BACKTRACE set): the first is the message, the rest go with the details.
            let (first_line, rest) = text.trim().split_once('\n').unwrap_or((text.trim(), ""));
            let details = match (rest.trim(), details.is_empty()) {
                ("", _) => details,
                (rest, true) => rest.to_string(),
                (rest, false) => format!("{rest}\n{details}"),
            };
            return Err(OperationError::permanent(first_line.to_string()).with_details(details));
        }
        match message
            .get(expected)
            .and_then(|r| r.get("outputProperties"))
        {
            Some(Value::Object(outputs)) => Ok(Value::Object(outputs.clone())),
            _ => Err(OperationError::permanent(format!(
                "the v0 provider `{program}` sent no `{expected}` with `outputProperties`: {first}"
            ))
            .with_details(details)),
        }
    }
}

/// A v0 program's stdout (where its one response line comes) and stderr (its log).
struct Pipes {
    stdout: BufReader<tokio::process::ChildStdout>,
    stdout_buffer: Vec<u8>,
    stdout_done: bool,
    stderr: BufReader<tokio::process::ChildStderr>,
    stderr_buffer: Vec<u8>,
    stderr_done: bool,
    response: Option<String>,
}

impl Pipes {
    /// Nothing more to read: stderr ended, and stdout ended or gave its response.
    fn done(&self) -> bool {
        self.stderr_done && (self.stdout_done || self.response.is_some())
    }

    /// Reads the next line from whichever pipe has one (only while not `done`): keeps the
    /// response, returns a log line. Cancel-safe: a partly read line stays in its buffer.
    async fn next(&mut self) -> Option<String> {
        tokio::select! {
            line = capstan_provider::read_line_lossy(&mut self.stdout, &mut self.stdout_buffer), if !self.stdout_done && self.response.is_none() => {
                match line {
                    Ok(Some(text)) if !text.trim().is_empty() => self.response = Some(text),
                    Ok(Some(_)) => {}
                    _ => self.stdout_done = true,
                }
                None
            }
            next = capstan_provider::read_line_lossy(&mut self.stderr, &mut self.stderr_buffer), if !self.stderr_done => match next {
                Ok(Some(text)) => Some(text),
                _ => {
                    self.stderr_done = true;
                    None
                }
            },
        }
    }
}

/// One stderr line of the v0 program: the operation's log, and kept for error messages.
async fn log_line(op: &Operation, tail: &mut capstan_provider::LastLines, text: String) {
    tail.push(text.clone());
    op.log(LogStream::Stderr, text).await;
}

impl Resource for V0Type {
    type Inputs = Value;
    type Outputs = Value;

    fn resource_type() -> ResourceType {
        // Never used: each instance is added with its own description (`resource_as`).
        ResourceType::new("nixops4-v0")
    }

    async fn create(&self, op: &Operation, inputs: Value) -> Result<Value, OperationError> {
        let request = json!({"createResourceRequest": {"type": self.name, "inputProperties": inputs, "isStateful": !self.stateless}});
        self.exchange(op, request, "createResourceResponse").await
    }

    async fn update(
        &self,
        op: &Operation,
        prior: Prior<Value, Value>,
        inputs: Value,
    ) -> Result<Value, OperationError> {
        if self.stateless {
            // What NixOps4 does for a type that keeps no state: create it again.
            return self.create(op, inputs).await;
        }
        let request = json!({"updateResourceRequest": {
            "resource": {"type": self.name, "inputProperties": prior.inputs, "outputProperties": prior.outputs},
            "inputProperties": inputs,
        }});
        self.exchange(op, request, "updateResourceResponse").await
    }

    async fn delete(
        &self,
        op: &Operation,
        _prior: Prior<Value, Value>,
    ) -> Result<(), OperationError> {
        Err(OperationError::permanent(format!(
            "`{}` was not deleted: NixOps4 v0 providers have no delete operation. Remove it by hand if it \
             must go, then `capstan state forget {}`",
            op.address(),
            op.address()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_specs_parse() {
        let spec = TypeSpec::parse("memo=value,other").unwrap();
        assert_eq!(spec.name, "memo");
        assert_eq!(spec.outputs, vec!["value", "other"]);
        assert_eq!(
            TypeSpec::parse("bare=").unwrap().outputs,
            Vec::<String>::new()
        );
        assert!(TypeSpec::parse("=x").is_none());
        assert!(TypeSpec::parse("nothing").is_none());
    }
}
