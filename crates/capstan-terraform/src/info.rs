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
        resource_types: types,
    }
}
