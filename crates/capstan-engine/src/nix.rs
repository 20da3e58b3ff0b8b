//! Deployments written in Nix: evaluated by the real Nix evaluator (`nix-instantiate`) in a
//! child process, with the library in `nix/lib.nix`, into the JSON deployment [`crate::model`]
//! reads, plus what had to be left for later.
//!
//! An output that does not exist yet throws when an input uses it (passing it on or computing
//! with it alike: Nix cannot tell the two apart safely — `if x == null` would silently take a
//! branch with any stand-in value). The resource is then *deferred*: left out of this
//! evaluation and read again once what it used exists ([`Evaluation::deferred`]). A nested
//! deployment whose members need such outputs is deferred the same way. `resources.db.output
//! "port"` is a reference the engine fills in (`{"$ref": "db#port"}`), which never defers.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The library, handed to Nix with each evaluation (so nothing is installed beside `capstan`).
pub const LIBRARY: &str = include_str!("../../../nix/lib.nix");

/// The program that evaluates (`CAPSTAN_NIX_INSTANTIATE` overrides it, for a Nix elsewhere).
fn program() -> PathBuf {
    std::env::var_os("CAPSTAN_NIX_INSTANTIATE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("nix-instantiate"))
}

/// Whether `file` is a deployment written in Nix.
pub fn is_nix(file: &Path) -> bool {
    file.extension().is_some_and(|e| e == "nix")
}

pub use crate::events::DeferredKind;

/// A resource or nested deployment left for a later evaluation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deferred {
    pub address: String,
    pub kind: DeferredKind,
    /// The resources whose outputs it used before they existed (at least one).
    pub waits_for: Vec<String>,
}

impl Deferred {
    /// The recorded resources the apply may delete once this item is evaluated with the new
    /// outputs: a nested deployment's (or a waiting member's) recorded members, which that
    /// evaluation may no longer yield. A deferred resource is declared: never deleted.
    pub fn may_delete(&self, state: &crate::state::State) -> Vec<String> {
        if self.kind == DeferredKind::Resource {
            return Vec::new();
        }
        state
            .resources
            .keys()
            .filter(|a| self.covers(a) && a.as_str() != self.address)
            .cloned()
            .collect()
    }

    /// Whether a recorded resource at `address` belongs to this deferred item, so that it is
    /// kept (not deleted as no longer declared) until the item is evaluated.
    pub fn covers(&self, address: &str) -> bool {
        let Some(rest) = address.strip_prefix(self.address.as_str()) else {
            return false;
        };
        // Itself, its children (`a/child`), and for a nested deployment its members.
        rest.is_empty()
            || rest.starts_with('/')
            || (self.kind != DeferredKind::Resource && rest.starts_with('.'))
    }
}

/// One evaluation's result.
#[derive(Debug)]
pub struct Evaluation {
    /// The deployment as `capstan.json` text: providers, and the resources that could be read.
    pub document: String,
    pub deferred: Vec<Deferred>,
    /// For each resource read for the first time with outputs given: every resource whose
    /// outputs it used (so that it is recorded as depending on them).
    pub uses: BTreeMap<String, BTreeSet<String>>,
    /// Every resource whose given outputs anything in the deployment used.
    pub found: BTreeSet<String>,
    /// What Nix printed besides Capstan's own trace lines (warnings, the deployment's traces).
    pub messages: Vec<String>,
    pub elapsed: Duration,
}

/// Why an evaluation gave no deployment.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(
        "cannot evaluate {file}: `{program}` was not found. Deployments written in Nix need Nix \
         (Debian and Ubuntu: `apt-get install nix-bin`; or see https://nixos.org/download); \
         CAPSTAN_NIX_INSTANTIATE names another nix-instantiate"
    )]
    NixMissing { file: PathBuf, program: String },
    #[error("cannot evaluate {file}: cannot run `{program}`: {error}")]
    Spawn {
        file: PathBuf,
        program: String,
        error: std::io::Error,
    },
    /// Nix's own error (its message and location, as Nix printed it).
    #[error("evaluating {file} failed:\n{message}")]
    Nix { file: PathBuf, message: String },
    #[error(
        "{file}: the members of nested deployment `{}` depend on themselves: {}\n  \
         A nested deployment's set of members may use other resources' outputs, not its own members'.",
        path[0], path.join(" → ")
    )]
    Cycle { file: PathBuf, path: Vec<String> },
    /// Resources whose inputs use each other's outputs (`resources.a.outputs.x` in `b`, and
    /// `b`'s in `a`): none can ever be evaluated.
    #[error(
        "{file}: resources: dependency cycle through outputs: {}\n  \
         Each is evaluated only once the outputs it uses exist, so none of them ever can be; \
         break the cycle (one of them must not use the other's outputs).",
        path.join(" -> ")
    )]
    OutputCycle { file: PathBuf, path: Vec<String> },
    #[error("{file}: Nix's answer could not be read: {message}")]
    Answer { file: PathBuf, message: String },
}

/// What an evaluation is asked for.
pub struct Request<'a> {
    /// The deployment file (made absolute here).
    pub file: &'a Path,
    pub params: &'a Map<String, Value>,
    /// The outputs that exist now, by address.
    pub known: &'a BTreeMap<String, capstan_schema::Json>,
    /// Only the providers (for `destroy`, which needs nothing else).
    pub providers_only: bool,
    /// Resources read by an earlier evaluation: what they use is known already (see
    /// [`Evaluation::uses`]).
    pub settled: &'a BTreeSet<String>,
}

/// Evaluates a deployment: one `nix-instantiate`, and a second one only to show the error of
/// an item that failed for its own reasons (not for want of an output).
pub async fn evaluate(request: &Request<'_>) -> Result<Evaluation, EvalError> {
    let started = Instant::now();
    let file = std::path::absolute(request.file).unwrap_or_else(|_| request.file.to_path_buf());
    let first = instantiate(&file, request, &[]).await?;
    match interpret(&file, first, request.settled)? {
        Interpreted::Read(mut evaluation) => {
            evaluation.elapsed = started.elapsed();
            Ok(evaluation)
        }
        Interpreted::OwnError(address) => {
            // It failed, but not for an output: its own error (a `throw`, an `assert`, a
            // missing `provider`). Read it again without catching, for Nix's message.
            let again = instantiate(&file, request, std::slice::from_ref(&address)).await;
            Err(match again {
                Err(e) => e,
                Ok(_) => EvalError::Nix {
                    file,
                    message: format!(
                        "`{address}` failed to evaluate, and evaluated when read again"
                    ),
                },
            })
        }
    }
}

/// What a successful `nix-instantiate` run means.
enum Interpreted {
    Read(Evaluation),
    /// This item failed for its own reasons: read it again to show Nix's error.
    OwnError(String),
}

/// Reads Nix's answer and trace lines (no I/O): the deployment, what was deferred and why.
fn interpret(
    file: &Path,
    first: Run,
    settled: &BTreeSet<String>,
) -> Result<Interpreted, EvalError> {
    let answer: Answer = serde_json::from_str(&first.stdout).map_err(|e| EvalError::Answer {
        file: file.to_path_buf(),
        message: e.to_string(),
    })?;
    if let Some(path) = first.cycles.into_iter().next() {
        return Err(EvalError::Cycle {
            file: file.to_path_buf(),
            path,
        });
    }
    let mut deferred = Vec::with_capacity(answer.deferred.len());
    for item in answer.deferred {
        let waits_for: Vec<String> = first
            .touched
            .get(&item.address)
            .map(|t| t.iter().cloned().collect())
            .unwrap_or_default();
        if waits_for.is_empty() {
            return Ok(Interpreted::OwnError(item.address));
        }
        deferred.push(Deferred {
            address: item.address,
            kind: item.what,
            waits_for,
        });
    }
    let mut resources = answer
        .resources
        .unwrap_or_else(|| Value::Object(Map::new()));
    // An item that was read although it used a missing output (it caught the throw itself,
    // with `builtins.tryEval`) would be declared with its fallback: it waits instead.
    for (address, waits) in &first.touched {
        if deferred.iter().any(|d| d.address == *address) {
            continue;
        }
        if let Some(kind) = remove_member(&mut resources, address) {
            deferred.push(Deferred {
                address: address.clone(),
                kind,
                waits_for: waits.iter().cloned().collect(),
            });
        }
    }
    defer_references(&mut resources, &mut deferred);
    // What one instance found for all the resources read anew (`capstan-uses-all#`): each
    // is taken to use all of it.
    let mut uses = first.uses;
    if let Some(all) = uses.remove("") {
        let mut path = Vec::new();
        visit_resources(&resources, &mut path, &mut |address, _| {
            if !settled.contains(address) {
                uses.insert(address.to_string(), all.clone());
            }
        });
    }
    let document = serde_json::json!({
        "providers": answer.providers,
        "resources": resources,
    })
    .to_string();
    Ok(Interpreted::Read(Evaluation {
        document,
        deferred,
        uses,
        found: first.found,
        messages: first.messages,
        elapsed: Duration::ZERO,
    }))
}

/// Reads what a `nix-instantiate` run printed (its standard output, then its standard error),
/// as `evaluate` does: for fuzzing, whatever the bytes. `Ok` when it reads as a deployment (or
/// as an item failing on its own), else the error a user would see.
pub fn read_output(stdout: &[u8], stderr: &[u8]) -> Result<(), EvalError> {
    let run = Run::read(
        String::from_utf8_lossy(stdout).into_owned(),
        stderr,
        DEFAULT_MARK,
    );
    interpret(Path::new("fuzz.nix"), run, &BTreeSet::new()).map(drop)
}

/// Defers, too, each resource that refers (`$ref`, `$cap`) to one that is deferred: it
/// cannot be declared without it. Until none is left.
fn defer_references(resources: &mut Value, deferred: &mut Vec<Deferred>) {
    loop {
        let mut found: Vec<(String, String)> = Vec::new();
        let mut path = Vec::new();
        visit_resources(resources, &mut path, &mut |address, inputs| {
            let mut targets = Vec::new();
            references(inputs, &mut targets);
            if let Some(target) = targets
                .into_iter()
                .find(|t| deferred.iter().any(|d| d.covers(t)))
            {
                found.push((address.to_string(), target));
            }
        });
        if found.is_empty() {
            return;
        }
        for (address, target) in found {
            let _ = remove_member(resources, &address);
            deferred.push(Deferred {
                address,
                kind: DeferredKind::Resource,
                waits_for: vec![target],
            });
        }
    }
}

/// Calls `f` with each resource's address and inputs in a tree of groups (as in capstan.json).
fn visit_resources(tree: &Value, path: &mut Vec<String>, f: &mut dyn FnMut(&str, &Value)) {
    let Some(members) = tree.as_object() else {
        return;
    };
    for (name, member) in members {
        path.push(name.clone());
        match member.get("resources") {
            Some(inner) if member.get("type").is_none() => visit_resources(inner, path, f),
            _ => f(
                &path.join("."),
                member.get("inputs").unwrap_or(&Value::Null),
            ),
        }
        path.pop();
    }
}

/// Removes the member at `address` from a tree of groups; what it was, if it was there.
#[must_use]
fn remove_member(tree: &mut Value, address: &str) -> Option<DeferredKind> {
    let mut node = tree;
    let mut names = address.split('.').peekable();
    while let Some(name) = names.next() {
        let members = node.as_object_mut()?;
        if names.peek().is_none() {
            let removed = members.remove(name)?;
            return Some(if removed.get("type").is_some() {
                DeferredKind::Resource
            } else {
                DeferredKind::Nested
            });
        }
        node = members.get_mut(name).and_then(|m| m.get_mut("resources"))?;
    }
    None
}

/// The addresses `{"$ref": "A#o"}` and `{"$cap": "A#n"}` markers in `value` point at.
fn references(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            if map.len() == 1 {
                if let Some((key, Value::String(target))) = map.iter().next() {
                    if key == "$ref" || key == "$cap" {
                        if let Some((address, _)) = target.split_once('#') {
                            out.push(address.to_string());
                        }
                        return;
                    }
                }
            }
            map.values().for_each(|v| references(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| references(v, out)),
        _ => {}
    }
}

#[derive(Deserialize)]
struct Answer {
    providers: Value,
    #[serde(default)]
    resources: Option<Value>,
    #[serde(default)]
    deferred: Vec<DeferredItem>,
}

#[derive(Deserialize)]
struct DeferredItem {
    address: String,
    what: DeferredKind,
}

/// The library's own mark when none is given (what the fuzz targets read).
const DEFAULT_MARK: &str = "capstan";

/// A word for one evaluation's trace lines that the deployment cannot know: a user's
/// `builtins.trace "capstan-touch#b"` must not pass for the library's.
fn trace_mark() -> String {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    // The standard library's hasher is seeded at random per process.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    format!("capstan{:016x}", hasher.finish())
}

/// One run of `nix-instantiate`: its answer and what its trace lines said.
struct Run {
    stdout: String,
    /// Per item, the addresses whose missing outputs it used.
    touched: BTreeMap<String, BTreeSet<String>>,
    /// Per newly read resource, the addresses whose outputs it used.
    uses: BTreeMap<String, BTreeSet<String>>,
    /// The addresses whose given outputs anything used.
    found: BTreeSet<String>,
    cycles: Vec<Vec<String>>,
    messages: Vec<String>,
    /// The item the library was reading last (where an error that stopped Nix happened).
    reading: Option<String>,
}

impl Run {
    /// Reads the trace lines Capstan's library prints (lines that are not UTF-8 lossily; any
    /// other line is a message of Nix's).
    fn read(stdout: String, stderr: &[u8], mark: &str) -> Run {
        let prefix = format!("trace: {mark}-");
        let mut run = Run {
            stdout,
            touched: BTreeMap::new(),
            uses: BTreeMap::new(),
            found: BTreeSet::new(),
            cycles: Vec::new(),
            messages: Vec::new(),
            reading: None,
        };
        let mut current: Option<String> = None;
        let mut using: Option<String> = None;
        let stderr = stderr.strip_suffix(b"\n").unwrap_or(stderr);
        for bytes in stderr.split(|&b| b == b'\n').filter(|_| !stderr.is_empty()) {
            let line = String::from_utf8_lossy(bytes)
                .trim_end_matches('\r')
                .to_string();
            let Some(trace) = line.strip_prefix(prefix.as_str()) else {
                run.messages.push(line);
                continue;
            };
            let mut fields = trace.split('#');
            match (fields.next(), fields.next()) {
                (Some("eval"), Some(address)) => {
                    current = Some(address.to_string());
                    run.reading = current.clone();
                }
                (Some("uses"), Some(address)) => {
                    current = None;
                    using = Some(address.to_string());
                }
                (Some("uses-all"), _) => {
                    current = None;
                    using = Some(String::new());
                }
                (Some("use"), Some(address)) => {
                    if let Some(item) = &using {
                        run.uses
                            .entry(item.clone())
                            .or_default()
                            .insert(address.to_string());
                    }
                }
                (Some("found"), Some(address)) => {
                    run.found.insert(address.to_string());
                }
                (Some("touch"), Some(address)) => {
                    if let Some(item) = &current {
                        run.touched
                            .entry(item.clone())
                            .or_default()
                            .insert(address.to_string());
                    }
                }
                (Some("cycle"), Some(first)) => {
                    run.cycles.push(
                        std::iter::once(first)
                            .chain(fields)
                            .map(str::to_string)
                            .collect(),
                    );
                }
                _ => run.messages.push(line),
            }
        }
        run
    }
}

/// A Nix string literal holding `text`.
fn nix_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '$' => out.push_str("\\$"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The expression Nix reads on its standard input: the library, applied to the file and the
/// values of this evaluation (as JSON in strings, so no size limit of a command line applies).
fn expression(file: &Path, request: &Request<'_>, raise: &[String], mark: &str) -> String {
    let mut known = String::from("{");
    for (i, (address, outputs)) in request.known.iter().enumerate() {
        if i > 0 {
            known.push(',');
        }
        known.push_str(&serde_json::to_string(address).expect("a string"));
        known.push(':');
        known.push_str(outputs.text());
    }
    known.push('}');
    format!(
        "let capstan = (\n{LIBRARY}\n); in capstan.evaluate {{ file = /. + {file}; params = builtins.fromJSON {params}; \
         known = builtins.fromJSON {known}; raise = builtins.fromJSON {raise}; only = {only}; \
         settled = builtins.fromJSON {settled}; mark = {mark}; }}\n",
        mark = nix_string(mark),
        file = nix_string(&file.to_string_lossy()),
        params = nix_string(&Value::Object(request.params.clone()).to_string()),
        known = nix_string(&known),
        raise = nix_string(&serde_json::to_string(raise).expect("strings")),
        settled = nix_string(
            &serde_json::Value::Object(
                request
                    .settled
                    .iter()
                    .map(|a| (a.clone(), serde_json::Value::Bool(true)))
                    .collect()
            )
            .to_string()
        ),
        only = nix_string(if request.providers_only {
            "providers"
        } else {
            "all"
        }),
    )
}

/// Evaluates; an evaluation that fails is run again with `--show-trace`, only to find the
/// place in the deployment's own files (without it, Nix names a place in the library, read
/// from standard input, or none), which the error then shows instead of Nix's advice to use a
/// flag `capstan` does not take.
async fn instantiate(
    file: &Path,
    request: &Request<'_>,
    raise: &[String],
) -> Result<Run, EvalError> {
    let traced = !raise.is_empty();
    let first = instantiate_once(file, request, raise, traced).await;
    match first {
        Err(EvalError::Nix { .. }) if !traced => {
            match Box::pin(instantiate_once(file, request, raise, true)).await {
                Err(placed @ EvalError::Nix { .. }) => Err(placed),
                _ => first,
            }
        }
        other => other,
    }
}

async fn instantiate_once(
    file: &Path,
    request: &Request<'_>,
    raise: &[String],
    show_trace: bool,
) -> Result<Run, EvalError> {
    let program = program();
    let mut command = tokio::process::Command::new(&program);
    command.args(["--eval", "--strict", "--json"]);
    if show_trace {
        // For the place in the deployment's own files (Nix names it for a `throw` only then).
        command.arg("--show-trace");
    }
    command
        .arg("-")
        .current_dir(crate::model::dir_of(file))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // Not in the terminal's process group: Ctrl-C is capstan's to handle (it stops the
    // evaluation by dropping it, which kills it), not a failure of Nix's to report; and the
    // evaluator dies with capstan, even a capstan killed with SIGKILL.
    capstan_process::dies_with_parent(&mut command);
    let mut child = command.spawn().map_err(|error| {
        if error.kind() == std::io::ErrorKind::NotFound {
            EvalError::NixMissing {
                file: file.to_path_buf(),
                program: program.display().to_string(),
            }
        } else {
            EvalError::Spawn {
                file: file.to_path_buf(),
                program: program.display().to_string(),
                error,
            }
        }
    })?;
    let mark = trace_mark();
    let input = expression(file, request, raise, &mark);
    let mut stdin = child.stdin.take().expect("piped");
    let mut stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let write = async move {
        // Nix may stop reading (a syntax error in the library is not possible, but an early
        // exit is): a broken pipe is then reported by its exit status.
        let _ = stdin.write_all(input.as_bytes()).await;
        drop(stdin);
    };
    let read_out = async move {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text).await;
        text
    };
    let read_err = async move {
        // To the end whatever the bytes (a deployment may trace anything).
        let mut bytes = Vec::new();
        let _ = tokio::io::BufReader::new(stderr)
            .read_to_end(&mut bytes)
            .await;
        bytes
    };
    let ((), stdout, stderr) = tokio::join!(write, read_out, read_err);
    let Run {
        stdout,
        touched,
        uses,
        found,
        cycles,
        messages,
        reading,
    } = Run::read(stdout, &stderr, &mark);
    let status = child.wait().await.map_err(|error| EvalError::Spawn {
        file: file.to_path_buf(),
        program: program.display().to_string(),
        error,
    })?;
    if !status.success() {
        if let Some(path) = cycles.into_iter().next() {
            return Err(EvalError::Cycle {
                file: file.to_path_buf(),
                path,
            });
        }
        let mut message = if show_trace {
            concise(&messages)
        } else {
            messages.join("\n")
        };
        if message.trim().is_empty() {
            message = format!("{} exited with {status}", program.display());
        }
        // Nix named no place in the deployment's files (an `import` of a file that is not
        // there, say): at least the resource it was reading.
        if !message.contains(" at /") {
            if let Some(address) = &reading {
                message.push_str(&format!("\n  (while reading `{address}`)"));
            }
        }
        return Err(EvalError::Nix {
            file: file.to_path_buf(),
            message,
        });
    }
    Ok(Run {
        stdout,
        touched,
        uses,
        found,
        cycles,
        messages,
        reading,
    })
}

/// A deployment in Nix, read as far as the outputs that exist allow, and planned.
pub struct Staged {
    pub deployment: crate::model::Deployment,
    /// The plan of what could be read. Deletes of what a deferred item may still declare are
    /// left out (see [`Deferred::covers`]).
    pub changes: Vec<crate::plan::PlannedChange>,
    pub deferred: Vec<Deferred>,
}

#[derive(Debug, thiserror::Error)]
pub enum StagedError {
    #[error(transparent)]
    Eval(#[from] EvalError),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
}

/// Evaluates and plans a deployment in Nix: once, when nothing changes.
///
/// The first evaluation is given every recorded output. A resource the plan leaves as it is
/// keeps its outputs, so what was computed from them stands; and a recorded resource is taken
/// to use what it used when it was last applied (its recorded dependencies, less what nothing
/// used now): its inputs are the recorded ones, computed from the same outputs. The outputs
/// of what the plan does not leave as it is are taken back, with those of everything that
/// used them (transitively), and the deployment is evaluated again without them: what used
/// them is then deferred, to be evaluated during the run once they are made. A recorded
/// resource that changes is read again, traced, for what it uses now. `stage` counts
/// evaluations (for events).
pub async fn evaluate_and_plan(
    file: &Path,
    params: &Map<String, Value>,
    state: &crate::state::State,
    uses: &mut Uses,
    events: &dyn crate::events::EventSink,
    stage: &mut usize,
) -> Result<Staged, StagedError> {
    use crate::events::Event;
    use crate::plan::Action;
    let name = file.display().to_string();
    let mut known = outputs_of(state, state.resources.keys());
    // What each recorded resource is taken to use until it is read anew.
    let mut assumed: Uses = state
        .resources
        .iter()
        .map(|(address, recorded)| {
            let used = recorded
                .dependencies
                .iter()
                .filter(|d| known.contains_key(d.as_str()))
                .cloned()
                .collect();
            (address.clone(), used)
        })
        .collect();
    // Not traced for what they use: recorded resources (until they change), and what an
    // evaluation read already.
    let mut settled: BTreeSet<String> = state.resources.keys().cloned().collect();
    // Until an evaluation with recorded outputs fails: a value that no longer holds can take
    // a deployment where it cannot go (a branch naming a resource that is gone). Then the
    // evaluations start from no output, each given those of what the last one planned
    // unchanged and something waited for.
    let mut optimistic = !known.is_empty();
    // Outputs given and then found not to stand: not given again.
    let mut taken_back: BTreeSet<String> = BTreeSet::new();
    let uses_before = uses.clone();
    loop {
        *stage += 1;
        events.emit(Event::EvaluationStart {
            file: name.clone(),
            stage: *stage,
        });
        let evaluated = evaluate(&Request {
            file,
            params,
            known: &known,
            providers_only: false,
            settled: &settled,
        })
        .await;
        let parsed = evaluated.map_err(StagedError::from).and_then(|evaluation| {
            crate::model::Deployment::parse(file, &evaluation.document, params)
                .map(|deployment| (evaluation, deployment))
                .map_err(StagedError::from)
        });
        let (evaluation, mut deployment) = match parsed {
            Ok(both) => both,
            Err(e) if optimistic => {
                events.emit(Event::EvaluationFailed {
                    file: name.clone(),
                    stage: *stage,
                    error: e.to_string(),
                    stops_command: false,
                    retried: true,
                });
                optimistic = false;
                known.clear();
                assumed.clear();
                settled.clear();
                *uses = uses_before.clone();
                continue;
            }
            Err(e) => {
                // Every evaluation that starts ends, in the stream too.
                events.emit(Event::EvaluationFailed {
                    file: name.clone(),
                    stage: *stage,
                    error: e.to_string(),
                    stops_command: true,
                    retried: false,
                });
                return Err(e);
            }
        };
        // What was read anew was traced: what it uses is known, not assumed.
        for address in deployment.resources.keys() {
            if !settled.contains(address) {
                assumed.remove(address);
            }
        }
        for used in assumed.values_mut() {
            used.retain(|a| evaluation.found.contains(a));
        }
        let effective = with_assumed(uses, &assumed, &evaluation);
        record_uses(&mut deployment, &effective);
        settled.extend(deployment.resources.keys().cloned());
        events.emit(Event::EvaluationComplete {
            file: name.clone(),
            stage: *stage,
            resources: deployment.resources.len(),
            deferred: evaluation.deferred.len(),
            elapsed_seconds: evaluation.elapsed.as_secs_f64(),
        });
        for message in evaluation.messages.iter().filter(|m| !m.trim().is_empty()) {
            events.emit(Event::EvaluationLog {
                file: name.clone(),
                line: message.clone(),
            });
        }
        let mut changes = crate::plan::plan(&deployment, state)?;
        let deferred = evaluation.deferred;
        let kept = kept_for_deferred(state, &deferred);
        changes.retain(|c| c.action != Action::Delete || !kept.contains(c.address.as_str()));
        // Given outputs that do not stand: of what the plan does not leave as it is, and of
        // what used those (transitively).
        let unchanged: BTreeSet<&str> = changes
            .iter()
            .filter(|c| c.action == Action::Noop)
            .map(|c| c.address.as_str())
            .collect();
        let mut unstable: BTreeSet<String> = known
            .keys()
            .filter(|a| !unchanged.contains(a.as_str()))
            .cloned()
            .collect();
        loop {
            let more: Vec<String> = known
                .keys()
                .filter(|a| !unstable.contains(*a) && uses_any(&effective, a, &unstable))
                .cloned()
                .collect();
            if more.is_empty() {
                break;
            }
            unstable.extend(more);
        }
        let used_unstable = effective
            .values()
            .any(|used| used.iter().any(|u| unstable.contains(u)));
        // A recorded resource that changes may use other outputs than it did: read it again,
        // traced (unless nothing used any output at all: then it used none either).
        let retrace: Vec<String> = if evaluation.found.is_empty() {
            Vec::new()
        } else {
            changes
                .iter()
                .filter(|c| c.action != Action::Noop && c.action != Action::Delete)
                .filter(|c| assumed.contains_key(&c.address))
                .map(|c| c.address.clone())
                .collect()
        };
        if used_unstable || !retrace.is_empty() {
            known.retain(|a, _| !unstable.contains(a));
            taken_back.extend(unstable);
            for address in retrace {
                settled.remove(&address);
                assumed.remove(&address);
            }
            continue;
        }
        // Outputs that exist and stand, which something deferred waits for (from no output,
        // after a failed evaluation with all of them).
        let waited: BTreeSet<&str> = deferred
            .iter()
            .flat_map(|d| d.waits_for.iter().map(String::as_str))
            .collect();
        let newly: Vec<&String> = changes
            .iter()
            .filter(|c| c.action == Action::Noop)
            .map(|c| &c.address)
            .filter(|a| {
                waited.contains(a.as_str()) && !known.contains_key(*a) && !taken_back.contains(*a)
            })
            .collect();
        if !newly.is_empty() {
            known.extend(outputs_of(state, newly));
            continue;
        }
        if let Some(path) = output_cycle(&deferred) {
            return Err(EvalError::OutputCycle {
                file: file.to_path_buf(),
                path,
            }
            .into());
        }
        // What is read now keeps what it was taken to use.
        for (address, used) in assumed {
            if !used.is_empty() && deployment.resources.contains_key(&address) {
                uses.entry(address).or_insert(used);
            }
        }
        return Ok(Staged {
            deployment,
            changes,
            deferred,
        });
    }
}

/// What each item uses: what was traced (this evaluation's folded into `uses`, with what each
/// deferred item waited for), else what it is assumed to use.
fn with_assumed(uses: &mut Uses, assumed: &Uses, evaluation: &Evaluation) -> Uses {
    for (address, used) in &evaluation.uses {
        uses.entry(address.clone())
            .or_default()
            .extend(used.iter().cloned());
    }
    for d in &evaluation.deferred {
        uses.entry(d.address.clone())
            .or_default()
            .extend(d.waits_for.iter().cloned());
    }
    let mut effective = assumed.clone();
    for (address, used) in uses.iter() {
        effective.insert(address.clone(), used.clone());
    }
    effective
}

/// Whether `address` (or a nested deployment or group it is a member of) used outputs of
/// any of `these` (other than its own).
fn uses_any(uses: &Uses, address: &str, these: &BTreeSet<String>) -> bool {
    let mut prefix = address;
    loop {
        if let Some(used) = uses.get(prefix) {
            if used.iter().any(|u| u != address && these.contains(u)) {
                return true;
            }
        }
        match prefix.rfind('.') {
            Some(dot) => prefix = &prefix[..dot],
            None => return false,
        }
    }
}

/// A cycle among deferred items, each waiting for outputs of the next (which is itself
/// deferred, so never made), as a path that ends where it starts; `None` if there is none.
fn output_cycle(deferred: &[Deferred]) -> Option<Vec<String>> {
    // What each deferred item waits for that is deferred too (or inside one that is).
    let next = |d: &Deferred| -> Vec<usize> {
        deferred
            .iter()
            .enumerate()
            .filter(|(_, e)| d.waits_for.iter().any(|w| e.covers(w)))
            .map(|(n, _)| n)
            .collect()
    };
    let edges: Vec<Vec<usize>> = deferred.iter().map(next).collect();
    // Depth first, colouring: 0 unseen, 1 on the current path, 2 done.
    let mut colour = vec![0u8; deferred.len()];
    fn visit(
        n: usize,
        edges: &[Vec<usize>],
        colour: &mut [u8],
        path: &mut Vec<usize>,
    ) -> Option<Vec<usize>> {
        colour[n] = 1;
        path.push(n);
        for &m in &edges[n] {
            if colour[m] == 1 {
                let start = path.iter().position(|&p| p == m).unwrap_or(0);
                let mut cycle = path[start..].to_vec();
                cycle.push(m);
                return Some(cycle);
            }
            if colour[m] == 0 {
                if let Some(cycle) = visit(m, edges, colour, path) {
                    return Some(cycle);
                }
            }
        }
        path.pop();
        colour[n] = 2;
        None
    }
    for start in 0..deferred.len() {
        if colour[start] == 0 {
            let mut path = Vec::new();
            if let Some(cycle) = visit(start, &edges, &mut colour, &mut path) {
                return Some(
                    cycle
                        .into_iter()
                        .map(|n| deferred[n].address.clone())
                        .collect(),
                );
            }
        }
    }
    None
}

/// After the plan's reads (`run::read_on_plan`): a resource computed with the recorded outputs
/// of one found changed (`read_changed`) holds stale values, so it is deferred, to be
/// evaluated again once that one is made; and so is what used its outputs, or refers to it.
pub fn defer_stale(
    changes: &mut Vec<crate::plan::PlannedChange>,
    deployment: &crate::model::Deployment,
    deferred: &mut Vec<Deferred>,
) {
    let mut changing: BTreeSet<String> = changes
        .iter()
        .filter(|c| c.read_changed)
        .map(|c| c.address.clone())
        .collect();
    if changing.is_empty() {
        return;
    }
    let mut stale: BTreeMap<String, Vec<String>> = BTreeMap::new();
    loop {
        let mut found = Vec::new();
        for change in changes.iter() {
            if stale.contains_key(&change.address) || change.read_changed {
                continue;
            }
            let Some(decl) = deployment.resources.get(&change.address) else {
                continue;
            };
            let waits: Vec<String> = decl
                .uses
                .iter()
                .filter(|u| changing.contains(*u))
                .chain(
                    decl.refs
                        .iter()
                        .map(|r| &r.address)
                        .filter(|a| stale.contains_key(*a)),
                )
                .cloned()
                .collect();
            if !waits.is_empty() {
                found.push((change.address.clone(), waits));
            }
        }
        if found.is_empty() {
            break;
        }
        for (address, waits) in found {
            changing.insert(address.clone());
            stale.insert(address, waits);
        }
    }
    changes.retain(|c| !stale.contains_key(&c.address));
    for (address, waits_for) in stale {
        deferred.push(Deferred {
            address,
            kind: DeferredKind::Resource,
            waits_for,
        });
    }
}

/// The recorded resources a deferred item may still declare, and what they depend on (so
/// that it stays until they are deleted first): none of them is deleted as undeclared.
pub fn kept_for_deferred<'a>(
    state: &'a crate::state::State,
    deferred: &[Deferred],
) -> BTreeSet<&'a str> {
    let mut kept: BTreeSet<&str> = BTreeSet::new();
    if deferred.is_empty() {
        return kept;
    }
    let mut stack: Vec<&str> = state
        .resources
        .keys()
        .filter(|a| deferred.iter().any(|d| d.covers(a)))
        .map(String::as_str)
        .collect();
    while let Some(address) = stack.pop() {
        if !kept.insert(address) {
            continue;
        }
        if let Some((_, r)) = state.resources.get_key_value(address) {
            for dep in &r.dependencies {
                if let Some((key, _)) = state.resources.get_key_value(dep.as_str()) {
                    stack.push(key.as_str());
                }
            }
        }
    }
    kept
}

/// What each deferred item waited for, over all evaluations of a command: once it is read, it
/// depends on those (a member of a nested deployment, on what its deployment waited for too).
pub type Uses = BTreeMap<String, BTreeSet<String>>;

/// A deployment in Nix while it is applied: what the run needs to evaluate it again.
pub struct Stages {
    pub file: PathBuf,
    pub params: Map<String, Value>,
    /// The deployment's Nix files as they were when the run started: a later evaluation of
    /// files edited since would apply half of the edit.
    pub sources: Sources,
    /// What the last evaluation left for later.
    pub deferred: Vec<Deferred>,
    pub uses: Uses,
    /// Evaluations so far (for events).
    pub stage: usize,
    /// `--target`: later evaluations add only what it selects.
    pub selection: Option<crate::select::Selection>,
}

/// Adds what `deferred` waited for to `uses`, and gives each resource of `deployment` the
/// dependencies `uses` holds for it.
pub fn note_uses(
    deployment: &mut crate::model::Deployment,
    uses: &mut Uses,
    evaluation: &Evaluation,
) {
    for (address, used) in &evaluation.uses {
        uses.entry(address.clone())
            .or_default()
            .extend(used.iter().cloned());
    }
    for d in &evaluation.deferred {
        uses.entry(d.address.clone())
            .or_default()
            .extend(d.waits_for.iter().cloned());
    }
    record_uses(deployment, uses);
}

fn record_uses(deployment: &mut crate::model::Deployment, uses: &Uses) {
    if uses.is_empty() {
        return;
    }
    let resources = &mut deployment.resources;
    for i in 0..resources.len() {
        let (address, _) = resources.get_index(i).expect("an index");
        // Itself, and each nested deployment (or group) it is a member of.
        let mut used: BTreeSet<String> = BTreeSet::new();
        let mut prefix = address.as_str();
        loop {
            if let Some(u) = uses.get(prefix) {
                used.extend(u.iter().filter(|u| u.as_str() != address).cloned());
            }
            match prefix.rfind('.') {
                Some(dot) => prefix = &prefix[..dot],
                None => break,
            }
        }
        if used.is_empty() {
            continue;
        }
        let indices: Vec<u32> = used
            .iter()
            .filter_map(|u| resources.get_index_of(u))
            .filter_map(|j| u32::try_from(j).ok())
            .collect();
        let (_, decl) = resources.get_index_mut(i).expect("an index");
        decl.uses = used.into_iter().collect();
        decl.depends_on.extend(indices);
        decl.depends_on.sort_unstable();
        decl.depends_on.dedup();
    }
}

/// Nix's error from a `--show-trace` run, cut to its message and the first place in the
/// deployment's own files (the library's frames, read from standard input, say nothing to
/// its author).
fn concise(lines: &[String]) -> String {
    let Some(start) = lines.iter().position(|l| l.starts_with("error:")) else {
        return lines.join("\n");
    };
    let mut out: Vec<&str> = lines[start..]
        .iter()
        .take_while(|l| !l.trim().is_empty())
        .map(String::as_str)
        .collect();
    let place = lines[start..].iter().position(|l| {
        let l = l.trim_start();
        l.starts_with("at /") && !l.contains('«')
    });
    if let Some(at) = place {
        let at = start + at;
        out.push("");
        out.push(&lines[at]);
        // The source lines after it, up to the next blank line past them.
        let mut seen = false;
        for line in &lines[at + 1..] {
            if line.trim().is_empty() {
                if seen {
                    break;
                }
                out.push("");
                continue;
            }
            seen = true;
            out.push(line);
        }
    }
    out.join("\n")
}

/// The outputs recorded for `addresses` that exist in `state`, as [`Request::known`] takes them.
pub fn outputs_of<'a>(
    state: &crate::state::State,
    addresses: impl IntoIterator<Item = &'a String>,
) -> BTreeMap<String, capstan_schema::Json> {
    addresses
        .into_iter()
        .filter_map(|a| {
            state
                .resources
                .get(a)
                .map(|r| (a.clone(), r.outputs.clone()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_quoted_for_nix() {
        assert_eq!(nix_string("a\"b\\c${d}\n"), r#""a\"b\\c\${d}\n""#);
    }

    #[test]
    fn a_deferred_item_covers_what_belongs_to_it() {
        let nested = Deferred {
            address: "rest".into(),
            kind: DeferredKind::Nested,
            waits_for: vec!["config".into()],
        };
        assert!(nested.covers("rest"));
        assert!(nested.covers("rest.vm"));
        assert!(nested.covers("rest/child"));
        assert!(!nested.covers("restless"));
        let resource = Deferred {
            kind: DeferredKind::Resource,
            ..nested
        };
        assert!(resource.covers("rest/child"));
        assert!(!resource.covers("rest.vm"));
    }
}

/// The Nix files a deployment is read from, as they are now: the file itself and every `.nix`
/// file under its directory (hidden directories, such as the state's, left out), each with
/// its length and modification time. Files the run writes (a `file` resource's) are not
/// `.nix` files; data a deployment reads with `builtins.readFile` is not watched.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sources(Vec<(PathBuf, u64, Option<std::time::SystemTime>)>);

/// At most this many files are watched (a deployment in a large tree: its own file alone then).
const MAX_SOURCES: usize = 5000;

impl Sources {
    pub fn of(file: &Path) -> Sources {
        let stamp = |path: &Path| {
            let meta = std::fs::metadata(path).ok();
            (
                path.to_path_buf(),
                meta.as_ref().map_or(0, |m| m.len()),
                meta.and_then(|m| m.modified().ok()),
            )
        };
        let mut found = vec![stamp(file)];
        let mut dirs = vec![(crate::model::dir_of(file), 0)];
        while let Some((dir, depth)) = dirs.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name();
                if name.to_string_lossy().starts_with('.') {
                    continue;
                }
                let path = entry.path();
                match entry.file_type() {
                    Ok(t) if t.is_dir() && depth < 8 => dirs.push((path, depth + 1)),
                    Ok(t) if t.is_file() && path.extension().is_some_and(|e| e == "nix") => {
                        found.push(stamp(&path));
                    }
                    _ => {}
                }
                if found.len() > MAX_SOURCES {
                    return Sources(vec![stamp(file)]);
                }
            }
        }
        found.sort();
        found.dedup();
        Sources(found)
    }

    /// A file that is not as it was in `earlier` (changed, added or removed), if any.
    pub fn changed_since(&self, earlier: &Sources) -> Option<PathBuf> {
        let now: BTreeMap<&PathBuf, _> = self.0.iter().map(|(p, l, m)| (p, (l, m))).collect();
        let then: BTreeMap<&PathBuf, _> = earlier.0.iter().map(|(p, l, m)| (p, (l, m))).collect();
        now.iter()
            .find(|(p, stamp)| then.get(*p) != Some(*stamp))
            .map(|(p, _)| (*p).clone())
            .or_else(|| {
                then.keys()
                    .find(|p| !now.contains_key(*p))
                    .map(|p| (*p).clone())
            })
    }
}
