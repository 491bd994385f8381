//! Configuration: the TOML file, the environment variables that override it, and the validated
//! [`Config`] that every other module receives by reference.
//!
//! Precedence, highest first: the `--config` flag (which file to read), environment variables
//! (`PERFAGG_MONGODB_URI`, `PERFAGG_DATABASE`, `PERFAGG_LOG`, `PERFAGG_LOG_FORMAT`), the file,
//! then the defaults below. [`Config::load`] reports every problem at once, each named with its
//! file key and line or with the environment variable that set the value, so an operator fixes
//! a file in one pass.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::NaiveDate;
use chrono_tz::Tz;
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
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
    /// A `tracing` filter whose every directive names a level, such as `info` or
    /// `perfagg=debug,warn`.
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
    /// [`Error::Config`] listing the syntax error or every unknown section or key, wrong type
    /// and invalid value.
    pub fn load(path: Option<&Path>, environment: &Environment) -> Result<Config, Error> {
        let path = match path {
            Some(path) => Some(path.to_path_buf()),
            None => Some(PathBuf::from(DEFAULT_CONFIG_PATH)).filter(|path| path.exists()),
        };
        let mut problems = Problems::default();
        let (raw, origin) = match &path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| Error::ConfigRead {
                    path: path.display().to_string(),
                    source,
                })?;
                (parse_raw(&text, &mut problems), path.display().to_string())
            }
            None => (RawConfig::default(), "built-in defaults".to_string()),
        };
        validate(raw, environment, origin, problems)
    }

    /// Parses configuration text as if read from the file named `origin`, then applies
    /// `environment`.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] as for [`Config::load`].
    pub fn from_toml(text: &str, origin: &str, environment: &Environment) -> Result<Config, Error> {
        let mut problems = Problems::default();
        let raw = parse_raw(text, &mut problems);
        validate(raw, environment, origin.to_string(), problems)
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

/// Every section of the file and the keys it takes. [`parse_raw`] reports and removes any other
/// section or key before serde reads the file, so that all of them are reported at once. Keep
/// it in step with the raw structs below, which `known_keys_match_raw_structs` checks. The keys
/// of `[fields.metrics]` and `[fields.surveys]` are checked by `apply_field_table`.
const KNOWN_KEYS: [(&str, &[&str]); 8] = [
    ("mongodb", &["uri", "database"]),
    (
        "collections",
        &["metrics", "surveys", "target", "state", "rejects"],
    ),
    (
        "merge",
        &[
            "default_satisfaction",
            "timezone",
            "missing_date",
            "min_date",
        ],
    ),
    ("batch", &["max_events", "max_wait_ms"]),
    ("state", &["checkpoint_seconds"]),
    ("lease", &["ttl_seconds"]),
    ("log", &["level", "format"]),
    ("fields", &["metrics", "surveys"]),
];

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

/// Reads the file's text into a [`RawConfig`], adding a problem for a syntax error, for each
/// unknown section or key and for each value of the wrong type. A key with a problem is left
/// out, so its default applies and validation still checks every other key.
fn parse_raw(text: &str, problems: &mut Problems) -> RawConfig {
    let mut table = match text.parse::<toml::Table>() {
        Ok(table) => table,
        Err(error) => {
            let line = error.span().map(|span| line_of(text, span.start));
            problems.add_syntax_error(line, &error.message().trim().replace('\n', ", "));
            return RawConfig::default();
        }
    };
    let lines = KeyLines::read(text);
    remove_unknown_keys(&mut table, &lines, problems);

    // serde stops at the first value of the wrong type, so each one is reported and removed
    // before the table is read again. Every pass removes a key, so the loop ends.
    loop {
        let value = toml::Value::Table(table.clone());
        let error = match serde_path_to_error::deserialize::<_, RawConfig>(value) {
            Ok(raw) => return raw,
            Err(error) => error,
        };
        let key = error.path().to_string();
        let path = key_path(error.path());
        let line = path.as_deref().and_then(|path| lines.get(path));
        let message = error.inner().message().trim();
        let Some(value) = path
            .as_deref()
            .and_then(|path| remove_key(&mut table, path))
        else {
            problems.add_at(&key, line, message);
            return RawConfig::default();
        };
        problems.add_at(&key, line, describe_type_error(message, &value));
    }
}

/// Adds a problem for each section and key of `table` that [`KNOWN_KEYS`] does not list, in
/// the order of their lines, and removes them so that serde reads only known keys.
fn remove_unknown_keys(table: &mut toml::Table, lines: &KeyLines, problems: &mut Problems) {
    let mut unknown: Vec<(Vec<String>, String)> = Vec::new();
    for (section, value) in table.iter() {
        let Some((_, keys)) = KNOWN_KEYS.iter().find(|(known, _)| known == section) else {
            let sections: Vec<&str> = KNOWN_KEYS.iter().map(|(known, _)| *known).collect();
            let message = format!("unknown section; expected one of {}", sections.join(", "));
            unknown.push((vec![section.clone()], message));
            continue;
        };
        // A section that is not a table is left to serde, which reports its type.
        let Some(entries) = value.as_table() else {
            continue;
        };
        for key in entries.keys().filter(|key| !keys.contains(&key.as_str())) {
            let message = format!("unknown key; expected one of {}", keys.join(", "));
            unknown.push((vec![section.clone(), key.clone()], message));
        }
    }
    unknown.sort_by_key(|(path, _)| lines.get(path));

    for (path, message) in unknown {
        problems.add_at(&path.join("."), lines.get(&path), message);
        remove_key(table, &path);
    }
}

/// Returns the keys of a serde path, or `None` when it passes through an array or enum.
fn key_path(path: &serde_path_to_error::Path) -> Option<Vec<String>> {
    path.iter()
        .map(|segment| match segment {
            serde_path_to_error::Segment::Map { key } => Some(key.clone()),
            _ => None,
        })
        .collect()
}

/// Removes the key at `path` from nested tables and returns its value.
fn remove_key(table: &mut toml::Table, path: &[String]) -> Option<toml::Value> {
    let (last, parents) = path.split_last()?;
    let mut current = table;
    for key in parents {
        current = current.get_mut(key)?.as_table_mut()?;
    }
    current.remove(last)
}

/// Rewrites serde's message for a value of the wrong type or range as what the key takes and
/// the value found. Other messages are returned unchanged.
fn describe_type_error(message: &str, value: &toml::Value) -> String {
    let is_type_error = ["invalid type: ", "invalid value: ", "unknown variant "]
        .iter()
        .any(|start| message.starts_with(start));
    let Some((_, expected)) = message.rsplit_once(", expected ") else {
        return message.to_string();
    };
    if !is_type_error {
        return message.to_string();
    }

    let found = match value {
        toml::Value::Table(_) => "a table".to_string(),
        toml::Value::Array(_) => "an array".to_string(),
        other => other.to_string(),
    };
    format!("expected {}, found {found}", plain_expectation(expected))
}

/// Translates the Rust type names that serde puts after "expected" into what a TOML key takes.
fn plain_expectation(expected: &str) -> &str {
    match expected {
        "u64" => "a whole number >= 0",
        "f64" => "a number",
        "a map" => "a table",
        // toml 0.8's wording when an enum key such as `merge.missing_date` gets a non-string.
        "string only" => "a string",
        _ if expected.starts_with("struct ") => "a table",
        _ => expected,
    }
}

/// Returns the line, counted from 1, that byte `offset` of `text` is on.
fn line_of(text: &str, offset: usize) -> usize {
    let before = &text.as_bytes()[..offset.min(text.len())];
    before.iter().filter(|byte| **byte == b'\n').count() + 1
}

/// The line of each key in the file, by path. A [`toml::Table`] keeps no positions, so the
/// text is read a second time through serde, whose keys can carry their byte span.
#[derive(Debug, Default)]
struct KeyLines(BTreeMap<Vec<String>, usize>);

impl KeyLines {
    /// Reads the line of every key in `text`, which must already have parsed as TOML.
    fn read(text: &str) -> KeyLines {
        let mut lines = BTreeMap::new();
        let walk = KeyWalk {
            text,
            path: Vec::new(),
            lines: &mut lines,
        };
        // The text parsed once already, so the walk has nothing left to fail on. If it did
        // fail, problems would only lack their line numbers.
        let _ = walk.deserialize(toml::Deserializer::new(text));
        KeyLines(lines)
    }

    fn get(&self, path: &[String]) -> Option<usize> {
        self.0.get(path).copied()
    }
}

/// A serde visitor that records the line of every key below `path`.
struct KeyWalk<'a> {
    text: &'a str,
    path: Vec<String>,
    lines: &'a mut BTreeMap<Vec<String>, usize>,
}

impl<'de> DeserializeSeed<'de> for KeyWalk<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeyWalk<'_> {
    type Value = ();

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a TOML value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    /// Skips arrays, because no known key is inside one.
    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<(), A::Error> {
        while items.next_element::<IgnoredAny>()?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut entries: A) -> Result<(), A::Error> {
        loop {
            // toml 0.8 also hands a datetime over as a map, whose one key has no span and so
            // cannot be read as `Spanned`. A datetime has no keys to record, so stop there.
            let Ok(next) = entries.next_key::<toml::Spanned<String>>() else {
                return Ok(());
            };
            let Some(key) = next else {
                return Ok(());
            };

            let mut path = self.path.clone();
            path.push(key.get_ref().clone());
            self.lines
                .insert(path.clone(), line_of(self.text, key.span().start));
            entries.next_value_seed(KeyWalk {
                text: self.text,
                path,
                lines: &mut *self.lines,
            })?;
        }
    }
}

/// The origin of a setting's value, named in a problem so the operator knows what to change.
#[derive(Debug, Clone, Copy)]
enum Source {
    /// A key of the file, or its default.
    File(&'static str),
    /// An environment variable, which overrides the file key.
    Environment(&'static str),
}

impl Source {
    /// Returns `variable` when the environment set the value, else the file key `key`.
    fn of_setting<T>(
        environment_value: Option<&T>,
        variable: &'static str,
        key: &'static str,
    ) -> Source {
        match environment_value {
            Some(_) => Source::Environment(variable),
            None => Source::File(key),
        }
    }
}

/// Collects the problems of one load, each starting with the file key or environment variable
/// it concerns, and notes which of the two they came from so the error names that origin.
#[derive(Debug, Default)]
struct Problems {
    list: Vec<String>,
    in_file: bool,
    in_environment: bool,
}

impl Problems {
    /// Adds a problem with the file key `key`.
    fn add(&mut self, key: &str, message: impl fmt::Display) {
        self.add_at(key, None, message);
    }

    /// Adds a problem with the file key `key` on `line`, when known.
    fn add_at(&mut self, key: &str, line: Option<usize>, message: impl fmt::Display) {
        let location = line
            .map(|line| format!(" (line {line})"))
            .unwrap_or_default();
        self.list.push(format!("`{key}`{location}: {message}"));
        self.in_file = true;
    }

    /// Adds a problem with the environment variable `variable`.
    fn add_variable(&mut self, variable: &str, message: impl fmt::Display) {
        self.list.push(format!("`{variable}`: {message}"));
        self.in_environment = true;
    }

    /// Adds a problem with the setting that `source` names.
    fn add_for(&mut self, source: Source, message: impl fmt::Display) {
        match source {
            Source::File(key) => self.add(key, message),
            Source::Environment(variable) => self.add_variable(variable, message),
        }
    }

    /// Adds a TOML syntax error, which belongs to no key.
    fn add_syntax_error(&mut self, line: Option<usize>, message: &str) {
        let location = line
            .map(|line| format!(" at line {line}"))
            .unwrap_or_default();
        self.list.push(format!("syntax error{location}: {message}"));
        self.in_file = true;
    }

    /// Returns the error listing every problem, or `None` when there is none. The error's
    /// origin is the file, the environment or both, as the problems came from.
    fn into_error(self, origin: &str) -> Option<Error> {
        if self.list.is_empty() {
            return None;
        }
        let origin = match (self.in_file, self.in_environment) {
            (false, true) => "the environment".to_string(),
            (true, true) => format!("{origin} and the environment"),
            (_, false) => origin.to_string(),
        };
        Some(Error::Config {
            origin,
            problems: self.list,
        })
    }
}

/// Applies `environment` and the defaults to `raw`, checks every value and returns the
/// configuration, or the error listing `problems` (those found while reading the file) and
/// every invalid value.
fn validate(
    raw: RawConfig,
    environment: &Environment,
    origin: String,
    mut problems: Problems,
) -> Result<Config, Error> {
    let mongodb = raw.mongodb.unwrap_or_default();
    let uri_source = Source::of_setting(environment.uri.as_ref(), ENV_URI, "mongodb.uri");
    let uri = environment
        .uri
        .clone()
        .or(mongodb.uri)
        .unwrap_or_else(|| DEFAULT_URI.to_string());
    if !(uri.starts_with("mongodb://") || uri.starts_with("mongodb+srv://")) {
        problems.add_for(
            uri_source,
            format_args!(
                "`{}` is not a MongoDB connection string; it must start with mongodb:// or mongodb+srv://",
                mask_uri(&uri)
            ),
        );
    }
    let database_source = Source::of_setting(
        environment.database.as_ref(),
        ENV_DATABASE,
        "mongodb.database",
    );
    let database = environment
        .database
        .clone()
        .or(mongodb.database)
        .unwrap_or_else(|| DEFAULT_DATABASE.to_string());
    check_database_name(&database, database_source, &mut problems);

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
    check_min_date_is_past(min_date, &mut problems);

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

    let log = read_log_settings(raw.log.unwrap_or_default(), environment, &mut problems);

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

    if let Some(error) = problems.into_error(&origin) {
        return Err(error);
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
        log,
        fields: FieldNames { metrics, surveys },
    })
}

fn check_database_name(database: &str, source: Source, problems: &mut Problems) {
    if database.is_empty() {
        problems.add_for(source, "must not be empty");
    } else if database.len() > 63 {
        problems.add_for(
            source,
            format_args!("`{database}` is longer than MongoDB's 63-byte limit"),
        );
    } else if let Some(bad) = database.chars().find(|c| "/\\. \"$".contains(*c)) {
        problems.add_for(
            source,
            format_args!(
                "`{database}` contains `{bad}`, which MongoDB does not allow in database names"
            ),
        );
    }
}

/// Adds a problem when `min_date` is after today in UTC. Staging documents dated before it are
/// rejected, so a future day would reject nearly every staging document.
fn check_min_date_is_past(min_date: NaiveDate, problems: &mut Problems) {
    let today = chrono::Utc::now().date_naive();
    if min_date > today {
        problems.add(
            "merge.min_date",
            format_args!(
                "{min_date} is after today ({today} in UTC); staging documents dated before \
                 min_date are rejected, so use a past day such as {DEFAULT_MIN_DATE}"
            ),
        );
    }
}

/// Level names that `tracing` accepts in a log filter, compared without case.
const LOG_LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// The fix given with every invalid log filter.
const LOG_FILTER_FIX: &str = "use a level such as info, or target=level such as perfagg=debug";

/// Applies `environment` and the default to the `[log]` section and checks both settings.
fn read_log_settings(
    log: RawLog,
    environment: &Environment,
    problems: &mut Problems,
) -> LogSettings {
    let level_source = Source::of_setting(environment.log.as_ref(), ENV_LOG, "log.level");
    let level = environment
        .log
        .clone()
        .or(log.level)
        .unwrap_or_else(|| "info".to_string());
    check_log_filter(&level, level_source, problems);

    let format = match environment.log_format.as_deref() {
        Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(other) => {
            problems.add_variable(
                ENV_LOG_FORMAT,
                format_args!("`{other}` is not a log format; use `text` or `json`"),
            );
            LogFormat::Text
        }
        None => log.format.unwrap_or(LogFormat::Text),
    };
    LogSettings { level, format }
}

/// Adds a problem unless every comma-separated directive of `filter` is a level name or ends
/// in `=level`. `EnvFilter` alone would accept a typo such as `inf` as a target name, and a
/// filter of unknown targets silences the daemon.
fn check_log_filter(filter: &str, source: Source, problems: &mut Problems) {
    let directives: Vec<&str> = filter
        .split(',')
        .map(str::trim)
        .filter(|directive| !directive.is_empty())
        .collect();
    if directives.is_empty() {
        problems.add_for(
            source,
            format_args!("the log filter `{filter}` names no level; {LOG_FILTER_FIX}"),
        );
        return;
    }

    let levels = LOG_LEVELS.join(", ");
    let reasons: Vec<String> = directives
        .iter()
        .filter_map(|directive| match directive.rsplit_once('=') {
            None if !is_log_level(directive) => {
                Some(format!("`{directive}` is not one of the levels {levels}"))
            }
            Some((_, level)) if !is_log_level(level) => Some(format!(
                "`{directive}` does not end in one of the levels {levels}"
            )),
            _ => None,
        })
        .collect();
    if !reasons.is_empty() {
        problems.add_for(
            source,
            format_args!(
                "invalid log filter `{filter}`: {}; {LOG_FILTER_FIX}",
                reasons.join(", and ")
            ),
        );
        return;
    }

    // The directives name levels, but a span or field part can still be malformed.
    if let Err(error) = tracing_subscriber::EnvFilter::try_new(filter) {
        problems.add_for(
            source,
            format_args!("`{filter}` is not a log filter ({error}); {LOG_FILTER_FIX}"),
        );
    }
}

fn is_log_level(word: &str) -> bool {
    LOG_LEVELS
        .iter()
        .any(|level| level.eq_ignore_ascii_case(word.trim()))
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

    fn problems_with(text: &str, environment: &Environment) -> (String, Vec<String>) {
        match Config::from_toml(text, "test.toml", environment) {
            Err(Error::Config { origin, problems }) => (origin, problems),
            other => panic!("expected a configuration error, got {other:?}"),
        }
    }

    /// Pins that a log filter with a directive that names no level is rejected, from the file
    /// and from `PERFAGG_LOG`.
    #[test]
    fn log_filter_rejects_non_level() {
        for level in [
            "inf",
            "warning",
            "lots",
            "perfagg=lots",
            "info,inf",
            "perfagg",
            "",
        ] {
            let text = format!("[log]\nlevel = \"{level}\"\n");
            let joined = problems(&text).join("\n");
            assert!(joined.starts_with("`log.level`: "), "{level}: {joined}");
            assert!(joined.contains(&format!("`{level}`")), "{level}: {joined}");
            assert!(
                joined.contains("use a level such as info, or target=level such as perfagg=debug"),
                "{level}: {joined}"
            );

            let environment = Environment {
                log: Some(level.to_string()),
                ..Environment::default()
            };
            let (_, found) = problems_with("", &environment);
            let joined = found.join("\n");
            assert!(joined.starts_with("`PERFAGG_LOG`: "), "{level}: {joined}");
        }
    }

    /// Pins the filters that stay valid: level names in any case and `target=level` directives.
    #[test]
    fn log_filter_accepts_levels_and_targets() {
        for level in [
            "info",
            "INFO",
            "Off",
            "trace",
            "perfagg=debug",
            "perfagg=debug,warn",
            "perfagg[run]=debug",
            "perfagg::sink=trace,mongodb=warn,info,",
        ] {
            let text = format!("[log]\nlevel = \"{level}\"\n");
            let config = load(&text).unwrap_or_else(|error| panic!("{level}: {error}"));
            assert_eq!(config.log.level, level);
        }
    }

    /// Pins that a value set by `PERFAGG_MONGODB_URI` or `PERFAGG_DATABASE` is blamed on that
    /// variable and on the environment, not on the file key and the file.
    #[test]
    fn environment_problem_names_variable() {
        let environment = Environment {
            uri: Some("http://x".into()),
            database: Some("a.b".into()),
            ..Environment::default()
        };
        let text = "[mongodb]\nuri = \"mongodb://a:1/\"\ndatabase = \"x\"\n";
        let (origin, found) = problems_with(text, &environment);
        assert_eq!(origin, "the environment");
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(
            found[0].starts_with("`PERFAGG_MONGODB_URI`: `http://x`"),
            "{found:?}"
        );
        assert!(
            found[1].starts_with("`PERFAGG_DATABASE`: `a.b`"),
            "{found:?}"
        );

        let (origin, found) = problems_with("[batch]\nmax_events = 0\n", &environment);
        assert_eq!(origin, "test.toml and the environment");
        assert!(found[0].starts_with("`PERFAGG_MONGODB_URI`"), "{found:?}");
        assert!(found
            .iter()
            .any(|problem| problem.starts_with("`batch.max_events`")));

        let (origin, found) =
            problems_with("[mongodb]\nuri = \"http://y\"\n", &Environment::default());
        assert_eq!(origin, "test.toml");
        assert!(
            found[0].starts_with("`mongodb.uri`: `http://y`"),
            "{found:?}"
        );
    }

    /// Pins that every unknown section and key is reported with its line, in file order, along
    /// with wrong types and invalid values found in the same file.
    #[test]
    fn unknown_keys_all_reported() {
        let text = "[mongodb]\n\
                    url = \"mongodb://a:1/\"\n\
                    [merge]\n\
                    min_date = 2000-01-01\n\
                    timezone = \"Nowhere/City\"\n\
                    zone = \"UTC\"\n\
                    [batchs]\n\
                    max_events = 3\n\
                    [batch]\n\
                    max_events = \"many\"\n\
                    max_event = 3\n\
                    [lease]\n\
                    ttl_seconds = 0\n\
                    ttl = 5\n";
        let found = problems(text);
        assert_eq!(
            found[..4],
            [
                "`mongodb.url` (line 2): unknown key; expected one of uri, database",
                "`merge.zone` (line 6): unknown key; expected one of default_satisfaction, \
                 timezone, missing_date, min_date",
                "`batchs` (line 7): unknown section; expected one of mongodb, collections, merge, \
                 batch, state, lease, log, fields",
                "`batch.max_event` (line 11): unknown key; expected one of max_events, max_wait_ms",
            ]
        );
        assert_eq!(
            found[4],
            "`lease.ttl` (line 14): unknown key; expected one of ttl_seconds"
        );
        let joined = found.join("\n");
        assert!(
            joined.contains("`batch.max_events` (line 10): expected a whole number"),
            "{joined}"
        );
        assert!(
            joined.contains("unknown time zone `Nowhere/City`"),
            "{joined}"
        );
        assert!(
            joined.contains("`lease.ttl_seconds`: 0 is outside"),
            "{joined}"
        );
        assert_eq!(found.len(), 8, "{joined}");
    }

    /// Pins that `KNOWN_KEYS` lists exactly the sections and keys of the raw structs.
    #[test]
    fn known_keys_match_raw_structs() {
        let config = load("").expect("defaults are valid");
        let rendered = toml::Value::try_from(config.to_raw()).expect("raw settings serialize");
        let mut rendered_keys = BTreeSet::new();
        for (section, value) in rendered.as_table().expect("top level is a table") {
            for key in value.as_table().expect("each section is a table").keys() {
                rendered_keys.insert(format!("{section}.{key}"));
            }
        }
        let known_keys: BTreeSet<String> = KNOWN_KEYS
            .iter()
            .flat_map(|(section, keys)| keys.iter().map(move |key| format!("{section}.{key}")))
            .collect();
        assert_eq!(known_keys, rendered_keys);
    }

    /// Pins that a line number counts from 1 when the key or error starts its line.
    #[test]
    fn problem_line_counts_from_one() {
        let found = problems("[batch]\nmax_event = 3\n");
        assert!(
            found[0].starts_with("`batch.max_event` (line 2): "),
            "{found:?}"
        );

        let found = problems("\n\n[merge]\ntimezone = 3\n");
        assert!(
            found[0].starts_with("`merge.timezone` (line 4): "),
            "{found:?}"
        );

        let found = problems("a = 1\na = 2\n");
        assert!(
            found[0].starts_with("syntax error at line 2: "),
            "{found:?}"
        );

        assert_eq!(line_of("", 0), 1);
        assert_eq!(line_of("a\nb", 2), 2);
        assert_eq!(line_of("a\n", 99), 2);
    }

    /// Pins that a TOML syntax error names its line and no key.
    #[test]
    fn syntax_error_has_no_key() {
        let found = problems("[merge]\ntimezone = \"UTC\"\n[batch\n");
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("syntax error at line 3: "),
            "{found:?}"
        );
        assert!(!found[0].contains('\n'), "{found:?}");
    }

    /// Pins that a value of the wrong type is described in TOML terms, with its key and line,
    /// and that every such value in the file is reported.
    #[test]
    fn wrong_type_in_plain_words() {
        let text = "[batch]\n\
                    max_events = \"many\"\n\
                    max_wait_ms = 1.5\n\
                    [merge]\n\
                    default_satisfaction = \"high\"\n\
                    timezone = 3\n\
                    missing_date = \"skip\"\n\
                    [lease]\n\
                    ttl_seconds = -1\n\
                    [state]\n\
                    checkpoint_seconds = [1]\n\
                    [log]\n\
                    format = 3\n";
        let found = problems(text);
        for expected in [
            "`batch.max_events` (line 2): expected a whole number >= 0, found \"many\"",
            "`batch.max_wait_ms` (line 3): expected a whole number >= 0, found 1.5",
            "`merge.default_satisfaction` (line 5): expected a number, found \"high\"",
            "`merge.timezone` (line 6): expected a string, found 3",
            "`merge.missing_date` (line 7): expected `reject` or `event_day`, found \"skip\"",
            "`lease.ttl_seconds` (line 9): expected a whole number >= 0, found -1",
            "`state.checkpoint_seconds` (line 11): expected a whole number >= 0, found an array",
            "`log.format` (line 13): expected a string, found 3",
        ] {
            assert!(
                found.iter().any(|problem| problem == expected),
                "missing {expected} in {found:#?}"
            );
        }
        assert_eq!(found.len(), 8, "{found:#?}");

        let found = problems("merge = 3\n");
        assert_eq!(found, ["`merge` (line 1): expected a table, found 3"]);
    }

    /// Pins that `merge.min_date` may be today but not a later day.
    #[test]
    fn min_date_in_future_rejected() {
        let found = problems("[merge]\nmin_date = \"2999-01-01\"\n");
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("`merge.min_date`: 2999-01-01 is after today ("),
            "{found:?}"
        );
        assert!(
            found[0].contains("use a past day such as 2000-01-01"),
            "{found:?}"
        );

        let today = chrono::Utc::now().date_naive();
        let config = load(&format!("[merge]\nmin_date = \"{today}\"\n")).expect("today is valid");
        assert_eq!(config.merge.min_date, today);
    }
}
