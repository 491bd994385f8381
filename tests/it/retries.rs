//! Transaction retries, driven by the server's `failCommand` fail point on a private replica
//! set (a fail point on the shared set would hit every other test's daemon).

use std::time::Duration;

use mongodb::bson::{doc, Document};
use mongodb::{Client, Database};

use crate::support::{committed_totals, unique_database, wait_committed, Daemon, ReplicaSet};

const READY_TIMEOUT: Duration = Duration::from_secs(60);
const MERGE_TIMEOUT: Duration = Duration::from_secs(60);

async fn committed_events(db: &Database) -> i64 {
    committed_totals(db).await.events
}

/// Makes the next `times` `commitTransaction` commands fail as `data` describes.
async fn fail_commits(client: &Client, times: i32, data: Document) {
    let mut data = data;
    data.insert("failCommands", vec!["commitTransaction"]);
    client
        .database("admin")
        .run_command(
            doc! { "configureFailPoint": "failCommand", "mode": { "times": times }, "data": data },
        )
        .await
        .unwrap();
}

async fn insert_and_wait(db: &Database, daemon: &Daemon, names: &[&str]) {
    let staging = db.collection::<Document>("staging_metrics");
    let before = committed_events(db).await;
    for name in names {
        let document = doc! { "entity_name": *name, "entity_type": "dpe", "date": "2025-09-25", "sct": 1.5, "cases": 2 };
        staging.insert_one(document).await.unwrap();
    }
    wait_committed(db, before + names.len() as i64, MERGE_TIMEOUT).await;
    assert!(daemon.logs().contains("\"Ready.\""));
}

/// A commit that fails with TransientTransactionError is retried whole and logged, and the
/// batch is committed exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_commit_error_retried_whole() {
    let set = ReplicaSet::start(1).await;
    let client = set.client().await;
    let database = unique_database("retry_transient");
    let db = client.database(&database);
    let mut daemon = Daemon::builder(&set.uri(), &database).spawn();
    daemon.wait_ready(READY_TIMEOUT).await;

    fail_commits(
        &client,
        2,
        doc! { "errorCode": 251, "errorLabels": ["TransientTransactionError"] },
    )
    .await;
    insert_and_wait(&db, &daemon, &["Transient"]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    assert_eq!(committed_events(&db).await, 1, "the batch committed once");
    let target = db.collection::<Document>("performance_data");
    assert_eq!(target.count_documents(doc! {}).await.unwrap(), 1);
    let logs = daemon.logs();
    let retries = logs.matches("Retrying the merge transaction.").count();
    assert_eq!(retries, 2, "{logs}");
    assert!(
        logs.contains("TransientTransactionError"),
        "the retry names the error: {logs}"
    );
    eprintln!("transient commit errors: 2 injected, 2 retries logged, 1 commit");
    assert_eq!(daemon.terminate().await.code(), Some(0));
}

/// A commit whose result is unknown (a write-concern error after the server applied it) is
/// committed again, not run again, so the batch takes effect once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_commit_result_committed_again() {
    let set = ReplicaSet::start(1).await;
    let client = set.client().await;
    let database = unique_database("retry_unknown_commit");
    let db = client.database(&database);
    let mut daemon = Daemon::builder(&set.uri(), &database).spawn();
    daemon.wait_ready(READY_TIMEOUT).await;

    fail_commits(
        &client,
        1,
        doc! { "writeConcernError": { "code": 64, "codeName": "WriteConcernFailed", "errmsg": "injected", "errInfo": { "wtimeout": true } } },
    )
    .await;
    insert_and_wait(&db, &daemon, &["Unknown"]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    assert_eq!(committed_events(&db).await, 1, "the batch took effect once");
    let logs = daemon.logs();
    assert!(
        logs.contains("Commit result unknown; committing again."),
        "{logs}"
    );
    assert!(!logs.contains("Retrying the merge transaction."), "{logs}");
    eprintln!("unknown commit result: 1 injected, commit sent again, 1 commit");
    assert_eq!(daemon.terminate().await.code(), Some(0));
}
