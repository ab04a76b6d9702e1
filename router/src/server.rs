//! Phase 0, *accept*: the listener loop, idle connections and graceful drain
//! (mini-redis's shape).
//!
//! The caller binds the listener (so tests bind `127.0.0.1:0` and learn the port) and
//! hands over a shutdown future. On shutdown the loop stops accepting, every connection
//! is told to finish its in-flight requests and close, and [`serve`] returns once all
//! have closed or the drain timeout has passed.
//!
//! A connection that has nothing to do is closed after `client_header_timeout`: by
//! [`crate::inbound`]'s head timer for HTTP/1.1, and by [`Exchanges`] for h2c, whose
//! connections hyper would otherwise keep open, idle, for as long as the client likes.
//! A client that takes none of an answer for `client_send_timeout` has its connection
//! closed: by [`crate::inbound`]'s send timer for HTTP/1.1, and by [`Exchanges`]'
//! stalled streams for h2c (hyper's h2 has no send timeout).
//!
//! Each connection is one task ([`Conn`]): it reads the first bytes itself to tell h2c
//! from HTTP/1.1 ([`sniff`]), then serves HTTP/1.1 with our own codec
//! ([`crate::inbound`]; an idle connection gives its buffers back after [`PARK_AFTER`])
//! or hands the socket to hyper's h2 server.

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
use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use prometheus::{IntCounter, IntGauge};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::closing::{Closing, Watch};
use crate::inbound::RequestBody;
use crate::stamp::Stamp;

/// Limits and counters of one listener.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Most connections served at once; beyond it, a new connection is answered 503
    /// and closed (counted in `refused`), rather than left waiting unaccepted.
    pub max_connections: usize,
    /// How long shutdown waits for in-flight requests.
    pub drain_timeout: Duration,
    /// Time a connection gets for its first byte (any protocol); an HTTP/1.1 one, from
    /// opening or from its last answer, to deliver a complete request head (else 408,
    /// or a silent close when it sent nothing); an h2c one,
    /// from opening or from the end of its last stream, to open a stream.
    pub client_header_timeout: Duration,
    /// How long an answer to an HTTP/1.1 client may wait for the client to take any of
    /// it before the connection is closed.
    pub client_send_timeout: Duration,
    /// Gauge of open connections and counter of accepted ones, if this listener is
    /// measured.
    pub connection_metrics: Option<(IntGauge, IntCounter)>,
    /// Counter of connections refused at `max_connections`, if measured.
    pub refused: Option<IntCounter>,
    /// How long an HTTP/1.1 connection stays idle, its last answer written, before it
    /// gives its buffers back and waits for its next request as a bare socket
    /// ("parked"; [`PARK_AFTER`] unless a test says otherwise).
    pub park_after: Duration,
    /// Gauge of parked connections and counter of parkings, if measured.
    pub parked_metrics: Option<(IntGauge, IntCounter)>,
}

/// How long an idle HTTP/1.1 connection keeps its 8 KiB read buffer. Long enough that a
/// client sending back to back, or every few hundred milliseconds, never pays for a
/// fresh buffer per request; short enough that thousands of idle keep-alive clients
/// hold a few KiB each (`bench/connections.sh`).
pub const PARK_AFTER: Duration = Duration::from_secs(1);

/// What a connection beyond `max_connections` is told before it is closed.
const OVER_CAPACITY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: 70\r\nconnection: close\r\nretry-after: 1\r\n\r\n{\"error\":\"too many connections (max_connections); try again shortly\"}\n";

/// Answers `stream` with [`OVER_CAPACITY`] and closes it, as the HTTP/1.1 server closes
/// any connection ([`crate::inbound::linger`]: what the client already sent is read and
/// dropped, bounded, so the close is a FIN, not a reset that could destroy the answer).
async fn refuse(stream: tokio::net::TcpStream) {
    let (io, mut out) = stream.into_split();
    let written = tokio::io::AsyncWriteExt::write_all(&mut out, OVER_CAPACITY);
    if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(1), written).await {
        crate::inbound::linger(out, io).await;
    }
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
    S: ClientService<B>,
    B: ResponseBody,
{
    let h2 = Arc::new(http2::Builder::new(TokioExecutor::new()));
    // Tells connections that the listener is closing; each holds a watch until it has
    // closed, so the drain is over when none is left.
    let closing = Closing::new();
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
        let service = make_service(peer);
        let open = opts.connection_metrics.clone().map(|(open, total)| {
            open.inc();
            total.inc();
            Open(open)
        });
        let conn = Conn {
            peer,
            h2: h2.clone(),
            closing: closing.watch(),
            idle_timeout: opts.client_header_timeout,
            send_timeout: opts.client_send_timeout,
            park_after: opts.park_after,
            parked: opts.parked_metrics.clone(),
            _open: open,
            _permit: permit,
        };
        // The connection's own future, not wrapped in another: every level of async
        // nesting keeps its own copy of the arguments, in every parked connection.
        // Each poll reads the clock once for everything in it ([`crate::clock`]).
        tokio::spawn(crate::clock::Turns::new(conn.serve(stream, service)));
    }
    closing.close();
    drop(listener);
    match tokio::time::timeout(opts.drain_timeout, closing.drained()).await {
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

/// What serves a client connection's requests: made per connection by `serve`'s caller.
pub trait ClientService<B>:
    tower_service::Service<
        Request<RequestBody>,
        Response = Response<B>,
        Error = Infallible,
        Future: Send + Unpin + 'static,
    > + Clone
    + Send
    + Unpin
    + 'static
{
}

impl<S, B> ClientService<B> for S where
    S: tower_service::Service<
            Request<RequestBody>,
            Response = Response<B>,
            Error = Infallible,
            Future: Send + Unpin + 'static,
        > + Clone
        + Send
        + Unpin
        + 'static
{
}

/// The body of an answer to a client, as our HTTP/1.1 and hyper's h2 take it.
pub trait ResponseBody:
    Body<Data = Bytes, Error: Into<Box<dyn StdError + Send + Sync>>> + Send + Unpin + 'static
{
    /// Fields for the answer's head kept out of its map ([`crate::stamp`]): written
    /// after the map's, replacing its fields of the same names.
    fn stamp(&mut self) -> Option<&mut Stamp> {
        None
    }
}

impl ResponseBody for crate::admin::AdminBody {}

impl ResponseBody for http_body_util::Full<Bytes> {}

/// One client connection: what its task needs besides its socket and its service.
struct Conn {
    peer: SocketAddr,
    h2: Arc<http2::Builder<TokioExecutor>>,
    /// Tells of the listener closing. Held until the connection has closed: the drain
    /// is over when no watch is left.
    closing: Watch,
    idle_timeout: Duration,
    send_timeout: Duration,
    park_after: Duration,
    parked: Option<(IntGauge, IntCounter)>,
    /// Counted open until the connection's task ends.
    _open: Option<Open>,
    /// One of `max_connections`, until the connection's task ends.
    _permit: OwnedSemaphorePermit,
}

/// Counts a connection in the open-connections gauge while it lives.
struct Open(IntGauge);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Why the connection task stops hyper's h2.
enum Told {
    /// The listener is closing: finish what is in flight, then close.
    Drain,
    /// An idle h2c connection: GOAWAY, then close.
    Idle,
    /// An h2c answer the client has taken nothing of for `client_send_timeout`: close.
    Stalled,
}

impl Conn {
    /// Sniffs the protocol, then serves the connection until it closes. An `async move`
    /// block, not an `async fn`, which keeps its arguments twice: this future is every
    /// connection's task, idle ones too.
    #[allow(clippy::manual_async_fn)] // on purpose: see above
    fn serve<S, B>(self, mut stream: TcpStream, service: S) -> impl Future<Output = ()>
    where
        S: ClientService<B>,
        B: ResponseBody,
    {
        async move {
            // No byte is served before the protocol is known. A client that connects and
            // says nothing (or half of h2c's preface) gets `client_header_timeout` for it,
            // and nothing once the listener is closing.
            let sniffed = Box::pin(async {
                tokio::select! {
                    sniffed = tokio::time::timeout(self.idle_timeout, sniff(&mut stream)) => {
                        sniffed.ok().flatten()
                    }
                    () = self.closing.closed() => None,
                }
            })
            .await;
            let Some((h2, unread)) = sniffed else {
                tracing::debug!(peer = %self.peer, "Connection closed before its first byte.");
                return;
            };
            if h2 {
                let exchanges = Arc::new(Exchanges::new());
                let service = TowerToHyperService::new(CountExchanges {
                    inner: service,
                    exchanges: exchanges.clone(),
                });
                let io = ClientIo { unread, stream };
                // Boxed: hyper's h2 state would otherwise size every connection's task.
                Box::pin(self.serve_h2(io, service, exchanges)).await;
                return;
            }
            let opts = crate::inbound::Options {
                peer: self.peer,
                header_timeout: self.idle_timeout,
                send_timeout: self.send_timeout,
                park_after: self.park_after,
                parked: self.parked.clone(),
            };
            crate::inbound::serve(stream, &unread, service, opts, &self.closing).await;
        }
    }

    /// h2c: hyper until the client closes, the listener closes, or the connection has
    /// had no open stream for `client_header_timeout`.
    async fn serve_h2<S, B>(
        &self,
        io: ClientIo,
        service: TowerToHyperService<CountExchanges<S>>,
        exchanges: Arc<Exchanges>,
    ) where
        S: ClientService<B>,
        B: ResponseBody,
    {
        let conn = self.h2.serve_connection(TokioIo::new(io), service);
        tokio::pin!(conn);
        let closing = &self.closing;
        let idle_timeout = self.idle_timeout;
        let send_timeout = self.send_timeout;
        // Told to close (drain, or idle): hyper sends GOAWAY, finishes the streams in
        // flight, and waits for the answer to a PING before its last GOAWAY. That takes
        // the client's part, so an idle connection gets the idle timeout again and is
        // then dropped. A drain is bounded as a whole by `serve` (the drain timeout,
        // reported TimedOut). A stalled stream's connection is dropped at once: a
        // graceful close would wait for that very stream.
        let told = PollWhenWoken::new(Box::pin(async move {
            tokio::select! {
                () = closing.closed() => Told::Drain,
                () = exchanges.idle_h2(idle_timeout) => Told::Idle,
                () = exchanges.stalled_h2(send_timeout) => Told::Stalled,
            }
        }));
        // Biased, connection first: it is what wakes this task for every request.
        let ended = tokio::select! {
            biased;
            ended = conn.as_mut() => ended,
            told = told => {
                if matches!(told, Told::Stalled) {
                    // Dropping hyper's connection ends each of its streams with an
                    // error, so their answers' bodies, and what they hold upstream,
                    // are let go.
                    tracing::debug!(
                        peer = %self.peer,
                        "An answer's stream took nothing for client_send_timeout ({send_timeout:?}); closing the connection."
                    );
                    return;
                }
                conn.as_mut().graceful_shutdown();
                if matches!(told, Told::Drain) {
                    conn.await
                } else {
                    tracing::debug!(peer = %self.peer, "Closing an idle connection.");
                    match tokio::time::timeout(idle_timeout, conn).await {
                        Ok(ended) => ended,
                        Err(_) => {
                            tracing::debug!(peer = %self.peer, "Idle connection did not close in time; dropped.");
                            Ok(())
                        }
                    }
                }
            }
        };
        if let Err(e) = ended {
            tracing::debug!(peer = %self.peer, error = %e, "Connection ended with an error.");
        }
    }
}

/// h2c's prior-knowledge preface: a connection that opens with it speaks HTTP/2.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads until the first bytes tell h2c's preface from an HTTP/1.1 request (at most 24
/// bytes; they are handed to hyper before the rest). `Some(true, ..)` for h2c; `None`
/// when the client closed or failed before sending a byte.
async fn sniff(stream: &mut TcpStream) -> Option<(bool, Bytes)> {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut n = 0;
    loop {
        match stream.read(&mut buf[n..]).await {
            Ok(0) | Err(_) => {
                return (n > 0).then(|| (false, Bytes::copy_from_slice(&buf[..n])));
            }
            Ok(read) => n += read,
        }
        if buf[..n] != H2_PREFACE[..n] || n == H2_PREFACE.len() {
            let h2 = buf[..n] == H2_PREFACE[..];
            return Some((h2, Bytes::copy_from_slice(&buf[..n])));
        }
    }
}

/// An h2c client's socket, with the sniff's bytes to be read again first.
struct ClientIo {
    unread: Bytes,
    stream: TcpStream,
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.unread.is_empty() {
            return Pin::new(&mut this.stream).poll_read(cx, buf);
        }
        let n = this.unread.len().min(buf.remaining());
        buf.put_slice(&this.unread.split_to(n));
        if this.unread.is_empty() {
            // An empty slice still holds its allocation.
            this.unread = Bytes::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// One h2c connection's streams: how many are open, and when it last had none, for its
/// idle timer; which answers wait on the client, for its send timer. Atomics, because
/// the service that counts lives in hyper's hands while the connection task reads them.
#[derive(Debug)]
struct Exchanges {
    open: AtomicUsize,
    /// When `open` last fell to zero, in milliseconds after `start`.
    idle_since_ms: AtomicU64,
    start: Instant,
    /// The send timer's period, counted from 0 by [`Exchanges::stalled_h2`].
    epoch: AtomicU64,
    /// Answers' bodies that handed hyper a frame and have not been asked for the next
    /// one since, by the parity of the epoch they handed it in. hyper asks for the next
    /// frame only once the stream's flow-control window has room, so one waiting a whole
    /// period is one whose client has taken none of it. (Two counts, not a time per
    /// stream: the check costs two atomic adds per frame, and no list of streams.)
    waiting: [AtomicUsize; 2],
}

impl Exchanges {
    fn new() -> Self {
        Exchanges {
            open: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            start: Instant::now(),
            epoch: AtomicU64::new(0),
            waiting: [AtomicUsize::new(0), AtomicUsize::new(0)],
        }
    }

    /// Resolves once an answer's body has waited on the client for at least `timeout`
    /// (and at most twice it): at each period's end, bodies still waiting since the
    /// period before have waited one whole period.
    async fn stalled_h2(&self, timeout: Duration) {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + timeout, timeout);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let epoch = self.epoch.load(Ordering::Acquire);
            // The other parity than this period's: the period before, or older.
            if self.waiting[slot(epoch + 1)].load(Ordering::Acquire) > 0 {
                return;
            }
            self.epoch.store(epoch + 1, Ordering::Release);
        }
    }

    /// A body handed hyper a frame: waiting from now. Returns the epoch to give back.
    fn begin_wait(&self) -> u64 {
        let epoch = self.epoch.load(Ordering::Acquire);
        self.waiting[slot(epoch)].fetch_add(1, Ordering::AcqRel);
        epoch
    }

    /// A body was asked for its next frame, or dropped: no longer waiting.
    fn end_wait(&self, epoch: u64) {
        self.waiting[slot(epoch)].fetch_sub(1, Ordering::AcqRel);
    }

    fn idle_since(&self) -> Instant {
        self.start + Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire))
    }

    /// Resolves once an h2c connection has had no open stream for `timeout` (counting
    /// from its opening when it never had one).
    async fn idle_h2(&self, timeout: Duration) {
        loop {
            let deadline = if self.open.load(Ordering::Acquire) == 0 {
                self.idle_since() + timeout
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

/// An epoch's count in [`Exchanges::waiting`].
fn slot(epoch: u64) -> usize {
    usize::from(epoch % 2 == 1)
}

/// One open exchange: counted from the request until its response body is done with.
#[derive(Debug)]
struct ExchangeGuard(Arc<Exchanges>);

impl ExchangeGuard {
    fn open(exchanges: Arc<Exchanges>) -> Self {
        exchanges.open.fetch_add(1, Ordering::AcqRel);
        ExchangeGuard(exchanges)
    }
}

impl Drop for ExchangeGuard {
    fn drop(&mut self) {
        let s = &self.0;
        // Written before the count falls, so a timer that sees none open never reads
        // the end of an earlier one. (Saturating: no connection lives u64 ms.)
        let ms = u64::try_from(s.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        s.idle_since_ms.store(ms, Ordering::Release);
        s.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Wraps a connection's service to count its exchanges.
#[derive(Clone, Debug)]
struct CountExchanges<S> {
    inner: S,
    exchanges: Arc<Exchanges>,
}

impl<S, B> tower_service::Service<Request<Incoming>> for CountExchanges<S>
where
    S: tower_service::Service<Request<RequestBody>, Response = Response<B>, Error = Infallible>,
    S::Future: Unpin,
    B: ResponseBody,
{
    type Response = Response<CountedBody<B>>;
    type Error = Infallible;
    type Future = CountedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        CountedFuture {
            inner: self.inner.call(req.map(RequestBody::from)),
            guard: Some(ExchangeGuard::open(self.exchanges.clone())),
        }
    }
}

/// The wrapped service's future; hands the exchange's guard on to the response body.
#[derive(Debug)]
struct CountedFuture<F> {
    inner: F,
    guard: Option<ExchangeGuard>,
}

impl<F, B> Future for CountedFuture<F>
where
    F: Future<Output = Result<Response<B>, Infallible>> + Unpin,
    B: ResponseBody,
{
    type Output = Result<Response<CountedBody<B>>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(resp)) => {
                // hyper writes the head from its map alone.
                let (mut head, mut inner) = resp.into_parts();
                if let Some(stamp) = inner.stamp() {
                    stamp.to_headers(&mut head.headers);
                }
                let body = CountedBody {
                    inner,
                    guard: this.guard.take(),
                    waiting: None,
                };
                Poll::Ready(Ok(Response::from_parts(head, body)))
            }
            Poll::Ready(Err(never)) => match never {},
        }
    }
}

/// A response body that keeps its exchange open until hyper drops it, and tells the
/// send timer when it waits on the client ([`Exchanges::waiting`]).
#[derive(Debug)]
struct CountedBody<B> {
    inner: B,
    guard: Option<ExchangeGuard>,
    /// The epoch it began waiting in, while it waits.
    waiting: Option<u64>,
}

impl<B: Body + Unpin> Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = &mut *self;
        let Some(guard) = &this.guard else {
            return Pin::new(&mut this.inner).poll_frame(cx);
        };
        if let Some(epoch) = this.waiting.take() {
            guard.0.end_wait(epoch);
        }
        let frame = Pin::new(&mut this.inner).poll_frame(cx);
        // A frame handed over with more to come: hyper asks again once the client has
        // made room. (After the last one hyper asks nothing more, and drops the body.)
        if matches!(frame, Poll::Ready(Some(Ok(_)))) && !this.inner.is_end_stream() {
            this.waiting = Some(guard.0.begin_wait());
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for CountedBody<B> {
    fn drop(&mut self) {
        if let (Some(guard), Some(epoch)) = (&self.guard, self.waiting) {
            guard.0.end_wait(epoch);
        }
    }
}
