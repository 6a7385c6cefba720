//! `herald`: the operator's command-line tool. It talks to Postgres and Redis directly, through
//! `herald-store` and `herald-queue` (and the API's enqueue validation, so a job the CLI accepts
//! is one the API would accept). Every failure ends with one line, `herald: error: …`, and a
//! non-zero exit code.

mod daily;
mod outreach;

use std::process::ExitCode;

use anyhow::{Context, anyhow, bail};
use clap::{Args, Parser, Subcommand};
use herald_api::enqueue::{self, JobRequest};
use herald_core::{JobId, Priority, QueueName, TenantId};
use herald_queue::{Client, QueueSettings, RedisTarget};
use herald_store::PgPool;

#[derive(Debug, Parser)]
#[command(
    name = "herald",
    version,
    about = "herald's operator tool: migrations, tenants, tokens, enqueueing, queues and dead jobs, profiles and the daily VA assignment, WhatsApp templates and message campaigns, sequences, call campaigns."
)]
struct Cli {
    #[command(flatten)]
    conn: Connections,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct Connections {
    /// Postgres URL.
    #[arg(
        long,
        global = true,
        env = "DATABASE_URL",
        default_value = "postgres://root@127.0.0.1:5432/herald",
        hide_env_values = true
    )]
    database_url: String,
    /// Redis URL (`redis+cluster://a,b,c` for a cluster).
    #[arg(
        long,
        global = true,
        env = "REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    redis_url: String,
    /// Key namespace in Redis (the one the API and workers use).
    #[arg(
        long,
        global = true,
        env = "HERALD_NAMESPACE",
        default_value = "herald"
    )]
    namespace: String,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the database if missing and apply pending migrations.
    Migrate,
    /// Manage tenants.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Manage ops tokens (cross-tenant access).
    #[command(subcommand, name = "ops-token")]
    OpsToken(OpsTokenCommand),
    /// Enqueue one job, validated as the API would.
    Enqueue(EnqueueArgs),
    /// List queues with their counts and whether they are paused.
    Queues {
        /// Count only this tenant's jobs.
        #[arg(long)]
        tenant: Option<TenantId>,
    },
    /// List, retry or discard dead jobs.
    #[command(subcommand)]
    Dead(DeadCommand),
    /// The tenant's pool of profiles for the daily VA assignment: import, stats.
    #[command(subcommand)]
    Profiles(daily::ProfilesCommand),
    /// Generate data for demos and trials.
    #[command(subcommand)]
    Seed(daily::SeedCommand),
    /// Start the day's VA assignment (one campaign per tenant and day); `--wait` follows it.
    Assign(daily::AssignArgs),
    /// List daily campaigns, newest first (every tenant's without --tenant).
    Campaigns {
        #[arg(long, env = "HERALD_TENANT")]
        tenant: Option<TenantId>,
        /// Most campaigns per tenant.
        #[arg(long, default_value_t = 20)]
        limit: i64,
    },
    /// Resume a failed campaign from the stage that failed.
    Resume {
        campaign: herald_store::daily::CampaignId,
        #[arg(long, env = "HERALD_TENANT")]
        tenant: TenantId,
        /// Follow the campaign to the end, as `assign --wait` does.
        #[arg(long)]
        wait: bool,
    },
    /// WhatsApp templates: list them, print one's sample CSV.
    #[command(subcommand)]
    Templates(outreach::TemplatesCommand),
    /// WhatsApp message campaigns: list, show (counts by status), pause, resume, stop, and the
    /// failed recipients as CSV.
    #[command(subcommand, name = "message-campaigns")]
    MessageCampaigns(outreach::MessageCampaignsCommand),
    /// Sequences: list, show (per-step counts), and one lead's state and history.
    #[command(subcommand)]
    Sequences(outreach::SequencesCommand),
    /// Call campaigns: list, show (calls by state).
    #[command(subcommand, name = "call-campaigns")]
    CallCampaigns(outreach::CallCampaignsCommand),
    /// A call campaign's calls.
    #[command(subcommand)]
    Calls(outreach::CallsCommand),
    /// Run the rolling 7-day cleanup for a tenant now (7-day-old assignments are marked
    /// unfollow, older ones deleted, in Postgres and Airtable); the workers carry it out.
    Cleanup {
        #[arg(long, env = "HERALD_TENANT")]
        tenant: TenantId,
        /// Clean up as of this day (YYYY-MM-DD); default today in the tenant's time zone.
        #[arg(long)]
        date: Option<chrono::NaiveDate>,
    },
}

#[derive(Debug, Subcommand)]
enum TenantCommand {
    /// Create a tenant; prints its id, then its API token as the last line (shown once).
    Create {
        name: String,
        /// The tenant's IANA time zone.
        #[arg(long, default_value = "UTC")]
        time_zone: String,
    },
    /// Allow the tenant's `http` jobs to call HOST.
    AllowHost { tenant: TenantId, host: String },
}

#[derive(Debug, Subcommand)]
enum OpsTokenCommand {
    /// Issue an ops token; prints it as the last line (shown once).
    Create,
}

#[derive(Debug, Args)]
struct EnqueueArgs {
    /// The queue (one per job type).
    queue: String,
    /// The payload, as JSON.
    payload: String,
    /// The tenant the job belongs to.
    #[arg(long)]
    tenant: TenantId,
    /// De-duplication key.
    #[arg(long)]
    key: Option<String>,
    /// Run after this many milliseconds.
    #[arg(long)]
    delay_ms: Option<u64>,
    /// high, normal or low.
    #[arg(long, default_value = "normal")]
    priority: Priority,
    /// Override the job type's attempt budget.
    #[arg(long)]
    max_attempts: Option<u32>,
    /// Write the job to the Postgres outbox first (survives Redis data loss).
    #[arg(long)]
    durable: bool,
}

#[derive(Debug, Subcommand)]
enum DeadCommand {
    /// List dead jobs, newest first.
    List {
        queue: String,
        /// Only this tenant's jobs.
        #[arg(long)]
        tenant: Option<TenantId>,
        #[arg(long, default_value_t = 0)]
        offset: usize,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Put a dead job back in the queue with a fresh attempt budget.
    Retry {
        queue: String,
        id: JobId,
        /// Act only if the job is this tenant's.
        #[arg(long)]
        tenant: Option<TenantId>,
    },
    /// Delete a dead job.
    Discard {
        queue: String,
        id: JobId,
        /// Act only if the job is this tenant's.
        #[arg(long)]
        tenant: Option<TenantId>,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // clap's message spans lines (the missing arguments, then usage); keep the part
            // before the first blank line, on one line.
            let text = e.to_string();
            let reason = text
                .lines()
                .take_while(|line| !line.trim().is_empty())
                .map(str::trim)
                .collect::<Vec<_>>()
                .join(" ");
            let reason = reason.trim_start_matches("error: ");
            eprintln!("herald: error: {reason} (see herald --help)");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("herald: error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let reason = format!("{e:#}").replace('\n', " ");
            eprintln!("herald: error: {reason}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let conn = &cli.conn;
    match cli.command {
        Command::Migrate => {
            herald_store::ensure_database(&conn.database_url)
                .await
                .context("creating the database")?;
            let pool = postgres(conn).await?;
            herald_store::migrate(&pool)
                .await
                .context("applying migrations")?;
            println!("migrations applied");
        }
        Command::Tenant(TenantCommand::Create { name, time_zone }) => {
            let pool = postgres(conn).await?;
            let (tenant, token) = herald_store::tenants::create(&pool, &name, &time_zone)
                .await
                .context("creating the tenant")?;
            println!("tenant {} created ({})", tenant.id, tenant.name);
            println!("{token}");
        }
        Command::Tenant(TenantCommand::AllowHost { tenant, host }) => {
            let pool = postgres(conn).await?;
            herald_store::tenants::allow_host(&pool, tenant, &host)
                .await
                .context("allowing the host")?;
            let hosts = herald_store::tenants::allowed_hosts(&pool, tenant).await?;
            println!("tenant {tenant} may call: {}", hosts.join(", "));
        }
        Command::OpsToken(OpsTokenCommand::Create) => {
            let pool = postgres(conn).await?;
            let token = herald_store::ops_tokens::create(&pool)
                .await
                .context("creating the ops token")?;
            println!("ops token created");
            println!("{token}");
        }
        Command::Enqueue(args) => enqueue_one(conn, args).await?,
        Command::Queues { tenant } => {
            let queues = redis(conn).await?;
            println!(
                "{:<16} {:>8} {:>8} {:>8} {:>8} {:>10}  paused",
                "queue", "ready", "delayed", "running", "dead", "completed"
            );
            for job_type in herald_jobs::job_types() {
                let queue = queues.queue(&queue_name(job_type.queue)?);
                let counts = queue.counts(tenant).await?;
                let paused = queue.is_paused().await?;
                println!(
                    "{:<16} {:>8} {:>8} {:>8} {:>8} {:>10}  {}",
                    job_type.queue,
                    counts.ready,
                    counts.delayed,
                    counts.running,
                    counts.dead,
                    counts.completed,
                    if paused { "yes" } else { "no" }
                );
            }
        }
        Command::Dead(command) => dead(conn, command).await?,
        Command::Profiles(command) => {
            daily::profiles_command(&postgres(conn).await?, command).await?
        }
        Command::Seed(command) => daily::seed_command(&postgres(conn).await?, command).await?,
        Command::Assign(args) => daily::assign(&postgres(conn).await?, args).await?,
        Command::Campaigns { tenant, limit } => {
            daily::campaigns(&postgres(conn).await?, tenant, limit.clamp(1, 500)).await?
        }
        Command::Resume {
            campaign,
            tenant,
            wait,
        } => daily::resume(&postgres(conn).await?, tenant, campaign, wait).await?,
        Command::Templates(command) => outreach::templates(&postgres(conn).await?, command).await?,
        Command::MessageCampaigns(command) => {
            outreach::message_campaigns(&postgres(conn).await?, command).await?
        }
        Command::Sequences(command) => {
            outreach::sequences_command(&postgres(conn).await?, command).await?
        }
        Command::CallCampaigns(command) => {
            outreach::call_campaigns(&postgres(conn).await?, command).await?
        }
        Command::Calls(command) => outreach::calls_command(&postgres(conn).await?, command).await?,
        Command::Cleanup { tenant, date } => {
            daily::cleanup(&postgres(conn).await?, tenant, date).await?
        }
    }
    Ok(())
}

async fn postgres(conn: &Connections) -> anyhow::Result<PgPool> {
    herald_store::connect(&conn.database_url, 2)
        .await
        .context("connecting to Postgres")
}

async fn redis(conn: &Connections) -> anyhow::Result<Client> {
    let target = RedisTarget::parse(&conn.redis_url).context("REDIS_URL")?;
    Client::connect(
        target,
        QueueSettings {
            namespace: conn.namespace.clone(),
            ..QueueSettings::default()
        },
    )
    .await
    .context("connecting to Redis")
}

/// A queue herald knows; anything else is refused before touching Redis.
fn queue_name(name: &str) -> anyhow::Result<QueueName> {
    if herald_jobs::job_type(name).is_none() {
        let known: Vec<&str> = herald_jobs::job_types().iter().map(|t| t.queue).collect();
        bail!("unknown queue {name:?}; known queues: {}", known.join(", "));
    }
    name.parse().map_err(|e: herald_core::IdError| anyhow!(e))
}

async fn enqueue_one(conn: &Connections, args: EnqueueArgs) -> anyhow::Result<()> {
    queue_name(&args.queue)?;
    let job_type = enqueue::public_job_type(&args.queue)
        .ok_or_else(|| anyhow!("queue {:?} takes no jobs from outside", args.queue))?;
    let payload: serde_json::Value =
        serde_json::from_str(&args.payload).context("the payload is not valid JSON")?;
    let request = JobRequest {
        key: args.key,
        delay_ms: args.delay_ms,
        priority: args.priority,
        max_attempts: args.max_attempts,
        durable: args.durable,
        ..JobRequest::new(payload)
    };
    let pool = postgres(conn).await?;
    let queues = redis(conn).await?;
    queues
        .check_backpressure()
        .await
        .context("Redis refuses new work")?;
    let answers = enqueue::enqueue(&pool, &queues, args.tenant, job_type, vec![request], |_| {
        String::new()
    })
    .await
    .map_err(|e| match e {
        enqueue::Error::Store(herald_store::Error::NotFound { what }) => {
            anyhow!("{what} not found")
        }
        other => anyhow!(other),
    })?;
    let answer = answers
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("enqueue returned no answer"))?;
    if answer.duplicate {
        println!("duplicate of job {}", answer.id);
    } else {
        println!("enqueued job {}", answer.id);
    }
    Ok(())
}

async fn dead(conn: &Connections, command: DeadCommand) -> anyhow::Result<()> {
    let queues = redis(conn).await?;
    match command {
        DeadCommand::List {
            queue,
            tenant,
            offset,
            limit,
        } => {
            let queue = queues.queue(&queue_name(&queue)?);
            let jobs = queue.dead(tenant, offset, limit.clamp(1, 1_000)).await?;
            if jobs.is_empty() {
                println!("no dead jobs");
            }
            for job in jobs {
                println!(
                    "{}  tenant {}  attempts {}/{}  {}",
                    job.id,
                    job.tenant,
                    job.attempts,
                    job.max_attempts,
                    job.last_error.unwrap_or_default().replace('\n', " ")
                );
            }
        }
        DeadCommand::Retry { queue, id, tenant } => {
            let queue = queues.queue(&queue_name(&queue)?);
            if !queue.retry_dead(&id, tenant).await? {
                bail!("no dead job {id} in queue {}", queue.name());
            }
            println!("job {id} is back in queue {}", queue.name());
        }
        DeadCommand::Discard { queue, id, tenant } => {
            let queue = queues.queue(&queue_name(&queue)?);
            if !queue.discard_dead(&id, tenant).await? {
                bail!("no dead job {id} in queue {}", queue.name());
            }
            println!("job {id} discarded");
        }
    }
    Ok(())
}
