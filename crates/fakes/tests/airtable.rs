//! The Airtable fake over real HTTP, checked against Airtable's documented behaviour.

use std::time::Duration;

use herald_fakes::airtable::{self, AirtableFake, AirtableFakeConfig, FailPlan};
use reqwest::{Method, StatusCode};
use serde_json::{Map, Value, json};

const BASE: &str = "appTestBase000001";
const TOKEN: &str = "patTestToken";

struct Fake {
    fake: AirtableFake,
    http: reqwest::Client,
}

impl Fake {
    async fn start(config: AirtableFakeConfig) -> Self {
        Self {
            fake: airtable::spawn(config).await.expect("spawn the fake"),
            http: reqwest::Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.fake.base_url())
    }

    fn table_url(&self, table: &str) -> String {
        self.url(&format!("/v0/{BASE}/{table}"))
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> (StatusCode, Value) {
        let response = request.send().await.expect("request reaches the fake");
        let status = response.status();
        let body = response.bytes().await.expect("response body");
        let value = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body).expect("JSON body")
        };
        (status, value)
    }

    async fn call(&self, method: Method, url: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut request = self.http.request(method, url).bearer_auth(TOKEN);
        if let Some(body) = body {
            request = request.json(&body);
        }
        self.send(request).await
    }

    async fn upsert(&self, table: &str, records: Value) -> (StatusCode, Value) {
        let body = json!({
            "performUpsert": {"fieldsToMergeOn": ["profile_id"]},
            "records": records,
        });
        self.call(Method::PATCH, &self.table_url(table), Some(body))
            .await
    }
}

fn error_type(body: &Value) -> &str {
    body["error"]["type"].as_str().unwrap_or_default()
}

fn ids(values: &Value) -> Vec<String> {
    values
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|id| id.as_str().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn upsert_creates_then_updates_the_same_record() {
    let fake = Fake::start(AirtableFakeConfig::unlimited()).await;

    let (status, first) = fake
        .upsert(
            "Daily_Outreach_Table_01",
            json!([{"fields": {"profile_id": "p1", "username": "alice"}}]),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let created = ids(&first["createdRecords"]);
    assert_eq!(created.len(), 1);
    assert!(ids(&first["updatedRecords"]).is_empty());
    let record_id = first["records"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(created[0], record_id);
    assert!(record_id.starts_with("rec"));
    assert!(first["records"][0]["createdTime"].is_string());

    let (status, second) = fake
        .upsert(
            "Daily_Outreach_Table_01",
            json!([
                {"fields": {"profile_id": "p1", "username": "alice2"}},
                {"fields": {"profile_id": "p2", "username": "bob"}},
            ]),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{second}");
    assert_eq!(ids(&second["updatedRecords"]), vec![record_id.clone()]);
    assert_eq!(ids(&second["createdRecords"]).len(), 1);
    assert_eq!(second["records"][0]["id"], json!(record_id));
    assert_eq!(second["records"][0]["fields"]["username"], json!("alice2"));

    let stored = fake.fake.state().records(BASE, "Daily_Outreach_Table_01");
    assert_eq!(stored.len(), 2);
}

#[tokio::test]
async fn more_than_ten_records_is_refused_for_every_write() {
    let fake = Fake::start(AirtableFakeConfig::unlimited()).await;
    let eleven: Vec<Value> = (0..11)
        .map(|i| json!({"fields": {"profile_id": format!("p{i}")}}))
        .collect();

    let (status, body) = fake.upsert("T", json!(eleven)).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(error_type(&body), "INVALID_REQUEST_BODY");
    assert!(body["error"]["message"].is_string());

    let (status, body) = fake
        .call(
            Method::POST,
            &fake.table_url("T"),
            Some(json!({"records": eleven})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(error_type(&body), "INVALID_REQUEST_BODY");

    let query: Vec<(&str, String)> = (0..11)
        .map(|i| ("records[]", format!("rec{i:014}")))
        .collect();
    let request = fake
        .http
        .delete(fake.table_url("T"))
        .bearer_auth(TOKEN)
        .query(&query);
    let (status, body) = fake.send(request).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(error_type(&body), "INVALID_REQUEST_BODY");

    assert!(fake.fake.state().records(BASE, "T").is_empty());
}

#[tokio::test]
async fn unknown_fields_and_bad_values_are_refused() {
    let fake = Fake::start(AirtableFakeConfig {
        fields: Some(vec!["profile_id".into(), "username".into()]),
        numeric_fields: vec!["position".into()],
        ..AirtableFakeConfig::unlimited()
    })
    .await;

    let (status, body) = fake
        .upsert("T", json!([{"fields": {"profile_id": "p1", "nope": "x"}}]))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(error_type(&body), "UNKNOWN_FIELD_NAME");

    let (status, body) = fake
        .upsert(
            "T",
            json!([{"fields": {"profile_id": "p1", "position": "first"}}]),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(error_type(&body), "INVALID_VALUE_FOR_COLUMN");

    let (status, body) = fake
        .upsert(
            "T",
            json!([{"fields": {"profile_id": "p1", "username": {"a": 1}}}]),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(error_type(&body), "INVALID_VALUE_FOR_COLUMN");

    // typecast turns a numeric string into a number.
    let body = json!({
        "performUpsert": {"fieldsToMergeOn": ["profile_id"]},
        "records": [{"fields": {"profile_id": "p1", "position": "7"}}],
        "typecast": true,
    });
    let (status, body) = fake
        .call(Method::PATCH, &fake.table_url("T"), Some(body))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["records"][0]["fields"]["position"], json!(7));

    let request = fake
        .http
        .post(fake.table_url("T"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body("{\"records\": [");
    let (status, body) = fake.send(request).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(error_type(&body), "INVALID_REQUEST_BODY");
}

#[tokio::test]
async fn overflowing_the_base_limit_locks_the_base_out() {
    let lockout = Duration::from_millis(300);
    let fake = Fake::start(AirtableFakeConfig {
        per_base_rps: 5,
        lockout,
        ..AirtableFakeConfig::default()
    })
    .await;
    let url = fake.table_url("T");

    let mut statuses = Vec::new();
    let mut limited = None;
    for _ in 0..6 {
        let response = fake.http.get(&url).bearer_auth(TOKEN).send().await.unwrap();
        statuses.push(response.status());
        if response.status() == StatusCode::TOO_MANY_REQUESTS && limited.is_none() {
            assert!(response.headers().get("retry-after").is_none());
            limited = Some(response.json::<Value>().await.unwrap());
        }
    }
    assert!(
        statuses.contains(&StatusCode::TOO_MANY_REQUESTS),
        "{statuses:?}"
    );
    let limited = limited.unwrap();
    assert_eq!(limited["errors"][0]["error"], json!("RATE_LIMIT_REACHED"));
    assert_eq!(
        limited["errors"][0]["message"],
        json!("Rate limit exceeded. Please try again later")
    );

    // Within the lock-out every request is refused, even on another table of the base.
    for _ in 0..3 {
        let (status, _) = fake.call(Method::GET, &fake.table_url("Other"), None).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    }

    // A different base is unaffected.
    let (status, _) = fake
        .call(Method::GET, &fake.url("/v0/appOtherBase/T"), None)
        .await;
    assert_eq!(status, StatusCode::OK);

    // After the lock-out (and once the window has slid past the burst) the base recovers.
    tokio::time::sleep(lockout + Duration::from_millis(1100)).await;
    let (status, _) = fake.call(Method::GET, &url, None).await;
    assert_eq!(status, StatusCode::OK);

    let stats = fake.fake.state().stats();
    let base = &stats.per_base[BASE];
    assert_eq!(base.counters.lockouts, 1);
    assert!(base.counters.rate_limited >= 4, "{base:?}");
    assert!(stats.max_observed_rps_per_base[BASE] >= 6);

    // The same numbers over HTTP.
    let (status, body) = fake
        .call(Method::GET, &fake.url("/__fake/stats"), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["per_base"][BASE]["lockouts"], json!(1));
    assert!(body["rate_limited"].as_u64().unwrap() >= 4);
    assert!(body["max_observed_rps_per_base"][BASE].as_u64().unwrap() >= 6);
}

#[tokio::test]
async fn the_token_limit_spans_bases() {
    let fake = Fake::start(AirtableFakeConfig {
        per_base_rps: 0,
        per_token_rps: 3,
        lockout: Duration::from_millis(200),
        ..AirtableFakeConfig::default()
    })
    .await;
    let mut statuses = Vec::new();
    for i in 0..4 {
        let url = fake.url(&format!("/v0/appBase{i}/T"));
        statuses.push(fake.call(Method::GET, &url, None).await.0);
    }
    assert_eq!(statuses[..3], [StatusCode::OK; 3]);
    assert_eq!(statuses[3], StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(fake.fake.state().stats().token_lockouts, 1);
}

#[tokio::test]
async fn pages_return_every_record_once() {
    let fake = Fake::start(AirtableFakeConfig::unlimited()).await;
    let seeded = fake.fake.state().seed(
        BASE,
        "T",
        (0..250)
            .map(|i| {
                let mut fields = Map::new();
                fields.insert("n".into(), json!(i));
                fields
            })
            .collect(),
    );
    assert_eq!(seeded.len(), 250);

    let mut seen = Vec::new();
    let mut sizes = Vec::new();
    let mut offset: Option<String> = None;
    loop {
        let mut query = vec![("pageSize", "100".to_owned())];
        if let Some(offset) = &offset {
            query.push(("offset", offset.clone()));
        }
        let request = fake
            .http
            .get(fake.table_url("T"))
            .bearer_auth(TOKEN)
            .query(&query);
        let (status, page) = fake.send(request).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let records = page["records"].as_array().unwrap();
        sizes.push(records.len());
        seen.extend(records.iter().map(|r| r["id"].as_str().unwrap().to_owned()));
        match page["offset"].as_str() {
            Some(next) => offset = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(sizes, vec![100, 100, 50]);
    let expected: Vec<String> = seeded.into_iter().map(|r| r.id).collect();
    assert_eq!(seen, expected);

    let request = fake
        .http
        .get(fake.table_url("T"))
        .bearer_auth(TOKEN)
        .query(&[("pageSize", "101")]);
    let (status, _) = fake.send(request).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn delete_removes_the_named_records() {
    let fake = Fake::start(AirtableFakeConfig::unlimited()).await;
    let (status, created) = fake
        .call(
            Method::POST,
            &fake.table_url("My Table"),
            Some(json!({"records": [
                {"fields": {"n": 1}}, {"fields": {"n": 2}}, {"fields": {"n": 3}}
            ]})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{created}");
    let created: Vec<String> = created["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect();

    let request = fake
        .http
        .delete(fake.table_url("My%20Table"))
        .bearer_auth(TOKEN)
        .query(&[("records[]", &created[0]), ("records[]", &created[2])]);
    let (status, body) = fake.send(request).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({"records": [
            {"id": created[0], "deleted": true},
            {"id": created[2], "deleted": true},
        ]})
    );
    let left = fake.fake.state().records(BASE, "My Table");
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].id, created[1]);

    // Deleting a record that is gone changes nothing and says which.
    let request = fake
        .http
        .delete(fake.table_url("My%20Table"))
        .bearer_auth(TOKEN)
        .query(&[("records[]", &created[0]), ("records[]", &created[1])]);
    let (status, body) = fake.send(request).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(error_type(&body), "ROW_DOES_NOT_EXIST");
    assert_eq!(fake.fake.state().records(BASE, "My Table").len(), 1);
}

#[tokio::test]
async fn requests_without_a_valid_token_are_refused() {
    let fake = Fake::start(AirtableFakeConfig {
        tokens: vec![TOKEN.into()],
        ..AirtableFakeConfig::unlimited()
    })
    .await;
    let (status, body) = fake.send(fake.http.get(fake.table_url("T"))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_type(&body), "AUTHENTICATION_REQUIRED");

    let request = fake.http.get(fake.table_url("T")).bearer_auth("patWrong");
    let (status, body) = fake.send(request).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_type(&body), "AUTHENTICATION_REQUIRED");

    let (status, _) = fake.call(Method::GET, &fake.table_url("T"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(fake.fake.state().stats().totals.unauthorized, 2);
}

#[tokio::test]
async fn a_fixed_table_list_makes_other_tables_not_found() {
    let fake = Fake::start(AirtableFakeConfig {
        tables: Some(vec!["Known".into()]),
        ..AirtableFakeConfig::unlimited()
    })
    .await;
    let (status, body) = fake
        .upsert("Unknown", json!([{"fields": {"profile_id": "p1"}}]))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_type(&body), "NOT_FOUND");
    let (status, _) = fake
        .upsert("Known", json!([{"fields": {"profile_id": "p1"}}]))
        .await;
    assert_eq!(status, StatusCode::OK);

    let (_, tables) = fake
        .call(
            Method::GET,
            &fake.url(&format!("/__fake/bases/{BASE}/tables")),
            None,
        )
        .await;
    assert_eq!(tables, json!({"tables": [{"name": "Known", "records": 1}]}));
}

#[tokio::test]
async fn fault_plans_inject_bursts_then_stop() {
    let fake = Fake::start(AirtableFakeConfig::unlimited()).await;
    let plan = json!({"base": BASE, "server_error_burst": 2, "server_error_status": 500, "rate_limit_burst": 1});
    let (status, body) = fake
        .call(Method::POST, &fake.url("/__fake/faults"), Some(plan))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(fake.call(Method::GET, &fake.table_url("T"), None).await.0);
    }
    assert_eq!(
        statuses,
        [
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::INTERNAL_SERVER_ERROR,
            StatusCode::INTERNAL_SERVER_ERROR,
            StatusCode::OK
        ]
    );
    let stats = fake.fake.state().stats();
    assert_eq!(stats.totals.errors_5xx, 2);
    assert_eq!(stats.totals.injected, 3);
    assert_eq!(stats.totals.lockouts, 0);

    // The Rust handle does the same without HTTP, and a bad plan is refused.
    let state = fake.fake.state();
    state
        .set_fail_plan(FailPlan::server_error_burst(BASE, 1, 503))
        .unwrap();
    let (status, _) = fake.call(Method::GET, &fake.table_url("T"), None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        state
            .set_fail_plan(FailPlan::server_error_burst(BASE, 1, 418))
            .is_err()
    );
    let (status, _) = fake
        .call(
            Method::POST,
            &fake.url("/__fake/faults"),
            Some(json!({"server_error_status": 200})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn inspection_routes_show_records_and_reset_clears_them() {
    let fake = Fake::start(AirtableFakeConfig::unlimited()).await;
    fake.upsert("A", json!([{"fields": {"profile_id": "p1"}}]))
        .await;
    fake.upsert(
        "B",
        json!([{"fields": {"profile_id": "p1"}}, {"fields": {"profile_id": "p2"}}]),
    )
    .await;

    let (_, tables) = fake
        .call(
            Method::GET,
            &fake.url(&format!("/__fake/bases/{BASE}/tables")),
            None,
        )
        .await;
    assert_eq!(
        tables,
        json!({"tables": [{"name": "A", "records": 1}, {"name": "B", "records": 2}]})
    );
    let (_, records) = fake
        .call(
            Method::GET,
            &fake.url(&format!("/__fake/bases/{BASE}/tables/B/records")),
            None,
        )
        .await;
    assert_eq!(records["records"].as_array().unwrap().len(), 2);

    let (status, _) = fake
        .call(Method::POST, &fake.url("/__fake/reset"), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(fake.fake.state().tables(BASE).is_empty());
    assert_eq!(fake.fake.state().stats().totals.requests, 0);
}

#[tokio::test]
async fn the_binary_announces_its_address_and_stops_on_sigterm() {
    use tokio::io::{AsyncBufReadExt, BufReader};

    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald-fake-airtable"))
        .args([
            "--addr",
            "127.0.0.1:0",
            "--token",
            TOKEN,
            "--lockout-secs",
            "0.5",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start the binary");
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(30),
        BufReader::new(stdout).read_line(&mut line),
    )
    .await
    .expect("the binary prints its address")
    .unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .expect("first line is `listening on URL`")
        .to_owned();

    let http = reqwest::Client::new();
    let response = http
        .get(format!("{url}/v0/{BASE}/T"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    let pid = child.id().expect("the binary is running").to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("the binary exits on SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}");
}
