//! What a provider says about itself in the handshake (schema: `ProviderInfo`).

use serde::{Deserialize, Serialize};

use crate::provider_capnp;

/// A provider's description of itself, returned by `hello`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProviderInfo {
    pub name: String,
    pub version: String,
    /// The protocol version chosen for the connection; 0 if none is shared.
    pub protocol: u32,
    pub min_protocol: u32,
    pub max_protocol: u32,
    pub resource_types: Vec<ResourceTypeInfo>,
    /// 0 means the provider sets no limit of its own.
    pub max_concurrency: u32,
    /// It reads a read's or delete's inputs from `previousInputs` alone (`inputs` is then
    /// left empty for them).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub prior_inputs_once: bool,
    /// It opens its operations' progress sinks from the core's hub (said only to a core that
    /// offered one): requests then carry an operation number instead of a sink.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub opens_progress: bool,
}

/// One resource type a provider serves.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceTypeInfo {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    pub inputs: Vec<InputInfo>,
    pub outputs: Vec<OutputInfo>,
    pub stateful: bool,
    /// The provider accepts inputs it did not declare and checks them itself.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub open_inputs: bool,
    /// The provider cannot delete resources of this type.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_delete: bool,
    /// The core reads unchanged resources of this type while planning (see the schema).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_on_plan: bool,
    /// Its operations submit children or ask for permits (they get a `Scheduler`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub uses_scheduler: bool,
    /// Its `read` looks at the real resource (answers `NotFound`, finds one from inputs).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_checks: bool,
    /// The provider answers `plan` for it (planned outputs, unknowns, replacements).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub plans_changes: bool,
    /// Operations change nothing outside the state (a data source): no intent is journaled.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
    /// Its `plan` checks a create's or update's inputs (even without `plans_changes`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub checks_inputs: bool,
}

/// One input of a resource type.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputInfo {
    pub name: String,
    pub required: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// A secret: hidden wherever the core would show it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sensitive: bool,
}

/// One output of a resource type.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputInfo {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// A secret: hidden wherever the core would show it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sensitive: bool,
    /// Never carries what the inputs held: shown even when the inputs hold a secret (else an
    /// output of an operation whose inputs hold a secret is treated as one too).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub public: bool,
    /// The provider never reads it back from previous outputs (it repeats an input): left
    /// out of the previous outputs the core sends.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub prior_unused: bool,
}

impl ProviderInfo {
    /// The resource type called `name`, if the provider serves it.
    pub fn resource_type(&self, name: &str) -> Option<&ResourceTypeInfo> {
        self.resource_types.iter().find(|t| t.name == name)
    }

    /// Reads the handshake from the wire.
    pub fn read(reader: provider_capnp::provider_info::Reader<'_>) -> capnp::Result<Self> {
        let mut resource_types = Vec::new();
        for t in reader.get_resource_types()? {
            let mut inputs = Vec::new();
            for i in t.get_inputs()? {
                inputs.push(InputInfo {
                    name: i.get_name()?.to_string()?,
                    required: i.get_required(),
                    description: i.get_description()?.to_string()?,
                    sensitive: i.get_sensitive(),
                });
            }
            let mut outputs = Vec::new();
            for o in t.get_outputs()? {
                outputs.push(OutputInfo {
                    name: o.get_name()?.to_string()?,
                    description: o.get_description()?.to_string()?,
                    sensitive: o.get_sensitive(),
                    public: o.get_public(),
                    prior_unused: o.get_prior_unused(),
                });
            }
            resource_types.push(ResourceTypeInfo {
                name: t.get_name()?.to_string()?,
                description: t.get_description()?.to_string()?,
                inputs,
                outputs,
                stateful: t.get_stateful(),
                open_inputs: t.get_open_inputs(),
                no_delete: t.get_no_delete(),
                read_on_plan: t.get_read_on_plan(),
                read_checks: t.get_read_checks(),
                plans_changes: t.get_plans_changes(),
                read_only: t.get_read_only(),
                checks_inputs: t.get_checks_inputs(),
                uses_scheduler: t.get_uses_scheduler(),
            });
        }
        Ok(ProviderInfo {
            name: reader.get_name()?.to_string()?,
            version: reader.get_version()?.to_string()?,
            protocol: reader.get_protocol(),
            min_protocol: reader.get_min_protocol(),
            max_protocol: reader.get_max_protocol(),
            resource_types,
            max_concurrency: reader.get_max_concurrency(),
            prior_inputs_once: reader.get_prior_inputs_once(),
            opens_progress: reader.get_opens_progress(),
        })
    }

    /// Writes the handshake to the wire.
    pub fn write(&self, mut builder: provider_capnp::provider_info::Builder<'_>) {
        builder.set_name(&self.name[..]);
        builder.set_version(&self.version[..]);
        builder.set_protocol(self.protocol);
        builder.set_min_protocol(self.min_protocol);
        builder.set_max_protocol(self.max_protocol);
        builder.set_max_concurrency(self.max_concurrency);
        builder.set_prior_inputs_once(self.prior_inputs_once);
        builder.set_opens_progress(self.opens_progress);
        let mut types = builder.init_resource_types(self.resource_types.len() as u32);
        for (n, t) in self.resource_types.iter().enumerate() {
            let mut tb = types.reborrow().get(n as u32);
            tb.set_name(&t.name[..]);
            tb.set_description(&t.description[..]);
            tb.set_stateful(t.stateful);
            tb.set_open_inputs(t.open_inputs);
            tb.set_no_delete(t.no_delete);
            tb.set_read_on_plan(t.read_on_plan);
            tb.set_read_checks(t.read_checks);
            tb.set_plans_changes(t.plans_changes);
            tb.set_read_only(t.read_only);
            tb.set_checks_inputs(t.checks_inputs);
            tb.set_uses_scheduler(t.uses_scheduler);
            let mut inputs = tb.reborrow().init_inputs(t.inputs.len() as u32);
            for (k, i) in t.inputs.iter().enumerate() {
                let mut ib = inputs.reborrow().get(k as u32);
                ib.set_name(&i.name[..]);
                ib.set_required(i.required);
                ib.set_description(&i.description[..]);
                ib.set_sensitive(i.sensitive);
            }
            let mut outputs = tb.init_outputs(t.outputs.len() as u32);
            for (k, o) in t.outputs.iter().enumerate() {
                let mut ob = outputs.reborrow().get(k as u32);
                ob.set_name(&o.name[..]);
                ob.set_description(&o.description[..]);
                ob.set_sensitive(o.sensitive);
                ob.set_public(o.public);
                ob.set_prior_unused(o.prior_unused);
            }
        }
    }
}

/// Picks the protocol version for a connection: the highest both ranges contain.
pub fn negotiate_protocol(ours: (u32, u32), theirs: (u32, u32)) -> Option<u32> {
    let low = ours.0.max(theirs.0);
    let high = ours.1.min(theirs.1);
    (low <= high && high > 0).then_some(high)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_picks_the_highest_shared_version() {
        assert_eq!(negotiate_protocol((1, 3), (2, 5)), Some(3));
        assert_eq!(negotiate_protocol((1, 1), (1, 1)), Some(1));
        assert_eq!(negotiate_protocol((1, 1), (2, 3)), None);
    }

    #[test]
    fn provider_info_round_trips_through_the_wire() {
        let info = ProviderInfo {
            name: "p".into(),
            version: "1.2.3".into(),
            protocol: 1,
            min_protocol: 1,
            max_protocol: 1,
            max_concurrency: 4,
            prior_inputs_once: true,
            opens_progress: true,
            resource_types: vec![ResourceTypeInfo {
                name: "file".into(),
                description: "a file".into(),
                inputs: vec![InputInfo {
                    name: "path".into(),
                    required: true,
                    description: String::new(),
                    sensitive: true,
                }],
                outputs: vec![OutputInfo {
                    name: "hash".into(),
                    description: "sha".into(),
                    sensitive: true,
                    public: true,
                    prior_unused: true,
                }],
                stateful: true,
                open_inputs: true,
                no_delete: false,
                read_on_plan: true,
                read_checks: true,
                plans_changes: true,
                read_only: true,
                checks_inputs: true,
                uses_scheduler: true,
            }],
        };
        let mut message = capnp::message::Builder::new_default();
        info.write(message.init_root());
        let reader = message
            .get_root_as_reader::<provider_capnp::provider_info::Reader>()
            .unwrap();
        assert_eq!(ProviderInfo::read(reader).unwrap(), info);
    }
}

/// What a provider plans for a create or update (`Provider.plan`): the outputs as they will be
/// (JSON text; unknown ones null), the names of those known only after the operation runs, and,
/// for an update, the attributes whose change forces a new resource.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderPlan {
    pub outputs: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unknown: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replace: Vec<String>,
}

impl ProviderPlan {
    /// Reads a plan off the wire.
    pub fn read(reader: provider_capnp::plan_result::planned::Reader<'_>) -> capnp::Result<Self> {
        let list = |l: capnp::text_list::Reader<'_>| -> capnp::Result<Vec<String>> {
            l.iter().map(|t| Ok(t?.to_string()?)).collect()
        };
        Ok(ProviderPlan {
            outputs: reader.get_outputs()?.to_string()?,
            unknown: list(reader.get_unknown()?)?,
            replace: list(reader.get_replace()?)?,
        })
    }

    /// Writes a plan to the wire.
    pub fn write(&self, mut builder: provider_capnp::plan_result::planned::Builder<'_>) {
        builder.set_outputs(&self.outputs[..]);
        let mut unknown = builder.reborrow().init_unknown(self.unknown.len() as u32);
        for (n, name) in self.unknown.iter().enumerate() {
            unknown.set(n as u32, &name[..]);
        }
        let mut replace = builder.init_replace(self.replace.len() as u32);
        for (n, name) in self.replace.iter().enumerate() {
            replace.set(n as u32, &name[..]);
        }
    }
}
