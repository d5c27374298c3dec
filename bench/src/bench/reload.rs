//! `cargo xtask bench reload`: what a config change costs with many apps, a live reload against
//! a restart, with BIRD watching.
//!
//! The agent runs `--apps` config apps (IPv6 /128, no monitors) toward BIRD. A **restart**
//! (SIGTERM, start again) is timed from the signal until BIRD holds every route again, and the
//! fewest routes BIRD held meanwhile is recorded. Then `--reloads` **reloads**, each adding or
//! removing one extra app, are timed from `POST /reload` until BIRD shows that app's change;
//! BIRD's route count is polled every 10 ms throughout, and the session's "since" time is
//! compared before and after: an unchanged app's route must never leave BIRD and the session
//! must never reset.

use std::{
    path::Path,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use clap::Args;
use gocast_tests::{Agent, routers::API};

use super::{
    Samples, Summary,
    bgp::{Lab, scale_apps},
    ms, release_agent,
};

/// How long any single wait may take before the bench gives up on a broken setup.
const STEP_LIMIT: Duration = Duration::from_secs(60);

/// Arguments of `cargo xtask bench reload`.
#[derive(Debug, Args)]
pub struct ReloadArgs {
    /// Config apps (IPv6 /128 VIPs in `2001:db8:ff00::/40`, no monitors).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=60_000))]
    apps: u32,
    /// Reloads timed (each adds or removes one app).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    reloads: u32,
    /// Benchmark this agent binary instead of building the release agent.
    #[arg(long, value_name = "PATH")]
    agent: Option<std::path::PathBuf>,
}

/// The extra app the reloads add and remove.
const FLIP_VIP: &str = "2001:db8:ff01::1/128";

fn flip_app() -> String {
    format!("  - name: flip\n    vip: {FLIP_VIP}\n")
}

/// Runs the benchmark and prints its figures.
pub fn run(args: &ReloadArgs) -> Result<()> {
    let binary = match &args.agent {
        Some(path) => path.clone(),
        None => release_agent()?,
    };
    let count = args.apps;
    println!(
        "agent binary: {}\n== reload vs restart: {count} apps ==",
        binary.display()
    );
    let lab = Lab::new()?;
    let apps = scale_apps(count, None);
    let config = lab.config("10s", "15m", &apps)?;
    let mut agent = lab.start_agent(&binary, &config, "agent.log")?;
    wait_routes(&lab, u64::from(count))?;

    // A restart: SIGTERM, start again, until BIRD holds every route again.
    let low = AtomicU64::new(u64::MAX);
    let stop = AtomicBool::new(false);
    let (restart, new_agent) = thread::scope(|s| {
        s.spawn(|| watch_low(&lab, &stop, &low));
        let t0 = Instant::now();
        let result = (|| -> Result<Agent> {
            agent.signal_and_wait("TERM", STEP_LIMIT)?;
            let agent = lab.start_agent(&binary, &config, "agent-restarted.log")?;
            wait_routes(&lab, u64::from(count))?;
            Ok(agent)
        })();
        let elapsed = t0.elapsed();
        stop.store(true, Ordering::Relaxed);
        (elapsed, result)
    });
    let agent = new_agent.context("restart")?;
    let restart_low = low.load(Ordering::Relaxed);
    println!(
        "restart: {} ms until all {count} routes were back; BIRD held as few as {restart_low}",
        ms(restart)
    );

    // Reloads: add or remove one app each time, while BIRD is watched.
    let since = lab.session_since()?;
    let low = AtomicU64::new(u64::MAX);
    let stop = AtomicBool::new(false);
    let times = thread::scope(|s| {
        s.spawn(|| watch_low(&lab, &stop, &low));
        let result = reloads(&lab, &config, &apps, count, args.reloads);
        stop.store(true, Ordering::Relaxed);
        result
    })?;
    let reload_low = low.load(Ordering::Relaxed);
    let session_kept = lab.session_since()?.same_session(&since);
    drop(agent);
    let samples = Samples::new(times);
    let mut summary = Summary::default();
    summary.figure("apps", count.to_string());
    summary.figure("restart → all routes back", format!("{} ms", ms(restart)));
    summary.figure(
        "fewest routes at BIRD during the restart",
        restart_low.to_string(),
    );
    summary.figure(
        "reload → change at BIRD p50",
        format!(
            "{} ms ({:.3}× the restart)",
            ms(samples.median()),
            samples.median().as_secs_f64() / restart.as_secs_f64()
        ),
    );
    summary.figure(
        "reload → change at BIRD max",
        format!("{} ms", ms(samples.max())),
    );
    summary.checked(
        &format!("fewest routes at BIRD during {} reloads", args.reloads),
        reload_low.to_string(),
        &format!("≥ {count}"),
        reload_low >= u64::from(count),
    );
    summary.checked(
        "BGP session reset by the reloads",
        if session_kept { "no" } else { "yes" }.into(),
        "no",
        session_kept,
    );
    summary.print("bench reload: summary");
    Ok(())
}

/// The reloads; each returns when BIRD shows its change.
fn reloads(lab: &Lab, config: &Path, apps: &str, count: u32, n: u32) -> Result<Vec<Duration>> {
    let mut times = Vec::new();
    for i in 0..n {
        let with_flip = i % 2 == 0;
        let apps = if with_flip {
            format!("{apps}{}", flip_app())
        } else {
            apps.to_owned()
        };
        ensure!(
            lab.config("10s", "15m", &apps)? == config,
            "one config file"
        );
        let t0 = Instant::now();
        let (status, body) = lab.topo.agent.http_post(&format!("http://{API}/reload"))?;
        ensure!(status == 200, "reload {i}: {status} {body}");
        let want = u64::from(count) + u64::from(with_flip);
        wait_routes(lab, want)?;
        times.push(t0.elapsed());
    }
    Ok(times)
}

/// Polls BIRD every 10 ms until `stop`, keeping the lowest route count seen.
fn watch_low(lab: &Lab, stop: &AtomicBool, low: &AtomicU64) {
    while !stop.load(Ordering::Relaxed) {
        if let Ok(n) = lab.bird_routes() {
            low.fetch_min(n, Ordering::Relaxed);
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn wait_routes(lab: &Lab, want: u64) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < STEP_LIMIT {
        if lab.bird_routes()? == want {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(5));
    }
    anyhow::bail!("BIRD did not reach {want} routes within {STEP_LIMIT:?}")
}
