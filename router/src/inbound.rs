//! HTTP/1.1 from clients, with the codec of [`crate::h1`] (RFC 9112), and the body
//! type of every client request ([`RequestBody`]).
//!
//! One connection is one task, and its loop is the whole protocol:
//! 1. *Head*: read until a whole request head is in the connection's buffer, within
//!    `client_header_timeout` of the last answer (or of the opening). A connection idle
//!    for `park_after` gives its buffers back (it is *parked*: what it holds of a next
//!    head is kept in a buffer its size) and waits for its client as a bare socket.
//!    Pipelined requests are simply the bytes after the last one.
//! 2. *Request*: the head parsed with httparse into [`http::request::Parts`] whose
//!    field values are slices of the buffer. The body is the bytes after the head when
//!    they are all there (most predictions), else read off the socket as the service
//!    polls it, decoded by [`crate::h1::poll_decode`] (the upstream leg's decoder), and
//!    `100 Continue` sent when it is first polled.
//! 3. *Answer*: the head written with the body's first frame in one `writev`; framed by
//!    the body's length when it is known, else chunked (or to the close, for HTTP/1.0).
//! 4. Keep the connection when nothing speaks against it (RFC 9112 §9.3: `connection:
//!    close`, HTTP/1.0 without `keep-alive`, a request body not read to its end, a
//!    `transfer-encoding` beside a `content-length`, the listener closing); else close,
//!    reading what the client still sends for a bounded while (so that the close is a
//!    FIN, not a reset that could destroy the answer before the client reads it).
//!
//! What a request must be (anything else is answered 400, 408 or 431 with a JSON
//! `{"error"}`, and the connection closed): a head of at most [`MAX_HEAD`] bytes and
//! [`MAX_HEADERS`] fields, valid to httparse, HTTP/1.0 or 1.1, with a target and field
//! values `http` takes; framed as §6.3 orders it: `transfer-encoding` ending in chunked
//! (HTTP/1.1 only; a `content-length` beside it is dropped), else `content-length`
//! (every value the same number), else no body.
//!
//! Why not hyper's server: on the proxy's path it was 15% of user time with six
//! allocations per request (a header-read timer, a body channel, the head's map grown,
//! read buffers re-reserved; BENCHMARKS.md). h2c connections are still hyper's.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, DATE, EXPECT, TRANSFER_ENCODING};
use http::{HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use prometheus::{IntCounter, IntGauge};
use tokio::io::AsyncWrite;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::closing::Watch;
use crate::h1::{
    self, Fill, Framing, H1Error, Names, Present, Writer, MAX_HEAD, MAX_HEADERS, READ_SIZE,
};
use crate::server::{ClientService, ResponseBody};
use crate::stamp::Stamp;

/// An error of a request body, or of an answer's body.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// The body of a client's request, whichever protocol brought it; and which fields its
/// head may have, as far as it was parsed here (the lookups of the others are skipped).
#[derive(Debug)]
pub struct RequestBody(Kind, Present);

#[derive(Debug)]
enum Kind {
    /// Whole: it came with its head (`None`: taken, or there was none).
    Full(Option<Bytes>),
    /// Still on the HTTP/1.1 connection, read as it is polled.
    Streamed(Arc<Mutex<Reader>>),
    /// An h2c stream's, read by hyper.
    H2(Incoming),
}

/// No body (what is left where one was taken).
impl Default for RequestBody {
    fn default() -> Self {
        RequestBody::empty()
    }
}

impl RequestBody {
    /// No body.
    pub fn empty() -> Self {
        RequestBody(Kind::Full(None), Present::ALL)
    }

    /// A body already whole.
    pub fn full(bytes: Bytes) -> Self {
        RequestBody(
            Kind::Full((!bytes.is_empty()).then_some(bytes)),
            Present::ALL,
        )
    }
}

impl RequestBody {
    /// Which fields the request's head may have ([`Present`]): a bit is clear only when
    /// its head was parsed here and has no such field.
    pub(crate) fn fields(&self) -> Present {
        self.1
    }
}

impl From<Incoming> for RequestBody {
    fn from(body: Incoming) -> Self {
        RequestBody(Kind::H2(body), Present::ALL)
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match &mut self.0 {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Streamed(reader) => lock(reader).poll_body(cx),
            Kind::H2(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Streamed(reader) => lock(reader).framing == Framing::Done,
            Kind::H2(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Kind::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Streamed(reader) => lock(reader).framing.size_hint(),
            Kind::H2(body) => body.size_hint(),
        }
    }
}

/// The reader's lock: held for one poll, never across an `.await`; a panic while it was
/// held leaves nothing half-done that a later poll could trip on.
fn lock(reader: &Mutex<Reader>) -> MutexGuard<'_, Reader> {
    reader
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `Expect: 100-continue`, on the way to the interim answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Continue {
    /// Not expected, or already sent.
    No,
    /// Expected; the body has not been polled.
    Expected,
    /// The body was polled: the connection's task is to send it.
    Wanted,
}

/// The read side of a client connection: the socket, what has been read and not yet
/// taken, and how far the current request's body has been read.
#[derive(Debug)]
struct Reader {
    io: OwnedReadHalf,
    buf: BytesMut,
    framing: Framing,
    cont: Continue,
    /// The connection's task, woken when the body wants `100 Continue` (the body may be
    /// polled in another task).
    task: Option<Waker>,
    /// The last head's field names.
    names: Names,
}

impl Fill for Reader {
    fn buf(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        h1::poll_read_buf(&mut self.io, &mut self.buf, cx, want)
    }
}

impl Reader {
    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if self.cont == Continue::Expected {
            self.cont = Continue::Wanted;
            if let Some(task) = &self.task {
                task.wake_by_ref();
            }
        }
        // Out of `self` while it decodes, which reads `self`'s buffer.
        let mut framing = self.framing;
        let frame = h1::poll_decode(&mut framing, self, cx);
        self.framing = framing;
        frame.map(|frame| frame.map(|f| f.map_err(client_error)))
    }
}

/// A decoding error of a request body, in the client's terms.
fn client_error(e: H1Error) -> BodyError {
    match e {
        H1Error::Closed(_) => "the client closed the connection before the end of its body".into(),
        H1Error::Malformed(m) => format!("malformed request body: {m}").into(),
        H1Error::Io(e) => Box::new(e),
        H1Error::Body(e) => e,
    }
}

/// The interim answer to `Expect: 100-continue`.
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// What a connection's loop needs from its listener.
pub(crate) struct Options {
    /// For the logs.
    pub peer: std::net::SocketAddr,
    /// `client_header_timeout`.
    pub header_timeout: Duration,
    /// `client_send_timeout`.
    pub send_timeout: Duration,
    /// How long an idle connection keeps its buffers.
    pub park_after: Duration,
    /// Gauge of parked connections and counter of parkings, if measured.
    pub parked: Option<(IntGauge, IntCounter)>,
}

/// Where the read side is while a request is served.
enum Holder {
    /// The connection's own (no body, or a body that came whole).
    Own(Reader),
    /// Shared with the request's body, which reads from it.
    Shared(Arc<Mutex<Reader>>),
}

/// A request head refused: answered with this status and message, then closed.
struct Refusal(StatusCode, String);

/// A request head, parsed.
struct Parsed {
    parts: http::request::Parts,
    framing: Framing,
    /// Nothing in the request speaks against another one on this connection.
    keep: bool,
    expect_continue: bool,
    /// Which fields the head has ([`RequestBody::fields`]).
    present: Present,
}

/// Serves HTTP/1.1 on `stream` (`unread`: bytes already read from it) until the client
/// or the listener (`closing`) closes it.
///
/// An `async move` block, not an `async fn`, which keeps its arguments twice: this future
/// is part of every connection's task, idle ones too.
#[allow(clippy::manual_async_fn)] // on purpose: see above
pub(crate) fn serve<'a, S, B>(
    stream: TcpStream,
    unread: &'a [u8],
    mut service: S,
    opts: Options,
    closing: &'a Watch,
) -> impl Future<Output = ()> + 'a
where
    S: ClientService<B>,
    B: ResponseBody,
{
    async move {
        let (io, mut out) = stream.into_split();
        let mut buf = BytesMut::with_capacity(READ_SIZE.max(unread.len()));
        buf.extend_from_slice(unread);
        let mut reader = Reader {
            io,
            buf,
            framing: Framing::Done,
            cont: Continue::No,
            task: None,
            names: Names::default(),
        };
        let mut write: Vec<u8> = Vec::new();
        // One timer for the connection's life, for the head, park and send deadlines in
        // turn (`Alarm::due`: moved only when it would be late).
        let mut timer = std::pin::pin!(crate::clock::Alarm::until(
            Instant::now() + opts.header_timeout
        ));
        let mut idle_since = crate::clock::now();
        loop {
            let Parsed {
                mut parts,
                framing,
                keep,
                expect_continue,
                present,
            } = match read_head(
                &mut reader,
                &mut write,
                &opts,
                closing,
                timer.as_mut(),
                idle_since,
            )
            .await
            {
                Ok(Some(parsed)) => parsed,
                // Nothing to answer: the client closed, stayed idle, or the listener is closing.
                Ok(None) => return,
                Err(Refusal(status, message)) => {
                    tracing::debug!(peer = %opts.peer, %status, %message, "Request head refused.");
                    write.clear();
                    encode_refusal(&mut write, status, &message);
                    let _ = tokio::io::AsyncWriteExt::write_all(&mut out, &write).await;
                    Box::pin(linger(out, reader.io)).await;
                    return;
                }
            };
            let head_request = parts.method == Method::HEAD;
            let version = parts.version;
            let (mut body, holder) = match framing {
                Framing::Done => (RequestBody::empty(), Holder::Own(reader)),
                Framing::Length(n) if reader.buf.len() as u64 >= n => {
                    let bytes = reader.buf.split_to(n as usize).freeze();
                    (RequestBody::full(bytes), Holder::Own(reader))
                }
                framing => {
                    reader.framing = framing;
                    reader.cont = if expect_continue && version == Version::HTTP_11 {
                        Continue::Expected
                    } else {
                        Continue::No
                    };
                    let shared = Arc::new(Mutex::new(reader));
                    (
                        RequestBody(Kind::Streamed(shared.clone()), Present::ALL),
                        Holder::Shared(shared),
                    )
                }
            };
            body.1 = present;
            if expect_continue {
                // Answered here, or not at all: the upstream gets the body without asking.
                parts.headers.remove(EXPECT);
            }
            // The service is always ready (it answers 503 itself), but is asked.
            if let Err(never) = std::future::poll_fn(|cx| service.poll_ready(cx)).await {
                match never {}
            }
            let mut answer = service.call(Request::from_parts(parts, body));
            let mut sent = 0;
            // Scoped, as the answer's head is below: a local still in scope across the
            // answer's writing keeps its room in every connection's task, idle ones too.
            let (framing, body, keep) = {
                let answered = std::future::poll_fn(|cx| {
                    if let Holder::Shared(shared) = &holder {
                        let mut r = lock(shared);
                        if r.cont == Continue::Expected && r.task.is_none() {
                            r.task = Some(cx.waker().clone());
                        }
                    }
                    if let Poll::Ready(answered) = Pin::new(&mut answer).poll(cx) {
                        return Poll::Ready(answered);
                    }
                    if let Holder::Shared(shared) = &holder {
                        let mut r = lock(shared);
                        while r.cont == Continue::Wanted {
                            match Pin::new(&mut out).poll_write(cx, &CONTINUE[sent..]) {
                                Poll::Ready(Ok(n)) if n > 0 => {
                                    sent += n;
                                    if sent == CONTINUE.len() {
                                        r.cont = Continue::No;
                                    }
                                }
                                // The client is gone: the body will fail, and with it the answer.
                                Poll::Ready(_) => r.cont = Continue::No,
                                Poll::Pending => break,
                            }
                        }
                    }
                    Poll::Pending
                })
                .await;
                drop(answer);
                let Ok(answer) = answered;
                let (mut head, mut body) = answer.into_parts();
                // The request's body read to its end: the next bytes are the next request's.
                let body_read = match &holder {
                    Holder::Own(_) => true,
                    Holder::Shared(shared) => lock(shared).framing == Framing::Done,
                };
                let mut keep = keep && body_read && !closing.is_closed();
                write.clear();
                let hint = body.size_hint();
                let framing = encode_answer(
                    &mut write,
                    &head,
                    body.stamp().map(|s| &*s),
                    hint,
                    head_request,
                    version,
                    &mut keep,
                );
                // Written: the map can hold the next head's fields.
                h1::recycle(std::mem::take(&mut head.headers));
                (framing, body, keep)
            };
            let mut writer = match framing {
                AnswerFraming::None => Writer::new(None, None, Some(0), false),
                AnswerFraming::Length(n) => Writer::new(None, Some(body), Some(n), false),
                AnswerFraming::Chunked => Writer::new(None, Some(body), None, false),
                AnswerFraming::Close => Writer::new(None, Some(body), None, true),
            };
            // The timer bounds a client that takes none of its answer for `send_timeout`
            // (waited for only while the socket is full; an upstream slow with its body
            // is the request's business, not this one's): where the answer stalled, the
            // bytes written by then, and when.
            let mut stalled: Option<(u64, Instant)> = None;
            let written = std::future::poll_fn(|cx| {
                let done = writer.poll_write(&mut out, &mut write, cx);
                if done.is_ready() || !writer.io_pending {
                    stalled = None;
                    return done.map(|r| r.map_err(|e| e.to_string()));
                }
                let since = match stalled {
                    Some((progress, since)) if progress == writer.progress => since,
                    _ => {
                        let now = crate::clock::now();
                        stalled = Some((writer.progress, now));
                        now
                    }
                };
                if timer.as_mut().due(since + opts.send_timeout, cx) {
                    return Poll::Ready(Err(format!(
                        "the client took none of its answer for {:?} (client_send_timeout)",
                        opts.send_timeout
                    )));
                }
                Poll::Pending
            })
            .await;
            if let Err(e) = written {
                // The answer is cut short; only closing tells the client.
                tracing::debug!(peer = %opts.peer, error = %e, "Answer broke off; closing.");
                return;
            }
            drop(writer);
            reader = match holder {
                Holder::Own(reader) => reader,
                Holder::Shared(shared) => match Arc::try_unwrap(shared) {
                    Ok(reader) => reader.into_inner().unwrap_or_else(|p| p.into_inner()),
                    // The body is still held (a mirror, a task sending it upstream): the
                    // rest of the stream is not ours to read.
                    Err(_) => return,
                },
            };
            if !keep || reader.framing != Framing::Done {
                Box::pin(linger(out, reader.io)).await;
                return;
            }
            reader.cont = Continue::No;
            reader.task = None;
            idle_since = crate::clock::now();
        }
    }
}

/// Reads until a whole request head is buffered (within `header_timeout` of
/// `idle_since`), parking the connection while it is idle.
async fn read_head(
    reader: &mut Reader,
    write: &mut Vec<u8>,
    opts: &Options,
    closing: &Watch,
    mut timer: Pin<&mut crate::clock::Alarm>,
    idle_since: Instant,
) -> Result<Option<Parsed>, Refusal> {
    let deadline = idle_since + opts.header_timeout;
    let park_at = (idle_since + opts.park_after).min(deadline);
    let mut parked = false;
    let head = std::future::poll_fn(|cx| loop {
        if !reader.buf.is_empty() {
            match parse_request(&mut reader.buf, &mut reader.names) {
                Ok(Some(parsed)) => return Poll::Ready(Ok(Some(parsed))),
                Ok(None) if reader.buf.len() >= MAX_HEAD => {
                    return Poll::Ready(Err(Refusal(
                        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                        format!("request head larger than {MAX_HEAD} bytes"),
                    )))
                }
                Ok(None) => {}
                Err(refusal) => return Poll::Ready(Err(refusal)),
            }
        }
        // Idle (nothing of a head yet): the listener closing ends it.
        if reader.buf.is_empty() && closing.poll_closed(cx).is_ready() {
            return Poll::Ready(Ok(None));
        }
        if parked {
            // A peek, not a read: a parked connection holds no buffer.
            let mut byte = [0u8; 1];
            match reader.io.poll_peek(cx, &mut tokio::io::ReadBuf::new(&mut byte)) {
                Poll::Ready(Ok(n)) if n > 0 => {
                    parked = false;
                    if let Some((now, _)) = &opts.parked {
                        now.dec();
                    }
                    reader.buf.reserve(READ_SIZE);
                    continue;
                }
                Poll::Ready(_) => return Poll::Ready(Ok(None)),
                Poll::Pending => {}
            }
        } else {
            match reader.poll_fill(cx, READ_SIZE) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                    if !reader.buf.is_empty() {
                        tracing::debug!(peer = %opts.peer, "Client closed in the middle of a head.");
                    }
                    return Poll::Ready(Ok(None));
                }
                Poll::Ready(Ok(_)) => continue,
                Poll::Pending => {}
            }
        }
        // Only a wait touches the timer: a head already buffered (pipelined, or come
        // with the last answer's read) never does.
        let wanted = if parked { deadline } else { park_at };
        if !timer.as_mut().due(wanted, cx) {
            return Poll::Pending;
        }
        if wanted == deadline {
            if reader.buf.is_empty() {
                tracing::debug!(peer = %opts.peer, "Closing an idle connection.");
                return Poll::Ready(Ok(None));
            }
            return Poll::Ready(Err(Refusal(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request head did not arrive within {:?} (client_header_timeout)",
                    opts.header_timeout
                ),
            )));
        }
        // Idle for `park_after`: give the buffers back, keep the socket (and what the
        // client sent of its next head, in a buffer its size).
        // (Not parked yet: a parked connection waits for `deadline`.)
        parked = true;
        reader.buf = BytesMut::from(&reader.buf[..]);
        reader.names = Names::default();
        *write = Vec::new();
        if let Some((now, total)) = &opts.parked {
            now.inc();
            total.inc();
        }
    })
    .await;
    if parked {
        if let Some((now, _)) = &opts.parked {
            now.dec();
        }
    }
    head
}

/// Parses a request head out of `buf` (consumed); `None` while incomplete.
fn parse_request(buf: &mut BytesMut, names: &mut Names) -> Result<Option<Parsed>, Refusal> {
    let bad = |m: String| Refusal(StatusCode::BAD_REQUEST, m);
    // The target's and the fields' offsets: they borrow `buf`, which is split off below.
    let (len, method, target, version, spans) = {
        let mut fields = h1::field_room();
        let mut parsed = httparse::Request::new(&mut []);
        let len = match parsed.parse_with_uninit_headers(buf, &mut fields) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(Refusal(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    format!("more than {MAX_HEADERS} header fields"),
                ))
            }
            Err(e) => return Err(bad(format!("bad request head: {e}"))),
        };
        // httparse returns these for every complete head.
        let method = Method::from_bytes(parsed.method.unwrap_or_default().as_bytes())
            .map_err(|_| bad("bad method".into()))?;
        let path = parsed.path.unwrap_or_default();
        let target = (path.as_ptr() as usize - buf.as_ptr() as usize, path.len());
        (
            len,
            method,
            target,
            parsed.version.unwrap_or_default(),
            h1::Spans::of(buf, parsed.headers),
        )
    };
    if len > MAX_HEAD {
        return Err(Refusal(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!("request head larger than {MAX_HEAD} bytes"),
        ));
    }
    let head = buf.split_to(len).freeze();
    let uri = Targets::uri(&head, target.0..target.0 + target.1)
        .map_err(|e| bad(format!("bad request target: {e}")))?;
    // Room for the fields the proxy adds to what it passes on.
    let (headers, facts) = h1::fields(&head, &spans, names, spans.len() + 2).map_err(bad)?;
    let present = facts.present;
    let version = if version == 0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let mut keep = h1::persistent(&facts, version) && method != Method::CONNECT;
    // RFC 9112 §6.3.
    let framing = if present.has(Present::TRANSFER_ENCODING) {
        if version == Version::HTTP_10 {
            return Err(bad("transfer-encoding in an HTTP/1.0 request".into()));
        }
        if !h1::chunked(&headers) {
            return Err(bad(
                "transfer-encoding of a request must end in chunked".into()
            ));
        }
        // §6.1: the length is ignored, and the connection closed after the answer.
        if present.has(Present::CONTENT_LENGTH) {
            keep = false;
        }
        Framing::ChunkSize
    } else if present.has(Present::CONTENT_LENGTH) {
        match facts.length.resolve().map_err(bad)? {
            None | Some(0) => Framing::Done,
            Some(n) => Framing::Length(n),
        }
    } else {
        Framing::Done
    };
    let expect_continue = present.has(Present::EXPECT)
        && headers
            .get(EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let mut parts = Request::new(()).into_parts().0;
    parts.method = method;
    parts.uri = uri;
    parts.version = version;
    parts.headers = headers;
    Ok(Some(Parsed {
        parts,
        framing,
        keep,
        expect_continue,
        present,
    }))
}

/// The request targets kept per thread once seen, as [`h1`]'s kept field values are: a
/// client asks for the same few paths (`/v1/models/NAME:predict`, `/v2/models/NAME/infer`)
/// request after request, and a target made from its head is checked byte by byte and
/// holds a count on the read buffer (two locked instructions, taken and given back); a
/// kept one is compared and copied. Each is leaked (`http` counts nothing on a `'static`
/// one), so they are bounded: origin-form paths only, without a query (which may carry
/// a key, and changes from request to request), at most [`Targets::MOST`] of at most
/// [`Targets::LONGEST`] bytes, first come first kept: 0.5 KiB of text per thread. A
/// target not kept is made from its head as before.
struct Targets;

thread_local! {
    static TARGETS: std::cell::RefCell<Vec<http::Uri>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Targets {
    const MOST: usize = 8;
    const LONGEST: usize = 64;

    /// The target at `range` of `head`: a kept one, or one kept now if there is room,
    /// else one made from the head.
    fn uri(
        head: &Bytes,
        range: std::ops::Range<usize>,
    ) -> Result<http::Uri, http::uri::InvalidUri> {
        let raw = &head[range.clone()];
        // A target with a query is not kept: its path is not all of it (below).
        if raw.len() > Targets::LONGEST || raw.first() != Some(&b'/') {
            return http::Uri::from_maybe_shared(head.slice(range));
        }
        TARGETS.with_borrow_mut(|kept| {
            if let Some(uri) = kept.iter().find(|uri| uri.path().as_bytes() == raw) {
                return Ok(uri.clone());
            }
            let uri = http::Uri::from_maybe_shared(head.slice(range))?;
            // Kept (and leaked) only once it has been read as a target, and only when its
            // path is all of it (not with a query, nor a `#` that ends the path before
            // it), so that a kept one is found by the bytes it was made from, and nothing
            // that is not kept is leaked.
            if kept.len() < Targets::MOST && uri.path().as_bytes() == raw {
                let text: &'static [u8] = Box::leak(raw.into());
                if let Ok(keep) = http::Uri::from_maybe_shared(Bytes::from_static(text)) {
                    kept.push(keep.clone());
                    return Ok(keep);
                }
            }
            Ok(uri)
        })
    }
}

/// How an answer's body goes out.
enum AnswerFraming {
    /// None is sent (`HEAD`, 1xx, 204, 304).
    None,
    Length(u64),
    Chunked,
    /// To the close (an HTTP/1.0 client, length unknown).
    Close,
}

/// Writes the answer's status line and fields into `out`, its framing from the body
/// (`hint`), `connection` from `keep` (cleared when the body must end with the
/// connection, or the answer's own `connection` field says `close`), and `date` unless
/// the service set one.
fn encode_answer(
    out: &mut Vec<u8>,
    head: &http::response::Parts,
    stamp: Option<&Stamp>,
    hint: SizeHint,
    head_request: bool,
    version: Version,
    keep: &mut bool,
) -> AnswerFraming {
    let status = head.status;
    let bodiless = head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let framing = if bodiless {
        AnswerFraming::None
    } else if let Some(n) = hint.exact() {
        AnswerFraming::Length(n)
    } else if version == Version::HTTP_11 {
        AnswerFraming::Chunked
    } else {
        *keep = false;
        AnswerFraming::Close
    };
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    // A bodiless answer to a HEAD, or a 304, says the length the body would have.
    let keep_length = matches!(framing, AnswerFraming::None)
        && (head_request || status == StatusCode::NOT_MODIFIED);
    let (mut has_length, mut has_date) = (false, false);
    // One pass over the fields, which also finds what would otherwise be looked up.
    for (name, value) in &head.headers {
        if name == CONNECTION {
            if h1::connection_options(value.as_bytes()).close {
                *keep = false;
            }
            continue;
        }
        if name == TRANSFER_ENCODING {
            continue;
        }
        if stamp.is_some_and(|s| s.replaces(name)) {
            continue;
        }
        has_date |= name == DATE;
        if name == CONTENT_LENGTH {
            if !keep_length || has_length {
                continue;
            }
            has_length = true;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(stamp) = stamp {
        stamp.write(out);
    }
    if !has_date {
        out.extend_from_slice(b"date: ");
        date(out);
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        AnswerFraming::Length(n) => length_field(out, n),
        AnswerFraming::None if keep_length && !has_length => {
            if let Some(n) = hint.exact().filter(|&n| n > 0) {
                length_field(out, n);
            }
        }
        AnswerFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        AnswerFraming::None | AnswerFraming::Close => {}
    }
    if !*keep {
        out.extend_from_slice(b"connection: close\r\n");
    } else if version == Version::HTTP_10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
    framing
}

fn length_field(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(b"content-length: ");
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// A refusal of a request head: `status`, a JSON `{"error"}`, and the connection closed.
fn encode_refusal(out: &mut Vec<u8>, status: StatusCode, message: &str) {
    let body = serde_json::json!({ "error": message }).to_string();
    let mut head = Response::new(()).into_parts().0;
    head.status = status;
    head.headers
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let mut keep = false;
    encode_answer(
        out,
        &head,
        None,
        SizeHint::with_exact(body.len() as u64),
        false,
        Version::HTTP_11,
        &mut keep,
    );
    out.extend_from_slice(body.as_bytes());
}

/// Writes the current `date` (RFC 9110 §5.6.7), formatted once a second per thread.
fn date(out: &mut Vec<u8>) {
    thread_local! {
        static DATE: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now();
    let second = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(at, text)| {
        if *at != second {
            *at = second;
            *text = httpdate::fmt_http_date(now);
        }
        out.extend_from_slice(text.as_bytes());
    });
}

/// Most a closing connection reads of what its client still sends, and for how long.
const LINGER_BYTES: usize = 64 * 1024;
const LINGER: Duration = Duration::from_secs(1);

/// Closes the connection: FIN first, then what the client still sends is read and
/// dropped (bounded), so that the kernel does not answer it with a reset that could
/// destroy our last answer before the client has read it.
///
/// Called boxed: its 4 KiB sink would otherwise be part of every connection's task, idle
/// or not.
pub(crate) async fn linger(mut out: OwnedWriteHalf, mut io: OwnedReadHalf) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = out.shutdown().await;
    let drain = async {
        let mut sink = [0u8; 4096];
        let mut left = LINGER_BYTES;
        while left > 0 {
            match io.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left -= n.min(left),
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::net::SocketAddr;

    use http_body_util::{BodyExt, Full};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::closing::Closing;

    /// Every wait in these tests: none should come near it.
    const BOUND: Duration = Duration::from_secs(10);

    #[test]
    fn repeating_targets_are_kept_within_bounds_and_read_alike() {
        // A thread of its own: its list starts empty.
        std::thread::spawn(|| {
            let target = |t: &str| {
                let mut buf =
                    BytesMut::from(format!("GET {t} HTTP/1.1\r\nhost: a\r\n\r\n").as_bytes());
                parse_request(&mut buf, &mut Names::default())
                    .map(|p| p.expect("a whole head").parts.uri)
                    .map_err(|r| r.1)
            };
            let kept = || TARGETS.with_borrow(|t| t.len());
            let first = target("/v1/models/m:predict").unwrap();
            let again = target("/v1/models/m:predict").unwrap();
            assert_eq!(first.path(), "/v1/models/m:predict");
            assert_eq!(
                first.path().as_ptr(),
                again.path().as_ptr(),
                "kept once, and the same target given again"
            );
            assert_eq!(kept(), 1);
            // With a query, too long, a fragment, not a path, bad: read from the head as
            // any target is, and not kept.
            let queried = target("/v1/models/m:predict?key=secret").unwrap();
            assert_eq!(
                (queried.path(), queried.query()),
                ("/v1/models/m:predict", Some("key=secret"))
            );
            let long = format!("/{}", "a".repeat(Targets::LONGEST));
            assert_eq!(target(&long).unwrap().path(), long);
            assert_eq!(target("/a#b").unwrap().path(), "/a");
            assert_eq!(target("*").unwrap().path(), "*");
            assert!(target("/a\x7f").is_err());
            // httparse takes `<`, `http` does not: refused, seen before or not.
            assert!(target("/a<b").is_err() && target("/a<b").is_err());
            assert_eq!(kept(), 1);
            // First come first kept, up to the bound; the others still read alike.
            for i in 0..2 * Targets::MOST {
                let path = format!("/v2/models/m{i}/infer");
                assert_eq!(target(&path).unwrap().path(), path);
                assert_eq!(target(&path).unwrap().path(), path);
            }
            assert_eq!(kept(), Targets::MOST);
            assert_eq!(target("/v1/models/m:predict").unwrap(), first);
        })
        .join()
        .unwrap();
    }

    /// What the echo service answers: the request's method, target, version and fields
    /// (all but the framing ones, which each server may rewrite), then its body; `422` if
    /// the body failed.
    async fn echo<B>(req: Request<B>) -> Response<Full<Bytes>>
    where
        B: Body<Data = Bytes>,
        B::Error: std::fmt::Display,
    {
        let (parts, body) = req.into_parts();
        let mut out = format!("{} {} {:?}\n", parts.method, parts.uri, parts.version);
        for (name, value) in &parts.headers {
            if name == CONTENT_LENGTH || name == TRANSFER_ENCODING || name == EXPECT {
                continue;
            }
            // Ours keeps a `connection` field naming only these two out of the request
            // (they are its framing, read as the head is); hyper's passes it on.
            let framing_only = |v: &HeaderValue| {
                v.as_bytes().split(|&b| b == b',').all(|o| {
                    let o = o.trim_ascii().to_ascii_lowercase();
                    o.is_empty() || o == b"close" || o == b"keep-alive"
                })
            };
            if name == CONNECTION && framing_only(value) {
                continue;
            }
            out.push_str(&format!(
                "{name}: {}\n",
                String::from_utf8_lossy(value.as_bytes())
            ));
        }
        let mut out = out.into_bytes();
        match body.collect().await {
            Ok(body) => out.extend_from_slice(&body.to_bytes()),
            Err(e) => {
                let mut resp = Response::new(Full::new(Bytes::from(e.to_string())));
                *resp.status_mut() = StatusCode::UNPROCESSABLE_ENTITY;
                return resp;
            }
        }
        Response::new(Full::new(Bytes::from(out)))
    }

    /// [`echo`] as our server takes it.
    #[derive(Clone)]
    struct Echo;

    impl tower_service::Service<Request<RequestBody>> for Echo {
        type Response = Response<Full<Bytes>>;
        type Error = Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: Request<RequestBody>) -> Self::Future {
            Box::pin(async move { Ok(echo(req).await) })
        }
    }

    /// Answers every request `ok`, with the fields it was made with.
    #[derive(Clone)]
    struct Fields(&'static [(&'static str, &'static str)]);

    impl tower_service::Service<Request<RequestBody>> for Fields {
        type Response = Response<Full<Bytes>>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Self::Response, Infallible>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _req: Request<RequestBody>) -> Self::Future {
            let mut resp = Response::new(Full::new(Bytes::from_static(b"ok")));
            for (name, value) in self.0 {
                resp.headers_mut()
                    .append(*name, HeaderValue::from_static(value));
            }
            std::future::ready(Ok(resp))
        }
    }

    /// Our server on 127.0.0.1:0 with `service`, a 2 s header timeout and a listener
    /// that closes only when the returned [`Closing`] says so.
    async fn ours<S, B>(service: S) -> (SocketAddr, Closing)
    where
        S: ClientService<B>,
        B: ResponseBody,
    {
        ours_idle(service, Duration::from_secs(2), Duration::from_secs(1)).await
    }

    /// As [`ours`], with the given header timeout and `park_after`.
    async fn ours_idle<S, B>(
        service: S,
        header_timeout: Duration,
        park_after: Duration,
    ) -> (SocketAddr, Closing)
    where
        S: ClientService<B>,
        B: ResponseBody,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let closing = Closing::new();
        let watches = closing.clone();
        tokio::spawn(async move {
            while let Ok((stream, peer)) = listener.accept().await {
                let opts = Options {
                    peer,
                    header_timeout,
                    send_timeout: Duration::from_millis(300),
                    park_after,
                    parked: None,
                };
                let (service, watch) = (service.clone(), watches.watch());
                tokio::spawn(async move { serve(stream, &[], service, opts, &watch).await });
            }
        });
        (addr, closing)
    }

    /// hyper's HTTP/1.1 server on 127.0.0.1:0 with [`echo`].
    async fn hypers() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    Ok::<_, Infallible>(echo(req).await)
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
                );
            }
        });
        addr
    }

    /// Sends `bytes`, ends the sending side, and reads everything until the close.
    async fn exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
        let mut s = TcpStream::connect(addr).await.unwrap();
        // A server may answer and close before it has read everything.
        let _ = s.write_all(bytes).await;
        let _ = s.shutdown().await;
        let mut out = Vec::new();
        let read = tokio::time::timeout(BOUND, s.read_to_end(&mut out)).await;
        assert!(read.is_ok(), "not closed within {BOUND:?}");
        out
    }

    /// The first answer in `raw`: its status, its head (lowercase) and its
    /// `content-length` body.
    fn first_answer(raw: &[u8]) -> Option<(u16, String, Vec<u8>)> {
        let end = raw.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
        let head = String::from_utf8_lossy(&raw[..end]).to_lowercase();
        let status = head.get(9..12)?.parse().ok()?;
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .map_or(0, |n| n.trim().parse().unwrap());
        let body = raw.get(end..end + length)?.to_vec();
        Some((status, head, body))
    }

    /// How a request fared with one server.
    #[derive(Debug, PartialEq)]
    enum Outcome {
        /// Delivered whole to the service, which echoed this.
        Echoed(Vec<u8>),
        /// Not delivered whole: refused, failed in its body, or closed on.
        NotDelivered,
    }

    fn outcome(raw: &[u8]) -> Outcome {
        match first_answer(raw) {
            Some((200, _, body)) => Outcome::Echoed(body),
            _ => Outcome::NotDelivered,
        }
    }

    const TEMPLATES: [&[u8]; 7] = [
        b"POST /v1/models/m:predict HTTP/1.1\r\nhost: a\r\ncontent-type: application/json\r\ncontent-length: 17\r\n\r\n{\"instances\":[1]}",
        b"POST /v2/models/m/infer HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 42\r\n\r\n",
        b"GET /v2/health/ready?x=1&y=%20 HTTP/1.1\r\nhost: a\r\nx-a: one\r\nx-a: two\r\n\r\n",
        b"POST /p HTTP/1.0\r\nconnection: keep-alive\r\ncontent-length: 4\r\n\r\nten.",
        b"PUT /p HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\ncontent-length: 3\r\n\r\nabc",
        b"POST /p HTTP/1.1\r\nhost: a\r\ntransfer-encoding: gzip, chunked\r\ncontent-length: 9\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        b"DELETE /v2/models/m?q HTTP/1.1\r\nhost: a\r\nx-t: a\tb \xe9\r\nx-empty:\r\n\r\n",
    ];

    /// Generated requests, each to hyper's server and to ours, both with the same echo
    /// service: the service sees the same request and the same body from both, or from
    /// neither. Everything else is a finding.
    #[tokio::test]
    async fn requests_are_read_as_hypers_own_server_reads_them() {
        const CASES: usize = 1_500;
        let (ours, _closing) = ours(Echo).await;
        let hypers = hypers().await;
        let mut rng = crate::test_rng(0x5eed_1001);
        let (mut echoed, mut refused, mut differed) = (0, 0, Vec::new());
        for case in 0..CASES {
            let request = crate::mutate(TEMPLATES[case % TEMPLATES.len()], &mut rng);
            let (a, b) = tokio::join!(exchange(hypers, &request), exchange(ours, &request));
            let (hyper, ours) = (outcome(&a), outcome(&b));
            if hyper != ours {
                differed.push(format!(
                    "{:?}\n  hyper: {hyper:?}\n  ours:  {ours:?}",
                    String::from_utf8_lossy(&request)
                ));
            } else if ours == Outcome::NotDelivered {
                refused += 1;
                // Ours says why, as JSON, when it answers at all.
                if let Some((status, head, body)) = first_answer(&b) {
                    if (400..500).contains(&status) && status != 422 {
                        assert!(head.contains("application/json"), "{head}");
                        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                        assert!(v["error"].is_string(), "{v}");
                    }
                }
            } else {
                echoed += 1;
            }
        }
        assert!(
            differed.is_empty(),
            "{} of {CASES} differ:\n{}",
            differed.len(),
            differed.join("\n")
        );
        // The generator reaches both sides of the grammar.
        assert!(
            echoed > CASES / 10 && refused > CASES / 10,
            "{echoed} {refused}"
        );
    }

    /// Sends `bytes` on `s` and reads one answer (head and `content-length` body).
    async fn answer(s: &mut TcpStream, bytes: &[u8]) -> (u16, String, Vec<u8>) {
        s.write_all(bytes).await.unwrap();
        read_answer(s).await
    }

    async fn read_answer(s: &mut TcpStream) -> (u16, String, Vec<u8>) {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        tokio::time::timeout(BOUND, async {
            loop {
                if let Some(a) = first_answer(&got) {
                    return a;
                }
                let n = s.read(&mut buf).await.unwrap();
                assert!(
                    n > 0,
                    "closed before a whole answer: {:?}",
                    String::from_utf8_lossy(&got)
                );
                got.extend_from_slice(&buf[..n]);
            }
        })
        .await
        .expect("answered")
    }

    /// A service's own `date` is sent instead of ours, and its `connection: close` (an
    /// option among others, in any case) ends the connection after the answer.
    #[tokio::test]
    async fn an_answers_own_date_and_connection_close_are_heeded() {
        const DATE: &str = "Sat, 05 Dec 2026 00:00:00 GMT";
        const GET: &[u8] = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n";
        let (addr, _closing) = ours(Fields(&[("date", DATE), ("connection", "x-a, Close")])).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        let (status, head, body) = answer(&mut s, GET).await;
        assert_eq!((status, &body[..]), (200, &b"ok"[..]));
        assert_eq!(head.matches("\r\ndate: ").count(), 1, "{head}");
        // (The helper gives the head in lower case.)
        let date = DATE.to_ascii_lowercase();
        assert!(head.contains(&format!("\r\ndate: {date}\r\n")), "{head}");
        assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
        let mut rest = Vec::new();
        let read = tokio::time::timeout(BOUND, s.read_to_end(&mut rest)).await;
        assert!(
            matches!(read, Ok(Ok(0))),
            "closed after the answer: {read:?}"
        );

        // Without it, the connection carries the next request.
        let (addr, _closing) = ours(Fields(&[("connection", "x-a")])).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        for _ in 0..2 {
            let (status, head, _) = answer(&mut s, GET).await;
            assert_eq!(status, 200);
            assert!(!head.contains("connection"), "{head}");
            assert_eq!(head.matches("\r\ndate: ").count(), 1, "{head}");
        }
    }

    #[tokio::test]
    async fn pipelined_requests_are_answered_in_order_on_one_connection() {
        let (addr, _closing) = ours(Echo).await;
        let two = b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\n\r\n1GET /b HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";
        let got = exchange(addr, two).await;
        let (status, head, body) = first_answer(&got).expect("the first answered");
        assert_eq!(status, 200);
        assert!(
            head.contains("\r\ndate: ") && !head.contains("connection"),
            "{head}"
        );
        assert!(body.starts_with(b"POST /a HTTP/1.1\n") && body.ends_with(b"\n1"));
        let rest = &got[head.len() + body.len()..];
        let (status, head, body) = first_answer(rest).expect("the second answered");
        assert_eq!(status, 200);
        assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
        assert!(
            body.starts_with(b"GET /b HTTP/1.1\n"),
            "{:?}",
            String::from_utf8_lossy(&body)
        );
        assert_eq!(
            rest.len(),
            head.len() + body.len(),
            "nothing after the last answer"
        );
    }

    #[tokio::test]
    async fn expect_100_continue_is_answered_when_the_body_is_first_read() {
        let (addr, _closing) = ours(Echo).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(
            b"POST /c HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: 5\r\n\r\n",
        )
        .await
        .unwrap();
        let mut interim = [0u8; CONTINUE.len()];
        tokio::time::timeout(BOUND, s.read_exact(&mut interim))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&interim, CONTINUE);
        let (status, _, body) = answer(&mut s, b"hello").await;
        assert_eq!(status, 200);
        // The expectation was this hop's to meet: it is not passed on.
        let body = String::from_utf8(body).unwrap();
        assert!(!body.contains("expect"), "{body}");
        assert!(body.ends_with("\nhello"), "{body}");
    }

    /// Data frames whose total length is not known before the last.
    struct Frames(std::collections::VecDeque<Bytes>);

    impl ResponseBody for Frames {}

    impl Body for Frames {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Ready(self.0.pop_front().map(|d| Ok(Frame::data(d))))
        }
    }

    /// Answers every request with what its function makes, without reading the request.
    struct Fixed<B>(fn() -> Response<B>);

    impl<B> Clone for Fixed<B> {
        fn clone(&self) -> Self {
            Fixed(self.0)
        }
    }

    impl<B> tower_service::Service<Request<RequestBody>> for Fixed<B> {
        type Response = Response<B>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Response<B>, Infallible>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _req: Request<RequestBody>) -> Self::Future {
            std::future::ready(Ok((self.0)()))
        }
    }

    /// An answer with fields of our stamp's names in its map, and a stamp with two set.
    fn stamped_answer() -> Response<crate::body::ProxyBody> {
        let mut resp = Response::new(crate::body::ProxyBody::full(Bytes::from_static(b"ok")));
        let h = resp.headers_mut();
        h.insert("x-request-id", HeaderValue::from_static("upstream-id"));
        h.insert("server-timing", HeaderValue::from_static("db;dur=1.5"));
        h.insert(
            "x-switchyard-variant",
            HeaderValue::from_static("upstream-variant"),
        );
        let stamp = resp.body_mut().stamp_mut();
        stamp.request_id = Some(HeaderValue::from_static("ours-1"));
        stamp.variant = Some(HeaderValue::from_static("blue"));
        resp
    }

    #[tokio::test]
    async fn a_stamp_is_written_with_the_head_and_replaces_the_maps_fields_it_sets() {
        let (addr, _closing) = ours(Fixed(stamped_answer)).await;
        let answer = exchange(
            addr,
            b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await;
        let answer = String::from_utf8(answer).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        let mut fields: Vec<&str> = head.lines().skip(1).collect();
        fields.sort_unstable();
        fields.retain(|f| !f.starts_with("date: "));
        assert_eq!(
            fields,
            [
                "connection: close",
                "content-length: 2",
                // Not set in the stamp: the map's is kept.
                "server-timing: db;dur=1.5",
                "x-request-id: ours-1",
                "x-switchyard-variant: blue",
            ],
            "{answer}"
        );
        assert_eq!(body, "ok");
    }

    /// A body of unknown length.
    fn unsized_answer() -> Response<Frames> {
        let frames = [Bytes::from_static(b"abc"), Bytes::from_static(b"def")];
        Response::new(Frames(frames.into()))
    }

    #[tokio::test]
    async fn answers_of_unknown_length_are_chunked_and_to_http_1_0_end_with_the_close() {
        let (addr, _closing) = ours(Fixed(unsized_answer)).await;
        let chunked = exchange(addr, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
        let chunked = String::from_utf8(chunked).unwrap();
        assert!(
            chunked.contains("\r\ntransfer-encoding: chunked\r\n"),
            "{chunked}"
        );
        assert!(
            chunked.ends_with("\r\n\r\n3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n"),
            "{chunked}"
        );
        let old = exchange(addr, b"GET / HTTP/1.0\r\nconnection: keep-alive\r\n\r\n").await;
        let old = String::from_utf8(old).unwrap();
        assert!(old.contains("\r\nconnection: close\r\n"), "{old}");
        assert!(
            !old.contains("transfer-encoding") && !old.contains("content-length"),
            "{old}"
        );
        assert!(old.ends_with("\r\n\r\nabcdef"), "{old}");
        // HEAD: the fields, no body.
        let head = exchange(
            addr,
            b"HEAD / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await;
        let head = String::from_utf8(head).unwrap();
        assert!(
            head.starts_with("HTTP/1.1 200 OK\r\n") && head.ends_with("\r\n\r\n"),
            "{head}"
        );
    }

    /// An answer given at once, before the body is read.
    fn early_answer() -> Response<Full<Bytes>> {
        let mut resp = Response::new(Full::new(Bytes::from_static(b"too large")));
        *resp.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
        resp
    }

    #[tokio::test]
    async fn an_answer_before_the_body_closes_the_connection_after_it_and_reaches_the_client() {
        let (addr, _closing) = ours(Fixed(early_answer)).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        // A body the server never reads, larger than what the kernel buffers at once.
        s.write_all(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 1000000\r\n\r\n")
            .await
            .unwrap();
        let writer = tokio::spawn(async move {
            let chunk = vec![b'x'; 64 * 1024];
            for _ in 0..16 {
                if s.write_all(&chunk).await.is_err() {
                    break;
                }
            }
            s
        });
        let mut s = writer.await.unwrap();
        let mut got = Vec::new();
        let _ = tokio::time::timeout(BOUND, s.read_to_end(&mut got))
            .await
            .expect("closed");
        let (status, head, body) = first_answer(&got).expect("the answer reached the client");
        assert_eq!(status, 413);
        assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
        assert_eq!(body, b"too large");
    }

    const LARGE: usize = 32 << 20;

    /// 32 MiB, more than loopback's socket buffers hold.
    fn large_answer() -> Response<Full<Bytes>> {
        Response::new(Full::new(Bytes::from(vec![b'x'; LARGE])))
    }

    #[tokio::test]
    async fn a_client_that_takes_none_of_its_answer_is_closed_after_client_send_timeout() {
        // The servers here have a 300 ms `client_send_timeout`.
        let (addr, _closing) = ours(Fixed(large_answer)).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        // Not reading, for well past the timeout: the server's writes block.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut got = Vec::new();
        tokio::time::timeout(BOUND, s.read_to_end(&mut got))
            .await
            .expect("the server closed the connection")
            .unwrap();
        assert!(
            got.starts_with(b"HTTP/1.1 200 OK\r\n"),
            "{:?}",
            &got[..got.len().min(64)]
        );
        assert!(
            got.len() < LARGE,
            "the answer was cut short: {} bytes",
            got.len()
        );
    }

    #[tokio::test]
    async fn bad_heads_are_refused_with_json_and_the_connection_closed() {
        let (addr, _closing) = ours(Echo).await;
        let big = format!("GET / HTTP/1.1\r\nx-big: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        let many: String = (0..=MAX_HEADERS)
            .map(|i| format!("x-{i}: {i}\r\n"))
            .collect();
        let many = format!("GET / HTTP/1.1\r\n{many}\r\n");
        let cases: [(&[u8], u16); 6] = [
            (big.as_bytes(), 431),
            (many.as_bytes(), 431),
            (b"GET / HTTP/1.1\r\nbad field: 1\r\n\r\n", 400),
            (b"GET /\xff HTTP/1.1\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\ntransfer-encoding: gzip\r\n\r\n", 400),
            (
                b"POST / HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
                400,
            ),
        ];
        for (bytes, want) in cases {
            let got = exchange(addr, bytes).await;
            let (status, head, body) = first_answer(&got).expect("answered");
            assert_eq!(
                status,
                want,
                "{}",
                String::from_utf8_lossy(&bytes[..40.min(bytes.len())])
            );
            assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert!(v["error"].is_string(), "{v}");
        }
        // The smuggling shape: the length is dropped, the body read as chunked, and the
        // connection closed after the answer.
        let got = exchange(addr, b"POST / HTTP/1.1\r\ncontent-length: 99\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n").await;
        let (status, head, body) = first_answer(&got).expect("answered");
        assert_eq!(status, 200);
        assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
        assert!(
            body.ends_with(b"\nok"),
            "{:?}",
            String::from_utf8_lossy(&body)
        );
    }

    #[tokio::test]
    async fn a_head_that_stops_coming_gets_408_and_an_idle_connection_a_silent_close() {
        let (addr, _closing) = ours(Echo).await;
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nx-slow: a")
            .await
            .unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(BOUND, s.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
        let (status, _, body) = first_answer(&got).expect("answered");
        assert_eq!(status, 408);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(
            v["error"]
                .as_str()
                .unwrap()
                .contains("client_header_timeout"),
            "{v}"
        );
        let mut idle = TcpStream::connect(addr).await.unwrap();
        let (status, _, _) = answer(&mut idle, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
        assert_eq!(status, 200);
        let mut rest = Vec::new();
        tokio::time::timeout(BOUND, idle.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap();
        assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    }

    /// The listener closing closes a keep-alive connection waiting for its next head,
    /// busy (not parked) or parked, at once: neither waits for the client, the header
    /// timeout or parking (all a minute here).
    #[tokio::test]
    async fn the_listener_closing_closes_idle_connections_busy_or_parked() {
        for park_after in [Duration::from_secs(60), Duration::from_millis(50)] {
            let (addr, closing) = ours_idle(Echo, Duration::from_secs(60), park_after).await;
            let mut idle = TcpStream::connect(addr).await.unwrap();
            let (status, _, _) = answer(&mut idle, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await;
            assert_eq!(status, 200);
            if park_after < Duration::from_secs(1) {
                // Parked by now.
                tokio::time::sleep(park_after * 4).await;
            }
            closing.close();
            let mut rest = Vec::new();
            tokio::time::timeout(BOUND, idle.read_to_end(&mut rest))
                .await
                .unwrap_or_else(|_| panic!("still open (park_after {park_after:?})"))
                .unwrap();
            assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
        }
    }
}
