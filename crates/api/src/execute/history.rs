//! History (R4 http.html#history): instance, type and system, newest first, as a
//! `history` Bundle. Paging follows the store's stable cursor, passed to clients
//! as the `_cursor` parameter of the `next` link, so pages do not shift when new
//! versions arrive.

use haven_model::clock::format_instant;
use haven_model::outcome::IssueCode;
use haven_store::{Change, HistoryQuery};
use http::StatusCode;
use serde_json::{json, Value};

use super::instance::full_url;
use super::result_bundle;
use crate::error::ApiError;
use crate::pipeline::Exec;
use crate::response::{etag, status_line, FhirResponse};
use crate::search_params::parse_date_range;

pub(crate) async fn history(
    exec: &Exec<'_>,
    resource_type: Option<&str>,
    id: Option<&str>,
    params: &[(String, String)],
) -> Result<FhirResponse, ApiError> {
    let config = &exec.state.config;
    let mut query = HistoryQuery {
        resource_type: resource_type.map(str::to_owned),
        id: id.map(str::to_owned),
        count: config.default_page_size.min(config.max_page_size),
        total: true,
        ..HistoryQuery::default()
    };
    let bad = |m: String| ApiError::invalid(IssueCode::Invalid, m);
    let mut kept = Vec::new();
    for (name, value) in params {
        if value.is_empty() {
            continue;
        }
        match name.as_str() {
            "_since" => {
                let (low, _) = parse_date_range(value)
                    .ok_or_else(|| bad(format!("_since: '{value}' is not an instant")))?;
                query.since = Some(low);
                kept.push((name.clone(), value.clone()));
            }
            "_at" => {
                // R4 http.html#history: versions current at some point of the period.
                let (low, high) = parse_date_range(value)
                    .ok_or_else(|| bad(format!("_at: '{value}' is not a dateTime")))?;
                query.at = Some(low);
                query.at_until = Some(high);
                kept.push((name.clone(), value.clone()));
            }
            "_count" => {
                let n: u32 = value
                    .parse()
                    .map_err(|_| bad(format!("_count: '{value}' is not a number")))?;
                query.count = n.min(config.max_page_size);
            }
            "_cursor" => {
                query.before = Some(
                    value
                        .parse()
                        .map_err(|_| bad(format!("_cursor: '{value}' is not a cursor")))?,
                );
            }
            _ if exec.prefer.strict => {
                return Err(ApiError::invalid(
                    IssueCode::NotSupported,
                    format!("'{name}' is not a history parameter"),
                ))
            }
            _ => {}
        }
    }
    if let (Some(t), Some(i)) = (resource_type, id) {
        if exec.state.store.read(t, i).await?.is_none() {
            return Err(ApiError::NotFound(format!("{t}/{i} is not known")));
        }
    }
    let page = exec.state.store.history(&query).await?;

    let path = match (resource_type, id) {
        (Some(t), Some(i)) => format!("{t}/{i}/_history"),
        (Some(t), None) => format!("{t}/_history"),
        _ => "_history".to_owned(),
    };
    let link = |cursor: Option<i64>| {
        let mut pairs = kept.clone();
        pairs.push(("_count".into(), query.count.to_string()));
        if let Some(c) = cursor {
            pairs.push(("_cursor".into(), c.to_string()));
        }
        let q: String = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs)
            .finish();
        format!("{}/{path}?{q}", config.base_url)
    };
    let mut links = vec![json!({"relation": "self", "url": link(query.before)})];
    if let Some(next) = page.next {
        links.push(json!({"relation": "next", "url": link(Some(next))}));
    }

    let entries: Vec<Value> = page
        .versions
        .iter()
        .map(|v| {
            let (method, url, status) = match v.change {
                Change::Create => ("POST", v.resource_type.clone(), StatusCode::CREATED),
                Change::Update => (
                    "PUT",
                    format!("{}/{}", v.resource_type, v.id),
                    StatusCode::OK,
                ),
                Change::Delete => (
                    "DELETE",
                    format!("{}/{}", v.resource_type, v.id),
                    StatusCode::OK,
                ),
            };
            let mut entry = json!({
                "fullUrl": full_url(exec, &v.resource_type, &v.id),
            });
            if let Some(resource) = &v.resource {
                entry["resource"] = resource.clone();
            }
            entry["request"] = json!({"method": method, "url": url});
            entry["response"] = json!({
                "status": status_line(status),
                "etag": etag(v.version),
                "lastModified": format_instant(v.last_updated),
            });
            entry
        })
        .collect();

    Ok(FhirResponse::ok(result_bundle(
        exec, "history", page.total, links, entries,
    )))
}
