//! perfagg merges staging documents written by n8n workflows into one `performance_data`
//! document per entity and day.
//!
//! The path of one change event: [`stream`] reads it from a database-level change stream,
//! [`decode`] turns the staging document into a [`merge::Record`] or a list of reject reasons,
//! [`merge`] computes the new target document, and [`sink`] writes the batch's targets,
//! rejects and resume token in one transaction through [`state`]. [`daemon`] supervises that
//! pipeline, [`config`] holds the settings, [`deployment`] connects and checks the server,
//! [`retry`] decides what a failure means, and [`shutdown`] turns signals into a stop between
//! batches.

pub mod config;
pub mod daemon;
pub mod decode;
pub mod deployment;
pub mod error;
pub mod lease;
pub mod logging;
pub mod merge;
pub mod reset;
pub mod retry;
pub mod shutdown;
pub mod sink;
pub mod state;
pub mod status;
pub mod stream;

pub use error::Error;
