//! JSON as a deployment or a parameters file is read: like `serde_json`, except that an object
//! naming one key twice is an error instead of "the last one wins" — two resources called `a`
//! or two `content` inputs are a mistake to point at, never a choice to make silently.

use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::Deserializer;
use serde_json::{Map, Number, Value};

/// What went wrong, without serde_json's line and column (they count within the fragment
/// being read, not the file, so the caller names the place instead).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StrictError {
    /// `key` appears twice in one object.
    DuplicateKey(String),
    /// Nested deeper than serde_json reads (128 levels).
    TooDeep,
    /// Not JSON (the message is serde_json's, with its position within the fragment).
    Syntax(String),
}

impl fmt::Display for StrictError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StrictError::DuplicateKey(key) => write!(
                f,
                "the key `{}` appears twice in one object; name each key once",
                printable(key)
            ),
            StrictError::TooDeep => f.write_str(
                "nested too deeply: JSON here may nest at most 127 objects or arrays deep",
            ),
            StrictError::Syntax(message) => write!(f, "not valid JSON: {message}"),
        }
    }
}

/// The custom error a duplicate key raises inside serde, recognised again by its prefix.
const DUPLICATE: &str = "\u{0}duplicate key ";

fn classify(error: serde_json::Error) -> StrictError {
    let mut text = error.to_string();
    // serde_json ends a message with exactly this when it knows the position.
    let position = format!(" at line {} column {}", error.line(), error.column());
    if error.line() > 0 && text.ends_with(&position) {
        text.truncate(text.len() - position.len());
    }
    if let Some(key) = text.strip_prefix(DUPLICATE) {
        return StrictError::DuplicateKey(key.to_string());
    }
    if text.starts_with("recursion limit exceeded") {
        return StrictError::TooDeep;
    }
    StrictError::Syntax(text)
}

/// Parses `text` into a value, refusing duplicate keys at any depth.
pub fn parse(text: &str) -> Result<Value, StrictError> {
    let mut de = serde_json::Deserializer::from_str(text);
    let value = UniqueValue.deserialize(&mut de).map_err(classify)?;
    de.end().map_err(classify)?;
    Ok(value)
}

/// Parses a whole file (`--params`, `--secrets`) as [`parse`] does, skipping a UTF-8
/// byte-order mark (editors on some systems write one), and saying where in the file a
/// syntax error is.
pub fn parse_document(text: &str) -> Result<Value, String> {
    let text = text.strip_prefix('\u{FEFF}').unwrap_or(text);
    let mut de = serde_json::Deserializer::from_str(text);
    let parsed = UniqueValue
        .deserialize(&mut de)
        .and_then(|value| de.end().map(|()| value));
    parsed.map_err(|e| {
        let (line, column) = (e.line(), e.column());
        match classify(e) {
            StrictError::Syntax(message) if line > 0 => {
                format!("not valid JSON at line {line}, column {column}: {message}")
            }
            other => other.to_string(),
        }
    })
}

/// Checks that no two of `keys` are the same; the first repeated one otherwise.
pub fn check_unique<'a>(keys: impl IntoIterator<Item = &'a str>) -> Result<(), StrictError> {
    // Sized once and hashed with FNV: a group of a million resources checked here grew a
    // SipHash set by doubling.
    let keys = keys.into_iter();
    let mut seen: capstan_state::maps::FastSet<&str> =
        capstan_state::maps::FastSet::with_capacity_and_hasher(
            keys.size_hint().0,
            Default::default(),
        );
    for key in keys {
        if !seen.insert(key) {
            return Err(StrictError::DuplicateKey(key.to_string()));
        }
    }
    Ok(())
}

struct UniqueValue;

impl<'de> DeserializeSeed<'de> for UniqueValue {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for UniqueValue {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(item) = seq.next_element_seed(UniqueValue)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut members = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if members.contains_key(&key) {
                return Err(de::Error::custom(format_args!("{DUPLICATE}{key}")));
            }
            let value = map.next_value_seed(UniqueValue)?;
            members.insert(key, value);
        }
        Ok(Value::Object(members))
    }
}

/// `text` with control characters shown as escapes, for messages that quote a name a user
/// wrote (a name with an ANSI escape must not reach the terminal raw).
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    let hidden = |c: char| c.is_control() || invisible(c);
    if text.chars().any(hidden) {
        text.chars()
            .flat_map(|c| {
                if c.is_control() {
                    c.escape_default().collect::<Vec<_>>()
                } else if invisible(c) {
                    c.escape_unicode().collect::<Vec<_>>()
                } else {
                    vec![c]
                }
            })
            .collect::<String>()
            .into()
    } else {
        text.into()
    }
}

/// Characters that show nothing or reorder what follows: zero-width spaces and joiners, the
/// byte-order mark, soft hyphens, and the bidirectional controls (Trojan Source).
pub fn invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{034F}'
            | '\u{061C}'
            | '\u{115F}'
            | '\u{1160}'
            | '\u{17B4}'
            | '\u{17B5}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{3164}'
            | '\u{FE00}'..='\u{FE0F}'
            | '\u{FEFF}'
            | '\u{FFA0}'
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_serde_json_reads() {
        let text = r#"{"a": [1, -2, 3.5, "x", null, true, {"b": {}}], "c": "\u00e9"}"#;
        assert_eq!(
            parse(text).unwrap(),
            serde_json::from_str::<Value>(text).unwrap()
        );
    }

    #[test]
    fn a_duplicate_key_at_any_depth_is_an_error() {
        assert_eq!(
            parse(r#"{"a": 1, "a": 2}"#),
            Err(StrictError::DuplicateKey("a".into()))
        );
        assert_eq!(
            parse(r#"{"x": [{"k y": 1, "k y": 2}]}"#),
            Err(StrictError::DuplicateKey("k y".into()))
        );
        assert!(
            parse(r#"{"a": {"a": 1}}"#).is_ok(),
            "the same key in two objects"
        );
        // Keys are shown whole and escaped, whatever they hold.
        let odd = parse(r#"{"x at line 1": 1, "x at line 1": 2}"#).unwrap_err();
        assert_eq!(odd, StrictError::DuplicateKey("x at line 1".into()));
        let evil = parse("{\"\\u001b[31m\": 1, \"\\u001b[31m\": 2}").unwrap_err();
        assert!(!evil.to_string().contains('\u{1b}'), "{evil}");
    }

    #[test]
    fn a_document_skips_a_byte_order_mark_and_says_where_it_is_wrong() {
        assert_eq!(
            parse_document("\u{FEFF}{\"a\": 1}"),
            Ok(serde_json::json!({"a": 1}))
        );
        let error = parse_document("{\n  \"a\": 1,\n  \"b\": \n}").unwrap_err();
        assert!(error.contains("line 4, column 1"), "{error}");
        let twice = parse_document("{\"a\": 1, \"a\": 2}").unwrap_err();
        assert!(twice.contains("appears twice"), "{twice}");
    }

    #[test]
    fn deep_nesting_and_bad_syntax_are_told_apart() {
        let deep = "[".repeat(100_000) + &"]".repeat(100_000);
        assert_eq!(parse(&deep), Err(StrictError::TooDeep));
        assert!(matches!(parse("{"), Err(StrictError::Syntax(_))));
        assert!(matches!(parse("{} x"), Err(StrictError::Syntax(_))));
    }
}
