//! Records the outcome of durable jobs (those with an outbox row) in Postgres, so the reconciler
//! knows what is still pending after Redis loses its data. A tower layer around every handler;
//! jobs that are not durable pass through untouched.

use std::task::{Context, Poll};

use apalis_core::error::BoxDynError;
use apalis_core::task::Task;
use futures::FutureExt;
use futures::future::BoxFuture;
use herald_core::JobError;
use herald_queue::JobMeta;
use tower_layer::Layer;
use tower_service::Service;
use uuid::Uuid;

#[derive(Clone)]
pub struct OutboxOutcomeLayer {
    pool: sqlx::PgPool,
}

impl OutboxOutcomeLayer {
    pub fn new(pool: sqlx::PgPool) -> Self {
        Self { pool }
    }
}

impl<S> Layer<S> for OutboxOutcomeLayer {
    type Service = OutboxOutcome<S>;
    fn layer(&self, inner: S) -> Self::Service {
        OutboxOutcome {
            inner,
            pool: self.pool.clone(),
        }
    }
}

#[derive(Clone)]
pub struct OutboxOutcome<S> {
    inner: S,
    pool: sqlx::PgPool,
}

/// The outbox row id behind a durable job (the relay uses the row's UUID, simple form, as id).
pub fn outbox_id(meta: &JobMeta) -> Option<Uuid> {
    if !meta.durable {
        return None;
    }
    Uuid::try_parse(meta.id.as_str()).ok()
}

impl<S, Args> Service<Task<Args>> for OutboxOutcome<S>
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
        let pool = self.pool.clone();
        async move {
            let result = fut.await.map_err(Into::into);
            let Some(meta) = meta else { return result };
            let Some(id) = outbox_id(&meta) else { return result };
            match &result {
                // The handler finished the outbox row in its own last statement.
                Ok(_) if meta.outcome_recorded() => {}
                Ok(_) => {
                    // Until Postgres has the outcome, report a retry: the handler is idempotent,
                    // and a job that Postgres still calls pending must not vanish from Redis.
                    if let Err(e) = herald_store::outbox::mark_completed(&pool, meta.tenant, id).await {
                        tracing::warn!(job_id = %meta.id, error = %e, "recording completion failed");
                        return Err(Box::new(JobError::retry(format!("recording completion failed: {e}"))) as BoxDynError);
                    }
                }
                Err(e) => {
                    let permanent = matches!(e.downcast_ref::<JobError>(), Some(JobError::Permanent { .. }));
                    let retrying = matches!(e.downcast_ref::<JobError>(), Some(JobError::Defer { .. }));
                    if (permanent || (!retrying && meta.is_last_attempt()))
                        && let Err(db) = herald_store::outbox::mark_dead(&pool, meta.tenant, id, &e.to_string()).await {
                            tracing::warn!(job_id = %meta.id, error = %db, "recording dead job failed");
                        }
                }
            }
            result
        }
        .boxed()
    }
}
