//! SQLite's reader connections.
//!
//! sqlx's pool sends a connection a ping each time it is taken back, and SQLite
//! runs each connection's statements on a thread of its own, so that ping is a
//! round trip between threads for every query, as costly as the query itself
//! on a short read. A connection inside this process needs no such check: its
//! thread runs commands in the order they were sent, so whatever a cancelled
//! query left behind is finished before the next query on it starts. These
//! connections are therefore handed out and taken back without one.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::ConnectOptions;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::{Result, StoreError};

/// At most `size` reader connections, opened when first needed and kept open.
#[derive(Clone)]
pub(crate) struct Readers {
    shared: Arc<Shared>,
}

struct Shared {
    options: SqliteConnectOptions,
    idle: Mutex<Vec<SqliteConnection>>,
    permits: Arc<Semaphore>,
    wait: Duration,
}

/// One connection, lent until dropped.
pub(crate) struct Reader {
    conn: Option<SqliteConnection>,
    shared: Arc<Shared>,
    _permit: OwnedSemaphorePermit,
}

impl Readers {
    /// Opens the first connection now, so that a database that cannot be read
    /// is refused at start rather than on the first request.
    pub(crate) async fn open(
        options: SqliteConnectOptions,
        size: usize,
        wait: Duration,
    ) -> Result<Self> {
        let first = options.connect().await?;
        Ok(Self {
            shared: Arc::new(Shared {
                options,
                idle: Mutex::new(vec![first]),
                permits: Arc::new(Semaphore::new(size)),
                wait,
            }),
        })
    }

    /// Waits up to the configured time for a connection to be free.
    pub(crate) async fn acquire(&self) -> Result<Reader> {
        let permit = tokio::time::timeout(
            self.shared.wait,
            self.shared.permits.clone().acquire_owned(),
        )
        .await
        .map_err(|_| StoreError::Unavailable("no reader connection became free".into()))?
        // The semaphore is never closed; were it, reads would be refused, not panic.
        .map_err(|_| StoreError::Unavailable("the reader connections are closed".into()))?;
        let idle = match self.shared.idle.lock() {
            Ok(mut idle) => idle.pop(),
            Err(_) => None,
        };
        let conn = match idle {
            Some(conn) => conn,
            // None idle: this permit's connection is opened now.
            None => self.shared.options.connect().await?,
        };
        Ok(Reader {
            conn: Some(conn),
            shared: self.shared.clone(),
            _permit: permit,
        })
    }
}

impl Deref for Reader {
    type Target = SqliteConnection;

    fn deref(&self) -> &SqliteConnection {
        self.conn
            .as_ref()
            .expect("a lent connection is present until drop")
    }
}

impl DerefMut for Reader {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        self.conn
            .as_mut()
            .expect("a lent connection is present until drop")
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        if let (Some(conn), Ok(mut idle)) = (self.conn.take(), self.shared.idle.lock()) {
            idle.push(conn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::TryStreamExt;
    use sqlx::Row;

    async fn readers(size: usize, wait: Duration) -> (tempfile::TempDir, Readers) {
        let dir = tempfile::tempdir().unwrap();
        let options = SqliteConnectOptions::new()
            .filename(dir.path().join("readers.db"))
            .create_if_missing(true);
        (dir, Readers::open(options, size, wait).await.unwrap())
    }

    #[tokio::test]
    async fn a_returned_connection_is_lent_again_rather_than_a_new_one_opened() {
        let (_dir, readers) = readers(1, Duration::from_secs(5)).await;
        let mut first = readers.acquire().await.unwrap();
        // A temporary table lives only on the connection that made it.
        sqlx::query("CREATE TEMP TABLE mine (n INTEGER)")
            .execute(&mut *first)
            .await
            .unwrap();
        drop(first);
        let mut again = readers.acquire().await.unwrap();
        let seen: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM temp.mine")
            .fetch_one(&mut *again)
            .await
            .unwrap();
        assert_eq!(seen, 0);
    }

    #[tokio::test]
    async fn a_read_waits_for_a_lent_connection_and_gives_up_as_unavailable() {
        let (_dir, readers) = readers(2, Duration::from_millis(200)).await;
        let first = readers.acquire().await.unwrap();
        let _second = readers.acquire().await.unwrap();
        let refused = readers.acquire().await.err().unwrap();
        assert!(
            matches!(&refused, StoreError::Unavailable(m) if m.contains("no reader connection")),
            "{refused:?}"
        );
        drop(first);
        assert!(readers.acquire().await.is_ok());
    }

    #[tokio::test]
    async fn a_query_dropped_half_read_leaves_its_connection_answering_the_next_correctly() {
        let (_dir, readers) = readers(1, Duration::from_secs(5)).await;
        {
            let mut conn = readers.acquire().await.unwrap();
            let mut rows = sqlx::query(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100000) \
                 SELECT i FROM n",
            )
            .fetch(&mut *conn);
            let first = rows.try_next().await.unwrap().unwrap();
            assert_eq!(first.get::<i64, _>(0), 1);
            // The stream and the connection are dropped with rows still unread.
        }
        let mut conn = readers.acquire().await.unwrap();
        let answer: i64 = sqlx::query_scalar("SELECT 6 * 7")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        assert_eq!(answer, 42);
    }
}
