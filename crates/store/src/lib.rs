//! Haven's versioned FHIR resource store.
//!
//! [`Store`] is the one storage interface; [`sqlite::SqliteStore`] and
//! [`postgres::PostgresStore`] implement it on sqlx. Which one runs is decided once,
//! by [`connect`], from the database URL; nothing above this crate knows the backend.
//!
//! Every version of a resource is its own row; a per-resource pointer names the
//! current one; a delete is a version without a body. The store stamps `id`,
//! `meta.versionId` and `meta.lastUpdated` itself from the injected [`Clock`], so
//! no client can choose them. Writes happen inside a [`StoreTx`]: everything one
//! request writes commits together or not at all.

use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use haven_model::clock::Clock;
use serde_json::Value;
use time::OffsetDateTime;

mod audit_log;
mod auth_records;
mod checkpoint;
mod criteria;
mod document;
pub mod error;
pub mod postgres;
mod query;
mod readers;
mod search_rows;
mod search_sql;
pub mod sqlite;
mod version;
mod write_group;

pub use audit_log::{AuditWriter, StampedEvent};
pub use criteria::{
    Access, AccessRule, BothAccess, Criterion, IndexKind, Prefix, Range, SortBy, SortKey,
    StringMatch, TypeAccess, UriMatch,
};
pub use error::StoreError;

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Which database a store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// How a version came to be; history entries report it as `request.method`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Create,
    Update,
    Delete,
}

/// One stored version of a resource.
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceVersion {
    pub resource_type: String,
    pub id: String,
    /// 1, 2, 3, ... per resource; `meta.versionId` is its decimal form.
    pub version: i64,
    pub last_updated: OffsetDateTime,
    pub change: Change,
    /// The resource with `id` and `meta` stamped by the store; `None` for a deletion.
    pub resource: Option<Value>,
}

impl ResourceVersion {
    pub fn is_deleted(&self) -> bool {
        self.resource.is_none()
    }
}

/// A comparison against an instant, used for `_lastUpdated`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparator {
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstantBound {
    pub comparator: Comparator,
    pub instant: OffsetDateTime,
}

/// One value of a token search: `system|code`, `|code` (no system), `system|`, or `code`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenValue {
    /// `None`: any system. `Some("")`: the value must have no system.
    pub system: Option<String>,
    /// `None`: any code in the system.
    pub code: Option<String>,
}

/// A condition on a resource's content that the database cannot evaluate (an
/// access rule, say). Queries carrying one are evaluated row by row, in order,
/// before paging and counting, so totals and pages never include what it refuses.
#[derive(Clone)]
pub struct ContentFilter(Arc<dyn Fn(&Value) -> bool + Send + Sync>);

impl ContentFilter {
    pub fn new(admits: impl Fn(&Value) -> bool + Send + Sync + 'static) -> Self {
        Self(Arc::new(admits))
    }

    pub fn admits(&self, resource: &Value) -> bool {
        (self.0)(resource)
    }
}

impl Debug for ContentFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ContentFilter")
    }
}

impl PartialEq for ContentFilter {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for ContentFilter {}

/// A search over current, non-deleted resources.
#[derive(Debug, Clone, Default)]
pub struct SearchQuery {
    /// The types searched; empty searches every type (system search).
    pub types: Vec<String>,
    /// What a resource must meet; see [`Criterion`].
    pub criterion: Criterion,
    /// `_sort`; empty sorts by `_lastUpdated`, oldest first. Ties are broken
    /// by type and id, so the order is total and pages are stable.
    pub sort: Vec<SortKey>,
    /// Page size; 0 returns no resources (for counts).
    pub count: u32,
    /// How many matches to skip.
    pub offset: u64,
    /// Whether to count every match.
    pub total: bool,
    /// Only resources it admits match; evaluated row by row, so it scans.
    pub filter: Option<ContentFilter>,
    /// The caller's access, compiled into the query (see [`AccessRule`]);
    /// `None` is unrestricted.
    pub access: Option<Access>,
    /// This server's base URL with a trailing `/`: a reference stored as an
    /// absolute URL under it is local, like a relative one. Without it only
    /// relative references are local (another server's `Patient/1` is not ours).
    pub local_base: Option<String>,
}

impl SearchQuery {
    /// A search of one type.
    pub fn of_type(resource_type: &str) -> Self {
        Self {
            types: vec![resource_type.to_owned()],
            ..Self::default()
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SearchPage {
    pub resources: Vec<ResourceVersion>,
    /// The number of matches, when asked for.
    pub total: Option<u64>,
    /// Whether more matches follow this page.
    pub more: bool,
}

/// A history query: for one resource, one type, or the whole system.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HistoryQuery {
    pub resource_type: Option<String>,
    /// Requires `resource_type`.
    pub id: Option<String>,
    /// `_since`: only versions changed at or after this instant.
    pub since: Option<OffsetDateTime>,
    /// `_at`: only versions that were current at this instant, or, with
    /// [`HistoryQuery::at_until`], at some moment of the period from it.
    pub at: Option<OffsetDateTime>,
    /// The exclusive end of the `_at` period (`_at=2024-03-01` covers that day).
    pub at_until: Option<OffsetDateTime>,
    pub count: u32,
    /// Continue after this position (an opaque number from [`HistoryPage::next`]);
    /// positions do not move when data changes, so pages stay stable.
    pub before: Option<i64>,
    pub total: bool,
    /// Only versions whose content it admits are listed; deletions, which have no
    /// content, are then left out.
    pub filter: Option<ContentFilter>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HistoryPage {
    /// Newest first.
    pub versions: Vec<ResourceVersion>,
    pub total: Option<u64>,
    /// Where the next page starts, if there is one.
    pub next: Option<i64>,
}

/// The storage interface. Reads outside a transaction see committed data only.
#[async_trait]
pub trait Store: Send + Sync + Debug {
    fn backend(&self) -> Backend;

    /// Starts a write transaction. Dropping it without [`StoreTx::commit`] rolls back.
    async fn begin(&self) -> Result<Box<dyn StoreTx>>;

    /// Starts a write transaction that will write many rows, such as a large
    /// transaction bundle. A backend whose small transactions share commits runs
    /// this one on its own: sharing a commit would gain it nothing, and would
    /// keep a copy of every page it changes in memory until it ends. Elsewhere
    /// the same as [`Store::begin`].
    async fn begin_large(&self) -> Result<Box<dyn StoreTx>> {
        self.begin().await
    }

    /// The current version, including a deletion version; `None` if never stored.
    async fn read(&self, resource_type: &str, id: &str) -> Result<Option<ResourceVersion>>;

    /// One version; `None` if it does not exist.
    async fn vread(
        &self,
        resource_type: &str,
        id: &str,
        version: i64,
    ) -> Result<Option<ResourceVersion>>;

    async fn search(&self, query: &SearchQuery) -> Result<SearchPage>;

    /// The type and id of the first `limit` matches of a search, in its order
    /// (its `count` and `offset` are not used): what a stable result set is
    /// made of.
    async fn search_keys(&self, query: &SearchQuery, limit: u32) -> Result<Vec<(String, String)>> {
        keys_by_reading(self, query, limit).await
    }

    /// Whether the caller's access policy left out some match of this query
    /// that the rest of its access would admit. Stores that apply no such
    /// policy know of nothing withheld.
    async fn withheld(&self, _query: &SearchQuery) -> Result<bool> {
        Ok(false)
    }

    async fn history(&self, query: &HistoryQuery) -> Result<HistoryPage>;

    /// How many current, non-deleted resources of each type there are.
    async fn count_by_type(&self) -> Result<Vec<(String, u64)>>;

    /// The authorization server's records; see [`AuthRecords`].
    fn auth_records(&self) -> &dyn AuthRecords;

    /// The append-only audit trail; see [`AuditLog`].
    fn audit_log(&self) -> &dyn AuditLog;
}

/// The keys of a search's first `limit` matches, read with their bodies.
pub(crate) async fn keys_by_reading<S: Store + ?Sized>(
    store: &S,
    query: &SearchQuery,
    limit: u32,
) -> Result<Vec<(String, String)>> {
    let mut whole = query.clone();
    whole.count = limit;
    whole.offset = 0;
    whole.total = false;
    let page = store.search(&whole).await?;
    Ok(page
        .resources
        .into_iter()
        .map(|v| (v.resource_type, v.id))
        .collect())
}

/// One stored AuditEvent with its place in the hash chain.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRecord {
    /// 1, 2, 3, ... in the order records were appended.
    pub position: u64,
    /// The AuditEvent as stored: `id` and `meta` stamped by the store.
    pub event: Value,
    /// The `hash` of the record before this one, or [`haven_audit::GENESIS`].
    pub previous_hash: String,
    /// `haven_audit::link_hash(previous_hash, canonical_json(event))`.
    pub hash: String,
}

/// A search over the audit trail. Criteria are combined with AND; the values of
/// one criterion are alternatives (OR). Results are newest first.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuditQuery {
    /// `_id`.
    pub ids: Vec<String>,
    /// `date`: `recorded` must satisfy every bound.
    pub date: Vec<InstantBound>,
    /// `agent`: an agent's `who.reference` (e.g. `Practitioner/1`) or
    /// `who.identifier.value` (a username or client id) equals one of these.
    pub agent: Vec<String>,
    /// `patient`: `Patient/<id>` references; an entity or agent names the patient.
    pub patient: Vec<String>,
    /// `entity`: an entity's `what.reference` equals one of these, with or
    /// without its `/_history/<version>` suffix (`Patient/1` matches
    /// `Patient/1/_history/3`).
    pub entity: Vec<String>,
    /// `outcome`: `0`, `4`, `8` or `12`.
    pub outcome: Vec<String>,
    /// `action`: `C`, `R`, `U`, `D` or `E`.
    pub action: Vec<String>,
    /// `policy`: an agent's `policy` (a Consent, break the glass) equals one of these.
    pub policy: Vec<String>,
    /// `request`: the request id (`X-Request-Id`) the event records.
    pub request: Vec<String>,
    /// `type`: a code of `AuditEvent.type`.
    pub event_type: Vec<TokenValue>,
    /// `subtype`: a code of `AuditEvent.subtype`.
    pub subtype: Vec<TokenValue>,
    pub count: u32,
    pub offset: u64,
    pub total: bool,
    /// Only events it admits match (applied before paging and counting).
    pub filter: Option<ContentFilter>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AuditPage {
    /// Newest first.
    pub records: Vec<AuditRecord>,
    pub total: Option<u64>,
    pub more: bool,
}

/// The audit trail: an append-only, hash-chained table of AuditEvents. Every
/// append is committed before it returns; appends are serialized so the chain
/// never forks, whichever connection or process appends.
#[async_trait]
pub trait AuditLog: Send + Sync {
    /// Stamps `id` (a new UUID), `meta.versionId` (`1`) and `meta.lastUpdated`
    /// (the clock) on each event and serializes it. No IO: many callers stamp
    /// at once, before their events meet in one append.
    fn stamp(&self, events: Vec<Value>) -> Result<Vec<StampedEvent>>;

    /// Chains stamped events in order after the current head and commits them
    /// in one transaction: all are stored or none is.
    async fn append(&self, events: Vec<StampedEvent>) -> Result<()>;

    /// One AuditEvent by id.
    async fn read(&self, id: &str) -> Result<Option<AuditRecord>>;

    async fn search(&self, query: &AuditQuery) -> Result<AuditPage>;

    /// Stored records in position order, starting after `after` (0: from the
    /// first), at most `limit` of them: what `haven audit verify` walks.
    async fn chain(&self, after: u64, limit: u32) -> Result<Vec<AuditRecord>>;
}

/// Small keyed JSON records of the authorization server (clients, users, codes,
/// grants, ...), grouped by kind. A record past its expiry counts as absent.
/// Every operation is atomic on its own, which is what single-use codes and
/// rotating refresh tokens need.
#[async_trait]
pub trait AuthRecords: Send + Sync {
    /// Stores a record unless a live one has the key; `false` if one had.
    async fn insert(
        &self,
        kind: &str,
        key: &str,
        value: &Value,
        expires_at: Option<OffsetDateTime>,
    ) -> Result<bool>;

    /// As [`AuthRecords::insert`], but answers once the insert has run in a
    /// transaction that is not yet committed, so that the caller can go on
    /// meanwhile. A record it stored holds only once
    /// [`StagedInsert::committed`] succeeds; one it found already there may
    /// be refused at once. A store that cannot tell early answers once the
    /// insert is committed.
    async fn insert_staged(
        &self,
        kind: &str,
        key: &str,
        value: &Value,
        expires_at: Option<OffsetDateTime>,
    ) -> Result<StagedInsert> {
        let inserted = self.insert(kind, key, value, expires_at).await?;
        Ok(StagedInsert::already_committed(inserted))
    }

    /// Stores a record, replacing any with the key.
    async fn put(
        &self,
        kind: &str,
        key: &str,
        value: &Value,
        expires_at: Option<OffsetDateTime>,
    ) -> Result<()>;

    /// The live record with the key.
    async fn get(&self, kind: &str, key: &str) -> Result<Option<Value>>;

    /// The live record of each `(kind, key)`, in the order asked. The stores
    /// of this crate read them in one query; a store without that reads them
    /// one by one.
    async fn get_each(&self, wanted: &[(&str, &str)]) -> Result<Vec<Option<Value>>> {
        let mut found = Vec::with_capacity(wanted.len());
        for (kind, key) in wanted {
            found.push(self.get(kind, key).await?);
        }
        Ok(found)
    }

    /// Replaces the live record only if it still equals `expected`; `false` if
    /// it did not (someone else changed it first, or it is gone).
    async fn replace(&self, kind: &str, key: &str, expected: &Value, value: &Value)
        -> Result<bool>;

    /// Removes the record; `false` if there was none.
    async fn delete(&self, kind: &str, key: &str) -> Result<bool>;

    /// Every live record of a kind, by key.
    async fn list(&self, kind: &str) -> Result<Vec<(String, Value)>>;
}

/// An [`AuthRecords::insert_staged`] whose statement has run: whether it
/// stored the record, and the commit that makes that true.
pub struct StagedInsert {
    pub inserted: bool,
    commit: Pin<Box<dyn Future<Output = Result<()>> + Send>>,
}

impl StagedInsert {
    pub fn new(inserted: bool, commit: impl Future<Output = Result<()>> + Send + 'static) -> Self {
        Self {
            inserted,
            commit: Box::pin(commit),
        }
    }

    /// An insert already committed.
    pub fn already_committed(inserted: bool) -> Self {
        Self::new(inserted, std::future::ready(Ok(())))
    }

    /// Waits for the commit. On an error the insert may not have happened,
    /// whatever `inserted` said.
    pub async fn committed(self) -> Result<()> {
        self.commit.await
    }
}

impl std::fmt::Debug for StagedInsert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StagedInsert")
            .field("inserted", &self.inserted)
            .finish_non_exhaustive()
    }
}

/// One database transaction. On PostgreSQL and SQLite alike, the transaction holds
/// the write lock it needs so that two racing updates of one version cannot both win.
#[async_trait]
pub trait StoreTx: Send {
    /// The current version as this transaction sees it, including deletions.
    async fn read(&mut self, resource_type: &str, id: &str) -> Result<Option<ResourceVersion>>;

    /// Stores version 1 of a new resource with the given id.
    /// [`StoreError::AlreadyExists`] if the id is taken (even by a deleted resource).
    async fn create(
        &mut self,
        resource_type: &str,
        id: &str,
        resource: Value,
    ) -> Result<ResourceVersion>;

    /// Stores a new version. With `expected_version`, fails with
    /// [`StoreError::VersionConflict`] unless the current version is that one.
    /// A resource that does not exist (or was deleted) is created; the returned flag
    /// says whether that happened.
    async fn update(
        &mut self,
        resource_type: &str,
        id: &str,
        resource: Value,
        expected_version: Option<i64>,
    ) -> Result<(ResourceVersion, bool)>;

    /// Stores a deletion version. Returns `None` when there was nothing to delete
    /// (never stored, or already deleted).
    async fn delete(
        &mut self,
        resource_type: &str,
        id: &str,
        expected_version: Option<i64>,
    ) -> Result<Option<ResourceVersion>>;

    /// A search that sees this transaction's own writes (for conditional interactions).
    async fn search(&mut self, query: &SearchQuery) -> Result<SearchPage>;

    /// Appends AuditEvents to the audit trail as [`AuditLog::append`] does, but
    /// inside this transaction: they commit with its writes or not at all. A
    /// store may send them with the transaction's next statement, so a refusal
    /// can come from that statement or from the commit instead.
    async fn append_audit(&mut self, events: Vec<Value>) -> Result<()>;

    async fn commit(self: Box<Self>) -> Result<()>;
}

/// The backend a database URL names: `sqlite:...`, `postgres://...` or
/// `postgresql://...`; anything else is [`StoreError::Unsupported`].
pub fn backend_of(database_url: &str) -> Result<Backend> {
    if database_url.starts_with("sqlite:") {
        Ok(Backend::Sqlite)
    } else if database_url.starts_with("postgres://") || database_url.starts_with("postgresql://") {
        Ok(Backend::Postgres)
    } else {
        // Only the scheme is echoed: the rest may hold a password.
        let scheme = database_url.split(':').next().unwrap_or_default();
        Err(StoreError::Unsupported(format!(
            "database URL scheme {scheme:?}; use sqlite: or postgres://"
        )))
    }
}

/// Opens the store named by a database URL (`sqlite:...` or `postgres://...`) and
/// brings its schema up to date.
pub async fn connect(database_url: &str, clock: Arc<dyn Clock>) -> Result<Arc<dyn Store>> {
    Ok(match backend_of(database_url)? {
        Backend::Sqlite => Arc::new(sqlite::SqliteStore::connect(database_url, clock).await?),
        Backend::Postgres => Arc::new(postgres::PostgresStore::connect(database_url, clock).await?),
    })
}

/// Brings the schema of the database named by the URL up to date, and nothing else.
pub async fn migrate(database_url: &str) -> Result<()> {
    match backend_of(database_url)? {
        Backend::Sqlite => sqlite::migrate(database_url).await,
        Backend::Postgres => postgres::migrate(database_url).await,
    }
}
