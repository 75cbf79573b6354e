//! The audit trail's parts shared by both backends: stamping and linking new
//! records, the values the search index holds, the search SQL, and
//! [`AuditWriter`], which appends events in groups.

use std::sync::Arc;

use haven_audit::canonical::canonical_json;
use haven_audit::{link_hash, StoredLink, GENESIS};
use haven_model::id::new_time_ordered_id;
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};
use tokio::sync::{mpsc, oneshot};

use crate::document::stamp;
use crate::query::{instant_bound, Dialect, Param, Sql};
use crate::{AuditPage, AuditQuery, AuditRecord, Result, Store, StoreError, TokenValue};

impl From<AuditRecord> for StoredLink {
    fn from(record: AuditRecord) -> Self {
        StoredLink {
            position: record.position,
            record: record.event,
            previous_hash: record.previous_hash,
            hash: record.hash,
        }
    }
}

/// At most this many events are appended in one transaction.
const GROUP_LIMIT: usize = 512;
/// Callers wait to queue once this many events are waiting (back pressure).
const QUEUE_LIMIT: usize = 8192;

/// One caller's events: they are appended in the same group, all or none.
struct Queued {
    events: Vec<StampedEvent>,
    answer: oneshot::Sender<Result<()>>,
}

/// Group commit for audit appends: events queued by many callers at once are
/// appended in one transaction, so a busy server pays for one commit (and, on
/// PostgreSQL, one turn of the chain lock) per group rather than per event.
///
/// Clones share the one background task, which ends when the last clone is dropped.
#[derive(Clone)]
pub struct AuditWriter {
    queue: mpsc::Sender<Queued>,
    store: Arc<dyn Store>,
}

impl std::fmt::Debug for AuditWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditWriter")
            .field("stopped", &self.queue.is_closed())
            .finish_non_exhaustive()
    }
}

impl AuditWriter {
    /// Starts the background task that appends queued events in groups.
    /// Must be called inside a Tokio runtime.
    pub fn start(store: Arc<dyn Store>) -> Self {
        let (queue, queued) = mpsc::channel(QUEUE_LIMIT);
        tokio::spawn(run(store.clone(), queued));
        Self { queue, store }
    }

    /// Queues one event and waits until the group holding it is committed;
    /// an error means it was not stored.
    pub async fn append(&self, event: Value) -> Result<()> {
        self.append_all(vec![event]).await
    }

    /// Queues events that belong together (one request's) and waits until the
    /// group holding them is committed: all of them are stored, or none is.
    pub async fn append_all(&self, events: Vec<Value>) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        // Stamped by each caller, on its own task: the one writer task only
        // links and inserts, and a malformed event fails here, not its group.
        let events = self.store.audit_log().stamp(events)?;
        let (answer, answered) = oneshot::channel();
        self.queue
            .send(Queued { events, answer })
            .await
            .map_err(|_| stopped())?;
        // A dropped answer means the task ended before committing: never Ok.
        answered.await.map_err(|_| stopped())?
    }
}

fn stopped() -> StoreError {
    StoreError::Unavailable("the audit writer has stopped".into())
}

async fn run(store: Arc<dyn Store>, mut queued: mpsc::Receiver<Queued>) {
    let mut group = Vec::with_capacity(GROUP_LIMIT);
    // Waits for one caller, then takes whoever else is already queued.
    while queued.recv_many(&mut group, GROUP_LIMIT).await > 0 {
        let callers: Vec<Queued> = std::mem::take(&mut group);
        // Clones share each event's text, so a retry below copies nothing.
        let events: Vec<StampedEvent> = callers.iter().flat_map(|c| c.events.clone()).collect();
        let result = append_guarded(&store, events).await;
        match result {
            Ok(()) => {
                for caller in callers {
                    // A caller that stopped waiting needs no answer.
                    let _ = caller.answer.send(Ok(()));
                }
            }
            Err(error) if callers.len() > 1 => {
                // One caller's bad event must not fail the others: each alone.
                tracing::warn!(%error, callers = callers.len(), "an audit group failed; appending its callers one by one");
                for caller in callers {
                    let result = append_guarded(&store, caller.events).await;
                    if let Err(error) = &result {
                        tracing::error!(%error, "audit events were not stored");
                    }
                    let _ = caller.answer.send(result);
                }
            }
            Err(error) => {
                tracing::error!(%error, "audit events were not stored");
                for caller in callers {
                    let _ = caller.answer.send(Err(error.clone()));
                }
            }
        }
    }
}

/// Appends on a task of its own, so that a panic in one append fails that
/// append's callers instead of ending the writer (after which every request
/// would fail).
async fn append_guarded(store: &Arc<dyn Store>, events: Vec<StampedEvent>) -> Result<()> {
    let store = store.clone();
    match tokio::spawn(async move { store.audit_log().append(events).await }).await {
        Ok(result) => result,
        Err(panicked) => {
            tracing::error!(error = %panicked, "an audit append panicked");
            Err(StoreError::Database(
                "the audit append failed unexpectedly".into(),
            ))
        }
    }
}

/// What committing a transaction whose audit append failed returns.
pub(crate) fn failed_in_transaction() -> StoreError {
    StoreError::Database("an audit append failed, so the transaction was rolled back".into())
}

/// One search value of an event: `param` is the search parameter, `system`
/// is `""` except for `type` and `subtype` codings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct IndexEntry {
    pub param: &'static str,
    pub system: String,
    pub value: String,
}

/// An AuditEvent stamped and serialized by [`crate::AuditLog::stamp`], ready for
/// [`crate::AuditLog::append`]. Clones share the one copy, so a group that
/// failed can be appended again caller by caller without copying events.
#[derive(Debug, Clone)]
pub struct StampedEvent(pub(crate) Arc<Stamped>);

impl StampedEvent {
    /// Stamps `id`, `meta.versionId` and `meta.lastUpdated` (`now`) on each
    /// event and prepares what is stored with it: its text, the canonical form
    /// its hash covers, its index values. A store's [`crate::AuditLog::stamp`]
    /// does this with its clock, before any lock is taken.
    pub fn stamp_all(events: Vec<Value>, now: OffsetDateTime) -> Result<Vec<Self>> {
        events
            .into_iter()
            .map(|event| {
                let id = new_time_ordered_id();
                let event = stamp(event, "AuditEvent", &id, 1, now)?;
                let text = serde_json::to_string(&event).map_err(|e| {
                    StoreError::Database(format!("an AuditEvent cannot be serialized: {e}"))
                })?;
                // Hashed as a reader will see it: the stored text parsed back,
                // which only a fractional number can make differ from the event.
                let reparsed = if reads_back_exactly(&event) {
                    None
                } else {
                    Some(serde_json::from_str::<Value>(&text).map_err(|e| {
                        StoreError::Database(format!("an AuditEvent does not read back: {e}"))
                    })?)
                };
                let stored = reparsed.as_ref().unwrap_or(&event);
                Ok(StampedEvent(Arc::new(Stamped {
                    recorded: recorded(stored).unwrap_or(now),
                    index: index_entries(stored),
                    canonical: canonical_json(stored),
                    id,
                    text,
                })))
            })
            .collect()
    }

    /// The event as it will be stored, as JSON text.
    pub fn text(&self) -> &str {
        &self.0.text
    }
}

/// An event stamped and serialized, ready to be linked after the head.
#[derive(Debug)]
pub(crate) struct Stamped {
    pub id: String,
    pub recorded: OffsetDateTime,
    pub text: String,
    canonical: String,
    pub index: Vec<IndexEntry>,
}

/// A record ready to be inserted.
#[derive(Debug)]
pub(crate) struct Linked {
    pub position: i64,
    pub previous_hash: String,
    pub hash: String,
    pub stamped: StampedEvent,
}

/// Whether the value's text parses back to the same value: strings, integers
/// and literals do; a fractional number may come back one unit in the last
/// place apart, as serde_json's parser is not exact for every float. Deep
/// nesting is left to the parse too, which refuses what it could not read.
fn reads_back_exactly(value: &Value) -> bool {
    fn within(value: &Value, depth: usize) -> bool {
        match value {
            Value::Number(n) => !n.is_f64(),
            Value::Array(items) => depth < NESTING && items.iter().all(|v| within(v, depth + 1)),
            Value::Object(members) => {
                depth < NESTING && members.values().all(|v| within(v, depth + 1))
            }
            Value::Null | Value::Bool(_) | Value::String(_) => true,
        }
    }
    // Below serde_json's own limit of 128 nested arrays and objects.
    const NESTING: usize = 64;
    within(value, 0)
}

/// Links stamped events, in order, after the head of the chain (its position
/// and hash; `None` for an empty chain).
pub(crate) fn link(head: Option<(i64, String)>, stamped: Vec<StampedEvent>) -> Vec<Linked> {
    let (mut position, mut previous_hash) = head.unwrap_or((0, GENESIS.to_owned()));
    stamped
        .into_iter()
        .map(|stamped| {
            position += 1;
            let hash = link_hash(&previous_hash, &stamped.0.canonical);
            Linked {
                position,
                previous_hash: std::mem::replace(&mut previous_hash, hash.clone()),
                hash,
                stamped,
            }
        })
        .collect()
}

/// The event's `recorded` instant in UTC with microseconds, if it has a valid one.
fn recorded(event: &Value) -> Option<OffsetDateTime> {
    let text = event.get("recorded")?.as_str()?;
    let instant = OffsetDateTime::parse(text, &Rfc3339)
        .ok()?
        .to_offset(UtcOffset::UTC);
    let micros = instant.microsecond();
    Some(instant.replace_microsecond(micros).unwrap_or(instant))
}

/// The elements of a JSON array, or the value itself when it is a single object.
fn items(value: Option<&Value>) -> impl Iterator<Item = &Value> {
    let slice: &[Value] = match value {
        Some(Value::Array(items)) => items,
        Some(item @ Value::Object(_)) => std::slice::from_ref(item),
        _ => &[],
    };
    slice.iter()
}

/// A reference without its `/_history/<version>` suffix.
fn unversioned(reference: &str) -> &str {
    reference
        .find("/_history/")
        .map_or(reference, |at| &reference[..at])
}

/// The longest index value kept, in bytes; longer ones are cut at a character.
const INDEX_VALUE_LIMIT: usize = 512;

fn bounded(text: &str) -> String {
    let mut value: String = text.chars().filter(|c| *c != '\0').collect();
    if value.len() > INDEX_VALUE_LIMIT {
        let mut end = INDEX_VALUE_LIMIT;
        while !value.is_char_boundary(end) {
            end -= 1;
        }
        value.truncate(end);
    }
    value
}

/// The values [`AuditQuery`] searches, taken from an event.
pub(crate) fn index_entries(event: &Value) -> Vec<IndexEntry> {
    let mut entries: Vec<IndexEntry> = Vec::new();
    let mut add = |param: &'static str, system: &str, value: &str| {
        // Values come partly from callers (a typed username, a client id): no
        // NUL, which PostgreSQL text refuses, and no more than an index key holds.
        let value = bounded(value);
        if value.is_empty() {
            return;
        }
        let entry = IndexEntry {
            param,
            system: bounded(system),
            value,
        };
        if !entries.contains(&entry) {
            entries.push(entry);
        }
    };
    let text = |value: &Value, path: &[&str]| -> Option<String> {
        let mut at = value;
        for key in path {
            at = at.get(key)?;
        }
        at.as_str().map(str::to_owned)
    };
    for agent in items(event.get("agent")) {
        if let Some(reference) = text(agent, &["who", "reference"]) {
            add("agent", "", &reference);
            if reference.starts_with("Patient/") {
                add("patient", "", unversioned(&reference));
            }
        }
        if let Some(value) = text(agent, &["who", "identifier", "value"]) {
            add("agent", "", &value);
        }
        for policy in items(agent.get("policy")) {
            if let Some(policy) = policy.as_str() {
                add("policy", "", policy);
            }
        }
    }
    for entity in items(event.get("entity")) {
        if text(entity, &["type", "code"]).as_deref() == Some("XrequestId") {
            if let Some(id) = text(entity, &["what", "identifier", "value"]) {
                add("request", "", &id);
            }
        }
        if let Some(reference) = text(entity, &["what", "reference"]) {
            add("entity", "", &reference);
            add("entity", "", unversioned(&reference));
            if reference.starts_with("Patient/") {
                add("patient", "", unversioned(&reference));
            }
        }
    }
    for param in ["outcome", "action"] {
        if let Some(value) = text(event, &[param]) {
            add(param, "", &value);
        }
    }
    let codings = items(event.get("type"))
        .map(|coding| ("type", coding))
        .chain(items(event.get("subtype")).map(|coding| ("subtype", coding)));
    for (param, coding) in codings {
        if let Some(code) = text(coding, &["code"]) {
            let system = text(coding, &["system"]).unwrap_or_default();
            add(param, &system, &code);
        }
    }
    entries
}

/// Columns of a record row, in the order the backends decode them.
pub(crate) const RECORD_COLUMNS: &str = "a.position, a.event, a.previous_hash, a.hash";

/// A record from its stored columns.
pub(crate) fn decode(
    position: i64,
    event: &str,
    previous_hash: String,
    hash: String,
) -> Result<AuditRecord> {
    let event = serde_json::from_str(event)
        .map_err(|e| StoreError::Database(format!("stored AuditEvent is not JSON: {e}")))?;
    Ok(AuditRecord {
        position: u64::try_from(position)
            .map_err(|_| StoreError::Database(format!("stored audit position {position}")))?,
        event,
        previous_hash,
        hash,
    })
}

/// The page query and, when asked for, the count query of an audit search.
pub(crate) fn search(dialect: Dialect, query: &AuditQuery) -> (Sql, Option<Sql>) {
    let mut page = Sql::new(
        dialect,
        &format!("SELECT {RECORD_COLUMNS} FROM audit_events a"),
    );
    criteria(&mut page, query);
    page.push(" ORDER BY a.position DESC");
    // A content filter pages and counts after filtering, so every candidate is read.
    if query.filter.is_some() {
        return (page, None);
    }
    page.push(&format!(
        " LIMIT {} OFFSET {}",
        u64::from(query.count) + 1,
        query.offset
    ));
    let count = query.total.then(|| {
        let mut count = Sql::new(dialect, "SELECT COUNT(*) FROM audit_events a");
        criteria(&mut count, query);
        count
    });
    (page, count)
}

fn criteria(sql: &mut Sql, query: &AuditQuery) {
    sql.push(" WHERE 1 = 1");
    if !query.ids.is_empty() {
        sql.push(" AND a.id IN (");
        for (n, id) in query.ids.iter().enumerate() {
            if n > 0 {
                sql.push(", ");
            }
            sql.bind(Param::Text(id.clone()));
        }
        sql.push(")");
    }
    for bound in &query.date {
        instant_bound(sql, "a.recorded", bound);
    }
    values(sql, "agent", &query.agent);
    values(sql, "patient", &query.patient);
    values(sql, "entity", &query.entity);
    values(sql, "outcome", &query.outcome);
    values(sql, "action", &query.action);
    values(sql, "policy", &query.policy);
    values(sql, "request", &query.request);
    tokens(sql, "type", &query.event_type);
    tokens(sql, "subtype", &query.subtype);
}

/// Opens an index lookup for `param`, a fixed name (never caller input).
fn index_lookup(sql: &mut Sql, param: &'static str) {
    sql.push(
        " AND EXISTS (SELECT 1 FROM audit_index i WHERE i.position = a.position AND i.param = '",
    )
    .push(param)
    .push("' AND ");
}

fn values(sql: &mut Sql, param: &'static str, values: &[String]) {
    if values.is_empty() {
        return;
    }
    index_lookup(sql, param);
    sql.push("i.value IN (");
    for (n, value) in values.iter().enumerate() {
        if n > 0 {
            sql.push(", ");
        }
        sql.bind(Param::Text(value.clone()));
    }
    sql.push("))");
}

fn tokens(sql: &mut Sql, param: &'static str, tokens: &[TokenValue]) {
    if tokens.is_empty() {
        return;
    }
    index_lookup(sql, param);
    sql.push("(");
    for (n, token) in tokens.iter().enumerate() {
        if n > 0 {
            sql.push(" OR ");
        }
        match (&token.system, &token.code) {
            (Some(system), Some(code)) => {
                sql.push("(i.system = ")
                    .bind(Param::Text(system.clone()))
                    .push(" AND i.value = ")
                    .bind(Param::Text(code.clone()))
                    .push(")");
            }
            (Some(system), None) => {
                sql.push("i.system = ").bind(Param::Text(system.clone()));
            }
            (None, Some(code)) => {
                sql.push("i.value = ").bind(Param::Text(code.clone()));
            }
            (None, None) => {
                sql.push("1 = 1");
            }
        }
    }
    sql.push("))");
}

/// Cuts the fetched rows (one more than the page size, or every candidate
/// when a content filter applies) into a page.
pub(crate) fn page(
    query: &AuditQuery,
    mut records: Vec<AuditRecord>,
    mut total: Option<u64>,
) -> AuditPage {
    let limit = query.count as usize;
    if let Some(filter) = &query.filter {
        records.retain(|record| filter.admits(&record.event));
        if query.total {
            total = Some(records.len() as u64);
        }
        let skip = usize::try_from(query.offset).unwrap_or(usize::MAX);
        records.drain(..skip.min(records.len()));
        let more = records.len() > limit;
        records.truncate(limit);
        return AuditPage {
            records,
            total,
            more,
        };
    }
    let more = if query.count > 0 {
        records.len() > limit
    } else {
        // Nothing was fetched; more follow exactly when anything is past the offset.
        total.is_some_and(|total| total > query.offset)
    };
    records.truncate(limit);
    AuditPage {
        records,
        total,
        more,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use time::macros::datetime;

    mod writer {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Mutex;
        use std::time::Duration;

        use async_trait::async_trait;
        use haven_model::clock::ManualClock;
        use tokio::sync::Semaphore;

        use super::*;
        use crate::{
            AuditLog, AuthRecords, Backend, HistoryPage, HistoryQuery, ResourceVersion, SearchPage,
            SearchQuery, StoreTx,
        };

        /// An audit log that records the size of each group, holds each append
        /// until the test lets it go, and fails or panics when told to.
        struct Scripted {
            groups: Mutex<Vec<usize>>,
            gate: Semaphore,
            fail: AtomicBool,
            panic: AtomicBool,
        }

        #[async_trait]
        impl AuditLog for Scripted {
            fn stamp(&self, events: Vec<Value>) -> Result<Vec<StampedEvent>> {
                StampedEvent::stamp_all(events, datetime!(2026-03-01 12:00 UTC))
            }

            async fn append(&self, events: Vec<StampedEvent>) -> Result<()> {
                self.groups.lock().unwrap().push(events.len());
                self.gate.acquire().await.unwrap().forget();
                assert!(!self.panic.load(Ordering::SeqCst), "the log panics");
                let bad = |e: &StampedEvent| e.text().contains(r#""bad":true"#);
                if self.fail.load(Ordering::SeqCst) || events.iter().any(bad) {
                    return Err(StoreError::Database("refused".into()));
                }
                Ok(())
            }

            async fn read(&self, _: &str) -> Result<Option<AuditRecord>> {
                Ok(None)
            }

            async fn search(&self, _: &AuditQuery) -> Result<AuditPage> {
                Err(StoreError::Unsupported("search".into()))
            }

            async fn chain(&self, _: u64, _: u32) -> Result<Vec<AuditRecord>> {
                Ok(Vec::new())
            }
        }

        /// A real store for everything but the audit log.
        struct ScriptedStore {
            inner: Arc<dyn Store>,
            log: Arc<Scripted>,
        }

        impl std::fmt::Debug for ScriptedStore {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("ScriptedStore")
            }
        }

        #[async_trait]
        impl Store for ScriptedStore {
            fn backend(&self) -> Backend {
                self.inner.backend()
            }
            async fn begin(&self) -> Result<Box<dyn StoreTx>> {
                self.inner.begin().await
            }
            async fn read(&self, t: &str, id: &str) -> Result<Option<ResourceVersion>> {
                self.inner.read(t, id).await
            }
            async fn vread(&self, t: &str, id: &str, v: i64) -> Result<Option<ResourceVersion>> {
                self.inner.vread(t, id, v).await
            }
            async fn search(&self, query: &SearchQuery) -> Result<SearchPage> {
                self.inner.search(query).await
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
                self.log.as_ref()
            }
        }

        async fn scripted() -> (Arc<Scripted>, AuditWriter) {
            let clock = Arc::new(ManualClock::new(datetime!(2026-03-01 12:00 UTC)));
            let inner = crate::connect("sqlite::memory:", clock).await.unwrap();
            let log = Arc::new(Scripted {
                groups: Mutex::default(),
                gate: Semaphore::new(0),
                fail: AtomicBool::default(),
                panic: AtomicBool::default(),
            });
            let store = Arc::new(ScriptedStore {
                inner,
                log: log.clone(),
            });
            (log, AuditWriter::start(store))
        }

        async fn until(condition: impl Fn() -> bool) {
            for _ in 0..500 {
                if condition() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("the condition never held");
        }

        fn spawn_appends(
            writer: &AuditWriter,
            n: usize,
        ) -> Vec<tokio::task::JoinHandle<Result<()>>> {
            (0..n)
                .map(|_| {
                    let writer = writer.clone();
                    tokio::spawn(async move { writer.append(json!({})).await })
                })
                .collect()
        }

        #[tokio::test]
        async fn events_queued_during_an_append_go_together_in_the_next_group() {
            let (log, writer) = scripted().await;
            let first = spawn_appends(&writer, 1);
            until(|| log.groups.lock().unwrap().len() == 1).await;
            let waiting = spawn_appends(&writer, 10);
            until(|| QUEUE_LIMIT - writer.queue.capacity() == 10).await;
            log.gate.add_permits(2);
            for answer in first.into_iter().chain(waiting) {
                answer.await.unwrap().unwrap();
            }
            assert_eq!(*log.groups.lock().unwrap(), [1, 10]);
        }

        #[tokio::test]
        async fn every_waiter_of_a_failed_group_is_answered_with_the_error() {
            let (log, writer) = scripted().await;
            let first = spawn_appends(&writer, 1);
            until(|| log.groups.lock().unwrap().len() == 1).await;
            let waiting = spawn_appends(&writer, 5);
            until(|| QUEUE_LIMIT - writer.queue.capacity() == 5).await;
            log.gate.add_permits(1);
            first.into_iter().next().unwrap().await.unwrap().unwrap();
            log.fail.store(true, Ordering::SeqCst);
            // The group, then each of its callers alone.
            log.gate.add_permits(6);
            for answer in waiting {
                let answer = answer.await.unwrap();
                assert!(matches!(answer, Err(StoreError::Database(_))), "{answer:?}");
            }
            assert_eq!(*log.groups.lock().unwrap(), [1, 5, 1, 1, 1, 1, 1]);
        }

        #[tokio::test]
        async fn one_callers_bad_event_fails_that_caller_alone() {
            let (log, writer) = scripted().await;
            let first = spawn_appends(&writer, 1);
            until(|| log.groups.lock().unwrap().len() == 1).await;
            let good = spawn_appends(&writer, 2);
            let bad = {
                let writer = writer.clone();
                tokio::spawn(async move {
                    writer
                        .append_all(vec![json!({"bad": true}), json!({})])
                        .await
                })
            };
            until(|| QUEUE_LIMIT - writer.queue.capacity() == 3).await;
            log.gate.add_permits(5);
            first.into_iter().next().unwrap().await.unwrap().unwrap();
            for answer in good {
                answer.await.unwrap().unwrap();
            }
            let answer = bad.await.unwrap();
            assert!(matches!(answer, Err(StoreError::Database(_))), "{answer:?}");
            // The group of four events, then its three callers one by one.
            let mut groups = log.groups.lock().unwrap().clone();
            assert_eq!(groups[..2], [1, 4]);
            groups[2..].sort_unstable();
            assert_eq!(groups[2..], [1, 1, 2]);
        }

        #[tokio::test]
        async fn a_panicking_append_fails_its_callers_and_the_writer_carries_on() {
            let (log, writer) = scripted().await;
            log.panic.store(true, Ordering::SeqCst);
            log.gate.add_permits(10);
            let answer = writer.append(json!({})).await;
            assert!(matches!(answer, Err(StoreError::Database(_))), "{answer:?}");
            log.panic.store(false, Ordering::SeqCst);
            writer.append(json!({})).await.unwrap();
            assert!(format!("{writer:?}").contains("stopped: false"));
        }

        #[tokio::test]
        async fn appends_fail_and_never_succeed_once_the_writer_task_is_gone() {
            let (log, writer) = scripted().await;
            // A writer whose task is gone: its queue has no receiver.
            let (queue, queued) = mpsc::channel(1);
            drop(queued);
            let stopped = AuditWriter {
                queue,
                store: writer.store.clone(),
            };
            let answer = stopped.append(json!({})).await;
            assert!(
                matches!(answer, Err(StoreError::Unavailable(_))),
                "{answer:?}"
            );
            assert!(format!("{stopped:?}").contains("stopped: true"));
            assert!(log.groups.lock().unwrap().is_empty());
            drop(writer);
        }

        #[tokio::test]
        async fn a_malformed_event_is_refused_without_reaching_the_group() {
            let (log, writer) = scripted().await;
            let answer = writer.append(json!(["not", "an", "object"])).await;
            assert!(matches!(answer, Err(StoreError::Database(_))), "{answer:?}");
            assert!(log.groups.lock().unwrap().is_empty());
        }
    }

    fn values_of(entries: &[IndexEntry], param: &str) -> Vec<(String, String)> {
        entries
            .iter()
            .filter(|e| e.param == param)
            .map(|e| (e.system.clone(), e.value.clone()))
            .collect()
    }

    fn plain(values: &[&str]) -> Vec<(String, String)> {
        values
            .iter()
            .map(|v| (String::new(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn index_entries_cover_every_searchable_element() {
        let event = json!({
            "resourceType": "AuditEvent",
            "type": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110112"},
            "subtype": [{"system": "http://hl7.org/fhir/restful-interaction", "code": "read"},
                        {"code": "bare"}],
            "action": "R",
            "outcome": "0",
            "agent": [
                {"who": {"reference": "Practitioner/7", "identifier": {"value": "client-1"}}},
                {"who": {"reference": "Patient/9/_history/2"}}
            ],
            "entity": [
                {"what": {"reference": "Patient/1/_history/3"}},
                {"what": {"reference": "Observation/5"}},
                {"what": {"identifier": {"value": "no reference"}}}
            ]
        });
        let entries = index_entries(&event);
        assert_eq!(
            values_of(&entries, "agent"),
            plain(&["Practitioner/7", "client-1", "Patient/9/_history/2"])
        );
        assert_eq!(
            values_of(&entries, "patient"),
            plain(&["Patient/9", "Patient/1"])
        );
        assert_eq!(
            values_of(&entries, "entity"),
            plain(&["Patient/1/_history/3", "Patient/1", "Observation/5"])
        );
        assert_eq!(values_of(&entries, "outcome"), plain(&["0"]));
        assert_eq!(values_of(&entries, "action"), plain(&["R"]));
        assert_eq!(
            values_of(&entries, "type"),
            [(
                "http://dicom.nema.org/resources/ontology/DCM".to_owned(),
                "110112".to_owned()
            )]
        );
        assert_eq!(
            values_of(&entries, "subtype"),
            [
                (
                    "http://hl7.org/fhir/restful-interaction".to_owned(),
                    "read".to_owned()
                ),
                (String::new(), "bare".to_owned())
            ]
        );
    }

    #[test]
    fn stamped_events_are_linked_after_the_head_in_order() {
        let now = datetime!(2026-03-01 12:00:00 UTC);
        let stamped = StampedEvent::stamp_all(
            vec![
                json!({"recorded": "2026-03-01T13:00:00.1234567+01:00"}),
                json!({"id": "client-chosen", "meta": {"versionId": "9"}}),
            ],
            now,
        )
        .unwrap();
        assert_eq!(
            stamped[0].0.recorded,
            datetime!(2026-03-01 12:00:00.123456 UTC)
        );
        // Without a valid recorded instant the append time stands in.
        assert_eq!(stamped[1].0.recorded, now);
        let second: Value = serde_json::from_str(stamped[1].text()).unwrap();
        assert_eq!(second["resourceType"], "AuditEvent");
        assert_eq!(second["id"], stamped[1].0.id.as_str());
        assert_ne!(second["id"], "client-chosen");
        assert_eq!(second["meta"]["versionId"], "1");
        assert_eq!(second["meta"]["lastUpdated"], "2026-03-01T12:00:00.000000Z");

        let first_canonical = stamped[0].0.canonical.clone();
        let linked = link(Some((4, "h4".to_owned())), stamped);
        assert_eq!(linked[0].position, 5);
        assert_eq!(linked[0].previous_hash, "h4");
        assert_eq!(linked[0].hash, link_hash("h4", &first_canonical));
        assert_eq!(linked[1].position, 6);
        assert_eq!(linked[1].previous_hash, linked[0].hash);

        let first = link(None, StampedEvent::stamp_all(vec![json!({})], now).unwrap());
        assert_eq!(first[0].position, 1);
        assert_eq!(first[0].previous_hash, GENESIS);
    }

    #[test]
    fn an_event_is_hashed_as_its_stored_text_reads_back_with_or_without_fractions() {
        let now = datetime!(2026-03-01 12:00:00 UTC);
        let events = vec![
            json!({"outcome": "0", "entity": [{"what": {"reference": "Patient/1"}}], "n": 7}),
            json!({"outcome": "0", "extension": [{"valueDecimal": 0.1}, {"valueDecimal": 2.5e-7}]}),
        ];
        assert!(reads_back_exactly(&events[0]));
        assert!(!reads_back_exactly(&events[1]));
        for stamped in StampedEvent::stamp_all(events, now).unwrap() {
            let read: Value = serde_json::from_str(stamped.text()).unwrap();
            assert_eq!(stamped.0.canonical, canonical_json(&read));
            assert_eq!(stamped.0.index, index_entries(&read));
        }
    }

    #[test]
    fn an_event_nested_too_deep_to_read_back_is_refused() {
        let mut deep = json!("bottom");
        for _ in 0..200 {
            deep = json!([deep]);
        }
        let error = StampedEvent::stamp_all(
            vec![json!({"extension": deep})],
            datetime!(2026-03-01 12:00 UTC),
        )
        .unwrap_err();
        assert!(error.to_string().contains("does not read back"), "{error}");
    }

    #[test]
    fn a_record_converts_to_a_link_that_verifies() {
        let now = datetime!(2026-03-01 12:00:00 UTC);
        let links: Vec<StoredLink> = link(
            None,
            StampedEvent::stamp_all(vec![json!({}), json!({})], now).unwrap(),
        )
        .into_iter()
        .map(|l| {
            decode(l.position, l.stamped.text(), l.previous_hash, l.hash)
                .unwrap()
                .into()
        })
        .collect();
        assert_eq!(haven_audit::verify(&links), Ok(2));
    }
}
