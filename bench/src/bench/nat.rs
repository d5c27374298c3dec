//! `cargo xtask bench nat`: HTTP through the agent's NAT against the service reached directly,
//! and the XDP program's cost per packet.
//!
//! - **throughput**: three labs side by side, each a client namespace running `wrk` and an
//!   agent namespace running the HTTP service of [`super::http`] on [`SERVICE_PORT`]:
//!   `direct` (no agent: the client asks `physicalIP:SERVICE_PORT`), `ebpf` and `iptables`
//!   (the agent in that `dataplane.mode` NATs `VIP:80` to the service; the client asks the
//!   VIP, routed over the link by a static route). Separate namespaces keep iptables'
//!   conntrack out of the other two. Each round runs, per lab, `wrk` with `Connection: close`
//!   (a new connection per request) and with keepalive; rounds follow each other without a
//!   reset, so conntrack's growth under short connections shows in the later rounds. Within a
//!   round the modes take turns second by second (`--slice-s`), so the ratios compare runs
//!   taken at the same time on a busy machine, and what earlier runs leave behind (`TIME_WAIT`
//!   sockets expiring a minute later, memory to reclaim) falls on every mode alike.
//!   After the rounds, one more `wrk` run per connection kind in the eBPF lab with the kernel's
//!   program statistics on (`BPF_ENABLE_STATS`, which itself costs each run two clock reads, so
//!   not during the rounds): each of the agent's programs' runs and nanoseconds per run, and
//!   their share of a core, for and against the control.
//! - **xdp**: the packet programs loaded from the object, run by `BPF_PROG_TEST_RUN` with a
//!   large repeat count on crafted frames; the kernel reports the mean time per run. With
//!   `--compare OBJECT` another build of the object (e.g. an earlier commit's) is timed too,
//!   batch for batch alternating with this one. The floor, programs that only return their
//!   verdict (`XDP_FLOOR_PROGRAM`, `TC_FLOOR_PROGRAM`), is timed on the same frame: what the
//!   harness charges per run, to subtract from each figure.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result, bail, ensure};
use aya::{
    maps::{Array as BpfArray, HashMap as BpfHashMap},
    programs::{Program, TestRun as _, TestRunOptions},
};
use clap::{Args, ValueEnum};
use gocast_common::maps::{
    NAT_MAP, NatKey, NatTarget, PORTS_MAP, PROTO_TCP, PortBits, TC_FLOOR_PROGRAM, VIP_ADDRS_MAP,
    VIPS_MAP, VipKey, XDP_FLOOR_PROGRAM, addr_bit, port_bit,
};
use gocast_tests::{
    Agent, Netns, Topology,
    routers::{API, wait_until},
};
use tempfile::TempDir;
use xtask::build_ebpf;

use super::{Summary, release_agent};

/// The VIP the agent NATs, its port, and the service's real port.
const VIP: &str = "192.0.2.80";
const VIP_PORT: u16 = 80;
const SERVICE_PORT: u16 = 9080;
/// A second instance of the service in the eBPF lab, for [`Mode::EbpfNoNat`]: a port no NAT
/// rule maps to, so the control measures the programs on the link without any rewrite.
const CONTROL_PORT: u16 = 9081;
/// Targets from issue #5.
const RATIO_TARGET: f64 = 0.95;
const XDP_TARGET_NS: f64 = 100.0;
/// `XDP_PASS`, the verdict of every frame the program lets through (rewritten or not).
const XDP_PASS: u32 = 2;
/// `TC_ACT_OK`, the TC programs' verdict for every frame.
const TC_ACT_OK: u32 = 0;
/// `BPF_PROG_TEST_RUN` batches per case; the median batch is reported.
const XDP_BATCHES: usize = 5;

/// Arguments of `cargo xtask bench nat`.
#[derive(Debug, Clone, Args)]
pub struct NatArgs {
    /// Rounds per lab and connection kind.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Seconds of `wrk` per mode and connection kind in a round, in runs of `--slice-s`
    /// seconds that alternate between the modes.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    duration_s: u64,
    /// Seconds per `wrk` run within a round: the modes take turns at this grain, so a change in
    /// the machine's load (or in what earlier runs left behind, such as `TIME_WAIT` sockets
    /// expiring 60 s later) falls on all of them alike. `--duration-s` for one run per mode.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    slice_s: u64,
    /// Concurrent connections `wrk` keeps open.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=1000))]
    connections: u32,
    /// `wrk` threads.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    wrk_threads: u32,
    /// `BPF_PROG_TEST_RUN` repeat count per batch (at least a million).
    #[arg(long, default_value_t = 2_000_000, value_parser = clap::value_parser!(u32).range(1_000_000..))]
    repeat: u32,
    /// Run only these parts (repeat the flag for several); all by default.
    #[arg(long, value_enum)]
    only: Vec<Part>,
    /// Benchmark this agent binary instead of building the release agent.
    #[arg(long, value_name = "PATH")]
    agent: Option<PathBuf>,
    /// `dataplane.ingress` of the eBPF lab: `auto` (TC ingress on the veth), `xdp` or `tc`.
    #[arg(long, default_value = "auto", value_parser = ["auto", "xdp", "tc"])]
    ingress: String,
    /// Also time this eBPF object (e.g. an earlier commit's build) in the `xdp` part, its
    /// batches alternating with this build's.
    #[arg(long, value_name = "OBJECT")]
    compare: Option<PathBuf>,
}

/// The parts of the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Part {
    Throughput,
    Xdp,
}

/// How the client reaches the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `physicalIP:port` in the lab without an agent: the baseline.
    Direct,
    /// The VIP, through the eBPF dataplane.
    Ebpf,
    /// The VIP, through iptables DNAT.
    Iptables,
    /// `physicalIP:port` in the eBPF lab: what attaching XDP and TC costs on this link without
    /// any NAT (a control, to tell the NAT's cost from the attachment's).
    EbpfNoNat,
}

impl Mode {
    pub const ALL: [Self; 4] = [Self::Direct, Self::Ebpf, Self::Iptables, Self::EbpfNoNat];

    pub fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Ebpf => "eBPF",
            Self::Iptables => "iptables",
            Self::EbpfNoNat => "eBPF attached, no NAT",
        }
    }

    /// The lab this mode runs in, as an index into the labs of [`LAB_MODES`].
    fn lab(self) -> usize {
        match self {
            Self::Direct => 0,
            Self::Ebpf | Self::EbpfNoNat => 1,
            Self::Iptables => 2,
        }
    }
}

/// The labs built, in this order: no agent, the agent in each dataplane mode.
const LAB_MODES: [Mode; 3] = [Mode::Direct, Mode::Ebpf, Mode::Iptables];

/// New connection per request, or one connection for many.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Short,
    Keepalive,
}

impl Kind {
    pub const ALL: [Self; 2] = [Self::Short, Self::Keepalive];

    pub fn name(self) -> &'static str {
        match self {
            Self::Short => "short (Connection: close)",
            Self::Keepalive => "keepalive",
        }
    }
}

/// One round's requests per second, indexed `[kind][mode]` as in [`Kind::ALL`], [`Mode::ALL`].
#[derive(Debug, Clone, Default)]
pub struct Round {
    pub rps: [[f64; 4]; 2],
    /// Conntrack entries in the iptables lab's namespace after the round.
    pub conntrack: Option<u64>,
}

/// One program's kernel statistics over one `wrk` run.
#[derive(Debug, Clone)]
pub struct ProgramStat {
    pub name: String,
    /// Runs per second of `wrk`.
    pub runs_per_s: f64,
    /// Mean time per run, in nanoseconds.
    pub ns_per_run: f64,
    /// Time in the program per second of `wrk`, in % of one core.
    pub core_pct: f64,
}

/// The attribution run of one connection kind and mode (eBPF or its control), stats on.
#[derive(Debug, Clone)]
pub struct Attribution {
    pub kind: Kind,
    pub mode: Mode,
    pub rps: f64,
    pub programs: Vec<ProgramStat>,
}

/// The packet programs' mean cost per packet, each in nanoseconds.
#[derive(Debug, Clone, Copy)]
pub struct XdpCost {
    /// A TCP packet to a VIP port with a NAT rule: counted and rewritten.
    pub rewrite: f64,
    /// A TCP packet to a VIP port without a rule: counted only.
    pub vip_only: f64,
    /// A TCP packet to an address that is no VIP.
    pub other: f64,
    /// TC ingress, a packet of an established flow through the NAT.
    pub tc_rewrite: f64,
    /// TC egress, the reply of such a flow: rewritten and counted.
    pub tc_reverse: f64,
    /// TC egress, a packet from a port no NAT rule targets.
    pub tc_other: f64,
    /// XDP, the SYN of a new connection through the NAT, on full flow maps: counted, rewritten,
    /// its flow written (one run per SYN, see [`Floor::single`]).
    pub syn: f64,
    /// TC ingress, the same.
    pub tc_syn: f64,
}

/// What `BPF_PROG_TEST_RUN` charges per run of a program that does nothing, on the same frame,
/// in nanoseconds: the part of each [`XdpCost`] figure that is the harness's.
#[derive(Debug, Clone, Copy)]
pub struct Floor {
    pub xdp: f64,
    pub tc: f64,
    /// XDP, one run per `BPF_PROG_TEST_RUN` (the new-connection figures are timed so).
    pub single: f64,
}

/// What `bench nat` measured, for `docs/benchmarks.md`.
#[derive(Debug, Default)]
pub struct NatReport {
    pub rounds: Vec<Round>,
    pub attribution: Vec<Attribution>,
    pub xdp: Option<XdpCost>,
    /// The `--compare` object's figures, timed alongside.
    pub compared: Option<XdpCost>,
    /// Timed with this build's object (the kernel's, whichever object holds it).
    pub floor: Option<Floor>,
    pub summary: Summary,
}

/// Builds the eBPF object and the release agent, then runs the selected parts.
pub fn run(args: &NatArgs) -> Result<NatReport> {
    let object = build_ebpf::run().context("building the eBPF object")?;
    let wanted = |part| args.only.is_empty() || args.only.contains(&part);
    let mut report = NatReport::default();
    if wanted(Part::Throughput) {
        let binary = match &args.agent {
            Some(path) => path.clone(),
            None => release_agent()?,
        };
        println!("agent binary: {}", binary.display());
        (report.rounds, report.attribution) =
            throughput(&binary, args).context("throughput part")?;
        summarize_rounds(&report.rounds, &mut report.summary);
    }
    if wanted(Part::Xdp) {
        let mut objects = vec![object.as_path()];
        objects.extend(args.compare.as_deref());
        let (costs, floor) = xdp_cost(&objects, args.repeat).context("xdp part")?;
        let cost = costs[0];
        report.compared = costs.get(1).copied();
        report.summary.checked(
            "XDP, NAT rewrite (per packet)",
            format!("{:.1} ns", cost.rewrite),
            "≤ 100 ns",
            cost.rewrite <= XDP_TARGET_NS,
        );
        for (label, ns) in [
            ("XDP floor (a program that only passes)", floor.xdp),
            ("XDP, NAT rewrite above the floor", cost.rewrite - floor.xdp),
            ("XDP, VIP port without rule", cost.vip_only),
            ("XDP, not a VIP", cost.other),
            ("TC ingress, NAT rewrite", cost.tc_rewrite),
            ("TC egress, reverse NAT", cost.tc_reverse),
            ("TC egress, not ours", cost.tc_other),
            ("TC floor", floor.tc),
            ("XDP, SYN of a new connection (full flow maps)", cost.syn),
            ("TC ingress, SYN of a new connection", cost.tc_syn),
            ("XDP floor, one run per call", floor.single),
        ] {
            report.summary.figure(label, format!("{ns:.1} ns"));
        }
        report.xdp = Some(cost);
        report.floor = Some(floor);
    }
    report.summary.print("bench nat: summary");
    Ok(report)
}

/// The HTTP service of [`super::http`] in a namespace, killed by PID on drop.
struct Server {
    child: Child,
}

impl Server {
    fn start(ns: &Netns, port: u16, threads: u32) -> Result<Self> {
        let exe = std::env::current_exe().context("locating the gocast-bench binary")?;
        let mut child = ns
            .command(exe.to_str().context("gocast-bench path")?)
            .args(["bench", "serve-http", "--port"])
            .arg(port.to_string())
            .arg("--threads")
            .arg(threads.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the HTTP service")?;
        let stdout = child.stdout.take().context("service stdout")?;
        let server = Self { child };
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        ensure!(line.trim() == "ready", "the HTTP service did not start");
        Ok(server)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One lab: client ↔ agent namespace with the service, and the agent unless `direct`.
/// Fields drop in order: agent (which removes its NAT), service, namespaces, files.
struct Lab {
    mode: Mode,
    agent: Option<Agent>,
    _server: Server,
    /// The service on [`CONTROL_PORT`] (eBPF lab only).
    _control: Option<Server>,
    topo: Topology,
    _dir: TempDir,
    /// The service reached without NAT (on [`CONTROL_PORT`] in the eBPF lab), and what the
    /// client asks in this lab's mode.
    direct_url: String,
    url: String,
}

impl Lab {
    fn new(mode: Mode, binary: &Path, args: &NatArgs) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let topo = Topology::new()?;
        // Short connections at tens of thousands per second: every client port, and reuse of
        // the client's TIME_WAIT ports (both per-namespace sysctls).
        topo.client.run(
            "sysctl",
            &[
                "-qw",
                "net.ipv4.ip_local_port_range=1024 65535",
                "net.ipv4.tcp_tw_reuse=1",
            ],
        )?;
        let threads = args.connections + 16;
        let server = Server::start(&topo.agent, SERVICE_PORT, threads)?;
        let (control, direct_port) = if mode == Mode::Ebpf {
            let control = Server::start(&topo.agent, CONTROL_PORT, threads)?;
            (Some(control), CONTROL_PORT)
        } else {
            (None, SERVICE_PORT)
        };
        let direct_url = format!("http://{}:{direct_port}/", topo.agent_ip);
        let (agent, url) = match mode {
            Mode::Direct | Mode::EbpfNoNat => (None, direct_url.clone()),
            Mode::Ebpf | Mode::Iptables => {
                let config = agent_config(dir.path(), &topo, mode, &args.ingress)?;
                let agent = Agent::start_with(
                    binary,
                    &topo.agent,
                    &["--log-level", "info", "run", "--config", &config],
                    &dir.path().join("agent.log"),
                    API,
                )?;
                (Some(agent), format!("http://{VIP}:{VIP_PORT}/"))
            }
        };
        let lab = Self {
            mode,
            agent,
            _server: server,
            _control: control,
            topo,
            _dir: dir,
            direct_url,
            url,
        };
        lab.check()
            .with_context(|| match &lab.agent {
                Some(agent) => agent.log_text(),
                None => String::new(),
            })
            .with_context(|| format!("{} lab", mode.name()))?;
        Ok(lab)
    }

    /// The client gets an answer, through the dataplane this lab is about.
    fn check(&self) -> Result<()> {
        for url in [&self.url, &self.direct_url] {
            wait_until(
                &format!("an answer from {url}"),
                Duration::from_secs(15),
                || Ok(self.topo.client.http_get(url)?.0 == 200),
            )?;
        }
        match self.mode {
            Mode::Direct | Mode::EbpfNoNat => {}
            Mode::Ebpf => {
                let (_, info) = self.topo.agent.http_get(&format!("http://{API}/info"))?;
                ensure!(
                    info["dataplane"]["mode"] == "ebpf",
                    "the eBPF dataplane does not run: {}",
                    info["dataplane"]
                );
                println!("eBPF lab: {}", info["dataplane"]["reason"]);
            }
            Mode::Iptables => {
                let rules = self.topo.agent.nat_rules("iptables")?;
                ensure!(
                    rules.contains(&format!("{VIP}/32")) && rules.contains("DNAT"),
                    "no DNAT rule for the VIP:\n{rules}"
                );
            }
        }
        Ok(())
    }

    /// Conntrack entries in the agent's namespace (none without the module).
    fn conntrack(&self) -> Option<u64> {
        self.topo
            .agent
            .run("cat", &["/proc/sys/net/netfilter/nf_conntrack_count"])
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// What the client asks for `mode`, which runs in this lab.
    fn url_for(&self, mode: Mode) -> &str {
        if mode == Mode::EbpfNoNat {
            &self.direct_url
        } else {
            &self.url
        }
    }

    fn wrk(&self, mode: Mode, kind: Kind, args: &NatArgs) -> Result<Wrk> {
        let mut command = self.topo.client.command("wrk");
        command
            .arg(format!("-t{}", args.wrk_threads))
            .arg(format!("-c{}", args.connections))
            .arg(format!("-d{}s", args.duration_s));
        if kind == Kind::Short {
            command.args(["-H", "Connection: close"]);
        }
        let out = command
            .arg(self.url_for(mode))
            .output()
            .context("running wrk")?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "wrk failed ({}): {text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        parse_wrk(&text)
    }
}

/// The agent's config: one app whose NAT sends `VIP:80` to the service's port, in `mode`.
fn agent_config(dir: &Path, topo: &Topology, mode: Mode, ingress: &str) -> Result<String> {
    let dataplane = match mode {
        Mode::Ebpf => {
            let iface = veth(topo)?;
            format!("dataplane:\n  mode: ebpf\n  interfaces: [{iface}]\n  ingress: {ingress}\n")
        }
        Mode::Iptables | Mode::Direct | Mode::EbpfNoNat => {
            "dataplane:\n  mode: iptables\n".to_owned()
        }
    };
    let path = dir.join("config.yaml");
    std::fs::write(
        &path,
        format!(
            "agent:\n  listen_addr: {API}\n  monitor_interval: 1s\n  cleanup_timer: 1h\n  state_file: {state}\n\
             bgp:\n  local_as: 65001\n  remote_as: 65000\n  peer_ip: {peer}\n\
             apps:\n  - name: web\n    vip: {VIP}/32\n    monitor: port:tcp:{SERVICE_PORT}\n    nats: ['tcp:{VIP_PORT}:{SERVICE_PORT}']\n\
             {dataplane}",
            state = dir.join("state.json").display(),
            peer = topo.client_ip,
        ),
    )?;
    Ok(path.to_str().context("config path")?.to_owned())
}

/// The agent namespace's veth.
fn veth(topo: &Topology) -> Result<String> {
    let links = topo.agent.ip(&["-o", "link", "show", "type", "veth"])?;
    // `3: gca7@if2: <BROADCAST,...`
    links
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.split('@').next())
        .map(str::to_owned)
        .context("no veth in the agent namespace")
}

/// What one `wrk` run printed.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Wrk {
    rps: f64,
    /// Socket errors (connect, read, write, timeout) and non-2xx/3xx answers.
    errors: u64,
}

fn parse_wrk(out: &str) -> Result<Wrk> {
    let mut rps = None;
    let mut errors = 0;
    for line in out.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            rps = Some(
                v.trim()
                    .parse::<f64>()
                    .with_context(|| format!("{line:?}"))?,
            );
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            // `connect 0, read 12, write 0, timeout 0`
            for part in v.split(',') {
                let n = part.split_whitespace().last().unwrap_or("0");
                errors += n.parse::<u64>().with_context(|| format!("{line:?}"))?;
            }
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            errors += v
                .trim()
                .parse::<u64>()
                .with_context(|| format!("{line:?}"))?;
        }
    }
    let Some(rps) = rps else {
        bail!("no Requests/sec in wrk's output:\n{out}");
    };
    Ok(Wrk { rps, errors })
}

fn throughput(binary: &Path, args: &NatArgs) -> Result<(Vec<Round>, Vec<Attribution>)> {
    println!(
        "\n== throughput: {} rounds × {} s per mode in runs of {} s, wrk -t{} -c{} ==",
        args.rounds, args.duration_s, args.slice_s, args.wrk_threads, args.connections
    );
    // Whole seconds: the kernel reports load times at that precision.
    let since = SystemTime::now() - Duration::from_secs(1);
    let labs = LAB_MODES
        .iter()
        .map(|&mode| Lab::new(mode, binary, args))
        .collect::<Result<Vec<_>>>()?;
    let run = |mode: Mode, kind: Kind, args: &NatArgs| {
        labs[mode.lab()]
            .wrk(mode, kind, args)
            .with_context(|| format!("{}, {}", kind.name(), mode.name()))
    };
    // Warm-up, not recorded: the first run after a lab is built pays for cold caches.
    let warm_up = NatArgs {
        duration_s: 1,
        ..args.clone()
    };
    for mode in Mode::ALL {
        for kind in Kind::ALL {
            run(mode, kind, &warm_up).context("warm-up")?;
        }
    }
    let run_s = args.slice_s.min(args.duration_s);
    let slices = usize::try_from(args.duration_s.div_ceil(run_s))?;
    let slice_args = NatArgs {
        duration_s: run_s,
        ..args.clone()
    };
    let mut rounds = Vec::new();
    for r in 1..=args.rounds {
        let mut round = Round::default();
        for (k, kind) in Kind::ALL.into_iter().enumerate() {
            // Each slice starts with another mode, so none always runs first (or last).
            let n = Mode::ALL.len();
            for slice in 0..slices {
                let first = (r as usize - 1) + slice;
                for m in (0..n).map(|i| (i + first) % n) {
                    let mode = Mode::ALL[m];
                    let result =
                        run(mode, kind, &slice_args).with_context(|| format!("round {r}"))?;
                    if result.errors > 0 {
                        println!(
                            "  round {r} {} {}: {} errors",
                            kind.name(),
                            mode.name(),
                            result.errors
                        );
                    }
                    #[expect(clippy::cast_precision_loss, reason = "a handful of slices")]
                    let share = result.rps / slices as f64;
                    round.rps[k][m] += share;
                }
            }
            let [direct, ebpf, iptables, no_nat] = round.rps[k];
            println!(
                "round {r} {:<26} direct {direct:>7.0}/s  eBPF {ebpf:>7.0}/s  iptables {iptables:>7.0}/s  \
                 eBPF/direct {:.3}  eBPF/iptables {:.3}  iptables/direct {:.3}  (eBPF attached, no NAT: {:.3} × direct)",
                kind.name(),
                ratio(ebpf, direct),
                ratio(ebpf, iptables),
                ratio(iptables, direct),
                ratio(no_nat, direct),
            );
        }
        round.conntrack = labs[Mode::Iptables.lab()].conntrack();
        if let Some(n) = round.conntrack {
            println!("round {r}: {n} conntrack entries in the iptables lab");
        }
        rounds.push(round);
    }
    let attribution = attribute(&labs[Mode::Ebpf.lab()], since, args).context("attribution run")?;
    Ok((rounds, attribution))
}

/// One `wrk` run per connection kind, eBPF and its control, with the kernel's program
/// statistics on: each of the agent's programs' runs and time.
fn attribute(lab: &Lab, since: SystemTime, args: &NatArgs) -> Result<Vec<Attribution>> {
    // Counted while the descriptor is open; closed (and the counting off again) on return.
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).context("BPF_ENABLE_STATS")?;
    let probe = NatArgs {
        duration_s: 1,
        ..args.clone()
    };
    lab.wrk(Mode::Ebpf, Kind::Keepalive, &probe)
        .context("traffic to find the lab's programs")?;
    let ids = agent_programs(since)?;
    println!("\n== attribution: kernel program statistics on, programs {ids:?} ==");
    let mut out = Vec::new();
    for kind in Kind::ALL {
        for mode in [Mode::Ebpf, Mode::EbpfNoNat] {
            let before = program_stats(&ids)?;
            let started = Instant::now();
            let wrk = lab.wrk(mode, kind, args)?;
            let secs = started.elapsed().as_secs_f64();
            let after = program_stats(&ids)?;
            let mut programs = Vec::new();
            for (id, (name, runs, ns)) in after {
                let (_, runs0, ns0) = before.get(&id).cloned().unwrap_or_default();
                let (runs, ns) = (runs.saturating_sub(runs0), ns.saturating_sub(ns0));
                #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
                let (runs, ns) = (runs as f64, ns as f64);
                programs.push(ProgramStat {
                    name,
                    runs_per_s: runs / secs,
                    ns_per_run: ratio(ns, runs),
                    core_pct: ns / secs / 1e7,
                });
            }
            println!("{} {}: {:.0} req/s", kind.name(), mode.name(), wrk.rps);
            for p in &programs {
                println!(
                    "  {:<18} {:>9.0} runs/s {:>7.1} ns/run {:>5.2} % of a core",
                    p.name, p.runs_per_s, p.ns_per_run, p.core_pct
                );
            }
            out.push(Attribution {
                kind,
                mode,
                rps: wrk.rps,
                programs,
            });
        }
    }
    Ok(out)
}

/// The ids of the eBPF lab agent's programs: of the TC egress programs loaded since `since`
/// (when the labs were built), the one that ran most since statistics went on (the caller ran
/// traffic through the lab), and all programs sharing a map with it (the same object's). Not
/// by name or load time alone: other agents (tests) may run on this machine, and this
/// `bpftool` lists neither tcx attachments nor the processes holding programs.
fn agent_programs(since: SystemTime) -> Result<Vec<u32>> {
    let mut all = Vec::new();
    for info in aya::programs::loaded_programs() {
        let info = info.context("listing eBPF programs")?;
        let ours = info
            .name_as_str()
            .is_some_and(|n| n.starts_with("gocast_tc_egr"))
            && info.loaded_at().is_some_and(|t| t >= since);
        let runs = if ours { info.run_count() } else { 0 };
        all.push((info.id(), runs, info.map_ids()?.unwrap_or_default()));
    }
    let maps = all
        .iter()
        .filter(|(_, runs, _)| *runs > 0)
        .max_by_key(|(_, runs, _)| *runs)
        .map(|(_, _, maps)| maps.clone())
        .context("no gocast_tc_egress program loaded since the labs were built ran")?;
    Ok(all
        .into_iter()
        .filter(|(_, _, map_ids)| map_ids.iter().any(|m| maps.contains(m)))
        .map(|(id, _, _)| id)
        .collect())
}

/// Name, run count and run time (ns) of each of the programs `ids`.
fn program_stats(ids: &[u32]) -> Result<BTreeMap<u32, (String, u64, u64)>> {
    let mut out = BTreeMap::new();
    for info in aya::programs::loaded_programs() {
        let info = info.context("listing eBPF programs")?;
        if ids.contains(&info.id()) {
            let name = info.name_as_str().unwrap_or("?").to_owned();
            let ns = u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX);
            out.insert(info.id(), (name, info.run_count(), ns));
        }
    }
    Ok(out)
}

/// `a / b`, zero when `b` is.
pub fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

fn summarize_rounds(rounds: &[Round], summary: &mut Summary) {
    for (k, kind) in Kind::ALL.into_iter().enumerate() {
        let short = match kind {
            Kind::Short => "short",
            Kind::Keepalive => "keepalive",
        };
        for (r, round) in rounds.iter().enumerate() {
            let [direct, ebpf, iptables, no_nat] = round.rps[k];
            let r = r + 1;
            summary.figure(
                &format!("{short} r{r}: direct / eBPF / iptables"),
                format!("{direct:.0} / {ebpf:.0} / {iptables:.0} req/s"),
            );
            let e = ratio(ebpf, direct);
            summary.checked(
                &format!("{short} r{r}: eBPF / direct"),
                format!("{e:.3}×"),
                "≥ 0.95×",
                e >= RATIO_TARGET,
            );
            summary.figure(
                &format!("{short} r{r}: eBPF / iptables"),
                format!("{:.3}×", ratio(ebpf, iptables)),
            );
            summary.figure(
                &format!("{short} r{r}: eBPF attached, no NAT / direct"),
                format!("{:.3}×", ratio(no_nat, direct)),
            );
        }
    }
    if let Some(n) = rounds.last().and_then(|r| r.conntrack) {
        summary.figure("conntrack entries (iptables lab, end)", n.to_string());
    }
}

/// An Ethernet + IPv4 + TCP ACK frame `src:sport → dst:dport` with valid checksums: a packet
/// of an established connection, what nearly all traffic is.
fn ack_frame(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    tcp_frame(src, sport, dst, dport, TCP_ACK)
}

/// TCP flags of [`tcp_frame`].
const TCP_ACK: u8 = 0x10;
const TCP_SYN: u8 = 0x02;

/// An Ethernet + IPv4 + TCP frame `src:sport → dst:dport` with `flags` and valid checksums.
fn tcp_frame(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00];
    f.extend_from_slice(&[0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, PROTO_TCP, 0, 0]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    let ip_sum = !ones_sum(&f[14..34], 0);
    f[24..26].copy_from_slice(&ip_sum.to_be_bytes());
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, PROTO_TCP, 0, 20]);
    let tcp_sum = !ones_sum(&f[34..], u32::from(ones_sum(&pseudo, 0)));
    f[50..52].copy_from_slice(&tcp_sum.to_be_bytes());
    f
}

/// The folded ones' complement sum of `data` as big-endian 16-bit words, plus `acc`.
fn ones_sum(data: &[u8], mut acc: u32) -> u16 {
    for pair in data.chunks(2) {
        acc += u32::from(pair[0]) << 8 | pair.get(1).copied().map_or(0, u32::from);
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    u16::try_from(acc).unwrap_or(u16::MAX)
}

/// The addresses of the `xdp` part: two VIPs, a client, an address that is no VIP.
const A: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 81);
const B: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 82);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 255, 1);
const OTHER: Ipv4Addr = Ipv4Addr::new(198, 18, 255, 2);
const CLIENT_PORT: u16 = 40000;

/// The packet programs of `object`, loaded with the `xdp` part's rules.
///
/// With `repeat`, the kernel runs a program again and again on the same buffer, so a frame the
/// program rewrites is no longer the frame it was. To time the rewrite on every run, two VIPs
/// NAT to each other (`A:80 → B:8080`, `B:8080 → A:80`): each run turns the frame into one that
/// matches the other rule. After the first two runs both flows are known, so the figure is that
/// of a packet of an established flow; TC egress likewise turns `B:8080`'s reply into `A:80`'s
/// and back.
fn load_programs(object: &Path) -> Result<aya::Ebpf> {
    let mut bpf =
        aya::Ebpf::load_file(object).with_context(|| format!("loading {}", object.display()))?;
    let mut vips: BpfHashMap<_, VipKey, u32> =
        BpfHashMap::try_from(bpf.map_mut(VIPS_MAP).context(VIPS_MAP)?)?;
    vips.insert(VipKey::new(A.into()), 0, 0)?;
    vips.insert(VipKey::new(B.into()), 1, 0)?;
    // Slots 0 and 1 as above, generation 0 (the slots map's initial value). An object from
    // before the rules carried slot and checksum difference has 20-byte values: address, port,
    // padding.
    let nat = bpf.map_mut(NAT_MAP).context(NAT_MAP)?;
    for (from, from_port, to, to_port, slot) in [
        (A, VIP_PORT, B, SERVICE_PORT, 0),
        (B, SERVICE_PORT, A, VIP_PORT, 1),
    ] {
        let key = NatKey::new(from.into(), from_port, PROTO_TCP);
        let target = NatTarget::new(from.into(), to.into(), to_port, (slot, 0));
        if let Ok(mut nat) = BpfHashMap::<_, NatKey, NatTarget>::try_from(&mut *nat) {
            nat.insert(key, target, 0)?;
        } else {
            let mut old = [0; 20];
            old[..16].copy_from_slice(&target.dest);
            old[16..18].copy_from_slice(&target.port.to_ne_bytes());
            BpfHashMap::<_, NatKey, [u8; 20]>::try_from(&mut *nat)?.insert(key, old, 0)?;
        }
    }
    // An object from before the address filter has no such map.
    if let Some(map) = bpf.map_mut(VIP_ADDRS_MAP) {
        let mut addrs: BpfArray<_, u64> = BpfArray::try_from(map)?;
        for vip in [A, B] {
            let (index, mask) = addr_bit(&VipKey::new(vip.into()).addr);
            let word = addrs.get(&index, 0)?;
            addrs.set(index, word | mask, 0)?;
        }
    }
    // An object from before the port filter has no such map; one from before the address bits
    // has 16-byte entries.
    if let Some(map) = bpf.map_mut(PORTS_MAP) {
        let entries = [(A, VIP_PORT), (B, SERVICE_PORT)].map(|(vip, port)| {
            let (index, mask) = port_bit(port.to_be());
            let bits = PortBits {
                vip: mask,
                target: mask,
                vip_addr: addr_bit(&VipKey::new(vip.into()).addr).1,
            };
            (index, bits)
        });
        if let Ok(mut ports) = BpfArray::<_, PortBits>::try_from(&mut *map) {
            for (index, bits) in entries {
                ports.set(index, bits, 0)?;
            }
        } else {
            let mut ports: BpfArray<_, [u64; 2]> = BpfArray::try_from(map)?;
            for (index, bits) in entries {
                ports.set(index, [bits.vip, bits.target], 0)?;
            }
        }
    }
    // An object from before the floor programs has none; the floor is the kernel's, timed
    // with the first object's.
    for (name, required) in [
        ("gocast_xdp", true),
        ("gocast_tc_ingress", true),
        ("gocast_tc_egress", true),
        (XDP_FLOOR_PROGRAM, false),
        (TC_FLOOR_PROGRAM, false),
    ] {
        match bpf.program_mut(name) {
            Some(Program::Xdp(xdp)) => xdp.load(),
            Some(Program::SchedClassifier(tc)) => tc.load(),
            Some(_) => bail!("{name} is neither XDP nor TC"),
            None if required => bail!("no {name} program in the object"),
            None => continue,
        }
        .with_context(|| format!("loading {name}"))?;
    }
    Ok(bpf)
}

/// One `BPF_PROG_TEST_RUN` of program `name` on `frame`, `repeat` times: the verdict, the mean
/// ns per run, and the frame as the last run left it.
fn test_run(
    bpf: &mut aya::Ebpf,
    name: &str,
    frame: &[u8],
    repeat: u32,
) -> Result<(u32, f64, Vec<u8>)> {
    let mut out = vec![0; frame.len() + 256];
    let options = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        repeat,
        ..TestRunOptions::default()
    };
    let program = bpf
        .program_mut(name)
        .with_context(|| format!("no {name}"))?;
    let result = match program {
        Program::Xdp(xdp) => xdp.test_run(options)?,
        Program::SchedClassifier(tc) => tc.test_run(options)?,
        _ => bail!("{name} is neither XDP nor TC"),
    };
    out.truncate(result.data_size_out as usize);
    Ok((
        result.return_value,
        result.duration.as_secs_f64() * 1e9,
        out,
    ))
}

/// Loads each object's packet programs and times six kinds of packet, batch for batch
/// alternating between the objects; one [`XdpCost`] per object, and the [`Floor`] (timed with
/// the first object).
fn xdp_cost(objects: &[&Path], repeat: u32) -> Result<(Vec<XdpCost>, Floor)> {
    println!(
        "\n== xdp: BPF_PROG_TEST_RUN, {XDP_BATCHES} batches × {repeat} runs per case, objects {} ==",
        objects
            .iter()
            .map(|o| o.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut loaded = objects
        .iter()
        .map(|o| load_programs(o))
        .collect::<Result<Vec<_>>>()?;

    // One run of the matching frame must come out rewritten, or the timing means nothing.
    let frame = ack_frame(CLIENT, CLIENT_PORT, A, VIP_PORT);
    for bpf in &mut loaded {
        let (verdict, _, out) = test_run(bpf, "gocast_xdp", &frame, 1)?;
        ensure!(
            verdict == XDP_PASS
                && out[30..34] == B.octets()
                && out[36..38] == SERVICE_PORT.to_be_bytes(),
            "the NAT rule did not rewrite the frame (verdict {verdict})"
        );
    }
    let floor_cases: [Case; 2] = [
        ("XDP floor", XDP_FLOOR_PROGRAM, frame.clone(), XDP_PASS),
        ("TC floor", TC_FLOOR_PROGRAM, frame.clone(), TC_ACT_OK),
    ];
    let [xdp, tc] = floor_cases.map(|case| median_ns(&mut loaded[..1], &case, repeat));
    let mut floor = Floor {
        xdp: xdp?[0],
        tc: tc?[0],
        single: 0.0,
    };
    let cases: [Case; 6] = [
        ("XDP NAT rewrite (VIP:80)", "gocast_xdp", frame, XDP_PASS),
        (
            "XDP VIP port without rule",
            "gocast_xdp",
            ack_frame(CLIENT, CLIENT_PORT, A, 443),
            XDP_PASS,
        ),
        (
            "XDP not a VIP",
            "gocast_xdp",
            ack_frame(CLIENT, CLIENT_PORT, OTHER, VIP_PORT),
            XDP_PASS,
        ),
        (
            "TC ingress NAT rewrite",
            "gocast_tc_ingress",
            ack_frame(CLIENT, CLIENT_PORT, A, VIP_PORT),
            TC_ACT_OK,
        ),
        (
            "TC egress reverse NAT",
            "gocast_tc_egress",
            ack_frame(B, SERVICE_PORT, CLIENT, CLIENT_PORT),
            TC_ACT_OK,
        ),
        (
            "TC egress not ours",
            "gocast_tc_egress",
            ack_frame(OTHER, 22, CLIENT, CLIENT_PORT),
            TC_ACT_OK,
        ),
    ];
    let mut medians = vec![[0.0; 6]; loaded.len()];
    for (c, case) in cases.iter().enumerate() {
        for (o, ns) in median_ns(&mut loaded, case, repeat)?
            .into_iter()
            .enumerate()
        {
            medians[o][c] = ns;
        }
    }
    let (xdp_syn, syn_floor) = new_flow_ns(&mut loaded, "gocast_xdp", XDP_FLOOR_PROGRAM)?;
    let (tc_syn, _) = new_flow_ns(&mut loaded, "gocast_tc_ingress", TC_FLOOR_PROGRAM)?;
    floor.single = syn_floor;
    let costs = medians
        .into_iter()
        .zip(xdp_syn.into_iter().zip(tc_syn))
        .map(|(m, (syn, tc_syn))| XdpCost {
            syn,
            tc_syn,
            rewrite: m[0],
            vip_only: m[1],
            other: m[2],
            tc_rewrite: m[3],
            tc_reverse: m[4],
            tc_other: m[5],
        })
        .collect();
    Ok((costs, floor))
}

/// Flows that fill the flow maps before new connections are timed: more than the maps hold, so
/// each insert evicts, as on a host that has served many short connections.
const FILL_FLOWS: u32 = gocast_common::maps::MAX_FLOWS + 16_384;
/// New connections timed per object and program.
const NEW_FLOWS_TIMED: u32 = 30_000;

/// The SYN of new connection `i` to `A:80`, from a client address and port no other `i` uses.
fn syn_frame(i: u32) -> Vec<u8> {
    let client = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 128, 0)) + i / 50_000);
    #[expect(clippy::cast_possible_truncation, reason = "below 60,000")]
    let port = (10_000 + i % 50_000) as u16;
    tcp_frame(client, port, A, VIP_PORT, TCP_SYN)
}

/// The mean cost of a new connection's SYN in the ingress program `program`, per object, in ns:
/// one `BPF_PROG_TEST_RUN` per SYN, each from a 5-tuple never seen before, once [`FILL_FLOWS`]
/// others filled the flow maps. The objects alternate SYN by SYN, each with its own maps. Runs
/// of one are dearer than the repeated runs of the other cases (the harness's clock reads and
/// set-up are not spread over millions), so `floor`, run on the same frames, is timed with them.
fn new_flow_ns(loaded: &mut [aya::Ebpf], program: &str, floor: &str) -> Result<(Vec<f64>, f64)> {
    for bpf in loaded.iter_mut() {
        for i in 0..FILL_FLOWS {
            test_run(bpf, program, &syn_frame(i), 1)?;
        }
    }
    let mut totals = vec![0.0; loaded.len()];
    let mut floor_total = 0.0;
    for i in FILL_FLOWS..FILL_FLOWS + NEW_FLOWS_TIMED {
        let frame = syn_frame(i);
        for (bpf, total) in loaded.iter_mut().zip(&mut totals) {
            *total += test_run(bpf, program, &frame, 1)?.1;
        }
        floor_total += test_run(&mut loaded[0], floor, &frame, 1)?.1;
    }
    let n = f64::from(NEW_FLOWS_TIMED);
    let floor = floor_total / n;
    let means = totals.into_iter().map(|t| t / n).collect::<Vec<_>>();
    for (o, mean) in means.iter().enumerate() {
        println!("{program} new connection, object {o}: {mean:>7.1} ns/SYN (floor {floor:.1})");
    }
    Ok((means, floor))
}

/// A case of the `xdp` part: label, program, frame, and the verdict every run must return.
type Case<'a> = (&'a str, &'a str, Vec<u8>, u32);

/// [`XDP_BATCHES`] batches of `repeat` runs of `program` on `frame` per object, alternating
/// between the objects: each object's median batch, in ns per run. Every run must return
/// `pass`.
fn median_ns(
    loaded: &mut [aya::Ebpf],
    (label, program, frame, pass): &Case,
    repeat: u32,
) -> Result<Vec<f64>> {
    let mut batches = vec![Vec::new(); loaded.len()];
    for _ in 0..XDP_BATCHES {
        for (bpf, batches) in loaded.iter_mut().zip(&mut batches) {
            let (verdict, ns, _) = test_run(bpf, program, frame, repeat)?;
            ensure!(verdict == *pass, "{label}: verdict {verdict}");
            batches.push(ns);
        }
    }
    Ok(batches
        .iter_mut()
        .enumerate()
        .map(|(o, batches)| {
            batches.sort_by(f64::total_cmp);
            let median = batches[batches.len() / 2];
            println!(
                "{label:<28} object {o}: {median:>7.1} ns/packet (batches {})",
                batches
                    .iter()
                    .map(|b| format!("{b:.1}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            median
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_is_parsed() {
        let out = "Running 5s test @ http://192.0.2.80:80/\n  1 threads and 32 connections\n\
                   \x20 Thread Stats   Avg      Stdev     Max   +/- Stdev\n\
                   \x20   Latency     1.23ms  456.00us  12.00ms   80.00%\n\
                   \x20 61234 requests in 5.00s, 7.12MB read\n\
                   \x20 Socket errors: connect 0, read 12, write 1, timeout 2\n\
                   \x20 Non-2xx or 3xx responses: 3\n\
                   Requests/sec:  12246.80\nTransfer/sec:      1.42MB\n";
        assert_eq!(
            parse_wrk(out).unwrap(),
            Wrk {
                rps: 12246.80,
                errors: 18
            }
        );
        assert_eq!(
            parse_wrk("Requests/sec: 10.5\n").unwrap(),
            Wrk {
                rps: 10.5,
                errors: 0
            }
        );
        assert!(parse_wrk("wrk: connection refused").is_err());
    }

    #[test]
    fn crafted_ack_has_valid_checksums() {
        let f = ack_frame(CLIENT, CLIENT_PORT, A, 80);
        assert_eq!(f.len(), 54);
        assert_eq!(ones_sum(&f[14..34], 0), 0xffff);
        let mut pseudo = f[26..34].to_vec();
        pseudo.extend_from_slice(&[0, PROTO_TCP, 0, 20]);
        assert_eq!(ones_sum(&f[34..], u32::from(ones_sum(&pseudo, 0))), 0xffff);
    }

    #[test]
    fn ratios_guard_against_zero() {
        assert!((ratio(95.0, 100.0) - 0.95).abs() < 1e-9);
        assert!(ratio(1.0, 0.0).abs() < f64::EPSILON);
    }
}
