//! Shared helpers for the end-to-end tests: a private `redis-server` per test, a fresh Postgres
//! database per test, `herald-worker` processes to start, kill and signal, and bounded waits.
//!
//! Everything started here is stopped on drop, so a failing test leaves no process behind.

use std::fs;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use herald_core::TenantId;
use herald_queue::{Client, QueueSettings, RedisTarget};

/// How long any wait in these tests may take before the test fails. Generous on purpose: the
/// tests check what happens, never how fast.
pub const DEADLINE: Duration = Duration::from_secs(120);

/// A free loopback TCP port (bound, then released for the caller to use).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(label: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("herald-{label}-{}", uuid::Uuid::new_v4().simple()));
        fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Polls `f` until it returns true; fails the test with `what` after `limit`.
pub async fn wait_until<F, Fut>(what: &str, limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Retries `f` (a Redis or Postgres read that may hit a dropped connection) a few times.
pub async fn retry<T, E: std::fmt::Display, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut last = String::new();
    for _ in 0..50 {
        match f().await {
            Ok(v) => return v,
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what} kept failing: {last}");
}

// ---------------------------------------------------------------------------------------------
// Redis

/// A private `redis-server` on a free loopback port, with no persistence (a restart loses every
/// key). Killed on drop.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    dir: TempDir,
    extra: Vec<String>,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(free_port(), &[])
    }

    /// Starts on `port` with extra `redis-server` arguments.
    pub fn start_with(port: u16, extra: &[&str]) -> Self {
        let mut s = Self {
            port,
            child: None,
            dir: TempDir::new("redis"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let log = fs::File::create(self.dir.path().join("redis.log")).expect("redis log file");
        let child = Command::new("redis-server")
            .arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--maxmemory-policy", "noeviction"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra)
            .stdout(Stdio::from(log.try_clone().expect("log handle")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("redis-server must be installed (make up installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                use std::io::{Read, Write};
                let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                let mut buf = [0u8; 64];
                if s.write_all(b"PING\r\n").is_ok()
                    && let Ok(n) = s.read(&mut buf)
                    && buf[..n].starts_with(b"+PONG")
                {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not start; log:\n{}",
                self.port,
                fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL) without restarting it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills the server and starts a fresh one on the same port: every key is lost.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// A plain connection for test-side commands (FLUSHALL, CLIENT KILL, INFO).
    pub async fn raw(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("private redis reachable")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A random key namespace, so tests on a shared Redis never meet.
pub fn namespace() -> String {
    format!("t{}", uuid::Uuid::new_v4().simple())
}

/// A queue client on `url` under `namespace`.
pub async fn queue_client(url: &str, namespace: &str) -> Client {
    Client::connect(
        RedisTarget::parse(url).expect("redis url"),
        QueueSettings {
            namespace: namespace.to_owned(),
            ..QueueSettings::default()
        },
    )
    .await
    .expect("redis reachable")
}

// ---------------------------------------------------------------------------------------------
// Postgres

fn pg_server_url() -> String {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/postgres".into());
    // Strip the database name: everything after the authority's last '/'.
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.split_once('/') {
            Some((authority, _)) => format!("{scheme}://{authority}"),
            None => url,
        },
        None => url,
    }
}

/// A fresh, migrated Postgres database with a random name; dropped (best effort) on drop.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: sqlx::PgPool,
}

impl TestDb {
    pub async fn create() -> Self {
        let name = format!("herald_test_{}", uuid::Uuid::new_v4().simple());
        let url = format!("{}/{name}", pg_server_url());
        herald_store::ensure_database(&url)
            .await
            .expect("Postgres reachable (make up starts it)");
        let pool = herald_store::connect(&url, 5).await.expect("test database");
        herald_store::migrate(&pool).await.expect("migrations");
        Self { name, url, pool }
    }

    pub async fn tenant(&self) -> TenantId {
        let (tenant, _token) = herald_store::tenants::create(&self.pool, "fault-test", "UTC")
            .await
            .expect("tenant");
        tenant.id
    }

    /// The number `sql` counts for `tenant` (its `$1`), retried while Postgres is unreachable.
    pub async fn tenant_count(&self, tenant: TenantId, sql: &'static str) -> i64 {
        retry(sql, || {
            sqlx::query_scalar::<_, i64>(sql)
                .bind(tenant.0)
                .fetch_one(&self.pool)
        })
        .await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin = format!("{}/postgres", pg_server_url());
        let name = self.name.clone();
        // A thread with its own runtime: Drop cannot await, and the test's runtime may be gone
        // or blocked in this very drop. The test's pool is not closed gracefully (that needs the
        // test's runtime); `with (force)` ends its connections.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok(admin) = herald_store::connect(&admin, 1).await {
                    let _ =
                        sqlx::query(&format!("drop database if exists \"{name}\" with (force)"))
                            .execute(&admin)
                            .await;
                    admin.close().await;
                }
            });
        })
        .join();
    }
}

// ---------------------------------------------------------------------------------------------
// herald-worker processes

/// The binary `name` built next to the test executable (`target/<profile>/<name>`).
fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test>-<hash> → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps");
    let bin = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`, which `make test` does)",
        bin.display()
    );
    bin
}

/// The `herald-worker` binary next to the test executable (`target/<profile>/herald-worker`).
pub fn worker_binary() -> PathBuf {
    binary("herald-worker")
}

/// The `herald-api` binary next to the test executable.
pub fn api_binary() -> PathBuf {
    binary("herald-api")
}

/// The `herald` operator tool next to the test executable.
pub fn cli_binary() -> PathBuf {
    binary("herald")
}

/// How to start a worker process.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub redis_url: String,
    pub database_url: String,
    pub namespace: String,
    pub queues: String,
    pub concurrency: usize,
    pub lease_ms: u64,
    pub drain_secs: u64,
    pub allow_probe_abort: bool,
    pub relay: bool,
    pub reconciler_every_ms: Option<u64>,
    /// More `--flag value` arguments.
    pub extra: Vec<String>,
    /// More environment variables (the worker otherwise starts with a cleared environment).
    pub env: Vec<(String, String)>,
}

impl WorkerConfig {
    pub fn new(redis_url: &str, database_url: &str, namespace: &str) -> Self {
        Self {
            redis_url: redis_url.to_owned(),
            database_url: database_url.to_owned(),
            namespace: namespace.to_owned(),
            queues: "probe".into(),
            concurrency: 10,
            lease_ms: 2_000,
            drain_secs: 30,
            allow_probe_abort: false,
            relay: false,
            reconciler_every_ms: None,
            extra: Vec::new(),
            env: Vec::new(),
        }
    }
}

/// A running `herald-worker`; killed on drop. Its log goes to a file, shown when a test fails.
pub struct WorkerProcess {
    child: Child,
    pub log: PathBuf,
    pub worker_id: String,
    pub metrics_addr: SocketAddr,
    _dir: TempDir,
}

impl WorkerProcess {
    /// Starts the worker and waits for its "started" log line.
    pub fn spawn(cfg: &WorkerConfig) -> anyhow::Result<Self> {
        let dir = TempDir::new("worker");
        let log = dir.path().join("worker.log");
        let out = fs::File::create(&log)?;
        let mut cmd = Command::new(worker_binary());
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .env("REDIS_URL", &cfg.redis_url)
            .env("DATABASE_URL", &cfg.database_url)
            .env("HERALD_NAMESPACE", &cfg.namespace)
            .envs(cfg.env.iter().map(|(k, v)| (k, v)))
            .args(["--json-logs", "--metrics-addr", "127.0.0.1:0"])
            .args(["--queues", &cfg.queues])
            .args(["--concurrency", &cfg.concurrency.to_string()])
            .args(["--lease-ms", &cfg.lease_ms.to_string()])
            .args(["--drain-secs", &cfg.drain_secs.to_string()])
            .args(["--pg-pool-size", "8"])
            .args(&cfg.extra)
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out));
        if cfg.allow_probe_abort {
            cmd.env("HERALD_ALLOW_PROBE_ABORT", "true");
        }
        if !cfg.relay {
            cmd.arg("--no-relay");
        }
        match cfg.reconciler_every_ms {
            Some(ms) => {
                cmd.args(["--reconcile-every-ms", &ms.to_string()]);
            }
            None => {
                cmd.arg("--no-reconciler");
            }
        }
        let mut child = cmd.spawn().context("spawning herald-worker")?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = fs::read_to_string(&log).unwrap_or_default();
            for line in text.lines() {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                    continue;
                };
                let fields = &v["fields"];
                if fields["message"] == "herald-worker started" {
                    let addr = fields["metrics_addr"]
                        .as_str()
                        .context("started line without metrics_addr")?
                        .parse()?;
                    let worker_id = fields["worker_id"].as_str().unwrap_or_default().to_owned();
                    return Ok(Self {
                        child,
                        log,
                        worker_id,
                        metrics_addr: addr,
                        _dir: dir,
                    });
                }
            }
            if let Some(status) = child.try_wait()? {
                bail!("herald-worker exited at start-up ({status}); log:\n{text}");
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("herald-worker did not start within 60 s; log:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: the process dies at once, mid-job, without releasing anything.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM: the process drains and exits.
    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("kill command");
        assert!(status.success(), "kill -TERM {} failed", self.pid());
    }

    /// The exit status, if the process has ended.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits (bounded) for the process to exit.
    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.try_wait() {
                return s;
            }
            assert!(
                start.elapsed() < limit,
                "herald-worker did not exit within {limit:?}; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The `/metrics` page.
    pub fn metrics(&self) -> anyhow::Result<String> {
        http_get(self.metrics_addr, "/metrics")
    }

    /// One sample of the `/metrics` page, e.g. `metric("herald_jobs_completed_total", "noop")`.
    pub fn metric(&self, name: &str, queue: &str) -> anyhow::Result<Option<f64>> {
        Ok(parse_metric(&self.metrics()?, name, queue))
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let text = self.log_text();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            eprintln!("--- last lines of herald-worker {} log ---", self.worker_id);
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// A minimal HTTP/1.1 GET, enough for `/metrics` and `/healthz`.
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    let Some((head, rest)) = body.split_once("\r\n\r\n") else {
        bail!("malformed HTTP response: {body:?}");
    };
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {head}");
    }
    Ok(rest.to_owned())
}

/// The value of `name{queue="<queue>"}` in a Prometheus text page.
pub fn parse_metric(page: &str, name: &str, queue: &str) -> Option<f64> {
    let prefix = format!("{name}{{queue=\"{queue}\"}} ");
    page.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

// ---------------------------------------------------------------------------------------------
// HTTP to herald-api served in the test process

/// An HTTP answer: status and body.
#[derive(Debug, Clone)]
pub struct HttpReply {
    pub status: u16,
    pub body: String,
}

impl HttpReply {
    /// The body as JSON (`null` when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// herald-api's router served by this test process on a free loopback port, over `pool` and the
/// queues under `namespace` on `redis_url`. Returns its address.
pub async fn serve_api(pool: &sqlx::PgPool, redis_url: &str, namespace: &str) -> SocketAddr {
    let queues = queue_client(redis_url, namespace).await;
    let router = herald_api::router(herald_api::AppState::new(
        pool.clone(),
        queues,
        herald_api::ApiConfig::default(),
    ));
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("a loopback port for the API");
    let addr = listener.local_addr().expect("the API's address");
    tokio::spawn(async move { axum::serve(listener, router).await });
    addr
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`), enough to drive herald-api
/// served on `addr` by the test itself: `headers` are `(name, value)` pairs, the body is sent
/// with its length, and a chunked answer is decoded.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> anyhow::Result<HttpReply> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .with_context(|| format!("connecting to {addr}"))??;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut raw))
        .await
        .with_context(|| format!("{method} {path}: no answer within 60 s"))??;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let Some((head, rest)) = text.split_once("\r\n\r\n") else {
        bail!("{method} {path}: malformed HTTP response: {text:?}");
    };
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{method} {path}: no status in {head:?}"))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(rest)?
    } else {
        rest.to_owned()
    };
    Ok(HttpReply { status, body })
}

fn dechunk(mut rest: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    loop {
        let Some((size, after)) = rest.split_once("\r\n") else {
            bail!("malformed chunked body");
        };
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .context("malformed chunk size")?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = after.get(..size).context("truncated chunk")?;
        out.push_str(chunk);
        rest = after.get(size + 2..).unwrap_or("");
    }
}
