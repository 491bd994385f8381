//! The crate's error type. A variant exists where some caller treats it differently: the
//! command line maps variants to exit codes, and the daemon's supervisor retries
//! [`Error::Mongo`] but stops for the others.

use std::fmt;

/// Errors returned by perfagg's library code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration file could not be read.
    #[error("cannot read configuration file {path}")]
    ConfigRead {
        path: String,
        #[source]
        source: std::io::Error,
    },

    /// The configuration has unknown keys, wrong types or invalid values.
    #[error("invalid configuration in {origin}: {}", problems.join("; "))]
    Config {
        origin: String,
        problems: Vec<String>,
    },

    /// A command-line request that cannot be carried out as given.
    #[error("{message}")]
    InvalidArgument { message: String },

    /// The deployment cannot serve change streams (a standalone mongod).
    #[error(
        "{uri} is a standalone mongod, which has no change streams; \
         run it as a replica set (a single member is enough: start mongod with --replSet rs0 \
         and run rs.initiate()) and name the set in the URI with replicaSet=rs0"
    )]
    NoChangeStreams { uri: String },

    /// The servers in the URI belong to another replica set than the URI names.
    #[error(
        "{uri} names replica set `{expected}`, but the server at {host} is a member of `{found}`; \
         set replicaSet={found} in the URI, or point it at the right servers"
    )]
    WrongReplicaSet {
        uri: String,
        host: String,
        expected: String,
        found: String,
    },

    /// The stored resume token can no longer be resumed from: its history left the oplog, or the
    /// server does not know it. Retrying the same token never succeeds.
    #[error(
        "the stored position (resume token {resume_token}, cluster time {cluster_time}) \
         cannot be resumed ({}): the server no longer has its history; \
         run `perfagg reset --rescan --yes` to reprocess from the staging collections, \
         or `perfagg reset --to-now --yes` to skip the gap",
        describe(error)
    )]
    PositionLost {
        resume_token: String,
        cluster_time: String,
        error: Box<mongodb::error::Error>,
    },

    /// A document in the state collection does not have the shape perfagg writes.
    #[error(
        "invalid state document in {namespace}: {problem}; fix or delete it, then start again"
    )]
    InvalidState { namespace: String, problem: String },

    /// A unique index cannot be built because the collection already contains duplicates.
    #[error(
        "cannot create the unique index on {namespace}: it already holds documents with the same \
         key ({}); remove the duplicates, then start again",
        describe(error)
    )]
    DuplicateKeys {
        namespace: String,
        error: Box<mongodb::error::Error>,
    },

    /// The server rejected the credentials in the URI; retrying with the same ones cannot help.
    #[error(
        "authentication to {uri} failed ({}); check the user and password in the URI",
        describe(error)
    )]
    Authentication {
        uri: String,
        error: Box<mongodb::error::Error>,
    },

    /// The server refuses one particular write and would refuse it again, such as a merged
    /// document beyond the 16 MiB limit. The sink isolates the event and rejects it.
    #[error("the server refused a write to {namespace}: {message} (code {code})")]
    Refused {
        namespace: String,
        code: i32,
        message: String,
    },

    /// Another instance holds the lease now, so this one must not commit; the supervisor
    /// becomes a standby.
    #[error("lost the lease (held epoch {epoch}); another instance took over")]
    LeaseLost { epoch: i64 },

    /// Shutdown stopped a reset between two of its batches; the reset stays pending and
    /// starts over on the next start.
    #[error("shutdown interrupted a {mode} reset")]
    Interrupted { mode: &'static str },

    /// A reset was requested; the supervisor restarts the pipeline, which performs it.
    #[error("a reset was requested")]
    ResetRequested,

    /// The stored position cannot be resumed with the configured watch filter because the
    /// staging collections in the configuration changed since it was stored.
    #[error(
        "the watch filter changed since the position was stored (stored: {stored}, configured: \
         {configured}) and the server cannot resume the stored position with the new filter ({}); \
         restore the old collection names, or run `perfagg reset --to-now --yes` to continue from \
         now or `perfagg reset --rescan --yes` to reprocess the staging collections",
        describe(error)
    )]
    WatchChanged {
        stored: String,
        configured: String,
        error: Box<mongodb::error::Error>,
    },

    /// A MongoDB operation failed; the supervisor reconnects and retries.
    #[error("{action} failed: {}", describe(error))]
    Mongo {
        action: Action,
        error: Box<mongodb::error::Error>,
    },
}

/// Operation perfagg was running when MongoDB failed, for the message and the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Connect,
    CheckDeployment,
    CreateIndexes,
    LoadState,
    StoreState,
    OpenStream,
    ReadStream,
    Transaction,
    Lease,
    Rescan,
    Status,
}

impl fmt::Display for Action {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            Action::Connect => "connecting to MongoDB",
            Action::CheckDeployment => "checking the deployment",
            Action::CreateIndexes => "creating indexes",
            Action::LoadState => "loading the stored position",
            Action::StoreState => "storing the position",
            Action::OpenStream => "opening the change stream",
            Action::ReadStream => "reading the change stream",
            Action::Transaction => "the merge transaction",
            Action::Lease => "updating the lease",
            Action::Rescan => "rescanning the staging collections",
            Action::Status => "reading the status",
        };
        formatter.write_str(text)
    }
}

impl Error {
    /// Wraps a driver error with what perfagg was doing.
    pub fn mongo(action: Action) -> impl FnOnce(mongodb::error::Error) -> Error {
        move |error| Error::Mongo {
            action,
            error: Box::new(error),
        }
    }

    /// Returns the process exit code for this error: 2 when the deployment has no change streams, 3
    /// when the stored position cannot be resumed, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::NoChangeStreams { .. } => 2,
            Error::PositionLost { .. } | Error::WatchChanged { .. } => 3,
            _ => 1,
        }
    }

    /// Whether the daemon's supervisor should reconnect and try again after this error.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::Mongo { .. }
                | Error::LeaseLost { .. }
                | Error::ResetRequested
                | Error::Interrupted { .. }
        )
    }
}

/// Describes a driver error by its kind and labels, without the driver's debug dump of
/// nested errors and server replies.
pub fn describe(error: &mongodb::error::Error) -> String {
    use mongodb::error::{ErrorKind, WriteFailure};

    let kind = match error.kind.as_ref() {
        ErrorKind::Command(command) => format!(
            "server error {} ({}): {}",
            command.code, command.code_name, command.message
        ),
        ErrorKind::Write(WriteFailure::WriteError(write)) => {
            format!("write error {}: {}", write.code, write.message)
        }
        ErrorKind::Write(WriteFailure::WriteConcernError(concern)) => format!(
            "write concern error {} ({}): {}",
            concern.code, concern.code_name, concern.message
        ),
        other => other.to_string(),
    };
    let mut labels: Vec<&str> = error.labels().iter().map(String::as_str).collect();
    if labels.is_empty() {
        return kind;
    }
    labels.sort_unstable();
    format!("{kind} [labels: {}]", labels.join(", "))
}

/// Formats an error with its whole source chain on one line: `a: b: c`.
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
