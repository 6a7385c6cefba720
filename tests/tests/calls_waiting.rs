//! Why a queued call waits, as the call views show it (`GET /v1/call-campaigns/{id}/calls`,
//! `GET /v1/calls/{id}`): herald-api's router in this process over a fresh database, calls put
//! in each situation directly in Postgres (no worker runs, so nothing moves under the test), and
//! windows placed relative to the real current time.

mod calls_common;

use calls_common::{get_json, open_window, spawn_api};
use chrono::{DateTime, NaiveTime, Timelike, Utc};
use herald_core::TenantId;
use herald_store::calls::{self as store, FleetWaitRecord, NewCampaign, NewContact};
use herald_tests::{RedisServer, TestDb, namespace};
use serde_json::{Map, Value};
use uuid::Uuid;

struct World {
    db: TestDb,
    tenant: TenantId,
    token: String,
    agent: Uuid,
    api: std::net::SocketAddr,
    _redis: RedisServer,
}

impl World {
    async fn user(&self, limit: u32) -> Uuid {
        store::create_user(&self.db.pool, self.tenant, "user", Some(limit))
            .await
            .unwrap()
            .id
    }

    /// A campaign of `n` contacts (the odd ones named) with the window and start date given.
    async fn campaign(
        &self,
        user: Uuid,
        first_phone: u64,
        n: u64,
        window: (NaiveTime, NaiveTime),
        start_in_days: i64,
    ) -> Uuid {
        let contacts: Vec<NewContact> = (0..n)
            .map(|i| {
                NewContact::new(
                    &format!("+1555{:07}", first_phone + i),
                    (i % 2 == 1).then_some("Named"),
                    Map::new(),
                )
                .unwrap()
            })
            .collect();
        let mut conn = self.db.pool.acquire().await.unwrap();
        let ids = store::upsert_contacts(&mut conn, self.tenant, &contacts)
            .await
            .unwrap();
        let campaign = NewCampaign {
            name: "waiting".into(),
            user_id: user,
            agent_id: self.agent,
            next_action: None,
            first_call_time: window.0,
            last_call_time: window.1,
            time_zone: "UTC".into(),
            start_date: Utc::now().date_naive() + chrono::Duration::days(start_in_days),
        };
        store::create_campaign(&mut conn, self.tenant, &campaign, &ids)
            .await
            .unwrap()
            .0
            .id
    }

    async fn calls(&self, campaign: Uuid, query: &str) -> Value {
        let (status, page) = get_json(
            self.api,
            &format!("/v1/call-campaigns/{campaign}/calls{query}"),
            &self.token,
        )
        .await;
        assert_eq!(status, 200, "{page}");
        page
    }

    async fn reasons(&self, campaign: Uuid) -> Vec<Value> {
        self.calls(campaign, "?state=queued").await["calls"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["waiting"].clone())
            .collect()
    }

    /// Puts the campaign's first `n` queued calls in progress, as dispatch would.
    async fn dial(&self, campaign: Uuid, n: i64) {
        sqlx::query(
            "update calls set state = 'dialing', attempts = 1, dialed_at = now()
             where tenant_id = $1 and id in (
                 select id from calls where tenant_id = $1 and campaign_id = $2
                   and state = 'queued' order by priority, seq limit $3)",
        )
        .bind(self.tenant.0)
        .bind(campaign)
        .bind(n)
        .execute(&self.db.pool)
        .await
        .unwrap();
    }

    async fn system_limit(&self, limit: u32) {
        store::put_voice_provider(
            &self.db.pool,
            self.tenant,
            "http://127.0.0.1:9",
            "key",
            "webhook-secret",
            Some(limit),
        )
        .await
        .unwrap();
    }
}

async fn world() -> World {
    let redis = RedisServer::start();
    let db = TestDb::create().await;
    let (tenant, token) = herald_store::tenants::create(&db.pool, "waiting", "UTC")
        .await
        .unwrap();
    let api = spawn_api(&db, &redis.url(), &namespace()).await;
    let agent = store::create_agent(&db.pool, tenant.id, "Ava", "asst", "phone")
        .await
        .unwrap()
        .id;
    let world = World {
        db,
        tenant: tenant.id,
        token,
        agent,
        api,
        _redis: redis,
    };
    world.system_limit(3).await;
    world
}

/// A window that opens at the next whole hour plus one, for an hour: closed now.
fn closed_window() -> (NaiveTime, NaiveTime) {
    let hour =
        |delta: u32| NaiveTime::from_hms_opt((Utc::now().hour() + delta) % 24, 0, 0).unwrap();
    (hour(2), hour(3))
}

fn instant(value: &Value) -> DateTime<Utc> {
    value
        .as_str()
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|at| at.with_timezone(&Utc))
        .unwrap_or_else(|| panic!("not an instant: {value}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_queued_call_says_why_it_waits() {
    let w = world().await;
    let busy = w.user(2).await;
    let other = w.user(5).await;

    // Nothing in progress: the user's calls wait their turn, named ones first.
    let open = w.campaign(busy, 0, 4, open_window(), -1).await;
    let page = w.calls(open, "").await;
    let calls = page["calls"].as_array().unwrap();
    assert_eq!(calls.len(), 4);
    let named: Vec<bool> = calls.iter().map(|c| !c["name"].is_null()).collect();
    assert_eq!(
        named,
        [true, true, false, false],
        "dispatch order: named first"
    );
    let ahead: Vec<&Value> = calls.iter().map(|c| &c["waiting"]["ahead"]).collect();
    assert_eq!(ahead, [0, 1, 2, 3]);
    assert!(
        calls
            .iter()
            .all(|c| c["waiting"]["reason"] == "waiting_turn")
    );

    // Two in progress: the user is at its limit; calls in progress wait for nothing.
    w.dial(open, 2).await;
    let page = w.calls(open, "").await;
    for call in page["calls"].as_array().unwrap() {
        if call["state"] == "queued" {
            assert_eq!(call["waiting"]["reason"], "user_limit", "{call}");
            assert_eq!(
                (
                    call["waiting"]["in_use"].as_u64(),
                    call["waiting"]["limit"].as_u64()
                ),
                (Some(2), Some(2))
            );
        } else {
            assert!(call["waiting"].is_null(), "{call}");
        }
    }

    // Another user, with room, behind the tenant's system limit of 3.
    let second = w.campaign(other, 100, 3, open_window(), -1).await;
    w.dial(second, 1).await;
    for waiting in w.reasons(second).await {
        assert_eq!(waiting["reason"], "system_limit", "{waiting}");
        assert_eq!(
            (waiting["in_use"].as_u64(), waiting["limit"].as_u64()),
            (Some(3), Some(3))
        );
    }
    // The user's limit comes first.
    assert_eq!(w.reasons(open).await[0]["reason"], "user_limit");

    // Room in the account, but the tenant's last dispatch was refused by the fleet cap.
    w.system_limit(10).await;
    let mut conn = w.db.pool.acquire().await.unwrap();
    store::record_fleet_wait(
        &mut conn,
        w.tenant,
        Some(FleetWaitRecord {
            fleet_limit: 6,
            share: 3,
            held: 3,
        }),
    )
    .await
    .unwrap();
    let fleet = &w.reasons(second).await[0];
    assert_eq!(fleet["reason"], "fleet_limit", "{fleet}");
    assert_eq!(
        (
            fleet["limit"].as_u64(),
            fleet["share"].as_u64(),
            fleet["held"].as_u64()
        ),
        (Some(6), Some(3), Some(3))
    );
    store::record_fleet_wait(&mut conn, w.tenant, None)
        .await
        .unwrap();
    drop(conn);
    let turn = &w.reasons(second).await[0];
    assert_eq!(
        (turn["reason"].as_str(), turn["ahead"].as_u64()),
        (Some("waiting_turn"), Some(0))
    );

    // Closed window, future start date, paused campaign: each says so, with the opening.
    let now = Utc::now();
    let closed = w.campaign(other, 200, 1, closed_window(), -1).await;
    let waiting = &w.reasons(closed).await[0];
    assert_eq!(waiting["reason"], "outside_window", "{waiting}");
    let opens = instant(&waiting["opens_at"]);
    assert!(
        opens > now && opens <= now + chrono::Duration::hours(3),
        "{opens}"
    );
    let future = w.campaign(other, 300, 1, open_window(), 2).await;
    let waiting = &w.reasons(future).await[0];
    assert_eq!(waiting["reason"], "start_date_in_future", "{waiting}");
    assert!(instant(&waiting["opens_at"]) > now + chrono::Duration::days(1));
    store::pause_campaign(&w.db.pool, w.tenant, second, "paused by request")
        .await
        .unwrap();
    let waiting = &w.reasons(second).await[0];
    assert_eq!(
        (waiting["reason"].as_str(), waiting["pause_reason"].as_str()),
        (Some("campaign_paused"), Some("paused by request"))
    );

    // One call, through its own route.
    let id = w.calls(open, "?state=queued").await["calls"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, one) = get_json(w.api, &format!("/v1/calls/{id}"), &w.token).await;
    assert_eq!(status, 200, "{one}");
    assert_eq!(one["call"]["waiting"]["reason"], "user_limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn call_pages_follow_the_cursor_and_refuse_bad_queries() {
    let w = world().await;
    let user = w.user(2).await;
    let campaign = w.campaign(user, 0, 5, open_window(), -1).await;
    let first = w.calls(campaign, "?limit=2").await;
    let cursor = first["next_cursor"].as_str().unwrap().to_owned();
    let second = w
        .calls(campaign, &format!("?limit=2&cursor={cursor}"))
        .await;
    let third = w
        .calls(
            campaign,
            &format!(
                "?limit=2&cursor={}",
                second["next_cursor"].as_str().unwrap()
            ),
        )
        .await;
    let ids: Vec<String> = [&first, &second, &third]
        .iter()
        .flat_map(|page| page["calls"].as_array().unwrap().clone())
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 5);
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 5, "no call on two pages");
    assert!(third["next_cursor"].is_null());
    for bad in ["?limit=0", "?limit=501", "?cursor=x", "?state=ringing"] {
        let (status, body) = get_json(
            w.api,
            &format!("/v1/call-campaigns/{campaign}/calls{bad}"),
            &w.token,
        )
        .await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
    // Another tenant sees neither the campaign nor its calls.
    let (_, other_token) = herald_store::tenants::create(&w.db.pool, "other", "UTC")
        .await
        .unwrap();
    let (status, _) = get_json(
        w.api,
        &format!("/v1/call-campaigns/{campaign}/calls"),
        &other_token,
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = get_json(w.api, &format!("/v1/calls/{}", ids[0]), &other_token).await;
    assert_eq!(status, 404);
}
