//! What a result's outputs tell beyond their values: which are secrets, and which a type
//! declares but the result lacks.

use super::*;

/// Learns the outputs `now`'s provider marks sensitive, and records where the known secrets
/// are in its inputs and outputs.
pub(crate) fn note_sensitive(
    address: &str,
    now: &mut ResourceState,
    connection: &ProviderConnection,
    secrets: &crate::secrets::Secrets,
) {
    // Marked by its provider, or by the deployment (`{"$sensitive": {"$ref": …}}`).
    let declared = connection.info().resource_type(&now.resource_type);
    let mut marked: Vec<String> = declared
        .map(|t| {
            t.outputs
                .iter()
                .filter(|o| o.sensitive)
                .map(|o| o.name.clone())
                .collect()
        })
        .unwrap_or_default();
    marked.extend(secrets.marked_outputs(address));
    if marked.is_empty() && secrets.is_empty() {
        return;
    }
    let mut pointers = Vec::new();
    secrets.pointers(&now.inputs.value(), "/inputs", &mut pointers);
    let outputs = now.outputs.value();
    for name in &marked {
        if let Some(value) = outputs.get(name) {
            secrets.add_value(value);
        }
    }
    // Inputs that hold a secret make what the operation made of them a secret too (a command
    // may have turned one into its stdout): every value in its outputs that is not a copy of
    // an input, except in outputs its type declares public.
    let mut derived = Vec::new();
    if !pointers.is_empty() {
        let public = |name: &str| {
            declared.is_some_and(|t| t.outputs.iter().any(|o| o.public && o.name == name))
        };
        let inputs = now.inputs.value();
        let mut given = std::collections::HashSet::new();
        leaves(&inputs, &mut given);
        for (name, value) in outputs.as_object().into_iter().flatten() {
            if !public(name) && !marked.contains(name) {
                let pointer = format!("/outputs/{}", escape_pointer(name));
                made_of_secrets(value, &pointer, &given, secrets, &mut derived);
            }
        }
    }
    secrets.pointers(&outputs, "/outputs", &mut pointers);
    for pointer in derived {
        if !pointers.contains(&pointer) {
            pointers.push(pointer);
        }
    }
    for name in marked {
        let pointer = format!("/outputs/{}", escape_pointer(&name));
        if outputs.get(&name).is_some() && !pointers.contains(&pointer) {
            pointers.push(pointer);
        }
    }
    now.sensitive = pointers;
}

fn escape_pointer(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// Every string and number in `value`, as text.
fn leaves(value: &serde_json::Value, out: &mut std::collections::HashSet<String>) {
    use serde_json::Value;
    match value {
        Value::String(s) => {
            out.insert(s.clone());
        }
        Value::Number(n) => {
            out.insert(n.to_string());
        }
        Value::Array(items) => items.iter().for_each(|v| leaves(v, out)),
        Value::Object(map) => map.values().for_each(|v| leaves(v, out)),
        Value::Null | Value::Bool(_) => {}
    }
}

/// The values in `value` (at `pointer`) that are not copies of an input (`given`): their
/// pointers, for the state to mark; their strings long enough to search for, learned as
/// secrets (a number or a short word would blot out every equal value shown).
fn made_of_secrets(
    value: &serde_json::Value,
    pointer: &str,
    given: &std::collections::HashSet<String>,
    secrets: &crate::secrets::Secrets,
    out: &mut Vec<String>,
) {
    use serde_json::Value;
    match value {
        Value::String(s) if !given.contains(s) => {
            secrets.add_derived(value);
            out.push(pointer.to_string());
        }
        Value::Number(n) if !given.contains(&n.to_string()) => out.push(pointer.to_string()),
        Value::Array(items) => {
            for (n, v) in items.iter().enumerate() {
                made_of_secrets(v, &format!("{pointer}/{n}"), given, secrets, out);
            }
        }
        Value::Object(map) => {
            for (k, v) in map {
                let at = format!("{pointer}/{}", escape_pointer(k));
                made_of_secrets(v, &at, given, secrets, out);
            }
        }
        _ => {}
    }
}

/// Learns the inputs a provider's handshake marks sensitive.
pub(super) fn learn_sensitive_inputs(
    inputs: &Json,
    connection: &ProviderConnection,
    resource_type: &str,
    secrets: &crate::secrets::Secrets,
) {
    let Some(t) = connection.info().resource_type(resource_type) else {
        return;
    };
    let value = inputs.value();
    for input in t.inputs.iter().filter(|i| i.sensitive) {
        if let Some(v) = value.get(&input.name) {
            secrets.add_value(v);
        }
    }
}

/// Learns what `decl` marks sensitive, with the outputs its marked references name.
pub(super) fn learn_sensitive<'a>(
    decl: &ResourceDecl,
    secrets: &crate::secrets::Secrets,
    lookup: &impl Fn(&str, &str) -> Option<&'a serde_json::value::RawValue>,
) {
    fn walk<'a>(
        value: &serde_json::Value,
        secrets: &crate::secrets::Secrets,
        lookup: &impl Fn(&str, &str) -> Option<&'a serde_json::value::RawValue>,
    ) {
        use serde_json::Value;
        match value {
            Value::Object(map) => {
                if let (1, Some(Value::String(target))) = (map.len(), map.get("$ref")) {
                    if let Some((address, output)) = target.split_once('#') {
                        if let Some(raw) = lookup(address, output) {
                            if let Ok(v) = serde_json::from_str::<Value>(raw.get()) {
                                secrets.add_value(&v);
                            }
                        }
                    }
                    return;
                }
                map.values().for_each(|v| walk(v, secrets, lookup));
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, secrets, lookup)),
            other => secrets.add_value(other),
        }
    }
    for value in &decl.sensitive {
        walk(value, secrets, lookup);
    }
}

/// The outputs `now`'s type declares that its result lacks, as "output(s) `a`, `b`", if any.
/// Runs for every result, so it reads the outputs' top-level keys in one pass without
/// allocating (keys are compared where they lie in the text).
pub(super) fn missing_outputs(
    connection: &ProviderConnection,
    now: &ResourceState,
) -> Option<String> {
    let declared = &connection.info().resource_type(&now.resource_type)?.outputs;
    if declared.is_empty() {
        return None;
    }
    let missing: Vec<String> = if declared.len() <= 128 {
        let found = found_keys(now.outputs.text(), declared);
        declared
            .iter()
            .enumerate()
            .filter(|(n, _)| found & (1u128 << n) == 0)
            .map(|(_, o)| format!("`{}`", o.name))
            .collect()
    } else {
        let returned: std::collections::HashSet<String> = now.outputs.keys().into_iter().collect();
        declared
            .iter()
            .filter(|o| !returned.contains(&o.name))
            .map(|o| format!("`{}`", o.name))
            .collect()
    };
    match missing.len() {
        0 => None,
        1 => Some(format!("output {}", missing[0])),
        _ => Some(format!("outputs {}", missing.join(", "))),
    }
}

/// Which of `declared` (the first 128) are top-level keys of the JSON object `text`, as bits.
pub(super) fn found_keys(text: &str, declared: &[capstan_schema::info::OutputInfo]) -> u128 {
    use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
    struct Keys<'a>(&'a [capstan_schema::info::OutputInfo]);
    struct Key<'a>(&'a [capstan_schema::info::OutputInfo]);
    impl<'de> DeserializeSeed<'de> for Key<'_> {
        type Value = u128;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<u128, D::Error> {
            d.deserialize_str(self)
        }
    }
    impl<'de> Visitor<'de> for Key<'_> {
        type Value = u128;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a key")
        }
        fn visit_str<E>(self, key: &str) -> Result<u128, E> {
            Ok(self
                .0
                .iter()
                .take(128)
                .position(|o| o.name == key)
                .map_or(0, |n| 1u128 << n))
        }
    }
    impl<'de> Visitor<'de> for Keys<'_> {
        type Value = u128;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<u128, A::Error> {
            let mut found = 0;
            while let Some(bit) = map.next_key_seed(Key(self.0))? {
                found |= bit;
                map.next_value::<IgnoredAny>()?;
            }
            Ok(found)
        }
    }
    let mut de = serde_json::Deserializer::from_str(text);
    de.deserialize_map(Keys(declared)).unwrap_or(0)
}
