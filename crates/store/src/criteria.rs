//! Search criteria as the store evaluates them: a tree of conditions over the
//! typed search index tables (search.html), compiled to SQL by `search_sql`.
//! Values arrive parsed and normalized; the store neither parses FHIR search
//! syntax nor knows the parameter registry.

use std::fmt::Debug;
use std::sync::Arc;

use time::OffsetDateTime;

/// One condition on a resource of a known type. A resource matches a value
/// criterion when one of its index rows for the parameter does.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Criterion {
    /// Every resource.
    #[default]
    Always,
    /// No resource.
    Never,
    /// Every one holds (AND); empty holds.
    All(Vec<Criterion>),
    /// Some one holds (OR); empty does not.
    Any(Vec<Criterion>),
    /// The criterion does not hold (`:not`).
    Not(Box<Criterion>),
    /// `_id`: one of these ids.
    Id(Vec<String>),
    /// `_lastUpdated`, with date semantics on the instant's own point in time.
    LastUpdated(Range<OffsetDateTime>),
    /// A string parameter; `value` is normalized for `StartsWith` and
    /// `Contains` ([`haven_model::search_index::normalize_string`]) and as
    /// written for `Exact`.
    String {
        param: String,
        value: String,
        how: StringMatch,
    },
    /// A token: `system: Some("")` means the value must have no system, `None`
    /// any system; `code: None` any code in the system.
    Token {
        param: String,
        system: Option<String>,
        code: Option<String>,
    },
    /// `:text`: the normalized text, display or type text starts with `text`
    /// or contains it as a word.
    TokenText { param: String, text: String },
    /// `:of-type`: an identifier with this type coding and value.
    TokenOfType {
        param: String,
        type_system: String,
        type_code: String,
        value: String,
    },
    /// A reference, by any of its parts; `None` parts are not compared.
    Reference {
        param: String,
        target_type: Option<String>,
        target_id: Option<String>,
        url: Option<String>,
        version: Option<String>,
    },
    Date {
        param: String,
        range: Range<OffsetDateTime>,
    },
    /// A number: the resource's value is the midpoint of its stored interval.
    Number { param: String, range: Range<f64> },
    /// A quantity: `code` matches the stored code, or the unit when no system
    /// is given.
    Quantity {
        param: String,
        range: Range<f64>,
        system: Option<String>,
        code: Option<String>,
    },
    Uri {
        param: String,
        uri: String,
        how: UriMatch,
    },
    /// `:missing`: whether the resource has no value of the parameter in
    /// that kind's index.
    Missing {
        param: String,
        kind: IndexKind,
        missing: bool,
    },
    /// A composite: one stored combination whose parts meet every condition,
    /// each a value criterion whose `param` is the component's code.
    Composite {
        param: String,
        parts: Vec<Criterion>,
    },
    /// In the compartment of one patient (compartmentdefinition-patient.html).
    PatientCompartment(String),
    /// Chaining: a reference through `param` to a resource of one of the types
    /// that meets that type's criterion (and that the query's access admits).
    Chain {
        param: String,
        targets: Vec<(String, Criterion)>,
    },
    /// Reverse chaining (`_has`): some `source_type` resource that references
    /// this one through `param` meets `criterion` (and the access admits it).
    Has {
        source_type: String,
        param: String,
        criterion: Box<Criterion>,
    },
    /// One of these resources, by type and id (a page of a stored result set).
    Keys(Vec<(String, String)>),
    /// A local reference through one of `params` to one of the resources
    /// `target_type`/`target_ids` (what `_revinclude` looks for).
    ReferencesAny {
        params: Vec<String>,
        target_type: String,
        target_ids: Vec<String>,
    },
    /// Some reference through `param` points at no type of `types`: at
    /// another type, or at nothing this server can name (a URN, a reference
    /// without a type). What an access rule that reaches only `types` refuses.
    ReferenceOutside { param: String, types: Vec<String> },
    /// Some value of the token parameter `param` has `system` and a code that
    /// is not one of `codes` (a security label outside a clearance, say).
    TokenOutside {
        param: String,
        system: String,
        codes: Vec<String>,
    },
    /// The resource is in the compartment of some patient not in `patients`.
    CompartmentOutside(Vec<String>),
}

impl Criterion {
    /// AND of two criteria, flattening the trivial cases.
    pub fn and(self, other: Criterion) -> Criterion {
        match (self, other) {
            (Criterion::Always, c) | (c, Criterion::Always) => c,
            (Criterion::Never, _) | (_, Criterion::Never) => Criterion::Never,
            (Criterion::All(mut a), Criterion::All(b)) => {
                a.extend(b);
                Criterion::All(a)
            }
            (Criterion::All(mut a), c) | (c, Criterion::All(mut a)) => {
                a.push(c);
                Criterion::All(a)
            }
            (a, b) => Criterion::All(vec![a, b]),
        }
    }
}

/// How a string search matches (search.html#string).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StringMatch {
    /// The default: the normalized value starts with the search text.
    StartsWith,
    /// `:exact`: equal, case and accents included.
    Exact,
    /// `:contains`: the normalized value contains the search text.
    Contains,
}

/// How a uri search matches (search.html#uri).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UriMatch {
    Exact,
    /// `:below`: the stored uri starts with the search uri.
    Below,
    /// `:above`: the search uri starts with the stored uri.
    Above,
}

/// The index tables, for `:missing`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexKind {
    String,
    Token,
    Reference,
    Date,
    Number,
    Quantity,
    Uri,
    Composite,
}

/// The search prefixes (search.html#prefix).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefix {
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
    Sa,
    Eb,
    Ap,
}

/// A prefixed search value as the half-open interval `[low, high)` its
/// precision covers; `value` is the number as written (numbers and quantities
/// compare against it for `gt`, `lt`, `ge` and `le`). For `ap` the parser
/// has already widened the interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Range<T> {
    pub prefix: Prefix,
    pub low: T,
    pub high: T,
    pub value: T,
}

/// What a query's caller may see of one type.
#[derive(Debug, Clone, PartialEq)]
pub enum TypeAccess {
    /// Every resource of the type.
    All,
    /// Only resources meeting the criterion.
    Only(Criterion),
    /// Nothing of the type.
    Nothing,
}

/// The caller's access, compiled into every part of a search: the resources it
/// returns and counts, chained targets, `_has` sources, and includes.
pub trait AccessRule: Send + Sync + Debug {
    fn for_type(&self, resource_type: &str) -> TypeAccess;
}

/// An access rule shared by the queries of one request.
pub type Access = Arc<dyn AccessRule>;

/// One `_sort` key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SortKey {
    pub by: SortBy,
    pub descending: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SortBy {
    Id,
    LastUpdated,
    /// A search parameter, by the smallest (ascending) or largest (descending)
    /// of its values in that kind's index.
    Param {
        param: String,
        kind: IndexKind,
    },
}

/// Two access rules that must both admit.
#[derive(Debug)]
pub struct BothAccess(pub Access, pub Access);

impl AccessRule for BothAccess {
    fn for_type(&self, resource_type: &str) -> TypeAccess {
        match (
            self.0.for_type(resource_type),
            self.1.for_type(resource_type),
        ) {
            (TypeAccess::Nothing, _) | (_, TypeAccess::Nothing) => TypeAccess::Nothing,
            (TypeAccess::All, other) | (other, TypeAccess::All) => other,
            (TypeAccess::Only(a), TypeAccess::Only(b)) => TypeAccess::Only(a.and(b)),
        }
    }
}
