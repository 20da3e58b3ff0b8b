//! The markers inside inputs (`$ref`, `$param`, `$cap`, `$sensitive`, `$$` escapes): found,
//! checked, substituted, and turned into dependencies.

use super::*;

/// The markers an object may be: `{"$ref": "ADDRESS#OUTPUT"}`, `{"$param": "NAME"}`,
/// `{"$cap": "ADDRESS#NAME"}`, `{"$sensitive": VALUE}`.
pub(super) const MARKERS: [&str; 4] = ["$ref", "$param", "$cap", "$sensitive"];

/// Where an object stands, for what markers it may be.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum MarkerUse {
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
pub(super) fn marker_problem(map: &Map<String, Value>, at: MarkerUse) -> Option<String> {
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
pub(super) fn edit_distance(a: &str, b: &str) -> usize {
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
pub(super) fn unescape_key(key: &str) -> &str {
    if key.starts_with("$$") {
        &key[1..]
    } else {
        key
    }
}

/// `value` (inputs in their stored form) with each `{"$ref": …}` replaced by the output it
/// names and every escaped key (`$$…`) by the key it stands for; `None` when an output is
/// not known.
pub(super) fn resolve_tree<'a>(
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
pub(super) fn link_dependencies(
    resources: &mut AddressMap<ResourceDecl>,
) -> Result<(), (String, String)> {
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
pub(super) fn missing_resource(
    resources: &AddressMap<ResourceDecl>,
    address: &str,
    verb: &str,
) -> String {
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
pub(super) fn walk<E>(
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
pub(super) fn json_string_len(text: &str) -> Option<usize> {
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
pub(super) fn marker<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    match value {
        Value::Object(map) if map.len() == 1 => map.get(key).and_then(Value::as_str),
        _ => None,
    }
}

/// `ADDRESS#NAME` split in two; `what` names the second part in a message (`OUTPUT`, `NAME`).
pub(super) fn split_ref(
    target: &str,
    place: &str,
    what: &str,
) -> Result<(String, String), (String, String)> {
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
pub(super) fn substitute(
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
