//! The KServe / Triton V2 inference codec of local variants, shared by its three
//! encodings: HTTP/JSON, HTTP with the binary tensor extension, and gRPC.
//!
//! - A request is one input tensor ([`Input`]) whose values come as JSON numbers, as
//!   little-endian bytes (`binary_data_size` over HTTP, `raw_input_contents` over gRPC)
//!   or as gRPC's typed lists; every size is checked against the shape, and the shape
//!   against the model, before anything is allocated.
//! - The outputs asked for ([`Requested`]) are checked against the model's (an unknown
//!   one is a 400, as in Triton) and become a [`Plan`]: binary or JSON, whole or Triton's
//!   classification extension (the top `k` as `"score:index"`).
//! - [`model_config`] and [`model_stats`] answer Triton's configuration and statistics
//!   extensions from the model's signature, its batching options and the runtime's own
//!   counters.

use bytes::{BufMut, Bytes, BytesMut};
use serde_json::{json, Value};
use switchyard_inference::{Batcher, Signature, TensorSpec};

use crate::error::RouterError;
use crate::local::{count_numbers, flatten_numbers, Datatype};

/// Where an input tensor's values are.
#[derive(Debug)]
pub(crate) enum Data<'a> {
    /// JSON numbers, nested or flat (`data`).
    Json(&'a Value),
    /// Little-endian bytes in the datatype's width (binary extension, gRPC raw contents).
    Raw(&'a [u8]),
    /// gRPC's typed contents, already numbers.
    Numbers(Vec<f64>),
}

/// One input tensor as a request gives it.
#[derive(Debug)]
pub(crate) struct Input<'a> {
    pub name: &'a str,
    pub datatype: &'a str,
    pub shape: Vec<i64>,
    pub data: Data<'a>,
}

/// One output a request asks for.
#[derive(Debug, Default)]
pub(crate) struct Requested<'a> {
    pub name: &'a str,
    /// `parameters.binary_data` (HTTP): this output's values after the JSON.
    pub binary: Option<bool>,
    /// `parameters.classification` (Triton): the top `k` classes instead of the scores.
    pub classification: Option<u64>,
}

/// How the answer's one output is written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Values after the JSON header (HTTP binary extension).
    pub binary: bool,
    /// Top `k` as Triton's classification strings.
    pub classification: Option<usize>,
}

/// The answer's output tensor.
#[derive(Debug)]
pub(crate) struct Output {
    pub name: String,
    pub datatype: &'static str,
    pub shape: Vec<i64>,
    pub values: Values,
}

/// An output's values.
#[derive(Debug)]
pub(crate) enum Values {
    /// The model's scores.
    Floats(Vec<f32>),
    /// Classification strings, `"score:index"`.
    Classes(Vec<String>),
}

fn bad(m: String) -> RouterError {
    RouterError::BadInput(m)
}

/// Checks the request's inputs against the model and returns its values as the model's
/// `f32` rows.
pub(crate) fn decode_inputs(
    model: &str,
    sig: &Signature,
    inputs: &[Input<'_>],
) -> Result<(Vec<f32>, usize), RouterError> {
    let want = &sig.input.name;
    let [t] = inputs else {
        return Err(bad(format!(
            "model `{model}` takes exactly one input tensor, `{want}`; got {}",
            inputs.len()
        )));
    };
    if t.name != want {
        return Err(bad(format!(
            "unknown input `{}`; model `{model}` takes `{want}`",
            t.name
        )));
    }
    if !Datatype::NAMES.contains(&t.datatype) {
        return Err(bad(format!(
            "input `{want}` has datatype `{}`; model `{model}` takes FP32 (numeric datatypes are converted)",
            t.datatype
        )));
    }
    // Every size here comes from the client: checked, and compared with what the body
    // holds, before anything is allocated (a 100-byte request once asked for 256 TB).
    let shape = &t.shape;
    let expected = sig.input.shape_i64();
    let fits = shape.len() == expected.len()
        && shape[0] >= 1
        && shape[1..].iter().zip(&expected[1..]).all(|(a, b)| a == b);
    if !fits {
        return Err(bad(format!(
            "input `{want}` has shape {shape:?}; model `{model}` takes {expected:?} (-1: any batch size ≥ 1)"
        )));
    }
    let row_len = sig.input.row_len();
    let needed = usize::try_from(shape[0])
        .ok()
        .and_then(|rows| rows.checked_mul(row_len));
    let datatype = Datatype::parse(t.datatype);
    let mismatch = |given: String| {
        bad(format!(
            "input `{want}` has {given}; shape {shape:?} needs {} values (model `{model}` takes {expected:?})",
            needed.map_or_else(|| "more than can be addressed".to_string(), |n| n.to_string())
        ))
    };
    let data = match &t.data {
        Data::Json(v) => {
            let given = count_numbers(v);
            if needed != Some(given) {
                return Err(mismatch(format!("{given} values")));
            }
            let mut data = Vec::with_capacity(given);
            flatten_numbers(v, &mut data, datatype)
                .map_err(|m| bad(format!("input `{want}` data: {m}")))?;
            data
        }
        Data::Raw(bytes) => {
            let width = datatype.width();
            if needed.and_then(|n| n.checked_mul(width)) != Some(bytes.len()) {
                return Err(mismatch(format!(
                    "{} bytes of {} ({width} per value)",
                    bytes.len(),
                    t.datatype
                )));
            }
            let mut data = Vec::with_capacity(bytes.len() / width);
            for (i, chunk) in bytes.chunks_exact(width).enumerate() {
                data.push(
                    datatype
                        .read_le(chunk)
                        .map_err(|m| bad(format!("input `{want}` value {i}: {m}")))?,
                );
            }
            data
        }
        Data::Numbers(values) => {
            if needed != Some(values.len()) {
                return Err(mismatch(format!("{} values", values.len())));
            }
            values
                .iter()
                .enumerate()
                .map(|(i, x)| {
                    datatype
                        .read_f64(*x)
                        .map_err(|m| bad(format!("input `{want}` value {i}: {m}")))
                })
                .collect::<Result<_, _>>()?
        }
    };
    let rows = data.len() / row_len.max(1);
    Ok((data, rows))
}

/// Checks the outputs asked for (none: all, as Triton does) and says how to write them.
pub(crate) fn plan_outputs(
    model: &str,
    sig: &Signature,
    requested: &[Requested<'_>],
    binary_by_default: bool,
) -> Result<Plan, RouterError> {
    let have = &sig.output.name;
    let mut plan = Plan {
        binary: binary_by_default,
        classification: None,
    };
    for r in requested {
        if r.name != have {
            return Err(bad(format!(
                "unknown output `{}`; model `{model}` gives one output, `{have}`",
                r.name
            )));
        }
        if let Some(b) = r.binary {
            plan.binary = b;
        }
        if let Some(k) = r.classification {
            let row = sig.output.row_len();
            if k == 0 {
                return Err(bad(format!(
                    "output `{have}` asks for classification 0; ask for 1 to {row} classes"
                )));
            }
            plan.classification = Some(usize::try_from(k).unwrap_or(usize::MAX).min(row));
        }
    }
    Ok(plan)
}

/// The output tensor for `rows` rows of the model's `values`, as `plan` says.
pub(crate) fn output(sig: &Signature, plan: Plan, values: Vec<f32>, rows: usize) -> Output {
    let spec = &sig.output;
    let mut shape = spec.shape_i64();
    shape[0] = rows as i64;
    let Some(k) = plan.classification else {
        return Output {
            name: spec.name.clone(),
            datatype: spec.datatype,
            shape,
            values: Values::Floats(values),
        };
    };
    let per = spec.row_len().max(1);
    let mut classes = Vec::with_capacity(rows * k);
    for row in values.chunks(per) {
        let mut order: Vec<usize> = (0..row.len()).collect();
        // Highest score first; ties keep the lower index first (a stable sort).
        order.sort_by(|a, b| row[*b].total_cmp(&row[*a]));
        classes.extend(order.iter().take(k).map(|i| format!("{:.6}:{i}", row[*i])));
    }
    Output {
        name: spec.name.clone(),
        datatype: "BYTES",
        shape: vec![rows as i64, k as i64],
        values: Values::Classes(classes),
    }
}

impl Output {
    /// The values as the binary extension and gRPC's `raw_output_contents` carry them:
    /// little-endian FP32, or BYTES as a 4-byte length before each string.
    pub(crate) fn raw(&self) -> Bytes {
        match &self.values {
            Values::Floats(v) => {
                let mut out = BytesMut::with_capacity(v.len() * 4);
                for x in v {
                    out.put_f32_le(*x);
                }
                out.freeze()
            }
            Values::Classes(c) => {
                let mut out = BytesMut::with_capacity(c.iter().map(|s| s.len() + 4).sum());
                for s in c {
                    out.put_u32_le(s.len() as u32);
                    out.put_slice(s.as_bytes());
                }
                out.freeze()
            }
        }
    }
}

/// The `Inference-Header-Content-Length` header: the JSON part's length in a body that
/// carries binary tensors after it.
pub static INFERENCE_HEADER_CONTENT_LENGTH: http::header::HeaderName =
    http::header::HeaderName::from_static("inference-header-content-length");

/// Splits an HTTP body into its JSON header and binary part (`header_length`, from
/// `Inference-Header-Content-Length`), and reads the request from them.
pub(crate) fn http_request(
    model: &str,
    sig: &Signature,
    body: &[u8],
    header_length: Option<usize>,
) -> Result<(Value, Vec<f32>, usize, Plan), RouterError> {
    let (json_part, mut binary) = match header_length {
        Some(n) if n > body.len() => {
            return Err(bad(format!(
                "Inference-Header-Content-Length is {n}, but the body has {} bytes",
                body.len()
            )))
        }
        Some(n) => body.split_at(n),
        None => (body, &[][..]),
    };
    let request: Value = serde_json::from_slice(json_part).map_err(|e| {
        let hint = if header_length.is_none() {
            " (binary tensors need the Inference-Header-Content-Length header)"
        } else {
            ""
        };
        bad(format!("the request body is not valid JSON{hint}: {e}"))
    })?;
    let list = request
        .get("inputs")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("the request needs `inputs`, a list of tensors".into()))?;
    let mut inputs = Vec::with_capacity(list.len().min(4));
    for (i, t) in list.iter().enumerate() {
        let name = t.get("name").and_then(Value::as_str).unwrap_or("");
        let shape: Vec<i64> = t
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| {
                bad(format!(
                    "input `{name}` needs a `shape`, a list of integers"
                ))
            })?
            .iter()
            .map(|d| {
                d.as_i64().ok_or_else(|| {
                    bad(format!(
                        "input `{name}` has a shape entry {d}; a shape is a list of integers"
                    ))
                })
            })
            .collect::<Result<_, _>>()?;
        let size = t.pointer("/parameters/binary_data_size");
        let data = match (size, t.get("data")) {
            (Some(_), Some(_)) => {
                return Err(bad(format!(
                    "input `{name}` has both `data` and `binary_data_size`"
                )))
            }
            (Some(size), None) => {
                let size = size
                    .as_u64()
                    .and_then(|s| usize::try_from(s).ok())
                    .ok_or_else(|| {
                        bad(format!(
                            "input `{name}` has binary_data_size {size}; it must be a byte count"
                        ))
                    })?;
                if size > binary.len() {
                    return Err(bad(format!(
                        "input `{name}` (inputs[{i}]) has binary_data_size {size}, but only {} binary bytes are left in the body",
                        binary.len()
                    )));
                }
                let (mine, rest) = binary.split_at(size);
                binary = rest;
                Data::Raw(mine)
            }
            (None, Some(v)) => Data::Json(v),
            (None, None) => Data::Json(&Value::Null),
        };
        inputs.push(Input {
            name,
            datatype: t.get("datatype").and_then(Value::as_str).unwrap_or(""),
            shape,
            data,
        });
    }
    if !binary.is_empty() {
        return Err(bad(format!(
            "{} binary bytes after the JSON header belong to no input (binary_data_size)",
            binary.len()
        )));
    }
    let (values, rows) = decode_inputs(model, sig, &inputs)?;
    let flag = |v: Option<&Value>, what: &str| -> Result<Option<bool>, RouterError> {
        match v {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(bad(format!("{what} must be true or false, not {other}"))),
        }
    };
    let by_default = flag(
        request.pointer("/parameters/binary_data_output"),
        "parameters.binary_data_output",
    )?
    .unwrap_or(false);
    let mut requested = Vec::new();
    if let Some(outputs) = request.get("outputs") {
        let outputs = outputs
            .as_array()
            .ok_or_else(|| bad("`outputs` must be a list of {\"name\": ...}".into()))?;
        for o in outputs {
            let name = o
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("an entry of `outputs` has no name: {o}")))?;
            let classification = match o.pointer("/parameters/classification") {
                None => None,
                Some(v) => Some(v.as_u64().ok_or_else(|| {
                    bad(format!(
                        "output `{name}`: classification must be a count of classes, not {v}"
                    ))
                })?),
            };
            requested.push(Requested {
                name,
                binary: flag(o.pointer("/parameters/binary_data"), "binary_data")?,
                classification,
            });
        }
    }
    let plan = plan_outputs(model, sig, &requested, by_default)?;
    Ok((request, values, rows, plan))
}

#[derive(serde::Serialize)]
struct Answer<'a> {
    model_name: &'a str,
    model_version: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a Value>,
    outputs: [Tensor<'a>; 1],
}

#[derive(serde::Serialize)]
struct Tensor<'a> {
    name: &'a str,
    datatype: &'a str,
    shape: &'a [i64],
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<TensorData<'a>>,
}

#[derive(serde::Serialize)]
#[serde(untagged)]
enum TensorData<'a> {
    // Serialised straight from the `f32`s, so numbers print in f32's shortest form
    // (`0.9999951`, not the f64 widening `0.9999951124191284`).
    Floats(&'a [f32]),
    Classes(&'a [String]),
}

/// The HTTP answer: the JSON, and when binary, the values after it; with the JSON's
/// length for `Inference-Header-Content-Length` when there are binary values.
pub(crate) fn http_answer(
    model: &str,
    version: &str,
    id: Option<&Value>,
    out: &Output,
    plan: Plan,
) -> (Bytes, Option<usize>) {
    let raw = plan.binary.then(|| out.raw());
    let answer = Answer {
        model_name: model,
        model_version: version,
        id,
        outputs: [Tensor {
            name: &out.name,
            datatype: out.datatype,
            shape: &out.shape,
            parameters: raw.as_ref().map(|r| json!({ "binary_data_size": r.len() })),
            data: match (&raw, &out.values) {
                (Some(_), _) => None,
                (None, Values::Floats(v)) => Some(TensorData::Floats(v)),
                (None, Values::Classes(c)) => Some(TensorData::Classes(c)),
            },
        }],
    };
    let head = serde_json::to_vec(&answer).unwrap_or_default();
    match raw {
        None => (Bytes::from(head), None),
        Some(raw) => {
            let len = head.len();
            let mut body = BytesMut::with_capacity(len + raw.len());
            body.put_slice(&head);
            body.put_slice(&raw);
            (body.freeze(), Some(len))
        }
    }
}

/// V2 model metadata.
pub(crate) fn metadata(model: &str, version: &str, sig: &Signature) -> Value {
    let t =
        |s: &TensorSpec| json!({ "name": s.name, "datatype": s.datatype, "shape": s.shape_i64() });
    json!({
        "name": model,
        "versions": [version],
        "platform": PLATFORM,
        "inputs": [t(&sig.input)],
        "outputs": [t(&sig.output)],
    })
}

/// The V2 / Triton extensions `GET /v2` lists: those local variants answer themselves.
/// (Remote variants answer whatever their server implements: every `/v2/models/{m}/…`
/// path is forwarded.)
pub const EXTENSIONS: &[&str] = &[
    "binary_tensor_data",
    "classification",
    "model_configuration",
    "model_repository",
    "parameters",
    "statistics",
];

/// What local models say they run on, in metadata and configuration.
pub(crate) const PLATFORM: &str = "onnx_tract";

/// Triton's model configuration (`GET /v2/models/{m}/config`), in its JSON form: the
/// batch dimension is `max_batch_size`, not part of `dims`.
pub(crate) fn model_config(model: &str, version: &str, batcher: &Batcher) -> Value {
    let sig = batcher.model().signature();
    let o = batcher.options();
    let t = |s: &TensorSpec| {
        json!({
            "name": s.name,
            "data_type": format!("TYPE_{}", s.datatype),
            "dims": s.shape_i64()[1..],
        })
    };
    let kind = if batcher.model().is_gpu() {
        "KIND_GPU"
    } else {
        "KIND_CPU"
    };
    json!({
        "name": model,
        "platform": PLATFORM,
        "backend": batcher.model().runtime_name(),
        "version_policy": { "specific": { "versions": [version] } },
        "max_batch_size": o.max_batch_size,
        "input": [t(&sig.input)],
        "output": [t(&sig.output)],
        "dynamic_batching": {
            "max_queue_delay_microseconds": u64::try_from(o.batch_timeout.as_micros()).unwrap_or(u64::MAX),
        },
        "instance_group": [{ "name": model, "kind": kind, "count": o.num_batch_threads }],
    })
}

/// Triton's statistics extension (`GET /v2/models/{m}/stats`) from the runtime's own
/// counters. Triton's split of compute into input, infer and output is not kept: the
/// model's run is `compute_infer`, the other two are zero.
pub(crate) fn model_stats(model: &str, version: &str, batcher: &Batcher) -> Value {
    let s = batcher.stats();
    let c = |x: switchyard_inference::Counted| json!({ "count": x.count, "ns": x.ns });
    let zero = json!({ "count": 0, "ns": 0 });
    json!({
        "model_stats": [{
            "name": model,
            "version": version,
            "last_inference": s.last_inference_ms,
            "inference_count": s.inference_count,
            "execution_count": s.execution_count,
            "inference_stats": {
                "success": c(s.success),
                "fail": c(s.fail),
                "queue": c(s.queue),
                "compute_input": zero,
                "compute_infer": c(s.compute),
                "compute_output": zero,
                "cache_hit": zero,
                "cache_miss": zero,
            },
            "batch_stats": [],
        }]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sig() -> Signature {
        switchyard_inference::OnnxModel::from_bytes(
            "mlp",
            switchyard_inference::builtin::DIGITS_MLP,
        )
        .unwrap()
        .signature()
        .clone()
    }

    fn binary_body(json: &Value, raw: &[u8]) -> (Vec<u8>, usize) {
        let mut body = serde_json::to_vec(json).unwrap();
        let n = body.len();
        body.extend_from_slice(raw);
        (body, n)
    }

    /// The same pixels as JSON and as binary in every numeric datatype decode to the
    /// same `f32`s.
    #[test]
    fn binary_inputs_of_every_datatype_decode_like_json() {
        let sig = sig();
        let pixels: Vec<u8> = (0..128).map(|i| (i % 17) as u8).collect();
        let json_req = json!({ "inputs": [{ "name": "pixels", "datatype": "FP32", "shape": [2, 64], "data": pixels }] });
        let body = serde_json::to_vec(&json_req).unwrap();
        let (_, want, rows, _) = http_request("m", &sig, &body, None).unwrap();
        assert_eq!(rows, 2);
        type Enc = fn(u8) -> Vec<u8>;
        let encodings: [(&str, Enc); 10] = [
            ("FP32", |p| f32::from(p).to_le_bytes().to_vec()),
            ("FP64", |p| f64::from(p).to_le_bytes().to_vec()),
            // Small integers are exact in half precision: sign 0, exponent, mantissa.
            ("FP16", |p| f16_bits(f32::from(p)).to_le_bytes().to_vec()),
            ("INT8", |p| (p as i8).to_le_bytes().to_vec()),
            ("INT16", |p| i16::from(p).to_le_bytes().to_vec()),
            ("INT32", |p| i32::from(p).to_le_bytes().to_vec()),
            ("INT64", |p| i64::from(p).to_le_bytes().to_vec()),
            ("UINT8", |p| vec![p]),
            ("UINT16", |p| u16::from(p).to_le_bytes().to_vec()),
            ("UINT64", |p| u64::from(p).to_le_bytes().to_vec()),
        ];
        for (dt, enc) in encodings {
            let raw: Vec<u8> = pixels.iter().flat_map(|p| enc(*p)).collect();
            let head = json!({ "inputs": [{ "name": "pixels", "datatype": dt, "shape": [2, 64], "parameters": { "binary_data_size": raw.len() } }] });
            let (body, n) = binary_body(&head, &raw);
            let (_, got, rows, _) = http_request("m", &sig, &body, Some(n)).unwrap();
            assert_eq!((got, rows), (want.clone(), 2), "{dt}");
        }
    }

    /// Half-precision bits of a small non-negative integer (test helper).
    fn f16_bits(x: f32) -> u16 {
        if x == 0.0 {
            return 0;
        }
        let e = x.log2().floor() as i32;
        let mantissa = ((x / 2f32.powi(e) - 1.0) * 1024.0).round() as u16;
        (((e + 15) as u16) << 10) | mantissa
    }

    #[test]
    fn binary_sizes_are_checked_against_the_shape_and_the_body() {
        let sig = sig();
        let raw = vec![0u8; 64 * 4];
        let cases = [
            // Fewer bytes than the shape needs.
            (
                json!({ "inputs": [{ "name": "pixels", "datatype": "FP32", "shape": [2, 64], "parameters": { "binary_data_size": 256 } }] }),
                256,
                "bytes",
            ),
            // A size past the body's end.
            (
                json!({ "inputs": [{ "name": "pixels", "datatype": "FP32", "shape": [1, 64], "parameters": { "binary_data_size": 1u64 << 40 } }] }),
                256,
                "left",
            ),
            // Bytes no input claims.
            (
                json!({ "inputs": [{ "name": "pixels", "datatype": "FP32", "shape": [1, 64], "parameters": { "binary_data_size": 128 } }] }),
                256,
                "belong to no input",
            ),
            // A header length past the body.
            (
                json!({ "inputs": [] }),
                1 << 20,
                "Inference-Header-Content-Length",
            ),
        ];
        for (head, len, says) in cases {
            let (body, n) = binary_body(&head, &raw[..len.min(raw.len())]);
            let header = if len == 1 << 20 { len } else { n };
            let err = http_request("m", &sig, &body, Some(header)).unwrap_err();
            assert_eq!(err.status(), http::StatusCode::BAD_REQUEST);
            assert!(err.to_string().contains(says), "{err}");
        }
        // NaN in FP32 bytes is refused as JSON's 1e39 is.
        let head = json!({ "inputs": [{ "name": "pixels", "datatype": "FP32", "shape": [1, 64], "parameters": { "binary_data_size": 256 } }] });
        let mut nan = vec![0u8; 256];
        nan[..4].copy_from_slice(&f32::NAN.to_le_bytes());
        let (body, n) = binary_body(&head, &nan);
        assert!(http_request("m", &sig, &body, Some(n)).is_err());
    }

    #[test]
    fn outputs_asked_for_are_checked_and_planned() {
        let sig = sig();
        let input = json!([{ "name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": vec![0; 64] }]);
        let plan = |extra: Value| {
            let mut req = json!({ "inputs": input });
            for (k, v) in extra.as_object().unwrap() {
                req[k] = v.clone();
            }
            http_request("m", &sig, &serde_json::to_vec(&req).unwrap(), None).map(|r| r.3)
        };
        assert_eq!(plan(json!({})).unwrap(), Plan::default());
        assert!(
            plan(json!({ "parameters": { "binary_data_output": true } }))
                .unwrap()
                .binary
        );
        let p = plan(json!({ "outputs": [{ "name": "probabilities", "parameters": { "binary_data": true, "classification": 3 } }] })).unwrap();
        assert_eq!((p.binary, p.classification), (true, Some(3)));
        let err = plan(json!({ "outputs": [{ "name": "logits" }] })).unwrap_err();
        assert!(err.to_string().contains("unknown output `logits`"), "{err}");
        assert!(plan(json!({ "outputs": [{ "name": "probabilities", "parameters": { "classification": 0 } }] })).is_err());
    }

    #[test]
    fn classification_gives_the_top_k_and_binary_answers_carry_their_length() {
        let sig = sig();
        let mut scores = vec![0.0f32; 20];
        scores[3] = 0.9;
        scores[7] = 0.1;
        scores[10 + 5] = 0.6;
        scores[10 + 1] = 0.4;
        let plan = Plan {
            binary: true,
            classification: Some(2),
        };
        let out = output(&sig, plan, scores, 2);
        assert_eq!(out.shape, vec![2, 2]);
        match &out.values {
            Values::Classes(c) => {
                assert_eq!(c, &["0.900000:3", "0.100000:7", "0.600000:5", "0.400000:1"])
            }
            other => panic!("{other:?}"),
        }
        let (body, len) = http_answer("m", "1", None, &out, plan);
        let len = len.unwrap();
        let head: Value = serde_json::from_slice(&body[..len]).unwrap();
        let size = head["outputs"][0]["parameters"]["binary_data_size"]
            .as_u64()
            .unwrap() as usize;
        assert_eq!(body.len() - len, size);
        assert_eq!(&body[len..len + 4], &10u32.to_le_bytes());
        assert_eq!(&body[len + 4..len + 14], b"0.900000:3");
    }
}
