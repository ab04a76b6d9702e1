//! The request path, phase by phase (pingora's habit of naming them):
//!
//! 1. **route**: parse the path ([`crate::path`]); answer health and server metadata here.
//! 2. **admit**: known model? body within its limit (by `content-length` now, by counting
//!    while streaming otherwise)?
//! 3. **choose**: the model's [`Selector`](crate::selector::Selector) picks a variant,
//!    sticky by header when configured, else a bandit's per-request pick; for models
//!    with a bandit the choice is recorded for feedback.
//! 4. **mirror**: for each shadow whose sampler takes the request, a tap on the body
//!    hands the (shared) frames to the shadow's bounded queue once complete; another on
//!    the answer passes it to the comparison. Neither ever makes the client wait.
//! 5. **forward**: rewrite the model name, strip hop-by-hop headers, stream the body.
//!    (Later: breaker gate, budgeted retry, fallback to the local runtime.)
//! 6. **respond**: the upstream's answer untouched but for `x-switchyard-variant`,
//!    `x-request-id` and `server-timing`.
//! 7. **record**: status class and latency per (model, variant); upstream errors by kind.
//!
//! Errors become responses in exactly one place, [`error_response`].

use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use crate::inbound::RequestBody;
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use switchyard_config::{Config, UpstreamProtocol};

use crate::body::{json_response, LimitedBody, ProxyBody};
use crate::error::{error_response, RouterError};
use crate::feedback::{self, DecisionLog, FeedbackSink};
use crate::h1::Present;
use crate::ids;
use crate::metrics::Metrics;
use crate::path::{self, Endpoint};
use crate::table::{BuildError, RouteTable, VariantRoute};

/// `x-request-id`: kept from the client or generated.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Fleet mode: the answer's decision, signed (`<request id>.<decision><signature>`):
/// what feedback names to reach any replica.
pub static X_DECISION: HeaderName = HeaderName::from_static("x-switchyard-decision");

/// A response extension: the token of the decision recorded for it (fleet mode).
#[derive(Debug, Clone)]
pub(crate) struct Sealed(pub HeaderValue);
/// `x-switchyard-variant`: which variant answered.
pub static X_SWITCHYARD_VARIANT: HeaderName = HeaderName::from_static("x-switchyard-variant");
pub(crate) static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) static SERVER_TIMING: HeaderName = HeaderName::from_static("server-timing");
/// Room for a field the *respond* phase adds to some answers (`x-switchyard-retries`,
/// `-fallback`, `-hedge`, `-decision`): upstream answers are parsed into maps with this
/// much more. The fields on every answer are not in the map ([`crate::stamp`]).
const ANSWER_FIELDS: usize = 1;

/// Hop-by-hop headers (RFC 9110 §7.6.1) that must not be forwarded.
static HOP_BY_HOP: [HeaderName; 6] = [
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TRAILER,
    header::PROXY_AUTHORIZATION,
];

/// Least time between two warnings that the decision log evicts decisions.
const EVICTION_WARNING_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// What the binary decides for the router's threads.
#[derive(Debug, Clone, Default)]
pub struct RouterOptions {
    /// Runs first on the shadow thread (the binary lowers its CPU priority there).
    pub shadow_thread_start: Option<fn()>,
    /// The token `POST /v1/feedback` needs (`feedback_token_file`), if any.
    pub feedback_token: Option<crate::auth::Token>,
    /// Fleet mode: decisions and feedback shared with the other replicas.
    pub fleet: Option<Arc<dyn crate::feedback::FleetDecisions>>,
}

/// The data plane's shared state: the current route table and the metrics.
#[derive(Debug)]
pub struct Router {
    pub(crate) table: ArcSwap<RouteTable>,
    pub(crate) metrics: Metrics,
    draining: AtomicBool,
    pub(crate) decisions: DecisionLog,
    /// When the last eviction warning was logged (the decision log's clock, plus one).
    eviction_warned_ms: std::sync::atomic::AtomicU64,
    sink: Option<Arc<dyn FeedbackSink>>,
    /// Fleet mode (`fleet:`): request ids carry their decision, feedback is claimed
    /// fleet-wide.
    pub(crate) fleet: Option<Arc<dyn crate::feedback::FleetDecisions>>,
    /// `max_body_bytes` (feedback and requests to no model); a reload may change it.
    feedback_limit: std::sync::atomic::AtomicU64,
    feedback_token: Option<crate::auth::Token>,
    /// Longest pause between two pieces of a request body (`client_body_timeout`).
    pub(crate) body_stall_timeout: std::time::Duration,
    /// The selectors' seed, kept for the tables of later reloads.
    seed: u64,
    /// The keys decisions carry for their model.
    keys: crate::table::ModelKeys,
    /// Serialises reloads (two at once would each build from the same live table).
    reloading: std::sync::Mutex<()>,
    shadow_thread_start: Option<fn()>,
    /// Sampled predictions (`capture:`), for the dashboard.
    predictions: switchyard_shadow::capture::PredictionFeed,
    /// Runs mirrors and comparisons, started with the first config that has shadows;
    /// declared last so it stops after the table (and the shadow queues in it) is gone.
    shadow_runtime: std::sync::OnceLock<switchyard_shadow::ShadowRuntime>,
}

impl Router {
    /// Builds the router for `config`. `seed` defaults to `config.seed`, else random.
    /// Must run inside a Tokio runtime.
    pub fn new(config: &Config, metrics: Metrics) -> Result<Arc<Self>, BuildError> {
        Self::with_feedback(config, metrics, None)
    }

    /// As [`Router::new`], with a sink for `POST /v1/feedback` (the binary's bandits).
    pub fn with_feedback(
        config: &Config,
        metrics: Metrics,
        sink: Option<Arc<dyn FeedbackSink>>,
    ) -> Result<Arc<Self>, BuildError> {
        Self::with_options(config, metrics, sink, RouterOptions::default())
    }

    /// As [`Router::with_feedback`], with process-level options from the binary.
    pub fn with_options(
        config: &Config,
        metrics: Metrics,
        sink: Option<Arc<dyn FeedbackSink>>,
        options: RouterOptions,
    ) -> Result<Arc<Self>, BuildError> {
        let seed = config.seed.unwrap_or_else(random_seed);
        let shadow_runtime = std::sync::OnceLock::new();
        let keys = crate::table::ModelKeys::default();
        let (predictions, _) = tokio::sync::broadcast::channel(64);
        let table = RouteTable::build(
            config,
            &metrics,
            seed,
            shadow_runtime_for(config, &shadow_runtime, options.shadow_thread_start)?,
            &keys,
            None,
            &predictions,
        )?;
        let longest_ttl = config
            .models
            .values()
            .filter_map(|m| m.bandit.as_ref().map(|b| b.feedback_ttl))
            .max();
        if let Some(ttl) = longest_ttl.filter(|t| !t.is_zero()) {
            let capacity = config.bandit.decision_log_capacity;
            tracing::info!(
                capacity,
                feedback_ttl = ?ttl,
                sustained_per_second = (capacity as f64 / ttl.as_secs_f64()).floor(),
                "Decision log sized: above this many predictions per second, decisions are evicted before their feedback_ttl."
            );
        }
        Ok(Arc::new(Router {
            table: ArcSwap::from_pointee(table),
            metrics,
            draining: AtomicBool::new(false),
            decisions: DecisionLog::new(config.bandit.decision_log_capacity),
            eviction_warned_ms: std::sync::atomic::AtomicU64::new(0),
            sink,
            fleet: options.fleet,
            feedback_limit: config.max_body_bytes.into(),
            feedback_token: options.feedback_token,
            body_stall_timeout: config.client_body_timeout,
            seed,
            keys,
            reloading: std::sync::Mutex::new(()),
            shadow_thread_start: options.shadow_thread_start,
            predictions,
            shadow_runtime,
        }))
    }

    /// Reloads `config` (already validated; its restart-only keys unchanged): builds the
    /// next route table from the live one, lets `prepare` act on it before it goes live
    /// (the bandits install their weights and pickers there), then swaps it in. Requests
    /// in flight finish on the table they started with. On an error nothing changes.
    /// Returns the models and variants that were removed (their metric series are gone).
    pub fn reload(
        &self,
        config: &Config,
        prepare: impl FnOnce(&RouteTable) -> Result<(), String>,
    ) -> Result<Vec<String>, String> {
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        let live = self.table.load_full();
        let runtime = shadow_runtime_for(config, &self.shadow_runtime, self.shadow_thread_start)
            .map_err(|e| e.to_string())?;
        let next = RouteTable::build(
            config,
            &self.metrics,
            self.seed,
            runtime,
            &self.keys,
            Some(&live),
            &self.predictions,
        )
        .map_err(|e| e.to_string())?;
        prepare(&next)?;
        self.feedback_limit
            .store(config.max_body_bytes, Ordering::Relaxed);
        self.table.store(Arc::new(next));
        let next = self.table.load();
        let mut removed = Vec::new();
        for old in live.models() {
            let kept = next.model(&old.name);
            for v in old.variants.iter() {
                if kept.is_none_or(|m| m.variants.iter().all(|n| n.name != v.name)) {
                    self.metrics.forget_variant(&old.name, &v.name);
                    removed.push(format!("{}/{}", old.name, v.name));
                }
            }
            if let Some(set) = &old.shadows {
                let now = kept.and_then(|m| m.shadows.as_ref());
                for shadow in set.names() {
                    if now.is_none_or(|n| n.names().all(|x| x != shadow)) {
                        self.metrics.shadow.forget(&old.name, shadow);
                    }
                }
            }
            let captured = |m: &crate::table::ModelRoute| {
                m.shadows
                    .as_ref()
                    .is_some_and(switchyard_shadow::ShadowSet::captures)
            };
            if captured(old) && !kept.is_some_and(|m| captured(m)) {
                self.metrics.shadow.forget_capture(&old.name);
            }
            let had_local = |m: &crate::table::ModelRoute| {
                m.variants
                    .iter()
                    .any(|v| matches!(v.backend, crate::table::Backend::Local(_)))
            };
            if had_local(old) && !kept.is_some_and(|m| had_local(m)) {
                self.metrics.local.forget(&old.name);
            }
            if kept.is_none() {
                self.metrics.forget_model(&old.name);
                removed.push(old.name.clone());
            }
        }
        Ok(removed)
    }

    /// Sampled predictions of models with `capture:`, one JSON object each.
    pub fn predictions(&self) -> tokio::sync::broadcast::Receiver<Bytes> {
        self.predictions.subscribe()
    }

    /// The keys decisions carry, each with its model and variant list.
    pub fn model_keys(&self) -> Vec<(String, Box<[String]>)> {
        self.keys.all()
    }

    /// `max_body_bytes` now.
    pub(crate) fn feedback_limit(&self) -> u64 {
        self.feedback_limit.load(Ordering::Relaxed)
    }

    /// The decisions waiting for feedback (the bandit tasks expire them).
    pub fn decisions(&self) -> &DecisionLog {
        &self.decisions
    }

    /// Fleet mode's decisions and claims, when `fleet:` is set.
    pub fn fleet(&self) -> Option<&Arc<dyn crate::feedback::FleetDecisions>> {
        self.fleet.as_ref()
    }

    /// The current route table.
    pub fn table(&self) -> Arc<RouteTable> {
        self.table.load_full()
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Marks the router as draining: readiness turns false so load balancers stop
    /// sending, while requests still arriving on open connections are served.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// True once draining has started.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Counts decisions evicted before their TTL and warns, at most every ten seconds:
    /// their feedback will be refused, so the bandit learns from less than it is sent.
    #[cold]
    pub(crate) fn evicted(&self, now: Instant, n: usize) {
        self.metrics.decisions_evicted.inc_by(n as u64);
        let now_ms = self.decisions.millis(now) + 1;
        let last = self.eviction_warned_ms.load(Ordering::Relaxed);
        let due =
            last == 0 || now_ms.saturating_sub(last) >= EVICTION_WARNING_EVERY.as_millis() as u64;
        if due
            && self
                .eviction_warned_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                evicted = n,
                capacity = self.decisions.capacity(),
                "The decision log is full: decisions are evicted before their feedback_ttl and \
                 their feedback will be refused (410). Raise bandit.decision_log_capacity to \
                 at least predictions per second × feedback_ttl; \
                 switchyard_decisions_evicted_total counts them."
            );
        }
    }

    /// Per model and variant: the breaker's state, in-flight requests, consecutive
    /// failures, ejections and the ejection left (`/admin/state`'s `breakers`).
    pub fn health_json(&self) -> serde_json::Value {
        let table = self.table.load();
        let mut models = serde_json::Map::new();
        for model in table.models() {
            let variants: serde_json::Map<String, serde_json::Value> = model
                .variants
                .iter()
                .map(|v| (v.name.clone(), v.health.snapshot()))
                .collect();
            models.insert(model.name.clone(), serde_json::Value::Object(variants));
        }
        serde_json::Value::Object(models)
    }

    /// Why the sidecar should not get traffic now, or `None` when it is ready: it is
    /// draining, or a local model cannot serve (no live batch thread, threads stuck in a
    /// batch, a queue that does not move). Clears by itself when the model recovers.
    pub fn not_ready(&self) -> Option<String> {
        if self.is_draining() {
            return Some("draining".into());
        }
        let table = self.table.load();
        let mut why = Vec::new();
        for model in table.models() {
            for v in model.variants.iter() {
                if let crate::table::Backend::Local(local) = &v.backend {
                    if let Err(e) = local.health() {
                        why.push(format!("model `{}` variant `{}`: {e}", model.name, v.name));
                    }
                }
            }
        }
        (!why.is_empty()).then(|| why.join("; "))
    }

    /// The tower service for one client connection from `peer`.
    pub fn service(self: &Arc<Self>, peer: Option<IpAddr>) -> ProxyService {
        // Rendered once per connection, not once per request.
        let peer = peer.and_then(|ip| HeaderValue::try_from(ip.to_string()).ok());
        ProxyService {
            router: self.clone(),
            peer,
        }
    }

    /// Handles one request end to end; never fails (errors become responses). Its
    /// future is the connection's whole request future, boxed once per request, so kept
    /// small: glibc hands out blocks of up to 1,032 bytes from a per-thread cache, larger
    /// ones from its heap at several hundred instructions more (this future and the
    /// upstream try's, 1,408 and 1,104 bytes, were brought to 992 each: −487 instructions
    /// per request, `bench/instructions.sh`). Futures are moved whole, and a value moved
    /// into an inner future keeps its room in the outer one too. So: routing is done
    /// here, synchronously, before the future is made, and the future holds what it
    /// found once, lending it to [`Router::forward`]'s future rather than moving it
    /// there; an `async move` block rather than an `async fn`, which would keep a second
    /// copy of every argument.
    #[allow(clippy::manual_async_fn)] // on purpose: see above
    pub fn handle(
        self: Arc<Self>,
        req: Request<RequestBody>,
        peer: Option<HeaderValue>,
    ) -> impl Future<Output = Result<Response<ProxyBody>, Infallible>> + Send {
        let started = crate::clock::now_std();
        // Each lookup only when the head may have the field (most have neither).
        let client_id = if req.body().fields().has(Present::X_REQUEST_ID) {
            req.headers().get(&X_REQUEST_ID)
        } else {
            None
        };
        let (request_id, ours) = match client_id {
            Some(v) if ids::acceptable(v) => (v.clone(), false),
            _ => (ids::new_request_id(), true),
        };
        let mut routed =
            if req.body().fields().has(Present::GRPC) && crate::grpc::is_grpc(req.headers()) {
                Routed::Grpc(req)
            } else {
                self.route(req, &request_id)
                    .unwrap_or_else(|err| Routed::Answer(self.reject(&err)))
            };
        async move {
            let _in_flight = InFlight::new(&self.metrics);
            let resp = match &mut routed {
                Routed::Model(model, model_req, parts, body) => {
                    let body = std::mem::take(body);
                    self.forward(
                        model,
                        model_req,
                        parts,
                        crate::forward::Payload::Http(body),
                        &request_id,
                        peer.as_ref(),
                        started,
                    )
                    .await
                }
                Routed::Answer(resp) => std::mem::take(resp),
                // Boxed, as is gRPC's below: their futures (the fleet's claims, the
                // offloaded parse; gRPC's larger one) would otherwise enlarge every
                // prediction's future.
                Routed::Feedback(req) => Box::pin(self.feedback(std::mem::take(req)))
                    .await
                    .unwrap_or_else(|err| self.reject(&err)),
                Routed::Grpc(req) => {
                    Box::pin(self.grpc(std::mem::take(req), &request_id, peer.as_ref(), started))
                        .await
                }
            };
            Ok(self.finish(resp, request_id, ours))
        }
    }

    /// A request refused before a variant was chosen: counted, and its answer.
    fn reject(&self, err: &RouterError) -> Response<ProxyBody> {
        self.metrics.rejected(err.reject_reason());
        error_response(err)
    }

    /// Phase *respond*'s last step for every answer: the request id (and in fleet mode
    /// the decision token) on it.
    fn finish(
        &self,
        mut resp: Response<ProxyBody>,
        mut request_id: HeaderValue,
        ours: bool,
    ) -> Response<ProxyBody> {
        let sealed = match self.fleet {
            Some(_) => resp.extensions_mut().remove::<Sealed>(),
            None => None,
        };
        if let Some(Sealed(token)) = sealed {
            // Fleet mode: the id carries its decision, so its feedback can go to any
            // replica. A client's own id is kept as it sent it.
            if ours {
                request_id = token.clone();
            }
            resp.headers_mut().insert(X_DECISION.clone(), token);
        }
        resp.body_mut().stamp_mut().request_id = Some(request_id);
        resp
    }

    /// `POST /v1/feedback`: rewards for earlier decisions.
    async fn feedback(
        self: &Arc<Self>,
        req: Request<RequestBody>,
    ) -> Result<Response<ProxyBody>, RouterError> {
        if let Some(token) = &self.feedback_token {
            if !token.allows(req.headers()) {
                return Err(RouterError::Unauthorized(
                    "feedback needs `Authorization: Bearer <token>` (feedback_token_file)".into(),
                ));
            }
        }
        let learns = self.table.load().learns();
        let Some(sink) = self.sink.as_ref().filter(|_| learns) else {
            return Err(RouterError::UnknownModel(
                "(feedback is taken only for models with a `bandit`)".into(),
            ));
        };
        let limit = self.feedback_limit();
        let body = LimitedBody::new(req.into_body(), limit, self.body_stall_timeout);
        let body = crate::body::collect_limited(body, limit).await?;
        if let Some(fleet) = &self.fleet {
            let v: serde_json::Value = crate::offload::cpu(body.len(), move || {
                serde_json::from_slice(&body).map_err(|e| {
                    RouterError::BadInput(format!("the feedback body is not valid JSON: {e}"))
                })
            })
            .await??;
            let (status, answer) = feedback::handle_fleet(
                &self.decisions,
                sink.as_ref(),
                fleet.as_ref(),
                &self.keys,
                v,
            )
            .await?;
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
            return Ok(json_response(status, answer));
        }
        // A batch of up to `max_body_bytes` is parsed, joined and answered off the
        // async workers.
        let (status, answer) = {
            let (router, sink) = (self.clone(), sink.clone());
            crate::offload::cpu(body.len(), move || {
                feedback::handle(&router.decisions, sink.as_ref(), &body)
            })
            .await??
        };
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
        Ok(json_response(status, answer))
    }

    /// Phases *route* and *admit*: what answers the request (synchronous, so that a
    /// prediction's future holds [`Router::forward`]'s directly).
    fn route(
        &self,
        req: Request<RequestBody>,
        request_id: &HeaderValue,
    ) -> Result<Routed, RouterError> {
        let endpoint = path::parse(req.method(), req.uri().path())?;
        let model_req = match endpoint {
            Endpoint::Model(m) => m,
            Endpoint::ServerLive => {
                return Ok(Routed::Answer(json(StatusCode::OK, r#"{"live":true}"#)))
            }
            Endpoint::ServerReady => {
                return Ok(Routed::Answer(match self.not_ready() {
                    Some(why) => json_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        serde_json::json!({ "ready": false, "error": why })
                            .to_string()
                            .into(),
                    ),
                    None => json(StatusCode::OK, r#"{"ready":true}"#),
                }))
            }
            Endpoint::Feedback => return Ok(Routed::Feedback(req)),
            Endpoint::ServerMetadata => {
                let body = serde_json::json!({
                    "name": "switchyard",
                    "version": env!("CARGO_PKG_VERSION"),
                    "extensions": crate::v2::EXTENSIONS,
                });
                return Ok(Routed::Answer(json_response(
                    StatusCode::OK,
                    Bytes::from(body.to_string()),
                )));
            }
            Endpoint::RepositoryIndex => {
                // The models as clients name them: the variants behind a name are
                // Switchyard's business, not the client's.
                let table = self.table.load();
                let index: Vec<serde_json::Value> = table
                    .models()
                    .map(|m| serde_json::json!({ "name": m.name, "state": "READY" }))
                    .collect();
                return Ok(Routed::Answer(json_response(
                    StatusCode::OK,
                    Bytes::from(serde_json::Value::from(index).to_string()),
                )));
            }
        };
        let table = self.table.load();
        let name = &req.uri().path()[model_req.model.clone()];
        let model = table
            .model(name)
            .ok_or_else(|| RouterError::UnknownModel(name.to_string()))?;
        // The body's declared length (`content-length`, which framing checked), as the
        // body knows it: no second lookup and parse of the field.
        if let Some(len) = http_body::Body::size_hint(req.body()).exact() {
            if len > model.body_limit {
                if let Some(shadows) = &model.shadows {
                    if model_req.verb.is_prediction() {
                        shadows.refused_too_large(request_id.as_bytes());
                    }
                }
                return Err(RouterError::BodyTooLarge {
                    limit: model.body_limit,
                });
            }
        }
        if model.only_grpc.count_ones() as usize == model.variants.len() {
            return Err(RouterError::Unimplemented(format!(
                "every variant of model `{}` speaks gRPC (protocol: grpc); call it over gRPC",
                model.name
            )));
        }
        let (parts, body) = req.into_parts();
        Ok(Routed::Model(model.clone(), model_req, parts, body))
    }
}

/// What [`Router::route`] found answers a request.
enum Routed {
    /// A gRPC call (routed by the model its message names, once read).
    Grpc(Request<RequestBody>),
    /// Answered already (health, metadata, the repository index).
    Answer(Response<ProxyBody>),
    /// `POST /v1/feedback`.
    Feedback(Request<RequestBody>),
    /// A model's: forwarded to its variants (the request's head and body).
    Model(
        Arc<crate::table::ModelRoute>,
        crate::path::ModelRequest,
        http::request::Parts,
        RequestBody,
    ),
}

/// Builds the upstream request for an h2c or gRPC upstream: rewritten URI, cleaned
/// headers, limited body. (HTTP/1.1 upstreams: [`send_http1`], which does not copy the
/// client's headers.)
pub(crate) fn upstream_request(
    variant: &VariantRoute,
    upstream: &crate::upstream::Upstream,
    ask: &crate::forward::Ask<'_>,
    body: LimitedBody,
) -> Result<Request<LimitedBody>, RouterError> {
    let model_req = ask.model_req;
    let mut parts = ask.parts.clone();
    // A gRPC call names its model in its message (rewritten there), not its path.
    let grpc = model_req.protocol == path::Protocol::Grpc;
    let (model, upstream_model) = if grpc {
        (0..0, "")
    } else {
        (model_req.model.clone(), variant.upstream_model.as_str())
    };
    parts.uri = upstream.uri(&parts.uri, model, upstream_model)?;
    let headers = &mut parts.headers;
    if grpc {
        // The message goes out re-framed, uncompressed, perhaps longer.
        headers.remove(header::CONTENT_LENGTH);
        headers.remove("grpc-encoding");
    }
    parts.version = Version::HTTP_2;
    headers.remove(header::HOST);
    let forwarded = forwarded_for(ask);
    for (name, value) in set_fields(upstream, ask, &forwarded) {
        headers.insert(name.clone(), value.clone());
    }
    if let Some(deadline) = ask.grpc.and_then(|call| call.deadline) {
        // What is left of the client's deadline, not what it first allowed.
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        headers.insert("grpc-timeout", switchyard_proto::format_timeout(left));
    }
    Ok(Request::from_parts(parts, body))
}

/// Sends a try to an HTTP/1.1 upstream: the same request as [`upstream_request`] would
/// build, written out from the client's borrowed head; its answer as the client gets it.
pub(crate) async fn send_http1(
    variant: &VariantRoute,
    upstream: &crate::upstream::Upstream,
    ask: &crate::forward::Ask<'_>,
    body: LimitedBody,
) -> crate::variant::Answer {
    let uri = upstream.uri(
        &ask.parts.uri,
        ask.model_req.model.clone(),
        &variant.upstream_model,
    )?;
    let forwarded = forwarded_for(ask);
    let mut set = [(&X_REQUEST_ID, ask.request_id); 3];
    let mut n = 0;
    for field in set_fields(upstream, ask, &forwarded) {
        set[n] = field;
        n += 1;
    }
    let head = crate::h1::RequestHead {
        method: &ask.parts.method,
        target: uri.path_and_query().map_or("/", |pq| pq.as_str()),
        headers: &ask.parts.headers,
        set: &set[..n],
        answer_room: ANSWER_FIELDS,
    };
    upstream
        .send_http1(&head, body)
        .await
        .map(|resp| crate::variant::answer(resp.map(ProxyBody::upstream)))
        .map_err(|e| e.into_router_error(&variant.name))
}

/// The fields this hop sets on an upstream request, replacing the client's: `host`
/// (the upstream's; HTTP/1.1 only, HTTP/2 has `:authority`), `x-request-id`, and
/// `x-forwarded-for` as [`forwarded_for`] made it.
fn set_fields<'a>(
    upstream: &'a crate::upstream::Upstream,
    ask: &'a crate::forward::Ask<'_>,
    forwarded: &'a Option<HeaderValue>,
) -> impl Iterator<Item = (&'static HeaderName, &'a HeaderValue)> {
    let host = (upstream.protocol == UpstreamProtocol::Http1).then_some(&upstream.host_header);
    host.map(|h| (&header::HOST, h))
        .into_iter()
        .chain([(&X_REQUEST_ID, ask.request_id)])
        .chain(forwarded.as_ref().map(|f| (&X_FORWARDED_FOR, f)))
}

/// The `x-forwarded-for` to send: the client's peer address after the client's first
/// value; `None` when there is no peer address, or the two do not make a valid value
/// (then the client's passes as it is).
fn forwarded_for(ask: &crate::forward::Ask<'_>) -> Option<HeaderValue> {
    let ip = ask.peer?;
    let prior = if ask.fields.has(Present::X_FORWARDED_FOR) {
        ask.parts.headers.get(&X_FORWARDED_FOR)
    } else {
        None
    };
    match prior.and_then(|v| v.to_str().ok()) {
        Some(prior) => {
            HeaderValue::try_from(format!("{prior}, {}", ip.to_str().unwrap_or_default())).ok()
        }
        None => Some(ip.clone()),
    }
}

/// Removes hop-by-hop headers, including those the `connection` header names.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none (a head our HTTP/1.1 parser read has no `connection`
    // field that names only `close` or `keep-alive`: `h1::fields` keeps it out): one
    // pass over the fields finds which are present, and only those are removed (each
    // removal is a hash and a probe; removing all eight names cost 2.7% of the proxy's
    // user CPU).
    let mut present = 0u8;
    for name in headers.keys() {
        present |= hop_by_hop_bit(name.as_str());
    }
    if present == 0 {
        return;
    }
    if present & CONNECTION_BIT != 0 {
        if let Some(conn) = headers.remove(header::CONNECTION) {
            if let Ok(list) = conn.to_str() {
                for name in list.split(',') {
                    let name = name.trim();
                    // The options nearly every message names cost no hashed removal:
                    // `keep-alive` is a hop-by-hop field, gone below if present; `close`
                    // names a field only if one is so named, which a pass over the names
                    // tells. (A removal by a `&str` parses and hashes it.)
                    if name.is_empty()
                        || name.eq_ignore_ascii_case("keep-alive")
                        || (name.eq_ignore_ascii_case("close")
                            && !headers.keys().any(|k| k.as_str() == "close"))
                    {
                        continue;
                    }
                    headers.remove(name);
                }
            }
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    // `te: trailers` is end-to-end in practice (gRPC needs it); other values are not.
    if present & TE_BIT != 0
        && headers
            .get(header::TE)
            .is_some_and(|v| v.as_bytes() != b"trailers")
    {
        headers.remove(header::TE);
    }
}

/// [`strip_hop_by_hop`]'s bit for a field `name`: `1 << i` for `HOP_BY_HOP[i]`, then
/// [`CONNECTION_BIT`] and [`TE_BIT`]; 0 for an end-to-end field. A match on the name's
/// text: most names differ in length from all eight, which one comparison tells
/// (comparing every field with the eight names was 1.5% of the proxy's instructions,
/// `bench/instructions.sh`). A test holds it to `HOP_BY_HOP`.
fn hop_by_hop_bit(name: &str) -> u8 {
    match name {
        "keep-alive" => 1,
        "proxy-connection" => 1 << 1,
        "transfer-encoding" => 1 << 2,
        "upgrade" => 1 << 3,
        "trailer" => 1 << 4,
        "proxy-authorization" => 1 << 5,
        "connection" => CONNECTION_BIT,
        "te" => TE_BIT,
        _ => 0,
    }
}

/// Whether `name` is a hop-by-hop field's.
pub(crate) fn is_hop_by_hop(name: &str) -> bool {
    hop_by_hop_bit(name) != 0
}

const CONNECTION_BIT: u8 = 1 << HOP_BY_HOP.len();
const TE_BIT: u8 = CONNECTION_BIT << 1;

/// A request's time with us: from its head to the variant's choice, and from there to
/// the answer's head.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Spans {
    pub route: std::time::Duration,
    pub upstream: std::time::Duration,
}

fn json(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    json_response(status, Bytes::from_static(body.as_bytes()))
}

fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        return std::process::id() as u64 ^ Instant::now().elapsed().as_nanos() as u64;
    }
    u64::from_le_bytes(b)
}

/// Keeps `switchyard_requests_in_flight` right even when a client hangs up and the
/// request future is dropped half-way.
struct InFlight<'a>(&'a Metrics);

impl<'a> InFlight<'a> {
    fn new(m: &'a Metrics) -> Self {
        m.in_flight.inc();
        InFlight(m)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

/// The data plane as a tower service, one per client connection.
#[derive(Clone, Debug)]
pub struct ProxyService {
    router: Arc<Router>,
    /// The client's address as an `x-forwarded-for` value.
    peer: Option<HeaderValue>,
}

impl tower_service::Service<Request<RequestBody>> for ProxyService {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<RequestBody>) -> Self::Future {
        Box::pin(self.router.clone().handle(req, self.peer.clone()))
    }
}

/// The shadow runtime, started now if `config` is the first with shadows.
fn shadow_runtime_for<'a>(
    config: &Config,
    cell: &'a std::sync::OnceLock<switchyard_shadow::ShadowRuntime>,
    on_start: Option<fn()>,
) -> Result<Option<&'a switchyard_shadow::ShadowRuntime>, BuildError> {
    if config
        .models
        .values()
        .all(|m| m.shadows.is_empty() && m.capture.is_none())
    {
        return Ok(cell.get());
    }
    if let Some(rt) = cell.get() {
        return Ok(Some(rt));
    }
    let rt = switchyard_shadow::ShadowRuntime::new(on_start).map_err(|e| BuildError {
        path: "models".into(),
        line: 0,
        column: 0,
        message: format!("cannot start the shadow thread: {e}"),
    })?;
    Ok(Some(cell.get_or_init(|| rt)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The request's future is boxed once per request; above 1,032 bytes glibc serves
    /// it from its heap instead of a per-thread cache (BENCHMARKS.md, "The second
    /// round"). Held here, so that a change that grows it is seen.
    #[tokio::test]
    async fn the_request_future_fits_glibcs_per_thread_cache() {
        let config = switchyard_config::from_yaml_str(
            "models:\n  m:\n    variants: [{name: a, upstream: \"http://127.0.0.1:9\", weight: 1}]\n",
        )
        .unwrap();
        let metrics = Metrics::new(&prometheus::Registry::new()).unwrap();
        let router = Router::new(&config, metrics).unwrap();
        let req = Request::post("/v1/models/m:predict")
            .body(RequestBody::empty())
            .unwrap();
        let future = router.handle(req, None);
        let size = std::mem::size_of_val(&future);
        println!("the request future: {size} bytes");
        assert!(size <= 1032, "the request future is {size} bytes");
    }

    #[test]
    fn each_hop_by_hop_name_has_its_own_bit() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_bit(name.as_str()), 1 << i, "{name}");
        }
        assert_eq!(hop_by_hop_bit("connection"), CONNECTION_BIT);
        assert_eq!(hop_by_hop_bit("te"), TE_BIT);
        for name in [
            "content-type",
            "x-request-id",
            "host",
            "user-agent",
            "keep-alive2",
        ] {
            assert_eq!(hop_by_hop_bit(name), 0, "{name}");
        }
    }

    #[test]
    fn hop_by_hop_headers_go_and_end_to_end_ones_stay() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("gzip"));
        h.insert("content-type", HeaderValue::from_static("application/json"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        // Options named in any case; a field named like an option goes too.
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("Keep-Alive, CLOSE"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("close", HeaderValue::from_static("1"));
        h.insert("content-type", HeaderValue::from_static("application/json"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        let mut h = HeaderMap::new();
        h.insert("te", HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "te: trailers is kept");
        // Each alone, among end-to-end fields, upper case as a client may send it.
        for name in [
            "Connection",
            "TE",
            "Keep-Alive",
            "Proxy-Connection",
            "Transfer-Encoding",
            "Upgrade",
            "Trailer",
            "Proxy-Authorization",
        ] {
            let mut h = HeaderMap::new();
            h.insert("content-type", HeaderValue::from_static("application/json"));
            h.insert(
                HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).unwrap(),
                HeaderValue::from_static("x"),
            );
            h.insert("x-custom", HeaderValue::from_static("1"));
            strip_hop_by_hop(&mut h);
            assert_eq!(h.len(), 2, "{name} goes: {h:?}");
            assert!(h.contains_key("content-type") && h.contains_key("x-custom"));
        }
    }
}
