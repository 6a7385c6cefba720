//! The tower layer herald's backend puts around every handler: it bounds the run with the
//! execution timeout, turns a panic into a failed attempt, reads the retry decision from
//! [`JobError`], and hands the outcome to the driver as an acknowledgement.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use apalis_core::error::BoxDynError;
use apalis_core::task::Task;
use futures::FutureExt;
use futures::future::BoxFuture;
use herald_core::JobError;
use tokio::sync::mpsc;
use tower_layer::Layer;
use tower_service::Service;
use tracing::Instrument;

use crate::backend::{Ack, DriverMsg, JobMeta, Outcome};
use crate::backoff::Backoff;

#[derive(Clone)]
pub struct HeraldLayer {
    driver: mpsc::UnboundedSender<DriverMsg>,
    timeout: Duration,
    backoff: Backoff,
    slots: Arc<tokio::sync::Semaphore>,
    stopping: Arc<AtomicBool>,
    /// Moving average of run times in µs, read by the driver to size its prefetch.
    run_us: Arc<AtomicU64>,
}

impl HeraldLayer {
    pub(crate) fn new(
        driver: mpsc::UnboundedSender<DriverMsg>,
        timeout: Duration,
        backoff: Backoff,
        slots: Arc<tokio::sync::Semaphore>,
        stopping: Arc<AtomicBool>,
        run_us: Arc<AtomicU64>,
    ) -> Self {
        Self {
            driver,
            timeout,
            backoff,
            slots,
            stopping,
            run_us,
        }
    }
}

impl<S> Layer<S> for HeraldLayer {
    type Service = HeraldService<S>;
    fn layer(&self, inner: S) -> HeraldService<S> {
        HeraldService {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct HeraldService<S> {
    inner: S,
    layer: HeraldLayer,
}

/// Decides what a handler's error means for the job.
pub(crate) fn classify(error: &BoxDynError, meta: &JobMeta, backoff: &Backoff) -> Outcome {
    match error.downcast_ref::<JobError>() {
        Some(JobError::Permanent { reason }) => Outcome::Dead {
            error: reason.clone(),
        },
        Some(JobError::Defer { reason, until_ms }) => Outcome::Defer {
            until_ms: *until_ms,
            reason: reason.clone(),
        },
        Some(JobError::Retry { reason, after }) => Outcome::Retry {
            delay: after.unwrap_or_else(|| backoff.random_delay(meta.attempt)),
            error: reason.clone(),
        },
        None => Outcome::Retry {
            delay: backoff.random_delay(meta.attempt),
            error: error.to_string(),
        },
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".into()
    }
}

impl<S, Args> Service<Task<Args>> for HeraldService<S>
where
    S: Service<Task<Args>>,
    S::Error: Into<BoxDynError>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxDynError;
    type Future = BoxFuture<'static, Result<S::Response, BoxDynError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxDynError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, task: Task<Args>) -> Self::Future {
        let meta = task.ctx().data().get::<JobMeta>().cloned();
        let fut = self.inner.call(task);
        let layer = self.layer.clone();
        let Some(meta) = meta else {
            return async move { fut.await.map_err(Into::into) }.boxed();
        };
        let span = tracing::info_span!("job", job_id = %meta.id, queue = %meta.queue,
            tenant = %meta.tenant, attempt = meta.attempt);
        async move {
            // A prefetched job waits here for a slot; the handler has not started yet.
            let _slot = layer.slots.clone().acquire_owned().await;
            if layer.stopping.load(Ordering::SeqCst) {
                let _ = layer.driver.send(DriverMsg::Release {
                    id: meta.id.clone(),
                    token: meta.token.clone(),
                });
                return Err(BoxDynError::from(format!(
                    "job {} released unstarted: the worker is shutting down",
                    meta.id
                )));
            }
            let started = Instant::now();
            let run =
                tokio::time::timeout(layer.timeout, AssertUnwindSafe(fut).catch_unwind()).await;
            let (outcome, result) = match run {
                Ok(Ok(Ok(value))) => (Outcome::Completed, Ok(value)),
                Ok(Ok(Err(e))) => {
                    let e: BoxDynError = e.into();
                    (classify(&e, &meta, &layer.backoff), Err(e))
                }
                Ok(Err(panic)) => {
                    let msg = format!("handler panicked: {}", panic_message(panic.as_ref()));
                    (
                        Outcome::Retry {
                            delay: layer.backoff.random_delay(meta.attempt),
                            error: msg.clone(),
                        },
                        Err(msg.into()),
                    )
                }
                Err(_) => {
                    let msg = format!("timed out after {:?}; the run was cancelled", layer.timeout);
                    (
                        Outcome::Retry {
                            delay: layer.backoff.random_delay(meta.attempt),
                            error: msg.clone(),
                        },
                        Err(msg.into()),
                    )
                }
            };
            record_run(&layer.run_us, started.elapsed());
            match &outcome {
                Outcome::Completed => tracing::debug!(
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "job completed"
                ),
                Outcome::Defer { reason, until_ms } => {
                    tracing::debug!(%reason, until_ms, "job deferred")
                }
                Outcome::Retry { error, delay } => {
                    tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "job failed")
                }
                Outcome::Dead { error } => tracing::warn!(%error, "job failed permanently"),
            }
            let _ = layer.driver.send(DriverMsg::Ack(Ack {
                id: meta.id,
                token: meta.token,
                outcome,
            }));
            result
        }
        .instrument(span)
        .boxed()
    }
}

/// Folds one run time into the moving average (weight 1/8; the first run sets it).
fn record_run(average: &AtomicU64, took: Duration) {
    let took = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
    let _ = average.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
        Some(if old == u64::MAX {
            took
        } else {
            old - old / 8 + took / 8
        })
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_time_average_starts_at_the_first_run_and_follows_slowly() {
        let avg = AtomicU64::new(u64::MAX);
        record_run(&avg, Duration::from_micros(800));
        assert_eq!(avg.load(Ordering::Relaxed), 800);
        for _ in 0..40 {
            record_run(&avg, Duration::from_millis(100));
        }
        let after = avg.load(Ordering::Relaxed);
        assert!(after > 90_000 && after <= 100_000, "{after}");
    }
}
