//! A Terraform provider's schema as Capstan's handshake describes it.

use super::*;

/// The schema version of a resource type.
pub fn schema_version(schema: &wire::GetProviderSchemaResponse, type_name: &str) -> i64 {
    schema
        .resource_schemas
        .get(type_name)
        .map_or(0, |s| s.version)
}

/// Whether an attribute is sensitive, or holds one (nested attributes).
pub(crate) fn attribute_sensitive(a: &wire::Attribute) -> bool {
    a.sensitive
        || a.nested_type
            .as_ref()
            .is_some_and(|o| o.attributes.iter().any(attribute_sensitive))
}

/// Whether a block holds a sensitive attribute, at any depth.
pub(crate) fn block_sensitive(b: &wire::Block) -> bool {
    b.attributes.iter().any(attribute_sensitive)
        || b.block_types
            .iter()
            .any(|n| n.block.as_ref().is_some_and(block_sensitive))
}

/// A Terraform provider's schema as Capstan's handshake describes it: each resource type's
/// required and optional attributes are inputs, all its attributes (computed ones too)
/// outputs; nested blocks are inputs and outputs holding JSON objects or arrays; sensitive
/// attributes are marked so. Data sources are types named `data.NAME` (read-only).
pub fn provider_info(name: &str, schema: &wire::GetProviderSchemaResponse) -> ProviderInfo {
    let mut types: Vec<ResourceTypeInfo> = Vec::new();
    let mut add = |type_name: String, schema: &wire::Schema, data: bool| {
        let block = schema.block.clone().unwrap_or_default();
        let mut info = ResourceTypeInfo {
            name: type_name,
            description: block.description.clone(),
            stateful: !data,
            // Reading a data source changes nothing: no intent, never left pending.
            read_only: data,
            ..Default::default()
        };
        for a in &block.attributes {
            let settable = a.required || a.optional;
            // A nested attribute holding a sensitive one is hidden whole.
            let sensitive = attribute_sensitive(a);
            if settable {
                info.inputs.push(InputInfo {
                    name: a.name.clone(),
                    required: a.required,
                    description: a.description.clone(),
                    sensitive,
                });
            }
            info.outputs.push(OutputInfo {
                name: a.name.clone(),
                description: a.description.clone(),
                sensitive,
                public: false,
                prior_unused: false,
            });
        }
        for b in &block.block_types {
            let kind = match b.nesting {
                1 | 5 => "an object",
                4 => "an object of objects",
                _ => "a list of objects",
            };
            // A block holding a sensitive attribute is hidden whole.
            let sensitive = b.block.as_ref().is_some_and(block_sensitive);
            info.inputs.push(InputInfo {
                name: b.type_name.clone(),
                required: b.min_items > 0,
                description: format!("a nested block: {kind}"),
                sensitive,
            });
            info.outputs.push(OutputInfo {
                name: b.type_name.clone(),
                description: format!("a nested block: {kind}"),
                sensitive,
                public: false,
                prior_unused: false,
            });
        }
        types.push(info);
    };
    let mut resources: Vec<_> = schema.resource_schemas.iter().collect();
    resources.sort_by(|a, b| a.0.cmp(b.0));
    for (type_name, s) in resources {
        add(type_name.clone(), s, false);
    }
    let mut data: Vec<_> = schema.data_source_schemas.iter().collect();
    data.sort_by(|a, b| a.0.cmp(b.0));
    for (type_name, s) in data {
        add(format!("data.{type_name}"), s, true);
    }
    ProviderInfo {
        name: name.to_string(),
        version: String::new(),
        min_protocol: 0,
        max_protocol: 0,
        protocol: 0,
        max_concurrency: 0,
        prior_inputs_once: false,
        opens_progress: false,
        resource_types: types,
    }
}

/// What `capstan provider describe --terraform` prints: the provider as Capstan types (as any
/// provider's handshake), with the plugin protocol it speaks (5 or 6), its own settings'
/// schema (`providerConfig`, what `config` takes), and each type's Terraform schema in full
/// (`terraform`: every attribute with its type, required/optional/computed, sensitive and
/// deprecated; nested blocks with their nesting, item counts and contents).
pub fn describe(
    name: &str,
    protocol: wire::Protocol,
    schema: &wire::GetProviderSchemaResponse,
) -> serde_json::Value {
    let info = provider_info(name, schema);
    let mut out = serde_json::to_value(&info).unwrap_or_default();
    let number = match protocol {
        wire::Protocol::V5 => 5,
        wire::Protocol::V6 => 6,
    };
    if let Some(object) = out.as_object_mut() {
        object.insert("protocol".into(), number.into());
        object.remove("minProtocol");
        object.remove("maxProtocol");
        object.insert(
            "providerConfig".into(),
            schema
                .provider
                .as_ref()
                .and_then(|s| s.block.as_ref())
                .map_or(serde_json::Value::Null, block_json),
        );
    }
    let schema_of = |type_name: &str| {
        match type_name.strip_prefix("data.") {
            Some(data) => schema.data_source_schemas.get(data),
            None => schema.resource_schemas.get(type_name),
        }
        .and_then(|s| s.block.as_ref())
    };
    let types = out
        .get_mut("resourceTypes")
        .and_then(serde_json::Value::as_array_mut);
    for t in types.into_iter().flatten() {
        let name = t
            .get("name")
            .and_then(|n| n.as_str())
            .unwrap_or_default()
            .to_string();
        if let (Some(block), Some(t)) = (schema_of(&name), t.as_object_mut()) {
            t.insert("terraform".into(), block_json(block));
        }
    }
    out
}

/// A Terraform schema block as JSON: its attributes by name and its nested blocks by name.
fn block_json(block: &wire::Block) -> serde_json::Value {
    let attributes: serde_json::Map<String, serde_json::Value> = block
        .attributes
        .iter()
        .map(|a| (a.name.clone(), attribute_json(a)))
        .collect();
    let blocks: serde_json::Map<String, serde_json::Value> = block
        .block_types
        .iter()
        .map(|b| {
            let mut nested = b.block.as_ref().map_or(serde_json::json!({}), block_json);
            if let Some(n) = nested.as_object_mut() {
                n.insert("nesting".into(), nesting_name(b.nesting).into());
                n.insert("minItems".into(), b.min_items.into());
                n.insert("maxItems".into(), b.max_items.into());
            }
            (b.type_name.clone(), nested)
        })
        .collect();
    let mut out = serde_json::json!({"attributes": attributes, "blocks": blocks});
    if block.deprecated {
        out["deprecated"] = true.into();
    }
    if !block.description.is_empty() {
        out["description"] = block.description.clone().into();
    }
    out
}

fn attribute_json(a: &wire::Attribute) -> serde_json::Value {
    let mut out = serde_json::json!({
        "required": a.required,
        "optional": a.optional,
        "computed": a.computed,
    });
    if !a.r#type.is_empty() {
        // A cty type expression: "string", ["list","number"], ["object",{…}].
        out["type"] = serde_json::from_slice(&a.r#type)
            .unwrap_or_else(|_| String::from_utf8_lossy(&a.r#type).into_owned().into());
    }
    if let Some(nested) = &a.nested_type {
        let attributes: serde_json::Map<String, serde_json::Value> = nested
            .attributes
            .iter()
            .map(|n| (n.name.clone(), attribute_json(n)))
            .collect();
        out["nested"] = serde_json::json!({
            "nesting": nesting_name(nested.nesting),
            "attributes": attributes,
        });
    }
    for (flag, set) in [("sensitive", a.sensitive), ("deprecated", a.deprecated)] {
        if set {
            out[flag] = true.into();
        }
    }
    if !a.description.is_empty() {
        out["description"] = a.description.clone().into();
    }
    out
}

/// Terraform's nesting modes by name.
fn nesting_name(nesting: i32) -> &'static str {
    match nesting {
        1 => "single",
        2 => "list",
        3 => "set",
        4 => "map",
        5 => "group",
        _ => "invalid",
    }
}
