//! Access to the official R4 files under `$HAVEN_SHARED`, for the tests that need them.

use std::path::PathBuf;

/// `$HAVEN_SHARED/fhir-r4`, relative paths taken from the workspace root, or `None`
/// when the variable is unset.
pub fn fhir_r4_dir() -> Option<PathBuf> {
    let shared = PathBuf::from(std::env::var_os("HAVEN_SHARED")?);
    let shared = if shared.is_absolute() {
        shared
    } else {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").join(shared)
    };
    Some(shared.join("fhir-r4"))
}

/// The official `fhir.schema.json`, compiled.
pub fn schema() -> Option<jsonschema::Validator> {
    let path = fhir_r4_dir()?.join("fhir.schema.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let schema: serde_json::Value = serde_json::from_str(&text).expect("fhir.schema.json parses");
    Some(jsonschema::validator_for(&schema).expect("fhir.schema.json compiles"))
}
