//! Tables of records and the validation Airtable applies to writes and list requests.
//!
//! No HTTP, no locks and no clocks here: callers pass the creation time in, so every rule can be
//! tested directly. Writes are all-or-nothing, as in Airtable: a request is validated in full
//! before any record changes.

use std::collections::{BTreeMap, HashMap, HashSet};

use axum::http::StatusCode;
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Airtable takes at most this many records per create, update, upsert or delete request.
pub const MAX_RECORDS_PER_REQUEST: usize = 10;
/// Airtable returns at most this many records per list page.
pub const MAX_PAGE_SIZE: usize = 100;
/// Airtable merges upserts on one to three fields.
const MAX_MERGE_FIELDS: usize = 3;

/// One stored record, in the shape Airtable returns it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub id: String,
    pub created_time: String,
    pub fields: Map<String, Value>,
}

/// A request refused with Airtable's `{"error":{"type":..,"message":..}}` body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Rejection {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
}

impl Rejection {
    pub(crate) fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
        }
    }

    pub(crate) fn invalid_body(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "INVALID_REQUEST_BODY",
            message,
        )
    }

    fn unknown_parameter(name: &str) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "INVALID_REQUEST_UNKNOWN",
            format!("Invalid request: parameter validation failed. Unknown parameter \"{name}\""),
        )
    }

    fn unknown_field(name: &str) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "UNKNOWN_FIELD_NAME",
            format!("Unknown field name: \"{name}\""),
        )
    }

    fn invalid_value(field: &str, why: &str) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "INVALID_VALUE_FOR_COLUMN",
            format!("Field \"{field}\" cannot accept the provided value: {why}"),
        )
    }

    fn row_missing(id: &str) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "ROW_DOES_NOT_EXIST",
            format!("Record ID {id} does not exist in this table"),
        )
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "NOT_FOUND", message)
    }

    pub(crate) fn too_many_records(count: usize) -> Self {
        Self::invalid_body(format!(
            "Request contains {count} records; at most {MAX_RECORDS_PER_REQUEST} are allowed per request"
        ))
    }
}

/// Which field names exist and which hold numbers; with no names configured, any name goes.
#[derive(Clone, Debug, Default)]
pub(crate) struct Schema {
    known: Option<HashSet<String>>,
    numeric: HashSet<String>,
}

impl Schema {
    pub(crate) fn new(known: Option<&[String]>, numeric: &[String]) -> Self {
        let numeric: HashSet<String> = numeric.iter().cloned().collect();
        // A numeric field is a field, whether or not the name list repeats it.
        let known = known.map(|names| names.iter().chain(&numeric).cloned().collect());
        Self { known, numeric }
    }

    fn check_name(&self, name: &str) -> Result<(), Rejection> {
        match &self.known {
            Some(known) if !known.contains(name) => Err(Rejection::unknown_field(name)),
            _ => Ok(()),
        }
    }

    /// Validates one record's cell values, applying `typecast` where Airtable would.
    fn cells(&self, fields: &Map<String, Value>, typecast: bool) -> Result<Cells, Rejection> {
        let mut cells = Map::with_capacity(fields.len());
        for (name, value) in fields {
            self.check_name(name)?;
            let value = match value {
                Value::Object(_) | Value::Array(_) => {
                    return Err(Rejection::invalid_value(
                        name,
                        "objects and arrays are not cell values",
                    ));
                }
                _ if self.numeric.contains(name) => numeric_cell(name, value, typecast)?,
                _ => value.clone(),
            };
            cells.insert(name.clone(), value);
        }
        Ok(Cells(cells))
    }
}

fn numeric_cell(name: &str, value: &Value, typecast: bool) -> Result<Value, Rejection> {
    match value {
        Value::Null | Value::Number(_) => Ok(value.clone()),
        Value::String(text) if typecast => {
            let text = text.trim();
            if text.is_empty() {
                return Ok(Value::Null);
            }
            if let Ok(integer) = text.parse::<i64>() {
                return Ok(Value::from(integer));
            }
            text.parse::<f64>()
                .ok()
                .and_then(serde_json::Number::from_f64)
                .map(Value::Number)
                .ok_or_else(|| Rejection::invalid_value(name, "expected a number"))
        }
        _ => Err(Rejection::invalid_value(name, "expected a number")),
    }
}

/// Validated cell values, ready to write.
#[derive(Clone, Debug)]
struct Cells(Map<String, Value>);

/// Airtable does not return empty cells; writing one clears the cell.
fn is_empty_cell(value: &Value) -> bool {
    matches!(value, Value::Null | Value::Bool(false)) || value.as_str() == Some("")
}

fn write_cells(target: &mut Map<String, Value>, cells: Cells) {
    for (name, value) in cells.0 {
        if is_empty_cell(&value) {
            target.remove(&name);
        } else {
            target.insert(name, value);
        }
    }
}

fn same_cell(left: &Value, right: &Value) -> bool {
    match (left.as_f64(), right.as_f64()) {
        (Some(left), Some(right)) => left == right,
        _ => left == right,
    }
}

/// One table's records in creation order; list cursors are positions in that order.
#[derive(Debug, Default)]
pub(crate) struct Table {
    next_position: u64,
    rows: BTreeMap<u64, Record>,
    positions: HashMap<String, u64>,
}

impl Table {
    pub(crate) fn len(&self) -> usize {
        self.rows.len()
    }

    pub(crate) fn records(&self) -> Vec<Record> {
        self.rows.values().cloned().collect()
    }

    pub(crate) fn get(&self, id: &str) -> Option<&Record> {
        self.positions.get(id).and_then(|pos| self.rows.get(pos))
    }

    fn contains(&self, id: &str) -> bool {
        self.positions.contains_key(id)
    }

    fn fresh_id(&self) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
        let mut rng = rand::thread_rng();
        loop {
            let suffix: String = (0..14)
                .map(|_| char::from(ALPHABET[rng.gen_range(0..ALPHABET.len())]))
                .collect();
            let id = format!("rec{suffix}");
            if !self.contains(&id) {
                return id;
            }
        }
    }

    /// Stores raw fields as a new record, without validation (used for seeding).
    pub(crate) fn insert_raw(&mut self, fields: Map<String, Value>, created_time: &str) -> Record {
        let mut stored = Map::new();
        write_cells(&mut stored, Cells(fields));
        let record = Record {
            id: self.fresh_id(),
            created_time: created_time.to_owned(),
            fields: stored,
        };
        let position = self.next_position;
        self.next_position += 1;
        self.positions.insert(record.id.clone(), position);
        self.rows.insert(position, record.clone());
        record
    }

    fn insert(&mut self, cells: Cells, created_time: &str) -> Record {
        self.insert_raw(cells.0, created_time)
    }

    /// Merges (`replace == false`, PATCH) or replaces (PUT) a record's cells.
    fn apply(&mut self, id: &str, cells: Cells, replace: bool) -> Option<Record> {
        let position = self.positions.get(id)?;
        let record = self.rows.get_mut(position)?;
        if replace {
            record.fields.clear();
        }
        write_cells(&mut record.fields, cells);
        Some(record.clone())
    }

    fn remove(&mut self, id: &str) -> bool {
        match self.positions.remove(id) {
            Some(position) => self.rows.remove(&position).is_some(),
            None => false,
        }
    }

    fn matching(&self, merge_on: &[String], cells: &Cells) -> Vec<String> {
        self.rows
            .values()
            .filter(|record| {
                merge_on
                    .iter()
                    .all(|name| match (record.fields.get(name), cells.0.get(name)) {
                        (Some(stored), Some(wanted)) => same_cell(stored, wanted),
                        _ => false,
                    })
            })
            .map(|record| record.id.clone())
            .collect()
    }

    /// The page of records starting at `from` (a position), and the position after it if any remain.
    fn page(&self, from: u64, size: usize) -> (Vec<Record>, Option<u64>) {
        let mut rows = self.rows.range(from..);
        let page: Vec<Record> = rows.by_ref().take(size).map(|(_, r)| r.clone()).collect();
        let next = rows.next().map(|(&position, _)| position);
        (page, next)
    }
}

/// Which write endpoint a body was sent to; each accepts different top-level keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WriteKind {
    /// `POST /v0/{base}/{table}`
    Create,
    /// `PATCH`/`PUT /v0/{base}/{table}` (plain update or upsert)
    Update,
    /// `PATCH`/`PUT /v0/{base}/{table}/{record}`
    UpdateOne,
}

#[derive(Clone, Debug)]
struct WriteRecord {
    id: Option<String>,
    fields: Map<String, Value>,
}

/// A parsed, structurally valid write body; field names and values are checked against the
/// schema when it is applied.
#[derive(Clone, Debug)]
pub(crate) struct WriteRequest {
    records: Vec<WriteRecord>,
    typecast: bool,
    merge_on: Option<Vec<String>>,
    /// The body used the single-record form (`{"fields":{..}}`), so is the response.
    single: bool,
}

fn object<'a>(value: &'a Value, what: &str) -> Result<&'a Map<String, Value>, Rejection> {
    value
        .as_object()
        .ok_or_else(|| Rejection::invalid_body(format!("{what} must be an object")))
}

fn only_keys(map: &Map<String, Value>, allowed: &[&str]) -> Result<(), Rejection> {
    match map.keys().find(|key| !allowed.contains(&key.as_str())) {
        Some(key) => Err(Rejection::unknown_parameter(key)),
        None => Ok(()),
    }
}

fn parse_record(value: &Value, id_required: bool) -> Result<WriteRecord, Rejection> {
    let record = object(value, "each record")?;
    only_keys(record, &["id", "fields"])?;
    let id = match record.get("id") {
        None => None,
        Some(Value::String(id)) => Some(id.clone()),
        Some(_) => return Err(Rejection::invalid_body("record id must be a string")),
    };
    if id_required && id.is_none() {
        return Err(Rejection::invalid_body(
            "each record must have an id (or use performUpsert)",
        ));
    }
    let fields = match record.get("fields") {
        Some(fields) => object(fields, "record fields")?.clone(),
        None if id.is_some() => {
            return Err(Rejection::invalid_body("each record must have fields"));
        }
        None => Map::new(),
    };
    Ok(WriteRecord { id, fields })
}

/// Parses a write body; malformed JSON and bad shapes are 422 `INVALID_REQUEST_BODY`.
pub(crate) fn parse_write(body: &[u8], kind: WriteKind) -> Result<WriteRequest, Rejection> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|err| Rejection::invalid_body(format!("Could not parse request body: {err}")))?;
    let top = object(&value, "request body")?;
    let typecast = match top.get("typecast") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(typecast)) => *typecast,
        Some(_) => return Err(Rejection::invalid_body("typecast must be a boolean")),
    };
    if kind == WriteKind::UpdateOne {
        only_keys(top, &["fields", "typecast", "returnFieldsByFieldId"])?;
        let fields = top
            .get("fields")
            .ok_or_else(|| Rejection::invalid_body("request body must have fields"))?;
        return Ok(WriteRequest {
            records: vec![WriteRecord {
                id: None,
                fields: object(fields, "fields")?.clone(),
            }],
            typecast,
            merge_on: None,
            single: true,
        });
    }
    let allowed: &[&str] = match kind {
        WriteKind::Create => &["records", "fields", "typecast", "returnFieldsByFieldId"],
        _ => &[
            "records",
            "typecast",
            "performUpsert",
            "returnFieldsByFieldId",
        ],
    };
    only_keys(top, allowed)?;

    if kind == WriteKind::Create && !top.contains_key("records") {
        let fields = top
            .get("fields")
            .ok_or_else(|| Rejection::invalid_body("request body must have records"))?;
        return Ok(WriteRequest {
            records: vec![WriteRecord {
                id: None,
                fields: object(fields, "fields")?.clone(),
            }],
            typecast,
            merge_on: None,
            single: true,
        });
    }

    let merge_on = match top.get("performUpsert") {
        None | Some(Value::Null) => None,
        Some(upsert) => {
            let upsert = object(upsert, "performUpsert")?;
            only_keys(upsert, &["fieldsToMergeOn"])?;
            let names = upsert
                .get("fieldsToMergeOn")
                .and_then(Value::as_array)
                .ok_or_else(|| {
                    Rejection::invalid_body("performUpsert.fieldsToMergeOn must be an array")
                })?;
            if names.is_empty() || names.len() > MAX_MERGE_FIELDS {
                return Err(Rejection::invalid_body(format!(
                    "performUpsert.fieldsToMergeOn must name 1 to {MAX_MERGE_FIELDS} fields"
                )));
            }
            let names = names
                .iter()
                .map(|name| {
                    name.as_str().map(str::to_owned).ok_or_else(|| {
                        Rejection::invalid_body("fieldsToMergeOn entries must be strings")
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            Some(names)
        }
    };

    let records = top
        .get("records")
        .and_then(Value::as_array)
        .ok_or_else(|| Rejection::invalid_body("records must be an array"))?;
    if records.is_empty() {
        return Err(Rejection::invalid_body("records must not be empty"));
    }
    if records.len() > MAX_RECORDS_PER_REQUEST {
        return Err(Rejection::too_many_records(records.len()));
    }
    let id_required = kind == WriteKind::Update && merge_on.is_none();
    let records = records
        .iter()
        .map(|record| parse_record(record, id_required))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(WriteRequest {
        records,
        typecast,
        merge_on,
        single: false,
    })
}

/// The outcome of an applied write, already in its response shape.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub(crate) enum WriteResponse {
    One(Record),
    Many {
        records: Vec<Record>,
    },
    Upserted {
        records: Vec<Record>,
        #[serde(rename = "createdRecords")]
        created_records: Vec<String>,
        #[serde(rename = "updatedRecords")]
        updated_records: Vec<String>,
    },
}

fn respond(single: bool, mut records: Vec<Record>) -> WriteResponse {
    if single && records.len() == 1 {
        WriteResponse::One(records.remove(0))
    } else {
        WriteResponse::Many { records }
    }
}

/// `POST`: creates every record, or none.
pub(crate) fn create(
    table: &mut Table,
    schema: &Schema,
    request: WriteRequest,
    created_time: &str,
) -> Result<WriteResponse, Rejection> {
    let cells = request
        .records
        .iter()
        .map(|record| schema.cells(&record.fields, request.typecast))
        .collect::<Result<Vec<_>, _>>()?;
    let records: Vec<Record> = cells
        .into_iter()
        .map(|cells| table.insert(cells, created_time))
        .collect();
    Ok(respond(request.single, records))
}

/// `PATCH` (`replace == false`) or `PUT`, with or without `performUpsert`.
///
/// `path_id` is the record named in the URL for the single-record routes.
pub(crate) fn update(
    table: &mut Table,
    schema: &Schema,
    mut request: WriteRequest,
    path_id: Option<&str>,
    replace: bool,
    created_time: &str,
) -> Result<WriteResponse, Rejection> {
    if let (Some(id), Some(record)) = (path_id, request.records.first_mut()) {
        record.id = Some(id.to_owned());
    }
    let mut planned = Vec::with_capacity(request.records.len());
    for record in &request.records {
        planned.push((
            record.id.clone(),
            schema.cells(&record.fields, request.typecast)?,
        ));
    }

    let Some(merge_on) = request.merge_on else {
        for (id, _) in &planned {
            let id = id.as_deref().unwrap_or_default();
            if !table.contains(id) {
                return Err(if path_id.is_some() {
                    Rejection::not_found(format!("Could not find record {id}"))
                } else {
                    Rejection::row_missing(id)
                });
            }
        }
        let records = planned
            .into_iter()
            .filter_map(|(id, cells)| {
                table.apply(id.as_deref().unwrap_or_default(), cells, replace)
            })
            .collect();
        return Ok(respond(request.single, records));
    };

    for name in &merge_on {
        schema.check_name(name)?;
    }
    // Decide every record's fate before touching the table, so a bad record changes nothing.
    let mut targets: Vec<Option<String>> = Vec::with_capacity(planned.len());
    let mut new_keys: Vec<Vec<&Value>> = Vec::new();
    for (id, cells) in &planned {
        if let Some(id) = id {
            if !table.contains(id) {
                return Err(Rejection::row_missing(id));
            }
            targets.push(Some(id.clone()));
            continue;
        }
        let key = merge_on
            .iter()
            .map(|name| match cells.0.get(name) {
                Some(value) if !is_empty_cell(value) => Ok(value),
                _ => Err(Rejection::invalid_body(format!(
                    "Every record must have a value for the merge field \"{name}\""
                ))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        match table.matching(&merge_on, cells).as_slice() {
            [] => {
                let duplicate = new_keys.iter().any(|seen| {
                    seen.iter()
                        .zip(&key)
                        .all(|(left, right)| same_cell(left, right))
                });
                if duplicate {
                    return Err(Rejection::invalid_body(
                        "Two records in the request have the same values for fieldsToMergeOn",
                    ));
                }
                new_keys.push(key);
                targets.push(None);
            }
            [only] => {
                if targets.iter().flatten().any(|seen| seen == only) {
                    return Err(Rejection::invalid_body(
                        "Two records in the request match the same existing record",
                    ));
                }
                targets.push(Some(only.clone()));
            }
            _ => {
                return Err(Rejection::invalid_body(
                    "More than one existing record matches the values of fieldsToMergeOn",
                ));
            }
        }
    }

    let mut records = Vec::with_capacity(planned.len());
    let mut created_records = Vec::new();
    let mut updated_records = Vec::new();
    for ((_, cells), target) in planned.into_iter().zip(targets) {
        match target {
            Some(id) => {
                if let Some(record) = table.apply(&id, cells, replace) {
                    updated_records.push(record.id.clone());
                    records.push(record);
                }
            }
            None => {
                let record = table.insert(cells, created_time);
                created_records.push(record.id.clone());
                records.push(record);
            }
        }
    }
    Ok(WriteResponse::Upserted {
        records,
        created_records,
        updated_records,
    })
}

/// One entry of a delete response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub(crate) struct Deleted {
    pub id: String,
    pub deleted: bool,
}

/// `DELETE`: removes every listed record, or none.
pub(crate) fn delete(table: &mut Table, ids: &[String]) -> Result<Vec<Deleted>, Rejection> {
    if ids.is_empty() {
        return Err(Rejection::invalid_body(
            "records[] must name at least one record",
        ));
    }
    if ids.len() > MAX_RECORDS_PER_REQUEST {
        return Err(Rejection::too_many_records(ids.len()));
    }
    if let Some(missing) = ids.iter().find(|id| !table.contains(id)) {
        return Err(Rejection::row_missing(missing));
    }
    Ok(ids
        .iter()
        .filter(|id| table.remove(id))
        .map(|id| Deleted {
            id: id.clone(),
            deleted: true,
        })
        .collect())
}

/// Query parameters of a list request that the fake honours; the rest (`filterByFormula`,
/// `sort`, `view`, …) are accepted and ignored.
#[derive(Clone, Debug, Default)]
pub(crate) struct ListQuery {
    page_size: Option<String>,
    max_records: Option<String>,
    offset: Option<String>,
    fields: Vec<String>,
}

impl ListQuery {
    pub(crate) fn from_pairs(pairs: Vec<(String, String)>) -> Self {
        let mut query = Self::default();
        for (key, value) in pairs {
            match key.as_str() {
                "pageSize" => query.page_size = Some(value),
                "maxRecords" => query.max_records = Some(value),
                "offset" => query.offset = Some(value),
                "fields[]" | "fields" => query.fields.push(value),
                _ => {}
            }
        }
        query
    }
}

/// One list page in Airtable's shape.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct ListPage {
    pub records: Vec<Record>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<String>,
}

/// Cursors look like Airtable's (`itr…/rec…`) and carry the next position and, when
/// `maxRecords` was given, how many records remain.
fn encode_offset(position: u64, remaining: Option<usize>, next_id: &str) -> String {
    match remaining {
        Some(remaining) => format!("itr{position:x}m{remaining:x}/{next_id}"),
        None => format!("itr{position:x}/{next_id}"),
    }
}

fn decode_offset(offset: &str) -> Option<(u64, Option<usize>)> {
    let (cursor, _) = offset.strip_prefix("itr")?.split_once('/')?;
    match cursor.split_once('m') {
        Some((position, remaining)) => Some((
            u64::from_str_radix(position, 16).ok()?,
            Some(usize::from_str_radix(remaining, 16).ok()?),
        )),
        None => Some((u64::from_str_radix(cursor, 16).ok()?, None)),
    }
}

fn parse_bounded(value: &str, name: &str, max: Option<usize>) -> Result<usize, Rejection> {
    let parsed = value
        .trim()
        .parse::<usize>()
        .ok()
        .filter(|&n| n >= 1 && max.is_none_or(|max| n <= max));
    parsed.ok_or_else(|| {
        Rejection::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "INVALID_REQUEST_UNKNOWN",
            match max {
                Some(max) => format!("{name} must be an integer from 1 to {max}"),
                None => format!("{name} must be a positive integer"),
            },
        )
    })
}

/// `GET`: one page of records in creation order.
pub(crate) fn list(table: &Table, query: &ListQuery) -> Result<ListPage, Rejection> {
    let page_size = match &query.page_size {
        Some(value) => parse_bounded(value, "pageSize", Some(MAX_PAGE_SIZE))?,
        None => MAX_PAGE_SIZE,
    };
    let (from, remaining) = match &query.offset {
        Some(offset) => decode_offset(offset).ok_or_else(|| {
            Rejection::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "INVALID_OFFSET_VALUE",
                format!("The value of offset {offset} is invalid"),
            )
        })?,
        None => (
            0,
            match &query.max_records {
                Some(value) => Some(parse_bounded(value, "maxRecords", None)?),
                None => None,
            },
        ),
    };
    let size = remaining.map_or(page_size, |remaining| remaining.min(page_size));
    let (mut records, next) = table.page(from, size);
    let remaining = remaining.map(|remaining| remaining.saturating_sub(records.len()));
    let offset = match (next, remaining) {
        (_, Some(0)) | (None, _) => None,
        (Some(position), remaining) => table
            .rows
            .get(&position)
            .map(|record| encode_offset(position, remaining, &record.id)),
    };
    if !query.fields.is_empty() {
        for record in &mut records {
            record.fields.retain(|name, _| query.fields.contains(name));
        }
    }
    Ok(ListPage { records, offset })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: &str = "2025-01-01T00:00:00.000Z";

    fn fields(value: Value) -> Map<String, Value> {
        value.as_object().cloned().unwrap_or_default()
    }

    fn upsert_body(records: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "performUpsert": {"fieldsToMergeOn": ["profile_id"]},
            "records": records,
        }))
        .unwrap()
    }

    #[test]
    fn upsert_creates_then_updates_the_same_record() {
        let mut table = Table::default();
        let schema = Schema::default();
        let body = upsert_body(json!([{"fields": {"profile_id": "p1", "name": "A"}}]));
        let first = update(
            &mut table,
            &schema,
            parse_write(&body, WriteKind::Update).unwrap(),
            None,
            false,
            NOW,
        )
        .unwrap();
        let WriteResponse::Upserted {
            records,
            created_records,
            updated_records,
        } = first
        else {
            panic!("expected an upsert response")
        };
        assert_eq!(created_records.len(), 1);
        assert!(updated_records.is_empty());

        let body = upsert_body(json!([{"fields": {"profile_id": "p1", "name": "B"}}]));
        let second = update(
            &mut table,
            &schema,
            parse_write(&body, WriteKind::Update).unwrap(),
            None,
            false,
            NOW,
        )
        .unwrap();
        let WriteResponse::Upserted {
            records: again,
            updated_records,
            created_records,
        } = second
        else {
            panic!("expected an upsert response")
        };
        assert!(created_records.is_empty());
        assert_eq!(updated_records, vec![records[0].id.clone()]);
        assert_eq!(again[0].fields["name"], json!("B"));
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn a_bad_record_changes_nothing() {
        let mut table = Table::default();
        let schema = Schema::new(Some(&["profile_id".to_owned()]), &[]);
        let body = upsert_body(json!([
            {"fields": {"profile_id": "p1"}},
            {"fields": {"profile_id": "p2", "nope": 1}},
        ]));
        let err = update(
            &mut table,
            &schema,
            parse_write(&body, WriteKind::Update).unwrap(),
            None,
            false,
            NOW,
        )
        .unwrap_err();
        assert_eq!(err.kind, "UNKNOWN_FIELD_NAME");
        assert_eq!(table.len(), 0);
    }

    #[test]
    fn numeric_fields_take_numbers_or_typecast_strings() {
        let schema = Schema::new(None, &["position".to_owned()]);
        assert!(schema.cells(&fields(json!({"position": 3})), false).is_ok());
        let err = schema
            .cells(&fields(json!({"position": "3"})), false)
            .unwrap_err();
        assert_eq!(err.kind, "INVALID_VALUE_FOR_COLUMN");
        let cells = schema
            .cells(&fields(json!({"position": "3"})), true)
            .unwrap();
        assert_eq!(cells.0["position"], json!(3));
        let err = schema
            .cells(&fields(json!({"tags": ["a"]})), true)
            .unwrap_err();
        assert_eq!(err.kind, "INVALID_VALUE_FOR_COLUMN");
    }

    #[test]
    fn parse_refuses_eleven_records_and_malformed_json() {
        let records: Vec<Value> = (0..11).map(|i| json!({"fields": {"n": i}})).collect();
        let body = serde_json::to_vec(&json!({"records": records})).unwrap();
        let err = parse_write(&body, WriteKind::Create).unwrap_err();
        assert_eq!(
            (err.status, err.kind),
            (StatusCode::UNPROCESSABLE_ENTITY, "INVALID_REQUEST_BODY")
        );
        let err = parse_write(b"{not json", WriteKind::Create).unwrap_err();
        assert_eq!(err.kind, "INVALID_REQUEST_BODY");
        let err = parse_write(br#"{"records":[],"bogus":1}"#, WriteKind::Create).unwrap_err();
        assert_eq!(err.kind, "INVALID_REQUEST_UNKNOWN");
    }

    #[test]
    fn empty_cells_are_not_returned() {
        let mut table = Table::default();
        let record = table.insert_raw(
            fields(json!({"a": "x", "b": "", "c": null, "d": false})),
            NOW,
        );
        assert_eq!(record.fields, fields(json!({"a": "x"})));
    }

    #[test]
    fn pages_survive_deletes_between_requests() {
        let mut table = Table::default();
        let ids: Vec<String> = (0..5)
            .map(|i| table.insert_raw(fields(json!({"n": i})), NOW).id)
            .collect();
        let query = ListQuery::from_pairs(vec![("pageSize".into(), "2".into())]);
        let first = list(&table, &query).unwrap();
        assert_eq!(first.records.len(), 2);
        delete(&mut table, &ids[2..3]).unwrap();
        let query = ListQuery::from_pairs(vec![
            ("pageSize".into(), "2".into()),
            ("offset".into(), first.offset.unwrap()),
        ]);
        let second = list(&table, &query).unwrap();
        let seen: Vec<&str> = second.records.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(seen, vec![ids[3].as_str(), ids[4].as_str()]);
        assert!(second.offset.is_none());
    }

    #[test]
    fn max_records_caps_the_whole_listing() {
        let mut table = Table::default();
        for i in 0..10 {
            table.insert_raw(fields(json!({"n": i})), NOW);
        }
        let mut query = ListQuery::from_pairs(vec![
            ("pageSize".into(), "3".into()),
            ("maxRecords".into(), "5".into()),
        ]);
        let mut total = 0;
        loop {
            let page = list(&table, &query).unwrap();
            total += page.records.len();
            match page.offset {
                Some(offset) => query.offset = Some(offset),
                None => break,
            }
        }
        assert_eq!(total, 5);
    }
}
