//! Reading a deployment's JSON: providers, and groups of resources (large ones on two
//! threads), with every name and key checked.

use super::*;

pub(super) fn parse_providers(
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

pub(super) fn parse_provider(
    name: &str,
    decl: &Value,
    params: &Map<String, Value>,
) -> Result<ProviderDecl, String> {
    let Value::Object(decl) = decl else {
        return Err("must be an object with `builtin`, `executable` or `socket`".into());
    };
    const KEYS: [&str; 11] = [
        "builtin",
        "executable",
        "args",
        "socket",
        "owner",
        "maxConcurrency",
        "timeout",
        "protocol",
        "maxMessageMiB",
        "statelessTypes",
        "config",
    ];
    if let Some(key) = decl.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(format!("unknown key `{key}`"));
    }
    let source = provider_source(decl)?;
    let max_concurrency = positive(decl, "maxConcurrency", u32::MAX as u64)
        .map_err(|()| "`maxConcurrency` must be a positive integer".to_string())?;
    let timeout = match decl.get("timeout") {
        None => None,
        Some(v) => Some(
            v.as_f64()
                .ok_or_else(|| format!("`timeout` must be a number of seconds, not {v}"))
                .and_then(|t| seconds(t, false).map_err(|e| format!("`timeout` {e}")))?,
        ),
    };
    let max_message_mib =
        positive(decl, "maxMessageMiB", MAX_MESSAGE_MIB as u64).map_err(|()| {
            format!("`maxMessageMiB` must be a whole number of MiB from 1 to {MAX_MESSAGE_MIB}")
        })?;
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
    let protocol = provider_protocol(decl, &source)?;
    let (terraform_config, sensitive, config_refs) =
        provider_config(decl, protocol.as_deref(), params)?;
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

/// `decl[key]`, a whole number from 1 to `most`, if given.
fn positive(decl: &Map<String, Value>, key: &str, most: u64) -> Result<Option<u32>, ()> {
    match decl.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .filter(|n| (1..=most).contains(n))
            .map(|n| Some(n as u32))
            .ok_or(()),
    }
}

/// Where a provider comes from: exactly one of `builtin`, `executable` (with `args`) and
/// `socket`.
fn provider_source(decl: &Map<String, Value>) -> Result<ProviderSourceDecl, String> {
    let text = |key: &str| decl.get(key).and_then(Value::as_str).map(str::to_string);
    let sources = ["builtin", "executable", "socket"]
        .iter()
        .filter(|k| decl.contains_key(**k))
        .count();
    if sources != 1 {
        return Err("give exactly one of `builtin`, `executable` or `socket`".into());
    }
    if decl.contains_key("args") && !decl.contains_key("executable") {
        return Err("`args` is for an `executable` provider (its command line)".into());
    }
    if decl.contains_key("owner") && !decl.contains_key("socket") {
        return Err("`owner` is for a `socket` provider (the user its service runs as)".into());
    }
    if let Some(builtin) = text("builtin") {
        return Ok(ProviderSourceDecl::Builtin(builtin));
    }
    if let Some(program) = text("executable") {
        let not_strings = || "`args` must be a list of strings".to_string();
        let args = match decl.get("args") {
            None => Vec::new(),
            Some(Value::Array(args)) => args
                .iter()
                .map(|a| a.as_str().map(str::to_string).ok_or_else(not_strings))
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(not_strings()),
        };
        return Ok(ProviderSourceDecl::Executable { program, args });
    }
    if let Some(socket) = text("socket") {
        let owner = match decl.get("owner") {
            None => None,
            Some(Value::Number(n)) => Some(
                n.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| format!("`owner` {n} is not a user id"))?,
            ),
            Some(Value::String(name)) => Some(capstan_process::uid_of(name).ok_or_else(|| {
                format!("`owner`: no user `{name}` on this machine (give a name from /etc/passwd or a uid)")
            })?),
            Some(_) => return Err("`owner` is a user name or a uid".into()),
        };
        return Ok(ProviderSourceDecl::Socket {
            path: PathBuf::from(socket),
            owner,
        });
    }
    Err("`builtin`, `executable` and `socket` take a string".into())
}

/// The protocol a provider speaks, if not Capstan's: a Terraform or NixOps4 v0 program.
fn provider_protocol(
    decl: &Map<String, Value>,
    source: &ProviderSourceDecl,
) -> Result<Option<String>, String> {
    let executable = matches!(source, ProviderSourceDecl::Executable { .. });
    match decl.get("protocol") {
        None => Ok(None),
        Some(Value::String(p)) if p == TERRAFORM && !executable => Err(format!(
            "a `{TERRAFORM}` provider is an `executable` (the provider binary)"
        )),
        Some(Value::String(p)) if p == TERRAFORM && decl.contains_key("args") => Err(format!(
            "a `{TERRAFORM}` provider takes no `args`: its binary is started as Terraform starts it (settings go in `config`)"
        )),
        Some(Value::String(p)) if p == NIXOPS4_V0 && !executable => Err(format!(
            "a `{NIXOPS4_V0}` provider is an `executable` (it is started once per operation)"
        )),
        Some(Value::String(p)) if p == TERRAFORM || p == NIXOPS4_V0 => Ok(Some(p.clone())),
        Some(other) => Err(format!(
            "unknown `protocol` {other}; those supported are \"{NIXOPS4_V0}\" and \"{TERRAFORM}\""
        )),
    }
}

/// A Terraform provider's `config` with its parameters filled in, where its secrets are, and
/// the outputs it refers to (recorded ones: a provider starts before the run makes anything).
type ProviderConfig = (Option<Value>, Vec<Value>, Vec<OutputRef>);

fn provider_config(
    decl: &Map<String, Value>,
    protocol: Option<&str>,
    params: &Map<String, Value>,
) -> Result<ProviderConfig, String> {
    let config = match decl.get("config") {
        None => return Ok((None, Vec::new(), Vec::new())),
        Some(_) if protocol != Some(TERRAFORM) => {
            return Err(format!(
                "`config` is for a `\"protocol\": \"{TERRAFORM}\"` provider (its provider block)"
            ))
        }
        Some(Value::Object(config)) => Value::Object(config.clone()),
        Some(_) => return Err("`config` must be an object (the provider block's settings)".into()),
    };
    // Parameters are filled in and secrets marked as in any input.
    let (mut refs, mut escaped, mut sensitive) = (Vec::new(), false, Vec::new());
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
    Ok((Some(config), sensitive, refs))
}

/// How deep groups may nest (as deep as JSON may nest inside inputs).
const MAX_GROUP_DEPTH: usize = 127;

pub(super) fn collect_resources(
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
    // Each group is read on its own, so JSON's own depth limit never sees the whole: count.
    let depth = if prefix.is_empty() {
        0
    } else {
        prefix.matches('.').count() + 1
    };
    if depth >= MAX_GROUP_DEPTH {
        return Err((
            group_place,
            format!("nested too deeply: groups may nest at most {MAX_GROUP_DEPTH} deep"),
        ));
    }
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
            let mut part = AddressMap::with_capacity_and_hasher(second.len(), Default::default());
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
pub(super) const PARALLEL_FROM: usize = 4096;

/// Reads the members of one group (resources and nested groups) into `out`.
pub(super) fn collect_members(
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
            if !["provider", "type", "inputs", "outputs", "tags"].contains(&key.as_str()) {
                return Err((
                    format!("{}.{key}", place()),
                    "unknown key; a resource has `provider`, `type`, `inputs`, `outputs` and `tags` (a group has only `resources`)".into(),
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
        let tags = match field("tags") {
            None => Vec::new(),
            Some(raw) => {
                let bad = || {
                    (
                        format!("{}.tags", place()),
                        "must be a list of tags: words without spaces, e.g. [\"web\", \"eu\"]"
                            .to_string(),
                    )
                };
                let tags = serde_json::from_str::<Vec<String>>(raw.get()).map_err(|_| bad())?;
                if tags
                    .iter()
                    .any(|t| t.is_empty() || t.contains(|c: char| c.is_whitespace() || c == '@'))
                {
                    return Err(bad());
                }
                tags
            }
        };
        let raw_inputs = field("inputs");
        let inputs = parse_inputs(raw_inputs).map_err(|e| (format!("{}.inputs", place()), e))?;
        // `$ref`, `$param`, `$cap` and `$$` escapes need a `$` in the text, written as is or
        // escaped: without one, the inputs are plain data and are kept as they are.
        let markers = raw_inputs.is_some_and(|raw| {
            let text = raw.get();
            text.contains('$') || text.contains("\\u0024")
        });
        let Inputs {
            resolved,
            refs,
            capabilities,
            escaped,
            sensitive,
        } = if markers {
            resolve_markers(inputs, params).map_err(|(within, message)| {
                // The place within the resource, made whole only for a message.
                (format!("{}{within}", place()), message)
            })?
        } else {
            Inputs {
                resolved: inputs,
                ..Inputs::default()
            }
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
                tags,
            },
        );
    }
    Ok(())
}

/// A resource's `inputs` as JSON (strictly: no key twice), an object or nothing.
fn parse_inputs(raw: Option<&RawValue>) -> Result<Map<String, Value>, String> {
    match raw.map(|raw| strict_json::parse(raw.get())) {
        None => Ok(Map::new()),
        Some(Ok(Value::Object(inputs))) => Ok(inputs),
        Some(Ok(other)) => Err(format!(
            "must be an object of input names to values, not {}",
            kind_of(&other)
        )),
        Some(Err(e)) => Err(e.to_string()),
    }
}

/// A resource's inputs with their markers taken out: parameters filled in, references and
/// capabilities noted, secrets found.
#[derive(Default)]
pub(super) struct Inputs {
    resolved: Map<String, Value>,
    refs: Vec<OutputRef>,
    capabilities: Vec<CapabilityRef>,
    escaped: bool,
    sensitive: Vec<Value>,
}

/// Takes the markers out of `inputs`; an error's place is within the resource
/// (`.inputs.KEY…`).
fn resolve_markers(
    inputs: Map<String, Value>,
    params: &Map<String, Value>,
) -> Result<Inputs, (String, String)> {
    let mut out = Inputs {
        resolved: Map::with_capacity(inputs.len()),
        ..Inputs::default()
    };
    let mut place = String::from(".inputs");
    if let Some(problem) = marker_problem(&inputs, MarkerUse::InputsObject) {
        return Err((place, problem));
    }
    for (key, value) in inputs {
        place.truncate(".inputs".len());
        place.push('.');
        place.push_str(&key);
        out.escaped |= key.starts_with("$$");
        if let Value::Object(map) = &value {
            if let Some(problem) = marker_problem(map, MarkerUse::InputValue) {
                return Err((place, problem));
            }
            if let Some(Value::String(target)) = map.get("$cap") {
                let (address, name) = split_ref(target, &place, "NAME")?;
                out.capabilities.push(CapabilityRef {
                    input: unescape_key(&key).to_string(),
                    address,
                    name,
                });
                continue;
            }
        }
        let value = substitute(
            value,
            &mut place,
            Some(params),
            &mut out.refs,
            &mut out.escaped,
            &mut out.sensitive,
        )?;
        out.resolved.insert(key, value);
    }
    Ok(out)
}

/// Why `name` cannot name a resource or group, if it cannot.
pub(super) fn bad_name(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("a resource name must not be empty".into());
    }
    if name.contains(['.', '#', '/']) {
        return Some(
            "a resource name must not contain `.`, `#` or `/` (they separate groups, outputs and children in addresses)"
                .into(),
        );
    }
    if let Some(c) = name.chars().find(|&c| strict_json::invisible(c)) {
        return Some(format!(
            "a resource name must not contain invisible or direction-changing characters (found U+{:04X}): two names that look the same must be the same",
            c as u32
        ));
    }
    if name.chars().any(char::is_control) {
        return Some(
            "a resource name must not contain control characters (line breaks, tabs, escape sequences)"
                .into(),
        );
    }
    None
}

pub(super) fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
