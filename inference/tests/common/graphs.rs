//! Random ONNX graphs inside the fused kernels' operator set, built with the crate's
//! ONNX types (`switchyard_inference::onnx`): MLPs (Gemm with and without transB,
//! alpha, beta and bias; MatMul; scalar Mul/Add/Sub/Div; Relu; Softmax) and CNNs
//! (Reshape to NCHW, Conv with odd channel counts, kernel sizes, strides and pads, Relu,
//! MaxPool, Flatten or Reshape, Gemm, Softmax), at odd sizes: the shapes the AVX kernels
//! take and those they leave to im2col and sgemm. Seeded: a failing graph is reproduced
//! from its seed.

use prost::Message;
use switchyard_inference::onnx as pb;

/// SplitMix64: deterministic and dependency-free.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub fn int(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }

    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.int(0, from.len() - 1)]
    }

    /// `n` values uniform in ±`scale`.
    pub fn floats(&mut self, n: usize, scale: f64) -> Vec<f32> {
        (0..n)
            .map(|_| ((self.unit() * 2.0 - 1.0) * scale) as f32)
            .collect()
    }
}

/// A graph under construction.
struct Graph {
    nodes: Vec<pb::NodeProto>,
    inits: Vec<pb::TensorProto>,
    next: usize,
    /// What the graph was made of, for failure messages.
    story: Vec<String>,
}

fn attr_int(name: &str, i: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i,
        ..Default::default()
    }
}

fn attr_ints(name: &str, ints: &[i64]) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Ints as i32,
        ints: ints.to_vec(),
        ..Default::default()
    }
}

fn attr_float(name: &str, f: f32) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Float as i32,
        f,
        ..Default::default()
    }
}

/// `graph` as an ONNX file (IR version 8, operator set 13).
pub fn encode(graph: pb::GraphProto) -> Vec<u8> {
    let model = pb::ModelProto {
        ir_version: 8,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        graph: Some(graph),
        ..Default::default()
    };
    model.encode_to_vec()
}

/// A `[N, width]` FP32 tensor's description, `N` symbolic.
pub fn value_info(name: &str, width: usize) -> pb::ValueInfoProto {
    use pb::tensor_shape_proto::{dimension::Value as D, Dimension};
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: 1,
                shape: Some(pb::TensorShapeProto {
                    dim: vec![
                        Dimension {
                            value: Some(D::DimParam("N".into())),
                        },
                        Dimension {
                            value: Some(D::DimValue(width as i64)),
                        },
                    ],
                }),
            })),
        }),
    }
}

impl Graph {
    fn new() -> Self {
        Graph {
            nodes: Vec::new(),
            inits: Vec::new(),
            next: 0,
            story: Vec::new(),
        }
    }

    fn name(&mut self, prefix: &str) -> String {
        self.next += 1;
        format!("{prefix}{}", self.next)
    }

    fn floats(&mut self, dims: &[usize], data: Vec<f32>) -> String {
        let name = self.name("w");
        self.inits.push(pb::TensorProto {
            name: name.clone(),
            dims: dims.iter().map(|d| *d as i64).collect(),
            data_type: 1,
            float_data: data,
            ..Default::default()
        });
        name
    }

    fn ints(&mut self, data: &[i64]) -> String {
        let name = self.name("s");
        self.inits.push(pb::TensorProto {
            name: name.clone(),
            dims: vec![data.len() as i64],
            data_type: 7,
            int64_data: data.to_vec(),
            ..Default::default()
        });
        name
    }

    fn node(&mut self, op: &str, inputs: Vec<String>, attrs: Vec<pb::AttributeProto>) -> String {
        let out = self.name("v");
        self.nodes.push(pb::NodeProto {
            input: inputs,
            output: vec![out.clone()],
            op_type: op.into(),
            attribute: attrs,
            ..Default::default()
        });
        out
    }

    fn encode(self, input_len: usize, output: &str, output_len: usize) -> (Vec<u8>, String) {
        let graph = pb::GraphProto {
            name: "generated".into(),
            node: self.nodes,
            initializer: self.inits,
            input: vec![value_info("x", input_len)],
            output: vec![value_info(output, output_len)],
        };
        (encode(graph), self.story.join(" → "))
    }

    /// Ends the graph at `x` (`k` wide), maybe through a `Softmax`.
    fn finish(mut self, rng: &mut Rng, x: String, input_len: usize, k: usize) -> Generated {
        let x = self.maybe_softmax(rng, x);
        let (bytes, story) = self.encode(input_len, &x, k);
        Generated {
            bytes,
            input_len,
            output_len: k,
            story,
        }
    }

    /// A scalar `Mul`/`Add`/`Sub`/`Div` now and then.
    fn maybe_affine(&mut self, rng: &mut Rng, x: String) -> String {
        if !rng.chance(0.3) {
            return x;
        }
        let op = rng.pick(&["Mul", "Add", "Sub", "Div"]);
        let k = rng.pick(&[0.5f32, 2.0, -1.5, 0.0625]);
        self.story.push(format!("{op} {k}"));
        let c = self.floats(&[], vec![k]);
        self.node(op, vec![x, c], vec![])
    }

    /// A dense layer from `k` to `m`, as Gemm (any of its attributes) or MatMul.
    fn dense(&mut self, rng: &mut Rng, x: String, k: usize, m: usize) -> String {
        let scale = 1.0 / (k as f64).sqrt();
        if rng.chance(0.25) {
            self.story.push(format!("MatMul {k}×{m}"));
            let w = rng.floats(k * m, scale);
            let w = self.floats(&[k, m], w);
            return self.node("MatMul", vec![x, w], vec![]);
        }
        let trans_b = rng.chance(0.5);
        let w = rng.floats(k * m, scale);
        let w = if trans_b {
            self.floats(&[m, k], w)
        } else {
            self.floats(&[k, m], w)
        };
        let mut inputs = vec![x, w];
        let mut attrs = vec![attr_int("transB", i64::from(trans_b))];
        let alpha = rng.pick(&[1.0f32, 0.5, 2.0]);
        let beta = rng.pick(&[1.0f32, 0.25]);
        if alpha != 1.0 {
            attrs.push(attr_float("alpha", alpha));
        }
        if beta != 1.0 {
            attrs.push(attr_float("beta", beta));
        }
        let bias = match rng.int(0, 3) {
            0 => "no bias",
            1 => {
                let b = rng.floats(m, 0.5);
                inputs.push(self.floats(&[m], b));
                "bias [M]"
            }
            2 => {
                let b = rng.floats(m, 0.5);
                inputs.push(self.floats(&[1, m], b));
                "bias [1,M]"
            }
            _ => {
                let b = rng.floats(1, 0.5);
                inputs.push(self.floats(&[1], b));
                "scalar bias"
            }
        };
        self.story.push(format!(
            "Gemm {k}×{m} transB={trans_b} alpha={alpha} beta={beta} {bias}"
        ));
        self.node("Gemm", inputs, attrs)
    }

    fn maybe_relu(&mut self, rng: &mut Rng, x: String) -> String {
        if rng.chance(0.6) {
            self.story.push("Relu".into());
            self.node("Relu", vec![x], vec![])
        } else {
            x
        }
    }

    fn maybe_softmax(&mut self, rng: &mut Rng, x: String) -> String {
        if rng.chance(0.5) {
            let axis = rng.pick(&[1i64, -1]);
            self.story.push(format!("Softmax axis {axis}"));
            self.node("Softmax", vec![x], vec![attr_int("axis", axis)])
        } else {
            x
        }
    }
}

/// A generated model: its bytes, its input and output widths, and what it is made of.
pub struct Generated {
    pub bytes: Vec<u8>,
    pub input_len: usize,
    pub output_len: usize,
    pub story: String,
}

/// An MLP of one to three dense layers over an input of 1 to 70 features.
pub fn mlp(rng: &mut Rng) -> Generated {
    let mut g = Graph::new();
    let input_len = rng.int(1, 70);
    g.story.push(format!("x[N,{input_len}]"));
    let mut x = g.maybe_affine(rng, "x".into());
    let mut k = input_len;
    let layers = rng.int(1, 3);
    for layer in 0..layers {
        let m = rng.pick(&[1, 3, 7, 8, 10, 16, 17, 33, 40]);
        x = g.dense(rng, x, k, m);
        if layer + 1 < layers {
            x = g.maybe_relu(rng, x);
        }
        k = m;
    }
    g.finish(rng, x, input_len, k)
}

/// A CNN: a flat input reshaped to `[N, C, H, W]`, one or two convolutions (each maybe
/// followed by Relu and MaxPool), flattened into one or two dense layers.
pub fn cnn(rng: &mut Rng) -> Generated {
    let mut g = Graph::new();
    let (mut c, mut h, mut w) = (rng.pick(&[1, 2, 3, 5]), rng.int(3, 9), rng.int(3, 9));
    let input_len = c * h * w;
    g.story.push(format!("x[N,{input_len}] as [{c},{h},{w}]"));
    let x = g.maybe_affine(rng, "x".into());
    let shape = g.ints(&[-1, c as i64, h as i64, w as i64]);
    let mut x = g.node("Reshape", vec![x, shape], vec![]);
    for _ in 0..rng.int(1, 2) {
        let m = rng.pick(&[1, 3, 5, 8, 12, 16, 24, 32, 40]);
        let (kh, kw) = (rng.int(1, 3.min(h)), rng.int(1, 3.min(w)));
        let stride = rng.int(1, 2);
        let pads: Vec<usize> = (0..4).map(|_| rng.int(0, 1)).collect();
        let (oh, ow) = (
            (h + pads[0] + pads[2] - kh) / stride + 1,
            (w + pads[1] + pads[3] - kw) / stride + 1,
        );
        let wts = rng.floats(m * c * kh * kw, 1.0 / ((c * kh * kw) as f64).sqrt());
        let wts = g.floats(&[m, c, kh, kw], wts);
        let mut inputs = vec![x, wts];
        if rng.chance(0.7) {
            let b = rng.floats(m, 0.5);
            inputs.push(g.floats(&[m], b));
        }
        g.story.push(format!(
            "Conv {c}→{m} {kh}×{kw} stride {stride} pads {pads:?}"
        ));
        x = g.node(
            "Conv",
            inputs,
            vec![
                attr_ints("kernel_shape", &[kh as i64, kw as i64]),
                attr_ints("strides", &[stride as i64, stride as i64]),
                attr_ints("pads", &pads.iter().map(|p| *p as i64).collect::<Vec<_>>()),
            ],
        );
        (c, h, w) = (m, oh, ow);
        x = g.maybe_relu(rng, x);
        if h >= 2 && w >= 2 && rng.chance(0.5) {
            let s = rng.int(1, 2);
            g.story.push(format!("MaxPool 2 stride {s}"));
            x = g.node(
                "MaxPool",
                vec![x],
                vec![
                    attr_ints("kernel_shape", &[2, 2]),
                    attr_ints("strides", &[s as i64, s as i64]),
                ],
            );
            (h, w) = ((h - 2) / s + 1, (w - 2) / s + 1);
        }
    }
    let flat = c * h * w;
    x = if rng.chance(0.5) {
        g.story.push("Flatten".into());
        g.node("Flatten", vec![x], vec![attr_int("axis", 1)])
    } else {
        g.story.push(format!("Reshape [-1,{flat}]"));
        let shape = g.ints(&[-1, flat as i64]);
        g.node("Reshape", vec![x, shape], vec![])
    };
    let x = g.maybe_affine(rng, x);
    let m = rng.pick(&[1, 4, 10, 13]);
    let mut x = g.dense(rng, x, flat, m);
    let mut k = m;
    if rng.chance(0.4) {
        x = g.maybe_relu(rng, x);
        let m2 = rng.pick(&[2, 9, 16]);
        x = g.dense(rng, x, k, m2);
        k = m2;
    }
    g.finish(rng, x, input_len, k)
}

impl Graph {
    /// A dense layer as exporters also write it: `MatMul` then an `Add` (either operand
    /// order) or `Sub` of a `[M]` or `[1, M]` bias; otherwise as [`Graph::dense`].
    fn dense_with_bias_node(&mut self, rng: &mut Rng, x: String, k: usize, m: usize) -> String {
        if rng.chance(0.4) {
            return self.dense(rng, x, k, m);
        }
        let w = rng.floats(k * m, 1.0 / (k as f64).sqrt());
        let w = self.floats(&[k, m], w);
        let y = self.node("MatMul", vec![x, w], vec![]);
        let b = rng.floats(m, 0.5);
        let dims: &[usize] = if rng.chance(0.5) { &[m] } else { &[1, m] };
        let b = self.floats(dims, b);
        let (op, inputs) = match rng.int(0, 2) {
            0 => ("Add", vec![y, b]),
            1 => ("Add", vec![b, y]),
            _ => ("Sub", vec![y, b]),
        };
        self.story
            .push(format!("MatMul {k}×{m} + {op} bias {dims:?}"));
        self.node(op, inputs, vec![])
    }

    /// Now and then a `BatchNormalization` over `channels` (right after the layer that
    /// made `x`, as exporters leave it).
    fn maybe_batch_norm(&mut self, rng: &mut Rng, x: String, channels: usize) -> String {
        if !rng.chance(0.5) {
            return x;
        }
        let scale = rng.floats(channels, 1.5);
        let shift = rng.floats(channels, 0.5);
        let mean = rng.floats(channels, 0.5);
        let var = (0..channels)
            .map(|_| (0.1 + rng.unit() * 1.9) as f32)
            .collect();
        let inputs = vec![
            x,
            self.floats(&[channels], scale),
            self.floats(&[channels], shift),
            self.floats(&[channels], mean),
            self.floats(&[channels], var),
        ];
        let epsilon = rng.pick(&[1e-5f32, 1e-3]);
        self.story.push(format!("BatchNormalization ε={epsilon}"));
        self.node(
            "BatchNormalization",
            inputs,
            vec![attr_float("epsilon", epsilon)],
        )
    }

    /// An activation of the wider set, or none.
    fn activation(&mut self, rng: &mut Rng, x: String) -> String {
        match rng.int(0, 4) {
            0 => x,
            1 => {
                self.story.push("Sigmoid".into());
                self.node("Sigmoid", vec![x], vec![])
            }
            2 => {
                self.story.push("Tanh".into());
                self.node("Tanh", vec![x], vec![])
            }
            3 => {
                let alpha = rng.pick(&[0.01f32, 0.2]);
                self.story.push(format!("LeakyRelu {alpha}"));
                self.node("LeakyRelu", vec![x], vec![attr_float("alpha", alpha)])
            }
            _ => self.maybe_relu(rng, x),
        }
    }

    /// Now and then an `Identity` or an inference `Dropout` (with or without its ratio).
    fn maybe_no_op(&mut self, rng: &mut Rng, x: String) -> String {
        match rng.int(0, 3) {
            0 => {
                self.story.push("Identity".into());
                self.node("Identity", vec![x], vec![])
            }
            1 => {
                self.story.push("Dropout".into());
                self.node("Dropout", vec![x], vec![])
            }
            2 => {
                self.story.push("Dropout ratio 0.5".into());
                let ratio = self.floats(&[], vec![0.5]);
                self.node("Dropout", vec![x, ratio], vec![])
            }
            _ => x,
        }
    }
}

/// A graph over the operators exporters add around the core set: `MatMul` + `Add`/`Sub`
/// biases, `BatchNormalization` after a `Conv` or a dense layer, `Sigmoid`, `Tanh`,
/// `LeakyRelu`, `Identity` and `Dropout`; an MLP or a CNN, as the first draw says.
pub fn wider(rng: &mut Rng) -> Generated {
    let mut g = Graph::new();
    let (input_len, mut x, mut k) = if rng.chance(0.5) {
        let input_len = rng.int(1, 40);
        g.story.push(format!("x[N,{input_len}]"));
        (input_len, "x".to_string(), input_len)
    } else {
        let (c, h, w) = (rng.pick(&[1, 2, 3]), rng.int(3, 7), rng.int(3, 7));
        let input_len = c * h * w;
        g.story.push(format!("x[N,{input_len}] as [{c},{h},{w}]"));
        let shape = g.ints(&[-1, c as i64, h as i64, w as i64]);
        let x = g.node("Reshape", vec!["x".into(), shape], vec![]);
        let m = rng.pick(&[3, 8, 16]);
        let (kh, kw) = (rng.int(1, 3.min(h)), rng.int(1, 3.min(w)));
        let wts = rng.floats(m * c * kh * kw, 1.0 / ((c * kh * kw) as f64).sqrt());
        let wts = g.floats(&[m, c, kh, kw], wts);
        let mut inputs = vec![x, wts];
        if rng.chance(0.5) {
            let b = rng.floats(m, 0.5);
            inputs.push(g.floats(&[m], b));
        }
        g.story.push(format!("Conv {c}→{m} {kh}×{kw}"));
        let x = g.node(
            "Conv",
            inputs,
            vec![attr_ints("kernel_shape", &[kh as i64, kw as i64])],
        );
        let x = g.maybe_batch_norm(rng, x, m);
        let x = g.activation(rng, x);
        let x = g.maybe_no_op(rng, x);
        let flat = m * (h - kh + 1) * (w - kw + 1);
        g.story.push("Flatten".into());
        let x = g.node("Flatten", vec![x], vec![attr_int("axis", 1)]);
        (input_len, x, flat)
    };
    for _ in 0..rng.int(1, 2) {
        let m = rng.pick(&[1, 5, 8, 13, 24]);
        x = g.dense_with_bias_node(rng, x, k, m);
        x = g.maybe_batch_norm(rng, x, m);
        x = g.activation(rng, x);
        x = g.maybe_no_op(rng, x);
        k = m;
    }
    g.finish(rng, x, input_len, k)
}

/// Compares two runs' outputs: within 1e-4, relative to the value's size above 1.
pub fn close(a: &[f32], b: &[f32]) -> Result<(), String> {
    if a.len() != b.len() {
        return Err(format!("{} outputs vs {}", a.len(), b.len()));
    }
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let tol = 1e-4 * y.abs().max(1.0);
        if x.is_nan() || y.is_nan() || (x - y).abs() > tol {
            return Err(format!("output {i}: {x} vs {y}"));
        }
    }
    Ok(())
}
