//! Shadow traffic: live requests mirrored to candidate model servers whose answers are
//! compared with the primary's and then thrown away. The client never waits for a shadow.
//!
//! - [`sample`]: which requests a shadow gets (random, or by a hash of the request id).
//! - [`mirror`]: the [`ShadowSet`] of a model: per shadow a bounded queue, a cap on
//!   mirrors in flight, the taps the router puts on the request and response bodies, and
//!   the pairing of answers.
//! - [`compare`]: pure comparison of two answers (top-1 per row, largest difference,
//!   shapes, statuses) for TF Serving and KServe V2 outputs, JSON or gRPC (gRPC answers
//!   are read as the V2 JSON they stand for, [`tensors`]).
//! - [`tensors`]: gRPC requests and answers as the V2 JSON they stand for, by datatype.
//! - [`capture`]: `capture:`, borderline predictions kept for relabelling (through the
//!   same taps), and sampled predictions for the dashboard.
//! - [`stats`]: counters, means, the latest disagreements, the JSONL log.
//! - [`metrics`]: the Prometheus families, labelled by model and shadow.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod capture;
pub mod compare;
pub mod metrics;
pub mod mirror;
pub mod sample;
mod stats;
pub mod tensors;

pub use metrics::ShadowMetricFamilies;
pub use mirror::{
    GrpcCall, PrimaryAnswer, RequestHead, RequestTap, ResponseTap, ShadowDefaults, ShadowRuntime,
    ShadowSet,
};

/// Why a model's shadows could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ShadowError {
    /// The upstream URL cannot be used.
    #[error("shadow `{shadow}`: {message}")]
    Upstream {
        /// The shadow's name.
        shadow: String,
        /// What is wrong.
        message: String,
    },
    /// The disagreements file cannot be opened for appending.
    #[error("shadow `{shadow}`: cannot append to disagreements_file `{path}`: {source}")]
    Log {
        /// The shadow's name.
        shadow: String,
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}
