//! Labeling on write: which resources are sensitive, and the security labels
//! (`meta.security`) that say so.
//!
//! A resource of a clinical type is sensitive when a coding in one of its
//! code or reason elements is in a sensitivity value set (`profiles/sensitivity/`),
//! or when it refers to a sensitive resource through a reason or condition
//! reference (its labels are inherited). Each label the labeler adds carries,
//! in an extension, the rule and the code (or the referenced resource) it came
//! from.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::PolicyError;

/// v3 ActCode: the sensitivity categories (InformationSensitivityPolicy).
pub const ACT_CODE: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";
/// v3 Confidentiality: U, L, M, N, R, V.
pub const CONFIDENTIALITY: &str = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality";
/// v3 ObservationValue: handling obligations such as `REDACTED`.
pub const OBLIGATION: &str = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue";
/// The extension on a security label naming why the server applied it.
pub const LABEL_BASIS: &str = "urn:haven:label-basis";

/// The confidentiality levels of v3, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Confidentiality {
    Unrestricted,
    Low,
    Moderate,
    Normal,
    Restricted,
    VeryRestricted,
}

impl Confidentiality {
    pub fn parse(code: &str) -> Option<Self> {
        Some(match code {
            "U" => Self::Unrestricted,
            "L" => Self::Low,
            "M" => Self::Moderate,
            "N" => Self::Normal,
            "R" => Self::Restricted,
            "V" => Self::VeryRestricted,
            _ => return None,
        })
    }

    pub fn code(self) -> &'static str {
        match self {
            Self::Unrestricted => "U",
            Self::Low => "L",
            Self::Moderate => "M",
            Self::Normal => "N",
            Self::Restricted => "R",
            Self::VeryRestricted => "V",
        }
    }

    pub fn display(self) -> &'static str {
        match self {
            Self::Unrestricted => "unrestricted",
            Self::Low => "low",
            Self::Moderate => "moderate",
            Self::Normal => "normal",
            Self::Restricted => "restricted",
            Self::VeryRestricted => "very restricted",
        }
    }
}

impl fmt::Display for Confidentiality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// One code of a sensitivity value set.
#[derive(Debug, Clone, Deserialize)]
pub struct SensitiveCode {
    pub system: String,
    pub code: String,
    pub display: String,
    /// The terminology the code comes from (SNOMED CT, ICD-10-CM, LOINC, RxNorm).
    pub source: String,
}

/// One file of `profiles/sensitivity/`: a category and the codes that put data in it.
#[derive(Debug, Clone, Deserialize)]
pub struct SensitivityRule {
    /// The file's name, which the label's basis cites.
    pub name: String,
    /// The v3 ActCode sensitivity code (ETH, PSY, HIV, ...).
    pub category: String,
    pub display: String,
    /// The confidentiality data of this category gets (R or V).
    pub confidentiality: String,
    pub description: String,
    pub codes: Vec<SensitiveCode>,
}

/// The value sets the project curates, built in.
const BUILT_IN: &[&str] = &[
    include_str!("../../../profiles/sensitivity/substance-use.json"),
    include_str!("../../../profiles/sensitivity/mental-health.json"),
    include_str!("../../../profiles/sensitivity/hiv.json"),
    include_str!("../../../profiles/sensitivity/sexually-transmitted-disease.json"),
    include_str!("../../../profiles/sensitivity/sexual-violence.json"),
    include_str!("../../../profiles/sensitivity/genetic-disease.json"),
    include_str!("../../../profiles/sensitivity/reproductive-health.json"),
];

/// The elements of each labeled type: where its own codes are, and which of
/// its references pass their target's labels on to it.
struct LabeledType {
    resource_type: &'static str,
    codes: &'static [&'static str],
    references: &'static [&'static str],
}

const LABELED_TYPES: &[LabeledType] = &[
    LabeledType {
        resource_type: "Condition",
        codes: &["code"],
        references: &[],
    },
    LabeledType {
        resource_type: "Observation",
        codes: &["code", "valueCodeableConcept"],
        references: &[],
    },
    LabeledType {
        resource_type: "Procedure",
        codes: &["code", "reasonCode"],
        references: &["reasonReference"],
    },
    LabeledType {
        resource_type: "MedicationRequest",
        codes: &["medicationCodeableConcept", "reasonCode"],
        references: &["reasonReference"],
    },
    LabeledType {
        resource_type: "MedicationStatement",
        codes: &["medicationCodeableConcept", "reasonCode"],
        references: &["reasonReference"],
    },
    LabeledType {
        resource_type: "MedicationAdministration",
        codes: &["medicationCodeableConcept", "reasonCode"],
        references: &["reasonReference", "request"],
    },
    LabeledType {
        resource_type: "DiagnosticReport",
        codes: &["code", "conclusionCode"],
        references: &[],
    },
    LabeledType {
        resource_type: "Encounter",
        codes: &["type", "reasonCode"],
        references: &["reasonReference", "diagnosis"],
    },
    LabeledType {
        resource_type: "CarePlan",
        codes: &["category", "activity"],
        references: &["addresses", "activity"],
    },
    LabeledType {
        resource_type: "CareTeam",
        codes: &["reasonCode"],
        references: &["reasonReference"],
    },
    LabeledType {
        resource_type: "Goal",
        codes: &[],
        references: &["addresses"],
    },
    LabeledType {
        resource_type: "Claim",
        codes: &["diagnosis", "procedure", "item"],
        references: &["diagnosis", "procedure", "prescription"],
    },
    LabeledType {
        resource_type: "ExplanationOfBenefit",
        codes: &["diagnosis", "procedure", "item"],
        references: &["diagnosis", "procedure", "prescription", "claim"],
    },
    LabeledType {
        resource_type: "DocumentReference",
        codes: &["type"],
        references: &["context"],
    },
];

/// References that pass the referring resource's labels to their target: a
/// Condition diagnosed, or a Procedure done, in an Encounter makes that
/// Encounter sensitive.
const LABELS_FLOW_TO: &[(&str, &str)] = &[("Condition", "encounter"), ("Procedure", "encounter")];

/// Why one label applies.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Basis {
    /// A code of the resource is in a rule's value set.
    Code {
        rule: String,
        system: String,
        code: String,
        element: String,
    },
    /// A resource it refers to (or that refers to it) carries the category.
    Inherited { from: String },
}

impl fmt::Display for Basis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Basis::Code {
                rule,
                system,
                code,
                element,
            } => write!(f, "rule {rule}: {system}|{code} in {element}"),
            Basis::Inherited { from } => write!(f, "inherited from {from}"),
        }
    }
}

/// The labels a resource must carry, with why.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Labeling {
    /// Sensitivity category (ActCode) to its bases.
    pub categories: BTreeMap<String, BTreeSet<Basis>>,
    pub confidentiality: Option<(Confidentiality, Basis)>,
}

impl Labeling {
    pub fn is_empty(&self) -> bool {
        self.categories.is_empty()
    }

    fn add(&mut self, category: &str, level: Confidentiality, basis: Basis) {
        self.categories
            .entry(category.to_owned())
            .or_default()
            .insert(basis.clone());
        if self
            .confidentiality
            .as_ref()
            .is_none_or(|(c, _)| level > *c)
        {
            self.confidentiality = Some((level, basis));
        }
    }

    /// Adds what a labeled resource passes on to those tied to it.
    pub fn inherit(&mut self, from: &str, labels: &ResourceLabels, labeler: &Labeler) {
        for category in &labels.categories {
            let level = labeler.level_of(category).max(
                labels
                    .confidentiality
                    .unwrap_or(Confidentiality::Restricted),
            );
            self.add(
                category,
                level,
                Basis::Inherited {
                    from: from.to_owned(),
                },
            );
        }
    }
}

/// The security labels a resource carries now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResourceLabels {
    /// ActCode codes (ETH, PSY, ...): every one needs clearance.
    pub categories: BTreeSet<String>,
    pub confidentiality: Option<Confidentiality>,
}

impl ResourceLabels {
    pub fn of(resource: &Value) -> Self {
        let mut labels = ResourceLabels::default();
        for coding in security(resource) {
            let (Some(system), Some(code)) = (coding["system"].as_str(), coding["code"].as_str())
            else {
                continue;
            };
            if system == ACT_CODE {
                labels.categories.insert(code.to_owned());
            } else if system == CONFIDENTIALITY {
                if let Some(level) = Confidentiality::parse(code) {
                    labels.confidentiality = labels.confidentiality.max(Some(level));
                }
            }
        }
        labels
    }
}

fn security(resource: &Value) -> impl Iterator<Item = &Value> {
    resource["meta"]["security"]
        .as_array()
        .into_iter()
        .flatten()
}

/// Decides which labels resources need.
#[derive(Debug, Clone)]
pub struct Labeler {
    rules: Vec<SensitivityRule>,
    by_code: HashMap<(String, String), Vec<usize>>,
}

impl Labeler {
    /// The value sets shipped in `profiles/sensitivity/`.
    pub fn built_in() -> Self {
        Self::from_json(BUILT_IN).expect("the built-in sensitivity value sets are valid")
    }

    /// Value sets in the `profiles/sensitivity/` format.
    pub fn from_json(files: &[&str]) -> Result<Self, PolicyError> {
        let mut rules = Vec::new();
        for text in files {
            let rule: SensitivityRule = serde_json::from_str(text)
                .map_err(|e| PolicyError::Invalid(format!("a sensitivity value set: {e}")))?;
            if Confidentiality::parse(&rule.confidentiality).is_none() {
                return Err(PolicyError::Invalid(format!(
                    "the value set {} has an unknown confidentiality {}",
                    rule.name, rule.confidentiality
                )));
            }
            rules.push(rule);
        }
        let mut by_code: HashMap<(String, String), Vec<usize>> = HashMap::new();
        for (i, rule) in rules.iter().enumerate() {
            for code in &rule.codes {
                by_code
                    .entry((code.system.clone(), code.code.clone()))
                    .or_default()
                    .push(i);
            }
        }
        Ok(Self { rules, by_code })
    }

    /// The resource types the labeler labels.
    pub fn labeled_types() -> impl Iterator<Item = &'static str> {
        LABELED_TYPES.iter().map(|t| t.resource_type)
    }

    pub fn rules(&self) -> &[SensitivityRule] {
        &self.rules
    }

    /// The confidentiality a category's data gets.
    pub fn level_of(&self, category: &str) -> Confidentiality {
        self.rules
            .iter()
            .filter(|r| r.category == category)
            .filter_map(|r| Confidentiality::parse(&r.confidentiality))
            .max()
            .unwrap_or(Confidentiality::Restricted)
    }

    /// The labels a resource's own codes call for.
    pub fn own_labels(&self, resource: &Value) -> Labeling {
        let mut labeling = Labeling::default();
        let resource_type = resource["resourceType"].as_str().unwrap_or_default();
        let Some(kind) = LABELED_TYPES
            .iter()
            .find(|t| t.resource_type == resource_type)
        else {
            return labeling;
        };
        for element in kind.codes {
            let mut codings = Vec::new();
            collect_codings(&resource[*element], &mut codings);
            for coding in codings {
                let (Some(system), Some(code)) =
                    (coding["system"].as_str(), coding["code"].as_str())
                else {
                    continue;
                };
                let key = (system.to_owned(), code.to_owned());
                for &i in self.by_code.get(&key).into_iter().flatten() {
                    let rule = &self.rules[i];
                    let level = Confidentiality::parse(&rule.confidentiality)
                        .unwrap_or(Confidentiality::Restricted);
                    labeling.add(
                        &rule.category,
                        level,
                        Basis::Code {
                            rule: rule.name.clone(),
                            system: system.to_owned(),
                            code: code.to_owned(),
                            element: format!("{resource_type}.{element}"),
                        },
                    );
                }
            }
        }
        labeling
    }

    /// The references whose targets' labels this resource inherits.
    pub fn inherited_from(&self, resource: &Value) -> Vec<String> {
        let resource_type = resource["resourceType"].as_str().unwrap_or_default();
        let mut out = Vec::new();
        if let Some(kind) = LABELED_TYPES
            .iter()
            .find(|t| t.resource_type == resource_type)
        {
            for element in kind.references {
                collect_references(&resource[*element], &mut out);
            }
        }
        out.sort();
        out.dedup();
        out
    }

    /// The top-level elements that make a resource sensitive in `categories`:
    /// those whose codes are in the categories, and the references through
    /// which labels are inherited; every code element when a category came
    /// only by inheritance.
    pub fn sensitive_elements(
        &self,
        resource: &Value,
        categories: &BTreeSet<String>,
    ) -> Vec<String> {
        let resource_type = resource["resourceType"].as_str().unwrap_or_default();
        let Some(kind) = LABELED_TYPES
            .iter()
            .find(|t| t.resource_type == resource_type)
        else {
            return Vec::new();
        };
        let own = self.own_labels(resource);
        let mut elements: BTreeSet<String> =
            kind.references.iter().map(|e| (*e).to_owned()).collect();
        for category in categories {
            match own.categories.get(category) {
                Some(bases) => {
                    for basis in bases {
                        if let Basis::Code { element, .. } = basis {
                            if let Some((_, name)) = element.split_once('.') {
                                elements.insert(name.to_owned());
                            }
                        }
                    }
                }
                None => elements.extend(kind.codes.iter().map(|e| (*e).to_owned())),
            }
        }
        elements.into_iter().collect()
    }

    /// The references to which this resource passes its labels on.
    pub fn passes_labels_to(&self, resource: &Value) -> Vec<String> {
        let resource_type = resource["resourceType"].as_str().unwrap_or_default();
        let mut out = Vec::new();
        for (t, element) in LABELS_FLOW_TO {
            if *t == resource_type {
                collect_references(&resource[*element], &mut out);
            }
        }
        out
    }
}

fn collect_codings<'a>(value: &'a Value, out: &mut Vec<&'a Value>) {
    match value {
        Value::Object(map) => {
            if map.get("code").is_some_and(Value::is_string) && map.contains_key("system") {
                out.push(value);
            }
            for v in map.values() {
                collect_codings(v, out);
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_codings(v, out)),
        _ => {}
    }
}

fn collect_references(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(r)) = map.get("reference") {
                out.push(r.clone());
            }
            for (k, v) in map {
                if k != "reference" {
                    collect_references(v, out);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_references(v, out)),
        _ => {}
    }
}

fn label_coding(system: &str, code: &str, display: &str, basis: &[String]) -> Value {
    let mut coding = json!({"system": system, "code": code, "display": display});
    if !basis.is_empty() {
        coding["extension"] = Value::Array(
            basis
                .iter()
                .map(|b| json!({"url": LABEL_BASIS, "valueString": b}))
                .collect(),
        );
    }
    coding
}

/// Adds the labels to `meta.security`. Labels already there are kept and a
/// confidentiality is only ever raised. Returns whether anything changed.
pub fn apply(resource: &mut Value, labeling: &Labeling, labeler: &Labeler) -> bool {
    if labeling.is_empty() {
        return false;
    }
    let present = ResourceLabels::of(resource);
    let Some(meta) = ensure_object(resource, "meta") else {
        return false;
    };
    let security = meta
        .entry("security")
        .or_insert_with(|| Value::Array(Vec::new()));
    if !security.is_array() {
        *security = Value::Array(Vec::new());
    }
    let Some(list) = security.as_array_mut() else {
        return false;
    };
    let mut changed = false;
    for (category, bases) in &labeling.categories {
        if present.categories.contains(category) {
            continue;
        }
        let display = labeler
            .rules
            .iter()
            .find(|r| &r.category == category)
            .map_or(category.as_str(), |r| r.display.as_str());
        let basis: Vec<String> = bases.iter().map(ToString::to_string).collect();
        list.push(label_coding(ACT_CODE, category, display, &basis));
        changed = true;
    }
    if let Some((level, basis)) = &labeling.confidentiality {
        if present.confidentiality.is_none_or(|c| c < *level) {
            list.retain(|c| c["system"] != CONFIDENTIALITY);
            list.push(label_coding(
                CONFIDENTIALITY,
                level.code(),
                level.display(),
                &[basis.to_string()],
            ));
            changed = true;
        }
    }
    changed
}

/// Keeps on a new version every label the previous version had: the server
/// never lowers labels, whoever writes.
pub fn carry_over(previous: &Value, resource: &mut Value) {
    let before: Vec<Value> = security(previous).cloned().collect();
    if before.is_empty() {
        return;
    }
    let now = ResourceLabels::of(resource);
    let Some(meta) = ensure_object(resource, "meta") else {
        return;
    };
    let security = meta
        .entry("security")
        .or_insert_with(|| Value::Array(Vec::new()));
    if !security.is_array() {
        *security = Value::Array(Vec::new());
    }
    let Some(list) = security.as_array_mut() else {
        return;
    };
    for coding in before {
        if coding["system"] == OBLIGATION {
            continue;
        }
        if coding["system"] == CONFIDENTIALITY {
            let level = coding["code"].as_str().and_then(Confidentiality::parse);
            if level > now.confidentiality {
                list.retain(|c| c["system"] != CONFIDENTIALITY);
                list.push(coding);
            }
            continue;
        }
        let same = |c: &Value| c["system"] == coding["system"] && c["code"] == coding["code"];
        if !list.iter().any(same) {
            list.push(coding);
        }
    }
}

fn ensure_object<'a>(
    resource: &'a mut Value,
    key: &str,
) -> Option<&'a mut serde_json::Map<String, Value>> {
    let map = resource.as_object_mut()?;
    let entry = map
        .entry(key.to_owned())
        .or_insert_with(|| Value::Object(Default::default()));
    if !entry.is_object() {
        *entry = Value::Object(Default::default());
    }
    entry.as_object_mut()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn condition(code: &str) -> Value {
        json!({"resourceType": "Condition", "id": "c1",
               "code": {"coding": [{"system": "http://snomed.info/sct", "code": code}]}})
    }

    #[test]
    fn an_opioid_abuse_condition_is_labeled_substance_use_and_restricted() {
        let labeler = Labeler::built_in();
        let mut resource = condition("5602001");
        let labeling = labeler.own_labels(&resource);
        assert!(apply(&mut resource, &labeling, &labeler));
        let labels = ResourceLabels::of(&resource);
        assert_eq!(labels.categories, BTreeSet::from(["ETH".to_owned()]));
        assert_eq!(labels.confidentiality, Some(Confidentiality::Restricted));
        let eth = &resource["meta"]["security"][0];
        assert_eq!(eth["extension"][0]["url"], LABEL_BASIS);
        assert_eq!(
            eth["extension"][0]["valueString"],
            "rule substance-use: http://snomed.info/sct|5602001 in Condition.code"
        );
    }

    #[test]
    fn an_ordinary_condition_gets_no_label() {
        let labeler = Labeler::built_in();
        let mut resource = condition("15777000");
        let labeling = labeler.own_labels(&resource);
        assert!(!apply(&mut resource, &labeling, &labeler));
        assert!(resource.get("meta").is_none());
    }

    #[test]
    fn a_client_label_is_kept_and_confidentiality_never_lowered() {
        let labeler = Labeler::built_in();
        let mut resource = condition("370143000");
        resource["meta"] = json!({"security": [
            {"system": CONFIDENTIALITY, "code": "V"},
            {"system": ACT_CODE, "code": "HIV"}]});
        let labeling = labeler.own_labels(&resource);
        apply(&mut resource, &labeling, &labeler);
        let labels = ResourceLabels::of(&resource);
        assert_eq!(
            labels.confidentiality,
            Some(Confidentiality::VeryRestricted)
        );
        assert!(labels.categories.contains("HIV") && labels.categories.contains("PSY"));
    }

    #[test]
    fn an_update_keeps_the_previous_versions_labels() {
        let labeler = Labeler::built_in();
        let mut old = condition("5602001");
        let labeling = labeler.own_labels(&old);
        apply(&mut old, &labeling, &labeler);
        let mut new = condition("15777000");
        carry_over(&old, &mut new);
        assert_eq!(ResourceLabels::of(&new), ResourceLabels::of(&old));
    }

    #[test]
    fn reasons_and_encounters_pass_labels_on() {
        let labeler = Labeler::built_in();
        let request = json!({"resourceType": "MedicationRequest",
            "reasonReference": [{"reference": "Condition/c1"}]});
        assert_eq!(labeler.inherited_from(&request), vec!["Condition/c1"]);
        let mut c = condition("5602001");
        c["encounter"] = json!({"reference": "Encounter/e1"});
        assert_eq!(labeler.passes_labels_to(&c), vec!["Encounter/e1"]);
    }

    #[test]
    fn every_built_in_code_names_its_source() {
        let labeler = Labeler::built_in();
        assert!(labeler.rules().len() >= 6);
        for rule in labeler.rules() {
            assert!(!rule.codes.is_empty(), "{}", rule.name);
            for code in &rule.codes {
                assert!(
                    ["SNOMED CT", "ICD-10-CM", "LOINC", "RxNorm"].contains(&code.source.as_str()),
                    "{} {}",
                    rule.name,
                    code.code
                );
            }
        }
    }
}
