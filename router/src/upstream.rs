//! Phase 6, *forward*, for remote variants: a pooled keep-alive client per variant, the
//! rewritten URI, and the classification of failures.

use std::error::Error as StdError;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
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
    client: Client<Connector, LimitedBody>,
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
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeouts.connect));
        // Predictions are small request/response pairs: Nagle would only add latency.
        connector.set_nodelay(true);
        let mut builder = Client::builder(TokioExecutor::new());
        builder.pool_idle_timeout(timeouts.idle);
        // Without a timer the pool never sweeps: an idle connection past its timeout is
        // only noticed when a checkout reaches it, and the pool hands out the most
        // recently used first, so after a burst the rest stayed open (and held their
        // memory) for as long as traffic kept coming.
        builder.pool_timer(TokioTimer::new());
        builder.pool_max_idle_per_host(POOL_MAX_IDLE);
        if protocol.is_http2() {
            builder.http2_only(true);
        }
        Ok(Upstream {
            client: builder.build(Connector(connector)),
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
        Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
            .map_err(|e| bad(&e))
    }

    /// Sends `req` and waits for the response head within the request timeout.
    pub async fn send(&self, req: Request<LimitedBody>) -> Result<Response<Incoming>, SendError> {
        match tokio::time::timeout(self.timeouts.request, self.client.request(req)).await {
            Err(_) => Err(SendError::Upstream(
                UpstreamErrorKind::Timeout,
                format!("no response within {:?}", self.timeouts.request),
            )),
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(classify(&e)),
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

/// Sorts a client error into the failure kinds operators act on differently.
fn classify(err: &hyper_util::client::legacy::Error) -> SendError {
    let detail = error_chain(err);
    // The client's own body failures travel inside the client error: find them first.
    let mut source: Option<&(dyn StdError + 'static)> = err.source();
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
    if err.is_connect() {
        return SendError::Upstream(UpstreamErrorKind::Connect, detail);
    }
    let mut source: Option<&(dyn StdError + 'static)> = err.source();
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
