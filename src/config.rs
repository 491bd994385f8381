//! Configuration: the TOML file, the environment variables that override it, and the validated
//! [`Config`] that every other module receives by reference.
//!
//! Precedence, highest first: the `--config` flag (which file to read), environment variables
//! (`PERFAGG_MONGODB_URI`, `PERFAGG_DATABASE`, `PERFAGG_LOG`, `PERFAGG_LOG_FORMAT`), the file,
//! then the defaults below. [`Config::load`] reports every invalid key at once, each named with
//! the file it came from, so an operator fixes a file in one pass.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::NaiveDate;
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

use crate::error::Error;

/// The file read when `--config` is not given, if it exists.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/perfagg/perfagg.toml";

const DEFAULT_URI: &str = "mongodb://127.0.0.1:27017/?replicaSet=rs0";
const DEFAULT_DATABASE: &str = "performance";
const DEFAULT_SATISFACTION: f64 = 85.0;
const DEFAULT_MIN_DATE: &str = "2000-01-01";
const DEFAULT_MAX_EVENTS: usize = 500;
const DEFAULT_MAX_WAIT_MS: u64 = 200;
const DEFAULT_CHECKPOINT_SECONDS: u64 = 60;
const DEFAULT_LEASE_TTL_SECONDS: u64 = 15;

/// Upper bound for `batch.max_events`: one transaction must stay well inside MongoDB's
/// 60-second default transaction lifetime and 16 MiB command limits.
const MAX_BATCH_EVENTS: usize = 50_000;
const MAX_BATCH_WAIT_MS: u64 = 60_000;

/// Environment variable names, in one place so `--help` and the README agree with the code.
pub const ENV_URI: &str = "PERFAGG_MONGODB_URI";
pub const ENV_DATABASE: &str = "PERFAGG_DATABASE";
pub const ENV_LOG: &str = "PERFAGG_LOG";
pub const ENV_LOG_FORMAT: &str = "PERFAGG_LOG_FORMAT";

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Origin of the settings, for messages: a file path or "built-in defaults".
    pub origin: String,
    pub mongodb: MongoSettings,
    pub collections: Collections,
    pub merge: MergeSettings,
    pub batch: BatchSettings,
    pub state: StateSettings,
    pub lease: LeaseSettings,
    pub log: LogSettings,
    pub fields: FieldNames,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MongoSettings {
    /// Connection string; may contain a password, so print it only through [`mask_uri`].
    pub uri: String,
    pub database: String,
}

/// Collection names inside [`MongoSettings::database`].
#[derive(Debug, Clone, PartialEq)]
pub struct Collections {
    pub metrics: String,
    pub surveys: String,
    pub target: String,
    pub state: String,
    pub rejects: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MergeSettings {
    /// Satisfaction percent given to a target document that no survey has reached yet.
    pub default_satisfaction: f64,
    /// Zone in which timestamps become days and naive timestamps are read.
    pub timezone: Tz,
    pub missing_date: MissingDate,
    /// Staging documents dated before this day are rejected as implausible.
    pub min_date: NaiveDate,
}

/// Handling of a staging document that has no date.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MissingDate {
    /// Reject the document.
    Reject,
    /// Use the day, in `merge.timezone`, of the change event's wall time.
    EventDay,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BatchSettings {
    /// Maximum number of change events merged in one transaction.
    pub max_events: usize,
    /// Maximum time a batch stays open after its first change event arrives.
    pub max_wait: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StateSettings {
    /// How often the stored position follows the stream while no staging change arrives, so a
    /// quiet period does not leave the resume token behind the oplog window.
    pub checkpoint_interval: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LeaseSettings {
    /// How long a lease lasts without renewal. The holder renews it every third of this time,
    /// and a standby takes over this long after the holder stopped renewing.
    pub ttl: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogSettings {
    /// A `tracing` filter such as `info` or `perfagg=debug`.
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

/// Accepted field names of staging documents, per source. For each logical field the first
/// name present with a non-null value wins.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldNames {
    pub metrics: MetricsFields,
    pub surveys: SurveyFields,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetricsFields {
    pub entity_name: Vec<String>,
    pub entity_type: Vec<String>,
    pub date: Vec<String>,
    pub sct: Vec<String>,
    pub cases: Vec<String>,
    pub sample_cases: Vec<String>,
    pub metadata: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SurveyFields {
    pub entity_name: Vec<String>,
    pub entity_type: Vec<String>,
    pub date: Vec<String>,
    pub csat: Vec<String>,
    pub neutral: Vec<String>,
    pub dsat: Vec<String>,
    pub satisfaction: Vec<String>,
    pub percentages: Vec<String>,
    pub details: Vec<String>,
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|name| name.to_string()).collect()
}

impl Default for MetricsFields {
    fn default() -> Self {
        MetricsFields {
            entity_name: names(&["entity_name", "entityName"]),
            entity_type: names(&["entity_type", "entityType"]),
            date: names(&["date"]),
            sct: names(&["sct", "SCT"]),
            cases: names(&[
                "cases",
                "closed_cases",
                "cases_count",
                "closedCases",
                "casesCount",
            ]),
            sample_cases: names(&["sample_cases", "sampleCases"]),
            metadata: names(&["metadata"]),
        }
    }
}

impl Default for SurveyFields {
    fn default() -> Self {
        SurveyFields {
            entity_name: names(&["entity_name", "entityName"]),
            entity_type: names(&["entity_type", "entityType"]),
            date: names(&["date"]),
            csat: names(&["csat", "CSAT"]),
            neutral: names(&["neutral", "Neutral", "NEUTRAL"]),
            dsat: names(&["dsat", "DSAT"]),
            satisfaction: names(&["satisfaction", "Satisfaction"]),
            percentages: names(&["percentages"]),
            details: names(&["surveys", "survey_details", "surveyDetails"]),
        }
    }
}

impl MetricsFields {
    fn all(&self) -> [(&'static str, &Vec<String>); 7] {
        [
            ("entity_name", &self.entity_name),
            ("entity_type", &self.entity_type),
            ("date", &self.date),
            ("sct", &self.sct),
            ("cases", &self.cases),
            ("sample_cases", &self.sample_cases),
            ("metadata", &self.metadata),
        ]
    }
}

impl SurveyFields {
    fn all(&self) -> [(&'static str, &Vec<String>); 9] {
        [
            ("entity_name", &self.entity_name),
            ("entity_type", &self.entity_type),
            ("date", &self.date),
            ("csat", &self.csat),
            ("neutral", &self.neutral),
            ("dsat", &self.dsat),
            ("satisfaction", &self.satisfaction),
            ("percentages", &self.percentages),
            ("details", &self.details),
        ]
    }
}

/// The environment variables that override the file, read once by the caller so tests can
/// pass their own.
#[derive(Debug, Clone, Default)]
pub struct Environment {
    pub uri: Option<String>,
    pub database: Option<String>,
    pub log: Option<String>,
    pub log_format: Option<String>,
}

impl Environment {
    /// Reads the `PERFAGG_*` variables of this process; empty values count as unset.
    pub fn from_process() -> Environment {
        let read = |name: &str| std::env::var(name).ok().filter(|value| !value.is_empty());
        Environment {
            uri: read(ENV_URI),
            database: read(ENV_DATABASE),
            log: read(ENV_LOG),
            log_format: read(ENV_LOG_FORMAT),
        }
    }
}

impl Config {
    /// Loads the configuration from `path` (or [`DEFAULT_CONFIG_PATH`] when it exists, or the
    /// defaults), applies `environment` on top and validates the result.
    ///
    /// # Errors
    ///
    /// [`Error::ConfigRead`] when an explicitly named file cannot be read, and
    /// [`Error::Config`] listing every unknown key, wrong type and invalid value.
    pub fn load(path: Option<&Path>, environment: &Environment) -> Result<Config, Error> {
        let path = match path {
            Some(path) => Some(path.to_path_buf()),
            None => Some(PathBuf::from(DEFAULT_CONFIG_PATH)).filter(|path| path.exists()),
        };
        let (raw, origin) = match &path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| Error::ConfigRead {
                    path: path.display().to_string(),
                    source,
                })?;
                let origin = path.display().to_string();
                (parse_raw(&text, &origin)?, origin)
            }
            None => (RawConfig::default(), "built-in defaults".to_string()),
        };
        validate(raw, environment, origin)
    }

    /// Parses configuration text as if read from the file named `origin`, then applies
    /// `environment`.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] as for [`Config::load`].
    pub fn from_toml(text: &str, origin: &str, environment: &Environment) -> Result<Config, Error> {
        let raw = parse_raw(text, origin)?;
        validate(raw, environment, origin.to_string())
    }

    /// Renders the effective settings as TOML, with the password in the URI masked.
    pub fn to_toml_masked(&self) -> String {
        let mut raw = self.to_raw();
        if let Some(mongodb) = raw.mongodb.as_mut() {
            mongodb.uri = mongodb.uri.as_deref().map(mask_uri);
        }
        toml::to_string_pretty(&raw).unwrap_or_else(|error| format!("# cannot render: {error}\n"))
    }

    fn to_raw(&self) -> RawConfig {
        RawConfig {
            mongodb: Some(RawMongodb {
                uri: Some(self.mongodb.uri.clone()),
                database: Some(self.mongodb.database.clone()),
            }),
            collections: Some(RawCollections {
                metrics: Some(self.collections.metrics.clone()),
                surveys: Some(self.collections.surveys.clone()),
                target: Some(self.collections.target.clone()),
                state: Some(self.collections.state.clone()),
                rejects: Some(self.collections.rejects.clone()),
            }),
            merge: Some(RawMerge {
                default_satisfaction: Some(self.merge.default_satisfaction),
                timezone: Some(self.merge.timezone.name().to_string()),
                missing_date: Some(self.merge.missing_date),
                min_date: Some(self.merge.min_date.format("%Y-%m-%d").to_string()),
            }),
            batch: Some(RawBatch {
                max_events: Some(self.batch.max_events as u64),
                max_wait_ms: Some(self.batch.max_wait.as_millis() as u64),
            }),
            state: Some(RawState {
                checkpoint_seconds: Some(self.state.checkpoint_interval.as_secs()),
            }),
            lease: Some(RawLease {
                ttl_seconds: Some(self.lease.ttl.as_secs()),
            }),
            log: Some(RawLog {
                level: Some(self.log.level.clone()),
                format: Some(self.log.format),
            }),
            fields: Some(RawFields {
                metrics: Some(raw_fields(self.fields.metrics.all())),
                surveys: Some(raw_fields(self.fields.surveys.all())),
            }),
        }
    }
}

fn raw_fields<const N: usize>(
    all: [(&'static str, &Vec<String>); N],
) -> toml::map::Map<String, toml::Value> {
    all.into_iter()
        .map(|(key, names)| {
            let list = names.iter().cloned().map(toml::Value::String).collect();
            (key.to_string(), toml::Value::Array(list))
        })
        .collect()
}

/// Replaces the password of a `mongodb://user:password@host` URI with `****`.
pub fn mask_uri(uri: &str) -> String {
    let Some(scheme_end) = uri.find("://").map(|index| index + 3) else {
        return uri.to_string();
    };
    let rest = &uri[scheme_end..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return uri.to_string();
    };
    let user_info = &rest[..at];
    let Some(colon) = user_info.find(':') else {
        return uri.to_string();
    };
    format!(
        "{}{}:****{}",
        &uri[..scheme_end],
        &user_info[..colon],
        &rest[at..]
    )
}

// The raw file format. Every field is optional so that a missing key falls back to the
// environment or the default, and unknown keys are errors.

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    mongodb: Option<RawMongodb>,
    collections: Option<RawCollections>,
    merge: Option<RawMerge>,
    batch: Option<RawBatch>,
    state: Option<RawState>,
    lease: Option<RawLease>,
    log: Option<RawLog>,
    fields: Option<RawFields>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawMongodb {
    uri: Option<String>,
    database: Option<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawCollections {
    metrics: Option<String>,
    surveys: Option<String>,
    target: Option<String>,
    state: Option<String>,
    rejects: Option<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawMerge {
    default_satisfaction: Option<f64>,
    timezone: Option<String>,
    missing_date: Option<MissingDate>,
    min_date: Option<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawBatch {
    max_events: Option<u64>,
    max_wait_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawState {
    checkpoint_seconds: Option<u64>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawLease {
    ttl_seconds: Option<u64>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<String>,
    format: Option<LogFormat>,
}

/// Field-name tables are kept as plain TOML tables and checked by hand, so that an unknown
/// logical field and a wrong value type get the same precise message as other keys.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawFields {
    metrics: Option<toml::map::Map<String, toml::Value>>,
    surveys: Option<toml::map::Map<String, toml::Value>>,
}

fn parse_raw(text: &str, origin: &str) -> Result<RawConfig, Error> {
    let deserializer = toml::Deserializer::new(text);
    serde_path_to_error::deserialize(deserializer).map_err(|error| {
        let key = error.path().to_string();
        let message = error.inner().message().trim().to_string();
        let line = error
            .inner()
            .span()
            .map(|span| text[..span.start.min(text.len())].lines().count().max(1));
        let location = line
            .map(|line| format!(" (line {line})"))
            .unwrap_or_default();
        Error::Config {
            origin: origin.to_string(),
            problems: vec![format!("`{key}`{location}: {message}")],
        }
    })
}

/// Collects the problems of one validation pass.
struct Problems(Vec<String>);

impl Problems {
    fn add(&mut self, key: &str, message: impl std::fmt::Display) {
        self.0.push(format!("`{key}`: {message}"));
    }
}

fn validate(raw: RawConfig, environment: &Environment, origin: String) -> Result<Config, Error> {
    let mut problems = Problems(Vec::new());

    let mongodb = raw.mongodb.unwrap_or_default();
    let uri = environment
        .uri
        .clone()
        .or(mongodb.uri)
        .unwrap_or_else(|| DEFAULT_URI.to_string());
    if !(uri.starts_with("mongodb://") || uri.starts_with("mongodb+srv://")) {
        problems.add(
            "mongodb.uri",
            format_args!(
                "`{}` is not a MongoDB connection string; it must start with mongodb:// or mongodb+srv://",
                mask_uri(&uri)
            ),
        );
    }
    let database = environment
        .database
        .clone()
        .or(mongodb.database)
        .unwrap_or_else(|| DEFAULT_DATABASE.to_string());
    check_database_name(&database, &mut problems);

    let collections = raw.collections.unwrap_or_default();
    let collections = Collections {
        metrics: collections
            .metrics
            .unwrap_or_else(|| "staging_metrics".into()),
        surveys: collections
            .surveys
            .unwrap_or_else(|| "staging_surveys".into()),
        target: collections
            .target
            .unwrap_or_else(|| "performance_data".into()),
        state: collections.state.unwrap_or_else(|| "perfagg_state".into()),
        rejects: collections
            .rejects
            .unwrap_or_else(|| "staging_rejects".into()),
    };
    check_collections(&collections, &mut problems);

    let merge = raw.merge.unwrap_or_default();
    let default_satisfaction = merge.default_satisfaction.unwrap_or(DEFAULT_SATISFACTION);
    if !(0.0..=100.0).contains(&default_satisfaction) {
        problems.add(
            "merge.default_satisfaction",
            format_args!("{default_satisfaction} is outside 0..100; it is a percentage"),
        );
    }
    let timezone_name = merge.timezone.unwrap_or_else(|| "UTC".to_string());
    let timezone = timezone_name.parse::<Tz>().unwrap_or_else(|_| {
        problems.add(
            "merge.timezone",
            format_args!(
                "unknown time zone `{timezone_name}`; use an IANA name such as `UTC` or `Europe/Berlin`"
            ),
        );
        Tz::UTC
    });
    let min_date_text = merge
        .min_date
        .unwrap_or_else(|| DEFAULT_MIN_DATE.to_string());
    let min_date = NaiveDate::parse_from_str(&min_date_text, "%Y-%m-%d").unwrap_or_else(|_| {
        problems.add(
            "merge.min_date",
            format_args!("`{min_date_text}` is not a day; write it as YYYY-MM-DD"),
        );
        NaiveDate::MIN
    });

    let batch = raw.batch.unwrap_or_default();
    let max_events = batch.max_events.unwrap_or(DEFAULT_MAX_EVENTS as u64);
    if max_events == 0 || max_events > MAX_BATCH_EVENTS as u64 {
        problems.add(
            "batch.max_events",
            format_args!("{max_events} is outside 1..{MAX_BATCH_EVENTS}"),
        );
    }
    let max_wait_ms = batch.max_wait_ms.unwrap_or(DEFAULT_MAX_WAIT_MS);
    if max_wait_ms == 0 || max_wait_ms > MAX_BATCH_WAIT_MS {
        problems.add(
            "batch.max_wait_ms",
            format_args!("{max_wait_ms} is outside 1..{MAX_BATCH_WAIT_MS} milliseconds"),
        );
    }

    let state = raw.state.unwrap_or_default();
    let checkpoint_seconds = state
        .checkpoint_seconds
        .unwrap_or(DEFAULT_CHECKPOINT_SECONDS);
    if checkpoint_seconds == 0 || checkpoint_seconds > 86_400 {
        problems.add(
            "state.checkpoint_seconds",
            format_args!("{checkpoint_seconds} is outside 1..86400 seconds"),
        );
    }

    let lease = raw.lease.unwrap_or_default();
    let ttl_seconds = lease.ttl_seconds.unwrap_or(DEFAULT_LEASE_TTL_SECONDS);
    if !(2..=3_600).contains(&ttl_seconds) {
        problems.add(
            "lease.ttl_seconds",
            format_args!("{ttl_seconds} is outside 2..3600 seconds"),
        );
    }

    let log = raw.log.unwrap_or_default();
    let level = environment
        .log
        .clone()
        .or(log.level)
        .unwrap_or_else(|| "info".to_string());
    if let Err(error) = tracing_subscriber::EnvFilter::try_new(&level) {
        let key = if environment.log.is_some() {
            ENV_LOG
        } else {
            "log.level"
        };
        problems.add(
            key,
            format_args!("`{level}` is not a log filter ({error}); use a level such as `info` or `perfagg=debug`"),
        );
    }
    let format = match environment.log_format.as_deref() {
        Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(other) => {
            problems.add(
                ENV_LOG_FORMAT,
                format_args!("`{other}` is not a log format; use `text` or `json`"),
            );
            LogFormat::Text
        }
        None => log.format.unwrap_or(LogFormat::Text),
    };

    let raw_fields = raw.fields.unwrap_or_default();
    let mut metrics = MetricsFields::default();
    if let Some(table) = &raw_fields.metrics {
        let targets: Vec<(&str, &mut Vec<String>)> = vec![
            ("entity_name", &mut metrics.entity_name),
            ("entity_type", &mut metrics.entity_type),
            ("date", &mut metrics.date),
            ("sct", &mut metrics.sct),
            ("cases", &mut metrics.cases),
            ("sample_cases", &mut metrics.sample_cases),
            ("metadata", &mut metrics.metadata),
        ];
        apply_field_table("fields.metrics", table, targets, &mut problems);
    }
    check_field_overlap("fields.metrics", &metrics.all(), &mut problems);
    let mut surveys = SurveyFields::default();
    if let Some(table) = &raw_fields.surveys {
        let targets: Vec<(&str, &mut Vec<String>)> = vec![
            ("entity_name", &mut surveys.entity_name),
            ("entity_type", &mut surveys.entity_type),
            ("date", &mut surveys.date),
            ("csat", &mut surveys.csat),
            ("neutral", &mut surveys.neutral),
            ("dsat", &mut surveys.dsat),
            ("satisfaction", &mut surveys.satisfaction),
            ("percentages", &mut surveys.percentages),
            ("details", &mut surveys.details),
        ];
        apply_field_table("fields.surveys", table, targets, &mut problems);
    }
    check_field_overlap("fields.surveys", &surveys.all(), &mut problems);

    if !problems.0.is_empty() {
        return Err(Error::Config {
            origin,
            problems: problems.0,
        });
    }
    Ok(Config {
        origin,
        mongodb: MongoSettings { uri, database },
        collections,
        merge: MergeSettings {
            default_satisfaction,
            timezone,
            missing_date: merge.missing_date.unwrap_or(MissingDate::Reject),
            min_date,
        },
        batch: BatchSettings {
            max_events: max_events as usize,
            max_wait: Duration::from_millis(max_wait_ms),
        },
        state: StateSettings {
            checkpoint_interval: Duration::from_secs(checkpoint_seconds),
        },
        lease: LeaseSettings {
            ttl: Duration::from_secs(ttl_seconds),
        },
        log: LogSettings { level, format },
        fields: FieldNames { metrics, surveys },
    })
}

fn check_database_name(database: &str, problems: &mut Problems) {
    if database.is_empty() {
        problems.add("mongodb.database", "must not be empty");
    } else if database.len() > 63 {
        problems.add(
            "mongodb.database",
            format_args!("`{database}` is longer than MongoDB's 63-byte limit"),
        );
    } else if let Some(bad) = database.chars().find(|c| "/\\. \"$".contains(*c)) {
        problems.add(
            "mongodb.database",
            format_args!(
                "`{database}` contains `{bad}`, which MongoDB does not allow in database names"
            ),
        );
    }
}

fn check_collections(collections: &Collections, problems: &mut Problems) {
    let all = [
        ("collections.metrics", &collections.metrics),
        ("collections.surveys", &collections.surveys),
        ("collections.target", &collections.target),
        ("collections.state", &collections.state),
        ("collections.rejects", &collections.rejects),
    ];
    for (key, name) in all {
        if name.is_empty() {
            problems.add(key, "must not be empty");
        } else if name.contains('$') || name.starts_with("system.") {
            problems.add(
                key,
                format_args!(
                    "`{name}` is not a usable collection name (no `$`, no `system.` prefix)"
                ),
            );
        }
    }
    for (index, (key, name)) in all.iter().enumerate() {
        if let Some((other, _)) = all[..index].iter().find(|(_, earlier)| earlier == name) {
            problems.add(
                key,
                format_args!(
                    "`{name}` is also used for `{other}`; each collection needs its own name"
                ),
            );
        }
    }
}

fn apply_field_table(
    section: &str,
    table: &toml::map::Map<String, toml::Value>,
    mut targets: Vec<(&str, &mut Vec<String>)>,
    problems: &mut Problems,
) {
    for (key, value) in table {
        let full_key = format!("{section}.{key}");
        let Some((_, target)) = targets.iter_mut().find(|(name, _)| name == key) else {
            let known: Vec<&str> = targets.iter().map(|(name, _)| *name).collect();
            problems.add(
                &full_key,
                format_args!("unknown field; expected one of {}", known.join(", ")),
            );
            continue;
        };
        let list = match value {
            toml::Value::String(name) => vec![name.clone()],
            toml::Value::Array(items) => items
                .iter()
                .map(|item| item.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        if list.is_empty() {
            problems.add(
                &full_key,
                "must be a field name or a non-empty list of field names",
            );
            continue;
        }
        for name in &list {
            if name.is_empty() || name.contains('.') || name.starts_with('$') {
                problems.add(
                    &full_key,
                    format_args!("`{name}` is not a top-level field name (no `.`, no leading `$`)"),
                );
            }
        }
        **target = list;
    }
}

fn check_field_overlap(
    section: &str,
    all: &[(&'static str, &Vec<String>)],
    problems: &mut Problems,
) {
    let mut seen: BTreeSet<&str> = BTreeSet::new();
    for (key, names) in all {
        for name in names.iter() {
            if !seen.insert(name) {
                problems.add(
                    &format!("{section}.{key}"),
                    format_args!(
                        "`{name}` is accepted for another field too; each name may serve one field"
                    ),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, Error> {
        Config::from_toml(text, "test.toml", &Environment::default())
    }

    fn problems(text: &str) -> Vec<String> {
        match load(text) {
            Err(Error::Config { problems, .. }) => problems,
            other => panic!("expected a configuration error, got {other:?}"),
        }
    }

    #[test]
    fn empty_file_gives_defaults() {
        let config = load("").expect("empty file is valid");
        assert_eq!(config.mongodb.uri, DEFAULT_URI);
        assert_eq!(config.mongodb.database, "performance");
        assert_eq!(config.collections.rejects, "staging_rejects");
        assert_eq!(config.merge.default_satisfaction, 85.0);
        assert_eq!(config.merge.timezone, Tz::UTC);
        assert_eq!(config.batch.max_wait, Duration::from_millis(200));
        assert_eq!(config.fields.metrics.cases[1], "closed_cases");
    }

    #[test]
    fn example_file_matches_defaults() {
        let text = include_str!("../examples/perfagg.toml");
        let mut example = load(text).expect("examples/perfagg.toml is valid");
        let defaults = load("").expect("defaults are valid");
        example.origin = defaults.origin.clone();
        assert_eq!(example, defaults);
    }

    #[test]
    fn environment_overrides_file() {
        let environment = Environment {
            uri: Some("mongodb://10.0.0.1:1/".into()),
            database: Some("other".into()),
            log: Some("debug".into()),
            log_format: Some("json".into()),
        };
        let text =
            "[mongodb]\nuri = \"mongodb://a:1/\"\ndatabase = \"x\"\n[log]\nlevel = \"warn\"\n";
        let config = Config::from_toml(text, "f.toml", &environment).expect("valid");
        assert_eq!(config.mongodb.uri, "mongodb://10.0.0.1:1/");
        assert_eq!(config.mongodb.database, "other");
        assert_eq!(config.log.level, "debug");
        assert_eq!(config.log.format, LogFormat::Json);
    }

    #[test]
    fn unknown_key_names_key_and_file() {
        let error = load("[batch]\nmax_event = 3\n").expect_err("unknown key");
        let text = error.to_string();
        assert!(text.contains("test.toml"), "{text}");
        assert!(text.contains("max_event"), "{text}");
    }

    #[test]
    fn wrong_type_names_key() {
        let found = problems("[batch]\nmax_events = \"many\"\n");
        assert!(found[0].contains("batch.max_events"), "{found:?}");
        assert!(found[0].contains("line 2"), "{found:?}");
    }

    #[test]
    fn every_invalid_value_reported() {
        let text = r#"
            [mongodb]
            uri = "http://x"
            database = "a.b"
            [collections]
            target = "staging_metrics"
            [merge]
            default_satisfaction = 120
            timezone = "Mars/Olympus"
            min_date = "01/01/2000"
            [batch]
            max_events = 0
            max_wait_ms = 0
            [state]
            checkpoint_seconds = 0
            [lease]
            ttl_seconds = 1
            [log]
            level = "[[["
        "#;
        let found = problems(text).join("\n");
        for key in [
            "mongodb.uri",
            "mongodb.database",
            "collections.target",
            "merge.default_satisfaction",
            "merge.timezone",
            "merge.min_date",
            "batch.max_events",
            "batch.max_wait_ms",
            "state.checkpoint_seconds",
            "lease.ttl_seconds",
            "log.level",
        ] {
            assert!(found.contains(key), "missing {key} in:\n{found}");
        }
    }

    #[test]
    fn field_mapping_accepts_string_or_list() {
        let text = "[fields.metrics]\nsct = \"avg_time\"\ncases = [\"closed\", \"n\"]\n";
        let config = load(text).expect("valid mapping");
        assert_eq!(config.fields.metrics.sct, vec!["avg_time"]);
        assert_eq!(config.fields.metrics.cases, vec!["closed", "n"]);
        assert_eq!(config.fields.metrics.date, vec!["date"]);
    }

    #[test]
    fn field_mapping_rejects_unknown_and_overlap() {
        let found = problems("[fields.surveys]\nscore = \"x\"\ncsat = \"dsat\"\nneutral = 3\n");
        let joined = found.join("\n");
        assert!(joined.contains("fields.surveys.score"), "{joined}");
        assert!(joined.contains("fields.surveys.neutral"), "{joined}");
        assert!(
            joined.contains("`dsat` is accepted for another field"),
            "{joined}"
        );
    }

    #[test]
    fn mask_uri_hides_password_only() {
        assert_eq!(
            mask_uri("mongodb://app:s3cr%40t@db1:27017,db2/?replicaSet=rs0"),
            "mongodb://app:****@db1:27017,db2/?replicaSet=rs0"
        );
        assert_eq!(mask_uri("mongodb://db1/?a=b@c"), "mongodb://db1/?a=b@c");
        assert_eq!(mask_uri("mongodb://user@db1/"), "mongodb://user@db1/");
        assert_eq!(
            mask_uri("mongodb+srv://u:p@cluster.example/"),
            "mongodb+srv://u:****@cluster.example/"
        );
    }

    #[test]
    fn masked_toml_round_trips() {
        let environment = Environment {
            uri: Some("mongodb://u:pw@h:1/?replicaSet=rs0".into()),
            ..Environment::default()
        };
        let config = Config::from_toml("", "t", &environment).expect("valid");
        let rendered = config.to_toml_masked();
        assert!(!rendered.contains("pw@"), "{rendered}");
        let reparsed = load(&rendered).expect("rendered settings parse");
        assert_eq!(reparsed.fields, config.fields);
        assert_eq!(reparsed.merge, config.merge);
    }
}
