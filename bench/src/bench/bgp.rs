//! `cargo xtask bench bgp`: the agent's BGP speaker against BIRD 2, in three parts.
//!
//! - **convergence**: an app with a `port:tcp:N` monitor and a TCP listener the bench starts
//!   and kills. Per trial: listener up, route in BIRD's kernel table, kill the listener (t0),
//!   the route leaves the router's kernel table (t1, seen by `ip monitor route` there). The
//!   agent's `/apps` `since` splits t1 - t0 into detection (the monitor loop) and propagation
//!   (lifecycle → session → BIRD → kernel).
//! - **established**: agent spawn → BIRD shows the session Established; the idle RSS (no apps).
//! - **scale**: many apps without monitors → time until BIRD holds all their routes, and the
//!   agent's RSS at that moment.
//! - **silence**: the host goes silent without closing TCP (SIGSTOP of the agent, t0) → its
//!   route leaves BIRD's kernel table (t1); with BFD at its defaults (300 ms × 3, hold time
//!   90 s) and, side by side, without BFD, where only the hold time acts (kept at
//!   [`SILENT_HOLD`] so the part stays short). SIGCONT, then the route must come back.

use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result, bail, ensure};
use clap::{Args, ValueEnum};
use gocast_tests::{
    Agent, Netns, Topology,
    routers::{API, Bird, Neighbor, wait_until},
};
use tempfile::TempDir;

use super::{Samples, Summary, mib, ms, proc_kib, release_agent, verdict, wall_delta};

/// The convergence app: its VIP and the port its monitor watches.
const APP: &str = "bench";
const VIP: &str = "192.0.2.50";
const PORT: u16 = 8090;
/// Targets from the agent's requirements.
const P50_TARGET: Duration = Duration::from_millis(300);
const P99_TARGET: Duration = Duration::from_secs(1);
const SCALE_TARGET: Duration = Duration::from_secs(2);
/// Issue #16: a silent host's routes leave the router within BFD's detection time (900 ms).
const SILENT_BFD_TARGET: Duration = Duration::from_secs(1);
/// The hold time of the silence part without BFD: the shortest BIRD and the agent agree on
/// in practice, so the comparison is the best case for BGP alone.
const SILENT_HOLD: Duration = Duration::from_secs(9);
/// How long any single wait may take before the bench gives up on a broken setup.
const STEP_LIMIT: Duration = Duration::from_secs(10);

/// Arguments of `cargo xtask bench bgp`.
#[derive(Debug, Args)]
pub struct BgpArgs {
    /// Withdraw trials in the convergence part (at least 50).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(50..))]
    trials: u32,
    /// The agent's `monitor_interval` in the convergence part, in milliseconds.
    #[arg(long, default_value_t = 100)]
    interval_ms: u64,
    /// Agent starts timed to Established.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    starts: u32,
    /// Apps (IPv6 /128 VIPs in `2001:db8:ff00::/40`, no monitors) in the scale part.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=65_535))]
    apps: u32,
    /// How long the scale part waits for all routes, in seconds.
    #[arg(long, default_value_t = 60)]
    scale_timeout_s: u64,
    /// Silent-host trials with BFD (and a third as many without, each a hold time long).
    #[arg(long, default_value_t = 9, value_parser = clap::value_parser!(u32).range(3..))]
    silent_trials: u32,
    /// Run only these parts (repeat the flag for several); all by default.
    #[arg(long, value_enum)]
    only: Vec<Part>,
    /// Benchmark this agent binary instead of building the release agent
    /// (e.g. a build of another commit, to compare).
    #[arg(long, value_name = "PATH")]
    agent: Option<PathBuf>,
}

/// The parts of the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Part {
    Convergence,
    Established,
    Scale,
    Silence,
}

/// What `bench bgp` measured, for `docs/benchmarks.md`.
#[derive(Debug, Default)]
pub struct BgpReport {
    /// Kill → route gone, one per convergence trial, in trial order.
    pub convergence: Vec<Duration>,
    /// The agent's `monitor_interval` in the convergence part.
    pub interval: Duration,
    pub summary: Summary,
}

/// Builds the release agent and runs the selected parts, printing each part's figures and then
/// one summary table.
pub fn run(args: &BgpArgs) -> Result<BgpReport> {
    let binary = match &args.agent {
        Some(path) => path.clone(),
        None => release_agent()?,
    };
    println!("agent binary: {}", binary.display());
    let wanted = |part| args.only.is_empty() || args.only.contains(&part);
    let mut report = BgpReport {
        interval: Duration::from_millis(args.interval_ms),
        ..BgpReport::default()
    };
    let summary = &mut report.summary;
    if wanted(Part::Convergence) {
        report.convergence = convergence(&binary, args, summary).context("convergence part")?;
    }
    if wanted(Part::Established) {
        established(&binary, args.starts, summary).context("established part")?;
    }
    if wanted(Part::Scale) {
        scale(&binary, args, summary).context("scale part")?;
    }
    if wanted(Part::Silence) {
        silence(&binary, args.silent_trials, summary).context("silence part")?;
    }
    summary.print("bench bgp: summary");
    Ok(report)
}

/// An agent namespace and a router namespace running BIRD, with a temp dir for their files.
/// Fields drop in order: BIRD, then the namespaces (killing anything left inside), then files.
pub(super) struct Lab {
    bird: Bird,
    pub(super) topo: Topology,
    dir: TempDir,
}

impl Lab {
    pub(super) fn new() -> Result<Self> {
        Self::with_bird(Bird::start)
    }

    /// A lab whose BIRD runs BFD on the session (300 ms × 3).
    fn with_bfd() -> Result<Self> {
        Self::with_bird(Bird::start_with_bfd)
    }

    fn with_bird(start: fn(&Netns, &Path, &Neighbor) -> Result<Bird>) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let topo = Topology::new()?;
        let bird = start(&topo.client, dir.path(), &Neighbor::toward_agent(&topo))?;
        Ok(Self { bird, topo, dir })
    }

    /// Writes a config toward BIRD (the session of [`Neighbor::toward_agent`]) with the given
    /// agent timers and `apps:` section.
    pub(super) fn config(
        &self,
        monitor_interval: &str,
        cleanup_timer: &str,
        apps: &str,
    ) -> Result<PathBuf> {
        let path = self.dir.path().join("config.yaml");
        std::fs::write(
            &path,
            format!(
                "agent:\n  listen_addr: {API}\n  monitor_interval: {monitor_interval}\n  cleanup_timer: {cleanup_timer}\n  state_file: {state}\n\
                 bgp:\n  local_as: 65001\n  remote_as: 65000\n  peer_ip: {peer}\n{apps}",
                state = self.dir.path().join("state.json").display(),
                peer = self.topo.client_ip,
            ),
        )?;
        Ok(path)
    }

    /// Starts the release agent at `info` level (as in production; the tests' debug level
    /// would cost time here) and waits for its API.
    pub(super) fn start_agent(&self, binary: &Path, config: &Path, log: &str) -> Result<Agent> {
        let config = config.to_str().context("config path")?;
        Agent::start_with(
            binary,
            &self.topo.agent,
            &["--log-level", "info", "run", "--config", config],
            &self.dir.path().join(log),
            API,
        )
    }

    fn established(&self) -> bool {
        self.bird.established().unwrap_or(false)
    }

    /// When BIRD's session last changed state: a reset changes it.
    pub(super) fn session_since(&self) -> Result<gocast_tests::routers::Since> {
        self.bird.since()
    }

    /// BGP routes in BIRD's tables (both families), from `show route count protocol agent`.
    pub(super) fn bird_routes(&self) -> Result<u64> {
        let out = self
            .bird
            .birdc(&["show", "route", "count", "protocol", "agent"])?;
        bird_route_count(&out)
    }
}

/// Sums the `N of M routes ... in table T` lines of `birdc show route count`.
fn bird_route_count(out: &str) -> Result<u64> {
    let mut total = 0;
    let mut seen = false;
    for line in out.lines().filter(|l| l.contains(" in table ")) {
        let first = line.split_whitespace().next().unwrap_or("");
        total += first
            .parse::<u64>()
            .with_context(|| format!("route count line {line:?}"))?;
        seen = true;
    }
    // A table with no matching route prints nothing but the total line.
    ensure!(
        seen || out.contains("Total: 0 "),
        "unexpected birdc output: {out:?}"
    );
    Ok(total)
}

/// The last `lines` lines of the agent's log, for error messages.
pub(super) fn log_tail(agent: &Agent, lines: usize) -> String {
    let text = std::fs::read_to_string(&agent.log).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    let tail = all[all.len().saturating_sub(lines)..].join("\n");
    format!("---- agent log (last {lines} lines) ----\n{tail}")
}

/// A change of the VIP's route in the router's kernel table, as `ip monitor route` printed it.
#[derive(Debug, Clone, Copy)]
struct RouteEvent {
    added: bool,
    at: Instant,
    wall: SystemTime,
}

/// `ip monitor route` in a namespace; a thread timestamps every line for the VIP as it arrives.
struct RouteWatch {
    child: Child,
    events: mpsc::Receiver<RouteEvent>,
}

impl RouteWatch {
    fn start(ns: &Netns, vip: &str) -> Result<Self> {
        let mut child = Command::new("ip")
            .args(["-n", &ns.name, "monitor", "route"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting ip monitor route")?;
        let stdout = child.stdout.take().context("ip monitor stdout")?;
        let (tx, events) = mpsc::channel();
        let vip = vip.to_owned();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let (at, wall) = (Instant::now(), SystemTime::now());
                let Ok(line) = line else { break };
                let (added, rest) = match line.strip_prefix("Deleted ") {
                    Some(rest) => (false, rest),
                    None => (true, line.as_str()),
                };
                let dest = rest.split_whitespace().next().unwrap_or("");
                if dest.trim_end_matches("/32") == vip
                    && tx.send(RouteEvent { added, at, wall }).is_err()
                {
                    break;
                }
            }
        });
        // `ip` subscribes right after it starts; give it that moment before anything changes.
        thread::sleep(Duration::from_millis(100));
        Ok(Self { child, events })
    }

    /// Forgets events seen so far.
    fn drain(&self) {
        while self.events.try_recv().is_ok() {}
    }

    /// The next event of the given kind, within `limit`.
    fn wait(&self, added: bool, limit: Duration) -> Result<RouteEvent> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(event) if event.added == added => return Ok(event),
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => bail!(
                    "no route {} in the router's kernel table within {limit:?}",
                    if added { "add" } else { "delete" }
                ),
                Err(mpsc::RecvTimeoutError::Disconnected) => bail!("ip monitor route exited"),
            }
        }
    }
}

impl Drop for RouteWatch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A bare TCP listener (Python) on `[::]:port` in a namespace: the service the monitor watches.
pub(super) struct Listener {
    child: Option<Child>,
}

impl Listener {
    /// Starts it and returns once the socket listens.
    pub(super) fn start(ns: &Netns, port: u16) -> Result<Self> {
        let script = format!(
            "import socket, sys\n\
             s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)\n\
             s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
             s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)\n\
             s.bind(('::', {port}))\n\
             s.listen(16)\n\
             print('ready', flush=True)\n\
             sys.stdin.read()\n"
        );
        let mut child = ns
            .command("python3")
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the python3 listener")?;
        let stdout = child.stdout.take().context("listener stdout")?;
        let mut listener = Self { child: Some(child) };
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        if line.trim() != "ready" {
            listener.kill();
            bail!("the python3 listener on port {port} did not start");
        }
        Ok(listener)
    }

    /// SIGKILL by PID and reap: the socket is closed when this returns.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Where in the monitor interval trial `i` kills the service: a low-discrepancy sequence
/// (golden ratio), so the kills spread evenly over the tick phase instead of all landing at the
/// same offset after the tick that announced the route.
fn phase(i: u32, interval: Duration) -> Duration {
    interval.mul_f64((f64::from(i) * 0.618_033_988_749_895).fract())
}

/// One withdraw trial.
#[derive(Debug, Clone, Copy)]
struct Trial {
    /// Kill → route gone from the router's kernel table.
    total: Duration,
    /// Kill → the agent marked the app unhealthy (`since` in `/apps`, millisecond resolution).
    detect: Duration,
    /// Unhealthy → route gone from the router's kernel table.
    propagate: Duration,
}

/// Runs the withdraw trials; returns kill → route gone per trial.
fn convergence(binary: &Path, args: &BgpArgs, summary: &mut Summary) -> Result<Vec<Duration>> {
    let interval = Duration::from_millis(args.interval_ms);
    println!(
        "\n== convergence: {} trials, monitor_interval {}ms ==",
        args.trials, args.interval_ms
    );
    let lab = Lab::new()?;
    let watch = RouteWatch::start(&lab.topo.client, VIP)?;
    let apps = format!("apps:\n  - name: {APP}\n    vip: {VIP}/32\n    monitor: port:tcp:{PORT}\n");
    // A long cleanup timer: the VIP stays on lo, so every trial measures only the withdrawal.
    let config = lab.config(&format!("{}ms", args.interval_ms), "1h", &apps)?;
    let agent = lab.start_agent(binary, &config, "agent-convergence.log")?;
    wait_until("Established", STEP_LIMIT, || Ok(lab.established()))
        .with_context(|| log_tail(&agent, 30))?;

    let mut trials = Vec::new();
    for i in 0..args.trials {
        let trial = withdraw_trial(&lab, &watch, phase(i, interval))
            .with_context(|| format!("trial {i}\n{}", log_tail(&agent, 30)))?;
        trials.push(trial);
    }

    let total = Samples::new(trials.iter().map(|t| t.total).collect());
    let detect = Samples::new(trials.iter().map(|t| t.detect).collect());
    let propagate = Samples::new(trials.iter().map(|t| t.propagate).collect());
    let ratio = |d: Duration| format!("{:.2}", d.as_secs_f64() / interval.as_secs_f64());
    let cells = |s: &Samples, f: &dyn Fn(Duration) -> String| {
        [
            f(s.min()),
            f(s.percentile(50.0)),
            f(s.percentile(90.0)),
            f(s.percentile(99.0)),
            f(s.max()),
        ]
    };
    println!(
        "{:<34}{:>8}{:>8}{:>8}{:>8}{:>8}",
        "", "min", "p50", "p90", "p99", "max"
    );
    let rows: [(&str, [String; 5]); 6] = [
        ("kill → route gone (ms)", cells(&total, &ms)),
        ("  detection: kill → unhealthy", cells(&detect, &ms)),
        ("  propagation: unhealthy → gone", cells(&propagate, &ms)),
        ("kill → route gone (× interval)", cells(&total, &ratio)),
        ("  detection (× interval)", cells(&detect, &ratio)),
        ("  propagation (× interval)", cells(&propagate, &ratio)),
    ];
    for (name, c) in rows {
        println!(
            "{name:<34}{:>8}{:>8}{:>8}{:>8}{:>8}",
            c[0], c[1], c[2], c[3], c[4]
        );
    }
    let (p50, p99) = (total.percentile(50.0), total.percentile(99.0));
    println!(
        "targets: p50 ≤ 300 ms: {} ({} ms)   p99 ≤ 1 s: {} ({} ms)",
        verdict(p50 <= P50_TARGET),
        ms(p50),
        verdict(p99 <= P99_TARGET),
        ms(p99)
    );

    summary.figure("monitor_interval", format!("{} ms", args.interval_ms));
    summary.checked(
        "withdraw convergence p50",
        format!("{} ms ({}×)", ms(p50), ratio(p50)),
        "≤ 300 ms",
        p50 <= P50_TARGET,
    );
    summary.figure(
        "withdraw convergence p90",
        format!(
            "{} ms ({}×)",
            ms(total.percentile(90.0)),
            ratio(total.percentile(90.0))
        ),
    );
    summary.checked(
        "withdraw convergence p99",
        format!("{} ms ({}×)", ms(p99), ratio(p99)),
        "≤ 1 s",
        p99 <= P99_TARGET,
    );
    summary.figure(
        "withdraw convergence max",
        format!("{} ms ({}×)", ms(total.max()), ratio(total.max())),
    );
    summary.figure(
        "  detection p50 / p99",
        format!(
            "{} / {} ms",
            ms(detect.percentile(50.0)),
            ms(detect.percentile(99.0))
        ),
    );
    summary.figure(
        "  propagation p50 / p99",
        format!(
            "{} / {} ms",
            ms(propagate.percentile(50.0)),
            ms(propagate.percentile(99.0))
        ),
    );
    Ok(trials.iter().map(|t| t.total).collect())
}

/// Service up → route in BIRD and the router's kernel → wait `phase` → kill → route gone.
fn withdraw_trial(lab: &Lab, watch: &RouteWatch, phase: Duration) -> Result<Trial> {
    watch.drain();
    let mut listener = Listener::start(&lab.topo.agent, PORT)?;
    watch.wait(true, STEP_LIMIT).context("announcement")?;
    ensure!(
        !lab.bird.route(&format!("{VIP}/32"))?.is_empty(),
        "the route is in the router's kernel table but not in BIRD"
    );
    thread::sleep(phase);
    let (t0, w0) = (Instant::now(), SystemTime::now());
    listener.kill();
    let gone = watch.wait(false, STEP_LIMIT).context("withdrawal")?;
    let (status, app) = lab
        .topo
        .agent
        .http_get(&format!("http://{API}/apps/{APP}"))?;
    ensure!(
        status == 200 && app["state"] == "unhealthy",
        "/apps/{APP}: {status} {app}"
    );
    let since = app["since"].as_str().context("/apps since")?;
    let since = humantime::parse_rfc3339(since).with_context(|| format!("since {since:?}"))?;
    Ok(Trial {
        total: gone.at.duration_since(t0),
        detect: wall_delta(w0, since),
        propagate: wall_delta(since, gone.wall),
    })
}

/// Polls `check` with `pause` between calls until it holds (its time), or `stop` is set or
/// `limit` passes (None).
fn poll_until(
    stop: &AtomicBool,
    limit: Duration,
    pause: Duration,
    mut check: impl FnMut() -> bool,
) -> Option<Instant> {
    let start = Instant::now();
    while start.elapsed() < limit && !stop.load(Ordering::Relaxed) {
        if check() {
            return Some(Instant::now());
        }
        thread::sleep(pause);
    }
    None
}

fn established(binary: &Path, starts: u32, summary: &mut Summary) -> Result<()> {
    println!("\n== start → Established: {starts} runs, no apps ==");
    let mut times = Vec::new();
    let mut idle = Vec::new();
    for run in 0..starts {
        // A fresh BIRD each run: no error-wait or reconnect timer left from the previous session.
        let lab = Lab::new()?;
        let config = lab.config("10s", "15m", "")?;
        let stop = AtomicBool::new(false);
        let (agent, seen, spawned, spawned_wall) = thread::scope(|s| {
            let poll = s.spawn(|| {
                poll_until(&stop, STEP_LIMIT, Duration::from_millis(2), || {
                    lab.established()
                })
            });
            let (spawned, spawned_wall) = (Instant::now(), SystemTime::now());
            let agent = lab.start_agent(binary, &config, "agent-start.log");
            if agent.is_err() {
                stop.store(true, Ordering::Relaxed);
            }
            (agent, poll.join(), spawned, spawned_wall)
        });
        let agent = agent?;
        let Ok(Some(seen)) = seen else {
            bail!(
                "run {run}: no Established within {STEP_LIMIT:?}\n{}",
                log_tail(&agent, 30)
            );
        };
        let took = seen.duration_since(spawned);
        // Let start-up allocations settle before reading the idle footprint.
        thread::sleep(Duration::from_millis(500));
        let pid = agent.pid().context("agent pid")?;
        let rss = proc_kib(pid, "VmRSS")?;
        println!(
            "run {run}: {} ms to Established at BIRD, idle VmRSS {} MiB; agent log: {}",
            ms(took),
            mib(rss),
            timeline(&agent, spawned_wall, &START_MILESTONES)
        );
        times.push(took);
        idle.push(rss);
    }
    let times = Samples::new(times);
    idle.sort_unstable();
    let idle_rss = idle[idle.len() / 2];
    println!(
        "median {} ms (min {}, max {}); idle VmRSS median {} MiB",
        ms(times.median()),
        ms(times.min()),
        ms(times.max()),
        mib(idle_rss)
    );
    summary.figure(
        "start → Established (median)",
        format!("{} ms", ms(times.median())),
    );
    summary.figure("idle VmRSS, 0 apps", format!("{} MiB", mib(idle_rss)));
    Ok(())
}

/// The silence part: `trials` SIGSTOPs of an agent with BFD, a third as many without.
fn silence(binary: &Path, trials: u32, summary: &mut Summary) -> Result<()> {
    let hold = SILENT_HOLD.as_secs();
    println!(
        "\n== host silent → route gone at BIRD: {trials} trials with BFD, {} without (hold time {hold} s) ==",
        trials / 3
    );
    let with = silent_trials(binary, true, trials)?;
    let without = silent_trials(binary, false, trials / 3)?;
    for (name, s) in [("with BFD", &with), ("without BFD", &without)] {
        println!("{name}: p50 {} ms, max {} ms", ms(s.median()), ms(s.max()));
    }
    summary.checked(
        "host silent → route gone at BIRD, BFD 300 ms × 3 (p50)",
        format!("{} ms", ms(with.median())),
        "≤ 1 s",
        with.median() <= SILENT_BFD_TARGET,
    );
    summary.figure(
        "host silent → route gone at BIRD, BFD (max)",
        format!("{} ms", ms(with.max())),
    );
    summary.figure(
        &format!("host silent → route gone at BIRD, no BFD, hold time {hold} s (p50)"),
        format!("{} ms", ms(without.median())),
    );
    Ok(())
}

/// SIGSTOP → route deleted in BIRD's kernel table, `trials` times; SIGCONT and the route's
/// return between trials.
fn silent_trials(binary: &Path, bfd: bool, trials: u32) -> Result<Samples> {
    let lab = if bfd { Lab::with_bfd()? } else { Lab::new()? };
    let extra = if bfd {
        "  hold_time: 90\n  bfd: true\n".to_owned()
    } else {
        format!("  hold_time: {}\n", SILENT_HOLD.as_secs())
    };
    let apps = format!("{extra}apps:\n  - name: {APP}\n    vip: {VIP}/32\n");
    let config = lab.config("10s", "15m", &apps)?;
    let watch = RouteWatch::start(&lab.topo.client, VIP)?;
    let agent = lab.start_agent(binary, &config, "agent-silence.log")?;
    // BFD starts at one packet a second, and BIRD waits 1-5 s after a session error.
    let back = Duration::from_secs(60);
    watch
        .wait(true, back)
        .with_context(|| log_tail(&agent, 30))?;
    let pid = agent.pid().context("agent pid")?.to_string();
    let mut took = Vec::new();
    for trial in 0..trials {
        watch.drain();
        let stopped = Instant::now();
        gocast_tests::sh("kill", &["-STOP", &pid])?;
        let gone = watch.wait(false, SILENT_HOLD * 4);
        gocast_tests::sh("kill", &["-CONT", &pid])?;
        let gone = gone.with_context(|| format!("trial {trial}\n{}", log_tail(&agent, 30)))?;
        let t = gone.at.duration_since(stopped);
        println!(
            "{} trial {trial}: {} ms",
            if bfd { "BFD" } else { "no BFD" },
            ms(t)
        );
        took.push(t);
        watch
            .wait(true, back)
            .with_context(|| format!("route back after trial {trial}\n{}", log_tail(&agent, 30)))?;
    }
    Ok(Samples::new(took))
}

/// The `apps:` section of a scale config: `count` apps, IPv6 /128 VIPs, each with a
/// `port:tcp:PORT` monitor when `monitor_port` is given, else none.
pub(super) fn scale_apps(count: u32, monitor_port: Option<u16>) -> String {
    let monitor = monitor_port
        .map(|port| format!("    monitor: port:tcp:{port}\n"))
        .unwrap_or_default();
    let mut yaml = String::from("apps:\n");
    for i in 1..=count {
        let _ = write!(
            yaml,
            "  - name: s{i}\n    vip: 2001:db8:ff00::{i:x}/128\n{monitor}"
        );
    }
    yaml
}

/// Log messages that mark the agent's start-up phases, with the names they are printed under:
/// host reconciled (netlink and iptables ready), session up, API serving, config apps handed
/// to the lifecycle, and each app's announcement.
const START_MILESTONES: [(&str, &str); 3] = [
    ("host reconciled", "host ready"),
    ("session established", "Established"),
    ("gocast running", "running"),
];
const SCALE_MILESTONES: [(&str, &str); 5] = [
    ("host reconciled", "host ready"),
    ("session established", "Established"),
    ("gocast running", "running"),
    ("apps loaded", "apps loaded"),
    ("app healthy: announcing", "announcing"),
];

/// When the agent (spawned at `spawned`) logged each of `milestones`, relative to its spawn;
/// for repeated ones the first and the last. Phases not logged are `never`: a start-up stuck
/// before them.
fn timeline(agent: &Agent, spawned: SystemTime, milestones: &[(&str, &str)]) -> String {
    let text = std::fs::read_to_string(&agent.log).unwrap_or_default();
    let mut seen: Vec<Vec<SystemTime>> = vec![Vec::new(); milestones.len()];
    for line in text.lines() {
        let line = strip_ansi(line);
        let Some(i) = milestones.iter().position(|(m, _)| line.contains(m)) else {
            continue;
        };
        let stamp = line.split_whitespace().next().unwrap_or("");
        if let Ok(t) = humantime::parse_rfc3339(stamp) {
            seen[i].push(t);
        }
    }
    let at = |t: SystemTime| format!("+{} ms", ms(wall_delta(spawned, t)));
    let mut parts = Vec::new();
    for ((_, name), times) in milestones.iter().zip(&seen) {
        match (times.first(), times.last()) {
            (Some(&first), Some(&last)) if times.len() > 1 => parts.push(format!(
                "{name} ×{} {}..{}",
                times.len(),
                at(first),
                at(last)
            )),
            (Some(&first), _) => parts.push(format!("{name} {}", at(first))),
            _ => parts.push(format!("{name} never")),
        }
    }
    parts.join(", ")
}

/// `line` without ANSI colour sequences (`ESC [ ... m`), as the agent writes them to a file too.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// What one scale run measured, from the agent's spawn.
pub(super) struct ScaleRun {
    pub(super) agent: Agent,
    spawned: SystemTime,
    api_up: Duration,
    /// The agent's session had sent every prefix (`/info`, polled every 50 ms).
    advertised: Option<Duration>,
    /// BIRD held every route (polled every 10 ms); `None` if it did not within the time limit.
    pub(super) all_at_bird: Option<Duration>,
    /// (since spawn, routes at BIRD), about every 250 ms.
    pub(super) progress: Vec<(Duration, u64)>,
    /// `VmRSS` and `VmHWM` of the agent, read as soon as BIRD held every route (or at the
    /// time limit).
    pub(super) rss_kib: u64,
    pub(super) hwm_kib: u64,
}

/// Starts the agent with `count` apps while two threads watch BIRD's route count and the
/// agent's `/info`.
pub(super) fn scale_run(
    lab: &Lab,
    binary: &Path,
    config: &Path,
    count: u32,
    limit: Duration,
) -> Result<ScaleRun> {
    let stop = AtomicBool::new(false);
    let (spawned, spawned_wall) = (Instant::now(), SystemTime::now());
    let (agent, api_up, bird, memory, advertised) = thread::scope(|s| {
        let bird = s.spawn(|| {
            let mut progress = Vec::new();
            let mut next_sample = Duration::ZERO;
            // Every 10 ms, not faster: on a small host the poller competes with the agent and BIRD.
            let all_at = poll_until(&stop, limit, Duration::from_millis(10), || {
                let routes = lab.bird_routes().unwrap_or(0);
                let elapsed = spawned.elapsed();
                if elapsed >= next_sample {
                    progress.push((elapsed, routes));
                    next_sample = elapsed + Duration::from_millis(250);
                }
                let done = routes >= u64::from(count);
                if done {
                    progress.push((elapsed, routes));
                }
                done
            });
            (all_at, progress)
        });
        let info = s.spawn(|| {
            poll_until(&stop, limit, Duration::from_millis(50), || {
                lab.topo
                    .agent
                    .http_get(&format!("http://{API}/info"))
                    .is_ok_and(|(_, info)| {
                        info["peers"][0]["prefixes_advertised"]
                            .as_u64()
                            .is_some_and(|n| n >= u64::from(count))
                    })
            })
        });
        let agent = lab.start_agent(binary, config, "agent-scale.log");
        let api_up = spawned.elapsed();
        if agent.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        let bird = bird.join();
        // Right when BIRD holds everything, before anything else happens.
        let memory = agent
            .as_ref()
            .ok()
            .and_then(Agent::pid)
            .map(|pid| (proc_kib(pid, "VmRSS"), proc_kib(pid, "VmHWM")));
        // The agent's view normally completes first; give the 50 ms poller a moment if not.
        let grace = Instant::now();
        while !info.is_finished() && grace.elapsed() < Duration::from_secs(5) {
            thread::sleep(Duration::from_millis(10));
        }
        stop.store(true, Ordering::Relaxed);
        (agent, api_up, bird, memory, info.join())
    });
    let agent = agent?;
    let Ok((all_at, progress)) = bird else {
        bail!("the BIRD poller panicked");
    };
    let Some((Ok(rss_kib), Ok(hwm_kib))) = memory else {
        bail!("cannot read the agent's memory figures");
    };
    Ok(ScaleRun {
        agent,
        spawned: spawned_wall,
        api_up,
        advertised: advertised.ok().flatten().map(|t| t.duration_since(spawned)),
        all_at_bird: all_at.map(|t| t.duration_since(spawned)),
        progress,
        rss_kib,
        hwm_kib,
    })
}

fn scale(binary: &Path, args: &BgpArgs, summary: &mut Summary) -> Result<()> {
    let count = args.apps;
    println!("\n== scale: {count} apps (IPv6 /128, no monitors) ==");
    let lab = Lab::new()?;
    let config = lab.config("10s", "15m", &scale_apps(count, None))?;
    let limit = Duration::from_secs(args.scale_timeout_s);
    let mut run = scale_run(&lab, binary, &config, count, limit)?;
    println!("API up after {} ms", ms(run.api_up));
    if let Some(a) = run.advertised {
        println!(
            "agent's session had sent all {count} after ≤ {} ms (/info)",
            ms(a)
        );
    }
    let reached = run.progress.last().map_or(0, |p| p.1);
    match run.all_at_bird {
        Some(took) => println!("BIRD held all {count} after {} ms", ms(took)),
        None => println!(
            "BIRD held {reached} of {count} after {limit:?}: gave up\n{}",
            log_tail(&run.agent, 6)
        ),
    }
    println!(
        "agent log, from spawn: {}",
        timeline(&run.agent, run.spawned, &SCALE_MILESTONES)
    );
    let every = run.progress.len().div_ceil(12).max(1);
    let progress: Vec<String> = run
        .progress
        .iter()
        .step_by(every)
        .map(|(t, n)| format!("{:.1}s:{n}", t.as_secs_f64()))
        .collect();
    println!("routes at BIRD over time: {}", progress.join(" "));
    println!(
        "agent VmRSS {} MiB (peak VmHWM {} MiB)",
        mib(run.rss_kib),
        mib(run.hwm_kib)
    );
    let shutdown = run.agent.signal_and_wait("TERM", Duration::from_secs(30));
    match &shutdown {
        Ok((status, took)) => println!("SIGTERM → exit: {} ms ({status})", ms(*took)),
        Err(e) => println!(
            "SIGTERM → exit failed (killed): {}",
            format!("{e:#}").lines().next().unwrap_or_default()
        ),
    }

    let name = format!("{count} apps: spawn → all at BIRD");
    match run.all_at_bird {
        Some(took) => summary.checked(
            &name,
            format!("{} ms", ms(took)),
            "< 2 s",
            took < SCALE_TARGET,
        ),
        None => summary.checked(
            &name,
            format!("{reached}/{count} after {} s", limit.as_secs()),
            "< 2 s",
            false,
        ),
    }
    summary.figure(
        &format!("VmRSS, {count} apps"),
        format!("{} MiB", mib(run.rss_kib)),
    );
    summary.figure(
        &format!("peak VmHWM, {count} apps"),
        format!("{} MiB", mib(run.hwm_kib)),
    );
    if let Ok((_, took)) = shutdown {
        summary.figure(
            &format!("SIGTERM → exit, {count} apps"),
            format!("{} ms", ms(took)),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bird_counts_are_summed_over_tables() {
        let out = "BIRD 2.0.12 ready.\n\
                   3 of 3 routes for 3 networks in table master4\n\
                   10000 of 10000 routes for 10000 networks in table master6\n\
                   Total: 10003 of 10003 routes for 10003 networks in 2 tables\n";
        assert_eq!(bird_route_count(out).unwrap(), 10_003);
        assert_eq!(
            bird_route_count(
                "BIRD 2.0.12 ready.\nTotal: 0 of 0 routes for 0 networks in 0 tables\n"
            )
            .unwrap(),
            0
        );
        assert!(bird_route_count("").is_err());
    }

    #[test]
    fn ansi_colours_are_stripped() {
        let line =
            "\u{1b}[2m2026-11-25T13:58:15.711840Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m gocast running";
        assert_eq!(
            strip_ansi(line),
            "2026-11-25T13:58:15.711840Z  INFO gocast running"
        );
    }

    #[test]
    fn phases_cover_the_interval() {
        let interval = Duration::from_millis(100);
        let mut tenths = [0; 10];
        for i in 0..50 {
            let p = phase(i, interval);
            assert!(p < interval);
            tenths[usize::try_from(p.as_millis() / 10).unwrap()] += 1;
        }
        assert!(tenths.iter().all(|&n| n >= 3), "{tenths:?}");
    }

    #[test]
    fn scale_vips_are_distinct_128s() {
        let yaml = scale_apps(300, None);
        assert!(yaml.contains("vip: 2001:db8:ff00::1/128"));
        assert!(yaml.contains("vip: 2001:db8:ff00::12c/128"));
        assert_eq!(yaml.matches("- name: ").count(), 300);
        assert!(!yaml.contains("monitor"));
        let monitored = scale_apps(2, Some(8090));
        assert_eq!(monitored.matches("    monitor: port:tcp:8090\n").count(), 2);
    }
}
