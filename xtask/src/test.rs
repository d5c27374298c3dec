//! `cargo xtask test`: the single entry point that runs every check, locally and in CI.

use anyhow::{Context, Result};
use clap::Args;

use crate::{build_ebpf, cmd, package, packages, release, workspace_root};

/// The eBPF crate: `no_std`/`no_main` for `bpfel-unknown-none`, built only by `cargo xtask
/// build-ebpf` (nightly, `bpf-linker`). `--workspace` would compile it for the host, where it
/// cannot link, so every workspace-wide step leaves it out. `--workspace` does take the other
/// non-default member, `gocast-bench`, so the benchmarks are linted and unit-tested here.
const EBPF_PACKAGE: &str = "gocast-ebpf";

/// Arguments of `cargo xtask test`.
#[derive(Debug, Args)]
pub struct TestArgs {
    /// Arguments for the test binaries, passed after `cargo test --workspace --`
    /// (e.g. a name filter, `--nocapture`, `--test-threads=1`).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "TEST_ARGS"
    )]
    args: Vec<String>,
}

/// Runs host setup, formatting, lints, the eBPF object and agent builds, the package check and
/// the whole test suite, stopping at the first failing step.
///
/// The environment is inherited throughout so switches like `GOCAST_REQUIRE_PRIVILEGED` reach the
/// tests.
pub fn run(args: &TestArgs) -> Result<()> {
    let root = workspace_root();

    step("packages", || {
        packages::ensure_debian_packages()?;
        packages::ensure_rust_components()
    })?;
    step("fmt", || {
        cmd::run(cmd::cargo(&root).args(["fmt", "--all", "--", "--check"]))
    })?;
    step("clippy", || {
        cmd::run(cmd::cargo(&root).args([
            "clippy",
            "--workspace",
            "--exclude",
            EBPF_PACKAGE,
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))
    })?;
    // The agent embeds the eBPF object when it is built (gocast-agent/build.rs); with it, the
    // BPF_PROG_TEST_RUN tests and the eBPF end-to-end suite run instead of being skipped.
    step("ebpf", || build_ebpf::run().map(drop))?;
    // The end-to-end tests (package `gocast-tests`) start the agent's binary themselves, and
    // `cargo test` only builds a binary for integration tests of the binary's own package: they
    // run the binary as it ships, glibc linked statically ([`release`]), named by
    // `GOCAST_AGENT_BIN`.
    let agent = step("build", || release::build_agent("dev"))?;
    // The Debian package of that build: files, conffiles, unit, shipped config.
    step("package", package::check)?;
    step("test", || {
        if let Some(value) = std::env::var_os("GOCAST_REQUIRE_PRIVILEGED") {
            println!("GOCAST_REQUIRE_PRIVILEGED={}", value.to_string_lossy());
        }
        cmd::run(
            cmd::cargo(&root)
                .env(release::AGENT_BIN_VAR, &agent)
                .args(["test", "--workspace", "--exclude", EBPF_PACKAGE, "--"])
                .args(&args.args),
        )
    })?;

    println!("==> all steps passed");
    Ok(())
}

/// Prints the `==> name` header, runs the step, and names the step in any error.
fn step<T>(name: &str, body: impl FnOnce() -> Result<T>) -> Result<T> {
    println!("==> {name}");
    body().with_context(|| format!("step `{name}` failed"))
}
