//! The `capstanfixture` provider itself: config `root` (+ `greeting`), a
//! provider_meta schema with `module`, two resources and one data source.

use std::collections::HashMap;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tf_provider::schema::{AttributeConstraint, AttributeType, Block, Description, Schema};
use tf_provider::value::{Value, ValueString};
use tf_provider::{map, AttributePath, Diagnostics, DynamicDataSource, DynamicResource, Provider};

use crate::common::{attr, Meta, Shared};
use crate::file::FileResource;
use crate::read::ReadDataSource;
use crate::slow::SlowResource;

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct ProviderConfig {
    #[serde(default)]
    pub root: ValueString<'static>,
    #[serde(default)]
    pub greeting: ValueString<'static>,
}

#[derive(Debug, Default, Clone)]
pub struct FixtureProvider {
    shared: Shared,
}

fn check_root(diags: &mut Diagnostics, root: &ValueString<'static>) {
    if let Value::Value(root) = root {
        if !root.starts_with('/') {
            diags.error_short("root must be an absolute path", AttributePath::new("root"));
        }
    }
}

#[async_trait]
impl Provider for FixtureProvider {
    type Config<'a> = ProviderConfig;
    type MetaState<'a> = Meta;

    fn schema(&self, _diags: &mut Diagnostics) -> Option<Schema> {
        Some(Schema {
            version: 1,
            block: Block {
                version: 1,
                description: Description::plain("Capstan test fixture provider"),
                attributes: map! {
                    "root" => attr(
                        AttributeType::String,
                        AttributeConstraint::Required,
                        false,
                        "Absolute directory where resources keep their files",
                    ),
                    "greeting" => attr(
                        AttributeType::String,
                        AttributeConstraint::Optional,
                        false,
                        "Optional greeting (only remembered)",
                    ),
                },
                ..Default::default()
            },
        })
    }

    async fn validate<'a>(&self, diags: &mut Diagnostics, config: ProviderConfig) -> Option<()> {
        check_root(diags, &config.root);
        Some(())
    }

    async fn configure<'a>(
        &self,
        diags: &mut Diagnostics,
        _terraform_version: String,
        config: ProviderConfig,
    ) -> Option<()> {
        check_root(diags, &config.root);
        if !diags.errors.is_empty() {
            return Some(());
        }
        let mut settings = match self.shared.write() {
            Ok(settings) => settings,
            Err(poisoned) => poisoned.into_inner(),
        };
        settings.root = match config.root {
            Value::Value(root) => Some(root.into_owned()),
            _ => None,
        };
        settings.greeting = match config.greeting {
            Value::Value(greeting) => Some(greeting.into_owned()),
            _ => None,
        };
        Some(())
    }

    fn meta_schema(&self, _diags: &mut Diagnostics) -> Option<Schema> {
        Some(Schema {
            version: 1,
            block: Block {
                version: 1,
                description: Description::plain("capstanfixture provider_meta"),
                attributes: map! {
                    "module" => attr(
                        AttributeType::String,
                        AttributeConstraint::Optional,
                        false,
                        "Name of the calling module",
                    ),
                },
                ..Default::default()
            },
        })
    }

    fn get_resources(
        &self,
        _diags: &mut Diagnostics,
    ) -> Option<HashMap<String, Box<dyn DynamicResource>>> {
        Some(map! {
            "file" => FileResource::new(self.shared.clone()),
            "slow" => SlowResource,
        })
    }

    fn get_data_sources(
        &self,
        _diags: &mut Diagnostics,
    ) -> Option<HashMap<String, Box<dyn DynamicDataSource>>> {
        Some(map! {
            "read" => ReadDataSource::new(self.shared.clone()),
        })
    }
}
