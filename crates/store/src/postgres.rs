//! The PostgreSQL backend.

use std::sync::Arc;

use async_trait::async_trait;
use haven_model::clock::Clock;

use crate::{
    Backend, HistoryPage, HistoryQuery, ResourceVersion, Result, SearchPage, SearchQuery, Store,
    StoreError, StoreTx,
};

#[derive(Debug)]
pub struct PostgresStore {
    _clock: Arc<dyn Clock>,
}

pub async fn migrate(_database_url: &str) -> Result<()> {
    Err(StoreError::Unsupported(
        "PostgreSQL is not built yet".into(),
    ))
}

impl PostgresStore {
    pub async fn connect(_database_url: &str, _clock: Arc<dyn Clock>) -> Result<Self> {
        Err(StoreError::Unsupported(
            "PostgreSQL is not built yet".into(),
        ))
    }
}

#[async_trait]
impl Store for PostgresStore {
    fn backend(&self) -> Backend {
        Backend::Postgres
    }
    async fn begin(&self) -> Result<Box<dyn StoreTx>> {
        Err(StoreError::Unsupported("x".into()))
    }
    async fn read(&self, _: &str, _: &str) -> Result<Option<ResourceVersion>> {
        Ok(None)
    }
    async fn vread(&self, _: &str, _: &str, _: i64) -> Result<Option<ResourceVersion>> {
        Ok(None)
    }
    async fn search(&self, _: &SearchQuery) -> Result<SearchPage> {
        Err(StoreError::Unsupported("x".into()))
    }
    async fn history(&self, _: &HistoryQuery) -> Result<HistoryPage> {
        Err(StoreError::Unsupported("x".into()))
    }
    async fn count_by_type(&self) -> Result<Vec<(String, u64)>> {
        Ok(vec![])
    }
}
