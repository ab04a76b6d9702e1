//! Phase 0, *accept*: the listener loop, idle connections and graceful drain
//! (mini-redis's shape).
//!
//! The caller binds the listener (so tests bind `127.0.0.1:0` and learn the port) and
//! hands over a shutdown future. On shutdown the loop stops accepting, every connection
//! is told to finish its in-flight requests and close, and [`serve`] returns once all
//! have closed or the drain timeout has passed.
//!
//! A connection that has nothing to do is closed after `client_header_timeout`: hyper's
//! header timer does it for HTTP/1.1 (and our own timer while the connection is parked),
//! and [`Exchanges`] for h2c, whose connections hyper would otherwise keep open, idle,
//! for as long as the client likes.
//!
//! Each connection is one task ([`Conn`]): it reads the first bytes itself to tell h2c
//! from HTTP/1.1 ([`sniff`]), then hands the socket to hyper. An HTTP/1.1 connection idle
//! for [`PARK_AFTER`] is *parked*: its hyper, and with it 16 KiB of buffers, is dropped,
//! the socket kept, and a fresh hyper made when the client sends its next request.

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
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus::{IntCounter, IntGauge};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
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
    /// How long an HTTP/1.1 connection stays idle, its last answer written, before it
    /// gives hyper's buffers back and waits for its next request as a bare socket
    /// ("parked"; [`PARK_AFTER`] unless a test says otherwise).
    pub park_after: Duration,
    /// Gauge of parked connections and counter of parkings, if measured.
    pub parked_metrics: Option<(IntGauge, IntCounter)>,
}

/// How long an idle HTTP/1.1 connection keeps hyper's 16 KiB of buffers. Long enough
/// that a client sending back to back, or every few hundred milliseconds, never pays for
/// a fresh hyper per request; short enough that thousands of idle keep-alive clients
/// hold a few KiB each, not 21 (`bench/connections.sh`).
pub const PARK_AFTER: Duration = Duration::from_secs(1);

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
    S: ClientService<B>,
    B: ResponseBody,
{
    let mut h1 = http1::Builder::new();
    // hyper enforces its header read timeout only with a timer, and without one a
    // client that sends half a request head (or nothing, on a kept-alive connection)
    // would hold its connection, and one of `max_connections`, forever.
    h1.timer(TokioTimer::new())
        .header_read_timeout(opts.client_header_timeout);
    let builders = Arc::new(Builders {
        h1,
        h2: http2::Builder::new(TokioExecutor::new()),
    });
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
        let exchanges = Arc::new(Exchanges::new());
        let service = TowerToHyperService::new(CountExchanges {
            inner: make_service(peer),
            exchanges: exchanges.clone(),
        });
        let open = opts.connection_metrics.clone().map(|(open, total)| {
            open.inc();
            total.inc();
            Open(open)
        });
        let conn = Conn {
            peer,
            builders: builders.clone(),
            exchanges,
            closing: closing_rx.clone(),
            idle_timeout: opts.client_header_timeout,
            park_after: opts.park_after,
            parked: opts.parked_metrics.clone(),
            _open: open,
            _permit: permit,
        };
        // The connection's own future, not wrapped in another: every level of async
        // nesting keeps its own copy of the arguments, in every parked connection.
        let io = ClientIo {
            unread: Bytes::new(),
            stream,
            exchanges: conn.exchanges.clone(),
        };
        let fut = conn.serve(io, service);
        tokio::spawn(fut);
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

/// What serves a client connection's requests: made per connection by `serve`'s caller.
pub trait ClientService<B>:
    tower_service::Service<
        Request<Incoming>,
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
            Request<Incoming>,
            Response = Response<B>,
            Error = Infallible,
            Future: Send + Unpin + 'static,
        > + Clone
        + Send
        + Unpin
        + 'static
{
}

/// The body of an answer to a client, as hyper's server takes it.
pub trait ResponseBody:
    Body<Data: Send, Error: Into<Box<dyn StdError + Send + Sync>>> + Send + Unpin + 'static
{
}

impl<B> ResponseBody for B where
    B: Body<Data: Send, Error: Into<Box<dyn StdError + Send + Sync>>> + Send + Unpin + 'static
{
}

/// The protocol builders, made once per listener.
struct Builders {
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
}

/// The service hyper drives for one connection.
type ConnService<S> = TowerToHyperService<CountExchanges<S>>;

/// One client connection: what its task needs besides its socket and its service.
struct Conn {
    peer: SocketAddr,
    builders: Arc<Builders>,
    exchanges: Arc<Exchanges>,
    /// Tells of the listener closing. Held until the connection has closed: the drain
    /// is over when no receiver is left.
    closing: watch::Receiver<bool>,
    idle_timeout: Duration,
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

/// Why the connection task stops hyper.
enum Told {
    /// The listener is closing: finish what is in flight, then close.
    Drain,
    /// An idle h2c connection: GOAWAY, then close.
    Idle,
    /// An idle HTTP/1.1 connection: give hyper's buffers back, keep the socket.
    Park,
}

/// What ended one turn of hyper's HTTP/1.1 side.
enum Step {
    Ended(hyper::Result<()>),
    Told(Told),
}

impl Conn {
    /// Sniffs the protocol, then serves the connection until it closes.
    ///
    /// An HTTP/1.1 connection is served by hyper while it is in use; parked, with
    /// nothing but its socket, once it has been idle for `park_after`; by a fresh hyper
    /// when its client sends more.
    ///
    /// hyper holds an 8 KiB read buffer and an 8 KiB header buffer for as long as it
    /// serves a connection, idle or not (20.9 KiB per idle connection in all,
    /// `bench/connections.sh`), and has no way to let them go between requests. So an
    /// idle connection's hyper is stopped the way a drain stops it (keep-alive off while
    /// idle: it closes without writing a byte), its socket taken back unclosed, with any
    /// bytes hyper had read past the last request, and a fresh hyper made when the
    /// client speaks again (nginx frees its buffers between requests for the same
    /// reason). Only once hyper has written all of its last answer: bytes it still holds
    /// would go with it.
    async fn serve<S, B>(self, mut io: ClientIo, mut service: ConnService<S>)
    where
        S: ClientService<B>,
        B: ResponseBody,
    {
        // No byte goes to hyper before the protocol is known. A client that connects and
        // says nothing (or half of h2c's preface) gets `client_header_timeout` for it,
        // and nothing once the listener is closing.
        // Boxed, as hyper's turns are: only the parked stage sizes the task.
        let sniffed = Box::pin(async {
            let mut closing = self.closing.clone();
            tokio::select! {
                sniffed = tokio::time::timeout(self.idle_timeout, sniff(&mut io.stream)) => {
                    sniffed.ok().flatten()
                }
                _ = closing.wait_for(|c| *c) => None,
            }
        })
        .await;
        let Some((h2, unread)) = sniffed else {
            tracing::debug!(peer = %self.peer, "Connection closed before its first byte.");
            return;
        };
        io.unread = unread;
        if h2 {
            // Boxed: hyper's h2 state would otherwise size every connection's task.
            Box::pin(self.serve_h2(io, service)).await;
            return;
        }
        // hyper's header timer runs from the end of the last answer; a parked connection's
        // from when it parked, counting the idle time before. A client that wakes a
        // connection late in that time gets only what is left of it for the head that
        // wakes it (a hyper made with a shorter timer), and the connection parks again
        // straight after the answer, so that later heads get the whole timeout.
        let mut cut_short: Option<Duration> = None;
        loop {
            // Boxed: hyper's state, and the futures that watch it, are in the task only
            // while it serves; a parked connection's task is small.
            let Some((parked, kept)) = Box::pin(self.turn(io, service, cut_short)).await else {
                return;
            };
            (io, service) = (parked, kept);
            let Some(left) = self.park(&mut io).await else {
                return;
            };
            cut_short = (left < self.idle_timeout.saturating_sub(self.park_after)).then_some(left);
        }
    }

    /// h2c: hyper until the client closes, the listener closes, or the connection has
    /// had no open stream for `client_header_timeout`.
    async fn serve_h2<S, B>(&self, io: ClientIo, service: ConnService<S>)
    where
        S: ClientService<B>,
        B: ResponseBody,
    {
        let conn = self.builders.h2.serve_connection(TokioIo::new(io), service);
        tokio::pin!(conn);
        let mut closing = self.closing.clone();
        let exchanges = self.exchanges.clone();
        let idle_timeout = self.idle_timeout;
        // Told to close (drain, or idle): hyper sends GOAWAY, finishes the streams in
        // flight, and waits for the answer to a PING before its last GOAWAY. That takes
        // the client's part, so an idle connection gets the idle timeout again and is
        // then dropped. A drain is bounded as a whole by `serve` (the drain timeout,
        // reported TimedOut).
        let told = PollWhenWoken::new(Box::pin(async move {
            tokio::select! {
                _ = closing.wait_for(|c| *c) => Told::Drain,
                () = exchanges.idle_h2(idle_timeout) => Told::Idle,
            }
        }));
        // Biased, connection first: it is what wakes this task for every request.
        let ended = tokio::select! {
            biased;
            ended = conn.as_mut() => ended,
            told = told => {
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

    /// One hyper over the connection, until it ends (`None`: closed, as hyper would
    /// close it) or is to park (its socket, with what hyper had read ahead, and the
    /// service back). `cut_short`: the header timeout for the first head, and park
    /// straight after its answer.
    async fn turn<S, B>(
        &self,
        io: ClientIo,
        service: ConnService<S>,
        cut_short: Option<Duration>,
    ) -> Option<(ClientIo, ConnService<S>)>
    where
        S: ClientService<B>,
        B: ResponseBody,
    {
        let shorter;
        let builder = match cut_short {
            None => &self.builders.h1,
            Some(left) => {
                let mut b = self.builders.h1.clone();
                b.header_read_timeout(left);
                shorter = b;
                &shorter
            }
        };
        let mut conn = builder.serve_connection(TokioIo::new(io), service);
        let before = self.exchanges.started();
        let mut told = PollWhenWoken::new(Box::pin(self.idle_h1(before)));
        // Connection first: it is what wakes this task for every request.
        let step = std::future::poll_fn(|cx| {
            if let Poll::Ready(ended) = conn.poll_without_shutdown(cx) {
                return Poll::Ready(Step::Ended(ended));
            }
            if cut_short.is_some() && self.exchanges.parkable(before) {
                return Poll::Ready(Step::Told(Told::Park));
            }
            Pin::new(&mut told).poll(cx).map(Step::Told)
        })
        .await;
        drop(told);
        let ended = match step {
            Step::Ended(ended) => ended,
            Step::Told(Told::Drain | Told::Idle) => {
                Pin::new(&mut conn).graceful_shutdown();
                std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)).await
            }
            Step::Told(Told::Park) => {
                // Idle and all written: hyper closes at once, writing nothing.
                Pin::new(&mut conn).graceful_shutdown();
                let stopped = tokio::time::timeout(
                    self.idle_timeout,
                    std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)),
                )
                .await;
                match stopped {
                    Ok(Ok(())) => {
                        let http1::Parts {
                            io,
                            read_buf,
                            service,
                            ..
                        } = conn.into_parts();
                        let mut io = io.into_inner();
                        // A copy: hyper's bytes, even none, keep its whole read buffer
                        // alive.
                        io.unread = Bytes::copy_from_slice(&read_buf);
                        return Some((io, service));
                    }
                    Ok(Err(e)) => Err(e),
                    Err(_) => {
                        tracing::debug!(peer = %self.peer, "Connection did not stop in time to park; dropped.");
                        return None;
                    }
                }
            }
        };
        if let Err(e) = ended {
            tracing::debug!(peer = %self.peer, error = %e, "Connection ended with an error.");
        }
        // What hyper's own future would do on the way out: FIN, then close.
        let mut stream = conn.into_parts().io.into_inner().stream;
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut stream).await;
        None
    }

    /// Resolves when the listener closes, or once the connection has answered a request
    /// since `before` and then been idle, its answer all written, for `park_after`.
    async fn idle_h1(&self, before: u64) -> Told {
        let mut closing = self.closing.clone();
        tokio::select! {
            _ = closing.wait_for(|c| *c) => Told::Drain,
            () = self.exchanges.idle_for(self.park_after, before) => Told::Park,
        }
    }

    /// Holds a parked connection, nothing but its socket and the bytes hyper had read
    /// ahead, until its client sends more. Returns what is left of
    /// `client_header_timeout` for the next head, or `None` when the connection is done
    /// with: the client closed it, it stayed idle for the whole timeout, or the
    /// listener is closing.
    async fn park(&self, io: &mut ClientIo) -> Option<Duration> {
        let deadline = self.exchanges.idle_since() + self.idle_timeout;
        if let Some((now, total)) = &self.parked {
            now.inc();
            total.inc();
        }
        let woken = if io.unread.is_empty() {
            let mut closing = self.closing.clone();
            // A peek, not `readable`: it also tells a close (0 bytes) from a request.
            // (`poll_peek` in place: `peek`'s future is 232 bytes of every parked task.)
            let peek = std::future::poll_fn(|cx| {
                let mut byte = [0u8; 1];
                io.stream.poll_peek(cx, &mut ReadBuf::new(&mut byte))
            });
            tokio::select! {
                peeked = peek => matches!(peeked, Ok(n) if n > 0),
                () = tokio::time::sleep_until(deadline) => {
                    tracing::debug!(peer = %self.peer, "Closing an idle connection.");
                    false
                }
                _ = closing.wait_for(|c| *c) => false,
            }
        } else {
            true
        };
        if let Some((now, _)) = &self.parked {
            now.dec();
        }
        woken.then(|| deadline.saturating_duration_since(Instant::now()))
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

/// A client's socket, with bytes already read from it (the sniff's, or those hyper had
/// read ahead when the connection parked) to be read again first. Its writes tell
/// [`Exchanges`] whether the socket last refused bytes, i.e. whether hyper still holds
/// some of an answer.
struct ClientIo {
    unread: Bytes,
    stream: TcpStream,
    exchanges: Arc<Exchanges>,
}

impl ClientIo {
    fn track<T>(&self, written: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        self.exchanges
            .write_blocked
            .store(written.is_pending(), Ordering::Relaxed);
        written
    }
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
        let this = self.get_mut();
        let written = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.track(written)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.track(written)
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

/// One connection's exchanges (HTTP/1.1 requests, h2 streams): how many are open, how
/// many have started, and when it last had none; for its idle timers. Atomics, because
/// the service that counts lives in hyper's hands while the connection task reads them.
#[derive(Debug)]
struct Exchanges {
    open: AtomicUsize,
    started: AtomicU64,
    /// When `open` last fell to zero, in milliseconds after `start`.
    idle_since_ms: AtomicU64,
    /// The socket's last write would have blocked: hyper holds bytes of an answer.
    write_blocked: AtomicBool,
    start: Instant,
}

impl Exchanges {
    fn new() -> Self {
        Exchanges {
            open: AtomicUsize::new(0),
            started: AtomicU64::new(0),
            idle_since_ms: AtomicU64::new(0),
            write_blocked: AtomicBool::new(false),
            start: Instant::now(),
        }
    }

    fn started(&self) -> u64 {
        self.started.load(Ordering::Acquire)
    }

    fn idle_since(&self) -> Instant {
        self.start + Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire))
    }

    /// No exchange open, at least one since `before`, and nothing left unwritten.
    fn parkable(&self, before: u64) -> bool {
        self.open.load(Ordering::Acquire) == 0
            && self.started() > before
            && !self.write_blocked.load(Ordering::Relaxed)
    }

    /// Resolves once the connection has been [`parkable`](Self::parkable) for `idle`.
    /// One timer per `idle` at most, not one per request.
    async fn idle_for(&self, idle: Duration, before: u64) {
        loop {
            let deadline = if self.parkable(before) {
                self.idle_since() + idle
            } else {
                Instant::now() + idle
            };
            if deadline <= Instant::now() {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
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

/// One open exchange: counted from the request until its response body is done with.
#[derive(Debug)]
struct ExchangeGuard(Arc<Exchanges>);

impl ExchangeGuard {
    fn open(exchanges: Arc<Exchanges>) -> Self {
        exchanges.started.fetch_add(1, Ordering::AcqRel);
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
        CountedFuture {
            inner: self.inner.call(req),
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

/// A response body that keeps its exchange open until hyper drops it.
#[derive(Debug)]
struct CountedBody<B> {
    inner: B,
    _guard: Option<ExchangeGuard>,
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
