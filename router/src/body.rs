//! Bodies on the request path: the request body streamed upstream under a size limit,
//! and the response body type shared by forwarded and locally made answers.

use std::pin::Pin;
use std::task::{Context, Poll};

use crate::inbound::RequestBody;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};
use switchyard_shadow::{RequestTap, ResponseTap};

use crate::stamp::Stamp;
use crate::upstream::UpstreamBody;

/// Every response body: an upstream's answer streamed through untouched, or one we made
/// (a gRPC answer made here ends with its status in trailers); with a tap that shows it
/// to the shadow comparison when the request was mirrored.
#[derive(Debug)]
pub struct ProxyBody {
    inner: Either<UpstreamBody, Either<Full<Bytes>, WithTrailers>>,
    tap: Option<Box<ResponseTap>>,
    /// Our own fields for the answer's head ([`crate::stamp`]), once a phase sets one.
    /// Boxed: inline, its 104 bytes made each move of an answer up through the layers
    /// dearer, +920 instructions of copying per request against an allocation's ~120.
    stamp: Option<Box<Stamp>>,
}

/// One data frame, then trailers.
#[derive(Debug)]
pub struct WithTrailers {
    data: Option<Bytes>,
    trailers: Option<http::HeaderMap>,
}

impl Body for WithTrailers {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

/// An empty answer made here (what is left where one was taken).
impl Default for ProxyBody {
    fn default() -> Self {
        ProxyBody::full(Bytes::new())
    }
}

impl ProxyBody {
    /// An upstream's answer.
    pub fn upstream(body: UpstreamBody) -> Self {
        ProxyBody {
            inner: Either::Left(body),
            tap: None,
            stamp: None,
        }
    }

    /// An answer made here.
    pub fn full(body: Bytes) -> Self {
        ProxyBody {
            inner: Either::Right(Either::Left(Full::new(body))),
            tap: None,
            stamp: None,
        }
    }

    /// An answer made here whose `data` is followed by `trailers` (gRPC's status).
    pub fn with_trailers(data: Bytes, trailers: http::HeaderMap) -> Self {
        ProxyBody {
            inner: Either::Right(Either::Right(WithTrailers {
                data: Some(data),
                trailers: Some(trailers),
            })),
            tap: None,
            stamp: None,
        }
    }

    /// Our own fields for the answer's head, to set (written with it).
    pub fn stamp_mut(&mut self) -> &mut Stamp {
        self.stamp.get_or_insert_default()
    }

    /// Shows the frames to `tap` as they pass.
    pub fn set_tap(&mut self, tap: ResponseTap) {
        self.tap = Some(Box::new(tap));
    }
}

impl crate::server::ResponseBody for ProxyBody {
    fn stamp(&mut self) -> Option<&mut Stamp> {
        self.stamp.as_deref_mut()
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = crate::upstream::BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let polled = match &mut this.inner {
            Either::Left(b) => Pin::new(b).poll_frame(cx),
            Either::Right(Either::Left(b)) => {
                Pin::new(b).poll_frame(cx).map_err(|never| match never {})
            }
            Either::Right(Either::Right(b)) => {
                Pin::new(b).poll_frame(cx).map_err(|never| match never {})
            }
        };
        if let Some(tap) = &mut this.tap {
            match &polled {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        tap.data(data);
                    }
                    // hyper stops polling once the body says it has ended.
                    if this.inner.is_end_stream() {
                        tap.finish();
                    }
                }
                Poll::Ready(None) => tap.finish(),
                // An upstream answer that breaks off is not compared (the tap's drop).
                Poll::Ready(Some(Err(_))) | Poll::Pending => {}
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        // An empty answer may never be polled: it ended all the same.
        if let Some(tap) = &mut self.tap {
            if self.inner.is_end_stream() {
                tap.finish();
            }
        }
    }
}

/// A JSON answer made by Switchyard itself (health, local models, feedback, errors).
pub fn json_response(status: http::StatusCode, body: Bytes) -> http::Response<ProxyBody> {
    let mut resp = http::Response::new(ProxyBody::full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

/// The error a [`LimitedBody`] yields when the client sends more than the limit. The
/// proxy finds it in the upstream client's error chain and answers 413.
#[derive(Debug, thiserror::Error)]
#[error("request body is larger than the limit of {limit} bytes")]
pub struct BodyTooLarge {
    /// The limit in bytes.
    pub limit: u64,
}

/// The error a [`LimitedBody`] yields when the client sends nothing of its body for the
/// `client_body_timeout`. The proxy answers 408.
#[derive(Debug, thiserror::Error)]
#[error("the request body stalled: nothing came for {after:?} (client_body_timeout)")]
pub struct ClientBodyTimeout {
    /// The timeout.
    pub after: std::time::Duration,
}

/// The error a [`LimitedBody`] yields when reading the client's body fails.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ClientBodyError(#[source] pub crate::inbound::BodyError);

/// Streams the client's body upstream frame by frame (no buffering, no re-serialising),
/// failing once more than `limit` bytes have passed, or when the client pauses longer
/// than `stall_timeout` between two frames. Bodies that declare a `content-length` over
/// the limit are refused before this is ever built.
#[derive(Debug)]
pub struct LimitedBody {
    inner: Source,
    remaining: u64,
    limit: u64,
    tap: Option<Box<RequestTap>>,
    stall: Stall,
}

/// A bound on the pause between two frames of a body. Its timer is made only when a
/// frame is not ready: a body that arrives with its head (most predictions, most
/// answers) never touches it.
#[derive(Debug)]
pub(crate) struct Stall {
    after: std::time::Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A frame came since the timer was last set.
    progressed: bool,
}

impl Stall {
    /// Pauses of at most `after`.
    pub(crate) fn new(after: std::time::Duration) -> Self {
        Stall {
            after,
            timer: None,
            progressed: false,
        }
    }

    /// The bound.
    pub(crate) fn after(&self) -> std::time::Duration {
        self.after
    }

    /// A frame came.
    pub(crate) fn progressed(&mut self) {
        self.progressed = true;
    }

    /// On a frame that is not ready: the timer, set from now if a frame came since it
    /// was last set; `true` once the body has been silent for the bound.
    pub(crate) fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let progressed = std::mem::take(&mut self.progressed);
        let timer = match &mut self.timer {
            Some(timer) => {
                if progressed {
                    timer.as_mut().reset(crate::clock::now() + self.after);
                }
                timer
            }
            None => self.timer.insert(Box::pin(tokio::time::sleep_until(
                crate::clock::now() + self.after,
            ))),
        };
        std::future::Future::poll(timer.as_mut(), cx).is_ready()
    }
}

/// Where a [`LimitedBody`]'s bytes come from.
#[derive(Debug)]
enum Source {
    /// The client's connection.
    Stream(RequestBody),
    /// A body read whole before (to be sent again on a retry, a hedge or to the
    /// fallback), sent as one frame.
    Replay(Option<Bytes>),
}

impl LimitedBody {
    /// Wraps `inner` with a limit of `limit` bytes and a longest pause between frames.
    pub fn new(inner: RequestBody, limit: u64, stall_timeout: std::time::Duration) -> Self {
        LimitedBody {
            inner: Source::Stream(inner),
            remaining: limit,
            limit,
            tap: None,
            stall: Stall::new(stall_timeout),
        }
    }

    /// A body read whole before, sent again as it was (retries, hedges, the fallback).
    pub fn replay(bytes: Bytes) -> Self {
        let len = bytes.len() as u64;
        LimitedBody {
            inner: Source::Replay(Some(bytes)),
            remaining: len,
            limit: len,
            tap: None,
            stall: Stall::new(std::time::Duration::MAX),
        }
    }

    /// Another copy of a body read whole before and not yet sent; `None` for a streamed
    /// body, which can be sent once only.
    pub fn try_clone(&self) -> Option<LimitedBody> {
        match &self.inner {
            Source::Replay(Some(bytes)) => Some(LimitedBody::replay(bytes.clone())),
            _ => None,
        }
    }

    /// Shows the frames to a shadow mirror as they pass; it gets the whole body once
    /// complete, or is told the body went over the limit.
    pub fn set_tap(&mut self, tap: RequestTap) {
        self.tap = Some(Box::new(tap));
        if self.is_end_stream() {
            // An empty body is never polled.
            self.finish_tap();
        }
    }

    fn finish_tap(&mut self) {
        if let Some(tap) = &mut self.tap {
            tap.finish();
        }
    }
}

impl Body for LimitedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let stream = match &mut self.inner {
            Source::Replay(bytes) => {
                let frame = bytes.take().filter(|b| !b.is_empty()).map(Frame::data);
                return Poll::Ready(frame.map(Ok));
            }
            Source::Stream(stream) => stream,
        };
        match Pin::new(stream).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                self.stall.progressed();
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if len > self.remaining {
                        self.remaining = 0;
                        if let Some(tap) = &mut self.tap {
                            tap.too_large();
                        }
                        let limit = self.limit;
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge { limit }))));
                    }
                    self.remaining -= len;
                    if let Some(tap) = &mut self.tap {
                        tap.data(data);
                    }
                }
                // hyper stops polling once the body says it has ended.
                if self.is_end_stream() {
                    self.finish_tap();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                self.finish_tap();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(ClientBodyError(e))))),
            Poll::Pending => {
                if self.stall.expired(cx) {
                    let after = self.stall.after();
                    return Poll::Ready(Some(Err(Box::new(ClientBodyTimeout { after }))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Source::Replay(r) => r.as_ref().is_none_or(Bytes::is_empty),
            Source::Stream(s) => s.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Source::Replay(r) => SizeHint::with_exact(r.as_ref().map_or(0, |b| b.len() as u64)),
            Source::Stream(s) => s.size_hint(),
        }
    }
}

/// Reads a whole body of at most `limit` bytes (for the endpoints that parse JSON:
/// local models and feedback; and a forwarded body kept to be resent on a retry).
///
/// Not `http-body-util`'s `collect`: that keeps a list of chunks even for a body that
/// comes in one piece, as most prediction bodies do (one allocation per request,
/// `bench/allocations.sh`). Here one piece is returned as it came, without a copy; a
/// second starts one buffer sized from what the body says is left.
pub fn collect_limited<B>(body: B, limit: u64) -> CollectLimited<B> {
    CollectLimited {
        body,
        first: None,
        joined: None,
        len: 0,
        limit,
    }
}

pin_project_lite::pin_project! {
    /// [`collect_limited`]'s future, named and no larger than its state: an `async fn`
    /// kept the body twice (as passed, and pinned), and a forwarded request's future
    /// holds this one while a body that may be resent is read.
    #[must_use = "futures do nothing unless polled"]
    pub struct CollectLimited<B> {
        #[pin]
        body: B,
        first: Option<Bytes>,
        joined: Option<bytes::BytesMut>,
        len: u64,
        limit: u64,
    }
}

impl<B> std::future::Future for CollectLimited<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Output = Result<Bytes, crate::RouterError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let Some(frame) = std::task::ready!(this.body.as_mut().poll_frame(cx)) else {
                return Poll::Ready(Ok(match (this.joined.take(), this.first.take()) {
                    (Some(buf), _) => buf.freeze(),
                    (None, Some(one)) => one,
                    (None, None) => Bytes::new(),
                }));
            };
            let frame = frame.map_err(|e| {
                let e: Box<dyn std::error::Error + Send + Sync> = e.into();
                if let Some(b) = e.downcast_ref::<BodyTooLarge>() {
                    crate::RouterError::BodyTooLarge { limit: b.limit }
                } else if e.is::<ClientBodyTimeout>() {
                    crate::RouterError::ClientBodyTimeout(e.to_string())
                } else {
                    crate::RouterError::ClientBody(e.to_string())
                }
            })?;
            // Trailers carry nothing a JSON body needs.
            let Ok(data) = frame.into_data() else {
                continue;
            };
            *this.len = this.len.saturating_add(data.len() as u64);
            let (len, limit) = (*this.len, *this.limit);
            if len > limit {
                return Poll::Ready(Err(crate::RouterError::BodyTooLarge { limit }));
            }
            match (&mut *this.joined, this.first.take()) {
                (Some(buf), _) => buf.extend_from_slice(&data),
                (None, None) => *this.first = Some(data),
                (None, Some(head)) => {
                    let left = this.body.size_hint().lower();
                    let want = len.saturating_add(left).min(limit);
                    let mut buf =
                        bytes::BytesMut::with_capacity(usize::try_from(want).unwrap_or(0));
                    buf.extend_from_slice(&head);
                    buf.extend_from_slice(&data);
                    *this.joined = Some(buf);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RouterError;
    use std::collections::VecDeque;

    /// A body that yields the given chunks (or errors) one frame at a time, and says
    /// how much is left.
    struct Chunks(VecDeque<Result<Bytes, std::io::Error>>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            Poll::Ready(self.0.pop_front().map(|c| c.map(Frame::data)))
        }

        fn size_hint(&self) -> SizeHint {
            let left: usize = self.0.iter().flatten().map(Bytes::len).sum();
            SizeHint::with_exact(left as u64)
        }
    }

    fn chunks(parts: &[&'static [u8]]) -> Chunks {
        Chunks(parts.iter().map(|p| Ok(Bytes::from_static(p))).collect())
    }

    #[tokio::test]
    async fn one_piece_is_returned_as_it_came() {
        let piece = Bytes::from_static(b"{\"instances\": [[1, 2]]}");
        let body = Chunks(VecDeque::from([Ok(piece.clone())]));
        let got = collect_limited(body, 1024).await.unwrap();
        assert_eq!(got, piece);
        assert_eq!(got.as_ptr(), piece.as_ptr(), "no copy of a one-piece body");
    }

    #[tokio::test]
    async fn pieces_are_joined_in_order_and_empty_bodies_are_empty() {
        let got = collect_limited(chunks(&[b"ab", b"", b"cde", b"f"]), 6)
            .await
            .unwrap();
        assert_eq!(&got[..], b"abcdef");
        assert!(collect_limited(chunks(&[]), 6).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_refused_and_errors_say_what_broke() {
        let over = collect_limited(chunks(&[b"abc", b"defg"]), 6).await;
        assert!(
            matches!(over, Err(RouterError::BodyTooLarge { limit: 6 })),
            "{over:?}"
        );
        let one_over = collect_limited(chunks(&[b"abcdefg"]), 6).await;
        assert!(matches!(
            one_over,
            Err(RouterError::BodyTooLarge { limit: 6 })
        ));
        let broken = Chunks(VecDeque::from([
            Ok(Bytes::from_static(b"ab")),
            Err(std::io::Error::other("connection reset")),
        ]));
        match collect_limited(broken, 6).await {
            Err(RouterError::ClientBody(m)) => assert!(m.contains("connection reset"), "{m}"),
            other => panic!("{other:?}"),
        }
    }
}
