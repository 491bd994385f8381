//! Log output: `tracing` events to standard error, as text for people or JSON lines for log
//! collectors, filtered by `PERFAGG_LOG` or `[log] level`.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

/// Installs the global subscriber. Call once, before the first event.
pub fn init(settings: &LogSettings) {
    // The filter was validated with the configuration; fall back to `info` all the same.
    let filter = EnvFilter::try_new(&settings.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    let result = match settings.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    if let Err(error) = result {
        eprintln!("perfagg: logging was already set up: {error}");
    }
}
