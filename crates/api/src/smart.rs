//! The SMART on FHIR security stages: bearer tokens authenticate (stage 2), and
//! the token's scopes and launch context authorize (stage 3) every interaction,
//! every Bundle entry, and, through the store guard, every resource touched.
//!
//! - A type or interaction outside the scopes is 403, never an empty result.
//! - `patient/` scopes confine everything to the compartment of the patient in
//!   context (CompartmentDefinition Patient); v2 search restrictions
//!   (`patient/Observation.rs?category=laboratory`) must match the content.
//! - Only the capability statement may be read without a token.

use std::sync::Arc;

use async_trait::async_trait;
use haven_auth::registry::Role;
use haven_auth::scope::{Context, Permission, ScopeSet};
use haven_auth::{AccessContext, AuthServer, TokenRejection};
use haven_model::registry;
use haven_model::search_value;
use haven_store::{Access, AccessRule, ContentFilter, Criterion, TypeAccess};
use http::header::AUTHORIZATION;
use serde_json::Value;

use crate::error::ApiError;
use crate::guard::{ContentGuard, ContentRule, Unguarded};
use crate::interaction::{Interaction, Target};
use crate::pipeline::{Authenticator, Authorizer, Principal, RequestHead};
use crate::search_params::{criterion_for, SearchContext};

/// Stage 2: `Authorization: Bearer <token>` verified by the authorization server.
#[derive(Debug, Clone)]
pub struct SmartAuthenticator {
    pub server: Arc<AuthServer>,
}

#[async_trait]
impl Authenticator for SmartAuthenticator {
    async fn authenticate(&self, head: &RequestHead<'_>) -> Result<Principal, ApiError> {
        let Some(value) = head.headers.get(AUTHORIZATION) else {
            // Anonymous: stage 3 lets it read the capability statement only.
            return Ok(Principal::default());
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                let (scheme, token) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .filter(|t| !t.is_empty())
            .ok_or_else(|| ApiError::InvalidToken("not a bearer token".into()))?;
        match self.server.verify_access_token(token).await {
            Ok(access) => Ok(Principal {
                subject: Some(access.subject.clone()),
                access: Some(access),
            }),
            Err(TokenRejection::Unavailable) => Err(ApiError::Store(
                haven_store::StoreError::Unavailable("token storage".into()),
            )),
            Err(rejection) => Err(ApiError::InvalidToken(rejection.to_string())),
        }
    }
}

/// Stage 3 and the store guard, from the token's scopes.
#[derive(Debug, Clone, Default)]
pub struct SmartAuthorizer;

/// The one refusal text: it does not say which check failed.
pub(crate) const REFUSED: &str = "the access token does not allow this request";

fn forbidden(reason: impl Into<String>) -> ApiError {
    tracing::debug!(reason = %reason.into(), "refused by the token's scopes");
    ApiError::Forbidden(REFUSED.into())
}

fn permission_word(permission: Permission) -> &'static str {
    match permission {
        Permission::Create => "create",
        Permission::Read => "read",
        Permission::Update => "update",
        Permission::Delete => "delete",
        Permission::Search => "search",
    }
}

/// Whether some scope grants `permission` on `resource_type`.
fn require(
    access: &AccessContext,
    resource_type: &str,
    permission: Permission,
) -> Result<(), ApiError> {
    if access
        .scopes
        .grants_for(resource_type, permission)
        .is_empty()
    {
        return Err(forbidden(format!(
            "the granted scopes do not allow {} of {resource_type}",
            permission_word(permission)
        )));
    }
    Ok(())
}

/// Whether the caller may only see one patient's compartment for this type
/// and permission: every grant is a `patient/` grant.
fn confined_to_patient(
    access: &AccessContext,
    resource_type: &str,
    permission: Permission,
) -> bool {
    let grants = access.scopes.grants_for(resource_type, permission);
    !grants.is_empty() && grants.iter().all(|g| g.context == Context::Patient)
}

/// The patient id a search value names: `123`, `Patient/123` or an absolute
/// URL ending in `Patient/123`.
pub(crate) fn named_patient(value: &str) -> Option<&str> {
    let value = value.split("/_history/").next().unwrap_or(value);
    match value.rsplit_once("Patient/") {
        Some((_, id)) => Some(id),
        None if !value.contains('/') => Some(value),
        None => None,
    }
}

/// A search that names another patient than the one in context is refused
/// outright: answering it with an empty page would hide the refusal.
/// A token confined to one patient may search only that patient's compartment.
fn check_compartment_patient(
    access: &AccessContext,
    resource_type: &str,
    patient: &str,
) -> Result<(), ApiError> {
    if confined_to_patient(access, resource_type, Permission::Search)
        && access.patient.as_deref() != Some(patient)
    {
        return Err(forbidden(
            "the token only gives access to the patient in context",
        ));
    }
    Ok(())
}

fn check_named_patients(
    access: &AccessContext,
    resource_type: &str,
    params: &[(String, String)],
) -> Result<(), ApiError> {
    if !confined_to_patient(access, resource_type, Permission::Search) {
        return Ok(());
    }
    let Some(patient) = access.patient.as_deref() else {
        return Err(forbidden(
            "the token has patient scopes but no patient in context",
        ));
    };
    let compartment = registry::compartment_params("Patient", resource_type).unwrap_or(&[]);
    for (name, value) in params {
        // A chain's value names the chained resource's field, not a patient,
        // and so does a modifier other than a target type (`:missing=true`).
        if name.contains('.') {
            continue;
        }
        let mut parts = name.split(':');
        let code = parts.next().unwrap_or(name);
        if parts.next().is_some_and(|m| !registry::is_resource_type(m)) {
            continue;
        }
        // Any reference parameter that can point at a Patient names one
        // (`patient`, `subject`, ...), as do the compartment's own parameters.
        let targets_patients = registry::search_param(resource_type, code)
            .is_some_and(|p| p.target.iter().any(|t| t == "Patient"));
        let names_patient = (resource_type == "Patient" && (code == "_id" || code == "link"))
            || compartment.iter().any(|p| p == code)
            || targets_patients;
        if !names_patient {
            continue;
        }
        for one in value.split(',') {
            if named_patient(one.trim()).is_some_and(|id| id != patient) {
                return Err(forbidden(
                    "the token only gives access to the patient in context",
                ));
            }
        }
    }
    Ok(())
}

#[async_trait]
impl Authorizer for SmartAuthorizer {
    async fn authorize(&self, who: &Principal, what: &Interaction) -> Result<(), ApiError> {
        if matches!(what, Interaction::Capabilities) {
            return Ok(());
        }
        let Some(access) = &who.access else {
            return Err(ApiError::Unauthenticated(
                "an access token is required".into(),
            ));
        };
        // The audit trail is for administrators, the patient it is about (the
        // guard confines them to their own record), and Backend Services
        // clients (whose token's subject is the client itself).
        if what.resource_type() == Some("AuditEvent") {
            let client_token = access.role.is_none() && access.subject == access.client_id;
            if !(client_token || matches!(access.role, Some(Role::Admin | Role::Patient))) {
                return Err(forbidden("only administrators read the audit trail"));
            }
        }
        match what {
            Interaction::Capabilities => Ok(()),
            Interaction::VerifyAuditTrail => {
                require(access, "AuditEvent", Permission::Read)?;
                require(access, "AuditEvent", Permission::Search)
            }
            // Each entry is authorized on its own by the pipeline's gate.
            Interaction::Batch { .. } | Interaction::Transaction { .. } => Ok(()),
            Interaction::Read { resource_type, .. } | Interaction::VRead { resource_type, .. } => {
                require(access, resource_type, Permission::Read)
            }
            Interaction::Validate {
                resource_type, id, ..
            } => match id {
                Some(_) => require(access, resource_type, Permission::Read),
                None => require(access, resource_type, Permission::Create)
                    .or_else(|_| require(access, resource_type, Permission::Update)),
            },
            Interaction::Create {
                resource_type,
                if_none_exist,
                ..
            } => {
                require(access, resource_type, Permission::Create)?;
                if if_none_exist.is_some() {
                    require(access, resource_type, Permission::Search)?;
                }
                Ok(())
            }
            Interaction::Update { resource_type, .. } => {
                require(access, resource_type, Permission::Update)
            }
            Interaction::ConditionalUpdate { resource_type, .. } => {
                require(access, resource_type, Permission::Update)?;
                require(access, resource_type, Permission::Search)
            }
            Interaction::Patch {
                resource_type,
                target,
                ..
            } => {
                require(access, resource_type, Permission::Update)?;
                if matches!(target, Target::Criteria(_)) {
                    require(access, resource_type, Permission::Search)?;
                }
                Ok(())
            }
            Interaction::Delete { resource_type, .. } => {
                require(access, resource_type, Permission::Delete)
            }
            Interaction::ConditionalDelete { resource_type, .. } => {
                require(access, resource_type, Permission::Delete)?;
                require(access, resource_type, Permission::Search)
            }
            Interaction::History {
                resource_type: Some(resource_type),
                id: Some(_),
                ..
            } => require(access, resource_type, Permission::Read),
            Interaction::History {
                resource_type: Some(resource_type),
                ..
            } => require(access, resource_type, Permission::Search),
            Interaction::Search {
                resource_type: Some(resource_type),
                params,
            } => {
                require(access, resource_type, Permission::Search)?;
                check_named_patients(access, resource_type, params)
            }
            Interaction::CompartmentSearch {
                patient,
                resource_type,
                params,
            } => {
                require(access, resource_type, Permission::Search)?;
                check_compartment_patient(access, resource_type, patient)?;
                check_named_patients(access, resource_type, params)
            }
            Interaction::Everything { patient, .. } => {
                // The patient's record, searched: the Patient must be
                // searchable; the guard keeps whatever else the scopes do not
                // reach out of the result.
                require(access, "Patient", Permission::Search)?;
                check_compartment_patient(access, "Patient", patient)
            }
            Interaction::History {
                resource_type: None,
                params,
                ..
            }
            | Interaction::Search {
                resource_type: None,
                params,
            } => {
                // Types named in `_type` must each be allowed; the guard keeps
                // everything else out of the results.
                for resource_type in crate::search_params::listed_types(params) {
                    require(access, &resource_type, Permission::Search)?;
                }
                if access
                    .scopes
                    .resource_scopes()
                    .any(|s| s.permissions.search)
                {
                    Ok(())
                } else {
                    Err(forbidden("the granted scopes do not allow searching"))
                }
            }
        }
    }

    fn guard(&self, who: &Principal) -> Arc<dyn ContentGuard> {
        match &who.access {
            Some(access) => Arc::new(ScopeGuard {
                scopes: Arc::new(access.scopes.clone()),
                patient: access.patient.clone(),
            }),
            // Anonymous callers reach nothing but the capability statement.
            None => Arc::new(Unguarded),
        }
    }
}

/// The content rule of a token's scopes.
#[derive(Debug, Clone)]
struct ScopeGuard {
    scopes: Arc<ScopeSet>,
    patient: Option<String>,
}

/// Whether some grant reaches the type of every target of a Provenance.
fn targets_reachable(scopes: &ScopeSet, permission: Permission, provenance: &Value) -> bool {
    provenance["target"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["reference"].as_str())
        .all(|reference| {
            let path = reference.split("/_history/").next().unwrap_or(reference);
            let target_type = path.rsplit('/').nth(1).unwrap_or_default();
            !scopes.grants_for(target_type, permission).is_empty()
        })
}

/// Whether the scopes let `permission` touch this resource: some grant for its
/// type whose compartment (for `patient/`) and restrictions it satisfies.
fn admits(
    scopes: &ScopeSet,
    patient: Option<&str>,
    permission: Permission,
    resource: &Value,
) -> bool {
    let Some(resource_type) = resource.get("resourceType").and_then(Value::as_str) else {
        return false;
    };
    // A Provenance tells about its targets: it is open only to callers whose
    // scopes reach the targets' types.
    if resource_type == "Provenance" && !targets_reachable(scopes, permission, resource) {
        return false;
    }
    scopes
        .grants_for(resource_type, permission)
        .iter()
        .any(|grant| {
            let in_compartment = match (grant.context, permission) {
                // Reading: anything in the patient's compartment.
                (Context::Patient, Permission::Read | Permission::Search) => {
                    patient.is_some_and(|p| search_value::in_patient_compartment(resource, p))
                }
                // Writing: every patient the resource names must be the one in
                // context, or a write could put data into another patient's chart.
                (Context::Patient, _) => patient.is_some_and(|p| {
                    let patients = search_value::patient_compartments(resource);
                    !patients.is_empty() && patients.iter().all(|named| named == p)
                }),
                (Context::User | Context::System, _) => true,
            };
            // A restriction that cannot be evaluated refuses (fail closed).
            in_compartment
                && (grant.restrictions.is_empty()
                    || search_value::matches(resource, grant.restrictions).unwrap_or(false))
        })
}

impl ContentGuard for ScopeGuard {
    fn rule(&self, permission: Permission) -> ContentRule {
        // A wildcard grant without compartment or restriction sees everything.
        let open = self.scopes.resource_scopes().any(|s| {
            s.resource_type.is_none()
                && s.context != Context::Patient
                && s.restrictions.is_empty()
                && s.permissions.has(permission)
        });
        if open {
            return ContentRule::Unrestricted;
        }
        let scopes = self.scopes.clone();
        let patient = self.patient.clone();
        ContentRule::Only(ContentFilter::new(move |resource| {
            admits(&scopes, patient.as_deref(), permission, resource)
        }))
    }

    fn confinement(&self, resource_type: &str, permission: Permission) -> Option<String> {
        let grants = self.scopes.grants_for(resource_type, permission);
        let confined = !grants.is_empty() && grants.iter().all(|g| g.context == Context::Patient);
        confined.then(|| self.patient.clone()).flatten()
    }

    fn access(&self, permission: Permission) -> Option<Access> {
        Some(Arc::new(ScopeAccess {
            guard: self.clone(),
            permission,
        }))
    }
}

/// A token's scopes as criteria per type: for reading and searching, the same
/// decision as [`admits`], in the form the store compiles into a search.
#[derive(Debug)]
struct ScopeAccess {
    guard: ScopeGuard,
    permission: Permission,
}

impl AccessRule for ScopeAccess {
    fn for_type(&self, resource_type: &str) -> TypeAccess {
        let scopes = &self.guard.scopes;
        let grants = scopes.grants_for(resource_type, self.permission);
        if grants.is_empty() {
            return TypeAccess::Nothing;
        }
        let mut alternatives = Vec::new();
        for grant in grants {
            let compartment = match grant.context {
                Context::Patient => match &self.guard.patient {
                    Some(patient) => Criterion::PatientCompartment(patient.clone()),
                    None => Criterion::Never,
                },
                Context::User | Context::System => Criterion::Always,
            };
            // A restriction the content rule cannot evaluate refuses every
            // read there, so it admits nothing here either (fail closed).
            let probe = serde_json::json!({"resourceType": resource_type});
            let restriction = if grant.restrictions.is_empty() {
                Criterion::Always
            } else if search_value::matches(&probe, grant.restrictions).is_err() {
                Criterion::Never
            } else {
                criterion_for(resource_type, grant.restrictions, &restriction_context())
                    .unwrap_or(Criterion::Never)
            };
            alternatives.push(compartment.and(restriction));
        }
        let mut criterion = if alternatives.contains(&Criterion::Always) {
            Criterion::Always
        } else {
            Criterion::Any(alternatives)
        };
        if resource_type == "Provenance" {
            // As in `targets_reachable`: every target's type must be reachable.
            let reachable: Vec<String> = haven_model::registry::resource_types()
                .filter(|t| !scopes.grants_for(t, self.permission).is_empty())
                .map(str::to_owned)
                .collect();
            criterion = criterion.and(Criterion::Not(Box::new(Criterion::ReferenceOutside {
                param: "target".into(),
                types: reachable,
            })));
        }
        match criterion {
            Criterion::Always => TypeAccess::All,
            Criterion::Never => TypeAccess::Nothing,
            other => TypeAccess::Only(other),
        }
    }
}

/// The context scope restrictions are parsed in: they name no server URL, and
/// an `ap` date in a scope is measured from a fixed instant rather than from
/// the moment of each request.
fn restriction_context() -> SearchContext<'static> {
    SearchContext {
        base_url: "",
        now: time::OffsetDateTime::UNIX_EPOCH,
        default_count: 0,
        max_count: 0,
        strict: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn scopes(text: &str) -> ScopeSet {
        ScopeSet::parse(text)
    }

    #[test]
    fn a_patient_scope_admits_only_its_patients_compartment() {
        let s = scopes("patient/Observation.rs");
        let own = json!({"resourceType": "Observation", "subject": {"reference": "Patient/a"}});
        let other = json!({"resourceType": "Observation", "subject": {"reference": "Patient/b"}});
        assert!(admits(&s, Some("a"), Permission::Read, &own));
        assert!(!admits(&s, Some("a"), Permission::Read, &other));
        assert!(!admits(&s, None, Permission::Read, &own));
        assert!(!admits(&s, Some("a"), Permission::Update, &own));
    }

    #[test]
    fn a_restricted_scope_admits_only_matching_content() {
        let s = scopes("user/Observation.rs?category=laboratory");
        let lab = json!({"resourceType": "Observation", "category": [{"coding": [{"code": "laboratory"}]}]});
        let vitals = json!({"resourceType": "Observation", "category": [{"coding": [{"code": "vital-signs"}]}]});
        assert!(admits(&s, None, Permission::Read, &lab));
        assert!(!admits(&s, None, Permission::Read, &vitals));
    }

    #[test]
    fn search_values_naming_a_patient_are_recognised() {
        assert_eq!(named_patient("123"), Some("123"));
        assert_eq!(named_patient("Patient/123"), Some("123"));
        assert_eq!(
            named_patient("https://x/fhir/Patient/123/_history/2"),
            Some("123")
        );
        assert_eq!(named_patient("Group/9"), None);
    }
}
