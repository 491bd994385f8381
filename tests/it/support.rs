//! Test harness for perfagg's integration tests: real mongod servers, the perfagg binary as
//! a child process, unique database names and polling helpers.
//!
//! A typical test takes the shared replica set, a database of its own and a daemon:
//!
//! ```ignore
//! let set = shared_replica_set();
//! let database = unique_database("merge_survey_before_metrics");
//! let mut daemon = Daemon::spawn(set.uri(), &database, "");
//! daemon.wait_ready(Duration::from_secs(30)).await;
//! let db = set.client().await.database(&database);
//! ```
//!
//! Tests that stop, kill or restart servers start a private [`ReplicaSet`] instead. Every
//! child process dies with the test binary, even when it is killed with `SIGKILL`.

// Test modules use different parts of this API, and some parts exist for tests to come.
#![allow(dead_code, unused_imports)]

mod cluster;
mod daemon;
mod mongod;
mod process;

use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use mongodb::bson::{doc, Bson, Document};
use mongodb::Database;

pub use cluster::{
    command_error_code, connect, shared_replica_set, ReplicaSet, SharedReplicaSet, Standalone,
    REPLICA_SET_NAME,
};
pub use daemon::{run_cli, Daemon, DaemonBuilder, PERFAGG};
pub use mongod::{mongod_path, MONGOD_ENV};
pub use process::scratch_dir;

/// How often [`wait_until`] and [`wait_for`] check their condition.
const WAIT_INTERVAL: Duration = Duration::from_millis(50);

/// Returns a database name that no other test in this process uses: `t<n>_<name>`, with
/// `name` cut to 40 characters and characters other than ASCII letters and digits replaced
/// by `_`, so it stays within MongoDB's 63-byte limit on database names.
pub fn unique_database(name: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let number = NEXT.fetch_add(1, Ordering::Relaxed);
    let cleaned: String = name
        .chars()
        .take(40)
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("t{number}_{cleaned}")
}

/// Polls `condition` until it returns true.
///
/// # Panics
///
/// Panics with "timed out after .. waiting until `description`" when `timeout` passes.
pub async fn wait_until<F, Fut>(timeout: Duration, description: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(timeout, description, || {
        let check = condition();
        async move { check.await.then_some(()) }
    })
    .await
}

/// Polls `probe` until it returns `Some`, and returns that value.
///
/// # Panics
///
/// Panics with "timed out after .. waiting until `description`" when `timeout` passes.
pub async fn wait_for<T, F, Fut>(timeout: Duration, description: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting until {description}");
        }
        tokio::time::sleep(WAIT_INTERVAL).await;
    }
}

/// Running totals of a database's state document: committed change events, merges and
/// rejects. A change event committed twice would raise them, a lost one would lower them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub events: i64,
    pub merged: i64,
    pub rejected: i64,
}

/// Reads the totals of the state document in `db`; zeros when there is none yet.
pub async fn committed_totals(db: &Database) -> Totals {
    let stored = db
        .collection::<Document>("perfagg_state")
        .find_one(doc! { "_id": "stream" })
        .await
        .expect("reading the state document failed");
    let totals = stored
        .and_then(|stored| stored.get_document("totals").ok().cloned())
        .unwrap_or_default();
    let total = |name: &str| totals.get(name).and_then(Bson::as_i64).unwrap_or(0);
    Totals {
        events: total("events"),
        merged: total("merged"),
        rejected: total("rejected"),
    }
}

/// Waits until the state document in `db` counts at least `events` committed change events.
///
/// # Panics
///
/// Panics when `timeout` passes first.
pub async fn wait_committed(db: &Database, events: i64, timeout: Duration) {
    wait_until(
        timeout,
        &format!("{events} change events committed"),
        || async move { committed_totals(db).await.events >= events },
    )
    .await;
}
