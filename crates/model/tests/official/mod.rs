//! Access to the official R4 files under `$HAVEN_SHARED`, for the tests that need them.

#![allow(dead_code)]

use std::path::PathBuf;

use serde_json::{json, Value};

/// `$HAVEN_SHARED/fhir-r4`, relative paths taken from the workspace root, or `None`
/// when the variable is unset.
pub fn fhir_r4_dir() -> Option<PathBuf> {
    let shared = PathBuf::from(std::env::var_os("HAVEN_SHARED")?);
    let shared = if shared.is_absolute() {
        shared
    } else {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(shared)
    };
    Some(shared.join("fhir-r4"))
}

/// Every `*.json` file of `$HAVEN_SHARED/fhir-r4/examples`, sorted, or `None` when
/// the variable is unset.
pub fn example_files() -> Option<Vec<PathBuf>> {
    let dir = fhir_r4_dir()?.join("examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    Some(files)
}

/// The official `fhir.schema.json`, compiled.
///
/// The schema picks a resource's definition with a `oneOf` over all 146 of them,
/// which makes every resource (and every contained or bundled one) be checked 146
/// times. Each definition requires its own `resourceType` constant, so exactly one
/// can match: dispatching on `resourceType` with `if`/`then` accepts the same
/// documents and is far cheaper.
pub fn schema() -> Option<jsonschema::Validator> {
    let path = fhir_r4_dir()?.join("fhir.schema.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let mut schema: Value = serde_json::from_str(&text).expect("fhir.schema.json parses");
    let dispatch = dispatch_on_resource_type(&schema["oneOf"]);
    schema["$schema"] = json!("http://json-schema.org/draft-07/schema#");
    schema["definitions"]["ResourceList"] = dispatch.clone();
    let root = schema.as_object_mut().expect("schema is an object");
    root.remove("oneOf");
    root.remove("discriminator");
    root.insert("allOf".into(), json!([dispatch]));
    Some(jsonschema::validator_for(&schema).expect("fhir.schema.json compiles"))
}

fn dispatch_on_resource_type(one_of: &Value) -> Value {
    let refs = one_of.as_array().expect("the schema's oneOf is a list");
    let names: Vec<&str> = refs
        .iter()
        .map(|r| {
            let target = r["$ref"].as_str().expect("oneOf holds references");
            target.trim_start_matches("#/definitions/")
        })
        .collect();
    let branches: Vec<Value> = names
        .iter()
        .map(|name| {
            json!({
                "if": {"properties": {"resourceType": {"const": name}}},
                "then": {"$ref": format!("#/definitions/{name}")},
            })
        })
        .collect();
    json!({
        "type": "object",
        "required": ["resourceType"],
        "properties": {"resourceType": {"enum": names}},
        "allOf": branches,
    })
}
