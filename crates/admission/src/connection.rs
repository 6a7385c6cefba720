//! The Redis connection the limiter uses: one standalone server or a cluster, behind one type.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisError, RedisFuture, Value};

/// A shared, reconnecting connection. Cloning is cheap; clones share one socket per node.
#[derive(Clone)]
pub enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// How long one limiter call may take before it counts as failed.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

impl Connection {
    /// Connects to `REDIS_URL`: `redis://host:port[/db]` for one server; several
    /// comma-separated URLs, or a `redis+cluster://` scheme, for a cluster.
    pub async fn connect(url: &str) -> Result<Self, RedisError> {
        let url = url.trim();
        let (cluster, rest) = match url.strip_prefix("redis+cluster://") {
            Some(rest) => (true, rest),
            None => (false, url),
        };
        let urls: Vec<String> = rest
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|u| {
                if u.contains("://") {
                    u.to_owned()
                } else {
                    format!("redis://{u}")
                }
            })
            .collect();
        if cluster || urls.len() > 1 {
            let client = ClusterClient::builder(urls)
                .response_timeout(RESPONSE_TIMEOUT)
                .connection_timeout(Duration::from_secs(2))
                .build()?;
            return Ok(Connection::Cluster(client.get_async_connection().await?));
        }
        let client = redis::Client::open(urls.first().map_or(url, String::as_str))?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        Ok(Connection::Single(
            ConnectionManager::new_with_config(client, config).await?,
        ))
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}
