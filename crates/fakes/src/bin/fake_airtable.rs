//! `herald-fake-airtable`: runs the local Airtable fake until SIGTERM or ctrl-c.
//!
//! The first line on stdout is `listening on http://ADDR`; logs go to stderr.

use std::io::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use herald_fakes::airtable::{self, AirtableFakeConfig};

/// A local Airtable Web API fake: Airtable's record routes, errors and rate limits, plus an
/// inspection API under /__fake for tests.
#[derive(Debug, Parser)]
#[command(name = "herald-fake-airtable", version)]
struct Args {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:0")]
    addr: SocketAddr,
    /// Requests per second per base (0: unlimited).
    #[arg(long, default_value_t = 5)]
    per_base_rps: u32,
    /// Requests per second per token (0: unlimited).
    #[arg(long, default_value_t = 50)]
    per_token_rps: u32,
    /// Seconds a base or token gets 429s after overflowing its limit (fractions allowed).
    #[arg(long, default_value_t = 30.0)]
    lockout_secs: f64,
    /// Accepted bearer token; repeat for several. None: any non-empty token.
    #[arg(long = "token", value_name = "TOKEN")]
    tokens: Vec<String>,
    /// Allowed base id; repeat for several. None: any base (others get 403).
    #[arg(long = "base", value_name = "BASE_ID")]
    bases: Vec<String>,
    /// Table that exists in every base; repeat for several. None: tables appear on first
    /// write (others get 404).
    #[arg(long = "table", value_name = "NAME")]
    tables: Vec<String>,
    /// Known field name; repeat for several. None: any name (others get 422).
    #[arg(long = "field", value_name = "NAME")]
    fields: Vec<String>,
    /// Field that holds numbers; repeat for several.
    #[arg(long = "numeric-field", value_name = "NAME")]
    numeric_fields: Vec<String>,
}

fn non_empty(values: Vec<String>) -> Option<Vec<String>> {
    (!values.is_empty()).then_some(values)
}

impl Args {
    fn config(self) -> anyhow::Result<AirtableFakeConfig> {
        let lockout = Duration::try_from_secs_f64(self.lockout_secs)
            .context("--lockout-secs must be a non-negative number of seconds")?;
        Ok(AirtableFakeConfig {
            per_base_rps: self.per_base_rps,
            per_token_rps: self.per_token_rps,
            lockout,
            tokens: self.tokens,
            bases: non_empty(self.bases),
            tables: non_empty(self.tables),
            fields: non_empty(self.fields),
            numeric_fields: self.numeric_fields,
            ..AirtableFakeConfig::default()
        })
    }
}

async fn shutdown_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut terminate = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
        tokio::select! {
            result = tokio::signal::ctrl_c() => result.context("listening for ctrl-c")?,
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c()
        .await
        .context("listening for ctrl-c")?;
    Ok(())
}

/// How long requests in flight may take to finish once a shutdown signal arrives.
const DRAIN: Duration = Duration::from_secs(5);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();

    let addr = args.addr;
    let fake = airtable::spawn_on(addr, args.config()?).await?;
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "listening on {}", fake.base_url())?;
        stdout.flush()?;
    }
    tracing::info!(url = %fake.base_url(), "Airtable fake ready");

    shutdown_signal().await?;
    tracing::info!("shutting down");
    match tokio::time::timeout(DRAIN, fake.shutdown()).await {
        Ok(result) => result,
        Err(_) => {
            tracing::warn!("requests still in flight after {DRAIN:?}; exiting anyway");
            Ok(())
        }
    }
}
