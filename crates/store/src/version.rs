//! Building new versions and the rules every write follows, shared by both backends.

use serde_json::Value;
use time::OffsetDateTime;

use crate::document::stamp;
use crate::{Change, ResourceVersion, Result, StoreError};

/// The name a change is stored under.
pub(crate) fn change_name(change: Change) -> &'static str {
    match change {
        Change::Create => "create",
        Change::Update => "update",
        Change::Delete => "delete",
    }
}

pub(crate) fn change_from_name(name: &str) -> Result<Change> {
    match name {
        "create" => Ok(Change::Create),
        "update" => Ok(Change::Update),
        "delete" => Ok(Change::Delete),
        other => Err(StoreError::Database(format!(
            "unknown change kind {other:?}"
        ))),
    }
}

/// `If-Match` semantics: a given expected version must be the current one.
pub(crate) fn check_expected(expected: Option<i64>, current: Option<i64>) -> Result<()> {
    match expected {
        Some(expected) if current != Some(expected) => {
            Err(StoreError::VersionConflict { expected, current })
        }
        _ => Ok(()),
    }
}

/// Serializes a stamped resource and describes the version it becomes.
pub(crate) fn new_version(
    resource_type: &str,
    id: &str,
    version: i64,
    last_updated: OffsetDateTime,
    change: Change,
    resource: Option<Value>,
) -> Result<(ResourceVersion, Option<String>)> {
    let resource = resource
        .map(|r| stamp(r, resource_type, id, version, last_updated))
        .transpose()?;
    let body = resource
        .as_ref()
        .map(serde_json::to_string)
        .transpose()
        .map_err(|e| StoreError::Database(format!("resource cannot be serialized: {e}")))?;
    Ok((
        ResourceVersion {
            resource_type: resource_type.to_owned(),
            id: id.to_owned(),
            version,
            last_updated,
            change,
            resource,
        },
        body,
    ))
}
