//! FHIR R4 (4.0.1) knowledge for Haven, pure: no IO, no async.
//!
//! What the server knows about FHIR is generated from the official definitions by
//! `haven-codegen` into `profiles/generated/` and compiled in here, so the tables
//! can never drift from the specification without CI noticing.

pub mod clock;
pub mod id;
pub mod outcome;
pub mod registry;
pub mod validate;
