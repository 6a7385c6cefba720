//! The producer and operator side of a queue: enqueue (single and batch, with de-duplication),
//! counts, job inspection, the dead set, pause/resume, live workers, memory checks.

use std::collections::HashMap;
use std::time::Duration;

use herald_core::{JobId, JobPayload, Priority, QueueName, TenantId, now_ms};
use redis::AsyncCommands;
use serde::Serialize;

use crate::Error;
use crate::conn::{Conn, RedisTarget};
use crate::keys::{Keys, registry_key};
use crate::scripts;

/// How many jobs one enqueue script call carries at most: bounded work per Redis call.
pub const ENQUEUE_CHUNK: usize = 500;
/// The longest dedupe key accepted.
pub const MAX_KEY_LEN: usize = 256;

/// Settings shared by producers and workers of every queue.
#[derive(Debug, Clone)]
pub struct QueueSettings {
    /// Key namespace (first key segment), `herald` by default. Tests use a random one.
    pub namespace: String,
    /// How long a completed job's dedupe key keeps answering "duplicate". Never shorter than
    /// the outbox keeps its published rows.
    pub key_retention: Duration,
    /// Completed jobs kept for inspection: at most this many…
    pub keep_completed: u64,
    /// …and none older than this.
    pub keep_completed_for: Duration,
    /// Enqueue refuses (backpressure) above this fraction of Redis `maxmemory`.
    pub memory_high_water: f64,
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self {
            namespace: "herald".into(),
            key_retention: Duration::from_secs(24 * 3600),
            keep_completed: 10_000,
            keep_completed_for: Duration::from_secs(3600),
            memory_high_water: 0.85,
        }
    }
}

/// A connection to Redis plus the settings; hands out [`Queue`] handles.
#[derive(Clone)]
pub struct Client {
    pub(crate) conn: Conn,
    pub(crate) target: RedisTarget,
    pub(crate) settings: QueueSettings,
}

/// Redis memory as reported by `INFO memory`.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryStatus {
    pub used_bytes: u64,
    pub max_bytes: u64,
    pub policy: String,
}

impl Client {
    pub async fn connect(target: RedisTarget, settings: QueueSettings) -> Result<Self, Error> {
        let conn = Conn::connect(&target).await?;
        Ok(Self {
            conn,
            target,
            settings,
        })
    }

    pub fn settings(&self) -> &QueueSettings {
        &self.settings
    }

    pub fn target(&self) -> &RedisTarget {
        &self.target
    }

    pub fn queue(&self, name: &QueueName) -> Queue {
        Queue {
            client: self.clone(),
            name: name.clone(),
            keys: Keys::new(&self.settings.namespace, name),
        }
    }

    /// Queue names that have ever been enqueued to under this namespace.
    pub async fn queue_names(&self) -> Result<Vec<QueueName>, Error> {
        let mut conn = self.conn.clone();
        let names: Vec<String> = conn
            .smembers(registry_key(&self.settings.namespace))
            .await?;
        let mut names: Vec<QueueName> = names.into_iter().filter_map(|n| n.parse().ok()).collect();
        names.sort();
        Ok(names)
    }

    pub async fn ping(&self) -> Result<(), Error> {
        let mut conn = self.conn.clone();
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(())
    }

    /// Redis memory as `INFO memory` reports it. On a cluster every master answers; this is
    /// the node closest to its limit, and the policy is an evicting one if any node has one.
    pub async fn memory(&self) -> Result<MemoryStatus, Error> {
        let nodes = self.memory_by_node().await?;
        let ratio = |s: &MemoryStatus| {
            if s.max_bytes == 0 {
                0.0
            } else {
                s.used_bytes as f64 / s.max_bytes as f64
            }
        };
        let evicting = nodes
            .iter()
            .find(|(_, s)| s.policy != "noeviction")
            .map(|(_, s)| s.policy.clone());
        let mut worst = nodes
            .into_iter()
            .map(|(_, s)| s)
            .max_by(|a, b| ratio(a).total_cmp(&ratio(b)))
            .ok_or_else(|| Error::Protocol("INFO memory answered by no node".into()))?;
        if let Some(policy) = evicting {
            worst.policy = policy;
        }
        Ok(worst)
    }

    /// `INFO memory` of every node: one entry for a standalone server, one per master on a
    /// cluster (the cluster client sends the command to all of them).
    pub async fn memory_by_node(&self) -> Result<Vec<(String, MemoryStatus)>, Error> {
        use redis::FromRedisValue;
        let mut conn = self.conn.clone();
        let reply: redis::Value = redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut conn)
            .await?;
        match reply {
            redis::Value::Map(nodes) => nodes
                .into_iter()
                .map(|(node, info)| {
                    Ok((
                        String::from_redis_value(node)?,
                        parse_memory_info(&String::from_redis_value(info)?),
                    ))
                })
                .collect(),
            other => Ok(vec![(
                self.target.urls.first().cloned().unwrap_or_default(),
                parse_memory_info(&String::from_redis_value(other)?),
            )]),
        }
    }

    /// Refuses an evicting `maxmemory-policy` (on any node): eviction silently deletes jobs.
    pub async fn check_memory_policy(&self) -> Result<MemoryStatus, Error> {
        for (node, status) in self.memory_by_node().await? {
            if status.policy != "noeviction" {
                return Err(Error::Config(format!(
                    "redis {node} has maxmemory-policy {:?}; herald needs \"noeviction\" (an evicting policy silently loses jobs). Fix: CONFIG SET maxmemory-policy noeviction",
                    status.policy
                )));
            }
        }
        self.memory().await
    }

    /// `Err(Backpressure)` when Redis memory is above the high-water mark.
    pub async fn check_backpressure(&self) -> Result<(), Error> {
        let status = self.memory().await?;
        if status.max_bytes > 0 {
            let limit = (status.max_bytes as f64 * self.settings.memory_high_water) as u64;
            if status.used_bytes > limit {
                return Err(Error::Backpressure {
                    used: status.used_bytes,
                    limit,
                });
            }
        }
        Ok(())
    }
}

fn parse_memory_info(info: &str) -> MemoryStatus {
    let mut status = MemoryStatus {
        used_bytes: 0,
        max_bytes: 0,
        policy: String::new(),
    };
    for line in info.lines() {
        let Some((k, v)) = line.trim().split_once(':') else {
            continue;
        };
        match k {
            "used_memory" => status.used_bytes = v.parse().unwrap_or(0),
            "maxmemory" => status.max_bytes = v.parse().unwrap_or(0),
            "maxmemory_policy" => status.policy = v.to_owned(),
            _ => {}
        }
    }
    status
}

/// A job to enqueue.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub tenant: TenantId,
    /// The payload as JSON text.
    pub payload: String,
    pub payload_version: u32,
    /// A fixed id (the outbox row's, for instance); generated when absent.
    pub id: Option<JobId>,
    /// De-duplication key, scoped to the tenant.
    pub key: Option<String>,
    /// Unix milliseconds; absent or past means now.
    pub run_at_ms: Option<u64>,
    pub priority: Priority,
    pub max_attempts: u32,
    /// Postgres holds this job's outbox row (set by the outbox relay); handlers record the
    /// outcome there too.
    pub durable: bool,
}

impl NewJob {
    /// A job for a typed payload, with the job type's version and attempt budget.
    pub fn of<P: JobPayload>(tenant: TenantId, payload: &P) -> Result<Self, Error> {
        Ok(Self::raw(
            tenant,
            serde_json::to_string(payload)?,
            P::VERSION,
            P::MAX_ATTEMPTS,
        ))
    }

    pub fn raw(tenant: TenantId, payload: String, payload_version: u32, max_attempts: u32) -> Self {
        Self {
            tenant,
            payload,
            payload_version,
            id: None,
            key: None,
            run_at_ms: None,
            priority: Priority::Normal,
            max_attempts,
            durable: false,
        }
    }

    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }
    pub fn id(mut self, id: JobId) -> Self {
        self.id = Some(id);
        self
    }
    pub fn run_at_ms(mut self, at: u64) -> Self {
        self.run_at_ms = Some(at);
        self
    }
    pub fn delay(mut self, delay: Duration) -> Self {
        self.run_at_ms = Some(now_ms() + delay.as_millis() as u64);
        self
    }
    pub fn priority(mut self, priority: Priority) -> Self {
        self.priority = priority;
        self
    }
    pub fn durable(mut self, durable: bool) -> Self {
        self.durable = durable;
        self
    }
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n;
        self
    }

    fn validate(&self) -> Result<(), Error> {
        if self.max_attempts == 0 {
            return Err(Error::InvalidJob("max_attempts must be at least 1".into()));
        }
        if let Some(key) = &self.key
            && (key.is_empty() || key.len() > MAX_KEY_LEN)
        {
            return Err(Error::InvalidJob(format!(
                "key must be 1 to {MAX_KEY_LEN} bytes, got {}",
                key.len()
            )));
        }
        Ok(())
    }
}

/// The answer to an enqueue: the job's id (the existing job's, for a duplicate).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Enqueued {
    pub id: JobId,
    pub duplicate: bool,
}

/// Job counts of a queue, for everyone or for one tenant.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub ready: u64,
    pub delayed: u64,
    pub running: u64,
    pub dead: u64,
    pub completed: u64,
}

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Ready,
    Delayed,
    Running,
    Dead,
    Completed,
}

/// Everything Redis knows about one job.
#[derive(Debug, Clone, Serialize)]
pub struct JobInfo {
    pub id: JobId,
    pub queue: QueueName,
    pub tenant: TenantId,
    pub state: JobState,
    pub payload: serde_json::Value,
    pub payload_version: u32,
    pub attempts: u32,
    pub max_attempts: u32,
    pub priority: Priority,
    pub created_at_ms: u64,
    pub finished_at_ms: Option<u64>,
    /// The next run time, for a delayed job.
    pub run_at_ms: Option<u64>,
    pub last_error: Option<String>,
    /// Why a delayed job waits (a backoff, a throttle, a closed window…).
    pub waiting_reason: Option<String>,
    pub worker: Option<String>,
    pub durable: bool,
}

/// A live worker process serving a queue, from its heartbeat.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerInfo {
    pub id: String,
    pub last_heartbeat_ms: u64,
    pub fields: HashMap<String, String>,
}

/// A handle on one queue. Cheap to clone.
#[derive(Clone)]
pub struct Queue {
    pub(crate) client: Client,
    pub(crate) name: QueueName,
    pub(crate) keys: Keys,
}

impl Queue {
    pub fn name(&self) -> &QueueName {
        &self.name
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub(crate) fn conn(&self) -> Conn {
        self.client.conn.clone()
    }

    pub async fn enqueue(&self, job: NewJob) -> Result<Enqueued, Error> {
        let mut out = self.enqueue_batch(vec![job]).await?;
        out.pop()
            .ok_or_else(|| Error::Protocol("enqueue returned no result".into()))
    }

    /// Enqueues many jobs, in chunks of [`ENQUEUE_CHUNK`] per Redis call. Every job is
    /// validated before anything is written.
    pub async fn enqueue_batch(&self, jobs: Vec<NewJob>) -> Result<Vec<Enqueued>, Error> {
        for (i, job) in jobs.iter().enumerate() {
            job.validate()
                .map_err(|e| Error::InvalidJob(format!("job {i}: {e}")))?;
        }
        let mut conn = self.conn();
        let _: () = conn.sadd(&self.keys.registry, self.name.as_str()).await?;
        let mut out = Vec::with_capacity(jobs.len());
        for chunk in jobs.chunks(ENQUEUE_CHUNK) {
            let mut inv = scripts::ENQUEUE.prepare_invoke();
            for k in &self.keys.script_keys {
                inv.key(k);
            }
            inv.arg(&self.keys.prefix).arg(now_ms()).arg(chunk.len());
            for job in chunk {
                let id = job.id.clone().unwrap_or_else(JobId::generate);
                inv.arg(id.as_str())
                    .arg(job.tenant.to_string())
                    .arg(&job.payload)
                    .arg(job.payload_version)
                    .arg(job.max_attempts)
                    .arg(job.priority.band())
                    .arg(job.run_at_ms.unwrap_or(0))
                    .arg(job.key.as_deref().unwrap_or(""))
                    .arg(u8::from(job.durable));
            }
            let reply: Vec<(String, u8)> = inv.invoke_async(&mut conn).await?;
            for (id, dup) in reply {
                let id = JobId::try_from(id).map_err(|e| Error::Protocol(e.to_string()))?;
                out.push(Enqueued {
                    id,
                    duplicate: dup == 1,
                });
            }
        }
        Ok(out)
    }

    /// Counts for the whole queue (`None`) or for one tenant's jobs.
    pub async fn counts(&self, tenant: Option<TenantId>) -> Result<Counts, Error> {
        let mut conn = self.conn();
        match tenant {
            None => {
                let k = &self.keys;
                let (ready, delayed, running, dead, completed): (u64, u64, u64, u64, u64) =
                    redis::pipe()
                        .zcard(k.ready())
                        .zcard(k.delayed())
                        .zcard(k.leases())
                        .zcard(k.dead())
                        .zcard(k.done())
                        .query_async(&mut conn)
                        .await?;
                Ok(Counts {
                    ready,
                    delayed,
                    running,
                    dead,
                    completed,
                })
            }
            Some(t) => {
                let fields: Vec<String> = ["r", "d", "a", "x", "c"]
                    .iter()
                    .map(|s| format!("{t}:{s}"))
                    .collect();
                let v: Vec<Option<i64>> = redis::cmd("HMGET")
                    .arg(self.keys.tenant_counts())
                    .arg(&fields)
                    .query_async(&mut conn)
                    .await?;
                let g = |i: usize| v.get(i).copied().flatten().unwrap_or(0).max(0) as u64;
                Ok(Counts {
                    ready: g(0),
                    delayed: g(1),
                    running: g(2),
                    dead: g(3),
                    completed: g(4),
                })
            }
        }
    }

    /// One job, if Redis still has it (completed jobs are trimmed by the retention settings).
    pub async fn job(&self, id: &JobId) -> Result<Option<JobInfo>, Error> {
        let mut conn = self.conn();
        let h: HashMap<String, String> = conn.hgetall(self.keys.job(id)).await?;
        if h.is_empty() {
            return Ok(None);
        }
        let run_at: Option<f64> = conn.zscore(self.keys.delayed(), id.as_str()).await?;
        Ok(Some(self.job_info(
            id.clone(),
            h,
            run_at.map(|s| s as u64),
        )?))
    }

    fn job_info(
        &self,
        id: JobId,
        h: HashMap<String, String>,
        run_at_ms: Option<u64>,
    ) -> Result<JobInfo, Error> {
        let get = |k: &str| h.get(k).map(String::as_str).unwrap_or("");
        let num = |k: &str| get(k).parse::<u64>().unwrap_or(0);
        let opt = |k: &str| Some(get(k).to_owned()).filter(|s| !s.is_empty());
        let tenant = get("t")
            .parse()
            .map_err(|_| Error::Protocol(format!("job {id} has no tenant")))?;
        let state = match get("s") {
            "r" => JobState::Ready,
            "d" => JobState::Delayed,
            "a" => JobState::Running,
            "x" => JobState::Dead,
            "c" => JobState::Completed,
            other => return Err(Error::Protocol(format!("job {id} has state {other:?}"))),
        };
        let payload = serde_json::from_str(get("p")).unwrap_or(serde_json::Value::Null);
        Ok(JobInfo {
            queue: self.name.clone(),
            tenant,
            state,
            payload,
            payload_version: num("pv") as u32,
            attempts: num("a") as u32,
            max_attempts: num("m") as u32,
            priority: Priority::from_band(num("b") as u8),
            created_at_ms: num("c"),
            finished_at_ms: Some(num("f")).filter(|f| *f > 0),
            run_at_ms: if state == JobState::Delayed {
                run_at_ms
            } else {
                None
            },
            last_error: opt("e"),
            waiting_reason: opt("wr"),
            worker: if state == JobState::Running {
                opt("w")
            } else {
                None
            },
            durable: get("o") == "1",
            id,
        })
    }

    /// Which of these ids Redis has no record of (never enqueued, trimmed after completion, or
    /// lost with Redis's data). The reconciler re-publishes those Postgres still calls pending.
    pub async fn missing(&self, ids: &[JobId]) -> Result<Vec<JobId>, Error> {
        let mut conn = self.conn();
        let mut out = Vec::new();
        for chunk in ids.chunks(ENQUEUE_CHUNK) {
            let mut pipe = redis::pipe();
            for id in chunk {
                pipe.exists(self.keys.job(id));
            }
            let exists: Vec<bool> = pipe.query_async(&mut conn).await?;
            out.extend(
                chunk
                    .iter()
                    .zip(exists)
                    .filter(|(_, e)| !e)
                    .map(|(id, _)| id.clone()),
            );
        }
        Ok(out)
    }

    /// The id of the job holding the tenant's dedupe `key` on this queue (pending, running,
    /// dead, or completed within the key retention), if any. The key layout is the one
    /// `enqueue.lua` writes.
    pub async fn key_holder(&self, tenant: TenantId, key: &str) -> Result<Option<JobId>, Error> {
        let mut conn = self.conn();
        let holder: Option<String> = conn
            .get(format!("{}k:{}:{}", self.keys.prefix, tenant, key))
            .await?;
        Ok(holder.and_then(|id| JobId::try_from(id).ok()))
    }

    /// Dead jobs, newest first: all of them (`None`) or one tenant's.
    pub async fn dead(
        &self,
        tenant: Option<TenantId>,
        offset: usize,
        limit: usize,
    ) -> Result<Vec<JobInfo>, Error> {
        let mut conn = self.conn();
        let set = match tenant {
            Some(t) => self.keys.tenant_dead(&t),
            None => self.keys.dead().to_owned(),
        };
        let stop = (offset + limit.max(1) - 1) as isize;
        let ids: Vec<String> = conn.zrevrange(set, offset as isize, stop).await?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let Ok(id) = JobId::try_from(id) else {
                continue;
            };
            if let Some(info) = self.job(&id).await? {
                out.push(info);
            }
        }
        Ok(out)
    }

    async fn dead_action(
        &self,
        action: &str,
        id: &JobId,
        tenant: Option<TenantId>,
    ) -> Result<bool, Error> {
        let mut conn = self.conn();
        let mut inv = scripts::DEAD.prepare_invoke();
        for k in &self.keys.script_keys {
            inv.key(k);
        }
        inv.arg(&self.keys.prefix)
            .arg(action)
            .arg(id.as_str())
            .arg(tenant.map(|t| t.to_string()).unwrap_or_default())
            .arg(self.client.settings.key_retention.as_millis() as u64);
        let n: i64 = inv.invoke_async(&mut conn).await?;
        Ok(n == 1)
    }

    /// Puts a dead job back in the ready set with a fresh attempt budget. `tenant` limits the
    /// action to that tenant's jobs. Returns false when no such dead job exists.
    pub async fn retry_dead(&self, id: &JobId, tenant: Option<TenantId>) -> Result<bool, Error> {
        self.dead_action("retry", id, tenant).await
    }

    /// Deletes a dead job. Its dedupe key then expires after the key retention.
    pub async fn discard_dead(&self, id: &JobId, tenant: Option<TenantId>) -> Result<bool, Error> {
        self.dead_action("discard", id, tenant).await
    }

    /// Stops every worker from fetching this queue's jobs; running jobs finish.
    pub async fn pause(&self) -> Result<(), Error> {
        let mut conn = self.conn();
        let _: () = conn.set(self.keys.paused(), 1).await?;
        Ok(())
    }

    pub async fn resume(&self) -> Result<(), Error> {
        let mut conn = self.conn();
        let _: () = redis::pipe()
            .del(self.keys.paused())
            .lpush(self.keys.notify(), 1)
            .ltrim(self.keys.notify(), 0, 63)
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    pub async fn is_paused(&self) -> Result<bool, Error> {
        let mut conn = self.conn();
        Ok(conn.exists(self.keys.paused()).await?)
    }

    /// Workers whose heartbeat is recent (within `max_age`).
    pub async fn workers(&self, max_age: Duration) -> Result<Vec<WorkerInfo>, Error> {
        let mut conn = self.conn();
        let since = now_ms().saturating_sub(max_age.as_millis() as u64);
        let ids: Vec<(String, f64)> = conn
            .zrangebyscore_withscores(&self.keys.workers, since, "+inf")
            .await?;
        let mut out = Vec::with_capacity(ids.len());
        for (id, beat) in ids {
            let fields: HashMap<String, String> = conn.hgetall(self.keys.worker(&id)).await?;
            out.push(WorkerInfo {
                id,
                last_heartbeat_ms: beat as u64,
                fields,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_info_is_parsed() {
        let s = parse_memory_info(
            "# Memory\r\nused_memory:1024\r\nmaxmemory:4096\r\nmaxmemory_policy:allkeys-lru\r\n",
        );
        assert_eq!(s.used_bytes, 1024);
        assert_eq!(s.max_bytes, 4096);
        assert_eq!(s.policy, "allkeys-lru");
    }

    #[test]
    fn invalid_jobs_are_refused_before_io() {
        let t = TenantId::new();
        assert!(NewJob::raw(t, "{}".into(), 1, 0).validate().is_err());
        assert!(
            NewJob::raw(t, "{}".into(), 1, 3)
                .key("")
                .validate()
                .is_err()
        );
        assert!(
            NewJob::raw(t, "{}".into(), 1, 3)
                .key("k".repeat(300))
                .validate()
                .is_err()
        );
        assert!(
            NewJob::raw(t, "{}".into(), 1, 3)
                .key("order-1")
                .validate()
                .is_ok()
        );
    }
}
