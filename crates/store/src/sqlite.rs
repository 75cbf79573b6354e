//! The SQLite backend.
//!
//! SQLite has one writer at a time, so writes run on a pool of exactly one
//! connection, in transactions begun with `BEGIN IMMEDIATE`: they queue for it
//! instead of failing with `SQLITE_BUSY` when a read lock would have to be
//! upgraded. Concurrent write transactions share commits ([`WriteGroup`]). Reads
//! use a separate pool and, thanks to WAL, never wait for the writer.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use haven_model::clock::{format_instant, Clock};
use serde_json::Value;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Row, SqlitePool};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::audit_log::{self, StampedEvent, RECORD_COLUMNS};
use crate::auth_records::SqliteAuthRecords;
use crate::checkpoint::{self, Checkpoints};
use crate::document::identifier_tokens;
use crate::query::{self, Param, Sql};
use crate::readers::Readers;
use crate::search_rows::{Column, IndexRows, BACKFILL_BATCH, SEARCH_INDEX_VERSION, TABLES};
use crate::search_sql;
use crate::version::{change_from_name, change_name, check_expected, new_version};
use crate::write_group::{GroupTx, WriteGroup};
use crate::{
    AuditLog, AuditPage, AuditQuery, AuditRecord, AuthRecords, Backend, Change, HistoryPage,
    HistoryQuery, ResourceVersion, Result, SearchPage, SearchQuery, Store, StoreError, StoreTx,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/sqlite");

/// How long a statement waits for a lock held by another process.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request may queue for the single writer connection.
const WRITER_WAIT: Duration = Duration::from_secs(60);
const READERS: usize = 4;
/// How long a read may queue for a reader connection.
const READER_WAIT: Duration = Duration::from_secs(30);
/// Page cache of each connection, as SQLite's `cache_size` takes it: negative
/// means KiB. The writer's holds the index pages that commits keep touching.
const WRITER_CACHE_KIB: &str = "-16384";
const READER_CACHE_KIB: &str = "-4096";

pub struct SqliteStore {
    group: Arc<WriteGroup>,
    readers: Readers,
    clock: Arc<dyn Clock>,
    auth: SqliteAuthRecords,
    audit: SqliteAuditLog,
    /// Set for `sqlite::memory:`, which is backed by a temporary file (see [`options`]).
    _scratch: Option<ScratchFile>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").finish_non_exhaustive()
    }
}

/// A database file that exists only as long as the store; removed on drop.
#[derive(Debug)]
struct ScratchFile(PathBuf);

impl Drop for ScratchFile {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let mut path = self.0.clone().into_os_string();
            path.push(suffix);
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Connection options for the URL. An in-memory database cannot be shared by two
/// pools, so `sqlite::memory:` becomes a private temporary file with the same
/// lifetime as the store.
fn options(database_url: &str) -> Result<(SqliteConnectOptions, Option<ScratchFile>)> {
    static SCRATCH_COUNTER: AtomicU64 = AtomicU64::new(0);
    let rest = database_url
        .strip_prefix("sqlite:")
        .ok_or_else(|| StoreError::Unsupported("not a sqlite: URL".into()))?;
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    if rest == ":memory:" || rest.is_empty() || rest.starts_with(":memory:?") {
        let name = format!(
            "haven-{}-{}-{}.db",
            std::process::id(),
            SCRATCH_COUNTER.fetch_add(1, Ordering::Relaxed),
            OffsetDateTime::now_utc().unix_timestamp_nanos()
        );
        let path = std::env::temp_dir().join(name);
        let options = SqliteConnectOptions::new().filename(&path);
        return Ok((in_memory_temporaries(options), Some(ScratchFile(path))));
    }
    let options = SqliteConnectOptions::from_str(&format!("sqlite://{rest}"))
        .map_err(|e| StoreError::Unsupported(format!("bad sqlite URL: {e}")))?;
    Ok((in_memory_temporaries(options), None))
}

/// Statement journals (kept for each statement of a multi-statement write, to
/// undo it alone) and sort b-trees stay in memory: as temporary files they cost
/// a system call per page written.
fn in_memory_temporaries(options: SqliteConnectOptions) -> SqliteConnectOptions {
    options.pragma("temp_store", "memory")
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

async fn open_writer(options: SqliteConnectOptions) -> Result<SqlitePool> {
    let options = options
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .foreign_keys(true)
        .busy_timeout(BUSY_TIMEOUT)
        .pragma("cache_size", WRITER_CACHE_KIB)
        .pragma("wal_autocheckpoint", checkpoint::WRITER_BACKSTOP_PAGES);
    let writer = SqlitePoolOptions::new()
        .max_connections(1)
        .min_connections(1)
        .test_before_acquire(false)
        .acquire_timeout(WRITER_WAIT)
        .idle_timeout(None)
        .max_lifetime(None)
        .connect_with(options)
        .await
        .map_err(unavailable)?;
    MIGRATOR.run(&writer).await.map_err(unavailable)?;
    Ok(writer)
}

/// Brings the schema of the database at `database_url` up to date.
pub async fn migrate(database_url: &str) -> Result<()> {
    let (options, _scratch) = options(database_url)?;
    let writer = open_writer(options).await?;
    writer.close().await;
    Ok(())
}

impl SqliteStore {
    pub async fn connect(database_url: &str, clock: Arc<dyn Clock>) -> Result<Self> {
        let (options, scratch) = options(database_url)?;
        let writer = open_writer(options.clone()).await?;
        // The journal mode is a property of the file, already set by the writer.
        let readers = Readers::open(
            options
                .clone()
                .synchronous(SqliteSynchronous::Full)
                .foreign_keys(true)
                .busy_timeout(BUSY_TIMEOUT)
                .pragma("cache_size", READER_CACHE_KIB),
            READERS,
            READER_WAIT,
        )
        .await?;
        backfill_search_index(&writer).await?;
        // Its own connection, so that the writer never waits for a checkpoint.
        let checkpoints = SqlitePoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .connect_with(options.synchronous(SqliteSynchronous::Full))
            .await
            .map_err(unavailable)?;
        let checkpoints = Arc::new(Checkpoints::new(checkpoints));
        let group = Arc::new(WriteGroup::new(
            writer.clone(),
            WRITER_WAIT,
            Some(checkpoints),
        ));
        let auth = SqliteAuthRecords::new(group.clone(), readers.clone(), clock.clone());
        let audit = SqliteAuditLog {
            group: group.clone(),
            readers: readers.clone(),
            clock: clock.clone(),
        };
        Ok(Self {
            group,
            readers,
            clock,
            auth,
            audit,
            _scratch: scratch,
        })
    }

    /// A store transaction on `tx`, which began with the read [`AUDIT_HEAD`]
    /// and found `head`.
    fn transaction(&self, tx: GroupTx, head: Option<SqliteRow>) -> Result<Box<dyn StoreTx>> {
        Ok(Box::new(SqliteTx {
            tx,
            clock: self.clock.clone(),
            audit_head: decode_head(head)?,
            audit_failed: false,
            pending_audit: Batch::new(),
        }))
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> Backend {
        Backend::Sqlite
    }

    // A write transaction nearly always appends an AuditEvent, so it reads
    // the chain's head with the statement that starts it.
    async fn begin(&self) -> Result<Box<dyn StoreTx>> {
        let (tx, head) = self.group.begin_reading(Some(AUDIT_HEAD)).await?;
        self.transaction(tx, head)
    }

    async fn begin_large(&self) -> Result<Box<dyn StoreTx>> {
        let (tx, head) = self.group.begin_alone(Some(AUDIT_HEAD)).await?;
        self.transaction(tx, head)
    }

    async fn read(&self, resource_type: &str, id: &str) -> Result<Option<ResourceVersion>> {
        let mut conn = self.readers.acquire().await?;
        read_current(&mut conn, resource_type, id).await
    }

    async fn vread(
        &self,
        resource_type: &str,
        id: &str,
        version: i64,
    ) -> Result<Option<ResourceVersion>> {
        let row = sqlx::query(
            "SELECT v.seq, v.resource_type, v.id, v.version, v.last_updated, v.change, v.body \
             FROM resource_versions v WHERE v.resource_type = ?1 AND v.id = ?2 AND v.version = ?3",
        )
        .bind(resource_type)
        .bind(id)
        .bind(version)
        .fetch_optional(&mut *self.readers.acquire().await?)
        .await?;
        row.map(|row| decode_version(&row)).transpose()
    }

    async fn search(&self, query: &SearchQuery) -> Result<SearchPage> {
        let mut conn = self.readers.acquire().await?;
        search_on(&mut conn, query).await
    }

    async fn search_keys(&self, query: &SearchQuery, limit: u32) -> Result<Vec<(String, String)>> {
        if query.filter.is_some() {
            // A content filter needs each body; the bodies' search does that.
            return crate::keys_by_reading(self, query, limit).await;
        }
        let sql = search_sql::keys(query::SQLITE, query, limit)?;
        let mut conn = self.readers.acquire().await?;
        let rows = bind_all(&sql).fetch_all(&mut *conn).await?;
        rows.iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect()
    }

    async fn history(&self, query: &HistoryQuery) -> Result<HistoryPage> {
        let (page, count) = query::history(query::SQLITE, query)?;
        let mut conn = self.readers.acquire().await?;
        let rows = fetch_all(&mut conn, &page)
            .await?
            .iter()
            .map(|row| Ok((row.try_get(0)?, decode_version(row)?)))
            .collect::<Result<_>>()?;
        let total = match count {
            Some(count) => Some(fetch_count(&mut conn, &count).await?),
            None => None,
        };
        Ok(query::history_page(query, rows, total))
    }

    fn auth_records(&self) -> &dyn AuthRecords {
        &self.auth
    }

    fn audit_log(&self) -> &dyn AuditLog {
        &self.audit
    }

    async fn count_by_type(&self) -> Result<Vec<(String, u64)>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT resource_type, COUNT(*) FROM current_resources \
             WHERE deleted = 0 GROUP BY resource_type ORDER BY resource_type",
        )
        .fetch_all(&mut *self.readers.acquire().await?)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(t, n)| (t, u64::try_from(n).unwrap_or(0)))
            .collect())
    }
}

fn bind_all<'q>(
    sql: &'q Sql,
) -> sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>> {
    let mut statement = sqlx::query(&sql.text);
    for param in &sql.params {
        statement = match param {
            Param::Text(text) => statement.bind(text.as_str()),
            Param::Instant(instant) => statement.bind(format_instant(*instant)),
            Param::Real(value) => statement.bind(*value),
        };
    }
    statement
}

async fn fetch_all(conn: &mut SqliteConnection, sql: &Sql) -> Result<Vec<SqliteRow>> {
    Ok(bind_all(sql).fetch_all(conn).await?)
}

async fn fetch_count(conn: &mut SqliteConnection, sql: &Sql) -> Result<u64> {
    let row = bind_all(sql).fetch_one(conn).await?;
    let n: i64 = row.try_get(0)?;
    Ok(u64::try_from(n).unwrap_or(0))
}

async fn search_on(conn: &mut SqliteConnection, query: &SearchQuery) -> Result<SearchPage> {
    let (page, count) = search_sql::search(query::SQLITE, query)?;
    let rows = if query.count > 0 || query.filter.is_some() {
        fetch_all(conn, &page).await?
    } else {
        Vec::new()
    };
    let total = match count {
        Some(count) => Some(match query::total_shown_by_page(query, rows.len()) {
            Some(shown) => shown,
            None => fetch_count(conn, &count).await?,
        }),
        None => None,
    };
    let rows = rows.iter().map(decode_version).collect::<Result<_>>()?;
    Ok(query::search_page(query, rows, total))
}

fn decode_version(row: &SqliteRow) -> Result<ResourceVersion> {
    let last_updated: String = row.try_get(4)?;
    let change: String = row.try_get(5)?;
    let body: Option<String> = row.try_get(6)?;
    let resource = body
        .map(|body| serde_json::from_str::<Value>(&body))
        .transpose()
        .map_err(|e| StoreError::Database(format!("stored resource is not JSON: {e}")))?;
    Ok(ResourceVersion {
        resource_type: row.try_get(1)?,
        id: row.try_get(2)?,
        version: row.try_get(3)?,
        last_updated: parse_instant(&last_updated)?,
        change: change_from_name(&change)?,
        resource,
    })
}

fn parse_instant(text: &str) -> Result<OffsetDateTime> {
    OffsetDateTime::parse(text, &Rfc3339)
        .map_err(|e| StoreError::Database(format!("stored instant {text:?} is invalid: {e}")))
}

async fn read_current(
    conn: &mut SqliteConnection,
    resource_type: &str,
    id: &str,
) -> Result<Option<ResourceVersion>> {
    let row = sqlx::query(
        "SELECT v.seq, v.resource_type, v.id, v.version, v.last_updated, v.change, v.body \
         FROM current_resources c JOIN resource_versions v \
         ON v.resource_type = c.resource_type AND v.id = c.id AND v.version = c.version \
         WHERE c.resource_type = ?1 AND c.id = ?2",
    )
    .bind(resource_type)
    .bind(id)
    .fetch_optional(conn)
    .await?;
    row.map(|row| decode_version(&row)).transpose()
}

struct SqliteTx {
    tx: GroupTx,
    clock: Arc<dyn Clock>,
    /// The last record of the audit chain: read as the transaction began and
    /// moved by its own appends, since it holds the writer throughout.
    audit_head: Option<(i64, String)>,
    /// Set when an audit append failed: SQLite undoes only the failing statement,
    /// so the transaction must not commit what came before it.
    audit_failed: bool,
    /// Audit records appended but not yet sent: they go with the next create's
    /// statements (a write's server-made Provenance), or alone before anything
    /// else, saving a round trip while the transaction holds the writer.
    pending_audit: Batch,
}

impl SqliteTx {
    /// Sends the audit records appended since the last statement, if any.
    async fn flush_audit(&mut self) -> Result<()> {
        let pending = std::mem::replace(&mut self.pending_audit, Batch::new());
        if let Err(e) = pending.run(&mut self.tx).await {
            self.audit_failed = true;
            return Err(e.into());
        }
        Ok(())
    }
}

/// The current pointer of a resource: its version number and whether it is deleted.
async fn current_pointer(
    conn: &mut SqliteConnection,
    resource_type: &str,
    id: &str,
) -> Result<Option<(i64, bool)>> {
    Ok(sqlx::query_as(
        "SELECT version, deleted FROM current_resources WHERE resource_type = ?1 AND id = ?2",
    )
    .bind(resource_type)
    .bind(id)
    .fetch_optional(conn)
    .await?)
}

/// Statements sent to the writer's thread together, run in order in one round
/// trip. While a transaction holds the writer, every other writer waits, and a
/// round trip (a hop to the connection's thread and back to the task) costs
/// far more than a small insert; so a write's statements go as one batch.
struct Batch {
    sql: sqlx::QueryBuilder<'static, sqlx::Sqlite>,
    statements: usize,
}

impl Batch {
    fn new() -> Self {
        Self {
            sql: sqlx::QueryBuilder::new(""),
            statements: 0,
        }
    }

    /// Starts the next statement, to be written and bound on the builder.
    fn statement(&mut self, sql: &str) -> &mut sqlx::QueryBuilder<'static, sqlx::Sqlite> {
        if self.statements > 0 {
            self.sql.push(";\n");
        }
        self.statements += 1;
        self.sql.push(sql)
    }

    /// Runs the statements in order; the first that fails stops the batch, and
    /// its error is returned.
    async fn run(mut self, conn: &mut SqliteConnection) -> std::result::Result<(), sqlx::Error> {
        if self.statements > 0 {
            // A write's few statements are prepared once and kept; a backfill's
            // thousands would only crowd the connection's statement cache.
            let keep = self.statements <= KEPT_BATCH_STATEMENTS;
            self.sql.build().persistent(keep).execute(conn).await?;
        }
        Ok(())
    }
}

/// Batches of up to this many statements stay prepared on the connection.
const KEPT_BATCH_STATEMENTS: usize = 32;

fn push_version(batch: &mut Batch, version: &ResourceVersion, body: Option<String>) {
    batch
        .statement(
            "INSERT INTO resource_versions \
             (resource_type, id, version, last_updated, change, body) VALUES (",
        )
        .push_bind(version.resource_type.clone())
        .push(", ")
        .push_bind(version.id.clone())
        .push(", ")
        .push_bind(version.version)
        .push(", ")
        .push_bind(format_instant(version.last_updated))
        .push(", ")
        .push_bind(change_name(version.change))
        .push(", ")
        .push_bind(body)
        .push(")");
}

/// Removes the key's rows from `table`.
fn push_delete(batch: &mut Batch, table: &str, resource_type: &str, id: &str) {
    batch
        .statement(&format!("DELETE FROM {table} WHERE resource_type = "))
        .push_bind(resource_type.to_owned())
        .push(" AND id = ")
        .push_bind(id.to_owned());
}

fn push_tokens(
    batch: &mut Batch,
    resource_type: &str,
    id: &str,
    had_tokens: bool,
    resource: Option<&Value>,
) {
    if had_tokens {
        push_delete(batch, "identifier_tokens", resource_type, id);
    }
    let tokens = resource.map(identifier_tokens).unwrap_or_default();
    if tokens.is_empty() {
        return;
    }
    batch
        .statement("INSERT INTO identifier_tokens (resource_type, id, system, value) ")
        .push_values(tokens, |mut row, (system, value)| {
            row.push_bind(resource_type.to_owned())
                .push_bind(id.to_owned())
                .push_bind(system)
                .push_bind(value);
        });
}

/// Removes a resource's rows from every search index table.
fn push_index_deletes(batch: &mut Batch, resource_type: &str, id: &str) {
    for table in TABLES {
        push_delete(batch, table, resource_type, id);
    }
}

/// Replaces the search index rows of one resource; `had_rows` is false when it
/// was missing or deleted, so there is nothing to remove.
fn push_index(
    batch: &mut Batch,
    resource_type: &str,
    id: &str,
    had_rows: bool,
    resource: Option<&Value>,
) {
    if had_rows {
        push_index_deletes(batch, resource_type, id);
    }
    if let Some(resource) = resource {
        let mut rows = IndexRows::new();
        rows.add(resource_type, id, resource);
        push_index_rows(batch, &rows);
    }
}

/// Bound variables per multi-row INSERT, under SQLite's limit of 32766.
const INDEX_VARIABLES_PER_STATEMENT: usize = 30_000;

/// Inserts index rows with one multi-row statement per table and chunk.
fn push_index_rows(batch: &mut Batch, rows: &IndexRows) {
    for table in &rows.tables {
        let per_statement = INDEX_VARIABLES_PER_STATEMENT / table.columns.len();
        let mut start = 0;
        while start < table.len {
            let end = (start + per_statement).min(table.len);
            batch
                .statement(&format!(
                    "INSERT INTO {} ({}) ",
                    table.name,
                    table.columns.join(", ")
                ))
                .push_values(start..end, |mut row, i| {
                    for column in &table.values {
                        match column {
                            Column::Text(values) => row.push_bind(values[i].clone()),
                            Column::Real(values) => row.push_bind(values[i]),
                            Column::Instant(values) => row.push_bind(format_instant(values[i])),
                            Column::Json(values) => row.push_bind(values[i].clone()),
                        };
                    }
                });
            start = end;
        }
    }
}

/// Adds a resource's row to `current_resources`, at version 1; fails if the
/// key is taken (see [`is_existing_resource`]).
fn push_new_pointer(batch: &mut Batch, resource_type: &str, id: &str, at: OffsetDateTime) {
    batch
        .statement(
            "INSERT INTO current_resources \
             (resource_type, id, version, last_updated, deleted) VALUES (",
        )
        .push_bind(resource_type.to_owned())
        .push(", ")
        .push_bind(id.to_owned())
        .push(", 1, ")
        .push_bind(format_instant(at))
        .push(", 0)");
}

/// Points `current_resources` at a new version of a resource that has one.
fn push_pointer(
    batch: &mut Batch,
    resource_type: &str,
    id: &str,
    version: i64,
    at: OffsetDateTime,
    deleted: bool,
) {
    batch
        .statement("UPDATE current_resources SET version = ")
        .push_bind(version)
        .push(", last_updated = ")
        .push_bind(format_instant(at))
        .push(", deleted = ")
        .push_bind(i64::from(deleted))
        .push(" WHERE resource_type = ")
        .push_bind(resource_type.to_owned())
        .push(" AND id = ")
        .push_bind(id.to_owned());
}

/// Whether `error` is the key of `current_resources` taken: the resource exists.
fn is_existing_resource(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(e)
        if e.is_unique_violation() && e.message().contains("current_resources."))
}

/// Indexes every live resource when the index follows older rules than
/// [`SEARCH_INDEX_VERSION`] (or none: a database written before the index
/// existed). Each batch is its own write transaction and replaces its resources'
/// rows, so an interrupted backfill simply runs again on the next connect.
async fn backfill_search_index(writer: &SqlitePool) -> Result<()> {
    let (version,): (i64,) =
        sqlx::query_as("SELECT version FROM search_index_state WHERE singleton = 1")
            .fetch_one(writer)
            .await?;
    if version >= SEARCH_INDEX_VERSION {
        return Ok(());
    }
    let mut after = (String::new(), String::new());
    loop {
        let mut tx = writer.begin_with("BEGIN IMMEDIATE").await?;
        let batch_rows: Vec<(String, String, Option<String>)> = sqlx::query_as(
            "SELECT c.resource_type, c.id, v.body FROM current_resources c \
             JOIN resource_versions v \
             ON v.resource_type = c.resource_type AND v.id = c.id AND v.version = c.version \
             WHERE c.deleted = 0 AND (c.resource_type, c.id) > (?1, ?2) \
             ORDER BY c.resource_type, c.id LIMIT ?3",
        )
        .bind(&after.0)
        .bind(&after.1)
        .bind(BACKFILL_BATCH)
        .fetch_all(&mut *tx)
        .await?;
        let Some(last) = batch_rows.last() else {
            sqlx::query("UPDATE search_index_state SET version = ?1 WHERE singleton = 1")
                .bind(SEARCH_INDEX_VERSION)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            return Ok(());
        };
        after = (last.0.clone(), last.1.clone());
        let mut batch = Batch::new();
        let mut rows = IndexRows::new();
        for (resource_type, id, body) in &batch_rows {
            push_index_deletes(&mut batch, resource_type, id);
            if let Some(body) = body {
                let resource: Value = serde_json::from_str(body).map_err(|e| {
                    StoreError::Database(format!("stored resource is not JSON: {e}"))
                })?;
                rows.add(resource_type, id, &resource);
            }
        }
        push_index_rows(&mut batch, &rows);
        batch.run(&mut tx).await?;
        tx.commit().await?;
    }
}

#[async_trait]
impl StoreTx for SqliteTx {
    async fn read(&mut self, resource_type: &str, id: &str) -> Result<Option<ResourceVersion>> {
        self.flush_audit().await?;
        read_current(&mut self.tx, resource_type, id).await
    }

    async fn create(
        &mut self,
        resource_type: &str,
        id: &str,
        resource: Value,
    ) -> Result<ResourceVersion> {
        let now = self.clock.now();
        let (version, body) =
            new_version(resource_type, id, 1, now, Change::Create, Some(resource))?;
        // Pending audit records lead; then, with no ON CONFLICT, a taken key
        // fails the create's first statement, which stops the batch before
        // anything of the create is written.
        let mut batch = std::mem::replace(&mut self.pending_audit, Batch::new());
        let audit_sent = batch.statements > 0;
        push_new_pointer(&mut batch, resource_type, id, now);
        push_version(&mut batch, &version, body);
        push_tokens(
            &mut batch,
            resource_type,
            id,
            false,
            version.resource.as_ref(),
        );
        push_index(
            &mut batch,
            resource_type,
            id,
            false,
            version.resource.as_ref(),
        );
        match batch.run(&mut self.tx).await {
            Ok(()) => {}
            Err(e) if is_existing_resource(&e) => {
                return Err(StoreError::AlreadyExists {
                    resource_type: resource_type.to_owned(),
                    id: id.to_owned(),
                });
            }
            Err(e) => {
                // The audit records may have been written in part.
                self.audit_failed |= audit_sent;
                return Err(e.into());
            }
        }
        Ok(version)
    }

    async fn update(
        &mut self,
        resource_type: &str,
        id: &str,
        resource: Value,
        expected_version: Option<i64>,
    ) -> Result<(ResourceVersion, bool)> {
        self.flush_audit().await?;
        let current = current_pointer(&mut self.tx, resource_type, id).await?;
        check_expected(expected_version, current.map(|(v, _)| v))?;
        let now = self.clock.now();
        let number = current.map_or(1, |(v, _)| v + 1);
        let (version, body) = new_version(
            resource_type,
            id,
            number,
            now,
            Change::Update,
            Some(resource),
        )?;
        let mut batch = Batch::new();
        match current {
            None => push_new_pointer(&mut batch, resource_type, id, now),
            Some(_) => push_pointer(&mut batch, resource_type, id, number, now, false),
        }
        push_version(&mut batch, &version, body);
        let was_live = matches!(current, Some((_, false)));
        push_tokens(
            &mut batch,
            resource_type,
            id,
            was_live,
            version.resource.as_ref(),
        );
        push_index(
            &mut batch,
            resource_type,
            id,
            was_live,
            version.resource.as_ref(),
        );
        batch.run(&mut self.tx).await?;
        let created = !was_live;
        Ok((version, created))
    }

    async fn delete(
        &mut self,
        resource_type: &str,
        id: &str,
        expected_version: Option<i64>,
    ) -> Result<Option<ResourceVersion>> {
        self.flush_audit().await?;
        let current = current_pointer(&mut self.tx, resource_type, id).await?;
        check_expected(expected_version, current.map(|(v, _)| v))?;
        let Some((number, false)) = current else {
            return Ok(None);
        };
        let now = self.clock.now();
        let (version, body) =
            new_version(resource_type, id, number + 1, now, Change::Delete, None)?;
        let mut batch = Batch::new();
        push_pointer(&mut batch, resource_type, id, number + 1, now, true);
        push_version(&mut batch, &version, body);
        push_tokens(&mut batch, resource_type, id, true, None);
        push_index(&mut batch, resource_type, id, true, None);
        batch.run(&mut self.tx).await?;
        Ok(Some(version))
    }

    async fn search(&mut self, query: &SearchQuery) -> Result<SearchPage> {
        self.flush_audit().await?;
        search_on(&mut self.tx, query).await
    }

    /// Links the events after the head and queues their statements: they are
    /// sent with the transaction's next statement, at the latest at commit.
    async fn append_audit(&mut self, events: Vec<Value>) -> Result<()> {
        match StampedEvent::stamp_all(events, self.clock.now()) {
            Ok(stamped) => {
                self.audit_head =
                    push_linked(&mut self.pending_audit, self.audit_head.clone(), stamped);
                Ok(())
            }
            Err(e) => {
                self.audit_failed = true;
                Err(e)
            }
        }
    }

    async fn commit(mut self: Box<Self>) -> Result<()> {
        if !self.audit_failed {
            self.flush_audit().await?;
        }
        if self.audit_failed {
            // Dropping the transaction rolls it back.
            return Err(audit_log::failed_in_transaction());
        }
        self.tx.commit().await
    }
}

/// [`AuditLog`] on SQLite. Appends are write transactions of their own, on the
/// single writer connection with `BEGIN IMMEDIATE`, which also excludes writers
/// in other processes, so the head read inside the transaction is the head the
/// new records follow; they share commits with concurrent writes.
pub(crate) struct SqliteAuditLog {
    group: Arc<WriteGroup>,
    readers: Readers,
    clock: Arc<dyn Clock>,
}

/// The last record of the audit chain: its position and hash.
const AUDIT_HEAD: &str = "SELECT position, hash FROM audit_events ORDER BY position DESC LIMIT 1";

/// The head found by [`AUDIT_HEAD`], if the chain has one.
fn decode_head(row: Option<SqliteRow>) -> Result<Option<(i64, String)>> {
    row.map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
        .transpose()
}

/// Inserts the records linked after `head`, which the connection read while
/// holding the write lock it still holds; returns the new head.
async fn append_linked(
    conn: &mut SqliteConnection,
    head: Option<(i64, String)>,
    stamped: Vec<StampedEvent>,
) -> Result<Option<(i64, String)>> {
    let mut batch = Batch::new();
    let new_head = push_linked(&mut batch, head, stamped);
    batch.run(conn).await?;
    Ok(new_head)
}

/// Adds to `batch` the statements that insert the records linked after
/// `head`; returns the new head.
fn push_linked(
    batch: &mut Batch,
    head: Option<(i64, String)>,
    stamped: Vec<StampedEvent>,
) -> Option<(i64, String)> {
    let records = audit_log::link(head.clone(), stamped);
    let Some(last) = records.last() else {
        return head;
    };
    let new_head = Some((last.position, last.hash.clone()));
    for chunk in records.chunks(EVENT_ROWS_PER_STATEMENT) {
        batch
            .statement(
                "INSERT INTO audit_events (position, id, recorded, event, previous_hash, hash) ",
            )
            .push_values(chunk, |mut row, record| {
                let stamped = &record.stamped.0;
                row.push_bind(record.position)
                    .push_bind(stamped.id.clone())
                    .push_bind(format_instant(stamped.recorded))
                    .push_bind(stamped.text.clone())
                    .push_bind(record.previous_hash.clone())
                    .push_bind(record.hash.clone());
            });
    }
    let entries: Vec<(i64, &audit_log::IndexEntry)> = records
        .iter()
        .flat_map(|r| r.stamped.0.index.iter().map(move |e| (r.position, e)))
        .collect();
    for chunk in entries.chunks(INDEX_ROWS_PER_STATEMENT) {
        batch
            .statement("INSERT INTO audit_index (position, param, system, value) ")
            .push_values(chunk, |mut row, (position, entry)| {
                row.push_bind(*position)
                    .push_bind(entry.param)
                    .push_bind(entry.system.clone())
                    .push_bind(entry.value.clone());
            });
    }
    new_head
}

/// Rows per multi-row INSERT, well under SQLite's 32766 bound variables.
const EVENT_ROWS_PER_STATEMENT: usize = 1000;
const INDEX_ROWS_PER_STATEMENT: usize = 2000;

fn decode_record(row: &SqliteRow) -> Result<AuditRecord> {
    audit_log::decode(
        row.try_get(0)?,
        row.try_get::<&str, _>(1)?,
        row.try_get(2)?,
        row.try_get(3)?,
    )
}

#[async_trait]
impl AuditLog for SqliteAuditLog {
    fn stamp(&self, events: Vec<Value>) -> Result<Vec<StampedEvent>> {
        StampedEvent::stamp_all(events, self.clock.now())
    }

    async fn append(&self, events: Vec<StampedEvent>) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        // The chain's head is read by the statement that starts the transaction.
        let (mut tx, head) = self.group.begin_reading(Some(AUDIT_HEAD)).await?;
        append_linked(&mut tx, decode_head(head)?, events).await?;
        tx.commit().await
    }

    async fn read(&self, id: &str) -> Result<Option<AuditRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {RECORD_COLUMNS} FROM audit_events a WHERE a.id = ?1"
        ))
        .bind(id)
        .fetch_optional(&mut *self.readers.acquire().await?)
        .await?;
        row.as_ref().map(decode_record).transpose()
    }

    async fn search(&self, query: &AuditQuery) -> Result<AuditPage> {
        let (page, count) = audit_log::search(query::SQLITE, query);
        let mut conn = self.readers.acquire().await?;
        let rows = if query.count > 0 || query.filter.is_some() {
            fetch_all(&mut conn, &page).await?
        } else {
            Vec::new()
        };
        let total = match count {
            Some(count) => Some(fetch_count(&mut conn, &count).await?),
            None => None,
        };
        let records = rows.iter().map(decode_record).collect::<Result<_>>()?;
        Ok(audit_log::page(query, records, total))
    }

    async fn chain(&self, after: u64, limit: u32) -> Result<Vec<AuditRecord>> {
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let rows = sqlx::query(&format!(
            "SELECT {RECORD_COLUMNS} FROM audit_events a WHERE a.position > ?1 \
             ORDER BY a.position LIMIT ?2"
        ))
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&mut *self.readers.acquire().await?)
        .await?;
        rows.iter().map(decode_record).collect()
    }
}

#[cfg(test)]
mod tests {
    use haven_model::clock::SystemClock;

    use super::*;
    use crate::search_sql::tests::Admits;
    use crate::{Access, Criterion};

    /// What a clearance of N hides: a confidentiality label of R or V.
    fn restricted() -> Criterion {
        let label = |code: &str| Criterion::Token {
            param: "_security".into(),
            system: Some("http://terminology.hl7.org/CodeSystem/v3-Confidentiality".into()),
            code: Some(code.into()),
        };
        Criterion::Any(vec![label("R"), label("V")])
    }

    fn hides_restricted() -> Option<Access> {
        Some(Arc::new(Admits(Criterion::Not(Box::new(restricted())))))
    }

    /// The plan SQLite chooses for a statement, one line per step.
    async fn plan(store: &SqliteStore, sql: &Sql) -> Vec<String> {
        let explained = Sql {
            text: format!("EXPLAIN QUERY PLAN {}", sql.text),
            params: sql.params.clone(),
            dialect: sql.dialect,
        };
        let mut conn = store.readers.acquire().await.unwrap();
        fetch_all(&mut conn, &explained)
            .await
            .unwrap()
            .iter()
            .map(|row| row.get::<String, _>(3))
            .collect()
    }

    async fn store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}", dir.path().join("plan.db").display());
        let store = SqliteStore::connect(&url, Arc::new(SystemClock))
            .await
            .unwrap();
        (dir, store)
    }

    /// The plan of the page query of an Observation search with no criteria.
    async fn page_plan(access: Option<Access>, count: u32) -> Vec<String> {
        let (_dir, store) = store().await;
        let query = SearchQuery {
            access,
            count,
            ..SearchQuery::of_type("Observation")
        };
        let (page, _) = search_sql::search(query::SQLITE, &query).unwrap();
        plan(&store, &page).await
    }

    #[tokio::test]
    async fn auth_records_and_audit_events_queued_behind_an_open_write_share_its_commit() {
        let (_dir, store) = store().await;
        let store = Arc::new(store);
        let before = store.group.commits().await;
        let open = store.group.begin().await.unwrap();
        let record = tokio::spawn({
            let store = store.clone();
            async move {
                let records = store.auth_records();
                records
                    .insert("jti", "k1", &serde_json::json!({}), None)
                    .await
            }
        });
        let event = tokio::spawn({
            let store = store.clone();
            async move {
                let event = serde_json::json!({"resourceType": "AuditEvent"});
                let log = store.audit_log();
                log.append(log.stamp(vec![event])?).await
            }
        });
        // Both queue for the write group the open write holds.
        let mut waited = 0;
        while store.group.queued() < 2 && waited < 400 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            waited += 1;
        }
        assert_eq!(store.group.queued(), 2, "both queue for the write group");
        open.commit().await.unwrap();
        assert!(record.await.unwrap().unwrap(), "the record was new");
        event.await.unwrap().unwrap();
        assert_eq!(store.group.commits().await - before, 1);
        assert!(store
            .auth_records()
            .get("jti", "k1")
            .await
            .unwrap()
            .is_some());
        let query = AuditQuery {
            count: 10,
            ..AuditQuery::default()
        };
        let page = store.audit_log().search(&query).await.unwrap();
        assert_eq!(page.records.len(), 1);
    }

    #[tokio::test]
    async fn every_connection_keeps_temporaries_in_memory_and_has_its_page_cache() {
        let (_dir, store) = store().await;
        async fn setting(conn: &mut SqliteConnection, pragma: &str) -> String {
            sqlx::query_scalar::<_, i64>(&format!("PRAGMA {pragma}"))
                .fetch_one(conn)
                .await
                .unwrap()
                .to_string()
        }
        // temp_store 2 is MEMORY.
        let mut writer = store.group.begin().await.unwrap();
        assert_eq!(setting(&mut writer, "temp_store").await, "2");
        assert_eq!(setting(&mut writer, "cache_size").await, WRITER_CACHE_KIB);
        assert_eq!(
            setting(&mut writer, "wal_autocheckpoint").await,
            checkpoint::WRITER_BACKSTOP_PAGES
        );
        let mut reader = store.readers.acquire().await.unwrap();
        assert_eq!(setting(&mut reader, "temp_store").await, "2");
        assert_eq!(setting(&mut reader, "cache_size").await, READER_CACHE_KIB);
    }

    #[tokio::test]
    async fn committed_pages_reach_the_database_file_long_before_the_writers_own_checkpoint() {
        let (dir, store) = store().await;
        let before = std::fs::metadata(dir.path().join("plan.db")).unwrap().len();
        // A few hundred log pages: far below the writer's backstop.
        for n in 0..50 {
            let mut tx = store.begin().await.unwrap();
            let patient = serde_json::json!({
                "resourceType": "Patient",
                "name": [{"family": format!("Family{n}"), "given": ["A", "B"]}],
                "identifier": [{"system": "urn:mrn", "value": format!("mrn-{n}")}],
            });
            tx.create("Patient", &format!("p{n}"), patient)
                .await
                .unwrap();
            tx.commit().await.unwrap();
        }
        database_file_grows(&dir, before).await;
    }

    /// Waits up to ten seconds for the database file to outgrow `before` bytes:
    /// for a checkpoint to copy the log into it.
    async fn database_file_grows(dir: &tempfile::TempDir, before: u64) {
        let file = dir.path().join("plan.db");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::fs::metadata(&file).unwrap().len() <= before {
            assert!(
                std::time::Instant::now() < deadline,
                "the database file stayed at {before} bytes"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn a_batch_stops_at_its_first_failing_statement_and_binds_each_statement_its_own_values()
    {
        let (_dir, store) = store().await;
        let mut tx = store.group.begin().await.unwrap();
        sqlx::query("CREATE TEMP TABLE pairs (k TEXT PRIMARY KEY, v INTEGER)")
            .execute(&mut *tx)
            .await
            .unwrap();
        let insert = |batch: &mut Batch, k: &str, v: i64| {
            batch
                .statement("INSERT INTO pairs (k, v) VALUES (")
                .push_bind(k.to_owned())
                .push(", ")
                .push_bind(v)
                .push(")");
        };
        let mut batch = Batch::new();
        insert(&mut batch, "a", 1);
        insert(&mut batch, "b", 2);
        batch.run(&mut tx).await.unwrap();

        let mut batch = Batch::new();
        insert(&mut batch, "c", 3);
        insert(&mut batch, "a", 4);
        insert(&mut batch, "d", 5);
        let err = batch.run(&mut tx).await.unwrap_err();
        assert!(
            matches!(&err, sqlx::Error::Database(e) if e.is_unique_violation()),
            "{err:?}"
        );
        let pairs: Vec<(String, i64)> = sqlx::query_as("SELECT k, v FROM pairs ORDER BY k")
            .fetch_all(&mut *tx)
            .await
            .unwrap();
        // "c" ran before the failure; "d" after it never did.
        let expected = [("a", 1), ("b", 2), ("c", 3)].map(|(k, v)| (k.to_owned(), v));
        assert_eq!(pairs, expected);
    }

    #[tokio::test]
    async fn auth_record_writes_alone_are_checkpointed_too() {
        let (dir, store) = store().await;
        let before = std::fs::metadata(dir.path().join("plan.db")).unwrap().len();
        // Tokens and codes are written without any resource transaction.
        for n in 0..200 {
            let value =
                serde_json::json!({"client": format!("client-{n}"), "pad": "x".repeat(500)});
            let written = store
                .auth_records()
                .insert("token", &format!("t{n}"), &value, None)
                .await
                .unwrap();
            assert!(written);
        }
        database_file_grows(&dir, before).await;
    }

    #[tokio::test]
    async fn a_search_that_hides_labeled_resources_lists_them_from_the_value_index() {
        let (_dir, store) = store().await;
        let query = SearchQuery {
            access: hides_restricted(),
            count: 10,
            total: true,
            ..SearchQuery::of_type("Observation")
        };
        let (page, count) = search_sql::search(query::SQLITE, &query).unwrap();
        for sql in [page, count.unwrap()] {
            let steps = plan(&store, &sql).await;
            let token_steps: Vec<&String> = steps
                .iter()
                .filter(|s| s.contains("x1 ") || s.contains("x2 "))
                .collect();
            assert!(!token_steps.is_empty(), "{steps:?}");
            for step in token_steps {
                assert!(
                    step.contains("COVERING INDEX search_token_value (resource_type=? AND param=?"),
                    "every label is looked up by its value, not by reading the type's rows: {steps:?}"
                );
            }
        }
    }

    #[tokio::test]
    async fn the_search_for_labeled_resources_looks_each_one_up_by_key() {
        // Only what is labeled: the search that asks whether labels withheld anything.
        let steps = page_plan(Some(Arc::new(Admits(restricted()))), 1).await;
        assert!(
            steps
                .iter()
                .any(|s| s == "SEARCH c USING PRIMARY KEY (resource_type=? AND id=?)"),
            "the labeled resources drive, not every resource of the type: {steps:?}"
        );
        assert!(
            !steps
                .iter()
                .any(|s| s.starts_with("SEARCH c USING PRIMARY KEY (resource_type=?)")),
            "{steps:?}"
        );
    }

    #[tokio::test]
    async fn every_audit_search_probes_each_events_index_rows_by_position_never_by_value() {
        let (_dir, store) = store().await;
        let system = "http://terminology.hl7.org/CodeSystem/audit-event-type";
        let token = |system: Option<&str>, code: Option<&str>| crate::TokenValue {
            system: system.map(str::to_string),
            code: code.map(str::to_string),
        };
        let searches = [
            AuditQuery {
                agent: vec!["Practitioner/1".into()],
                ..AuditQuery::default()
            },
            AuditQuery {
                patient: vec!["Patient/1".into(), "Patient/2".into()],
                ..AuditQuery::default()
            },
            AuditQuery {
                entity: vec!["Observation/1".into()],
                ..AuditQuery::default()
            },
            AuditQuery {
                outcome: vec!["8".into()],
                ..AuditQuery::default()
            },
            AuditQuery {
                action: vec!["R".into()],
                ..AuditQuery::default()
            },
            AuditQuery {
                policy: vec!["Consent/1".into()],
                ..AuditQuery::default()
            },
            AuditQuery {
                request: vec!["a-request".into()],
                ..AuditQuery::default()
            },
            AuditQuery {
                event_type: vec![token(Some(system), None)],
                agent: vec!["Practitioner/1".into()],
                ..AuditQuery::default()
            },
            AuditQuery {
                event_type: vec![token(Some(system), Some("rest"))],
                subtype: vec![token(None, Some("read"))],
                ..AuditQuery::default()
            },
        ];
        for search in searches {
            let query = AuditQuery {
                count: 10,
                total: true,
                ..search
            };
            let (page, count) = audit_log::search(query::SQLITE, &query);
            for sql in [page, count.unwrap()] {
                let steps = plan(&store, &sql).await;
                let probes: Vec<&String> = steps.iter().filter(|s| s.contains(" i ")).collect();
                assert!(!probes.is_empty(), "{steps:?}");
                assert!(
                    probes
                        .iter()
                        .all(|s| s.contains("USING PRIMARY KEY (position=? AND param=?")),
                    "each probe reads one event's rows, through the key: {steps:?}"
                );
            }
        }
    }

    #[tokio::test]
    async fn an_audit_trail_indexed_before_the_index_was_keyed_by_position_keeps_every_row() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}", dir.path().join("earlier.db").display());
        // The schema as it was before the audit index was keyed by position.
        let earlier = dir.path().join("migrations");
        std::fs::create_dir(&earlier).unwrap();
        let all = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../migrations/sqlite");
        for entry in std::fs::read_dir(all).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_string();
            if name.as_str() < "20261124000009" {
                std::fs::copy(&path, earlier.join(&name)).unwrap();
            }
        }
        let options = SqliteConnectOptions::from_str(&url)
            .unwrap()
            .create_if_missing(true);
        let mut conn: SqliteConnection = sqlx::Connection::connect_with(&options).await.unwrap();
        sqlx::migrate::Migrator::new(earlier.as_path())
            .await
            .unwrap()
            .run(&mut conn)
            .await
            .unwrap();
        let system = "http://dicom.nema.org/resources/ontology/DCM";
        for position in 1..=3_i64 {
            sqlx::query(
                "INSERT INTO audit_events (position, id, recorded, event, previous_hash, hash) \
                 VALUES (?1, ?2, '2026-11-24T10:00:00Z', ?3, 'before', 'after')",
            )
            .bind(position)
            .bind(format!("event-{position}"))
            .bind(format!(
                r#"{{"resourceType":"AuditEvent","id":"event-{position}"}}"#
            ))
            .execute(&mut conn)
            .await
            .unwrap();
            for (param, system, value) in [
                ("patient", "", format!("Patient/{position}")),
                ("action", "", "R".to_string()),
                (
                    "subtype",
                    system,
                    if position == 2 { "110100" } else { "110112" }.into(),
                ),
            ] {
                sqlx::query(
                    "INSERT INTO audit_index (position, param, system, value) VALUES (?1, ?2, ?3, ?4)",
                )
                .bind(position)
                .bind(param)
                .bind(system)
                .bind(value)
                .execute(&mut conn)
                .await
                .unwrap();
            }
        }
        sqlx::Connection::close(conn).await.unwrap();

        let store = SqliteStore::connect(&url, Arc::new(SystemClock))
            .await
            .unwrap();
        let found = |query: AuditQuery| {
            let store = &store;
            async move {
                let query = AuditQuery {
                    count: 10,
                    total: true,
                    ..query
                };
                let page = store.audit_log().search(&query).await.unwrap();
                let positions: Vec<u64> = page.records.iter().map(|r| r.position).collect();
                (positions, page.total)
            }
        };
        assert_eq!(
            found(AuditQuery {
                patient: vec!["Patient/2".into()],
                ..AuditQuery::default()
            })
            .await,
            (vec![2], Some(1))
        );
        assert_eq!(
            found(AuditQuery {
                action: vec!["R".into()],
                ..AuditQuery::default()
            })
            .await,
            (vec![3, 2, 1], Some(3))
        );
        assert_eq!(
            found(AuditQuery {
                subtype: vec![crate::TokenValue {
                    system: Some(system.into()),
                    code: Some("110112".into()),
                }],
                ..AuditQuery::default()
            })
            .await,
            (vec![3, 1], Some(2))
        );

        // The rekeyed table is as append-only as the one it replaced.
        let mut conn: SqliteConnection = sqlx::Connection::connect_with(&options).await.unwrap();
        for change in [
            "UPDATE audit_index SET value = 'Patient/9'",
            "DELETE FROM audit_index",
        ] {
            let refused = sqlx::query(change).execute(&mut conn).await.unwrap_err();
            assert!(refused.to_string().contains("append-only"), "{refused}");
        }
        let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM audit_index")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(rows, 9);
    }

    #[tokio::test]
    async fn a_first_page_narrowed_only_by_labels_walks_the_type_in_order() {
        let steps = page_plan(hides_restricted(), 10).await;
        assert!(
            steps
                .iter()
                .any(|s| s.contains("INDEX current_resources_type_updated")),
            "{steps:?}"
        );
        assert!(
            !steps.iter().any(|s| s.contains("TEMP B-TREE FOR ORDER BY")),
            "the page stops after its last row instead of sorting every match: {steps:?}"
        );
    }
}
