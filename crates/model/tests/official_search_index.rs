//! Every official R4 example, and every resource bundled in one, is indexed
//! without a panic, and nearly all give more than their `_id`.

mod official;

use std::collections::BTreeMap;
use std::time::Instant;

use haven_model::search_index::{index_values, IndexValue};
use serde_json::Value;

#[test]
fn every_official_example_is_indexed_without_panicking() {
    let Some(files) = official::example_files() else {
        println!("not run: HAVEN_SHARED is not set");
        return;
    };
    let started = Instant::now();
    let mut resources = 0usize;
    let mut only_id = Vec::new();
    let mut by_kind: BTreeMap<&'static str, usize> = BTreeMap::new();
    for path in &files {
        let text = std::fs::read_to_string(path).expect("example is readable");
        let Ok(example) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        let mut found = vec![&example];
        let entries = example.get("entry").and_then(Value::as_array);
        found.extend(
            entries
                .into_iter()
                .flatten()
                .filter_map(|e| e.get("resource")),
        );
        for resource in found {
            if resource.get("resourceType").is_none() {
                continue;
            }
            resources += 1;
            let values = index_values(resource);
            for value in &values {
                *by_kind.entry(value.kind()).or_default() += 1;
                if let IndexValue::Composite { parts, .. } = value {
                    assert!(parts.len() >= 2, "{value:?}");
                }
            }
            if values.iter().all(|v| v.param() == "_id") {
                let name = path.file_name().unwrap_or_default().to_string_lossy();
                only_id.push(format!("{name} ({})", resource["resourceType"]));
            }
        }
    }
    let elapsed = started.elapsed();
    println!(
        "{resources} resources from {} files indexed in {elapsed:.2?}",
        files.len()
    );
    for (kind, count) in &by_kind {
        println!("  {kind:>10}: {count}");
    }
    println!("{} give nothing but their id:", only_id.len());
    for name in &only_id {
        println!("  {name}");
    }
    assert!(files.len() > 5000, "only {} examples found", files.len());
    // Nearly every resource has something to find it by besides its id.
    assert!(
        only_id.len() * 100 <= resources,
        "{} of {resources} resources give nothing but their id",
        only_id.len()
    );
    for kind in [
        "string",
        "token",
        "of-type",
        "reference",
        "date",
        "number",
        "quantity",
        "uri",
        "composite",
    ] {
        assert!(by_kind.contains_key(kind), "no {kind} entries");
    }
}
