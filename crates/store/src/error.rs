//! The store's error type: what went wrong, named from the caller's side.

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Postgres refused or could not be reached.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Applying the schema migrations failed.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The thing being created already exists (a tenant name, for one).
    #[error("{what} already exists")]
    Conflict { what: String },
    /// An argument was refused before reaching the database.
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    /// The thing asked for (or referred to) does not exist, or belongs to another tenant.
    #[error("{what} not found")]
    NotFound { what: String },
    /// A stored row breaks an invariant the schema should have enforced.
    #[error("stored {what} is malformed: {reason}")]
    Corrupt { what: &'static str, reason: String },
}

impl Error {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Error::Invalid {
            field,
            reason: reason.into(),
        }
    }

    pub(crate) fn not_found(what: impl Into<String>) -> Self {
        Error::NotFound { what: what.into() }
    }
}

/// Whether `err` is a unique-constraint violation (Postgres `23505`).
pub(crate) fn is_unique_violation(err: &sqlx::Error) -> bool {
    err.as_database_error()
        .is_some_and(|db| db.is_unique_violation())
}

/// Whether `err` is a foreign-key violation (Postgres `23503`): the row referred to a tenant
/// that does not exist.
pub(crate) fn is_foreign_key_violation(err: &sqlx::Error) -> bool {
    err.as_database_error()
        .is_some_and(|db| db.is_foreign_key_violation())
}

/// Maps a failed insert: a missing tenant becomes `NotFound`, anything else stays a database
/// error.
pub(crate) fn tenant_must_exist(err: sqlx::Error) -> Error {
    if is_foreign_key_violation(&err) {
        Error::not_found("tenant")
    } else {
        Error::Database(err)
    }
}
