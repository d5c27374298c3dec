//! Benchmarks and the demo of the gocast workspace, run as `cargo xtask bench` and
//! `cargo xtask demo` (xtask hands over its arguments as they are).
//!
//! A crate of its own, outside the workspace's default members: the benchmarks, their chart
//! rendering (plotters) and the demo are heavy and needed only when asked for, so a plain
//! `cargo build`/`cargo test` never compiles them. `cargo xtask test` still lints and tests
//! this crate (its steps use `--workspace`).
//!
//! # Layout
//! - [`bench`]: `bench bgp`, `bench nat`, `bench memory`, and `docs/benchmarks.md` with its
//!   charts; the hidden `bench serve-http` is the HTTP service `nat` and the demo load.
//! - [`demo`]: the narrated anycast lab.

mod bench;
mod demo;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Command line of `gocast-bench`, named as users type it (`cargo xtask bench ..`), since
/// `cargo xtask` is what starts it and this is the `--help` they see.
#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Benchmarks and the demo of the gocast workspace"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

/// The tasks of `gocast-bench`; `cargo xtask` lists the same two.
#[derive(Debug, Subcommand)]
enum Task {
    /// Build the agent in release mode and print performance figures; needs root
    /// (e.g. `cargo xtask bench bgp`). Never part of `test` or CI.
    Bench(bench::BenchArgs),
    /// Build everything, then narrate an anycast lab in network namespaces: BIRD with ECMP,
    /// two hosts running gocast for one VIP, a client; a service fails and recovers. Needs root.
    Demo,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Bench(args) => bench::run(&args),
        Task::Demo => demo::run(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
