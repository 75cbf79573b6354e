//! One search parameter (name and value) as a [`Criterion`]: modifiers,
//! chaining, reverse chaining, and the values of each parameter type
//! (search.html#ptypes).

use std::cell::Cell;

use haven_model::id::is_valid_id;
use haven_model::outcome::IssueCode;
use haven_model::registry::{self, SearchParam, SearchParamComponent, SearchParamType};
use haven_model::search_index::normalize_string;
use haven_store::{Criterion, IndexKind, StringMatch, UriMatch};

use super::values::{date_value, number_value, split_prefix, split_unescaped, unescape};
use super::{bad, not_supported, SearchContext};
use crate::error::ApiError;

/// How many links a chain (`a.b.c`) and `_has` together may follow.
pub(super) const MAX_DEPTH: usize = 6;

/// How many conditions one search may hold: chains over references that may
/// point at any type multiply quickly.
pub(super) const MAX_CONDITIONS: usize = 1000;

/// Why a parameter gave no criterion.
#[derive(Debug)]
pub(super) enum Skip {
    /// A parameter this search does not know or does not support: ignored and
    /// reported, or refused in strict mode.
    Unknown(String),
    /// A known parameter used wrongly: always refused.
    Bad(ApiError),
}

impl From<ApiError> for Skip {
    fn from(error: ApiError) -> Self {
        Skip::Bad(error)
    }
}

/// Links a parameter name follows: each `.` and each `_has:`.
pub(super) fn links(name: &str) -> usize {
    name.matches('.').count() + name.matches("_has:").count()
}

/// What the parser needs of a search parameter, over every type searched.
struct Def {
    code: &'static str,
    kind: SearchParamType,
    /// Reference targets, over every type searched; `Resource` spelled out.
    targets: Vec<&'static str>,
    /// Whether its values are Identifiers, which `:of-type` needs.
    identifier_like: bool,
    components: &'static [SearchParamComponent],
}

impl Def {
    fn of(param: &'static SearchParam, resource_type: Option<&str>) -> Def {
        let expression = resource_type
            .and_then(|t| param.expression_for(t))
            .or_else(|| param.expression.clone())
            .unwrap_or_default();
        Def {
            code: param.code.as_str(),
            kind: param.kind,
            targets: expand_targets(&param.target),
            identifier_like: param.kind == SearchParamType::Token
                && (param.code == "identifier"
                    || expression.to_ascii_lowercase().contains("identifier")),
            components: &param.component,
        }
    }
}

fn expand_targets(targets: &'static [String]) -> Vec<&'static str> {
    if targets.iter().any(|t| t == "Resource") {
        registry::resource_types().collect()
    } else {
        targets.iter().map(String::as_str).collect()
    }
}

/// The types a search covers: those named, or every type.
fn searched(types: &[String]) -> Vec<&str> {
    if types.is_empty() {
        registry::resource_types().collect()
    } else {
        types.iter().map(String::as_str).collect()
    }
}

/// The parameter `code` as every searched type defines it; unknown when one
/// lacks it or they disagree on its kind.
fn lookup(types: &[String], code: &str) -> Result<Def, Skip> {
    let mut found: Option<Def> = None;
    for resource_type in searched(types) {
        let Some(param) = registry::search_param(resource_type, code) else {
            return Err(Skip::Unknown(if types.len() == 1 {
                format!("unknown search parameter '{code}' for {resource_type}")
            } else {
                format!("the search parameter '{code}' is not defined for every type searched ({resource_type} lacks it)")
            }));
        };
        if param.kind == SearchParamType::Special || param.expression.is_none() {
            return Err(Skip::Unknown(format!(
                "the search parameter '{code}' is not supported"
            )));
        }
        let def = Def::of(param, Some(resource_type));
        match &mut found {
            None => found = Some(def),
            Some(known) => {
                if known.kind != def.kind || known.components != def.components {
                    return Err(Skip::Unknown(format!(
                        "the search parameter '{code}' is not the same on every type searched"
                    )));
                }
                for target in def.targets {
                    if !known.targets.contains(&target) {
                        known.targets.push(target);
                    }
                }
                known.identifier_like &= def.identifier_like;
            }
        }
    }
    found.ok_or_else(|| Skip::Unknown(format!("unknown search parameter '{code}'")))
}

fn index_kind(kind: SearchParamType) -> Option<IndexKind> {
    Some(match kind {
        SearchParamType::String => IndexKind::String,
        SearchParamType::Token => IndexKind::Token,
        SearchParamType::Reference => IndexKind::Reference,
        SearchParamType::Date => IndexKind::Date,
        SearchParamType::Number => IndexKind::Number,
        SearchParamType::Quantity => IndexKind::Quantity,
        SearchParamType::Uri => IndexKind::Uri,
        SearchParamType::Composite => IndexKind::Composite,
        SearchParamType::Special => return None,
    })
}

/// The index a `_sort` key of this type orders by; `None` for composite and
/// special parameters.
pub(super) fn sort_kind(kind: SearchParamType) -> Option<IndexKind> {
    index_kind(kind).filter(|k| *k != IndexKind::Composite)
}

/// One alternative, or `Any` of several.
fn any(mut alternatives: Vec<Criterion>) -> Criterion {
    if alternatives.len() == 1 {
        alternatives.remove(0)
    } else {
        Criterion::Any(alternatives)
    }
}

fn unknown_modifier(code: &str, kind: SearchParamType, modifier: &str) -> Skip {
    Skip::Bad(not_supported(format!(
        "'{code}:{modifier}': ':{modifier}' is not a modifier of {} parameters here",
        kind.as_str()
    )))
}

fn nonempty(text: String) -> Option<String> {
    (!text.is_empty()).then_some(text)
}

/// Turns parameters into criteria for one search; counts what it builds
/// against [`MAX_CONDITIONS`].
pub(super) struct Criteria<'a> {
    cx: &'a SearchContext<'a>,
    built: Cell<usize>,
}

impl<'a> Criteria<'a> {
    pub(super) fn new(cx: &'a SearchContext<'a>) -> Self {
        Criteria {
            cx,
            built: Cell::new(0),
        }
    }

    fn spend(&self, n: usize) -> Result<(), Skip> {
        let built = self.built.get().saturating_add(n);
        self.built.set(built);
        if self.exhausted() {
            return Err(Skip::Bad(ApiError::invalid(
                IssueCode::TooCostly,
                format!("the search holds more than {MAX_CONDITIONS} conditions"),
            )));
        }
        Ok(())
    }

    fn exhausted(&self) -> bool {
        self.built.get() > MAX_CONDITIONS
    }

    /// The criterion of parameter `name` with `value` (not empty) on a search
    /// of `types` (empty: every type); `depth` links have been followed.
    pub(super) fn criterion(
        &self,
        types: &[String],
        name: &str,
        value: &str,
        depth: usize,
    ) -> Result<Criterion, Skip> {
        if depth > MAX_DEPTH {
            return Err(Skip::Bad(bad(format!(
                "chains and _has may follow at most {MAX_DEPTH} links"
            ))));
        }
        if name == "_has" {
            return Err(Skip::Bad(bad("_has needs _has:Type:parameter:parameter")));
        }
        if let Some(rest) = name.strip_prefix("_has:") {
            return self.has(types, rest, value, depth);
        }
        if let Some((head, rest)) = name.split_once('.') {
            return self.chain(types, head, rest, value, depth);
        }
        let (code, modifier) = match name.split_once(':') {
            Some((code, modifier)) => (code, Some(modifier)),
            None => (name, None),
        };
        match code {
            // Every resource has both: `:missing=true` finds none.
            "_id" | "_lastUpdated" if modifier == Some("missing") => {
                let mut out = Vec::new();
                for one in self.alternatives(code, value)? {
                    out.push(match missing_value(code, one)? {
                        true => Criterion::Never,
                        false => Criterion::Always,
                    });
                }
                Ok(any(out))
            }
            "_id" => self.ids(modifier, value),
            "_lastUpdated" => self.last_updated(modifier, value),
            _ => {
                let def = lookup(types, code)?;
                self.values(types, &def, modifier, value)
            }
        }
    }

    /// `_has:Type:param:rest` (search.html#has): some `Type` resource refers
    /// to the match through `param` and meets `rest`.
    fn has(
        &self,
        types: &[String],
        name: &str,
        value: &str,
        depth: usize,
    ) -> Result<Criterion, Skip> {
        let mut parts = name.splitn(3, ':');
        let (Some(source), Some(code), Some(rest)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(Skip::Bad(bad(format!(
                "'_has:{name}' is not _has:Type:parameter:parameter"
            ))));
        };
        if rest.is_empty() || !registry::is_resource_type(source) {
            return Err(Skip::Bad(bad(format!(
                "'_has:{name}': '{source}' is not a resource type or nothing is searched on it"
            ))));
        }
        let Some(param) = registry::search_param(source, code)
            .filter(|p| p.kind == SearchParamType::Reference && p.expression.is_some())
        else {
            return Err(Skip::Bad(bad(format!(
                "_has: '{code}' is not a reference parameter of {source}"
            ))));
        };
        let targets = expand_targets(&param.target);
        if let Some(missing) = searched(types).into_iter().find(|t| !targets.contains(t)) {
            return Err(Skip::Bad(bad(format!(
                "_has: {source}.{code} cannot refer to a {missing}"
            ))));
        }
        let criterion = self.criterion(&[source.to_owned()], rest, value, depth + 1)?;
        self.spend(1)?;
        Ok(Criterion::Has {
            source_type: source.to_owned(),
            param: param.code.clone(),
            criterion: Box::new(criterion),
        })
    }

    /// `param[:Type].rest` (search.html#chaining): over each target type that
    /// knows `rest`.
    fn chain(
        &self,
        types: &[String],
        head: &str,
        rest: &str,
        value: &str,
        depth: usize,
    ) -> Result<Criterion, Skip> {
        let (code, modifier) = match head.split_once(':') {
            Some((code, modifier)) => (code, Some(modifier)),
            None => (head, None),
        };
        let def = lookup(types, code)?;
        if def.kind != SearchParamType::Reference {
            return Err(Skip::Bad(bad(format!(
                "'{code}' is not a reference parameter: it cannot be chained"
            ))));
        }
        let candidates = match modifier {
            None => def.targets.clone(),
            Some(target) if registry::is_resource_type(target) => {
                if !def.targets.contains(&target) {
                    return Err(Skip::Bad(bad(format!(
                        "'{code}' cannot refer to a {target}"
                    ))));
                }
                vec![target]
            }
            Some(other) => {
                return Err(Skip::Bad(bad(format!(
                    "'{head}.{rest}': a chain takes a resource type as modifier, not '{other}'"
                ))))
            }
        };
        let mut targets = Vec::new();
        let mut refused = None;
        for target in candidates {
            match self.criterion(&[target.to_owned()], rest, value, depth + 1) {
                Ok(criterion) => {
                    self.spend(1)?;
                    targets.push((target.to_owned(), criterion));
                }
                Err(Skip::Unknown(_)) => {}
                Err(Skip::Bad(error)) => {
                    if self.exhausted() {
                        return Err(Skip::Bad(error));
                    }
                    // The same code may be another kind of parameter on
                    // another target; the value is refused only if no target
                    // takes it.
                    refused.get_or_insert(error);
                }
            }
        }
        if targets.is_empty() {
            return Err(match refused {
                Some(error) => Skip::Bad(error),
                None => Skip::Unknown(format!(
                    "no type '{code}' refers to has the search parameter in '{head}.{rest}'"
                )),
            });
        }
        Ok(Criterion::Chain {
            param: def.code.to_owned(),
            targets,
        })
    }

    fn ids(&self, modifier: Option<&str>, value: &str) -> Result<Criterion, Skip> {
        if let Some(modifier) = modifier {
            return Err(Skip::Bad(not_supported(format!(
                "_id takes no modifier (':{modifier}')"
            ))));
        }
        let mut ids = Vec::new();
        for one in self.alternatives("_id", value)? {
            let id = unescape(one);
            if !is_valid_id(&id) {
                return Err(Skip::Bad(bad(format!("_id: '{id}' is not a valid id"))));
            }
            ids.push(id);
        }
        Ok(Criterion::Id(ids))
    }

    fn last_updated(&self, modifier: Option<&str>, value: &str) -> Result<Criterion, Skip> {
        if let Some(modifier) = modifier {
            return Err(Skip::Bad(not_supported(format!(
                "_lastUpdated takes no modifier (':{modifier}')"
            ))));
        }
        let mut out = Vec::new();
        for one in self.alternatives("_lastUpdated", value)? {
            out.push(Criterion::LastUpdated(date_value(
                "_lastUpdated",
                &unescape(one),
                self.cx.now,
            )?));
        }
        Ok(any(out))
    }

    /// The comma-separated alternatives of a value (escaped commas kept), none
    /// of them empty; each counts as a condition.
    fn alternatives<'v>(&self, code: &str, value: &'v str) -> Result<Vec<&'v str>, Skip> {
        let parts = split_unescaped(value, ',');
        if parts.iter().any(|p| p.is_empty()) {
            return Err(Skip::Bad(bad(format!(
                "{code}: '{value}' has an empty alternative"
            ))));
        }
        self.spend(parts.len())?;
        Ok(parts)
    }

    /// A parameter's value with its modifier, by the parameter's type.
    fn values(
        &self,
        types: &[String],
        def: &Def,
        modifier: Option<&str>,
        value: &str,
    ) -> Result<Criterion, Skip> {
        let code = def.code;
        if modifier == Some("missing") {
            return self.missing(def, value);
        }
        let alternatives = self.alternatives(code, value)?;
        let each = |f: &dyn Fn(&str) -> Result<Criterion, Skip>| -> Result<Criterion, Skip> {
            alternatives
                .iter()
                .map(|one| f(one))
                .collect::<Result<Vec<_>, _>>()
                .map(any)
        };
        match def.kind {
            SearchParamType::String => {
                let how = match modifier {
                    None => StringMatch::StartsWith,
                    Some("exact") => StringMatch::Exact,
                    Some("contains") => StringMatch::Contains,
                    Some(other) => return Err(unknown_modifier(code, def.kind, other)),
                };
                each(&|one| Ok(string(code, how, one)))
            }
            SearchParamType::Token => match modifier {
                None => each(&|one| token(code, one)),
                Some("not") => {
                    let inner = each(&|one| token(code, one))?;
                    Ok(Criterion::Not(Box::new(match inner {
                        any @ Criterion::Any(_) => any,
                        one => Criterion::Any(vec![one]),
                    })))
                }
                Some("text") => each(&|one| {
                    Ok(Criterion::TokenText {
                        param: code.to_owned(),
                        text: normalize_string(&unescape(one)),
                    })
                }),
                Some("of-type") if def.identifier_like => each(&|one| of_type(code, one)),
                Some("of-type") => Err(Skip::Bad(not_supported(format!(
                    "'{code}:of-type': only identifier parameters take :of-type"
                )))),
                Some(other) => Err(unknown_modifier(code, def.kind, other)),
            },
            SearchParamType::Reference => {
                let hint = match modifier {
                    None => None,
                    Some(target) if registry::is_resource_type(target) => {
                        if !def.targets.contains(&target) {
                            return Err(Skip::Bad(bad(format!(
                                "'{code}' cannot refer to a {target}"
                            ))));
                        }
                        Some(target)
                    }
                    Some(other) => return Err(unknown_modifier(code, def.kind, other)),
                };
                let provenance_patient = modifier.is_none()
                    && code == "patient"
                    && matches!(types, [t] if t == "Provenance");
                if provenance_patient {
                    return self.provenance_patient(def, &alternatives);
                }
                each(&|one| self.reference(def, hint, one))
            }
            SearchParamType::Date
            | SearchParamType::Number
            | SearchParamType::Quantity
            | SearchParamType::Composite => {
                if let Some(other) = modifier {
                    return Err(unknown_modifier(code, def.kind, other));
                }
                each(&|one| self.plain(def, one))
            }
            SearchParamType::Uri => {
                let how = match modifier {
                    None => UriMatch::Exact,
                    Some("below") => UriMatch::Below,
                    Some("above") => UriMatch::Above,
                    Some(other) => return Err(unknown_modifier(code, def.kind, other)),
                };
                each(&|one| {
                    Ok(Criterion::Uri {
                        param: code.to_owned(),
                        uri: unescape(one),
                        how,
                    })
                })
            }
            SearchParamType::Special => Err(Skip::Unknown(format!(
                "the search parameter '{code}' is not supported"
            ))),
        }
    }

    /// One value without a modifier: what a composite's parts are made of.
    fn plain(&self, def: &Def, one: &str) -> Result<Criterion, Skip> {
        let code = def.code;
        match def.kind {
            SearchParamType::String => Ok(string(code, StringMatch::StartsWith, one)),
            SearchParamType::Token => token(code, one),
            SearchParamType::Reference => self.reference(def, None, one),
            SearchParamType::Date => Ok(Criterion::Date {
                param: code.to_owned(),
                range: date_value(code, &unescape(one), self.cx.now)?,
            }),
            SearchParamType::Number => {
                let text = unescape(one);
                let (prefix, number) = split_prefix(&text)?;
                Ok(Criterion::Number {
                    param: code.to_owned(),
                    range: number_value(code, prefix, number)?,
                })
            }
            SearchParamType::Quantity => quantity(code, one),
            SearchParamType::Uri => Ok(Criterion::Uri {
                param: code.to_owned(),
                uri: unescape(one),
                how: UriMatch::Exact,
            }),
            SearchParamType::Composite => self.composite(def, one),
            SearchParamType::Special => Err(Skip::Unknown(format!(
                "the search parameter '{code}' is not supported"
            ))),
        }
    }

    /// `code$value...` (search.html#composite): one part per component, in
    /// the order the definition lists them, as the index stores them.
    fn composite(&self, def: &Def, one: &str) -> Result<Criterion, Skip> {
        let code = def.code;
        let parts = split_unescaped(one, '$');
        if parts.len() != def.components.len() {
            return Err(Skip::Bad(bad(format!(
                "{code}: '{one}' has {} parts separated by '$'; {code} has {}",
                parts.len(),
                def.components.len()
            ))));
        }
        let mut criteria = Vec::with_capacity(parts.len());
        for (part, component) in parts.into_iter().zip(def.components) {
            let Some(param) = registry::search_param_by_url(&component.definition).filter(|p| {
                !matches!(
                    p.kind,
                    SearchParamType::Composite | SearchParamType::Special
                )
            }) else {
                return Err(Skip::Unknown(format!(
                    "the search parameter '{code}' is not supported"
                )));
            };
            if part.is_empty() {
                return Err(Skip::Bad(bad(format!("{code}: '{one}' has an empty part"))));
            }
            criteria.push(self.plain(&Def::of(param, None), part)?);
        }
        Ok(Criterion::Composite {
            param: code.to_owned(),
            parts: criteria,
        })
    }

    fn missing(&self, def: &Def, value: &str) -> Result<Criterion, Skip> {
        let Some(kind) = index_kind(def.kind) else {
            return Err(Skip::Unknown(format!(
                "the search parameter '{}' is not supported",
                def.code
            )));
        };
        let mut out = Vec::new();
        for one in self.alternatives(def.code, value)? {
            let missing = missing_value(def.code, one)?;
            out.push(Criterion::Missing {
                param: def.code.to_owned(),
                kind,
                missing,
            });
        }
        Ok(any(out))
    }

    /// A reference value (search.html#reference): `Type/id`, `id`, a URL of
    /// this server (local), any other URL or canonical (`url|version`). A
    /// `/_history/n` suffix is dropped.
    fn reference(&self, def: &Def, hint: Option<&str>, one: &str) -> Result<Criterion, Skip> {
        let code = def.code;
        let text = unescape(one);
        let base = self.cx.base_url.trim_end_matches('/');
        let local = (!base.is_empty())
            .then(|| text.strip_prefix(base)?.strip_prefix('/'))
            .flatten()
            .filter(|rest| rest.contains('/') && looks_relative(rest));
        let relative = local.or_else(|| looks_relative(&text).then_some(text.as_str()));
        let reference = |target_type: Option<&str>, target_id: Option<&str>, url, version| {
            Criterion::Reference {
                param: code.to_owned(),
                target_type: target_type.map(str::to_owned),
                target_id: target_id.map(str::to_owned),
                url,
                version,
            }
        };
        let Some(relative) = relative else {
            // An absolute URL or canonical elsewhere: matched by URL.
            let (url, version) = match text.split_once('|') {
                Some((url, version)) => (url, nonempty(version.to_owned())),
                None => (text.as_str(), None),
            };
            let url = url.split("/_history/").next().unwrap_or(url);
            if url.is_empty() {
                return Err(Skip::Bad(bad(format!(
                    "{code}: '{text}' is not a reference"
                ))));
            }
            return Ok(reference(None, None, Some(url.to_owned()), version));
        };
        let relative = relative.split("/_history/").next().unwrap_or(relative);
        match relative.split_once('/') {
            Some((target_type, id)) => {
                if !registry::is_resource_type(target_type) || !is_valid_id(id) {
                    return Err(Skip::Bad(bad(format!(
                        "{code}: '{text}' is not a reference (Type/id)"
                    ))));
                }
                if hint.is_some_and(|h| h != target_type) {
                    return Err(Skip::Bad(bad(format!(
                        "{code}: '{text}' is not a {}",
                        hint.unwrap_or_default()
                    ))));
                }
                Ok(reference(Some(target_type), Some(id), None, None))
            }
            None => {
                if !is_valid_id(relative) {
                    return Err(Skip::Bad(bad(format!(
                        "{code}: '{text}' is not an id or a reference"
                    ))));
                }
                let target_type = hint.or(match def.targets.as_slice() {
                    [only] => Some(*only),
                    _ => None,
                });
                Ok(reference(target_type, Some(relative), None, None))
            }
        }
    }

    /// `Provenance?patient=`: a server-made Provenance names its target's
    /// patients in an extension, not in `patient`; the Patient compartment
    /// rule reads it (see `haven_model::search_value::PROVENANCE_TARGET_PATIENT`).
    fn provenance_patient(&self, def: &Def, alternatives: &[&str]) -> Result<Criterion, Skip> {
        let mut out = Vec::new();
        for one in alternatives {
            let reference = self.reference(def, None, one)?;
            let patient = match &reference {
                Criterion::Reference {
                    target_type: Some(t),
                    target_id: Some(id),
                    ..
                } if t == "Patient" => Some(id.clone()),
                _ => None,
            };
            out.push(reference);
            if let Some(id) = patient {
                self.spend(1)?;
                out.push(Criterion::PatientCompartment(id));
            }
        }
        Ok(any(out))
    }
}

/// The value of `:missing`.
fn missing_value(code: &str, one: &str) -> Result<bool, Skip> {
    match one {
        "true" => Ok(true),
        "false" => Ok(false),
        other => Err(Skip::Bad(bad(format!(
            "{code}:missing: '{other}' is not true or false"
        )))),
    }
}

/// Whether a reference value is relative: not a URL, URN or canonical.
fn looks_relative(text: &str) -> bool {
    !text.contains("://") && !text.starts_with("urn:") && !text.contains('|')
}

fn string(code: &str, how: StringMatch, one: &str) -> Criterion {
    let text = unescape(one);
    Criterion::String {
        param: code.to_owned(),
        value: match how {
            StringMatch::Exact => text,
            StringMatch::StartsWith | StringMatch::Contains => normalize_string(&text),
        },
        how,
    }
}

/// `system|code`, `|code` (no system), `system|` (any code), `code`
/// (search.html#token). Prefixes are not prefixes here: `ge123` is a code.
fn token(code: &str, one: &str) -> Result<Criterion, Skip> {
    let (system, value) = match split_unescaped(one, '|').as_slice() {
        [value] => (None, nonempty(unescape(value))),
        [system, value] => (Some(unescape(system)), nonempty(unescape(value))),
        _ => {
            return Err(Skip::Bad(bad(format!(
                "{code}: '{one}' is not a token (system|code)"
            ))))
        }
    };
    if value.is_none() && system.as_deref().is_none_or(str::is_empty) {
        return Err(Skip::Bad(bad(format!(
            "{code}: '{one}' is not a token (system|code)"
        ))));
    }
    Ok(Criterion::Token {
        param: code.to_owned(),
        system,
        code: value,
    })
}

/// `:of-type`: `typeSystem|typeCode|value`, all three given.
fn of_type(code: &str, one: &str) -> Result<Criterion, Skip> {
    match split_unescaped(one, '|').as_slice() {
        [type_system, type_code, value]
            if !type_system.is_empty() && !type_code.is_empty() && !value.is_empty() =>
        {
            Ok(Criterion::TokenOfType {
                param: code.to_owned(),
                type_system: unescape(type_system),
                type_code: unescape(type_code),
                value: unescape(value),
            })
        }
        _ => Err(Skip::Bad(bad(format!(
            "{code}:of-type: '{one}' is not typeSystem|typeCode|value"
        )))),
    }
}

/// `[prefix]number|system|code`, `[prefix]number||code`, `[prefix]number`
/// (search.html#quantity).
fn quantity(code: &str, one: &str) -> Result<Criterion, Skip> {
    let (number, system, unit) = match split_unescaped(one, '|').as_slice() {
        [number] => (unescape(number), None, None),
        [number, system, unit] => (
            unescape(number),
            nonempty(unescape(system)),
            nonempty(unescape(unit)),
        ),
        _ => {
            return Err(Skip::Bad(bad(format!(
                "{code}: '{one}' is not a quantity (number|system|code)"
            ))))
        }
    };
    let (prefix, number) = split_prefix(&number)?;
    let range = number_value(code, prefix, number)?;
    Ok(Criterion::Quantity {
        param: code.to_owned(),
        range,
        system,
        code: unit,
    })
}
