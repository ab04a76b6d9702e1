//! In-process ONNX inference (tract on CPU, wgpu on GPU) with dynamic batching (issue #3).
//!
//! Not built yet: reserved so the workspace shows the architecture. The router's
//! `table::Backend` enum is where a local runtime will sit beside remote upstreams.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
