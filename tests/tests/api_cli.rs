//! The `herald-api` binary's start-up contract: it refuses a Redis whose `maxmemory-policy`
//! evicts keys with the reason on stderr and a non-zero exit, and serves `/healthz` on one that
//! does not. The worker's side of the same rule is in `worker_cli.rs`.

use std::fs;
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use herald_tests::{
    DEADLINE, RedisServer, TempDir, TestDb, api_binary, free_port, http_get, namespace,
};

/// A `herald-api` process with its stdout and stderr in files; killed on drop.
struct ApiProcess {
    child: Child,
    addr: SocketAddr,
    dir: TempDir,
}

impl ApiProcess {
    fn spawn(redis_url: &str, database_url: &str) -> Self {
        let dir = TempDir::new("api");
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let stdout = fs::File::create(dir.path().join("stdout.log")).expect("stdout file");
        let stderr = fs::File::create(dir.path().join("stderr.log")).expect("stderr file");
        let child = Command::new(api_binary())
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .env("REDIS_URL", redis_url)
            .env("DATABASE_URL", database_url)
            .env("HERALD_NAMESPACE", namespace())
            .env("HERALD_API_ADDR", addr.to_string())
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr))
            .spawn()
            .expect("spawning herald-api");
        Self { child, addr, dir }
    }

    fn stderr(&self) -> String {
        fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    fn output(&self) -> String {
        let stdout = fs::read_to_string(self.dir.path().join("stdout.log")).unwrap_or_default();
        format!("stdout:\n{stdout}\nstderr:\n{}", self.stderr())
    }

    /// Waits (bounded) for the process to exit.
    async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("process status") {
                return status;
            }
            assert!(
                start.elapsed() < limit,
                "herald-api did not exit within {limit:?}; {}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (bounded) for `/healthz` to answer; fails the test if the process exits first.
    async fn wait_healthy(&mut self, limit: Duration) -> String {
        let start = Instant::now();
        loop {
            if let Ok(body) = http_get(self.addr, "/healthz") {
                return body;
            }
            if let Some(status) = self.child.try_wait().expect("process status") {
                panic!(
                    "herald-api exited at start-up ({status}); {}",
                    self.output()
                );
            }
            assert!(
                start.elapsed() < limit,
                "herald-api did not answer /healthz within {limit:?}; {}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for ApiProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn an_evicting_redis_is_refused() {
    let redis = RedisServer::start_with(free_port(), &["--maxmemory-policy", "allkeys-lru"]);
    let db = TestDb::create().await;
    let mut api = ApiProcess::spawn(&redis.url(), &db.url);
    let status = api.wait_exit(DEADLINE).await;
    assert!(!status.success(), "started on an evicting Redis");
    let err = api.stderr();
    assert!(
        err.contains("maxmemory-policy")
            && err.contains("allkeys-lru")
            && err.contains("noeviction"),
        "{}",
        api.output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_evicting_redis_is_accepted() {
    let redis = RedisServer::start_with(free_port(), &["--maxmemory-policy", "noeviction"]);
    let db = TestDb::create().await;
    let mut api = ApiProcess::spawn(&redis.url(), &db.url);
    let body = api.wait_healthy(DEADLINE).await;
    let health: serde_json::Value = serde_json::from_str(body.trim()).expect("JSON /healthz");
    assert_eq!(health, serde_json::json!({"status": "ok"}));
    let ready: serde_json::Value =
        serde_json::from_str(http_get(api.addr, "/readyz").expect("/readyz").trim())
            .expect("JSON /readyz");
    assert_eq!(
        ready["checks"],
        serde_json::json!({"postgres": "ok", "redis": "ok"})
    );
    assert!(api.child.try_wait().expect("process status").is_none());
}
