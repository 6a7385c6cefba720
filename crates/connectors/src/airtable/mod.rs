//! Airtable Web API client: upsert, list and delete records in one base.
//!
//! It sends each call once and maps the answer to an [`Error`] carrying the retry decision;
//! pacing (5 req/s per base) and retries belong to the caller's admission control and job
//! runner, never to sleeps in here.

mod error;

use std::time::Duration;

use secrecy::{ExposeSecret as _, SecretString};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use error::{Error, RATE_LIMIT_LOCKOUT};

/// Airtable's public API.
pub const DEFAULT_API_URL: &str = "https://api.airtable.com";
/// Airtable takes at most this many records per create, update, upsert or delete.
pub const MAX_RECORDS_PER_REQUEST: usize = 10;
/// Airtable returns at most this many records per list page.
pub const MAX_PAGE_SIZE: usize = 100;
/// The per-request timeout unless configured otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Where and as whom to talk to Airtable.
#[derive(Clone, Debug)]
pub struct AirtableConfig {
    /// `AIRTABLE_API_URL`; a fake's URL in tests. No trailing `/v0`.
    pub api_url: String,
    pub token: SecretString,
    pub base_id: String,
    /// Per request, connection included.
    pub timeout: Duration,
}

impl AirtableConfig {
    /// Airtable's public API with the default timeout.
    pub fn new(token: SecretString, base_id: impl Into<String>) -> Self {
        Self {
            api_url: DEFAULT_API_URL.to_owned(),
            token,
            base_id: base_id.into(),
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// One Airtable record.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct Record {
    pub id: String,
    #[serde(rename = "createdTime", default)]
    pub created_time: String,
    #[serde(default)]
    pub fields: Map<String, Value>,
}

/// One page of a listing; `offset` is the cursor for the next page, absent on the last.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct Page {
    pub records: Vec<Record>,
    #[serde(default)]
    pub offset: Option<String>,
}

/// What an upsert did: every record as stored (in request order), and which ids were created
/// and which updated.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct UpsertResult {
    pub records: Vec<(String, Map<String, Value>)>,
    pub created: Vec<String>,
    pub updated: Vec<String>,
}

#[derive(Serialize)]
struct UpsertBody<'a> {
    #[serde(rename = "performUpsert")]
    perform_upsert: PerformUpsert<'a>,
    records: Vec<FieldsOnly<'a>>,
}

#[derive(Serialize)]
struct PerformUpsert<'a> {
    #[serde(rename = "fieldsToMergeOn")]
    fields_to_merge_on: &'a [&'a str],
}

#[derive(Serialize)]
struct FieldsOnly<'a> {
    fields: &'a Map<String, Value>,
}

#[derive(Deserialize)]
struct UpsertResponse {
    records: Vec<Record>,
    #[serde(rename = "createdRecords", default)]
    created_records: Vec<String>,
    #[serde(rename = "updatedRecords", default)]
    updated_records: Vec<String>,
}

#[derive(Deserialize)]
struct DeleteResponse {
    records: Vec<DeletedRecord>,
}

#[derive(Deserialize)]
struct DeletedRecord {
    id: String,
    #[serde(default)]
    deleted: bool,
}

/// What a list request asks for beyond the table.
#[derive(Clone, Debug)]
pub struct ListOptions<'a> {
    /// Clamped to 1..=100.
    pub page_size: usize,
    /// The cursor from the previous page.
    pub offset: Option<&'a str>,
    /// An Airtable formula; only records for which it is truthy are returned. See
    /// [`formula_equals`].
    pub filter_by_formula: Option<&'a str>,
    /// Only these fields are returned; all when empty.
    pub fields: &'a [&'a str],
}

impl Default for ListOptions<'_> {
    fn default() -> Self {
        Self {
            page_size: MAX_PAGE_SIZE,
            offset: None,
            filter_by_formula: None,
            fields: &[],
        }
    }
}

/// A formula matching records whose `field` equals the text `value`:
/// `{field} = 'value'`, with quotes and backslashes escaped.
pub fn formula_equals(field: &str, value: &str) -> String {
    let field = field.replace('}', "\\}");
    let value = value.replace('\\', "\\\\").replace('\'', "\\'");
    format!("{{{field}}} = '{value}'")
}

/// A client for one Airtable base. Cheap to clone; clones share the connection pool.
#[derive(Clone, Debug)]
pub struct AirtableClient {
    http: reqwest::Client,
    api_url: String,
    token: SecretString,
    base_id: String,
    timeout: Duration,
}

/// Percent-encodes one URL path segment: everything but RFC 3986's unreserved characters.
fn encode_path_segment(segment: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut encoded = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            encoded.push(char::from(byte));
        } else {
            encoded.push('%');
            encoded.push(char::from(HEX[usize::from(byte >> 4)]));
            encoded.push(char::from(HEX[usize::from(byte & 0x0F)]));
        }
    }
    encoded
}

fn check_batch(count: usize) -> Result<(), Error> {
    if count > MAX_RECORDS_PER_REQUEST {
        return Err(Error::TooManyRecords {
            count,
            max: MAX_RECORDS_PER_REQUEST,
        });
    }
    Ok(())
}

impl AirtableClient {
    /// A client over a shared `reqwest::Client`; the configured timeout applies per request.
    pub fn new(http: reqwest::Client, config: AirtableConfig) -> Self {
        Self {
            http,
            api_url: config.api_url.trim_end_matches('/').to_owned(),
            token: config.token,
            base_id: config.base_id,
            timeout: config.timeout,
        }
    }

    pub fn base_id(&self) -> &str {
        &self.base_id
    }

    /// `{api_url}/v0/{base_id}/{table}`, with the base and table percent-encoded.
    pub fn table_url(&self, table: &str) -> String {
        format!(
            "{}/v0/{}/{}",
            self.api_url,
            encode_path_segment(&self.base_id),
            encode_path_segment(table)
        )
    }

    async fn execute<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
        table: &str,
    ) -> Result<T, Error> {
        let response = request
            .bearer_auth(self.token.expose_secret())
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|err| Error::transport(&err))?;
        let status = response.status();
        if !status.is_success() {
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| error::parse_retry_after(value, chrono::Utc::now()));
            // The status alone decides the error; a body lost in transit only loses detail.
            let body = response.bytes().await.unwrap_or_default();
            let error = Error::from_response(status.as_u16(), retry_after, &body);
            tracing::debug!(base = %self.base_id, table, status = status.as_u16(), %error, "Airtable request failed");
            return Err(error);
        }
        let body = response
            .bytes()
            .await
            .map_err(|err| Error::transport(&err))?;
        serde_json::from_slice(&body).map_err(|err| Error::Decode(err.to_string()))
    }

    /// Creates or updates up to 10 records, matching existing ones on the `merge_on` fields
    /// (Airtable's `performUpsert`); idempotent, so safe to retry. More than 10 records fail
    /// with [`Error::TooManyRecords`] before any request; none returns an empty result.
    pub async fn upsert(
        &self,
        table: &str,
        merge_on: &[&str],
        records: &[Map<String, Value>],
    ) -> Result<UpsertResult, Error> {
        check_batch(records.len())?;
        if records.is_empty() {
            return Ok(UpsertResult::default());
        }
        let body = UpsertBody {
            perform_upsert: PerformUpsert {
                fields_to_merge_on: merge_on,
            },
            records: records.iter().map(|fields| FieldsOnly { fields }).collect(),
        };
        let request = self.http.patch(self.table_url(table)).json(&body);
        let response: UpsertResponse = self.execute(request, table).await?;
        Ok(UpsertResult {
            records: response
                .records
                .into_iter()
                .map(|record| (record.id, record.fields))
                .collect(),
            created: response.created_records,
            updated: response.updated_records,
        })
    }

    /// One page of records in the table's order; `page_size` is clamped to 1..=100 and
    /// `offset` is the cursor from the previous page.
    pub async fn list(
        &self,
        table: &str,
        page_size: usize,
        offset: Option<&str>,
    ) -> Result<Page, Error> {
        self.list_with(
            table,
            &ListOptions {
                page_size,
                offset,
                ..ListOptions::default()
            },
        )
        .await
    }

    /// One page of the records that match `options.filter_by_formula` (all records without
    /// one), with only `options.fields` when some are named.
    pub async fn list_with(&self, table: &str, options: &ListOptions<'_>) -> Result<Page, Error> {
        let page_size = options.page_size.clamp(1, MAX_PAGE_SIZE).to_string();
        let mut query = vec![("pageSize", page_size.as_str())];
        if let Some(offset) = options.offset {
            query.push(("offset", offset));
        }
        if let Some(formula) = options.filter_by_formula {
            query.push(("filterByFormula", formula));
        }
        for field in options.fields {
            query.push(("fields[]", field));
        }
        let request = self.http.get(self.table_url(table)).query(&query);
        self.execute(request, table).await
    }

    /// Every record of the table, one request per 100 records. A failure part-way returns the
    /// error; the pages already read are dropped.
    pub async fn list_all(&self, table: &str) -> Result<Vec<Record>, Error> {
        let mut records = Vec::new();
        let mut offset: Option<String> = None;
        loop {
            let page = self.list(table, MAX_PAGE_SIZE, offset.as_deref()).await?;
            records.extend(page.records);
            match page.offset {
                Some(next) => offset = Some(next),
                None => return Ok(records),
            }
        }
    }

    /// Deletes up to 10 records by id and returns the ids Airtable reports deleted. More than
    /// 10 fail with [`Error::TooManyRecords`] before any request; none is a no-op.
    pub async fn delete(&self, table: &str, ids: &[String]) -> Result<Vec<String>, Error> {
        check_batch(ids.len())?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let query: Vec<(&str, &str)> = ids.iter().map(|id| ("records[]", id.as_str())).collect();
        let request = self.http.delete(self.table_url(table)).query(&query);
        let response: DeleteResponse = self.execute(request, table).await?;
        Ok(response
            .records
            .into_iter()
            .filter(|record| record.deleted)
            .map(|record| record.id)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_keep_only_unreserved_characters() {
        assert_eq!(
            encode_path_segment("Daily_Outreach_Table_01"),
            "Daily_Outreach_Table_01"
        );
        assert_eq!(
            encode_path_segment("My table/#1?é"),
            "My%20table%2F%231%3F%C3%A9"
        );
    }

    #[test]
    fn equality_formulas_escape_quotes() {
        assert_eq!(formula_equals("profile_id", "p1"), "{profile_id} = 'p1'");
        assert_eq!(
            formula_equals("username", r"o'brien\x"),
            r"{username} = 'o\'brien\\x'"
        );
    }

    #[test]
    fn table_url_joins_without_double_slashes() {
        let mut config = AirtableConfig::new(SecretString::from("pat"), "appX");
        config.api_url = "http://127.0.0.1:9/".to_owned();
        let client = AirtableClient::new(reqwest::Client::new(), config);
        assert_eq!(client.table_url("A B"), "http://127.0.0.1:9/v0/appX/A%20B");
    }
}
