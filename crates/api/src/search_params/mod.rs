//! Search parameters: from query pairs to a [`SearchQuery`] whose criterion
//! the store answers from its search index (R4 search.html).
//!
//! Criteria on different parameters, and repeats of one, are combined with
//! AND; the comma-separated values of one are alternatives (OR). Every
//! parameter of a type is searched through the index: string, token,
//! reference, date, number, quantity, uri and composite parameters, with their
//! modifiers, chains (`subject:Patient.name=x`) and reverse chains (`_has`).
//! The result parameters are `_count`, `_offset`, `_total`, `_sort`,
//! `_summary`, `_elements`, `_include` and `_revinclude`.
//!
//! R4 search.html#errors lets a server ignore parameters it does not know or
//! support; Haven does, and says so in an OperationOutcome entry, unless the
//! client asked for `Prefer: handling=strict`. A malformed value of a known
//! parameter is always a 400: silently widening a search would return data
//! the client did not ask for. Names and values reach the store only as bound
//! values, after being checked here.
//!
//! Conditional interactions (`If-None-Exist`, conditional update and delete,
//! conditional references) and the restrictions of SMART v2 scopes use the
//! same parser in strict mode ([`criterion_for`]): ignoring part of a
//! condition could make it match the wrong resource.

mod criteria;
mod values;

use haven_model::outcome::IssueCode;
use haven_model::registry::{self, SearchParamType};
use haven_store::{Criterion, SearchQuery, SortBy, SortKey, TokenValue};
use time::OffsetDateTime;

use self::criteria::{links, sort_kind, Criteria, Skip, MAX_DEPTH};
use crate::error::ApiError;

pub use self::values::{parse_date_bounds, parse_date_range};

/// Whether `resource_type` has the R4 `identifier` search parameter.
pub fn has_identifier_parameter(resource_type: &str) -> bool {
    registry::search_param(resource_type, "identifier").is_some()
}

/// Parameters the caller handles itself and the parser leaves alone.
const HANDLED_ELSEWHERE: [&str; 4] = ["_format", "_type", "_page", "_pretty"];

/// The result parameters (search.html#return), which select no resources.
const RESULT_PARAMETERS: [&str; 10] = [
    "_count",
    "_offset",
    "_total",
    "_sort",
    "_summary",
    "_elements",
    "_include",
    "_revinclude",
    "_contained",
    "_containedType",
];

/// What a search needs to know of the request it serves.
#[derive(Debug, Clone, Copy)]
pub struct SearchContext<'a> {
    /// The server's FHIR base URL: references to it are local.
    pub base_url: &'a str,
    /// The time `ap` on dates measures its distance from.
    pub now: OffsetDateTime,
    pub default_count: u32,
    pub max_count: u32,
    /// `Prefer: handling=strict`: unknown parameters are refused.
    pub strict: bool,
}

/// A parsed search request.
#[derive(Debug, Clone)]
pub struct ParsedSearch {
    /// Types, criterion, sort, count, offset and total; no filter or access.
    pub query: SearchQuery,
    /// Parameters that were ignored, as given (`name=value`).
    pub ignored: Vec<String>,
    /// The parameters that took effect, without `_count`, `_offset` and
    /// `_page`, for `self`/`next` links.
    pub applied: Vec<(String, String)>,
    pub includes: Vec<Include>,
    pub revincludes: Vec<Include>,
    pub summary: Option<Summary>,
    /// `_elements`: top-level element names.
    pub elements: Option<Vec<String>>,
}

/// One `_include` or `_revinclude` (search.html#include): resources of
/// `source_type` and the references of `param` (`None`: every reference
/// parameter, `*`), limited to `target_type` when given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Include {
    pub source_type: String,
    pub param: Option<String>,
    pub target_type: Option<String>,
    /// `:iterate` (R3's `:recurse`): also applies to included resources.
    pub iterate: bool,
}

/// `_summary` (search.html#summary).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Summary {
    True,
    Text,
    Data,
    Count,
    False,
}

/// Parses the parameters of a search of `types` (empty: every type). With
/// `cx.strict`, unknown and unsupported parameters are an error instead of
/// being ignored.
pub fn parse_search(
    types: &[String],
    pairs: &[(String, String)],
    cx: &SearchContext,
) -> Result<ParsedSearch, ApiError> {
    check_types(types)?;
    let mut query = SearchQuery {
        types: types.to_vec(),
        count: cx.default_count.min(cx.max_count),
        total: true,
        ..SearchQuery::default()
    };
    let mut parsed = ParsedSearch {
        query: SearchQuery::default(),
        ignored: Vec::new(),
        applied: Vec::new(),
        includes: Vec::new(),
        revincludes: Vec::new(),
        summary: None,
        elements: None,
    };
    let criteria = Criteria::new(cx);
    let mut criterion = Criterion::Always;
    let ignore = |parsed: &mut ParsedSearch, name: &str, value: &str, why: String| {
        if cx.strict {
            return Err(not_supported(why));
        }
        parsed.ignored.push(format!("{name}={value}"));
        Ok(())
    };
    for (name, value) in pairs {
        let (name, value) = (name.as_str(), value.as_str());
        // R4 search.html#errors: an empty value means the parameter is absent.
        if HANDLED_ELSEWHERE.contains(&name) || value.is_empty() {
            continue;
        }
        let (base, modifier) = match name.split_once(':') {
            Some((base, modifier)) => (base, Some(modifier)),
            None => (name, None),
        };
        let result_parameter = RESULT_PARAMETERS.contains(&base);
        if result_parameter && modifier.is_some() && !matches!(base, "_include" | "_revinclude") {
            return Err(bad(format!("'{name}': {base} takes no modifier")));
        }
        let mut apply = true;
        match base {
            "_count" => {
                query.count = parse_count(value, cx.max_count)?;
                apply = false;
            }
            "_offset" => {
                query.offset = parse_offset(value)?;
                apply = false;
            }
            "_total" => query.total = parse_total(value)?,
            "_sort" => query.sort = parse_sort(types, value)?,
            "_summary" => parsed.summary = Some(parse_summary(value)?),
            "_elements" => parsed.elements = Some(parse_elements(value)?),
            "_include" | "_revinclude" => {
                let reverse = base == "_revinclude";
                let found = parse_include(types, modifier, value, reverse)?;
                if reverse {
                    parsed.revincludes.extend(found);
                } else {
                    parsed.includes.extend(found);
                }
            }
            "_contained" => match value {
                "false" => {}
                "true" | "both" => {
                    ignore(
                        &mut parsed,
                        name,
                        value,
                        "contained resources are not searched (_contained)".into(),
                    )?;
                    apply = false;
                }
                other => {
                    return Err(bad(format!(
                        "_contained: '{other}' is not true, false or both"
                    )))
                }
            },
            "_containedType" => {
                ignore(
                    &mut parsed,
                    name,
                    value,
                    "contained resources are not searched (_containedType)".into(),
                )?;
                apply = false;
            }
            _ => {
                check_links(name)?;
                match criteria.criterion(types, name, value, 0) {
                    Ok(c) => criterion = criterion.and(c),
                    Err(Skip::Unknown(why)) => {
                        ignore(&mut parsed, name, value, why)?;
                        apply = false;
                    }
                    Err(Skip::Bad(error)) => return Err(error),
                }
            }
        }
        if apply {
            if result_parameter && !matches!(base, "_include" | "_revinclude") {
                // The last one counts; links carry that one.
                parsed.applied.retain(|(n, _)| n != name);
            }
            parsed.applied.push((name.to_owned(), value.to_owned()));
        }
    }
    if parsed.summary.is_some() && parsed.elements.is_some() {
        return Err(bad("_summary and _elements cannot be used together"));
    }
    if parsed.summary == Some(Summary::Count) {
        query.count = 0;
        query.total = true;
    }
    query.criterion = criterion;
    parsed.query = query;
    Ok(parsed)
}

/// The criteria of one type, strictly, with no result parameters: the
/// restrictions of SMART v2 scopes (`category=laboratory`) and the conditions
/// of conditional interactions.
pub fn criterion_for(
    resource_type: &str,
    pairs: &[(String, String)],
    cx: &SearchContext,
) -> Result<Criterion, ApiError> {
    let types = [resource_type.to_owned()];
    check_types(&types)?;
    let criteria = Criteria::new(cx);
    let mut criterion = Criterion::Always;
    for (name, value) in pairs {
        if value.is_empty() {
            continue;
        }
        let base = name.split(':').next().unwrap_or(name);
        if HANDLED_ELSEWHERE.contains(&base) || RESULT_PARAMETERS.contains(&base) {
            return Err(bad(format!("'{name}' is not a search criterion")));
        }
        check_links(name)?;
        match criteria.criterion(&types, name, value, 0) {
            Ok(c) => criterion = criterion.and(c),
            Err(Skip::Unknown(why)) => return Err(not_supported(why)),
            Err(Skip::Bad(error)) => return Err(error),
        }
    }
    Ok(criterion)
}

/// The types a system search's `_type` parameters list, trimmed, each once,
/// in order; unchecked.
pub fn listed_types(params: &[(String, String)]) -> Vec<String> {
    let mut types: Vec<String> = Vec::new();
    for one in params
        .iter()
        .filter(|(name, _)| name == "_type")
        .flat_map(|(_, value)| value.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
    {
        if !types.iter().any(|t| t == one) {
            types.push(one.to_owned());
        }
    }
    types
}

/// Parses the criteria of a conditional interaction (`identifier=x|y&...`),
/// strictly, and asks for up to two matches: enough to tell 0, 1 and many
/// apart. Among the `_` parameters only `_id` and `_lastUpdated` may be used.
pub fn parse_criteria(
    resource_type: &str,
    criteria: &str,
    cx: &SearchContext,
) -> Result<SearchQuery, ApiError> {
    let pairs = query_pairs(criteria);
    if pairs.iter().all(|(_, v)| v.is_empty()) {
        return Err(bad("a conditional interaction needs search criteria"));
    }
    for (name, _) in &pairs {
        if name.starts_with('_') && !matches!(name.as_str(), "_id" | "_lastUpdated") {
            return Err(bad(format!("'{name}' cannot be used in a condition")));
        }
    }
    Ok(SearchQuery {
        criterion: criterion_for(resource_type, &pairs, cx)?,
        count: 2,
        offset: 0,
        total: false,
        ..SearchQuery::of_type(resource_type)
    })
}

/// Splits a query string (already without `?`) into decoded pairs.
pub fn query_pairs(query: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
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

/// Token values separated by `,` (alternatives), for searches outside the
/// index (the audit trail) (R4 search.html#token).
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

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::invalid(IssueCode::Invalid, message)
}

fn not_supported(message: impl Into<String>) -> ApiError {
    ApiError::invalid(IssueCode::NotSupported, message)
}

fn check_types(types: &[String]) -> Result<(), ApiError> {
    match types.iter().find(|t| !registry::is_resource_type(t)) {
        Some(t) => Err(not_supported(format!("'{t}' is not a resource type"))),
        None => Ok(()),
    }
}

/// Refuses a chain or `_has` deeper than [`MAX_DEPTH`] before looking at it.
fn check_links(name: &str) -> Result<(), ApiError> {
    if links(name) > MAX_DEPTH {
        return Err(bad(format!(
            "'{name}': chains and _has may follow at most {MAX_DEPTH} links"
        )));
    }
    Ok(())
}

/// `_sort=a,-b` (search.html#sort): keys in order, `-` for descending.
fn parse_sort(types: &[String], value: &str) -> Result<Vec<SortKey>, ApiError> {
    let mut keys = Vec::new();
    for key in value.split(',') {
        let (descending, name) = match key.strip_prefix('-') {
            Some(name) => (true, name),
            None => (false, key),
        };
        let by = match name {
            "_id" => SortBy::Id,
            "_lastUpdated" => SortBy::LastUpdated,
            _ if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') =>
            {
                return Err(bad(format!("_sort: '{key}' is not a search parameter")));
            }
            _ => {
                let [resource_type] = types else {
                    return Err(bad(format!(
                        "_sort: a search over several types sorts only by _id or _lastUpdated, not '{name}'"
                    )));
                };
                let param = registry::search_param(resource_type, name)
                    .filter(|p| p.expression.is_some())
                    .ok_or_else(|| {
                        bad(format!(
                            "_sort: '{name}' is not a search parameter of {resource_type}"
                        ))
                    })?;
                let kind = sort_kind(param.kind).ok_or_else(|| {
                    not_supported(format!(
                        "_sort: {} parameters such as '{name}' cannot sort",
                        param.kind.as_str()
                    ))
                })?;
                SortBy::Param {
                    param: param.code.clone(),
                    kind,
                }
            }
        };
        keys.push(SortKey { by, descending });
    }
    Ok(keys)
}

fn parse_summary(value: &str) -> Result<Summary, ApiError> {
    Ok(match value {
        "true" => Summary::True,
        "text" => Summary::Text,
        "data" => Summary::Data,
        "count" => Summary::Count,
        "false" => Summary::False,
        other => {
            return Err(bad(format!(
                "_summary: '{other}' is not true, text, data, count or false"
            )))
        }
    })
}

/// `_elements=a,b`: top-level element names (`name`, `value[x]`,
/// `valueQuantity`).
fn parse_elements(value: &str) -> Result<Vec<String>, ApiError> {
    value
        .split(',')
        .map(|one| {
            let one = one.trim();
            let stem = one.strip_suffix("[x]").unwrap_or(one);
            let mut chars = stem.chars();
            let valid = chars.next().is_some_and(|c| c.is_ascii_lowercase())
                && chars.all(|c| c.is_ascii_alphanumeric());
            if valid {
                Ok(one.to_owned())
            } else {
                Err(bad(format!("_elements: '{one}' is not an element name")))
            }
        })
        .collect()
}

/// `_include` or `_revinclude` with its modifier: `Type:param`,
/// `Type:param:TargetType`, `Type:*` or `*` (search.html#include).
fn parse_include(
    types: &[String],
    modifier: Option<&str>,
    value: &str,
    reverse: bool,
) -> Result<Vec<Include>, ApiError> {
    let what = if reverse { "_revinclude" } else { "_include" };
    let iterate = match modifier {
        None => false,
        Some("iterate" | "recurse") => true,
        Some(other) => {
            return Err(bad(format!(
                "{what}:{other}: the modifier is :iterate (or :recurse)"
            )))
        }
    };
    if value == "*" {
        return wildcard_include(types, iterate, reverse);
    }
    let mut parts = value.split(':');
    let (Some(source), Some(code), target, None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad(format!(
            "{what}: '{value}' is not Type:parameter or Type:parameter:TargetType"
        )));
    };
    if !registry::is_resource_type(source) {
        return Err(bad(format!("{what}: '{source}' is not a resource type")));
    }
    if !reverse && !iterate && !types.is_empty() && !types.iter().any(|t| t == source) {
        return Err(bad(format!(
            "_include: {source} is not searched here (use _include:iterate)"
        )));
    }
    if code == "*" {
        if target.is_some() {
            return Err(bad(format!("{what}: '{value}' names no parameter")));
        }
        return Ok(vec![Include {
            source_type: source.to_owned(),
            param: None,
            target_type: None,
            iterate,
        }]);
    }
    let param = registry::search_param(source, code)
        .filter(|p| p.kind == SearchParamType::Reference && p.expression.is_some())
        .ok_or_else(|| {
            bad(format!(
                "{what}: '{code}' is not a reference parameter of {source}"
            ))
        })?;
    if let Some(target) = target {
        let allowed = param.target.iter().any(|t| t == target || t == "Resource");
        if !registry::is_resource_type(target) || !allowed {
            return Err(bad(format!(
                "{what}: {source}:{code} cannot refer to a {target}"
            )));
        }
    }
    Ok(vec![Include {
        source_type: source.to_owned(),
        param: Some(param.code.clone()),
        target_type: target.map(str::to_owned),
        iterate,
    }])
}

/// `_include=*`: every reference of the searched types; `_revinclude=*`:
/// every type with a reference parameter that can point at a searched type.
fn wildcard_include(
    types: &[String],
    iterate: bool,
    reverse: bool,
) -> Result<Vec<Include>, ApiError> {
    if types.is_empty() || iterate {
        return Err(not_supported(
            "'*' alone needs the searched types and no :iterate; name the source type (Type:*)",
        ));
    }
    let include = |source: &str| Include {
        source_type: source.to_owned(),
        param: None,
        target_type: None,
        iterate: false,
    };
    if !reverse {
        return Ok(types.iter().map(|t| include(t)).collect());
    }
    Ok(registry::resource_types()
        .filter(|source| {
            registry::search_params(source).iter().any(|p| {
                p.kind == SearchParamType::Reference
                    && p.expression.is_some()
                    && p.target
                        .iter()
                        .any(|t| t == "Resource" || types.contains(t))
            })
        })
        .map(include)
        .collect())
}

#[cfg(test)]
mod tests;
