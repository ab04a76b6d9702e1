//! gRPC messages as the JSON they stand for, so gRPC answers are compared as HTTP ones
//! are and `capture:` keeps gRPC predictions in the same JSON lines.
//!
//! - [`answer_json`]: a framed `ModelInferResponse` (or TF Serving's `PredictResponse`)
//!   as `{"outputs": [{"name", "datatype", "shape", "data"}, ...]}` (KServe V2's JSON).
//! - [`request_json`]: a `ModelInferRequest` (or `PredictRequest`) as `{"inputs": [...]}`
//!   in the same form.
//!
//! Values are read by datatype, from the raw little-endian bytes when the message carries
//! them (`raw_*_contents`, `tensor_content`), else from the typed fields: integers as JSON
//! integers, `BOOL` as booleans, `BYTES` as strings (lossy UTF-8), `FP16`/`BF16` widened.
//! A value that is not a finite number becomes `null`, as JSON has no NaN.

use serde_json::{json, Value};
use switchyard_proto::inference::{InferTensorContents, ModelInferRequest, ModelInferResponse};
use switchyard_proto::prost::Message;
use switchyard_proto::tensorflow::serving::{PredictRequest, PredictResponse};
use switchyard_proto::tensorflow::TensorProto;

/// A gRPC answer (one framed `ModelInferResponse`, or TF Serving's `PredictResponse`
/// when `in_spec`) as the V2 JSON `{"outputs": [...]}` it stands for; other bytes are
/// returned as they are.
pub fn answer_json(body: &[u8], in_spec: bool) -> Vec<u8> {
    let Some(message) = switchyard_proto::unframe(body) else {
        return body.to_vec();
    };
    let outputs = if in_spec {
        PredictResponse::decode(message).map(|r| tf_tensors(r.outputs))
    } else {
        ModelInferResponse::decode(message).map(|r| {
            let tensors = r.outputs.iter().map(|t| {
                (
                    &t.name[..],
                    &t.datatype[..],
                    &t.shape[..],
                    t.contents.as_ref(),
                )
            });
            kserve_tensors(tensors, &r.raw_output_contents)
        })
    };
    outputs.map_or_else(
        |_| body.to_vec(),
        |o| json!({ "outputs": o }).to_string().into_bytes(),
    )
}

/// A gRPC request message (unframed: `ModelInferRequest`, or TF Serving's
/// `PredictRequest` when `in_spec`) as `{"inputs": [...]}`; other bytes as they are.
pub fn request_json(message: &[u8], in_spec: bool) -> Vec<u8> {
    let inputs = if in_spec {
        PredictRequest::decode(message).map(|r| tf_tensors(r.inputs))
    } else {
        ModelInferRequest::decode(message).map(|r| {
            let tensors = r.inputs.iter().map(|t| {
                (
                    &t.name[..],
                    &t.datatype[..],
                    &t.shape[..],
                    t.contents.as_ref(),
                )
            });
            kserve_tensors(tensors, &r.raw_input_contents)
        })
    };
    inputs.map_or_else(
        |_| message.to_vec(),
        |i| json!({ "inputs": i }).to_string().into_bytes(),
    )
}

/// A KServe tensor: name, datatype, shape and typed contents.
type KserveTensor<'a> = (&'a str, &'a str, &'a [i64], Option<&'a InferTensorContents>);

/// KServe's tensors in V2's form, the i-th one's values from the message's i-th raw
/// contents when it has them.
fn kserve_tensors<'a>(
    tensors: impl Iterator<Item = KserveTensor<'a>>,
    raw: &[bytes::Bytes],
) -> Vec<Value> {
    tensors
        .enumerate()
        .map(|(i, (name, datatype, shape, contents))| {
            v2_tensor(name, datatype, shape, raw.get(i).map(|b| &b[..]), contents)
        })
        .collect()
}

fn v2_tensor(
    name: &str,
    datatype: &str,
    shape: &[i64],
    raw: Option<&[u8]>,
    contents: Option<&InferTensorContents>,
) -> Value {
    let data = match (raw, contents) {
        (Some(raw), _) => raw_values(datatype, raw),
        (None, Some(c)) => typed_values(datatype, c),
        (None, None) => Vec::new(),
    };
    json!({ "name": name, "datatype": datatype, "shape": shape, "data": data })
}

/// TF Serving's named tensors, sorted by name (a map has no order), in V2's form.
fn tf_tensors(named: std::collections::HashMap<String, TensorProto>) -> Vec<Value> {
    let mut named: Vec<_> = named.into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
        .into_iter()
        .map(|(name, t)| {
            let shape: Vec<i64> = t
                .tensor_shape
                .as_ref()
                .map(|s| s.dim.iter().map(|d| d.size).collect())
                .unwrap_or_default();
            let datatype = switchyard_proto::v2_datatype_of_tf(t.dtype).unwrap_or("FP32");
            let data = if t.tensor_content.is_empty() {
                tf_typed_values(datatype, &t)
            } else {
                raw_values(datatype, &t.tensor_content)
            };
            json!({ "name": name, "datatype": datatype, "shape": shape, "data": data })
        })
        .collect()
}

fn number(x: f64) -> Value {
    serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
}

fn text(b: &[u8]) -> Value {
    Value::String(String::from_utf8_lossy(b).into_owned())
}

/// Little-endian values of a V2 `datatype`; an unknown one is read as `FP32`.
fn raw_values(datatype: &str, raw: &[u8]) -> Vec<Value> {
    fn each<const N: usize>(raw: &[u8], f: impl Fn([u8; N]) -> Value) -> Vec<Value> {
        raw.chunks_exact(N)
            .map(|c| f(c.try_into().unwrap_or([0; N])))
            .collect()
    }
    match datatype {
        "BOOL" => each(raw, |[b]| json!(b != 0)),
        "UINT8" => each(raw, |[b]| json!(b)),
        "INT8" => each(raw, |b| json!(i8::from_le_bytes(b))),
        "UINT16" => each(raw, |b| json!(u16::from_le_bytes(b))),
        "INT16" => each(raw, |b| json!(i16::from_le_bytes(b))),
        "UINT32" => each(raw, |b| json!(u32::from_le_bytes(b))),
        "INT32" => each(raw, |b| json!(i32::from_le_bytes(b))),
        "UINT64" => each(raw, |b| json!(u64::from_le_bytes(b))),
        "INT64" => each(raw, |b| json!(i64::from_le_bytes(b))),
        "FP16" => each(raw, |b| {
            number(f64::from(switchyard_proto::half_to_f32(
                u16::from_le_bytes(b),
            )))
        }),
        "BF16" => each(raw, |b| {
            number(f64::from(f32::from_bits(
                u32::from(u16::from_le_bytes(b)) << 16,
            )))
        }),
        "FP64" => each(raw, |b| number(f64::from_le_bytes(b))),
        // Each element: a 4-byte little-endian length, then its bytes.
        "BYTES" => {
            let mut out = Vec::new();
            let mut rest = raw;
            while let Some((len, tail)) = rest.split_first_chunk::<4>() {
                let n = u32::from_le_bytes(*len) as usize;
                let Some(s) = tail.get(..n) else { break };
                out.push(text(s));
                rest = &tail[n..];
            }
            out
        }
        _ => each(raw, |b| number(f64::from(f32::from_le_bytes(b)))),
    }
}

/// KServe's typed contents, from the field its `datatype` uses.
fn typed_values(datatype: &str, c: &InferTensorContents) -> Vec<Value> {
    match datatype {
        "BOOL" => c.bool_contents.iter().map(|x| json!(x)).collect(),
        "INT8" | "INT16" | "INT32" => c.int_contents.iter().map(|x| json!(x)).collect(),
        "INT64" => c.int64_contents.iter().map(|x| json!(x)).collect(),
        "UINT8" | "UINT16" | "UINT32" => c.uint_contents.iter().map(|x| json!(x)).collect(),
        "UINT64" => c.uint64_contents.iter().map(|x| json!(x)).collect(),
        "FP64" => c.fp64_contents.iter().map(|x| number(*x)).collect(),
        "BYTES" => c.bytes_contents.iter().map(|b| text(b)).collect(),
        _ => c
            .fp32_contents
            .iter()
            .map(|x| number(f64::from(*x)))
            .collect(),
    }
}

/// A `TensorProto`'s typed values, from the field its dtype uses.
fn tf_typed_values(datatype: &str, t: &TensorProto) -> Vec<Value> {
    match datatype {
        "FP64" => t.double_val.iter().map(|x| number(*x)).collect(),
        "INT8" | "INT16" | "INT32" | "UINT8" | "UINT16" => {
            t.int_val.iter().map(|x| json!(x)).collect()
        }
        "INT64" => t.int64_val.iter().map(|x| json!(x)).collect(),
        "UINT32" => t.uint32_val.iter().map(|x| json!(x)).collect(),
        "UINT64" => t.uint64_val.iter().map(|x| json!(x)).collect(),
        "BOOL" => t.bool_val.iter().map(|x| json!(x)).collect(),
        "BYTES" => t.string_val.iter().map(|b| text(b)).collect(),
        // Each half in the low 16 bits of an int.
        "FP16" => t
            .half_val
            .iter()
            .map(|h| number(f64::from(switchyard_proto::half_to_f32(*h as u16))))
            .collect(),
        _ => t.float_val.iter().map(|x| number(f64::from(*x))).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use switchyard_proto::inference::model_infer_request::InferInputTensor;
    use switchyard_proto::inference::model_infer_response::InferOutputTensor;

    fn le<const N: usize>(values: impl IntoIterator<Item = [u8; N]>) -> Bytes {
        values.into_iter().flatten().collect::<Vec<u8>>().into()
    }

    /// Every V2 datatype from raw bytes, and from typed contents, gives the numbers (or
    /// booleans, or strings) that were encoded: INT64 class ids are integers, not the
    /// floats their bytes would spell as FP32.
    #[test]
    fn v2_answers_of_every_datatype_read_as_their_values() {
        let outputs = [
            (
                "i64",
                "INT64",
                le([(-3i64).to_le_bytes(), 7i64.to_le_bytes()]),
            ),
            ("u8", "UINT8", le([[200u8], [1]])),
            ("i16", "INT16", le([(-2i16).to_le_bytes()])),
            ("b", "BOOL", le([[1u8], [0]])),
            (
                "h",
                "FP16",
                le([0x3c00u16.to_le_bytes(), 0xc000u16.to_le_bytes()]),
            ),
            ("bf", "BF16", le([0x3fc0u16.to_le_bytes()])),
            ("d", "FP64", le([0.25f64.to_le_bytes()])),
            (
                "f",
                "FP32",
                le([1.5f32.to_le_bytes(), f32::NAN.to_le_bytes()]),
            ),
            ("s", "BYTES", {
                let mut v = 2u32.to_le_bytes().to_vec();
                v.extend(b"hi");
                v.extend(0u32.to_le_bytes());
                Bytes::from(v)
            }),
        ];
        let answer = ModelInferResponse {
            outputs: outputs
                .iter()
                .map(|(name, datatype, _)| InferOutputTensor {
                    name: name.to_string(),
                    datatype: datatype.to_string(),
                    shape: vec![1],
                    ..Default::default()
                })
                .collect(),
            raw_output_contents: outputs.iter().map(|(_, _, raw)| raw.clone()).collect(),
            ..Default::default()
        };
        let v: Value = serde_json::from_slice(&answer_json(
            &switchyard_proto::frame(&answer.encode_to_vec()),
            false,
        ))
        .unwrap();
        let data = |i: usize| v["outputs"][i]["data"].clone();
        assert_eq!(data(0), json!([-3, 7]));
        assert_eq!(data(1), json!([200, 1]));
        assert_eq!(data(2), json!([-2]));
        assert_eq!(data(3), json!([true, false]));
        assert_eq!(data(4), json!([1.0, -2.0]));
        assert_eq!(data(5), json!([1.5]));
        assert_eq!(data(6), json!([0.25]));
        assert_eq!(data(7), json!([1.5, null]));
        assert_eq!(data(8), json!(["hi", ""]));
        assert_eq!(v["outputs"][0]["datatype"], "INT64");

        let typed = ModelInferRequest {
            inputs: vec![
                InferInputTensor {
                    name: "ids".into(),
                    datatype: "INT64".into(),
                    shape: vec![2],
                    contents: Some(InferTensorContents {
                        int64_contents: vec![5, -6],
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                InferInputTensor {
                    name: "x".into(),
                    datatype: "FP32".into(),
                    shape: vec![1, 2],
                    contents: Some(InferTensorContents {
                        fp32_contents: vec![0.5, 2.0],
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let v: Value =
            serde_json::from_slice(&request_json(&typed.encode_to_vec(), false)).unwrap();
        assert_eq!(
            v,
            json!({"inputs": [
                {"name": "ids", "datatype": "INT64", "shape": [2], "data": [5, -6]},
                {"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [0.5, 2.0]},
            ]})
        );
    }

    /// TF Serving's tensors, typed and as `tensor_content`, named in order.
    #[test]
    fn tf_serving_tensors_read_by_dtype() {
        use switchyard_proto::tensorflow::{tensor_shape_proto::Dim, DataType, TensorShapeProto};
        let shape = |n: i64| {
            Some(TensorShapeProto {
                dim: vec![Dim {
                    size: n,
                    ..Default::default()
                }],
                ..Default::default()
            })
        };
        let mut inputs = std::collections::HashMap::new();
        inputs.insert(
            "b_ids".to_string(),
            TensorProto {
                dtype: DataType::DtInt64 as i32,
                tensor_shape: shape(2),
                int64_val: vec![9, 10],
                ..Default::default()
            },
        );
        inputs.insert(
            "a_x".to_string(),
            TensorProto {
                dtype: DataType::DtFloat as i32,
                tensor_shape: shape(2),
                tensor_content: le([0.5f32.to_le_bytes(), 4.0f32.to_le_bytes()]),
                ..Default::default()
            },
        );
        let req = PredictRequest {
            inputs,
            ..Default::default()
        };
        let v: Value = serde_json::from_slice(&request_json(&req.encode_to_vec(), true)).unwrap();
        assert_eq!(
            v,
            json!({"inputs": [
                {"name": "a_x", "datatype": "FP32", "shape": [2], "data": [0.5, 4.0]},
                {"name": "b_ids", "datatype": "INT64", "shape": [2], "data": [9, 10]},
            ]})
        );
        // Not a message of that type: the bytes as they came.
        assert_eq!(request_json(b"\xff\xff", false), b"\xff\xff");
    }
}
