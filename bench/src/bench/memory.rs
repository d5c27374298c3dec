//! `cargo xtask bench memory`: the agent's resident memory against the number of apps.
//!
//! For each app count, a fresh lab of `bench bgp` (agent ↔ BIRD), a TCP listener in the agent's
//! namespace and a config of that many apps (IPv6 /128 VIPs), each with a `port:tcp` monitor
//! on that listener, so every app is checked, healthy, on `lo` and announced. Started with
//! [`bgp::scale_run`], which returns when BIRD holds every route; after a few more monitor
//! ticks the agent's `VmRSS` (resident now) and `VmHWM` (peak resident) are read, then its CPU
//! time over `--cpu-s` seconds of steady state (every app checked once a second), as a share of
//! one core. GoCast's figure for 1,000 apps at 1 s is 5.6 % of a core; our target ≤ 0.5 %.
//!
//! Where the pages are comes from `/proc/PID/smaps`, by mapping (the binary's code, read-only
//! and relocated data; each library; heap; unnamed mappings), resident and anonymous. Before the
//! CPU window the agent's accessed bits are cleared (`/proc/PID/clear_refs`), so the pages
//! `Referenced` after it are the steady state's working set: what stays resident however hard
//! the kernel reclaims (docs/benchmarks.md, "### Memory").

use std::{path::Path, thread, time::Duration};

use anyhow::{Context, Result, ensure};
use clap::Args;

use super::{
    Summary,
    bgp::{self, Lab, Listener},
    cpu_ns, mib, ms, proc_kib, release_agent,
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
    /// Seconds to let the agent run after BIRD holds every route, before reading its memory:
    /// past the page-out of the start-up's code (10 s after the first reconcile) and the first
    /// 30 s sweep, after which resident memory stays on its plateau (docs/benchmarks.md,
    /// "### Memory"); less reads a figure the agent does not keep.
    #[arg(long, default_value_t = 45)]
    settle_s: u64,
    /// Seconds of steady state over which the agent's CPU time is measured.
    #[arg(long, default_value_t = 10)]
    cpu_s: u64,
    /// How long to wait for BIRD to hold every route, in seconds.
    #[arg(long, default_value_t = 120)]
    timeout_s: u64,
    /// Benchmark this agent binary instead of building the release agent.
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
    /// Of `VmRSS`: anonymous (heap, stacks) and file-backed (the binary's and libraries'
    /// pages), KiB.
    pub anon_kib: u64,
    pub file_kib: u64,
    /// Of `VmRSS`: the pages accessed during the CPU window (the steady state's working set),
    /// KiB.
    pub working_kib: u64,
    /// Spawn → BIRD holds every route.
    pub all_at_bird: Duration,
    /// CPU time over the steady-state window, in % of one core.
    pub cpu_pct: f64,
}

/// What `bench memory` measured, for `docs/benchmarks.md`.
#[derive(Debug, Default)]
pub struct MemoryReport {
    /// Seconds between BIRD holding every route and the reading.
    pub settle_s: u64,
    pub rows: Vec<MemoryRow>,
    pub summary: Summary,
}

pub fn run(args: &MemoryArgs) -> Result<MemoryReport> {
    let binary = match &args.agent {
        Some(path) => path.clone(),
        None => release_agent()?,
    };
    println!("agent binary: {}", binary.display());
    let mut report = MemoryReport {
        settle_s: args.settle_s,
        ..MemoryReport::default()
    };
    for &count in &args.apps {
        let row = measure(&binary, count, args).with_context(|| format!("{count} apps"))?;
        println!(
            "{count:>6} apps: VmRSS {} MiB (anon {}, file {}; touched in steady state {}), VmHWM {} MiB, CPU {:.2} % of a core ({} ms to all routes at BIRD)",
            mib(row.rss_kib),
            mib(row.anon_kib),
            mib(row.file_kib),
            mib(row.working_kib),
            mib(row.hwm_kib),
            row.cpu_pct,
            ms(row.all_at_bird)
        );
        report.summary.figure(
            &format!("{count} apps: VmRSS / VmHWM"),
            format!("{} / {} MiB", mib(row.rss_kib), mib(row.hwm_kib)),
        );
        report.summary.figure(
            &format!("{count} apps: CPU at 1 s interval"),
            format!("{:.2} % of a core", row.cpu_pct),
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
    let (anon_kib, file_kib) = (proc_kib(pid, "RssAnon")?, proc_kib(pid, "RssFile")?);
    ensure!(hwm_kib >= rss_kib, "VmHWM {hwm_kib} below VmRSS {rss_kib}");
    // The kernel records the peak only when memory is unmapped, not when `madvise` drops it
    // (an allocator's purge, `malloc_trim`): a peak reached before such a drop can be missing
    // from a later VmHWM, so the peak is the larger of the two readings.
    let hwm_kib = hwm_kib.max(run.hwm_kib);
    let resident: Vec<String> = smaps(pid, binary)?
        .iter()
        .map(|g| format!("{} {}/{}", g.name, g.rss, g.anon))
        .collect();
    println!("resident KiB (all/anonymous): {}", resident.join(", "));
    // Clears the pages' accessed bits: `Referenced` then counts what the steady state touches.
    std::fs::write(format!("/proc/{pid}/clear_refs"), "1")
        .with_context(|| format!("writing /proc/{pid}/clear_refs"))?;
    let window = Duration::from_secs(args.cpu_s.max(1));
    let (cpu0, t0) = (cpu_ns(pid)?, std::time::Instant::now());
    thread::sleep(window);
    let (cpu1, elapsed) = (cpu_ns(pid)?, t0.elapsed());
    let touched = smaps(pid, binary)?;
    let working_kib = touched.iter().map(|g| g.referenced).sum();
    let parts: Vec<String> = touched
        .iter()
        .filter(|g| g.referenced > 0)
        .map(|g| format!("{} {}", g.name, g.referenced))
        .collect();
    println!(
        "touched in the {} s steady state: {} MiB (KiB: {})",
        window.as_secs(),
        mib(working_kib),
        parts.join(", ")
    );
    #[expect(
        clippy::cast_precision_loss,
        reason = "nanoseconds of CPU in a window of seconds"
    )]
    let cpu_pct = cpu1.saturating_sub(cpu0) as f64 / elapsed.as_nanos() as f64 * 100.0;
    Ok(MemoryRow {
        apps: count,
        rss_kib,
        hwm_kib,
        anon_kib,
        file_kib,
        working_kib,
        all_at_bird,
        cpu_pct,
    })
}

/// One group of mappings in `/proc/PID/smaps`, KiB.
#[derive(Debug, Default)]
struct Pages {
    name: String,
    rss: u64,
    /// Of `rss`: anonymous pages (in a file mapping: its written, copy-on-write pages).
    anon: u64,
    /// Of `rss`: pages accessed since the last `clear_refs`.
    referenced: u64,
}

/// The agent's mappings by group, largest resident first: its binary split by permissions
/// (code `r-x`, read-only data `r--`, relocated data `rw-`), a library by its file name,
/// unnamed mappings (thread stacks, large allocations) as `anon`.
fn smaps(pid: i32, binary: &Path) -> Result<Vec<Pages>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .with_context(|| format!("reading /proc/{pid}/smaps"))?;
    let binary = binary.canonicalize().unwrap_or_else(|_| binary.to_owned());
    let mut groups: Vec<Pages> = Vec::new();
    let mut current = 0;
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if let [field, kib, "kB"] = fields[..] {
            let Ok(kib) = kib.parse::<u64>() else {
                continue;
            };
            let Some(group) = groups.get_mut(current) else {
                continue;
            };
            match field {
                "Rss:" => group.rss += kib,
                "Anonymous:" => group.anon += kib,
                "Referenced:" => group.referenced += kib,
                _ => {}
            }
        } else if fields.len() >= 5 && fields[0].contains('-') && !fields[0].ends_with(':') {
            // A mapping's header: `start-end perms offset dev inode [path]`.
            let name = match fields.get(5) {
                Some(path) if Path::new(path) == binary => {
                    let part = match fields[1] {
                        p if p.contains('x') => "text",
                        p if p.contains('w') => "data",
                        _ => "rodata",
                    };
                    format!("binary {part}")
                }
                Some(path) => path.rsplit('/').next().unwrap_or(path).to_owned(),
                None => "anon".to_owned(),
            };
            current = groups
                .iter()
                .position(|g| g.name == name)
                .unwrap_or_else(|| {
                    groups.push(Pages {
                        name,
                        ..Pages::default()
                    });
                    groups.len() - 1
                });
        }
    }
    groups.retain(|g| g.rss > 0);
    groups.sort_by_key(|g| std::cmp::Reverse(g.rss));
    Ok(groups)
}
