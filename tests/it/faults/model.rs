//! The reference model of the fault tests, and the comparison of a database with it.
//!
//! The model is written from the README's rules, not from perfagg's code: it replays the
//! staging documents in insertion order (`seq`) and keeps, per entity and day, the last
//! valid metrics document and the last valid survey document. It understands exactly the
//! value forms that `load.rs` generates and panics on any other, so it can never quietly
//! disagree with perfagg about a form it was not written for.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::{NaiveDate, Timelike};
use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use mongodb::Database;

use crate::support;

/// `merge.default_satisfaction` when the config does not set it.
const DEFAULT_SATISFACTION: f64 = 85.0;
/// `merge.min_date` when the config does not set it.
const MIN_DATE: (i32, u32, u32) = (2000, 1, 1);

/// Which workflow a staging collection belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Metrics,
    Surveys,
}

/// `(entity_name, entity_type, date)` of a target document.
type Key = (String, String, String);

/// The owned fields of one target document, with numbers as `f64` so that int32, int64 and
/// double compare by value.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub sct: f64,
    pub cases: f64,
    pub cases_count: f64,
    pub sample_cases: Vec<Bson>,
    pub metadata: Document,
    pub satisfaction: f64,
    pub answers: [f64; 3],
    pub responses: f64,
    pub percentages: [f64; 3],
    pub details: Vec<Bson>,
    pub metrics_staging_id: Option<Bson>,
    pub surveys_staging_id: Option<Bson>,
}

/// The last valid metrics document of a key.
#[derive(Debug, Clone)]
struct MetricsPart {
    staging_id: Bson,
    sct: f64,
    cases: f64,
    sample_cases: Vec<Bson>,
    metadata: Document,
}

/// The last valid survey document of a key.
#[derive(Debug, Clone)]
struct SurveyPart {
    staging_id: Bson,
    answers: [u64; 3],
    percentages: Option<[f64; 3]>,
    details: Vec<Bson>,
}

#[derive(Debug, Default)]
struct ModelEntry {
    metrics: Option<MetricsPart>,
    survey: Option<SurveyPart>,
    /// The satisfaction set by the surveys so far; `None` keeps the default.
    satisfaction: Option<f64>,
}

/// What the database must hold once every staging document has been merged.
#[derive(Debug, Default)]
pub struct Expected {
    pub targets: BTreeMap<Key, Target>,
    /// Invalid staging documents by `(collection, staging _id)`.
    pub rejects: BTreeMap<(String, String), Document>,
    /// Staging documents replayed.
    pub documents: usize,
}

impl Expected {
    pub fn valid(&self) -> usize {
        self.documents - self.rejects.len()
    }
}

/// Replays `staged` (collection name, kind, document) in the order given.
pub fn replay(staged: &[(String, Kind, Document)]) -> Expected {
    let mut entries: BTreeMap<Key, ModelEntry> = BTreeMap::new();
    let mut rejects = BTreeMap::new();
    for (collection, kind, document) in staged {
        let staging_id = document.get("_id").unwrap().clone();
        let Some(key) = key_of(document) else {
            rejects.insert(
                (collection.clone(), staging_id.to_string()),
                document.clone(),
            );
            continue;
        };
        let applied = match kind {
            Kind::Metrics => metrics_of(document, &staging_id).map(|part| {
                entries.entry(key).or_default().metrics = Some(part);
            }),
            Kind::Surveys => survey_of(document, &staging_id).map(|(part, given)| {
                let entry = entries.entry(key).or_default();
                let responses: u64 = part.answers.iter().sum();
                if let Some(given) = given {
                    entry.satisfaction = Some(given);
                } else if responses > 0 {
                    entry.satisfaction = Some(whole_percent_half_up(part.answers[0], responses));
                }
                entry.survey = Some(part);
            }),
        };
        if applied.is_none() {
            rejects.insert(
                (collection.clone(), staging_id.to_string()),
                document.clone(),
            );
        }
    }
    let targets = entries
        .into_iter()
        .map(|(key, entry)| (key, target_of(entry)))
        .collect();
    Expected {
        targets,
        rejects,
        documents: staged.len(),
    }
}

fn target_of(entry: ModelEntry) -> Target {
    let (sct, cases, sample_cases, metadata, metrics_staging_id) = match entry.metrics {
        Some(part) => (
            part.sct,
            part.cases,
            part.sample_cases,
            part.metadata,
            Some(part.staging_id),
        ),
        None => (0.0, 0.0, Vec::new(), Document::new(), None),
    };
    let (answers, percentages, details, surveys_staging_id) = match entry.survey {
        Some(part) => {
            let total: u64 = part.answers.iter().sum();
            let computed = part
                .answers
                .map(|count| two_decimal_percent_half_up(count, total));
            (
                part.answers.map(|count| count as f64),
                part.percentages.unwrap_or(computed),
                part.details,
                Some(part.staging_id),
            )
        }
        None => ([0.0; 3], [0.0; 3], Vec::new(), None),
    };
    Target {
        sct,
        cases,
        cases_count: cases,
        sample_cases,
        metadata,
        satisfaction: entry.satisfaction.unwrap_or(DEFAULT_SATISFACTION),
        responses: answers.iter().sum(),
        answers,
        percentages,
        details,
        metrics_staging_id,
        surveys_staging_id,
    }
}

/// 100 × part / total rounded to a whole number, halves rounded up.
fn whole_percent_half_up(part: u64, total: u64) -> f64 {
    let quotient = 100 * part / total;
    let remainder = 100 * part % total;
    let rounded = if 2 * remainder >= total {
        quotient + 1
    } else {
        quotient
    };
    rounded as f64
}

/// 100 × part / total rounded to two decimals, halves rounded up; 0 without responses.
fn two_decimal_percent_half_up(part: u64, total: u64) -> f64 {
    if total == 0 {
        return 0.0;
    }
    let quotient = 10_000 * part / total;
    let remainder = 10_000 * part % total;
    let rounded = if 2 * remainder >= total {
        quotient + 1
    } else {
        quotient
    };
    rounded as f64 / 100.0
}

/// Returns the target key of a staging document, or `None` when a key field is invalid.
fn key_of(document: &Document) -> Option<Key> {
    let name = match document.get("entity_name")? {
        Bson::String(name) => name.split_whitespace().collect::<Vec<_>>().join(" "),
        Bson::Null => return None,
        other => panic!("the model does not handle entity_name {other}"),
    };
    let entity_type = match document.get("entity_type")? {
        Bson::String(entity_type) => entity_type.to_lowercase(),
        other => panic!("the model does not handle entity_type {other}"),
    };
    let date = match document.get("date")? {
        Bson::String(text) => NaiveDate::parse_from_str(text, "%Y-%m-%d").ok()?,
        Bson::DateTime(date) => {
            let instant = date.to_chrono();
            assert_eq!(
                instant.num_seconds_from_midnight(),
                0,
                "the model handles BSON dates at UTC midnight only"
            );
            instant.date_naive()
        }
        other => panic!("the model does not handle date {other}"),
    };
    let (year, month, day) = MIN_DATE;
    if date < NaiveDate::from_ymd_opt(year, month, day).unwrap() {
        return None;
    }
    Some((name, entity_type, date.format("%Y-%m-%d").to_string()))
}

fn metrics_of(document: &Document, staging_id: &Bson) -> Option<MetricsPart> {
    let sct = non_negative(document.get("sct")?)?;
    let cases = whole(document.get("cases")?)? as f64;
    let sample_cases = match document.get("sample_cases") {
        Some(Bson::Array(items)) => items.clone(),
        None | Some(Bson::Null) => Vec::new(),
        Some(other) => panic!("the model does not handle sample_cases {other}"),
    };
    let metadata = match document.get("metadata") {
        Some(Bson::Document(metadata)) => metadata.clone(),
        None | Some(Bson::Null) => Document::new(),
        Some(other) => panic!("the model does not handle metadata {other}"),
    };
    Some(MetricsPart {
        staging_id: staging_id.clone(),
        sct,
        cases,
        sample_cases,
        metadata,
    })
}

/// Returns the survey part and the satisfaction the document gives, if any.
fn survey_of(document: &Document, staging_id: &Bson) -> Option<(SurveyPart, Option<f64>)> {
    let csat = whole(document.get("csat")?);
    let neutral = whole(document.get("neutral")?);
    let dsat = whole(document.get("dsat")?);
    let given = match document.get("satisfaction") {
        None | Some(Bson::Null) => None,
        Some(value) => Some(non_negative(value).filter(|percent| *percent <= 100.0)?),
    };
    let percentages = match document.get("percentages") {
        None | Some(Bson::Null) => None,
        Some(Bson::Document(given)) => Some(
            ["csat", "neutral", "dsat"].map(|name| non_negative(given.get(name).unwrap()).unwrap()),
        ),
        Some(other) => panic!("the model does not handle percentages {other}"),
    };
    let details = match document.get("survey_details") {
        Some(Bson::Array(items)) => items.clone(),
        None | Some(Bson::Null) => Vec::new(),
        Some(other) => panic!("the model does not handle survey_details {other}"),
    };
    let part = SurveyPart {
        staging_id: staging_id.clone(),
        answers: [csat?, neutral?, dsat?],
        percentages,
        details,
    };
    Some((part, given))
}

/// Returns a finite number >= 0, or `None` for a negative number or text.
fn non_negative(value: &Bson) -> Option<f64> {
    let number = match value {
        Bson::Int32(number) => f64::from(*number),
        Bson::Int64(number) => *number as f64,
        Bson::Double(number) => *number,
        Bson::String(_) => return None,
        other => panic!("the model does not handle the number {other}"),
    };
    (number.is_finite() && number >= 0.0).then_some(number)
}

/// Returns a whole number >= 0, or `None`.
fn whole(value: &Bson) -> Option<u64> {
    let number = non_negative(value)?;
    (number.fract() == 0.0).then_some(number as u64)
}

/// Reads the owned fields of a stored target document.
fn stored_target(document: &Document) -> Target {
    let number = |path: &str| -> f64 {
        match lookup(document, path) {
            Some(Bson::Int32(value)) => f64::from(*value),
            Some(Bson::Int64(value)) => *value as f64,
            Some(Bson::Double(value)) => *value,
            other => panic!("{path} is {other:?}, not a number, in {document}"),
        }
    };
    let array = |path: &str| -> Vec<Bson> {
        match lookup(document, path) {
            Some(Bson::Array(items)) => items.clone(),
            other => panic!("{path} is {other:?}, not an array, in {document}"),
        }
    };
    let staging_id =
        |source: &str| lookup(document, &format!("sources.{source}.staging_id")).cloned();
    Target {
        sct: number("metrics.sct"),
        cases: number("metrics.cases"),
        cases_count: number("cases_count"),
        sample_cases: array("sample_cases"),
        metadata: document
            .get_document("metadata")
            .cloned()
            .unwrap_or_else(|_| panic!("metadata is not a document in {document}")),
        satisfaction: number("metrics.satisfaction"),
        answers: ["csat", "neutral", "dsat"]
            .map(|name| number(&format!("metrics.customerSatisfaction.{name}"))),
        responses: number("survey.responses"),
        percentages: ["csat", "neutral", "dsat"]
            .map(|name| number(&format!("survey.percentages.{name}"))),
        details: array("survey.details"),
        metrics_staging_id: staging_id("metrics"),
        surveys_staging_id: staging_id("surveys"),
    }
}

fn lookup<'a>(document: &'a Document, path: &str) -> Option<&'a Bson> {
    let mut parts = path.split('.');
    let mut value = document.get(parts.next()?)?;
    for part in parts {
        value = value.as_document()?.get(part)?;
    }
    Some(value)
}

/// Reads every staging document of `collections` in insertion order (`seq`).
pub async fn read_staging(
    db: &Database,
    collections: &[(&str, Kind)],
) -> Vec<(String, Kind, Document)> {
    let mut staged = Vec::new();
    for (name, kind) in collections {
        let cursor = db.collection::<Document>(name).find(doc! {}).await.unwrap();
        let documents: Vec<Document> = cursor.try_collect().await.unwrap();
        staged.extend(
            documents
                .into_iter()
                .map(|document| (name.to_string(), *kind, document)),
        );
    }
    staged.sort_by_key(|(_, _, document)| {
        document
            .get_i64("seq")
            .expect("a generated document has seq")
    });
    staged
}

/// The default staging collections.
pub const STAGING: [(&str, Kind); 2] = [
    (super::load::METRICS, Kind::Metrics),
    (super::load::SURVEYS, Kind::Surveys),
];

/// What [`assert_matches`] compared.
#[derive(Debug, Clone, Copy)]
pub struct Compared {
    pub documents: usize,
    pub targets: usize,
    pub rejects: usize,
}

/// Asserts that `performance_data` and `staging_rejects` in `db` hold exactly what the
/// model computes from `expected`: every target with equal owned fields and no other, no
/// key twice, and one reject per invalid staging document holding that document.
pub async fn assert_matches(db: &Database, expected: &Expected) -> Compared {
    let targets: Vec<Document> = db
        .collection::<Document>("performance_data")
        .find(doc! {})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let mut seen: BTreeSet<Key> = BTreeSet::new();
    let mut mismatches = Vec::new();
    for document in &targets {
        let key: Key = (
            document.get_str("entity_name").unwrap().to_string(),
            document.get_str("entity_type").unwrap().to_string(),
            document.get_str("date").unwrap().to_string(),
        );
        assert!(seen.insert(key.clone()), "target key {key:?} exists twice");
        match expected.targets.get(&key) {
            None => mismatches.push(format!("{key:?}: not in the model: {document}")),
            Some(want) => {
                let have = stored_target(document);
                if !same_target(&have, want) {
                    mismatches.push(format!("{key:?}:\n  stored {have:?}\n  model  {want:?}"));
                }
            }
        }
    }
    for key in expected.targets.keys() {
        if !seen.contains(key) {
            mismatches.push(format!("{key:?}: missing from performance_data"));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} targets differ from the model; first ones:\n{}",
        mismatches.len(),
        expected.targets.len(),
        mismatches
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );

    let rejects: Vec<Document> = db
        .collection::<Document>("staging_rejects")
        .find(doc! {})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let mut rejected = BTreeSet::new();
    for reject in &rejects {
        let id = (
            reject.get_str("source").unwrap().to_string(),
            reject.get("staging_id").unwrap().to_string(),
        );
        assert!(
            rejected.insert(id.clone()),
            "staging document {id:?} is rejected twice"
        );
        let want = expected
            .rejects
            .get(&id)
            .unwrap_or_else(|| panic!("{id:?} is rejected but valid in the model: {reject}"));
        assert_eq!(
            reject.get_document("document").ok(),
            Some(want),
            "reject {id:?}"
        );
        assert!(
            !reject.get_array("reasons").unwrap().is_empty(),
            "reject {id:?} has no reason"
        );
    }
    assert_eq!(
        rejects.len(),
        expected.rejects.len(),
        "rejects: {} stored, {} invalid documents in the model",
        rejects.len(),
        expected.rejects.len()
    );
    Compared {
        documents: expected.documents,
        targets: targets.len(),
        rejects: rejects.len(),
    }
}

fn same_target(have: &Target, want: &Target) -> bool {
    let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
    close(have.sct, want.sct)
        && close(have.cases, want.cases)
        && close(have.cases_count, want.cases_count)
        && have.sample_cases == want.sample_cases
        && have.metadata == want.metadata
        && close(have.satisfaction, want.satisfaction)
        && (0..3).all(|index| close(have.answers[index], want.answers[index]))
        && close(have.responses, want.responses)
        && (0..3).all(|index| close(have.percentages[index], want.percentages[index]))
        && have.details == want.details
        && have.metrics_staging_id == want.metrics_staging_id
        && have.surveys_staging_id == want.surveys_staging_id
}

/// Reads the running totals of the state document: `(events, merged, rejected)`.
pub async fn committed_totals(db: &Database) -> (i64, i64, i64) {
    let totals = support::committed_totals(db).await;
    (totals.events, totals.merged, totals.rejected)
}

/// Waits until the state document counts `events` committed change events.
pub async fn wait_committed(db: &Database, events: usize, timeout: Duration) {
    support::wait_committed(db, events as i64, timeout).await;
}

/// Asserts that the state document counts each staging insert of `expected` exactly once:
/// a change event committed twice would raise these counts, a lost one would lower them.
pub async fn assert_committed_once(db: &Database, expected: &Expected) {
    // A batch committed a second time would need a moment to show up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (events, merged, rejected) = committed_totals(db).await;
    assert_eq!(events, expected.documents as i64, "committed change events");
    assert_eq!(merged, expected.valid() as i64, "committed merges");
    assert_eq!(rejected, expected.rejects.len() as i64, "committed rejects");
}

/// Asserts that no two target documents share a key, by asking the server.
pub async fn assert_no_duplicate_keys(db: &Database) {
    let duplicates: Vec<Document> = db
        .collection::<Document>("performance_data")
        .aggregate([
            doc! { "$group": {
                "_id": { "n": "$entity_name", "t": "$entity_type", "d": "$date" },
                "count": { "$sum": 1 },
            } },
            doc! { "$match": { "count": { "$gt": 1 } } },
        ])
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert!(
        duplicates.is_empty(),
        "duplicate target keys: {duplicates:?}"
    );
}

/// Replays one metrics and one survey document into the documented seed example.
#[test]
fn model_seed_example_merges() {
    let metrics = doc! { "_id": 1, "entity_name": "John  Doe", "entity_type": "DPE", "date": "2025-09-25", "sct": 2.5, "cases": 15 };
    let survey = doc! { "_id": 2, "entity_name": "John Doe", "entity_type": "dpe", "date": "2025-09-25", "csat": 13, "neutral": 2, "dsat": 0 };
    let empty = doc! { "_id": 3, "entity_name": "John Doe", "entity_type": "dpe", "date": "2025-09-25", "csat": 0, "neutral": 0, "dsat": 0 };
    let invalid = doc! { "_id": 4, "entity_name": "John Doe", "entity_type": "dpe", "date": "2025-09-25", "sct": 1, "cases": 1.5 };
    let expected = replay(&[
        ("m".into(), Kind::Metrics, metrics),
        ("s".into(), Kind::Surveys, survey),
        ("s".into(), Kind::Surveys, empty),
        ("m".into(), Kind::Metrics, invalid),
    ]);
    let key = (
        "John Doe".to_string(),
        "dpe".to_string(),
        "2025-09-25".to_string(),
    );
    let target = &expected.targets[&key];
    assert_eq!(target.sct, 2.5);
    assert_eq!(target.cases_count, 15.0);
    assert_eq!(
        target.satisfaction, 87.0,
        "zero responses keep the previous value"
    );
    assert_eq!(target.answers, [0.0; 3]);
    assert_eq!(target.percentages, [0.0; 3]);
    assert_eq!(expected.rejects.len(), 1);
    assert_eq!(whole_percent_half_up(1, 8), 13.0);
    assert_eq!(two_decimal_percent_half_up(13, 15), 86.67);
    assert_eq!(two_decimal_percent_half_up(1, 8), 12.5);
}
