//! gRPC calls answered by a local variant: the same checks and the same batch queue as
//! HTTP ([`crate::v2`]), with gRPC's encodings: KServe's `raw_input_contents` or typed
//! contents in, `raw_output_contents` out (as Triton answers); TF Serving's
//! `TensorProto` (`tensor_content` or the typed lists) in, `float_val` out.

use std::collections::HashMap;

use bytes::Bytes;
use http::Response;
use prost::Message;
use switchyard_inference::Signature;

use super::pb::inference as kserve;
use super::pb::tensorflow as tf;
use super::{ok, Call, Method};
use crate::body::ProxyBody;
use crate::error::RouterError;
use crate::local::LocalBackend;
use crate::path::Verb;
use crate::v2::{Data, Input, Plan, Requested};
use switchyard_proto::half_to_f32;

fn bad(m: String) -> RouterError {
    RouterError::BadInput(m)
}

fn invalid(e: prost::DecodeError) -> RouterError {
    bad(format!("the request is not a valid protobuf message: {e}"))
}

impl LocalBackend {
    /// Answers a gRPC call for `model` (the client's name for it). The version and label
    /// were checked by the caller, as for HTTP.
    async fn grpc_call(
        &self,
        model: &str,
        call: &Call,
    ) -> Result<Response<ProxyBody>, RouterError> {
        let sig = self.batcher.model().signature();
        match call.method {
            Method::ModelReady => Ok(ok(&kserve::ModelReadyResponse {
                ready: self.health().is_ok(),
            })),
            Method::ModelMetadata => {
                let t = |s: &switchyard_inference::TensorSpec| {
                    kserve::model_metadata_response::TensorMetadata {
                        name: s.name.clone(),
                        datatype: s.datatype.into(),
                        shape: s.shape_i64(),
                    }
                };
                Ok(ok(&kserve::ModelMetadataResponse {
                    name: model.into(),
                    versions: vec![self.version.clone()],
                    platform: crate::v2::PLATFORM.into(),
                    inputs: vec![t(&sig.input)],
                    outputs: vec![t(&sig.output)],
                }))
            }
            Method::GetModelStatus => {
                use tf::serving::{model_version_status::State, ModelVersionStatus, StatusProto};
                Ok(ok(&tf::serving::GetModelStatusResponse {
                    model_version_status: vec![ModelVersionStatus {
                        version: self.version.parse().unwrap_or(1),
                        state: State::Available as i32,
                        status: Some(StatusProto::default()),
                    }],
                }))
            }
            Method::ModelInfer => self.timed(self.model_infer(model, call)).await,
            Method::Predict => self.timed(self.tf_predict(model, call)).await,
            Method::ModelConfig => Ok(ok(&kserve::ModelConfigResponse {
                config: Some(self.model_config(model)),
            })),
            Method::ModelStatistics => Ok(ok(&self.model_statistics(model))),
            Method::ServerLive | Method::ServerReady | Method::ServerMetadata => Err(
                RouterError::Unimplemented("a server method reached a model".into()),
            ),
        }
    }

    /// Triton's `ModelConfig` for this model: what `GET /v2/models/{m}/config` says
    /// ([`crate::v2::model_config`]), as Triton's message.
    fn model_config(&self, model: &str) -> kserve::ModelConfig {
        use kserve::model_version_policy::{Latest, PolicyChoice, Specific};
        let sig = self.batcher.model().signature();
        let o = self.batcher.options();
        let data_type = |s: &switchyard_inference::TensorSpec| {
            kserve::DataType::from_str_name(&format!("TYPE_{}", s.datatype))
                .unwrap_or(kserve::DataType::TypeInvalid) as i32
        };
        // Triton numbers its versions; one named otherwise is this model's only one.
        let policy = match self.version.parse::<i64>() {
            Ok(v) => PolicyChoice::Specific(Specific { versions: vec![v] }),
            Err(_) => PolicyChoice::Latest(Latest { num_versions: 1 }),
        };
        let kind = if self.batcher.model().is_gpu() {
            kserve::model_instance_group::Kind::Gpu
        } else {
            kserve::model_instance_group::Kind::Cpu
        };
        kserve::ModelConfig {
            name: model.into(),
            platform: crate::v2::PLATFORM.into(),
            backend: self.batcher.model().runtime_name().into(),
            version_policy: Some(kserve::ModelVersionPolicy {
                policy_choice: Some(policy),
            }),
            max_batch_size: i32::try_from(o.max_batch_size).unwrap_or(i32::MAX),
            input: vec![kserve::ModelInput {
                name: sig.input.name.clone(),
                data_type: data_type(&sig.input),
                dims: sig.input.shape_i64()[1..].to_vec(),
            }],
            output: vec![kserve::ModelOutput {
                name: sig.output.name.clone(),
                data_type: data_type(&sig.output),
                dims: sig.output.shape_i64()[1..].to_vec(),
            }],
            scheduling_choice: Some(kserve::model_config::SchedulingChoice::DynamicBatching(
                kserve::ModelDynamicBatching {
                    preferred_batch_size: Vec::new(),
                    max_queue_delay_microseconds: u64::try_from(o.batch_timeout.as_micros())
                        .unwrap_or(u64::MAX),
                },
            )),
            instance_group: vec![kserve::ModelInstanceGroup {
                name: model.into(),
                kind: kind as i32,
                count: i32::try_from(o.num_batch_threads).unwrap_or(i32::MAX),
            }],
        }
    }

    /// Triton's `ModelStatistics` from the runtime's counters: what `GET
    /// /v2/models/{m}/stats` says ([`crate::v2::model_stats`]), as Triton's message.
    fn model_statistics(&self, model: &str) -> kserve::ModelStatisticsResponse {
        let s = self.batcher.stats();
        let d = |c: switchyard_inference::Counted| {
            Some(kserve::StatisticDuration {
                count: c.count,
                ns: c.ns,
            })
        };
        let zero = Some(kserve::StatisticDuration::default());
        kserve::ModelStatisticsResponse {
            model_stats: vec![kserve::ModelStatistics {
                name: model.into(),
                version: self.version.clone(),
                last_inference: s.last_inference_ms,
                inference_count: s.inference_count,
                execution_count: s.execution_count,
                inference_stats: Some(kserve::InferStatistics {
                    success: d(s.success),
                    fail: d(s.fail),
                    queue: d(s.queue),
                    compute_input: zero,
                    compute_infer: d(s.compute),
                    compute_output: zero,
                    cache_hit: zero,
                    cache_miss: zero,
                }),
                batch_stats: Vec::new(),
            }],
        }
    }

    /// Counts a failed prediction in the statistics, as HTTP's are.
    async fn timed(
        &self,
        work: impl std::future::Future<Output = Result<Response<ProxyBody>, RouterError>>,
    ) -> Result<Response<ProxyBody>, RouterError> {
        let arrived = std::time::Instant::now();
        let answer = work.await;
        if answer.is_err() {
            self.batcher.count_failure(arrived.elapsed());
        }
        answer
    }

    async fn model_infer(
        &self,
        model: &str,
        call: &Call,
    ) -> Result<Response<ProxyBody>, RouterError> {
        let sig = self.batcher.model().signature().clone();
        let message = call.message.clone();
        let name = model.to_string();
        // Decoded (and checked) off the async workers when large.
        let (request, values, rows, plan) =
            crate::offload::cpu(message.len(), move || read_infer(&name, &sig, message)).await??;
        let output = self.infer(model, values, rows).await?.values;
        let sig = self.batcher.model().signature();
        let out = crate::v2::output(sig, plan, output, rows);
        let raw = out.raw();
        Ok(ok(&kserve::ModelInferResponse {
            model_name: model.into(),
            model_version: self.version.clone(),
            id: request.id,
            parameters: HashMap::new(),
            outputs: vec![kserve::model_infer_response::InferOutputTensor {
                name: out.name,
                datatype: out.datatype.into(),
                shape: out.shape,
                parameters: HashMap::new(),
                contents: None,
            }],
            raw_output_contents: vec![raw],
        }))
    }

    async fn tf_predict(
        &self,
        model: &str,
        call: &Call,
    ) -> Result<Response<ProxyBody>, RouterError> {
        let sig = self.batcher.model().signature().clone();
        let message = call.message.clone();
        let name = model.to_string();
        let (values, rows) =
            crate::offload::cpu(message.len(), move || read_predict(&name, &sig, message))
                .await??;
        let output = self.infer(model, values, rows).await?.values;
        let sig = self.batcher.model().signature();
        let mut shape = sig.output.shape_i64();
        shape[0] = rows as i64;
        let tensor = tf::TensorProto {
            dtype: tf::DataType::DtFloat as i32,
            tensor_shape: Some(tf::TensorShapeProto {
                dim: shape
                    .iter()
                    .map(|d| tf::tensor_shape_proto::Dim {
                        size: *d,
                        name: String::new(),
                    })
                    .collect(),
                unknown_rank: false,
            }),
            float_val: output,
            ..Default::default()
        };
        use tf::serving::{model_spec::VersionChoice, Int64Value, ModelSpec};
        Ok(ok(&tf::serving::PredictResponse {
            model_spec: Some(ModelSpec {
                name: model.into(),
                signature_name: "serving_default".into(),
                version_choice: self
                    .version
                    .parse()
                    .ok()
                    .map(|value| VersionChoice::Version(Int64Value { value })),
            }),
            outputs: HashMap::from([(sig.output.name.clone(), tensor)]),
        }))
    }

    /// Answers a gRPC call ([`LocalBackend::grpc_call`]) with the experiment knobs HTTP
    /// answers have: `failure_rate` fails predictions, `delay` holds every answer.
    pub(crate) async fn grpc(
        &self,
        model: &str,
        verb: Verb,
        call: &Call,
    ) -> Result<Response<ProxyBody>, RouterError> {
        if verb.is_prediction()
            && self.failure_rate > 0.0
            && crate::local::fail_now(self.failure_rate)
        {
            self.batcher.count_failure(std::time::Duration::ZERO);
            return Err(RouterError::Inference(
                "injected failure (local.failure_rate)".into(),
            ));
        }
        let answer = self.grpc_call(model, call).await?;
        if let Some(d) = self.delay {
            tokio::time::sleep(d).await;
        }
        Ok(answer)
    }
}

/// A `ModelInferRequest` read and checked against the model: its values as rows, and
/// how to answer (raw contents, perhaps classification).
pub(crate) fn read_infer(
    name: &str,
    sig: &Signature,
    message: Bytes,
) -> Result<(kserve::ModelInferRequest, Vec<f32>, usize, Plan), RouterError> {
    let request = kserve::ModelInferRequest::decode(message).map_err(invalid)?;
    let raw = &request.raw_input_contents;
    if !raw.is_empty() && raw.len() != request.inputs.len() {
        return Err(bad(format!(
            "{} raw_input_contents for {} inputs: give one per input, or none",
            raw.len(),
            request.inputs.len()
        )));
    }
    let mut inputs = Vec::with_capacity(request.inputs.len());
    for (i, t) in request.inputs.iter().enumerate() {
        let data = match raw.get(i) {
            Some(bytes) => Data::Raw(bytes),
            None => Data::Numbers(typed_contents(t)?),
        };
        inputs.push(Input {
            name: &t.name,
            datatype: &t.datatype,
            shape: t.shape.clone(),
            data,
        });
    }
    let (values, rows) = crate::v2::decode_inputs(name, sig, &inputs)?;
    let requested: Vec<Requested<'_>> = request
                .outputs
                .iter()
                .map(|o| {
                    let classification = match o.parameters.get("classification").and_then(|p| p.parameter_choice.as_ref()) {
                        None => None,
                        Some(kserve::infer_parameter::ParameterChoice::Int64Param(k)) => Some(u64::try_from(*k).unwrap_or(0)),
                        Some(kserve::infer_parameter::ParameterChoice::Uint64Param(k)) => Some(*k),
                        Some(other) => {
                            return Err(bad(format!(
                                "output `{}`: classification must be an integer count of classes, not {other:?}",
                                o.name
                            )))
                        }
                    };
                    Ok(Requested {
                        name: &o.name,
                        binary: None,
                        classification,
                    })
                })
                .collect::<Result<_, _>>()?;
    // gRPC answers in raw_output_contents, as Triton does.
    let plan = crate::v2::plan_outputs(name, sig, &requested, true)?;
    Ok::<_, RouterError>((request, values, rows, plan))
}

/// A TF Serving `PredictRequest` read and checked against the model: its values as rows.
pub(crate) fn read_predict(
    name: &str,
    sig: &Signature,
    message: Bytes,
) -> Result<(Vec<f32>, usize), RouterError> {
    let request = tf::serving::PredictRequest::decode(message).map_err(invalid)?;
    let signature = request
        .model_spec
        .as_ref()
        .map_or("", |s| s.signature_name.as_str());
    if !signature.is_empty() && signature != "serving_default" {
        return Err(bad(format!(
                    "unknown signature_name `{signature}`; model `{name}` has one signature, `serving_default`"
                )));
    }
    for f in &request.output_filter {
        if *f != sig.output.name {
            return Err(bad(format!(
                "unknown output `{f}` in output_filter; model `{name}` gives one output, `{}`",
                sig.output.name
            )));
        }
    }
    let mut inputs = Vec::with_capacity(request.inputs.len());
    for (input_name, t) in &request.inputs {
        let datatype = tf_datatype(t.dtype)?;
        let shape: Vec<i64> = t
            .tensor_shape
            .as_ref()
            .map(|s| s.dim.iter().map(|d| d.size).collect())
            .unwrap_or_default();
        let data = if t.tensor_content.is_empty() {
            Data::Numbers(tf_values(t))
        } else {
            Data::Raw(&t.tensor_content)
        };
        inputs.push(Input {
            name: input_name,
            datatype,
            shape,
            data,
        });
    }
    crate::v2::decode_inputs(name, sig, &inputs)
}

/// KServe's typed contents for the input's datatype, as numbers.
fn typed_contents(
    t: &kserve::model_infer_request::InferInputTensor,
) -> Result<Vec<f64>, RouterError> {
    let Some(c) = &t.contents else {
        return Ok(Vec::new());
    };
    Ok(match t.datatype.as_str() {
        "FP32" => c.fp32_contents.iter().map(|x| f64::from(*x)).collect(),
        "FP64" => c.fp64_contents.clone(),
        "INT8" | "INT16" | "INT32" => c.int_contents.iter().map(|x| f64::from(*x)).collect(),
        "INT64" => c.int64_contents.iter().map(|x| *x as f64).collect(),
        "UINT8" | "UINT16" | "UINT32" => c.uint_contents.iter().map(|x| f64::from(*x)).collect(),
        "UINT64" => c.uint64_contents.iter().map(|x| *x as f64).collect(),
        other => {
            return Err(bad(format!(
                "input `{}` has datatype `{other}` in typed contents; numeric datatypes are taken (FP16 only as raw_input_contents)",
                t.name
            )))
        }
    })
}

/// The V2 name of a TensorFlow dtype the model can take.
fn tf_datatype(dtype: i32) -> Result<&'static str, RouterError> {
    switchyard_proto::v2_datatype_of_tf(dtype)
        .filter(|d| !matches!(*d, "BOOL" | "BYTES"))
        .ok_or_else(|| {
            bad(format!(
                "tensor dtype {dtype} is not numeric; the model takes DT_FLOAT (numeric dtypes are converted)"
            ))
        })
}

/// A TensorProto's typed values, whichever list its dtype uses.
fn tf_values(t: &tf::TensorProto) -> Vec<f64> {
    use tf::DataType as D;
    match D::try_from(t.dtype) {
        Ok(D::DtDouble) => t.double_val.clone(),
        Ok(D::DtHalf) => t
            .half_val
            .iter()
            .map(|h| f64::from(half_to_f32(*h as u16)))
            .collect(),
        Ok(D::DtInt8 | D::DtInt16 | D::DtInt32 | D::DtUint8 | D::DtUint16) => {
            t.int_val.iter().map(|x| f64::from(*x)).collect()
        }
        Ok(D::DtInt64) => t.int64_val.iter().map(|x| *x as f64).collect(),
        Ok(D::DtUint32) => t.uint32_val.iter().map(|x| f64::from(*x)).collect(),
        Ok(D::DtUint64) => t.uint64_val.iter().map(|x| *x as f64).collect(),
        _ => t.float_val.iter().map(|x| f64::from(*x)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A property, seeded: whatever protobuf bytes a client sends as a `ModelInferRequest`
    /// or a `PredictRequest` (valid ones with random shapes, datatypes and sizes, then
    /// cut, flipped or extended), reading them never panics, every refusal is a 400, and
    /// everything accepted is whole rows of finite values.
    #[test]
    fn arbitrary_grpc_messages_never_panic_and_refusals_are_400() {
        let model = switchyard_inference::OnnxModel::from_bytes(
            "mlp",
            switchyard_inference::builtin::DIGITS_MLP,
        )
        .unwrap();
        let sig = model.signature();
        let mut next = crate::test_rng(0x5DEE_CE66_D1CE_4E5B);
        const TYPES: &[&str] = &[
            "FP32", "FP64", "FP16", "INT8", "UINT64", "BYTES", "BOOL", "",
        ];
        const SIZES: &[i64] = &[1, 2, 64, 0, -1, 1 << 40, i64::MAX, i64::MIN, 3];
        let (mut accepted, mut refused) = (0, 0);
        for i in 0..20_000 {
            let pick = |n: u64, next: &mut dyn FnMut() -> u64| (next() % n) as usize;
            let rows = SIZES[pick(SIZES.len() as u64, &mut next)];
            let cols = if next().is_multiple_of(4) {
                SIZES[pick(SIZES.len() as u64, &mut next)]
            } else {
                64
            };
            let datatype = TYPES[pick(TYPES.len() as u64, &mut next)];
            let width = match datatype {
                "FP64" | "UINT64" => 8,
                "FP16" => 2,
                "INT8" | "BOOL" => 1,
                _ => 4,
            };
            let count = if next().is_multiple_of(3) {
                (next() % 300) as usize
            } else {
                (rows.clamp(0, 4) * cols.clamp(0, 64)) as usize
            };
            let raw: Vec<u8> = (0..count * width)
                .map(|_| match next() % 8 {
                    0 => 0xff,
                    _ => (next() % 17) as u8,
                })
                .collect();
            let message = if i % 2 == 0 {
                let mut req = kserve::ModelInferRequest {
                    model_name: "m".into(),
                    inputs: vec![kserve::model_infer_request::InferInputTensor {
                        name: if next().is_multiple_of(8) {
                            "x".into()
                        } else {
                            "pixels".into()
                        },
                        datatype: datatype.into(),
                        shape: vec![rows, cols],
                        ..Default::default()
                    }],
                    ..Default::default()
                };
                if next().is_multiple_of(2) {
                    req.raw_input_contents = vec![Bytes::from(raw.clone())];
                } else {
                    req.inputs[0].contents = Some(kserve::InferTensorContents {
                        fp32_contents: raw.iter().map(|b| f32::from(*b)).collect(),
                        int64_contents: raw.iter().map(|b| i64::from(*b) - 3).collect(),
                        ..Default::default()
                    });
                }
                if next().is_multiple_of(4) {
                    req.outputs = vec![kserve::model_infer_request::InferRequestedOutputTensor {
                        name: "probabilities".into(),
                        parameters: [(
                            "classification".to_string(),
                            kserve::InferParameter {
                                parameter_choice: Some(
                                    kserve::infer_parameter::ParameterChoice::Int64Param(
                                        (next() % 30) as i64 - 5,
                                    ),
                                ),
                            },
                        )]
                        .into(),
                    }];
                }
                req.encode_to_vec()
            } else {
                let t = tf::TensorProto {
                    dtype: (next() % 25) as i32,
                    tensor_shape: Some(tf::TensorShapeProto {
                        dim: [rows, cols]
                            .iter()
                            .map(|s| tf::tensor_shape_proto::Dim {
                                size: *s,
                                name: String::new(),
                            })
                            .collect(),
                        unknown_rank: false,
                    }),
                    tensor_content: if next().is_multiple_of(2) {
                        Bytes::from(raw.clone())
                    } else {
                        Bytes::new()
                    },
                    float_val: raw.iter().map(|b| f32::from(*b)).collect(),
                    half_val: raw.iter().map(|b| i32::from(*b) << 8).collect(),
                    ..Default::default()
                };
                tf::serving::PredictRequest {
                    model_spec: None,
                    inputs: [("pixels".to_string(), t)].into(),
                    output_filter: vec![],
                }
                .encode_to_vec()
            };
            // Now and then break the bytes themselves.
            let mut bytes = message;
            match next() % 6 {
                0 if !bytes.is_empty() => {
                    let cut = pick(bytes.len() as u64, &mut next);
                    bytes.truncate(cut);
                }
                1 if !bytes.is_empty() => {
                    for _ in 0..1 + next() % 4 {
                        let at = pick(bytes.len() as u64, &mut next);
                        bytes[at] = next() as u8;
                    }
                }
                2 => bytes.extend((0..next() % 20).map(|_| next() as u8)),
                _ => {}
            }
            let result = if i % 2 == 0 {
                read_infer("m", sig, Bytes::from(bytes)).map(|(_, v, r, _)| (v, r))
            } else {
                read_predict("m", sig, Bytes::from(bytes))
            };
            match result {
                Ok((values, rows)) => {
                    accepted += 1;
                    assert!(rows >= 1 && values.len() == rows * 64);
                    assert!(values.iter().all(|x| x.is_finite()));
                }
                Err(e) => {
                    refused += 1;
                    assert_eq!(e.status(), http::StatusCode::BAD_REQUEST, "{e}");
                }
            }
        }
        assert!(
            accepted > 100 && refused > 100,
            "{accepted} accepted, {refused} refused"
        );
    }
}
