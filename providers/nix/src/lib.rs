//! The `nix` provider, built into `capstan`: builds with the real Nix tools, and the shape of a
//! NixOS switch (set a profile, run the activation program, roll back on failure).
//!
//! | type | inputs | outputs |
//! | --- | --- | --- |
//! | `build` | `file` or `expr`, `attr`, `args` | `outPath`, `outPaths` |
//! | `activate` | `profile`, `path`, `command` (default `bin/activate`) | `profile`, `path`, `generation` |
//!
//! `build` runs `nix-build --log-format internal-json` and translates Nix's activity stream as
//! it arrives: activities become spans with Nix's parent/child structure, build log lines
//! become log lines under their build's span, phases become phases, and done/expected become
//! progress counters. Activity and result types it does not know are passed on as events, never
//! errors (a popular consumer broke when Nix added numbers).

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::process::Stdio;

use capstan_provider::schemars::{self, JsonSchema};
use capstan_provider::{
    LogStream, Operation, OperationError, Prior, Provider, Resource, ResourceType,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::BufReader;

/// The provider, ready to serve.
pub fn provider() -> Provider {
    Provider::new("nix", env!("CARGO_PKG_VERSION"))
        .resource(Build)
        .resource(Activate)
}

fn missing_nix(tool: &str, e: std::io::Error) -> OperationError {
    if e.kind() == std::io::ErrorKind::NotFound {
        OperationError::permanent(format!(
            "`{tool}` is not installed or not on PATH; install Nix (on Debian: apt-get install nix-bin) and try again"
        ))
    } else {
        OperationError::permanent(format!("cannot run `{tool}`: {e}"))
    }
}

// ---- Nix's internal-json log -----------------------------------------------------------------

/// Nix activity and result types this translator knows by name.
fn activity_name(kind: u64) -> &'static str {
    match kind {
        0 => "unknown",
        100 => "copy path",
        101 => "file transfer",
        102 => "realise",
        103 => "copy paths",
        104 => "builds",
        105 => "build",
        106 => "optimise store",
        107 => "verify paths",
        108 => "substitute",
        109 => "query path info",
        110 => "post-build hook",
        111 => "build waiting",
        _ => "activity",
    }
}

/// What a copy has done so far, from its `copy paths` and `copy path` activities: Nix 2.8
/// announces how many paths it copies but reports no bytes for a copy to `ssh-ng://`, so
/// the bytes come from the paths' NAR sizes, when the caller knows them.
#[derive(Default)]
struct CopyTally {
    /// The `copy paths` activity that announced the count (its span carries the counters).
    announced: Option<u64>,
    expected_paths: u64,
    done_paths: u64,
    done_bytes: u64,
    /// `copy path` activities running: their store paths.
    running: HashMap<u64, String>,
}

/// Turns `@nix {…}` lines into the operation's progress, keeping Nix's activity tree.
struct NixLog<'a> {
    op: &'a Operation,
    activities: HashMap<u64, tracing::Span>,
    copy: CopyTally,
    /// NAR sizes of the paths a copy may copy, and the bytes it is expected to copy.
    sizes: Option<&'a CopySizes>,
    /// Nix's own `error:` messages, for the operation's error.
    errors: Vec<String>,
    tail: capstan_provider::LastLines,
}

impl<'a> NixLog<'a> {
    fn new(op: &'a Operation) -> Self {
        NixLog {
            op,
            activities: HashMap::new(),
            copy: CopyTally::default(),
            sizes: None,
            errors: Vec::new(),
            tail: capstan_provider::LastLines::default(),
        }
    }

    /// A `copy paths` activity that says how many (`copying 3 paths`), or a `copy path`.
    async fn copy_started(
        &mut self,
        id: u64,
        kind: u64,
        text: &str,
        fields: &Value,
        span: &tracing::Span,
    ) {
        match kind {
            103 => {
                let count = text
                    .strip_prefix("copying ")
                    .and_then(|t| t.split(' ').next())
                    .and_then(|n| n.parse::<u64>().ok());
                if let Some(count) = count.filter(|&c| c > 0) {
                    self.copy.announced = Some(id);
                    self.copy.expected_paths += count;
                    // One counter per copy: bytes when their total is known, else paths.
                    match self.sizes.filter(|s| s.expected_bytes > 0) {
                        Some(sizes) => {
                            self.op
                                .progress_in(
                                    span,
                                    self.copy.done_bytes,
                                    sizes.expected_bytes,
                                    "bytes",
                                )
                                .await
                        }
                        None => {
                            self.op
                                .progress_in(
                                    span,
                                    self.copy.done_paths,
                                    self.copy.expected_paths,
                                    "paths",
                                )
                                .await
                        }
                    }
                }
            }
            100 => {
                if let Some(path) = fields[0].as_str() {
                    self.copy.running.insert(id, path.to_string());
                }
            }
            _ => {}
        }
    }

    /// A `copy path` that ended: one path (and its bytes) more done.
    async fn copy_stopped(&mut self, id: u64) {
        if self.copy.announced == Some(id) {
            // The copy is over: what was done is all there was (a path the machine fetched
            // from its own caches is never copied).
            if let Some(span) = self.activities.get(&id).cloned() {
                match self.sizes.filter(|s| s.expected_bytes > 0) {
                    Some(_) => {
                        let done = self.copy.done_bytes;
                        self.op.progress_in(&span, done, done, "bytes").await
                    }
                    None => {
                        let done = self.copy.done_paths;
                        self.op.progress_in(&span, done, done, "paths").await
                    }
                }
            }
            return;
        }
        let Some(path) = self.copy.running.remove(&id) else {
            return;
        };
        let Some(span) = self
            .copy
            .announced
            .and_then(|a| self.activities.get(&a))
            .cloned()
        else {
            return;
        };
        self.copy.done_paths += 1;
        match self.sizes.filter(|s| s.expected_bytes > 0) {
            Some(sizes) => {
                self.copy.done_bytes += sizes.nar_size.get(&path).copied().unwrap_or(0);
                let expected = sizes.expected_bytes.max(self.copy.done_bytes);
                self.op
                    .progress_in(&span, self.copy.done_bytes, expected, "bytes")
                    .await;
            }
            None => {
                let expected = self.copy.expected_paths.max(self.copy.done_paths);
                self.op
                    .progress_in(&span, self.copy.done_paths, expected, "paths")
                    .await;
            }
        }
    }

    fn remember(&mut self, line: &str) {
        self.tail.push(line);
    }

    async fn line(&mut self, line: &str) {
        let Some(json) = line.strip_prefix("@nix ") else {
            self.remember(line);
            self.op.log(LogStream::Stderr, line).await;
            return;
        };
        let Ok(message) = serde_json::from_str::<Value>(json) else {
            self.op.log(LogStream::Stderr, line).await;
            return;
        };
        let id = message["id"].as_u64().unwrap_or(0);
        match message["action"].as_str().unwrap_or("") {
            "start" => {
                let kind = message["type"].as_u64().unwrap_or(0);
                let text = message["text"].as_str().unwrap_or("").to_string();
                let parent = message["parent"]
                    .as_u64()
                    .and_then(|p| self.activities.get(&p))
                    .cloned();
                let name = activity_name(kind);
                let span = match parent {
                    Some(parent) => {
                        tracing::info_span!(parent: &parent, "nix", activity = name, nix_type = kind, text = %text)
                    }
                    None => {
                        tracing::info_span!("nix", activity = name, nix_type = kind, text = %text)
                    }
                };
                self.copy_started(id, kind, &text, &message["fields"], &span)
                    .await;
                // Nix's own verbosity: level 3 is "info"; chattier activities stay spans only.
                if !text.is_empty() && message["level"].as_u64().unwrap_or(0) <= 3 {
                    self.op.phase_in(&span, text).await;
                }
                self.activities.insert(id, span);
            }
            "stop" => {
                self.copy_stopped(id).await;
                self.activities.remove(&id);
            }
            "result" => {
                let span = self
                    .activities
                    .get(&id)
                    .cloned()
                    .unwrap_or_else(tracing::Span::current);
                let fields = &message["fields"];
                match message["type"].as_u64().unwrap_or(0) {
                    101 => {
                        let text = fields[0].as_str().unwrap_or("").to_string();
                        self.remember(&text);
                        self.op.log_in(&span, LogStream::Stderr, text).await;
                    }
                    104 => {
                        let phase = fields[0].as_str().unwrap_or("").to_string();
                        self.op.phase_in(&span, phase).await;
                    }
                    105 => {
                        let done = fields[0].as_u64().unwrap_or(0);
                        let expected = fields[1].as_u64().unwrap_or(0);
                        if expected > 0 {
                            self.op.progress_in(&span, done, expected, "").await;
                        }
                    }
                    other => {
                        // Set-expected (106) and types added by newer Nix: passed on, never fatal.
                        tracing::debug!(parent: &span, nix_result = other, fields = %fields, "nix result");
                    }
                }
            }
            "msg" => {
                let text = message["msg"].as_str().unwrap_or("").to_string();
                let level = message["level"].as_u64().unwrap_or(3);
                if level == 0 {
                    self.errors.push(strip_ansi(&text));
                    tracing::error!("{}", strip_ansi(&text));
                } else if level <= 1 {
                    tracing::warn!("{text}");
                } else {
                    tracing::info!("{text}");
                }
                self.remember(&text);
            }
            other => {
                tracing::debug!(action = other, "nix log message of an unknown kind: {json}");
            }
        }
    }

    fn details(&self) -> String {
        self.tail.joined()
    }
}

fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

// ---- build -----------------------------------------------------------------------------------

struct Build;

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct BuildIn {
    /// A .nix file, relative to the deployment file
    #[serde(default)]
    file: Option<String>,
    /// A Nix expression (instead of file)
    #[serde(default)]
    expr: Option<String>,
    /// An attribute to build (-A)
    #[serde(default)]
    attr: Option<String>,
    /// Extra nix-build arguments, e.g. ["--option", "substituters", ""]
    #[serde(default)]
    args: Vec<String>,
}

#[derive(Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
struct BuildOut {
    /// The first output's store path
    out_path: String,
    /// Every output's store path
    out_paths: Vec<String>,
    /// The derivations built
    // (`nix-instantiate`'s answer: what `read` compares to notice that what is built changed
    // while the inputs did not, the `.nix` file was edited.)
    #[serde(default)]
    drv_paths: Vec<String>,
}

impl BuildIn {
    /// `nix-instantiate` (or `nix-build`) for the file or expression, with `-A` and the extra
    /// arguments, logging Nix's activities as JSON.
    fn command(&self, tool: &str) -> Result<tokio::process::Command, OperationError> {
        let mut command = tokio::process::Command::new(tool);
        match (&self.file, &self.expr) {
            (Some(file), None) => command.arg(file),
            (None, Some(expr)) => command.arg("-E").arg(expr),
            _ => {
                return Err(OperationError::invalid_input(
                    "give exactly one of `file` and `expr`",
                ))
            }
        };
        if let Some(attr) = &self.attr {
            command.arg("-A").arg(attr);
        }
        command
            .args(["--log-format", "internal-json", "-v"])
            .args(&self.args);
        Ok(command)
    }
}

/// A private directory for an operation's garbage-collector roots, removed with them.
/// (A fresh private directory: nobody else can put a link there for us to follow.)
struct GcRoots(tempfile::TempDir);

impl GcRoots {
    fn new() -> Result<Self, OperationError> {
        tempfile::Builder::new()
            .prefix("capstan-nix-roots-")
            .tempdir()
            .map(GcRoots)
            .map_err(|e| {
                OperationError::permanent(format!("cannot make a temporary directory: {e}"))
            })
    }

    fn path(&self) -> &std::path::Path {
        self.0.path()
    }
}

/// Runs a Nix command with Nix's progress translated live, and returns the lines it printed
/// on stdout (store paths). `what` names it in errors, e.g. "nix-build". It fails when the
/// command printed nothing.
async fn run_nix(
    op: &Operation,
    command: tokio::process::Command,
    what: &str,
) -> Result<Vec<String>, OperationError> {
    run_nix_inner(op, command, what, true, None).await
}

/// Runs a Nix command that logs with `--log-format internal-json` (`nix copy`,
/// `nix-store --realise`) with its activity tree turned into the operation's progress, as
/// the `build` type does: the lines it printed on stdout, or its error with Nix's message.
pub async fn run_nix_logged(
    op: &Operation,
    command: tokio::process::Command,
    what: &str,
) -> Result<Vec<String>, OperationError> {
    run_nix_inner(op, command, what, false, None).await
}

/// The NAR sizes of the paths a copy may copy, and the sum over those it will: with them,
/// [`run_nix_copy`] counts bytes as well as paths.
#[derive(Debug, Default)]
pub struct CopySizes {
    pub nar_size: std::rc::Rc<HashMap<String, u64>>,
    pub expected_bytes: u64,
}

/// [`run_nix_logged`] for `nix copy`: progress counts the paths copied (`paths`) and, with
/// `sizes`, their bytes (`bytes`), each against what is expected.
pub async fn run_nix_copy(
    op: &Operation,
    command: tokio::process::Command,
    sizes: Option<&CopySizes>,
) -> Result<Vec<String>, OperationError> {
    run_nix_inner(op, command, "nix copy", false, sizes).await
}

async fn run_nix_inner(
    op: &Operation,
    mut command: tokio::process::Command,
    what: &str,
    prints: bool,
    sizes: Option<&CopySizes>,
) -> Result<Vec<String>, OperationError> {
    command.stdin(Stdio::null());
    let tool = command
        .as_std()
        .get_program()
        .to_string_lossy()
        .into_owned();
    let tool = tool.as_str();
    let mut child =
        capstan_provider::spawn_piped(&mut command).map_err(|e| missing_nix(tool, e))?;
    let group = capstan_provider::ProcessGroupGuard::new(child.id());
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(OperationError::internal(format!(
            "{what}: its output was not piped"
        )));
    };
    let mut stdout = BufReader::new(stdout);
    let mut stdout_buffer = Vec::new();
    let mut stderr = BufReader::new(stderr);
    let mut stderr_buffer = Vec::new();
    let mut log = NixLog::new(op);
    log.sizes = sizes;
    let mut printed = Vec::new();
    let (mut out_open, mut err_open) = (true, true);
    while out_open || err_open {
        tokio::select! {
            line = capstan_provider::read_line_lossy(&mut stdout, &mut stdout_buffer), if out_open => match line {
                Ok(Some(line)) if !line.trim().is_empty() => printed.push(line.trim().to_string()),
                Ok(Some(_)) => {}
                _ => out_open = false,
            },
            line = capstan_provider::read_line_lossy(&mut stderr, &mut stderr_buffer), if err_open => match line {
                Ok(Some(line)) => log.line(&line).await,
                _ => err_open = false,
            },
            () = op.cancelled() => return Err(OperationError::cancelled(format!("{what} was cancelled"))),
        }
    }
    let status = child
        .wait()
        .await
        .map_err(|e| OperationError::permanent(format!("waiting for {what}: {e}")))?;
    group.disarm();
    if !status.success() || (prints && printed.is_empty()) {
        let message = log
            .errors
            .first()
            .map(|e| error_summary(e))
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| format!("{tool} exited with {status}"));
        let mut details = log.errors.join("\n");
        if !details.is_empty() {
            details.push('\n');
        }
        details.push_str(&log.details());
        return Err(
            OperationError::permanent(format!("{what} failed: {message}")).with_details(details),
        );
    }
    Ok(printed)
}

impl Resource for Build {
    type Inputs = BuildIn;
    type Outputs = BuildOut;

    fn resource_type() -> ResourceType {
        ResourceType::new("build")
            .description(
                "Builds a Nix file or expression with nix-build, showing Nix's progress live; \
                 a plan notices when what it builds changed (the file was edited)",
            )
            .inputs_from::<BuildIn>()
            .outputs_from::<BuildOut>()
            .read_on_plan(true)
    }

    async fn create(&self, op: &Operation, inputs: BuildIn) -> Result<BuildOut, OperationError> {
        // Evaluate once (the derivations are also what `read` compares), then build them.
        // The derivations are garbage-collector roots until built (an automatic collection
        // during a long build must not take them): links in a directory of our own, removed
        // when this operation ends.
        op.phase("evaluating").await;
        let roots = GcRoots::new()?;
        let mut instantiate = inputs.command("nix-instantiate")?;
        instantiate.arg("--add-root").arg(roots.path().join("drv"));
        let drv_paths = run_nix(op, instantiate, "nix-build (evaluation)")
            .await?
            .into_iter()
            .map(|root| {
                std::fs::read_link(&root)
                    .map(|p| p.display().to_string())
                    .unwrap_or(root)
            })
            .collect::<Vec<_>>();
        if drv_paths.is_empty() {
            // nix-build with no paths would build ./default.nix instead.
            return Err(OperationError::invalid_input(
                "the expression yields no derivation to build",
            ));
        }
        op.phase("building").await;
        let mut build = tokio::process::Command::new("nix-build");
        build
            .args(&drv_paths)
            .args(["--no-out-link", "--log-format", "internal-json", "-v"])
            .args(&inputs.args);
        let out_paths = run_nix(op, build, "nix-build").await?;
        drop(roots);
        Ok(BuildOut {
            out_path: out_paths[0].clone(),
            out_paths,
            drv_paths,
        })
    }

    async fn read(
        &self,
        op: &Operation,
        prior: Prior<BuildIn, BuildOut>,
    ) -> Result<BuildOut, OperationError> {
        // Evaluation only: cheap next to a build, and it changes nothing.
        let drv_paths = run_nix(
            op,
            prior.inputs.command("nix-instantiate")?,
            "nix-build (evaluation)",
        )
        .await?;
        Ok(BuildOut {
            drv_paths,
            ..prior.outputs
        })
    }
}

/// The line of a Nix error message that says what went wrong. Nix up to 2.12 puts it first
/// (`error: attribute 'x' missing` then the position); later versions start with a bare
/// `error:` and a trace of what was being evaluated, and end with the innermost
/// `error: …`, which is the one to show.
fn error_summary(error: &str) -> String {
    let mut with_text = error.lines().map(str::trim).filter_map(|line| {
        line.strip_prefix("error:")
            .map(str::trim)
            .filter(|rest| !rest.is_empty())
    });
    match with_text.next_back() {
        Some(message) => message.to_string(),
        None => error
            .lines()
            .map(str::trim)
            .find(|line| !line.is_empty() && *line != "error:")
            .unwrap_or("")
            .to_string(),
    }
}

// ---- activate --------------------------------------------------------------------------------

struct Activate;

#[derive(Clone, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct ActivateIn {
    /// The profile, e.g. /nix/var/nix/profiles/system or a path of your own
    profile: String,
    /// The store path to activate (e.g. a build's outPath)
    path: String,
    /// The program inside the store path to run (default bin/activate)
    #[serde(default)]
    command: Option<String>,
}

#[derive(Serialize, Deserialize, JsonSchema)]
struct ActivateOut {
    /// The profile's absolute path
    profile: String,
    /// The store path activated
    path: String,
    /// The profile generation created
    generation: String,
}

async fn nix_env(op: &Operation, args: &[&str]) -> Result<(), OperationError> {
    let output = tokio::process::Command::new("nix-env")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| missing_nix("nix-env", e))?;
    for line in String::from_utf8_lossy(&output.stderr).lines() {
        op.log(LogStream::Stderr, line).await;
    }
    if !output.status.success() {
        return Err(OperationError::permanent(format!(
            "nix-env {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
                .lines()
                .last()
                .unwrap_or("")
        )));
    }
    Ok(())
}

/// The generation link the profile points at (e.g. `/x/profile-3-link`), if any.
fn current_generation(profile: &str) -> Option<String> {
    std::fs::read_link(profile).ok().map(|p| {
        if p.is_absolute() {
            p.display().to_string()
        } else {
            std::path::Path::new(profile)
                .with_file_name(p)
                .display()
                .to_string()
        }
    })
}

/// The newest generation of `profile` older than `number`, from the `PROFILE-N-link` files.
fn older_generation(profile: &str, number: u64) -> Option<u64> {
    let path = std::path::Path::new(profile);
    let prefix = format!("{}-", path.file_name()?.to_str()?);
    std::fs::read_dir(path.parent()?)
        .ok()?
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().into_string().ok()?;
            let n: u64 = name
                .strip_prefix(&prefix)?
                .strip_suffix("-link")?
                .parse()
                .ok()?;
            (n < number).then_some(n)
        })
        .max()
}

fn generation_number(link: &str) -> Option<u64> {
    let name = std::path::Path::new(link).file_name()?.to_str()?;
    let trimmed = name.strip_suffix("-link")?;
    trimmed.rsplit('-').next()?.parse().ok()
}

impl Activate {
    async fn activate(
        &self,
        op: &Operation,
        inputs: &ActivateIn,
    ) -> Result<ActivateOut, OperationError> {
        let profile = std::path::absolute(&inputs.profile)
            .map_err(|e| {
                OperationError::invalid_input(format!("profile `{}`: {e}", inputs.profile))
            })?
            .display()
            .to_string();
        if let Some(parent) = std::path::Path::new(&profile).parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let previous = current_generation(&profile);
        let previous_number = previous.as_deref().and_then(generation_number);
        op.phase("setting profile").await;
        nix_env(op, &["--profile", &profile, "--set", &inputs.path]).await?;
        let generation = current_generation(&profile).unwrap_or_default();
        let new_number = generation_number(&generation);
        let program = format!(
            "{}/{}",
            inputs.path.trim_end_matches('/'),
            inputs.command.as_deref().unwrap_or("bin/activate")
        );
        op.phase("activating").await;
        let result = run_streaming(op, &program).await;
        if let Err(error) = result {
            op.phase("rolling back").await;
            // Back to exactly the generation that was active before (not merely the one below
            // the new one), and forget the failed generation if this activation made it.
            let rollback = match previous_number {
                Some(number) if Some(number) == new_number => Ok(()),
                Some(number) => {
                    let number = number.to_string();
                    nix_env(op, &["--profile", &profile, "--switch-generation", &number]).await
                }
                None => std::fs::remove_file(&profile)
                    .map_err(|e| OperationError::permanent(e.to_string())),
            };
            if let (Ok(()), Some(made)) = (&rollback, new_number) {
                if Some(made) != previous_number {
                    let made = made.to_string();
                    let _ =
                        nix_env(op, &["--profile", &profile, "--delete-generations", &made]).await;
                }
            }
            let note = match rollback {
                Ok(()) => "the profile was rolled back".to_string(),
                Err(e) => format!("rolling the profile back failed too: {e}"),
            };
            return Err(
                OperationError::new(error.kind, format!("{} ({note})", error.message))
                    .with_details(error.details),
            );
        }
        Ok(ActivateOut {
            profile,
            path: inputs.path.clone(),
            generation,
        })
    }
}

async fn run_streaming(op: &Operation, program: &str) -> Result<(), OperationError> {
    let mut command = tokio::process::Command::new(program);
    command.stdin(Stdio::null());
    let child = capstan_provider::spawn_piped(&mut command).map_err(|e| {
        OperationError::permanent(format!("cannot run the activation program {program}: {e}"))
    })?;
    let output = capstan_provider::stream_command(op, child, "activation").await?;
    if output.status.success() {
        Ok(())
    } else {
        Err(OperationError::permanent(format!(
            "the activation program {program} failed ({})",
            output.status
        ))
        .with_details(output.tail.join("\n")))
    }
}

impl Resource for Activate {
    type Inputs = ActivateIn;
    type Outputs = ActivateOut;

    fn resource_type() -> ResourceType {
        ResourceType::new("activate")
            .description("Points a Nix profile at a store path and runs its activation program; rolls back on failure")
            .inputs_from::<ActivateIn>()
            .outputs_from::<ActivateOut>()
            .stateful(true)
            .read_checks(true)
    }

    /// The profile as it is: switched to another generation behind Capstan's back (drift:
    /// the update activates the declared path again), or gone.
    async fn read(
        &self,
        _op: &Operation,
        prior: Prior<ActivateIn, ActivateOut>,
    ) -> Result<ActivateOut, OperationError> {
        let profile = &prior.outputs.profile;
        let Some(generation) = current_generation(profile) else {
            return Err(OperationError::not_found(format!(
                "the profile {profile} does not exist"
            )));
        };
        if generation == prior.outputs.generation {
            return Ok(prior.outputs);
        }
        Ok(ActivateOut {
            path: std::fs::read_link(&generation)
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            profile: profile.clone(),
            generation,
        })
    }

    /// What an interrupted activation did: the profile points at the path, or not.
    async fn find(
        &self,
        _op: &Operation,
        inputs: ActivateIn,
    ) -> Result<ActivateOut, OperationError> {
        let profile = std::path::absolute(&inputs.profile)
            .map_err(|e| {
                OperationError::invalid_input(format!("profile `{}`: {e}", inputs.profile))
            })?
            .display()
            .to_string();
        let current = current_generation(&profile);
        let target = current
            .as_deref()
            .and_then(|g| std::fs::read_link(g).ok())
            .map(|p| p.display().to_string());
        match (current, target) {
            (Some(generation), Some(path)) if path == inputs.path => Ok(ActivateOut {
                profile,
                path,
                generation,
            }),
            _ => Err(OperationError::not_found(format!(
                "the profile {profile} is not at {}",
                inputs.path
            ))),
        }
    }

    async fn create(
        &self,
        op: &Operation,
        inputs: ActivateIn,
    ) -> Result<ActivateOut, OperationError> {
        self.activate(op, &inputs).await
    }

    async fn delete(
        &self,
        op: &Operation,
        prior: Prior<ActivateIn, ActivateOut>,
    ) -> Result<(), OperationError> {
        let profile = &prior.outputs.profile;
        let Some(number) = generation_number(&prior.outputs.generation) else {
            return Ok(());
        };
        if current_generation(profile).as_deref() == Some(prior.outputs.generation.as_str()) {
            // The generation is in use: nix-env refuses to delete the current one. Step back to
            // the newest older generation, or, when there is none, remove the profile link.
            match older_generation(profile, number) {
                Some(n) => {
                    let n = n.to_string();
                    nix_env(op, &["--profile", profile, "--switch-generation", &n]).await?;
                }
                None => std::fs::remove_file(profile).map_err(|e| {
                    OperationError::permanent(format!(
                        "cannot remove the profile link {profile}: {e}"
                    ))
                })?,
            }
        }
        nix_env(
            op,
            &[
                "--profile",
                profile,
                "--delete-generations",
                &number.to_string(),
            ],
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_numbers_come_from_link_names() {
        assert_eq!(generation_number("/x/profile-3-link"), Some(3));
        assert_eq!(generation_number("/x/my-profile-12-link"), Some(12));
        assert_eq!(generation_number("/x/profile"), None);
    }

    #[test]
    fn the_summary_is_the_line_that_says_what_went_wrong() {
        // Nix 2.8 (Debian's): the message first, then where.
        assert_eq!(
            error_summary("error: attribute 'nope' missing\n\n       at «string»:1:1:\n"),
            "attribute 'nope' missing"
        );
        // Nix 2.13 and later: a bare `error:`, the trace, then the innermost error.
        let traced = "error:\n       … while evaluating the attribute 'drvPath'\n\n         at «string»:1:1:\n\n       error: undefined variable 'nope'\n\n       at «string»:1:20:";
        assert_eq!(error_summary(traced), "undefined variable 'nope'");
        // Nothing after any `error:`: the first line with text.
        assert_eq!(
            error_summary("error:\n  builder failed\n"),
            "builder failed"
        );
        assert_eq!(error_summary("error:\n"), "");
    }

    #[test]
    fn ansi_codes_are_stripped_from_nix_errors() {
        assert_eq!(strip_ansi("\x1b[31;1merror:\x1b[0m boom"), "error: boom");
    }
}
