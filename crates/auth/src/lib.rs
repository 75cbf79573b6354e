//! SMART on FHIR for Haven.
//!
//! - [`scope`]: the scope grammar (SMART v1 and v2) and what a set of granted
//!   scopes permits.
//! - [`keys`]: the server's signing keys and their JWKS.
//! - [`client`]: the one place that speaks OAuth as a client (Backend Services).

pub mod client;
pub mod scope;
