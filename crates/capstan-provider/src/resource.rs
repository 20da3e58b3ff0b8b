//! The trait a provider author implements for each resource type, and its type-erased form.

use std::future::Future;

use capstan_schema::info::{InputInfo, OutputInfo};
use capstan_schema::{OperationError, ResourceTypeInfo};
use futures::future::LocalBoxFuture;
use futures::FutureExt;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::Operation;

/// The fields of `T`'s JSON object, in order, with their doc comments (on one line), and
/// those that are required (deserializing) or always written (serializing).
fn fields_of<T: schemars::JsonSchema>(
    serializing: bool,
) -> (Vec<(String, String)>, std::collections::BTreeSet<String>) {
    let settings = schemars::generate::SchemaSettings::draft2020_12();
    let settings = if serializing {
        settings.for_serialize()
    } else {
        settings.for_deserialize()
    };
    let schema = settings.into_generator().into_root_schema_for::<T>();
    let schema = schema.as_value();
    let required = schema["required"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n.as_str().map(str::to_string))
        .collect();
    let fields = schema["properties"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(name, property)| {
            let description = property["description"].as_str().unwrap_or_default();
            let one_line = description.split_whitespace().collect::<Vec<_>>().join(" ");
            (name.clone(), one_line)
        })
        .collect();
    (fields, required)
}

/// What a resource type looks like from outside: its name, inputs and outputs. Sent to the
/// core in the handshake, so the core can check a deployment before anything runs.
///
/// ```
/// # use capstan_provider::ResourceType;
/// let file = ResourceType::new("file")
///     .description("A file with the given content")
///     .required("path", "Where the file goes")
///     .optional("mode", "Octal permission bits, e.g. \"0644\"")
///     .output("path", "The absolute path written")
///     .stateful(true);
/// ```
#[derive(Clone, Debug)]
pub struct ResourceType(pub(crate) ResourceTypeInfo);

impl ResourceType {
    /// A type with no inputs or outputs yet, not stateful.
    pub fn new(name: impl Into<String>) -> Self {
        ResourceType(ResourceTypeInfo {
            name: name.into(),
            // The SDK checks any create's or update's inputs when the core plans: it reads
            // them into the type's `Inputs`, as the operation would.
            checks_inputs: true,
            ..Default::default()
        })
    }

    /// A one-line description.
    pub fn description(mut self, text: impl Into<String>) -> Self {
        self.0.description = text.into();
        self
    }

    /// An input the deployment must set.
    pub fn required(mut self, name: impl Into<String>, description: impl Into<String>) -> Self {
        self.0.inputs.push(InputInfo {
            name: name.into(),
            required: true,
            description: description.into(),
            sensitive: false,
        });
        self
    }

    /// An input the deployment may set.
    pub fn optional(mut self, name: impl Into<String>, description: impl Into<String>) -> Self {
        self.0.inputs.push(InputInfo {
            name: name.into(),
            required: false,
            description: description.into(),
            sensitive: false,
        });
        self
    }

    /// The inputs, read from the type the deployment's inputs are deserialized into: each
    /// field is an input (required unless it has a default or is an `Option`), described by its
    /// doc comment, under the name serde reads it by. So the handshake cannot drift from what
    /// the provider actually accepts.
    ///
    /// ```
    /// # use capstan_provider::ResourceType;
    /// #[derive(serde::Deserialize, schemars::JsonSchema)]
    /// struct FileIn {
    ///     /// Where the file goes
    ///     path: String,
    ///     /// Octal permission bits
    ///     #[serde(default)]
    ///     mode: Option<String>,
    /// }
    /// let file = ResourceType::new("file").inputs_from::<FileIn>();
    /// ```
    pub fn inputs_from<T: schemars::JsonSchema>(mut self) -> Self {
        let (fields, required) = fields_of::<T>(false);
        for (name, description) in fields {
            self = if required.contains(&name) {
                self.required(name, description)
            } else {
                self.optional(name, description)
            };
        }
        self
    }

    /// The outputs, read from the type the outputs are serialized from: each field an
    /// output, described by its doc comment.
    pub fn outputs_from<T: schemars::JsonSchema>(mut self) -> Self {
        for (name, description) in fields_of::<T>(true).0 {
            self = self.output(name, description);
        }
        self
    }

    /// An output other resources may refer to.
    pub fn output(mut self, name: impl Into<String>, description: impl Into<String>) -> Self {
        self.0.outputs.push(OutputInfo {
            name: name.into(),
            description: description.into(),
            sensitive: false,
            public: false,
            prior_unused: false,
        });
        self
    }

    /// Marks the input and the output called `name` (declared before) as secrets: the core
    /// passes and stores them, and shows them nowhere.
    pub fn sensitive(mut self, name: &str) -> Self {
        for i in self.0.inputs.iter_mut().filter(|i| i.name == name) {
            i.sensitive = true;
        }
        for o in self.0.outputs.iter_mut().filter(|o| o.name == name) {
            o.sensitive = true;
        }
        self
    }

    /// Marks the output called `name` (declared before) as one that never carries what the
    /// inputs held (an exit status, a count): the core shows it even when the operation's
    /// inputs hold a secret, where it would otherwise treat every output as a secret too.
    pub fn public(mut self, name: &str) -> Self {
        for o in self.0.outputs.iter_mut().filter(|o| o.name == name) {
            o.public = true;
        }
        self
    }

    /// Output `name` is never read back from a request's previous outputs (it repeats an
    /// input): the core leaves it out of them, so a large value crosses the connection once.
    /// The outputs type must then default it when it is missing (`#[serde(default)]`).
    pub fn prior_unused(mut self, name: &str) -> Self {
        for o in self.0.outputs.iter_mut().filter(|o| o.name == name) {
            o.prior_unused = true;
        }
        self
    }

    /// Accept inputs beyond the declared ones (the provider checks them itself).
    pub fn open_inputs(mut self, open: bool) -> Self {
        self.0.open_inputs = open;
        self
    }

    /// Declare that resources of this type cannot be deleted.
    pub fn no_delete(mut self, no_delete: bool) -> Self {
        self.0.no_delete = no_delete;
        self
    }

    /// Asks the core to `read` unchanged resources of this type while it plans, and to plan
    /// an update when the outputs differ from those recorded: for types whose result can
    /// change while their inputs stay the same. `read` must be cheap and change nothing. In
    /// a run, the core also updates such a resource when something it waits on changed, even
    /// if its inputs came out the same.
    pub fn read_on_plan(mut self, read_on_plan: bool) -> Self {
        self.0.read_on_plan = read_on_plan;
        self
    }

    /// Declares that [`Resource::read`] looks at the real resource (answering
    /// [`OperationError::not_found`] when it is gone) and [`Resource::find`] finds one from
    /// its inputs: the core then checks interrupted operations and `--refresh` with them.
    pub fn read_checks(mut self, read_checks: bool) -> Self {
        self.0.read_checks = read_checks;
        self
    }

    /// Operations on this type use [`Operation::child`](crate::Operation::child) or
    /// [`Operation::permit`](crate::Operation::permit): the core gives them its scheduler.
    pub fn uses_scheduler(mut self, uses_scheduler: bool) -> Self {
        self.0.uses_scheduler = uses_scheduler;
        self
    }

    /// Declares that [`Resource::plan`] answers for this type: `capstan plan` then shows what
    /// a create or update will make, what is known only after it runs, and replacements.
    pub fn plans_changes(mut self, plans_changes: bool) -> Self {
        self.0.plans_changes = plans_changes;
        self
    }

    /// Declares that operations on this type change nothing outside the state (a lookup, a
    /// data source): the core journals no intent before calling it, so one cut short by a
    /// crash is never left for a person to check.
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.0.read_only = read_only;
        self
    }

    /// Whether the resource exists outside the deployment's state (so deleting it matters).
    pub fn stateful(mut self, stateful: bool) -> Self {
        self.0.stateful = stateful;
        self
    }
}

/// What [`Resource::plan`] answers: the outputs a create or update will make (those not known
/// until it runs null, and named in `unknown`), and for an update the attributes whose change
/// forces a new resource (`replace`; empty for an update in place).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Planned {
    pub outputs: serde_json::Value,
    pub unknown: Vec<String>,
    pub replace: Vec<String>,
}

/// The inputs and outputs recorded after a resource's last successful operation.
#[derive(Clone, Debug)]
pub struct Prior<I, O> {
    pub inputs: I,
    pub outputs: O,
}

/// One resource type of a provider. Implement `create`; the others have defaults: `read`
/// returns the recorded outputs, `update` creates afresh, `delete` does nothing (right for
/// pure values; a stateful resource overrides it).
///
/// Every method may be cancelled: when the core cancels the call, `op.cancelled()` fires, and
/// if the method has not returned within the provider's grace period its future is dropped.
pub trait Resource: 'static {
    /// The inputs, deserialized from the deployment's JSON.
    type Inputs: DeserializeOwned + 'static;
    /// The outputs, serialized to JSON for the core and other resources.
    type Outputs: Serialize + DeserializeOwned + 'static;

    /// Name, inputs and outputs of this type.
    fn resource_type() -> ResourceType;

    /// Creates the resource.
    fn create(
        &self,
        op: &Operation,
        inputs: Self::Inputs,
    ) -> impl Future<Output = Result<Self::Outputs, OperationError>>;

    /// Finds the resource its inputs describe, with nothing recorded (what an interrupted
    /// create may have made): its outputs, or [`OperationError::not_found`]. Only called for
    /// types that declare [`ResourceType::read_checks`].
    fn find(
        &self,
        op: &Operation,
        inputs: Self::Inputs,
    ) -> impl Future<Output = Result<Self::Outputs, OperationError>> {
        let _ = (op, inputs);
        async move {
            Err(OperationError::permanent(
                "this type cannot find a resource from its inputs",
            ))
        }
    }

    /// Reports the resource's current outputs without changing anything (for a type that
    /// declares [`ResourceType::read_checks`]: [`OperationError::not_found`] when it is gone).
    fn read(
        &self,
        op: &Operation,
        prior: Prior<Self::Inputs, Self::Outputs>,
    ) -> impl Future<Output = Result<Self::Outputs, OperationError>> {
        let _ = op;
        async move { Ok(prior.outputs) }
    }

    /// Changes the resource to match new inputs.
    fn update(
        &self,
        op: &Operation,
        prior: Prior<Self::Inputs, Self::Outputs>,
        inputs: Self::Inputs,
    ) -> impl Future<Output = Result<Self::Outputs, OperationError>> {
        let _ = prior;
        self.create(op, inputs)
    }

    /// Checks inputs beyond their types (a malformed address, options that contradict each
    /// other), changing and contacting nothing. Called when the core plans, so `plan` refuses
    /// what the operation would; the operation itself may call it too.
    fn validate(&self, inputs: &Self::Inputs) -> Result<(), OperationError> {
        let _ = inputs;
        Ok(())
    }

    /// Plans a create (`prior` is `None`) or an update to `inputs`, changing nothing. Only
    /// called for types that declare [`ResourceType::plans_changes`].
    fn plan(
        &self,
        prior: Option<Prior<Self::Inputs, Self::Outputs>>,
        inputs: Self::Inputs,
    ) -> impl Future<Output = Result<Planned, OperationError>> {
        let _ = (prior, inputs);
        async {
            Err(OperationError::permanent(
                "this type does not plan its changes",
            ))
        }
    }

    /// Deletes the resource.
    fn delete(
        &self,
        op: &Operation,
        prior: Prior<Self::Inputs, Self::Outputs>,
    ) -> impl Future<Output = Result<(), OperationError>> {
        let _ = (op, prior);
        async { Ok(()) }
    }
}

/// An operation's arguments as JSON text, as they came in, before they are read straight into
/// a resource's types (no `Value` in between).
pub(crate) enum Call {
    Create {
        inputs: String,
    },
    Read {
        prior_inputs: String,
        prior_outputs: String,
    },
    Update {
        prior_inputs: String,
        prior_outputs: String,
        inputs: String,
    },
    Delete {
        prior_inputs: String,
        prior_outputs: String,
    },
}

/// `Resource` with its types erased to JSON, so a provider can hold many in one table.
pub(crate) trait ErasedResource {
    fn info(&self) -> &ResourceTypeInfo;
    fn call<'a>(
        &'a self,
        op: &'a Operation,
        call: Call,
    ) -> LocalBoxFuture<'a, Result<String, OperationError>>;
    /// [`Resource::plan`], for `address`, from JSON texts: the recorded inputs and outputs
    /// (none for a create) and the new inputs.
    fn plan<'a>(
        &'a self,
        address: &'a str,
        prior: Option<(String, String)>,
        inputs: String,
    ) -> LocalBoxFuture<'a, Result<capstan_schema::ProviderPlan, OperationError>>;
}

pub(crate) struct Erased<R> {
    resource: R,
    info: ResourceTypeInfo,
}

impl<R: Resource> Erased<R> {
    pub(crate) fn new(resource: R) -> Self {
        Erased {
            resource,
            info: R::resource_type().0,
        }
    }

    pub(crate) fn with_type(resource: R, resource_type: ResourceType) -> Self {
        Erased {
            resource,
            info: resource_type.0,
        }
    }
}

/// Reads JSON text straight into `T`. Text that is not JSON at all is told apart from JSON
/// that does not fit the type.
fn decode<T: DeserializeOwned>(
    op: &Operation,
    what: &str,
    text: &str,
) -> Result<T, OperationError> {
    decode_for(op.resource_type(), op.address(), what, text)
}

/// [`decode`] for a resource type and address without an operation.
fn decode_for<T: DeserializeOwned>(
    resource_type: &str,
    address: &str,
    what: &str,
    text: &str,
) -> Result<T, OperationError> {
    if text.trim().is_empty() {
        return Err(OperationError::invalid_input(format!(
            "{resource_type} `{address}`: the request carries no {what}"
        )));
    }
    if !text.trim_start().starts_with('{') {
        // serde would fill a struct from an array too: `[1]` is not `{"value": 1}`.
        return Err(OperationError::invalid_input(format!(
            "{resource_type} `{address}`: {what} must be a JSON object, not {}",
            text.trim().chars().take(40).collect::<String>()
        )));
    }
    serde_json::from_str(text).map_err(|e| {
        let header = format!("{resource_type} `{address}`");
        if matches!(
            e.classify(),
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof
        ) {
            return OperationError::invalid_input(format!(
                "{header}: {what} are not valid JSON: {e}"
            ));
        }
        // Read again (only on this cold path) to learn which field did not fit; the position
        // serde_json gives is within a JSON text the user never saw, so it is left out.
        let mut de = serde_json::Deserializer::from_str(text);
        let (path, message) = match serde_path_to_error::deserialize::<_, T>(&mut de) {
            Err(e) => (e.path().to_string(), without_position(&e.into_inner())),
            Ok(_) => (".".to_string(), without_position(&e)),
        };
        let singular = what.strip_suffix('s').unwrap_or(what);
        if path == "." {
            OperationError::invalid_input(format!("{header}: {what} are invalid: {message}"))
        } else {
            OperationError::invalid_input(format!(
                "{header}: {singular} `{path}` is invalid: {message}"
            ))
        }
    })
}

/// serde_json's message without its " at line L column C".
fn without_position(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(at) if e.line() > 0 => text[..at].to_string(),
        _ => text,
    }
}

fn encode<T: Serialize>(op: &Operation, outputs: &T) -> Result<String, OperationError> {
    serde_json::to_string(outputs).map_err(|e| {
        OperationError::internal(format!(
            "{} `{}`: outputs cannot be written as JSON: {e}",
            op.resource_type(),
            op.address()
        ))
    })
}

impl<R: Resource> ErasedResource for Erased<R> {
    fn info(&self) -> &ResourceTypeInfo {
        &self.info
    }

    fn call<'a>(
        &'a self,
        op: &'a Operation,
        call: Call,
    ) -> LocalBoxFuture<'a, Result<String, OperationError>> {
        async move {
            let prior = |inputs: String, outputs: String| -> Result<_, OperationError> {
                Ok(Prior {
                    inputs: decode(op, "recorded inputs", &inputs)?,
                    outputs: decode(op, "recorded outputs", &outputs)?,
                })
            };
            match call {
                Call::Create { inputs } => {
                    let inputs = decode(op, "inputs", &inputs)?;
                    encode(op, &self.resource.create(op, inputs).await?)
                }
                Call::Read {
                    prior_inputs,
                    prior_outputs,
                } if matches!(prior_outputs.trim(), "" | "null") => {
                    // Nothing recorded: find it from its inputs.
                    let inputs = decode(op, "inputs", &prior_inputs)?;
                    encode(op, &self.resource.find(op, inputs).await?)
                }
                Call::Read {
                    prior_inputs,
                    prior_outputs,
                } => {
                    let prior = prior(prior_inputs, prior_outputs)?;
                    encode(op, &self.resource.read(op, prior).await?)
                }
                Call::Update {
                    prior_inputs,
                    prior_outputs,
                    inputs,
                } => {
                    let prior = prior(prior_inputs, prior_outputs)?;
                    let inputs = decode(op, "inputs", &inputs)?;
                    encode(op, &self.resource.update(op, prior, inputs).await?)
                }
                Call::Delete {
                    prior_inputs,
                    prior_outputs,
                } => {
                    let prior = prior(prior_inputs, prior_outputs)?;
                    self.resource.delete(op, prior).await?;
                    Ok("{}".to_string())
                }
            }
        }
        .boxed_local()
    }

    fn plan<'a>(
        &'a self,
        address: &'a str,
        prior: Option<(String, String)>,
        inputs: String,
    ) -> LocalBoxFuture<'a, Result<capstan_schema::ProviderPlan, OperationError>> {
        async move {
            let name = &self.info.name;
            let prior = match prior {
                None => None,
                Some((inputs, outputs)) => Some(Prior {
                    inputs: decode_for(name, address, "recorded inputs", &inputs)?,
                    outputs: decode_for(name, address, "recorded outputs", &outputs)?,
                }),
            };
            let inputs = decode_for(name, address, "inputs", &inputs)?;
            self.resource.validate(&inputs)?;
            if !self.info.plans_changes {
                // Asked only to check the inputs (`checksInputs`): they fit.
                return Ok(capstan_schema::ProviderPlan {
                    outputs: "{}".into(),
                    unknown: Vec::new(),
                    replace: Vec::new(),
                });
            }
            let planned = self.resource.plan(prior, inputs).await?;
            Ok(capstan_schema::ProviderPlan {
                outputs: planned.outputs.to_string(),
                unknown: planned.unknown,
                replace: planned.replace,
            })
        }
        .boxed_local()
    }
}

#[cfg(test)]
mod described_by_types {
    use super::*;

    #[derive(serde::Deserialize, schemars::JsonSchema)]
    #[serde(rename_all = "camelCase")]
    #[allow(dead_code)]
    struct In {
        /// Where it goes,
        /// over two lines
        target_path: String,
        /// How many
        #[serde(default)]
        count: u32,
        /// Maybe
        maybe: Option<String>,
        #[serde(rename = "secretKey")]
        /// A key
        key: String,
    }

    #[derive(serde::Serialize, schemars::JsonSchema)]
    struct Out {
        /// Made
        made: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        note: Option<String>,
    }

    #[test]
    fn inputs_and_outputs_come_from_the_types_with_their_names_and_docs() {
        let t = ResourceType::new("t")
            .inputs_from::<In>()
            .outputs_from::<Out>()
            .sensitive("secretKey");
        let inputs: Vec<(&str, bool, &str, bool)> =
            t.0.inputs
                .iter()
                .map(|i| {
                    (
                        i.name.as_str(),
                        i.required,
                        i.description.as_str(),
                        i.sensitive,
                    )
                })
                .collect();
        assert_eq!(
            inputs,
            [
                ("targetPath", true, "Where it goes, over two lines", false),
                ("count", false, "How many", false),
                ("maybe", false, "Maybe", false),
                ("secretKey", true, "A key", true),
            ]
        );
        let outputs: Vec<(&str, &str)> =
            t.0.outputs
                .iter()
                .map(|o| (o.name.as_str(), o.description.as_str()))
                .collect();
        assert_eq!(outputs, [("made", "Made"), ("note", "")]);
    }
}
