//! A strict JSON reader for request bodies.
//!
//! `serde_json::from_slice::<Value>` silently keeps the last of two equal object
//! keys, so `{"id":"a","id":"b"}` would mean different things to different
//! readers. FHIR JSON (R4 json.html) forbids duplicates, and a deeply nested body
//! is a cheap way to exhaust a server, so bodies are read through a
//! [`DeserializeSeed`] that builds the [`Value`] itself and refuses both.

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// Why a body was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JsonError {
    /// Not JSON, a duplicate key, or too deep; the message is safe to show.
    Invalid(String),
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JsonError::Invalid(m) => f.write_str(m),
        }
    }
}

/// Parses `bytes` as one JSON value, refusing duplicate keys and nesting deeper
/// than `max_depth` (the outermost object or array is depth 1).
pub fn parse(bytes: &[u8], max_depth: usize) -> Result<Value, JsonError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = StrictValue {
        depth: 0,
        max_depth,
    }
    .deserialize(&mut de)
    .map_err(|e| JsonError::Invalid(format!("invalid JSON: {e}")))?;
    de.end()
        .map_err(|e| JsonError::Invalid(format!("invalid JSON: {e}")))?;
    Ok(value)
}

#[derive(Clone, Copy)]
struct StrictValue {
    depth: usize,
    max_depth: usize,
}

impl StrictValue {
    fn nested<E: serde::de::Error>(self) -> Result<Self, E> {
        let depth = self.depth + 1;
        if depth > self.max_depth {
            return Err(E::custom(format!(
                "nesting deeper than {} levels",
                self.max_depth
            )));
        }
        Ok(Self { depth, ..self })
    }
}

impl<'de> DeserializeSeed<'de> for StrictValue {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for StrictValue {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("number out of range"))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let inner = self.nested()?;
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(item) = seq.next_element_seed(inner)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let inner = self.nested()?;
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(A::Error::custom(format!("duplicate key \"{key}\"")));
            }
            let value = map.next_value_seed(inner)?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_json_is_read_unchanged() {
        let text = br#"{"resourceType":"Patient","a":[1,2.5,true,null,{"b":"c"}]}"#;
        let v = parse(text, 10).unwrap();
        assert_eq!(v, serde_json::from_slice::<Value>(text).unwrap());
    }

    #[test]
    fn duplicate_keys_are_refused_even_when_nested() {
        let err = parse(br#"{"a":{"b":1,"b":2}}"#, 10).unwrap_err();
        assert!(err.to_string().contains("duplicate key \"b\""), "{err}");
    }

    #[test]
    fn nesting_beyond_the_limit_is_refused() {
        assert!(parse(b"[[[1]]]", 3).is_ok());
        assert!(parse(b"[[[[1]]]]", 3).is_err());
        assert!(parse(br#"{"a":{"b":{"c":{}}}}"#, 3).is_err());
    }

    #[test]
    fn trailing_garbage_is_refused() {
        assert!(parse(b"{} x", 3).is_err());
    }
}
