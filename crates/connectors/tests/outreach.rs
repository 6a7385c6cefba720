//! The email, LinkedIn and Instagram clients against herald-fakes' providers over real HTTP:
//! each answer maps to the error that carries the right retry decision.

use std::time::Duration;

use herald_connectors::email::{Email, EmailClient};
use herald_connectors::instagram::{self, InstagramClient};
use herald_connectors::linkedin::{self, CODE_INVITATION_LIMIT, LinkedinClient};
use herald_connectors::rest::{Account, Error};
use herald_fakes::email::{self as email_fake, EmailFakeConfig};
use herald_fakes::instagram::{self as instagram_fake, InstagramFakeConfig};
use herald_fakes::linkedin::{self as linkedin_fake, LinkedinFakeConfig};
use herald_fakes::outreach::{Fault, Limit, ProviderFake};
use secrecy::SecretString;

const KEY: &str = "key-1";

fn account(fake: &ProviderFake) -> Account {
    Account {
        api_url: fake.base_url(),
        api_key: SecretString::from(KEY),
    }
}

fn email(to: &str, subject: Option<&str>, send_id: &str) -> Email {
    Email {
        from: "sales@acme.test".into(),
        to: to.into(),
        subject: subject.map(str::to_owned),
        text: "Hello".into(),
        send_id: send_id.into(),
    }
}

/// A local URL nothing listens on.
async fn closed_url() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

#[tokio::test]
async fn email_sends_once_and_maps_every_refusal() {
    let fake = email_fake::spawn(EmailFakeConfig {
        rate: Limit::per_second(2),
        api_keys: vec![KEY.into()],
        ..EmailFakeConfig::default()
    })
    .await
    .unwrap();
    let client = EmailClient::new(reqwest::Client::new(), Duration::from_secs(5));
    let account = account(&fake);

    let id = client
        .send(&account, &email("ann@example.test", Some("Hi"), "s1"))
        .await
        .unwrap();
    assert!(id.starts_with("em_"), "{id}");
    // A follow-up (no subject) continues the thread.
    client
        .send(&account, &email("ann@example.test", None, "s2"))
        .await
        .unwrap();
    // The third within the second is over the key's rate: a throttle with the wait, not sent.
    let throttled = client
        .send(&account, &email("bob@example.test", Some("Hi"), "s3"))
        .await
        .unwrap_err();
    assert!(
        matches!(&throttled, Error::Throttled { code, wait } if code == "rate_limited" && *wait >= Duration::from_secs(1)),
        "{throttled:?}"
    );
    assert_eq!(fake.state().count("s3"), 0);
    fake.state().advance(Duration::from_secs(2));

    let no_thread = client
        .send(&account, &email("carl@example.test", None, "s4"))
        .await
        .unwrap_err();
    assert!(
        matches!(&no_thread, Error::Refused { status: 400, code, .. } if code == "missing_subject"),
        "{no_thread:?}"
    );
    let bad_key = Account {
        api_key: SecretString::from("wrong"),
        ..account.clone()
    };
    assert!(matches!(
        client
            .send(&bad_key, &email("ann@example.test", Some("Hi"), "s5"))
            .await,
        Err(Error::Unauthorized { .. })
    ));

    // A bounced address is suppressed: the next email to it is refused for good.
    client
        .send(&account, &email("dan@bounce.test", Some("Hi"), "s6"))
        .await
        .unwrap();
    fake.state().advance(Duration::from_secs(2));
    let suppressed = client
        .send(&account, &email("dan@bounce.test", Some("Again"), "s7"))
        .await
        .unwrap_err();
    assert!(
        matches!(&suppressed, Error::Refused { status: 422, code, .. } if code == "recipient_suppressed"),
        "{suppressed:?}"
    );

    fake.state().inject([Fault::ServerError]);
    assert_eq!(
        client
            .send(&account, &email("eve@example.test", Some("Hi"), "s8"))
            .await,
        Err(Error::Server { status: 500 })
    );
    let counts = fake.counts();
    assert_eq!(counts.get("s1"), Some(&1));
    assert_eq!(counts.get("s2"), Some(&1));
    assert_eq!(counts.get("s6"), Some(&1));
    assert_eq!(fake.stats().accepted, 3);
}

#[tokio::test]
async fn an_answer_lost_after_sending_is_ambiguous_and_no_connection_is_not_sent() {
    let fake = email_fake::spawn(EmailFakeConfig::default()).await.unwrap();
    let client = EmailClient::new(reqwest::Client::new(), Duration::from_millis(300));
    fake.state()
        .inject([Fault::AcceptThenStall(Duration::from_secs(3))]);
    let lost = client
        .send(
            &account(&fake),
            &email("ann@example.test", Some("Hi"), "s1"),
        )
        .await
        .unwrap_err();
    assert!(matches!(lost, Error::Ambiguous(_)), "{lost:?}");
    // It was sent: sending again would send twice.
    assert_eq!(fake.state().count("s1"), 1);

    let nowhere = Account {
        api_url: closed_url().await,
        api_key: SecretString::from(KEY),
    };
    let unreachable = client
        .send(&nowhere, &email("ann@example.test", Some("Hi"), "s2"))
        .await
        .unwrap_err();
    assert!(matches!(unreachable, Error::NotSent(_)), "{unreachable:?}");
}

fn connect(account: &str, i: usize) -> linkedin::Action {
    linkedin::Action {
        account: account.into(),
        action: linkedin::ActionType::Connect,
        profile_url: format!("https://www.linkedin.com/in/p{i}"),
        text: Some("Hi".into()),
        send_id: format!("s{i}"),
    }
}

#[tokio::test]
async fn linkedin_invitation_limits_are_throttles_until_the_reset() {
    let fake = linkedin_fake::spawn(LinkedinFakeConfig {
        rate: Limit::unlimited(),
        invitations_per_day: 2,
        invitations_per_week: 3,
        accounts: vec!["sales team".into()],
        ..LinkedinFakeConfig::default()
    })
    .await
    .unwrap();
    // Monday 20:00 UTC on the fake's clock: the daily limit resets in four hours.
    fake.state()
        .advance_to("2030-01-07T20:00:00Z".parse().unwrap());
    let client = LinkedinClient::new(reqwest::Client::new(), Duration::from_secs(5));
    let account = account(&fake);
    for i in 0..2 {
        let id = client
            .act(&account, &connect("sales team", i))
            .await
            .unwrap();
        assert!(id.starts_with("li_"), "{id}");
    }
    let daily = client
        .act(&account, &connect("sales team", 2))
        .await
        .unwrap_err();
    match &daily {
        Error::Throttled { code, wait } => {
            assert_eq!(code, CODE_INVITATION_LIMIT);
            assert!(
                *wait > Duration::from_secs(3 * 3600) && *wait <= Duration::from_secs(4 * 3600),
                "{wait:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    // The next day: one more, then the rolling week is full until Monday's first ages out.
    fake.state()
        .advance_to("2030-01-08T09:00:00Z".parse().unwrap());
    client
        .act(&account, &connect("sales team", 3))
        .await
        .unwrap();
    let weekly = client
        .act(&account, &connect("sales team", 4))
        .await
        .unwrap_err();
    assert!(
        matches!(&weekly, Error::Throttled { wait, .. } if *wait > Duration::from_secs(6 * 86_400)),
        "{weekly:?}"
    );

    // Refusals: the same profile again, an unknown account, a note over 300 characters.
    let again = client
        .act(&account, &connect("sales team", 0))
        .await
        .unwrap_err();
    assert!(
        matches!(&again, Error::Refused { status: 422, code, .. } if code == "already_invited"),
        "{again:?}"
    );
    let unknown = client
        .act(&account, &connect("other", 9))
        .await
        .unwrap_err();
    assert!(
        matches!(&unknown, Error::Refused { status: 404, code, .. } if code == "account_not_found"),
        "{unknown:?}"
    );
    let visit = linkedin::Action {
        action: linkedin::ActionType::Message,
        text: Some("x".repeat(400)),
        ..connect("sales team", 5)
    };
    client.act(&account, &visit).await.unwrap();
    let long_note = linkedin::Action {
        text: Some("x".repeat(301)),
        ..connect("sales team", 6)
    };
    fake.state()
        .advance_to("2030-01-20T09:00:00Z".parse().unwrap());
    assert!(matches!(
        client.act(&account, &long_note).await,
        Err(Error::Refused { code, .. }) if code == "note_too_long"
    ));
    let stats = fake.stats();
    assert_eq!(stats.errors_of(CODE_INVITATION_LIMIT), 2);
    assert_eq!(stats.accepted, 4);
    assert_eq!(fake.actions()[0].account, "sales team");
}

#[tokio::test]
async fn instagram_rate_limits_are_throttles_and_bad_handles_refusals() {
    let fake = instagram_fake::spawn(InstagramFakeConfig {
        rate: Limit::per_hour(2),
        api_keys: vec![KEY.into()],
        ..InstagramFakeConfig::default()
    })
    .await
    .unwrap();
    let client = InstagramClient::new(reqwest::Client::new(), Duration::from_secs(5));
    let account = account(&fake);
    let dm = |handle: &str, send_id: &str| instagram::Action {
        account: "brand".into(),
        action: instagram::ActionType::Dm,
        handle: handle.into(),
        text: Some("Hi!".into()),
        send_id: send_id.into(),
    };
    client.act(&account, &dm("@ann", "s1")).await.unwrap();
    client.act(&account, &dm("bob", "s2")).await.unwrap();
    let limited = client.act(&account, &dm("carl", "s3")).await.unwrap_err();
    assert!(
        matches!(&limited, Error::Throttled { code, wait } if code == "rate_limited" && *wait > Duration::from_secs(3500)),
        "{limited:?}"
    );
    let bad = client
        .act(&account, &dm("not a handle!", "s4"))
        .await
        .unwrap_err();
    assert!(matches!(bad, Error::Refused { status: 400, .. }), "{bad:?}");
    assert_eq!(fake.actions()[0].target, "ann");
    assert_eq!(fake.stats().accepted, 2);
}
