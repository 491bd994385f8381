//! MongoDB down at start-up and going away while the daemon runs: it retries with capped
//! backoff, logs each failure, never exits for it, and catches up once the server is back.

use std::time::{Duration, Instant};

use super::load::{generate, insert_in_order, seed, Rng, Spec};
use super::model::{
    assert_committed_once, assert_matches, assert_no_duplicate_keys, committed_totals,
    read_staging, replay, wait_committed, STAGING,
};
use super::{log_lines, summary, SHORT_LEASE};
use crate::support::{unique_database, wait_until, Daemon, ReplicaSet};

/// The daemon's warning for each failed attempt before it starts over.
const RETRY_MESSAGE: &str = "MongoDB operation failed; starting over from the stored position.";
/// Maximum pause between attempts, `RECONNECT_BACKOFF_MAX` in `retry.rs`.
const BACKOFF_CAP_MS: u64 = 15_000;

/// Returns the `backoff_ms` of every retry warning in `logs`, in order.
fn retry_backoffs(logs: &str) -> Vec<u64> {
    log_lines(logs)
        .iter()
        .filter(|line| line.message == RETRY_MESSAGE)
        .map(|line| line.fields["backoff_ms"].as_u64().unwrap())
        .collect()
}

/// Returns whether the process `pid` still runs (exists and is not a zombie).
fn is_running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses: `pid (comm) S ...`.
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Asserts that each pause doubles the one before, up to the cap.
fn assert_capped_doubling(backoffs: &[u64]) {
    for pair in backoffs.windows(2) {
        let expected = (pair[0] * 2).min(BACKOFF_CAP_MS);
        assert!(
            pair[1] == expected || pair[1] <= pair[0],
            "backoff went from {} ms to {} ms; expected {expected} ms or a reset: {backoffs:?}",
            pair[0],
            pair[1]
        );
    }
    assert!(
        backoffs.iter().all(|backoff| *backoff <= BACKOFF_CAP_MS),
        "{backoffs:?}"
    );
}

/// A daemon started while its single-node replica set is stopped retries with doubling
/// backoff and becomes ready when the set starts. A stop and restart under load is survived
/// the same way, and the final data equals the reference model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_at_start_and_mid_run() {
    let started = Instant::now();
    let seed = seed();
    let mut rng = Rng::new(seed);
    let mut set = ReplicaSet::start(1).await;
    let database = unique_database("outage_start_mid_run");
    // A short server selection timeout, so each attempt against a stopped server fails
    // within a second instead of the default ten.
    let uri = format!("{}&serverSelectionTimeoutMS=1000", set.uri());
    let builder = Daemon::builder(&uri, &database).config(SHORT_LEASE);

    // Down at start-up.
    set.stop_member(0).await;
    let mut daemon = builder.spawn();
    wait_until(
        Duration::from_secs(30),
        "three failed attempts are logged",
        || {
            let failures = retry_backoffs(&daemon.logs()).len();
            async move { failures >= 3 }
        },
    )
    .await;
    assert!(
        is_running(daemon.pid()),
        "the daemon exited while the server was down"
    );
    assert!(!daemon.logs().contains("\"Ready.\""));
    let start_backoffs = retry_backoffs(&daemon.logs());
    assert_eq!(
        start_backoffs[..3],
        [500, 1_000, 2_000],
        "{start_backoffs:?}"
    );
    set.restart_member(0).await;
    set.wait_for_primary(Duration::from_secs(60)).await;
    daemon.wait_ready(Duration::from_secs(60)).await;

    // Down in the middle of a load.
    let spec = Spec {
        documents: 3_000,
        entities: 80,
        days: 3,
        invalid_percent: 3,
    };
    let staged = generate(spec, &mut rng);
    let (first_half, second_half) = staged.split_at(spec.documents / 2);
    let client = set.client().await;
    let db = client.database(&database);
    insert_in_order(&db, first_half, 100, Duration::ZERO).await;
    wait_until(
        Duration::from_secs(30),
        "the daemon is merging the first half",
        || {
            let db = db.clone();
            async move { committed_totals(&db).await.0 > 0 }
        },
    )
    .await;
    let failures_before = retry_backoffs(&daemon.logs()).len();
    set.stop_member(0).await;
    let stopped_at = Instant::now();
    // The first failure comes only after the merge transaction's own retries give up.
    wait_until(
        Duration::from_secs(45),
        "failures during the outage are logged",
        || {
            let failures = retry_backoffs(&daemon.logs()).len();
            async move { failures >= failures_before + 2 }
        },
    )
    .await;
    let outage = stopped_at.elapsed();
    assert!(
        is_running(daemon.pid()),
        "the daemon exited while the server was down"
    );
    set.restart_member(0).await;
    set.wait_for_primary(Duration::from_secs(60)).await;
    let client = set.client().await;
    let db = client.database(&database);
    insert_in_order(&db, second_half, 100, Duration::ZERO).await;
    wait_committed(&db, spec.documents, Duration::from_secs(90)).await;

    let expected = replay(&read_staging(&db, &STAGING).await);
    assert_eq!(expected.documents, spec.documents);
    assert_committed_once(&db, &expected).await;
    assert_no_duplicate_keys(&db).await;
    let compared = assert_matches(&db, &expected).await;
    let backoffs = retry_backoffs(&daemon.logs());
    assert_capped_doubling(&backoffs);
    assert!(is_running(daemon.pid()));
    assert!(daemon.terminate().await.success());

    summary(
        "outage_at_start_and_mid_run",
        &format!(
            "server down at start-up ({} failed attempts) and for {outage:.0?} under load ({} \
             failed attempts), backoffs {backoffs:?} ms, never exited; {} staging inserts, {} \
             targets and {} rejects equal the reference model, each event committed once; \
             seed {seed}, {:.0?}",
            start_backoffs.len(),
            backoffs.len() - failures_before,
            compared.documents,
            compared.targets,
            compared.rejects,
            started.elapsed()
        ),
    );
}
