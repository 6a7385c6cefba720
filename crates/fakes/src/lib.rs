//! Local provider fakes that follow the providers' documented behaviour, for tests and the demo.
//!
//! Each fake is an axum service on a local port with an inspection API under `/__fake/…`
//! and the same inspection available directly from Rust through its handle. The email,
//! LinkedIn and Instagram fakes share [`outreach`]: a movable clock, rate windows, the record of
//! accepted actions by send id, and the events they post back to herald's sequence webhook.

pub mod airtable;
pub mod email;
pub mod instagram;
pub mod linkedin;
pub mod meta;
pub mod outreach;
pub mod vapi;
