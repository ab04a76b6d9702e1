//! Switchyard's data plane: HTTP in, a variant chosen, HTTP out.
//!
//! The life of a request, module by module:
//! - [`server`]: accepts connections (HTTP/1.1 and h2c), limits them, closes idle ones,
//!   drains on shutdown.
//! - [`proxy`]: the [`Router`] and its tower service; the request phases in order
//!   (route → admit → choose → forward → respond → record).
//! - [`path`]: parses TF Serving and V2 paths into an [`path::Endpoint`].
//! - [`table`]: the immutable route table built from the config (models → variants →
//!   backends), swapped whole.
//! - [`forward`]: one model request from its body to its answer: phases *hedge*, *fall
//!   back*, *respond* and *record* around the stacks below.
//! - `split`: phases *choose* (a tower service over the ready variants) and *retry*
//!   (tower's `Retry` with a policy over the model's retry budget).
//! - `variant`: one variant as a stack of tower layers: `Observe` (metrics) →
//!   [`breaker::Guard`] → `Forward` (phase *forward*: upstream or in-process model).
//! - [`breaker`]: phases *limit* and *break*: per-variant circuit breakers and in-flight
//!   limits, and the `Guard` layer that makes a variant ready or not.
//! - [`selector`]: weighted and sticky variant choice over an atomically replaceable
//!   weight table; the seam the bandit will drive.
//! - [`upstream`]: pooled clients to remote model servers; failure classification.
//! - [`h1`]: our HTTP/1.1 codec to upstreams: request heads written from borrowed
//!   headers, answers parsed with httparse, bodies as slices of a reused buffer.
//! - [`local`]: variants answered in-process (the protocol codec over a batched model).
//! - [`grpc`]: gRPC on the data port (KServe V2 / Triton, TF Serving): calls read,
//!   routed like HTTP requests, forwarded frame for frame or answered in-process.
//! - [`v2`]: the V2 codec of local variants: JSON, binary tensors, requested outputs,
//!   classification; Triton's model configuration and statistics.
//! - [`encoding`]: gzip and deflate bodies for local variants, bounded when inflated.
//! - [`offload`]: large JSON decoding and encoding off the async workers.
//! - [`body`]: the streamed, size-limited request body and the response body type.
//! - [`error`]: [`RouterError`] and the one function that turns errors into responses.
//! - [`metrics`]: Prometheus families registered on a registry passed in.
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz`, `/admin/config`, the reload, the
//!   dashboard.
//! - [`pulse`]: the live numbers, once a second, behind `/admin/stream` and `/dashboard`.
//! - [`auth`]: bearer tokens for the admin listener's POSTs and for feedback.
//! - [`ids`]: unguessable request ids.
//! - [`feedback`]: the decision log and `POST /v1/feedback`; rewards go to a
//!   [`feedback::FeedbackSink`] the binary provides (the bandit).
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod admin;
pub mod auth;
pub mod body;
pub mod breaker;
pub mod encoding;
pub mod error;
pub mod feedback;
pub mod forward;
pub mod grpc;
pub mod h1;
pub mod ids;
pub mod local;
pub mod metrics;
pub mod offload;
pub mod path;
pub mod proxy;
pub mod pulse;
pub mod selector;
pub mod server;
pub mod split;
pub mod table;
pub mod upstream;
pub mod v2;
pub(crate) mod variant;

/// A seeded xorshift64* stream for the property tests: deterministic, no dependency.
#[cfg(test)]
pub(crate) fn test_rng(seed: u64) -> impl FnMut() -> u64 {
    let mut state = seed.max(1);
    move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

pub use error::RouterError;
pub use metrics::Metrics;
pub use proxy::Router;
