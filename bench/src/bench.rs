//! `cargo xtask bench <target>`: benchmarks that print figures.
//!
//! Each target builds the agent as it ships ([`release_agent`]: release profile, glibc linked
//! statically) and drives it in network namespaces with the end-to-end helpers of
//! `gocast-tests`, so a benchmark sees the same topologies as the tests. Benchmarks measure and print; they never fail on a missed target
//! (only on a broken setup), and they are not part of `cargo xtask test` or CI.
//!
//! Targets are subcommands of `bench`: `bgp`, `nat`, `memory` and `reload`, each in its own
//! module under `bench/`, sharing the helpers here (release build, percentiles, RSS, verdicts).
//! Without a target (or with `all`) `bgp`, `nat` and `memory` run with their defaults and
//! [`report`] writes `docs/benchmarks.md` and its charts.

mod api;
mod bgp;
mod http;
mod memory;
mod nat;
mod reload;
mod report;

use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use clap::{Args, Subcommand};

use xtask::packages;

/// Arguments of `cargo xtask bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    target: Option<Target>,
}

/// What to benchmark.
#[derive(Debug, Subcommand)]
enum Target {
    /// BGP against BIRD: withdraw convergence after a service dies, start → Established, and
    /// the time and memory to announce many apps.
    Bgp(bgp::BgpArgs),
    /// HTTP through the NAT (direct, eBPF, iptables; short and keepalive connections) and the
    /// XDP program's cost per packet.
    Nat(nat::NatArgs),
    /// The agent's resident memory (`VmRSS`, `VmHWM`) with 0, 100, 1,000 and 10,000 apps.
    Memory(memory::MemoryArgs),
    /// A live reload against a restart with many apps, with BIRD watching for withdrawn routes
    /// and session resets.
    Reload(reload::ReloadArgs),
    /// Registrations and unregistrations per second over the HTTP API, with 32 concurrent
    /// clients at 1,000 and 10,000 apps, without and with iptables NAT, beside a baseline
    /// binary (`--baseline`).
    Api(api::ApiArgs),
    /// `bgp`, `nat` and `memory` with their defaults, then `docs/benchmarks.md` and its
    /// charts under `docs/img/` (the default).
    All,
    /// The HTTP service `nat` loads, run inside its namespace.
    #[command(hide = true)]
    ServeHttp(http::ServeArgs),
    /// The HTTP clients of `api`, run inside the agent's namespace.
    #[command(hide = true)]
    ApiClient(api::ClientArgs),
}

/// Runs the chosen benchmark. Needs root: everything happens in network namespaces.
pub fn run(args: &BenchArgs) -> Result<()> {
    match &args.target {
        Some(Target::ServeHttp(a)) => return http::serve(a),
        Some(Target::ApiClient(a)) => return api::client_main(a),
        _ => {}
    }
    ensure!(
        packages::is_root(),
        "benchmarks build network namespaces: run as root"
    );
    match &args.target {
        Some(Target::Bgp(a)) => bgp::run(a).map(drop),
        Some(Target::Nat(a)) => nat::run(a).map(drop),
        Some(Target::Memory(a)) => memory::run(a).map(drop),
        Some(Target::Reload(a)) => reload::run(a),
        Some(Target::Api(a)) => report::write_api(&api::run(a)?).map(|path| {
            println!("\nwrote the api part of {}", path.display());
        }),
        Some(Target::ServeHttp(a)) => http::serve(a),
        Some(Target::ApiClient(a)) => api::client_main(a),
        Some(Target::All) | None => all(),
    }
}

/// Runs every target with its defaults and writes `docs/benchmarks.md`.
fn all() -> Result<()> {
    let started = SystemTime::now();
    let load_before = report::loadavg();
    let bgp = bgp::run(&defaults("bgp")?).context("bench bgp")?;
    let nat = nat::run(&defaults("nat")?).context("bench nat")?;
    let memory = memory::run(&defaults("memory")?).context("bench memory")?;
    let path = report::write(&report::Reports {
        started,
        load_before,
        load_after: report::loadavg(),
        bgp,
        nat,
        memory,
    })?;
    println!("\nwrote {}", path.display());
    Ok(())
}

/// A target's arguments as its command line would give them with no flags: one source for the
/// defaults, the `#[arg(default_value ..)]`s.
fn defaults<A: Args + clap::FromArgMatches>(name: &'static str) -> Result<A> {
    let command = A::augment_args(clap::Command::new(name));
    let matches = command
        .try_get_matches_from([name])
        .with_context(|| format!("default arguments of bench {name}"))?;
    Ok(A::from_arg_matches(&matches)?)
}

/// Builds the eBPF object and the agent as it ships, release profile
/// (`xtask::release::agent`); returns its path.
pub(crate) fn release_agent() -> Result<std::path::PathBuf> {
    xtask::release::agent("release")
}

/// CPU time the process has used, in ns: the first field of each thread's `schedstat`.
fn cpu_ns(pid: i32) -> Result<u64> {
    let mut total = 0;
    for task in
        std::fs::read_dir(format!("/proc/{pid}/task")).context("reading the agent's tasks")?
    {
        let path = task?.path().join("schedstat");
        // A thread that ended between the listing and the read used no more CPU.
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let ns: u64 = text
            .split_whitespace()
            .next()
            .context("empty schedstat")?
            .parse()
            .with_context(|| format!("{}: {text:?}", path.display()))?;
        total += ns;
    }
    Ok(total)
}

/// A `/proc/PID/status` field in KiB, e.g. `VmRSS` (resident now) or `VmHWM` (peak resident).
fn proc_kib(pid: i32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let Some(value) = status.lines().find_map(|l| {
        l.strip_prefix(field)
            .and_then(|rest| rest.strip_prefix(':'))
    }) else {
        bail!("no {field} in /proc/{pid}/status");
    };
    value
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .with_context(|| format!("{field} of {pid}: {value:?}"))
}

/// Milliseconds with one decimal, the unit every figure is printed in.
fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

/// KiB as MiB with one decimal.
fn mib(kib: u64) -> String {
    // Precision is irrelevant at these sizes; the cast only loses bits above 2^52 KiB.
    #[expect(clippy::cast_precision_loss, reason = "memory sizes far below 2^52")]
    let mib = kib as f64 / 1024.0;
    format!("{mib:.1}")
}

/// `b - a` for wall-clock times that may be out of order by rounding; negative becomes zero.
fn wall_delta(a: SystemTime, b: SystemTime) -> Duration {
    b.duration_since(a).unwrap_or_default()
}

/// Sorted samples with nearest-rank percentiles.
#[derive(Debug, Clone)]
struct Samples(Vec<Duration>);

impl Samples {
    fn new(mut values: Vec<Duration>) -> Self {
        values.sort_unstable();
        Self(values)
    }

    /// The nearest-rank `p`-th percentile (0 < p ≤ 100); zero when empty.
    fn percentile(&self, p: f64) -> Duration {
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss,
            reason = "a rank between 1 and the sample count"
        )]
        let rank = ((p / 100.0) * self.0.len() as f64).ceil().max(1.0) as usize;
        self.0[rank.min(self.0.len()) - 1]
    }

    fn min(&self) -> Duration {
        self.0.first().copied().unwrap_or_default()
    }

    fn max(&self) -> Duration {
        self.0.last().copied().unwrap_or_default()
    }

    fn median(&self) -> Duration {
        self.percentile(50.0)
    }
}

/// `PASS` or `FAIL`: a missed target is reported, never an error.
fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "FAIL" }
}

/// The final table: one row per figure, with its target and verdict where there is one.
#[derive(Debug, Default)]
pub struct Summary {
    rows: Vec<[String; 4]>,
}

impl Summary {
    /// The rows: figure, value, target (or empty), verdict (or empty).
    fn rows(&self) -> &[[String; 4]] {
        &self.rows
    }

    /// A figure without a target.
    fn figure(&mut self, name: &str, value: String) {
        self.rows
            .push([name.to_owned(), value, String::new(), String::new()]);
    }

    /// A figure measured against `target`.
    fn checked(&mut self, name: &str, value: String, target: &str, ok: bool) {
        self.rows.push([
            name.to_owned(),
            value,
            target.to_owned(),
            verdict(ok).to_owned(),
        ]);
    }

    fn print(&self, title: &str) {
        let header = [
            "figure".to_owned(),
            "value".to_owned(),
            "target".to_owned(),
            String::new(),
        ];
        let mut widths = [0; 4];
        for row in std::iter::once(&header).chain(&self.rows) {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        println!("\n== {title} ==");
        for row in std::iter::once(&header).chain(&self.rows) {
            let line = format!(
                "{:<w0$}  {:>w1$}  {:<w2$}  {}",
                row[0],
                row[1],
                row[2],
                row[3],
                w0 = widths[0],
                w1 = widths[1],
                w2 = widths[2],
            );
            println!("{}", line.trim_end());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(values: &[u64]) -> Samples {
        Samples::new(values.iter().map(|&v| Duration::from_millis(v)).collect())
    }

    #[test]
    fn nearest_rank_percentiles() {
        let s = ms(&(1..=100).rev().collect::<Vec<_>>());
        assert_eq!(s.percentile(50.0), Duration::from_millis(50));
        assert_eq!(s.percentile(90.0), Duration::from_millis(90));
        assert_eq!(s.percentile(99.0), Duration::from_millis(99));
        assert_eq!(s.max(), Duration::from_millis(100));
        assert_eq!(s.min(), Duration::from_millis(1));
        let one = ms(&[7]);
        assert_eq!(one.percentile(1.0), Duration::from_millis(7));
        assert_eq!(one.percentile(99.0), Duration::from_millis(7));
        assert_eq!(ms(&[]).median(), Duration::ZERO);
        assert_eq!(ms(&[3, 1, 2, 5, 4]).median(), Duration::from_millis(3));
    }

    #[test]
    fn every_target_has_default_arguments() {
        defaults::<bgp::BgpArgs>("bgp").unwrap();
        defaults::<nat::NatArgs>("nat").unwrap();
        defaults::<memory::MemoryArgs>("memory").unwrap();
        defaults::<api::ApiArgs>("api").unwrap();
    }

    #[test]
    fn mib_has_one_decimal() {
        assert_eq!(mib(1536), "1.5");
    }
}
