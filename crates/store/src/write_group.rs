//! Write transactions that share SQLite commits.
//!
//! SQLite has one writer, and every commit writes each page it dirtied to the WAL
//! and syncs the file. So transactions that queue for the writer while another
//! runs join its database transaction, each as a savepoint, and the group commits
//! once they have had their turn: one sync, and each index page written once, for
//! the whole group. The transaction that opens a group needs no savepoint, and one
//! with nobody queued behind it commits at once, so a lone writer pays nothing for
//! the sharing. A transaction's `commit` returns only after the group's commit, so
//! nothing is reported written before it is durable; one that ends without
//! committing is rolled back alone. If the group's transaction itself fails, every
//! transaction in it is told so. Every statement sent while a transaction holds
//! the writer is a round trip to SQLite's connection thread that every other
//! writer waits for, so a transaction's savepoint is released by the statement
//! that starts the next one (or by the group's `COMMIT`), not by one of its own,
//! and a transaction may read with the statement that starts it. A group that
//! has written many rows commits before taking in more: large transactions (a
//! bundle of a hundred resources) gain nothing from sharing a sync, and an ever
//! larger transaction would outgrow the page cache. A transaction known to be large does not join
//! at all: in a savepoint, SQLite keeps the original of every page it changes
//! in memory (temporary files are in memory here), which for a bundle of
//! thousands of resources is tens of megabytes.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, Sqlite, SqliteConnection, SqlitePool};
use tokio::sync::{oneshot, Mutex, Notify, OwnedMutexGuard};
use tokio::task::JoinHandle;

use crate::checkpoint::Checkpoints;
use crate::{Result, StoreError};

/// Rows a group's transaction may have written before it commits without
/// waiting for more members: a few dozen creates, or one bundle.
const GROUP_ROWS: i64 = 2_000;

/// Shares commits between the write transactions of one database.
pub(crate) struct WriteGroup {
    state: Arc<Mutex<GroupState>>,
    signal: Arc<Signal>,
    /// Started by the first transaction, on the runtime it runs on, and again
    /// if that runtime has ended.
    committer: std::sync::Mutex<Option<JoinHandle<()>>>,
    /// How long a transaction may queue for the writer.
    wait: Duration,
}

/// How transactions and the store reach the committer.
#[derive(Default)]
struct Signal {
    /// A transaction ended: there may be something to commit or undo.
    wake: Notify,
    /// The store is closing: commit what is left and stop.
    closed: AtomicBool,
    /// Transactions waiting for the writer, which may join the open group.
    queued: AtomicUsize,
}

/// Counts a transaction as queued for the writer until dropped.
struct Queued<'a>(&'a AtomicUsize);

impl<'a> Queued<'a> {
    fn new(queued: &'a AtomicUsize) -> Self {
        queued.fetch_add(1, Ordering::AcqRel);
        Self(queued)
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

struct GroupState {
    pool: SqlitePool,
    /// The writer connection, taken from its pool while a group's transaction is
    /// open on it, so that nothing else writes in between.
    open: Option<PoolConnection<Sqlite>>,
    /// Whether the transaction holding the writer joined an open group (and so
    /// runs in a savepoint) rather than opened it.
    joined: bool,
    /// The last transaction to join committed with its savepoint still open:
    /// the next one to join releases it first.
    release_pending: bool,
    /// The last transaction ended without committing: it must be undone before
    /// anything else runs.
    abandoned: bool,
    /// Transactions released into the open one, waiting for it to commit.
    waiting: Vec<oneshot::Sender<Result<()>>>,
    /// SQLite's count of rows changed on the connection when the group's
    /// transaction began (`total_changes()`).
    changes_before: i64,
    /// See [`GROUP_ROWS`].
    row_limit: i64,
    /// Groups committed so far.
    commits: u64,
    /// Told of every commit, if the database has a checkpoint task.
    checkpoints: Option<Arc<Checkpoints>>,
}

impl WriteGroup {
    /// A group over the writer pool (of one connection), with its committer
    /// task, telling `checkpoints` of its commits if given.
    pub(crate) fn new(
        pool: SqlitePool,
        wait: Duration,
        checkpoints: Option<Arc<Checkpoints>>,
    ) -> Self {
        let signal = Arc::<Signal>::default();
        Self {
            state: Arc::new(Mutex::new(GroupState {
                pool,
                open: None,
                joined: false,
                release_pending: false,
                abandoned: false,
                waiting: Vec::new(),
                changes_before: 0,
                row_limit: GROUP_ROWS,
                commits: 0,
                checkpoints,
            })),
            signal,
            committer: std::sync::Mutex::new(None),
            wait,
        }
    }

    /// Starts a transaction: waits for the writer, then joins the open group's
    /// transaction with a savepoint, or opens one with `BEGIN IMMEDIATE`.
    pub(crate) async fn begin(&self) -> Result<GroupTx> {
        Ok(self.begin_reading(None).await?.0)
    }

    /// Starts a transaction as [`WriteGroup::begin`] does, running the query
    /// `read` (a SELECT of at most one row) inside it in the same round trip to
    /// the writer, and returns its row.
    pub(crate) async fn begin_reading(
        &self,
        read: Option<&str>,
    ) -> Result<(GroupTx, Option<SqliteRow>)> {
        self.start_committer();
        let queued = Queued::new(&self.signal.queued);
        let mut state = self.writer().await?;
        drop(queued);
        state.undo_abandoned().await;
        let row = state.start(read).await?;
        Ok((self.holding(state), row))
    }

    /// Starts a transaction that does not join an open group: waits for the
    /// writer, commits the group it finds open, and opens its own. Those that
    /// queue behind it may still join it. For transactions that write many
    /// rows, which a savepoint would copy page by page into memory.
    /// `read` is run as [`WriteGroup::begin_reading`] runs it.
    pub(crate) async fn begin_alone(
        &self,
        read: Option<&str>,
    ) -> Result<(GroupTx, Option<SqliteRow>)> {
        self.start_committer();
        let mut state = self.writer().await?;
        state.undo_abandoned().await;
        state.commit().await;
        let row = state.start(read).await?;
        Ok((self.holding(state), row))
    }

    async fn writer(&self) -> Result<OwnedMutexGuard<GroupState>> {
        tokio::time::timeout(self.wait, self.state.clone().lock_owned())
            .await
            .map_err(|_| {
                StoreError::Unavailable("timed out waiting for the database writer".into())
            })
    }

    fn holding(&self, state: OwnedMutexGuard<GroupState>) -> GroupTx {
        GroupTx {
            state: Some(state),
            signal: self.signal.clone(),
        }
    }

    fn start_committer(&self) {
        restart(&self.committer, || {
            commit_groups(self.state.clone(), self.signal.clone())
        });
    }

    /// How many group commits there have been.
    #[cfg(test)]
    pub(crate) async fn commits(&self) -> u64 {
        self.state.lock().await.commits
    }

    /// How many transactions wait for the writer.
    #[cfg(test)]
    pub(crate) fn queued(&self) -> usize {
        self.signal.queued.load(Ordering::Acquire)
    }
}

/// Spawns the task unless it runs already.
pub(crate) fn restart<F>(task: &std::sync::Mutex<Option<JoinHandle<()>>>, start: impl FnOnce() -> F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let mut task = task
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if task.as_ref().is_none_or(JoinHandle::is_finished) {
        *task = Some(tokio::spawn(start()));
    }
}

/// The committer: whenever a transaction ends, it queues for the writer behind
/// those already waiting (the lock is fair), and commits what they released.
async fn commit_groups(state: Arc<Mutex<GroupState>>, signal: Arc<Signal>) {
    loop {
        signal.wake.notified().await;
        let mut state = state.lock().await;
        state.undo_abandoned().await;
        state.commit().await;
        // What was released before the store closed is committed above.
        if signal.closed.load(Ordering::Acquire) {
            return;
        }
    }
}

impl Drop for WriteGroup {
    fn drop(&mut self) {
        self.signal.closed.store(true, Ordering::Release);
        self.signal.wake.notify_one();
    }
}

impl GroupState {
    /// Joins the open group with a savepoint, or opens a group; runs `read`
    /// in the same round trip and returns its row.
    async fn start(&mut self, read: Option<&str>) -> Result<Option<SqliteRow>> {
        if let Some(conn) = self.open.as_mut() {
            let release = if std::mem::take(&mut self.release_pending) {
                "RELEASE request; "
            } else {
                ""
            };
            let sql = with_read(
                &format!("{release}SAVEPOINT request; SELECT total_changes()"),
                read,
            );
            let (changes, row) = match sqlx::query(&sql)
                .fetch_all(&mut **conn)
                .await
                .and_then(changes_and_row)
            {
                Ok(answer) => answer,
                Err(e) => return Err(self.fail(e).await),
            };
            if changes - self.changes_before < self.row_limit {
                self.joined = true;
                return Ok(row);
            }
            // The group has written enough: it commits (with the empty
            // savepoint just begun), and this transaction opens the next.
            self.commit().await;
        }
        self.joined = false;
        let mut conn = self.pool.acquire().await?;
        // One round trip: every writer waits meanwhile. If the SELECT fails
        // after BEGIN ran, `fail` rolls back what was begun; if BEGIN itself
        // failed, that rollback finds nothing and the connection is replaced.
        let sql = with_read("BEGIN IMMEDIATE; SELECT total_changes()", read);
        let answer = sqlx::query(&sql)
            .fetch_all(&mut *conn)
            .await
            .and_then(changes_and_row);
        self.open = Some(conn);
        match answer {
            Ok((changes, row)) => {
                self.changes_before = changes;
                Ok(row)
            }
            Err(e) => Err(self.fail(e).await),
        }
    }

    /// Says whether the group should commit as the holder releases it: when
    /// nobody is queued to join. A savepoint is left open for the next to
    /// release; `COMMIT` ends it too.
    fn release(&mut self, queued: usize) -> bool {
        if queued == 0 {
            return true;
        }
        self.release_pending = self.joined;
        false
    }

    async fn undo_abandoned(&mut self) {
        if !std::mem::take(&mut self.abandoned) {
            return;
        }
        if !self.joined && self.waiting.is_empty() {
            // It opened the group, so the group holds nothing else.
            self.roll_back().await;
            return;
        }
        let Some(conn) = self.open.as_mut() else {
            return;
        };
        // Fails if SQLite already rolled the whole transaction back (it does
        // after some errors, such as a full disk), and so does the group.
        let undone = match sqlx::query("ROLLBACK TO request")
            .execute(&mut **conn)
            .await
        {
            Ok(_) => sqlx::query("RELEASE request").execute(&mut **conn).await,
            Err(e) => Err(e),
        };
        if let Err(e) = undone {
            self.fail(e).await;
        }
    }

    /// Commits the group's transaction, if one is open, and tells its members.
    async fn commit(&mut self) {
        let Some(conn) = self.open.as_mut() else {
            return;
        };
        match sqlx::query("COMMIT").execute(&mut **conn).await {
            Ok(_) => {
                self.open = None;
                self.release_pending = false;
                self.commits += 1;
                if let Some(checkpoints) = &self.checkpoints {
                    checkpoints.after_commit();
                }
                for member in self.waiting.drain(..) {
                    let _ = member.send(Ok(()));
                }
            }
            Err(e) => {
                self.fail(e).await;
            }
        }
    }

    /// Ends the open transaction, if any, with `ROLLBACK`.
    async fn roll_back(&mut self) {
        self.release_pending = false;
        if let Some(mut conn) = self.open.take() {
            if sqlx::query("ROLLBACK").execute(&mut *conn).await.is_err() {
                // The transaction is gone already, or the connection is broken:
                // a new connection is the safe one to write on next.
                conn.close_on_drop();
            }
        }
    }

    /// Rolls the group's transaction back after a statement failed and tells
    /// each member; returns the error.
    async fn fail(&mut self, error: sqlx::Error) -> StoreError {
        let cause = StoreError::from(error);
        tracing::error!(error = %cause, members = self.waiting.len(), "a shared write transaction failed");
        self.roll_back().await;
        for member in self.waiting.drain(..) {
            let _ = member.send(Err(StoreError::Unavailable(format!(
                "the shared write transaction failed: {cause}"
            ))));
        }
        cause
    }
}

/// `start` followed by the query `read`, if any.
fn with_read(start: &str, read: Option<&str>) -> String {
    match read {
        Some(read) => format!("{start}; {read}"),
        None => start.to_owned(),
    }
}

/// The rows of a group's first statements: SQLite's count of changed rows,
/// then the row of the transaction's own read, if it found one.
fn changes_and_row(
    rows: Vec<SqliteRow>,
) -> std::result::Result<(i64, Option<SqliteRow>), sqlx::Error> {
    let mut rows = rows.into_iter();
    let changes = match rows.next() {
        Some(row) => row.try_get(0)?,
        None => return Err(sqlx::Error::RowNotFound),
    };
    Ok((changes, rows.next()))
}

fn lost() -> StoreError {
    StoreError::Unavailable("the shared write transaction was lost".into())
}

/// One transaction of a group: it holds the writer until it commits or is
/// dropped, and dereferences to the writer connection.
pub(crate) struct GroupTx {
    state: Option<OwnedMutexGuard<GroupState>>,
    signal: Arc<Signal>,
}

impl GroupTx {
    /// Leaves its writes to the group and waits for the group's commit.
    pub(crate) async fn commit(mut self) -> Result<()> {
        let Some(mut state) = self.state.take() else {
            return Err(lost());
        };
        let now = state.release(self.signal.queued.load(Ordering::Acquire));
        let (member, outcome) = oneshot::channel();
        state.waiting.push(member);
        if now {
            // With every member released before it.
            state.commit().await;
            drop(state);
        } else {
            drop(state);
            // The committer queues behind those waiting and commits after them.
            self.signal.wake.notify_one();
        }
        outcome.await.unwrap_or_else(|_| Err(lost()))
    }
}

impl Drop for GroupTx {
    fn drop(&mut self) {
        if let Some(mut state) = self.state.take() {
            state.abandoned = true;
            drop(state);
            self.signal.wake.notify_one();
        }
    }
}

impl Deref for GroupTx {
    type Target = SqliteConnection;

    fn deref(&self) -> &SqliteConnection {
        self.state
            .as_ref()
            .and_then(|state| state.open.as_deref())
            .expect("a transaction holds the open connection until it ends")
    }
}

impl DerefMut for GroupTx {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        self.state
            .as_mut()
            .and_then(|state| state.open.as_deref_mut())
            .expect("a transaction holds the open connection until it ends")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};

    fn options(dir: &tempfile::TempDir) -> SqliteConnectOptions {
        SqliteConnectOptions::new()
            .filename(dir.path().join("group.db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
    }

    /// A group over a writer pool of one connection opened with `options`,
    /// on a database with the table `written`.
    async fn group_on(options: SqliteConnectOptions, wait: Duration) -> (SqlitePool, WriteGroup) {
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .unwrap();
        sqlx::query("CREATE TABLE written (n INTEGER PRIMARY KEY)")
            .execute(&pool)
            .await
            .unwrap();
        let group = WriteGroup::new(pool.clone(), wait, None);
        (pool, group)
    }

    async fn group(wait: Duration) -> (tempfile::TempDir, SqlitePool, WriteGroup) {
        let dir = tempfile::tempdir().unwrap();
        let (pool, group) = group_on(options(&dir), wait).await;
        (dir, pool, group)
    }

    /// A group, and the transaction that opened it, holding the writer with
    /// 1 written.
    async fn group_with_one_write() -> (tempfile::TempDir, SqlitePool, Arc<WriteGroup>, GroupTx) {
        let (dir, pool, group) = group(Duration::from_secs(10)).await;
        let group = Arc::new(group);
        let mut first = group.begin().await.unwrap();
        write(&mut first, 1).await;
        (dir, pool, group, first)
    }

    async fn write(tx: &mut GroupTx, n: i64) {
        sqlx::query("INSERT INTO written (n) VALUES (?1)")
            .bind(n)
            .execute(&mut **tx)
            .await
            .unwrap();
    }

    async fn written(pool: &SqlitePool) -> Vec<i64> {
        sqlx::query_scalar("SELECT n FROM written ORDER BY n")
            .fetch_all(pool)
            .await
            .unwrap()
    }

    /// A task that begins a transaction, writes `n` and commits.
    fn spawn_writer(group: &Arc<WriteGroup>, n: i64) -> tokio::task::JoinHandle<()> {
        let group = group.clone();
        tokio::spawn(async move {
            let mut tx = group.begin().await.unwrap();
            write(&mut tx, n).await;
            tx.commit().await.unwrap();
        })
    }

    /// A task that begins a transaction, writes `n` and drops it uncommitted.
    fn spawn_abandoned(group: &Arc<WriteGroup>, n: i64) -> tokio::task::JoinHandle<()> {
        let group = group.clone();
        tokio::spawn(async move {
            let mut tx = group.begin().await.unwrap();
            write(&mut tx, n).await;
        })
    }

    /// Lets a spawned task run until it waits for the writer.
    async fn let_it_queue() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    #[tokio::test]
    async fn a_group_refused_the_write_lock_fails_and_the_next_writes_once_the_lock_is_free() {
        use sqlx::Connection;
        let dir = tempfile::tempdir().unwrap();
        let options = options(&dir).busy_timeout(Duration::from_millis(100));
        let (pool, group) = group_on(options.clone(), Duration::from_secs(10)).await;
        // Another process holds the write lock longer than the busy timeout.
        let mut other = SqliteConnection::connect_with(&options).await.unwrap();
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut other)
            .await
            .unwrap();
        let refused = group.begin().await.err().unwrap();
        assert!(refused.to_string().contains("locked"), "{refused}");
        sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();

        let mut tx = group.begin().await.unwrap();
        write(&mut tx, 7).await;
        tx.commit().await.unwrap();
        assert_eq!(written(&pool).await, vec![7]);
    }

    #[tokio::test]
    async fn transactions_queued_for_the_writer_commit_together_and_each_learns_it_after_the_commit(
    ) {
        let (_dir, pool, group) = group(Duration::from_secs(10)).await;
        let group = Arc::new(group);
        let first = group.begin().await.unwrap();
        let mut queued = tokio::task::JoinSet::new();
        for n in 1..=8 {
            let group = group.clone();
            let pool = pool.clone();
            queued.spawn(async move {
                let mut tx = group.begin().await.unwrap();
                write(&mut tx, n).await;
                tx.commit().await.unwrap();
                // Committed means visible to a new connection's read.
                assert!(written(&pool).await.contains(&n));
            });
        }
        let_it_queue().await;
        first.commit().await.unwrap();
        while let Some(task) = queued.join_next().await {
            task.unwrap();
        }
        assert_eq!(written(&pool).await, (1..=8).collect::<Vec<_>>());
        let commits = group.commits().await;
        assert!(
            (1..=3).contains(&commits),
            "nine transactions, queued at once, took {commits} commits"
        );
    }

    #[tokio::test]
    async fn a_transaction_that_ends_without_committing_leaves_the_rest_of_its_group_written() {
        let (_dir, pool, group, kept) = group_with_one_write().await;
        let abandoned = spawn_abandoned(&group, 2);
        let_it_queue().await;
        // Waits for the group's commit, which runs after the abandoned one is undone.
        kept.commit().await.unwrap();
        abandoned.await.unwrap();
        assert_eq!(written(&pool).await, vec![1]);

        // An abandoned transaction with none after it still frees the writer.
        let mut last = group.begin().await.unwrap();
        write(&mut last, 3).await;
        drop(last);
        let mut next = group.begin().await.unwrap();
        write(&mut next, 4).await;
        next.commit().await.unwrap();
        assert_eq!(written(&pool).await, vec![1, 4]);
        assert!(
            pool.acquire().await.is_ok(),
            "the writer connection is back in its pool between groups"
        );
    }

    #[tokio::test]
    async fn a_transaction_abandoned_after_one_that_joined_undoes_only_its_own_rows() {
        let (_dir, pool, group, first) = group_with_one_write().await;
        // Committed while others queue, so its savepoint is left for the next to release.
        let joined = spawn_writer(&group, 2);
        let_it_queue().await;
        let abandoned = spawn_abandoned(&group, 3);
        let_it_queue().await;
        let last = spawn_writer(&group, 4);
        let_it_queue().await;
        first.commit().await.unwrap();
        for task in [joined, abandoned, last] {
            task.await.unwrap();
        }
        assert_eq!(written(&pool).await, vec![1, 2, 4]);
        assert_eq!(group.commits().await, 1);
    }

    #[tokio::test]
    async fn a_transaction_reads_with_its_start_and_sees_what_its_group_wrote_before_it() {
        const LAST: &str = "SELECT n FROM written ORDER BY n DESC LIMIT 1";
        let (_dir, pool, group) = group(Duration::from_secs(10)).await;
        let group = Arc::new(group);
        let (mut first, nothing) = group.begin_reading(Some(LAST)).await.unwrap();
        assert!(nothing.is_none(), "the table is empty");
        write(&mut first, 1).await;
        let reads = [2, 3].map(|n| {
            let group = group.clone();
            tokio::spawn(async move {
                let (mut tx, row) = group.begin_reading(Some(LAST)).await.unwrap();
                let seen: i64 = row.expect("a row was written before").get(0);
                write(&mut tx, n).await;
                tx.commit().await.unwrap();
                seen
            })
        });
        let_it_queue().await;
        first.commit().await.unwrap();
        let mut seen = Vec::new();
        for read in reads {
            seen.push(read.await.unwrap());
        }
        seen.sort_unstable();
        // Each saw the uncommitted rows of those before it in the group.
        assert_eq!(seen, vec![1, 2]);
        assert_eq!(written(&pool).await, vec![1, 2, 3]);
        assert_eq!(group.commits().await, 1);

        // Opening a group reads too.
        let (tx, row) = group.begin_reading(Some(LAST)).await.unwrap();
        assert_eq!(row.map(|row| row.get::<i64, _>(0)), Some(3));
        drop(tx);
    }

    #[tokio::test]
    async fn when_the_shared_transaction_is_lost_every_transaction_in_it_is_told_so_and_nothing_is_written(
    ) {
        let (_dir, pool, group, released) = group_with_one_write().await;
        let losing = tokio::spawn({
            let group = group.clone();
            async move {
                let mut tx = group.begin().await.unwrap();
                // What SQLite does itself after some errors (a full disk, say):
                // the whole transaction is rolled back, not one statement.
                sqlx::query("ROLLBACK").execute(&mut *tx).await.unwrap();
                drop(tx);
            }
        });
        let_it_queue().await;
        let outcome = released.commit().await;
        losing.await.unwrap();
        assert!(
            matches!(outcome, Err(StoreError::Unavailable(_))),
            "{outcome:?}"
        );
        assert!(written(&pool).await.is_empty());

        // The next transaction starts afresh.
        let mut next = group.begin().await.unwrap();
        write(&mut next, 2).await;
        next.commit().await.unwrap();
        assert_eq!(written(&pool).await, vec![2]);
    }

    #[tokio::test]
    async fn a_group_that_has_written_many_rows_commits_without_waiting_for_those_queued_behind_it()
    {
        let (_dir, pool, group) = group(Duration::from_secs(10)).await;
        group.state.lock().await.row_limit = 3;
        let group = Arc::new(group);
        let mut large = group.begin().await.unwrap();
        for n in 1..=5 {
            write(&mut large, n).await;
        }
        let (proceed, go) = oneshot::channel::<()>();
        let behind = tokio::spawn({
            let group = group.clone();
            async move {
                let mut tx = group.begin().await.unwrap();
                write(&mut tx, 10).await;
                // Holds the writer until the large transaction has committed.
                go.await.unwrap();
                tx.commit().await.unwrap();
            }
        });
        let_it_queue().await;
        tokio::time::timeout(Duration::from_secs(5), large.commit())
            .await
            .expect("the large transaction commits without the one queued behind it")
            .unwrap();
        proceed.send(()).unwrap();
        behind.await.unwrap();
        assert_eq!(written(&pool).await, vec![1, 2, 3, 4, 5, 10]);
        assert_eq!(group.commits().await, 2);
    }

    #[tokio::test]
    async fn a_transaction_begun_alone_commits_the_open_group_first_and_those_behind_it_join_it() {
        let (_dir, pool, group, first) = group_with_one_write().await;
        let joined_committed = Arc::new(AtomicBool::new(false));
        let joined = tokio::spawn({
            let (group, done) = (group.clone(), joined_committed.clone());
            async move {
                let mut tx = group.begin().await.unwrap();
                write(&mut tx, 2).await;
                tx.commit().await.unwrap();
                done.store(true, Ordering::Release);
            }
        });
        let_it_queue().await;
        let alone = tokio::spawn({
            let (group, pool, done) = (group.clone(), pool.clone(), joined_committed.clone());
            async move {
                let mut tx = group.begin_alone(None).await.unwrap().0;
                let_it_queue().await;
                // The group it found open is committed, so not part of this one.
                assert!(done.load(Ordering::Acquire));
                write(&mut tx, 3).await;
                tx.commit().await.unwrap();
                assert!(written(&pool).await.contains(&3));
            }
        });
        let_it_queue().await;
        let behind = spawn_writer(&group, 4);
        let_it_queue().await;
        first.commit().await.unwrap();
        for task in [joined, alone, behind] {
            task.await.unwrap();
        }
        assert_eq!(written(&pool).await, vec![1, 2, 3, 4]);
        // One commit for the first two, one for the lone one and the one behind it.
        assert_eq!(group.commits().await, 2);
    }

    #[tokio::test]
    async fn a_transaction_begun_alone_and_dropped_undoes_only_its_own_rows() {
        let (_dir, pool, group, first) = group_with_one_write().await;
        let joined = spawn_writer(&group, 2);
        let_it_queue().await;
        let alone = tokio::spawn({
            let group = group.clone();
            async move {
                let mut tx = group.begin_alone(None).await.unwrap().0;
                write(&mut tx, 3).await;
            }
        });
        let_it_queue().await;
        first.commit().await.unwrap();
        joined.await.unwrap();
        alone.await.unwrap();
        let mut next = group.begin().await.unwrap();
        write(&mut next, 4).await;
        next.commit().await.unwrap();
        assert_eq!(written(&pool).await, vec![1, 2, 4]);
    }

    #[tokio::test]
    async fn a_transaction_that_waits_too_long_for_the_writer_is_refused_as_unavailable() {
        let (_dir, _pool, group) = group(Duration::from_millis(100)).await;
        let _holding = group.begin().await.unwrap();
        let refused = group.begin().await;
        assert!(
            matches!(refused, Err(StoreError::Unavailable(_))),
            "{:?}",
            refused.err()
        );
    }

    #[tokio::test]
    async fn what_was_released_before_the_store_closes_is_still_committed() {
        let (_dir, pool, group) = group(Duration::from_secs(10)).await;
        let mut tx = group.begin().await.unwrap();
        write(&mut tx, 1).await;
        let outcome = tokio::spawn(tx.commit());
        tokio::task::yield_now().await;
        drop(group);
        outcome.await.unwrap().unwrap();
        assert_eq!(written(&pool).await, vec![1]);
    }
}
