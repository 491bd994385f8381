//! Retry decisions and backoff. Every decision about a driver error goes through
//! [`classify`], which reads the server's error labels and, where no label applies, its
//! error code. No other module matches on server codes.

use std::time::Duration;

use mongodb::error::{
    Error as DriverError, ErrorKind, WriteFailure, TRANSIENT_TRANSACTION_ERROR,
    UNKNOWN_TRANSACTION_COMMIT_RESULT,
};

/// The change stream's history for the requested position is gone (`ChangeStreamHistoryLost`).
const CHANGE_STREAM_HISTORY_LOST: i32 = 286;
/// The server cannot use the resume token at all (`ChangeStreamFatalError`), for example a
/// token from another replica set.
const CHANGE_STREAM_FATAL_ERROR: i32 = 280;
/// The server rejected the credentials (`AuthenticationFailed`).
const AUTHENTICATION_FAILED: i32 = 18;
/// A unique index build found duplicates.
const DUPLICATE_KEY: i32 = 11000;
/// A document grew beyond the 16 MiB BSON limit (`BSONObjectTooLarge`, and the update
/// path's own code for the same condition).
const OBJECT_TOO_LARGE: [i32; 2] = [10334, 17419];

/// Action a caller takes after a driver error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Abort and run the whole transaction again.
    TransientTransaction,
    /// Send `commitTransaction` again: the commit may or may not have been applied.
    UnknownCommitResult,
    /// The stored resume token can never be resumed from.
    PositionLost,
    /// A unique index cannot be built over existing duplicates.
    DuplicateKey,
    /// The server refuses this particular write and will refuse it again.
    Refused,
    /// The server rejected the credentials.
    Authentication,
    /// Anything else: the supervisor reconnects and starts over from the stored position.
    Other,
}

/// Sorts a driver error into the action its caller takes.
pub fn classify(error: &DriverError) -> Failure {
    if error.contains_label(TRANSIENT_TRANSACTION_ERROR) {
        return Failure::TransientTransaction;
    }
    if error.contains_label(UNKNOWN_TRANSACTION_COMMIT_RESULT) {
        return Failure::UnknownCommitResult;
    }
    if matches!(error.kind.as_ref(), ErrorKind::Authentication { .. }) {
        return Failure::Authentication;
    }
    let code = server_code(error);
    match code {
        Some(CHANGE_STREAM_HISTORY_LOST | CHANGE_STREAM_FATAL_ERROR) => Failure::PositionLost,
        Some(DUPLICATE_KEY) => Failure::DuplicateKey,
        Some(AUTHENTICATION_FAILED) => Failure::Authentication,
        Some(code) if OBJECT_TOO_LARGE.contains(&code) => Failure::Refused,
        _ => Failure::Other,
    }
}

/// Sorts the code of one entry of a write command's `writeErrors`. Those errors are
/// deterministic for their statement, except a write conflict, which the server reports at
/// the top level with a label instead.
pub fn classify_write_error(code: i32) -> Failure {
    match code {
        DUPLICATE_KEY => Failure::DuplicateKey,
        _ => Failure::Refused,
    }
}

/// Returns the server's error code carried by a driver error, for messages.
pub fn server_code(error: &DriverError) -> Option<i32> {
    match error.kind.as_ref() {
        ErrorKind::Command(command) => Some(command.code),
        ErrorKind::Write(WriteFailure::WriteError(write)) => Some(write.code),
        ErrorKind::Write(WriteFailure::WriteConcernError(concern)) => Some(concern.code),
        _ => None,
    }
}

/// First pause before a whole transaction or a commit is retried.
pub const TRANSACTION_BACKOFF_INITIAL: Duration = Duration::from_millis(20);
/// Maximum pause between transaction retries.
pub const TRANSACTION_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Transaction attempts before the error goes up to the supervisor, which reconnects.
pub const TRANSACTION_ATTEMPTS: u32 = 8;
/// First pause before the supervisor reconnects after a failure.
pub const RECONNECT_BACKOFF_INITIAL: Duration = Duration::from_millis(500);
/// Maximum pause between reconnects, so a server that comes back is noticed within this time.
pub const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(15);

/// Capped exponential backoff: each [`Backoff::next_delay`] doubles the pause up to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max,
            next: initial,
            attempt: 0,
        }
    }

    /// Backoff for retrying a transaction or a commit.
    pub fn transaction() -> Backoff {
        Backoff::new(TRANSACTION_BACKOFF_INITIAL, TRANSACTION_BACKOFF_MAX)
    }

    /// Backoff for the supervisor's reconnects.
    pub fn reconnect() -> Backoff {
        Backoff::new(RECONNECT_BACKOFF_INITIAL, RECONNECT_BACKOFF_MAX)
    }

    /// Returns the pause before the next attempt and counts the attempt.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        self.attempt += 1;
        delay
    }

    /// Number of delays handed out since the last reset.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.next = self.initial;
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_cap_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let delays: Vec<u128> = (0..4).map(|_| backoff.next_delay().as_millis()).collect();
        assert_eq!(delays, vec![100, 200, 350, 350]);
        assert_eq!(backoff.attempt(), 4);
        backoff.reset();
        assert_eq!(backoff.next_delay(), Duration::from_millis(100));
    }

    #[test]
    fn write_errors_are_refusals_except_duplicates() {
        assert_eq!(classify_write_error(17419), Failure::Refused);
        assert_eq!(classify_write_error(11000), Failure::DuplicateKey);
    }
}
