//! Phase 0, *accept*: the listener loop and graceful drain (mini-redis's shape).
//!
//! The caller binds the listener (so tests bind `127.0.0.1:0` and learn the port) and
//! hands over a shutdown future. On shutdown the loop stops accepting, every connection
//! is told to finish its in-flight requests and close, and [`serve`] returns once all
//! have closed or the drain timeout has passed.

use std::convert::Infallible;
use std::error::Error as StdError;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use prometheus::{IntCounter, IntGauge};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Limits and counters of one listener.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Most connections served at once; beyond it, new connections wait in the kernel's
    /// accept queue.
    pub max_connections: usize,
    /// How long shutdown waits for in-flight requests.
    pub drain_timeout: Duration,
    /// Time a connection gets for its first byte (any protocol), and an HTTP/1.1 one,
    /// from opening or from its last answer, to deliver a complete request head.
    pub client_header_timeout: Duration,
    /// Gauge of open connections and counter of accepted ones, if this listener is
    /// measured.
    pub connection_metrics: Option<(IntGauge, IntCounter)>,
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Every connection closed after finishing its requests.
    Clean,
    /// The drain timeout passed with connections still open; they are dropped.
    TimedOut,
}

/// Serves connections from `listener` with services made by `make_service` until
/// `shutdown` resolves, then drains.
pub async fn serve<F, S, B>(
    listener: TcpListener,
    make_service: F,
    shutdown: impl Future<Output = ()>,
    opts: ServeOptions,
) -> Drained
where
    F: Fn(SocketAddr) -> S,
    S: tower_service::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper enforces its header read timeout only with a timer, and without one a
    // client that sends half a request head (or nothing, on a kept-alive connection)
    // would hold its connection, and one of `max_connections`, forever.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(opts.client_header_timeout);
    let graceful = GracefulShutdown::new();
    // Tells connections still waiting for their first byte that the listener is closing.
    let (closing, closing_rx) = tokio::sync::watch::channel(false);
    let permits = Arc::new(Semaphore::new(opts.max_connections));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            biased;
            () = &mut shutdown => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning; the loop goes on.
                    tracing::warn!(error = %e, "Accept failed; retrying shortly.");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(make_service(peer));
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let mut closing = closing_rx.clone();
        let first_byte_timeout = opts.client_header_timeout;
        let metrics = opts.connection_metrics.clone();
        if let Some((open, total)) = &metrics {
            open.inc();
            total.inc();
        }
        tokio::spawn(async move {
            // hyper-util reads the first bytes to tell HTTP/1.1 from h2c with no timeout
            // of its own: a client that connects and says nothing would sit there
            // forever. It gets `client_header_timeout` for its first byte (EOF counts),
            // and nothing once the listener is closing.
            // (`peek`, not `readable`: tokio reports a new socket readable before any
            // byte has come.)
            let mut first = [0u8; 1];
            let spoke = tokio::select! {
                peeked = tokio::time::timeout(first_byte_timeout, stream.peek(&mut first)) => {
                    matches!(peeked, Ok(Ok(_)))
                }
                _ = closing.wait_for(|c| *c) => false,
            };
            if spoke {
                let conn = builder.serve_connection(TokioIo::new(stream), service);
                if let Err(e) = watcher.watch(conn).await {
                    tracing::debug!(%peer, error = %e, "Connection ended with an error.");
                }
            } else {
                tracing::debug!(%peer, "Connection closed before its first byte.");
            }
            if let Some((open, _)) = metrics {
                open.dec();
            }
            drop(permit);
        });
    }
    let _ = closing.send(true);
    drop(listener);
    match tokio::time::timeout(opts.drain_timeout, graceful.shutdown()).await {
        Ok(()) => Drained::Clean,
        Err(_) => Drained::TimedOut,
    }
}
