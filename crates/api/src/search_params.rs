//! Search parameters: from query pairs to a [`SearchQuery`].
//!
//! The store indexes `_id`, `_lastUpdated` and `identifier` (on the types that
//! define it); the other token, reference, string, uri and date parameters of a
//! type are evaluated on each resource's content, as a filter the store applies
//! before paging and counting. The result parameters are `_count`, `_offset`,
//! `_total` and `_sort` (on `_lastUpdated` only). R4 search.html#errors lets a
//! server ignore parameters it
//! does not know; Haven does, and says so in an OperationOutcome entry, unless the
//! client asked for `Prefer: handling=strict`. A malformed value of a known
//! parameter is always a 400: silently widening a search would return data the
//! client did not ask for.
//!
//! Conditional interactions (`If-None-Exist`, conditional update and delete,
//! conditional references) use the same parser in strict mode: ignoring part of
//! a condition could make it match the wrong resource.

use haven_model::id::is_valid_id;
use haven_model::outcome::IssueCode;
use haven_model::registry::{self, SearchParamType};
use haven_model::search_value;
use haven_store::{
    Comparator, ContentFilter, InstantBound, SearchQuery, SortOrder, TokenFilter, TokenValue,
};
use time::{Date, Duration, Month, OffsetDateTime, PrimitiveDateTime, Time, UtcOffset};

use crate::error::ApiError;

/// Whether `resource_type` has the R4 `identifier` search parameter.
pub fn has_identifier_parameter(resource_type: &str) -> bool {
    haven_model::registry::search_param(resource_type, "identifier").is_some()
}

/// Parameters the caller handles itself and the parser must leave alone.
const HANDLED_ELSEWHERE: [&str; 2] = ["_format", "_type"];

/// A parsed search request.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedSearch {
    pub query: SearchQuery,
    /// Parameters that were ignored, as given (`name=value`).
    pub ignored: Vec<String>,
    /// The parameters that took effect, without paging, for `self`/`next` links.
    pub applied: Vec<(String, String)>,
}

/// Parses search parameters for `resource_type` (`None`: system search).
/// With `strict`, unknown parameters are an error instead of being ignored.
pub fn parse_search(
    resource_type: Option<&str>,
    pairs: &[(String, String)],
    default_count: u32,
    max_count: u32,
    strict: bool,
) -> Result<ParsedSearch, ApiError> {
    let mut query = SearchQuery {
        resource_type: resource_type.map(str::to_owned),
        count: default_count.min(max_count),
        total: true,
        ..SearchQuery::default()
    };
    let mut ignored = Vec::new();
    let mut applied = Vec::new();
    let mut content: Vec<ContentCriterion> = Vec::new();
    for (name, value) in pairs {
        if HANDLED_ELSEWHERE.contains(&name.as_str()) {
            continue;
        }
        // R4 search.html#errors: an empty value means the parameter is absent.
        if value.is_empty() {
            continue;
        }
        let known = match name.as_str() {
            "_id" => {
                let mut ids = Vec::new();
                for id in value.split(',') {
                    if !is_valid_id(id) {
                        return Err(bad(format!("_id: '{id}' is not a valid id")));
                    }
                    ids.push(id.to_owned());
                }
                if query.ids.is_empty() {
                    query.ids = ids;
                } else {
                    // Repeating `_id` is AND: keep only ids named by both.
                    query.ids.retain(|i| ids.contains(i));
                    if query.ids.is_empty() {
                        // Nothing can match; an impossible id keeps the query honest.
                        query.ids.push("-".into());
                    }
                }
                true
            }
            "_lastUpdated" => {
                query.last_updated.extend(parse_date_bounds(value)?);
                true
            }
            "identifier" if resource_type.is_some_and(has_identifier_parameter) => {
                query.tokens.push(TokenFilter {
                    parameter: "identifier".into(),
                    values: parse_tokens(value)?,
                });
                true
            }
            "_count" => {
                query.count = parse_count(value, max_count)?;
                false
            }
            "_offset" => {
                query.offset = parse_offset(value)?;
                false
            }
            "_total" => {
                query.total = parse_total(value)?;
                applied.push((name.clone(), value.clone()));
                false
            }
            "_sort" => {
                query.sort = match value.as_str() {
                    "_lastUpdated" => SortOrder::LastUpdatedAscending,
                    "-_lastUpdated" => SortOrder::LastUpdatedDescending,
                    _ => {
                        return Err(bad(format!(
                        "_sort: only _lastUpdated and -_lastUpdated are supported, not '{value}'"
                    )))
                    }
                };
                applied.push((name.clone(), value.clone()));
                false
            }
            _ => match resource_type.map(|t| content_criterion(t, name, value)) {
                Some(Some(criterion)) => {
                    content.push(criterion?);
                    true
                }
                _ => {
                    if strict {
                        return Err(ApiError::invalid(
                            IssueCode::NotSupported,
                            format!("unknown or unsupported search parameter '{name}'"),
                        ));
                    }
                    ignored.push(format!("{name}={value}"));
                    false
                }
            },
        };
        if known {
            applied.push((name.clone(), value.clone()));
        }
    }
    if !content.is_empty() {
        let own = query.filter.take();
        query.filter = Some(ContentFilter::new(move |resource| {
            own.as_ref().is_none_or(|f| f.admits(resource))
                && content.iter().all(|c| c.admits(resource))
        }));
    }
    Ok(ParsedSearch {
        query,
        ignored,
        applied,
    })
}

/// `_count`, cut to `max`.
pub fn parse_count(value: &str, max: u32) -> Result<u32, ApiError> {
    let n: u32 = value
        .parse()
        .map_err(|_| bad(format!("_count: '{value}' is not a number")))?;
    Ok(n.min(max))
}

/// `_offset`: both databases count rows in signed 64 bits.
pub fn parse_offset(value: &str) -> Result<u64, ApiError> {
    value
        .parse::<u64>()
        .ok()
        .filter(|n| i64::try_from(*n).is_ok())
        .ok_or_else(|| bad(format!("_offset: '{value}' is not a number of rows")))
}

/// `_total`: whether to count every match.
pub fn parse_total(value: &str) -> Result<bool, ApiError> {
    match value {
        "none" => Ok(false),
        "estimate" | "accurate" => Ok(true),
        _ => Err(bad(format!(
            "_total: '{value}' is not none, estimate or accurate"
        ))),
    }
}

/// The search parameters of `resource_type` that are evaluated on content (see
/// [`content_criterion`]), for the CapabilityStatement.
pub fn content_parameters(resource_type: &str) -> Vec<&'static registry::SearchParam> {
    registry::search_params(resource_type)
        .into_iter()
        .filter(|p| !matches!(p.code.as_str(), "_id" | "_lastUpdated" | "identifier"))
        .filter(|p| {
            let probe = match (p.kind, p.target.first()) {
                (SearchParamType::Date, _) => "2000".to_owned(),
                (SearchParamType::Reference, Some(target)) => format!("{target}/x"),
                _ => "x".to_owned(),
            };
            content_criterion(resource_type, &p.code, &probe).is_some_and(|c| c.is_ok())
        })
        .collect()
}

/// A criterion the database does not index, evaluated on each resource's
/// content: token, reference, string and uri parameters of the type (with the
/// modifiers [`search_value::matches`] knows), and date parameters. `None` when
/// the parameter is not one of those.
fn content_criterion(
    resource_type: &str,
    name: &str,
    value: &str,
) -> Option<Result<ContentCriterion, ApiError>> {
    let code = name.split(':').next().unwrap_or(name);
    let param = registry::search_param(resource_type, code)?;
    if resource_type == "Provenance" && code == "patient" && name == code {
        // A server-made Provenance names its target's patients itself; the
        // compartment rule reads them (see PROVENANCE_TARGET_PATIENT).
        let ids: Vec<String> = value
            .split(',')
            .filter_map(crate::smart::named_patient)
            .map(str::to_owned)
            .collect();
        return Some(Ok(ContentCriterion::Compartment(ids)));
    }
    if param.kind == SearchParamType::Date {
        if name != code {
            return Some(Err(ApiError::invalid(
                IssueCode::NotSupported,
                format!("'{name}': date parameters take no modifier"),
            )));
        }
        let mut bounds = Vec::new();
        for one in value.split(',') {
            match parse_date_bounds(one) {
                Ok(b) => bounds.push(b),
                Err(e) => return Some(Err(e)),
            }
        }
        return Some(Ok(ContentCriterion::Date {
            resource_type: resource_type.to_owned(),
            code: code.to_owned(),
            alternatives: bounds,
        }));
    }
    let pair = vec![(name.to_owned(), value.to_owned())];
    let probe = serde_json::json!({"resourceType": resource_type});
    match search_value::matches(&probe, &pair) {
        Ok(_) => Some(Ok(ContentCriterion::Matches(pair))),
        Err(_) => None,
    }
}

/// One criterion evaluated on content.
#[derive(Debug)]
enum ContentCriterion {
    Matches(Vec<(String, String)>),
    /// Any alternative's bounds all hold for some value of the parameter.
    Date {
        resource_type: String,
        code: String,
        alternatives: Vec<Vec<InstantBound>>,
    },
    Compartment(Vec<String>),
}

impl ContentCriterion {
    fn admits(&self, resource: &serde_json::Value) -> bool {
        match self {
            ContentCriterion::Matches(pair) => {
                search_value::matches(resource, pair).unwrap_or(false)
            }
            ContentCriterion::Compartment(ids) => ids
                .iter()
                .any(|id| search_value::in_patient_compartment(resource, id)),
            ContentCriterion::Date {
                resource_type,
                code,
                alternatives,
            } => search_value::values_for(resource, resource_type, code)
                .into_iter()
                .filter_map(|v| v.as_str().and_then(parse_date_range))
                .any(|(low, high)| {
                    alternatives.iter().any(|bounds| {
                        // The value's interval overlaps what the bounds allow.
                        bounds.iter().all(|b| match b.comparator {
                            Comparator::Ge => high > b.instant,
                            Comparator::Gt => high > b.instant,
                            Comparator::Lt => low < b.instant,
                            Comparator::Le => low <= b.instant,
                        })
                    })
                }),
        }
    }
}

/// Parses the criteria of a conditional interaction (`identifier=x|y&...`),
/// strictly, and asks for up to two matches: enough to tell 0, 1 and many apart.
pub fn parse_criteria(resource_type: &str, criteria: &str) -> Result<SearchQuery, ApiError> {
    let pairs = query_pairs(criteria);
    if pairs.iter().all(|(_, v)| v.is_empty()) {
        return Err(bad("a conditional interaction needs search criteria"));
    }
    for (name, _) in &pairs {
        if name.starts_with('_') && !matches!(name.as_str(), "_id" | "_lastUpdated") {
            return Err(bad(format!("'{name}' cannot be used in a condition")));
        }
    }
    let mut parsed = parse_search(Some(resource_type), &pairs, 2, 2, true)?;
    parsed.query.count = 2;
    parsed.query.offset = 0;
    parsed.query.total = false;
    Ok(parsed.query)
}

/// Splits a query string (already without `?`) into decoded pairs.
pub fn query_pairs(query: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::invalid(IssueCode::Invalid, message)
}

/// Token values separated by `,` (alternatives): `system|code`, `|code`,
/// `system|`, `code` (R4 search.html#token).
pub fn parse_tokens(value: &str) -> Result<Vec<TokenValue>, ApiError> {
    value
        .split(',')
        .map(|one| {
            let token = match one.split_once('|') {
                Some((system, code)) => TokenValue {
                    system: Some(system.to_owned()),
                    code: (!code.is_empty()).then(|| code.to_owned()),
                },
                None => TokenValue {
                    system: None,
                    code: Some(one.to_owned()),
                },
            };
            if token.code.is_none() && token.system.as_deref().is_none_or(str::is_empty) {
                return Err(bad(format!("'{one}' is not a token (system|code)")));
            }
            if token.code.as_deref() == Some("") {
                return Err(bad("a token needs a code"));
            }
            Ok(token)
        })
        .collect()
}

/// A `_lastUpdated` value with its prefix, as bounds on the instant: the value
/// stands for the whole interval its precision covers (R4 search.html#date), so
/// `eq2024-01` is all of January and `gt2024-01` starts in February.
pub fn parse_date_bounds(value: &str) -> Result<Vec<InstantBound>, ApiError> {
    let (prefix, date) = match value.get(..2) {
        Some(p @ ("eq" | "ne" | "gt" | "ge" | "lt" | "le" | "sa" | "eb" | "ap")) => {
            (p, &value[2..])
        }
        _ => ("eq", value),
    };
    let (low, high) = parse_date_range(date)
        .ok_or_else(|| bad(format!("_lastUpdated: '{date}' is not a date or dateTime")))?;
    let bound = |comparator, instant| InstantBound {
        comparator,
        instant,
    };
    Ok(match prefix {
        "eq" => vec![bound(Comparator::Ge, low), bound(Comparator::Lt, high)],
        "gt" | "sa" => vec![bound(Comparator::Ge, high)],
        "ge" => vec![bound(Comparator::Ge, low)],
        "lt" | "eb" => vec![bound(Comparator::Lt, low)],
        "le" => vec![bound(Comparator::Lt, high)],
        other => {
            return Err(ApiError::invalid(
                IssueCode::NotSupported,
                format!("_lastUpdated: the prefix '{other}' is not supported"),
            ))
        }
    })
}

/// The half-open interval `[low, high)` a FHIR date or dateTime covers at its
/// precision. A dateTime without a zone is read as UTC.
pub fn parse_date_range(text: &str) -> Option<(OffsetDateTime, OffsetDateTime)> {
    let (date_part, time_part) = match text.split_once('T') {
        Some((d, t)) => (d, Some(t)),
        None => (text, None),
    };
    let mut fields = date_part.split('-');
    let year: i32 = digits(fields.next()?, 4)?;
    let month: Option<u8> = match fields.next() {
        Some(m) => Some(digits(m, 2)?),
        None => None,
    };
    let day: Option<u8> = match fields.next() {
        Some(d) => Some(digits(d, 2)?),
        None => None,
    };
    if fields.next().is_some() {
        return None;
    }
    let utc = |d: Date| d.midnight().assume_utc();
    match (month, day, time_part) {
        (None, None, None) => {
            let low = Date::from_calendar_date(year, Month::January, 1).ok()?;
            let high = Date::from_calendar_date(year + 1, Month::January, 1).ok()?;
            Some((utc(low), utc(high)))
        }
        (Some(m), None, None) => {
            let month = Month::try_from(m).ok()?;
            let low = Date::from_calendar_date(year, month, 1).ok()?;
            let (ny, nm) = if month == Month::December {
                (year + 1, Month::January)
            } else {
                (year, month.next())
            };
            let high = Date::from_calendar_date(ny, nm, 1).ok()?;
            Some((utc(low), utc(high)))
        }
        (Some(m), Some(d), None) => {
            let low = Date::from_calendar_date(year, Month::try_from(m).ok()?, d).ok()?;
            Some((utc(low), utc(low) + Duration::days(1)))
        }
        (Some(m), Some(d), Some(t)) => {
            let date = Date::from_calendar_date(year, Month::try_from(m).ok()?, d).ok()?;
            parse_time(date, t)
        }
        _ => None,
    }
}

fn parse_time(date: Date, text: &str) -> Option<(OffsetDateTime, OffsetDateTime)> {
    // Split the zone off: `Z`, `+hh:mm`, `-hh:mm`; a `+` that arrived as a space
    // (an unencoded query string) is read as `+`.
    let (clock, offset) = if let Some(c) = text.strip_suffix('Z') {
        (c, UtcOffset::UTC)
    } else if let Some(pos) = text.rfind(['+', '-', ' ']) {
        let sign: i8 = if text.as_bytes()[pos] == b'-' { -1 } else { 1 };
        let (h, m) = text[pos + 1..].split_once(':')?;
        let offset =
            UtcOffset::from_hms(sign * digits::<i8>(h, 2)?, sign * digits::<i8>(m, 2)?, 0).ok()?;
        (&text[..pos], offset)
    } else {
        (text, UtcOffset::UTC)
    };
    let mut parts = clock.split(':');
    let hour: u8 = digits(parts.next()?, 2)?;
    let minute: u8 = digits(parts.next()?, 2)?;
    let (second, fraction, step) = match parts.next() {
        None => (0u8, 0u32, Duration::minutes(1)),
        Some(s) => match s.split_once('.') {
            None => (digits(s, 2)?, 0, Duration::seconds(1)),
            Some((whole, frac)) => {
                if frac.is_empty() || frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                let kept = &frac[..frac.len().min(6)];
                let micros: u32 = format!("{kept:0<6}").parse().ok()?;
                let step = Duration::microseconds(10i64.pow(6 - kept.len() as u32));
                (digits(whole, 2)?, micros, step)
            }
        },
    };
    if parts.next().is_some() {
        return None;
    }
    let time = Time::from_hms_micro(hour, minute, second, fraction).ok()?;
    let low = PrimitiveDateTime::new(date, time).assume_offset(offset);
    Some((low, low + step))
}

fn digits<T: std::str::FromStr>(text: &str, width: usize) -> Option<T> {
    if text.len() != width || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn a_month_covers_the_whole_month() {
        let (low, high) = parse_date_range("2024-12").unwrap();
        assert_eq!(low, datetime!(2024-12-01 0:00 UTC));
        assert_eq!(high, datetime!(2025-01-01 0:00 UTC));
    }

    #[test]
    fn a_datetime_with_a_zone_covers_one_second() {
        let (low, high) = parse_date_range("2024-01-02T03:04:05+02:00").unwrap();
        assert_eq!(low, datetime!(2024-01-02 01:04:05 UTC));
        assert_eq!(high - low, Duration::seconds(1));
        let (low, high) = parse_date_range("2024-01-02T03:04:05.12Z").unwrap();
        assert_eq!(low, datetime!(2024-01-02 03:04:05.12 UTC));
        assert_eq!(high - low, Duration::milliseconds(10));
    }

    #[test]
    fn malformed_dates_are_refused() {
        for bad in [
            "2024-1",
            "24",
            "2024-13",
            "2024-02-30",
            "2024-01-01T25:00Z",
            "x",
        ] {
            assert!(parse_date_range(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn prefixes_become_bounds_on_the_covered_interval() {
        let b = parse_date_bounds("gt2024-01").unwrap();
        assert_eq!(b[0].comparator, Comparator::Ge);
        assert_eq!(b[0].instant, datetime!(2024-02-01 0:00 UTC));
        let b = parse_date_bounds("le2024").unwrap();
        assert_eq!(b[0].comparator, Comparator::Lt);
        assert_eq!(b[0].instant, datetime!(2025-01-01 0:00 UTC));
        assert_eq!(parse_date_bounds("eq2024-01-01").unwrap().len(), 2);
        assert!(parse_date_bounds("ne2024").is_err());
    }

    #[test]
    fn tokens_come_in_four_shapes() {
        let t = parse_tokens("s|c,|c,s|,c").unwrap();
        assert_eq!(t[0].system.as_deref(), Some("s"));
        assert_eq!(t[0].code.as_deref(), Some("c"));
        assert_eq!(t[1].system.as_deref(), Some(""));
        assert_eq!(t[2].code, None);
        assert_eq!(t[3].system, None);
        assert!(parse_tokens("|").is_err());
    }

    #[test]
    fn unknown_parameters_are_ignored_unless_strict() {
        let p = pairs(&[("_text", "x"), ("_count", "5000")]);
        let parsed = parse_search(Some("Patient"), &p, 50, 1000, false).unwrap();
        assert_eq!(parsed.ignored, vec!["_text=x".to_string()]);
        assert_eq!(parsed.query.count, 1000);
        assert!(parse_search(Some("Patient"), &p, 50, 1000, true).is_err());
    }

    #[test]
    fn parameters_without_an_index_are_evaluated_on_the_content() {
        let p = pairs(&[("family", "Shaw"), ("birthdate", "ge2000")]);
        let parsed = parse_search(Some("Patient"), &p, 50, 1000, true).unwrap();
        let filter = parsed.query.filter.expect("a content filter");
        let shaw = serde_json::json!({"resourceType": "Patient", "name": [{"family": "Shaw"}], "birthDate": "2001-02-03"});
        let older = serde_json::json!({"resourceType": "Patient", "name": [{"family": "Shaw"}], "birthDate": "1999-12-31"});
        let other = serde_json::json!({"resourceType": "Patient", "name": [{"family": "Lake"}], "birthDate": "2001-02-03"});
        assert!(filter.admits(&shaw));
        assert!(!filter.admits(&older));
        assert!(!filter.admits(&other));
        assert!(parse_search(
            Some("Patient"),
            &pairs(&[("birthdate", "2001-13")]),
            50,
            1000,
            true
        )
        .is_err());
    }

    #[test]
    fn criteria_need_at_least_one_condition() {
        assert!(parse_criteria("Patient", "").is_err());
        assert!(parse_criteria("Patient", "_count=1").is_err());
        let q = parse_criteria("Patient", "identifier=a|b").unwrap();
        assert_eq!(q.count, 2);
    }
}
