//! Capstan's own definitions of the parts of Terraform's plugin protocols (`tfplugin5` and
//! `tfplugin6`) and of go-plugin it uses, wire-compatible with the published protocols: the
//! same packages, services, messages and field numbers. Written as `prost` messages, so `cargo
//! build` needs no protobuf compiler.
//!
//! The two protocols share every message Capstan uses, field for field (protocol 6 adds nested
//! attributes, `Schema.Attribute.nested_type`, which protocol 5 never sends); they differ in
//! the names of some methods, which [`Protocol::path`] gives.

/// A Terraform plugin protocol version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    V5,
    V6,
}

/// A method of the `Provider` service (and of go-plugin's services).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    GetProviderSchema,
    ValidateProviderConfig,
    ConfigureProvider,
    ValidateResourceConfig,
    ValidateDataResourceConfig,
    UpgradeResourceState,
    PlanResourceChange,
    ApplyResourceChange,
    ReadResource,
    ReadDataSource,
    StopProvider,
    /// go-plugin's `GRPCController.Shutdown`.
    Shutdown,
    /// go-plugin's `GRPCStdio.StreamStdio`.
    StreamStdio,
}

impl Protocol {
    /// From the handshake line's protocol field.
    pub fn parse(version: &str) -> Option<Protocol> {
        match version {
            "5" => Some(Protocol::V5),
            "6" => Some(Protocol::V6),
            _ => None,
        }
    }

    /// The gRPC path of `method` in this protocol.
    pub fn path(self, method: Method) -> &'static str {
        use Method::*;
        match (self, method) {
            (_, Shutdown) => "/plugin.GRPCController/Shutdown",
            (_, StreamStdio) => "/plugin.GRPCStdio/StreamStdio",
            (Protocol::V5, GetProviderSchema) => "/tfplugin5.Provider/GetSchema",
            (Protocol::V5, ValidateProviderConfig) => "/tfplugin5.Provider/PrepareProviderConfig",
            (Protocol::V5, ConfigureProvider) => "/tfplugin5.Provider/Configure",
            (Protocol::V5, ValidateResourceConfig) => {
                "/tfplugin5.Provider/ValidateResourceTypeConfig"
            }
            (Protocol::V5, ValidateDataResourceConfig) => {
                "/tfplugin5.Provider/ValidateDataSourceConfig"
            }
            (Protocol::V5, UpgradeResourceState) => "/tfplugin5.Provider/UpgradeResourceState",
            (Protocol::V5, PlanResourceChange) => "/tfplugin5.Provider/PlanResourceChange",
            (Protocol::V5, ApplyResourceChange) => "/tfplugin5.Provider/ApplyResourceChange",
            (Protocol::V5, ReadResource) => "/tfplugin5.Provider/ReadResource",
            (Protocol::V5, ReadDataSource) => "/tfplugin5.Provider/ReadDataSource",
            (Protocol::V5, StopProvider) => "/tfplugin5.Provider/Stop",
            (Protocol::V6, GetProviderSchema) => "/tfplugin6.Provider/GetProviderSchema",
            (Protocol::V6, ValidateProviderConfig) => "/tfplugin6.Provider/ValidateProviderConfig",
            (Protocol::V6, ConfigureProvider) => "/tfplugin6.Provider/ConfigureProvider",
            (Protocol::V6, ValidateResourceConfig) => "/tfplugin6.Provider/ValidateResourceConfig",
            (Protocol::V6, ValidateDataResourceConfig) => {
                "/tfplugin6.Provider/ValidateDataResourceConfig"
            }
            (Protocol::V6, UpgradeResourceState) => "/tfplugin6.Provider/UpgradeResourceState",
            (Protocol::V6, PlanResourceChange) => "/tfplugin6.Provider/PlanResourceChange",
            (Protocol::V6, ApplyResourceChange) => "/tfplugin6.Provider/ApplyResourceChange",
            (Protocol::V6, ReadResource) => "/tfplugin6.Provider/ReadResource",
            (Protocol::V6, ReadDataSource) => "/tfplugin6.Provider/ReadDataSource",
            (Protocol::V6, StopProvider) => "/tfplugin6.Provider/StopProvider",
        }
    }
}

/// `GetProviderSchema.Request`: empty.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GetProviderSchemaRequest {}

/// `GetProviderSchema.Response`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GetProviderSchemaResponse {
    #[prost(message, optional, tag = "1")]
    pub provider: Option<Schema>,
    #[prost(map = "string, message", tag = "2")]
    pub resource_schemas: std::collections::HashMap<String, Schema>,
    #[prost(map = "string, message", tag = "3")]
    pub data_source_schemas: std::collections::HashMap<String, Schema>,
    #[prost(message, repeated, tag = "4")]
    pub diagnostics: Vec<Diagnostic>,
    #[prost(message, optional, tag = "5")]
    pub provider_meta: Option<Schema>,
}

/// `Schema`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Schema {
    #[prost(int64, tag = "1")]
    pub version: i64,
    #[prost(message, optional, tag = "2")]
    pub block: Option<Block>,
}

/// `Schema.Block`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Block {
    #[prost(int64, tag = "1")]
    pub version: i64,
    #[prost(message, repeated, tag = "2")]
    pub attributes: Vec<Attribute>,
    #[prost(message, repeated, tag = "3")]
    pub block_types: Vec<NestedBlock>,
    #[prost(string, tag = "4")]
    pub description: String,
    #[prost(int32, tag = "5")]
    pub description_kind: i32,
    #[prost(bool, tag = "6")]
    pub deprecated: bool,
}

/// `Schema.Attribute`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Attribute {
    #[prost(string, tag = "1")]
    pub name: String,
    /// The attribute's type, as a JSON type expression (`"string"`, `["map","string"]`).
    #[prost(bytes = "vec", tag = "2")]
    pub r#type: Vec<u8>,
    #[prost(string, tag = "3")]
    pub description: String,
    #[prost(bool, tag = "4")]
    pub required: bool,
    #[prost(bool, tag = "5")]
    pub optional: bool,
    #[prost(bool, tag = "6")]
    pub computed: bool,
    #[prost(bool, tag = "7")]
    pub sensitive: bool,
    #[prost(int32, tag = "8")]
    pub description_kind: i32,
    #[prost(bool, tag = "9")]
    pub deprecated: bool,
    /// Protocol 6: the attribute is an object, or a collection of objects, of these attributes.
    #[prost(message, optional, tag = "10")]
    pub nested_type: Option<Object>,
}

/// `Schema.Object` (protocol 6): nested attributes.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Object {
    #[prost(message, repeated, tag = "1")]
    pub attributes: Vec<Attribute>,
    /// INVALID 0, SINGLE 1, LIST 2, SET 3, MAP 4.
    #[prost(int32, tag = "3")]
    pub nesting: i32,
}

/// `Schema.NestedBlock`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct NestedBlock {
    #[prost(string, tag = "1")]
    pub type_name: String,
    #[prost(message, optional, tag = "2")]
    pub block: Option<Block>,
    /// INVALID 0, SINGLE 1, LIST 2, SET 3, MAP 4, GROUP 5.
    #[prost(int32, tag = "3")]
    pub nesting: i32,
    #[prost(int64, tag = "4")]
    pub min_items: i64,
    #[prost(int64, tag = "5")]
    pub max_items: i64,
}

/// `Diagnostic`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Diagnostic {
    /// INVALID 0, ERROR 1, WARNING 2.
    #[prost(int32, tag = "1")]
    pub severity: i32,
    #[prost(string, tag = "2")]
    pub summary: String,
    #[prost(string, tag = "3")]
    pub detail: String,
    #[prost(message, optional, tag = "4")]
    pub attribute: Option<AttributePath>,
}

/// `AttributePath`: where in a value a diagnostic or a forced replacement points.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AttributePath {
    #[prost(message, repeated, tag = "1")]
    pub steps: Vec<Step>,
}

/// `AttributePath.Step`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Step {
    #[prost(oneof = "Selector", tags = "1, 2, 3")]
    pub selector: Option<Selector>,
}

/// `AttributePath.Step.selector`.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Selector {
    #[prost(string, tag = "1")]
    AttributeName(String),
    #[prost(string, tag = "2")]
    ElementKeyString(String),
    #[prost(int64, tag = "3")]
    ElementKeyInt(i64),
}

impl std::fmt::Display for AttributePath {
    /// As Terraform writes one: `tag[0].key`, `labels["a"]`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (n, step) in self.steps.iter().enumerate() {
            match &step.selector {
                Some(Selector::AttributeName(name)) if n == 0 => write!(f, "{name}")?,
                Some(Selector::AttributeName(name)) => write!(f, ".{name}")?,
                Some(Selector::ElementKeyString(key)) => write!(f, "[{key:?}]")?,
                Some(Selector::ElementKeyInt(i)) => write!(f, "[{i}]")?,
                None => {}
            }
        }
        Ok(())
    }
}

/// `plugin.Empty` (go-plugin's controller).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Empty {}

/// `DynamicValue`: a value in MessagePack (what Terraform sends) or JSON.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DynamicValue {
    #[prost(bytes = "vec", tag = "1")]
    pub msgpack: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub json: Vec<u8>,
}

/// `Configure.Request`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ConfigureRequest {
    #[prost(string, tag = "1")]
    pub terraform_version: String,
    #[prost(message, optional, tag = "2")]
    pub config: Option<DynamicValue>,
}

/// `Configure.Response`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ConfigureResponse {
    #[prost(message, repeated, tag = "1")]
    pub diagnostics: Vec<Diagnostic>,
}

/// `PlanResourceChange.Request`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PlanResourceChangeRequest {
    #[prost(string, tag = "1")]
    pub type_name: String,
    #[prost(message, optional, tag = "2")]
    pub prior_state: Option<DynamicValue>,
    #[prost(message, optional, tag = "3")]
    pub proposed_new_state: Option<DynamicValue>,
    #[prost(message, optional, tag = "4")]
    pub config: Option<DynamicValue>,
    #[prost(bytes = "vec", tag = "5")]
    pub prior_private: Vec<u8>,
    #[prost(message, optional, tag = "6")]
    pub provider_meta: Option<DynamicValue>,
}

/// `PlanResourceChange.Response`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PlanResourceChangeResponse {
    #[prost(message, optional, tag = "1")]
    pub planned_state: Option<DynamicValue>,
    #[prost(message, repeated, tag = "2")]
    pub requires_replace: Vec<AttributePath>,
    #[prost(bytes = "vec", tag = "3")]
    pub planned_private: Vec<u8>,
    #[prost(message, repeated, tag = "4")]
    pub diagnostics: Vec<Diagnostic>,
}

/// `ApplyResourceChange.Request`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ApplyResourceChangeRequest {
    #[prost(string, tag = "1")]
    pub type_name: String,
    #[prost(message, optional, tag = "2")]
    pub prior_state: Option<DynamicValue>,
    #[prost(message, optional, tag = "3")]
    pub planned_state: Option<DynamicValue>,
    #[prost(message, optional, tag = "4")]
    pub config: Option<DynamicValue>,
    #[prost(bytes = "vec", tag = "5")]
    pub planned_private: Vec<u8>,
    #[prost(message, optional, tag = "6")]
    pub provider_meta: Option<DynamicValue>,
}

/// `ApplyResourceChange.Response`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ApplyResourceChangeResponse {
    #[prost(message, optional, tag = "1")]
    pub new_state: Option<DynamicValue>,
    #[prost(bytes = "vec", tag = "2")]
    pub private: Vec<u8>,
    #[prost(message, repeated, tag = "3")]
    pub diagnostics: Vec<Diagnostic>,
}

/// `ReadResource.Request`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ReadResourceRequest {
    #[prost(string, tag = "1")]
    pub type_name: String,
    #[prost(message, optional, tag = "2")]
    pub current_state: Option<DynamicValue>,
    #[prost(bytes = "vec", tag = "3")]
    pub private: Vec<u8>,
    #[prost(message, optional, tag = "4")]
    pub provider_meta: Option<DynamicValue>,
}

/// `ReadResource.Response`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ReadResourceResponse {
    #[prost(message, optional, tag = "1")]
    pub new_state: Option<DynamicValue>,
    #[prost(message, repeated, tag = "2")]
    pub diagnostics: Vec<Diagnostic>,
    #[prost(bytes = "vec", tag = "3")]
    pub private: Vec<u8>,
}

/// `ReadDataSource.Request`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ReadDataSourceRequest {
    #[prost(string, tag = "1")]
    pub type_name: String,
    #[prost(message, optional, tag = "2")]
    pub config: Option<DynamicValue>,
    #[prost(message, optional, tag = "3")]
    pub provider_meta: Option<DynamicValue>,
}

/// `ReadDataSource.Response`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ReadDataSourceResponse {
    #[prost(message, optional, tag = "1")]
    pub state: Option<DynamicValue>,
    #[prost(message, repeated, tag = "2")]
    pub diagnostics: Vec<Diagnostic>,
}

/// `ValidateProviderConfig.Request` (protocol 5: `PrepareProviderConfig.Request`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ValidateProviderConfigRequest {
    #[prost(message, optional, tag = "1")]
    pub config: Option<DynamicValue>,
}

/// `ValidateProviderConfig.Response`; protocol 5's `PrepareProviderConfig.Response` also
/// carries the configuration with its defaults filled in.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ValidateProviderConfigResponse {
    #[prost(message, optional, tag = "1")]
    pub prepared_config: Option<DynamicValue>,
    #[prost(message, repeated, tag = "2")]
    pub diagnostics: Vec<Diagnostic>,
}

/// `ValidateResourceConfig.Request` and `ValidateDataResourceConfig.Request` (protocol 5:
/// `ValidateResourceTypeConfig`, `ValidateDataSourceConfig`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct ValidateConfigRequest {
    #[prost(string, tag = "1")]
    pub type_name: String,
    #[prost(message, optional, tag = "2")]
    pub config: Option<DynamicValue>,
}

/// Their responses.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ValidateConfigResponse {
    #[prost(message, repeated, tag = "1")]
    pub diagnostics: Vec<Diagnostic>,
}

/// `RawState`: a state as recorded, in JSON.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RawState {
    #[prost(bytes = "vec", tag = "1")]
    pub json: Vec<u8>,
    #[prost(map = "string, string", tag = "2")]
    pub flatmap: std::collections::HashMap<String, String>,
}

/// `UpgradeResourceState.Request`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct UpgradeResourceStateRequest {
    #[prost(string, tag = "1")]
    pub type_name: String,
    /// The schema version the state was recorded with.
    #[prost(int64, tag = "2")]
    pub version: i64,
    #[prost(message, optional, tag = "3")]
    pub raw_state: Option<RawState>,
}

/// `UpgradeResourceState.Response`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct UpgradeResourceStateResponse {
    #[prost(message, optional, tag = "1")]
    pub upgraded_state: Option<DynamicValue>,
    #[prost(message, repeated, tag = "2")]
    pub diagnostics: Vec<Diagnostic>,
}

/// `StopProvider.Response` (its request is empty).
#[derive(Clone, PartialEq, prost::Message)]
pub struct StopProviderResponse {
    #[prost(string, tag = "1")]
    pub error: String,
}

/// go-plugin's `StdioData`: a chunk of the plugin's own stdout or stderr.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StdioData {
    /// INVALID 0, STDOUT 1, STDERR 2.
    #[prost(int32, tag = "1")]
    pub channel: i32,
    #[prost(bytes = "vec", tag = "2")]
    pub data: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attribute_paths_read_as_terraform_writes_them() {
        let step = |s| Step { selector: Some(s) };
        let path = AttributePath {
            steps: vec![
                step(Selector::AttributeName("tag".into())),
                step(Selector::ElementKeyInt(0)),
                step(Selector::AttributeName("key".into())),
                step(Selector::ElementKeyString("a".into())),
            ],
        };
        assert_eq!(path.to_string(), "tag[0].key[\"a\"]");
    }

    #[test]
    fn method_paths_differ_by_protocol() {
        assert_eq!(
            Protocol::V5.path(Method::ConfigureProvider),
            "/tfplugin5.Provider/Configure"
        );
        assert_eq!(
            Protocol::V6.path(Method::ConfigureProvider),
            "/tfplugin6.Provider/ConfigureProvider"
        );
        assert_eq!(Protocol::parse("4"), None);
    }
}
