//! Haven's consent and labeling decisions, pure: no IO, no clock of its own.
//!
//! - [`label`]: which resources are sensitive (the value sets in
//!   `profiles/sensitivity/`), the labels they get and why.
//! - [`clearance`]: what a requester may see, the verdict on one resource's
//!   labels, and the redacted copy for a masked view.
//! - [`consent`]: a patient's privacy Consents, judged for one requester, as
//!   predicates that a read evaluates and a search compiles.
//! - [`purpose`]: purpose of use.
//!
//! The API feeds it who asks, why, and what; it answers with a verdict and
//! the reasons the audit record keeps.

pub mod clearance;
pub mod consent;
pub mod label;
pub mod purpose;

/// A policy input that cannot be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("{0}")]
    Invalid(String),
}
