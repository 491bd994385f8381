//! Quiet staging: while only other collections are written, the stored position still
//! follows the stream, so a quiet period cannot leave it behind the oplog window.

use std::time::{Duration, Instant};

use mongodb::bson::{doc, Document, Timestamp};
use mongodb::Database;

use super::model::{committed_totals, wait_committed};
use super::{summary, READY_TIMEOUT};
use crate::support::{shared_replica_set, unique_database, wait_for, Daemon};

/// Seconds between idle checkpoints in this test.
const CHECKPOINT_SECONDS: u64 = 1;
/// How long only the unrelated collection is written.
const QUIET_PERIOD: Duration = Duration::from_secs(8);

/// Reads the cluster time of the stored position.
async fn stored_cluster_time(db: &Database) -> Option<Timestamp> {
    let stored = db
        .collection::<Document>("perfagg_state")
        .find_one(doc! { "_id": "stream" })
        .await
        .unwrap()?;
    stored.get_timestamp("cluster_time").ok()
}

/// With no staging writes while another collection of the database is busy, the stored
/// position moves forward at least every `checkpoint_seconds` (plus one server wait), passes
/// the unrelated writes, and a staging insert afterwards is merged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_staging_position_advances() {
    let started = Instant::now();
    let set = shared_replica_set();
    let database = unique_database("quiet_staging_position");
    let mut daemon = Daemon::spawn(
        set.uri(),
        &database,
        &format!("[state]\ncheckpoint_seconds = {CHECKPOINT_SECONDS}\n"),
    );
    daemon.wait_ready(READY_TIMEOUT).await;
    let client = set.client().await;
    let db = client.database(&database);
    let unrelated = db.collection::<Document>("audit_log");

    let mut last = stored_cluster_time(&db)
        .await
        .expect("a first run stores its position");
    let mut last_change = Instant::now();
    let mut longest_gap = Duration::ZERO;
    let mut advances = 0;
    let quiet_started = Instant::now();
    let mut written = 0;
    while quiet_started.elapsed() < QUIET_PERIOD {
        unrelated.insert_one(doc! { "n": written }).await.unwrap();
        written += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = stored_cluster_time(&db).await.unwrap();
        if now != last {
            assert!(
                now > last,
                "the stored position went back from {last:?} to {now:?}"
            );
            longest_gap = longest_gap.max(last_change.elapsed());
            last = now;
            last_change = Instant::now();
            advances += 1;
        }
    }
    longest_gap = longest_gap.max(last_change.elapsed());
    // One checkpoint interval, plus the server's wait for events (at most 1 s) and the
    // polling above.
    let allowed = Duration::from_secs(CHECKPOINT_SECONDS) + Duration::from_millis(1_500);
    assert!(
        longest_gap <= allowed,
        "the stored position stood still for {longest_gap:?}, more than {allowed:?}"
    );

    // The stored position passes an unrelated write made after the quiet period.
    let mut session = client.start_session().await.unwrap();
    unrelated
        .insert_one(doc! { "n": "last" })
        .session(&mut session)
        .await
        .unwrap();
    let last_write = session.operation_time().unwrap();
    let passed = wait_for(
        Duration::from_secs(10),
        "the stored position passes the last unrelated write",
        || {
            let db = db.clone();
            async move {
                stored_cluster_time(&db)
                    .await
                    .filter(|stored| *stored >= last_write)
            }
        },
    )
    .await;
    assert_eq!(
        committed_totals(&db).await.0,
        0,
        "no staging change was committed"
    );

    // Nothing was skipped: a staging insert now is merged, once.
    db.collection::<Document>("staging_metrics")
        .insert_one(doc! { "entity_name": "After quiet", "entity_type": "dpe", "date": "2025-09-25", "sct": 1, "cases": 1 })
        .await
        .unwrap();
    wait_committed(&db, 1, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(committed_totals(&db).await, (1, 1, 0));
    assert!(daemon.terminate().await.success());
    // Ending the session before the runtime stops keeps the driver's clean-up task quiet.
    drop(session);
    client.shutdown().await;

    summary(
        "quiet_staging_position_advances",
        &format!(
            "{written} unrelated writes in {QUIET_PERIOD:?} without staging changes: the stored \
             position advanced {advances} times, at most {longest_gap:.1?} apart \
             (checkpoint_seconds = {CHECKPOINT_SECONDS}), reached the last unrelated write \
             ({}.{} >= {}.{}), and a later staging insert merged once; {:.0?}",
            passed.time,
            passed.increment,
            last_write.time,
            last_write.increment,
            started.elapsed()
        ),
    );
}
