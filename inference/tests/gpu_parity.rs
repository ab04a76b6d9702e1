//! The GPU runtime (feature `gpu`) against onnxruntime's outputs on the bundled test
//! vectors. CI has no GPU: it runs these on Mesa's software Vulkan (lavapipe), which the
//! test allows explicitly; serving never picks a CPU adapter on its own.
#![cfg(feature = "gpu")]

mod common;

use switchyard_inference::fused::FusedPlan;
use switchyard_inference::gpu::{GpuModel, GpuOptions};
use switchyard_inference::{builtin, OnnxModel};

/// `plan` on the GPU, a software adapter allowed; at most `max_rows` per command buffer.
fn gpu(plan: &FusedPlan, max_rows: Option<usize>) -> GpuModel {
    GpuModel::new(
        plan,
        GpuOptions {
            allow_cpu_adapter: true,
            max_rows,
            ..Default::default()
        },
    )
    .unwrap()
}

fn on_gpu(name: &str, bytes: &[u8]) -> OnnxModel {
    let mut model = OnnxModel::from_bytes(name, bytes).unwrap();
    let moved = model.use_gpu(GpuOptions {
        allow_cpu_adapter: true,
        ..Default::default()
    });
    assert!(
        moved,
        "{name}: no Vulkan adapter at all; install Mesa's software Vulkan \
         (apt-get install mesa-vulkan-drivers), as scripts/test does"
    );
    assert!(model.is_gpu());
    model
}

#[test]
fn mlp_on_the_gpu_matches_onnxruntime_batch_1_64_and_all() {
    let model = on_gpu("mlp", builtin::DIGITS_MLP);
    // 360 rows at once also exercises growing the buffers past their first capacity.
    for batch in [1, 64, 360] {
        common::check_against_onnxruntime("mlp", batch, |input, rows| {
            model.run(input, rows).unwrap()
        });
    }
}

#[test]
fn cnn_on_the_gpu_matches_onnxruntime_batch_1_64_and_all() {
    let model = on_gpu("cnn", builtin::DIGITS_CNN);
    for batch in [1, 64, 360] {
        common::check_against_onnxruntime("cnn", batch, |input, rows| {
            model.run(input, rows).unwrap()
        });
    }
}

#[test]
fn a_batch_past_the_device_limit_runs_in_parts() {
    // Buffers are sized per batch; past the device's limits a batch runs as several
    // command buffers. A ceiling of 50 rows makes 360 rows seven parts (the last
    // short), against onnxruntime's outputs row by row.
    for (name, bytes) in [("mlp", builtin::DIGITS_MLP), ("cnn", builtin::DIGITS_CNN)] {
        let gpu = gpu(&FusedPlan::from_onnx(bytes).unwrap(), Some(50));
        assert_eq!(gpu.max_rows(), 50);
        common::check_against_onnxruntime(name, 360, |input, rows| gpu.run(&input, rows).unwrap());
    }
}

#[test]
fn a_software_adapter_is_not_a_gpu_unless_asked_for() {
    // On a machine whose only Vulkan device is lavapipe (CI), serving stays on the CPU.
    let mut model = OnnxModel::from_bytes("mlp", builtin::DIGITS_MLP).unwrap();
    let has_hardware = model.use_gpu(GpuOptions::default());
    if has_hardware {
        // Some GPU was taken: it must not be a software one.
        let adapter = model.gpu_adapter().unwrap();
        assert!(!adapter.starts_with("Cpu"), "{adapter}");
    } else {
        assert!(!model.is_gpu());
        assert_eq!(model.run(vec![0.0; 64], 1).unwrap().len(), 10);
    }
}

#[test]
fn steps_the_plan_folds_away_still_match_onnxruntime_on_the_gpu() {
    // The bundled models' plans fold the input scaling and the CNN's Flatten into Gemm
    // weights; other graphs keep those steps, so their kernels are run here unfolded.
    for (name, bytes) in [("mlp", builtin::DIGITS_MLP), ("cnn", builtin::DIGITS_CNN)] {
        let gpu = gpu(&FusedPlan::from_onnx_unfolded(bytes).unwrap(), None);
        common::check_against_onnxruntime(name, 64, |input, rows| gpu.run(&input, rows).unwrap());
    }
}

/// The GPU kernels against tract's own plan (or, in a build without tract, the fused
/// CPU kernels, which tests/runtime.rs holds to tract's plan) on 45 generated graphs
/// inside their set (MLPs, CNNs and the wider operator set at odd sizes; the same
/// generators as the CPU parity tests), within 1e-4.
#[test]
fn gpu_kernels_match_the_cpu_on_generated_graphs() {
    use common::graphs;
    use switchyard_inference::Kernels;
    let mut failures = Vec::new();
    for seed in 1000..1045u64 {
        let mut rng = graphs::Rng::new(seed);
        let g = match seed % 3 {
            0 => graphs::mlp(&mut rng),
            1 => graphs::cnn(&mut rng),
            _ => graphs::wider(&mut rng),
        };
        let plan = FusedPlan::from_onnx(&g.bytes).unwrap_or_else(|e| panic!("seed {seed}: {e:?}"));
        let gpu = gpu(&plan, None);
        let reference = if cfg!(feature = "tract") {
            Kernels::TractOnly
        } else {
            Kernels::Auto
        };
        let cpu = OnnxModel::from_bytes_with("generated", &g.bytes, reference).unwrap();
        for rows in [1, 7, 33] {
            let input = rng.floats(rows * g.input_len, 2.0);
            let a = gpu.run(&input, rows).unwrap();
            let b = cpu.run(input, rows).unwrap();
            if let Err(e) = graphs::close(&a, &b) {
                failures.push(format!("seed {seed} ({}), {rows} rows: {e}", g.story));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
