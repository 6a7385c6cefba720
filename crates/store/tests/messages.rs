//! The send step's bookkeeping in `messages`: recording an attempt locks the recipient's row
//! and nothing campaign-wide, so attempts of one campaign proceed side by side while two
//! attempts at one recipient never both begin.

use std::time::Duration;

use herald_core::TenantId;
use herald_store::messages::{self, Begin, CampaignStatus, RecipientRow};
use herald_store::{PgPool, sends, tenants};
use serde_json::json;
use uuid::Uuid;

/// A sending campaign of `n` recipients; returns the campaign and its recipients.
async fn sending_campaign(pool: &PgPool, tenant: TenantId, n: usize) -> (Uuid, Vec<Uuid>) {
    let template = messages::create_template(
        pool,
        tenant,
        "order_update",
        "en_US",
        &json!([{"type": "BODY", "text": "Order {{1}}"}]),
    )
    .await
    .unwrap();
    let rows = (0..n)
        .map(|i| RecipientRow {
            line: i as u64 + 2,
            recipient: Ok(messages::NewRecipient {
                country_code: "1".into(),
                phone: format!("1555{:07}", 100_000 + i),
                params: vec![format!("#{i}")],
            }),
        })
        .collect();
    let (campaign, _) = messages::create_campaign(pool, tenant, "launch", &template, rows)
        .await
        .unwrap();
    let mut tx = pool.begin().await.unwrap();
    let (_, recipients) = messages::start_sending(&mut tx, tenant, campaign.id, 50, 1)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    (campaign.id, recipients)
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn an_attempt_waits_only_for_its_own_recipient(pool: PgPool) {
    let tenant = tenants::create(&pool, "acme", "UTC").await.unwrap().0.id;
    let (campaign, recipients) = sending_campaign(&pool, tenant, 3).await;

    // Another attempt at the first recipient, not yet committed: it holds that row.
    let mut other = pool.begin().await.unwrap();
    let other_send = sends::begin(&mut other, tenant, messages::CHANNEL, "other-job")
        .await
        .unwrap();
    sqlx::query(
        "update message_recipients set send_id = $3 where tenant_id = $1 and id = $2
           and send_id is null",
    )
    .bind(tenant.0)
    .bind(recipients[0])
    .bind(other_send)
    .execute(&mut *other)
    .await
    .unwrap();

    // The campaign's concurrency is 1, yet attempts at the other recipients begin at once:
    // concurrency is counted by the send step's slots, and nothing here is campaign-wide.
    for (i, recipient) in recipients[1..].iter().enumerate() {
        let begun = tokio::time::timeout(
            Duration::from_secs(5),
            messages::begin_send(&pool, tenant, campaign, *recipient, &format!("job-{i}")),
        )
        .await
        .expect("an attempt at another recipient does not wait")
        .unwrap();
        assert!(matches!(begun, Begin::Started(_)), "{begun:?}");
    }

    // An attempt at the first recipient waits for the other one and then finds it taken.
    let pending = tokio::spawn({
        let pool = pool.clone();
        let recipient = recipients[0];
        async move { messages::begin_send(&pool, tenant, campaign, recipient, "late-job").await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!pending.is_finished(), "it waits for the recipient's row");
    other.commit().await.unwrap();
    assert_eq!(pending.await.unwrap().unwrap(), Begin::Taken);
    let attempting: i64 = sqlx::query_scalar(
        "select count(*) from sends where tenant_id = $1 and status = 'attempting'",
    )
    .bind(tenant.0)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        attempting, 3,
        "one send per recipient, the loser's rolled back"
    );
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn concurrent_attempts_at_one_recipient_begin_once(pool: PgPool) {
    let tenant = tenants::create(&pool, "acme", "UTC").await.unwrap().0.id;
    let (campaign, recipients) = sending_campaign(&pool, tenant, 1).await;
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let pool = pool.clone();
            let recipient = recipients[0];
            tokio::spawn(async move {
                messages::begin_send(&pool, tenant, campaign, recipient, &format!("job-{i}"))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut started = 0;
    for task in tasks {
        match task.await.unwrap() {
            Begin::Started(_) => started += 1,
            Begin::Taken => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(started, 1);
    let sends: i64 = sqlx::query_scalar("select count(*) from sends where tenant_id = $1")
        .bind(tenant.0)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(sends, 1);

    // A paused campaign begins nothing.
    let mut tx = pool.begin().await.unwrap();
    messages::pause(&mut tx, tenant, campaign).await.unwrap();
    tx.commit().await.unwrap();
    sqlx::query("update message_recipients set send_id = null where tenant_id = $1")
        .bind(tenant.0)
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(
        messages::begin_send(&pool, tenant, campaign, recipients[0], "job-paused")
            .await
            .unwrap(),
        Begin::NotSending(CampaignStatus::Paused)
    );
}
