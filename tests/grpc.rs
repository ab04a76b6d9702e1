//! gRPC over real sockets: KServe V2 / Triton's GRPCInferenceService and TF Serving's
//! Predict, answered by a local variant, forwarded to a remote gRPC variant (a second
//! Switchyard), with the same routing as HTTP (bandit decisions and feedback, fallback),
//! errors as gRPC statuses. The client is hyper's HTTP/2 with the message types
//! generated from the same protos (`proto/`).

mod support;

use std::collections::HashMap;

use bytes::{BufMut, Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use prost::Message;
use serde_json::{json, Value};
use support::*;
use switchyard::router::grpc::pb::inference as kserve;
use switchyard::router::grpc::pb::tensorflow as tf;

/// A gRPC answer: its status, message (for status 0), and response metadata.
#[derive(Debug)]
struct GrpcReply {
    status: u32,
    message: String,
    body: Bytes,
    headers: http::HeaderMap,
}

impl GrpcReply {
    fn decode<M: Message + Default>(&self) -> M {
        assert_eq!(self.status, 0, "{}", self.message);
        assert!(self.body.len() >= 5, "no message");
        let len = u32::from_be_bytes(self.body[1..5].try_into().unwrap()) as usize;
        assert_eq!(len, self.body.len() - 5);
        M::decode(&self.body[5..]).unwrap()
    }
}

/// One unary call: `flag` 1 sends `message` as it is, compressed (with `grpc-encoding`).
async fn call_raw(
    addr: std::net::SocketAddr,
    path: &str,
    message: Vec<u8>,
    headers: &[(&str, &str)],
    flag: u8,
) -> GrpcReply {
    let mut framed = BytesMut::with_capacity(5 + message.len());
    framed.put_u8(flag);
    framed.put_u32(message.len() as u32);
    framed.put_slice(&message);
    let mut req = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = h2_client()
        .request(req.body(Full::new(framed.freeze())).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "gRPC answers are HTTP 200");
    assert_eq!(resp.headers()["content-type"], "application/grpc");
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    let body = collected.to_bytes();
    // Trailers-only answers carry the status in the headers.
    let status_from = |h: &http::HeaderMap| {
        h.get("grpc-status").map(|s| {
            (
                s.to_str().unwrap().parse::<u32>().unwrap(),
                h.get("grpc-message")
                    .map(|m| m.to_str().unwrap().to_string())
                    .unwrap_or_default(),
            )
        })
    };
    let (status, message) = status_from(&parts.headers)
        .or_else(|| trailers.as_ref().and_then(status_from))
        .expect("a grpc-status");
    GrpcReply {
        status,
        message,
        body,
        headers: parts.headers,
    }
}

async fn call(addr: std::net::SocketAddr, path: &str, message: &impl Message) -> GrpcReply {
    call_raw(addr, path, message.encode_to_vec(), &[], 0).await
}

const INFER: &str = "/inference.GRPCInferenceService/ModelInfer";
const PREDICT: &str = "/tensorflow.serving.PredictionService/Predict";

fn vectors() -> Value {
    serde_json::from_str(&std::fs::read_to_string("models/digits_test_vectors.json").unwrap())
        .unwrap()
}

fn pixels(v: &Value, rows: usize) -> Vec<f32> {
    v["inputs"].as_array().unwrap()[..rows]
        .iter()
        .flat_map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
        })
        .collect()
}

fn argmax(row: &[f32]) -> usize {
    (0..row.len())
        .max_by(|a, b| row[*a].total_cmp(&row[*b]))
        .unwrap()
}

fn infer_request(model: &str, x: &[f32], rows: usize) -> kserve::ModelInferRequest {
    kserve::ModelInferRequest {
        model_name: model.into(),
        id: "call-1".into(),
        inputs: vec![kserve::model_infer_request::InferInputTensor {
            name: "pixels".into(),
            datatype: "FP32".into(),
            shape: vec![rows as i64, 64],
            ..Default::default()
        }],
        raw_input_contents: vec![Bytes::from(
            x.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>(),
        )],
        ..Default::default()
    }
}

fn top1(resp: &kserve::ModelInferResponse) -> Vec<usize> {
    let raw = &resp.raw_output_contents[0];
    let scores: Vec<f32> = raw
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    scores.chunks(10).map(argmax).collect()
}

/// The HTTP/JSON answer's top-1 for the same rows, to compare with.
async fn http_top1(addr: std::net::SocketAddr, model: &str, x: &[f32], rows: usize) -> Vec<usize> {
    let body = json!({ "inputs": [{ "name": "pixels", "datatype": "FP32", "shape": [rows, 64], "data": x }] });
    let r = send(
        &client(),
        "POST",
        &format!("http://{addr}/v2/models/{model}/infer"),
        &[],
        &body.to_string(),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let data: Vec<f32> = r.json()["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    data.chunks(10).map(argmax).collect()
}

/// A local variant answers every method; ModelInfer on 32 held-out digits (raw and typed
/// contents) gives the HTTP answer's classes, and mostly the right ones; classification
/// and versions; errors are statuses with HTTP's messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_variant_answers_kserve_and_tf_serving_grpc() {
    let app = start("models:\n  digits:\n    variants:\n      - {name: cpu, weight: 1, local: {model: \"builtin:digits_mlp\", batching: {max_batch_size: 32}}}\n").await;
    let addr = app.data_addr;
    let live: kserve::ServerLiveResponse = call(
        addr,
        "/inference.GRPCInferenceService/ServerLive",
        &kserve::ServerLiveRequest {},
    )
    .await
    .decode();
    assert!(live.live);
    let ready: kserve::ServerReadyResponse = call(
        addr,
        "/inference.GRPCInferenceService/ServerReady",
        &kserve::ServerReadyRequest {},
    )
    .await
    .decode();
    assert!(ready.ready);
    let meta: kserve::ServerMetadataResponse = call(
        addr,
        "/inference.GRPCInferenceService/ServerMetadata",
        &kserve::ServerMetadataRequest {},
    )
    .await
    .decode();
    assert_eq!(meta.name, "switchyard");
    assert!(meta.extensions.contains(&"classification".to_string()));
    let ready: kserve::ModelReadyResponse = call(
        addr,
        "/inference.GRPCInferenceService/ModelReady",
        &kserve::ModelReadyRequest {
            name: "digits".into(),
            version: String::new(),
        },
    )
    .await
    .decode();
    assert!(ready.ready);
    let md: kserve::ModelMetadataResponse = call(
        addr,
        "/inference.GRPCInferenceService/ModelMetadata",
        &kserve::ModelMetadataRequest {
            name: "digits".into(),
            version: String::new(),
        },
    )
    .await
    .decode();
    assert_eq!(
        (md.inputs[0].name.as_str(), md.inputs[0].shape.clone()),
        ("pixels", vec![-1, 64])
    );
    assert_eq!(md.outputs[0].shape, vec![-1, 10]);

    let v = vectors();
    let labels: Vec<usize> = v["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_u64().unwrap() as usize)
        .collect();
    for rows in [1usize, 32] {
        let x = pixels(&v, rows);
        let want = http_top1(addr, "digits", &x, rows).await;
        let reply = call(addr, INFER, &infer_request("digits", &x, rows)).await;
        assert!(
            reply.headers.contains_key("x-request-id"),
            "the request id is in the response metadata"
        );
        assert_eq!(reply.headers["x-switchyard-variant"], "cpu");
        let resp: kserve::ModelInferResponse = reply.decode();
        assert_eq!(
            (resp.model_name.as_str(), resp.id.as_str()),
            ("digits", "call-1")
        );
        assert_eq!(resp.outputs[0].shape, vec![rows as i64, 10]);
        assert_eq!(top1(&resp), want, "gRPC and HTTP agree");
        // Typed contents instead of raw.
        let mut typed = infer_request("digits", &x, rows);
        typed.raw_input_contents.clear();
        typed.inputs[0].contents = Some(kserve::InferTensorContents {
            fp32_contents: x.clone(),
            ..Default::default()
        });
        assert_eq!(top1(&call(addr, INFER, &typed).await.decode()), want);
        if rows == 32 {
            let right = want.iter().zip(&labels).filter(|(a, b)| a == b).count();
            // Meaningful answers, not noise (chance is 10%); the exact figure is HTTP's.
            assert!(right >= 27, "{right} of 32 right");
        }
    }
    // TF Serving's Predict, from a client generated from the same protos: same classes.
    let x = pixels(&v, 8);
    let want = http_top1(addr, "digits", &x, 8).await;
    let tensor = tf::TensorProto {
        dtype: tf::DataType::DtFloat as i32,
        tensor_shape: Some(tf::TensorShapeProto {
            dim: [8, 64]
                .iter()
                .map(|s| tf::tensor_shape_proto::Dim {
                    size: *s,
                    name: String::new(),
                })
                .collect(),
            unknown_rank: false,
        }),
        float_val: x.clone(),
        ..Default::default()
    };
    let predict = tf::serving::PredictRequest {
        model_spec: Some(tf::serving::ModelSpec {
            name: "digits".into(),
            signature_name: "serving_default".into(),
            version_choice: None,
        }),
        inputs: HashMap::from([("pixels".to_string(), tensor.clone())]),
        output_filter: vec![],
    };
    let resp: tf::serving::PredictResponse = call(addr, PREDICT, &predict).await.decode();
    let out = &resp.outputs["probabilities"];
    let dims: Vec<i64> = out
        .tensor_shape
        .as_ref()
        .unwrap()
        .dim
        .iter()
        .map(|d| d.size)
        .collect();
    assert_eq!(dims, vec![8, 10]);
    assert_eq!(
        out.float_val.chunks(10).map(argmax).collect::<Vec<_>>(),
        want
    );
    // The same values as tensor_content bytes.
    let mut packed = predict.clone();
    let t = packed.inputs.get_mut("pixels").unwrap();
    t.tensor_content = Bytes::from(x.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>());
    t.float_val.clear();
    let resp: tf::serving::PredictResponse = call(addr, PREDICT, &packed).await.decode();
    assert_eq!(
        resp.outputs["probabilities"]
            .float_val
            .chunks(10)
            .map(argmax)
            .collect::<Vec<_>>(),
        want
    );
    let status: tf::serving::GetModelStatusResponse = call(
        addr,
        "/tensorflow.serving.ModelService/GetModelStatus",
        &tf::serving::GetModelStatusRequest {
            model_spec: predict.model_spec.clone(),
        },
    )
    .await
    .decode();
    assert_eq!(
        status.model_version_status[0].state,
        tf::serving::model_version_status::State::Available as i32
    );

    // Classification over gRPC: BYTES "score:index" in raw_output_contents.
    let mut classify = infer_request("digits", &pixels(&v, 1), 1);
    classify.outputs = vec![kserve::model_infer_request::InferRequestedOutputTensor {
        name: "probabilities".into(),
        parameters: HashMap::from([(
            "classification".to_string(),
            kserve::InferParameter {
                parameter_choice: Some(kserve::infer_parameter::ParameterChoice::Int64Param(2)),
            },
        )]),
    }];
    let resp: kserve::ModelInferResponse = call(addr, INFER, &classify).await.decode();
    assert_eq!(
        (
            resp.outputs[0].datatype.as_str(),
            resp.outputs[0].shape.clone()
        ),
        ("BYTES", vec![1, 2])
    );
    let raw = &resp.raw_output_contents[0];
    let n = u32::from_le_bytes(raw[..4].try_into().unwrap()) as usize;
    let first = std::str::from_utf8(&raw[4..4 + n]).unwrap();
    assert!(first.ends_with(&format!(":{}", labels[0])), "{first}");

    // Errors: statuses with the HTTP errors' messages.
    let mut unknown = infer_request("nope", &pixels(&v, 1), 1);
    let r = call(addr, INFER, &unknown).await;
    assert_eq!(r.status, 5, "NOT_FOUND: {}", r.message);
    assert!(r.message.contains("`nope` is not served"), "{}", r.message);
    unknown.model_name = "digits".into();
    unknown.model_version = "99".into();
    let r = call(addr, INFER, &unknown).await;
    assert_eq!(r.status, 5, "NOT_FOUND: {}", r.message);
    assert!(r.message.contains("no version `99`"), "{}", r.message);
    let mut wrong = infer_request("digits", &pixels(&v, 1), 1);
    wrong.inputs[0].shape = vec![2, 64];
    let r = call(addr, INFER, &wrong).await;
    assert_eq!(r.status, 3, "INVALID_ARGUMENT: {}", r.message);
    wrong.inputs[0].shape = vec![1, 64];
    wrong.outputs = vec![kserve::model_infer_request::InferRequestedOutputTensor {
        name: "logits".into(),
        parameters: HashMap::new(),
    }];
    let r = call(addr, INFER, &wrong).await;
    assert_eq!(r.status, 3);
    assert!(
        r.message.contains("unknown output `logits`"),
        "{}",
        r.message
    );
    let r = call_raw(addr, "/inference.GRPCInferenceService/Nope", vec![], &[], 0).await;
    assert_eq!(r.status, 12, "UNIMPLEMENTED: {}", r.message);
    let r = call_raw(addr, INFER, b"\xff\xff\xff".to_vec(), &[], 0).await;
    assert_eq!(r.status, 3, "not protobuf: {}", r.message);
    // A compressed bomb: 20 MiB of zeros in a few KB is refused, not inflated.
    let bomb = {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(&vec![0u8; 20 << 20]).unwrap();
        e.finish().unwrap()
    };
    let r = call_raw(addr, INFER, bomb, &[("grpc-encoding", "gzip")], 1).await;
    assert_eq!(r.status, 8, "RESOURCE_EXHAUSTED: {}", r.message);
    // A gzip-compressed real call is inflated and answered.
    let packed = {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&infer_request("digits", &pixels(&v, 1), 1).encode_to_vec())
            .unwrap();
        e.finish().unwrap()
    };
    let r = call_raw(addr, INFER, packed, &[("grpc-encoding", "gzip")], 1).await;
    let resp: kserve::ModelInferResponse = r.decode();
    assert_eq!(top1(&resp), vec![labels[0]]);
    // Still serving, and HTTP too.
    assert_eq!(
        http_top1(addr, "digits", &pixels(&v, 1), 1).await,
        vec![labels[0]]
    );
    app.shutdown();
    app.wait().await;
}

/// A remote variant with `protocol: grpc` (a second Switchyard serving the model as
/// `inner`) gets the call with the model name rewritten and answers through the
/// sidecar; HTTP requests to the same model go to its HTTP variants only. With the gRPC
/// upstream dead, the local fallback answers; a bandit records a decision whose request
/// id (from the response metadata) takes feedback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_grpc_variants_fallback_and_bandit_decisions() {
    let inner = start("models:\n  inner:\n    variants:\n      - {name: cpu, weight: 1, local: {model: \"builtin:digits_mlp\"}}\n").await;
    let echo = Upstream::echo("http").await;
    let dead = refused_addr().await;
    let app = start(&format!(
        "models:\n  digits:\n    variants:\n      - {{name: far, weight: 1, upstream: \"http://{}\", protocol: grpc, upstream_model: inner}}\n      - {{name: web, weight: 1, upstream: \"{}\"}}\n  safe:\n    fallback: near\n    variants:\n      - {{name: gone, weight: 1, upstream: \"http://{dead}\", protocol: grpc}}\n      - {{name: near, weight: 0, local: {{model: \"builtin:digits_mlp\"}}}}\n  learn:\n    bandit: {{objective: conversion}}\n    variants:\n      - {{name: a, weight: 1, local: {{model: \"builtin:digits_mlp\"}}}}\n      - {{name: b, weight: 1, local: {{model: \"builtin:digits_mlp\"}}}}\n",
        inner.data_addr,
        echo.url()
    ))
    .await;
    let addr = app.data_addr;
    let v = vectors();
    let x = pixels(&v, 16);
    let want = http_top1(inner.data_addr, "inner", &x, 16).await;
    for _ in 0..4 {
        let reply = call(addr, INFER, &infer_request("digits", &x, 16)).await;
        assert_eq!(
            reply.headers["x-switchyard-variant"], "far",
            "only the gRPC variant takes gRPC"
        );
        let resp: kserve::ModelInferResponse = reply.decode();
        assert_eq!(
            resp.model_name, "inner",
            "the upstream's own answer, streamed through"
        );
        assert_eq!(top1(&resp), want);
    }
    // HTTP to the same model reaches only the HTTP variant.
    for _ in 0..4 {
        let r = predict(&client(), &format!("http://{addr}/v2/models/digits/infer")).await;
        assert_eq!(r.header("x-switchyard-variant"), Some("web"));
    }
    // A remote gRPC error (unknown output) comes back as the upstream's status.
    let mut wrong = infer_request("digits", &x, 16);
    wrong.outputs = vec![kserve::model_infer_request::InferRequestedOutputTensor {
        name: "logits".into(),
        parameters: HashMap::new(),
    }];
    let r = call(addr, INFER, &wrong).await;
    assert_eq!(r.status, 3, "{}", r.message);
    // The dead gRPC upstream: the local fallback answers.
    for _ in 0..3 {
        let reply = call(addr, INFER, &infer_request("safe", &x, 16)).await;
        assert_eq!(reply.headers["x-switchyard-variant"], "near");
        assert_eq!(top1(&reply.decode()), want);
    }
    // A bandit decision over gRPC, and feedback for its request id.
    let reply = call(addr, INFER, &infer_request("learn", &x, 16)).await;
    let id = reply.headers["x-request-id"].to_str().unwrap().to_string();
    let r = send(
        &client(),
        "POST",
        &format!("http://{addr}/v1/feedback"),
        &[],
        &json!({ "request_id": id, "converted": true }).to_string(),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    app.shutdown();
    app.wait().await;
    inner.shutdown();
    inner.wait().await;
}

/// The shadow report for `name` once `want` mirrors are compared or failed.
async fn shadow_settled(admin: std::net::SocketAddr, model: &str, name: &str, want: u64) -> Value {
    for _ in 0..1000 {
        let report = admin_json(admin, &format!("/admin/shadow/{model}")).await;
        let s = report["shadows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap()
            .clone();
        let n = |k: &str| s[k].as_u64().unwrap();
        if n("compared") + n("errors") >= want && n("in_flight") == 0 {
            return s;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("shadow {name} never settled");
}

/// gRPC calls are mirrored to `protocol: grpc` shadows (a second Switchyard, its model
/// named differently) and HTTP requests to the others; the gRPC answers are compared
/// as V2 outputs, values and all (the same model agrees to float noise; the CNN's
/// probabilities differ).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_are_mirrored_to_grpc_shadows_and_compared() {
    let same = start("models:\n  twin:\n    variants:\n      - {name: cpu, weight: 1, local: {model: \"builtin:digits_mlp\"}}\n").await;
    let other = start("models:\n  cnn:\n    variants:\n      - {name: cpu, weight: 1, local: {model: \"builtin:digits_cnn\"}}\n").await;
    let echo = Upstream::echo("http-shadow").await;
    let app = start(&format!(
        "models:\n  digits:\n    variants:\n      - {{name: cpu, weight: 1, local: {{model: \"builtin:digits_mlp\"}}}}\n    shadows:\n      - {{name: twin, upstream: \"http://{}\", upstream_model: twin, protocol: grpc, fraction: 1}}\n      - {{name: cnn, upstream: \"http://{}\", upstream_model: cnn, protocol: grpc, fraction: 1}}\n      - {{name: web, upstream: \"{}\", fraction: 1}}\n",
        same.data_addr,
        other.data_addr,
        echo.url()
    ))
    .await;
    let v = vectors();
    for i in 0..20 {
        let x = pixels(&v, 1 + i % 4);
        let r = call(
            app.data_addr,
            INFER,
            &infer_request("digits", &x, 1 + i % 4),
        )
        .await;
        assert_eq!(r.status, 0, "{}", r.message);
    }
    let twin = shadow_settled(app.admin_addr, "digits", "twin", 20).await;
    assert_eq!(twin["mirrored"], 20, "{twin}");
    assert_eq!(twin["compared"], 20, "{twin}");
    assert_eq!(twin["agreed"], 20, "{twin}");
    let cnn = shadow_settled(app.admin_addr, "digits", "cnn", 20).await;
    assert_eq!(cnn["compared"], 20, "{cnn}");
    // The values themselves are compared: the same model differs by float noise, the
    // CNN by its own probabilities (both pick the same digits here).
    let largest = |s: &Value| s["max_abs_diff"]["max"].as_f64().unwrap();
    assert!(largest(&twin) < 1e-6, "{twin}");
    assert!(largest(&cnn) > 1e-5, "{cnn}");
    let web = admin_json(app.admin_addr, "/admin/shadow/digits").await["shadows"][2].clone();
    assert_eq!(web["mirrored"], 0, "HTTP shadows get no gRPC calls: {web}");
    // HTTP requests go to the HTTP shadow only.
    for _ in 0..5 {
        let r = send(&client(), "POST", &format!("http://{}/v2/models/digits/infer", app.data_addr), &[], &json!({ "inputs": [{ "name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": pixels(&v, 1) }] }).to_string()).await;
        assert_eq!(r.status, 200);
    }
    let web = shadow_settled(app.admin_addr, "digits", "web", 5).await;
    assert_eq!(web["mirrored"], 5, "{web}");
    let twin = shadow_settled(app.admin_addr, "digits", "twin", 20).await;
    assert_eq!(
        twin["mirrored"], 20,
        "gRPC shadows get no HTTP requests: {twin}"
    );
    for a in [app, same, other] {
        a.shutdown();
        a.wait().await;
    }
}

/// gRPC metadata is headers: a sticky key sent as metadata keeps a caller on one
/// variant, as it does over HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sticky_key_in_grpc_metadata_keeps_the_caller_on_one_variant() {
    let app = start("seed: 7\nmodels:\n  digits:\n    sticky_header: x-user\n    variants:\n      - {name: a, weight: 1, local: {model: \"builtin:digits_mlp\"}}\n      - {name: b, weight: 1, local: {model: \"builtin:digits_mlp\"}}\n").await;
    let v = vectors();
    let message = infer_request("digits", &pixels(&v, 1), 1).encode_to_vec();
    let mut seen = std::collections::BTreeMap::new();
    for user in ["alice", "bob", "carol", "dave", "erin", "frank"] {
        let mut variants = std::collections::BTreeSet::new();
        for _ in 0..10 {
            let r = call_raw(
                app.data_addr,
                INFER,
                message.clone(),
                &[("x-user", user)],
                0,
            )
            .await;
            assert_eq!(r.status, 0, "{}", r.message);
            variants.insert(
                r.headers["x-switchyard-variant"]
                    .to_str()
                    .unwrap()
                    .to_string(),
            );
        }
        assert_eq!(variants.len(), 1, "{user} moved between {variants:?}");
        seen.insert(user, variants.into_iter().next().unwrap());
    }
    // Six users on two variants, a fixed seed: the key decides, and both are used.
    let used: std::collections::BTreeSet<_> = seen.values().collect();
    assert_eq!(used.len(), 2, "{seen:?}");
    app.shutdown();
    app.wait().await;
}

/// A gRPC shadow tells its upstream its own deadline (its `request_timeout`, 300 ms,
/// from when it sends), not the client's, which was the primary's (20 s, from when the
/// call came), nor nothing when the client gave none. Its upstream here is an h2c server
/// that keeps the `grpc-timeout` of each call, and answers `UNAVAILABLE`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_shadow_says_its_own_deadline() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let shadow_addr = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Option<String>>::new()));
    let keep = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let keep = keep.clone();
            let service =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let timeout = req
                        .headers()
                        .get("grpc-timeout")
                        .map(|v| v.to_str().unwrap().to_string());
                    keep.lock().unwrap().push(timeout);
                    async {
                        let resp = http::Response::builder()
                            .header("content-type", "application/grpc")
                            .header("grpc-status", "14")
                            .body(Full::new(Bytes::new()))
                            .unwrap();
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
    let app = start(&format!(
        "models:\n  digits:\n    variants:\n      - {{name: cpu, weight: 1, local: {{model: \"builtin:digits_mlp\"}}}}\n    shadows:\n      - {{name: peer, upstream: \"http://{shadow_addr}\", protocol: grpc, fraction: 1, request_timeout: 300ms}}\n"
    ))
    .await;
    let x = pixels(&vectors(), 1);
    let message = infer_request("digits", &x, 1).encode_to_vec();
    for deadline in [Some("20S"), None] {
        let headers: Vec<(&str, &str)> =
            deadline.map(|d| ("grpc-timeout", d)).into_iter().collect();
        let r = call_raw(app.data_addr, INFER, message.clone(), &headers, 0).await;
        assert_eq!(r.status, 0, "{}", r.message);
    }
    shadow_settled(app.admin_addr, "digits", "peer", 2).await;
    let seen = seen.lock().unwrap().clone();
    // 300 ms in the finest unit that fits 8 digits: 300,000 µs.
    assert_eq!(
        seen,
        [Some("300000u".to_string()), Some("300000u".to_string())]
    );
    app.shutdown();
    app.wait().await;
}

/// The client's `grpc-timeout` bounds the call, as Triton's and Envoy's clients expect:
/// past it the answer is `DEADLINE_EXCEEDED` (not the model's answer seconds later),
/// for a local variant and through a remote gRPC one (whose upstream is told what is
/// left); a generous deadline changes nothing; a malformed one is `INVALID_ARGUMENT`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clients_grpc_timeout_bounds_the_call() {
    // A model that takes 5 s to answer, served locally and, through a second sidecar,
    // as a remote gRPC variant.
    let slow = "local: {model: \"builtin:digits_mlp\", delay: 5s}";
    let inner = start(&format!(
        "models:\n  inner:\n    variants:\n      - {{name: cpu, weight: 1, {slow}}}\n  quick:\n    variants:\n      - {{name: cpu, weight: 1, local: {{model: \"builtin:digits_mlp\"}}}}\n"
    ))
    .await;
    let app = start(&format!(
        "models:\n  here:\n    variants:\n      - {{name: cpu, weight: 1, {slow}}}\n  far:\n    variants:\n      - {{name: rpc, weight: 1, upstream: \"http://{}\", protocol: grpc, upstream_model: inner}}\n  quick:\n    variants:\n      - {{name: rpc, weight: 1, upstream: \"http://{}\", protocol: grpc}}\n",
        inner.data_addr, inner.data_addr
    ))
    .await;
    let addr = app.data_addr;
    let x = pixels(&vectors(), 1);
    for model in ["here", "far"] {
        let message = infer_request(model, &x, 1).encode_to_vec();
        let r = call_raw(addr, INFER, message, &[("grpc-timeout", "300m")], 0).await;
        assert_eq!(r.status, 4, "{model}: {}", r.message);
        assert!(r.message.contains("grpc-timeout"), "{model}: {}", r.message);
    }
    // Time to spare: answered as without one, through both sidecars.
    let message = infer_request("quick", &x, 1).encode_to_vec();
    let r = call_raw(addr, INFER, message.clone(), &[("grpc-timeout", "20S")], 0).await;
    let resp: kserve::ModelInferResponse = r.decode();
    assert_eq!(top1(&resp).len(), 1);
    for bad in ["soon", "300", "123456789m"] {
        let r = call_raw(addr, INFER, message.clone(), &[("grpc-timeout", bad)], 0).await;
        assert_eq!(r.status, 3, "{bad}: {}", r.message);
    }
    let metrics = metrics(app.admin_addr).await;
    let deadlines = sample(
        &metrics,
        "switchyard_rejected_requests_total{reason=\"client_deadline\"}",
    );
    assert!(
        deadlines.is_some_and(|n| n >= 1.0),
        "no client_deadline count in the metrics: {deadlines:?}"
    );
    app.shutdown();
    app.wait().await;
    inner.shutdown();
    inner.wait().await;
}

/// `capture:` keeps gRPC predictions too, as the V2 JSON they stand for: KServe's raw
/// tensors and TF Serving's typed ones, inputs as sent and outputs as answered. With
/// `margin: 1` every answer whose top two scores are not exactly 1 and 0 is kept (all
/// seven here: the model's softmax never saturates on these digits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_keeps_grpc_predictions_as_json() {
    let dir = std::env::temp_dir().join(format!("switchyard-grpc-capture-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("kept.jsonl");
    let app = start(&format!(
        "models:\n  digits:\n    capture: {{margin: 1.0, file: \"{}\"}}\n    variants:\n      - {{name: cpu, weight: 1, local: {{model: \"builtin:digits_mlp\"}}}}\n",
        file.display()
    ))
    .await;
    let v = vectors();
    let x = pixels(&v, 8);
    let mut answers = Vec::new();
    for row in x.chunks(64).take(6) {
        let r = call(app.data_addr, INFER, &infer_request("digits", row, 1)).await;
        let resp: kserve::ModelInferResponse = r.decode();
        let raw = &resp.raw_output_contents[0];
        answers.push(
            raw.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect::<Vec<f32>>(),
        );
    }
    // TF Serving's Predict, typed values.
    let mut inputs = HashMap::new();
    inputs.insert(
        "pixels".to_string(),
        tf::TensorProto {
            dtype: tf::DataType::DtFloat as i32,
            tensor_shape: Some(tf::TensorShapeProto {
                dim: [1, 64]
                    .iter()
                    .map(|&size| tf::tensor_shape_proto::Dim {
                        size,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            float_val: x[6 * 64..7 * 64].to_vec(),
            ..Default::default()
        },
    );
    let predict = tf::serving::PredictRequest {
        model_spec: Some(tf::serving::ModelSpec {
            name: "digits".into(),
            ..Default::default()
        }),
        inputs,
        ..Default::default()
    };
    assert_eq!(call(app.data_addr, PREDICT, &predict).await.status, 0);

    let (mut looked, mut kept) = (0.0, 0.0);
    for _ in 0..500 {
        let m = metrics(app.admin_addr).await;
        looked = sample(
            &m,
            r#"switchyard_capture_predictions_total{model="digits"}"#,
        )
        .unwrap_or(0.0);
        kept = sample(&m, r#"switchyard_capture_borderline_total{model="digits"}"#).unwrap_or(0.0);
        let lines = std::fs::read_to_string(&file)
            .unwrap_or_default()
            .lines()
            .count();
        // Counted as looked at before it is counted as kept: wait for the kept count
        // and the file to reach the seventh too (bounded), not just to agree.
        if looked == 7.0 && kept == 7.0 && lines == 7 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(looked, 7.0, "every gRPC prediction looked at");
    assert_eq!(kept, 7.0, "every one kept at margin 1");
    let text = std::fs::read_to_string(&file).unwrap();
    let mut seen = Vec::new();
    for line in text.lines() {
        let l: Value = serde_json::from_str(line).unwrap();
        let input = &l["inputs"]["inputs"][0];
        assert_eq!(input["name"], "pixels", "{l}");
        assert_eq!(input["datatype"], "FP32", "{l}");
        assert_eq!(input["shape"], json!([1, 64]), "{l}");
        let sent: Vec<f32> = input["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_f64().unwrap() as f32)
            .collect();
        let i = x
            .chunks(64)
            .position(|r| r == sent)
            .expect("the inputs as sent");
        let out: Vec<f32> = l["outputs"]["outputs"][0]["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(out.len(), 10, "{l}");
        assert_eq!(l["classes"][0], argmax(&out), "{l}");
        if i < 6 {
            assert_eq!(out, answers[i], "the outputs as answered");
        }
        assert_eq!(l["variant"], "cpu");
        seen.push(i);
    }
    seen.sort_unstable();
    assert_eq!(seen, [0, 1, 2, 3, 4, 5, 6], "each call once");
    app.shutdown();
    app.wait().await;
    let _ = std::fs::remove_dir_all(dir);
}
