//! Fault tests: the real binary against crashes, competing instances, replica-set failovers,
//! server outages, poison documents, lost history, quiet periods, dropped collections and
//! configuration changes, with mongod processes that the harness starts. Each test prints one
//! summary line (`fault summary: ...`) of what it proved.

mod load;
mod model;

mod collections;
mod failover;
mod history;
mod kill;
mod lease;
mod outage;
mod poison;
mod quiet;
mod watch;

use std::time::Duration;

use mongodb::bson::{doc, Bson, Document};
use mongodb::{Client, Database};

/// How long a daemon may take to report ready, including a wait for an expired lease.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A 2-second lease (the smallest allowed), so a daemon started after a SIGKILL waits at
/// most that long for the dead one's lease.
const SHORT_LEASE: &str = "[lease]\nttl_seconds = 2\n";

/// The application name perfagg's client sends, which fail points filter on so that the
/// test's own commands are not affected.
const PERFAGG_APP_NAME: &str = concat!("perfagg ", env!("CARGO_PKG_VERSION"));

/// Returns the target document of the entity `name`.
pub async fn target(db: &Database, name: &str) -> Document {
    db.collection::<Document>("performance_data")
        .find_one(doc! { "entity_name": name })
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("no target for {name}"))
}

/// Prints the summary line of a fault test.
fn summary(test: &str, text: &str) {
    eprintln!("fault summary: {test}: {text}");
}

/// Arms the `failCommand` fail point for perfagg's connections: `mode` is `"alwaysOn"` or
/// `{ "times": n }`, and `data` names the commands and the failure. Use it on a private
/// replica set only, because every daemon sends the same application name.
async fn fail_commands(client: &Client, mode: Bson, data: Document) {
    let mut data = data;
    data.insert("appName", PERFAGG_APP_NAME);
    client
        .database("admin")
        .run_command(doc! { "configureFailPoint": "failCommand", "mode": mode, "data": data })
        .await
        .unwrap();
}

/// Turns the `failCommand` fail point off.
async fn clear_fail_commands(client: &Client) {
    client
        .database("admin")
        .run_command(doc! { "configureFailPoint": "failCommand", "mode": "off" })
        .await
        .unwrap();
}

/// One line of a daemon's JSON log.
#[derive(Debug, Clone)]
struct LogLine {
    message: String,
    fields: serde_json::Map<String, serde_json::Value>,
}

/// Parses the JSON lines of a daemon's log; other lines (a panic, say) are skipped.
fn log_lines(logs: &str) -> Vec<LogLine> {
    logs.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter_map(|value| {
            // perfagg flattens the event, so its fields sit beside the message.
            let fields = value.as_object()?.clone();
            let message = fields.get("message")?.as_str()?.to_string();
            Some(LogLine { message, fields })
        })
        .collect()
}

/// Counts the log lines whose message is `message`.
fn count_messages(logs: &str, message: &str) -> usize {
    log_lines(logs)
        .iter()
        .filter(|line| line.message == message)
        .count()
}
