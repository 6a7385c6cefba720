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

/// Claiming reads the context and begins the send in one statement, only while the campaign
/// still has the number, rate and concurrency the step was admitted under; concurrent claims of
/// one recipient begin once; a paused campaign is never claimed.
#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn a_claim_begins_a_send_only_on_the_expected_sender(pool: PgPool) {
    let tenant = tenants::create(&pool, "acme", "UTC").await.unwrap().0.id;
    messages::put_settings(
        &pool,
        tenant,
        &messages::WhatsAppSettings {
            api_url: None,
            token: "token".into(),
            phone_number_id: "106540352242922".into(),
            app_secret: "secret".into(),
            verify_token: "verify".into(),
        },
    )
    .await
    .unwrap();
    let (campaign, recipients) = sending_campaign(&pool, tenant, 3).await;
    let expected = messages::Expected {
        phone_number_id: "106540352242922",
        rate_per_sec: 50,
        concurrency: 1,
    };

    // Another number, rate or concurrency: the context, and no send.
    for stale in [
        messages::Expected {
            phone_number_id: "999",
            ..expected
        },
        messages::Expected {
            rate_per_sec: 80,
            ..expected
        },
        messages::Expected {
            concurrency: 5,
            ..expected
        },
    ] {
        let (ctx, started) =
            messages::claim_send(&pool, tenant, campaign, recipients[0], "job-0", stale)
                .await
                .unwrap();
        assert_eq!(started, None, "{stale:?}");
        assert!(ctx.send.is_none());
        assert_eq!(ctx.params, vec!["#0".to_owned()]);
    }

    // The expected sender: begun, by this job, as attempting.
    let (ctx, started) =
        messages::claim_send(&pool, tenant, campaign, recipients[0], "job-0", expected)
            .await
            .unwrap();
    let send_id = started.expect("begun");
    assert_eq!(ctx.phone, "15550100000");
    let send = sends::get(&pool, tenant, send_id).await.unwrap().unwrap();
    assert_eq!(
        (send.job_id.as_str(), send.status),
        ("job-0", sends::SendStatus::Attempting)
    );
    // Claimed again (a re-delivery): the context shows the send, nothing new begins.
    let (ctx, started) =
        messages::claim_send(&pool, tenant, campaign, recipients[0], "job-0", expected)
            .await
            .unwrap();
    assert_eq!(started, None);
    assert_eq!(ctx.send.map(|s| s.id), Some(send_id));

    // Eight jobs claim one recipient at once: one begins.
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let pool = pool.clone();
            let recipient = recipients[1];
            tokio::spawn(async move {
                let expected = messages::Expected {
                    phone_number_id: "106540352242922",
                    rate_per_sec: 50,
                    concurrency: 1,
                };
                messages::claim_send(
                    &pool,
                    tenant,
                    campaign,
                    recipient,
                    &format!("job-{i}"),
                    expected,
                )
                .await
                .unwrap()
                .1
            })
        })
        .collect();
    let mut begun = 0;
    for task in tasks {
        begun += usize::from(task.await.unwrap().is_some());
    }
    assert_eq!(begun, 1);

    // Another campaign's id: not found. A paused campaign: nothing begins.
    assert!(
        messages::claim_send(
            &pool,
            tenant,
            Uuid::now_v7(),
            recipients[2],
            "job-x",
            expected
        )
        .await
        .is_err()
    );
    let mut tx = pool.begin().await.unwrap();
    messages::pause(&mut tx, tenant, campaign).await.unwrap();
    tx.commit().await.unwrap();
    let (ctx, started) =
        messages::claim_send(&pool, tenant, campaign, recipients[2], "job-2", expected)
            .await
            .unwrap();
    assert_eq!(
        (ctx.campaign_status, started),
        (CampaignStatus::Paused, None)
    );
    let sends: i64 = sqlx::query_scalar("select count(*) from sends where tenant_id = $1")
        .bind(tenant.0)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(sends, 2);
}
