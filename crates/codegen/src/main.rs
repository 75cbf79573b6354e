//! Generates the FHIR R4 tables that `haven-model` compiles in.
//!
//! Run from the workspace root:
//!
//! ```text
//! cargo run -p haven-codegen -- --shared ../shared --out profiles/generated
//! ```
//!
//! `--shared` defaults to `$HAVEN_SHARED`, else `../shared`; it must hold the official
//! 4.0.1 definitions under `fhir-r4/`. Only derived tables are written, never the
//! official files themselves.
//!
//! Design choices:
//! - Output is deterministic: every map is a `BTreeMap` or a sorted list, and the
//!   printer is our own, so the same input always gives byte-identical files and CI
//!   can diff them.
//! - The printer indents only the outer levels and writes leaves (one element, one
//!   search parameter field) on a single line. That keeps the files small enough to
//!   `include_str!` while diffs stay readable.
//! - Types are normalised here rather than at runtime: FHIRPath system types
//!   (`http://hl7.org/fhirpath/System.String`) become the FHIR primitive they stand
//!   for, and `Resource.id` becomes `id`, so the validator only ever sees FHIR type
//!   codes.
//! - Each element row carries `summary: true` when the definition marks it
//!   `isSummary`, which is what `_summary=true` keeps (search.html#summary).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::{json, Map, Value};

mod print;

#[derive(Parser)]
#[command(about = "Generate Haven's FHIR R4 tables from the official definitions")]
struct Args {
    /// Directory holding `fhir-r4/` with the official R4 definitions.
    #[arg(long, env = "HAVEN_SHARED", default_value = "../shared")]
    shared: PathBuf,
    /// Directory the tables are written to.
    #[arg(long, default_value = "profiles/generated")]
    out: PathBuf,
}

const FHIR_TYPE_EXT: &str = "http://hl7.org/fhir/StructureDefinition/structuredefinition-fhir-type";
const REGEX_EXT: &str = "http://hl7.org/fhir/StructureDefinition/regex";
const SYSTEM_PREFIX: &str = "http://hl7.org/fhirpath/System.";

/// The compartments Haven serves, by their CompartmentDefinition file suffix.
const COMPARTMENTS: [&str; 5] = [
    "patient",
    "encounter",
    "practitioner",
    "relatedPerson",
    "device",
];

fn main() -> Result<()> {
    let args = Args::parse();
    let r4 = args.shared.join("fhir-r4");
    let resources = read_json(&r4.join("profiles-resources.json"))?;
    let types = read_json(&r4.join("profiles-types.json"))?;
    let params = read_json(&r4.join("search-parameters.json"))?;

    let mut structures = Structures::default();
    for bundle in [&types, &resources] {
        for def in bundle_resources(bundle, "StructureDefinition") {
            structures.add(def)?;
        }
    }
    let resource_types: Vec<&String> = structures
        .types
        .iter()
        .filter(|(_, t)| t["kind"] == "resource" && t.get("abstract").is_none())
        .map(|(name, _)| name)
        .collect();
    if resource_types.len() < 140 {
        bail!("only {} resource types found", resource_types.len());
    }

    let search = search_parameters(&params)?;
    let compartments = compartments(&r4.join("compartments"))?;

    fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    write(&args.out, "resource-types.json", &json!(resource_types), 1)?;
    write(
        &args.out,
        "search-parameters.json",
        &Value::Array(search),
        2,
    )?;
    write(&args.out, "compartments.json", &compartments, 2)?;
    let structures_json = json!({
        "primitives": structures.primitives,
        "types": structures.types,
    });
    write(&args.out, "structures.json", &structures_json, 4)?;
    Ok(())
}

fn read_json(path: &Path) -> Result<Value> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn write(dir: &Path, name: &str, value: &Value, pretty_depth: usize) -> Result<()> {
    let path = dir.join(name);
    let mut text = print::render(value, pretty_depth);
    text.push('\n');
    fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}

/// The resources of a Bundle with the given `resourceType`.
fn bundle_resources<'a>(bundle: &'a Value, kind: &'a str) -> impl Iterator<Item = &'a Value> {
    bundle["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|entry| &entry["resource"])
        .filter(move |r| r["resourceType"] == kind)
}

fn str_list(value: &Value) -> Vec<String> {
    let mut list: Vec<String> = value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(str::to_owned)
        .collect();
    list.sort();
    list.dedup();
    list
}

#[derive(Default)]
struct Structures {
    types: BTreeMap<String, Value>,
    primitives: BTreeMap<String, String>,
}

impl Structures {
    fn add(&mut self, def: &Value) -> Result<()> {
        // Constraints (SimpleQuantity, MoneyQuantity, ...) add no elements of their
        // own; instances are validated against the type they constrain.
        let derivation = def["derivation"].as_str();
        let name = def["id"]
            .as_str()
            .context("StructureDefinition without id")?;
        if derivation == Some("constraint") {
            return Ok(());
        }
        let kind = def["kind"]
            .as_str()
            .context("StructureDefinition without kind")?;
        let elements = def["snapshot"]["element"]
            .as_array()
            .with_context(|| format!("{name} has no snapshot"))?;
        let mut rows = Vec::new();
        for element in elements.iter().skip(1) {
            let path = element["path"].as_str().context("element without path")?;
            let mut row = Map::new();
            row.insert("path".into(), json!(path));
            row.insert("min".into(), element["min"].clone());
            row.insert("max".into(), element["max"].clone());
            if let Some(target) = element["contentReference"].as_str() {
                row.insert("ref".into(), json!(target.trim_start_matches('#')));
            }
            // Written only when true, like `abstract`: `_summary=true` keeps these.
            if element["isSummary"] == true {
                row.insert("summary".into(), json!(true));
            }
            let is_resource_id = kind == "resource" && path == format!("{name}.id");
            let mut codes = Vec::new();
            for t in element["type"].as_array().into_iter().flatten() {
                let code = t["code"].as_str().context("type without code")?;
                let code = if is_resource_id {
                    "id".to_owned()
                } else if code.starts_with(SYSTEM_PREFIX) {
                    if kind == "primitive-type" && path.ends_with(".value") {
                        if let Some(regex) = extension(t, REGEX_EXT) {
                            self.primitives.insert(name.to_owned(), regex.to_owned());
                        }
                    }
                    match extension(t, FHIR_TYPE_EXT) {
                        Some(fhir_type) => fhir_type.to_owned(),
                        None => system_to_fhir(code)
                            .with_context(|| format!("{path} has an unknown type {code}"))?
                            .to_owned(),
                    }
                } else {
                    code.to_owned()
                };
                codes.push(code);
            }
            // Primitive types expose `value` only in XML/JSON form, never as an element.
            if kind == "primitive-type" && path.ends_with(".value") {
                continue;
            }
            if !codes.is_empty() {
                row.insert("types".into(), json!(codes));
            }
            rows.push(Value::Object(row));
        }
        let mut entry = Map::new();
        entry.insert("kind".into(), json!(kind));
        if def["abstract"] == true {
            entry.insert("abstract".into(), json!(true));
        }
        if let Some(base) = def["baseDefinition"].as_str() {
            let base = base.rsplit('/').next().unwrap_or(base);
            entry.insert("base".into(), json!(base));
        }
        entry.insert("elements".into(), Value::Array(rows));
        if self
            .types
            .insert(name.to_owned(), Value::Object(entry))
            .is_some()
        {
            bail!("{name} is defined twice");
        }
        Ok(())
    }
}

/// The FHIR primitive a FHIRPath system type stands for, when no extension says.
fn system_to_fhir(code: &str) -> Option<&'static str> {
    Some(match code.strip_prefix(SYSTEM_PREFIX)? {
        "String" => "string",
        "Boolean" => "boolean",
        "Integer" => "integer",
        "Decimal" => "decimal",
        "Date" => "date",
        "DateTime" => "dateTime",
        "Time" => "time",
        _ => return None,
    })
}

fn extension<'a>(value: &'a Value, url: &str) -> Option<&'a str> {
    value["extension"]
        .as_array()?
        .iter()
        .find(|e| e["url"] == url)
        .and_then(|e| e["valueUrl"].as_str().or(e["valueString"].as_str()))
}

fn search_parameters(bundle: &Value) -> Result<Vec<Value>> {
    let mut params = Vec::new();
    let mut seen = BTreeSet::new();
    for p in bundle_resources(bundle, "SearchParameter") {
        let code = p["code"]
            .as_str()
            .context("search parameter without code")?;
        let url = p["url"].as_str().context("search parameter without url")?;
        let mut out = Map::new();
        out.insert("code".into(), json!(code));
        out.insert("url".into(), json!(url));
        out.insert("base".into(), json!(str_list(&p["base"])));
        out.insert("type".into(), p["type"].clone());
        if let Some(expression) = p["expression"].as_str() {
            out.insert("expression".into(), json!(expression));
        }
        let target = str_list(&p["target"]);
        if !target.is_empty() {
            out.insert("target".into(), json!(target));
        }
        if let Some(components) = p["component"].as_array() {
            let components: Vec<Value> = components
                .iter()
                .map(|c| json!({"definition": c["definition"], "expression": c["expression"]}))
                .collect();
            out.insert("component".into(), Value::Array(components));
        }
        for key in ["modifier", "comparator"] {
            let list = str_list(&p[key]);
            if !list.is_empty() {
                out.insert(key.into(), json!(list));
            }
        }
        for key in ["multipleOr", "multipleAnd"] {
            if let Some(flag) = p[key].as_bool() {
                out.insert(key.into(), json!(flag));
            }
        }
        if !seen.insert(url.to_owned()) {
            bail!("search parameter {url} is defined twice");
        }
        params.push((code.to_owned(), url.to_owned(), sorted(out)));
    }
    params.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    Ok(params.into_iter().map(|(_, _, p)| p).collect())
}

fn compartments(dir: &Path) -> Result<Value> {
    let mut all = BTreeMap::new();
    for suffix in COMPARTMENTS {
        let def = read_json(&dir.join(format!("CompartmentDefinition-{suffix}.json")))?;
        let code = def["code"].as_str().context("compartment without code")?;
        let mut members = BTreeMap::new();
        for resource in def["resource"].as_array().into_iter().flatten() {
            let name = resource["code"]
                .as_str()
                .context("compartment resource without code")?;
            let params = str_list(&resource["param"]);
            if !params.is_empty() {
                members.insert(name.to_owned(), params);
            }
        }
        all.insert(code.to_owned(), members);
    }
    Ok(json!(all))
}

/// Re-inserts an object's entries in key order; `serde_json` keeps insertion order.
fn sorted(map: Map<String, Value>) -> Value {
    let ordered: BTreeMap<String, Value> = map.into_iter().collect();
    Value::Object(ordered.into_iter().collect())
}
