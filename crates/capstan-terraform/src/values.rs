//! Values as Terraform encodes them for providers: MessagePack, shaped by the schema's types
//! (an object has every attribute, null when unset; lists, sets and tuples are arrays; maps are
//! maps; an unknown value is the extension type 0), to and from Capstan's JSON.

use rmpv::Value as Mp;
use serde_json::Value as Json;

use crate::wire;

/// A type from a schema: `"string"`, `["list","string"]`, `["object",{…}]`, …
pub type Type = Json;

/// The object type of a schema block: its attributes, and its nested blocks as lists, sets,
/// maps or single objects of their own object type.
pub fn block_type(block: &wire::Block) -> Type {
    let mut attributes = serde_json::Map::new();
    for a in &block.attributes {
        let t = serde_json::from_slice(&a.r#type).unwrap_or(Json::String("dynamic".into()));
        attributes.insert(a.name.clone(), t);
    }
    for b in &block.block_types {
        let inner = b.block.as_ref().map(block_type).unwrap_or(Json::Null);
        let t = match b.nesting {
            1 | 5 => inner,
            3 => serde_json::json!(["set", inner]),
            4 => serde_json::json!(["map", inner]),
            _ => serde_json::json!(["list", inner]),
        };
        attributes.insert(b.type_name.clone(), t);
    }
    serde_json::json!(["object", attributes])
}

/// What a value is to be: known JSON, or not known yet.
pub enum Want<'a> {
    Known(&'a Json),
    Unknown,
}

/// `value` (JSON, as a Capstan input) in MessagePack as type `t` requires.
pub fn encode(t: &Type, value: &Json) -> Mp {
    match (t, value) {
        (_, Json::Null) => Mp::Nil,
        (Json::String(s), v) => match (s.as_str(), v) {
            ("string", Json::String(x)) => Mp::from(x.as_str()),
            ("string", other) => Mp::from(other.to_string().trim_matches('"')),
            ("number", Json::Number(n)) => match (n.as_i64(), n.as_f64()) {
                (Some(i), _) => Mp::from(i),
                (None, Some(f)) => Mp::from(f),
                _ => Mp::from(n.to_string()),
            },
            ("number", Json::String(x)) => Mp::from(x.as_str()),
            ("bool", Json::Bool(b)) => Mp::from(*b),
            ("bool", Json::String(x)) => Mp::from(x == "true"),
            // `dynamic`: the value's own type (as JSON), then the value.
            (_, v) => {
                let own = type_of(v);
                Mp::Array(vec![
                    Mp::Binary(own.to_string().into_bytes()),
                    encode(&own, v),
                ])
            }
        },
        (Json::Array(kind), v) if kind.len() == 2 => match (kind[0].as_str(), v) {
            (Some("list" | "set"), Json::Array(items)) => {
                Mp::Array(items.iter().map(|i| encode(&kind[1], i)).collect())
            }
            (Some("map"), Json::Object(map)) => Mp::Map(
                map.iter()
                    .map(|(k, v)| (Mp::from(k.as_str()), encode(&kind[1], v)))
                    .collect(),
            ),
            (Some("object"), Json::Object(map)) => {
                let attributes = kind[1].as_object().cloned().unwrap_or_default();
                Mp::Map(
                    attributes
                        .iter()
                        .map(|(k, at)| {
                            (
                                Mp::from(k.as_str()),
                                encode(at, map.get(k).unwrap_or(&Json::Null)),
                            )
                        })
                        .collect(),
                )
            }
            (Some("tuple"), Json::Array(items)) => Mp::Array(
                kind[1]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .zip(items)
                    .map(|(t, v)| encode(t, v))
                    .collect(),
            ),
            _ => Mp::Nil,
        },
        _ => Mp::Nil,
    }
}

/// The proposed new state of a create, as Terraform core computes it: the configuration, with
/// every computed attribute it leaves null unknown.
pub fn proposed_create(block: &wire::Block, config: &Json) -> Mp {
    let t = block_type(block);
    let Mp::Map(mut entries) = encode(&t, config) else {
        return Mp::Nil;
    };
    for (key, value) in entries.iter_mut() {
        let computed = block
            .attributes
            .iter()
            .any(|a| a.computed && key.as_str() == Some(a.name.as_str()));
        if computed && value.is_nil() {
            *value = unknown();
        }
    }
    Mp::Map(entries)
}

/// Terraform's unknown value.
pub fn unknown() -> Mp {
    Mp::Ext(0, vec![0])
}

/// A value back as JSON (unknowns as null).
pub fn decode(value: &Mp) -> Json {
    match value {
        Mp::Nil | Mp::Ext(..) => Json::Null,
        Mp::Boolean(b) => Json::Bool(*b),
        Mp::Integer(i) => i
            .as_i64()
            .map(Json::from)
            .or_else(|| i.as_u64().map(Json::from))
            .unwrap_or(Json::Null),
        Mp::F32(f) => serde_json::Number::from_f64(f64::from(*f))
            .map(Json::Number)
            .unwrap_or(Json::Null),
        Mp::F64(f) => serde_json::Number::from_f64(*f)
            .map(Json::Number)
            .unwrap_or(Json::Null),
        Mp::String(s) => Json::String(s.as_str().unwrap_or_default().to_string()),
        Mp::Binary(b) => Json::String(String::from_utf8_lossy(b).into_owned()),
        Mp::Array(items) => Json::Array(items.iter().map(decode).collect()),
        Mp::Map(entries) => Json::Object(
            entries
                .iter()
                .map(|(k, v)| {
                    (
                        decode(k).as_str().unwrap_or_default().to_string(),
                        decode(v),
                    )
                })
                .collect(),
        ),
    }
}

/// A type for a JSON value of unknown type (`dynamic` attributes).
fn type_of(value: &Json) -> Type {
    match value {
        Json::Bool(_) => "bool".into(),
        Json::Number(_) => "number".into(),
        Json::String(_) | Json::Null => "string".into(),
        Json::Array(items) => {
            serde_json::json!(["tuple", items.iter().map(type_of).collect::<Vec<_>>()])
        }
        Json::Object(map) => serde_json::json!([
            "object",
            map.iter()
                .map(|(k, v)| (k.clone(), type_of(v)))
                .collect::<serde_json::Map<_, _>>()
        ]),
    }
}

/// MessagePack bytes of `value`.
pub fn to_bytes(value: &Mp) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, value).expect("writing to memory");
    out
}

/// A DynamicValue as a MessagePack value (JSON ones read as JSON).
pub fn from_dynamic(value: Option<&wire::DynamicValue>) -> Result<Mp, String> {
    let Some(value) = value else {
        return Ok(Mp::Nil);
    };
    if !value.msgpack.is_empty() {
        return rmpv::decode::read_value(&mut value.msgpack.as_slice())
            .map_err(|e| format!("not MessagePack: {e}"));
    }
    if !value.json.is_empty() {
        let json: Json =
            serde_json::from_slice(&value.json).map_err(|e| format!("not JSON: {e}"))?;
        return Ok(encode(&type_of(&json), &json));
    }
    Ok(Mp::Nil)
}

pub fn dynamic(value: &Mp) -> wire::DynamicValue {
    wire::DynamicValue {
        msgpack: to_bytes(value),
        json: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn objects_carry_every_attribute_and_round_trip() {
        let t = json!(["object", {"id": "string", "triggers": ["map", "string"], "n": "number", "on": "bool", "tags": ["set", "string"]}]);
        let v = json!({"triggers": {"a": "1"}, "n": 3, "on": true, "tags": ["x"]});
        let mp = encode(&t, &v);
        let Mp::Map(entries) = &mp else { panic!() };
        assert_eq!(entries.len(), 5, "every attribute present");
        let back = decode(&rmpv::decode::read_value(&mut to_bytes(&mp).as_slice()).unwrap());
        assert_eq!(
            back,
            json!({"id": null, "triggers": {"a": "1"}, "n": 3, "on": true, "tags": ["x"]})
        );
        // An unknown reads back as null; it is the extension type 0 on the wire.
        assert_eq!(decode(&unknown()), Json::Null);
        assert!(matches!(unknown(), Mp::Ext(0, _)));
    }
}
