//! The search index tables' rows for resources, shared by both backends: each
//! table as columns, so SQLite can bind them row by row in multi-row INSERTs and
//! PostgreSQL as one array per column for `UNNEST`.

use haven_model::clock::format_instant;
use haven_model::search_index::{index_values, IndexValue};
use haven_model::search_value::patient_compartments;
use serde_json::{json, Value};
use time::OffsetDateTime;

/// The version of the indexing rules; raising it makes connect re-index everything.
pub(crate) const SEARCH_INDEX_VERSION: i64 = 3;

/// Resources indexed per backfill transaction.
pub(crate) const BACKFILL_BATCH: i64 = 500;

/// Every index table, for deleting a resource's rows.
pub(crate) const TABLES: [&str; 10] = [
    "search_string",
    "search_token",
    "search_token_of_type",
    "search_reference",
    "search_date",
    "search_number",
    "search_quantity",
    "search_uri",
    "search_composite",
    "search_compartment",
];

/// One column's values, one per row.
pub(crate) enum Column {
    Text(Vec<Option<String>>),
    Real(Vec<Option<f64>>),
    Instant(Vec<OffsetDateTime>),
    /// JSON text: TEXT on SQLite, JSONB on PostgreSQL.
    Json(Vec<String>),
}

/// The rows of one table; the first three columns are resource_type, id, param.
pub(crate) struct TableRows {
    pub name: &'static str,
    pub columns: &'static [&'static str],
    pub values: Vec<Column>,
    pub len: usize,
}

impl TableRows {
    /// `kinds` gives each column's type: `t` text, `r` real, `i` instant, `j` JSON.
    fn new(name: &'static str, columns: &'static [&'static str], kinds: &[u8]) -> Self {
        let values = kinds
            .iter()
            .map(|kind| match kind {
                b'r' => Column::Real(Vec::new()),
                b'i' => Column::Instant(Vec::new()),
                b'j' => Column::Json(Vec::new()),
                _ => Column::Text(Vec::new()),
            })
            .collect();
        Self {
            name,
            columns,
            values,
            len: 0,
        }
    }

    fn text(&mut self, column: usize, value: Option<String>) {
        if let Column::Text(values) = &mut self.values[column] {
            values.push(value);
        }
    }

    fn real(&mut self, column: usize, value: Option<f64>) {
        if let Column::Real(values) = &mut self.values[column] {
            values.push(value);
        }
    }

    fn instant(&mut self, column: usize, value: OffsetDateTime) {
        if let Column::Instant(values) = &mut self.values[column] {
            values.push(value);
        }
    }

    fn json(&mut self, column: usize, value: String) {
        if let Column::Json(values) = &mut self.values[column] {
            values.push(value);
        }
    }

    fn key(&mut self, resource_type: &str, id: &str, param: &str) {
        self.text(0, Some(resource_type.to_owned()));
        self.text(1, Some(id.to_owned()));
        self.text(2, Some(param.to_owned()));
        self.len += 1;
    }
}

/// The index rows of a set of resources, table by table.
pub(crate) struct IndexRows {
    pub tables: [TableRows; 10],
}

impl IndexRows {
    pub fn new() -> Self {
        Self {
            tables: [
                TableRows::new(
                    "search_string",
                    &["resource_type", "id", "param", "normalized", "exact"],
                    b"ttttt",
                ),
                TableRows::new(
                    "search_token",
                    &["resource_type", "id", "param", "system", "code", "text"],
                    b"tttttt",
                ),
                TableRows::new(
                    "search_token_of_type",
                    &[
                        "resource_type",
                        "id",
                        "param",
                        "type_system",
                        "type_code",
                        "value",
                    ],
                    b"tttttt",
                ),
                TableRows::new(
                    "search_reference",
                    &[
                        "resource_type",
                        "id",
                        "param",
                        "target_type",
                        "target_id",
                        "url",
                        "version",
                    ],
                    b"ttttttt",
                ),
                TableRows::new(
                    "search_date",
                    &["resource_type", "id", "param", "low", "high"],
                    b"tttii",
                ),
                TableRows::new(
                    "search_number",
                    &["resource_type", "id", "param", "low", "high"],
                    b"tttrr",
                ),
                TableRows::new(
                    "search_quantity",
                    &[
                        "resource_type",
                        "id",
                        "param",
                        "value_low",
                        "value_high",
                        "system",
                        "code",
                        "unit",
                    ],
                    b"tttrrttt",
                ),
                TableRows::new(
                    "search_uri",
                    &["resource_type", "id", "param", "uri"],
                    b"tttt",
                ),
                TableRows::new(
                    "search_composite",
                    &["resource_type", "id", "param", "parts"],
                    b"tttj",
                ),
                TableRows::new(
                    "search_compartment",
                    &["resource_type", "id", "param", "target_id"],
                    b"tttt",
                ),
            ],
        }
    }

    /// Adds the rows of one stored resource.
    pub fn add(&mut self, resource_type: &str, id: &str, resource: &Value) {
        for value in index_values(resource) {
            self.push(resource_type, id, value);
        }
        // Compartment membership is stored as computed, so a search confined to
        // a patient's compartment asks exactly what a read's check asks.
        let compartment = &mut self.tables[9];
        for patient in patient_compartments(resource) {
            compartment.key(resource_type, id, "Patient");
            compartment.text(3, Some(patient));
        }
    }

    fn push(&mut self, resource_type: &str, id: &str, value: IndexValue) {
        let [string, token, of_type, reference, date, number, quantity, uri, composite, _] =
            &mut self.tables;
        match value {
            IndexValue::String {
                param,
                normalized,
                exact,
            } => {
                string.key(resource_type, id, param);
                string.text(3, Some(normalized));
                string.text(4, Some(exact));
            }
            IndexValue::Token {
                param,
                system,
                code,
                text,
            } => {
                token.key(resource_type, id, param);
                token.text(3, system);
                token.text(4, code);
                token.text(5, text);
            }
            IndexValue::IdentifierOfType {
                param,
                type_system,
                type_code,
                value,
            } => {
                of_type.key(resource_type, id, param);
                of_type.text(3, type_system);
                of_type.text(4, type_code);
                of_type.text(5, Some(value));
            }
            IndexValue::Reference {
                param,
                target_type,
                target_id,
                url,
                version,
            } => {
                reference.key(resource_type, id, param);
                reference.text(3, target_type);
                reference.text(4, target_id);
                reference.text(5, url);
                reference.text(6, version);
            }
            IndexValue::Date { param, low, high } => {
                date.key(resource_type, id, param);
                date.instant(3, low);
                date.instant(4, high);
            }
            IndexValue::Number { param, low, high } => {
                number.key(resource_type, id, param);
                number.real(3, Some(low));
                number.real(4, Some(high));
            }
            IndexValue::Quantity {
                param,
                value_low,
                value_high,
                system,
                code,
                unit,
            } => {
                quantity.key(resource_type, id, param);
                quantity.real(3, value_low);
                quantity.real(4, value_high);
                quantity.text(5, system);
                quantity.text(6, code);
                quantity.text(7, unit);
            }
            IndexValue::Uri { param, uri: text } => {
                uri.key(resource_type, id, param);
                uri.text(3, Some(text));
            }
            IndexValue::Composite { param, parts } => {
                composite.key(resource_type, id, param);
                let parts: Vec<Value> = parts.iter().map(part_json).collect();
                composite.json(3, Value::Array(parts).to_string());
            }
        }
    }
}

/// One component of a composite as JSON, with the column names of its table.
fn part_json(value: &IndexValue) -> Value {
    let mut part = match value {
        IndexValue::String {
            normalized, exact, ..
        } => json!({"normalized": normalized, "exact": exact}),
        IndexValue::Token {
            system, code, text, ..
        } => json!({"system": system, "code": code, "text": text}),
        IndexValue::IdentifierOfType {
            type_system,
            type_code,
            value,
            ..
        } => json!({"type_system": type_system, "type_code": type_code, "value": value}),
        IndexValue::Reference {
            target_type,
            target_id,
            url,
            version,
            ..
        } => {
            json!({"target_type": target_type, "target_id": target_id, "url": url, "version": version})
        }
        IndexValue::Date { low, high, .. } => {
            json!({"low": format_instant(*low), "high": format_instant(*high)})
        }
        IndexValue::Number { low, high, .. } => json!({"low": low, "high": high}),
        IndexValue::Quantity {
            value_low,
            value_high,
            system,
            code,
            unit,
            ..
        } => {
            json!({"value_low": value_low, "value_high": value_high, "system": system, "code": code, "unit": unit})
        }
        IndexValue::Uri { uri, .. } => json!({"uri": uri}),
        IndexValue::Composite { parts, .. } => {
            json!({"parts": parts.iter().map(part_json).collect::<Vec<_>>()})
        }
    };
    part["param"] = json!(value.param());
    part["kind"] = json!(value.kind());
    part
}
