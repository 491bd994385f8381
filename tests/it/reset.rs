//! Reprocessing: `perfagg reset` in each mode with the daemon running and stopped, compared
//! against the incremental result, and `perfagg status`.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::TryStreamExt;
use mongodb::bson::{doc, Document};
use mongodb::{Collection, Database};

use crate::support::{
    run_cli, shared_replica_set, unique_database, wait_committed, wait_until, Daemon, DaemonBuilder,
};

const READY_TIMEOUT: Duration = Duration::from_secs(60);
const RESET_TIMEOUT: Duration = Duration::from_secs(120);
const CONFIG: &str = "[lease]\nttl_seconds = 2\n[batch]\nmax_events = 200\n";

/// A database of the shared replica set with a daemon builder and collection handles.
struct Setup {
    builder: DaemonBuilder,
    db: Database,
    database: String,
}

impl Setup {
    async fn new(name: &str) -> Setup {
        let set = shared_replica_set();
        let database = unique_database(name);
        let builder = Daemon::builder(set.uri(), &database).config(CONFIG);
        let db = set.client().await.database(&database);
        Setup {
            builder,
            db,
            database,
        }
    }

    async fn start_daemon(&self) -> Daemon {
        let mut daemon = self.builder.spawn();
        daemon.wait_ready(READY_TIMEOUT).await;
        daemon
    }

    fn coll(&self, name: &str) -> Collection<Document> {
        self.db.collection(name)
    }

    /// Runs `perfagg ARGS` against this database and returns (exit code, stdout, stderr).
    fn cli(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let uri = shared_replica_set().uri().to_string();
        let output = run_cli(
            args,
            &[
                ("PERFAGG_MONGODB_URI", &uri),
                ("PERFAGG_DATABASE", &self.database),
            ],
        );
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    fn reset(&self, args: &[&str]) {
        let mut all = vec!["reset"];
        all.extend_from_slice(args);
        all.push("--yes");
        let (code, stdout, stderr) = self.cli(&all);
        assert_eq!(code, Some(0), "reset {args:?} failed:\n{stdout}\n{stderr}");
        assert!(stdout.contains("accepted"), "{stdout}");
    }

    async fn wait_committed(&self, events: i64) {
        wait_committed(&self.db, events, RESET_TIMEOUT).await;
    }

    /// Waits until every reset request is done.
    async fn wait_resets_done(&self, count: u64) {
        let state = self.coll("perfagg_state");
        wait_until(RESET_TIMEOUT, &format!("{count} resets done"), || {
            let state = state.clone();
            async move {
                state
                    .count_documents(doc! { "kind": "reset", "status": "done" })
                    .await
                    .unwrap()
                    >= count
            }
        })
        .await;
    }

    /// Returns the target documents by key, with the named fields removed.
    async fn targets_without(&self, ignored: &[&str]) -> BTreeMap<String, Document> {
        let cursor = self.coll("performance_data").find(doc! {}).await.unwrap();
        let documents: Vec<Document> = cursor.try_collect().await.unwrap();
        documents
            .into_iter()
            .map(|mut document| {
                document.remove("_id");
                for path in ignored {
                    remove_path(&mut document, path);
                }
                let key = format!(
                    "{}/{}/{}",
                    document.get_str("entity_name").unwrap(),
                    document.get_str("entity_type").unwrap(),
                    document.get_str("date").unwrap()
                );
                (key, document)
            })
            .collect()
    }
}

fn remove_path(document: &mut Document, path: &str) {
    match path.split_once('.') {
        Some((head, rest)) => {
            if let Ok(inner) = document.get_document_mut(head) {
                remove_path(inner, rest);
            }
        }
        None => {
            document.remove(path);
        }
    }
}

/// Staging documents for `keys` entities over three days, `rounds` versions each, in
/// insertion order; survey counts vary so satisfaction is computed, not defaulted.
fn load(keys: usize, rounds: usize) -> (Vec<Document>, Vec<Document>) {
    let mut metrics = Vec::new();
    let mut surveys = Vec::new();
    for round in 0..rounds {
        let (round_metrics, round_surveys) = load_round(keys, round);
        metrics.extend(round_metrics);
        surveys.extend(round_surveys);
    }
    (metrics, surveys)
}

/// One version of the staging documents of [`load`].
fn load_round(keys: usize, round: usize) -> (Vec<Document>, Vec<Document>) {
    let mut metrics = Vec::new();
    let mut surveys = Vec::new();
    for key in 0..keys {
        let name = format!("Agent {key:03}");
        let date = format!("2025-09-{:02}", 20 + key % 3);
        metrics.push(doc! {
            "entity_name": &name, "entity_type": "dpe", "date": &date,
            "sct": (round * 10 + key % 7) as f64 / 4.0, "cases": (round + key) as i32,
            "sample_cases": [format!("C-{round}-{key}")],
        });
        let csat = ((key + round) % 9) as i32;
        surveys.push(doc! {
            "entity_name": &name, "entity_type": "dpe", "date": &date,
            "csat": csat, "neutral": (round % 3 + 1) as i32, "dsat": (key % 2) as i32,
            "survey_details": [{ "round": round as i32 }],
        });
    }
    (metrics, surveys)
}

/// Replaying the change stream from before a load gives the documents the load produced,
/// except `updated_at`; the daemon keeps running through the reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_since_replay_equals_original() {
    let setup = Setup::new("reset_since").await;
    let mut daemon = setup.start_daemon().await;
    // Cluster times have whole seconds, so the replay time must fall at least one second
    // after the (possibly just started) replica set's first oplog entry.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let before_load = chrono::Utc::now();
    let (metrics, surveys) = load(150, 5);
    let events = (metrics.len() + surveys.len()) as i64;
    setup
        .coll("staging_metrics")
        .insert_many(metrics)
        .await
        .unwrap();
    setup
        .coll("staging_surveys")
        .insert_many(surveys)
        .await
        .unwrap();
    setup.wait_committed(events).await;
    let original = setup.targets_without(&["updated_at"]).await;

    setup.reset(&["--since", &before_load.to_rfc3339()]);
    setup.wait_resets_done(1).await;
    setup.wait_committed(2 * events).await;
    let replayed = setup.targets_without(&["updated_at"]).await;

    assert_eq!(original.len(), 150);
    assert_eq!(replayed, original);
    let logs = daemon.logs();
    assert!(
        logs.contains("A reset was requested; restarting the pipeline to perform it."),
        "{logs}"
    );
    assert!(
        logs.contains("Replaying the change stream from the time a reset set."),
        "{logs}"
    );
    eprintln!(
        "reset --since: {events} events replayed, {} target documents compared",
        replayed.len()
    );
    assert_eq!(daemon.terminate().await.code(), Some(0));
}

/// A rebuild with the daemon stopped gives the incremental result, keeps other writers'
/// fields, and rejects invalid documents again without duplicating their rejects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_rebuild_equals_incremental() {
    let setup = Setup::new("reset_rebuild").await;
    let mut daemon = setup.start_daemon().await;
    let (metrics, surveys) = load(80, 3);
    let mut events = (metrics.len() + surveys.len()) as i64;
    setup
        .coll("staging_metrics")
        .insert_many(metrics)
        .await
        .unwrap();
    setup
        .coll("staging_surveys")
        .insert_many(surveys)
        .await
        .unwrap();
    let invalid = vec![
        doc! { "entity_name": "Broken", "entity_type": "dpe", "date": "2025-09-20", "sct": "abc", "cases": 1 },
        doc! { "entity_name": "Broken", "entity_type": "dpe", "date": "13/05/2024", "sct": 1, "cases": 1 },
    ];
    events += invalid.len() as i64;
    setup
        .coll("staging_metrics")
        .insert_many(invalid)
        .await
        .unwrap();
    setup.wait_committed(events).await;
    setup
        .coll("performance_data")
        .update_one(
            doc! { "entity_name": "Agent 001" },
            doc! { "$set": { "notes": "checked", "metrics.fcr": 0.8 } },
        )
        .await
        .unwrap();
    setup
        .coll("performance_data")
        .insert_one(doc! { "entity_name": "Manual", "entity_type": "team", "date": "2025-09-20", "notes": "by hand" })
        .await
        .unwrap();
    assert_eq!(daemon.terminate().await.code(), Some(0));
    let timestamps = [
        "created_at",
        "updated_at",
        "sources.metrics.cluster_time",
        "sources.surveys.cluster_time",
    ];
    let incremental = setup.targets_without(&timestamps).await;
    let rejects_before = setup
        .coll("staging_rejects")
        .count_documents(doc! {})
        .await
        .unwrap();

    setup.reset(&["--rebuild"]);
    let (_, status, _) = setup.cli(&["status"]);
    assert!(status.contains("pending reset:   rebuild"), "{status}");
    let mut daemon = setup.start_daemon().await;
    setup.wait_resets_done(1).await;
    let rebuilt = setup.targets_without(&timestamps).await;

    assert_eq!(rebuilt.len(), incremental.len());
    assert_eq!(rebuilt, incremental);
    assert_eq!(
        rebuilt["Agent 001/dpe/2025-09-21"]
            .get_str("notes")
            .unwrap(),
        "checked"
    );
    assert_eq!(
        rebuilt["Manual/team/2025-09-20"].get_str("notes").unwrap(),
        "by hand"
    );
    assert_eq!(rejects_before, 2);
    assert_eq!(
        setup
            .coll("staging_rejects")
            .count_documents(doc! {})
            .await
            .unwrap(),
        2
    );
    let done = setup
        .coll("perfagg_state")
        .find_one(doc! { "kind": "reset" })
        .await
        .unwrap()
        .unwrap();
    let detail = done.get_document("detail").unwrap();
    assert_eq!(detail.get_i64("rescanned").unwrap(), events);
    assert_eq!(detail.get_i64("rejected").unwrap(), 2);
    eprintln!(
        "reset --rebuild: {events} staging documents rescanned, {} target documents compared",
        rebuilt.len()
    );
    assert_eq!(daemon.terminate().await.code(), Some(0));
}

/// The reference result for one key: (sct, cases) of the last metrics document and the
/// satisfaction of the last survey.
#[derive(Debug, Default)]
struct Expected {
    metrics: Option<(f64, i32)>,
    satisfaction: Option<i32>,
}

/// A rescan requested while a writer keeps inserting ends at the reference result computed
/// from the staging collections in insertion order: nothing written during the rescan is
/// lost or applied out of order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_rescan_during_writes() {
    let setup = Setup::new("reset_rescan").await;
    let mut daemon = setup.start_daemon().await;
    let staging_metrics = setup.coll("staging_metrics");
    let staging_surveys = setup.coll("staging_surveys");
    let state = setup.coll("perfagg_state");

    // The writer goes on until three rounds after the reset is done, so the rescan always
    // runs while writes arrive.
    let writer = tokio::spawn(async move {
        let mut written = 0_i64;
        let mut rounds_after_done = 0;
        for round in 0..200 {
            let (metrics, surveys) = load_round(100, round);
            written += (metrics.len() + surveys.len()) as i64;
            staging_metrics.insert_many(metrics).await.unwrap();
            staging_surveys.insert_many(surveys).await.unwrap();
            let done = state
                .count_documents(doc! { "kind": "reset", "status": "done" })
                .await
                .unwrap();
            if done > 0 {
                rounds_after_done += 1;
                if rounds_after_done == 3 {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        written
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    setup.reset(&["--rescan"]);
    let written = writer.await.unwrap();
    setup.wait_resets_done(1).await;
    // The stream is ordered, so once a last document is merged, every earlier one is too.
    // Committed totals cannot tell, because they count rescanned documents as well.
    let sentinel = doc! { "entity_name": "Sentinel", "entity_type": "dpe", "date": "2025-09-25", "sct": 1, "cases": 1 };
    setup
        .coll("staging_metrics")
        .insert_one(sentinel)
        .await
        .unwrap();
    let target = setup.coll("performance_data");
    wait_until(RESET_TIMEOUT, "the sentinel is merged", || {
        let target = target.clone();
        async move {
            target
                .find_one(doc! { "entity_name": "Sentinel" })
                .await
                .unwrap()
                .is_some()
        }
    })
    .await;

    // The reference: within each source, the last staging document per key in insertion
    // order sets that source's fields.
    let mut expected: BTreeMap<String, Expected> = BTreeMap::new();
    for (name, is_metrics) in [("staging_metrics", true), ("staging_surveys", false)] {
        let cursor = setup
            .coll(name)
            .find(doc! {})
            .sort(doc! { "$natural": 1 })
            .await
            .unwrap();
        let documents: Vec<Document> = cursor.try_collect().await.unwrap();
        for document in documents {
            if document.get_str("entity_name") == Ok("Sentinel") {
                continue;
            }
            let key = format!(
                "{}/dpe/{}",
                document.get_str("entity_name").unwrap(),
                document.get_str("date").unwrap()
            );
            let entry = expected.entry(key).or_default();
            if is_metrics {
                entry.metrics = Some((
                    document.get_f64("sct").unwrap(),
                    document.get_i32("cases").unwrap(),
                ));
            } else {
                let csat = document.get_i32("csat").unwrap();
                let total =
                    csat + document.get_i32("neutral").unwrap() + document.get_i32("dsat").unwrap();
                entry.satisfaction = Some((200 * csat + total) / (2 * total));
            }
        }
    }
    let mut merged = setup.targets_without(&[]).await;
    merged.remove("Sentinel/dpe/2025-09-25");
    assert_eq!(merged.len(), expected.len());
    for (
        key,
        Expected {
            metrics,
            satisfaction,
        },
    ) in &expected
    {
        let document = merged[key].get_document("metrics").unwrap();
        let (sct, cases) = metrics.unwrap();
        assert_eq!(document.get_f64("sct").unwrap(), sct, "{key}");
        assert_eq!(document.get_i32("cases").unwrap(), cases, "{key}");
        assert_eq!(
            document.get_i32("satisfaction").unwrap(),
            satisfaction.unwrap(),
            "{key}"
        );
    }
    let reset = setup
        .coll("perfagg_state")
        .find_one(doc! { "kind": "reset" })
        .await
        .unwrap()
        .unwrap();
    let rescanned = reset
        .get_document("detail")
        .unwrap()
        .get_i64("rescanned")
        .unwrap();
    assert!(
        rescanned > 0 && rescanned < written,
        "rescanned {rescanned} of {written}"
    );
    eprintln!(
        "reset --rescan during writes: {written} staging documents, {rescanned} rescanned, {} target documents compared",
        merged.len()
    );
    assert_eq!(daemon.terminate().await.code(), Some(0));
}

/// `--to-now` skips what was written while the daemon was stopped and merges what follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_to_now_skips_backlog() {
    let setup = Setup::new("reset_to_now").await;
    let mut daemon = setup.start_daemon().await;
    assert_eq!(daemon.terminate().await.code(), Some(0));
    let skipped = doc! { "entity_name": "Skipped", "entity_type": "dpe", "date": "2025-09-25", "sct": 1, "cases": 1 };
    setup
        .coll("staging_metrics")
        .insert_one(skipped)
        .await
        .unwrap();
    setup.reset(&["--to-now"]);

    let mut daemon = setup.start_daemon().await;
    setup.wait_resets_done(1).await;
    let merged = doc! { "entity_name": "Merged", "entity_type": "dpe", "date": "2025-09-25", "sct": 1, "cases": 1 };
    setup
        .coll("staging_metrics")
        .insert_one(merged)
        .await
        .unwrap();
    setup.wait_committed(1).await;
    let targets = setup.targets_without(&[]).await;
    assert_eq!(
        targets.keys().cloned().collect::<Vec<_>>(),
        vec!["Merged/dpe/2025-09-25".to_string()]
    );
    assert!(daemon.logs().contains("Skipping the backlog"));
    assert_eq!(daemon.terminate().await.code(), Some(0));
}

/// Requests that cannot succeed are rejected with a message that explains what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_refuses_invalid_requests() {
    let setup = Setup::new("reset_refusals").await;
    let (code, _, stderr) = setup.cli(&["reset", "--to-now", "--yes"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("so perfagg has never run on it"),
        "{stderr}"
    );
    assert!(stderr.contains("PERFAGG_DATABASE"), "{stderr}");
    let staging = doc! { "entity_name": "A", "entity_type": "dpe", "date": "2025-09-25", "sct": 1, "cases": 1 };
    setup
        .coll("staging_metrics")
        .insert_one(staging)
        .await
        .unwrap();

    let (code, _, stderr) = setup.cli(&["reset", "--since", "2001-01-01T00:00:00Z", "--yes"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("outside the oplog window"), "{stderr}");
    assert!(
        stderr.contains("the oldest time still available is"),
        "{stderr}"
    );
    assert!(stderr.contains("--rescan"), "{stderr}");

    let (code, stdout, stderr) = setup.cli(&["reset", "--to-now"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stdout.contains("continue from the current time"),
        "the plan is shown: {stdout}"
    );
    assert!(stderr.contains("not a terminal"), "{stderr}");
    assert!(stderr.contains("--yes"), "{stderr}");

    let (code, _, stderr) = setup.cli(&["reset", "--since", "yesterday", "--yes"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("`yesterday` is not a time"), "{stderr}");
    assert!(stderr.contains("RFC 3339"), "{stderr}");

    let (code, _, stderr) = setup.cli(&["reset", "--yes"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("say what to reset"), "{stderr}");

    let requests = setup
        .coll("perfagg_state")
        .count_documents(doc! { "kind": "reset" })
        .await
        .unwrap();
    assert_eq!(requests, 0, "refused requests store nothing");
}

/// `status --json` reports the position, lag, lease, counts and the last reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_position_and_lease() {
    let setup = Setup::new("status_json").await;
    let mut daemon = setup.start_daemon().await;
    setup
        .coll("staging_metrics")
        .insert_many(vec![
            doc! { "entity_name": "A", "entity_type": "dpe", "date": "2025-09-25", "sct": 1, "cases": 1 },
            doc! { "entity_name": "B", "entity_type": "dpe", "date": "2025-09-25", "sct": "x", "cases": 1 },
        ])
        .await
        .unwrap();
    setup.wait_committed(2).await;

    let (code, stdout, stderr) = setup.cli(&["status", "--json"]);
    assert_eq!(code, Some(0), "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["target_documents"], 1, "{report}");
    assert_eq!(report["rejects"], 1, "{report}");
    assert_eq!(report["totals"]["events"], 2, "{report}");
    assert!(report["position"]["cluster_time"].is_string(), "{report}");
    assert!(
        report["position"]["resume_token"]["_data"].is_string(),
        "{report}"
    );
    assert_eq!(report["behind_seconds"], 0, "{report}");
    assert_eq!(report["lease"]["expired"], false, "{report}");
    assert!(
        report["lease"]["holder"].as_str().unwrap().contains(':'),
        "{report}"
    );
    assert!(report["pending_reset"].is_null(), "{report}");
    assert_eq!(report["position_in_oplog_window"], true, "{report}");
    assert!(report["oplog_oldest"].is_string(), "{report}");

    setup.reset(&["--to-now"]);
    setup.wait_resets_done(1).await;
    let (_, text, _) = setup.cli(&["status"]);
    assert!(text.contains("recent resets:"), "{text}");
    assert!(text.contains("to_now"), "{text}");
    assert!(text.contains(": done"), "{text}");
    assert!(text.contains("target docs:     1"), "{text}");
    assert_eq!(daemon.terminate().await.code(), Some(0));
}
