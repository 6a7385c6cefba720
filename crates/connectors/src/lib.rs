//! HTTP clients for the providers herald talks to; each maps provider responses to errors that
//! carry the retry decision, and none retries or sleeps on its own.

pub mod airtable;
pub mod email;
pub mod instagram;
pub mod linkedin;
pub mod rest;
pub mod voice;
pub mod whatsapp;
