//! The outreach fakes' events, over real HTTP to a local receiver: signed like herald's
//! sequence webhook checks, delayed, duplicated and shuffled as planned, retried when the
//! receiver fails, and made on demand (replies).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use herald_fakes::email::{self, EmailFakeConfig};
use herald_fakes::linkedin::{self, LinkedinFakeConfig};
use herald_fakes::outreach::{Limit, WebhookPlan, WebhookTarget};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

const SECRET: &str = "whsec-test";

#[derive(Clone, Default)]
struct Received {
    events: Arc<Mutex<Vec<Value>>>,
    requests: Arc<Mutex<u32>>,
    /// The first this many requests answer 500.
    fail_first: u32,
}

fn valid(body: &[u8], header: Option<&str>) -> bool {
    let Some(hex_sig) = header.and_then(|h| h.strip_prefix("sha256=")) else {
        return false;
    };
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(body);
    mac.verify_slice(&hex::decode(hex_sig).unwrap_or_default())
        .is_ok()
}

async fn receive(State(r): State<Received>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let n = {
        let mut requests = r.requests.lock().unwrap();
        *requests += 1;
        *requests
    };
    if n <= r.fail_first {
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    let signature = headers
        .get("x-herald-signature")
        .and_then(|v| v.to_str().ok());
    if !valid(&body, signature) {
        return StatusCode::UNAUTHORIZED;
    }
    let value: Value = serde_json::from_slice(&body).unwrap();
    r.events
        .lock()
        .unwrap()
        .extend(value["events"].as_array().unwrap().iter().cloned());
    StatusCode::OK
}

async fn receiver(fail_first: u32) -> (String, Received) {
    let received = Received {
        fail_first,
        ..Received::default()
    };
    let app = Router::new()
        .route("/v1/webhooks/sequences/{tenant}", post(receive))
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/v1/webhooks/sequences/t1"), received)
}

async fn send_email(base: &str, to: &str, send_id: &str) -> u16 {
    reqwest::Client::new()
        .post(format!("{base}/v1/send"))
        .bearer_auth("k")
        .json(
            &json!({"from": "sales@acme.test", "to": to, "subject": "Hi", "text": "Hello",
                      "custom_args": {"send_id": send_id}}),
        )
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn email_events_arrive_signed_duplicated_and_after_failures() {
    let (url, received) = receiver(2).await;
    let fake = email::spawn(EmailFakeConfig {
        rate: Limit::unlimited(),
        open_rate: 1.0,
        click_rate: 1.0,
        webhook: Some(WebhookTarget {
            url,
            secret: SECRET.into(),
        }),
        plan: WebhookPlan {
            delay: Duration::ZERO..=Duration::from_millis(30),
            duplicate: 1.0,
            shuffle: true,
            batch: 3,
        },
        ..EmailFakeConfig::default()
    })
    .await
    .unwrap();
    for i in 0..5 {
        assert_eq!(
            send_email(
                &fake.base_url(),
                &format!("p{i}@example.test"),
                &format!("s{i}")
            )
            .await,
            202
        );
    }
    assert_eq!(
        send_email(&fake.base_url(), "x@bounce.test", "s9").await,
        202
    );
    assert!(
        fake.settle(Duration::from_secs(20)).await,
        "events were not delivered"
    );

    let events = received.events.lock().unwrap().clone();
    // Five emails delivered, opened and clicked, one bounced: every event twice.
    assert_eq!(events.len(), (5 * 3 + 1) * 2);
    for i in 0..5 {
        for kind in ["delivered", "opened", "clicked"] {
            let copies = events
                .iter()
                .filter(|e| e["send_id"] == format!("s{i}") && e["event"] == kind)
                .count();
            assert_eq!(copies, 2, "s{i} {kind}");
        }
    }
    let bounce = events
        .iter()
        .find(|e| e["send_id"] == "s9")
        .expect("the bounce");
    assert_eq!(bounce["event"], "bounced");
    assert!(bounce["reason"].as_str().unwrap().starts_with("550"));
    assert!(bounce["at"].as_str().is_some());
    let stats = fake.stats();
    assert_eq!(stats.events_dropped, 0);
    assert_eq!(stats.events_delivered, events.len() as u64);

    // Replies on demand, only about accepted emails.
    assert!(fake.reply("s3"));
    assert!(!fake.reply("never-sent"));
    assert!(fake.settle(Duration::from_secs(20)).await);
    let replies = received
        .events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == "replied")
        .count();
    assert_eq!(replies, 2);
}

#[tokio::test]
async fn accepted_invitations_come_back_as_connected_and_the_demo_can_ask_for_replies() {
    let (url, received) = receiver(0).await;
    let fake = linkedin::spawn(LinkedinFakeConfig {
        accept_rate: 1.0,
        webhook: Some(WebhookTarget {
            url,
            secret: SECRET.into(),
        }),
        ..LinkedinFakeConfig::default()
    })
    .await
    .unwrap();
    let http = reqwest::Client::new();
    let answer: Value = http
        .post(format!("{}/v1/accounts/sales-1/actions", fake.base_url()))
        .bearer_auth("k")
        .json(&json!({"type": "connect", "profile_url": "https://www.linkedin.com/in/ann", "send_id": "s1"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["object"], "Action");
    let emitted = http
        .post(format!("{}/__fake/events", fake.base_url()))
        .json(&json!({"send_id": "s1", "event": "replied"}))
        .send()
        .await
        .unwrap();
    assert_eq!(emitted.status().as_u16(), 202);
    assert!(fake.settle(Duration::from_secs(20)).await);
    let kinds: Vec<String> = received
        .events
        .lock()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(kinds, vec!["connected", "replied"]);
    let actions: Value = http
        .get(format!("{}/__fake/actions", fake.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(actions[0]["send_id"], "s1");
    assert_eq!(actions[0]["kind"], "connect");
}
