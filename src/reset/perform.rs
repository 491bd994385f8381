//! Carrying out a reset request inside the daemon. The daemon has the lease and has claimed
//! the stream document, so nothing else commits meanwhile. Each reset ends with one
//! transaction that stores where the stream continues and marks the request done. Until then
//! the request stays pending, so a crash in the middle repeats the whole reset. That is safe
//! because merges replace each source's values.

use chrono::{DateTime, NaiveDate, Utc};
use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use mongodb::options::{ReadConcern, WriteConcern};
use mongodb::Database;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::decode::{Context, Decoder, Source};
use crate::error::{Action, Error};
use crate::merge::OWNED_FIELDS;
use crate::sink::{BatchOutcome, Sink};
use crate::state::{Position, ResetMode, ResetRequest, Resume};
use crate::stream::{token_cluster_time, Change, ChangeSource, Operation, Start};

/// Performs `request` and returns where the change stream continues. Shutdown stops a rescan
/// between two batches.
///
/// # Errors
///
/// [`Error::Mongo`] when the server fails (the request stays pending and is performed again
/// on the next start), [`Error::LeaseLost`] when another instance took over, and
/// [`Error::Interrupted`] when shutdown stopped a rescan.
pub async fn perform(
    db: &Database,
    config: &Config,
    sink: &Sink<'_>,
    request: &ResetRequest,
    shutdown: &CancellationToken,
) -> Result<Resume, Error> {
    info!(
        id = %request.id,
        mode = request.mode.name(),
        requested_by = request.requested_by,
        requested_at = %request.requested_at,
        "Performing a reset."
    );
    let (resume, detail) = match &request.mode {
        ResetMode::Since(time) => (Resume::AtTime(*time), doc! { "since": *time }),
        ResetMode::ToNow => {
            let position = current_position(db, config).await?;
            warn!(
                position = position.cluster_time_text(),
                "Skipping the backlog: changes written before now will not be merged."
            );
            (Resume::After(position), doc! {})
        }
        ResetMode::Rescan(since) => {
            let position = current_position(db, config).await?;
            let outcome = rescan(db, config, sink, *since, &position, shutdown).await?;
            (Resume::After(position), outcome_detail(&outcome, None))
        }
        ResetMode::Rebuild => {
            let position = current_position(db, config).await?;
            let cleared = clear_owned_fields(db, config).await?;
            let outcome = rescan(db, config, sink, None, &position, shutdown)
                .await
                .inspect_err(|error| {
                    if matches!(error, Error::Interrupted { .. }) {
                        warn!("Target documents stay incomplete until the rebuild runs again at the next start.");
                    }
                })?;
            (
                Resume::After(position),
                outcome_detail(&outcome, Some(cleared)),
            )
        }
    };
    finish(sink, request, &resume, detail.clone()).await?;
    info!(id = %request.id, mode = request.mode.name(), detail = %detail, "Reset done.");
    Ok(resume)
}

/// Returns the position of a stream opened now. The stream that continues from it replays
/// everything written after it, so a rescan that starts after taking it misses nothing.
async fn current_position(db: &Database, config: &Config) -> Result<Position, Error> {
    let source = ChangeSource::open(db, config, &Start::Now).await?;
    let resume_token = source.resume_token().ok_or_else(|| Error::InvalidState {
        namespace: "the change stream".to_string(),
        problem: "the server returned no resume token for a new change stream".to_string(),
    })?;
    Ok(Position {
        cluster_time: token_cluster_time(&resume_token),
        resume_token,
    })
}

/// Merges every staging document again, in insertion order per source, skipping valid
/// documents dated before `since`. The order between the two sources does not matter,
/// because each source replaces only its own fields.
async fn rescan(
    db: &Database,
    config: &Config,
    sink: &Sink<'_>,
    since: Option<NaiveDate>,
    start: &Position,
    shutdown: &CancellationToken,
) -> Result<BatchOutcome, Error> {
    let decoder = Decoder::new(config);
    let mut total = BatchOutcome::default();
    let sources = [
        (Source::Metrics, &config.collections.metrics),
        (Source::Surveys, &config.collections.surveys),
    ];
    for (source, name) in sources {
        let coll = db.collection::<Document>(name);
        // Natural order is insertion order: WiredTiger assigns increasing record ids on
        // insert and keeps them on update.
        let mut cursor = coll
            .find(doc! {})
            .sort(doc! { "$natural": 1 })
            .batch_size(config.batch.max_events as u32)
            .read_concern(ReadConcern::majority())
            .await
            .map_err(Error::mongo(Action::Rescan))?;
        let mut batch: Vec<Change> = Vec::with_capacity(config.batch.max_events);
        while let Some(document) = cursor
            .try_next()
            .await
            .map_err(Error::mongo(Action::Rescan))?
        {
            let change = rescan_change(source, name, document, start);
            if is_before(&decoder, &change, since, config) {
                continue;
            }
            batch.push(change);
            if batch.len() >= config.batch.max_events {
                stop_if_shutdown(shutdown, &total)?;
                total.add(sink.commit_rescan(&batch).await?);
                batch.clear();
            }
        }
        if !batch.is_empty() {
            stop_if_shutdown(shutdown, &total)?;
            total.add(sink.commit_rescan(&batch).await?);
        }
    }
    info!(
        events = total.events,
        merged = total.merged,
        rejected = total.rejected,
        "Rescanned the staging collections."
    );
    Ok(total)
}

/// Stops a rescan between batches once shutdown was requested. The reset stays pending, and
/// the next start runs it again from the beginning.
fn stop_if_shutdown(shutdown: &CancellationToken, done: &BatchOutcome) -> Result<(), Error> {
    if !shutdown.is_cancelled() {
        return Ok(());
    }
    warn!(
        rescanned = done.events,
        "Shutdown interrupted a rescan; the reset stays pending and starts over on the next start."
    );
    Err(Error::Interrupted { mode: "rescan" })
}

/// Builds the change for a staging document found by a rescan. Its wall time is the creation
/// time in its ObjectId, used for `missing_date = "event_day"`.
fn rescan_change(source: Source, collection: &str, document: Document, start: &Position) -> Change {
    let staging_id = document.get("_id").cloned().unwrap_or(Bson::Null);
    let wall_time: Option<DateTime<Utc>> = match &staging_id {
        Bson::ObjectId(id) => Some(id.timestamp().to_chrono()),
        _ => None,
    };
    Change {
        position: start.clone(),
        source,
        collection: collection.to_string(),
        staging_id,
        operation: Operation::Upsert(Some(document)),
        // A rescanned document may have been rejected before.
        is_insert: false,
        wall_time,
    }
}

/// Returns whether a rescan with `since` leaves this change out. Only valid documents dated
/// before the day are skipped, and invalid ones are rejected again.
fn is_before(
    decoder: &Decoder<'_>,
    change: &Change,
    since: Option<NaiveDate>,
    config: &Config,
) -> bool {
    let (Some(since), Operation::Upsert(Some(document))) = (since, &change.operation) else {
        return false;
    };
    let context = Context::now(config.merge.timezone, change.wall_time);
    match decoder.decode(change.source, document, &context) {
        Ok(record) => record.key().date < since,
        Err(_) => false,
    }
}

/// Removes the fields perfagg owns from every target document, then the documents left with
/// nothing but their key. Fields written by others stay. Returns how many documents were
/// removed.
async fn clear_owned_fields(db: &Database, config: &Config) -> Result<u64, Error> {
    let target = db.collection::<Document>(&config.collections.target);
    let mut unset = Document::new();
    for field in OWNED_FIELDS.iter().chain(["updated_at"].iter()) {
        unset.insert(*field, "");
    }
    let majority = WriteConcern::majority();
    let steps = [
        (doc! {}, doc! { "$unset": unset }),
        (doc! { "metrics": {} }, doc! { "$unset": { "metrics": "" } }),
        (doc! { "sources": {} }, doc! { "$unset": { "sources": "" } }),
    ];
    for (filter, update) in steps {
        target
            .update_many(filter, update)
            .write_concern(majority.clone())
            .await
            .map_err(Error::mongo(Action::Rescan))?;
    }
    // `_id` and the three key fields are all that is left of a document only perfagg wrote.
    let removed = target
        .delete_many(doc! { "$expr": { "$lte": [{ "$size": { "$objectToArray": "$$ROOT" } }, 4] } })
        .write_concern(majority)
        .await
        .map_err(Error::mongo(Action::Rescan))?;
    info!(
        removed = removed.deleted_count,
        "Cleared perfagg's fields from the target documents."
    );
    Ok(removed.deleted_count)
}

/// Stores where the stream continues and marks the request done, in one transaction.
async fn finish(
    sink: &Sink<'_>,
    request: &ResetRequest,
    resume: &Resume,
    detail: Document,
) -> Result<(), Error> {
    let mut session = sink.start_session().await?;
    session
        .start_transaction()
        .write_concern(WriteConcern::majority())
        .await
        .map_err(Error::mongo(Action::Transaction))?;
    if let Err(error) = sink
        .state()
        .finish_reset(&mut session, request, resume, detail)
        .await
    {
        if let Err(abort_error) = session.abort_transaction().await {
            warn!(error = %abort_error, "Aborting the reset transaction failed too.");
        }
        return Err(error);
    }
    session
        .commit_transaction()
        .await
        .map_err(Error::mongo(Action::Transaction))
}

fn outcome_detail(outcome: &BatchOutcome, cleared: Option<u64>) -> Document {
    let mut detail = doc! {
        "rescanned": outcome.events as i64,
        "merged": outcome.merged as i64,
        "rejected": outcome.rejected as i64,
    };
    if let Some(cleared) = cleared {
        detail.insert("removed_targets", cleared as i64);
    }
    detail
}
