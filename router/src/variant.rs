//! One variant as a tower service stack, built per try from borrowed parts (no
//! allocation but the backend's future):
//!
//! ```text
//! Observe        per-variant metrics: status and latency of every answer
//!   Guard        phases *limit* and *break* (crate::breaker): ready only with a slot
//!     Forward    phase *forward*: the remote model server, or the in-process model
//! ```
//!
//! Readiness means something: [`try_ready`] asks the stack once, without waiting, and a
//! variant whose breaker is open or whose in-flight limit is reached answers not ready,
//! so the split ([`crate::split`]) chooses another.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{Response, Version};
use tower::ServiceBuilder;
use tower_service::Service;

use crate::body::{LimitedBody, ProxyBody};
use crate::breaker::{failure_kind, Guard, GuardLayer};
use crate::error::RouterError;
use crate::forward::Ask;
use crate::proxy::{send_http1, strip_hop_by_hop, upstream_request};
use crate::table::{Backend, VariantRoute};

/// A variant's stack, as [`stack`] builds it.
pub(crate) type VariantStack<'a> = Observe<'a, Guard<'a, Forward<'a>>>;

/// What a try on a variant's stack resolves to.
pub(crate) type Answer = Result<Response<ProxyBody>, RouterError>;

/// The stack for `ask`'s model's variant `index`. `panicked`: every variant is ejected
/// and there is no fallback, so only the in-flight limit holds (Envoy's panic routing).
pub(crate) fn stack<'a>(ask: &'a Ask<'a>, index: usize, panicked: bool) -> VariantStack<'a> {
    let variant = &ask.model.variants[index];
    let guard = if panicked {
        GuardLayer::ignoring_breaker(&variant.health)
    } else {
        GuardLayer::new(&variant.health)
    };
    ServiceBuilder::new()
        .layer(ObserveLayer {
            model: &ask.model.name,
            variant,
        })
        .layer(guard)
        .service(Forward { ask, variant })
}

/// Asks a stack whether it takes a request now, without waiting: none of its layers
/// waits to become ready (not ready is an answer), so `Pending` cannot happen and is
/// read as not ready.
pub(crate) fn try_ready(stack: &mut VariantStack<'_>) -> Result<(), RouterError> {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match Service::<LimitedBody>::poll_ready(stack, &mut cx) {
        Poll::Ready(r) => r,
        Poll::Pending => Err(RouterError::NotReady(crate::breaker::NotReady::Full)),
    }
}

/// Phase *forward* as the stack's innermost service.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Forward<'a> {
    ask: &'a Ask<'a>,
    variant: &'a VariantRoute,
}

impl<'a> Service<LimitedBody> for Forward<'a> {
    type Response = Response<ProxyBody>;
    type Error = RouterError;
    // The one allocation per remote try: the backends' futures are `async fn`s,
    // unnameable (a local model's, larger, is boxed again inside).
    type Future = Pin<Box<dyn Future<Output = Answer> + Send + 'a>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), RouterError>> {
        // The pool and the batch queue answer for themselves (a refused connection, a
        // full queue) rather than make the caller wait.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, body: LimitedBody) -> Self::Future {
        match &self.variant.backend {
            // The common case boxed as it is, not inside `send`: one level of nesting
            // less, which would be one more copy of the whole try's future.
            Backend::Remote(upstream) if upstream.is_http1() && self.ask.grpc.is_none() => {
                Box::pin(send_http1(self.variant, upstream, self.ask, body))
            }
            _ => Box::pin(send(self.ask, self.variant, body)),
        }
    }
}

/// One request to one variant, but for HTTP requests to HTTP/1.1 upstreams
/// ([`send_http1`], boxed by [`Forward`] directly).
async fn send(ask: &Ask<'_>, variant: &VariantRoute, body: LimitedBody) -> Answer {
    match &variant.backend {
        Backend::Remote(upstream) => {
            let body = match ask.grpc {
                Some(call) => LimitedBody::replay(call.for_upstream(&variant.upstream_model)),
                None => body,
            };
            let up_req = upstream_request(variant, upstream, ask, body)?;
            upstream
                .send(up_req)
                .await
                .map_err(|e| e.into_router_error(&variant.name))
                .map(|resp| answer(resp.map(ProxyBody::upstream)))
        }
        Backend::Local(local) => {
            let path = ask.parts.uri.path();
            let (version, label) = match ask.grpc {
                Some(call) => (
                    Some(call.version.as_str()).filter(|v| !v.is_empty()),
                    Some(call.label.as_str()).filter(|l| !l.is_empty()),
                ),
                None => (
                    ask.model_req.version.clone().and_then(|x| path.get(x)),
                    ask.model_req.label.clone().and_then(|x| path.get(x)),
                ),
            };
            let asked = crate::local::Asked {
                version,
                label,
                grpc: ask.grpc,
                content_encoding: ask.parts.headers.get(http::header::CONTENT_ENCODING),
                accept_encoding: ask.parts.headers.get(http::header::ACCEPT_ENCODING),
                header_length: ask
                    .parts
                    .headers
                    .get(&crate::v2::INFERENCE_HEADER_CONTENT_LENGTH),
            };
            // Boxed: the local runtime's future is larger than the upstream exchange
            // and would make every remote try's future (boxed per try) as large.
            Box::pin(local.handle(
                &ask.model.name,
                ask.model_req.protocol,
                ask.model_req.verb,
                asked,
                body,
                ask.model.body_limit,
            ))
            .await
        }
    }
}

/// An upstream's answer as the client gets it: its hop-by-hop fields removed (ours are
/// the server's to set), in HTTP/1.1 terms whatever the upstream spoke.
pub(crate) fn answer(mut resp: Response<ProxyBody>) -> Response<ProxyBody> {
    strip_hop_by_hop(resp.headers_mut());
    *resp.version_mut() = Version::HTTP_11;
    resp
}

/// Counts every answer of a variant in its metrics (status, latency, upstream error
/// kind) and logs failed tries at debug level.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ObserveLayer<'a> {
    model: &'a str,
    variant: &'a VariantRoute,
}

impl<'a, S> tower::Layer<S> for ObserveLayer<'a> {
    type Service = Observe<'a, S>;

    fn layer(&self, inner: S) -> Observe<'a, S> {
        Observe {
            inner,
            layer: *self,
        }
    }
}

/// See [`ObserveLayer`].
#[derive(Debug)]
pub(crate) struct Observe<'a, S> {
    inner: S,
    layer: ObserveLayer<'a>,
}

impl<'a, S, Req> Service<Req> for Observe<'a, S>
where
    S: Service<Req, Response = Response<ProxyBody>, Error = RouterError>,
{
    type Response = Response<ProxyBody>;
    type Error = RouterError;
    type Future = ObserveFuture<'a, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), RouterError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        ObserveFuture {
            inner: self.inner.call(req),
            layer: self.layer,
            started: crate::clock::now_std(),
        }
    }
}

pin_project_lite::pin_project! {
    /// A try being observed.
    pub(crate) struct ObserveFuture<'a, F> {
        #[pin]
        inner: F,
        layer: ObserveLayer<'a>,
        started: Instant,
    }
}

impl<F: Future<Output = Answer>> Future for ObserveFuture<'_, F> {
    type Output = Answer;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Answer> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        let variant = this.layer.variant;
        let status = match &result {
            Ok(resp) => resp.status().as_u16(),
            Err(e) => {
                if let RouterError::Upstream { kind, .. } = e {
                    variant.metrics.upstream_error(*kind);
                }
                e.status().as_u16()
            }
        };
        variant.metrics.record(
            status,
            crate::clock::now_std()
                .saturating_duration_since(*this.started)
                .as_secs_f64(),
        );
        if let (Some(kind), Err(e)) = (failure_kind(&result), &result) {
            tracing::debug!(model = %this.layer.model, variant = %variant.name, kind, error = %e, "A try failed.");
        }
        Poll::Ready(result)
    }
}
