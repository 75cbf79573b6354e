//! Structural validation of resources against the R4 StructureDefinitions.
//!
//! The validator walks the JSON once, resolving each property against the element
//! tables in [`crate::structure`]. It checks what the R4 JSON format and the base
//! definitions say, no profiles or invariants: element names and types, choice
//! types, cardinality, required elements, primitive formats (the regexes of the
//! specification), primitive extensions (`_name`), contained resources and
//! extensions. The FHIRPath location of the element is built in a single reused
//! buffer and only copied out when an issue is raised, so valid resources cost no
//! allocations beyond the walk itself.

use serde_json::{Map, Value};

use crate::outcome::{Issue, IssueCode};
use crate::structure::{Child, Kind, Structures, TypeDef, STRUCTURES};

/// Checks a resource's structure. An empty result means valid; each issue carries
/// a FHIRPath expression to the element at fault.
pub fn validate_resource(resource: &Value) -> Vec<Issue> {
    let mut walk = Walk {
        tables: &STRUCTURES,
        path: String::new(),
        issues: Vec::new(),
    };
    walk.resource(resource);
    walk.issues
}

struct Walk {
    tables: &'static Structures,
    /// FHIRPath of the value being checked.
    path: String,
    issues: Vec<Issue>,
}

impl Walk {
    fn report(&mut self, code: IssueCode, message: impl Into<String>) {
        let issue = Issue::error(code, message).at(self.path.clone());
        self.issues.push(issue);
    }

    fn warn(&mut self, code: IssueCode, message: impl Into<String>) {
        let issue = Issue::warning(code, message).at(self.path.clone());
        self.issues.push(issue);
    }

    /// Runs `check` with `segment` appended to the path.
    fn within(&mut self, segment: &str, index: Option<usize>, check: impl FnOnce(&mut Self)) {
        let mark = self.path.len();
        if !self.path.is_empty() {
            self.path.push('.');
        }
        self.path.push_str(segment);
        if let Some(i) = index {
            self.path.push('[');
            self.path.push_str(&i.to_string());
            self.path.push(']');
        }
        check(self);
        self.path.truncate(mark);
    }

    /// A resource, at the top level or nested (`contained`, `Bundle.entry.resource`).
    fn resource(&mut self, value: &Value) {
        let Some(object) = value.as_object() else {
            self.report(IssueCode::Structure, "A resource must be a JSON object");
            return;
        };
        let top = self.path.is_empty();
        let resource_type = match object.get("resourceType") {
            Some(Value::String(name)) => name.as_str(),
            Some(_) => {
                self.at_type_marker(top, "resourceType must be a string");
                return;
            }
            None => {
                self.at_type_marker(top, "resourceType is missing");
                return;
            }
        };
        let def = match self.tables.types.get(resource_type) {
            Some(def) if def.kind == Kind::Resource && !def.is_abstract => def,
            _ => {
                let message = format!("Unknown resourceType '{resource_type}'");
                self.at_type_marker(top, message);
                return;
            }
        };
        if top {
            self.path.push_str(resource_type);
            self.element(object, def, resource_type, true);
            self.path.clear();
        } else {
            self.element(object, def, resource_type, true);
        }
    }

    fn at_type_marker(&mut self, top: bool, message: impl Into<String>) {
        if top {
            self.within("resourceType", None, |w| {
                w.report(IssueCode::Invalid, message)
            });
        } else {
            self.report(IssueCode::Invalid, message);
        }
    }

    /// The properties of one object whose children are defined under `parent` in `def`.
    fn element(
        &mut self,
        object: &Map<String, Value>,
        def: &'static TypeDef,
        parent: &str,
        is_resource: bool,
    ) {
        let Some(children) = def.children.get(parent) else {
            self.report(IssueCode::Structure, format!("{parent} has no definition"));
            return;
        };
        if object.is_empty() {
            self.report(IssueCode::Structure, "Objects must not be empty");
            return;
        }
        // Choice elements seen so far, to allow at most one type per element.
        let mut choices: Vec<&str> = Vec::new();
        for (name, value) in object {
            if is_resource && name == "resourceType" {
                continue;
            }
            if let Some(base) = name.strip_prefix('_') {
                match children.by_name.get(base) {
                    Some(child) if self.is_primitive(&child.type_code) => {
                        let main = object.get(base);
                        self.within(base, None, |w| w.primitive_extension(child, value, main));
                    }
                    _ => self.within(name, None, |w| {
                        w.report(IssueCode::Structure, format!("Unknown element '{name}'"))
                    }),
                }
                continue;
            }
            let Some(child) = children.by_name.get(name.as_str()) else {
                self.within(name, None, |w| {
                    w.report(IssueCode::Structure, format!("Unknown element '{name}'"))
                });
                continue;
            };
            if child.is_choice {
                if choices.contains(&child.element.as_str()) {
                    self.within(name, None, |w| {
                        let message = format!("Only one type is allowed for {}[x]", child.element);
                        w.report(IssueCode::Structure, message)
                    });
                } else {
                    choices.push(&child.element);
                }
            }
            let extensions = object.get(&format!("_{name}"));
            self.property(name, child, value, def, extensions);
        }
        for required in &children.required {
            let present = required.names.iter().any(|n| {
                object.contains_key(n.as_str()) || object.contains_key(format!("_{n}").as_str())
            });
            if !present {
                let element = &required.element;
                let shown = if required.names.len() > 1 {
                    format!("{element}[x]")
                } else {
                    element.clone()
                };
                // The official JSON schema never requires a primitive element (its
                // value may be absent with only `_name` extensions), and official
                // examples omit some; so a missing primitive is a warning, a missing
                // complex element an error.
                // `Extension.url` is an XML attribute in R4: it has no `_url` form
                // and must always be present.
                let attribute = parent == "Extension" && element == "url";
                let primitive = !attribute
                    && required.names.iter().all(|n| {
                        children
                            .by_name
                            .get(n)
                            .is_some_and(|c| self.is_primitive(&c.type_code))
                    });
                let message = format!("Missing required element '{shown}'");
                self.within(&shown, None, |w| {
                    if primitive {
                        w.warn(IssueCode::Required, message)
                    } else {
                        w.report(IssueCode::Required, message)
                    }
                });
            }
        }
    }

    fn property(
        &mut self,
        name: &str,
        child: &'static Child,
        value: &Value,
        def: &'static TypeDef,
        extensions: Option<&Value>,
    ) {
        if !child.many {
            if value.is_array() {
                self.within(name, None, |w| {
                    w.report(
                        IssueCode::Structure,
                        "Expected a single value, not an array",
                    )
                });
                return;
            }
            self.within(name, None, |w| w.value(child, value, def));
            return;
        }
        let Some(items) = value.as_array() else {
            self.within(name, None, |w| {
                w.report(IssueCode::Structure, "Expected an array")
            });
            return;
        };
        if items.is_empty() {
            self.within(name, None, |w| {
                w.report(IssueCode::Structure, "Arrays must not be empty")
            });
            return;
        }
        if let Some(max) = child.max {
            if items.len() > max {
                self.within(name, None, |w| {
                    w.report(
                        IssueCode::Structure,
                        format!("At most {max} values allowed"),
                    )
                });
            }
        }
        let primitive = self.is_primitive(&child.type_code);
        for (i, item) in items.iter().enumerate() {
            if item.is_null() && primitive {
                // A null holds the place of a value that only has extensions.
                let filled = extensions
                    .and_then(|e| e.get(i))
                    .is_some_and(|e| !e.is_null());
                if !filled {
                    self.within(name, Some(i), |w| {
                        w.report(IssueCode::Structure, "null without a matching extension")
                    });
                }
                continue;
            }
            self.within(name, Some(i), |w| w.value(child, item, def));
        }
    }

    /// One value of an element, never an array.
    fn value(&mut self, child: &'static Child, value: &Value, def: &'static TypeDef) {
        let code = child.type_code.as_str();
        if value.is_null() {
            self.report(IssueCode::Structure, "null is not allowed here");
            return;
        }
        if self.is_primitive(code) {
            self.primitive(code, value);
            return;
        }
        if code == "Resource" {
            self.resource(value);
            return;
        }
        let Some(object) = value.as_object() else {
            self.report(
                IssueCode::Structure,
                format!("Expected an object of type {code}"),
            );
            return;
        };
        // Inline elements (BackboneElement, Element) have their children in the same
        // definition; named data types have a definition of their own.
        if def.children.contains_key(&child.children_path) {
            self.element(object, def, &child.children_path, false);
        } else if let Some(type_def) = self.tables.types.get(code) {
            self.element(object, type_def, code, false);
        } else {
            self.report(IssueCode::Structure, format!("Unknown type {code}"));
        }
    }

    fn is_primitive(&self, code: &str) -> bool {
        self.tables
            .types
            .get(code)
            .is_some_and(|t| t.kind == Kind::Primitive)
    }

    /// The `_name` sibling of a primitive: an object (or array of them, aligned with
    /// the values) holding only `id` and `extension`.
    fn primitive_extension(&mut self, child: &'static Child, value: &Value, main: Option<&Value>) {
        let element = self
            .tables
            .types
            .get("Element")
            .expect("Element is defined");
        if !child.many {
            match value.as_object() {
                Some(object) => self.element(object, element, "Element", false),
                None => self.report(IssueCode::Structure, "Expected an object"),
            }
            return;
        }
        let Some(items) = value.as_array() else {
            self.report(IssueCode::Structure, "Expected an array");
            return;
        };
        if let Some(main) = main.and_then(Value::as_array) {
            if main.len() != items.len() {
                self.report(
                    IssueCode::Structure,
                    "Primitive extensions must align with the values",
                );
            }
        }
        let mark = self.path.len();
        for (i, item) in items.iter().enumerate() {
            self.path.push_str(&format!("[{i}]"));
            match item {
                Value::Null => {
                    let has_value = main.and_then(|m| m.get(i)).is_some_and(|m| !m.is_null());
                    if !has_value {
                        self.report(IssueCode::Structure, "Neither a value nor an extension");
                    }
                }
                Value::Object(object) => self.element(object, element, "Element", false),
                _ => self.report(IssueCode::Structure, "Expected an object"),
            }
            self.path.truncate(mark);
        }
    }

    fn primitive(&mut self, code: &str, value: &Value) {
        match code {
            "boolean" => {
                if !value.is_boolean() {
                    self.report(IssueCode::Value, "Expected a JSON boolean");
                }
            }
            "decimal" => {
                if !value.is_number() {
                    self.report(IssueCode::Value, "Expected a JSON number");
                }
            }
            "integer" | "positiveInt" | "unsignedInt" => {
                let low = match code {
                    "positiveInt" => 1,
                    "unsignedInt" => 0,
                    _ => i64::from(i32::MIN),
                };
                let ok = value
                    .as_i64()
                    .is_some_and(|n| n >= low && n <= i64::from(i32::MAX));
                if !ok {
                    let message = format!("Expected a JSON number valid as {code}");
                    self.report(IssueCode::Value, message);
                }
            }
            _ => {
                let Some(text) = value.as_str() else {
                    self.report(IssueCode::Value, format!("Expected a JSON string ({code})"));
                    return;
                };
                if text.is_empty() {
                    self.report(IssueCode::Value, "Strings must not be empty");
                    return;
                }
                if let Some(format) = self.tables.formats.get(code) {
                    if !format.is_match(text) {
                        let message = format!("'{}' is not a valid {code}", shortened(text));
                        self.report(IssueCode::Value, message);
                    }
                }
            }
        }
    }
}

/// Keeps diagnostics readable when a long value is quoted.
fn shortened(text: &str) -> String {
    match text.char_indices().nth(60) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// The issues of `resource` as `(code, expression)` pairs.
    fn found(resource: Value) -> Vec<(&'static str, String)> {
        validate_resource(&resource)
            .into_iter()
            .map(|issue| {
                assert_eq!(issue.severity, crate::outcome::Severity::Error);
                (issue.code.as_str(), issue.expression.join(","))
            })
            .collect()
    }

    fn single(resource: Value) -> (&'static str, String) {
        let issues = found(resource);
        assert_eq!(issues.len(), 1, "{issues:?}");
        issues.into_iter().next().unwrap()
    }

    fn observation(extra: Value) -> Value {
        let mut resource = json!({
            "resourceType": "Observation",
            "status": "final",
            "code": {"text": "weight"},
        });
        for (key, value) in extra.as_object().unwrap() {
            resource[key] = value.clone();
        }
        resource
    }

    #[test]
    fn a_complete_patient_is_valid() {
        let patient = json!({
            "resourceType": "Patient",
            "id": "example-1.2",
            "meta": {"lastUpdated": "2024-01-02T03:04:05.678+01:00", "profile": ["http://example.org/p"]},
            "active": true,
            "name": [{"use": "official", "family": "Chalmers", "given": ["Peter", "James"]}],
            "gender": "male",
            "birthDate": "1974-12",
            "deceasedBoolean": false,
            "multipleBirthInteger": 2,
            "contact": [{"name": {"text": "Bénédicte"}, "telecom": [{"system": "phone", "value": "+33 6"}]}],
            "extension": [{"url": "http://example.org/ext", "valueCodeableConcept": {"text": "x"}}],
        });
        assert_eq!(found(patient), vec![]);
    }

    #[test]
    fn a_resource_without_resource_type_is_rejected() {
        assert_eq!(
            single(json!({"id": "x"})),
            ("invalid", "resourceType".into())
        );
    }

    #[test]
    fn an_unknown_or_abstract_resource_type_is_rejected() {
        assert_eq!(
            single(json!({"resourceType": "Patientt"})).1,
            "resourceType"
        );
        assert_eq!(
            single(json!({"resourceType": "DomainResource"})).1,
            "resourceType"
        );
        assert_eq!(
            single(json!({"resourceType": "HumanName"})).1,
            "resourceType"
        );
    }

    #[test]
    fn a_resource_that_is_not_an_object_is_rejected() {
        assert_eq!(single(json!(["Patient"])).0, "structure");
    }

    #[test]
    fn a_patient_with_an_unknown_element_is_rejected() {
        let issue = single(json!({"resourceType": "Patient", "nickname": "Bob"}));
        assert_eq!(issue, ("structure", "Patient.nickname".into()));
    }

    #[test]
    fn an_unknown_element_inside_a_data_type_is_located_by_index() {
        let patient =
            json!({"resourceType": "Patient", "name": [{"family": "A"}, {"surname": "B"}]});
        assert_eq!(single(patient).1, "Patient.name[1].surname");
    }

    #[test]
    fn backbone_elements_and_content_references_are_followed() {
        let questionnaire = json!({
            "resourceType": "Questionnaire",
            "status": "draft",
            "item": [{"linkId": "1", "type": "group", "item": [{"linkId": "1.1", "type": "string", "colour": "red"}]}],
        });
        assert_eq!(
            single(questionnaire).1,
            "Questionnaire.item[0].item[0].colour"
        );
    }

    #[test]
    fn a_choice_element_accepts_only_its_listed_types() {
        assert_eq!(
            found(observation(json!({"valueQuantity": {"value": 72.5}}))),
            vec![]
        );
        let issue = single(observation(json!({"valueAge": {"value": 3}})));
        assert_eq!(issue, ("structure", "Observation.valueAge".into()));
    }

    #[test]
    fn a_choice_element_takes_at_most_one_type() {
        let issues = found(observation(
            json!({"valueString": "a", "valueBoolean": true}),
        ));
        assert_eq!(
            issues,
            vec![("structure", "Observation.valueBoolean".into())]
        );
    }

    #[test]
    fn an_error_inside_a_choice_value_is_located_through_the_typed_name() {
        let issue = single(observation(json!({"valueQuantity": {"value": "72"}})));
        assert_eq!(issue, ("value", "Observation.valueQuantity.value".into()));
    }

    #[test]
    fn a_repeating_element_must_be_an_array() {
        let issue = single(json!({"resourceType": "Patient", "name": {"family": "A"}}));
        assert_eq!(issue, ("structure", "Patient.name".into()));
    }

    #[test]
    fn a_single_element_must_not_be_an_array() {
        let issue = single(json!({"resourceType": "Patient", "gender": ["male"]}));
        assert_eq!(issue, ("structure", "Patient.gender".into()));
    }

    #[test]
    fn a_missing_required_element_is_reported() {
        let issues = found(json!({"resourceType": "Observation", "status": "final"}));
        assert_eq!(issues, vec![("required", "Observation.code".into())]);
    }

    #[test]
    fn a_missing_required_primitive_is_a_warning_and_a_missing_data_type_an_error() {
        let issues = validate_resource(&json!({"resourceType": "Observation", "status": "final"}));
        assert!(issues.iter().all(|i| i.is_error()), "{issues:?}");
        assert_eq!(issues[0].expression, ["Observation.code"]);
        let issues =
            validate_resource(&json!({"resourceType": "Observation", "code": {"text": "x"}}));
        assert!(issues.iter().all(|i| !i.is_error()), "{issues:?}");
        assert_eq!(issues[0].expression, ["Observation.status"]);
    }

    #[test]
    fn a_required_choice_element_is_satisfied_by_any_of_its_types() {
        let issues = found(json!({"resourceType": "Extension"}));
        assert_eq!(issues, vec![("invalid", "resourceType".into())]);
        let patient = json!({"resourceType": "Patient", "link": [{"type": "seealso"}]});
        assert_eq!(
            single(patient),
            ("required", "Patient.link[0].other".into())
        );
    }

    #[test]
    fn a_required_primitive_may_carry_only_extensions() {
        let observation = json!({
            "resourceType": "Observation",
            "_status": {"extension": [{"url": "http://example.org/absent", "valueCode": "unknown"}]},
            "code": {"text": "x"},
        });
        assert_eq!(found(observation), vec![]);
    }

    #[test]
    fn primitive_extensions_are_checked_as_elements() {
        let patient =
            json!({"resourceType": "Patient", "birthDate": "1970", "_birthDate": {"foo": 1}});
        assert_eq!(
            single(patient),
            ("structure", "Patient.birthDate.foo".into())
        );
        let patient = json!({"resourceType": "Patient", "_nickname": {"id": "a"}});
        assert_eq!(single(patient).1, "Patient._nickname");
        let patient = json!({"resourceType": "Patient", "_name": {"id": "a"}});
        assert_eq!(single(patient).1, "Patient._name");
    }

    #[test]
    fn repeating_primitive_extensions_align_with_nulls() {
        let patient = json!({
            "resourceType": "Patient",
            "name": [{
                "given": ["Peter", null],
                "_given": [null, {"extension": [{"url": "http://example.org/x", "valueString": "y"}]}],
            }],
        });
        assert_eq!(found(patient), vec![]);
        let patient = json!({"resourceType": "Patient", "name": [{"given": ["Peter", null]}]});
        assert_eq!(
            single(patient),
            ("structure", "Patient.name[0].given[1]".into())
        );
        let patient =
            json!({"resourceType": "Patient", "name": [{"given": ["A", "B"], "_given": [null]}]});
        assert_eq!(
            single(patient),
            ("structure", "Patient.name[0].given".into())
        );
    }

    #[test]
    fn null_is_rejected_outside_primitive_arrays() {
        let issue = single(json!({"resourceType": "Patient", "gender": null}));
        assert_eq!(issue, ("structure", "Patient.gender".into()));
        let issue = single(json!({"resourceType": "Patient", "name": [null]}));
        assert_eq!(issue, ("structure", "Patient.name[0]".into()));
    }

    #[test]
    fn empty_objects_arrays_and_strings_are_rejected() {
        assert_eq!(
            single(json!({"resourceType": "Patient", "maritalStatus": {}})).1,
            "Patient.maritalStatus"
        );
        assert_eq!(
            single(json!({"resourceType": "Patient", "name": []})).1,
            "Patient.name"
        );
        let issue = single(json!({"resourceType": "Patient", "name": [{"given": ["A", ""]}]}));
        assert_eq!(issue, ("value", "Patient.name[0].given[1]".into()));
        assert_eq!(
            single(json!({"resourceType": "Patient", "implicitRules": ""})).0,
            "value"
        );
    }

    #[test]
    fn objects_and_primitives_are_not_interchangeable() {
        assert_eq!(
            single(json!({"resourceType": "Patient", "maritalStatus": "S"})).0,
            "structure"
        );
        assert_eq!(
            single(json!({"resourceType": "Patient", "gender": {"v": 1}})).0,
            "value"
        );
    }

    #[test]
    fn resource_ids_follow_the_id_format() {
        let long = "a".repeat(65);
        for bad in [json!("has space"), json!(long), json!("a_b"), json!(7)] {
            let issue = single(json!({"resourceType": "Patient", "id": bad}));
            assert_eq!(issue, ("value", "Patient.id".into()));
        }
        assert_eq!(
            found(json!({"resourceType": "Patient", "id": "A-1.b"})),
            vec![]
        );
    }

    #[test]
    fn element_ids_are_plain_strings() {
        assert_eq!(
            found(json!({"resourceType": "Patient", "name": [{"id": "n 1", "text": "A"}]})),
            vec![]
        );
    }

    #[test]
    fn dates_follow_the_r4_format() {
        for good in ["2024", "2024-02", "2024-02-29"] {
            assert_eq!(
                found(json!({"resourceType": "Patient", "birthDate": good})),
                vec![],
                "{good}"
            );
        }
        for bad in [
            "24",
            "2024-13",
            "2024-02-30x",
            "0000",
            "2024-1-01",
            "2024-02-29T10:00:00Z",
        ] {
            let issue = single(json!({"resourceType": "Patient", "birthDate": bad}));
            assert_eq!(issue, ("value", "Patient.birthDate".into()), "{bad}");
        }
    }

    #[test]
    fn date_times_need_seconds_and_a_zone_when_they_have_a_time() {
        for good in [
            "2024",
            "2024-05-06",
            "2024-05-06T07:08:09Z",
            "2024-05-06T07:08:09.123-05:00",
        ] {
            assert_eq!(
                found(observation(json!({"effectiveDateTime": good}))),
                vec![],
                "{good}"
            );
        }
        for bad in [
            "2024-05-06T07:08",
            "2024-05-06T07:08:09",
            "2024-05-06 07:08:09Z",
        ] {
            let issue = single(observation(json!({"effectiveDateTime": bad})));
            assert_eq!(issue.1, "Observation.effectiveDateTime", "{bad}");
        }
    }

    #[test]
    fn instants_are_complete_to_the_second_with_a_zone() {
        assert_eq!(
            found(observation(
                json!({"issued": "2024-05-06T07:08:09.5+14:00"})
            )),
            vec![]
        );
        for bad in ["2024-05-06", "2024-05-06T07:08:09", "2024-05-06T07:08Z"] {
            let issue = single(observation(json!({"issued": bad})));
            assert_eq!(issue, ("value", "Observation.issued".into()), "{bad}");
        }
    }

    #[test]
    fn times_follow_the_r4_format() {
        assert_eq!(
            found(observation(json!({"valueTime": "23:59:60.5"}))),
            vec![]
        );
        assert_eq!(
            single(observation(json!({"valueTime": "24:00:00"}))).1,
            "Observation.valueTime"
        );
        assert_eq!(
            single(observation(json!({"valueTime": "10:00"}))).1,
            "Observation.valueTime"
        );
    }

    #[test]
    fn decimals_are_json_numbers() {
        assert_eq!(
            found(observation(json!({"valueQuantity": {"value": -1.5e3}}))),
            vec![]
        );
        assert_eq!(
            single(observation(json!({"valueQuantity": {"value": "1.5"}}))).0,
            "value"
        );
    }

    #[test]
    fn integers_are_whole_json_numbers_within_32_bits() {
        assert_eq!(
            found(observation(json!({"valueInteger": -2147483648_i64}))),
            vec![]
        );
        for bad in [json!(2147483648_i64), json!(1.5), json!("1")] {
            let issue = single(observation(json!({"valueInteger": bad})));
            assert_eq!(issue, ("value", "Observation.valueInteger".into()));
        }
    }

    #[test]
    fn positive_and_unsigned_integers_respect_their_bounds() {
        let sampled = |dimensions: Value| {
            observation(
                json!({"valueSampledData": {"origin": {"value": 0}, "period": 1, "dimensions": dimensions}}),
            )
        };
        assert_eq!(found(sampled(json!(1))), vec![]);
        assert_eq!(
            single(sampled(json!(0))).1,
            "Observation.valueSampledData.dimensions"
        );
        let photo = |size: Value| json!({"resourceType": "Patient", "photo": [{"size": size}]});
        assert_eq!(found(photo(json!(0))), vec![]);
        assert_eq!(single(photo(json!(-1))).1, "Patient.photo[0].size");
    }

    #[test]
    fn booleans_are_json_booleans() {
        let issue = single(json!({"resourceType": "Patient", "active": "true"}));
        assert_eq!(issue, ("value", "Patient.active".into()));
    }

    #[test]
    fn strings_are_json_strings() {
        let issue = single(json!({"resourceType": "Patient", "name": [{"family": 42}]}));
        assert_eq!(issue, ("value", "Patient.name[0].family".into()));
    }

    #[test]
    fn uris_urls_and_canonicals_contain_no_whitespace() {
        assert_eq!(
            single(json!({"resourceType": "Patient", "implicitRules": "a b"})).1,
            "Patient.implicitRules"
        );
        let meta = json!({"resourceType": "Patient", "meta": {"profile": ["http://x/ y"]}});
        assert_eq!(single(meta).1, "Patient.meta.profile[0]");
        let photo = json!({"resourceType": "Patient", "photo": [{"url": "http://x/ y"}]});
        assert_eq!(single(photo).1, "Patient.photo[0].url");
    }

    #[test]
    fn codes_have_no_leading_trailing_or_double_spaces() {
        for bad in [" male", "male ", "a  b"] {
            assert_eq!(
                single(json!({"resourceType": "Patient", "gender": bad})).0,
                "value"
            );
        }
        assert_eq!(
            found(json!({"resourceType": "Patient", "language": "en US"})),
            vec![]
        );
    }

    #[test]
    fn oids_uuids_base64_and_markdown_follow_their_formats() {
        let identifier =
            |system: &str| json!({"resourceType": "Patient", "identifier": [{"system": system}]});
        assert_eq!(found(identifier("urn:oid:1.2.3")), vec![]);
        let ok = json!({"resourceType": "Patient", "photo": [{"data": "aGVsbG8="}]});
        assert_eq!(found(ok), vec![]);
        let bad = json!({"resourceType": "Patient", "photo": [{"data": "not base64!"}]});
        assert_eq!(single(bad), ("value", "Patient.photo[0].data".into()));
        let oid = json!({"resourceType": "NamingSystem", "name": "n", "status": "draft", "kind": "root", "date": "2020",
            "uniqueId": [{"type": "oid", "value": "x"}]});
        assert_eq!(found(oid), vec![]);
        let note = json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "note": [{"text": "**bold**"}]});
        assert_eq!(found(note), vec![]);
        let uuid = json!({"resourceType": "Patient", "extension": [{"url": "http://x", "valueUuid": "urn:uuid:ABC"}]});
        assert_eq!(single(uuid).1, "Patient.extension[0].valueUuid");
        let oid = json!({"resourceType": "Patient", "extension": [{"url": "http://x", "valueOid": "1.2.3"}]});
        assert_eq!(single(oid).1, "Patient.extension[0].valueOid");
    }

    #[test]
    fn contained_resources_are_validated_as_resources() {
        let patient = json!({
            "resourceType": "Patient",
            "contained": [{"resourceType": "Practitioner", "id": "p1"}, {"resourceType": "Patient", "birthDate": "soon"}],
        });
        assert_eq!(
            single(patient),
            ("value", "Patient.contained[1].birthDate".into())
        );
        let patient = json!({"resourceType": "Patient", "contained": [{"id": "p1"}]});
        assert_eq!(single(patient), ("invalid", "Patient.contained[0]".into()));
    }

    #[test]
    fn bundle_entries_are_validated_as_resources() {
        let bundle = json!({
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [{"resource": {"resourceType": "Patient", "id": "bad id"}, "request": {"method": "POST", "url": "Patient"}}],
        });
        assert_eq!(
            single(bundle),
            ("value", "Bundle.entry[0].resource.id".into())
        );
    }

    #[test]
    fn extensions_need_a_url_and_at_most_one_value() {
        let patient = json!({"resourceType": "Patient", "extension": [{"valueString": "x"}]});
        assert_eq!(
            single(patient),
            ("required", "Patient.extension[0].url".into())
        );
        let patient = json!({"resourceType": "Patient", "modifierExtension": [{"url": "http://x", "valueString": "x", "valueCode": "y"}]});
        assert_eq!(
            single(patient),
            ("structure", "Patient.modifierExtension[0].valueCode".into())
        );
        let nested = json!({"resourceType": "Patient", "extension": [{"url": "http://x", "extension": [{"url": "a", "valueFoo": 1}]}]});
        assert_eq!(
            single(nested),
            (
                "structure",
                "Patient.extension[0].extension[0].valueFoo".into()
            )
        );
    }
}
