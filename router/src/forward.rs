//! One model request from its body to its answer. The phases, in order:
//!
//! 1. **choose**, **limit/break**, **forward**, **retry**: tower's `Retry` over the
//!    split over the variants' stacks ([`crate::split`], [`crate::variant`]): a ready
//!    variant by sticky key, the bandit's picker or the weights (an ejected or full
//!    variant's share goes to the others in proportion; its sticky keys move and come
//!    back); a failure of a kind in `retry.on` goes to a variant not yet tried, if the
//!    retry budget allows and the body was small enough to keep (`retry.max_body_bytes`).
//!    Every outcome is told to the variant's breaker.
//! 2. **hedge**: with `hedge_after`, a request not answered by then is also sent to
//!    another ready variant (or the fallback); the first good answer wins and the other
//!    request is dropped, which cancels it.
//! 3. **fall back**: the model's `fallback` (a local variant) answers when no variant
//!    is ready, or when the last try failed and no retry is left; with every variant
//!    ejected and no fallback, panic routing.
//! 4. **respond/record**: headers say who answered and what happened
//!    (`x-switchyard-variant`, `x-switchyard-retries`, `x-switchyard-fallback`); a
//!    decision is recorded for the variant that answered, with the probability it was
//!    chosen with, so feedback credits the right arm. Failed answers record none: a
//!    variant's failures are the breaker's business, not zero rewards.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use crate::inbound::RequestBody;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::Response;
use switchyard_shadow::RequestHead;
use tower::retry::budget::Budget;
use tower::ServiceExt;

use crate::body::{LimitedBody, ProxyBody};
use crate::error::{error_response, RouterError};
use crate::feedback;
use crate::h1::Present;
use crate::metrics::Phase;
use crate::path::ModelRequest;
use crate::proxy::{strip_hop_by_hop, Router};
use crate::selector::Pick;
use crate::split::{bit, choose, Budgeted, Split, Tried, TryFuture, Unrouted};
use crate::stamp::Timing;
use crate::table::ModelRoute;
use crate::variant::{stack, try_ready};

/// Retries the request took, when any.
pub static X_SWITCHYARD_RETRIES: HeaderName = HeaderName::from_static("x-switchyard-retries");
/// Why the fallback answered, when it did.
pub static X_SWITCHYARD_FALLBACK: HeaderName = HeaderName::from_static("x-switchyard-fallback");
/// `won` or `lost`, when a hedge was sent.
pub static X_SWITCHYARD_HEDGE: HeaderName = HeaderName::from_static("x-switchyard-hedge");

/// What a request brings: an HTTP body still streaming, or a gRPC call already read.
#[derive(Debug)]
pub(crate) enum Payload {
    Http(RequestBody),
    Grpc(std::sync::Arc<crate::grpc::Call>),
}

/// One request as every try of it sees it: what to send, and what was tried so far.
/// Tries of one request (a retry, a hedge, the fallback) share it.
#[derive(Debug)]
pub(crate) struct Ask<'a> {
    pub model: &'a ModelRoute,
    pub model_req: &'a ModelRequest,
    pub parts: &'a http::request::Parts,
    /// The gRPC call, when the request is one.
    pub grpc: Option<&'a crate::grpc::Call>,
    pub request_id: &'a HeaderValue,
    pub peer: Option<&'a HeaderValue>,
    /// Which fields the client's head may have ([`crate::inbound::RequestBody::fields`]).
    pub fields: Present,
    /// The sticky key's value, when the model has a sticky header and the client sent it.
    pub sticky: Option<HeaderValue>,
    /// The variants tried so far, as a set of bits (a model has at most 64).
    pub tried: AtomicU64,
    /// Retries taken.
    pub retries: AtomicU32,
}

impl Router {
    /// Phases *choose* to *record* (see the module map), for a request's head and what
    /// it brings. An `async move` block, not an `async fn`: an `async fn` keeps its
    /// arguments twice in its future (as passed, and moved into its body), and this future
    /// is copied whole into its caller's; for the same reason the head comes apart from
    /// its payload, so that nothing unpacks a request inside, and is borrowed, not moved:
    /// its owner's future holds it once.
    #[allow(clippy::too_many_arguments)]
    #[allow(clippy::manual_async_fn)] // on purpose: see above
    pub(crate) fn forward<'a>(
        &'a self,
        model: &'a ModelRoute,
        model_req: &'a ModelRequest,
        parts: &'a mut http::request::Parts,
        payload: Payload,
        request_id: &'a HeaderValue,
        peer: Option<&'a HeaderValue>,
        started: Instant,
    ) -> impl std::future::Future<Output = Response<ProxyBody>> + Send + 'a {
        async move {
            let res = &model.resilience;
            let sticky = model
                .sticky_header
                .as_ref()
                .and_then(|h| parts.headers.get(h))
                .cloned();
            let fields = match &payload {
                Payload::Http(body) => body.fields(),
                Payload::Grpc(_) => Present::ALL,
            };
            if fields.has(Present::HOP_BY_HOP) {
                strip_hop_by_hop(&mut parts.headers);
            }
            // The body's declared length, as the body knows it (its framing read it from
            // `content-length`): nothing read of it yet, so what is left is all of it.
            let mut declared = None;
            // In a block: a local once borrowed keeps its room in the future until its
            // scope ends, even moved out; the body is borrowed here (its tap), so the
            // binding that is awaited on later must be another.
            let (grpc, excluded, primary_answer, body) = {
                let (mut body, grpc, excluded) = match payload {
                    Payload::Http(body) => {
                        declared = http_body::Body::size_hint(&body).exact();
                        (
                            LimitedBody::new(body, model.body_limit, self.body_stall_timeout),
                            None,
                            model.only_grpc,
                        )
                    }
                    // Already read: each try sends its own frame ([`crate::grpc::Call::for_upstream`]).
                    Payload::Grpc(call) => (
                        LimitedBody::replay(Bytes::new()),
                        Some(call),
                        model.not_grpc,
                    ),
                };
                let mut primary_answer = None;
                if let Some(shadows) = &model.shadows {
                    // gRPC calls go to the `protocol: grpc` shadows, HTTP requests to the others.
                    let predicts = model_req.verb.is_prediction();
                    let mask = if predicts {
                        shadows.select(request_id.as_bytes(), grpc.is_some())
                    } else {
                        0
                    };
                    let capture = predicts && shadows.capture_takes(request_id.as_bytes());
                    if mask != 0 || capture {
                        let head = RequestHead {
                            method: parts.method.clone(),
                            path: parts.uri.path().to_string(),
                            model: model_req.model.clone(),
                            query: parts.uri.query().map(str::to_string),
                            headers: parts.headers.clone(),
                            request_id: request_id.clone(),
                            started,
                            grpc: grpc.as_deref().map(crate::grpc::Call::shadow_head),
                        };
                        let (mut tap, answer) = shadows.begin(mask, capture, head);
                        if grpc.is_some() {
                            // Already read whole: mirrored now.
                            tap.finish();
                        } else {
                            body.set_tap(tap);
                        }
                        primary_answer = Some(answer);
                    }
                }
                (grpc, excluded, primary_answer, body)
            };
            // A body that may have to be sent twice is read first, when it is small enough
            // to keep (its declared length says so); larger ones stream to one variant.
            let on = &res.retry.on;
            let resends = on.connect || on.reset || on.timeout || on.status_5xx;
            let switchable = (model.variants.len() > 1 && (resends || res.hedge_after.is_some()))
                || res.fallback.is_some();
            let keep = switchable && declared.is_some_and(|n| n <= res.retry.max_body_bytes);
            let (replay, body) = if grpc.is_some() {
                (Some(Bytes::new()), body)
            } else if keep {
                match crate::body::collect_limited(body, model.body_limit).await {
                    Ok(bytes) => (Some(bytes.clone()), LimitedBody::replay(bytes)),
                    Err(e) => return error_response(&e),
                }
            } else {
                (None, body)
            };
            res.budget.deposit();
            let ask = Ask {
                model,
                model_req,
                parts,
                grpc: grpc.as_deref(),
                request_id,
                peer,
                fields,
                sticky,
                // Variants that do not speak the request's protocol count as tried.
                tried: AtomicU64::new(excluded),
                retries: AtomicU32::new(0),
            };

            let routed = crate::clock::now_std();
            // Phases choose, limit/break, forward and retry: tower's Retry over the split.
            let retrying = tower::retry::Retry::new(Budgeted::new(&ask), Split::new(&ask));
            let mut hedge = None;
            let first = match (res.hedge_after, &replay) {
                // The rarer paths are boxed (hedging, falling back): each would otherwise
                // enlarge every request's future, which is moved whole.
                (Some(after), Some(bytes)) => {
                    let (first, h) =
                        Box::pin(hedged(&ask, retrying.oneshot(body), after, bytes)).await;
                    hedge = h;
                    first
                }
                _ => retrying.oneshot(body).await,
            };
            // Nothing of `first` may keep its room (280 bytes) in the future while
            // falling back. A local keeps it once borrowed (a guard borrows; so does
            // assigning to a declared local, which drops the old value in place), or when
            // only its inside is moved out (a match). So it is taken apart in one
            // statement into two new locals, and the answer-so-far moved out whole before
            // the wait.
            let (answer, fallback) = {
                let (done, failed) = succeeded(first);
                let later =
                    failed.map(|first| Box::pin(self.fall_back(&ask, first, replay.as_ref())));
                match later {
                    Some(fall_back) => {
                        drop(done);
                        fall_back.await
                    }
                    None => (done, None),
                }
            };
            let answered = crate::clock::now_std();
            // Each span once: an `Instant`'s subtraction is checked and normalised (a
            // request's fourteen, ours and tokio's, were 1.5% of the proxy's
            // instructions; six were these).
            let spans = crate::proxy::Spans {
                route: routed.saturating_duration_since(started),
                upstream: answered.saturating_duration_since(routed),
            };

            let Some(tried_last) = answer else {
                // Nothing was tried and there is no fallback: every variant is ejected or
                // full.
                let err = RouterError::Overloaded(format!(
                "no variant of model `{}` can take the request now (ejected by their circuit breakers or at limits.max_in_flight), and the model has no fallback",
                model.name
            ));
                return error_response(&err);
            };
            let variant = &model.variants[tried_last.index];
            let mut resp = match tried_last.result {
                Ok(resp) => resp,
                Err(err) => error_response(&err),
            };
            // A gRPC answer's status may be in its headers; an HTTP answer's is its status.
            let status = if grpc.is_some() {
                crate::grpc::status_of(&resp)
            } else {
                resp.status().as_u16()
            };
            if (200..300).contains(&status) {
                let sealed = self.record_decision(
                    model,
                    model_req,
                    request_id,
                    Pick {
                        index: tried_last.index,
                        probability: tried_last.probability,
                    },
                    routed,
                    spans.upstream,
                );
                if let Some(token) = sealed {
                    resp.extensions_mut().insert(crate::proxy::Sealed(token));
                }
            }
            if let Some(answer) = primary_answer {
                resp.body_mut().set_tap(answer.tap(status, &variant.name));
            }
            let local = resp.extensions().get::<crate::local::Phases>().copied();
            let m = &variant.metrics;
            m.phase(Phase::Route, spans.route);
            match &local {
                Some(p) => {
                    m.phase(Phase::Queue, p.queue);
                    m.phase(Phase::Compute, p.compute);
                    m.phase(Phase::Respond, p.respond);
                }
                None => m.phase(Phase::Upstream, spans.upstream),
            }
            let stamp = resp.body_mut().stamp_mut();
            stamp.variant = Some(variant.name_header.clone());
            stamp.timing = Some(Timing::new(spans.route, spans.upstream, local.as_ref()));
            let headers = resp.headers_mut();
            let retries = ask.retries.load(Ordering::Relaxed);
            if retries > 0 {
                headers.insert(X_SWITCHYARD_RETRIES.clone(), HeaderValue::from(retries));
            }
            if let Some(reason) = fallback.filter(|_| tried_last.failure.is_none()) {
                headers.insert(
                    X_SWITCHYARD_FALLBACK.clone(),
                    HeaderValue::from_static(reason),
                );
            }
            if let Some(h) = hedge {
                headers.insert(X_SWITCHYARD_HEDGE.clone(), HeaderValue::from_static(h));
            }
            // Every try is done with the client's fields: their map can hold the next head.
            crate::h1::recycle(std::mem::take(&mut parts.headers));
            resp
        }
    }

    /// Phase *fall back*: the model's local fallback answers when no variant could take
    /// the request or the last try failed with no retry left; with every variant ejected
    /// and no fallback able to answer, panic routing sends it out over all variants as
    /// if there were no breakers (Envoy's), their in-flight limits still holding.
    /// Returns the answer to give, if any, and why the fallback answered.
    async fn fall_back<'a>(
        &self,
        ask: &'a Ask<'a>,
        first: Result<Tried, Unrouted>,
        replay: Option<&Bytes>,
    ) -> (Option<Tried>, Option<&'static str>) {
        let again = || replay.map(|b| LimitedBody::replay(b.clone()));
        // Only a failed try or none comes here (`forward` keeps a success).
        let (last, body, reason) = match first {
            Ok(t) => {
                let body = again();
                (Some(t), body, "failed")
            }
            Err(Unrouted(body)) => {
                let reason = if ask.retries.load(Ordering::Relaxed) > 0 {
                    "failed"
                } else {
                    "no_ready_variant"
                };
                (None, Some(body), reason)
            }
        };
        let Some(body) = body else {
            return (last, None);
        };
        let res = &ask.model.resilience;
        let tried = ask.tried.load(Ordering::Relaxed);
        if let Some(fb) = res.fallback.filter(|fb| tried & bit(*fb) == 0) {
            let mut variant = stack(ask, fb, false);
            if try_ready(&mut variant).is_ok() {
                ask.tried.fetch_or(bit(fb), Ordering::Relaxed);
                res.metrics
                    .fallbacks
                    .with_label_values(&[&ask.model.name, reason])
                    .inc();
                let pick = Pick {
                    index: fb,
                    probability: 1.0,
                };
                let answer = TryFuture::trying(&mut variant, pick, body).await;
                return (answer.ok(), Some(reason));
            }
        }
        if last.is_some() {
            return (last, None);
        }
        match Split::panicked(ask).oneshot(body).await {
            Ok(t) => {
                tracing::debug!(model = %ask.model.name, "Every variant is ejected; routed as if none were.");
                (Some(t), None)
            }
            Err(_) => (None, None),
        }
    }
    /// Phase *record*: the decision, for the variant that answered; in fleet mode also
    /// sealed into a token the answer carries (no I/O: an HMAC).
    fn record_decision(
        &self,
        model: &ModelRoute,
        model_req: &ModelRequest,
        request_id: &HeaderValue,
        pick: Pick,
        at: Instant,
        latency: std::time::Duration,
    ) -> Option<HeaderValue> {
        let ttl = model.feedback_ttl?;
        if !model_req.verb.is_prediction() {
            return None;
        }
        let recorded = self.decisions.record_timed(
            at,
            request_id.as_bytes(),
            model.index,
            u16::try_from(pick.index).unwrap_or(u16::MAX),
            pick.probability,
            ttl,
            latency,
        );
        if let feedback::Recorded::Evicted(n) = recorded {
            self.evicted(at, n);
        }
        let fleet = self.fleet.as_ref()?;
        let portable = feedback::Portable {
            model: model.fingerprint,
            variant: u16::try_from(pick.index).unwrap_or(u16::MAX),
            probability: pick.probability as f32,
            at_unix_ms: feedback::unix_ms(),
            ttl_ms: u32::try_from(ttl.as_millis()).unwrap_or(u32::MAX),
            latency_us: u32::try_from(latency.as_micros()).unwrap_or(u32::MAX),
        };
        let token = fleet.seal(request_id.as_bytes(), &portable)?;
        HeaderValue::try_from(token).ok()
    }
}

/// The try that answered, or else what to fall back from: a failed try, or none.
fn succeeded(first: Result<Tried, Unrouted>) -> (Option<Tried>, Option<Result<Tried, Unrouted>>) {
    match first {
        Ok(t) if t.failure.is_none() => (Some(t), None),
        first => (None, Some(first)),
    }
}

/// Phase *hedge*: the request (with its retries), and after `after` a second try on
/// another ready variant (or the fallback); the first good answer wins and the other is
/// dropped, which cancels it and frees its slot. Returns the answer and, when a hedge
/// went out, whether it `won` or `lost`.
async fn hedged<'a>(
    ask: &'a Ask<'a>,
    primary: impl std::future::Future<Output = Result<Tried, Unrouted>>,
    after: std::time::Duration,
    replay: &Bytes,
) -> (Result<Tried, Unrouted>, Option<&'static str>) {
    tokio::pin!(primary);
    tokio::select! {
        t = &mut primary => return (t, None),
        () = tokio::time::sleep(after) => {}
    }
    let res = &ask.model.resilience;
    let tried = ask.tried.load(Ordering::Relaxed);
    // Another ready variant, else the fallback.
    let target =
        choose(ask, tried, false).or(res.fallback.filter(|f| tried & bit(*f) == 0).map(|index| {
            Pick {
                index,
                probability: 1.0,
            }
        }));
    let Some(pick) = target else {
        return (primary.await, None);
    };
    let mut variant = stack(ask, pick.index, false);
    if try_ready(&mut variant).is_err() {
        return (primary.await, None);
    }
    ask.tried.fetch_or(bit(pick.index), Ordering::Relaxed);
    let second = TryFuture::trying(&mut variant, pick, LimitedBody::replay(replay.clone()));
    tokio::pin!(second);
    let count = |outcome: &str| {
        res.metrics
            .hedges
            .with_label_values(&[&ask.model.name, outcome])
            .inc();
    };
    let good = |t: &Result<Tried, Unrouted>| matches!(t, Ok(t) if t.failure.is_none());
    // The first good answer wins; a failure waits for the other.
    tokio::select! {
        t = &mut primary => {
            if good(&t) {
                count("lost");
                return (t, Some("lost"));
            }
            let s = second.await;
            let won = good(&s);
            count(if won { "won" } else { "lost" });
            (if won || t.is_err() { s } else { t }, Some(if won { "won" } else { "lost" }))
        }
        s = &mut second => {
            if good(&s) {
                count("won");
                return (s, Some("won"));
            }
            let t = primary.await;
            count("lost");
            (if good(&t) || s.is_err() { t } else { s }, Some("lost"))
        }
    }
}
