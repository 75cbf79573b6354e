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

/// Log pages after which the writer checkpoints in its own commit: only if this
/// task falls that far behind (4 KiB pages: 80 MiB of log).
pub(crate) const WRITER_BACKSTOP_PAGES: &str = "20000";

/// How long after a commit the checkpoint starts, so that the commits of those
/// moments are copied together.
const PAUSE: Duration = Duration::from_millis(250);

/// Runs until `closed` is set (and `committed` notified once more).
pub(crate) async fn run(pool: SqlitePool, committed: Arc<Notify>, closed: Arc<AtomicBool>) {
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
