//! Sensitive values: what the deployment marks `{"$sensitive": …}`, what providers mark in
//! their handshakes, and what the state recorded as such. They reach providers and the state
//! (private files) as they are, and are shown nowhere: [`Redacting`] replaces them in every
//! event before it is rendered or written as JSON, wherever they appear (an output, a log line
//! a provider printed, an error message), and `state show` redacts what the state marks.

use std::borrow::Cow;
use std::cell::RefCell;
use std::rc::Rc;

use serde_json::Value;

use crate::events::{Event, EventSink};

/// Why what an operation printed is not shown when it fails.
const WHY_HIDDEN: &str = "its outputs are sensitive (or its inputs hold a secret) and it ended without returning them, so what it printed may hold a secret";

/// What is shown instead of a sensitive value.
pub const REDACTED: &str = "(sensitive)";

/// Shorter secrets are redacted where they are known to be (an output, a recorded field) but
/// not searched for in free text, where they would blot out ordinary words.
pub const MIN_SCRUBBED: usize = 4;

/// The sensitive values known in a run, shared by the run (which learns them) and the event
/// sinks (which hide them).
#[derive(Default)]
pub struct Secrets {
    /// Longest first, so that a secret containing another is replaced whole.
    texts: RefCell<Vec<String>>,
    /// `(provider, type)` pairs whose outputs are sensitive: their operations' progress is
    /// held back until the result (and its secrets) are known.
    held_types: RefCell<std::collections::HashSet<(String, String)>>,
    /// Outputs the deployment marks sensitive, by address.
    marked_outputs: RefCell<std::collections::HashMap<String, std::collections::BTreeSet<String>>>,
    /// Resources whose inputs hold a secret this run: their progress is held back like that
    /// of a type with sensitive outputs (their outputs are treated as secrets).
    tainted: RefCell<std::collections::HashSet<String>>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secrets({} values)", self.texts.borrow().len())
    }
}

impl Secrets {
    pub fn new() -> Rc<Self> {
        Rc::new(Secrets::default())
    }

    pub fn is_empty(&self) -> bool {
        self.texts.borrow().is_empty()
            && self.held_types.borrow().is_empty()
            && self.marked_outputs.borrow().is_empty()
    }

    /// Notes that resources of `resource_type` from `provider` return sensitive outputs: a
    /// provider may print such a value before it returns it, when it is not known yet.
    pub fn hold_type(&self, provider: &str, resource_type: &str) {
        self.held_types
            .borrow_mut()
            .insert((provider.to_string(), resource_type.to_string()));
    }

    fn holds(&self, provider: &str, resource_type: &str, address: &str) -> bool {
        self.held_types
            .borrow()
            .contains(&(provider.to_string(), resource_type.to_string()))
            || self.marked_outputs.borrow().contains_key(address)
            || self.tainted.borrow().contains(address)
    }

    /// Notes that `address`'s inputs hold a secret: what its operation prints is held back
    /// until its outputs (secrets too, unless declared public) are known.
    pub fn taint(&self, address: &str) {
        self.tainted.borrow_mut().insert(address.to_string());
    }

    /// Whether any known secret is in `value` (whole, or inside a longer string).
    pub fn found_in(&self, value: &Value) -> bool {
        let mut found = Vec::new();
        self.pointers(value, "", &mut found);
        !found.is_empty()
    }

    /// Learns what an output made from a secret holds: its strings long enough to search for
    /// (a number or a short word derived from a secret would blot out every equal value
    /// shown; where it is recorded, the state still marks it).
    pub fn add_derived(&self, value: &Value) {
        match value {
            Value::String(s) if s.trim().len() >= MIN_SCRUBBED => self.add_text(s),
            Value::Array(items) => items.iter().for_each(|v| self.add_derived(v)),
            Value::Object(map) => map.values().for_each(|v| self.add_derived(v)),
            _ => {}
        }
    }

    /// Whether `provider` serves a type whose outputs are sensitive.
    fn holds_provider(&self, provider: &str) -> bool {
        self.held_types.borrow().iter().any(|(p, _)| p == provider)
    }

    /// Notes that output `output` of `address` is sensitive: the deployment passes it on
    /// inside `{"$sensitive": …}`.
    pub fn mark_output(&self, address: &str, output: &str) {
        self.marked_outputs
            .borrow_mut()
            .entry(address.to_string())
            .or_default()
            .insert(output.to_string());
    }

    /// The outputs of `address` the deployment marks sensitive.
    pub fn marked_outputs(&self, address: &str) -> Vec<String> {
        self.marked_outputs
            .borrow()
            .get(address)
            .map(|o| o.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Learns every string (and number) in `value` as a secret.
    pub fn add_value(&self, value: &Value) {
        match value {
            Value::String(s) => self.add_text(s),
            Value::Number(n) => self.add_text(&n.to_string()),
            Value::Array(items) => items.iter().for_each(|v| self.add_value(v)),
            Value::Object(map) => map.values().for_each(|v| self.add_value(v)),
            Value::Null | Value::Bool(_) => {}
        }
    }

    pub fn add_text(&self, text: &str) {
        if text.is_empty() {
            return;
        }
        // A secret of many lines (a key) reaches logs a line at a time.
        if text.contains('\n') {
            for line in text
                .lines()
                .map(str::trim)
                .filter(|l| l.len() >= MIN_SCRUBBED)
            {
                if line != text {
                    self.add_text(line);
                }
            }
        }
        let mut texts = self.texts.borrow_mut();
        if texts.iter().any(|t| t == text) {
            return;
        }
        let at = texts.partition_point(|t| t.len() >= text.len());
        texts.insert(at, text.to_string());
        // As it appears inside JSON text, too.
        let quoted = serde_json::to_string(text).expect("a string");
        let escaped = &quoted[1..quoted.len() - 1];
        if escaped != text && !texts.iter().any(|t| t == escaped) {
            let at = texts.partition_point(|t| t.len() >= escaped.len());
            texts.insert(at, escaped.to_string());
        }
    }

    /// Whether `value` is (wholly) a secret.
    pub fn is_secret(&self, value: &Value) -> bool {
        let text = match value {
            Value::String(s) => Cow::Borrowed(s.as_str()),
            Value::Number(n) => Cow::Owned(n.to_string()),
            _ => return false,
        };
        !text.is_empty() && self.texts.borrow().iter().any(|t| *t == *text)
    }

    /// `text` with every secret long enough to search for replaced.
    pub fn scrub<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let texts = self.texts.borrow();
        let mut out = Cow::Borrowed(text);
        for secret in texts.iter().filter(|t| t.len() >= MIN_SCRUBBED) {
            if out.contains(secret.as_str()) {
                out = Cow::Owned(out.replace(secret.as_str(), REDACTED));
            }
        }
        out
    }

    /// Every string in `value` scrubbed (numbers and the shape left alone).
    fn scrub_strings(&self, value: &mut Value) {
        match value {
            Value::String(s) => self.scrub_string(s),
            Value::Array(items) => items.iter_mut().for_each(|v| self.scrub_strings(v)),
            Value::Object(map) => map.values_mut().for_each(|v| self.scrub_strings(v)),
            _ => {}
        }
    }

    fn scrub_string(&self, text: &mut String) {
        if let Cow::Owned(scrubbed) = self.scrub(text) {
            *text = scrubbed;
        }
    }

    /// `value` with every secret replaced: whole values that are secrets, and secrets inside
    /// longer strings.
    pub fn redact_value(&self, value: &mut Value) {
        match value {
            Value::String(_) | Value::Number(_) if self.is_secret(value) => {
                *value = Value::String(REDACTED.into());
            }
            Value::String(s) => self.scrub_string(s),
            Value::Array(items) => items.iter_mut().for_each(|v| self.redact_value(v)),
            Value::Object(map) => map.values_mut().for_each(|v| self.redact_value(v)),
            _ => {}
        }
    }

    /// The JSON pointers (under `prefix`) of the secrets in `value`, for the state to record.
    pub fn pointers(&self, value: &Value, prefix: &str, out: &mut Vec<String>) {
        if self.texts.borrow().is_empty() {
            return;
        }
        match value {
            Value::String(s) if !s.is_empty() && self.scrub(s) != s.as_str() => {
                out.push(prefix.to_string())
            }
            Value::String(_) | Value::Number(_) if self.is_secret(value) => {
                out.push(prefix.to_string())
            }
            Value::Array(items) => {
                for (n, v) in items.iter().enumerate() {
                    self.pointers(v, &format!("{prefix}/{n}"), out);
                }
            }
            Value::Object(map) => {
                for (k, v) in map {
                    let k = k.replace('~', "~0").replace('/', "~1");
                    self.pointers(v, &format!("{prefix}/{k}"), out);
                }
            }
            _ => {}
        }
    }
}

/// Learns the secrets the state recorded (every resource's `sensitive` pointers) and those the
/// deployment marks, so that none is shown even before the run meets it again.
pub fn learn(
    secrets: &Secrets,
    state: &crate::state::State,
    deployment: Option<&crate::model::Deployment>,
) {
    for r in state.resources.values() {
        if r.sensitive.is_empty() {
            continue;
        }
        let whole = serde_json::json!({"inputs": r.inputs.value(), "outputs": r.outputs.value()});
        for pointer in &r.sensitive {
            if let Some(v) = whole.pointer(pointer) {
                secrets.add_value(v);
            }
        }
    }
    for decl in deployment.iter().flat_map(|d| d.resources.values()) {
        for value in &decl.sensitive {
            learn_marked(secrets, value, state);
        }
    }
    for decl in deployment.iter().flat_map(|d| d.providers.values()) {
        for value in &decl.sensitive {
            learn_marked(secrets, value, state);
        }
    }
}

/// A marked value's strings, and for each `$ref` in it the output recorded now.
fn learn_marked(secrets: &Secrets, value: &Value, state: &crate::state::State) {
    match value {
        Value::Object(map) => {
            if let (1, Some(Value::String(target))) = (map.len(), map.get("$ref")) {
                if let Some((address, output)) = target.split_once('#') {
                    // Sensitive where it is made too, not only where it is used.
                    secrets.mark_output(address, output);
                    if let Some(v) = state
                        .resources
                        .get(address)
                        .and_then(|r| r.outputs.get(output))
                    {
                        secrets.add_value(&v);
                    }
                }
                return;
            }
            map.values().for_each(|v| learn_marked(secrets, v, state));
        }
        Value::Array(items) => items.iter().for_each(|v| learn_marked(secrets, v, state)),
        other => secrets.add_value(other),
    }
}

/// Replaces the values at `pointers` in `value` with [`REDACTED`].
pub fn redact_at(value: &mut Value, pointers: &[String]) {
    for pointer in pointers {
        if let Some(v) = value.pointer_mut(pointer) {
            *v = Value::String(REDACTED.into());
        }
    }
}

/// An event sink that hides every known secret from the one it wraps. The progress of an
/// operation whose outputs are sensitive (and its provider's own log lines meanwhile) is held
/// back until it ends: a secret it prints before returning it is known by then. If it ends
/// without returning them (a failure, an interrupt), what it printed is not shown at all.
pub struct Redacting {
    inner: Rc<dyn EventSink>,
    secrets: Rc<Secrets>,
    held: RefCell<Held>,
}

#[derive(Default)]
struct Held {
    /// Running operations held back: address → provider.
    running: std::collections::HashMap<String, String>,
    /// Their progress, and their providers' log lines, in order.
    events: Vec<Event>,
    /// Providers one of whose held operations ended without returning its outputs: their
    /// own log lines (which arrive on their own, maybe after the operation ended) are not
    /// shown this run.
    failed: std::collections::HashSet<String>,
}

impl EventSink for Redacting {
    fn emit(&self, event: Event) {
        if self.secrets.is_empty() {
            return self.inner.emit(event);
        }
        // Which held operation ended, and whether with its outputs.
        let mut ended: Option<(String, bool)> = None;
        match &event {
            Event::ResourceStart {
                address,
                provider,
                resource_type,
                ..
            } if self.secrets.holds(provider, resource_type, address) => {
                self.held
                    .borrow_mut()
                    .running
                    .insert(address.clone(), provider.clone());
            }
            Event::ResourceProgress { address, .. }
                if self.held.borrow().running.contains_key(address) =>
            {
                self.held.borrow_mut().events.push(event);
                return;
            }
            // A provider's own lines are not tied to an operation: those of a provider with
            // sensitive outputs wait for the end of the run.
            Event::ProviderLog { provider, .. }
                if self.secrets.holds_provider(provider)
                    || self.held.borrow().running.values().any(|p| p == provider) =>
            {
                self.held.borrow_mut().events.push(event);
                return;
            }
            Event::ResourceComplete { address, .. }
                if self.held.borrow_mut().running.remove(address).is_some() =>
            {
                ended = Some((address.clone(), true));
            }
            Event::ResourceFailed { address, .. } => {
                let mut held = self.held.borrow_mut();
                if let Some(provider) = held.running.remove(address) {
                    held.failed.insert(provider);
                    ended = Some((address.clone(), false));
                }
            }
            Event::Interrupted { .. } | Event::Summary { .. } => self.drop_held(),
            _ => {}
        }
        let mut event = event;
        if let Some((address, with_outputs)) = ended {
            self.release(&address, with_outputs);
            // What it printed, carried in its error (a command's last lines), is as unsafe to
            // show as its progress.
            if let Event::ResourceFailed { details, .. } = &mut event {
                if !with_outputs && !details.is_empty() {
                    *details = format!("{REDACTED}: {WHY_HIDDEN}");
                }
            }
        }
        if self.redact(&mut event) {
            self.inner.emit(event);
        }
    }
}

impl Drop for Redacting {
    /// Whatever ends the command (a state that cannot be written ends a run without its
    /// last events), nothing held is shown unredacted.
    fn drop(&mut self) {
        self.drop_held();
    }
}

impl Redacting {
    pub fn new(inner: Rc<dyn EventSink>, secrets: Rc<Secrets>) -> Self {
        Redacting {
            inner,
            secrets,
            held: RefCell::default(),
        }
    }

    /// What `address` held, once it ended: shown redacted if it returned its outputs (its
    /// secrets are known now), else replaced by a line saying so.
    fn release(&self, address: &str, with_outputs: bool) {
        let out: Vec<Event> = {
            let mut held = self.held.borrow_mut();
            let Held { events, .. } = &mut *held;
            // Only the operation's own progress: its provider's lines wait for the run's end.
            let (out, keep): (Vec<Event>, Vec<Event>) =
                std::mem::take(events).into_iter().partition(|e| match e {
                    Event::ResourceProgress { address: a, .. } => a == address,
                    _ => false,
                });
            *events = keep;
            out
        };
        if with_outputs {
            for mut e in out {
                if self.redact(&mut e) {
                    self.inner.emit(e);
                }
            }
        } else if !out.is_empty() {
            self.notice(address, out.len());
        }
    }

    /// At the end of the run: providers' lines shown (redacted) unless one of their held
    /// operations failed; what is held of operations that never ended, not shown.
    fn drop_held(&self) {
        let (held, failed) = {
            let mut held = self.held.borrow_mut();
            // An operation still running (interrupted) never returned its outputs either.
            let running: Vec<String> = held.running.drain().map(|(_, p)| p).collect();
            held.failed.extend(running);
            // Kept for the rest of the command: lines may still come as providers stop.
            (std::mem::take(&mut held.events), held.failed.clone())
        };
        let mut hidden = Vec::new();
        for mut e in held {
            match &e {
                Event::ProviderLog { provider, .. } if !failed.contains(provider) => {
                    if self.redact(&mut e) {
                        self.inner.emit(e);
                    }
                }
                _ => hidden.push(e),
            }
        }
        let held = hidden;
        let mut count: std::collections::BTreeMap<String, usize> = Default::default();
        for e in &held {
            let key = match e {
                Event::ResourceProgress { address, .. } => address.clone(),
                Event::ProviderLog { provider, .. } => format!("provider {provider}"),
                _ => continue,
            };
            *count.entry(key).or_default() += 1;
        }
        for (what, n) in count {
            self.notice(&what, n);
        }
    }

    fn notice(&self, what: &str, lines: usize) {
        self.inner.emit(Event::ProviderLog {
            provider: "capstan".into(),
            stream: capstan_schema::LogStream::Stderr,
            line: format!("{lines} line(s) of {what} not shown: {WHY_HIDDEN}"),
        });
    }

    /// Hides secrets in `event`; `false` when it cannot be shown safely at all.
    fn redact(&self, event: &mut Event) -> bool {
        let s = &self.secrets;
        match event {
            Event::ResourceProgress { progress, .. } => {
                // Every text a provider sent (messages, fields, log lines, names); only the
                // texts change, so the event reads back as the same kind.
                let Ok(mut value) = serde_json::to_value(&progress.kind) else {
                    return false;
                };
                let before = value.clone();
                s.scrub_strings(&mut value);
                if value != before {
                    match serde_json::from_value(value) {
                        Ok(kind) => progress.kind = kind,
                        // Never shown unredacted.
                        Err(_) => return false,
                    }
                }
            }
            Event::ResourceComplete { outputs, .. } => {
                let mut value = outputs.value();
                let before = value.clone();
                s.redact_value(&mut value);
                if value != before {
                    *outputs = capstan_schema::Json::from_value(&value);
                }
            }
            Event::ResourceFailed { error, details, .. } => {
                s.scrub_string(error);
                s.scrub_string(details);
            }
            Event::ResourceSkipped { reason, .. } => s.scrub_string(reason),
            Event::ProviderLog { line, .. } | Event::EvaluationLog { line, .. } => {
                s.scrub_string(line)
            }
            Event::EvaluationFailed { error, .. } => s.scrub_string(error),
            Event::Interrupted { message } | Event::Error { message, .. } => {
                s.scrub_string(message)
            }
            Event::Plan { changes } => {
                // Providers' planned outputs may hold a secret, as outputs do.
                if changes.iter().any(|c| c.planned.is_some()) {
                    for change in Rc::make_mut(changes).iter_mut() {
                        if let Some(planned) = change.planned.as_mut() {
                            s.redact_value(&mut planned.outputs);
                        }
                    }
                }
            }
            Event::ResourceStart { .. }
            | Event::EvaluationStart { .. }
            | Event::EvaluationComplete { .. }
            | Event::Deferred { .. }
            | Event::NotSelected { .. }
            | Event::Summary { .. } => {}
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_scrubbed_from_text_and_values() {
        let s = Secrets::default();
        s.add_value(&serde_json::json!({"pw": "hunter22", "n": 1234567, "short": "ab"}));
        assert_eq!(s.scrub("login hunter22 ok"), "login (sensitive) ok");
        assert_eq!(s.scrub("pin 1234567"), "pin (sensitive)");
        // Too short to search for in text, but redacted as a whole value.
        assert_eq!(s.scrub("ab cd"), "ab cd");
        let mut v = serde_json::json!({"a": "ab", "b": ["x hunter22 y"], "c": 1234567});
        s.redact_value(&mut v);
        assert_eq!(
            v,
            serde_json::json!({"a": REDACTED, "b": ["x (sensitive) y"], "c": REDACTED})
        );
        let mut found = Vec::new();
        s.pointers(
            &serde_json::json!({"a/b": "hunter22", "c": [0, "ab"]}),
            "/outputs",
            &mut found,
        );
        assert_eq!(found, ["/outputs/a~1b", "/outputs/c/1"]);
    }

    #[test]
    fn a_secret_with_quotes_is_found_inside_json_text() {
        let s = Secrets::default();
        s.add_text("p\"ss\\word");
        assert_eq!(s.scrub(r#"{"x":"p\"ss\\word"}"#), r#"{"x":"(sensitive)"}"#);
    }
}
