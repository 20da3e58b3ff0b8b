//! `capstan provider …`: talk to one provider directly.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::OsString;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use capstan_host::{
    describe_handle, CallError, HostOptions, Json, OperationCall, ProviderCommand,
    ProviderConnection, ProviderLog, ProviderSource,
};
use capstan_schema::{OperationKind, ProgressEvent, ProgressKind};
use clap::builder::TypedValueParser;
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::output::Stdout;

#[derive(Subcommand)]
pub enum ProviderCmd {
    /// Print a provider's handshake (name, version, resource types, inputs, outputs) as JSON.
    ///
    /// Built in: `capstan provider describe local` (file, exec, memo) and `capstan provider
    /// describe nix` (build, activate). Others: capstan provider describe -- capstan-provider-testing
    ///
    /// A Terraform provider binary, unchanged (started as go-plugin does, plugin protocol 5 or
    /// 6): its types as Capstan types, with the protocol it speaks, its settings' schema
    /// (`providerConfig`) and each type's Terraform schema in full (`terraform`: attribute
    /// types, nested blocks, sensitive, deprecated):
    /// capstan provider describe --terraform ./terraform-provider-null
    Describe {
        #[command(flatten)]
        target: Target,
    },
    /// Run one operation on a provider, show its progress live (on stderr), and print the
    /// outputs as JSON (on stdout).
    ///
    /// Examples: capstan provider call local --type exec --inputs '{"command": "date"}'
    ///           capstan provider call --type chatty --inputs '{"count": 20}' -- capstan-provider-testing
    Call(CallArgs),
}

/// Which provider to talk to: a built-in one by name, a program, or a socket.
#[derive(Args)]
pub struct Target {
    /// A provider built into capstan: `local` (file, exec, memo), `nix` (build, activate) or
    /// `machine` (nixos: NixOS machines over SSH).
    #[arg(value_name = "BUILTIN", value_parser = clap::builder::PossibleValuesParser::new(capstan_cli::served::BUILTINS), conflicts_with_all = ["socket", "command"])]
    builtin: Option<String>,
    /// Connect to a provider already listening at this Unix socket instead of starting one.
    #[arg(long, value_name = "PATH", conflicts_with = "command")]
    socket: Option<PathBuf>,
    /// A Terraform provider binary, run through Capstan's bridge (`call` too).
    #[arg(long, value_name = "PATH", conflicts_with_all = ["socket", "command", "builtin"])]
    terraform: Option<PathBuf>,
    /// The provider executable and its arguments, after `--`.
    #[arg(
        last = true,
        value_name = "EXE [ARGS]...",
        required_unless_present_any = ["socket", "builtin", "terraform"]
    )]
    command: Vec<OsString>,
}

#[derive(Args)]
pub struct CallArgs {
    /// The operation to run.
    #[arg(
        long,
        default_value = "create",
        value_parser = clap::builder::PossibleValuesParser::new(OperationKind::ALL.map(|k| k.as_str()))
            .try_map(|name| name.parse::<OperationKind>())
    )]
    op: OperationKind,
    /// The resource type, as listed by `capstan provider describe`.
    #[arg(long = "type", value_name = "TYPE")]
    resource_type: String,
    /// The inputs, a JSON object; `@FILE` reads it from a file (keeps a secret out of the
    /// process list), `@-` from standard input.
    #[arg(long, value_name = "JSON", default_value = "{}")]
    inputs: String,
    /// Previous inputs (for read, update, delete), a JSON object (or `@FILE`); defaults to
    /// --inputs.
    #[arg(long, value_name = "JSON")]
    previous_inputs: Option<String>,
    /// Previous outputs (for read, update, delete), a JSON object (or `@FILE`).
    #[arg(long, value_name = "JSON")]
    previous_outputs: Option<String>,
    /// Show the inputs and outputs the provider marks sensitive (hidden otherwise).
    #[arg(long)]
    show_sensitive: bool,
    /// The resource address shown in messages.
    #[arg(long, default_value = "cli")]
    address: String,
    /// Cancel the operation if it takes longer than this many seconds.
    #[arg(long, value_name = "SECONDS", value_parser = crate::deploy_cmd::timeout_seconds)]
    timeout: Option<Duration>,
    /// Print progress events and the result as JSON lines on stdout instead.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    target: Target,
}

fn source(target: &Target) -> anyhow::Result<ProviderSource> {
    if let Some(socket) = &target.socket {
        return Ok(ProviderSource::Socket {
            path: socket.clone(),
            owner: None,
        });
    }
    if target.builtin.is_some() || target.terraform.is_some() {
        // Served by this very binary, out of process, as a deployment would run it: a
        // built-in, or a Terraform provider through the bridge.
        use capstan_engine::run::{ProviderLauncher, Served};
        let launcher = capstan_cli::served::SelfLauncher::current()
            .context("cannot find the capstan executable")?;
        let served = match (&target.builtin, &target.terraform) {
            (Some(name), _) => Served::Builtin(name),
            (None, Some(program)) => Served::Terraform { program },
            (None, None) => unreachable!("one of the two, checked above"),
        };
        return Ok(ProviderSource::Command(launcher.command(served)));
    }
    let Some((program, args)) = target.command.split_first() else {
        bail!("give the provider to run after `--`, or --socket PATH");
    };
    Ok(ProviderSource::Command(ProviderCommand::new(
        program.clone(),
        args.iter().cloned(),
    )))
}

fn provider_name(target: &Target) -> String {
    if let Some(name) = &target.builtin {
        return name.clone();
    }
    if let Some(program) = &target.terraform {
        return program
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "terraform".into());
    }
    match (&target.socket, target.command.first()) {
        (Some(socket), _) => socket.display().to_string(),
        (None, Some(program)) => PathBuf::from(program)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "provider".into()),
        (None, None) => "provider".into(),
    }
}

/// A flag's JSON object (inputs and outputs are objects of names to values), given inline,
/// or as `@FILE` / `@-` (standard input).
fn parse_json(flag: &str, text: &str) -> anyhow::Result<Value> {
    let read;
    let text = match text.strip_prefix('@') {
        Some("-") => {
            read = capstan_engine::model::read_capped(
                std::io::stdin(),
                capstan_engine::model::VALUES_LIMIT,
            )
            .map_err(|e| anyhow::anyhow!("{flag} @-: cannot read standard input: {e}"))?;
            read.as_str()
        }
        Some(path) => {
            read = capstan_engine::model::read_file_capped(
                Path::new(path),
                capstan_engine::model::VALUES_LIMIT,
            )
            .map_err(|e| anyhow::anyhow!("{flag} @{path}: cannot read it: {e}"))?;
            read.as_str()
        }
        None => text,
    };
    match capstan_engine::strict_json::parse(text) {
        Ok(value @ Value::Object(_)) => Ok(value),
        Ok(_) => bail!("{flag} must be a JSON object of names to values, e.g. {{\"value\": 1}}"),
        Err(e) => bail!("{flag}: {e}"),
    }
}

/// Lines held back while `Some` (see `call`).
type HeldLines = Rc<RefCell<Option<Vec<String>>>>;

/// Shows the provider's own stderr as it arrives (or keeps it in `held` while that is set).
fn spawn_log_printer(json: bool, held: HeldLines) -> tokio::sync::mpsc::Sender<ProviderLog> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<ProviderLog>(256);
    tokio::task::spawn_local(async move {
        while let Some(log) = rx.recv().await {
            let line = if json {
                json!({"type": "provider_log", "provider": log.provider, "line": log.line})
                    .to_string()
            } else {
                format!("  provider {}: {}", log.provider, log.line)
            };
            match &mut *held.borrow_mut() {
                Some(lines) => lines.push(line),
                None => say!("{line}"),
            }
        }
    });
    tx
}

impl ProviderCmd {
    pub async fn run(self, mut stdout: Stdout) -> anyhow::Result<ExitCode> {
        match self {
            ProviderCmd::Describe { target } if target.terraform.is_some() => {
                let binary = target.terraform.expect("checked");
                let plugin =
                    capstan_terraform::Plugin::start(&binary, Duration::from_secs(30)).await?;
                let schema = plugin.schema().await;
                let protocol = plugin.protocol;
                plugin.stop().await;
                let name = binary
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let described = capstan_terraform::describe(&name, protocol, &schema?);
                stdout.line(&serde_json::to_string_pretty(&described)?);
                Ok(ExitCode::SUCCESS)
            }
            ProviderCmd::Describe { target } => {
                let name = provider_name(&target);
                let logs = spawn_log_printer(false, HeldLines::default());
                let provider = ProviderConnection::launch(
                    &name,
                    &source(&target)?,
                    HostOptions::default(),
                    Some(logs),
                )
                .await?;
                stdout.line(&serde_json::to_string_pretty(provider.info())?);
                provider.shutdown().await;
                Ok(ExitCode::SUCCESS)
            }
            ProviderCmd::Call(args) => call(args, stdout).await,
        }
    }
}

async fn call(args: CallArgs, stdout: Stdout) -> anyhow::Result<ExitCode> {
    let inputs = parse_json("--inputs", &args.inputs)?;
    let previous_inputs = optional_json("--previous-inputs", args.previous_inputs.as_deref())?;
    let previous_outputs = optional_json("--previous-outputs", args.previous_outputs.as_deref())?;
    let kind = args.op;
    if kind != OperationKind::Create && previous_outputs.is_none() {
        bail!(
            "--op {} needs --previous-outputs (the outputs recorded by the create)",
            kind.as_str()
        );
    }
    let name = provider_name(&args.target);
    // The provider's stderr waits until its handshake says whether anything is sensitive.
    let held_lines: HeldLines = Rc::new(RefCell::new(Some(Vec::new())));
    let logs = spawn_log_printer(args.json, held_lines.clone());
    let provider = ProviderConnection::launch(
        &name,
        &source(&args.target)?,
        HostOptions::default(),
        Some(logs),
    )
    .await?;
    if provider.info().resource_type(&args.resource_type).is_none() {
        let known: Vec<String> = provider
            .info()
            .resource_types
            .iter()
            .map(|t| t.name.clone())
            .collect();
        provider.shutdown().await;
        bail!(
            "provider `{name}` has no resource type `{}`; it serves: {}",
            args.resource_type,
            known.join(", ")
        );
    }

    // What the provider marks sensitive is hidden from every line this prints, unless asked.
    let info = provider
        .info()
        .resource_type(&args.resource_type)
        .cloned()
        .unwrap_or_default();
    let (secrets, sensitive_outputs) = call_secrets(
        &info,
        &args,
        [Some(&inputs), previous_inputs.as_ref()],
        previous_outputs.as_ref(),
    );
    // A type with sensitive outputs may print one before returning it: its progress is shown
    // once the result (and so the secret) is in.
    let hold = !args.show_sensitive && !sensitive_outputs.is_empty();
    if !hold {
        for line in held_lines.borrow_mut().take().into_iter().flatten() {
            say!("{line}");
        }
    }
    let mut call = OperationCall::new(kind, &args.resource_type, &args.address, inputs);
    call.previous_inputs = previous_inputs.map(Json::from);
    call.previous_outputs = previous_outputs.map(Json::from);
    call.timeout = args.timeout;
    let stdout = Rc::new(RefCell::new(stdout));
    let renderer = Rc::new(RefCell::new(Renderer::new(args.json, stdout.clone())));
    let held: Rc<RefCell<Vec<ProgressEvent>>> = Rc::default();
    let observer = {
        let renderer = renderer.clone();
        let held = held.clone();
        Rc::new(move |events: Vec<ProgressEvent>| {
            if hold {
                held.borrow_mut().extend(events);
            } else {
                let mut renderer = renderer.borrow_mut();
                for event in &events {
                    renderer.event(event);
                }
            }
            async {}
        })
    };
    let started = Instant::now();
    let outcome = provider.call(call, observer).await;
    let elapsed = started.elapsed();
    let mut outcome = outcome;
    if let Ok(success) = &mut outcome {
        if !args.show_sensitive && !sensitive_outputs.is_empty() {
            let mut outputs = success.outputs.value();
            for name in &sensitive_outputs {
                if let Some(v) = outputs.get_mut(name) {
                    secrets.add_value(v);
                    *v = Value::String(capstan_engine::secrets::REDACTED.into());
                }
            }
            success.outputs = Json::from(outputs);
        }
    }
    let succeeded = outcome.is_ok();
    show_held(
        std::mem::take(&mut *held.borrow_mut()),
        succeeded,
        &renderer,
    );
    let code = report_outcome(outcome, &args, elapsed, &stdout).await;
    provider.shutdown().await;
    // The provider's stderr, once it has exited (its lines come on their own).
    for _ in 0..8 {
        tokio::task::yield_now().await;
    }
    let lines = held_lines.borrow_mut().take().unwrap_or_default();
    if succeeded {
        for line in lines {
            say!("{line}");
        }
    } else if !lines.is_empty() {
        say!(
            "  ({} line(s) of the provider's stderr not shown: this type's outputs are sensitive and it failed before returning them)",
            lines.len()
        );
    }
    Ok(code)
}

/// The secrets of a call: the inputs (and recorded outputs) its type marks sensitive, hidden
/// from every message from now on unless `--show-sensitive`; and the names of the outputs
/// it marks.
fn call_secrets(
    info: &capstan_schema::ResourceTypeInfo,
    args: &CallArgs,
    given_inputs: [Option<&Value>; 2],
    previous_outputs: Option<&Value>,
) -> (Rc<capstan_engine::secrets::Secrets>, Vec<String>) {
    let secrets = capstan_engine::secrets::Secrets::new();
    let sensitive_outputs: Vec<String> = info
        .outputs
        .iter()
        .filter(|o| o.sensitive)
        .map(|o| o.name.clone())
        .collect();
    if !args.show_sensitive {
        crate::output::hide_in_messages(secrets.clone());
        for input in info.inputs.iter().filter(|i| i.sensitive) {
            for given in given_inputs.into_iter().flatten() {
                if let Some(v) = given.get(&input.name) {
                    secrets.add_value(v);
                }
            }
        }
        for name in &sensitive_outputs {
            if let Some(v) = previous_outputs.and_then(|o| o.get(name)) {
                secrets.add_value(v);
            }
        }
    }
    (secrets, sensitive_outputs)
}

/// A flag's JSON, if given.
fn optional_json(flag: &str, text: Option<&str>) -> anyhow::Result<Option<Value>> {
    text.map(|text| parse_json(flag, text)).transpose()
}

/// The progress held back while a type with sensitive outputs ran: shown once it returned
/// them, counted only if it failed first.
fn show_held(held: Vec<ProgressEvent>, succeeded: bool, renderer: &RefCell<Renderer>) {
    if succeeded {
        let mut renderer = renderer.borrow_mut();
        for event in &held {
            renderer.event(event);
        }
    } else if !held.is_empty() {
        say!(
            "  ({} progress event(s) not shown: this type's outputs are sensitive and it failed before returning them)",
            held.len()
        );
    }
}

/// Prints what a call returned (outputs on stdout, the rest on stderr) and says how it went.
async fn report_outcome(
    outcome: Result<capstan_host::OperationSuccess, CallError>,
    args: &CallArgs,
    elapsed: std::time::Duration,
    stdout: &Rc<RefCell<Stdout>>,
) -> ExitCode {
    match outcome {
        Ok(success) => {
            let mut handles = Vec::new();
            for (name, handle) in &success.capabilities {
                let described = describe_handle(handle).await;
                handles.push(match described {
                    Ok((kind, address, summary)) => {
                        json!({"name": name, "kind": kind, "address": address, "summary": summary})
                    }
                    Err(e) => json!({"name": name, "error": e.to_string()}),
                });
            }
            let mut out = stdout.borrow_mut();
            if args.json {
                out.line(&crate::output::scrubbed(json!({"type": "result", "ok": true, "outputs": success.outputs.value(), "capabilities": handles, "elapsed_seconds": elapsed.as_secs_f64()}).to_string()));
            } else {
                say!(
                    "{} {} `{}` done in {:.2?}",
                    args.op.as_str(),
                    args.resource_type,
                    args.address,
                    elapsed
                );
                for handle in &handles {
                    say!("  capability {handle}");
                }
                let pretty =
                    serde_json::to_string_pretty(&success.outputs.value()).unwrap_or_default();
                out.line(&crate::output::scrubbed(pretty));
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            if args.json {
                let kind = error.kind().map(|k| k.as_str()).unwrap_or("provider");
                stdout.borrow_mut().line(&crate::output::scrubbed(json!({"type": "result", "ok": false, "error": error.to_string(), "kind": kind}).to_string()));
            }
            say!("error: {error}");
            if let CallError::Failed { error, .. } = &error {
                if !error.details.is_empty() {
                    say!("{}", error.details);
                }
            }
            ExitCode::from(1)
        }
    }
}

/// Turns progress into lines a person can follow (on stderr), or JSON lines (on stdout).
struct Renderer {
    json: bool,
    stdout: Rc<RefCell<Stdout>>,
    spans: HashMap<u64, String>,
    started: Instant,
    color: bool,
}

impl Renderer {
    fn new(json: bool, stdout: Rc<RefCell<Stdout>>) -> Self {
        let color = crate::style::enabled(std::io::stderr().is_terminal(), None);
        Renderer {
            json,
            stdout,
            spans: HashMap::new(),
            started: Instant::now(),
            color,
        }
    }

    fn span_name(&self, id: u64) -> &str {
        self.spans.get(&id).map(|s| s.as_str()).unwrap_or("")
    }

    fn event(&mut self, event: &ProgressEvent) {
        if self.json {
            let mut value = serde_json::to_value(event).unwrap_or(Value::Null);
            if let Some(object) = value.as_object_mut() {
                object.insert("type".into(), json!("progress"));
            }
            self.stdout
                .borrow_mut()
                .line(&crate::output::scrubbed(value.to_string()));
            return;
        }
        let at = self.started.elapsed().as_secs_f64();
        let (dim, reset) = if self.color {
            (crate::style::DIM.render(), crate::style::DIM.render_reset())
        } else {
            (
                anstyle::Style::new().render(),
                anstyle::Style::new().render_reset(),
            )
        };
        let fields = |fields: &[(String, String)]| {
            fields
                .iter()
                .map(|(k, v)| format!(" {k}={v}"))
                .collect::<String>()
        };
        let line = match &event.kind {
            ProgressKind::SpanStart {
                id,
                name,
                fields: f,
                ..
            } => {
                self.spans.insert(*id, name.clone());
                format!("▶ {name}{}", fields(f))
            }
            ProgressKind::SpanEnd { id } => {
                let name = self.spans.remove(id).unwrap_or_default();
                format!("■ {name}")
            }
            ProgressKind::Event {
                span,
                level,
                message,
                fields: f,
                ..
            } => {
                format!(
                    "{} {}{message}{}",
                    level.as_str(),
                    prefix(self.span_name(*span)),
                    fields(f)
                )
            }
            ProgressKind::Log { span, line, .. } => {
                format!("│ {}{line}", prefix(self.span_name(*span)))
            }
            ProgressKind::Counter {
                span,
                done,
                expected,
                unit,
            } => {
                let bar = if *expected > 0 {
                    let filled = (*done * 20 / expected).min(20) as usize;
                    format!("[{}{}] ", "#".repeat(filled), "-".repeat(20 - filled))
                } else {
                    String::new()
                };
                let of = if *expected > 0 {
                    format!("/{expected}")
                } else {
                    String::new()
                };
                format!("{}{bar}{done}{of} {unit}", prefix(self.span_name(*span)))
            }
            ProgressKind::Phase { span, name } => {
                format!("phase {}{name}", prefix(self.span_name(*span)))
            }
        };
        say!("{dim}[{at:7.3}s]{reset} {line}");
    }
}

fn prefix(span: &str) -> String {
    if span.is_empty() {
        String::new()
    } else {
        format!("{span}: ")
    }
}
