//! What the benchmark binaries share: the Synthea corpus and its copies, and
//! the search mix.

pub mod mix;
pub mod process;
pub mod synthea;
