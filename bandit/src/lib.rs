//! Thompson-sampling bandits that move a model's traffic weights (issue #4).
//!
//! Not built yet: this crate is reserved so the workspace shows the architecture and the
//! dependency direction (pure math, no tokio, no I/O). The router already exposes the
//! seam it will drive: `switchyard_router::selector::Selector::set_weights`, which swaps a
//! model's weight table atomically, and the probability of every pick.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
