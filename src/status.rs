//! The `perfagg status` command: the stored position and how far it is behind the newest
//! staging write, the lease holder, document counts and resets, as text for people or as
//! JSON for scripts. It only reads.

use chrono::{DateTime, Utc};
use mongodb::bson::{doc, Bson, Document};
use mongodb::Database;
use serde_json::{json, Value};

use crate::config::Config;
use crate::deployment;
use crate::error::{Action, Error};
use crate::lease::read_lease;
use crate::reset::request::oldest_oplog_time;
use crate::state::{timestamp_text, StateStore};

/// Number of past resets shown.
const RECENT_RESETS: i64 = 5;

/// Prints the status.
///
/// # Errors
///
/// [`Error::Mongo`] when the server cannot be read.
pub async fn run(config: &Config, as_json: bool) -> Result<(), Error> {
    let client = deployment::connect(config).await?;
    deployment::check(&client, config).await?;
    let db = client.database(&config.mongodb.database);
    let report = gather(&db, config).await?;
    if as_json {
        let text = serde_json::to_string_pretty(&report).unwrap_or_else(|_| report.to_string());
        println!("{text}");
    } else {
        print!("{}", render_text(&report));
    }
    Ok(())
}

/// Collects everything `status` shows into one JSON value.
async fn gather(db: &Database, config: &Config) -> Result<Value, Error> {
    let state = StateStore::new(db, config);
    let stream = state.read_stream_document().await?.unwrap_or_default();
    let cluster_seconds = match stream.get("cluster_time") {
        Some(Bson::Timestamp(time)) => Some(time.time),
        _ => None,
    };
    let position = json!({
        "resume_token": to_json(stream.get("resume_token")),
        "cluster_time": match stream.get("cluster_time") {
            Some(Bson::Timestamp(time)) => Value::String(timestamp_text(*time)),
            _ => Value::Null,
        },
        "replay_from": match stream.get("start_at") {
            Some(Bson::Timestamp(time)) => Value::String(timestamp_text(*time)),
            _ => Value::Null,
        },
        "stored_at": stream.get_datetime("updated_at").ok().map(|at| at.to_chrono().to_rfc3339()),
        "epoch": to_json(stream.get("epoch")),
    });

    // The position is lost once its cluster time is older than the oplog's oldest entry. A
    // user without read access to the `local` database gets no window rather than an error.
    let oplog_oldest = oldest_oplog_time(db.client()).await.ok();
    let position_time = match (stream.get("cluster_time"), stream.get("start_at")) {
        (Some(Bson::Timestamp(time)), _) | (_, Some(Bson::Timestamp(time))) => Some(*time),
        _ => None,
    };
    let position_in_oplog = match (position_time, oplog_oldest) {
        (Some(position), Some(oldest)) => Some(position >= oldest),
        _ => None,
    };

    let newest = newest_staging_write(db, config).await?;
    let behind_seconds = match (newest, cluster_seconds) {
        (Some(newest), Some(stored)) => {
            Some(i64::from(newest).saturating_sub(i64::from(stored)).max(0))
        }
        _ => None,
    };
    let newest_text = newest
        .and_then(|seconds| DateTime::<Utc>::from_timestamp(i64::from(seconds), 0))
        .map(|time| time.to_rfc3339());

    let lease = read_lease(&db.collection::<Document>(&config.collections.state)).await?;
    let lease = match lease {
        Some(view) if !view.owner.is_empty() => {
            let expires_at = view.expires_at.map(|at| at.to_chrono());
            json!({
                "holder": view.owner,
                "epoch": view.epoch,
                "expires_at": expires_at.map(|at| at.to_rfc3339()),
                "expired": expires_at.is_none_or(|at| at <= Utc::now()),
            })
        }
        _ => Value::Null,
    };

    let count = |name: &str| {
        let coll = db.collection::<Document>(name);
        async move {
            coll.count_documents(doc! {})
                .await
                .map_err(Error::mongo(Action::Status))
        }
    };
    let targets = count(&config.collections.target).await?;
    let rejects = count(&config.collections.rejects).await?;

    let pending = state.pending_reset().await?.map(|request| {
        json!({
            "id": request.id.to_hex(),
            "mode": request.mode.name(),
            "requested_by": request.requested_by,
            "requested_at": request.requested_at.to_chrono().to_rfc3339(),
        })
    });
    let resets: Vec<Value> = state
        .recent_resets(RECENT_RESETS)
        .await?
        .into_iter()
        .map(|document| Bson::Document(document).into_relaxed_extjson())
        .collect();

    Ok(json!({
        "database": config.mongodb.database,
        "position": position,
        "newest_staging_write": newest_text,
        "oplog_oldest": oplog_oldest.map(timestamp_text),
        "position_in_oplog_window": position_in_oplog,
        "behind_seconds": behind_seconds,
        "lease": lease,
        "target_documents": targets,
        "rejects": rejects,
        "totals": to_json(stream.get("totals")),
        "pending_reset": pending,
        "recent_resets": resets,
    }))
}

/// Returns the creation second of the newest staging document, read from the ObjectId
/// that n8n's driver gives each inserted document. Staging documents with other `_id` types
/// are not counted.
async fn newest_staging_write(db: &Database, config: &Config) -> Result<Option<u32>, Error> {
    let mut newest: Option<u32> = None;
    for name in [&config.collections.metrics, &config.collections.surveys] {
        let found = db
            .collection::<Document>(name)
            .find_one(doc! { "_id": { "$type": "objectId" } })
            .sort(doc! { "_id": -1 })
            .projection(doc! { "_id": 1 })
            .await
            .map_err(Error::mongo(Action::Status))?;
        let seconds = found
            .and_then(|document| document.get_object_id("_id").ok())
            .map(|id| (id.timestamp().timestamp_millis() / 1000) as u32);
        newest = newest.max(seconds);
    }
    Ok(newest)
}

fn to_json(value: Option<&Bson>) -> Value {
    value
        .cloned()
        .map_or(Value::Null, Bson::into_relaxed_extjson)
}

fn render_text(report: &Value) -> String {
    let text = |value: &Value| match value {
        Value::Null => "-".to_string(),
        Value::String(text) => text.clone(),
        other => other.to_string(),
    };
    let position = &report["position"];
    let mut lines = vec![format!("database:        {}", text(&report["database"]))];
    lines.push(format!(
        "position:        {}",
        text(&position["cluster_time"])
    ));
    if !position["replay_from"].is_null() {
        lines.push(format!(
            "replay from:     {}",
            text(&position["replay_from"])
        ));
    }
    lines.push(format!(
        "resume token:    {}",
        text(&position["resume_token"])
    ));
    lines.push(format!("stored at:       {}", text(&position["stored_at"])));
    lines.push(format!(
        "behind:          {} (newest staging write {})",
        match report["behind_seconds"].as_i64() {
            Some(seconds) => format!("{seconds} s"),
            None => "-".to_string(),
        },
        text(&report["newest_staging_write"])
    ));
    lines.push(match report["position_in_oplog_window"].as_bool() {
        Some(true) => format!("oplog window:    from {}; the position is inside it", text(&report["oplog_oldest"])),
        Some(false) => format!(
            "oplog window:    from {}; the position is OLDER and cannot be resumed: run `perfagg reset --rescan`",
            text(&report["oplog_oldest"])
        ),
        None => format!("oplog window:    from {}", text(&report["oplog_oldest"])),
    });

    let lease = &report["lease"];
    lines.push(match lease {
        Value::Null => "lease:           none".to_string(),
        _ => format!(
            "lease:           {} (epoch {}, {} {})",
            text(&lease["holder"]),
            text(&lease["epoch"]),
            if lease["expired"].as_bool() == Some(true) {
                "expired"
            } else {
                "expires"
            },
            text(&lease["expires_at"])
        ),
    });
    lines.push(format!(
        "target docs:     {}",
        text(&report["target_documents"])
    ));
    lines.push(format!("rejects:         {}", text(&report["rejects"])));
    lines.push(format!("totals:          {}", text(&report["totals"])));
    let pending = &report["pending_reset"];
    lines.push(match pending {
        Value::Null => "pending reset:   none".to_string(),
        _ => format!(
            "pending reset:   {} {} requested by {} at {}",
            text(&pending["mode"]),
            text(&pending["id"]),
            text(&pending["requested_by"]),
            text(&pending["requested_at"])
        ),
    });
    let resets = report["recent_resets"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if resets.is_empty() {
        lines.push("recent resets:   none".to_string());
    } else {
        lines.push("recent resets:".to_string());
        for reset in resets {
            lines.push(format!(
                "  {} {} by {} at {}: {}{}",
                text(&reset["mode"]),
                text(&reset["_id"]["$oid"]),
                text(&reset["requested_by"]),
                text(&reset["requested_at"]["$date"]),
                text(&reset["status"]),
                match &reset["detail"] {
                    Value::Null => String::new(),
                    detail => format!(" {detail}"),
                }
            ));
        }
    }
    lines.push(String::new());
    lines.join("\n")
}
