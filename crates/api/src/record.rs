//! Stage 7 and what every write carries: the AuditEvent of each request (R5)
//! and the Provenance of each written version (R8), from the one clock (R4).
//!
//! The recorder places a [`RecordedStore`] under the request's guard. It notes
//! every version the store hands out or writes, and when a write transaction
//! commits it first adds, in that same transaction, the request's AuditEvents
//! and one server-made Provenance per written version: the data, its Provenance
//! and its audit record are stored together or not at all. Requests that write
//! nothing (reads, searches, refusals, failures) are recorded after they ran,
//! through the group committer, before the response leaves; if that fails the
//! client gets a 500 instead of the data (fail closed). A batch commits each
//! entry's writes with that entry's events and is recorded as a whole at the
//! end; a request whose answer fails after its writes committed gets a second,
//! failure record.
//!
//! One request yields one AuditEvent per patient whose data it touched (IHE
//! BALP: one event per patient, so a patient's access log holds no other
//! patient's references), and one more for data about no patient.

use std::collections::{HashMap, HashSet};
use std::fmt::Debug;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use haven_audit::{
    audit_event, auth_event, provenance, Action, Activity, AuditFacts, AuthEventKind, AuthFacts,
    Decision, Entity, Outcome, Who,
};
use haven_model::clock::Clock;
use haven_model::id::new_time_ordered_id;
use haven_model::search_value::{patient_compartments, PROVENANCE_TARGET_PATIENT};
use haven_store::{
    AuditLog, AuditPage, AuditQuery, AuditRecord, AuditWriter, AuthRecords, Backend, Change,
    HistoryPage, HistoryQuery, ResourceVersion, Result, SearchPage, SearchQuery, StampedEvent,
    Store, StoreError, StoreTx,
};
use http::StatusCode;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::interaction::{Interaction, Target};
use crate::pipeline::{Principal, RequestRecord};

/// The tag that marks a Provenance the server made; such a Provenance cannot be
/// changed or deleted through the API, and no client may send one.
pub const SERVER_PROVENANCE_TAG: (&str, &str) = ("urn:haven:provenance", "server");

/// What one request touched, gathered while it runs.
#[derive(Debug)]
pub struct RequestAudit {
    pub request_id: String,
    /// The peer's address, when the connection has one.
    pub peer: Option<IpAddr>,
    ledger: Mutex<Ledger>,
    /// What decided the request, as the consent and labels stage learns it.
    decision: Mutex<Option<Decision>>,
}

#[derive(Debug, Default)]
struct Ledger {
    touched: Vec<Touched>,
    seen: HashSet<String>,
    /// The request's AuditEvents were committed with its writes.
    recorded: bool,
}

/// One version handed out or written, with the patients it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Touched {
    reference: String,
    patients: Vec<String>,
}

impl Touched {
    fn of(version: &ResourceVersion, content: Option<&Value>) -> Self {
        Touched {
            reference: versioned(version),
            patients: content.map(patient_compartments).unwrap_or_default(),
        }
    }

    /// Versions handed out, each about the patients of its own content.
    fn all(versions: &[ResourceVersion]) -> impl Iterator<Item = Touched> + '_ {
        versions.iter().map(|v| Touched::of(v, v.resource.as_ref()))
    }
}

fn versioned(version: &ResourceVersion) -> String {
    format!(
        "{}/{}/_history/{}",
        version.resource_type, version.id, version.version
    )
}

impl RequestAudit {
    pub fn new(request_id: &str, peer: Option<IpAddr>) -> Self {
        Self {
            request_id: request_id.to_owned(),
            peer,
            ledger: Mutex::default(),
            decision: Mutex::default(),
        }
    }

    /// Adds to the request's decision record.
    pub fn decide(&self, change: impl FnOnce(&mut Decision)) {
        let mut decision = self.decision.lock().unwrap_or_else(|e| e.into_inner());
        change(decision.get_or_insert_with(Decision::default));
    }

    pub fn decision(&self) -> Option<Decision> {
        self.decision
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn note(&self, touched: impl IntoIterator<Item = Touched>) {
        let mut ledger = self.ledger();
        for t in touched {
            if ledger.seen.insert(t.reference.clone()) {
                ledger.touched.push(t);
            }
        }
    }

    fn touched(&self) -> Vec<Touched> {
        self.ledger().touched.clone()
    }

    fn mark_recorded(&self) {
        self.ledger().recorded = true;
    }

    fn is_recorded(&self) -> bool {
        self.ledger().recorded
    }
}

/// The person and the application behind a request.
#[derive(Debug, Clone, Default)]
struct Requester {
    user: Option<Who>,
    client_id: Option<String>,
}

impl Requester {
    fn of(principal: Option<&Principal>) -> Self {
        let Some(access) = principal.and_then(|p| p.access.as_ref()) else {
            return Requester::default();
        };
        // A Backend Services token speaks for its client alone (its subject is
        // the client); any other speaks for a signed-in user.
        let user = (access.role.is_some() || access.subject != access.client_id).then(|| Who {
            username: access.subject.clone(),
            fhir_user: access.fhir_user.clone(),
        });
        Requester {
            user,
            client_id: Some(access.client_id.clone()),
        }
    }

    fn fhir_user(&self) -> Option<&str> {
        self.user.as_ref().and_then(|u| u.fhir_user.as_deref())
    }
}

/// The AuditEvent `action` of an interaction: reads of one thing are R,
/// queries E (R4 audit-event-action), writes C, U, D.
fn action_of(interaction: &Interaction) -> Action {
    match interaction {
        Interaction::Capabilities
        | Interaction::Read { .. }
        | Interaction::VRead { .. }
        | Interaction::History { id: Some(_), .. } => Action::Read,
        Interaction::Create { .. } => Action::Create,
        Interaction::Update { .. }
        | Interaction::ConditionalUpdate { .. }
        | Interaction::Patch { .. } => Action::Update,
        Interaction::Delete { .. } | Interaction::ConditionalDelete { .. } => Action::Delete,
        Interaction::History { .. }
        | Interaction::Search { .. }
        | Interaction::CompartmentSearch { .. }
        | Interaction::Everything { .. }
        | Interaction::Batch { .. }
        | Interaction::Transaction { .. }
        | Interaction::Validate { .. }
        | Interaction::VerifyAuditTrail => Action::Execute,
    }
}

/// The code of an interaction in the restful-interaction code system, where
/// operations are all `operation`.
fn interaction_code(interaction: &Interaction) -> &'static str {
    match interaction {
        Interaction::Validate { .. }
        | Interaction::VerifyAuditTrail
        | Interaction::Everything { .. } => "operation",
        other => other.name(),
    }
}

/// The query of a search or of a type or system history, as parsed (so a
/// search by POST or inside a Bundle has one too): `Type?name=value&...`.
fn query_of(interaction: &Interaction) -> Option<String> {
    let (path, params) = match interaction {
        Interaction::Search {
            resource_type,
            params,
        } => (resource_type.clone().unwrap_or_default(), params),
        Interaction::CompartmentSearch {
            patient,
            resource_type,
            params,
        } => (format!("Patient/{patient}/{resource_type}"), params),
        Interaction::Everything { patient, params } => {
            (format!("Patient/{patient}/$everything"), params)
        }
        Interaction::History {
            resource_type,
            id: None,
            params,
        } => (
            resource_type
                .as_deref()
                .map_or_else(|| "_history".to_owned(), |t| format!("{t}/_history")),
            params,
        ),
        _ => return None,
    };
    let query: String = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params)
        .finish();
    Some(format!("{path}?{query}"))
}

/// The outcome code of an HTTP status: refusals of who is asking are 8,
/// other client errors 4, server errors 12.
pub fn outcome_of(status: StatusCode) -> Outcome {
    match status.as_u16() {
        401 | 403 => Outcome::Denied,
        400..=499 => Outcome::BadInput,
        500.. => Outcome::ServerError,
        _ => Outcome::Success,
    }
}

/// What the interaction names, for when nothing was read or written, or the
/// request was refused: unversioned (a refusal must not tell the version), and
/// about a patient only when it names the Patient itself.
fn named_by(interaction: &Interaction) -> Option<Touched> {
    let (resource_type, reference) = match interaction {
        Interaction::Read {
            resource_type, id, ..
        }
        | Interaction::VRead {
            resource_type, id, ..
        }
        | Interaction::Update {
            resource_type, id, ..
        }
        | Interaction::Delete {
            resource_type, id, ..
        }
        | Interaction::Patch {
            resource_type,
            target: Target::Id(id),
            ..
        }
        | Interaction::History {
            resource_type: Some(resource_type),
            id: Some(id),
            ..
        } => (resource_type.as_str(), format!("{resource_type}/{id}")),
        Interaction::CompartmentSearch { patient, .. }
        | Interaction::Everything { patient, .. } => ("Patient", format!("Patient/{patient}")),
        _ => return None,
    };
    let patients = if resource_type == "Patient" {
        reference
            .split('/')
            .nth(1)
            .map(str::to_owned)
            .into_iter()
            .collect()
    } else {
        Vec::new()
    };
    Some(Touched {
        reference,
        patients,
    })
}

/// Splits what was touched by patient: one group per patient in the order first
/// seen, then one for data about no patient; at least one group.
fn by_patient(touched: &[Touched]) -> Vec<(Option<String>, Vec<String>)> {
    let mut groups: Vec<(Option<String>, Vec<String>)> = Vec::new();
    let mut none: Vec<String> = Vec::new();
    for t in touched {
        if t.patients.is_empty() {
            none.push(t.reference.clone());
        }
        for p in &t.patients {
            match groups.iter_mut().find(|(g, _)| g.as_deref() == Some(p)) {
                Some((_, refs)) => refs.push(t.reference.clone()),
                None => groups.push((Some(p.clone()), vec![t.reference.clone()])),
            }
        }
    }
    if !none.is_empty() || groups.is_empty() {
        groups.push((None, none));
    }
    groups
}

/// Stage 7 with audit on: AuditEvents through the group committer, and the
/// store wrapper that writes Provenance and in-transaction AuditEvents.
#[derive(Debug, Clone)]
pub struct AuditRecorder {
    writer: AuditWriter,
    clock: Arc<dyn Clock>,
    /// The server's identity in agent and observer: its FHIR base URL.
    server: String,
    observer: String,
}

/// What the AuditEvents of one request say besides the data it touched.
#[derive(Debug, Clone)]
struct EventContext {
    request_id: String,
    peer: Option<IpAddr>,
    requester: Requester,
    interaction: &'static str,
    action: Action,
    query: Option<String>,
    decision: Option<Decision>,
}

impl EventContext {
    fn new(
        audit: &RequestAudit,
        principal: Option<&Principal>,
        interaction: Option<&Interaction>,
    ) -> Self {
        EventContext {
            request_id: audit.request_id.clone(),
            peer: audit.peer,
            requester: Requester::of(principal),
            // A request not understood has no interaction code.
            interaction: interaction.map_or("", interaction_code),
            action: interaction.map_or(Action::Execute, action_of),
            query: interaction.and_then(query_of),
            decision: audit.decision(),
        }
    }
}

impl AuditRecorder {
    pub fn new(
        writer: AuditWriter,
        clock: Arc<dyn Clock>,
        server: impl Into<String>,
        observer: impl Into<String>,
    ) -> Self {
        Self {
            writer,
            clock,
            server: server.into(),
            observer: observer.into(),
        }
    }

    fn events(
        &self,
        context: &EventContext,
        outcome: Outcome,
        description: Option<String>,
        touched: &[Touched],
    ) -> Vec<Value> {
        let recorded = self.clock.now();
        let decision = context.decision.clone().map(|mut d| {
            d.outcome = match outcome {
                Outcome::Success if d.labels.iter().any(|l| l.starts_with("masked")) => {
                    "permit with redaction"
                }
                Outcome::Success => "permit",
                Outcome::Denied => "deny",
                _ => "not decided: the request failed",
            }
            .to_owned();
            d
        });
        by_patient(touched)
            .into_iter()
            .map(|(patient, references)| {
                let mut entities: Vec<Entity> =
                    context.query.iter().cloned().map(Entity::Query).collect();
                entities.extend(references.into_iter().map(Entity::Resource));
                audit_event(&AuditFacts {
                    interaction: context.interaction.to_owned(),
                    action: context.action,
                    outcome,
                    outcome_description: description.clone(),
                    recorded,
                    user: context.requester.user.clone(),
                    client_id: context.requester.client_id.clone(),
                    server: self.server.clone(),
                    source_observer: self.observer.clone(),
                    network_address: context.peer.map(|a| a.to_string()),
                    request_id: context.request_id.clone(),
                    entities,
                    patient,
                    decision: decision.clone(),
                })
            })
            .collect()
    }

    /// One event per batch entry that was refused or failed: a batch answers
    /// 200 whatever its entries did, so each refusal is recorded on its own.
    fn failed_entries(&self, context: &EventContext, bundle: &Value, answer: &Value) -> Vec<Value> {
        let requests = bundle["entry"].as_array().map_or(&[][..], Vec::as_slice);
        let answers = answer["entry"].as_array().map_or(&[][..], Vec::as_slice);
        requests
            .iter()
            .zip(answers)
            .filter_map(|(request, answer)| {
                let status: u16 = answer["response"]["status"]
                    .as_str()?
                    .split(' ')
                    .next()?
                    .parse()
                    .ok()?;
                let status = StatusCode::from_u16(status).ok()?;
                if !status.is_client_error() && !status.is_server_error() {
                    return None;
                }
                let method = request["request"]["method"].as_str().unwrap_or_default();
                let url = request["request"]["url"].as_str().unwrap_or_default();
                let path = url.split('?').next().unwrap_or(url);
                let instance = path.split('/').filter(|s| !s.is_empty()).count() >= 2;
                let (interaction, action) = match method {
                    "GET" if instance => ("read", Action::Read),
                    "GET" => ("search-type", Action::Execute),
                    "POST" => ("create", Action::Create),
                    "PUT" => ("update", Action::Update),
                    "PATCH" => ("patch", Action::Update),
                    "DELETE" => ("delete", Action::Delete),
                    _ => ("", Action::Execute),
                };
                let entry_context = EventContext {
                    interaction,
                    action,
                    query: (!instance && url.contains('?')).then(|| url.to_owned()),
                    ..context.clone()
                };
                let named: Vec<Touched> = instance
                    .then(|| Touched {
                        reference: path.trim_matches('/').to_owned(),
                        patients: Vec::new(),
                    })
                    .into_iter()
                    .collect();
                let description = answer["response"]["outcome"]["issue"][0]["diagnostics"]
                    .as_str()
                    .map_or_else(|| status.to_string(), |d| format!("batch entry: {d}"));
                Some(self.events(
                    &entry_context,
                    outcome_of(status),
                    Some(description),
                    &named,
                ))
            })
            .flatten()
            .collect()
    }

    /// Appends one request's events through the group committer, in one group,
    /// and waits for their commit.
    async fn append(&self, events: Vec<Value>) -> Result<(), ApiError> {
        self.writer.append_all(events).await.map_err(|e| {
            tracing::error!(error = %e, "an audit record could not be stored");
            ApiError::Internal("the audit record could not be stored".into())
        })
    }

    /// Records an authentication or authorization event (login, token, ...)
    /// and waits for its commit; an error means it was not stored.
    pub async fn record_auth(
        &self,
        kind: AuthEventKind,
        event: AuthEventFacts<'_>,
    ) -> Result<(), ApiError> {
        let facts = AuthFacts {
            outcome: event.outcome,
            outcome_description: event.description,
            recorded: self.clock.now(),
            user: event.username.map(|username| Who {
                username: username.to_owned(),
                fhir_user: event.fhir_user.map(str::to_owned),
            }),
            client_id: event.client_id.map(str::to_owned),
            server: self.server.clone(),
            source_observer: self.observer.clone(),
            network_address: event.peer.map(|a| a.to_string()),
            request_id: event.request_id.to_owned(),
            scopes: event.scopes.map(str::to_owned),
            token_fingerprint: event.token.map(haven_audit::token_fingerprint),
            patient: event.patient.map(str::to_owned),
        };
        self.append(vec![auth_event(kind, &facts)]).await
    }
}

/// What an authentication event says, borrowed from the endpoint that saw it.
#[derive(Debug, Clone)]
pub struct AuthEventFacts<'a> {
    pub outcome: Outcome,
    pub description: Option<String>,
    pub username: Option<&'a str>,
    pub fhir_user: Option<&'a str>,
    pub client_id: Option<&'a str>,
    pub peer: Option<IpAddr>,
    pub request_id: &'a str,
    pub scopes: Option<&'a str>,
    /// The token the event is about; only its SHA-256 is recorded.
    pub token: Option<&'a str>,
    /// The id of the patient the event is about.
    pub patient: Option<&'a str>,
}

impl<'a> AuthEventFacts<'a> {
    /// A successful event with nothing known but its request id.
    pub fn new(request_id: &'a str) -> Self {
        Self {
            outcome: Outcome::Success,
            description: None,
            username: None,
            fhir_user: None,
            client_id: None,
            peer: None,
            request_id,
            scopes: None,
            token: None,
            patient: None,
        }
    }
}

#[async_trait]
impl crate::pipeline::Recorder for AuditRecorder {
    fn store_for(
        &self,
        store: Arc<dyn Store>,
        principal: &Principal,
        interaction: &Interaction,
        audit: &Arc<RequestAudit>,
    ) -> Arc<dyn Store> {
        Arc::new(RecordedStore {
            audit_log: RecordedAuditLog {
                inner: store.clone(),
                audit: audit.clone(),
            },
            inner: store,
            shared: Arc::new(Shared {
                recorder: self.clone(),
                audit: audit.clone(),
                context: EventContext::new(audit, Some(principal), Some(interaction)),
                per_entry: matches!(interaction, Interaction::Batch { .. }),
            }),
        })
    }

    async fn record(&self, record: &RequestRecord<'_>) -> Result<(), ApiError> {
        let audit = record.audit;
        let outcome = outcome_of(record.status);
        let committed = audit.is_recorded();
        if committed && outcome == Outcome::Success {
            return Ok(());
        }
        let context = EventContext::new(audit, record.principal, record.interaction);
        // A refusal names only what was asked for: what the store found behind
        // the refusal (a version, whose record it is) is not the caller's to learn.
        let touched: Vec<Touched> = if outcome == Outcome::Denied || audit.touched().is_empty() {
            record.interaction.and_then(named_by).into_iter().collect()
        } else {
            audit.touched()
        };
        let mut description = (outcome != Outcome::Success).then(|| {
            record
                .failure
                .map_or_else(|| record.status.to_string(), str::to_owned)
        });
        if committed {
            // Its writes were committed with a success record; the answer then failed.
            description = description.map(|d| format!("{d} (after its changes were committed)"));
        }
        let mut events = self.events(&context, outcome, description, &touched);
        if let (Some(Interaction::Batch { bundle }), Some(answer)) =
            (record.interaction, record.body)
        {
            events.extend(self.failed_entries(&context, bundle, answer));
        }
        self.append(events).await
    }
}

/// What a request's recorded store and its transactions share.
struct Shared {
    recorder: AuditRecorder,
    audit: Arc<RequestAudit>,
    context: EventContext,
    /// A batch: each entry's transaction records that entry's writes, and
    /// stage 7 the batch.
    per_entry: bool,
}

/// The store under the guard of one request, with audit on.
struct RecordedStore {
    inner: Arc<dyn Store>,
    audit_log: RecordedAuditLog,
    shared: Arc<Shared>,
}

impl Debug for RecordedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordedStore")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl RecordedStore {
    fn recorded(&self, inner: Box<dyn StoreTx>) -> Box<dyn StoreTx> {
        Box::new(RecordedTx {
            inner,
            shared: self.shared.clone(),
            written: Vec::new(),
        })
    }

    fn note_version(&self, version: &Option<ResourceVersion>) {
        if let Some(v) = version {
            self.shared
                .audit
                .note([Touched::of(v, v.resource.as_ref())]);
        }
    }
}

#[async_trait]
impl Store for RecordedStore {
    fn backend(&self) -> Backend {
        self.inner.backend()
    }

    async fn begin(&self) -> Result<Box<dyn StoreTx>> {
        Ok(self.recorded(self.inner.begin().await?))
    }

    async fn begin_large(&self) -> Result<Box<dyn StoreTx>> {
        Ok(self.recorded(self.inner.begin_large().await?))
    }

    async fn read(&self, resource_type: &str, id: &str) -> Result<Option<ResourceVersion>> {
        let version = self.inner.read(resource_type, id).await?;
        self.note_version(&version);
        Ok(version)
    }

    async fn vread(
        &self,
        resource_type: &str,
        id: &str,
        version: i64,
    ) -> Result<Option<ResourceVersion>> {
        let version = self.inner.vread(resource_type, id, version).await?;
        self.note_version(&version);
        Ok(version)
    }

    async fn search(&self, query: &SearchQuery) -> Result<SearchPage> {
        let page = self.inner.search(query).await?;
        self.shared.audit.note(Touched::all(&page.resources));
        Ok(page)
    }

    async fn search_keys(&self, query: &SearchQuery, limit: u32) -> Result<Vec<(String, String)>> {
        // Keys return no content; the page read from them is recorded when read.
        self.inner.search_keys(query, limit).await
    }

    async fn history(&self, query: &HistoryQuery) -> Result<HistoryPage> {
        let page = self.inner.history(query).await?;
        self.shared.audit.note(Touched::all(&page.versions));
        Ok(page)
    }

    async fn count_by_type(&self) -> Result<Vec<(String, u64)>> {
        self.inner.count_by_type().await
    }

    fn auth_records(&self) -> &dyn AuthRecords {
        self.inner.auth_records()
    }

    fn audit_log(&self) -> &dyn AuditLog {
        &self.audit_log
    }
}

/// The audit log as a request reads it: the AuditEvents handed out are noted
/// like any other data, so reading the trail is itself on the trail.
struct RecordedAuditLog {
    inner: Arc<dyn Store>,
    audit: Arc<RequestAudit>,
}

impl RecordedAuditLog {
    fn note(&self, records: &[AuditRecord]) {
        self.audit.note(records.iter().map(|r| Touched {
            // Audit records have one version only.
            reference: format!(
                "AuditEvent/{}/_history/1",
                r.event["id"].as_str().unwrap_or_default()
            ),
            patients: patient_compartments(&r.event),
        }));
    }
}

#[async_trait]
impl AuditLog for RecordedAuditLog {
    fn stamp(&self, events: Vec<Value>) -> Result<Vec<StampedEvent>> {
        self.inner.audit_log().stamp(events)
    }

    async fn append(&self, events: Vec<StampedEvent>) -> Result<()> {
        self.inner.audit_log().append(events).await
    }

    async fn read(&self, id: &str) -> Result<Option<AuditRecord>> {
        let record = self.inner.audit_log().read(id).await?;
        self.note(record.as_slice());
        Ok(record)
    }

    async fn search(&self, query: &AuditQuery) -> Result<AuditPage> {
        let page = self.inner.audit_log().search(query).await?;
        self.note(&page.records);
        Ok(page)
    }

    async fn chain(&self, after: u64, limit: u32) -> Result<Vec<AuditRecord>> {
        // Verifying reads every record; the verification is recorded, not each one.
        self.inner.audit_log().chain(after, limit).await
    }
}

/// One version written in a transaction, with what its Provenance needs.
struct Written {
    version: ResourceVersion,
    /// The version made the resource exist (a create, or an update that created).
    created: bool,
    /// The patients of the content written, or of the content deleted.
    patients: Vec<String>,
}

impl Written {
    fn touched(&self) -> Touched {
        Touched {
            reference: versioned(&self.version),
            patients: self.patients.clone(),
        }
    }
}

struct RecordedTx {
    inner: Box<dyn StoreTx>,
    shared: Arc<Shared>,
    written: Vec<Written>,
}

fn is_server_provenance(resource: &Value) -> bool {
    resource["meta"]["tag"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|t| t["system"] == SERVER_PROVENANCE_TAG.0 && t["code"] == SERVER_PROVENANCE_TAG.1)
}

/// Whether a resource a client sends carries what only the server may write:
/// the server's Provenance tag, or the extension naming a target's patients.
fn claims_server_marks(resource: &Value) -> bool {
    is_server_provenance(resource)
        || resource["extension"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["url"] == PROVENANCE_TARGET_PATIENT)
}

fn reserved() -> StoreError {
    StoreError::Refused(
        "the server's Provenance tag and target-patient extension are the server's to write".into(),
    )
}

impl RecordedTx {
    /// Server-made Provenance is part of the record: it is never changed.
    async fn refuse_server_provenance(&mut self, resource_type: &str, id: &str) -> Result<()> {
        if resource_type != "Provenance" {
            return Ok(());
        }
        let current = self.inner.read(resource_type, id).await?;
        if current
            .and_then(|v| v.resource)
            .is_some_and(|r| is_server_provenance(&r))
        {
            return Err(StoreError::Refused(
                "a Provenance made by the server cannot be changed or deleted".into(),
            ));
        }
        Ok(())
    }

    /// The Provenance of one written version.
    fn provenance_of(&self, written: &Written, sources: &HashMap<String, Vec<String>>) -> Value {
        let v = &written.version;
        let activity = match v.change {
            _ if written.created => Activity::Create,
            Change::Create => Activity::Create,
            Change::Update => Activity::Update,
            Change::Delete => Activity::Delete,
        };
        let previous = (v.version > 1)
            .then(|| format!("{}/{}/_history/{}", v.resource_type, v.id, v.version - 1));
        let mut resource = provenance(
            &versioned(v),
            activity,
            self.shared.recorder.clock.now(),
            self.shared.context.requester.fhir_user(),
            self.shared.context.requester.client_id.as_deref(),
            previous.as_deref(),
        );
        resource["meta"] = json!({"tag": [{
            "system": SERVER_PROVENANCE_TAG.0,
            "code": SERVER_PROVENANCE_TAG.1,
            "display": "made by the server",
        }]});
        // A Provenance is as sensitive as its target: it carries its labels.
        let labels: Vec<Value> = v
            .resource
            .as_ref()
            .and_then(|r| r["meta"]["security"].as_array())
            .into_iter()
            .flatten()
            .filter(|c| {
                c["system"] == haven_policy::label::ACT_CODE
                    || c["system"] == haven_policy::label::CONFIDENTIALITY
            })
            .map(|c| json!({"system": c["system"], "code": c["code"]}))
            .collect();
        if !labels.is_empty() {
            resource["meta"]["security"] = Value::Array(labels);
        }
        if !written.patients.is_empty() {
            resource["extension"] = Value::Array(
                written
                    .patients
                    .iter()
                    .map(|p| {
                        json!({
                            "url": PROVENANCE_TARGET_PATIENT,
                            "valueReference": {"reference": format!("Patient/{p}")},
                        })
                    })
                    .collect(),
            );
        }
        // A Provenance the client sent about this resource is kept, and linked.
        let key = format!("{}/{}", v.resource_type, v.id);
        if let Some(ids) = sources.get(&key) {
            let mut entities = resource["entity"].as_array().cloned().unwrap_or_default();
            entities.extend(ids.iter().map(
                |id| json!({"role": "source", "what": {"reference": format!("Provenance/{id}")}}),
            ));
            resource["entity"] = Value::Array(entities);
        }
        resource
    }

    /// The client's own Provenance resources written here, by the `Type/id`
    /// of each target.
    fn client_provenance(&self) -> HashMap<String, Vec<String>> {
        let mut sources: HashMap<String, Vec<String>> = HashMap::new();
        for w in &self.written {
            let Some(resource) = w.version.resource.as_ref() else {
                continue;
            };
            if w.version.resource_type != "Provenance" {
                continue;
            }
            for target in resource["target"].as_array().into_iter().flatten() {
                let Some(reference) = target["reference"].as_str() else {
                    continue;
                };
                sources
                    .entry(unversioned(reference).to_owned())
                    .or_default()
                    .push(w.version.id.clone());
            }
        }
        sources
    }

    /// Notes a written version; its patients are those of its own content
    /// unless given (a deletion has none of its own).
    fn note_written(
        &mut self,
        version: &ResourceVersion,
        created: bool,
        patients: Option<Vec<String>>,
    ) {
        let patients = patients.unwrap_or_else(|| {
            version
                .resource
                .as_ref()
                .map(patient_compartments)
                .unwrap_or_default()
        });
        self.written.push(Written {
            version: version.clone(),
            created,
            patients,
        });
    }

    /// The AuditEvents committed with this transaction's writes: for a batch
    /// entry, one per written version by what it did; otherwise the request's.
    fn events(&self) -> Vec<Value> {
        let shared = &self.shared;
        if shared.per_entry {
            return self
                .written
                .iter()
                .flat_map(|w| {
                    let (interaction, action) = match w.version.change {
                        _ if w.created => ("create", Action::Create),
                        Change::Create => ("create", Action::Create),
                        Change::Update => ("update", Action::Update),
                        Change::Delete => ("delete", Action::Delete),
                    };
                    let context = EventContext {
                        interaction,
                        action,
                        query: None,
                        decision: shared.audit.decision(),
                        ..shared.context.clone()
                    };
                    shared
                        .recorder
                        .events(&context, Outcome::Success, None, &[w.touched()])
                })
                .collect();
        }
        let mut touched = shared.audit.touched();
        touched.extend(
            self.written
                .iter()
                .map(Written::touched)
                .filter(|t| !touched.iter().any(|seen| seen.reference == t.reference))
                .collect::<Vec<_>>(),
        );
        let mut context = shared.context.clone();
        context.decision = shared.audit.decision();
        // An update that created the resource created it.
        if context.action == Action::Update
            && !self.written.is_empty()
            && self.written.iter().all(|w| w.created)
        {
            context.action = Action::Create;
        }
        shared
            .recorder
            .events(&context, Outcome::Success, None, &touched)
    }
}

/// A reference without its `/_history/<version>`.
fn unversioned(reference: &str) -> &str {
    reference.split("/_history/").next().unwrap_or(reference)
}

#[async_trait]
impl StoreTx for RecordedTx {
    async fn read(&mut self, resource_type: &str, id: &str) -> Result<Option<ResourceVersion>> {
        let version = self.inner.read(resource_type, id).await?;
        // Noted at once: a read inside a write may be answered even when the
        // write is then dropped (a transaction's GET entries, say).
        if let Some(v) = &version {
            self.shared
                .audit
                .note([Touched::of(v, v.resource.as_ref())]);
        }
        Ok(version)
    }

    async fn create(
        &mut self,
        resource_type: &str,
        id: &str,
        resource: Value,
    ) -> Result<ResourceVersion> {
        if claims_server_marks(&resource) {
            return Err(reserved());
        }
        let version = self.inner.create(resource_type, id, resource).await?;
        self.note_written(&version, true, None);
        Ok(version)
    }

    async fn update(
        &mut self,
        resource_type: &str,
        id: &str,
        resource: Value,
        expected_version: Option<i64>,
    ) -> Result<(ResourceVersion, bool)> {
        if claims_server_marks(&resource) {
            return Err(reserved());
        }
        self.refuse_server_provenance(resource_type, id).await?;
        let (version, created) = self
            .inner
            .update(resource_type, id, resource, expected_version)
            .await?;
        self.note_written(&version, created, None);
        Ok((version, created))
    }

    async fn delete(
        &mut self,
        resource_type: &str,
        id: &str,
        expected_version: Option<i64>,
    ) -> Result<Option<ResourceVersion>> {
        self.refuse_server_provenance(resource_type, id).await?;
        // The deleted content says whose record the deletion belongs to.
        let before = self.inner.read(resource_type, id).await?;
        let deleted = self
            .inner
            .delete(resource_type, id, expected_version)
            .await?;
        if let Some(version) = &deleted {
            let patients = before
                .and_then(|b| b.resource)
                .map(|r| patient_compartments(&r))
                .unwrap_or_default();
            self.note_written(version, false, Some(patients));
        }
        Ok(deleted)
    }

    async fn search(&mut self, query: &SearchQuery) -> Result<SearchPage> {
        let page = self.inner.search(query).await?;
        // A conditional create answers with the match even when it writes nothing.
        self.shared.audit.note(Touched::all(&page.resources));
        Ok(page)
    }

    async fn append_audit(&mut self, events: Vec<Value>) -> Result<()> {
        self.inner.append_audit(events).await
    }

    async fn commit(mut self: Box<Self>) -> Result<()> {
        // The AuditEvents go first: a store may send them with the next
        // statement, here the first Provenance's, rather than on their own.
        let events = self.events();
        self.inner.append_audit(events).await?;
        // One Provenance per written version; the server's own are not in `written`.
        let sources = self.client_provenance();
        let provenances: Vec<Value> = self
            .written
            .iter()
            .map(|w| self.provenance_of(w, &sources))
            .collect();
        for resource in provenances {
            self.inner
                .create("Provenance", &new_time_ordered_id(), resource)
                .await?;
        }
        self.inner.commit().await?;
        // Only versions that exist now are noted for the request's later records.
        let shared = self.shared.clone();
        shared.audit.note(self.written.iter().map(Written::touched));
        if !shared.per_entry {
            shared.audit.mark_recorded();
        }
        Ok(())
    }
}
