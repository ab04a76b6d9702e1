//! Fused CPU kernels for the small graphs we bundle, where tract's generic plan falls
//! behind (its convolution is 5–8× slower than onnxruntime's on the digits CNN; see
//! BENCHMARKS.md). The ONNX graph is read with [`crate::onnx`]'s types, so these
//! kernels need no ONNX crate: they are the whole CPU runtime of a build without the
//! `tract` feature. A graph with any operator outside the set below is run by tract's
//! plan instead (feature `tract`), or refused with the operator named (without it).
//!
//! The set: `Conv` (2-D, group 1, no dilation), `MaxPool` (2-D, no padding), `Gemm`,
//! `MatMul` by a constant, `Relu`, `LeakyRelu`, `Sigmoid`, `Tanh`, `Softmax` (last
//! axis), `Flatten`, `Reshape`, `Identity`, `Dropout` (inference: a no-op),
//! `Mul`/`Div`/`Add`/`Sub` by a constant scalar, and, folded into the `Conv`, `Gemm` or
//! `MatMul` whose output they alone read, an `Add`/`Sub` of a constant `[M]` vector (a
//! bias, as exporters write `MatMul` + `Add`) and `BatchNormalization`.
//!
//! Layout: image tensors are kept channels-last (NHWC) so a convolution is one im2col
//! and one matrix product over the whole batch (`[N·H·W, k·k·C] × [k·k·C, M]`), with the
//! bias and a following `Relu` applied in the same pass. Matrix products go through
//! matrixmultiply's sgemm (runtime AVX/FMA detection) where `direct` has no kernel.
//! `Flatten` and `Reshape` convert between NHWC and ONNX's NCHW order where it matters.

use std::collections::HashMap;

use crate::onnx as pb;

/// Why a graph cannot run on the fused kernels (it then runs on tract).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported(pub String);

/// The per-row shape of a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// `len` numbers per row, in ONNX (row-major NCHW) order.
    Flat(usize),
    /// An image per row, stored channels-last.
    Nhwc { c: usize, h: usize, w: usize },
}

impl Layout {
    fn len(self) -> usize {
        match self {
            Layout::Flat(n) => n,
            Layout::Nhwc { c, h, w } => c * h * w,
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) enum Step {
    Affine {
        src: usize,
        dst: usize,
        mul: f32,
        add: f32,
    },
    ToNhwc {
        src: usize,
        dst: usize,
        c: usize,
        h: usize,
        w: usize,
    },
    ToFlat {
        src: usize,
        dst: usize,
        c: usize,
        h: usize,
        w: usize,
    },
    Conv(Box<Conv>),
    MaxPool {
        src: usize,
        dst: usize,
        pool: crate::direct::Pool,
    },
    Gemm {
        src: usize,
        dst: usize,
        k: usize,
        m: usize,
        weights: Vec<f32>,
        /// `weights` with rows padded to `direct::padded_width(m)` columns, for
        /// `direct::dense`.
        padded: Vec<f32>,
        bias: Vec<f32>,
        relu: bool,
    },
    Relu {
        src: usize,
        dst: usize,
    },
    /// An element-wise activation other than `Relu`.
    Activation {
        src: usize,
        dst: usize,
        kind: Activation,
    },
    Softmax {
        src: usize,
        dst: usize,
        n: usize,
    },
}

/// The element-wise activations of [`Step::Activation`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Activation {
    Sigmoid,
    Tanh,
    /// `x` when positive, else `alpha·x`.
    LeakyRelu(f32),
}

impl Activation {
    pub(crate) fn apply(self, x: f32) -> f32 {
        match self {
            Activation::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            Activation::Tanh => x.tanh(),
            Activation::LeakyRelu(alpha) => {
                if x >= 0.0 {
                    x
                } else {
                    alpha * x
                }
            }
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Conv {
    pub(crate) src: usize,
    pub(crate) dst: usize,
    pub(crate) c: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
    pub(crate) m: usize,
    pub(crate) kh: usize,
    pub(crate) kw: usize,
    pub(crate) stride: usize,
    pub(crate) pad_top: usize,
    pub(crate) pad_left: usize,
    pub(crate) oh: usize,
    pub(crate) ow: usize,
    /// `[kh·kw·C, M]`, row index `(ky·kw + kx)·C + c`.
    pub(crate) weights: Vec<f32>,
    pub(crate) bias: Vec<f32>,
    pub(crate) relu: bool,
}

/// A compiled graph: steps over numbered buffers.
#[derive(Debug, Clone)]
pub struct FusedPlan {
    pub(crate) steps: Vec<Step>,
    pub(crate) buffers: usize,
    pub(crate) input_len: usize,
    pub(crate) output: usize,
    pub(crate) output_len: usize,
}

/// Scratch space kept by one thread from batch to batch.
#[derive(Debug, Default)]
pub struct FusedState {
    buffers: Vec<Vec<f32>>,
    cols: Vec<f32>,
    /// Zero-padded input of a direct convolution.
    padded: Vec<f32>,
}

/// A constant from the graph: its dims, and its data as floats or as integers.
type Const = (Vec<i64>, Vec<f32>, Vec<i64>);

struct Builder<'a> {
    consts: HashMap<&'a str, Const>,
    values: HashMap<String, (usize, Layout)>,
    steps: Vec<Step>,
    next: usize,
}

/// A node's `i`th input's name; empty when the node has fewer inputs (then `value` and
/// `konst` refuse it).
fn arg(node: &pb::NodeProto, i: usize) -> &str {
    node.input.get(i).map_or("", String::as_str)
}

impl<'a> Builder<'a> {
    fn value(&self, name: &str, op: &str) -> Result<(usize, Layout), Unsupported> {
        if name.is_empty() {
            return Err(Unsupported(format!("`{op}` without its input")));
        }
        self.values.get(name).copied().ok_or_else(|| {
            Unsupported(format!(
                "`{op}` reads `{name}`, which is neither computed nor supported here"
            ))
        })
    }

    fn konst(&self, name: &str, op: &str) -> Result<&Const, Unsupported> {
        if name.is_empty() {
            return Err(Unsupported(format!("`{op}` without its constant input")));
        }
        self.consts
            .get(name)
            .ok_or_else(|| Unsupported(format!("`{op}` needs `{name}` to be a constant")))
    }

    fn fresh(&mut self) -> usize {
        self.next += 1;
        self.next - 1
    }
}

fn attr<'n>(node: &'n pb::NodeProto, name: &str) -> Option<&'n pb::AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

fn attr_ints(node: &pb::NodeProto, name: &str) -> Option<Vec<i64>> {
    attr(node, name).map(|a| a.ints.clone())
}

fn attr_int(node: &pb::NodeProto, name: &str, default: i64) -> i64 {
    attr(node, name).map_or(default, |a| a.i)
}

fn attr_float(node: &pb::NodeProto, name: &str, default: f32) -> f32 {
    attr(node, name).map_or(default, |a| a.f)
}

/// Denormal weights make every multiply that touches them take a slow microcode path on
/// x86; flushing them to zero changes no result by more than 1.2e-38.
fn flush(x: f32) -> f32 {
    if x.is_subnormal() {
        0.0
    } else {
        x
    }
}

/// A constant's data, as floats or as integers, holding exactly as many values as its
/// dims say: the kernels index weights by their dims, so a short or external tensor
/// must be refused here, not found out of bounds.
fn tensor_data(t: &pb::TensorProto) -> Result<(Vec<f32>, Vec<i64>), Unsupported> {
    let count = t
        .dims
        .iter()
        .try_fold(1usize, |n, d| {
            usize::try_from(*d).ok().and_then(|d| n.checked_mul(d))
        })
        .ok_or_else(|| Unsupported(format!("constant `{}` has dims {:?}", t.name, t.dims)))?;
    let width = match t.data_type {
        pb::FLOAT => 4,
        _ => 8,
    };
    if !t.raw_data.is_empty() && Some(t.raw_data.len()) != count.checked_mul(width) {
        return Err(Unsupported(format!(
            "constant `{}` has {} bytes of data for dims {:?}",
            t.name,
            t.raw_data.len(),
            t.dims
        )));
    }
    let (f, i) = tensor_values(t)?;
    if f.len() + i.len() != count {
        return Err(Unsupported(format!(
            "constant `{}` holds {} values for dims {:?} (data stored outside the file is not read)",
            t.name,
            f.len() + i.len(),
            t.dims
        )));
    }
    Ok((f, i))
}

fn tensor_values(t: &pb::TensorProto) -> Result<(Vec<f32>, Vec<i64>), Unsupported> {
    use pb::{FLOAT, INT64};
    match t.data_type {
        FLOAT if !t.raw_data.is_empty() => Ok((
            t.raw_data
                .chunks_exact(4)
                .map(|b| flush(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
                .collect(),
            Vec::new(),
        )),
        FLOAT => Ok((
            t.float_data.iter().copied().map(flush).collect(),
            Vec::new(),
        )),
        INT64 if !t.raw_data.is_empty() => Ok((
            Vec::new(),
            t.raw_data
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
                .collect(),
        )),
        INT64 => Ok((Vec::new(), t.int64_data.clone())),
        other => Err(Unsupported(format!(
            "constant `{}` has element type {other}",
            t.name
        ))),
    }
}

fn usize_of(v: i64, what: &str) -> Result<usize, Unsupported> {
    usize::try_from(v).map_err(|_| Unsupported(format!("{what} {v} is not supported")))
}

impl FusedPlan {
    /// Compiles `bytes` (an ONNX model with one input `[N, F]` and one output) onto the
    /// fused kernels, or says which operator or attribute keeps it off them.
    pub fn from_onnx(bytes: &[u8]) -> Result<Self, Unsupported> {
        let proto = pb::decode(bytes).map_err(|e| Unsupported(format!("not ONNX: {e}")))?;
        Self::from_proto(&proto)
    }

    /// [`FusedPlan::from_onnx`] for a model already decoded.
    pub fn from_proto(proto: &pb::ModelProto) -> Result<Self, Unsupported> {
        Self::compile(proto, true)
    }

    /// The same plan without the folds into `Gemm` weights: the bundled models then
    /// still run the `Affine` and `ToFlat` steps (on the CPU and as GPU kernels), which
    /// other graphs need, so tests keep them covered.
    #[doc(hidden)]
    pub fn from_onnx_unfolded(bytes: &[u8]) -> Result<Self, Unsupported> {
        let proto = pb::decode(bytes).map_err(|e| Unsupported(format!("not ONNX: {e}")))?;
        Self::compile(&proto, false)
    }

    fn compile(proto: &pb::ModelProto, fold: bool) -> Result<Self, Unsupported> {
        let graph = proto
            .graph
            .as_ref()
            .ok_or_else(|| Unsupported("no graph".into()))?;
        let mut b = Builder {
            consts: HashMap::new(),
            values: HashMap::new(),
            steps: Vec::new(),
            next: 0,
        };
        for t in &graph.initializer {
            let (f, i) = tensor_data(t)?;
            b.consts.insert(t.name.as_str(), (t.dims.clone(), f, i));
        }
        let inputs: Vec<_> = graph
            .input
            .iter()
            .filter(|i| !b.consts.contains_key(i.name.as_str()))
            .collect();
        if inputs.len() != 1 || graph.output.len() != 1 {
            return Err(Unsupported("one input and one output are needed".into()));
        }
        let dims = input_dims(inputs[0])?;
        if dims.len() != 2 {
            return Err(Unsupported(format!(
                "input rank {} (only [N, F] is fused)",
                dims.len()
            )));
        }
        let input_len = dims[1];
        let id = b.fresh();
        b.values
            .insert(inputs[0].name.clone(), (id, Layout::Flat(input_len)));

        let nodes = &graph.node;
        // The output of the node before, when it is a layer (or a fold into one) whose
        // weights and bias a following bias or batch normalisation can fold into.
        let mut layer_output: Option<String> = None;
        for (i, node) in nodes.iter().enumerate() {
            if !node.domain.is_empty() && node.domain != "ai.onnx" {
                return Err(Unsupported(format!("operator domain `{}`", node.domain)));
            }
            let op = node.op_type.as_str();
            let out_name = node.output.first().cloned().unwrap_or_default();
            // A Relu that is the only reader of this node's output is fused into it.
            let fuse_relu = matches!(op, "Conv" | "Gemm" | "MatMul")
                && nodes.get(i + 1).is_some_and(|n| {
                    n.op_type == "Relu"
                        && n.input.first() == Some(&out_name)
                        && nodes.iter().filter(|m| m.input.contains(&out_name)).count() == 1
                        && !graph.output.iter().any(|o| o.name == out_name)
                });
            // What a fold into the producing step needs: this node's input is the
            // value a Conv, Gemm or MatMul just computed (or the previous fold into
            // one), under the name that node gave it (an alias may be read elsewhere),
            // nothing else reads it, and it is not an output.
            let sole_reader_of_previous = |input: &str| {
                layer_output.as_deref() == Some(input)
                    && nodes
                        .iter()
                        .filter(|m| m.input.iter().any(|n| n == input))
                        .count()
                        == 1
                    && !graph.output.iter().any(|o| o.name == input)
            };
            let mut folded = false;
            let produced = match op {
                "Mul" | "Div" | "Add" | "Sub" => {
                    // Add and Mul commute: the constant may come first.
                    let (x, c) = match op {
                        "Add" | "Mul" if !b.values.contains_key(arg(node, 0)) => {
                            (arg(node, 1), arg(node, 0))
                        }
                        _ => (arg(node, 0), arg(node, 1)),
                    };
                    let (src, layout) = b.value(x, op)?;
                    let k = b.konst(c, op)?;
                    let sign = match op {
                        "Add" => Some(1.0),
                        "Sub" => Some(-1.0),
                        _ => None,
                    };
                    // `[M]`, `[1, M]` or one value: a bias (broadcast over the channels).
                    let bias_shaped = k.0.len() <= 1 || (k.0.len() == 2 && k.0[0] == 1);
                    match sign {
                        Some(sign) if bias_shaped && sole_reader_of_previous(x) => {
                            let k = k.1.clone();
                            add_bias(b.steps.last_mut(), src, &k, sign)?;
                            folded = true;
                            (src, layout)
                        }
                        _ if k.1.len() == 1 => {
                            let x = k.1[0];
                            let (mul, add) = match op {
                                "Mul" => (x, 0.0),
                                "Div" => (1.0 / x, 0.0),
                                "Add" => (1.0, x),
                                _ => (1.0, -x),
                            };
                            let dst = b.fresh();
                            b.steps.push(Step::Affine { src, dst, mul, add });
                            (dst, layout)
                        }
                        _ => {
                            return Err(Unsupported(format!(
                                "`{op}` of a non-scalar constant other than a bias on the \
                                 Conv, Gemm or MatMul before it"
                            )))
                        }
                    }
                }
                "Identity" => b.value(arg(node, 0), op)?,
                "Dropout" => {
                    // At inference a copy: unless it is asked to train (a third input),
                    // or its mask is wanted (a second output).
                    if node.input.get(2).is_some_and(|n| !n.is_empty())
                        || node.output.get(1).is_some_and(|n| !n.is_empty())
                    {
                        return Err(Unsupported(
                            "Dropout with training_mode or a mask output".into(),
                        ));
                    }
                    b.value(arg(node, 0), op)?
                }
                "Sigmoid" | "Tanh" | "LeakyRelu" => {
                    let (src, layout) = b.value(arg(node, 0), op)?;
                    let kind = match op {
                        "Sigmoid" => Activation::Sigmoid,
                        "Tanh" => Activation::Tanh,
                        _ => Activation::LeakyRelu(attr_float(node, "alpha", 0.01)),
                    };
                    let dst = b.fresh();
                    b.steps.push(Step::Activation { src, dst, kind });
                    (dst, layout)
                }
                "BatchNormalization" => {
                    let x = arg(node, 0);
                    let (src, layout) = b.value(x, op)?;
                    if node.output.iter().skip(1).any(|n| !n.is_empty())
                        || attr_int(node, "training_mode", 0) != 0
                    {
                        return Err(Unsupported("BatchNormalization in training mode".into()));
                    }
                    if !sole_reader_of_previous(x) {
                        return Err(Unsupported(
                            "BatchNormalization other than right after the Conv, Gemm or \
                             MatMul whose output it alone reads"
                                .into(),
                        ));
                    }
                    let mut stats = Vec::with_capacity(4);
                    for j in 1..5 {
                        stats.push(b.konst(arg(node, j), op)?.1.clone());
                    }
                    let epsilon = attr_float(node, "epsilon", 1e-5);
                    fold_batch_norm(b.steps.last_mut(), src, &stats, epsilon)?;
                    folded = true;
                    (src, layout)
                }
                "Reshape" => {
                    let (src, layout) = b.value(arg(node, 0), op)?;
                    let shape = &b.konst(arg(node, 1), op)?.2;
                    let total = layout.len();
                    match shape.as_slice() {
                        [_, rest @ ..] if rest.len() == 3 => {
                            let c = usize_of(rest[0], "reshape dim")?;
                            let h = usize_of(rest[1], "reshape dim")?;
                            let w = usize_of(rest[2], "reshape dim")?;
                            // Checked: the dims are the file's, and a wrapped product
                            // could match.
                            let size = c.checked_mul(h).and_then(|ch| ch.checked_mul(w));
                            if size != Some(total) {
                                return Err(Unsupported(
                                    "Reshape that changes the row size".into(),
                                ));
                            }
                            match layout {
                                // One channel: NCHW and NHWC are the same numbers.
                                Layout::Flat(_) if c == 1 => (src, Layout::Nhwc { c, h, w }),
                                Layout::Flat(_) => {
                                    let dst = b.fresh();
                                    b.steps.push(Step::ToNhwc { src, dst, c, h, w });
                                    (dst, Layout::Nhwc { c, h, w })
                                }
                                Layout::Nhwc { .. } => {
                                    return Err(Unsupported(
                                        "Reshape of an image to an image".into(),
                                    ))
                                }
                            }
                        }
                        [_, f] if usize_of(*f, "reshape dim").ok() == Some(total) || *f == -1 => {
                            flatten(&mut b, src, layout)
                        }
                        other => return Err(Unsupported(format!("Reshape to {other:?}"))),
                    }
                }
                "Flatten" => {
                    if attr_int(node, "axis", 1) != 1 {
                        return Err(Unsupported("Flatten with axis other than 1".into()));
                    }
                    let (src, layout) = b.value(arg(node, 0), op)?;
                    flatten(&mut b, src, layout)
                }
                "Conv" => {
                    let (src, layout) = b.value(arg(node, 0), op)?;
                    let Layout::Nhwc { c, h, w } = layout else {
                        return Err(Unsupported("Conv on a non-image".into()));
                    };
                    let (wd, wf, _) = b.konst(arg(node, 1), op)?.clone();
                    let [m, wc, kh, kw] = <[i64; 4]>::try_from(wd.as_slice())
                        .map_err(|_| Unsupported("Conv weights of rank ≠ 4".into()))?;
                    let (m, wc, kh, kw) = (
                        usize_of(m, "M")?,
                        usize_of(wc, "C")?,
                        usize_of(kh, "kh")?,
                        usize_of(kw, "kw")?,
                    );
                    if wc != c || attr_int(node, "group", 1) != 1 {
                        return Err(Unsupported("grouped Conv".into()));
                    }
                    if attr_ints(node, "dilations").is_some_and(|d| d.iter().any(|x| *x != 1)) {
                        return Err(Unsupported("dilated Conv".into()));
                    }
                    if attr(node, "auto_pad").is_some_and(|a| !a.s.is_empty() && a.s != b"NOTSET") {
                        return Err(Unsupported("Conv auto_pad".into()));
                    }
                    let strides = attr_ints(node, "strides").unwrap_or(vec![1, 1]);
                    if strides.len() != 2 || strides[0] != strides[1] {
                        return Err(Unsupported("Conv with unequal strides".into()));
                    }
                    let stride = usize_of(strides[0], "stride")?;
                    let pads = attr_ints(node, "pads").unwrap_or(vec![0, 0, 0, 0]);
                    let [pt, pl, pb_, pr] = <[i64; 4]>::try_from(pads.as_slice())
                        .map_err(|_| Unsupported("Conv pads".into()))?;
                    let (pt, pl, pb_, pr) = (
                        usize_of(pt, "pad")?,
                        usize_of(pl, "pad")?,
                        usize_of(pb_, "pad")?,
                        usize_of(pr, "pad")?,
                    );
                    // Padding wider than the kernel only adds outputs made of padding,
                    // and unbounded pads would size buffers at will (the output is at
                    // most the input plus twice the kernel this way).
                    if pt > kh || pb_ > kh || pl > kw || pr > kw {
                        return Err(Unsupported("Conv pads wider than the kernel".into()));
                    }
                    if stride == 0 || h + pt + pb_ < kh || w + pl + pr < kw {
                        return Err(Unsupported("Conv geometry".into()));
                    }
                    let oh = (h + pt + pb_ - kh) / stride + 1;
                    let ow = (w + pl + pr - kw) / stride + 1;
                    let mut weights = vec![0f32; kh * kw * c * m];
                    for mm in 0..m {
                        for cc in 0..c {
                            for ky in 0..kh {
                                for kx in 0..kw {
                                    weights[((ky * kw + kx) * c + cc) * m + mm] =
                                        wf[((mm * c + cc) * kh + ky) * kw + kx];
                                }
                            }
                        }
                    }
                    let bias = match node.input.get(2) {
                        Some(name) if !name.is_empty() => b.konst(name, op)?.1.clone(),
                        _ => vec![0.0; m],
                    };
                    if bias.len() != m {
                        return Err(Unsupported("Conv bias shape".into()));
                    }
                    let dst = b.fresh();
                    b.steps.push(Step::Conv(Box::new(Conv {
                        src,
                        dst,
                        c,
                        h,
                        w,
                        m,
                        kh,
                        kw,
                        stride,
                        pad_top: pt,
                        pad_left: pl,
                        oh,
                        ow,
                        weights,
                        bias,
                        relu: fuse_relu,
                    })));
                    (dst, Layout::Nhwc { c: m, h: oh, w: ow })
                }
                "MaxPool" => {
                    let (src, layout) = b.value(arg(node, 0), op)?;
                    let Layout::Nhwc { c, h, w } = layout else {
                        return Err(Unsupported("MaxPool on a non-image".into()));
                    };
                    let k = attr_ints(node, "kernel_shape").unwrap_or_default();
                    let s = attr_ints(node, "strides").unwrap_or(vec![1, 1]);
                    let pads = attr_ints(node, "pads").unwrap_or_default();
                    if k.len() != 2
                        || k[0] != k[1]
                        || s.len() != 2
                        || s[0] != s[1]
                        || pads.iter().any(|p| *p != 0)
                        || attr_int(node, "ceil_mode", 0) != 0
                        || attr_ints(node, "dilations").is_some_and(|d| d.iter().any(|x| *x != 1))
                        || node.output.len() > 1
                    {
                        return Err(Unsupported(
                            "MaxPool other than square, unpadded, one output".into(),
                        ));
                    }
                    let (k, s) = (usize_of(k[0], "kernel")?, usize_of(s[0], "stride")?);
                    if s == 0 || k > h || k > w {
                        return Err(Unsupported("MaxPool geometry".into()));
                    }
                    let (oh, ow) = ((h - k) / s + 1, (w - k) / s + 1);
                    let dst = b.fresh();
                    let pool = crate::direct::Pool {
                        c,
                        h,
                        w,
                        k,
                        s,
                        oh,
                        ow,
                    };
                    b.steps.push(Step::MaxPool { src, dst, pool });
                    (dst, Layout::Nhwc { c, h: oh, w: ow })
                }
                "Gemm" | "MatMul" => {
                    let (src, layout) = b.value(arg(node, 0), op)?;
                    let Layout::Flat(k) = layout else {
                        return Err(Unsupported(format!("`{op}` on an image")));
                    };
                    if op == "Gemm" && attr_int(node, "transA", 0) != 0 {
                        return Err(Unsupported("Gemm with transA".into()));
                    }
                    let (wd, wf, _) = b.konst(arg(node, 1), op)?.clone();
                    let trans_b = op == "Gemm" && attr_int(node, "transB", 0) != 0;
                    let [r, cdim] = <[i64; 2]>::try_from(wd.as_slice())
                        .map_err(|_| Unsupported(format!("`{op}` weights of rank ≠ 2")))?;
                    let (r, cdim) = (usize_of(r, "dim")?, usize_of(cdim, "dim")?);
                    let (wk, m) = if trans_b { (cdim, r) } else { (r, cdim) };
                    if wk != k {
                        return Err(Unsupported(format!("`{op}` inner dimensions {k} and {wk}")));
                    }
                    let alpha = if op == "Gemm" {
                        attr_float(node, "alpha", 1.0)
                    } else {
                        1.0
                    };
                    let beta = if op == "Gemm" {
                        attr_float(node, "beta", 1.0)
                    } else {
                        1.0
                    };
                    let mut weights = vec![0f32; k * m];
                    for kk in 0..k {
                        for mm in 0..m {
                            let v = if trans_b {
                                wf[mm * k + kk]
                            } else {
                                wf[kk * m + mm]
                            };
                            weights[kk * m + mm] = alpha * v;
                        }
                    }
                    let bias = match node.input.get(2) {
                        Some(name) if !name.is_empty() && op == "Gemm" => {
                            let (bd, bf, _) = b.konst(name, op)?;
                            let ok =
                                bf.len() == m && (bd.len() == 1 || (bd.len() == 2 && bd[0] == 1));
                            if bf.len() == 1 {
                                vec![beta * bf[0]; m]
                            } else if ok {
                                bf.iter().map(|x| beta * x).collect()
                            } else {
                                return Err(Unsupported(
                                    "Gemm bias other than [M] or scalar".into(),
                                ));
                            }
                        }
                        _ => Vec::new(),
                    };
                    let dst = b.fresh();
                    b.steps.push(Step::Gemm {
                        src,
                        dst,
                        k,
                        m,
                        padded: Vec::new(),
                        weights,
                        bias,
                        relu: fuse_relu,
                    });
                    (dst, Layout::Flat(m))
                }
                "Relu" => {
                    // Already applied by the producing Conv/Gemm when fused.
                    let (src, layout) = b.value(arg(node, 0), op)?;
                    let fused = i > 0
                        && matches!(b.steps.last(), Some(Step::Conv(c)) if c.relu && c.dst == src)
                        || matches!(b.steps.last(), Some(Step::Gemm { relu: true, dst, .. }) if *dst == src);
                    if fused {
                        (src, layout)
                    } else {
                        let dst = b.fresh();
                        b.steps.push(Step::Relu { src, dst });
                        (dst, layout)
                    }
                }
                "Softmax" => {
                    let (src, layout) = b.value(arg(node, 0), op)?;
                    let Layout::Flat(n) = layout else {
                        return Err(Unsupported("Softmax on an image".into()));
                    };
                    let axis = attr_int(node, "axis", -1);
                    if axis != 1 && axis != -1 {
                        return Err(Unsupported("Softmax over the batch axis".into()));
                    }
                    let dst = b.fresh();
                    b.steps.push(Step::Softmax { src, dst, n });
                    (dst, layout)
                }
                other => return Err(Unsupported(format!("operator `{other}`"))),
            };
            let layer = matches!(op, "Conv" | "Gemm" | "MatMul") && !fuse_relu;
            layer_output = (layer || folded).then(|| out_name.clone());
            b.values.insert(out_name, produced);
        }
        let (output, layout) = b.value(&graph.output[0].name, "output")?;
        let Layout::Flat(output_len) = layout else {
            return Err(Unsupported("an image-shaped output".into()));
        };
        let mut steps = b.steps;
        if fold {
            fold_affine_into_gemm(&mut steps, output);
            fold_flatten_into_gemm(&mut steps, output);
        }
        // The dense kernels' layout, once the folds have settled the weights.
        for step in &mut steps {
            if let Step::Gemm {
                m, weights, padded, ..
            } = step
            {
                *padded = crate::direct::pad_columns(weights, *m);
            }
        }
        Ok(FusedPlan {
            steps,
            buffers: b.next,
            input_len,
            output,
            output_len,
        })
    }

    /// Runs `rows` rows; `input` holds `rows × F` numbers.
    pub fn run(&self, state: &mut FusedState, input: Vec<f32>, rows: usize) -> Vec<f32> {
        debug_assert_eq!(input.len(), rows * self.input_len);
        state.buffers.resize_with(self.buffers, Vec::new);
        state.buffers[0] = input;
        for step in &self.steps {
            run_step(step, state, rows);
        }
        let out = std::mem::take(&mut state.buffers[self.output]);
        debug_assert_eq!(out.len(), rows * self.output_len);
        out
    }
}

/// The buffer a step reads (every step reads one).
fn source(step: &Step) -> usize {
    match step {
        Step::Affine { src, .. }
        | Step::ToNhwc { src, .. }
        | Step::ToFlat { src, .. }
        | Step::MaxPool { src, .. }
        | Step::Gemm { src, .. }
        | Step::Relu { src, .. }
        | Step::Activation { src, .. }
        | Step::Softmax { src, .. } => *src,
        Step::Conv(cv) => cv.src,
    }
}

/// The one step that reads buffer `dst`, if it is a `Gemm` (that `accepts`) and `dst` is
/// not the plan's output: what a fold into that `Gemm` needs.
fn sole_gemm_reader(
    steps: &[Step],
    dst: usize,
    output: usize,
    accepts: impl Fn(&Step) -> bool,
) -> Option<usize> {
    let mut readers = (0..steps.len()).filter(|j| source(&steps[*j]) == dst);
    let (Some(j), None) = (readers.next(), readers.next()) else {
        return None;
    };
    (dst != output && matches!(steps[j], Step::Gemm { .. }) && accepts(&steps[j])).then_some(j)
}

/// The output channels of `step` (a `Conv` or `Gemm` writing `dst` with no fused `Relu`)
/// as `(weights, bias, m)`: `weights` laid out with `m` columns, one per channel; the
/// bias filled with zeros when the step had none.
fn channels(step: Option<&mut Step>, dst: usize) -> Option<(&mut Vec<f32>, &mut Vec<f32>, usize)> {
    let (weights, bias, m) = match step? {
        Step::Conv(cv) if cv.dst == dst && !cv.relu => (&mut cv.weights, &mut cv.bias, cv.m),
        Step::Gemm {
            dst: d,
            weights,
            bias,
            m,
            relu: false,
            ..
        } if *d == dst => (weights, bias, *m),
        _ => return None,
    };
    if bias.is_empty() {
        bias.resize(m, 0.0);
    }
    Some((weights, bias, m))
}

/// Folds `+ sign·k` (a constant `[M]` vector, or one value for every channel) into the
/// bias of the step that wrote `dst`.
fn add_bias(step: Option<&mut Step>, dst: usize, k: &[f32], sign: f32) -> Result<(), Unsupported> {
    let (_, bias, m) = channels(step, dst)
        .ok_or_else(|| Unsupported("a bias `Add` not after a Conv, Gemm or MatMul".into()))?;
    match k {
        [one] => bias.iter_mut().for_each(|b| *b += sign * one),
        _ if k.len() == m => bias.iter_mut().zip(k).for_each(|(b, k)| *b += sign * k),
        _ => {
            return Err(Unsupported(format!(
                "a bias of {} for {m} channels",
                k.len()
            )))
        }
    }
    Ok(())
}

/// Folds `BatchNormalization` (`stats`: scale, B, mean, var, one per channel) into the
/// weights and bias of the step that wrote `dst`: `y = (x − mean)·s + B` with
/// `s = scale / √(var + ε)` is `x·s + (B − mean·s)`, and `x = W·v + b`.
fn fold_batch_norm(
    step: Option<&mut Step>,
    dst: usize,
    stats: &[Vec<f32>],
    epsilon: f32,
) -> Result<(), Unsupported> {
    let (weights, bias, m) = channels(step, dst)
        .ok_or_else(|| Unsupported("BatchNormalization not after a Conv, Gemm or MatMul".into()))?;
    let [scale, shift, mean, var] = stats else {
        return Err(Unsupported(
            "BatchNormalization without its four inputs".into(),
        ));
    };
    if [scale, shift, mean, var].iter().any(|v| v.len() != m) {
        return Err(Unsupported(format!(
            "BatchNormalization statistics that are not one per channel ({m})"
        )));
    }
    let s: Vec<f32> = scale
        .iter()
        .zip(var)
        .map(|(g, v)| g / (v + epsilon).sqrt())
        .collect();
    for row in weights.chunks_exact_mut(m) {
        for (w, s) in row.iter_mut().zip(&s) {
            *w = flush(*w * s);
        }
    }
    for j in 0..m {
        bias[j] = (bias[j] - mean[j]) * s[j] + shift[j];
    }
    Ok(())
}

/// Folds a scalar `x·mul + add` (the models' pixel scaling) into the `Gemm` that alone
/// reads it: `(x·mul + add)·W + b = x·(mul·W) + (b + add·Σₖ W)`, one pass over the
/// batch fewer.
fn fold_affine_into_gemm(steps: &mut Vec<Step>, output: usize) {
    let mut i = 0;
    while i < steps.len() {
        let Step::Affine { src, dst, mul, add } = steps[i] else {
            i += 1;
            continue;
        };
        let Some(reader) = sole_gemm_reader(steps, dst, output, |_| true) else {
            i += 1;
            continue;
        };
        if let Step::Gemm {
            src: gemm_src,
            m,
            weights,
            bias,
            ..
        } = &mut steps[reader]
        {
            let m = *m;
            if bias.is_empty() {
                *bias = vec![0.0; m];
            }
            for row in weights.chunks_exact(m) {
                for (b, w) in bias.iter_mut().zip(row) {
                    *b += add * w;
                }
            }
            for w in weights.iter_mut() {
                // Scaled tiny weights (the MLP's never-lit pixels) can become
                // denormals: this fold made the MLP 25% slower until it flushed them.
                *w = flush(*w * mul);
            }
            *gemm_src = src;
        }
        steps.remove(i);
    }
}

/// Folds the NHWC→NCHW reorder before a `Gemm` that alone reads it into the `Gemm`'s
/// weights: row `cc·h·w + p` of `W` (ONNX's flattened order) becomes row `p·c + cc` (the
/// order the image is stored in), one pass over the batch fewer.
fn fold_flatten_into_gemm(steps: &mut Vec<Step>, output: usize) {
    let mut i = 0;
    while i < steps.len() {
        let Step::ToFlat { src, dst, c, h, w } = steps[i] else {
            i += 1;
            continue;
        };
        let whole = |s: &Step| matches!(s, Step::Gemm { k, .. } if *k == c * h * w);
        let Some(reader) = sole_gemm_reader(steps, dst, output, whole) else {
            i += 1;
            continue;
        };
        if let Step::Gemm {
            src: gemm_src,
            m,
            weights,
            ..
        } = &mut steps[reader]
        {
            let m = *m;
            let mut reordered = vec![0.0; weights.len()];
            for p in 0..h * w {
                for cc in 0..c {
                    let from = (cc * h * w + p) * m;
                    let to = (p * c + cc) * m;
                    reordered[to..to + m].copy_from_slice(&weights[from..from + m]);
                }
            }
            *weights = reordered;
            *gemm_src = src;
        }
        steps.remove(i);
    }
}

fn input_dims(input: &pb::ValueInfoProto) -> Result<Vec<usize>, Unsupported> {
    use pb::tensor_shape_proto::dimension::Value as D;
    use pb::type_proto::Value as T;
    let Some(T::TensorType(t)) = input.r#type.as_ref().and_then(|t| t.value.as_ref()) else {
        return Err(Unsupported("input is not a tensor".into()));
    };
    let shape = t
        .shape
        .as_ref()
        .ok_or_else(|| Unsupported("input has no shape".into()))?;
    shape
        .dim
        .iter()
        .enumerate()
        .map(|(i, d)| match (&d.value, i) {
            (Some(D::DimValue(v)), _) => usize_of(*v, "input dim"),
            (_, 0) => Ok(0),
            _ => Err(Unsupported(
                "a symbolic dimension other than the batch".into(),
            )),
        })
        .collect()
}

fn flatten(b: &mut Builder<'_>, src: usize, layout: Layout) -> (usize, Layout) {
    match layout {
        Layout::Flat(_) => (src, layout),
        Layout::Nhwc { c, h, w } => {
            let dst = b.fresh();
            b.steps.push(Step::ToFlat { src, dst, c, h, w });
            (dst, Layout::Flat(c * h * w))
        }
    }
}

/// Takes buffer `dst` out of the state, sized `len`. Its contents are stale: every step
/// overwrites all of it (zeroing it first showed up as 8% of a batch in profiles).
fn output_buffer(state: &mut FusedState, dst: usize, len: usize) -> Vec<f32> {
    let mut out = std::mem::take(&mut state.buffers[dst]);
    out.resize(len, 0.0);
    out.truncate(len);
    out
}

/// Convolution as im2col plus one sgemm over the whole batch, with bias and the fused
/// `Relu`: the portable path, and the one for shapes `direct` does not take.
pub(crate) fn conv_im2col(
    cv: &Conv,
    inp: &[f32],
    rows: usize,
    cols: &mut Vec<f32>,
    out: &mut [f32],
) {
    let k = cv.kh * cv.kw * cv.c;
    let positions = rows * cv.oh * cv.ow;
    cols.resize(positions * k, 0.0);
    cols.truncate(positions * k);
    let (c, h, w) = (cv.c, cv.h, cv.w);
    // Every element of `cols` is written (zeros where the window hangs over the
    // padding), and channels are copied with a plain loop: the runs are 1 to a few
    // dozen floats, too short for memcpy calls to pay.
    for n in 0..rows {
        for oy in 0..cv.oh {
            for ox in 0..cv.ow {
                let row = ((n * cv.oh + oy) * cv.ow + ox) * k;
                for ky in 0..cv.kh {
                    let iy = (oy * cv.stride + ky) as isize - cv.pad_top as isize;
                    for kx in 0..cv.kw {
                        let ix = (ox * cv.stride + kx) as isize - cv.pad_left as isize;
                        let to = &mut cols[row + (ky * cv.kw + kx) * c..][..c];
                        if iy < 0 || iy >= h as isize || ix < 0 || ix >= w as isize {
                            to.fill(0.0);
                        } else {
                            let from = ((n * h + iy as usize) * w + ix as usize) * c;
                            for (t, f) in to.iter_mut().zip(&inp[from..from + c]) {
                                *t = *f;
                            }
                        }
                    }
                }
            }
        }
    }
    crate::direct::sgemm(cols, positions, k, &cv.weights, cv.m, out);
    for px in out.chunks_exact_mut(cv.m) {
        for (v, b) in px.iter_mut().zip(&cv.bias) {
            *v += b;
            if cv.relu && *v < 0.0 {
                *v = 0.0;
            }
        }
    }
}

fn run_step(step: &Step, state: &mut FusedState, rows: usize) {
    match step {
        Step::Affine { src, dst, mul, add } => {
            let mut out = output_buffer(state, *dst, state.buffers[*src].len());
            for (o, x) in out.iter_mut().zip(&state.buffers[*src]) {
                *o = x * mul + add;
            }
            state.buffers[*dst] = out;
        }
        Step::ToNhwc { src, dst, c, h, w } => {
            let (c, h, w) = (*c, *h, *w);
            let mut out = output_buffer(state, *dst, rows * c * h * w);
            let inp = &state.buffers[*src];
            for n in 0..rows {
                let base = n * c * h * w;
                for cc in 0..c {
                    for p in 0..h * w {
                        out[base + p * c + cc] = inp[base + cc * h * w + p];
                    }
                }
            }
            state.buffers[*dst] = out;
        }
        Step::ToFlat { src, dst, c, h, w } => {
            let (c, h, w) = (*c, *h, *w);
            let mut out = output_buffer(state, *dst, rows * c * h * w);
            let inp = &state.buffers[*src];
            for n in 0..rows {
                let base = n * c * h * w;
                for p in 0..h * w {
                    for cc in 0..c {
                        out[base + cc * h * w + p] = inp[base + p * c + cc];
                    }
                }
            }
            state.buffers[*dst] = out;
        }
        Step::Conv(cv) => {
            let mut out = output_buffer(state, cv.dst, rows * cv.oh * cv.ow * cv.m);
            let inp = &state.buffers[cv.src];
            if crate::direct::available() && crate::direct::supports(cv) {
                crate::direct::conv(cv, inp, rows, &mut state.padded, &mut out);
            } else {
                conv_im2col(cv, inp, rows, &mut state.cols, &mut out);
            }
            state.buffers[cv.dst] = out;
        }
        Step::MaxPool { src, dst, pool } => {
            let mut out = output_buffer(state, *dst, rows * pool.oh * pool.ow * pool.c);
            crate::direct::maxpool(pool, &state.buffers[*src], rows, &mut out);
            state.buffers[*dst] = out;
        }
        Step::Gemm {
            src,
            dst,
            k,
            m,
            weights,
            padded,
            bias,
            relu,
        } => {
            let mut out = output_buffer(state, *dst, rows * m);
            if crate::direct::available() {
                let layer = crate::direct::Dense {
                    k: *k,
                    m: *m,
                    weights: padded,
                    bias,
                    relu: *relu,
                };
                crate::direct::dense(&layer, &state.buffers[*src], rows, &mut out);
                state.buffers[*dst] = out;
                return;
            }
            crate::direct::sgemm(&state.buffers[*src], rows, *k, weights, *m, &mut out);
            if !bias.is_empty() || *relu {
                for r in out.chunks_exact_mut(*m) {
                    if !bias.is_empty() {
                        for (v, b) in r.iter_mut().zip(bias) {
                            *v += b;
                        }
                    }
                    if *relu {
                        for v in r.iter_mut() {
                            *v = v.max(0.0);
                        }
                    }
                }
            }
            state.buffers[*dst] = out;
        }
        Step::Relu { src, dst } => {
            let mut out = output_buffer(state, *dst, state.buffers[*src].len());
            for (o, x) in out.iter_mut().zip(&state.buffers[*src]) {
                *o = x.max(0.0);
            }
            state.buffers[*dst] = out;
        }
        Step::Activation { src, dst, kind } => {
            let mut out = output_buffer(state, *dst, state.buffers[*src].len());
            for (o, x) in out.iter_mut().zip(&state.buffers[*src]) {
                *o = kind.apply(*x);
            }
            state.buffers[*dst] = out;
        }
        Step::Softmax { src, dst, n } => {
            let mut out = output_buffer(state, *dst, state.buffers[*src].len());
            crate::direct::softmax(&state.buffers[*src], &mut out, *n);
            state.buffers[*dst] = out;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inputs like the models': 64 pixels in 0..=16, from a fixed sequence.
    pub(crate) fn pixels(rows: usize) -> Vec<f32> {
        (0..rows * 64)
            .map(|i| ((i * 7919 + i / 64 * 31) % 17) as f32)
            .collect()
    }

    #[test]
    fn folding_into_gemm_changes_no_answer() {
        for (name, bytes) in [
            ("mlp", crate::builtin::DIGITS_MLP),
            ("cnn", crate::builtin::DIGITS_CNN),
        ] {
            let folded = FusedPlan::from_onnx(bytes).unwrap();
            let unfolded = FusedPlan::from_onnx_unfolded(bytes).unwrap();
            let kinds =
                |p: &FusedPlan, f: fn(&Step) -> bool| p.steps.iter().filter(|s| f(s)).count();
            let affine = |s: &Step| matches!(s, Step::Affine { .. });
            let to_flat = |s: &Step| matches!(s, Step::ToFlat { .. });
            // What the folds remove is there to compare against, and gone when folded:
            // the MLP's scaling feeds a Gemm (folded), the CNN's a convolution (kept);
            // the CNN's Flatten feeds its Gemm (folded).
            assert_eq!(kinds(&unfolded, affine), 1, "{name}");
            if name == "mlp" {
                assert_eq!(kinds(&folded, affine), 0);
            } else {
                assert_eq!(kinds(&unfolded, to_flat), 1);
                assert_eq!(kinds(&folded, to_flat), 0);
            }
            let rows = 37;
            let input = pixels(rows);
            let a = folded.run(&mut FusedState::default(), input.clone(), rows);
            let b = unfolded.run(&mut FusedState::default(), input, rows);
            assert_eq!(a.len(), rows * 10);
            for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                assert!((x - y).abs() <= 1e-5, "{name}, output {i}: {x} vs {y}");
            }
        }
    }
}
