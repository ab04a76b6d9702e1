//! gRPC on the data port (HTTP/2 with prior knowledge, told apart by `content-type:
//! application/grpc`): KServe V2 / Triton's `inference.GRPCInferenceService` and TF
//! Serving's `PredictionService/Predict` and `ModelService/GetModelStatus`.
//!
//! A call is unary: its one message is read whole (within `max_body_bytes`, inflated
//! when `grpc-encoding` says gzip or deflate), the model name read from it, and then it
//! takes the same path as an HTTP request: split, sticky key, bandit pick, breakers,
//! retries, hedges, fallback and decisions ([`crate::forward`]). Only the variants that
//! speak gRPC take it: local ones (answered here, [`local`]) and remote ones with
//! `protocol: grpc`, to which the message goes as the client sent it, with the model
//! name replaced by appending the upstream's name as a later field 1 (protobuf keeps
//! the last value of a field, and merges a repeated message field), and whose answer
//! streams back frame for frame with its trailers.
//!
//! Errors are gRPC statuses with the HTTP errors' messages: every error answer made on
//! the request path is turned into one here ([`from_http`]); the code is the one
//! [`RouterError::grpc_code`] chose.
//!
//! The message types come from `switchyard-proto` (generated from its `.proto` files and
//! checked in: the build needs no `protoc`).

pub(crate) mod local;

use std::sync::Arc;
use std::time::Instant;

use crate::inbound::RequestBody;
use bytes::{BufMut, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use http::{Request, Response};
use http_body_util::BodyExt;
use prost::Message;
use switchyard_proto::GRPC_STATUS;

use crate::body::{LimitedBody, ProxyBody};
use crate::error::{GrpcCode, RouterError};
use crate::path::{ModelRequest, Protocol, Verb};
use crate::proxy::Router;

/// The generated message types.
pub use switchyard_proto as pb;

/// The methods served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `inference.GRPCInferenceService/ServerLive`.
    ServerLive,
    /// `.../ServerReady`.
    ServerReady,
    /// `.../ServerMetadata`.
    ServerMetadata,
    /// `.../ModelReady`.
    ModelReady,
    /// `.../ModelMetadata`.
    ModelMetadata,
    /// `.../ModelInfer`.
    ModelInfer,
    /// Triton's `.../ModelConfig`: forwarded to remote variants.
    ModelConfig,
    /// Triton's `.../ModelStatistics`: forwarded to remote variants.
    ModelStatistics,
    /// `tensorflow.serving.PredictionService/Predict`.
    Predict,
    /// `tensorflow.serving.ModelService/GetModelStatus`.
    GetModelStatus,
}

impl Method {
    /// The method a gRPC path names.
    pub fn parse(path: &str) -> Option<Method> {
        if let Some(m) = path.strip_prefix("/inference.GRPCInferenceService/") {
            return Some(match m {
                "ServerLive" => Method::ServerLive,
                "ServerReady" => Method::ServerReady,
                "ServerMetadata" => Method::ServerMetadata,
                "ModelReady" => Method::ModelReady,
                "ModelMetadata" => Method::ModelMetadata,
                "ModelInfer" => Method::ModelInfer,
                "ModelConfig" => Method::ModelConfig,
                "ModelStatistics" => Method::ModelStatistics,
                _ => return None,
            });
        }
        match path {
            "/tensorflow.serving.PredictionService/Predict" => Some(Method::Predict),
            "/tensorflow.serving.ModelService/GetModelStatus" => Some(Method::GetModelStatus),
            _ => None,
        }
    }

    /// What the method asks of a model; `None` for the server's own methods.
    fn verb(self) -> Option<Verb> {
        Some(match self {
            Method::ServerLive | Method::ServerReady | Method::ServerMetadata => return None,
            Method::ModelReady => Verb::Ready,
            Method::ModelMetadata => Verb::Metadata,
            Method::ModelInfer | Method::Predict => Verb::Predict,
            Method::ModelConfig => Verb::Config,
            Method::ModelStatistics => Verb::Stats,
            Method::GetModelStatus => Verb::Status,
        })
    }

    /// TF Serving's messages carry the model in a `ModelSpec` (field 1), KServe's as a
    /// string (field 1).
    fn is_tf(self) -> bool {
        matches!(self, Method::Predict | Method::GetModelStatus)
    }
}

/// One gRPC call, read: its method, its message (unframed, inflated) and the model,
/// version and label it names.
#[derive(Debug)]
pub struct Call {
    /// The method.
    pub method: Method,
    /// The request message's bytes.
    pub message: Bytes,
    /// The model named.
    pub model: String,
    /// The version asked for; empty for any.
    pub version: String,
    /// TF Serving's `version_label`; empty for none.
    pub label: String,
    /// When the client's deadline (`grpc-timeout`) passes, if it sent one: tries tell
    /// their upstream what is left of it.
    pub deadline: Option<Instant>,
}

/// The first two fields of KServe's model requests: `name`/`model_name` and version.
#[derive(Clone, PartialEq, prost::Message)]
struct Named {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, tag = "2")]
    version: String,
}

/// TF Serving's requests: the `ModelSpec` in field 1.
#[derive(Clone, PartialEq, prost::Message)]
struct TfNamed {
    #[prost(message, optional, tag = "1")]
    spec: Option<pb::tensorflow::serving::ModelSpec>,
}

impl Call {
    fn read(method: Method, message: Bytes) -> Result<Call, RouterError> {
        let bad = |e: prost::DecodeError| {
            RouterError::BadInput(format!("the request is not a valid protobuf message: {e}"))
        };
        let (model, version, label) = if method.is_tf() {
            // Only field 1 is kept; prost skips the others (tensors included) in place.
            let spec = TfNamed::decode(message.clone())
                .map_err(bad)?
                .spec
                .unwrap_or_default();
            use pb::tensorflow::serving::model_spec::VersionChoice;
            let (version, label) = match spec.version_choice {
                Some(VersionChoice::Version(v)) => (v.value.to_string(), String::new()),
                Some(VersionChoice::VersionLabel(l)) => (String::new(), l),
                None => (String::new(), String::new()),
            };
            (spec.name, version, label)
        } else {
            let n = Named::decode(message.clone()).map_err(bad)?;
            (n.name, n.version, String::new())
        };
        if model.is_empty() {
            return Err(RouterError::BadInput(
                "the request names no model (model_name / model_spec.name is empty)".into(),
            ));
        }
        Ok(Call {
            method,
            message,
            model,
            version,
            label,
            deadline: None,
        })
    }

    /// The framed message for an upstream that knows the model as `upstream_model`: as
    /// the client sent it, with a later field 1 naming the upstream's model when the
    /// names differ ([`switchyard_proto::framed_for_model`]).
    pub fn for_upstream(&self, upstream_model: &str) -> Bytes {
        if upstream_model == self.model {
            return switchyard_proto::frame(&self.message);
        }
        switchyard_proto::framed_for_model(&self.message, self.method.is_tf(), upstream_model)
    }

    /// What a shadow needs to mirror the call.
    pub fn shadow_head(&self) -> switchyard_shadow::GrpcCall {
        switchyard_shadow::GrpcCall {
            model: self.model.clone(),
            in_spec: self.method.is_tf(),
            message: self.message.clone(),
        }
    }
}

/// True when a request is a gRPC call.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// A message in gRPC's length-prefixed framing (uncompressed).
pub fn frame(message: &impl Message) -> Bytes {
    let len = message.encoded_len();
    let mut out = BytesMut::with_capacity(5 + len);
    out.put_u8(0);
    out.put_u32(len as u32);
    // Encoding into a buffer with the room reserved cannot fail.
    let _ = message.encode(&mut out);
    out.freeze()
}

/// The one message of a unary call's body, inflated when its frame says so.
fn unframe(body: &Bytes, encoding: Option<&HeaderValue>, limit: u64) -> Result<Bytes, RouterError> {
    if body.len() < 5 {
        return Err(RouterError::BadInput(format!(
            "a gRPC request body holds one length-prefixed message; got {} bytes",
            body.len()
        )));
    }
    let compressed = body[0];
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    if len != body.len() - 5 {
        return Err(RouterError::BadInput(format!(
            "the gRPC frame says {len} bytes but {} follow (one message per unary call)",
            body.len() - 5
        )));
    }
    let message = body.slice(5..);
    match compressed {
        0 => Ok(message),
        1 => {
            let coding = match encoding.map(HeaderValue::as_bytes) {
                Some(b"gzip") => crate::encoding::Coding::Gzip,
                Some(b"deflate") => crate::encoding::Coding::Deflate,
                other => {
                    return Err(RouterError::UnsupportedEncoding(format!(
                        "the message is compressed with grpc-encoding {:?}; gzip and deflate are understood",
                        other.map(String::from_utf8_lossy)
                    )))
                }
            };
            crate::encoding::decode(&message, coding, limit).map(Bytes::from)
        }
        f => Err(RouterError::BadInput(format!(
            "gRPC frame flag {f}: 0 (plain) or 1 (compressed)"
        ))),
    }
}

/// gRPC's `grpc-message`: percent-encoded outside printable ASCII.
fn grpc_message(text: &str) -> HeaderValue {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    HeaderValue::try_from(out).unwrap_or(HeaderValue::from_static("error"))
}

fn grpc_head(resp: &mut Response<ProxyBody>) {
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    // gRPC is HTTP/2's: [`failed`] and [`status_of`] read a status only from an HTTP/2
    // answer, as an upstream's gRPC answer is.
    *resp.version_mut() = http::Version::HTTP_2;
}

/// A successful answer: `message`, then `grpc-status: 0` in trailers.
pub fn ok(message: &impl Message) -> Response<ProxyBody> {
    let mut trailers = HeaderMap::new();
    trailers.insert(GRPC_STATUS.clone(), HeaderValue::from_static("0"));
    let mut resp = Response::new(ProxyBody::with_trailers(frame(message), trailers));
    grpc_head(&mut resp);
    resp
}

/// A failed answer, trailers-only: the status in the headers and no message.
pub fn status(code: GrpcCode, message: &str) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::full(Bytes::new()));
    grpc_head(&mut resp);
    let h = resp.headers_mut();
    h.insert(
        GRPC_STATUS.clone(),
        HeaderValue::from(u16::from(code as u8)),
    );
    h.insert("grpc-message", grpc_message(message));
    resp
}

/// True for a gRPC answer whose status (in its headers: a trailers-only answer) is a
/// server-side failure; a variant's breaker and retries count it as a 5xx.
/// Only HTTP/2 answers are looked at: gRPC runs over nothing else, and every HTTP/1.1
/// answer would otherwise pay a hashed lookup here per reader (1% of the proxy's
/// instructions for three of them).
pub(crate) fn failed(resp: &Response<ProxyBody>) -> bool {
    const SERVER_SIDE: [&[u8]; 4] = [b"2", b"4", b"13", b"14"]; // UNKNOWN, DEADLINE, INTERNAL, UNAVAILABLE
    resp.version() == http::Version::HTTP_2
        && resp
            .headers()
            .get(&GRPC_STATUS)
            .is_some_and(|s| SERVER_SIDE.contains(&s.as_bytes()))
}

/// The answer's status as HTTP counts it: a gRPC status in the headers (a
/// trailers-only answer of HTTP/2, as for [`failed`]) stands for the HTTP status it maps
/// to.
pub(crate) fn status_of(resp: &Response<ProxyBody>) -> u16 {
    if resp.version() != http::Version::HTTP_2 {
        return resp.status().as_u16();
    }
    match switchyard_proto::grpc_status(resp.headers()) {
        Some(code) if resp.status().is_success() => switchyard_proto::http_status_for(code),
        _ => resp.status().as_u16(),
    }
}

/// Turns an answer made for HTTP (an error made on the request path, or an upstream's
/// non-gRPC answer) into a gRPC status with the same message; gRPC answers pass.
pub(crate) async fn from_http(resp: Response<ProxyBody>) -> Response<ProxyBody> {
    if is_grpc(resp.headers()) {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let code = parts
        .extensions
        .get::<GrpcCode>()
        .copied()
        .unwrap_or_else(|| GrpcCode::from_http(parts.status));
    // Errors made here are a short JSON `{"error"}`; an upstream's page is cut short.
    let body = http_body_util::Limited::new(body, 64 * 1024)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let message = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or_else(|| format!("the variant answered HTTP {}", parts.status));
    let mut out = status(code, &message);
    for (k, v) in &parts.headers {
        if k.as_str().starts_with("x-") {
            out.headers_mut().insert(k.clone(), v.clone());
        }
    }
    out
}

impl Router {
    /// A gRPC call end to end (see the module map); never fails (errors become
    /// statuses).
    pub(crate) async fn grpc(
        self: &Arc<Self>,
        req: Request<RequestBody>,
        request_id: &HeaderValue,
        peer: Option<&HeaderValue>,
        started: Instant,
    ) -> Response<ProxyBody> {
        let resp = match self.grpc_call(req, request_id, peer, started).await {
            Ok(resp) => resp,
            Err(err) => {
                self.metrics.rejected(err.reject_reason());
                crate::error::error_response(&err)
            }
        };
        from_http(resp).await
    }

    async fn grpc_call(
        self: &Arc<Self>,
        req: Request<RequestBody>,
        request_id: &HeaderValue,
        peer: Option<&HeaderValue>,
        started: Instant,
    ) -> Result<Response<ProxyBody>, RouterError> {
        let path = req.uri().path();
        let method = Method::parse(path).ok_or_else(|| {
            RouterError::Unimplemented(format!(
                "gRPC method `{path}` is not served; Switchyard serves inference.GRPCInferenceService and tensorflow.serving's Predict and GetModelStatus"
            ))
        })?;
        if req.method() != http::Method::POST {
            return Err(RouterError::Unimplemented("gRPC calls are POSTs".into()));
        }
        // The client's deadline bounds the whole call, its message's arrival included.
        let Some(timeout) = req.headers().get("grpc-timeout") else {
            return self
                .grpc_call_within(method, req, None, request_id, peer, started)
                .await;
        };
        let timeout = switchyard_proto::parse_timeout(timeout).ok_or_else(|| {
            RouterError::BadInput(format!(
                "grpc-timeout `{}` is not a timeout (up to 8 digits, then H, M, S, m, u or n)",
                String::from_utf8_lossy(timeout.as_bytes())
            ))
        })?;
        let deadline = started + timeout;
        let call = self.grpc_call_within(method, req, Some(deadline), request_id, peer, started);
        tokio::time::timeout_at(deadline.into(), call)
            .await
            .unwrap_or_else(|_| {
                Err(RouterError::ClientDeadline(format!(
                    "the call's deadline (grpc-timeout, {timeout:?}) passed before an answer"
                )))
            })
    }

    /// [`Router::grpc_call`] once the method is known, within the client's deadline.
    async fn grpc_call_within(
        self: &Arc<Self>,
        method: Method,
        req: Request<RequestBody>,
        deadline: Option<Instant>,
        request_id: &HeaderValue,
        peer: Option<&HeaderValue>,
        started: Instant,
    ) -> Result<Response<ProxyBody>, RouterError> {
        let (mut parts, body) = req.into_parts();
        // The model is named inside the message: while reading it, the largest body limit
        // of any model holds; the model's own is checked once it is known.
        let limit = self
            .table
            .load()
            .models()
            .map(|m| m.body_limit)
            .max()
            .unwrap_or(self.feedback_limit());
        let body = LimitedBody::new(body, limit, self.body_stall_timeout);
        let body = crate::body::collect_limited(body, limit).await?;
        let encoding = parts.headers.get("grpc-encoding");
        let message = {
            let encoding = encoding.cloned();
            // A compressed message inflates off the async workers, within the limit.
            let work = if body.first() == Some(&1) {
                usize::try_from(limit).unwrap_or(usize::MAX)
            } else {
                0
            };
            crate::offload::cpu(work, move || unframe(&body, encoding.as_ref(), limit)).await??
        };
        match method {
            Method::ServerLive => return Ok(ok(&pb::inference::ServerLiveResponse { live: true })),
            Method::ServerReady => {
                let ready = self.not_ready().is_none();
                return Ok(ok(&pb::inference::ServerReadyResponse { ready }));
            }
            Method::ServerMetadata => {
                return Ok(ok(&pb::inference::ServerMetadataResponse {
                    name: "switchyard".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    extensions: crate::v2::EXTENSIONS
                        .iter()
                        // Binary tensors are HTTP's; gRPC has raw contents.
                        .filter(|e| **e != "binary_tensor_data")
                        .map(|e| e.to_string())
                        .collect(),
                }));
            }
            _ => {}
        }
        let verb = method.verb().unwrap_or(Verb::Predict);
        let mut call = Call::read(method, message)?;
        call.deadline = deadline;
        let call = Arc::new(call);
        let table = self.table.load_full();
        let model = table
            .model(&call.model)
            .ok_or_else(|| RouterError::UnknownModel(call.model.clone()))?;
        if call.message.len() as u64 > model.body_limit {
            return Err(RouterError::BodyTooLarge {
                limit: model.body_limit,
            });
        }
        if model.grpc_variants == 0 {
            return Err(RouterError::Unimplemented(format!(
                "model `{}` has no variant that speaks gRPC (a local variant, or an upstream with protocol: grpc)",
                model.name
            )));
        }
        let model_req = ModelRequest {
            protocol: Protocol::Grpc,
            verb,
            model: 0..0,
            version: None,
            label: None,
        };
        let payload = crate::forward::Payload::Grpc(call);
        Ok(self
            .forward(
                model, &model_req, &mut parts, payload, request_id, peer, started,
            )
            .await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_upstream_name_replaces_the_clients_by_a_later_field() {
        let req = pb::inference::ModelInferRequest {
            model_name: "digits".into(),
            model_version: "1".into(),
            id: "x".into(),
            ..Default::default()
        };
        let call = Call::read(Method::ModelInfer, req.encode_to_vec().into()).unwrap();
        assert_eq!(
            (call.model.as_str(), call.version.as_str()),
            ("digits", "1")
        );
        let framed = call.for_upstream("triton_digits");
        let got = pb::inference::ModelInferRequest::decode(&framed[5..]).unwrap();
        assert_eq!(got.model_name, "triton_digits");
        assert_eq!((got.model_version.as_str(), got.id.as_str()), ("1", "x"));
        assert_eq!(
            u32::from_be_bytes(framed[1..5].try_into().unwrap()) as usize,
            framed.len() - 5
        );

        use pb::tensorflow::serving::{
            model_spec::VersionChoice, Int64Value, ModelSpec, PredictRequest,
        };
        let req = PredictRequest {
            model_spec: Some(ModelSpec {
                name: "digits".into(),
                signature_name: "serving_default".into(),
                version_choice: Some(VersionChoice::Version(Int64Value { value: 3 })),
            }),
            ..Default::default()
        };
        let call = Call::read(Method::Predict, req.encode_to_vec().into()).unwrap();
        assert_eq!(
            (call.model.as_str(), call.version.as_str()),
            ("digits", "3")
        );
        let framed = call.for_upstream("tf_digits");
        let spec = PredictRequest::decode(&framed[5..])
            .unwrap()
            .model_spec
            .unwrap();
        assert_eq!(spec.name, "tf_digits");
        assert_eq!(
            spec.signature_name, "serving_default",
            "merged, not replaced"
        );
        assert_eq!(
            spec.version_choice,
            Some(VersionChoice::Version(Int64Value { value: 3 }))
        );
    }

    #[test]
    fn frames_are_checked_and_inflated_within_the_limit() {
        let msg = Bytes::from_static(b"\x0a\x06digits");
        let framed = switchyard_proto::frame(&msg);
        assert_eq!(unframe(&framed, None, 1 << 20).unwrap(), msg);
        let short = framed.slice(..framed.len() - 1);
        assert!(matches!(
            unframe(&short, None, 1 << 20),
            Err(RouterError::BadInput(_))
        ));
        let packed = crate::encoding::encode(&vec![0u8; 1 << 20], crate::encoding::Coding::Gzip);
        let mut bomb = vec![1u8];
        bomb.extend_from_slice(&(packed.len() as u32).to_be_bytes());
        bomb.extend_from_slice(&packed);
        let gzip = HeaderValue::from_static("gzip");
        assert!(matches!(
            unframe(&Bytes::from(bomb.clone()), Some(&gzip), 1000),
            Err(RouterError::BodyTooLarge { .. })
        ));
        assert_eq!(
            unframe(&Bytes::from(bomb.clone()), Some(&gzip), 2 << 20)
                .unwrap()
                .len(),
            1 << 20
        );
        let snappy = HeaderValue::from_static("snappy");
        assert!(matches!(
            unframe(&Bytes::from(bomb), Some(&snappy), 2 << 20),
            Err(RouterError::UnsupportedEncoding(_))
        ));
    }

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(
            grpc_message("model `m` 100% ≠").to_str().unwrap(),
            "model `m` 100%25 %E2%89%A0"
        );
    }
}
