//! The change stream: one database-level stream, filtered on the server to the two staging
//! collections, read as raw documents and grouped into batches for the sink.
//!
//! Events are decoded here by hand from raw `Document`s. The driver caches an event's resume
//! token before it deserializes the event, so a typed decode that failed would leave the
//! stream past an event that was never processed.

use std::time::Duration;

use chrono::{DateTime, Utc};
use mongodb::bson::{doc, Bson, Document, Timestamp};
use mongodb::change_stream::event::ResumeToken;
use mongodb::change_stream::ChangeStream;
use mongodb::options::FullDocumentType;
use mongodb::Database;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::config::Config;
use crate::decode::Source;
use crate::error::{Action, Error};
use crate::state::{Position, STREAM_STATE_ID};

/// Maximum time one `getMore` waits on the server for new events, so the loop regains
/// control often enough to write idle checkpoints.
const MAX_AWAIT: Duration = Duration::from_secs(1);

/// Effect of a change event on the merge.
#[derive(Debug, Clone, PartialEq)]
pub enum Operation {
    /// Insert, update or replace: merge the staging document as it is now. `None` when an
    /// update's document was deleted before the server could look it up.
    Upsert(Option<Document>),
    /// The staging document was deleted; merged data stays as it was.
    Delete,
}

/// One change event of a staging collection.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// Position just after this event.
    pub position: Position,
    pub source: Source,
    /// The staging collection's name.
    pub collection: String,
    pub staging_id: Bson,
    pub operation: Operation,
    /// Whether this is an insert: a staging `_id` that was never seen before, so it has no
    /// reject record to clear when it merges.
    pub is_insert: bool,
    pub wall_time: Option<DateTime<Utc>>,
}

/// Output of the stream for one batch.
#[derive(Debug, Default)]
pub struct Batch {
    pub changes: Vec<Change>,
    /// Set when the stream was invalidated (its database was dropped or renamed); the
    /// position must be stored and the stream opened again after it.
    pub invalidated: Option<Position>,
}

/// Starting point of a new stream.
#[derive(Debug, Clone)]
pub enum Start {
    /// Just after this stored resume token.
    After(Document),
    /// At this cluster time, including events at exactly that time.
    AtTime(Timestamp),
    /// At the current time.
    Now,
}

/// An open change stream on the staging collections.
pub struct ChangeSource {
    stream: ChangeStream<Document>,
    metrics: String,
    surveys: String,
}

impl ChangeSource {
    /// Opens the stream at `start`.
    ///
    /// # Errors
    ///
    /// [`Error::Mongo`] with [`Action::OpenStream`]; the caller checks for a lost position.
    pub async fn open(
        db: &Database,
        config: &Config,
        start: &Start,
    ) -> Result<ChangeSource, Error> {
        let collections = &config.collections;
        let staging = vec![&collections.metrics, &collections.surveys];

        // Only staging inserts, updates, replaces and deletes reach the merge. `invalidate`
        // is let through because it closes the stream and must be stepped over, and drops
        // and renames of staging collections so that they are logged.
        //
        // The daemon's own claim of the stream document, written just before a resumed
        // stream opens, is let through too. The server checks a resume token only when it
        // meets the first event after it that passes this filter. Without such an event, a
        // token that is unknown, or whose event the filter now excludes, would be reported
        // only at the next staging change, long after start-up. The claim is that event, so
        // the check happens while the stream opens, and `parse_change` skips it.
        // NOTE: the last clause matches the `claimed_at` field that `StateStore::claim`
        // sets; renaming that field silently moves the check back to the next staging change.
        let pipeline = [doc! {
            "$match": {
                "$or": [
                    {
                        "ns.coll": { "$in": staging.clone() },
                        "operationType": { "$in": ["insert", "update", "replace", "delete", "drop", "rename"] },
                    },
                    { "to.coll": { "$in": staging }, "operationType": "rename" },
                    { "operationType": "invalidate" },
                    {
                        "ns.coll": &collections.state,
                        "documentKey._id": STREAM_STATE_ID,
                        "updateDescription.updatedFields.claimed_at": { "$exists": true },
                    },
                ]
            }
        }];

        let mut watch = db
            .watch()
            .pipeline(pipeline)
            .full_document(FullDocumentType::UpdateLookup)
            .max_await_time(MAX_AWAIT.min(config.batch.max_wait.max(Duration::from_millis(100))));
        match start {
            Start::After(token) => watch = watch.start_after(to_resume_token(token)?),
            Start::AtTime(time) => watch = watch.start_at_operation_time(*time),
            Start::Now => {}
        }
        let stream = watch
            .await
            .map_err(Error::mongo(Action::OpenStream))?
            .with_type::<Document>();
        Ok(ChangeSource {
            stream,
            metrics: collections.metrics.clone(),
            surveys: collections.surveys.clone(),
        })
    }

    /// Returns the stream's current resume token: after the last returned event, or the server's
    /// post-batch token once every returned event has been handed out.
    pub fn resume_token(&self) -> Option<Document> {
        let token = self.stream.resume_token()?;
        match mongodb::bson::to_bson(&token) {
            Ok(Bson::Document(document)) => Some(document),
            _ => None,
        }
    }

    /// Reads up to `max_events` change events, waiting at most `max_wait` after the first
    /// one. Returns an empty batch when nothing arrived within one server wait.
    ///
    /// # Errors
    ///
    /// [`Error::Mongo`] with [`Action::ReadStream`] when the server fails the read (the driver
    /// has already tried to resume once), and [`Error::InvalidState`] for an event without
    /// the fields every change event has.
    pub async fn next_batch(
        &mut self,
        max_events: usize,
        max_wait: Duration,
    ) -> Result<Batch, Error> {
        let mut batch = Batch::default();
        let mut deadline: Option<Instant> = None;
        while batch.changes.len() < max_events {
            if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                break;
            }
            let Some(event) = self
                .stream
                .next_if_any()
                .await
                .map_err(Error::mongo(Action::ReadStream))?
            else {
                if deadline.is_none() {
                    // Nothing arrived in one server wait: hand an empty batch back so the
                    // caller can checkpoint and check for shutdown.
                    break;
                }
                continue;
            };
            match event.get_str("operationType") {
                Ok("invalidate") => {
                    batch.invalidated = Some(parse_position(&event)?);
                    break;
                }
                Ok("drop" | "rename") => {
                    self.log_collection_change(&event);
                    continue;
                }
                _ => {}
            }
            match self.parse_change(event)? {
                Some(change) => {
                    deadline.get_or_insert_with(|| Instant::now() + max_wait);
                    batch.changes.push(change);
                }
                None => continue,
            }
        }
        Ok(batch)
    }

    /// Returns whether the server keeps the stream open (false after an invalidate event).
    pub fn is_alive(&self) -> bool {
        self.stream.is_alive()
    }

    /// Logs the drop or rename of a staging collection. Nothing merged changes: the stream
    /// goes on, and documents inserted under a configured staging name later are merged.
    fn log_collection_change(&self, event: &Document) {
        let name_in = |field: &str| {
            event
                .get_document(field)
                .ok()
                .and_then(|namespace| namespace.get_str("coll").ok())
                .unwrap_or_default()
                .to_string()
        };
        let collection = name_in("ns");
        if event.get_str("operationType") == Ok("drop") {
            warn!(collection, "A staging collection was dropped.");
        } else if collection == self.metrics || collection == self.surveys {
            warn!(
                collection,
                to = name_in("to"),
                "A staging collection was renamed."
            );
        } else {
            warn!(
                collection,
                to = name_in("to"),
                "A collection was renamed to a staging collection name; only its later changes are merged."
            );
        }
    }

    fn parse_change(&self, event: Document) -> Result<Option<Change>, Error> {
        let position = parse_position(&event)?;
        let collection = event
            .get_document("ns")
            .ok()
            .and_then(|ns| ns.get_str("coll").ok())
            .unwrap_or_default()
            .to_string();
        let source = if collection == self.metrics {
            Source::Metrics
        } else if collection == self.surveys {
            Source::Surveys
        } else {
            debug!(collection, "Skipped a change event of another collection.");
            return Ok(None);
        };
        let staging_id = event
            .get_document("documentKey")
            .ok()
            .and_then(|key| key.get("_id"))
            .cloned()
            .unwrap_or(Bson::Null);
        let operation = match event.get_str("operationType").unwrap_or_default() {
            "insert" | "update" | "replace" => match event.get("fullDocument") {
                Some(Bson::Document(document)) => Operation::Upsert(Some(document.clone())),
                _ => Operation::Upsert(None),
            },
            "delete" => Operation::Delete,
            other => {
                warn!(
                    operation = other,
                    collection, "Skipped a change event of an unexpected type."
                );
                return Ok(None);
            }
        };
        let wall_time = event
            .get_datetime("wallTime")
            .ok()
            .map(|wall_time| wall_time.to_chrono());
        Ok(Some(Change {
            position,
            source,
            collection,
            staging_id,
            is_insert: event.get_str("operationType") == Ok("insert"),
            operation,
            wall_time,
        }))
    }
}

fn parse_position(event: &Document) -> Result<Position, Error> {
    let invalid = |problem: &str| Error::InvalidState {
        namespace: "the change stream".to_string(),
        problem: format!("{problem} in change event {}", truncate(event)),
    };
    let resume_token = event
        .get_document("_id")
        .map_err(|_| invalid("no resume token (_id)"))?
        .clone();
    let cluster_time = match event.get("clusterTime") {
        Some(Bson::Timestamp(timestamp)) => Some(*timestamp),
        _ => token_cluster_time(&resume_token),
    };
    Ok(Position {
        resume_token,
        cluster_time,
    })
}

/// Reads the cluster time encoded at the start of a resume token's `_data` string (a
/// key-string whose first value, type byte 0x82, is the event's timestamp). Returns `None`
/// for tokens of another shape.
pub fn token_cluster_time(token: &Document) -> Option<Timestamp> {
    let data = token.get_str("_data").ok()?;
    let hex = data.strip_prefix("82")?.get(..16)?;
    let value = u64::from_str_radix(hex, 16).ok()?;
    Some(Timestamp {
        time: (value >> 32) as u32,
        increment: value as u32,
    })
}

fn to_resume_token(token: &Document) -> Result<ResumeToken, Error> {
    mongodb::bson::from_bson(Bson::Document(token.clone())).map_err(|error| Error::InvalidState {
        namespace: "the stored position".to_string(),
        problem: format!("resume token {token} cannot be used: {error}"),
    })
}

fn truncate(document: &Document) -> String {
    let text = document.to_string();
    match text.char_indices().nth(200) {
        Some((index, _)) => format!("{}...", &text[..index]),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_time_read_from_token() {
        let token = doc! { "_data": "8266F0A1B2000000012B022C0100296E5A1004" };
        let timestamp = token_cluster_time(&token).expect("token has a timestamp");
        assert_eq!(timestamp.time, 0x66F0_A1B2);
        assert_eq!(timestamp.increment, 1);
        assert_eq!(token_cluster_time(&doc! { "_data": "zz" }), None);
        assert_eq!(token_cluster_time(&doc! { "other": 1 }), None);
    }
}
