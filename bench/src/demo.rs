//! `cargo xtask demo`: an anycast lab in network namespaces, narrated step by step (issue #7).
//!
//! ```text
//!                         ┌ host1: gocast (eBPF NAT) + HTTP service "host1"
//! client ── router (BIRD, ECMP) ┤
//!                         └ host2: gocast (iptables NAT) + HTTP service "host2"
//! ```
//!
//! Both hosts announce the same VIP; BIRD installs one route with two next hops (`merge paths
//! on`) and the router's kernel spreads connections over them by their L4 hash
//! (`fib_multipath_hash_policy=1`). The demo stops host1's service, times the withdrawal as
//! the router's kernel sees it, shows every request landing on host2, restores the service and
//! shows the per-VIP counters of `/stats` where the agent has it. Every namespace and process
//! is owned by a guard: the end of the demo, an error and Ctrl-C all remove them.

use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Child, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use gocast_tests::{Agent, Netns, routers::API, sh};
use tempfile::TempDir;
use xtask::packages;

use crate::bench;

/// The anycast VIP, the port clients use, and the service's real port.
const VIP: &str = "192.0.2.100";
const VIP_PORT: u16 = 80;
const SERVICE_PORT: u16 = 9080;
/// Requests per burst from the client, each on a new connection.
const REQUESTS: usize = 40;
/// How long any wait may take before the demo gives up.
const LIMIT: Duration = Duration::from_secs(20);

/// Links: client–router, router–host1, router–host2 (`/30`s in 198.18.0.0/15).
const CLIENT: &str = "198.19.0.1";
const ROUTER_CLIENT: &str = "198.19.0.2";
const ROUTER_HOSTS: [&str; 2] = ["198.19.0.5", "198.19.0.9"];
const HOSTS: [&str; 2] = ["198.19.0.6", "198.19.0.10"];

/// Set by Ctrl-C (or SIGTERM); every wait checks it.
static STOP: AtomicBool = AtomicBool::new(false);

/// Runs the demo. Needs root.
pub fn run() -> Result<()> {
    ensure!(
        packages::is_root(),
        "the demo builds network namespaces: run as root"
    );
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let interrupted = Arc::clone(&interrupted);
        ctrlc::set_handler(move || {
            interrupted.store(true, Ordering::SeqCst);
            STOP.store(true, Ordering::SeqCst);
        })
        .context("installing the Ctrl-C handler")?;
    }
    let started = Instant::now();
    step("Building the eBPF object and the agent (release)");
    let binary = bench::release_agent()?;
    let result = Lab::new(&binary).and_then(|mut lab| {
        let result = lab.show();
        step("Cleaning up: agents, services and BIRD stopped, namespaces deleted");
        drop(lab);
        result
    });
    if interrupted.load(Ordering::SeqCst) {
        println!("\ninterrupted: everything removed");
        return Ok(());
    }
    result?;
    println!("\ndone in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn step(text: &str) {
    println!("\n\x1b[1m==> {text}\x1b[0m");
}

fn check_stop() -> Result<()> {
    if STOP.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Polls `check` every 10 ms until it holds; returns the time it took.
fn wait(what: &str, mut check: impl FnMut() -> Result<bool>) -> Result<Duration> {
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < LIMIT {
        check_stop()?;
        match check() {
            Ok(true) => return Ok(start.elapsed()),
            Ok(false) => {}
            Err(e) => last = format!(" (last error: {e:#})"),
        }
        thread::sleep(Duration::from_millis(10));
    }
    bail!("timed out after {LIMIT:?} waiting for {what}{last}")
}

/// A child process killed by PID on drop.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The HTTP service of `bench serve-http` answering with `name`.
fn service(ns: &Netns, name: &str) -> Result<Process> {
    let exe = std::env::current_exe().context("locating the gocast-bench binary")?;
    let mut child = ns
        .command(exe.to_str().context("gocast-bench path")?)
        .args(["bench", "serve-http", "--threads", "8", "--body", name])
        .arg("--port")
        .arg(SERVICE_PORT.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the HTTP service")?;
    let stdout = child.stdout.take().context("service stdout")?;
    let process = Process(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    ensure!(
        line.trim() == "ready",
        "the service on {name} did not start"
    );
    Ok(process)
}

/// One host: its namespace, service and agent. Drops agent, then service, then namespace.
struct Host {
    name: &'static str,
    agent: Option<Agent>,
    service: Option<Process>,
    ns: Netns,
}

/// The whole lab. Fields drop in order: hosts, BIRD, namespaces, files.
struct Lab {
    hosts: Vec<Host>,
    bird: Option<Process>,
    router: Netns,
    client: Netns,
    dir: TempDir,
}

/// A veth pair between `a` and `b` with a `/30` on each side; returns `a`'s interface name.
fn link(a: &Netns, a_ip: &str, b: &Netns, b_ip: &str, tag: char) -> Result<String> {
    let id = std::process::id() % 100_000;
    let (va, vb) = (format!("gd{id}{tag}a"), format!("gd{id}{tag}b"));
    sh(
        "ip",
        &[
            "link", "add", &va, "netns", &a.name, "type", "veth", "peer", "name", &vb, "netns",
            &b.name,
        ],
    )?;
    a.ip(&["addr", "add", &format!("{a_ip}/30"), "dev", &va])?;
    b.ip(&["addr", "add", &format!("{b_ip}/30"), "dev", &vb])?;
    a.ip(&["link", "set", &va, "up"])?;
    b.ip(&["link", "set", &vb, "up"])?;
    Ok(va)
}

impl Lab {
    fn new(binary: &Path) -> Result<Self> {
        step("Creating namespaces: client, router, host1, host2");
        let dir = tempfile::tempdir()?;
        let client = Netns::new("client")?;
        let router = Netns::new("router")?;
        let mut lab = Self {
            hosts: Vec::new(),
            bird: None,
            router,
            client,
            dir,
        };
        for name in ["host1", "host2"] {
            lab.hosts.push(Host {
                name,
                agent: None,
                service: None,
                ns: Netns::new(name)?,
            });
        }
        link(&lab.client, CLIENT, &lab.router, ROUTER_CLIENT, 'c')?;
        lab.client
            .ip(&["route", "add", "192.0.2.0/24", "via", ROUTER_CLIENT])?;
        let mut host_ifaces = Vec::new();
        for (i, host) in lab.hosts.iter().enumerate() {
            let tag = if i == 0 { '1' } else { '2' };
            host_ifaces.push(link(&host.ns, HOSTS[i], &lab.router, ROUTER_HOSTS[i], tag)?);
            host.ns
                .ip(&["route", "add", "default", "via", ROUTER_HOSTS[i]])?;
        }
        lab.router.run(
            "sysctl",
            &[
                "-qw",
                "net.ipv4.ip_forward=1",
                "net.ipv4.fib_multipath_hash_policy=1",
            ],
        )?;
        println!(
            "client {CLIENT} ── {ROUTER_CLIENT} router {} ── {} host1\n{:>41} ── {} host2",
            ROUTER_HOSTS[0], HOSTS[0], ROUTER_HOSTS[1], HOSTS[1]
        );

        step("Starting BIRD 2 on the router: eBGP to both hosts, ECMP into the kernel");
        lab.bird = Some(lab.start_bird()?);

        for (i, iface) in host_ifaces.iter().enumerate() {
            let dataplane = if i == 0 {
                format!("dataplane:\n  mode: ebpf\n  interfaces: [{iface}]\n")
            } else {
                "dataplane:\n  mode: iptables\n".to_owned()
            };
            let name = lab.hosts[i].name;
            step(&format!(
                "Starting the service and gocast on {name} ({} NAT)",
                if i == 0 { "eBPF" } else { "iptables" }
            ));
            let config = lab.dir.path().join(format!("{name}.yaml"));
            std::fs::write(
                &config,
                format!(
                    "agent:\n  listen_addr: {API}\n  monitor_interval: 200ms\n  cleanup_timer: 1h\n  state_file: {state}\n\
                     bgp:\n  local_as: 65001\n  remote_as: 65000\n  peer_ip: {peer}\n\
                     apps:\n  - name: web\n    vip: {VIP}/32\n    monitor: port:tcp:{SERVICE_PORT}\n    nats: ['tcp:{VIP_PORT}:{SERVICE_PORT}']\n{dataplane}",
                    state = lab.dir.path().join(format!("{name}.state.json")).display(),
                    peer = ROUTER_HOSTS[i],
                ),
            )?;
            let host = &mut lab.hosts[i];
            host.service = Some(service(&host.ns, name)?);
            let config = config.to_str().context("config path")?;
            host.agent = Some(Agent::start_with(
                binary,
                &host.ns,
                &["--log-level", "info", "run", "--config", config],
                &lab.dir.path().join(format!("{name}.log")),
                API,
            )?);
            println!("{name}: VIP {VIP}:{VIP_PORT} → {}:{SERVICE_PORT}", HOSTS[i]);
        }
        Ok(lab)
    }

    fn start_bird(&self) -> Result<Process> {
        let conf = self.dir.path().join("bird.conf");
        let mut text = format!(
            "router id {ROUTER_CLIENT};\nlog \"{}\" all;\nprotocol device {{}}\n\
             protocol kernel {{ merge paths on; ipv4 {{ export all; }}; }}\n",
            self.dir.path().join("bird.log").display()
        );
        for (i, host) in self.hosts.iter().enumerate() {
            let _ = write!(
                text,
                "protocol bgp {} {{\n  local {} as 65000;\n  neighbor {} as 65001;\n  passive on;\n  error wait time 1, 5;\n  ipv4 {{ import all; export none; }};\n}}\n",
                host.name, ROUTER_HOSTS[i], HOSTS[i]
            );
        }
        std::fs::write(&conf, text)?;
        let child = self
            .router
            .command("bird")
            .arg("-f")
            .arg("-c")
            .arg(&conf)
            .arg("-s")
            .arg(self.ctl())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting bird")?;
        let bird = Process(child);
        wait("BIRD to start", || {
            Ok(self.birdc(&["show", "status"])?.contains("Daemon is up"))
        })?;
        Ok(bird)
    }

    fn ctl(&self) -> std::path::PathBuf {
        self.dir.path().join("bird.ctl")
    }

    fn birdc(&self, args: &[&str]) -> Result<String> {
        let ctl = self.ctl();
        let mut all = vec!["-s", ctl.to_str().context("ctl path")?];
        all.extend_from_slice(args);
        self.router.run("birdc", &all)
    }

    /// Next hops of the VIP's route in the router's kernel table.
    fn next_hops(&self) -> Result<Vec<String>> {
        let out = self.router.ip(&["route", "show", &format!("{VIP}/32")])?;
        Ok(out
            .split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .filter(|w| w[0] == "via")
            .map(|w| w[1].to_owned())
            .collect())
    }

    /// `REQUESTS` requests from the client, each on a new connection (a new source port);
    /// how many each host answered.
    fn burst(&self) -> Result<[usize; 2]> {
        check_stop()?;
        let url = format!("http://{VIP}:{VIP_PORT}/");
        let mut args = vec!["-s", "-m", "5", "-H", "Connection: close"];
        args.extend(std::iter::repeat_n(url.as_str(), REQUESTS));
        let out = self.client.run("curl", &args)?;
        let count = |name: &str| out.lines().filter(|l| l.trim() == name).count();
        let counts = [count("host1"), count("host2")];
        println!(
            "{REQUESTS} requests to {VIP}:{VIP_PORT}, each on a new connection: host1 {} · host2 {}{}",
            counts[0],
            counts[1],
            if counts[0] + counts[1] < REQUESTS {
                format!(" · {} failed", REQUESTS - counts[0] - counts[1])
            } else {
                String::new()
            }
        );
        Ok(counts)
    }

    /// The narrated scenario.
    fn show(&mut self) -> Result<()> {
        step("Waiting for both BGP sessions");
        for host in &self.hosts {
            wait(&format!("session {} Established", host.name), || {
                Ok(self
                    .birdc(&["show", "protocols", host.name])?
                    .contains("Established"))
            })?;
        }
        print!("{}", self.birdc(&["show", "protocols"])?);

        step("Both hosts announce the VIP: two routes in BIRD, one ECMP route in the kernel");
        wait("two next hops", || Ok(self.next_hops()?.len() == 2))?;
        print!("{}", self.birdc(&["show", "route", &format!("{VIP}/32")])?);
        print!(
            "kernel: {}",
            self.router.ip(&["route", "show", &format!("{VIP}/32")])?
        );

        step("The client's requests spread over both hosts");
        self.burst()?;

        step("Stopping the service on host1 (its health check fails, gocast withdraws)");
        let stopped = Instant::now();
        // Dropping the guard kills the service by PID.
        self.hosts[0].service = None;
        wait("host1's next hop to leave the router's kernel", || {
            Ok(self.next_hops()? == [HOSTS[1]])
        })?;
        println!(
            "route withdrawn: the router's kernel has only host2 {:.0} ms after the kill \
             (health check every 200 ms, then BGP, BIRD and the kernel)",
            stopped.elapsed().as_secs_f64() * 1e3
        );
        print!("{}", self.birdc(&["show", "route", &format!("{VIP}/32")])?);
        let counts = self.burst()?;
        if counts[0] > 0 {
            println!("(unexpected: host1 still answered)");
        }

        step("Restoring the service on host1");
        let restored = Instant::now();
        let host = &mut self.hosts[0];
        host.service = Some(service(&host.ns, host.name)?);
        wait("host1's next hop back", || Ok(self.next_hops()?.len() == 2))?;
        println!(
            "route back: two next hops again {:.0} ms after the service started",
            restored.elapsed().as_secs_f64() * 1e3
        );
        self.burst()?;

        step("Per-VIP counters from each agent's /stats");
        // The agent reads every VIP's counters every 5 s: let it see the last burst.
        std::thread::sleep(Duration::from_millis(5500));
        for host in &self.hosts {
            Self::print_stats(host)?;
        }
        Ok(())
    }

    fn print_stats(host: &Host) -> Result<()> {
        let (status, body) = host.ns.http_get(&format!("http://{API}/stats"))?;
        ensure!(status == 200, "{}: /stats: {status} {body}", host.name);
        if let Some(why) = body["unavailable"].as_str() {
            println!("{}: no per-VIP counters: {why}", host.name);
            return Ok(());
        }
        let Some(vips) = body["vips"].as_array() else {
            println!("{}: /stats: {body}", host.name);
            return Ok(());
        };
        for v in vips {
            let n = |k: &str| v[k].as_u64().unwrap_or(0);
            println!(
                "{}: vip {} packets in {} ({} B) · out {} ({} B) · SYN in {} · SYN-ACK out {} · RST out {}",
                host.name,
                v["vip"].as_str().unwrap_or("?"),
                n("packets_in"),
                n("bytes_in"),
                n("packets_out"),
                n("bytes_out"),
                n("syn_in"),
                n("synack_out"),
                n("rst_out"),
            );
        }
        if vips.is_empty() {
            println!("{}: /stats lists no VIP", host.name);
        }
        Ok(())
    }
}
