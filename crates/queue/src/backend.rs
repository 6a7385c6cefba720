//! herald's apalis backend: a driver task per (worker, queue) does all Redis work — one script
//! call per round trip that applies acknowledgements, runs a bounded slice of maintenance and
//! fetches new jobs — and hands decoded tasks to apalis through a channel.
//!
//! The backend never reports a Redis error to apalis (`Worker::run` would return on the first
//! one): it logs, backs off, reconnects and tries again. Acknowledgements wait in memory until
//! Redis takes them; if the process dies first, the leases expire and the jobs are re-delivered.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use apalis_core::backend::finalize::Ephemeral;
use apalis_core::backend::{Backend, BackendConfig};
use apalis_core::task::Task;
use apalis_core::task::builder::TaskBuilder;
use apalis_core::task::from_request::FromRequest;
use apalis_core::task::task_id::{RandomId, TaskId};
use apalis_core::worker::context::WorkerContext;
use herald_core::{JobId, JobPayload, QueueName, TenantId, now_ms};
use redis::AsyncCommands;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

use crate::Error;
use crate::backoff::Backoff;
use crate::client::Queue;
use crate::conn::BlockingConn;
use crate::layer::HeraldLayer;
use crate::scripts;

/// Jobs that run shorter than this on average count as fast for `adaptive_prefetch`.
pub const FAST_JOB: Duration = Duration::from_millis(5);

/// How a worker serves one queue.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Unique per process start: host, pid and a random suffix.
    pub worker_id: String,
    /// Jobs of this queue running at once in this process.
    pub concurrency: usize,
    /// Most jobs fetched in one round trip.
    pub fetch_batch: usize,
    /// Jobs fetched ahead of a free slot, so handlers have work while the next round trip is
    /// under way (they wait with their leases renewed; at shutdown they are released unstarted).
    pub prefetch: usize,
    /// When this queue's jobs run shorter than [`FAST_JOB`] on average, fetch up to
    /// `fetch_batch` ahead instead of `prefetch`: holding a few hundred millisecond-jobs costs
    /// other workers nothing, and full batches halve the round trips per job. Jobs that run
    /// longer are never hoarded.
    pub adaptive_prefetch: bool,
    /// While handlers are running, how long the driver may wait for more of them to finish
    /// before paying for a round trip, so acknowledgements and fetches travel in batches.
    pub ack_linger: Duration,
    /// Visibility timeout: a job whose worker stops renewing its lease this long is re-delivered.
    pub lease: Duration,
    /// A run longer than this is cancelled and counts as a failed attempt.
    pub timeout: Duration,
    pub backoff: Backoff,
    /// Longest sleep between checks when idle (a push wakes the worker sooner).
    pub max_idle_wait: Duration,
    /// Expired leases / due delayed jobs / trimmed completed jobs handled per round trip at most.
    pub maintenance_limit: usize,
    pub heartbeat: Duration,
}

impl WorkerOptions {
    pub fn new(worker_id: impl Into<String>) -> Self {
        Self {
            worker_id: worker_id.into(),
            concurrency: 10,
            fetch_batch: 200,
            prefetch: 0,
            adaptive_prefetch: true,
            ack_linger: Duration::from_millis(2),
            lease: Duration::from_secs(30),
            timeout: Duration::from_secs(60),
            backoff: Backoff::default(),
            max_idle_wait: Duration::from_secs(1),
            maintenance_limit: 200,
            heartbeat: Duration::from_secs(5),
        }
    }

    /// A worker id unique per process start: `host-pid-random`.
    pub fn generate_worker_id() -> String {
        let host = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "host".into());
        format!(
            "{}-{}-{:06x}",
            host,
            std::process::id(),
            rand::random::<u32>() & 0xff_ffff
        )
    }
}

/// The job a handler is running: ask for it as an argument of the handler fn.
#[derive(Debug, Clone)]
pub struct JobMeta {
    pub id: JobId,
    pub queue: QueueName,
    pub tenant: TenantId,
    /// 1 on the first delivery.
    pub attempt: u32,
    pub max_attempts: u32,
    /// Postgres holds this job's outbox row.
    pub durable: bool,
    pub(crate) token: String,
    /// Set by [`JobMeta::record_outcome`]; shared by every clone of this run's meta.
    outcome_recorded: Arc<AtomicBool>,
}

impl JobMeta {
    /// Whether a failure now would dead-letter the job.
    pub fn is_last_attempt(&self) -> bool {
        self.attempt >= self.max_attempts
    }

    /// The handler recorded this run's success in Postgres itself (its outbox row is finished,
    /// in the same statement as its last write): the layers around it need not record it again.
    /// Seen through every clone of the meta the run was given.
    pub fn record_outcome(&self) {
        self.outcome_recorded.store(true, Ordering::Release);
    }

    /// Whether the handler called [`JobMeta::record_outcome`].
    pub fn outcome_recorded(&self) -> bool {
        self.outcome_recorded.load(Ordering::Acquire)
    }
}

/// Error when a handler asks for [`JobMeta`] on a task that did not come from herald.
#[derive(Debug, thiserror::Error)]
#[error("this task did not come from a herald queue")]
pub struct NotAHeraldTask;

impl<Args: Sync> FromRequest<Task<Args>> for JobMeta {
    type Error = NotAHeraldTask;
    async fn from_request(task: &Task<Args>) -> Result<Self, Self::Error> {
        task.ctx()
            .data()
            .get::<JobMeta>()
            .cloned()
            .ok_or(NotAHeraldTask)
    }
}

/// What became of a job run.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    Completed,
    Retry { delay: Duration, error: String },
    Defer { until_ms: u64, reason: String },
    Dead { error: String },
}

#[derive(Debug)]
pub(crate) struct Ack {
    pub id: JobId,
    pub token: String,
    pub outcome: Outcome,
}

pub(crate) enum DriverMsg {
    Ack(Ack),
    /// Shutdown began: fetch nothing more and give back what apalis has not taken yet.
    StopFetching,
    Close {
        unstarted: Vec<(JobId, String)>,
    },
    /// A prefetched job that never started (shutdown began while it waited for a slot).
    Release {
        id: JobId,
        token: String,
    },
}

/// Fetched jobs apalis has not taken yet. Shared by the backend (which hands them out) and the
/// driver (which gives them back to Redis when shutdown begins).
type Buffer<Args> = Arc<Mutex<mpsc::UnboundedReceiver<Task<Args>>>>;

/// Tells a running backend that shutdown began, before apalis gets round to closing it (apalis
/// closes a backend only after every running job has finished): the backend stops fetching at
/// once and releases the jobs it fetched but has not started, so other workers take them now
/// instead of after this worker's drain. Cheap to clone; stopping twice is harmless.
#[derive(Clone)]
pub struct DrainHandle {
    driver: mpsc::UnboundedSender<DriverMsg>,
    stopping: Arc<AtomicBool>,
}

impl DrainHandle {
    pub fn stop_fetching(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let _ = self.driver.send(DriverMsg::StopFetching);
    }
}

/// Counters of one backend, for metrics and tests.
#[derive(Debug, Default)]
pub struct Stats {
    pub fetched: AtomicU64,
    pub completed: AtomicU64,
    pub retried: AtomicU64,
    pub deferred: AtomicU64,
    pub dead: AtomicU64,
    pub leases_lost: AtomicU64,
    pub redis_errors: AtomicU64,
    pub round_trips: AtomicU64,
}

/// herald's Redis backend for apalis, serving one queue for one worker process.
pub struct RedisBackend<Args> {
    tasks: Buffer<Args>,
    driver_tx: mpsc::UnboundedSender<DriverMsg>,
    driver: Option<Pin<Box<JoinHandle<()>>>>,
    closing: bool,
    options: WorkerOptions,
    stats: Arc<Stats>,
    /// Shutdown began: prefetched jobs still waiting for a slot are released, not started.
    stopping: Arc<AtomicBool>,
    /// Bounds handlers running at once to `concurrency` (more may be fetched: `prefetch`).
    slots: Arc<tokio::sync::Semaphore>,
    /// Moving average of run times in µs (`u64::MAX` until the first run), for prefetching.
    run_us: Arc<AtomicU64>,
    _args: PhantomData<fn() -> Args>,
}

impl<Args: JobPayload> RedisBackend<Args> {
    /// Starts the driver for `queue` (must be called inside a tokio runtime). Fetching begins
    /// at once; fetched jobs wait in the backend until the worker polls them, their leases
    /// renewed meanwhile. A punctual job type ([`JobPayload::PUNCTUAL`]) is never fetched
    /// ahead of a free handler, whatever `options` say about prefetching.
    pub fn new(queue: Queue, mut options: WorkerOptions) -> Self {
        if Args::PUNCTUAL {
            options.prefetch = 0;
            options.adaptive_prefetch = false;
        }
        let (tasks_tx, tasks) = mpsc::unbounded_channel();
        let tasks: Buffer<Args> = Arc::new(Mutex::new(tasks));
        let (driver_tx, driver_rx) = mpsc::unbounded_channel();
        let stats = Arc::new(Stats::default());
        let wake = Arc::new(Notify::new());
        let wait_request = Arc::new(Notify::new());
        let wait_ms = Arc::new(AtomicU64::new(1000));
        let run_us = Arc::new(AtomicU64::new(u64::MAX));
        tokio::spawn(waiter(
            queue.clone(),
            wake.clone(),
            wait_request.clone(),
            wait_ms.clone(),
            options.max_idle_wait,
        ));
        let driver = Driver::<Args> {
            queue,
            options: options.clone(),
            tasks: tasks_tx,
            buffer: tasks.clone(),
            stopping: false,
            rx: driver_rx,
            stats: stats.clone(),
            in_flight: 0,
            running: HashMap::new(),
            acks: Vec::new(),
            releases: Vec::new(),
            run_us: run_us.clone(),
            wake,
            wait_request,
            wait_ms,
            _args: PhantomData,
        };
        Self {
            tasks,
            driver_tx,
            driver: Some(Box::pin(tokio::spawn(driver.run()))),
            closing: false,
            stopping: Arc::new(AtomicBool::new(false)),
            slots: Arc::new(tokio::sync::Semaphore::new(options.concurrency.max(1))),
            run_us,
            options,
            stats,
            _args: PhantomData,
        }
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// A handle to begin a graceful shutdown early (see [`DrainHandle`]).
    pub fn drain_handle(&self) -> DrainHandle {
        DrainHandle {
            driver: self.driver_tx.clone(),
            stopping: self.stopping.clone(),
        }
    }
}

/// Takes every task still waiting in the buffer: the lease tokens of jobs never started.
fn take_unstarted<Args>(buffer: &Buffer<Args>) -> Vec<(JobId, String)> {
    let mut unstarted = Vec::new();
    let mut rx = buffer
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    while let Ok(task) = rx.try_recv() {
        if let Some(meta) = task.ctx().data().get::<JobMeta>() {
            unstarted.push((meta.id.clone(), meta.token.clone()));
        }
    }
    unstarted
}

impl<Args> Backend for RedisBackend<Args> {
    type Task = Task<Args>;
    type Error = Error;

    fn poll_ready(&mut self, _: &mut Context<'_>, _: &WorkerContext) -> Poll<Result<(), Error>> {
        Poll::Ready(Ok(()))
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        _: &WorkerContext,
    ) -> Poll<Option<Result<Task<Args>, Error>>> {
        let mut rx = self
            .tasks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match rx.poll_recv(cx) {
            Poll::Ready(Some(task)) => Poll::Ready(Some(Ok(task))),
            // The driver ended (it only does after a close): no more tasks.
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_close(&mut self, cx: &mut Context<'_>, _: &WorkerContext) -> Poll<Result<(), Error>> {
        if !self.closing {
            self.closing = true;
            self.stopping.store(true, Ordering::SeqCst);
            // Jobs fetched but never started go back to the queue at once, for other workers.
            let unstarted = take_unstarted(&self.tasks);
            let _ = self.driver_tx.send(DriverMsg::Close { unstarted });
        }
        match self.driver.as_mut() {
            Some(handle) => match handle.as_mut().poll(cx) {
                Poll::Ready(_) => {
                    self.driver = None;
                    Poll::Ready(Ok(()))
                }
                Poll::Pending => Poll::Pending,
            },
            None => Poll::Ready(Ok(())),
        }
    }
}

impl<Args> BackendConfig for RedisBackend<Args> {
    type Args = Args;
    type Id = RandomId;
    type Kind = Ephemeral;
    type Config = WorkerOptions;
    type Layer = HeraldLayer;

    fn config(&self) -> &WorkerOptions {
        &self.options
    }

    fn middleware(&mut self, _: &mut WorkerContext) -> HeraldLayer {
        HeraldLayer::new(
            self.driver_tx.clone(),
            self.options.timeout,
            self.options.backoff,
            self.slots.clone(),
            self.stopping.clone(),
            self.run_us.clone(),
        )
    }
}

/// Waits on the queue's wake-up list with a blocking read on a connection of its own, when the
/// driver asks, and wakes the driver when a push arrives.
async fn waiter(
    queue: Queue,
    wake: Arc<Notify>,
    request: Arc<Notify>,
    wait_ms: Arc<AtomicU64>,
    longest: Duration,
) {
    let mut conn: Option<BlockingConn> = None;
    let mut failures = 0u32;
    loop {
        request.notified().await;
        if conn.is_none() {
            match BlockingConn::connect(&queue.client.target, longest).await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    failures += 1;
                    tracing::debug!(error = %e, "wake-up connection unavailable; polling meanwhile");
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(failures.min(20))))
                        .await;
                    continue;
                }
            }
        }
        let wait = Duration::from_millis(wait_ms.load(Ordering::Relaxed)).min(longest);
        if let Some(c) = conn.as_mut() {
            match c.wait(queue.keys.notify(), wait).await {
                Ok(true) => {
                    failures = 0;
                    wake.notify_one();
                }
                Ok(false) => failures = 0,
                Err(e) => {
                    tracing::debug!(error = %e, "wake-up read failed; reconnecting");
                    conn = None;
                }
            }
        }
    }
}

struct Driver<Args> {
    queue: Queue,
    options: WorkerOptions,
    tasks: mpsc::UnboundedSender<Task<Args>>,
    /// The receiving end of `tasks`, to take back unstarted jobs when shutdown begins.
    buffer: Buffer<Args>,
    /// Shutdown began: no more fetching.
    stopping: bool,
    rx: mpsc::UnboundedReceiver<DriverMsg>,
    stats: Arc<Stats>,
    /// Fetched and not yet acknowledged.
    in_flight: usize,
    /// Lease tokens of the jobs this worker holds, for renewal.
    running: HashMap<JobId, String>,
    acks: Vec<Ack>,
    /// Prefetched jobs handed back unstarted, to release on the next turn.
    releases: Vec<(JobId, String)>,
    run_us: Arc<AtomicU64>,
    wake: Arc<Notify>,
    wait_request: Arc<Notify>,
    wait_ms: Arc<AtomicU64>,
    _args: PhantomData<fn() -> Args>,
}

struct CycleReply {
    next_due_ms: Option<u64>,
    fetched: usize,
}

impl<Args: JobPayload> Driver<Args> {
    async fn run(mut self) {
        let mut last_renew = Instant::now();
        let mut last_beat: Option<Instant> = None;
        let mut last_cycle = Instant::now();
        let mut next_due_ms: Option<u64> = None;
        let mut idle = false;
        let mut close: Option<Vec<(JobId, String)>> = None;
        loop {
            while let Ok(msg) = self.rx.try_recv() {
                self.accept(msg, &mut close);
            }
            if self.stopping && close.is_none() {
                let unstarted = take_unstarted(&self.buffer);
                if !unstarted.is_empty() {
                    self.release(unstarted).await;
                }
            }
            if let Some(unstarted) = close.take() {
                self.shut_down(unstarted).await;
                return;
            }
            if last_beat.is_none_or(|t| t.elapsed() >= self.options.heartbeat) {
                self.heartbeat().await;
                last_beat = Some(Instant::now());
            }
            if last_renew.elapsed() >= self.options.lease / 3 {
                self.renew().await;
                last_renew = Instant::now();
            }
            if !self.releases.is_empty() {
                let released = std::mem::take(&mut self.releases);
                self.release(released).await;
            }
            let fast = self.options.adaptive_prefetch
                && self.run_us.load(Ordering::Relaxed) < FAST_JOB.as_micros() as u64;
            let prefetch = if fast {
                self.options.prefetch.max(self.options.fetch_batch)
            } else {
                self.options.prefetch
            };
            let capacity = self.options.concurrency + prefetch;
            // Batch: with handlers still running and little to send, wait a moment for more
            // of them to finish (bounded by `ack_linger`) instead of a round trip per job.
            let goal = capacity.min(self.options.fetch_batch);
            if !self.stopping && self.in_flight > 0 && !self.options.ack_linger.is_zero() {
                let linger_until = tokio::time::Instant::now() + self.options.ack_linger;
                while close.is_none()
                    && self.in_flight > 0
                    && self.acks.len() + capacity.saturating_sub(self.in_flight) < goal
                {
                    match tokio::time::timeout_at(linger_until, self.rx.recv()).await {
                        Ok(Some(msg)) => self.accept(msg, &mut close),
                        Ok(None) => close = Some(Vec::new()),
                        Err(_) => break,
                    }
                }
                if close.is_some() {
                    continue;
                }
            }
            let free = capacity.saturating_sub(self.in_flight);
            let want = if self.stopping {
                0
            } else {
                free.min(self.options.fetch_batch)
            };
            let maintenance_due = next_due_ms.is_some_and(|d| d <= now_ms())
                || last_cycle.elapsed() >= self.options.max_idle_wait;
            if !self.acks.is_empty() || (want > 0 && !idle) || maintenance_due {
                let reply = self.cycle(want).await;
                last_cycle = Instant::now();
                next_due_ms = reply.next_due_ms;
                idle = want > 0 && reply.fetched == 0;
                if !idle && want > 0 {
                    continue;
                }
            }
            // Nothing to do right now: sleep until a push, an ack, or the next due time.
            let mut wait = self.options.max_idle_wait;
            if let Some(due) = next_due_ms {
                wait = wait.min(Duration::from_millis(due.saturating_sub(now_ms())));
            }
            if !self.running.is_empty() {
                wait = wait.min((self.options.lease / 3).saturating_sub(last_renew.elapsed()));
            }
            if idle {
                self.wait_ms
                    .store(wait.as_millis() as u64, Ordering::Relaxed);
                self.wait_request.notify_one();
            }
            tokio::select! {
                msg = self.rx.recv() => match msg {
                    Some(msg) => self.accept(msg, &mut close),
                    // Every sender is gone: the backend was dropped without closing.
                    None => close = Some(Vec::new()),
                },
                _ = self.wake.notified() => idle = false,
                _ = tokio::time::sleep(wait) => idle = false,
            }
        }
    }

    fn accept(&mut self, msg: DriverMsg, close: &mut Option<Vec<(JobId, String)>>) {
        match msg {
            DriverMsg::Ack(ack) => {
                self.running.remove(&ack.id);
                self.in_flight = self.in_flight.saturating_sub(1);
                self.acks.push(ack);
            }
            DriverMsg::StopFetching => {
                if !self.stopping {
                    tracing::info!(queue = %self.queue.name, "shutdown: no more fetching");
                }
                self.stopping = true;
            }
            DriverMsg::Close { unstarted } => *close = Some(unstarted),
            DriverMsg::Release { id, token } => self.releases.push((id, token)),
        }
    }

    /// One round trip, retried until Redis takes it.
    async fn cycle(&mut self, want: usize) -> CycleReply {
        let mut failures = 0u32;
        loop {
            match self.try_cycle(want).await {
                Ok(reply) => return reply,
                Err(e) => {
                    failures += 1;
                    self.stats.redis_errors.fetch_add(1, Ordering::Relaxed);
                    let pause = Duration::from_millis((25u64 << failures.min(6)).min(2_000));
                    tracing::warn!(queue = %self.queue.name, error = %e, retry_in_ms = pause.as_millis() as u64,
                        "redis round trip failed; retrying");
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }

    async fn try_cycle(&mut self, want: usize) -> Result<CycleReply, Error> {
        let settings = &self.queue.client.settings;
        let keys = &self.queue.keys;
        let now = now_ms();
        let mut inv = scripts::CYCLE.prepare_invoke();
        for k in &keys.script_keys {
            inv.key(k);
        }
        let token_prefix = format!(
            "{}:{}",
            self.options.worker_id,
            self.stats.round_trips.fetch_add(1, Ordering::Relaxed)
        );
        inv.arg(&keys.prefix)
            .arg(now)
            .arg(want)
            .arg(self.options.lease.as_millis() as u64)
            .arg(&self.options.worker_id)
            .arg(&token_prefix)
            .arg(self.options.maintenance_limit)
            .arg(settings.keep_completed)
            .arg(settings.keep_completed_for.as_millis() as u64)
            .arg(settings.key_retention.as_millis() as u64)
            .arg(self.acks.len());
        for ack in &self.acks {
            let (kind, ms, text) = match &ack.outcome {
                Outcome::Completed => ("ok", 0, ""),
                Outcome::Retry { delay, error } => {
                    ("retry", delay.as_millis() as u64, error.as_str())
                }
                Outcome::Defer { until_ms, reason } => ("defer", *until_ms, reason.as_str()),
                Outcome::Dead { error } => ("dead", 0, error.as_str()),
            };
            inv.arg(ack.id.as_str())
                .arg(&ack.token)
                .arg(kind)
                .arg(ms)
                .arg(truncate(text, 2000));
        }
        let mut conn = self.queue.conn();
        let reply: redis::Value = inv.invoke_async(&mut conn).await?;
        let (next_due, results, fetched) = parse_cycle(reply)?;

        for (ack, result) in self.acks.iter().zip(results.iter()) {
            let counter = match (result, &ack.outcome) {
                (0, _) => {
                    tracing::warn!(job_id = %ack.id, queue = %self.queue.name,
                        "lease lost before acknowledgement; another delivery owns the job now");
                    &self.stats.leases_lost
                }
                (2, _) => &self.stats.dead,
                (_, Outcome::Completed) => &self.stats.completed,
                (_, Outcome::Retry { .. }) => &self.stats.retried,
                (_, Outcome::Defer { .. }) => &self.stats.deferred,
                (_, Outcome::Dead { .. }) => &self.stats.dead,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        self.acks.clear();

        let count = fetched.len();
        self.stats
            .fetched
            .fetch_add(count as u64, Ordering::Relaxed);
        for job in fetched {
            self.in_flight += 1;
            self.dispatch(job);
        }
        Ok(CycleReply {
            next_due_ms: (next_due >= 0).then_some(next_due as u64),
            fetched: count,
        })
    }

    fn dispatch(&mut self, job: FetchedJob) {
        let Ok(id) = JobId::try_from(job.id.clone()) else {
            tracing::error!(id = %job.id, "fetched a job with an invalid id; ignoring");
            return;
        };
        let reject = |this: &mut Self, outcome: Outcome| {
            this.in_flight = this.in_flight.saturating_sub(1);
            this.acks.push(Ack {
                id: id.clone(),
                token: job.token.clone(),
                outcome,
            });
        };
        let Ok(tenant) = job.tenant.parse::<TenantId>() else {
            return reject(
                self,
                Outcome::Dead {
                    error: format!("job has an invalid tenant id {:?}", job.tenant),
                },
            );
        };
        if job.payload_version > Args::VERSION {
            return reject(
                self,
                Outcome::Defer {
                    until_ms: now_ms() + 60_000,
                    reason: format!(
                        "payload version {} is newer than this worker understands ({}); waiting for an upgraded worker",
                        job.payload_version,
                        Args::VERSION
                    ),
                },
            );
        }
        let args: Args = match serde_json::from_str(&job.payload) {
            Ok(args) => args,
            Err(e) => {
                return reject(
                    self,
                    Outcome::Dead {
                        error: format!(
                            "payload does not decode as {} v{}: {e}",
                            Args::QUEUE,
                            Args::VERSION
                        ),
                    },
                );
            }
        };
        let meta = JobMeta {
            id: id.clone(),
            queue: self.queue.name.clone(),
            tenant,
            attempt: job.attempt,
            max_attempts: job.max_attempts,
            durable: job.durable,
            token: job.token.clone(),
            outcome_recorded: Arc::default(),
        };
        let task = TaskBuilder::new(args)
            .task_id(TaskId::from_string(id.as_str()))
            .attempt(job.attempt.saturating_sub(1) as usize)
            .max_attempts(job.max_attempts as usize)
            .data(meta)
            .build();
        self.running.insert(id, job.token);
        if self.tasks.send(task).is_err() {
            // The backend is gone; the lease will expire and another worker gets the job.
            tracing::debug!("backend dropped; fetched job left to its lease");
        }
    }

    async fn renew(&mut self) {
        if self.running.is_empty() {
            return;
        }
        let keys = &self.queue.keys;
        let mut inv = scripts::RENEW.prepare_invoke();
        for k in &keys.script_keys {
            inv.key(k);
        }
        inv.arg(&keys.prefix)
            .arg(now_ms())
            .arg(self.options.lease.as_millis() as u64);
        for (id, token) in &self.running {
            inv.arg(id.as_str()).arg(token);
        }
        let mut conn = self.queue.conn();
        match inv.invoke_async::<Vec<u8>>(&mut conn).await {
            Ok(results) => {
                let lost = results.iter().filter(|r| **r == 0).count();
                if lost > 0 {
                    tracing::warn!(queue = %self.queue.name, lost, "leases lost while running (stalled past the lease?)");
                }
            }
            Err(e) => {
                self.stats.redis_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(queue = %self.queue.name, error = %e, "lease renewal failed; will retry");
            }
        }
    }

    async fn heartbeat(&mut self) {
        let keys = &self.queue.keys;
        let now = now_ms();
        let wkey = keys.worker(&self.options.worker_id);
        let ttl = (self.options.heartbeat * 6).as_millis() as i64;
        let result: Result<(), redis::RedisError> = redis::pipe()
            .zadd(&keys.workers, &self.options.worker_id, now)
            .hset_multiple(
                &wkey,
                &[
                    ("pid", std::process::id().to_string()),
                    ("concurrency", self.options.concurrency.to_string()),
                    ("running", self.in_flight.to_string()),
                    ("heartbeat_ms", now.to_string()),
                ],
            )
            .pexpire(&wkey, ttl)
            .zrembyscore(&keys.workers, "-inf", now.saturating_sub(ttl as u64 * 10))
            .query_async(&mut self.queue.conn())
            .await;
        if let Err(e) = result {
            tracing::debug!(error = %e, "heartbeat failed");
        }
    }

    /// Gives jobs fetched but never started back to the ready set, without spending an attempt.
    async fn release(&mut self, unstarted: Vec<(JobId, String)>) {
        for (id, _) in &unstarted {
            self.running.remove(id);
        }
        self.in_flight = self.in_flight.saturating_sub(unstarted.len());
        if unstarted.is_empty() {
            return;
        }
        let keys = &self.queue.keys;
        let mut inv = scripts::RELEASE.prepare_invoke();
        for k in &keys.script_keys {
            inv.key(k);
        }
        inv.arg(&keys.prefix);
        for (id, token) in &unstarted {
            inv.arg(id.as_str()).arg(token);
        }
        match inv.invoke_async::<i64>(&mut self.queue.conn()).await {
            Ok(n) => {
                tracing::info!(queue = %self.queue.name, released = n, "released unstarted jobs")
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not release unstarted jobs; their leases will expire")
            }
        }
    }

    async fn shut_down(&mut self, mut unstarted: Vec<(JobId, String)>) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Ok(msg) = self.rx.try_recv() {
            match msg {
                DriverMsg::Ack(ack) => {
                    self.running.remove(&ack.id);
                    self.acks.push(ack);
                }
                DriverMsg::Release { id, token } => unstarted.push((id, token)),
                DriverMsg::StopFetching | DriverMsg::Close { .. } => {}
            }
        }
        unstarted.append(&mut self.releases);
        self.release(unstarted).await;
        // Flush the last acknowledgements, giving Redis a bounded time to come back.
        while !self.acks.is_empty() && Instant::now() < deadline {
            match self.try_cycle(0).await {
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "flushing acknowledgements failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        let keys = &self.queue.keys;
        let _: Result<(), redis::RedisError> = redis::pipe()
            .zrem(&keys.workers, &self.options.worker_id)
            .del(keys.worker(&self.options.worker_id))
            .query_async(&mut self.queue.conn())
            .await;
        let _ = self.queue.conn().llen::<_, i64>(keys.notify()).await;
    }
}

struct FetchedJob {
    id: String,
    tenant: String,
    payload: String,
    payload_version: u32,
    attempt: u32,
    max_attempts: u32,
    token: String,
    durable: bool,
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn parse_cycle(reply: redis::Value) -> Result<(i64, Vec<i64>, Vec<FetchedJob>), Error> {
    use redis::FromRedisValue;
    let items: Vec<redis::Value> = Vec::from_redis_value(reply)?;
    let mut it = items.into_iter();
    let next_due = i64::from_redis_value(
        it.next()
            .ok_or_else(|| Error::Protocol("empty cycle reply".into()))?,
    )?;
    let results = Vec::<i64>::from_redis_value(
        it.next()
            .ok_or_else(|| Error::Protocol("cycle reply without ack results".into()))?,
    )?;
    let rest: Vec<redis::Value> = it.collect();
    if !rest.len().is_multiple_of(8) {
        return Err(Error::Protocol(format!(
            "cycle reply has {} job fields",
            rest.len()
        )));
    }
    let mut jobs = Vec::with_capacity(rest.len() / 8);
    let mut it = rest.into_iter();
    while let Some(id) = it.next() {
        let mut next = || it.next().ok_or_else(|| Error::Protocol("short job".into()));
        let job = FetchedJob {
            id: String::from_redis_value(id)?,
            tenant: String::from_redis_value(next()?)?,
            payload: String::from_redis_value(next()?)?,
            payload_version: u32::from_redis_value(next()?)?,
            attempt: u32::from_redis_value(next()?)?,
            max_attempts: u32::from_redis_value(next()?)?,
            token: String::from_redis_value(next()?)?,
            durable: matches!(
                Option::<String>::from_redis_value(next()?)?.as_deref(),
                Some("1")
            ),
        };
        jobs.push(job);
    }
    Ok((next_due, results, jobs))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The outbox layer holds its own clone of the run's meta, taken before the handler's:
    /// what the handler records must show through it.
    #[test]
    fn a_recorded_outcome_shows_through_every_clone_of_the_meta() {
        let meta = JobMeta {
            id: "0190f1b2c3d4".parse().unwrap(),
            queue: "whatsapp_send".parse().unwrap(),
            tenant: TenantId::new(),
            attempt: 1,
            max_attempts: 8,
            durable: true,
            token: "lease".into(),
            outcome_recorded: Arc::default(),
        };
        let layers = meta.clone();
        assert!(!layers.outcome_recorded());
        meta.clone().record_outcome();
        assert!(layers.outcome_recorded());
        assert!(meta.outcome_recorded());
    }
}
