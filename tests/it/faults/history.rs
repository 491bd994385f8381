//! Lost history: a stored position that the server can no longer resume, at start-up and
//! while running. The daemon must stop with exit code 3 and a message that names the stored
//! position and `perfagg reset`, and must not move the stored position.

use std::time::{Duration, Instant};

use futures::StreamExt;
use mongodb::bson::{doc, Bson, Document};
use mongodb::{Client, Database};

use super::model::{committed_totals, wait_committed};
use super::{clear_fail_commands, fail_commands, summary, READY_TIMEOUT, SHORT_LEASE};
use crate::support::{shared_replica_set, unique_database, Daemon, DaemonBuilder, ReplicaSet};

/// How long a daemon may take to find out that its position is lost and exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// Reads the stored resume token.
async fn stored_token(db: &Database) -> Document {
    db.collection::<Document>("perfagg_state")
        .find_one(doc! { "_id": "stream" })
        .await
        .unwrap()
        .expect("a state document")
        .get_document("resume_token")
        .unwrap()
        .clone()
}

/// Runs a daemon until it has merged one staging insert and stopped cleanly, so `db`
/// contains a stored position after a real event.
async fn store_a_position(builder: &DaemonBuilder, db: &Database, name: &str) {
    let mut daemon = builder.spawn();
    daemon.wait_ready(READY_TIMEOUT).await;
    let (events, _, _) = committed_totals(db).await;
    db.collection::<Document>("staging_metrics")
        .insert_one(doc! { "entity_name": name, "entity_type": "dpe", "date": "2025-09-25", "sct": 1, "cases": 1 })
        .await
        .unwrap();
    wait_committed(db, events as usize + 1, Duration::from_secs(30)).await;
    assert!(daemon.terminate().await.success());
}

/// Starts a daemon and asserts that it exits with code 3 without reporting ready, logging
/// an error that names the stored token and `perfagg reset`. Returns the error line.
async fn assert_exits_three(
    builder: &DaemonBuilder,
    token: &Document,
    before_ready: bool,
) -> String {
    let mut daemon = builder.spawn();
    let status = daemon.wait_exit(EXIT_TIMEOUT).await;
    let logs = daemon.logs();
    assert_eq!(status.code(), Some(3), "{logs}");
    if before_ready {
        assert!(
            !logs.contains("\"Ready.\""),
            "reported ready with a lost position: {logs}"
        );
    }
    let error = logs
        .lines()
        .find(|line| line.starts_with("perfagg: error:"))
        .unwrap_or_else(|| panic!("no error line: {logs}"))
        .to_string();
    let data = token.get_str("_data").unwrap();
    assert!(
        error.contains(data),
        "the error does not name the stored token {data}: {error}"
    );
    assert!(error.contains("perfagg reset"), "{error}");
    error
}

/// Returns a resume token of a change on another replica set, which this one has never seen.
async fn foreign_token(other: &Client) -> Document {
    let db = other.database(&unique_database("foreign_token"));
    let mut stream = db.watch().await.unwrap();
    db.collection::<Document>("elsewhere")
        .insert_one(doc! { "x": 1 })
        .await
        .unwrap();
    let event = stream.next().await.unwrap().unwrap();
    match mongodb::bson::to_bson(&event.id).unwrap() {
        Bson::Document(token) => token,
        other => panic!("a resume token is a document, not {other}"),
    }
}

/// At start-up, a stored token that the server does not know (code 280, here one from
/// another replica set) stops the daemon with exit code 3 before it reports ready. So does
/// history that the server no longer has (code 286). Neither moves the stored position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_position_at_start_exits_three() {
    let started = Instant::now();
    let set = ReplicaSet::start(1).await;
    let client = set.client().await;

    // Code 280: the stored token comes from another replica set.
    let database = unique_database("lost_position_unknown");
    let db = client.database(&database);
    let builder = Daemon::builder(&set.uri(), &database).config(SHORT_LEASE);
    store_a_position(&builder, &db, "Before").await;
    let token = foreign_token(&shared_replica_set().client().await).await;
    db.collection::<Document>("perfagg_state")
        .update_one(
            doc! { "_id": "stream" },
            doc! { "$set": { "resume_token": token.clone() } },
        )
        .await
        .unwrap();
    // Cluster times are seconds and a counter, and the shared set counts faster than this
    // one: wait for the next second, so the daemon's writes come after the foreign token.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let unknown_error = assert_exits_three(&builder, &token, true).await;
    assert!(unknown_error.contains("280"), "{unknown_error}");
    assert_eq!(stored_token(&db).await, token, "the stored position moved");
    // A daemon that stops for good lets its lease expire at once.
    let lease = db
        .collection::<Document>("perfagg_state")
        .find_one(doc! { "_id": "lease" })
        .await
        .unwrap()
        .unwrap();
    assert!(
        lease.get_datetime("released_at").is_ok(),
        "the lease was not released: {lease}"
    );

    // Code 286: the server no longer has the history after a valid token.
    let database = unique_database("lost_position_history");
    let db = client.database(&database);
    let builder = Daemon::builder(&set.uri(), &database).config(SHORT_LEASE);
    store_a_position(&builder, &db, "Before").await;
    let token = stored_token(&db).await;
    fail_commands(
        &client,
        "alwaysOn".into(),
        doc! { "failCommands": ["aggregate"], "errorCode": 286 },
    )
    .await;
    let history_error = assert_exits_three(&builder, &token, true).await;
    clear_fail_commands(&client).await;
    assert!(history_error.contains("286"), "{history_error}");
    assert_eq!(stored_token(&db).await, token, "the stored position moved");

    // The position itself was fine: without the fault the daemon resumes from it.
    let mut daemon = builder.spawn();
    daemon.wait_ready(READY_TIMEOUT).await;
    assert!(daemon.terminate().await.success());

    summary(
        "lost_position_at_start_exits_three",
        &format!(
            "a token from another replica set (code 280) and lost history (code 286) at start-up \
             each exited 3 before ready, naming the stored token and `perfagg reset`, with the \
             stored position unchanged; {:.0?}",
            started.elapsed()
        ),
    );
}

/// While running, a change stream read that fails with code 286 or 280 stops the daemon
/// with exit code 3. The stored position stays unchanged, so a restart resumes from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_position_mid_run_exits_three() {
    let started = Instant::now();
    let set = ReplicaSet::start(1).await;
    let client = set.client().await;
    let database = unique_database("lost_position_mid_run");
    let db = client.database(&database);
    let builder = Daemon::builder(&set.uri(), &database).config(SHORT_LEASE);

    for (round, code) in [286, 280].into_iter().enumerate() {
        let mut daemon = builder.spawn();
        daemon.wait_ready(READY_TIMEOUT).await;
        db.collection::<Document>("staging_metrics")
            .insert_one(doc! { "entity_name": format!("Round {round}"), "entity_type": "dpe", "date": "2025-09-25", "sct": 1, "cases": 1 })
            .await
            .unwrap();
        wait_committed(&db, round + 1, Duration::from_secs(30)).await;
        let token = stored_token(&db).await;

        // The daemon is idle, so its next getMore is the change stream's.
        fail_commands(
            &client,
            doc! { "times": 1 }.into(),
            doc! { "failCommands": ["getMore"], "errorCode": code },
        )
        .await;
        let status = daemon.wait_exit(EXIT_TIMEOUT).await;
        let logs = daemon.logs();
        assert_eq!(status.code(), Some(3), "code {code}: {logs}");
        assert!(logs.contains("The stored position is lost."), "{logs}");
        let error = logs
            .lines()
            .find(|line| line.starts_with("perfagg: error:"))
            .unwrap_or_else(|| panic!("no error line: {logs}"));
        assert!(error.contains(token.get_str("_data").unwrap()), "{error}");
        assert!(error.contains("perfagg reset"), "{error}");
        assert!(error.contains(&code.to_string()), "{error}");
        assert_eq!(stored_token(&db).await, token, "the stored position moved");
    }
    assert_eq!(committed_totals(&db).await, (2, 2, 0));

    summary(
        "lost_position_mid_run_exits_three",
        &format!(
            "a change stream read failing with 286, then after a restart with 280, each exited \
             3 naming the stored token and `perfagg reset`, the stored position unchanged, and \
             the restart resumed from it; {:.0?}",
            started.elapsed()
        ),
    );
}
