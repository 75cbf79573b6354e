//! The pure parts of Haven's audit trail (issue 4).
//!
//! - [`event`] builds FHIR R4 AuditEvents following the IHE Basic Audit Log
//!   Patterns (BALP), for FHIR requests and for authentication events.
//! - [`mod@provenance`] builds the Provenance written with every resource version.
//! - [`canonical`] gives the one JSON text a record is hashed in (RFC 8785).
//! - [`chain`] links stored records into a hash chain and verifies it.
//!
//! Nothing here does IO: the server stores what these functions return, in the
//! same transaction as the data they describe.

pub mod canonical;
pub mod chain;
pub mod event;
pub mod provenance;

pub use chain::{append, link_hash, verify, BreakKind, ChainBreak, StoredLink, Verifier, GENESIS};
pub use event::{
    audit_event, auth_event, token_fingerprint, Action, AuditFacts, AuthEventKind, AuthFacts,
    Decision, Entity, Outcome, Who, AUTH_EVENT_SYSTEM, BREAK_THE_GLASS_POLICY, DECISION_ENTITY,
};
pub use provenance::{provenance, Activity};
