//! Shadow traffic: mirroring live requests to candidate variants and comparing their
//! answers with the primary's (issue #5).
//!
//! Not built yet: reserved so the workspace shows the architecture. The router's request
//! path already names the phase where mirroring will hook in (between "choose" and
//! "forward" in `switchyard_router::proxy`).
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]
