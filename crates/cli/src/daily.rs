//! The daily VA assignment from the command line: import and generate profiles, start a day's
//! campaign (and watch it through its stages with a progress bar), list and resume campaigns,
//! run the rolling cleanup. Everything goes through `herald-store` and `herald-jobs`, exactly
//! as the API does; the workers do the work.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use chrono::NaiveDate;
use clap::{Args, Subcommand};
use herald_core::TenantId;
use herald_store::PgPool;
use herald_store::daily::{self, CampaignId, CampaignView, Shape, Stage};
use herald_store::profiles::{self, ImportReport, InputRow, RawProfile};
use indicatif::{ProgressBar, ProgressStyle};

/// How often `assign --wait` reads the campaign.
const WAIT_POLL: Duration = Duration::from_millis(250);
/// Rejected rows printed by `profiles import` before the rest are only counted.
const REJECTED_SHOWN: usize = 20;

#[derive(Debug, Subcommand)]
pub enum ProfilesCommand {
    /// Import profiles into the tenant's pool from a CSV file (header row naming `username`,
    /// optionally `external_id` and `full_name`) or a JSON file (`{"profiles": [...]}`).
    /// Good rows go in; duplicates and bad rows are reported with their line numbers. A file
    /// that is not CSV at all changes nothing and exits 1.
    Import {
        /// The file: `.json` is read as JSON, `.csv` as CSV, anything else by its content.
        file: PathBuf,
        #[arg(long, env = "HERALD_TENANT")]
        tenant: TenantId,
    },
    /// The tenant's pool: total, unused and used profiles.
    Stats {
        #[arg(long, env = "HERALD_TENANT")]
        tenant: TenantId,
    },
}

#[derive(Debug, Subcommand)]
pub enum SeedCommand {
    /// Add N generated profiles to the tenant's pool: `lead_000001`, `lead_000002`, … with
    /// made-up names. Deterministic: the same numbers give the same profiles (duplicates are
    /// skipped), so `--from` picks where a new batch starts.
    Profiles {
        /// How many profiles.
        count: u64,
        #[arg(long, env = "HERALD_TENANT")]
        tenant: TenantId,
        /// Start after this profile number (the first generated is `from + 1`).
        #[arg(long, default_value_t = 0)]
        from: u64,
    },
}

#[derive(Debug, Args)]
pub struct AssignArgs {
    #[arg(long, env = "HERALD_TENANT")]
    tenant: TenantId,
    /// The campaign's day (YYYY-MM-DD); default today in the tenant's time zone.
    #[arg(long)]
    date: Option<NaiveDate>,
    /// Profiles to take from the pool (at most tables × per-table).
    #[arg(long, default_value_t = 14_400)]
    target: u32,
    /// VA tables (1–99): Airtable tables `Daily_Outreach_Table_01` ….
    #[arg(long, default_value_t = 80)]
    tables: u32,
    /// Positions per table.
    #[arg(long, default_value_t = 180)]
    per_table: u32,
    /// Watch the campaign through its stages with a progress bar; exit 1 if it fails.
    #[arg(long)]
    wait: bool,
}

pub(crate) fn tenant_error(e: herald_store::Error) -> anyhow::Error {
    match e {
        herald_store::Error::NotFound { what } => anyhow!("{what} not found"),
        herald_store::Error::Invalid { field, reason } => anyhow!("{field}: {reason}"),
        herald_store::Error::Conflict { what } => anyhow!("{what}"),
        other => anyhow!(other),
    }
}

/// The tenant, or an error naming it when it does not exist.
async fn known_tenant(pool: &PgPool, tenant: TenantId) -> anyhow::Result<()> {
    herald_store::tenants::get(pool, tenant)
        .await
        .map(|_| ())
        .map_err(tenant_error)
}

/// Whether a file holds JSON: by its extension, else by its first non-blank byte.
fn looks_like_json(path: &Path, bytes: &[u8]) -> bool {
    match path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("json") => true,
        Some("csv") => false,
        _ => bytes
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            .is_some_and(|b| *b == b'{'),
    }
}

fn print_report(what: &str, report: &ImportReport) {
    println!(
        "{what}: {} inserted, {} duplicates, {} rejected",
        report.inserted, report.duplicates, report.rejected
    );
    for row in report.rejected_rows.iter().take(REJECTED_SHOWN) {
        println!("  line {}: {}", row.line, row.reason);
    }
    if report.rejected_rows.len() > REJECTED_SHOWN {
        println!(
            "  … and {} more rejected rows",
            report.rejected_rows.len() - REJECTED_SHOWN
        );
    }
}

pub async fn profiles_command(pool: &PgPool, command: ProfilesCommand) -> anyhow::Result<()> {
    match command {
        ProfilesCommand::Import { file, tenant } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let rows = if looks_like_json(&file, &bytes) {
                profiles::parse_json(&bytes)
            } else {
                profiles::parse_csv(&bytes)
            }
            .map_err(|e| match e {
                herald_store::Error::Invalid { reason, .. } => {
                    anyhow!("{} is refused: {reason}", file.display())
                }
                other => anyhow!(other),
            })?;
            known_tenant(pool, tenant).await?;
            let report = profiles::import(pool, tenant, rows)
                .await
                .map_err(tenant_error)?;
            print_report(&format!("imported {}", file.display()), &report);
            print_pool(pool, tenant).await?;
        }
        ProfilesCommand::Stats { tenant } => {
            known_tenant(pool, tenant).await?;
            print_pool(pool, tenant).await?;
        }
    }
    Ok(())
}

async fn print_pool(pool: &PgPool, tenant: TenantId) -> anyhow::Result<()> {
    let stats = profiles::stats(pool, tenant).await?;
    println!(
        "pool: {} profiles, {} unused, {} used",
        stats.total, stats.unused, stats.used
    );
    Ok(())
}

const FIRST_NAMES: &[&str] = &[
    "Ana", "Ben", "Chloé", "Dev", "Elif", "Farah", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lena",
    "Mateo", "Nia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tariq", "Uma", "Vik", "Wen", "Yara",
    "Zoe",
];
const LAST_NAMES: &[&str] = &[
    "Adeyemi", "Berg", "Costa", "Dubois", "Eriksen", "Fischer", "García", "Haddad", "Ito",
    "Jensen", "Kowalski", "Lopez", "Moreau", "Nakamura", "Okafor", "Petrov", "Quist", "Rossi",
    "Silva", "Tanaka", "Usman", "Varga", "Weber", "Yilmaz", "Zhang",
];

/// Generated profile number `n`: the same `n` always gives the same profile.
pub fn generated_profile(n: u64) -> RawProfile {
    // Multiplying by primes spreads neighbouring numbers over different names.
    let first = FIRST_NAMES[(n.wrapping_mul(7_919) % FIRST_NAMES.len() as u64) as usize];
    let last = LAST_NAMES[(n.wrapping_mul(104_729) / 7 % LAST_NAMES.len() as u64) as usize];
    RawProfile {
        external_id: Some(format!("seed-{n}")),
        username: Some(format!("lead_{n:06}")),
        full_name: Some(format!("{first} {last}")),
    }
}

pub async fn seed_command(pool: &PgPool, command: SeedCommand) -> anyhow::Result<()> {
    match command {
        SeedCommand::Profiles {
            count,
            tenant,
            from,
        } => {
            if count == 0 || count > profiles::MAX_IMPORT_ROWS as u64 {
                bail!(
                    "COUNT must be 1 to {}, got {count}",
                    profiles::MAX_IMPORT_ROWS
                );
            }
            known_tenant(pool, tenant).await?;
            let last = from
                .checked_add(count)
                .ok_or_else(|| anyhow!("--from + COUNT is too large"))?;
            let rows: Vec<InputRow> = (from + 1..=last)
                .map(|n| InputRow {
                    line: n,
                    profile: profiles::validate(generated_profile(n)),
                })
                .collect();
            let report = profiles::import(pool, tenant, rows)
                .await
                .map_err(tenant_error)?;
            print_report(
                &format!("seeded lead_{:06} … lead_{last:06}", from + 1),
                &report,
            );
            print_pool(pool, tenant).await?;
        }
    }
    Ok(())
}

fn stage_line(view: &CampaignView) -> String {
    let c = &view.counts;
    match view.stage {
        Stage::Selecting => format!("selecting up to {} unused profiles", c.target),
        Stage::Distributing => format!(
            "distributing {} profiles over {} tables of {}",
            c.selected, view.tables, view.per_table
        ),
        Stage::Syncing => format!(
            "syncing to Airtable: {}/{} batches, {} records",
            c.batches_done, c.batches_total, c.synced
        ),
        Stage::Complete => "complete".to_owned(),
        Stage::Failed => format!(
            "failed in {}",
            view.failed_stage.map_or("an unknown stage", Stage::as_str)
        ),
    }
}

pub async fn assign(pool: &PgPool, args: AssignArgs) -> anyhow::Result<()> {
    let shape = Shape::new(args.target, args.tables, args.per_table).map_err(|e| match e {
        herald_store::Error::Invalid { field, reason } => {
            anyhow!("--{}: {reason}", field.replace('_', "-"))
        }
        other => anyhow!(other),
    })?;
    known_tenant(pool, args.tenant).await?;
    let started = herald_jobs::daily::start_daily(pool, args.tenant, args.date, shape)
        .await
        .map_err(tenant_error)?;
    let campaign = &started.campaign;
    if started.created {
        println!(
            "campaign {} started for {}: {} profiles over {} tables of {}",
            campaign.id,
            campaign.date,
            campaign.shape.target(),
            campaign.shape.tables(),
            campaign.shape.per_table()
        );
    } else {
        println!(
            "campaign {} for {} already exists (stage {}); one campaign per day",
            campaign.id, campaign.date, campaign.stage
        );
    }
    if args.wait {
        wait_for(pool, args.tenant, campaign.id).await?;
    }
    Ok(())
}

/// Follows the campaign until it completes (Ok, with a one-line summary) or fails (Err).
async fn wait_for(pool: &PgPool, tenant: TenantId, id: CampaignId) -> anyhow::Result<()> {
    let began = Instant::now();
    let bar = ProgressBar::new(100);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos:>3}%  {msg}")
            .map_err(|e| anyhow!("progress bar template: {e}"))?,
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    // Without a terminal the bar draws nothing; stage changes are printed as lines instead.
    let plain = bar.is_hidden();
    let mut last_stage = None;
    let mut last_reported = 0u8;
    let view = loop {
        let view = match daily::view(pool, tenant, id).await {
            Ok(view) => view,
            Err(herald_store::Error::Database(e)) => {
                // Postgres blinked: keep watching, the campaign carries on without us.
                bar.set_message(format!("(reading the campaign failed: {e}; retrying)"));
                tokio::time::sleep(WAIT_POLL).await;
                continue;
            }
            Err(other) => return Err(tenant_error(other)),
        };
        bar.set_position(u64::from(view.progress));
        bar.set_message(stage_line(&view));
        let changed = last_stage != Some(view.stage);
        if plain && (changed || view.progress >= last_reported.saturating_add(10)) {
            eprintln!("{:>3}%  {}", view.progress, stage_line(&view));
            last_reported = view.progress;
        } else if changed && last_stage.is_some() {
            bar.println(format!("  {} done", last_stage.map_or("", Stage::as_str)));
        }
        last_stage = Some(view.stage);
        if view.status != "running" {
            break view;
        }
        tokio::time::sleep(WAIT_POLL).await;
    };
    bar.finish_and_clear();
    let elapsed = began.elapsed().as_secs_f64();
    let c = view.counts;
    if view.stage == Stage::Failed {
        bail!(
            "campaign {id} failed in {} after {elapsed:.1}s: {}; fix the cause, then `herald resume {id} --tenant {tenant}`",
            view.failed_stage.map_or("an unknown stage", Stage::as_str),
            view.error.as_deref().unwrap_or("no reason recorded"),
        );
    }
    let unused = profiles::stats(pool, tenant).await?.unused;
    let shortfall = if c.shortfall > 0 {
        format!(" ({} short of the target {})", c.shortfall, c.target)
    } else {
        String::new()
    };
    println!(
        "campaign {id} complete in {elapsed:.1}s: {} profiles to {} tables × {}{shortfall}, {} records synced, {} rejected; {unused} unused profiles left",
        c.selected, view.tables, view.per_table, c.synced, c.rejected
    );
    Ok(())
}

pub async fn resume(
    pool: &PgPool,
    tenant: TenantId,
    id: CampaignId,
    wait: bool,
) -> anyhow::Result<()> {
    let campaign = herald_jobs::daily::resume(pool, tenant, id)
        .await
        .map_err(tenant_error)?;
    println!("campaign {id} resumed in stage {}", campaign.stage);
    if wait {
        wait_for(pool, tenant, id).await?;
    }
    Ok(())
}

pub async fn cleanup(
    pool: &PgPool,
    tenant: TenantId,
    date: Option<NaiveDate>,
) -> anyhow::Result<()> {
    known_tenant(pool, tenant).await?;
    let job = herald_jobs::daily::enqueue_cleanup(pool, tenant, date)
        .await
        .map_err(tenant_error)?;
    let day = date.map_or_else(|| "today".to_owned(), |d| d.to_string());
    println!("cleanup job {job} enqueued for tenant {tenant} as of {day}");
    Ok(())
}

pub async fn campaigns(pool: &PgPool, tenant: Option<TenantId>, limit: i64) -> anyhow::Result<()> {
    let tenants = match tenant {
        Some(tenant) => {
            known_tenant(pool, tenant).await?;
            vec![tenant]
        }
        None => herald_store::tenants::list(pool)
            .await?
            .into_iter()
            .map(|t| t.id)
            .collect(),
    };
    let mut any = false;
    for tenant in tenants {
        let campaigns = daily::list(pool, tenant, limit).await?;
        if campaigns.is_empty() {
            continue;
        }
        if !any {
            println!(
                "{:<10}  {:<36}  {:<36}  {:<12} {:>4}  {:>8} {:>8} {:>8}  error",
                "date", "campaign", "tenant", "stage", "%", "selected", "synced", "rejected"
            );
            any = true;
        }
        for campaign in campaigns {
            let view = campaign.view();
            println!(
                "{:<10}  {:<36}  {:<36}  {:<12} {:>4}  {:>8} {:>8} {:>8}  {}",
                view.date,
                view.campaign_id,
                tenant,
                view.stage,
                view.progress,
                view.counts.selected,
                view.counts.synced,
                view.counts.rejected,
                view.error.unwrap_or_default().replace('\n', " ")
            );
        }
    }
    if !any {
        println!("no campaigns");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_profiles_are_deterministic_and_valid() {
        assert_eq!(generated_profile(42), generated_profile(42));
        assert_ne!(generated_profile(1).username, generated_profile(2).username);
        for n in [1, 999_999, 1_000_000] {
            let profile = profiles::validate(generated_profile(n)).expect("a valid profile");
            assert!(profile.username.starts_with("lead_"));
        }
    }

    #[test]
    fn json_files_are_told_from_csv_by_name_then_content() {
        assert!(looks_like_json(Path::new("a.JSON"), b"username\n"));
        assert!(!looks_like_json(Path::new("a.csv"), b"{"));
        assert!(looks_like_json(
            Path::new("pool"),
            b"  \n{\"profiles\": []}"
        ));
        assert!(!looks_like_json(Path::new("pool"), b"username\nx\n"));
    }
}
