//! Local provider fakes that follow the providers' documented behaviour, for tests and the demo.
//!
//! Each fake is an axum service on a local port with an inspection API under `/__fake/…`
//! and the same inspection available directly from Rust through its handle.

pub mod airtable;
pub mod meta;
pub mod vapi;
