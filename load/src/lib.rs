//! `switchyard load`: the load generator (issue #6).
//!
//! Not built yet: reserved so the workspace shows the architecture. It will talk to
//! Switchyard only over the network.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
