//! Helpers for the API tests: the router over a fresh database (from `#[sqlx::test]`) and a
//! random Redis namespace, tenants and tokens, one-shot requests, and a private `redis-server`
//! for tests that need Redis configured differently or killed.

#![allow(dead_code)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use herald_api::{ApiConfig, AppState, router};
use herald_core::TenantId;
use herald_queue::{Client, QueueSettings, RedisTarget};
use herald_store::PgPool;
use serde_json::Value;
use tower::ServiceExt;

pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

pub struct TestApp {
    pub router: Router,
    pub pool: PgPool,
    pub queues: Client,
}

pub async fn queues_at(url: &str, settings: QueueSettings) -> Client {
    Client::connect(RedisTarget::parse(url).expect("redis url"), settings)
        .await
        .expect("connect to redis")
}

pub fn settings() -> QueueSettings {
    QueueSettings {
        namespace: format!("test-api-{}", uuid::Uuid::new_v4().simple()),
        ..QueueSettings::default()
    }
}

pub async fn app(pool: PgPool) -> TestApp {
    app_with(pool, &redis_url(), settings(), ApiConfig::default()).await
}

pub async fn app_with(
    pool: PgPool,
    redis: &str,
    settings: QueueSettings,
    config: ApiConfig,
) -> TestApp {
    let queues = queues_at(redis, settings).await;
    let router = router(AppState::new(pool.clone(), queues.clone(), config));
    TestApp {
        router,
        pool,
        queues,
    }
}

pub async fn tenant(pool: &PgPool, name: &str) -> (TenantId, String) {
    let (tenant, token) = herald_store::tenants::create(pool, name, "UTC")
        .await
        .expect("create tenant");
    (tenant.id, token)
}

pub async fn ops_token(pool: &PgPool) -> String {
    herald_store::ops_tokens::create(pool)
        .await
        .expect("create ops token")
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
    pub text: String,
}

impl Reply {
    /// `error.code` of a JSON error body.
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
    pub fn field(&self) -> &str {
        self.body["error"]["field"].as_str().unwrap_or("")
    }
}

/// A request builder: `req(Method::POST, "/v1/...").token(t).json(v).send(&app)`.
pub struct Req {
    builder: axum::http::request::Builder,
    body: Body,
}

pub fn req(method: Method, path: &str) -> Req {
    Req {
        builder: Request::builder().method(method).uri(path),
        body: Body::empty(),
    }
}

impl Req {
    pub fn token(mut self, token: &str) -> Self {
        self.builder = self
            .builder
            .header("authorization", format!("Bearer {token}"));
        self
    }
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.builder = self.builder.header(name, value);
        self
    }
    pub fn json(mut self, value: &Value) -> Self {
        self.builder = self.builder.header("content-type", "application/json");
        self.body = Body::from(value.to_string());
        self
    }
    pub fn raw(mut self, content_type: &str, body: impl Into<Body>) -> Self {
        self.builder = self.builder.header("content-type", content_type);
        self.body = body.into();
        self
    }
    pub async fn send(self, router: &Router) -> Reply {
        let request = self.builder.body(self.body).expect("request");
        let response = router.clone().oneshot(request).await.expect("infallible");
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("body");
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Reply {
            status,
            headers,
            body,
            text,
        }
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A `redis-server` of the test's own, killed on drop.
pub struct PrivateRedis {
    child: Child,
    pub url: String,
}

impl PrivateRedis {
    pub fn start(extra: &[&str]) -> Self {
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed");
        let url = format!("redis://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, url }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}
