//! What a model takes and gives: names, shapes (with a symbolic batch dimension) and
//! element types, read from the model itself.

/// One dimension of a tensor's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dim {
    /// The batch dimension: any number of rows.
    Batch,
    /// A fixed size.
    Fixed(usize),
}

/// One input or output tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// The tensor's name in the graph.
    pub name: String,
    /// Its shape; the first dimension is [`Dim::Batch`].
    pub shape: Vec<Dim>,
    /// Element type, as the V2 protocol names it (`FP32`).
    pub datatype: &'static str,
}

impl TensorSpec {
    /// Elements in one row (the product of the fixed dimensions).
    pub fn row_len(&self) -> usize {
        self.shape
            .iter()
            .map(|d| match d {
                Dim::Batch => 1,
                Dim::Fixed(n) => *n,
            })
            .product()
    }

    /// The shape with the batch dimension as `-1` (V2 metadata's convention).
    pub fn shape_i64(&self) -> Vec<i64> {
        self.shape
            .iter()
            .map(|d| match d {
                Dim::Batch => -1,
                Dim::Fixed(n) => *n as i64,
            })
            .collect()
    }
}

/// A model's signature: one FP32 input and one FP32 output, both batched on the first
/// dimension. (The runtimes accept only such models today; the loader says so plainly
/// when a model does not fit.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    /// The input.
    pub input: TensorSpec,
    /// The output.
    pub output: TensorSpec,
}
