//! The state store: the documents in the state collection that record how far the change
//! stream has been merged and which resets were requested. Every write of the stored
//! position goes through this module: [`StateStore::store_position`] runs inside the same
//! transaction as the merges it covers, so the position and the merged data can never
//! disagree.
//!
//! Writes are fenced. The stream document carries the epoch of the instance that last
//! claimed it, and a write succeeds only while that is still the writer's own epoch and no
//! reset is pending. A takeover claims the document before reading the position, and a
//! reset request marks it, so an old holder's transaction that is still open conflicts with
//! that write or finds the changed document, and aborts.

use chrono::NaiveDate;
use futures::TryStreamExt;
use mongodb::bson::oid::ObjectId;
use mongodb::bson::{doc, Bson, DateTime, Document, Timestamp};
use mongodb::options::{ReadConcern, WriteConcern};
use mongodb::{ClientSession, Collection, Database};

use crate::config::Config;
use crate::error::{Action, Error};
use crate::retry::{self, Failure};

/// `_id` of the state document that contains the stream position.
pub const STREAM_STATE_ID: &str = "stream";
/// Value of `kind` in reset request documents.
const RESET_KIND: &str = "reset";

/// A point in the change stream: the resume token to start after, and its cluster time when
/// known (for logs and lag).
#[derive(Debug, Clone, PartialEq)]
pub struct Position {
    pub resume_token: Document,
    pub cluster_time: Option<Timestamp>,
}

impl Position {
    /// Formats the position for logs: the cluster time, else the token itself.
    pub fn describe(&self) -> String {
        match self.cluster_time {
            Some(time) => format!("{}.{}", time.time, time.increment),
            None => self.resume_token.to_string(),
        }
    }

    /// Formats the cluster time for messages, or "unknown".
    pub fn cluster_time_text(&self) -> String {
        match self.cluster_time {
            Some(time) => timestamp_text(time),
            None => "unknown".to_string(),
        }
    }
}

/// Formats a cluster time as `seconds.increment (RFC 3339)`.
pub fn timestamp_text(time: Timestamp) -> String {
    let wall = chrono::DateTime::from_timestamp(i64::from(time.time), 0)
        .map(|instant| instant.to_rfc3339())
        .unwrap_or_default();
    format!("{}.{} ({wall})", time.time, time.increment)
}

/// Starting point of the next change stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Resume {
    /// Just after a stored resume token.
    After(Position),
    /// At a cluster time, set by `perfagg reset --since`; replaced by a token with the
    /// first commit.
    AtTime(Timestamp),
}

/// Counts added to the state document's running totals by one commit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub events: u64,
    pub merged: u64,
    pub rejected: u64,
}

/// Contents of the stream document.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stored {
    pub resume: Option<Resume>,
    /// The watch filter in force when the position was stored.
    pub watch: Option<Document>,
}

/// Kind of reset.
#[derive(Debug, Clone, PartialEq)]
pub enum ResetMode {
    /// Replay the change stream from a cluster time.
    Since(Timestamp),
    /// Merge the staging documents again (those dated on or after the day, if given), then
    /// continue the stream from when the rescan began.
    Rescan(Option<NaiveDate>),
    /// Skip the backlog and continue from the current time.
    ToNow,
    /// Clear perfagg's fields in every target document, then rescan everything.
    Rebuild,
}

impl ResetMode {
    /// Returns the name stored in the request document and shown by `status`.
    pub fn name(&self) -> &'static str {
        match self {
            ResetMode::Since(_) => "since",
            ResetMode::Rescan(_) => "rescan",
            ResetMode::ToNow => "to_now",
            ResetMode::Rebuild => "rebuild",
        }
    }
}

/// A reset request stored in the state collection.
#[derive(Debug, Clone, PartialEq)]
pub struct ResetRequest {
    pub id: ObjectId,
    pub mode: ResetMode,
    /// `user@host` of the user who ran `perfagg reset`.
    pub requested_by: String,
    pub requested_at: DateTime,
}

impl ResetRequest {
    fn to_document(&self) -> Document {
        let mut document = doc! {
            "_id": self.id,
            "kind": RESET_KIND,
            "mode": self.mode.name(),
            "requested_by": &self.requested_by,
            "requested_at": self.requested_at,
            "status": "pending",
        };
        match &self.mode {
            ResetMode::Since(time) => {
                document.insert("since", *time);
            }
            ResetMode::Rescan(Some(day)) => {
                document.insert("since_date", day.format("%Y-%m-%d").to_string());
            }
            _ => {}
        }
        document
    }

    fn from_document(document: &Document) -> Option<ResetRequest> {
        let mode = match document.get_str("mode").ok()? {
            "since" => ResetMode::Since(document.get_timestamp("since").ok()?),
            "rescan" => ResetMode::Rescan(
                document
                    .get_str("since_date")
                    .ok()
                    .and_then(|day| NaiveDate::parse_from_str(day, "%Y-%m-%d").ok()),
            ),
            "to_now" => ResetMode::ToNow,
            "rebuild" => ResetMode::Rebuild,
            _ => return None,
        };
        Some(ResetRequest {
            id: document.get_object_id("_id").ok()?,
            mode,
            requested_by: document
                .get_str("requested_by")
                .unwrap_or("unknown")
                .to_string(),
            requested_at: document.get_datetime("requested_at").ok().copied()?,
        })
    }
}

/// Reads and writes the state collection.
#[derive(Debug, Clone)]
pub struct StateStore {
    coll: Collection<Document>,
    /// The watch filter written beside the position, so a later run can tell when the
    /// configured staging collections changed.
    watched: Document,
    /// The lease epoch that fences this store's writes; `None` for read-only use.
    epoch: Option<i64>,
}

impl StateStore {
    pub fn new(db: &Database, config: &Config) -> StateStore {
        let collections = &config.collections;
        StateStore {
            coll: db.collection(&collections.state),
            watched: doc! {
                "database": &config.mongodb.database,
                "collections": [&collections.metrics, &collections.surveys],
            },
            epoch: None,
        }
    }

    /// Returns a store whose writes are fenced by the lease `epoch`.
    pub fn fenced(mut self, epoch: i64) -> StateStore {
        self.epoch = Some(epoch);
        self
    }

    /// Returns the watch filter of the current configuration.
    pub fn watched(&self) -> &Document {
        &self.watched
    }

    /// Returns the state collection's `db.coll` name, for messages.
    pub fn namespace(&self) -> String {
        self.coll.namespace().to_string()
    }

    /// Marks the stream document with this store's epoch, unless a newer epoch already
    /// marked it. Call after acquiring the lease and before loading the position.
    ///
    /// # Errors
    ///
    /// [`Error::LeaseLost`] when a newer epoch claimed the document, [`Error::Mongo`] when
    /// the write fails.
    pub async fn claim(&self) -> Result<(), Error> {
        let epoch = self.require_epoch()?;
        let filter = doc! {
            "_id": STREAM_STATE_ID,
            "$or": [{ "epoch": { "$lte": epoch } }, { "epoch": { "$exists": false } }],
        };
        let result = self
            .coll
            .update_one(
                filter,
                doc! { "$set": { "epoch": epoch, "claimed_at": DateTime::now() } },
            )
            .upsert(true)
            .write_concern(WriteConcern::majority())
            .await;
        match result {
            Ok(_) => Ok(()),
            // The filter did not match, so the upsert collided with the existing document,
            // which a newer epoch has claimed.
            Err(error) if retry::classify(&error) == Failure::DuplicateKey => {
                Err(Error::LeaseLost { epoch })
            }
            Err(error) => Err(Error::mongo(Action::StoreState)(error)),
        }
    }

    /// Loads the stored starting point and watch filter.
    ///
    /// # Errors
    ///
    /// [`Error::Mongo`] when the read fails and [`Error::InvalidState`] when the stored
    /// resume token is not a document.
    pub async fn load(&self) -> Result<Stored, Error> {
        let Some(stored) = self.read_stream_document().await? else {
            return Ok(Stored::default());
        };
        let watch = stored.get_document("watch").ok().cloned();
        let cluster_time = match stored.get("cluster_time") {
            Some(Bson::Timestamp(time)) => Some(*time),
            _ => None,
        };
        let resume = match (stored.get("resume_token"), stored.get("start_at")) {
            (Some(Bson::Document(token)), _) => Some(Resume::After(Position {
                resume_token: token.clone(),
                cluster_time,
            })),
            (Some(Bson::Null) | None, Some(Bson::Timestamp(time))) => Some(Resume::AtTime(*time)),
            (Some(Bson::Null) | None, _) => None,
            (Some(other), _) => {
                return Err(Error::InvalidState {
                    namespace: self.namespace(),
                    problem: format!("resume_token is {other}, not a document"),
                })
            }
        };
        Ok(Stored { resume, watch })
    }

    /// Reads the stream document as stored, for `status`.
    ///
    /// # Errors
    ///
    /// [`Error::Mongo`] when the read fails.
    pub async fn read_stream_document(&self) -> Result<Option<Document>, Error> {
        self.coll
            .find_one(doc! { "_id": STREAM_STATE_ID })
            .read_concern(ReadConcern::majority())
            .await
            .map_err(Error::mongo(Action::LoadState))
    }

    /// Stores `position` outside a transaction, with majority write concern. Used only for
    /// the starting position of a first run, before any merge exists that it could disagree
    /// with.
    ///
    /// # Errors
    ///
    /// [`Error::LeaseLost`] or [`Error::ResetRequested`] when the fence fails, and
    /// [`Error::Mongo`] with [`Action::StoreState`].
    pub async fn store_start(&self, position: &Position) -> Result<(), Error> {
        let epoch = self.require_epoch()?;
        let result = self
            .coll
            .update_one(
                self.fence(epoch),
                position_update(&self.watched, position, Totals::default()),
            )
            .write_concern(WriteConcern::majority())
            .await
            .map_err(Error::mongo(Action::StoreState))?;
        if result.matched_count == 0 {
            return Err(self.fence_failure(epoch, None).await);
        }
        Ok(())
    }

    /// Stores `position` and adds `totals` inside the caller's transaction, if the fence
    /// holds. Without a position (the batches of a rescan), only checks the epoch and adds
    /// the totals.
    ///
    /// # Errors
    ///
    /// [`Error::LeaseLost`] when another epoch claimed the stream document,
    /// [`Error::ResetRequested`] when a reset is pending, and [`Error::Mongo`] with
    /// [`Action::Transaction`]; the caller aborts in every case.
    pub async fn store_position(
        &self,
        session: &mut ClientSession,
        position: Option<&Position>,
        totals: Totals,
    ) -> Result<(), Error> {
        let epoch = self.require_epoch()?;
        let (filter, update) = match position {
            Some(position) => (
                self.fence(epoch),
                position_update(&self.watched, position, totals),
            ),
            None => (
                doc! { "_id": STREAM_STATE_ID, "epoch": epoch },
                doc! { "$inc": totals_increment(totals) },
            ),
        };
        let result = self
            .coll
            .update_one(filter, update)
            .session(&mut *session)
            .await
            .map_err(Error::mongo(Action::Transaction))?;
        if result.matched_count == 0 {
            return Err(self.fence_failure(epoch, Some(session)).await);
        }
        Ok(())
    }

    /// Stores a reset request and marks the stream document, so the running instance's next
    /// commit fails its fence and no batch of the old position commits after this returns.
    ///
    /// # Errors
    ///
    /// [`Error::Mongo`] with [`Action::StoreState`].
    pub async fn request_reset(&self, request: &ResetRequest) -> Result<(), Error> {
        self.coll
            .insert_one(request.to_document())
            .write_concern(WriteConcern::majority())
            .await
            .map_err(Error::mongo(Action::StoreState))?;
        self.coll
            .update_one(
                doc! { "_id": STREAM_STATE_ID },
                doc! { "$set": { "reset_pending": request.id } },
            )
            .upsert(true)
            .write_concern(WriteConcern::majority())
            .await
            .map_err(Error::mongo(Action::StoreState))?;
        Ok(())
    }

    /// Returns the oldest pending reset request, if any.
    ///
    /// # Errors
    ///
    /// [`Error::Mongo`] when the read fails, [`Error::InvalidState`] for a request document
    /// that perfagg did not write.
    pub async fn pending_reset(&self) -> Result<Option<ResetRequest>, Error> {
        let found = self
            .coll
            .find_one(doc! { "kind": RESET_KIND, "status": "pending" })
            .sort(doc! { "requested_at": 1 })
            .read_concern(ReadConcern::majority())
            .await
            .map_err(Error::mongo(Action::LoadState))?;
        let Some(found) = found else {
            return Ok(None);
        };
        match ResetRequest::from_document(&found) {
            Some(request) => Ok(Some(request)),
            None => Err(Error::InvalidState {
                namespace: self.namespace(),
                problem: format!("reset request {found} is malformed"),
            }),
        }
    }

    /// Returns whether the stream document is marked with a pending reset; a cheap check the
    /// daemon makes between batches.
    ///
    /// # Errors
    ///
    /// [`Error::Mongo`] when the read fails.
    pub async fn is_reset_pending(&self) -> Result<bool, Error> {
        let found = self
            .coll
            .find_one(doc! { "_id": STREAM_STATE_ID, "reset_pending": { "$exists": true } })
            .projection(doc! { "_id": 1 })
            .await
            .map_err(Error::mongo(Action::LoadState))?;
        Ok(found.is_some())
    }

    /// Removes a pending-reset mark whose request is no longer pending (deleted by hand, for
    /// example), which would otherwise fence every commit forever.
    ///
    /// # Errors
    ///
    /// [`Error::Mongo`] when the read or write fails.
    pub async fn clear_stale_reset_mark(&self) -> Result<(), Error> {
        if !self.is_reset_pending().await? || self.pending_reset().await?.is_some() {
            return Ok(());
        }
        tracing::warn!("Cleared a pending-reset mark whose request is gone.");
        self.coll
            .update_one(
                doc! { "_id": STREAM_STATE_ID },
                doc! { "$unset": { "reset_pending": "" } },
            )
            .write_concern(WriteConcern::majority())
            .await
            .map_err(Error::mongo(Action::StoreState))?;
        Ok(())
    }

    /// Returns the most recent reset requests, newest first, as stored.
    ///
    /// # Errors
    ///
    /// [`Error::Mongo`] when the read fails.
    pub async fn recent_resets(&self, limit: i64) -> Result<Vec<Document>, Error> {
        let cursor = self
            .coll
            .find(doc! { "kind": RESET_KIND })
            .sort(doc! { "requested_at": -1 })
            .limit(limit)
            .await
            .map_err(Error::mongo(Action::LoadState))?;
        cursor
            .try_collect()
            .await
            .map_err(Error::mongo(Action::LoadState))
    }

    /// Completes a reset in one transaction: stores where the stream continues, clears the
    /// pending mark and records the outcome in the request, fenced by the epoch.
    ///
    /// # Errors
    ///
    /// [`Error::LeaseLost`] when another epoch claimed the stream document, and
    /// [`Error::Mongo`].
    pub async fn finish_reset(
        &self,
        session: &mut ClientSession,
        request: &ResetRequest,
        resume: &Resume,
        detail: Document,
    ) -> Result<(), Error> {
        let epoch = self.require_epoch()?;
        let now = DateTime::now();
        let update = match resume {
            Resume::After(position) => position_update(&self.watched, position, Totals::default()),
            Resume::AtTime(time) => doc! {
                "$set": { "resume_token": Bson::Null, "cluster_time": Bson::Null, "start_at": *time,
                          "watch": self.watched.clone(), "updated_at": now },
            },
        };
        let stored = self
            .coll
            .update_one(doc! { "_id": STREAM_STATE_ID, "epoch": epoch }, update)
            .session(&mut *session)
            .await
            .map_err(Error::mongo(Action::Transaction))?;
        if stored.matched_count == 0 {
            return Err(Error::LeaseLost { epoch });
        }
        // A request that arrived meanwhile keeps its mark and is performed next.
        self.coll
            .update_one(
                doc! { "_id": STREAM_STATE_ID, "reset_pending": request.id },
                doc! { "$unset": { "reset_pending": "" } },
            )
            .session(&mut *session)
            .await
            .map_err(Error::mongo(Action::Transaction))?;
        self.coll
            .update_one(
                doc! { "_id": request.id },
                doc! { "$set": { "status": "done", "performed_at": now, "performed_epoch": epoch, "detail": detail } },
            )
            .session(&mut *session)
            .await
            .map_err(Error::mongo(Action::Transaction))?;
        Ok(())
    }

    /// Returns the condition of every position write: this epoch, and no reset pending.
    fn fence(&self, epoch: i64) -> Document {
        doc! { "_id": STREAM_STATE_ID, "epoch": epoch, "reset_pending": { "$exists": false } }
    }

    /// Tells apart the two reasons a fenced write matched nothing.
    async fn fence_failure(&self, epoch: i64, session: Option<&mut ClientSession>) -> Error {
        let lookup = self.coll.find_one(
            doc! { "_id": STREAM_STATE_ID, "epoch": epoch, "reset_pending": { "$exists": true } },
        );
        let reset_pending = match session {
            Some(session) => lookup.session(session).await,
            None => lookup.await,
        };
        match reset_pending {
            Ok(Some(_)) => Error::ResetRequested,
            _ => Error::LeaseLost { epoch },
        }
    }

    fn require_epoch(&self) -> Result<i64, Error> {
        self.epoch.ok_or_else(|| Error::InvalidState {
            namespace: self.namespace(),
            problem: "a write was attempted without holding the lease".to_string(),
        })
    }
}

fn position_update(watched: &Document, position: &Position, totals: Totals) -> Document {
    let cluster_time = position.cluster_time.map_or(Bson::Null, Bson::Timestamp);
    doc! {
        "$set": {
            "resume_token": position.resume_token.clone(),
            "cluster_time": cluster_time,
            "watch": watched.clone(),
            "updated_at": DateTime::now(),
        },
        "$unset": { "start_at": "" },
        "$inc": totals_increment(totals),
    }
}

fn totals_increment(totals: Totals) -> Document {
    doc! {
        "totals.events": totals.events as i64,
        "totals.merged": totals.merged as i64,
        "totals.rejected": totals.rejected as i64,
    }
}
