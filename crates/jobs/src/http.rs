//! The built-in `http` job type: other services hand herald an HTTP request to deliver, without
//! writing Rust. Destinations are limited to the tenant's allow-list of hosts (so herald cannot
//! be pointed at internal addresses); bodies are signed with the tenant's HMAC secret; 429, 5xx
//! and timeouts are retried with backoff, honouring `Retry-After`; other 4xx are permanent.

use std::collections::BTreeMap;
use std::time::Duration;

use apalis_core::task::data::Data;
use herald_core::{JobError, JobPayload, TenantId, now_ms};
use herald_queue::JobMeta;
use hmac::{Hmac, Mac};
use reqwest::Url;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Sha256;

use crate::Deps;

/// The longest delivery timeout a job may ask for.
pub const MAX_TIMEOUT_MS: u64 = 60_000;
const DEFAULT_TIMEOUT_MS: u64 = 10_000;
/// Signature headers: `X-Herald-Signature: v1=<hex HMAC-SHA256 of "<timestamp>.<body>">`.
pub const SIGNATURE_HEADER: &str = "x-herald-signature";
pub const TIMESTAMP_HEADER: &str = "x-herald-timestamp";
pub const JOB_ID_HEADER: &str = "x-herald-job-id";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpJob {
    /// GET, POST, PUT, PATCH or DELETE.
    pub method: String,
    pub url: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// The request body, sent as is.
    #[serde(default)]
    pub body: Option<String>,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

impl JobPayload for HttpJob {
    const QUEUE: &'static str = "http";
    const MAX_ATTEMPTS: u32 = 8;
    const TIMEOUT: Duration = Duration::from_secs(90);
}

const METHODS: &[&str] = &["GET", "POST", "PUT", "PATCH", "DELETE"];

impl HttpJob {
    /// Checks the shape; returns the destination host.
    pub fn check(&self) -> Result<String, String> {
        if !METHODS.contains(&self.method.as_str()) {
            return Err(format!(
                "method must be one of {}, got {:?}",
                METHODS.join(", "),
                self.method
            ));
        }
        let url = Url::parse(&self.url).map_err(|e| format!("url: {e}"))?;
        if url.scheme() != "http" && url.scheme() != "https" {
            return Err(format!(
                "url: scheme must be http or https, got {:?}",
                url.scheme()
            ));
        }
        let host = url
            .host_str()
            .ok_or_else(|| "url: has no host".to_owned())?
            .to_ascii_lowercase();
        if let Some(t) = self.timeout_ms
            && (t == 0 || t > MAX_TIMEOUT_MS)
        {
            return Err(format!("timeout_ms must be 1 to {MAX_TIMEOUT_MS}, got {t}"));
        }
        for name in self.headers.keys() {
            reqwest::header::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("headers: {name:?} is not a valid header name"))?;
        }
        Ok(host)
    }

    pub fn validate_value(v: &Value) -> Result<(), String> {
        let job: HttpJob = serde_json::from_value(v.clone())
            .map_err(|e| format!("payload does not match job type http: {e}"))?;
        job.check().map(|_| ())
    }
}

/// Whether the tenant may send to this payload's host (the API asks before enqueueing; the
/// handler asks again before sending, since the allow-list may have changed).
pub async fn destination_allowed(
    pool: &sqlx::PgPool,
    tenant: TenantId,
    job: &HttpJob,
) -> Result<bool, String> {
    let host = job.check()?;
    herald_store::tenants::is_host_allowed(pool, tenant, &host)
        .await
        .map_err(|e| e.to_string())
}

/// `v1=<hex>` over `"<timestamp>.<body>"`.
pub fn sign(secret: &str, timestamp_ms: u64, body: &str) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(timestamp_ms.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}

fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

pub async fn deliver(job: HttpJob, meta: JobMeta, deps: Data<Deps>) -> Result<(), JobError> {
    let host = job.check().map_err(JobError::permanent)?;
    let allowed = herald_store::tenants::is_host_allowed(&deps.pool, meta.tenant, &host)
        .await
        .map_err(|e| JobError::retry(format!("allow-list lookup failed: {e}")))?;
    if !allowed {
        return Err(JobError::permanent(format!(
            "host {host:?} is not on the tenant's allow-list"
        )));
    }
    let secret = herald_store::tenants::hmac_secret(&deps.pool, meta.tenant)
        .await
        .map_err(|e| JobError::retry(format!("secret lookup failed: {e}")))?;
    let body = job.body.clone().unwrap_or_default();
    let ts = now_ms();
    let method = reqwest::Method::from_bytes(job.method.as_bytes())
        .map_err(|e| JobError::permanent(e.to_string()))?;
    let mut req = deps
        .http
        .request(method, &job.url)
        .timeout(Duration::from_millis(
            job.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS),
        ))
        .header(SIGNATURE_HEADER, sign(&secret, ts, &body))
        .header(TIMESTAMP_HEADER, ts.to_string())
        .header(JOB_ID_HEADER, meta.id.as_str());
    for (k, v) in &job.headers {
        req = req.header(k.as_str(), v.as_str());
    }
    if job.body.is_some() {
        req = req.body(body);
    }
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) if e.is_timeout() => return Err(JobError::retry(format!("timed out: {e}"))),
        Err(e) => return Err(JobError::retry(format!("request failed: {e}"))),
    };
    let status = resp.status();
    if status.is_success() {
        return Ok(());
    }
    let reason = format!("{} answered {}", host, status);
    if status.as_u16() == 429 || status.is_server_error() || status.as_u16() == 408 {
        return Err(match retry_after(resp.headers()) {
            Some(after) => JobError::retry_after(reason, after),
            None => JobError::retry(reason),
        });
    }
    Err(JobError::permanent(reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(method: &str, url: &str) -> HttpJob {
        HttpJob {
            method: method.into(),
            url: url.into(),
            headers: BTreeMap::new(),
            body: None,
            timeout_ms: None,
        }
    }

    #[test]
    fn shapes_are_checked_with_reasons() {
        assert_eq!(
            job("POST", "https://Hooks.Example.com/x").check().unwrap(),
            "hooks.example.com"
        );
        assert!(
            job("BREW", "https://a.b/")
                .check()
                .unwrap_err()
                .contains("method")
        );
        assert!(
            job("GET", "ftp://a.b/")
                .check()
                .unwrap_err()
                .contains("scheme")
        );
        assert!(
            job("GET", "not a url")
                .check()
                .unwrap_err()
                .starts_with("url")
        );
        let mut j = job("GET", "https://a.b/");
        j.timeout_ms = Some(0);
        assert!(j.check().unwrap_err().contains("timeout_ms"));
        assert!(HttpJob::validate_value(&serde_json::json!({"method":"GET"})).is_err());
        assert!(
            HttpJob::validate_value(
                &serde_json::json!({"method":"GET","url":"https://a.b","extra":1})
            )
            .is_err()
        );
    }

    #[test]
    fn signatures_cover_timestamp_and_body() {
        let a = sign("secret", 1, "body");
        assert!(a.starts_with("v1="));
        assert_eq!(a, sign("secret", 1, "body"));
        assert_ne!(a, sign("secret", 2, "body"));
        assert_ne!(a, sign("other", 1, "body"));
        assert_ne!(a, sign("secret", 1, "body2"));
    }
}
