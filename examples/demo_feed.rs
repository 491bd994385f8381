//! Sample producer for `scripts/demo`: writes staging documents the way n8n's MongoDB node
//! does, waits until a running perfagg daemon has merged them into `performance_data`, and
//! prints the merged target documents and the rejects as relaxed extended JSON.
//!
//! It inserts into `staging_metrics` and `staging_surveys` at the same time, one
//! `insertMany` per collection as one n8n execution would, plus one invalid metrics
//! document that perfagg must reject. Every run uses new `_id`s and waits for targets whose
//! `sources` name exactly those ids, so running the demo again proves the merge again.
//! The collection names are perfagg's defaults.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use mongodb::bson::oid::ObjectId;
use mongodb::bson::{doc, Bson, Document};
use mongodb::{Client, Collection, Database};

const METRICS_COLLECTION: &str = "staging_metrics";
const SURVEYS_COLLECTION: &str = "staging_surveys";
const TARGET_COLLECTION: &str = "performance_data";
const REJECTS_COLLECTION: &str = "staging_rejects";

/// Pause between two reads of the target and rejects collections.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

#[derive(Parser)]
#[command(about = "Insert sample staging documents and print what perfagg merged")]
struct Cli {
    /// Connection string of the replica set that perfagg watches.
    #[arg(
        long,
        env = "PERFAGG_MONGODB_URI",
        default_value = "mongodb://127.0.0.1:27017/?replicaSet=rs0"
    )]
    uri: String,
    /// Database with the staging, target and rejects collections.
    #[arg(long, env = "PERFAGG_DATABASE", default_value = "performance")]
    database: String,
    /// How long to wait for perfagg to merge and reject everything, in seconds.
    #[arg(long, default_value_t = 60)]
    timeout_secs: u64,
}

/// One target document the demo expects, identified by its key and the staging documents
/// that must have been merged into it.
struct Expected {
    entity_name: &'static str,
    entity_type: &'static str,
    date: &'static str,
    metrics_id: Option<ObjectId>,
    survey_id: Option<ObjectId>,
}

impl Expected {
    fn filter(&self) -> Document {
        let mut filter = doc! {
            "entity_name": self.entity_name,
            "entity_type": self.entity_type,
            "date": self.date,
        };
        if let Some(id) = self.metrics_id {
            filter.insert("sources.metrics.staging_id", id);
        }
        if let Some(id) = self.survey_id {
            filter.insert("sources.surveys.staging_id", id);
        }
        filter
    }

    fn describe(&self) -> String {
        format!("{}/{}/{}", self.entity_name, self.entity_type, self.date)
    }
}

/// The staging documents of one demo run.
struct Feed {
    metrics: Vec<Document>,
    surveys: Vec<Document>,
    invalid_metrics: Document,
    invalid_metrics_id: ObjectId,
    expected: Vec<Expected>,
}

/// Builds a metrics document with the fields, order and number types n8n stores: whole
/// numbers as int32, others as double, `date` as a `YYYY-MM-DD` string.
fn metrics_document(
    id: ObjectId,
    entity: (&str, &str),
    date: &str,
    sct: Bson,
    cases: i32,
    sample_cases: Vec<Document>,
) -> Document {
    doc! {
        "_id": id,
        "entity_name": entity.0,
        "entity_type": entity.1,
        "date": date,
        "sct": sct,
        "cases": cases,
        "sample_cases": sample_cases,
        "metadata": {
            "workflow": "Calculate Metrics",
            "source": "demo_feed",
            "generated_at": "2025-09-25T23:05:00Z",
        },
    }
}

fn survey_document(
    id: ObjectId,
    entity: (&str, &str),
    date: &str,
    counts: [i32; 3],
    details: Vec<Document>,
) -> Document {
    doc! {
        "_id": id,
        "entity_name": entity.0,
        "entity_type": entity.1,
        "date": date,
        "csat": counts[0],
        "neutral": counts[1],
        "dsat": counts[2],
        "survey_details": details,
    }
}

fn sample_case(number: &str, sct: f64, status: &str) -> Document {
    doc! { "case_number": number, "sct": sct, "status": status }
}

fn survey_answer(number: &str, rating: &str, comment: &str) -> Document {
    doc! { "case_number": number, "rating": rating, "comment": comment }
}

fn build_feed() -> Feed {
    const DAY: &str = "2025-09-25";
    const NEXT_DAY: &str = "2025-09-26";
    let john = ("John Doe", "dpe");
    let maria = ("Maria Garcia", "dpe");
    let team = ("Support North", "team");
    let wei = ("Wei Chen", "dpe");
    let ids: Vec<ObjectId> = (0..7).map(|_| ObjectId::new()).collect();

    let metrics = vec![
        metrics_document(
            ids[0],
            john,
            DAY,
            Bson::Double(2.5),
            15,
            vec![
                sample_case("00481516", 1.5, "closed"),
                sample_case("00481523", 3.25, "closed"),
            ],
        ),
        metrics_document(
            ids[1],
            maria,
            DAY,
            Bson::Int32(3),
            9,
            vec![sample_case("00481530", 3.0, "closed")],
        ),
        metrics_document(ids[2], team, DAY, Bson::Double(4.25), 42, Vec::new()),
        metrics_document(
            ids[3],
            wei,
            NEXT_DAY,
            Bson::Double(1.75),
            4,
            vec![sample_case("00481602", 1.75, "closed")],
        ),
    ];
    let surveys = vec![
        survey_document(
            ids[4],
            john,
            DAY,
            [13, 2, 0],
            vec![
                survey_answer("00481516", "csat", "Solved on the first call."),
                survey_answer("00481523", "neutral", "Took a while."),
            ],
        ),
        survey_document(
            ids[5],
            maria,
            DAY,
            [6, 1, 2],
            vec![survey_answer("00481530", "dsat", "Had to reopen the case.")],
        ),
        survey_document(ids[6], team, DAY, [30, 5, 3], Vec::new()),
    ];

    // Negative case counts and a non-numeric solution time are both invalid.
    let invalid_metrics_id = ObjectId::new();
    let invalid_metrics = doc! {
        "_id": invalid_metrics_id,
        "entity_name": "Ana Silva",
        "entity_type": "dpe",
        "date": DAY,
        "sct": "fast",
        "cases": -3,
        "sample_cases": [],
        "metadata": {},
    };

    let expected = vec![
        expected(john, DAY, Some(ids[0]), Some(ids[4])),
        expected(maria, DAY, Some(ids[1]), Some(ids[5])),
        expected(team, DAY, Some(ids[2]), Some(ids[6])),
        // No survey for Wei Chen: the target gets the default satisfaction.
        expected(wei, NEXT_DAY, Some(ids[3]), None),
    ];
    Feed {
        metrics,
        surveys,
        invalid_metrics,
        invalid_metrics_id,
        expected,
    }
}

fn expected(
    entity: (&'static str, &'static str),
    date: &'static str,
    metrics_id: Option<ObjectId>,
    survey_id: Option<ObjectId>,
) -> Expected {
    Expected {
        entity_name: entity.0,
        entity_type: entity.1,
        date,
        metrics_id,
        survey_id,
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("demo_feed: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: &Cli) -> Result<(), String> {
    let client = Client::with_uri_str(&cli.uri)
        .await
        .map_err(|error| format!("invalid connection string {}: {error}", cli.uri))?;
    let db = client.database(&cli.database);
    let feed = build_feed();

    insert_feed(&db, &feed).await?;

    let timeout = Duration::from_secs(cli.timeout_secs);
    let targets = wait_for_targets(&db, &feed.expected, timeout).await?;
    println!(
        "{TARGET_COLLECTION}: {} merged target documents",
        targets.len()
    );
    for target in targets {
        println!("{}", to_relaxed_json(target));
    }

    let reject = wait_for_reject(&db, feed.invalid_metrics_id, timeout).await?;
    println!("{REJECTS_COLLECTION}: the invalid metrics document was rejected");
    println!("{}", to_relaxed_json(reject));
    Ok(())
}

/// Inserts the metrics and the surveys concurrently, each batch with one `insertMany`.
async fn insert_feed(db: &Database, feed: &Feed) -> Result<(), String> {
    let metrics: Collection<Document> = db.collection(METRICS_COLLECTION);
    let surveys: Collection<Document> = db.collection(SURVEYS_COLLECTION);

    let (metrics_result, surveys_result, invalid_result) = tokio::join!(
        metrics.insert_many(&feed.metrics),
        surveys.insert_many(&feed.surveys),
        metrics.insert_one(&feed.invalid_metrics),
    );
    metrics_result.map_err(|error| format!("insert into {METRICS_COLLECTION} failed: {error}"))?;
    surveys_result.map_err(|error| format!("insert into {SURVEYS_COLLECTION} failed: {error}"))?;
    invalid_result.map_err(|error| format!("insert into {METRICS_COLLECTION} failed: {error}"))?;

    eprintln!(
        "demo_feed: inserted {} documents into {METRICS_COLLECTION} (one invalid) and {} into \
         {SURVEYS_COLLECTION}",
        feed.metrics.len() + 1,
        feed.surveys.len()
    );
    Ok(())
}

/// Polls `performance_data` until every expected target names this run's staging
/// documents in its `sources`, and returns the targets in the order of `expected`.
async fn wait_for_targets(
    db: &Database,
    expected: &[Expected],
    timeout: Duration,
) -> Result<Vec<Document>, String> {
    let targets: Collection<Document> = db.collection(TARGET_COLLECTION);
    let deadline = Instant::now() + timeout;
    loop {
        let mut found = Vec::with_capacity(expected.len());
        let mut missing = Vec::new();
        for target in expected {
            match targets.find_one(target.filter()).await {
                Ok(Some(document)) => found.push(document),
                Ok(None) => missing.push(target.describe()),
                Err(error) => return Err(format!("reading {TARGET_COLLECTION} failed: {error}")),
            }
        }
        if missing.is_empty() {
            return Ok(found);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "perfagg did not merge {} within {timeout:?}; is `perfagg run` running \
                 against this database? Check its log",
                missing.join(", ")
            ));
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Polls `staging_rejects` until it contains the reject of the staging document `staging_id`.
async fn wait_for_reject(
    db: &Database,
    staging_id: ObjectId,
    timeout: Duration,
) -> Result<Document, String> {
    let rejects: Collection<Document> = db.collection(REJECTS_COLLECTION);
    let filter = doc! { "source": METRICS_COLLECTION, "staging_id": staging_id };
    let deadline = Instant::now() + timeout;
    loop {
        match rejects.find_one(filter.clone()).await {
            Ok(Some(reject)) => return Ok(reject),
            Ok(None) => {}
            Err(error) => return Err(format!("reading {REJECTS_COLLECTION} failed: {error}")),
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "perfagg did not reject staging document {staging_id} within {timeout:?}"
            ));
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

fn to_relaxed_json(document: Document) -> String {
    let value = Bson::Document(document).into_relaxed_extjson();
    serde_json::to_string_pretty(&value).unwrap_or_else(|error| format!("(cannot render: {error})"))
}
