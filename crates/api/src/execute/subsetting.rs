//! `_summary` and `_elements` (search.html#summary, search.html#elements): the subset
//! of a resource a client asked for, computed from the R4 element tables.
//!
//! Pure functions over JSON. `resourceType`, `id` and `meta` are always kept. Whenever
//! anything is removed the result carries the `SUBSETTED` tag in `meta.tag`, as R4 says
//! servers SHOULD, so a client never mistakes a subset for the whole resource.
//!
//! `_summary=true` keeps the elements the base definition marks `isSummary`. Inside them:
//! - elements the resource defines itself (backbone elements such as
//!   `Observation.component`) are trimmed to their `isSummary` children;
//! - data types keep all their properties except the few the definitions leave out of
//!   summaries (`Attachment.data`, `SampledData.data`, `Signature.data`, ...), as
//!   ElementDefinition.isSummary describes; their `id` and `extension` stay;
//! - extensions, `meta` and nested resources are kept whole.

use std::collections::HashSet;

use haven_model::structure::{Child, Children, Kind, TypeDef, STRUCTURES};
use serde_json::{json, Map, Value};

use crate::search_params::Summary;

/// The code system of the `SUBSETTED` tag.
pub(crate) const SUBSETTED_SYSTEM: &str =
    "http://terminology.hl7.org/CodeSystem/v3-ObservationValue";
pub(crate) const SUBSETTED_CODE: &str = "SUBSETTED";

/// Kept in every subset, whatever was asked.
const ALWAYS_KEPT: [&str; 3] = ["resourceType", "id", "meta"];

/// The resource as `_summary=<mode>` returns it. `Count` is answered by the caller
/// (no resources at all) and `False` asks for everything: both return it unchanged.
pub(crate) fn summarize(resource: &Value, mode: Summary) -> Value {
    let Some(object) = resource.as_object() else {
        return resource.clone();
    };
    let mut subset = Subset::default();
    let kept = match mode {
        Summary::False | Summary::Count => return resource.clone(),
        Summary::Data => subset.filter(object, |_, name| name != "text"),
        Summary::Text => {
            let Some(children) = resource_children(object) else {
                return resource.clone();
            };
            let mandatory = mandatory_names(children);
            subset.filter(object, |_, name| name == "text" || mandatory.contains(name))
        }
        Summary::True => {
            let Some(def) = resource_def(object) else {
                return resource.clone();
            };
            let Some(children) = def.children.get(resource_type(object)) else {
                return resource.clone();
            };
            subset.summary_object(object, def, children, Level::Resource)
        }
    };
    subset.finish(kept)
}

/// The resource as `_elements=<elements>` returns it: `resourceType`, `id`, `meta`,
/// the listed top-level elements and the mandatory ones (R4: servers SHOULD return
/// them). A choice element's name (`value`) keeps whichever type is present
/// (`valueQuantity`); `Patient.name` is read as `name`, and a deeper path such as
/// `name.family` keeps its whole top-level element.
pub(crate) fn select_elements(resource: &Value, elements: &[String]) -> Value {
    let Some(object) = resource.as_object() else {
        return resource.clone();
    };
    let type_prefix = format!("{}.", resource_type(object));
    let wanted: HashSet<&str> = elements
        .iter()
        .map(|e| {
            let e = e.trim();
            let e = e.strip_prefix(type_prefix.as_str()).unwrap_or(e);
            let top = e.split('.').next().unwrap_or(e);
            top.strip_suffix("[x]").unwrap_or(top)
        })
        .filter(|e| !e.is_empty())
        .collect();
    let children = resource_children(object);
    let mandatory = children.map(mandatory_names).unwrap_or_default();
    let mut subset = Subset::default();
    let kept = subset.filter(object, |child, name| {
        wanted.contains(name)
            || mandatory.contains(name)
            || child.is_some_and(|c| c.is_choice && wanted.contains(c.element.as_str()))
    });
    subset.finish(kept)
}

/// Where an object sits, which decides what `_summary=true` keeps of it besides its
/// `isSummary` properties.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Level {
    /// The resource itself: `resourceType`, `id` and `meta` too.
    Resource,
    /// An element the resource defines inline (`Observation.component`): nothing more.
    Backbone,
    /// A data type, or an element inside one: `id` and `extension` too.
    DataType,
}

/// One subsetting: whether anything was removed yet.
#[derive(Default)]
struct Subset {
    removed: bool,
}

impl Subset {
    /// The top-level properties `keep` accepts, plus the ones always kept. `keep` is
    /// given the property's element (when the tables know it) and its name without
    /// the `_` of a primitive's extension sibling.
    fn filter(
        &mut self,
        object: &Map<String, Value>,
        keep: impl Fn(Option<&Child>, &str) -> bool,
    ) -> Map<String, Value> {
        let children = resource_children(object);
        let mut kept = Map::new();
        for (key, value) in object {
            let name = key.strip_prefix('_').unwrap_or(key);
            let child = children.and_then(|c| c.by_name.get(name));
            if ALWAYS_KEPT.contains(&name) || keep(child, name) {
                kept.insert(key.clone(), value.clone());
            } else {
                self.removed = true;
            }
        }
        kept
    }

    /// The `isSummary` properties of an object whose children are `children` in `def`,
    /// and what its `level` always keeps.
    fn summary_object(
        &mut self,
        object: &Map<String, Value>,
        def: &'static TypeDef,
        children: &'static Children,
        level: Level,
    ) -> Map<String, Value> {
        let mut kept = Map::new();
        for (key, value) in object {
            let name = key.strip_prefix('_').unwrap_or(key);
            let child = children.by_name.get(name);
            let always = match level {
                Level::Resource => ALWAYS_KEPT.contains(&name),
                Level::Backbone => false,
                Level::DataType => name == "id" || name == "extension",
            };
            if always {
                kept.insert(key.clone(), value.clone());
                continue;
            }
            match child {
                Some(child) if child.summary => {
                    // `_name` holds a primitive's id and extensions: kept whole.
                    let value = if key.starts_with('_') {
                        value.clone()
                    } else {
                        self.summary_value(child, value, def, level)
                    };
                    kept.insert(key.clone(), value);
                }
                _ => self.removed = true,
            }
        }
        kept
    }

    /// A kept element's value, its own children trimmed where the tables say.
    fn summary_value(
        &mut self,
        child: &'static Child,
        value: &Value,
        def: &'static TypeDef,
        level: Level,
    ) -> Value {
        match value {
            Value::Array(items) => Value::Array(
                items
                    .iter()
                    .map(|item| self.summary_value(child, item, def, level))
                    .collect(),
            ),
            Value::Object(object) => {
                let code = child.type_code.as_str();
                // Extensions and nested resources are kept whole.
                if code == "Extension" || code == "Resource" {
                    return value.clone();
                }
                // Inline elements have their children in the same definition; named
                // data types have a definition of their own.
                if let Some(children) = def.children.get(&child.children_path) {
                    let level = match level {
                        Level::DataType => Level::DataType,
                        _ => Level::Backbone,
                    };
                    return Value::Object(self.summary_object(object, def, children, level));
                }
                match STRUCTURES.types.get(code) {
                    Some(type_def) if type_def.kind == Kind::Complex => {
                        match type_def.children.get(code) {
                            Some(children) => Value::Object(self.summary_object(
                                object,
                                type_def,
                                children,
                                Level::DataType,
                            )),
                            None => value.clone(),
                        }
                    }
                    _ => value.clone(),
                }
            }
            _ => value.clone(),
        }
    }

    /// The subset as a resource, tagged `SUBSETTED` when anything was removed.
    fn finish(self, mut kept: Map<String, Value>) -> Value {
        if self.removed {
            tag_subsetted(&mut kept);
        }
        Value::Object(kept)
    }
}

/// Adds the `SUBSETTED` tag to `meta.tag`, unless it is there already.
fn tag_subsetted(resource: &mut Map<String, Value>) {
    let meta = resource
        .entry("meta")
        .or_insert_with(|| Value::Object(Map::new()));
    let Some(meta) = meta.as_object_mut() else {
        return;
    };
    let tags = meta
        .entry("tag")
        .or_insert_with(|| Value::Array(Vec::new()));
    let Some(tags) = tags.as_array_mut() else {
        return;
    };
    let present = tags
        .iter()
        .any(|t| t["system"] == SUBSETTED_SYSTEM && t["code"] == SUBSETTED_CODE);
    if !present {
        tags.push(json!({
            "system": SUBSETTED_SYSTEM,
            "code": SUBSETTED_CODE,
            "display": "subsetted",
        }));
    }
}

fn resource_type(object: &Map<String, Value>) -> &str {
    object
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// The definition of a resource's type, when it names a known resource type.
fn resource_def(object: &Map<String, Value>) -> Option<&'static TypeDef> {
    STRUCTURES
        .types
        .get(resource_type(object))
        .filter(|def| def.kind == Kind::Resource)
}

/// The top-level elements of a resource's type.
fn resource_children(object: &Map<String, Value>) -> Option<&'static Children> {
    resource_def(object)?.children.get(resource_type(object))
}

/// The JSON names of the mandatory (`min >= 1`) elements among `children`.
fn mandatory_names(children: &'static Children) -> HashSet<&'static str> {
    children
        .required
        .iter()
        .flat_map(|r| r.names.iter().map(String::as_str))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patient() -> Value {
        json!({
            "resourceType": "Patient",
            "id": "p1",
            "meta": {"versionId": "3", "lastUpdated": "2024-05-01T10:00:00Z"},
            "text": {"status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">Ann Lee</div>"},
            "extension": [{"url": "http://example.org/eye-colour", "valueString": "green"}],
            "identifier": [{"system": "urn:oid:1.2.36.146.595.217.0.1", "value": "12345"}],
            "active": true,
            "name": [{"use": "official", "family": "Lee", "given": ["Ann"]}],
            "gender": "female",
            "birthDate": "1974-12-25",
            "_birthDate": {"extension": [{
                "url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime",
                "valueDateTime": "1974-12-25T14:35:45-05:00"
            }]},
            "maritalStatus": {"text": "Married"},
            "photo": [{"contentType": "image/png", "data": "iVBORw0KGgo="}],
            "contact": [{
                "relationship": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0131", "code": "N"}]}],
                "name": {"family": "Lee", "given": ["Bo"]},
                "telecom": [{"system": "phone", "value": "+33 (237) 998327"}]
            }],
            "communication": [{
                "language": {"coding": [{"system": "urn:ietf:bcp:47", "code": "fr"}]},
                "preferred": true
            }],
            "link": [{
                "extension": [{"url": "http://example.org/link-note", "valueString": "merged"}],
                "other": {"reference": "Patient/p0"},
                "type": "replaces"
            }]
        })
    }

    fn observation() -> Value {
        json!({
            "resourceType": "Observation",
            "id": "bp",
            "meta": {"tag": [{"system": "http://example.org/tags", "code": "reviewed"}]},
            "text": {"status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">BP</div>"},
            "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9"}]},
            "subject": {"reference": "Patient/p1"},
            "effectiveDateTime": "2024-05-01T09:30:00Z",
            "valueQuantity": {"value": 120, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"},
            "interpretation": [{"text": "high"}],
            "note": [{"text": "Taken after exercise"}],
            "component": [{
                "extension": [{"url": "http://example.org/cuff", "valueString": "large"}],
                "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
                "valueQuantity": {"value": 120, "unit": "mmHg"},
                "interpretation": [{"text": "high"}]
            }]
        })
    }

    fn keys(value: &Value) -> Vec<&str> {
        value
            .as_object()
            .expect("an object")
            .keys()
            .map(String::as_str)
            .collect()
    }

    fn subsetted_tags(value: &Value) -> usize {
        value["meta"]["tag"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| {
                *t == &json!({"system": SUBSETTED_SYSTEM, "code": "SUBSETTED", "display": "subsetted"})
            })
            .count()
    }

    fn strings(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_tables_mark_patient_name_summary_and_contact_not() {
        let patient = &STRUCTURES.types["Patient"].children["Patient"];
        for name in [
            "identifier",
            "active",
            "name",
            "birthDate",
            "deceasedBoolean",
            "link",
        ] {
            assert!(patient.by_name[name].summary, "{name}");
        }
        for name in ["text", "contact", "communication", "photo", "extension"] {
            assert!(!patient.by_name[name].summary, "{name}");
        }
    }

    #[test]
    fn summary_true_keeps_the_summary_elements_of_a_patient_and_drops_the_rest() {
        let summary = summarize(&patient(), Summary::True);
        assert_eq!(
            keys(&summary),
            [
                "resourceType",
                "id",
                "meta",
                "identifier",
                "active",
                "name",
                "gender",
                "birthDate",
                "_birthDate",
                "link"
            ]
        );
        assert_eq!(summary["name"], patient()["name"]);
        assert_eq!(summary["identifier"], patient()["identifier"]);
        assert_eq!(summary["_birthDate"], patient()["_birthDate"]);
        assert_eq!(subsetted_tags(&summary), 1);
        assert_eq!(summary["meta"]["versionId"], "3");
    }

    #[test]
    fn summary_true_trims_backbone_elements_to_their_summary_children() {
        let summary = summarize(&patient(), Summary::True);
        // Patient.link.extension is not isSummary; other and type are.
        assert_eq!(
            summary["link"],
            json!([{"other": {"reference": "Patient/p0"}, "type": "replaces"}])
        );
        let observation = summarize(&observation(), Summary::True);
        assert_eq!(
            observation["component"],
            json!([{
                "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
                "valueQuantity": {"value": 120, "unit": "mmHg"}
            }])
        );
        assert_eq!(observation["valueQuantity"], observation_value());
        for dropped in ["text", "category", "interpretation", "note"] {
            assert!(observation.get(dropped).is_none(), "{dropped}");
        }
    }

    fn observation_value() -> Value {
        observation()["valueQuantity"].clone()
    }

    #[test]
    fn summary_true_keeps_data_types_whole_except_their_bulk_data() {
        let document = json!({
            "resourceType": "DocumentReference",
            "status": "current",
            "content": [{"attachment": {
                "contentType": "text/plain",
                "data": "SGVsbG8=",
                "url": "Binary/b1",
                "extension": [{"url": "http://example.org/x", "valueString": "y"}]
            }}]
        });
        let summary = summarize(&document, Summary::True);
        assert_eq!(
            summary["content"],
            json!([{"attachment": {
                "contentType": "text/plain",
                "url": "Binary/b1",
                "extension": [{"url": "http://example.org/x", "valueString": "y"}]
            }}])
        );
    }

    #[test]
    fn summary_text_keeps_the_narrative_and_the_mandatory_elements_only() {
        let text = summarize(&observation(), Summary::Text);
        assert_eq!(
            keys(&text),
            ["resourceType", "id", "meta", "text", "status", "code"]
        );
        assert_eq!(subsetted_tags(&text), 1);
        // The tag joins the tags already there.
        assert_eq!(text["meta"]["tag"][0]["code"], "reviewed");

        let text = summarize(&patient(), Summary::Text);
        assert_eq!(keys(&text), ["resourceType", "id", "meta", "text"]);
    }

    #[test]
    fn summary_data_drops_only_the_text() {
        let data = summarize(&patient(), Summary::Data);
        let mut expected = patient();
        expected.as_object_mut().unwrap().remove("text");
        let mut without_tag = data.clone();
        without_tag["meta"].as_object_mut().unwrap().remove("tag");
        assert_eq!(without_tag, expected);
        assert_eq!(subsetted_tags(&data), 1);
    }

    #[test]
    fn summary_data_of_a_resource_without_text_removes_nothing_and_adds_no_tag() {
        let mut patient = patient();
        patient.as_object_mut().unwrap().remove("text");
        assert_eq!(summarize(&patient, Summary::Data), patient);
    }

    #[test]
    fn summary_false_and_count_return_the_resource_unchanged() {
        assert_eq!(summarize(&patient(), Summary::False), patient());
        assert_eq!(summarize(&patient(), Summary::Count), patient());
    }

    #[test]
    fn elements_keep_the_listed_elements_with_id_meta_and_resource_type() {
        let selected = select_elements(&patient(), &strings(&["name", "birthDate"]));
        assert_eq!(
            keys(&selected),
            [
                "resourceType",
                "id",
                "meta",
                "name",
                "birthDate",
                "_birthDate"
            ]
        );
        assert_eq!(selected["name"], patient()["name"]);
        assert_eq!(subsetted_tags(&selected), 1);
    }

    #[test]
    fn elements_of_a_choice_keep_its_present_type_and_the_mandatory_elements() {
        let selected = select_elements(&observation(), &strings(&["value"]));
        assert_eq!(
            keys(&selected),
            [
                "resourceType",
                "id",
                "meta",
                "status",
                "code",
                "valueQuantity"
            ]
        );
        assert_eq!(selected["valueQuantity"], observation_value());
        assert_eq!(subsetted_tags(&selected), 1);
    }

    #[test]
    fn elements_accept_type_prefixed_and_choice_suffixed_names() {
        let selected = select_elements(
            &observation(),
            &strings(&[" Observation.subject", "value[x]", "note.text"]),
        );
        assert_eq!(
            keys(&selected),
            [
                "resourceType",
                "id",
                "meta",
                "status",
                "code",
                "subject",
                "valueQuantity",
                "note"
            ]
        );
    }

    #[test]
    fn elements_that_remove_nothing_add_no_tag() {
        let small = json!({"resourceType": "Patient", "id": "p2", "name": [{"family": "Lee"}]});
        assert_eq!(select_elements(&small, &strings(&["name"])), small);
    }

    #[test]
    fn the_subsetted_tag_is_not_added_twice() {
        let once = select_elements(&patient(), &strings(&["name"]));
        let twice = summarize(&once, Summary::Data);
        let again = select_elements(&once, &strings(&["id"]));
        assert_eq!(subsetted_tags(&twice), 1);
        assert_eq!(subsetted_tags(&again), 1);
    }

    #[test]
    fn a_resource_without_meta_gets_one_for_the_tag() {
        let bare =
            json!({"resourceType": "Patient", "gender": "male", "contact": [{"gender": "female"}]});
        let summary = summarize(&bare, Summary::True);
        assert_eq!(
            summary,
            json!({
                "resourceType": "Patient",
                "gender": "male",
                "meta": {"tag": [{"system": SUBSETTED_SYSTEM, "code": "SUBSETTED", "display": "subsetted"}]}
            })
        );
    }
}
