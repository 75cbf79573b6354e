//! Checkpoints of SQLite's write-ahead log, away from the writer.
//!
//! SQLite's automatic checkpoint runs inside the commit that takes the log past
//! its threshold: every changed page is copied into the database file and the
//! file synced, while every write queued behind that commit waits. Here the
//! writer's automatic checkpoint is only a backstop; a task on a connection of
//! its own runs a passive checkpoint shortly after commits, which neither waits
//! for nor blocks the writer and the readers, and copies a page changed by many
//! commits once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::SqlitePool;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::write_group::restart;

/// Log pages after which the writer checkpoints in its own commit: only if this
/// task falls that far behind (4 KiB pages: 80 MiB of log).
pub(crate) const WRITER_BACKSTOP_PAGES: &str = "20000";

/// How long after a commit the checkpoint starts, so that the commits of those
/// moments are copied together.
const PAUSE: Duration = Duration::from_millis(250);

/// The checkpoint task of one database, told of every commit by whatever
/// committed: the write group and the auth record writer alike.
pub(crate) struct Checkpoints {
    pool: SqlitePool,
    committed: Arc<Notify>,
    closed: Arc<AtomicBool>,
    /// Started by the first commit, on the runtime it runs on, and again if
    /// that runtime has ended.
    task: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Checkpoints {
    /// Checkpoints on `pool`, a connection of their own.
    pub(crate) fn new(pool: SqlitePool) -> Self {
        Self {
            pool,
            committed: Arc::default(),
            closed: Arc::default(),
            task: std::sync::Mutex::new(None),
        }
    }

    /// A commit left pages in the log: checkpoint them shortly.
    pub(crate) fn after_commit(&self) {
        restart(&self.task, || {
            run(
                self.pool.clone(),
                self.committed.clone(),
                self.closed.clone(),
            )
        });
        self.committed.notify_one();
    }
}

impl Drop for Checkpoints {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Release);
        self.committed.notify_one();
    }
}

/// Runs until `closed` is set (and `committed` notified once more), which
/// happens when the last holder of its [`Checkpoints`] lets go.
async fn run(pool: SqlitePool, committed: Arc<Notify>, closed: Arc<AtomicBool>) {
    loop {
        committed.notified().await;
        if closed.load(Ordering::Acquire) {
            return;
        }
        tokio::time::sleep(PAUSE).await;
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&pool)
            .await
        {
            // Nothing is lost: the pages stay in the log, and the writer's own
            // checkpoint copies them past the backstop.
            tracing::warn!(error = %e, "a checkpoint of the write-ahead log failed");
        }
    }
}
