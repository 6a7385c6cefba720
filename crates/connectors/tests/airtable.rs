//! The Airtable client against herald-fakes' Airtable fake over real HTTP.

use std::time::Duration;

use herald_connectors::airtable::{
    AirtableClient, AirtableConfig, Error, MAX_RECORDS_PER_REQUEST, RATE_LIMIT_LOCKOUT,
};
use herald_fakes::airtable::{self, AirtableFake, AirtableFakeConfig, FailPlan};
use secrecy::SecretString;
use serde_json::{Map, Value, json};

const BASE: &str = "appConnectorTest1";
const TOKEN: &str = "patConnectorTest";
const TABLE: &str = "Daily_Outreach_Table_01";

async fn start(config: AirtableFakeConfig) -> (AirtableFake, AirtableClient) {
    let fake = airtable::spawn(config).await.expect("spawn the fake");
    let client = client_for(&fake.base_url(), TOKEN);
    (fake, client)
}

fn client_for(api_url: &str, token: &str) -> AirtableClient {
    let config = AirtableConfig {
        api_url: api_url.to_owned(),
        timeout: Duration::from_secs(10),
        ..AirtableConfig::new(SecretString::from(token), BASE)
    };
    AirtableClient::new(reqwest::Client::new(), config)
}

fn profile(id: &str, position: u32) -> Map<String, Value> {
    let mut fields = Map::new();
    fields.insert("profile_id".into(), json!(id));
    fields.insert("username".into(), json!(format!("user_{id}")));
    fields.insert("position".into(), json!(position));
    fields
}

#[tokio::test]
async fn upsert_round_trip_creates_then_updates() {
    let (fake, client) = start(AirtableFakeConfig::unlimited()).await;
    let batch: Vec<_> = (0..10).map(|i| profile(&format!("p{i}"), i)).collect();

    let first = client.upsert(TABLE, &["profile_id"], &batch).await.unwrap();
    assert_eq!(first.created.len(), 10);
    assert!(first.updated.is_empty());
    assert_eq!(first.records.len(), 10);
    assert_eq!(first.records[3].1["profile_id"], json!("p3"));

    // Running the same job again (a retry after a crash) changes nothing but the values.
    let mut again = batch.clone();
    again[0].insert("username".into(), json!("renamed"));
    let second = client.upsert(TABLE, &["profile_id"], &again).await.unwrap();
    assert!(second.created.is_empty());
    let first_ids: Vec<String> = first.records.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(second.updated, first_ids);
    assert_eq!(second.records[0].1["username"], json!("renamed"));

    let stored = client.list_all(TABLE).await.unwrap();
    assert_eq!(stored.len(), 10);
    assert_eq!(fake.state().records(BASE, TABLE).len(), 10);

    // Empty batches cost no request.
    let before = fake.state().stats().totals.requests;
    assert_eq!(
        client.upsert(TABLE, &["profile_id"], &[]).await.unwrap(),
        Default::default()
    );
    assert!(client.delete(TABLE, &[]).await.unwrap().is_empty());
    assert_eq!(fake.state().stats().totals.requests, before);
}

#[tokio::test]
async fn list_all_follows_offsets_and_delete_removes() {
    let (fake, client) = start(AirtableFakeConfig::unlimited()).await;
    let seeded = fake.state().seed(
        BASE,
        "Table with spaces & #",
        (0..230).map(|i| profile(&format!("p{i}"), i)).collect(),
    );

    let page = client
        .list("Table with spaces & #", 50, None)
        .await
        .unwrap();
    assert_eq!(page.records.len(), 50);
    assert!(page.offset.is_some());

    let all = client.list_all("Table with spaces & #").await.unwrap();
    let ids: Vec<&str> = all.iter().map(|r| r.id.as_str()).collect();
    let expected: Vec<&str> = seeded.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, expected);
    assert_eq!(fake.state().stats().totals.requests, 1 + 3);

    let doomed: Vec<String> = expected[..10].iter().map(|id| (*id).to_owned()).collect();
    let deleted = client
        .delete("Table with spaces & #", &doomed)
        .await
        .unwrap();
    assert_eq!(deleted, doomed);
    assert_eq!(
        fake.state().records(BASE, "Table with spaces & #").len(),
        220
    );
}

#[tokio::test]
async fn eleven_records_are_refused_before_any_request() {
    let (fake, client) = start(AirtableFakeConfig::unlimited()).await;
    let batch: Vec<_> = (0..11).map(|i| profile(&format!("p{i}"), i)).collect();
    let err = client
        .upsert(TABLE, &["profile_id"], &batch)
        .await
        .unwrap_err();
    assert_eq!(
        err,
        Error::TooManyRecords {
            count: 11,
            max: MAX_RECORDS_PER_REQUEST
        }
    );
    assert!(!err.is_retryable());

    let ids: Vec<String> = (0..11).map(|i| format!("rec{i:014}")).collect();
    let err = client.delete(TABLE, &ids).await.unwrap_err();
    assert!(matches!(err, Error::TooManyRecords { count: 11, .. }));
    assert_eq!(fake.state().stats().totals.requests, 0);
}

#[tokio::test]
async fn validation_errors_map_to_permanent_rejections() {
    let (_fake, client) = start(AirtableFakeConfig {
        fields: Some(vec!["profile_id".into(), "username".into()]),
        numeric_fields: vec!["position".into()],
        ..AirtableFakeConfig::unlimited()
    })
    .await;

    let mut unknown = profile("p1", 1);
    unknown.insert("favourite_colour".into(), json!("blue"));
    let err = client
        .upsert(TABLE, &["profile_id"], &[unknown])
        .await
        .unwrap_err();
    match &err {
        Error::Rejected { status, kind, .. } => {
            assert_eq!(*status, 422);
            assert_eq!(kind, "UNKNOWN_FIELD_NAME");
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert!(!err.is_retryable());
    assert_eq!(err.retry_after(), None);

    let mut bad_value = profile("p1", 1);
    bad_value.insert("position".into(), json!("first"));
    let err = client
        .upsert(TABLE, &["profile_id"], &[bad_value])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Rejected { status: 422, kind, .. } if kind == "INVALID_VALUE_FOR_COLUMN"),
        "{err:?}"
    );
}

#[tokio::test]
async fn rate_limits_map_to_retryable_errors_with_airtables_lockout() {
    let (fake, client) = start(AirtableFakeConfig {
        per_base_rps: 2,
        lockout: Duration::from_secs(30),
        ..AirtableFakeConfig::default()
    })
    .await;
    let mut outcomes = Vec::new();
    for _ in 0..3 {
        outcomes.push(client.list(TABLE, 10, None).await);
    }
    assert!(outcomes[..2].iter().all(Result::is_ok));
    let err = outcomes.pop().unwrap().unwrap_err();
    assert_eq!(err, Error::RateLimited { retry_after: None });
    assert!(err.is_retryable());
    assert_eq!(err.retry_after(), Some(RATE_LIMIT_LOCKOUT));

    // Locked out: writes are refused the same way.
    let err = client
        .upsert(TABLE, &["profile_id"], &[profile("p1", 1)])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::RateLimited { .. }));
    assert_eq!(fake.state().stats().totals.lockouts, 1);
}

#[tokio::test]
async fn server_errors_are_retryable() {
    let (fake, client) = start(AirtableFakeConfig::unlimited()).await;
    fake.state()
        .set_fail_plan(FailPlan::server_error_burst(BASE, 1, 503))
        .unwrap();
    let err = client
        .upsert(TABLE, &["profile_id"], &[profile("p1", 1)])
        .await
        .unwrap_err();
    assert_eq!(err, Error::Server { status: 503 });
    assert!(err.is_retryable());
    assert_eq!(err.retry_after(), None);

    // The retry succeeds and nothing was written twice.
    let done = client
        .upsert(TABLE, &["profile_id"], &[profile("p1", 1)])
        .await
        .unwrap();
    assert_eq!(done.created.len(), 1);
    assert_eq!(fake.state().records(BASE, TABLE).len(), 1);
}

#[tokio::test]
async fn bad_tokens_and_missing_tables_are_permanent() {
    let (fake, client) = start(AirtableFakeConfig {
        tokens: vec![TOKEN.into()],
        tables: Some(vec![TABLE.into()]),
        ..AirtableFakeConfig::unlimited()
    })
    .await;
    let stranger = client_for(&fake.base_url(), "patSomeoneElse");
    let err = stranger.list(TABLE, 10, None).await.unwrap_err();
    assert_eq!(err, Error::Unauthorized);
    assert!(!err.is_retryable());

    let err = client.list_all("No_Such_Table").await.unwrap_err();
    assert_eq!(err, Error::NotFound);
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn an_unreachable_api_is_a_retryable_transport_error() {
    // Bind then free a port so nothing listens on it.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let client = client_for(&format!("http://127.0.0.1:{port}"), TOKEN);
    let err = client.list(TABLE, 10, None).await.unwrap_err();
    assert!(matches!(err, Error::Transport(_)), "{err:?}");
    assert!(err.is_retryable());
}
