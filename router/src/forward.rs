//! Phases *choose*, *limit*/*break*, *forward*, *retry*, *hedge*, *fall back*, *respond*
//! and *record* for one model request, in that order:
//!
//! 1. **choose**: sticky key, else the bandit's per-request picker, else the weight
//!    table; among *ready* variants only ([`crate::breaker`]): an ejected or full
//!    variant's share goes to the others in proportion, its sticky keys move and come
//!    back.
//! 2. **limit/break**: the chosen variant admits the request (a slot under
//!    `max_in_flight`; the half-open probe), or the choice is made again without it.
//! 3. **forward**: to the remote model server, or the in-process model.
//! 4. **retry**: a failure of a kind in `retry.on` goes to a variant not yet tried, if
//!    the retry budget allows and the body was small enough to keep
//!    (`retry.max_body_bytes`). Every outcome is told to the variant's breaker.
//! 5. **hedge**: with `hedge_after`, a request not answered by then is also sent to
//!    another ready variant (or the fallback); the first good answer wins and the other
//!    request is dropped, which cancels it.
//! 6. **fall back**: the model's `fallback` (a local variant) answers when no variant
//!    is ready, or when the last try failed and no retry is left.
//! 7. **respond/record**: headers say who answered and what happened
//!    (`x-switchyard-variant`, `x-switchyard-retries`, `x-switchyard-fallback`); a
//!    decision is recorded for the variant that answered, with the probability it was
//!    chosen with, so feedback credits the right arm. Failed answers record none: a
//!    variant's failures are the breaker's business, not zero rewards.

use std::time::Instant;

use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH};
use http::{Request, Response, Version};
use hyper::body::Incoming;
use switchyard_shadow::RequestHead;
use tower::retry::budget::Budget;

use crate::body::{LimitedBody, ProxyBody};
use crate::breaker::{Outcome, Permit};
use crate::error::{error_response, RouterError};
use crate::feedback;
use crate::path::ModelRequest;
use crate::proxy::{
    server_timing, strip_hop_by_hop, upstream_request, Router, SERVER_TIMING, X_SWITCHYARD_VARIANT,
};
use crate::selector::Pick;
use crate::table::{Backend, ModelRoute};

/// Retries the request took, when any.
pub static X_SWITCHYARD_RETRIES: HeaderName = HeaderName::from_static("x-switchyard-retries");
/// Why the fallback answered, when it did.
pub static X_SWITCHYARD_FALLBACK: HeaderName = HeaderName::from_static("x-switchyard-fallback");
/// `won` or `lost`, when a hedge was sent.
pub static X_SWITCHYARD_HEDGE: HeaderName = HeaderName::from_static("x-switchyard-hedge");

/// One try's result, and the failure kind when it was the variant's failure.
struct Tried {
    index: usize,
    result: Result<Response<ProxyBody>, RouterError>,
    failure: Option<&'static str>,
}

/// What every try of one request needs.
struct Ask<'a> {
    model: &'a ModelRoute,
    model_req: &'a ModelRequest,
    parts: &'a http::request::Parts,
    request_id: &'a HeaderValue,
    peer: Option<&'a HeaderValue>,
}

/// The failure kind a try counts as for the breaker and the retry policy, or `None`
/// when the variant did its job (any answer below 500) or the client is at fault.
fn failure_of(result: &Result<Response<ProxyBody>, RouterError>) -> Option<&'static str> {
    match result {
        Ok(resp) if resp.status().is_server_error() => Some("5xx"),
        Ok(_) => None,
        Err(RouterError::Upstream { kind, .. }) => Some(kind.as_str()),
        Err(RouterError::LocalTimeout(_)) => Some("timeout"),
        Err(RouterError::Inference(_)) => Some("5xx"),
        // A local model's full queue is load shedding, not a broken variant: counted
        // as a failure it would eject a busy model for seconds after its queue drained.
        Err(RouterError::Overloaded(_)) => None,
        Err(_) => None,
    }
}

/// A variant's bit in a request's set of tried variants.
fn bit(index: usize) -> u64 {
    1u64 << (index % 64)
}

fn retried_on(retry: &switchyard_config::Retry, kind: &str) -> bool {
    let on = &retry.on;
    match kind {
        "connect" => on.connect,
        "reset" => on.reset,
        "timeout" => on.timeout,
        "5xx" => on.status_5xx,
        _ => false,
    }
}

impl Router {
    /// Phases *choose* to *record* (see the module map).
    pub(crate) async fn forward(
        &self,
        model: &ModelRoute,
        model_req: &ModelRequest,
        req: Request<Incoming>,
        request_id: &HeaderValue,
        peer: Option<&HeaderValue>,
        started: Instant,
    ) -> Response<ProxyBody> {
        let res = &model.resilience;
        let sticky_key = model
            .sticky_header
            .as_ref()
            .and_then(|h| req.headers().get(h))
            .cloned();
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let mut body = LimitedBody::new(body, model.body_limit, self.body_stall_timeout);
        let mut primary_answer = None;
        if let Some(shadows) = &model.shadows {
            let mask = if model_req.verb.is_prediction() {
                shadows.select(request_id.as_bytes())
            } else {
                0
            };
            if mask != 0 {
                let head = RequestHead {
                    method: parts.method.clone(),
                    path: parts.uri.path().to_string(),
                    model: model_req.model.clone(),
                    query: parts.uri.query().map(str::to_string),
                    headers: parts.headers.clone(),
                    request_id: request_id.clone(),
                    started,
                };
                let (tap, answer) = shadows.begin(mask, head);
                body.set_tap(tap);
                primary_answer = Some(answer);
            }
        }
        // A body that may have to be sent twice is read first, when it is small enough
        // to keep (its declared length says so); larger ones stream to one variant.
        let on = &res.retry.on;
        let resends = on.connect || on.reset || on.timeout || on.status_5xx;
        let switchable = (model.variants.len() > 1 && (resends || res.hedge_after.is_some()))
            || res.fallback.is_some();
        let declared = parts
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let keep = switchable && declared.is_some_and(|n| n <= res.retry.max_body_bytes);
        let (replay, mut streamed) = if keep {
            match crate::body::collect_limited(body, model.body_limit).await {
                Ok(bytes) => (Some(bytes), None),
                Err(e) => return error_response(&e),
            }
        } else {
            (None, Some(body))
        };
        let mut next_body = || match &replay {
            Some(bytes) => Some(LimitedBody::replay(bytes.clone())),
            None => streamed.take(),
        };
        res.budget.deposit();
        let r = Ask {
            model,
            model_req,
            parts: &parts,
            request_id,
            peer,
        };

        // The variants tried so far, as a set of bits (a model has at most 64).
        let mut tried: u64 = 0;
        let mut retries = 0u32;
        let mut hedge: Option<&'static str> = None;
        let mut fallback: Option<&'static str> = None;
        let mut hedge_probability = 1.0;
        let mut panicked = false;
        let mut last: Option<Tried> = None;
        let mut pick = self.choose(model, sticky_key.as_ref(), tried);
        let routed = Instant::now();
        let answer: Option<(Tried, f64)> = loop {
            let Some(p) = pick else {
                // Nothing ready (or everything tried): the fallback, if it has not
                // been tried already.
                let reason = if last.is_some() {
                    "failed"
                } else {
                    "no_ready_variant"
                };
                if let Some(fb) = res.fallback.filter(|fb| tried & bit(*fb) == 0) {
                    let Some(body) = next_body() else {
                        break last.map(|t| (t, 0.0));
                    };
                    fallback = Some(reason);
                    tried |= bit(fb);
                    if let Some(t) = self.try_fallback(&r, fb, body, reason).await {
                        break Some((t, 1.0));
                    }
                }
                // Every variant ejected and no fallback to answer: rather than refuse
                // everything, spread the request over the variants as if there were no
                // breakers (Envoy's panic routing); their in-flight limits still hold.
                if last.is_none() && !panicked {
                    panicked = true;
                    pick = model.selector.pick_among(&|i| {
                        tried & bit(i) == 0 && model.variants[i].health.in_flight_room()
                    });
                    if pick.is_some() {
                        tracing::debug!(model = %model.name, "Every variant is ejected; routing as if none were.");
                        continue;
                    }
                }
                break last.map(|t| (t, 0.0));
            };
            let variant = &model.variants[p.index];
            let admitted = if panicked {
                variant.health.admit_ignoring_breaker()
            } else {
                variant.health.admit(tokio::time::Instant::now())
            };
            let permit = match admitted {
                Ok(permit) => permit,
                Err(_) => {
                    // Lost the race for its last slot or its probe: choose again.
                    tried |= bit(p.index);
                    pick = self.choose(model, sticky_key.as_ref(), tried);
                    continue;
                }
            };
            let Some(body) = next_body() else {
                break last.map(|t| (t, 0.0));
            };
            tried |= bit(p.index);
            let outcome = match (res.hedge_after, &replay) {
                (Some(after), Some(_)) if hedge.is_none() => {
                    let (t, h) = self
                        .hedged(
                            &r,
                            p.index,
                            permit,
                            body,
                            after,
                            &mut tried,
                            &mut next_body,
                            &mut hedge_probability,
                        )
                        .await;
                    hedge = h;
                    t
                }
                _ => self.try_variant(&r, p.index, body, permit).await,
            };
            let Some(kind) = outcome.failure else {
                // The winner of a hedge was chosen with the hedge's own probability.
                let probability = if outcome.index == p.index {
                    p.probability
                } else {
                    hedge_probability
                };
                break Some((outcome, probability));
            };
            last = Some(outcome);
            // Retry on another variant, within the budget, if the body can be sent
            // again and the failure is one the config retries.
            if replay.is_some() && retried_on(&res.retry, kind) {
                let next = self.choose(model, None, tried);
                if next.is_some() {
                    if res.budget.withdraw() {
                        retries += 1;
                        res.metrics
                            .retries
                            .with_label_values(&[&model.name, kind])
                            .inc();
                        pick = next;
                        continue;
                    }
                    res.metrics
                        .retries_refused
                        .with_label_values(&[&model.name, kind])
                        .inc();
                }
            }
            // No retry: the fallback answers in its place, if it can.
            pick = None;
            if res.fallback.is_none() || replay.is_none() {
                break last.map(|t| (t, 0.0));
            }
        };
        let answered = Instant::now();

        let Some((tried_last, probability)) = answer else {
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
        let ok = resp.status().is_success();
        if ok {
            self.record_decision(
                model,
                model_req,
                request_id,
                tried_last.index,
                probability,
                routed,
            );
        }
        if let Some(answer) = primary_answer {
            let status = resp.status().as_u16();
            resp.body_mut().set_tap(answer.tap(status));
        }
        let headers = resp.headers_mut();
        headers.insert(X_SWITCHYARD_VARIANT.clone(), variant.name_header.clone());
        headers.insert(
            SERVER_TIMING.clone(),
            server_timing(started, routed, answered),
        );
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
        resp
    }

    /// Phase *choose*: a ready variant not in `tried`, by sticky key or the picker or
    /// the weights; `None` when none is ready.
    fn choose(&self, model: &ModelRoute, sticky: Option<&HeaderValue>, tried: u64) -> Option<Pick> {
        let now = tokio::time::Instant::now();
        let usable = |i: usize| tried & bit(i) == 0 && model.variants[i].health.ready(now).is_ok();
        if let Some(key) = sticky {
            return model.selector.pick_sticky_among(key.as_bytes(), &usable);
        }
        if let Some(p) = model.picker.load().as_ref().and_then(|p| p.pick()) {
            if p.index < model.variants.len() && usable(p.index) {
                return Some(p);
            }
        }
        model.selector.pick_among(&usable)
    }

    /// Phases *forward* and *break* for one try: sends, classifies, tells the breaker.
    async fn try_variant(
        &self,
        r: &Ask<'_>,
        index: usize,
        body: LimitedBody,
        permit: Permit<'_>,
    ) -> Tried {
        let variant = &r.model.variants[index];
        let started = Instant::now();
        let result = self.send(r, index, body).await;
        let failure = failure_of(&result);
        match failure {
            Some(_) => permit.record(Outcome::Failure),
            // A client's own mistake says nothing of the variant: drop the permit.
            None if result.is_err() => drop(permit),
            None => permit.record(Outcome::Success),
        }
        if let Err(RouterError::Upstream { kind, .. }) = &result {
            variant.metrics.upstream_error(*kind);
        }
        let status = match &result {
            Ok(resp) => resp.status().as_u16(),
            Err(e) => e.status().as_u16(),
        };
        variant
            .metrics
            .record(status, started.elapsed().as_secs_f64());
        if let (Some(kind), Err(e)) = (failure, &result) {
            tracing::debug!(model = %r.model.name, variant = %variant.name, kind, error = %e, "A try failed.");
        }
        Tried {
            index,
            result,
            failure,
        }
    }

    /// Phase *hedge*: the first try, and after `after` a second one to another ready
    /// variant (or the fallback); the first good answer wins, the other is dropped.
    #[allow(clippy::too_many_arguments)]
    async fn hedged(
        &self,
        r: &Ask<'_>,
        index: usize,
        permit: Permit<'_>,
        body: LimitedBody,
        after: std::time::Duration,
        tried: &mut u64,
        next_body: &mut impl FnMut() -> Option<LimitedBody>,
        hedge_probability: &mut f64,
    ) -> (Tried, Option<&'static str>) {
        let primary = self.try_variant(r, index, body, permit);
        tokio::pin!(primary);
        tokio::select! {
            t = &mut primary => return (t, None),
            () = tokio::time::sleep(after) => {}
        }
        let res = &r.model.resilience;
        let now = tokio::time::Instant::now();
        // Another ready variant, else the fallback.
        let target = self.choose(r.model, None, *tried).or(res
            .fallback
            .filter(|f| *tried & bit(*f) == 0)
            .map(|index| Pick {
                index,
                probability: 1.0,
            }));
        let Some(Pick {
            index: target,
            probability,
        }) = target
        else {
            return (primary.await, None);
        };
        *hedge_probability = probability;
        let Ok(hedge_permit) = r.model.variants[target].health.admit(now) else {
            return (primary.await, None);
        };
        let Some(body) = next_body() else {
            return (primary.await, None);
        };
        *tried |= bit(target);
        let second = self.try_variant(r, target, body, hedge_permit);
        tokio::pin!(second);
        let count = |outcome: &str| {
            res.metrics
                .hedges
                .with_label_values(&[&r.model.name, outcome])
                .inc();
        };
        // The first good answer wins; a failure waits for the other.
        tokio::select! {
            t = &mut primary => {
                if t.failure.is_none() {
                    count("lost");
                    return (t, Some("lost"));
                }
                let s = second.await;
                count(if s.failure.is_none() { "won" } else { "lost" });
                (if s.failure.is_none() { s } else { t }, Some("won"))
            }
            s = &mut second => {
                if s.failure.is_none() {
                    count("won");
                    return (s, Some("won"));
                }
                let t = primary.await;
                count("lost");
                (if t.failure.is_none() { t } else { s }, Some("lost"))
            }
        }
    }

    /// Phase *fall back*: the model's local fallback answers.
    async fn try_fallback(
        &self,
        r: &Ask<'_>,
        index: usize,
        body: LimitedBody,
        reason: &'static str,
    ) -> Option<Tried> {
        let permit = r.model.variants[index]
            .health
            .admit(tokio::time::Instant::now())
            .ok()?;
        r.model
            .resilience
            .metrics
            .fallbacks
            .with_label_values(&[&r.model.name, reason])
            .inc();
        Some(self.try_variant(r, index, body, permit).await)
    }

    /// Phase *forward*: one request to one variant.
    async fn send(
        &self,
        r: &Ask<'_>,
        index: usize,
        body: LimitedBody,
    ) -> Result<Response<ProxyBody>, RouterError> {
        let variant = &r.model.variants[index];
        match &variant.backend {
            Backend::Remote(upstream) => {
                let up_req = upstream_request(
                    variant,
                    upstream,
                    r.model_req,
                    r.parts.clone(),
                    body,
                    r.request_id,
                    r.peer,
                )?;
                upstream
                    .send(up_req)
                    .await
                    .map_err(|e| e.into_router_error(&variant.name))
                    .map(|resp| {
                        let (mut parts, body) = resp.into_parts();
                        strip_hop_by_hop(&mut parts.headers);
                        parts.version = Version::HTTP_11;
                        Response::from_parts(parts, ProxyBody::upstream(body))
                    })
            }
            Backend::Local(local) => {
                let path = r.parts.uri.path();
                let asked = crate::local::Asked {
                    version: r.model_req.version.clone().and_then(|x| path.get(x)),
                    label: r.model_req.label.clone().and_then(|x| path.get(x)),
                };
                local
                    .handle(
                        &r.model.name,
                        r.model_req.protocol,
                        r.model_req.verb,
                        asked,
                        body,
                        r.model.body_limit,
                    )
                    .await
            }
        }
    }

    /// Phase *record*: the decision, for the variant that answered.
    fn record_decision(
        &self,
        model: &ModelRoute,
        model_req: &ModelRequest,
        request_id: &HeaderValue,
        index: usize,
        probability: f64,
        at: Instant,
    ) {
        let Some(ttl) = model.feedback_ttl else {
            return;
        };
        if !model_req.verb.is_prediction() {
            return;
        }
        let recorded = self.decisions.record(
            at,
            request_id.as_bytes(),
            model.index,
            u16::try_from(index).unwrap_or(u16::MAX),
            probability,
            ttl,
        );
        if let feedback::Recorded::Evicted(n) = recorded {
            self.evicted(at, n);
        }
    }
}
