//! Switchyard's configuration: what the YAML file may say, and whether it is right.
//!
//! - [`yaml`]: parses YAML into a tree of [`yaml::Node`]s that remember their line and
//!   column, so every error can point at the place to fix.
//! - [`decode`]: the walk over that tree; it collects *every* problem (unknown key, wrong
//!   type, bad value) with its YAML path instead of stopping at the first.
//! - [`model`]: the typed configuration ([`Config`], [`Model`], [`Variant`]), one `///`
//!   doc per field; these docs are the source of docs/configuration.md.
//! - [`duration`]: `250ms`, `1s`, `10m`, `1h30m` parsing and printing.
//! - [`hash`]: the fixed hashes sticky routing and hash-sampled shadows rely on.
//! - [`error`]: [`ConfigError`] (one problem, with path and position) and [`ConfigErrors`].
//!
//! This crate does no I/O: callers read the file and hand over the text, which keeps it
//! testable and lets `validate`, `serve` and (later) hot reload share one code path.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod decode;
pub mod duration;
pub mod error;
pub mod hash;
pub mod model;
pub mod resilience;
pub mod yaml;

pub use error::{ConfigError, ConfigErrors};
pub use model::{
    BanditMode, BanditObjective, BanditRuntime, BanditSpec, Batching, Config, CpuKernels,
    GpuAdapter, HalfLife, Local, LocalRuntime, MissingFeedback, Model, Prior, Shadow,
    ShadowSampling, UpstreamProtocol, UpstreamUrl, Variant, BUILTIN_MODELS,
};
pub use resilience::{Breaker, Limits, Retry, RetryOn};

/// Parses and validates a configuration from YAML text.
///
/// Returns every problem found, each with its YAML path and position, or the
/// validated configuration.
pub fn from_yaml_str(text: &str) -> Result<Config, ConfigErrors> {
    from_yaml_str_checked(text, |_| Ok(()))
}

/// As [`from_yaml_str`], and runs `check` on every local model that decoded (reading
/// or loading its file: I/O this crate does not do itself), whether or not the rest of
/// the file has errors, so one run reports them all. A failed check is an error at the
/// variant's `local.model`.
pub fn from_yaml_str_checked(
    text: &str,
    mut check: impl FnMut(&Local) -> Result<(), String>,
) -> Result<Config, ConfigErrors> {
    let root = yaml::parse(text).map_err(|e| ConfigErrors(vec![e]))?;
    let mut cx = decode::Cx::default();
    let config = model::decode_config(&mut cx, &root);
    let checked: Vec<ConfigError> = cx
        .locals()
        .iter()
        .filter_map(|(path, local)| {
            check(local).err().map(|message| ConfigError {
                path: path.clone(),
                line: local.model_at.0,
                column: local.model_at.1,
                message,
            })
        })
        .collect();
    let mut errors = cx.into_errors();
    errors.extend(checked);
    match (config, errors) {
        (Some(config), errors) if errors.is_empty() => Ok(config),
        (_, mut errors) => {
            if errors.is_empty() {
                // A decoder returned None without saying why: a bug, but never an `Ok`.
                errors.push(ConfigError::at(
                    &root,
                    "",
                    "configuration could not be read",
                ));
            }
            errors.sort_by_key(|e| (e.line, e.column));
            Err(ConfigErrors(errors))
        }
    }
}
