//! Local variants over real sockets: the bundled models answer TF Serving and V2
//! requests in-process, match onnxruntime, validate shapes, and shed load with 503.

mod support;

use bytes::Bytes;
use std::time::Duration;

use serde_json::{json, Value};
use support::*;

fn vectors() -> Value {
    serde_json::from_str(&std::fs::read_to_string("models/digits_test_vectors.json").unwrap())
        .unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    let mut out = Vec::new();
    fn walk(v: &Value, out: &mut Vec<f32>) {
        match v {
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            Value::Number(n) => out.push(n.as_f64().unwrap() as f32),
            other => panic!("not a number: {other}"),
        }
    }
    walk(v, &mut out);
    out
}

fn close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst <= 1e-4, "max diff {worst}");
}

async fn app(model: &str, batching: &str) -> switchyard::Running {
    start(&format!(
        "models:\n  digits:\n    variants:\n      - name: cpu\n        weight: 1\n        local:\n          model: {model}\n          batching: {batching}\n"
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_models_match_onnxruntime_through_both_protocols() {
    let v = vectors();
    let inputs = v["inputs"].as_array().unwrap();
    for (model, key) in [("builtin:digits_mlp", "mlp"), ("builtin:digits_cnn", "cnn")] {
        let app = app(model, "{max_batch_size: 16}").await;
        let c = client();
        let base = format!("http://{}", app.data_addr);
        let want = v[key].as_array().unwrap();
        // TF Serving row format, 16 examples at once.
        let body = json!({ "instances": inputs[..16] }).to_string();
        let r = send(
            &c,
            "POST",
            &format!("{base}/v1/models/digits:predict"),
            &[],
            &body,
        )
        .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(r.header("x-switchyard-variant"), Some("cpu"));
        close(
            &floats(&r.json()["predictions"]),
            &floats(&Value::Array(want[..16].to_vec())),
        );
        // TF columnar format with a named input.
        let body = json!({ "inputs": { "pixels": inputs[16..20] } }).to_string();
        let r = send(
            &c,
            "POST",
            &format!("{base}/v1/models/digits:predict"),
            &[],
            &body,
        )
        .await;
        close(
            &floats(&r.json()["outputs"]),
            &floats(&Value::Array(want[16..20].to_vec())),
        );
        // Row format with named inputs per instance.
        let body = json!({ "instances": [{ "pixels": inputs[20] }] }).to_string();
        let r = send(
            &c,
            "POST",
            &format!("{base}/v1/models/digits:predict"),
            &[],
            &body,
        )
        .await;
        close(&floats(&r.json()["predictions"]), &floats(&want[20]));
        // V2, flat data, echoing the request id.
        let flat: Vec<f32> = inputs[21..24].iter().flat_map(floats).collect();
        let body = json!({ "id": "abc", "inputs": [{ "name": "pixels", "shape": [3, 64], "datatype": "FP32", "data": flat }] }).to_string();
        let r = send(
            &c,
            "POST",
            &format!("{base}/v2/models/digits/infer"),
            &[],
            &body,
        )
        .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        let out = &r.json()["outputs"][0];
        assert_eq!(out["name"], "probabilities");
        assert_eq!(out["shape"], json!([3, 10]));
        assert_eq!(r.json()["id"], "abc");
        close(
            &floats(&out["data"]),
            &floats(&Value::Array(want[21..24].to_vec())),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_status_and_readiness_come_from_the_signature() {
    let app = app("builtin:digits_mlp", "{}").await;
    let c = client();
    let base = format!("http://{}", app.data_addr);
    let m = send(&c, "GET", &format!("{base}/v2/models/digits"), &[], "")
        .await
        .json();
    assert_eq!(
        m["inputs"][0],
        json!({ "name": "pixels", "datatype": "FP32", "shape": [-1, 64] })
    );
    assert_eq!(
        m["outputs"][0],
        json!({ "name": "probabilities", "datatype": "FP32", "shape": [-1, 10] })
    );
    let r = send(
        &c,
        "GET",
        &format!("{base}/v2/models/digits/ready"),
        &[],
        "",
    )
    .await;
    assert_eq!((r.status, r.json()["ready"].clone()), (200, json!(true)));
    let s = send(&c, "GET", &format!("{base}/v1/models/digits"), &[], "")
        .await
        .json();
    assert_eq!(s["model_version_status"][0]["state"], "AVAILABLE");
    let md = send(
        &c,
        "GET",
        &format!("{base}/v1/models/digits/metadata"),
        &[],
        "",
    )
    .await
    .json();
    let sig = &md["metadata"]["signature_def"]["signature_def"]["serving_default"];
    assert_eq!(
        sig["inputs"]["pixels"]["tensor_shape"]["dim"][1]["size"],
        "64"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tensors_get_400s_that_name_the_problem() {
    let app = app("builtin:digits_mlp", "{}").await;
    let c = client();
    let tf = format!("http://{}/v1/models/digits:predict", app.data_addr);
    let v2 = format!("http://{}/v2/models/digits/infer", app.data_addr);
    let row = vec![1.0f32; 64];
    let cases: Vec<(&str, String, &str)> = vec![
        (&tf, "{not json".into(), "not valid JSON"),
        (&tf, json!({ "instances": [row, [1, 2, 3]] }).to_string(), "instances[1] has 3 values"),
        (&tf, json!({ "instances": [] }).to_string(), "is empty"),
        (&tf, json!({ "instances": [vec!["a"; 64]] }).to_string(), "expected numbers, found a string"),
        (&tf, json!({ "nothing": 1 }).to_string(), "neither `instances` nor `inputs`"),
        (&tf, json!({ "instances": [{ "image": row }] }).to_string(), "names input `image`"),
        (&v2, json!({ "inputs": [{ "name": "x", "shape": [1, 64], "datatype": "FP32", "data": row }] }).to_string(), "unknown input `x`"),
        (&v2, json!({ "inputs": [{ "name": "pixels", "shape": [1, 32], "datatype": "FP32", "data": row }] }).to_string(), "has shape [1, 32]"),
        (&v2, json!({ "inputs": [{ "name": "pixels", "shape": [2, 64], "datatype": "FP32", "data": row }] }).to_string(), "has 64 values; shape [2, 64] needs 128"),
        (&v2, json!({ "inputs": [{ "name": "pixels", "shape": [1, 64], "datatype": "BYTES", "data": row }] }).to_string(), "datatype `BYTES`"),
    ];
    for (url, body, expected) in cases {
        let r = send(&c, "POST", url, &[], &body).await;
        assert_eq!(r.status, 400, "{body}");
        let msg = r.json()["error"].as_str().unwrap().to_string();
        assert!(msg.contains(expected), "{body}\n  -> {msg}");
    }
    let r = send(
        &c,
        "POST",
        &format!("http://{}/v1/models/digits:classify", app.data_addr),
        &[],
        "{}",
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]
        .as_str()
        .unwrap()
        .contains(":predict only"));
    // Still serving.
    let r = send(
        &c,
        "POST",
        &tf,
        &[],
        &json!({ "instances": [row] }).to_string(),
    )
    .await;
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_503_and_is_counted() {
    // One batch of 8 rows may wait; a 5-row request waits a minute for company.
    let app = app(
        "builtin:digits_mlp",
        "{max_batch_size: 8, batch_timeout_micros: 60000000, num_batch_threads: 1, max_enqueued_batches: 1}",
    )
    .await;
    let url = format!("http://{}/v1/models/digits:predict", app.data_addr);
    let rows = |n: usize| json!({ "instances": vec![vec![0.0f32; 64]; n] }).to_string();
    let waiting = {
        let (url, body) = (url.clone(), rows(5));
        tokio::spawn(async move { send(&client(), "POST", &url, &[], &body).await })
    };
    let queued = r#"switchyard_local_queued_rows{model="digits"}"#;
    for _ in 0..500 {
        if sample(&metrics(app.admin_addr).await, queued) == Some(5.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let r = send(&client(), "POST", &url, &[], &rows(4)).await;
    assert_eq!(r.status, 503, "{:?}", r.body);
    assert!(r.json()["error"]
        .as_str()
        .unwrap()
        .contains("queue is full"));
    // Three rows fill the batch: both waiting requests are answered.
    let r = send(&client(), "POST", &url, &[], &rows(3)).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        waiting.await.unwrap().json()["predictions"]
            .as_array()
            .unwrap()
            .len(),
        5
    );
    let m = metrics(app.admin_addr).await;
    assert_eq!(
        sample(&m, r#"switchyard_local_shed_total{model="digits"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(&m, r#"switchyard_local_batch_size_count{model="digits"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(&m, r#"switchyard_local_batch_size_sum{model="digits"}"#),
        Some(8.0)
    );
    assert_eq!(
        sample(
            &m,
            r#"switchyard_requests_total{class="5xx",model="digits",variant="cpu"}"#
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_variant_and_a_remote_one_share_a_split() {
    let remote = Upstream::echo("remote").await;
    let app = start(&format!(
        r#"
seed: 7
models:
  digits:
    variants:
      - {{name: remote, upstream: "{}", weight: 1}}
      - {{name: cpu, local: {{model: "builtin:digits_mlp"}}, weight: 1}}
"#,
        remote.url()
    ))
    .await;
    let c = client();
    let url = format!("http://{}/v1/models/digits:predict", app.data_addr);
    let body = json!({ "instances": [vec![0.0f32; 64]] }).to_string();
    let mut seen = std::collections::HashMap::new();
    for _ in 0..200 {
        let r = send(&c, "POST", &url, &[], &body).await;
        assert_eq!(r.status, 200);
        let v = r.header("x-switchyard-variant").unwrap().to_string();
        if v == "cpu" {
            assert_eq!(r.json()["predictions"][0].as_array().unwrap().len(), 10);
        } else {
            assert_eq!(r.json()["upstream"], "remote");
        }
        *seen.entry(v).or_insert(0) += 1;
    }
    assert!(within_5_sigma(seen["cpu"], 200, 0.5), "{seen:?}");
    assert_eq!(remote.hits(), seen["remote"]);
}

#[test]
fn a_missing_model_file_is_a_config_error_with_its_line() {
    let dir = std::env::temp_dir().join(format!("switchyard-local-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("c.yaml");
    std::fs::write(&cfg, "models:\n  d:\n    variants:\n      - name: x\n        weight: 1\n        local:\n          model: /nonexistent/model.onnx\n").unwrap();
    for cmd in [vec!["validate"], vec!["serve", "--config"]] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(&cmd)
            .arg(&cfg)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{cmd:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(":7:18: models.d.variants[0].local.model: cannot read model file"),
            "{err}"
        );
    }
    // A file that exists but is not a model fails when serve loads it, the same way.
    let junk = dir.join("junk.onnx");
    std::fs::write(&junk, b"definitely not onnx").unwrap();
    std::fs::write(&cfg, format!("listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\nmodels:\n  d:\n    variants:\n      - name: x\n        weight: 1\n        local:\n          model: {}\n", junk.display())).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("models.d.variants[0].local.model: cannot load model"));
}

/// Starts `switchyard model-server` with `args` on free ports.
fn model_server(args: &[&str]) -> (std::process::Child, String) {
    let mut all = vec![
        "model-server",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ];
    all.extend_from_slice(args);
    spawn_switchyard(all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_server_serves_a_file_and_injects_failures_on_request() {
    let body = json!({ "instances": [vec![0.0f32; 64]] }).to_string();
    let (mut ok, addr) = model_server(&[
        "--model",
        "models/digits_cnn.onnx",
        "--name",
        "cnn",
        "--delay",
        "1ms",
    ]);
    let r = send(
        &client(),
        "POST",
        &format!("http://{addr}/v1/models/cnn:predict"),
        &[],
        &body,
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json()["predictions"][0].as_array().unwrap().len(), 10);
    ok.kill().unwrap();
    let _ = ok.wait();

    let (mut failing, addr) =
        model_server(&["--model", "builtin:digits_mlp", "--failure-rate", "1"]);
    let r = send(
        &client(),
        "POST",
        &format!("http://{addr}/v1/models/digits:predict"),
        &[],
        &body,
    )
    .await;
    assert_eq!(r.status, 500);
    assert!(r.json()["error"]
        .as_str()
        .unwrap()
        .contains("injected failure"));
    // Metadata is not a prediction: it still answers.
    let r = send(
        &client(),
        "GET",
        &format!("http://{addr}/v2/models/digits"),
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, 200);
    failing.kill().unwrap();
    let _ = failing.wait();
}

#[test]
fn model_server_flags_are_validated_like_config() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args([
            "model-server",
            "--model",
            "builtin:nope",
            "--failure-rate",
            "2",
            "--delay",
            "5",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for expected in [
        "--model: no built-in model `nope`",
        "--failure-rate: must be between 0 and 1",
        "--delay: ",
        "has no unit",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in {err}");
    }
    assert!(
        !err.contains("variants["),
        "config paths instead of flags: {err}"
    );

    // A knob of the other runtime, and a bad model name, are named by their flags too.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args([
            "model-server",
            "--model",
            "builtin:digits_mlp",
            "--gpu-adapter",
            "any",
            "--name",
            "a/b",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--gpu-adapter: applies to `runtime: wgpu` only"),
        "{err}"
    );
    assert!(err.contains("--name: "), "{err}");
}

/// Posts the first `n` test digits to `app`'s model `digits` (TF Serving rows) and
/// checks the answer against onnxruntime's outputs for `key` (`mlp` or `cnn`).
async fn predict_first_digits(app: &switchyard::Running, n: usize, key: &str) -> Reply {
    let v = vectors();
    let body = json!({ "instances": v["inputs"].as_array().unwrap()[..n] }).to_string();
    let r = send(
        &client(),
        "POST",
        &format!("http://{}/v1/models/digits:predict", app.data_addr),
        &[],
        &body,
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let want = Value::Array(v[key].as_array().unwrap()[..n].to_vec());
    close(&floats(&r.json()["predictions"]), &floats(&want));
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_built_in_config_serves_digits_with_the_bundled_mlp() {
    // What `switchyard serve` runs without --config (on free ports here).
    let app = start(switchyard::DEFAULT_CONFIG).await;
    predict_first_digits(&app, 5, "mlp").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_wgpu_serves_the_same_answers_on_a_gpu_or_without_one() {
    // In CI the only Vulkan device is software (lavapipe), which serving does not take
    // for a GPU: the model falls back to the CPU with a log line, and answers the same.
    let app = start(
        "models:\n  digits:\n    variants:\n      - name: gpu\n        weight: 1\n        local:\n          model: builtin:digits_cnn\n          runtime: wgpu\n",
    )
    .await;
    let r = predict_first_digits(&app, 8, "cnn").await;
    assert_eq!(r.header("x-switchyard-variant"), Some("gpu"));
}

// Built without the `gpu` feature, `runtime: wgpu` always serves on the CPU.
#[cfg(feature = "gpu")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_adapter_any_runs_the_gpu_kernels_on_software_vulkan_and_batches() {
    // `gpu_adapter: any` takes Mesa's lavapipe (what CI has): the GPU kernels then serve
    // over HTTP, concurrent requests share batches, and the answers still match
    // onnxruntime. The runtime gauge says the GPU path ran, not a silent CPU fallback.
    let app = start(
        "models:\n  digits:\n    variants:\n      - name: gpu\n        weight: 1\n        local:\n          model: builtin:digits_cnn\n          runtime: wgpu\n          gpu_adapter: any\n          batching: {max_batch_size: 32, batch_timeout_micros: 20000, num_batch_threads: 1}\n",
    )
    .await;
    let v = vectors();
    let inputs = v["inputs"].as_array().unwrap().clone();
    let want = v["cnn"].as_array().unwrap().clone();
    let c = client();
    let url = format!("http://{}/v1/models/digits:predict", app.data_addr);
    let requests = 48;
    let mut tasks = Vec::new();
    for image in &inputs[..requests] {
        let (c, url) = (c.clone(), url.clone());
        let body = json!({ "instances": [image] }).to_string();
        tasks.push(tokio::spawn(async move {
            send(&c, "POST", &url, &[], &body).await
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200, "{:?}", r.body);
        close(
            &floats(&r.json()["predictions"]),
            &floats(&Value::Array(vec![want[i].clone()])),
        );
    }
    let m = metrics(app.admin_addr).await;
    assert_eq!(
        sample(
            &m,
            r#"switchyard_local_runtime_info{model="digits",runtime="wgpu"}"#
        ),
        Some(1.0),
        "the GPU kernels did not run (install mesa-vulkan-drivers, as scripts/test does):\n{m}"
    );
    let count = sample(&m, r#"switchyard_local_batch_size_count{model="digits"}"#).unwrap();
    assert!(
        count < requests as f64,
        "{requests} concurrent requests ran as {count} batches: none were shared"
    );
}

fn gzip(bytes: &[u8]) -> Bytes {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(bytes).unwrap();
    Bytes::from(e.finish().unwrap())
}

fn zlib(bytes: &[u8]) -> Bytes {
    use std::io::Write;
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    Bytes::from(e.finish().unwrap())
}

/// `Content-Encoding: gzip | deflate` bodies reach a local variant inflated and get the
/// same answers as plain ones; `Accept-Encoding` compresses the answer; a body that
/// inflates past `max_body_bytes` is a 413 (a 20 KB zip bomb of 20 MiB), a corrupt one a
/// 400, an unknown coding a 415; the variant keeps serving. A remote variant gets the
/// compressed bytes and the headers untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_bodies_are_inflated_for_local_variants_and_passed_through_for_remote() {
    let up = Upstream::echo("remote").await;
    let app = start(&format!(
        "max_body_bytes: 1048576\nmodels:\n  digits:\n    variants:\n      - {{name: cpu, weight: 1, local: {{model: \"builtin:digits_mlp\"}}}}\n  far:\n    variants:\n      - {{name: r, weight: 1, upstream: \"{}\"}}\n",
        up.url()
    ))
    .await;
    let c = client();
    let v2 = format!("http://{}/v2/models/digits/infer", app.data_addr);
    let tf = format!("http://{}/v1/models/digits:predict", app.data_addr);
    let row: Vec<f32> = (0..64).map(|i| (i % 17) as f32).collect();
    let v2_body = json!({ "inputs": [{ "name": "pixels", "shape": [1, 64], "datatype": "FP32", "data": row }] }).to_string();
    let tf_body = json!({ "instances": [row] }).to_string();
    let plain_v2 = send(&c, "POST", &v2, &[], &v2_body).await;
    let plain_tf = send(&c, "POST", &tf, &[], &tf_body).await;
    assert_eq!((plain_v2.status, plain_tf.status), (200, 200));
    for (url, body, plain, coding, packed) in [
        (&v2, &v2_body, &plain_v2, "gzip", gzip(v2_body.as_bytes())),
        (
            &tf,
            &tf_body,
            &plain_tf,
            "deflate",
            zlib(tf_body.as_bytes()),
        ),
    ] {
        let r = send_bytes(&c, "POST", url, &[("content-encoding", coding)], packed).await;
        assert_eq!(r.status, 200, "{coding}: {:?}", r.body);
        assert_eq!(
            r.json()["outputs"],
            plain.json()["outputs"],
            "{coding} {body}"
        );
        assert_eq!(
            r.json()["predictions"],
            plain.json()["predictions"],
            "{coding}"
        );
    }
    // Answers compressed when asked.
    let r = send(
        &c,
        "POST",
        &v2,
        &[("accept-encoding", "gzip, deflate")],
        &v2_body,
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-encoding"), Some("gzip"));
    let mut text = String::new();
    std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&r.body[..]), &mut text)
        .unwrap();
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(answer["outputs"], plain_v2.json()["outputs"]);
    // A 20 MiB bomb in about 20 KB, a corrupt body, an unknown coding.
    let bomb = gzip(&vec![b' '; 20 << 20]);
    assert!(bomb.len() < 100_000, "{}", bomb.len());
    let r = send_bytes(&c, "POST", &v2, &[("content-encoding", "gzip")], bomb).await;
    assert_eq!(r.status, 413, "{:?}", r.body);
    let r = send_bytes(
        &c,
        "POST",
        &v2,
        &[("content-encoding", "gzip")],
        Bytes::from_static(b"not gzip at all"),
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("not valid gzip"),
        "{:?}",
        r.body
    );
    let r = send(&c, "POST", &v2, &[("content-encoding", "br")], &v2_body).await;
    assert_eq!(r.status, 415);
    assert!(r.json()["error"].as_str().unwrap().contains("`br`"));
    assert_eq!(
        send(&c, "POST", &v2, &[], &v2_body).await.status,
        200,
        "still serving"
    );
    // The remote variant: the compressed bytes and both headers as sent.
    let packed = gzip(v2_body.as_bytes());
    let r = send_bytes(
        &c,
        "POST",
        &format!("http://{}/v2/models/far/infer", app.data_addr),
        &[("content-encoding", "gzip"), ("accept-encoding", "gzip")],
        packed.clone(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-encoding"),
        None,
        "the upstream's answer, untouched"
    );
    let seen = r.json();
    assert_eq!(seen["content_encoding"], "gzip");
    assert_eq!(seen["accept_encoding"], "gzip");
    assert_eq!(seen["body_len"], packed.len());
    app.shutdown();
    app.wait().await;
}

/// Little-endian f32s from `bytes`.
fn le_floats(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// The V2 binary tensor extension on a local variant: binary inputs (FP32 and FP64,
/// batch 1 and 32) give the JSON answer's values; binary outputs come after the JSON
/// with `Inference-Header-Content-Length`; requested outputs and classification are
/// honoured, an unknown output is a 400, a missing version a 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_tensors_requested_outputs_and_versions_on_a_local_variant() {
    let app = app("builtin:digits_mlp", "{max_batch_size: 32}").await;
    let c = client();
    let url = format!("http://{}/v2/models/digits/infer", app.data_addr);
    let v = vectors();
    let inputs = v["inputs"].as_array().unwrap();
    for rows in [1usize, 32] {
        let pixels: Vec<f32> = inputs[..rows].iter().flat_map(floats).collect();
        let plain = send(&c, "POST", &url, &[], &json!({ "inputs": [{ "name": "pixels", "datatype": "FP32", "shape": [rows, 64], "data": pixels }] }).to_string()).await;
        assert_eq!(plain.status, 200, "{:?}", plain.body);
        let want = floats(&plain.json()["outputs"][0]["data"]);
        for (datatype, raw) in [
            (
                "FP32",
                pixels
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect::<Vec<u8>>(),
            ),
            (
                "FP64",
                pixels
                    .iter()
                    .flat_map(|x| f64::from(*x).to_le_bytes())
                    .collect(),
            ),
        ] {
            for binary_out in [false, true] {
                let head = json!({
                    "id": "req-7",
                    "inputs": [{ "name": "pixels", "datatype": datatype, "shape": [rows, 64], "parameters": { "binary_data_size": raw.len() } }],
                    "outputs": [{ "name": "probabilities", "parameters": { "binary_data": binary_out } }],
                })
                .to_string();
                let mut body = head.clone().into_bytes();
                body.extend_from_slice(&raw);
                let r = send_bytes(
                    &c,
                    "POST",
                    &url,
                    &[
                        ("inference-header-content-length", &head.len().to_string()),
                        ("content-type", "application/octet-stream"),
                    ],
                    Bytes::from(body),
                )
                .await;
                assert_eq!(r.status, 200, "{datatype} {rows}: {:?}", r.body);
                let got = match r.header("inference-header-content-length") {
                    Some(n) => {
                        assert!(binary_out);
                        let n: usize = n.parse().unwrap();
                        let answer: Value = serde_json::from_slice(&r.body[..n]).unwrap();
                        assert_eq!(answer["id"], "req-7");
                        assert_eq!(answer["outputs"][0]["shape"], json!([rows, 10]));
                        assert_eq!(
                            answer["outputs"][0]["parameters"]["binary_data_size"],
                            json!(rows * 40)
                        );
                        le_floats(&r.body[n..])
                    }
                    None => {
                        assert!(!binary_out);
                        floats(&r.json()["outputs"][0]["data"])
                    }
                };
                close(&got, &want);
            }
        }
    }
    // Classification: the top 3 per row, as Triton writes them.
    let row = floats(&inputs[0]);
    let r = send(
        &c,
        "POST",
        &url,
        &[],
        &json!({
            "inputs": [{ "name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": row }],
            "outputs": [{ "name": "probabilities", "parameters": { "classification": 3 } }],
        })
        .to_string(),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let out = &r.json()["outputs"][0];
    assert_eq!(
        (out["datatype"].clone(), out["shape"].clone()),
        (json!("BYTES"), json!([1, 3]))
    );
    let label = v["labels"][0].as_u64().unwrap();
    let top = out["data"][0].as_str().unwrap();
    assert!(
        top.ends_with(&format!(":{label}")),
        "{top} for label {label}"
    );
    // An output the model does not have; a version it does not serve.
    let r = send(
        &c,
        "POST",
        &url,
        &[],
        &json!({
            "inputs": [{ "name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": row }],
            "outputs": [{ "name": "logits" }],
        })
        .to_string(),
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]
        .as_str()
        .unwrap()
        .contains("unknown output `logits`"));
    let body = json!({ "inputs": [{ "name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": row }] }).to_string();
    let r = send(
        &c,
        "POST",
        &format!(
            "http://{}/v2/models/digits/versions/99/infer",
            app.data_addr
        ),
        &[],
        &body,
    )
    .await;
    assert_eq!(r.status, 404, "{:?}", r.body);
    let r = send(
        &c,
        "POST",
        &format!("http://{}/v2/models/digits/versions/1/infer", app.data_addr),
        &[],
        &body,
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    app.shutdown();
    app.wait().await;
}

/// Triton's configuration and statistics extensions answered by a local variant from
/// its signature, batching options and counters; `/v2` lists the extensions; the
/// repository index lists the models; other extension paths are forwarded to a remote
/// variant with the model name rewritten, with their method and body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_stats_and_extensions_are_answered_locally_and_forwarded_remotely() {
    let up = Upstream::echo("remote").await;
    let app = start(&format!(
        "models:\n  digits:\n    variants:\n      - {{name: cpu, weight: 1, local: {{model: \"builtin:digits_mlp\", batching: {{max_batch_size: 8, num_batch_threads: 2}}}}}}\n  far:\n    variants:\n      - {{name: r, weight: 1, upstream: \"{}\", upstream_model: triton_name}}\n",
        up.url()
    ))
    .await;
    let c = client();
    let base = format!("http://{}", app.data_addr);
    let config = send(
        &c,
        "GET",
        &format!("{base}/v2/models/digits/config"),
        &[],
        "",
    )
    .await;
    assert_eq!(config.status, 200);
    let config = config.json();
    assert_eq!(config["name"], "digits");
    assert_eq!(config["max_batch_size"], 8);
    assert_eq!(
        config["input"][0],
        json!({ "name": "pixels", "data_type": "TYPE_FP32", "dims": [64] })
    );
    assert_eq!(
        config["output"][0],
        json!({ "name": "probabilities", "data_type": "TYPE_FP32", "dims": [10] })
    );
    assert_eq!(config["instance_group"][0]["count"], 2);
    let row: Vec<f32> = (0..64).map(|i| (i % 17) as f32).collect();
    let two = json!({ "inputs": [{ "name": "pixels", "datatype": "FP32", "shape": [2, 64], "data": [row.clone(), row.clone()] }] }).to_string();
    for _ in 0..3 {
        assert_eq!(
            send(
                &c,
                "POST",
                &format!("{base}/v2/models/digits/infer"),
                &[],
                &two
            )
            .await
            .status,
            200
        );
    }
    let bad = json!({ "inputs": [{ "name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": [1] }] }).to_string();
    assert_eq!(
        send(
            &c,
            "POST",
            &format!("{base}/v2/models/digits/infer"),
            &[],
            &bad
        )
        .await
        .status,
        400
    );
    let stats = send(
        &c,
        "GET",
        &format!("{base}/v2/models/digits/stats"),
        &[],
        "",
    )
    .await
    .json();
    let s = &stats["model_stats"][0];
    assert_eq!(s["name"], "digits");
    assert_eq!(s["inference_count"], 6, "{s}");
    let executions = s["execution_count"].as_u64().unwrap();
    assert!((1..=3).contains(&executions), "{s}");
    assert_eq!(s["inference_stats"]["success"]["count"], 3, "{s}");
    assert_eq!(s["inference_stats"]["fail"]["count"], 1, "{s}");
    assert_eq!(s["inference_stats"]["queue"]["count"], 3, "{s}");
    assert!(
        s["inference_stats"]["compute_infer"]["ns"]
            .as_u64()
            .unwrap()
            > 0,
        "{s}"
    );
    assert!(
        s["inference_stats"]["success"]["ns"].as_u64()
            >= s["inference_stats"]["compute_infer"]["ns"].as_u64(),
        "{s}"
    );
    // Server metadata lists what local variants implement.
    let meta = send(&c, "GET", &format!("{base}/v2"), &[], "").await.json();
    let ext: Vec<&str> = meta["extensions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    for e in [
        "binary_tensor_data",
        "classification",
        "model_configuration",
        "statistics",
    ] {
        assert!(ext.contains(&e), "{ext:?}");
    }
    let index = send(
        &c,
        "POST",
        &format!("{base}/v2/repository/index"),
        &[],
        "{}",
    )
    .await
    .json();
    let mut names: Vec<&str> = index
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["digits", "far"]);
    // A local variant has no trace settings to give.
    assert_eq!(
        send(
            &c,
            "GET",
            &format!("{base}/v2/models/digits/trace/setting"),
            &[],
            ""
        )
        .await
        .status,
        404
    );
    // Remote: forwarded, the name rewritten, method and body kept.
    for (method, path, want, body) in [
        (
            "GET",
            "/v2/models/far/config",
            "/v2/models/triton_name/config",
            "",
        ),
        (
            "GET",
            "/v2/models/far/versions/3/stats",
            "/v2/models/triton_name/versions/3/stats",
            "",
        ),
        (
            "POST",
            "/v2/models/far/trace/setting",
            "/v2/models/triton_name/trace/setting",
            r#"{"trace_level":["TIMESTAMPS"]}"#,
        ),
        (
            "POST",
            "/v2/repository/models/far/load",
            "/v2/repository/models/triton_name/load",
            "{}",
        ),
    ] {
        let r = send(&c, method, &format!("{base}{path}"), &[], body).await;
        assert_eq!(r.status, 200, "{path}: {:?}", r.body);
        assert_eq!(r.json()["path"], want, "{path}");
        assert_eq!(r.json()["method"], method, "{path}");
        assert_eq!(r.json()["body_len"], body.len(), "{path}");
    }
    app.shutdown();
    app.wait().await;
}

/// Where the time goes: a local variant's `server-timing` names its queue, compute and
/// respond phases, a remote one's its upstream; each is counted per phase in
/// `switchyard_phase_duration_seconds`, and `/admin/numbers` gives the means.
#[tokio::test]
async fn phases_are_timed_per_variant() {
    let remote = Upstream::echo("remote").await;
    let app = start(&format!(
        "models:\n  l:\n    variants:\n      - {{name: cpu, weight: 1, local: {{model: \"builtin:digits_mlp\"}}}}\n  r:\n    variants:\n      - {{name: up, weight: 1, upstream: \"{}\"}}\n",
        remote.url()
    ))
    .await;
    let c = client();
    let digit = json!({ "instances": [vec![0.0; 64]] }).to_string();
    let names = |timing: &str| -> Vec<String> {
        timing
            .split(", ")
            .map(|p| p.split(';').next().unwrap().to_string())
            .collect()
    };
    for _ in 0..3 {
        let r = send(
            &c,
            "POST",
            &format!("http://{}/v1/models/l:predict", app.data_addr),
            &[],
            &digit,
        )
        .await;
        assert_eq!(r.status, 200);
        let timing = r.header("server-timing").unwrap();
        assert_eq!(
            names(timing),
            ["routing", "upstream", "queue", "compute", "respond", "total"],
            "{timing}"
        );
    }
    let r = predict(&c, &format!("http://{}/v1/models/r:predict", app.data_addr)).await;
    assert_eq!(
        names(r.header("server-timing").unwrap()),
        ["routing", "upstream", "total"]
    );
    let m = metrics(app.admin_addr).await;
    let count = |model: &str, phase: &str, variant: &str| {
        sample(
            &m,
            &format!(
                "switchyard_phase_duration_seconds_count{{model=\"{model}\",phase=\"{phase}\",variant=\"{variant}\"}}"
            ),
        )
    };
    for phase in ["route", "queue", "compute", "respond"] {
        assert_eq!(count("l", phase, "cpu"), Some(3.0), "{phase}");
    }
    assert_eq!(count("l", "upstream", "cpu"), Some(0.0));
    assert_eq!(count("r", "upstream", "up"), Some(1.0));
    assert_eq!(count("r", "compute", "up"), Some(0.0));
}
