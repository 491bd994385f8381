//! Shutdown on SIGTERM and SIGINT. The first signal cancels the daemon's token, and the main
//! loop stops at the next batch boundary. A second signal, or a shutdown that outlives
//! [`SHUTDOWN_DEADLINE`], ends the process at once with exit code 1; the stored position is
//! still consistent then, because only whole transactions commit.

use std::time::Duration;

use futures::StreamExt;
use signal_hook::consts::signal::{SIGINT, SIGTERM};
use signal_hook_tokio::Signals;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// Maximum time between the first signal and the end of the process.
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(10);

/// Starts the task that turns signals into cancellation of `token`.
///
/// # Errors
///
/// The I/O error of registering the signal handlers.
pub fn listen(token: CancellationToken) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let mut signals = Signals::new([SIGTERM, SIGINT])?;
    Ok(tokio::spawn(async move {
        let Some(first) = signals.next().await else {
            return;
        };
        info!(signal = signal_name(first), "Shutdown requested.");
        token.cancel();
        tokio::select! {
            second = signals.next() => {
                let name = second.map_or("unknown", signal_name);
                error!(signal = name, "Second signal during shutdown; exiting at once.");
            }
            _ = tokio::time::sleep(SHUTDOWN_DEADLINE) => {
                error!(
                    deadline_secs = SHUTDOWN_DEADLINE.as_secs(),
                    "Shutdown did not finish in time (a merge transaction or MongoDB call is still running); exiting."
                );
            }
        }
        std::process::exit(1);
    }))
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        SIGTERM => "SIGTERM",
        SIGINT => "SIGINT",
        _ => "unknown",
    }
}
