//! Outreach from the command line: WhatsApp templates and message campaigns, sequences and their
//! leads, call campaigns and their calls. Read-mostly: lists, counts, a lead's history, the
//! sample and failed-recipient CSVs, and a message campaign's pause, resume and stop — the same
//! `herald-store` and `herald-jobs` calls the API makes, scoped to one tenant the same way (an
//! id of another tenant's is "not found", exactly as the API answers 404).
//!
//! Output is plain text in aligned columns; the CSV commands print the very bytes the API
//! serves.

use anyhow::{Context, anyhow, bail};
use clap::{Args, Subcommand};
use herald_core::TenantId;
use herald_store::PgPool;
use herald_store::sequences::steps::Step;
use herald_store::{calls, messages, sequences};
use uuid::Uuid;

use crate::daily::tenant_error;

/// Most rows a list prints unless `--limit` says otherwise.
const DEFAULT_LIMIT: i64 = 50;

/// `--tenant`: a tenant's id or its name (names are unique).
#[derive(Debug, Clone, Args)]
pub struct TenantArg {
    /// The tenant: its id or its name.
    #[arg(long = "tenant", env = "HERALD_TENANT", value_name = "ID_OR_NAME")]
    tenant: String,
}

impl TenantArg {
    /// The tenant's id; an unknown id or name is an error naming it.
    async fn resolve(&self, pool: &PgPool) -> anyhow::Result<TenantId> {
        let given = self.tenant.trim();
        if let Ok(id) = given.parse::<Uuid>() {
            let tenant = herald_store::tenants::get(pool, TenantId(id))
                .await
                .map_err(tenant_error)?;
            return Ok(tenant.id);
        }
        herald_store::tenants::list(pool)
            .await?
            .into_iter()
            .find(|t| t.name == given)
            .map(|t| t.id)
            .ok_or_else(|| anyhow!("no tenant has the id or name {given:?}"))
    }
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    tenant: TenantArg,
    /// Most rows, newest first.
    #[arg(long, default_value_t = DEFAULT_LIMIT)]
    limit: i64,
}

#[derive(Debug, Args)]
pub struct OneArgs {
    /// Its id.
    id: Uuid,
    #[command(flatten)]
    tenant: TenantArg,
}

#[derive(Debug, Subcommand)]
pub enum TemplatesCommand {
    /// The tenant's WhatsApp templates, newest first.
    List(ListArgs),
    /// The CSV a campaign upload expects for template ID: its header and one example row (the
    /// same file as `GET /v1/templates/{id}/sample.csv`).
    SampleCsv(OneArgs),
}

#[derive(Debug, Subcommand)]
pub enum MessageCampaignsCommand {
    /// The tenant's message campaigns, newest first, with their counts.
    List(ListArgs),
    /// One campaign: its settings and its recipients by status.
    Show(OneArgs),
    /// Pause a sending campaign: sends in flight finish, no new ones start.
    Pause(OneArgs),
    /// Resume a paused campaign: every pending recipient's send step is written again.
    Resume(OneArgs),
    /// Stop a campaign for good.
    Stop(OneArgs),
    /// The failed recipients as CSV, in the template's columns plus `error_code,error` (the
    /// same file as `GET /v1/message-campaigns/{id}/failed.csv`).
    FailedCsv(OneArgs),
}

#[derive(Debug, Subcommand)]
pub enum SequencesCommand {
    /// The tenant's sequences, newest first, with their leads by state.
    List(ListArgs),
    /// One sequence: leads by state, signals, and per step how many leads ran it, the
    /// condition's answers and the sends by status.
    Show(OneArgs),
    /// One lead of a sequence: where it stands and what it went through.
    Lead {
        /// The sequence's id.
        sequence: Uuid,
        /// The lead's id.
        lead: Uuid,
        #[command(flatten)]
        tenant: TenantArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum CallCampaignsCommand {
    /// The tenant's call campaigns, newest first, with their calls by state.
    List(ListArgs),
    /// One call campaign: its settings and its calls by state.
    Show(OneArgs),
}

#[derive(Debug, Subcommand)]
pub enum CallsCommand {
    /// A call campaign's calls in dispatch order.
    List {
        /// The call campaign's id.
        campaign: Uuid,
        #[command(flatten)]
        tenant: TenantArg,
        /// Only calls in this state (queued, dialing, in_call, completed, failed, cancelled,
        /// busy, no-answer).
        #[arg(long)]
        state: Option<String>,
        /// Most calls.
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
}

// ---------------------------------------------------------------------------------------------
// Output

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Align {
    Left,
    Right,
}

/// A plain-text table: every column as wide as its widest cell, two spaces apart.
struct Table {
    columns: Vec<(&'static str, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(columns: &[(&'static str, Align)]) -> Self {
        Self {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn render(&self) -> String {
        let mut widths: Vec<usize> = self
            .columns
            .iter()
            .map(|(h, _)| h.chars().count())
            .collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                if let Some(w) = widths.get_mut(i) {
                    *w = (*w).max(cell.chars().count());
                }
            }
        }
        let line = |cells: Vec<&str>| {
            let mut out = String::new();
            for (i, cell) in cells.iter().enumerate() {
                let (width, align) = (widths[i], self.columns[i].1);
                let pad = width.saturating_sub(cell.chars().count());
                if i > 0 {
                    out.push_str("  ");
                }
                match align {
                    Align::Right => {
                        out.push_str(&" ".repeat(pad));
                        out.push_str(cell);
                    }
                    Align::Left => {
                        out.push_str(cell);
                        out.push_str(&" ".repeat(pad));
                    }
                }
            }
            // The last column is padded only on the left: no line ends in spaces.
            let mut out = out.trim_end().to_owned();
            out.push('\n');
            out
        };
        let mut out = line(self.columns.iter().map(|(h, _)| *h).collect());
        for row in &self.rows {
            out.push_str(&line(row.iter().map(String::as_str).collect()));
        }
        out
    }

    fn print(&self) {
        print!("{}", self.render());
    }

    /// The table, or `empty` alone when it has no rows.
    fn print_or(&self, empty: &str) {
        if self.rows.is_empty() {
            println!("{empty}");
        } else {
            self.print();
        }
    }
}

use Align::{Left, Right};

fn time(at: Option<chrono::DateTime<chrono::Utc>>) -> String {
    at.map_or_else(
        || "-".to_owned(),
        |t| t.format("%Y-%m-%d %H:%M:%S").to_string(),
    )
}

fn or_dash(value: Option<impl ToString>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// `key: value` lines with the values aligned.
fn print_fields(fields: &[(&str, String)]) {
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    for (key, value) in fields {
        println!("{:<width$} {value}", format!("{key}:"));
    }
}

// ---------------------------------------------------------------------------------------------
// Templates

pub async fn templates(pool: &PgPool, command: TemplatesCommand) -> anyhow::Result<()> {
    match command {
        TemplatesCommand::List(args) => {
            let tenant = args.tenant.resolve(pool).await?;
            let list = messages::templates(pool, tenant, args.limit.clamp(1, 1_000)).await?;
            let mut table = Table::new(&[
                ("id", Left),
                ("name", Left),
                ("language", Left),
                ("columns", Left),
                ("created", Left),
            ]);
            for t in list {
                table.row(vec![
                    t.id.to_string(),
                    t.name.clone(),
                    t.language.clone(),
                    t.columns().join(","),
                    time(Some(t.created_at)),
                ]);
            }
            table.print_or("no templates");
        }
        TemplatesCommand::SampleCsv(args) => {
            let tenant = args.tenant.resolve(pool).await?;
            let template = messages::template(pool, tenant, args.id)
                .await
                .map_err(tenant_error)?;
            print!("{}", messages::sample_csv(&template));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Message campaigns

async fn message_campaign(
    pool: &PgPool,
    tenant: TenantId,
    id: Uuid,
) -> anyhow::Result<messages::Campaign> {
    let mut conn = pool.acquire().await.context("connecting to Postgres")?;
    messages::campaign(&mut conn, tenant, id, false)
        .await
        .map_err(tenant_error)
}

fn print_message_campaign(campaign: &messages::Campaign, stats: &messages::Stats) {
    print_fields(&[
        ("campaign", campaign.id.to_string()),
        ("name", campaign.name.clone()),
        ("status", campaign.status.as_str().to_owned()),
        ("template", campaign.template_id.to_string()),
        ("rate per sec", or_dash(campaign.rate_per_sec)),
        ("concurrency", or_dash(campaign.concurrency)),
        ("created", time(Some(campaign.created_at))),
        ("started", time(campaign.started_at)),
        ("completed", time(campaign.completed_at)),
    ]);
    println!();
    let mut table = Table::new(&[("recipients", Left), ("count", Right)]);
    for (status, n) in [
        ("total", stats.total),
        ("pending", stats.pending),
        ("attempting", stats.attempting),
        ("sent", stats.sent),
        ("delivered", stats.delivered),
        ("read", stats.read),
        ("failed", stats.failed),
        ("unknown", stats.unknown),
    ] {
        table.row(vec![status.to_owned(), n.to_string()]);
    }
    table.print();
}

/// What an operator may do to a message campaign.
#[derive(Debug, Clone, Copy)]
enum Control {
    Pause,
    Resume,
    Stop,
}

/// Pauses, resumes or stops the campaign through the API's own calls; prints where it ends.
async fn control(pool: &PgPool, action: Control, args: OneArgs) -> anyhow::Result<()> {
    let tenant = args.tenant.resolve(pool).await?;
    let campaign = match action {
        Control::Pause => herald_jobs::whatsapp::pause(pool, tenant, args.id).await,
        Control::Resume => herald_jobs::whatsapp::resume(pool, tenant, args.id).await,
        Control::Stop => herald_jobs::whatsapp::stop(pool, tenant, args.id).await,
    }
    .map_err(tenant_error)?;
    println!(
        "message campaign {} is {}",
        campaign.id,
        campaign.status.as_str()
    );
    Ok(())
}

pub async fn message_campaigns(
    pool: &PgPool,
    command: MessageCampaignsCommand,
) -> anyhow::Result<()> {
    match command {
        MessageCampaignsCommand::List(args) => {
            let tenant = args.tenant.resolve(pool).await?;
            let list = messages::campaigns(pool, tenant, args.limit.clamp(1, 1_000)).await?;
            let mut table = Table::new(&[
                ("id", Left),
                ("name", Left),
                ("status", Left),
                ("total", Right),
                ("pending", Right),
                ("sent", Right),
                ("delivered", Right),
                ("read", Right),
                ("failed", Right),
                ("unknown", Right),
                ("created", Left),
            ]);
            for c in list {
                let s = messages::stats(pool, tenant, c.id).await?;
                table.row(vec![
                    c.id.to_string(),
                    c.name.clone(),
                    c.status.as_str().to_owned(),
                    s.total.to_string(),
                    s.pending.to_string(),
                    s.sent.to_string(),
                    s.delivered.to_string(),
                    s.read.to_string(),
                    s.failed.to_string(),
                    s.unknown.to_string(),
                    time(Some(c.created_at)),
                ]);
            }
            table.print_or("no message campaigns");
        }
        MessageCampaignsCommand::Show(args) => {
            let tenant = args.tenant.resolve(pool).await?;
            let campaign = message_campaign(pool, tenant, args.id).await?;
            let stats = messages::stats(pool, tenant, args.id)
                .await
                .map_err(tenant_error)?;
            print_message_campaign(&campaign, &stats);
        }
        MessageCampaignsCommand::Pause(args) => control(pool, Control::Pause, args).await?,
        MessageCampaignsCommand::Resume(args) => control(pool, Control::Resume, args).await?,
        MessageCampaignsCommand::Stop(args) => control(pool, Control::Stop, args).await?,
        MessageCampaignsCommand::FailedCsv(args) => {
            let tenant = args.tenant.resolve(pool).await?;
            let campaign = message_campaign(pool, tenant, args.id).await?;
            let template = messages::template(pool, tenant, campaign.template_id)
                .await
                .map_err(tenant_error)?;
            let failed = messages::failed_recipients(pool, tenant, args.id)
                .await
                .map_err(tenant_error)?;
            print!("{}", messages::failed_csv(&template, &failed));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Sequences

/// `state=count` pairs, in the store's order.
fn counts(map: &std::collections::BTreeMap<String, u64>) -> String {
    map.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// What step `index` is, for a lead's "current step" line (`-` past the last step).
fn step_label(sequence: &sequences::Sequence, index: u32) -> String {
    let parsed = sequence.parsed_steps().ok();
    match parsed.as_ref().and_then(|s| s.get(index as usize)) {
        Some(step @ Step::Delay { days, hours, .. }) => {
            format!("{index} ({}: {days}d {hours}h)", step.step_type())
        }
        Some(
            step @ Step::Condition {
                signal, yes, no, ..
            },
        ) => format!(
            "{index} ({}: if {} then {yes} else {no})",
            step.step_type(),
            signal.as_str()
        ),
        Some(step) => format!("{index} ({})", step.step_type()),
        None => format!("{index} (past the last step)"),
    }
}

pub async fn sequences_command(pool: &PgPool, command: SequencesCommand) -> anyhow::Result<()> {
    match command {
        SequencesCommand::List(args) => {
            let tenant = args.tenant.resolve(pool).await?;
            let limit = u32::try_from(args.limit.clamp(1, 500)).unwrap_or(500);
            let list = sequences::list(pool, tenant, limit).await?;
            let mut table = Table::new(&[
                ("id", Left),
                ("name", Left),
                ("status", Left),
                ("steps", Right),
                ("active", Right),
                ("completed", Right),
                ("replied", Right),
                ("stopped", Right),
                ("failed", Right),
                ("created", Left),
            ]);
            for s in list {
                let stats = sequences::stats(pool, tenant, &s).await?;
                let leads = |state: &str| stats.leads.get(state).copied().unwrap_or(0).to_string();
                table.row(vec![
                    s.id.to_string(),
                    s.name.clone(),
                    s.status.as_str().to_owned(),
                    stats.steps.len().to_string(),
                    leads("active"),
                    leads("completed"),
                    leads("replied"),
                    leads("stopped"),
                    leads("failed"),
                    time(Some(s.created_at)),
                ]);
            }
            table.print_or("no sequences");
        }
        SequencesCommand::Show(args) => {
            let tenant = args.tenant.resolve(pool).await?;
            let sequence = sequences::get(pool, tenant, args.id)
                .await
                .map_err(tenant_error)?;
            let stats = sequences::stats(pool, tenant, &sequence).await?;
            let senders = sequence
                .senders
                .iter()
                .map(|(channel, account)| format!("{channel}={account}"))
                .collect::<Vec<_>>()
                .join(" ");
            print_fields(&[
                ("sequence", sequence.id.to_string()),
                ("name", sequence.name.clone()),
                ("status", sequence.status.as_str().to_owned()),
                (
                    "senders",
                    if senders.is_empty() {
                        "-".into()
                    } else {
                        senders
                    },
                ),
                ("created", time(Some(sequence.created_at))),
                ("started", time(sequence.started_at)),
                ("leads", counts(&stats.leads)),
                ("signals", counts(&stats.signals)),
            ]);
            println!();
            let mut table = Table::new(&[
                ("step", Right),
                ("type", Left),
                ("executed", Right),
                ("yes", Right),
                ("no", Right),
                ("sends", Left),
            ]);
            for step in &stats.steps {
                let sends = if step.sends.is_empty() {
                    "-".to_owned()
                } else {
                    counts(&step.sends)
                };
                table.row(vec![
                    step.step.to_string(),
                    step.step_type.clone(),
                    step.executed.to_string(),
                    step.yes.to_string(),
                    step.no.to_string(),
                    sends,
                ]);
            }
            table.print();
        }
        SequencesCommand::Lead {
            sequence,
            lead,
            tenant,
        } => {
            let tenant = tenant.resolve(pool).await?;
            let found = sequences::get(pool, tenant, sequence)
                .await
                .map_err(tenant_error)?;
            let record = sequences::lead(pool, tenant, lead)
                .await
                .map_err(tenant_error)?;
            if record.sequence_id != sequence {
                bail!("lead {lead} not found in sequence {sequence}");
            }
            let timeline = sequences::timeline(pool, tenant, lead).await?;
            let signals = sequences::signals(pool, tenant, lead).await?;
            let current = step_label(&found, record.current_step);
            let mut fields = vec![
                ("lead", record.id.to_string()),
                ("external id", or_dash(record.external_id.as_ref())),
                ("sequence", format!("{} ({})", found.id, found.name)),
                ("state", record.state.as_str().to_owned()),
                ("current step", current),
                ("next run at", time(record.next_run_at)),
            ];
            if let Some(error) = &record.error {
                fields.push(("error", error.replace('\n', " ")));
            }
            print_fields(&fields);
            println!();
            let mut table = Table::new(&[
                ("step", Right),
                ("type", Left),
                ("outcome", Left),
                ("channel", Left),
                ("send", Left),
                ("send status", Left),
                ("at", Left),
            ]);
            for entry in &timeline {
                table.row(vec![
                    entry.step.to_string(),
                    entry.step_type.clone(),
                    entry.outcome.clone(),
                    or_dash(entry.channel.as_ref()),
                    or_dash(entry.send_id),
                    or_dash(entry.send_status.as_ref()),
                    time(Some(entry.at)),
                ]);
            }
            table.print_or("no steps executed yet");
            if !signals.is_empty() {
                println!();
                let mut table = Table::new(&[("signal", Left), ("at", Left)]);
                for (signal, at) in signals {
                    table.row(vec![signal, time(Some(at))]);
                }
                table.print();
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Call campaigns and calls

fn call_counts(stats: &calls::CampaignStats) -> [(&'static str, i64); 9] {
    [
        ("total", stats.total),
        ("queued", stats.queued),
        ("dialing", stats.dialing),
        ("in_call", stats.in_call),
        ("completed", stats.completed),
        ("failed", stats.failed),
        ("busy", stats.busy),
        ("no_answer", stats.no_answer),
        ("cancelled", stats.cancelled),
    ]
}

pub async fn call_campaigns(pool: &PgPool, command: CallCampaignsCommand) -> anyhow::Result<()> {
    match command {
        CallCampaignsCommand::List(args) => {
            let tenant = args.tenant.resolve(pool).await?;
            let list = calls::list_campaigns(pool, tenant, args.limit.clamp(1, 1_000)).await?;
            let mut table = Table::new(&[
                ("id", Left),
                ("name", Left),
                ("status", Left),
                ("total", Right),
                ("queued", Right),
                ("in_call", Right),
                ("completed", Right),
                ("failed", Right),
                ("created", Left),
            ]);
            for c in list {
                let s = calls::campaign_stats(pool, tenant, c.id).await?;
                table.row(vec![
                    c.id.to_string(),
                    c.name.clone(),
                    c.status.as_str().to_owned(),
                    s.total.to_string(),
                    s.queued.to_string(),
                    (s.dialing + s.in_call).to_string(),
                    s.completed.to_string(),
                    (s.failed + s.busy + s.no_answer).to_string(),
                    time(Some(c.created_at)),
                ]);
            }
            table.print_or("no call campaigns");
        }
        CallCampaignsCommand::Show(args) => {
            let tenant = args.tenant.resolve(pool).await?;
            let campaign = calls::campaign(pool, tenant, args.id)
                .await
                .map_err(tenant_error)?;
            let stats = calls::campaign_stats(pool, tenant, args.id)
                .await
                .map_err(tenant_error)?;
            let mut fields = vec![
                ("campaign", campaign.id.to_string()),
                ("name", campaign.name.clone()),
                ("status", campaign.status.as_str().to_owned()),
                ("user", campaign.user_id.to_string()),
                ("agent", campaign.agent_id.to_string()),
                (
                    "calling hours",
                    format!(
                        "{}–{} {} from {}",
                        campaign.first_call_time.format("%H:%M"),
                        campaign.last_call_time.format("%H:%M"),
                        campaign.time_zone,
                        campaign.start_date
                    ),
                ),
                ("created", time(Some(campaign.created_at))),
            ];
            if let Some(reason) = &campaign.pause_reason {
                fields.push(("paused because", reason.clone()));
            }
            fields.push((
                "average call",
                stats
                    .average_duration_ms
                    .map_or_else(|| "-".to_owned(), |ms| format!("{:.1}s", ms / 1000.0)),
            ));
            print_fields(&fields);
            println!();
            let mut table = Table::new(&[("calls", Left), ("count", Right)]);
            for (state, n) in call_counts(&stats) {
                table.row(vec![state.to_owned(), n.to_string()]);
            }
            table.print();
        }
    }
    Ok(())
}

pub async fn calls_command(pool: &PgPool, command: CallsCommand) -> anyhow::Result<()> {
    match command {
        CallsCommand::List {
            campaign,
            tenant,
            state,
            limit,
        } => {
            let tenant = tenant.resolve(pool).await?;
            let list = calls::campaign_calls(
                pool,
                tenant,
                campaign,
                state.as_deref(),
                None,
                limit.clamp(1, 10_000),
            )
            .await
            .map_err(|e| match e {
                herald_store::Error::Invalid { reason, .. } => anyhow!("--state: {reason}"),
                other => tenant_error(other),
            })?;
            let mut table = Table::new(&[
                ("id", Left),
                ("phone", Left),
                ("name", Left),
                ("state", Left),
                ("outcome", Left),
                ("attempts", Right),
                ("duration", Right),
                ("ended", Left),
            ]);
            for call in list {
                table.row(vec![
                    call.id.to_string(),
                    call.phone.clone(),
                    or_dash(call.name.as_ref()),
                    call.state.clone(),
                    or_dash(call.outcome.as_ref().or(call.ended_reason.as_ref())),
                    call.attempts.to_string(),
                    call.duration_ms.map_or_else(
                        || "-".to_owned(),
                        |ms| format!("{:.1}s", ms as f64 / 1000.0),
                    ),
                    time(call.ended_at),
                ]);
            }
            table.print_or("no calls");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_their_columns() {
        let mut table = Table::new(&[("name", Left), ("n", Right), ("note", Left)]);
        table.row(vec!["a".into(), "10".into(), "x".into()]);
        table.row(vec!["longer".into(), "2".into(), "".into()]);
        assert_eq!(
            table.render(),
            "name     n  note\na       10  x\nlonger   2\n"
        );
    }
}
