//! Switchyard's data plane: HTTP in, a variant chosen, HTTP out.
//!
//! The life of a request, module by module:
//! - [`server`]: accepts connections (HTTP/1.1 and h2c), limits them, closes idle ones,
//!   drains on shutdown; [`closing`], the listener's closing as each connection waits
//!   for it.
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
//! - [`inbound`]: HTTP/1.1 from clients on the same codec (heads parsed with httparse,
//!   bodies read as the service polls them), and [`inbound::RequestBody`], the body of
//!   every client request.
//! - [`local`]: variants answered in-process (the protocol codec over a batched model).
//! - [`grpc`]: gRPC on the data port (KServe V2 / Triton, TF Serving): calls read,
//!   routed like HTTP requests, forwarded frame for frame or answered in-process.
//! - [`v2`]: the V2 codec of local variants: JSON, binary tensors, requested outputs,
//!   classification; Triton's model configuration and statistics.
//! - [`encoding`]: gzip and deflate bodies for local variants, bounded when inflated.
//! - [`offload`]: large JSON decoding and encoding off the async workers.
//! - [`body`]: the streamed, size-limited request body and the response body type.
//! - [`stamp`]: the fields we add to every answer, kept as values until its head is
//!   written.
//! - [`error`]: [`RouterError`] and the one function that turns errors into responses.
//! - [`metrics`]: Prometheus families registered on a registry passed in.
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz`, `/admin/config`, the reload, the
//!   dashboard.
//! - [`pulse`]: the live numbers, once a second, behind `/admin/stream` and `/dashboard`.
//! - [`auth`]: bearer tokens for the admin listener's POSTs and for feedback.
//! - [`ids`]: unguessable request ids.
//! - [`clock`]: the time, read once per turn of a connection's task (nginx's cached
//!   time), and deadlines whose timers move only when they would be late.
//! - `wake`: whether a registration already holds this task's waker (a connection's
//!   timer and closing watch register it once, not per request).
//! - [`feedback`]: the decision log and `POST /v1/feedback`; rewards go to a
//!   [`feedback::FeedbackSink`] the binary provides (the bandit).
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod admin;
pub mod auth;
pub mod body;
pub mod breaker;
pub mod clock;
pub mod closing;
pub mod encoding;
pub mod error;
pub mod feedback;
pub mod forward;
pub mod grpc;
pub mod h1;
pub mod ids;
pub mod inbound;
pub mod local;
pub mod metrics;
pub mod offload;
pub mod path;
pub mod proxy;
pub mod pulse;
pub mod selector;
pub mod server;
pub mod split;
pub mod stamp;
pub mod table;
pub mod upstream;
pub mod v2;
pub(crate) mod variant;
pub(crate) mod wake;

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

/// `template` with up to three mutations: a range cut out, a range repeated, bytes
/// inserted from an alphabet that matters to the grammar, a number replaced, the end
/// cut off.
#[cfg(test)]
pub(crate) fn mutate(template: &[u8], rng: &mut impl FnMut() -> u64) -> Vec<u8> {
    const ALPHABET: &[u8] = b"0123456789abcdefABCDEF\r\n:;, \t-+x\x00\x7f\xff";
    let mut out = template.to_vec();
    for _ in 0..rng() % 4 {
        let at = (rng() as usize) % (out.len() + 1);
        let len = 1 + (rng() as usize) % 8;
        match rng() % 5 {
            0 if at < out.len() => {
                out.drain(at..(at + len).min(out.len()));
            }
            1 if at < out.len() => {
                let piece = out[at..(at + len).min(out.len())].to_vec();
                out.splice(at..at, piece);
            }
            2 => {
                let piece: Vec<u8> = (0..len)
                    .map(|_| ALPHABET[(rng() as usize) % ALPHABET.len()])
                    .collect();
                out.splice(at..at, piece);
            }
            3 => {
                // A number where a digit was: lengths, chunk sizes, the status.
                if let Some(d) = out[at..].iter().position(u8::is_ascii_digit) {
                    let n = match rng() % 3 {
                        0 => rng() % 10,
                        1 => rng() % 100_000,
                        _ => rng(),
                    };
                    out.splice(at + d..at + d + 1, n.to_string().into_bytes());
                }
            }
            _ => out.truncate(at),
        }
    }
    out
}
