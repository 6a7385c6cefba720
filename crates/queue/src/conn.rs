//! Connections to Redis: one standalone server or a cluster, behind one type.
//!
//! The shared connection multiplexes every command of a process; blocking reads (the idle
//! wake-up) get a dedicated connection each so they never stall the shared one.

use std::time::Duration;

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, Cmd, Pipeline, RedisFuture, Value};

use crate::Error;

/// Where Redis is. `urls` holds one URL for a standalone server, or the seed nodes of a cluster.
#[derive(Debug, Clone)]
pub struct RedisTarget {
    pub urls: Vec<String>,
    pub cluster: bool,
    /// How long one command may take before it counts as failed (and is retried).
    pub response_timeout: Duration,
}

impl RedisTarget {
    /// Parses `REDIS_URL`: `redis://host:port[/db]` for one server; several comma-separated
    /// URLs, or a `redis+cluster://` scheme, for a cluster.
    pub fn parse(url: &str) -> Result<Self, Error> {
        let url = url.trim();
        if url.is_empty() {
            return Err(Error::Config("REDIS_URL is empty".into()));
        }
        let (cluster, rest) = match url.strip_prefix("redis+cluster://") {
            Some(rest) => (true, rest.to_owned()),
            None => (false, url.to_owned()),
        };
        let urls: Vec<String> = rest
            .split(',')
            .map(|u| u.trim())
            .filter(|u| !u.is_empty())
            .map(|u| {
                if u.contains("://") {
                    u.to_owned()
                } else {
                    format!("redis://{u}")
                }
            })
            .collect();
        for u in &urls {
            redis::Client::open(u.as_str())
                .map_err(|e| Error::Config(format!("invalid Redis URL {u:?}: {e}")))?;
        }
        Ok(Self {
            cluster: cluster || urls.len() > 1,
            urls,
            response_timeout: Duration::from_secs(5),
        })
    }
}

/// The shared, multiplexed connection. Cloning is cheap; all clones share one socket per node.
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    pub async fn connect(target: &RedisTarget) -> Result<Self, Error> {
        if target.cluster {
            let client = ClusterClient::builder(target.urls.clone())
                .response_timeout(target.response_timeout)
                .connection_timeout(Duration::from_secs(2))
                .build()?;
            Ok(Conn::Cluster(client.get_async_connection().await?))
        } else {
            let client = redis::Client::open(target.urls[0].as_str())?;
            let config = ConnectionManagerConfig::new()
                .set_response_timeout(Some(target.response_timeout))
                .set_connection_timeout(Some(Duration::from_secs(2)))
                .set_number_of_retries(2)
                .set_max_delay(Duration::from_millis(500));
            Ok(Conn::Single(
                ConnectionManager::new_with_config(client, config).await?,
            ))
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// A dedicated connection for blocking reads (`BLPOP`), made fresh after any error.
pub enum BlockingConn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl BlockingConn {
    pub async fn connect(target: &RedisTarget, longest_block: Duration) -> Result<Self, Error> {
        let timeout = longest_block + target.response_timeout;
        if target.cluster {
            let client = ClusterClient::builder(target.urls.clone())
                .response_timeout(timeout)
                .connection_timeout(Duration::from_secs(2))
                .build()?;
            Ok(BlockingConn::Cluster(client.get_async_connection().await?))
        } else {
            let client = redis::Client::open(target.urls[0].as_str())?;
            let config = AsyncConnectionConfig::new()
                .set_response_timeout(Some(timeout))
                .set_connection_timeout(Some(Duration::from_secs(2)));
            Ok(BlockingConn::Single(
                client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?,
            ))
        }
    }

    /// Waits up to `timeout` for a wake-up token on `key`. Returns whether one came.
    pub async fn wait(&mut self, key: &str, timeout: Duration) -> Result<bool, Error> {
        let secs = timeout.as_secs_f64().max(0.01);
        let mut cmd = redis::cmd("BLPOP");
        cmd.arg(key).arg(format!("{secs:.3}"));
        let got: Option<(String, String)> = match self {
            BlockingConn::Single(c) => cmd.query_async(c).await?,
            BlockingConn::Cluster(c) => cmd.query_async(c).await?,
        };
        Ok(got.is_some())
    }
}
