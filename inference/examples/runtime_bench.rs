//! Times one model on the CPU runtime, one thread, at a given batch size, the way
//! `scripts/bench_onnxruntime.py` times onnxruntime: warm up, then run batches of the
//! bundled test inputs for a fixed time and report the median time per batch.
//!
//! cargo run --release -p switchyard-inference --features tract --example runtime_bench -- MODEL.onnx BATCH [SECONDS] [auto|tract]
//!
//! `auto` (default) runs the fused kernels when the graph allows; `tract` forces tract's plan
//! (build with `--features tract`);
//! `gpu` runs the wgpu kernels on a hardware adapter (build with `--features gpu`; exits 3
//! without one); `gpu-any` also accepts a software one (lavapipe), for rehearsals.

use std::time::{Duration, Instant};

use switchyard_inference::{Kernels, OnnxModel};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: runtime_bench MODEL.onnx BATCH [SECONDS]");
        std::process::exit(2);
    }
    let path = &args[1];
    let batch: usize = args[2].parse().expect("BATCH is a number");
    let seconds: f64 = args
        .get(3)
        .map_or(2.0, |s| s.parse().expect("SECONDS is a number"));
    let (kernels, gpu) = match args.get(4).map(String::as_str) {
        None | Some("auto") => (Kernels::Auto, None),
        Some("tract") => (Kernels::TractOnly, None),
        Some("gpu") => (Kernels::Auto, Some(false)),
        Some("gpu-any") => (Kernels::Auto, Some(true)),
        Some(other) => panic!("unknown kernels `{other}`: auto, tract, gpu or gpu-any"),
    };
    let bytes = std::fs::read(path).expect("model file");
    #[allow(unused_mut)]
    let mut model = OnnxModel::from_bytes_with(path, &bytes, kernels).expect("model loads");
    if let Some(allow_cpu_adapter) = gpu {
        #[cfg(feature = "gpu")]
        {
            let options = switchyard_inference::gpu::GpuOptions {
                allow_cpu_adapter,
                ..Default::default()
            };
            if !model.use_gpu(options) {
                // Say why (use_gpu logs it; this example has no log subscriber).
                let why = switchyard_inference::fused::FusedPlan::from_onnx(&bytes)
                    .map_err(|e| format!("{e:?}"))
                    .and_then(|plan| {
                        switchyard_inference::gpu::GpuModel::new(&plan, options)
                            .map(|_| "it opened on a second try".to_string())
                            .map_err(|e| e.to_string())
                    });
                eprintln!("no usable GPU adapter: {}", why.unwrap_or_else(|e| e));
                std::process::exit(3);
            }
        }
        #[cfg(not(feature = "gpu"))]
        {
            let _ = allow_cpu_adapter;
            eprintln!("built without the `gpu` feature");
            std::process::exit(3);
        }
    }
    let runtime = model.runtime_name();
    #[cfg(feature = "gpu")]
    let adapter = model.gpu_adapter().unwrap_or("none").replace('"', "'");
    #[cfg(not(feature = "gpu"))]
    let adapter = "none";
    let row = model.signature().input.row_len();
    // Compiled in, so the binary runs anywhere (a GPU machine gets only the binary).
    let vectors: serde_json::Value =
        serde_json::from_str(include_str!("../../models/digits_test_vectors.json")).expect("json");
    let inputs: Vec<f32> = vectors["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .cycle()
        .take(batch)
        .flat_map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
        })
        .collect();
    assert_eq!(inputs.len(), batch * row);
    let mut session = model.session().expect("session");
    // Fewer warm-up runs for the large batches a GPU is measured at.
    for _ in 0..(200_000 / batch.max(1)).clamp(3, 200) {
        session.run(inputs.clone(), batch).expect("run");
    }
    let mut times = Vec::new();
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    while Instant::now() < end {
        let input = inputs.clone();
        let t = Instant::now();
        let out = session.run(input, batch).expect("run");
        times.push(t.elapsed().as_secs_f64());
        std::hint::black_box(out);
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2] * 1e6;
    println!(
        "{{\"runtime\": \"{runtime}\", \"adapter\": \"{adapter}\", \"model\": \"{path}\", \"batch\": {batch}, \"runs\": {}, \"median_us\": {median:.2}}}",
        times.len()
    );
}
