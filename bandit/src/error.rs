//! The bandit's error type.

/// A feedback value the objective cannot use.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BanditError {
    /// NaN or infinite.
    #[error("`{field}` must be a finite number, got {value}")]
    NotFinite {
        /// Which field.
        field: &'static str,
        /// The value.
        value: f64,
    },
    /// The feedback has no field this objective reads, or one it cannot take.
    #[error("{0}")]
    WrongKind(String),
}
