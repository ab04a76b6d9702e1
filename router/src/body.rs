//! Bodies on the request path: the request body streamed upstream under a size limit,
//! and the response body type shared by forwarded and locally made answers.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use switchyard_shadow::{RequestTap, ResponseTap};

/// Every response body: an upstream's answer streamed through untouched, or one we made
/// (a gRPC answer made here ends with its status in trailers); with a tap that shows it
/// to the shadow comparison when the request was mirrored.
#[derive(Debug)]
pub struct ProxyBody {
    inner: Either<Incoming, Either<Full<Bytes>, WithTrailers>>,
    tap: Option<Box<ResponseTap>>,
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

impl ProxyBody {
    /// An upstream's answer.
    pub fn upstream(body: Incoming) -> Self {
        ProxyBody {
            inner: Either::Left(body),
            tap: None,
        }
    }

    /// An answer made here.
    pub fn full(body: Bytes) -> Self {
        ProxyBody {
            inner: Either::Right(Either::Left(Full::new(body))),
            tap: None,
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
        }
    }

    /// Shows the frames to `tap` as they pass.
    pub fn set_tap(&mut self, tap: ResponseTap) {
        self.tap = Some(Box::new(tap));
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

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
pub struct ClientBodyError(#[source] pub hyper::Error);

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
    stall_timeout: std::time::Duration,
    /// Armed only when a frame is not ready: a body that arrives with its head (most
    /// predictions) never touches the timer.
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A frame came since the stall timer was last set.
    progressed: bool,
}

/// Where a [`LimitedBody`]'s bytes come from.
#[derive(Debug)]
enum Source {
    /// The client's connection.
    Stream(Incoming),
    /// A body read whole before (to be sent again on a retry, a hedge or to the
    /// fallback), sent as one frame.
    Replay(Option<Bytes>),
}

impl LimitedBody {
    /// Wraps `inner` with a limit of `limit` bytes and a longest pause between frames.
    pub fn new(inner: Incoming, limit: u64, stall_timeout: std::time::Duration) -> Self {
        LimitedBody {
            inner: Source::Stream(inner),
            remaining: limit,
            limit,
            tap: None,
            stall_timeout,
            stall: None,
            progressed: false,
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
            stall_timeout: std::time::Duration::MAX,
            stall: None,
            progressed: false,
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

    /// On a frame that is not ready: the stall timer, set from now if a frame came since
    /// it was last set; ready once the client has been silent too long.
    fn stalled(&mut self, cx: &mut Context<'_>) -> bool {
        let progressed = std::mem::take(&mut self.progressed);
        let stall = match &mut self.stall {
            Some(stall) => {
                if progressed {
                    let deadline = tokio::time::Instant::now() + self.stall_timeout;
                    stall.as_mut().reset(deadline);
                }
                stall
            }
            None => self
                .stall
                .insert(Box::pin(tokio::time::sleep(self.stall_timeout))),
        };
        std::future::Future::poll(stall.as_mut(), cx).is_ready()
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
                self.progressed = true;
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
                if self.stalled(cx) {
                    let after = self.stall_timeout;
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
/// local models and feedback; forwarded bodies are streamed instead).
pub async fn collect_limited<B>(body: B, limit: u64) -> Result<Bytes, crate::RouterError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use http_body_util::BodyExt;
    match http_body_util::Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX))
        .collect()
        .await
    {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() || e.is::<BodyTooLarge>() => {
            Err(crate::RouterError::BodyTooLarge { limit })
        }
        Err(e) if e.is::<ClientBodyTimeout>() => {
            Err(crate::RouterError::ClientBodyTimeout(e.to_string()))
        }
        Err(e) => Err(crate::RouterError::ClientBody(e.to_string())),
    }
}
