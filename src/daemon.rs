//! The daemon's main loop and its supervisor. The supervisor connects, checks the deployment,
//! waits for the lease, loads the stored position and runs the pipeline (stream → decode →
//! merge → sink). When MongoDB fails it logs the error, backs off and starts over from the
//! stored position, which is always consistent with the merged data. When the lease is lost
//! it goes back to standing by. It stops for errors no retry can fix and when shutdown is
//! requested, and then only between batches.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mongodb::bson::Document;
use mongodb::Database;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::config::{mask_uri, Config};
use crate::deployment;
use crate::error::{chain, Action, Error};
use crate::lease::{Held, Lease, Owner};
use crate::reset;
use crate::retry::{self, Backoff, Failure};
use crate::sink::{BatchOutcome, Sink};
use crate::state::{Position, Resume, StateStore, Stored};
use crate::stream::{token_cluster_time, ChangeSource, Start};

/// Maximum pause between two looks at the lease while standing by.
const STANDBY_POLL_MAX: Duration = Duration::from_secs(1);
/// How often the running pipeline looks for a reset request between batches.
const RESET_POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Counters of the running daemon, shared with observers such as a metrics exporter.
#[derive(Debug, Default)]
pub struct Progress {
    pub batches: AtomicU64,
    pub events: AtomicU64,
    pub merged: AtomicU64,
    pub rejected: AtomicU64,
    /// Seconds part of the cluster time of the last stored position; 0 before the first.
    pub stored_cluster_seconds: AtomicU64,
    pub reconnects: AtomicU64,
    /// Epoch of the lease this process holds; 0 while standing by.
    pub lease_epoch: AtomicU64,
}

impl Progress {
    fn record_batch(&self, outcome: &BatchOutcome) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.events
            .fetch_add(outcome.events as u64, Ordering::Relaxed);
        self.merged
            .fetch_add(outcome.merged as u64, Ordering::Relaxed);
        self.rejected
            .fetch_add(outcome.rejected as u64, Ordering::Relaxed);
    }

    fn record_position(&self, position: &Position) {
        if let Some(time) = position.cluster_time {
            self.stored_cluster_seconds
                .store(u64::from(time.time), Ordering::Relaxed);
        }
    }
}

/// Runs the daemon until `shutdown` is cancelled or an error that no retry can fix.
///
/// # Errors
///
/// Every [`Error`] for which [`Error::is_retryable`] is false, such as
/// [`Error::NoChangeStreams`] or [`Error::PositionLost`].
pub async fn run(
    config: &Config,
    shutdown: &CancellationToken,
    progress: Arc<Progress>,
) -> Result<(), Error> {
    let owner = Owner::of_this_process();
    info!(owner = owner.id, "Identified this instance for the lease.");
    let mut backoff = Backoff::reconnect();
    loop {
        let error = match run_pipeline(config, &owner, shutdown, &progress, &mut backoff).await {
            Ok(()) => return Ok(()),
            Err(error) if !error.is_retryable() => return Err(error),
            Err(error) => error,
        };
        progress.lease_epoch.store(0, Ordering::Relaxed);
        if shutdown.is_cancelled() {
            return Ok(());
        }
        if let Error::LeaseLost { epoch } = error {
            info!(epoch, "Lost the lease; standing by.");
            continue;
        }
        if let Error::ResetRequested = error {
            info!("A reset was requested; restarting the pipeline to perform it.");
            continue;
        }
        progress.reconnects.fetch_add(1, Ordering::Relaxed);
        let delay = backoff.next_delay();
        warn!(
            attempt = backoff.attempt(),
            backoff_ms = delay.as_millis() as u64,
            error = chain(&error),
            "MongoDB operation failed; starting over from the stored position."
        );
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// A connected pipeline that holds the lease and is ready to read its first batch.
struct Pipeline<'a> {
    db: Database,
    lease: Lease,
    held: Held,
    sink: Sink<'a>,
    source: ChangeSource,
    /// The last stored position; the stream continues right after it.
    position: Position,
}

/// Runs one life of the pipeline, from connecting to the first error, the loss of the lease
/// or shutdown.
async fn run_pipeline(
    config: &Config,
    owner: &Owner,
    shutdown: &CancellationToken,
    progress: &Progress,
    backoff: &mut Backoff,
) -> Result<(), Error> {
    let Some(pipeline) = start_pipeline(config, owner, shutdown).await? else {
        return Ok(());
    };
    let Pipeline {
        db,
        lease,
        held,
        sink,
        mut source,
        mut position,
    } = pipeline;
    progress.record_position(&position);
    progress
        .lease_epoch
        .store(held.epoch as u64, Ordering::Relaxed);
    backoff.reset();

    // The renewal task stops when this function returns, whichever way.
    let renewal_stop = CancellationToken::new();
    let _stop_renewal_on_return = renewal_stop.clone().drop_guard();
    let renewing = lease.clone();
    let renewed = held.clone();
    tokio::spawn(async move { renewing.keep_renewed(renewed, renewal_stop).await });

    info!(
        database = config.mongodb.database,
        metrics = config.collections.metrics,
        surveys = config.collections.surveys,
        target = config.collections.target,
        epoch = held.epoch,
        "Ready."
    );

    let outcome = async {
    let mut last_stored = Instant::now();
    let mut last_reset_poll = Instant::now();
    loop {
        // A pending reset stops the pipeline at this batch boundary. The fence would reject
        // the next commit anyway, but this check also notices it while the stream is idle.
        if last_reset_poll.elapsed() >= RESET_POLL_INTERVAL {
            if sink.state().is_reset_pending().await? {
                return Err(Error::ResetRequested);
            }
            last_reset_poll = Instant::now();
        }

        // Shutdown and the loss of the lease are honoured only here, between batches; a
        // commit in progress finishes or is refused by the epoch fence.
        let batch = tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                release(&lease, &held).await;
                info!(position = position.cluster_time_text(), "Stopped reading; last committed position kept.");
                return Ok(());
            }
            _ = held.lost.cancelled() => return Err(Error::LeaseLost { epoch: held.epoch }),
            batch = source.next_batch(config.batch.max_events, config.batch.max_wait) => batch,
        };
        let batch = batch.map_err(|error| lost_position(error, &position))?;

        if let Some(last) = batch.changes.last() {
            let batch_position = last.position.clone();
            let outcome = sink.commit(&batch.changes, &batch_position).await?;
            progress.record_batch(&outcome);
            progress.record_position(&batch_position);
            position = batch_position;
            last_stored = Instant::now();
        }

        // An invalidate event closes the stream: store its position and open a new stream
        // after it, which `startAfter` allows.
        if let Some(invalidated) = batch.invalidated {
            sink.checkpoint(&invalidated).await?;
            position = invalidated;
            warn!(
                position = position.cluster_time_text(),
                "The change stream was invalidated (database dropped or renamed); reopening it."
            );
            source = ChangeSource::open(&db, config, &Start::After(position.resume_token.clone()))
                .await?;
            continue;
        }

        // While no staging change arrives, follow the server's post-batch resume token now
        // and then, so a quiet period does not leave the stored position behind the oplog.
        let is_idle = batch.changes.is_empty();
        if is_idle && last_stored.elapsed() >= config.state.checkpoint_interval {
            if let Some(token) = source
                .resume_token()
                .filter(|token| *token != position.resume_token)
            {
                let checkpoint = Position {
                    cluster_time: token_cluster_time(&token),
                    resume_token: token,
                };
                sink.checkpoint(&checkpoint).await?;
                progress.record_position(&checkpoint);
                debug!(
                    position = checkpoint.cluster_time_text(),
                    "Stored an idle checkpoint."
                );
                position = checkpoint;
            }
            last_stored = Instant::now();
        }
    }
    }
    .await;

    // A holder that stops for good lets the lease expire at once, so a restart or a standby
    // need not wait a TTL; a retryable error keeps it for the next pipeline.
    if let Err(error) = &outcome {
        if !error.is_retryable() {
            release(&lease, &held).await;
        }
    }
    outcome
}

/// Connects, checks the deployment, creates indexes, waits for the lease and claims the
/// stream document, then performs pending resets and opens the stream. Returns `None` when
/// shutdown came first.
async fn start_pipeline<'a>(
    config: &'a Config,
    owner: &Owner,
    shutdown: &CancellationToken,
) -> Result<Option<Pipeline<'a>>, Error> {
    // Connecting and waiting for the lease hold nothing that must finish, so shutdown may
    // interrupt them anywhere.
    let acquired = tokio::select! {
        _ = shutdown.cancelled() => return Ok(None),
        acquired = acquire(config, owner) => acquired?,
    };
    let Acquired {
        db,
        deployment,
        lease,
        held,
        sink,
    } = acquired;
    match prepare(config, &db, &deployment, &sink, shutdown).await {
        Ok((source, position)) => Ok(Some(Pipeline {
            db,
            lease,
            held,
            sink,
            source,
            position,
        })),
        Err(error) => {
            if !error.is_retryable() || matches!(error, Error::Interrupted { .. }) {
                release(&lease, &held).await;
            }
            Err(error)
        }
    }
}

/// Connection, lease and sink that [`acquire`] returns once this instance has the lease.
struct Acquired<'a> {
    db: Database,
    deployment: deployment::Deployment,
    lease: Lease,
    held: Held,
    sink: Sink<'a>,
}

/// Connects, checks the deployment, creates indexes, waits for the lease and claims the
/// stream document.
async fn acquire<'a>(config: &'a Config, owner: &Owner) -> Result<Acquired<'a>, Error> {
    let client = deployment::connect(config).await?;
    let deployment = deployment::check(&client, config).await?;
    let db = client.database(&config.mongodb.database);
    let state = StateStore::new(&db, config);
    Sink::new(config, &client, state.clone())
        .ensure_indexes()
        .await?;

    let lease = Lease::new(&db, config, owner.clone());
    let epoch = wait_for_lease(&lease, config).await?;
    let state = state.fenced(epoch);
    state.claim().await?;
    info!(epoch, owner = owner.id, "Acquired the lease.");
    let held = Held {
        epoch,
        lost: CancellationToken::new(),
    };
    let sink = Sink::new(config, &client, state);
    // A later holder ends this session if this process dies inside a transaction.
    lease
        .record_session(epoch, &sink.open_session().await?)
        .await?;

    Ok(Acquired {
        db,
        deployment,
        lease,
        held,
        sink,
    })
}

/// Performs pending resets, then opens the stream after the stored position, or at the
/// current time on a first run. A first run stores its starting position before it reports
/// ready, so a change written between this run and the next start is not skipped.
async fn prepare(
    config: &Config,
    db: &Database,
    deployment: &deployment::Deployment,
    sink: &Sink<'_>,
    shutdown: &CancellationToken,
) -> Result<(ChangeSource, Position), Error> {
    // Pending resets run first, before the stored position is read, because they replace it.
    while let Some(request) = sink.state().pending_reset().await? {
        reset::perform(db, config, sink, &request, shutdown).await?;
    }
    sink.state().clear_stale_reset_mark().await?;

    let replica_set = deployment.replica_set.as_deref().unwrap_or("-");
    let Stored { resume, watch } = sink.state().load().await?;
    let (source, position) = match resume {
        Some(Resume::After(position)) => {
            let source = open_after(
                db,
                config,
                &position,
                watch.as_ref(),
                sink.state().watched(),
            )
            .await?;
            info!(
                position = position.cluster_time_text(),
                replica_set,
                server_version = deployment.server_version,
                "Resumed the change stream after the stored position."
            );
            (source, position)
        }
        Some(Resume::AtTime(time)) => {
            // No token exists for this time yet; the first commit stores one. Until then the
            // position names only the cluster time, for logs and messages.
            let position = Position {
                resume_token: Document::new(),
                cluster_time: Some(time),
            };
            let source = ChangeSource::open(db, config, &Start::AtTime(time))
                .await
                .map_err(|error| lost_position(error, &position))?;
            info!(
                position = position.cluster_time_text(),
                replica_set,
                server_version = deployment.server_version,
                "Replaying the change stream from the time a reset set."
            );
            (source, position)
        }
        None => {
            let source = ChangeSource::open(db, config, &Start::Now).await?;
            let position = current_position(&source, sink.state())?;
            sink.state().store_start(&position).await?;
            info!(
                position = position.cluster_time_text(),
                replica_set,
                server_version = deployment.server_version,
                "No stored position; started the change stream at the current time and stored it."
            );
            (source, position)
        }
    };
    Ok((source, position))
}

/// Polls the lease until this instance holds it, logging the holder whenever it changes.
async fn wait_for_lease(lease: &Lease, config: &Config) -> Result<i64, Error> {
    let poll = (config.lease.ttl / 3).min(STANDBY_POLL_MAX);
    let mut last_holder: Option<String> = None;
    loop {
        if let Some(epoch) = lease.try_acquire().await? {
            return Ok(epoch);
        }
        let view = lease.read().await?;
        let holder = view
            .as_ref()
            .map(|view| format!("{}#{}", view.owner, view.epoch));
        if holder != last_holder {
            Lease::log_standby(view.as_ref());
            last_holder = holder;
        }
        tokio::time::sleep(poll).await;
    }
}

/// Opens the stream after `position`. When the server cannot resume it and the configured
/// staging collections differ from those stored with the position, returns
/// [`Error::WatchChanged`] with both instead of a bare lost position.
async fn open_after(
    db: &Database,
    config: &Config,
    position: &Position,
    stored_watch: Option<&Document>,
    configured_watch: &Document,
) -> Result<ChangeSource, Error> {
    let watch_changed = stored_watch.is_some_and(|stored| stored != configured_watch);
    if watch_changed {
        warn!(
            stored = stored_watch
                .map(|watch| watch.to_string())
                .unwrap_or_default(),
            configured = configured_watch.to_string(),
            "The watched staging collections changed since the position was stored."
        );
    }
    match ChangeSource::open(db, config, &Start::After(position.resume_token.clone())).await {
        Ok(source) => Ok(source),
        Err(Error::Mongo {
            action: Action::OpenStream,
            error,
        }) if watch_changed && retry::classify(&error) == Failure::PositionLost => {
            Err(Error::WatchChanged {
                stored: stored_watch
                    .map(|watch| watch.to_string())
                    .unwrap_or_default(),
                configured: configured_watch.to_string(),
                error,
            })
        }
        Err(error) => Err(lost_position(error, position)),
    }
}

/// Lets the lease expire at once on a clean stop, so the next holder need not wait a TTL.
async fn release(lease: &Lease, held: &Held) {
    if let Err(error) = lease.release(held.epoch).await {
        warn!(
            error = chain(&error),
            "Releasing the lease failed; it expires by itself."
        );
    }
}

/// Returns the position a freshly opened stream starts at.
fn current_position(source: &ChangeSource, state: &StateStore) -> Result<Position, Error> {
    let resume_token = source.resume_token().ok_or_else(|| Error::InvalidState {
        namespace: state.namespace(),
        problem: "the server returned no resume token for a new change stream (MongoDB 4.0.7 or later is needed)"
            .to_string(),
    })?;
    Ok(Position {
        cluster_time: token_cluster_time(&resume_token),
        resume_token,
    })
}

/// Turns a stream error that means the stored position can never be resumed into
/// [`Error::PositionLost`], and leaves every other error as it is.
fn lost_position(error: Error, position: &Position) -> Error {
    match error {
        Error::Mongo {
            action: Action::OpenStream | Action::ReadStream,
            error: source,
        } if retry::classify(&source) == Failure::PositionLost => {
            let lost = Error::PositionLost {
                resume_token: position.resume_token.to_string(),
                cluster_time: position.cluster_time_text(),
                error: source,
            };
            error!(error = chain(&lost), "The stored position is lost.");
            lost
        }
        other => other,
    }
}

/// Logs the start-up line: version, masked URI, database.
pub fn log_start(config: &Config) {
    info!(
        version = env!("CARGO_PKG_VERSION"),
        uri = mask_uri(&config.mongodb.uri),
        database = config.mongodb.database,
        config = config.origin,
        "Starting perfagg."
    );
}
