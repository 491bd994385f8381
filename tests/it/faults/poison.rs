//! Poison documents: an invalid staging document, and one whose merge the server refuses,
//! inside a batch of valid ones.

use std::time::{Duration, Instant};

use mongodb::bson::{doc, Bson, Document};
use mongodb::Collection;

use super::model::{committed_totals, wait_committed};
use super::target;
use super::{count_messages, fail_commands, summary, READY_TIMEOUT};
use crate::support::{shared_replica_set, unique_database, Daemon, ReplicaSet};

/// Bytes in one string of a large array; several of them push a document towards 16 MiB.
const MEBIBYTE: usize = 1024 * 1024;

fn metrics(name: &str, cases: i32) -> Document {
    doc! { "entity_name": name, "entity_type": "dpe", "date": "2025-09-25", "sct": 2.5, "cases": cases }
}

fn survey(name: &str, csat: i32) -> Document {
    doc! { "entity_name": name, "entity_type": "dpe", "date": "2025-09-25", "csat": csat, "neutral": 1, "dsat": 0 }
}

/// Returns an array of `mebibytes` strings of 1 MiB each.
fn large_array(mebibytes: usize, letter: char) -> Vec<Bson> {
    (0..mebibytes)
        .map(|_| Bson::String(letter.to_string().repeat(MEBIBYTE)))
        .collect()
}

/// In one batch of valid changes, an invalid document and a survey whose merge would grow
/// the target beyond 16 MiB are each rejected once with their reason, every other change
/// merges, and the stream goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_events_isolated_in_batch() {
    let started = Instant::now();
    let set = shared_replica_set();
    let database = unique_database("poison_events_isolated");
    // A long batch window, so the whole burst below is one batch.
    let mut daemon = Daemon::builder(set.uri(), &database)
        .config("[batch]\nmax_events = 500\nmax_wait_ms = 5000\n")
        .spawn();
    daemon.wait_ready(READY_TIMEOUT).await;
    let db = set.client().await.database(&database);
    let staging_metrics: Collection<Document> = db.collection("staging_metrics");
    let staging_surveys: Collection<Document> = db.collection("staging_surveys");

    let before: Vec<Document> = (0..30)
        .map(|index| metrics(&format!("Before {index:02}"), index))
        .collect();
    staging_metrics.insert_many(before).await.unwrap();
    // Each large document fits the 16 MiB limit alone, but not merged into one target.
    let mut large_metrics = metrics("Large", 7);
    large_metrics.insert("sample_cases", large_array(8, 'm'));
    staging_metrics.insert_one(large_metrics).await.unwrap();
    let mut invalid = metrics("Invalid", 1);
    invalid.insert("cases", 15.5);
    let invalid_id = staging_metrics
        .insert_one(invalid)
        .await
        .unwrap()
        .inserted_id;
    let between: Vec<Document> = (0..30)
        .map(|index| survey(&format!("Before {index:02}"), index))
        .collect();
    staging_surveys.insert_many(between).await.unwrap();
    let mut large_survey = survey("Large", 9);
    large_survey.insert("survey_details", large_array(8, 's'));
    let large_survey_id = staging_surveys
        .insert_one(large_survey)
        .await
        .unwrap()
        .inserted_id;
    let after: Vec<Document> = (0..30)
        .map(|index| metrics(&format!("After {index:02}"), index))
        .collect();
    staging_metrics.insert_many(after).await.unwrap();
    let events = 30 + 1 + 1 + 30 + 1 + 30;
    wait_committed(&db, events, Duration::from_secs(60)).await;

    // A later change still merges: the stream did not stop at the poison events.
    staging_metrics
        .insert_one(metrics("Later", 3))
        .await
        .unwrap();
    wait_committed(&db, events + 1, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        committed_totals(&db).await,
        (events as i64 + 1, events as i64 - 1, 2),
        "(events, merged, rejected) committed"
    );

    let rejects: Collection<Document> = db.collection("staging_rejects");
    assert_eq!(rejects.count_documents(doc! {}).await.unwrap(), 2);
    let invalid_reject = rejects
        .find_one(doc! { "staging_id": invalid_id })
        .await
        .unwrap()
        .expect("the invalid document is rejected");
    let reasons = invalid_reject.get_array("reasons").unwrap();
    assert!(
        format!("{reasons:?}").contains("15.5 is not a whole number"),
        "{reasons:?}"
    );
    let refused_reject = rejects
        .find_one(doc! { "staging_id": large_survey_id })
        .await
        .unwrap()
        .expect("the survey whose merge the server refused is rejected");
    assert_eq!(refused_reject.get_str("source"), Ok("staging_surveys"));
    let reasons = format!("{:?}", refused_reject.get_array("reasons").unwrap());
    assert!(
        reasons.contains("the server refused the write"),
        "{reasons}"
    );
    assert!(reasons.contains("Large/dpe/2025-09-25"), "{reasons}");

    // The large metrics document merged; the refused survey left the target as it was.
    let large = target(&db, "Large").await;
    assert_eq!(large.get_i32("cases_count"), Ok(7));
    assert_eq!(large.get_array("sample_cases").unwrap().len(), 8);
    let answers = large
        .get_document("metrics")
        .unwrap()
        .get_document("customerSatisfaction")
        .unwrap();
    assert_eq!(answers, &doc! { "csat": 0, "neutral": 0, "dsat": 0 });
    for index in 0..30 {
        let before = target(&db, &format!("Before {index:02}")).await;
        assert_eq!(before.get_i32("cases_count"), Ok(index));
        let answers = before
            .get_document("metrics")
            .unwrap()
            .get_document("customerSatisfaction")
            .unwrap();
        assert_eq!(answers.get_i32("csat"), Ok(index));
        let after = target(&db, &format!("After {index:02}")).await;
        assert_eq!(after.get_i32("cases_count"), Ok(index));
    }
    let invalid_targets = db
        .collection::<Document>("performance_data")
        .count_documents(doc! { "entity_name": "Invalid" })
        .await
        .unwrap();
    assert_eq!(invalid_targets, 0, "the invalid document created a target");

    let logs = daemon.logs();
    let splits = count_messages(
        &logs,
        "The server refused a write; splitting the batch to find the event.",
    );
    // Halving 93 events down to one takes at most 7 splits; more would mean a retry loop.
    assert!((1..=7).contains(&splits), "{splits} splits:\n{logs}");
    assert!(daemon.terminate().await.success());

    summary(
        "poison_events_isolated_in_batch",
        &format!(
            "{events} events in one batch with 1 invalid document and 1 merge beyond 16 MiB: \
             {splits} splits isolated the refused event, 2 rejects with reasons, {} merges, \
             a later change merged; {:.0?}",
            events - 1,
            started.elapsed()
        ),
    );
}

/// A rejected document is logged once, after its transaction commits, even when the
/// transaction had to run twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_logged_once_after_retry() {
    let set = ReplicaSet::start(1).await;
    let client = set.client().await;
    let database = unique_database("reject_logged_once");
    let db = client.database(&database);
    let mut daemon = Daemon::builder(&set.uri(), &database).spawn();
    daemon.wait_ready(READY_TIMEOUT).await;

    fail_commands(
        &client,
        doc! { "times": 1 }.into(),
        doc! {
            "failCommands": ["commitTransaction"],
            "errorCode": 251,
            "errorLabels": ["TransientTransactionError"],
        },
    )
    .await;
    let mut invalid = metrics("Invalid", 1);
    invalid.insert("cases", -3);
    db.collection::<Document>("staging_metrics")
        .insert_one(invalid)
        .await
        .unwrap();
    wait_committed(&db, 1, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let logs = daemon.logs();
    assert_eq!(
        count_messages(&logs, "Retrying the merge transaction."),
        1,
        "{logs}"
    );
    assert_eq!(
        count_messages(&logs, "Rejected a staging document."),
        1,
        "{logs}"
    );
    assert_eq!(committed_totals(&db).await, (1, 0, 1));
    assert!(daemon.terminate().await.success());
}
