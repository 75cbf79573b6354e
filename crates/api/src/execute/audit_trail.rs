//! The audit trail through the FHIR API: AuditEvents are read and searched
//! from the append-only audit log, never written (the pipeline answers writes
//! with 405), and `AuditEvent/$verify` walks the hash chain.

use haven_audit::{BreakKind, StoredLink, Verifier};
use haven_model::outcome::IssueCode;
use haven_store::{AuditLog, AuditQuery, AuditRecord, StoreError};
use http::header::{ETAG, LAST_MODIFIED};
use serde_json::{json, Value};

use super::result_bundle;
use super::search::{ignored_outcome, offset_links};
use crate::error::ApiError;
use crate::interaction::Interaction;
use crate::pipeline::Exec;
use crate::response::{etag, http_date, FhirResponse};
use crate::search_params::{
    parse_count, parse_date_bounds, parse_offset, parse_tokens, parse_total,
};

/// Runs an interaction on the AuditEvent type.
pub(crate) async fn execute(
    exec: &Exec<'_>,
    interaction: &Interaction,
) -> Result<FhirResponse, ApiError> {
    match interaction {
        Interaction::Read { id, .. } => read(exec, id).await,
        // Audit records have one version only: they never change.
        Interaction::VRead { id, version: 1, .. } => read(exec, id).await,
        Interaction::VRead { id, .. } => Err(not_found(id)),
        Interaction::Search { params, .. } => search(exec, params).await,
        Interaction::VerifyAuditTrail => verify(exec).await,
        Interaction::History { .. } => Err(ApiError::MethodNotAllowed(
            "AuditEvents have no history: they are never changed".into(),
        )),
        _ => Err(ApiError::MethodNotAllowed(
            "AuditEvents are written by the server only and never changed".into(),
        )),
    }
}

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound(format!("AuditEvent/{id} is not known"))
}

fn recorded_at(record: &AuditRecord) -> Option<time::OffsetDateTime> {
    record.event["meta"]["lastUpdated"].as_str().and_then(|t| {
        time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
    })
}

async fn read(exec: &Exec<'_>, id: &str) -> Result<FhirResponse, ApiError> {
    let record = exec
        .state
        .store
        .audit_log()
        .read(id)
        .await?
        .ok_or_else(|| not_found(id))?;
    let mut response = FhirResponse::ok(record.event.clone()).with_header(ETAG, etag(1));
    if let Some(at) = recorded_at(&record) {
        response = response.with_header(LAST_MODIFIED, http_date(at));
    }
    Ok(response)
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::invalid(IssueCode::Invalid, message)
}

/// A list parameter: comma-separated alternatives, none empty.
fn alternatives(name: &str, value: &str) -> Result<Vec<String>, ApiError> {
    let values: Vec<String> = value.split(',').map(str::to_owned).collect();
    if values.iter().any(String::is_empty) {
        return Err(bad(format!("{name}: empty alternative in '{value}'")));
    }
    Ok(values)
}

/// The search parameters of AuditEvent that Haven supports, into a query.
struct ParsedAuditSearch {
    query: AuditQuery,
    applied: Vec<(String, String)>,
    ignored: Vec<String>,
}

fn parse_audit_search(
    exec: &Exec<'_>,
    params: &[(String, String)],
) -> Result<ParsedAuditSearch, ApiError> {
    let config = &exec.state.config;
    let mut query = AuditQuery {
        count: config.default_page_size.min(config.max_page_size),
        total: true,
        ..AuditQuery::default()
    };
    let mut applied = Vec::new();
    let mut ignored = Vec::new();
    for (name, value) in params {
        if value.is_empty() || name == "_format" {
            continue;
        }
        let mut known = true;
        match name.as_str() {
            "_id" => query.ids.extend(alternatives(name, value)?),
            "date" => query.date.extend(parse_date_bounds(value)?),
            "agent" => query.agent.extend(alternatives(name, value)?),
            "patient" => {
                for p in alternatives(name, value)? {
                    let id = crate::smart::named_patient(&p)
                        .ok_or_else(|| bad(format!("patient: '{p}' is not a Patient reference")))?;
                    query.patient.push(format!("Patient/{id}"));
                }
            }
            "entity" => query.entity.extend(alternatives(name, value)?),
            "policy" => query.policy.extend(alternatives(name, value)?),
            // Haven's own: the events of one request, by its X-Request-Id.
            "request" => query.request.extend(alternatives(name, value)?),
            "outcome" => {
                for o in alternatives(name, value)? {
                    if !matches!(o.as_str(), "0" | "4" | "8" | "12") {
                        return Err(bad(format!("outcome: '{o}' is not 0, 4, 8 or 12")));
                    }
                    query.outcome.push(o);
                }
            }
            "action" => {
                for a in alternatives(name, value)? {
                    if !matches!(a.as_str(), "C" | "R" | "U" | "D" | "E") {
                        return Err(bad(format!("action: '{a}' is not C, R, U, D or E")));
                    }
                    query.action.push(a);
                }
            }
            "type" => query.event_type.extend(parse_tokens(value)?),
            "subtype" => query.subtype.extend(parse_tokens(value)?),
            "_count" => {
                known = false;
                query.count = parse_count(value, config.max_page_size)?;
            }
            "_offset" => {
                known = false;
                query.offset = parse_offset(value)?;
            }
            "_total" => query.total = parse_total(value)?,
            _ => {
                if exec.prefer.strict {
                    return Err(ApiError::invalid(
                        IssueCode::NotSupported,
                        format!("unknown or unsupported search parameter '{name}'"),
                    ));
                }
                known = false;
                ignored.push(format!("{name}={value}"));
            }
        }
        if known {
            applied.push((name.clone(), value.clone()));
        }
    }
    Ok(ParsedAuditSearch {
        query,
        applied,
        ignored,
    })
}

async fn search(exec: &Exec<'_>, params: &[(String, String)]) -> Result<FhirResponse, ApiError> {
    let parsed = parse_audit_search(exec, params)?;
    let page = exec.state.store.audit_log().search(&parsed.query).await?;
    let links = offset_links(
        exec,
        "AuditEvent",
        &parsed.applied,
        parsed.query.count,
        parsed.query.offset,
        page.more,
    );
    let base = &exec.state.config.base_url;
    let mut entries: Vec<Value> = page
        .records
        .iter()
        .map(|r| {
            json!({
                "fullUrl": format!("{base}/AuditEvent/{}", r.event["id"].as_str().unwrap_or_default()),
                "resource": r.event,
                "search": {"mode": "match"},
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

/// How a walk of the audit trail ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrailReport {
    /// How many records verified before the end or the break.
    pub verified: u64,
    /// The hash of the last verified record: compare it with an anchor kept
    /// outside the database to catch a rewritten tail.
    pub head: String,
    pub broken: Option<haven_audit::ChainBreak>,
}

/// Walks the whole audit trail in pages and verifies its hash chain.
pub async fn verify_trail(log: &dyn AuditLog) -> Result<TrailReport, StoreError> {
    const PAGE: u32 = 1000;
    let mut verifier = Verifier::default();
    let mut after = 0;
    loop {
        let records = log.chain(after, PAGE).await?;
        let Some(last) = records.last() else {
            break;
        };
        after = last.position;
        let full = records.len() == PAGE as usize;
        for r in records {
            let link = StoredLink {
                position: r.position,
                record: r.event,
                previous_hash: r.previous_hash,
                hash: r.hash,
            };
            if let Err(broken) = verifier.push(&link) {
                return Ok(TrailReport {
                    verified: verifier.verified(),
                    head: verifier.head().to_owned(),
                    broken: Some(broken),
                });
            }
        }
        if !full {
            break;
        }
    }
    Ok(TrailReport {
        verified: verifier.verified(),
        head: verifier.head().to_owned(),
        broken: None,
    })
}

fn problem_code(kind: BreakKind) -> &'static str {
    match kind {
        BreakKind::Changed => "changed",
        BreakKind::Removed => "removed",
        BreakKind::Inserted => "inserted",
    }
}

/// `AuditEvent/$verify`: a Parameters resource saying whether the chain holds,
/// and if not, where it first breaks and how.
async fn verify(exec: &Exec<'_>) -> Result<FhirResponse, ApiError> {
    let report = verify_trail(exec.state.store.audit_log()).await?;
    let mut parameters = vec![
        json!({"name": "verified", "valueBoolean": report.broken.is_none()}),
        json!({"name": "records", "valueInteger": report.verified}),
        json!({"name": "head", "valueString": report.head}),
    ];
    if let Some(broken) = report.broken {
        parameters.push(json!({"name": "position", "valueInteger": broken.position}));
        parameters.push(json!({"name": "problem", "valueCode": problem_code(broken.kind)}));
        parameters.push(json!({"name": "message", "valueString": broken.to_string()}));
    }
    Ok(FhirResponse::ok(json!({
        "resourceType": "Parameters",
        "parameter": parameters,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_are_named_in_one_word() {
        assert_eq!(problem_code(BreakKind::Changed), "changed");
        assert_eq!(problem_code(BreakKind::Removed), "removed");
        assert_eq!(problem_code(BreakKind::Inserted), "inserted");
    }
}
