//! In-process inference for Switchyard: the sidecar's own model runtime.
//!
//! - [`signature`]: what a model takes and gives (names, shapes with a symbolic batch
//!   dimension, types).
//! - [`model`]: a loaded model ([`OnnxModel`]) and what runs it: the fused kernels,
//!   tract's plan (feature `tract`: any graph, one optimised plan shared by threads) or
//!   the GPU kernels.
//! - [`onnx`]: the part of ONNX's protobuf schema the fused kernels read.
//! - [`fused`]: fused CPU kernels (im2col convolution, matrix products, pooling,
//!   softmax) for graphs made only of the operators they cover: without the `tract`
//!   feature, the only CPU runtime.
//! - `direct`: AVX2 and AVX-512 kernels (direct convolution, dense layers, pooling,
//!   softmax) chosen at run time, used by `fused`.
//! - `gpu` (feature `gpu`): the fused plan's steps as WGSL compute kernels on wgpu
//!   (Vulkan), weights uploaded once, buffers reused; explicit adapter choice.
//! - [`batcher`]: dynamic batching with TF Serving's knobs (`max_batch_size`,
//!   `batch_timeout_micros`, `num_batch_threads`, `max_enqueued_batches`) on dedicated
//!   threads, so inference never runs on the async I/O workers; a full queue sheds load.
//! - [`builtin`]: the bundled digit classifiers, compiled into the binary.
//! - [`error`]: the crate's error type, [`InferenceError`].
// `unsafe` appears only in `direct`: calling its AVX2 / AVX-512 kernels after checking
// the CPU, their vector loads and stores, and matrixmultiply's sgemm.
#![deny(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod batcher;
pub mod builtin;
mod direct;
pub mod error;
pub mod fused;
#[cfg(feature = "gpu")]
pub mod gpu;
pub mod model;
pub mod onnx;
pub mod signature;

pub use batcher::{Batcher, BatchingOptions, Counted, LocalMetrics, NotServing, Output, Stats};
pub use error::InferenceError;
pub use model::{Kernels, OnnxModel};
pub use signature::{Dim, Signature, TensorSpec};
