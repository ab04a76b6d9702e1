//! Phase 0, *accept*: the listener loop, idle connections and graceful drain
//! (mini-redis's shape).
//!
//! The caller binds the listener (so tests bind `127.0.0.1:0` and learn the port) and
//! hands over a shutdown future. On shutdown the loop stops accepting, every connection
//! is told to finish its in-flight requests and close, and [`serve`] returns once all
//! have closed or the drain timeout has passed.
//!
//! A connection that has nothing to do is closed after `client_header_timeout`: hyper's
//! header timer does it for HTTP/1.1, and [`StreamCount`] for h2c, whose connections
//! hyper would otherwise keep open, idle, for as long as the client likes.

use std::convert::Infallible;
use std::error::Error as StdError;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use atomic_waker::AtomicWaker;
use http::{Request, Response, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use prometheus::{IntCounter, IntGauge};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// Limits and counters of one listener.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Most connections served at once; beyond it, a new connection is answered 503
    /// and closed (counted in `refused`), rather than left waiting unaccepted.
    pub max_connections: usize,
    /// How long shutdown waits for in-flight requests.
    pub drain_timeout: Duration,
    /// Time a connection gets for its first byte (any protocol); an HTTP/1.1 one, from
    /// opening or from its last answer, to deliver a complete request head; an h2c one,
    /// from opening or from the end of its last stream, to open a stream.
    pub client_header_timeout: Duration,
    /// Gauge of open connections and counter of accepted ones, if this listener is
    /// measured.
    pub connection_metrics: Option<(IntGauge, IntCounter)>,
    /// Counter of connections refused at `max_connections`, if measured.
    pub refused: Option<IntCounter>,
}

/// What a connection beyond `max_connections` is told before it is closed.
const OVER_CAPACITY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: 70\r\nconnection: close\r\nretry-after: 1\r\n\r\n{\"error\":\"too many connections (max_connections); try again shortly\"}\n";

/// Answers `stream` with [`OVER_CAPACITY`] and closes it. What the client already sent
/// is read and discarded (bounded in bytes and time) after our answer, so the close is a
/// FIN, not a reset that could destroy the answer before the client reads it.
async fn refuse(mut stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let bounded = async {
        let _ = stream.write_all(OVER_CAPACITY).await;
        let _ = stream.shutdown().await;
        let mut sink = [0u8; 4096];
        let mut left = 64 * 1024;
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left -= n.min(left),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), bounded).await;
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
    S::Future: Send + Unpin + 'static,
    B: Body + Send + Unpin + 'static,
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
    // Tells connections that the listener is closing; each holds a receiver until it
    // has closed, so the drain is over when none is left.
    let (closing, closing_rx) = tokio::sync::watch::channel(false);
    let permits = Arc::new(Semaphore::new(opts.max_connections));
    tokio::pin!(shutdown);
    loop {
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
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            if let Some(refused) = &opts.refused {
                refused.inc();
            }
            tracing::debug!(%peer, "At max_connections; answering 503 and closing.");
            tokio::spawn(refuse(stream));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let streams = Arc::new(StreamCount::new());
        let service = TowerToHyperService::new(CountStreams {
            inner: make_service(peer),
            streams: streams.clone(),
        });
        let builder = builder.clone();
        let mut closing = closing_rx.clone();
        // Held until the connection has closed: the drain waits for every one.
        let alive = closing_rx.clone();
        let idle_timeout = opts.client_header_timeout;
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
                peeked = tokio::time::timeout(idle_timeout, stream.peek(&mut first)) => {
                    matches!(peeked, Ok(Ok(_)))
                }
                _ = closing.wait_for(|c| *c) => false,
            };
            if spoke {
                let conn = builder.serve_connection(TokioIo::new(stream), service);
                tokio::pin!(conn);
                // Told to close (drain, or idle h2c): hyper finishes the requests in
                // flight (h2: after a GOAWAY) and then the connection future completes.
                // That takes the client's part too (h2 waits for the answer to a PING
                // before its last GOAWAY), so an idle connection, which has nothing in
                // flight, gets the idle timeout again and is then dropped. A drain is
                // bounded as a whole by `serve` (the drain timeout, reported TimedOut).
                let told = PollWhenWoken::new(Box::pin(async move {
                    tokio::select! {
                        _ = closing.wait_for(|c| *c) => None,
                        () = streams.idle_h2(idle_timeout) => {
                            tracing::debug!(%peer, "Closing an idle connection.");
                            Some(idle_timeout)
                        }
                    }
                }));
                // Biased, connection first: it is what wakes this task for every request.
                let ended = tokio::select! {
                    biased;
                    ended = conn.as_mut() => ended,
                    grace = told => {
                        conn.as_mut().graceful_shutdown();
                        match grace {
                            None => conn.await,
                            Some(grace) => match tokio::time::timeout(grace, conn).await {
                                Ok(ended) => ended,
                                Err(_) => {
                                    tracing::debug!(%peer, "Idle connection did not close in time; dropped.");
                                    Ok(())
                                }
                            },
                        }
                    }
                };
                if let Err(e) = ended {
                    tracing::debug!(%peer, error = %e, "Connection ended with an error.");
                }
            } else {
                tracing::debug!(%peer, "Connection closed before its first byte.");
            }
            if let Some((open, _)) = metrics {
                open.dec();
            }
            drop(permit);
            drop(alive);
        });
    }
    let _ = closing.send(true);
    drop(listener);
    drop(closing_rx);
    match tokio::time::timeout(opts.drain_timeout, closing.closed()).await {
        Ok(()) => Drained::Clean,
        Err(_) => Drained::TimedOut,
    }
}

/// A future polled only after its own waker fired. A connection's task is woken for
/// every request, and polling its drain and idle watches each time as well cost about 1%
/// of proxy throughput (`bench/proxy-ab.sh`, BENCHMARKS.md).
struct PollWhenWoken<F> {
    inner: F,
    flag: Arc<WakeFlag>,
    waker: Waker,
}

/// Set by the inner future's waker, which then wakes the task.
#[derive(Default)]
struct WakeFlag {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for WakeFlag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F: Future + Unpin> PollWhenWoken<F> {
    fn new(inner: F) -> Self {
        let flag = Arc::new(WakeFlag::default());
        // Polled the first time round, to arm whatever it waits on.
        flag.woken.store(true, Ordering::Relaxed);
        PollWhenWoken {
            inner,
            waker: Waker::from(flag.clone()),
            flag,
        }
    }
}

impl<F: Future + Unpin> Future for PollWhenWoken<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        // Registered before the flag is read, so a wake in between is not lost.
        this.flag.task.register(cx.waker());
        if !this.flag.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        Pin::new(&mut this.inner).poll(&mut Context::from_waker(&this.waker))
    }
}

/// The open h2 streams of one connection and when it last had none, for its idle timer.
/// Kept with atomics because the service that counts lives in hyper's hands while the
/// connection task reads the count.
#[derive(Debug)]
struct StreamCount {
    /// Set by the first HTTP/1.1 request: hyper's header timer then bounds idleness.
    http1: AtomicBool,
    open: AtomicUsize,
    /// When `open` last fell to zero, in milliseconds after `start`.
    idle_since_ms: AtomicU64,
    start: Instant,
}

impl StreamCount {
    fn new() -> Self {
        StreamCount {
            http1: AtomicBool::new(false),
            open: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            start: Instant::now(),
        }
    }

    /// Resolves once an h2c connection has had no open stream for `timeout` (counting
    /// from its opening when it never had one). Never resolves for HTTP/1.1, whose idle
    /// keep-alive hyper's header timer bounds already; before the first request it runs
    /// from the opening, as that timer does.
    async fn idle_h2(&self, timeout: Duration) {
        loop {
            if self.http1.load(Ordering::Relaxed) {
                return std::future::pending().await;
            }
            let deadline = if self.open.load(Ordering::Acquire) == 0 {
                let since = self.idle_since_ms.load(Ordering::Acquire);
                self.start + Duration::from_millis(since) + timeout
            } else {
                Instant::now() + timeout
            };
            if deadline <= Instant::now() {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// One open h2 stream: counted from the request until its response body is done with.
#[derive(Debug)]
struct StreamGuard(Arc<StreamCount>);

impl StreamGuard {
    fn open(streams: Arc<StreamCount>) -> Self {
        streams.open.fetch_add(1, Ordering::AcqRel);
        StreamGuard(streams)
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let s = &self.0;
        // Written before the count falls, so a timer that sees no open stream never
        // reads the end of an earlier one. (Saturating: no connection lives u64 ms.)
        let ms = u64::try_from(s.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        s.idle_since_ms.store(ms, Ordering::Release);
        s.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Wraps a connection's service to count its h2 streams; an HTTP/1.1 request only marks
/// the connection as such.
#[derive(Clone, Debug)]
struct CountStreams<S> {
    inner: S,
    streams: Arc<StreamCount>,
}

impl<S, B> tower_service::Service<Request<Incoming>> for CountStreams<S>
where
    S: tower_service::Service<Request<Incoming>, Response = Response<B>, Error = Infallible>,
    S::Future: Unpin,
{
    type Response = Response<CountedBody<B>>;
    type Error = Infallible;
    type Future = CountedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let guard = if req.version() == Version::HTTP_2 {
            Some(StreamGuard::open(self.streams.clone()))
        } else {
            self.streams.http1.store(true, Ordering::Relaxed);
            None
        };
        CountedFuture {
            inner: self.inner.call(req),
            guard,
        }
    }
}

/// The wrapped service's future; hands the stream's guard on to the response body.
#[derive(Debug)]
struct CountedFuture<F> {
    inner: F,
    guard: Option<StreamGuard>,
}

impl<F, B> Future for CountedFuture<F>
where
    F: Future<Output = Result<Response<B>, Infallible>> + Unpin,
{
    type Output = Result<Response<CountedBody<B>>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(resp)) => {
                let guard = this.guard.take();
                Poll::Ready(Ok(resp.map(|inner| CountedBody {
                    inner,
                    _guard: guard,
                })))
            }
            Poll::Ready(Err(never)) => match never {},
        }
    }
}

/// A response body that keeps its h2 stream counted until hyper drops it.
#[derive(Debug)]
struct CountedBody<B> {
    inner: B,
    _guard: Option<StreamGuard>,
}

impl<B: Body + Unpin> Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
