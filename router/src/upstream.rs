//! Phase 6, *forward*, for remote variants: a pooled keep-alive client per variant, the
//! rewritten URI, and the classification of failures.
//!
//! HTTP/1.1 upstreams have a pool of our own over hyper's `client::conn::http1`: each
//! connection is driven by the task of the request that holds it, then by the answer's
//! body as the client reads it, and goes back to the pool when that body ends. No task
//! per connection, no hand-off between tasks per request (hyper-util's legacy client
//! spawns each connection and talks to it through a channel; 6–8% of the proxy's
//! samples in the profile, BENCHMARKS.md). h2c and gRPC upstreams multiplex many
//! requests over one connection, which needs a task of its own: they keep hyper-util's
//! client.

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use switchyard_config::{UpstreamProtocol, UpstreamUrl};
use tokio::net::TcpStream;

use crate::body::{BodyTooLarge, ClientBodyError, ClientBodyTimeout, LimitedBody};
use crate::error::{RouterError, UpstreamErrorKind};

/// How many idle connections to one upstream are kept for reuse. A burst of N concurrent
/// requests opens N connections (about 28 KiB each in hyper's client); once it is over,
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

    /// A client for `url`. Must be called within a Tokio runtime.
    pub fn new(
        url: &UpstreamUrl,
        protocol: UpstreamProtocol,
        timeouts: Timeouts,
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
            Clients::Http1(Pool::new(url.authority.clone(), timeouts))
        };
        Ok(Upstream {
            client,
            authority,
            host_header,
            url: url.clone(),
            protocol,
            timeouts,
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

    /// Sends `req` and waits for the response head within the request timeout.
    pub async fn send(
        &self,
        req: Request<LimitedBody>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let timed_out = || {
            SendError::Upstream(
                UpstreamErrorKind::Timeout,
                format!("no response within {:?}", self.timeouts.request),
            )
        };
        match &self.client {
            Clients::Http1(pool) => tokio::time::timeout(self.timeouts.request, pool.send(req))
                .await
                .unwrap_or_else(|_| Err(timed_out())),
            Clients::Multiplexed(client) => {
                match tokio::time::timeout(self.timeouts.request, client.request(req)).await {
                    Err(_) => Err(timed_out()),
                    Ok(Ok(resp)) => Ok(resp.map(|body| UpstreamBody { body, held: None })),
                    Ok(Err(e)) => Err(classify(&e, e.is_connect())),
                }
            }
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

type Http1Connection = http1::Connection<TokioIo<TcpStream>, LimitedBody>;

/// An HTTP/1.1 connection to an upstream: the handle requests are sent through, and
/// the connection itself, which makes progress only while someone polls it.
struct Lease {
    sender: http1::SendRequest<LimitedBody>,
    // Boxed once per connection (not per request): it moves between the pool, a
    // request and an answer's body. `None` once it has ended.
    connection: Option<Pin<Box<Http1Connection>>>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").finish_non_exhaustive()
    }
}

impl Lease {
    /// Lets the connection read and write what it can; `false` once it has closed (the
    /// upstream hung up, or a protocol error). A closed connection is dropped at once:
    /// that fails a request still queued on it, handing the request back unsent.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(connection) = &mut self.connection else {
            return false;
        };
        if connection.as_mut().poll(cx).is_pending() {
            return true;
        }
        self.connection = None;
        false
    }
}

/// The idle keep-alive connections to one HTTP/1.1 upstream, most recently used last.
#[derive(Debug)]
struct Pool {
    /// `host:port`, as configured: resolved on each connect (a Service name may move).
    authority: String,
    timeouts: Timeouts,
    idle: Mutex<Vec<Idle>>,
}

#[derive(Debug)]
struct Idle {
    lease: Lease,
    since: Instant,
}

impl Pool {
    /// A pool, and the task that closes its connections once idle past
    /// `upstream_idle_timeout` (it ends when the pool is dropped, on a reload that
    /// changes the upstream).
    fn new(authority: String, timeouts: Timeouts) -> Arc<Self> {
        let pool = Arc::new(Pool {
            authority,
            timeouts,
            idle: Mutex::new(Vec::new()),
        });
        tokio::spawn(sweep(Arc::downgrade(&pool), timeouts.idle));
        pool
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        // The list is consistent after any panic (a push or a pop): use it as it is.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently used idle connection that is still open and ready for a
    /// request; those closed or idle too long are dropped (which closes them).
    fn checkout(&self, cx: &mut Context<'_>) -> Option<Lease> {
        loop {
            let Idle { mut lease, since } = self.lock().pop()?;
            // Polling it reads what came while it sat idle: an upstream that closed it
            // (or sent something unasked) shows here, before a request is written to it.
            if since.elapsed() < self.timeouts.idle && lease.drive(cx) && lease.sender.is_ready() {
                return Some(lease);
            }
        }
    }

    /// Puts a connection whose exchange has ended back, unless the pool is full or the
    /// connection cannot take another request.
    fn give_back(&self, mut lease: Lease) {
        // One more turn lets hyper finish the exchange (the end of the answer was read)
        // and ask for the next request; no task waits on it here, hence the no-op waker.
        let mut cx = Context::from_waker(std::task::Waker::noop());
        if !lease.drive(&mut cx) || !lease.sender.is_ready() {
            return;
        }
        let mut idle = self.lock();
        if idle.len() < POOL_MAX_IDLE {
            idle.push(Idle {
                lease,
                since: Instant::now(),
            });
        }
    }

    /// Opens a connection within the connect timeout.
    async fn connect(&self) -> Result<Lease, SendError> {
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
        // Nothing is exchanged yet: this only sets the connection up.
        let (sender, connection) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| failed(error_chain(&e)))?;
        Ok(Lease {
            sender,
            connection: Some(Box::pin(connection)),
        })
    }

    /// Sends `req` over an idle connection, or a new one, driving the connection here
    /// until the answer's head has come; the answer's body drives it from then on.
    async fn send(
        self: &Arc<Self>,
        mut req: Request<LimitedBody>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        loop {
            let reused = std::future::poll_fn(|cx| Poll::Ready(self.checkout(cx))).await;
            let was_reused = reused.is_some();
            let mut lease = match reused {
                Some(lease) => lease,
                // Boxed: once per new connection, and it would otherwise enlarge
                // every request's future.
                None => Box::pin(self.connect()).await?,
            };
            let answer = {
                let mut sending = std::pin::pin!(lease.sender.try_send_request(req));
                std::future::poll_fn(|cx| {
                    // The connection writes the request and reads the answer; when it
                    // closes, hyper fails the request, so `sending` always ends.
                    lease.drive(cx);
                    sending.as_mut().poll(cx)
                })
                .await
            };
            match answer {
                Ok(resp) => {
                    let held = lease.connection.is_some().then(|| Held {
                        lease,
                        pool: Arc::clone(self),
                    });
                    return Ok(resp.map(|body| UpstreamBody { body, held }));
                }
                Err(mut e) => match e.take_message() {
                    // A kept-alive connection the upstream closed before the request was
                    // written (the keep-alive race): nothing reached the upstream, so
                    // send it again, on another connection or a new one.
                    Some(back) if was_reused => req = back,
                    _ => {
                        let err = e.into_error();
                        return Err(classify(&err, false));
                    }
                },
            }
        }
    }
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

/// A connection lent to an answer until its body ends.
#[derive(Debug)]
struct Held {
    lease: Lease,
    pool: Arc<Pool>,
}

/// An upstream's answer body. Over HTTP/1.1 it drives its connection as it is read, and
/// gives the connection back to the pool once it has ended; dropped before its end, it
/// closes the connection (nothing else could be sent on it).
#[derive(Debug)]
pub struct UpstreamBody {
    body: Incoming,
    held: Option<Held>,
}

impl UpstreamBody {
    fn give_back(&mut self) {
        if let Some(Held { lease, pool }) = self.held.take() {
            pool.give_back(lease);
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let mut polled = Pin::new(&mut this.body).poll_frame(cx);
        if polled.is_pending() {
            if let Some(held) = &mut this.held {
                // The body asked for more: let the connection read it, then look again.
                if !held.lease.drive(cx) {
                    this.held = None;
                }
                polled = Pin::new(&mut this.body).poll_frame(cx);
            }
        }
        match &polled {
            Poll::Ready(None) => this.give_back(),
            // hyper stops polling once a body says it has ended.
            Poll::Ready(Some(Ok(_))) if this.body.is_end_stream() => this.give_back(),
            // A broken answer: the connection is not reused.
            Poll::Ready(Some(Err(_))) => this.held = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // An empty body (or one whose end nobody polled for) has still ended.
        if self.body.is_end_stream() {
            self.give_back();
        }
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
    let mut source: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(b) = e.downcast_ref::<BodyTooLarge>() {
            return SendError::BodyTooLarge(b.limit);
        }
        if e.downcast_ref::<ClientBodyError>().is_some() {
            return SendError::ClientBody(detail);
        }
        if let Some(t) = e.downcast_ref::<ClientBodyTimeout>() {
            return SendError::ClientBodyTimeout(t.to_string());
        }
        source = e.source();
    }
    // A connect timeout is a connect failure (502, safe to retry elsewhere), not the
    // request timeout (504): nothing reached the upstream.
    if connecting {
        return SendError::Upstream(UpstreamErrorKind::Connect, detail);
    }
    let mut source: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            let kind = if h.is_parse() || h.is_parse_status() || h.is_user() {
                UpstreamErrorKind::Protocol
            } else {
                UpstreamErrorKind::Reset
            };
            return SendError::Upstream(kind, detail);
        }
        if e.downcast_ref::<std::io::Error>().is_some() {
            return SendError::Upstream(UpstreamErrorKind::Reset, detail);
        }
        source = e.source();
    }
    SendError::Upstream(UpstreamErrorKind::Reset, detail)
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
