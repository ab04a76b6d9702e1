//! The CPU runtime against onnxruntime's outputs on the bundled test vectors, against
//! tract's plan on generated graphs (feature `tract`), what a build without tract
//! refuses, and the batcher's semantics.

use std::sync::Arc;
use std::time::Duration;

mod common;

use prometheus::Registry;
use switchyard_inference::batcher::LocalMetricFamilies;
use switchyard_inference::onnx as pb;
use switchyard_inference::{
    builtin, Batcher, BatchingOptions, Dim, InferenceError, Kernels, OnnxModel,
};

/// The CPU runtime with `kernels` against onnxruntime.
fn check(name: &str, bytes: &[u8], batch: usize, kernels: Kernels) {
    let model = OnnxModel::from_bytes_with(name, bytes, kernels).unwrap();
    assert_eq!(
        model.is_fused(),
        kernels == Kernels::Auto,
        "{name}: which kernels run"
    );
    common::check_against_onnxruntime(name, batch, |input, rows| model.run(input, rows).unwrap());
}

/// The kernels this build has: the fused ones, and tract's plan with the `tract` feature.
fn kernels() -> Vec<Kernels> {
    let mut all = vec![Kernels::Auto];
    if cfg!(feature = "tract") {
        all.push(Kernels::TractOnly);
    }
    all
}

#[test]
fn mlp_matches_onnxruntime_batch_1_and_64() {
    for kernels in kernels() {
        check("mlp", builtin::DIGITS_MLP, 1, kernels);
        check("mlp", builtin::DIGITS_MLP, 64, kernels);
    }
}

#[test]
fn cnn_matches_onnxruntime_batch_1_and_64() {
    for kernels in kernels() {
        check("cnn", builtin::DIGITS_CNN, 1, kernels);
        check("cnn", builtin::DIGITS_CNN, 64, kernels);
    }
}

/// A one-node ONNX graph `y = Softplus(x)`, x: [N, 4]: an operator outside the fused set.
fn softplus_model() -> Vec<u8> {
    one_node_model("Softplus", common::graphs::value_info("x", 4))
}

/// A one-node graph `y = op(x)`, `y` shaped `[N, 4]`.
fn one_node_model(op: &str, input: pb::ValueInfoProto) -> Vec<u8> {
    common::graphs::encode(pb::GraphProto {
        name: "one node".into(),
        node: vec![pb::NodeProto {
            input: vec!["x".into()],
            output: vec!["y".into()],
            op_type: op.into(),
            ..Default::default()
        }],
        input: vec![input],
        output: vec![common::graphs::value_info("y", 4)],
        ..Default::default()
    })
}

#[cfg(feature = "tract")]
#[test]
fn an_operator_outside_the_fused_set_runs_on_tract() {
    let model = OnnxModel::from_bytes("softplus", &softplus_model()).unwrap();
    assert!(!model.is_fused());
    let out = model.run(vec![0.0, 1.0, -1.0, 40.0], 1).unwrap();
    // ln(1 + eˣ)
    let want = [std::f32::consts::LN_2, 1.313_261_7, 0.313_261_7, 40.0];
    for (g, w) in out.iter().zip(want) {
        assert!((g - w).abs() < 1e-5, "{out:?}");
    }
}

/// In a build with tract, tract loads only what the fused kernels do not run: a fused
/// graph is served from its declared signature with no tract plan (no second copy of
/// its weights), as a build without tract serves it; `cpu_kernels: tract` and a graph
/// outside the fused set get tract's plan. The served signature is the same either way.
#[cfg(feature = "tract")]
#[test]
fn tract_loads_only_what_the_fused_kernels_do_not_run() {
    use switchyard_inference::Kernels;
    for bytes in [builtin::DIGITS_MLP, builtin::DIGITS_CNN] {
        let fused = OnnxModel::from_bytes("m", bytes).unwrap();
        assert!(fused.is_fused() && !fused.has_tract_plan());
        let tract = OnnxModel::from_bytes_with("m", bytes, Kernels::TractOnly).unwrap();
        assert!(!tract.is_fused() && tract.has_tract_plan());
        assert_eq!(fused.signature(), tract.signature());
    }
    let outside = OnnxModel::from_bytes("softplus", &softplus_model()).unwrap();
    assert!(outside.has_tract_plan());
}

/// Without tract, a graph outside the fused set is refused at load, and the message
/// names the operator and the feature that would run it.
#[cfg(not(feature = "tract"))]
#[test]
fn an_operator_outside_the_fused_set_is_refused_without_tract() {
    let err = OnnxModel::from_bytes("softplus", &softplus_model()).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, InferenceError::Unsupported { .. }), "{text}");
    assert!(text.contains("`Softplus`"), "{text}");
    assert!(text.contains("--features tract"), "{text}");
    let err = OnnxModel::from_bytes_with("mlp", builtin::DIGITS_MLP, Kernels::TractOnly)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cpu_kernels: tract") && err.contains("--features tract"),
        "{err}"
    );
}

/// What the served signature allows is the same with and without tract: these are
/// refused by both readers (tract's, and the declared shapes a build without it reads).
#[test]
fn a_fixed_batch_or_a_non_fp32_input_is_refused() {
    use pb::tensor_shape_proto::{dimension::Value as D, Dimension};
    let mut fixed = common::graphs::value_info("x", 4);
    let Some(pb::type_proto::Value::TensorType(t)) =
        fixed.r#type.as_mut().and_then(|t| t.value.as_mut())
    else {
        unreachable!("value_info builds a tensor type")
    };
    let mut int64 = t.clone();
    t.shape.as_mut().unwrap().dim[0] = Dimension {
        value: Some(D::DimValue(1)),
    };
    int64.elem_type = pb::INT64;
    let mut wrong_type = fixed.clone();
    wrong_type.r#type = Some(pb::TypeProto {
        value: Some(pb::type_proto::Value::TensorType(int64)),
    });
    for (what, input, needle) in [
        ("fixed batch", fixed, "fixed first dimension"),
        ("int64 input", wrong_type, "only FP32"),
    ] {
        let err = OnnxModel::from_bytes(what, &one_node_model("Relu", input)).unwrap_err();
        assert!(
            matches!(err, InferenceError::Unsupported { .. }) && err.to_string().contains(needle),
            "{what}: {err}"
        );
    }
}

#[test]
fn signature_is_read_from_the_model() {
    let m = OnnxModel::from_bytes("mlp", builtin::DIGITS_MLP).unwrap();
    let s = m.signature();
    assert_eq!(s.input.name, "pixels");
    assert_eq!(s.input.shape, vec![Dim::Batch, Dim::Fixed(64)]);
    assert_eq!(s.output.name, "probabilities");
    assert_eq!(s.output.shape, vec![Dim::Batch, Dim::Fixed(10)]);
    assert_eq!(s.input.datatype, "FP32");
    // With tract, the served signature is tract's reading; the declared one (what a
    // build without tract serves) must be the same for both bundled models.
    #[cfg(feature = "tract")]
    for (name, bytes) in [("mlp", builtin::DIGITS_MLP), ("cnn", builtin::DIGITS_CNN)] {
        let declared = switchyard_inference::model::declared_signature(name, bytes).unwrap();
        let tract = OnnxModel::from_bytes_with(name, bytes, Kernels::TractOnly).unwrap();
        assert_eq!(&declared, tract.signature(), "{name}");
    }
}

/// Weights shorter than their dims say (a truncated file, or data stored outside it):
/// refused at load, never indexed out of bounds. With tract, tract refuses them first.
#[test]
fn weights_that_disagree_with_their_dims_are_refused() {
    use prost::Message;
    for model in [builtin::DIGITS_MLP, builtin::DIGITS_CNN] {
        let original = switchyard_inference::onnx::decode(model).unwrap();
        let weights = original.graph.as_ref().unwrap().initializer.len();
        for (i, cut) in (0..weights).flat_map(|i| [(i, 4), (i, usize::MAX)]) {
            let mut proto = original.clone();
            let t = &mut proto.graph.as_mut().unwrap().initializer[i];
            if t.raw_data.is_empty() {
                t.float_data.pop();
                t.int64_data.pop();
            } else {
                let keep = t.raw_data.len().saturating_sub(cut);
                t.raw_data.truncate(keep);
            }
            let name = format!("initializer {i} cut by {cut}");
            let err = OnnxModel::from_bytes(&name, &proto.encode_to_vec())
                .map(|_| ())
                .expect_err(&name);
            assert!(
                matches!(
                    err,
                    InferenceError::Unsupported { .. } | InferenceError::Load { .. }
                ),
                "{name}: {err}"
            );
        }
    }
}

/// Damaged model files (seeded): 3,000 copies of the bundled models with bytes
/// flipped, cut short or spliced. Each loads or is refused with an error; none panics.
#[test]
fn damaged_model_files_never_panic() {
    let mut rng = common::graphs::Rng::new(7);
    let (mut loaded, mut refused) = (0, 0);
    for i in 0..3_000 {
        let original = if i % 2 == 0 {
            builtin::DIGITS_MLP
        } else {
            builtin::DIGITS_CNN
        };
        let mut bytes = original.to_vec();
        let what = match rng.int(0, 2) {
            0 => {
                for _ in 0..rng.int(1, 8) {
                    let at = rng.int(0, bytes.len() - 1);
                    bytes[at] ^= 1 << rng.int(0, 7);
                }
                "flipped"
            }
            1 => {
                bytes.truncate(rng.int(0, bytes.len() - 1));
                "cut"
            }
            _ => {
                let (from, to) = (rng.int(0, bytes.len() - 1), rng.int(0, bytes.len() - 1));
                let len = rng.int(1, 64).min(bytes.len() - from.max(to));
                bytes.copy_within(from..from + len, to);
                "spliced"
            }
        };
        let outcome = std::panic::catch_unwind(|| OnnxModel::from_bytes("damaged", &bytes));
        match outcome {
            Ok(Ok(_)) => loaded += 1,
            Ok(Err(_)) => refused += 1,
            Err(_) => panic!("copy {i} ({what}) panicked"),
        }
    }
    // Both ends exercised: flips inside the weights still load, most damage is refused.
    assert!(
        loaded > 300 && refused > 300,
        "{loaded} loaded, {refused} refused"
    );
    eprintln!("{loaded} loaded, {refused} refused");
}

#[test]
fn garbage_is_a_load_error_not_a_panic() {
    let err = OnnxModel::from_bytes("junk", b"not an onnx file").unwrap_err();
    assert!(matches!(err, InferenceError::Load { .. }), "{err}");
}

fn batcher(options: BatchingOptions) -> (Batcher, Registry) {
    let registry = Registry::new();
    let metrics = LocalMetricFamilies::new(&registry).unwrap().model("mlp");
    let model = Arc::new(OnnxModel::from_bytes("mlp", builtin::DIGITS_MLP).unwrap());
    (
        Batcher::start("mlp", model, options, metrics).unwrap(),
        registry,
    )
}

fn sample(registry: &Registry, family: &str, field: &str) -> f64 {
    let f = registry
        .gather()
        .into_iter()
        .find(|f| f.name() == family)
        .unwrap();
    let h = f.get_metric()[0].get_histogram();
    match field {
        "count" => h.get_sample_count() as f64,
        _ => h.get_sample_sum(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_batched_and_each_gets_its_own_rows() {
    // A long timeout: the batch runs because it is full, not because time passed.
    let (b, registry) = batcher(BatchingOptions {
        max_batch_size: 8,
        batch_timeout: Duration::from_secs(60),
        num_batch_threads: 1,
        max_enqueued_batches: 4,
    });
    let b = Arc::new(b);
    let inputs = common::rows(&common::vectors()["inputs"]);
    let direct = OnnxModel::from_bytes("mlp", builtin::DIGITS_MLP).unwrap();
    let mut tasks = Vec::new();
    for (i, n) in [(0usize, 3usize), (3, 1), (4, 4)] {
        let (b, input) = (b.clone(), inputs[i..i + n].concat());
        tasks.push(tokio::spawn(async move { b.infer(input, n).await }));
    }
    let mut at = 0;
    for t in tasks {
        let got = t.await.unwrap().unwrap();
        let n = got.len() / 10;
        let want = direct.run(inputs[at..at + n].concat(), n).unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-6);
        }
        at += n;
    }
    assert_eq!(
        sample(&registry, "switchyard_local_batch_size", "count"),
        1.0,
        "one batch"
    );
    assert_eq!(
        sample(&registry, "switchyard_local_batch_size", "sum"),
        8.0,
        "of 8 rows"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_request_runs_when_the_timeout_passes() {
    let (b, _r) = batcher(BatchingOptions {
        max_batch_size: 64,
        batch_timeout: Duration::from_millis(2),
        num_batch_threads: 2,
        max_enqueued_batches: 4,
    });
    let out = b.infer(vec![0.0; 64], 1).await.unwrap();
    assert_eq!(out.len(), 10);
    // A request larger than a whole batch still runs, alone.
    let out = b.infer(vec![1.0; 64 * 100], 100).await.unwrap();
    assert_eq!(out.len(), 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_sheds_with_overloaded_and_counts_it() {
    // Capacity: one batch of 8 rows. A 5-row request waits for company (long timeout);
    // 4 more rows would exceed the capacity and are refused; 3 rows fill the batch.
    let (b, registry) = batcher(BatchingOptions {
        max_batch_size: 8,
        batch_timeout: Duration::from_secs(60),
        num_batch_threads: 1,
        max_enqueued_batches: 1,
    });
    let b = Arc::new(b);
    let waiting = {
        let b = b.clone();
        tokio::spawn(async move { b.infer(vec![0.0; 64 * 5], 5).await })
    };
    wait_until_queued(&b, 5).await;
    let refused = b.infer(vec![0.0; 64 * 4], 4).await;
    assert!(
        matches!(refused, Err(InferenceError::Overloaded { .. })),
        "{refused:?}"
    );
    let fits = b.infer(vec![0.0; 64 * 3], 3).await.unwrap();
    assert_eq!(fits.len(), 30);
    assert_eq!(waiting.await.unwrap().unwrap().len(), 50);
    let shed = registry
        .gather()
        .into_iter()
        .find(|f| f.name() == "switchyard_local_shed_total")
        .unwrap();
    assert_eq!(shed.get_metric()[0].get_counter().get_value(), 1.0);
}

async fn wait_until_queued(b: &Batcher, rows: usize) {
    for _ in 0..1000 {
        if b.queued_rows() == rows {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("{rows} rows never queued");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_batcher_answers_everything_already_queued() {
    // The batch would wait 60 s for company; closing the queue runs it at once.
    let (b, _r) = batcher(BatchingOptions {
        max_batch_size: 64,
        batch_timeout: Duration::from_secs(60),
        num_batch_threads: 1,
        max_enqueued_batches: 4,
    });
    let pending = b.enqueue(vec![0.0; 64 * 2], 2).unwrap();
    wait_until_queued(&b, 2).await;
    tokio::task::spawn_blocking(move || drop(b)).await.unwrap();
    assert_eq!(pending.await.unwrap().values.len(), 20);
}

/// Runs `model` and tract's own plan of the same bytes on the same inputs (1, 7 and 33
/// rows); `Err` says where they part.
#[cfg(feature = "tract")]
fn against_tract(
    g: &common::graphs::Generated,
    rng: &mut common::graphs::Rng,
) -> Result<(), String> {
    let fused = OnnxModel::from_bytes_with("generated", &g.bytes, Kernels::Auto)
        .map_err(|e| format!("load: {e}"))?;
    if !fused.is_fused() {
        return Err("the graph is inside the fused set but did not compile onto it".into());
    }
    let tract = OnnxModel::from_bytes_with("generated", &g.bytes, Kernels::TractOnly)
        .map_err(|e| format!("tract load: {e}"))?;
    // The signature a build without tract serves, read from the declared shapes.
    let declared = switchyard_inference::model::declared_signature("generated", &g.bytes)
        .map_err(|e| format!("declared signature: {e}"))?;
    if &declared != tract.signature() {
        return Err(format!(
            "signatures: declared {declared:?}, tract {:?}",
            tract.signature()
        ));
    }
    for rows in [1, 7, 33] {
        let input = rng.floats(rows * g.input_len, 2.0);
        let a = fused.run(input.clone(), rows).map_err(|e| e.to_string())?;
        let b = tract.run(input, rows).map_err(|e| e.to_string())?;
        if a.len() != rows * g.output_len {
            return Err(format!("{} outputs for {rows} rows", a.len()));
        }
        common::graphs::close(&a, &b).map_err(|e| format!("{rows} rows: {e}"))?;
    }
    Ok(())
}

/// The fused CPU kernels against tract's own plan on 80 generated graphs inside their
/// operator set (40 MLPs, 40 CNNs; odd sizes, channel counts the AVX kernels take and
/// those left to im2col), within 1e-4.
/// The same on 60 generated graphs of the operators exporters add around the core set
/// (`MatMul` + bias `Add`/`Sub`, `BatchNormalization` folded into the layer before it,
/// `Sigmoid`, `Tanh`, `LeakyRelu`, `Identity`, `Dropout`).
#[cfg(feature = "tract")]
#[test]
fn fused_kernels_match_tracts_plan_on_the_wider_operator_set() {
    against_tract_on(2000..2060, |_, rng| common::graphs::wider(rng));
}

/// [`against_tract`] on the graph `generate` makes for each seed; every failure listed.
#[cfg(feature = "tract")]
fn against_tract_on(
    seeds: std::ops::Range<u64>,
    generate: impl Fn(u64, &mut common::graphs::Rng) -> common::graphs::Generated,
) {
    let mut failures = Vec::new();
    for seed in seeds {
        let mut rng = common::graphs::Rng::new(seed);
        let g = generate(seed, &mut rng);
        if let Err(e) = against_tract(&g, &mut rng) {
            failures.push(format!("seed {seed} ({}): {e}", g.story));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[cfg(feature = "tract")]
#[test]
fn fused_kernels_match_tracts_plan_on_generated_graphs() {
    against_tract_on(0..80, |seed, rng| {
        if seed % 2 == 0 {
            common::graphs::mlp(rng)
        } else {
            common::graphs::cnn(rng)
        }
    });
}
