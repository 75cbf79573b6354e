//! Storage errors, with the variants callers act on.

/// Clone, so that one failed group append can answer each of its callers.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The id is taken.
    #[error("{resource_type}/{id} already exists")]
    AlreadyExists { resource_type: String, id: String },

    /// `If-Match` (or a transaction's `ifMatch`) named another version than the current one.
    #[error("version conflict: expected version {expected}, current is {current:?}")]
    VersionConflict { expected: i64, current: Option<i64> },

    /// The database URL is not one this store understands.
    #[error("unsupported database: {0}")]
    Unsupported(String),

    /// A search too large or deeply nested to run; the client should narrow it.
    #[error("search too complex: {0}")]
    TooComplex(String),

    /// The database could not be reached, or a migration failed.
    #[error("database unavailable: {0}")]
    Unavailable(String),

    /// An access rule placed over the store refused the resource (the caller
    /// may not see or change it).
    #[error("refused: {0}")]
    Refused(String),

    /// Any other database failure; the message is for logs, never for clients.
    #[error("database error: {0}")]
    Database(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
                StoreError::Unavailable(e.to_string())
            }
            other => StoreError::Database(other.to_string()),
        }
    }
}
