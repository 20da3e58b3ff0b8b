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

mod stages;
pub use stages::{
    defer_stale, evaluate_and_plan, kept_for_deferred, note_uses, outputs_of, Staged, StagedError,
    Stages, Uses,
};

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
    // A deployment could read them with `builtins.getEnv`.
    capstan_process::without_capstans_secrets(&mut command);
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
