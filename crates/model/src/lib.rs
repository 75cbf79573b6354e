//! FHIR R4 (4.0.1) knowledge for Haven, pure: no IO, no async.
//!
//! What the server knows about FHIR is generated from the official definitions by
//! `haven-codegen` into `profiles/generated/` and compiled in here, so the tables
//! can never drift from the specification without CI noticing. Regenerate them
//! from the workspace root with:
//!
//! ```text
//! cargo run -p haven-codegen -- --shared ../shared --out profiles/generated
//! ```
//!
//! The tables are JSON parsed once on first use (`LazyLock`) rather than Rust code
//! generated into the crate: they stay reviewable in diffs, and the crate compiles
//! fast. [`registry`] answers questions about resource types, search parameters and
//! compartments; [`structure`] regroups the element tables for [`validate`], which
//! checks resources against the base definitions. [`search_value`] evaluates the
//! FHIRPath of search parameters, and [`search_index`] turns what they select into
//! typed index entries (a dateTime without a zone is read as UTC there).

pub mod clock;
pub mod id;
pub mod outcome;
pub mod registry;
pub mod search_index;
pub mod search_value;
pub mod structure;
pub mod validate;
