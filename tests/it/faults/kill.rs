//! SIGKILL under load: a crash at any moment neither loses nor repeats a staging change.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::load::{generate, insert_in_order, seed, Rng, Spec};
use super::model::{
    assert_committed_once, assert_matches, assert_no_duplicate_keys, committed_totals,
    read_staging, replay, wait_committed, STAGING,
};
use super::{summary, READY_TIMEOUT};
use crate::support::{shared_replica_set, unique_database, Daemon};

/// Staging documents in the load.
const DOCUMENTS: usize = 20_000;
/// Fewest SIGKILLs before the last, uninterrupted run.
const MIN_KILLS: usize = 20;
/// Small batches make many commits, so more kills land inside one.
const CONFIG: &str = "[lease]\nttl_seconds = 2\n[batch]\nmax_events = 200\nmax_wait_ms = 50\n";

/// After at least 20 SIGKILLs at random moments during 20,000 staging inserts, the target
/// and rejects collections equal the reference model and every change counts once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_nine_under_load_exact() {
    let started = Instant::now();
    let seed = seed();
    let mut rng = Rng::new(seed);
    let set = shared_replica_set();
    let database = unique_database("kill_nine_under_load");
    let builder = Daemon::builder(set.uri(), &database).config(CONFIG);
    let db = set.client().await.database(&database);
    let spec = Spec {
        documents: DOCUMENTS,
        entities: 200,
        days: 3,
        invalid_percent: 3,
    };
    let staged = generate(spec, &mut rng);

    // The first run stores its starting position before it reports ready, so the load
    // starts after that.
    let mut daemon = builder.spawn();
    daemon.wait_ready(READY_TIMEOUT).await;
    let inserted = Arc::new(AtomicUsize::new(0));
    let writer = {
        let db = db.clone();
        let inserted = inserted.clone();
        tokio::spawn(async move {
            for part in staged.chunks(500) {
                insert_in_order(&db, part, 100, Duration::from_millis(60)).await;
                inserted.fetch_add(part.len(), Ordering::Relaxed);
            }
        })
    };

    let mut kills = 0;
    let mut kills_with_backlog = 0;
    let mut kills_before_ready = 0;
    loop {
        // Most lives are killed soon after they report ready, while they work through the
        // changes written during the previous one's downtime. The others are killed during
        // start-up: waiting for the lease, claiming the stream document or opening the stream.
        if rng.percent(75) {
            daemon.wait_ready(READY_TIMEOUT).await;
            tokio::time::sleep(rng.millis(0, 700)).await;
        } else {
            tokio::time::sleep(rng.millis(0, 1_800)).await;
        }
        let (committed, _, _) = committed_totals(&db).await;
        if (committed as usize) < inserted.load(Ordering::Relaxed) {
            kills_with_backlog += 1;
        }
        if !daemon.logs().contains("\"Ready.\"") {
            kills_before_ready += 1;
        }
        daemon.kill();
        kills += 1;
        if kills >= MIN_KILLS && writer.is_finished() {
            break;
        }
        daemon = builder.spawn();
    }
    assert!(
        kills_with_backlog >= MIN_KILLS / 2,
        "only {kills_with_backlog} of {kills} kills came while changes were waiting; the load \
         is too light for this test to prove anything"
    );
    writer.await.unwrap();

    let mut daemon = builder.spawn();
    daemon.wait_ready(READY_TIMEOUT).await;
    wait_committed(&db, DOCUMENTS, Duration::from_secs(180)).await;
    let expected = replay(&read_staging(&db, &STAGING).await);
    assert_eq!(expected.documents, DOCUMENTS);
    assert_committed_once(&db, &expected).await;
    assert_no_duplicate_keys(&db).await;
    let compared = assert_matches(&db, &expected).await;
    assert!(daemon.terminate().await.success());

    summary(
        "kill_nine_under_load_exact",
        &format!(
            "{} staging inserts ({} invalid), {kills} SIGKILLs ({kills_with_backlog} with a \
             backlog, {kills_before_ready} before ready); {} targets and {} rejects equal the \
             reference model, each event committed once; seed {seed}, {:.0?}",
            compared.documents,
            expected.rejects.len(),
            compared.targets,
            compared.rejects,
            started.elapsed()
        ),
    );
}
