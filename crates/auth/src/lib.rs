//! SMART on FHIR for Haven.
//!
//! - [`scope`]: the scope grammar (SMART v1 and v2) and what a set of granted
//!   scopes permits.
//! - [`server`]: the authorization server (authorize, token, introspect, revoke,
//!   register, discovery) and the verification of bearer tokens.
//! - [`registry`]: registered clients and users; secrets kept only as hashes.
//! - [`keys`]: the server's signing keys and their JWKS.
//! - [`limits`]: rate limits and the sign-in throttle.
//! - [`client`]: the one place that speaks OAuth as a client (Backend Services).
//! - `verified`: access tokens already checked, so a token's signature is
//!   verified once rather than on every request.

pub mod client;
pub mod keys;
pub mod limits;
pub mod registry;
pub mod scope;
pub mod server;
mod verified;

pub use server::{AccessContext, AuthConfig, AuthServer, OAuthError, TokenRejection};
