//! The tenant's pool of profiles for the daily VA assignment: import from CSV or JSON with a
//! per-row outcome, and the pool's counts. Selecting profiles for a campaign lives in
//! [`crate::daily`].
//!
//! An import is one transaction: the good rows of a file go in together, the bad ones are
//! reported with their line number and reason, and a file that is not CSV at all changes nothing.

use std::collections::HashSet;

use herald_core::TenantId;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

use crate::Error;
use crate::error;

/// The most rows one import may carry.
pub const MAX_IMPORT_ROWS: usize = 1_000_000;
/// Instagram usernames are 1 to 30 characters.
pub const MAX_USERNAME_LEN: usize = 30;
/// The longest full name or external id kept.
pub const MAX_TEXT_LEN: usize = 200;
/// Rows inserted per statement.
const INSERT_CHUNK: usize = 5_000;

/// A profile ready to insert: validated and normalised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewProfile {
    pub external_id: Option<String>,
    /// Lower-case, without a leading `@`.
    pub username: String,
    pub full_name: Option<String>,
}

/// A profile as the import caller wrote it, before validation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct RawProfile {
    #[serde(default)]
    pub external_id: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub full_name: Option<String>,
}

/// One input row: where it came from (the CSV line, or the item number in a JSON list, from 1)
/// and the profile, or why the row cannot be one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputRow {
    pub line: u64,
    pub profile: Result<NewProfile, String>,
}

/// A row that was not inserted because it is invalid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RejectedRow {
    pub line: u64,
    pub reason: String,
}

/// A row that was not inserted because the username is already in the pool (or earlier in the
/// same file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DuplicateRow {
    pub line: u64,
    pub username: String,
}

/// What an import did, row by row.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ImportReport {
    pub inserted: u64,
    pub duplicates: u64,
    pub rejected: u64,
    pub duplicate_rows: Vec<DuplicateRow>,
    pub rejected_rows: Vec<RejectedRow>,
}

/// The pool's size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PoolStats {
    pub total: i64,
    pub unused: i64,
    pub used: i64,
}

fn clean_text(field: &str, value: Option<String>) -> Result<Option<String>, String> {
    let Some(value) = value else { return Ok(None) };
    let value = value.trim();
    if value.is_empty() {
        return Ok(None);
    }
    if value.chars().count() > MAX_TEXT_LEN {
        return Err(format!("{field} is longer than {MAX_TEXT_LEN} characters"));
    }
    if value.chars().any(char::is_control) {
        return Err(format!("{field} contains control characters"));
    }
    Ok(Some(value.to_owned()))
}

/// Validates and normalises one profile; the error is the reason given back for the row.
pub fn validate(raw: RawProfile) -> Result<NewProfile, String> {
    let username = raw.username.unwrap_or_default();
    let username = username.trim();
    let username = username
        .strip_prefix('@')
        .unwrap_or(username)
        .to_lowercase();
    if username.is_empty() {
        return Err("username is missing".to_owned());
    }
    if username.chars().count() > MAX_USERNAME_LEN {
        return Err(format!(
            "username {username:?} is longer than {MAX_USERNAME_LEN} characters"
        ));
    }
    if !username
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '_')
    {
        return Err(format!(
            "username {username:?} may hold only letters, digits, '.' and '_'"
        ));
    }
    Ok(NewProfile {
        external_id: clean_text("external_id", raw.external_id)?,
        full_name: clean_text("full_name", raw.full_name)?,
        username,
    })
}

fn not_csv(reason: impl Into<String>) -> Error {
    Error::invalid("file", reason)
}

/// Parses a CSV file with a header row naming at least `username` (and optionally
/// `external_id` and `full_name`, in any order, any case; other columns are ignored).
///
/// A bad row becomes an `Err` row with its line number; a file that is not CSV at all (binary
/// data, no header, no `username` column) is `Error::Invalid` for field `file`.
pub fn parse_csv(bytes: &[u8]) -> Result<Vec<InputRow>, Error> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(not_csv("the file is empty"));
    }
    if bytes.contains(&0) {
        return Err(not_csv("the file holds binary data, not CSV text"));
    }
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(false)
        .from_reader(bytes);
    let headers = reader
        .byte_headers()
        .map_err(|e| not_csv(format!("the header row cannot be read: {e}")))?
        .clone();
    let mut columns = [None::<usize>; 3];
    for (index, name) in headers.iter().enumerate() {
        let name = std::str::from_utf8(name)
            .map_err(|_| not_csv("the header row is not UTF-8 text"))?
            .trim()
            .to_ascii_lowercase();
        let slot = match name.as_str() {
            "username" => 0,
            "external_id" => 1,
            "full_name" => 2,
            _ => continue,
        };
        if columns[slot].replace(index).is_some() {
            return Err(not_csv(format!("the header names column {name:?} twice")));
        }
    }
    let Some(username_column) = columns[0] else {
        return Err(not_csv(
            "the header row must name a username column (and optionally external_id, full_name)",
        ));
    };

    // The reader's own line count includes blank lines skipped before a record; count from
    // the record's first byte instead, so reported lines match what an editor shows.
    let newlines: Vec<usize> = bytes
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'\n')
        .map(|(i, _)| i)
        .collect();
    let line_at = |position: Option<&csv::Position>| -> u64 {
        let Some(position) = position else { return 0 };
        let mut start = usize::try_from(position.byte()).unwrap_or(usize::MAX);
        while bytes.get(start).is_some_and(|b| *b == b'\n' || *b == b'\r') {
            start += 1;
        }
        newlines.partition_point(|&nl| nl < start) as u64 + 1
    };
    let mut rows = Vec::new();
    let mut record = csv::ByteRecord::new();
    loop {
        if rows.len() >= MAX_IMPORT_ROWS {
            return Err(not_csv(format!(
                "the file holds more than {MAX_IMPORT_ROWS} rows"
            )));
        }
        match reader.read_byte_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {
                let line = line_at(record.position());
                if record.iter().all(|field| field.trim_ascii().is_empty()) {
                    continue;
                }
                let field = |column: Option<usize>| -> Result<Option<String>, String> {
                    let Some(column) = column else {
                        return Ok(None);
                    };
                    let bytes = record.get(column).unwrap_or_default();
                    String::from_utf8(bytes.to_vec())
                        .map(Some)
                        .map_err(|_| "the row is not UTF-8 text".to_owned())
                };
                let profile = (|| {
                    validate(RawProfile {
                        username: field(Some(username_column))?,
                        external_id: field(columns[1])?,
                        full_name: field(columns[2])?,
                    })
                })();
                rows.push(InputRow { line, profile });
            }
            Err(err) => {
                let line = line_at(err.position());
                let reason = match err.kind() {
                    csv::ErrorKind::UnequalLengths {
                        expected_len, len, ..
                    } => {
                        format!("expected {expected_len} fields as in the header, found {len}")
                    }
                    _ => format!("unreadable row: {err}"),
                };
                rows.push(InputRow {
                    line,
                    profile: Err(reason),
                });
            }
        }
    }
    Ok(rows)
}

/// Parses `{"profiles":[{"external_id","username","full_name"}…]}`. A malformed item becomes an
/// `Err` row numbered from 1; a body that is not that shape is `Error::Invalid` for `body`.
pub fn parse_json(bytes: &[u8]) -> Result<Vec<InputRow>, Error> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Body {
        profiles: Vec<Value>,
    }
    let body: Body = serde_json::from_slice(bytes)
        .map_err(|e| Error::invalid("body", format!("expected {{\"profiles\": [...]}}: {e}")))?;
    if body.profiles.len() > MAX_IMPORT_ROWS {
        return Err(Error::invalid(
            "profiles",
            format!("more than {MAX_IMPORT_ROWS} profiles"),
        ));
    }
    Ok(body
        .profiles
        .into_iter()
        .enumerate()
        .map(|(index, item)| InputRow {
            line: index as u64 + 1,
            profile: raw_from_json(item).and_then(validate),
        })
        .collect())
}

fn raw_from_json(item: Value) -> Result<RawProfile, String> {
    let Value::Object(mut map) = item else {
        return Err("each profile must be an object".to_owned());
    };
    let mut text = |name: &str| -> Result<Option<String>, String> {
        match map.remove(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(Value::Number(n)) if name == "external_id" => Ok(Some(n.to_string())),
            Some(_) => Err(format!("{name} must be a string")),
        }
    };
    Ok(RawProfile {
        external_id: text("external_id")?,
        username: text("username")?,
        full_name: text("full_name")?,
    })
}

/// Inserts the valid rows into the tenant's pool, in one transaction, and reports every row's
/// fate: inserted, duplicate (the username is already in the pool or earlier in the input), or
/// rejected with its reason. An unknown tenant is `Error::NotFound`.
pub async fn import(
    pool: &PgPool,
    tenant: TenantId,
    rows: Vec<InputRow>,
) -> Result<ImportReport, Error> {
    let mut report = ImportReport::default();
    let mut seen = HashSet::new();
    let mut fresh: Vec<(u64, NewProfile)> = Vec::new();
    for row in rows {
        match row.profile {
            Err(reason) => report.rejected_rows.push(RejectedRow {
                line: row.line,
                reason,
            }),
            Ok(profile) => {
                if seen.insert(profile.username.clone()) {
                    fresh.push((row.line, profile));
                } else {
                    report.duplicate_rows.push(DuplicateRow {
                        line: row.line,
                        username: profile.username,
                    });
                }
            }
        }
    }

    let mut tx = pool.begin().await?;
    for chunk in fresh.chunks(INSERT_CHUNK) {
        let ids: Vec<Uuid> = chunk.iter().map(|_| Uuid::now_v7()).collect();
        let external: Vec<Option<&str>> = chunk
            .iter()
            .map(|(_, p)| p.external_id.as_deref())
            .collect();
        let usernames: Vec<&str> = chunk.iter().map(|(_, p)| p.username.as_str()).collect();
        let names: Vec<Option<&str>> = chunk.iter().map(|(_, p)| p.full_name.as_deref()).collect();
        let inserted: Vec<String> = sqlx::query_scalar(
            "insert into profiles (tenant_id, id, external_id, username, full_name)
             select $1, * from unnest($2::uuid[], $3::text[], $4::text[], $5::text[])
             on conflict (tenant_id, username) do nothing
             returning username",
        )
        .bind(tenant.0)
        .bind(&ids)
        .bind(&external)
        .bind(&usernames)
        .bind(&names)
        .fetch_all(&mut *tx)
        .await
        .map_err(error::tenant_must_exist)?;
        report.inserted += inserted.len() as u64;
        let inserted: HashSet<String> = inserted.into_iter().collect();
        for (line, profile) in chunk {
            if !inserted.contains(&profile.username) {
                report.duplicate_rows.push(DuplicateRow {
                    line: *line,
                    username: profile.username.clone(),
                });
            }
        }
    }
    tx.commit().await?;

    report.duplicate_rows.sort_by_key(|row| row.line);
    report.duplicates = report.duplicate_rows.len() as u64;
    report.rejected = report.rejected_rows.len() as u64;
    Ok(report)
}

/// How many profiles the tenant's pool holds, and how many are still unused.
pub async fn stats(pool: &PgPool, tenant: TenantId) -> Result<PoolStats, Error> {
    let (total, unused): (i64, i64) = sqlx::query_as(
        "select count(*), count(*) filter (where used_on is null)
         from profiles where tenant_id = $1",
    )
    .bind(tenant.0)
    .fetch_one(pool)
    .await?;
    Ok(PoolStats {
        total,
        unused,
        used: total - unused,
    })
}

/// How many of the tenant's profiles are unused.
pub async fn unused_count(pool: &PgPool, tenant: TenantId) -> Result<i64, Error> {
    Ok(stats(pool, tenant).await?.unused)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcomes(rows: &[InputRow]) -> Vec<(u64, Result<&str, &str>)> {
        rows.iter()
            .map(|row| {
                (
                    row.line,
                    row.profile
                        .as_ref()
                        .map(|p| p.username.as_str())
                        .map_err(String::as_str),
                )
            })
            .collect()
    }

    #[test]
    fn csv_rows_keep_their_line_numbers_and_reasons() {
        let csv = "Username,full_name,external_id\n\
                   @Alice,Alice A,1\n\
                   bob,\"Bob, B\",2\n\
                   ,Nobody,3\n\
                   bad name,Bad,4\n\
                   only_two,fields\n\
                   \n\
                   carol,Carol,5\n";
        let rows = parse_csv(csv.as_bytes()).unwrap();
        let got = outcomes(&rows);
        assert_eq!(got[0], (2, Ok("alice")));
        assert_eq!(got[1], (3, Ok("bob")));
        assert_eq!(got[2], (4, Err("username is missing")));
        assert_eq!(got[3].0, 5);
        assert!(got[3].1.unwrap_err().contains("letters, digits"));
        assert_eq!(got[4].0, 6);
        assert!(got[4].1.unwrap_err().contains("expected 3 fields"));
        assert_eq!(got[5], (8, Ok("carol")));
        assert_eq!(got.len(), 6);
        let bob = rows[1].profile.as_ref().unwrap();
        assert_eq!(bob.full_name.as_deref(), Some("Bob, B"));
        assert_eq!(bob.external_id.as_deref(), Some("2"));
    }

    #[test]
    fn files_that_are_not_csv_are_refused_whole() {
        for bad in [
            &b""[..],
            b"   \n",
            b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
            b"name,full_name\nalice,Alice\n",
            b"username,username\na,b\n",
            b"\xff\xfe\xfd,x\n1,2\n",
        ] {
            let err = parse_csv(bad).unwrap_err();
            assert!(
                matches!(err, Error::Invalid { field: "file", .. }),
                "{bad:?}: {err}"
            );
        }
        // A byte-order mark is not part of the header.
        assert_eq!(parse_csv(b"\xEF\xBB\xBFusername\nx\n").unwrap().len(), 1);
    }

    #[test]
    fn json_items_are_numbered_from_one() {
        let body = br#"{"profiles":[{"username":"a","external_id":7},{"username":5},"x",{"full_name":"n"}]}"#;
        let rows = parse_json(body).unwrap();
        let got = outcomes(&rows);
        assert_eq!(got[0], (1, Ok("a")));
        assert_eq!(got[1], (2, Err("username must be a string")));
        assert_eq!(got[2], (3, Err("each profile must be an object")));
        assert_eq!(got[3], (4, Err("username is missing")));
        assert!(parse_json(b"[1,2]").is_err());
        assert!(parse_json(b"{\"profiles\":[],\"x\":1}").is_err());
    }
}
