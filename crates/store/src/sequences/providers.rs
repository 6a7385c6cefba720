//! A tenant's accounts at the providers its sequences act through on email, LinkedIn and
//! Instagram: where to call (or the worker's `<CHANNEL>_API_URL`), the API key, and the secret
//! the provider signs its events to herald's sequence webhook with. WhatsApp has its own
//! settings (`messages::WhatsAppSettings`). Every function is scoped by tenant.

use std::fmt;

use herald_core::TenantId;
use sqlx::PgPool;

use super::steps::Channel;
use crate::Error;
use crate::error;

/// The channels whose provider account is kept here.
pub const CHANNELS: [Channel; 3] = [Channel::Email, Channel::Linkedin, Channel::Instagram];

/// The longest key, secret or URL accepted.
const MAX_LEN: usize = 4_096;

/// A tenant's account at one channel's provider.
#[derive(Clone, PartialEq, Eq)]
pub struct ChannelProvider {
    pub channel: Channel,
    /// `None`: the worker's `<CHANNEL>_API_URL`.
    pub api_url: Option<String>,
    pub api_key: String,
    pub webhook_secret: String,
}

impl fmt::Debug for ChannelProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChannelProvider")
            .field("channel", &self.channel)
            .field("api_url", &self.api_url)
            .finish_non_exhaustive()
    }
}

impl ChannelProvider {
    /// Checks every field; the error names the first wrong one.
    pub fn validate(&self) -> Result<(), Error> {
        if !CHANNELS.contains(&self.channel) {
            return Err(Error::invalid(
                "channel",
                "must be email, linkedin or instagram",
            ));
        }
        if let Some(url) = &self.api_url {
            let ok = (url.starts_with("http://") || url.starts_with("https://"))
                && url.len() <= MAX_LEN
                && !url.chars().any(char::is_whitespace);
            if !ok {
                return Err(Error::invalid("api_url", "must be an http(s) URL"));
            }
        }
        for (name, value) in [
            ("api_key", &self.api_key),
            ("webhook_secret", &self.webhook_secret),
        ] {
            if value.trim().is_empty() || value.len() > MAX_LEN {
                return Err(Error::invalid(name, "must be 1 to 4096 characters"));
            }
        }
        Ok(())
    }
}

/// Replaces the tenant's account for `provider.channel`.
pub async fn put(pool: &PgPool, tenant: TenantId, provider: &ChannelProvider) -> Result<(), Error> {
    provider.validate()?;
    sqlx::query(
        "insert into channel_providers (tenant_id, channel, api_url, api_key, webhook_secret)
         values ($1, $2, $3, $4, $5)
         on conflict (tenant_id, channel) do update set
             api_url = excluded.api_url, api_key = excluded.api_key,
             webhook_secret = excluded.webhook_secret, updated_at = now()",
    )
    .bind(tenant.0)
    .bind(provider.channel.as_str())
    .bind(provider.api_url.as_deref())
    .bind(&provider.api_key)
    .bind(&provider.webhook_secret)
    .execute(pool)
    .await
    .map_err(error::tenant_must_exist)?;
    Ok(())
}

/// The tenant's account for `channel`, if it set one.
pub async fn get(
    pool: &PgPool,
    tenant: TenantId,
    channel: Channel,
) -> Result<Option<ChannelProvider>, Error> {
    let row: Option<(Option<String>, String, String)> = sqlx::query_as(
        "select api_url, api_key, webhook_secret from channel_providers
         where tenant_id = $1 and channel = $2",
    )
    .bind(tenant.0)
    .bind(channel.as_str())
    .fetch_optional(pool)
    .await?;
    Ok(
        row.map(|(api_url, api_key, webhook_secret)| ChannelProvider {
            channel,
            api_url,
            api_key,
            webhook_secret,
        }),
    )
}

/// The webhook secret of each of the tenant's provider accounts.
pub async fn webhook_secrets(
    pool: &PgPool,
    tenant: TenantId,
) -> Result<Vec<(Channel, String)>, Error> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "select channel, webhook_secret from channel_providers where tenant_id = $1
         order by channel",
    )
    .bind(tenant.0)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(channel, secret)| Channel::parse(&channel).map(|c| (c, secret)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(channel: Channel, api_url: Option<&str>) -> ChannelProvider {
        ChannelProvider {
            channel,
            api_url: api_url.map(str::to_owned),
            api_key: "key".into(),
            webhook_secret: "secret".into(),
        }
    }

    #[test]
    fn validation_names_the_field() {
        assert!(
            provider(Channel::Email, Some("https://api.mail.example"))
                .validate()
                .is_ok()
        );
        assert!(provider(Channel::Linkedin, None).validate().is_ok());
        let field = |p: ChannelProvider| match p.validate() {
            Err(Error::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(field(provider(Channel::Whatsapp, None)), "channel");
        assert_eq!(field(provider(Channel::Email, Some("ftp://x"))), "api_url");
        let mut blank = provider(Channel::Instagram, None);
        blank.webhook_secret = " ".into();
        assert_eq!(field(blank), "webhook_secret");
        let shown = format!("{:?}", provider(Channel::Email, None));
        assert!(
            !shown.contains("key") && !shown.contains("secret"),
            "{shown}"
        );
    }
}
