//! The outbox relay against real Postgres and Redis: rows reach Redis once, keyed by their
//! outbox id, and a committed row wakes an idle relay through the outbox notification.

use std::time::Duration;

use herald_core::TenantId;
use herald_jobs::builtin::Noop;
use herald_jobs::relay;
use herald_queue::{Client, QueueSettings, RedisTarget};
use herald_store::{PgPool, outbox, tenants};

async fn queues() -> Client {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let settings = QueueSettings {
        namespace: format!("test-relay-{}", uuid::Uuid::new_v4().simple()),
        ..QueueSettings::default()
    };
    Client::connect(RedisTarget::parse(&url).unwrap(), settings)
        .await
        .expect("redis reachable")
}

async fn write_noop(pool: &PgPool, tenant: TenantId) -> uuid::Uuid {
    let mut tx = pool.begin().await.unwrap();
    let id = outbox::insert(
        &mut tx,
        tenant,
        &outbox::NewOutboxJob::for_payload(&Noop {}).unwrap(),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    id
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn rows_are_published_once_under_their_outbox_id(pool: PgPool) {
    let (tenant, _) = tenants::create(&pool, "relay", "UTC").await.unwrap();
    let client = queues().await;
    let queue = client.queue(&"noop".parse().unwrap());
    let ids = [
        write_noop(&pool, tenant.id).await,
        write_noop(&pool, tenant.id).await,
    ];
    assert_eq!(relay::relay_once(&pool, &client).await.unwrap(), 2);
    assert_eq!(relay::relay_once(&pool, &client).await.unwrap(), 0);
    for id in ids {
        let job_id = id.simple().to_string().try_into().unwrap();
        let info = queue.job(&job_id).await.unwrap().expect("published");
        assert_eq!(info.tenant, tenant.id);
    }
    assert_eq!(queue.counts(Some(tenant.id)).await.unwrap().ready, 2);
    // The reconciler finds nothing missing: both are in Redis.
    assert_eq!(relay::reconcile(&pool, &client).await.unwrap(), 0);
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn a_committed_row_wakes_an_idle_relay(pool: PgPool) {
    let (tenant, _) = tenants::create(&pool, "relay", "UTC").await.unwrap();
    let client = queues().await;
    let queue = client.queue(&"noop".parse().unwrap());
    // An idle poll far longer than the wait below: only the notification can explain a publish.
    let running = tokio::spawn(relay::run_relay(
        pool.clone(),
        client.clone(),
        Duration::from_secs(600),
    ));
    // Let the relay find the outbox empty and start listening.
    tokio::time::sleep(Duration::from_millis(500)).await;
    write_noop(&pool, tenant.id).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if queue.counts(Some(tenant.id)).await.unwrap().ready == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the committed row was not relayed: the notification did not wake the relay"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    running.abort();
}
