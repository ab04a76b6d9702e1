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
use hyper_util::rt::{TokioExecutor, TokioIo};
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
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
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
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        let metrics = opts.connection_metrics.clone();
        if let Some((open, total)) = &metrics {
            open.inc();
            total.inc();
        }
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "Connection ended with an error.");
            }
            if let Some((open, _)) = metrics {
                open.dec();
            }
            drop(permit);
        });
    }
    drop(listener);
    match tokio::time::timeout(opts.drain_timeout, graceful.shutdown()).await {
        Ok(()) => Drained::Clean,
        Err(_) => Drained::TimedOut,
    }
}
