//! The values a search parameter finds in a resource, and what they decide: which
//! Patient compartments the resource is in, and whether it meets search criteria.
//!
//! R4 search parameters locate their values with FHIRPath (searchparameter.html).
//! [`extract`] evaluates the subset their definitions use, and a little more:
//! paths from the resource type, unions, `as`/`is`/`ofType()` on choice elements,
//! `where()` with `resolve() is X` or an equality, an indexer, `%resource`,
//! `extension(url)`, the existence and subsetting functions (`exists()`,
//! `first()`, `last()`, ...), `select()`, `iif()` and a few string tests.
//! Navigation is typed by the element tables of [`crate::structure`], so
//! `Observation.value` finds `valueQuantity` and matching can tell a Coding from
//! an Identifier. What the subset cannot evaluate (other functions, arithmetic)
//! yields nothing for its branch of the union instead of an error: one odd
//! definition must not stop the others from being indexed. The same evaluator
//! feeds the search indexes of [`crate::search_index`].

use std::fmt;

use serde_json::Value;

use crate::id::is_valid_id;
use crate::registry::{self, SearchParam, SearchParamType};
use crate::structure::{Child, Children, Kind, TypeDef, STRUCTURES};

/// The values `expression` selects in `resource`, in document order per branch
/// of the union, each value once. Arrays are flattened: an element repeated
/// three times gives three values.
pub fn extract<'a>(resource: &'a Value, expression: &str) -> Vec<&'a Value> {
    let resource_type = resource.get("resourceType").and_then(Value::as_str);
    evaluate(resource, resource_type, expression)
        .into_iter()
        .map(|node| node.value)
        .collect()
}

/// The values of search parameter `code` in a resource of `resource_type`, by the
/// part of the parameter's expression that applies to that type.
pub fn values_for<'a>(resource: &'a Value, resource_type: &str, code: &str) -> Vec<&'a Value> {
    let Some(expression) =
        registry::search_param(resource_type, code).and_then(|p| p.expression_for(resource_type))
    else {
        return Vec::new();
    };
    evaluate(resource, Some(resource_type), &expression)
        .into_iter()
        .map(|node| node.value)
        .collect()
}

/// The extension on a server-made Provenance that names the patients whose
/// compartment its target is in. R4 puts a Provenance in a patient's compartment
/// only when it targets the Patient itself; with this, the Provenance of an
/// Observation is open to whoever may see the Observation, and no more.
pub const PROVENANCE_TARGET_PATIENT: &str = "urn:haven:provenance-target-patient";

/// The ids of the patients whose compartment holds `resource`
/// (compartmentdefinition-patient.html): a Patient's own id and the patients it
/// links to, or for other types the patients referenced through the parameters
/// the CompartmentDefinition lists; for a Provenance also the patients its
/// [`PROVENANCE_TARGET_PATIENT`] extensions name. Each id once, in the order found.
pub fn patient_compartments(resource: &Value) -> Vec<String> {
    let Some(resource_type) = resource.get("resourceType").and_then(Value::as_str) else {
        return Vec::new();
    };
    let mut ids: Vec<String> = Vec::new();
    if resource_type == "Patient" {
        // A patient is in its own compartment, which the definition leaves implicit.
        if let Some(id) = resource
            .get("id")
            .and_then(Value::as_str)
            .filter(|id| is_valid_id(id))
        {
            ids.push(id.to_owned());
        }
    }
    let Some(params) = registry::compartment_params("Patient", resource_type) else {
        return ids;
    };
    for code in params {
        // `{def}` stands for the compartment's own type, not a parameter; only
        // references can name a patient.
        let Some(param) = registry::search_param(resource_type, code)
            .filter(|p| p.kind == SearchParamType::Reference)
        else {
            continue;
        };
        let Some(expression) = param.expression_for(resource_type) else {
            continue;
        };
        for node in evaluate(resource, Some(resource_type), &expression) {
            let Some(target) = reference_text(node.value).and_then(parse_reference) else {
                continue;
            };
            // An absolute reference may name another server's patient with
            // the same id; only relative references name a patient here.
            if target.base.is_some() {
                continue;
            }
            if target.kind == "Patient" && !ids.iter().any(|id| id == target.id) {
                ids.push(target.id.to_owned());
            }
        }
    }
    if resource_type == "Provenance" {
        let named = resource
            .get("extension")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|e| e.get("url").and_then(Value::as_str) == Some(PROVENANCE_TARGET_PATIENT))
            .filter_map(|e| e.get("valueReference"))
            .filter_map(reference_text)
            .filter_map(parse_reference)
            .filter(|target| target.base.is_none());
        for target in named {
            if target.kind == "Patient" && !ids.iter().any(|id| id == target.id) {
                ids.push(target.id.to_owned());
            }
        }
    }
    ids
}

/// Whether `resource` is in the compartment of patient `patient_id`.
pub fn in_patient_compartment(resource: &Value, patient_id: &str) -> bool {
    patient_compartments(resource)
        .iter()
        .any(|id| id == patient_id)
}

/// Whether resources of `resource_type` can be in a Patient compartment at all.
pub fn is_patient_compartment_type(resource_type: &str) -> bool {
    resource_type == "Patient"
        || registry::compartment_params("Patient", resource_type)
            .is_some_and(|params| params.iter().any(|p| p != "{def}"))
}

/// A search criterion [`matches`] cannot evaluate; the message says which and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported(pub String);

impl fmt::Display for Unsupported {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unsupported {}

/// Whether `resource` meets every criterion of `params` (name, value), as a search
/// of its type would find it: parameters combine with AND, the comma-separated
/// values of one parameter with OR (search.html#combining).
///
/// Token, reference, string and uri parameters are evaluated, with the `:not`
/// modifier on tokens and `:exact` on strings. Every other type, modifier,
/// chain or unknown name is an error, checked before anything is matched, so the
/// answer never depends on the order of the criteria.
pub fn matches(resource: &Value, params: &[(String, String)]) -> Result<bool, Unsupported> {
    let resource_type = resource
        .get("resourceType")
        .and_then(Value::as_str)
        .ok_or_else(|| Unsupported("a resource without resourceType cannot be searched".into()))?;
    let criteria = params
        .iter()
        .map(|(name, value)| Criterion::parse(resource_type, name, value))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(criteria
        .iter()
        .all(|criterion| criterion.matches(resource, resource_type)))
}

// --- Matching -------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Modifier {
    None,
    Exact,
    Not,
}

/// One `name=value` of a search, checked and split into its alternatives.
struct Criterion {
    expression: String,
    modifier: Modifier,
    alternatives: Vec<Query>,
}

/// One alternative value, read according to the parameter's type.
enum Query {
    /// `code`, `system|code`, `|code` or `system|` (search.html#token). An empty
    /// system asks for a code without one; no code accepts any code.
    Token {
        system: Option<String>,
        code: Option<String>,
    },
    Text(String),
    /// `Type/id` or an absolute URL (search.html#reference).
    Reference(String),
    Uri(String),
}

impl Criterion {
    fn parse(resource_type: &str, name: &str, value: &str) -> Result<Criterion, Unsupported> {
        let (code, modifier) = match name.split_once(':') {
            Some((code, modifier)) => (code, Some(modifier)),
            None => (name, None),
        };
        if code.contains('.') {
            return Err(Unsupported(format!(
                "chained parameters are not supported: '{name}'"
            )));
        }
        let param = registry::search_param(resource_type, code).ok_or_else(|| {
            Unsupported(format!(
                "unknown search parameter '{code}' for {resource_type}"
            ))
        })?;
        let kind = param.kind;
        if !matches!(
            kind,
            SearchParamType::Token
                | SearchParamType::Reference
                | SearchParamType::String
                | SearchParamType::Uri
        ) {
            return Err(Unsupported(format!(
                "search parameters of type {} are not supported: '{code}'",
                kind.as_str()
            )));
        }
        let modifier = match (kind, modifier) {
            (_, None) => Modifier::None,
            (SearchParamType::String, Some("exact")) => Modifier::Exact,
            (SearchParamType::Token, Some("not")) => Modifier::Not,
            (_, Some(modifier)) => {
                return Err(Unsupported(format!(
                    "modifier ':{modifier}' is not supported on '{code}'"
                )))
            }
        };
        let expression = param.expression_for(resource_type).ok_or_else(|| {
            Unsupported(format!(
                "'{code}' has no expression for {resource_type} to evaluate"
            ))
        })?;
        let alternatives = split_unescaped(value, ',')
            .into_iter()
            .map(|raw| Query::parse(param, raw))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Criterion {
            expression,
            modifier,
            alternatives,
        })
    }

    fn matches(&self, resource: &Value, resource_type: &str) -> bool {
        let nodes = evaluate(resource, Some(resource_type), &self.expression);
        let exact = self.modifier == Modifier::Exact;
        let found = self
            .alternatives
            .iter()
            .any(|query| nodes.iter().any(|node| query.matches(node, exact)));
        // `:not` also selects resources with no value at all (search.html#modifiers).
        if self.modifier == Modifier::Not {
            !found
        } else {
            found
        }
    }
}

impl Query {
    fn parse(param: &SearchParam, raw: &str) -> Result<Query, Unsupported> {
        Ok(match param.kind {
            SearchParamType::Token => match split_unescaped(raw, '|').first() {
                Some(system) if system.len() < raw.len() => {
                    let code = &raw[system.len() + 1..];
                    Query::Token {
                        system: Some(unescape(system)),
                        code: (!code.is_empty()).then(|| unescape(code)),
                    }
                }
                _ => Query::Token {
                    system: None,
                    code: Some(unescape(raw)),
                },
            },
            SearchParamType::String => Query::Text(unescape(raw)),
            SearchParamType::Uri => Query::Uri(unescape(raw)),
            SearchParamType::Reference => {
                let text = unescape(raw);
                if is_valid_id(&text) {
                    // A bare id is only unambiguous when the parameter targets one type.
                    match param.target.as_slice() {
                        [only] => Query::Reference(format!("{only}/{text}")),
                        targets => {
                            return Err(Unsupported(format!(
                                "'{text}' needs a resource type: '{}' may refer to {}",
                                param.code,
                                targets.join(", ")
                            )))
                        }
                    }
                } else {
                    Query::Reference(text)
                }
            }
            other => {
                return Err(Unsupported(format!(
                    "search parameters of type {} are not supported",
                    other.as_str()
                )))
            }
        })
    }

    fn matches(&self, node: &Node<'_>, exact: bool) -> bool {
        match self {
            Query::Token { system, code } => {
                token_matches(system.as_deref(), code.as_deref(), node)
            }
            Query::Text(text) => string_matches(text, exact, node),
            Query::Reference(reference) => reference_matches(reference, node.value),
            Query::Uri(uri) => node.value.as_str() == Some(uri.as_str()),
        }
    }
}

/// What a value is, for matching: from its element type when the tables know
/// it, else guessed from its properties.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Primitive,
    Coding,
    CodeableConcept,
    Identifier,
    ContactPoint,
    HumanName,
    Address,
    Other,
}

fn shape(node: &Node<'_>) -> Shape {
    let Some(object) = node.value.as_object() else {
        return match node.value {
            Value::String(_) | Value::Bool(_) | Value::Number(_) => Shape::Primitive,
            _ => Shape::Other,
        };
    };
    if let Some(ty) = node.ty {
        return match ty.code {
            "Coding" => Shape::Coding,
            "CodeableConcept" => Shape::CodeableConcept,
            "Identifier" => Shape::Identifier,
            "ContactPoint" => Shape::ContactPoint,
            "HumanName" => Shape::HumanName,
            "Address" => Shape::Address,
            _ => Shape::Other,
        };
    }
    let has = |keys: &[&str]| keys.iter().any(|k| object.contains_key(*k));
    if has(&["coding"]) {
        Shape::CodeableConcept
    } else if has(&["family", "given"]) {
        Shape::HumanName
    } else if has(&["line", "city", "district", "state", "postalCode", "country"]) {
        Shape::Address
    } else if has(&["reference"]) {
        Shape::Other
    } else if has(&["code"]) {
        Shape::Coding
    } else if has(&["value"]) {
        Shape::Identifier
    } else {
        Shape::Other
    }
}

/// Token matching per data type (search.html#token): codes and systems compare
/// exactly.
fn token_matches(system: Option<&str>, code: Option<&str>, node: &Node<'_>) -> bool {
    let value = node.value;
    match shape(node) {
        Shape::Coding => coded(system, code, value.get("system"), value.get("code")),
        Shape::CodeableConcept => {
            value
                .get("coding")
                .and_then(Value::as_array)
                .is_some_and(|codings| {
                    codings
                        .iter()
                        .any(|c| coded(system, code, c.get("system"), c.get("code")))
                })
        }
        Shape::Identifier => coded(system, code, value.get("system"), value.get("value")),
        // ContactPoint.system is a code (phone, email), not a URI: only the value
        // is a token, as for a primitive.
        Shape::ContactPoint => {
            system.is_none_or(str::is_empty)
                && code.is_some_and(|c| value.get("value").and_then(Value::as_str) == Some(c))
        }
        // A primitive has no system of its own, so only `code` and `|code` match.
        Shape::Primitive => {
            system.is_none_or(str::is_empty)
                && code.is_some_and(|c| primitive_text(value).as_deref() == Some(c))
        }
        _ => false,
    }
}

fn coded(
    system: Option<&str>,
    code: Option<&str>,
    actual_system: Option<&Value>,
    actual_code: Option<&Value>,
) -> bool {
    let actual_system = actual_system.and_then(Value::as_str);
    let actual_code = actual_code.and_then(Value::as_str);
    let system_ok = match system {
        None => true,
        Some("") => actual_system.is_none(),
        Some(system) => actual_system == Some(system),
    };
    system_ok && code.is_none_or(|code| actual_code == Some(code))
}

fn primitive_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// String matching (search.html#string): by default a case-insensitive prefix of
/// any part of the value, with `:exact` the whole part, case included.
fn string_matches(query: &str, exact: bool, node: &Node<'_>) -> bool {
    let keys: &[&str] = match shape(node) {
        Shape::Primitive => {
            return node
                .value
                .as_str()
                .is_some_and(|text| string_part_matches(query, exact, text))
        }
        Shape::HumanName => &["family", "given", "text", "prefix", "suffix"],
        Shape::Address => &[
            "line",
            "city",
            "district",
            "state",
            "postalCode",
            "country",
            "text",
        ],
        _ => return false,
    };
    keys.iter()
        .filter_map(|key| node.value.get(*key))
        .flat_map(|part| match part {
            Value::Array(items) => items.iter().collect(),
            other => vec![other],
        })
        .filter_map(Value::as_str)
        .any(|text| string_part_matches(query, exact, text))
}

fn string_part_matches(query: &str, exact: bool, text: &str) -> bool {
    if exact {
        text == query
    } else {
        text.to_lowercase().starts_with(&query.to_lowercase())
    }
}

/// Whether a Reference (or a canonical/uri string) points at `query`. The model
/// does not know the server's base URL, so a relative reference and an absolute
/// one match when type and id agree; two absolute ones also need the same base.
fn reference_matches(query: &str, value: &Value) -> bool {
    let Some(actual) = reference_text(value) else {
        return false;
    };
    match (parse_reference(query), parse_reference(actual)) {
        (Some(q), Some(a)) => {
            q.kind == a.kind
                && q.id == a.id
                && (q.base.is_none() || a.base.is_none() || q.base == a.base)
        }
        _ => query == actual,
    }
}

/// The reference string of a Reference, or a canonical/uri value itself.
pub(crate) fn reference_text(value: &Value) -> Option<&str> {
    match value {
        Value::String(text) => Some(text),
        Value::Object(object) => object.get("reference").and_then(Value::as_str),
        _ => None,
    }
}

/// A literal reference taken apart (references.html#literal).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Target<'a> {
    /// The service base of an absolute reference.
    pub(crate) base: Option<&'a str>,
    pub(crate) kind: &'a str,
    pub(crate) id: &'a str,
    /// The version a `/_history/` suffix names.
    pub(crate) version: Option<&'a str>,
}

/// `Patient/1`, `Patient/1/_history/2` or `https://host/fhir/Patient/1`; `None`
/// for contained (`#p1`), `urn:` and other references naming no resource type.
pub(crate) fn parse_reference(reference: &str) -> Option<Target<'_>> {
    if reference.starts_with('#') {
        return None;
    }
    // The version does not change whose resource it is.
    let (reference, version) = match reference.split_once("/_history/") {
        Some((reference, version)) => (reference, Some(version)),
        None => (reference, None),
    };
    let (rest, id) = reference.rsplit_once('/')?;
    let (base, kind) = match rest.rsplit_once('/') {
        Some((base, kind)) if base.contains("://") => (Some(base), kind),
        Some(_) => return None,
        None => (None, rest),
    };
    (registry::is_resource_type(kind) && is_valid_id(id)).then_some(Target {
        base,
        kind,
        id,
        version,
    })
}

/// Splits at each `separator` not escaped with a backslash (search.html#escaping).
fn split_unescaped(value: &str, separator: char) -> Vec<&str> {
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

/// Removes the escapes search.html#escaping defines: `\,`, `\|`, `\$` and `\\`.
fn unescape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(next) = chars.next_if(|n| matches!(n, ',' | '|' | '$' | '\\')) {
                out.push(next);
                continue;
            }
        }
        out.push(c);
    }
    out
}

// --- Evaluation -----------------------------------------------------------------

/// The FHIR type of a value, when the element tables know it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ty {
    /// The type code: `Quantity`, `string`, `BackboneElement`, `Patient`, ...
    pub(crate) code: &'static str,
    /// Where the value's own children are defined: a type and a path in it.
    def: Option<&'static TypeDef>,
    path: &'static str,
}

impl Ty {
    fn children(self) -> Option<&'static Children> {
        self.def?.children.get(self.path)
    }

    /// Whether this type is `wanted` or derives from it (an `Age` is a `Quantity`).
    pub(crate) fn is_a(self, wanted: &str) -> bool {
        conforms(self.code, wanted)
    }
}

/// The resource or data type called `name`.
fn named_type(name: &str) -> Option<Ty> {
    let (code, def) = STRUCTURES.types.get_key_value(name)?;
    Some(Ty {
        code,
        def: Some(def),
        path: code,
    })
}

/// The type of `value`, held by element `child` of an object defined in `parent`.
fn child_type(parent: &'static TypeDef, child: &'static Child, value: &Value) -> Option<Ty> {
    // Contained resources and Bundle entries are typed by their content.
    if child.type_code == "Resource" {
        return value
            .get("resourceType")
            .and_then(Value::as_str)
            .and_then(named_type);
    }
    // Inline elements (BackboneElement) have their children in the same definition.
    if parent.children.contains_key(&child.children_path) {
        return Some(Ty {
            code: &child.type_code,
            def: Some(parent),
            path: &child.children_path,
        });
    }
    named_type(&child.type_code).or(Some(Ty {
        code: &child.type_code,
        def: None,
        path: "",
    }))
}

/// The data type a choice element's JSON suffix names: `Quantity` for
/// `valueQuantity`, `dateTime` for `onsetDateTime` (json.html#choice).
fn choice_suffix_type(suffix: &str) -> Option<Ty> {
    if !suffix.starts_with(|c: char| c.is_ascii_uppercase()) {
        return None;
    }
    let mut lowered = suffix.to_owned();
    lowered[..1].make_ascii_lowercase();
    named_type(suffix)
        .or_else(|| named_type(&lowered))
        .filter(|ty| ty.def.is_some_and(|def| def.kind != Kind::Resource))
}

/// A value inside the resource, with its type when known.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Node<'a> {
    pub(crate) value: &'a Value,
    pub(crate) ty: Option<Ty>,
}

/// An item of a FHIRPath collection.
#[derive(Debug, Clone)]
pub(crate) enum Item<'a> {
    Node(Node<'a>),
    Bool(bool),
    Text(String),
    Number(f64),
    /// All `resolve()` can know without a store: the type a reference points to.
    Target(&'a str),
}

impl<'a> Item<'a> {
    /// The item's type name, for `is`, `as` and a leading type in a path.
    fn type_name(&self) -> Option<&'a str> {
        match self {
            Item::Node(node) => match node.ty {
                Some(ty) => Some(ty.code),
                None => node.value.get("resourceType").and_then(Value::as_str),
            },
            Item::Bool(_) => Some("boolean"),
            Item::Text(_) => Some("string"),
            Item::Number(_) => Some("decimal"),
            Item::Target(kind) => Some(kind),
        }
    }

    fn is_a(&self, wanted: &str) -> bool {
        self.type_name().is_some_and(|code| conforms(code, wanted))
    }

    /// The text of a string value or a computed string.
    fn text(&self) -> Option<&str> {
        match self {
            Item::Node(node) => node.value.as_str(),
            Item::Text(text) => Some(text),
            _ => None,
        }
    }
}

/// Whether type `code` is `wanted` or derives from it (`Age` is a `Quantity`,
/// `Patient` a `DomainResource`). `System.String` and `FHIR.string` both name
/// `string`: FHIRPath type names differ from FHIR ones in the first letter only.
fn conforms(code: &str, wanted: &str) -> bool {
    let wanted = wanted.rsplit('.').next().unwrap_or(wanted);
    let same = |name: &str| {
        let (mut a, mut b) = (name.chars(), wanted.chars());
        match (a.next(), b.next()) {
            (Some(x), Some(y)) => x.eq_ignore_ascii_case(&y) && a.as_str() == b.as_str(),
            _ => false,
        }
    };
    let mut current = Some(code);
    // The chains are short (Age, Quantity, Element); the bound only guards the loop.
    for _ in 0..16 {
        let Some(name) = current else { break };
        if same(name) {
            return true;
        }
        current = STRUCTURES.types.get(name).and_then(|t| t.base.as_deref());
    }
    false
}

/// Whether `name` names a type `is`, `as` and `ofType()` can test: a FHIR type
/// (either case of its first letter) or a FHIRPath system type.
fn is_known_type(name: &str) -> bool {
    const SYSTEM_TYPES: [&str; 8] = [
        "Boolean", "String", "Integer", "Decimal", "Date", "DateTime", "Time", "Quantity",
    ];
    let name = name.rsplit('.').next().unwrap_or(name);
    if SYSTEM_TYPES.contains(&name) || STRUCTURES.types.contains_key(name) {
        return true;
    }
    let mut lowered = name.to_owned();
    if let Some(first) = lowered.get_mut(..1) {
        first.make_ascii_lowercase();
    }
    STRUCTURES.types.contains_key(&lowered)
}

/// An expression parsed once, to be evaluated on many resources. Each top-level
/// branch of a union is parsed on its own, so a branch the subset cannot read
/// loses only its own values.
#[derive(Debug, Clone)]
pub(crate) struct Compiled {
    branches: Vec<Expr>,
}

impl Compiled {
    pub(crate) fn new(expression: &str) -> Compiled {
        Compiled {
            branches: union_branches(expression)
                .into_iter()
                .filter_map(parse)
                .collect(),
        }
    }

    /// The items selected from `resource`, computed ones (booleans, strings)
    /// included, each value once.
    pub(crate) fn evaluate<'a>(
        &self,
        resource: &'a Value,
        resource_type: Option<&str>,
    ) -> Vec<Item<'a>> {
        let root = root_item(resource, resource_type);
        self.evaluate_on(std::slice::from_ref(&root), &root)
    }

    /// The items selected from `focus`, with `resource` as `%resource`: how a
    /// composite's components are evaluated on each value of the composite.
    pub(crate) fn evaluate_on<'a>(&self, focus: &[Item<'a>], resource: &Item<'a>) -> Vec<Item<'a>> {
        let env = Env {
            resource: resource.clone(),
        };
        let mut found: Vec<Item<'a>> = Vec::new();
        for expr in &self.branches {
            for item in eval(expr, focus, &env) {
                push_unique(&mut found, item);
            }
        }
        found
    }
}

/// The resource as the input of an expression, typed by `resource_type`.
pub(crate) fn root_item<'a>(resource: &'a Value, resource_type: Option<&str>) -> Item<'a> {
    Item::Node(Node {
        value: resource,
        ty: resource_type.and_then(named_type),
    })
}

/// The values of the resource `expression` selects; computed items (booleans,
/// strings) are not values of the resource and are left out.
fn evaluate<'a>(
    resource: &'a Value,
    resource_type: Option<&str>,
    expression: &str,
) -> Vec<Node<'a>> {
    Compiled::new(expression)
        .evaluate(resource, resource_type)
        .into_iter()
        .filter_map(|item| match item {
            Item::Node(node) => Some(node),
            _ => None,
        })
        .collect()
}

/// Why the evaluator cannot evaluate `expression` in full, or `None` when it
/// can: a branch outside the grammar it parses, or a function, variable or type
/// it does not know.
pub fn why_unsupported(expression: &str) -> Option<String> {
    union_branches(expression).into_iter().find_map(|branch| {
        let Some(expr) = parse(branch) else {
            return Some(format!("'{branch}' is outside the parsed grammar"));
        };
        unknown_in(&expr)
    })
}

fn unknown_in(expr: &Expr) -> Option<String> {
    match expr {
        Expr::This | Expr::Literal(_) | Expr::Empty => None,
        // An element name can be anything; a capitalised name is a type filter.
        Expr::Name(name) => (name.starts_with(|c: char| c.is_ascii_uppercase())
            && !is_known_type(name))
        .then(|| format!("unknown type {name}")),
        Expr::Variable(name) => {
            (!VARIABLES.contains(&name.as_str())).then(|| format!("unknown variable %{name}"))
        }
        Expr::Member(base, _) => unknown_in(base),
        Expr::Is(base, ty) | Expr::As(base, ty) => {
            unknown_in(base).or_else(|| (!is_known_type(ty)).then(|| format!("unknown type {ty}")))
        }
        Expr::Call { target, name, args } => {
            if !FUNCTIONS.contains(&(name.as_str(), args.len())) {
                return Some(format!(
                    "unknown function {name}() with {} argument(s)",
                    args.len()
                ));
            }
            if matches!(name.as_str(), "as" | "is" | "ofType") {
                return match type_argument(&args[0]) {
                    Some(ty) if is_known_type(ty) => target.as_deref().and_then(unknown_in),
                    Some(ty) => Some(format!("unknown type {ty}")),
                    None => Some(format!("{name}() needs a type name")),
                };
            }
            target
                .as_deref()
                .and_then(unknown_in)
                .or_else(|| args.iter().find_map(unknown_in))
        }
        Expr::Index(a, b) | Expr::Binary(_, a, b) => unknown_in(a).or_else(|| unknown_in(b)),
    }
}

/// The functions [`call`] evaluates, by name and number of arguments.
const FUNCTIONS: &[(&str, usize)] = &[
    ("where", 1),
    ("select", 1),
    ("exists", 0),
    ("exists", 1),
    ("all", 1),
    ("empty", 0),
    ("not", 0),
    ("first", 0),
    ("last", 0),
    ("tail", 0),
    ("skip", 1),
    ("take", 1),
    ("single", 0),
    ("count", 0),
    ("distinct", 0),
    ("hasValue", 0),
    ("iif", 2),
    ("iif", 3),
    ("trace", 1),
    ("resolve", 0),
    ("extension", 1),
    ("as", 1),
    ("ofType", 1),
    ("is", 1),
    ("lower", 0),
    ("upper", 0),
    ("startsWith", 1),
    ("endsWith", 1),
    ("contains", 1),
];

/// The environment variables an expression may name (fhirpath.html#vars,
/// fhir-path.html#variables). A search evaluates on the resource itself, so
/// `%context` is the resource too.
const VARIABLES: &[&str] = &[
    "resource",
    "rootResource",
    "context",
    "ucum",
    "sct",
    "loinc",
];

/// What `%resource` and its kin stand for during one evaluation.
struct Env<'a> {
    resource: Item<'a>,
}

impl<'a> Env<'a> {
    fn variable(&self, name: &str) -> Vec<Item<'a>> {
        match name {
            "resource" | "rootResource" | "context" => vec![self.resource.clone()],
            "ucum" => vec![Item::Text("http://unitsofmeasure.org".into())],
            "sct" => vec![Item::Text("http://snomed.info/sct".into())],
            "loinc" => vec![Item::Text("http://loinc.org".into())],
            _ => Vec::new(),
        }
    }
}

fn push_unique<'a>(items: &mut Vec<Item<'a>>, item: Item<'a>) {
    if let Item::Node(node) = &item {
        let seen = items
            .iter()
            .any(|i| matches!(i, Item::Node(n) if std::ptr::eq(n.value, node.value)));
        if seen {
            return;
        }
    }
    items.push(item);
}

fn eval<'a>(expr: &Expr, focus: &[Item<'a>], env: &Env<'a>) -> Vec<Item<'a>> {
    match expr {
        Expr::This => focus.to_vec(),
        Expr::Empty => Vec::new(),
        Expr::Literal(item) => vec![match item {
            Literal::Bool(b) => Item::Bool(*b),
            Literal::Text(t) => Item::Text(t.clone()),
            Literal::Number(n) => Item::Number(*n),
        }],
        Expr::Variable(name) => env.variable(name),
        Expr::Name(name) => {
            let mut out = Vec::new();
            for item in focus {
                // A leading type name filters the context (fhirpath.html#paths):
                // `Observation.code` says nothing of a Patient. Element names never
                // start with a capital.
                if name.starts_with(|c: char| c.is_ascii_uppercase()) {
                    if item.is_a(name) {
                        out.push(item.clone());
                    }
                } else if let Item::Node(node) = item {
                    navigate(*node, name, &mut out);
                }
            }
            out
        }
        Expr::Member(base, name) => {
            let mut out = Vec::new();
            for item in eval(base, focus, env) {
                if let Item::Node(node) = item {
                    navigate(node, name, &mut out);
                }
            }
            out
        }
        Expr::Call { target, name, args } => {
            let input = match target {
                Some(target) => eval(target, focus, env),
                None => focus.to_vec(),
            };
            call(name, args, input, env)
        }
        Expr::Index(base, index) => match eval(index, focus, env).as_slice() {
            [Item::Number(n)] if *n >= 0.0 && n.fract() == 0.0 => eval(base, focus, env)
                .into_iter()
                .nth(*n as usize)
                .into_iter()
                .collect(),
            _ => Vec::new(),
        },
        Expr::Is(operand, ty) => match eval(operand, focus, env).as_slice() {
            [item] => vec![Item::Bool(item.is_a(ty))],
            _ => Vec::new(),
        },
        // Lenient like the R4 search definitions expect: `as` filters a
        // collection rather than failing on more than one item.
        Expr::As(operand, ty) => eval(operand, focus, env)
            .into_iter()
            .filter(|item| item.is_a(ty))
            .collect(),
        Expr::Binary(op, left, right) => {
            let (left, right) = (eval(left, focus, env), eval(right, focus, env));
            match op {
                Op::Union => {
                    let mut out = Vec::new();
                    for item in left.into_iter().chain(right) {
                        push_unique(&mut out, item);
                    }
                    out
                }
                Op::Equal | Op::NotEqual => {
                    if left.is_empty() || right.is_empty() {
                        return Vec::new();
                    }
                    let equal = left.len() == right.len()
                        && left.iter().zip(&right).all(|(a, b)| same_value(a, b));
                    vec![Item::Bool(equal == (*op == Op::Equal))]
                }
                Op::And => match (truth(&left), truth(&right)) {
                    (Some(false), _) | (_, Some(false)) => vec![Item::Bool(false)],
                    (Some(true), Some(true)) => vec![Item::Bool(true)],
                    _ => Vec::new(),
                },
                Op::Or => match (truth(&left), truth(&right)) {
                    (Some(true), _) | (_, Some(true)) => vec![Item::Bool(true)],
                    (Some(false), Some(false)) => vec![Item::Bool(false)],
                    _ => Vec::new(),
                },
            }
        }
    }
}

/// The JSON values of `name` in `node`: arrays flattened, a choice element found
/// under its typed names, each value typed when the tables know the element.
fn navigate<'a>(node: Node<'a>, name: &str, out: &mut Vec<Item<'a>>) {
    let Some(object) = node.value.as_object() else {
        return;
    };
    if let Some((def, children)) = node.ty.and_then(|ty| Some((ty.def?, ty.children()?))) {
        if let Some(child) = children.by_name.get(name) {
            if let Some(value) = object.get(name) {
                push_values(value, |v| child_type(def, child, v), out);
            }
            return;
        }
        let mut known = false;
        for (json_name, child) in &children.by_name {
            if child.is_choice && child.element == name {
                known = true;
                if let Some(value) = object.get(json_name) {
                    push_values(value, |v| child_type(def, child, v), out);
                }
            }
        }
        if known {
            return;
        }
    }
    // An element the tables do not know: read the JSON as it is.
    if let Some(value) = object.get(name) {
        push_values(value, |_| None, out);
        return;
    }
    for (key, value) in object {
        if let Some(ty) = key.strip_prefix(name).and_then(choice_suffix_type) {
            push_values(value, |_| Some(ty), out);
        }
    }
}

fn push_values<'a>(value: &'a Value, ty: impl Fn(&Value) -> Option<Ty>, out: &mut Vec<Item<'a>>) {
    let mut push = |v: &'a Value| {
        // `null` only holds the place of a primitive's extension (json.html#primitive).
        if !v.is_null() {
            out.push(Item::Node(Node {
                value: v,
                ty: ty(v),
            }));
        }
    };
    match value {
        Value::Array(items) => items.iter().for_each(&mut push),
        other => push(other),
    }
}

fn call<'a>(name: &str, args: &[Expr], input: Vec<Item<'a>>, env: &Env<'a>) -> Vec<Item<'a>> {
    let holds = |criteria: &Expr, item: &Item<'a>| {
        truth(&eval(criteria, std::slice::from_ref(item), env)) == Some(true)
    };
    // An argument that is not about each item (a count, a URL) is evaluated once.
    let count_argument = |arg: &Expr| match eval(arg, &input, env).as_slice() {
        [Item::Number(n)] if *n >= 0.0 && n.fract() == 0.0 => Some(*n as usize),
        _ => None,
    };
    let text_argument = |arg: &Expr| match eval(arg, &input, env).as_slice() {
        [item] => item.text().map(str::to_owned),
        _ => None,
    };
    let single_text = || match input.as_slice() {
        [item] => item.text(),
        _ => None,
    };
    match (name, args) {
        ("where", [criteria]) => input
            .iter()
            .filter(|item| holds(criteria, item))
            .cloned()
            .collect(),
        ("select", [projection]) => {
            let mut out = Vec::new();
            for item in &input {
                out.extend(eval(projection, std::slice::from_ref(item), env));
            }
            out
        }
        ("exists", []) => vec![Item::Bool(!input.is_empty())],
        ("exists", [criteria]) => vec![Item::Bool(input.iter().any(|i| holds(criteria, i)))],
        ("all", [criteria]) => vec![Item::Bool(input.iter().all(|i| holds(criteria, i)))],
        ("empty", []) => vec![Item::Bool(input.is_empty())],
        ("not", []) => match truth(&input) {
            Some(b) => vec![Item::Bool(!b)],
            None => Vec::new(),
        },
        ("first", []) => input.into_iter().take(1).collect(),
        ("last", []) => input.into_iter().last().into_iter().collect(),
        ("tail", []) => input.into_iter().skip(1).collect(),
        ("skip", [n]) => match count_argument(n) {
            Some(n) => input.into_iter().skip(n).collect(),
            None => Vec::new(),
        },
        ("take", [n]) => match count_argument(n) {
            Some(n) => input.into_iter().take(n).collect(),
            None => Vec::new(),
        },
        // FHIRPath makes more than one item an error; no item is as close as it gets.
        ("single", []) => match input.len() {
            1 => input,
            _ => Vec::new(),
        },
        ("count", []) => vec![Item::Number(input.len() as f64)],
        ("distinct", []) => {
            let mut out: Vec<Item<'a>> = Vec::new();
            for item in input {
                if !out.iter().any(|seen| same_value(seen, &item)) {
                    out.push(item);
                }
            }
            out
        }
        ("hasValue", []) => vec![Item::Bool(matches!(
            input.as_slice(),
            [Item::Node(node)] if matches!(node.value, Value::String(_) | Value::Bool(_) | Value::Number(_))
        ))],
        ("iif", [criterion, then, rest @ ..]) => {
            if truth(&eval(criterion, &input, env)) == Some(true) {
                eval(then, &input, env)
            } else {
                rest.first()
                    .map(|otherwise| eval(otherwise, &input, env))
                    .unwrap_or_default()
            }
        }
        ("trace", [_]) => input,
        ("resolve", []) => input
            .iter()
            .filter_map(|item| match item {
                Item::Node(node) => reference_text(node.value).and_then(parse_reference),
                _ => None,
            })
            .map(|target| Item::Target(target.kind))
            .collect(),
        ("extension", [url]) => {
            let Some(url) = text_argument(url) else {
                return Vec::new();
            };
            let extension_type = named_type("Extension");
            let mut out = Vec::new();
            for item in &input {
                let Item::Node(node) = item else { continue };
                let extensions = node.value.get("extension").and_then(Value::as_array);
                for extension in extensions.into_iter().flatten() {
                    if extension.get("url").and_then(Value::as_str) == Some(url.as_str()) {
                        out.push(Item::Node(Node {
                            value: extension,
                            ty: extension_type,
                        }));
                    }
                }
            }
            out
        }
        ("as" | "ofType", [ty]) => match type_argument(ty) {
            Some(ty) => input.into_iter().filter(|item| item.is_a(ty)).collect(),
            None => Vec::new(),
        },
        ("is", [ty]) => match (type_argument(ty), input.as_slice()) {
            (Some(ty), [item]) => vec![Item::Bool(item.is_a(ty))],
            _ => Vec::new(),
        },
        ("lower", []) => single_text()
            .map(|text| Item::Text(text.to_lowercase()))
            .into_iter()
            .collect(),
        ("upper", []) => single_text()
            .map(|text| Item::Text(text.to_uppercase()))
            .into_iter()
            .collect(),
        ("startsWith" | "endsWith" | "contains", [part]) => {
            match (single_text(), text_argument(part)) {
                (Some(text), Some(part)) => vec![Item::Bool(match name {
                    "startsWith" => text.starts_with(&part),
                    "endsWith" => text.ends_with(&part),
                    _ => text.contains(&part),
                })],
                _ => Vec::new(),
            }
        }
        _ => Vec::new(),
    }
}

/// The type named by a function argument: `Quantity` or `FHIR.Quantity`.
fn type_argument(expr: &Expr) -> Option<&str> {
    match expr {
        Expr::Name(name) => Some(name),
        Expr::Member(base, name) if matches!(**base, Expr::Name(_)) => Some(name),
        _ => None,
    }
}

/// A collection as a boolean (fhirpath.html#singleton): empty is unknown, one
/// boolean is itself, any other single item is true.
fn truth(items: &[Item<'_>]) -> Option<bool> {
    match items {
        [Item::Bool(b)] => Some(*b),
        [_] => Some(true),
        _ => None,
    }
}

fn same_value(a: &Item<'_>, b: &Item<'_>) -> bool {
    match (a, b) {
        (Item::Node(x), Item::Node(y)) => x.value == y.value,
        (Item::Node(n), other) | (other, Item::Node(n)) => match other {
            Item::Bool(b) => n.value.as_bool() == Some(*b),
            Item::Text(t) => n.value.as_str() == Some(t.as_str()),
            Item::Number(x) => n.value.as_f64() == Some(*x),
            _ => false,
        },
        (Item::Bool(x), Item::Bool(y)) => x == y,
        (Item::Text(x), Item::Text(y)) => x == y,
        (Item::Number(x), Item::Number(y)) => x == y,
        (Item::Target(x), Item::Target(y)) => x == y,
        _ => false,
    }
}

// --- Parsing --------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum Expr {
    This,
    /// `{}`, the empty collection.
    Empty,
    Literal(Literal),
    /// `%resource` and the other environment variables.
    Variable(String),
    /// The first identifier of a path: a type name or an element of the focus.
    Name(String),
    Member(Box<Expr>, String),
    Call {
        target: Option<Box<Expr>>,
        name: String,
        args: Vec<Expr>,
    },
    Index(Box<Expr>, Box<Expr>),
    Is(Box<Expr>, String),
    As(Box<Expr>, String),
    Binary(Op, Box<Expr>, Box<Expr>),
}

#[derive(Debug, Clone, PartialEq)]
enum Literal {
    Bool(bool),
    Text(String),
    Number(f64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Union,
    Equal,
    NotEqual,
    And,
    Or,
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    Text(String),
    Number(f64),
    Symbol(char),
    NotEqual,
    This,
    Variable(String),
    EmptySet,
}

/// Caps that keep the recursive parser and evaluator off the end of the stack
/// whatever the input; the R4 definitions stay far below them.
const MAX_TOKENS: usize = 256;
const MAX_NESTING: usize = 32;

/// Splits an expression at its top-level `|`, outside parentheses and strings.
fn union_branches(expression: &str) -> Vec<&str> {
    let mut branches = Vec::new();
    let mut depth = 0usize;
    let mut quote: Option<char> = None;
    let mut escaped = false;
    let mut start = 0;
    for (i, c) in expression.char_indices() {
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '\'' | '`' => quote = Some(c),
            '(' | '[' => depth += 1,
            ')' | ']' => depth = depth.saturating_sub(1),
            '|' if depth == 0 => {
                branches.push(expression[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    branches.push(expression[start..].trim());
    branches.retain(|b| !b.is_empty());
    branches
}

fn parse(source: &str) -> Option<Expr> {
    let tokens = tokenize(source)?;
    if tokens.len() > MAX_TOKENS {
        return None;
    }
    let mut parser = Parser {
        tokens,
        at: 0,
        nesting: 0,
    };
    let expr = parser.expression()?;
    (parser.at == parser.tokens.len()).then_some(expr)
}

fn tokenize(source: &str) -> Option<Vec<Token>> {
    let chars: Vec<char> = source.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    let word = |i: &mut usize| {
        let start = *i;
        while *i < chars.len() && (chars[*i].is_alphanumeric() || chars[*i] == '_') {
            *i += 1;
        }
        chars[start..*i].iter().collect::<String>()
    };
    while i < chars.len() {
        let c = chars[i];
        match c {
            c if c.is_whitespace() => i += 1,
            '.' | '(' | ')' | '[' | ']' | '|' | ',' | '=' => {
                tokens.push(Token::Symbol(c));
                i += 1;
            }
            '!' if chars.get(i + 1) == Some(&'=') => {
                tokens.push(Token::NotEqual);
                i += 2;
            }
            '\'' | '`' => {
                let mut text = String::new();
                i += 1;
                loop {
                    match *chars.get(i)? {
                        q if q == c => break,
                        '\\' => {
                            i += 1;
                            text.push(match *chars.get(i)? {
                                'n' => '\n',
                                't' => '\t',
                                'r' => '\r',
                                other => other,
                            });
                        }
                        other => text.push(other),
                    }
                    i += 1;
                }
                i += 1;
                tokens.push(if c == '`' {
                    Token::Ident(text)
                } else {
                    Token::Text(text)
                });
            }
            '$' => {
                i += 1;
                if word(&mut i) != "this" {
                    return None;
                }
                tokens.push(Token::This);
            }
            '%' => {
                i += 1;
                let name = if chars.get(i) == Some(&'`') {
                    let end = i + 1 + chars[i + 1..].iter().position(|&c| c == '`')?;
                    let name: String = chars[i + 1..end].iter().collect();
                    i = end + 1;
                    name
                } else {
                    word(&mut i)
                };
                if name.is_empty() {
                    return None;
                }
                tokens.push(Token::Variable(name));
            }
            '{' => {
                i += 1;
                while chars.get(i).is_some_and(|c| c.is_whitespace()) {
                    i += 1;
                }
                if chars.get(i) != Some(&'}') {
                    return None;
                }
                i += 1;
                tokens.push(Token::EmptySet);
            }
            c if c.is_ascii_digit() => {
                let start = i;
                while i < chars.len() && chars[i].is_ascii_digit() {
                    i += 1;
                }
                if chars.get(i) == Some(&'.') && chars.get(i + 1).is_some_and(char::is_ascii_digit)
                {
                    i += 1;
                    while i < chars.len() && chars[i].is_ascii_digit() {
                        i += 1;
                    }
                }
                let text: String = chars[start..i].iter().collect();
                tokens.push(Token::Number(text.parse().ok()?));
            }
            c if c.is_alphabetic() || c == '_' => tokens.push(Token::Ident(word(&mut i))),
            _ => return None,
        }
    }
    Some(tokens)
}

/// Recursive descent over the FHIRPath grammar, by precedence from loosest:
/// `or`, `and`, `=`/`!=`, `|`, `is`/`as`, then `.` and `[]` (fhirpath.html#operator-precedence).
struct Parser {
    tokens: Vec<Token>,
    at: usize,
    nesting: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn eat(&mut self, symbol: char) -> bool {
        let found = self.peek() == Some(&Token::Symbol(symbol));
        if found {
            self.at += 1;
        }
        found
    }

    fn eat_word(&mut self, word: &str) -> bool {
        let found = matches!(self.peek(), Some(Token::Ident(w)) if w == word);
        if found {
            self.at += 1;
        }
        found
    }

    fn ident(&mut self) -> Option<String> {
        match self.tokens.get(self.at)? {
            Token::Ident(name) => {
                let name = name.clone();
                self.at += 1;
                Some(name)
            }
            _ => None,
        }
    }

    fn expression(&mut self) -> Option<Expr> {
        self.nesting += 1;
        let expr = if self.nesting > MAX_NESTING {
            None
        } else {
            self.or()
        };
        self.nesting -= 1;
        expr
    }

    fn or(&mut self) -> Option<Expr> {
        let mut left = self.and()?;
        while self.eat_word("or") {
            left = Expr::Binary(Op::Or, Box::new(left), Box::new(self.and()?));
        }
        Some(left)
    }

    fn and(&mut self) -> Option<Expr> {
        let mut left = self.equality()?;
        while self.eat_word("and") {
            left = Expr::Binary(Op::And, Box::new(left), Box::new(self.equality()?));
        }
        Some(left)
    }

    fn equality(&mut self) -> Option<Expr> {
        let mut left = self.union()?;
        loop {
            let op = if self.eat('=') {
                Op::Equal
            } else if self.peek() == Some(&Token::NotEqual) {
                self.at += 1;
                Op::NotEqual
            } else {
                return Some(left);
            };
            left = Expr::Binary(op, Box::new(left), Box::new(self.union()?));
        }
    }

    fn union(&mut self) -> Option<Expr> {
        let mut left = self.type_expression()?;
        while self.eat('|') {
            left = Expr::Binary(Op::Union, Box::new(left), Box::new(self.type_expression()?));
        }
        Some(left)
    }

    fn type_expression(&mut self) -> Option<Expr> {
        let mut expr = self.postfix()?;
        loop {
            if self.eat_word("is") {
                expr = Expr::Is(Box::new(expr), self.type_name()?);
            } else if self.eat_word("as") {
                expr = Expr::As(Box::new(expr), self.type_name()?);
            } else {
                return Some(expr);
            }
        }
    }

    /// `Quantity`, `FHIR.Quantity` or `System.String`.
    fn type_name(&mut self) -> Option<String> {
        let mut name = self.ident()?;
        while self.eat('.') {
            name = self.ident()?;
        }
        Some(name)
    }

    fn postfix(&mut self) -> Option<Expr> {
        let mut expr = self.term()?;
        loop {
            if self.eat('.') {
                let name = self.ident()?;
                expr = if self.eat('(') {
                    Expr::Call {
                        target: Some(Box::new(expr)),
                        name,
                        args: self.arguments()?,
                    }
                } else {
                    Expr::Member(Box::new(expr), name)
                };
            } else if self.eat('[') {
                let index = self.expression()?;
                if !self.eat(']') {
                    return None;
                }
                expr = Expr::Index(Box::new(expr), Box::new(index));
            } else {
                return Some(expr);
            }
        }
    }

    fn term(&mut self) -> Option<Expr> {
        let token = self.tokens.get(self.at)?.clone();
        self.at += 1;
        match token {
            Token::Text(text) => Some(Expr::Literal(Literal::Text(text))),
            Token::Number(n) => Some(Expr::Literal(Literal::Number(n))),
            Token::This => Some(Expr::This),
            Token::Variable(name) => Some(Expr::Variable(name)),
            Token::EmptySet => Some(Expr::Empty),
            Token::Symbol('(') => {
                let inner = self.expression()?;
                self.eat(')').then_some(inner)
            }
            Token::Ident(word) if word == "true" || word == "false" => {
                Some(Expr::Literal(Literal::Bool(word == "true")))
            }
            Token::Ident(name) => Some(if self.eat('(') {
                Expr::Call {
                    target: None,
                    name,
                    args: self.arguments()?,
                }
            } else {
                Expr::Name(name)
            }),
            _ => None,
        }
    }

    /// The arguments of a call whose `(` is already read.
    fn arguments(&mut self) -> Option<Vec<Expr>> {
        let mut args = Vec::new();
        if self.eat(')') {
            return Some(args);
        }
        loop {
            args.push(self.expression()?);
            if self.eat(')') {
                return Some(args);
            }
            if !self.eat(',') {
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn lab_observation() -> Value {
        json!({
            "resourceType": "Observation",
            "id": "o1",
            "status": "final",
            "category": [{
                "coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                    "code": "laboratory"
                }]
            }],
            "code": {
                "coding": [
                    {"system": "http://loinc.org", "code": "2339-0"},
                    {"code": "glucose"}
                ],
                "text": "Glucose"
            },
            "subject": {"reference": "Patient/p1"},
            "performer": [
                {"reference": "Practitioner/d1"},
                {"reference": "https://other.example/fhir/Patient/p2/_history/3"}
            ],
            "specimen": {"reference": "Specimen/s1"},
            "valueQuantity": {"value": 5.5, "unit": "mmol/L"}
        })
    }

    fn vital_signs_observation() -> Value {
        json!({
            "resourceType": "Observation",
            "id": "o2",
            "status": "final",
            "category": [{
                "coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                    "code": "vital-signs"
                }]
            }],
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
            "subject": {"reference": "Patient/p1"}
        })
    }

    fn patient() -> Value {
        json!({
            "resourceType": "Patient",
            "id": "p1",
            "active": true,
            "gender": "female",
            "identifier": [{"system": "urn:oid:1.2.3", "value": "MRN-7"}],
            "name": [
                {"family": "Van der Berg", "given": ["Anna", "Maria"], "prefix": ["Dr."]},
                {"text": "Ann Berg"}
            ],
            "telecom": [
                {"system": "phone", "value": "555-0100"},
                {"system": "email", "value": "anna@example.org"}
            ],
            "address": [{"line": ["1 Main St"], "city": "Springfield", "postalCode": "12345"}],
            "link": [
                {"other": {"reference": "Patient/p9"}, "type": "seealso"},
                {"other": {"reference": "RelatedPerson/r1"}, "type": "seealso"}
            ]
        })
    }

    #[test]
    fn a_union_collects_each_branch_for_the_resource_type_only() {
        let patient = patient();
        let found = extract(
            &patient,
            "Patient.name.family | Person.name.family | Patient.name.given",
        );
        assert_eq!(found, vec!["Van der Berg", "Anna", "Maria"]);
        assert!(extract(&patient, "Observation.subject").is_empty());
    }

    #[test]
    fn arrays_are_flattened_and_each_value_comes_once() {
        let patient = patient();
        assert_eq!(extract(&patient, "Patient.name.given").len(), 2);
        assert_eq!(extract(&patient, "Patient.name | Patient.name").len(), 2);
        assert_eq!(extract(&patient, "Patient.link.other").len(), 2);
    }

    #[test]
    fn a_choice_element_is_found_under_its_typed_name() {
        let obs = lab_observation();
        let quantity = &obs["valueQuantity"];
        for expression in [
            "Observation.value",
            "Observation.value as Quantity",
            "(Observation.value as Quantity)",
            "Observation.value.as(Quantity)",
            "Observation.value.ofType(Quantity)",
            "(Observation.value as Quantity) | (Observation.value as SampledData)",
        ] {
            assert_eq!(extract(&obs, expression), vec![quantity], "{expression}");
        }
        assert!(extract(&obs, "Observation.value as CodeableConcept").is_empty());
        assert!(extract(&obs, "Observation.valueX").is_empty());
        let condition = json!({
            "resourceType": "Condition",
            "onsetDateTime": "2020-01-01",
            "abatementString": "in remission"
        });
        assert_eq!(
            extract(
                &condition,
                "Condition.onset.as(dateTime) | Condition.onset.as(Period)"
            ),
            vec!["2020-01-01"]
        );
        assert_eq!(
            extract(&condition, "Condition.abatement.as(string)"),
            vec!["in remission"]
        );
    }

    #[test]
    fn a_cast_in_parentheses_can_be_navigated_further() {
        let obs = json!({
            "resourceType": "Observation",
            "valueCodeableConcept": {"text": "positive"}
        });
        assert_eq!(
            extract(
                &obs,
                "(Observation.value as string) | (Observation.value as CodeableConcept).text"
            ),
            vec!["positive"]
        );
    }

    #[test]
    fn where_resolve_is_keeps_references_to_that_type() {
        let audit = json!({
            "resourceType": "AuditEvent",
            "agent": [
                {"who": {"reference": "Patient/p1"}},
                {"who": {"reference": "Practitioner/d1"}},
                {"who": {"reference": "#contained-patient"}},
                {"who": {"reference": "https://example.org/fhir/Patient/p2"}},
                {"who": {"display": "nobody"}}
            ],
            "entity": [{"what": {"reference": "Patient/p3/_history/2"}}]
        });
        let found = extract(
            &audit,
            "AuditEvent.agent.who.where(resolve() is Patient) | AuditEvent.entity.what.where(resolve() is Patient)",
        );
        let references: Vec<&str> = found
            .iter()
            .map(|r| r["reference"].as_str().unwrap())
            .collect();
        assert_eq!(
            references,
            vec![
                "Patient/p1",
                "https://example.org/fhir/Patient/p2",
                "Patient/p3/_history/2"
            ]
        );
    }

    #[test]
    fn a_where_equality_filters_on_a_child_element() {
        let patient = patient();
        let found = extract(&patient, "Patient.telecom.where(system='email')");
        assert_eq!(found, vec![&patient["telecom"][1]]);
        assert!(extract(&patient, "Patient.telecom.where(system='fax')").is_empty());
    }

    #[test]
    fn an_indexer_picks_one_item() {
        let bundle = json!({
            "resourceType": "Bundle",
            "type": "document",
            "entry": [
                {"resource": {"resourceType": "Composition", "id": "c1"}},
                {"resource": {"resourceType": "Patient", "id": "p1"}}
            ]
        });
        let found = extract(&bundle, "Bundle.entry[0].resource");
        assert_eq!(found, vec![&bundle["entry"][0]["resource"]]);
        assert!(extract(&bundle, "Bundle.entry[5].resource").is_empty());
    }

    #[test]
    fn what_the_subset_cannot_evaluate_yields_nothing_for_its_branch() {
        let patient = json!({"resourceType": "Patient", "deceasedBoolean": true, "gender": "male"});
        // The `deceased` parameter computes a boolean; it is not a value of the resource.
        assert!(extract(
            &patient,
            "Patient.deceased.exists() and Patient.deceased != false"
        )
        .is_empty());
        assert_eq!(
            extract(&patient, "Patient.gender.lower() | Patient.gender"),
            vec!["male"]
        );
        let deep = format!("{}Patient.gender{}", "(".repeat(500), ")".repeat(500));
        let long = format!("Patient{}", ".gender".repeat(5000));
        for garbage in [
            "",
            "|",
            "Patient.",
            "Patient.(gender",
            "Patient.gender'",
            "Patient.gender[",
            "Patient.gender + 1",
            "%resource.gender",
            "$that",
            "Patient..gender",
            "Patient.where(",
            "Patient.gender.as()",
            "Patient.gender[-1]",
            "Patient.gender is",
            "é.ü",
            deep.as_str(),
            long.as_str(),
        ] {
            let _ = extract(&patient, garbage);
        }
        assert!(extract(&json!("not a resource"), "Patient.gender").is_empty());
        assert!(extract(&json!({"gender": "male"}), "Patient.gender").is_empty());
    }

    #[test]
    fn an_extension_is_found_by_its_url_and_its_value_by_type() {
        let patient = json!({
            "resourceType": "Patient",
            "extension": [
                {
                    "url": "http://hl7.org/fhir/StructureDefinition/patient-birthPlace",
                    "valueAddress": {"city": "Lyon"}
                },
                {
                    "url": "http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName",
                    "valueString": "Dupont"
                }
            ]
        });
        assert_eq!(
            extract(
                &patient,
                "Patient.extension('http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName').value"
            ),
            vec!["Dupont"]
        );
        assert_eq!(
            extract(
                &patient,
                "Patient.extension('http://hl7.org/fhir/StructureDefinition/patient-birthPlace').value.ofType(Address).city"
            ),
            vec!["Lyon"]
        );
        assert!(extract(&patient, "Patient.extension('urn:none').value").is_empty());
    }

    #[test]
    fn resource_variables_and_constants_name_the_resource_and_known_systems() {
        let obs = lab_observation();
        assert_eq!(extract(&obs, "%resource.status"), vec!["final"]);
        assert_eq!(extract(&obs, "%rootResource.id | %context.id"), vec!["o1"]);
        assert_eq!(
            extract(&obs, "Observation.code.coding.where(system = %loinc).code"),
            vec!["2339-0"]
        );
        assert!(extract(&obs, "%unknown.status").is_empty());
    }

    #[test]
    fn subsetting_and_existence_functions_pick_and_test_items() {
        let patient = patient();
        for (expression, expected) in [
            ("Patient.name.given.first()", vec!["Anna"]),
            ("Patient.name.given.last()", vec!["Maria"]),
            ("Patient.name.given.tail()", vec!["Maria"]),
            ("Patient.telecom.skip(1).value", vec!["anna@example.org"]),
            ("Patient.telecom.take(1).value", vec!["555-0100"]),
            ("Patient.gender.single()", vec!["female"]),
            ("Patient.name.given.single()", vec![]),
            (
                "Patient.name.where(given.exists()).family",
                vec!["Van der Berg"],
            ),
            ("Patient.name.where(given.empty()).text", vec!["Ann Berg"]),
            (
                "Patient.telecom.where(value.startsWith('555')).system",
                vec!["phone"],
            ),
            (
                "Patient.telecom.where(value.contains('@')).system",
                vec!["email"],
            ),
            (
                "Patient.telecom.where(system.upper() = 'EMAIL').value",
                vec!["anna@example.org"],
            ),
            (
                "Patient.name.select(family | text)",
                vec!["Van der Berg", "Ann Berg"],
            ),
            ("Patient.where(name.count() = 2).gender", vec!["female"]),
            (
                "Patient.where(telecom.all(value.exists())).gender",
                vec!["female"],
            ),
            (
                "Patient.where(telecom.exists(system = 'fax')).gender",
                vec![],
            ),
            ("Patient.where(gender.hasValue()).id", vec!["p1"]),
            (
                "iif(Patient.active, Patient.gender, Patient.id)",
                vec!["female"],
            ),
            ("iif(Patient.deceased, Patient.gender)", vec![]),
            ("Patient.gender.trace('g')", vec!["female"]),
            ("Patient.gender | {}", vec!["female"]),
        ] {
            let found: Vec<&str> = extract(&patient, expression)
                .into_iter()
                .filter_map(Value::as_str)
                .collect();
            assert_eq!(found, expected, "{expression}");
        }
        assert_eq!(extract(&patient, "Patient.link.other.distinct()").len(), 2);
    }

    #[test]
    fn unsupported_expressions_are_named_with_a_reason() {
        for supported in [
            "Patient.name.family | Patient.name.given",
            "(Observation.value as Quantity) | Observation.value.ofType(SampledData)",
            "Patient.deceased.exists() and Patient.deceased != false",
            "AuditEvent.agent.who.where(resolve() is Patient)",
            "Patient.extension('http://x').value as System.String",
            "%resource.referenceSeq.chromosome",
            "value.as(DateTime) | value.as(Period)",
        ] {
            assert_eq!(why_unsupported(supported), None, "{supported}");
        }
        for (unsupported, reason) in [
            (
                "Patient.name.family.substring(0, 1)",
                "unknown function substring()",
            ),
            ("Patient.name.exists(a, b)", "unknown function exists()"),
            ("%vs.code", "unknown variable %vs"),
            ("Patient.value as Quantiti", "unknown type Quantiti"),
            ("Patient.value.as(Foo)", "unknown type Foo"),
            ("Patient.value.ofType('x')", "needs a type name"),
            ("Foo.name", "unknown type Foo"),
            ("Patient.birthDate + 1 year", "outside the parsed grammar"),
            (
                "Patient.name | Patient.birthDate > @2020",
                "outside the parsed grammar",
            ),
        ] {
            let why = why_unsupported(unsupported).unwrap_or_default();
            assert!(why.contains(reason), "{unsupported}: {why}");
        }
    }

    #[test]
    fn every_search_parameter_expression_parses_and_runs_without_panicking() {
        let mut shared = lab_observation();
        let extra = json!({
            "patient": {"reference": "Patient/p1"},
            "identifier": [{"system": "urn:x", "value": "1"}],
            "name": [{"family": "F", "given": ["G"]}],
            "telecom": [{"system": "email", "value": "a@b.c"}],
            "relatedArtifact": [{"type": "composed-of", "resource": "http://x.org/Library/l1"}],
            "useContext": [{
                "code": {"code": "focus"},
                "valueCodeableConcept": {"coding": [{"code": "x"}]},
                "valueQuantity": {"value": 1}
            }],
            "entry": [{"resource": {"resourceType": "Patient", "id": "p1"}}],
            "participant": [{"actor": {"reference": "Patient/p1"}}],
            "link": [{"other": {"reference": "Patient/p2"}}],
            "deceasedBoolean": false,
            "onsetAge": {"value": 3},
            "occurrenceDateTime": "2020",
            "medicationReference": {"reference": "Medication/m1"},
            "contained": [{"resourceType": "Patient", "id": "c"}]
        });
        for (key, value) in extra.as_object().unwrap() {
            shared[key] = value.clone();
        }
        let mut parsed = 0;
        for param in registry::all_search_params() {
            let Some(expression) = param.expression.as_deref() else {
                continue;
            };
            for branch in union_branches(expression) {
                assert!(parse(branch).is_some(), "{} cannot be parsed", branch);
                parsed += 1;
            }
            for base in &param.base {
                shared["resourceType"] = json!(base);
                let _ = extract(&shared, expression);
                let _ = values_for(&shared, base, &param.code);
                let _ = matches(&shared, &params(&[(param.code.as_str(), "a|b,c")]));
            }
        }
        assert!(parsed > 1000, "only {parsed} branches");
    }

    #[test]
    fn values_for_uses_the_expression_of_the_resource_type() {
        let obs = lab_observation();
        assert_eq!(values_for(&obs, "Observation", "code"), vec![&obs["code"]]);
        assert_eq!(
            values_for(&obs, "Observation", "patient"),
            vec![&obs["subject"]]
        );
        assert_eq!(values_for(&obs, "Observation", "_id"), vec!["o1"]);
        assert_eq!(
            values_for(&obs, "Observation", "value-quantity"),
            vec![&obs["valueQuantity"]]
        );
        assert!(values_for(&obs, "Observation", "no-such-param").is_empty());
        // The subject of an observation about a group is no patient.
        let group_obs =
            json!({"resourceType": "Observation", "subject": {"reference": "Group/g1"}});
        assert!(values_for(&group_obs, "Observation", "patient").is_empty());
    }

    #[test]
    fn a_patient_is_in_its_own_compartment_and_those_it_links_to() {
        assert_eq!(patient_compartments(&patient()), vec!["p1", "p9"]);
        let anonymous = json!({"resourceType": "Patient"});
        assert!(patient_compartments(&anonymous).is_empty());
    }

    #[test]
    fn an_observation_is_in_the_compartment_of_its_subject_and_not_of_another_servers_patient() {
        // The performer `https://other.example/fhir/Patient/p2` is another
        // server's patient, whatever its id.
        let obs = lab_observation();
        assert_eq!(patient_compartments(&obs), vec!["p1"]);
        assert!(in_patient_compartment(&obs, "p1"));
        assert!(!in_patient_compartment(&obs, "p2"));
        assert!(!in_patient_compartment(&obs, "d1"));
        assert!(!in_patient_compartment(&obs, "p3"));
    }

    #[test]
    fn an_encounter_is_in_the_compartment_of_its_subject() {
        let encounter = json!({
            "resourceType": "Encounter",
            "subject": {"reference": "Patient/p1"},
            "participant": [{"individual": {"reference": "Practitioner/d1"}}]
        });
        assert_eq!(patient_compartments(&encounter), vec!["p1"]);
        let about_group =
            json!({"resourceType": "Encounter", "subject": {"reference": "Group/g1"}});
        assert!(patient_compartments(&about_group).is_empty());
    }

    #[test]
    fn absolute_and_versioned_references_name_the_same_patient() {
        let condition = json!({
            "resourceType": "Condition",
            "subject": {"reference": "https://fhir.example.org/r4/Patient/p1/_history/4"},
            "asserter": {"reference": "Patient/p1"}
        });
        assert_eq!(patient_compartments(&condition), vec!["p1"]);
    }

    #[test]
    fn contained_and_unresolvable_references_name_no_patient() {
        let obs = json!({
            "resourceType": "Observation",
            "subject": {"reference": "#p1"},
            "performer": [
                {"reference": "urn:uuid:5c1f4ee4-2f0d-4f60-9d5b-6f3b3f1a2b3c"},
                {"identifier": {"value": "p1"}, "type": "Patient"},
                {"reference": "Patient/not_a valid id"}
            ]
        });
        assert!(patient_compartments(&obs).is_empty());
    }

    #[test]
    fn a_type_outside_the_compartment_has_no_patients() {
        let organization = json!({
            "resourceType": "Organization",
            "id": "o1",
            "partOf": {"reference": "Patient/p1"}
        });
        assert!(patient_compartments(&organization).is_empty());
        assert!(!in_patient_compartment(&organization, "p1"));
        assert!(patient_compartments(&json!({"id": "x"})).is_empty());
    }

    #[test]
    fn compartment_types_are_those_the_definition_links_to_a_patient() {
        assert!(is_patient_compartment_type("Patient"));
        assert!(is_patient_compartment_type("Observation"));
        assert!(is_patient_compartment_type("Encounter"));
        assert!(!is_patient_compartment_type("Organization"));
        assert!(!is_patient_compartment_type("Medication"));
        assert!(!is_patient_compartment_type("NoSuchType"));
    }

    #[test]
    fn a_token_matches_on_the_code_alone_in_any_system() {
        let obs = lab_observation();
        assert_eq!(matches(&obs, &params(&[("code", "2339-0")])), Ok(true));
        assert_eq!(matches(&obs, &params(&[("code", "glucose")])), Ok(true));
        assert_eq!(matches(&obs, &params(&[("code", "8867-4")])), Ok(false));
        // Codes compare exactly.
        assert_eq!(matches(&obs, &params(&[("code", "GLUCOSE")])), Ok(false));
    }

    #[test]
    fn a_token_with_a_system_needs_both_to_match() {
        let obs = lab_observation();
        let loinc = |code: &str| params(&[("code", &format!("http://loinc.org|{code}"))]);
        assert_eq!(matches(&obs, &loinc("2339-0")), Ok(true));
        assert_eq!(matches(&obs, &loinc("glucose")), Ok(false));
        assert_eq!(
            matches(&obs, &params(&[("code", "http://snomed.info/sct|2339-0")])),
            Ok(false)
        );
    }

    #[test]
    fn a_token_with_an_empty_system_matches_only_codes_without_one() {
        let obs = lab_observation();
        assert_eq!(matches(&obs, &params(&[("code", "|glucose")])), Ok(true));
        assert_eq!(matches(&obs, &params(&[("code", "|2339-0")])), Ok(false));
    }

    #[test]
    fn a_token_with_only_a_system_matches_any_code_of_it() {
        let obs = lab_observation();
        assert_eq!(
            matches(&obs, &params(&[("code", "http://loinc.org|")])),
            Ok(true)
        );
        assert_eq!(
            matches(&obs, &params(&[("code", "http://snomed.info/sct|")])),
            Ok(false)
        );
    }

    #[test]
    fn category_laboratory_matches_a_lab_result_and_not_vital_signs() {
        let restriction = params(&[("category", "laboratory")]);
        assert_eq!(matches(&lab_observation(), &restriction), Ok(true));
        assert_eq!(matches(&vital_signs_observation(), &restriction), Ok(false));
        let with_system = params(&[(
            "category",
            "http://terminology.hl7.org/CodeSystem/observation-category|vital-signs",
        )]);
        assert_eq!(matches(&vital_signs_observation(), &with_system), Ok(true));
        assert_eq!(matches(&lab_observation(), &with_system), Ok(false));
    }

    #[test]
    fn a_comma_means_any_of_the_values() {
        let either = params(&[("category", "vital-signs,laboratory")]);
        assert_eq!(matches(&lab_observation(), &either), Ok(true));
        assert_eq!(matches(&vital_signs_observation(), &either), Ok(true));
        let neither = params(&[("category", "imaging,survey")]);
        assert_eq!(matches(&lab_observation(), &neither), Ok(false));
    }

    #[test]
    fn every_parameter_must_match() {
        let obs = lab_observation();
        let both = params(&[("category", "laboratory"), ("code", "2339-0")]);
        assert_eq!(matches(&obs, &both), Ok(true));
        let one = params(&[("category", "laboratory"), ("code", "8867-4")]);
        assert_eq!(matches(&obs, &one), Ok(false));
        let repeated = params(&[("category", "laboratory"), ("category", "vital-signs")]);
        assert_eq!(matches(&obs, &repeated), Ok(false));
        assert_eq!(matches(&obs, &[]), Ok(true));
    }

    #[test]
    fn not_matches_resources_without_the_code_including_those_with_none() {
        let not_lab = params(&[("category:not", "laboratory")]);
        assert_eq!(matches(&lab_observation(), &not_lab), Ok(false));
        assert_eq!(matches(&vital_signs_observation(), &not_lab), Ok(true));
        let uncategorised = json!({"resourceType": "Observation", "status": "final"});
        assert_eq!(matches(&uncategorised, &not_lab), Ok(true));
        let neither = params(&[("category:not", "laboratory,vital-signs")]);
        assert_eq!(matches(&vital_signs_observation(), &neither), Ok(false));
    }

    #[test]
    fn a_token_matches_identifiers_and_primitives() {
        let patient = patient();
        for (name, value, expected) in [
            ("identifier", "urn:oid:1.2.3|MRN-7", true),
            ("identifier", "MRN-7", true),
            ("identifier", "urn:oid:9|MRN-7", false),
            ("gender", "female", true),
            ("gender", "|female", true),
            ("gender", "male", false),
            // A primitive code has no system to compare.
            (
                "gender",
                "http://hl7.org/fhir/administrative-gender|female",
                false,
            ),
            ("active", "true", true),
            ("active", "false", false),
            ("_id", "p1", true),
            ("_id", "p2,p1", true),
            ("_id", "p2", false),
            ("email", "anna@example.org", true),
            ("email", "555-0100", false),
            ("phone", "555-0100", true),
        ] {
            assert_eq!(
                matches(&patient, &params(&[(name, value)])),
                Ok(expected),
                "{name}={value}"
            );
        }
    }

    #[test]
    fn a_reference_matches_by_type_and_id() {
        let obs = lab_observation();
        for (name, value, expected) in [
            ("subject", "Patient/p1", true),
            ("subject", "Patient/p2", false),
            ("subject", "Group/p1", false),
            ("subject", "https://server.example/fhir/Patient/p1", true),
            ("patient", "Patient/p1", true),
            ("specimen", "s1", true),
            ("specimen", "s2", false),
            ("performer", "Patient/p2", true),
            ("performer", "https://other.example/fhir/Patient/p2", true),
            (
                "performer",
                "https://elsewhere.example/fhir/Patient/p2",
                false,
            ),
            ("performer", "Practitioner/d1,Organization/x", true),
        ] {
            assert_eq!(
                matches(&obs, &params(&[(name, value)])),
                Ok(expected),
                "{name}={value}"
            );
        }
    }

    #[test]
    fn a_bare_id_needs_a_parameter_with_a_single_target_type() {
        let obs = lab_observation();
        let error = matches(&obs, &params(&[("subject", "p1")])).unwrap_err();
        assert!(error.to_string().contains("subject"), "{error}");
        // `patient` may also name a Group, so even it needs the type.
        assert!(matches(&obs, &params(&[("patient", "p1")])).is_err());
    }

    #[test]
    fn a_string_matches_a_prefix_of_any_part_of_a_name_ignoring_case() {
        let patient = patient();
        for (name, value, expected) in [
            ("name", "van", true),
            ("name", "VAN DER", true),
            ("name", "ann", true),
            ("name", "mar", true),
            ("name", "dr", true),
            // A prefix of the whole part, not of each word in it.
            ("name", "berg", false),
            ("name", "der", false),
            ("family", "van", true),
            ("family", "anna", false),
            ("given", "anna,zed", true),
            ("address-city", "spring", true),
            ("address", "12345", true),
            ("address", "main", false),
            ("address", "1 main", true),
        ] {
            assert_eq!(
                matches(&patient, &params(&[(name, value)])),
                Ok(expected),
                "{name}={value}"
            );
        }
    }

    #[test]
    fn an_exact_string_must_equal_a_part_case_included() {
        let patient = patient();
        assert_eq!(
            matches(&patient, &params(&[("family:exact", "Van der Berg")])),
            Ok(true)
        );
        assert_eq!(
            matches(&patient, &params(&[("family:exact", "van der berg")])),
            Ok(false)
        );
        assert_eq!(
            matches(&patient, &params(&[("family:exact", "Van")])),
            Ok(false)
        );
    }

    #[test]
    fn a_uri_matches_exactly() {
        let value_set = json!({"resourceType": "ValueSet", "url": "http://example.org/vs/a"});
        let by_url = |url: &str| matches(&value_set, &params(&[("url", url)]));
        assert_eq!(by_url("http://example.org/vs/a"), Ok(true));
        assert_eq!(by_url("http://example.org/vs"), Ok(false));
        assert_eq!(by_url("HTTP://example.org/vs/a"), Ok(false));
    }

    #[test]
    fn escaped_commas_and_bars_are_part_of_the_value() {
        let obs = json!({
            "resourceType": "Observation",
            "code": {"coding": [{"system": "urn:a|b", "code": "x,y"}]}
        });
        assert_eq!(matches(&obs, &params(&[("code", r"x\,y")])), Ok(true));
        assert_eq!(matches(&obs, &params(&[("code", "x,y")])), Ok(false));
        assert_eq!(
            matches(&obs, &params(&[("code", r"urn:a\|b|x\,y")])),
            Ok(true)
        );
    }

    #[test]
    fn unsupported_types_modifiers_and_names_are_errors() {
        let obs = lab_observation();
        for (name, value) in [
            ("date", "2020"),
            ("value-quantity", "5"),
            ("code-value-quantity", "2339-0$5"),
            ("_lastUpdated", "gt2020"),
            ("no-such-param", "x"),
            ("category:missing", "true"),
            ("category:text", "lab"),
            ("category:exact", "laboratory"),
            ("subject:Patient", "p1"),
            ("subject.name", "anna"),
            ("_text", "glucose"),
        ] {
            let result = matches(&obs, &params(&[(name, value)]));
            assert!(result.is_err(), "{name}={value} gave {result:?}");
        }
        let patient = patient();
        assert!(matches(&patient, &params(&[("name:not", "anna")])).is_err());
        // An error is reported even after a criterion that fails.
        let mixed = params(&[("category", "survey"), ("date", "2020")]);
        assert!(matches(&obs, &mixed).is_err());
        let error = matches(&obs, &params(&[("date", "2020")])).unwrap_err();
        assert!(error.to_string().contains("date"));
        let boxed: Box<dyn std::error::Error> = Box::new(error);
        assert!(!boxed.to_string().is_empty());
        assert!(matches(&json!({"id": "x"}), &params(&[("_id", "x")])).is_err());
    }
}
