//! The PostgreSQL backend.
//!
//! Resources are `jsonb`, instants `timestamptz`. Transactions run at READ COMMITTED;
//! every write first locks the resource's `current_resources` row (`FOR UPDATE`), so
//! a racing writer waits for the lock and then sees the version committed meanwhile,
//! which is what makes `If-Match` hold under concurrency.

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use haven_model::clock::Clock;
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions, PgRow};
use sqlx::types::Json;
use sqlx::{Connection, PgPool, Row};
use time::OffsetDateTime;

use crate::audit_log::{self, StampedEvent, RECORD_COLUMNS};
use crate::auth_records::PostgresAuthRecords;
use crate::document::{identifier_tokens, lead_with_stamped_fields};
use crate::query::{self, Param, Sql};
use crate::search_rows::{Column, IndexRows, BACKFILL_BATCH, SEARCH_INDEX_VERSION, TABLES};
use crate::search_sql;
use crate::version::{change_from_name, change_name, check_expected, new_version};
use crate::{
    AuditLog, AuditPage, AuditQuery, AuditRecord, AuthRecords, Backend, Change, HistoryPage,
    HistoryQuery, ResourceVersion, Result, SearchPage, SearchQuery, Store, StoreError, StoreTx,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/postgres");

const MAX_CONNECTIONS: u32 = 16;
/// How long a request may wait for a free connection.
const ACQUIRE_WAIT: Duration = Duration::from_secs(30);
/// A pooled connection idle this long is pinged before it is used again.
const IDLE_BEFORE_PING: Duration = Duration::from_secs(1);

pub struct PostgresStore {
    pool: PgPool,
    clock: Arc<dyn Clock>,
    statistics: Arc<Statistics>,
    auth: PostgresAuthRecords,
    audit: PostgresAuditLog,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").finish_non_exhaustive()
    }
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Connects and brings the schema up to date.
async fn open(database_url: &str, max_connections: u32) -> Result<PgPool> {
    let options = PgConnectOptions::from_str(database_url)
        .map_err(|e| StoreError::Unsupported(format!("bad postgres URL: {e}")))?;
    // One direct connection first: it fails at once when the server cannot be
    // reached, where a pool would keep retrying until its acquire timeout.
    PgConnection::connect_with(&options)
        .await
        .map_err(unavailable)?
        .close()
        .await
        .map_err(unavailable)?;
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(ACQUIRE_WAIT)
        // A ping before every use doubles the round trips of a short query; a
        // connection that sat idle (as after the server restarted) still gets one.
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= IDLE_BEFORE_PING {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
        .connect_with(options)
        .await
        .map_err(unavailable)?;
    MIGRATOR.run(&pool).await.map_err(unavailable)?;
    Ok(pool)
}

/// Brings the schema of the database at `database_url` up to date.
pub async fn migrate(database_url: &str) -> Result<()> {
    let pool = open(database_url, 1).await?;
    pool.close().await;
    Ok(())
}

impl PostgresStore {
    pub async fn connect(database_url: &str, clock: Arc<dyn Clock>) -> Result<Self> {
        let pool = open(database_url, MAX_CONNECTIONS).await?;
        backfill_search_index(&pool).await?;
        let auth = PostgresAuthRecords::new(pool.clone(), clock.clone());
        let audit = PostgresAuditLog {
            pool: pool.clone(),
            clock: clock.clone(),
        };
        let statistics = Arc::new(Statistics::new(pool.clone()));
        Ok(Self {
            pool,
            clock,
            statistics,
            auth,
            audit,
        })
    }
}

/// Keeps the planner's statistics of the resource and index tables fresh
/// while data arrives. Autovacuum gets there too, but only on its own
/// schedule; a search planned on the statistics of a nearly empty table
/// right after a bulk load can pick a plan thousands of times slower.
#[derive(Debug)]
struct Statistics {
    pool: PgPool,
    /// Resources written since the last ANALYZE.
    written: AtomicU64,
    /// How many writes start the next ANALYZE; doubles each time, so a load
    /// of n resources analyzes about log2(n) times.
    threshold: AtomicU64,
    running: AtomicBool,
}

/// The first ANALYZE comes after this many resource writes.
const FIRST_ANALYZE: u64 = 500;

impl Statistics {
    fn new(pool: PgPool) -> Self {
        Self {
            pool,
            written: AtomicU64::new(0),
            threshold: AtomicU64::new(FIRST_ANALYZE),
            running: AtomicBool::new(false),
        }
    }

    /// Counts committed resource writes; starts an ANALYZE in the background
    /// when enough have accumulated and none is running.
    fn note(self: &Arc<Self>, writes: u64) {
        if writes == 0 {
            return;
        }
        let written = self.written.fetch_add(writes, Ordering::Relaxed) + writes;
        if written < self.threshold.load(Ordering::Relaxed)
            || self.running.swap(true, Ordering::AcqRel)
        {
            return;
        }
        self.written.store(0, Ordering::Relaxed);
        let threshold = self.threshold.load(Ordering::Relaxed);
        self.threshold
            .store(threshold.saturating_mul(2).min(1 << 24), Ordering::Relaxed);
        let statistics = self.clone();
        tokio::spawn(async move {
            let tables = std::iter::once("current_resources")
                .chain(TABLES)
                .collect::<Vec<_>>()
                .join(", ");
            if let Err(error) = sqlx::query(&format!("ANALYZE {tables}"))
                .execute(&statistics.pool)
                .await
            {
                tracing::warn!(%error, "refreshing the planner statistics failed");
            }
            statistics.running.store(false, Ordering::Release);
        });
    }
}

/// Every transaction reads at READ COMMITTED whatever the site's default: the
/// audit chain's head and the row locks are read after their locks are granted,
/// which a snapshot taken earlier (REPEATABLE READ) would not see.
const BEGIN: &str = "BEGIN ISOLATION LEVEL READ COMMITTED";

#[async_trait]
impl Store for PostgresStore {
    fn backend(&self) -> Backend {
        Backend::Postgres
    }

    async fn begin(&self) -> Result<Box<dyn StoreTx>> {
        let tx = self.pool.begin_with(BEGIN).await?;
        Ok(Box::new(PostgresTx {
            tx,
            clock: self.clock.clone(),
            statistics: self.statistics.clone(),
            writes: 0,
            audit_failed: false,
            pending_audit: Vec::new(),
        }))
    }

    async fn read(&self, resource_type: &str, id: &str) -> Result<Option<ResourceVersion>> {
        let mut conn = self.pool.acquire().await?;
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
             FROM resource_versions v WHERE v.resource_type = $1 AND v.id = $2 AND v.version = $3",
        )
        .bind(resource_type)
        .bind(id)
        .bind(version)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| decode_version(&row)).transpose()
    }

    async fn search(&self, query: &SearchQuery) -> Result<SearchPage> {
        let mut conn = self.pool.acquire().await?;
        search_on(&mut conn, query).await
    }

    async fn search_keys(&self, query: &SearchQuery, limit: u32) -> Result<Vec<(String, String)>> {
        if query.filter.is_some() {
            // A content filter needs each body; the bodies' search does that.
            return crate::keys_by_reading(self, query, limit).await;
        }
        let sql = search_sql::keys(query::POSTGRES, query, limit)?;
        let mut conn = self.pool.acquire().await?;
        let rows = bind_all(&sql).fetch_all(&mut *conn).await?;
        rows.iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect()
    }

    async fn history(&self, query: &HistoryQuery) -> Result<HistoryPage> {
        let (page, count) = query::history(query::POSTGRES, query)?;
        let mut conn = self.pool.acquire().await?;
        let rows = bind_all(&page)
            .fetch_all(&mut *conn)
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
             WHERE NOT deleted GROUP BY resource_type ORDER BY resource_type",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(t, n)| (t, u64::try_from(n).unwrap_or(0)))
            .collect())
    }
}

fn bind_all<'q>(
    sql: &'q Sql,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    let mut statement = sqlx::query(&sql.text);
    for param in &sql.params {
        statement = match param {
            Param::Text(text) => statement.bind(text.as_str()),
            Param::Instant(instant) => statement.bind(*instant),
            Param::Real(value) => statement.bind(*value),
        };
    }
    statement
}

async fn fetch_count(conn: &mut PgConnection, sql: &Sql) -> Result<u64> {
    let row = bind_all(sql).fetch_one(conn).await?;
    let n: i64 = row.try_get(0)?;
    Ok(u64::try_from(n).unwrap_or(0))
}

async fn search_on(conn: &mut PgConnection, query: &SearchQuery) -> Result<SearchPage> {
    let (page, count) = search_sql::search(query::POSTGRES, query)?;
    let rows = if query.count > 0 || query.filter.is_some() {
        bind_all(&page).fetch_all(&mut *conn).await?
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

fn decode_version(row: &PgRow) -> Result<ResourceVersion> {
    let change: String = row.try_get(5)?;
    let body: Option<Json<Value>> = row.try_get(6)?;
    Ok(ResourceVersion {
        resource_type: row.try_get(1)?,
        id: row.try_get(2)?,
        version: row.try_get(3)?,
        last_updated: row.try_get::<OffsetDateTime, _>(4)?,
        change: change_from_name(&change)?,
        resource: body.map(|Json(body)| lead_with_stamped_fields(body)),
    })
}

async fn read_current(
    conn: &mut PgConnection,
    resource_type: &str,
    id: &str,
) -> Result<Option<ResourceVersion>> {
    let row = sqlx::query(
        "SELECT v.seq, v.resource_type, v.id, v.version, v.last_updated, v.change, v.body \
         FROM current_resources c JOIN resource_versions v \
         ON v.resource_type = c.resource_type AND v.id = c.id AND v.version = c.version \
         WHERE c.resource_type = $1 AND c.id = $2",
    )
    .bind(resource_type)
    .bind(id)
    .fetch_optional(conn)
    .await?;
    row.map(|row| decode_version(&row)).transpose()
}

struct PostgresTx {
    tx: sqlx::Transaction<'static, sqlx::Postgres>,
    clock: Arc<dyn Clock>,
    statistics: Arc<Statistics>,
    /// Resources this transaction wrote, for [`Statistics`].
    writes: u64,
    /// Set when an audit append failed. PostgreSQL answers COMMIT of a failed
    /// transaction with a rollback, not an error, so the caller is told here.
    audit_failed: bool,
    /// AuditEvents appended, inserted at commit: the chain lock they take is
    /// then held for the commit only, not for the statements after them.
    pending_audit: Vec<StampedEvent>,
}

/// Locks the resource's current row and returns its version number and whether it
/// is deleted. A concurrent writer holding the lock is waited for; its committed
/// version is what this returns.
async fn lock_current(
    conn: &mut PgConnection,
    resource_type: &str,
    id: &str,
) -> Result<Option<(i64, bool)>> {
    Ok(sqlx::query_as(
        "SELECT version, deleted FROM current_resources \
         WHERE resource_type = $1 AND id = $2 FOR UPDATE",
    )
    .bind(resource_type)
    .bind(id)
    .fetch_optional(conn)
    .await?)
}

/// Inserts the current row of a new resource. `false` if the id exists, including
/// when a concurrent transaction created it and committed while this one waited.
async fn insert_current(
    conn: &mut PgConnection,
    resource_type: &str,
    id: &str,
    last_updated: OffsetDateTime,
) -> Result<bool> {
    let inserted = sqlx::query(
        "INSERT INTO current_resources (resource_type, id, version, last_updated, deleted) \
         VALUES ($1, $2, 1, $3, FALSE) ON CONFLICT DO NOTHING",
    )
    .bind(resource_type)
    .bind(id)
    .bind(last_updated)
    .execute(conn)
    .await?;
    Ok(inserted.rows_affected() == 1)
}

/// Moves the locked current row from version `from` to `version`.
async fn advance_current(
    conn: &mut PgConnection,
    version: &ResourceVersion,
    from: i64,
) -> Result<()> {
    let updated = sqlx::query(
        "UPDATE current_resources SET version = $3, last_updated = $4, deleted = $5 \
         WHERE resource_type = $1 AND id = $2 AND version = $6",
    )
    .bind(&version.resource_type)
    .bind(&version.id)
    .bind(version.version)
    .bind(version.last_updated)
    .bind(version.is_deleted())
    .bind(from)
    .execute(conn)
    .await?;
    if updated.rows_affected() == 0 {
        // Unreachable while the row is locked; kept as the last line of defence.
        return Err(StoreError::VersionConflict {
            expected: from,
            current: None,
        });
    }
    Ok(())
}

async fn insert_version(conn: &mut PgConnection, version: &ResourceVersion) -> Result<()> {
    sqlx::query(
        "INSERT INTO resource_versions (resource_type, id, version, last_updated, change, body) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&version.resource_type)
    .bind(&version.id)
    .bind(version.version)
    .bind(version.last_updated)
    .bind(change_name(version.change))
    .bind(version.resource.as_ref().map(Json))
    .execute(conn)
    .await?;
    Ok(())
}

async fn replace_tokens(
    conn: &mut PgConnection,
    resource_type: &str,
    id: &str,
    had_tokens: bool,
    resource: Option<&Value>,
) -> Result<()> {
    if had_tokens {
        sqlx::query("DELETE FROM identifier_tokens WHERE resource_type = $1 AND id = $2")
            .bind(resource_type)
            .bind(id)
            .execute(&mut *conn)
            .await?;
    }
    let tokens = resource.map(identifier_tokens).unwrap_or_default();
    if tokens.is_empty() {
        return Ok(());
    }
    let (systems, values): (Vec<String>, Vec<String>) = tokens.into_iter().unzip();
    // One statement for all identifiers of the resource.
    sqlx::query(
        "INSERT INTO identifier_tokens (resource_type, id, system, value) \
         SELECT $1, $2, s, v FROM UNNEST($3::text[], $4::text[]) AS t (s, v)",
    )
    .bind(resource_type)
    .bind(id)
    .bind(systems)
    .bind(values)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Replaces the search index rows of one resource; `had_rows` is false when it
/// was missing or deleted, so there is nothing to remove.
async fn replace_index(
    conn: &mut PgConnection,
    resource_type: &str,
    id: &str,
    had_rows: bool,
    resource: Option<&Value>,
) -> Result<()> {
    if had_rows {
        delete_index(conn, &[resource_type.to_owned()], &[id.to_owned()]).await?;
    }
    if let Some(resource) = resource {
        let mut rows = IndexRows::new();
        rows.add(resource_type, id, resource);
        insert_index(conn, &rows).await?;
    }
    Ok(())
}

/// Removes the index rows of the given resources, one statement per table.
async fn delete_index(conn: &mut PgConnection, types: &[String], ids: &[String]) -> Result<()> {
    for table in TABLES {
        sqlx::query(&format!(
            "DELETE FROM {table} t USING UNNEST($1::text[], $2::text[]) AS k (resource_type, id) \
             WHERE t.resource_type = k.resource_type AND t.id = k.id"
        ))
        .bind(types)
        .bind(ids)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Inserts index rows with one `UNNEST` statement per non-empty table.
async fn insert_index(conn: &mut PgConnection, rows: &IndexRows) -> Result<()> {
    for table in &rows.tables {
        if table.len == 0 {
            continue;
        }
        let arrays: Vec<String> = table
            .values
            .iter()
            .enumerate()
            .map(|(i, column)| {
                let kind = match column {
                    Column::Text(_) | Column::Json(_) => "text[]",
                    Column::Real(_) => "float8[]",
                    Column::Instant(_) => "timestamptz[]",
                };
                format!("${}::{kind}", i + 1)
            })
            .collect();
        // JSON travels as text and is cast per row.
        let selected: Vec<String> = table
            .values
            .iter()
            .zip(table.columns)
            .map(|(column, name)| match column {
                Column::Json(_) => format!("{name}::jsonb"),
                _ => (*name).to_owned(),
            })
            .collect();
        let sql = format!(
            "INSERT INTO {} ({}) SELECT {} FROM UNNEST({}) AS r ({})",
            table.name,
            table.columns.join(", "),
            selected.join(", "),
            arrays.join(", "),
            table.columns.join(", ")
        );
        let mut statement = sqlx::query(&sql);
        for column in &table.values {
            statement = match column {
                Column::Text(values) => statement.bind(values),
                Column::Real(values) => statement.bind(values),
                Column::Instant(values) => statement.bind(values),
                Column::Json(values) => statement.bind(values),
            };
        }
        statement.execute(&mut *conn).await?;
    }
    Ok(())
}

/// Serializes backfills of concurrently starting processes ("havensix").
const SEARCH_INDEX_LOCK: i64 = 0x6861_7665_6e73_6978;

/// Indexes every live resource when the index follows older rules than
/// [`SEARCH_INDEX_VERSION`] (or none: a database written before the index
/// existed). A session advisory lock lets one process do it while others wait
/// and then find it done; each batch locks its resources' current rows, so a
/// concurrent write of the same resource is either before (and read here) or
/// after (and replaces these rows). An interrupted backfill runs again.
async fn backfill_search_index(pool: &PgPool) -> Result<()> {
    let (version,): (i64,) =
        sqlx::query_as("SELECT version FROM search_index_state WHERE singleton = 1")
            .fetch_one(pool)
            .await?;
    if version >= SEARCH_INDEX_VERSION {
        return Ok(());
    }
    // A connection of its own, closed at the end, so the session lock never
    // returns to the pool, not even on an error.
    let mut conn = pool.acquire().await?.detach();
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(SEARCH_INDEX_LOCK)
        .execute(&mut conn)
        .await?;
    let done = backfill_locked(&mut conn).await;
    let _ = conn.close().await;
    done
}

async fn backfill_locked(conn: &mut PgConnection) -> Result<()> {
    let mut after = (String::new(), String::new());
    loop {
        let mut tx = conn.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            .execute(&mut *tx)
            .await?;
        let (version,): (i64,) =
            sqlx::query_as("SELECT version FROM search_index_state WHERE singleton = 1 FOR UPDATE")
                .fetch_one(&mut *tx)
                .await?;
        if version >= SEARCH_INDEX_VERSION {
            // Another process finished it while this one waited for the lock.
            tx.commit().await?;
            return Ok(());
        }
        let keys: Vec<(String, String)> = sqlx::query_as(
            "SELECT resource_type, id FROM current_resources \
             WHERE NOT deleted AND (resource_type, id) > ($1, $2) \
             ORDER BY resource_type, id LIMIT $3 FOR UPDATE",
        )
        .bind(&after.0)
        .bind(&after.1)
        .bind(BACKFILL_BATCH)
        .fetch_all(&mut *tx)
        .await?;
        let Some(last) = keys.last() else {
            sqlx::query("UPDATE search_index_state SET version = $1 WHERE singleton = 1")
                .bind(SEARCH_INDEX_VERSION)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            // The tables were rewritten; plan the next searches on their new contents.
            sqlx::query(&format!("ANALYZE current_resources, {}", TABLES.join(", ")))
                .execute(&mut *conn)
                .await?;
            return Ok(());
        };
        after = last.clone();
        let (types, ids): (Vec<String>, Vec<String>) = keys.into_iter().unzip();
        // Read after the locks are granted, so these are the committed versions.
        let bodies: Vec<(String, String, Json<Value>)> = sqlx::query_as(
            "SELECT c.resource_type, c.id, v.body \
             FROM UNNEST($1::text[], $2::text[]) AS k (resource_type, id) \
             JOIN current_resources c ON c.resource_type = k.resource_type AND c.id = k.id \
             JOIN resource_versions v \
             ON v.resource_type = c.resource_type AND v.id = c.id AND v.version = c.version \
             WHERE NOT c.deleted AND v.body IS NOT NULL",
        )
        .bind(&types)
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await?;
        delete_index(&mut tx, &types, &ids).await?;
        let mut rows = IndexRows::new();
        for (resource_type, id, Json(body)) in &bodies {
            rows.add(resource_type, id, body);
        }
        insert_index(&mut tx, &rows).await?;
        tx.commit().await?;
    }
}

#[async_trait]
impl StoreTx for PostgresTx {
    async fn read(&mut self, resource_type: &str, id: &str) -> Result<Option<ResourceVersion>> {
        read_current(&mut self.tx, resource_type, id).await
    }

    async fn create(
        &mut self,
        resource_type: &str,
        id: &str,
        resource: Value,
    ) -> Result<ResourceVersion> {
        let now = self.clock.now();
        let (version, _) = new_version(resource_type, id, 1, now, Change::Create, Some(resource))?;
        if !insert_current(&mut self.tx, resource_type, id, now).await? {
            return Err(StoreError::AlreadyExists {
                resource_type: resource_type.to_owned(),
                id: id.to_owned(),
            });
        }
        insert_version(&mut self.tx, &version).await?;
        replace_tokens(
            &mut self.tx,
            resource_type,
            id,
            false,
            version.resource.as_ref(),
        )
        .await?;
        self.writes += 1;
        replace_index(
            &mut self.tx,
            resource_type,
            id,
            false,
            version.resource.as_ref(),
        )
        .await?;
        Ok(version)
    }

    async fn update(
        &mut self,
        resource_type: &str,
        id: &str,
        resource: Value,
        expected_version: Option<i64>,
    ) -> Result<(ResourceVersion, bool)> {
        let now = self.clock.now();
        let current = loop {
            let current = lock_current(&mut self.tx, resource_type, id).await?;
            check_expected(expected_version, current.map(|(v, _)| v))?;
            match current {
                Some(current) => break Some(current),
                None if insert_current(&mut self.tx, resource_type, id, now).await? => break None,
                // Created concurrently since the lock attempt: lock the new row.
                None => continue,
            }
        };
        let number = current.map_or(1, |(v, _)| v + 1);
        let (version, _) = new_version(
            resource_type,
            id,
            number,
            now,
            Change::Update,
            Some(resource),
        )?;
        if let Some((from, _)) = current {
            advance_current(&mut self.tx, &version, from).await?;
        }
        insert_version(&mut self.tx, &version).await?;
        let was_live = matches!(current, Some((_, false)));
        replace_tokens(
            &mut self.tx,
            resource_type,
            id,
            was_live,
            version.resource.as_ref(),
        )
        .await?;
        self.writes += 1;
        replace_index(
            &mut self.tx,
            resource_type,
            id,
            was_live,
            version.resource.as_ref(),
        )
        .await?;
        Ok((version, !was_live))
    }

    async fn delete(
        &mut self,
        resource_type: &str,
        id: &str,
        expected_version: Option<i64>,
    ) -> Result<Option<ResourceVersion>> {
        let current = lock_current(&mut self.tx, resource_type, id).await?;
        check_expected(expected_version, current.map(|(v, _)| v))?;
        let Some((number, false)) = current else {
            return Ok(None);
        };
        let now = self.clock.now();
        let (version, _) = new_version(resource_type, id, number + 1, now, Change::Delete, None)?;
        advance_current(&mut self.tx, &version, number).await?;
        insert_version(&mut self.tx, &version).await?;
        replace_tokens(&mut self.tx, resource_type, id, true, None).await?;
        self.writes += 1;
        replace_index(&mut self.tx, resource_type, id, true, None).await?;
        Ok(Some(version))
    }

    async fn search(&mut self, query: &SearchQuery) -> Result<SearchPage> {
        search_on(&mut self.tx, query).await
    }

    /// Stamps the events and queues them; they are inserted at commit.
    async fn append_audit(&mut self, events: Vec<Value>) -> Result<()> {
        match StampedEvent::stamp_all(events, self.clock.now()) {
            Ok(stamped) => {
                self.pending_audit.extend(stamped);
                Ok(())
            }
            Err(e) => {
                self.audit_failed = true;
                Err(e)
            }
        }
    }

    async fn commit(mut self: Box<Self>) -> Result<()> {
        if self.audit_failed {
            // Dropping the transaction rolls it back.
            return Err(audit_log::failed_in_transaction());
        }
        let pending = std::mem::take(&mut self.pending_audit);
        // An error drops the transaction, which rolls it back.
        append_audit_on(&mut self.tx, pending).await?;
        self.tx.commit().await?;
        self.statistics.note(self.writes);
        Ok(())
    }
}

/// The advisory lock every audit append holds until its transaction ends, so
/// that appends from any connection or process follow one another ("havenaud").
const AUDIT_CHAIN_LOCK: i64 = 0x6861_7665_6e61_7564;

/// [`AuditLog`] on PostgreSQL.
pub(crate) struct PostgresAuditLog {
    pool: PgPool,
    clock: Arc<dyn Clock>,
}

/// Takes the chain lock, links the records after the current head and inserts
/// them with their index values. At READ COMMITTED the head query, run after the
/// lock is granted, sees every append committed before.
async fn append_audit_on(conn: &mut PgConnection, stamped: Vec<StampedEvent>) -> Result<()> {
    if stamped.is_empty() {
        return Ok(());
    }
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(AUDIT_CHAIN_LOCK)
        .execute(&mut *conn)
        .await?;
    let head: Option<(i64, String)> =
        sqlx::query_as("SELECT position, hash FROM audit_events ORDER BY position DESC LIMIT 1")
            .fetch_optional(&mut *conn)
            .await?;
    let records = audit_log::link(head, stamped);
    let mut positions = Vec::with_capacity(records.len());
    let mut ids = Vec::with_capacity(records.len());
    let mut recorded = Vec::with_capacity(records.len());
    let mut events = Vec::with_capacity(records.len());
    let mut previous_hashes = Vec::with_capacity(records.len());
    let mut hashes = Vec::with_capacity(records.len());
    let (mut index_positions, mut params, mut systems, mut values) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for record in &records {
        let stamped = &record.stamped.0;
        for entry in &stamped.index {
            index_positions.push(record.position);
            params.push(entry.param);
            systems.push(entry.system.as_str());
            values.push(entry.value.as_str());
        }
        positions.push(record.position);
        ids.push(stamped.id.as_str());
        recorded.push(stamped.recorded);
        events.push(stamped.text.as_str());
        previous_hashes.push(record.previous_hash.as_str());
        hashes.push(record.hash.as_str());
    }
    // One statement per table for the whole group.
    sqlx::query(
        "INSERT INTO audit_events (position, id, recorded, event, previous_hash, hash) \
         SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::timestamptz[], $4::text[], \
         $5::text[], $6::text[])",
    )
    .bind(positions)
    .bind(ids)
    .bind(recorded)
    .bind(events)
    .bind(previous_hashes)
    .bind(hashes)
    .execute(&mut *conn)
    .await?;
    if !index_positions.is_empty() {
        sqlx::query(
            "INSERT INTO audit_index (position, param, system, value) \
             SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[])",
        )
        .bind(index_positions)
        .bind(params)
        .bind(systems)
        .bind(values)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

fn decode_record(row: &PgRow) -> Result<AuditRecord> {
    audit_log::decode(
        row.try_get(0)?,
        row.try_get::<&str, _>(1)?,
        row.try_get(2)?,
        row.try_get(3)?,
    )
}

#[async_trait]
impl AuditLog for PostgresAuditLog {
    fn stamp(&self, events: Vec<Value>) -> Result<Vec<StampedEvent>> {
        StampedEvent::stamp_all(events, self.clock.now())
    }

    async fn append(&self, events: Vec<StampedEvent>) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin_with(BEGIN).await?;
        append_audit_on(&mut tx, events).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn read(&self, id: &str) -> Result<Option<AuditRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {RECORD_COLUMNS} FROM audit_events a WHERE a.id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(decode_record).transpose()
    }

    async fn search(&self, query: &AuditQuery) -> Result<AuditPage> {
        let (page, count) = audit_log::search(query::POSTGRES, query);
        let mut conn = self.pool.acquire().await?;
        let rows = if query.count > 0 || query.filter.is_some() {
            bind_all(&page).fetch_all(&mut *conn).await?
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
            "SELECT {RECORD_COLUMNS} FROM audit_events a WHERE a.position > $1 \
             ORDER BY a.position LIMIT $2"
        ))
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode_record).collect()
    }
}
