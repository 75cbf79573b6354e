//! Clearances: the highest confidentiality and the sensitivity categories a
//! user, role or client may see, and the verdict on one resource's labels.

use std::collections::BTreeSet;
use std::fmt;

use serde_json::{json, Value};

use crate::label::{
    Confidentiality, Labeler, ResourceLabels, ACT_CODE, CONFIDENTIALITY, LABEL_BASIS, OBLIGATION,
};
use crate::PolicyError;

/// What one requester may see. Written `N`, `R:ETH,PSY` or `V:*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Clearance {
    pub confidentiality: Confidentiality,
    /// The sensitivity categories (ActCode) it may see.
    pub categories: BTreeSet<String>,
    /// `*`: every category, known or not.
    pub every_category: bool,
}

impl Default for Clearance {
    /// Normal data, no sensitive category.
    fn default() -> Self {
        Self {
            confidentiality: Confidentiality::Normal,
            categories: BTreeSet::new(),
            every_category: false,
        }
    }
}

impl Clearance {
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        let text = text.trim();
        let (level, categories) = text.split_once(':').unwrap_or((text, ""));
        let confidentiality = Confidentiality::parse(level.trim()).ok_or_else(|| {
            PolicyError::Invalid(format!(
                "a clearance starts with a confidentiality (U, L, M, N, R or V), not {level:?}"
            ))
        })?;
        let mut clearance = Clearance {
            confidentiality,
            ..Clearance::default()
        };
        for category in categories
            .split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty())
        {
            if category == "*" {
                clearance.every_category = true;
            } else if category
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            {
                clearance.categories.insert(category.to_owned());
            } else {
                return Err(PolicyError::Invalid(format!(
                    "{category:?} is not a sensitivity category code"
                )));
            }
        }
        Ok(clearance)
    }

    /// Everything: for break-the-glass access.
    pub fn unlimited() -> Self {
        Self {
            confidentiality: Confidentiality::VeryRestricted,
            categories: BTreeSet::new(),
            every_category: true,
        }
    }

    /// What both this clearance and `cap` allow.
    pub fn within(&self, cap: &Clearance) -> Clearance {
        let categories = match (self.every_category, cap.every_category) {
            (true, true) => BTreeSet::new(),
            (true, false) => cap.categories.clone(),
            (false, true) => self.categories.clone(),
            (false, false) => self
                .categories
                .intersection(&cap.categories)
                .cloned()
                .collect(),
        };
        Clearance {
            confidentiality: self.confidentiality.min(cap.confidentiality),
            categories,
            every_category: self.every_category && cap.every_category,
        }
    }

    pub fn covers(&self, category: &str) -> bool {
        self.every_category || self.categories.contains(category)
    }
}

impl fmt::Display for Clearance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.confidentiality)?;
        let mut parts: Vec<&str> = self.categories.iter().map(String::as_str).collect();
        if self.every_category {
            parts = vec!["*"];
        }
        if !parts.is_empty() {
            write!(f, ":{}", parts.join(","))?;
        }
        Ok(())
    }
}

/// The site's rules for labels: which categories are masked (sensitive
/// elements removed) rather than denied to those without clearance.
#[derive(Debug, Clone, Default)]
pub struct LabelRules {
    pub masked: BTreeSet<String>,
    /// The confidentiality each masked category gives its data.
    levels: std::collections::BTreeMap<String, Confidentiality>,
}

impl LabelRules {
    pub fn new(masked: BTreeSet<String>, labeler: &Labeler) -> Self {
        let levels = masked
            .iter()
            .map(|c| (c.clone(), labeler.level_of(c)))
            .collect();
        Self { masked, levels }
    }

    /// The confidentiality a masked category gives its data.
    pub fn level_of(&self, category: &str) -> Confidentiality {
        self.levels
            .get(category)
            .copied()
            .unwrap_or(Confidentiality::Restricted)
    }
}

/// What a requester's clearance makes of one resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelVerdict {
    Permit,
    /// Returned without its sensitive elements.
    Mask(BTreeSet<String>),
    /// Refused; the labels that refused it.
    Deny(BTreeSet<String>),
}

pub fn judge(clearance: &Clearance, labels: &ResourceLabels, rules: &LabelRules) -> LabelVerdict {
    let uncleared: BTreeSet<String> = labels
        .categories
        .iter()
        .filter(|c| !clearance.covers(c))
        .cloned()
        .collect();
    let (masked, denied): (BTreeSet<String>, BTreeSet<String>) = uncleared
        .into_iter()
        .partition(|c| rules.masked.contains(c));
    if !denied.is_empty() {
        return LabelVerdict::Deny(denied);
    }
    if let Some(level) = labels.confidentiality {
        if level > clearance.confidentiality {
            // Masking stands in for clearance only up to what a masked
            // category of this resource demands.
            let masked_enough = masked.iter().any(|m| level <= rules.level_of(m));
            if !masked_enough {
                return LabelVerdict::Deny(BTreeSet::from([format!("confidentiality {level}")]));
            }
        }
    }
    if masked.is_empty() {
        LabelVerdict::Permit
    } else {
        LabelVerdict::Mask(masked)
    }
}

/// `data-absent-reason` `masked` (R4 extension-data-absent-reason).
const DATA_ABSENT_REASON: &str = "http://hl7.org/fhir/StructureDefinition/data-absent-reason";

fn masked_value(original: &Value) -> Value {
    let element = json!({"extension": [{"url": DATA_ABSENT_REASON, "valueCode": "masked"}]});
    if original.is_array() {
        Value::Array(vec![element])
    } else {
        element
    }
}

/// The copy a requester without clearance for `categories` may see: every
/// element that made the resource sensitive replaced by a `masked` marker,
/// the narrative dropped, the hidden categories and the labels' reasons
/// removed, and the `REDACTED` obligation added. The stored copy is unchanged.
pub fn redact(resource: &Value, categories: &BTreeSet<String>, labeler: &Labeler) -> Value {
    let mut copy = resource.clone();
    for element in labeler.sensitive_elements(resource, categories) {
        if let Some(value) = copy.get_mut(&element) {
            *value = masked_value(value);
        }
    }
    if let Some(map) = copy.as_object_mut() {
        map.remove("text");
    }
    let security = copy["meta"]["security"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut kept: Vec<Value> = security
        .into_iter()
        .filter(|c| {
            !(c["system"] == ACT_CODE && c["code"].as_str().is_some_and(|s| categories.contains(s)))
                && c["system"] != OBLIGATION
        })
        .map(|mut c| {
            if let Some(map) = c.as_object_mut() {
                if let Some(Value::Array(ext)) = map.get_mut("extension") {
                    ext.retain(|e| e["url"] != LABEL_BASIS);
                    if ext.is_empty() {
                        map.remove("extension");
                    }
                }
            }
            c
        })
        .collect();
    kept.retain(|c| c["system"] != CONFIDENTIALITY || c.get("code").is_some());
    kept.push(json!({"system": OBLIGATION, "code": "REDACTED", "display": "redacted"}));
    copy["meta"]["security"] = Value::Array(kept);
    copy
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(categories: &[&str], level: Option<&str>) -> ResourceLabels {
        ResourceLabels {
            categories: categories.iter().map(|c| (*c).to_owned()).collect(),
            confidentiality: level.and_then(Confidentiality::parse),
        }
    }

    #[test]
    fn clearances_are_written_and_read_back() {
        for text in ["N", "R:ETH,PSY", "V:*"] {
            assert_eq!(Clearance::parse(text).unwrap().to_string(), text);
        }
        assert!(Clearance::parse("X").is_err());
        assert!(Clearance::parse("R:ETH;drop").is_err());
    }

    #[test]
    fn a_client_clearance_caps_its_users_clearance() {
        let user = Clearance::parse("R:ETH,PSY").unwrap();
        let client = Clearance::parse("V:ETH,HIV").unwrap();
        assert_eq!(user.within(&client).to_string(), "R:ETH");
        assert_eq!(
            Clearance::unlimited().within(&client).to_string(),
            "V:ETH,HIV"
        );
        assert_eq!(user.within(&Clearance::unlimited()), user);
    }

    #[test]
    fn labels_above_a_clearance_are_denied_and_within_it_permitted() {
        let rules = LabelRules::default();
        let normal = Clearance::default();
        assert_eq!(
            judge(&normal, &labels(&[], None), &rules),
            LabelVerdict::Permit
        );
        assert!(matches!(
            judge(&normal, &labels(&["ETH"], Some("R")), &rules),
            LabelVerdict::Deny(_)
        ));
        let cleared = Clearance::parse("R:ETH").unwrap();
        assert_eq!(
            judge(&cleared, &labels(&["ETH"], Some("R")), &rules),
            LabelVerdict::Permit
        );
        assert!(matches!(
            judge(&cleared, &labels(&["ETH", "PSY"], Some("R")), &rules),
            LabelVerdict::Deny(_)
        ));
        assert!(matches!(
            judge(&cleared, &labels(&[], Some("V")), &rules),
            LabelVerdict::Deny(_)
        ));
    }

    #[test]
    fn a_masked_category_is_masked_instead_of_denied() {
        let labeler = Labeler::built_in();
        let rules = LabelRules::new(BTreeSet::from(["PSY".to_owned()]), &labeler);
        let normal = Clearance::default();
        assert_eq!(
            judge(&normal, &labels(&["PSY"], Some("R")), &rules),
            LabelVerdict::Mask(BTreeSet::from(["PSY".to_owned()]))
        );
        assert!(matches!(
            judge(&normal, &labels(&["PSY", "ETH"], Some("R")), &rules),
            LabelVerdict::Deny(_)
        ));
    }

    #[test]
    fn a_redacted_copy_hides_the_sensitive_elements_only() {
        let labeler = Labeler::built_in();
        let mut condition = json!({"resourceType": "Condition", "id": "c1",
            "text": {"status": "generated", "div": "<div>Major depression</div>"},
            "subject": {"reference": "Patient/p1"},
            "onsetDateTime": "2020-01-01",
            "code": {"coding": [{"system": "http://snomed.info/sct", "code": "370143000"}]}});
        let labeling = labeler.own_labels(&condition);
        crate::label::apply(&mut condition, &labeling, &labeler);
        let copy = redact(&condition, &BTreeSet::from(["PSY".to_owned()]), &labeler);
        assert_eq!(copy["code"]["extension"][0]["valueCode"], "masked");
        assert!(copy.get("text").is_none());
        assert_eq!(copy["subject"], condition["subject"]);
        assert_eq!(copy["onsetDateTime"], condition["onsetDateTime"]);
        let text = copy.to_string();
        assert!(
            !text.contains("370143000") && !text.contains("\"PSY\""),
            "{text}"
        );
        assert!(text.contains("REDACTED"));
    }
}
