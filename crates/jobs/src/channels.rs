//! The HTTP providers behind sequences' email, LinkedIn and Instagram steps: one
//! [`ChannelConnector`] per channel over its `herald-connectors` client, acting as the tenant's
//! provider account (`PUT /v1/providers/{channel}`) or else the worker's own
//! (`<CHANNEL>_API_URL` and `<CHANNEL>_API_KEY`), and mapping the provider's answer onto
//! [`ChannelError`].
//!
//! The mapping is the retry decision: a throttle (rate limit, LinkedIn's invitation limit,
//! Instagram's action block) defers the step without spending an attempt; a refusal of the
//! action fails the send; a refused API key or a 5xx is "not sent" (retried, the key may be
//! fixed meanwhile); no answer is ambiguous (recorded unknown, never repeated).

use std::time::Duration;

use futures::future::BoxFuture;
use herald_connectors::email::{Email, EmailClient};
use herald_connectors::instagram::{self, InstagramClient};
use herald_connectors::linkedin::{self, LinkedinClient};
use herald_connectors::rest::{self, Account, DEFAULT_TIMEOUT};
use herald_core::TenantId;
use herald_store::PgPool;
use herald_store::sequences::providers;
use herald_store::sequences::steps::Channel;
use secrecy::SecretString;

use crate::sequences::{ChannelConnector, ChannelError, Connectors, OutboundAction};

/// A worker's own account at one channel's provider, from its environment.
#[derive(Clone, Debug, Default)]
pub struct ProviderDefaults {
    /// `<CHANNEL>_API_URL`: also the URL of tenants whose account names none.
    pub api_url: Option<String>,
    /// `<CHANNEL>_API_KEY`: the key of tenants without an account of their own.
    pub api_key: Option<SecretString>,
}

/// Where the workers reach the email, LinkedIn and Instagram providers.
#[derive(Clone, Debug)]
pub struct ChannelSettings {
    pub email: ProviderDefaults,
    pub linkedin: ProviderDefaults,
    pub instagram: ProviderDefaults,
    /// Per request.
    pub timeout: Duration,
}

impl Default for ChannelSettings {
    fn default() -> Self {
        Self {
            email: ProviderDefaults::default(),
            linkedin: ProviderDefaults::default(),
            instagram: ProviderDefaults::default(),
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

impl ChannelSettings {
    /// Reads `EMAIL_API_URL`, `EMAIL_API_KEY`, `LINKEDIN_API_URL`, `LINKEDIN_API_KEY`,
    /// `INSTAGRAM_API_URL` and `INSTAGRAM_API_KEY` through `var`; blank values count as unset.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let read = |channel: Channel| {
            let name = channel.as_str().to_ascii_uppercase();
            let value = |suffix: &str| {
                var(&format!("{name}_{suffix}"))
                    .map(|v| v.trim().to_owned())
                    .filter(|v| !v.is_empty())
            };
            ProviderDefaults {
                api_url: value("API_URL"),
                api_key: value("API_KEY").map(SecretString::from),
            }
        };
        Self {
            email: read(Channel::Email),
            linkedin: read(Channel::Linkedin),
            instagram: read(Channel::Instagram),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var(name).ok())
    }
}

/// The client of one channel's provider.
#[derive(Clone, Debug)]
enum Client {
    Email(EmailClient),
    Linkedin(LinkedinClient),
    Instagram(InstagramClient),
}

/// One channel's HTTP provider as a [`ChannelConnector`].
#[derive(Clone, Debug)]
pub struct ProviderChannel {
    channel: Channel,
    pool: PgPool,
    defaults: ProviderDefaults,
    client: Client,
}

impl ProviderChannel {
    /// The connector of `channel` (email, LinkedIn or Instagram; `None` for another).
    pub fn new(
        channel: Channel,
        http: reqwest::Client,
        pool: PgPool,
        settings: &ChannelSettings,
    ) -> Option<Self> {
        let timeout = settings.timeout;
        let (client, defaults) = match channel {
            Channel::Email => (
                Client::Email(EmailClient::new(http, timeout)),
                &settings.email,
            ),
            Channel::Linkedin => (
                Client::Linkedin(LinkedinClient::new(http, timeout)),
                &settings.linkedin,
            ),
            Channel::Instagram => (
                Client::Instagram(InstagramClient::new(http, timeout)),
                &settings.instagram,
            ),
            Channel::Whatsapp => return None,
        };
        Some(Self {
            channel,
            pool,
            defaults: defaults.clone(),
            client,
        })
    }

    /// The account to act as for `tenant`: its own (with the worker's URL when it names none),
    /// else the worker's. `Err` says what is missing.
    async fn account(&self, tenant: TenantId) -> Result<Account, String> {
        let channel = self.channel;
        let env = channel.as_str().to_ascii_uppercase();
        let own = providers::get(&self.pool, tenant, channel)
            .await
            .map_err(|e| format!("reading the tenant's {channel} provider: {e}"))?;
        if let Some(own) = own {
            let api_url = own.api_url.or_else(|| self.defaults.api_url.clone()).ok_or_else(|| {
                format!(
                    "the tenant's {channel} provider names no api_url and this worker has no {env}_API_URL"
                )
            })?;
            return Ok(Account {
                api_url,
                api_key: SecretString::from(own.api_key),
            });
        }
        match (&self.defaults.api_url, &self.defaults.api_key) {
            (Some(api_url), Some(api_key)) => Ok(Account {
                api_url: api_url.clone(),
                api_key: api_key.clone(),
            }),
            _ => Err(format!(
                "no {channel} provider for this tenant: PUT /v1/providers/{channel}, or set \
                 {env}_API_URL and {env}_API_KEY on the workers"
            )),
        }
    }

    async fn call(
        &self,
        account: &Account,
        action: &OutboundAction,
    ) -> Result<String, ChannelError> {
        let send_id = action.send_id.to_string();
        let unsupported = || ChannelError::Refused {
            code: "unsupported".into(),
            message: format!("{} is not a {} action", action.step_type, self.channel),
        };
        let answer = match &self.client {
            Client::Email(client) => {
                let email = Email {
                    from: action.sender.clone(),
                    to: action.to.clone(),
                    subject: action.subject.clone(),
                    text: action.text.clone().unwrap_or_default(),
                    send_id,
                };
                client.send(account, &email).await
            }
            Client::Linkedin(client) => {
                let kind = match action.step_type {
                    "linkedin_visit" => linkedin::ActionType::Visit,
                    "linkedin_connect" => linkedin::ActionType::Connect,
                    "linkedin_message" => linkedin::ActionType::Message,
                    "linkedin_follow" => linkedin::ActionType::Follow,
                    _ => return Err(unsupported()),
                };
                let request = linkedin::Action {
                    account: action.sender.clone(),
                    action: kind,
                    profile_url: action.to.clone(),
                    text: action.text.clone(),
                    send_id,
                };
                client.act(account, &request).await
            }
            Client::Instagram(client) => {
                let kind = match action.step_type {
                    "instagram_dm" => instagram::ActionType::Dm,
                    "instagram_follow" => instagram::ActionType::Follow,
                    "instagram_like" => instagram::ActionType::Like,
                    _ => return Err(unsupported()),
                };
                let request = instagram::Action {
                    account: action.sender.clone(),
                    action: kind,
                    handle: action.to.clone(),
                    text: action.text.clone(),
                    send_id,
                };
                client.act(account, &request).await
            }
        };
        answer.map_err(from_provider)
    }
}

/// A provider's answer in the channel-neutral terms.
pub fn from_provider(error: rest::Error) -> ChannelError {
    match error {
        rest::Error::Throttled { wait, .. } => ChannelError::Throttled { wait },
        rest::Error::Refused { code, message, .. } => ChannelError::Refused { code, message },
        // A bad key is the tenant's configuration, not this lead's fault: retried (and failed
        // only when the attempts run out), so fixing the key lets the lead go on.
        e @ (rest::Error::Unauthorized { .. }
        | rest::Error::Server { .. }
        | rest::Error::NotSent(_)) => ChannelError::NotSent(e.to_string()),
        e @ rest::Error::Ambiguous(_) => ChannelError::Ambiguous(e.to_string()),
    }
}

impl ChannelConnector for ProviderChannel {
    fn ready<'a>(&'a self, tenant: TenantId) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move { self.account(tenant).await.map(|_| ()) })
    }

    fn act<'a>(
        &'a self,
        action: &'a OutboundAction,
    ) -> BoxFuture<'a, Result<String, ChannelError>> {
        Box::pin(async move {
            let account = self
                .account(action.tenant)
                .await
                .map_err(ChannelError::NotSent)?;
            self.call(&account, action).await
        })
    }
}

/// The email, LinkedIn and Instagram connectors of a worker, over one HTTP client and pool.
pub fn connectors(http: reqwest::Client, pool: PgPool, settings: &ChannelSettings) -> Connectors {
    providers::CHANNELS
        .into_iter()
        .filter_map(|channel| ProviderChannel::new(channel, http.clone(), pool.clone(), settings))
        .fold(Connectors::default(), |connectors, connector| {
            let channel = connector.channel;
            connectors.with(channel, std::sync::Arc::new(connector))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_read_each_channel_and_ignore_blanks() {
        let settings = ChannelSettings::from_vars(|name| match name {
            "EMAIL_API_URL" => Some("http://127.0.0.1:9001".into()),
            "EMAIL_API_KEY" => Some(" k ".into()),
            "LINKEDIN_API_URL" => Some("  ".into()),
            _ => None,
        });
        assert_eq!(
            settings.email.api_url.as_deref(),
            Some("http://127.0.0.1:9001")
        );
        assert!(settings.email.api_key.is_some());
        assert!(settings.linkedin.api_url.is_none());
        assert!(settings.instagram.api_key.is_none());
    }

    #[test]
    fn throttles_defer_refusals_fail_and_bad_keys_retry() {
        assert_eq!(
            from_provider(rest::Error::Throttled {
                code: "invitation_limit_exceeded".into(),
                wait: Duration::from_secs(60)
            }),
            ChannelError::Throttled {
                wait: Duration::from_secs(60)
            }
        );
        assert!(matches!(
            from_provider(rest::Error::Refused {
                status: 422,
                code: "recipient_suppressed".into(),
                message: "m".into()
            }),
            ChannelError::Refused { code, .. } if code == "recipient_suppressed"
        ));
        assert!(matches!(
            from_provider(rest::Error::Unauthorized {
                code: "unauthorized".into(),
                message: "m".into()
            }),
            ChannelError::NotSent(_)
        ));
        assert!(matches!(
            from_provider(rest::Error::Server { status: 503 }),
            ChannelError::NotSent(_)
        ));
        assert!(matches!(
            from_provider(rest::Error::Ambiguous("timeout".into())),
            ChannelError::Ambiguous(_)
        ));
    }
}
