//! Runs a [`Plan`]: one apalis worker per queue over herald's Redis backend, the outbox relay,
//! the reconciler, periodic maintenance and the metrics server, until a shutdown signal.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use apalis_core::worker::builder::WorkerBuilder;
use herald_jobs::Deps;
use herald_jobs::airtable::{Airtable, AirtableSettings};
use herald_jobs::builtin::{self, Noop, Probe};
use herald_jobs::calls::{self, CallDispatch, ReleaseSlot, Voice, VoiceSettings};
use herald_jobs::channels::{self, ChannelSettings};
use herald_jobs::daily::{
    self, AirtableCleanup, DailyCleanup, DailyDistribute, DailySelect, DailySync,
};
use herald_jobs::durable::OutboxOutcomeLayer;
use herald_jobs::http::{self, HttpJob};
use herald_jobs::sequences::{self, LeadGeneration, SequenceStep};
use herald_jobs::whatsapp::{self, WhatsApp, WhatsAppSend, WhatsAppSettings};
use herald_queue::periodic::claim_period;
use herald_queue::{Client, DrainHandle, QueueSettings, RedisBackend, RedisTarget, WorkerOptions};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{Args, Plan, QueuePlan};
use crate::metrics::{self, MetricsState, QueueMetrics};

/// A queue being served.
struct Served {
    drain: DrainHandle,
    handle: JoinHandle<Result<(), apalis_core::error::WorkerError>>,
}

/// Everything one queue's worker needs.
struct QueueCtx {
    plan: QueuePlan,
    client: Client,
    options: WorkerOptions,
    deps: Deps,
    stop: watch::Receiver<bool>,
}

/// Builds and spawns the apalis worker of one job type. A macro because the handler's extractor
/// list differs per job type and apalis expresses that through the handler's type.
macro_rules! serve {
    ($payload:ty, $handler:expr, $ctx:expr, $metrics:expr) => {{
        let ctx: QueueCtx = $ctx;
        let queue = ctx.client.queue(&ctx.plan.name);
        let backend = RedisBackend::<$payload>::new(queue.clone(), ctx.options.clone());
        $metrics.push(QueueMetrics {
            queue,
            stats: backend.stats(),
            concurrency: ctx.plan.concurrency,
        });
        let drain = backend.drain_handle();
        let pool = ctx.deps.pool.clone();
        let worker = WorkerBuilder::new(format!("{}/{}", ctx.options.worker_id, ctx.plan.name))
            .backend(backend)
            .data(ctx.deps)
            .layer(OutboxOutcomeLayer::new(pool))
            .build($handler);
        let mut stop = ctx.stop;
        let on_stop = drain.clone();
        let handle = tokio::spawn(async move {
            worker
                .run_until(async move {
                    let _ = stop.wait_for(|s| *s).await;
                    on_stop.stop_fetching();
                    Ok::<(), std::io::Error>(())
                })
                .await
        });
        Served { drain, handle }
    }};
}

fn serve_queue(ctx: QueueCtx, metrics: &mut Vec<QueueMetrics>) -> anyhow::Result<Served> {
    Ok(match ctx.plan.name.as_str() {
        "noop" => serve!(Noop, builtin::noop, ctx, metrics),
        "probe" => serve!(Probe, builtin::probe, ctx, metrics),
        "http" => serve!(HttpJob, http::deliver, ctx, metrics),
        "daily_select" => serve!(DailySelect, daily::select, ctx, metrics),
        "daily_distribute" => serve!(DailyDistribute, daily::distribute, ctx, metrics),
        "daily_sync" => serve!(DailySync, daily::sync, ctx, metrics),
        "daily_cleanup" => serve!(DailyCleanup, daily::cleanup, ctx, metrics),
        "daily_airtable_cleanup" => {
            serve!(AirtableCleanup, daily::airtable_cleanup, ctx, metrics)
        }
        "call_dispatch" => serve!(CallDispatch, calls::dispatch, ctx, metrics),
        "call_release_slot" => serve!(ReleaseSlot, calls::release_slot, ctx, metrics),
        "whatsapp_send" => serve!(WhatsAppSend, whatsapp::send, ctx, metrics),
        "sequence_step" => serve!(SequenceStep, sequences::step, ctx, metrics),
        "lead_generation" => serve!(LeadGeneration, sequences::generate, ctx, metrics),
        other => anyhow::bail!("queue {other:?} has no handler in this herald-worker build"),
    })
}

/// Runs every `every` (once per period across the fleet) until the task is aborted.
async fn fleet_periodic<F, Fut>(client: Client, name: &'static str, every: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        match claim_period(&client, name, every).await {
            Ok(true) => f().await,
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(task = name, error = %e, "could not claim the period; skipping it")
            }
        }
    }
}

async fn reconcile_once(pool: sqlx::PgPool, client: Client) {
    match herald_jobs::relay::reconcile(&pool, &client).await {
        Ok(0) => tracing::debug!("reconciler: Redis has every pending job"),
        Ok(n) => tracing::warn!(
            republished = n,
            "reconciler re-published jobs Redis had lost"
        ),
        Err(e) => tracing::warn!(error = %e, "reconciler failed; will retry next period"),
    }
}

async fn maintain_once(pool: sqlx::PgPool, outbox_keep: Duration, idempotency_keep: Duration) {
    let cutoff = |keep: Duration| {
        chrono::Utc::now() - chrono::Duration::from_std(keep).unwrap_or(chrono::Duration::days(1))
    };
    match herald_store::outbox::prune(&pool, cutoff(outbox_keep)).await {
        Ok(n) => tracing::info!(deleted = n, "maintenance: pruned finished outbox rows"),
        Err(e) => tracing::warn!(error = %e, "maintenance: outbox prune failed"),
    }
    match herald_store::idempotency::prune(&pool, cutoff(idempotency_keep)).await {
        Ok(n) => tracing::info!(deleted = n, "maintenance: pruned idempotency keys"),
        Err(e) => tracing::warn!(error = %e, "maintenance: idempotency prune failed"),
    }
}

/// What a started worker reports about itself.
#[derive(Debug, Clone)]
pub struct Started {
    pub worker_id: String,
    pub metrics_addr: SocketAddr,
}

/// Runs the worker until `shutdown` completes, then drains. Errors are start-up failures
/// (configuration, Redis or Postgres unreachable, an evicting Redis memory policy).
pub async fn run(
    args: Args,
    shutdown: impl Future<Output = ()>,
    on_started: impl FnOnce(&Started),
) -> anyhow::Result<()> {
    let plan = Plan::from_args(&args)?;
    let target = RedisTarget::parse(&args.redis_url).context("REDIS_URL")?;
    let settings = QueueSettings {
        namespace: args.namespace.clone(),
        // A finished job's key must outlive its outbox row: while the row exists the
        // reconciler may re-publish it, and the key is what makes that a duplicate.
        key_retention: QueueSettings::default()
            .key_retention
            .max(Duration::from_secs(args.outbox_retention_secs)),
        ..QueueSettings::default()
    };
    let client = Client::connect(target, settings)
        .await
        .context("connecting to Redis")?;
    client
        .check_memory_policy()
        .await
        .context("refusing to start")?;
    let pool = herald_store::connect(&args.database_url, args.pg_pool_size)
        .await
        .context("connecting to Postgres")?;
    let http = reqwest::Client::builder()
        .build()
        .context("building the HTTP client")?;
    let mut deps = Deps::new(pool.clone(), http.clone(), args.allow_probe_abort);
    // Voice calls (VOICE_API_URL, HERALD_CALL_SLOT_LEASE_MS, HERALD_CALL_DISPATCH_BATCH, and
    // HERALD_CALL_FLEET_LIMIT, the fleet-wide cap shared fairly between tenants, unset = none):
    // slots live under the call_dispatch queue's hash tag in this worker's namespace.
    let voice_settings = VoiceSettings::from_env().context("voice call settings")?;
    if let Some(limit) = voice_settings.fleet_limit {
        tracing::info!(
            fleet_limit = limit,
            "calls capped fleet-wide, shared between tenants"
        );
    }
    let voice = Voice::connect(
        http.clone(),
        voice_settings,
        &args.redis_url,
        &args.namespace,
    )
    .await
    .context("call slots")?;
    deps = deps.with_voice(voice);
    // WhatsApp (WHATSAPP_API_URL, default Meta's Graph API): the send rate limits live under the
    // whatsapp_send queue's hash tag in this worker's namespace.
    let whatsapp = WhatsApp::connect(
        http.clone(),
        &WhatsAppSettings::from_env(),
        &args.redis_url,
        &args.namespace,
    )
    .await
    .context("WhatsApp rate limiter")?;
    deps = deps.with_whatsapp(whatsapp);
    // Sequences' email, LinkedIn and Instagram providers: each tenant's account
    // (PUT /v1/providers/{channel}), else this worker's (EMAIL_API_URL/EMAIL_API_KEY,
    // LINKEDIN_API_URL/LINKEDIN_API_KEY, INSTAGRAM_API_URL/INSTAGRAM_API_KEY). A tenant with
    // neither has those steps retry with a reason.
    let channel_settings = ChannelSettings::from_env();
    tracing::info!(
        email = channel_settings.email.api_url.is_some(),
        linkedin = channel_settings.linkedin.api_url.is_some(),
        instagram = channel_settings.instagram.api_url.is_some(),
        "sequence channel providers with a worker-wide URL"
    );
    deps = deps.with_sequence_connectors(channels::connectors(
        http.clone(),
        pool.clone(),
        &channel_settings,
    ));
    // Airtable (AIRTABLE_API_URL, AIRTABLE_TOKEN, AIRTABLE_BASE_ID, HERALD_AIRTABLE_*): without
    // it the daily assignment's sync and cleanup jobs retry with a reason.
    match AirtableSettings::from_env().context("Airtable settings")? {
        Some(settings) => {
            let airtable = Airtable::connect(http, &settings, &args.redis_url, &args.namespace)
                .await
                .context("Airtable rate limiter")?;
            deps = deps.with_airtable(airtable);
        }
        None => tracing::info!("Airtable is not configured (AIRTABLE_TOKEN, AIRTABLE_BASE_ID)"),
    }
    let worker_id = WorkerOptions::generate_worker_id();

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut served = Vec::new();
    let mut queue_metrics = Vec::new();
    for q in &plan.queues {
        let mut options = WorkerOptions::new(worker_id.clone());
        options.concurrency = q.concurrency;
        options.fetch_batch = plan.fetch_batch;
        options.prefetch = plan.prefetch;
        options.lease = plan.lease;
        options.timeout = q.timeout;
        let ctx = QueueCtx {
            plan: q.clone(),
            client: client.clone(),
            options,
            deps: deps.clone(),
            stop: stop_rx.clone(),
        };
        served.push(serve_queue(ctx, &mut queue_metrics)?);
    }

    let (metrics_addr, metrics_server) = metrics::serve(
        args.metrics_addr,
        MetricsState {
            worker_id: worker_id.clone(),
            queues: queue_metrics,
        },
    )
    .await
    .with_context(|| format!("binding the metrics address {}", args.metrics_addr))?;
    // Metrics stay up through the drain; the other background tasks stop when it begins.
    let metrics_task = tokio::spawn(async move {
        if let Err(e) = metrics_server.await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    let mut background: Vec<JoinHandle<()>> = Vec::new();
    if !args.no_relay {
        background.push(tokio::spawn(herald_jobs::relay::run_relay(
            pool.clone(),
            client.clone(),
            Duration::from_millis(args.relay_poll_ms.max(1)),
        )));
    }
    if !args.no_reconciler {
        let (pool, c) = (pool.clone(), client.clone());
        background.push(tokio::spawn(fleet_periodic(
            client.clone(),
            "reconcile",
            Duration::from_millis(args.reconcile_every_ms.max(100)),
            move || reconcile_once(pool.clone(), c.clone()),
        )));
    }
    {
        let pool = pool.clone();
        let outbox_keep = Duration::from_secs(args.outbox_retention_secs);
        let idem_keep = Duration::from_secs(args.idempotency_retention_secs);
        background.push(tokio::spawn(fleet_periodic(
            client.clone(),
            "maintenance",
            Duration::from_secs(args.maintenance_every_secs.max(1)),
            move || maintain_once(pool.clone(), outbox_keep, idem_keep),
        )));
    }

    let started = Started {
        worker_id: worker_id.clone(),
        metrics_addr,
    };
    tracing::info!(
        worker_id = %worker_id,
        metrics_addr = %metrics_addr,
        queues = %plan.queues.iter().map(|q| q.name.as_str()).collect::<Vec<_>>().join(","),
        "herald-worker started"
    );
    on_started(&started);

    // Run until a signal, or until a queue's worker ends on its own (it should not).
    let mut handles: Vec<_> = served.iter_mut().map(|s| &mut s.handle).collect();
    let early = tokio::select! {
        _ = shutdown => None,
        (res, i, _) = futures::future::select_all(handles.iter_mut()) => Some((i, res)),
    };
    if let Some((i, res)) = early {
        let name = plan.queues[i].name.clone();
        for h in background.iter().chain([&metrics_task]) {
            h.abort();
        }
        anyhow::bail!("the worker of queue {name} stopped unexpectedly: {res:?}");
    }

    tracing::info!(
        drain_secs = plan.drain.as_secs(),
        "shutting down: no more fetching; draining running jobs"
    );
    // Stop fetching at once (unstarted jobs go back to Redis for other workers), then let
    // apalis finish the running jobs and close each backend.
    for s in &served {
        s.drain.stop_fetching();
    }
    let _ = stop_tx.send(true);
    for h in &background {
        h.abort();
    }
    let all = futures::future::join_all(served.into_iter().map(|s| s.handle));
    match tokio::time::timeout(plan.drain, all).await {
        Ok(results) => {
            for (q, r) in plan.queues.iter().zip(results) {
                match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(queue = %q.name, error = %e, "worker ended with an error")
                    }
                    Err(e) => tracing::warn!(queue = %q.name, error = %e, "worker task failed"),
                }
            }
            tracing::info!("drained; bye");
        }
        Err(_) => tracing::warn!(
            drain_secs = plan.drain.as_secs(),
            "drain time over with jobs still running; exiting anyway (their leases expire and other workers re-run them)"
        ),
    }
    metrics_task.abort();
    pool.close().await;
    Ok(())
}
