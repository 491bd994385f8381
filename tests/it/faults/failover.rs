//! Replica-set failover under load: a three-member set on loopback ports whose primary
//! steps down, and in a second run dies with SIGKILL.

use std::time::{Duration, Instant};

use super::load::{generate, insert_through_failover, seed, Rng, Spec};
use super::model::{
    assert_committed_once, assert_matches, assert_no_duplicate_keys, committed_totals,
    read_staging, replay, wait_committed, STAGING,
};
use super::{count_messages, summary, READY_TIMEOUT};
use crate::support::{unique_database, wait_until, Daemon, ReplicaSet};

/// Staging documents per run.
const DOCUMENTS: usize = 3_000;

/// How the primary goes away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    StepDown,
    Kill,
}

/// Runs a daemon on its own database of `set` under load, applies `fault` to the primary
/// once a fifth of the load is merged, and checks the final data against the reference
/// model. Returns the run's summary.
async fn run_through_fault(set: &mut ReplicaSet, fault: Fault, rng: &mut Rng) -> String {
    let started = Instant::now();
    let database = unique_database(&format!("failover_{fault:?}"));
    let mut daemon = Daemon::builder(&set.uri(), &database)
        .config("[lease]\nttl_seconds = 2\n[batch]\nmax_events = 100\nmax_wait_ms = 50\n")
        .spawn();
    daemon.wait_ready(READY_TIMEOUT).await;
    let client = set.client().await;
    let db = client.database(&database);
    let spec = Spec {
        documents: DOCUMENTS,
        entities: 80,
        days: 3,
        invalid_percent: 3,
    };
    let staged = generate(spec, rng);
    let writer = {
        let db = db.clone();
        tokio::spawn(async move {
            insert_through_failover(&db, &staged, 60, Duration::from_millis(20)).await
        })
    };
    wait_until(
        Duration::from_secs(60),
        "a fifth of the load is merged",
        || {
            let db = db.clone();
            async move { committed_totals(&db).await.0 as usize >= DOCUMENTS / 5 }
        },
    )
    .await;

    let old_primary = set.wait_for_primary(Duration::from_secs(60)).await;
    match fault {
        Fault::StepDown => {
            set.step_down_primary().await;
        }
        Fault::Kill => set.kill_member(old_primary),
    }
    let new_primary = set.wait_for_primary(Duration::from_secs(60)).await;
    assert_ne!(new_primary, old_primary);
    let insert_failures = writer.await.unwrap();
    wait_committed(&db, DOCUMENTS, Duration::from_secs(120)).await;

    let expected = replay(&read_staging(&db, &STAGING).await);
    assert_eq!(expected.documents, DOCUMENTS);
    assert_committed_once(&db, &expected).await;
    assert_no_duplicate_keys(&db).await;
    let compared = assert_matches(&db, &expected).await;
    let logs = daemon.logs();
    assert!(daemon.terminate().await.success());

    format!(
        "{fault:?} of primary member {old_primary} (member {new_primary} took over) during \
         {DOCUMENTS} staging inserts ({insert_failures} failed inserts retried by the writer); \
         the daemon logged {} transaction retries, {} unknown commit results, {} reconnects and \
         {} resumes from the stored token; {} targets and {} rejects equal the reference \
         model, each event committed once; {:.0?}",
        count_messages(&logs, "Retrying the merge transaction."),
        count_messages(&logs, "Commit result unknown; committing again."),
        count_messages(
            &logs,
            "MongoDB operation failed; starting over from the stored position."
        ),
        count_messages(
            &logs,
            "Resumed the change stream after the stored position."
        ),
        compared.targets,
        compared.rejects,
        started.elapsed()
    )
}

/// On a three-member replica set, a primary that steps down under load, and in a second
/// run a primary killed with SIGKILL, leave the final data equal to the reference model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_step_down_and_kill() {
    let seed = seed();
    let mut rng = Rng::new(seed);
    let mut set = ReplicaSet::start(3).await;

    let step_down = run_through_fault(&mut set, Fault::StepDown, &mut rng).await;
    summary(
        "failover_step_down_and_kill",
        &format!("{step_down}; seed {seed}"),
    );
    let kill = run_through_fault(&mut set, Fault::Kill, &mut rng).await;
    summary(
        "failover_step_down_and_kill",
        &format!("{kill}; seed {seed}"),
    );
}
