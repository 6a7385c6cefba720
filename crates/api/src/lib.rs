//! herald-api.
