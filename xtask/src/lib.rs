//! Developer tasks for the gocast workspace, invoked as `cargo xtask <task>`.
//!
//! Keeping these in Rust (instead of shell scripts or a Makefile) means the only thing a fresh
//! machine needs is a Rust toolchain; `.ci/run` is a one-line wrapper around `cargo xtask test`.
//!
//! A library as well as the binary, so the benchmarks and the demo (crate `gocast-bench`, which
//! `cargo xtask bench` and `cargo xtask demo` run through [`delegate`]) build the eBPF object and
//! the agent the same way the tasks here do.
//!
//! # Layout
//! - [`build_ebpf`]: the one build path for the eBPF object.
//! - [`run`], [`test`], [`package`]: `cargo xtask run`, `test` and `package`.
//! - [`delegate`]: `cargo xtask bench` and `demo`, handed to `gocast-bench`.
//! - [`release`]: the agent's binary as it ships (glibc linked statically).
//! - [`packages`]: host prerequisites; [`cmd`]: child processes with readable errors.

pub mod build_ebpf;
pub mod cmd;
pub mod delegate;
pub mod package;
pub mod packages;
pub mod release;
pub mod run;
pub mod test;

use std::path::{Path, PathBuf};

/// The workspace root, derived from this crate's manifest directory so it works without
/// `cargo metadata` and regardless of the directory `cargo xtask` was started from.
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    // `xtask/` always sits directly under the root; the fallback is unreachable in practice.
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}
