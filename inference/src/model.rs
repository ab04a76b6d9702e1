//! A local model and what runs it. When the whole graph is made of operators the
//! [`crate::fused`] kernels cover, those run it (several times faster than tract's plan
//! on convolutions). With the `tract` feature, tract also loads and checks every model
//! and builds one optimised plan with a symbolic batch dimension, shared by every batch
//! thread, which runs any graph the fused kernels do not cover (one log line says which
//! operator kept it there). Without it, such a graph is refused at load with that
//! operator named. Each thread keeps its own [`Session`] (scratch state), so a batch
//! costs no set-up.

#[cfg(any(feature = "tract", feature = "gpu"))]
use std::sync::Arc;

#[cfg(feature = "tract")]
use tract_onnx::prelude::*;

use crate::error::InferenceError;
use crate::fused::{FusedPlan, FusedState, Unsupported};
use crate::onnx;
use crate::signature::{Dim, Signature, TensorSpec};

#[cfg(feature = "tract")]
type Plan = Arc<TypedRunnableModel>;

/// Which kernels run a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// The fused kernels when the graph allows, else tract's plan (the default).
    Auto,
    /// tract's plan only (for comparison and parity tests); refused by a build without
    /// the `tract` feature.
    TractOnly,
}

/// Every value of [`OnnxModel::runtime_name`].
pub const RUNTIME_NAMES: [&str; 3] = ["wgpu", "fused", "tract"];

/// A model loaded from ONNX, run by the GPU kernels, the fused CPU kernels or tract's
/// plan.
pub struct OnnxModel {
    name: String,
    /// tract's plan: loaded only for what the fused kernels do not run.
    #[cfg(feature = "tract")]
    plan: Option<Plan>,
    fused: Option<FusedPlan>,
    #[cfg(feature = "gpu")]
    gpu: Option<Arc<crate::gpu::GpuModel>>,
    signature: Signature,
}

impl std::fmt::Debug for OnnxModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnnxModel")
            .field("name", &self.name)
            .field("signature", &self.signature)
            .finish()
    }
}

impl OnnxModel {
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

    /// As [`OnnxModel::from_bytes`], choosing the kernels.
    pub fn from_bytes_with(
        name: &str,
        bytes: &[u8],
        kernels: Kernels,
    ) -> Result<Self, InferenceError> {
        let proto = onnx::decode(bytes)
            .map_err(|e| InferenceError::load(name, format!("not an ONNX model: {e}")))?;
        let fused = match kernels {
            Kernels::TractOnly => Err(Unsupported("`cpu_kernels: tract` chosen".into())),
            Kernels::Auto => FusedPlan::from_proto(&proto),
        };
        #[cfg(feature = "tract")]
        {
            // A graph the fused kernels run is served as a build without tract serves
            // it (its declared signature, no tract plan): the same model the same way
            // whichever features, and no second copy of its weights in tract's form.
            // Only what they do not run (or a signature only tract can infer) is
            // loaded into tract.
            let declared = fused.as_ref().ok().and_then(|plan| {
                declared_ends(name, &proto)
                    .and_then(|(input, output)| signature_of_fused(name, input, output, plan))
                    .ok()
            });
            match (fused, declared) {
                (Ok(plan), Some(signature)) => Ok(Self::on_fused(name, plan, signature)),
                (fused, _) => Self::with_tract(name, bytes, fused),
            }
        }
        #[cfg(not(feature = "tract"))]
        {
            let unsupported = |detail: String| InferenceError::Unsupported {
                model: name.to_string(),
                detail,
            };
            let outside = |why: Unsupported| {
                unsupported(format!(
                    "{} is outside the fused CPU kernels, and this build leaves out tract, \
                     which runs any graph: build Switchyard with `--features tract`",
                    why.0
                ))
            };
            if kernels == Kernels::TractOnly {
                return Err(unsupported(
                    "`cpu_kernels: tract` needs tract, which this build leaves out: \
                     build Switchyard with `--features tract`"
                        .into(),
                ));
            }
            // The signature first: a graph with two inputs is told so, not that the
            // fused kernels take one.
            let (input, output) = declared_ends(name, &proto)?;
            let fused = fused.map_err(outside)?;
            let signature = signature_of_fused(name, input, output, &fused)?;
            Ok(Self::on_fused(name, fused, signature))
        }
    }

    /// A model the fused kernels run, served with `signature` (read from its declared
    /// ends), with no tract plan in either build.
    fn on_fused(name: &str, fused: FusedPlan, signature: Signature) -> Self {
        tracing::info!(model = %name, "Model runs on the fused CPU kernels.");
        OnnxModel {
            name: name.to_string(),
            #[cfg(feature = "tract")]
            plan: None,
            fused: Some(fused),
            #[cfg(feature = "gpu")]
            gpu: None,
            signature,
        }
    }

    /// Loads the model into tract as well: its plan runs what the fused kernels do not,
    /// and its signature is the one served. tract panics on some damaged files (a
    /// flipped byte made it look up a missing key: tests/runtime.rs,
    /// `damaged_model_files_never_panic`); that is a load error here, not the end of a
    /// process that is loading or reloading its configuration.
    #[cfg(feature = "tract")]
    fn with_tract(
        name: &str,
        bytes: &[u8],
        fused: Result<FusedPlan, Unsupported>,
    ) -> Result<Self, InferenceError> {
        std::panic::catch_unwind(|| Self::load_tract(name, bytes, fused)).unwrap_or_else(|panic| {
            Err(InferenceError::load(
                name,
                format!(
                    "tract failed reading the file: {}",
                    crate::batcher::panic_message(&*panic)
                ),
            ))
        })
    }

    #[cfg(feature = "tract")]
    fn load_tract(
        name: &str,
        bytes: &[u8],
        fused: Result<FusedPlan, Unsupported>,
    ) -> Result<Self, InferenceError> {
        let load = |detail: String| InferenceError::load(name, detail);
        let model = tract_onnx::onnx()
            .model_for_read(&mut &bytes[..])
            .map_err(|e| load(format!("{e:#}")))?;
        let typed = model.into_typed().map_err(|e| load(format!("{e:#}")))?;
        let signature = signature_of(name, &typed)?;
        // tract's graph rewrites have bugs of their own (a stride-2 convolution with a
        // 1-wide kernel after a Reshape fails its declutter pass: found by the generated
        // graphs in tests/runtime.rs). The model is still valid: tract then runs it
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
        let fused = match fused {
            Ok(f) => {
                tracing::info!(model = %name, "Model runs on the fused CPU kernels.");
                Some(f)
            }
            Err(why) => {
                tracing::info!(model = %name, reason = %why.0, "Model runs on tract's plan.");
                None
            }
        };
        Ok(OnnxModel {
            name: name.to_string(),
            plan: Some(plan),
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

    /// Whether tract's plan was loaded (only for a graph outside the fused kernels, or
    /// `cpu_kernels: tract`).
    #[cfg(feature = "tract")]
    #[doc(hidden)]
    pub fn has_tract_plan(&self) -> bool {
        self.plan.is_some()
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
                #[cfg(feature = "tract")]
                row_shape: Vec::new(),
            });
        }
        if let Some(fused) = &self.fused {
            return Ok(Session {
                kind: SessionKind::Fused(fused.clone(), FusedState::default()),
                #[cfg(feature = "tract")]
                row_shape: Vec::new(),
            });
        }
        #[cfg(not(feature = "tract"))]
        return Err(InferenceError::Run(
            "no kernels for this model (a build without tract loads only fused graphs)".into(),
        ));
        #[cfg(feature = "tract")]
        self.tract_session()
    }

    #[cfg(feature = "tract")]
    fn tract_session(&self) -> Result<Session, InferenceError> {
        let plan = self.plan.as_ref().ok_or_else(|| {
            InferenceError::Run("no kernels for this model (neither fused nor tract's)".into())
        })?;
        let state = plan
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
    #[cfg(feature = "tract")]
    Tract(Box<TypedSimpleState>),
    Fused(FusedPlan, FusedState),
    #[cfg(feature = "gpu")]
    Gpu(Arc<crate::gpu::GpuModel>),
}

/// One thread's run state over a shared plan.
pub struct Session {
    kind: SessionKind,
    /// A row's shape, for tract's input tensor.
    #[cfg(feature = "tract")]
    row_shape: Vec<usize>,
}

impl Session {
    /// Runs `rows` contiguous rows; returns the contiguous output rows.
    pub fn run(&mut self, input: Vec<f32>, rows: usize) -> Result<Vec<f32>, InferenceError> {
        match &mut self.kind {
            SessionKind::Fused(plan, state) => Ok(plan.run(state, input, rows)),
            #[cfg(feature = "gpu")]
            SessionKind::Gpu(gpu) => gpu.run(&input, rows),
            #[cfg(feature = "tract")]
            SessionKind::Tract(state) => run_tract(state, &self.row_shape, input, rows),
        }
    }
}

#[cfg(feature = "tract")]
fn run_tract(
    state: &mut TypedSimpleState,
    row_shape: &[usize],
    input: Vec<f32>,
    rows: usize,
) -> Result<Vec<f32>, InferenceError> {
    let mut shape = Vec::with_capacity(row_shape.len() + 1);
    shape.push(rows);
    shape.extend_from_slice(row_shape);
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

#[cfg(feature = "tract")]
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

/// The signature of a model the fused kernels run, read from the graph as the file
/// declares it, without tract: what a build without tract serves. The same rules as
/// tract's reading (`signature_of`): one FP32 input and one FP32 output, a symbolic
/// batch dimension first, fixed sizes after it. The output's shape is the fused plan's
/// `[N, width]`; a shape the file declares must agree with it.
#[doc(hidden)]
pub fn declared_signature(name: &str, bytes: &[u8]) -> Result<Signature, InferenceError> {
    let proto = onnx::decode(bytes)
        .map_err(|e| InferenceError::load(name, format!("not an ONNX model: {e}")))?;
    let (input, output) = declared_ends(name, &proto)?;
    let fused = FusedPlan::from_proto(&proto).map_err(|why| InferenceError::Unsupported {
        model: name.to_string(),
        detail: why.0,
    })?;
    signature_of_fused(name, input, output, &fused)
}

/// The graph's one input (initializers listed as inputs, as older files do, left out)
/// and one output.
fn declared_ends<'p>(
    name: &str,
    proto: &'p onnx::ModelProto,
) -> Result<(&'p onnx::ValueInfoProto, &'p onnx::ValueInfoProto), InferenceError> {
    let unsupported = |detail: String| InferenceError::Unsupported {
        model: name.to_string(),
        detail,
    };
    let graph = proto
        .graph
        .as_ref()
        .ok_or_else(|| unsupported("the file has no graph".into()))?;
    let inputs: Vec<_> = graph
        .input
        .iter()
        .filter(|i| !graph.initializer.iter().any(|t| t.name == i.name))
        .collect();
    match (inputs.as_slice(), graph.output.as_slice()) {
        ([input], [output]) => Ok((input, output)),
        (i, o) => Err(unsupported(format!(
            "it has {} inputs and {} outputs; one FP32 input and one FP32 output are served",
            i.len(),
            o.len()
        ))),
    }
}

/// A declared input or output as a [`TensorSpec`] (FP32, symbolic first dimension),
/// and whether the file states its shape (when not, the spec's shape is `[N]`).
fn declared_spec(
    name: &str,
    value: &onnx::ValueInfoProto,
) -> Result<(TensorSpec, bool), InferenceError> {
    use onnx::tensor_shape_proto::dimension::Value as D;
    use onnx::type_proto::Value as T;
    let unsupported = |detail: String| InferenceError::Unsupported {
        model: name.to_string(),
        detail,
    };
    let tensor = &value.name;
    let Some(T::TensorType(t)) = value.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
        return Err(unsupported(format!("`{tensor}` is not a tensor")));
    };
    if t.elem_type != onnx::FLOAT {
        return Err(unsupported(format!(
            "tensor `{tensor}` has element type {}; only FP32 is served",
            t.elem_type
        )));
    }
    let Some(declared) = &t.shape else {
        let spec = TensorSpec {
            name: tensor.clone(),
            shape: vec![Dim::Batch],
            datatype: "FP32",
        };
        return Ok((spec, false));
    };
    let mut shape = Vec::with_capacity(declared.dim.len());
    for (i, d) in declared.dim.iter().enumerate() {
        match (i, &d.value) {
            (0, Some(D::DimParam(_)) | None) => shape.push(Dim::Batch),
            (0, Some(D::DimValue(_))) => {
                return Err(unsupported(format!(
                    "tensor `{tensor}` has a fixed first dimension; a symbolic batch dimension is needed"
                )))
            }
            (_, Some(D::DimValue(n))) if *n > 0 => shape.push(Dim::Fixed(*n as usize)),
            _ => {
                return Err(unsupported(format!(
                    "tensor `{tensor}` has a symbolic dimension other than the batch"
                )))
            }
        }
    }
    if shape.is_empty() {
        return Err(unsupported(format!("tensor `{tensor}` is a scalar")));
    }
    let spec = TensorSpec {
        name: tensor.clone(),
        shape,
        datatype: "FP32",
    };
    Ok((spec, true))
}

/// The signature of a graph the fused kernels compiled: see [`declared_signature`].
fn signature_of_fused(
    name: &str,
    input: &onnx::ValueInfoProto,
    output: &onnx::ValueInfoProto,
    fused: &FusedPlan,
) -> Result<Signature, InferenceError> {
    let (input, input_declared) = declared_spec(name, input)?;
    let (mut output, output_declared) = declared_spec(name, output)?;
    let width = vec![Dim::Batch, Dim::Fixed(fused.output_len)];
    if output_declared && output.shape != width {
        return Err(InferenceError::Unsupported {
            model: name.to_string(),
            detail: format!(
                "output `{}` is declared {:?} but computes {:?}",
                output.name,
                output.shape_i64(),
                [-1, fused.output_len as i64]
            ),
        });
    }
    output.shape = width;
    if !input_declared {
        return Err(InferenceError::Unsupported {
            model: name.to_string(),
            detail: format!("input `{}` has no shape", input.name),
        });
    }
    Ok(Signature { input, output })
}
