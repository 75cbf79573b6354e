//! The consent evaluator: a patient's active privacy Consents (R4 Consent,
//! scope `patient-privacy`) judged for one requester.
//!
//! A provision applies when all of its criteria hold: `period`, `actor`,
//! `action` and `purpose` concern the request and are settled as soon as the
//! requester is known; `securityLabel`, `class`, `code` and `data` concern the
//! resource and stay as a [`Pred`], so that the same decision can be taken on
//! one resource (a read) or compiled into a search. Nested provisions are
//! exceptions to their parent: where one applies, its type wins; where
//! exceptions disagree, deny wins. Where several Consents of a patient apply,
//! deny wins too.

use std::collections::{BTreeMap, BTreeSet};

use haven_model::search_index::{date_range, index_values, IndexValue};
use serde_json::Value;
use time::OffsetDateTime;

use crate::label::ACT_CODE;
use crate::PolicyError;

/// The Consent scope this evaluator enforces.
pub const PRIVACY_SCOPE: &str = "patient-privacy";
/// The identifier system that names a client application as a Consent actor
/// (its OAuth `client_id`, RFC 6749 §2.2).
pub const CLIENT_ID_SYSTEM: &str = "urn:haven:client-id";
/// The class system whose codes are resource types.
const RESOURCE_TYPES: &str = "http://hl7.org/fhir/resource-types";

/// Where no Consent of a patient says otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SiteDefault {
    /// Data is shared unless a Consent denies it.
    #[default]
    OptOut,
    /// Data is shared only where a Consent permits it.
    OptIn,
}

impl SiteDefault {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "opt-out" => Some(Self::OptOut),
            "opt-in" => Some(Self::OptIn),
            _ => None,
        }
    }
}

/// A condition on a resource, settled once the resource is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pred {
    True,
    False,
    /// The resource is of one of these types.
    Types(BTreeSet<String>),
    /// It carries this security label.
    Label {
        system: String,
        code: String,
    },
    /// Its `code` search parameter has this coding.
    Code {
        system: String,
        code: String,
    },
    /// It is this resource (`Type/id`).
    Instance(String),
    /// It is this resource or refers to it.
    Related(String),
    And(Vec<Pred>),
    Or(Vec<Pred>),
    Not(Box<Pred>),
}

impl Pred {
    pub fn and(items: Vec<Pred>) -> Pred {
        let mut out = Vec::new();
        for item in items {
            match item {
                Pred::True => {}
                Pred::False => return Pred::False,
                Pred::And(inner) => out.extend(inner),
                other => out.push(other),
            }
        }
        match out.len() {
            0 => Pred::True,
            1 => out.pop().unwrap_or(Pred::True),
            _ => Pred::And(out),
        }
    }

    pub fn or(items: Vec<Pred>) -> Pred {
        let mut out = Vec::new();
        for item in items {
            match item {
                Pred::False => {}
                Pred::True => return Pred::True,
                Pred::Or(inner) => out.extend(inner),
                other => out.push(other),
            }
        }
        match out.len() {
            0 => Pred::False,
            1 => out.pop().unwrap_or(Pred::False),
            _ => Pred::Or(out),
        }
    }

    #[allow(clippy::should_implement_trait)]
    pub fn not(self) -> Pred {
        match self {
            Pred::True => Pred::False,
            Pred::False => Pred::True,
            Pred::Not(inner) => *inner,
            other => Pred::Not(Box::new(other)),
        }
    }

    pub fn holds(&self, facts: &Facts) -> bool {
        match self {
            Pred::True => true,
            Pred::False => false,
            Pred::Types(types) => types.contains(&facts.resource_type),
            Pred::Label { system, code } => facts.labels.contains(&(system.clone(), code.clone())),
            Pred::Code { system, code } => facts.codes.contains(&(system.clone(), code.clone())),
            Pred::Instance(reference) => facts.reference() == *reference,
            Pred::Related(reference) => {
                facts.reference() == *reference || facts.refers_to.contains(reference)
            }
            Pred::And(items) => items.iter().all(|p| p.holds(facts)),
            Pred::Or(items) => items.iter().any(|p| p.holds(facts)),
            Pred::Not(inner) => !inner.holds(facts),
        }
    }
}

/// What the predicates look at in one resource, taken from its search index
/// values so that a read and a search judge it alike.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    pub resource_type: String,
    pub id: String,
    /// `_security` tokens.
    pub labels: BTreeSet<(String, String)>,
    /// `code` tokens.
    pub codes: BTreeSet<(String, String)>,
    /// Relative references (`Type/id`) of every reference parameter.
    pub refers_to: BTreeSet<String>,
}

impl Facts {
    pub fn of(resource: &Value) -> Self {
        let mut facts = Facts {
            resource_type: resource["resourceType"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            id: resource["id"].as_str().unwrap_or_default().to_owned(),
            ..Facts::default()
        };
        for value in index_values(resource) {
            match value {
                IndexValue::Token {
                    param,
                    system,
                    code: Some(code),
                    ..
                } if param == "_security" || param == "code" => {
                    let set = if param == "code" {
                        &mut facts.codes
                    } else {
                        &mut facts.labels
                    };
                    // A code without a system is kept as system "", which
                    // a search reads as "no system".
                    set.insert((system.unwrap_or_default(), code));
                }
                IndexValue::Reference {
                    target_type: Some(t),
                    target_id: Some(id),
                    url: None,
                    ..
                } => {
                    facts.refers_to.insert(format!("{t}/{id}"));
                }
                _ => {}
            }
        }
        facts
    }

    fn reference(&self) -> String {
        format!("{}/{}", self.resource_type, self.id)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Permit,
    Deny,
}

/// One provision, parsed.
#[derive(Debug, Clone)]
struct Provision {
    kind: Kind,
    period: Option<(Option<String>, Option<String>)>,
    actors: Vec<Actor>,
    actions: Vec<String>,
    purposes: Vec<String>,
    labels: Vec<(String, String)>,
    classes: Vec<(String, String)>,
    codes: Vec<(String, String)>,
    data: Vec<(String, String)>,
    children: Vec<Provision>,
}

#[derive(Debug, Clone)]
struct Actor {
    reference: Option<String>,
    client_id: Option<String>,
    roles: Vec<String>,
}

/// Who asks, and why: what the request-level criteria are judged against.
#[derive(Debug, Clone)]
pub struct Requester {
    /// References that name the requester: its `fhirUser`, its organization.
    pub references: Vec<String>,
    pub client_id: String,
    /// Role codes of the requester (v3 RoleCode or ParticipationType codes).
    pub roles: Vec<String>,
    /// The token's purpose of use (v3 PurposeOfUse code).
    pub purpose: String,
    /// The consent action: `access` to read or search, `correct` to write.
    pub action: String,
    pub at: OffsetDateTime,
}

/// One active privacy Consent.
#[derive(Debug, Clone)]
pub struct ConsentRule {
    /// `Consent/id`.
    pub reference: String,
    /// The patient id it speaks for.
    pub patient: String,
    root: Provision,
}

fn codings(value: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut push = |c: &Value| {
        if let Some(code) = c["code"].as_str() {
            out.push((
                c["system"].as_str().unwrap_or_default().to_owned(),
                code.to_owned(),
            ));
        }
    };
    match value {
        Value::Array(items) => {
            for item in items {
                if item.get("coding").is_some() {
                    item["coding"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .for_each(&mut push);
                } else {
                    push(item);
                }
            }
        }
        Value::Object(_) => {
            if value.get("coding").is_some() {
                value["coding"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .for_each(&mut push);
            } else {
                push(value);
            }
        }
        _ => {}
    }
    out
}

fn invalid(reference: &str, what: &str) -> PolicyError {
    PolicyError::Invalid(format!("{reference}: {what}"))
}

impl Provision {
    fn parse(value: &Value, inherited: Kind, reference: &str) -> Result<Self, PolicyError> {
        let kind = match value["type"].as_str() {
            None => inherited,
            Some("permit") => Kind::Permit,
            Some("deny") => Kind::Deny,
            Some(other) => return Err(invalid(reference, &format!("provision type {other:?}"))),
        };
        let period = value.get("period").map(|p| {
            (
                p["start"].as_str().map(str::to_owned),
                p["end"].as_str().map(str::to_owned),
            )
        });
        if let Some((start, end)) = &period {
            for date in [start, end].into_iter().flatten() {
                if date_range(date).is_none() {
                    return Err(invalid(reference, &format!("period date {date:?}")));
                }
            }
        }
        let actors = value["actor"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| {
                let r = &a["reference"];
                let client_id = (r["identifier"]["system"] == CLIENT_ID_SYSTEM)
                    .then(|| r["identifier"]["value"].as_str().map(str::to_owned))
                    .flatten();
                Actor {
                    reference: r["reference"].as_str().map(str::to_owned),
                    client_id,
                    roles: codings(&a["role"]).into_iter().map(|(_, c)| c).collect(),
                }
            })
            .collect();
        let data = value["data"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|d| {
                let meaning = d["meaning"].as_str().unwrap_or("related").to_owned();
                let target = d["reference"]["reference"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                (meaning, target)
            })
            .collect();
        let mut children = Vec::new();
        for child in value["provision"].as_array().into_iter().flatten() {
            children.push(Provision::parse(child, kind, reference)?);
        }
        Ok(Provision {
            kind,
            period,
            actors,
            actions: codings(&value["action"])
                .into_iter()
                .map(|(_, c)| c)
                .collect(),
            purposes: codings(&value["purpose"])
                .into_iter()
                .map(|(_, c)| c)
                .collect(),
            labels: codings(&value["securityLabel"]),
            classes: codings(&value["class"]),
            codes: codings(&value["code"]),
            data,
            children,
        })
    }

    /// Whether the request-level criteria hold for this requester.
    fn concerns(&self, who: &Requester) -> bool {
        if let Some((start, end)) = &self.period {
            let after_start = start
                .as_deref()
                .and_then(date_range)
                .is_none_or(|(low, _)| who.at >= low);
            let before_end = end
                .as_deref()
                .and_then(date_range)
                .is_none_or(|(_, high)| who.at < high);
            if !(after_start && before_end) {
                return false;
            }
        }
        if !self.actors.is_empty()
            && !self
                .actors
                .iter()
                .any(|a| match (&a.reference, &a.client_id) {
                    (Some(r), _) => who.references.iter().any(|w| w == r),
                    (None, Some(c)) => *c == who.client_id,
                    (None, None) => a.roles.iter().any(|r| who.roles.contains(r)),
                })
        {
            return false;
        }
        if !self.actions.is_empty() && !self.actions.contains(&who.action) {
            return false;
        }
        if !self.purposes.is_empty() && !self.purposes.contains(&who.purpose) {
            return false;
        }
        true
    }

    /// The resource-level criteria.
    fn scope(&self) -> Pred {
        let mut parts = Vec::new();
        if !self.labels.is_empty() {
            parts.push(Pred::or(
                self.labels
                    .iter()
                    .map(|(system, code)| Pred::Label {
                        system: if system.is_empty() {
                            ACT_CODE.to_owned()
                        } else {
                            system.clone()
                        },
                        code: code.clone(),
                    })
                    .collect(),
            ));
        }
        if !self.classes.is_empty() {
            parts.push(Pred::Types(
                self.classes
                    .iter()
                    .filter(|(system, _)| system == RESOURCE_TYPES || system.is_empty())
                    .map(|(_, code)| code.clone())
                    .collect(),
            ));
        }
        if !self.codes.is_empty() {
            parts.push(Pred::or(
                self.codes
                    .iter()
                    .map(|(system, code)| Pred::Code {
                        system: system.clone(),
                        code: code.clone(),
                    })
                    .collect(),
            ));
        }
        if !self.data.is_empty() {
            parts.push(Pred::or(
                self.data
                    .iter()
                    .map(|(meaning, target)| match meaning.as_str() {
                        "instance" => Pred::Instance(target.clone()),
                        _ => Pred::Related(target.clone()),
                    })
                    .collect(),
            ));
        }
        Pred::and(parts)
    }

    /// Where this provision applies and decides deny, and where permit.
    fn outcome(&self, who: &Requester) -> (Pred, Pred) {
        if !self.concerns(who) {
            return (Pred::False, Pred::False);
        }
        let scope = self.scope();
        let (child_deny, child_permit): (Vec<Pred>, Vec<Pred>) =
            self.children.iter().map(|c| c.outcome(who)).unzip();
        let any_deny = Pred::or(child_deny);
        let any_permit = Pred::or(child_permit);
        let (deny, permit) = match self.kind {
            Kind::Deny => (
                Pred::or(vec![any_deny.clone(), any_permit.clone().not()]),
                Pred::and(vec![any_deny.not(), any_permit]),
            ),
            Kind::Permit => (any_deny.clone(), any_deny.not()),
        };
        (
            Pred::and(vec![scope.clone(), deny]),
            Pred::and(vec![scope, permit]),
        )
    }
}

impl ConsentRule {
    /// An active privacy Consent, parsed; `Ok(None)` for a Consent this
    /// evaluator does not enforce (another scope, not active, no patient).
    pub fn parse(consent: &Value) -> Result<Option<Self>, PolicyError> {
        if consent["status"] != "active" {
            return Ok(None);
        }
        let privacy = codings(&consent["scope"])
            .iter()
            .any(|(_, code)| code == PRIVACY_SCOPE);
        if !privacy {
            return Ok(None);
        }
        let id = consent["id"].as_str().unwrap_or_default();
        let reference = format!("Consent/{id}");
        let Some(patient) = consent["patient"]["reference"]
            .as_str()
            .and_then(|r| r.strip_prefix("Patient/"))
        else {
            return Ok(None);
        };
        // With no type of its own, the root provision says what the policy
        // rule says: OPTOUT denies, anything else permits.
        let rule = codings(&consent["policyRule"]);
        let default = if rule.iter().any(|(_, c)| c == "OPTOUT") {
            Kind::Deny
        } else {
            Kind::Permit
        };
        let root = match consent.get("provision") {
            Some(p) => Provision::parse(p, default, &reference)?,
            None => Provision::parse(&Value::Null, default, &reference)?,
        };
        Ok(Some(ConsentRule {
            reference,
            patient: patient.to_owned(),
            root,
        }))
    }
}

/// The consents of one patient, judged for one requester.
#[derive(Debug, Clone)]
pub struct PatientConsent {
    /// Where the patient's data is hidden from this requester.
    pub hidden: Pred,
    /// The Consents that decide it.
    pub consents: Vec<String>,
}

/// Every patient's consents as one requester meets them.
#[derive(Debug, Clone, Default)]
pub struct ConsentView {
    pub default: SiteDefault,
    /// Patients with at least one active privacy Consent.
    pub patients: BTreeMap<String, PatientConsent>,
}

/// What the consents make of one resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsentVerdict {
    /// Shared; the Consents that were evaluated for it.
    Permit(Vec<String>),
    /// Hidden; the Consents (or the site default) that hide it.
    Deny(Vec<String>),
}

/// The site default, as a decision's reason.
pub const OPT_IN_DEFAULT: &str = "site policy opt-in: no Consent permits it";

impl ConsentView {
    pub fn new(
        rules: &[ConsentRule],
        unreadable: &[(String, String)],
        who: &Requester,
        default: SiteDefault,
    ) -> Self {
        let mut by_patient: BTreeMap<String, Vec<&ConsentRule>> = BTreeMap::new();
        for rule in rules {
            by_patient
                .entry(rule.patient.clone())
                .or_default()
                .push(rule);
        }
        let mut patients = BTreeMap::new();
        for (patient, rules) in by_patient {
            let (denies, permits): (Vec<Pred>, Vec<Pred>) =
                rules.iter().map(|r| r.root.outcome(who)).unzip();
            let mut hidden = vec![Pred::or(denies)];
            if default == SiteDefault::OptIn {
                hidden.push(Pred::or(permits).not());
            }
            patients.insert(
                patient,
                PatientConsent {
                    hidden: Pred::or(hidden),
                    consents: rules.iter().map(|r| r.reference.clone()).collect(),
                },
            );
        }
        // A Consent that cannot be understood hides its patient's data: the
        // patient said something, and guessing what would be unsafe.
        for (reference, patient) in unreadable {
            let entry = patients.entry(patient.clone()).or_insert(PatientConsent {
                hidden: Pred::False,
                consents: Vec::new(),
            });
            entry.hidden = Pred::True;
            entry.consents.push(reference.clone());
        }
        ConsentView { default, patients }
    }

    /// Whether nothing can be hidden by consent.
    pub fn is_empty(&self) -> bool {
        self.default == SiteDefault::OptOut && self.patients.is_empty()
    }

    /// The verdict on a resource that is in these patients' compartments.
    pub fn judge(&self, facts: &Facts, patients: &[String]) -> ConsentVerdict {
        let mut applied = Vec::new();
        let mut denied = Vec::new();
        for patient in patients {
            match self.patients.get(patient) {
                Some(consent) => {
                    if consent.hidden.holds(facts) {
                        denied.extend(consent.consents.iter().cloned());
                    } else {
                        applied.extend(consent.consents.iter().cloned());
                    }
                }
                None if self.default == SiteDefault::OptIn => denied.push(OPT_IN_DEFAULT.into()),
                None => {}
            }
        }
        if denied.is_empty() {
            ConsentVerdict::Permit(applied)
        } else {
            ConsentVerdict::Deny(denied)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn who(purpose: &str, user: &str) -> Requester {
        Requester {
            references: vec![user.to_owned()],
            client_id: "app".into(),
            roles: vec![],
            purpose: purpose.into(),
            action: "access".into(),
            at: time::macros::datetime!(2026-06-01 0:00 UTC),
        }
    }

    fn consent(provision: Value) -> ConsentRule {
        ConsentRule::parse(&json!({
            "resourceType": "Consent", "id": "c1", "status": "active",
            "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
            "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
            "patient": {"reference": "Patient/p1"},
            "provision": provision
        }))
        .unwrap()
        .unwrap()
    }

    fn observation() -> Facts {
        Facts::of(
            &json!({"resourceType": "Observation", "id": "o1", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "1234-5"}]},
            "subject": {"reference": "Patient/p1"}}),
        )
    }

    fn verdict(rule: &ConsentRule, who: &Requester, default: SiteDefault) -> ConsentVerdict {
        ConsentView::new(std::slice::from_ref(rule), &[], who, default)
            .judge(&observation(), &["p1".to_owned()])
    }

    #[test]
    fn a_denial_of_research_hides_data_from_research_only() {
        let rule = consent(json!({"type": "permit", "provision": [{"type": "deny",
            "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HRESCH"}]}]}));
        let research = verdict(&rule, &who("HRESCH", "Practitioner/1"), SiteDefault::OptOut);
        assert_eq!(research, ConsentVerdict::Deny(vec!["Consent/c1".into()]));
        let treatment = verdict(&rule, &who("TREAT", "Practitioner/1"), SiteDefault::OptOut);
        assert_eq!(treatment, ConsentVerdict::Permit(vec!["Consent/c1".into()]));
    }

    #[test]
    fn a_denial_of_one_practitioner_hides_data_from_that_practitioner_only() {
        let rule = consent(json!({"type": "permit", "provision": [{"type": "deny",
            "actor": [{"role": {"coding": [{"code": "PRCP"}]}, "reference": {"reference": "Practitioner/9"}}]}]}));
        assert!(matches!(
            verdict(&rule, &who("TREAT", "Practitioner/9"), SiteDefault::OptOut),
            ConsentVerdict::Deny(_)
        ));
        assert!(matches!(
            verdict(&rule, &who("TREAT", "Practitioner/1"), SiteDefault::OptOut),
            ConsentVerdict::Permit(_)
        ));
    }

    #[test]
    fn nested_exceptions_and_resource_criteria_are_honoured() {
        // Deny everything except Observations, but not this code.
        let rule = consent(json!({"type": "deny", "provision": [{"type": "permit",
            "class": [{"system": "http://hl7.org/fhir/resource-types", "code": "Observation"}],
            "provision": [{"type": "deny", "code": [{"coding": [{"system": "http://loinc.org", "code": "1234-5"}]}]}]}]}));
        assert!(matches!(
            verdict(&rule, &who("TREAT", "x"), SiteDefault::OptOut),
            ConsentVerdict::Deny(_)
        ));
        let other = Facts::of(&json!({"resourceType": "Observation", "id": "o2",
            "code": {"coding": [{"system": "http://loinc.org", "code": "9-9"}]}}));
        let view = ConsentView::new(
            std::slice::from_ref(&rule),
            &[],
            &who("TREAT", "x"),
            SiteDefault::OptOut,
        );
        assert!(matches!(
            view.judge(&other, &["p1".into()]),
            ConsentVerdict::Permit(_)
        ));
        let condition = Facts::of(&json!({"resourceType": "Condition", "id": "c"}));
        assert!(matches!(
            view.judge(&condition, &["p1".into()]),
            ConsentVerdict::Deny(_)
        ));
    }

    #[test]
    fn a_period_that_has_ended_no_longer_applies() {
        let rule = consent(
            json!({"type": "deny", "period": {"start": "2020-01-01", "end": "2021-01-01"}}),
        );
        assert!(matches!(
            verdict(&rule, &who("TREAT", "x"), SiteDefault::OptOut),
            ConsentVerdict::Permit(_)
        ));
    }

    #[test]
    fn opt_in_hides_patients_without_a_permitting_consent() {
        let view = ConsentView::new(&[], &[], &who("TREAT", "x"), SiteDefault::OptIn);
        assert_eq!(
            view.judge(&observation(), &["p1".into()]),
            ConsentVerdict::Deny(vec![OPT_IN_DEFAULT.into()])
        );
        let rule = consent(json!({"type": "permit"}));
        assert!(matches!(
            verdict(&rule, &who("TREAT", "x"), SiteDefault::OptIn),
            ConsentVerdict::Permit(_)
        ));
    }

    #[test]
    fn inactive_or_other_scope_consents_are_not_enforced_and_broken_ones_are_errors() {
        assert!(
            ConsentRule::parse(&json!({"resourceType": "Consent", "status": "inactive"}))
                .unwrap()
                .is_none()
        );
        let broken = json!({"resourceType": "Consent", "id": "b", "status": "active",
            "scope": {"coding": [{"code": "patient-privacy"}]}, "patient": {"reference": "Patient/p1"},
            "provision": {"type": "maybe"}});
        assert!(ConsentRule::parse(&broken).is_err());
    }

    #[test]
    fn action_security_label_and_data_narrow_a_provision() {
        let mut writer = who("TREAT", "x");
        writer.action = "correct".into();
        let rule = consent(json!({"type": "permit", "provision": [{"type": "deny",
            "action": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentaction", "code": "correct"}]}]}]}));
        assert!(matches!(
            verdict(&rule, &writer, SiteDefault::OptOut),
            ConsentVerdict::Deny(_)
        ));
        assert!(matches!(
            verdict(&rule, &who("TREAT", "x"), SiteDefault::OptOut),
            ConsentVerdict::Permit(_)
        ));

        let labeled = Facts::of(&json!({"resourceType": "Observation", "id": "o9",
            "meta": {"security": [{"system": ACT_CODE, "code": "PSY"}]},
            "subject": {"reference": "Patient/p1"}}));
        let rule = consent(json!({"type": "permit", "provision": [{"type": "deny",
            "securityLabel": [{"system": ACT_CODE, "code": "PSY"}]}]}));
        let view = ConsentView::new(
            std::slice::from_ref(&rule),
            &[],
            &who("TREAT", "x"),
            SiteDefault::OptOut,
        );
        assert!(matches!(
            view.judge(&labeled, &["p1".into()]),
            ConsentVerdict::Deny(_)
        ));
        assert!(matches!(
            view.judge(&observation(), &["p1".into()]),
            ConsentVerdict::Permit(_)
        ));

        let rule = consent(json!({"type": "permit", "provision": [{"type": "deny",
            "data": [{"meaning": "related", "reference": {"reference": "Encounter/e1"}}]}]}));
        let view = ConsentView::new(
            std::slice::from_ref(&rule),
            &[],
            &who("TREAT", "x"),
            SiteDefault::OptOut,
        );
        let in_encounter = Facts::of(
            &json!({"resourceType": "Observation", "id": "o2", "status": "final",
            "code": {"text": "x"}, "subject": {"reference": "Patient/p1"},
            "encounter": {"reference": "Encounter/e1"}}),
        );
        let encounter = Facts::of(&json!({"resourceType": "Encounter", "id": "e1"}));
        assert!(matches!(
            view.judge(&in_encounter, &["p1".into()]),
            ConsentVerdict::Deny(_)
        ));
        assert!(matches!(
            view.judge(&encounter, &["p1".into()]),
            ConsentVerdict::Deny(_)
        ));
        assert!(matches!(
            view.judge(&observation(), &["p1".into()]),
            ConsentVerdict::Permit(_)
        ));
    }

    #[test]
    fn a_client_app_is_named_by_its_client_id() {
        let rule = consent(json!({"type": "permit", "provision": [{"type": "deny",
            "actor": [{"role": {"coding": [{"code": "IRCP"}]},
                       "reference": {"identifier": {"system": CLIENT_ID_SYSTEM, "value": "app"}}}]}]}));
        assert!(matches!(
            verdict(&rule, &who("TREAT", "x"), SiteDefault::OptOut),
            ConsentVerdict::Deny(_)
        ));
    }
}
