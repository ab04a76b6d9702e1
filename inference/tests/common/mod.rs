//! Shared by the parity tests: the bundled test vectors and the check against them.
#![allow(dead_code)]

pub mod graphs;

use serde_json::Value;

pub fn vectors() -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/digits_test_vectors.json"
    ))
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

pub fn manifest() -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../models/digits_models.json"
    ))
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

pub fn rows(v: &Value) -> Vec<Vec<f32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

pub fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0
}

/// Runs every test vector through `run` in batches of `batch` rows; checks each output
/// against onnxruntime's within 1e-4 and the accuracy against the training script's.
pub fn check_against_onnxruntime(
    name: &str,
    batch: usize,
    mut run: impl FnMut(Vec<f32>, usize) -> Vec<f32>,
) {
    let v = vectors();
    let inputs = rows(&v["inputs"]);
    let expected = rows(&v[name]);
    let labels: Vec<usize> = v["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_u64().unwrap() as usize)
        .collect();
    let mut worst = 0f32;
    let mut correct = 0;
    for (chunk_in, (chunk_out, chunk_labels)) in inputs
        .chunks(batch)
        .zip(expected.chunks(batch).zip(labels.chunks(batch)))
    {
        let flat: Vec<f32> = chunk_in.concat();
        let out = run(flat, chunk_in.len());
        assert_eq!(out.len(), chunk_in.len() * 10);
        for (i, want) in chunk_out.iter().enumerate() {
            let got = &out[i * 10..(i + 1) * 10];
            for (g, w) in got.iter().zip(want) {
                worst = worst.max((g - w).abs());
            }
            correct += usize::from(argmax(got) == chunk_labels[i]);
        }
    }
    assert!(
        worst <= 1e-4,
        "{name}, batch {batch}: max |ours - onnxruntime| = {worst}"
    );
    let accuracy = correct as f64 / labels.len() as f64;
    let reported = manifest()["models"][name]["test_accuracy"]
        .as_f64()
        .unwrap();
    assert!(
        (accuracy - reported).abs() < 1e-9,
        "{name}: accuracy {accuracy} vs script's {reported}"
    );
    assert!(labels.len() >= 300);
}
