//! The router's error type, and the one place where errors become HTTP answers.
//!
//! Every error knows its status; which errors count as a variant's failure (for its
//! breaker and for `retry.on`) is decided once, in `breaker::failure_kind`.

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW};
use http::{Method, Response, StatusCode};

use crate::body::{json_response, ProxyBody};

/// Which kind of upstream failure, for the `switchyard_upstream_errors_total` metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    /// TCP connect refused, unreachable or timed out.
    Connect,
    /// No response headers within the request timeout, or an answer's body paused
    /// longer than it.
    Timeout,
    /// The connection was reset or closed before a full response head arrived, or
    /// before the answer's body ended.
    Reset,
    /// The upstream broke the HTTP protocol (in the head or the body).
    Protocol,
}

impl UpstreamErrorKind {
    /// All kinds, in metric-handle order.
    pub const ALL: [UpstreamErrorKind; 4] = [
        UpstreamErrorKind::Connect,
        UpstreamErrorKind::Timeout,
        UpstreamErrorKind::Reset,
        UpstreamErrorKind::Protocol,
    ];

    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamErrorKind::Connect => "connect",
            UpstreamErrorKind::Timeout => "timeout",
            UpstreamErrorKind::Reset => "reset",
            UpstreamErrorKind::Protocol => "protocol",
        }
    }
}

/// Everything that can go wrong on the request path.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// No endpoint at this path.
    #[error("no route for `{0}`; prediction endpoints are /v1/models/{{model}}:predict and /v2/models/{{model}}/infer")]
    NoRoute(String),
    /// A prediction path that does not parse.
    #[error("{0}")]
    BadPath(String),
    /// The path exists but not with this method.
    #[error("method {method} is not allowed here; use {allowed}")]
    MethodNotAllowed {
        /// The method used.
        method: Method,
        /// The method the endpoint takes.
        allowed: Method,
    },
    /// The model is not configured.
    #[error("model `{0}` is not served here")]
    UnknownModel(String),
    /// The model is served, but not in the version or label asked for.
    #[error("{0}")]
    UnknownVersion(String),
    /// The request body is over the model's limit.
    #[error("request body is larger than the limit of {limit} bytes")]
    BodyTooLarge {
        /// The limit in bytes.
        limit: u64,
    },
    /// The client's request body could not be read (it hung up or broke framing).
    #[error("request body could not be read: {0}")]
    ClientBody(String),
    /// The client paused its request body longer than `client_body_timeout`.
    #[error("{0}")]
    ClientBodyTimeout(String),
    /// The upstream failed.
    #[error("upstream of variant `{variant}` failed ({}): {detail}", kind.as_str())]
    Upstream {
        /// The variant whose upstream failed.
        variant: String,
        /// What failed.
        kind: UpstreamErrorKind,
        /// The underlying error, for the message.
        detail: String,
    },
    /// The request's tensors do not fit the model (local variants).
    #[error("{0}")]
    BadInput(String),
    /// A request body in a coding a local variant cannot read (415).
    #[error("{0}")]
    UnsupportedEncoding(String),
    /// A local model's queue is full.
    #[error("{0}")]
    Overloaded(String),
    /// A local model failed.
    #[error("{0}")]
    Inference(String),
    /// A local model did not answer within `request_timeout`.
    #[error("{0}")]
    LocalTimeout(String),
    /// The gRPC client's deadline (`grpc-timeout`) passed before an answer.
    #[error("{0}")]
    ClientDeadline(String),
    /// A state-changing request without the configured bearer token (401).
    #[error("{0}")]
    Unauthorized(String),
    /// A gRPC method, or a protocol on a model, that is not served (gRPC
    /// `UNIMPLEMENTED`, HTTP 501).
    #[error("{0}")]
    Unimplemented(String),
    /// The variant chosen cannot take a request now (its breaker is open, or it is at
    /// `limits.max_in_flight`): the split chooses again; a client sees it only as the
    /// 503 when no variant and no fallback can answer.
    #[error("the variant cannot take a request now: {0:?}")]
    NotReady(crate::breaker::NotReady),
}

impl RouterError {
    /// The HTTP status for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            RouterError::NoRoute(_)
            | RouterError::UnknownModel(_)
            | RouterError::UnknownVersion(_) => StatusCode::NOT_FOUND,
            RouterError::BadPath(_) | RouterError::ClientBody(_) | RouterError::BadInput(_) => {
                StatusCode::BAD_REQUEST
            }
            RouterError::Overloaded(_) | RouterError::NotReady(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            RouterError::Inference(_) => StatusCode::INTERNAL_SERVER_ERROR,
            RouterError::Unimplemented(_) => StatusCode::NOT_IMPLEMENTED,
            RouterError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            RouterError::UnsupportedEncoding(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            RouterError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            RouterError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            RouterError::ClientBodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            RouterError::LocalTimeout(_) | RouterError::ClientDeadline(_) => {
                StatusCode::GATEWAY_TIMEOUT
            }
            RouterError::Upstream {
                kind: UpstreamErrorKind::Timeout,
                ..
            } => StatusCode::GATEWAY_TIMEOUT,
            RouterError::Upstream { .. } => StatusCode::BAD_GATEWAY,
        }
    }

    /// The metric label for errors rejected before a variant is chosen.
    pub fn reject_reason(&self) -> &'static str {
        match self {
            RouterError::NoRoute(_) => "no_route",
            RouterError::BadPath(_) => "bad_path",
            RouterError::MethodNotAllowed { .. } => "method_not_allowed",
            RouterError::UnknownModel(_) => "unknown_model",
            RouterError::UnknownVersion(_) => "unknown_version",
            RouterError::BodyTooLarge { .. } => "body_too_large",
            RouterError::ClientBody(_) => "client_body",
            RouterError::ClientBodyTimeout(_) => "client_body_timeout",
            RouterError::Upstream { .. } => "upstream",
            RouterError::BadInput(_) => "bad_input",
            RouterError::UnsupportedEncoding(_) => "unsupported_encoding",
            RouterError::Overloaded(_) => "overloaded",
            RouterError::Inference(_) => "inference",
            RouterError::LocalTimeout(_) => "local_timeout",
            RouterError::ClientDeadline(_) => "client_deadline",
            RouterError::NotReady(_) => "not_ready",
            RouterError::Unimplemented(_) => "unimplemented",
            RouterError::Unauthorized(_) => "unauthorized",
        }
    }

    /// The gRPC status code for this error (the same message goes with it).
    pub fn grpc_code(&self) -> GrpcCode {
        match self {
            RouterError::NoRoute(_) | RouterError::Unimplemented(_) => GrpcCode::Unimplemented,
            RouterError::MethodNotAllowed { .. } | RouterError::UnsupportedEncoding(_) => {
                GrpcCode::Unimplemented
            }
            RouterError::UnknownModel(_) | RouterError::UnknownVersion(_) => GrpcCode::NotFound,
            RouterError::BadPath(_) | RouterError::BadInput(_) => GrpcCode::InvalidArgument,
            RouterError::ClientBody(_) => GrpcCode::Cancelled,
            RouterError::BodyTooLarge { .. } => GrpcCode::ResourceExhausted,
            // A full local queue: the caller may retry later (Triton says UNAVAILABLE;
            // RESOURCE_EXHAUSTED names the cause, and clients back off on both).
            RouterError::Overloaded(_) => GrpcCode::ResourceExhausted,
            RouterError::NotReady(_) => GrpcCode::Unavailable,
            RouterError::Unauthorized(_) => GrpcCode::Unauthenticated,
            RouterError::Inference(_) => GrpcCode::Internal,
            RouterError::ClientBodyTimeout(_)
            | RouterError::LocalTimeout(_)
            | RouterError::ClientDeadline(_) => GrpcCode::DeadlineExceeded,
            RouterError::Upstream {
                kind: UpstreamErrorKind::Timeout,
                ..
            } => GrpcCode::DeadlineExceeded,
            RouterError::Upstream { .. } => GrpcCode::Unavailable,
        }
    }
}

/// gRPC status codes (grpc/doc/statuscodes.md): the ones Switchyard answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum GrpcCode {
    /// Success.
    Ok = 0,
    /// The client went away or broke its request.
    Cancelled = 1,
    /// Bad request contents.
    InvalidArgument = 3,
    /// The deadline passed first.
    DeadlineExceeded = 4,
    /// No such model or version.
    NotFound = 5,
    /// Over a limit (body size, a full queue).
    ResourceExhausted = 8,
    /// A method or protocol not served.
    Unimplemented = 12,
    /// The model failed.
    Internal = 13,
    /// No variant can answer now.
    Unavailable = 14,
    /// A token was needed.
    Unauthenticated = 16,
}

impl GrpcCode {
    /// The code for an HTTP status an answer came with (gRPC's HTTP-to-gRPC mapping,
    /// with 400, 408, 413 and 504 added for Switchyard's own answers).
    pub fn from_http(status: StatusCode) -> GrpcCode {
        match status.as_u16() {
            200..=299 => GrpcCode::Ok,
            400 => GrpcCode::InvalidArgument,
            401 => GrpcCode::Unauthenticated,
            403 => GrpcCode::InvalidArgument,
            404 | 405 | 501 => GrpcCode::Unimplemented,
            408 | 504 => GrpcCode::DeadlineExceeded,
            413 | 429 => GrpcCode::ResourceExhausted,
            502..=503 => GrpcCode::Unavailable,
            _ => GrpcCode::Internal,
        }
    }
}

/// The one function that turns an error into an HTTP answer: the `{"error": "..."}` body
/// both TF Serving and the V2 protocol use, with the error's status.
pub fn error_response(err: &RouterError) -> Response<ProxyBody> {
    let body = serde_json::json!({ "error": err.to_string() }).to_string();
    let mut resp = json_response(err.status(), Bytes::from(body));
    // A gRPC request's answer is made from this one (`grpc::from_http`): the code goes
    // with it, so it is decided here, once.
    resp.extensions_mut().insert(err.grpc_code());
    if let RouterError::Unauthorized(_) = err {
        resp.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer"),
        );
    }
    if let RouterError::MethodNotAllowed { allowed, .. } = err {
        let allow = if *allowed == Method::GET {
            "GET, HEAD"
        } else {
            "POST"
        };
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static(allow));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_the_contract() {
        let upstream = |kind| RouterError::Upstream {
            variant: "a".into(),
            kind,
            detail: String::new(),
        };
        assert_eq!(RouterError::UnknownModel("x".into()).status(), 404);
        assert_eq!(RouterError::BadPath("x".into()).status(), 400);
        assert_eq!(RouterError::BodyTooLarge { limit: 1 }.status(), 413);
        assert_eq!(RouterError::ClientBodyTimeout("x".into()).status(), 408);
        assert_eq!(upstream(UpstreamErrorKind::Connect).status(), 502);
        assert_eq!(upstream(UpstreamErrorKind::Reset).status(), 502);
        assert_eq!(upstream(UpstreamErrorKind::Timeout).status(), 504);
    }

    /// The gRPC statuses the protocols issue names, for the errors a client meets.
    #[test]
    fn grpc_codes_follow_the_contract() {
        use GrpcCode::*;
        let upstream = |kind| RouterError::Upstream {
            variant: "a".into(),
            kind,
            detail: String::new(),
        };
        for (err, code) in [
            (RouterError::UnknownModel("x".into()), NotFound),
            (RouterError::UnknownVersion("x".into()), NotFound),
            (RouterError::BadInput("x".into()), InvalidArgument),
            (RouterError::BodyTooLarge { limit: 1 }, ResourceExhausted),
            (RouterError::Overloaded("x".into()), ResourceExhausted),
            (upstream(UpstreamErrorKind::Connect), Unavailable),
            (upstream(UpstreamErrorKind::Timeout), DeadlineExceeded),
            (RouterError::LocalTimeout("x".into()), DeadlineExceeded),
            (RouterError::Inference("x".into()), Internal),
            (RouterError::Unimplemented("x".into()), Unimplemented),
            (RouterError::Unauthorized("x".into()), Unauthenticated),
        ] {
            assert_eq!(err.grpc_code(), code, "{err:?}");
            // An answer made for HTTP carries the code to the gRPC conversion.
            let resp = error_response(&err);
            assert_eq!(resp.extensions().get::<GrpcCode>(), Some(&code));
        }
        assert_eq!(
            GrpcCode::from_http(StatusCode::SERVICE_UNAVAILABLE),
            Unavailable
        );
        assert_eq!(GrpcCode::from_http(StatusCode::NOT_FOUND), Unimplemented);
    }
}
