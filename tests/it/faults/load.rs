//! Staging load for the fault tests: a seeded generator of valid and invalid staging
//! documents for both sources, and writers that insert them in generation order.
//!
//! Every generated document carries `seq`, its position in the generation order, which is
//! also the order in which the writers insert it. The reference model sorts by `seq`, so it
//! replays the documents in the order in which the change stream delivers them. perfagg
//! ignores fields that it does not map, so `seq` changes nothing merged.

use std::time::Duration;

use chrono::{Duration as Days, NaiveDate, NaiveTime};
use futures::TryStreamExt;
use mongodb::bson::oid::ObjectId;
use mongodb::bson::{doc, Bson, DateTime, Document};
use mongodb::options::{ReadConcern, WriteConcern};
use mongodb::{Collection, Database};

/// Staging collection of the "Calculate Metrics" workflow, as configured by default.
pub const METRICS: &str = "staging_metrics";
/// Staging collection of the "Process Survey" workflow, as configured by default.
pub const SURVEYS: &str = "staging_surveys";

/// SplitMix64: a tiny deterministic generator, so a failing run can be repeated from the
/// seed in its summary line.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut mixed = self.0;
        mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        mixed ^ (mixed >> 31)
    }

    /// Returns a number in `0..bound`.
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }

    /// Returns true with a chance of `percent` in 100.
    pub fn percent(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// Returns a duration in `min..=max`, in whole milliseconds.
    pub fn millis(&mut self, min: u64, max: u64) -> Duration {
        Duration::from_millis(min + self.below(max - min + 1))
    }
}

/// Returns the seed for a test's random choices: `PERFAGG_TEST_SEED` when set, else the clock.
pub fn seed() -> u64 {
    if let Ok(text) = std::env::var("PERFAGG_TEST_SEED") {
        return text
            .parse()
            .unwrap_or_else(|_| panic!("PERFAGG_TEST_SEED={text} is not a whole number"));
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    now.as_nanos() as u64
}

/// The shape of a generated load.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    pub documents: usize,
    /// Distinct entities; each has a fixed entity type.
    pub entities: u64,
    /// Distinct days per entity.
    pub days: u64,
    /// Share of invalid documents, in percent.
    pub invalid_percent: u64,
}

/// Maximum run of consecutive documents of one source.
const MAX_RUN: u64 = 60;

/// One generated staging document and the collection it goes to.
#[derive(Debug, Clone)]
pub struct Staged {
    pub collection: &'static str,
    pub document: Document,
}

/// Generates `spec.documents` staging documents for both sources in insertion order. Each
/// has a client-made ObjectId `_id`, as n8n's documents do, so a writer can retry an insert
/// without creating a second copy.
pub fn generate(spec: Spec, rng: &mut Rng) -> Vec<Staged> {
    // Days in the recent past: perfagg rejects days more than one day in the future.
    let first_day = chrono::Utc::now().date_naive() - Days::days(spec.days as i64 + 30);
    // Workflows insert in bursts: runs of one source, each one `insertMany` of n8n.
    let mut is_metrics = false;
    let mut run_left = 0;
    (0..spec.documents)
        .map(|seq| {
            if run_left == 0 {
                is_metrics = rng.percent(50);
                run_left = 1 + rng.below(MAX_RUN);
            }
            run_left -= 1;
            let entity = rng.below(spec.entities);
            let day = first_day + Days::days(rng.below(spec.days) as i64);
            let mut document = doc! { "_id": ObjectId::new(), "seq": seq as i64 };
            document.extend(key_fields(entity, day, rng));
            let collection = if is_metrics {
                document.extend(metrics_fields(rng));
                METRICS
            } else {
                document.extend(survey_fields(rng));
                SURVEYS
            };
            if rng.percent(spec.invalid_percent) {
                corrupt(&mut document, is_metrics, rng);
            }
            Staged {
                collection,
                document,
            }
        })
        .collect()
}

/// Returns the key fields, spelled the ways n8n and people spell them: extra white space in the
/// name, upper-case types, and days as text or as a BSON date at UTC midnight.
fn key_fields(entity: u64, day: NaiveDate, rng: &mut Rng) -> Document {
    let name = if rng.percent(10) {
        format!("  Agent   {entity:03} ")
    } else {
        format!("Agent {entity:03}")
    };
    let entity_type = match (entity % 3, rng.percent(20)) {
        (0, false) => "team",
        (0, true) => "TEAM",
        (_, false) => "dpe",
        (_, true) => "DPE",
    };
    let date = if rng.percent(15) {
        let midnight = day.and_time(NaiveTime::MIN).and_utc();
        Bson::DateTime(DateTime::from_millis(midnight.timestamp_millis()))
    } else {
        Bson::String(day.format("%Y-%m-%d").to_string())
    };
    doc! { "entity_name": name, "entity_type": entity_type, "date": date }
}

fn metrics_fields(rng: &mut Rng) -> Document {
    let sct = if rng.percent(30) {
        Bson::Int32(rng.below(20) as i32)
    } else {
        Bson::Double(rng.below(1_000) as f64 / 10.0)
    };
    let cases = rng.below(60) as i32;
    let samples: Vec<Bson> = (0..rng.below(4))
        .map(|index| Bson::String(format!("CASE-{}", rng.below(100_000) + index)))
        .collect();
    let mut fields = doc! { "sct": sct, "cases": cases, "sample_cases": samples };
    if rng.percent(10) {
        fields.insert("metadata", Bson::Null);
    } else {
        fields.insert(
            "metadata",
            doc! { "workflow": "Calculate Metrics", "run": rng.below(1_000) as i64 },
        );
    }
    fields
}

fn survey_fields(rng: &mut Rng) -> Document {
    let (csat, neutral, dsat) = if rng.percent(8) {
        (0, 0, 0)
    } else {
        (rng.below(20), rng.below(6), rng.below(4))
    };
    let details: Vec<Bson> = (0..rng.below(3))
        .map(|_| Bson::Document(doc! { "case": format!("CASE-{}", rng.below(100_000)), "rating": rng.below(5) as i32 + 1 }))
        .collect();
    let mut fields = doc! {
        "csat": csat as i32, "neutral": neutral as i32, "dsat": dsat as i32,
        "survey_details": details,
    };
    if rng.percent(10) {
        let given = rng.below(201) as f64 / 2.0;
        fields.insert("satisfaction", given);
    }
    if rng.percent(5) {
        fields.insert(
            "percentages",
            doc! { "csat": 50.5, "neutral": 25.25, "dsat": 24.25 },
        );
    }
    fields
}

/// Makes `document` invalid in one of the ways a workflow can get a value wrong.
fn corrupt(document: &mut Document, is_metrics: bool, rng: &mut Rng) {
    match (is_metrics, rng.below(4)) {
        (_, 0) => document.insert("entity_name", Bson::Null),
        (_, 1) => document.insert("date", "13/05/2024"),
        (true, 2) => document.insert("cases", 15.5),
        (true, _) => document.insert("sct", "abc"),
        (false, 2) => document.insert("csat", -1),
        (false, _) => document.insert("dsat", 2.5),
    };
}

/// Inserts `staged` in order: runs of consecutive documents of one collection go in one
/// `insertMany` of at most `max_chunk` documents, with `pause` after each.
pub async fn insert_in_order(db: &Database, staged: &[Staged], max_chunk: usize, pause: Duration) {
    for chunk in chunks(staged, max_chunk) {
        let collection = db.collection::<Document>(chunk[0].collection);
        let documents = chunk.iter().map(|staged| staged.document.clone());
        collection.insert_many(documents).await.unwrap();
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
}

/// Like [`insert_in_order`], but keeps going while the primary steps down or dies: after a
/// failed insert it waits, looks up which documents of the chunk are majority-committed,
/// and inserts the others, still in order. Returns the number of failed inserts.
pub async fn insert_through_failover(
    db: &Database,
    staged: &[Staged],
    max_chunk: usize,
    pause: Duration,
) -> usize {
    const MAX_FAILURES: usize = 1_000;
    let mut failures = 0;
    for chunk in chunks(staged, max_chunk) {
        let collection = db.collection::<Document>(chunk[0].collection);
        let mut pending: Vec<Document> =
            chunk.iter().map(|staged| staged.document.clone()).collect();
        while !pending.is_empty() {
            let result = collection
                .insert_many(pending.clone())
                .write_concern(WriteConcern::majority())
                .await;
            if result.is_ok() {
                break;
            }
            failures += 1;
            assert!(failures < MAX_FAILURES, "inserts keep failing: {result:?}");
            tokio::time::sleep(Duration::from_millis(250)).await;
            let Some(committed) = committed_ids(&collection, &pending).await else {
                continue;
            };
            // An ordered insert applies a prefix of its documents, so the committed ones
            // must be a prefix too. Inserting a gap later would change the order.
            let prefix = pending
                .iter()
                .take_while(|document| committed.contains(document.get("_id").unwrap()))
                .count();
            assert_eq!(
                prefix,
                committed.len(),
                "the committed documents of a failed insert are not a prefix of it"
            );
            pending.drain(..prefix);
        }
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
    failures
}

/// Returns the `_id`s among `documents` that are majority-committed in `collection`, or
/// `None` when the lookup fails.
async fn committed_ids(
    collection: &Collection<Document>,
    documents: &[Document],
) -> Option<Vec<Bson>> {
    let ids: Vec<Bson> = documents
        .iter()
        .map(|document| document.get("_id").unwrap().clone())
        .collect();
    let cursor = collection
        .find(doc! { "_id": { "$in": ids } })
        .projection(doc! { "_id": 1 })
        .read_concern(ReadConcern::majority())
        .await
        .ok()?;
    let found: Vec<Document> = cursor.try_collect().await.ok()?;
    Some(
        found
            .into_iter()
            .filter_map(|document| document.get("_id").cloned())
            .collect(),
    )
}

/// Splits `staged` into runs of one collection of at most `max_chunk` documents.
fn chunks(staged: &[Staged], max_chunk: usize) -> Vec<&[Staged]> {
    let mut chunks = Vec::new();
    let mut start = 0;
    while start < staged.len() {
        let mut end = start + 1;
        while end < staged.len()
            && end - start < max_chunk
            && staged[end].collection == staged[start].collection
        {
            end += 1;
        }
        chunks.push(&staged[start..end]);
        start = end;
    }
    chunks
}
