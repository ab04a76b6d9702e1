//! Phase 6, *forward*, for local variants: the request is answered in-process by a
//! model behind a batch queue (`switchyard_inference`). This module is the protocol
//! codec: TF Serving and V2 JSON in, tensors validated against the model's signature,
//! JSON out; plus model status, metadata and readiness answered from the signature.

use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use serde_json::{json, Value};
use switchyard_inference::{Batcher, InferenceError, Signature};

use crate::body::{json_response, ProxyBody};
use crate::error::RouterError;
use crate::path::{Protocol, Verb};

/// A model served in-process.
#[derive(Debug)]
pub struct LocalBackend {
    /// The model behind its batch queue.
    pub batcher: Batcher,
    /// What it was loaded from (a reload compares it).
    pub source: crate::table::LocalSource,
    /// Extra latency before answering (experiments).
    pub delay: Option<Duration>,
    /// Share of predictions answered with 500 (experiments).
    pub failure_rate: f64,
    /// Longest wait for the batch queue and the run (`request_timeout`): past it the
    /// client gets 504, and a batch thread that has not yet taken the request skips it.
    pub timeout: Duration,
    /// The one version this model answers as (`local.version`), as the path writes it.
    pub version: String,
}

/// What the path asked of the model beyond its name.
#[derive(Debug, Clone, Copy, Default)]
pub struct Asked<'a> {
    /// `/versions/{v}`.
    pub version: Option<&'a str>,
    /// TF Serving `/labels/{l}`.
    pub label: Option<&'a str>,
    /// The request's `Content-Encoding`.
    pub content_encoding: Option<&'a http::HeaderValue>,
    /// The request's `Accept-Encoding`.
    pub accept_encoding: Option<&'a http::HeaderValue>,
    /// The request's `Inference-Header-Content-Length` (V2 binary tensors).
    pub header_length: Option<&'a http::HeaderValue>,
    /// The gRPC call, when the request is one (answered by [`crate::grpc::local`]).
    pub grpc: Option<&'a crate::grpc::Call>,
}

impl LocalBackend {
    /// Whether the model can serve now ([`Batcher::health`]): a queue that has not moved
    /// for `request_timeout` is a model whose requests are all timing out.
    pub fn health(&self) -> Result<(), switchyard_inference::NotServing> {
        self.batcher.health(self.timeout)
    }

    /// Answers one request for `model` (the client's name for it).
    pub async fn handle(
        &self,
        model: &str,
        protocol: Protocol,
        verb: Verb,
        asked: Asked<'_>,
        body: crate::body::LimitedBody,
        body_limit: u64,
    ) -> Result<Response<ProxyBody>, RouterError> {
        // As TF Serving and Triton do: a version the server does not have is a 404, not
        // silently the one it has.
        if let Some(v) = asked.version {
            // Numerically: `/versions/007` is version 7.
            let same = v.parse::<u64>().ok().map(|n| n.to_string());
            if same.as_deref() != Some(self.version.as_str()) {
                return Err(RouterError::UnknownVersion(format!(
                    "model `{model}` has no version `{v}`; it serves version {}",
                    self.version
                )));
            }
        }
        if let Some(l) = asked.label {
            return Err(RouterError::UnknownVersion(format!(
                "model `{model}` has no label `{l}`; it is served in-process as version {} and has no labels",
                self.version
            )));
        }
        if let Some(call) = asked.grpc {
            return self.grpc(model, verb, call).await;
        }
        let version = self.version.as_str();
        let sig = self.batcher.model().signature();
        let mut header_length = None;
        let mut phases = None;
        let answer: Bytes = match (protocol, verb) {
            (_, Verb::Ready) => match self.health() {
                Ok(()) => json!({ "name": model, "ready": true }).to_string().into(),
                Err(why) => {
                    return Ok(json_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        json!({ "name": model, "ready": false, "error": why.0 })
                            .to_string()
                            .into(),
                    ))
                }
            },
            (Protocol::TfServing, Verb::Status) => json!({
                "model_version_status": [{
                    "version": version,
                    "state": "AVAILABLE",
                    "status": { "error_code": "OK", "error_message": "" }
                }]
            })
            .to_string()
            .into(),
            (Protocol::TfServing, Verb::Metadata) => {
                tf_metadata(model, version, sig).to_string().into()
            }
            (Protocol::V2, Verb::Metadata | Verb::Status) => {
                crate::v2::metadata(model, version, sig).to_string().into()
            }
            (Protocol::Grpc, Verb::Metadata | Verb::Status) => {
                return Err(RouterError::BadInput(
                    "a gRPC call reached the HTTP codec".into(),
                ))
            }
            (_, Verb::Config) => crate::v2::model_config(model, version, &self.batcher)
                .to_string()
                .into(),
            (_, Verb::Stats) => crate::v2::model_stats(model, version, &self.batcher)
                .to_string()
                .into(),
            // Loaded since the config was: loading again is a no-op, as in Triton.
            (_, Verb::Repository(true)) => Bytes::from_static(b"{}"),
            (_, Verb::Repository(false)) => {
                return Err(RouterError::BadInput(format!(
                    "model `{model}` is served in-process from the config file; remove it there to unload it"
                )))
            }
            (_, Verb::Extension) => {
                return Err(RouterError::NoRoute(format!(
                    "model `{model}` is served in-process, which answers /infer, /ready, /config and /stats under /v2/models/{{model}}, not this path"
                )))
            }
            (_, Verb::Classify | Verb::Regress) => {
                return Err(RouterError::BadInput(format!(
                    "model `{model}` is served in-process and answers :predict only"
                )))
            }
            (_, Verb::Predict) => {
                let arrived = std::time::Instant::now();
                let answered = self
                    .predict(model, protocol, asked, body, body_limit)
                    .await;
                if answered.is_err() {
                    self.batcher.count_failure(arrived.elapsed());
                }
                let (bytes, head, p) = answered?;
                header_length = head;
                phases = Some(p);
                bytes
            }
        };
        if let Some(d) = self.delay {
            tokio::time::sleep(d).await;
        }
        let coding = crate::encoding::answer_coding(asked.accept_encoding);
        let answer = match coding {
            None => answer,
            Some(coding) => {
                let size = answer.len();
                let packed =
                    crate::offload::cpu(size, move || crate::encoding::encode(&answer, coding))
                        .await?;
                Bytes::from(packed)
            }
        };
        let mut resp = json_response(StatusCode::OK, answer);
        if let Some(mut p) = phases {
            p.respond = p.at.elapsed();
            resp.extensions_mut().insert(p);
        }
        let headers = resp.headers_mut();
        if let Some(n) = header_length {
            // JSON first, then the binary tensors: the header says where the JSON ends.
            headers.insert(
                crate::v2::INFERENCE_HEADER_CONTENT_LENGTH.clone(),
                http::HeaderValue::from(n),
            );
            headers.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/octet-stream"),
            );
        }
        if let Some(coding) = coding {
            headers.insert(
                http::header::CONTENT_ENCODING,
                http::HeaderValue::from_static(coding.token()),
            );
            headers.insert(
                http::header::VARY,
                http::HeaderValue::from_static("accept-encoding"),
            );
        }
        Ok(resp)
    }

    /// A prediction: the body read (inflated if compressed), decoded, queued, answered;
    /// with the JSON header's length when the answer carries binary tensors.
    async fn predict(
        &self,
        model: &str,
        protocol: Protocol,
        asked: Asked<'_>,
        body: crate::body::LimitedBody,
        body_limit: u64,
    ) -> Result<(Bytes, Option<usize>, Phases), RouterError> {
        let sig = self.batcher.model().signature();
        let coding = crate::encoding::request_coding(asked.content_encoding)?;
        let header_length = match asked.header_length {
            None => None,
            Some(v) => Some(
                v.to_str()
                    .ok()
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .ok_or_else(|| {
                        RouterError::BadInput(format!(
                            "Inference-Header-Content-Length must be a byte count, not {v:?}"
                        ))
                    })?,
            ),
        };
        if header_length.is_some() && protocol == Protocol::TfServing {
            return Err(RouterError::BadInput(
                "binary tensors (Inference-Header-Content-Length) are a V2 extension; TF Serving's REST API takes JSON".into(),
            ));
        }
        let bytes = crate::body::collect_limited(body, body_limit).await?;
        if self.failure_rate > 0.0 && fail_now(self.failure_rate) {
            return Err(RouterError::Inference(
                "injected failure (local.failure_rate)".into(),
            ));
        }
        // Large bodies are parsed (and their answers written) off the async workers: a
        // 16 MiB body is tens of milliseconds of JSON.
        let size = bytes.len();
        // A compressed body's size says nothing of what it inflates to: always off the
        // async workers.
        let work = if coding.is_some() {
            usize::try_from(body_limit).unwrap_or(usize::MAX)
        } else {
            size
        };
        let decoded = {
            let (model, sig) = (model.to_string(), sig.clone());
            crate::offload::cpu(work, move || {
                // Inflated here, off the async workers, within the body limit.
                let inflated;
                let bytes: &[u8] = match coding {
                    Some(c) => {
                        inflated = crate::encoding::decode(&bytes, c, body_limit)?;
                        &inflated
                    }
                    None => &bytes,
                };
                match protocol {
                    Protocol::TfServing => {
                        let request: Value = serde_json::from_slice(bytes).map_err(|e| {
                            RouterError::BadInput(format!(
                                "the request body is not valid JSON: {e}"
                            ))
                        })?;
                        let (input, rows, format) = tf_input(&model, &sig, &request)?;
                        Ok::<_, RouterError>(Decoded::Tf(input, rows, format))
                    }
                    Protocol::V2 => {
                        let (request, input, rows, plan) =
                            crate::v2::http_request(&model, &sig, bytes, header_length)?;
                        Ok(Decoded::V2(request, input, rows, plan))
                    }
                    Protocol::Grpc => Err(RouterError::BadInput(
                        "a gRPC call reached the HTTP codec".into(),
                    )),
                }
            })
            .await??
        };
        let (input, rows) = match &decoded {
            Decoded::Tf(input, rows, _) | Decoded::V2(_, input, rows, _) => (input.clone(), *rows),
        };
        let output = self.infer(model, input, rows).await?;
        let phases = Phases {
            queue: output.queued,
            compute: output.computed,
            respond: Duration::ZERO,
            at: std::time::Instant::now(),
        };
        let output = output.values;
        // The answer is about as large as the request's values.
        let (model, version, sig) = (model.to_string(), self.version.clone(), sig.clone());
        let (bytes, head) = crate::offload::cpu(size, move || match decoded {
            Decoded::Tf(_, rows, format) => (tf_output(&output, rows, format), None),
            Decoded::V2(request, _, rows, plan) => {
                let out = crate::v2::output(&sig, plan, output, rows);
                crate::v2::http_answer(&model, &version, request.get("id"), &out, plan)
            }
        })
        .await?;
        Ok((bytes, head, phases))
    }

    /// Queues `rows` rows and waits, within `request_timeout`, for their outputs.
    pub(crate) async fn infer(
        &self,
        model: &str,
        input: Vec<f32>,
        rows: usize,
    ) -> Result<switchyard_inference::Output, RouterError> {
        let pending = self.batcher.enqueue(input, rows);
        let answered = match pending {
            Ok(p) => tokio::time::timeout(self.timeout, p).await.map_err(|_| {
                RouterError::LocalTimeout(format!(
                    "model `{model}` did not answer within request_timeout ({:?})",
                    self.timeout
                ))
            })?,
            Err(e) => Err(e),
        };
        answered.map_err(|e| match e {
            InferenceError::BadInput(m) => RouterError::BadInput(m),
            InferenceError::Overloaded { .. } | InferenceError::Closed => {
                RouterError::Overloaded(e.to_string())
            }
            other => RouterError::Inference(other.to_string()),
        })
    }
}

/// Where a local prediction's time went after it was routed: waiting for its batch,
/// its batch's run, and writing the answer (encoding, compression, `local.delay`). On
/// the response's extensions, for `server-timing` and the phase histogram.
#[derive(Debug, Clone, Copy)]
pub struct Phases {
    /// From queueing to its batch starting.
    pub queue: Duration,
    /// Its batch's run.
    pub compute: Duration,
    /// From the outputs to the answer.
    pub respond: Duration,
    /// When the outputs were ready (`respond` is measured from it).
    pub(crate) at: std::time::Instant,
}

/// A decoded prediction request, per protocol.
enum Decoded {
    Tf(Vec<f32>, usize, TfFormat),
    V2(Value, Vec<f32>, usize, crate::v2::Plan),
}

pub(crate) fn fail_now(rate: f64) -> bool {
    let id = crate::ids::new_request_id();
    let hash = crate::selector::stable_hash(id.as_bytes());
    ((hash >> 11) as f64 / (1u64 << 53) as f64) < rate
}

/// Which TF Serving request format was used: it decides the answer's key.
#[derive(Clone, Copy)]
enum TfFormat {
    Row,
    Columnar,
}

fn tf_input(
    model: &str,
    sig: &Signature,
    req: &Value,
) -> Result<(Vec<f32>, usize, TfFormat), RouterError> {
    let obj = req.as_object().ok_or_else(|| {
        RouterError::BadInput(
            "the request must be a JSON object with `instances` or `inputs`".into(),
        )
    })?;
    // The model has one signature, TF Serving's default; asking for another is a
    // mistake to report, not to answer with the default.
    match obj.get("signature_name") {
        None => {}
        Some(Value::String(s)) if s.is_empty() || s == "serving_default" => {}
        Some(other) => {
            return Err(RouterError::BadInput(format!(
            "unknown signature_name {other}; model `{model}` has one signature, `serving_default`"
        )))
        }
    }
    let input_name = &sig.input.name;
    let (value, format, what) = match (obj.get("instances"), obj.get("inputs")) {
        (Some(_), Some(_)) => {
            return Err(RouterError::BadInput(
                "give either `instances` (row format) or `inputs` (columnar format), not both"
                    .into(),
            ))
        }
        (Some(v), None) => (v, TfFormat::Row, "instances"),
        (None, Some(v)) => (v, TfFormat::Columnar, "inputs"),
        (None, None) => {
            return Err(RouterError::BadInput(
                "the request has neither `instances` nor `inputs`".into(),
            ))
        }
    };
    // Named inputs: `{"pixels": [...]}` per instance (row) or for the whole batch (columnar).
    let unwrap_named = |v: &'_ Value, at: &str| -> Result<Value, RouterError> {
        match v {
            Value::Object(m) => {
                if let Some(k) = m.keys().find(|k| *k != input_name) {
                    return Err(RouterError::BadInput(format!(
                        "{at} names input `{k}`; model `{model}` takes one input, `{input_name}`"
                    )));
                }
                m.get(input_name).cloned().ok_or_else(|| {
                    RouterError::BadInput(format!("{at} lacks input `{input_name}`"))
                })
            }
            other => Ok(other.clone()),
        }
    };
    let rows: Vec<Value> = match format {
        TfFormat::Row => {
            let list = value.as_array().ok_or_else(|| {
                RouterError::BadInput("`instances` must be a list, one entry per example".into())
            })?;
            list.iter()
                .enumerate()
                .map(|(i, r)| unwrap_named(r, &format!("instances[{i}]")))
                .collect::<Result<_, _>>()?
        }
        TfFormat::Columnar => match unwrap_named(value, "inputs")? {
            Value::Array(list) => list,
            _ => {
                return Err(RouterError::BadInput(
                    "`inputs` must be a list of examples (a tensor with a batch dimension)".into(),
                ))
            }
        },
    };
    if rows.is_empty() {
        return Err(RouterError::BadInput(format!("`{what}` is empty")));
    }
    let row_len = sig.input.row_len();
    // Sized by what the body holds, never by a product of client-given counts (a
    // million empty rows would otherwise reserve 64 floats each before row 0 fails).
    let mut data = Vec::with_capacity(rows.iter().map(count_numbers).sum());
    for (i, row) in rows.iter().enumerate() {
        let before = data.len();
        flatten_numbers(row, &mut data, Datatype::Fp32)
            .map_err(|m| RouterError::BadInput(format!("{what}[{i}]: {m}")))?;
        let got = data.len() - before;
        if got != row_len {
            return Err(RouterError::BadInput(format!(
                "{what}[{i}] has {got} values; model `{model}` takes {row_len} per example (input `{input_name}`, shape {:?})",
                sig.input.shape_i64()
            )));
        }
    }
    Ok((data, rows.len(), format))
}

/// The V2 numeric datatypes, for range checks: a value the datatype cannot hold is
/// refused rather than silently converted (Triton refuses them too).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Datatype {
    Fp16,
    Fp32,
    Fp64,
    Int { bits: u32, signed: bool },
}

impl Datatype {
    pub(crate) const NAMES: &'static [&'static str] = &[
        "FP32", "FP64", "FP16", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32",
        "UINT64",
    ];

    pub(crate) fn parse(name: &str) -> Datatype {
        let int = |bits: u32, signed: bool| Datatype::Int { bits, signed };
        match name {
            "FP16" => Datatype::Fp16,
            "FP64" => Datatype::Fp64,
            "INT8" => int(8, true),
            "INT16" => int(16, true),
            "INT32" => int(32, true),
            "INT64" => int(64, true),
            "UINT8" => int(8, false),
            "UINT16" => int(16, false),
            "UINT32" => int(32, false),
            "UINT64" => int(64, false),
            _ => Datatype::Fp32,
        }
    }

    /// Bytes per value in the binary encodings.
    pub(crate) fn width(self) -> usize {
        match self {
            Datatype::Fp16 => 2,
            Datatype::Fp32 => 4,
            Datatype::Fp64 => 8,
            Datatype::Int { bits, .. } => bits as usize / 8,
        }
    }

    fn range(bits: u32, signed: bool) -> (i128, i128) {
        if signed {
            (-(1i128 << (bits - 1)), (1i128 << (bits - 1)) - 1)
        } else {
            (0, (1i128 << bits) - 1)
        }
    }

    /// A little-endian value of [`Datatype::width`] bytes as the model's `f32`. Integers
    /// always fit their own range; floats must be finite and within f32's.
    pub(crate) fn read_le(self, b: &[u8]) -> Result<f32, String> {
        let mut w = [0u8; 8];
        w[..b.len().min(8)].copy_from_slice(&b[..b.len().min(8)]);
        match self {
            Datatype::Fp16 => self.finite(f64::from(switchyard_proto::half_to_f32(
                u16::from_le_bytes([w[0], w[1]]),
            ))),
            Datatype::Fp32 => self.finite(f64::from(f32::from_le_bytes([w[0], w[1], w[2], w[3]]))),
            Datatype::Fp64 => self.finite(f64::from_le_bytes(w)),
            Datatype::Int { bits, signed } => {
                let unsigned = u64::from_le_bytes(w);
                let v = if signed {
                    // Sign-extend from `bits`.
                    let shift = 64 - bits;
                    i128::from(((unsigned << shift) as i64) >> shift)
                } else {
                    i128::from(unsigned)
                };
                Ok(v as f32)
            }
        }
    }

    /// A number from gRPC's typed contents, checked as a JSON number is.
    pub(crate) fn read_f64(self, x: f64) -> Result<f32, String> {
        match self {
            Datatype::Int { bits, signed } => {
                let (min, max) = Self::range(bits, signed);
                if x.fract() != 0.0 || !x.is_finite() || (x as i128) < min || (x as i128) > max {
                    return Err(format!(
                        "`{x}` is not an integer in the datatype's range {min}..={max}"
                    ));
                }
                Ok(x as f32)
            }
            _ => self.finite(x),
        }
    }

    fn finite(self, x: f64) -> Result<f32, String> {
        let limit = if self == Datatype::Fp16 {
            65504.0
        } else {
            f64::from(f32::MAX)
        };
        // The model computes in f32: a value that would become ±inf there (1e39)
        // gave predictions of `null`.
        if !x.is_finite() || x.abs() > limit {
            return Err(format!(
                "`{x}` is not a finite value the model can take (|x| ≤ {limit:e})"
            ));
        }
        Ok(x as f32)
    }

    /// The value as the model's `f32`, or why it cannot be one.
    fn convert(self, n: &serde_json::Number) -> Result<f32, String> {
        match self {
            Datatype::Int { bits, signed } => {
                let (min, max) = Self::range(bits, signed);
                let v = match n
                    .as_i64()
                    .map(i128::from)
                    .or_else(|| n.as_u64().map(i128::from))
                {
                    Some(v) => v,
                    // Past 64 bits serde_json reads an integer as a float: out of range,
                    // not "not an integer".
                    None if n
                        .as_f64()
                        .is_some_and(|x| x.is_finite() && x.fract() == 0.0) =>
                    {
                        return Err(format!(
                            "`{n}` is outside the datatype's range {min}..={max}"
                        ))
                    }
                    None => return Err(format!("`{n}` is not an integer")),
                };
                if v < min || v > max {
                    return Err(format!(
                        "`{n}` is outside the datatype's range {min}..={max}"
                    ));
                }
                Ok(v as f32)
            }
            Datatype::Fp16 | Datatype::Fp32 | Datatype::Fp64 => {
                let x = n
                    .as_f64()
                    .ok_or_else(|| format!("`{n}` is not a number we can read"))?;
                self.finite(x).map_err(|_| {
                    format!(
                        "`{n}` is not a finite value the model can take (|x| ≤ {:e})",
                        if self == Datatype::Fp16 {
                            65504.0
                        } else {
                            f64::from(f32::MAX)
                        }
                    )
                })
            }
        }
    }
}

/// Deepest nesting of lists accepted inside one tensor's data. Rows may be nested as
/// the shape says or flattened (both are common); serde_json itself stops at 128.
const MAX_DATA_DEPTH: usize = 32;

/// How many numbers a (possibly nested) JSON array holds, counted without allocating.
pub(crate) fn count_numbers(v: &Value) -> usize {
    match v {
        Value::Array(items) => items.iter().map(count_numbers).sum(),
        Value::Number(_) => 1,
        _ => 0,
    }
}

/// Appends every number in a (possibly nested) JSON array to `out`, checked against
/// `datatype`.
pub(crate) fn flatten_numbers(
    v: &Value,
    out: &mut Vec<f32>,
    datatype: Datatype,
) -> Result<(), String> {
    flatten_at(v, out, datatype, 0)
}

fn flatten_at(
    v: &Value,
    out: &mut Vec<f32>,
    datatype: Datatype,
    depth: usize,
) -> Result<(), String> {
    match v {
        Value::Number(n) => {
            out.push(datatype.convert(n)?);
            Ok(())
        }
        Value::Array(items) => {
            if depth >= MAX_DATA_DEPTH {
                return Err(format!("lists nested deeper than {MAX_DATA_DEPTH}"));
            }
            items
                .iter()
                .try_for_each(|i| flatten_at(i, out, datatype, depth + 1))
        }
        other => Err(format!("expected numbers, found {}", kind(other))),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Output rows serialised straight from the `f32` slices, so numbers print in f32's
/// shortest round-trip form (`0.9999951`, not the f64 widening `0.9999951124191284`).
#[derive(serde::Serialize)]
struct TfAnswer<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    predictions: Option<Vec<&'a [f32]>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    outputs: Option<Vec<&'a [f32]>>,
}

fn tf_output(output: &[f32], rows: usize, format: TfFormat) -> Bytes {
    let per = output.len().checked_div(rows).unwrap_or(0).max(1);
    let rows: Vec<&[f32]> = output.chunks(per).collect();
    let answer = match format {
        TfFormat::Row => TfAnswer {
            predictions: Some(rows),
            outputs: None,
        },
        TfFormat::Columnar => TfAnswer {
            predictions: None,
            outputs: Some(rows),
        },
    };
    Bytes::from(serde_json::to_vec(&answer).unwrap_or_default())
}

fn tf_metadata(model: &str, version: &str, sig: &Signature) -> Value {
    let t = |s: &switchyard_inference::TensorSpec| {
        json!({
            "dtype": "DT_FLOAT",
            "tensor_shape": { "dim": s.shape_i64().iter().map(|d| json!({ "size": d.to_string() })).collect::<Vec<_>>() },
            "name": s.name,
        })
    };
    json!({
        "model_spec": { "name": model, "signature_name": "", "version": version },
        "metadata": { "signature_def": { "signature_def": { "serving_default": {
            "inputs": { sig.input.name.clone(): t(&sig.input) },
            "outputs": { sig.output.name.clone(): t(&sig.output) },
            "method_name": "tensorflow/serving/predict",
        }}}}
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A seeded random JSON value built from what a body decoder meets: numbers of
    /// every kind (huge, negative, fractional), strings, nulls, lists and objects with
    /// the keys the decoders look for, nested a few levels.
    fn arbitrary(next: &mut impl FnMut() -> u64, depth: u32) -> Value {
        const KEYS: &[&str] = &[
            "instances",
            "inputs",
            "name",
            "datatype",
            "shape",
            "data",
            "pixels",
            "id",
        ];
        const NUMBERS: &[&str] = &[
            "0",
            "1",
            "-1",
            "64",
            "1e39",
            "-1e308",
            "1.5",
            "18446744073709551616",
            "288230376151711745",
            "9223372036854775807",
            "-9223372036854775808",
            "65504.1",
        ];
        match next() % if depth == 0 { 4 } else { 7 } {
            0 => serde_json::from_str(NUMBERS[(next() % NUMBERS.len() as u64) as usize])
                .unwrap_or(Value::Null),
            1 => Value::from(
                ["FP32", "INT8", "UINT64", "FP16", "BYTES", "pixels", ""][(next() % 7) as usize],
            ),
            2 => Value::Null,
            3 => Value::from(next() % 70),
            4 | 5 => Value::Array(
                (0..next() % 70)
                    .map(|_| arbitrary(next, depth - 1))
                    .collect(),
            ),
            _ => Value::Object(
                (0..next() % 5)
                    .map(|_| {
                        let k = KEYS[(next() % KEYS.len() as u64) as usize].to_string();
                        (k, arbitrary(next, depth - 1))
                    })
                    .collect(),
            ),
        }
    }

    /// A property, seeded: whatever JSON a client sends, the TF Serving and V2 decoders
    /// answer Ok or a 400, never panic, and never hand the batcher values that do not
    /// make whole rows.
    #[test]
    fn arbitrary_bodies_never_panic_and_refusals_are_400() {
        let model = switchyard_inference::OnnxModel::from_bytes(
            "mlp",
            switchyard_inference::builtin::DIGITS_MLP,
        )
        .unwrap();
        let sig = model.signature();
        let mut next = crate::test_rng(0x2545_F491_4F6C_DD1D);
        let mut accepted = 0;
        for i in 0..5_000 {
            let mut body = arbitrary(&mut next, 4);
            // Now and then a body close to valid, so the deeper checks are reached.
            if i % 4 == 0 {
                let rows = 1 + next() % 2;
                // Mostly pixels; now and then a value from the generator instead.
                let data: Vec<Value> = (0..64 * rows)
                    .map(|_| match next() % 200 {
                        0 => arbitrary(&mut next, 0),
                        n => Value::from(n % 17),
                    })
                    .collect();
                let first = if next().is_multiple_of(4) {
                    arbitrary(&mut next, 0)
                } else {
                    Value::from(rows)
                };
                let datatype = ["FP32", "UINT8", "INT8", "FP16"][(next() % 4) as usize];
                body = serde_json::json!({
                    "instances": data.chunks(64).collect::<Vec<_>>(),
                    "inputs": [{ "name": "pixels", "datatype": datatype, "shape": [first, 64], "data": data }],
                });
                if let Some(o) = body.as_object_mut() {
                    o.remove(if next().is_multiple_of(2) {
                        "instances"
                    } else {
                        "inputs"
                    });
                }
            }
            let v2 = crate::v2::http_request("m", sig, &serde_json::to_vec(&body).unwrap(), None)
                .map(|(_, data, rows, _)| (data, rows));
            for decoded in [tf_input("m", sig, &body).map(|(d, r, _)| (d, r)), v2] {
                match decoded {
                    Ok((data, rows)) => {
                        accepted += 1;
                        assert!(rows >= 1 && data.len() == rows * 64, "{body}");
                        assert!(data.iter().all(|x| x.is_finite()), "{body}");
                    }
                    Err(e) => assert_eq!(e.status(), http::StatusCode::BAD_REQUEST, "{body}: {e}"),
                }
            }
        }
        assert!(accepted > 0, "the generator also reaches valid bodies");
    }
}
