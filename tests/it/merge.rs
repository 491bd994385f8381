//! End-to-end merge tests: the real `perfagg` binary against the shared replica set, with
//! staging documents inserted the way n8n's MongoDB node inserts them.

use std::time::Duration;

use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, DateTime, Decimal128, Document};
use mongodb::{Collection, Database};

use crate::support::{shared_replica_set, unique_database, wait_committed, wait_for, Daemon};

const READY_TIMEOUT: Duration = Duration::from_secs(60);
const MERGE_TIMEOUT: Duration = Duration::from_secs(30);

/// A daemon on its own database of the shared replica set, with handles to the collections.
struct Fixture {
    daemon: Daemon,
    db: Database,
}

impl Fixture {
    async fn start(name: &str, config: &str) -> Fixture {
        let set = shared_replica_set();
        let database = unique_database(name);
        let mut daemon = Daemon::builder(set.uri(), &database).config(config).spawn();
        daemon.wait_ready(READY_TIMEOUT).await;
        let db = set.client().await.database(&database);
        Fixture { daemon, db }
    }

    fn metrics(&self) -> Collection<Document> {
        self.db.collection("staging_metrics")
    }

    fn surveys(&self) -> Collection<Document> {
        self.db.collection("staging_surveys")
    }

    fn target(&self) -> Collection<Document> {
        self.db.collection("performance_data")
    }

    fn rejects(&self) -> Collection<Document> {
        self.db.collection("staging_rejects")
    }

    /// Waits until the target document for the key satisfies `accept`, and returns it.
    async fn target_where(
        &self,
        name: &str,
        date: &str,
        accept: impl Fn(&Document) -> bool,
    ) -> Document {
        let target = self.target();
        let filter = doc! { "entity_name": name, "date": date };
        wait_for(
            MERGE_TIMEOUT,
            &format!("target {name}/{date} matches"),
            || {
                let target = target.clone();
                let filter = filter.clone();
                let accept = &accept;
                async move {
                    let found = target.find_one(filter).await.unwrap()?;
                    accept(&found).then_some(found)
                }
            },
        )
        .await
    }

    /// Waits until the state document has committed `events` change events in total.
    async fn wait_events(&self, events: i64) {
        wait_committed(&self.db, events, MERGE_TIMEOUT).await;
    }

    async fn all_targets(&self) -> Vec<Document> {
        let cursor = self
            .target()
            .find(doc! {})
            .sort(doc! { "entity_name": 1, "date": 1 })
            .await
            .unwrap();
        cursor.try_collect().await.unwrap()
    }
}

fn metrics_doc(name: &str, date: &str, sct: f64, cases: i32) -> Document {
    doc! {
        "entity_name": name, "entity_type": "dpe", "date": date,
        "sct": sct, "cases": cases, "sample_cases": ["C-1", "C-2"], "metadata": { "team": "blue" },
    }
}

fn survey_doc(name: &str, date: &str, csat: i32, neutral: i32, dsat: i32) -> Document {
    doc! {
        "entity_name": name, "entity_type": "dpe", "date": date,
        "csat": csat, "neutral": neutral, "dsat": dsat,
        "survey_details": [{ "case": "C-1", "rating": 5 }],
    }
}

fn metric(document: &Document, field: &str) -> Bson {
    document
        .get_document("metrics")
        .unwrap_or_else(|_| panic!("no metrics in {document}"))
        .get(field)
        .cloned()
        .unwrap_or(Bson::Null)
}

/// John Doe's example (metrics 2.5 / 15, survey 13 / 2 / 0) merges to the documented record
/// whichever source arrives first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_seed_example_both_orders() {
    let fixture = Fixture::start("merge_seed", "").await;
    fixture
        .metrics()
        .insert_one(metrics_doc("John Doe", "2025-09-25", 2.5, 15))
        .await
        .unwrap();
    fixture
        .surveys()
        .insert_one(survey_doc("John Doe", "2025-09-25", 13, 2, 0))
        .await
        .unwrap();
    fixture
        .surveys()
        .insert_one(survey_doc("Jane Roe", "2025-09-25", 13, 2, 0))
        .await
        .unwrap();
    fixture
        .metrics()
        .insert_one(metrics_doc("Jane Roe", "2025-09-25", 2.5, 15))
        .await
        .unwrap();
    fixture.wait_events(4).await;

    for name in ["John Doe", "Jane Roe"] {
        let merged = fixture.target_where(name, "2025-09-25", |_| true).await;
        assert_eq!(merged.get_str("entity_type").unwrap(), "dpe");
        assert_eq!(metric(&merged, "sct"), Bson::Double(2.5), "{merged}");
        assert_eq!(metric(&merged, "cases"), Bson::Int32(15), "{merged}");
        assert_eq!(metric(&merged, "satisfaction"), Bson::Int32(87), "{merged}");
        assert_eq!(
            metric(&merged, "customerSatisfaction"),
            Bson::Document(doc! { "csat": 13, "neutral": 2, "dsat": 0 }),
            "{merged}"
        );
        assert_eq!(merged.get_i32("cases_count").unwrap(), 15);
        assert_eq!(merged.get_array("sample_cases").unwrap().len(), 2);
        assert!(merged.get_datetime("created_at").is_ok(), "{merged}");
        assert!(merged.get_datetime("updated_at").is_ok(), "{merged}");
        let sources = merged.get_document("sources").unwrap();
        assert!(sources
            .get_document("metrics")
            .unwrap()
            .get_object_id("staging_id")
            .is_ok());
        assert!(sources
            .get_document("surveys")
            .unwrap()
            .get_timestamp("cluster_time")
            .is_ok());
    }
    assert_eq!(fixture.all_targets().await.len(), 2);
}

/// A survey-only and a metrics-only record get the other source's defaults.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_single_source_defaults() {
    let fixture = Fixture::start("merge_defaults", "[merge]\ndefault_satisfaction = 80\n").await;
    fixture
        .metrics()
        .insert_one(metrics_doc("Metrics Only", "2025-09-25", 3.0, 4))
        .await
        .unwrap();
    fixture
        .surveys()
        .insert_one(survey_doc("Survey Only", "2025-09-25", 1, 7, 0))
        .await
        .unwrap();

    let metrics_only = fixture
        .target_where("Metrics Only", "2025-09-25", |_| true)
        .await;
    assert_eq!(
        metric(&metrics_only, "satisfaction"),
        Bson::Int32(80),
        "{metrics_only}"
    );
    assert_eq!(
        metric(&metrics_only, "customerSatisfaction"),
        Bson::Document(doc! { "csat": 0, "neutral": 0, "dsat": 0 })
    );
    assert!(metrics_only
        .get_document("sources")
        .unwrap()
        .get("surveys")
        .is_none());

    let survey_only = fixture
        .target_where("Survey Only", "2025-09-25", |_| true)
        .await;
    assert_eq!(
        metric(&survey_only, "satisfaction"),
        Bson::Int32(13),
        "{survey_only}"
    );
    assert_eq!(metric(&survey_only, "sct"), Bson::Double(0.0));
    assert_eq!(metric(&survey_only, "cases"), Bson::Int32(0));
    assert_eq!(survey_only.get_i32("cases_count").unwrap(), 0);
    assert_eq!(survey_only.get_array("sample_cases").unwrap().len(), 0);
}

/// A second metrics document replaces the first one's values, and updates, replaces and
/// deletes of staging documents behave as documented.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_replaces_source_values() {
    let fixture = Fixture::start("merge_replace", "").await;
    fixture
        .metrics()
        .insert_one(metrics_doc("John Doe", "2025-09-25", 2.5, 15))
        .await
        .unwrap();
    fixture
        .surveys()
        .insert_one(survey_doc("John Doe", "2025-09-25", 13, 2, 0))
        .await
        .unwrap();
    let second = doc! { "entity_name": "John Doe", "entity_type": "dpe", "date": "2025-09-25", "sct": 1.5, "cases": 3 };
    let second_id = fixture
        .metrics()
        .insert_one(second)
        .await
        .unwrap()
        .inserted_id;
    fixture.wait_events(3).await;

    let merged = fixture
        .target_where("John Doe", "2025-09-25", |_| true)
        .await;
    assert_eq!(metric(&merged, "sct"), Bson::Double(1.5), "{merged}");
    assert_eq!(merged.get_i32("cases_count").unwrap(), 3);
    assert_eq!(
        merged.get_array("sample_cases").unwrap().len(),
        0,
        "{merged}"
    );
    assert_eq!(
        metric(&merged, "satisfaction"),
        Bson::Int32(87),
        "survey values stay"
    );

    // An update merges the staging document's new full version.
    fixture
        .metrics()
        .update_one(
            doc! { "_id": second_id.clone() },
            doc! { "$set": { "cases": 9 } },
        )
        .await
        .unwrap();
    let merged = fixture
        .target_where("John Doe", "2025-09-25", |found| {
            found.get_i32("cases_count") == Ok(9)
        })
        .await;
    assert_eq!(metric(&merged, "sct"), Bson::Double(1.5));

    // Deleting staging documents leaves merged data as it was.
    fixture.metrics().delete_many(doc! {}).await.unwrap();
    fixture.wait_events(5).await;
    let merged = fixture
        .target_where("John Doe", "2025-09-25", |_| true)
        .await;
    assert_eq!(merged.get_i32("cases_count").unwrap(), 9);
    assert_eq!(metric(&merged, "satisfaction"), Bson::Int32(87));
}

/// Every numeric type, numeric strings and the camelCase and upper-case aliases decode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_number_types_and_aliases() {
    let fixture = Fixture::start("merge_numbers", "").await;
    let documents = [
        (
            "Int32",
            doc! { "entity_name": "Int32", "entity_type": "dpe", "date": "2025-09-25", "sct": 3, "cases": 15 },
        ),
        (
            "Int64",
            doc! { "entity_name": "Int64", "entity_type": "dpe", "date": "2025-09-25", "sct": 3_i64, "cases": 15_i64 },
        ),
        (
            "Double",
            doc! { "entity_name": "Double", "entity_type": "dpe", "date": "2025-09-25", "sct": 3.0, "cases": 15.0 },
        ),
        (
            "Decimal",
            doc! {
                "entity_name": "Decimal", "entity_type": "dpe", "date": "2025-09-25",
                "sct": "3.0".parse::<Decimal128>().unwrap(), "cases": "15".parse::<Decimal128>().unwrap(),
            },
        ),
        (
            "Strings",
            doc! { "entity_name": "Strings", "entity_type": "dpe", "date": "2025-09-25", "sct": " 3 ", "cases": "15.0" },
        ),
        (
            "Camel",
            doc! { "entityName": "Camel", "entityType": "DPE", "date": "2025-09-25", "SCT": 3, "closedCases": 15, "sampleCases": ["x"] },
        ),
        (
            "Cases count",
            doc! { "entity_name": "Cases count", "entity_type": "dpe", "date": "2025-09-25", "sct": 3, "cases_count": 15 },
        ),
    ];
    for (_, document) in &documents {
        fixture
            .metrics()
            .insert_one(document.clone())
            .await
            .unwrap();
    }
    fixture
        .surveys()
        .insert_one(doc! { "entityName": "Camel", "entityType": "dpe", "date": "2025-09-25", "CSAT": "13", "Neutral": 2_i64, "DSAT": 0.0 })
        .await
        .unwrap();
    fixture.wait_events(documents.len() as i64 + 1).await;

    for (name, _) in &documents {
        let merged = fixture.target_where(name, "2025-09-25", |_| true).await;
        assert_eq!(
            metric(&merged, "sct"),
            Bson::Double(3.0),
            "{name}: {merged}"
        );
        assert_eq!(
            metric(&merged, "cases"),
            Bson::Int32(15),
            "{name}: {merged}"
        );
        assert_eq!(merged.get_str("entity_type").unwrap(), "dpe", "{name}");
    }
    let camel = fixture.target_where("Camel", "2025-09-25", |_| true).await;
    assert_eq!(metric(&camel, "satisfaction"), Bson::Int32(87), "{camel}");
    assert_eq!(camel.get_array("sample_cases").unwrap().len(), 1);
    assert_eq!(fixture.rejects().count_documents(doc! {}).await.unwrap(), 0);
}

/// Each accepted date form lands on the right day, including a timestamp that falls on
/// another day in a non-UTC zone and a BSON date at UTC midnight from n8n's Date Fields.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_date_forms_in_zone() {
    let fixture = Fixture::start("merge_dates", "[merge]\ntimezone = \"America/New_York\"\n").await;
    // 2025-09-26T02:00:00Z is 2025-09-25 22:00 in New York.
    let late_evening_utc = 1_758_852_000_000_i64;
    let cases: [(&str, Bson, &str); 7] = [
        ("Plain", Bson::String("2025-09-25".into()), "2025-09-25"),
        (
            "Rfc3339",
            Bson::String("2025-09-26T02:00:00Z".into()),
            "2025-09-25",
        ),
        (
            "Offset",
            Bson::String("2025-09-25T23:30:00+02:00".into()),
            "2025-09-25",
        ),
        (
            "Naive",
            Bson::String("2025-09-25 23:30".into()),
            "2025-09-25",
        ),
        (
            "Naive T",
            Bson::String("2025-09-25T23:30:00".into()),
            "2025-09-25",
        ),
        ("Epoch", Bson::Int64(late_evening_utc), "2025-09-25"),
        (
            "Midnight",
            Bson::DateTime(DateTime::from_millis(1_758_758_400_000)),
            "2025-09-25",
        ),
    ];
    for (name, date, _) in &cases {
        let document = doc! { "entity_name": *name, "entity_type": "dpe", "date": date.clone(), "sct": 1, "cases": 1 };
        fixture.metrics().insert_one(document).await.unwrap();
    }
    fixture.wait_events(cases.len() as i64).await;
    for (name, _, day) in &cases {
        let merged = fixture.target_where(name, day, |_| true).await;
        assert_eq!(merged.get_str("date").unwrap(), *day, "{name}");
    }
    assert_eq!(fixture.all_targets().await.len(), cases.len());
}

/// Invalid staging documents go to the rejects collection with their reasons while the
/// valid documents around them merge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_rejects_invalid_keeps_neighbours() {
    let fixture = Fixture::start("merge_rejects", "").await;
    let base = |name: &str| doc! { "entity_name": name, "entity_type": "dpe", "date": "2025-09-25", "sct": 2.5, "cases": 15 };
    let mut invalid: Vec<(Document, &str)> = Vec::new();
    let mut with = |name: &str, field: &str, value: Bson, reason: &'static str| {
        let mut document = base(name);
        document.insert(field, value);
        invalid.push((document, reason));
    };
    with(
        "Fraction",
        "cases",
        Bson::Double(15.5),
        "not a whole number",
    );
    with(
        "Tiny fraction",
        "cases",
        Bson::String("7.000000000000001".into()),
        "not a whole number",
    );
    with("Negative", "cases", Bson::Int32(-3), "is negative");
    with("Negative time", "sct", Bson::Double(-1.0), "is negative");
    with("NaN", "sct", Bson::Double(f64::NAN), "not a finite number");
    with(
        "Infinity",
        "sct",
        Bson::Double(f64::INFINITY),
        "not a finite number",
    );
    with("Text", "sct", Bson::String("abc".into()), "is not a number");
    with(
        "Comma",
        "sct",
        Bson::String("2,5".into()),
        "is not a number",
    );
    with("Null", "sct", Bson::Null, "`sct` is null");
    with(
        "Slash date",
        "date",
        Bson::String("13/05/2024".into()),
        "is not a date",
    );
    with(
        "Compact date",
        "date",
        Bson::Int32(20_240_513),
        "before merge.min_date",
    );
    with(
        "Epoch zero",
        "date",
        Bson::String("1970-01-01".into()),
        "before merge.min_date",
    );
    with(
        "Future",
        "date",
        Bson::String("2999-01-01".into()),
        "in the future",
    );
    with(
        "Nested NaN",
        "metadata",
        Bson::Document(doc! { "x": f64::NAN }),
        "not a finite number",
    );
    let mut no_date = base("No date");
    no_date.remove("date");
    invalid.push((no_date, "missing required field `date`"));

    let valid_before = fixture.metrics().insert_one(base("Before")).await.unwrap();
    let documents: Vec<Document> = invalid
        .iter()
        .map(|(document, _)| document.clone())
        .collect();
    let inserted = fixture.metrics().insert_many(documents).await.unwrap();
    fixture
        .surveys()
        .insert_one(doc! { "entity_name": "Bad survey", "entity_type": "dpe", "date": "2025-09-25", "csat": 1, "neutral": null, "dsat": 0, "satisfaction": 120 })
        .await
        .unwrap();
    fixture.metrics().insert_one(base("After")).await.unwrap();
    fixture.wait_events(invalid.len() as i64 + 3).await;

    fixture.target_where("Before", "2025-09-25", |_| true).await;
    fixture.target_where("After", "2025-09-25", |_| true).await;
    assert_eq!(
        fixture.all_targets().await.len(),
        2,
        "only the valid documents merge"
    );
    assert!(valid_before.inserted_id.as_object_id().is_some());

    for (index, (document, reason)) in invalid.iter().enumerate() {
        let id = inserted.inserted_ids[&index].clone();
        let reject = fixture
            .rejects()
            .find_one(doc! { "source": "staging_metrics", "staging_id": id })
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("no reject for {document}"));
        let reasons: Vec<&str> = reject
            .get_array("reasons")
            .unwrap()
            .iter()
            .filter_map(Bson::as_str)
            .collect();
        assert!(
            reasons.iter().any(|text| text.contains(reason)),
            "{document}: {reasons:?}"
        );
        assert_eq!(
            reject
                .get_document("document")
                .unwrap()
                .get_str("entity_name"),
            document.get_str("entity_name")
        );
        assert!(reject.get_timestamp("cluster_time").is_ok());
        assert!(reject.get_datetime("rejected_at").is_ok());
    }
    let survey_reject = fixture
        .rejects()
        .find_one(doc! { "source": "staging_surveys" })
        .await
        .unwrap()
        .unwrap();
    let reasons: Vec<&str> = survey_reject
        .get_array("reasons")
        .unwrap()
        .iter()
        .filter_map(Bson::as_str)
        .collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(reasons[0].contains("`neutral` is null"), "{reasons:?}");
    assert!(reasons[1].contains("outside 0..100"), "{reasons:?}");
    let logs = fixture.daemon.logs();
    assert!(
        logs.contains("Rejected a staging document."),
        "rejects are logged"
    );
}

/// Fields written by other writers survive merges, inside `metrics` and at the top level.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_preserves_other_writers_fields() {
    let fixture = Fixture::start("merge_foreign", "").await;
    fixture
        .metrics()
        .insert_one(metrics_doc("John Doe", "2025-09-25", 2.5, 15))
        .await
        .unwrap();
    fixture
        .target_where("John Doe", "2025-09-25", |_| true)
        .await;
    fixture
        .target()
        .update_one(
            doc! { "entity_name": "John Doe" },
            doc! { "$set": { "notes": "reviewed", "metrics.fcr": 0.9, "manager": { "name": "Ann" } } },
        )
        .await
        .unwrap();
    fixture
        .surveys()
        .insert_one(survey_doc("John Doe", "2025-09-25", 13, 2, 0))
        .await
        .unwrap();
    let merged = fixture
        .target_where("John Doe", "2025-09-25", |found| {
            metric(found, "satisfaction") == Bson::Int32(87)
        })
        .await;
    assert_eq!(merged.get_str("notes").unwrap(), "reviewed");
    assert_eq!(metric(&merged, "fcr"), Bson::Double(0.9));
    assert_eq!(
        merged
            .get_document("manager")
            .unwrap()
            .get_str("name")
            .unwrap(),
        "Ann"
    );
    assert_eq!(metric(&merged, "sct"), Bson::Double(2.5));
}

/// Changes of other collections in the same database never reach the merge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_ignores_other_collections() {
    let fixture = Fixture::start("merge_other_colls", "").await;
    let other: Collection<Document> = fixture.db.collection("unrelated");
    other
        .insert_one(metrics_doc("Ghost", "2025-09-25", 1.0, 1))
        .await
        .unwrap();
    fixture
        .metrics()
        .insert_one(metrics_doc("Real", "2025-09-25", 1.0, 1))
        .await
        .unwrap();
    fixture.target_where("Real", "2025-09-25", |_| true).await;
    fixture.wait_events(1).await;
    let targets = fixture.all_targets().await;
    assert_eq!(targets.len(), 1, "{targets:?}");
}

/// A rejected staging document that is corrected in place merges and loses its reject
/// record, so the rejects collection lists only documents that are still invalid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merge_fixed_document_clears_reject() {
    let fixture = Fixture::start("merge_fixed_reject", "").await;
    let invalid = doc! { "entity_name": "Fixed", "entity_type": "dpe", "date": "2025-09-25", "sct": 2.5, "cases": 15.5 };
    let id = fixture
        .metrics()
        .insert_one(invalid)
        .await
        .unwrap()
        .inserted_id;
    let still_invalid = doc! { "entity_name": "Broken", "entity_type": "dpe", "date": "2025-09-25", "sct": "x", "cases": 1 };
    fixture.metrics().insert_one(still_invalid).await.unwrap();
    fixture.wait_events(2).await;
    assert_eq!(fixture.rejects().count_documents(doc! {}).await.unwrap(), 2);

    fixture
        .metrics()
        .update_one(doc! { "_id": id.clone() }, doc! { "$set": { "cases": 15 } })
        .await
        .unwrap();
    fixture.wait_events(3).await;
    let merged = fixture.target_where("Fixed", "2025-09-25", |_| true).await;
    assert_eq!(merged.get_i32("cases_count").unwrap(), 15);
    let rejects: Vec<Document> = fixture
        .rejects()
        .find(doc! {})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(rejects.len(), 1, "{rejects:?}");
    assert_eq!(
        rejects[0]
            .get_document("document")
            .unwrap()
            .get_str("entity_name")
            .unwrap(),
        "Broken"
    );

    // Made invalid again, the same staging document is rejected again.
    fixture
        .metrics()
        .update_one(doc! { "_id": id }, doc! { "$set": { "cases": -1 } })
        .await
        .unwrap();
    fixture.wait_events(4).await;
    assert_eq!(fixture.rejects().count_documents(doc! {}).await.unwrap(), 2);
}
