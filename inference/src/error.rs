//! The inference crate's error type.

/// What can go wrong loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    /// The model file could not be read or compiled.
    #[error("cannot load model `{model}`: {detail}")]
    Load {
        /// The model's path or built-in name.
        model: String,
        /// What went wrong.
        detail: String,
    },
    /// The model does not have the shape of signature we serve.
    #[error("model `{model}` is not supported: {detail}")]
    Unsupported {
        /// The model.
        model: String,
        /// Why.
        detail: String,
    },
    /// The request's tensor does not fit the signature.
    #[error("{0}")]
    BadInput(String),
    /// The batch queue is full: the request was shed.
    #[error("the model's queue is full ({queued} batches waiting); try again later")]
    Overloaded {
        /// Batches waiting when the request was refused.
        queued: usize,
    },
    /// The model failed while running.
    #[error("inference failed: {0}")]
    Run(String),
    /// The batcher has shut down.
    #[error("the model is shutting down")]
    Closed,
}

impl InferenceError {
    /// [`InferenceError::Load`] for `model`.
    pub(crate) fn load(model: &str, detail: String) -> Self {
        InferenceError::Load {
            model: model.to_string(),
            detail,
        }
    }
}
