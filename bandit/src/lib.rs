//! Thompson-sampling bandits that move a model's traffic weights: pure math, no I/O, no
//! async, so every decision can be replayed from a seed.
//!
//! - [`posterior`]: what we believe about one variant's reward. Beta–Bernoulli for 0/1
//!   outcomes; Normal–Inverse-Gamma (unknown mean and variance) for real-valued rewards.
//!   Both support exponential forgetting ([`Posterior::decay`]) for a world that drifts.
//! - [`objective`]: turns a feedback event into a reward: `conversion` (0/1), `revenue`,
//!   or `profit` (revenue minus the variant's cost per prediction).
//! - [`policy`]: the probability that each variant is best (Monte Carlo over posterior
//!   draws), per-request Thompson picks, and the guardrails (exploration floor, largest
//!   step per update, warm-up, pin, freeze) applied before weights are published.
//! - [`detect`]: a change detector per arm (a GLR test over recent rewards), so the
//!   bandit forgets what no longer holds and nothing in a world that stands still.
//! - [`engine`]: [`Bandit`], one model's arms: rewards in, guarded weights out.
//! - [`simulate`]: seeded worlds (conversion, revenue, profit; delayed and missing
//!   feedback; a best arm that changes) and baselines (fixed split, ε-greedy, Seldon's
//!   truncated Thompson) to measure regret without a network.
//! - [`error`]: the crate's error type, [`BanditError`].
//!
//! Elsewhere, because they do I/O: the decision log and `POST /v1/feedback` are in the
//! router (`switchyard_router::feedback`); the tasks that publish weights, the metrics,
//! `/admin/state`, the state file, the decisions file and the per-request picker are in
//! the runtime crate (`bandit/runtime/`, `switchyard-bandit-runtime`); `switchyard
//! simulate` wraps [`simulate::run`] and `switchyard evaluate` reads the decisions file
//! (`src/simulate.rs`, `src/evaluate.rs`).
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod detect;
pub mod engine;
pub mod error;
pub mod objective;
pub mod policy;
pub mod posterior;
pub mod simulate;

pub use engine::{Bandit, BanditConfig};
pub use error::BanditError;
pub use objective::{Feedback, Objective};
pub use policy::{
    apply_guardrails, p_best, p_best_among, thompson_pick, thompson_pick_among, Guardrails,
    Override,
};
pub use posterior::Posterior;
