//! Search (R4 search.html): type search, system search over one or several
//! types (`_type`), compartment search (`Patient/{id}/{Type}`), search by POST,
//! and `Patient/{id}/$everything`; results as a `searchset` Bundle.
//!
//! Paging is stable: when a search has more than one page, the keys of its
//! matches (up to [`SNAPSHOT_LIMIT`], cut to whole pages) are kept for
//! [`SNAPSHOT_LIFETIME`] under a random id, bound to the access token that made
//! it. `next` and `previous` name that id (`_page`), so later pages show
//! exactly the resources the search found, each once, however data changes
//! meanwhile; each page is read again through the caller's access, so nothing
//! it may no longer see appears. Pages past the kept keys are read live, by
//! offset.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use haven_model::outcome::{operation_outcome, Issue, IssueCode};
use haven_model::registry::{self, is_resource_type, SearchParamType};
use haven_model::search_index::{index_values, IndexValue};
use haven_model::search_value::is_patient_compartment_type;
use haven_store::{Criterion, ResourceVersion, SearchQuery, StoreTx};
use serde_json::{json, Value};
use time::Duration;

use super::instance::full_url;
use super::result_bundle;
use super::subsetting::{select_elements, summarize};
use crate::error::ApiError;
use crate::pipeline::Exec;
use crate::response::FhirResponse;
use crate::search_params::{parse_search, Include, ParsedSearch, SearchContext, Summary};

/// The most matches a stable result set keeps.
pub(crate) const SNAPSHOT_LIMIT: u32 = 10_000;

/// How long the pages of a search can be followed.
const SNAPSHOT_LIFETIME: Duration = Duration::minutes(30);

/// The auth record kind the result sets are kept under.
const SNAPSHOT_KIND: &str = "search-result-set";

/// The most resources `_include` and `_revinclude` add to one page.
const MAX_INCLUDED: usize = 1_000;

/// How many times `:iterate` includes are followed.
const MAX_ITERATIONS: usize = 4;

/// Where a search was asked.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Scope<'a> {
    /// `[base]/[type]?` or, with `None`, `[base]?` (`_type` names the types).
    Types(Option<&'a str>),
    /// `[base]/Patient/[id]/[type]?`
    Compartment {
        patient: &'a str,
        resource_type: &'a str,
    },
    /// `[base]/Patient/[id]/$everything`
    Everything { patient: &'a str },
}

pub(crate) async fn search(
    exec: &Exec<'_>,
    scope: Scope<'_>,
    params: &[(String, String)],
    tx: Option<&mut dyn StoreTx>,
) -> Result<FhirResponse, ApiError> {
    let params_given = params;
    let config = &exec.state.config;
    let base = config.base_url.trim_end_matches('/');
    let (mut types, path, mut params) = match scope {
        Scope::Types(Some(resource_type)) => (
            vec![resource_type.to_owned()],
            resource_type.to_owned(),
            params.to_vec(),
        ),
        Scope::Types(None) => (listed_types(params)?, String::new(), params.to_vec()),
        Scope::Compartment {
            patient,
            resource_type,
        } => (
            vec![resource_type.to_owned()],
            format!("Patient/{patient}/{resource_type}"),
            params.to_vec(),
        ),
        Scope::Everything { patient } => {
            let (types, params) = everything_params(params)?;
            (types, format!("Patient/{patient}/$everything"), params)
        }
    };
    let cx = SearchContext {
        base_url: base,
        now: exec.state.clock.now(),
        default_count: config.default_page_size,
        max_count: config.max_page_size,
        strict: exec.prefer.strict,
    };
    if let Scope::Everything { .. } = scope {
        // $everything includes what the compartment references (R4
        // patient-operation-everything): practitioners, organizations, ...
        params.push(("_include".into(), "*".into()));
    }
    // `$everything?_type=` may name no type of the compartment: then nothing
    // matches, and the parser, to which no types mean every type, is given one.
    let nothing_listed = matches!(scope, Scope::Everything { .. }) && types.is_empty();
    if nothing_listed {
        types.push("Patient".into());
    }
    let mut parsed = parse_search(&types, &params, &cx)?;
    parsed.query.local_base = Some(format!("{base}/"));
    // $everything's own `_include=*` names one include per compartment type.
    let max_includes = match scope {
        Scope::Everything { .. } => usize::MAX,
        _ => MAX_INCLUDES,
    };
    bound_result_parameters(&mut parsed, max_includes)?;
    match scope {
        Scope::Compartment {
            patient,
            resource_type,
        } => {
            let compartment = if is_patient_compartment_type(resource_type) {
                Criterion::PatientCompartment(patient.to_owned())
            } else {
                Criterion::Never
            };
            parsed.query.criterion = compartment.and(parsed.query.criterion);
        }
        Scope::Everything { patient } => {
            let compartment = if nothing_listed {
                Criterion::Never
            } else {
                Criterion::PatientCompartment(patient.to_owned())
            };
            parsed.query.criterion = compartment.and(parsed.query.criterion);
        }
        Scope::Types(_) => {}
    }
    if matches!(parsed.summary, Some(Summary::Count)) {
        parsed.query.count = 0;
        parsed.query.total = true;
    }
    let page_id = params
        .iter()
        .rev()
        .find(|(k, _)| k == "_page")
        .map(|(_, v)| v.clone());

    // $everything's links repeat what its caller gave, not what it became.
    let mut link_params = match scope {
        Scope::Everything { .. } => params_given
            .iter()
            .filter(|(k, v)| matches!(k.as_str(), "_type" | "_since") && !v.is_empty())
            .cloned()
            .collect(),
        _ => parsed.applied.clone(),
    };
    if let (Scope::Types(None), false) = (scope, types.is_empty()) {
        link_params.insert(0, ("_type".into(), types.join(",")));
    }
    let fingerprint = search_fingerprint(&path, &link_params);

    let mut withheld = false;
    let (matches, total, snapshot) = match (tx, page_id) {
        (Some(tx), _) => {
            let page = tx.search(&parsed.query).await?;
            let more = page.more;
            (page.resources, page.total, Paging::Offset { more })
        }
        (None, Some(id)) => {
            let set = load_result_set(exec, &id, &fingerprint).await?;
            let resources = read_keys(exec, &set.keys, &parsed.query).await?;
            let more = set.keys.len() as u64 > parsed.query.offset + u64::from(parsed.query.count)
                || !set.complete;
            (resources, set.total, Paging::Kept { id, more })
        }
        (None, None) => {
            let page = exec.state.store.search(&parsed.query).await?;
            if parsed.query.offset == 0 && exec.state.store.withheld(&parsed.query).await? {
                withheld = true;
            }
            // Kept keys end on a page boundary, so no page straddles them.
            let count = parsed.query.count;
            let limit = SNAPSHOT_LIMIT.checked_div(count).unwrap_or(0) * count;
            let within = parsed.query.offset + u64::from(count) <= u64::from(limit);
            if page.more && count > 0 && within {
                // More than one page: keep the whole result set for stable paging.
                let keys = exec.state.store.search_keys(&parsed.query, limit).await?;
                let complete = (keys.len() as u64) < u64::from(limit);
                let id = keep_result_set(exec, &keys, page.total, complete, &fingerprint).await?;
                let resources = read_keys(exec, &keys, &parsed.query).await?;
                let more = keys.len() as u64 > parsed.query.offset + u64::from(parsed.query.count)
                    || !complete;
                (resources, page.total, Paging::Kept { id, more })
            } else {
                let more = page.more;
                (page.resources, page.total, Paging::Offset { more })
            }
        }
    };

    let links = page_links(
        exec,
        &path,
        &link_params,
        parsed.query.count,
        parsed.query.offset,
        &snapshot,
    );

    let mut entries: Vec<Value> = matches
        .iter()
        .filter_map(|v| {
            v.resource.as_ref().map(|r| {
                json!({
                    "fullUrl": full_url(exec, &v.resource_type, &v.id),
                    "resource": subset(r, &parsed),
                    "search": {"mode": "match"},
                })
            })
        })
        .collect();
    let mut warnings = Vec::new();
    if !parsed.includes.is_empty() || !parsed.revincludes.is_empty() {
        let (included, cut) = includes(exec, &cx, &matches, &parsed).await?;
        entries.extend(included.iter().filter_map(|v| {
            v.resource.as_ref().map(|r| {
                json!({
                    "fullUrl": full_url(exec, &v.resource_type, &v.id),
                    "resource": subset(r, &parsed),
                    "search": {"mode": "include"},
                })
            })
        }));
        if cut {
            warnings.push(Issue::warning(
                IssueCode::TooCostly,
                format!("_include and _revinclude added only the first {MAX_INCLUDED} resources"),
            ));
        }
    }
    if withheld {
        warnings.push(Issue::information(
            IssueCode::Suppressed,
            "some matches are not shown: their security labels or their patient's consent \
             do not let this requester see them",
        ));
    }
    entries.extend(search_outcome(&parsed.ignored, warnings));

    Ok(FhirResponse::ok(result_bundle(
        exec,
        "searchset",
        total,
        links,
        entries,
    )))
}

/// The types of a system search: every type, or those `_type` lists.
fn listed_types(params: &[(String, String)]) -> Result<Vec<String>, ApiError> {
    let types = crate::search_params::listed_types(params);
    match types.iter().find(|t| !is_resource_type(t)) {
        Some(unknown) => Err(ApiError::UnknownType(unknown.clone())),
        None => Ok(types),
    }
}

/// Search parameters as name and value pairs.
type Params = Vec<(String, String)>;

/// The types and search parameters of `$everything`: `_type` narrows the
/// compartment's types, `_since` becomes `_lastUpdated=ge...`, `_count` and
/// the paging parameters pass through; anything else is refused.
fn everything_params(params: &[(String, String)]) -> Result<(Vec<String>, Params), ApiError> {
    let compartment: Vec<String> = registry::resource_types()
        .filter(|t| is_patient_compartment_type(t))
        .map(str::to_owned)
        .collect();
    let mut types = compartment.clone();
    let mut passed = Vec::new();
    for (name, value) in params {
        match name.as_str() {
            "_type" => {
                let listed = listed_types(&[(name.clone(), value.clone())])?;
                types.retain(|t| listed.contains(t));
                passed.push((name.clone(), value.clone()));
            }
            "_since" => passed.push(("_lastUpdated".into(), format!("ge{value}"))),
            "_count" | "_page" | "_offset" | "_format" | "_pretty" => {
                passed.push((name.clone(), value.clone()))
            }
            _ if value.is_empty() => {}
            other => {
                return Err(ApiError::invalid(
                    IssueCode::NotSupported,
                    format!("$everything does not take the parameter '{other}'"),
                ))
            }
        }
    }
    // `_type` was used here; the parser must not read it as a type search.
    passed.retain(|(k, _)| k != "_type");
    Ok((types, passed))
}

/// The most `_include` plus `_revinclude` parameters, and `_sort` keys, one
/// search may carry; each costs a query or a subquery per row.
const MAX_INCLUDES: usize = 16;
const MAX_SORT_KEYS: usize = 8;

/// Drops repeated includes and refuses searches asking for too many includes
/// or sort keys.
fn bound_result_parameters(parsed: &mut ParsedSearch, max_includes: usize) -> Result<(), ApiError> {
    for list in [&mut parsed.includes, &mut parsed.revincludes] {
        let mut unique: Vec<Include> = Vec::new();
        for include in list.drain(..) {
            if !unique.contains(&include) {
                unique.push(include);
            }
        }
        *list = unique;
    }
    if parsed.includes.len() + parsed.revincludes.len() > max_includes {
        return Err(ApiError::invalid(
            IssueCode::TooCostly,
            format!("at most {MAX_INCLUDES} _include and _revinclude parameters"),
        ));
    }
    if parsed.query.sort.len() > MAX_SORT_KEYS {
        return Err(ApiError::invalid(
            IssueCode::TooCostly,
            format!("at most {MAX_SORT_KEYS} _sort keys"),
        ));
    }
    Ok(())
}

/// Applies `_summary` or `_elements` to a returned resource.
fn subset(resource: &Value, parsed: &ParsedSearch) -> Value {
    match (&parsed.summary, &parsed.elements) {
        (Some(summary), _) => summarize(resource, *summary),
        (None, Some(elements)) => select_elements(resource, elements),
        (None, None) => resource.clone(),
    }
}

/// How the pages of a search are linked.
enum Paging {
    /// By offset into the live results (a single page, or a search inside a
    /// transaction).
    Offset { more: bool },
    /// By offset into a kept result set.
    Kept { id: String, more: bool },
}

/// A kept result set, as stored.
struct ResultSet {
    keys: Vec<(String, String)>,
    total: Option<u64>,
    complete: bool,
}

/// Names a search by where it was asked and the parameters that took effect,
/// so a kept result set answers only the search that made it.
fn search_fingerprint(path: &str, params: &[(String, String)]) -> String {
    let mut text = path.to_owned();
    for (name, value) in params {
        text.push('\0');
        text.push_str(name);
        text.push('\u{1}');
        text.push_str(value);
    }
    haven_audit::token_fingerprint(&text)
}

/// The access token a request came with; kept result sets belong to it.
fn caller(exec: &Exec<'_>) -> String {
    exec.gate
        .principal
        .access
        .as_ref()
        .map(|a| a.token_id.clone())
        .unwrap_or_default()
}

async fn keep_result_set(
    exec: &Exec<'_>,
    keys: &[(String, String)],
    total: Option<u64>,
    complete: bool,
    fingerprint: &str,
) -> Result<String, ApiError> {
    let id = haven_model::id::new_id();
    let record = json!({
        "owner": caller(exec),
        "search": fingerprint,
        "keys": keys.iter().map(|(t, i)| json!([t, i])).collect::<Vec<_>>(),
        "total": total,
        "complete": complete,
    });
    let expires = exec.state.clock.now() + SNAPSHOT_LIFETIME;
    exec.state
        .store
        .auth_records()
        .put(SNAPSHOT_KIND, &id, &record, Some(expires))
        .await?;
    Ok(id)
}

async fn load_result_set(
    exec: &Exec<'_>,
    id: &str,
    fingerprint: &str,
) -> Result<ResultSet, ApiError> {
    let gone = || {
        ApiError::Gone(format!(
            "the search result set '{id}' has expired or never existed; search again"
        ))
    };
    if !haven_model::id::is_valid_id(id) {
        return Err(gone());
    }
    let record = exec
        .state
        .store
        .auth_records()
        .get(SNAPSHOT_KIND, id)
        .await?
        .ok_or_else(gone)?;
    if record["owner"].as_str() != Some(caller(exec).as_str()) {
        return Err(ApiError::Forbidden(
            "only the access token that made a search can follow its pages".into(),
        ));
    }
    if record["search"].as_str() != Some(fingerprint) {
        return Err(ApiError::invalid(
            IssueCode::Invalid,
            "_page belongs to another search; follow the links as given",
        ));
    }
    let keys = record["keys"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|k| Some((k[0].as_str()?.to_owned(), k[1].as_str()?.to_owned())))
        .collect();
    Ok(ResultSet {
        keys,
        total: record["total"].as_u64(),
        complete: record["complete"].as_bool().unwrap_or(true),
    })
}

/// One page of a kept result set, read again through the caller's access, in
/// the kept order.
async fn read_keys(
    exec: &Exec<'_>,
    keys: &[(String, String)],
    query: &SearchQuery,
) -> Result<Vec<ResourceVersion>, ApiError> {
    let start = usize::try_from(query.offset).unwrap_or(usize::MAX);
    if start >= keys.len() {
        return Ok(Vec::new());
    }
    let end = start.saturating_add(query.count as usize).min(keys.len());
    let wanted = &keys[start..end];
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let types: BTreeSet<String> = wanted.iter().map(|(t, _)| t.clone()).collect();
    let page_query = SearchQuery {
        types: types.into_iter().collect(),
        criterion: Criterion::Keys(wanted.to_vec()),
        count: wanted.len() as u32,
        local_base: query.local_base.clone(),
        ..SearchQuery::default()
    };
    let page = exec.state.store.search(&page_query).await?;
    let mut found: BTreeMap<(String, String), ResourceVersion> = page
        .resources
        .into_iter()
        .map(|v| ((v.resource_type.clone(), v.id.clone()), v))
        .collect();
    Ok(wanted.iter().filter_map(|k| found.remove(k)).collect())
}

/// The `self`, `next` and `previous` links; `path` is the type searched (or
/// compartment, or operation), empty for the system.
fn page_links(
    exec: &Exec<'_>,
    path: &str,
    params: &[(String, String)],
    count: u32,
    offset: u64,
    paging: &Paging,
) -> Vec<Value> {
    let (page, more) = match paging {
        Paging::Offset { more } => (None, *more),
        Paging::Kept { id, more } => (Some(id.as_str()), *more),
    };
    let mut links =
        vec![json!({"relation": "self", "url": link(exec, path, params, page, count, offset)})];
    // A page of zero entries has no neighbours: `next` would equal `self`.
    if more && count > 0 {
        let next = offset.saturating_add(u64::from(count));
        // Past the kept keys (they end on a page boundary), the search
        // continues on live results by offset.
        let kept = u64::from(SNAPSHOT_LIMIT / count * count);
        let page = page.filter(|_| next < kept);
        links.push(json!({"relation": "next", "url": link(exec, path, params, page, count, next)}));
    }
    if offset > 0 && count > 0 {
        let previous = offset.saturating_sub(u64::from(count));
        links.push(
            json!({"relation": "previous", "url": link(exec, path, params, page, count, previous)}),
        );
    }
    links
}

fn link(
    exec: &Exec<'_>,
    path: &str,
    params: &[(String, String)],
    page: Option<&str>,
    count: u32,
    offset: u64,
) -> String {
    let base = exec.state.config.base_url.trim_end_matches('/');
    let mut pairs = params.to_vec();
    if let Some(page) = page {
        pairs.push(("_page".into(), page.to_owned()));
    }
    pairs.push(("_count".into(), count.to_string()));
    if offset > 0 {
        pairs.push(("_offset".into(), offset.to_string()));
    }
    let query: String = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish();
    if path.is_empty() {
        format!("{base}?{query}")
    } else {
        format!("{base}/{path}?{query}")
    }
}

/// The offset-paged links of searches that keep no result set (the audit trail).
pub(super) fn offset_links(
    exec: &Exec<'_>,
    path: &str,
    params: &[(String, String)],
    count: u32,
    offset: u64,
    more: bool,
) -> Vec<Value> {
    page_links(exec, path, params, count, offset, &Paging::Offset { more })
}

/// The resources `_include` and `_revinclude` add to a page of matches, each
/// once and none that is itself a match, read through the caller's access;
/// `true` when [`MAX_INCLUDED`] cut them short.
async fn includes(
    exec: &Exec<'_>,
    cx: &SearchContext<'_>,
    matches: &[ResourceVersion],
    parsed: &ParsedSearch,
) -> Result<(Vec<ResourceVersion>, bool), ApiError> {
    let mut seen: HashSet<(String, String)> = matches
        .iter()
        .map(|v| (v.resource_type.clone(), v.id.clone()))
        .collect();
    let mut included: Vec<ResourceVersion> = Vec::new();
    let mut frontier: Vec<ResourceVersion> = matches.to_vec();
    for round in 0..=MAX_ITERATIONS {
        let wanted = |i: &&Include| round == 0 || i.iterate;
        let forward: Vec<&Include> = parsed.includes.iter().filter(wanted).collect();
        let reverse: Vec<&Include> = parsed.revincludes.iter().filter(wanted).collect();
        if frontier.is_empty() || (forward.is_empty() && reverse.is_empty()) {
            break;
        }
        let mut queries = Vec::new();
        // Forward: the targets of the named references, by type.
        let mut targets: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for version in &frontier {
            let Some(resource) = &version.resource else {
                continue;
            };
            for include in forward
                .iter()
                .filter(|i| i.source_type == version.resource_type)
            {
                for (target_type, target_id) in references(resource, include, cx.base_url) {
                    if !seen.contains(&(target_type.clone(), target_id.clone())) {
                        targets.entry(target_type).or_default().insert(target_id);
                    }
                }
            }
        }
        let local_base = Some(format!("{}/", cx.base_url));
        for (target_type, ids) in targets {
            queries.push(SearchQuery {
                types: vec![target_type],
                criterion: Criterion::Id(ids.into_iter().collect()),
                local_base: local_base.clone(),
                ..SearchQuery::default()
            });
        }
        // Reverse: resources of the source type that reference the frontier.
        for include in &reverse {
            let params: Vec<String> = match &include.param {
                Some(param) => vec![param.clone()],
                None => reference_params(&include.source_type),
            };
            // One criterion per referenced type, each an IN list of ids.
            let mut by_type: BTreeMap<&str, Vec<String>> = BTreeMap::new();
            for version in &frontier {
                if include
                    .target_type
                    .as_ref()
                    .is_some_and(|t| *t != version.resource_type)
                {
                    continue;
                }
                by_type
                    .entry(&version.resource_type)
                    .or_default()
                    .push(version.id.clone());
            }
            let alternatives: Vec<Criterion> = by_type
                .into_iter()
                .map(|(target_type, target_ids)| Criterion::ReferencesAny {
                    params: params.clone(),
                    target_type: target_type.to_owned(),
                    target_ids,
                })
                .collect();
            if !alternatives.is_empty() {
                queries.push(SearchQuery {
                    types: vec![include.source_type.clone()],
                    criterion: Criterion::Any(alternatives),
                    local_base: local_base.clone(),
                    ..SearchQuery::default()
                });
            }
        }
        let mut next = Vec::new();
        for mut query in queries {
            let room = MAX_INCLUDED.saturating_sub(included.len() + next.len());
            if room == 0 {
                included.extend(next);
                return Ok((included, true));
            }
            query.count = room as u32 + 1;
            let page = exec.state.store.search(&query).await?;
            for version in page.resources {
                if seen.insert((version.resource_type.clone(), version.id.clone())) {
                    next.push(version);
                }
            }
            if next.len() + included.len() > MAX_INCLUDED {
                next.truncate(MAX_INCLUDED - included.len());
                included.extend(next);
                return Ok((included, true));
            }
        }
        included.extend(next.iter().cloned());
        frontier = next;
    }
    Ok((included, false))
}

/// The local resources a resource references through an include's parameter
/// (every reference parameter for `*`), of its target type when it names one.
fn references(resource: &Value, include: &Include, base_url: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for value in index_values(resource) {
        let IndexValue::Reference {
            param,
            target_type: Some(target_type),
            target_id: Some(target_id),
            url,
            ..
        } = value
        else {
            continue;
        };
        if include.param.as_deref().is_some_and(|p| p != param) {
            continue;
        }
        // An absolute reference is followed only when it points at this server.
        if url
            .as_deref()
            .is_some_and(|u| !u.starts_with(&format!("{base_url}/")))
        {
            continue;
        }
        if include
            .target_type
            .as_ref()
            .is_some_and(|t| *t != target_type)
        {
            continue;
        }
        if !found.contains(&(target_type.clone(), target_id.clone())) {
            found.push((target_type, target_id));
        }
    }
    found
}

/// The reference parameters of a type, for `_revinclude=Type:*`.
fn reference_params(resource_type: &str) -> Vec<String> {
    registry::search_params(resource_type)
        .into_iter()
        .filter(|p| p.kind == SearchParamType::Reference)
        .map(|p| p.code.clone())
        .collect()
}

/// The `outcome` entry telling the client which parameters were ignored
/// (R4 search.html#errors) and anything else it should know, when there is any.
pub(super) fn search_outcome(ignored: &[String], mut issues: Vec<Issue>) -> Option<Value> {
    issues.extend(ignored.iter().map(|p| {
        Issue::warning(
            IssueCode::NotSupported,
            format!("the search parameter '{p}' is not supported and was ignored"),
        )
    }));
    if issues.is_empty() {
        return None;
    }
    Some(json!({
        "resource": operation_outcome(&issues),
        "search": {"mode": "outcome"},
    }))
}

/// The `outcome` entry for ignored parameters alone.
pub(super) fn ignored_outcome(ignored: &[String]) -> Option<Value> {
    search_outcome(ignored, Vec::new())
}
