//! The part of ONNX's protobuf schema (`onnx.proto`, IR version 3 and later) that the
//! fused kernels read: a model's graph, its nodes and their attributes, constant
//! tensors, and the types and shapes of its inputs and outputs. Field numbers and names
//! are `onnx.proto`'s, and the module layout is what prost generates from it, so a graph
//! built with these types is a valid ONNX file for any reader.
//!
//! Why written out rather than generated or borrowed: a build without the `tract`
//! feature has no ONNX crate, and generating from `onnx.proto` needs `protoc` and a
//! build script for a few dozen fields. Everything not declared here (doc strings,
//! metadata, training info, sub-graphs, sparse tensors, types other than tensors) is
//! skipped by prost's decoder as an unknown field; a graph that needs one of those is
//! outside the fused kernel set anyway.

use prost::Message;

/// Decodes a model file. Only the declared fields are kept.
pub fn decode(bytes: &[u8]) -> Result<ModelProto, prost::DecodeError> {
    ModelProto::decode(bytes)
}

/// A whole ONNX file.
#[derive(Clone, PartialEq, Message)]
pub struct ModelProto {
    /// The IR version the file was written for.
    #[prost(int64, tag = "1")]
    pub ir_version: i64,
    /// The operator sets the graph's nodes come from.
    #[prost(message, repeated, tag = "8")]
    pub opset_import: Vec<OperatorSetIdProto>,
    /// The tool that wrote the file.
    #[prost(string, tag = "2")]
    pub producer_name: String,
    /// The computation.
    #[prost(message, optional, tag = "7")]
    pub graph: Option<GraphProto>,
}

/// An operator set and its version.
#[derive(Clone, PartialEq, Message)]
pub struct OperatorSetIdProto {
    /// Empty (or `ai.onnx`) for the default operator set.
    #[prost(string, tag = "1")]
    pub domain: String,
    /// The operator set's version.
    #[prost(int64, tag = "2")]
    pub version: i64,
}

/// A graph: nodes in topological order, constants, inputs and outputs.
#[derive(Clone, PartialEq, Message)]
pub struct GraphProto {
    /// The nodes, each computing outputs from inputs.
    #[prost(message, repeated, tag = "1")]
    pub node: Vec<NodeProto>,
    /// The graph's name.
    #[prost(string, tag = "2")]
    pub name: String,
    /// Constant tensors (weights), by name.
    #[prost(message, repeated, tag = "5")]
    pub initializer: Vec<TensorProto>,
    /// The graph's inputs (older files list the initializers here too).
    #[prost(message, repeated, tag = "11")]
    pub input: Vec<ValueInfoProto>,
    /// The graph's outputs.
    #[prost(message, repeated, tag = "12")]
    pub output: Vec<ValueInfoProto>,
}

/// One operator application.
#[derive(Clone, PartialEq, Message)]
pub struct NodeProto {
    /// Names of the values read (an empty name is an omitted optional input).
    #[prost(string, repeated, tag = "1")]
    pub input: Vec<String>,
    /// Names of the values written.
    #[prost(string, repeated, tag = "2")]
    pub output: Vec<String>,
    /// The node's name, for messages.
    #[prost(string, tag = "3")]
    pub name: String,
    /// The operator (`Conv`, `Gemm`, …).
    #[prost(string, tag = "4")]
    pub op_type: String,
    /// The operator's domain; empty for ONNX's own.
    #[prost(string, tag = "7")]
    pub domain: String,
    /// The operator's attributes.
    #[prost(message, repeated, tag = "5")]
    pub attribute: Vec<AttributeProto>,
}

/// A named attribute of a node: one of the value fields is set, as `type` says.
#[derive(Clone, PartialEq, Message)]
pub struct AttributeProto {
    /// The attribute's name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Which value field holds the value.
    #[prost(enumeration = "attribute_proto::AttributeType", tag = "20")]
    pub r#type: i32,
    /// A float value.
    #[prost(float, tag = "2")]
    pub f: f32,
    /// An integer value.
    #[prost(int64, tag = "3")]
    pub i: i64,
    /// A string value, as bytes.
    #[prost(bytes = "vec", tag = "4")]
    pub s: Vec<u8>,
    /// A list of floats.
    #[prost(float, repeated, tag = "7")]
    pub floats: Vec<f32>,
    /// A list of integers.
    #[prost(int64, repeated, tag = "8")]
    pub ints: Vec<i64>,
}

/// [`AttributeProto`]'s nested types.
pub mod attribute_proto {
    /// What an attribute holds.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
    #[repr(i32)]
    pub enum AttributeType {
        /// Not set.
        Undefined = 0,
        /// `f`.
        Float = 1,
        /// `i`.
        Int = 2,
        /// `s`.
        String = 3,
        /// A tensor (not read here).
        Tensor = 4,
        /// A sub-graph (not read here).
        Graph = 5,
        /// `floats`.
        Floats = 6,
        /// `ints`.
        Ints = 7,
        /// A list of strings (not read here).
        Strings = 8,
        /// A list of tensors (not read here).
        Tensors = 9,
        /// A list of sub-graphs (not read here).
        Graphs = 10,
        /// A sparse tensor (not read here).
        SparseTensor = 11,
        /// A list of sparse tensors (not read here).
        SparseTensors = 12,
        /// A type (not read here).
        TypeProto = 13,
        /// A list of types (not read here).
        TypeProtos = 14,
    }
}

/// A constant tensor: its data in `raw_data` (little-endian) or in the typed field.
#[derive(Clone, PartialEq, Message)]
pub struct TensorProto {
    /// The shape.
    #[prost(int64, repeated, tag = "1")]
    pub dims: Vec<i64>,
    /// The element type ([`FLOAT`], [`INT64`], …).
    #[prost(int32, tag = "2")]
    pub data_type: i32,
    /// FP32 data, when not in `raw_data`.
    #[prost(float, repeated, tag = "4")]
    pub float_data: Vec<f32>,
    /// INT64 data, when not in `raw_data`.
    #[prost(int64, repeated, tag = "7")]
    pub int64_data: Vec<i64>,
    /// The tensor's name: how nodes refer to it.
    #[prost(string, tag = "8")]
    pub name: String,
    /// The data as little-endian bytes.
    #[prost(bytes = "vec", tag = "9")]
    pub raw_data: Vec<u8>,
}

/// `TensorProto.DataType.FLOAT`.
pub const FLOAT: i32 = 1;
/// `TensorProto.DataType.INT64`.
pub const INT64: i32 = 7;

/// A graph input's or output's name and type.
#[derive(Clone, PartialEq, Message)]
pub struct ValueInfoProto {
    /// The value's name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Its type, when the file states it.
    #[prost(message, optional, tag = "2")]
    pub r#type: Option<TypeProto>,
}

/// A value's type; only tensors are read.
#[derive(Clone, PartialEq, Message)]
pub struct TypeProto {
    /// The type (other kinds, sequences and maps, decode as `None`).
    #[prost(oneof = "type_proto::Value", tags = "1")]
    pub value: Option<type_proto::Value>,
}

/// [`TypeProto`]'s nested types.
pub mod type_proto {
    /// A tensor type: element type and shape.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Tensor {
        /// The element type (`TensorProto.DataType`).
        #[prost(int32, tag = "1")]
        pub elem_type: i32,
        /// The shape, when known.
        #[prost(message, optional, tag = "2")]
        pub shape: Option<super::TensorShapeProto>,
    }

    /// The kinds of type read here.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Value {
        /// A tensor.
        #[prost(message, tag = "1")]
        TensorType(Tensor),
    }
}

/// A tensor's shape: one entry per dimension.
#[derive(Clone, PartialEq, Message)]
pub struct TensorShapeProto {
    /// The dimensions, outermost first.
    #[prost(message, repeated, tag = "1")]
    pub dim: Vec<tensor_shape_proto::Dimension>,
}

/// [`TensorShapeProto`]'s nested types.
pub mod tensor_shape_proto {
    /// One dimension: a size, a symbol, or nothing (unknown).
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Dimension {
        /// The size or the symbol.
        #[prost(oneof = "dimension::Value", tags = "1, 2")]
        pub value: Option<dimension::Value>,
    }

    /// [`Dimension`]'s value.
    pub mod dimension {
        /// A size or a symbol.
        #[derive(Clone, PartialEq, prost::Oneof)]
        pub enum Value {
            /// A fixed size.
            #[prost(int64, tag = "1")]
            DimValue(i64),
            /// A symbol (the batch, for the models served here).
            #[prost(string, tag = "2")]
            DimParam(String),
        }
    }
}
