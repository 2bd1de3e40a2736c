//! Coverage-guided fuzz targets for the registry and the agent, run with
//! `cargo fuzz` (see docs/FUZZING.md). Each target is a thin
//! `fuzz_target!` over one module here:
//!
//! - [`decode`]: arbitrary bytes decoded as each request message and put
//!   through the server's validation;
//! - [`registry_ops`]: arbitrary sequences of operations on a
//!   [`registry_server::registry::Registry`], checked against a reference
//!   model and the registry's own invariants after every step;
//! - [`agent`]: arbitrary text parsed as the agent's TOML config, a
//!   `--pool` value and a handoff file.
//!
//! A broken rule is a panic, which libFuzzer reports as a crash with the
//! input that caused it.

pub mod agent;
pub mod decode;
pub mod registry_ops;
