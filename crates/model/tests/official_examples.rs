//! Every official R4 example the official JSON schema accepts, the validator accepts.

mod official;

use std::path::PathBuf;

use haven_model::validate::validate_resource;

#[test]
fn every_official_example_the_schema_accepts_is_accepted() {
    let Some(files) = official::example_files() else {
        println!("not run: HAVEN_SHARED is not set");
        return;
    };
    let schema = official::schema().expect("HAVEN_SHARED is set");

    // Two workers: the schema check dominates and the machine has two cores.
    let halves: Vec<&[PathBuf]> = files.chunks(files.len().div_ceil(2)).collect();
    let results: Vec<(usize, usize, Vec<String>)> = std::thread::scope(|scope| {
        let workers: Vec<_> = halves
            .iter()
            .map(|half| scope.spawn(|| check(half, &schema)))
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("worker"))
            .collect()
    });
    let accepted_by_schema: usize = results.iter().map(|r| r.0).sum();
    let accepted: usize = results.iter().map(|r| r.1).sum();
    let failures: Vec<String> = results.into_iter().flat_map(|r| r.2).collect();
    println!(
        "{} examples, {accepted_by_schema} accepted by the schema, {accepted} of those by the validator",
        files.len()
    );
    assert!(files.len() > 5000, "only {} examples found", files.len());
    assert!(
        failures.is_empty(),
        "{} examples the schema accepts were rejected:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Returns how many files the schema accepts, how many of those the validator
/// accepts, and a line per disagreement.
fn check(files: &[PathBuf], schema: &jsonschema::Validator) -> (usize, usize, Vec<String>) {
    let mut by_schema = 0;
    let mut by_both = 0;
    let mut failures = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(path).expect("example is readable");
        let Ok(resource) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        if !schema.is_valid(&resource) {
            continue;
        }
        by_schema += 1;
        let issues: Vec<_> = validate_resource(&resource)
            .into_iter()
            .filter(|i| i.is_error())
            .collect();
        if issues.is_empty() {
            by_both += 1;
            continue;
        }
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        for issue in issues.iter().take(3) {
            failures.push(format!(
                "{name}: {} at {}",
                issue.diagnostics,
                issue.expression.join(", ")
            ));
        }
    }
    (by_schema, by_both, failures)
}
