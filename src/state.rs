//! The state store: the one document in the state collection that records how far the
//! change stream has been merged. Every write of the stored position goes through this
//! module: [`StateStore::store_position`] runs inside the same transaction as the merges it
//! covers, so the position and the merged data can never disagree.
//!
//! Writes are fenced by the lease epoch: the stream document carries the epoch of the
//! instance that last claimed it, and a write succeeds only while that is still the
//! writer's own. A takeover claims the document before reading the position, so an old
//! holder's transaction that is still open conflicts with the claim or finds a newer epoch,
//! and aborts.

use mongodb::bson::{doc, Bson, DateTime, Document, Timestamp};
use mongodb::options::{ReadConcern, WriteConcern};
use mongodb::{ClientSession, Collection, Database};

use crate::config::Config;
use crate::error::{Action, Error};
use crate::retry::{self, Failure};

/// `_id` of the state document that holds the stream position.
pub const STREAM_STATE_ID: &str = "stream";

/// A point in the change stream: the resume token to start after, and its cluster time when
/// known (for logs and lag).
#[derive(Debug, Clone, PartialEq)]
pub struct Position {
    pub resume_token: Document,
    pub cluster_time: Option<Timestamp>,
}

impl Position {
    /// A short form for logs: the cluster time, else the token itself.
    pub fn describe(&self) -> String {
        match self.cluster_time {
            Some(time) => format!("{}.{}", time.time, time.increment),
            None => self.resume_token.to_string(),
        }
    }

    /// The cluster time as text for messages, or "unknown".
    pub fn cluster_time_text(&self) -> String {
        match self.cluster_time {
            Some(time) => {
                let seconds = i64::from(time.time);
                let wall = chrono::DateTime::from_timestamp(seconds, 0)
                    .map(|instant| instant.to_rfc3339())
                    .unwrap_or_default();
                format!("{}.{} ({wall})", time.time, time.increment)
            }
            None => "unknown".to_string(),
        }
    }
}

/// Counts added to the state document's running totals by one commit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub events: u64,
    pub merged: u64,
    pub rejected: u64,
}

/// What the state document holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stored {
    pub position: Option<Position>,
    /// The watch filter in force when the position was stored.
    pub watch: Option<Document>,
}

/// Reads and writes the state document.
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

    /// A store whose writes are fenced by the lease `epoch`.
    pub fn fenced(mut self, epoch: i64) -> StateStore {
        self.epoch = Some(epoch);
        self
    }

    /// The watch filter of the current configuration.
    pub fn watched(&self) -> &Document {
        &self.watched
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
            "$or": [{ "epoch": { "$lt": epoch } }, { "epoch": { "$exists": false } }, { "epoch": epoch }],
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
            Err(error) if retry::classify(&error) == Failure::DuplicateKey => {
                Err(Error::LeaseLost { epoch })
            }
            Err(error) => Err(Error::mongo(Action::StoreState)(error)),
        }
    }

    /// The state collection's `db.coll` name, for messages.
    pub fn namespace(&self) -> String {
        self.coll.namespace().to_string()
    }

    /// Loads the stored position and watch filter.
    ///
    /// # Errors
    ///
    /// [`Error::Mongo`] when the read fails and [`Error::InvalidState`] when the stored
    /// resume token is not a document.
    pub async fn load(&self) -> Result<Stored, Error> {
        let stored = self
            .coll
            .find_one(doc! { "_id": STREAM_STATE_ID })
            .read_concern(ReadConcern::majority())
            .await
            .map_err(Error::mongo(Action::LoadState))?;
        let Some(stored) = stored else {
            return Ok(Stored::default());
        };
        let watch = stored.get_document("watch").ok().cloned();
        let resume_token = match stored.get("resume_token") {
            Some(Bson::Document(token)) => token.clone(),
            Some(Bson::Null) | None => {
                return Ok(Stored {
                    position: None,
                    watch,
                })
            }
            Some(other) => {
                return Err(Error::InvalidState {
                    namespace: self.namespace(),
                    problem: format!("resume_token is {other}, not a document"),
                })
            }
        };
        let cluster_time = match stored.get("cluster_time") {
            Some(Bson::Timestamp(time)) => Some(*time),
            _ => None,
        };
        Ok(Stored {
            position: Some(Position {
                resume_token,
                cluster_time,
            }),
            watch,
        })
    }

    /// Stores `position` outside a transaction, with majority write concern. Used only for
    /// the starting position of a first run, before any merge exists that it could disagree
    /// with.
    ///
    /// # Errors
    ///
    /// [`Error::Mongo`] with [`Action::StoreState`].
    pub async fn store_start(&self, position: &Position) -> Result<(), Error> {
        let epoch = self.require_epoch()?;
        let result = self
            .coll
            .update_one(
                doc! { "_id": STREAM_STATE_ID, "epoch": epoch },
                self.position_update(position, Totals::default()),
            )
            .write_concern(WriteConcern::majority())
            .await
            .map_err(Error::mongo(Action::StoreState))?;
        if result.matched_count == 0 {
            return Err(Error::LeaseLost { epoch });
        }
        Ok(())
    }

    /// Stores `position` and adds `totals` inside the caller's transaction, if the stream
    /// document still carries this store's epoch.
    ///
    /// # Errors
    ///
    /// [`Error::LeaseLost`] when another epoch claimed the stream document, and
    /// [`Error::Mongo`] with [`Action::Transaction`]; the caller aborts either way.
    pub async fn store_position(
        &self,
        session: &mut ClientSession,
        position: &Position,
        totals: Totals,
    ) -> Result<(), Error> {
        let epoch = self.require_epoch()?;
        let result = self
            .coll
            .update_one(
                doc! { "_id": STREAM_STATE_ID, "epoch": epoch },
                self.position_update(position, totals),
            )
            .session(session)
            .await
            .map_err(Error::mongo(Action::Transaction))?;
        if result.matched_count == 0 {
            return Err(Error::LeaseLost { epoch });
        }
        Ok(())
    }

    fn require_epoch(&self) -> Result<i64, Error> {
        self.epoch.ok_or_else(|| Error::InvalidState {
            namespace: self.namespace(),
            problem: "a write was attempted without holding the lease".to_string(),
        })
    }

    fn position_update(&self, position: &Position, totals: Totals) -> Document {
        let cluster_time = position.cluster_time.map_or(Bson::Null, Bson::Timestamp);
        doc! {
            "$set": {
                "resume_token": position.resume_token.clone(),
                "cluster_time": cluster_time,
                "watch": self.watched.clone(),
                "updated_at": DateTime::now(),
            },
            "$inc": {
                "totals.events": totals.events as i64,
                "totals.merged": totals.merged as i64,
                "totals.rejected": totals.rejected as i64,
            },
        }
    }
}
