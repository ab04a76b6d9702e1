//! The CPU runtime. tract loads and checks every model and builds one optimised plan
//! with a symbolic batch dimension, shared by every batch thread. When the whole graph
//! is made of operators the [`crate::fused`] kernels cover, those run instead (they are
//! several times faster on convolutions); otherwise tract's plan runs, and one log line
//! says which operator kept it there. Each thread keeps its own [`Session`] (scratch
//! state), so a batch costs no set-up.

use std::sync::Arc;

use tract_onnx::prelude::*;

use crate::error::InferenceError;
use crate::fused::{FusedPlan, FusedState};
use crate::signature::{Dim, Signature, TensorSpec};

type Plan = Arc<TypedRunnableModel>;

/// Which kernels run a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// The fused kernels when the graph allows, else tract's plan (the default).
    Auto,
    /// tract's plan only (for comparison and parity tests).
    TractOnly,
}

/// Every value of [`TractModel::runtime_name`].
pub const RUNTIME_NAMES: [&str; 3] = ["wgpu", "fused", "tract"];

/// A model loaded by tract, run by the fused kernels or tract's plan.
pub struct TractModel {
    name: String,
    plan: Plan,
    fused: Option<FusedPlan>,
    #[cfg(feature = "gpu")]
    gpu: Option<Arc<crate::gpu::GpuModel>>,
    signature: Signature,
}

impl std::fmt::Debug for TractModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TractModel")
            .field("name", &self.name)
            .field("signature", &self.signature)
            .finish()
    }
}

impl TractModel {
    /// Loads and optimises an ONNX model from bytes. `name` is for messages.
    pub fn from_bytes(name: &str, bytes: &[u8]) -> Result<Self, InferenceError> {
        Self::from_bytes_with(name, bytes, Kernels::Auto)
    }

    /// True when the fused kernels run this model.
    pub fn is_fused(&self) -> bool {
        self.fused.is_some()
    }

    /// What runs this model: `wgpu` (the GPU kernels), `fused` (the fused CPU kernels)
    /// or `tract` (tract's plan).
    pub fn runtime_name(&self) -> &'static str {
        let [wgpu, fused, tract] = RUNTIME_NAMES;
        if self.is_gpu() {
            wgpu
        } else if self.is_fused() {
            fused
        } else {
            tract
        }
    }

    /// As [`TractModel::from_bytes`], choosing the kernels.
    pub fn from_bytes_with(
        name: &str,
        bytes: &[u8],
        kernels: Kernels,
    ) -> Result<Self, InferenceError> {
        let load = |detail: String| InferenceError::Load {
            model: name.to_string(),
            detail,
        };
        let model = tract_onnx::onnx()
            .model_for_read(&mut &bytes[..])
            .map_err(|e| load(format!("{e:#}")))?;
        let typed = model.into_typed().map_err(|e| load(format!("{e:#}")))?;
        let signature = signature_of(name, &typed)?;
        // tract's graph rewrites have bugs of their own (a stride-2 convolution with a
        // 1-wide kernel after a Reshape fails its declutter pass: found by the generated
        // graphs in tests/tract_parity.rs). The model is still valid: tract then runs it
        // as typed, unoptimised, and says so, instead of refusing to load it.
        let plan = match typed
            .clone()
            .into_decluttered()
            .and_then(|m| m.into_optimized())
            .and_then(|m| m.into_runnable())
        {
            Ok(plan) => plan,
            Err(e) => {
                tracing::warn!(model = %name, error = %format!("{e:#}"), "tract's optimiser failed on this graph; tract's plan runs it unoptimised (slower).");
                typed.into_runnable().map_err(|e| load(format!("{e:#}")))?
            }
        };
        let fused = match kernels {
            Kernels::TractOnly => None,
            Kernels::Auto => match FusedPlan::from_onnx(bytes) {
                Ok(f) => {
                    tracing::info!(model = %name, "Model runs on the fused CPU kernels.");
                    Some(f)
                }
                Err(why) => {
                    tracing::info!(model = %name, reason = %why.0, "Model runs on tract's plan: outside the fused kernel set.");
                    None
                }
            },
        };
        Ok(TractModel {
            name: name.to_string(),
            plan,
            fused,
            #[cfg(feature = "gpu")]
            gpu: None,
            signature,
        })
    }

    /// Moves the model onto the GPU (feature `gpu`) when its graph is within the fused
    /// kernel set and an adapter is found; otherwise it stays on the CPU, with one log
    /// line saying why. Returns whether it moved.
    #[cfg(feature = "gpu")]
    pub fn use_gpu(&mut self, options: crate::gpu::GpuOptions) -> bool {
        let Some(plan) = &self.fused else {
            tracing::warn!(model = %self.name, "runtime wgpu: the graph is outside the GPU kernel set (see the log line above); it runs on the CPU.");
            return false;
        };
        match crate::gpu::GpuModel::new(plan, options) {
            Ok(g) => {
                tracing::info!(model = %self.name, adapter = %g.adapter(), "Model runs on the GPU.");
                self.gpu = Some(Arc::new(g));
                true
            }
            Err(why) => {
                tracing::warn!(model = %self.name, reason = %why, "runtime wgpu: no usable GPU; the model runs on the CPU.");
                false
            }
        }
    }

    /// The GPU adapter batches run on (`DeviceType `name` (driver)`), if any.
    #[cfg(feature = "gpu")]
    pub fn gpu_adapter(&self) -> Option<&str> {
        self.gpu.as_deref().map(crate::gpu::GpuModel::adapter)
    }

    /// True when batches run on the GPU.
    pub fn is_gpu(&self) -> bool {
        #[cfg(feature = "gpu")]
        return self.gpu.is_some();
        #[cfg(not(feature = "gpu"))]
        false
    }

    /// The model's signature.
    pub fn signature(&self) -> &Signature {
        &self.signature
    }

    /// Runs `rows` rows laid out contiguously in `input` with a fresh run state; returns
    /// the output rows, also contiguous. Blocking and CPU-bound: never call it from an
    /// async worker. Batch threads hold a [`Session`] instead, to reuse their state.
    pub fn run(&self, input: Vec<f32>, rows: usize) -> Result<Vec<f32>, InferenceError> {
        self.session()?.run(input, rows)
    }

    /// A run state for one thread: scratch buffers kept from batch to batch.
    pub fn session(&self) -> Result<Session, InferenceError> {
        #[cfg(feature = "gpu")]
        if let Some(gpu) = &self.gpu {
            return Ok(Session {
                kind: SessionKind::Gpu(gpu.clone()),
                row_shape: Vec::new(),
            });
        }
        if let Some(fused) = &self.fused {
            return Ok(Session {
                kind: SessionKind::Fused(fused.clone(), FusedState::default()),
                row_shape: Vec::new(),
            });
        }
        let state = self
            .plan
            .spawn()
            .map_err(|e| InferenceError::Run(format!("{e:#}")))?;
        let row_shape = self.signature.input.shape[1..]
            .iter()
            .map(|d| match d {
                Dim::Fixed(n) => *n,
                Dim::Batch => 1,
            })
            .collect();
        Ok(Session {
            kind: SessionKind::Tract(Box::new(state)),
            row_shape,
        })
    }
}

enum SessionKind {
    Tract(Box<TypedSimpleState>),
    Fused(FusedPlan, FusedState),
    #[cfg(feature = "gpu")]
    Gpu(Arc<crate::gpu::GpuModel>),
}

/// One thread's run state over a shared plan.
pub struct Session {
    kind: SessionKind,
    row_shape: Vec<usize>,
}

impl Session {
    /// Runs `rows` contiguous rows; returns the contiguous output rows.
    pub fn run(&mut self, input: Vec<f32>, rows: usize) -> Result<Vec<f32>, InferenceError> {
        let state = match &mut self.kind {
            SessionKind::Fused(plan, state) => return Ok(plan.run(state, input, rows)),
            #[cfg(feature = "gpu")]
            SessionKind::Gpu(gpu) => return gpu.run(&input, rows),
            SessionKind::Tract(state) => state,
        };
        let mut shape = Vec::with_capacity(self.row_shape.len() + 1);
        shape.push(rows);
        shape.extend_from_slice(&self.row_shape);
        let tensor = Tensor::from_shape(&shape, &input)
            .map_err(|e| InferenceError::BadInput(format!("{e:#}")))?;
        let outputs = state
            .run(tvec!(tensor.into()))
            .map_err(|e| InferenceError::Run(format!("{e:#}")))?;
        let out = outputs
            .into_iter()
            .next()
            .ok_or_else(|| InferenceError::Run("the model produced no output".into()))?;
        let view = out
            .to_plain_array_view::<f32>()
            .map_err(|e| InferenceError::Run(format!("{e:#}")))?;
        Ok(view.iter().copied().collect())
    }
}

fn signature_of(name: &str, model: &TypedModel) -> Result<Signature, InferenceError> {
    let unsupported = |detail: String| InferenceError::Unsupported {
        model: name.to_string(),
        detail,
    };
    if model.inputs.len() != 1 || model.outputs.len() != 1 {
        return Err(unsupported(format!(
            "it has {} inputs and {} outputs; one FP32 input and one FP32 output are served",
            model.inputs.len(),
            model.outputs.len()
        )));
    }
    let spec = |outlet: OutletId, name: String| -> Result<TensorSpec, InferenceError> {
        let fact = model
            .outlet_fact(outlet)
            .map_err(|e| unsupported(format!("{e:#}")))?;
        if fact.datum_type != f32::datum_type() {
            return Err(unsupported(format!(
                "tensor `{name}` is {:?}; only FP32 is served",
                fact.datum_type
            )));
        }
        let mut shape = Vec::new();
        for (i, d) in fact.shape.iter().enumerate() {
            match (i, d.to_i64()) {
                (0, Err(_)) => shape.push(Dim::Batch),
                (0, Ok(_)) => {
                    return Err(unsupported(format!(
                        "tensor `{name}` has a fixed first dimension; a symbolic batch dimension is needed"
                    )))
                }
                (_, Ok(n)) if n > 0 => shape.push(Dim::Fixed(n as usize)),
                _ => {
                    return Err(unsupported(format!(
                        "tensor `{name}` has a symbolic dimension other than the batch"
                    )))
                }
            }
        }
        if shape.is_empty() {
            return Err(unsupported(format!("tensor `{name}` is a scalar")));
        }
        Ok(TensorSpec {
            name,
            shape,
            datatype: "FP32",
        })
    };
    let input = model.inputs[0];
    let output = model.outputs[0];
    let input_name = model.node(input.node).name.clone();
    let output_name = model
        .outlet_label(output)
        .map(str::to_string)
        .unwrap_or_else(|| model.node(output.node).name.clone());
    Ok(Signature {
        input: spec(input, input_name)?,
        output: spec(output, output_name)?,
    })
}
