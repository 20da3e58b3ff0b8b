//! `capstanfixture_read`: reads `<root>/<path>`.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tf_provider::schema::{AttributeConstraint, AttributeType, Block, Description, Schema};
use tf_provider::value::{Value, ValueBool, ValueString};
use tf_provider::{map, DataSource, Diagnostics};

use crate::common::{attr, check_relative, resolve, Meta, Shared};

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct ReadState {
    #[serde(default)]
    pub path: ValueString<'static>,
    #[serde(default)]
    pub content: ValueString<'static>,
    #[serde(default)]
    pub exists: ValueBool,
}

#[derive(Debug, Clone)]
pub struct ReadDataSource {
    shared: Shared,
}

impl ReadDataSource {
    pub fn new(shared: Shared) -> Self {
        Self { shared }
    }
}

#[async_trait]
impl DataSource for ReadDataSource {
    type State<'a> = ReadState;
    type ProviderMetaState<'a> = Meta;

    fn schema(&self, _diags: &mut Diagnostics) -> Option<Schema> {
        Some(Schema {
            version: 1,
            block: Block {
                version: 1,
                description: Description::plain("Reads a file under the provider root"),
                attributes: map! {
                    "path" => attr(AttributeType::String, AttributeConstraint::Required, false,
                        "Path relative to the provider root"),
                    "content" => attr(AttributeType::String, AttributeConstraint::Computed, false,
                        "Content of the file (null when it does not exist)"),
                    "exists" => attr(AttributeType::Bool, AttributeConstraint::Computed, false,
                        "Whether the file exists"),
                },
                ..Default::default()
            },
        })
    }

    async fn validate<'a>(&self, diags: &mut Diagnostics, config: ReadState) -> Option<()> {
        check_relative(diags, &config.path, "path");
        Some(())
    }

    async fn read<'a>(
        &self,
        diags: &mut Diagnostics,
        config: ReadState,
        _meta: Meta,
    ) -> Option<ReadState> {
        let file = resolve(&self.shared, diags, &config.path)?;
        let mut state = config;
        match tokio::fs::read(&file).await {
            Ok(bytes) => {
                state.content = Value::Value(String::from_utf8_lossy(&bytes).into_owned().into());
                state.exists = Value::Value(true);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                state.content = Value::Null;
                state.exists = Value::Value(false);
            }
            Err(e) => {
                diags.root_error("could not read file", format!("{}: {e}", file.display()));
                return None;
            }
        }
        Some(state)
    }
}
