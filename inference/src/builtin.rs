//! The bundled models, compiled into the binary so `switchyard serve` works from any
//! directory with no files beside it. Made by `scripts/make_models.py`.

/// `builtin:digits_mlp`: MLP 64-64-10 on raw 8x8 digit pixels (0–16).
pub const DIGITS_MLP: &[u8] = include_bytes!("../../models/digits_mlp.onnx");
/// `builtin:digits_cnn`: CNN conv3x3(8)-conv3x3(16)-maxpool2-dense(10).
pub const DIGITS_CNN: &[u8] = include_bytes!("../../models/digits_cnn.onnx");

/// The bytes of a built-in model by name (`digits_mlp`, `digits_cnn`).
pub fn get(name: &str) -> Option<&'static [u8]> {
    match name {
        "digits_mlp" => Some(DIGITS_MLP),
        "digits_cnn" => Some(DIGITS_CNN),
        _ => None,
    }
}

/// The names [`get`] knows.
pub const NAMES: &[&str] = &["digits_mlp", "digits_cnn"];
