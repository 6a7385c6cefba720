//! Identifiers. Each is validated once, where it enters the system, so code that holds one
//! never re-checks it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Why a string was refused as an identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("queue name must be 1 to 64 characters of a-z, 0-9, '_' or '-', got {0:?}")]
    QueueName(String),
    #[error("tenant id must be a UUID, got {0:?}")]
    TenantId(String),
    #[error("job id must be 1 to 64 characters of a-z, A-Z, 0-9, '_' or '-', got {0:?}")]
    JobId(String),
}

/// A tenant: one customer account. Every row and every job carries one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TenantId(pub Uuid);

impl TenantId {
    pub fn new() -> Self {
        Self(Uuid::new_v4())
    }
}

impl Default for TenantId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for TenantId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s)
            .map(Self)
            .map_err(|_| IdError::TenantId(s.to_owned()))
    }
}

/// A job's id: time-ordered (UUID v7, simple form) when herald makes it, or the outbox row's
/// id when the job comes from Postgres.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct JobId(String);

impl JobId {
    pub fn generate() -> Self {
        Self(Uuid::now_v7().simple().to_string())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for JobId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if ok {
            Ok(Self(s))
        } else {
            Err(IdError::JobId(s))
        }
    }
}

impl FromStr for JobId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::try_from(s.to_owned())
    }
}

impl From<JobId> for String {
    fn from(id: JobId) -> Self {
        id.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A queue's name. Queues are shared by all tenants; there is one per job type.
/// The name becomes part of Redis keys (inside the `{...}` hash tag), hence the narrow alphabet.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct QueueName(String);

impl QueueName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for QueueName {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if ok {
            Ok(Self(s))
        } else {
            Err(IdError::QueueName(s))
        }
    }
}

impl FromStr for QueueName {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::try_from(s.to_owned())
    }
}

impl From<QueueName> for String {
    fn from(q: QueueName) -> Self {
        q.0
    }
}

impl fmt::Display for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_names_are_validated() {
        assert!("sync".parse::<QueueName>().is_ok());
        assert!("send_step-2".parse::<QueueName>().is_ok());
        assert!("".parse::<QueueName>().is_err());
        assert!("Sync".parse::<QueueName>().is_err());
        assert!("a{b}".parse::<QueueName>().is_err());
        assert!("x".repeat(65).parse::<QueueName>().is_err());
    }

    #[test]
    fn job_ids_are_validated_and_generated_unique() {
        let a = JobId::generate();
        let b = JobId::generate();
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), 32);
        assert!("abc:def".parse::<JobId>().is_err());
        assert!(serde_json::from_str::<JobId>("\"ok-1\"").is_ok());
        assert!(serde_json::from_str::<JobId>("\"no space\"").is_err());
    }

    #[test]
    fn tenant_ids_parse_uuids_only() {
        let t = TenantId::new();
        assert_eq!(t.to_string().parse::<TenantId>().unwrap(), t);
        assert!("tenant-a".parse::<TenantId>().is_err());
    }
}
