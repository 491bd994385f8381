//! Process lifecycle of the real binary: resuming from the stored token after a crash or a
//! stop, SIGTERM, the standalone refusal and `check-config`.

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use futures::TryStreamExt;
use mongodb::bson::{doc, Document};
use mongodb::{Collection, Database};

use crate::support::{
    self, committed_totals, run_cli, scratch_dir, shared_replica_set, unique_database, Daemon,
    Standalone,
};

const READY_TIMEOUT: Duration = Duration::from_secs(60);
const MERGE_TIMEOUT: Duration = Duration::from_secs(30);
const SHORT_LEASE: &str = "[lease]\nttl_seconds = 2\n";

fn metrics_doc(name: &str, cases: i32) -> Document {
    doc! { "entity_name": name, "entity_type": "dpe", "date": "2025-09-25", "sct": 1.5, "cases": cases }
}

async fn committed_events(db: &Database) -> i64 {
    committed_totals(db).await.events
}

async fn wait_committed(db: &Database, events: i64) {
    support::wait_committed(db, events, MERGE_TIMEOUT).await;
}

async fn targets(db: &Database) -> Vec<Document> {
    let target: Collection<Document> = db.collection("performance_data");
    let cursor = target
        .find(doc! {})
        .sort(doc! { "entity_name": 1 })
        .await
        .unwrap();
    cursor.try_collect().await.unwrap()
}

/// After SIGKILL the daemon resumes from the stored token: changes written while it was down
/// are merged, and nothing committed before the crash is applied again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_from_stored_token() {
    let set = shared_replica_set();
    let database = unique_database("restart_resume");
    // A short lease, so the restarted daemon need not wait long for the killed one's lease.
    let builder = Daemon::builder(set.uri(), &database).config(SHORT_LEASE);
    let db = set.client().await.database(&database);
    let staging: Collection<Document> = db.collection("staging_metrics");

    let mut daemon = builder.spawn();
    daemon.wait_ready(READY_TIMEOUT).await;
    let before: Vec<Document> = (0..50)
        .map(|index| metrics_doc(&format!("Before {index:02}"), index))
        .collect();
    staging.insert_many(before).await.unwrap();
    wait_committed(&db, 50).await;
    let merged_before = targets(&db).await;
    daemon.kill();

    let after: Vec<Document> = (0..30)
        .map(|index| metrics_doc(&format!("During {index:02}"), index))
        .collect();
    staging.insert_many(after).await.unwrap();
    staging
        .update_one(
            doc! { "entity_name": "Before 07" },
            doc! { "$set": { "cases": 700 } },
        )
        .await
        .unwrap();

    let mut daemon = builder.spawn();
    daemon.wait_ready(READY_TIMEOUT).await;
    wait_committed(&db, 81).await;
    // Give a wrongly replayed batch time to show up before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        committed_events(&db).await,
        81,
        "each change event is committed once"
    );

    let merged_after = targets(&db).await;
    assert_eq!(merged_after.len(), 80);
    for before in &merged_before {
        let name = before.get_str("entity_name").unwrap();
        let after = merged_after
            .iter()
            .find(|document| document.get_str("entity_name") == Ok(name))
            .unwrap();
        if name == "Before 07" {
            assert_eq!(after.get_i32("cases_count").unwrap(), 700);
            continue;
        }
        assert_eq!(
            before.get_datetime("updated_at").unwrap(),
            after.get_datetime("updated_at").unwrap(),
            "{name} was merged again after the restart"
        );
    }
    let logs = daemon.logs();
    assert!(
        logs.contains("Resumed the change stream after the stored position."),
        "{logs}"
    );
    assert!(daemon.terminate().await.success());
}

/// A first run stores its starting position before it reports ready, so a change written
/// while the daemon is stopped after that first run is merged by the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_run_stores_start_position() {
    let set = shared_replica_set();
    let database = unique_database("first_run_position");
    let builder = Daemon::builder(set.uri(), &database).config(SHORT_LEASE);
    let db = set.client().await.database(&database);

    let mut daemon = builder.spawn();
    daemon.wait_ready(READY_TIMEOUT).await;
    let logs = daemon.logs();
    assert!(
        logs.contains("No stored position; started the change stream at the current time"),
        "{logs}"
    );
    daemon.kill();

    let staging: Collection<Document> = db.collection("staging_surveys");
    staging
        .insert_one(doc! { "entity_name": "Late", "entity_type": "dpe", "date": "2025-09-25", "csat": 1, "neutral": 0, "dsat": 0 })
        .await
        .unwrap();
    let mut daemon = builder.spawn();
    daemon.wait_ready(READY_TIMEOUT).await;
    wait_committed(&db, 1).await;
    assert_eq!(targets(&db).await.len(), 1);
    daemon.terminate().await;
}

/// SIGTERM stops the daemon with exit code 0 within a few seconds and logs the signal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_zero() {
    let set = shared_replica_set();
    let database = unique_database("sigterm");
    let mut daemon = Daemon::spawn(set.uri(), &database, "");
    daemon.wait_ready(READY_TIMEOUT).await;
    let started = std::time::Instant::now();
    let status = daemon.terminate().await;
    assert_eq!(status.code(), Some(0), "{}", daemon.logs());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    let logs = daemon.logs();
    assert!(logs.contains("\"signal\":\"SIGTERM\""), "{logs}");
    assert!(logs.contains("\"Stopped.\""), "{logs}");
}

/// A second SIGINT during shutdown is not needed for a clean stop, and SIGINT alone exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_exits_zero() {
    let set = shared_replica_set();
    let database = unique_database("sigint");
    let mut daemon = Daemon::spawn(set.uri(), &database, "");
    daemon.wait_ready(READY_TIMEOUT).await;
    daemon.send_signal(libc::SIGINT);
    let status = daemon.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "{}", daemon.logs());
    assert_eq!(status.signal(), None);
}

/// A standalone mongod gets the clear error and exit code 2, whether or not the URI names
/// a replica set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_exits_two() {
    let standalone = Standalone::start().await;
    let plain = format!("mongodb://127.0.0.1:{}/", standalone.port());
    let with_set = format!("mongodb://127.0.0.1:{}/?replicaSet=rs0", standalone.port());
    for uri in [plain, with_set] {
        let output = run_cli(
            &["run"],
            &[
                ("PERFAGG_MONGODB_URI", &uri),
                ("PERFAGG_DATABASE", "standalone"),
            ],
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{uri}: {stderr}");
        assert!(
            stderr.contains("is a standalone mongod, which has no change streams"),
            "{stderr}"
        );
        assert!(stderr.contains("--replSet"), "{stderr}");
    }
}

/// `check-config` prints the effective settings with the password masked and confirms the
/// connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_masks_password() {
    let set = shared_replica_set();
    let dir = scratch_dir("check_config");
    let path = dir.join("perfagg.toml");
    std::fs::write(
        &path,
        "[batch]\nmax_events = 42\n[merge]\ntimezone = \"Europe/Berlin\"\n",
    )
    .unwrap();
    let uri = set.uri().to_string();
    let output = run_cli(
        &["check-config", "--config", path.to_str().unwrap()],
        &[
            ("PERFAGG_MONGODB_URI", &uri),
            ("PERFAGG_DATABASE", "check_config"),
        ],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("max_events = 42"), "{stdout}");
    assert!(stdout.contains("timezone = \"Europe/Berlin\""), "{stdout}");
    assert!(stdout.contains("database = \"check_config\""), "{stdout}");
    assert!(stdout.contains("replica set rs0"), "{stdout}");

    // The shared set has no users, so a made-up password fails authentication: a fatal
    // error whose message must still show the URI only masked.
    let secret = uri.replacen("mongodb://", "mongodb://app:hunter2@", 1);
    let output = run_cli(
        &["check-config", "--config", path.to_str().unwrap()],
        &[("PERFAGG_MONGODB_URI", &secret)],
    );
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(output.status.code(), Some(1), "{all}");
    assert!(!all.contains("hunter2"), "{all}");
    assert!(
        all.contains("authentication to mongodb://app:****@"),
        "{all}"
    );
}

/// An invalid configuration names the key and the file and exits 1 before connecting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_config_exits_one() {
    let dir = scratch_dir("invalid_config");
    let path = dir.join("bad.toml");
    std::fs::write(
        &path,
        "[batch]\nmax_events = 0\n[merge]\ntimezone = \"Nowhere/City\"\nunknown = 1\n",
    )
    .unwrap();
    let output = run_cli(&["run", "--config", path.to_str().unwrap()], &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(path.to_str().unwrap()), "{stderr}");
    assert!(stderr.contains("merge.unknown"), "{stderr}");

    std::fs::write(
        &path,
        "[batch]\nmax_events = 0\n[merge]\ntimezone = \"Nowhere/City\"\n",
    )
    .unwrap();
    let output = run_cli(&["check-config", "--config", path.to_str().unwrap()], &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("`batch.max_events`: 0 is outside"),
        "{stderr}"
    );
    assert!(
        stderr.contains("unknown time zone `Nowhere/City`"),
        "{stderr}"
    );

    let missing = dir.join("missing.toml");
    let output = run_cli(&["run", "--config", missing.to_str().unwrap()], &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot read configuration file"),
        "{stderr}"
    );
}

/// A URI that names another replica set than the servers belong to gets an error naming
/// both sets, instead of a bare server-selection timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_replica_set_named() {
    let set = shared_replica_set();
    let uri = set.uri().replace("replicaSet=rs0", "replicaSet=production");
    assert_ne!(uri, set.uri(), "the shared set's URI names rs0");
    let output = run_cli(&["check-config"], &[("PERFAGG_MONGODB_URI", &uri)]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("names replica set `production`"),
        "{stderr}"
    );
    assert!(stderr.contains("is a member of `rs0`"), "{stderr}");
}

/// A command line that cannot be parsed exits 1, never 2, which means "no change streams".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_error_exits_one() {
    for args in [vec!["frobnicate"], vec!["run", "--bogus"], vec![]] {
        let output = run_cli(&args, &[]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains("Usage"), "{args:?}: {stderr}");
    }
    let output = run_cli(&["--version"], &[]);
    assert_eq!(output.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("perfagg "));
}
