//! `cargo xtask bench` and `cargo xtask demo`: handed, arguments untouched, to the
//! `gocast-bench` crate.
//!
//! The benchmarks, the charts of `docs/benchmarks.md` and the demo live there, outside the
//! workspace's default members, so a plain `cargo build`/`cargo test` (and this task runner)
//! never compiles them or their dependencies. `gocast-bench` parses the arguments, so its
//! `--help` is the one users see.

use std::os::unix::process::CommandExt as _;

use anyhow::{Context, Result};

use crate::{cmd, workspace_root};

/// The package that holds the benchmarks and the demo.
const PACKAGE: &str = "gocast-bench";

/// Replaces this process with `cargo run --quiet --package gocast-bench -- <task> <args>`.
///
/// The dev profile, as when the benchmarks were part of xtask: they build and time the agent
/// with the release profile themselves. Exec, as in `cargo xtask run`, so Ctrl-C reaches the
/// demo's cleanup directly and its exit code is ours. Returns only if exec fails.
pub fn run(task: &str, args: &[String]) -> Result<()> {
    let mut command = cmd::cargo(&workspace_root());
    command
        .args(["run", "--quiet", "--package", PACKAGE, "--", task])
        .args(args);
    let error = command.exec();
    Err(error).with_context(|| format!("failed to exec `{}`", cmd::display(&command)))
}
