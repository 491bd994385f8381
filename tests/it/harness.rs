//! Self-tests of the test harness: the servers it starts behave like the deployments perfagg
//! runs against, so a failing perfagg test points at perfagg rather than at the harness.

use std::time::Duration;

use futures::StreamExt;
use mongodb::bson::{doc, Document};
use mongodb::options::WriteConcern;

use crate::support::{
    command_error_code, connect, run_cli, shared_replica_set, unique_database, wait_until, Daemon,
    ReplicaSet, Standalone,
};

/// The shared replica set commits a two-collection transaction atomically and discards an
/// aborted one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_set_runs_transactions() {
    let set = shared_replica_set();
    let client = set.client().await;
    let db = client.database(&unique_database("harness_transactions"));
    let first = db.collection::<Document>("first");
    let second = db.collection::<Document>("second");

    let mut session = client.start_session().await.unwrap();
    session.start_transaction().await.unwrap();
    first
        .insert_one(doc! { "_id": 1 })
        .session(&mut session)
        .await
        .unwrap();
    second
        .insert_one(doc! { "_id": 1 })
        .session(&mut session)
        .await
        .unwrap();
    assert_eq!(first.count_documents(doc! {}).await.unwrap(), 0);
    session.commit_transaction().await.unwrap();
    assert_eq!(first.count_documents(doc! {}).await.unwrap(), 1);
    assert_eq!(second.count_documents(doc! {}).await.unwrap(), 1);

    session.start_transaction().await.unwrap();
    first
        .insert_one(doc! { "_id": 2 })
        .session(&mut session)
        .await
        .unwrap();
    session.abort_transaction().await.unwrap();
    assert_eq!(first.count_documents(doc! {}).await.unwrap(), 1);
}

/// The shared replica set delivers a change event for an insert to a database change stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_set_delivers_change_events() {
    let set = shared_replica_set();
    let client = set.client().await;
    let db = client.database(&unique_database("harness_change_stream"));
    let staging = db.collection::<Document>("staging_metrics");

    let mut stream = db.watch().await.unwrap();
    staging.insert_one(doc! { "_id": 7 }).await.unwrap();

    let event = tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .expect("no change event within 30 s")
        .expect("the change stream ended")
        .unwrap();
    let key = event
        .document_key
        .expect("an insert event has a document key");
    assert_eq!(key.get_i32("_id"), Ok(7));
}

/// `enableTestCommands` is on: a `failCommand` fail point limited to one client's app name
/// fails that client's next insert with the chosen code and leaves other clients alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_set_accepts_fail_points() {
    const APP_NAME: &str = "harness_fail_point";
    const INJECTED_CODE: i32 = 11600; // InterruptedAtShutdown
    let set = shared_replica_set();
    let client = connect(&format!("{}&appName={APP_NAME}", set.uri())).await;
    let db = client.database(&unique_database("harness_fail_point"));
    let staging = db.collection::<Document>("staging_metrics");

    client
        .database("admin")
        .run_command(doc! {
            "configureFailPoint": "failCommand",
            "mode": { "times": 1 },
            "data": {
                "failCommands": ["insert"],
                "errorCode": INJECTED_CODE,
                "appName": APP_NAME,
            },
        })
        .await
        .unwrap();

    // The driver retries a retryable write once, so disable retries to see the error.
    let no_retry = connect(&format!(
        "{}&appName={APP_NAME}&retryWrites=false",
        set.uri()
    ))
    .await;
    let error = no_retry
        .database(db.name())
        .collection::<Document>("staging_metrics")
        .insert_one(doc! { "_id": 1 })
        .await
        .expect_err("the fail point should fail the first insert");
    assert_eq!(command_error_code(&error), Some(INJECTED_CODE));

    staging.insert_one(doc! { "_id": 2 }).await.unwrap();
    assert_eq!(staging.count_documents(doc! {}).await.unwrap(), 1);
}

/// A three-member set elects a primary, and after a step-down another member takes over
/// and accepts majority writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_member_set_fails_over() {
    let set = ReplicaSet::start(3).await;
    let first_primary = set.wait_for_primary(Duration::from_secs(60)).await;

    let second_primary = set.step_down_primary().await;
    assert_ne!(first_primary, second_primary);
    assert_eq!(set.primary().await, Some(second_primary));

    let client = set.client().await;
    let coll = client
        .database(&unique_database("harness_failover"))
        .collection::<Document>("after_step_down");
    coll.insert_one(doc! { "_id": 1 })
        .write_concern(WriteConcern::majority())
        .await
        .unwrap();
    assert_eq!(coll.count_documents(doc! {}).await.unwrap(), 1);
}

/// A member killed with SIGKILL comes back on the same port with its acknowledged writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_member_restarts_with_data() {
    let mut set = ReplicaSet::start(1).await;
    let port = set.port(0);
    let database = unique_database("harness_restart");
    let client = set.client().await;
    let coll = client.database(&database).collection::<Document>("kept");
    coll.insert_one(doc! { "_id": 1 })
        .write_concern(WriteConcern::majority())
        .await
        .unwrap();

    set.kill_member(0);
    assert_eq!(set.primary().await, None);
    set.restart_member(0).await;
    set.wait_for_primary(Duration::from_secs(60)).await;

    assert_eq!(set.port(0), port);
    let client = set.client().await;
    let coll = client.database(&database).collection::<Document>("kept");
    wait_until(
        Duration::from_secs(30),
        "the kept document is readable",
        || {
            let coll = coll.clone();
            async move { coll.count_documents(doc! { "_id": 1 }).await.ok() == Some(1) }
        },
    )
    .await;
}

/// A standalone server replies to `hello` as a writable primary without a replica set name,
/// which is how perfagg recognizes a deployment without change streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_has_no_set_name() {
    let standalone = Standalone::start().await;
    let hello = standalone
        .client()
        .await
        .database("admin")
        .run_command(doc! { "hello": 1 })
        .await
        .unwrap();

    assert_eq!(hello.get("setName"), None);
    assert_eq!(hello.get_bool("isWritablePrimary"), Ok(true));
}

/// Database names from `unique_database` differ per call and fit MongoDB's 63-byte limit.
#[test]
fn unique_database_names_are_short_and_distinct() {
    let long_name = "a_test_name_that_is_much_longer_than_anyone_should_write.x";
    let first = unique_database(long_name);
    let second = unique_database(long_name);

    assert_ne!(first, second);
    assert!(first.len() <= 63, "{first} is {} bytes", first.len());
    assert!(
        first.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
        "{first} has a character other than letters, digits and _"
    );
}

/// The daemon helper starts perfagg on the shared set, finds "Ready." in its JSON log, and
/// gets exit code 0 after SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_helper_starts_and_terminates() {
    let set = shared_replica_set();
    let database = unique_database("harness_daemon");
    let mut daemon = Daemon::spawn(set.uri(), &database, "");

    daemon.wait_ready(Duration::from_secs(60)).await;
    let status = daemon.terminate().await;

    assert_eq!(status.code(), Some(0), "log:\n{}", daemon.logs());
    let logs = daemon.logs();
    let first_line = logs.lines().next().expect("perfagg logged nothing");
    assert!(
        serde_json::from_str::<serde_json::Value>(first_line).is_ok(),
        "the first log line is not JSON: {first_line}"
    );
}

/// `run_cli` runs a one-shot command and returns its exit status and stdout.
#[test]
fn run_cli_returns_output() {
    let output = run_cli(&["--version"], &[]);

    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        format!("perfagg {}", env!("CARGO_PKG_VERSION"))
    );
}
