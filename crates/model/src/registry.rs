//! The R4 resource types, search parameters and compartments, generated from the
//! official definitions (see `haven-codegen`).
//!
//! Tables are compiled in with `include_str!` and parsed once, on first use.

use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

use serde::Deserialize;

use crate::structure::STRUCTURES;

const RESOURCE_TYPES_JSON: &str = include_str!("../../../profiles/generated/resource-types.json");
const SEARCH_PARAMETERS_JSON: &str =
    include_str!("../../../profiles/generated/search-parameters.json");
const COMPARTMENTS_JSON: &str = include_str!("../../../profiles/generated/compartments.json");

/// The compartments Haven knows, by their CompartmentDefinition code.
pub const COMPARTMENTS: [&str; 5] = [
    "Device",
    "Encounter",
    "Patient",
    "Practitioner",
    "RelatedPerson",
];

/// `SearchParameter.type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SearchParamType {
    Number,
    Date,
    String,
    Token,
    Reference,
    Composite,
    Quantity,
    Uri,
    Special,
}

impl SearchParamType {
    pub fn as_str(self) -> &'static str {
        match self {
            SearchParamType::Number => "number",
            SearchParamType::Date => "date",
            SearchParamType::String => "string",
            SearchParamType::Token => "token",
            SearchParamType::Reference => "reference",
            SearchParamType::Composite => "composite",
            SearchParamType::Quantity => "quantity",
            SearchParamType::Uri => "uri",
            SearchParamType::Special => "special",
        }
    }
}

/// One part of a composite search parameter.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SearchParamComponent {
    /// Canonical URL of the component's search parameter.
    pub definition: String,
    /// FHIRPath relative to the composite's expression.
    pub expression: String,
}

/// A search parameter of the base specification.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SearchParam {
    pub code: String,
    pub url: String,
    /// Resource types the parameter applies to (`Resource` for all of them).
    pub base: Vec<String>,
    #[serde(rename = "type")]
    pub kind: SearchParamType,
    /// FHIRPath over all bases, e.g. `Patient.name | Person.name`; absent for a few
    /// special parameters such as `_text`.
    pub expression: Option<String>,
    /// Allowed target types of a reference parameter.
    #[serde(default)]
    pub target: Vec<String>,
    #[serde(default)]
    pub component: Vec<SearchParamComponent>,
    #[serde(default)]
    pub modifier: Vec<String>,
    #[serde(default)]
    pub comparator: Vec<String>,
    pub multiple_or: Option<bool>,
    pub multiple_and: Option<bool>,
}

impl SearchParam {
    /// The parts of [`SearchParam::expression`] that apply to `resource_type`,
    /// joined with ` | `. Parts on `Resource` or `DomainResource` apply to all.
    pub fn expression_for(&self, resource_type: &str) -> Option<String> {
        let expression = self.expression.as_deref()?;
        let parts: Vec<&str> = union_parts(expression)
            .into_iter()
            .filter(|part| {
                let head = part.trim_start_matches('(');
                let root = head
                    .split(|c: char| !c.is_ascii_alphanumeric())
                    .next()
                    .unwrap_or("");
                root == resource_type || root == "Resource" || root == "DomainResource"
            })
            .collect();
        (!parts.is_empty()).then(|| parts.join(" | "))
    }
}

/// Splits a FHIRPath union at its top level, leaving parenthesised unions whole.
fn union_parts(expression: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut quoted = false;
    let mut start = 0;
    for (i, c) in expression.char_indices() {
        match c {
            '\'' => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted => depth = depth.saturating_sub(1),
            '|' if !quoted && depth == 0 => {
                parts.push(expression[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(expression[start..].trim());
    parts.retain(|p| !p.is_empty());
    parts
}

struct Registry {
    resource_types: Vec<String>,
    resource_set: HashSet<String>,
    params: Vec<SearchParam>,
    /// Parameter indexes by base type, then code.
    by_base: HashMap<String, HashMap<String, usize>>,
    by_url: HashMap<String, usize>,
    /// Compartment code, then resource type, then the parameters linking them.
    compartments: HashMap<String, HashMap<String, Vec<String>>>,
}

static REGISTRY: LazyLock<Registry> = LazyLock::new(|| {
    let resource_types: Vec<String> =
        serde_json::from_str(RESOURCE_TYPES_JSON).expect("generated resource-types.json is valid");
    let params: Vec<SearchParam> = serde_json::from_str(SEARCH_PARAMETERS_JSON)
        .expect("generated search-parameters.json is valid");
    let compartments =
        serde_json::from_str(COMPARTMENTS_JSON).expect("generated compartments.json is valid");
    let mut by_base: HashMap<String, HashMap<String, usize>> = HashMap::new();
    let mut by_url = HashMap::new();
    for (i, param) in params.iter().enumerate() {
        by_url.insert(param.url.clone(), i);
        for base in &param.base {
            by_base
                .entry(base.clone())
                .or_default()
                .entry(param.code.clone())
                .or_insert(i);
        }
    }
    Registry {
        resource_set: resource_types.iter().cloned().collect(),
        resource_types,
        params,
        by_base,
        by_url,
        compartments,
    }
});

/// Whether `name` is an R4 resource type.
pub fn is_resource_type(name: &str) -> bool {
    REGISTRY.resource_set.contains(name)
}

/// All R4 resource types, in alphabetical order.
pub fn resource_types() -> impl Iterator<Item = &'static str> {
    REGISTRY.resource_types.iter().map(String::as_str)
}

/// The type `resource_type` specialises, then its base, ...: `Patient` gives
/// `Patient`, `DomainResource`, `Resource`.
fn lineage(resource_type: &str) -> Vec<&'static str> {
    let mut chain = Vec::new();
    let mut current = STRUCTURES.types.get_key_value(resource_type);
    while let Some((name, def)) = current {
        chain.push(name.as_str());
        current = def
            .base
            .as_deref()
            .and_then(|b| STRUCTURES.types.get_key_value(b));
    }
    chain
}

/// The search parameter `code` of `resource_type`, including those every resource
/// inherits (`_id`, `_lastUpdated`, ...).
pub fn search_param(resource_type: &str, code: &str) -> Option<&'static SearchParam> {
    let registry = &*REGISTRY;
    lineage(resource_type).into_iter().find_map(|t| {
        let index = registry.by_base.get(t)?.get(code)?;
        Some(&registry.params[*index])
    })
}

/// All search parameters of `resource_type`, inherited ones included, by code.
pub fn search_params(resource_type: &str) -> Vec<&'static SearchParam> {
    let registry = &*REGISTRY;
    let mut found: Vec<&'static SearchParam> = Vec::new();
    for t in lineage(resource_type) {
        for index in registry.by_base.get(t).into_iter().flat_map(|m| m.values()) {
            let param = &registry.params[*index];
            if !found.iter().any(|p| p.code == param.code) {
                found.push(param);
            }
        }
    }
    found.sort_by(|a, b| a.code.cmp(&b.code));
    found
}

/// The search parameter with canonical `url`, e.g. a composite's component.
pub fn search_param_by_url(url: &str) -> Option<&'static SearchParam> {
    let registry = &*REGISTRY;
    registry.by_url.get(url).map(|i| &registry.params[*i])
}

/// Every search parameter of the specification, sorted by code then URL.
pub fn all_search_params() -> &'static [SearchParam] {
    &REGISTRY.params
}

/// The parameters that place a `resource_type` in `compartment` (e.g. `Patient`),
/// or `None` when resources of that type are never in it.
pub fn compartment_params(compartment: &str, resource_type: &str) -> Option<&'static [String]> {
    REGISTRY
        .compartments
        .get(compartment)?
        .get(resource_type)
        .map(Vec::as_slice)
}

/// The resource types that can be in `compartment`, in alphabetical order.
pub fn compartment_resource_types(compartment: &str) -> Vec<&'static str> {
    let mut types: Vec<&'static str> = REGISTRY
        .compartments
        .get(compartment)
        .into_iter()
        .flat_map(|m| m.keys().map(String::as_str))
        .collect();
    types.sort_unstable();
    types
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn r4_has_146_concrete_resource_types() {
        assert_eq!(resource_types().count(), 146);
        assert!(is_resource_type("Patient"));
        assert!(is_resource_type("Bundle"));
        assert!(!is_resource_type("DomainResource"));
        assert!(!is_resource_type("HumanName"));
        assert!(!is_resource_type("patient"));
    }

    #[test]
    fn resource_types_are_listed_alphabetically() {
        let names: Vec<_> = resource_types().collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        assert_eq!(names, sorted);
    }

    #[test]
    fn a_patient_search_parameter_carries_its_definition() {
        let p = search_param("Patient", "birthdate").expect("Patient?birthdate");
        assert_eq!(p.kind, SearchParamType::Date);
        assert_eq!(
            p.expression_for("Patient").as_deref(),
            Some("Patient.birthDate")
        );
        assert!(p.comparator.contains(&"ge".to_owned()));
        let general = search_param("Patient", "general-practitioner").expect("reference");
        assert_eq!(general.kind, SearchParamType::Reference);
        assert!(general.target.contains(&"Practitioner".to_owned()));
    }

    #[test]
    fn every_resource_inherits_the_common_search_parameters() {
        assert_eq!(search_param("Observation", "_id").unwrap().code, "_id");
        assert!(search_param("Bundle", "_lastUpdated").is_some());
        // `_text` belongs to DomainResource, which Bundle is not.
        assert!(search_param("Patient", "_text").is_some());
        assert!(search_param("Bundle", "_text").is_none());
        assert!(search_param("Patient", "no-such-param").is_none());
        assert!(search_params("Patient").iter().any(|p| p.code == "family"));
    }

    #[test]
    fn a_shared_expression_is_narrowed_to_one_resource_type() {
        let code = search_param("Condition", "code").unwrap();
        assert!(code.base.len() > 1);
        assert_eq!(
            code.expression_for("Condition").as_deref(),
            Some("Condition.code")
        );
        let value = search_param("Observation", "value-quantity").unwrap();
        assert_eq!(
            value.expression_for("Observation").as_deref(),
            Some("(Observation.value as Quantity) | (Observation.value as SampledData)")
        );
    }

    #[test]
    fn a_composite_parameter_lists_its_components() {
        let p = search_param("Observation", "code-value-quantity").unwrap();
        assert_eq!(p.kind, SearchParamType::Composite);
        assert_eq!(p.component.len(), 2);
        for component in &p.component {
            assert!(search_param_by_url(&component.definition).is_some());
        }
    }

    #[test]
    fn an_observation_is_in_the_patient_compartment_through_subject_and_performer() {
        let params = compartment_params("Patient", "Observation").unwrap();
        assert!(params.contains(&"subject".to_owned()));
        assert!(params.contains(&"performer".to_owned()));
        assert!(compartment_params("Patient", "Medication").is_none());
        assert!(compartment_params("Nowhere", "Observation").is_none());
    }

    #[test]
    fn all_five_compartments_are_known() {
        for compartment in COMPARTMENTS {
            assert!(
                !compartment_resource_types(compartment).is_empty(),
                "{compartment}"
            );
        }
        assert!(compartment_resource_types("Encounter").contains(&"Observation"));
    }
}
