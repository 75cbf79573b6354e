//! The store as one request may use it: every read, search, history and write
//! passes the request's [`ContentGuard`], so an interaction cannot return or
//! change a resource its caller may not see, however it reaches the store.
//!
//! The pipeline wraps the store once per request; the execute stage never sees
//! the unguarded one. Searches and histories carry the guard into the query as
//! a content filter, so totals and pages count only what the caller may see.

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use haven_auth::scope::Permission;
use haven_store::{
    Access, AccessRule, AuditLog, AuditPage, AuditQuery, AuditRecord, AuthRecords, Backend,
    BothAccess, ContentFilter, Criterion, HistoryPage, HistoryQuery, ResourceVersion, Result,
    SearchPage, SearchQuery, StampedEvent, Store, StoreError, StoreTx, TypeAccess,
};
use serde_json::Value;

/// What a caller may do with resource content, for one kind of access.
#[derive(Debug, Clone)]
pub enum ContentRule {
    /// Everything of every type (the interaction was already admitted by type).
    Unrestricted,
    /// Only what the filter admits.
    Only(ContentFilter),
}

impl ContentRule {
    pub fn admits(&self, resource: &Value) -> bool {
        match self {
            ContentRule::Unrestricted => true,
            ContentRule::Only(filter) => filter.admits(resource),
        }
    }
}

/// Decides, per kind of access, which resource content a request may touch.
pub trait ContentGuard: Send + Sync + Debug {
    fn rule(&self, permission: Permission) -> ContentRule;

    /// The patient whose compartment alone this kind of access to the type may
    /// reach, when it is so confined (a `patient/` token).
    fn confinement(&self, _resource_type: &str, _permission: Permission) -> Option<String> {
        None
    }

    /// The same rule as [`ContentGuard::rule`], as criteria the database
    /// evaluates inside a search (so counts, pages, chains, `_has` and
    /// includes see only what it admits). `None`: the guard has no such form,
    /// and searches filter by content instead.
    fn access(&self, _permission: Permission) -> Option<Access> {
        None
    }

    /// The rule for the results of this search: some guards admit less to a
    /// search than to a read (what a masked view would hide must not be
    /// searched on).
    fn search_rule(&self, permission: Permission, _query: &SearchQuery) -> ContentRule {
        self.rule(permission)
    }

    /// [`ContentGuard::access`] for this search.
    fn search_access(&self, permission: Permission, _query: &SearchQuery) -> Option<Access> {
        self.access(permission)
    }

    /// Whether a resource this guard refuses is answered as missing (404)
    /// rather than forbidden (403).
    fn hides_as_missing(&self, _permission: Permission, _resource: &Value) -> bool {
        false
    }

    /// How a resource in an answer is shown to the caller.
    fn present(&self, _resource: &Value) -> Shown {
        Shown::AsStored
    }

    /// Whether searches tell the caller that this guard left matches out.
    fn reports_withheld(&self) -> bool {
        false
    }

    /// A guard made of two: the first, and the one layered over it.
    fn layers(&self) -> Option<(Arc<dyn ContentGuard>, Arc<dyn ContentGuard>)> {
        None
    }
}

/// Admits what an access rule refuses: what a policy withholds.
#[derive(Debug)]
struct Refused(Access);

impl AccessRule for Refused {
    fn for_type(&self, resource_type: &str) -> TypeAccess {
        match self.0.for_type(resource_type) {
            TypeAccess::All => TypeAccess::Nothing,
            TypeAccess::Nothing => TypeAccess::All,
            // What a policy admits is usually "not hidden"; refusing it is
            // "hidden" itself, which a database can find through its indexes.
            TypeAccess::Only(Criterion::Not(hidden)) => TypeAccess::Only(*hidden),
            TypeAccess::Only(criterion) => TypeAccess::Only(Criterion::Not(Box::new(criterion))),
        }
    }
}

/// How a resource in an answer is shown.
#[derive(Debug, Clone, PartialEq)]
pub enum Shown {
    AsStored,
    /// A copy (masked).
    Copy(Value),
    /// Not at all: the caller wrote it but may not read it.
    Withheld,
}

/// Two guards, both of which must admit: the scopes' and the consent and
/// labels policy's.
#[derive(Debug)]
pub(crate) struct BothGuards(pub Arc<dyn ContentGuard>, pub Arc<dyn ContentGuard>);

fn both_rules(a: ContentRule, b: ContentRule) -> ContentRule {
    match (a, b) {
        (ContentRule::Unrestricted, other) | (other, ContentRule::Unrestricted) => other,
        (ContentRule::Only(a), ContentRule::Only(b)) => {
            ContentRule::Only(ContentFilter::new(move |r| a.admits(r) && b.admits(r)))
        }
    }
}

/// Both guards' access in the query's form; `None` when a guard that
/// restricts has no such form (the search then filters by content).
fn both_access(
    a: (ContentRule, Option<Access>),
    b: (ContentRule, Option<Access>),
) -> Option<Access> {
    let part = |(rule, access): (ContentRule, Option<Access>)| match rule {
        ContentRule::Unrestricted => Ok(None),
        ContentRule::Only(_) => access.map(Some).ok_or(()),
    };
    match (part(a).ok()?, part(b).ok()?) {
        (Some(a), Some(b)) => Some(Arc::new(BothAccess(a, b))),
        (Some(one), None) | (None, Some(one)) => Some(one),
        (None, None) => None,
    }
}

impl ContentGuard for BothGuards {
    fn rule(&self, permission: Permission) -> ContentRule {
        both_rules(self.0.rule(permission), self.1.rule(permission))
    }

    fn confinement(&self, resource_type: &str, permission: Permission) -> Option<String> {
        self.0
            .confinement(resource_type, permission)
            .or_else(|| self.1.confinement(resource_type, permission))
    }

    fn access(&self, permission: Permission) -> Option<Access> {
        both_access(
            (self.0.rule(permission), self.0.access(permission)),
            (self.1.rule(permission), self.1.access(permission)),
        )
    }

    fn search_rule(&self, permission: Permission, query: &SearchQuery) -> ContentRule {
        both_rules(
            self.0.search_rule(permission, query),
            self.1.search_rule(permission, query),
        )
    }

    fn search_access(&self, permission: Permission, query: &SearchQuery) -> Option<Access> {
        both_access(
            (
                self.0.search_rule(permission, query),
                self.0.search_access(permission, query),
            ),
            (
                self.1.search_rule(permission, query),
                self.1.search_access(permission, query),
            ),
        )
    }

    fn hides_as_missing(&self, permission: Permission, resource: &Value) -> bool {
        // The guard that refused decides how.
        if self.0.rule(permission).admits(resource) {
            self.1.hides_as_missing(permission, resource)
        } else {
            self.0.hides_as_missing(permission, resource)
        }
    }

    fn layers(&self) -> Option<(Arc<dyn ContentGuard>, Arc<dyn ContentGuard>)> {
        Some((self.0.clone(), self.1.clone()))
    }

    fn present(&self, resource: &Value) -> Shown {
        match self.0.present(resource) {
            Shown::AsStored => self.1.present(resource),
            Shown::Copy(copy) => match self.1.present(&copy) {
                Shown::AsStored => Shown::Copy(copy),
                other => other,
            },
            Shown::Withheld => Shown::Withheld,
        }
    }
}

/// A guard that admits everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct Unguarded;

impl ContentGuard for Unguarded {
    fn rule(&self, _: Permission) -> ContentRule {
        ContentRule::Unrestricted
    }
}

fn refused(resource_type: &str, id: &str, what: &str) -> StoreError {
    tracing::debug!(resource_type, id, what, "refused by the request's guard");
    StoreError::Refused(crate::smart::REFUSED.into())
}

/// Adds the guard's filter to a query's own (both must admit).
fn combine(own: Option<ContentFilter>, rule: ContentRule) -> Option<ContentFilter> {
    match (own, rule) {
        (own, ContentRule::Unrestricted) => own,
        (None, ContentRule::Only(filter)) => Some(filter),
        (Some(a), ContentRule::Only(b)) => {
            Some(ContentFilter::new(move |r| a.admits(r) && b.admits(r)))
        }
    }
}

/// A search as the guard allows it: its access compiled into the query when
/// the guard has that form, else its rule as a content filter. Returns the rule
/// too, for [`recheck`].
fn guarded_search(guard: &dyn ContentGuard, query: &SearchQuery) -> (SearchQuery, ContentRule) {
    let rule = guard.search_rule(Permission::Search, query);
    let access = match &rule {
        ContentRule::Only(_) => guard.search_access(Permission::Search, query),
        ContentRule::Unrestricted => None,
    };
    let mut query = query.clone();
    if let ContentRule::Only(_) = &rule {
        match access {
            Some(access) => {
                query.access = Some(match query.access.take() {
                    Some(own) => Arc::new(BothAccess(own, access)),
                    None => access,
                });
            }
            None => query.filter = combine(query.filter.take(), rule.clone()),
        }
    }
    (query, rule)
}

/// Checks every returned resource against the content rule as well: the
/// query's criteria and the rule are two forms of one policy. Should they ever
/// disagree, the search fails rather than answer with counts and pages the
/// rule would not give.
fn recheck(page: SearchPage, rule: &ContentRule) -> Result<SearchPage> {
    if let ContentRule::Only(_) = rule {
        let refused = page
            .resources
            .iter()
            .find(|v| !v.resource.as_ref().is_some_and(|r| rule.admits(r)));
        if let Some(v) = refused {
            tracing::error!(
                resource_type = %v.resource_type,
                id = %v.id,
                "a search returned a resource its access rule refuses"
            );
            return Err(StoreError::Database(
                "search results disagree with the access rule".into(),
            ));
        }
    }
    Ok(page)
}

/// Reading a version: its content must be readable. A deletion carries no
/// content to judge, so a restricted caller is told nothing about it.
fn check_read(
    guard: &dyn ContentGuard,
    version: Option<ResourceVersion>,
) -> Result<Option<ResourceVersion>> {
    let rule = guard.rule(Permission::Read);
    match version.as_ref().map(|v| (v, &v.resource)) {
        Some((_, Some(resource)))
            if !rule.admits(resource) && guard.hides_as_missing(Permission::Read, resource) =>
        {
            Ok(None)
        }
        Some((v, Some(resource))) if !rule.admits(resource) => {
            Err(refused(&v.resource_type, &v.id, "reading"))
        }
        Some((_, None)) if matches!(rule, ContentRule::Only(_)) => Ok(None),
        _ => Ok(version),
    }
}

#[derive(Debug)]
pub(crate) struct GuardedStore {
    inner: Arc<dyn Store>,
    guard: Arc<dyn ContentGuard>,
    audit: GuardedAuditLog,
}

impl GuardedStore {
    pub(crate) fn new(inner: Arc<dyn Store>, guard: Arc<dyn ContentGuard>) -> Self {
        Self {
            audit: GuardedAuditLog {
                inner: inner.clone(),
                guard: guard.clone(),
            },
            inner,
            guard,
        }
    }

    fn guarded(&self, inner: Box<dyn StoreTx>) -> Box<dyn StoreTx> {
        Box::new(GuardedTx {
            inner,
            guard: self.guard.clone(),
        })
    }
}

/// The audit trail as a request sees it: AuditEvents are read and searched
/// under the same content rules as resources, and never appended to from above
/// the guard (the recorder appends below it).
#[derive(Debug)]
struct GuardedAuditLog {
    inner: Arc<dyn Store>,
    guard: Arc<dyn ContentGuard>,
}

/// Drops the query entities of an AuditEvent: a search someone else made may
/// name other patients (`identifier=...`), which a patient reading their own
/// access log must not learn.
fn redact_queries(event: &mut Value) {
    if let Some(entities) = event.get_mut("entity").and_then(Value::as_array_mut) {
        // The access decision may name other patients' resources and Consents too.
        entities.retain(|e| {
            e.get("query").is_none() && e["type"]["system"] != haven_audit::DECISION_ENTITY
        });
    }
}

fn written_by_the_server_only() -> StoreError {
    StoreError::Refused("AuditEvents are written by the server only".into())
}

#[async_trait]
impl AuditLog for GuardedAuditLog {
    fn stamp(&self, _: Vec<Value>) -> Result<Vec<StampedEvent>> {
        Err(written_by_the_server_only())
    }

    async fn append(&self, _: Vec<StampedEvent>) -> Result<()> {
        Err(written_by_the_server_only())
    }

    async fn read(&self, id: &str) -> Result<Option<AuditRecord>> {
        let record = self.inner.audit_log().read(id).await?;
        match record {
            Some(r) if !self.guard.rule(Permission::Read).admits(&r.event) => {
                Err(refused("AuditEvent", id, "reading"))
            }
            Some(mut r) => {
                if self
                    .guard
                    .confinement("AuditEvent", Permission::Read)
                    .is_some()
                {
                    redact_queries(&mut r.event);
                }
                Ok(Some(r))
            }
            None => Ok(None),
        }
    }

    async fn search(&self, query: &AuditQuery) -> Result<AuditPage> {
        let mut query = query.clone();
        let confined = self.guard.confinement("AuditEvent", Permission::Search);
        if let Some(patient) = &confined {
            // In the query itself, so the database reads only that patient's events.
            let own = format!("Patient/{patient}");
            if !query.patient.is_empty() && !query.patient.contains(&own) {
                return Ok(AuditPage {
                    records: Vec::new(),
                    total: query.total.then_some(0),
                    more: false,
                });
            }
            query.patient = vec![own];
        }
        query.filter = combine(query.filter.take(), self.guard.rule(Permission::Search));
        let mut page = self.inner.audit_log().search(&query).await?;
        if confined.is_some() {
            page.records
                .iter_mut()
                .for_each(|r| redact_queries(&mut r.event));
        }
        Ok(page)
    }

    async fn chain(&self, after: u64, limit: u32) -> Result<Vec<AuditRecord>> {
        // The chain is walked whole or not at all: every record must be readable.
        let records = self.inner.audit_log().chain(after, limit).await?;
        let rule = self.guard.rule(Permission::Read);
        if records.iter().all(|r| rule.admits(&r.event)) {
            Ok(records)
        } else {
            Err(StoreError::Refused(
                "verifying the audit trail needs access to all of it".into(),
            ))
        }
    }
}

impl GuardedStore {
    /// Whether the current version (if any, and not deleted) is readable.
    async fn current_readable(&self, resource_type: &str, id: &str) -> Result<bool> {
        let rule = self.guard.rule(Permission::Read);
        if let ContentRule::Unrestricted = rule {
            return Ok(true);
        }
        let current = self.inner.read(resource_type, id).await?;
        Ok(match current.and_then(|v| v.resource) {
            Some(resource) => rule.admits(&resource),
            None => true,
        })
    }
}

#[async_trait]
impl Store for GuardedStore {
    fn backend(&self) -> Backend {
        self.inner.backend()
    }

    async fn begin(&self) -> Result<Box<dyn StoreTx>> {
        Ok(self.guarded(self.inner.begin().await?))
    }

    async fn begin_large(&self) -> Result<Box<dyn StoreTx>> {
        Ok(self.guarded(self.inner.begin_large().await?))
    }

    async fn read(&self, resource_type: &str, id: &str) -> Result<Option<ResourceVersion>> {
        check_read(&*self.guard, self.inner.read(resource_type, id).await?)
    }

    async fn vread(
        &self,
        resource_type: &str,
        id: &str,
        version: i64,
    ) -> Result<Option<ResourceVersion>> {
        let found = check_read(
            &*self.guard,
            self.inner.vread(resource_type, id, version).await?,
        )?;
        if found.is_some() && !self.current_readable(resource_type, id).await? {
            // Labels only rise: an older version is as sensitive as the current.
            return check_read(&*self.guard, self.inner.read(resource_type, id).await?);
        }
        Ok(found)
    }

    async fn search(&self, query: &SearchQuery) -> Result<SearchPage> {
        let (query, rule) = guarded_search(&*self.guard, query);
        let page = self.inner.search(&query).await?;
        recheck(page, &rule)
    }

    async fn search_keys(&self, query: &SearchQuery, limit: u32) -> Result<Vec<(String, String)>> {
        let (query, _) = guarded_search(&*self.guard, query);
        self.inner.search_keys(&query, limit).await
    }

    /// One probe for a match the outer guard admits and the policy layered
    /// over it refuses.
    async fn withheld(&self, query: &SearchQuery) -> Result<bool> {
        let Some((outer, policy)) = self.guard.layers() else {
            return Ok(false);
        };
        if !policy.reports_withheld() {
            return Ok(false);
        }
        if let ContentRule::Unrestricted = policy.search_rule(Permission::Search, query) {
            return Ok(false);
        }
        let Some(refused) = policy.search_access(Permission::Search, query) else {
            return Ok(false);
        };
        // The probe keeps the query's types and nothing of its criteria, so the
        // notice cannot answer a question about what is hidden.
        let bare = SearchQuery {
            criterion: Criterion::Always,
            ..query.clone()
        };
        let (mut probe, _) = guarded_search(&*outer, &bare);
        let refused: Access = Arc::new(Refused(refused));
        probe.access = Some(match probe.access.take() {
            Some(own) => Arc::new(BothAccess(own, refused)),
            None => refused,
        });
        probe.count = 1;
        probe.offset = 0;
        probe.total = false;
        probe.sort = Vec::new();
        Ok(!self.inner.search(&probe).await?.resources.is_empty())
    }

    async fn history(&self, query: &HistoryQuery) -> Result<HistoryPage> {
        let mut query = query.clone();
        let permission = if query.id.is_some() {
            Permission::Read
        } else {
            Permission::Search
        };
        if let (Some(resource_type), Some(id)) = (&query.resource_type, &query.id) {
            // The current version's labels and Consents cover every version.
            if !self.current_readable(resource_type, id).await? {
                check_read(&*self.guard, self.inner.read(resource_type, id).await?)?;
                return Ok(HistoryPage {
                    versions: Vec::new(),
                    total: query.total.then_some(0),
                    next: None,
                });
            }
        }
        query.filter = combine(query.filter.take(), self.guard.rule(permission));
        let mut page = self.inner.history(&query).await?;
        if query.id.is_none() {
            // Older versions are judged by their current version too: labels
            // and Consents may have risen since (the page may come out short).
            let mut kept = Vec::with_capacity(page.versions.len());
            for version in std::mem::take(&mut page.versions) {
                if self
                    .current_readable(&version.resource_type, &version.id)
                    .await?
                {
                    kept.push(version);
                }
            }
            page.versions = kept;
        }
        Ok(page)
    }

    async fn count_by_type(&self) -> Result<Vec<(String, u64)>> {
        match self.guard.rule(Permission::Search) {
            ContentRule::Unrestricted => self.inner.count_by_type().await,
            ContentRule::Only(_) => Err(StoreError::Refused(
                "counting every resource needs unrestricted access".into(),
            )),
        }
    }

    fn auth_records(&self) -> &dyn AuthRecords {
        self.inner.auth_records()
    }

    fn audit_log(&self) -> &dyn AuditLog {
        &self.audit
    }
}

struct GuardedTx {
    inner: Box<dyn StoreTx>,
    guard: Arc<dyn ContentGuard>,
}

impl GuardedTx {
    /// The current content must be open to `permission` before it is replaced
    /// or deleted.
    async fn check_current(
        &mut self,
        resource_type: &str,
        id: &str,
        permission: Permission,
        what: &str,
    ) -> Result<()> {
        let current = self.inner.read(resource_type, id).await?;
        if let Some(resource) = current.as_ref().and_then(|v| v.resource.as_ref()) {
            if !self.guard.rule(permission).admits(resource) {
                return Err(refused(resource_type, id, what));
            }
        }
        Ok(())
    }
}

#[async_trait]
impl StoreTx for GuardedTx {
    async fn read(&mut self, resource_type: &str, id: &str) -> Result<Option<ResourceVersion>> {
        let version = self.inner.read(resource_type, id).await?;
        if let Some(resource) = version.as_ref().and_then(|v| v.resource.as_ref()) {
            // Inside a write, the current version is read to be changed or
            // deleted; what would be shown masked is not readable here.
            let readable = self.guard.rule(Permission::Read).admits(resource)
                && self.guard.present(resource) == Shown::AsStored;
            let open = readable
                || [Permission::Update, Permission::Delete]
                    .into_iter()
                    .any(|p| self.guard.rule(p).admits(resource));
            if !open {
                return Err(refused(resource_type, id, "access to"));
            }
        }
        Ok(version)
    }

    async fn create(
        &mut self,
        resource_type: &str,
        id: &str,
        resource: Value,
    ) -> Result<ResourceVersion> {
        if !self.guard.rule(Permission::Create).admits(&resource) {
            return Err(refused(resource_type, id, "creating"));
        }
        self.inner.create(resource_type, id, resource).await
    }

    async fn update(
        &mut self,
        resource_type: &str,
        id: &str,
        resource: Value,
        expected_version: Option<i64>,
    ) -> Result<(ResourceVersion, bool)> {
        self.check_current(resource_type, id, Permission::Update, "updating")
            .await?;
        if !self.guard.rule(Permission::Update).admits(&resource) {
            return Err(refused(resource_type, id, "writing this content to"));
        }
        self.inner
            .update(resource_type, id, resource, expected_version)
            .await
    }

    async fn delete(
        &mut self,
        resource_type: &str,
        id: &str,
        expected_version: Option<i64>,
    ) -> Result<Option<ResourceVersion>> {
        self.check_current(resource_type, id, Permission::Delete, "deleting")
            .await?;
        self.inner.delete(resource_type, id, expected_version).await
    }

    async fn search(&mut self, query: &SearchQuery) -> Result<SearchPage> {
        let (query, rule) = guarded_search(&*self.guard, query);
        let page = self.inner.search(&query).await?;
        recheck(page, &rule)
    }

    async fn append_audit(&mut self, _: Vec<Value>) -> Result<()> {
        Err(StoreError::Refused(
            "AuditEvents are written by the server only".into(),
        ))
    }

    async fn commit(self: Box<Self>) -> Result<()> {
        self.inner.commit().await
    }
}
