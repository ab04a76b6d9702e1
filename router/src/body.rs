//! Bodies on the request path: the request body streamed upstream under a size limit,
//! and the response body type shared by forwarded and locally made answers.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

/// Every response body: an upstream's answer streamed through untouched, or one we made.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;

/// A JSON answer made by Switchyard itself (health, local models, feedback, errors).
pub fn json_response(status: http::StatusCode, body: Bytes) -> http::Response<ProxyBody> {
    let mut resp = http::Response::new(Either::Right(Full::new(body)));
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

/// The error a [`LimitedBody`] yields when reading the client's body fails.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ClientBodyError(#[source] pub hyper::Error);

/// Streams the client's body upstream frame by frame (no buffering, no re-serialising),
/// failing once more than `limit` bytes have passed. Bodies that declare a
/// `content-length` over the limit are refused before this is ever built.
#[derive(Debug)]
pub struct LimitedBody {
    inner: Incoming,
    remaining: u64,
    limit: u64,
}

impl LimitedBody {
    /// Wraps `inner` with a limit of `limit` bytes.
    pub fn new(inner: Incoming, limit: u64) -> Self {
        LimitedBody {
            inner,
            remaining: limit,
            limit,
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
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if len > self.remaining {
                        self.remaining = 0;
                        let limit = self.limit;
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge { limit }))));
                    }
                    self.remaining -= len;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(ClientBodyError(e))))),
            other => other.map(|o| o.map(|r| r.map_err(|e| e.into()))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Reads a whole body of at most `limit` bytes (for the endpoints that parse JSON:
/// local models and feedback; forwarded bodies are streamed instead).
pub async fn collect_limited(body: Incoming, limit: u64) -> Result<Bytes, crate::RouterError> {
    use http_body_util::BodyExt;
    match http_body_util::Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX))
        .collect()
        .await
    {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(crate::RouterError::BodyTooLarge { limit })
        }
        Err(e) => Err(crate::RouterError::ClientBody(e.to_string())),
    }
}
