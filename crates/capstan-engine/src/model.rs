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
    /// A provider service listening at this socket.
    Socket(PathBuf),
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

/// Checks a number of seconds a user gave (a flag or a deployment's `timeout`): finite, more
/// than 0 (or 0 itself where `zero_ok`), at most `MAX_SECONDS`. The error completes a sentence
/// that starts with what was given, e.g. "`timeout` must be …".
pub fn seconds(value: f64, zero_ok: bool) -> Result<std::time::Duration, String> {
    let low_ok = if zero_ok { value >= 0.0 } else { value > 0.0 };
    if !(value.is_finite() && low_ok && value <= MAX_SECONDS) {
        let low = if zero_ok { "0 or more" } else { "above 0" };
        return Err(format!(
            "must be a number of seconds, {low} and at most {MAX_SECONDS} (a year); got {value:?}"
        ));
    }
    Ok(std::time::Duration::from_secs_f64(value))
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
        let text = std::fs::read_to_string(file).map_err(|e| ModelError {
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
        let text = std::fs::read_to_string(file).map_err(|e| ModelError {
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
            if key != "providers" && key != "resources" && key != "$schema" {
                return Err(err(
                    key,
                    "unknown key; a deployment has `providers` and `resources`".into(),
                ));
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
            let place = format!("resources.{}", r.address);
            if !self.providers.contains_key(&r.provider) {
                let known: Vec<&str> = self.providers.keys().map(String::as_str).collect();
                return Err((
                    format!("{place}.provider"),
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
                    format!("{place}.outputs"),
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
            let place = format!("resources.{}", r.address);
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
                    format!("{place}.type"),
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
                        format!("{place}.inputs.{key}"),
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
                        format!("{place}.inputs"),
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

fn parse_providers(
    decls: &RawValue,
    params: &Map<String, Value>,
) -> Result<BTreeMap<String, ProviderDecl>, (String, String)> {
    let decls = match strict_json::parse(decls.get()) {
        Ok(Value::Object(decls)) => decls,
        Ok(_) => {
            return Err((
                "providers".into(),
                "must be an object of provider declarations".into(),
            ))
        }
        Err(e) => return Err(("providers".into(), e.to_string())),
    };
    let mut providers = BTreeMap::new();
    for (name, decl) in &decls {
        let place = format!("providers.{}", printable(name));
        providers.insert(
            name.clone(),
            parse_provider(name, decl, params).map_err(|m| (place, m))?,
        );
    }
    Ok(providers)
}

fn parse_provider(
    name: &str,
    decl: &Value,
    params: &Map<String, Value>,
) -> Result<ProviderDecl, String> {
    let Value::Object(decl) = decl else {
        return Err("must be an object with `builtin`, `executable` or `socket`".into());
    };
    for key in decl.keys() {
        if ![
            "builtin",
            "executable",
            "args",
            "socket",
            "maxConcurrency",
            "timeout",
            "protocol",
            "maxMessageMiB",
            "statelessTypes",
            "config",
        ]
        .contains(&key.as_str())
        {
            return Err(format!("unknown key `{key}`"));
        }
    }
    let text = |key: &str| decl.get(key).and_then(Value::as_str).map(str::to_string);
    let sources = ["builtin", "executable", "socket"]
        .iter()
        .filter(|k| decl.contains_key(**k))
        .count();
    if sources != 1 {
        return Err("give exactly one of `builtin`, `executable` or `socket`".into());
    }
    let source = if let Some(builtin) = text("builtin") {
        ProviderSourceDecl::Builtin(builtin)
    } else if let Some(program) = text("executable") {
        let args = match decl.get("args") {
            None => Vec::new(),
            Some(Value::Array(args)) => args
                .iter()
                .map(|a| {
                    a.as_str()
                        .map(str::to_string)
                        .ok_or("`args` must be a list of strings".to_string())
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err("`args` must be a list of strings".into()),
        };
        ProviderSourceDecl::Executable { program, args }
    } else if let Some(socket) = text("socket") {
        ProviderSourceDecl::Socket(PathBuf::from(socket))
    } else {
        return Err("`builtin`, `executable` and `socket` take a string".into());
    };
    let max_concurrency = match decl.get("maxConcurrency") {
        None => None,
        Some(v) => Some(
            v.as_u64()
                .filter(|n| *n > 0 && *n <= u32::MAX as u64)
                .ok_or("`maxConcurrency` must be a positive integer")? as u32,
        ),
    };
    let timeout = match decl.get("timeout") {
        None => None,
        Some(v) => Some(
            v.as_f64()
                .ok_or_else(|| format!("`timeout` must be a number of seconds, not {v}"))
                .and_then(|t| seconds(t, false).map_err(|e| format!("`timeout` {e}")))?,
        ),
    };
    let max_message_mib = match decl.get("maxMessageMiB") {
        None => None,
        Some(v) => Some(
            v.as_u64()
                .filter(|n| (1..=MAX_MESSAGE_MIB as u64).contains(n))
                .ok_or(format!(
                    "`maxMessageMiB` must be a whole number of MiB from 1 to {MAX_MESSAGE_MIB}"
                ))? as u32,
        ),
    };
    let stateless_types = match decl.get("statelessTypes") {
        None => Vec::new(),
        Some(v) => serde_json::from_value::<Vec<String>>(v.clone())
            .map_err(|_| "`statelessTypes` must be a list of type names".to_string())?,
    };
    if !stateless_types.is_empty() && decl.get("protocol").is_none() {
        return Err(format!(
            "`statelessTypes` is for a `\"protocol\": \"{NIXOPS4_V0}\"` provider (Capstan providers update their resources)"
        ));
    }
    let protocol = match decl.get("protocol") {
        None => None,
        Some(Value::String(p)) if p == TERRAFORM => {
            if !matches!(source, ProviderSourceDecl::Executable { .. }) {
                return Err(format!(
                    "a `{TERRAFORM}` provider is an `executable` (the provider binary)"
                ));
            }
            Some(p.clone())
        }
        Some(Value::String(p)) if p == NIXOPS4_V0 => {
            if !matches!(source, ProviderSourceDecl::Executable { .. }) {
                return Err(format!("a `{NIXOPS4_V0}` provider is an `executable` (it is started once per operation)"));
            }
            Some(p.clone())
        }
        Some(other) => {
            return Err(format!(
            "unknown `protocol` {other}; those supported are \"{NIXOPS4_V0}\" and \"{TERRAFORM}\""
        ))
        }
    };
    let terraform_config = match decl.get("config") {
        None => None,
        Some(_) if protocol.as_deref() != Some(TERRAFORM) => {
            return Err(format!(
                "`config` is for a `\"protocol\": \"{TERRAFORM}\"` provider (its provider block)"
            ))
        }
        Some(Value::Object(config)) => Some(Value::Object(config.clone())),
        Some(_) => return Err("`config` must be an object (the provider block's settings)".into()),
    };
    // Parameters are filled in and secrets marked as in any input; references are to outputs
    // the state holds (a provider starts before the run makes anything).
    let mut sensitive = Vec::new();
    let mut config_refs = Vec::new();
    let terraform_config = match terraform_config {
        None => None,
        Some(config) => {
            let (mut refs, mut escaped) = (Vec::new(), false);
            let mut place = "config".to_string();
            let config = substitute(
                config,
                &mut place,
                Some(params),
                &mut refs,
                &mut escaped,
                &mut sensitive,
            )
            .map_err(|(place, m)| format!("{place}: {m}"))?;
            config_refs = refs;
            Some(config)
        }
    };
    Ok(ProviderDecl {
        name: name.to_string(),
        source,
        max_concurrency,
        timeout,
        protocol,
        max_message_mib,
        stateless_types,
        terraform_config,
        sensitive,
        config_refs,
    })
}

fn collect_resources(
    group: &RawValue,
    prefix: &str,
    params: &Map<String, Value>,
    out: &mut AddressMap<ResourceDecl>,
) -> Result<(), (String, String)> {
    let group_place = if prefix.is_empty() {
        "resources".to_string()
    } else {
        format!("resources.{prefix}.resources")
    };
    let group = capstan_schema::json::object_members(group.get()).map_err(|_| {
        (
            group_place.clone(),
            "must be an object of resources and groups".to_string(),
        )
    })?;
    if let Err(e) = strict_json::check_unique(group.iter().map(|(k, _)| k.as_str())) {
        let StrictError::DuplicateKey(name) = e else {
            return Err((group_place, e.to_string()));
        };
        let address = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}.{name}")
        };
        return Err((
            format!("resources.{address}"),
            "declared twice in the same group; give each resource or group its own name"
                .to_string(),
        ));
    }
    if group.len() < PARALLEL_FROM {
        return collect_members(group, prefix, params, out);
    }
    // A large group is read in two halves at once (the machine's other core is idle while a
    // deployment loads), then joined in document order: the same map, the same first error.
    let total = group.len();
    let second = group[total / 2..].to_vec();
    let mut first = group;
    first.truncate(total - second.len());
    let (a, b) = std::thread::scope(|scope| {
        let later = scope.spawn(|| {
            let mut part = AddressMap::default();
            collect_members(second, prefix, params, &mut part).map(|()| part)
        });
        // Room for both halves, so the second is appended without moving the first.
        let mut part = AddressMap::with_capacity_and_hasher(total, Default::default());
        let earlier = collect_members(first, prefix, params, &mut part).map(|()| part);
        (earlier, later.join())
    });
    let mut a = a?;
    let b = match b {
        Ok(result) => result?,
        Err(panic) => std::panic::resume_unwind(panic),
    };
    a.extend(b);
    if out.is_empty() {
        *out = a;
    } else {
        out.extend(a);
    }
    Ok(())
}

/// From how many resources in one group reading them is split across two threads.
const PARALLEL_FROM: usize = 4096;

/// Reads the members of one group (resources and nested groups) into `out`.
fn collect_members(
    group: Vec<(String, &RawValue)>,
    prefix: &str,
    params: &Map<String, Value>,
    out: &mut AddressMap<ResourceDecl>,
) -> Result<(), (String, String)> {
    out.reserve(group.len());
    for (name, decl) in group {
        let bad_name = bad_name(&name);
        let address = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}.{name}")
        };
        // Only messages need it.
        let place = || format!("resources.{}", printable(&address));
        if let Some(problem) = bad_name {
            return Err((place(), problem));
        }
        let decl = match capstan_schema::json::object_members(decl.get()) {
            Ok(decl) => decl,
            Err(_) => {
                return Err((
                    place(),
                    "must be an object: a resource (`provider`, `type`, `inputs`) or a group (`resources`)".into(),
                ))
            }
        };
        strict_json::check_unique(decl.iter().map(|(k, _)| k.as_str()))
            .map_err(|e| (place(), e.to_string()))?;
        let field = |key: &str| decl.iter().find(|(k, _)| k == key).map(|(_, v)| *v);
        if let (Some(group), None) = (field("resources"), field("provider")) {
            collect_resources(group, &address, params, out)?;
            continue;
        }
        for (key, _) in &decl {
            if !["provider", "type", "inputs", "outputs"].contains(&key.as_str()) {
                return Err((
                    format!("{}.{key}", place()),
                    "unknown key; a resource has `provider`, `type`, `inputs` and `outputs` (a group has only `resources`)".into(),
                ));
            }
        }
        let text = |key: &str, missing: &str| -> Result<String, (String, String)> {
            let at = || format!("{}.{key}", place());
            match field(key) {
                None => Err((at(), format!("missing: {missing}"))),
                Some(raw) => serde_json::from_str::<String>(raw.get()).map_err(|_| {
                    (
                        at(),
                        format!("must be a string ({missing}), not {}", raw.get()),
                    )
                }),
            }
        };
        let provider = text("provider", "name the provider that manages it")?;
        let resource_type = text("type", "name the resource type")?;
        let outputs = match field("outputs") {
            None => None,
            Some(raw) => Some(serde_json::from_str::<Vec<String>>(raw.get()).map_err(|_| {
                (
                    format!("{}.outputs", place()),
                    "must be a list of output names".to_string(),
                )
            })?),
        };
        let raw_inputs = field("inputs");
        let inputs = match raw_inputs.map(|raw| strict_json::parse(raw.get())) {
            None => Map::new(),
            Some(Ok(Value::Object(inputs))) => inputs,
            Some(Ok(other)) => {
                return Err((
                    format!("{}.inputs", place()),
                    format!(
                        "must be an object of input names to values, not {}",
                        kind_of(&other)
                    ),
                ))
            }
            Some(Err(e)) => return Err((format!("{}.inputs", place()), e.to_string())),
        };
        let mut refs = Vec::new();
        let mut capabilities = Vec::new();
        let mut escaped = false;
        let mut sensitive = Vec::new();
        // `$ref`, `$param`, `$cap` and `$$` escapes need a `$` in the text, written as is or
        // escaped: without one, the inputs are plain data and are kept as they are.
        let markers = raw_inputs.is_some_and(|raw| {
            let text = raw.get();
            text.contains('$') || text.contains("\\u0024")
        });
        let resolved = if !markers {
            inputs
        } else {
            let mut resolved = Map::with_capacity(inputs.len());
            let mut input_place = String::new();
            // The place within the resource, made whole only for a message.
            let whole =
                |(within, message): (String, String)| (format!("{}{within}", place()), message);
            input_place.push_str(".inputs");
            if let Some(problem) = marker_problem(&inputs, MarkerUse::InputsObject) {
                return Err(whole((input_place, problem)));
            }
            for (key, value) in inputs {
                input_place.truncate(".inputs".len());
                input_place.push('.');
                input_place.push_str(&key);
                escaped |= key.starts_with("$$");
                if let Value::Object(map) = &value {
                    if let Some(problem) = marker_problem(map, MarkerUse::InputValue) {
                        return Err(whole((input_place, problem)));
                    }
                    if let Some(Value::String(target)) = map.get("$cap") {
                        let (address, name) =
                            split_ref(target, &input_place, "NAME").map_err(whole)?;
                        capabilities.push(CapabilityRef {
                            input: unescape_key(&key).to_string(),
                            address,
                            name,
                        });
                        continue;
                    }
                }
                let value = substitute(
                    value,
                    &mut input_place,
                    Some(params),
                    &mut refs,
                    &mut escaped,
                    &mut sensitive,
                )
                .map_err(whole)?;
                resolved.insert(key, value);
            }
            resolved
        };
        // Kept as text, always in serde_json's compact form: `resolve` relies on it, and
        // every input reaches a provider the same way. Escaped keys (`$$…`) stay escaped here,
        // so no literal can look like a reference, until `resolve` unescapes them.
        let inputs = Json::from(Value::Object(resolved));
        out.insert(
            address.clone(),
            ResourceDecl {
                address,
                provider,
                resource_type,
                inputs,
                refs,
                capabilities,
                depends_on: Vec::new(),
                outputs,
                escaped,
                uses: Vec::new(),
                sensitive,
            },
        );
    }
    Ok(())
}

/// Why `name` cannot name a resource or group, if it cannot.
fn bad_name(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("a resource name must not be empty".into());
    }
    if name.contains(['.', '#']) {
        return Some(
            "a resource name must not contain `.` or `#` (they separate groups and outputs in addresses)"
                .into(),
        );
    }
    if name.chars().any(char::is_control) {
        return Some(
            "a resource name must not contain control characters (line breaks, tabs, escape sequences)"
                .into(),
        );
    }
    None
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The markers an object may be: `{"$ref": "ADDRESS#OUTPUT"}`, `{"$param": "NAME"}`,
/// `{"$cap": "ADDRESS#NAME"}`, `{"$sensitive": VALUE}`.
const MARKERS: [&str; 4] = ["$ref", "$param", "$cap", "$sensitive"];

/// Where an object stands, for what markers it may be.
#[derive(Clone, Copy, PartialEq, Eq)]
enum MarkerUse {
    /// A resource's `inputs` object itself: no marker at all.
    InputsObject,
    /// An input's whole value: any marker.
    InputValue,
    /// Deeper inside an input: `$ref` and `$param`.
    Nested,
    /// Inside a parameter's value: `$ref` only.
    InParameter,
}

/// What is wrong with `map`'s `$` keys, if anything. A key that starts with `$` is a marker
/// (`$ref`, `$param`, `$cap`, alone in its object with a string value), or an escaped literal
/// key (`$$…` stands for `$…`); anything else is a mistake, never data.
fn marker_problem(map: &Map<String, Value>, at: MarkerUse) -> Option<String> {
    for (key, value) in map {
        if !key.starts_with('$') || key.starts_with("$$") {
            continue;
        }
        if !MARKERS.contains(&key.as_str()) {
            let hint = MARKERS
                .iter()
                .find(|m| edit_distance(m, key) <= 2)
                .map(|m| format!("did you mean `{m}`? "))
                .unwrap_or_default();
            return Some(format!(
                "unknown marker `{}`: {hint}a key starting with `$` is `$ref`, `$param`, `$cap` or `$sensitive`; write `${}` for a literal key `{}`",
                printable(key), printable(key), printable(key)
            ));
        }
        if map.len() != 1 {
            let others: Vec<String> = map
                .keys()
                .filter(|k| *k != key)
                .map(|k| format!("`{}`", printable(k)))
                .collect();
            return Some(format!(
                "a `{key}` object has no other keys, but this one also has {}; put the reference alone as a value, or write `${key}` for a literal key",
                others.join(", ")
            ));
        }
        if key == "$sensitive" {
            // Any value; not inside a parameter (mark the `$param` that uses it instead).
            if at == MarkerUse::InputsObject || at == MarkerUse::InParameter {
                return Some(
                    "`$sensitive` marks an input's value (or a part of it): {\"password\": {\"$sensitive\": {\"$param\": \"pw\"}}}".to_string(),
                );
            }
            continue;
        }
        let form = if key == "$param" {
            "NAME"
        } else if key == "$ref" {
            "ADDRESS#OUTPUT"
        } else {
            "ADDRESS#NAME"
        };
        if !value.is_string() {
            return Some(format!(
                "`{key}` takes a string \"{form}\", not {}",
                kind_of(value)
            ));
        }
        let allowed = match at {
            MarkerUse::InputsObject => {
                return Some(format!(
                    "`inputs` is an object of input names; a `{key}` goes in an input's value, e.g. {{\"value\": {{\"{key}\": \"{form}\"}}}}"
                ))
            }
            MarkerUse::InputValue => true,
            MarkerUse::Nested => key != "$cap",
            MarkerUse::InParameter => key == "$ref",
        };
        if !allowed {
            return Some(match (at, key.as_str()) {
                (_, "$cap") => "`$cap` hands over a capability and must be an input's whole value, not inside an object or array".to_string(),
                _ => "a parameter's value cannot use `$param` (parameters are not expanded twice)".to_string(),
            });
        }
    }
    None
}

/// The number of single-character edits between `a` and `b` (for "did you mean").
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut last = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let old = row[j + 1];
            row[j + 1] = (old + 1).min(row[j] + 1).min(last + usize::from(ca != *cb));
            last = old;
        }
    }
    row[b.len()]
}

/// The key a `$$` escape stands for.
fn unescape_key(key: &str) -> &str {
    if key.starts_with("$$") {
        &key[1..]
    } else {
        key
    }
}

/// `value` (inputs in their stored form) with each `{"$ref": …}` replaced by the output it
/// names and every escaped key (`$$…`) by the key it stands for; `None` when an output is
/// not known.
fn resolve_tree<'a>(
    value: Value,
    outputs: &dyn Fn(&str, &str) -> Option<&'a RawValue>,
) -> Option<Value> {
    Some(match value {
        Value::Object(map) => {
            if let (1, Some(Value::String(target))) = (map.len(), map.get("$ref")) {
                let (address, output) = target.split_once('#')?;
                return serde_json::from_str(outputs(address, output)?.get()).ok();
            }
            let mut out = Map::with_capacity(map.len());
            for (k, v) in map {
                out.insert(unescape_key(&k).to_string(), resolve_tree(v, outputs)?);
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(
            items
                .into_iter()
                .map(|v| resolve_tree(v, outputs))
                .collect::<Option<_>>()?,
        ),
        other => other,
    })
}

/// Fills each resource's `depends_on` (once the map is in its final order), or names the first
/// reference to a resource the deployment does not declare.
fn link_dependencies(resources: &mut AddressMap<ResourceDecl>) -> Result<(), (String, String)> {
    let mut all = Vec::with_capacity(resources.len());
    for r in resources.values() {
        let mut depends_on = Vec::with_capacity(r.refs.len() + r.capabilities.len());
        for reference in &r.refs {
            match resources.get_index_of(&reference.address) {
                Some(i) => depends_on.push(i as u32),
                None => {
                    return Err((
                        r.place_of(reference),
                        missing_resource(resources, &reference.address, "refers to"),
                    ))
                }
            }
        }
        for cap in &r.capabilities {
            match resources.get_index_of(&cap.address) {
                Some(i) => depends_on.push(i as u32),
                None => {
                    return Err((
                        format!("resources.{}.inputs.{}", r.address, cap.input),
                        missing_resource(resources, &cap.address, "asks for a capability of"),
                    ))
                }
            }
        }
        depends_on.sort_unstable();
        depends_on.dedup();
        all.push(depends_on);
    }
    for (r, depends_on) in resources.values_mut().zip(all) {
        r.depends_on = depends_on;
    }
    Ok(())
}

/// Why `address` names no resource: a group, or nothing the deployment declares.
fn missing_resource(resources: &AddressMap<ResourceDecl>, address: &str, verb: &str) -> String {
    let prefix = format!("{address}.");
    let members: Vec<&str> = resources
        .keys()
        .filter(|a| a.starts_with(&prefix))
        .map(String::as_str)
        .take(3)
        .collect();
    if members.is_empty() {
        format!("{verb} resource `{address}`, which the deployment does not declare")
    } else {
        format!(
            "{verb} `{address}`, which is a group, not a resource; name one of its resources (e.g. `{}`)",
            members[0]
        )
    }
}

/// Walks `value` depth first with `place` kept up to date (`.key` or `[n]` per level):
/// `visit` answers whether to go into a value's members, or stops the walk with an error.
fn walk<E>(
    value: &Value,
    place: &mut String,
    visit: &mut dyn FnMut(&Value, &str) -> Result<bool, E>,
) -> Result<(), E> {
    if !visit(value, place)? {
        return Ok(());
    }
    let len = place.len();
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                place.push('.');
                place.push_str(k);
                let walked = walk(v, place, visit);
                place.truncate(len);
                walked?;
            }
        }
        Value::Array(items) => {
            for (n, v) in items.iter().enumerate() {
                use std::fmt::Write;
                let _ = write!(place, "[{n}]");
                let walked = walk(v, place, visit);
                place.truncate(len);
                walked?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// The length of the JSON string literal at the start of `text` (which starts with `"`),
/// quotes included.
fn json_string_len(text: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut i = 1;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

/// `{"KEY": "text"}` and nothing else.
fn marker<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    match value {
        Value::Object(map) if map.len() == 1 => map.get(key).and_then(Value::as_str),
        _ => None,
    }
}

/// `ADDRESS#NAME` split in two; `what` names the second part in a message (`OUTPUT`, `NAME`).
fn split_ref(target: &str, place: &str, what: &str) -> Result<(String, String), (String, String)> {
    match target.split_once('#') {
        Some((address, name)) if !address.is_empty() && !name.is_empty() => {
            Ok((address.to_string(), name.to_string()))
        }
        _ => Err((
            place.to_string(),
            format!(
                "`{}` is not of the form ADDRESS#{what} (e.g. `web.db#{}`)",
                printable(target),
                what.to_lowercase()
            ),
        )),
    }
}

/// Checks the markers in `value` (an input's value, or a part of one), replaces each
/// `{"$param": NAME}` by the parameter (`params`; `None` inside a parameter's own value) and
/// records each `{"$ref": …}` in `refs`. `escaped` is set when an escaped key (`$$…`) occurs.
fn substitute(
    value: Value,
    place: &mut String,
    params: Option<&Map<String, Value>>,
    refs: &mut Vec<OutputRef>,
    escaped: &mut bool,
    sensitive: &mut Vec<Value>,
) -> Result<Value, (String, String)> {
    let map = match value {
        Value::Object(map) => map,
        Value::Array(items) => {
            let len = place.len();
            let mut out = Vec::with_capacity(items.len());
            for (n, v) in items.into_iter().enumerate() {
                use std::fmt::Write;
                let _ = write!(place, "[{n}]");
                let v = substitute(v, place, params, refs, escaped, sensitive);
                place.truncate(len);
                out.push(v?);
            }
            return Ok(Value::Array(out));
        }
        other => return Ok(other),
    };
    let at = if params.is_some() {
        MarkerUse::Nested
    } else {
        MarkerUse::InParameter
    };
    if let Some(problem) = marker_problem(&map, at) {
        return Err((place.clone(), problem));
    }
    if let (Some(params), Some(Value::String(name))) = (params, map.get("$param")) {
        let Some(param) = params.get(name) else {
            return Err((
                place.clone(),
                format!("missing parameter `{name}`; pass it in a JSON object with --params FILE"),
            ));
        };
        // A parameter may carry references (a front end's JSON wiring resources together);
        // they count like any other. Parameters in a parameter are not expanded again.
        return substitute(param.clone(), place, None, refs, escaped, sensitive);
    }
    if let Some(Value::String(target)) = map.get("$ref") {
        let (address, output) = split_ref(target, place, "OUTPUT")?;
        refs.push(OutputRef { address, output });
        return Ok(Value::Object(map));
    }
    if map.contains_key("$sensitive") {
        // The value itself reaches the provider; the deployment remembers it is a secret.
        let Some((_, inner)) = map.into_iter().next() else {
            unreachable!("a `$sensitive` object has one key")
        };
        let value = substitute(inner, place, params, refs, escaped, sensitive)?;
        sensitive.push(value.clone());
        return Ok(value);
    }
    // `place` is one buffer, extended and cut back as the walk goes down and up.
    let len = place.len();
    let mut out = Map::with_capacity(map.len());
    for (k, v) in map {
        *escaped |= k.starts_with("$$");
        place.push('.');
        place.push_str(&k);
        let v = substitute(v, place, params, refs, escaped, sensitive);
        place.truncate(len);
        out.insert(k, v?);
    }
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(value: Value) -> Result<Deployment, ModelError> {
        let params = json!({"greeting": "hi"}).as_object().unwrap().clone();
        Deployment::parse(Path::new("d.json"), &value.to_string(), &params)
    }

    fn local() -> Value {
        json!({"local": {"builtin": "local"}})
    }

    #[test]
    fn groups_refs_params_and_caps_are_read() {
        let d = parse(json!({
            "providers": local(),
            "resources": {
                "hello": {"provider": "local", "type": "file", "inputs": {"path": "x", "content": {"$param": "greeting"}}},
                "web": {"resources": {
                    "db": {"provider": "local", "type": "exec", "inputs": {"command": "cat", "stdin": {"$ref": "hello#content"}, "h": {"$cap": "hello#handle"}}}
                }}
            }
        }))
        .unwrap();
        assert_eq!(
            d.resources["hello"].inputs.get("content"),
            Some(json!("hi"))
        );
        let db = &d.resources["web.db"];
        assert_eq!(db.refs[0].address, "hello");
        assert_eq!(db.refs[0].output, "content");
        assert_eq!(db.capabilities[0].input, "h");
        assert_eq!(db.inputs.keys(), vec!["command", "stdin"]);
        assert_eq!(
            db.place_of(&db.refs[0]),
            "resources.web.db.inputs.stdin",
            "the place of a reference is found again for messages"
        );
        assert_eq!(db.dependencies(), vec!["hello".to_string()]);
    }

    #[test]
    fn a_large_group_read_in_halves_is_the_same_deployment() {
        let n = PARALLEL_FROM + 100;
        let resources = |bad: &[usize]| {
            let mut map = Map::new();
            for i in 0..n {
                let inputs = if bad.contains(&i) {
                    json!(5)
                } else if i == 0 {
                    json!({"value": 0})
                } else {
                    json!({"value": {"$ref": format!("r{}#value", i - 1)}})
                };
                map.insert(
                    format!("r{i}"),
                    json!({"provider": "local", "type": "memo", "inputs": inputs}),
                );
            }
            json!({"providers": local(), "resources": map})
        };
        let d = parse(resources(&[])).unwrap();
        assert_eq!(d.resources.len(), n);
        assert_eq!(
            d.resources[&format!("r{}", n - 1)].dependencies(),
            vec![format!("r{}", n - 2)],
            "a reference across the halves"
        );
        // The first mistake in the file is the one reported, whichever half finds it first.
        let e = parse(resources(&[10, n - 1])).unwrap_err();
        assert_eq!(e.place, "resources.r10.inputs");
        let e = parse(resources(&[n - 1])).unwrap_err();
        assert_eq!(e.place, format!("resources.r{}.inputs", n - 1));
    }

    #[test]
    fn a_marker_written_with_an_escaped_dollar_is_still_a_marker() {
        let text = r#"{"providers": {"local": {"builtin": "local"}}, "resources": {
            "hello": {"provider": "local", "type": "memo", "inputs": {"value": 1}},
            "user": {"provider": "local", "type": "memo", "inputs": {"value": {"\u0024ref": "hello#value"}}}
        }}"#;
        let d = Deployment::parse(Path::new("d.json"), text, &Map::new()).unwrap();
        assert_eq!(
            d.resources["user"].dependencies(),
            vec!["hello".to_string()]
        );
        assert!(d.resources["hello"].refs.is_empty());
    }

    #[test]
    fn references_inside_parameters_count_as_dependencies() {
        let params = json!({"wired": {"from": {"$ref": "hello#content"}}})
            .as_object()
            .unwrap()
            .clone();
        let text = json!({
            "providers": local(),
            "resources": {
                "hello": {"provider": "local", "type": "memo", "inputs": {"value": 1}},
                "user": {"provider": "local", "type": "memo", "inputs": {"value": {"$param": "wired"}}}
            }
        })
        .to_string();
        let d = Deployment::parse(Path::new("d.json"), &text, &params).unwrap();
        let user = &d.resources["user"];
        assert_eq!(user.dependencies(), vec!["hello".to_string()]);
        let outputs = Json::from(json!({"content": "C"}));
        assert_eq!(
            user.resolve(&|_, o| outputs.get_raw(o)).unwrap(),
            json!({"value": {"from": "C"}})
        );
    }

    #[test]
    fn each_mistake_names_its_place() {
        let cases = [
            (
                json!({"providers": local(), "resources": {"a": {"provider": "nope", "type": "file"}}}),
                "resources.a.provider",
                "unknown provider `nope`",
            ),
            (
                json!({"providers": local(), "resources": {"a": {"provider": "local", "type": "memo", "inputs": {"value": {"$ref": "b#value"}}}}}),
                "resources.a.inputs.value",
                "does not declare",
            ),
            (
                json!({"providers": local(), "resources": {"a": {"provider": "local", "type": "memo", "inputs": {"value": {"$param": "missing"}}}}}),
                "resources.a.inputs.value",
                "missing parameter `missing`",
            ),
            (
                json!({"providers": local(), "resources": {
                "a": {"provider": "local", "type": "memo", "inputs": {"value": {"$ref": "b#value"}}},
                "b": {"provider": "local", "type": "memo", "inputs": {"value": {"$ref": "a#value"}}}}}),
                "resources",
                "dependency cycle: a -> b -> a",
            ),
        ];
        for (deployment, place, message) in cases {
            let e = parse(deployment).unwrap_err();
            assert_eq!(e.place, place, "{e}");
            assert!(e.message.contains(message), "{e}");
        }
    }

    #[test]
    fn a_dollar_key_is_a_marker_an_escape_or_an_error() {
        let deployment = |inputs: Value| {
            parse(json!({"providers": local(), "resources": {
                "x": {"provider": "local", "type": "memo", "inputs": {}},
                "y": {"provider": "local", "type": "memo", "inputs": inputs}
            }}))
        };
        let cases = [
            (
                json!({"v": {"$reff": "x#o"}}),
                "resources.y.inputs.v",
                "unknown marker `$reff`: did you mean `$ref`?",
            ),
            (
                json!({"v": {"$ref": 42}}),
                "resources.y.inputs.v",
                "`$ref` takes a string \"ADDRESS#OUTPUT\", not a number",
            ),
            (
                json!({"v": {"$ref": "x#o", "extra": 1}}),
                "resources.y.inputs.v",
                "a `$ref` object has no other keys, but this one also has `extra`",
            ),
            (
                json!({"v": {"$param": 5}}),
                "resources.y.inputs.v",
                "`$param` takes a string \"NAME\", not a number",
            ),
            (
                json!({"v": [{"$cap": "x#h"}]}),
                "resources.y.inputs.v[0]",
                "`$cap` hands over a capability and must be an input's whole value",
            ),
            (
                json!({"v": {"deep": {"$cap": "x#h"}}}),
                "resources.y.inputs.v.deep",
                "must be an input's whole value",
            ),
            (
                json!({"$ref": "x#o"}),
                "resources.y.inputs",
                "`inputs` is an object of input names",
            ),
            (
                json!({"v": {"a": {"$unknown": 1}}}),
                "resources.y.inputs.v.a",
                "write `$$unknown` for a literal key `$unknown`",
            ),
            (
                json!({"v": {"$param": "wired"}}),
                "resources.y.inputs.v",
                "missing parameter `wired`",
            ),
        ];
        for (inputs, place, message) in cases {
            let e = deployment(inputs.clone()).unwrap_err();
            assert_eq!(e.place, place, "{inputs}: {e}");
            assert!(e.message.contains(message), "{inputs}: {e}");
        }
        // The escape: `$$…` is a literal `$…` key, wherever it is, and never a reference.
        let d = deployment(json!({"$$top": {"$$ref": "x#o"}, "v": [{"$$cap": 1, "$ref2": 0}]}));
        let e = d.unwrap_err();
        assert!(e.message.contains("unknown marker `$ref2`"), "{e}");
        let d = deployment(
            json!({"$$top": {"$$ref": "x#o"}, "v": [{"$$cap": 1}], "w": {"$ref": "x#o"}}),
        )
        .unwrap();
        let y = &d.resources["y"];
        assert_eq!(y.refs.len(), 1, "only the real reference counts");
        assert_eq!(y.input_names(), vec!["$top", "v", "w"]);
        let outputs = Json::from(json!({"o": {"$$kept": "as the provider wrote it"}}));
        assert_eq!(
            y.resolve(&|_, o| outputs.get_raw(o)).unwrap(),
            json!({"$top": {"$ref": "x#o"}, "v": [{"$cap": 1}], "w": {"$$kept": "as the provider wrote it"}})
        );
    }

    #[test]
    fn a_key_named_twice_is_an_error_not_last_wins() {
        let text = r#"{"providers": {"local": {"builtin": "local"}}, "resources": {
            "a": {"provider": "local", "type": "memo", "inputs": {"value": 1}},
            "a": {"provider": "local", "type": "memo", "inputs": {"value": 2}}
        }}"#;
        let e = Deployment::parse(Path::new("d.json"), text, &Map::new()).unwrap_err();
        assert_eq!(e.place, "resources.a");
        assert!(e.message.contains("declared twice"), "{e}");
        let text = r#"{"providers": {"local": {"builtin": "local"}}, "resources": {
            "a": {"provider": "local", "type": "memo", "inputs": {"value": {"k": 1, "k": 2}}}
        }}"#;
        let e = Deployment::parse(Path::new("d.json"), text, &Map::new()).unwrap_err();
        assert_eq!(e.place, "resources.a.inputs");
        assert!(e.message.contains("the key `k` appears twice"), "{e}");
        let text = r#"{"providers": {}, "providers": {}}"#;
        assert!(Deployment::parse(Path::new("d.json"), text, &Map::new()).is_err());
    }

    #[test]
    fn names_with_control_characters_are_refused_and_never_printed_raw() {
        let e = parse(json!({"providers": local(), "resources": {
            "evil\u{1b}[31m\nname": {"provider": "local", "type": "memo"}
        }}))
        .unwrap_err();
        assert!(e.message.contains("control characters"), "{e}");
        let shown = e.to_string();
        assert!(
            !shown.contains('\u{1b}') && !shown.contains('\n'),
            "{shown:?}"
        );
        assert!(shown.contains("evil\\u{1b}[31m\\nname"), "{shown}");
    }

    #[test]
    fn refs_resolve_from_outputs() {
        let d = parse(json!({
            "providers": local(),
            "resources": {
                "x": {"provider": "local", "type": "memo", "inputs": {}},
                "y": {"provider": "local", "type": "memo", "inputs": {
                    "a": {"$ref": "x#o"},
                    "b": [1, {"$ref": "x#p"}, {"$$ref": "x#o", "more": true}, {"$$ref": "x#o"}],
                    "c": "{\"$ref\":\"x#o\"}",
                    "d": {"nested": {"$ref": "x#weird"}}
                }}
            }
        }))
        .unwrap();
        let y = &d.resources["y"];
        let outputs = Json::from(json!({"o": "O", "p": [true, null], "weird": "q\"}"}));
        let known = |address: &str, output: &str| {
            (address == "x" && output != "p")
                .then(|| outputs.get_raw(output))
                .flatten()
        };
        assert_eq!(y.resolve(&known), None, "x#p is unknown");
        let all = |_: &str, output: &str| outputs.get_raw(output);
        assert_eq!(
            y.resolve(&all).unwrap(),
            json!({
                "a": "O",
                "b": [1, [true, null], {"$ref": "x#o", "more": true}, {"$ref": "x#o"}],
                "c": "{\"$ref\":\"x#o\"}",
                "d": {"nested": "q\"}"}
            })
        );
    }
}
