//! `cargo xtask bench api`: registrations and unregistrations per second over the HTTP API.
//!
//! For each registry size (1,000 and 10,000 apps by default), with and without iptables NAT
//! (`dataplane.mode: iptables`, IPv6 VIPs, so `ip6tables` rules), and for each agent binary
//! (this tree's release build, and `--baseline` if given: the same harness, the same run), a
//! fresh agent starts with a state file of that many registrations minus `--requests` (apps
//! whose monitor never passes, so they only weigh on the registry and the state file). Then
//! `--clients` concurrent keepalive HTTP clients register `--requests` more apps (a
//! `port:tcp` monitor on a listening port, `nat=tcp:80:8080` in the NAT rounds), the harness
//! waits until every VIP is on `lo` (and every rule installed), and the clients unregister
//! them. An unregistration is answered once its VIP and rules are gone (docs/design.md,
//! "`GET|POST /unregister`"), so its rate includes the host's work; a registration is answered
//! once it is saved, so the time until everything is installed is reported apart.
//!
//! The load comes from the hidden `bench api-client`, run inside the agent's namespace against
//! `127.0.0.1`: one thread and one connection per client, raw HTTP/1.1.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpStream,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use std::fmt::Write as _;

use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use gocast_tests::{Agent, Netns, Topology};

use super::{Summary, bgp::Listener, cpu_ns, release_agent};

/// The API address inside the agent's namespace.
const API: &str = "127.0.0.1:8080";
/// The port the registered apps' monitors check (a listener runs there).
const PORT: u16 = 8091;
/// A port nothing listens on: the preloaded apps stay unhealthy and install nothing.
const CLOSED_PORT: u16 = 8092;

/// Arguments of `cargo xtask bench api`.
#[derive(Debug, Args)]
pub struct ApiArgs {
    /// Registry sizes to measure at, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1_000, 10_000])]
    apps: Vec<u32>,
    /// Registrations (then unregistrations) timed at each size.
    #[arg(long, default_value_t = 2_000)]
    requests: u32,
    /// Concurrent HTTP clients, each on its own keepalive connection.
    #[arg(long, default_value_t = 32)]
    clients: u32,
    /// An agent binary to measure side by side as the baseline, e.g. a release build of the
    /// commit before (see docs/benchmarks.md, "Reproduce").
    #[arg(long, value_name = "PATH")]
    baseline: Option<PathBuf>,
    /// Requests timed with the baseline (fewer: it may be far slower).
    #[arg(long, default_value_t = 500)]
    baseline_requests: u32,
    /// Benchmark this agent binary instead of building the release agent.
    #[arg(long, value_name = "PATH")]
    agent: Option<PathBuf>,
    /// How long to wait for every VIP and rule to be installed, in seconds.
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
}

/// One round's figures.
#[derive(Debug, Clone)]
pub struct ApiRow {
    /// `new` or `baseline`.
    pub agent: &'static str,
    pub apps: u32,
    pub nat: bool,
    pub requests: u32,
    /// Registrations per second (all answered 200).
    pub register: f64,
    /// From the first registration until every VIP (and rule) is installed, per second.
    pub installed: f64,
    /// Unregistrations per second (each answered once its VIP and rules are gone).
    pub unregister: f64,
    /// The agent's CPU time (user + system) during the registrations and during the
    /// unregistrations, per request, in µs: what a request costs, whatever else loads the
    /// machine.
    pub register_cpu_us: f64,
    pub unregister_cpu_us: f64,
    /// The same removals by the host's own tools alone, per second (rounds of the new agent
    /// only): the kernel's and iptables' floor under an unregistration; see [`host_floor`].
    pub floor: Option<f64>,
}

/// What `bench api` measured, for `docs/benchmarks.md`.
#[derive(Debug, Default)]
pub struct ApiReport {
    pub rows: Vec<ApiRow>,
    /// Baseline rounds that gave no figure, and why.
    pub failed: Vec<String>,
    pub clients: u32,
    pub summary: Summary,
}

impl ApiReport {
    /// The baseline row measured beside `row`.
    pub fn baseline_of(&self, row: &ApiRow) -> Option<&ApiRow> {
        self.rows
            .iter()
            .find(|b| b.agent == "baseline" && b.apps == row.apps && b.nat == row.nat)
    }
}

pub fn run(args: &ApiArgs) -> Result<ApiReport> {
    let binary = match &args.agent {
        Some(path) => path.clone(),
        None => release_agent()?,
    };
    println!("agent binary: {}", binary.display());
    let mut agents = vec![("new", binary, args.requests)];
    if let Some(baseline) = &args.baseline {
        println!("baseline binary: {}", baseline.display());
        agents.push(("baseline", baseline.clone(), args.baseline_requests));
    }
    let mut report = ApiReport {
        clients: args.clients,
        ..ApiReport::default()
    };
    for &apps in &args.apps {
        for nat in [false, true] {
            for (name, binary, requests) in &agents {
                let requests = (*requests).min(apps);
                let row = match measure(binary, name, apps, nat, requests, args) {
                    Ok(row) => row,
                    // The old agent may not get through a round (e.g. its lifecycle stalls
                    // restoring thousands of apps on a busy machine): reported, not fatal.
                    Err(e) if *name == "baseline" => {
                        println!("baseline {apps} apps, nat {nat}: no figure: {e:#}");
                        report.failed.push(format!(
                            "{apps} apps, {}: {}",
                            if nat { "iptables NAT" } else { "no NAT" },
                            first_line(&format!("{e:#}"))
                        ));
                        continue;
                    }
                    Err(e) => return Err(e.context(format!("{name}: {apps} apps, nat {nat}"))),
                };
                println!(
                    "{name:>8} {apps:>6} apps, nat {nat:<5}: register {:.0}/s, installed {:.0}/s, unregister {:.0}/s ({requests} requests); agent CPU {:.0} / {:.0} µs a request",
                    row.register,
                    row.installed,
                    row.unregister,
                    row.register_cpu_us,
                    row.unregister_cpu_us
                );
                report.rows.push(row);
            }
        }
    }
    for row in report.rows.iter().filter(|r| r.agent == "new") {
        let nat = if row.nat { "iptables NAT" } else { "no NAT" };
        let target = if row.nat { 5_000.0 } else { 10_000.0 };
        let ratio = |new: f64, old: Option<f64>| {
            old.map_or_else(String::new, |old| format!(" ({:.1}×)", new / old))
        };
        let base = report.baseline_of(row);
        for (what, value, old) in [
            ("registrations", row.register, base.map(|b| b.register)),
            (
                "unregistrations",
                row.unregister,
                base.map(|b| b.unregister),
            ),
        ] {
            report.summary.checked(
                &format!("{} apps, {nat}: {what}/s", row.apps),
                format!("{value:.0}{}", ratio(value, old)),
                &format!("≥ {target:.0}/s"),
                value >= target,
            );
        }
        if let Some(floor) = row.floor {
            report.summary.checked(
                &format!(
                    "{} apps, {nat}: the host's tools alone, removals/s",
                    row.apps
                ),
                format!("{floor:.0} (agent {:.2}×)", row.unregister / floor),
                &format!("≥ {target:.0}/s"),
                floor >= target,
            );
        }
    }
    report.summary.print("bench api: summary");
    Ok(report)
}

fn measure(
    binary: &Path,
    name: &'static str,
    apps: u32,
    nat: bool,
    requests: u32,
    args: &ApiArgs,
) -> Result<ApiRow> {
    println!("\n== api: {name}, {apps} apps, nat {nat}, {requests} requests ==");
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    let _listener = Listener::start(&topo.agent, PORT)?;
    let state = dir.path().join("state.json");
    preload(&state, apps - requests)?;
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "agent:\n  listen_addr: {API}\n  monitor_interval: 1s\n  state_file: {state}\n  nat_dest_ip: {dest}\n\
             bgp:\n  local_as: 65001\n  remote_as: 65000\n  peer_ip: {peer}\ndataplane:\n  mode: iptables\n",
            state = state.display(),
            dest = topo.agent_ip6,
            peer = topo.client_ip,
        ),
    )?;
    let config = config.to_str().context("config path")?;
    let mut agent = Agent::start_with(
        binary,
        &topo.agent,
        &["--log-level", "info", "run", "--config", config],
        &dir.path().join("agent.log"),
        API,
    )?;
    // The preloaded registrations are restored right after the API is up.
    let limit = Duration::from_secs(args.timeout_s);
    agent.wait_for("the preloaded apps", limit, |_| {
        Ok(app_count(&topo.agent)? >= apps - requests)
    })?;
    let pid = agent.pid().context("the agent's pid")?;
    #[expect(
        clippy::cast_precision_loss,
        reason = "nanoseconds of CPU in a phase of seconds"
    )]
    let per_request = |ns: u64| ns as f64 / 1e3 / f64::from(requests.max(1));
    let (started, cpu) = (Instant::now(), cpu_ns(pid)?);
    let register = client(&topo.agent, "register", requests, nat, args.clients)?;
    let register_cpu_us = per_request(cpu_ns(pid)?.saturating_sub(cpu));
    agent.wait_for("every vip and rule installed", limit, |_| {
        Ok(installed(&topo.agent)? >= requests)
    })?;
    let all_installed = started.elapsed();
    if nat {
        let rules = topo.agent.nat_rules("ip6tables")?;
        let count = rules.lines().filter(|l| l.contains("DNAT")).count();
        ensure!(
            count == requests as usize,
            "{count} DNAT rules, not {requests}"
        );
    }
    let cpu = cpu_ns(pid)?;
    let unregister = client(&topo.agent, "unregister", requests, nat, args.clients)?;
    let unregister_cpu_us = per_request(cpu_ns(pid)?.saturating_sub(cpu));
    agent.signal_and_wait("TERM", Duration::from_secs(60))?;
    let floor = if name == "new" {
        let floor = host_floor(requests, nat, args.clients)?;
        println!("host tools alone: {floor:.0} removals/s");
        Some(floor)
    } else {
        None
    };
    Ok(ApiRow {
        agent: name,
        apps,
        nat,
        requests,
        register: f64::from(requests) / register.as_secs_f64(),
        installed: f64::from(requests) / all_installed.as_secs_f64(),
        unregister: f64::from(requests) / unregister.as_secs_f64(),
        register_cpu_us,
        unregister_cpu_us,
        floor,
    })
}

/// What removing `requests` apps costs the host's tools alone, per second, in a namespace of
/// its own holding exactly what the agent held: `requests` IPv6 VIPs on `lo` (`noprefixroute`,
/// as the agent adds a /128), deleted one by one by one `ip -batch` (the kernel serialises
/// address changes, so this is the most any agent gets); with `nat`, also their DNAT rules,
/// deleted `clients` at a time with one `ip6tables-restore --noflush` each (the agent's batch
/// when `clients` requests wait together).
fn host_floor(requests: u32, nat: bool, clients: u32) -> Result<f64> {
    let ns = Netns::new("floor")?;
    let dir = tempfile::tempdir()?;
    let vip = |i: u32| format!("2001:db8:ff00::{i:x}/128");
    let batch = |op: &str, flags: &str| {
        let mut text = String::new();
        for i in 0..requests {
            let _ = writeln!(text, "address {op} {} dev lo {flags}", vip(i));
        }
        text
    };
    let (add, del) = (dir.path().join("add"), dir.path().join("del"));
    std::fs::write(&add, batch("add", "noprefixroute"))?;
    std::fs::write(&del, batch("del", ""))?;
    let ip_batch = |path: &Path| ns.ip(&["-batch", path.to_str().unwrap_or_default()]);
    let rule = |op: &str, i: u32| {
        format!(
            "{op} GOCAST -d {} -p tcp -m tcp --dport 80 -m comment --comment gocast:req{i} -j DNAT --to-destination [2001:db8::1]:8080\n",
            vip(i)
        )
    };
    // One `iptables-restore` input per file, each run by a shell inside the namespace:
    // `ip netns exec` per batch would add a cost the agent, already inside, does not pay.
    let table = |body: String| format!("*nat\n{body}COMMIT\n");
    let restore_all = |files: &Path| {
        ns.run(
            "sh",
            &[
                "-c",
                &format!(
                    "for f in {}/*; do ip6tables-restore -w --noflush < \"$f\" || exit 1; done",
                    files.display()
                ),
            ],
        )
    };
    let (setup, batches) = (dir.path().join("setup"), dir.path().join("batches"));
    std::fs::create_dir(&setup)?;
    std::fs::create_dir(&batches)?;
    std::fs::write(
        setup.join("chain"),
        table(format!(
            ":GOCAST - [0:0]\n{}",
            (0..requests).map(|i| rule("-A", i)).collect::<String>()
        )),
    )?;
    let ids: Vec<u32> = (0..requests).collect();
    for (n, chunk) in ids.chunks(clients.max(1) as usize).enumerate() {
        let body = chunk.iter().map(|&i| rule("-D", i)).collect();
        std::fs::write(batches.join(format!("{n:06}")), table(body))?;
    }
    ip_batch(&add)?;
    if nat {
        restore_all(&setup)?;
    }
    let started = Instant::now();
    ip_batch(&del)?;
    if nat {
        restore_all(&batches)?;
    }
    Ok(f64::from(requests) / started.elapsed().as_secs_f64())
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default()
}

/// Writes a state file of `count` registrations whose monitor never passes.
fn preload(path: &Path, count: u32) -> Result<()> {
    let apps: Vec<serde_json::Value> = (0..count)
        .map(|i| {
            serde_json::json!({
                "name": format!("pre{i}"),
                "vip": format!("2001:db8:ff01::{i:x}/128"),
                "monitors": [format!("port:tcp:{CLOSED_PORT}")],
                "nats": [],
                "communities": [],
            })
        })
        .collect();
    let body = serde_json::to_vec(&serde_json::json!({ "version": 1, "apps": apps }))?;
    std::fs::write(path, body)?;
    // The agent trusts only its own file, not writable by others.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

fn apps_view(ns: &Netns) -> Result<Vec<serde_json::Value>> {
    let (status, apps) = ns.http_get(&format!("http://{API}/apps"))?;
    ensure!(status == 200, "/apps: {status}");
    apps.as_array().cloned().context("/apps is not a list")
}

fn app_count(ns: &Netns) -> Result<u32> {
    Ok(u32::try_from(apps_view(ns)?.len())?)
}

/// Timed apps whose VIP is on `lo` (installed together with their NAT rules).
fn installed(ns: &Netns) -> Result<u32> {
    let count = apps_view(ns)?
        .iter()
        .filter(|a| a["name"].as_str().is_some_and(|n| n.starts_with("req")))
        .filter(|a| a["vip_installed"] == true)
        .count();
    Ok(u32::try_from(count)?)
}

/// Runs `bench api-client` in the agent's namespace; returns the time all requests took.
fn client(ns: &Netns, op: &str, requests: u32, nat: bool, clients: u32) -> Result<Duration> {
    let exe = std::env::current_exe().context("locating the gocast-bench binary")?;
    let mut command = ns.command(exe.to_str().context("bench binary path")?);
    command.args([
        "bench",
        "api-client",
        "--op",
        op,
        "--requests",
        &requests.to_string(),
        "--clients",
        &clients.to_string(),
    ]);
    if nat {
        command.arg("--nat");
    }
    let out = command
        .stderr(Stdio::inherit())
        .output()
        .context("running bench api-client")?;
    ensure!(out.status.success(), "bench api-client {op} failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let us: u64 = text
        .trim()
        .strip_prefix("elapsed_us ")
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("bench api-client printed {text:?}"))?;
    Ok(Duration::from_micros(us))
}

/// Arguments of the hidden `cargo xtask bench api-client`.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// `register` or `unregister`.
    #[arg(long)]
    op: String,
    #[arg(long)]
    requests: u32,
    #[arg(long)]
    clients: u32,
    /// Register with `nat=tcp:80:8080`.
    #[arg(long)]
    nat: bool,
}

/// Sends the requests from `clients` threads, each on one keepalive connection; prints
/// `elapsed_us N`. Fails on any answer but 200.
pub fn client_main(args: &ClientArgs) -> Result<()> {
    let next = Arc::new(AtomicU32::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..args.clients.max(1))
        .map(|_| {
            let next = Arc::clone(&next);
            let (op, requests, nat) = (args.op.clone(), args.requests, args.nat);
            thread::spawn(move || -> Result<()> {
                let mut conn = Connection::open()?;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= requests {
                        return Ok(());
                    }
                    let path = match op.as_str() {
                        "register" => format!(
                            "/register?name=req{i}&vip=2001:db8:ff00::{i:x}/128&monitor=port:tcp:{PORT}{}",
                            if nat { "&nat=tcp:80:8080" } else { "" }
                        ),
                        _ => format!("/unregister?name=req{i}"),
                    };
                    let (status, body) = conn.post(&path)?;
                    ensure!(status == 200, "{path}: {status} {body}");
                }
            })
        })
        .collect();
    for worker in workers {
        worker
            .join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
    }
    println!("elapsed_us {}", started.elapsed().as_micros());
    Ok(())
}

/// One keepalive HTTP/1.1 connection to the API.
struct Connection {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Connection {
    fn open() -> Result<Self> {
        let stream = TcpStream::connect(API).with_context(|| format!("connecting to {API}"))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        Ok(Self {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        })
    }

    /// POSTs with an empty body; returns the status and the body.
    fn post(&mut self, path: &str) -> Result<(u16, String)> {
        write!(
            self.writer,
            "POST {path} HTTP/1.1\r\nHost: {API}\r\nContent-Length: 0\r\n\r\n"
        )?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("status line {line:?}"))?;
        let mut length = None;
        loop {
            line.clear();
            self.reader.read_line(&mut line)?;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = Some(value.trim().parse::<usize>()?);
            }
        }
        let Some(length) = length else {
            bail!("answer without Content-Length");
        };
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body)?;
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}
