//! perfagg's integration tests, built as one test binary so that every test shares one
//! mongod replica set (see `support.rs`). Each module below covers one area; add new
//! modules here.

// Tests may unwrap: a panic is how a test reports a failure.
#![allow(clippy::unwrap_used)]

mod support;

mod faults;
mod harness;
mod lifecycle;
mod merge;
mod n8n_kit;
mod reset;
mod retries;
