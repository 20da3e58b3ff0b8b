//! `capstanfixture_file`: a file `<root>/<path>` holding `content`.
//!
//! The schema version comes from `FIXTURE_SCHEMA_VERSION` (default 2). In
//! version 1 the attribute `content` is called `text`.
//!
//! State upgrades: tf-provider 0.2.2 answers UpgradeResourceState itself when
//! the stored version equals the schema version (the raw JSON goes back
//! unchanged). For any other version it calls `Resource::upgrade(diags,
//! version, prior_state: RawValue)`, but `RawValue` lives in the crate's
//! private `raw` module and is not re-exported, so no downstream crate can
//! write that method's signature: the default ("Upgrade is not supported")
//! is the only behaviour available. A version-1 state under the version-2
//! schema therefore gets that error diagnostic. `FileState` still reads both
//! `text` and `content` (serde alias) and writes the name of the current
//! version, so a v1 provider and a v2 provider each handle their own states.

use std::sync::OnceLock;

use async_trait::async_trait;
use serde::ser::SerializeStruct;
use serde::{Deserialize, Serialize, Serializer};
use tf_provider::schema::{
    AttributeConstraint, AttributeType, Block, Description, NestedBlock, Schema,
};
use tf_provider::value::{Value, ValueEmpty, ValueList, ValueNumber, ValueString};
use tf_provider::{map, AttributePath, Diagnostics, Resource};

use crate::common::{
    attr, check_relative, new_token, remove_if_present, resolve, secret_path, Meta, Shared,
};

/// Schema version of `capstanfixture_file`: 1 if `FIXTURE_SCHEMA_VERSION=1`, else 2.
pub fn schema_version() -> i64 {
    static VERSION: OnceLock<i64> = OnceLock::new();
    *VERSION.get_or_init(|| match std::env::var("FIXTURE_SCHEMA_VERSION") {
        Ok(v) if v.trim() == "1" => 1,
        _ => 2,
    })
}

/// Name of the content attribute in the current schema version.
fn content_key() -> &'static str {
    if schema_version() == 1 {
        "text"
    } else {
        "content"
    }
}

/// One `tag { key = ..., value = ... }` block.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tag {
    #[serde(default)]
    pub key: ValueString<'static>,
    #[serde(default)]
    pub value: ValueString<'static>,
}

/// State (and config) of `capstanfixture_file`.
///
/// Deserialization accepts both `content` (v2) and `text` (v1); serialization
/// writes the name of the current schema version.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct FileState {
    #[serde(default)]
    pub id: ValueString<'static>,
    #[serde(default)]
    pub path: ValueString<'static>,
    #[serde(default, alias = "text")]
    pub content: ValueString<'static>,
    #[serde(default)]
    pub size: ValueNumber,
    #[serde(default)]
    pub token: ValueString<'static>,
    #[serde(default)]
    pub secret: ValueString<'static>,
    #[serde(default)]
    pub tag: ValueList<Tag>,
}

impl Serialize for FileState {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("FileState", 7)?;
        s.serialize_field("id", &self.id)?;
        s.serialize_field("path", &self.path)?;
        s.serialize_field(content_key(), &self.content)?;
        s.serialize_field("size", &self.size)?;
        s.serialize_field("token", &self.token)?;
        s.serialize_field("secret", &self.secret)?;
        s.serialize_field("tag", &self.tag)?;
        s.end()
    }
}

fn size_of(content: &ValueString<'static>) -> ValueNumber {
    content.as_ref().map(|c| c.len() as i64)
}

#[derive(Debug, Clone)]
pub struct FileResource {
    shared: Shared,
}

impl FileResource {
    pub fn new(shared: Shared) -> Self {
        Self { shared }
    }

    /// Write content (and the secret, or remove a stale one) for `state`.
    async fn write(&self, diags: &mut Diagnostics, state: &FileState) -> Option<()> {
        let file = resolve(&self.shared, diags, &state.path)?;
        let Value::Value(content) = &state.content else {
            diags.error_short(
                format!("{} is not known", content_key()),
                AttributePath::new(content_key()),
            );
            return None;
        };
        if let Some(parent) = file.parent() {
            if let Err(e) = tokio::fs::create_dir_all(parent).await {
                diags.root_error(
                    "could not create directory",
                    format!("{}: {e}", parent.display()),
                );
                return None;
            }
        }
        if let Err(e) = tokio::fs::write(&file, content.as_bytes()).await {
            diags.root_error("could not write file", format!("{}: {e}", file.display()));
            return None;
        }
        let secret = secret_path(&file);
        match &state.secret {
            Value::Value(value) => {
                if let Err(e) = tokio::fs::write(&secret, value.as_bytes()).await {
                    diags.error(
                        "could not write secret",
                        format!("{}: {e}", secret.display()),
                        AttributePath::new("secret"),
                    );
                    return None;
                }
            }
            _ => remove_if_present(diags, &secret).await,
        }
        Some(())
    }
}

#[async_trait]
impl Resource for FileResource {
    type State<'a> = FileState;
    type PrivateState<'a> = ValueEmpty;
    type ProviderMetaState<'a> = Meta;

    fn schema(&self, _diags: &mut Diagnostics) -> Option<Schema> {
        let version = schema_version();
        Some(Schema {
            version,
            block: Block {
                version,
                description: Description::plain("A file under the provider root"),
                attributes: map! {
                    "id" => attr(AttributeType::String, AttributeConstraint::Computed, false,
                        "Same as path"),
                    "path" => attr(AttributeType::String, AttributeConstraint::Required, false,
                        "Path of the file, relative to the provider root (changing it replaces)"),
                    content_key() => attr(AttributeType::String, AttributeConstraint::Required, false,
                        "Content of the file"),
                    "size" => attr(AttributeType::Number, AttributeConstraint::Computed, false,
                        "Size of the content in bytes"),
                    "token" => attr(AttributeType::String, AttributeConstraint::Computed, true,
                        "Made at creation, kept across updates"),
                    "secret" => attr(AttributeType::String, AttributeConstraint::Optional, true,
                        "Written to <file>.secret when set"),
                },
                blocks: map! {
                    "tag" => NestedBlock::List(Block {
                        version,
                        description: Description::plain("Tags, only kept in state"),
                        attributes: map! {
                            "key" => attr(AttributeType::String, AttributeConstraint::Required,
                                false, "Tag key"),
                            "value" => attr(AttributeType::String, AttributeConstraint::Optional,
                                false, "Tag value"),
                        },
                        ..Default::default()
                    }),
                },
                ..Default::default()
            },
        })
    }

    async fn validate<'a>(&self, diags: &mut Diagnostics, config: FileState) -> Option<()> {
        check_relative(diags, &config.path, "path");
        if let Value::Value(content) = &config.content {
            if content.contains("forbidden") {
                diags.error_short(
                    "content may not contain \"forbidden\"",
                    AttributePath::new(content_key()),
                );
            }
        }
        Some(())
    }

    async fn read<'a>(
        &self,
        diags: &mut Diagnostics,
        state: FileState,
        private_state: ValueEmpty,
        _meta: Meta,
    ) -> Option<(FileState, ValueEmpty)> {
        let Some(file) = resolve(&self.shared, diags, &state.path) else {
            // Errors are in diags; the resource is still there as far as we know.
            return Some((state, private_state));
        };
        match tokio::fs::read(&file).await {
            Ok(bytes) => {
                let mut state = state;
                state.content = Value::Value(String::from_utf8_lossy(&bytes).into_owned().into());
                state.size = Value::Value(bytes.len() as i64);
                Some((state, private_state))
            }
            // Gone: tf-provider sends no new_state, which the host reads as null.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                diags.root_error("could not read file", format!("{}: {e}", file.display()));
                Some((state, private_state))
            }
        }
    }

    async fn plan_create<'a>(
        &self,
        _diags: &mut Diagnostics,
        proposed_state: FileState,
        _config_state: FileState,
        _meta: Meta,
    ) -> Option<(FileState, ValueEmpty)> {
        let mut state = proposed_state;
        state.id = Value::Unknown;
        state.token = Value::Unknown;
        state.size = match &state.content {
            Value::Null => Value::Null,
            content => size_of(content),
        };
        Some((state, ValueEmpty::default()))
    }

    async fn plan_update<'a>(
        &self,
        _diags: &mut Diagnostics,
        prior_state: FileState,
        proposed_state: FileState,
        _config_state: FileState,
        prior_private_state: ValueEmpty,
        _meta: Meta,
    ) -> Option<(FileState, ValueEmpty, Vec<AttributePath>)> {
        let mut state = proposed_state;
        let mut replace = Vec::new();
        if state.path != prior_state.path {
            replace.push(AttributePath::new("path"));
            state.id = Value::Unknown;
            state.token = Value::Unknown;
        } else {
            state.id = prior_state.id;
            state.token = prior_state.token;
        }
        state.size = size_of(&state.content);
        Some((state, prior_private_state, replace))
    }

    async fn plan_destroy<'a>(
        &self,
        _diags: &mut Diagnostics,
        _prior_state: FileState,
        prior_private_state: ValueEmpty,
        _meta: Meta,
    ) -> Option<ValueEmpty> {
        Some(prior_private_state)
    }

    async fn create<'a>(
        &self,
        diags: &mut Diagnostics,
        planned_state: FileState,
        _config_state: FileState,
        planned_private_state: ValueEmpty,
        _meta: Meta,
    ) -> Option<(FileState, ValueEmpty)> {
        self.write(diags, &planned_state).await?;
        let mut state = planned_state;
        state.id = state.path.clone();
        state.size = size_of(&state.content);
        state.token = Value::Value(new_token().into());
        // A create that fails after it made the file (as SDK providers do when a check after
        // the create fails): the error, and the state of what exists.
        if matches!(&state.content, Value::Value(c) if c.contains("half-made")) {
            diags.root_error(
                "made, but the check after failed",
                "the file was written; its content says half-made",
            );
        }
        Some((state, planned_private_state))
    }

    async fn update<'a>(
        &self,
        diags: &mut Diagnostics,
        prior_state: FileState,
        planned_state: FileState,
        _config_state: FileState,
        planned_private_state: ValueEmpty,
        _meta: Meta,
    ) -> Option<(FileState, ValueEmpty)> {
        // As providers that compute what to change from the prior state do (a list of rules
        // to add and remove): a prior state that is not what is there is refused, so a host
        // that updates from a stale record is found out. Terraform refreshes first.
        if let (Some(file), Value::Value(recorded)) = (
            resolve(&self.shared, diags, &prior_state.path),
            &prior_state.size,
        ) {
            if let Ok(meta) = tokio::fs::metadata(&file).await {
                if meta.len() as i64 != *recorded {
                    diags.root_error(
                        "state contract violation: the prior state is stale",
                        format!(
                            "{} holds {} bytes, the prior state says {recorded} (value mismatch): update from the state as it is (refresh first)",
                            file.display(),
                            meta.len()
                        ),
                    );
                    return Some((prior_state, planned_private_state));
                }
            }
        }
        if self.write(diags, &planned_state).await.is_none() {
            // Nothing changed that we know of: keep the prior state with the errors.
            return Some((prior_state, planned_private_state));
        }
        let mut state = planned_state;
        state.id = state.path.clone();
        state.size = size_of(&state.content);
        if !state.token.is_value() {
            state.token = match prior_state.token {
                Value::Value(token) => Value::Value(token),
                _ => Value::Value(new_token().into()),
            };
        }
        Some((state, planned_private_state))
    }

    async fn destroy<'a>(
        &self,
        diags: &mut Diagnostics,
        prior_state: FileState,
        _planned_private_state: ValueEmpty,
        _meta: Meta,
    ) -> Option<()> {
        let file = resolve(&self.shared, diags, &prior_state.path)?;
        remove_if_present(diags, &file).await;
        remove_if_present(diags, &secret_path(&file)).await;
        Some(())
    }

    async fn import<'a>(
        &self,
        diags: &mut Diagnostics,
        id: String,
    ) -> Option<(FileState, ValueEmpty)> {
        let path: ValueString<'static> = Value::Value(id.clone().into());
        check_relative(diags, &path, "id");
        if !diags.errors.is_empty() {
            return None;
        }
        let file = resolve(&self.shared, diags, &path)?;
        let bytes = match tokio::fs::read(&file).await {
            Ok(bytes) => bytes,
            Err(e) => {
                diags.root_error("could not import file", format!("{}: {e}", file.display()));
                return None;
            }
        };
        let secret = tokio::fs::read(secret_path(&file))
            .await
            .ok()
            .map(|s| String::from_utf8_lossy(&s).into_owned());
        let state = FileState {
            id: path.clone(),
            path,
            content: Value::Value(String::from_utf8_lossy(&bytes).into_owned().into()),
            size: Value::Value(bytes.len() as i64),
            token: Value::Value(new_token().into()),
            secret: secret.map_or(Value::Null, |s| Value::Value(s.into())),
            tag: Value::Value(Vec::new()),
        };
        Some((state, ValueEmpty::default()))
    }

    // No `upgrade` override is possible with tf-provider 0.2.2: see the module docs.
}
