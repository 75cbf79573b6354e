//! The broken-resource corpus: the JSON files beside this module, named
//! `<what is wrong>@<expression>.json`, where the expression is where a validator
//! must point. Shared by the model's and the API's tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use serde_json::Value;

/// Files rejected by the official schema too.
pub const SCHEMA_REJECTS: &str = "";
/// Files breaking rules the schema cannot express.
pub const BEYOND_SCHEMA: &str = "beyond-schema";
/// Files accepted with a warning.
pub const WARNED: &str = "warned";

pub struct Case {
    pub name: String,
    pub expression: String,
    pub resource: Value,
}

/// The cases in one part of the corpus (one of the constants above), by file name.
pub fn cases(part: &str) -> Vec<Case> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../model/tests/broken")
        .join(part);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let (_, expression) = name
                .trim_end_matches(".json")
                .split_once('@')
                .unwrap_or_else(|| panic!("{name} does not name its expression after '@'"));
            let text = std::fs::read_to_string(&path).expect("corpus file is readable");
            Case {
                expression: expression.to_owned(),
                resource: serde_json::from_str(&text).expect("corpus file is JSON"),
                name,
            }
        })
        .collect()
}
