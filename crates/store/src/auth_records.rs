//! [`AuthRecords`] on both backends. The statements are the same but for their
//! placeholders, so they are written once with `$n` and rewritten for SQLite.

use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;
use sqlx::{PgPool, Row};
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};

use haven_model::clock::Clock;

use crate::readers::Readers;
use crate::write_group::WriteGroup;
use crate::{AuthRecords, Result, StagedInsert, StoreError};

const INSERT: &str = "INSERT INTO auth_records (kind, key, value, expires_at) VALUES ($1, $2, $3, $4) \
     ON CONFLICT (kind, key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at \
     WHERE auth_records.expires_at IS NOT NULL AND auth_records.expires_at <= $5";
const PUT: &str = "INSERT INTO auth_records (kind, key, value, expires_at) VALUES ($1, $2, $3, $4) \
     ON CONFLICT (kind, key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at";
const GET: &str = "SELECT value FROM auth_records WHERE kind = $1 AND key = $2 \
     AND (expires_at IS NULL OR expires_at > $3)";
const REPLACE: &str = "UPDATE auth_records SET value = $4 WHERE kind = $1 AND key = $2 \
     AND value = $3 AND (expires_at IS NULL OR expires_at > $5)";
const DELETE: &str = "DELETE FROM auth_records WHERE kind = $1 AND key = $2";
const LIST: &str = "SELECT key, value FROM auth_records WHERE kind = $1 \
     AND (expires_at IS NULL OR expires_at > $2) ORDER BY key";
const PURGE: &str = "DELETE FROM auth_records WHERE expires_at IS NOT NULL AND expires_at <= $1";

/// [`GET`] for `pairs` keys at once: `$1, $2` the first kind and key, and so
/// on, then the current time. One lookup of the primary key per pair, joined
/// by UNION ALL: as one `(kind, key) IN (...)`, SQLite chose to scan the
/// expiry index, every live record.
fn get_each_statement(pairs: usize) -> String {
    let now = 2 * pairs + 1;
    (0..pairs)
        .map(|i| {
            format!(
                "SELECT kind, key, value FROM auth_records WHERE kind = ${} AND key = ${} \
                 AND (expires_at IS NULL OR expires_at > ${now})",
                2 * i + 1,
                2 * i + 2
            )
        })
        .collect::<Vec<_>>()
        .join(" UNION ALL ")
}

fn sqlite(statement: &str) -> String {
    statement.replace('$', "?")
}

fn postgres(statement: &str) -> String {
    statement.to_string()
}

fn text(value: &Value) -> String {
    value.to_string()
}

fn parse(text: &str) -> Result<Value> {
    serde_json::from_str(text)
        .map_err(|e| StoreError::Database(format!("an auth record is not JSON: {e}")))
}

fn seconds(at: Option<OffsetDateTime>) -> Option<i64> {
    at.map(OffsetDateTime::unix_timestamp)
}

/// The write of [`AuthRecords::insert`], which replaces only an expired record.
fn insert_of(
    clock: &dyn Clock,
    kind: &str,
    key: &str,
    value: &Value,
    expires_at: Option<OffsetDateTime>,
) -> Write {
    Write::Insert {
        kind: kind.to_owned(),
        key: key.to_owned(),
        value: text(value),
        expires_at: seconds(expires_at),
        now: clock.now().unix_timestamp(),
    }
}

/// At most this many writes are committed in one transaction.
const GROUP_LIMIT: usize = 256;
/// Callers wait to queue once this many writes are waiting (back pressure).
const QUEUE_LIMIT: usize = 4096;

/// One write of an auth record, with its values already in their stored form.
#[derive(Debug, Clone, PartialEq)]
enum Write {
    Insert {
        kind: String,
        key: String,
        value: String,
        expires_at: Option<i64>,
        now: i64,
    },
    Put {
        kind: String,
        key: String,
        value: String,
        expires_at: Option<i64>,
    },
    Replace {
        kind: String,
        key: String,
        expected: String,
        value: String,
        now: i64,
    },
    Delete {
        kind: String,
        key: String,
    },
}

impl Write {
    /// The statement, with `$n` placeholders.
    fn statement(&self) -> &'static str {
        match self {
            Write::Insert { .. } => INSERT,
            Write::Put { .. } => PUT,
            Write::Replace { .. } => REPLACE,
            Write::Delete { .. } => DELETE,
        }
    }
}

/// A write and the caller waiting for the number of rows it changed, who may
/// also want to hear that number as soon as the statement has run.
struct Queued {
    write: Write,
    answer: oneshot::Sender<Result<u64>>,
    ran: Option<oneshot::Sender<u64>>,
}

/// The writes committed together, and for each the caller to tell as soon as
/// its statement has run (before the commit), if it asked.
struct Group {
    writes: Vec<Write>,
    ran: Vec<Option<oneshot::Sender<u64>>>,
}

impl Group {
    fn alone(write: Write) -> Self {
        Self {
            writes: vec![write],
            ran: vec![None],
        }
    }

    /// Tells the caller of the write at `index`, if it asked, what its
    /// statement changed. A caller told nothing waits for the commit.
    fn has_run(&mut self, index: usize, count: u64) {
        if let Some(ran) = self.ran.get_mut(index).and_then(Option::take) {
            let _ = ran.send(count);
        }
    }
}

/// A write whose statement has run in a transaction not yet committed.
struct Ran {
    count: u64,
    committed: oneshot::Receiver<Result<u64>>,
}

impl Ran {
    /// Waits for the commit; it fails if the write did not commit with the
    /// count it ran with (its group failed and it was run again alone).
    async fn committed(self) -> Result<()> {
        let count = self.committed.await.map_err(|_| stopped())??;
        if count == self.count {
            Ok(())
        } else {
            Err(StoreError::Database(
                "an auth record write committed other than it ran".into(),
            ))
        }
    }
}

/// Group commit for auth record writes: every token request writes one (the
/// client assertion's `jti`, a code's use, a refresh token), and committing each
/// alone makes the disk's sync rate the token endpoint's ceiling. Writes queued
/// by concurrent callers run in order in one transaction; each caller learns
/// its own write's result once that transaction is committed, or, if it asked
/// ([`GroupWriter::stage`]), as soon as every statement of the group has run.
#[derive(Clone)]
struct GroupWriter {
    queue: mpsc::Sender<Queued>,
}

impl GroupWriter {
    /// Starts the background task that commits queued writes with `commit`,
    /// which runs a group in one transaction and returns each write's row count.
    fn start<C, F>(commit: C) -> Self
    where
        C: Fn(Group) -> F + Send + Sync + 'static,
        F: Future<Output = Result<Vec<u64>>> + Send + 'static,
    {
        let (queue, queued) = mpsc::channel(QUEUE_LIMIT);
        tokio::spawn(run_groups(queued, commit));
        Self { queue }
    }

    async fn write(&self, write: Write) -> Result<u64> {
        let (answer, answered) = oneshot::channel();
        self.queue
            .send(Queued {
                write,
                answer,
                ran: None,
            })
            .await
            .map_err(|_| stopped())?;
        // A dropped answer means the task ended before committing: never Ok.
        answered.await.map_err(|_| stopped())?
    }

    /// Answers as soon as the write's statement has run, with the commit still
    /// to wait for; or, if its group failed before that, once it is committed
    /// (then there is nothing left to wait for).
    async fn stage(&self, write: Write) -> Result<Staged> {
        let (answer, answered) = oneshot::channel();
        let (ran, has_run) = oneshot::channel();
        self.queue
            .send(Queued {
                write,
                answer,
                ran: Some(ran),
            })
            .await
            .map_err(|_| stopped())?;
        match has_run.await {
            Ok(count) => Ok(Staged::Ran(Ran {
                count,
                committed: answered,
            })),
            Err(_) => Ok(Staged::Committed(answered.await.map_err(|_| stopped())??)),
        }
    }
}

/// What [`GroupWriter::stage`] learned.
enum Staged {
    Ran(Ran),
    Committed(u64),
}

fn stopped() -> StoreError {
    StoreError::Unavailable("the auth record writer has stopped".into())
}

async fn run_groups<C, F>(mut queued: mpsc::Receiver<Queued>, commit: C)
where
    C: Fn(Group) -> F + Send + Sync + 'static,
    F: Future<Output = Result<Vec<u64>>> + Send + 'static,
{
    let mut group = Vec::with_capacity(GROUP_LIMIT);
    // Waits for one caller, then takes whoever else is already queued.
    while queued.recv_many(&mut group, GROUP_LIMIT).await > 0 {
        let mut callers: Vec<Queued> = std::mem::take(&mut group);
        let writes = Group {
            writes: callers.iter().map(|c| c.write.clone()).collect(),
            ran: callers.iter_mut().map(|c| c.ran.take()).collect(),
        };
        match commit_guarded(commit(writes)).await {
            Ok(counts) if counts.len() == callers.len() => {
                for (caller, count) in callers.into_iter().zip(counts) {
                    // A caller that stopped waiting needs no answer.
                    let _ = caller.answer.send(Ok(count));
                }
            }
            Ok(_) => {
                let error = StoreError::Database("a group of auth record writes lost count".into());
                for caller in callers {
                    let _ = caller.answer.send(Err(error.clone()));
                }
            }
            Err(error) if callers.len() > 1 => {
                // One caller's failing write must not fail the others: each alone.
                tracing::warn!(%error, callers = callers.len(), "a group of auth record writes failed; committing them one by one");
                for caller in callers {
                    let result = commit_guarded(commit(Group::alone(caller.write)))
                        .await
                        .and_then(|counts| {
                            counts.first().copied().ok_or_else(|| {
                                StoreError::Database("an auth record write lost count".into())
                            })
                        });
                    let _ = caller.answer.send(result);
                }
            }
            Err(error) => {
                for caller in callers {
                    let _ = caller.answer.send(Err(error.clone()));
                }
            }
        }
    }
}

/// Runs a group on a task of its own, so that a panic fails that group's
/// callers instead of ending the writer (after which every write would fail).
async fn commit_guarded<F>(group: F) -> Result<Vec<u64>>
where
    F: Future<Output = Result<Vec<u64>>> + Send + 'static,
{
    match tokio::spawn(group).await {
        Ok(result) => result,
        Err(panicked) => {
            tracing::error!(error = %panicked, "a group of auth record writes panicked");
            Err(StoreError::Database(
                "the auth record write failed unexpectedly".into(),
            ))
        }
    }
}

/// Runs a group's writes in order in the open transaction `tx`, tells the
/// callers who asked what each changed, commits it, and returns each write's
/// row count.
macro_rules! commit_group {
    ($tx:expr, $group:expr, $dialect:path) => {{
        let mut tx = $tx;
        let mut group: Group = $group;
        let mut counts = Vec::with_capacity(group.writes.len());
        for write in &group.writes {
            let statement = $dialect(write.statement());
            let done = bind!(write, &statement).execute(&mut *tx).await?;
            counts.push(done.rows_affected());
        }
        // Told only once every statement has run, so that a failing statement
        // (which sends the group to be run again one by one) tells no one.
        for (index, count) in counts.iter().enumerate() {
            group.has_run(index, *count);
        }
        tx.commit().await?;
        Ok(counts)
    }};
}

pub(crate) struct SqliteAuthRecords {
    writes: GroupWriter,
    readers: Readers,
    group: Arc<WriteGroup>,
    clock: Arc<dyn Clock>,
}

impl SqliteAuthRecords {
    /// Must be called inside a Tokio runtime: it starts the group writer.
    /// Its groups join the store's write group, so a token request's record
    /// shares a commit with the AuditEvents and resources written meanwhile.
    pub fn new(group: Arc<WriteGroup>, readers: Readers, clock: Arc<dyn Clock>) -> Self {
        let shared = group.clone();
        let writes = GroupWriter::start(move |writes| {
            let shared = shared.clone();
            async move {
                let tx = shared.begin().await?;
                commit_group!(tx, writes, sqlite)
            }
        });
        Self {
            writes,
            readers,
            group,
            clock,
        }
    }

    /// Deletes the records that have expired.
    async fn purge(&self, now: i64) -> Result<()> {
        let mut tx = self.group.begin().await?;
        sqlx::query(&sqlite(PURGE))
            .bind(now)
            .execute(&mut *tx)
            .await?;
        tx.commit().await
    }
}

/// One pool serves both roles on PostgreSQL.
pub(crate) struct PostgresAuthRecords {
    writes: GroupWriter,
    readers: PgPool,
    writer: PgPool,
    clock: Arc<dyn Clock>,
}

impl PostgresAuthRecords {
    /// Must be called inside a Tokio runtime: it starts the group writer.
    pub fn new(pool: PgPool, clock: Arc<dyn Clock>) -> Self {
        let writer = pool.clone();
        let writes = GroupWriter::start(move |group| {
            let pool = writer.clone();
            async move {
                let tx = pool.begin().await?;
                commit_group!(tx, group, postgres)
            }
        });
        Self {
            writes,
            writer: pool.clone(),
            readers: pool,
            clock,
        }
    }

    /// Deletes the records that have expired.
    async fn purge(&self, now: i64) -> Result<()> {
        sqlx::query(&postgres(PURGE))
            .bind(now)
            .execute(&self.writer)
            .await?;
        Ok(())
    }
}

/// The query of a write: its statement (in the dialect) with its values bound.
macro_rules! bind {
    ($write:expr, $statement:expr) => {
        match $write {
            Write::Insert {
                kind,
                key,
                value,
                expires_at,
                now,
            } => sqlx::query($statement)
                .bind(kind.clone())
                .bind(key.clone())
                .bind(value.clone())
                .bind(*expires_at)
                .bind(*now),
            Write::Put {
                kind,
                key,
                value,
                expires_at,
            } => sqlx::query($statement)
                .bind(kind.clone())
                .bind(key.clone())
                .bind(value.clone())
                .bind(*expires_at),
            Write::Replace {
                kind,
                key,
                expected,
                value,
                now,
            } => sqlx::query($statement)
                .bind(kind.clone())
                .bind(key.clone())
                .bind(expected.clone())
                .bind(value.clone())
                .bind(*now),
            Write::Delete { kind, key } => {
                sqlx::query($statement).bind(kind.clone()).bind(key.clone())
            }
        }
    };
}
use bind;

/// The one implementation, for a records type with a group writer, `readers`,
/// a `purge` of expired records, and the function that adapts the statements
/// to its database.
macro_rules! auth_records {
    ($records:ty, $dialect:path) => {
        #[async_trait]
        impl AuthRecords for $records {
            async fn insert(
                &self,
                kind: &str,
                key: &str,
                value: &Value,
                expires_at: Option<OffsetDateTime>,
            ) -> Result<bool> {
                let write = insert_of(self.clock.as_ref(), kind, key, value, expires_at);
                Ok(self.writes.write(write).await? == 1)
            }

            async fn insert_staged(
                &self,
                kind: &str,
                key: &str,
                value: &Value,
                expires_at: Option<OffsetDateTime>,
            ) -> Result<StagedInsert> {
                let write = insert_of(self.clock.as_ref(), kind, key, value, expires_at);
                Ok(match self.writes.stage(write).await? {
                    Staged::Ran(ran) => StagedInsert::new(ran.count == 1, ran.committed()),
                    Staged::Committed(count) => StagedInsert::already_committed(count == 1),
                })
            }

            async fn put(
                &self,
                kind: &str,
                key: &str,
                value: &Value,
                expires_at: Option<OffsetDateTime>,
            ) -> Result<()> {
                let write = Write::Put {
                    kind: kind.to_owned(),
                    key: key.to_owned(),
                    value: text(value),
                    expires_at: seconds(expires_at),
                };
                self.writes.write(write).await?;
                Ok(())
            }

            async fn get(&self, kind: &str, key: &str) -> Result<Option<Value>> {
                let row = sqlx::query(&$dialect(GET))
                    .bind(kind)
                    .bind(key)
                    .bind(self.clock.now().unix_timestamp())
                    .fetch_optional(&mut *self.readers.acquire().await?)
                    .await?;
                row.map(|row| parse(&row.try_get::<String, _>(0)?))
                    .transpose()
            }

            async fn get_each(&self, wanted: &[(&str, &str)]) -> Result<Vec<Option<Value>>> {
                if wanted.is_empty() {
                    return Ok(Vec::new());
                }
                let statement = $dialect(&get_each_statement(wanted.len()));
                let mut query = sqlx::query(&statement);
                for (kind, key) in wanted {
                    query = query.bind(*kind).bind(*key);
                }
                let rows = query
                    .bind(self.clock.now().unix_timestamp())
                    .fetch_all(&mut *self.readers.acquire().await?)
                    .await?;
                let mut found = vec![None; wanted.len()];
                for row in rows {
                    let kind: String = row.try_get(0)?;
                    let key: String = row.try_get(1)?;
                    let value = parse(&row.try_get::<String, _>(2)?)?;
                    for (slot, (k, q)) in found.iter_mut().zip(wanted) {
                        if *k == kind && *q == key {
                            *slot = Some(value.clone());
                        }
                    }
                }
                Ok(found)
            }

            async fn replace(
                &self,
                kind: &str,
                key: &str,
                expected: &Value,
                value: &Value,
            ) -> Result<bool> {
                let write = Write::Replace {
                    kind: kind.to_owned(),
                    key: key.to_owned(),
                    expected: text(expected),
                    value: text(value),
                    now: self.clock.now().unix_timestamp(),
                };
                Ok(self.writes.write(write).await? == 1)
            }

            async fn delete(&self, kind: &str, key: &str) -> Result<bool> {
                let write = Write::Delete {
                    kind: kind.to_owned(),
                    key: key.to_owned(),
                };
                Ok(self.writes.write(write).await? == 1)
            }

            async fn list(&self, kind: &str) -> Result<Vec<(String, Value)>> {
                let now = self.clock.now().unix_timestamp();
                // Listing is rare (administration), so it is where expired rows go.
                self.purge(now).await?;
                let rows = sqlx::query(&$dialect(LIST))
                    .bind(kind)
                    .bind(now)
                    .fetch_all(&mut *self.readers.acquire().await?)
                    .await?;
                rows.iter()
                    .map(|row| Ok((row.try_get(0)?, parse(&row.try_get::<String, _>(1)?)?)))
                    .collect()
            }
        }
    };
}

auth_records!(SqliteAuthRecords, sqlite);
auth_records!(PostgresAuthRecords, postgres);

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;
    use std::time::Duration;

    use tokio::sync::Semaphore;

    use super::*;

    #[tokio::test]
    async fn records_read_together_are_each_looked_up_by_their_key_on_sqlite() {
        use sqlx::Connection;
        let mut conn = sqlx::SqliteConnection::connect("sqlite::memory:")
            .await
            .unwrap();
        sqlx::raw_sql(include_str!(
            "../../../migrations/sqlite/20261122000002_auth_records.sql"
        ))
        .execute(&mut conn)
        .await
        .unwrap();
        let sql = format!("EXPLAIN QUERY PLAN {}", sqlite(&get_each_statement(3)));
        let mut explain = sqlx::query(&sql);
        for value in ["revoked", "t", "grant", "g", "jti", "j"] {
            explain = explain.bind(value);
        }
        let steps: Vec<String> = explain
            .bind(0_i64)
            .fetch_all(&mut conn)
            .await
            .unwrap()
            .iter()
            .map(|row| row.get::<String, _>(3))
            .collect();
        let lookups: Vec<&String> = steps.iter().filter(|s| s.starts_with("SEARCH")).collect();
        assert_eq!(lookups.len(), 3, "{steps:?}");
        assert!(
            lookups.iter().all(|s| s.contains("(kind=? AND key=?)")),
            "{steps:?}"
        );
    }

    /// A commit that records the keys of each group, holds each group until
    /// the test lets it go, fails any group holding the key "bad" before its
    /// statements run and any holding "unsyncable" at its commit, and panics
    /// when told to; each write "changes" one row.
    struct Scripted {
        groups: Mutex<Vec<Vec<String>>>,
        gate: Semaphore,
        panic: AtomicBool,
    }

    fn key(write: &Write) -> String {
        match write {
            Write::Insert { key, .. }
            | Write::Put { key, .. }
            | Write::Replace { key, .. }
            | Write::Delete { key, .. } => key.clone(),
        }
    }

    fn scripted() -> (Arc<Scripted>, GroupWriter) {
        let script = Arc::new(Scripted {
            groups: Mutex::default(),
            gate: Semaphore::new(0),
            panic: AtomicBool::default(),
        });
        let commit = {
            let script = script.clone();
            move |mut group: Group| {
                let script = script.clone();
                async move {
                    let keys: Vec<String> = group.writes.iter().map(key).collect();
                    script.groups.lock().unwrap().push(keys.clone());
                    script.gate.acquire().await.unwrap().forget();
                    assert!(!script.panic.load(Ordering::SeqCst), "the commit panics");
                    if keys.iter().any(|k| k == "bad") {
                        return Err(StoreError::Database("refused".into()));
                    }
                    // As if another writer stored "taken-meanwhile" between a
                    // failed group and the write's run alone.
                    let counts: Vec<u64> = keys
                        .iter()
                        .map(|k| u64::from(!(k == "taken-meanwhile" && keys.len() == 1)))
                        .collect();
                    for (index, count) in counts.iter().enumerate() {
                        group.has_run(index, *count);
                    }
                    // The statements have run; the test lets the commit go.
                    script.gate.acquire().await.unwrap().forget();
                    if keys.iter().any(|k| k == "unsyncable") {
                        return Err(StoreError::Unavailable("the disk failed".into()));
                    }
                    Ok(counts)
                }
            }
        };
        (script, GroupWriter::start(commit))
    }

    fn delete(key: &str) -> Write {
        Write::Delete {
            kind: "jti".into(),
            key: key.into(),
        }
    }

    fn spawn_writes(
        writer: &GroupWriter,
        keys: &[&str],
    ) -> Vec<tokio::task::JoinHandle<Result<u64>>> {
        keys.iter()
            .map(|key| {
                let writer = writer.clone();
                let write = delete(key);
                tokio::spawn(async move { writer.write(write).await })
            })
            .collect()
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

    fn queued(writer: &GroupWriter) -> usize {
        QUEUE_LIMIT - writer.queue.capacity()
    }

    #[tokio::test]
    async fn writes_queued_during_a_commit_go_together_in_the_next_one_in_order() {
        let (script, writer) = scripted();
        let first = spawn_writes(&writer, &["a"]);
        until(|| script.groups.lock().unwrap().len() == 1).await;
        let mut waiting = Vec::new();
        for key in ["b", "c", "d"] {
            waiting.extend(spawn_writes(&writer, &[key]));
            let expected = waiting.len();
            until(|| queued(&writer) == expected).await;
        }
        // Each group is let go twice: to run its statements, then to commit.
        script.gate.add_permits(4);
        for answer in first.into_iter().chain(waiting) {
            assert_eq!(answer.await.unwrap().unwrap(), 1);
        }
        assert_eq!(
            *script.groups.lock().unwrap(),
            [vec!["a"], vec!["b", "c", "d"]]
        );
    }

    #[tokio::test]
    async fn a_failing_write_fails_only_its_own_caller() {
        let (script, writer) = scripted();
        let first = spawn_writes(&writer, &["a"]);
        until(|| script.groups.lock().unwrap().len() == 1).await;
        let mut waiting = Vec::new();
        for key in ["b", "bad", "c"] {
            waiting.extend(spawn_writes(&writer, &[key]));
            let expected = waiting.len();
            until(|| queued(&writer) == expected).await;
        }
        // The first group, the failed group, then each of its writes alone;
        // twice for each that gets to its commit.
        script.gate.add_permits(8);
        assert_eq!(first.into_iter().next().unwrap().await.unwrap().unwrap(), 1);
        let answers: Vec<Result<u64>> = answers_of(waiting).await;
        assert!(matches!(answers[0], Ok(1)));
        assert!(matches!(answers[1], Err(StoreError::Database(_))));
        assert!(matches!(answers[2], Ok(1)));
        assert_eq!(
            *script.groups.lock().unwrap(),
            [
                vec!["a"],
                vec!["b", "bad", "c"],
                vec!["b"],
                vec!["bad"],
                vec!["c"]
            ]
        );
    }

    #[tokio::test]
    async fn a_panicking_commit_fails_its_callers_and_the_writer_goes_on() {
        let (script, writer) = scripted();
        script.panic.store(true, Ordering::SeqCst);
        script.gate.add_permits(1);
        let answer = writer.write(delete("a")).await;
        assert!(matches!(answer, Err(StoreError::Database(_))));
        script.panic.store(false, Ordering::SeqCst);
        script.gate.add_permits(2);
        assert_eq!(writer.write(delete("b")).await.unwrap(), 1);
    }

    fn spawn_stage(writer: &GroupWriter, key: &str) -> tokio::task::JoinHandle<Result<Staged>> {
        let writer = writer.clone();
        let write = delete(key);
        tokio::spawn(async move { writer.stage(write).await })
    }

    fn ran(staged: Result<Staged>) -> Ran {
        match staged {
            Ok(Staged::Ran(ran)) => ran,
            Ok(Staged::Committed(_)) => panic!("answered only after the commit"),
            Err(e) => panic!("the write failed: {e}"),
        }
    }

    #[tokio::test]
    async fn a_staged_write_hears_its_count_before_the_commit_and_then_that_it_committed() {
        let (script, writer) = scripted();
        let staged = spawn_stage(&writer, "a");
        script.gate.add_permits(1);
        let ran = ran(staged.await.unwrap());
        assert_eq!(ran.count, 1);
        let committed = tokio::spawn(ran.committed());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!committed.is_finished(), "the commit is still held");
        script.gate.add_permits(1);
        committed.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_staged_write_whose_commit_fails_hears_so_from_the_commit() {
        let (script, writer) = scripted();
        let staged = spawn_stage(&writer, "unsyncable");
        script.gate.add_permits(1);
        let ran = ran(staged.await.unwrap());
        assert_eq!(ran.count, 1);
        script.gate.add_permits(1);
        assert!(matches!(
            ran.committed().await,
            Err(StoreError::Unavailable(_))
        ));
    }

    #[tokio::test]
    async fn a_staged_write_run_again_alone_with_another_count_fails_at_the_commit() {
        let (script, writer) = scripted();
        let first = spawn_writes(&writer, &["a"]);
        until(|| script.groups.lock().unwrap().len() == 1).await;
        let staged = spawn_stage(&writer, "taken-meanwhile");
        until(|| queued(&writer) == 1).await;
        let failing = spawn_writes(&writer, &["unsyncable"]);
        until(|| queued(&writer) == 2).await;
        script.gate.add_permits(2);
        assert_eq!(first.into_iter().next().unwrap().await.unwrap().unwrap(), 1);
        // The group runs both statements, then fails at its commit.
        script.gate.add_permits(1);
        let ran = ran(staged.await.unwrap());
        assert_eq!(ran.count, 1);
        script.gate.add_permits(1 + 4);
        assert!(matches!(
            ran.committed().await,
            Err(StoreError::Database(_))
        ));
        let answers = answers_of(failing).await;
        assert!(matches!(answers[0], Err(StoreError::Unavailable(_))));
        assert_eq!(
            *script.groups.lock().unwrap(),
            [
                vec!["a"],
                vec!["taken-meanwhile", "unsyncable"],
                vec!["taken-meanwhile"],
                vec!["unsyncable"]
            ]
        );
    }

    #[tokio::test]
    async fn a_staged_write_whose_group_fails_before_it_runs_is_answered_once_committed() {
        let (script, writer) = scripted();
        let first = spawn_writes(&writer, &["a"]);
        until(|| script.groups.lock().unwrap().len() == 1).await;
        let failing = spawn_writes(&writer, &["bad"]);
        until(|| queued(&writer) == 1).await;
        let staged = spawn_stage(&writer, "b");
        until(|| queued(&writer) == 2).await;
        // [a] twice, [bad, b] once, [bad] once, [b] twice.
        script.gate.add_permits(6);
        assert_eq!(first.into_iter().next().unwrap().await.unwrap().unwrap(), 1);
        assert!(matches!(
            answers_of(failing).await[0],
            Err(StoreError::Database(_))
        ));
        assert!(matches!(staged.await.unwrap(), Ok(Staged::Committed(1))));
    }

    #[tokio::test]
    async fn a_writer_whose_task_has_ended_answers_unavailable() {
        let (queue, queued) = mpsc::channel(1);
        drop(queued);
        let stopped = GroupWriter { queue };
        assert!(matches!(
            stopped.write(delete("a")).await,
            Err(StoreError::Unavailable(_))
        ));
    }

    async fn answers_of(handles: Vec<tokio::task::JoinHandle<Result<u64>>>) -> Vec<Result<u64>> {
        let mut answers = Vec::new();
        for handle in handles {
            answers.push(handle.await.unwrap());
        }
        answers
    }
}
