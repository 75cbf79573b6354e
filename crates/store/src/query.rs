//! SQL text for search and history, shared by both backends. Values are always
//! bound as parameters; only fixed fragments and integers are written into the text.

use std::fmt::Write;

use time::OffsetDateTime;

use crate::{
    Comparator, HistoryPage, HistoryQuery, InstantBound, ResourceVersion, Result, SearchPage,
    SearchQuery, StoreError,
};

/// The few spots where the two SQL dialects differ.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dialect {
    /// `?` for SQLite (`?1`, `?2`, ...), `$` for PostgreSQL (`$1`, `$2`, ...).
    pub placeholder: char,
    /// The predicate for a live (not deleted) row of `current_resources c`;
    /// spelled as in the partial indexes so the planner uses them.
    pub live: &'static str,
    /// PostgreSQL rather than SQLite, where JSON access and collation differ.
    pub postgres: bool,
}

impl Dialect {
    /// The live-row predicate for another alias of `current_resources`.
    pub(crate) fn live_of(&self, alias: &str) -> String {
        if self.postgres {
            format!("NOT {alias}.deleted")
        } else {
            format!("{alias}.deleted = 0")
        }
    }

    /// Makes text order bytewise on PostgreSQL, as it always is on SQLite, so
    /// both backends sort alike whatever the database's collation.
    pub(crate) fn bytewise(&self) -> &'static str {
        if self.postgres {
            " COLLATE \"C\""
        } else {
            ""
        }
    }
}

pub(crate) const SQLITE: Dialect = Dialect {
    placeholder: '?',
    live: "c.deleted = 0",
    postgres: false,
};

pub(crate) const POSTGRES: Dialect = Dialect {
    placeholder: '$',
    live: "NOT c.deleted",
    postgres: true,
};

/// A value to bind; each backend chooses how instants are stored.
#[derive(Debug, Clone)]
pub(crate) enum Param {
    Text(String),
    Instant(OffsetDateTime),
    Real(f64),
}

/// SQL text with its parameters in order.
#[derive(Debug)]
pub(crate) struct Sql {
    pub text: String,
    pub params: Vec<Param>,
    pub dialect: Dialect,
}

impl Sql {
    pub(crate) fn new(dialect: Dialect, text: &str) -> Self {
        Self {
            text: text.to_owned(),
            params: Vec::new(),
            dialect,
        }
    }

    pub(crate) fn push(&mut self, fragment: &str) -> &mut Self {
        self.text.push_str(fragment);
        self
    }

    pub(crate) fn bind(&mut self, param: Param) -> &mut Self {
        self.params.push(param);
        let _ = write!(
            self.text,
            "{}{}",
            self.dialect.placeholder,
            self.params.len()
        );
        self
    }
}

/// Columns of a version row, in the order the backends decode them.
pub(crate) const VERSION_COLUMNS: &str =
    "v.seq, v.resource_type, v.id, v.version, v.last_updated, v.change, v.body";

/// Stored instants have microsecond precision; a bound finer than that is
/// rounded so that the comparison keeps its meaning.
pub(crate) fn instant_bound(sql: &mut Sql, column: &str, bound: &InstantBound) {
    let micros = bound.instant.microsecond();
    let truncated = bound
        .instant
        .replace_microsecond(micros)
        .unwrap_or(bound.instant);
    let finer = truncated != bound.instant;
    let operator = match (bound.comparator, finer) {
        (Comparator::Lt, false) => " < ",
        (Comparator::Lt, true) | (Comparator::Le, _) => " <= ",
        (Comparator::Gt, _) | (Comparator::Ge, true) => " > ",
        (Comparator::Ge, false) => " >= ",
    };
    sql.push(" AND ")
        .push(column)
        .push(operator)
        .bind(Param::Instant(truncated));
}

/// The page query and, when asked for, the count query of a history.
pub(crate) fn history(dialect: Dialect, query: &HistoryQuery) -> Result<(Sql, Option<Sql>)> {
    let mut page = Sql::new(
        dialect,
        &format!("SELECT {VERSION_COLUMNS} FROM resource_versions v"),
    );
    history_criteria(&mut page, query)?;
    if let Some(before) = query.before {
        let _ = write!(page.text, " AND v.seq < {before}");
    }
    page.push(" ORDER BY v.seq DESC");
    if query.filter.is_some() {
        return Ok((page, None));
    }
    let _ = write!(page.text, " LIMIT {}", u64::from(query.count) + 1);

    let count = if query.total {
        let mut count = Sql::new(dialect, "SELECT COUNT(*) FROM resource_versions v");
        history_criteria(&mut count, query)?;
        Some(count)
    } else {
        None
    };
    Ok((page, count))
}

fn history_criteria(sql: &mut Sql, query: &HistoryQuery) -> Result<()> {
    sql.push(" WHERE 1 = 1");
    match (&query.resource_type, &query.id) {
        (Some(resource_type), id) => {
            sql.push(" AND v.resource_type = ")
                .bind(Param::Text(resource_type.clone()));
            if let Some(id) = id {
                sql.push(" AND v.id = ").bind(Param::Text(id.clone()));
            }
        }
        (None, Some(_)) => {
            return Err(StoreError::Unsupported(
                "an instance history needs a resource type".into(),
            ))
        }
        (None, None) => {}
    }
    if let Some(since) = query.since {
        instant_bound(
            sql,
            "v.last_updated",
            &InstantBound {
                comparator: Comparator::Ge,
                instant: since,
            },
        );
    }
    if let Some(at) = query.at {
        // Current at some moment of [at, at_until): changed before the period ends,
        // and no later version of the same resource was changed by its start.
        let end = match query.at_until {
            Some(until) => InstantBound {
                comparator: Comparator::Lt,
                instant: until,
            },
            None => InstantBound {
                comparator: Comparator::Le,
                instant: at,
            },
        };
        instant_bound(sql, "v.last_updated", &end);
        let at = InstantBound {
            comparator: Comparator::Le,
            instant: at,
        };
        sql.push(
            " AND NOT EXISTS (SELECT 1 FROM resource_versions n \
             WHERE n.resource_type = v.resource_type AND n.id = v.id AND n.version > v.version",
        );
        instant_bound(sql, "n.last_updated", &at);
        sql.push(")");
    }
    Ok(())
}

/// The total a page already shows: when the page query found every match past
/// its offset (no more than a page) and the offset lies within the matches,
/// the total is the offset plus what was found, and no count query is needed.
pub(crate) fn total_shown_by_page(query: &SearchQuery, found: usize) -> Option<u64> {
    let found = found as u64;
    let whole = query.count > 0 && query.filter.is_none() && found <= u64::from(query.count);
    (whole && (query.offset == 0 || found > 0)).then_some(query.offset + found)
}

/// Cuts the fetched rows (one more than the page size, to learn whether more
/// follow) into a search page.
pub(crate) fn search_page(
    query: &SearchQuery,
    mut rows: Vec<ResourceVersion>,
    mut total: Option<u64>,
) -> SearchPage {
    if let Some(filter) = &query.filter {
        // Every candidate was fetched in order: filter, count, then cut the page.
        rows.retain(|row| row.resource.as_ref().is_some_and(|r| filter.admits(r)));
        if query.total {
            total = Some(rows.len() as u64);
        }
        let skip = usize::try_from(query.offset).unwrap_or(usize::MAX);
        rows.drain(..skip.min(rows.len()));
        let limit = query.count as usize;
        let more = rows.len() > limit;
        rows.truncate(limit);
        return SearchPage {
            resources: rows,
            total,
            more,
        };
    }
    let limit = query.count as usize;
    let more = if query.count > 0 {
        rows.len() > limit
    } else {
        // Nothing was fetched; more follow exactly when anything is past the offset.
        total.is_some_and(|total| total > query.offset)
    };
    rows.truncate(limit);
    SearchPage {
        resources: rows,
        total,
        more,
    }
}

/// Cuts the fetched `(seq, version)` rows (one more than the page size) into a
/// history page whose `next` is the last shown position.
pub(crate) fn history_page(
    query: &HistoryQuery,
    mut rows: Vec<(i64, ResourceVersion)>,
    mut total: Option<u64>,
) -> HistoryPage {
    if let Some(filter) = &query.filter {
        rows.retain(|(_, v)| v.resource.as_ref().is_some_and(|r| filter.admits(r)));
        // With a cursor the rows start mid-way, so the whole count is unknown here.
        if query.total && query.before.is_none() {
            total = Some(rows.len() as u64);
        }
    }
    let limit = query.count as usize;
    let next = if rows.len() > limit && limit > 0 {
        Some(rows[limit - 1].0)
    } else {
        None
    };
    rows.truncate(limit);
    HistoryPage {
        versions: rows.into_iter().map(|(_, version)| version).collect(),
        total,
        next,
    }
}

#[cfg(test)]
mod tests {
    use super::total_shown_by_page;
    use crate::SearchQuery;

    fn page(count: u32, offset: u64) -> SearchQuery {
        SearchQuery {
            count,
            offset,
            total: true,
            ..SearchQuery::of_type("Observation")
        }
    }

    #[test]
    fn a_first_page_holding_every_match_is_its_own_total() {
        assert_eq!(total_shown_by_page(&page(50, 0), 7), Some(7));
        assert_eq!(total_shown_by_page(&page(50, 0), 0), Some(0));
        assert_eq!(total_shown_by_page(&page(50, 0), 50), Some(50));
    }

    #[test]
    fn a_last_page_adds_its_matches_to_the_offset() {
        assert_eq!(total_shown_by_page(&page(10, 20), 3), Some(23));
    }

    #[test]
    fn a_full_page_an_empty_page_past_the_end_or_a_count_only_query_needs_counting() {
        // One more row than the page size was fetched: more matches follow.
        assert_eq!(total_shown_by_page(&page(50, 0), 51), None);
        // Past the end, nothing says how many matches there were.
        assert_eq!(total_shown_by_page(&page(10, 100), 0), None);
        // `_summary=count` fetches no rows at all.
        assert_eq!(total_shown_by_page(&page(0, 0), 0), None);
    }
}
