//! [`Json`]: a JSON value kept as its text.
//!
//! Inputs and outputs travel as JSON text on the wire and in the journal, and the engine holds
//! one of each for every resource of a deployment. A `serde_json::Value` tree of a small object
//! costs several hundred bytes in many allocations; its text costs its length in one. So the
//! core keeps the text, and parses it where it needs the structure (resolving references,
//! planning, showing it), which is rare and short-lived.

use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// A JSON value stored as valid JSON text on one line: text with line breaks (pretty-printed)
/// is re-encoded compactly, so a `Json` can be written into a line-oriented journal or event
/// stream as is. Two `Json`s are equal when they mean the same value, whatever their spacing
/// or key order.
#[derive(Clone, Serialize)]
#[serde(transparent)]
pub struct Json(Box<RawValue>);

impl schemars::JsonSchema for Json {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Json".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "description": "Any JSON value, as the provider or the deployment gave it." })
    }
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = Box::<RawValue>::deserialize(deserializer)?;
        Json::checked(raw).map_err(de::Error::custom)
    }
}

impl Json {
    /// The JSON of a value.
    pub fn from_value(value: &Value) -> Json {
        Json(serde_json::value::to_raw_value(value).expect("a Value always serializes"))
    }

    /// Checks `text` is JSON and keeps it (on one line).
    pub fn from_text(text: &str) -> Result<Json, serde_json::Error> {
        Json::checked(serde_json::from_str::<Box<RawValue>>(text)?)
    }

    /// Takes `text` made by replacing whole values inside one `Json`'s text with the texts of
    /// other `Json`s (or of their members): valid by construction, so it is only checked the
    /// cheap way (the strict check runs in debug builds).
    pub fn from_spliced(text: String) -> Result<Json, serde_json::Error> {
        let raw = RawValue::from_string(text)?;
        debug_assert!(
            Json::checked(raw.clone()).is_ok(),
            "spliced text is strict JSON: {}",
            raw.get()
        );
        if raw.get().contains(['\n', '\r']) {
            return Json::checked(raw);
        }
        Ok(Json(raw))
    }

    /// Keeps `raw` if it is JSON as strict as `serde_json::Value` reads it (finding the extent
    /// of a `RawValue` is lenient: it does not check that numbers fit, that escapes are whole
    /// characters, or how deep the nesting goes), re-encoded on one line if it has line breaks.
    /// Everything a `Json` holds can then be parsed without fail.
    fn checked(raw: Box<RawValue>) -> Result<Json, serde_json::Error> {
        let mut de = serde_json::Deserializer::from_str(raw.get());
        Strict.deserialize(&mut de)?;
        de.end()?;
        if raw.get().contains(['\n', '\r']) {
            // Only whitespace between tokens can be a line break: strings escape theirs.
            let value: Value = serde_json::from_str(raw.get())?;
            return Ok(Json::from_value(&value));
        }
        Ok(Json(raw))
    }

    /// `{}`.
    pub fn empty_object() -> Json {
        Json(RawValue::from_string("{}".into()).expect("valid JSON"))
    }

    /// `null`.
    pub fn null() -> Json {
        Json(RawValue::from_string("null".into()).expect("valid JSON"))
    }

    /// The text.
    pub fn text(&self) -> &str {
        self.0.get()
    }

    /// The value, parsed.
    pub fn value(&self) -> Value {
        serde_json::from_str(self.0.get()).expect("Json holds valid JSON")
    }

    /// The members of an object, parsed; empty for anything else.
    pub fn object(&self) -> Map<String, Value> {
        match self.value() {
            Value::Object(map) => map,
            _ => Map::new(),
        }
    }

    /// One member of an object, parsed; `None` if this is not an object or has no such key.
    /// Parses only that member's value.
    pub fn get(&self, key: &str) -> Option<Value> {
        let raw = self.get_raw(key)?;
        serde_json::from_str(raw.get()).ok()
    }

    /// One member of an object, as text.
    pub fn get_raw(&self, key: &str) -> Option<&RawValue> {
        let mut de = serde_json::Deserializer::from_str(self.0.get());
        Member { key }.deserialize(&mut de).ok().flatten()
    }

    /// The keys of an object (empty for anything else), without parsing the values.
    pub fn keys(&self) -> Vec<String> {
        object_members(self.0.get())
            .map(|m| m.into_iter().map(|(k, _)| k).collect())
            .unwrap_or_default()
    }
}

impl PartialEq for Json {
    fn eq(&self, other: &Json) -> bool {
        self.0.get() == other.0.get() || self.value() == other.value()
    }
}

impl PartialEq<Value> for Json {
    fn eq(&self, other: &Value) -> bool {
        &self.value() == other
    }
}

impl fmt::Debug for Json {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.get())
    }
}

impl fmt::Display for Json {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.get())
    }
}

impl From<Value> for Json {
    fn from(value: Value) -> Json {
        Json::from_value(&value)
    }
}

impl From<&Value> for Json {
    fn from(value: &Value) -> Json {
        Json::from_value(value)
    }
}

/// The members of the JSON object in `text`, in order, values as raw text; an error if `text`
/// is not an object. Cheaper than a map when the caller only walks them.
pub fn object_members(text: &str) -> Result<Vec<(String, &RawValue)>, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(text);
    let members = Members.deserialize(&mut de)?;
    de.end()?;
    Ok(members)
}

/// Reads a whole JSON value the way `serde_json::Value` would (numbers in range, escapes that
/// are whole characters, nesting within serde_json's limit), keeping nothing.
struct Strict;

impl<'de> DeserializeSeed<'de> for Strict {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Strict)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_key_seed(Strict)?.is_some() {
            map.next_value_seed(Strict)?;
        }
        Ok(())
    }
}

/// Finds one member of an object while skipping the others as raw text.
struct Member<'k> {
    key: &'k str,
}

impl<'de> DeserializeSeed<'de> for Member<'_> {
    type Value = Option<&'de RawValue>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Member<'_> {
    type Value = Option<&'de RawValue>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        // The last of duplicate keys wins, as in `serde_json::Value`.
        let mut found = None;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            let value: &'de RawValue = map.next_value()?;
            if key == self.key {
                found = Some(value);
            }
        }
        Ok(found)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<&'de RawValue>()?.is_some() {}
        Ok(None)
    }
}

/// Every member of an object, values as raw text.
struct Members;

impl<'de> DeserializeSeed<'de> for Members {
    type Value = Vec<(String, &'de RawValue)>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Members {
    type Value = Vec<(String, &'de RawValue)>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            out.push((key, map.next_value()?));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn members_are_read_without_parsing_the_rest() {
        let j = Json::from_text(r#"{"a": [1, {"x": 2}], "b\n": "t", "c": {"d": null}}"#).unwrap();
        assert_eq!(j.get("a"), Some(json!([1, {"x": 2}])));
        assert_eq!(j.get("b\n"), Some(json!("t")));
        assert_eq!(j.get("c"), Some(json!({"d": null})));
        assert_eq!(j.get("d"), None);
        assert_eq!(j.keys(), vec!["a", "b\n", "c"]);
        assert_eq!(Json::from_text("[1]").unwrap().get("a"), None);
        assert_eq!(Json::from_text("3").unwrap().keys(), Vec::<String>::new());
    }

    #[test]
    fn equality_is_by_meaning() {
        let a = Json::from_text(r#"{"a": 1, "b": [true]}"#).unwrap();
        let b = Json::from_text(r#"{"b":[true],"a":1}"#).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, Json::from_text(r#"{"a": 2, "b": [true]}"#).unwrap());
        assert_eq!(a, json!({"a": 1, "b": [true]}));
        assert!(Json::from_text("{}x").is_err());
    }

    #[test]
    fn only_json_that_parses_is_kept() {
        for bad in [
            "{}x",
            r#"{"n": 1e400}"#,
            r#"{"s": "\udc00"}"#,
            &format!("{}{}", "[".repeat(200), "]".repeat(200)),
        ] {
            assert!(Json::from_text(bad).is_err(), "{bad:.40} was kept");
            let quoted = format!(r#"{{"inputs": {bad}}}"#);
            assert!(
                serde_json::from_str::<Wrapper>(&quoted).is_err(),
                "{bad:.40} was read"
            );
        }
        let fine = Json::from_text(r#"{"n": 1e300, "s": "\ud83d\ude00", "o": 1, "o": 2}"#).unwrap();
        assert_eq!(
            fine.get("o"),
            Some(json!(2)),
            "the last duplicate wins, as in Value"
        );
        assert_eq!(fine.value()["o"], json!(2));
    }

    #[derive(Serialize, Deserialize)]
    struct Wrapper {
        inputs: Json,
    }

    #[test]
    fn text_is_always_one_line() {
        let pretty = "{\n  \"a\": \"x\\ny\",\r\n  \"b\": [\n1]\n}";
        let j = Json::from_text(pretty).unwrap();
        assert_eq!(j.text(), r#"{"a":"x\ny","b":[1]}"#);
        let spaced = Json::from_text(r#"{"a": 1}"#).unwrap();
        assert_eq!(
            spaced.text(),
            r#"{"a": 1}"#,
            "one line already: kept as it is"
        );
    }

    #[test]
    fn serializes_as_the_value_itself() {
        let j = Json::from_value(&json!({"k": "v"}));
        let text = serde_json::to_string(&Wrapper { inputs: j.clone() }).unwrap();
        assert_eq!(text, r#"{"inputs":{"k":"v"}}"#);
        let back: Wrapper = serde_json::from_str(&text).unwrap();
        assert_eq!(back.inputs, j);
    }
}
