//! The deployment: providers, resources, and the data flowing between them, read from JSON and
//! checked before anything runs. Every error names the file and the place in it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use capstan_schema::Json;
use capstan_schema::ProviderInfo;

use crate::maps::AddressMap;
use crate::strict_json::{self, printable, StrictError};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// A problem with the deployment, found before anything ran.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {}: {message}", .file.display(), printable(.place))]
pub struct ModelError {
    pub file: PathBuf,
    /// Where in the file, e.g. `resources.web.db.inputs.content`.
    pub place: String,
    pub message: String,
}

/// Where a provider comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderSourceDecl {
    /// Shipped inside `capstan`, run out of process by re-executing it.
    Builtin(String),
    /// A program, resolved relative to the deployment file or on PATH.
    Executable { program: String, args: Vec<String> },
    /// A provider service listening at this socket, served by user `owner` (a uid), or by
    /// this user or root when the deployment names none.
    Socket { path: PathBuf, owner: Option<u32> },
}

/// A provider as the deployment declares it.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderDecl {
    pub name: String,
    pub source: ProviderSourceDecl,
    /// Overrides the provider's own limit.
    pub max_concurrency: Option<u32>,
    /// Per-operation timeout.
    pub timeout: Option<std::time::Duration>,
    /// `Some("nixops4-v0")` for a NixOps4 version-0 provider, run through the bridge.
    pub protocol: Option<String>,
    /// The largest message to and from this provider, in MiB (default 16).
    pub max_message_mib: Option<u32>,
    /// For a NixOps4 v0 provider: the types NixOps4 keeps no state for (`requireState =
    /// false`), created again instead of updated.
    pub stateless_types: Vec<String>,
    /// For a Terraform provider: its provider block's configuration (JSON), parameters
    /// filled in.
    pub terraform_config: Option<Value>,
    /// Values of `terraform_config` marked `{"$sensitive": …}`.
    pub sensitive: Vec<Value>,
    /// The outputs `terraform_config` refers to (`{"$ref": …}`, left in it): filled in from
    /// the state when the provider starts, so each must be recorded and left unchanged by the
    /// run.
    pub config_refs: Vec<OutputRef>,
}

/// The largest message limit a deployment or flag may ask for, in MiB.
pub const MAX_MESSAGE_MIB: u32 = 1024;

/// The longest time Capstan accepts for a timeout or a wait: a year.
pub const MAX_SECONDS: f64 = 365.0 * 24.0 * 3600.0;

/// Checks a number of seconds a user gave (a flag or a deployment's `timeout`): finite, at
/// least a millisecond (or 0 itself and more where `zero_ok`), at most `MAX_SECONDS`. The error completes a sentence
/// that starts with what was given, e.g. "`timeout` must be …".
pub fn seconds(value: f64, zero_ok: bool) -> Result<std::time::Duration, String> {
    // A time limit shorter than a millisecond is no limit anyone means (1e-10 would round
    // to nothing, and fail every operation at once).
    let low_ok = if zero_ok {
        value >= 0.0
    } else {
        value >= 0.001
    };
    if !(value.is_finite() && low_ok && value <= MAX_SECONDS) {
        let low = if zero_ok {
            "0 or more"
        } else {
            "at least 0.001"
        };
        return Err(format!(
            "must be a number of seconds, {low} and at most {MAX_SECONDS} (a year); got {value:?}"
        ));
    }
    Ok(std::time::Duration::from_secs_f64(value))
}

/// The largest deployment file read (ten million small resources fit): a path that is not one
/// (`-f /dev/zero`) is an error, not all the memory there is.
pub const DEPLOYMENT_LIMIT: u64 = 1 << 30;
/// The largest file of parameters, secrets or inputs read.
pub const VALUES_LIMIT: u64 = 64 << 20;

/// Reads `reader` whole as text, up to `limit` bytes: more is an error that says so.
pub fn read_capped(reader: impl std::io::Read, limit: u64) -> std::io::Result<String> {
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut reader.take(limit + 1), &mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "it is larger than {} MiB; is it the file you meant?",
                limit >> 20
            ),
        ));
    }
    String::from_utf8(bytes).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "stream did not contain valid UTF-8",
        )
    })
}

/// [`read_capped`] of the file at `path`.
pub fn read_file_capped(path: &Path, limit: u64) -> std::io::Result<String> {
    read_capped(std::fs::File::open(path)?, limit)
}

/// The one foreign provider protocol Capstan bridges to.
pub const NIXOPS4_V0: &str = "nixops4-v0";
/// A Terraform provider binary, unchanged, through Capstan's bridge.
pub const TERRAFORM: &str = "terraform";

/// The environment variable that carries a Terraform provider's configuration (JSON) to the
/// bridge (`capstan __provider terraform`).
pub const TERRAFORM_CONFIG_ENV: &str = "CAPSTAN_TERRAFORM_CONFIG";

/// A reference from a resource's inputs to another resource's output.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct OutputRef {
    pub address: String,
    pub output: String,
}

/// A capability another resource returned, handed to this one under `input`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapabilityRef {
    pub input: String,
    pub address: String,
    pub name: String,
}

/// A resource as the deployment declares it.
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceDecl {
    pub address: String,
    pub provider: String,
    pub resource_type: String,
    /// The inputs (a JSON object, kept as text) with parameters substituted and capabilities
    /// taken out; `{"$ref": …}` objects stay until resolved.
    pub inputs: Json,
    pub refs: Vec<OutputRef>,
    pub capabilities: Vec<CapabilityRef>,
    /// What it depends on (references and capabilities), as indices into
    /// `Deployment::resources`, sorted, each once.
    pub depends_on: Vec<u32>,
    /// Output names declared by the deployment (required for NixOps4 v0 resources, whose
    /// providers have no handshake to tell).
    pub outputs: Option<Vec<String>>,
    /// Whether `inputs` holds escaped keys (`$$…` for a literal `$…`), which `resolve`
    /// unescapes.
    pub escaped: bool,
    /// For a deployment in Nix: the resources whose outputs its inputs were computed from
    /// (already in `inputs` as values), so it is still recorded as depending on them.
    pub uses: Vec<String>,
    /// Values the deployment marked `{"$sensitive": …}` (parameters filled in; a `$ref`
    /// inside stays a marker, and the output it names is sensitive).
    pub sensitive: Vec<Value>,
    /// Its tags (`"tags": ["web"]`), which `--target @web` selects by.
    pub tags: Vec<String>,
}

impl ProviderDecl {
    /// Its Terraform settings with each `{"$ref": …}` replaced by the output `outputs` gives
    /// and escaped keys (`$$…`) undone, as a resource's inputs are; `None` without settings
    /// or when an output is not known.
    pub fn settings<'a>(
        &self,
        outputs: &dyn Fn(&str, &str) -> Option<&'a RawValue>,
    ) -> Option<Value> {
        resolve_tree(self.terraform_config.clone()?, outputs)
    }
}

impl ResourceDecl {
    /// Every resource this one depends on, in address order, each once.
    pub fn dependencies(&self) -> Vec<String> {
        let mut addresses: Vec<&str> = self
            .refs
            .iter()
            .map(|r| r.address.as_str())
            .chain(self.capabilities.iter().map(|c| c.address.as_str()))
            .chain(self.uses.iter().map(String::as_str))
            .collect();
        addresses.sort_unstable();
        addresses.dedup();
        addresses.into_iter().map(str::to_string).collect()
    }

    /// The inputs with every `{"$ref": "ADDRESS#OUTPUT"}` replaced by the output's value (as
    /// JSON text); `None` when an output is not known (yet). Without references, the inputs
    /// as they are.
    ///
    /// Works on the text: inputs with references are kept in serde_json's compact form, where
    /// a reference is exactly `{"$ref":"…"}` and that sequence cannot occur inside a string
    /// (its quotes would be escaped), so each is replaced by the output's text in one pass.
    pub fn resolve<'a>(
        &self,
        outputs: &dyn Fn(&str, &str) -> Option<&'a RawValue>,
    ) -> Option<Json> {
        if self.escaped {
            // Rare: through a tree, so that only the deployment's own keys are unescaped
            // (never an output's).
            return resolve_tree(self.inputs.value(), outputs).map(Json::from);
        }
        self.splice(outputs)
    }

    /// The input names, as the provider sees them (escapes undone).
    pub fn input_names(&self) -> Vec<String> {
        let mut keys = self.inputs.keys();
        if self.escaped {
            for key in &mut keys {
                *key = unescape_key(key).to_string();
            }
        }
        keys
    }

    fn splice<'a>(&self, outputs: &dyn Fn(&str, &str) -> Option<&'a RawValue>) -> Option<Json> {
        if self.refs.is_empty() {
            return Some(self.inputs.clone());
        }
        const MARK: &str = "{\"$ref\":\"";
        let text = self.inputs.text();
        let mut out = String::with_capacity(text.len() + 16 * self.refs.len());
        let mut rest = text;
        while let Some(at) = rest.find(MARK) {
            let string_start = at + MARK.len() - 1;
            let string_len = json_string_len(&rest[string_start..])?;
            let string_end = string_start + string_len;
            if !rest[string_end..].starts_with('}') {
                // An object whose first key is `$ref` but has more: not a reference.
                out.push_str(&rest[..string_end]);
                rest = &rest[string_end..];
                continue;
            }
            let target: std::borrow::Cow<str> =
                serde_json::from_str(&rest[string_start..string_end]).ok()?;
            let (address, output) = target.split_once('#')?;
            out.push_str(&rest[..at]);
            out.push_str(outputs(address, output)?.get());
            rest = &rest[string_end + 1..];
        }
        out.push_str(rest);
        Some(Json::from_spliced(out).expect("replacing whole values by values keeps JSON valid"))
    }

    /// Where `reference` sits in the inputs, for messages (`resources.ADDRESS.inputs.…`).
    pub fn place_of(&self, reference: &OutputRef) -> String {
        let target = format!("{}#{}", reference.address, reference.output);
        let mut place = format!("resources.{}.inputs", self.address);
        let len = place.len();
        // The walk stops at the reference, with the place it found it at.
        match walk(&self.inputs.value(), &mut place, &mut |value, place| {
            if marker(value, "$ref") == Some(target.as_str()) {
                Err(place.to_string())
            } else {
                Ok(true)
            }
        }) {
            Err(found) => found,
            Ok(()) => {
                place.truncate(len);
                place
            }
        }
    }
}

/// A whole deployment.
#[derive(Debug, Clone)]
pub struct Deployment {
    pub file: PathBuf,
    pub providers: BTreeMap<String, ProviderDecl>,
    /// In address order.
    pub resources: AddressMap<ResourceDecl>,
}

impl Deployment {
    /// The directory relative paths are resolved against, absolute (so that a path joined
    /// to it is not resolved against a working directory a second time).
    pub fn dir(&self) -> PathBuf {
        dir_of(&self.file)
    }

    /// Reads only the providers a deployment file declares: what `destroy` needs to delete
    /// what the state holds, even when the resources no longer read (a parameter left out, a
    /// resource half-edited).
    pub fn load_providers(file: &Path, params: &Map<String, Value>) -> Result<Self, ModelError> {
        let text = read_file_capped(file, DEPLOYMENT_LIMIT).map_err(|e| ModelError {
            file: file.to_path_buf(),
            place: "(file)".into(),
            message: format!("cannot read it: {e}"),
        })?;
        let err = |place: &str, message: String| ModelError {
            file: file.to_path_buf(),
            place: place.to_string(),
            message,
        };
        let members = capstan_schema::json::object_members(&text).map_err(|_| {
            err(
                "(top level)",
                "a deployment is a JSON object with `providers` and `resources`".into(),
            )
        })?;
        let mut deployment = Deployment {
            file: file.to_path_buf(),
            providers: BTreeMap::new(),
            resources: AddressMap::default(),
        };
        if let Some((_, decls)) = members.iter().find(|(k, _)| k == "providers") {
            deployment.providers =
                parse_providers(decls, params).map_err(|(place, m)| err(&place, m))?;
        }
        Ok(deployment)
    }

    /// Reads and checks a deployment file. `params` fills `{"$param": NAME}`.
    pub fn load(file: &Path, params: &Map<String, Value>) -> Result<Self, ModelError> {
        let text = read_file_capped(file, DEPLOYMENT_LIMIT).map_err(|e| ModelError {
            file: file.to_path_buf(),
            place: "(file)".into(),
            message: format!("cannot read it: {e}"),
        })?;
        Self::parse(file, &text, params)
    }

    /// Parses and checks a deployment given as text.
    pub fn parse(file: &Path, text: &str, params: &Map<String, Value>) -> Result<Self, ModelError> {
        let err = |place: &str, message: String| ModelError {
            file: file.to_path_buf(),
            place: place.to_string(),
            message,
        };
        // Read one resource at a time from its raw text: a tree of every resource at once would
        // cost more memory than the deployment itself. Reading the top level checks the syntax of
        // the whole document (raw values are checked as they are taken).
        let members = capstan_schema::json::object_members(text).map_err(|e| {
            if let Err(e) = serde_json::from_str::<&RawValue>(text) {
                // Not JSON at all: say where.
                return err(
                    &format!("line {} column {}", e.line(), e.column()),
                    format!("not valid JSON: {e}"),
                );
            }
            let _ = e;
            err(
                "(top level)",
                "a deployment is a JSON object with `providers` and `resources`".into(),
            )
        })?;
        strict_json::check_unique(members.iter().map(|(k, _)| k.as_str()))
            .map_err(|e| err("(top level)", e.to_string()))?;
        let root: BTreeMap<String, &RawValue> = members.into_iter().collect();
        for key in root.keys() {
            if key != "providers" && key != "resources" && key != "$schema" && key != "state" {
                return Err(err(
                    key,
                    "unknown key; a deployment has `providers`, `resources` and `state`".into(),
                ));
            }
        }
        // Where the state is kept: read by the command before the deployment (see the CLI's
        // `Place::store`); checked here so that a mistake in it is found.
        if let Some(state) = root.get("state") {
            if file.extension().is_some_and(|e| e == "nix") {
                return Err(err(
                    "state",
                    "a deployment in Nix cannot choose where its state is (the state is read before it is evaluated): give --state or CAPSTAN_STATE".into(),
                ));
            }
            match serde_json::from_str::<Value>(state.get()) {
                Ok(Value::String(text)) if !text.trim().is_empty() => {}
                _ => {
                    return Err(err(
                        "state",
                        "must be a directory or a postgres:// URL, as a string (keep the password out of it: PGPASSWORD or ~/.pgpass)".into(),
                    ))
                }
            }
        }
        let providers = match root.get("providers") {
            Some(decls) => parse_providers(decls, params).map_err(|(place, m)| err(&place, m))?,
            None => BTreeMap::new(),
        };
        let mut resources = AddressMap::default();
        if let Some(group) = root.get("resources") {
            collect_resources(group, "", params, &mut resources)
                .map_err(|(place, m)| err(&place, m))?;
        }
        resources.sort_unstable_keys();
        // A resource waits for what its provider's settings refer to (and is deleted before
        // it): they are handed to the provider before its first operation.
        for (name, decl) in &providers {
            for r in &decl.config_refs {
                if !resources.contains_key(&r.address) {
                    return Err(err(
                        &format!("providers.{}.config", printable(name)),
                        missing_resource(&resources, &r.address, "refers to"),
                    ));
                }
            }
            if decl.config_refs.is_empty() {
                continue;
            }
            for resource in resources.values_mut().filter(|res| &res.provider == name) {
                for r in &decl.config_refs {
                    if !resource.refs.contains(r) {
                        resource.refs.push(r.clone());
                    }
                }
            }
        }
        let mut deployment = Deployment {
            file: file.to_path_buf(),
            providers,
            resources,
        };
        deployment
            .check_static()
            .map_err(|(place, m)| err(&place, m))?;
        link_dependencies(&mut deployment.resources).map_err(|(place, m)| err(&place, m))?;
        if let Some(cycle) = deployment.find_cycle() {
            return Err(err(
                "resources",
                format!("dependency cycle: {}", cycle.join(" -> ")),
            ));
        }
        Ok(deployment)
    }

    fn check_static(&self) -> Result<(), (String, String)> {
        for r in self.resources.values() {
            // Made only for an error: a string per resource otherwise.
            let place = || format!("resources.{}", r.address);
            if !self.providers.contains_key(&r.provider) {
                let known: Vec<&str> = self.providers.keys().map(String::as_str).collect();
                return Err((
                    format!("{}.provider", place()),
                    format!(
                        "unknown provider `{}`; declared providers: {}",
                        r.provider,
                        list(&known)
                    ),
                ));
            }
            let v0 = self.providers[&r.provider].protocol.as_deref() == Some(NIXOPS4_V0);
            if v0 && r.outputs.is_none() {
                return Err((
                    format!("{}.outputs", place()),
                    format!(
                        "missing: `{}` speaks NixOps4 v0, which cannot describe itself; list this resource's output names, e.g. \"outputs\": [\"value\"]",
                        r.provider
                    ),
                ));
            }
            // References to resources the deployment lacks: `link_dependencies`.
        }
        Ok(())
    }

    /// A dependency cycle, as a path that starts and ends at the same address.
    pub fn find_cycle(&self) -> Option<Vec<String>> {
        // Work on indices: one lookup per edge up front, then plain vectors.
        let addresses: Vec<&str> = self.resources.keys().map(String::as_str).collect();
        let edges: Vec<&[u32]> = self
            .resources
            .values()
            .map(|r| r.depends_on.as_slice())
            .collect();
        const NEW: u8 = 0;
        const VISITING: u8 = 1;
        const DONE: u8 = 2;
        let mut marks = vec![NEW; addresses.len()];
        for start in 0..addresses.len() {
            if marks[start] != NEW {
                continue;
            }
            // Iterative DFS keeping the path, so deep graphs cannot overflow the stack.
            let mut path: Vec<(usize, usize)> = vec![(start, 0)];
            marks[start] = VISITING;
            while let Some((node, next_edge)) = path.last_mut() {
                let node = *node;
                match edges[node].get(*next_edge) {
                    Some(&next) => {
                        let next = next as usize;
                        *next_edge += 1;
                        match marks[next] {
                            VISITING => {
                                let mut cycle: Vec<String> = path
                                    .iter()
                                    .map(|(n, _)| *n)
                                    .skip_while(|n| *n != next)
                                    .map(|n| addresses[n].to_string())
                                    .collect();
                                cycle.push(addresses[next].to_string());
                                return Some(cycle);
                            }
                            NEW => {
                                marks[next] = VISITING;
                                path.push((next, 0));
                            }
                            _ => {}
                        }
                    }
                    None => {
                        marks[node] = DONE;
                        path.pop();
                    }
                }
            }
        }
        None
    }

    /// Checks resources against their providers' handshakes: the type exists, every input is
    /// known, every required input is set, and every reference names a declared output.
    pub fn check_against(&self, infos: &BTreeMap<String, ProviderInfo>) -> Result<(), ModelError> {
        let err = |place: String, message: String| ModelError {
            file: self.file.clone(),
            place,
            message,
        };
        for r in self.resources.values() {
            // Made only for an error: a string per resource otherwise.
            let place = || format!("resources.{}", r.address);
            let Some(info) = infos.get(&r.provider) else {
                continue;
            };
            let Some(rtype) = info.resource_type(&r.resource_type) else {
                let known: Vec<&str> = info
                    .resource_types
                    .iter()
                    .map(|t| t.name.as_str())
                    .collect();
                return Err(err(
                    format!("{}.type", place()),
                    format!(
                        "provider `{}` has no resource type `{}`; it serves: {}",
                        r.provider,
                        r.resource_type,
                        list(&known)
                    ),
                ));
            };
            let keys = r.input_names();
            for key in keys.iter().filter(|_| !rtype.open_inputs) {
                if !rtype.inputs.iter().any(|i| &i.name == key) {
                    let known: Vec<&str> = rtype.inputs.iter().map(|i| i.name.as_str()).collect();
                    return Err(err(
                        format!("{}.inputs.{key}", place()),
                        format!(
                            "`{}` has no input `{key}`; its inputs: {}",
                            r.resource_type,
                            list(&known)
                        ),
                    ));
                }
            }
            for input in rtype.inputs.iter().filter(|i| i.required) {
                if !keys.contains(&input.name) {
                    return Err(err(
                        format!("{}.inputs", place()),
                        format!(
                            "missing required input `{}` of `{}`",
                            input.name, r.resource_type
                        ),
                    ));
                }
            }
            for reference in &r.refs {
                let target = &self.resources[&reference.address];
                if let Some(declared) = &target.outputs {
                    if !declared.contains(&reference.output) {
                        return Err(err(
                            r.place_of(reference),
                            format!(
                                "`{}` declares no output `{}`; its declared outputs: {}",
                                reference.address,
                                reference.output,
                                list(&declared.iter().map(String::as_str).collect::<Vec<_>>())
                            ),
                        ));
                    }
                    continue;
                }
                let Some(target_info) = infos.get(&target.provider) else {
                    continue;
                };
                let Some(target_type) = target_info.resource_type(&target.resource_type) else {
                    continue;
                };
                if !target_type
                    .outputs
                    .iter()
                    .any(|o| o.name == reference.output)
                {
                    let known: Vec<&str> = target_type
                        .outputs
                        .iter()
                        .map(|o| o.name.as_str())
                        .collect();
                    return Err(err(
                        r.place_of(reference),
                        format!(
                            "`{}` (a `{}`) has no output `{}`; its outputs: {}",
                            reference.address,
                            target.resource_type,
                            reference.output,
                            list(&known)
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

fn list(items: &[&str]) -> String {
    if items.is_empty() {
        "(none)".into()
    } else {
        items.join(", ")
    }
}

/// The directory a deployment file's relative paths (and its default state) are resolved
/// against, absolute (so that a path joined to it is not resolved against a working directory
/// a second time).
pub fn dir_of(file: &Path) -> PathBuf {
    let dir = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    std::path::absolute(&dir).unwrap_or(dir)
}

mod markers;
mod read;
#[cfg(test)]
mod tests;

use markers::*;
use read::*;
