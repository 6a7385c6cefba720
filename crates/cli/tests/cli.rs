//! The built `herald` binary against a fresh database per test and a random Redis namespace.

use std::process::{Command, Output};

use herald_core::{JobId, QueueName};
use herald_queue::{Client, QueueSettings, RedisTarget};
use herald_store::PgPool;
use herald_store::tenants::Principal;

struct Env {
    database_url: String,
    redis_url: String,
    namespace: String,
}

/// The URL of the database `pool` is connected to (the one `#[sqlx::test]` made).
async fn env_for(pool: &PgPool) -> Env {
    let name: String = sqlx::query_scalar("select current_database()")
        .fetch_one(pool)
        .await
        .unwrap();
    let base = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/postgres".into());
    let (server, _) = base
        .rsplit_once('/')
        .expect("DATABASE_URL names a database");
    Env {
        database_url: format!("{server}/{name}"),
        redis_url: std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
        namespace: format!("test-cli-{}", uuid::Uuid::new_v4().simple()),
    }
}

fn herald(env: &Env, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(args)
        .env("DATABASE_URL", &env.database_url)
        .env("REDIS_URL", &env.redis_url)
        .env("HERALD_NAMESPACE", &env.namespace)
        .output()
        .expect("run herald")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn last_line(out: &Output) -> String {
    stdout(out).lines().last().unwrap_or_default().to_owned()
}

fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status,
        stdout(out),
        stderr(out)
    );
}

/// Fails with exit code ≠ 0 and exactly one line on stderr, `herald: error: …`.
fn assert_fails_with(out: &Output, needle: &str) {
    assert!(!out.status.success(), "should fail: {}", stdout(out));
    let err = stderr(out);
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err:?}");
    assert!(err.starts_with("herald: error: "), "{err:?}");
    assert!(err.contains(needle), "{err:?} should mention {needle:?}");
}

#[sqlx::test(migrations = false)]
async fn migrate_create_a_tenant_and_enqueue(pool: PgPool) {
    let env = env_for(&pool).await;
    let migrated = herald(&env, &["migrate"]);
    assert_ok(&migrated);
    let applied: i64 = sqlx::query_scalar("select count(*) from _sqlx_migrations")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(applied as usize, herald_store::MIGRATOR.iter().count());
    // Running it again is harmless.
    assert_ok(&herald(&env, &["migrate"]));

    let created = herald(&env, &["tenant", "create", "acme"]);
    assert_ok(&created);
    let token = last_line(&created);
    assert!(token.starts_with("hrd_"), "{token}");
    let Some(Principal::Tenant(tenant)) = herald_store::tenants::authenticate(&pool, &token)
        .await
        .unwrap()
    else {
        panic!("the printed token authenticates as a tenant")
    };
    let tenant_arg = tenant.to_string();

    let ops = herald(&env, &["ops-token", "create"]);
    assert_ok(&ops);
    assert_eq!(
        herald_store::tenants::authenticate(&pool, &last_line(&ops))
            .await
            .unwrap(),
        Some(Principal::Ops)
    );

    assert_ok(&herald(
        &env,
        &["tenant", "allow-host", &tenant_arg, "Hooks.Example.com"],
    ));
    assert_eq!(
        herald_store::tenants::allowed_hosts(&pool, tenant)
            .await
            .unwrap(),
        vec!["hooks.example.com"]
    );

    let enqueue = |key: &str| {
        herald(
            &env,
            &[
                "enqueue",
                "probe",
                r#"{"effect_key": "cli-1"}"#,
                "--tenant",
                &tenant_arg,
                "--key",
                key,
                "--priority",
                "high",
            ],
        )
    };
    let first = enqueue("k1");
    assert_ok(&first);
    let id: JobId = last_line(&first)
        .trim_start_matches("enqueued job ")
        .parse()
        .unwrap();
    let queues = Client::connect(
        RedisTarget::parse(&env.redis_url).unwrap(),
        QueueSettings {
            namespace: env.namespace.clone(),
            ..QueueSettings::default()
        },
    )
    .await
    .unwrap();
    let probe = queues.queue(&"probe".parse::<QueueName>().unwrap());
    let info = probe.job(&id).await.unwrap().expect("job in redis");
    assert_eq!(info.tenant, tenant);
    let again = enqueue("k1");
    assert_ok(&again);
    assert_eq!(last_line(&again), format!("duplicate of job {id}"));

    let durable = herald(
        &env,
        &[
            "enqueue",
            "probe",
            r#"{"effect_key": "cli-2"}"#,
            "--tenant",
            &tenant_arg,
            "--durable",
        ],
    );
    assert_ok(&durable);
    let rows: i64 = sqlx::query_scalar("select count(*) from outbox where tenant_id = $1")
        .bind(tenant.0)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 1);

    let listed = herald(&env, &["queues", "--tenant", &tenant_arg]);
    assert_ok(&listed);
    let probe_line = stdout(&listed)
        .lines()
        .find(|l| l.starts_with("probe "))
        .map(str::to_owned)
        .expect("probe listed");
    assert_eq!(
        probe_line.split_whitespace().nth(1),
        Some("1"),
        "{probe_line}"
    );

    let dead = herald(&env, &["dead", "list", "probe"]);
    assert_ok(&dead);
    assert_eq!(last_line(&dead), "no dead jobs");
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn failures_exit_non_zero_with_one_line(pool: PgPool) {
    let env = env_for(&pool).await;
    let tenant = herald_core::TenantId::new().to_string();

    assert_fails_with(&herald(&env, &["enqueue"]), "--tenant");
    assert_fails_with(&herald(&env, &["frobnicate"]), "frobnicate");
    assert_fails_with(
        &herald(&env, &["enqueue", "nope", "{}", "--tenant", &tenant]),
        "unknown queue",
    );
    assert_fails_with(
        &herald(&env, &["enqueue", "probe", "not json", "--tenant", &tenant]),
        "not valid JSON",
    );
    assert_fails_with(
        &herald(
            &env,
            &[
                "enqueue",
                "probe",
                r#"{"effect_key": 1}"#,
                "--tenant",
                &tenant,
            ],
        ),
        "payload",
    );
    assert_fails_with(
        &herald(&env, &["enqueue", "probe", "{}", "--tenant", "not-a-uuid"]),
        "not-a-uuid",
    );
    assert_fails_with(
        &herald(&env, &["tenant", "allow-host", &tenant, "example.com"]),
        "not found",
    );
    assert_fails_with(
        &herald(
            &env,
            &["dead", "retry", "probe", &JobId::generate().to_string()],
        ),
        "no dead job",
    );
    let unreachable = Env {
        database_url: "postgres://root@127.0.0.1:1/herald".into(),
        ..env_for(&pool).await
    };
    assert_fails_with(
        &herald(&unreachable, &["tenant", "create", "x"]),
        "Postgres",
    );

    let help = herald(&env, &["dead", "--help"]);
    assert_ok(&help);
    assert!(stdout(&help).contains("retry"));
}
