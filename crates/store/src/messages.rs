//! WhatsApp template campaigns: templates (with the parameter counts derived from their
//! `{{n}}` placeholders), each tenant's WhatsApp account settings, campaigns and their
//! recipients (validated against the template's columns, row by row), and the bookkeeping the
//! send step does around a provider call. A recipient's delivery status is its send's (see
//! [`crate::sends`]); a recipient without a send is pending.
//!
//! Every query is scoped by tenant.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use herald_core::TenantId;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::Error;
use crate::error;
use crate::sends;

/// The channel name sends of WhatsApp campaigns are recorded under.
pub const CHANNEL: &str = "whatsapp";
/// The most recipients one campaign upload may carry.
pub const MAX_RECIPIENTS: usize = 200_000;
/// The longest template parameter value accepted.
pub const MAX_PARAM_LEN: usize = 1_024;
/// The slowest and fastest configurable send rate (messages per second).
pub const RATE_RANGE: std::ops::RangeInclusive<u32> = 1..=1_000;
/// The fewest and most sends of one campaign in flight at once.
pub const CONCURRENCY_RANGE: std::ops::RangeInclusive<u32> = 1..=100;

// ---------------------------------------------------------------------------------------------
// Templates

/// A template's variables, derived from its components.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TemplateParams {
    pub header: u32,
    pub body: u32,
    /// The indexes (from 0, in the BUTTONS component) of URL buttons whose URL ends in `{{1}}`.
    pub url_buttons: Vec<u32>,
}

impl TemplateParams {
    /// The recipient columns, in order: `country_code, phone_number, header_param_1…,
    /// body_param_1…, button_url_param` (`button_url_param_1…` with several URL buttons).
    pub fn columns(&self) -> Vec<String> {
        let mut columns = vec!["country_code".to_owned(), "phone_number".to_owned()];
        columns.extend((1..=self.header).map(|n| format!("header_param_{n}")));
        columns.extend((1..=self.body).map(|n| format!("body_param_{n}")));
        match self.url_buttons.len() {
            0 => {}
            1 => columns.push("button_url_param".to_owned()),
            n => columns.extend((1..=n).map(|i| format!("button_url_param_{i}"))),
        }
        columns
    }

    /// How many parameter values a recipient carries (every column but the phone's two).
    pub fn len(&self) -> usize {
        self.header as usize + self.body as usize + self.url_buttons.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The placeholder numbers in `text`, e.g. `{{1}}`, `{{2}}`.
fn placeholders(text: &str) -> Result<Vec<u32>, String> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| format!("unclosed placeholder in {text:?}"))?;
        let inner = after[..end].trim();
        let n: u32 = inner
            .parse()
            .ok()
            .filter(|n| *n >= 1)
            .ok_or_else(|| format!("placeholder {{{{{inner}}}}} must be a number from 1"))?;
        found.push(n);
        rest = &after[end + 2..];
    }
    Ok(found)
}

/// The count of placeholders in `text`, which must be exactly `{{1}}`…`{{n}}`.
fn count_placeholders(component: &str, text: &str) -> Result<u32, String> {
    let found: BTreeSet<u32> = placeholders(text)?.into_iter().collect();
    let n = found.len() as u32;
    if found.iter().copied().ne(1..=n) {
        return Err(format!(
            "{component} placeholders must be numbered {{{{1}}}} to {{{{{n}}}}} without gaps, got {found:?}"
        ));
    }
    Ok(n)
}

fn text_of<'a>(component: &'a Value, field: &str, what: &str) -> Result<&'a str, String> {
    component[field]
        .as_str()
        .ok_or_else(|| format!("{what} needs a string {field:?}"))
}

/// Derives a template's variables from its components (Meta's template shape:
/// `[{"type":"HEADER","format":"TEXT","text":..}, {"type":"BODY","text":..}, {"type":"FOOTER"..},
/// {"type":"BUTTONS","buttons":[{"type":"URL","url":"https://…/{{1}}"}, …]}]`). Types are
/// case-insensitive; media headers are not supported yet.
pub fn template_params(components: &Value) -> Result<TemplateParams, String> {
    let list = components
        .as_array()
        .ok_or("components must be a list of objects")?;
    let mut params = TemplateParams::default();
    let mut seen = HashSet::new();
    let mut has_body = false;
    for (i, component) in list.iter().enumerate() {
        let kind = component["type"]
            .as_str()
            .ok_or_else(|| format!("components[{i}] needs a string \"type\""))?
            .to_ascii_uppercase();
        if !seen.insert(kind.clone()) {
            return Err(format!("components hold more than one {kind}"));
        }
        let what = format!("components[{i}] ({kind})");
        match kind.as_str() {
            "HEADER" => {
                let format = component["format"].as_str().unwrap_or("TEXT");
                if !format.eq_ignore_ascii_case("TEXT") {
                    return Err(format!(
                        "{what}: header format {format:?} is not supported; use TEXT"
                    ));
                }
                params.header = count_placeholders("header", text_of(component, "text", &what)?)?;
                if params.header > 1 {
                    return Err(format!("{what}: a header takes at most one placeholder"));
                }
            }
            "BODY" => {
                has_body = true;
                params.body = count_placeholders("body", text_of(component, "text", &what)?)?;
            }
            "FOOTER" => {
                if !placeholders(text_of(component, "text", &what)?)?.is_empty() {
                    return Err(format!("{what}: a footer takes no placeholders"));
                }
            }
            "BUTTONS" => {
                let buttons = component["buttons"]
                    .as_array()
                    .ok_or_else(|| format!("{what} needs a list \"buttons\""))?;
                for (index, button) in buttons.iter().enumerate() {
                    let is_url = button["type"]
                        .as_str()
                        .is_some_and(|t| t.eq_ignore_ascii_case("URL"));
                    if !is_url {
                        continue;
                    }
                    let url = text_of(button, "url", &format!("{what} button {index}"))?;
                    match placeholders(url)?.as_slice() {
                        [] => {}
                        [1] if url.trim_end().ends_with("}}") => {
                            params.url_buttons.push(index as u32)
                        }
                        _ => {
                            return Err(format!(
                                "{what} button {index}: a URL takes one placeholder, {{{{1}}}}, at its end"
                            ));
                        }
                    }
                }
            }
            other => return Err(format!("components[{i}]: unknown component type {other:?}")),
        }
    }
    if !has_body {
        return Err("components need a BODY".into());
    }
    Ok(params)
}

/// A registered template.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Template {
    pub id: Uuid,
    pub name: String,
    pub language: String,
    pub components: Value,
    pub params: TemplateParams,
    pub created_at: DateTime<Utc>,
}

impl Template {
    pub fn columns(&self) -> Vec<String> {
        self.params.columns()
    }
}

#[derive(sqlx::FromRow)]
struct TemplateRecord {
    id: Uuid,
    name: String,
    language: String,
    components: Value,
    header_params: i32,
    body_params: i32,
    button_url_params: Vec<i32>,
    created_at: DateTime<Utc>,
}

impl From<TemplateRecord> for Template {
    fn from(r: TemplateRecord) -> Self {
        Template {
            id: r.id,
            name: r.name,
            language: r.language,
            components: r.components,
            params: TemplateParams {
                header: r.header_params.max(0) as u32,
                body: r.body_params.max(0) as u32,
                url_buttons: r
                    .button_url_params
                    .iter()
                    .map(|i| (*i).max(0) as u32)
                    .collect(),
            },
            created_at: r.created_at,
        }
    }
}

fn valid_template_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 512
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

fn valid_language(code: &str) -> bool {
    let mut parts = code.split('_');
    let lang = parts.next().unwrap_or_default();
    let region = parts.next();
    parts.next().is_none()
        && (2..=3).contains(&lang.len())
        && lang.bytes().all(|b| b.is_ascii_lowercase())
        && region.is_none_or(|r| r.len() == 2 && r.bytes().all(|b| b.is_ascii_uppercase()))
}

/// Registers a template for the tenant. The name is Meta's (lower-case letters, digits, `_`),
/// the language a code like `en` or `en_US`; one template per (name, language).
pub async fn create_template(
    pool: &PgPool,
    tenant: TenantId,
    name: &str,
    language: &str,
    components: &Value,
) -> Result<Template, Error> {
    if !valid_template_name(name) {
        return Err(Error::invalid(
            "name",
            "must be 1 to 512 lower-case letters, digits or '_'",
        ));
    }
    if !valid_language(language) {
        return Err(Error::invalid(
            "language",
            format!("{language:?} is not a language code such as en or en_US"),
        ));
    }
    let params = template_params(components).map_err(|e| Error::invalid("components", e))?;
    let buttons: Vec<i32> = params.url_buttons.iter().map(|i| *i as i32).collect();
    let record: TemplateRecord = sqlx::query_as(
        "insert into message_templates
             (tenant_id, id, name, language, components, header_params, body_params, button_url_params)
         values ($1, $2, $3, $4, $5, $6, $7, $8)
         returning id, name, language, components, header_params, body_params, button_url_params, created_at",
    )
    .bind(tenant.0)
    .bind(Uuid::now_v7())
    .bind(name)
    .bind(language)
    .bind(components)
    .bind(params.header as i32)
    .bind(params.body as i32)
    .bind(&buttons)
    .fetch_one(pool)
    .await
    .map_err(|e| {
        if error::is_unique_violation(&e) {
            Error::Conflict {
                what: format!("template {name:?} in {language:?}"),
            }
        } else {
            error::tenant_must_exist(e)
        }
    })?;
    Ok(record.into())
}

const TEMPLATE_COLUMNS: &str = "id, name, language, components, header_params, body_params, \
                                button_url_params, created_at";

/// The tenant's template `id`; `NotFound` for another tenant's.
pub async fn template(pool: &PgPool, tenant: TenantId, id: Uuid) -> Result<Template, Error> {
    let record: Option<TemplateRecord> = sqlx::query_as(&format!(
        "select {TEMPLATE_COLUMNS} from message_templates where tenant_id = $1 and id = $2"
    ))
    .bind(tenant.0)
    .bind(id)
    .fetch_optional(pool)
    .await?;
    record
        .map(Template::from)
        .ok_or_else(|| Error::not_found(format!("template {id}")))
}

/// The tenant's templates, newest first (at most `limit`).
pub async fn templates(
    pool: &PgPool,
    tenant: TenantId,
    limit: i64,
) -> Result<Vec<Template>, Error> {
    let records: Vec<TemplateRecord> = sqlx::query_as(&format!(
        "select {TEMPLATE_COLUMNS} from message_templates where tenant_id = $1
         order by created_at desc, id desc limit $2"
    ))
    .bind(tenant.0)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(records.into_iter().map(Template::from).collect())
}

/// A CSV holding only the header row of `template`'s columns, and one example row.
pub fn sample_csv(template: &Template) -> String {
    let columns = template.columns();
    let example: Vec<String> = columns
        .iter()
        .map(|c| match c.as_str() {
            "country_code" => "1".to_owned(),
            "phone_number" => "5550100123".to_owned(),
            other => format!("{other}_value"),
        })
        .collect();
    format!("{}\n{}\n", columns.join(","), example.join(","))
}

// ---------------------------------------------------------------------------------------------
// Settings

/// A tenant's WhatsApp Cloud API account.
#[derive(Clone, PartialEq, Eq, Deserialize)]
pub struct WhatsAppSettings {
    /// `None`: the worker's `WHATSAPP_API_URL`.
    pub api_url: Option<String>,
    pub token: String,
    pub phone_number_id: String,
    pub app_secret: String,
    pub verify_token: String,
}

impl fmt::Debug for WhatsAppSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WhatsAppSettings")
            .field("api_url", &self.api_url)
            .field("phone_number_id", &self.phone_number_id)
            .finish_non_exhaustive()
    }
}

impl WhatsAppSettings {
    /// Checks every field; the error names the first wrong one.
    pub fn validate(&self) -> Result<(), Error> {
        if let Some(url) = &self.api_url {
            let ok = (url.starts_with("http://") || url.starts_with("https://"))
                && url.len() <= 2_000
                && !url.chars().any(char::is_whitespace);
            if !ok {
                return Err(Error::invalid("api_url", "must be an http(s) URL"));
            }
        }
        let fields = [
            ("token", &self.token),
            ("phone_number_id", &self.phone_number_id),
            ("app_secret", &self.app_secret),
            ("verify_token", &self.verify_token),
        ];
        for (name, value) in fields {
            if value.trim().is_empty() || value.len() > 4_096 {
                return Err(Error::invalid(name, "must be 1 to 4096 characters"));
            }
        }
        if !self.phone_number_id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Error::invalid("phone_number_id", "must be digits"));
        }
        Ok(())
    }
}

/// Replaces the tenant's WhatsApp settings.
pub async fn put_settings(
    pool: &PgPool,
    tenant: TenantId,
    settings: &WhatsAppSettings,
) -> Result<(), Error> {
    settings.validate()?;
    sqlx::query(
        "insert into whatsapp_settings
             (tenant_id, api_url, token, phone_number_id, app_secret, verify_token)
         values ($1, $2, $3, $4, $5, $6)
         on conflict (tenant_id) do update set
             api_url = excluded.api_url, token = excluded.token,
             phone_number_id = excluded.phone_number_id, app_secret = excluded.app_secret,
             verify_token = excluded.verify_token, updated_at = now()",
    )
    .bind(tenant.0)
    .bind(settings.api_url.as_deref())
    .bind(&settings.token)
    .bind(&settings.phone_number_id)
    .bind(&settings.app_secret)
    .bind(&settings.verify_token)
    .execute(pool)
    .await
    .map_err(error::tenant_must_exist)?;
    Ok(())
}

/// The tenant's WhatsApp settings, if configured.
pub async fn settings(pool: &PgPool, tenant: TenantId) -> Result<Option<WhatsAppSettings>, Error> {
    let row: Option<(Option<String>, String, String, String, String)> = sqlx::query_as(
        "select api_url, token, phone_number_id, app_secret, verify_token
         from whatsapp_settings where tenant_id = $1",
    )
    .bind(tenant.0)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(
        |(api_url, token, phone_number_id, app_secret, verify_token)| WhatsAppSettings {
            api_url,
            token,
            phone_number_id,
            app_secret,
            verify_token,
        },
    ))
}

// ---------------------------------------------------------------------------------------------
// Recipients

/// A WhatsApp number from a country code and a national number: digits only (spaces, dashes,
/// dots, brackets and a leading `+` or `00` are dropped), 8 to 15 digits in all (E.164).
pub fn normalize_phone(country_code: &str, number: &str) -> Result<String, String> {
    let digits = |s: &str, what: &str| -> Result<String, String> {
        let mut kept = String::new();
        for c in s.trim().chars() {
            match c {
                '0'..='9' => kept.push(c),
                ' ' | '-' | '.' | '(' | ')' => {}
                '+' if kept.is_empty() => {}
                _ => return Err(format!("{what} {s:?} may hold only digits")),
            }
        }
        Ok(kept)
    };
    let cc = digits(country_code, "country_code")?;
    let cc = cc.trim_start_matches("00");
    if cc.is_empty() || cc.len() > 3 || cc.starts_with('0') {
        return Err(format!(
            "country_code {country_code:?} must be 1 to 3 digits, not starting with 0"
        ));
    }
    let national = digits(number, "phone_number")?;
    // A national number written with its trunk prefix (0…) is common; the prefix is not dialled
    // from abroad.
    let national = national.trim_start_matches('0');
    let phone = format!("{cc}{national}");
    if national.len() < 4 || !(8..=15).contains(&phone.len()) {
        return Err(format!(
            "phone_number {number:?} with country code {cc} is not a valid number (8 to 15 digits in all)"
        ));
    }
    Ok(phone)
}

/// A recipient ready to insert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRecipient {
    /// The country code's digits; `phone` starts with them.
    pub country_code: String,
    pub phone: String,
    /// The parameter values in column order (header, body, URL buttons).
    pub params: Vec<String>,
}

/// One input row: its line (CSV line, header = 1; or the item's number in a JSON list, from 1)
/// and the recipient, or why the row cannot be one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientRow {
    pub line: u64,
    pub recipient: Result<NewRecipient, String>,
}

fn check_param(column: &str, value: &str) -> Result<String, String> {
    let value = value.trim();
    if value.is_empty() {
        return Err(format!("{column} is empty"));
    }
    if value.chars().count() > MAX_PARAM_LEN {
        return Err(format!(
            "{column} is longer than {MAX_PARAM_LEN} characters"
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(format!(
            "{column} contains control characters (new lines, tabs)"
        ));
    }
    Ok(value.to_owned())
}

/// Validates one recipient given as column → value (every template column present).
fn recipient_from(
    columns: &[String],
    value_of: impl Fn(&str) -> Option<String>,
) -> Result<NewRecipient, String> {
    let cc = value_of("country_code").unwrap_or_default();
    let number = value_of("phone_number").unwrap_or_default();
    if number.trim().is_empty() {
        return Err("phone_number is empty".into());
    }
    let phone = normalize_phone(&cc, &number)?;
    let country_code = cc
        .chars()
        .filter(char::is_ascii_digit)
        .collect::<String>()
        .trim_start_matches("00")
        .to_owned();
    let params = columns[2..]
        .iter()
        .map(|column| check_param(column, &value_of(column).unwrap_or_default()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(NewRecipient {
        country_code,
        phone,
        params,
    })
}

fn not_csv(reason: impl Into<String>) -> Error {
    Error::invalid("file", reason)
}

/// Parses a recipients CSV against `template`: the header must name exactly the template's
/// columns (any order, any case), else the whole file is refused (`Invalid` for `file`); each
/// row then becomes a recipient or a reason.
pub fn parse_recipients_csv(bytes: &[u8], template: &Template) -> Result<Vec<RecipientRow>, Error> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(not_csv("the file is empty"));
    }
    if bytes.contains(&0) {
        return Err(not_csv("the file holds binary data, not CSV text"));
    }
    let columns = template.columns();
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(false)
        .from_reader(bytes);
    let headers = reader
        .byte_headers()
        .map_err(|e| not_csv(format!("the header row cannot be read: {e}")))?
        .clone();
    let mut index: BTreeMap<String, usize> = BTreeMap::new();
    for (i, name) in headers.iter().enumerate() {
        let name = std::str::from_utf8(name)
            .map_err(|_| not_csv("the header row is not UTF-8 text"))?
            .trim()
            .to_ascii_lowercase();
        if index.insert(name.clone(), i).is_some() {
            return Err(not_csv(format!("the header names column {name:?} twice")));
        }
    }
    let missing: Vec<&str> = columns
        .iter()
        .filter(|c| !index.contains_key(*c))
        .map(String::as_str)
        .collect();
    let unknown: Vec<&str> = index
        .keys()
        .filter(|c| !columns.contains(c))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() || !unknown.is_empty() {
        return Err(Error::invalid(
            "columns",
            format!(
                "the header must name exactly the template's columns ({}); missing: [{}], unknown: [{}]",
                columns.join(","),
                missing.join(","),
                unknown.join(",")
            ),
        ));
    }
    let mut rows = Vec::new();
    let mut record = csv::ByteRecord::new();
    loop {
        if rows.len() >= MAX_RECIPIENTS {
            return Err(not_csv(format!(
                "the file holds more than {MAX_RECIPIENTS} rows"
            )));
        }
        match reader.read_byte_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {
                let line = record.position().map_or(0, |p| p.line());
                if record.iter().all(|field| field.trim_ascii().is_empty()) {
                    continue;
                }
                let utf8 = record
                    .iter()
                    .all(|field| std::str::from_utf8(field).is_ok());
                let recipient = if utf8 {
                    recipient_from(&columns, |column| {
                        let i = index.get(column)?;
                        let field = record.get(*i)?;
                        std::str::from_utf8(field).ok().map(str::to_owned)
                    })
                } else {
                    Err("the row is not UTF-8 text".to_owned())
                };
                rows.push(RecipientRow { line, recipient });
            }
            Err(err) => {
                let line = err.position().map_or(0, |p| p.line());
                let reason = match err.kind() {
                    csv::ErrorKind::UnequalLengths {
                        expected_len, len, ..
                    } => format!("expected {expected_len} fields as in the header, found {len}"),
                    _ => format!("unreadable row: {err}"),
                };
                rows.push(RecipientRow {
                    line,
                    recipient: Err(reason),
                });
            }
        }
    }
    Ok(rows)
}

/// Validates JSON recipients (objects keyed by the template's columns; numbers are taken as
/// text) against `template`, numbering them from 1. An unknown key rejects its row.
pub fn parse_recipients_json(items: &[Value], template: &Template) -> Vec<RecipientRow> {
    let columns = template.columns();
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let recipient = match item {
                Value::Object(map) => match map.keys().find(|k| !columns.contains(k)) {
                    Some(unknown) => Err(format!(
                        "unknown field {unknown:?}; the template's columns are {}",
                        columns.join(",")
                    )),
                    None => recipient_from(&columns, |column| match map.get(column)? {
                        Value::String(s) => Some(s.clone()),
                        Value::Number(n) => Some(n.to_string()),
                        _ => None,
                    }),
                },
                _ => Err("each recipient must be an object".to_owned()),
            };
            RecipientRow {
                line: i as u64 + 1,
                recipient,
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Campaigns

/// Where a campaign stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CampaignStatus {
    Draft,
    Sending,
    Paused,
    Stopped,
    Completed,
}

impl CampaignStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CampaignStatus::Draft => "draft",
            CampaignStatus::Sending => "sending",
            CampaignStatus::Paused => "paused",
            CampaignStatus::Stopped => "stopped",
            CampaignStatus::Completed => "completed",
        }
    }
}

impl FromStr for CampaignStatus {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Ok(match s {
            "draft" => CampaignStatus::Draft,
            "sending" => CampaignStatus::Sending,
            "paused" => CampaignStatus::Paused,
            "stopped" => CampaignStatus::Stopped,
            "completed" => CampaignStatus::Completed,
            other => {
                return Err(Error::Corrupt {
                    what: "message campaign",
                    reason: format!("status {other:?}"),
                });
            }
        })
    }
}

/// A message campaign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Campaign {
    pub id: Uuid,
    pub name: String,
    pub template_id: Uuid,
    pub status: CampaignStatus,
    pub rate_per_sec: Option<u32>,
    pub concurrency: Option<u32>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
}

#[derive(sqlx::FromRow)]
struct CampaignRecord {
    id: Uuid,
    name: String,
    template_id: Uuid,
    status: String,
    rate_per_sec: Option<i32>,
    concurrency: Option<i32>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    completed_at: Option<DateTime<Utc>>,
}

impl TryFrom<CampaignRecord> for Campaign {
    type Error = Error;
    fn try_from(r: CampaignRecord) -> Result<Self, Error> {
        Ok(Campaign {
            id: r.id,
            name: r.name,
            template_id: r.template_id,
            status: r.status.parse()?,
            rate_per_sec: r.rate_per_sec.map(|n| n.max(1) as u32),
            concurrency: r.concurrency.map(|n| n.max(1) as u32),
            created_at: r.created_at,
            updated_at: r.updated_at,
            started_at: r.started_at,
            completed_at: r.completed_at,
        })
    }
}

const CAMPAIGN_COLUMNS: &str = "id, name, template_id, status, rate_per_sec, concurrency, \
                                created_at, updated_at, started_at, completed_at";

/// The tenant's message campaigns, newest first (at most `limit`).
pub async fn campaigns(
    pool: &PgPool,
    tenant: TenantId,
    limit: i64,
) -> Result<Vec<Campaign>, Error> {
    let records: Vec<CampaignRecord> = sqlx::query_as(&format!(
        "select {CAMPAIGN_COLUMNS} from message_campaigns where tenant_id = $1
         order by created_at desc, id desc limit $2"
    ))
    .bind(tenant.0)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    records.into_iter().map(Campaign::try_from).collect()
}

/// A rejected input row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RejectedRow {
    pub line: u64,
    pub reason: String,
}

/// A row whose phone number is already in the campaign (earlier in the same upload).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DuplicateRow {
    pub line: u64,
    pub phone: String,
}

/// What a recipients upload did, row by row.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RecipientsReport {
    pub accepted: u64,
    pub duplicates: u64,
    pub rejected: u64,
    pub duplicate_rows: Vec<DuplicateRow>,
    pub rejected_rows: Vec<RejectedRow>,
}

/// Creates a draft campaign of `template` with the good rows of `rows` as recipients, in one
/// transaction; bad and duplicate rows are reported, never blocking the good ones.
pub async fn create_campaign(
    pool: &PgPool,
    tenant: TenantId,
    name: &str,
    template: &Template,
    rows: Vec<RecipientRow>,
) -> Result<(Campaign, RecipientsReport), Error> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 200 {
        return Err(Error::invalid("name", "must be 1 to 200 characters"));
    }
    if rows.len() > MAX_RECIPIENTS {
        return Err(Error::invalid(
            "recipients",
            format!("at most {MAX_RECIPIENTS} recipients per campaign"),
        ));
    }
    let mut report = RecipientsReport::default();
    let mut seen = HashSet::new();
    let mut fresh: Vec<(u64, NewRecipient)> = Vec::new();
    for row in rows {
        match row.recipient {
            Err(reason) => report.rejected_rows.push(RejectedRow {
                line: row.line,
                reason,
            }),
            Ok(recipient) if !seen.insert(recipient.phone.clone()) => {
                report.duplicate_rows.push(DuplicateRow {
                    line: row.line,
                    phone: recipient.phone,
                })
            }
            Ok(recipient) => fresh.push((row.line, recipient)),
        }
    }
    let mut tx = pool.begin().await?;
    let record: CampaignRecord = sqlx::query_as(&format!(
        "insert into message_campaigns (tenant_id, id, name, template_id)
         values ($1, $2, $3, $4) returning {CAMPAIGN_COLUMNS}"
    ))
    .bind(tenant.0)
    .bind(Uuid::now_v7())
    .bind(name)
    .bind(template.id)
    .fetch_one(&mut *tx)
    .await
    .map_err(|e| {
        if error::is_foreign_key_violation(&e) {
            Error::not_found(format!("template {}", template.id))
        } else {
            Error::Database(e)
        }
    })?;
    let campaign = Campaign::try_from(record)?;
    for chunk in fresh.chunks(5_000) {
        let ids: Vec<Uuid> = chunk.iter().map(|_| Uuid::now_v7()).collect();
        let lines: Vec<i32> = chunk
            .iter()
            .map(|(line, _)| i32::try_from(*line).unwrap_or(i32::MAX))
            .collect();
        let codes: Vec<&str> = chunk.iter().map(|(_, r)| r.country_code.as_str()).collect();
        let phones: Vec<&str> = chunk.iter().map(|(_, r)| r.phone.as_str()).collect();
        let params: Vec<Value> = chunk.iter().map(|(_, r)| json!(r.params)).collect();
        let inserted = sqlx::query(
            "insert into message_recipients
                 (tenant_id, campaign_id, id, line, country_code, phone, params)
             select $1, $2, * from unnest($3::uuid[], $4::int[], $5::text[], $6::text[], $7::jsonb[])",
        )
        .bind(tenant.0)
        .bind(campaign.id)
        .bind(&ids)
        .bind(&lines)
        .bind(&codes)
        .bind(&phones)
        .bind(&params)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        report.accepted += inserted;
    }
    tx.commit().await?;
    report.duplicates = report.duplicate_rows.len() as u64;
    report.rejected = report.rejected_rows.len() as u64;
    Ok((campaign, report))
}

/// The tenant's campaign `id`; `lock` takes a row lock for the rest of the transaction.
pub async fn campaign(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
    lock: bool,
) -> Result<Campaign, Error> {
    let record: Option<CampaignRecord> = sqlx::query_as(&format!(
        "select {CAMPAIGN_COLUMNS} from message_campaigns where tenant_id = $1 and id = $2 {}",
        if lock { "for update" } else { "" }
    ))
    .bind(tenant.0)
    .bind(id)
    .fetch_optional(conn)
    .await?;
    record
        .map(Campaign::try_from)
        .transpose()?
        .ok_or_else(|| Error::not_found(format!("message campaign {id}")))
}

fn conflict(campaign: &Campaign, action: &str) -> Error {
    Error::Conflict {
        what: format!(
            "message campaign {} is {}; it cannot {action}",
            campaign.id,
            campaign.status.as_str()
        ),
    }
}

async fn set_status(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
    status: CampaignStatus,
) -> Result<(), Error> {
    sqlx::query(
        "update message_campaigns set status = $3, updated_at = now(),
             completed_at = case when $3 = 'completed' then now() else null end
         where tenant_id = $1 and id = $2",
    )
    .bind(tenant.0)
    .bind(id)
    .bind(status.as_str())
    .execute(conn)
    .await?;
    Ok(())
}

/// The ids of the campaign's recipients without a send yet.
pub async fn pending_recipients(
    conn: &mut PgConnection,
    tenant: TenantId,
    campaign: Uuid,
) -> Result<Vec<Uuid>, Error> {
    Ok(sqlx::query_scalar(
        "select id from message_recipients
         where tenant_id = $1 and campaign_id = $2 and send_id is null order by id",
    )
    .bind(tenant.0)
    .bind(campaign)
    .fetch_all(conn)
    .await?)
}

/// Draft → sending at `rate_per_sec` with `concurrency` sends in flight at most; returns the
/// recipients to send to. Inside the caller's transaction (which writes their jobs).
pub async fn start_sending(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
    rate_per_sec: u32,
    concurrency: u32,
) -> Result<(Campaign, Vec<Uuid>), Error> {
    if !RATE_RANGE.contains(&rate_per_sec) {
        return Err(Error::invalid("rate_per_sec", "must be 1 to 1000"));
    }
    if !CONCURRENCY_RANGE.contains(&concurrency) {
        return Err(Error::invalid("concurrency", "must be 1 to 100"));
    }
    let current = campaign(conn, tenant, id, true).await?;
    if current.status != CampaignStatus::Draft {
        return Err(conflict(&current, "start sending (only a draft can)"));
    }
    sqlx::query(
        "update message_campaigns set status = 'sending', rate_per_sec = $3, concurrency = $4,
             started_at = now(), updated_at = now()
         where tenant_id = $1 and id = $2",
    )
    .bind(tenant.0)
    .bind(id)
    .bind(rate_per_sec as i32)
    .bind(concurrency as i32)
    .execute(&mut *conn)
    .await?;
    let recipients = pending_recipients(conn, tenant, id).await?;
    Ok((campaign(conn, tenant, id, false).await?, recipients))
}

/// Sending → paused: send steps that have not begun leave their recipients pending.
pub async fn pause(conn: &mut PgConnection, tenant: TenantId, id: Uuid) -> Result<Campaign, Error> {
    let current = campaign(conn, tenant, id, true).await?;
    match current.status {
        CampaignStatus::Paused => return Ok(current),
        CampaignStatus::Sending => set_status(conn, tenant, id, CampaignStatus::Paused).await?,
        _ => return Err(conflict(&current, "pause (only a sending one can)")),
    }
    campaign(conn, tenant, id, false).await
}

/// Paused → sending; returns the pending recipients, whose send steps the caller writes again.
pub async fn resume(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
) -> Result<(Campaign, Vec<Uuid>), Error> {
    let current = campaign(conn, tenant, id, true).await?;
    if current.status != CampaignStatus::Paused {
        return Err(conflict(&current, "resume (only a paused one can)"));
    }
    set_status(conn, tenant, id, CampaignStatus::Sending).await?;
    let pending = pending_recipients(conn, tenant, id).await?;
    Ok((campaign(conn, tenant, id, false).await?, pending))
}

/// Any state but completed → stopped, for good: pending recipients are never sent.
pub async fn stop(conn: &mut PgConnection, tenant: TenantId, id: Uuid) -> Result<Campaign, Error> {
    let current = campaign(conn, tenant, id, true).await?;
    match current.status {
        CampaignStatus::Stopped => return Ok(current),
        CampaignStatus::Completed => return Err(conflict(&current, "stop")),
        _ => set_status(conn, tenant, id, CampaignStatus::Stopped).await?,
    }
    campaign(conn, tenant, id, false).await
}

/// Puts the campaign's failed recipients back to pending (their failed sends stay on record,
/// detached) and a completed campaign back to sending; returns the recipients whose send steps
/// the caller writes (none while paused: resuming writes them).
pub async fn retry_failed(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: Uuid,
) -> Result<(Campaign, Vec<Uuid>), Error> {
    let current = campaign(conn, tenant, id, true).await?;
    if matches!(
        current.status,
        CampaignStatus::Draft | CampaignStatus::Stopped
    ) {
        return Err(conflict(&current, "retry failed recipients"));
    }
    let retried: Vec<Uuid> = sqlx::query_scalar(
        "update message_recipients r set send_id = null
         from sends s
         where r.tenant_id = $1 and r.campaign_id = $2
           and s.tenant_id = r.tenant_id and s.id = r.send_id and s.status = 'failed'
         returning r.id",
    )
    .bind(tenant.0)
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    if current.status == CampaignStatus::Completed && !retried.is_empty() {
        set_status(conn, tenant, id, CampaignStatus::Sending).await?;
    }
    let campaign = campaign(conn, tenant, id, false).await?;
    let to_send = if campaign.status == CampaignStatus::Sending {
        retried
    } else {
        Vec::new()
    };
    Ok((campaign, to_send))
}

/// Live counts of a campaign's recipients by status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    pub total: i64,
    pub pending: i64,
    pub attempting: i64,
    pub sent: i64,
    pub delivered: i64,
    pub read: i64,
    pub failed: i64,
    pub unknown: i64,
}

/// The campaign's counts; `NotFound` for another tenant's campaign.
pub async fn stats(pool: &PgPool, tenant: TenantId, id: Uuid) -> Result<Stats, Error> {
    let mut conn = pool.acquire().await?;
    campaign(&mut conn, tenant, id, false).await?;
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "select coalesce(s.status, 'pending'), count(*)
         from message_recipients r
         left join sends s on s.tenant_id = r.tenant_id and s.id = r.send_id
         where r.tenant_id = $1 and r.campaign_id = $2
         group by 1",
    )
    .bind(tenant.0)
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    let mut stats = Stats::default();
    for (status, n) in rows {
        stats.total += n;
        match status.as_str() {
            "pending" => stats.pending += n,
            "attempting" => stats.attempting += n,
            "sent" => stats.sent += n,
            "delivered" => stats.delivered += n,
            "read" => stats.read += n,
            "failed" => stats.failed += n,
            "unknown" => stats.unknown += n,
            _ => {}
        }
    }
    Ok(stats)
}

/// A recipient as the failed-recipients export shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedRecipient {
    pub line: i32,
    pub country_code: String,
    /// The whole number, country code first.
    pub phone: String,
    pub params: Vec<String>,
    pub error_code: Option<String>,
    pub error: Option<String>,
}

/// The campaign's failed recipients in upload order (`NotFound` for another tenant's).
pub async fn failed_recipients(
    pool: &PgPool,
    tenant: TenantId,
    id: Uuid,
) -> Result<Vec<FailedRecipient>, Error> {
    let mut conn = pool.acquire().await?;
    campaign(&mut conn, tenant, id, false).await?;
    #[allow(clippy::type_complexity)]
    let rows: Vec<(i32, String, String, Value, Option<String>, Option<String>)> = sqlx::query_as(
        "select r.line, r.country_code, r.phone, r.params, s.error_code, s.error
         from message_recipients r
         join sends s on s.tenant_id = r.tenant_id and s.id = r.send_id
         where r.tenant_id = $1 and r.campaign_id = $2 and s.status = 'failed'
         order by r.line, r.id",
    )
    .bind(tenant.0)
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    rows.into_iter()
        .map(|(line, country_code, phone, params, error_code, error)| {
            let params = serde_json::from_value(params).map_err(|e| Error::Corrupt {
                what: "message recipient",
                reason: format!("params: {e}"),
            })?;
            Ok(FailedRecipient {
                line,
                country_code,
                phone,
                params,
                error_code,
                error,
            })
        })
        .collect()
}

/// One CSV field, quoted when it must be.
fn csv_field(value: &str) -> String {
    if value.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value.to_owned()
    }
}

/// The failed recipients as CSV: `template`'s columns plus `error_code,error` (drop those two to
/// upload the file again). The API's `failed.csv` and the CLI's `failed-csv` both serve this.
pub fn failed_csv(template: &Template, failed: &[FailedRecipient]) -> String {
    let mut columns = template.columns();
    columns.extend(["error_code".to_owned(), "error".to_owned()]);
    let mut out = columns.join(",");
    out.push('\n');
    for row in failed {
        let national = row
            .phone
            .strip_prefix(&row.country_code)
            .unwrap_or(&row.phone);
        let mut fields = vec![row.country_code.as_str(), national];
        fields.extend(row.params.iter().map(String::as_str));
        fields.push(row.error_code.as_deref().unwrap_or_default());
        fields.push(row.error.as_deref().unwrap_or_default());
        let line: Vec<String> = fields.into_iter().map(csv_field).collect();
        out.push_str(&line.join(","));
        out.push('\n');
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The send step's bookkeeping

/// Everything a send step needs about one recipient, read in one query.
#[derive(Debug, Clone)]
pub struct SendContext {
    pub campaign_id: Uuid,
    pub campaign_status: CampaignStatus,
    pub rate_per_sec: u32,
    pub concurrency: u32,
    pub recipient_id: Uuid,
    pub phone: String,
    pub params: Vec<String>,
    pub template: Template,
    /// The recipient's current send, if one was begun.
    pub send: Option<sends::Send>,
    /// `None` when the tenant has not configured WhatsApp.
    pub settings: Option<WhatsAppSettings>,
}

#[derive(sqlx::FromRow)]
struct ContextRecord {
    campaign_id: Uuid,
    campaign_status: String,
    rate_per_sec: Option<i32>,
    concurrency: Option<i32>,
    phone: String,
    params: Value,
    #[sqlx(flatten)]
    template: TemplateRecord,
    send_id: Option<Uuid>,
    send_channel: Option<String>,
    send_job_id: Option<String>,
    send_status: Option<String>,
    send_provider_message_id: Option<String>,
    send_error_code: Option<String>,
    send_error: Option<String>,
    settings_api_url: Option<String>,
    settings_token: Option<String>,
    settings_phone_number_id: Option<String>,
    settings_app_secret: Option<String>,
    settings_verify_token: Option<String>,
}

/// The send context's select: $1 tenant, `$recipient` the recipient's parameter ([`send_context`]
/// and [`claim_send`] share it). Each row it adds to the recipient
/// is looked up by its key, inside a lateral subquery the planner cannot flatten (`offset 0`):
/// joined plainly, a plan made while the statistics knew few of the tenant's sends (or
/// campaigns) joins by the tenant alone and filters every one of them for the recipient's
/// (measured: 15,000 sends read per context at 16,000 sends).
macro_rules! send_context_select {
    ($recipient:literal) => {
        concat!(
            "select r.campaign_id, c.status as campaign_status, c.rate_per_sec, c.concurrency, r.phone, r.params,
                t.id, t.name, t.language, t.components, t.header_params, t.body_params,
                t.button_url_params, t.created_at,
                s.id as send_id, s.channel as send_channel, s.job_id as send_job_id,
                s.status as send_status, s.provider_message_id as send_provider_message_id,
                s.error_code as send_error_code, s.error as send_error,
                w.api_url as settings_api_url, w.token as settings_token,
                w.phone_number_id as settings_phone_number_id,
                w.app_secret as settings_app_secret, w.verify_token as settings_verify_token
         from message_recipients r
         cross join lateral (
             select c.status, c.rate_per_sec, c.concurrency, c.template_id from message_campaigns c
             where c.tenant_id = r.tenant_id and c.id = r.campaign_id offset 0) c
         cross join lateral (
             select t.id, t.name, t.language, t.components, t.header_params, t.body_params,
                    t.button_url_params, t.created_at
             from message_templates t
             where t.tenant_id = r.tenant_id and t.id = c.template_id offset 0) t
         left join lateral (
             select s.id, s.channel, s.job_id, s.status, s.provider_message_id, s.error_code, s.error
             from sends s where s.tenant_id = r.tenant_id and s.id = r.send_id offset 0) s on true
         left join lateral (
             select w.api_url, w.token, w.phone_number_id, w.app_secret, w.verify_token
             from whatsapp_settings w where w.tenant_id = r.tenant_id offset 0) w on true
         where r.tenant_id = $1 and r.id = ",
            $recipient
        )
    };
}

const SEND_CONTEXT: &str = send_context_select!("$2");

/// The send step's view of a recipient of the tenant's campaign, in one query (a send step
/// reads it on every run, up to a thousand times a second per number). `conn` is a pool or a
/// connection: the send step reads and begins its send on one connection.
///
/// The recipient is found by its primary key alone and its campaign compared afterwards: with
/// the campaign in the condition too, a plan made while the table's statistics predated the
/// campaign's rows walks the campaign's (tenant, campaign, phone) index and filters every
/// recipient for the one id (0.75 ms per read at 4,000 recipients, growing with the campaign).
pub async fn send_context<'c>(
    conn: impl sqlx::PgExecutor<'c>,
    tenant: TenantId,
    campaign_id: Uuid,
    recipient_id: Uuid,
) -> Result<SendContext, Error> {
    let record: ContextRecord = sqlx::query_as(SEND_CONTEXT)
        .bind(tenant.0)
        .bind(recipient_id)
        .fetch_optional(conn)
        .await?
        .filter(|record: &ContextRecord| record.campaign_id == campaign_id)
        .ok_or_else(|| Error::not_found(format!("recipient {recipient_id}")))?;
    context_from(record, recipient_id)
}

/// The send context a [`ContextRecord`] of `recipient_id` describes.
fn context_from(record: ContextRecord, recipient_id: Uuid) -> Result<SendContext, Error> {
    let campaign_id = record.campaign_id;
    let params: Vec<String> =
        serde_json::from_value(record.params).map_err(|e| Error::Corrupt {
            what: "message recipient",
            reason: format!("params: {e}"),
        })?;
    let send = match (record.send_id, record.send_status) {
        (Some(id), Some(status)) => Some(sends::Send::try_from(sends::SendRecord {
            id,
            channel: record.send_channel.unwrap_or_default(),
            job_id: record.send_job_id.unwrap_or_default(),
            status,
            provider_message_id: record.send_provider_message_id,
            error_code: record.send_error_code,
            error: record.send_error,
        })?),
        _ => None,
    };
    let settings = match (
        record.settings_token,
        record.settings_phone_number_id,
        record.settings_app_secret,
        record.settings_verify_token,
    ) {
        (Some(token), Some(phone_number_id), Some(app_secret), Some(verify_token)) => {
            Some(WhatsAppSettings {
                api_url: record.settings_api_url,
                token,
                phone_number_id,
                app_secret,
                verify_token,
            })
        }
        _ => None,
    };
    Ok(SendContext {
        campaign_id,
        campaign_status: record.campaign_status.parse()?,
        rate_per_sec: record.rate_per_sec.unwrap_or(1).max(1) as u32,
        concurrency: record.concurrency.unwrap_or(1).max(1) as u32,
        recipient_id,
        phone: record.phone,
        params,
        template: record.template.into(),
        send,
        settings,
    })
}

/// What beginning a send did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Begin {
    /// The send is recorded as attempting: call the provider with this send id.
    Started(Uuid),
    /// The recipient already has a send (another job began it).
    Taken,
    /// The campaign is not sending (paused, stopped).
    NotSending(CampaignStatus),
}

/// The part of [`begin_send`]'s and [`claim_send`]'s statements that begins the send: the
/// recipient's row is updated (and locked) only if it has no send yet, checked on the row it
/// locked, and only if `$may_begin` (an `exists` query) says so; the send is recorded for it.
/// $1 tenant, $3 recipient, $4 the new send id, $5 channel, $6 job id.
macro_rules! begin_ctes {
    ($may_begin:literal) => {
        concat!(
            "claimed as (
                 update message_recipients set send_id = $4
                 where tenant_id = $1 and id = $3 and coalesce(send_id, $4) = $4
                   and exists (",
            $may_begin,
            ")
                 returning id
             ), recorded as (
                 insert into sends (tenant_id, id, channel, job_id)
                 select $1, $4, $5, $6 from claimed
                 returning id
             )"
        )
    };
}

/// [`begin_send`]'s statement: $1 tenant, $2 campaign, $3 recipient, $4 the new send id,
/// $5 channel, $6 job id.
const BEGIN_SEND: &str = concat!(
    "with campaign as (
         select c.status from message_campaigns c
         where c.tenant_id = $1 and c.id = $2
           and c.id = (select campaign_id from message_recipients
                       where tenant_id = $1 and id = $3)
     ), ",
    begin_ctes!("select 1 from campaign where status in ('sending', 'completed')"),
    " select (select status from campaign), (select count(*) from recorded)"
);

/// Binds the parameters [`begin_ctes`] names, and $2 the campaign, to `statement`.
fn bind_begin<'q, O>(
    statement: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    tenant: TenantId,
    campaign_id: Uuid,
    recipient_id: Uuid,
    send_id: Uuid,
    job_id: &'q str,
) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
    statement
        .bind(tenant.0)
        .bind(campaign_id)
        .bind(recipient_id)
        .bind(send_id)
        .bind(CHANNEL)
        .bind(job_id)
}

/// Records a send for the recipient as `attempting` by `job_id`, unless the campaign is not
/// sending or the recipient already has a send. One statement that locks nothing but the
/// recipient's row: two jobs for one recipient serialise on it and the second finds it taken
/// (its send is never written), while the attempts of different recipients commit side by side
/// (sharing WAL flushes). The campaign's concurrency is the caller's to count (the send step
/// holds a slot in Redis around this call and the provider's answer).
///
/// The recipient is found by its primary key, its campaign compared by the `campaign` part,
/// and "no send yet" is written `coalesce(send_id, $4) = $4` ($4 is a new id, never stored):
/// written `campaign_id = $2 and send_id is null`, the update matches the partial index over
/// the campaign's pending recipients, and a plan made while that index was small walks every
/// pending recipient for the one id (0.47 ms per send at 4,000 recipients, growing with the
/// campaign).
pub async fn begin_send<'c>(
    conn: impl sqlx::PgExecutor<'c>,
    tenant: TenantId,
    campaign_id: Uuid,
    recipient_id: Uuid,
    job_id: &str,
) -> Result<Begin, Error> {
    let send_id = Uuid::now_v7();
    let (status, recorded): (Option<String>, i64) = bind_begin(
        sqlx::query_as(BEGIN_SEND),
        tenant,
        campaign_id,
        recipient_id,
        send_id,
        job_id,
    )
    .fetch_one(conn)
    .await
    .map_err(crate::error::tenant_must_exist)?;
    let status: CampaignStatus = status
        .ok_or_else(|| Error::not_found(format!("message campaign {campaign_id}")))?
        .parse()?;
    if !matches!(status, CampaignStatus::Sending | CampaignStatus::Completed) {
        return Ok(Begin::NotSending(status));
    }
    Ok(if recorded == 1 {
        Begin::Started(send_id)
    } else {
        Begin::Taken
    })
}

/// What a send step expects of its campaign when it claims a recipient without reading first:
/// the sender it was admitted on and the concurrency it holds a slot under.
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    pub phone_number_id: &'a str,
    pub rate_per_sec: u32,
    pub concurrency: u32,
}

/// [`claim_send`]'s statement: $1 tenant, $2 campaign, $3 recipient, $4 the new send id,
/// $5 channel, $6 job id, $7–$9 the [`Expected`] number, rate and concurrency. The context
/// is read once (a materialised CTE); the recipient's update locks its row and checks "no send
/// yet" again on the row it locked, as [`begin_send`]'s does.
const CLAIM_SEND: &str = concat!(
    "with ctx as (",
    send_context_select!("$3"),
    "), ",
    begin_ctes!(
        "select 1 from ctx
         where ctx.campaign_id = $2 and ctx.send_id is null
           and ctx.campaign_status in ('sending', 'completed')
           and ctx.settings_phone_number_id = $7
           and ctx.rate_per_sec = $8 and ctx.concurrency = $9"
    ),
    " select ctx.*, (select count(*) from recorded) as started from ctx"
);

#[derive(sqlx::FromRow)]
struct ClaimRecord {
    #[sqlx(flatten)]
    context: ContextRecord,
    started: i64,
}

/// [`send_context`] and [`begin_send`] in one statement, for a send step already admitted on
/// the sender it `expected`: the recipient's send is begun (`attempting`, by `job_id`) only if
/// the campaign is sending, the recipient has none, and the campaign's number, rate and
/// concurrency are still the expected ones. Returns the context as it was read, and the new
/// send's id when one was begun; without one, the caller goes on from the context as after
/// [`send_context`] (a re-delivered job, a paused campaign, a changed number…).
pub async fn claim_send<'c>(
    conn: impl sqlx::PgExecutor<'c>,
    tenant: TenantId,
    campaign_id: Uuid,
    recipient_id: Uuid,
    job_id: &str,
    expected: Expected<'_>,
) -> Result<(SendContext, Option<Uuid>), Error> {
    let send_id = Uuid::now_v7();
    let record: ClaimRecord = bind_begin(
        sqlx::query_as(CLAIM_SEND),
        tenant,
        campaign_id,
        recipient_id,
        send_id,
        job_id,
    )
    .bind(expected.phone_number_id)
    .bind(i32::try_from(expected.rate_per_sec).unwrap_or(i32::MAX))
    .bind(i32::try_from(expected.concurrency).unwrap_or(i32::MAX))
    .fetch_optional(conn)
    .await
    .map_err(crate::error::tenant_must_exist)?
    .filter(|record: &ClaimRecord| record.context.campaign_id == campaign_id)
    .ok_or_else(|| Error::not_found(format!("recipient {recipient_id}")))?;
    let started = (record.started == 1).then_some(send_id);
    Ok((context_from(record.context, recipient_id)?, started))
}

/// Undoes a send the provider certainly did not act on: the send is deleted and the recipient
/// is pending again. Nothing happens if the send has moved on (a webhook settled it).
pub async fn abandon_send(
    pool: &PgPool,
    tenant: TenantId,
    recipient_id: Uuid,
    send_id: Uuid,
) -> Result<bool, Error> {
    let mut tx = pool.begin().await?;
    if !sends::abandon(&mut tx, tenant, send_id).await? {
        return Ok(false);
    }
    sqlx::query(
        "update message_recipients set send_id = null
         where tenant_id = $1 and id = $2 and send_id = $3",
    )
    .bind(tenant.0)
    .bind(recipient_id)
    .bind(send_id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// [`complete_if_done`]'s statement: $1 tenant, $2 campaign, $3 the send step's outbox row or
/// null. The outbox row is finished as [`crate::outbox::mark_completed`] does (found by its
/// key, never walking the in-flight rows).
const COMPLETE_IF_DONE: &str = "with job as (
             update outbox set completed_at = now()
             where id = $3 and tenant_id = $1 and coalesce(completed_at, dead_at) is null
             returning id
         ), completed as (
             update message_campaigns c set status = 'completed', completed_at = now(), updated_at = now()
             where c.tenant_id = $1 and c.id = $2 and c.status = 'sending'
               and not exists (select 1 from message_recipients r
                               where r.tenant_id = $1 and r.campaign_id = $2 and r.send_id is null)
               and not exists (select 1 from sends s
                               join message_recipients r on r.tenant_id = s.tenant_id and r.send_id = s.id
                               where s.tenant_id = $1 and s.status = 'attempting' and r.campaign_id = $2)
             returning c.id
         )
         select count(*) from completed";

/// Sending → completed once no recipient is pending or attempting. Returns whether this call
/// completed it.
///
/// `job`: the outbox row of the send step calling this as its last write, finished in the
/// same statement (one commit for both; the step then tells its worker not to finish it again).
/// This must run after the step's own send is settled and committed, never in its statement:
/// the last two steps of a campaign, settling at once, would each see the other attempting.
pub async fn complete_if_done<'c>(
    conn: impl sqlx::PgExecutor<'c>,
    tenant: TenantId,
    campaign_id: Uuid,
    job: Option<Uuid>,
) -> Result<bool, Error> {
    let done: i64 = sqlx::query_scalar(COMPLETE_IF_DONE)
        .bind(tenant.0)
        .bind(campaign_id)
        .bind(job)
        .fetch_one(conn)
        .await?;
    Ok(done == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_only_when_needed() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
    }

    #[test]
    fn template_columns_follow_the_placeholders() {
        let components = json!([
            {"type": "HEADER", "format": "TEXT", "text": "Hi {{1}}"},
            {"type": "body", "text": "Your order {{1}} ships {{2}}; {{1}} again"},
            {"type": "FOOTER", "text": "bye"},
            {"type": "BUTTONS", "buttons": [
                {"type": "QUICK_REPLY", "text": "Stop"},
                {"type": "URL", "text": "Track", "url": "https://t.example/{{1}}"}
            ]}
        ]);
        let params = template_params(&components).unwrap();
        assert_eq!(params.header, 1);
        assert_eq!(params.body, 2);
        assert_eq!(params.url_buttons, vec![1]);
        assert_eq!(
            params.columns().join(","),
            "country_code,phone_number,header_param_1,body_param_1,body_param_2,button_url_param"
        );
    }

    #[test]
    fn bad_templates_are_refused_with_a_reason() {
        for (components, needle) in [
            (
                json!([{"type": "BODY", "text": "{{1}} {{3}}"}]),
                "without gaps",
            ),
            (json!([{"type": "BODY", "text": "{{x}}"}]), "number"),
            (json!([{"type": "BODY", "text": "{{1"}]), "unclosed"),
            (json!([{"type": "HEADER", "text": "x"}]), "BODY"),
            (
                json!([{"type": "HEADER", "format": "IMAGE"}, {"type": "BODY", "text": "x"}]),
                "IMAGE",
            ),
            (
                json!([{"type": "BODY", "text": "x"}, {"type": "BUTTONS", "buttons": [{"type": "URL", "url": "https://a/{{1}}/b"}]}]),
                "at its end",
            ),
            (json!({"type": "BODY"}), "list"),
        ] {
            let err = template_params(&components).unwrap_err();
            assert!(err.contains(needle), "{components}: {err}");
        }
    }

    #[test]
    fn phone_numbers_are_normalised_to_e164_digits() {
        assert_eq!(
            normalize_phone("+44", "07700 900123").unwrap(),
            "447700900123"
        );
        assert_eq!(
            normalize_phone("1", "(555) 010-0123").unwrap(),
            "15550100123"
        );
        assert_eq!(
            normalize_phone("0049", "30 1234567").unwrap(),
            "49301234567"
        );
        assert!(normalize_phone("", "5550100").is_err());
        assert!(normalize_phone("1", "12").is_err());
        assert!(normalize_phone("1", "555abc0123").is_err());
        assert!(normalize_phone("1234", "5550100123").is_err());
        assert!(normalize_phone("1", "5".repeat(16).as_str()).is_err());
    }

    #[test]
    fn language_codes_and_names_are_checked() {
        assert!(valid_language("en"));
        assert!(valid_language("en_US"));
        assert!(!valid_language("EN"));
        assert!(!valid_language("en-us"));
        assert!(valid_template_name("order_update_2"));
        assert!(!valid_template_name("Order Update"));
    }
}

#[cfg(test)]
mod plan_tests {
    use super::*;
    use crate::plans::{rows_discarded, rows_read_from, uuid};

    async fn acme(pool: &PgPool) -> TenantId {
        crate::tenants::create(pool, "acme", "UTC")
            .await
            .unwrap()
            .0
            .id
    }

    #[sqlx::test(migrator = "crate::MIGRATOR")]
    async fn the_send_steps_statements_find_their_recipient_by_its_key(pool: PgPool) {
        let tenant = acme(&pool).await;
        let (campaign, recipients) = sending_campaign(&pool, tenant, 400).await;
        let last = *recipients.last().unwrap();

        let context = [uuid(tenant.0), uuid(last)];
        assert_eq!(rows_discarded(&pool, SEND_CONTEXT, &context).await, 0);
        let begin = [
            uuid(tenant.0),
            uuid(campaign),
            uuid(last),
            uuid(Uuid::now_v7()),
            format!("'{CHANNEL}'"),
            "'job-1'".to_owned(),
        ];
        assert_eq!(rows_discarded(&pool, BEGIN_SEND, &begin).await, 0);

        // What the statements said before: with the campaign (and "no send yet") in the
        // condition, the same plan walks the campaign's recipients for the one it wants.
        let before = "update message_recipients set send_id = $4
                      where tenant_id = $1 and campaign_id = $2 and id = $3 and send_id is null";
        let discarded = rows_discarded(&pool, before, &begin[..4]).await;
        assert!(
            discarded > 0,
            "the old statement discarded {discarded} rows"
        );
    }

    /// The completion check finishes the send step's outbox row by its key, in the same
    /// statement, whether or not the campaign is done.
    #[sqlx::test(migrator = "crate::MIGRATOR")]
    async fn the_completion_check_finishes_the_steps_outbox_row(pool: PgPool) {
        let tenant = acme(&pool).await;
        let (campaign, _) = sending_campaign(&pool, tenant, 10).await;
        let jobs: Vec<crate::outbox::NewOutboxJob> = (0..400)
            .map(|n| crate::outbox::NewOutboxJob {
                queue: herald_core::QueueName::try_from("whatsapp_send".to_owned()).unwrap(),
                payload: json!({ "n": n }),
                payload_version: 1,
                priority: herald_core::Priority::default(),
                max_attempts: None,
                run_at: None,
                job_key: None,
            })
            .collect();
        let mut tx = pool.begin().await.unwrap();
        let ids = crate::outbox::insert_many(&mut tx, tenant, &jobs)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let job = ids[200];
        let args = [uuid(tenant.0), uuid(campaign), uuid(job)];
        assert_eq!(
            rows_read_from(&pool, COMPLETE_IF_DONE, &args, "outbox").await,
            1
        );

        // Recipients are still pending: the campaign goes on, the job is finished.
        assert!(
            !complete_if_done(&pool, tenant, campaign, Some(job))
                .await
                .unwrap()
        );
        let finished: Vec<Uuid> = sqlx::query_scalar(
            "select id from outbox where tenant_id = $1 and completed_at is not null",
        )
        .bind(tenant.0)
        .fetch_all(&pool)
        .await
        .unwrap();
        assert_eq!(finished, vec![job]);
    }

    /// The send context joined plainly, as it was: what the test below shows walking.
    const JOINED_CONTEXT: &str = "select r.campaign_id, c.status, s.id, s.status, w.token
         from message_recipients r
         join message_campaigns c on c.tenant_id = r.tenant_id and c.id = r.campaign_id
         join message_templates t on t.tenant_id = c.tenant_id and t.id = c.template_id
         left join sends s on s.tenant_id = r.tenant_id and s.id = r.send_id
         left join whatsapp_settings w on w.tenant_id = r.tenant_id
         where r.tenant_id = $1 and r.id = $2";

    /// A campaign of `n` recipients of the tenant's, sending; its recipients' ids, in order.
    async fn sending_campaign(pool: &PgPool, tenant: TenantId, n: u32) -> (Uuid, Vec<Uuid>) {
        let template = create_template(
            pool,
            tenant,
            "order_update",
            "en_US",
            &json!([{"type": "BODY", "text": "Order {{1}}"}]),
        )
        .await
        .unwrap();
        let rows = (0..n)
            .map(|i| RecipientRow {
                line: u64::from(i) + 2,
                recipient: Ok(NewRecipient {
                    country_code: "1".into(),
                    phone: format!("1555{:07}", 100_000 + i),
                    params: vec![format!("#{i}")],
                }),
            })
            .collect();
        let (campaign, _) = create_campaign(pool, tenant, "launch", &template, rows)
            .await
            .unwrap();
        let mut tx = pool.begin().await.unwrap();
        let (_, recipients) = start_sending(&mut tx, tenant, campaign.id, 50, 1)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        (campaign.id, recipients)
    }

    /// Statistics taken before anyone had sent (a new database, as in the bench), then two
    /// tenants' campaigns send: the context of a recipient with a send reads that send by its
    /// key, not by walking the tenant's sends.
    #[sqlx::test(migrator = "crate::MIGRATOR")]
    async fn the_send_context_reads_the_recipients_send_by_its_key(pool: PgPool) {
        let mut tenants = Vec::new();
        for name in ["other", "acme"] {
            let tenant = crate::tenants::create(&pool, name, "UTC")
                .await
                .unwrap()
                .0
                .id;
            sqlx::query("insert into whatsapp_settings (tenant_id, token, phone_number_id, app_secret, verify_token)
                         values ($1, 't', 'p', 'a', 'v')")
                .bind(tenant.0)
                .execute(&pool)
                .await
                .unwrap();
            tenants.push(tenant);
        }
        let (other, acme) = (tenants[0], tenants[1]);
        let (other_campaign, other_recipients) = sending_campaign(&pool, other, 10).await;
        let (campaign, recipients) = sending_campaign(&pool, acme, 400).await;
        sqlx::query("analyze").execute(&pool).await.unwrap();
        for (i, recipient) in other_recipients.iter().enumerate() {
            begin_send(
                &pool,
                other,
                other_campaign,
                *recipient,
                &format!("other-{i}"),
            )
            .await
            .unwrap();
        }
        for (i, recipient) in recipients.iter().enumerate() {
            begin_send(&pool, acme, campaign, *recipient, &format!("job-{i}"))
                .await
                .unwrap();
        }
        let context = [uuid(acme.0), uuid(recipients[200])];
        assert_eq!(
            rows_read_from(&pool, SEND_CONTEXT, &context, "sends").await,
            1
        );
        let ctx = send_context(&pool, acme, campaign, recipients[200])
            .await
            .unwrap();
        assert_eq!(ctx.send.map(|s| s.job_id), Some("job-200".to_owned()));
        // Claiming reads the same way, and finds the recipient by its key to update it.
        let claim = [
            uuid(acme.0),
            uuid(campaign),
            uuid(recipients[200]),
            uuid(Uuid::now_v7()),
            format!("'{CHANNEL}'"),
            "'job-x'".to_owned(),
            "'p'".to_owned(),
            "50".to_owned(),
            "1".to_owned(),
        ];
        assert_eq!(rows_read_from(&pool, CLAIM_SEND, &claim, "sends").await, 1);
        // The context's read, and the claim's when it gets that far (not here: a send exists).
        let read = rows_read_from(&pool, CLAIM_SEND, &claim, "message_recipients").await;
        assert!(read <= 2, "the claim read {read} recipients");
        // The joined statement walked the tenant's sends up to the recipient's (201 of them).
        let read = rows_read_from(&pool, JOINED_CONTEXT, &context, "sends").await;
        assert!(read > 100, "the joined statement read {read} sends");
    }
}
