//! Phase 6, *forward*, for remote variants: a pooled keep-alive client per variant, the
//! rewritten URI, and the classification of failures.
//!
//! HTTP/1.1 upstreams have a pool of our own over our own codec ([`crate::h1`]): each
//! connection is read and written by the task of the request that holds it, then by
//! the answer's body as the client reads it, and goes back to the pool when that body
//! ends. No task per connection, no hand-off between tasks per request (hyper-util's
//! legacy client spawns each connection and talks to it through a channel; 6–8% of the
//! proxy's samples in the profile, BENCHMARKS.md). h2c and gRPC upstreams multiplex many
//! requests over one connection, which needs a task of its own: they keep hyper-util's
//! client.

use std::error::Error as StdError;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use switchyard_config::{UpstreamProtocol, UpstreamUrl};
use tokio::net::TcpStream;

use crate::body::{BodyTooLarge, ClientBodyError, ClientBodyTimeout, LimitedBody, Stall};
use crate::error::{RouterError, UpstreamErrorKind};
use crate::h1;
use crate::metrics::UpstreamErrors;

/// How many idle connections to one upstream are kept for reuse. A burst of N concurrent
/// requests opens N connections (each keeps a read buffer of 8 KiB or more); once it is over,
/// keeping them all until `upstream_idle_timeout` holds memory that steady traffic never
/// uses. 64 is nginx's usual `keepalive 64`; more than that many in flight still works,
/// the extra connections are just closed when they finish instead of pooled.
const POOL_MAX_IDLE: usize = 64;

/// An upstream client's time limits (`connect_timeout`, `request_timeout`,
/// `upstream_idle_timeout`, each after the variant's and model's overrides).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Time allowed to open a connection.
    pub connect: Duration,
    /// Time allowed for the response head.
    pub request: Duration,
    /// How long a pooled connection may sit idle before it is closed.
    pub idle: Duration,
}

/// A remote model server and the client that talks to it.
#[derive(Debug)]
pub struct Upstream {
    client: Clients,
    authority: Authority,
    /// `host:port`, sent as `Host` to HTTP/1.1 upstreams.
    pub host_header: HeaderValue,
    url: UpstreamUrl,
    /// HTTP/1.1 or h2c.
    pub protocol: UpstreamProtocol,
    timeouts: Timeouts,
    /// The variant's `switchyard_upstream_errors_total`, for failures of answer bodies
    /// (the head's are counted where the try ends).
    errors: UpstreamErrors,
}

/// Why an upstream exchange failed, before it becomes a [`RouterError`].
#[derive(Debug)]
pub enum SendError {
    /// The upstream failed.
    Upstream(UpstreamErrorKind, String),
    /// The client sent more than the body limit.
    BodyTooLarge(u64),
    /// The client's body broke.
    ClientBody(String),
    /// The client's body stalled.
    ClientBodyTimeout(String),
}

impl SendError {
    /// The router error for `variant`.
    pub fn into_router_error(self, variant: &str) -> RouterError {
        match self {
            SendError::Upstream(kind, detail) => RouterError::Upstream {
                variant: variant.to_string(),
                kind,
                detail,
            },
            SendError::BodyTooLarge(limit) => RouterError::BodyTooLarge { limit },
            SendError::ClientBody(detail) => RouterError::ClientBody(detail),
            SendError::ClientBodyTimeout(detail) => RouterError::ClientBodyTimeout(detail),
        }
    }
}

impl Upstream {
    /// Whether a reloaded variant's settings are this client's: then it is kept, with
    /// its pooled connections.
    pub fn same_settings(
        &self,
        url: &UpstreamUrl,
        protocol: UpstreamProtocol,
        timeouts: Timeouts,
    ) -> bool {
        self.url == *url && self.protocol == protocol && self.timeouts == timeouts
    }

    /// A client for `url` that counts its answer bodies' failures in `errors`. Must be
    /// called within a Tokio runtime.
    pub fn new(
        url: &UpstreamUrl,
        protocol: UpstreamProtocol,
        timeouts: Timeouts,
        errors: UpstreamErrors,
    ) -> Result<Self, String> {
        let authority: Authority = url
            .authority
            .parse()
            .map_err(|e| format!("bad upstream authority `{}`: {e}", url.authority))?;
        let host_header = HeaderValue::from_str(&url.authority)
            .map_err(|e| format!("bad upstream authority `{}`: {e}", url.authority))?;
        let client = if protocol.is_http2() {
            let mut connector = HttpConnector::new();
            connector.set_connect_timeout(Some(timeouts.connect));
            // Predictions are small request/response pairs: Nagle would only add latency.
            connector.set_nodelay(true);
            let mut builder = Client::builder(TokioExecutor::new());
            builder.pool_idle_timeout(timeouts.idle);
            // Without a timer the pool never sweeps: an idle connection past its timeout
            // is only noticed when a checkout reaches it.
            builder.pool_timer(TokioTimer::new());
            builder.pool_max_idle_per_host(POOL_MAX_IDLE);
            builder.http2_only(true);
            Clients::Multiplexed(Box::new(builder.build(Connector(connector))))
        } else {
            Clients::Http1(Pool::new(url.authority.clone(), timeouts, errors.clone()))
        };
        Ok(Upstream {
            client,
            authority,
            host_header,
            url: url.clone(),
            protocol,
            timeouts,
            errors,
        })
    }

    /// The upstream URI for a client's `uri`, whose model name occupies `model` in its
    /// path, with `upstream_model` substituted and the query kept.
    pub fn uri(
        &self,
        client: &Uri,
        model: std::ops::Range<usize>,
        upstream_model: &str,
    ) -> Result<Uri, RouterError> {
        let path = client.path();
        let bad = |e: &dyn std::fmt::Display| {
            RouterError::BadPath(format!("cannot forward path `{path}`: {e}"))
        };
        let pq = match client.path_and_query() {
            // Nothing to rewrite (no prefix, the same model name; gRPC's paths): the
            // client's own bytes, shared rather than copied.
            Some(pq)
                if self.url.prefix.is_empty()
                    && path.get(model.clone()) == Some(upstream_model) =>
            {
                pq.clone()
            }
            _ => PathAndQuery::try_from(self.url.path_for(
                path,
                model,
                upstream_model,
                client.query(),
            ))
            .map_err(|e| bad(&e))?,
        };
        match &self.client {
            // HTTP/1.1 sends the origin form (`/path?query`); the pool knows the host.
            Clients::Http1(_) => Ok(Uri::from(pq)),
            Clients::Multiplexed(_) => Uri::builder()
                .scheme(Scheme::HTTP)
                .authority(self.authority.clone())
                .path_and_query(pq)
                .build()
                .map_err(|e| bad(&e)),
        }
    }

    /// Whether requests go out over HTTP/1.1 ([`Upstream::send_http1`]) rather than
    /// h2c ([`Upstream::send`]).
    pub fn is_http1(&self) -> bool {
        matches!(self.client, Clients::Http1(_))
    }

    /// Sends a request to an HTTP/1.1 upstream over an idle connection, or a new one,
    /// and reads the answer's head within the request timeout; the answer's body reads
    /// the rest and gives the connection back.
    ///
    /// One `async move` block, not an `async fn` calling the pool's: each level kept its
    /// own copy of the body it passed down, and a try's future is boxed once per
    /// request, where size matters (see [`crate::proxy::Router::handle`]).
    pub fn send_http1<'a, 'b>(
        &'a self,
        head: &'a h1::RequestHead<'b>,
        body: LimitedBody,
    ) -> impl std::future::Future<Output = Result<Response<UpstreamBody>, SendError>> + Send + use<'a, 'b>
    {
        let deadline = crate::clock::now() + self.timeouts.request;
        let mut unsent = h1::Unsent {
            first: None,
            body: Some(body),
        };
        async move {
            let Clients::Http1(pool) = &self.client else {
                return Err(SendError::Upstream(
                    UpstreamErrorKind::Protocol,
                    "this upstream speaks HTTP/2".into(),
                ));
            };
            loop {
                let reused = pool.checkout();
                let was_reused = reused.is_some();
                let conn = match reused {
                    Some(conn) => conn,
                    // Boxed: once per new connection, and it would otherwise enlarge
                    // every request's future.
                    None => tokio::time::timeout_at(deadline, Box::pin(pool.connect()))
                        .await
                        .unwrap_or_else(|_| Err(timed_out(self.timeouts.request)))?,
                };
                match conn.exchange(head, unsent, was_reused, deadline).await {
                    Ok(resp) => {
                        return Ok(resp.map(|answer| UpstreamBody {
                            inner: Inner::Http1 {
                                answer,
                                pool: Some(Arc::clone(pool)),
                            },
                            stall: Stall::new(self.timeouts.request),
                        }))
                    }
                    // A kept-alive connection the upstream had closed: nothing reached
                    // the upstream, so send it again, on another connection or a new one.
                    Err(h1::Failed::Stale(back)) => unsent = back,
                    Err(h1::Failed::TimedOut) => return Err(timed_out(self.timeouts.request)),
                    Err(h1::Failed::Error(e)) => return Err(h1_error(e)),
                }
            }
        }
    }

    /// Sends `req` to an h2c or gRPC upstream and waits for the response head within
    /// the request timeout.
    pub async fn send(
        &self,
        req: Request<LimitedBody>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let Clients::Multiplexed(client) = &self.client else {
            return Err(SendError::Upstream(
                UpstreamErrorKind::Protocol,
                "this upstream speaks HTTP/1.1".into(),
            ));
        };
        match tokio::time::timeout(self.timeouts.request, client.request(req)).await {
            Err(_) => Err(timed_out(self.timeouts.request)),
            Ok(Ok(resp)) => Ok(resp.map(|body| UpstreamBody {
                inner: Inner::Multiplexed(body, self.errors.clone()),
                stall: Stall::new(self.timeouts.request),
            })),
            Ok(Err(e)) => Err(classify(&e, e.is_connect())),
        }
    }
}

/// The clients of one upstream, by protocol.
#[derive(Debug)]
enum Clients {
    /// HTTP/1.1: our pool, connections driven by the requests that use them.
    Http1(Arc<Pool>),
    /// h2c and gRPC: hyper-util's client, a task per connection.
    Multiplexed(Box<Client<Connector, LimitedBody>>),
}

/// The idle keep-alive connections to one HTTP/1.1 upstream, most recently used last.
#[derive(Debug)]
struct Pool {
    /// `host:port`, as configured: resolved on each connect (a Service name may move).
    authority: String,
    timeouts: Timeouts,
    idle: Mutex<Vec<Idle>>,
    /// Its upstream's [`Upstream::errors`], reached by answer bodies through the pool
    /// they hold until they end.
    errors: UpstreamErrors,
}

#[derive(Debug)]
struct Idle {
    conn: Box<h1::Conn>,
    since: Instant,
}

impl Pool {
    /// A pool, and the task that closes its connections once idle past
    /// `upstream_idle_timeout` (it ends when the pool is dropped, on a reload that
    /// changes the upstream).
    fn new(authority: String, timeouts: Timeouts, errors: UpstreamErrors) -> Arc<Self> {
        let pool = Arc::new(Pool {
            authority,
            timeouts,
            idle: Mutex::new(Vec::new()),
            errors,
        });
        tokio::spawn(sweep(Arc::downgrade(&pool), timeouts.idle));
        pool
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        // The list is consistent after any panic (a push or a pop): use it as it is.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently used idle connection that is still open; those closed by the
    /// upstream or idle too long are dropped (which closes them).
    fn checkout(&self) -> Option<Box<h1::Conn>> {
        loop {
            let Idle { conn, since } = self.lock().pop()?;
            let idle = crate::clock::now_std().saturating_duration_since(since);
            if idle < self.timeouts.idle && conn.is_open() {
                return Some(conn);
            }
        }
    }

    /// Puts a connection whose exchange has ended back, unless the pool is full.
    fn give_back(&self, conn: Box<h1::Conn>) {
        let mut idle = self.lock();
        if idle.len() < POOL_MAX_IDLE {
            idle.push(Idle {
                conn,
                since: crate::clock::now_std(),
            });
        }
    }

    /// Opens a connection within the connect timeout.
    async fn connect(&self) -> Result<Box<h1::Conn>, SendError> {
        let failed = |detail: String| SendError::Upstream(UpstreamErrorKind::Connect, detail);
        let stream =
            match tokio::time::timeout(self.timeouts.connect, TcpStream::connect(&*self.authority))
                .await
            {
                Err(_) => {
                    return Err(failed(format!(
                        "cannot connect to {}: no connection within {:?}",
                        self.authority, self.timeouts.connect
                    )))
                }
                Ok(Err(e)) => {
                    return Err(failed(format!("cannot connect to {}: {e}", self.authority)))
                }
                Ok(Ok(stream)) => stream,
            };
        // Predictions are small request/response pairs: Nagle would only add latency.
        stream
            .set_nodelay(true)
            .map_err(|e| failed(format!("cannot set TCP_NODELAY: {e}")))?;
        Ok(h1::Conn::new(stream))
    }
}

/// No answer's head within the request timeout.
fn timed_out(after: Duration) -> SendError {
    SendError::Upstream(
        UpstreamErrorKind::Timeout,
        format!("no response within {after:?}"),
    )
}

/// Closes idle connections past the timeout, checking a few times per timeout; ends with
/// the pool.
async fn sweep(pool: Weak<Pool>, timeout: Duration) {
    let every = (timeout / 2).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        // Dropped outside the lock: closing a socket is a system call.
        let expired: Vec<Idle> = {
            let mut idle = pool.lock();
            // Oldest first: the expired ones are a prefix.
            let n = idle
                .iter()
                .take_while(|i| i.since.elapsed() >= timeout)
                .count();
            idle.drain(..n).collect()
        };
        drop(expired);
    }
}

/// An upstream's answer body. Over HTTP/1.1 it reads its connection as it is read, and
/// gives the connection back to the pool once it has ended; dropped before its end, it
/// closes the connection (nothing else could be sent on it). An upstream that pauses
/// longer than `request_timeout` between two pieces of it (nginx's
/// `proxy_read_timeout`) fails it with [`AnswerStalled`]. Its failures count in the
/// variant's `switchyard_upstream_errors_total`: a stall as `timeout`, a broken
/// connection as `reset`, a malformed body as `protocol`.
#[derive(Debug)]
pub struct UpstreamBody {
    inner: Inner,
    stall: Stall,
}

/// An upstream paused its answer's body longer than `request_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("the upstream sent nothing more of its answer for {0:?} (request_timeout)")]
pub struct AnswerStalled(pub Duration);

#[derive(Debug)]
enum Inner {
    Http1 {
        answer: h1::Answer,
        /// Where the connection goes back to; `None` once it has.
        pool: Option<Arc<Pool>>,
    },
    Multiplexed(Incoming, UpstreamErrors),
}

/// Errors of an answer's body, as the server that passes it on takes them.
pub type BodyError = Box<dyn StdError + Send + Sync>;

impl Inner {
    /// Where a failure is counted; `None` once an HTTP/1.1 answer has ended.
    fn errors(&self) -> Option<&UpstreamErrors> {
        match self {
            Inner::Http1 { pool, .. } => pool.as_deref().map(|p| &p.errors),
            Inner::Multiplexed(_, errors) => Some(errors),
        }
    }
}

impl UpstreamBody {
    fn give_back(&mut self) {
        if let Inner::Http1 { answer, pool } = &mut self.inner {
            if let (Some(conn), Some(pool)) = (answer.reusable(), pool.take()) {
                pool.give_back(conn);
            }
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let polled: Poll<Option<Result<Frame<Bytes>, BodyError>>> = match &mut this.inner {
            Inner::Multiplexed(body, errors) => Pin::new(body).poll_frame(cx).map_err(|e| {
                errors.inc(hyper_kind(&e));
                e.into()
            }),
            Inner::Http1 { answer, pool } => {
                let polled = Pin::new(&mut *answer).poll_frame(cx);
                if let (Poll::Ready(Some(Err(e))), Some(pool)) = (&polled, pool) {
                    if let Some(kind) = h1_kind(e) {
                        pool.errors.inc(kind);
                    }
                }
                // The server stops polling once a body says it has ended.
                if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Ok(_))))
                    && answer.is_end_stream()
                {
                    this.give_back();
                }
                polled.map_err(Into::into)
            }
        };
        match polled {
            Poll::Ready(Some(Ok(_))) => this.stall.progressed(),
            Poll::Pending if this.stall.expired(cx) => {
                if let Some(errors) = this.inner.errors() {
                    errors.inc(UpstreamErrorKind::Timeout);
                }
                return Poll::Ready(Some(Err(Box::new(AnswerStalled(this.stall.after())))));
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Http1 { answer, .. } => answer.is_end_stream(),
            Inner::Multiplexed(body, _) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Http1 { answer, .. } => answer.size_hint(),
            Inner::Multiplexed(body, _) => body.size_hint(),
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // An empty body (or one whose end nobody polled for) has still ended.
        self.give_back();
    }
}

/// hyper-util's `HttpConnector`, minus the connection facts it has the client copy into
/// every response's extensions (`HttpInfo`: the two addresses): three allocations per
/// request (`bench/allocations.sh`) for something nothing here reads.
#[derive(Clone, Debug)]
struct Connector(HttpConnector);

/// A TCP connection to an upstream, as `HttpConnector` opened it.
#[derive(Debug)]
struct Socket(TokioIo<TcpStream>);

type Connecting = Pin<
    Box<dyn std::future::Future<Output = Result<Socket, Box<dyn StdError + Send + Sync>>> + Send>,
>;

impl tower_service::Service<Uri> for Connector {
    type Response = Socket;
    type Error = Box<dyn StdError + Send + Sync>;
    // Once per new connection, not per request: a box is fine here.
    type Future = Connecting;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.0.call(uri);
        Box::pin(async move { Ok(Socket(connecting.await?)) })
    }
}

impl Connection for Socket {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for Socket {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Socket {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
}

/// Sorts a client error into the failure kinds operators act on differently;
/// `connecting` when it came while opening a connection.
fn classify(err: &(dyn StdError + 'static), connecting: bool) -> SendError {
    let detail = error_chain(err);
    // The client's own body failures travel inside the client error: find them first.
    if let Some(e) = client_body_error(err, &detail) {
        return e;
    }
    // A connect timeout is a connect failure (502, safe to retry elsewhere), not the
    // request timeout (504): nothing reached the upstream.
    if connecting {
        return SendError::Upstream(UpstreamErrorKind::Connect, detail);
    }
    let mut source: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            return SendError::Upstream(hyper_kind(h), detail);
        }
        if e.downcast_ref::<std::io::Error>().is_some() {
            return SendError::Upstream(UpstreamErrorKind::Reset, detail);
        }
        source = e.source();
    }
    SendError::Upstream(UpstreamErrorKind::Reset, detail)
}

/// The client's body failure somewhere in `err`'s chain, if that is what failed.
fn client_body_error(err: &(dyn StdError + 'static), detail: &str) -> Option<SendError> {
    let mut source: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(b) = e.downcast_ref::<BodyTooLarge>() {
            return Some(SendError::BodyTooLarge(b.limit));
        }
        if e.downcast_ref::<ClientBodyError>().is_some() {
            return Some(SendError::ClientBody(detail.to_string()));
        }
        if let Some(t) = e.downcast_ref::<ClientBodyTimeout>() {
            return Some(SendError::ClientBodyTimeout(t.to_string()));
        }
        source = e.source();
    }
    None
}

/// Sorts an HTTP/1.1 exchange's failure like [`classify`] does hyper's.
fn h1_error(err: h1::H1Error) -> SendError {
    let detail = error_chain(&err);
    match err {
        h1::H1Error::Body(e) => {
            client_body_error(&*e, &detail).unwrap_or(SendError::ClientBody(detail))
        }
        // Every other error is the upstream's.
        err => SendError::Upstream(h1_kind(&err).unwrap_or(UpstreamErrorKind::Reset), detail),
    }
}

/// The upstream's failure an HTTP/1.1 error is, by kind; `None` for a failure of the
/// body being sent (the client's request body: its business, not the upstream's).
fn h1_kind(err: &h1::H1Error) -> Option<UpstreamErrorKind> {
    match err {
        h1::H1Error::Io(_) | h1::H1Error::Closed(_) => Some(UpstreamErrorKind::Reset),
        h1::H1Error::Malformed(_) => Some(UpstreamErrorKind::Protocol),
        h1::H1Error::Body(_) => None,
    }
}

/// The upstream's failure a hyper error on an open connection is, by kind.
fn hyper_kind(err: &hyper::Error) -> UpstreamErrorKind {
    if err.is_parse() || err.is_parse_status() || err.is_user() {
        UpstreamErrorKind::Protocol
    } else {
        UpstreamErrorKind::Reset
    }
}

/// `a: b: c` from an error and its sources, for messages.
fn error_chain(err: &dyn StdError) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        let s = e.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        source = e.source();
    }
    text
}
