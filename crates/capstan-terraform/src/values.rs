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
    let mut attributes = attributes_type(&block.attributes);
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

/// The types of `attributes`, nested attributes (protocol 6) as objects or collections of them.
fn attributes_type(attributes: &[wire::Attribute]) -> serde_json::Map<String, Type> {
    attributes
        .iter()
        .map(|a| (a.name.clone(), attribute_type(a)))
        .collect()
}

fn attribute_type(a: &wire::Attribute) -> Type {
    match &a.nested_type {
        Some(object) => {
            let inner = serde_json::json!(["object", attributes_type(&object.attributes)]);
            match object.nesting {
                2 => serde_json::json!(["list", inner]),
                3 => serde_json::json!(["set", inner]),
                4 => serde_json::json!(["map", inner]),
                _ => inner,
            }
        }
        None => serde_json::from_slice(&a.r#type).unwrap_or(Json::String("dynamic".into())),
    }
}

/// A configuration (JSON, as a deployment gives it) as Terraform encodes a block's value,
/// checked against the schema: a value of the wrong type is an error naming the attribute
/// (never data dropped). As Terraform's configuration language does, numbers and bools are
/// taken for strings and numeric or boolean strings for numbers and bools; a single object is
/// taken for a list or set block of at most one; an absent list or set block is empty, an
/// absent map block empty.
pub fn encode_config(block: &wire::Block, value: &Json) -> Result<Mp, String> {
    encode_block(block, value, "")
}

fn encode_block(block: &wire::Block, value: &Json, at: &str) -> Result<Mp, String> {
    let place = |name: &str| {
        if at.is_empty() {
            name.to_string()
        } else {
            format!("{at}.{name}")
        }
    };
    let map = match value {
        Json::Null => return Ok(Mp::Nil),
        Json::Object(map) => map,
        other => {
            return Err(format!(
                "`{}` must be an object, not {}",
                if at.is_empty() {
                    "the configuration"
                } else {
                    at
                },
                kind_of(other)
            ))
        }
    };
    let mut out = Vec::new();
    for a in &block.attributes {
        let v = map.get(&a.name).unwrap_or(&Json::Null);
        out.push((
            Mp::from(a.name.as_str()),
            encode_checked(&attribute_type(a), v, &place(&a.name))?,
        ));
    }
    for b in &block.block_types {
        let inner = b.block.clone().unwrap_or_default();
        let here = place(&b.type_name);
        let v = map.get(&b.type_name).unwrap_or(&Json::Null);
        let encoded = match (b.nesting, v) {
            (2 | 3, Json::Null) => Mp::Array(Vec::new()),
            (4, Json::Null) => Mp::Map(Vec::new()),
            (2 | 3, Json::Object(_)) if b.max_items == 1 => {
                Mp::Array(vec![encode_block(&inner, v, &format!("{here}[0]"))?])
            }
            (2 | 3, Json::Array(items)) => Mp::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(n, i)| encode_block(&inner, i, &format!("{here}[{n}]")))
                    .collect::<Result<_, _>>()?,
            ),
            (4, Json::Object(entries)) => Mp::Map(
                entries
                    .iter()
                    .map(|(k, i)| {
                        Ok((
                            Mp::from(k.as_str()),
                            encode_block(&inner, i, &format!("{here}[{k:?}]"))?,
                        ))
                    })
                    .collect::<Result<_, String>>()?,
            ),
            (1 | 5, v) => encode_block(&inner, v, &here)?,
            (2 | 3, other) => {
                return Err(format!(
                    "`{here}` is a list of blocks: give an array of objects, not {}",
                    kind_of(other)
                ))
            }
            (_, other) => {
                return Err(format!(
                    "`{here}` is a map of blocks: give an object of objects, not {}",
                    kind_of(other)
                ))
            }
        };
        out.push((Mp::from(b.type_name.as_str()), encoded));
    }
    if let Some(unknown) = map.keys().find(|k| {
        !block.attributes.iter().any(|a| &a.name == *k)
            && !block.block_types.iter().any(|b| &b.type_name == *k)
    }) {
        return Err(format!(
            "`{}` has no attribute or block `{unknown}`",
            if at.is_empty() { "it" } else { at }
        ));
    }
    Ok(Mp::Map(out))
}

/// `value` as type `t` requires, or why it cannot be.
fn encode_checked(t: &Type, value: &Json, at: &str) -> Result<Mp, String> {
    let wrong = |want: &str| format!("`{at}` must be {want}, not {}", kind_of(value));
    match (t, value) {
        (_, Json::Null) => Ok(Mp::Nil),
        (Json::String(s), v) => match (s.as_str(), v) {
            ("string", Json::String(x)) => Ok(Mp::from(x.as_str())),
            ("string", Json::Number(n)) => Ok(Mp::from(n.to_string().as_str())),
            ("string", Json::Bool(b)) => Ok(Mp::from(b.to_string().as_str())),
            ("string", _) => Err(wrong("a string")),
            ("number", Json::Number(_)) => Ok(encode(t, v)),
            ("number", Json::String(x)) if x.trim().parse::<f64>().is_ok() => {
                Ok(Mp::from(x.trim()))
            }
            ("number", _) => Err(wrong("a number")),
            ("bool", Json::Bool(b)) => Ok(Mp::from(*b)),
            ("bool", Json::String(x)) if x == "true" || x == "false" => Ok(Mp::from(x == "true")),
            ("bool", _) => Err(wrong("true or false")),
            ("dynamic", v) => Ok(encode(t, v)),
            (other, _) => Err(format!("`{at}` has a type Capstan does not know: {other}")),
        },
        (Json::Array(kind), v) if kind.len() >= 2 => match (kind[0].as_str(), v) {
            (Some("list" | "set"), Json::Array(items)) => Ok(Mp::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(n, i)| encode_checked(&kind[1], i, &format!("{at}[{n}]")))
                    .collect::<Result<_, _>>()?,
            )),
            (Some("list" | "set"), _) => Err(wrong("an array")),
            (Some("map"), Json::Object(map)) => Ok(Mp::Map(
                map.iter()
                    .map(|(k, i)| {
                        Ok((
                            Mp::from(k.as_str()),
                            encode_checked(&kind[1], i, &format!("{at}[{k:?}]"))?,
                        ))
                    })
                    .collect::<Result<_, String>>()?,
            )),
            (Some("map"), _) => Err(wrong("an object")),
            (Some("object"), Json::Object(map)) => {
                let attributes = kind[1].as_object().cloned().unwrap_or_default();
                if let Some(k) = map.keys().find(|k| !attributes.contains_key(*k)) {
                    return Err(format!("`{at}` has no attribute `{k}`"));
                }
                Ok(Mp::Map(
                    attributes
                        .iter()
                        .map(|(k, at_t)| {
                            Ok((
                                Mp::from(k.as_str()),
                                encode_checked(
                                    at_t,
                                    map.get(k).unwrap_or(&Json::Null),
                                    &format!("{at}.{k}"),
                                )?,
                            ))
                        })
                        .collect::<Result<_, String>>()?,
                ))
            }
            (Some("object"), _) => Err(wrong("an object")),
            (Some("tuple"), Json::Array(items)) => {
                let types = kind[1].as_array().cloned().unwrap_or_default();
                if types.len() != items.len() {
                    return Err(format!("`{at}` must have {} elements", types.len()));
                }
                Ok(Mp::Array(
                    types
                        .iter()
                        .zip(items)
                        .enumerate()
                        .map(|(n, (t, v))| encode_checked(t, v, &format!("{at}[{n}]")))
                        .collect::<Result<_, _>>()?,
                ))
            }
            (Some("tuple"), _) => Err(wrong("an array")),
            _ => Err(format!("`{at}` has a type Capstan does not know: {t}")),
        },
        _ => Err(format!("`{at}` has a type Capstan does not know: {t}")),
    }
}

/// A JSON value's kind, for messages.
fn kind_of(value: &Json) -> &'static str {
    match value {
        Json::Null => "null",
        Json::Bool(_) => "a bool",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
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
        (Json::Array(kind), v) if kind.len() >= 2 => match (kind[0].as_str(), v) {
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

/// The proposed new state, as Terraform core computes it (`objchange.ProposedNew`) from the
/// prior state (`Nil` for a create) and the configuration, both already shaped by the block's
/// type: the configuration, where each computed attribute it leaves null keeps its prior
/// value; nested blocks and nested attributes likewise, element by element (lists by index,
/// maps by key, sets without a prior).
pub fn proposed_new(block: &wire::Block, prior: &Mp, config: &Mp) -> Mp {
    if config.is_nil() {
        return Mp::Nil;
    }
    let mut out = Vec::new();
    for a in &block.attributes {
        let p = field(prior, &a.name);
        let c = field(config, &a.name);
        let v = if a.computed && c.is_nil() {
            p.clone()
        } else if let (Some(object), false) = (&a.nested_type, c.is_nil()) {
            let inner = wire::Block {
                attributes: object.attributes.clone(),
                ..Default::default()
            };
            nested(&inner, object.nesting, p, c)
        } else {
            c.clone()
        };
        out.push((Mp::from(a.name.as_str()), v));
    }
    for b in &block.block_types {
        let inner = b.block.clone().unwrap_or_default();
        let v = nested(
            &inner,
            b.nesting,
            field(prior, &b.type_name),
            field(config, &b.type_name),
        );
        out.push((Mp::from(b.type_name.as_str()), v));
    }
    Mp::Map(out)
}

/// A nested value of nesting mode `nesting` (SINGLE 1, LIST 2, SET 3, MAP 4, GROUP 5).
fn nested(block: &wire::Block, nesting: i32, prior: &Mp, config: &Mp) -> Mp {
    match (nesting, config) {
        (2, Mp::Array(items)) => Mp::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let p = match prior {
                        Mp::Array(prior) => prior.get(i).unwrap_or(&Mp::Nil),
                        _ => &Mp::Nil,
                    };
                    proposed_new(block, p, c)
                })
                .collect(),
        ),
        (3, Mp::Array(items)) => Mp::Array(
            items
                .iter()
                .map(|c| proposed_new(block, &Mp::Nil, c))
                .collect(),
        ),
        (4, Mp::Map(entries)) => Mp::Map(
            entries
                .iter()
                .map(|(k, c)| {
                    let p = k.as_str().map_or(&Mp::Nil, |k| field(prior, k));
                    (k.clone(), proposed_new(block, p, c))
                })
                .collect(),
        ),
        (1 | 5, c) => proposed_new(block, prior, c),
        (_, c) => c.clone(),
    }
}

/// The attribute `name` of an object value (`Nil` when absent).
fn field<'a>(object: &'a Mp, name: &str) -> &'a Mp {
    static NIL: Mp = Mp::Nil;
    match object {
        Mp::Map(entries) => entries
            .iter()
            .find(|(k, _)| k.as_str() == Some(name))
            .map_or(&NIL, |(_, v)| v),
        _ => &NIL,
    }
}

/// The part of `value` at `path` (`None` where the path leads nowhere).
pub fn at_path<'a>(value: &'a Mp, path: &wire::AttributePath) -> Option<&'a Mp> {
    let mut here = value;
    for step in &path.steps {
        here = match (&step.selector, here) {
            (
                Some(wire::Selector::AttributeName(key) | wire::Selector::ElementKeyString(key)),
                Mp::Map(entries),
            ) => entries
                .iter()
                .find(|(k, _)| k.as_str() == Some(key.as_str()))
                .map(|(_, v)| v)?,
            (Some(wire::Selector::ElementKeyInt(i)), Mp::Array(items)) => {
                items.get(usize::try_from(*i).ok()?)?
            }
            _ => return None,
        };
    }
    Some(here)
}

/// Whether `value` is, or holds, an unknown value.
pub fn has_unknown(value: &Mp) -> bool {
    match value {
        Mp::Ext(0, _) => true,
        Mp::Array(items) => items.iter().any(has_unknown),
        Mp::Map(entries) => entries.iter().any(|(_, v)| has_unknown(v)),
        _ => false,
    }
}

/// Terraform's unknown value.
pub fn unknown() -> Mp {
    Mp::Ext(0, vec![0])
}

/// A value back as JSON (unknowns as null). A value of a `dynamic` attribute, which travels as
/// `[type JSON as bytes, value]` (cty's encoding; plain strings are never bytes), is the value.
pub fn decode(value: &Mp) -> Json {
    if let Mp::Array(pair) = value {
        if let [Mp::Binary(t), inner] = pair.as_slice() {
            if serde_json::from_slice::<Json>(t).is_ok() {
                return decode(inner);
            }
        }
    }
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

    fn attribute(name: &str, t: &str, computed: bool, optional: bool) -> wire::Attribute {
        wire::Attribute {
            name: name.into(),
            r#type: format!("{t:?}").into_bytes(),
            computed,
            optional,
            required: !computed && !optional,
            ..Default::default()
        }
    }

    #[test]
    fn the_proposed_new_state_keeps_prior_computed_values_as_terraform_does() {
        let tag = wire::Block {
            attributes: vec![
                attribute("key", "string", false, false),
                attribute("uid", "string", true, false),
            ],
            ..Default::default()
        };
        let block = wire::Block {
            attributes: vec![
                attribute("id", "string", true, false),
                attribute("name", "string", false, false),
                attribute("size", "number", true, true),
            ],
            block_types: vec![wire::NestedBlock {
                type_name: "tag".into(),
                block: Some(tag),
                nesting: 2,
                ..Default::default()
            }],
            ..Default::default()
        };
        let t = block_type(&block);
        let prior = encode(
            &t,
            &json!({"id": "a1", "name": "x", "size": 3, "tag": [{"key": "k", "uid": "u1"}]}),
        );
        let config = encode(
            &t,
            &json!({"name": "y", "tag": [{"key": "k2"}, {"key": "k3"}]}),
        );
        let proposed = decode(&proposed_new(&block, &prior, &config));
        assert_eq!(
            proposed,
            json!({"id": "a1", "name": "y", "size": 3,
                   "tag": [{"key": "k2", "uid": "u1"}, {"key": "k3", "uid": null}]})
        );
        // A create: nothing prior, computed attributes null for the provider to plan.
        let created = decode(&proposed_new(&block, &Mp::Nil, &config));
        assert_eq!(created["id"], Json::Null);
        // An optional and computed attribute set in the configuration is the configuration's.
        let config = encode(&t, &json!({"name": "y", "size": 9, "tag": []}));
        assert_eq!(
            decode(&proposed_new(&block, &prior, &config))["size"],
            json!(9)
        );
    }

    #[test]
    fn nested_attributes_are_objects_or_collections_of_them() {
        let a = wire::Attribute {
            name: "rules".into(),
            nested_type: Some(wire::Object {
                attributes: vec![attribute("port", "number", false, false)],
                nesting: 2,
            }),
            optional: true,
            ..Default::default()
        };
        let block = wire::Block {
            attributes: vec![a],
            ..Default::default()
        };
        assert_eq!(
            block_type(&block),
            json!(["object", {"rules": ["list", ["object", {"port": "number"}]]}])
        );
    }

    #[test]
    fn dynamic_values_round_trip_without_growing() {
        let t = json!(["object", {"manifest": "dynamic"}]);
        let v = json!({"manifest": {"kind": "ConfigMap", "data": {"a": "1"}}});
        let once = decode(&encode(&t, &v));
        assert_eq!(once, v);
        assert_eq!(decode(&encode(&t, &once)), v);
    }

    #[test]
    fn configurations_are_checked_against_the_schema() {
        let inner = wire::Block {
            attributes: vec![attribute("role", "string", false, false)],
            ..Default::default()
        };
        let block = wire::Block {
            attributes: vec![
                attribute("count", "number", false, true),
                attribute("name", "string", false, true),
            ],
            block_types: vec![
                wire::NestedBlock {
                    type_name: "assume".into(),
                    block: Some(inner.clone()),
                    nesting: 2,
                    max_items: 1,
                    ..Default::default()
                },
                wire::NestedBlock {
                    type_name: "rule".into(),
                    block: Some(inner),
                    nesting: 3,
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        // A single object for a block of at most one; absent blocks empty; strings for
        // numbers and numbers for strings, as Terraform's language converts them.
        let ok = encode_config(
            &block,
            &json!({"count": "3", "name": 7, "assume": {"role": "r"}}),
        )
        .unwrap();
        assert_eq!(
            decode(&ok),
            json!({"count": "3", "name": "7", "assume": [{"role": "r"}], "rule": []})
        );
        let err = encode_config(&block, &json!({"count": true})).unwrap_err();
        assert_eq!(err, "`count` must be a number, not a bool");
        let err = encode_config(&block, &json!({"rule": [{"role": ["x"]}]})).unwrap_err();
        assert_eq!(err, "`rule[0].role` must be a string, not an array");
        let err = encode_config(&block, &json!({"nmae": "x"})).unwrap_err();
        assert!(err.contains("no attribute or block `nmae`"), "{err}");
    }

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
