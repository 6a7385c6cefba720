//! The queue's error type, named from the caller's side.

/// What went wrong talking to the queue.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Redis could not be reached or answered with an error. Usually transient.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// Redis answered with a value of an unexpected type.
    #[error("unexpected reply from redis: {0}")]
    Parse(#[from] redis::ParsingError),
    /// A configuration value is unusable (bad URL, evicting memory policy…).
    #[error("configuration: {0}")]
    Config(String),
    /// A job given to enqueue is invalid; nothing was written.
    #[error("invalid job: {0}")]
    InvalidJob(String),
    /// Redis memory is above the high-water mark: enqueue later.
    #[error("redis memory is above the high-water mark ({used} of {limit} bytes); retry later")]
    Backpressure { used: u64, limit: u64 },
    /// A payload could not be encoded.
    #[error("payload encoding: {0}")]
    Encode(#[from] serde_json::Error),
    /// Redis answered with something herald's scripts never return.
    #[error("unexpected reply from redis: {0}")]
    Protocol(String),
}

impl Error {
    /// Whether trying again later may succeed (connection problems, timeouts, restarts).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Redis(e) => !matches!(e.retry_method(), redis::RetryMethod::NoRetry),
            Error::Backpressure { .. } => true,
            _ => false,
        }
    }
}
