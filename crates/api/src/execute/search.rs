//! Search (R4 search.html): type search, system search (`_type` with one type
//! or none), and search by POST; results as a `searchset` Bundle with offset
//! paging links.

use haven_model::outcome::{operation_outcome, Issue, IssueCode};
use haven_model::registry::is_resource_type;
use haven_store::StoreTx;
use serde_json::{json, Value};

use super::instance::full_url;
use super::result_bundle;
use crate::error::ApiError;
use crate::pipeline::Exec;
use crate::response::FhirResponse;
use crate::search_params::parse_search;

pub(crate) async fn search(
    exec: &Exec<'_>,
    resource_type: Option<&str>,
    params: &[(String, String)],
    tx: Option<&mut dyn StoreTx>,
) -> Result<FhirResponse, ApiError> {
    let config = &exec.state.config;
    // System search narrows to one type with `_type`; several are not supported.
    let mut resource_type = resource_type.map(str::to_owned);
    let mut path = resource_type.clone().unwrap_or_default();
    if resource_type.is_none() {
        let types: Vec<&str> = params
            .iter()
            .filter(|(k, _)| k == "_type")
            .flat_map(|(_, v)| v.split(','))
            .filter(|t| !t.is_empty())
            .collect();
        match types.as_slice() {
            [] => {}
            [one] if is_resource_type(one) => resource_type = Some((*one).to_owned()),
            [one] => return Err(ApiError::UnknownType((*one).to_owned())),
            _ => {
                return Err(ApiError::invalid(
                    IssueCode::NotSupported,
                    "_type with more than one type is not supported",
                ))
            }
        }
        path = String::new();
    }
    let parsed = parse_search(
        resource_type.as_deref(),
        params,
        config.default_page_size,
        config.max_page_size,
        exec.prefer.strict,
    )?;
    let page = match tx {
        Some(tx) => tx.search(&parsed.query).await?,
        None => exec.state.store.search(&parsed.query).await?,
    };

    let mut link_params = parsed.applied.clone();
    if path.is_empty() {
        if let Some(t) = &resource_type {
            link_params.insert(0, ("_type".into(), t.clone()));
        }
    }
    let links = page_links(
        exec,
        &path,
        &link_params,
        parsed.query.count,
        parsed.query.offset,
        page.more,
    );

    let mut entries: Vec<Value> = page
        .resources
        .iter()
        .filter_map(|v| {
            v.resource.as_ref().map(|r| {
                json!({
                    "fullUrl": full_url(exec, &v.resource_type, &v.id),
                    "resource": r,
                    "search": {"mode": "match"},
                })
            })
        })
        .collect();
    entries.extend(ignored_outcome(&parsed.ignored));

    Ok(FhirResponse::ok(result_bundle(
        exec,
        "searchset",
        page.total,
        links,
        entries,
    )))
}

/// The `self`, `next` and `previous` links of an offset-paged search; `path` is
/// the type searched, or empty for the system.
pub(super) fn page_links(
    exec: &Exec<'_>,
    path: &str,
    params: &[(String, String)],
    count: u32,
    offset: u64,
    more: bool,
) -> Vec<Value> {
    let base = &exec.state.config.base_url;
    let link = |offset: u64| {
        let mut pairs = params.to_vec();
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
    };
    let mut links = vec![json!({"relation": "self", "url": link(offset)})];
    // A page of zero entries has no neighbours: `next` would equal `self`.
    if more && count > 0 {
        links.push(json!({
            "relation": "next",
            "url": link(offset.saturating_add(u64::from(count))),
        }));
    }
    if offset > 0 && count > 0 {
        links.push(json!({
            "relation": "previous",
            "url": link(offset.saturating_sub(u64::from(count.max(1)))),
        }));
    }
    links
}

/// The `outcome` entry that tells the client which parameters were ignored
/// (R4 search.html#errors), when any were.
pub(super) fn ignored_outcome(ignored: &[String]) -> Option<Value> {
    if ignored.is_empty() {
        return None;
    }
    let issues: Vec<Issue> = ignored
        .iter()
        .map(|p| {
            Issue::warning(
                IssueCode::NotSupported,
                format!("the search parameter '{p}' is not supported and was ignored"),
            )
        })
        .collect();
    Some(json!({
        "resource": operation_outcome(&issues),
        "search": {"mode": "outcome"},
    }))
}
