//! The search index entries of a resource: for every R4 search parameter of its
//! type, the values the parameter's FHIRPath expression selects, typed and
//! normalized so a store can compare them in SQL instead of reading resources.
//!
//! [`index_values`] evaluates each expression with the evaluator of
//! [`crate::search_value`] and turns what it selects into [`IndexValue`]s by the
//! parameter's type and the value's FHIR type. The conventions the search side
//! must share, each with the function that applies it:
//!
//! - Strings are compared lowercased and accent-folded ([`normalize_string`]:
//!   canonical decomposition, combining marks dropped), so `Müller` is found by
//!   `muller`. Letters that do not decompose (`ø`, `ł`, `ß`) stay as they are.
//! - Dates are half-open intervals `[low, high)` in UTC, as wide as the written
//!   precision ([`date_range`]): `2020` covers the whole year. **A dateTime
//!   without a zone is read as UTC**: R4 leaves its zone to the server, and one
//!   fixed reading keeps indexing independent of where the server runs. Open
//!   ends of a Period are [`DATE_MIN`] and [`DATE_MAX`].
//! - Numbers and quantities are `f64` intervals as wide as the written precision
//!   ([`decimal_range`]): `100` covers `[99.5, 100.5)`. `f64` rather than a
//!   decimal type because the store must order and compare them in SQL, where
//!   both backends have a native double and neither a shared exact decimal;
//!   15 significant digits are more than any clinical value carries. The precision
//!   is read from the number as parsed: `serde_json` keeps no trailing zeros, so
//!   `1.50` counts as `1.5`.
//! - A search parameter without an expression (`_text`, `_content`, `_query`)
//!   and the special `near` have no entries: they need a text or geographic
//!   index, not values.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::LazyLock;

use serde_json::Value;
use time::macros::datetime;
use time::{Date, Duration, Month, OffsetDateTime, PrimitiveDateTime, Time, UtcOffset};
use unicode_normalization::char::is_combining_mark;
use unicode_normalization::UnicodeNormalization;

use crate::registry::{self, SearchParam, SearchParamType};
use crate::search_value::{parse_reference, root_item, Compiled, Item, Node};

/// The earliest instant an index holds: an open start of a Period.
pub const DATE_MIN: OffsetDateTime = datetime!(0001-01-01 0:00 UTC);

/// The end of indexable time: an open end of a Period, and the end of anything in
/// the year 9999. Microseconds, as both database backends store them.
pub const DATE_MAX: OffsetDateTime = datetime!(9999-12-31 23:59:59.999_999 UTC);

/// The system R4 gives Money's currency code when it is searched as a quantity.
pub const CURRENCY_SYSTEM: &str = "urn:iso:std:iso:4217";

/// One typed value of one search parameter; `param` is the parameter's code.
#[derive(Debug, Clone, PartialEq)]
pub enum IndexValue {
    /// A string, or one part of a HumanName or Address (search.html#string).
    String {
        param: &'static str,
        /// Lowercased and accent-folded, for the default and `:contains` searches.
        normalized: String,
        /// As written, for `:exact`.
        exact: String,
    },
    /// A coded value (search.html#token). `system: None` means the value has no
    /// system; `code: None` an entry that carries only text. `text` is the
    /// CodeableConcept's text, the Coding's display or the Identifier's type
    /// text, normalized like strings, for `:text`.
    Token {
        param: &'static str,
        system: Option<String>,
        code: Option<String>,
        text: Option<String>,
    },
    /// An Identifier seen through one coding of its type, for `:of-type`
    /// (`type-system|type-code|value`).
    IdentifierOfType {
        param: &'static str,
        type_system: Option<String>,
        type_code: Option<String>,
        value: String,
    },
    /// A reference (search.html#reference). A relative `Type/id` gives type and
    /// id; an absolute URL is kept whole in `url`, without its `/_history/`
    /// part, and also gives type and id when it ends like a FHIR RESTful URL; a
    /// canonical keeps its `|version` in `version`.
    Reference {
        param: &'static str,
        target_type: Option<String>,
        target_id: Option<String>,
        url: Option<String>,
        version: Option<String>,
    },
    /// The half-open interval `[low, high)` a date covers, in UTC.
    Date {
        param: &'static str,
        low: OffsetDateTime,
        high: OffsetDateTime,
    },
    /// The half-open interval `[low, high)` a number's precision covers.
    Number {
        param: &'static str,
        low: f64,
        high: f64,
    },
    /// A quantity as the interval its precision (and comparator, or a Range's
    /// ends) covers; `None` for an unbounded side.
    Quantity {
        param: &'static str,
        value_low: Option<f64>,
        value_high: Option<f64>,
        system: Option<String>,
        code: Option<String>,
        unit: Option<String>,
    },
    /// A URI as written, for exact, `:below` and `:above` searches.
    Uri { param: &'static str, uri: String },
    /// One combination of a composite parameter's components, in the order the
    /// definition lists them; each part is named by its component's code.
    Composite {
        param: &'static str,
        parts: Vec<IndexValue>,
    },
}

impl IndexValue {
    /// The code of the search parameter this value belongs to.
    pub fn param(&self) -> &'static str {
        match self {
            IndexValue::String { param, .. }
            | IndexValue::Token { param, .. }
            | IndexValue::IdentifierOfType { param, .. }
            | IndexValue::Reference { param, .. }
            | IndexValue::Date { param, .. }
            | IndexValue::Number { param, .. }
            | IndexValue::Quantity { param, .. }
            | IndexValue::Uri { param, .. }
            | IndexValue::Composite { param, .. } => param,
        }
    }

    /// The kind of index the value goes to: `string`, `token`, `of-type`,
    /// `reference`, `date`, `number`, `quantity`, `uri` or `composite`.
    pub fn kind(&self) -> &'static str {
        match self {
            IndexValue::String { .. } => "string",
            IndexValue::Token { .. } => "token",
            IndexValue::IdentifierOfType { .. } => "of-type",
            IndexValue::Reference { .. } => "reference",
            IndexValue::Date { .. } => "date",
            IndexValue::Number { .. } => "number",
            IndexValue::Quantity { .. } => "quantity",
            IndexValue::Uri { .. } => "uri",
            IndexValue::Composite { .. } => "composite",
        }
    }
}

// Every number in an entry comes from a finite parse, never NaN, so equality is
// an equivalence and entries can be deduplicated in a set.
impl Eq for IndexValue {}

impl Hash for IndexValue {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // -0.0 equals 0.0, so both must hash alike.
        fn number<H: Hasher>(value: f64, state: &mut H) {
            let value = if value == 0.0 { 0.0 } else { value };
            value.to_bits().hash(state);
        }
        fn bound<H: Hasher>(value: Option<f64>, state: &mut H) {
            value.is_some().hash(state);
            if let Some(value) = value {
                number(value, state);
            }
        }
        std::mem::discriminant(self).hash(state);
        self.param().hash(state);
        match self {
            IndexValue::String {
                normalized, exact, ..
            } => (normalized, exact).hash(state),
            IndexValue::Token {
                system, code, text, ..
            } => (system, code, text).hash(state),
            IndexValue::IdentifierOfType {
                type_system,
                type_code,
                value,
                ..
            } => (type_system, type_code, value).hash(state),
            IndexValue::Reference {
                target_type,
                target_id,
                url,
                version,
                ..
            } => (target_type, target_id, url, version).hash(state),
            IndexValue::Date { low, high, .. } => (low, high).hash(state),
            IndexValue::Number { low, high, .. } => {
                number(*low, state);
                number(*high, state);
            }
            IndexValue::Quantity {
                value_low,
                value_high,
                system,
                code,
                unit,
                ..
            } => {
                bound(*value_low, state);
                bound(*value_high, state);
                (system, code, unit).hash(state);
            }
            IndexValue::Uri { uri, .. } => uri.hash(state),
            IndexValue::Composite { parts, .. } => parts.hash(state),
        }
    }
}

/// The index entries of `resource` for every search parameter of its type, each
/// entry once, in the order of the parameters' codes. A value without a
/// `resourceType` of R4 has none.
pub fn index_values(resource: &Value) -> Vec<IndexValue> {
    let Some(type_plan) = resource
        .get("resourceType")
        .and_then(Value::as_str)
        .and_then(|resource_type| PLANS.get(resource_type))
    else {
        return Vec::new();
    };
    let root = root_item(resource, Some(type_plan.resource_type));
    let mut entries = Entries::default();
    for plan in &type_plan.params {
        let selected = plan
            .expression
            .evaluate_on(std::slice::from_ref(&root), &root);
        if plan.components.is_empty() {
            for item in &selected {
                entries.extend(convert(plan.param, item));
            }
        } else {
            for item in &selected {
                entries.extend(composites(plan, item, &root));
            }
        }
    }
    entries.list
}

/// Entries in the order found, each once.
#[derive(Default)]
struct Entries {
    list: Vec<IndexValue>,
    seen: HashSet<IndexValue>,
}

impl Entries {
    fn extend(&mut self, values: Vec<IndexValue>) {
        for value in values {
            if self.seen.insert(value.clone()) {
                self.list.push(value);
            }
        }
    }
}

// --- Plans ----------------------------------------------------------------------

/// The parameters of one resource type with their expressions parsed once.
struct TypePlan {
    resource_type: &'static str,
    params: Vec<ParamPlan>,
}

struct ParamPlan {
    param: &'static SearchParam,
    expression: Compiled,
    /// A composite's components, evaluated on each value of its expression.
    components: Vec<ComponentPlan>,
}

struct ComponentPlan {
    param: &'static SearchParam,
    expression: Compiled,
}

/// The plans of every resource type, built on first use.
static PLANS: LazyLock<HashMap<&'static str, TypePlan>> = LazyLock::new(|| {
    registry::resource_types()
        .map(|resource_type| (resource_type, plan_type(resource_type)))
        .collect()
});

fn plan_type(resource_type: &'static str) -> TypePlan {
    let params = registry::search_params(resource_type)
        .into_iter()
        .filter(|param| param.kind != SearchParamType::Special)
        .filter_map(|param| {
            let expression = expression_for(param, resource_type)?;
            let components = if param.kind == SearchParamType::Composite {
                let components: Option<Vec<ComponentPlan>> = param
                    .component
                    .iter()
                    .map(|component| {
                        Some(ComponentPlan {
                            param: registry::search_param_by_url(&component.definition)?,
                            expression: Compiled::new(&component.expression),
                        })
                    })
                    .collect();
                // A composite whose parts cannot all be found could never match.
                components.filter(|c| !c.is_empty())?
            } else {
                Vec::new()
            };
            Some(ParamPlan {
                param,
                expression: Compiled::new(&expression),
                components,
            })
        })
        .collect();
    TypePlan {
        resource_type,
        params,
    }
}

/// The part of `param`'s expression that applies to `resource_type`. R4 writes
/// one definition without the type in front (`InsurancePlan-name` is
/// `name | alias`); with a single base type that can only mean the resource.
fn expression_for(param: &SearchParam, resource_type: &str) -> Option<String> {
    param.expression_for(resource_type).or_else(|| {
        let expression = param.expression.as_deref()?;
        let relative = expression
            .split('|')
            .all(|branch| branch.trim().starts_with(|c: char| c.is_ascii_lowercase()));
        (relative && param.base.len() == 1 && param.base[0] == resource_type)
            .then(|| expression.to_owned())
    })
}

/// Composites of more parts than this are not multiplied out further; R4's have
/// at most three parts with a handful of values each.
const MAX_COMBINATIONS: usize = 256;

/// The entries of a composite for one value of its expression: every combination
/// of its components' values there (search.html#composite).
fn composites<'a>(plan: &ParamPlan, item: &Item<'a>, root: &Item<'a>) -> Vec<IndexValue> {
    let mut combinations: Vec<Vec<IndexValue>> = vec![Vec::new()];
    for component in &plan.components {
        let mut values = Vec::new();
        for value in component
            .expression
            .evaluate_on(std::slice::from_ref(item), root)
        {
            for entry in convert(component.param, &value) {
                if !values.contains(&entry) {
                    values.push(entry);
                }
            }
        }
        if values.is_empty() {
            return Vec::new();
        }
        let mut next = Vec::new();
        'all: for combination in &combinations {
            for value in &values {
                if next.len() == MAX_COMBINATIONS {
                    break 'all;
                }
                let mut longer = combination.clone();
                longer.push(value.clone());
                next.push(longer);
            }
        }
        combinations = next;
    }
    combinations
        .into_iter()
        .map(|parts| IndexValue::Composite {
            param: plan.param.code.as_str(),
            parts,
        })
        .collect()
}

// --- Conversion -----------------------------------------------------------------

/// The entries one selected item gives a parameter of `param`'s type.
fn convert(param: &'static SearchParam, item: &Item<'_>) -> Vec<IndexValue> {
    let code = param.code.as_str();
    let mut out = Vec::new();
    match item {
        Item::Node(node) => match param.kind {
            SearchParamType::String => strings(code, *node, &mut out),
            SearchParamType::Token => tokens(code, *node, &mut out),
            SearchParamType::Reference => references(code, *node, &mut out),
            SearchParamType::Date => dates(code, *node, &mut out),
            SearchParamType::Number => numbers(code, node.value, &mut out),
            SearchParamType::Quantity => quantities(code, *node, &mut out),
            SearchParamType::Uri => uris(code, node.value, &mut out),
            SearchParamType::Composite | SearchParamType::Special => {}
        },
        // Computed values: `Patient.deceased.exists() and ...` gives a boolean.
        Item::Bool(b) if param.kind == SearchParamType::Token => {
            out.push(code_token(code, b.to_string()));
        }
        Item::Text(text) => match param.kind {
            SearchParamType::String => push_string(code, text, &mut out),
            SearchParamType::Token if !text.is_empty() => {
                out.push(code_token(code, text.clone()));
            }
            _ => {}
        },
        Item::Number(n) if param.kind == SearchParamType::Number => {
            numbers(code, &Value::from(*n), &mut out);
        }
        _ => {}
    }
    out
}

/// What a value is for indexing: its FHIR type when the tables know it, else a
/// guess from its JSON.
fn type_of(node: Node<'_>) -> &'static str {
    // Most specific first: every type here derives from nothing else listed.
    const KNOWN: [&str; 14] = [
        "HumanName",
        "Address",
        "CodeableConcept",
        "Coding",
        "Identifier",
        "ContactPoint",
        "Reference",
        "Period",
        "Timing",
        "Range",
        "Money",
        "SampledData",
        "Quantity",
        "Resource",
    ];
    if let Some(ty) = node.ty {
        if let Some(known) = KNOWN.iter().find(|known| ty.is_a(known)) {
            return known;
        }
        return ty.code;
    }
    let Some(object) = node.value.as_object() else {
        return match node.value {
            Value::String(_) => "string",
            Value::Bool(_) => "boolean",
            Value::Number(_) => "decimal",
            _ => "",
        };
    };
    let has = |key: &str| object.contains_key(key);
    if has("resourceType") {
        "Resource"
    } else if has("coding") {
        "CodeableConcept"
    } else if has("family") || has("given") {
        "HumanName"
    } else if ["line", "city", "district", "state", "postalCode", "country"]
        .iter()
        .any(|key| has(key))
    {
        "Address"
    } else if has("reference") {
        "Reference"
    } else if has("currency") {
        "Money"
    } else if has("low") || has("high") {
        "Range"
    } else if has("start") || has("end") {
        "Period"
    } else if has("event") || has("repeat") {
        "Timing"
    } else if object.get("value").is_some_and(Value::is_number) {
        "Quantity"
    } else if has("value") {
        "Identifier"
    } else if has("code") || has("system") {
        "Coding"
    } else {
        "Element"
    }
}

fn text<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    value
        .get(key)
        .and_then(Value::as_str)
        .filter(|text| !text.trim().is_empty())
}

fn owned(value: &Value, key: &str) -> Option<String> {
    text(value, key).map(str::to_owned)
}

/// The strings of an element, or of an array of them.
fn texts<'a>(value: &'a Value, key: &str) -> Vec<&'a str> {
    match value.get(key) {
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
        Some(Value::String(text)) => vec![text],
        _ => Vec::new(),
    }
}

/// Lowercased and accent-folded: the form string searches compare.
pub fn normalize_string(text: &str) -> String {
    text.nfd()
        .filter(|c| !is_combining_mark(*c))
        .flat_map(char::to_lowercase)
        .collect()
}

fn push_string(param: &'static str, text: &str, out: &mut Vec<IndexValue>) {
    // An empty string says nothing a search could find.
    if text.trim().is_empty() {
        return;
    }
    out.push(IndexValue::String {
        param,
        normalized: normalize_string(text),
        exact: text.to_owned(),
    });
}

/// String parameters: a string, or each text part of a name or address
/// (search.html#string); a code's text as a fallback some definitions rely on
/// (`(Observation.value as CodeableConcept).text` is explicit, others are not).
fn strings(param: &'static str, node: Node<'_>, out: &mut Vec<IndexValue>) {
    let value = node.value;
    let parts: &[&str] = match type_of(node) {
        "HumanName" => &["family", "given", "prefix", "suffix", "text"],
        "Address" => &[
            "line",
            "city",
            "district",
            "state",
            "postalCode",
            "country",
            "text",
        ],
        "CodeableConcept" => {
            for part in texts(value, "text") {
                push_string(param, part, out);
            }
            for coding in value
                .get("coding")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                for part in texts(coding, "display") {
                    push_string(param, part, out);
                }
            }
            return;
        }
        "Coding" => &["display"],
        _ => {
            if let Some(text) = value.as_str() {
                push_string(param, text, out);
            }
            return;
        }
    };
    for key in parts {
        for part in texts(value, key) {
            push_string(param, part, out);
        }
    }
}

fn code_token(param: &'static str, code: String) -> IndexValue {
    IndexValue::Token {
        param,
        system: None,
        code: Some(code),
        text: None,
    }
}

fn coding_token(param: &'static str, coding: &Value) -> Option<IndexValue> {
    let (system, code) = (owned(coding, "system"), owned(coding, "code"));
    let text = text(coding, "display").map(normalize_string);
    (system.is_some() || code.is_some() || text.is_some()).then_some(IndexValue::Token {
        param,
        system,
        code,
        text,
    })
}

/// Token parameters, per data type (search.html#token).
fn tokens(param: &'static str, node: Node<'_>, out: &mut Vec<IndexValue>) {
    let value = node.value;
    match type_of(node) {
        "Coding" => out.extend(coding_token(param, value)),
        "CodeableConcept" => {
            let codings = value.get("coding").and_then(Value::as_array);
            out.extend(
                codings
                    .into_iter()
                    .flatten()
                    .filter_map(|coding| coding_token(param, coding)),
            );
            if let Some(text) = text(value, "text") {
                out.push(IndexValue::Token {
                    param,
                    system: None,
                    code: None,
                    text: Some(normalize_string(text)),
                });
            }
        }
        "Identifier" => {
            let (system, code) = (owned(value, "system"), owned(value, "value"));
            if system.is_none() && code.is_none() {
                return;
            }
            let kind = value.get("type");
            out.push(IndexValue::Token {
                param,
                system,
                code: code.clone(),
                text: kind.and_then(|k| text(k, "text")).map(normalize_string),
            });
            let Some(code) = code else { return };
            let type_codings = kind.and_then(|k| k.get("coding")).and_then(Value::as_array);
            for coding in type_codings.into_iter().flatten() {
                let (type_system, type_code) = (owned(coding, "system"), owned(coding, "code"));
                if type_system.is_some() || type_code.is_some() {
                    out.push(IndexValue::IdentifierOfType {
                        param,
                        type_system,
                        type_code,
                        value: code.clone(),
                    });
                }
            }
        }
        // ContactPoint.system is a kind (phone, email), not a URI: only the value
        // is a token, as for a primitive.
        "ContactPoint" => {
            if let Some(code) = owned(value, "value") {
                out.push(code_token(param, code));
            }
        }
        _ => match value {
            Value::String(code) if !code.trim().is_empty() => {
                out.push(code_token(param, code.clone()));
            }
            Value::Bool(b) => out.push(code_token(param, b.to_string())),
            Value::Number(n) => out.push(code_token(param, n.to_string())),
            _ => {}
        },
    }
}

/// Reference parameters: a Reference, a canonical or uri naming a resource, an
/// Attachment's URL, or a resource itself (`Bundle.entry[0].resource`).
fn references(param: &'static str, node: Node<'_>, out: &mut Vec<IndexValue>) {
    let value = node.value;
    match type_of(node) {
        "Reference" => {
            if let Some(reference) = text(value, "reference") {
                out.extend(literal_reference(param, reference));
            }
        }
        // `Consent.source` may be an Attachment: its URL is all a search can match.
        "Attachment" => {
            if let Some(url) = text(value, "url") {
                out.extend(canonical_reference(param, url));
            }
        }
        "Resource" => {
            let (target_type, target_id) = (owned(value, "resourceType"), owned(value, "id"));
            if target_type.is_some() && target_id.is_some() {
                out.push(IndexValue::Reference {
                    param,
                    target_type,
                    target_id,
                    url: None,
                    version: None,
                });
            }
        }
        _ => {
            if let Some(url) = value.as_str().filter(|url| !url.trim().is_empty()) {
                out.extend(canonical_reference(param, url));
            }
        }
    }
}

/// `Reference.reference`: relative, absolute or a URN; a reference to a
/// contained resource (`#id`) names nothing a search can find.
fn literal_reference(param: &'static str, reference: &str) -> Option<IndexValue> {
    if reference.starts_with('#') {
        return None;
    }
    let absolute = reference.contains("://") || reference.starts_with("urn:");
    let target = parse_reference(reference);
    if target.is_none() && !absolute {
        // Neither `Type/id` nor a URL: nothing to match it against.
        return None;
    }
    let url = absolute.then(|| match reference.split_once("/_history/") {
        Some((url, _)) if target.is_some() => url.to_owned(),
        _ => reference.to_owned(),
    });
    Some(IndexValue::Reference {
        param,
        target_type: target.map(|t| t.kind.to_owned()),
        target_id: target.map(|t| t.id.to_owned()),
        url,
        version: target.and_then(|t| t.version).map(str::to_owned),
    })
}

/// A canonical (`url|version`) or uri: matched by its URL, and by type and id
/// when it ends like a FHIR RESTful URL.
fn canonical_reference(param: &'static str, canonical: &str) -> Option<IndexValue> {
    let (url, version) = match canonical.split_once('|') {
        Some((url, version)) => (url, Some(version.to_owned())),
        None => (canonical, None),
    };
    let target = parse_reference(url);
    Some(IndexValue::Reference {
        param,
        target_type: target.map(|t| t.kind.to_owned()),
        target_id: target.map(|t| t.id.to_owned()),
        url: Some(url.to_owned()),
        version: version.or_else(|| target.and_then(|t| t.version).map(str::to_owned)),
    })
}

/// Date parameters: date, dateTime and instant by precision, a Period, and a
/// Timing's events and bounds. An Age or Range is no date without the subject's
/// birth date, so it has none.
fn dates(param: &'static str, node: Node<'_>, out: &mut Vec<IndexValue>) {
    let value = node.value;
    let mut push = |range: Option<(OffsetDateTime, OffsetDateTime)>| {
        if let Some((low, high)) = range {
            out.push(IndexValue::Date { param, low, high });
        }
    };
    match type_of(node) {
        "Period" => push(period_range(value)),
        "Timing" => {
            for event in texts(value, "event") {
                push(date_range(event));
            }
            if let Some(bounds) = value.get("repeat").and_then(|r| r.get("boundsPeriod")) {
                push(period_range(bounds));
            }
        }
        _ => {
            if let Some(text) = value.as_str() {
                push(date_range(text));
            }
        }
    }
}

/// A Period as one interval: from the start of its start to the end of its end,
/// an open side reaching [`DATE_MIN`] or [`DATE_MAX`]. `None` for a Period with
/// neither, with an end that is no date, or that ends before it starts.
fn period_range(period: &Value) -> Option<(OffsetDateTime, OffsetDateTime)> {
    let start = period.get("start").and_then(Value::as_str);
    let end = period.get("end").and_then(Value::as_str);
    if start.is_none() && end.is_none() {
        return None;
    }
    let low = match start {
        Some(start) => date_range(start)?.0,
        None => DATE_MIN,
    };
    let high = match end {
        Some(end) => date_range(end)?.1,
        None => DATE_MAX,
    };
    (low < high).then_some((low, high))
}

/// The half-open interval in UTC a FHIR date, dateTime or instant covers at its
/// precision: `2020` the year, `2020-03` the month, `2020-03-04` the day,
/// `2020-03-04T10:15` the minute, `...:30` the second, `...:30.25` the
/// hundredth. A zone is `Z` or `±hh:mm`; without one the time is read as UTC.
/// `None` for anything else.
pub fn date_range(text: &str) -> Option<(OffsetDateTime, OffsetDateTime)> {
    let bytes = text.as_bytes();
    let number = |from: usize, len: usize| -> Option<u32> {
        let digits = bytes.get(from..from + len)?;
        if !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(digits).ok()?.parse().ok()
    };
    let year = i32::try_from(number(0, 4)?).ok()?;
    if bytes.len() == 4 {
        let low = Date::from_calendar_date(year, Month::January, 1).ok()?;
        let high = Date::from_calendar_date(year + 1, Month::January, 1).ok();
        return Some((midnight(low), high.map_or(DATE_MAX, midnight)));
    }
    if bytes.get(4) != Some(&b'-') {
        return None;
    }
    let month = Month::try_from(u8::try_from(number(5, 2)?).ok()?).ok()?;
    if bytes.len() == 7 {
        let low = Date::from_calendar_date(year, month, 1).ok()?;
        let high = match month {
            Month::December => Date::from_calendar_date(year + 1, Month::January, 1),
            _ => Date::from_calendar_date(year, month.next(), 1),
        };
        return Some((midnight(low), high.ok().map_or(DATE_MAX, midnight)));
    }
    if bytes.get(7) != Some(&b'-') {
        return None;
    }
    let day = u8::try_from(number(8, 2)?).ok()?;
    let date = Date::from_calendar_date(year, month, day).ok()?;
    if bytes.len() == 10 {
        let high = date.next_day().map_or(DATE_MAX, midnight);
        return Some((midnight(date), high));
    }
    if bytes.get(10) != Some(&b'T') {
        return None;
    }
    let hour = u8::try_from(number(11, 2)?).ok()?;
    if bytes.get(13) != Some(&b':') {
        return None;
    }
    let minute = u8::try_from(number(14, 2)?).ok()?;
    let mut at = 16;
    let mut second = 0u8;
    let mut nanos = 0u32;
    let mut step = Duration::MINUTE;
    if bytes.get(at) == Some(&b':') {
        second = u8::try_from(number(at + 1, 2)?).ok()?;
        at += 3;
        step = Duration::SECOND;
        if bytes.get(at) == Some(&b'.') {
            let digits = bytes[at + 1..]
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .count();
            if digits == 0 {
                return None;
            }
            // Beyond nanoseconds the precision cannot be held: nine digits are kept.
            let kept = digits.min(9);
            let fraction = number(at + 1, kept)?;
            nanos = fraction * 10u32.pow(9 - kept as u32);
            step = Duration::nanoseconds(10i64.pow(9 - kept as u32));
            at += 1 + digits;
        }
    }
    let offset = match &text[at..] {
        "" | "Z" => UtcOffset::UTC,
        zone => {
            let sign: i8 = match zone.as_bytes()[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            if zone.len() != 6 || zone.as_bytes()[3] != b':' {
                return None;
            }
            let hours = i8::try_from(number(at + 1, 2)?).ok()?;
            let minutes = i8::try_from(number(at + 4, 2)?).ok()?;
            UtcOffset::from_hms(sign * hours, sign * minutes, 0).ok()?
        }
    };
    // A leap second (`:60`, which R4 allows) is the last second of its minute.
    let (second, step) = if second == 60 {
        (59, Duration::SECOND)
    } else {
        (second, step)
    };
    let time = Time::from_hms_nano(hour, minute, second, nanos).ok()?;
    let low = PrimitiveDateTime::new(date, time)
        .assume_offset(offset)
        .checked_to_offset(UtcOffset::UTC)?;
    let high = low.checked_add(step).map_or(DATE_MAX, |h| h.min(DATE_MAX));
    Some((low, high))
}

fn midnight(date: Date) -> OffsetDateTime {
    date.midnight().assume_utc()
}

/// The half-open interval a decimal's written precision covers: `100` is
/// `[99.5, 100.5)`, `5.40` is `[5.395, 5.405)`, `1e2` is `[50, 150)`. `None` for
/// anything but a finite decimal.
pub fn decimal_range(text: &str) -> Option<(f64, f64)> {
    let value: f64 = text.parse().ok().filter(|v: &f64| v.is_finite())?;
    let (mantissa, exponent) = match text.split_once(['e', 'E']) {
        Some((mantissa, exponent)) => (mantissa, exponent.parse::<i32>().ok()?),
        None => (text, 0),
    };
    let unsigned = mantissa.strip_prefix(['-', '+']).unwrap_or(mantissa);
    let (whole, fraction) = match unsigned.split_once('.') {
        Some((_, "")) => return None,
        Some(parts) => parts,
        None => (unsigned, ""),
    };
    if whole.is_empty()
        || !whole
            .bytes()
            .chain(fraction.bytes())
            .all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let decimals = i32::try_from(fraction.len()).ok()?;
    let half = 0.5 * 10f64.powi(exponent.checked_sub(decimals)?);
    Some((value - half, value + half))
}

/// The text of a JSON number, or a decimal written as a string.
fn decimal_text(value: &Value) -> Option<String> {
    match value {
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) => Some(s.trim().to_owned()),
        _ => None,
    }
}

fn numbers(param: &'static str, value: &Value, out: &mut Vec<IndexValue>) {
    if let Some((low, high)) = decimal_text(value).as_deref().and_then(decimal_range) {
        out.push(IndexValue::Number { param, low, high });
    }
}

/// Quantity parameters: a Quantity (or Age, Duration, ...) by its precision and
/// comparator, Money as its value in its currency, a Range from the low end of
/// its low to the high end of its high. SampledData holds no one value, so it
/// has none.
fn quantities(param: &'static str, node: Node<'_>, out: &mut Vec<IndexValue>) {
    let value = node.value;
    match type_of(node) {
        "Quantity" => {
            let Some((low, high)) = value.get("value").and_then(quantity_value) else {
                return;
            };
            // `<5` is anything below 5: the comparator opens one side.
            let (value_low, value_high) = match text(value, "comparator") {
                Some("<" | "<=") => (None, Some(high)),
                Some(">" | ">=") => (Some(low), None),
                _ => (Some(low), Some(high)),
            };
            out.push(IndexValue::Quantity {
                param,
                value_low,
                value_high,
                system: owned(value, "system"),
                code: owned(value, "code"),
                unit: owned(value, "unit"),
            });
        }
        "Money" => {
            let Some((low, high)) = value.get("value").and_then(quantity_value) else {
                return;
            };
            let currency = owned(value, "currency");
            out.push(IndexValue::Quantity {
                param,
                value_low: Some(low),
                value_high: Some(high),
                system: currency.as_ref().map(|_| CURRENCY_SYSTEM.to_owned()),
                code: currency,
                unit: None,
            });
        }
        "Range" => {
            let end = |key: &str| value.get(key).filter(|q| q.get("value").is_some());
            let (low, high) = (end("low"), end("high"));
            let value_low = low.and_then(|q| quantity_value(&q["value"])).map(|r| r.0);
            let value_high = high.and_then(|q| quantity_value(&q["value"])).map(|r| r.1);
            if value_low.is_none() && value_high.is_none() {
                return;
            }
            let units = low.or(high).unwrap_or(&Value::Null);
            out.push(IndexValue::Quantity {
                param,
                value_low,
                value_high,
                system: owned(units, "system"),
                code: owned(units, "code"),
                unit: owned(units, "unit"),
            });
        }
        "SampledData" => {}
        _ => {
            if let Some((low, high)) = quantity_value(value) {
                out.push(IndexValue::Quantity {
                    param,
                    value_low: Some(low),
                    value_high: Some(high),
                    system: None,
                    code: None,
                    unit: None,
                });
            }
        }
    }
}

fn quantity_value(value: &Value) -> Option<(f64, f64)> {
    decimal_text(value).as_deref().and_then(decimal_range)
}

fn uris(param: &'static str, value: &Value, out: &mut Vec<IndexValue>) {
    if let Some(uri) = value.as_str().filter(|uri| !uri.trim().is_empty()) {
        out.push(IndexValue::Uri {
            param,
            uri: uri.to_owned(),
        });
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use time::macros::datetime;

    use super::*;
    use crate::search_value::why_unsupported;

    /// Expressions of the R4 definitions the evaluator cannot evaluate in full, as
    /// (parameter code, base type, why). Every definition is covered today.
    const UNSUPPORTED: &[(&str, &str, &str)] = &[];

    /// The entries of one parameter.
    fn of(resource: &Value, param: &str) -> Vec<IndexValue> {
        index_values(resource)
            .into_iter()
            .filter(|entry| entry.param() == param)
            .collect()
    }

    fn string(param: &'static str, normalized: &str, exact: &str) -> IndexValue {
        IndexValue::String {
            param,
            normalized: normalized.into(),
            exact: exact.into(),
        }
    }

    fn token(
        param: &'static str,
        system: Option<&str>,
        code: Option<&str>,
        text: Option<&str>,
    ) -> IndexValue {
        IndexValue::Token {
            param,
            system: system.map(Into::into),
            code: code.map(Into::into),
            text: text.map(Into::into),
        }
    }

    fn reference(
        param: &'static str,
        target: Option<(&str, &str)>,
        url: Option<&str>,
        version: Option<&str>,
    ) -> IndexValue {
        IndexValue::Reference {
            param,
            target_type: target.map(|t| t.0.into()),
            target_id: target.map(|t| t.1.into()),
            url: url.map(Into::into),
            version: version.map(Into::into),
        }
    }

    fn date(param: &'static str, low: OffsetDateTime, high: OffsetDateTime) -> IndexValue {
        IndexValue::Date { param, low, high }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    /// The bounds and units of a parameter's only quantity.
    fn only_quantity(
        resource: &Value,
        param: &str,
    ) -> (Option<f64>, Option<f64>, [Option<String>; 3]) {
        match of(resource, param).as_slice() {
            [IndexValue::Quantity {
                value_low,
                value_high,
                system,
                code,
                unit,
                ..
            }] => (
                *value_low,
                *value_high,
                [system.clone(), code.clone(), unit.clone()],
            ),
            other => panic!("{param}: {other:?}"),
        }
    }

    #[test]
    fn every_r4_search_parameter_expression_is_within_the_evaluator_subset() {
        let mut unsupported: Vec<(String, String, String)> = Vec::new();
        let mut checked = 0;
        for param in registry::all_search_params() {
            let Some(expression) = param.expression.as_deref() else {
                assert!(
                    ["_content", "_query", "_text"].contains(&param.code.as_str()),
                    "{} has no expression",
                    param.code
                );
                continue;
            };
            let mut expressions: Vec<String> = param
                .component
                .iter()
                .map(|c| c.expression.clone())
                .collect();
            for base in &param.base {
                checked += 1;
                let mut note = |reason: String| {
                    unsupported.push((param.code.clone(), base.clone(), reason));
                };
                match expression_for(param, base) {
                    Some(for_base) => expressions.push(for_base),
                    None => note(format!("no branch of '{expression}' starts at {base}")),
                }
                for expression in &expressions {
                    if let Some(reason) = why_unsupported(expression) {
                        note(reason);
                    }
                }
                for component in &param.component {
                    if registry::search_param_by_url(&component.definition).is_none() {
                        note(format!("component {} is unknown", component.definition));
                    }
                }
                expressions.truncate(param.component.len());
            }
        }
        println!(
            "{checked} expressions by base type; unsupported: {}",
            unsupported.len()
        );
        for (code, base, reason) in &unsupported {
            println!("  {base}.{code}: {reason}");
        }
        let allowed: Vec<(String, String)> = UNSUPPORTED
            .iter()
            .map(|(code, base, _)| ((*code).to_owned(), (*base).to_owned()))
            .collect();
        let found: Vec<(String, String)> = unsupported
            .into_iter()
            .map(|(code, base, _)| (code, base))
            .collect();
        assert_eq!(found, allowed);
        assert!(checked > 1400, "only {checked} expressions");
    }

    #[test]
    fn every_resource_type_has_a_plan_for_each_parameter_with_an_expression() {
        for resource_type in registry::resource_types() {
            let plan = PLANS.get(resource_type).expect("a plan per type");
            let planned: Vec<&str> = plan.params.iter().map(|p| p.param.code.as_str()).collect();
            for param in registry::search_params(resource_type) {
                let expected = param.expression.is_some() && param.kind != SearchParamType::Special;
                assert_eq!(
                    planned.contains(&param.code.as_str()),
                    expected,
                    "{resource_type}.{}",
                    param.code
                );
            }
        }
    }

    #[test]
    fn a_patient_name_gives_one_string_per_part_lowercased_and_without_accents() {
        let patient = json!({
            "resourceType": "Patient",
            "name": [{
                "family": "Müller-Lüdenscheidt",
                "given": ["José", "Zoë"],
                "prefix": ["Dr."],
                "suffix": ["PhD"],
                "text": "Dr. José Zoë Müller-Lüdenscheidt"
            }]
        });
        assert_eq!(
            of(&patient, "name"),
            vec![
                string("name", "muller-ludenscheidt", "Müller-Lüdenscheidt"),
                string("name", "jose", "José"),
                string("name", "zoe", "Zoë"),
                string("name", "dr.", "Dr."),
                string("name", "phd", "PhD"),
                string(
                    "name",
                    "dr. jose zoe muller-ludenscheidt",
                    "Dr. José Zoë Müller-Lüdenscheidt"
                ),
            ]
        );
        assert_eq!(
            of(&patient, "family"),
            vec![string(
                "family",
                "muller-ludenscheidt",
                "Müller-Lüdenscheidt"
            )]
        );
        assert_eq!(
            of(&patient, "given"),
            vec![
                string("given", "jose", "José"),
                string("given", "zoe", "Zoë")
            ]
        );
    }

    #[test]
    fn an_address_gives_one_string_per_part() {
        let patient = json!({
            "resourceType": "Patient",
            "address": [{
                "line": ["1 Rue de l'Église", "Bâtiment B"],
                "city": "Besançon",
                "postalCode": "25000",
                "country": "FR"
            }]
        });
        let normalized: Vec<String> = of(&patient, "address")
            .into_iter()
            .map(|entry| match entry {
                IndexValue::String { normalized, .. } => normalized,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            normalized,
            ["1 rue de l'eglise", "batiment b", "besancon", "25000", "fr"]
        );
        assert_eq!(
            of(&patient, "address-city"),
            vec![string("address-city", "besancon", "Besançon")]
        );
    }

    #[test]
    fn an_empty_or_blank_string_is_not_indexed() {
        let patient = json!({
            "resourceType": "Patient",
            "name": [{"family": "", "given": ["  ", "Ann"]}],
            "gender": ""
        });
        assert!(of(&patient, "family").is_empty());
        assert_eq!(of(&patient, "given"), vec![string("given", "ann", "Ann")]);
        assert!(of(&patient, "gender").is_empty());
    }

    #[test]
    fn normalizing_folds_case_and_accents_but_not_letters_without_a_decomposition() {
        assert_eq!(normalize_string("ÀÉÎÕÜ çñ"), "aeiou cn");
        assert_eq!(normalize_string("Ø ß Ł"), "ø ß ł");
    }

    #[test]
    fn a_condition_code_gives_a_token_per_coding_and_one_for_its_text() {
        let condition = json!({
            "resourceType": "Condition",
            "code": {
                "coding": [
                    {"system": "http://snomed.info/sct", "code": "39065001", "display": "Burn of ear"},
                    {"system": "http://hl7.org/fhir/sid/icd-10", "code": "T20.0"}
                ],
                "text": "Brûlure de l'oreille"
            },
            "clinicalStatus": {"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                "code": "active"
            }]}
        });
        assert_eq!(
            of(&condition, "code"),
            vec![
                token(
                    "code",
                    Some("http://snomed.info/sct"),
                    Some("39065001"),
                    Some("burn of ear")
                ),
                token(
                    "code",
                    Some("http://hl7.org/fhir/sid/icd-10"),
                    Some("T20.0"),
                    None
                ),
                token("code", None, None, Some("brulure de l'oreille")),
            ]
        );
        assert_eq!(
            of(&condition, "clinical-status"),
            vec![token(
                "clinical-status",
                Some("http://terminology.hl7.org/CodeSystem/condition-clinical"),
                Some("active"),
                None
            )]
        );
    }

    #[test]
    fn an_identifier_gives_system_and_value_and_its_type_for_of_type() {
        let patient = json!({
            "resourceType": "Patient",
            "identifier": [
                {
                    "type": {
                        "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}],
                        "text": "Medical record number"
                    },
                    "system": "urn:oid:1.2.36.146.595.217.0.1",
                    "value": "12345"
                },
                {"value": "no-system"},
                {"use": "official"}
            ]
        });
        assert_eq!(
            of(&patient, "identifier"),
            vec![
                token(
                    "identifier",
                    Some("urn:oid:1.2.36.146.595.217.0.1"),
                    Some("12345"),
                    Some("medical record number")
                ),
                IndexValue::IdentifierOfType {
                    param: "identifier",
                    type_system: Some("http://terminology.hl7.org/CodeSystem/v2-0203".into()),
                    type_code: Some("MR".into()),
                    value: "12345".into(),
                },
                token("identifier", None, Some("no-system"), None),
            ]
        );
    }

    #[test]
    fn codes_booleans_ids_and_contact_points_are_tokens_without_a_system() {
        let patient = json!({
            "resourceType": "Patient",
            "id": "p1",
            "active": true,
            "gender": "female",
            "telecom": [
                {"system": "phone", "value": "+33 1 23 45 67 89"},
                {"system": "email", "value": "anna@example.org"},
                {"use": "home"}
            ]
        });
        assert_eq!(
            of(&patient, "_id"),
            vec![token("_id", None, Some("p1"), None)]
        );
        assert_eq!(
            of(&patient, "active"),
            vec![token("active", None, Some("true"), None)]
        );
        assert_eq!(
            of(&patient, "gender"),
            vec![token("gender", None, Some("female"), None)]
        );
        assert_eq!(
            of(&patient, "email"),
            vec![token("email", None, Some("anna@example.org"), None)]
        );
        assert_eq!(of(&patient, "telecom").len(), 2);
    }

    #[test]
    fn deceased_is_a_computed_boolean_token() {
        let alive = json!({"resourceType": "Patient"});
        let died = json!({"resourceType": "Patient", "deceasedDateTime": "2020-04-01"});
        let not_deceased = json!({"resourceType": "Patient", "deceasedBoolean": false});
        let code = |patient: &Value| match of(patient, "deceased").as_slice() {
            [IndexValue::Token { code, .. }] => code.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(code(&alive).as_deref(), Some("false"));
        assert_eq!(code(&died).as_deref(), Some("true"));
        assert_eq!(code(&not_deceased).as_deref(), Some("false"));
        assert_eq!(
            of(&died, "death-date"),
            vec![date(
                "death-date",
                datetime!(2020-04-01 0:00 UTC),
                datetime!(2020-04-02 0:00 UTC)
            )]
        );
    }

    #[test]
    fn references_are_split_into_type_id_url_and_version() {
        let observation = json!({
            "resourceType": "Observation",
            "subject": {"reference": "Patient/p1"},
            "encounter": {"reference": "Encounter/e1/_history/3"},
            "performer": [
                {"reference": "https://other.example/fhir/Practitioner/d1/_history/2"},
                {"reference": "#contained-org"},
                {"reference": "urn:uuid:5c1f4ee4-2f0d-4f60-9d5b-6f3b3f1a2b3c"},
                {"identifier": {"system": "urn:x", "value": "d9"}},
                {"display": "Dr. Nobody"}
            ],
            "specimen": {"reference": "not a reference"}
        });
        assert_eq!(
            of(&observation, "subject"),
            vec![reference("subject", Some(("Patient", "p1")), None, None)]
        );
        assert_eq!(
            of(&observation, "patient"),
            vec![reference("patient", Some(("Patient", "p1")), None, None)]
        );
        assert_eq!(
            of(&observation, "encounter"),
            vec![reference(
                "encounter",
                Some(("Encounter", "e1")),
                None,
                Some("3")
            )]
        );
        assert_eq!(
            of(&observation, "performer"),
            vec![
                reference(
                    "performer",
                    Some(("Practitioner", "d1")),
                    Some("https://other.example/fhir/Practitioner/d1"),
                    Some("2")
                ),
                reference(
                    "performer",
                    None,
                    Some("urn:uuid:5c1f4ee4-2f0d-4f60-9d5b-6f3b3f1a2b3c"),
                    None
                ),
            ]
        );
        assert!(of(&observation, "specimen").is_empty());
    }

    #[test]
    fn a_canonical_reference_keeps_its_url_and_version() {
        let library = json!({
            "resourceType": "Library",
            "relatedArtifact": [
                {"type": "depends-on", "resource": "http://hl7.org/fhir/Library/fhir-helpers|4.0.1"},
                {"type": "composed-of", "resource": "http://example.org/libraries/common"}
            ]
        });
        assert_eq!(
            of(&library, "depends-on"),
            vec![reference(
                "depends-on",
                Some(("Library", "fhir-helpers")),
                Some("http://hl7.org/fhir/Library/fhir-helpers"),
                Some("4.0.1")
            )]
        );
        assert_eq!(
            of(&library, "composed-of"),
            vec![reference(
                "composed-of",
                None,
                Some("http://example.org/libraries/common"),
                None
            )]
        );
    }

    #[test]
    fn a_document_bundle_refers_to_its_first_entry() {
        let bundle = json!({
            "resourceType": "Bundle",
            "type": "document",
            "entry": [
                {"resource": {"resourceType": "Composition", "id": "c1"}},
                {"resource": {"resourceType": "Patient", "id": "p1"}}
            ]
        });
        assert_eq!(
            of(&bundle, "composition"),
            vec![reference(
                "composition",
                Some(("Composition", "c1")),
                None,
                None
            )]
        );
    }

    #[test]
    fn a_date_of_just_a_year_covers_the_whole_year() {
        assert_eq!(
            date_range("1974"),
            Some((
                datetime!(1974-01-01 0:00 UTC),
                datetime!(1975-01-01 0:00 UTC)
            ))
        );
        assert_eq!(
            date_range("1974-12"),
            Some((
                datetime!(1974-12-01 0:00 UTC),
                datetime!(1975-01-01 0:00 UTC)
            ))
        );
        assert_eq!(
            date_range("2024-02-29"),
            Some((
                datetime!(2024-02-29 0:00 UTC),
                datetime!(2024-03-01 0:00 UTC)
            ))
        );
    }

    #[test]
    fn a_date_time_with_a_zone_is_converted_to_utc() {
        assert_eq!(
            date_range("2020-03-04T01:15:30+02:00"),
            Some((
                datetime!(2020-03-03 23:15:30 UTC),
                datetime!(2020-03-03 23:15:31 UTC)
            ))
        );
        assert_eq!(
            date_range("2020-03-04T10:15:30.25-05:30"),
            Some((
                datetime!(2020-03-04 15:45:30.25 UTC),
                datetime!(2020-03-04 15:45:30.26 UTC)
            ))
        );
        assert_eq!(
            date_range("2020-03-04T10:15:30Z"),
            date_range("2020-03-04T10:15:30+00:00")
        );
    }

    #[test]
    fn a_date_time_without_a_zone_is_read_as_utc_at_its_precision() {
        assert_eq!(
            date_range("2020-03-04T10:15:30"),
            Some((
                datetime!(2020-03-04 10:15:30 UTC),
                datetime!(2020-03-04 10:15:31 UTC)
            ))
        );
        assert_eq!(
            date_range("2020-03-04T10:15"),
            Some((
                datetime!(2020-03-04 10:15 UTC),
                datetime!(2020-03-04 10:16 UTC)
            ))
        );
        assert_eq!(
            date_range("2020-03-04T10:15:30.123"),
            Some((
                datetime!(2020-03-04 10:15:30.123 UTC),
                datetime!(2020-03-04 10:15:30.124 UTC)
            ))
        );
    }

    #[test]
    fn malformed_dates_have_no_range_and_the_last_year_ends_at_date_max() {
        for bad in [
            "",
            "20",
            "2020-1",
            "2020-13",
            "2020-02-30",
            "2020/01/01",
            "2020-01-01T",
            "2020-01-01T25:00",
            "2020-01-01T10:00:00.",
            "2020-01-01T10:00:00+2",
            "2020-01-01Z",
            "January 2012",
            "2020-01-01T10:00:00+02:00x",
        ] {
            assert_eq!(date_range(bad), None, "{bad}");
        }
        assert_eq!(date_range("9999").map(|r| r.1), Some(DATE_MAX));
        assert_eq!(date_range("9999-12-31").map(|r| r.1), Some(DATE_MAX));
        assert_eq!(
            date_range("2016-12-31T23:59:60Z"),
            Some((
                datetime!(2016-12-31 23:59:59 UTC),
                datetime!(2017-01-01 0:00 UTC)
            ))
        );
    }

    #[test]
    fn an_encounter_period_covers_from_its_start_to_the_end_of_its_end() {
        let encounter = json!({
            "resourceType": "Encounter",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
            "period": {"start": "2015-01-17T16:00:00+10:00", "end": "2015-01-17"}
        });
        assert_eq!(
            of(&encounter, "date"),
            vec![date(
                "date",
                datetime!(2015-01-17 6:00 UTC),
                datetime!(2015-01-18 0:00 UTC)
            )]
        );
        assert_eq!(
            of(&encounter, "class"),
            vec![token(
                "class",
                Some("http://terminology.hl7.org/CodeSystem/v3-ActCode"),
                Some("AMB"),
                None
            )]
        );
    }

    #[test]
    fn a_period_with_one_end_is_open_on_the_other() {
        let ongoing = json!({"resourceType": "Encounter", "period": {"start": "2021-06"}});
        assert_eq!(
            of(&ongoing, "date"),
            vec![date("date", datetime!(2021-06-01 0:00 UTC), DATE_MAX)]
        );
        let ended = json!({"resourceType": "Encounter", "period": {"end": "2021"}});
        assert_eq!(
            of(&ended, "date"),
            vec![date("date", DATE_MIN, datetime!(2022-01-01 0:00 UTC))]
        );
        let empty = json!({"resourceType": "Encounter", "period": {}});
        assert!(of(&empty, "date").is_empty());
        let backwards =
            json!({"resourceType": "Encounter", "period": {"start": "2021", "end": "2020"}});
        assert!(of(&backwards, "date").is_empty());
    }

    #[test]
    fn a_medication_request_authored_on_is_indexed_at_its_precision() {
        let request = json!({
            "resourceType": "MedicationRequest",
            "status": "active",
            "intent": "order",
            "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "582620"}]},
            "subject": {"reference": "Patient/p1"},
            "authoredOn": "2015-01-15T09:30:00+01:00"
        });
        assert_eq!(
            of(&request, "authoredon"),
            vec![date(
                "authoredon",
                datetime!(2015-01-15 8:30 UTC),
                datetime!(2015-01-15 8:30:01 UTC)
            )]
        );
        assert_eq!(
            of(&request, "code"),
            vec![token(
                "code",
                Some("http://www.nlm.nih.gov/research/umls/rxnorm"),
                Some("582620"),
                None
            )]
        );
        assert!(of(&request, "medication").is_empty());
    }

    #[test]
    fn a_timing_gives_its_events_and_its_bounds() {
        let plan = json!({
            "resourceType": "CarePlan",
            "activity": [{"detail": {
                "status": "scheduled",
                "scheduledTiming": {
                    "event": ["2021-03-01", "2021-03-08"],
                    "repeat": {"boundsPeriod": {"start": "2021-03-01", "end": "2021-03-31"}}
                }
            }}, {"detail": {"status": "scheduled", "scheduledString": "daily"}}]
        });
        assert_eq!(
            of(&plan, "activity-date"),
            vec![
                date(
                    "activity-date",
                    datetime!(2021-03-01 0:00 UTC),
                    datetime!(2021-03-02 0:00 UTC)
                ),
                date(
                    "activity-date",
                    datetime!(2021-03-08 0:00 UTC),
                    datetime!(2021-03-09 0:00 UTC)
                ),
                date(
                    "activity-date",
                    datetime!(2021-03-01 0:00 UTC),
                    datetime!(2021-04-01 0:00 UTC)
                ),
            ]
        );
    }

    #[test]
    fn an_observation_quantity_is_a_range_as_wide_as_its_precision_with_its_units() {
        let observation = json!({
            "resourceType": "Observation",
            "code": {"coding": [{"system": "http://loinc.org", "code": "15074-8"}]},
            "effectivePeriod": {"start": "2013-04-02T09:30:10+01:00", "end": "2013-04-05T10:30:10+01:00"},
            "valueQuantity": {
                "value": 6.3,
                "unit": "mmol/l",
                "system": "http://unitsofmeasure.org",
                "code": "mmol/L"
            }
        });
        let (low, high, units) = only_quantity(&observation, "value-quantity");
        assert!(
            close(low.unwrap(), 6.25) && close(high.unwrap(), 6.35),
            "{low:?} {high:?}"
        );
        assert_eq!(
            units,
            [
                Some("http://unitsofmeasure.org".into()),
                Some("mmol/L".into()),
                Some("mmol/l".into())
            ]
        );
        assert_eq!(
            of(&observation, "date"),
            vec![date(
                "date",
                datetime!(2013-04-02 8:30:10 UTC),
                datetime!(2013-04-05 9:30:11 UTC)
            )]
        );
    }

    #[test]
    fn a_quantity_comparator_opens_one_side() {
        let below = json!({"resourceType": "Observation", "valueQuantity": {"value": 5, "comparator": "<"}});
        assert_eq!(only_quantity(&below, "value-quantity").0, None);
        assert!(close(
            only_quantity(&below, "value-quantity").1.unwrap(),
            5.5
        ));
        let above = json!({"resourceType": "Observation", "valueQuantity": {"value": 5, "comparator": ">="}});
        assert!(close(
            only_quantity(&above, "value-quantity").0.unwrap(),
            4.5
        ));
        assert_eq!(only_quantity(&above, "value-quantity").1, None);
        let without_value = json!({"resourceType": "Observation", "valueQuantity": {"unit": "mg"}});
        assert!(of(&without_value, "value-quantity").is_empty());
    }

    #[test]
    fn an_onset_range_and_money_are_quantities() {
        let condition = json!({
            "resourceType": "Condition",
            "onsetRange": {
                "low": {"value": 20, "unit": "a", "system": "http://unitsofmeasure.org", "code": "a"},
                "high": {"value": 30, "unit": "a", "system": "http://unitsofmeasure.org", "code": "a"}
            }
        });
        let (low, high, units) = only_quantity(&condition, "onset-age");
        assert!(close(low.unwrap(), 19.5) && close(high.unwrap(), 30.5));
        assert_eq!(units[1].as_deref(), Some("a"));
        let open = json!({"resourceType": "Condition", "onsetRange": {"low": {"value": 65}}});
        assert_eq!(only_quantity(&open, "onset-age").1, None);
        let age = json!({"resourceType": "Condition", "onsetAge": {"value": 52, "code": "a"}});
        assert!(close(only_quantity(&age, "onset-age").0.unwrap(), 51.5));

        let charge = json!({"resourceType": "ChargeItem", "priceOverride": {"value": 40.00, "currency": "EUR"}});
        let (low, high, units) = only_quantity(&charge, "price-override");
        assert!(
            close(low.unwrap(), 39.95) && close(high.unwrap(), 40.05),
            "{low:?}"
        );
        assert_eq!(
            units,
            [Some(CURRENCY_SYSTEM.into()), Some("EUR".into()), None]
        );
    }

    #[test]
    fn a_number_covers_the_interval_its_precision_implies() {
        let (low, high) = decimal_range("100").unwrap();
        assert!(close(low, 99.5) && close(high, 100.5));
        let (low, high) = decimal_range("5.40").unwrap();
        assert!(close(low, 5.395) && close(high, 5.405));
        let (low, high) = decimal_range("-0.02").unwrap();
        assert!(close(low, -0.025) && close(high, -0.015));
        let (low, high) = decimal_range("1e2").unwrap();
        assert!(close(low, 50.0) && close(high, 150.0));
        let (low, high) = decimal_range("1.5E-1").unwrap();
        assert!(close(low, 0.145) && close(high, 0.155));
        for bad in ["", "NaN", "inf", "1e999", ".5", "1.", "1,5", "0x10", "--1"] {
            assert_eq!(decimal_range(bad), None, "{bad}");
        }
        let assessment = json!({
            "resourceType": "RiskAssessment",
            "prediction": [{"probabilityDecimal": 0.02}, {"probabilityRange": {"low": {"value": 1}}}]
        });
        match of(&assessment, "probability").as_slice() {
            [IndexValue::Number { low, high, .. }] => {
                assert!(close(*low, 0.015) && close(*high, 0.025), "{low} {high}");
            }
            other => panic!("{other:?}"),
        }
        let variant =
            json!({"resourceType": "MolecularSequence", "variant": [{"start": 128, "end": 129}]});
        assert!(matches!(
            of(&variant, "variant-start").as_slice(),
            [IndexValue::Number { low, .. }] if close(*low, 127.5)
        ));
    }

    #[test]
    fn a_definition_without_its_type_in_front_applies_to_its_one_base() {
        let plan = json!({"resourceType": "InsurancePlan", "name": "Acmé Basic", "alias": ["AB"]});
        assert_eq!(
            of(&plan, "name"),
            vec![
                string("name", "acme basic", "Acmé Basic"),
                string("name", "ab", "AB")
            ]
        );
    }

    #[test]
    fn a_uri_is_kept_as_written() {
        let value_set = json!({
            "resourceType": "ValueSet",
            "url": "http://hl7.org/fhir/ValueSet/example-expansion",
            "status": "draft"
        });
        assert_eq!(
            of(&value_set, "url"),
            vec![IndexValue::Uri {
                param: "url",
                uri: "http://hl7.org/fhir/ValueSet/example-expansion".into()
            }]
        );
    }

    #[test]
    fn a_composite_combines_the_values_of_its_components_on_each_item() {
        let observation = json!({
            "resourceType": "Observation",
            "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9"}]},
            "component": [
                {
                    "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
                    "valueQuantity": {"value": 107, "code": "mm[Hg]"}
                },
                {
                    "code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]},
                    "valueQuantity": {"value": 60, "code": "mm[Hg]"}
                }
            ]
        });
        let composites = of(&observation, "component-code-value-quantity");
        assert_eq!(composites.len(), 2);
        let IndexValue::Composite { parts, .. } = &composites[1] else {
            panic!("{composites:?}")
        };
        assert_eq!(
            parts[0],
            token(
                "component-code",
                Some("http://loinc.org"),
                Some("8462-4"),
                None
            )
        );
        assert!(matches!(
            &parts[1],
            IndexValue::Quantity { param: "component-value-quantity", value_low: Some(low), .. } if close(*low, 59.5)
        ));
        // The Observation has no value of its own, so no code-value pair.
        assert!(of(&observation, "code-value-quantity").is_empty());
        // `combo-` pairs come from the Observation and from each component.
        assert_eq!(of(&observation, "combo-code-value-quantity").len(), 2);
    }

    #[test]
    fn a_composite_component_can_read_the_whole_resource() {
        let sequence = json!({
            "resourceType": "MolecularSequence",
            "coordinateSystem": 0,
            "referenceSeq": {"chromosome": {"coding": [{"code": "1"}]}},
            "variant": [{"start": 10, "end": 20}]
        });
        match of(&sequence, "chromosome-variant-coordinate").as_slice() {
            [IndexValue::Composite { parts, .. }] => {
                assert_eq!(parts.len(), 3);
                assert_eq!(parts[0], token("chromosome", None, Some("1"), None));
                assert_eq!(parts[1].kind(), "number");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn identical_entries_are_kept_once() {
        let patient = json!({
            "resourceType": "Patient",
            "name": [{"given": ["Ann", "Ann"]}, {"given": ["Ann"]}],
            "identifier": [{"system": "urn:x", "value": "1"}, {"system": "urn:x", "value": "1"}]
        });
        assert_eq!(of(&patient, "given").len(), 1);
        assert_eq!(of(&patient, "identifier").len(), 1);
    }

    #[test]
    fn what_is_not_a_resource_has_no_entries() {
        assert!(index_values(&json!({"id": "x"})).is_empty());
        assert!(index_values(&json!({"resourceType": "NoSuchType", "id": "x"})).is_empty());
        assert!(index_values(&json!("Patient")).is_empty());
        let minimal = index_values(&json!({"resourceType": "Basic", "id": "b1"}));
        assert_eq!(minimal, vec![token("_id", None, Some("b1"), None)]);
        assert_eq!(minimal[0].kind(), "token");
    }

    #[test]
    fn meta_gives_last_updated_profile_tag_and_security() {
        let patient = json!({
            "resourceType": "Patient",
            "meta": {
                "lastUpdated": "2024-05-06T07:08:09.123Z",
                "profile": ["http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient"],
                "tag": [{"system": "urn:haven:test", "code": "t1"}],
                "security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"}]
            }
        });
        assert_eq!(
            of(&patient, "_lastUpdated"),
            vec![date(
                "_lastUpdated",
                datetime!(2024-05-06 7:08:09.123 UTC),
                datetime!(2024-05-06 7:08:09.124 UTC)
            )]
        );
        assert_eq!(
            of(&patient, "_profile"),
            vec![IndexValue::Uri {
                param: "_profile",
                uri: "http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient".into()
            }]
        );
        assert_eq!(
            of(&patient, "_tag"),
            vec![token("_tag", Some("urn:haven:test"), Some("t1"), None)]
        );
        assert_eq!(of(&patient, "_security").len(), 1);
    }
}
