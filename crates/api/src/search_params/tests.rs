use haven_model::outcome::IssueCode;
use haven_model::search_index::{index_values, IndexValue};
use haven_store::{Comparator, IndexKind, Prefix, Range, SortBy, StringMatch, UriMatch};
use time::macros::datetime;
use time::Duration;

use super::*;

const BASE: &str = "https://haven.example/fhir";

fn cx(strict: bool) -> SearchContext<'static> {
    SearchContext {
        base_url: BASE,
        now: datetime!(2024-06-01 0:00 UTC),
        default_count: 50,
        max_count: 1000,
        strict,
    }
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

fn types(list: &[&str]) -> Vec<String> {
    list.iter().map(|t| t.to_string()).collect()
}

fn parse(resource_type: &str, list: &[(&str, &str)]) -> ParsedSearch {
    parse_search(&types(&[resource_type]), &pairs(list), &cx(true))
        .unwrap_or_else(|e| panic!("{list:?} should parse: {e:?}"))
}

/// The criterion of one strict parameter on one type.
fn one(resource_type: &str, name: &str, value: &str) -> Criterion {
    parse(resource_type, &[(name, value)]).query.criterion
}

/// The issue code of a refused search.
fn refusal(resource_type: &str, list: &[(&str, &str)], strict: bool) -> IssueCode {
    match parse_search(&types(&[resource_type]), &pairs(list), &cx(strict)) {
        Ok(parsed) => panic!(
            "{list:?} should be refused, got {:?}",
            parsed.query.criterion
        ),
        Err(ApiError::Invalid(issues)) => issues[0].code,
        Err(other) => panic!("{list:?} should be a 400, got {other:?}"),
    }
}

fn token(param: &str, system: Option<&str>, code: Option<&str>) -> Criterion {
    Criterion::Token {
        param: param.into(),
        system: system.map(str::to_owned),
        code: code.map(str::to_owned),
    }
}

fn reference(param: &str, target_type: Option<&str>, target_id: Option<&str>) -> Criterion {
    Criterion::Reference {
        param: param.into(),
        target_type: target_type.map(str::to_owned),
        target_id: target_id.map(str::to_owned),
        url: None,
        version: None,
    }
}

fn string(param: &str, value: &str, how: StringMatch) -> Criterion {
    Criterion::String {
        param: param.into(),
        value: value.into(),
        how,
    }
}

// --- Dates, kept for history and the audit trail -----------------------------------

#[test]
fn a_month_covers_the_whole_month() {
    let (low, high) = parse_date_range("2024-12").unwrap();
    assert_eq!(low, datetime!(2024-12-01 0:00 UTC));
    assert_eq!(high, datetime!(2025-01-01 0:00 UTC));
}

#[test]
fn a_datetime_with_a_zone_covers_one_second() {
    let (low, high) = parse_date_range("2024-01-02T03:04:05+02:00").unwrap();
    assert_eq!(low, datetime!(2024-01-02 01:04:05 UTC));
    assert_eq!(high - low, Duration::seconds(1));
    let (low, high) = parse_date_range("2024-01-02T03:04:05.12Z").unwrap();
    assert_eq!(low, datetime!(2024-01-02 03:04:05.12 UTC));
    assert_eq!(high - low, Duration::milliseconds(10));
}

#[test]
fn a_zone_whose_plus_arrived_as_a_space_is_read_as_a_plus() {
    let (low, _) = parse_date_range("2024-01-02T03:04:05 02:00").unwrap();
    assert_eq!(low, datetime!(2024-01-02 01:04:05 UTC));
}

#[test]
fn malformed_dates_are_refused() {
    for bad in [
        "2024-1",
        "24",
        "2024-13",
        "2024-02-30",
        "2024-01-01T25:00Z",
        "x",
    ] {
        assert!(parse_date_range(bad).is_none(), "{bad}");
    }
}

#[test]
fn prefixes_become_bounds_on_the_covered_interval() {
    let b = parse_date_bounds("gt2024-01").unwrap();
    assert_eq!(b[0].comparator, Comparator::Ge);
    assert_eq!(b[0].instant, datetime!(2024-02-01 0:00 UTC));
    let b = parse_date_bounds("le2024").unwrap();
    assert_eq!(b[0].comparator, Comparator::Lt);
    assert_eq!(b[0].instant, datetime!(2025-01-01 0:00 UTC));
    assert_eq!(parse_date_bounds("eq2024-01-01").unwrap().len(), 2);
    assert!(parse_date_bounds("ne2024").is_err());
    assert!(parse_date_bounds("xx2024").is_err());
}

#[test]
fn tokens_for_the_audit_trail_come_in_four_shapes() {
    let t = parse_tokens("s|c,|c,s|,c").unwrap();
    assert_eq!(t[0].system.as_deref(), Some("s"));
    assert_eq!(t[0].code.as_deref(), Some("c"));
    assert_eq!(t[1].system.as_deref(), Some(""));
    assert_eq!(t[2].code, None);
    assert_eq!(t[3].system, None);
    assert!(parse_tokens("|").is_err());
}

// --- Combining criteria ----------------------------------------------------------

#[test]
fn unknown_parameters_are_ignored_unless_strict() {
    let p = pairs(&[("nonsense", "x"), ("_count", "5000")]);
    let parsed = parse_search(&types(&["Patient"]), &p, &cx(false)).unwrap();
    assert_eq!(parsed.ignored, vec!["nonsense=x".to_string()]);
    assert_eq!(parsed.query.count, 1000);
    assert_eq!(parsed.query.criterion, Criterion::Always);
    assert_eq!(
        refusal("Patient", &[("nonsense", "x")], true),
        IssueCode::NotSupported
    );
}

#[test]
fn unsupported_parameters_are_reported_like_unknown_ones() {
    for name in [
        "_text",
        "_content",
        "_list",
        "_query",
        "_filter",
        "_containedType",
    ] {
        let p = pairs(&[(name, "x")]);
        let parsed = parse_search(&types(&["Patient"]), &p, &cx(false)).unwrap();
        assert_eq!(parsed.ignored, vec![format!("{name}=x")], "{name}");
        assert!(parsed.applied.is_empty(), "{name}");
        assert_eq!(
            refusal("Patient", &[(name, "x")], true),
            IssueCode::NotSupported
        );
    }
    let parsed = parse_search(
        &types(&["Location"]),
        &pairs(&[("near", "1|2|3|km")]),
        &cx(false),
    )
    .unwrap();
    assert_eq!(parsed.ignored, vec!["near=1|2|3|km".to_string()]);
}

#[test]
fn criteria_on_different_parameters_and_repeats_of_one_are_anded() {
    let c = parse(
        "Patient",
        &[("family", "Shaw"), ("gender", "male"), ("family", "Lake")],
    )
    .query
    .criterion;
    assert_eq!(
        c,
        Criterion::All(vec![
            string("family", "shaw", StringMatch::StartsWith),
            token("gender", None, Some("male")),
            string("family", "lake", StringMatch::StartsWith),
        ])
    );
}

#[test]
fn comma_separated_values_are_ored_and_an_escaped_comma_is_kept() {
    assert_eq!(
        one("Patient", "family", "Shaw,Lake\\,Jr"),
        Criterion::Any(vec![
            string("family", "shaw", StringMatch::StartsWith),
            string("family", "lake,jr", StringMatch::StartsWith),
        ])
    );
    // `\|` and `\$` escape the separators of tokens and composites.
    assert_eq!(
        one("Patient", "identifier", "urn:s|a\\|b"),
        token("identifier", Some("urn:s"), Some("a|b"))
    );
    assert!(matches!(
        refusal("Patient", &[("family", "Shaw,")], false),
        IssueCode::Invalid
    ));
}

#[test]
fn an_empty_value_means_the_parameter_is_absent() {
    let parsed = parse(
        "Patient",
        &[("family", ""), ("_sort", ""), ("nonsense", "")],
    );
    assert_eq!(parsed.query.criterion, Criterion::Always);
    assert!(parsed.ignored.is_empty());
    assert!(parsed.applied.is_empty());
}

#[test]
fn parameters_handled_elsewhere_are_left_alone() {
    let parsed = parse(
        "Patient",
        &[
            ("_format", "json"),
            ("_type", "Patient"),
            ("_page", "abc"),
            ("_pretty", "true"),
        ],
    );
    assert_eq!(parsed.query.criterion, Criterion::Always);
    assert!(parsed.ignored.is_empty() && parsed.applied.is_empty());
}

#[test]
fn applied_parameters_leave_out_paging() {
    let parsed = parse(
        "Patient",
        &[
            ("family", "Shaw"),
            ("_count", "10"),
            ("_offset", "20"),
            ("_total", "none"),
            ("_sort", "family"),
            ("_sort", "-_lastUpdated"),
        ],
    );
    assert_eq!(
        parsed.applied,
        vec![
            ("family".to_string(), "Shaw".to_string()),
            ("_total".to_string(), "none".to_string()),
            ("_sort".to_string(), "-_lastUpdated".to_string()),
        ]
    );
    assert_eq!(parsed.query.count, 10);
    assert_eq!(parsed.query.offset, 20);
    assert!(!parsed.query.total);
    assert_eq!(parsed.query.types, vec!["Patient".to_string()]);
    assert!(parsed.query.filter.is_none() && parsed.query.access.is_none());
}

// --- Common parameters and system search -----------------------------------------

#[test]
fn ids_become_an_id_criterion_and_a_bad_id_is_refused() {
    assert_eq!(
        one("Patient", "_id", "a,b"),
        Criterion::Id(vec!["a".into(), "b".into()])
    );
    assert_eq!(
        refusal("Patient", &[("_id", "a b")], false),
        IssueCode::Invalid
    );
    assert_eq!(
        refusal("Patient", &[("_id:not", "a")], false),
        IssueCode::NotSupported
    );
}

#[test]
fn last_updated_takes_prefixes_at_the_precision_of_the_value() {
    assert_eq!(
        one("Patient", "_lastUpdated", "gt2024-01"),
        Criterion::LastUpdated(Range {
            prefix: Prefix::Gt,
            low: datetime!(2024-01-01 0:00 UTC),
            high: datetime!(2024-02-01 0:00 UTC),
            value: datetime!(2024-01-01 0:00 UTC),
        })
    );
    let Criterion::LastUpdated(range) = one("Patient", "_lastUpdated", "ne2024-01-02T10:00:00Z")
    else {
        panic!("a LastUpdated criterion")
    };
    assert_eq!(range.prefix, Prefix::Ne);
    assert_eq!(range.high - range.low, Duration::SECOND);
}

#[test]
fn the_other_common_parameters_are_searched_like_any_token_or_uri() {
    assert_eq!(
        one("Observation", "_tag", "urn:t|x"),
        token("_tag", Some("urn:t"), Some("x"))
    );
    assert_eq!(
        one("Observation", "_security", "R"),
        token("_security", None, Some("R"))
    );
    assert_eq!(
        one("Observation", "_profile:below", "http://p/"),
        Criterion::Uri {
            param: "_profile".into(),
            uri: "http://p/".into(),
            how: UriMatch::Below,
        }
    );
    assert_eq!(
        one("Observation", "_source", "urn:s"),
        Criterion::Uri {
            param: "_source".into(),
            uri: "urn:s".into(),
            how: UriMatch::Exact,
        }
    );
}

#[test]
fn a_system_search_allows_only_parameters_every_type_has() {
    let all: Vec<String> = Vec::new();
    let parsed = parse_search(
        &all,
        &pairs(&[("_id", "1"), ("_tag", "x"), ("family", "Shaw")]),
        &cx(false),
    )
    .unwrap();
    assert_eq!(
        parsed.query.criterion,
        Criterion::All(vec![
            Criterion::Id(vec!["1".into()]),
            token("_tag", None, Some("x"))
        ])
    );
    assert_eq!(parsed.ignored, vec!["family=Shaw".to_string()]);
    assert!(parse_search(&all, &pairs(&[("family", "Shaw")]), &cx(true)).is_err());
    // Two types that both have `patient` may use it.
    let two = types(&["Observation", "Condition"]);
    let parsed = parse_search(&two, &pairs(&[("patient", "Patient/1")]), &cx(true)).unwrap();
    assert_eq!(
        parsed.query.criterion,
        reference("patient", Some("Patient"), Some("1"))
    );
    assert!(parse_search(&two, &pairs(&[("value-quantity", "5")]), &cx(true)).is_err());
    assert!(parse_search(&types(&["Nonsense"]), &[], &cx(false)).is_err());
}

// --- Prefixes, dates and numbers --------------------------------------------------

#[test]
fn a_bad_date_is_refused() {
    assert_eq!(
        refusal("Patient", &[("birthdate", "2024-13")], false),
        IssueCode::Invalid
    );
    assert!(parse_search(
        &types(&["Patient"]),
        &pairs(&[("_lastUpdated", "2024-13")]),
        &cx(false)
    )
    .is_err());
}

#[test]
fn an_unknown_prefix_is_refused() {
    assert_eq!(
        refusal("Patient", &[("birthdate", "xx2024")], false),
        IssueCode::Invalid
    );
    assert!(parse_search(
        &types(&["RiskAssessment"]),
        &pairs(&[("probability", "zz5")]),
        &cx(false)
    )
    .is_err());
}

#[test]
fn dates_cover_their_precision_with_the_prefix_given() {
    assert_eq!(
        one("Patient", "birthdate", "le2000-02"),
        Criterion::Date {
            param: "birthdate".into(),
            range: Range {
                prefix: Prefix::Le,
                low: datetime!(2000-02-01 0:00 UTC),
                high: datetime!(2000-03-01 0:00 UTC),
                value: datetime!(2000-02-01 0:00 UTC),
            },
        }
    );
}

#[test]
fn ap_on_a_date_widens_by_a_tenth_of_the_distance_to_now_and_at_least_a_day() {
    // Ten years before `now`: about a year each side.
    let Criterion::Date { range, .. } = one("Patient", "birthdate", "ap2014-06-01") else {
        panic!("a date")
    };
    assert_eq!(range.prefix, Prefix::Ap);
    let tenth = (datetime!(2024-06-01 0:00 UTC) - datetime!(2014-06-01 0:00 UTC)) / 10i32;
    assert_eq!(range.low, datetime!(2014-06-01 0:00 UTC) - tenth);
    assert_eq!(range.high, datetime!(2014-06-02 0:00 UTC) + tenth);
    assert_eq!(range.value, datetime!(2014-06-01 0:00 UTC));
    // Close to now: one day each side.
    let Criterion::Date { range, .. } = one("Patient", "birthdate", "ap2024-06-01") else {
        panic!("a date")
    };
    assert_eq!(range.low, datetime!(2024-05-31 0:00 UTC));
    assert_eq!(range.high, datetime!(2024-06-03 0:00 UTC));
}

#[test]
fn numbers_cover_their_precision_and_ap_widens_by_a_tenth() {
    assert_eq!(
        one("RiskAssessment", "probability", "100"),
        Criterion::Number {
            param: "probability".into(),
            range: Range {
                prefix: Prefix::Eq,
                low: 99.5,
                high: 100.5,
                value: 100.0,
            },
        }
    );
    let Criterion::Number { range, .. } = one("RiskAssessment", "probability", "ap100") else {
        panic!("a number")
    };
    assert_eq!((range.low, range.high, range.value), (90.0, 110.0, 100.0));
    // The precision interval is wider than a tenth of 0.1 ± 0.05.
    let Criterion::Number { range, .. } = one("RiskAssessment", "probability", "ap0.1") else {
        panic!("a number")
    };
    assert!((range.low - 0.05).abs() < 1e-12 && (range.high - 0.15).abs() < 1e-12);
    for junk in ["abc", "1.", "gt", "1e400", "NaN"] {
        assert_eq!(
            refusal("RiskAssessment", &[("probability", junk)], false),
            IssueCode::Invalid,
            "{junk}"
        );
    }
}

#[test]
fn prefixes_on_tokens_strings_and_references_are_part_of_the_value() {
    assert_eq!(
        one("Observation", "code", "ge123"),
        token("code", None, Some("ge123"))
    );
    assert_eq!(
        one("Patient", "family", "leBlanc"),
        string("family", "leblanc", StringMatch::StartsWith)
    );
}

// --- Strings, tokens, uris -----------------------------------------------------------

#[test]
fn strings_start_with_the_normalized_value_unless_exact_or_contains() {
    assert_eq!(
        one("Patient", "family", "Müller"),
        string("family", "muller", StringMatch::StartsWith)
    );
    assert_eq!(
        one("Patient", "family:exact", "Müller"),
        string("family", "Müller", StringMatch::Exact)
    );
    assert_eq!(
        one("Patient", "family:contains", "ÜLL"),
        string("family", "ull", StringMatch::Contains)
    );
}

#[test]
fn an_unknown_modifier_is_refused() {
    assert_eq!(
        refusal("Patient", &[("name:foo", "x")], false),
        IssueCode::NotSupported
    );
    assert!(parse_search(
        &types(&["Patient"]),
        &pairs(&[("birthdate:exact", "2000")]),
        &cx(false)
    )
    .is_err());
    assert!(parse_search(
        &types(&["Observation"]),
        &pairs(&[("code:in", "http://vs")]),
        &cx(false)
    )
    .is_err());
}

#[test]
fn tokens_come_in_four_shapes() {
    assert_eq!(
        one("Patient", "identifier", "s|c,|c,s|,c"),
        Criterion::Any(vec![
            token("identifier", Some("s"), Some("c")),
            token("identifier", Some(""), Some("c")),
            token("identifier", Some("s"), None),
            token("identifier", None, Some("c")),
        ])
    );
    assert_eq!(
        refusal("Patient", &[("identifier", "|")], false),
        IssueCode::Invalid
    );
    assert_eq!(
        refusal("Patient", &[("identifier", "a|b|c")], false),
        IssueCode::Invalid
    );
    // Booleans and codes are tokens too.
    assert_eq!(
        one("Patient", "active", "true"),
        token("active", None, Some("true"))
    );
}

#[test]
fn not_text_and_of_type_modify_tokens() {
    assert_eq!(
        one("Patient", "gender:not", "male,female"),
        Criterion::Not(Box::new(Criterion::Any(vec![
            token("gender", None, Some("male")),
            token("gender", None, Some("female")),
        ])))
    );
    assert_eq!(
        one("Patient", "gender:not", "male"),
        Criterion::Not(Box::new(Criterion::Any(vec![token(
            "gender",
            None,
            Some("male")
        )])))
    );
    assert_eq!(
        one("Observation", "code:text", "Blood Pressüre"),
        Criterion::TokenText {
            param: "code".into(),
            text: "blood pressure".into(),
        }
    );
    assert_eq!(
        one(
            "Patient",
            "identifier:of-type",
            "http://terminology.hl7.org/CodeSystem/v2-0203|MR|446053"
        ),
        Criterion::TokenOfType {
            param: "identifier".into(),
            type_system: "http://terminology.hl7.org/CodeSystem/v2-0203".into(),
            type_code: "MR".into(),
            value: "446053".into(),
        }
    );
    assert_eq!(
        refusal("Patient", &[("identifier:of-type", "MR|446053")], false),
        IssueCode::Invalid
    );
}

#[test]
fn of_type_is_only_for_identifiers() {
    assert_eq!(
        refusal("Patient", &[("gender:of-type", "s|c|v")], false),
        IssueCode::NotSupported
    );
}

#[test]
fn uris_match_exactly_below_or_above() {
    let uri = |how| Criterion::Uri {
        param: "url".into(),
        uri: "http://x.org/vs".into(),
        how,
    };
    assert_eq!(
        one("ValueSet", "url", "http://x.org/vs"),
        uri(UriMatch::Exact)
    );
    assert_eq!(
        one("ValueSet", "url:below", "http://x.org/vs"),
        uri(UriMatch::Below)
    );
    assert_eq!(
        one("ValueSet", "url:above", "http://x.org/vs"),
        uri(UriMatch::Above)
    );
}

// --- References -------------------------------------------------------------------

#[test]
fn references_by_type_and_id_by_bare_id_and_by_type_modifier() {
    assert_eq!(
        one("Observation", "subject", "Patient/1"),
        reference("subject", Some("Patient"), Some("1"))
    );
    // Several possible targets: the type stays open.
    assert_eq!(
        one("Observation", "subject", "1"),
        reference("subject", None, Some("1"))
    );
    // One possible target: that type.
    assert_eq!(
        one("Patient", "organization", "o1"),
        reference("organization", Some("Organization"), Some("o1"))
    );
    assert_eq!(
        one("Observation", "subject:Patient", "1"),
        reference("subject", Some("Patient"), Some("1"))
    );
    assert_eq!(
        one("Observation", "subject", "Patient/1/_history/3"),
        reference("subject", Some("Patient"), Some("1"))
    );
    assert_eq!(
        refusal("Observation", &[("subject:Medication", "1")], false),
        IssueCode::Invalid
    );
    assert_eq!(
        refusal("Observation", &[("subject", "Nonsense/1")], false),
        IssueCode::Invalid
    );
    assert_eq!(
        refusal("Observation", &[("subject:Patient", "Group/1")], false),
        IssueCode::Invalid
    );
}

#[test]
fn a_url_of_this_server_is_local_and_other_urls_are_matched_whole() {
    assert_eq!(
        one(
            "Observation",
            "subject",
            &format!("{BASE}/Patient/1/_history/2")
        ),
        reference("subject", Some("Patient"), Some("1"))
    );
    assert_eq!(
        one(
            "Observation",
            "subject",
            "https://other.example/fhir/Patient/1/_history/2"
        ),
        Criterion::Reference {
            param: "subject".into(),
            target_type: None,
            target_id: None,
            url: Some("https://other.example/fhir/Patient/1".into()),
            version: None,
        }
    );
    assert_eq!(
        one(
            "StructureDefinition",
            "base",
            "http://hl7.org/fhir/StructureDefinition/Patient|4.0.1"
        ),
        Criterion::Reference {
            param: "base".into(),
            target_type: None,
            target_id: None,
            url: Some("http://hl7.org/fhir/StructureDefinition/Patient".into()),
            version: Some("4.0.1".into()),
        }
    );
}

#[test]
fn provenance_patient_also_searches_the_patient_compartment() {
    assert_eq!(
        one("Provenance", "patient", "p1,Patient/p2"),
        Criterion::Any(vec![
            reference("patient", Some("Patient"), Some("p1")),
            Criterion::PatientCompartment("p1".into()),
            reference("patient", Some("Patient"), Some("p2")),
            Criterion::PatientCompartment("p2".into()),
        ])
    );
    // Modified, or on another type, it is an ordinary reference.
    assert_eq!(
        one("Provenance", "patient:Patient", "p1"),
        reference("patient", Some("Patient"), Some("p1"))
    );
    assert!(matches!(
        one("Provenance", "patient:missing", "true"),
        Criterion::Missing { .. }
    ));
}

// --- Chains and _has ---------------------------------------------------------------

#[test]
fn chains_reach_the_target_types_that_define_the_parameter() {
    assert_eq!(
        one("Observation", "subject.name", "Shaw"),
        Criterion::Chain {
            param: "subject".into(),
            targets: vec![
                (
                    "Location".into(),
                    string("name", "shaw", StringMatch::StartsWith)
                ),
                (
                    "Patient".into(),
                    string("name", "shaw", StringMatch::StartsWith)
                ),
            ],
        }
    );
}

#[test]
fn a_typed_chain_takes_a_modifier_at_the_end() {
    assert_eq!(
        one("Observation", "subject:Patient.name:exact", "Shaw"),
        Criterion::Chain {
            param: "subject".into(),
            targets: vec![("Patient".into(), string("name", "Shaw", StringMatch::Exact))],
        }
    );
    assert_eq!(
        refusal("Observation", &[("subject:Medication.code", "x")], false),
        IssueCode::Invalid
    );
    // Only references chain.
    assert_eq!(
        refusal("Patient", &[("family.name", "x")], false),
        IssueCode::Invalid
    );
    // A malformed value on the target is refused.
    assert!(parse_search(
        &types(&["Observation"]),
        &pairs(&[("subject.birthdate", "2024-13")]),
        &cx(false)
    )
    .is_err());
}

#[test]
fn chains_go_several_links_deep() {
    let c = one("Patient", "organization.partof.name", "Acme");
    assert_eq!(
        c,
        Criterion::Chain {
            param: "organization".into(),
            targets: vec![(
                "Organization".into(),
                Criterion::Chain {
                    param: "partof".into(),
                    targets: vec![(
                        "Organization".into(),
                        string("name", "acme", StringMatch::StartsWith)
                    )],
                }
            )],
        }
    );
}

#[test]
fn a_chain_deeper_than_six_links_is_refused() {
    let six = "organization.partof.partof.partof.partof.partof.name";
    assert!(matches!(one("Patient", six, "x"), Criterion::Chain { .. }));
    let seven = "organization.partof.partof.partof.partof.partof.partof.name";
    assert_eq!(
        refusal("Patient", &[(seven, "x")], false),
        IssueCode::Invalid
    );
    let deep_has = "_has:Observation:patient:_has:Provenance:target:_has:Provenance:target:_has:Provenance:target:_has:Provenance:target:_has:Provenance:target:_has:Provenance:target:agent";
    assert_eq!(
        refusal("Patient", &[(deep_has, "x")], false),
        IssueCode::Invalid
    );
}

#[test]
fn a_chain_no_target_can_answer_is_ignored_unless_strict() {
    let p = pairs(&[("subject.nonsense", "x")]);
    let parsed = parse_search(&types(&["Observation"]), &p, &cx(false)).unwrap();
    assert_eq!(parsed.ignored, vec!["subject.nonsense=x".to_string()]);
    assert_eq!(
        refusal("Observation", &[("subject.nonsense", "x")], true),
        IssueCode::NotSupported
    );
}

#[test]
fn reverse_chaining_finds_resources_referred_to_by_matches() {
    assert_eq!(
        one("Patient", "_has:Observation:patient:code", "1234-5"),
        Criterion::Has {
            source_type: "Observation".into(),
            param: "patient".into(),
            criterion: Box::new(token("code", None, Some("1234-5"))),
        }
    );
    assert_eq!(
        one(
            "Patient",
            "_has:Observation:patient:_has:AuditEvent:entity:type",
            "rest"
        ),
        Criterion::Has {
            source_type: "Observation".into(),
            param: "patient".into(),
            criterion: Box::new(Criterion::Has {
                source_type: "AuditEvent".into(),
                param: "entity".into(),
                criterion: Box::new(token("type", None, Some("rest"))),
            }),
        }
    );
}

#[test]
fn has_needs_a_reference_parameter_that_can_point_at_the_searched_type() {
    for name in [
        "_has:Observation:code:code",
        "_has:Observation:performer:code",
        "_has:Nonsense:patient:code",
        "_has:Observation:patient",
        "_has",
    ] {
        assert_eq!(
            refusal("Medication", &[(name, "x")], false),
            IssueCode::Invalid,
            "{name}"
        );
    }
}

#[test]
fn an_overlong_fan_out_is_refused() {
    // `target` may point at every type: nested, it multiplies past the bound.
    let name = "target._has:Provenance:target:target._has:Provenance:target:target._id";
    assert_eq!(
        refusal("Provenance", &[(name, "1")], false),
        IssueCode::TooCostly
    );
    let many: Vec<String> = (0..1200).map(|i| format!("id{i}")).collect();
    assert_eq!(
        refusal("Patient", &[("_id", &many.join(","))], false),
        IssueCode::TooCostly
    );
}

// --- Quantities, composites, :missing ----------------------------------------------

#[test]
fn quantities_with_and_without_system_and_code() {
    let quantity =
        |prefix, low, high, value, system: Option<&str>, code: Option<&str>| Criterion::Quantity {
            param: "value-quantity".into(),
            range: Range {
                prefix,
                low,
                high,
                value,
            },
            system: system.map(str::to_owned),
            code: code.map(str::to_owned),
        };
    let Criterion::Quantity {
        range,
        system,
        code,
        ..
    } = one(
        "Observation",
        "value-quantity",
        "gt5.4|http://unitsofmeasure.org|mg",
    )
    else {
        panic!("a quantity")
    };
    assert_eq!(range.prefix, Prefix::Gt);
    assert_eq!(range.value, 5.4);
    assert!((range.low - 5.35).abs() < 1e-12 && (range.high - 5.45).abs() < 1e-12);
    assert_eq!(system.as_deref(), Some("http://unitsofmeasure.org"));
    assert_eq!(code.as_deref(), Some("mg"));
    assert_eq!(
        one("Observation", "value-quantity", "5||mg"),
        quantity(Prefix::Eq, 4.5, 5.5, 5.0, None, Some("mg"))
    );
    assert_eq!(
        one("Observation", "value-quantity", "le5"),
        quantity(Prefix::Le, 4.5, 5.5, 5.0, None, None)
    );
    for junk in ["5|mg", "abc||mg", "5|a|b|c"] {
        assert_eq!(
            refusal("Observation", &[("value-quantity", junk)], false),
            IssueCode::Invalid,
            "{junk}"
        );
    }
}

#[test]
fn composites_give_one_part_per_component_in_definition_order() {
    let c = one(
        "Observation",
        "code-value-quantity",
        "http://loinc.org|8480-6$gt100",
    );
    assert_eq!(
        c,
        Criterion::Composite {
            param: "code-value-quantity".into(),
            parts: vec![
                token("code", Some("http://loinc.org"), Some("8480-6")),
                Criterion::Quantity {
                    param: "value-quantity".into(),
                    range: Range {
                        prefix: Prefix::Gt,
                        low: 99.5,
                        high: 100.5,
                        value: 100.0,
                    },
                    system: None,
                    code: None,
                },
            ],
        }
    );
    // The index stores the parts of a combination in the same order.
    let observation = serde_json::json!({
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
        "valueQuantity": {"value": 120, "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}
    });
    let stored = index_values(&observation)
        .into_iter()
        .find_map(|v| match v {
            IndexValue::Composite {
                param: "code-value-quantity",
                parts,
            } => Some(parts.iter().map(|p| p.param()).collect::<Vec<_>>()),
            _ => None,
        })
        .expect("a stored combination");
    let Criterion::Composite { parts, .. } = c else {
        unreachable!()
    };
    let searched: Vec<&str> = parts
        .iter()
        .map(|p| match p {
            Criterion::Token { param, .. } | Criterion::Quantity { param, .. } => param.as_str(),
            other => panic!("unexpected part {other:?}"),
        })
        .collect();
    assert_eq!(stored, searched);
    // An escaped `$` stays in its part.
    assert!(matches!(
        one("Observation", "code-value-string", "a\\$b$x"),
        Criterion::Composite { .. }
    ));
}

#[test]
fn a_composite_with_the_wrong_number_of_parts_is_refused() {
    for junk in ["http://loinc.org|8480-6", "a$1$2", "a$"] {
        assert_eq!(
            refusal("Observation", &[("code-value-quantity", junk)], false),
            IssueCode::Invalid,
            "{junk}"
        );
    }
    assert!(parse_search(
        &types(&["Observation"]),
        &pairs(&[("code-value-quantity", "a$xx5")]),
        &cx(false)
    )
    .is_err());
}

#[test]
fn missing_works_on_any_parameter_and_takes_only_true_or_false() {
    assert_eq!(
        one("Patient", "gender:missing", "true"),
        Criterion::Missing {
            param: "gender".into(),
            kind: IndexKind::Token,
            missing: true,
        }
    );
    assert_eq!(
        one("Patient", "identifier:missing", "false"),
        Criterion::Missing {
            param: "identifier".into(),
            kind: IndexKind::Token,
            missing: false,
        }
    );
    assert_eq!(
        one("Observation", "code-value-quantity:missing", "true"),
        Criterion::Missing {
            param: "code-value-quantity".into(),
            kind: IndexKind::Composite,
            missing: true,
        }
    );
    assert!(matches!(
        one("Observation", "subject.birthdate:missing", "true"),
        Criterion::Chain { .. }
    ));
    assert_eq!(
        refusal("Patient", &[("gender:missing", "maybe")], false),
        IssueCode::Invalid
    );
    // Every resource has an id and a last update.
    assert_eq!(one("Patient", "_id:missing", "true"), Criterion::Never);
    assert_eq!(
        one("Patient", "_lastUpdated:missing", "false"),
        Criterion::Always
    );
}

// --- Result parameters -------------------------------------------------------------

#[test]
fn sort_keys_come_in_order_with_their_direction() {
    let parsed = parse("Observation", &[("_sort", "date,-_lastUpdated,code,_id")]);
    let keys: Vec<(SortBy, bool)> = parsed
        .query
        .sort
        .into_iter()
        .map(|k| (k.by, k.descending))
        .collect();
    assert_eq!(
        keys,
        vec![
            (
                SortBy::Param {
                    param: "date".into(),
                    kind: IndexKind::Date
                },
                false
            ),
            (SortBy::LastUpdated, true),
            (
                SortBy::Param {
                    param: "code".into(),
                    kind: IndexKind::Token
                },
                false
            ),
            (SortBy::Id, false),
        ]
    );
}

#[test]
fn sort_refuses_junk_composites_and_unknown_parameters() {
    for junk in [
        "name;DROP TABLE",
        "name'--",
        "nonsense",
        "code-value-quantity",
        "name:exact",
        "-",
        "name,",
    ] {
        let list = [("_sort", junk)];
        let resource_type = if junk.starts_with("code") {
            "Observation"
        } else {
            "Patient"
        };
        assert!(
            parse_search(&types(&[resource_type]), &pairs(&list), &cx(false)).is_err(),
            "{junk}"
        );
    }
    // Over several types only _id and _lastUpdated sort.
    let two = types(&["Patient", "Practitioner"]);
    assert!(parse_search(&two, &pairs(&[("_sort", "name")]), &cx(false)).is_err());
    assert!(parse_search(&two, &pairs(&[("_sort", "-_id")]), &cx(false)).is_ok());
}

#[test]
fn count_is_cut_to_the_maximum_and_junk_is_refused() {
    assert_eq!(parse("Patient", &[("_count", "5000")]).query.count, 1000);
    assert_eq!(parse("Patient", &[]).query.count, 50);
    for (name, junk) in [
        ("_count", "abc"),
        ("_count", "-1"),
        ("_offset", "x"),
        ("_total", "some"),
    ] {
        assert_eq!(
            refusal("Patient", &[(name, junk)], false),
            IssueCode::Invalid,
            "{name}={junk}"
        );
    }
}

#[test]
fn total_is_counted_unless_none_and_summary_count_asks_only_for_it() {
    assert!(parse("Patient", &[]).query.total);
    assert!(!parse("Patient", &[("_total", "none")]).query.total);
    assert!(parse("Patient", &[("_total", "accurate")]).query.total);
    let parsed = parse("Patient", &[("_summary", "count"), ("_total", "none")]);
    assert_eq!(parsed.summary, Some(Summary::Count));
    assert_eq!(parsed.query.count, 0);
    assert!(parsed.query.total);
    assert_eq!(
        parse("Patient", &[("_summary", "text")]).summary,
        Some(Summary::Text)
    );
    assert_eq!(
        refusal("Patient", &[("_summary", "all")], false),
        IssueCode::Invalid
    );
}

#[test]
fn elements_are_checked_names_and_do_not_mix_with_summary() {
    let parsed = parse(
        "Observation",
        &[("_elements", "status,value[x],valueQuantity")],
    );
    assert_eq!(
        parsed.elements,
        Some(vec![
            "status".to_string(),
            "value[x]".to_string(),
            "valueQuantity".to_string()
        ])
    );
    for junk in ["Status", "a.b", "x;y", "name,", "value[y]"] {
        assert_eq!(
            refusal("Patient", &[("_elements", junk)], false),
            IssueCode::Invalid,
            "{junk}"
        );
    }
    assert_eq!(
        refusal(
            "Patient",
            &[("_elements", "name"), ("_summary", "true")],
            false
        ),
        IssueCode::Invalid
    );
}

#[test]
fn includes_and_revincludes_are_checked_against_the_registry() {
    let parsed = parse(
        "Observation",
        &[
            ("_include", "Observation:subject:Patient"),
            ("_include", "Observation:performer"),
            ("_revinclude", "Provenance:target"),
        ],
    );
    assert_eq!(
        parsed.includes,
        vec![
            Include {
                source_type: "Observation".into(),
                param: Some("subject".into()),
                target_type: Some("Patient".into()),
                iterate: false,
            },
            Include {
                source_type: "Observation".into(),
                param: Some("performer".into()),
                target_type: None,
                iterate: false,
            },
        ]
    );
    assert_eq!(parsed.revincludes[0].source_type, "Provenance");
    assert_eq!(parsed.applied.len(), 3);
    for (name, junk) in [
        ("_include", "Observation:nope"),
        ("_include", "Observation:code"),
        ("_include", "Observation:subject:Medication"),
        ("_include", "Nonsense:subject"),
        ("_include", "Patient:organization"),
        ("_include", "Observation"),
        ("_include", "Observation:subject:Patient:x"),
        ("_include:deep", "Observation:subject"),
        ("_revinclude", "Provenance:nope"),
    ] {
        assert_eq!(
            refusal("Observation", &[(name, junk)], false),
            IssueCode::Invalid,
            "{name}={junk}"
        );
    }
}

#[test]
fn include_iterate_and_recurse_reach_types_not_searched() {
    let parsed = parse(
        "Observation",
        &[
            ("_include:iterate", "Patient:organization"),
            ("_include:recurse", "Organization:partof"),
        ],
    );
    assert!(parsed.includes.iter().all(|i| i.iterate));
    assert_eq!(parsed.includes[0].source_type, "Patient");
}

#[test]
fn wildcard_includes() {
    let parsed = parse(
        "Observation",
        &[("_include", "*"), ("_include", "Observation:*")],
    );
    assert!(parsed
        .includes
        .iter()
        .all(|i| i.source_type == "Observation" && i.param.is_none()));
    let parsed = parse("Patient", &[("_revinclude", "*")]);
    assert!(parsed
        .revincludes
        .iter()
        .any(|i| i.source_type == "Observation"));
    assert!(parse_search(&[], &pairs(&[("_include", "*")]), &cx(false)).is_err());
}

#[test]
fn contained_false_is_accepted_and_the_others_are_reported() {
    let parsed = parse("Patient", &[("_contained", "false")]);
    assert!(parsed.ignored.is_empty());
    let p = pairs(&[("_contained", "both")]);
    let parsed = parse_search(&types(&["Patient"]), &p, &cx(false)).unwrap();
    assert_eq!(parsed.ignored, vec!["_contained=both".to_string()]);
    assert!(parse_search(&types(&["Patient"]), &p, &cx(true)).is_err());
    assert_eq!(
        refusal("Patient", &[("_contained", "maybe")], false),
        IssueCode::Invalid
    );
}

// --- Conditions and scope restrictions ---------------------------------------------

#[test]
fn criteria_need_at_least_one_condition() {
    assert!(parse_criteria("Patient", "", &cx(true)).is_err());
    assert!(parse_criteria("Patient", "_count=1", &cx(true)).is_err());
    let q = parse_criteria("Patient", "identifier=a|b", &cx(true)).unwrap();
    assert_eq!(q.count, 2);
    assert_eq!(q.offset, 0);
    assert!(!q.total);
    assert_eq!(q.types, vec!["Patient".to_string()]);
    assert_eq!(q.criterion, token("identifier", Some("a"), Some("b")));
}

#[test]
fn conditions_take_only_id_and_last_updated_among_underscore_parameters() {
    assert!(parse_criteria("Patient", "_id=1&_lastUpdated=gt2020", &cx(true)).is_ok());
    assert!(parse_criteria("Patient", "_tag=x", &cx(true)).is_err());
    assert!(parse_criteria("Patient", "_sort=_id&identifier=a|b", &cx(true)).is_err());
    // Strict: an unknown parameter is refused, not ignored.
    assert!(parse_criteria("Patient", "nonsense=1", &cx(false)).is_err());
}

#[test]
fn a_scope_restriction_is_a_strict_criterion_without_result_parameters() {
    assert_eq!(
        criterion_for(
            "Observation",
            &pairs(&[("category", "laboratory")]),
            &cx(false)
        )
        .unwrap(),
        token("category", None, Some("laboratory"))
    );
    for (name, value) in [
        ("_count", "1"),
        ("_include", "Observation:subject"),
        ("nonsense", "1"),
    ] {
        assert!(
            criterion_for("Observation", &pairs(&[(name, value)]), &cx(false)).is_err(),
            "{name}"
        );
    }
}

#[test]
fn identifier_parameters_are_known_by_type() {
    assert!(has_identifier_parameter("Patient"));
    assert!(!has_identifier_parameter("OperationOutcome"));
}
