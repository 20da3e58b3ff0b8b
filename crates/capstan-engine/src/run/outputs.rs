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
    let mut marked: Vec<String> = connection
        .info()
        .resource_type(&now.resource_type)
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
    let outputs = now.outputs.value();
    for name in &marked {
        if let Some(value) = outputs.get(name) {
            secrets.add_value(value);
        }
    }
    let mut pointers = Vec::new();
    secrets.pointers(&now.inputs.value(), "/inputs", &mut pointers);
    secrets.pointers(&outputs, "/outputs", &mut pointers);
    for name in marked {
        let pointer = format!("/outputs/{}", name.replace('~', "~0").replace('/', "~1"));
        if outputs.get(&name).is_some() && !pointers.contains(&pointer) {
            pointers.push(pointer);
        }
    }
    now.sensitive = pointers;
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
