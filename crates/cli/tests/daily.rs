//! The built `herald` binary's daily VA assignment commands against a fresh database per test:
//! profile import (and a file that is not CSV), seeding, assign (with `--wait` ending in a
//! summary or a failure exit code), campaigns, cleanup.

use std::io::Write as _;
use std::process::{Command, Output};

use herald_core::TenantId;
use herald_store::PgPool;
use uuid::Uuid;

struct Env {
    database_url: String,
    dir: std::path::PathBuf,
}

/// The URL of the database `pool` is connected to (the one `#[sqlx::test]` made), and a scratch
/// directory for files.
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
    let dir = std::env::temp_dir().join(format!("herald-cli-daily-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    Env {
        database_url: format!("{server}/{name}"),
        dir,
    }
}

impl Env {
    fn file(&self, name: &str, contents: &[u8]) -> String {
        let path = self.dir.join(name);
        let mut file = std::fs::File::create(&path).unwrap();
        file.write_all(contents).unwrap();
        path.to_string_lossy().into_owned()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn herald(env: &Env, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(args)
        .env("DATABASE_URL", &env.database_url)
        .env_remove("HERALD_TENANT")
        .output()
        .expect("run herald")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
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

/// Fails with exit code ≠ 0 and, last on stderr, one line `herald: error: …` mentioning
/// `needle`.
fn assert_fails_with(out: &Output, needle: &str) {
    assert!(!out.status.success(), "should fail: {}", stdout(out));
    let err = stderr(out);
    let last = err.trim_end().lines().last().unwrap_or_default();
    assert!(last.starts_with("herald: error: "), "{err:?}");
    assert!(last.contains(needle), "{err:?} should mention {needle:?}");
}

async fn new_tenant(pool: &PgPool) -> (TenantId, String) {
    let (tenant, _) = herald_store::tenants::create(pool, "acme", "UTC")
        .await
        .unwrap();
    (tenant.id, tenant.id.to_string())
}

async fn profiles(pool: &PgPool, tenant: TenantId) -> Vec<String> {
    sqlx::query_scalar("select username from profiles where tenant_id = $1 order by username")
        .bind(tenant.0)
        .fetch_all(pool)
        .await
        .unwrap()
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn import_reports_bad_rows_and_refuses_a_file_that_is_not_csv(pool: PgPool) {
    let env = env_for(&pool).await;
    let (tenant, tenant_arg) = new_tenant(&pool).await;
    let csv = env.file(
        "pool.csv",
        b"username,full_name\nalice,Alice\n,No name\nbob,Bob\nalice,Again\n",
    );
    let out = herald(&env, &["profiles", "import", &csv, "--tenant", &tenant_arg]);
    assert_ok(&out);
    let text = stdout(&out);
    assert!(
        text.contains("2 inserted, 1 duplicates, 1 rejected"),
        "{text}"
    );
    assert!(text.contains("line 3: username is missing"), "{text}");
    assert!(
        text.contains("pool: 2 profiles, 2 unused, 0 used"),
        "{text}"
    );
    assert_eq!(profiles(&pool, tenant).await, ["alice", "bob"]);

    let json = env.file(
        "more.json",
        br#"{"profiles": [{"username": "carol", "full_name": "Carol"}]}"#,
    );
    assert_ok(&herald(
        &env,
        &["profiles", "import", &json, "--tenant", &tenant_arg],
    ));
    assert_eq!(profiles(&pool, tenant).await, ["alice", "bob", "carol"]);

    // Not CSV at all: refused whole, exit 1, nothing written.
    let png = env.file("photo.csv", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x01");
    let out = herald(&env, &["profiles", "import", &png, "--tenant", &tenant_arg]);
    assert_fails_with(&out, "is refused");
    assert_eq!(out.status.code(), Some(1));
    let headless = env.file("names.csv", b"name\nzed\n");
    assert_fails_with(
        &herald(
            &env,
            &["profiles", "import", &headless, "--tenant", &tenant_arg],
        ),
        "username",
    );
    let missing = env.dir.join("absent.csv").to_string_lossy().into_owned();
    assert_fails_with(
        &herald(
            &env,
            &["profiles", "import", &missing, "--tenant", &tenant_arg],
        ),
        "reading",
    );
    let stranger = Uuid::new_v4().to_string();
    assert_fails_with(
        &herald(&env, &["profiles", "import", &csv, "--tenant", &stranger]),
        "not found",
    );
    assert_eq!(profiles(&pool, tenant).await, ["alice", "bob", "carol"]);
}

#[sqlx::test(migrator = "herald_store::MIGRATOR")]
async fn seed_assign_campaigns_and_cleanup(pool: PgPool) {
    let env = env_for(&pool).await;
    let (tenant, tenant_arg) = new_tenant(&pool).await;

    let seeded = herald(&env, &["seed", "profiles", "30", "--tenant", &tenant_arg]);
    assert_ok(&seeded);
    assert!(
        stdout(&seeded).contains("30 inserted"),
        "{}",
        stdout(&seeded)
    );
    // Deterministic: the same numbers again are duplicates; --from continues.
    let again = herald(&env, &["seed", "profiles", "30", "--tenant", &tenant_arg]);
    assert!(stdout(&again).contains("0 inserted, 30 duplicates"));
    assert_ok(&herald(
        &env,
        &[
            "seed",
            "profiles",
            "5",
            "--from",
            "30",
            "--tenant",
            &tenant_arg,
        ],
    ));
    let names = profiles(&pool, tenant).await;
    assert_eq!(names.len(), 35);
    assert_eq!(names[0], "lead_000001");
    assert_eq!(names[34], "lead_000035");

    let assign = |extra: &[&str]| {
        let mut args = vec![
            "assign",
            "--tenant",
            &tenant_arg,
            "--date",
            "2026-04-01",
            "--target",
            "20",
            "--tables",
            "2",
            "--per-table",
            "10",
        ];
        args.extend_from_slice(extra);
        herald(&env, &args)
    };
    let first = assign(&[]);
    assert_ok(&first);
    assert!(
        stdout(&first).contains("started for 2026-04-01"),
        "{}",
        stdout(&first)
    );
    let second = assign(&[]);
    assert_ok(&second);
    assert!(
        stdout(&second).contains("already exists"),
        "{}",
        stdout(&second)
    );
    let (campaigns, selects): (i64, i64) = sqlx::query_as(
        "select (select count(*) from daily_campaigns where tenant_id = $1),
                (select count(*) from outbox where tenant_id = $1 and queue = 'daily_select')",
    )
    .bind(tenant.0)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((campaigns, selects), (1, 1));

    let bad_shape = herald(
        &env,
        &["assign", "--tenant", &tenant_arg, "--tables", "100"],
    );
    assert_fails_with(&bad_shape, "--tables");

    let listed = herald(&env, &["campaigns", "--tenant", &tenant_arg]);
    assert_ok(&listed);
    assert!(
        stdout(&listed).contains("2026-04-01"),
        "{}",
        stdout(&listed)
    );
    assert!(stdout(&listed).contains("selecting"));

    // --wait on a campaign that failed exits non-zero with the reason.
    sqlx::query(
        "update daily_campaigns set stage = 'failed', failed_stage = 'selecting',
                error = 'no unused profiles' where tenant_id = $1",
    )
    .bind(tenant.0)
    .execute(&pool)
    .await
    .unwrap();
    let failed = assign(&["--wait"]);
    assert_fails_with(&failed, "no unused profiles");
    assert!(
        stderr(&failed).contains("herald resume"),
        "{}",
        stderr(&failed)
    );

    // …and ends with a one-line summary on a complete one.
    sqlx::query(
        "update daily_campaigns set stage = 'complete', failed_stage = null, error = null,
                selected = 20, distributed = 20, synced = 20, completed_at = now()
         where tenant_id = $1",
    )
    .bind(tenant.0)
    .execute(&pool)
    .await
    .unwrap();
    let complete = assign(&["--wait"]);
    assert_ok(&complete);
    let summary = stdout(&complete);
    assert!(
        summary.contains("complete in") && summary.contains("20 profiles to 2 tables × 10"),
        "{summary}"
    );

    let cleanup = herald(
        &env,
        &["cleanup", "--tenant", &tenant_arg, "--date", "2026-04-09"],
    );
    assert_ok(&cleanup);
    let payload: serde_json::Value = sqlx::query_scalar(
        "select payload from outbox where tenant_id = $1 and queue = 'daily_cleanup'",
    )
    .bind(tenant.0)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(payload, serde_json::json!({"date": "2026-04-09"}));
}
