//! The transactional writer. One transaction per batch reads the affected target documents
//! once, merges the batch's records in event order, writes each target once, records rejects
//! and stores the batch's position through the state store. Either all of that commits or
//! none of it does, so a crash anywhere repeats at most an uncommitted batch.
//!
//! A write that the server refuses for one document (one beyond the 16 MiB limit, say) would
//! fail the batch forever. So the batch is split in halves until the failing event is alone,
//! and that event is rejected with the server's reason.

use std::collections::HashMap;
use std::time::Instant;

use mongodb::bson::{doc, Bson, DateTime, Document, Timestamp};
use mongodb::options::{IndexOptions, ReadConcern, WriteConcern};
use mongodb::{Client, ClientSession, Collection, Database, IndexModel};
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::decode::{Context, Decoder};
use crate::error::{chain, Action, Error};
use crate::merge::{self, Key, Record, Rules};
use crate::retry::{self, Backoff, Failure, TRANSACTION_ATTEMPTS};
use crate::state::{Position, StateStore, Totals};
use crate::stream::{Change, Operation};

/// Most bytes of statements sent in one `update` command, well below the 16 MiB + 16 KiB
/// that a command may carry.
const MAX_COMMAND_BYTES: usize = 8 * 1024 * 1024;
/// Maximum number of statements in one `update` command (the server's `maxWriteBatchSize`).
const MAX_COMMAND_STATEMENTS: usize = 100_000;
/// Maximum number of keys in one `$or` lookup of target documents.
const MAX_LOOKUP_KEYS: usize = 1_000;
/// Name of the unique index on the target's key.
const TARGET_INDEX: &str = "perfagg_entity_day";
/// Name of the unique index on the rejects' staging document.
const REJECTS_INDEX: &str = "perfagg_staging_document";

/// Plan of the sink for one change event.
#[derive(Debug, Clone)]
enum Planned<'c> {
    Merge {
        change: &'c Change,
        record: Record,
    },
    Reject {
        change: &'c Change,
        reasons: Vec<String>,
        /// False once the reject itself was refused for its size: it is stored without the
        /// staging document.
        keep_document: bool,
    },
    /// A delete, or an update whose document no longer exists: nothing to merge.
    Skip {
        change: &'c Change,
    },
}

impl Planned<'_> {
    fn change(&self) -> &Change {
        match self {
            Planned::Merge { change, .. }
            | Planned::Reject { change, .. }
            | Planned::Skip { change } => change,
        }
    }
}

/// Counts of one committed batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    pub events: usize,
    pub merged: usize,
    pub rejected: usize,
    pub skipped: usize,
    /// Distinct target documents written.
    pub targets: usize,
    /// Target documents that did not exist before.
    pub created: usize,
}

impl BatchOutcome {
    /// Adds the counts of another commit.
    pub fn add(&mut self, other: BatchOutcome) {
        self.events += other.events;
        self.merged += other.merged;
        self.rejected += other.rejected;
        self.skipped += other.skipped;
        self.targets += other.targets;
        self.created += other.created;
    }
}

/// A per-event log line, emitted only after its transaction committed so a retried attempt
/// does not log twice.
struct EventLog {
    collection: String,
    data_type: &'static str,
    staging_id: Bson,
    key: String,
    existed: bool,
    changed: Vec<&'static str>,
    summary: String,
}

/// A reject's log line, emitted like [`EventLog`] only after its transaction committed.
struct RejectLog {
    collection: String,
    staging_id: Bson,
    reasons: String,
}

/// Writes batches of change events into the target collection.
pub struct Sink<'a> {
    config: &'a Config,
    client: Client,
    db: Database,
    target: Collection<Document>,
    state: StateStore,
    /// The one session that runs every merge transaction of this sink, so that its id can
    /// be recorded in the lease. [`Sink::open_session`] or the first commit starts it.
    session: tokio::sync::Mutex<Option<ClientSession>>,
}

impl<'a> Sink<'a> {
    pub fn new(config: &'a Config, client: &Client, state: StateStore) -> Sink<'a> {
        let db = client.database(&config.mongodb.database);
        Sink {
            config,
            client: client.clone(),
            target: db.collection(&config.collections.target),
            db,
            state,
            session: tokio::sync::Mutex::new(None),
        }
    }

    /// Starts the session that runs this sink's transactions, and returns its id (`lsid`).
    ///
    /// # Errors
    ///
    /// [`Error::Mongo`] when the driver cannot start a session.
    pub async fn open_session(&self) -> Result<Document, Error> {
        let session = self.start_session().await?;
        let id = session.id().clone();
        *self.session.lock().await = Some(session);
        Ok(id)
    }

    /// Returns the state store that every commit writes the position through.
    pub fn state(&self) -> &StateStore {
        &self.state
    }

    /// Creates the unique indexes on the target and rejects collections if they are missing.
    ///
    /// # Errors
    ///
    /// [`Error::DuplicateKeys`] when existing documents break uniqueness, [`Error::Mongo`]
    /// otherwise.
    pub async fn ensure_indexes(&self) -> Result<(), Error> {
        let target_index = IndexModel::builder()
            .keys(doc! { "entity_name": 1, "entity_type": 1, "date": 1 })
            .options(
                IndexOptions::builder()
                    .name(TARGET_INDEX.to_string())
                    .unique(true)
                    .build(),
            )
            .build();
        let rejects = self
            .db
            .collection::<Document>(&self.config.collections.rejects);
        let rejects_index = IndexModel::builder()
            .keys(doc! { "source": 1, "staging_id": 1 })
            .options(
                IndexOptions::builder()
                    .name(REJECTS_INDEX.to_string())
                    .unique(true)
                    .build(),
            )
            .build();
        for (coll, index) in [(&self.target, target_index), (&rejects, rejects_index)] {
            coll.create_index(index).await.map_err(|source| {
                if retry::classify(&source) == Failure::DuplicateKey {
                    Error::DuplicateKeys {
                        namespace: coll.namespace().to_string(),
                        error: Box::new(source),
                    }
                } else {
                    Error::mongo(Action::CreateIndexes)(source)
                }
            })?;
        }
        Ok(())
    }

    /// Merges `changes` and stores `position` (the position after the last change, or a
    /// later one) in one transaction, splitting the batch around events the server refuses.
    ///
    /// # Errors
    ///
    /// [`Error::Mongo`] when the transaction keeps failing after its retries; nothing of the
    /// failed part is committed, and the stored position still covers what was.
    /// [`Error::LeaseLost`] and [`Error::ResetRequested`] when the state fence fails.
    pub async fn commit(
        &self,
        changes: &[Change],
        position: &Position,
    ) -> Result<BatchOutcome, Error> {
        self.commit_batch(changes, Some(position)).await
    }

    /// Merges staging documents read by a rescan. The stored position stays where the
    /// rescan began; only the lease epoch fences these commits.
    ///
    /// # Errors
    ///
    /// As for [`Sink::commit`].
    pub async fn commit_rescan(&self, changes: &[Change]) -> Result<BatchOutcome, Error> {
        self.commit_batch(changes, None).await
    }

    async fn commit_batch(
        &self,
        changes: &[Change],
        position: Option<&Position>,
    ) -> Result<BatchOutcome, Error> {
        let mut guard = self.session.lock().await;
        let session = match guard.as_mut() {
            Some(session) => session,
            None => guard.insert(self.start_session().await?),
        };
        let plan = self.plan(changes);

        // Work items are (plan slice, position to store). A refused slice is replaced by its
        // two halves. Each half stores the position after its own last event, so the stored
        // position never passes an event that is not yet committed.
        let mut total = BatchOutcome::default();
        let mut pending: Vec<(Vec<Planned<'_>>, Option<Position>)> =
            vec![(plan, position.cloned())];
        while let Some((part, part_position)) = pending.pop() {
            match self
                .commit_part(session, &part, part_position.as_ref())
                .await
            {
                Ok(outcome) => total.add(outcome),
                Err(Error::Refused {
                    namespace,
                    code,
                    message,
                }) => {
                    if part.len() > 1 {
                        let middle = part.len() / 2;
                        let first_position = part_position
                            .as_ref()
                            .map(|_| part[middle - 1].change().position.clone());
                        let (first, second) = part.split_at(middle);
                        warn!(
                            events = part.len(),
                            namespace,
                            code,
                            error = message,
                            "The server refused a write; splitting the batch to find the event."
                        );
                        pending.push((second.to_vec(), part_position));
                        pending.push((first.to_vec(), first_position));
                        continue;
                    }
                    let single = refused_to_reject(&part[0], &namespace, code, &message)?;
                    pending.push((vec![single], part_position));
                }
                Err(error) => return Err(error),
            }
        }
        Ok(total)
    }

    /// Stores `position` alone, for a checkpoint while no staging change arrives.
    ///
    /// # Errors
    ///
    /// [`Error::Mongo`] as for [`Sink::commit`].
    pub async fn checkpoint(&self, position: &Position) -> Result<(), Error> {
        self.commit(&[], position).await.map(|_| ())
    }

    /// Starts a session for work outside the batch path, such as finishing a reset.
    ///
    /// # Errors
    ///
    /// [`Error::Mongo`] when no server is available.
    pub async fn start_session(&self) -> Result<ClientSession, Error> {
        self.client
            .start_session()
            .await
            .map_err(Error::mongo(Action::Transaction))
    }

    fn plan<'c>(&self, changes: &'c [Change]) -> Vec<Planned<'c>> {
        let decoder = Decoder::new(self.config);
        changes
            .iter()
            .map(|change| {
                let Operation::Upsert(Some(document)) = &change.operation else {
                    return Planned::Skip { change };
                };
                let context = Context::now(self.config.merge.timezone, change.wall_time);
                match decoder.decode(change.source, document, &context) {
                    Ok(record) => Planned::Merge { change, record },
                    Err(reasons) => Planned::Reject {
                        change,
                        reasons,
                        keep_document: true,
                    },
                }
            })
            .collect()
    }

    /// Runs one transaction for `plan`, retrying it whole on transient errors.
    async fn commit_part(
        &self,
        session: &mut ClientSession,
        plan: &[Planned<'_>],
        position: Option<&Position>,
    ) -> Result<BatchOutcome, Error> {
        let started = Instant::now();
        let mut backoff = Backoff::transaction();
        loop {
            session
                .start_transaction()
                .read_concern(ReadConcern::snapshot())
                .write_concern(WriteConcern::majority())
                .await
                .map_err(Error::mongo(Action::Transaction))?;

            // If the process dies anywhere in the body or before the commit is acknowledged,
            // the server discards or keeps the whole transaction: the position and the merges
            // stay together either way.
            let attempt = match self.transaction_body(session, plan, position).await {
                Ok(result) => self.commit_transaction(session).await.map(|()| result),
                Err(error) => {
                    if let Err(abort_error) = session.abort_transaction().await {
                        debug!(error = %abort_error, "Abort after a failed transaction body failed too.");
                    }
                    Err(error)
                }
            };
            let error = match attempt {
                Ok((outcome, logs, reject_logs)) => {
                    emit_logs(logs, reject_logs);
                    if outcome.events > 0 {
                        info!(
                            batch_events = outcome.events,
                            merged = outcome.merged,
                            rejected = outcome.rejected,
                            skipped = outcome.skipped,
                            targets = outcome.targets,
                            created = outcome.created,
                            position =
                                position.map_or_else(|| "rescan".to_string(), Position::describe),
                            elapsed_ms = started.elapsed().as_millis() as u64,
                            "Committed batch."
                        );
                    }
                    return Ok(outcome);
                }
                Err(error) => error,
            };
            if !is_transient(&error) || backoff.attempt() + 1 >= TRANSACTION_ATTEMPTS {
                return Err(error);
            }
            let delay = backoff.next_delay();
            warn!(
                attempt = backoff.attempt(),
                backoff_ms = delay.as_millis() as u64,
                error = chain(&error),
                "Retrying the merge transaction."
            );
            tokio::time::sleep(delay).await;
        }
    }

    /// Commits, retrying the commit alone while its result is unknown.
    async fn commit_transaction(&self, session: &mut ClientSession) -> Result<(), Error> {
        let mut backoff = Backoff::transaction();
        loop {
            let Err(source) = session.commit_transaction().await else {
                return Ok(());
            };
            let unknown = retry::classify(&source) == Failure::UnknownCommitResult;
            if !unknown || backoff.attempt() + 1 >= TRANSACTION_ATTEMPTS {
                return Err(Error::mongo(Action::Transaction)(source));
            }
            let delay = backoff.next_delay();
            warn!(
                attempt = backoff.attempt(),
                backoff_ms = delay.as_millis() as u64,
                error = crate::error::describe(&source),
                "Commit result unknown; committing again."
            );
            tokio::time::sleep(delay).await;
        }
    }

    async fn transaction_body(
        &self,
        session: &mut ClientSession,
        plan: &[Planned<'_>],
        position: Option<&Position>,
    ) -> Result<(BatchOutcome, Vec<EventLog>, Vec<RejectLog>), Error> {
        let now = DateTime::now();
        let rules = Rules {
            default_satisfaction: self.config.merge.default_satisfaction,
        };

        // Read every affected target once.
        let keys: Vec<&Key> = plan
            .iter()
            .filter_map(|planned| match planned {
                Planned::Merge { record, .. } => Some(record.key()),
                _ => None,
            })
            .collect();
        let mut targets = self.load_targets(session, &keys).await?;

        // Merge in event order; each key's document is carried from one event to the next.
        let mut outcome = BatchOutcome {
            events: plan.len(),
            ..BatchOutcome::default()
        };
        let mut logs = Vec::new();
        let mut reject_logs = Vec::new();
        let mut written: Vec<Key> = Vec::new();
        // The last outcome per staging document in this batch decides whether it ends with
        // a reject record (its last version was invalid) or without one (it merged).
        let mut reject_records = RejectRecords::default();
        for planned in plan {
            match planned {
                Planned::Merge { change, record } => {
                    reject_records.merged(change);
                    let key = record.key();
                    let slot = targets.entry(key.clone()).or_insert(TargetSlot {
                        document: None,
                        existed: false,
                    });
                    let provenance = merge::Provenance {
                        staging_id: change.staging_id.clone(),
                        cluster_time: change.position.cluster_time.unwrap_or(Timestamp {
                            time: 0,
                            increment: 0,
                        }),
                    };
                    let merged =
                        merge::merge(slot.document.as_ref(), record, &provenance, rules, now);
                    if !written.contains(key) {
                        written.push(key.clone());
                    }
                    logs.push(EventLog {
                        collection: change.collection.clone(),
                        data_type: change.source.data_type(),
                        staging_id: change.staging_id.clone(),
                        key: key.to_string(),
                        existed: merged.existed,
                        changed: merged.changed,
                        summary: summarize(&merged.document),
                    });
                    slot.document = Some(merged.document);
                    outcome.merged += 1;
                }
                Planned::Reject {
                    change,
                    reasons,
                    keep_document,
                } => {
                    reject_records.rejected(
                        change,
                        reject_statement(change, reasons, *keep_document, now),
                    );
                    reject_logs.push(RejectLog {
                        collection: change.collection.clone(),
                        staging_id: change.staging_id.clone(),
                        reasons: reasons.join("; "),
                    });
                    outcome.rejected += 1;
                }
                Planned::Skip { change } => {
                    debug!(
                        collection = change.collection,
                        staging_id = %change.staging_id,
                        "Nothing to merge for a deleted staging document."
                    );
                    outcome.skipped += 1;
                }
            }
        }

        // Write each target once, then the rejects, then the position.
        let statements: Vec<Document> = written
            .iter()
            .filter_map(|key| {
                let slot = targets.get(key)?;
                let document = slot.document.clone()?;
                if !slot.existed {
                    outcome.created += 1;
                }
                Some(doc! { "q": key.filter(), "u": document, "upsert": true })
            })
            .collect();
        outcome.targets = statements.len();
        self.run_updates(session, &self.config.collections.target, statements)
            .await?;
        let (rejects, resolved) = reject_records.into_writes();
        self.run_updates(session, &self.config.collections.rejects, rejects)
            .await?;
        self.delete_resolved_rejects(session, resolved).await?;
        let totals = Totals {
            events: outcome.events as u64,
            merged: outcome.merged as u64,
            rejected: outcome.rejected as u64,
        };
        self.state.store_position(session, position, totals).await?;
        Ok((outcome, logs, reject_logs))
    }

    /// Removes the reject records of staging documents that have now merged, so that
    /// `staging_rejects` lists only documents that are still invalid.
    async fn delete_resolved_rejects(
        &self,
        session: &mut ClientSession,
        resolved: Vec<Document>,
    ) -> Result<(), Error> {
        for chunk in resolved.chunks(MAX_LOOKUP_KEYS) {
            let command = doc! {
                "delete": &self.config.collections.rejects,
                "deletes": [{ "q": { "$or": chunk.to_vec() }, "limit": 0 }],
            };
            let reply = self
                .db
                .run_command(command)
                .session(&mut *session)
                .await
                .map_err(Error::mongo(Action::Transaction))?;
            let namespace = format!("{}.{}", self.db.name(), self.config.collections.rejects);
            check_write_errors(&reply, &namespace)?;
        }
        Ok(())
    }

    async fn load_targets(
        &self,
        session: &mut ClientSession,
        keys: &[&Key],
    ) -> Result<HashMap<Key, TargetSlot>, Error> {
        let mut targets = HashMap::new();
        let mut unique: Vec<&Key> = keys.to_vec();
        unique.sort();
        unique.dedup();
        for chunk in unique.chunks(MAX_LOOKUP_KEYS) {
            let filters: Vec<Document> = chunk.iter().map(|key| key.filter()).collect();
            let mut cursor = self
                .target
                .find(doc! { "$or": filters })
                .session(&mut *session)
                .await
                .map_err(Error::mongo(Action::Transaction))?;
            while let Some(document) = cursor.next(&mut *session).await {
                let document = document.map_err(Error::mongo(Action::Transaction))?;
                let Some(key) = target_key(&document) else {
                    continue;
                };
                targets.insert(
                    key,
                    TargetSlot {
                        document: Some(document),
                        existed: true,
                    },
                );
            }
        }
        Ok(targets)
    }

    /// Sends `statements` as `update` commands of bounded size inside the transaction.
    ///
    /// `Client::bulk_write` needs MongoDB 8.0; the plain `update` command batches upserts on
    /// every supported server. Its per-statement `writeErrors` arrive in a successful reply,
    /// so they are checked here.
    async fn run_updates(
        &self,
        session: &mut ClientSession,
        collection: &str,
        statements: Vec<Document>,
    ) -> Result<(), Error> {
        let mut chunk: Vec<Document> = Vec::new();
        let mut chunk_bytes = 0;
        let mut statements = statements.into_iter().peekable();
        while let Some(statement) = statements.next() {
            chunk_bytes += document_size(&statement);
            chunk.push(statement);
            let full = chunk_bytes >= MAX_COMMAND_BYTES || chunk.len() >= MAX_COMMAND_STATEMENTS;
            if full || statements.peek().is_none() {
                let command = doc! {
                    "update": collection,
                    "updates": std::mem::take(&mut chunk),
                    "ordered": true,
                };
                chunk_bytes = 0;
                let reply = self
                    .db
                    .run_command(command)
                    .session(&mut *session)
                    .await
                    .map_err(|source| {
                        if retry::classify(&source) == Failure::Refused {
                            Error::Refused {
                                namespace: format!("{}.{collection}", self.db.name()),
                                code: retry::server_code(&source).unwrap_or_default(),
                                message: crate::error::describe(&source),
                            }
                        } else {
                            Error::mongo(Action::Transaction)(source)
                        }
                    })?;
                check_write_errors(&reply, &format!("{}.{collection}", self.db.name()))?;
            }
        }
        Ok(())
    }
}

/// A target document as loaded or merged during one transaction.
struct TargetSlot {
    document: Option<Document>,
    existed: bool,
}

fn target_key(document: &Document) -> Option<Key> {
    Some(Key {
        entity_name: document.get_str("entity_name").ok()?.to_string(),
        entity_type: document.get_str("entity_type").ok()?.to_string(),
        date: chrono::NaiveDate::parse_from_str(document.get_str("date").ok()?, "%Y-%m-%d").ok()?,
    })
}

/// Identifies a staging document across a batch: its collection and `_id`.
fn record_key(change: &Change) -> (String, String) {
    (change.collection.clone(), change.staging_id.to_string())
}

/// The last outcome of each staging document in a batch: a reject upsert when its last
/// version was invalid, or the removal of its old reject record when it merged.
#[derive(Default)]
struct RejectRecords {
    /// Position in `outcomes` per staging document (collection and `_id`).
    index: HashMap<(String, String), usize>,
    outcomes: Vec<RejectOutcome>,
}

enum RejectOutcome {
    Upsert(Document),
    Remove(Document),
}

impl RejectRecords {
    fn merged(&mut self, change: &Change) {
        // An inserted staging document has no earlier version, so no reject record to remove;
        // skipping it spares the common batch the extra delete command.
        if change.is_insert && !self.index.contains_key(&record_key(change)) {
            return;
        }
        let filter = doc! { "source": &change.collection, "staging_id": change.staging_id.clone() };
        self.record(change, RejectOutcome::Remove(filter));
    }

    fn rejected(&mut self, change: &Change, statement: Document) {
        self.record(change, RejectOutcome::Upsert(statement));
    }

    fn record(&mut self, change: &Change, outcome: RejectOutcome) {
        let key = record_key(change);
        match self.index.get(&key) {
            Some(&position) => self.outcomes[position] = outcome,
            None => {
                self.index.insert(key, self.outcomes.len());
                self.outcomes.push(outcome);
            }
        }
    }

    /// Returns the reject upserts and the filters of reject records to remove.
    fn into_writes(self) -> (Vec<Document>, Vec<Document>) {
        let mut upserts = Vec::new();
        let mut removals = Vec::new();
        for outcome in self.outcomes {
            match outcome {
                RejectOutcome::Upsert(statement) => upserts.push(statement),
                RejectOutcome::Remove(filter) => removals.push(filter),
            }
        }
        (upserts, removals)
    }
}

fn reject_statement(
    change: &Change,
    reasons: &[String],
    keep_document: bool,
    now: DateTime,
) -> Document {
    let document = match (&change.operation, keep_document) {
        (Operation::Upsert(Some(document)), true) => Bson::Document(document.clone()),
        _ => Bson::Null,
    };
    let cluster_time = change
        .position
        .cluster_time
        .map_or(Bson::Null, Bson::Timestamp);
    doc! {
        "q": { "source": &change.collection, "staging_id": change.staging_id.clone() },
        "u": {
            "$set": {
                "document": document,
                "reasons": reasons.to_vec(),
                "cluster_time": cluster_time,
                "rejected_at": now,
            },
        },
        "upsert": true,
    }
}

/// Turns a lone event that the server refused into a reject, or, when the reject itself was
/// refused, into a reject without the staging document.
fn refused_to_reject<'c>(
    planned: &Planned<'c>,
    namespace: &str,
    code: i32,
    message: &str,
) -> Result<Planned<'c>, Error> {
    let reason = format!("the server refused the write to {namespace}: {message} (code {code})");
    match planned {
        Planned::Merge { change, record } => Ok(Planned::Reject {
            change,
            reasons: vec![format!("merging into {} failed: {reason}", record.key())],
            keep_document: true,
        }),
        Planned::Reject {
            change,
            reasons,
            keep_document: true,
        } => {
            let mut reasons = reasons.clone();
            reasons.push(format!(
                "the staging document was left out of this reject: {reason}"
            ));
            Ok(Planned::Reject {
                change,
                reasons,
                keep_document: false,
            })
        }
        // Nothing is left to drop: the write that fails is the position or a bare reject.
        _ => Err(Error::Refused {
            namespace: namespace.to_string(),
            code,
            message: message.to_string(),
        }),
    }
}

fn check_write_errors(reply: &Document, namespace: &str) -> Result<(), Error> {
    let Ok(errors) = reply.get_array("writeErrors") else {
        return Ok(());
    };
    let Some(Bson::Document(first)) = errors.first() else {
        return Ok(());
    };
    let code = match first.get("code") {
        Some(Bson::Int32(code)) => *code,
        Some(Bson::Int64(code)) => *code as i32,
        _ => 0,
    };
    let message = first.get_str("errmsg").unwrap_or("no message").to_string();
    match retry::classify_write_error(code) {
        Failure::Refused => Err(Error::Refused {
            namespace: namespace.to_string(),
            code,
            message,
        }),
        _ => Err(Error::InvalidState {
            namespace: namespace.to_string(),
            problem: format!("write failed with code {code}: {message}"),
        }),
    }
}

fn is_transient(error: &Error) -> bool {
    match error {
        Error::Mongo { error, .. } => retry::classify(error) == Failure::TransientTransaction,
        _ => false,
    }
}

fn document_size(document: &Document) -> usize {
    let mut bytes = Vec::new();
    match document.to_writer(&mut bytes) {
        Ok(()) => bytes.len(),
        Err(_) => MAX_COMMAND_BYTES,
    }
}

/// Describes a merged target in one line: sct, cases, satisfaction and survey counts.
fn summarize(document: &Document) -> String {
    let metrics = document.get_document("metrics").ok();
    let field = |name: &str| {
        metrics
            .and_then(|metrics| metrics.get(name))
            .map_or_else(|| "-".to_string(), |value| value.to_string())
    };
    let answers = metrics
        .and_then(|metrics| metrics.get_document("customerSatisfaction").ok())
        .map(|counts| {
            let count = |name| {
                counts
                    .get(name)
                    .map_or_else(|| "-".to_string(), |value| value.to_string())
            };
            format!("{}/{}/{}", count("csat"), count("neutral"), count("dsat"))
        })
        .unwrap_or_else(|| "-".to_string());
    format!(
        "sct={} cases={} satisfaction={} csat/neutral/dsat={}",
        field("sct"),
        field("cases"),
        field("satisfaction"),
        answers
    )
}

fn emit_logs(logs: Vec<EventLog>, reject_logs: Vec<RejectLog>) {
    for log in reject_logs {
        warn!(
            collection = log.collection,
            staging_id = %log.staging_id,
            reasons = log.reasons,
            "Rejected a staging document."
        );
    }
    for log in logs {
        debug!(
            source = log.collection,
            data_type = log.data_type,
            staging_id = %log.staging_id,
            key = log.key,
            existed = log.existed,
            changed = ?log.changed,
            record = log.summary,
            "Merged a staging document."
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_errors_become_refusals() {
        let reply = doc! {
            "ok": 1, "n": 0,
            "writeErrors": [{ "index": 0, "code": 17419, "errmsg": "Resulting document after update is larger than 16777216" }],
        };
        match check_write_errors(&reply, "db.coll") {
            Err(Error::Refused { code, message, .. }) => {
                assert_eq!(code, 17419);
                assert!(message.contains("larger than"), "{message}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(check_write_errors(&doc! { "ok": 1, "n": 3 }, "db.coll").is_ok());
    }

    #[test]
    fn summary_names_key_numbers() {
        let document = doc! {
            "metrics": { "sct": 2.5, "cases": 15, "satisfaction": 87,
                         "customerSatisfaction": { "csat": 13, "neutral": 2, "dsat": 0 } },
        };
        assert_eq!(
            summarize(&document),
            "sct=2.5 cases=15 satisfaction=87 csat/neutral/dsat=13/2/0"
        );
    }
}
