//! Search values below the parameter: escapes, prefixes, and the intervals a
//! date or a number covers (search.html#escaping, #prefix, #date, #number).

use haven_model::search_index::{date_range, decimal_range, DATE_MAX, DATE_MIN};
use haven_store::{Comparator, InstantBound, Prefix, Range};
use time::{Duration, OffsetDateTime};

use super::{bad, not_supported};
use crate::error::ApiError;

/// Splits at each `separator` not escaped with a backslash; the pieces keep
/// their escapes (see [`unescape`]).
pub(super) fn split_unescaped(value: &str, separator: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut escaped = false;
    for (i, c) in value.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == separator {
            parts.push(&value[start..i]);
            start = i + c.len_utf8();
        }
    }
    parts.push(&value[start..]);
    parts
}

/// Removes the escapes search.html#escaping defines: `\,`, `\|`, `\$` and
/// `\\`. Any other backslash is kept as written.
pub(super) fn unescape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(&next) = chars.peek() {
                if matches!(next, ',' | '|' | '$' | '\\') {
                    out.push(next);
                    chars.next();
                    continue;
                }
            }
        }
        out.push(c);
    }
    out
}

/// The prefix of a number, date or quantity value and the rest of it; `eq`
/// when there is none. Two lowercase letters that are no prefix are an error:
/// no number or date starts with a letter.
pub(super) fn split_prefix(text: &str) -> Result<(Prefix, &str), ApiError> {
    let bytes = text.as_bytes();
    if bytes.len() < 2 || !bytes[0].is_ascii_lowercase() || !bytes[1].is_ascii_lowercase() {
        return Ok((Prefix::Eq, text));
    }
    let prefix = match &text[..2] {
        "eq" => Prefix::Eq,
        "ne" => Prefix::Ne,
        "gt" => Prefix::Gt,
        "lt" => Prefix::Lt,
        "ge" => Prefix::Ge,
        "le" => Prefix::Le,
        "sa" => Prefix::Sa,
        "eb" => Prefix::Eb,
        "ap" => Prefix::Ap,
        other => {
            return Err(bad(format!(
                "'{other}' is not a search prefix (eq, ne, gt, lt, ge, le, sa, eb, ap)"
            )))
        }
    };
    Ok((prefix, &text[2..]))
}

/// A prefixed date value as the interval its precision covers; for `ap` the
/// interval is widened by a tenth of the distance between the value and
/// `now`, and by at least a day, on each side.
pub(super) fn date_value(
    param: &str,
    text: &str,
    now: OffsetDateTime,
) -> Result<Range<OffsetDateTime>, ApiError> {
    let (prefix, date) = split_prefix(text)?;
    let (low, high) = parse_date_range(date)
        .ok_or_else(|| bad(format!("{param}: '{date}' is not a date or dateTime")))?;
    let value = low;
    let (low, high) = if prefix == Prefix::Ap {
        let distance: Duration = (low - now).abs();
        let widen = (distance / 10i32).max(Duration::DAY);
        (
            low.checked_sub(widen).map_or(DATE_MIN, |l| l.max(DATE_MIN)),
            high.checked_add(widen)
                .map_or(DATE_MAX, |h| h.min(DATE_MAX)),
        )
    } else {
        (low, high)
    };
    Ok(Range {
        prefix,
        low,
        high,
        value,
    })
}

/// A number (prefix already taken off) as the interval its precision covers
/// and its value; for `ap` the interval is widened to at least a tenth of the
/// value on each side.
pub(super) fn number_value(
    param: &str,
    prefix: Prefix,
    text: &str,
) -> Result<Range<f64>, ApiError> {
    let not_a_number = || bad(format!("{param}: '{text}' is not a number"));
    let (low, high) = decimal_range(text).ok_or_else(not_a_number)?;
    let value: f64 = text.parse().map_err(|_| not_a_number())?;
    let (low, high) = if prefix == Prefix::Ap {
        let tenth = value.abs() / 10.0;
        (low.min(value - tenth), high.max(value + tenth))
    } else {
        (low, high)
    };
    if !(low.is_finite() && high.is_finite() && value.is_finite()) {
        return Err(bad(format!("{param}: '{text}' is out of range")));
    }
    Ok(Range {
        prefix,
        low,
        high,
        value,
    })
}

/// A `_lastUpdated`-style value with its prefix, as bounds on an instant: the
/// value stands for the whole interval its precision covers (R4
/// search.html#date), so `eq2024-01` is all of January and `gt2024-01` starts
/// in February. `ne` and `ap` are not supported here. (History and the audit
/// trail search with it.)
pub fn parse_date_bounds(value: &str) -> Result<Vec<InstantBound>, ApiError> {
    let (prefix, date) = split_prefix(value)?;
    let (low, high) = parse_date_range(date)
        .ok_or_else(|| bad(format!("_lastUpdated: '{date}' is not a date or dateTime")))?;
    let bound = |comparator, instant| InstantBound {
        comparator,
        instant,
    };
    Ok(match prefix {
        Prefix::Eq => vec![bound(Comparator::Ge, low), bound(Comparator::Lt, high)],
        Prefix::Gt | Prefix::Sa => vec![bound(Comparator::Ge, high)],
        Prefix::Ge => vec![bound(Comparator::Ge, low)],
        Prefix::Lt | Prefix::Eb => vec![bound(Comparator::Lt, low)],
        Prefix::Le => vec![bound(Comparator::Lt, high)],
        Prefix::Ne | Prefix::Ap => {
            return Err(not_supported(format!(
                "_lastUpdated: the prefix '{}' is not supported here",
                &value[..2]
            )))
        }
    })
}

/// The half-open interval `[low, high)` in UTC a FHIR date or dateTime covers
/// at its precision ([`haven_model::search_index::date_range`]); a dateTime
/// without a zone is read as UTC. A zone's `+` that arrived as a space (an
/// unencoded query string) is read as `+`.
pub fn parse_date_range(text: &str) -> Option<(OffsetDateTime, OffsetDateTime)> {
    match text.find('T') {
        Some(t) if text[t..].contains(' ') => {
            let (date, time) = text.split_at(t);
            date_range(&format!("{date}{}", time.replacen(' ', "+", 1)))
        }
        _ => date_range(text),
    }
}
