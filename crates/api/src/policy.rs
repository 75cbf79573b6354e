//! Stages 4 and 6 with consent and labels on (R6, R7): the patient's
//! Consents and the data's security labels, judged by `haven-policy` against
//! the token's purpose of use and clearance.
//!
//! - Each request gets a [`PolicyGuard`], layered with the scopes' guard over
//!   the store: a read of a resource the policy hides is refused (403, or 404
//!   where configured); searches carry the same policy into the query as
//!   criteria, so counts, pages, includes, chains and `_has` never see hidden
//!   data; history filters by content.
//! - Writes pass a labeling layer ([`LabelingStore`]) that adds the labels the
//!   sensitivity value sets call for, keeps every label the previous version
//!   had, and passes a Condition's or Procedure's labels on to its Encounter.
//! - Stage 6 ([`PolicyStage::label`]) masks what must be masked and gives a
//!   returned Bundle the highest confidentiality of its entries.
//! - What decided is added to the request's AuditEvent.

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use haven_auth::registry::Role;
use haven_auth::scope::Permission;
use haven_model::registry::{search_param, search_params, SearchParamType};
use haven_model::search_value::patient_compartments;
use haven_policy::clearance::{judge, redact, Clearance, LabelRules, LabelVerdict};
use haven_policy::consent::{
    ConsentRule, ConsentVerdict, ConsentView, Facts, Pred, Requester, SiteDefault,
};
use haven_policy::label::{
    apply, carry_over, Confidentiality, Labeler, ResourceLabels, ACT_CODE, CONFIDENTIALITY,
};
use haven_policy::purpose::BREAK_THE_GLASS;
use haven_store::{
    Access, AccessRule, AuditLog, AuthRecords, Backend, ContentFilter, Criterion, HistoryPage,
    HistoryQuery, ResourceVersion, Result, SearchPage, SearchQuery, SortBy, Store, StoreTx,
    TypeAccess,
};
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::guard::{ContentGuard, ContentRule, Shown};
use crate::interaction::Interaction;
use crate::pipeline::{AccessDecision, ConsentGate, Principal, ResultLabeler};
use crate::record::RequestAudit;
use crate::response::FhirResponse;

/// The site's consent and label policy.
#[derive(Debug, Clone)]
pub struct PolicyConfig {
    pub labeler: Arc<Labeler>,
    /// Categories masked rather than denied.
    pub label_rules: LabelRules,
    /// Opt-in or opt-out, where no Consent of a patient decides.
    pub site_default: SiteDefault,
    /// Answer a read the policy refuses with 404 instead of 403.
    pub hidden_as_missing: bool,
    /// Tell a search, in an informational OperationOutcome entry, that the
    /// policy left data out.
    pub report_suppressed: bool,
    /// The most a token with one of these purposes of use may see, whatever
    /// its clearance: labels are judged against the purpose too.
    pub purpose_caps: std::collections::BTreeMap<String, Clearance>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            labeler: Arc::new(Labeler::built_in()),
            label_rules: LabelRules::default(),
            site_default: SiteDefault::OptOut,
            hidden_as_missing: false,
            report_suppressed: true,
            // Marketing and directories never see sensitive data.
            purpose_caps: ["HMARKT", "HDIRECT"]
                .into_iter()
                .map(|p| (p.to_owned(), Clearance::default()))
                .collect(),
        }
    }
}

impl PolicyConfig {
    /// Masks these categories instead of denying them.
    pub fn masking(mut self, categories: impl IntoIterator<Item = String>) -> Self {
        self.label_rules = LabelRules::new(categories.into_iter().collect(), &self.labeler);
        self
    }
}

/// The consent and labels stage (4) and the result labeler (6).
#[derive(Debug, Clone, Default)]
pub struct PolicyStage {
    pub config: Arc<PolicyConfig>,
}

/// How many Consents are read per page while a request's guard is built.
const CONSENT_PAGE: u32 = 1_000;

/// Every active Consent in the store, parsed: those this evaluator enforces,
/// and those it could not understand (reference, patient).
async fn active_consents(
    store: &dyn Store,
) -> std::result::Result<(Vec<ConsentRule>, Vec<(String, String)>), ApiError> {
    let mut rules = Vec::new();
    let mut unreadable = Vec::new();
    let mut offset = 0;
    loop {
        let query = SearchQuery {
            criterion: Criterion::Token {
                param: "status".into(),
                system: None,
                code: Some("active".into()),
            },
            count: CONSENT_PAGE,
            offset,
            ..SearchQuery::of_type("Consent")
        };
        let page = store.search(&query).await?;
        for version in &page.resources {
            let Some(consent) = &version.resource else {
                continue;
            };
            match ConsentRule::parse(consent) {
                Ok(Some(rule)) => rules.push(rule),
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(id = %version.id, %error, "a Consent cannot be evaluated; its patient's data is withheld");
                    if let Some(patient) = consent["patient"]["reference"]
                        .as_str()
                        .and_then(|r| r.strip_prefix("Patient/"))
                    {
                        unreadable.push((format!("Consent/{}", version.id), patient.to_owned()));
                    }
                }
            }
        }
        if !page.more {
            break;
        }
        offset += u64::from(CONSENT_PAGE);
    }
    Ok((rules, unreadable))
}

fn requester(who: &Principal, action: &str, at: time::OffsetDateTime) -> Requester {
    let access = who.access.as_ref();
    let mut references = Vec::new();
    if let Some(user) = access.and_then(|a| a.fhir_user.clone()) {
        references.push(user);
    }
    if let Some(org) = access.and_then(|a| a.organization.clone()) {
        references.push(org);
    }
    Requester {
        references,
        client_id: access.map(|a| a.client_id.clone()).unwrap_or_default(),
        roles: access
            .and_then(|a| a.role)
            .map(|r| vec![r.as_str().to_owned()])
            .unwrap_or_default(),
        purpose: access.map(|a| a.purpose.clone()).unwrap_or_default(),
        action: action.to_owned(),
        at,
    }
}

#[async_trait]
impl ConsentGate for PolicyStage {
    async fn decide(&self, _: &Principal, _: &Interaction) -> Result<AccessDecision, ApiError> {
        // The policy judges content, through the request's guard.
        Ok(AccessDecision::default())
    }

    async fn guard(
        &self,
        who: &Principal,
        store: &dyn Store,
        audit: &Arc<RequestAudit>,
        at: time::OffsetDateTime,
    ) -> Result<Arc<dyn ContentGuard>, ApiError> {
        let Some(access) = &who.access else {
            // Anonymous callers reach only the CapabilityStatement.
            return Ok(Arc::new(crate::guard::Unguarded));
        };
        let break_glass = access.purpose == BREAK_THE_GLASS && access.break_glass_reason.is_some();
        let clearance = match self.config.purpose_caps.get(&access.purpose) {
            Some(cap) => access.clearance.within(cap),
            None => access.clearance.clone(),
        };
        audit.decide(|d| {
            d.purpose = Some(access.purpose.clone());
            d.scopes = Some(access.scopes.to_string());
            d.clearance = Some(clearance.to_string());
            d.break_glass_reason = access.break_glass_reason.clone().filter(|_| break_glass);
        });
        let (rules, unreadable) = active_consents(store).await?;
        let views = |action: &str| {
            ConsentView::new(
                &rules,
                &unreadable,
                &requester(who, action, at),
                self.config.site_default,
            )
        };
        // A patient's own record is not hidden from them by their own Consents.
        let own_patient = (access.role == Some(Role::Patient))
            .then(|| {
                access
                    .fhir_user
                    .as_deref()
                    .and_then(|u| u.strip_prefix("Patient/"))
                    .map(str::to_owned)
            })
            .flatten();
        Ok(Arc::new(PolicyGuard(Arc::new(PolicyState {
            config: self.config.clone(),
            clearance,
            break_glass,
            reading: views("access"),
            writing: views("correct"),
            own_patient,
            consent_writes_limited: matches!(access.role, Some(Role::Patient | Role::Practitioner)),
            audit: audit.clone(),
        }))))
    }

    fn labeling_store(&self, store: Arc<dyn Store>) -> Arc<dyn Store> {
        Arc::new(LabelingStore {
            inner: store,
            labeler: self.config.labeler.clone(),
        })
    }
}

#[async_trait]
impl ResultLabeler for PolicyStage {
    async fn label(
        &self,
        _: &Principal,
        _: &AccessDecision,
        guard: &dyn ContentGuard,
        response: &mut FhirResponse,
    ) -> Result<(), ApiError> {
        let Some(body) = response.body.as_mut() else {
            return Ok(());
        };
        if body["resourceType"] == "Bundle" {
            present_bundle(guard, body);
        } else if body.get("resourceType").is_some() {
            let shown = guard.present(body);
            if let Shown::Copy(copy) = shown {
                *body = copy;
            } else if shown == Shown::Withheld {
                *body = haven_model::outcome::operation_outcome(&[haven_model::outcome::Issue::information(
                    haven_model::outcome::IssueCode::Suppressed,
                    "the request succeeded; the resource is not shown because its labels or its \
                     patient's consent do not let this requester read it",
                )]);
            }
        }
        Ok(())
    }
}

/// Presents every entry of a Bundle (and of the Bundles in it: a batch's
/// searches) as the guard says, and labels the Bundle with the highest
/// confidentiality of its entries.
fn present_bundle(guard: &dyn ContentGuard, bundle: &mut Value) -> Option<Confidentiality> {
    let mut highest: Option<Confidentiality> = None;
    for entry in bundle["entry"].as_array_mut().into_iter().flatten() {
        let Some(resource) = entry.get_mut("resource") else {
            continue;
        };
        if resource["resourceType"] == "Bundle" {
            highest = highest.max(present_bundle(guard, resource));
            continue;
        }
        match guard.present(resource) {
            Shown::AsStored => {}
            Shown::Copy(copy) => *resource = copy,
            // A written resource the writer may not read is not shown back.
            Shown::Withheld => {
                if let Some(map) = entry.as_object_mut() {
                    map.remove("resource");
                }
                continue;
            }
        }
        highest = highest.max(ResourceLabels::of(resource).confidentiality);
    }
    if let Some(level) = highest {
        set_confidentiality(bundle, level);
    }
    highest
}

/// Gives a Bundle the confidentiality label of its most confidential entry.
fn set_confidentiality(bundle: &mut Value, level: Confidentiality) {
    if !bundle["meta"].is_object() {
        bundle["meta"] = json!({});
    }
    let mut security: Vec<Value> = bundle["meta"]["security"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    security.retain(|c| c["system"] != CONFIDENTIALITY);
    security
        .push(json!({"system": CONFIDENTIALITY, "code": level.code(), "display": level.display()}));
    bundle["meta"]["security"] = Value::Array(security);
}

/// What one request's policy knows.
#[derive(Debug)]
struct PolicyState {
    config: Arc<PolicyConfig>,
    clearance: Clearance,
    break_glass: bool,
    /// The Consents as they meet this requester when reading and searching.
    reading: ConsentView,
    /// ... and when writing.
    writing: ConsentView,
    own_patient: Option<String>,
    /// Privacy Consents are written only by administrators, Backend Services
    /// clients and the patient they are about.
    consent_writes_limited: bool,
    audit: Arc<RequestAudit>,
}

/// The policy's verdict on one resource.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    Permit,
    Mask(BTreeSet<String>),
    Deny,
}

impl PolicyState {
    fn view(&self, permission: Permission) -> &ConsentView {
        match permission {
            Permission::Read | Permission::Search => &self.reading,
            _ => &self.writing,
        }
    }

    /// Whether the policy can hide anything from this requester.
    fn restricts(&self, permission: Permission) -> bool {
        if self.break_glass {
            return false;
        }
        let everything = self.clearance.every_category
            && self.clearance.confidentiality == Confidentiality::VeryRestricted;
        !(everything && self.view(permission).is_empty())
    }

    fn patients_of(&self, resource: &Value) -> Vec<String> {
        let mut patients = patient_compartments(resource);
        if let Some(own) = &self.own_patient {
            patients.retain(|p| p != own);
        }
        patients
    }

    /// Whether this requester may write this resource when it is a Consent:
    /// a practitioner could otherwise grant themselves access, or revoke a
    /// denial, by writing the patient's Consent.
    fn may_write_consent(&self, resource: &Value) -> bool {
        if !self.consent_writes_limited || resource["resourceType"] != "Consent" {
            return true;
        }
        let patient = resource["patient"]["reference"]
            .as_str()
            .and_then(|r| r.strip_prefix("Patient/"));
        patient.is_some() && patient == self.own_patient.as_deref()
    }

    /// The verdict, noted in the request's decision record.
    fn verdict(&self, permission: Permission, resource: &Value) -> Verdict {
        if resource["resourceType"] == "AuditEvent" {
            return Verdict::Permit;
        }
        let reference = format!(
            "{}/{}",
            resource["resourceType"].as_str().unwrap_or_default(),
            resource["id"].as_str().unwrap_or_default()
        );
        let labels = ResourceLabels::of(resource);
        let mut label_verdict = judge(&self.clearance, &labels, &self.config.label_rules);
        let resource_type = resource["resourceType"].as_str().unwrap_or_default();
        if let LabelVerdict::Mask(categories) = &label_verdict {
            // Only a type whose sensitive elements are known can be masked.
            if !Labeler::labeled_types().any(|t| t == resource_type) {
                label_verdict = LabelVerdict::Deny(categories.clone());
            }
        }
        let view = self.view(permission);
        let consent_verdict = if view.is_empty() {
            ConsentVerdict::Permit(Vec::new())
        } else {
            view.judge(&Facts::of(resource), &self.patients_of(resource))
        };
        if self.break_glass {
            // Broken glass overrides; the record says what it overrode.
            let original = self.clone_without_glass_verdict(&label_verdict, &consent_verdict);
            if let Some(note) = original {
                self.audit.decide(|d| {
                    push_once(&mut d.labels, format!("overridden for {reference}: {note}"))
                });
            }
            return Verdict::Permit;
        }
        let mut verdict = Verdict::Permit;
        match &consent_verdict {
            ConsentVerdict::Deny(by) => {
                for consent in by {
                    self.audit.decide(|d| {
                        push_once(&mut d.consents, format!("{consent} denied {reference}"))
                    });
                }
                verdict = Verdict::Deny;
            }
            ConsentVerdict::Permit(applied) => {
                for consent in applied {
                    self.audit.decide(|d| {
                        push_once(&mut d.consents, format!("{consent} permitted {reference}"))
                    });
                }
            }
        }
        match label_verdict {
            LabelVerdict::Deny(labels) => {
                let labels: Vec<String> = labels.into_iter().collect();
                self.audit.decide(|d| {
                    push_once(
                        &mut d.labels,
                        format!("filtered {reference}: {}", labels.join(", ")),
                    )
                });
                verdict = Verdict::Deny;
            }
            LabelVerdict::Mask(categories) if verdict == Verdict::Permit => {
                let list: Vec<&str> = categories.iter().map(String::as_str).collect();
                self.audit.decide(|d| {
                    push_once(
                        &mut d.labels,
                        format!("masked {reference}: {}", list.join(", ")),
                    )
                });
                verdict = Verdict::Mask(categories);
            }
            _ => {}
        }
        verdict
    }

    /// What consent and labels would have done without broken glass.
    fn clone_without_glass_verdict(
        &self,
        labels: &LabelVerdict,
        consent: &ConsentVerdict,
    ) -> Option<String> {
        let mut notes = Vec::new();
        if let ConsentVerdict::Deny(by) = consent {
            notes.push(format!("denied by {}", by.join(", ")));
        }
        match labels {
            LabelVerdict::Deny(l) | LabelVerdict::Mask(l) => notes.push(format!(
                "labels {}",
                l.iter().map(String::as_str).collect::<Vec<_>>().join(", ")
            )),
            LabelVerdict::Permit => {}
        }
        (!notes.is_empty()).then(|| notes.join("; "))
    }

    /// The criterion that hides, for one type, what the policy hides.
    fn hidden(&self, permission: Permission, resource_type: &str, safe: bool) -> Criterion {
        if resource_type == "AuditEvent" {
            return Criterion::Never;
        }
        let maskable = Labeler::labeled_types().any(|t| t == resource_type);
        let mut hidden = vec![self.hidden_by_labels(safe && maskable)];
        let view = self.view(permission);
        let in_compartment = compartment_types().contains(resource_type);
        if in_compartment {
            for (patient, consent) in &view.patients {
                if Some(patient) == self.own_patient.as_ref() || consent.hidden == Pred::False {
                    continue;
                }
                hidden.push(
                    Criterion::PatientCompartment(patient.clone())
                        .and(compile(&consent.hidden, resource_type)),
                );
            }
            if view.default == SiteDefault::OptIn {
                let mut known: Vec<String> = view.patients.keys().cloned().collect();
                known.extend(self.own_patient.clone());
                hidden.push(Criterion::CompartmentOutside(known));
            }
        }
        any(hidden)
    }

    /// What the clearance hides, as a criterion on `_security`.
    fn hidden_by_labels(&self, safe: bool) -> Criterion {
        let rules = &self.config.label_rules;
        let token = |system: &str, code: &str| Criterion::Token {
            param: "_security".into(),
            system: Some(system.to_owned()),
            code: Some(code.to_owned()),
        };
        let masked: Vec<String> = rules
            .masked
            .iter()
            .filter(|c| !self.clearance.covers(c))
            .cloned()
            .collect();
        let has_masked = any(masked.iter().map(|m| token(ACT_CODE, m)).collect());
        let mut hidden = Vec::new();
        if !self.clearance.every_category {
            let mut allowed: Vec<String> = self.clearance.categories.iter().cloned().collect();
            allowed.extend(masked.iter().cloned());
            hidden.push(Criterion::TokenOutside {
                param: "_security".into(),
                system: ACT_CODE.into(),
                codes: allowed,
            });
        }
        for level in LEVELS {
            if level <= self.clearance.confidentiality {
                continue;
            }
            let above = token(CONFIDENTIALITY, level.code());
            // As in `judge`: masking stands in for clearance up to the level
            // a masked category of the resource demands.
            let enough = any(masked
                .iter()
                .filter(|m| level <= rules.level_of(m))
                .map(|m| token(ACT_CODE, m))
                .collect());
            hidden.push(match enough {
                Criterion::Never => above,
                enough => above.and(Criterion::Not(Box::new(enough))),
            });
        }
        if !safe {
            hidden.push(has_masked);
        }
        any(hidden)
    }
}

const LEVELS: [Confidentiality; 6] = [
    Confidentiality::Unrestricted,
    Confidentiality::Low,
    Confidentiality::Moderate,
    Confidentiality::Normal,
    Confidentiality::Restricted,
    Confidentiality::VeryRestricted,
];

fn push_once(list: &mut Vec<String>, line: String) {
    // A search can judge many resources: the record keeps a bounded account.
    const MOST: usize = 50;
    if list.len() < MOST && !list.contains(&line) {
        list.push(line);
    }
}

fn any(items: Vec<Criterion>) -> Criterion {
    let items: Vec<Criterion> = items
        .into_iter()
        .filter(|c| *c != Criterion::Never)
        .collect();
    if items.contains(&Criterion::Always) {
        return Criterion::Always;
    }
    match items.len() {
        0 => Criterion::Never,
        1 => items.into_iter().next().unwrap_or(Criterion::Never),
        _ => Criterion::Any(items),
    }
}

/// The types that can be in a patient's compartment.
fn compartment_types() -> &'static BTreeSet<String> {
    static TYPES: std::sync::OnceLock<BTreeSet<String>> = std::sync::OnceLock::new();
    TYPES.get_or_init(|| {
        haven_model::registry::compartment_resource_types("Patient")
            .into_iter()
            .map(str::to_owned)
            .collect()
    })
}

/// A consent predicate as a search criterion for one type. It must decide as
/// [`Pred::holds`] does on the same resource's index values.
fn compile(pred: &Pred, resource_type: &str) -> Criterion {
    match pred {
        Pred::True => Criterion::Always,
        Pred::False => Criterion::Never,
        Pred::Types(types) => {
            if types.contains(resource_type) {
                Criterion::Always
            } else {
                Criterion::Never
            }
        }
        Pred::Label { system, code } => Criterion::Token {
            param: "_security".into(),
            system: Some(system.clone()),
            code: Some(code.clone()),
        },
        Pred::Code { system, code } => {
            let is_token = search_param(resource_type, "code")
                .is_some_and(|p| p.kind == SearchParamType::Token);
            if is_token {
                Criterion::Token {
                    param: "code".into(),
                    system: Some(system.clone()),
                    code: Some(code.clone()),
                }
            } else {
                Criterion::Never
            }
        }
        Pred::Instance(reference) => instance(reference, resource_type),
        Pred::Related(reference) => {
            let mut alternatives = vec![instance(reference, resource_type)];
            if let Some((target_type, id)) = reference.split_once('/') {
                let params: Vec<String> = search_params(resource_type)
                    .into_iter()
                    .filter(|p| p.kind == SearchParamType::Reference)
                    .map(|p| p.code.clone())
                    .collect();
                alternatives.push(Criterion::ReferencesAny {
                    params,
                    target_type: target_type.to_owned(),
                    target_ids: vec![id.to_owned()],
                });
            }
            any(alternatives)
        }
        Pred::And(items) => items.iter().fold(Criterion::Always, |acc, p| {
            acc.and(compile(p, resource_type))
        }),
        Pred::Or(items) => any(items.iter().map(|p| compile(p, resource_type)).collect()),
        Pred::Not(inner) => match compile(inner, resource_type) {
            Criterion::Always => Criterion::Never,
            Criterion::Never => Criterion::Always,
            other => Criterion::Not(Box::new(other)),
        },
    }
}

fn instance(reference: &str, resource_type: &str) -> Criterion {
    match reference.split_once('/') {
        Some((t, id)) if t == resource_type => Criterion::Keys(vec![(t.to_owned(), id.to_owned())]),
        _ => Criterion::Never,
    }
}

/// Whether a search looks only at what a masked copy still shows: the
/// resource's identity, its patient, and when it changed. Anything else (a
/// code, a chain, `_has`, a sort on content) could reveal what masking hides.
fn looks_only_at_unmasked(query: &SearchQuery) -> bool {
    fn plain(c: &Criterion) -> bool {
        match c {
            Criterion::Always
            | Criterion::Never
            | Criterion::Keys(_)
            | Criterion::LastUpdated(_)
            | Criterion::PatientCompartment(_) => true,
            Criterion::Reference { param, .. } => {
                matches!(param.as_str(), "patient" | "subject" | "_id")
            }
            Criterion::All(items) | Criterion::Any(items) => items.iter().all(plain),
            Criterion::Not(inner) => plain(inner),
            _ => false,
        }
    }
    let sorts_plainly = query
        .sort
        .iter()
        .all(|k| matches!(k.by, SortBy::Id | SortBy::LastUpdated));
    plain(&query.criterion) && sorts_plainly
}

/// The policy as a guard over the store.
#[derive(Debug, Clone)]
struct PolicyGuard(Arc<PolicyState>);

impl PolicyGuard {
    fn rule_for(&self, permission: Permission, safe: bool) -> ContentRule {
        let writes = !matches!(permission, Permission::Read | Permission::Search);
        // Under broken glass every resource is still judged, so that the
        // record says what the glass overrode.
        let restricts = self.0.restricts(permission) || self.0.break_glass;
        let guards_consents = writes && self.0.consent_writes_limited;
        if !(restricts || guards_consents) {
            return ContentRule::Unrestricted;
        }
        let state = self.0.clone();
        ContentRule::Only(ContentFilter::new(move |resource| {
            if writes && !state.may_write_consent(resource) {
                return false;
            }
            // New data may carry any labels: writing up is not reading.
            if permission == Permission::Create || !restricts {
                return true;
            }
            if writes {
                // Changing or deleting needs the whole resource to be readable
                // (a masked copy hides what a write could test or copy out),
                // and the Consents' view of writing to admit it too.
                return state.verdict(Permission::Read, resource) == Verdict::Permit
                    && state.verdict(permission, resource) == Verdict::Permit;
            }
            match state.verdict(permission, resource) {
                Verdict::Permit => true,
                Verdict::Mask(_) => safe,
                Verdict::Deny => false,
            }
        }))
    }

    fn access_for(&self, permission: Permission, safe: bool) -> Option<Access> {
        let view = self.0.view(permission);
        let in_effect: Vec<String> = view
            .patients
            .values()
            .filter(|c| c.hidden != Pred::False)
            .flat_map(|c| c.consents.iter().cloned())
            .collect();
        let clearance = self.0.clearance.to_string();
        self.0.audit.decide(|d| {
            for consent in in_effect {
                push_once(&mut d.consents, format!("{consent} applied to the search"));
            }
            push_once(
                &mut d.labels,
                format!("search limited to clearance {clearance}"),
            );
        });
        Some(Arc::new(PolicyAccess {
            state: self.0.clone(),
            permission,
            safe,
        }))
    }
}

impl ContentGuard for PolicyGuard {
    fn rule(&self, permission: Permission) -> ContentRule {
        self.rule_for(permission, true)
    }

    fn access(&self, permission: Permission) -> Option<Access> {
        self.access_for(permission, true)
    }

    fn search_rule(&self, permission: Permission, query: &SearchQuery) -> ContentRule {
        let safe = self.0.config.label_rules.masked.is_empty() || looks_only_at_unmasked(query);
        self.rule_for(permission, safe)
    }

    fn search_access(&self, permission: Permission, query: &SearchQuery) -> Option<Access> {
        let safe = self.0.config.label_rules.masked.is_empty() || looks_only_at_unmasked(query);
        self.access_for(permission, safe)
    }

    fn hides_as_missing(&self, _: Permission, _: &Value) -> bool {
        self.0.config.hidden_as_missing
    }

    fn reports_withheld(&self) -> bool {
        self.0.config.report_suppressed
    }

    fn present(&self, resource: &Value) -> Shown {
        if !self.0.restricts(Permission::Read)
            || self.0.break_glass
            || resource["resourceType"] == "OperationOutcome"
        {
            return Shown::AsStored;
        }
        match self.0.verdict(Permission::Read, resource) {
            Verdict::Permit => Shown::AsStored,
            Verdict::Mask(categories) => {
                Shown::Copy(redact(resource, &categories, &self.0.config.labeler))
            }
            Verdict::Deny => Shown::Withheld,
        }
    }
}

/// The policy per type, in the form the store compiles into a search.
#[derive(Debug)]
struct PolicyAccess {
    state: Arc<PolicyState>,
    permission: Permission,
    safe: bool,
}

impl AccessRule for PolicyAccess {
    fn for_type(&self, resource_type: &str) -> TypeAccess {
        if !self.state.restricts(self.permission) {
            return TypeAccess::All;
        }
        match self.state.hidden(self.permission, resource_type, self.safe) {
            Criterion::Never => TypeAccess::All,
            Criterion::Always => TypeAccess::Nothing,
            hidden => TypeAccess::Only(Criterion::Not(Box::new(hidden))),
        }
    }
}

/// The store as writes see it: every created or updated resource is labeled
/// before it is stored.
#[derive(Debug)]
pub(crate) struct LabelingStore {
    inner: Arc<dyn Store>,
    labeler: Arc<Labeler>,
}

impl LabelingStore {
    fn labeling(&self, inner: Box<dyn StoreTx>) -> Box<dyn StoreTx> {
        Box::new(LabelingTx {
            inner,
            labeler: self.labeler.clone(),
            passed_on: 0,
            unresolved: Vec::new(),
        })
    }
}

#[async_trait]
impl Store for LabelingStore {
    fn backend(&self) -> Backend {
        self.inner.backend()
    }

    async fn begin(&self) -> Result<Box<dyn StoreTx>> {
        Ok(self.labeling(self.inner.begin().await?))
    }

    async fn begin_large(&self) -> Result<Box<dyn StoreTx>> {
        Ok(self.labeling(self.inner.begin_large().await?))
    }

    async fn read(&self, resource_type: &str, id: &str) -> Result<Option<ResourceVersion>> {
        self.inner.read(resource_type, id).await
    }

    async fn vread(
        &self,
        resource_type: &str,
        id: &str,
        version: i64,
    ) -> Result<Option<ResourceVersion>> {
        self.inner.vread(resource_type, id, version).await
    }

    async fn search(&self, query: &SearchQuery) -> Result<SearchPage> {
        self.inner.search(query).await
    }

    async fn search_keys(&self, query: &SearchQuery, limit: u32) -> Result<Vec<(String, String)>> {
        self.inner.search_keys(query, limit).await
    }

    async fn history(&self, query: &HistoryQuery) -> Result<HistoryPage> {
        self.inner.history(query).await
    }

    async fn count_by_type(&self) -> Result<Vec<(String, u64)>> {
        self.inner.count_by_type().await
    }

    fn auth_records(&self) -> &dyn AuthRecords {
        self.inner.auth_records()
    }

    fn audit_log(&self) -> &dyn AuditLog {
        self.inner.audit_log()
    }
}

struct LabelingTx {
    inner: Box<dyn StoreTx>,
    labeler: Arc<Labeler>,
    /// Resources relabeled because another one passed its labels on.
    passed_on: u64,
    /// Resources written in this transaction that refer to one not (yet)
    /// written: they are labeled again before the transaction commits, so
    /// the order of a Bundle's entries does not matter.
    unresolved: Vec<(String, String)>,
}

fn local_reference(reference: &str) -> Option<(&str, &str)> {
    let (t, id) = reference.split_once('/')?;
    (haven_model::registry::is_resource_type(t) && haven_model::id::is_valid_id(id))
        .then_some((t, id))
}

impl LabelingTx {
    /// The resource with the labels its codes and the resources it refers
    /// to call for, and every label its previous version had.
    async fn labeled(
        &mut self,
        resource_type: &str,
        id: &str,
        mut resource: Value,
    ) -> Result<Value> {
        let mut labeling = self.labeler.own_labels(&resource);
        for reference in self.labeler.inherited_from(&resource) {
            let Some((t, i)) = local_reference(&reference) else {
                continue;
            };
            match self.inner.read(t, i).await? {
                Some(version) => {
                    if let Some(target) = version.resource {
                        let labels = ResourceLabels::of(&target);
                        if !labels.categories.is_empty() {
                            labeling.inherit(&reference, &labels, &self.labeler);
                        }
                    }
                }
                None => {
                    let key = (resource_type.to_owned(), id.to_owned());
                    if !self.unresolved.contains(&key) {
                        self.unresolved.push(key);
                    }
                }
            }
        }
        if let Some(previous) = self
            .inner
            .read(resource_type, id)
            .await?
            .and_then(|v| v.resource)
        {
            carry_over(&previous, &mut resource);
        }
        apply(&mut resource, &labeling, &self.labeler);
        Ok(resource)
    }

    /// A Condition or Procedure passes its labels on to its Encounter, which
    /// gets a new version when that raises its labels.
    async fn pass_on(&mut self, written: &ResourceVersion) -> Result<()> {
        let Some(resource) = &written.resource else {
            return Ok(());
        };
        let labels = ResourceLabels::of(resource);
        if labels.categories.is_empty() {
            return Ok(());
        }
        let from = format!("{}/{}", written.resource_type, written.id);
        for reference in self.labeler.passes_labels_to(resource) {
            let Some((t, i)) = local_reference(&reference) else {
                continue;
            };
            let Some(current) = self.inner.read(t, i).await? else {
                continue;
            };
            let Some(mut target) = current.resource.clone() else {
                continue;
            };
            let mut labeling = haven_policy::label::Labeling::default();
            labeling.inherit(&from, &labels, &self.labeler);
            if apply(&mut target, &labeling, &self.labeler) {
                self.inner
                    .update(t, i, target, Some(current.version))
                    .await?;
                self.passed_on += 1;
            }
        }
        Ok(())
    }
}

#[async_trait]
impl StoreTx for LabelingTx {
    async fn read(&mut self, resource_type: &str, id: &str) -> Result<Option<ResourceVersion>> {
        self.inner.read(resource_type, id).await
    }

    async fn create(
        &mut self,
        resource_type: &str,
        id: &str,
        resource: Value,
    ) -> Result<ResourceVersion> {
        let resource = self.labeled(resource_type, id, resource).await?;
        let written = self.inner.create(resource_type, id, resource).await?;
        self.pass_on(&written).await?;
        Ok(written)
    }

    async fn update(
        &mut self,
        resource_type: &str,
        id: &str,
        resource: Value,
        expected_version: Option<i64>,
    ) -> Result<(ResourceVersion, bool)> {
        let resource = self.labeled(resource_type, id, resource).await?;
        let (written, created) = self
            .inner
            .update(resource_type, id, resource, expected_version)
            .await?;
        self.pass_on(&written).await?;
        Ok((written, created))
    }

    async fn delete(
        &mut self,
        resource_type: &str,
        id: &str,
        expected_version: Option<i64>,
    ) -> Result<Option<ResourceVersion>> {
        self.inner.delete(resource_type, id, expected_version).await
    }

    async fn search(&mut self, query: &SearchQuery) -> Result<SearchPage> {
        self.inner.search(query).await
    }

    async fn append_audit(&mut self, events: Vec<Value>) -> Result<()> {
        self.inner.append_audit(events).await
    }

    async fn commit(mut self: Box<Self>) -> Result<()> {
        for (resource_type, id) in std::mem::take(&mut self.unresolved) {
            let Some(current) = self.inner.read(&resource_type, &id).await? else {
                continue;
            };
            let Some(resource) = current.resource else {
                continue;
            };
            let labeled = self.labeled(&resource_type, &id, resource.clone()).await?;
            if ResourceLabels::of(&labeled) != ResourceLabels::of(&resource) {
                self.update(&resource_type, &id, labeled, Some(current.version))
                    .await?;
            }
        }
        self.inner.commit().await
    }
}

/// What `haven labels apply` did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RelabelReport {
    /// Resources of the labeled types looked at.
    pub examined: u64,
    /// Resources that got a new version with more labels (Encounters labeled
    /// through their Conditions included).
    pub relabeled: u64,
}

/// The name the relabeling command acts under in Provenance and AuditEvents.
pub const RELABEL_ACTOR: &str = "haven labels apply";

/// Labels the stored data as the current value sets say: every resource of a
/// labeled type whose labels the rules would raise gets a new version, with
/// its Provenance and AuditEvent, as any write does. Labels are never removed.
pub async fn relabel(state: &crate::AppState) -> std::result::Result<RelabelReport, ApiError> {
    let labeler = Arc::new(Labeler::built_in());
    let principal = Principal {
        subject: Some(RELABEL_ACTOR.into()),
        access: Some(haven_auth::AccessContext {
            subject: RELABEL_ACTOR.into(),
            client_id: RELABEL_ACTOR.into(),
            scopes: haven_auth::scope::ScopeSet::parse("system/*.cruds"),
            patient: None,
            encounter: None,
            fhir_user: None,
            role: Some(Role::Admin),
            token_id: String::new(),
            expires_at: state.clock.now(),
            purpose: "HOPERAT".into(),
            clearance: Clearance::unlimited(),
            break_glass_reason: None,
            organization: None,
        }),
    };
    let mut report = RelabelReport::default();
    const PAGE: u32 = 200;
    for resource_type in Labeler::labeled_types() {
        let mut offset = 0;
        loop {
            let query = SearchQuery {
                count: PAGE,
                offset,
                sort: vec![haven_store::SortKey {
                    by: SortBy::Id,
                    descending: false,
                }],
                ..SearchQuery::of_type(resource_type)
            };
            let page = state.store.search(&query).await?;
            for version in &page.resources {
                let Some(current) = &version.resource else {
                    continue;
                };
                report.examined += 1;
                let interaction = Interaction::Update {
                    resource_type: resource_type.to_owned(),
                    id: version.id.clone(),
                    resource: current.clone(),
                    if_match: Some(version.version),
                };
                let audit = Arc::new(RequestAudit::new(
                    &haven_model::id::new_time_ordered_id(),
                    None,
                ));
                let recorded = state.security.recorder.store_for(
                    state.store.clone(),
                    &principal,
                    &interaction,
                    &audit,
                );
                let mut tx = LabelingTx {
                    inner: recorded.begin().await?,
                    labeler: labeler.clone(),
                    passed_on: 0,
                    unresolved: Vec::new(),
                };
                let labeled = tx
                    .labeled(resource_type, &version.id, current.clone())
                    .await?;
                if ResourceLabels::of(&labeled) == ResourceLabels::of(current) {
                    continue;
                }
                tx.update(resource_type, &version.id, labeled, Some(version.version))
                    .await?;
                let passed_on = tx.passed_on;
                Box::new(tx).commit().await?;
                report.relabeled += 1 + passed_on;
            }
            if !page.more {
                break;
            }
            offset += u64::from(PAGE);
        }
    }
    Ok(report)
}
