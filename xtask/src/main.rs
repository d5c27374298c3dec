//! `cargo xtask <task>`: parses the command line and runs the task from the library.

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use xtask::{build_ebpf, delegate, package, run, test};

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
    #[command(disable_help_flag = true)]
    Bench(Delegated),
    /// Build everything, then narrate an anycast lab in network namespaces: BIRD with ECMP,
    /// two hosts running gocast for one VIP, a client; a service fails and recovers. Needs root.
    #[command(disable_help_flag = true)]
    Demo(Delegated),
    /// Build the Debian package (`target/debian/gocast_*.deb`, release profile) and check its
    /// contents; `--check` packages the debug binary instead, as `cargo xtask test` does.
    Package(package::PackageArgs),
    /// Provision nightly, rust-src and bpf-linker if missing, then build the eBPF object to
    /// `target/bpfel-unknown-none/release/gocast-ebpf`.
    BuildEbpf,
}

/// Arguments of a task that `gocast-bench` runs: passed on as given, `--help` included.
#[derive(Debug, Args)]
struct Delegated {
    /// Arguments for `gocast-bench` (`--help` lists them).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "ARGS"
    )]
    args: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Run(args) => run::run(&args),
        Task::Test(args) => test::run(&args),
        Task::Bench(args) => delegate::run("bench", &args.args),
        Task::Demo(args) => delegate::run("demo", &args.args),
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
