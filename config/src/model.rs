//! The typed configuration. Every field's `///` doc is what docs/configuration.md's
//! reference says about it; keep them in step.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;

use crate::decode::{self, child, Cx, Fields};
use crate::yaml::Node;

/// Default data-plane address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Default admin address.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9901";
/// Most shadows one model may have (the request path keeps them in a 64-bit mask).
pub const MAX_SHADOWS: usize = 64;
/// Default `upstream_idle_timeout`: see [`Config::upstream_idle_timeout`].
pub const DEFAULT_UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// Default request body limit: 16 MiB.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 16 * 1024 * 1024;

/// The whole file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    /// Address of the data plane (prediction endpoints). Default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// Address of the admin listener (metrics, health, state). Default `127.0.0.1:9901`.
    pub admin_listen: SocketAddr,
    /// Largest request body accepted, in bytes, unless a model sets its own.
    /// Larger bodies get 413. Default 16 MiB (16777216).
    pub max_body_bytes: u64,
    /// Time allowed to open a TCP connection to an upstream, unless a variant sets its
    /// own. Failing to connect in time answers 502. Default `1s`.
    #[serde(serialize_with = "crate::duration::serialize")]
    pub connect_timeout: Duration,
    /// How long a pooled keep-alive connection to an upstream may sit idle before it is
    /// closed, unless a variant sets its own. Default `4s`: under the 5 s after which
    /// uvicorn (MLServer, KServe's Python server, BentoML) closes idle connections, so a
    /// request is not written into a connection the model server is closing; and what a
    /// burst opened is given back within seconds, not held.
    #[serde(serialize_with = "crate::duration::serialize")]
    pub upstream_idle_timeout: Duration,
    /// Time allowed from sending a request upstream to receiving its response headers,
    /// unless a model or variant sets its own. Exceeding it answers 504. Default `30s`.
    #[serde(serialize_with = "crate::duration::serialize")]
    pub request_timeout: Duration,
    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish before the
    /// process exits anyway. Default `30s`.
    #[serde(serialize_with = "crate::duration::serialize")]
    pub drain_timeout: Duration,
    /// Time a client connection gets, from opening or from the end of its previous
    /// answer, to deliver a complete request head; then it is closed. Bounds both idle
    /// keep-alive connections and clients that send headers slowly (slowloris). HTTP/1.1
    /// only. Default `60s`.
    #[serde(serialize_with = "crate::duration::serialize")]
    pub client_header_timeout: Duration,
    /// Longest pause allowed between two pieces of a client's request body; a client
    /// that stalls longer gets 408. Default `60s`.
    #[serde(serialize_with = "crate::duration::serialize")]
    pub client_body_timeout: Duration,
    /// Longest an answer to an HTTP/1.1 client may wait for the client to take any of it
    /// (its socket full, the client not reading); then the connection is closed (nginx's
    /// `send_timeout`). Default `60s`.
    #[serde(serialize_with = "crate::duration::serialize")]
    pub client_send_timeout: Duration,
    /// Most client connections served at once on the data plane; a connection beyond
    /// it is answered 503 at once and closed. Default 10000.
    pub max_connections: usize,
    /// Length of the data listener's accept queue (the `listen(2)` backlog; the kernel
    /// caps it at `net.core.somaxconn`). Default 4096: with 128, a burst of 512 new
    /// connections met SYN retries and a p99.9 of one second.
    pub listen_backlog: u32,
    /// Threads serving requests. Default: one per CPU core.
    pub worker_threads: Option<usize>,
    /// Seed for the variant draws by weight and the bandits' weight updates: the same seed
    /// gives the same sequence of choices, for reproducible experiments and tests. A
    /// bandit's per-request draws are not seeded (a generator per worker thread).
    /// Default: random at start.
    pub seed: Option<u64>,
    /// Where bandit statistics are kept across restarts: written atomically every 10
    /// seconds and at shutdown, read at start. Default: not kept.
    pub state_file: Option<String>,
    /// A file holding the admin token: when set (or `SWITCHYARD_ADMIN_TOKEN` is), every
    /// state-changing admin request needs `Authorization: Bearer <token>`. Read at start.
    pub admin_token_file: Option<String>,
    /// A file holding the feedback token: when set, `POST /v1/feedback` needs
    /// `Authorization: Bearer <token>` (feedback moves where traffic, and money, goes).
    pub feedback_token_file: Option<String>,
    /// The bandits' shared runtime settings.
    pub bandit: BanditRuntime,
    /// Fleet mode: several replicas learn as one through Redis. Default: off (each
    /// replica learns alone).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fleet: Option<Fleet>,
    /// The models clients can call, by the name they use in URLs.
    pub models: BTreeMap<String, Model>,
}

/// One model as clients see it, split across its variants.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Model {
    /// The variants that can answer, each with its weight.
    pub variants: Vec<Variant>,
    /// Name of a request header (e.g. `x-user-id`) whose value pins a client to a
    /// variant: the same value gets the same variant while the weights are unchanged,
    /// and when they change only a proportional share of values moves. Requests without
    /// the header are split at random.
    pub sticky_header: Option<String>,
    /// Overrides the top-level `max_body_bytes` for this model.
    pub max_body_bytes: Option<u64>,
    /// Overrides the top-level `request_timeout` for this model's variants.
    #[serde(serialize_with = "crate::duration::serialize_opt")]
    pub request_timeout: Option<Duration>,
    /// Let a Thompson-sampling bandit move this model's weights, learning from the
    /// feedback the application posts to `/v1/feedback`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bandit: Option<BanditSpec>,
    /// Candidates that receive a mirrored share of this model's traffic. Their answers
    /// are compared with the primary's and thrown away; the client never waits for them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub shadows: Vec<Shadow>,
    /// A local variant of this model that answers when no variant can take a request
    /// (all ejected or at `max_in_flight`), when the chosen one fails and no retry is
    /// left, or when `hedge_after` fires. It may have weight 0: then it answers only as
    /// the fallback.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    /// One circuit breaker per variant, with these settings.
    pub breaker: crate::resilience::Breaker,
    /// Per-variant limits.
    pub limits: crate::resilience::Limits,
    /// Retries on another variant, within a budget.
    pub retry: crate::resilience::Retry,
    /// Ask a second variant (or the fallback) when the first has not answered after this
    /// long; the first answer wins and the other is cancelled. Default: off.
    #[serde(serialize_with = "crate::duration::serialize_opt")]
    pub hedge_after: Option<Duration>,
    /// Keep the borderline predictions (top-1 score minus top-2 below `margin`) for
    /// relabelling, and show sampled predictions on the dashboard.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capture: Option<Capture>,
}

/// `capture:`: which answered predictions are looked at, which are kept, and where.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Capture {
    /// A prediction whose top-1 score is within this of the runner-up's is borderline
    /// and kept. Default 0.1.
    pub margin: f64,
    /// Share of answered predictions looked at, 0 to 1 (by request, off the request
    /// path). Default 1.0.
    pub sample: f64,
    /// The JSONL file borderline predictions are appended to (request id, time, variant,
    /// inputs, outputs, margin).
    pub file: String,
    /// When the file would grow past this, it is renamed `<file>.1` (replacing the last
    /// one) and a new one started: at most twice this on disk. Default 100 MiB.
    pub max_bytes: u64,
}

/// A shadow: a candidate model server that gets copies of live requests.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Shadow {
    /// Short name, unique among the model's variants and shadows; used in metric labels
    /// and at `/admin/shadow/{model}`.
    pub name: String,
    /// Base URL of the candidate's model server, as for variants.
    pub upstream: UpstreamUrl,
    /// Model name on that server. Default: the client's model name.
    pub upstream_model: Option<String>,
    /// `http1` (default), `h2c`, or `grpc`: a `grpc` shadow mirrors the model's gRPC
    /// calls, the others its HTTP requests.
    pub protocol: UpstreamProtocol,
    /// Share of the model's prediction requests to mirror, 0 to 1.
    pub fraction: f64,
    /// `random` (default): each request is drawn independently. `hash`: decided by a hash
    /// of the request id, so the same requests go to every shadow and a replayed run
    /// mirrors the same requests.
    pub sampling: ShadowSampling,
    /// Mirrors in flight at once to this shadow. Default 32.
    pub max_concurrency: usize,
    /// Mirrors waiting for a free slot; beyond this they are dropped and counted.
    /// Default 256.
    pub max_queue: usize,
    /// How long a mirror may take. Default: the model's `request_timeout`.
    #[serde(serialize_with = "crate::duration::serialize_opt")]
    pub request_timeout: Option<Duration>,
    /// How many of the latest disagreements `/admin/shadow/{model}` shows. Default 50.
    pub keep_disagreements: usize,
    /// A JSONL file every disagreement is appended to (request id, both answers, both
    /// latencies). Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disagreements_file: Option<String>,
}

/// How a shadow picks the requests it mirrors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ShadowSampling {
    /// An independent draw per request and shadow.
    Random,
    /// A hash of the request id: deterministic, and nested across shadows (a shadow
    /// with fraction 0.1 mirrors a subset of one with 0.2).
    Hash,
}

/// A model's bandit.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BanditSpec {
    /// `conversion` (0/1 outcomes), `revenue` (revenue per prediction) or `profit`
    /// (revenue minus the variant's `cost_per_1k` / 1000).
    pub objective: BanditObjective,
    /// How often weights are recomputed and published, at the latest. Default `1s`.
    #[serde(serialize_with = "crate::duration::serialize")]
    pub update_interval: Duration,
    /// Rewards learned between two weight updates, at most: at thousands of requests
    /// a second the weights follow the posteriors within this many decisions rather
    /// than within `update_interval`. Default 100.
    pub update_every: u64,
    /// Exploration floor: every variant keeps at least this share (under `per_request`,
    /// a uniform pick with probability variants × `min_weight`). Default 0: Thompson
    /// sampling explores by itself, and a floor costs regret on every decision
    /// (BENCHMARKS.md states how much).
    pub min_weight: f64,
    /// Largest change of one weight per update (`mode: weights`). Default 1 (no limit).
    pub max_step: f64,
    /// The configured weights hold until every variant has this many rewards. Default 0.
    pub warmup: u64,
    /// How long a prediction waits for its feedback. Default `10m`.
    #[serde(serialize_with = "crate::duration::serialize")]
    pub feedback_ttl: Duration,
    /// What a prediction without feedback counts as at `feedback_ttl`: `ignore`
    /// (nothing) or `zero` (no conversion, zero revenue). Default `ignore`.
    pub missing_feedback: MissingFeedback,
    /// Forget old evidence with this half-life, so the bandit follows a world that
    /// drifts: a number of rewards per variant (`2000`) or a duration (`30m`). Default:
    /// none (`detect_changes` forgets what changed, and only that).
    pub half_life: Option<HalfLife>,
    /// Watch each variant's rewards for a change (a likelihood-ratio test over its
    /// latest 8,192 rewards); when one is found, that variant keeps only the evidence
    /// since, and no other keeps more, so traffic looks again where it had stopped
    /// looking. Default `true`: in a world that stands still it costs no regret.
    pub detect_changes: bool,
    /// `per_request` (default): draw from the posteriors on every request (Thompson
    /// sampling on the newest evidence); `weights`: split traffic by the weights
    /// published every `update_every` rewards or `update_interval`.
    pub mode: BanditMode,
    /// The prior belief about every variant before any reward. Default: uniform
    /// (`{alpha: 1, beta: 1}`) for conversion; `{mean: 0, strength: 1, shape: 1,
    /// scale: 1}` for revenue and profit.
    pub prior: Option<Prior>,
}

/// How a bandit steers traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BanditMode {
    /// Published weights, recomputed every `update_every` rewards or `update_interval`.
    Weights,
    /// A posterior draw per request.
    PerRequest,
}

/// A half-life, in rewards or in time.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HalfLife {
    /// Per variant: each new reward first discounts the old ones.
    Rewards(f64),
    /// Wall-clock: every update discounts all evidence by the time that passed.
    #[serde(serialize_with = "crate::duration::serialize")]
    Time(Duration),
}

/// A bandit's prior.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Prior {
    /// Beta(α, β) on a conversion rate: `{alpha, beta}`, pseudo-conversions and
    /// pseudo-misses.
    Beta {
        /// α > 0.
        alpha: f64,
        /// β > 0.
        beta: f64,
    },
    /// Normal–Inverse-Gamma on revenue: `{mean, strength, shape, scale}`: the prior mean
    /// worth `strength` observations, and an Inverse-Gamma(`shape`, `scale`) on the
    /// variance.
    Gaussian {
        /// Prior mean.
        mean: f64,
        /// Pseudo-observations behind the mean (> 0).
        strength: f64,
        /// Inverse-Gamma shape (> 0).
        shape: f64,
        /// Inverse-Gamma scale (> 0).
        scale: f64,
    },
}

/// What the bandit maximises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BanditObjective {
    /// Probability of a 0/1 outcome.
    Conversion,
    /// Revenue per prediction.
    Revenue,
    /// Revenue per prediction minus cost per prediction.
    Profit,
}

/// How a prediction without feedback counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MissingFeedback {
    /// Not at all.
    Ignore,
    /// As no conversion / zero revenue.
    Zero,
}

/// One variant: a backend that can answer for the model, and its share of traffic.
/// Exactly one of `upstream` (a remote model server) and `local` (the in-process
/// runtime) is given.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Variant {
    /// Short name, unique within the model (`a`, `b`, `canary`); reported in the
    /// `x-switchyard-variant` response header and in metric labels.
    pub name: String,
    /// Base URL of the model server, `http://host:port[/prefix]`; the client's path is
    /// appended to it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<UpstreamUrl>,
    /// The model served in-process instead of by a remote server.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local: Option<Local>,
    /// Model name on that server, substituted for the client's model name in the path.
    /// Default: the client's model name.
    pub upstream_model: Option<String>,
    /// `http1` (default), `h2c` (HTTP/2 without TLS, prior knowledge), or `grpc` (the
    /// variant takes the model's gRPC calls, and only those).
    pub protocol: UpstreamProtocol,
    /// Relative share of traffic, ≥ 0. Only ratios matter: 97/2/1 and 0.97/0.02/0.01
    /// are the same split. The weights of a model must have a positive sum.
    pub weight: f64,
    /// Cost in currency units per 1000 predictions, used by the bandit's profit
    /// objective. Default 0.
    pub cost_per_1k: f64,
    /// Cost in currency units per second of this variant's time, measured per
    /// prediction (from routing to the answer's head, retries included) and added to
    /// `cost_per_1k` / 1000 in the bandit's profit objective: what a GPU-second or a
    /// metered endpoint costs. Default 0.
    pub cost_per_second: f64,
    /// Overrides `connect_timeout` for this variant.
    #[serde(serialize_with = "crate::duration::serialize_opt")]
    pub connect_timeout: Option<Duration>,
    /// Overrides `upstream_idle_timeout` for this variant.
    #[serde(serialize_with = "crate::duration::serialize_opt")]
    pub upstream_idle_timeout: Option<Duration>,
    /// Overrides the model's and the top-level `request_timeout` for this variant. For a
    /// local variant: the longest a request waits for its batch to run (504 after).
    #[serde(serialize_with = "crate::duration::serialize_opt")]
    pub request_timeout: Option<Duration>,
}

/// A model served in-process.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Local {
    /// Path of an ONNX file (relative to the working directory), or `builtin:digits_mlp`
    /// / `builtin:digits_cnn` for the bundled models compiled into the binary.
    pub model: String,
    /// The version this variant answers as (TF Serving and Triton versions are positive
    /// integers). A request for another version gets 404. Default 1.
    pub version: u64,
    /// `tract` (CPU) or `wgpu` (GPU).
    pub runtime: LocalRuntime,
    /// Which CPU kernels run the model under `runtime: tract`.
    pub cpu_kernels: CpuKernels,
    /// Which adapters `runtime: wgpu` accepts.
    pub gpu_adapter: GpuAdapter,
    /// Dynamic batching, with TensorFlow Serving's knobs.
    pub batching: Batching,
    /// Extra latency added to every answer, for experiments. Default none.
    #[serde(serialize_with = "crate::duration::serialize_opt")]
    pub delay: Option<Duration>,
    /// Share of predictions answered with a 500 error instead, for experiments (0–1).
    /// Default 0.
    pub failure_rate: f64,
    /// Where `model` was written, so a missing file can be reported like any other
    /// config error.
    #[serde(skip)]
    pub model_at: (usize, usize),
}

/// Which in-process runtime runs a local model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LocalRuntime {
    /// tract, on the CPU.
    Tract,
    /// wgpu compute kernels on a GPU (Vulkan), when the binary has the `gpu` feature and
    /// the machine a GPU; otherwise the model runs on the CPU, with a log line saying why.
    Wgpu,
}

/// Which CPU kernels run a local model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuKernels {
    /// Switchyard's fused kernels when every operator of the graph has one, else
    /// tract's plan (the default).
    Fused,
    /// tract's optimised plan only: to compare, or to rule our kernels out.
    Tract,
}

/// Which Vulkan adapters the GPU runtime accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GpuAdapter {
    /// A discrete GPU, else an integrated or virtual one (the default).
    Hardware,
    /// Also a software adapter (Mesa's lavapipe): the GPU code path on a machine with
    /// no GPU, for tests and rehearsals. Slow; never what production wants.
    Any,
}

/// TensorFlow Serving's batching parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Batching {
    /// Most rows in one batch. Default 64.
    pub max_batch_size: usize,
    /// How long a batch waits for more requests after its first one, in microseconds.
    /// Default 0: run at once with whatever is queued (batches still form under load).
    pub batch_timeout_micros: u64,
    /// Threads running batches in parallel. Default: one per CPU core.
    pub num_batch_threads: Option<usize>,
    /// Full batches allowed to wait before requests are refused with 503. Default 100.
    pub max_enqueued_batches: usize,
}

impl Default for Batching {
    fn default() -> Self {
        Batching {
            max_batch_size: 64,
            batch_timeout_micros: 0,
            num_batch_threads: None,
            max_enqueued_batches: 100,
        }
    }
}

impl Config {
    /// The body limit that applies to `model`.
    pub fn body_limit(&self, model: &Model) -> u64 {
        model.max_body_bytes.unwrap_or(self.max_body_bytes)
    }
}

/// How to speak to an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 with keep-alive.
    Http1,
    /// HTTP/2 over cleartext, prior knowledge.
    H2c,
    /// gRPC (HTTP/2 over cleartext, prior knowledge): the variant takes the gRPC
    /// requests of its model (KServe V2 / Triton and TF Serving services), forwarded
    /// frame for frame; HTTP requests go to the model's other variants.
    Grpc,
}

impl UpstreamProtocol {
    /// True when requests go out as HTTP/2.
    pub fn is_http2(self) -> bool {
        matches!(self, UpstreamProtocol::H2c | UpstreamProtocol::Grpc)
    }
}

/// A validated `http://host:port[/prefix]` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    /// `host:port` (port defaults to 80).
    pub authority: String,
    /// Path prefix without a trailing slash; empty for none.
    pub prefix: String,
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}{}", self.authority, self.prefix)
    }
}

impl Serialize for UpstreamUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl UpstreamUrl {
    /// The path and query to request from this upstream for a client's `path`, whose
    /// model name occupies `model`, with `upstream_model` put in its place.
    pub fn path_for(
        &self,
        path: &str,
        model: std::ops::Range<usize>,
        upstream_model: &str,
        query: Option<&str>,
    ) -> String {
        // Exactly the length written: a string whose capacity is its length becomes
        // `Bytes` (the URI's storage) without a second allocation.
        let mut pq = String::with_capacity(
            self.prefix.len()
                + path.len().saturating_sub(model.len())
                + upstream_model.len()
                + query.map_or(0, |q| q.len() + 1),
        );
        pq.push_str(&self.prefix);
        pq.push_str(&path[..model.start]);
        pq.push_str(upstream_model);
        pq.push_str(&path[model.end..]);
        if let Some(q) = query {
            pq.push('?');
            pq.push_str(q);
        }
        pq
    }

    /// Parses `http://host[:port][/prefix]`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let rest = if let Some(rest) = text.strip_prefix("http://") {
            rest
        } else if text.starts_with("https://") {
            return Err(format!(
                "`{text}`: TLS to upstreams is not supported; a sidecar talks to its model servers over \
                 plain `http://` on the pod network"
            ));
        } else {
            return Err(format!("`{text}` is not an `http://host:port` URL"));
        };
        if rest.contains(['?', '#']) {
            return Err(format!(
                "`{text}`: an upstream URL takes no query or fragment"
            ));
        }
        let (authority, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(format!("`{text}` has no usable host"));
        }
        let authority = match authority.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(']') || authority.starts_with('[') => {
                if host.is_empty() {
                    return Err(format!("`{text}` has no host"));
                }
                if port.parse::<u16>().map_or(true, |p| p == 0) {
                    return Err(format!("`{text}` has a bad port `{port}`"));
                }
                authority.to_string()
            }
            _ => format!("{authority}:80"),
        };
        if authority
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(format!("`{text}` has a bad host"));
        }
        Ok(UpstreamUrl {
            authority,
            prefix: prefix.to_string(),
        })
    }
}

/// Names that appear in URLs, headers and metric labels: `[A-Za-z0-9._-]`, 1–128 chars.
fn check_name(cx: &mut Cx, node: &Node, path: &str, what: &str, name: &str) -> bool {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !ok {
        cx.error(
            node,
            path,
            format!("{what} `{name}` must be 1 to 128 letters, digits, `.`, `_` or `-`"),
        );
    }
    ok
}

fn name(cx: &mut Cx, node: &Node, path: &str) -> Option<String> {
    let s = decode::string(cx, node, path)?;
    check_name(cx, node, path, "name", &s).then_some(s)
}

fn positive_u64(cx: &mut Cx, node: &Node, path: &str) -> Option<u64> {
    match decode::u64(cx, node, path)? {
        0 => {
            cx.error(node, path, "must be greater than zero");
            None
        }
        n => Some(n),
    }
}

fn positive_usize(cx: &mut Cx, node: &Node, path: &str) -> Option<usize> {
    positive_u64(cx, node, path).map(|n| usize::try_from(n).unwrap_or(usize::MAX))
}

fn non_negative(cx: &mut Cx, node: &Node, path: &str) -> Option<f64> {
    let v = decode::f64(cx, node, path)?;
    if v < 0.0 {
        cx.error(node, path, format!("must be ≥ 0, found {v}"));
        return None;
    }
    Some(v)
}

fn default_addr(text: &str) -> SocketAddr {
    text.parse()
        .unwrap_or_else(|_| unreachable!("default address constant parses"))
}

/// Decodes and validates the document root.
pub fn decode_config(cx: &mut Cx, root: &Node) -> Option<Config> {
    let f = Fields::new(
        cx,
        root,
        "",
        &[
            "listen",
            "admin_listen",
            "max_body_bytes",
            "connect_timeout",
            "upstream_idle_timeout",
            "request_timeout",
            "drain_timeout",
            "client_header_timeout",
            "client_body_timeout",
            "client_send_timeout",
            "max_connections",
            "listen_backlog",
            "worker_threads",
            "seed",
            "state_file",
            "admin_token_file",
            "feedback_token_file",
            "bandit",
            "fleet",
            "models",
        ],
    )?;
    let listen = f.optional(cx, "listen", decode::socket_addr);
    let admin_listen = f.optional(cx, "admin_listen", decode::socket_addr);
    let max_body_bytes = f.optional(cx, "max_body_bytes", positive_u64);
    let connect_timeout = f.optional(cx, "connect_timeout", decode::duration);
    let upstream_idle_timeout = f.optional(cx, "upstream_idle_timeout", decode::duration);
    let request_timeout = f.optional(cx, "request_timeout", decode::duration);
    let drain_timeout = f.optional(cx, "drain_timeout", decode::duration);
    let client_header_timeout = f.optional(cx, "client_header_timeout", decode::duration);
    let client_body_timeout = f.optional(cx, "client_body_timeout", decode::duration);
    let client_send_timeout = f.optional(cx, "client_send_timeout", decode::duration);
    let max_connections = f.optional(cx, "max_connections", positive_usize);
    let listen_backlog = f.optional(cx, "listen_backlog", positive_u64);
    let worker_threads = f.optional(cx, "worker_threads", positive_usize);
    let seed = f.optional(cx, "seed", decode::u64);
    let state_file = f.optional(cx, "state_file", decode::string);
    let path = |cx: &mut Cx, n: &Node, p: &str| {
        let s = decode::string(cx, n, p)?;
        if s.is_empty() {
            cx.error(n, p, "give a file path, or leave the key out");
            return None;
        }
        Some(s)
    };
    let admin_token_file = f.optional(cx, "admin_token_file", path);
    let feedback_token_file = f.optional(cx, "feedback_token_file", path);
    let bandit = f.optional(cx, "bandit", decode_bandit_runtime);
    let fleet = f.optional(cx, "fleet", decode_fleet);
    let models = f.required(cx, "models", decode_models);

    let listen = listen.unwrap_or_else(|| default_addr(DEFAULT_LISTEN));
    let admin_listen = admin_listen.unwrap_or_else(|| default_addr(DEFAULT_ADMIN_LISTEN));
    if listen == admin_listen && listen.port() != 0 {
        let node = f.get("admin_listen").unwrap_or(root);
        cx.error(
            node,
            "admin_listen",
            format!("`{admin_listen}` is also `listen`; the admin listener needs its own port"),
        );
    }
    Some(Config {
        listen,
        admin_listen,
        max_body_bytes: max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES),
        connect_timeout: connect_timeout.unwrap_or(Duration::from_secs(1)),
        upstream_idle_timeout: upstream_idle_timeout.unwrap_or(DEFAULT_UPSTREAM_IDLE_TIMEOUT),
        request_timeout: request_timeout.unwrap_or(Duration::from_secs(30)),
        drain_timeout: drain_timeout.unwrap_or(Duration::from_secs(30)),
        client_header_timeout: client_header_timeout.unwrap_or(Duration::from_secs(60)),
        client_body_timeout: client_body_timeout.unwrap_or(Duration::from_secs(60)),
        client_send_timeout: client_send_timeout.unwrap_or(Duration::from_secs(60)),
        max_connections: max_connections.unwrap_or(10_000),
        listen_backlog: listen_backlog.map_or(4096, |n| u32::try_from(n).unwrap_or(u32::MAX)),
        worker_threads,
        seed,
        state_file,
        admin_token_file,
        feedback_token_file,
        bandit: bandit.unwrap_or_default(),
        fleet,
        models: models?,
    })
}

/// `fleet:`: the Redis the replicas of one model server share, and how they use it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Fleet {
    /// `redis://[[user]:password@]host[:port][/db]`; required to enable fleet mode.
    pub redis: RedisUrl,
    /// Prefix of every key this fleet writes, so several fleets can share one Redis.
    /// Default `switchyard`.
    pub key_prefix: String,
    /// How often a replica pushes what it learned and reads the fleet's statistics.
    /// Default `1s`.
    #[serde(serialize_with = "crate::duration::serialize")]
    pub sync_interval: Duration,
    /// A file holding the fleet's shared secret (at least 16 bytes), with which request
    /// ids carry their decision signed (HMAC-SHA256) so any replica can take their
    /// feedback. Default: a random secret kept in Redis under `<key_prefix>:key`, made
    /// by the first replica to start.
    pub key_file: Option<String>,
}

/// A parsed `redis://` URL. The password is kept, and never shown (`/admin/config`
/// prints `***`).
#[derive(Debug, Clone, PartialEq)]
pub struct RedisUrl {
    pub host: String,
    pub port: u16,
    pub db: u32,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl RedisUrl {
    /// `host:port`, to connect to.
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Parses `redis://[[user]:password@]host[:port][/db]`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let rest = s.strip_prefix("redis://").ok_or_else(|| {
            format!("`{s}` is not a redis:// URL (rediss:// and unix sockets are not supported)")
        })?;
        let (auth, rest) = match rest.rsplit_once('@') {
            Some((a, r)) => (Some(a), r),
            None => (None, rest),
        };
        let (hostport, db) = match rest.split_once('/') {
            Some((h, "")) => (h, 0),
            Some((h, d)) => (
                h,
                d.parse::<u32>()
                    .map_err(|_| format!("the database `{d}` in `{s}` is not a number"))?,
            ),
            None => (rest, 0),
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, p) = v6
                .split_once(']')
                .ok_or_else(|| format!("unclosed `[` in `{s}`"))?;
            (h, p.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        if host.is_empty()
            || !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b))
        {
            return Err(format!("`{s}` has no valid host"));
        }
        let port = match port {
            None => 6379,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("the port `{p}` in `{s}` is not a port"))?,
        };
        let (username, password) = match auth.map(|a| a.split_once(':')) {
            None => (None, None),
            Some(None) => (None, auth.map(str::to_string)),
            Some(Some((u, p))) => ((!u.is_empty()).then(|| u.to_string()), Some(p.to_string())),
        };
        Ok(RedisUrl {
            host: host.to_string(),
            port,
            db,
            username,
            password,
        })
    }
}

impl Serialize for RedisUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let auth = match (&self.username, &self.password) {
            (Some(u), Some(_)) => format!("{u}:***@"),
            (None, Some(_)) => ":***@".to_string(),
            _ => String::new(),
        };
        s.serialize_str(&format!("redis://{auth}{}/{}", self.address(), self.db))
    }
}

fn decode_fleet(cx: &mut Cx, node: &Node, path: &str) -> Option<Fleet> {
    let f = Fields::new(
        cx,
        node,
        path,
        &["redis", "key_prefix", "sync_interval", "key_file"],
    )?;
    let redis = f.required(cx, "redis", |cx, n, p| {
        let s = decode::string(cx, n, p)?;
        RedisUrl::parse(&s).map_err(|e| cx.error(n, p, e)).ok()
    });
    let key_prefix = f.optional(cx, "key_prefix", |cx, n, p| {
        let s = decode::string(cx, n, p)?;
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:{}".contains(&b));
        if !ok {
            cx.error(
                n,
                p,
                format!("`{s}`: 1 to 64 letters, digits or `-_.:{{}}`"),
            );
            return None;
        }
        Some(s)
    });
    let sync_interval = f.optional(cx, "sync_interval", |cx, n, p| {
        let d = decode::duration(cx, n, p)?;
        if d < Duration::from_millis(50) || d > Duration::from_secs(300) {
            cx.error(n, p, format!("must be from 50ms to 5m, found {d:?}"));
            return None;
        }
        Some(d)
    });
    let key_file = f.optional(cx, "key_file", decode::string);
    Some(Fleet {
        redis: redis?,
        key_prefix: key_prefix.unwrap_or_else(|| "switchyard".to_string()),
        sync_interval: sync_interval.unwrap_or(Duration::from_secs(1)),
        key_file,
    })
}

/// Most decisions `bandit.decision_log_capacity` may ask for: at about 48 bytes each
/// (plus 16 while an evicted one is remembered), 100 million is 6.4 GB.
pub const MAX_DECISION_LOG_CAPACITY: u64 = 100_000_000;

fn decode_bandit_runtime(cx: &mut Cx, node: &Node, path: &str) -> Option<BanditRuntime> {
    let f = Fields::new(cx, node, path, &["decision_log_capacity", "decisions_file"])?;
    let capacity = f.optional(cx, "decision_log_capacity", |cx, n, p| {
        let v = positive_u64(cx, n, p)?;
        if v > MAX_DECISION_LOG_CAPACITY {
            cx.error(
                n,
                p,
                format!("at most {MAX_DECISION_LOG_CAPACITY} (about 48 bytes each), found {v}"),
            );
            return None;
        }
        usize::try_from(v).ok()
    });
    let decisions_file = f.optional(cx, "decisions_file", decode::string);
    Some(BanditRuntime {
        decision_log_capacity: capacity.unwrap_or(DEFAULT_DECISION_LOG_CAPACITY),
        decisions_file,
    })
}

/// Default `bandit.decision_log_capacity`: with the default `feedback_ttl` of 10 minutes
/// it holds every decision up to about 1,700 predictions per second.
pub const DEFAULT_DECISION_LOG_CAPACITY: usize = 1_000_000;

/// The bandits' runtime, shared by all models (`bandit:` at the top level).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BanditRuntime {
    /// Most decisions kept for feedback at once, over all models. When it is full the
    /// oldest are evicted before their `feedback_ttl` (logged, counted in
    /// `switchyard_decisions_evicted_total`), and their feedback is answered 410.
    /// Size it as predictions per second × `feedback_ttl`. Default 1000000.
    pub decision_log_capacity: usize,
    /// Where every settled decision is appended as one JSON line (model, variant, the
    /// probability it was chosen with, its reward, whether feedback came): what
    /// `switchyard evaluate` reads. Written off the request path; lines that cannot be
    /// queued are dropped and counted. Default: not written.
    pub decisions_file: Option<String>,
}

impl Default for BanditRuntime {
    fn default() -> Self {
        BanditRuntime {
            decision_log_capacity: DEFAULT_DECISION_LOG_CAPACITY,
            decisions_file: None,
        }
    }
}

fn decode_models(cx: &mut Cx, node: &Node, path: &str) -> Option<BTreeMap<String, Model>> {
    let entries = decode::entries(cx, node, path)?;
    if entries.is_empty() {
        cx.error(node, path, "at least one model is needed");
        return None;
    }
    let mut models = BTreeMap::new();
    let mut ok = true;
    for (model_name, key, value) in entries {
        let model_path = child(path, model_name);
        ok &= check_name(cx, key, &model_path, "model name", model_name);
        match decode_model(cx, value, &model_path) {
            Some(m) => {
                models.insert(model_name.to_string(), m);
            }
            None => ok = false,
        }
    }
    ok.then_some(models)
}

fn decode_model(cx: &mut Cx, node: &Node, path: &str) -> Option<Model> {
    let f = Fields::new(
        cx,
        node,
        path,
        &[
            "variants",
            "sticky_header",
            "max_body_bytes",
            "request_timeout",
            "bandit",
            "shadows",
            "fallback",
            "breaker",
            "limits",
            "retry",
            "hedge_after",
            "capture",
        ],
    )?;
    let sticky_header = f.optional(cx, "sticky_header", |cx, n, p| {
        let s = decode::string(cx, n, p)?.to_ascii_lowercase();
        let token = !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !token {
            cx.error(n, p, format!("`{s}` is not a valid HTTP header name"));
            return None;
        }
        Some(s)
    });
    let max_body_bytes = f.optional(cx, "max_body_bytes", positive_u64);
    let request_timeout = f.optional(cx, "request_timeout", decode::duration);
    let bandit = f.optional(cx, "bandit", decode_bandit);
    let shadows = f.optional(cx, "shadows", decode_shadows);
    let fallback = f.optional(cx, "fallback", name_field);
    let breaker = f.optional(cx, "breaker", crate::resilience::decode_breaker);
    let limits = f.optional(cx, "limits", crate::resilience::decode_limits);
    let retry = f.optional(cx, "retry", crate::resilience::decode_retry);
    let hedge_after = f.optional(cx, "hedge_after", decode::duration);
    let capture = f.optional(cx, "capture", decode_capture);
    let variants = f.required(cx, "variants", decode_variants)?;
    if let (Some(name), Some(node)) = (&fallback, f.get("fallback")) {
        match variants.iter().find(|v| &v.name == name) {
            None => cx.error(
                node,
                &child(path, "fallback"),
                format!(
                    "no variant `{name}` in this model; the fallback is one of its `local` variants (weight 0 if it should answer only as the fallback)"
                ),
            ),
            Some(v) if v.local.is_none() => cx.error(
                node,
                &child(path, "fallback"),
                format!(
                    "variant `{name}` is remote; the fallback must be a `local` variant, which does not fail when upstreams do"
                ),
            ),
            Some(_) => {}
        }
    }
    if let (Some(_), None, Some(node)) = (hedge_after, &fallback, f.get("hedge_after")) {
        if variants.len() < 2 {
            cx.error(
                node,
                &child(path, "hedge_after"),
                "a hedge needs a second variant or a `fallback` to ask",
            );
        }
    }
    let shadows = match (shadows, f.get("shadows")) {
        (Some(list), Some(node)) => {
            for (i, s) in list.iter().enumerate() {
                if variants.iter().any(|v| v.name == s.name) {
                    cx.error(
                        node,
                        &format!("{}[{i}].name", child(path, "shadows")),
                        format!(
                            "`{}` is already a variant of this model; a shadow needs its own name",
                            s.name
                        ),
                    );
                }
            }
            list
        }
        (None, Some(_)) => return None,
        _ => Vec::new(),
    };
    if let (Some(b), Some(node)) = (&bandit, f.get("bandit")) {
        if b.min_weight * variants.len() as f64 > 1.0 {
            cx.error(
                node,
                &child(path, "bandit.min_weight"),
                format!(
                    "{} variants cannot each keep {}; the floor times the number of variants must be at most 1",
                    variants.len(),
                    b.min_weight
                ),
            );
        }
    }
    Some(Model {
        variants,
        sticky_header,
        max_body_bytes,
        request_timeout,
        bandit,
        shadows,
        fallback,
        breaker: breaker.unwrap_or_default(),
        limits: limits.unwrap_or_default(),
        retry: retry.unwrap_or_default(),
        hedge_after,
        capture,
    })
}

fn decode_capture(cx: &mut Cx, node: &Node, path: &str) -> Option<Capture> {
    let f = Fields::new(cx, node, path, &["margin", "sample", "file", "max_bytes"])?;
    let share = |what: &'static str| {
        move |cx: &mut Cx, n: &Node, p: &str| {
            let v = decode::f64(cx, n, p)?;
            if !(0.0..=1.0).contains(&v) {
                cx.error(n, p, format!("{what} must be from 0 to 1, found {v}"));
                return None;
            }
            Some(v)
        }
    };
    let margin = f.optional(cx, "margin", share("the margin"));
    let sample = f.optional(cx, "sample", share("the sampled share"));
    let max_bytes = f.optional(cx, "max_bytes", |cx, n, p| {
        let v = decode::byte_size(cx, n, p)?;
        if v < 4096 {
            cx.error(n, p, format!("must be at least 4KiB, found {v}"));
            return None;
        }
        Some(v)
    });
    let file = f.required(cx, "file", decode::string)?;
    Some(Capture {
        margin: margin.unwrap_or(0.1),
        sample: sample.unwrap_or(1.0),
        file,
        max_bytes: max_bytes.unwrap_or(100 * 1024 * 1024),
    })
}

fn decode_bandit(cx: &mut Cx, node: &Node, path: &str) -> Option<BanditSpec> {
    let f = Fields::new(
        cx,
        node,
        path,
        &[
            "objective",
            "update_interval",
            "update_every",
            "min_weight",
            "max_step",
            "warmup",
            "feedback_ttl",
            "missing_feedback",
            "half_life",
            "prior",
            "mode",
            "detect_changes",
        ],
    )?;
    let objective = f.required(cx, "objective", |cx, n, p| {
        decode::one_of(
            cx,
            n,
            p,
            &[
                ("conversion", BanditObjective::Conversion),
                ("revenue", BanditObjective::Revenue),
                ("profit", BanditObjective::Profit),
            ],
        )
    });
    let fraction = |lo_open: bool| {
        move |cx: &mut Cx, n: &Node, p: &str| {
            let v = decode::f64(cx, n, p)?;
            let ok = if lo_open {
                v > 0.0 && v <= 1.0
            } else {
                (0.0..1.0).contains(&v)
            };
            if !ok {
                let range = if lo_open { "in (0, 1]" } else { "in [0, 1)" };
                cx.error(n, p, format!("must be {range}, found {v}"));
                return None;
            }
            Some(v)
        }
    };
    let update_interval = f.optional(cx, "update_interval", decode::duration);
    let update_every = f.optional(cx, "update_every", |cx, n, p| {
        let v = decode::u64(cx, n, p)?;
        if v == 0 {
            cx.error(n, p, "must be at least 1 (reward)");
            return None;
        }
        Some(v)
    });
    let min_weight = f.optional(cx, "min_weight", fraction(false));
    let max_step = f.optional(cx, "max_step", fraction(true));
    let warmup = f.optional(cx, "warmup", decode::u64);
    let feedback_ttl = f.optional(cx, "feedback_ttl", decode::duration);
    let missing_feedback = f.optional(cx, "missing_feedback", |cx, n, p| {
        decode::one_of(
            cx,
            n,
            p,
            &[
                ("ignore", MissingFeedback::Ignore),
                ("zero", MissingFeedback::Zero),
            ],
        )
    });
    let half_life = f.optional(cx, "half_life", |cx, n, p| {
        let text = decode::string(cx, n, p)?;
        if let Ok(v) = text.parse::<f64>() {
            if !(v >= 1.0 && v.is_finite()) {
                cx.error(n, p, format!("must be at least 1 (reward), found {v}"));
                return None;
            }
            return Some(HalfLife::Rewards(v));
        }
        decode::duration(cx, n, p).map(HalfLife::Time)
    });
    let positive = |cx: &mut Cx, n: &Node, p: &str| {
        let v = decode::f64(cx, n, p)?;
        if v <= 0.0 {
            cx.error(n, p, format!("must be greater than 0, found {v}"));
            return None;
        }
        Some(v)
    };
    let mode = f.optional(cx, "mode", |cx, n, p| {
        decode::one_of(
            cx,
            n,
            p,
            &[
                ("weights", BanditMode::Weights),
                ("per_request", BanditMode::PerRequest),
            ],
        )
    });
    let detect_changes = f.optional(cx, "detect_changes", decode::bool);
    let prior_node = f.get("prior");
    let prior = f.optional(cx, "prior", |cx, n, p| {
        let g = Fields::new(
            cx,
            n,
            p,
            &["alpha", "beta", "mean", "strength", "shape", "scale"],
        )?;
        if g.get("alpha").is_some() || g.get("beta").is_some() {
            Some(Prior::Beta {
                alpha: g.required(cx, "alpha", positive)?,
                beta: g.required(cx, "beta", positive)?,
            })
        } else {
            Some(Prior::Gaussian {
                mean: g.optional(cx, "mean", decode::f64).unwrap_or(0.0),
                strength: g.optional(cx, "strength", positive).unwrap_or(1.0),
                shape: g.optional(cx, "shape", positive).unwrap_or(1.0),
                scale: g.optional(cx, "scale", positive).unwrap_or(1.0),
            })
        }
    });
    if let (Some(pr), Some(o), Some(n)) = (&prior, &objective, prior_node) {
        let fits = matches!(
            (pr, o),
            (Prior::Beta { .. }, BanditObjective::Conversion)
                | (
                    Prior::Gaussian { .. },
                    BanditObjective::Revenue | BanditObjective::Profit
                )
        );
        if !fits {
            cx.error(
                n,
                &child(path, "prior"),
                "conversion takes a `{alpha, beta}` prior; revenue and profit take `{mean, strength, shape, scale}`",
            );
        }
    }
    Some(BanditSpec {
        objective: objective?,
        update_interval: update_interval.unwrap_or(Duration::from_secs(1)),
        update_every: update_every.unwrap_or(100),
        min_weight: min_weight.unwrap_or(0.0),
        max_step: max_step.unwrap_or(1.0),
        warmup: warmup.unwrap_or(0),
        feedback_ttl: feedback_ttl.unwrap_or(Duration::from_secs(600)),
        missing_feedback: missing_feedback.unwrap_or(MissingFeedback::Ignore),
        half_life,
        detect_changes: detect_changes.unwrap_or(true),
        mode: mode.unwrap_or(BanditMode::PerRequest),
        prior,
    })
}

/// Most variants per model: the request path keeps the variants a request has tried in
/// one 64-bit set (no allocation per request).
pub const MAX_VARIANTS: usize = 64;

fn decode_variants(cx: &mut Cx, node: &Node, path: &str) -> Option<Vec<Variant>> {
    let items = decode::seq(cx, node, path)?;
    if items.is_empty() {
        cx.error(node, path, "at least one variant is needed");
        return None;
    }
    if items.len() > MAX_VARIANTS {
        cx.error(
            node,
            path,
            format!(
                "at most {MAX_VARIANTS} variants per model, found {}",
                items.len()
            ),
        );
        return None;
    }
    let mut variants = Vec::with_capacity(items.len());
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        let item_path = format!("{path}[{i}]");
        match decode_variant(cx, item, &item_path) {
            Some(v) => {
                if variants.iter().any(|o: &Variant| o.name == v.name) {
                    cx.error(
                        item,
                        &child(&item_path, "name"),
                        format!("variant name `{}` is used twice in this model", v.name),
                    );
                    ok = false;
                }
                variants.push(v);
            }
            None => ok = false,
        }
    }
    if !ok {
        return None;
    }
    let sum: f64 = variants.iter().map(|v| v.weight).sum();
    if !sum.is_finite() {
        cx.error(
            node,
            path,
            "the weights of a model add up to more than a number can hold; only their ratios matter, so use smaller numbers",
        );
        return None;
    }
    if sum <= 0.0 {
        cx.error(
            node,
            path,
            "the weights of a model must have a positive sum; give at least one variant a weight above 0",
        );
        return None;
    }
    Some(variants)
}

fn decode_variant(cx: &mut Cx, node: &Node, path: &str) -> Option<Variant> {
    let f = Fields::new(
        cx,
        node,
        path,
        &[
            "name",
            "upstream",
            "local",
            "upstream_model",
            "protocol",
            "weight",
            "cost_per_1k",
            "cost_per_second",
            "connect_timeout",
            "upstream_idle_timeout",
            "request_timeout",
        ],
    )?;
    let name = f.required(cx, "name", name);
    let upstream = f.optional(cx, "upstream", upstream_url);
    let local = f.optional(cx, "local", decode_local);
    let mut backend_ok = true;
    match (f.get("upstream"), f.get("local")) {
        (None, None) => {
            cx.error(
                f.anchor(),
                path,
                "give the variant either `upstream` (a model server's URL) or `local` (a model run in-process)",
            );
            backend_ok = false;
        }
        (Some(_), Some(l)) => {
            cx.error(
                l,
                &child(path, "local"),
                "a variant has either `upstream` or `local`, not both",
            );
            backend_ok = false;
        }
        (None, Some(_)) => {
            for key in [
                "upstream_model",
                "protocol",
                "connect_timeout",
                "upstream_idle_timeout",
            ] {
                if let Some(n) = f.get(key) {
                    cx.error(
                        n,
                        &child(path, key),
                        format!("`{key}` applies to `upstream` variants only; this one is `local`"),
                    );
                    backend_ok = false;
                }
            }
        }
        (Some(_), None) => {}
    }
    let upstream_model = f.optional(cx, "upstream_model", name_field);
    let protocol = f.optional(cx, "protocol", upstream_protocol);
    let weight = f.required(cx, "weight", non_negative);
    let cost_per_1k = f.optional(cx, "cost_per_1k", non_negative);
    let cost_per_second = f.optional(cx, "cost_per_second", non_negative);
    let connect_timeout = f.optional(cx, "connect_timeout", decode::duration);
    let upstream_idle_timeout = f.optional(cx, "upstream_idle_timeout", decode::duration);
    let request_timeout = f.optional(cx, "request_timeout", decode::duration);
    if !backend_ok || (upstream.is_none() && local.is_none()) {
        return None;
    }
    Some(Variant {
        name: name?,
        upstream,
        local,
        upstream_model,
        protocol: protocol.unwrap_or(UpstreamProtocol::Http1),
        weight: weight?,
        cost_per_1k: cost_per_1k.unwrap_or(0.0),
        cost_per_second: cost_per_second.unwrap_or(0.0),
        connect_timeout,
        upstream_idle_timeout,
        request_timeout,
    })
}

fn upstream_url(cx: &mut Cx, node: &Node, path: &str) -> Option<UpstreamUrl> {
    let text = decode::string(cx, node, path)?;
    UpstreamUrl::parse(&text)
        .map_err(|msg| cx.error(node, path, msg))
        .ok()
}

fn upstream_protocol(cx: &mut Cx, node: &Node, path: &str) -> Option<UpstreamProtocol> {
    decode::one_of(
        cx,
        node,
        path,
        &[
            ("http1", UpstreamProtocol::Http1),
            ("h2c", UpstreamProtocol::H2c),
            ("grpc", UpstreamProtocol::Grpc),
        ],
    )
}

fn decode_shadows(cx: &mut Cx, node: &Node, path: &str) -> Option<Vec<Shadow>> {
    let items = decode::seq(cx, node, path)?;
    if items.len() > MAX_SHADOWS {
        cx.error(
            node,
            path,
            format!(
                "at most {MAX_SHADOWS} shadows per model, found {}",
                items.len()
            ),
        );
        return None;
    }
    let mut shadows: Vec<Shadow> = Vec::with_capacity(items.len());
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        let item_path = format!("{path}[{i}]");
        match decode_shadow(cx, item, &item_path) {
            Some(s) => {
                if shadows.iter().any(|o| o.name == s.name) {
                    cx.error(
                        item,
                        &child(&item_path, "name"),
                        format!("shadow name `{}` is used twice in this model", s.name),
                    );
                    ok = false;
                }
                shadows.push(s);
            }
            None => ok = false,
        }
    }
    ok.then_some(shadows)
}

fn decode_shadow(cx: &mut Cx, node: &Node, path: &str) -> Option<Shadow> {
    let f = Fields::new(
        cx,
        node,
        path,
        &[
            "name",
            "upstream",
            "upstream_model",
            "protocol",
            "fraction",
            "sampling",
            "max_concurrency",
            "max_queue",
            "request_timeout",
            "keep_disagreements",
            "disagreements_file",
        ],
    )?;
    let name = f.required(cx, "name", name);
    let upstream = f.required(cx, "upstream", upstream_url);
    let upstream_model = f.optional(cx, "upstream_model", name_field);
    let protocol = f.optional(cx, "protocol", upstream_protocol);
    let fraction = f.required(cx, "fraction", |cx, n, p| {
        let v = decode::f64(cx, n, p)?;
        if !(0.0..=1.0).contains(&v) {
            cx.error(n, p, format!("must be between 0 and 1, found {v}"));
            return None;
        }
        Some(v)
    });
    let sampling = f.optional(cx, "sampling", |cx, n, p| {
        decode::one_of(
            cx,
            n,
            p,
            &[
                ("random", ShadowSampling::Random),
                ("hash", ShadowSampling::Hash),
            ],
        )
    });
    let max_concurrency = f.optional(cx, "max_concurrency", positive_usize);
    let max_queue = f.optional(cx, "max_queue", positive_usize);
    let request_timeout = f.optional(cx, "request_timeout", decode::duration);
    let keep_disagreements = f.optional(cx, "keep_disagreements", |cx, n, p| {
        decode::u64(cx, n, p).map(|v| usize::try_from(v).unwrap_or(usize::MAX))
    });
    let disagreements_file = f.optional(cx, "disagreements_file", |cx, n, p| {
        let s = decode::string(cx, n, p)?;
        if s.is_empty() {
            cx.error(n, p, "give a file path, or leave the key out");
            return None;
        }
        Some(s)
    });
    Some(Shadow {
        name: name?,
        upstream: upstream?,
        upstream_model,
        protocol: protocol.unwrap_or(UpstreamProtocol::Http1),
        fraction: fraction?,
        sampling: sampling.unwrap_or(ShadowSampling::Random),
        max_concurrency: max_concurrency.unwrap_or(32),
        max_queue: max_queue.unwrap_or(256),
        request_timeout,
        keep_disagreements: keep_disagreements.unwrap_or(50),
        disagreements_file,
    })
}

fn decode_local(cx: &mut Cx, node: &Node, path: &str) -> Option<Local> {
    let f = Fields::new(
        cx,
        node,
        path,
        &[
            "model",
            "runtime",
            "cpu_kernels",
            "gpu_adapter",
            "batching",
            "delay",
            "failure_rate",
            "version",
        ],
    )?;
    let model_node = f.get("model");
    let model = f.required(cx, "model", |cx, n, p| {
        let m = decode::string(cx, n, p)?;
        if let Some(b) = m.strip_prefix("builtin:") {
            if !BUILTIN_MODELS.contains(&b) {
                cx.error(
                    n,
                    p,
                    format!(
                        "no built-in model `{b}`; the built-ins are {}",
                        BUILTIN_MODELS
                            .iter()
                            .map(|m| format!("`builtin:{m}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                );
                return None;
            }
        }
        Some(m)
    });
    let runtime = f.optional(cx, "runtime", |cx, n, p| {
        decode::one_of(
            cx,
            n,
            p,
            &[("tract", LocalRuntime::Tract), ("wgpu", LocalRuntime::Wgpu)],
        )
    });
    let cpu_kernels = f.optional(cx, "cpu_kernels", |cx, n, p| {
        decode::one_of(
            cx,
            n,
            p,
            &[("fused", CpuKernels::Fused), ("tract", CpuKernels::Tract)],
        )
    });
    let gpu_adapter = f.optional(cx, "gpu_adapter", |cx, n, p| {
        decode::one_of(
            cx,
            n,
            p,
            &[("hardware", GpuAdapter::Hardware), ("any", GpuAdapter::Any)],
        )
    });
    // Each knob belongs to one runtime; one set for the other is a mistake worth
    // reporting rather than a setting silently ignored.
    let wgpu = runtime == Some(LocalRuntime::Wgpu);
    if wgpu && cpu_kernels == Some(CpuKernels::Tract) {
        let n = f.get("cpu_kernels").unwrap_or(node);
        cx.error(
            n,
            &child(path, "cpu_kernels"),
            "`tract` applies to `runtime: tract` only: the GPU runs the fused kernels' steps"
                .to_string(),
        );
    }
    if !wgpu && gpu_adapter.is_some() {
        let n = f.get("gpu_adapter").unwrap_or(node);
        cx.error(
            n,
            &child(path, "gpu_adapter"),
            "applies to `runtime: wgpu` only".to_string(),
        );
    }
    let batching = f.optional(cx, "batching", decode_batching);
    let delay = f.optional(cx, "delay", decode::duration);
    let failure_rate = f.optional(cx, "failure_rate", |cx, n, p| {
        let v = decode::f64(cx, n, p)?;
        if !(0.0..=1.0).contains(&v) {
            cx.error(n, p, format!("must be between 0 and 1, found {v}"));
            return None;
        }
        Some(v)
    });
    let version = f.optional(cx, "version", positive_u64);
    let local = Local {
        model: model?,
        version: version.unwrap_or(1),
        runtime: runtime.unwrap_or(LocalRuntime::Tract),
        cpu_kernels: cpu_kernels.unwrap_or(CpuKernels::Fused),
        gpu_adapter: gpu_adapter.unwrap_or(GpuAdapter::Hardware),
        batching: batching.unwrap_or_default(),
        delay,
        failure_rate: failure_rate.unwrap_or(0.0),
        model_at: model_node.map_or((node.line, node.column), |n| (n.line, n.column)),
    };
    // Its file is checked by the caller's checks even if the rest of the file has
    // errors, so one run reports every problem (a variant with a bad weight and a bad
    // model file gets both).
    cx.local(&child(path, "model"), &local);
    Some(local)
}

/// The models compiled into the binary, usable as `builtin:NAME`.
pub const BUILTIN_MODELS: &[&str] = &["digits_mlp", "digits_cnn"];

fn decode_batching(cx: &mut Cx, node: &Node, path: &str) -> Option<Batching> {
    let f = Fields::new(
        cx,
        node,
        path,
        &[
            "max_batch_size",
            "batch_timeout_micros",
            "num_batch_threads",
            "max_enqueued_batches",
        ],
    )?;
    let d = Batching::default();
    Some(Batching {
        max_batch_size: f
            .optional(cx, "max_batch_size", positive_usize)
            .unwrap_or(d.max_batch_size),
        batch_timeout_micros: f
            .optional(cx, "batch_timeout_micros", decode::u64)
            .unwrap_or(d.batch_timeout_micros),
        num_batch_threads: f.optional(cx, "num_batch_threads", positive_usize),
        max_enqueued_batches: f
            .optional(cx, "max_enqueued_batches", positive_usize)
            .unwrap_or(d.max_enqueued_batches),
    })
}

fn name_field(cx: &mut Cx, node: &Node, path: &str) -> Option<String> {
    name(cx, node, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_urls() {
        let u = UpstreamUrl::parse("http://127.0.0.1:9001").unwrap();
        assert_eq!(
            (u.authority.as_str(), u.prefix.as_str()),
            ("127.0.0.1:9001", "")
        );
        let u = UpstreamUrl::parse("http://models.local/serving/").unwrap();
        assert_eq!(
            (u.authority.as_str(), u.prefix.as_str()),
            ("models.local:80", "/serving")
        );
        let u = UpstreamUrl::parse("http://[::1]:8500").unwrap();
        assert_eq!(u.authority, "[::1]:8500");
        assert!(UpstreamUrl::parse("https://x:1")
            .unwrap_err()
            .contains("TLS"));
        assert!(UpstreamUrl::parse("127.0.0.1:9001").is_err());
        assert!(UpstreamUrl::parse("http://x:0").is_err());
        assert!(UpstreamUrl::parse("http://x:99999").is_err());
        assert!(UpstreamUrl::parse("http://x:1/?a=b").is_err());
    }

    #[test]
    fn redis_urls() {
        let u = RedisUrl::parse("redis://127.0.0.1:6380/2").unwrap();
        assert_eq!((u.address().as_str(), u.db), ("127.0.0.1:6380", 2));
        assert_eq!(u.password, None);
        let u = RedisUrl::parse("redis://:s3cret@cache").unwrap();
        assert_eq!((u.address().as_str(), u.db), ("cache:6379", 0));
        assert_eq!(
            (u.username.as_deref(), u.password.as_deref()),
            (None, Some("s3cret"))
        );
        let u = RedisUrl::parse("redis://app:pw@[::1]:7000/").unwrap();
        assert_eq!(u.address(), "[::1]:7000");
        assert_eq!(u.username.as_deref(), Some("app"));
        // The password never shows in what the config prints.
        let shown = serde_json::to_string(&u).unwrap();
        assert!(!shown.contains("pw") && shown.contains("***"), "{shown}");
        for bad in [
            "127.0.0.1:6379",
            "rediss://x",
            "redis://",
            "redis://x:0",
            "redis://x:1/db",
            "redis://x y",
        ] {
            assert!(RedisUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn fleet_section() {
        let base = "models:\n  m:\n    variants:\n      - {name: a, upstream: \"http://127.0.0.1:1\", weight: 1}\n";
        let c = crate::from_yaml_str(&format!(
            "fleet: {{redis: \"redis://127.0.0.1:6379/0\"}}\n{base}"
        ))
        .unwrap();
        let f = c.fleet.unwrap();
        assert_eq!(f.key_prefix, "switchyard");
        assert_eq!(f.sync_interval, Duration::from_secs(1));
        assert_eq!(f.key_file, None);
        let e = crate::from_yaml_str(&format!(
            "fleet: {{redis: \"http://x\", sync_interval: 1ms, key_prefix: \"a b\"}}\n{base}"
        ))
        .unwrap_err()
        .to_string();
        for key in ["fleet.redis", "fleet.sync_interval", "fleet.key_prefix"] {
            assert!(e.contains(key), "{key} in {e}");
        }
        assert!(crate::from_yaml_str(base).unwrap().fleet.is_none());
    }
}
