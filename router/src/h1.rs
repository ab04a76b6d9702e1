//! HTTP/1.1 to upstreams, with a codec of our own (RFC 9112), used by the pool in
//! [`crate::upstream`].
//!
//! - The request head is written straight from the client's headers (borrowed, not
//!   cloned per try) into a buffer the connection keeps, and goes out with the body's
//!   first frame in one `writev`.
//! - The answer's head is parsed with `httparse` out of a read buffer the connection
//!   keeps; header values and body frames are slices of that buffer, not copies.
//! - It all runs in the task of the request that holds the connection: no task per
//!   connection, no channels, no callbacks.
//!
//! Why not hyper's `client::conn::http1`: its HTTP/1.1 handling was 14% of the proxy's
//! user time on the upstream leg alone, with five allocations per request (a body
//! channel, a response callback, read buffers re-reserved; BENCHMARKS.md). The upstream
//! leg is the one where we choose the peer, so it is where a codec of our own is
//! cheapest to get right; clients still meet hyper's server.
//!
//! What an answer must be to be read (anything else fails the try as a protocol error,
//! and the connection is closed):
//! - A head of at most [`MAX_HEAD`] bytes and [`MAX_HEADERS`] fields, valid to httparse.
//! - Interim answers (`100 Continue`, `103 Early Hints`) are read and dropped; `101` was
//!   never asked for and is refused.
//! - Framing as RFC 9112 §6.3 orders it: no body for `HEAD`, `204` and `304`; then
//!   `transfer-encoding` (chunked last, else read to the close; a `content-length` beside
//!   it is dropped and the connection not reused); then `content-length` (every value
//!   the same number); else read to the close. HTTP/1.0 with `transfer-encoding` is
//!   refused (§6.1: faulty framing). `content-length` is framing, not a field passed
//!   on: the body's size hint carries it, and the map has it only where the body does
//!   not carry the length it says (HEAD, 204, 304).
//! - Chunk-size lines of at most [`MAX_CHUNK_LINE`] bytes; trailers bounded like heads,
//!   and passed on as a trailers frame.
//!
//! A connection is reused only when the answer said nothing against it (`connection:
//! close`, HTTP/1.0 without `keep-alive`, a body read to the close), the whole request
//! was sent, and nothing came after the answer's end.

use std::io::{self, IoSlice, Write as _};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HOST, TE, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;

use crate::body::LimitedBody;

/// Largest answer head (status line and fields), and largest trailer section. nginx
/// refuses upstream heads over 4–8 KiB (`proxy_buffer_size`); model servers send a
/// handful of fields.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most fields in an answer head or a trailer section (hyper's default).
pub const MAX_HEADERS: usize = 100;
/// Longest chunk-size line, extensions included.
pub const MAX_CHUNK_LINE: usize = 4 * 1024;
/// What a read asks the kernel for at least; the buffer is reused between answers.
pub(crate) const READ_SIZE: usize = 8 * 1024;
/// Most a body read asks for at once: larger bodies pass as frames of this size.
const BODY_READ: usize = 64 * 1024;

/// An error of the HTTP/1.1 exchange, before it becomes a [`crate::upstream::SendError`].
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    /// Reading or writing the connection failed.
    #[error("connection to the upstream failed: {0}")]
    Io(#[source] io::Error),
    /// The upstream closed the connection early; says when.
    #[error("the upstream closed the connection {0}")]
    Closed(&'static str),
    /// The upstream's answer broke HTTP/1.1.
    #[error("malformed answer from the upstream: {0}")]
    Malformed(String),
    /// The body being sent failed (the client's request body upstream: too large,
    /// stalled, broken, told apart by its type; an answer's body to a client).
    #[error("{0}")]
    Body(Box<dyn std::error::Error + Send + Sync>),
}

impl From<io::Error> for H1Error {
    fn from(e: io::Error) -> Self {
        H1Error::Io(e)
    }
}

/// One keep-alive connection to an upstream, with the buffers it keeps between
/// exchanges.
#[derive(Debug)]
pub struct Conn {
    io: TcpStream,
    read: BytesMut,
    write: Vec<u8>,
    /// The names of the last answer's fields: the next answer's are the same.
    names: Names,
    /// Bounds each exchange's wait for its answer ([`Conn::exchange`]'s deadline). One
    /// timer for the connection's life, set again for each exchange: a timer made and
    /// dropped per request took a lock on the runtime's timer wheel twice (to register
    /// and to remove it), where moving a registered one to a later time does not. Made
    /// at the first wait, boxed so that the connection moves freely.
    timer: Option<Pin<Box<crate::clock::Alarm>>>,
}

/// A request head, borrowed: `headers` are the client's (hop-by-hop already removed);
/// `set` are written first and replace the client's fields of the same names.
#[derive(Debug)]
pub struct RequestHead<'a> {
    /// The method.
    pub method: &'a Method,
    /// Origin form: `/path?query`.
    pub target: &'a str,
    /// The client's fields.
    pub headers: &'a HeaderMap,
    /// Fields this hop sets (`host`, `x-request-id`, ...).
    pub set: &'a [(&'a HeaderName, &'a HeaderValue)],
    /// How many fields the caller will add to the answer's head: its map is made with
    /// room for them, so that adding them does not grow it (two allocations).
    pub answer_room: usize,
}

/// A request whose bytes have not reached the connection: what a stale keep-alive
/// connection hands back to be sent on another one.
#[derive(Debug)]
pub struct Unsent {
    /// The body's first frame, already taken from it.
    pub first: Option<Bytes>,
    /// The rest of the body; `None` once it has ended.
    pub body: Option<LimitedBody>,
}

/// How an exchange failed.
#[derive(Debug)]
pub enum Failed {
    /// A reused connection failed before any byte of the request was written: the
    /// upstream had closed it (the keep-alive race). The request may go again.
    Stale(Unsent),
    /// No answer's head by the deadline.
    TimedOut,
    /// Anything else.
    Error(H1Error),
}

impl From<H1Error> for Failed {
    fn from(e: H1Error) -> Self {
        Failed::Error(e)
    }
}

impl Conn {
    /// A fresh connection. Boxed: it moves from the pool into an exchange, into the
    /// answer's body and back, and an answer is moved through every layer of a
    /// request's stack; by its box that is 8 bytes, not 120.
    pub fn new(io: TcpStream) -> Box<Self> {
        Box::new(Conn {
            io,
            read: BytesMut::new(),
            write: Vec::new(),
            names: Names::default(),
            timer: None,
        })
    }

    /// Whether an idle connection can take a request: the upstream has not closed it
    /// and sent nothing unasked. Costs a system call only when the socket has become
    /// readable since it went idle.
    pub fn is_open(&self) -> bool {
        if !self.read.is_empty() {
            return false;
        }
        let mut probe = [0u8; 1];
        matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Sends the request and reads the answer's head, by `deadline` ([`Failed::TimedOut`]
    /// past it). `reused`: the connection has carried an exchange before, so a failure to
    /// write anything is the keep-alive race ([`Failed::Stale`]).
    ///
    /// An `async move` block, not an `async fn`, which would keep a second copy of the
    /// connection and the unsent body in its future: the request's whole try is one
    /// boxed future of such nested ones, each copied into the one that awaits it.
    #[allow(clippy::manual_async_fn)] // on purpose: see above
    pub fn exchange<'a, 'b>(
        mut self: Box<Self>,
        head: &'a RequestHead<'b>,
        unsent: Unsent,
        reused: bool,
        deadline: tokio::time::Instant,
    ) -> impl std::future::Future<Output = Result<Response<Answer>, Failed>> + Send + use<'a, 'b>
    {
        async move {
            let body_hint = match (&unsent.first, &unsent.body) {
                (first, Some(body)) => {
                    let hint = body.size_hint();
                    hint.exact()
                        .map(|n| n + first.as_ref().map_or(0, |f| f.len() as u64))
                }
                (Some(first), None) => Some(first.len() as u64),
                (None, None) => Some(0),
            };
            self.write.clear();
            encode_head(&mut self.write, head, body_hint);
            let mut writer = Writer::new(unsent.first, unsent.body, body_hint, false);
            let head_request = head.method == Method::HEAD;
            let room = head.answer_room;
            let parsed = std::future::poll_fn(|cx| {
                let polled = self.poll_exchange(cx, &mut writer, reused, head_request, room);
                if polled.is_pending() && self.expired(cx, deadline) {
                    return Poll::Ready(Err(Failed::TimedOut));
                }
                polled
            })
            .await?;
            let (parts, framing, mut keep) = parsed;
            // An answer that came before the whole request went out: the rest of the
            // request can never be sent on this connection.
            keep &= writer.done();
            Ok(Response::from_parts(
                parts,
                Answer {
                    conn: Some(self),
                    framing,
                    keep,
                },
            ))
        }
    }

    /// One turn of an exchange: writes what it can of the request, and reads what has
    /// come of the answer's head.
    fn poll_exchange(
        &mut self,
        cx: &mut Context<'_>,
        writer: &mut Writer<LimitedBody>,
        reused: bool,
        head_request: bool,
        room: usize,
    ) -> Poll<Result<(http::response::Parts, Framing, bool), Failed>> {
        if !writer.done() {
            match writer.poll_write(&mut self.io, &mut self.write, cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => {
                    if reused && writer.progress == 0 && matches!(e, H1Error::Io(_)) {
                        return Poll::Ready(Err(Failed::Stale(writer.take_unsent(&self.write))));
                    }
                    return Poll::Ready(Err(Failed::Error(e)));
                }
                // Still sending: an upstream may answer before it has read the whole
                // request (an early 413, say); look for that.
                Poll::Pending => {
                    return match self.poll_head(cx, head_request, room) {
                        Poll::Ready(Ok(parsed)) => Poll::Ready(Ok(parsed)),
                        // A failure to read shows as a failure to write soon enough;
                        // that one says more.
                        Poll::Ready(Err(_)) | Poll::Pending => Poll::Pending,
                    };
                }
            }
        }
        self.poll_head(cx, head_request, room)
            .map_err(Failed::Error)
    }

    /// Whether `deadline` has passed, the timer set to wake this task by then if not
    /// ([`crate::clock::Alarm::due`]: the connection's timer, left from its last exchange,
    /// is moved only when it would be late).
    fn expired(&mut self, cx: &mut Context<'_>, deadline: tokio::time::Instant) -> bool {
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(crate::clock::Alarm::until(deadline)));
        timer.as_mut().due(deadline, cx)
    }

    /// Reads until a whole final head has come; drops interim answers.
    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        head_request: bool,
        room: usize,
    ) -> Poll<Result<(http::response::Parts, Framing, bool), H1Error>> {
        loop {
            if !self.read.is_empty() {
                if let Some(parsed) =
                    parse_head(&mut self.read, &mut self.names, head_request, room)?
                {
                    return Poll::Ready(Ok(parsed));
                }
                if self.read.len() >= MAX_HEAD {
                    return Poll::Ready(Err(H1Error::Malformed(format!(
                        "answer head larger than {MAX_HEAD} bytes"
                    ))));
                }
            }
            if ready!(self.poll_fill(cx, READ_SIZE))? == 0 {
                return Poll::Ready(Err(H1Error::Closed(if self.read.is_empty() {
                    "before answering"
                } else {
                    "in the middle of the answer's head"
                })));
            }
        }
    }

    /// Reads what the kernel has into the read buffer, with room for at least `want`
    /// more (at most [`BODY_READ`]); `0` at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        poll_read_buf(&mut self.io, &mut self.read, cx, want)
    }
}

/// Reads what the kernel has into `buf`, with room for at least `want` more (at most
/// [`BODY_READ`]); `0` at the end of the stream.
pub(crate) fn poll_read_buf<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
    want: usize,
) -> Poll<io::Result<usize>> {
    let want = want.clamp(1, BODY_READ);
    if buf.capacity() - buf.len() < want {
        // Reclaims the buffer in place when every slice of it handed out before has
        // been dropped (the usual case: the last message was passed on).
        buf.reserve(want.max(READ_SIZE));
    }
    let read = std::pin::pin!(io.read_buf(buf));
    std::future::Future::poll(read, cx)
}

/// Writes the request line and fields into `out`; the framing field from `length`
/// (`None`: chunked).
fn encode_head(out: &mut Vec<u8>, head: &RequestHead<'_>, length: Option<u64>) {
    out.extend_from_slice(head.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(head.target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut field = |name: &HeaderName, value: &HeaderValue| {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    };
    for (name, value) in head.set {
        field(name, value);
    }
    for (name, value) in head.headers {
        // Framing is this hop's: from the body as it will be sent. `host` is the
        // upstream's. Hop-by-hop fields were removed before, but for `te: trailers`,
        // kept for h2c and gRPC upstreams: over HTTP/1.1 it would need `connection:
        // te` (RFC 9110 §10.1.4), and an HTTP/1.1 answer's trailers are not passed on.
        if name == CONTENT_LENGTH
            || name == TRANSFER_ENCODING
            || name == HOST
            || name == TE
            || head.set.iter().any(|(set, _)| *set == name)
        {
            continue;
        }
        field(name, value);
    }
    match length {
        None => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        // A body-less request of a method that carries none says nothing (as curl
        // and hyper do); the others say 0.
        Some(0) if !matches!(*head.method, Method::POST | Method::PUT | Method::PATCH) => {}
        Some(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
    out.extend_from_slice(b"\r\n");
}

/// A message going out (a request to an upstream, an answer to a client): its head in
/// the connection's write buffer, then the body frame by frame (chunked when its length
/// is unknown), each frame written with what is buffered before it in one system call.
/// A small frame of a body of known length is copied in after the head
/// ([`COALESCE_BYTES`]), so that a small message goes out as one buffer.
pub(crate) struct Writer<B> {
    pub(crate) body: Option<B>,
    chunked: bool,
    /// The length the head declared, checked against what the body yields.
    declared: Option<u64>,
    sent: u64,
    /// What of the connection's write buffer has gone out.
    pos: usize,
    /// The frame being written, then `tail` (a chunk's CRLF).
    data: Bytes,
    tail: &'static [u8],
    /// Bytes that reached the connection.
    pub(crate) progress: u64,
    /// The last `Pending` was the connection's (its send buffer full), not the body's.
    pub(crate) io_pending: bool,
    /// The body has ended and its end is in the write buffer.
    ended: bool,
    /// Where the body's bytes copied into the write buffer begin, while it holds some.
    copied_at: Option<usize>,
}

/// The most a write buffer holds with body bytes copied into it. One buffer written
/// with `send` costs the kernel less than a head and a body with `writev`: 0.15-0.2 µs
/// of 6.6 per send-and-receive of 266 bytes on loopback, still ahead at 4 KiB (the copy
/// costs user time that grows with the size), even at 16 KiB (an ad-hoc C loop, BENCHMARKS.md).
const COALESCE_BYTES: usize = 4096;

impl Writer<LimitedBody> {
    /// What has not been sent, for another connection (only before any byte went out,
    /// so `write` still holds the head and what was copied after it).
    fn take_unsent(&mut self, write: &[u8]) -> Unsent {
        let data = std::mem::take(&mut self.data);
        let copied = self.copied_at.take().map_or(&[][..], |at| &write[at..]);
        let first = match (copied.is_empty(), data.is_empty()) {
            (true, true) => None,
            (true, false) => Some(data),
            // The keep-alive race only: a copy is fine.
            (false, _) => Some(Bytes::from([copied, &data[..]].concat())),
        };
        Unsent {
            first,
            body: self.body.take(),
        }
    }
}

impl<B> Writer<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// A writer of `body` (`None`: no body to send) after the head already in the write
    /// buffer; `first`, a frame already taken from the body; `declared`, the length the
    /// head gave (`None`: chunked); `close_delimited`, the body ends with the connection
    /// and is sent as it is (an answer to an HTTP/1.0 client).
    pub(crate) fn new(
        first: Option<Bytes>,
        body: Option<B>,
        declared: Option<u64>,
        close_delimited: bool,
    ) -> Self {
        Writer {
            sent: first.as_ref().map_or(0, |f| f.len() as u64),
            data: first.unwrap_or_default(),
            tail: b"",
            body,
            chunked: declared.is_none() && !close_delimited,
            declared,
            pos: 0,
            progress: 0,
            io_pending: false,
            ended: false,
            copied_at: None,
        }
    }

    /// Everything, head and body, has gone out.
    pub(crate) fn done(&self) -> bool {
        self.ended && self.data.is_empty() && self.tail.is_empty() && self.pos == 0
    }

    /// Writes the buffered head and the body to `io` until all is out.
    pub(crate) fn poll_write<W: AsyncWrite + Unpin>(
        &mut self,
        io: &mut W,
        write: &mut Vec<u8>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), H1Error>> {
        loop {
            // The next frame once the last is out (so that a chunk's size line never
            // overtakes its predecessor's CRLF).
            if self.data.is_empty() && self.tail.is_empty() && !self.ended {
                match self.poll_frame(cx) {
                    Poll::Ready(Ok(Some(data))) => {
                        if self.chunked {
                            // Into a Vec: cannot fail.
                            let _ = write!(write, "{:x}\r\n", data.len());
                            self.tail = b"\r\n";
                            self.data = data;
                        } else if write.len() + data.len() <= COALESCE_BYTES {
                            self.copied_at.get_or_insert(write.len());
                            write.extend_from_slice(&data);
                        } else {
                            self.data = data;
                        }
                    }
                    Poll::Ready(Ok(None)) => {
                        self.ended = true;
                        if self.chunked {
                            write.extend_from_slice(b"0\r\n\r\n");
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    // The body has no more yet: write what there is meanwhile.
                    Poll::Pending if write.len() == self.pos => {
                        self.io_pending = false;
                        return Poll::Pending;
                    }
                    Poll::Pending => {}
                }
            }
            let buffered = &write[self.pos..];
            if buffered.is_empty() && self.data.is_empty() && self.tail.is_empty() {
                write.clear();
                self.pos = 0;
                self.copied_at = None;
                if self.ended {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            // One buffer when there is one (`send`), else the non-empty ones in order.
            let written = match (
                buffered.is_empty(),
                self.data.is_empty(),
                self.tail.is_empty(),
            ) {
                (false, true, true) => Pin::new(&mut *io).poll_write(cx, buffered),
                (true, false, true) => Pin::new(&mut *io).poll_write(cx, &self.data),
                _ => {
                    let all = [buffered, &self.data[..], self.tail];
                    let mut slices = [IoSlice::new(&[]); 3];
                    let mut n = 0;
                    for part in all.into_iter().filter(|p| !p.is_empty()) {
                        slices[n] = IoSlice::new(part);
                        n += 1;
                    }
                    Pin::new(&mut *io).poll_write_vectored(cx, &slices[..n])
                }
            };
            self.io_pending = written.is_pending();
            let mut n = ready!(written)?;
            self.progress += n as u64;
            if n == 0 {
                return Poll::Ready(Err(H1Error::Io(io::ErrorKind::WriteZero.into())));
            }
            let from_head = n.min(buffered.len());
            self.pos += from_head;
            n -= from_head;
            let from_data = n.min(self.data.len());
            self.data.advance(from_data);
            n -= from_data;
            self.tail = &self.tail[n..];
            if self.pos == write.len() {
                write.clear();
                self.pos = 0;
                self.copied_at = None;
            }
        }
    }

    /// The body's next data frame (`None` at its end), its length checked against the
    /// head's.
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, H1Error>> {
        let Some(body) = &mut self.body else {
            return Poll::Ready(Ok(None));
        };
        loop {
            match ready!(Pin::new(&mut *body).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    // Trailers of a client's body are not passed on over HTTP/1.1.
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    if data.is_empty() {
                        continue;
                    }
                    self.sent += data.len() as u64;
                    if self.declared.is_some_and(|d| self.sent > d) {
                        return Poll::Ready(Err(H1Error::Body(
                            "the body is longer than its content-length".into(),
                        )));
                    }
                    return Poll::Ready(Ok(Some(data)));
                }
                Some(Err(e)) => return Poll::Ready(Err(H1Error::Body(e.into()))),
                None => {
                    self.body = None;
                    if self.declared.is_some_and(|d| self.sent != d) {
                        return Poll::Ready(Err(H1Error::Body(
                            "the body is shorter than its content-length".into(),
                        )));
                    }
                    return Poll::Ready(Ok(None));
                }
            }
        }
    }
}

/// How an answer's body is delimited, and how far it has been read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// This many bytes left.
    Length(u64),
    /// Chunked, before a chunk-size line.
    ChunkSize,
    /// Chunked, this many bytes of the current chunk left.
    ChunkData(u64),
    /// Chunked, the CRLF after a chunk's data.
    ChunkEnd,
    /// Chunked, after the last chunk: trailers or the final CRLF.
    Trailers,
    /// Until the upstream closes.
    Close,
    /// Ended.
    Done,
    /// Broke off; nothing more will be read.
    Failed,
}

/// Parses a final answer head out of `buf`, dropping interim answers before it; `None`
/// while incomplete. Returns the head, its framing and whether the connection may be
/// reused after it.
fn parse_head(
    buf: &mut BytesMut,
    names: &mut Names,
    head_request: bool,
    room: usize,
) -> Result<Option<(http::response::Parts, Framing, bool)>, H1Error> {
    loop {
        let (len, code, version, spans) =
            {
                let mut fields = field_room();
                let mut parsed = httparse::Response::new(&mut []);
                let len = match httparse::ParserConfig::default()
                    .parse_response_with_uninit_headers(&mut parsed, buf, &mut fields)
                {
                    Ok(httparse::Status::Complete(len)) => len,
                    Ok(httparse::Status::Partial) => return Ok(None),
                    Err(e) => return Err(H1Error::Malformed(format!("bad answer head: {e}"))),
                };
                // httparse returns these for every complete head.
                let code = parsed.code.unwrap_or_default();
                let version = parsed.version.unwrap_or_default();
                (len, code, version, Spans::of(buf, parsed.headers))
            };
        if (100..200).contains(&code) {
            if code == 101 {
                return Err(H1Error::Malformed(
                    "101 Switching Protocols, which was not asked for".into(),
                ));
            }
            // `100 Continue`, `103 Early Hints`: the final answer follows.
            buf.advance(len);
            continue;
        }
        let status = StatusCode::from_u16(code)
            .map_err(|_| H1Error::Malformed(format!("bad status code {code}")))?;
        let head = buf.split_to(len).freeze();
        let (mut headers, facts) =
            fields(&head, &spans, names, spans.len() + room).map_err(H1Error::Malformed)?;
        let version = if version == 0 {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        let (framing, keep) = framing(status, version, &mut headers, facts, head_request)?;
        let mut parts = Response::new(()).into_parts().0;
        parts.status = status;
        parts.version = version;
        parts.headers = headers;
        return Ok(Some((parts, framing, keep)));
    }
}

/// The fields of a `head` (split off its buffer; `spans`: each field's name and value
/// as offsets and lengths in it, as httparse found them) in a map with room for
/// `capacity`, names reused from `names`; and what its framing fields say ([`Facts`]).
/// An error says which field is bad. Requests' heads and answers' are read by it alike.
// Inlined into both callers, each on every request's path: as a call returning its map it
// measured +200 to +300 instructions per request (`bench/instructions.sh`), inlined +56.
#[inline(always)]
pub(crate) fn fields(
    head: &Bytes,
    spans: &Spans,
    names: &mut Names,
    capacity: usize,
) -> Result<(HeaderMap, Facts), String> {
    let mut headers = header_map(capacity);
    let mut facts = Facts::default();
    for (i, &[name, name_len, value, value_len]) in spans.0.iter().enumerate() {
        let (name, bit, list) = names
            .name(i, &head[name as usize..(name + name_len) as usize])
            .ok_or_else(|| "bad field name".to_string())?;
        let range = value as usize..(value + value_len) as usize;
        let raw = &head[range.clone()];
        // The framing fields are read from the head's bytes, before (or instead of) a
        // value of their own: a value is a slice of the head, whose reference count is
        // an atomic add and subtract (`bench/instructions.sh`, `LOCKS=1`).
        if bit.has(Present::CONNECTION) {
            let options = connection_options(raw);
            facts.close |= options.close;
            facts.keep_alive |= options.keep_alive;
            if !options.other {
                // Only `close` and `keep-alive`, both now in the facts: the field is this
                // hop's and stays out of the map, so that nothing has to find it there and
                // remove it (`connection: keep-alive` on nearly every upstream answer:
                // 2% of the proxy's instructions). One that names other fields goes in,
                // for `strip_hop_by_hop` to remove them with it.
                facts.present |= Present::CONNECTION;
                continue;
            }
        }
        facts.present |= bit;
        if bit.has(Present::CONTENT_LENGTH) {
            // Kept out of the map: the length is the body's (its size hint), which each
            // writer frames by (ours, and hyper's h2, which adds the field from the
            // hint), and where the body does not carry it (an answer to HEAD, a 204 or
            // 304) the framing puts the field back ([`Length::restore`]).
            facts.length.add(raw);
            continue;
        }
        let value = match list.and_then(|list| Values::get(list, raw)) {
            Some(kept) => kept,
            None => HeaderValue::from_maybe_shared(head.slice(range))
                .map_err(|_| format!("bad value of field `{name}`"))?,
        };
        if bit.has(Present::CONTENT_TYPE) && value.as_bytes().starts_with(b"application/grpc") {
            facts.present |= Present::GRPC;
        }
        headers.append(name, value);
    }
    Ok((headers, facts))
}

/// What a head's framing fields say, read as its fields are put in their map: each
/// would otherwise be a hashed lookup after (`connection` and `content-length` are in
/// most heads).
#[derive(Debug, Default)]
pub(crate) struct Facts {
    /// Which of the fields the proxy looks up the head has ([`Present`]).
    pub present: Present,
    /// A `connection` field names `close`.
    pub close: bool,
    /// A `connection` field names `keep-alive`.
    pub keep_alive: bool,
    /// The `content-length` fields.
    pub length: Length,
}

/// The `content-length` of a head, field by field: every value, in every field, must be
/// the same number of at most 20 digits.
#[derive(Debug, Default)]
pub(crate) struct Length {
    value: Option<u64>,
    /// What is wrong, at the first value that is.
    bad: Option<String>,
}

impl Length {
    fn add(&mut self, field: &[u8]) {
        if self.bad.is_some() {
            return;
        }
        for n in field.split(|&b| b == b',') {
            let n = n.trim_ascii();
            let parsed = if n.is_empty() {
                None
            } else {
                n.iter().try_fold(0u64, |acc, &d| {
                    d.is_ascii_digit().then_some(())?;
                    acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
                })
            };
            match (parsed, self.value) {
                (None, _) => {
                    self.bad = Some(format!(
                        "bad content-length `{}`",
                        String::from_utf8_lossy(field)
                    ));
                    return;
                }
                (Some(n), Some(l)) if n != l => {
                    self.bad = Some("content-length values differ".into());
                    return;
                }
                (Some(n), _) => self.value = Some(n),
            }
        }
    }

    /// The length, if any, or an error saying what is wrong. (Not in the head's map:
    /// see [`fields`]. Repeated equal values so become one field as the body's length
    /// is written: a client's parser may read a list as an error.)
    pub(crate) fn resolve(self) -> Result<Option<u64>, String> {
        match self.bad {
            Some(bad) => Err(bad),
            None => Ok(self.value),
        }
    }

    /// Puts the field back in `headers` for a message whose body does not carry the
    /// length it says (an answer to HEAD, a 204 or 304): as one field, when its values
    /// agree; left out when they do not, as nothing is framed by it.
    fn restore(self, headers: &mut HeaderMap) {
        if let Ok(Some(n)) = self.resolve() {
            headers.insert(CONTENT_LENGTH, HeaderValue::from(n));
        }
    }
}

/// RFC 9112 §6.3, for an answer; puts `content-length` back in the map of an answer
/// whose body does not carry that length ([`Length::restore`]).
fn framing(
    status: StatusCode,
    version: Version,
    headers: &mut HeaderMap,
    facts: Facts,
    head_request: bool,
) -> Result<(Framing, bool), H1Error> {
    let present = facts.present;
    let mut keep = persistent(&facts, version);
    if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        if present.has(Present::CONTENT_LENGTH) {
            facts.length.restore(headers);
        }
        return Ok((Framing::Done, keep));
    }
    if present.has(Present::TRANSFER_ENCODING) {
        if version == Version::HTTP_10 {
            return Err(H1Error::Malformed(
                "transfer-encoding in an HTTP/1.0 answer".into(),
            ));
        }
        // The length was never put in the map (see [`fields`]), so it is not passed on.
        if present.has(Present::CONTENT_LENGTH) {
            keep = false;
        }
        return Ok(if chunked(headers) {
            (Framing::ChunkSize, keep)
        } else {
            (Framing::Close, false)
        });
    }
    let length = if present.has(Present::CONTENT_LENGTH) {
        facts.length.resolve().map_err(H1Error::Malformed)?
    } else {
        None
    };
    Ok(match length {
        Some(0) => (Framing::Done, keep),
        Some(n) => (Framing::Length(n), keep),
        None => (Framing::Close, false),
    })
}

thread_local! {
    /// The offsets of the last head's fields parsed on this thread, kept for the next:
    /// an array for the most a head may have (1.6 KiB, zeroed), beside httparse's for its
    /// fields (3.2 KiB, filled), was written for every head parsed, twice per request,
    /// where a head has a handful of fields.
    static SPANS: std::cell::Cell<Vec<[u32; 4]>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Where each field of a head parsed from a buffer lies in it: the name's offset and
/// length, then the value's. Offsets, not the fields httparse gives, because those
/// borrow the buffer, which is split off after. Goes back to this thread when dropped.
pub(crate) struct Spans(Vec<[u32; 4]>);

impl Spans {
    /// The fields httparse found in `buf`, as offsets into it.
    pub(crate) fn of(buf: &[u8], fields: &[httparse::Header<'_>]) -> Spans {
        let mut spans = SPANS.take();
        spans.clear();
        let base = buf.as_ptr() as usize;
        spans.extend(fields.iter().map(|field| {
            [
                (field.name.as_ptr() as usize - base) as u32,
                field.name.len() as u32,
                (field.value.as_ptr() as usize - base) as u32,
                field.value.len() as u32,
            ]
        }));
        Spans(spans)
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
}

impl Drop for Spans {
    fn drop(&mut self) {
        SPANS.set(std::mem::take(&mut self.0));
    }
}

/// Room for httparse to write a head's fields into, left unwritten until it does.
pub(crate) fn field_room<'b>() -> [std::mem::MaybeUninit<httparse::Header<'b>>; MAX_HEADERS] {
    [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS]
}

/// Most header maps kept per thread for reuse.
const POOLED_MAPS: usize = 64;
/// Larger maps are let go, not kept: one odd message must not pin its memory.
const POOLED_MAP_CAPACITY: usize = 64;

thread_local! {
    /// Header maps of messages already passed on, emptied, for the next heads parsed on
    /// this thread: a map is two allocations (its index and its entries), and every
    /// request parses two heads (the client's, the upstream's answer).
    static MAPS: std::cell::RefCell<Vec<HeaderMap>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// An empty header map with room for `capacity` fields: a pooled one when this thread has
/// one.
pub(crate) fn header_map(capacity: usize) -> HeaderMap {
    match MAPS.with_borrow_mut(Vec::pop) {
        Some(mut map) => {
            map.reserve(capacity);
            map
        }
        None => HeaderMap::with_capacity(capacity),
    }
}

/// Gives a header map that is done with back to this thread's pool (emptied; `clear`
/// also drops a map's DoS-resistant hashing back to the fast one).
pub(crate) fn recycle(mut map: HeaderMap) {
    if map.capacity() > POOLED_MAP_CAPACITY {
        return;
    }
    map.clear();
    MAPS.with_borrow_mut(|maps| {
        if maps.len() < POOLED_MAPS {
            maps.push(map);
        }
    });
}

/// The field names of the last head read on a connection, by position, each with the
/// spelling it came in. A client (or an upstream) sends the same fields in the same
/// order and spelling message after message: such a name then costs a comparison of its
/// bytes and a reference count, where making it again costs a case-folding parse (and an
/// allocation for a name `http` does not know: `x-request-id`, `x-model-version`), and
/// comparing it without case to the name made before cost 2% of the proxy's instructions
/// (`bench/instructions.sh`).
#[derive(Debug, Default)]
pub(crate) struct Names(Vec<Known>);

/// A name at one position, and its last spelling when that is short enough to keep.
#[derive(Debug)]
struct Known {
    name: HeaderName,
    /// The name's [`Present`] bit.
    present: Present,
    /// Its values' list in this thread's [`Values`], for a name whose values repeat.
    values: Option<u8>,
    spelling: [u8; Known::SPELLING],
    /// `0`: no spelling kept (a longer name is compared without case).
    spelled: u8,
}

impl Known {
    /// Longest spelling kept: the common names fit (`content-length`, `x-request-id`,
    /// `x-forwarded-for`), and a position costs 64 bytes with its name, its two bytes
    /// of [`Present`] and its values' list (`-Zprint-type-sizes`).
    const SPELLING: usize = 27;

    fn new(name: HeaderName, raw: &[u8]) -> Self {
        let mut known = Known {
            present: Present::of(&name),
            values: Values::of(&name),
            name,
            spelling: [0; Known::SPELLING],
            spelled: 0,
        };
        known.spell(raw);
        known
    }

    fn spell(&mut self, raw: &[u8]) {
        if raw.len() <= Known::SPELLING {
            self.spelling[..raw.len()].copy_from_slice(raw);
            self.spelled = raw.len() as u8;
        } else {
            self.spelled = 0;
        }
    }

    fn spelled_as(&self, raw: &[u8]) -> bool {
        self.spelled != 0 && &self.spelling[..usize::from(self.spelled)] == raw
    }
}

impl Names {
    /// Most positions remembered.
    const MOST: usize = 32;

    /// The name spelled `raw` (any case) at position `i` of a head, its [`Present`]
    /// bit, and its values' list in [`Values`] if it has one.
    pub(crate) fn name(
        &mut self,
        i: usize,
        raw: &[u8],
    ) -> Option<(HeaderName, Present, Option<u8>)> {
        if let Some(known) = self.0.get_mut(i) {
            if known.spelled_as(raw) {
                return Some((known.name.clone(), known.present, known.values));
            }
            if known.name.as_str().as_bytes().eq_ignore_ascii_case(raw) {
                known.spell(raw);
                return Some((known.name.clone(), known.present, known.values));
            }
        }
        let name = HeaderName::from_bytes(raw).ok()?;
        let known = Known::new(name.clone(), raw);
        let (present, values) = (known.present, known.values);
        if i < self.0.len() {
            self.0[i] = known;
        } else if i == self.0.len() && i < Self::MOST {
            self.0.push(known);
        }
        Some((name, present, values))
    }
}

/// The values of the fields whose values repeat, kept per thread once seen: a value made
/// from its head (a slice of the read buffer) is checked byte by byte and holds a count
/// on the buffer, taken and given back with two locked instructions (some 5 ns each on
/// the benchmark's machine, against a fraction of one for a plain instruction); a kept
/// one is compared and copied, and counts nothing. A client sends the same
/// `content-type`, `accept`, `user-agent` and `host`, and an upstream the same
/// `server` and `content-type`, message after message.
///
/// `http`'s values count nothing only when `'static`: each kept value is leaked, so they
/// are bounded: [`Values::NAMES`] only (none carries a secret, or a value that changes
/// with each message as `date` does; `content-length` is not a value: see [`fields`]),
/// at most [`Values::EACH`] values of each, of at most [`Values::LONGEST`] bytes, first
/// come first kept: 3.5 KiB per thread at most. A value not kept is made from its head
/// as before. (The request target is kept alike: `crate::inbound`'s `Targets`.)
#[derive(Default)]
struct Values([Vec<HeaderValue>; Values::LISTS]);

thread_local! {
    static VALUES: std::cell::RefCell<Values> = std::cell::RefCell::default();
}

impl Values {
    const LISTS: usize = 7;
    const NAMES: [HeaderName; Values::LISTS] = [
        http::header::CONTENT_TYPE,
        http::header::ACCEPT,
        http::header::ACCEPT_ENCODING,
        http::header::CONTENT_ENCODING,
        http::header::USER_AGENT,
        HOST,
        http::header::SERVER,
    ];
    const EACH: usize = 8;
    const LONGEST: usize = 64;

    /// `name`'s list, if its values are kept.
    fn of(name: &HeaderName) -> Option<u8> {
        Values::NAMES
            .iter()
            .position(|n| n == name)
            .map(|i| i as u8)
    }

    /// The value `raw` of list `list`: the one kept, or one kept now if there is room;
    /// `None` if neither (made from its head then, and checked there).
    fn get(list: u8, raw: &[u8]) -> Option<HeaderValue> {
        VALUES.with_borrow_mut(|values| {
            let kept = &mut values.0[usize::from(list)];
            if let Some(v) = kept.iter().find(|v| v.as_bytes() == raw) {
                return Some(v.clone());
            }
            // `from_static` takes visible ASCII and tabs; other bytes (`obs-text`)
            // are left to the head's value, and bad ones to its error.
            if kept.len() >= Values::EACH
                || raw.len() > Values::LONGEST
                || !raw.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
            {
                return None;
            }
            let text = std::str::from_utf8(raw).ok()?;
            let value = HeaderValue::from_static(Box::leak(text.into()));
            kept.push(value.clone());
            Some(value)
        })
    }
}

/// Which of the fields a head's framing depends on it has, noted as its names are
/// parsed (each name's bit is found once, when [`Names`] first meets it): a head without
/// one skips its lookup, a hash and a probe of the map each (`connection`,
/// `transfer-encoding` and `expect` are absent from most heads).
///
/// A request's are kept with it ([`crate::inbound::RequestBody::fields`]) for the
/// lookups the proxy would make of it: `x-request-id`, `x-forwarded-for`, the
/// `content-type` that tells gRPC, and the hop-by-hop fields it removes. A head not
/// parsed here (h2c's) has [`Present::ALL`]: every lookup is made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Present(u16);

impl Present {
    pub(crate) const CONNECTION: Present = Present(1);
    pub(crate) const TRANSFER_ENCODING: Present = Present(1 << 1);
    pub(crate) const CONTENT_LENGTH: Present = Present(1 << 2);
    pub(crate) const EXPECT: Present = Present(1 << 3);
    pub(crate) const X_REQUEST_ID: Present = Present(1 << 4);
    pub(crate) const X_FORWARDED_FOR: Present = Present(1 << 5);
    /// Any hop-by-hop field ([`crate::proxy::strip_hop_by_hop`]'s).
    pub(crate) const HOP_BY_HOP: Present = Present(1 << 6);
    /// A `content-type` that says gRPC (`application/grpc…`): the only bit set by a
    /// value, in [`fields`].
    pub(crate) const GRPC: Present = Present(1 << 7);
    /// A `content-type` field (its value tells [`Present::GRPC`]).
    pub(crate) const CONTENT_TYPE: Present = Present(1 << 8);
    /// What is not known: every bit.
    pub(crate) const ALL: Present = Present(u16::MAX);

    /// `name`'s bits; none for the other names.
    fn of(name: &HeaderName) -> Present {
        let own = if name == CONNECTION {
            Present::CONNECTION
        } else if name == TRANSFER_ENCODING {
            Present::TRANSFER_ENCODING
        } else if name == CONTENT_LENGTH {
            Present::CONTENT_LENGTH
        } else if name == http::header::EXPECT {
            Present::EXPECT
        } else if name == crate::proxy::X_REQUEST_ID {
            Present::X_REQUEST_ID
        } else if name == crate::proxy::X_FORWARDED_FOR {
            Present::X_FORWARDED_FOR
        } else if name == CONTENT_TYPE {
            Present::CONTENT_TYPE
        } else {
            Present(0)
        };
        if crate::proxy::is_hop_by_hop(name.as_str()) {
            Present(own.0 | Present::HOP_BY_HOP.0)
        } else {
            own
        }
    }

    /// Whether the head had a field of `name`'s bit.
    pub(crate) fn has(self, name: Present) -> bool {
        self.0 & name.0 != 0
    }
}

impl std::ops::BitOrAssign for Present {
    fn bitor_assign(&mut self, other: Present) {
        self.0 |= other.0;
    }
}

/// Whether the connection may carry another message after this one, by its `connection`
/// fields (as [`fields`] read them) and version (RFC 9112 §9.3).
pub(crate) fn persistent(facts: &Facts, version: Version) -> bool {
    !facts.close && (version == Version::HTTP_11 || facts.keep_alive)
}

/// What a `connection` field names.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Options {
    pub close: bool,
    pub keep_alive: bool,
    /// Any other option: a field of that name is this hop's too.
    pub other: bool,
}

/// What a `connection` field's `value` names.
pub(crate) fn connection_options(value: &[u8]) -> Options {
    let mut options = Options::default();
    for token in value.split(|&b| b == b',') {
        let token = token.trim_ascii();
        if token.eq_ignore_ascii_case(b"close") {
            options.close = true;
        } else if token.eq_ignore_ascii_case(b"keep-alive") {
            options.keep_alive = true;
        } else if !token.is_empty() {
            options.other = true;
        }
    }
    options
}

/// Whether the last coding of the last `transfer-encoding` field is chunked (hyper's
/// reading, to the letter: a field that is not text, or ends in an empty coding, is not).
pub(crate) fn chunked(headers: &HeaderMap) -> bool {
    headers
        .get_all(TRANSFER_ENCODING)
        .iter()
        .next_back()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("chunked"))
}

/// An answer's body, read off its connection as it is polled. Once it has ended, a
/// reusable connection can be taken back ([`Answer::reusable`]).
#[derive(Debug)]
pub struct Answer {
    conn: Option<Box<Conn>>,
    framing: Framing,
    keep: bool,
}

impl Answer {
    /// The connection, once the body has ended and when nothing speaks against reusing
    /// it; `None` otherwise (then it is closed when the answer is dropped).
    pub fn reusable(&mut self) -> Option<Box<Conn>> {
        if self.framing != Framing::Done || !self.keep {
            return None;
        }
        // Bytes after the answer's end were never asked for.
        self.conn.take().filter(|c| c.read.is_empty())
    }
}

impl Fill for Conn {
    fn buf(&mut self) -> &mut BytesMut {
        &mut self.read
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        Conn::poll_fill(self, cx, want)
    }
}

impl Body for Answer {
    type Data = Bytes;
    type Error = H1Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        let this = &mut *self;
        let Some(conn) = &mut this.conn else {
            return Poll::Ready(None);
        };
        let frame = ready!(poll_decode(&mut this.framing, &mut **conn, cx));
        if let Some(Err(_)) = &frame {
            this.conn = None;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.framing == Framing::Done
    }

    fn size_hint(&self) -> SizeHint {
        self.framing.size_hint()
    }
}

impl Framing {
    /// What is left of a body so framed.
    pub(crate) fn size_hint(self) -> SizeHint {
        match self {
            Framing::Length(n) => SizeHint::with_exact(n),
            Framing::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// Where a body's bytes are read from: a buffer, and a way to read more into it.
pub(crate) trait Fill {
    /// What has been read and not yet taken.
    fn buf(&mut self) -> &mut BytesMut;
    /// Reads more into [`Fill::buf`], with room for at least `want` bytes; `0` at the end
    /// of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>>;
}

/// Reads more, or fails if the peer closed the connection before the body's end.
fn fill(src: &mut impl Fill, cx: &mut Context<'_>, want: u64) -> Poll<Result<(), H1Error>> {
    let want = usize::try_from(want).unwrap_or(usize::MAX);
    match ready!(src.poll_fill(cx, want)) {
        Ok(0) => Poll::Ready(Err(H1Error::Closed("before the end of the body"))),
        Ok(_) => Poll::Ready(Ok(())),
        Err(e) => Poll::Ready(Err(H1Error::Io(e))),
    }
}

/// The next frame of a body framed by `framing` (RFC 9112 §6–7), read from `src`; data
/// frames are slices of its buffer. The one decoder of both legs: answers from upstreams
/// and request bodies from clients. After an error, `framing` is `Failed`.
pub(crate) fn poll_decode(
    framing: &mut Framing,
    src: &mut impl Fill,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
    let failed = |framing: &mut Framing, e: H1Error| {
        *framing = Framing::Failed;
        Poll::Ready(Some(Err(e)))
    };
    loop {
        let buffered = src.buf().len();
        match *framing {
            Framing::Done | Framing::Failed => return Poll::Ready(None),
            Framing::Length(left) | Framing::ChunkData(left) if buffered > 0 => {
                let take = left.min(buffered as u64);
                let data = src.buf().split_to(take as usize).freeze();
                *framing = match *framing {
                    Framing::Length(_) if take == left => Framing::Done,
                    Framing::Length(_) => Framing::Length(left - take),
                    _ if take == left => Framing::ChunkEnd,
                    _ => Framing::ChunkData(left - take),
                };
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            Framing::Length(left) | Framing::ChunkData(left) => {
                if let Err(e) = ready!(fill(src, cx, left)) {
                    return failed(framing, e);
                }
            }
            Framing::Close if buffered > 0 => {
                let data = src.buf().split().freeze();
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            Framing::Close => match ready!(src.poll_fill(cx, BODY_READ)) {
                Ok(0) => {
                    *framing = Framing::Done;
                    return Poll::Ready(None);
                }
                Ok(_) => {}
                Err(e) => return failed(framing, H1Error::Io(e)),
            },
            Framing::ChunkSize => {
                let read = src.buf();
                let line = httparse::parse_chunk_size(read);
                let too_long = match line {
                    // httparse lets a bare LF end the line, or sit in an extension;
                    // hyper's decoder refuses both, and so must we: two proxies
                    // that cut a body differently are a smuggling path.
                    // httparse also reads an empty line as size 0: the end.
                    Ok(httparse::Status::Complete((used, _)))
                        if !crlf_only(&read[..used]) || !read[0].is_ascii_hexdigit() =>
                    {
                        return failed(framing, H1Error::Malformed("bad chunk-size line".into()));
                    }
                    Ok(httparse::Status::Complete((used, _))) => used > MAX_CHUNK_LINE,
                    Ok(httparse::Status::Partial) => buffered > MAX_CHUNK_LINE,
                    Err(_) => false,
                };
                if too_long {
                    return failed(
                        framing,
                        H1Error::Malformed(format!(
                            "chunk-size line longer than {MAX_CHUNK_LINE} bytes"
                        )),
                    );
                }
                match line {
                    Ok(httparse::Status::Complete((used, size))) => {
                        read.advance(used);
                        *framing = if size == 0 {
                            Framing::Trailers
                        } else {
                            Framing::ChunkData(size)
                        };
                    }
                    Ok(httparse::Status::Partial) => {
                        if let Err(e) = ready!(fill(src, cx, READ_SIZE as u64)) {
                            return failed(framing, e);
                        }
                    }
                    Err(_) => {
                        return failed(framing, H1Error::Malformed("bad chunk size".into()));
                    }
                }
            }
            Framing::ChunkEnd => {
                if buffered < 2 {
                    if let Err(e) = ready!(fill(src, cx, 2)) {
                        return failed(framing, e);
                    }
                    continue;
                }
                let read = src.buf();
                if &read[..2] != b"\r\n" {
                    return failed(
                        framing,
                        H1Error::Malformed("chunk data longer than its size".into()),
                    );
                }
                read.advance(2);
                *framing = Framing::ChunkSize;
            }
            Framing::Trailers => {
                let read = src.buf();
                if read.starts_with(b"\r\n") {
                    read.advance(2);
                    *framing = Framing::Done;
                    return Poll::Ready(None);
                }
                match parse_trailers(read) {
                    Ok(Some(trailers)) => {
                        *framing = Framing::Done;
                        return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                    }
                    Ok(None) if buffered >= MAX_HEAD => {
                        return failed(
                            framing,
                            H1Error::Malformed(format!("trailers larger than {MAX_HEAD} bytes")),
                        );
                    }
                    Ok(None) => {
                        if let Err(e) = ready!(fill(src, cx, READ_SIZE as u64)) {
                            return failed(framing, e);
                        }
                    }
                    Err(e) => return failed(framing, e),
                }
            }
        }
    }
}

/// Whether every LF in `bytes` ends a CRLF and every CR starts one.
fn crlf_only(bytes: &[u8]) -> bool {
    bytes.iter().enumerate().all(|(i, &b)| match b {
        b'\n' => i > 0 && bytes[i - 1] == b'\r',
        b'\r' => bytes.get(i + 1) == Some(&b'\n'),
        _ => true,
    })
}

/// A trailer section out of `buf` (consumed with its final CRLF); `None` while
/// incomplete.
fn parse_trailers(buf: &mut BytesMut) -> Result<Option<HeaderMap>, H1Error> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let (len, trailers) = match httparse::parse_headers(buf, &mut fields) {
        // As for chunk-size lines: CRLF only (httparse also takes a bare LF).
        Ok(httparse::Status::Complete((len, _))) if !crlf_only(&buf[..len]) => {
            return Err(H1Error::Malformed("bare LF in the trailers".into()));
        }
        Ok(httparse::Status::Complete((len, fields))) => {
            let mut trailers = HeaderMap::with_capacity(fields.len());
            for field in fields {
                let name = HeaderName::from_bytes(field.name.as_bytes())
                    .map_err(|_| H1Error::Malformed("bad trailer name".into()))?;
                let value = HeaderValue::from_bytes(field.value)
                    .map_err(|_| H1Error::Malformed(format!("bad value of trailer `{name}`")))?;
                trailers.append(name, value);
            }
            (len, trailers)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(H1Error::Malformed(format!("bad trailers: {e}"))),
    };
    buf.advance(len);
    Ok(Some(trailers))
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// Every wait in these tests: none should come near it.
    const BOUND: Duration = Duration::from_secs(10);

    /// What the raw upstream does after reading a request.
    enum Then {
        /// Writes these bytes and waits for the next request.
        Answer(&'static [u8]),
        /// Writes these bytes and closes.
        AnswerAndClose(&'static [u8]),
        /// Writes these bytes without reading the body, then holds the connection until
        /// the test lets it go.
        AnswerEarly(&'static [u8], tokio::sync::oneshot::Receiver<()>),
        /// Resets the connection at once (`SO_LINGER` 0), without reading anything.
        Reset,
        /// Reads the request and answers nothing until the test lets it go.
        Silent(tokio::sync::oneshot::Receiver<()>),
    }

    /// What the upstream saw.
    #[derive(Debug, Default)]
    struct Seen {
        accepts: usize,
        requests: Vec<Vec<u8>>,
    }

    /// A raw upstream on 127.0.0.1:0 that plays `script`, one step per request,
    /// accepting a new connection whenever the last one closed.
    async fn upstream(script: Vec<Then>) -> (SocketAddr, tokio::task::JoinHandle<Seen>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut seen = Seen::default();
            let mut stream: Option<TcpStream> = None;
            for step in script {
                let s = match &mut stream {
                    Some(s) => s,
                    None => {
                        seen.accepts += 1;
                        stream.insert(listener.accept().await.unwrap().0)
                    }
                };
                if let Then::Reset = step {
                    s.set_zero_linger().unwrap();
                    stream = None;
                    continue;
                }
                let early = matches!(step, Then::AnswerEarly(..));
                let Some(request) = read_request(s, !early).await else {
                    stream = None;
                    continue;
                };
                seen.requests.push(request);
                match step {
                    Then::Answer(bytes) => s.write_all(bytes).await.unwrap(),
                    Then::AnswerAndClose(bytes) => {
                        s.write_all(bytes).await.unwrap();
                        stream = None;
                    }
                    Then::AnswerEarly(bytes, hold) => {
                        s.write_all(bytes).await.unwrap();
                        let _ = hold.await;
                        stream = None;
                    }
                    Then::Silent(hold) => {
                        let _ = hold.await;
                        stream = None;
                    }
                    Then::Reset => unreachable!(),
                }
            }
            seen
        });
        (addr, task)
    }

    /// One request's head and (`with_body`) its `content-length` body; `None` if the
    /// client closed first.
    async fn read_request(s: &mut TcpStream, with_body: bool) -> Option<Vec<u8>> {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let head_end = loop {
            if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = s.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return None;
            }
            got.extend_from_slice(&buf[..n]);
        };
        let head = String::from_utf8_lossy(&got[..head_end]).to_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .map_or(0, |n| n.trim().parse().unwrap());
        if with_body {
            while got.len() < head_end + length {
                let n = s.read(&mut buf).await.unwrap();
                assert!(n > 0, "the request body broke off");
                got.extend_from_slice(&buf[..n]);
            }
        } else {
            got.truncate(head_end);
        }
        Some(got)
    }

    /// `bytes` for the rest of the test process: the raw upstream's script is `'static`.
    fn leak(bytes: Vec<u8>) -> &'static [u8] {
        Box::leak(bytes.into_boxed_slice())
    }

    static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

    /// The client's head: fields the hop replaces or drops, and one it passes on.
    fn client_headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(HOST, HeaderValue::from_static("client-host"));
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("client-id"));
        h.insert(CONTENT_LENGTH, HeaderValue::from_static("999"));
        h.insert("content-type", HeaderValue::from_static("application/json"));
        h.insert(TE, HeaderValue::from_static("trailers"));
        h
    }

    /// Sends `method` with `body` over `conn`, as the proxy would.
    async fn send(
        conn: Box<Conn>,
        method: Method,
        body: &'static [u8],
        reused: bool,
    ) -> Result<Response<Answer>, Failed> {
        // Past the test's own bound: an exchange that waits for it fails the test.
        let deadline = tokio::time::Instant::now() + 2 * BOUND;
        send_by(conn, method, body, reused, deadline).await
    }

    /// [`send`] with the exchange's deadline.
    async fn send_by(
        conn: Box<Conn>,
        method: Method,
        body: &'static [u8],
        reused: bool,
        deadline: tokio::time::Instant,
    ) -> Result<Response<Answer>, Failed> {
        let headers = client_headers();
        let host = HeaderValue::from_static("up:1");
        let id = HeaderValue::from_static("r1");
        let set = [(&HOST, &host), (&X_REQUEST_ID, &id)];
        let head = RequestHead {
            method: &method,
            target: "/v1/models/m:predict",
            headers: &headers,
            set: &set,
            answer_room: 0,
        };
        let unsent = Unsent {
            first: None,
            body: Some(LimitedBody::replay(Bytes::from_static(body))),
        };
        tokio::time::timeout(BOUND, conn.exchange(&head, unsent, reused, deadline))
            .await
            .expect("the exchange ended")
    }

    /// An upstream that plays `then` once, and the exchange of a POST with it.
    async fn post_to(then: Then) -> Result<Response<Answer>, Failed> {
        let (addr, _seen) = upstream(vec![then]).await;
        send(connect(addr).await, Method::POST, b"{}", false).await
    }

    async fn connect(addr: SocketAddr) -> Box<Conn> {
        Conn::new(TcpStream::connect(addr).await.unwrap())
    }

    /// The whole body (data, trailers), or the error that ended it.
    async fn read_body(answer: &mut Answer) -> Result<(Vec<u8>, Option<HeaderMap>), H1Error> {
        let mut data = Vec::new();
        let mut trailers = None;
        while let Some(frame) = tokio::time::timeout(BOUND, answer.frame())
            .await
            .expect("the body ended")
        {
            match frame?.into_data() {
                Ok(d) => data.extend_from_slice(&d),
                Err(frame) => trailers = frame.into_trailers().ok(),
            }
        }
        Ok((data, trailers))
    }

    fn ok<T>(r: Result<T, Failed>) -> T {
        match r {
            Ok(t) => t,
            Err(Failed::Stale(_)) => panic!("stale"),
            Err(Failed::TimedOut) => panic!("timed out"),
            Err(Failed::Error(e)) => panic!("{e}"),
        }
    }

    #[tokio::test]
    async fn answers_by_length_keep_the_connection_for_the_next_request() {
        let (addr, seen) = upstream(vec![
            Then::Answer(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-model: a\r\n\r\nhello"),
            Then::Answer(b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\n\r\nworld"),
        ])
        .await;
        let mut resp = ok(send(connect(addr).await, Method::POST, b"{\"a\":1}", false).await);
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["x-model"], "a");
        assert_eq!(read_body(resp.body_mut()).await.unwrap().0, b"hello");
        let conn = resp.body_mut().reusable().expect("kept alive");
        let mut resp = ok(send(conn, Method::POST, b"{}", true).await);
        assert_eq!(resp.status(), StatusCode::CREATED);
        assert_eq!(read_body(resp.body_mut()).await.unwrap().0, b"world");
        assert!(resp.body_mut().reusable().is_some());
        drop(resp);
        let seen = seen.await.unwrap();
        assert_eq!(seen.accepts, 1);
        let first = String::from_utf8(seen.requests[0].clone()).unwrap();
        assert!(
            first.starts_with(
                "POST /v1/models/m:predict HTTP/1.1\r\nhost: up:1\r\nx-request-id: r1\r\n"
            ),
            "{first}"
        );
        assert!(
            first.contains("\r\ncontent-type: application/json\r\n"),
            "{first}"
        );
        // Framing from the body as sent, not the client's stale field.
        assert!(
            first.ends_with("\r\ncontent-length: 7\r\n\r\n{\"a\":1}"),
            "{first}"
        );
        assert!(!first.contains("client-"), "{first}");
        assert!(!first.contains("999"), "{first}");
        assert_eq!(first.matches("host:").count(), 1, "{first}");
    }

    /// The connection's one timer bounds each exchange by that exchange's deadline: one
    /// earlier than the last exchange's, and one after the timer went off while the
    /// connection was idle.
    #[tokio::test]
    async fn each_exchange_is_bounded_by_its_own_deadline() {
        let (release, hold) = tokio::sync::oneshot::channel();
        let (addr, _seen) = upstream(vec![
            Then::Answer(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"),
            Then::Answer(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"),
            Then::Silent(hold),
        ])
        .await;
        let soon = || tokio::time::Instant::now() + Duration::from_millis(200);
        let mut resp = ok(send(connect(addr).await, Method::POST, b"{}", false).await);
        read_body(resp.body_mut()).await.unwrap();
        let conn = resp.body_mut().reusable().expect("kept alive");
        // Earlier than the first exchange's deadline, and answered in time.
        let mut resp = ok(send_by(conn, Method::POST, b"{}", true, soon()).await);
        read_body(resp.body_mut()).await.unwrap();
        let conn = resp.body_mut().reusable().expect("kept alive");
        // Idle past that deadline: the timer goes off with no exchange waiting.
        tokio::time::sleep(Duration::from_millis(400)).await;
        match send_by(conn, Method::POST, b"{}", true, soon()).await {
            Err(Failed::TimedOut) => {}
            Ok(r) => panic!("answered: {}", r.status()),
            Err(Failed::Stale(_)) => panic!("stale"),
            Err(Failed::Error(e)) => panic!("{e}"),
        }
        drop(release);
    }

    #[tokio::test]
    async fn chunked_answers_are_decoded_with_their_trailers() {
        let mut resp = ok(post_to(Then::Answer(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-checksum: 42\r\n\r\n",
        )).await);
        let (data, trailers) = read_body(resp.body_mut()).await.unwrap();
        assert_eq!(data, b"hello world");
        assert_eq!(trailers.expect("trailers")["x-checksum"], "42");
        assert!(resp.body_mut().reusable().is_some());
    }

    #[tokio::test]
    async fn an_answer_read_to_the_close_ends_there_and_is_not_reused() {
        let mut resp = ok(post_to(Then::AnswerAndClose(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil the close",
        ))
        .await);
        assert_eq!(
            read_body(resp.body_mut()).await.unwrap().0,
            b"until the close"
        );
        assert!(resp.body_mut().reusable().is_none());
    }

    #[tokio::test]
    async fn interim_answers_are_passed_over() {
        let mut resp = ok(post_to(Then::Answer(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        )).await);
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(!resp.headers().contains_key("link"));
        assert_eq!(read_body(resp.body_mut()).await.unwrap().0, b"ok");
    }

    #[tokio::test]
    async fn head_204_and_304_answers_have_no_body_whatever_they_declare() {
        let (addr, seen) = upstream(vec![
            Then::Answer(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n"),
            Then::Answer(b"HTTP/1.1 204 No Content\r\ncontent-length: 3\r\n\r\n"),
            Then::Answer(b"HTTP/1.1 304 Not Modified\r\ntransfer-encoding: chunked\r\n\r\n"),
            Then::Answer(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nlast"),
        ])
        .await;
        let mut conn = connect(addr).await;
        for (method, status, declared) in [
            (Method::HEAD, 200, Some("10")),
            (Method::GET, 204, Some("3")),
            (Method::GET, 304, None),
        ] {
            let mut resp = ok(send(conn, method, b"", false).await);
            assert_eq!(resp.status().as_u16(), status);
            // The body does not carry the length such an answer says: the field does.
            assert_eq!(
                resp.headers()
                    .get(CONTENT_LENGTH)
                    .map(|v| v.to_str().unwrap()),
                declared
            );
            assert!(read_body(resp.body_mut()).await.unwrap().0.is_empty());
            conn = resp.body_mut().reusable().expect("kept alive");
        }
        // Had any of them been read as having a body, this answer would be taken for it.
        let mut resp = ok(send(conn, Method::GET, b"", true).await);
        assert_eq!(read_body(resp.body_mut()).await.unwrap().0, b"last");
        drop(resp);
        let seen = seen.await.unwrap();
        assert_eq!(seen.accepts, 1);
        // A GET without a body says nothing of its length.
        let get = String::from_utf8(seen.requests[1].clone()).unwrap();
        assert!(get.starts_with("GET "), "{get}");
        assert!(!get.contains("content-length"), "{get}");
    }

    #[tokio::test]
    async fn a_length_given_twice_alike_is_the_bodys_length() {
        for answer in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 3\r\n\r\nabc"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 3 , 3\r\n\r\nabc",
        ] {
            let mut resp = ok(post_to(Then::Answer(answer)).await);
            // Framing, not a field: what passes it on writes it once, from the body.
            assert!(!resp.headers().contains_key(CONTENT_LENGTH));
            let hint = http_body::Body::size_hint(resp.body());
            assert_eq!(hint.exact(), Some(3), "{}", String::from_utf8_lossy(answer));
            assert_eq!(read_body(resp.body_mut()).await.unwrap().0, b"abc");
            assert!(resp.body_mut().reusable().is_some());
        }
    }

    #[tokio::test]
    async fn transfer_encoding_overrides_content_length_and_the_connection_is_closed() {
        let mut resp = ok(post_to(Then::Answer(
            b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        )).await);
        // Not passed on: the client would wait for 100 bytes.
        assert!(!resp.headers().contains_key(CONTENT_LENGTH));
        assert_eq!(read_body(resp.body_mut()).await.unwrap().0, b"ok");
        assert!(resp.body_mut().reusable().is_none());
    }

    #[tokio::test]
    async fn what_the_answer_says_of_the_connection_is_obeyed() {
        for (answer, kept) in [
            (
                &b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok"[..],
                false,
            ),
            (
                b"HTTP/1.1 200 OK\r\nConnection: foo, Close\r\ncontent-length: 2\r\n\r\nok",
                false,
            ),
            (b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok", false),
            (
                b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 2\r\n\r\nok",
                true,
            ),
            // Bytes after the answer's end were never asked for.
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokEXTRA",
                false,
            ),
        ] {
            let mut resp = ok(post_to(Then::Answer(answer)).await);
            assert_eq!(read_body(resp.body_mut()).await.unwrap().0, b"ok");
            let shown = String::from_utf8_lossy(answer);
            assert_eq!(resp.body_mut().reusable().is_some(), kept, "{shown}");
        }
    }

    #[tokio::test]
    async fn malformed_heads_fail_the_exchange() {
        let many_fields: &'static [u8] = leak(
            format!(
                "HTTP/1.1 200 OK\r\n{}content-length: 0\r\n\r\n",
                "x-f: 1\r\n".repeat(MAX_HEADERS + 1)
            )
            .into_bytes(),
        );
        let huge: &'static [u8] = leak(
            format!(
                "HTTP/1.1 200 OK\r\nx-big: {}\r\ncontent-length: 0\r\n\r\n",
                "a".repeat(MAX_HEAD)
            )
            .into_bytes(),
        );
        for (answer, says) in [
            (
                &b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\n\r\n"[..],
                "101",
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!",
                "differ",
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\nhello",
                "content-length",
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 5, 6\r\n\r\nhello",
                "differ",
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n",
                "content-length",
            ),
            (
                b"HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
                "HTTP/1.0",
            ),
            (b"HTTX/1.1 200 OK\r\n\r\n", "head"),
            (b"HTTP/1.1 200 OK\r\nbad field\r\n\r\n", "head"),
            (many_fields, "head"),
            (huge, "larger than"),
        ] {
            let shown = String::from_utf8_lossy(&answer[..answer.len().min(60)]);
            match post_to(Then::Answer(answer)).await {
                Err(Failed::Error(H1Error::Malformed(e))) => {
                    assert!(e.contains(says), "{shown}: {e}")
                }
                other => panic!("{shown}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn malformed_or_cut_bodies_fail_the_body() {
        let long_extension: &'static [u8] = leak(
            format!(
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;{}\r\nhello\r\n0\r\n\r\n",
                "e".repeat(MAX_CHUNK_LINE + 1)
            )
            .into_bytes(),
        );
        for (answer, malformed) in [
            (
                &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"[..],
                true,
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nokk\r\n0\r\n\r\n",
                true,
            ),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n10000000000000000\r\n",
                true,
            ),
            (long_extension, true),
            // Each read differently by some HTTP/1.1 parser (httparse among them): an
            // empty size line, a bare LF in an extension, a bare LF after the last chunk.
            (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\r\n\r\n", true),
            (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;a\nb\r\nhello\r\n0\r\n\r\n", true),
            (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\n", true),
            (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort", false),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel",
                false,
            ),
        ] {
            let shown = String::from_utf8_lossy(&answer[..answer.len().min(70)]);
            let mut resp = ok(post_to(Then::AnswerAndClose(answer)).await);
            match read_body(resp.body_mut()).await {
                Err(H1Error::Malformed(_)) if malformed => {}
                Err(H1Error::Closed(_)) if !malformed => {}
                other => panic!("{shown}: {other:?}"),
            }
            assert!(resp.body_mut().reusable().is_none(), "{shown}");
        }
    }

    #[tokio::test]
    async fn a_reused_connection_the_upstream_reset_hands_the_request_back() {
        let (addr, _seen) = upstream(vec![Then::Reset]).await;
        let conn = connect(addr).await;
        // Until the reset has come, the connection looks idle and open.
        tokio::time::timeout(BOUND, conn.io.readable())
            .await
            .unwrap()
            .unwrap();
        assert!(!conn.is_open());
        match send(conn, Method::POST, b"{\"a\":1}", true).await {
            Err(Failed::Stale(unsent)) => {
                // The body's one frame, taken out before the write failed, comes back.
                assert_eq!(unsent.first.as_deref(), Some(&b"{\"a\":1}"[..]));
            }
            other => panic!("{other:?}"),
        }
        // A new connection that fails is a failure, not a race to retry.
        let (addr, _seen) = upstream(vec![Then::Reset]).await;
        let conn = connect(addr).await;
        tokio::time::timeout(BOUND, conn.io.readable())
            .await
            .unwrap()
            .unwrap();
        match send(conn, Method::POST, b"{}", false).await {
            Err(Failed::Error(H1Error::Io(_) | H1Error::Closed(_))) => {}
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn an_answer_before_the_whole_request_is_taken_and_the_connection_not_reused() {
        let (release, hold) = tokio::sync::oneshot::channel();
        let (addr, _seen) = upstream(vec![Then::AnswerEarly(
            b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 7\r\n\r\ntoo big",
            hold,
        )])
        .await;
        // Far more than the loopback socket buffers take while the upstream reads nothing.
        let body: &'static [u8] = leak(vec![b'x'; 64 << 20]);
        let mut resp = ok(send(connect(addr).await, Method::POST, body, false).await);
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(read_body(resp.body_mut()).await.unwrap().0, b"too big");
        // The rest of the request can never go on this connection.
        assert!(resp.body_mut().reusable().is_none());
        let _ = release.send(());
    }

    /// What became of one answer, as both clients are compared on it.
    #[derive(Debug, PartialEq, Eq)]
    enum Outcome {
        /// No usable head.
        Refused,
        /// A head, then the whole body or an error part-way.
        Answered { status: u16, body: Option<Vec<u8>> },
    }

    /// hyper's own HTTP/1.1 client (`client::conn::http1`, what this codec replaced) on
    /// one connection.
    async fn through_hyper(addr: SocketAddr) -> Outcome {
        let io = hyper_util::rt::TokioIo::new(TcpStream::connect(addr).await.unwrap());
        let Ok((mut sender, conn)) =
            hyper::client::conn::http1::handshake::<_, http_body_util::Full<Bytes>>(io).await
        else {
            return Outcome::Refused;
        };
        let driving = tokio::spawn(conn);
        let req = http::Request::post("/v1/models/m:predict")
            .header(HOST, "up:1")
            .body(http_body_util::Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        let outcome = match sender.send_request(req).await {
            Err(_) => Outcome::Refused,
            Ok(resp) => Outcome::Answered {
                status: resp.status().as_u16(),
                body: resp
                    .into_body()
                    .collect()
                    .await
                    .ok()
                    .map(|b| b.to_bytes().to_vec()),
            },
        };
        driving.abort();
        outcome
    }

    async fn through_ours(addr: SocketAddr) -> Outcome {
        match send(connect(addr).await, Method::POST, b"{}", false).await {
            Err(_) => Outcome::Refused,
            Ok(mut resp) => Outcome::Answered {
                status: resp.status().as_u16(),
                body: read_body(resp.body_mut()).await.ok().map(|(data, _)| data),
            },
        }
    }

    /// Valid answers the generated ones start from.
    const TEMPLATES: [&[u8]; 7] = [
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 17\r\n\r\n{\"predictions\":1}",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 42\r\n\r\n",
        b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\n\r\nuntil the close",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 4\r\n\r\nten.",
        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 3\r\n\r\nabc",
        b"HTTP/1.1 404 Not Found\r\nx-a: 1\r\nx-b: two words\r\ntransfer-encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    ];

    /// Generated answers, each to hyper's client and to ours: the same status and the
    /// same body, or both refused, or both failed part-way. The cases where the two are
    /// allowed to differ are listed, with why; everything else is a finding.
    #[tokio::test]
    async fn answers_are_read_as_hypers_own_client_reads_them() {
        // 30,000 more, seeds 2 to 6, agreed too when this was written (a minute each).
        const CASES: usize = 1_500;
        let mut rng = crate::test_rng(0x5eed_0001);
        let (mut agreed, mut refused_both, mut differed) = (0, 0, Vec::new());
        for case in 0..CASES {
            let template = TEMPLATES[case % TEMPLATES.len()];
            let answer: &'static [u8] = leak(crate::mutate(template, &mut rng));
            let (a, _) = upstream(vec![Then::AnswerAndClose(answer)]).await;
            let (b, _) = upstream(vec![Then::AnswerAndClose(answer)]).await;
            let (hyper, ours) = tokio::time::timeout(BOUND, async {
                tokio::join!(through_hyper(a), through_ours(b))
            })
            .await
            .expect("both ended");
            // hyper hands a `101` over as an answer (to upgrade); we never ask for an
            // upgrade, so a 101 is refused, never passed to a client who did not ask.
            let upgrade = matches!(hyper, Outcome::Answered { status: 101, .. });
            // A bare LF after the last chunk: hyper skips it as a trailer line; we refuse
            // any bare LF in chunked framing (stricter, never looser).
            let stricter = match (&hyper, &ours) {
                (
                    Outcome::Answered {
                        status: a,
                        body: Some(_),
                    },
                    Outcome::Answered {
                        status: b,
                        body: None,
                    },
                ) => a == b && !crlf_only(answer),
                _ => false,
            };
            if hyper == ours {
                agreed += 1;
                refused_both += usize::from(ours == Outcome::Refused);
            } else if (upgrade && ours == Outcome::Refused) || stricter {
                agreed += 1;
            } else {
                differed.push(format!(
                    "{:?}\n  hyper: {hyper:?}\n  ours:  {ours:?}",
                    String::from_utf8_lossy(answer)
                ));
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
            refused_both > CASES / 10 && agreed - refused_both > CASES / 10,
            "{agreed} {refused_both}"
        );
    }

    #[test]
    fn names_of_the_last_head_are_reused_by_position_in_any_case() {
        let mut names = Names::default();
        let first = names.name(0, b"X-Model-Version").unwrap().0;
        assert_eq!(first.as_str(), "x-model-version");
        // The same name at the same place, in another case: the one made before (its
        // bytes shared, not made again).
        let again = names.name(0, b"x-MODEL-version").unwrap().0;
        assert_eq!(again, first);
        assert_eq!(again.as_str().as_ptr(), first.as_str().as_ptr());
        // Another name there replaces it; a bad one is refused and changes nothing.
        let other = names.name(0, b"x-other").unwrap().0;
        assert_eq!(other.as_str(), "x-other");
        assert!(names.name(1, b"bad name").is_none());
        assert_eq!(
            names.name(0, b"X-Other").unwrap().0.as_str().as_ptr(),
            other.as_str().as_ptr()
        );
        assert_ne!(
            names
                .name(0, b"x-model-version")
                .unwrap()
                .0
                .as_str()
                .as_ptr(),
            first.as_str().as_ptr()
        );
        // A name too long for its spelling to be kept is still reused, in any case.
        let long = names
            .name(1, b"X-A-Name-Longer-Than-Thirty-Bytes")
            .unwrap()
            .0;
        assert_eq!(long.as_str(), "x-a-name-longer-than-thirty-bytes");
        let again = names
            .name(1, b"x-a-name-longer-than-thirty-bytes")
            .unwrap()
            .0;
        assert_eq!(again.as_str().as_ptr(), long.as_str().as_ptr());
        assert_eq!(names.name(1, b"x-b").unwrap().0.as_str(), "x-b");
    }

    #[test]
    fn names_say_which_framing_fields_a_head_has() {
        let mut names = Names::default();
        let mut present = Present::default();
        for (i, raw) in [&b"Host"[..], b"Content-Length", b"x-other"]
            .iter()
            .enumerate()
        {
            present |= names.name(i, raw).unwrap().1;
        }
        assert!(present.has(Present::CONTENT_LENGTH));
        for absent in [
            Present::CONNECTION,
            Present::TRANSFER_ENCODING,
            Present::EXPECT,
        ] {
            assert!(!present.has(absent), "{absent:?}");
        }
        // The bit comes with a name reused (in another case), and with one made anew.
        let both = |a: Present, b: Present| Present(a.0 | b.0);
        for (i, raw, bit) in [
            (
                0,
                &b"CONNECTION"[..],
                both(Present::CONNECTION, Present::HOP_BY_HOP),
            ),
            (1, b"content-LENGTH", Present::CONTENT_LENGTH),
            (
                2,
                b"Transfer-Encoding",
                both(Present::TRANSFER_ENCODING, Present::HOP_BY_HOP),
            ),
            (3, b"expect", Present::EXPECT),
            (4, b"x-other", Present::default()),
            (5, b"X-Request-Id", Present::X_REQUEST_ID),
            (6, b"x-forwarded-for", Present::X_FORWARDED_FOR),
            (7, b"Keep-Alive", Present::HOP_BY_HOP),
            (8, b"te", Present::HOP_BY_HOP),
            (9, b"content-type", Present::CONTENT_TYPE),
            (10, b"x-other", Present::default()),
        ] {
            assert_eq!(names.name(i, raw).unwrap().1, bit, "{raw:?}");
            assert_eq!(names.name(i, raw).unwrap().1, bit, "{raw:?} again");
        }
    }

    /// A head's offsets are its own: the buffer the thread keeps for them starts empty
    /// for each head (offsets counted by hand from the text).
    #[test]
    fn spans_are_each_heads_own() {
        let spans_of = |head: &'static [u8]| {
            let mut room = field_room();
            let mut parsed = httparse::Request::new(&mut []);
            parsed.parse_with_uninit_headers(head, &mut room).unwrap();
            Spans::of(head, parsed.headers).0.clone()
        };
        let two = spans_of(b"GET / HTTP/1.1\r\na: 1\r\nbb: 22\r\n\r\n");
        assert_eq!(two, [[16, 1, 19, 1], [22, 2, 26, 2]]);
        let one = spans_of(b"GET / HTTP/1.1\r\nccc: 3\r\n\r\n");
        assert_eq!(one, [[16, 3, 21, 1]]);
        let none = spans_of(b"GET / HTTP/1.1\r\n\r\n");
        assert!(none.is_empty());
    }

    /// A repeating field's values are kept once each, per thread, up to the bounds;
    /// past them, and for bytes `from_static` does not take, a value is read from its
    /// head as before, alike to what is kept, and a bad one is still refused.
    #[test]
    fn repeating_values_are_kept_within_bounds_and_read_alike() {
        // A thread of its own: its lists start empty.
        std::thread::spawn(|| {
            let parsed = |head: Vec<u8>| {
                let head = Bytes::from(head);
                let mut room = field_room();
                let mut parsed = httparse::Request::new(&mut []);
                parsed
                    .parse_with_uninit_headers(&head, &mut room)
                    .map_err(|e| e.to_string())?;
                let spans = Spans::of(&head, parsed.headers);
                fields(&head, &spans, &mut Names::default(), 4).map(|(map, _)| map)
            };
            let agent = |value: &[u8]| {
                let mut head = b"GET / HTTP/1.1\r\nUser-Agent: ".to_vec();
                head.extend_from_slice(value);
                head.extend_from_slice(b"\r\nDate: x\r\n\r\n");
                parsed(head)
            };
            let first = agent(b"curl/8.5").unwrap();
            let again = agent(b"curl/8.5").unwrap();
            assert_eq!(first["user-agent"], "curl/8.5");
            assert_eq!(
                first["user-agent"].as_bytes().as_ptr(),
                again["user-agent"].as_bytes().as_ptr(),
                "kept once, and the same value given again"
            );
            assert!(
                Values::of(&http::header::DATE).is_none(),
                "dates change: not kept"
            );
            let list = Values::of(&http::header::USER_AGENT).unwrap();
            // Too long, and obs-text (a good value `from_static` would not take): read
            // from the head, not kept.
            let long = vec![b'a'; Values::LONGEST + 1];
            assert_eq!(agent(&long).unwrap()["user-agent"].as_bytes(), &long[..]);
            assert_eq!(
                agent(b"caf\xc3\xa9").unwrap()["user-agent"].as_bytes(),
                b"caf\xc3\xa9"
            );
            assert_eq!(VALUES.with_borrow(|v| v.0[usize::from(list)].len()), 1);
            for i in 1..Values::EACH + 3 {
                let value = format!("agent/{i}");
                assert_eq!(
                    agent(value.as_bytes()).unwrap()["user-agent"],
                    value.as_str()
                );
            }
            assert_eq!(
                VALUES.with_borrow(|v| v.0[usize::from(list)].len()),
                Values::EACH,
                "first come first kept, up to the bound"
            );
            // (httparse refuses a control byte before the fields are read.)
            assert!(agent(b"bad\x01value").is_err(), "a control byte is refused");
            assert_eq!(
                VALUES.with_borrow(|v| v.0[usize::from(list)].len()),
                Values::EACH
            );
        })
        .join()
        .unwrap();
    }

    /// A `connection` field naming only `close` or `keep-alive` is read into the facts
    /// and left out of the map; one naming another field goes in, and counts as
    /// hop-by-hop, for that field to be removed with it.
    #[test]
    fn a_connection_field_naming_only_framing_stays_out_of_the_map() {
        let parsed = |head: &'static [u8]| {
            let head = Bytes::from_static(head);
            let mut room = field_room();
            let mut parsed = httparse::Request::new(&mut []);
            parsed.parse_with_uninit_headers(&head, &mut room).unwrap();
            let spans = Spans::of(&head, parsed.headers);
            fields(&head, &spans, &mut Names::default(), 4).unwrap()
        };
        let (map, facts) = parsed(b"GET / HTTP/1.1\r\nConnection: Keep-Alive\r\nx-a: 1\r\n\r\n");
        assert_eq!(map.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-a"]);
        assert!(facts.keep_alive && !facts.close);
        assert!(facts.present.has(Present::CONNECTION));
        assert!(!facts.present.has(Present::HOP_BY_HOP));
        let (map, facts) = parsed(b"GET / HTTP/1.1\r\nconnection: close,\r\n\r\n");
        assert!(map.is_empty() && facts.close);
        let (map, facts) =
            parsed(b"GET / HTTP/1.1\r\nconnection: keep-alive, x-private\r\nx-private: 1\r\n\r\n");
        assert_eq!(map["connection"], "keep-alive, x-private");
        assert!(facts.keep_alive && facts.present.has(Present::HOP_BY_HOP));
    }

    /// The one bit a value sets: a `content-type` that says gRPC.
    #[test]
    fn a_grpc_content_type_is_noted_with_the_fields() {
        let facts = |head: &'static [u8]| {
            let head = Bytes::from_static(head);
            let mut raw = [httparse::EMPTY_HEADER; 4];
            let mut parsed = httparse::Request::new(&mut raw);
            parsed.parse(&head).unwrap();
            let spans = Spans::of(&head, parsed.headers);
            fields(&head, &spans, &mut Names::default(), 4).unwrap().1
        };
        let grpc = facts(b"POST /a HTTP/1.1\r\ncontent-type: application/grpc+proto\r\n\r\n");
        assert!(grpc.present.has(Present::GRPC));
        let json = facts(b"POST /a HTTP/1.1\r\ncontent-type: application/json\r\nx-grpc: application/grpc\r\n\r\n");
        assert!(!json.present.has(Present::GRPC));
        assert!(!json.present.has(Present::HOP_BY_HOP));
        let closing =
            facts(b"GET / HTTP/1.1\r\nconnection: x-a, Close\r\ncontent-length: 2, 2\r\n\r\n");
        assert!(closing.close && !closing.keep_alive);
        assert_eq!(closing.length.resolve(), Ok(Some(2)));
    }

    #[test]
    fn header_maps_done_with_are_reused_empty_and_large_ones_let_go() {
        let mut map = header_map(8);
        for i in 0..8 {
            map.append(
                HeaderName::from_bytes(format!("x-{i}").as_bytes()).unwrap(),
                HeaderValue::from(i),
            );
        }
        let capacity = map.capacity();
        recycle(map);
        let reused = header_map(4);
        assert!(reused.is_empty());
        assert_eq!(
            reused.capacity(),
            capacity,
            "the recycled map, its room kept"
        );
        let mut large = header_map(POOLED_MAP_CAPACITY * 2);
        large.insert(HOST, HeaderValue::from_static("x"));
        recycle(large);
        assert!(
            header_map(0).capacity() < POOLED_MAP_CAPACITY,
            "a large map is not kept"
        );
    }

    #[test]
    fn heads_frame_the_body_by_what_it_is() {
        let headers = client_headers();
        let id = HeaderValue::from_static("r1");
        let set = [(&X_REQUEST_ID, &id)];
        let head = |method: &'static Method| RequestHead {
            method,
            target: "/p?q=1",
            headers: &headers,
            set: &set,
            answer_room: 0,
        };
        let encoded = |method, length| {
            let mut out = Vec::new();
            encode_head(&mut out, &head(method), length);
            String::from_utf8(out).unwrap()
        };
        let chunked = encoded(&Method::POST, None);
        assert!(chunked.starts_with("POST /p?q=1 HTTP/1.1\r\nx-request-id: r1\r\n"));
        assert!(
            chunked.ends_with("\r\ntransfer-encoding: chunked\r\n\r\n"),
            "{chunked}"
        );
        assert!(!chunked.contains("content-length"), "{chunked}");
        assert!(encoded(&Method::POST, Some(0)).ends_with("\r\ncontent-length: 0\r\n\r\n"));
        assert!(encoded(&Method::PUT, Some(12345678901))
            .ends_with("\r\ncontent-length: 12345678901\r\n\r\n"));
        let get = encoded(&Method::GET, Some(0));
        assert!(!get.contains("content-length"), "{get}");
        // The client's `host` goes whatever the set fields are; so do the replaced ones.
        assert!(!get.contains("client-"), "{get}");
        assert!(!get.contains("te:"), "no te without connection: te: {get}");
        assert!(
            get.contains("\r\ncontent-type: application/json\r\n"),
            "{get}"
        );
        assert!(get.ends_with("\r\n\r\n") && !get.ends_with("\r\n\r\n\r\n"));
    }

    /// Each write call a [`Writer`] makes: whether it was vectored, and its buffers.
    #[derive(Default)]
    struct Calls(Vec<(bool, Vec<Vec<u8>>)>);

    impl tokio::io::AsyncWrite for Calls {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.0.push((false, vec![buf.to_vec()]));
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            self.0
                .push((true, bufs.iter().map(|b| b.to_vec()).collect()));
            Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// The write calls for a head and a body of `len` bytes (`None`: chunked).
    fn calls(len: usize, declared: Option<u64>) -> Vec<(bool, Vec<Vec<u8>>)> {
        let mut io = Calls::default();
        let mut write = b"HEAD\r\n\r\n".to_vec();
        let body = LimitedBody::replay(Bytes::from(vec![b'x'; len]));
        let mut writer = Writer::new(None, Some(body), declared, false);
        let waker = std::task::Waker::noop();
        let done = writer.poll_write(&mut io, &mut write, &mut Context::from_waker(waker));
        assert!(matches!(done, Poll::Ready(Ok(()))));
        io.0
    }

    /// A small message goes out in one plain write (`send`), its body copied after its
    /// head; a larger body is written from where it is, beside the head; no write is
    /// given an empty buffer.
    #[test]
    fn a_small_message_goes_out_as_one_buffer() {
        let small = calls(300, Some(300));
        assert_eq!(small.len(), 1, "one call");
        assert!(!small[0].0, "not vectored");
        assert_eq!(small[0].1[0].len(), 8 + 300);
        let large = calls(COALESCE_BYTES, Some(COALESCE_BYTES as u64));
        assert_eq!(large.len(), 1, "one call");
        assert!(large[0].0);
        let lens: Vec<usize> = large[0].1.iter().map(Vec::len).collect();
        assert_eq!(
            lens,
            [8, COALESCE_BYTES],
            "the head, then the body as it is"
        );
        // Chunked: each call's buffers are the non-empty ones, in order; all arrive.
        let chunked = calls(10, None);
        let bytes: Vec<u8> = chunked.iter().flat_map(|c| c.1.concat()).collect();
        assert_eq!(bytes, b"HEAD\r\n\r\na\r\nxxxxxxxxxx\r\n0\r\n\r\n");
        assert!(chunked.iter().all(|c| c.1.iter().all(|b| !b.is_empty())));
    }
}
