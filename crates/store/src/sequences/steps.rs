//! The sequence step model, pure: parsing and validating a sequence's steps and sending rules
//! from JSON, message templates with `{{variable}}` placeholders, and the day and week a cap
//! counts in. No IO; every function of time takes an explicit `now`.
//!
//! A step error names the step (index from 0, and type) and the field, so a caller can say
//! exactly what to fix; the same validation runs when a sequence is saved and again before a
//! step runs.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Datelike, Duration, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;
use serde::Serialize;
use serde_json::{Map, Value};
use uuid::Uuid;

/// The variables a message template may use, and a lead may carry.
pub const VARIABLES: &[&str] = &[
    "first_name",
    "last_name",
    "company_name",
    "title",
    "email",
    "phone",
    "linkedin_url",
    "instagram_handle",
];

/// The most steps one sequence may have.
pub const MAX_STEPS: usize = 100;
/// The longest single delay.
pub const MAX_DELAY_HOURS: u64 = 365 * 24;
/// The most people a `lead_generation` step adds in one local day.
pub const MAX_DAILY_LEADS: u32 = 10_000;
/// The longest lead pool name.
pub const MAX_POOL_NAME_LEN: usize = 100;

/// Whether `name` can name a lead pool: 1 to [`MAX_POOL_NAME_LEN`] characters, each a letter,
/// digit, `-`, `_` or `.` (it appears in a URL path). The error is the reason.
pub fn check_pool_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_POOL_NAME_LEN {
        return Err(format!("must be 1 to {MAX_POOL_NAME_LEN} characters"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err("may hold only letters, digits, '-', '_' and '.'".into());
    }
    Ok(())
}

/// Where a step's effect goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    Email,
    Linkedin,
    Instagram,
    Whatsapp,
}

impl Channel {
    pub const ALL: [Channel; 4] = [
        Channel::Email,
        Channel::Linkedin,
        Channel::Instagram,
        Channel::Whatsapp,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Email => "email",
            Channel::Linkedin => "linkedin",
            Channel::Instagram => "instagram",
            Channel::Whatsapp => "whatsapp",
        }
    }

    pub fn parse(name: &str) -> Option<Channel> {
        Channel::ALL.into_iter().find(|c| c.as_str() == name)
    }

    /// The lead variable a message on this channel is addressed to.
    pub fn address_variable(self) -> &'static str {
        match self {
            Channel::Email => "email",
            Channel::Linkedin => "linkedin_url",
            Channel::Instagram => "instagram_handle",
            Channel::Whatsapp => "phone",
        }
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a condition asks about the lead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Signal {
    Connected,
    Replied,
    Opened,
    Clicked,
}

impl Signal {
    pub const ALL: [Signal; 4] = [
        Signal::Connected,
        Signal::Replied,
        Signal::Opened,
        Signal::Clicked,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Signal::Connected => "connected",
            Signal::Replied => "replied",
            Signal::Opened => "opened",
            Signal::Clicked => "clicked",
        }
    }

    pub fn parse(name: &str) -> Option<Signal> {
        Signal::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

/// A message template: text with `{{variable}}` placeholders, each one of [`VARIABLES`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Template(String);

/// Why a template was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateError {
    Unknown(String),
    Unclosed,
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TemplateError::Unknown(name) => write!(
                f,
                "uses unknown variable {{{{{name}}}}}; known: {}",
                VARIABLES.join(", ")
            ),
            TemplateError::Unclosed => f.write_str("has a {{ without its }}"),
        }
    }
}

/// A piece of a template: text, or a variable's name.
enum Piece<'a> {
    Text(&'a str),
    Variable(&'a str),
}

fn pieces(text: &str) -> Result<Vec<Piece<'_>>, TemplateError> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find("{{") {
        out.push(Piece::Text(&rest[..open]));
        let after = &rest[open + 2..];
        let close = after.find("}}").ok_or(TemplateError::Unclosed)?;
        out.push(Piece::Variable(after[..close].trim()));
        rest = &after[close + 2..];
    }
    out.push(Piece::Text(rest));
    Ok(out)
}

impl Template {
    pub fn parse(text: &str) -> Result<Self, TemplateError> {
        for piece in pieces(text)? {
            if let Piece::Variable(name) = piece
                && !VARIABLES.contains(&name)
            {
                return Err(TemplateError::Unknown(name.to_owned()));
            }
        }
        Ok(Template(text.to_owned()))
    }

    /// The text with each placeholder replaced by the lead's value (empty when the lead has
    /// none).
    pub fn render(&self, variables: &BTreeMap<String, String>) -> String {
        // Parsed at construction, so this cannot fail; an unclosed brace renders verbatim.
        match pieces(&self.0) {
            Ok(parts) => parts
                .into_iter()
                .map(|piece| match piece {
                    Piece::Text(text) => text,
                    Piece::Variable(name) => variables.get(name).map_or("", String::as_str),
                })
                .collect(),
            Err(_) => self.0.clone(),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An action with an external effect, and what it says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Action {
    EmailSend {
        subject: Template,
        body: Template,
    },
    EmailFollowup {
        body: Template,
    },
    WhatsappSend {
        template: String,
        language: String,
        params: Vec<Template>,
    },
    LinkedinVisit,
    LinkedinConnect {
        note: Option<Template>,
    },
    LinkedinMessage {
        message: Template,
    },
    LinkedinFollow,
    InstagramDm {
        message: Template,
    },
    InstagramFollow,
    InstagramLike,
}

impl Action {
    pub fn step_type(&self) -> &'static str {
        match self {
            Action::EmailSend { .. } => "email_send",
            Action::EmailFollowup { .. } => "email_followup",
            Action::WhatsappSend { .. } => "whatsapp_send",
            Action::LinkedinVisit => "linkedin_visit",
            Action::LinkedinConnect { .. } => "linkedin_connect",
            Action::LinkedinMessage { .. } => "linkedin_message",
            Action::LinkedinFollow => "linkedin_follow",
            Action::InstagramDm { .. } => "instagram_dm",
            Action::InstagramFollow => "instagram_follow",
            Action::InstagramLike => "instagram_like",
        }
    }

    pub fn channel(&self) -> Channel {
        match self {
            Action::EmailSend { .. } | Action::EmailFollowup { .. } => Channel::Email,
            Action::WhatsappSend { .. } => Channel::Whatsapp,
            Action::LinkedinVisit
            | Action::LinkedinConnect { .. }
            | Action::LinkedinMessage { .. }
            | Action::LinkedinFollow => Channel::Linkedin,
            Action::InstagramDm { .. } | Action::InstagramFollow | Action::InstagramLike => {
                Channel::Instagram
            }
        }
    }
}

/// One validated step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Step {
    Action(Action),
    Delay {
        #[serde(rename = "type")]
        kind: DelayTag,
        days: u64,
        hours: u64,
    },
    Condition {
        #[serde(rename = "type")]
        kind: ConditionTag,
        #[serde(rename = "if")]
        signal: Signal,
        yes: usize,
        no: usize,
    },
    /// One call to the lead by `agent_id`, on behalf of `user_id`, through the call-campaign
    /// slots; the lead moves on when the call ends.
    VoiceAgentCall {
        #[serde(rename = "type")]
        kind: VoiceAgentCallTag,
        user_id: Uuid,
        agent_id: Uuid,
    },
    /// Fills the sequence once per local day with up to `daily_limit` people from the lead
    /// pool `pool`. Only ever the first step; generated leads start after it.
    LeadGeneration {
        #[serde(rename = "type")]
        kind: LeadGenerationTag,
        daily_limit: u32,
        pool: String,
    },
}

/// Serialises as `"voice_agent_call"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VoiceAgentCallTag {
    VoiceAgentCall,
}

/// Serialises as `"lead_generation"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LeadGenerationTag {
    LeadGeneration,
}

/// Serialises as `"delay"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DelayTag {
    Delay,
}

/// Serialises as `"condition"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConditionTag {
    Condition,
}

impl Step {
    pub fn step_type(&self) -> &'static str {
        match self {
            Step::Action(action) => action.step_type(),
            Step::Delay { .. } => "delay",
            Step::Condition { .. } => "condition",
            Step::VoiceAgentCall { .. } => "voice_agent_call",
            Step::LeadGeneration { .. } => "lead_generation",
        }
    }

    pub fn voice_agent_call(user_id: Uuid, agent_id: Uuid) -> Step {
        Step::VoiceAgentCall {
            kind: VoiceAgentCallTag::VoiceAgentCall,
            user_id,
            agent_id,
        }
    }

    pub fn lead_generation(daily_limit: u32, pool: impl Into<String>) -> Step {
        Step::LeadGeneration {
            kind: LeadGenerationTag::LeadGeneration,
            daily_limit,
            pool: pool.into(),
        }
    }

    pub fn delay(days: u64, hours: u64) -> Step {
        Step::Delay {
            kind: DelayTag::Delay,
            days,
            hours,
        }
    }

    pub fn condition(signal: Signal, yes: usize, no: usize) -> Step {
        Step::Condition {
            kind: ConditionTag::Condition,
            signal,
            yes,
            no,
        }
    }
}

/// A step configuration that cannot run: names the step and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("step {index} ({step_type}): {field} {reason}")]
pub struct StepError {
    pub index: usize,
    pub step_type: String,
    pub field: String,
    pub reason: String,
}

impl StepError {
    /// The field's path in the request: `steps[2].subject`.
    pub fn path(&self) -> String {
        format!("steps[{}].{}", self.index, self.field)
    }
}

/// The step types herald knows.
pub const STEP_TYPES: &[&str] = &[
    "email_send",
    "email_followup",
    "whatsapp_send",
    "linkedin_visit",
    "linkedin_connect",
    "linkedin_message",
    "linkedin_follow",
    "instagram_dm",
    "instagram_follow",
    "instagram_like",
    "voice_agent_call",
    "delay",
    "condition",
    "lead_generation",
];

struct StepFields<'a> {
    index: usize,
    step_type: &'a str,
    map: &'a Map<String, Value>,
}

impl StepFields<'_> {
    fn error(&self, field: &str, reason: impl Into<String>) -> StepError {
        StepError {
            index: self.index,
            step_type: self.step_type.to_owned(),
            field: field.to_owned(),
            reason: reason.into(),
        }
    }

    fn allow(&self, fields: &[&str]) -> Result<(), StepError> {
        match self
            .map
            .keys()
            .find(|k| *k != "type" && !fields.contains(&k.as_str()))
        {
            Some(unknown) => Err(self.error(
                unknown,
                if fields.is_empty() {
                    "is not a field of this step type (it takes none)".to_owned()
                } else {
                    format!(
                        "is not a field of this step type; expected {}",
                        fields.join(", ")
                    )
                },
            )),
            None => Ok(()),
        }
    }

    fn text(&self, field: &str) -> Result<String, StepError> {
        match self.map.get(field) {
            None | Some(Value::Null) => Err(self.error(field, "is required")),
            Some(Value::String(s)) if s.trim().is_empty() => {
                Err(self.error(field, "must not be empty"))
            }
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(self.error(field, "must be a string")),
        }
    }

    fn template(&self, field: &str) -> Result<Template, StepError> {
        Template::parse(&self.text(field)?).map_err(|e| self.error(field, e.to_string()))
    }

    fn optional_template(&self, field: &str) -> Result<Option<Template>, StepError> {
        match self.map.get(field) {
            None | Some(Value::Null) => Ok(None),
            _ => self.template(field).map(Some),
        }
    }

    fn id(&self, field: &str) -> Result<Uuid, StepError> {
        self.text(field)?
            .trim()
            .parse()
            .map_err(|_| self.error(field, "must be an id (a UUID)"))
    }

    fn whole(&self, field: &str) -> Result<Option<u64>, StepError> {
        match self.map.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.error(field, "must be a whole number, 0 or more")),
        }
    }
}

/// Parses and validates one step.
fn parse_step(index: usize, value: &Value, len: usize) -> Result<Step, StepError> {
    let unnamed = |field: &str, reason: &str| StepError {
        index,
        step_type: "?".into(),
        field: field.into(),
        reason: reason.into(),
    };
    let map = value
        .as_object()
        .ok_or_else(|| unnamed("(step)", "must be a JSON object"))?;
    let step_type = match map.get("type") {
        Some(Value::String(t)) => t.as_str(),
        None | Some(Value::Null) => return Err(unnamed("type", "is required")),
        Some(_) => return Err(unnamed("type", "must be a string")),
    };
    let f = StepFields {
        index,
        step_type,
        map,
    };
    let step = match step_type {
        "email_send" => {
            f.allow(&["subject", "body"])?;
            Step::Action(Action::EmailSend {
                subject: f.template("subject")?,
                body: f.template("body")?,
            })
        }
        "email_followup" => {
            f.allow(&["body"])?;
            Step::Action(Action::EmailFollowup {
                body: f.template("body")?,
            })
        }
        "whatsapp_send" => {
            f.allow(&["template", "language", "params"])?;
            let params = match map.get("params") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(items)) => items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| {
                        let field = format!("params[{i}]");
                        item.as_str()
                            .ok_or_else(|| f.error(&field, "must be a string"))
                            .and_then(|s| {
                                Template::parse(s).map_err(|e| f.error(&field, e.to_string()))
                            })
                    })
                    .collect::<Result<_, _>>()?,
                Some(_) => return Err(f.error("params", "must be a list of strings")),
            };
            Step::Action(Action::WhatsappSend {
                template: f.text("template")?,
                language: f.text("language")?,
                params,
            })
        }
        "linkedin_visit" => {
            f.allow(&[])?;
            Step::Action(Action::LinkedinVisit)
        }
        "linkedin_connect" => {
            f.allow(&["note"])?;
            Step::Action(Action::LinkedinConnect {
                note: f.optional_template("note")?,
            })
        }
        "linkedin_message" => {
            f.allow(&["message"])?;
            Step::Action(Action::LinkedinMessage {
                message: f.template("message")?,
            })
        }
        "linkedin_follow" => {
            f.allow(&[])?;
            Step::Action(Action::LinkedinFollow)
        }
        "instagram_dm" => {
            f.allow(&["message"])?;
            Step::Action(Action::InstagramDm {
                message: f.template("message")?,
            })
        }
        "instagram_follow" => {
            f.allow(&[])?;
            Step::Action(Action::InstagramFollow)
        }
        "instagram_like" => {
            f.allow(&[])?;
            Step::Action(Action::InstagramLike)
        }
        "delay" => {
            f.allow(&["days", "hours"])?;
            let days = f.whole("days")?;
            let hours = f.whole("hours")?;
            if days.is_none() && hours.is_none() {
                return Err(f.error("days", "or hours is required"));
            }
            let (days, hours) = (days.unwrap_or(0), hours.unwrap_or(0));
            let total = days.saturating_mul(24).saturating_add(hours);
            if total == 0 {
                return Err(f.error("hours", "the delay must be at least one hour"));
            }
            if total > MAX_DELAY_HOURS {
                return Err(f.error(
                    "days",
                    format!("the delay must be at most {MAX_DELAY_HOURS} hours"),
                ));
            }
            Step::delay(days, hours)
        }
        "condition" => {
            f.allow(&["if", "yes", "no"])?;
            let name = f.text("if")?;
            let signal = Signal::parse(&name).ok_or_else(|| {
                f.error("if", "must be one of connected, replied, opened, clicked")
            })?;
            let branch = |field: &str| -> Result<usize, StepError> {
                let target = f
                    .whole(field)?
                    .ok_or_else(|| f.error(field, "is required (a step index)"))?;
                let target = usize::try_from(target).unwrap_or(usize::MAX);
                if target <= index || target > len {
                    return Err(f.error(
                        field,
                        format!(
                            "must be a later step's index ({} to {len}; {len} ends the sequence)",
                            index + 1
                        ),
                    ));
                }
                Ok(target)
            };
            Step::condition(signal, branch("yes")?, branch("no")?)
        }
        "voice_agent_call" => {
            f.allow(&["user_id", "agent_id"])?;
            Step::voice_agent_call(f.id("user_id")?, f.id("agent_id")?)
        }
        "lead_generation" => {
            f.allow(&["daily_limit", "pool"])?;
            if index != 0 {
                return Err(f.error(
                    "type",
                    "lead_generation must be the sequence's first step (it fills the sequence, \
                     it is not run per lead)",
                ));
            }
            if len < 2 {
                return Err(f.error(
                    "type",
                    "lead_generation must be followed by the steps its leads walk",
                ));
            }
            let daily_limit = f
                .whole("daily_limit")?
                .ok_or_else(|| f.error("daily_limit", "is required"))?;
            let daily_limit = u32::try_from(daily_limit)
                .ok()
                .filter(|n| (1..=MAX_DAILY_LEADS).contains(n))
                .ok_or_else(|| {
                    f.error(
                        "daily_limit",
                        format!("must be 1 to {MAX_DAILY_LEADS} leads a day"),
                    )
                })?;
            let pool = f.text("pool")?;
            check_pool_name(&pool).map_err(|reason| f.error("pool", reason))?;
            Step::lead_generation(daily_limit, pool)
        }
        other => {
            return Err(StepError {
                index,
                step_type: other.to_owned(),
                field: "type".into(),
                reason: format!(
                    "is not a step type; expected one of {}",
                    STEP_TYPES.join(", ")
                ),
            });
        }
    };
    Ok(step)
}

/// Parses and validates a sequence's steps: a non-empty list of at most [`MAX_STEPS`].
pub fn parse_steps(value: &Value) -> Result<Vec<Step>, StepError> {
    let whole = |reason: &str| StepError {
        index: 0,
        step_type: "-".into(),
        field: "(steps)".into(),
        reason: reason.into(),
    };
    let items = value
        .as_array()
        .ok_or_else(|| whole("must be a list of steps"))?;
    if items.is_empty() {
        return Err(whole("must hold at least one step"));
    }
    if items.len() > MAX_STEPS {
        return Err(whole(&format!("must hold at most {MAX_STEPS} steps")));
    }
    items
        .iter()
        .enumerate()
        .map(|(index, item)| parse_step(index, item, items.len()))
        .collect()
}

/// The steps as stored (and as the API shows them).
pub fn steps_json(steps: &[Step]) -> Value {
    serde_json::to_value(steps).unwrap_or(Value::Array(Vec::new()))
}

/// The channels a sequence's steps use.
pub fn channels(steps: &[Step]) -> Vec<Channel> {
    let mut out: Vec<Channel> = steps
        .iter()
        .filter_map(|s| match s {
            Step::Action(a) => Some(a.channel()),
            _ => None,
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The lead variables the steps need to reach a lead: each action channel's address, and
/// `phone` for a call.
pub fn needed_variables(steps: &[Step]) -> Vec<&'static str> {
    let mut out: Vec<&'static str> = channels(steps)
        .into_iter()
        .map(Channel::address_variable)
        .collect();
    if steps
        .iter()
        .any(|s| matches!(s, Step::VoiceAgentCall { .. }))
    {
        out.push("phone");
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// The sequence's `lead_generation` step, if it has one: `(daily_limit, pool)`.
pub fn lead_generation(steps: &[Step]) -> Option<(u32, &str)> {
    match steps.first() {
        Some(Step::LeadGeneration {
            daily_limit, pool, ..
        }) => Some((*daily_limit, pool.as_str())),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Sending rules

/// A daily and/or weekly cap on one action type or channel, per sender account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cap {
    /// A step type (`linkedin_connect`) or a channel (`linkedin`).
    pub action: String,
    pub daily: Option<u32>,
    pub weekly: Option<u32>,
}

/// When and how fast a sequence's action steps may run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rules {
    pub time_zone: String,
    /// Local `[start, end)`; `None` sends at any hour.
    pub window: Option<(NaiveTime, NaiveTime)>,
    pub caps: Vec<Cap>,
    /// Seconds added at random (uniformly in `[min, max]`) before each action step.
    pub jitter_secs: (u32, u32),
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            time_zone: "UTC".into(),
            window: None,
            caps: Vec::new(),
            jitter_secs: (0, 0),
        }
    }
}

/// A sending rule that cannot hold: names the field under `rules`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} {reason}")]
pub struct RuleError {
    pub field: String,
    pub reason: String,
}

fn rule_error(field: impl Into<String>, reason: impl Into<String>) -> RuleError {
    RuleError {
        field: field.into(),
        reason: reason.into(),
    }
}

fn parse_time(field: &str, value: Option<&Value>) -> Result<NaiveTime, RuleError> {
    let text = value
        .and_then(Value::as_str)
        .ok_or_else(|| rule_error(field, "is required (HH:MM)"))?;
    NaiveTime::parse_from_str(text.trim(), "%H:%M")
        .map_err(|_| rule_error(field, format!("{text:?} is not a time of day (HH:MM)")))
}

fn cap_limit(field: String, value: Option<&Value>) -> Result<Option<u32>, RuleError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .filter(|n| *n >= 1)
            .map(Some)
            .ok_or_else(|| rule_error(field, "must be a whole number, 1 or more")),
    }
}

/// Parses `{"time_zone", "window": {"start", "end"}, "caps": [{"action", "daily", "weekly"}],
/// "jitter_secs": {"min", "max"}}`; every field is optional. Field names in errors are paths
/// under `rules`.
pub fn parse_rules(value: Option<&Value>) -> Result<Rules, RuleError> {
    let mut rules = Rules::default();
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Ok(rules);
    };
    let map = value
        .as_object()
        .ok_or_else(|| rule_error("rules", "must be a JSON object"))?;
    const FIELDS: &[&str] = &["time_zone", "window", "caps", "jitter_secs"];
    if let Some(unknown) = map.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(rule_error(
            format!("rules.{unknown}"),
            format!("is not a sending rule; expected {}", FIELDS.join(", ")),
        ));
    }
    if let Some(zone) = map.get("time_zone").filter(|v| !v.is_null()) {
        let name = zone
            .as_str()
            .ok_or_else(|| rule_error("rules.time_zone", "must be a string"))?;
        name.trim().parse::<Tz>().map_err(|_| {
            rule_error(
                "rules.time_zone",
                format!("{name:?} is not an IANA time zone (e.g. Europe/London)"),
            )
        })?;
        rules.time_zone = name.trim().to_owned();
    }
    if let Some(window) = map.get("window").filter(|v| !v.is_null()) {
        let start = parse_time("rules.window.start", window.get("start"))?;
        let end = parse_time("rules.window.end", window.get("end"))?;
        if start == end {
            return Err(rule_error("rules.window.end", "must differ from start"));
        }
        rules.window = Some((start, end));
    }
    if let Some(caps) = map.get("caps").filter(|v| !v.is_null()) {
        let items = caps
            .as_array()
            .ok_or_else(|| rule_error("rules.caps", "must be a list"))?;
        for (i, item) in items.iter().enumerate() {
            let action = item
                .get("action")
                .and_then(Value::as_str)
                .ok_or_else(|| rule_error(format!("rules.caps[{i}].action"), "is required"))?;
            let known = Channel::parse(action).is_some()
                || (STEP_TYPES.contains(&action)
                    && !matches!(
                        action,
                        "delay" | "condition" | "voice_agent_call" | "lead_generation"
                    ));
            if !known {
                return Err(rule_error(
                    format!("rules.caps[{i}].action"),
                    format!("{action:?} is not an action step type or a channel"),
                ));
            }
            let daily = cap_limit(format!("rules.caps[{i}].daily"), item.get("daily"))?;
            let weekly = cap_limit(format!("rules.caps[{i}].weekly"), item.get("weekly"))?;
            if daily.is_none() && weekly.is_none() {
                return Err(rule_error(
                    format!("rules.caps[{i}].daily"),
                    "or weekly is required",
                ));
            }
            rules.caps.push(Cap {
                action: action.to_owned(),
                daily,
                weekly,
            });
        }
    }
    if let Some(jitter) = map.get("jitter_secs").filter(|v| !v.is_null()) {
        let bound = |field: &str| -> Result<u32, RuleError> {
            jitter
                .get(field)
                .and_then(Value::as_u64)
                .and_then(|n| u32::try_from(n).ok())
                .filter(|n| *n <= 86_400)
                .ok_or_else(|| {
                    rule_error(
                        format!("rules.jitter_secs.{field}"),
                        "is required: whole seconds, 0 to 86400",
                    )
                })
        };
        let (min, max) = (bound("min")?, bound("max")?);
        if min > max {
            return Err(rule_error("rules.jitter_secs.max", "must be at least min"));
        }
        rules.jitter_secs = (min, max);
    }
    Ok(rules)
}

impl Rules {
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "time_zone": self.time_zone,
            "window": self.window.map(|(s, e)| serde_json::json!({
                "start": s.format("%H:%M").to_string(),
                "end": e.format("%H:%M").to_string(),
            })),
            "caps": self.caps,
            "jitter_secs": {"min": self.jitter_secs.0, "max": self.jitter_secs.1},
        })
    }

    pub fn zone(&self) -> Tz {
        self.time_zone.parse().unwrap_or(Tz::UTC)
    }

    /// The caps that apply to `action` (by its step type or its channel).
    pub fn caps_for(&self, action: &Action) -> impl Iterator<Item = &Cap> {
        let step_type = action.step_type();
        let channel = action.channel().as_str();
        self.caps
            .iter()
            .filter(move |c| c.action == step_type || c.action == channel)
    }
}

/// The instants a cap counts from, in `zone` at `now`: the local day's and week's (Monday)
/// midnight, and when the next of each begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapPeriods {
    pub day_start: DateTime<Utc>,
    pub next_day: DateTime<Utc>,
    pub week_start: DateTime<Utc>,
    pub next_week: DateTime<Utc>,
}

fn local_midnight(zone: Tz, date: chrono::NaiveDate) -> DateTime<Utc> {
    let midnight = date.and_time(NaiveTime::MIN);
    match zone.from_local_datetime(&midnight).earliest() {
        Some(at) => at.with_timezone(&Utc),
        // Midnight skipped by a DST change: the first hour that exists.
        None => zone
            .from_local_datetime(&(midnight + Duration::hours(1)))
            .earliest()
            .map_or_else(
                || Utc.from_utc_datetime(&midnight),
                |at| at.with_timezone(&Utc),
            ),
    }
}

pub fn cap_periods(zone: Tz, now: DateTime<Utc>) -> CapPeriods {
    let today = now.with_timezone(&zone).date_naive();
    let monday = today - Duration::days(i64::from(today.weekday().num_days_from_monday()));
    CapPeriods {
        day_start: local_midnight(zone, today),
        next_day: local_midnight(zone, today + Duration::days(1)),
        week_start: local_midnight(zone, monday),
        next_week: local_midnight(zone, monday + Duration::days(7)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_missing_field_names_the_step_and_the_field() {
        let err = parse_steps(&json!([
            {"type": "linkedin_visit"},
            {"type": "email_send", "body": "Hi {{first_name}}"}
        ]))
        .unwrap_err();
        assert_eq!(
            (err.index, err.step_type.as_str(), err.field.as_str()),
            (1, "email_send", "subject")
        );
        assert_eq!(err.path(), "steps[1].subject");
        assert_eq!(err.to_string(), "step 1 (email_send): subject is required");
    }

    #[test]
    fn unknown_variables_and_bad_branches_are_refused() {
        let err = parse_steps(&json!([{"type": "linkedin_message", "message": "Hi {{nickname}}"}]))
            .unwrap_err();
        assert_eq!(err.field, "message");
        assert!(err.reason.contains("nickname"), "{err}");
        let err = parse_steps(&json!([
            {"type": "condition", "if": "replied", "yes": 0, "no": 1}
        ]))
        .unwrap_err();
        assert_eq!(err.field, "yes");
        let err = parse_steps(&json!([{"type": "delay"}])).unwrap_err();
        assert_eq!(err.field, "days");
        let err = parse_steps(&json!([{"type": "fax"}])).unwrap_err();
        assert_eq!(
            (err.step_type.as_str(), err.field.as_str()),
            ("fax", "type")
        );
    }

    #[test]
    fn a_voice_agent_call_needs_its_user_and_agent() {
        let user = "0190a5b0-0000-7000-8000-000000000001";
        let agent = "0190a5b0-0000-7000-8000-000000000002";
        let err = parse_steps(&json!([
            {"type": "email_send", "subject": "Hi", "body": "Hello"},
            {"type": "voice_agent_call", "agent_id": agent}
        ]))
        .unwrap_err();
        assert_eq!(err.path(), "steps[1].user_id");
        assert_eq!(
            err.to_string(),
            "step 1 (voice_agent_call): user_id is required"
        );
        let err = parse_steps(&json!([{"type": "voice_agent_call", "user_id": user}])).unwrap_err();
        assert_eq!((err.index, err.field.as_str()), (0, "agent_id"));
        let err = parse_steps(&json!([
            {"type": "voice_agent_call", "user_id": "bob", "agent_id": agent}
        ]))
        .unwrap_err();
        assert_eq!(err.field, "user_id");
        assert!(err.reason.contains("UUID"), "{err}");
        let err = parse_steps(&json!([
            {"type": "voice_agent_call", "user_id": user, "agent_id": agent, "script": "x"}
        ]))
        .unwrap_err();
        assert_eq!(err.field, "script");
        let steps = parse_steps(&json!([
            {"type": "voice_agent_call", "user_id": user, "agent_id": agent},
            {"type": "condition", "if": "connected", "yes": 2, "no": 2}
        ]))
        .unwrap();
        assert_eq!(
            steps[0],
            Step::voice_agent_call(user.parse().unwrap(), agent.parse().unwrap())
        );
        assert_eq!(parse_steps(&steps_json(&steps)).unwrap(), steps);
        assert_eq!(needed_variables(&steps), vec!["phone"]);
        assert!(channels(&steps).is_empty());
    }

    #[test]
    fn lead_generation_is_the_first_step_with_a_bounded_daily_limit() {
        let ok = parse_steps(&json!([
            {"type": "lead_generation", "daily_limit": 50, "pool": "q4-prospects"},
            {"type": "email_send", "subject": "Hi", "body": "Hello"}
        ]))
        .unwrap();
        assert_eq!(lead_generation(&ok), Some((50, "q4-prospects")));
        assert_eq!(parse_steps(&steps_json(&ok)).unwrap(), ok);
        assert_eq!(needed_variables(&ok), vec!["email"]);

        let err = parse_steps(&json!([
            {"type": "email_send", "subject": "Hi", "body": "Hello"},
            {"type": "lead_generation", "daily_limit": 50, "pool": "p"}
        ]))
        .unwrap_err();
        assert_eq!(
            (err.index, err.step_type.as_str(), err.field.as_str()),
            (1, "lead_generation", "type")
        );
        assert!(err.reason.contains("first step"), "{err}");
        for (limit, field) in [
            (json!(0), "daily_limit"),
            (json!(10_001), "daily_limit"),
            (json!(-1), "daily_limit"),
            (json!("ten"), "daily_limit"),
        ] {
            let err = parse_steps(&json!([
                {"type": "lead_generation", "daily_limit": limit, "pool": "p"},
                {"type": "linkedin_visit"}
            ]))
            .unwrap_err();
            assert_eq!((err.index, err.field.as_str()), (0, field), "{err}");
        }
        let err = parse_steps(&json!([
            {"type": "lead_generation", "pool": "p"},
            {"type": "linkedin_visit"}
        ]))
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "step 0 (lead_generation): daily_limit is required"
        );
        let err = parse_steps(&json!([
            {"type": "lead_generation", "daily_limit": 10},
            {"type": "linkedin_visit"}
        ]))
        .unwrap_err();
        assert_eq!(err.path(), "steps[0].pool");
        let err = parse_steps(&json!([
            {"type": "lead_generation", "daily_limit": 10, "pool": "a b/c"},
            {"type": "linkedin_visit"}
        ]))
        .unwrap_err();
        assert_eq!(err.field, "pool");
        let err = parse_steps(&json!([
            {"type": "lead_generation", "daily_limit": 10, "pool": "p"}
        ]))
        .unwrap_err();
        assert!(err.reason.contains("followed"), "{err}");
        assert_eq!(
            parse_steps(&json!([
                {"type": "lead_generation", "daily_limit": 10_000, "pool": "p"},
                {"type": "linkedin_visit"}
            ]))
            .map(|s| lead_generation(&s).map(|(n, _)| n)),
            Ok(Some(10_000))
        );
    }

    #[test]
    fn steps_round_trip_through_their_stored_form() {
        let steps = parse_steps(&json!([
            {"type": "email_send", "subject": "Hi {{ first_name }}", "body": "At {{company_name}}?"},
            {"type": "delay", "days": 2},
            {"type": "condition", "if": "opened", "yes": 3, "no": 4},
            {"type": "linkedin_connect"},
            {"type": "whatsapp_send", "template": "hello", "language": "en_US", "params": ["{{first_name}}"]}
        ]))
        .unwrap();
        let again = parse_steps(&steps_json(&steps)).unwrap();
        assert_eq!(again, steps);
        assert_eq!(
            channels(&steps),
            vec![Channel::Email, Channel::Linkedin, Channel::Whatsapp]
        );
    }

    #[test]
    fn templates_render_the_leads_variables() {
        let t = Template::parse("Hi {{ first_name }} at {{company_name}}{{title}}").unwrap();
        let vars = BTreeMap::from([
            ("first_name".to_owned(), "Ann".to_owned()),
            ("company_name".to_owned(), "Acme".to_owned()),
        ]);
        assert_eq!(t.render(&vars), "Hi Ann at Acme");
        assert_eq!(
            Template::parse("{{first_name"),
            Err(TemplateError::Unclosed)
        );
    }

    #[test]
    fn rules_are_validated_with_their_path() {
        let rules = parse_rules(Some(&json!({
            "time_zone": "Europe/London",
            "window": {"start": "09:00", "end": "18:00"},
            "caps": [{"action": "linkedin_connect", "daily": 100, "weekly": 200}],
            "jitter_secs": {"min": 30, "max": 300}
        })))
        .unwrap();
        assert_eq!(rules.caps.len(), 1);
        assert_eq!(parse_rules(Some(&rules.to_json())).unwrap(), rules);
        let err =
            parse_rules(Some(&json!({"caps": [{"action": "delay", "daily": 1}]}))).unwrap_err();
        assert_eq!(err.field, "rules.caps[0].action");
        let err = parse_rules(Some(&json!({"time_zone": "Mars/Base"}))).unwrap_err();
        assert_eq!(err.field, "rules.time_zone");
    }

    #[test]
    fn cap_periods_follow_the_local_calendar() {
        let zone: Tz = "America/New_York".parse().unwrap();
        // Wednesday 2026-03-04 03:00 UTC is Tuesday 22:00 in New York.
        let now = DateTime::parse_from_rfc3339("2026-03-04T03:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let p = cap_periods(zone, now);
        assert_eq!(p.day_start.to_rfc3339(), "2026-03-03T05:00:00+00:00");
        assert_eq!(p.next_day.to_rfc3339(), "2026-03-04T05:00:00+00:00");
        assert_eq!(p.week_start.to_rfc3339(), "2026-03-02T05:00:00+00:00");
        // The week after crosses the spring-forward change (2026-03-08).
        assert_eq!(p.next_week.to_rfc3339(), "2026-03-09T04:00:00+00:00");
    }
}
