//! Configuration changes between runs: a renamed staging collection in the config, and
//! other collections of the database coming and going, with a stored position.

use std::time::{Duration, Instant};

use mongodb::bson::{doc, Document};
use mongodb::Database;

use super::model::{committed_totals, wait_committed};
use super::{count_messages, summary, READY_TIMEOUT, SHORT_LEASE};
use crate::support::{shared_replica_set, unique_database, Daemon};

fn metrics(name: &str, cases: i32) -> Document {
    doc! { "entity_name": name, "entity_type": "dpe", "date": "2025-09-25", "sct": 1.5, "cases": cases }
}

fn survey(name: &str, csat: i32) -> Document {
    doc! { "entity_name": name, "entity_type": "dpe", "date": "2025-09-25", "csat": csat, "neutral": 0, "dsat": 0 }
}

async fn insert(db: &Database, collection: &str, document: Document) {
    db.collection::<Document>(collection)
        .insert_one(document)
        .await
        .unwrap();
}

async fn target_exists(db: &Database, name: &str) -> bool {
    db.collection::<Document>("performance_data")
        .count_documents(doc! { "entity_name": name })
        .await
        .unwrap()
        == 1
}

/// Config for a daemon whose survey staging collection is `surveys`.
fn config_with_surveys(surveys: &str) -> String {
    format!("{SHORT_LEASE}[collections]\nsurveys = \"{surveys}\"\n")
}

/// With a stored position, renaming a staging collection in the config resumes when the
/// server can resume under the new filter, merging what was written under the new name
/// meanwhile. When it cannot, the daemon exits 3 saying that the watch filter changed and
/// how to continue, and going back to the old name resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_rename_resumes_or_explains() {
    let started = Instant::now();
    let set = shared_replica_set();
    let database = unique_database("config_rename_resumes");
    let db = set.client().await.database(&database);
    let builder =
        |surveys: &str| Daemon::builder(set.uri(), &database).config(&config_with_surveys(surveys));

    // First run: the last committed change is a metrics insert.
    let mut daemon = builder("staging_surveys").spawn();
    daemon.wait_ready(READY_TIMEOUT).await;
    insert(&db, "staging_surveys", survey("Old survey", 1)).await;
    insert(&db, "staging_metrics", metrics("First metrics", 1)).await;
    wait_committed(&db, 2, Duration::from_secs(30)).await;
    assert!(daemon.terminate().await.success());

    // While stopped: the database's other collections change, and surveys arrive under the
    // new name that the next run is configured with.
    db.collection::<Document>("scratch").drop().await.unwrap();
    insert(&db, "scratch", doc! { "x": 1 }).await;
    db.create_collection("reports").await.unwrap();
    insert(&db, "surveys_v2", survey("Written while stopped", 2)).await;

    // The stored metrics event passes the new filter too, so the stream resumes.
    let mut daemon = builder("surveys_v2").spawn();
    daemon.wait_ready(READY_TIMEOUT).await;
    insert(&db, "surveys_v2", survey("Written after restart", 3)).await;
    insert(&db, "staging_surveys", survey("Old name after restart", 4)).await;
    wait_committed(&db, 4, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(committed_totals(&db).await, (4, 4, 0));
    assert!(target_exists(&db, "Written while stopped").await);
    assert!(target_exists(&db, "Written after restart").await);
    assert!(!target_exists(&db, "Old name after restart").await);
    let logs = daemon.logs();
    assert_eq!(
        count_messages(
            &logs,
            "The watched staging collections changed since the position was stored."
        ),
        1,
        "{logs}"
    );
    assert!(daemon.terminate().await.success());

    // Now the stored position is a surveys_v2 event, which a filter without surveys_v2
    // cannot resume after.
    let mut daemon = builder("surveys_v3").spawn();
    let status = daemon.wait_exit(Duration::from_secs(30)).await;
    let logs = daemon.logs();
    assert_eq!(status.code(), Some(3), "{logs}");
    assert!(!logs.contains("\"Ready.\""), "{logs}");
    let error = logs
        .lines()
        .find(|line| line.starts_with("perfagg: error:"))
        .unwrap_or_else(|| panic!("no error line: {logs}"));
    assert!(error.contains("the watch filter changed"), "{error}");
    assert!(
        error.contains("surveys_v2") && error.contains("surveys_v3"),
        "{error}"
    );
    assert!(
        error.contains("restore the old collection names"),
        "{error}"
    );
    assert!(error.contains("perfagg reset"), "{error}");

    // Going back to the stored names resumes, as the error message suggests.
    insert(&db, "surveys_v2", survey("Back to v2", 5)).await;
    let mut daemon = builder("surveys_v2").spawn();
    daemon.wait_ready(READY_TIMEOUT).await;
    wait_committed(&db, 5, Duration::from_secs(30)).await;
    assert!(target_exists(&db, "Back to v2").await);
    assert!(daemon.terminate().await.success());

    summary(
        "config_rename_resumes_or_explains",
        &format!(
            "staging_surveys renamed to surveys_v2 in the config while other collections \
             changed: resumed and merged the change written meanwhile; renamed again to \
             surveys_v3 where the server cannot resume: exit 3 naming the changed watch filter \
             and the way out; back to surveys_v2: resumed; {:.0?}",
            started.elapsed()
        ),
    );
}
