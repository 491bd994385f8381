//! Staging collections that are dropped, renamed or recreated while the daemon runs, and
//! staging documents removed by a TTL index or by hand.

use std::time::{Duration, Instant};

use futures::TryStreamExt;
use mongodb::bson::{doc, DateTime, Document};
use mongodb::options::IndexOptions;
use mongodb::{Collection, Database, IndexModel};

use super::load::{METRICS, SURVEYS};
use super::model::{committed_totals, wait_committed};
use super::target;
use super::{count_messages, summary, READY_TIMEOUT};
use crate::support::{shared_replica_set, unique_database, wait_until, Daemon};

fn metrics(name: &str, cases: i32) -> Document {
    doc! { "entity_name": name, "entity_type": "dpe", "date": "2025-09-25", "sct": 1.5, "cases": cases }
}

fn survey(name: &str, csat: i32) -> Document {
    doc! { "entity_name": name, "entity_type": "dpe", "date": "2025-09-25", "csat": csat, "neutral": 1, "dsat": 0 }
}

async fn all_targets(db: &Database) -> Vec<Document> {
    db.collection::<Document>("performance_data")
        .find(doc! {})
        .sort(doc! { "entity_name": 1 })
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap()
}

/// Dropping one staging collection and renaming the other while the daemon runs is logged,
/// leaves merged data alone, and inserts into the recreated collections are merged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staging_dropped_renamed_recreated() {
    let started = Instant::now();
    let set = shared_replica_set();
    let database = unique_database("staging_dropped_renamed");
    let mut daemon = Daemon::spawn(set.uri(), &database, "");
    daemon.wait_ready(READY_TIMEOUT).await;
    let db = set.client().await.database(&database);
    let staging_metrics: Collection<Document> = db.collection(METRICS);
    let staging_surveys: Collection<Document> = db.collection(SURVEYS);

    staging_metrics
        .insert_one(metrics("Alice", 4))
        .await
        .unwrap();
    staging_surveys
        .insert_one(survey("Alice", 3))
        .await
        .unwrap();
    wait_committed(&db, 2, Duration::from_secs(30)).await;
    let before = target(&db, "Alice").await;

    staging_metrics.drop().await.unwrap();
    db.client()
        .database("admin")
        .run_command(doc! {
            "renameCollection": format!("{database}.{SURVEYS}"),
            "to": format!("{database}.{SURVEYS}_old"),
        })
        .await
        .unwrap();
    wait_until(
        Duration::from_secs(30),
        "the drop and the rename are logged",
        || {
            let logs = daemon.logs();
            async move {
                count_messages(&logs, "A staging collection was dropped.") == 1
                    && count_messages(&logs, "A staging collection was renamed.") == 1
            }
        },
    )
    .await;
    assert_eq!(
        target(&db, "Alice").await,
        before,
        "the drop or rename changed merged data"
    );

    // Inserting creates each staging collection again; the stream merges what arrives.
    staging_metrics.insert_one(metrics("Bob", 6)).await.unwrap();
    staging_surveys.insert_one(survey("Bob", 5)).await.unwrap();
    // A document in the renamed collection belongs to no staging collection now.
    db.collection::<Document>(&format!("{SURVEYS}_old"))
        .insert_one(survey("Carol", 1))
        .await
        .unwrap();
    staging_metrics
        .insert_one(metrics("Alice", 8))
        .await
        .unwrap();
    wait_committed(&db, 5, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(committed_totals(&db).await, (5, 5, 0));

    let bob = target(&db, "Bob").await;
    assert_eq!(bob.get_i32("cases_count"), Ok(6));
    let answers = bob
        .get_document("metrics")
        .unwrap()
        .get_document("customerSatisfaction")
        .unwrap();
    assert_eq!(answers.get_i32("csat"), Ok(5));
    let alice = target(&db, "Alice").await;
    assert_eq!(alice.get_i32("cases_count"), Ok(8));
    let answers = alice
        .get_document("metrics")
        .unwrap()
        .get_document("customerSatisfaction")
        .unwrap();
    assert_eq!(
        answers.get_i32("csat"),
        Ok(3),
        "the survey merged before the rename stays"
    );
    let names: Vec<String> = all_targets(&db)
        .await
        .iter()
        .map(|target| target.get_str("entity_name").unwrap().to_string())
        .collect();
    assert_eq!(names, ["Alice", "Bob"]);
    assert!(daemon.terminate().await.success(), "{}", daemon.logs());

    summary(
        "staging_dropped_renamed_recreated",
        &format!(
            "staging_metrics dropped and staging_surveys renamed while running: both logged, \
             merged data unchanged, 3 inserts into the recreated collections merged, the \
             renamed collection ignored; {:.0?}",
            started.elapsed()
        ),
    );
}

/// Staging documents deleted by a TTL index and by hand leave every merged document exactly
/// as it was, `updated_at` included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staging_removal_keeps_merged_data() {
    const PER_SOURCE: i32 = 40;
    let started = Instant::now();
    let set = shared_replica_set();
    let database = unique_database("staging_removal_keeps_merged");
    let mut daemon = Daemon::spawn(set.uri(), &database, "");
    daemon.wait_ready(READY_TIMEOUT).await;
    let db = set.client().await.database(&database);
    let staging_metrics: Collection<Document> = db.collection(METRICS);
    let staging_surveys: Collection<Document> = db.collection(SURVEYS);

    // Half of each source carries an expiry in the past for the TTL index below.
    let expired = DateTime::from_millis(DateTime::now().timestamp_millis() - 3_600_000);
    let with_expiry = |mut document: Document, index: i32| {
        if index % 2 == 0 {
            document.insert("expire_at", expired);
        }
        document
    };
    let metrics_documents = (0..PER_SOURCE)
        .map(|index| with_expiry(metrics(&format!("Agent {index:02}"), index), index));
    staging_metrics
        .insert_many(metrics_documents)
        .await
        .unwrap();
    let survey_documents = (0..PER_SOURCE)
        .map(|index| with_expiry(survey(&format!("Agent {index:02}"), index), index));
    staging_surveys.insert_many(survey_documents).await.unwrap();
    let inserted = 2 * PER_SOURCE as usize;
    wait_committed(&db, inserted, Duration::from_secs(30)).await;
    let merged = all_targets(&db).await;
    assert_eq!(merged.len(), PER_SOURCE as usize);

    let ttl_index = IndexModel::builder()
        .keys(doc! { "expire_at": 1 })
        .options(IndexOptions::builder().expire_after(Duration::ZERO).build())
        .build();
    for staging in [&staging_metrics, &staging_surveys] {
        staging.create_index(ttl_index.clone()).await.unwrap();
    }
    let ttl_started = Instant::now();
    // The harness starts mongod with the TTL monitor running every second.
    wait_until(
        Duration::from_secs(60),
        "the TTL monitor removes the expired staging documents",
        || {
            let (staging_metrics, staging_surveys) =
                (staging_metrics.clone(), staging_surveys.clone());
            async move {
                let left = staging_metrics.count_documents(doc! {}).await.unwrap()
                    + staging_surveys.count_documents(doc! {}).await.unwrap();
                left == inserted as u64 / 2
            }
        },
    )
    .await;
    let ttl_took = ttl_started.elapsed();
    staging_metrics.delete_many(doc! {}).await.unwrap();
    staging_surveys.delete_many(doc! {}).await.unwrap();

    // Every delete is a change event that merges nothing.
    wait_committed(&db, 2 * inserted, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        committed_totals(&db).await,
        (2 * inserted as i64, inserted as i64, 0),
        "(events, merged, rejected) committed"
    );
    assert_eq!(
        all_targets(&db).await,
        merged,
        "removing staging documents changed merged data"
    );
    assert!(daemon.terminate().await.success());

    summary(
        "staging_removal_keeps_merged_data",
        &format!(
            "{inserted} staging documents merged, {} removed by a TTL index (after {ttl_took:.0?}) \
             and {} by hand: {} delete events committed, all {} targets unchanged; {:.0?}",
            inserted / 2,
            inserted / 2,
            inserted,
            merged.len(),
            started.elapsed()
        ),
    );
}
