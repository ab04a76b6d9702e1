//! The GPU runtime (feature `gpu`): the fused plan's steps (see [`crate::fused`]) run as
//! WGSL compute kernels through wgpu on Vulkan. The model has already been read and
//! checked and the fused compiler has lowered it to steps over numbered buffers, so
//! the operator whitelist is the fused one; a model outside it stays on the CPU.
//!
//! Weights and biases are uploaded once. Activation buffers are sized for a capacity
//! of rows (a power of two, at least 64) and reused from batch to batch; a larger batch
//! grows them, up to the rows the device's buffer limits allow for the widest buffer.
//! A batch is one command buffer (a batch past that ceiling, several in turn): write
//! the input, one dispatch per step, copy the output to a mappable buffer, wait, read.
//!
//! Floats cross to and from the GPU as their in-memory bytes (`bytemuck`): WGSL's
//! storage buffers are little-endian, as is every host wgpu's Vulkan backend runs on.
//!
//! Adapter choice is explicit and logged: a discrete GPU, else an integrated or virtual
//! one. A CPU adapter (Mesa's lavapipe) counts as no GPU unless the caller allows it
//! (the tests do, so CI checks the kernels without a GPU).

use std::sync::Mutex;

use wgpu::util::DeviceExt;

use crate::error::InferenceError;
use crate::fused::{Activation, FusedPlan, Step};

/// How to pick an adapter.
#[derive(Debug, Clone, Copy, Default)]
pub struct GpuOptions {
    /// Accept a software (CPU) Vulkan adapter such as lavapipe.
    pub allow_cpu_adapter: bool,
    /// Longest wait for the device to finish one batch (default [`DEFAULT_GPU_WAIT`]);
    /// past it the batch fails, so a hung device cannot hold a batch thread forever.
    pub max_wait: Option<std::time::Duration>,
    /// Most rows sent to the device in one command buffer; a larger batch runs as
    /// several in turn. Default (and ceiling): what the device's buffer and dispatch
    /// limits allow for this model's widest buffer.
    pub max_rows: Option<usize>,
}

/// The default of [`GpuOptions::max_wait`].
pub const DEFAULT_GPU_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Why the GPU runtime is not used.
#[derive(Debug, thiserror::Error)]
pub enum GpuUnavailable {
    /// No adapter of the accepted kinds.
    #[error("no GPU adapter ({0})")]
    NoAdapter(String),
    /// The device could not be created.
    #[error("cannot open the GPU adapter `{adapter}`: {detail}")]
    Device {
        /// The adapter's name.
        adapter: String,
        /// The error.
        detail: String,
    },
    /// One row of the model's widest buffer is larger than the device's buffer limit.
    #[error("one row needs {row_bytes} bytes in a buffer; the adapter `{adapter}` allows {limit}")]
    TooWide {
        /// The adapter's name.
        adapter: String,
        /// Bytes per row in the widest buffer.
        row_bytes: u64,
        /// The device's limit on one storage buffer.
        limit: u64,
    },
}

/// A model's steps on one GPU device.
pub struct GpuModel {
    device: wgpu::Device,
    queue: wgpu::Queue,
    adapter: String,
    kernels: Vec<Kernel>,
    /// Floats per row in each buffer.
    row_len: Vec<usize>,
    input_len: usize,
    output: usize,
    output_len: usize,
    state: Mutex<Option<Buffers>>,
    max_wait: std::time::Duration,
    /// Most rows in one command buffer (see [`GpuOptions::max_rows`]).
    max_rows: usize,
    /// Distance between two kernels' parameter slots: [`PARAM_BYTES`] rounded up to the
    /// device's uniform offset alignment.
    param_stride: u64,
}

impl std::fmt::Debug for GpuModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuModel")
            .field("adapter", &self.adapter)
            .field("steps", &self.kernels.len())
            .finish()
    }
}

/// One step: its pipeline, constants, dims and how many threads it needs per row.
struct Kernel {
    pipeline: wgpu::ComputePipeline,
    src: usize,
    dst: usize,
    weights: Option<wgpu::Buffer>,
    bias: Option<wgpu::Buffer>,
    /// Dims, rows excluded (`rows` is written into slot 0 at run time).
    dims: [u32; 15],
    floats: [f32; 4],
    shape: Dispatch,
}

#[derive(Clone, Copy)]
enum Dispatch {
    /// One thread per output element: `per_row` elements per row, 64 per workgroup.
    Elements { per_row: usize },
    /// Tiled matrix product: 16×16 outputs per workgroup over `[rows, m]`.
    Tiles { m: usize },
}

/// Buffers for a given row capacity.
struct Buffers {
    capacity: usize,
    values: Vec<wgpu::Buffer>,
    /// Every kernel's parameters, one slot of [`GpuModel::param_stride`] bytes each.
    params: wgpu::Buffer,
    /// The row count `params` were written for (0: not yet): they depend on nothing
    /// else, so a batch of the same size as the last writes none.
    params_rows: usize,
    groups: Vec<wgpu::BindGroup>,
    readback: wgpu::Buffer,
}

/// Bytes of one kernel's parameters (the WGSL struct `P`).
const PARAM_BYTES: u64 = 80;

const PRELUDE: &str = r#"
struct P { d0: vec4<u32>, d1: vec4<u32>, d2: vec4<u32>, d3: vec4<u32>, f: vec4<f32> }
@group(0) @binding(0) var<uniform> p: P;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;
fn flat(g: vec3<u32>, n: vec3<u32>) -> u32 { return g.x + g.y * n.x * 64u; }
"#;

/// `dst[i] = src[i] * mul + add`; d0.x = elements.
const AFFINE: &str = r#"
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) n: vec3<u32>) {
  let i = flat(g, n);
  if (i >= p.d0.x) { return; }
  dst[i] = src[i] * p.f.x + p.f.y;
}
"#;

/// d0 = (elements, c, h, w). NCHW rows to NHWC rows.
const TO_NHWC: &str = r#"
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) n: vec3<u32>) {
  let o = flat(g, n);
  if (o >= p.d0.x) { return; }
  let c = p.d0.y; let hw = p.d0.z * p.d0.w; let chw = c * hw;
  let b = o / chw; let r = o % chw; let px = r / c; let ch = r % c;
  dst[o] = src[b * chw + ch * hw + px];
}
"#;

/// d0 = (elements, c, h, w). NHWC rows to NCHW rows.
const TO_FLAT: &str = r#"
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) n: vec3<u32>) {
  let o = flat(g, n);
  if (o >= p.d0.x) { return; }
  let c = p.d0.y; let hw = p.d0.z * p.d0.w; let chw = c * hw;
  let b = o / chw; let r = o % chw; let ch = r / hw; let px = r % hw;
  dst[o] = src[b * chw + px * c + ch];
}
"#;

/// d0 = (elements). `max(x, 0)`.
const RELU: &str = r#"
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) n: vec3<u32>) {
  let i = flat(g, n);
  if (i >= p.d0.x) { return; }
  dst[i] = max(src[i], 0.0);
}
"#;

/// d0 = (elements, kind), f.x = alpha. Kind 0: sigmoid; 1: tanh; 2: leaky ReLU.
const ACTIVATION: &str = r#"
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) n: vec3<u32>) {
  let i = flat(g, n);
  if (i >= p.d0.x) { return; }
  let x = src[i];
  switch p.d0.y {
    case 0u: { dst[i] = 1.0 / (1.0 + exp(-x)); }
    case 1u: { dst[i] = tanh(x); }
    default: { dst[i] = select(p.f.x * x, x, x >= 0.0); }
  }
}
"#;

/// d0 = (rows, n). One thread per row.
const SOFTMAX: &str = r#"
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) n: vec3<u32>) {
  let r = flat(g, n);
  if (r >= p.d0.x) { return; }
  let cols = p.d0.y; let base = r * cols;
  var m = src[base];
  for (var j = 1u; j < cols; j++) { m = max(m, src[base + j]); }
  var s = 0.0;
  for (var j = 0u; j < cols; j++) { let e = exp(src[base + j] - m); dst[base + j] = e; s += e; }
  for (var j = 0u; j < cols; j++) { dst[base + j] = dst[base + j] / s; }
}
"#;

/// d0 = (elements, c, h, w), d1 = (k, s, oh, ow). NHWC, no padding.
const MAXPOOL: &str = r#"
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) n: vec3<u32>) {
  let o = flat(g, n);
  if (o >= p.d0.x) { return; }
  let c = p.d0.y; let h = p.d0.z; let w = p.d0.w;
  let k = p.d1.x; let s = p.d1.y; let oh = p.d1.z; let ow = p.d1.w;
  let ch = o % c; let pos = o / c; let ox = pos % ow; let oy = (pos / ow) % oh; let b = pos / (ow * oh);
  var m = -3.4028235e38;
  for (var ky = 0u; ky < k; ky++) {
    for (var kx = 0u; kx < k; kx++) {
      m = max(m, src[((b * h + oy * s + ky) * w + ox * s + kx) * c + ch]);
    }
  }
  dst[o] = m;
}
"#;

/// Weights and bias for the two kernels that have them.
const WEIGHTS: &str = r#"
@group(0) @binding(3) var<storage, read> wt: array<f32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;
"#;

/// d0 = (elements, c, h, w), d1 = (m, kh, kw, stride), d2 = (pad_top, pad_left, oh, ow),
/// d3.x = relu. NHWC in and out; weights `[kh·kw·C, M]`. One thread per output value.
const CONV: &str = r#"
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) g: vec3<u32>, @builtin(num_workgroups) n: vec3<u32>) {
  let o = flat(g, n);
  if (o >= p.d0.x) { return; }
  let c = p.d0.y; let h = i32(p.d0.z); let w = i32(p.d0.w);
  let mm = p.d1.x; let kh = p.d1.y; let kw = p.d1.z; let st = p.d1.w;
  let pt = i32(p.d2.x); let pl = i32(p.d2.y); let oh = p.d2.z; let ow = p.d2.w;
  let m = o % mm; let pos = o / mm; let ox = pos % ow; let oy = (pos / ow) % oh; let b = pos / (ow * oh);
  var acc = bias[m];
  for (var ky = 0u; ky < kh; ky++) {
    let iy = i32(oy * st + ky) - pt;
    if (iy < 0 || iy >= h) { continue; }
    for (var kx = 0u; kx < kw; kx++) {
      let ix = i32(ox * st + kx) - pl;
      if (ix < 0 || ix >= w) { continue; }
      let ib = ((b * u32(h) + u32(iy)) * u32(w) + u32(ix)) * c;
      let wb = (ky * kw + kx) * c;
      for (var ch = 0u; ch < c; ch++) {
        acc += src[ib + ch] * wt[(wb + ch) * mm + m];
      }
    }
  }
  if (p.d3.x == 1u) { acc = max(acc, 0.0); }
  dst[o] = acc;
}
"#;

/// d0 = (rows, k, m, relu). `[rows, k] × [k, m] + bias`, 16×16 tiles through workgroup
/// memory.
const GEMM: &str = r#"
var<workgroup> ta: array<array<f32, 16>, 16>;
var<workgroup> tb: array<array<f32, 16>, 16>;
@compute @workgroup_size(16, 16)
fn main(@builtin(global_invocation_id) g: vec3<u32>, @builtin(local_invocation_id) l: vec3<u32>) {
  let rows = p.d0.x; let k = p.d0.y; let m = p.d0.z;
  let r = g.y; let col = g.x;
  var acc = 0.0;
  let tiles = (k + 15u) / 16u;
  for (var t = 0u; t < tiles; t++) {
    let ka = t * 16u + l.x;
    let kb = t * 16u + l.y;
    ta[l.y][l.x] = select(0.0, src[r * k + ka], r < rows && ka < k);
    tb[l.y][l.x] = select(0.0, wt[kb * m + col], kb < k && col < m);
    workgroupBarrier();
    for (var i = 0u; i < 16u; i++) { acc += ta[l.y][i] * tb[i][l.x]; }
    workgroupBarrier();
  }
  if (r < rows && col < m) {
    var v = acc + bias[col];
    if (p.d0.w == 1u) { v = max(v, 0.0); }
    dst[r * m + col] = v;
  }
}
"#;

fn u(x: usize) -> u32 {
    u32::try_from(x).unwrap_or(u32::MAX)
}

impl GpuModel {
    /// Picks an adapter, opens it and uploads `plan`'s constants.
    pub fn new(plan: &FusedPlan, options: GpuOptions) -> Result<Self, GpuUnavailable> {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
            backends: wgpu::Backends::VULKAN,
            ..wgpu::InstanceDescriptor::new_without_display_handle()
        });
        let adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::VULKAN));
        let rank = |t: wgpu::DeviceType| match t {
            wgpu::DeviceType::DiscreteGpu => Some(0),
            wgpu::DeviceType::IntegratedGpu => Some(1),
            wgpu::DeviceType::VirtualGpu => Some(2),
            wgpu::DeviceType::Other => Some(3),
            wgpu::DeviceType::Cpu => options.allow_cpu_adapter.then_some(4),
        };
        let seen: Vec<String> = adapters
            .iter()
            .map(|a| {
                let i = a.get_info();
                format!("{:?} `{}`", i.device_type, i.name)
            })
            .collect();
        let adapter = adapters
            .into_iter()
            .filter_map(|a| rank(a.get_info().device_type).map(|r| (r, a)))
            .min_by_key(|(r, _)| *r)
            .map(|(_, a)| a)
            .ok_or_else(|| {
                GpuUnavailable::NoAdapter(if seen.is_empty() {
                    "Vulkan found no adapter".into()
                } else {
                    format!("Vulkan found only {}", seen.join(", "))
                })
            })?;
        let info = adapter.get_info();
        let name = format!("{:?} `{}` ({})", info.device_type, info.name, info.driver);
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("switchyard-inference"),
            required_limits: adapter.limits(),
            ..Default::default()
        }))
        .map_err(|e| GpuUnavailable::Device {
            adapter: name.clone(),
            detail: e.to_string(),
        })?;
        tracing::info!(adapter = %name, "GPU adapter opened (wgpu, Vulkan).");
        let mut row_len = vec![0; plan.buffers];
        row_len[0] = plan.input_len;
        let mut kernels = Vec::with_capacity(plan.steps.len());
        let shader = |body: &str, weights: bool| {
            let src = format!("{PRELUDE}{}{body}", if weights { WEIGHTS } else { "" });
            let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: None,
                source: wgpu::ShaderSource::Wgsl(src.into()),
            });
            device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: None,
                layout: None,
                module: &module,
                entry_point: Some("main"),
                compilation_options: Default::default(),
                cache: None,
            })
        };
        let upload = |data: &[f32]| {
            // A binding cannot be empty.
            let data = if data.is_empty() { &[0.0][..] } else { data };
            device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: None,
                contents: bytemuck::cast_slice(data),
                usage: wgpu::BufferUsages::STORAGE,
            })
        };
        for step in &plan.steps {
            let mut dims = [0u32; 15];
            let mut floats = [0f32; 4];
            let (pipeline, src, dst, len, weights, bias, shape) = match step {
                Step::Affine { src, dst, mul, add } => {
                    floats[0] = *mul;
                    floats[1] = *add;
                    let len = row_len[*src];
                    (
                        shader(AFFINE, false),
                        *src,
                        *dst,
                        len,
                        None,
                        None,
                        Dispatch::Elements { per_row: len },
                    )
                }
                Step::ToNhwc { src, dst, c, h, w } | Step::ToFlat { src, dst, c, h, w } => {
                    dims[..3].copy_from_slice(&[u(*c), u(*h), u(*w)]);
                    let body = if matches!(step, Step::ToNhwc { .. }) {
                        TO_NHWC
                    } else {
                        TO_FLAT
                    };
                    let len = c * h * w;
                    (
                        shader(body, false),
                        *src,
                        *dst,
                        len,
                        None,
                        None,
                        Dispatch::Elements { per_row: len },
                    )
                }
                Step::Relu { src, dst } => {
                    let len = row_len[*src];
                    (
                        shader(RELU, false),
                        *src,
                        *dst,
                        len,
                        None,
                        None,
                        Dispatch::Elements { per_row: len },
                    )
                }
                Step::Activation { src, dst, kind } => {
                    dims[0] = match kind {
                        Activation::Sigmoid => 0,
                        Activation::Tanh => 1,
                        Activation::LeakyRelu(alpha) => {
                            floats[0] = *alpha;
                            2
                        }
                    };
                    let len = row_len[*src];
                    (
                        shader(ACTIVATION, false),
                        *src,
                        *dst,
                        len,
                        None,
                        None,
                        Dispatch::Elements { per_row: len },
                    )
                }
                Step::Softmax { src, dst, n } => {
                    dims[0] = u(*n);
                    // One thread per row: the element count slot holds the row count.
                    (
                        shader(SOFTMAX, false),
                        *src,
                        *dst,
                        *n,
                        None,
                        None,
                        Dispatch::Elements { per_row: 1 },
                    )
                }
                Step::MaxPool { src, dst, pool } => {
                    let crate::direct::Pool {
                        c,
                        h,
                        w,
                        k,
                        s,
                        oh,
                        ow,
                    } = pool;
                    dims[..7].copy_from_slice(&[u(*c), u(*h), u(*w), u(*k), u(*s), u(*oh), u(*ow)]);
                    let len = oh * ow * c;
                    (
                        shader(MAXPOOL, false),
                        *src,
                        *dst,
                        len,
                        None,
                        None,
                        Dispatch::Elements { per_row: len },
                    )
                }
                Step::Conv(cv) => {
                    dims[..12].copy_from_slice(&[
                        u(cv.c),
                        u(cv.h),
                        u(cv.w),
                        u(cv.m),
                        u(cv.kh),
                        u(cv.kw),
                        u(cv.stride),
                        u(cv.pad_top),
                        u(cv.pad_left),
                        u(cv.oh),
                        u(cv.ow),
                        u32::from(cv.relu),
                    ]);
                    let len = cv.oh * cv.ow * cv.m;
                    (
                        shader(CONV, true),
                        cv.src,
                        cv.dst,
                        len,
                        Some(upload(&cv.weights)),
                        Some(upload(&cv.bias)),
                        Dispatch::Elements { per_row: len },
                    )
                }
                Step::Gemm {
                    src,
                    dst,
                    k,
                    m,
                    weights,
                    bias,
                    relu,
                    ..
                } => {
                    dims[..3].copy_from_slice(&[u(*k), u(*m), u32::from(*relu)]);
                    (
                        shader(GEMM, true),
                        *src,
                        *dst,
                        *m,
                        Some(upload(weights)),
                        Some(upload(bias)),
                        Dispatch::Tiles { m: *m },
                    )
                }
            };
            row_len[dst] = len;
            kernels.push(Kernel {
                pipeline,
                src,
                dst,
                weights,
                bias,
                dims,
                floats,
                shape,
            });
        }
        // Buffers are sized for whole batches, so a large enough batch would pass the
        // device's limits (wgpu then panics on validation): find how many rows fit.
        let widest = row_len
            .iter()
            .copied()
            .chain([plan.output_len])
            .max()
            .unwrap_or(1)
            .max(1);
        let limits = device.limits();
        let limit = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        let row_bytes = widest as u64 * 4;
        let fit = usize::try_from(limit / row_bytes).unwrap_or(usize::MAX);
        // Also: a tiled dispatch has at most 65,535 workgroups of 16 rows in y, and the
        // element count travels as a u32.
        let max_rows = fit.min(65_535 * 16).min(u32::MAX as usize / widest);
        if max_rows == 0 {
            return Err(GpuUnavailable::TooWide {
                adapter: name,
                row_bytes,
                limit,
            });
        }
        let max_rows = options.max_rows.map_or(max_rows, |m| m.clamp(1, max_rows));
        let param_stride = PARAM_BYTES
            .next_multiple_of(u64::from(limits.min_uniform_buffer_offset_alignment).max(1));
        Ok(GpuModel {
            device,
            queue,
            adapter: name,
            kernels,
            row_len,
            input_len: plan.input_len,
            output: plan.output,
            output_len: plan.output_len,
            state: Mutex::new(None),
            max_wait: options.max_wait.unwrap_or(DEFAULT_GPU_WAIT),
            max_rows,
            param_stride,
        })
    }

    /// The adapter in use, as logged.
    pub fn adapter(&self) -> &str {
        &self.adapter
    }

    fn buffers(&self, capacity: usize) -> Buffers {
        let storage = wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_DST
            | wgpu::BufferUsages::COPY_SRC;
        let values: Vec<wgpu::Buffer> = self
            .row_len
            .iter()
            .map(|len| {
                self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: None,
                    size: (capacity * len.max(&1) * 4) as u64,
                    usage: storage,
                    mapped_at_creation: false,
                })
            })
            .collect();
        // One buffer for every kernel's parameters: a batch writes them with one copy,
        // not one per kernel (each write is a staging buffer of its own in wgpu).
        let params = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: self.param_stride * self.kernels.len().max(1) as u64,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let groups = self
            .kernels
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let mut entries = vec![
                    wgpu::BindGroupEntry {
                        binding: 0,
                        resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer: &params,
                            offset: self.param_stride * i as u64,
                            size: std::num::NonZeroU64::new(PARAM_BYTES),
                        }),
                    },
                    wgpu::BindGroupEntry {
                        binding: 1,
                        resource: values[k.src].as_entire_binding(),
                    },
                    wgpu::BindGroupEntry {
                        binding: 2,
                        resource: values[k.dst].as_entire_binding(),
                    },
                ];
                if let (Some(w), Some(b)) = (&k.weights, &k.bias) {
                    entries.push(wgpu::BindGroupEntry {
                        binding: 3,
                        resource: w.as_entire_binding(),
                    });
                    entries.push(wgpu::BindGroupEntry {
                        binding: 4,
                        resource: b.as_entire_binding(),
                    });
                }
                self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: None,
                    layout: &k.pipeline.get_bind_group_layout(0),
                    entries: &entries,
                })
            })
            .collect();
        let readback = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: (capacity * self.output_len * 4) as u64,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Buffers {
            capacity,
            values,
            params,
            params_rows: 0,
            groups,
            readback,
        }
    }

    /// Most rows one command buffer takes; a larger batch is run in parts.
    pub fn max_rows(&self) -> usize {
        self.max_rows
    }

    /// Runs `rows` rows (`input` holds `rows × F` numbers); blocks until the GPU is
    /// done. Batches from several threads take turns.
    pub fn run(&self, input: &[f32], rows: usize) -> Result<Vec<f32>, InferenceError> {
        if rows == 0 {
            return Ok(Vec::new());
        }
        if input.len() != rows * self.input_len {
            return Err(InferenceError::Run(format!(
                "expected {} numbers for {rows} rows, got {}",
                rows * self.input_len,
                input.len()
            )));
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if rows <= self.max_rows {
            return self.run_part(&mut state, input, rows);
        }
        let mut out = Vec::with_capacity(rows * self.output_len);
        for part in input.chunks(self.max_rows * self.input_len) {
            out.extend(self.run_part(&mut state, part, part.len() / self.input_len)?);
        }
        Ok(out)
    }

    /// One command buffer: `rows` ≤ `max_rows` rows.
    fn run_part(
        &self,
        state: &mut Option<Buffers>,
        input: &[f32],
        rows: usize,
    ) -> Result<Vec<f32>, InferenceError> {
        if state.as_ref().is_none_or(|b| b.capacity < rows) {
            let capacity = rows.next_power_of_two().max(64).min(self.max_rows);
            *state = Some(self.buffers(capacity));
        }
        let Some(b) = state.as_mut() else {
            unreachable!("buffers were just made")
        };
        // Straight from the caller's floats into wgpu's staging memory: a batch of 16k MLP
        // rows is 4 MB, and a fresh byte vector for it (first-touch page faults
        // included) cost about as much as the CPU runtime's whole batch.
        self.queue
            .write_buffer(&b.values[0], 0, bytemuck::cast_slice(input));
        if b.params_rows != rows && !self.kernels.is_empty() {
            let slot = (self.param_stride / 4) as usize;
            let mut words = vec![0u32; slot * self.kernels.len()];
            for (k, w) in self.kernels.iter().zip(words.chunks_mut(slot)) {
                // The row-dependent count goes first; the rest are the step's dims.
                w[0] = match k.shape {
                    Dispatch::Elements { per_row } => u(rows * per_row),
                    Dispatch::Tiles { .. } => u(rows),
                };
                w[1..16].copy_from_slice(&k.dims);
                for (j, f) in k.floats.iter().enumerate() {
                    w[16 + j] = f.to_bits();
                }
            }
            self.queue
                .write_buffer(&b.params, 0, bytemuck::cast_slice(&words));
            b.params_rows = rows;
        }
        let mut encoder = self.device.create_command_encoder(&Default::default());
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            for (i, k) in self.kernels.iter().enumerate() {
                pass.set_pipeline(&k.pipeline);
                pass.set_bind_group(0, &b.groups[i], &[]);
                match k.shape {
                    Dispatch::Elements { per_row } => {
                        // At most 65,535 workgroups per dimension: wrap into y.
                        let groups = (rows * per_row).div_ceil(64);
                        let x = groups.clamp(1, 65_535);
                        pass.dispatch_workgroups(u(x), u(groups.div_ceil(x)), 1);
                    }
                    Dispatch::Tiles { m } => {
                        pass.dispatch_workgroups(u(m.div_ceil(16)), u(rows.div_ceil(16)), 1);
                    }
                }
            }
        }
        let out_bytes = (rows * self.output_len * 4) as u64;
        encoder.copy_buffer_to_buffer(&b.values[self.output], 0, &b.readback, 0, out_bytes);
        self.queue.submit([encoder.finish()]);
        let (tx, rx) = std::sync::mpsc::channel();
        b.readback
            .map_async(wgpu::MapMode::Read, ..out_bytes, move |r| {
                let _ = tx.send(r);
            });
        let waited = self.device.poll(wgpu::PollType::Wait {
            submission_index: None,
            timeout: Some(self.max_wait),
        });
        if let Err(e) = waited {
            // The read-back may still be pending on these buffers: drop them (the next
            // batch makes new ones) rather than map a buffer that is mid-map.
            *state = None;
            return Err(InferenceError::Run(format!(
                "GPU: the batch did not finish within {:?}: {e}",
                self.max_wait
            )));
        }
        rx.recv()
            .map_err(|_| InferenceError::Run("GPU: the read-back was dropped".into()))?
            .map_err(|e| InferenceError::Run(format!("GPU: {e}")))?;
        let out = {
            let view = b
                .readback
                .get_mapped_range(..out_bytes)
                .map_err(|e| InferenceError::Run(format!("GPU: {e}")))?;
            // One copy out of the mapping (which need not be aligned for f32).
            bytemuck::pod_collect_to_vec::<u8, f32>(&view)
        };
        b.readback.unmap();
        Ok(out)
    }
}
