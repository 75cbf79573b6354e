//! [`AuthRecords`] on both backends. The statements are the same but for their
//! placeholders, so they are written once with `$n` and rewritten for SQLite.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;
use sqlx::{PgPool, Row, SqlitePool};
use time::OffsetDateTime;

use haven_model::clock::Clock;

use crate::{AuthRecords, Result, StoreError};

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

pub(crate) struct SqliteAuthRecords {
    pub writer: SqlitePool,
    pub readers: SqlitePool,
    pub clock: Arc<dyn Clock>,
}

/// One pool serves both roles on PostgreSQL.
pub(crate) struct PostgresAuthRecords {
    pub writer: PgPool,
    pub readers: PgPool,
    pub clock: Arc<dyn Clock>,
}

/// The one implementation, for a records type with `writer` and `readers`
/// pools and the function that adapts the statements to its database.
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
                let done = sqlx::query(&$dialect(INSERT))
                    .bind(kind)
                    .bind(key)
                    .bind(text(value))
                    .bind(seconds(expires_at))
                    .bind(self.clock.now().unix_timestamp())
                    .execute(&self.writer)
                    .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn put(
                &self,
                kind: &str,
                key: &str,
                value: &Value,
                expires_at: Option<OffsetDateTime>,
            ) -> Result<()> {
                sqlx::query(&$dialect(PUT))
                    .bind(kind)
                    .bind(key)
                    .bind(text(value))
                    .bind(seconds(expires_at))
                    .execute(&self.writer)
                    .await?;
                Ok(())
            }

            async fn get(&self, kind: &str, key: &str) -> Result<Option<Value>> {
                let row = sqlx::query(&$dialect(GET))
                    .bind(kind)
                    .bind(key)
                    .bind(self.clock.now().unix_timestamp())
                    .fetch_optional(&self.readers)
                    .await?;
                row.map(|row| parse(&row.try_get::<String, _>(0)?))
                    .transpose()
            }

            async fn replace(
                &self,
                kind: &str,
                key: &str,
                expected: &Value,
                value: &Value,
            ) -> Result<bool> {
                let done = sqlx::query(&$dialect(REPLACE))
                    .bind(kind)
                    .bind(key)
                    .bind(text(expected))
                    .bind(text(value))
                    .bind(self.clock.now().unix_timestamp())
                    .execute(&self.writer)
                    .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn delete(&self, kind: &str, key: &str) -> Result<bool> {
                let done = sqlx::query(&$dialect(DELETE))
                    .bind(kind)
                    .bind(key)
                    .execute(&self.writer)
                    .await?;
                Ok(done.rows_affected() == 1)
            }

            async fn list(&self, kind: &str) -> Result<Vec<(String, Value)>> {
                let now = self.clock.now().unix_timestamp();
                // Listing is rare (administration), so it is where expired rows go.
                sqlx::query(&$dialect(PURGE))
                    .bind(now)
                    .execute(&self.writer)
                    .await?;
                let rows = sqlx::query(&$dialect(LIST))
                    .bind(kind)
                    .bind(now)
                    .fetch_all(&self.readers)
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
