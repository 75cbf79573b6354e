//! FHIR R4 AuditEvents for requests and for authentication events.
//!
//! The shapes follow the IHE Basic Audit Log Patterns (BALP,
//! <https://profiles.ihe.net/ITI/BALP/>) within the R4 AuditEvent definition
//! (<https://hl7.org/fhir/R4/auditevent.html>):
//!
//! - a user agent (BALP "user"): `who.identifier.value` is the username and
//!   `who.reference` the `fhirUser`; it is the requestor when present;
//! - a client agent (BALP "client"): type DICOM 110153 Source Role ID, role
//!   DICOM 110150 Application, `who.identifier.value` the OAuth `client_id`, and
//!   the peer's network address; it is the requestor when there is no user;
//! - a server agent (BALP "server"): type DICOM 110152 Destination Role ID,
//!   `who.identifier.value` the server's identity, never the requestor;
//! - `source.observer` names the server instance, typed Application Server;
//! - entities for the data touched, the patient, and the request id (BALP
//!   `XrequestId`), so one request's records can be found together.

use std::net::IpAddr;

// FHIR base64Binary is standard base64 with padding (RFC 4648 §4).
use aws_lc_rs::digest::{digest, SHA256};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use haven_model::clock::format_instant;
use serde_json::{json, Map, Value};
use time::OffsetDateTime;

const DICOM: &str = "http://dicom.nema.org/resources/ontology/DCM";
const AUDIT_EVENT_TYPE: &str = "http://terminology.hl7.org/CodeSystem/audit-event-type";
const RESTFUL_INTERACTION: &str = "http://hl7.org/fhir/restful-interaction";
const SECURITY_SOURCE_TYPE: &str = "http://terminology.hl7.org/CodeSystem/security-source-type";
const ENTITY_TYPE: &str = "http://terminology.hl7.org/CodeSystem/audit-entity-type";
const OBJECT_ROLE: &str = "http://terminology.hl7.org/CodeSystem/object-role";
const BALP_ENTITY_TYPE: &str = "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType";
const USER_TYPE: &str = "http://terminology.hl7.org/CodeSystem/extra-security-role-type";

/// Haven's own subtype codes for authentication events; DICOM's codes alone do
/// not tell a token refresh from a revocation.
pub const AUTH_EVENT_SYSTEM: &str = "urn:haven:audit-event-subtype";

/// `AuditEvent.action` (R4 value set audit-event-action).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Create,
    Read,
    Update,
    Delete,
    Execute,
}

impl Action {
    pub fn code(self) -> &'static str {
        match self {
            Action::Create => "C",
            Action::Read => "R",
            Action::Update => "U",
            Action::Delete => "D",
            Action::Execute => "E",
        }
    }
}

/// `AuditEvent.outcome` (R4 value set audit-event-outcome).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// 0: success.
    Success,
    /// 4: minor failure; the request was malformed or named something missing.
    BadInput,
    /// 8: serious failure; authentication or authorization refused the request.
    Denied,
    /// 12: major failure; the server failed.
    ServerError,
}

impl Outcome {
    pub fn code(self) -> &'static str {
        match self {
            Outcome::Success => "0",
            Outcome::BadInput => "4",
            Outcome::Denied => "8",
            Outcome::ServerError => "12",
        }
    }
}

/// The person behind a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Who {
    pub username: String,
    /// The `fhirUser` reference, e.g. `Practitioner/123`, when the user has one.
    pub fhir_user: Option<String>,
}

/// Data a request touched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entity {
    /// A resource read or written, by versioned reference,
    /// e.g. `Patient/1/_history/2`.
    Resource(String),
    /// A search, by its query as received, e.g. `Patient?name=smith`; stored in
    /// base64 as `entity.query` requires.
    Query(String),
}

/// What the pipeline knows about a FHIR request once it has been answered.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditFacts {
    /// The FHIR restful interaction code: read, vread, update, patch, delete,
    /// history-instance, history-type, history-system, create, search-type,
    /// search-system, capabilities, transaction, batch or operation; empty
    /// for a request that was not understood (no subtype then).
    pub interaction: String,
    pub action: Action,
    pub outcome: Outcome,
    pub outcome_description: Option<String>,
    pub recorded: OffsetDateTime,
    pub user: Option<Who>,
    pub client_id: Option<String>,
    /// The server's identity, e.g. its FHIR base URL.
    pub server: String,
    /// The name of the server instance that recorded the event.
    pub source_observer: String,
    /// The peer's IP address or host name, without a port.
    pub network_address: Option<String>,
    pub request_id: String,
    pub entities: Vec<Entity>,
    /// The id of the patient the data is about.
    pub patient: Option<String>,
    /// What decided the request, beyond the scopes' verdict.
    pub decision: Option<Decision>,
}

/// The policy that authorizes break-the-glass access, named in `agent.policy`.
pub const BREAK_THE_GLASS_POLICY: &str = "urn:haven:policy:break-the-glass";
/// The entity type of the decision record in an AuditEvent.
pub const DECISION_ENTITY: &str = "urn:haven:audit-entity-type";
/// v3 ActReason, the PurposeOfUse codes.
const PURPOSE_OF_USE: &str = "http://terminology.hl7.org/CodeSystem/v3-ActReason";

/// What decided a request: the scopes used, the clearance, the Consents and
/// labels that let data through, filtered it or masked it, and the outcome.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Decision {
    /// The token's purpose of use (v3 PurposeOfUse code).
    pub purpose: Option<String>,
    pub scopes: Option<String>,
    pub clearance: Option<String>,
    /// Set when the glass was broken: the reason given.
    pub break_glass_reason: Option<String>,
    /// Consents evaluated for the data, with what they did.
    pub consents: Vec<String>,
    /// Lines such as `filtered: ETH (clearance N)` or `masked: PSY`.
    pub labels: Vec<String>,
    /// `permit`, `deny`, or `permit with redaction`.
    pub outcome: String,
}

impl Decision {
    fn entity(&self) -> Value {
        let mut detail = Vec::new();
        let mut add = |kind: &str, value: &str| {
            detail.push(json!({"type": kind, "valueString": value}));
        };
        if let Some(purpose) = &self.purpose {
            add("purpose-of-use", purpose);
        }
        if let Some(scopes) = &self.scopes {
            add("scopes", scopes);
        }
        if let Some(clearance) = &self.clearance {
            add("clearance", clearance);
        }
        if let Some(reason) = &self.break_glass_reason {
            add("break-the-glass-reason", reason);
        }
        for consent in &self.consents {
            add("consent", consent);
        }
        for label in &self.labels {
            add("label", label);
        }
        add("outcome", &self.outcome);
        json!({
            "type": coding(DECISION_ENTITY, "decision", "Access decision"),
            "description": format!("access decision: {}", self.outcome),
            "detail": detail,
        })
    }

    /// The policies the requester's agent acted under: the Consents that
    /// decided, and break the glass.
    fn policies(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .consents
            .iter()
            .filter_map(|c| c.split_whitespace().next())
            .filter(|c| c.starts_with("Consent/"))
            .map(str::to_owned)
            .collect();
        if self.break_glass_reason.is_some() {
            out.push(BREAK_THE_GLASS_POLICY.to_owned());
        }
        out.dedup();
        out
    }
}

/// Builds the AuditEvent of one FHIR request (BALP RESTful patterns): type
/// `rest`, the interaction as subtype.
pub fn audit_event(facts: &AuditFacts) -> Value {
    // A request that was not understood has no interaction to name.
    let subtype = if facts.interaction.is_empty() {
        Vec::new()
    } else {
        vec![json!({"system": RESTFUL_INTERACTION, "code": facts.interaction})]
    };
    let mut event = header(
        coding(AUDIT_EVENT_TYPE, "rest", "Restful Operation"),
        subtype,
        facts.action,
        facts.outcome,
        facts.outcome_description.as_deref(),
        facts.recorded,
    );
    let party = Party {
        user: facts.user.as_ref(),
        client_id: facts.client_id.as_deref(),
        server: &facts.server,
        network_address: facts.network_address.as_deref(),
    };
    let mut agents = party.agents();
    if let Some(decision) = &facts.decision {
        let policies = decision.policies();
        if let Some(requestor) = agents.iter_mut().find(|a| a["requestor"] == true) {
            if !policies.is_empty() {
                requestor["policy"] = json!(policies);
            }
            if let Some(purpose) = &decision.purpose {
                requestor["purposeOfUse"] =
                    json!([{"coding": [coding(PURPOSE_OF_USE, purpose, purpose)]}]);
            }
        }
        if let Some(purpose) = &decision.purpose {
            event.insert(
                "purposeOfEvent".into(),
                json!([{"coding": [coding(PURPOSE_OF_USE, purpose, purpose)]}]),
            );
        }
    }
    event.insert("agent".into(), Value::Array(agents));
    event.insert("source".into(), source(&facts.source_observer));

    let mut entities: Vec<Value> = facts.entities.iter().map(entity).collect();
    if let Some(patient) = &facts.patient {
        entities.push(patient_entity(patient));
    }
    entities.push(request_entity(&facts.request_id));
    if let Some(decision) = &facts.decision {
        entities.push(decision.entity());
    }
    event.insert("entity".into(), Value::Array(entities));
    Value::Object(event)
}

/// An authentication or authorization event; success or failure is the
/// outcome in [`AuthFacts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthEventKind {
    /// A user signing in.
    Login,
    /// The authorize endpoint's decision: approved or denied, with the scopes.
    Authorize,
    /// The token endpoint issuing or refusing a token.
    Token,
    /// A refresh token exchanged for a new access token.
    Refresh,
    Introspection,
    Revocation,
    ClientRegistration,
    KeyRotation,
}

impl AuthEventKind {
    /// `(type, DICOM subtype, action, Haven subtype code)`.
    fn codes(self) -> (Value, Value, Action, &'static str) {
        let authentication = coding(DICOM, "110114", "User Authentication");
        let login = coding(DICOM, "110122", "Login");
        let security_alert = coding(DICOM, "110113", "Security Alert");
        let configuration = coding(DICOM, "110129", "Security Configuration");
        match self {
            AuthEventKind::Login => (authentication, login, Action::Execute, "login"),
            AuthEventKind::Authorize => (authentication, login, Action::Execute, "authorize"),
            AuthEventKind::Token => (authentication, login, Action::Execute, "token"),
            AuthEventKind::Refresh => (authentication, login, Action::Execute, "refresh"),
            AuthEventKind::Introspection => (authentication, login, Action::Read, "introspection"),
            AuthEventKind::Revocation => (authentication, login, Action::Delete, "revocation"),
            AuthEventKind::ClientRegistration => (
                security_alert,
                configuration,
                Action::Create,
                "client-registration",
            ),
            AuthEventKind::KeyRotation => (
                security_alert,
                configuration,
                Action::Update,
                "key-rotation",
            ),
        }
    }
}

/// What the authorization server knows about an authentication event.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthFacts {
    pub outcome: Outcome,
    /// Why it failed, e.g. the RFC 6749 error code `invalid_grant`.
    pub outcome_description: Option<String>,
    pub recorded: OffsetDateTime,
    pub user: Option<Who>,
    pub client_id: Option<String>,
    pub server: String,
    pub source_observer: String,
    pub network_address: Option<String>,
    pub request_id: String,
    /// The scopes requested or granted, space-separated as in OAuth.
    pub scopes: Option<String>,
    /// A [`token_fingerprint`] of the token concerned; never the token itself.
    pub token_fingerprint: Option<String>,
    /// The patient the event is about (one chosen, shown or launched for), so
    /// the event is in that patient's access log.
    pub patient: Option<String>,
}

/// Builds the AuditEvent of an authentication or authorization event. Logins
/// and token work are DICOM 110114 User Authentication; client registration and
/// key rotation are DICOM 110113 Security Alert (Security Configuration).
pub fn auth_event(kind: AuthEventKind, facts: &AuthFacts) -> Value {
    let (event_type, dicom_subtype, action, haven_code) = kind.codes();
    let mut event = header(
        event_type,
        vec![
            dicom_subtype,
            json!({"system": AUTH_EVENT_SYSTEM, "code": haven_code}),
        ],
        action,
        facts.outcome,
        facts.outcome_description.as_deref(),
        facts.recorded,
    );
    let party = Party {
        user: facts.user.as_ref(),
        client_id: facts.client_id.as_deref(),
        server: &facts.server,
        network_address: facts.network_address.as_deref(),
    };
    event.insert("agent".into(), Value::Array(party.agents()));
    event.insert("source".into(), source(&facts.source_observer));

    let mut entities = Vec::new();
    if let Some(scopes) = &facts.scopes {
        entities.push(json!({
            "type": coding(ENTITY_TYPE, "2", "System Object"),
            "description": "OAuth scopes",
            "detail": [{"type": "scope", "valueString": scopes}],
        }));
    }
    if let Some(fingerprint) = &facts.token_fingerprint {
        entities.push(json!({
            "type": coding(ENTITY_TYPE, "2", "System Object"),
            "description": "OAuth token",
            "detail": [{"type": "token-sha256", "valueString": fingerprint}],
        }));
    }
    if let Some(patient) = &facts.patient {
        entities.push(patient_entity(patient));
    }
    entities.push(request_entity(&facts.request_id));
    event.insert("entity".into(), Value::Array(entities));
    Value::Object(event)
}

/// The lowercase hex SHA-256 of a token: enough to match audit records about
/// the same token without storing anything that could be replayed.
pub fn token_fingerprint(token: &str) -> String {
    digest(&SHA256, token.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn header(
    event_type: Value,
    subtype: Vec<Value>,
    action: Action,
    outcome: Outcome,
    outcome_description: Option<&str>,
    recorded: OffsetDateTime,
) -> Map<String, Value> {
    let mut event = Map::new();
    event.insert("resourceType".into(), json!("AuditEvent"));
    event.insert("type".into(), event_type);
    if !subtype.is_empty() {
        event.insert("subtype".into(), Value::Array(subtype));
    }
    event.insert("action".into(), json!(action.code()));
    event.insert("recorded".into(), json!(format_instant(recorded)));
    event.insert("outcome".into(), json!(outcome.code()));
    if let Some(description) = outcome_description {
        event.insert("outcomeDesc".into(), json!(description));
    }
    event
}

/// Who took part in a request.
struct Party<'a> {
    user: Option<&'a Who>,
    client_id: Option<&'a str>,
    server: &'a str,
    network_address: Option<&'a str>,
}

impl Party<'_> {
    fn agents(&self) -> Vec<Value> {
        let mut agents = Vec::new();
        if let Some(user) = self.user {
            let mut who = json!({"identifier": {"value": user.username}});
            if let Some(fhir_user) = &user.fhir_user {
                who["reference"] = json!(fhir_user);
            }
            agents.push(json!({
                "type": {"coding": [coding(USER_TYPE, "humanuser", "human user")]},
                "who": who,
                "requestor": true,
            }));
        }
        // An unauthenticated request still has a peer worth recording.
        if self.client_id.is_some() || self.network_address.is_some() {
            let mut client = json!({
                "type": {"coding": [coding(DICOM, "110153", "Source Role ID")]},
                "role": [{"coding": [coding(DICOM, "110150", "Application")]}],
                "requestor": self.user.is_none(),
            });
            if let Some(client_id) = self.client_id {
                client["who"] = json!({"identifier": {"value": client_id}});
            }
            if let Some(address) = self.network_address {
                client["network"] = network(address);
            }
            agents.push(client);
        }
        agents.push(json!({
            "type": {"coding": [coding(DICOM, "110152", "Destination Role ID")]},
            "who": {"identifier": {"value": self.server}},
            "requestor": false,
        }));
        agents
    }
}

/// `agent.network` with its R4 type: 2 for an IP address, 1 for a machine name.
fn network(address: &str) -> Value {
    let kind = if address.parse::<IpAddr>().is_ok() {
        "2"
    } else {
        "1"
    };
    json!({"address": address, "type": kind})
}

fn source(observer: &str) -> Value {
    json!({
        "observer": {"display": observer},
        "type": [coding(SECURITY_SOURCE_TYPE, "4", "Application Server")],
    })
}

fn entity(entity: &Entity) -> Value {
    match entity {
        Entity::Resource(reference) => json!({
            "what": {"reference": reference},
            "type": coding(ENTITY_TYPE, "2", "System Object"),
            "role": coding(OBJECT_ROLE, "4", "Domain Resource"),
        }),
        Entity::Query(query) => json!({
            "type": coding(ENTITY_TYPE, "2", "System Object"),
            "role": coding(OBJECT_ROLE, "24", "Query"),
            "query": STANDARD.encode(query.as_bytes()),
        }),
    }
}

fn patient_entity(patient: &str) -> Value {
    json!({
        "what": {"reference": format!("Patient/{patient}")},
        "type": coding(ENTITY_TYPE, "1", "Person"),
        "role": coding(OBJECT_ROLE, "1", "Patient"),
    })
}

fn request_entity(request_id: &str) -> Value {
    json!({
        "what": {"identifier": {"value": request_id}},
        "type": coding(BALP_ENTITY_TYPE, "XrequestId", "X-Request-Id"),
    })
}

fn coding(system: &str, code: &str, display: &str) -> Value {
    json!({"system": system, "code": code, "display": display})
}

#[cfg(test)]
mod tests {
    use super::*;
    use haven_model::validate::validate_resource;
    use time::macros::datetime;

    fn facts() -> AuditFacts {
        AuditFacts {
            interaction: "read".into(),
            action: Action::Read,
            outcome: Outcome::Success,
            outcome_description: None,
            recorded: datetime!(2026-03-01 10:00:00.5 UTC),
            user: Some(Who {
                username: "alice".into(),
                fhir_user: Some("Practitioner/p1".into()),
            }),
            client_id: Some("growth-chart".into()),
            server: "https://haven.test/fhir".into(),
            source_observer: "haven-1".into(),
            network_address: Some("192.0.2.7".into()),
            request_id: "req-1".into(),
            entities: vec![Entity::Resource("Patient/1/_history/3".into())],
            patient: Some("1".into()),
            decision: None,
        }
    }

    #[test]
    fn the_decision_names_purpose_consents_labels_and_break_the_glass() {
        let mut f = facts();
        f.decision = Some(Decision {
            purpose: Some("BTG".into()),
            scopes: Some("user/*.rs".into()),
            clearance: Some("V:*".into()),
            break_glass_reason: Some("unconscious patient".into()),
            consents: vec!["Consent/c1 overridden".into()],
            labels: vec!["overridden: ETH".into()],
            outcome: "permit".into(),
        });
        let event = audit_event(&f);
        assert_valid(&event);
        assert_eq!(event["purposeOfEvent"][0]["coding"][0]["code"], "BTG");
        let agent = &event["agent"][0];
        assert_eq!(
            agent["policy"],
            json!(["Consent/c1", BREAK_THE_GLASS_POLICY])
        );
        let decision = event["entity"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["type"]["system"] == DECISION_ENTITY)
            .unwrap();
        let text = decision.to_string();
        assert!(text.contains("unconscious patient") && text.contains("Consent/c1 overridden"));
    }

    fn auth_facts() -> AuthFacts {
        AuthFacts {
            outcome: Outcome::Success,
            outcome_description: None,
            recorded: datetime!(2026-03-01 10:00:00 UTC),
            user: Some(Who {
                username: "alice".into(),
                fhir_user: None,
            }),
            client_id: Some("growth-chart".into()),
            server: "https://haven.test/fhir".into(),
            source_observer: "haven-1".into(),
            network_address: Some("client.example.org".into()),
            request_id: "req-2".into(),
            scopes: Some("launch/patient patient/*.rs".into()),
            token_fingerprint: Some(token_fingerprint("secret-token")),
            patient: None,
        }
    }

    fn assert_valid(resource: &Value) {
        let errors: Vec<_> = validate_resource(resource)
            .into_iter()
            .filter(|issue| issue.is_error())
            .collect();
        assert!(errors.is_empty(), "{errors:?} in {resource:#}");
    }

    #[test]
    fn a_read_event_has_the_balp_rest_shape() {
        let event = audit_event(&facts());
        assert_eq!(event["type"]["code"], "rest");
        assert_eq!(event["subtype"][0]["system"], RESTFUL_INTERACTION);
        assert_eq!(event["subtype"][0]["code"], "read");
        assert_eq!(event["action"], "R");
        assert_eq!(event["outcome"], "0");
        assert_eq!(event["recorded"], "2026-03-01T10:00:00.500000Z");
        assert_eq!(event["source"]["observer"]["display"], "haven-1");
        assert_eq!(event["source"]["type"][0]["code"], "4");
        assert!(event.get("outcomeDesc").is_none());
    }

    #[test]
    fn the_user_requests_and_the_client_and_server_do_not() {
        let event = audit_event(&facts());
        let agents = event["agent"].as_array().unwrap();
        assert_eq!(agents.len(), 3);
        assert_eq!(agents[0]["who"]["identifier"]["value"], "alice");
        assert_eq!(agents[0]["who"]["reference"], "Practitioner/p1");
        assert_eq!(agents[0]["requestor"], true);
        assert_eq!(agents[1]["who"]["identifier"]["value"], "growth-chart");
        assert_eq!(agents[1]["role"][0]["coding"][0]["code"], "110150");
        assert_eq!(
            agents[1]["network"],
            json!({"address": "192.0.2.7", "type": "2"})
        );
        assert_eq!(agents[1]["requestor"], false);
        assert_eq!(
            agents[2]["who"]["identifier"]["value"],
            "https://haven.test/fhir"
        );
        assert_eq!(agents[2]["requestor"], false);
    }

    #[test]
    fn without_a_user_the_client_is_the_requestor() {
        let mut f = facts();
        f.user = None;
        let event = audit_event(&f);
        assert_eq!(
            event["agent"][0]["who"]["identifier"]["value"],
            "growth-chart"
        );
        assert_eq!(event["agent"][0]["requestor"], true);
    }

    #[test]
    fn an_anonymous_refusal_records_the_peer_address_and_the_reason() {
        let mut f = facts();
        f.user = None;
        f.client_id = None;
        f.outcome = Outcome::Denied;
        f.outcome_description = Some("missing bearer token".into());
        f.entities.clear();
        f.patient = None;
        let event = audit_event(&f);
        assert_eq!(event["outcome"], "8");
        assert_eq!(event["outcomeDesc"], "missing bearer token");
        assert_eq!(event["agent"][0]["network"]["address"], "192.0.2.7");
        assert!(event["agent"][0].get("who").is_none());
        assert_eq!(event["agent"].as_array().unwrap().len(), 2);
        assert_valid(&event);
    }

    #[test]
    fn entities_carry_the_resource_the_query_the_patient_and_the_request_id() {
        let mut f = facts();
        f.interaction = "search-type".into();
        f.entities = vec![
            Entity::Query("Observation?patient=1&code=8867-4".into()),
            Entity::Resource("Observation/9/_history/1".into()),
        ];
        let event = audit_event(&f);
        let entities = event["entity"].as_array().unwrap();
        assert_eq!(entities[0]["role"]["code"], "24");
        assert_eq!(
            entities[0]["query"],
            "T2JzZXJ2YXRpb24/cGF0aWVudD0xJmNvZGU9ODg2Ny00"
        );
        assert_eq!(entities[1]["what"]["reference"], "Observation/9/_history/1");
        assert_eq!(entities[1]["role"]["code"], "4");
        assert_eq!(entities[2]["what"]["reference"], "Patient/1");
        assert_eq!(entities[2]["role"]["code"], "1");
        assert_eq!(entities[3]["what"]["identifier"]["value"], "req-1");
        assert_eq!(entities[3]["type"]["code"], "XrequestId");
    }

    #[test]
    fn outcomes_and_actions_use_the_r4_codes() {
        let outcomes = [
            (Outcome::Success, "0"),
            (Outcome::BadInput, "4"),
            (Outcome::Denied, "8"),
            (Outcome::ServerError, "12"),
        ];
        for (outcome, code) in outcomes {
            assert_eq!(outcome.code(), code);
        }
        let actions = [
            (Action::Create, "C"),
            (Action::Read, "R"),
            (Action::Update, "U"),
            (Action::Delete, "D"),
            (Action::Execute, "E"),
        ];
        for (action, code) in actions {
            assert_eq!(action.code(), code);
        }
    }

    #[test]
    fn the_validator_used_here_does_reject_a_malformed_event() {
        // Guards the validity tests below against passing vacuously.
        let mut event = audit_event(&facts());
        event["outcome"] = json!(0);
        event["agent"][0]["requestor"] = json!("yes");
        let errors = validate_resource(&event)
            .into_iter()
            .filter(|issue| issue.is_error())
            .count();
        assert!(errors >= 2, "expected errors, got {errors}");
    }

    #[test]
    fn every_request_event_is_a_valid_r4_audit_event() {
        let interactions = [
            ("read", Action::Read),
            ("vread", Action::Read),
            ("update", Action::Update),
            ("patch", Action::Update),
            ("delete", Action::Delete),
            ("history-instance", Action::Read),
            ("history-type", Action::Read),
            ("history-system", Action::Read),
            ("create", Action::Create),
            ("search-type", Action::Execute),
            ("search-system", Action::Execute),
            ("capabilities", Action::Read),
            ("transaction", Action::Execute),
            ("batch", Action::Execute),
            ("operation", Action::Execute),
        ];
        let outcomes = [
            Outcome::Success,
            Outcome::BadInput,
            Outcome::Denied,
            Outcome::ServerError,
        ];
        for (interaction, action) in interactions {
            for outcome in outcomes {
                let mut f = facts();
                f.interaction = interaction.into();
                f.action = action;
                f.outcome = outcome;
                f.outcome_description = Some("described".into());
                f.entities.push(Entity::Query("_count=10".into()));
                assert_valid(&audit_event(&f));
            }
        }
    }

    #[test]
    fn every_auth_event_is_a_valid_r4_audit_event() {
        let kinds = [
            AuthEventKind::Login,
            AuthEventKind::Authorize,
            AuthEventKind::Token,
            AuthEventKind::Refresh,
            AuthEventKind::Introspection,
            AuthEventKind::Revocation,
            AuthEventKind::ClientRegistration,
            AuthEventKind::KeyRotation,
        ];
        for kind in kinds {
            assert_valid(&auth_event(kind, &auth_facts()));
            let mut refused = auth_facts();
            refused.outcome = Outcome::Denied;
            refused.outcome_description = Some("invalid_grant".into());
            refused.user = None;
            refused.scopes = None;
            refused.token_fingerprint = None;
            assert_valid(&auth_event(kind, &refused));
        }
    }

    #[test]
    fn a_failed_login_is_a_user_authentication_event_with_the_reason() {
        let mut f = auth_facts();
        f.outcome = Outcome::Denied;
        f.outcome_description = Some("wrong password".into());
        let event = auth_event(AuthEventKind::Login, &f);
        assert_eq!(event["type"]["code"], "110114");
        assert_eq!(event["subtype"][0]["code"], "110122");
        assert_eq!(event["subtype"][1]["code"], "login");
        assert_eq!(event["outcome"], "8");
        assert_eq!(event["outcomeDesc"], "wrong password");
        assert_eq!(event["agent"][0]["who"]["identifier"]["value"], "alice");
        assert_eq!(event["agent"][1]["network"]["type"], "1");
    }

    #[test]
    fn key_rotation_is_a_security_configuration_alert() {
        let event = auth_event(AuthEventKind::KeyRotation, &auth_facts());
        assert_eq!(event["type"]["code"], "110113");
        assert_eq!(event["subtype"][0]["code"], "110129");
        assert_eq!(event["subtype"][1]["code"], "key-rotation");
        assert_eq!(event["action"], "U");
    }

    #[test]
    fn an_auth_event_stores_scopes_and_a_token_fingerprint_but_never_the_token() {
        let event = auth_event(AuthEventKind::Token, &auth_facts());
        let text = event.to_string();
        assert!(!text.contains("secret-token"));
        let entities = event["entity"].as_array().unwrap();
        assert_eq!(
            entities[0]["detail"][0]["valueString"],
            "launch/patient patient/*.rs"
        );
        assert_eq!(
            entities[1]["detail"][0]["valueString"],
            token_fingerprint("secret-token")
        );
        assert_eq!(entities[2]["what"]["identifier"]["value"], "req-2");
    }

    #[test]
    fn token_fingerprints_are_sha256_in_lowercase_hex() {
        // `printf abc | sha256sum`.
        assert_eq!(
            token_fingerprint("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
