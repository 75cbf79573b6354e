//! A corpus of broken resources, each rejected with an issue at the right element.
//!
//! Files live in `tests/broken/` and are named `<what is wrong>@<expression>.json`,
//! where the expression is where the validator must point. Those directly in
//! `broken/` are also rejected by the official JSON schema (checked when
//! `HAVEN_SHARED` is set); those in `broken/beyond-schema/` break rules the schema
//! cannot express (one type per choice, non-empty arrays, numeric ranges, ...).
//! Those in `broken/warned/` are accepted with a warning at the element: a missing
//! required primitive, which the schema allows because `_name` may carry it.

mod broken;
mod official;

use broken::{Case, BEYOND_SCHEMA, SCHEMA_REJECTS, WARNED};
use haven_model::outcome::Severity;
use haven_model::validate::validate_resource;

/// Failure lines for files the validator accepts or flags elsewhere.
fn misjudged(cases: &[Case]) -> Vec<String> {
    let mut failures = Vec::new();
    for Case {
        name,
        expression,
        resource,
    } in cases
    {
        let issues: Vec<_> = validate_resource(resource)
            .into_iter()
            .filter(|i| i.is_error())
            .collect();
        if issues.is_empty() {
            failures.push(format!("{name}: accepted"));
        } else if !issues.iter().any(|i| i.expression.contains(expression)) {
            let found: Vec<String> = issues
                .iter()
                .map(|i| format!("{} at {:?}", i.diagnostics, i.expression))
                .collect();
            failures.push(format!("{name}: expected at {expression}, got {found:?}"));
        }
    }
    failures
}

#[test]
fn every_broken_resource_is_rejected_at_the_right_element() {
    let cases = broken::cases(SCHEMA_REJECTS);
    assert!(cases.len() >= 25, "only {} broken resources", cases.len());
    let failures = misjudged(&cases);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn broken_resources_beyond_the_schema_are_rejected_at_the_right_element() {
    let cases = broken::cases(BEYOND_SCHEMA);
    assert!(!cases.is_empty());
    let failures = misjudged(&cases);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_official_schema_rejects_every_broken_resource_too() {
    let Some(schema) = official::schema() else {
        println!("not run: HAVEN_SHARED is not set");
        return;
    };
    let accepted: Vec<String> = broken::cases(SCHEMA_REJECTS)
        .into_iter()
        .filter(|case| schema.is_valid(&case.resource))
        .map(|case| case.name)
        .collect();
    assert!(accepted.is_empty(), "the schema accepts {accepted:?}");
}

#[test]
fn a_missing_required_primitive_is_accepted_with_a_warning_at_the_element() {
    let cases = broken::cases(WARNED);
    assert!(!cases.is_empty());
    for Case {
        name,
        expression,
        resource,
    } in &cases
    {
        let issues = validate_resource(resource);
        assert!(!issues.iter().any(|i| i.is_error()), "{name}: {issues:?}");
        assert!(
            issues
                .iter()
                .any(|i| i.severity == Severity::Warning && i.expression.contains(expression)),
            "{name}: {issues:?}"
        );
    }
}
