//! Compiles a [`SearchQuery`] to SQL over `current_resources` and the search
//! index tables, on both backends. The caller's access ([`AccessRule`]) is part
//! of the WHERE clause of the query itself and of every nested query (chained
//! targets, `_has` sources), so counts, pages and chains see only what the
//! caller may read. Values are always bound; only table and column names, which
//! come from this file, and integers are written into the text.

use std::fmt::Write;

use time::OffsetDateTime;

use crate::criteria::{Criterion, IndexKind, Prefix, Range, SortBy, StringMatch, UriMatch};
use crate::query::{Dialect, Param, Sql, VERSION_COLUMNS};
use crate::{Access, Result, SearchQuery, StoreError, TypeAccess};

/// How deep criteria may nest (chains, `_has`, access rules within them).
const MAX_DEPTH: usize = 12;

/// The page query and, when asked for, the count query of a search.
pub(crate) fn search(dialect: Dialect, query: &SearchQuery) -> Result<(Sql, Option<Sql>)> {
    let columns = format!(
        "{VERSION_COLUMNS} FROM {{from}} JOIN resource_versions v \
         ON v.resource_type = c.resource_type AND v.id = c.id AND v.version = c.version"
    );
    let mut page = ordered(dialect, query, &columns)?;
    // A content filter pages and counts after filtering, so every candidate is read.
    if query.filter.is_some() {
        return Ok((page, None));
    }
    let _ = write!(
        page.text,
        " LIMIT {} OFFSET {}",
        u64::from(query.count) + 1,
        query.offset
    );
    let count = if query.total {
        let mut count = Compiler::new(dialect, query, "SELECT COUNT(*) FROM current_resources c");
        count.root(query)?;
        Some(count.sql)
    } else {
        None
    };
    Ok((page, count))
}

/// The `(type, id)` of the first `limit` matches, in the search's order.
pub(crate) fn keys(dialect: Dialect, query: &SearchQuery, limit: u32) -> Result<Sql> {
    let mut keys = ordered(dialect, query, "c.resource_type, c.id FROM {from}")?;
    let _ = write!(keys.text, " LIMIT {limit}");
    Ok(keys)
}

/// `SELECT <select> WHERE <criteria> ORDER BY <sort>`, where `{from}` in
/// `select` names the matches. With criteria, the matches are found first, in a
/// materialized step, and only then sorted: a planner given ORDER BY with LIMIT
/// prefers to walk every resource of the type in index order and test each,
/// which grows with the data instead of with the matches. Access that only
/// leaves resources out (what labels and Consents hide) is the opposite case:
/// nearly every resource matches, so the walk in order stops after a page.
fn ordered(dialect: Dialect, query: &SearchQuery, select: &str) -> Result<Sql> {
    let selective = query.criterion != Criterion::Always || access_narrows(query);
    if !selective {
        let mut plain = Compiler::new(
            dialect,
            query,
            &format!("SELECT {}", select.replace("{from}", "current_resources c")),
        );
        plain.root(query)?;
        plain.order(query)?;
        return Ok(plain.sql);
    }
    let mut staged = Compiler::new(
        dialect,
        query,
        "WITH m AS MATERIALIZED (SELECT c.resource_type, c.id FROM current_resources c",
    );
    staged.root(query)?;
    let from = "m JOIN current_resources c ON c.resource_type = m.resource_type AND c.id = m.id";
    let _ = write!(
        staged.sql.text,
        ") SELECT {}",
        select.replace("{from}", from)
    );
    staged.order(query)?;
    Ok(staged.sql)
}

/// Whether `text`, which follows an opening parenthesis, closes it with its
/// last character and not before. Values are bound, so the only quotes are
/// this file's own literals.
fn closes_at_end(text: &str) -> bool {
    let mut open = 1_usize;
    let mut quoted = false;
    for (at, ch) in text.char_indices() {
        match ch {
            '\'' => quoted = !quoted,
            '(' if !quoted => open += 1,
            ')' if !quoted => {
                open -= 1;
                if open == 0 {
                    return at + 1 == text.len();
                }
            }
            _ => {}
        }
    }
    false
}

/// Whether the query's access admits only some resources of a type (a patient's
/// compartment, say), rather than all but those it excludes.
fn access_narrows(query: &SearchQuery) -> bool {
    let Some(access) = &query.access else {
        return false;
    };
    let admits_few = |resource_type: &str| match access.for_type(resource_type) {
        TypeAccess::All | TypeAccess::Nothing => false,
        TypeAccess::Only(criterion) => narrows(&criterion),
    };
    if query.types.is_empty() {
        haven_model::registry::resource_types().any(admits_few)
    } else {
        query.types.iter().any(|t| admits_few(t))
    }
}

/// Whether a criterion keeps only some resources: anything but an exclusion.
fn narrows(criterion: &Criterion) -> bool {
    match criterion {
        Criterion::Always | Criterion::Not(_) => false,
        Criterion::All(list) => list.iter().any(narrows),
        Criterion::Any(list) => list.iter().all(narrows),
        _ => true,
    }
}

/// Where a value criterion reads its columns: a row of an index table, or one
/// part of a composite's JSON array.
enum Source<'a> {
    Row(&'a str),
    Part(&'a str, usize),
}

#[derive(Clone, Copy)]
enum ColumnType {
    Text,
    Real,
    Instant,
}

struct Compiler<'q> {
    sql: Sql,
    access: Option<&'q Access>,
    local_base: Option<&'q str>,
    aliases: u32,
    /// Set while compiling a conjunct after the one that drives: its index
    /// rows are probed per candidate (a correlated EXISTS) rather than listed
    /// in full (an IN list), whose size grows with the database.
    probe: bool,
}

impl<'q> Compiler<'q> {
    fn new(dialect: Dialect, query: &'q SearchQuery, head: &str) -> Self {
        Self {
            sql: Sql::new(dialect, head),
            access: query.access.as_ref(),
            local_base: query.local_base.as_deref(),
            aliases: 0,
            probe: false,
        }
    }

    /// The stored reference in `column` points at this server: relative, or
    /// absolute under its base.
    fn local(&mut self, column: &str) {
        match self.local_base {
            None => {
                let _ = write!(self.sql.text, "{column} IS NULL");
            }
            Some(base) => {
                let length = base.chars().count();
                let _ = write!(
                    self.sql.text,
                    "({column} IS NULL OR substr({column}, 1, {length}) = "
                );
                self.text(base);
                self.push(")");
            }
        }
    }

    fn alias(&mut self, prefix: &str) -> String {
        self.aliases += 1;
        format!("{prefix}{}", self.aliases)
    }

    fn push(&mut self, text: &str) {
        self.sql.push(text);
    }

    fn text(&mut self, value: &str) {
        self.sql.bind(Param::Text(value.to_owned()));
    }

    fn real(&mut self, value: f64) {
        self.sql.bind(Param::Real(value));
    }

    /// The WHERE clause of the outermost query over `current_resources c`.
    fn root(&mut self, query: &SearchQuery) -> Result<()> {
        let live = self.sql.dialect.live;
        self.push(" WHERE ");
        self.push(live);
        self.push(" AND ");
        self.types_with_access("c", &query.types, 0)?;
        self.push(" AND ");
        let single = match query.types.as_slice() {
            [one] => Some(one.as_str()),
            _ => None,
        };
        self.criterion(&query.criterion, "c", single, 0)
    }

    /// Restricts `alias` to the types (all, when empty) and, per type, to what
    /// the access admits.
    fn types_with_access(&mut self, alias: &str, types: &[String], depth: usize) -> Result<()> {
        let Some(access) = self.access else {
            match types {
                [] => self.push("1 = 1"),
                [one] => {
                    let _ = write!(self.sql.text, "{alias}.resource_type = ");
                    self.text(one);
                }
                many => {
                    let _ = write!(self.sql.text, "{alias}.resource_type IN (");
                    self.list(many);
                    self.push(")");
                }
            }
            return Ok(());
        };
        let types: Vec<String> = if types.is_empty() {
            haven_model::registry::resource_types()
                .map(str::to_owned)
                .collect()
        } else {
            types.to_vec()
        };
        let mut open = Vec::new();
        let mut restricted = Vec::new();
        for resource_type in types {
            match access.for_type(&resource_type) {
                TypeAccess::All => open.push(resource_type),
                TypeAccess::Only(criterion) => restricted.push((resource_type, criterion)),
                TypeAccess::Nothing => {}
            }
        }
        if open.is_empty() && restricted.is_empty() {
            self.push("1 = 0");
            return Ok(());
        }
        self.push("(");
        let mut first = true;
        if !open.is_empty() {
            let _ = write!(self.sql.text, "{alias}.resource_type IN (");
            self.list(&open);
            self.push(")");
            first = false;
        }
        for (resource_type, criterion) in restricted {
            if !first {
                self.push(" OR ");
            }
            first = false;
            let _ = write!(self.sql.text, "({alias}.resource_type = ");
            self.text(&resource_type);
            self.push(" AND ");
            self.criterion(&criterion, alias, Some(&resource_type), depth + 1)?;
            self.push(")");
        }
        self.push(")");
        Ok(())
    }

    fn list(&mut self, values: &[String]) {
        for (n, value) in values.iter().enumerate() {
            if n > 0 {
                self.push(", ");
            }
            self.text(value);
        }
    }

    /// `criterion` holds for the resource `alias` (of `resource_type` when known).
    fn criterion(
        &mut self,
        criterion: &Criterion,
        alias: &str,
        resource_type: Option<&str>,
        depth: usize,
    ) -> Result<()> {
        if depth > MAX_DEPTH {
            return Err(StoreError::TooComplex(
                "the search criteria nest too deeply".into(),
            ));
        }
        match criterion {
            Criterion::Always => self.push("1 = 1"),
            Criterion::Never => self.push("1 = 0"),
            Criterion::All(all) if all.is_empty() => self.push("1 = 1"),
            Criterion::Any(any) if any.is_empty() => self.push("1 = 0"),
            Criterion::All(list) | Criterion::Any(list) => {
                let joint = if matches!(criterion, Criterion::All(_)) {
                    " AND "
                } else {
                    " OR "
                };
                self.balanced(list, joint, alias, resource_type, depth)?;
            }
            Criterion::Not(inner) => {
                self.push("NOT (");
                self.criterion(inner, alias, resource_type, depth + 1)?;
                self.push(")");
            }
            Criterion::Id(ids) if ids.is_empty() => self.push("1 = 0"),
            Criterion::Id(ids) => {
                let _ = write!(self.sql.text, "{alias}.id IN (");
                self.list(ids);
                self.push(")");
            }
            Criterion::Keys(keys) if keys.is_empty() => self.push("1 = 0"),
            Criterion::Keys(keys) => {
                // One IN list per type: a long OR chain would exceed SQLite's
                // expression depth.
                let mut by_type: Vec<(&str, Vec<String>)> = Vec::new();
                for (key_type, id) in keys {
                    match by_type.iter_mut().find(|(t, _)| t == key_type) {
                        Some((_, ids)) => ids.push(id.clone()),
                        None => by_type.push((key_type, vec![id.clone()])),
                    }
                }
                self.push("(");
                for (n, (key_type, ids)) in by_type.iter().enumerate() {
                    if n > 0 {
                        self.push(" OR ");
                    }
                    let _ = write!(self.sql.text, "({alias}.resource_type = ");
                    self.text(key_type);
                    let _ = write!(self.sql.text, " AND {alias}.id IN (");
                    self.list(ids);
                    self.push("))");
                }
                self.push(")");
            }
            Criterion::ReferencesAny {
                params,
                target_type,
                target_ids,
            } => {
                if params.is_empty() || target_ids.is_empty() {
                    self.push("1 = 0");
                    return Ok(());
                }
                let row = self.alias("x");
                let close = match resource_type {
                    Some(own) if !self.probe => {
                        let _ = write!(
                            self.sql.text,
                            "{alias}.id IN (SELECT {row}.id FROM search_reference {row} WHERE {row}.resource_type = "
                        );
                        self.text(own);
                        ")"
                    }
                    _ => {
                        let probe = self.probe_from("search_reference", &row);
                        let _ = write!(
                            self.sql.text,
                            "EXISTS (SELECT 1 FROM {probe} WHERE {row}.resource_type = {alias}.resource_type \
                             AND {row}.id = {alias}.id"
                        );
                        self.probe_close()
                    }
                };
                let _ = write!(self.sql.text, " AND {row}.param IN (");
                self.list(params);
                let _ = write!(self.sql.text, ") AND {row}.target_type = ");
                self.text(target_type);
                let _ = write!(self.sql.text, " AND {row}.target_id IN (");
                self.list(target_ids);
                self.push(") AND ");
                self.local(&format!("{row}.url"));
                self.push(close);
            }
            Criterion::ReferenceOutside { param, types } => {
                let (row, close) =
                    self.member_open(alias, resource_type, "search_reference", param);
                let _ = write!(self.sql.text, "({row}.target_type IS NULL");
                if !types.is_empty() {
                    let _ = write!(self.sql.text, " OR {row}.target_type NOT IN (");
                    self.list(types);
                    self.push(")");
                }
                // An absolute reference to another server reaches nothing here.
                let _ = write!(self.sql.text, " OR NOT ");
                self.local(&format!("{row}.url"));
                self.push(")");
                self.push(close);
            }
            Criterion::TokenOutside {
                param,
                system,
                codes,
            } => {
                let (row, close) = self.member_open(alias, resource_type, "search_token", param);
                let _ = write!(self.sql.text, "{row}.system = ");
                self.text(system);
                let _ = write!(self.sql.text, " AND {row}.code IS NOT NULL");
                if !codes.is_empty() {
                    let _ = write!(self.sql.text, " AND {row}.code NOT IN (");
                    self.list(codes);
                    self.push(")");
                }
                self.push(close);
            }
            Criterion::CompartmentOutside(patients) => {
                let (row, close) =
                    self.member_open(alias, resource_type, "search_compartment", "Patient");
                if patients.is_empty() {
                    self.push("1 = 1");
                } else {
                    let _ = write!(self.sql.text, "{row}.target_id NOT IN (");
                    self.list(patients);
                    self.push(")");
                }
                self.push(close);
            }
            Criterion::LastUpdated(range) => {
                self.instant_point(&format!("{alias}.last_updated"), range);
            }
            Criterion::PatientCompartment(patient) if resource_type.is_none() => {
                // Over several types, drive from the patient's members.
                let row = self.alias("x");
                let _ = write!(
                    self.sql.text,
                    "({alias}.resource_type, {alias}.id) IN (SELECT {row}.resource_type, {row}.id \
                     FROM search_compartment {row} WHERE {row}.param = 'Patient' AND {row}.target_id = "
                );
                self.text(patient);
                self.push(")");
            }
            Criterion::PatientCompartment(patient) => {
                let (row, close) =
                    self.member_open(alias, resource_type, "search_compartment", "Patient");
                let _ = write!(self.sql.text, "{row}.target_id = ");
                self.text(patient);
                self.push(close);
            }
            Criterion::Missing {
                param,
                kind,
                missing,
            } => {
                if *missing {
                    self.push("NOT ");
                }
                let (row, close) =
                    self.member_open(alias, resource_type, table_of_kind(*kind), param);
                let _ = write!(self.sql.text, "{row}.param IS NOT NULL{close}");
            }
            Criterion::Composite { param, parts } => {
                let (row, close) =
                    self.member_open(alias, resource_type, "search_composite", param);
                self.push("1 = 1");
                for (index, part) in parts.iter().enumerate() {
                    self.push(" AND ");
                    self.value(part, &Source::Part(&row, index))?;
                }
                self.push(close);
            }
            Criterion::Chain { param, targets } => {
                let (row, close) =
                    self.member_open(alias, resource_type, "search_reference", param);
                // The targets are alternatives: parenthesized, so that OR does not
                // escape the row's type, id and parameter conditions before them.
                self.push("(");
                if targets.is_empty() {
                    self.push("1 = 0");
                }
                for (n, (target_type, inner)) in targets.iter().enumerate() {
                    if n > 0 {
                        self.push(" OR ");
                    }
                    let target = self.alias("t");
                    self.push("(");
                    self.local(&format!("{row}.url"));
                    let _ = write!(self.sql.text, " AND {row}.target_type = ");
                    self.text(target_type);
                    let _ = write!(
                        self.sql.text,
                        " AND {row}.target_id IN (SELECT {target}.id FROM current_resources {target} WHERE {} AND ",
                        self.sql.dialect.live_of(&target)
                    );
                    self.nested(|this| {
                        this.types_with_access(
                            &target,
                            std::slice::from_ref(target_type),
                            depth + 1,
                        )?;
                        this.push(" AND ");
                        this.criterion(inner, &target, Some(target_type), depth + 1)
                    })?;
                    self.push("))");
                }
                self.push(")");
                self.push(close);
            }
            Criterion::Has {
                source_type,
                param,
                criterion: inner,
            } => {
                let row = self.alias("r");
                let source = self.alias("s");
                let close = match resource_type {
                    Some(own) if !self.probe => {
                        let _ = write!(self.sql.text, "{alias}.id IN (SELECT {row}.target_id");
                        self.has_from(&row, &source, source_type, param);
                        let _ = write!(self.sql.text, " AND {row}.target_type = ");
                        self.text(own);
                        ")"
                    }
                    _ => {
                        self.push("EXISTS (SELECT 1");
                        self.has_from(&row, &source, source_type, param);
                        let _ = write!(
                            self.sql.text,
                            " AND {row}.target_type = {alias}.resource_type AND {row}.target_id = {alias}.id"
                        );
                        self.probe_close()
                    }
                };
                self.push(" AND ");
                self.local(&format!("{row}.url"));
                let _ = write!(self.sql.text, " AND {}", self.sql.dialect.live_of(&source));
                self.push(" AND ");
                self.nested(|this| {
                    this.types_with_access(&source, std::slice::from_ref(source_type), depth + 1)?;
                    this.push(" AND ");
                    this.criterion(inner, &source, Some(source_type), depth + 1)
                })?;
                self.push(close);
            }
            value => {
                let Some((table, param)) = table_of(value) else {
                    return Err(StoreError::Unsupported(format!(
                        "search criterion {value:?}"
                    )));
                };
                let (row, close) = self.member_open(alias, resource_type, table, param);
                self.value(value, &Source::Row(&row))?;
                self.push(close);
            }
        }
        Ok(())
    }

    /// Writes a list of criteria joined by `joint`, as a balanced tree of
    /// parentheses: a flat chain of a thousand ORs exceeds SQLite's
    /// expression depth.
    fn balanced(
        &mut self,
        list: &[Criterion],
        joint: &str,
        alias: &str,
        resource_type: Option<&str>,
        depth: usize,
    ) -> Result<()> {
        const FLAT: usize = 32;
        let conjunction = joint == " AND ";
        self.push("(");
        if list.len() <= FLAT {
            let mut order: Vec<&Criterion> = list.iter().collect();
            if conjunction {
                // The conjunct likeliest to match few rows drives; the others
                // are tested against its matches only.
                order.sort_by_key(|c| drive_rank(c));
            }
            let outer = self.probe;
            let start = self.sql.text.len();
            let mut branches = Vec::with_capacity(order.len());
            for (n, one) in order.into_iter().enumerate() {
                if n > 0 {
                    self.push(joint);
                    self.probe = outer || conjunction;
                }
                let from = self.sql.text.len();
                self.criterion(one, alias, resource_type, depth + 1)?;
                branches.push(from..self.sql.text.len());
            }
            self.probe = outer;
            if !conjunction && branches.len() > 1 {
                self.merge_id_lists(alias, start, &branches);
            }
        } else {
            let (left, right) = list.split_at(list.len() / 2);
            self.balanced(left, joint, alias, resource_type, depth)?;
            self.push(joint);
            let outer = self.probe;
            self.probe = outer || conjunction;
            self.balanced(right, joint, alias, resource_type, depth)?;
            self.probe = outer;
        }
        self.push(")");
        Ok(())
    }

    /// Rewrites a disjunction written from `start` whose every branch is
    /// `alias.id IN (SELECT ...)` as one `alias.id IN (<list> UNION ALL <list> ...)`.
    /// A planner can look the matches of one list up by key, but meets an OR
    /// of lists by testing every resource of the type against each.
    fn merge_id_lists(&mut self, alias: &str, start: usize, branches: &[std::ops::Range<usize>]) {
        let head = format!("{alias}.id IN (");
        let mut lists = Vec::with_capacity(branches.len());
        for branch in branches {
            let text = &self.sql.text[branch.clone()];
            match text.strip_prefix(&head) {
                Some(rest) if rest.starts_with("SELECT ") && closes_at_end(rest) => {
                    lists.push(&rest[..rest.len() - 1]);
                }
                _ => return,
            }
        }
        let merged = format!("{head}{})", lists.join(" UNION ALL "));
        self.sql.text.truncate(start);
        self.sql.text.push_str(&merged);
    }

    /// `table row` for a probe of one resource's rows. SQLite, without
    /// statistics, rates the value index (type, param, value) as good as the
    /// resource index (type, id) and would scan every row of the parameter
    /// per candidate; it is told which index to use.
    fn probe_from(&self, table: &str, row: &str) -> String {
        if self.sql.dialect.postgres {
            format!("{table} {row}")
        } else {
            format!("{table} {row} INDEXED BY {table}_resource")
        }
    }

    /// Compiles criteria over another resource (a chain's target, a `_has`
    /// source): they drive their own subquery.
    fn nested(&mut self, compile: impl FnOnce(&mut Self) -> Result<()>) -> Result<()> {
        let outer = std::mem::replace(&mut self.probe, false);
        let result = compile(self);
        self.probe = outer;
        result
    }

    /// The FROM and first conditions of a `_has` subquery over references.
    fn has_from(&mut self, row: &str, source: &str, source_type: &str, param: &str) {
        let _ = write!(
            self.sql.text,
            " FROM search_reference {row} JOIN current_resources {source} \
             ON {source}.resource_type = {row}.resource_type AND {source}.id = {row}.id \
             WHERE {row}.resource_type = "
        );
        self.text(source_type);
        let _ = write!(self.sql.text, " AND {row}.param = ");
        self.text(param);
    }

    /// Opens "the resource has a row of `table` for `param` such that ...":
    /// the caller writes the row condition and then the closing returned. With
    /// the type known, the subquery drives from the value index.
    fn member_open(
        &mut self,
        alias: &str,
        resource_type: Option<&str>,
        table: &str,
        param: &str,
    ) -> (String, &'static str) {
        let row = self.alias("x");
        let close = match resource_type {
            Some(own) if !self.probe => {
                let _ = write!(
                    self.sql.text,
                    "{alias}.id IN (SELECT {row}.id FROM {table} {row} WHERE {row}.resource_type = "
                );
                self.text(own);
                ")"
            }
            _ => {
                let probe = self.probe_from(table, &row);
                let _ = write!(
                    self.sql.text,
                    "EXISTS (SELECT 1 FROM {probe} WHERE {row}.resource_type = {alias}.resource_type \
                     AND {row}.id = {alias}.id"
                );
                self.probe_close()
            }
        };
        let _ = write!(self.sql.text, " AND {row}.param = ");
        self.text(param);
        self.push(" AND ");
        (row, close)
    }

    /// What closes a probe's `EXISTS (SELECT ...`. PostgreSQL turns an EXISTS
    /// into a join, and in the plan it keeps for any values (after five runs of
    /// a prepared statement) it guesses one row per value, so the join may read
    /// every row of a value once per candidate (a code of 500 Observations: 50
    /// ms instead of 1.6). `OFFSET 0` keeps the probe a subquery, run per
    /// candidate through the resource index, as a probe is meant to be.
    fn probe_close(&self) -> &'static str {
        if self.sql.dialect.postgres {
            " OFFSET 0)"
        } else {
            ")"
        }
    }

    fn column(&self, source: &Source<'_>, name: &str, kind: ColumnType) -> String {
        match source {
            Source::Row(row) => format!("{row}.{name}"),
            Source::Part(row, index) if self.sql.dialect.postgres => match kind {
                ColumnType::Text => format!("({row}.parts->{index}->>'{name}')"),
                ColumnType::Real => format!("(({row}.parts->{index}->>'{name}')::float8)"),
                ColumnType::Instant => {
                    format!("(({row}.parts->{index}->>'{name}')::timestamptz)")
                }
            },
            Source::Part(row, index) => format!("json_extract({row}.parts, '$[{index}].{name}')"),
        }
    }

    /// The condition one index row (or composite part) meets for a value criterion.
    fn value(&mut self, criterion: &Criterion, source: &Source<'_>) -> Result<()> {
        match criterion {
            Criterion::String { value, how, .. } => match how {
                StringMatch::StartsWith => {
                    let column = self.column(source, "normalized", ColumnType::Text);
                    let _ = write!(self.sql.text, "{column} LIKE ");
                    self.text(&format!("{}%", escape_like(value)));
                    self.push(" ESCAPE '\\'");
                }
                StringMatch::Contains => {
                    let column = self.column(source, "normalized", ColumnType::Text);
                    let _ = write!(self.sql.text, "{column} LIKE ");
                    self.text(&format!("%{}%", escape_like(value)));
                    self.push(" ESCAPE '\\'");
                }
                StringMatch::Exact => {
                    let column = self.column(source, "exact", ColumnType::Text);
                    let _ = write!(self.sql.text, "{column} = ");
                    self.text(value);
                }
            },
            Criterion::Token { system, code, .. } => {
                let (system_column, code_column) = (
                    self.column(source, "system", ColumnType::Text),
                    self.column(source, "code", ColumnType::Text),
                );
                self.push("1 = 1");
                match system.as_deref() {
                    Some("") => {
                        let _ = write!(self.sql.text, " AND {system_column} IS NULL");
                    }
                    Some(system) => {
                        let _ = write!(self.sql.text, " AND {system_column} = ");
                        self.text(system);
                    }
                    None => {}
                }
                if let Some(code) = code {
                    let _ = write!(self.sql.text, " AND {code_column} = ");
                    self.text(code);
                }
            }
            Criterion::TokenText { text: wanted, .. } => {
                let column = self.column(source, "text", ColumnType::Text);
                let escaped = escape_like(wanted);
                let _ = write!(self.sql.text, "({column} LIKE ");
                self.text(&format!("{escaped}%"));
                let _ = write!(self.sql.text, " ESCAPE '\\' OR {column} LIKE ");
                self.text(&format!("% {escaped}%"));
                self.push(" ESCAPE '\\')");
            }
            Criterion::TokenOfType {
                type_system,
                type_code,
                value,
                ..
            } => {
                let (s, c, v) = (
                    self.column(source, "type_system", ColumnType::Text),
                    self.column(source, "type_code", ColumnType::Text),
                    self.column(source, "value", ColumnType::Text),
                );
                let _ = write!(self.sql.text, "{s} = ");
                self.text(type_system);
                let _ = write!(self.sql.text, " AND {c} = ");
                self.text(type_code);
                let _ = write!(self.sql.text, " AND {v} = ");
                self.text(value);
            }
            Criterion::Reference {
                target_type,
                target_id,
                url,
                version,
                ..
            } => {
                self.push("1 = 1");
                for (name, wanted) in [
                    ("target_type", target_type),
                    ("target_id", target_id),
                    ("url", url),
                    ("version", version),
                ] {
                    if let Some(wanted) = wanted {
                        let column = self.column(source, name, ColumnType::Text);
                        let _ = write!(self.sql.text, " AND {column} = ");
                        self.text(wanted);
                    }
                }
                if url.is_none() && (target_type.is_some() || target_id.is_some()) {
                    // A relative search value means a resource on this server;
                    // an absolute reference with the same type and id may be
                    // another server's.
                    let column = self.column(source, "url", ColumnType::Text);
                    self.push(" AND ");
                    self.local(&column);
                }
            }
            Criterion::Date { range, .. } => {
                let low = self.column(source, "low", ColumnType::Instant);
                let high = self.column(source, "high", ColumnType::Instant);
                self.interval(&low, &high, range);
            }
            Criterion::Number { range, .. } => {
                let low = self.column(source, "low", ColumnType::Real);
                let high = self.column(source, "high", ColumnType::Real);
                self.point(&format!("(({low} + {high}) / 2)"), range);
            }
            Criterion::Quantity {
                range,
                system,
                code,
                ..
            } => {
                let low = self.column(source, "value_low", ColumnType::Real);
                let high = self.column(source, "value_high", ColumnType::Real);
                let point = format!("((COALESCE({low}, {high}) + COALESCE({high}, {low})) / 2)");
                self.point(&point, range);
                let (system_column, code_column, unit_column) = (
                    self.column(source, "system", ColumnType::Text),
                    self.column(source, "code", ColumnType::Text),
                    self.column(source, "unit", ColumnType::Text),
                );
                match (system.as_deref().filter(|s| !s.is_empty()), code) {
                    (Some(system), code) => {
                        let _ = write!(self.sql.text, " AND {system_column} = ");
                        self.text(system);
                        if let Some(code) = code {
                            let _ = write!(self.sql.text, " AND {code_column} = ");
                            self.text(code);
                        }
                    }
                    (None, Some(code)) => {
                        let _ = write!(self.sql.text, " AND ({code_column} = ");
                        self.text(code);
                        let _ = write!(self.sql.text, " OR {unit_column} = ");
                        self.text(code);
                        self.push(")");
                    }
                    (None, None) => {}
                }
            }
            Criterion::Uri { uri, how, .. } => {
                let column = self.column(source, "uri", ColumnType::Text);
                match how {
                    UriMatch::Exact => {
                        let _ = write!(self.sql.text, "{column} = ");
                        self.text(uri);
                    }
                    UriMatch::Below => {
                        let length = uri.chars().count();
                        let _ = write!(self.sql.text, "substr({column}, 1, {length}) = ");
                        self.text(uri);
                    }
                    UriMatch::Above => {
                        let _ = write!(self.sql.text, "length({column}) > 0 AND substr(CAST(");
                        self.text(uri);
                        let _ = write!(self.sql.text, " AS TEXT), 1, length({column})) = {column}");
                    }
                }
            }
            other => {
                return Err(StoreError::Unsupported(format!(
                    "{other:?} inside a composite"
                )))
            }
        }
        Ok(())
    }

    /// Writes `NOT? (column operator value AND ...)`.
    fn conditions<T: Copy>(
        &mut self,
        negate: bool,
        conditions: &[(&str, &str, T)],
        bind: fn(&mut Self, T),
    ) {
        if negate {
            self.push("NOT ");
        }
        self.push("(");
        for (n, (column, operator, value)) in conditions.iter().enumerate() {
            if n > 0 {
                self.push(" AND ");
            }
            let _ = write!(self.sql.text, "{column} {operator} ");
            bind(self, *value);
        }
        self.push(")");
    }

    /// A date interval `[low, high)` against a search range (search.html#prefix).
    fn interval(&mut self, low: &str, high: &str, range: &Range<OffsetDateTime>) {
        let (negate, conditions): (bool, Vec<(&str, &str, OffsetDateTime)>) = match range.prefix {
            Prefix::Eq => (
                false,
                vec![(low, ">=", range.low), (high, "<=", range.high)],
            ),
            Prefix::Ne => (true, vec![(low, ">=", range.low), (high, "<=", range.high)]),
            Prefix::Gt => (false, vec![(high, ">", range.high)]),
            Prefix::Lt => (false, vec![(low, "<", range.low)]),
            Prefix::Ge => (false, vec![(high, ">", range.low)]),
            Prefix::Le => (false, vec![(low, "<", range.high)]),
            Prefix::Sa => (false, vec![(low, ">=", range.high)]),
            Prefix::Eb => (false, vec![(high, "<=", range.low)]),
            Prefix::Ap => (false, vec![(low, "<", range.high), (high, ">", range.low)]),
        };
        self.conditions(negate, &conditions, bind_instant);
    }

    /// An instant that is a point in time (`_lastUpdated`) against a search range.
    fn instant_point(&mut self, column: &str, range: &Range<OffsetDateTime>) {
        let within = vec![(column, ">=", range.low), (column, "<", range.high)];
        let (negate, conditions) = match range.prefix {
            Prefix::Eq | Prefix::Ap => (false, within),
            Prefix::Ne => (true, within),
            Prefix::Gt | Prefix::Sa => (false, vec![(column, ">=", range.high)]),
            Prefix::Lt | Prefix::Eb => (false, vec![(column, "<", range.low)]),
            Prefix::Ge => (false, vec![(column, ">=", range.low)]),
            Prefix::Le => (false, vec![(column, "<", range.high)]),
        };
        self.conditions(negate, &conditions, bind_instant);
    }

    /// A number (the midpoint of its stored precision interval) against a
    /// search range: `eq`/`ne`/`ap` by the search value's interval, the
    /// comparisons by the value itself, with a tolerance for the midpoint's
    /// rounding.
    fn point(&mut self, point: &str, range: &Range<f64>) {
        let tolerance = range.value.abs().max(1.0) * 1e-12;
        let within = vec![
            (point, ">=", range.low - tolerance),
            (point, "<", range.high - tolerance),
        ];
        let (negate, conditions) = match range.prefix {
            Prefix::Eq | Prefix::Ap => (false, within),
            Prefix::Ne => (true, within),
            Prefix::Gt | Prefix::Sa => (false, vec![(point, ">", range.value + tolerance)]),
            Prefix::Lt | Prefix::Eb => (false, vec![(point, "<", range.value - tolerance)]),
            Prefix::Ge => (false, vec![(point, ">=", range.value - tolerance)]),
            Prefix::Le => (false, vec![(point, "<=", range.value + tolerance)]),
        };
        self.conditions(negate, &conditions, Self::real);
    }

    /// ORDER BY: the `_sort` keys, then type and id so the order is total.
    fn order(&mut self, query: &SearchQuery) -> Result<()> {
        let bytewise = self.sql.dialect.bytewise();
        self.push(" ORDER BY ");
        if query.sort.is_empty() {
            self.push("c.last_updated ASC, ");
        }
        for key in &query.sort {
            let direction = if key.descending { "DESC" } else { "ASC" };
            match &key.by {
                SortBy::Id => {
                    let _ = write!(self.sql.text, "c.id{bytewise} {direction}, ");
                }
                SortBy::LastUpdated => {
                    let _ = write!(self.sql.text, "c.last_updated {direction}, ");
                }
                SortBy::Param { param, kind } => {
                    let (column, is_text) = match (kind, key.descending) {
                        (IndexKind::String, _) => ("normalized", true),
                        (IndexKind::Token, _) => ("code", true),
                        (IndexKind::Reference, _) => ("target_id", true),
                        (IndexKind::Uri, _) => ("uri", true),
                        (IndexKind::Date, false) => ("low", false),
                        (IndexKind::Date, true) => ("high", false),
                        (IndexKind::Number, _) => ("low", false),
                        (IndexKind::Quantity, _) => ("value_low", false),
                        (IndexKind::Composite, _) => {
                            return Err(StoreError::Unsupported(
                                "sorting by a composite parameter".into(),
                            ))
                        }
                    };
                    let aggregate = if key.descending { "MAX" } else { "MIN" };
                    let row = self.alias("o");
                    let table = table_of_kind(*kind);
                    let collate = if is_text { bytewise } else { "" };
                    let _ = write!(
                        self.sql.text,
                        "(SELECT {aggregate}({row}.{column}{collate}) FROM {table} {row} \
                         WHERE {row}.resource_type = c.resource_type AND {row}.id = c.id AND {row}.param = "
                    );
                    self.text(param);
                    let _ = write!(self.sql.text, ") {direction} NULLS LAST, ");
                }
            }
        }
        let _ = write!(
            self.sql.text,
            "c.resource_type{bytewise} ASC, c.id{bytewise} ASC"
        );
        Ok(())
    }
}

/// The table and parameter of a value criterion.
/// How well a conjunct drives a search (lower is better): references and ids
/// name few resources; codes and strings more; ranges of dates and numbers
/// many; negations and missing values cannot drive at all.
fn drive_rank(criterion: &Criterion) -> u8 {
    match criterion {
        Criterion::Id(_)
        | Criterion::Keys(_)
        | Criterion::ReferencesAny { .. }
        | Criterion::Reference { .. }
        | Criterion::PatientCompartment(_)
        | Criterion::Has { .. } => 0,
        Criterion::Token { .. }
        | Criterion::TokenOfType { .. }
        | Criterion::String { .. }
        | Criterion::Uri { .. }
        | Criterion::Composite { .. }
        | Criterion::Chain { .. } => 1,
        Criterion::Date { .. }
        | Criterion::Number { .. }
        | Criterion::Quantity { .. }
        | Criterion::TokenText { .. }
        | Criterion::LastUpdated(_) => 2,
        _ => 3,
    }
}

fn table_of(criterion: &Criterion) -> Option<(&'static str, &str)> {
    Some(match criterion {
        Criterion::String { param, .. } => ("search_string", param),
        Criterion::Token { param, .. } | Criterion::TokenText { param, .. } => {
            ("search_token", param)
        }
        Criterion::TokenOfType { param, .. } => ("search_token_of_type", param),
        Criterion::Reference { param, .. } => ("search_reference", param),
        Criterion::Date { param, .. } => ("search_date", param),
        Criterion::Number { param, .. } => ("search_number", param),
        Criterion::Quantity { param, .. } => ("search_quantity", param),
        Criterion::Uri { param, .. } => ("search_uri", param),
        _ => return None,
    })
}

fn bind_instant(compiler: &mut Compiler<'_>, value: OffsetDateTime) {
    compiler.sql.bind(Param::Instant(value));
}

fn table_of_kind(kind: IndexKind) -> &'static str {
    match kind {
        IndexKind::String => "search_string",
        IndexKind::Token => "search_token",
        IndexKind::Reference => "search_reference",
        IndexKind::Date => "search_date",
        IndexKind::Number => "search_number",
        IndexKind::Quantity => "search_quantity",
        IndexKind::Uri => "search_uri",
        IndexKind::Composite => "search_composite",
    }
}

/// Escapes LIKE's wildcards (with `\` as the escape character).
fn escape_like(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::query::{POSTGRES, SQLITE};

    #[test]
    fn values_are_bound_and_never_written_into_the_text() {
        let query = SearchQuery {
            types: vec!["Patient".into()],
            criterion: Criterion::String {
                param: "name".into(),
                value: "o'brien; drop table x".into(),
                how: StringMatch::StartsWith,
            },
            count: 10,
            ..SearchQuery::default()
        };
        for dialect in [SQLITE, POSTGRES] {
            let (page, _) = search(dialect, &query).unwrap();
            assert!(!page.text.contains("brien"), "{}", page.text);
            assert_eq!(page.params.len(), 4);
        }
    }

    #[test]
    fn the_most_selective_conjunct_drives_and_the_others_are_probed_per_match() {
        // The code comes first in the query but names far more resources
        // than the patient reference, so the reference drives.
        let query = SearchQuery {
            types: vec!["Observation".into()],
            criterion: Criterion::All(vec![
                Criterion::Token {
                    param: "code".into(),
                    system: Some("http://loinc.org".into()),
                    code: Some("8867-4".into()),
                },
                Criterion::Reference {
                    param: "subject".into(),
                    target_type: Some("Patient".into()),
                    target_id: Some("p1".into()),
                    url: None,
                    version: None,
                },
            ]),
            count: 10,
            ..SearchQuery::default()
        };
        for dialect in [SQLITE, POSTGRES] {
            let (page, _) = search(dialect, &query).unwrap();
            let text = &page.text;
            let reference = text.find("IN (SELECT x").expect("the reference drives");
            assert!(
                text[reference..].starts_with("IN (SELECT x1.id FROM search_reference"),
                "{text}"
            );
            let probe = if dialect.postgres {
                "EXISTS (SELECT 1 FROM search_token x2 WHERE x2.resource_type = c.resource_type AND x2.id = c.id"
            } else {
                "EXISTS (SELECT 1 FROM search_token x2 INDEXED BY search_token_resource \
                 WHERE x2.resource_type = c.resource_type AND x2.id = c.id"
            };
            assert!(text.contains(probe), "{text}");
            // PostgreSQL would make the probe a join, which its plan for any
            // values may run as a scan of the code's rows per candidate.
            let probe_end = if dialect.postgres {
                "x2.code = $8 OFFSET 0)"
            } else {
                "x2.code = ?8)"
            };
            assert!(text.contains(probe_end), "{text}");
        }
    }

    /// Access that admits what the criterion matches.
    #[derive(Debug)]
    pub(crate) struct Admits(pub Criterion);

    impl crate::AccessRule for Admits {
        fn for_type(&self, _: &str) -> TypeAccess {
            TypeAccess::Only(self.0.clone())
        }
    }

    #[test]
    fn only_access_that_admits_few_resources_finds_the_matches_before_sorting() {
        let hidden = Criterion::Token {
            param: "_security".into(),
            system: Some("http://terminology.hl7.org/CodeSystem/v3-Confidentiality".into()),
            code: Some("R".into()),
        };
        let compartment = Criterion::PatientCompartment("p1".into());
        let cases = [
            (Criterion::Not(Box::new(hidden.clone())), false),
            (
                Criterion::All(vec![
                    Criterion::Not(Box::new(hidden.clone())),
                    Criterion::Always,
                ]),
                false,
            ),
            (compartment.clone(), true),
            (
                Criterion::All(vec![compartment, Criterion::Not(Box::new(hidden))]),
                true,
            ),
        ];
        for (admitted, materialized) in cases {
            let query = SearchQuery {
                access: Some(Arc::new(Admits(admitted.clone()))),
                count: 10,
                ..SearchQuery::of_type("Observation")
            };
            for dialect in [SQLITE, POSTGRES] {
                let (page, _) = search(dialect, &query).unwrap();
                assert_eq!(
                    page.text.contains("MATERIALIZED"),
                    materialized,
                    "{admitted:?}: {}",
                    page.text
                );
            }
        }
    }

    fn code(code: &str) -> Criterion {
        Criterion::Token {
            param: "code".into(),
            system: Some("http://loinc.org".into()),
            code: Some(code.into()),
        }
    }

    #[test]
    fn a_disjunction_of_values_is_one_list_of_matches() {
        let query = SearchQuery {
            criterion: Criterion::Any(vec![code("8867-4"), code("9279-1"), code("8310-5")]),
            count: 10,
            total: true,
            ..SearchQuery::of_type("Observation")
        };
        for dialect in [SQLITE, POSTGRES] {
            let (page, count) = search(dialect, &query).unwrap();
            assert_eq!(page.params.len(), 1 + 3 * 4);
            for text in [page.text, count.unwrap().text] {
                assert!(
                    text.contains(
                        "c.id IN (SELECT x1.id FROM search_token x1 WHERE x1.resource_type = "
                    ),
                    "{text}"
                );
                assert_eq!(text.matches(" UNION ALL SELECT x").count(), 2, "{text}");
                assert!(!text.contains(" OR c.id IN"), "{text}");
            }
        }
    }

    #[test]
    fn a_disjunction_with_a_branch_that_is_not_a_list_stays_a_disjunction() {
        let query = SearchQuery {
            criterion: Criterion::Any(vec![code("8867-4"), Criterion::Id(vec!["o1".into()])]),
            count: 10,
            ..SearchQuery::of_type("Observation")
        };
        for dialect in [SQLITE, POSTGRES] {
            let (page, _) = search(dialect, &query).unwrap();
            assert!(!page.text.contains("UNION ALL"), "{}", page.text);
            assert!(page.text.contains(" OR c.id IN ("), "{}", page.text);
        }
    }

    #[test]
    fn a_list_closes_at_its_end_only_when_its_parenthesis_closes_last() {
        assert!(closes_at_end("SELECT x1.id FROM t x1 WHERE (a = 1))"));
        assert!(closes_at_end("SELECT x1.id FROM t x1 WHERE x1.p = ')')"));
        assert!(!closes_at_end("SELECT x1.id FROM t x1) AND (c.id = 1)"));
        assert!(!closes_at_end("SELECT x1.id FROM t x1 WHERE (a = 1)"));
    }

    #[test]
    fn like_wildcards_in_values_are_escaped() {
        assert_eq!(escape_like("50%_a\\b"), "50\\%\\_a\\\\b");
    }

    #[test]
    fn criteria_nested_too_deeply_are_refused() {
        let mut criterion = Criterion::Always;
        for _ in 0..20 {
            criterion = Criterion::Not(Box::new(criterion));
        }
        let query = SearchQuery {
            types: vec!["Patient".into()],
            criterion,
            ..SearchQuery::default()
        };
        assert!(search(SQLITE, &query).is_err());
    }
}
