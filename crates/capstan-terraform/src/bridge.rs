//! A Terraform provider served as a Capstan provider (`capstan __provider terraform -- PATH`):
//! its resource types from its schema, each operation through its life cycle. The provider
//! process is started once for the handshake's types, and once more, on the first operation,
//! for the run (inside the serving runtime); its private bytes ride in each resource's outputs
//! under [`PRIVATE`], so they are kept in Capstan's state and passed back.

use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use capstan_provider::{Operation, OperationError, Prior, Provider, Resource, ResourceType};
use serde_json::Value;

use crate::{wire, Plugin, TerraformError};

/// The output that carries the provider's private bytes (base64).
pub const PRIVATE: &str = "__terraform_private";

/// The running plugin of a run, started on first use, and its schema.
struct Shared {
    program: PathBuf,
    config: Value,
    schema: wire::GetProviderSchemaResponse,
    plugin: tokio::sync::OnceCell<Plugin>,
}

impl Shared {
    async fn plugin(&self) -> Result<&Plugin, OperationError> {
        self.plugin
            .get_or_try_init(|| async {
                let plugin = Plugin::start(&self.program, Duration::from_secs(30)).await?;
                plugin.configure(&self.schema, &self.config).await?;
                Ok::<_, TerraformError>(plugin)
            })
            .await
            .map_err(failure)
    }
}

fn failure(e: TerraformError) -> OperationError {
    match e {
        TerraformError::Diagnostic {
            summary, detail, ..
        } => OperationError::permanent(summary).with_details(detail.trim_start_matches(": ")),
        other => OperationError::transient(other.to_string()),
    }
}

/// Reads the schema (starting the provider once), and builds the Capstan provider.
pub fn provider(program: PathBuf, config: Value) -> Result<Provider, TerraformError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let schema = runtime.block_on(async {
        let plugin = Plugin::start(&program, Duration::from_secs(30)).await?;
        let schema = plugin.schema().await;
        plugin.stop().await;
        schema
    })?;
    drop(runtime);
    let info = crate::provider_info("terraform", &schema);
    let shared = Rc::new(Shared {
        program: program.clone(),
        config,
        schema,
        plugin: tokio::sync::OnceCell::new(),
    });
    let mut provider = Provider::new("terraform", env!("CARGO_PKG_VERSION"));
    for t in &info.resource_types {
        let data = t.name.starts_with("data.");
        let mut description = ResourceType::new(&t.name)
            .description(format!(
                "Terraform {} `{}` of {}",
                if data { "data source" } else { "resource" },
                t.name,
                program.display()
            ))
            .stateful(!data)
            .read_checks(!data);
        for i in &t.inputs {
            description = if i.required {
                description.required(&i.name, &i.description)
            } else {
                description.optional(&i.name, &i.description)
            };
            if i.sensitive {
                description = description.sensitive(&i.name);
            }
        }
        for o in &t.outputs {
            description = description.output(&o.name, &o.description);
            if o.sensitive {
                description = description.sensitive(&o.name);
            }
        }
        provider = provider.resource_as(
            TfResource {
                name: t.name.clone(),
                shared: SharedRc(shared.clone()),
            },
            description,
        );
    }
    Ok(provider)
}

/// `Rc` marked as the SDK needs (every operation runs on one thread).
struct SharedRc(Rc<Shared>);

struct TfResource {
    name: String,
    shared: SharedRc,
}

fn split(outputs: &Value) -> (Value, Vec<u8>) {
    use base64::Engine;
    let mut state = outputs.clone();
    let private = state
        .as_object_mut()
        .and_then(|o| o.remove(PRIVATE))
        .and_then(|v| v.as_str().map(str::to_string))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .unwrap_or_default();
    (state, private)
}

fn join(mut state: Value, private: &[u8]) -> Value {
    use base64::Engine;
    if let Some(o) = state.as_object_mut() {
        o.insert(
            PRIVATE.into(),
            Value::String(base64::engine::general_purpose::STANDARD.encode(private)),
        );
    }
    state
}

impl Resource for TfResource {
    type Inputs = Value;
    type Outputs = Value;

    fn resource_type() -> ResourceType {
        // Never used: each type is added with its own description (`resource_as`).
        ResourceType::new("terraform")
    }

    async fn create(&self, op: &Operation, inputs: Value) -> Result<Value, OperationError> {
        let shared = &self.shared.0;
        let plugin = shared.plugin().await?;
        if let Some(data) = self.name.strip_prefix("data.") {
            // A data source is read, never made: each create or update reads it again.
            op.phase("read").await;
            return plugin
                .read_data(&shared.schema, data, &inputs)
                .await
                .map_err(failure);
        }
        op.phase("plan and apply").await;
        let (state, private) = plugin
            .create(&shared.schema, &self.name, &inputs)
            .await
            .map_err(failure)?;
        Ok(join(state, &private))
    }

    async fn update(
        &self,
        op: &Operation,
        prior: Prior<Value, Value>,
        inputs: Value,
    ) -> Result<Value, OperationError> {
        if self.name.starts_with("data.") {
            return self.create(op, inputs).await;
        }
        op.phase("plan and apply").await;
        let shared = &self.shared.0;
        let plugin = shared.plugin().await?;
        let (state, private) = split(&prior.outputs);
        let updated = plugin
            .update(&shared.schema, &self.name, &state, &private, &inputs)
            .await;
        let (state, private) = match updated {
            // Attributes that force a new resource changed: replaced as Terraform does by
            // default, the old one deleted, then the new one created.
            Err(TerraformError::ReplaceRequired { .. }) => {
                op.phase("replace: delete, then create").await;
                plugin
                    .delete(&shared.schema, &self.name, &state, &private)
                    .await
                    .map_err(failure)?;
                plugin
                    .create(&shared.schema, &self.name, &inputs)
                    .await
                    .map_err(failure)?
            }
            other => other.map_err(failure)?,
        };
        Ok(join(state, &private))
    }

    async fn read(
        &self,
        _op: &Operation,
        prior: Prior<Value, Value>,
    ) -> Result<Value, OperationError> {
        if self.name.starts_with("data.") {
            // What was read: a data source has nothing of its own to find.
            return Ok(prior.outputs);
        }
        let shared = &self.shared.0;
        let plugin = shared.plugin().await?;
        let (state, private) = split(&prior.outputs);
        match plugin
            .read(&shared.schema, &self.name, &state, &private)
            .await
            .map_err(failure)?
        {
            Some(now) => Ok(join(now, &private)),
            None => Err(OperationError::not_found(format!(
                "its Terraform provider no longer finds this `{}`",
                self.name
            ))),
        }
    }

    async fn delete(
        &self,
        _op: &Operation,
        prior: Prior<Value, Value>,
    ) -> Result<(), OperationError> {
        if self.name.starts_with("data.") {
            // Nothing was made.
            return Ok(());
        }
        let shared = &self.shared.0;
        let plugin = shared.plugin().await?;
        let (state, private) = split(&prior.outputs);
        plugin
            .delete(&shared.schema, &self.name, &state, &private)
            .await
            .map_err(failure)
    }
}
