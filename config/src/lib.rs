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
//! testable and lets `validate`, `serve` and hot reload share one code path;
//! [`restart_needed`] says which changes a reload cannot take.
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
    BanditMode, BanditObjective, BanditRuntime, BanditSpec, Batching, Capture, Config, CpuKernels,
    Fleet, GpuAdapter, HalfLife, Local, LocalRuntime, MissingFeedback, Model, Prior, RedisUrl,
    Shadow, ShadowSampling, UpstreamProtocol, UpstreamUrl, Variant, BUILTIN_MODELS,
};
pub use resilience::{Breaker, Limits, Retry, RetryOn};

/// The keys a running Switchyard cannot change (they size or bind what exists once per
/// process: listeners, threads, the decision log, files held open), in the order the
/// file reference lists them; a reload that changes one is refused.
pub const RESTART_KEYS: &[&str] = &[
    "listen",
    "admin_listen",
    "worker_threads",
    "max_connections",
    "listen_backlog",
    "client_header_timeout",
    "client_body_timeout",
    "client_send_timeout",
    "drain_timeout",
    "seed",
    "state_file",
    "admin_token_file",
    "feedback_token_file",
    "bandit.decision_log_capacity",
    "bandit.decisions_file",
    "fleet",
];

/// Which of [`RESTART_KEYS`] differ between the live config and the next one.
pub fn restart_needed(live: &Config, next: &Config) -> Vec<&'static str> {
    let (a, b) = (live, next);
    let differs = [
        a.listen != b.listen,
        a.admin_listen != b.admin_listen,
        a.worker_threads != b.worker_threads,
        a.max_connections != b.max_connections,
        a.listen_backlog != b.listen_backlog,
        a.client_header_timeout != b.client_header_timeout,
        a.client_body_timeout != b.client_body_timeout,
        a.client_send_timeout != b.client_send_timeout,
        a.drain_timeout != b.drain_timeout,
        a.seed != b.seed,
        a.state_file != b.state_file,
        a.admin_token_file != b.admin_token_file,
        a.feedback_token_file != b.feedback_token_file,
        a.bandit.decision_log_capacity != b.bandit.decision_log_capacity,
        a.bandit.decisions_file != b.bandit.decisions_file,
        a.fleet != b.fleet,
    ];
    RESTART_KEYS
        .iter()
        .zip(differs)
        .filter_map(|(k, d)| d.then_some(*k))
        .collect()
}

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

#[cfg(test)]
mod tests {
    use super::*;

    /// Each restart-only key, changed alone, is named alone (the list and the
    /// comparisons stay in step); a change to a live key names none.
    #[test]
    fn restart_needed_names_each_key_it_refuses() {
        let live = from_yaml_str(
            "models:\n  m:\n    variants:\n      - {name: a, upstream: \"http://127.0.0.1:1\", weight: 1}\n",
        )
        .unwrap();
        type Change = (&'static str, fn(&mut Config));
        let changes: [Change; 16] = [
            ("listen", |c| c.listen = "127.0.0.1:1".parse().unwrap()),
            ("admin_listen", |c| {
                c.admin_listen = "127.0.0.1:2".parse().unwrap()
            }),
            ("worker_threads", |c| c.worker_threads = Some(3)),
            ("max_connections", |c| c.max_connections += 1),
            ("listen_backlog", |c| c.listen_backlog += 1),
            ("client_header_timeout", |c| c.client_header_timeout *= 2),
            ("client_body_timeout", |c| c.client_body_timeout *= 2),
            ("client_send_timeout", |c| c.client_send_timeout *= 2),
            ("drain_timeout", |c| c.drain_timeout *= 2),
            ("seed", |c| c.seed = Some(7)),
            ("state_file", |c| c.state_file = Some("s".into())),
            ("admin_token_file", |c| {
                c.admin_token_file = Some("t".into())
            }),
            ("feedback_token_file", |c| {
                c.feedback_token_file = Some("f".into())
            }),
            ("bandit.decision_log_capacity", |c| {
                c.bandit.decision_log_capacity += 1
            }),
            ("bandit.decisions_file", |c| {
                c.bandit.decisions_file = Some("d".into())
            }),
            ("fleet", |c| {
                c.fleet = Some(crate::Fleet {
                    redis: crate::RedisUrl::parse("redis://127.0.0.1").unwrap(),
                    key_prefix: "p".into(),
                    sync_interval: std::time::Duration::from_secs(1),
                    key_file: None,
                })
            }),
        ];
        assert_eq!(changes.len(), RESTART_KEYS.len());
        for (key, change) in changes {
            let mut next = live.clone();
            change(&mut next);
            assert_eq!(restart_needed(&live, &next), [key]);
        }
        let mut next = live.clone();
        next.max_body_bytes += 1;
        next.request_timeout *= 2;
        assert!(restart_needed(&live, &next).is_empty());
    }
}
