//! `capstanfixture_slow`: an apply that takes `seconds`, logs to stderr while
//! it runs, and can be told to fail or to crash the provider process.

use std::time::Duration;

use async_trait::async_trait;
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use tf_provider::schema::{
    Attribute, AttributeConstraint, AttributeType, Block, Description, Schema,
};
use tf_provider::value::{Value, ValueBool, ValueEmpty, ValueString};
use tf_provider::{map, AttributePath, Diagnostics, Resource};

use crate::common::{attr, Meta};

/// A number of seconds, kept in the representation the host sent so it goes
/// back unchanged: cty's msgpack encoding sends whole numbers as integers,
/// float64-exact ones (0.5) as floats and the rest (0.3) as decimal strings.
#[derive(Debug, Clone, PartialEq)]
pub enum Seconds {
    Int(i64),
    Float(f64),
    Text(String),
}

impl Seconds {
    /// The value, or `None` when it is not a finite number.
    pub fn get(&self) -> Option<f64> {
        let v = match self {
            Seconds::Int(i) => *i as f64,
            Seconds::Float(f) => *f,
            Seconds::Text(t) => t.trim().parse().ok()?,
        };
        v.is_finite().then_some(v)
    }
}

impl Serialize for Seconds {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Seconds::Int(i) => serializer.serialize_i64(*i),
            Seconds::Float(f) => serializer.serialize_f64(*f),
            Seconds::Text(t) => serializer.serialize_str(t),
        }
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Seconds;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number (or a number as a decimal string)")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Seconds, E> {
                Ok(Seconds::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Seconds, E> {
                i64::try_from(v)
                    .map(Seconds::Int)
                    .or(Ok(Seconds::Float(v as f64)))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Seconds, E> {
                Ok(Seconds::Float(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Seconds, E> {
                v.trim()
                    .parse::<f64>()
                    .map(|_| Seconds::Text(v.to_string()))
                    .map_err(|_| E::invalid_value(de::Unexpected::Str(v), &self))
            }
        }
        deserializer.deserialize_any(V)
    }
}

impl std::fmt::Display for Seconds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Seconds::Int(i) => write!(f, "{i}"),
            Seconds::Float(v) => write!(f, "{v}"),
            Seconds::Text(t) => f.write_str(t),
        }
    }
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct SlowState {
    #[serde(default)]
    pub id: ValueString<'static>,
    #[serde(default)]
    pub seconds: Value<Seconds>,
    #[serde(default)]
    pub fail: ValueBool,
    #[serde(default)]
    pub crash: ValueBool,
    #[serde(default)]
    pub label: ValueString<'static>,
    /// Deprecated, and read by nothing: `provider describe` shows it as such.
    #[serde(default)]
    pub note: ValueString<'static>,
}

impl SlowState {
    /// The label, or "slow" when it is not set.
    fn name(&self) -> String {
        match &self.label {
            Value::Value(label) => label.to_string(),
            _ => "slow".to_string(),
        }
    }

    /// What `id` will be: known as soon as `label` is.
    fn planned_id(&self) -> ValueString<'static> {
        match &self.label {
            Value::Unknown => Value::Unknown,
            _ => Value::Value(self.name().into()),
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SlowResource;

/// Log, sleep, maybe crash, maybe fail. Returns `None` (with an error) when told to fail.
async fn run(diags: &mut Diagnostics, state: SlowState) -> Option<SlowState> {
    let label = state.name();
    let (seconds, secs) = match &state.seconds {
        Value::Value(s) if s.get().is_some_and(|v| v >= 0.0) => (s.clone(), s.get().unwrap_or(0.0)),
        _ => {
            diags.error_short(
                "seconds must be a known, non-negative number",
                AttributePath::new("seconds"),
            );
            return None;
        }
    };
    let crash = matches!(state.crash, Value::Value(true));
    let fail = matches!(state.fail, Value::Value(true));

    let steps = ((secs * 10.0).ceil() as u64).max(1);
    let step = Duration::from_secs_f64(secs / steps as f64);
    for i in 1..=steps {
        eprintln!("slow {label}: step {i} of {steps}");
        if i % 2 == 1 {
            let line = serde_json::json!({
                "@level": "info",
                "@message": format!("slow {label} progress {i}/{steps}"),
                "@module": "provider",
            });
            eprintln!("{line}");
        }
        tokio::time::sleep(step).await;
        if crash && i == 1 {
            eprintln!("slow {label}: crashing as told (exit 3)");
            std::process::exit(3);
        }
    }

    if fail {
        diags.error(
            "the fixture was told to fail",
            format!("fail = true in {label}"),
            AttributePath::new("fail"),
        );
        diags.root_warning("slow things are slow", format!("took {seconds}s"));
        return None;
    }
    diags.root_warning("slow things are slow", format!("took {seconds}s"));
    let mut state = state;
    state.id = Value::Value(label.into());
    Some(state)
}

#[async_trait]
impl Resource for SlowResource {
    type State<'a> = SlowState;
    type PrivateState<'a> = ValueEmpty;
    type ProviderMetaState<'a> = Meta;

    fn schema(&self, _diags: &mut Diagnostics) -> Option<Schema> {
        Some(Schema {
            version: 1,
            block: Block {
                version: 1,
                description: Description::plain("An apply that is slow, logs, fails or crashes"),
                attributes: map! {
                    "id" => attr(AttributeType::String, AttributeConstraint::Computed, false,
                        "label, or \"slow\""),
                    "seconds" => attr(AttributeType::Number, AttributeConstraint::Required, false,
                        "How long create/update take"),
                    "fail" => attr(AttributeType::Bool, AttributeConstraint::Optional, false,
                        "Fail at the end of create/update"),
                    "crash" => attr(AttributeType::Bool, AttributeConstraint::Optional, false,
                        "Exit the provider process (status 3) after the first step"),
                    "label" => attr(AttributeType::String, AttributeConstraint::Optional, false,
                        "Name used in logs and diagnostics"),
                    "note" => Attribute {
                        deprecated: true,
                        ..attr(AttributeType::String, AttributeConstraint::Optional, false,
                            "Kept for old configurations; use label")
                    },
                },
                ..Default::default()
            },
        })
    }

    async fn validate<'a>(&self, diags: &mut Diagnostics, config: SlowState) -> Option<()> {
        if let Value::Value(s) = &config.seconds {
            if !s.get().is_some_and(|v| v >= 0.0) {
                diags.error_short(
                    "seconds must be a finite, non-negative number",
                    AttributePath::new("seconds"),
                );
            }
        }
        Some(())
    }

    async fn read<'a>(
        &self,
        _diags: &mut Diagnostics,
        state: SlowState,
        private_state: ValueEmpty,
        _meta: Meta,
    ) -> Option<(SlowState, ValueEmpty)> {
        Some((state, private_state))
    }

    async fn plan_create<'a>(
        &self,
        _diags: &mut Diagnostics,
        proposed_state: SlowState,
        _config_state: SlowState,
        _meta: Meta,
    ) -> Option<(SlowState, ValueEmpty)> {
        let mut state = proposed_state;
        state.id = state.planned_id();
        Some((state, ValueEmpty::default()))
    }

    async fn plan_update<'a>(
        &self,
        _diags: &mut Diagnostics,
        _prior_state: SlowState,
        proposed_state: SlowState,
        _config_state: SlowState,
        prior_private_state: ValueEmpty,
        _meta: Meta,
    ) -> Option<(SlowState, ValueEmpty, Vec<AttributePath>)> {
        let mut state = proposed_state;
        state.id = state.planned_id();
        Some((state, prior_private_state, Vec::new()))
    }

    async fn plan_destroy<'a>(
        &self,
        _diags: &mut Diagnostics,
        _prior_state: SlowState,
        prior_private_state: ValueEmpty,
        _meta: Meta,
    ) -> Option<ValueEmpty> {
        Some(prior_private_state)
    }

    async fn create<'a>(
        &self,
        diags: &mut Diagnostics,
        planned_state: SlowState,
        _config_state: SlowState,
        planned_private_state: ValueEmpty,
        _meta: Meta,
    ) -> Option<(SlowState, ValueEmpty)> {
        let state = run(diags, planned_state).await?;
        Some((state, planned_private_state))
    }

    async fn update<'a>(
        &self,
        diags: &mut Diagnostics,
        _prior_state: SlowState,
        planned_state: SlowState,
        _config_state: SlowState,
        planned_private_state: ValueEmpty,
        _meta: Meta,
    ) -> Option<(SlowState, ValueEmpty)> {
        let state = run(diags, planned_state).await?;
        Some((state, planned_private_state))
    }

    async fn destroy<'a>(
        &self,
        _diags: &mut Diagnostics,
        _prior_state: SlowState,
        _planned_private_state: ValueEmpty,
        _meta: Meta,
    ) -> Option<()> {
        Some(())
    }
}
