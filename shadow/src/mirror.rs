//! Mirroring: per shadow a bounded queue, `max_concurrency` workers each with its own
//! connection, and the pairing of each shadow answer with the primary's.
//!
//! The request path touches this through two taps and never waits on them:
//! - a [`RequestTap`] sees the client's body frames as the primary streams them (each
//!   `Bytes` is reference-counted, not copied) and, once the body is complete, offers
//!   one job per chosen shadow to its queue with `try_send`: a full queue is a counted
//!   drop, never a wait;
//! - a [`ResponseTap`] sees the primary's answer frames on their way to the client and
//!   hands them over at the end.
//!
//! Whichever of the primary and a shadow finishes second does the comparison; when that
//! is the primary, the comparison is spawned on the shadow thread ([`ShadowRuntime`]),
//! where the workers and their connections also run.

use std::borrow::Cow;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, Scheme};
use http::{Method, Request, Uri, Version};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use switchyard_config::{Shadow as ShadowSpec, ShadowSampling, UpstreamProtocol};
use tokio::sync::mpsc;

use crate::compare::{compare, Comparison, Verdict};
use crate::metrics::{DropReason, ShadowErrorKind, ShadowMetricFamilies};
use crate::sample::Sampler;
use crate::stats::{open_log, Side, Stats};
use crate::ShadowError;

/// `x-switchyard-shadow: 1` marks a mirrored request.
pub static X_SWITCHYARD_SHADOW: HeaderName = HeaderName::from_static("x-switchyard-shadow");
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// The thread that runs every mirror, its client connections and the comparisons, so
/// that shadow work never queues behind or ahead of a primary request on the data
/// plane's workers. Shut down (without waiting) when dropped.
#[derive(Debug)]
pub struct ShadowRuntime(Option<tokio::runtime::Runtime>);

impl ShadowRuntime {
    /// Starts the thread; `on_start` runs on it first (the binary lowers its CPU
    /// priority there, so that on a busy core mirrors yield to primary requests).
    pub fn new(on_start: Option<fn()>) -> std::io::Result<Self> {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder
            .worker_threads(1)
            .thread_name("switchyard-shadow")
            .enable_all();
        if let Some(f) = on_start {
            builder.on_thread_start(f);
        }
        let rt = builder.build()?;
        Ok(ShadowRuntime(Some(rt)))
    }

    /// Where to spawn shadow work.
    pub fn handle(&self) -> tokio::runtime::Handle {
        match &self.0 {
            Some(rt) => rt.handle().clone(),
            None => unreachable!("the runtime is only taken out on drop"),
        }
    }
}

impl Drop for ShadowRuntime {
    fn drop(&mut self) {
        // Dropping a runtime blocks; this may run inside async code (the router is
        // dropped at the end of `main`), where blocking is not allowed.
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Settings a shadow inherits from its model and the top level.
#[derive(Debug, Clone)]
pub struct ShadowDefaults {
    /// Where workers, mirrors and comparisons run.
    pub runtime: tokio::runtime::Handle,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// How long a worker's connection may sit idle before the worker closes it
    /// (`upstream_idle_timeout`).
    pub idle_timeout: Duration,
    /// Request timeout when the shadow sets none.
    pub request_timeout: Duration,
    /// The model's body limit: larger requests are not mirrored, and larger answers
    /// (from either side) are not compared.
    pub body_limit: u64,
    /// Seed for random sampling.
    pub seed: u64,
    /// Where `capture` sends sampled predictions for the dashboard.
    pub feed: Option<crate::capture::PredictionFeed>,
}

/// A model's shadows.
#[derive(Debug)]
pub struct ShadowSet {
    lanes: Arc<[Lane]>,
    compare_limit: usize,
    runtime: tokio::runtime::Handle,
    capture: Option<Arc<crate::capture::Capture>>,
}

/// One shadow: shared between route tables while a reload leaves its settings as
/// they were (same queue, workers and connections).
#[derive(Debug, Clone)]
struct Lane {
    state: Arc<ShadowState>,
    sampler: Arc<Sampler>,
    queue: mpsc::Sender<Job>,
}

/// What a shadow's workers share; holds no queue sender, so dropping the set ends the
/// workers.
#[derive(Debug)]
struct ShadowState {
    spec: ShadowSpec,
    authority: Authority,
    host_header: HeaderValue,
    connect_timeout: Duration,
    idle_timeout: Duration,
    timeout: Duration,
    compare_limit: usize,
    in_flight: AtomicUsize,
    /// Kept across a reload that changes the shadow's settings but not its name or
    /// where disagreements go.
    stats: Arc<Stats>,
}

/// The request as the primary received it, shared by every mirror of it.
#[derive(Debug)]
pub struct RequestHead {
    /// Method.
    pub method: Method,
    /// The client's path.
    pub path: String,
    /// Where the model name sits in `path`.
    pub model: Range<usize>,
    /// The query, if any.
    pub query: Option<String>,
    /// End-to-end headers (hop-by-hop ones already removed).
    pub headers: HeaderMap,
    /// The primary's `x-request-id`.
    pub request_id: HeaderValue,
    /// When the primary request arrived (its latency is measured from here).
    pub started: Instant,
    /// The gRPC call, when the request is one (its path names no model; its message
    /// does).
    pub grpc: Option<GrpcCall>,
}

/// A gRPC call as a shadow mirrors it.
#[derive(Debug, Clone)]
pub struct GrpcCall {
    /// The model the client named.
    pub model: String,
    /// TF Serving's calls name the model inside a `ModelSpec`.
    pub in_spec: bool,
    /// The request message, unframed and uncompressed.
    pub message: Bytes,
}

#[derive(Debug)]
struct MirrorRequest {
    head: RequestHead,
    body: Vec<Bytes>,
}

#[derive(Debug)]
struct Job {
    request: Arc<MirrorRequest>,
    exchange: Arc<Exchange>,
}

impl ShadowSet {
    /// Builds the shadows of `model` and starts their workers. Must run inside a
    /// Tokio runtime.
    ///
    /// On a reload, `previous` is the model's live set: a shadow whose name and settings
    /// are unchanged is kept as it is (queue, workers, counters); one whose settings
    /// changed gets new workers and keeps its counters.
    pub fn new(
        model: &str,
        specs: &[ShadowSpec],
        defaults: &ShadowDefaults,
        families: &ShadowMetricFamilies,
        capture: Option<&switchyard_config::Capture>,
        previous: Option<&ShadowSet>,
    ) -> Result<Self, ShadowError> {
        let compare_limit = usize::try_from(defaults.body_limit).unwrap_or(usize::MAX);
        let mut lanes = Vec::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            let old =
                previous.and_then(|p| p.lanes.iter().find(|l| l.state.spec.name == spec.name));
            if let Some(old) = old {
                let s = &old.state;
                if s.spec == *spec
                    && s.connect_timeout == defaults.connect_timeout
                    && s.idle_timeout == defaults.idle_timeout
                    && s.timeout == spec.request_timeout.unwrap_or(defaults.request_timeout)
                    && s.compare_limit == compare_limit
                {
                    lanes.push(old.clone());
                    continue;
                }
            }
            let bad = |message: String| ShadowError::Upstream {
                shadow: spec.name.clone(),
                message,
            };
            let authority: Authority =
                spec.upstream.authority.parse().map_err(|e| {
                    bad(format!("bad authority `{}`: {e}", spec.upstream.authority))
                })?;
            let host_header = HeaderValue::from_str(&spec.upstream.authority)
                .map_err(|e| bad(format!("bad authority `{}`: {e}", spec.upstream.authority)))?;
            let same_log = old.filter(|o| {
                o.state.spec.disagreements_file == spec.disagreements_file
                    && o.state.spec.keep_disagreements == spec.keep_disagreements
            });
            let stats = match same_log {
                Some(o) => o.state.stats.clone(),
                None => {
                    let log = match &spec.disagreements_file {
                        Some(path) => Some(open_log(path).map_err(|source| ShadowError::Log {
                            shadow: spec.name.clone(),
                            path: path.clone(),
                            source,
                        })?),
                        None => None,
                    };
                    Arc::new(Stats::new(
                        families.for_shadow(model, &spec.name),
                        spec.keep_disagreements,
                        log,
                    ))
                }
            };
            let state = Arc::new(ShadowState {
                authority,
                host_header,
                connect_timeout: defaults.connect_timeout,
                idle_timeout: defaults.idle_timeout,
                timeout: spec.request_timeout.unwrap_or(defaults.request_timeout),
                compare_limit,
                in_flight: AtomicUsize::new(0),
                stats,
                spec: spec.clone(),
            });
            let (tx, rx) = mpsc::channel(spec.max_queue.max(1));
            let rx = Arc::new(tokio::sync::Mutex::new(rx));
            for _ in 0..spec.max_concurrency {
                defaults.runtime.spawn(worker(state.clone(), rx.clone()));
            }
            let seed = defaults.seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            lanes.push(Lane {
                sampler: Arc::new(Sampler::new(spec.sampling, spec.fraction, seed)),
                state,
                queue: tx,
            });
        }
        let capture = match capture {
            None => None,
            Some(spec) => Some(Arc::new(
                crate::capture::Capture::new(
                    model,
                    spec,
                    defaults.seed.rotate_left(29),
                    families.for_capture(model),
                    defaults.feed.clone(),
                    previous.and_then(|p| p.capture.as_deref()),
                )
                .map_err(|source| ShadowError::Log {
                    shadow: "capture".into(),
                    path: spec.file.clone(),
                    source,
                })?,
            )),
        };
        Ok(ShadowSet {
            lanes: lanes.into(),
            compare_limit,
            runtime: defaults.runtime.clone(),
            capture,
        })
    }

    /// Whether `capture` looks at the request with this id.
    pub fn capture_takes(&self, request_id: &[u8]) -> bool {
        self.capture.as_ref().is_some_and(|c| c.takes(request_id))
    }

    /// Whether this model has a `capture:`.
    pub fn captures(&self) -> bool {
        self.capture.is_some()
    }

    /// The shadows' names, in config order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.lanes.iter().map(|l| l.state.spec.name.as_str())
    }

    /// The shadows that mirror the request with this id, as a bit mask (0: none):
    /// those with `protocol: grpc` take gRPC calls, the others HTTP requests.
    pub fn select(&self, request_id: &[u8], grpc: bool) -> u64 {
        let mut mask = 0;
        for (i, lane) in self.lanes.iter().enumerate() {
            let speaks = (lane.state.spec.protocol == UpstreamProtocol::Grpc) == grpc;
            if speaks && lane.sampler.take(request_id) {
                mask |= 1 << i;
            }
        }
        mask
    }

    /// Counts a request refused for its size against the shadows that would have had it.
    pub fn refused_too_large(&self, request_id: &[u8]) {
        let mask = self.select(request_id, false);
        for lane in self.chosen(mask) {
            lane.state.stats.dropped(DropReason::TooLarge);
        }
    }

    fn chosen(&self, mask: u64) -> impl Iterator<Item = &Lane> {
        self.lanes
            .iter()
            .enumerate()
            .filter(move |(i, _)| mask & (1 << i) != 0)
            .map(|(_, l)| l)
    }

    /// Starts mirroring one request to the shadows in `mask` (and, with `capture`,
    /// keeping it for `capture:`): the request tap goes on the client's body, the
    /// exchange later gives the response tap.
    pub fn begin(
        &self,
        mask: u64,
        capture: bool,
        head: RequestHead,
    ) -> (RequestTap, PrimaryAnswer) {
        let exchange = Arc::new(Exchange {
            capture: self.capture.clone().filter(|_| capture),
            request: std::sync::OnceLock::new(),
            variant: std::sync::OnceLock::new(),
            grpc: head.grpc.as_ref().map(|g| g.in_spec),
            request_id: String::from_utf8_lossy(head.request_id.as_bytes()).into_owned(),
            started: head.started,
            compare_limit: self.compare_limit,
            runtime: self.runtime.clone(),
            pair: Mutex::new(Pair {
                primary: Slot::Pending,
                waiting: Vec::new(),
            }),
        });
        (
            RequestTap {
                lanes: self.lanes.clone(),
                mask,
                head: Some(head),
                frames: Vec::new(),
                exchange: exchange.clone(),
            },
            PrimaryAnswer { exchange },
        )
    }

    /// Per shadow: settings, counters, agreement, means and the latest disagreements.
    pub fn report(&self) -> Value {
        let shadows: Vec<Value> = self
            .lanes
            .iter()
            .map(|lane| {
                let s = &lane.state;
                let mut out = serde_json::Map::new();
                out.insert("name".into(), s.spec.name.clone().into());
                out.insert("upstream".into(), s.spec.upstream.to_string().into());
                out.insert("upstream_model".into(), json!(s.spec.upstream_model));
                out.insert("fraction".into(), s.spec.fraction.into());
                out.insert(
                    "sampling".into(),
                    match s.spec.sampling {
                        ShadowSampling::Random => "random",
                        ShadowSampling::Hash => "hash",
                    }
                    .into(),
                );
                out.insert(
                    "in_flight".into(),
                    s.in_flight.load(Ordering::Relaxed).into(),
                );
                out.insert(
                    "queued".into(),
                    (lane.queue.max_capacity() - lane.queue.capacity()).into(),
                );
                out.append(&mut s.stats.report());
                Value::Object(out)
            })
            .collect();
        json!({ "shadows": shadows })
    }
}

/// One of a shadow's `max_concurrency` workers: takes the next job off the shared queue
/// and runs it on its own connection, kept open between jobs for up to
/// `upstream_idle_timeout` (then closed, as for the primary's upstreams: under the model
/// server's own keep-alive, and no idle sockets held by a quiet shadow). While every
/// worker is busy the queue fills, and further mirrors are dropped at the `try_send`: a
/// slow or dead shadow costs at most `max_concurrency` connections and `max_queue`
/// bodies.
async fn worker(state: Arc<ShadowState>, queue: Arc<tokio::sync::Mutex<mpsc::Receiver<Job>>>) {
    let mut conn = None;
    loop {
        // Holding the lock while waiting is the point: one idle worker waits on the
        // queue, the others wait their turn on the lock. Both waits are cancel-safe, so
        // the idle limit covers the two together.
        let next = async { queue.lock().await.recv().await };
        let job = if conn.is_some() {
            match tokio::time::timeout(state.idle_timeout, next).await {
                Ok(job) => job,
                Err(_) => {
                    conn = None;
                    continue;
                }
            }
        } else {
            next.await
        };
        let Some(job) = job else {
            return;
        };
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        state.run(job, &mut conn).await;
        state.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A worker's connection to its shadow.
enum Conn {
    Http1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

/// Sends `request` on `conn`; on failure, the request back if it was never written.
async fn try_send(
    conn: &mut Option<Conn>,
    request: Request<Full<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, Option<Request<Full<Bytes>>>> {
    let sent = match conn {
        Some(Conn::Http1(s)) => s.try_send_request(request).await,
        Some(Conn::H2(s)) => s.try_send_request(request).await,
        None => return Err(Some(request)),
    };
    sent.map_err(|mut e| e.take_message())
}

impl ShadowState {
    async fn connect(&self) -> Result<Conn, ShadowErrorKind> {
        let stream = tokio::time::timeout(
            self.connect_timeout,
            tokio::net::TcpStream::connect(self.spec.upstream.authority.as_str()),
        )
        .await
        .map_err(|_| ShadowErrorKind::Connect)?
        .map_err(|_| ShadowErrorKind::Connect)?;
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(stream);
        match self.spec.protocol {
            UpstreamProtocol::Http1 => {
                let (send, conn) = hyper::client::conn::http1::handshake(io)
                    .await
                    .map_err(|_| ShadowErrorKind::Connect)?;
                tokio::spawn(conn);
                Ok(Conn::Http1(send))
            }
            UpstreamProtocol::H2c | UpstreamProtocol::Grpc => {
                let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(|_| ShadowErrorKind::Connect)?;
                tokio::spawn(conn);
                Ok(Conn::H2(send))
            }
        }
    }

    async fn send(
        &self,
        conn: &mut Option<Conn>,
        request: Request<Full<Bytes>>,
    ) -> Result<(u16, Option<Vec<Bytes>>), ShadowErrorKind> {
        let reusable = match conn {
            Some(Conn::Http1(s)) => s.ready().await.is_ok(),
            Some(Conn::H2(s)) => s.ready().await.is_ok(),
            None => false,
        };
        if !reusable {
            *conn = Some(self.connect().await?);
        }
        let mut sent = try_send(conn, request).await;
        if reusable {
            if let Err(Some(request)) = sent {
                // The kept-alive connection closed before the request was written (the
                // shadow's keep-alive ran out as it was sent): nothing reached it, so
                // send it once more on a new connection.
                *conn = Some(self.connect().await?);
                sent = try_send(conn, request).await;
            }
        }
        let resp = sent.map_err(|_| {
            *conn = None;
            ShadowErrorKind::Reset
        })?;
        let mut status = resp.status().as_u16();
        let grpc = self.spec.protocol == UpstreamProtocol::Grpc;
        let head_status = switchyard_proto::grpc_status(resp.headers());
        // An answer over the limit is drained but not kept: it is not compared.
        match Limited::new(resp.into_body(), self.compare_limit)
            .collect()
            .await
        {
            Ok(c) => {
                if grpc && status == 200 {
                    // The status is in the trailers, or in the headers (trailers-only).
                    let code = head_status
                        .or_else(|| c.trailers().and_then(switchyard_proto::grpc_status));
                    status = code.map_or(502, switchyard_proto::http_status_for);
                }
                Ok((status, Some(vec![c.to_bytes()])))
            }
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                // The rest of it is still on the connection.
                *conn = None;
                Ok((status, None))
            }
            Err(_) => {
                *conn = None;
                Err(ShadowErrorKind::Reset)
            }
        }
    }

    async fn run(self: &Arc<Self>, job: Job, conn: &mut Option<Conn>) {
        let request = match self.request(&job.request) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(shadow = %self.spec.name, error = %e, "Cannot build the mirrored request.");
                self.stats.error(ShadowErrorKind::Reset);
                return;
            }
        };
        let sent = Instant::now();
        match tokio::time::timeout(self.timeout, self.send(conn, request)).await {
            Err(_) => {
                // The connection may still carry the late answer: start afresh.
                *conn = None;
                self.stats.error(ShadowErrorKind::Timeout);
            }
            Ok(Err(kind)) => self.stats.error(kind),
            Ok(Ok((status, body))) => {
                let latency = sent.elapsed();
                self.stats.metrics.duration.observe(latency.as_secs_f64());
                let answer = Answer {
                    status,
                    body,
                    latency,
                };
                job.exchange.shadow_answered(self, answer);
            }
        }
    }

    fn request(&self, m: &MirrorRequest) -> Result<Request<Full<Bytes>>, http::Error> {
        let head = &m.head;
        let (pq, body) = match &head.grpc {
            // The path names the method; the message names the model.
            Some(call) => {
                let upstream_model = self.spec.upstream_model.as_deref().unwrap_or(&call.model);
                (
                    self.spec.upstream.path_for(&head.path, 0..0, "", None),
                    switchyard_proto::framed_for_model(&call.message, call.in_spec, upstream_model),
                )
            }
            None => {
                let client_model = &head.path[head.model.clone()];
                let upstream_model = self.spec.upstream_model.as_deref().unwrap_or(client_model);
                let pq = self.spec.upstream.path_for(
                    &head.path,
                    head.model.clone(),
                    upstream_model,
                    head.query.as_deref(),
                );
                let body = match m.body.as_slice() {
                    [one] => one.clone(),
                    many => Bytes::from(many.concat()),
                };
                (pq, body)
            }
        };
        let mut req = Request::builder().method(head.method.clone());
        req = match self.spec.protocol {
            // HTTP/1.1 takes the origin form (path and query) on a connection of its own.
            UpstreamProtocol::Http1 => req.uri(pq),
            UpstreamProtocol::H2c | UpstreamProtocol::Grpc => req.uri(
                Uri::builder()
                    .scheme(Scheme::HTTP)
                    .authority(self.authority.clone())
                    .path_and_query(pq)
                    .build()?,
            ),
        };
        let mut req = req.body(Full::new(body))?;
        let headers = req.headers_mut();
        headers.clone_from(&head.headers);
        match self.spec.protocol {
            UpstreamProtocol::Http1 => {
                headers.insert(http::header::HOST, self.host_header.clone());
            }
            UpstreamProtocol::H2c | UpstreamProtocol::Grpc => {
                *req.version_mut() = Version::HTTP_2;
                req.headers_mut().remove(http::header::HOST);
            }
        }
        let headers = req.headers_mut();
        if head.grpc.is_some() {
            // Re-framed, uncompressed, perhaps longer.
            headers.remove(http::header::CONTENT_LENGTH);
            headers.remove("grpc-encoding");
            // The client's deadline (if it gave one) was the primary's, from when the
            // call came; the shadow's is its own `request_timeout`, from now, and it
            // says so, so that its upstream gives up when it stops waiting.
            headers.insert(
                GRPC_TIMEOUT.clone(),
                switchyard_proto::format_timeout(self.timeout),
            );
        }
        headers.insert(X_SWITCHYARD_SHADOW.clone(), HeaderValue::from_static("1"));
        headers.insert(X_REQUEST_ID.clone(), head.request_id.clone());
        Ok(req)
    }
}

/// Frames joined; borrowed when there is one.
fn joined(frames: &[Bytes]) -> Cow<'_, [u8]> {
    match frames {
        [] => Cow::Borrowed(&[]),
        [one] => Cow::Borrowed(one),
        many => Cow::Owned(many.concat()),
    }
}

/// One answer, primary or shadow. `body` is `None` when it was over the size limit.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: Option<Vec<Bytes>>,
    latency: Duration,
}

#[derive(Debug)]
enum Slot {
    Pending,
    Done(Arc<Answer>),
    /// The primary's answer never completed (the client went away).
    Gone,
}

#[derive(Debug)]
struct Pair {
    primary: Slot,
    waiting: Vec<(Arc<ShadowState>, Answer)>,
}

/// Pairs the primary's answer with each shadow's, by request.
#[derive(Debug)]
struct Exchange {
    /// Set when `capture` looks at this request.
    capture: Option<Arc<crate::capture::Capture>>,
    /// The request, kept for `capture` once complete.
    request: std::sync::OnceLock<Arc<MirrorRequest>>,
    /// The variant that answered.
    variant: std::sync::OnceLock<String>,
    /// For a gRPC call: whether it is TF Serving's (its answers are read as such).
    grpc: Option<bool>,
    request_id: String,
    started: Instant,
    compare_limit: usize,
    runtime: tokio::runtime::Handle,
    pair: Mutex<Pair>,
}

impl Exchange {
    fn shadow_answered(&self, state: &Arc<ShadowState>, answer: Answer) {
        let primary = {
            let mut pair = self.pair.lock().unwrap_or_else(|e| e.into_inner());
            match &pair.primary {
                Slot::Pending => {
                    pair.waiting.push((state.clone(), answer));
                    return;
                }
                Slot::Gone => return,
                Slot::Done(p) => p.clone(),
            }
        };
        self.record(state, &primary, answer);
    }

    fn primary_answered(self: &Arc<Self>, answer: Option<Answer>) {
        let waiting = {
            let mut pair = self.pair.lock().unwrap_or_else(|e| e.into_inner());
            match answer {
                Some(a) => {
                    let a = Arc::new(a);
                    if let (Some(capture), Some(request)) = (&self.capture, self.request.get()) {
                        let (capture, request, answer) =
                            (capture.clone(), request.clone(), a.clone());
                        let this = self.clone();
                        // On the shadow thread, off the client's connection.
                        self.runtime.spawn(async move {
                            if let Some(body) = &answer.body {
                                // A gRPC call is kept as the V2 JSON it stands for.
                                let (asked, answered) = match &request.head.grpc {
                                    Some(call) => (
                                        Cow::Owned(crate::tensors::request_json(
                                            &call.message,
                                            call.in_spec,
                                        )),
                                        Cow::Owned(crate::tensors::answer_json(
                                            &joined(body),
                                            call.in_spec,
                                        )),
                                    ),
                                    None => (joined(&request.body), joined(body)),
                                };
                                capture.look(
                                    &this.request_id,
                                    this.variant.get().map_or("", String::as_str),
                                    &asked,
                                    answer.status,
                                    &answered,
                                    answer.latency,
                                );
                            }
                        });
                    }
                    pair.primary = Slot::Done(a.clone());
                    std::mem::take(&mut pair.waiting)
                        .into_iter()
                        .map(|(s, w)| (s, w, a.clone()))
                        .collect::<Vec<_>>()
                }
                None => {
                    pair.primary = Slot::Gone;
                    pair.waiting.clear();
                    return;
                }
            }
        };
        if waiting.is_empty() {
            return;
        }
        let this = self.clone();
        let compare_all = move || {
            for (state, answer, primary) in waiting {
                this.record(&state, &primary, answer);
            }
        };
        // On the shadow thread, off the client's connection.
        self.runtime.spawn(async move { compare_all() });
    }

    fn record(&self, state: &ShadowState, primary: &Answer, shadow: Answer) {
        let comparison = match (&primary.body, &shadow.body) {
            (Some(p), Some(s)) => {
                let (p, s) = (joined(p), joined(s));
                if primary.status == shadow.status && p == s {
                    // Identical bytes: nothing to parse.
                    Comparison {
                        verdict: Verdict::Agree,
                        max_abs_diff: (200..300).contains(&primary.status).then_some(0.0),
                        rows: 0,
                        rows_agreeing: 0,
                    }
                } else if let Some(in_spec) = self.grpc {
                    // Each answer read as the V2 JSON it stands for.
                    let (p, s) = (
                        crate::tensors::answer_json(&p, in_spec),
                        crate::tensors::answer_json(&s, in_spec),
                    );
                    compare((primary.status, &p), (shadow.status, &s))
                } else {
                    compare((primary.status, &p), (shadow.status, &s))
                }
            }
            // An answer too large to keep: only the statuses can be compared.
            _ if primary.status != shadow.status => Comparison {
                verdict: Verdict::Status,
                max_abs_diff: None,
                rows: 0,
                rows_agreeing: 0,
            },
            _ => return,
        };
        let side = |a: &Answer| Side {
            status: a.status,
            latency: a.latency,
            body: a
                .body
                .as_deref()
                .map(|b| Bytes::from(joined(b).into_owned()))
                .unwrap_or_default(),
        };
        let (p, s) = if comparison.verdict == Verdict::Agree {
            // Agreements are only counted: skip copying the bodies.
            let light = |a: &Answer| Side {
                status: a.status,
                latency: a.latency,
                body: Bytes::new(),
            };
            (light(primary), light(&shadow))
        } else {
            (side(primary), side(&shadow))
        };
        state.stats.compared(&self.request_id, comparison, p, s);
    }
}

/// Sees the client's request body on its way to the primary and mirrors it when complete.
#[derive(Debug)]
pub struct RequestTap {
    lanes: Arc<[Lane]>,
    mask: u64,
    head: Option<RequestHead>,
    frames: Vec<Bytes>,
    exchange: Arc<Exchange>,
}

impl RequestTap {
    /// A data frame of the body (shared, not copied).
    pub fn data(&mut self, frame: &Bytes) {
        if self.head.is_some() && !frame.is_empty() {
            self.frames.push(frame.clone());
        }
    }

    /// The body is complete: offer a job to each chosen shadow's queue.
    pub fn finish(&mut self) {
        let Some(head) = self.head.take() else {
            return;
        };
        let request = Arc::new(MirrorRequest {
            head,
            body: std::mem::take(&mut self.frames),
        });
        if self.exchange.capture.is_some() {
            let _ = self.exchange.request.set(request.clone());
        }
        for (i, lane) in self.lanes.iter().enumerate() {
            if self.mask & (1 << i) == 0 {
                continue;
            }
            let job = Job {
                request: request.clone(),
                exchange: self.exchange.clone(),
            };
            match lane.queue.try_send(job) {
                Ok(()) => lane.state.stats.metrics.mirrored.inc(),
                Err(_) => lane.state.stats.dropped(DropReason::QueueFull),
            }
        }
    }

    /// The body went over the model's limit: nothing is mirrored.
    pub fn too_large(&mut self) {
        self.abandon(DropReason::TooLarge);
    }

    fn abandon(&mut self, reason: DropReason) {
        if self.head.take().is_none() {
            return;
        }
        self.frames = Vec::new();
        for (i, lane) in self.lanes.iter().enumerate() {
            if self.mask & (1 << i) != 0 {
                lane.state.stats.dropped(reason);
            }
        }
    }
}

impl Drop for RequestTap {
    fn drop(&mut self) {
        // Never finished: the body broke off, or was never read (the request failed
        // before it was forwarded).
        self.abandon(DropReason::BodyError);
    }
}

/// Gives the tap for the primary's answer once its status is known.
#[derive(Debug)]
pub struct PrimaryAnswer {
    exchange: Arc<Exchange>,
}

impl PrimaryAnswer {
    /// The tap for `variant`'s answer with `status`. Up to the model's body limit of
    /// it is kept for comparing; a longer answer still streams to the client, uncompared.
    pub fn tap(self, status: u16, variant: &str) -> ResponseTap {
        let limit = self.exchange.compare_limit;
        let _ = self.exchange.variant.set(variant.to_string());
        ResponseTap {
            exchange: self.exchange,
            status,
            frames: Vec::new(),
            len: 0,
            limit,
            overflow: false,
            done: false,
        }
    }
}

/// Sees the primary's answer on its way to the client.
#[derive(Debug)]
pub struct ResponseTap {
    exchange: Arc<Exchange>,
    status: u16,
    frames: Vec<Bytes>,
    len: usize,
    limit: usize,
    overflow: bool,
    done: bool,
}

impl ResponseTap {
    /// A data frame of the answer (shared, not copied).
    pub fn data(&mut self, frame: &Bytes) {
        if self.overflow || frame.is_empty() {
            return;
        }
        self.len += frame.len();
        if self.len > self.limit {
            self.overflow = true;
            self.frames = Vec::new();
        } else {
            self.frames.push(frame.clone());
        }
    }

    /// The answer is complete.
    pub fn finish(&mut self) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let answer = Answer {
            status: self.status,
            body: (!self.overflow).then(|| std::mem::take(&mut self.frames)),
            latency: self.exchange.started.elapsed(),
        };
        self.exchange.primary_answered(Some(answer));
    }
}

impl Drop for ResponseTap {
    fn drop(&mut self) {
        if !self.done {
            self.exchange.primary_answered(None);
        }
    }
}
