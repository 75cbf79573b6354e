//! The element tables of every R4 resource and data type, as the validator reads them.
//!
//! The generated `structures.json` lists elements by path. Here they are regrouped
//! by parent path and JSON property name, with each choice element expanded into
//! one entry per allowed type (`value[x]` becomes `valueQuantity`, `valueString`,
//! ...), so the validator resolves every property with two hash lookups.

use std::collections::HashMap;
use std::sync::LazyLock;

use regex::Regex;
use serde::Deserialize;

const STRUCTURES_JSON: &str = include_str!("../../../profiles/generated/structures.json");

/// What a StructureDefinition defines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Primitive,
    Complex,
    Resource,
}

/// One resource or data type.
#[derive(Debug)]
pub struct TypeDef {
    pub kind: Kind,
    pub is_abstract: bool,
    /// The type this one specialises, e.g. `DomainResource` for `Patient`.
    pub base: Option<String>,
    /// Child elements by parent path: `Patient` and `Patient.contact` for Patient.
    pub children: HashMap<String, Children>,
}

/// The elements directly under one parent.
#[derive(Debug, Default)]
pub struct Children {
    /// By JSON property name, choice elements expanded per type.
    pub by_name: HashMap<String, Child>,
    /// Elements with `min >= 1`: each is present when any of its names is.
    pub required: Vec<Required>,
}

/// A required element and the JSON names that satisfy it.
#[derive(Debug)]
pub struct Required {
    pub element: String,
    pub names: Vec<String>,
}

/// One JSON property: an element, or one type of a choice element.
#[derive(Debug)]
pub struct Child {
    /// The element name without `[x]`, e.g. `value` for `valueQuantity`.
    pub element: String,
    pub is_choice: bool,
    pub type_code: String,
    /// Whether the JSON form is an array (`max` is `*` or above 1).
    pub many: bool,
    /// The numeric upper bound, when it is neither 1 nor `*`.
    pub max: Option<usize>,
    /// Where the element's own children are defined: its path, or the target
    /// of its `contentReference`.
    pub children_path: String,
    /// Whether the definition marks the element `isSummary`, i.e. `_summary=true`
    /// keeps it (search.html#summary).
    pub summary: bool,
}

/// All types and the primitive formats.
#[derive(Debug)]
pub struct Structures {
    pub types: HashMap<String, TypeDef>,
    pub formats: HashMap<String, Regex>,
}

#[derive(Deserialize)]
struct RawStructures {
    primitives: HashMap<String, String>,
    types: HashMap<String, RawType>,
}

#[derive(Deserialize)]
struct RawType {
    kind: String,
    #[serde(default, rename = "abstract")]
    is_abstract: bool,
    base: Option<String>,
    elements: Vec<RawElement>,
}

#[derive(Deserialize)]
struct RawElement {
    path: String,
    min: u32,
    max: String,
    #[serde(default)]
    types: Vec<String>,
    #[serde(rename = "ref")]
    content_ref: Option<String>,
    #[serde(default)]
    summary: bool,
}

/// The tables, parsed on first use.
pub static STRUCTURES: LazyLock<Structures> = LazyLock::new(load);

fn load() -> Structures {
    let raw: RawStructures =
        serde_json::from_str(STRUCTURES_JSON).expect("generated structures.json is valid");
    let formats = raw
        .primitives
        .iter()
        .map(|(name, pattern)| {
            let anchored = format!("^(?:{pattern})$");
            let regex = Regex::new(&anchored).expect("R4 primitive regex compiles");
            (name.clone(), regex)
        })
        .collect();
    let types = raw
        .types
        .into_iter()
        .map(|(name, raw)| {
            let def = build_type(&raw);
            (name, def)
        })
        .collect();
    Structures { types, formats }
}

fn build_type(raw: &RawType) -> TypeDef {
    let kind = match raw.kind.as_str() {
        "primitive-type" => Kind::Primitive,
        "resource" => Kind::Resource,
        _ => Kind::Complex,
    };
    // A content reference borrows the type of the element it points at.
    let types_by_path: HashMap<&str, &[String]> = raw
        .elements
        .iter()
        .map(|e| (e.path.as_str(), e.types.as_slice()))
        .collect();
    let mut children: HashMap<String, Children> = HashMap::new();
    for element in &raw.elements {
        let Some((parent, name)) = element.path.rsplit_once('.') else {
            continue;
        };
        let types: &[String] = match &element.content_ref {
            Some(target) => types_by_path.get(target.as_str()).copied().unwrap_or(&[]),
            None => &element.types,
        };
        let many = element.max != "1" && element.max != "0";
        let max = element.max.parse::<usize>().ok().filter(|&m| m > 1);
        let children_path = element
            .content_ref
            .clone()
            .unwrap_or_else(|| element.path.clone());
        let entry = children.entry(parent.to_owned()).or_default();
        let mut names = Vec::new();
        if let Some(stem) = name.strip_suffix("[x]") {
            for code in types {
                let json_name = format!("{stem}{}", capitalised(code));
                names.push(json_name.clone());
                entry.by_name.insert(
                    json_name,
                    Child {
                        element: stem.to_owned(),
                        is_choice: true,
                        type_code: code.clone(),
                        many,
                        max,
                        children_path: children_path.clone(),
                        summary: element.summary,
                    },
                );
            }
        } else if element.max != "0" {
            names.push(name.to_owned());
            entry.by_name.insert(
                name.to_owned(),
                Child {
                    element: name.to_owned(),
                    is_choice: false,
                    type_code: types.first().cloned().unwrap_or_default(),
                    many,
                    max,
                    children_path,
                    summary: element.summary,
                },
            );
        }
        if element.min >= 1 && !names.is_empty() {
            entry.required.push(Required {
                element: name.trim_end_matches("[x]").to_owned(),
                names,
            });
        }
    }
    TypeDef {
        kind,
        is_abstract: raw.is_abstract,
        base: raw.base.clone(),
        children,
    }
}

fn capitalised(code: &str) -> String {
    let mut chars = code.chars();
    match chars.next() {
        Some(first) => first.to_ascii_uppercase().to_string() + chars.as_str(),
        None => String::new(),
    }
}
