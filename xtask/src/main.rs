//! Developer tasks for the gocast workspace, invoked as `cargo xtask <task>`.
//!
//! Keeping these in Rust (instead of shell scripts or a Makefile) means the only thing a fresh
//! machine needs is a Rust toolchain; `.ci/run` is a one-line wrapper around `cargo xtask test`.

mod bench;
mod build_ebpf;
mod cmd;
mod demo;
mod package;
mod packages;
mod run;
mod test;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Command line of `cargo xtask`.
#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Developer tasks for the gocast workspace"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

/// The tasks `cargo xtask` knows.
#[derive(Debug, Subcommand)]
enum Task {
    /// Build the eBPF object and the agent, and run it with the given arguments
    /// (e.g. `cargo xtask run -- --config config/minimal.yaml`).
    Run(run::RunArgs),
    /// Run every check CI runs: Debian packages, rustfmt, clippy, eBPF and agent builds, the
    /// `.deb` check, and the whole test suite (e.g. `cargo xtask test -- --nocapture`).
    Test(test::TestArgs),
    /// Build the agent in release mode and print performance figures; needs root
    /// (e.g. `cargo xtask bench bgp`). Never part of `test` or CI.
    Bench(bench::BenchArgs),
    /// Build everything, then narrate an anycast lab in network namespaces: BIRD with ECMP,
    /// two hosts running gocast for one VIP, a client; a service fails and recovers. Needs root.
    Demo,
    /// Build the Debian package (`target/debian/gocast_*.deb`, release profile) and check its
    /// contents; `--check` packages the debug binary instead, as `cargo xtask test` does.
    Package(package::PackageArgs),
    /// Provision nightly, rust-src and bpf-linker if missing, then build the eBPF object to
    /// `target/bpfel-unknown-none/release/gocast-ebpf`.
    BuildEbpf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Run(args) => run::run(&args),
        Task::Test(args) => test::run(&args),
        Task::Bench(args) => bench::run(&args),
        Task::Demo => demo::run(),
        Task::Package(args) => package::run(&args),
        Task::BuildEbpf => build_ebpf::run().map(drop),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root, derived from this crate's manifest directory so it works without
/// `cargo metadata` and regardless of the directory `cargo xtask` was started from.
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    // `xtask/` always sits directly under the root; the fallback is unreachable in practice.
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}
