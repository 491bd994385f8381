//! The lease: one active instance at a time, standby takeover, and the epoch fence that
//! keeps a paused leader from committing after another one took over.

use std::time::{Duration, Instant};

use futures::TryStreamExt;
use mongodb::bson::{doc, Document};
use mongodb::Database;

use super::load::{generate, insert_in_order, seed, Rng, Spec};
use super::model::{
    assert_committed_once, assert_matches, assert_no_duplicate_keys, read_staging, replay,
    wait_committed, STAGING,
};
use super::{
    count_messages, fail_commands, log_lines, summary, LogLine, PERFAGG_APP_NAME, READY_TIMEOUT,
    SHORT_LEASE,
};
use crate::support::{shared_replica_set, unique_database, wait_until, Daemon, ReplicaSet};

/// Returns whether the server is running a `commitTransaction` sent by perfagg.
async fn perfagg_commit_running(admin: &Database) -> bool {
    let operations: Vec<Document> = admin
        .aggregate([
            doc! { "$currentOp": { "allUsers": true } },
            doc! { "$match": { "appName": PERFAGG_APP_NAME, "command.commitTransaction": { "$exists": true } } },
        ])
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    !operations.is_empty()
}

/// An instance that takes over from one killed inside a commit ends the dead one's open
/// transaction at once, instead of stalling until the server expires it after 60 seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_ends_crashed_leader_transaction() {
    let started = Instant::now();
    let set = ReplicaSet::start(1).await;
    let client = set.client().await;
    let database = unique_database("takeover_ends_transaction");
    let db = client.database(&database);
    let builder = Daemon::builder(&set.uri(), &database).config(SHORT_LEASE);
    let mut crashed = builder.spawn();
    crashed.wait_ready(READY_TIMEOUT).await;

    // Hold the first commit on the server, then kill the daemon while it waits: its
    // transaction, with the target and the stream document written, stays open.
    fail_commands(
        &client,
        doc! { "times": 1 }.into(),
        doc! {
            "failCommands": ["commitTransaction"],
            "blockConnection": true,
            "blockTimeMS": 1_000,
            "errorCode": 11_600,
        },
    )
    .await;
    db.collection::<Document>("staging_metrics")
        .insert_one(doc! { "entity_name": "Crash", "entity_type": "dpe", "date": "2025-09-25", "sct": 1.5, "cases": 2 })
        .await
        .unwrap();
    let admin = client.database("admin");
    wait_until(
        Duration::from_secs(30),
        "perfagg's commit is held by the fail point",
        || perfagg_commit_running(&admin),
    )
    .await;
    crashed.kill();

    let takeover_started = Instant::now();
    let mut takeover = builder.spawn();
    takeover.wait_ready(Duration::from_secs(20)).await;
    let ready_after = takeover_started.elapsed();
    wait_committed(&db, 1, Duration::from_secs(20)).await;
    let committed_after = takeover_started.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(super::model::committed_totals(&db).await, (1, 1, 0));
    let target = db
        .collection::<Document>("performance_data")
        .find_one(doc! { "entity_name": "Crash" })
        .await
        .unwrap()
        .expect("the change held in the dead transaction is merged by the new leader");
    assert_eq!(target.get_i32("cases_count"), Ok(2));
    assert!(takeover.terminate().await.success());

    summary(
        "takeover_ends_crashed_leader_transaction",
        &format!(
            "leader killed inside a held commit; the next instance was ready after \
             {ready_after:.1?} and committed the change once after {committed_after:.1?}; {:.0?}",
            started.elapsed()
        ),
    );
}

/// Returns whether `daemon`'s log has a "Ready." line.
fn is_ready(daemon: &Daemon) -> bool {
    daemon.logs().contains("\"Ready.\"")
}

/// Returns the epochs of the "Acquired the lease." lines in `logs`, in order.
fn acquired_epochs(logs: &str) -> Vec<i64> {
    log_lines(logs)
        .iter()
        .filter(|line| line.message == "Acquired the lease.")
        .map(|line| line.fields["epoch"].as_i64().unwrap())
        .collect()
}

/// Parses a stream position from a log field: `seconds.increment`, optionally followed by the
/// wall time.
fn position_of(line: &LogLine) -> (u64, u64) {
    let text = line.fields["position"].as_str().unwrap();
    let cluster_time = text.split_whitespace().next().unwrap();
    let (seconds, increment) = cluster_time.split_once('.').unwrap();
    (seconds.parse().unwrap(), increment.parse().unwrap())
}

/// Returns the stream positions committed under each epoch that an instance held, from its log.
fn commits_by_epoch(logs: &str) -> Vec<(i64, Vec<(u64, u64)>)> {
    let mut epochs: Vec<(i64, Vec<(u64, u64)>)> = Vec::new();
    for line in log_lines(logs) {
        match line.message.as_str() {
            "Acquired the lease." => {
                epochs.push((line.fields["epoch"].as_i64().unwrap(), Vec::new()))
            }
            "Committed batch." => epochs
                .last_mut()
                .unwrap_or_else(|| panic!("a batch was committed without the lease: {line:?}"))
                .1
                .push(position_of(&line)),
            _ => {}
        }
    }
    epochs
}

/// Asserts one leader at a time, judged by the stream rather than by log timestamps: each
/// epoch was acquired by one instance, and every position committed under an epoch comes
/// before every position committed under a later one.
fn assert_one_leader_at_a_time(logs: &[String]) -> usize {
    let mut epochs: Vec<(i64, Vec<(u64, u64)>)> = logs
        .iter()
        .flat_map(|logs| commits_by_epoch(logs))
        .collect();
    epochs.sort();
    for pair in epochs.windows(2) {
        assert_ne!(
            pair[0].0, pair[1].0,
            "two instances acquired epoch {}",
            pair[0].0
        );
    }
    let with_commits: Vec<&(i64, Vec<(u64, u64)>)> = epochs
        .iter()
        .filter(|(_, positions)| !positions.is_empty())
        .collect();
    for pair in with_commits.windows(2) {
        let (earlier, later) = (pair[0], pair[1]);
        let last_of_earlier = earlier.1.iter().max().unwrap();
        let first_of_later = later.1.iter().min().unwrap();
        assert!(
            last_of_earlier < first_of_later,
            "epoch {} committed position {last_of_earlier:?}, not before epoch {}'s first commit {first_of_later:?}",
            earlier.0,
            later.0
        );
    }
    epochs.len()
}

/// Two instances started together under load: one leads and the other waits as a standby. The
/// leader, paused with SIGSTOP past its lease, is replaced by the standby and after SIGCONT
/// commits nothing. The final data equals the reference model, each change counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_one_leader_exact() {
    let started = Instant::now();
    let seed = seed();
    let mut rng = Rng::new(seed);
    let set = shared_replica_set();
    let database = unique_database("two_instances_one_leader");
    let db = set.client().await.database(&database);
    let builder = Daemon::builder(set.uri(), &database)
        .config("[lease]\nttl_seconds = 2\n[batch]\nmax_events = 100\nmax_wait_ms = 50\n");
    let spec = Spec {
        documents: 6_000,
        entities: 100,
        days: 3,
        invalid_percent: 3,
    };
    let staged = generate(spec, &mut rng);

    let first = builder.spawn();
    let second = builder.spawn();
    wait_until(READY_TIMEOUT, "one of two instances is ready", || {
        let ready = is_ready(&first) || is_ready(&second);
        async move { ready }
    })
    .await;
    let (mut leader, mut standby) = if is_ready(&first) {
        (first, second)
    } else {
        (second, first)
    };
    let writer = {
        let db = db.clone();
        tokio::spawn(
            async move { insert_in_order(&db, &staged, 60, Duration::from_millis(50)).await },
        )
    };

    // While both run, only the leader commits; the other logs who holds the lease.
    wait_until(
        Duration::from_secs(30),
        "the leader commits a batch",
        || {
            let commits = count_messages(&leader.logs(), "Committed batch.");
            async move { commits > 0 }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let standby_logs = standby.logs();
    assert!(
        !is_ready(&standby),
        "two instances are ready: {standby_logs}"
    );
    assert_eq!(
        count_messages(&standby_logs, "Committed batch."),
        0,
        "{standby_logs}"
    );
    let leader_epoch = *acquired_epochs(&leader.logs()).last().unwrap();
    let leader_owner = log_lines(&leader.logs())
        .iter()
        .find(|line| line.message == "Acquired the lease.")
        .map(|line| line.fields["owner"].clone())
        .unwrap();
    let standing_by = log_lines(&standby_logs)
        .into_iter()
        .find(|line| line.message == "Standing by; another instance holds the lease.")
        .unwrap_or_else(|| panic!("the standby does not say it stands by: {standby_logs}"));
    assert_eq!(standing_by.fields["holder"], leader_owner, "{standby_logs}");
    assert_eq!(standing_by.fields["epoch"].as_i64(), Some(leader_epoch));

    // Pause the leader mid-load. Nothing it writes after SIGCONT may be a commit.
    leader.send_signal(libc::SIGSTOP);
    let paused_at = leader.logs().len();
    standby.wait_ready(Duration::from_secs(30)).await;
    let takeover_epoch = *acquired_epochs(&standby.logs()).last().unwrap();
    assert!(
        takeover_epoch > leader_epoch,
        "the takeover epoch {takeover_epoch} is not above {leader_epoch}"
    );
    wait_until(
        Duration::from_secs(30),
        "the new leader commits a batch",
        || {
            let commits = count_messages(&standby.logs(), "Committed batch.");
            async move { commits > 0 }
        },
    )
    .await;
    leader.send_signal(libc::SIGCONT);
    wait_until(
        Duration::from_secs(30),
        "the old leader stands by again",
        || {
            let resumed = leader.logs()[paused_at..].to_string();
            async move { resumed.contains("Lost the lease; standing by.") }
        },
    )
    .await;

    writer.await.unwrap();
    wait_committed(&db, spec.documents, Duration::from_secs(120)).await;
    let expected = replay(&read_staging(&db, &STAGING).await);
    assert_committed_once(&db, &expected).await;
    assert_no_duplicate_keys(&db).await;
    let compared = assert_matches(&db, &expected).await;

    // A "Committed batch." line that the paused leader writes after SIGCONT may belong to
    // a commit acknowledged just before SIGSTOP; one past the takeover's starting position
    // would be a commit after the takeover.
    let takeover_start = log_lines(&standby.logs())
        .iter()
        .rev()
        .find(|line| line.message == "Resumed the change stream after the stored position.")
        .map(position_of)
        .expect("the new leader resumed from the stored position");
    let resumed = leader.logs()[paused_at..].to_string();
    for line in log_lines(&resumed) {
        if line.message == "Committed batch." {
            assert!(
                position_of(&line) <= takeover_start,
                "the paused leader committed past the takeover: {line:?}"
            );
        }
    }
    for line in log_lines(&resumed) {
        eprintln!("DIAG {} {:?}", line.message, line.fields.get("error"));
    }
    let epochs = assert_one_leader_at_a_time(&[leader.logs(), standby.logs()]);
    assert!(standby.terminate().await.success());
    assert!(leader.terminate().await.success());

    summary(
        "two_instances_one_leader_exact",
        &format!(
            "{} staging inserts, 2 instances: epoch {leader_epoch} led while the other stood \
             by, SIGSTOP past the lease, epoch {takeover_epoch} took over, no commit by the old \
             leader after SIGCONT, {epochs} epochs committing in stream order; {} targets and {} \
             rejects equal the reference model; seed {seed}, {:.0?}",
            compared.documents,
            compared.targets,
            compared.rejects,
            started.elapsed()
        ),
    );
}
