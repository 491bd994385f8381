//! The merge rules: a decoded staging record and the current target document in, the new
//! target document out. Pure functions, no I/O, so the sink can run them inside a
//! transaction as often as retries need and tests can drive every case directly.
//!
//! Each source owns its fields and replaces them whole on every merge; fields that neither
//! source owns are copied through untouched. After any merge the document has the full
//! schema, with defaults where a source has not arrived yet.

use chrono::NaiveDate;
use mongodb::bson::{doc, Bson, DateTime, Document, Timestamp};

/// Identifies one target document.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub entity_name: String,
    pub entity_type: String,
    pub date: NaiveDate,
}

impl Key {
    /// Formats the target's `date` field: the day as `YYYY-MM-DD`.
    pub fn date_string(&self) -> String {
        self.date.format("%Y-%m-%d").to_string()
    }

    /// Builds the filter that selects this key's target document.
    pub fn filter(&self) -> Document {
        doc! {
            "entity_name": &self.entity_name,
            "entity_type": &self.entity_type,
            "date": self.date_string(),
        }
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            formatter,
            "{}/{}/{}",
            self.entity_name,
            self.entity_type,
            self.date_string()
        )
    }
}

/// The numbers one "Calculate Metrics" run sends for an entity and day.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsRecord {
    pub key: Key,
    /// Average solution time, in the producer's unit.
    pub sct: f64,
    pub cases: i64,
    pub sample_cases: Vec<Bson>,
    pub metadata: Document,
}

/// The numbers one "Process Survey" run sends for an entity and day.
#[derive(Debug, Clone, PartialEq)]
pub struct SurveyRecord {
    pub key: Key,
    pub csat: i64,
    pub neutral: i64,
    pub dsat: i64,
    /// Satisfaction percent as given by the producer, if it sent one.
    pub satisfaction: Option<f64>,
    pub percentages: Option<Percentages>,
    pub details: Vec<Bson>,
}

/// Share of each answer among all survey responses, in percent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Percentages {
    pub csat: f64,
    pub neutral: f64,
    pub dsat: f64,
}

/// A decoded staging document.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Metrics(MetricsRecord),
    Survey(SurveyRecord),
}

impl Record {
    pub fn key(&self) -> &Key {
        match self {
            Record::Metrics(metrics) => &metrics.key,
            Record::Survey(survey) => &survey.key,
        }
    }

    /// Returns the name of the target's `sources` entry this record writes.
    pub fn source_name(&self) -> &'static str {
        match self {
            Record::Metrics(_) => "metrics",
            Record::Survey(_) => "surveys",
        }
    }
}

/// Origin of a merged record, stored in the target's `sources` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Provenance {
    pub staging_id: Bson,
    pub cluster_time: Timestamp,
}

/// Rule settings taken from the configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rules {
    pub default_satisfaction: f64,
}

/// The outcome of merging one record.
#[derive(Debug, Clone, PartialEq)]
pub struct Merged {
    pub document: Document,
    /// Whether the target document existed before this merge.
    pub existed: bool,
    /// Owned fields whose value this merge changed, as dotted paths.
    pub changed: Vec<&'static str>,
}

/// Merges `record` into `current` (the target document, if one exists) and returns the new
/// target document. `now` becomes `updated_at`, and `created_at` of a new document.
pub fn merge(
    current: Option<&Document>,
    record: &Record,
    provenance: &Provenance,
    rules: Rules,
    now: DateTime,
) -> Merged {
    let existed = current.is_some();
    let mut document = current.cloned().unwrap_or_default();
    let before = document.clone();

    let key = record.key();
    document.insert("entity_name", key.entity_name.as_str());
    document.insert("entity_type", key.entity_type.as_str());
    document.insert("date", key.date_string());
    let mut metrics = take_document(&mut document, "metrics");
    match record {
        Record::Metrics(record) => apply_metrics(&mut document, &mut metrics, record),
        Record::Survey(record) => apply_survey(&mut document, &mut metrics, record, rules),
    }
    fill_defaults(&mut document, &mut metrics, rules);
    document.insert("metrics", metrics);

    let mut sources = take_document(&mut document, "sources");
    sources.insert(
        record.source_name(),
        doc! {
            "staging_id": provenance.staging_id.clone(),
            "cluster_time": provenance.cluster_time,
        },
    );
    document.insert("sources", sources);
    if !document.contains_key("created_at") {
        document.insert("created_at", now);
    }
    document.insert("updated_at", now);

    let changed = changed_fields(&before, &document);
    Merged {
        document,
        existed,
        changed,
    }
}

fn apply_metrics(document: &mut Document, metrics: &mut Document, record: &MetricsRecord) {
    metrics.insert("sct", record.sct);
    metrics.insert("cases", count(record.cases));
    document.insert("cases_count", count(record.cases));
    document.insert("sample_cases", record.sample_cases.clone());
    document.insert("metadata", record.metadata.clone());
}

fn apply_survey(
    document: &mut Document,
    metrics: &mut Document,
    record: &SurveyRecord,
    rules: Rules,
) {
    let responses = record.csat + record.neutral + record.dsat;
    let satisfaction = match (record.satisfaction, responses) {
        (Some(given), _) => Some(percent(given)),
        (None, 0) => None,
        (None, _) => Some(count(rounded_percent(record.csat, responses))),
    };
    match satisfaction {
        Some(satisfaction) => {
            metrics.insert("satisfaction", satisfaction);
        }
        // With no responses the satisfaction stays as it was, or the default.
        None if is_number(metrics.get("satisfaction")) => {}
        None => {
            metrics.insert("satisfaction", percent(rules.default_satisfaction));
        }
    }
    metrics.insert(
        "customerSatisfaction",
        doc! {
            "csat": count(record.csat),
            "neutral": count(record.neutral),
            "dsat": count(record.dsat),
        },
    );
    let percentages = record.percentages.unwrap_or_else(|| Percentages {
        csat: two_decimal_percent(record.csat, responses),
        neutral: two_decimal_percent(record.neutral, responses),
        dsat: two_decimal_percent(record.dsat, responses),
    });
    document.insert(
        "survey",
        doc! {
            "responses": count(responses),
            "percentages": {
                "csat": percentages.csat,
                "neutral": percentages.neutral,
                "dsat": percentages.dsat,
            },
            "details": record.details.clone(),
        },
    );
}

/// Gives every owned field that no source has written yet its default, so each target
/// document always has the full schema.
fn fill_defaults(document: &mut Document, metrics: &mut Document, rules: Rules) {
    let metric_defaults = [
        ("sct", Bson::Double(0.0)),
        ("cases", count(0)),
        ("satisfaction", percent(rules.default_satisfaction)),
        (
            "customerSatisfaction",
            Bson::Document(doc! { "csat": 0, "neutral": 0, "dsat": 0 }),
        ),
    ];
    for (field, default) in metric_defaults {
        if !metrics.contains_key(field) {
            metrics.insert(field, default);
        }
    }
    let document_defaults = [
        ("cases_count", count(0)),
        ("sample_cases", Bson::Array(Vec::new())),
        ("metadata", Bson::Document(Document::new())),
        (
            "survey",
            Bson::Document(doc! {
                "responses": 0,
                "percentages": { "csat": 0.0, "neutral": 0.0, "dsat": 0.0 },
                "details": [],
            }),
        ),
    ];
    for (field, default) in document_defaults {
        if !document.contains_key(field) {
            document.insert(field, default);
        }
    }
}

/// Removes a sub-document for editing; a value of another type is replaced, because the
/// field is owned by perfagg.
fn take_document(document: &mut Document, field: &str) -> Document {
    match document.remove(field) {
        Some(Bson::Document(inner)) => inner,
        _ => Document::new(),
    }
}

/// Converts a count to int32 when it fits, as n8n and the old webhook stored it, else int64.
fn count(value: i64) -> Bson {
    i32::try_from(value)
        .map(Bson::Int32)
        .unwrap_or(Bson::Int64(value))
}

/// Converts a percentage to int32 when whole, else to a double.
fn percent(value: f64) -> Bson {
    if value.fract() == 0.0 {
        Bson::Int32(value as i32)
    } else {
        Bson::Double(value)
    }
}

fn is_number(value: Option<&Bson>) -> bool {
    matches!(
        value,
        Some(Bson::Int32(_) | Bson::Int64(_) | Bson::Double(_) | Bson::Decimal128(_))
    )
}

/// 100 × part / total rounded to a whole number, halves up, in exact integer arithmetic.
fn rounded_percent(part: i64, total: i64) -> i64 {
    let (part, total) = (i128::from(part), i128::from(total));
    ((200 * part + total) / (2 * total)) as i64
}

/// 100 × part / total rounded to two decimals, halves up; 0 when there are no responses.
fn two_decimal_percent(part: i64, total: i64) -> f64 {
    if total == 0 {
        return 0.0;
    }
    let (part, total) = (i128::from(part), i128::from(total));
    let hundredths = (20_000 * part + total) / (2 * total);
    hundredths as f64 / 100.0
}

/// Fields that merges write, as dotted paths; `updated_at` changes with every merge too. A
/// rebuild clears exactly these and `updated_at`.
pub const OWNED_FIELDS: [&str; 11] = [
    "metrics.sct",
    "metrics.cases",
    "metrics.satisfaction",
    "metrics.customerSatisfaction",
    "cases_count",
    "sample_cases",
    "metadata",
    "survey",
    "sources.metrics",
    "sources.surveys",
    "created_at",
];

fn changed_fields(before: &Document, after: &Document) -> Vec<&'static str> {
    OWNED_FIELDS
        .into_iter()
        .filter(|path| lookup(before, path) != lookup(after, path))
        .collect()
}

fn lookup<'a>(document: &'a Document, path: &str) -> Option<&'a Bson> {
    let mut parts = path.split('.');
    let mut value = document.get(parts.next()?)?;
    for part in parts {
        value = value.as_document()?.get(part)?;
    }
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: Rules = Rules {
        default_satisfaction: 85.0,
    };

    fn key() -> Key {
        Key {
            entity_name: "John Doe".into(),
            entity_type: "dpe".into(),
            date: NaiveDate::from_ymd_opt(2025, 9, 25).expect("valid day"),
        }
    }

    fn metrics(sct: f64, cases: i64) -> Record {
        Record::Metrics(MetricsRecord {
            key: key(),
            sct,
            cases,
            sample_cases: vec![Bson::String("C-1".into())],
            metadata: doc! { "team": "a" },
        })
    }

    fn survey(csat: i64, neutral: i64, dsat: i64) -> Record {
        Record::Survey(SurveyRecord {
            key: key(),
            csat,
            neutral,
            dsat,
            satisfaction: None,
            percentages: None,
            details: vec![Bson::Document(doc! { "score": 5 })],
        })
    }

    fn provenance(id: i32) -> Provenance {
        Provenance {
            staging_id: Bson::Int32(id),
            cluster_time: Timestamp {
                time: 1_700_000_000,
                increment: id as u32,
            },
        }
    }

    fn now() -> DateTime {
        DateTime::from_millis(1_758_800_000_000)
    }

    /// Merges `records` in order starting from `start` and returns the final document.
    fn merge_all(start: Option<Document>, records: &[Record]) -> Document {
        let mut current = start;
        for (index, record) in records.iter().enumerate() {
            let merged = merge(
                current.as_ref(),
                record,
                &provenance(index as i32),
                RULES,
                now(),
            );
            current = Some(merged.document);
        }
        current.expect("at least one record")
    }

    fn path<'a>(document: &'a Document, path: &str) -> &'a Bson {
        lookup(document, path).unwrap_or_else(|| panic!("{path} missing in {document}"))
    }

    /// Checks each (dotted path, expected value) pair against the merge result.
    fn check(start: Option<Document>, records: &[Record], expected: &[(&str, Bson)]) {
        let document = merge_all(start, records);
        for (field, value) in expected {
            assert_eq!(path(&document, field), value, "field {field} in {document}");
        }
    }

    #[test]
    fn seed_example_both_orders() {
        let expected = [
            ("entity_name", Bson::String("John Doe".into())),
            ("date", Bson::String("2025-09-25".into())),
            ("metrics.sct", Bson::Double(2.5)),
            ("metrics.cases", Bson::Int32(15)),
            ("metrics.satisfaction", Bson::Int32(87)),
            (
                "metrics.customerSatisfaction",
                Bson::Document(doc! { "csat": 13, "neutral": 2, "dsat": 0 }),
            ),
            ("cases_count", Bson::Int32(15)),
            ("survey.responses", Bson::Int32(15)),
            ("survey.percentages.csat", Bson::Double(86.67)),
            ("survey.percentages.neutral", Bson::Double(13.33)),
        ];
        check(None, &[metrics(2.5, 15), survey(13, 2, 0)], &expected);
        check(None, &[survey(13, 2, 0), metrics(2.5, 15)], &expected);
    }

    #[test]
    fn satisfaction_rounds_halves_up() {
        check(
            None,
            &[survey(1, 7, 0)],
            &[("metrics.satisfaction", Bson::Int32(13))],
        );
        check(
            None,
            &[survey(1, 1, 0)],
            &[("metrics.satisfaction", Bson::Int32(50))],
        );
        check(
            None,
            &[survey(2, 1, 0)],
            &[("metrics.satisfaction", Bson::Int32(67))],
        );
        check(
            None,
            &[survey(0, 0, 3)],
            &[("metrics.satisfaction", Bson::Int32(0))],
        );
    }

    #[test]
    fn given_satisfaction_and_percentages_win() {
        let Record::Survey(mut record) = survey(13, 2, 0) else {
            unreachable!("survey() builds a survey")
        };
        record.satisfaction = Some(90.5);
        record.percentages = Some(Percentages {
            csat: 80.0,
            neutral: 20.0,
            dsat: 0.0,
        });
        check(
            None,
            &[Record::Survey(record)],
            &[
                ("metrics.satisfaction", Bson::Double(90.5)),
                ("survey.percentages.csat", Bson::Double(80.0)),
            ],
        );
    }

    #[test]
    fn no_responses_keep_previous_or_default() {
        check(
            None,
            &[survey(0, 0, 0)],
            &[("metrics.satisfaction", Bson::Int32(85))],
        );
        check(
            None,
            &[survey(1, 0, 0), survey(0, 0, 0)],
            &[
                ("metrics.satisfaction", Bson::Int32(100)),
                (
                    "metrics.customerSatisfaction",
                    Bson::Document(doc! { "csat": 0, "neutral": 0, "dsat": 0 }),
                ),
                ("survey.percentages.csat", Bson::Double(0.0)),
            ],
        );
    }

    #[test]
    fn metrics_only_gets_survey_defaults() {
        check(
            None,
            &[metrics(3.0, 4)],
            &[
                ("metrics.satisfaction", Bson::Int32(85)),
                (
                    "metrics.customerSatisfaction",
                    Bson::Document(doc! { "csat": 0, "neutral": 0, "dsat": 0 }),
                ),
                ("survey.responses", Bson::Int32(0)),
                ("sources.metrics.staging_id", Bson::Int32(0)),
            ],
        );
        let document = merge_all(None, &[metrics(3.0, 4)]);
        assert!(lookup(&document, "sources.surveys").is_none(), "{document}");
    }

    #[test]
    fn survey_only_gets_metrics_defaults() {
        check(
            None,
            &[survey(13, 2, 0)],
            &[
                ("metrics.sct", Bson::Double(0.0)),
                ("metrics.cases", Bson::Int32(0)),
                ("cases_count", Bson::Int32(0)),
                ("sample_cases", Bson::Array(vec![])),
                ("metadata", Bson::Document(doc! {})),
            ],
        );
    }

    #[test]
    fn second_metrics_replaces_first() {
        let second = Record::Metrics(MetricsRecord {
            key: key(),
            sct: 1.25,
            cases: 3,
            sample_cases: vec![],
            metadata: doc! {},
        });
        check(
            None,
            &[metrics(2.5, 15), survey(13, 2, 0), second],
            &[
                ("metrics.sct", Bson::Double(1.25)),
                ("metrics.cases", Bson::Int32(3)),
                ("cases_count", Bson::Int32(3)),
                ("sample_cases", Bson::Array(vec![])),
                ("metadata", Bson::Document(doc! {})),
                ("metrics.satisfaction", Bson::Int32(87)),
                ("sources.metrics.staging_id", Bson::Int32(2)),
                ("sources.surveys.staging_id", Bson::Int32(1)),
            ],
        );
    }

    #[test]
    fn other_writers_fields_survive() {
        let start = doc! {
            "_id": 7,
            "entity_name": "John Doe",
            "entity_type": "dpe",
            "date": "2025-09-25",
            "notes": "keep me",
            "metrics": { "fcr": 0.9, "sct": 99.0 },
            "sources": { "manual": "x" },
            "created_at": DateTime::from_millis(1),
        };
        check(
            Some(start),
            &[metrics(2.5, 15)],
            &[
                ("_id", Bson::Int32(7)),
                ("notes", Bson::String("keep me".into())),
                ("metrics.fcr", Bson::Double(0.9)),
                ("metrics.sct", Bson::Double(2.5)),
                ("sources.manual", Bson::String("x".into())),
                ("created_at", Bson::DateTime(DateTime::from_millis(1))),
                ("updated_at", Bson::DateTime(now())),
            ],
        );
    }

    #[test]
    fn replay_gives_same_document() {
        let records = [metrics(2.5, 15), survey(13, 2, 0), metrics(1.0, 2)];
        let once = merge_all(None, &records);
        let twice = merge_all(Some(once.clone()), &records);
        assert_eq!(once, twice);
    }

    #[test]
    fn merge_reports_existence_and_changes() {
        let first = merge(None, &metrics(2.5, 15), &provenance(1), RULES, now());
        assert!(!first.existed);
        assert!(first.changed.contains(&"metrics.sct"));
        let second = merge(
            Some(&first.document),
            &metrics(2.5, 15),
            &provenance(1),
            RULES,
            now(),
        );
        assert!(second.existed);
        assert!(second.changed.is_empty(), "{:?}", second.changed);
    }

    #[test]
    fn large_counts_become_int64() {
        check(
            None,
            &[metrics(1.0, 5_000_000_000)],
            &[("metrics.cases", Bson::Int64(5_000_000_000))],
        );
    }
}
