//! The lease: at most one perfagg instance merges at a time. The holder's owner id, an epoch
//! that grows with every acquisition, and an expiry computed from the server's clock live in
//! one document of the state collection. Standbys poll it and take over once it has expired.
//!
//! The lease alone cannot stop a paused leader whose clock is wrong, so every merge
//! transaction is also fenced. The state store writes the stream position only while the
//! stream document still carries the writer's epoch, and a new holder claims that document
//! with its own epoch before it reads the position (see `StateStore::claim`).

use std::time::Duration;

use mongodb::bson::{doc, Bson, DateTime, Document};
use mongodb::options::WriteConcern;
use mongodb::{Collection, Database};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Config;
use crate::error::{describe, Action, Error};

/// `_id` of the lease document in the state collection.
pub const LEASE_ID: &str = "lease";

/// Identity of this process, written into the lease so operators see which host has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// `host:pid:random`, unique per process start.
    pub id: String,
    pub host: String,
    pub pid: u32,
}

impl Owner {
    /// Returns the owner identity of this process.
    pub fn of_this_process() -> Owner {
        let host = hostname::get()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "unknown-host".to_string());
        let pid = std::process::id();
        let nonce = mongodb::bson::oid::ObjectId::new().to_hex();
        Owner {
            id: format!("{host}:{pid}:{}", &nonce[16..]),
            host,
            pid,
        }
    }
}

/// The lease as seen in the state collection.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseView {
    pub owner: String,
    pub epoch: i64,
    pub expires_at: Option<DateTime>,
    /// Id (`lsid`) of the merge session that the last holder recorded, if any.
    pub session: Option<Document>,
}

/// A held lease: its epoch fences this holder's commits.
#[derive(Debug, Clone)]
pub struct Held {
    pub epoch: i64,
    /// Cancelled when the lease is lost or could not be renewed in time.
    pub lost: CancellationToken,
}

/// Reads and writes the lease document.
#[derive(Debug, Clone)]
pub struct Lease {
    coll: Collection<Document>,
    owner: Owner,
    ttl: Duration,
}

impl Lease {
    pub fn new(db: &Database, config: &Config, owner: Owner) -> Lease {
        Lease {
            coll: db.collection(&config.collections.state),
            owner,
            ttl: config.lease.ttl,
        }
    }

    pub fn owner(&self) -> &Owner {
        &self.owner
    }

    /// Takes the lease if it is free, expired or already ours, raising its epoch.
    /// Returns `None` while another owner has it.
    ///
    /// # Errors
    ///
    /// [`Error::Mongo`] when the server cannot be reached.
    pub async fn try_acquire(&self) -> Result<Option<i64>, Error> {
        // Make sure a lease document exists; an expired one is free to take.
        self.coll
            .update_one(
                doc! { "_id": LEASE_ID },
                doc! { "$setOnInsert": { "epoch": 0_i64, "expires_at": DateTime::from_millis(0) } },
            )
            .upsert(true)
            .write_concern(WriteConcern::majority())
            .await
            .map_err(Error::mongo(Action::Lease))?;

        // The expiry is compared and set with the server's clock ($$NOW), so hosts with
        // skewed clocks agree on when a lease has expired.
        let ttl_ms = self.ttl.as_millis() as i64;
        let filter = doc! {
            "_id": LEASE_ID,
            "$or": [
                { "owner": &self.owner.id },
                { "$expr": { "$lt": ["$expires_at", "$$NOW"] } },
            ],
        };
        let update = vec![doc! {
            "$set": {
                "owner": &self.owner.id,
                "host": &self.owner.host,
                "pid": i64::from(self.owner.pid),
                "epoch": { "$add": [{ "$ifNull": ["$epoch", 0_i64] }, 1_i64] },
                "acquired_at": "$$NOW",
                "renewed_at": "$$NOW",
                "expires_at": { "$add": ["$$NOW", ttl_ms] },
            }
        }];
        let result = self
            .coll
            .update_one(filter, update)
            .write_concern(WriteConcern::majority())
            .await
            .map_err(Error::mongo(Action::Lease))?;
        if result.matched_count == 0 {
            return Ok(None);
        }
        match self.read().await? {
            Some(view) if view.owner == self.owner.id => {
                if let Some(session) = &view.session {
                    self.end_session(session).await;
                }
                Ok(Some(view.epoch))
            }
            _ => Ok(None),
        }
    }

    /// Records the holder's merge session, so that the next holder can end it.
    ///
    /// # Errors
    ///
    /// [`Error::LeaseLost`] when another owner or epoch holds the lease, and
    /// [`Error::Mongo`] when the write fails.
    pub async fn record_session(&self, epoch: i64, session: &Document) -> Result<(), Error> {
        let result = self
            .coll
            .update_one(
                doc! { "_id": LEASE_ID, "owner": &self.owner.id, "epoch": epoch },
                doc! { "$set": { "session": session.clone() } },
            )
            .write_concern(WriteConcern::majority())
            .await
            .map_err(Error::mongo(Action::Lease))?;
        if result.matched_count == 0 {
            return Err(Error::LeaseLost { epoch });
        }
        Ok(())
    }

    /// Ends the merge session of the previous holder with `killSessions`, which aborts its
    /// open transaction. A holder that died inside a transaction leaves it open, with the
    /// target and stream documents it wrote locked, until the server's
    /// `transactionLifetimeLimitSeconds` (60 s by default) expires it. Until then the new
    /// holder's claim and merges would wait. A failure is only logged, because the server
    /// still expires the transaction in time.
    async fn end_session(&self, session: &Document) {
        let admin = self.coll.client().database("admin");
        let ended = admin
            .run_command(doc! { "killSessions": [session.clone()] })
            .await;
        match ended {
            Ok(_) => info!(
                session = %session,
                "Ended the merge session recorded in the lease, aborting its open transaction if it had one."
            ),
            Err(error) => warn!(
                session = %session,
                error = describe(&error),
                "Ending the merge session recorded in the lease failed; its open transaction, if any, \
                 blocks merges until the server aborts it (transactionLifetimeLimitSeconds)."
            ),
        }
    }

    /// Reads the lease document, if any.
    ///
    /// # Errors
    ///
    /// [`Error::Mongo`] when the read fails.
    pub async fn read(&self) -> Result<Option<LeaseView>, Error> {
        read_lease(&self.coll).await
    }

    /// Extends the lease by its TTL. Returns false when another owner or epoch has it.
    ///
    /// # Errors
    ///
    /// [`Error::Mongo`] when the server cannot be reached.
    pub async fn renew(&self, epoch: i64) -> Result<bool, Error> {
        let ttl_ms = self.ttl.as_millis() as i64;
        let result = self
            .coll
            .update_one(
                doc! { "_id": LEASE_ID, "owner": &self.owner.id, "epoch": epoch },
                vec![doc! { "$set": {
                    "renewed_at": "$$NOW",
                    "expires_at": { "$add": ["$$NOW", ttl_ms] },
                } }],
            )
            .write_concern(WriteConcern::majority())
            .await
            .map_err(Error::mongo(Action::Lease))?;
        Ok(result.matched_count == 1)
    }

    /// Lets the lease expire now, so a standby or the next start takes over at once.
    ///
    /// # Errors
    ///
    /// [`Error::Mongo`] when the server cannot be reached.
    pub async fn release(&self, epoch: i64) -> Result<(), Error> {
        self.coll
            .update_one(
                doc! { "_id": LEASE_ID, "owner": &self.owner.id, "epoch": epoch },
                vec![doc! { "$set": { "expires_at": "$$NOW", "released_at": "$$NOW" } }],
            )
            .await
            .map_err(Error::mongo(Action::Lease))?;
        Ok(())
    }

    /// Renews the lease every third of its TTL until `stop` is cancelled. Cancels
    /// `held.lost` when the lease was taken over, or when no renewal succeeded for a whole
    /// TTL, after which another instance may hold it.
    pub async fn keep_renewed(&self, held: Held, stop: CancellationToken) {
        let interval = self.ttl / 3;
        let mut last_renewed = Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = held.lost.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
            match self.renew(held.epoch).await {
                Ok(true) => last_renewed = Instant::now(),
                Ok(false) => {
                    let holder = self.read().await.ok().flatten();
                    warn!(
                        epoch = held.epoch,
                        holder = holder
                            .as_ref()
                            .map(|view| view.owner.as_str())
                            .unwrap_or("-"),
                        holder_epoch = holder.as_ref().map_or(0, |view| view.epoch),
                        "Lost the lease to another instance."
                    );
                    held.lost.cancel();
                    return;
                }
                Err(error) => {
                    let since = last_renewed.elapsed();
                    warn!(
                        epoch = held.epoch,
                        since_ms = since.as_millis() as u64,
                        error = error_text(&error),
                        "Renewing the lease failed; retrying."
                    );
                    if since >= self.ttl {
                        warn!(
                            epoch = held.epoch,
                            "The lease may have expired; stopping merges."
                        );
                        held.lost.cancel();
                        return;
                    }
                }
            }
        }
    }

    /// Logs who holds the lease, for a standby.
    pub fn log_standby(view: Option<&LeaseView>) {
        match view {
            Some(view) => info!(
                holder = view.owner,
                epoch = view.epoch,
                expires_at = view.expires_at.map(|at| at.to_string()).unwrap_or_default(),
                "Standing by; another instance holds the lease."
            ),
            None => info!("Standing by; the lease is held by another instance."),
        }
    }
}

fn error_text(error: &Error) -> String {
    match error {
        Error::Mongo { error, .. } => describe(error),
        other => other.to_string(),
    }
}

/// Reads the lease document of a state collection, if any.
///
/// # Errors
///
/// [`Error::Mongo`] when the read fails.
pub async fn read_lease(coll: &Collection<Document>) -> Result<Option<LeaseView>, Error> {
    let found = coll
        .find_one(doc! { "_id": LEASE_ID })
        .await
        .map_err(Error::mongo(Action::Lease))?;
    Ok(found.map(|document| LeaseView {
        owner: document.get_str("owner").unwrap_or_default().to_string(),
        epoch: match document.get("epoch") {
            Some(Bson::Int64(epoch)) => *epoch,
            Some(Bson::Int32(epoch)) => i64::from(*epoch),
            _ => 0,
        },
        expires_at: document.get_datetime("expires_at").ok().copied(),
        session: document.get_document("session").ok().cloned(),
    }))
}
