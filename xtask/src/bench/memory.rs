//! `cargo xtask bench memory`: the agent's resident memory against the number of apps.
//!
//! For each app count, a fresh lab of `bench bgp` (agent ↔ BIRD), a TCP listener in the agent's
//! namespace and a config of that many apps (IPv6 /128 VIPs), each with a `port:tcp` monitor
//! on that listener, so every app is checked, healthy, on `lo` and announced. Started with
//! [`bgp::scale_run`], which returns when BIRD holds every route; after a few more monitor
//! ticks the agent's `VmRSS` (resident now) and `VmHWM` (peak resident) are read.

use std::{path::Path, thread, time::Duration};

use anyhow::{Context, Result, ensure};
use clap::Args;

use super::{
    Summary,
    bgp::{self, Lab, Listener},
    mib, ms, proc_kib, release_agent,
};

/// The port every app's monitor checks.
const PORT: u16 = 8091;
/// The agent's `monitor_interval` here.
const INTERVAL: Duration = Duration::from_secs(1);

/// Arguments of `cargo xtask bench memory`.
#[derive(Debug, Args)]
pub struct MemoryArgs {
    /// App counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [0, 100, 1_000, 10_000])]
    apps: Vec<u32>,
    /// Seconds to let the agent run after BIRD holds every route, before reading its memory.
    #[arg(long, default_value_t = 3)]
    settle_s: u64,
    /// How long to wait for BIRD to hold every route, in seconds.
    #[arg(long, default_value_t = 120)]
    timeout_s: u64,
    /// Benchmark this agent binary instead of building `target/release/gocast`.
    #[arg(long, value_name = "PATH")]
    agent: Option<std::path::PathBuf>,
}

/// One app count's figures.
#[derive(Debug, Clone, Copy)]
pub struct MemoryRow {
    pub apps: u32,
    /// `VmRSS` after settling, KiB.
    pub rss_kib: u64,
    /// `VmHWM` after settling, KiB.
    pub hwm_kib: u64,
    /// Spawn → BIRD holds every route.
    pub all_at_bird: Duration,
}

/// What `bench memory` measured, for `docs/benchmarks.md`.
#[derive(Debug, Default)]
pub struct MemoryReport {
    pub rows: Vec<MemoryRow>,
    pub summary: Summary,
}

pub fn run(args: &MemoryArgs) -> Result<MemoryReport> {
    let binary = match &args.agent {
        Some(path) => path.clone(),
        None => release_agent()?,
    };
    println!("agent binary: {}", binary.display());
    let mut report = MemoryReport::default();
    for &count in &args.apps {
        let row = measure(&binary, count, args).with_context(|| format!("{count} apps"))?;
        println!(
            "{count:>6} apps: VmRSS {} MiB, VmHWM {} MiB ({} ms to all routes at BIRD)",
            mib(row.rss_kib),
            mib(row.hwm_kib),
            ms(row.all_at_bird)
        );
        report.summary.figure(
            &format!("{count} apps: VmRSS / VmHWM"),
            format!("{} / {} MiB", mib(row.rss_kib), mib(row.hwm_kib)),
        );
        report.rows.push(row);
    }
    report.summary.print("bench memory: summary");
    Ok(report)
}

fn measure(binary: &Path, count: u32, args: &MemoryArgs) -> Result<MemoryRow> {
    println!("\n== memory: {count} apps with port:tcp:{PORT} monitors ==");
    let lab = Lab::new()?;
    let _listener = Listener::start(&lab.topo.agent, PORT)?;
    let config = lab.config(
        &humantime::format_duration(INTERVAL).to_string(),
        "15m",
        &bgp::scale_apps(count, Some(PORT)),
    )?;
    let limit = Duration::from_secs(args.timeout_s);
    let run = bgp::scale_run(&lab, binary, &config, count, limit)?;
    let Some(all_at_bird) = run.all_at_bird else {
        let reached = run.progress.last().map_or(0, |p| p.1);
        anyhow::bail!(
            "BIRD held {reached} of {count} routes after {limit:?}\n{}",
            bgp::log_tail(&run.agent, 10)
        );
    };
    thread::sleep(Duration::from_secs(args.settle_s).max(INTERVAL * 2));
    let pid = run.agent.pid().context("agent pid")?;
    let (rss_kib, hwm_kib) = (proc_kib(pid, "VmRSS")?, proc_kib(pid, "VmHWM")?);
    ensure!(
        hwm_kib >= rss_kib && hwm_kib >= run.hwm_kib,
        "VmHWM {hwm_kib} below VmRSS {rss_kib}"
    );
    Ok(MemoryRow {
        apps: count,
        rss_kib,
        hwm_kib,
        all_at_bird,
    })
}
