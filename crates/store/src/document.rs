//! What the store does to resource JSON: stamping `id` and `meta`, and extracting
//! the `identifier` tokens it indexes.

use haven_model::clock::format_instant;
use serde_json::{Map, Value};
use time::OffsetDateTime;

use crate::{Result, StoreError};

/// Returns the resource with `resourceType`, `id`, `meta.versionId` and
/// `meta.lastUpdated` set by the store; other `meta` fields the client sent stay.
pub(crate) fn stamp(
    resource: Value,
    resource_type: &str,
    id: &str,
    version: i64,
    last_updated: OffsetDateTime,
) -> Result<Value> {
    let Value::Object(mut fields) = resource else {
        return Err(StoreError::Database(format!(
            "{resource_type}/{id}: a resource must be a JSON object"
        )));
    };
    fields.remove("resourceType");
    fields.remove("id");
    let mut meta = match fields.remove("meta") {
        Some(Value::Object(meta)) => meta,
        _ => Map::new(),
    };
    meta.remove("versionId");
    meta.remove("lastUpdated");

    // Rebuilt so that the stamped fields lead, as FHIR examples show them.
    let mut stamped_meta = Map::with_capacity(meta.len() + 2);
    stamped_meta.insert("versionId".into(), Value::String(version.to_string()));
    stamped_meta.insert(
        "lastUpdated".into(),
        Value::String(format_instant(last_updated)),
    );
    stamped_meta.extend(meta);

    let mut stamped = Map::with_capacity(fields.len() + 3);
    stamped.insert("resourceType".into(), Value::String(resource_type.into()));
    stamped.insert("id".into(), Value::String(id.into()));
    stamped.insert("meta".into(), Value::Object(stamped_meta));
    stamped.extend(fields);
    Ok(Value::Object(stamped))
}

/// Puts `resourceType`, `id` and `meta` first again, for backends (jsonb) that
/// do not keep key order.
pub(crate) fn lead_with_stamped_fields(resource: Value) -> Value {
    let mut resource = leading(resource, &["resourceType", "id", "meta"]);
    if let Some(meta) = resource.get_mut("meta") {
        *meta = leading(meta.take(), &["versionId", "lastUpdated"]);
    }
    resource
}

/// The object with the named keys moved to the front, in that order.
fn leading(value: Value, keys: &[&str]) -> Value {
    let Value::Object(mut fields) = value else {
        return value;
    };
    let mut ordered = Map::with_capacity(fields.len());
    for key in keys {
        if let Some(value) = fields.remove(*key) {
            ordered.insert((*key).into(), value);
        }
    }
    ordered.extend(fields);
    Value::Object(ordered)
}

/// The `(system, value)` pairs of the top-level `identifier` element, which may be
/// an array or a single object. A missing system is `""`; identifiers without a
/// value are skipped, since no token search can name them by code.
pub(crate) fn identifier_tokens(resource: &Value) -> Vec<(String, String)> {
    let mut tokens: Vec<(String, String)> = Vec::new();
    let mut add = |identifier: &Value| {
        let Some(value) = identifier.get("value").and_then(Value::as_str) else {
            return;
        };
        let system = identifier
            .get("system")
            .and_then(Value::as_str)
            .unwrap_or("");
        let token = (system.to_owned(), value.to_owned());
        if !tokens.contains(&token) {
            tokens.push(token);
        }
    };
    match resource.get("identifier") {
        Some(Value::Array(items)) => items.iter().for_each(&mut add),
        Some(item @ Value::Object(_)) => add(item),
        _ => {}
    }
    tokens
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use time::macros::datetime;

    #[test]
    fn stamping_keeps_client_meta_and_overrides_version_and_time() {
        let stamped = stamp(
            json!({"resourceType": "Patient", "id": "x", "active": true,
                   "meta": {"versionId": "9", "profile": ["p"], "source": "s"}}),
            "Patient",
            "abc",
            3,
            datetime!(2026-01-02 03:04:05.678901 UTC),
        )
        .unwrap();
        assert_eq!(
            stamped,
            json!({"resourceType": "Patient", "id": "abc",
                   "meta": {"versionId": "3", "lastUpdated": "2026-01-02T03:04:05.678901Z",
                            "profile": ["p"], "source": "s"},
                   "active": true})
        );
        let keys: Vec<_> = stamped.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, ["resourceType", "id", "meta", "active"]);
    }

    #[test]
    fn stamped_fields_are_moved_back_to_the_front() {
        let shuffled = json!({"active": true, "meta": {"source": "s", "versionId": "1"},
                              "id": "a", "resourceType": "Patient"});
        let ordered = lead_with_stamped_fields(shuffled);
        let keys: Vec<_> = ordered.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, ["resourceType", "id", "meta", "active"]);
        let meta: Vec<_> = ordered["meta"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        assert_eq!(meta, ["versionId", "source"]);
    }

    #[test]
    fn identifiers_are_read_from_arrays_and_single_objects() {
        let many = json!({"identifier": [
            {"system": "s", "value": "1"}, {"value": "2"}, {"system": "s"}, {"system": "s", "value": "1"}
        ]});
        assert_eq!(
            identifier_tokens(&many),
            [
                ("s".to_owned(), "1".to_owned()),
                (String::new(), "2".to_owned())
            ]
        );
        let one = json!({"identifier": {"system": "t", "value": "9"}});
        assert_eq!(identifier_tokens(&one), [("t".to_owned(), "9".to_owned())]);
        assert!(identifier_tokens(&json!({})).is_empty());
    }
}
