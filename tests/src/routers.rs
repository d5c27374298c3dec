//! Real BGP routers in a test's network namespace: BIRD 2, FRR 8 (`bgpd` alone) and `GoBGP` 3,
//! and the agent's side of the BGP tests: its config, its start, its view of the peer, and the
//! scenarios the FRR and `GoBGP` tests share ([`establishes`], [`learns_and_withdraws`]).
//!
//! Each daemon runs in the foreground under `ip netns exec`, so the child is the daemon itself
//! and is stopped by PID on drop. Every file it uses lives in the test's temp dir.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::{Agent, Netns, Service, Topology, require_privileged};

/// The agent's API inside its namespace.
pub const API: &str = "127.0.0.1:8080";

/// What the router side of a session needs to know.
#[derive(Debug, Clone)]
pub struct Neighbor {
    /// The router's own address on the link.
    pub local: String,
    pub local_as: u32,
    /// The agent's address.
    pub agent: String,
    pub agent_as: u32,
    /// TCP MD5 password.
    pub password: Option<String>,
    /// Hold time the router offers, seconds.
    pub hold_time: Option<u16>,
    /// `Some(port)`: the router connects to the agent's listener on that port (BIRD only);
    /// `None`: it waits passively for the agent.
    pub connect_to: Option<u16>,
    /// How long BIRD waits before its first connect (`connect delay time`, BIRD's default 5 s
    /// when `None`).
    pub connect_delay: Option<u16>,
}

impl Neighbor {
    /// The client namespace (AS 65000) toward the agent (AS 65001), as [`agent_config`] has
    /// it: no password, the router's default hold time.
    pub fn toward_agent(topo: &Topology) -> Self {
        Self {
            local: topo.client_ip.clone(),
            local_as: 65000,
            agent: topo.agent_ip.clone(),
            agent_as: 65001,
            password: None,
            hold_time: None,
            connect_to: None,
            connect_delay: None,
        }
    }
}

/// A router daemon in the foreground under `ip netns exec`, killed on drop.
#[derive(Debug)]
struct Daemon {
    /// The daemon's name in messages (`bird`, `bgpd`, `gobgpd`).
    name: &'static str,
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    fn new(name: &'static str, log: PathBuf) -> Self {
        Self {
            name,
            child: None,
            log,
        }
    }

    /// Spawns `command` and waits until `ready` holds while the daemon keeps running; fails
    /// with its log otherwise.
    fn start(&mut self, command: &mut Command, mut ready: impl FnMut() -> bool) -> Result<()> {
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", self.name))?;
        let child = self.child.insert(child);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if ready() {
                return Ok(());
            }
            if let Some(status) = child.try_wait()? {
                bail!(
                    "{} exited ({status}) while starting:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        bail!("{} did not come up:\n{}", self.name, self.log_text())
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `ip netns exec NS PROGRAM`, as a builder.
fn in_ns(ns: &str, program: &str) -> Command {
    let mut command = Command::new("ip");
    command.args(["netns", "exec", ns, program]);
    command
}

/// Runs a router's client; its standard output if it succeeded, else an error naming it as
/// `what` with what it printed.
fn client_output(command: &mut Command, program: &str, what: &str) -> Result<String> {
    let out = command
        .output()
        .with_context(|| format!("running {program}"))?;
    ensure!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The address family of `prefix` as the routers' clients spell it.
fn family(prefix: &str) -> &'static str {
    if prefix.contains(':') { "ipv6" } else { "ipv4" }
}

/// A BIRD 2 daemon, killed on drop.
#[derive(Debug)]
pub struct Bird {
    daemon: Daemon,
    ctl: PathBuf,
    conf: PathBuf,
    ns: String,
}

impl Bird {
    /// Starts BIRD in `ns`: a passive session toward the agent that imports everything, both
    /// families on one session, and a kernel protocol so announced VIPs become routes there.
    /// After a session error BIRD accepts the agent again within 1-5 s (`error wait time`;
    /// its default of 60 s would outlast any test).
    pub fn start(ns: &Netns, dir: &Path, neighbor: &Neighbor) -> Result<Self> {
        Self::start_conf(ns, dir, neighbor, false)
    }

    /// [`Bird::start`] with BFD on the session (`protocol bfd` at 300 ms × 3, `bfd on` on
    /// the neighbor); the BFD protocol is named `bfd1`.
    pub fn start_with_bfd(ns: &Netns, dir: &Path, neighbor: &Neighbor) -> Result<Self> {
        Self::start_conf(ns, dir, neighbor, true)
    }

    fn start_conf(ns: &Netns, dir: &Path, neighbor: &Neighbor, bfd: bool) -> Result<Self> {
        let conf = dir.join("bird.conf");
        let ctl = dir.join("bird.ctl");
        let log = dir.join("bird.log");
        let password = neighbor
            .password
            .as_ref()
            .map(|p| format!("password \"{p}\";"))
            .unwrap_or_default();
        let hold = neighbor
            .hold_time
            .map(|h| format!("hold time {h};"))
            .unwrap_or_default();
        let (port, passive) = match neighbor.connect_to {
            Some(p) => (format!(" port {p}"), "connect retry time 1;"),
            None => (String::new(), "passive on;"),
        };
        let passive = match neighbor.connect_delay {
            Some(delay) => format!("{passive} connect delay time {delay};"),
            None => passive.to_owned(),
        };
        let (bfd_protocol, bfd_on) = if bfd {
            (
                "protocol bfd bfd1 { interface \"*\" { min rx interval 300 ms; min tx interval 300 ms; multiplier 3; }; }\n",
                "bfd on;",
            )
        } else {
            ("", "")
        };
        // A router id is 32 bits: an IPv6-only neighbour gets a fixed one.
        let router_id = if neighbor.local.contains(':') {
            "198.18.255.254"
        } else {
            neighbor.local.as_str()
        };
        let text = format!(
            "router id {router_id};\nlog \"{log}\" all;\nprotocol device {{}}\n\
             protocol kernel {{ ipv4 {{ export all; }}; }}\n\
             protocol kernel {{ ipv6 {{ export all; }}; }}\n{bfd_protocol}\
             protocol bgp agent {{\n  local {local} as {las};\n  neighbor {agent}{port} as {aas};\n  {passive}\n  error wait time 1, 5;\n  {password}\n  {hold}\n  {bfd_on}\n\
             ipv4 {{ import all; export none; }};\n  ipv6 {{ import all; export none; }};\n}}\n",
            local = neighbor.local,
            las = neighbor.local_as,
            agent = neighbor.agent,
            aas = neighbor.agent_as,
            log = log.display(),
        );
        std::fs::write(&conf, text)?;
        let mut bird = Self {
            daemon: Daemon::new("bird", log),
            ctl,
            conf,
            ns: ns.name.clone(),
        };
        bird.spawn(ns)?;
        Ok(bird)
    }

    fn spawn(&mut self, ns: &Netns) -> Result<()> {
        let mut command = ns.command("bird");
        command
            .arg("-f")
            .arg("-c")
            .arg(&self.conf)
            .arg("-s")
            .arg(&self.ctl)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let (ns, ctl) = (&self.ns, &self.ctl);
        self.daemon.start(&mut command, || {
            birdc(ns, ctl, &["show", "status"]).is_ok_and(|s| s.contains("Daemon is up"))
        })
    }

    /// Runs `birdc` against this daemon.
    pub fn birdc(&self, args: &[&str]) -> Result<String> {
        birdc(&self.ns, &self.ctl, args)
    }

    /// The session's state word as `show protocols` prints it (`Established`, `Active`, ...).
    pub fn session_state(&self) -> Result<String> {
        let out = self.birdc(&["show", "protocols", "agent"])?;
        let line = out
            .lines()
            .find(|l| l.starts_with("agent"))
            .context("no agent protocol")?;
        Ok(line.split_whitespace().nth(5).unwrap_or("").to_owned())
    }

    pub fn established(&self) -> Result<bool> {
        Ok(self.session_state()? == "Established")
    }

    /// When the session last changed state (`show protocols`' "Since" column, milliseconds): a
    /// session reset changes it.
    pub fn since(&self) -> Result<Since> {
        let out = self.birdc(&["show", "protocols", "agent"])?;
        let line = out
            .lines()
            .find(|l| l.starts_with("agent"))
            .context("no agent protocol")?;
        line.split_whitespace()
            .nth(4)
            .map(|s| Since(s.to_owned()))
            .with_context(|| format!("no since column: {line}"))
    }

    /// The state of BIRD's BFD session toward `peer` (`Up`, `Down`, ...), `None` without one.
    pub fn bfd_state(&self, peer: &str) -> Result<Option<String>> {
        let out = self.birdc(&["show", "bfd", "sessions"])?;
        Ok(out
            .lines()
            .find(|l| l.split_whitespace().next() == Some(peer))
            .and_then(|l| l.split_whitespace().nth(2))
            .map(str::to_owned))
    }

    /// `show route PREFIX all`; empty when the route is not there.
    pub fn route(&self, prefix: &str) -> Result<String> {
        let out = self.birdc(&["show", "route", prefix, "all"])?;
        Ok(if out.contains(prefix) {
            out
        } else {
            String::new()
        })
    }

    /// The PID, e.g. to stop the daemon with SIGSTOP (a peer that goes silent).
    pub fn pid(&self) -> Option<u32> {
        self.daemon.pid()
    }

    /// Stops and starts the daemon again (a peer restart).
    pub fn restart(&mut self, ns: &Netns) -> Result<()> {
        self.stop();
        self.spawn(ns)
    }

    pub fn stop(&mut self) {
        self.daemon.stop();
    }

    pub fn log_text(&self) -> String {
        self.daemon.log_text()
    }
}

/// `birdc` without a status check: it prints its errors on standard output.
fn birdc(ns: &str, ctl: &Path, args: &[&str]) -> Result<String> {
    let out = in_ns(ns, "birdc")
        .arg("-s")
        .arg(ctl)
        .args(args)
        .output()
        .context("running birdc")?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Polls `check` every 20 ms for up to `limit`.
pub fn wait_until(
    what: &str,
    limit: Duration,
    mut check: impl FnMut() -> Result<bool>,
) -> Result<Duration> {
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < limit {
        match check() {
            Ok(true) => return Ok(start.elapsed()),
            Ok(false) => {}
            Err(e) => last = format!("{e:#}"),
        }
        thread::sleep(Duration::from_millis(20));
    }
    bail!("timed out after {limit:?} waiting for {what} {last}")
}

/// A router the FRR and `GoBGP` tests run the same scenarios against.
pub trait Router: Sized {
    /// How messages name the router (`FRR`, `GoBGP`).
    const NAME: &'static str;
    /// Its daemon, as its log is headed in [`Router::context`].
    const DAEMON: &'static str;

    /// Starts the router in `ns`: a passive session toward `neighbor`, IPv4 and IPv6 unicast.
    fn start(ns: &Netns, dir: &Path, neighbor: &Neighbor) -> Result<Self>;

    /// The session's state (`Established`, `Active`, ...).
    fn session_state(&self) -> Result<String>;

    /// Whether the router holds a route for `prefix`.
    fn has_route(&self, prefix: &str) -> Result<bool>;

    fn log_text(&self) -> String;

    fn established(&self) -> Result<bool> {
        Ok(self.session_state()? == "Established")
    }

    /// The router's and the agent's logs, for a failed wait.
    fn context(&self, agent: &Agent) -> String {
        format!(
            "---- {} log ----\n{}\n{}",
            Self::DAEMON,
            self.log_text(),
            agent.log_text()
        )
    }
}

/// An FRR 8 `bgpd` without zebra, killed on drop.
#[derive(Debug)]
pub struct Frr {
    daemon: Daemon,
    conf: PathBuf,
    pidfile: PathBuf,
    vty: PathBuf,
    ns: String,
    agent: String,
    /// With BFD: `zebra` and `bfdd` (bgpd reaches bfdd through zebra), in a directory of
    /// their own owned by `frr`, as they run as that user. Declared after `daemon`, so bgpd
    /// stops first.
    bfd: Option<FrrBfd>,
}

/// FRR's BFD side: `zebra` and `bfdd` in the foreground, killed on drop.
#[derive(Debug)]
struct FrrBfd {
    dir: PathBuf,
    zebra: Daemon,
    bfdd: Daemon,
}

impl FrrBfd {
    fn start(ns: &Netns, dir: &Path) -> Result<Self> {
        let dir = dir.join("frr-bfd");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("zebra.conf"), "hostname gct-zebra\n")?;
        std::fs::write(dir.join("bfdd.conf"), "bfd\n!\n")?;
        crate::sh("chown", &["-R", "frr:frr", dir.to_str().context("dir")?])?;
        let mut bfd = Self {
            zebra: Daemon::new("zebra", dir.join("zebra.log")),
            bfdd: Daemon::new("bfdd", dir.join("bfdd.log")),
            dir,
        };
        let common = |daemon: &str| {
            let mut c = ns.command(&format!("/usr/lib/frr/{daemon}"));
            c.args(["-u", "frr", "-g", "frr", "-P", "0", "-z"])
                .arg(bfd.dir.join("zserv.api"))
                .arg("--vty_socket")
                .arg(&bfd.dir)
                .arg("-i")
                .arg(bfd.dir.join(format!("{daemon}.pid")))
                .arg("-f")
                .arg(bfd.dir.join(format!("{daemon}.conf")))
                .arg("--log")
                .arg(format!(
                    "file:{}",
                    bfd.dir.join(format!("{daemon}.log")).display()
                ))
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            c
        };
        let mut zebra = common("zebra");
        let mut bfdd = common("bfdd");
        bfdd.arg("--bfdctl").arg(bfd.dir.join("bfdd.sock"));
        let zserv = bfd.dir.join("zserv.api");
        bfd.zebra.start(&mut zebra, || zserv.exists())?;
        let (ns_name, vty) = (ns.name.clone(), bfd.dir.clone());
        bfd.bfdd.start(&mut bfdd, || {
            vtysh_to(&ns_name, &vty, "bfdd", "show bfd peers").is_ok()
        })?;
        Ok(bfd)
    }
}

impl Router for Frr {
    const NAME: &'static str = "FRR";
    const DAEMON: &'static str = "bgpd";

    /// Starts `bgpd` in `ns`: a passive session toward the agent with IPv4 and IPv6 unicast
    /// activated on it and no import policy required.
    fn start(ns: &Netns, dir: &Path, neighbor: &Neighbor) -> Result<Self> {
        Self::start_conf(ns, dir, neighbor, false)
    }

    /// The session's `bgpState`.
    fn session_state(&self) -> Result<String> {
        let out = self.json(&format!("show bgp neighbors {} json", self.agent))?;
        out[&self.agent]["bgpState"]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("no bgpState in {out}"))
    }

    fn has_route(&self, prefix: &str) -> Result<bool> {
        Ok(self.route(prefix)?.is_some())
    }

    fn log_text(&self) -> String {
        self.daemon.log_text()
    }
}

impl Frr {
    /// [`Router::start`] with BFD: `zebra` and `bfdd` run too, and the neighbor has `bfd`
    /// (FRR's defaults: 300 ms × 3).
    pub fn start_with_bfd(ns: &Netns, dir: &Path, neighbor: &Neighbor) -> Result<Self> {
        Self::start_conf(ns, dir, neighbor, true)
    }

    fn start_conf(ns: &Netns, dir: &Path, neighbor: &Neighbor, bfd: bool) -> Result<Self> {
        let conf = dir.join("bgpd.conf");
        let vty = dir.join("frr-vty");
        std::fs::create_dir_all(&vty)?;
        let agent = &neighbor.agent;
        let password = neighbor
            .password
            .as_ref()
            .map(|p| format!(" neighbor {agent} password {p}\n"))
            .unwrap_or_default();
        let hold = neighbor
            .hold_time
            .map(|h| format!(" neighbor {agent} timers {} {h}\n", (h / 3).max(1)))
            .unwrap_or_default();
        let bfd_line = if bfd {
            format!(" neighbor {agent} bfd\n")
        } else {
            String::new()
        };
        let text = format!(
            "frr defaults traditional\nhostname gct-frr\n!\n\
             router bgp {las}\n bgp router-id {local}\n no bgp ebgp-requires-policy\n\
             neighbor {agent} remote-as {aas}\n neighbor {agent} passive\n{password}{hold}{bfd_line}\
             !\n address-family ipv4 unicast\n  neighbor {agent} activate\n exit-address-family\n\
             !\n address-family ipv6 unicast\n  neighbor {agent} activate\n exit-address-family\n\
             exit\n!\n",
            las = neighbor.local_as,
            local = neighbor.local,
            aas = neighbor.agent_as,
        );
        std::fs::write(&conf, text)?;
        let mut frr = Self {
            daemon: Daemon::new(Self::DAEMON, dir.join("bgpd.log")),
            conf,
            pidfile: dir.join("bgpd.pid"),
            vty,
            ns: ns.name.clone(),
            agent: agent.clone(),
            bfd: bfd.then(|| FrrBfd::start(ns, dir)).transpose()?,
        };
        frr.spawn(ns)?;
        Ok(frr)
    }

    /// The status of bfdd's session toward `peer` (`up`, `down`, ...), `None` without one.
    pub fn bfd_status(&self, peer: &str) -> Result<Option<String>> {
        let Some(bfd) = &self.bfd else {
            return Ok(None);
        };
        let out = vtysh_to(&self.ns, &bfd.dir, "bfdd", "show bfd peers json")?;
        let peers: Value =
            serde_json::from_str(&out).with_context(|| format!("not JSON: {out}"))?;
        Ok(peers
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["peer"] == peer)
            .and_then(|p| p["status"].as_str())
            .map(str::to_owned))
    }

    fn spawn(&mut self, ns: &Netns) -> Result<()> {
        let mut command = ns.command("/usr/lib/frr/bgpd");
        match &self.bfd {
            Some(bfd) => command.arg("-z").arg(bfd.dir.join("zserv.api")),
            None => command.arg("-Z"),
        };
        command
            .args(["-S", "-P", "0", "-f"])
            .arg(&self.conf)
            .arg("-i")
            .arg(&self.pidfile)
            .arg("--vty_socket")
            .arg(&self.vty)
            .arg("--log")
            .arg(format!("file:{}", self.daemon.log.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let (ns, vty) = (&self.ns, &self.vty);
        self.daemon.start(&mut command, || {
            vtysh(ns, vty, "show bgp summary json").is_ok()
        })
    }

    /// Runs one `vtysh` command against this `bgpd`.
    pub fn vtysh(&self, command: &str) -> Result<String> {
        vtysh(&self.ns, &self.vty, command)
    }

    fn json(&self, command: &str) -> Result<Value> {
        let out = self.vtysh(command)?;
        serde_json::from_str(&out).with_context(|| format!("{command}: not JSON: {out}"))
    }

    /// `show bgp ipv4|ipv6 unicast PREFIX json`; `None` when the route is not there. The paths
    /// carry `community.string`, `largeCommunity.string` and `nexthops[].ip`.
    pub fn route(&self, prefix: &str) -> Result<Option<Value>> {
        let out = self.json(&format!(
            "show bgp {} unicast {prefix} json",
            family(prefix)
        ))?;
        Ok(out["paths"]
            .as_array()
            .is_some_and(|p| !p.is_empty())
            .then_some(out))
    }

    /// The PID, e.g. to stop the daemon with SIGSTOP.
    pub fn pid(&self) -> Option<u32> {
        self.daemon.pid()
    }

    /// Stops and starts the daemon again (a peer restart).
    pub fn restart(&mut self, ns: &Netns) -> Result<()> {
        self.stop();
        self.spawn(ns)
    }

    pub fn stop(&mut self) {
        self.daemon.stop();
    }
}

fn vtysh(ns: &str, vty: &Path, command: &str) -> Result<String> {
    vtysh_to(ns, vty, "bgpd", command)
}

/// One `vtysh` command to `daemon` through the vty sockets in `vty`.
fn vtysh_to(ns: &str, vty: &Path, daemon: &str, command: &str) -> Result<String> {
    client_output(
        in_ns(ns, "vtysh")
            .arg("--vty_socket")
            .arg(vty)
            .args(["-d", daemon, "-c", command]),
        "vtysh",
        &format!("vtysh -c '{command}'"),
    )
}

/// API ports for `gobgpd` instances of this process (each also lives in its own namespace).
static GOBGP_PORT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(50051);

/// A `GoBGP` 3 daemon (`gobgpd`), killed on drop.
#[derive(Debug)]
pub struct Gobgp {
    daemon: Daemon,
    conf: PathBuf,
    ns: String,
    agent: String,
    port: u16,
}

impl Router for Gobgp {
    const NAME: &'static str = "GoBGP";
    const DAEMON: &'static str = "gobgpd";

    /// Starts `gobgpd` in `ns`: a passive neighbour (the agent) with IPv4 and IPv6 unicast.
    fn start(ns: &Netns, dir: &Path, neighbor: &Neighbor) -> Result<Self> {
        let conf = dir.join("gobgpd.toml");
        let port = GOBGP_PORT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let password = neighbor
            .password
            .as_ref()
            .map(|p| format!("    auth-password = \"{p}\"\n"))
            .unwrap_or_default();
        let hold = neighbor
            .hold_time
            .map(|h| {
                format!(
                    "  [neighbors.timers.config]\n    hold-time = {h}\n    keepalive-interval = {}\n",
                    (h / 3).max(1)
                )
            })
            .unwrap_or_default();
        let text = format!(
            "[global.config]\n  as = {las}\n  router-id = \"{local}\"\n\n\
             [[neighbors]]\n  [neighbors.config]\n    neighbor-address = \"{agent}\"\n    peer-as = {aas}\n{password}\
             {hold}  [neighbors.transport.config]\n    passive-mode = true\n\
             \x20 [[neighbors.afi-safis]]\n    [neighbors.afi-safis.config]\n      afi-safi-name = \"ipv4-unicast\"\n\
             \x20 [[neighbors.afi-safis]]\n    [neighbors.afi-safis.config]\n      afi-safi-name = \"ipv6-unicast\"\n",
            las = neighbor.local_as,
            local = neighbor.local,
            agent = neighbor.agent,
            aas = neighbor.agent_as,
        );
        std::fs::write(&conf, text)?;
        let mut gobgp = Self {
            daemon: Daemon::new(Self::DAEMON, dir.join("gobgpd.log")),
            conf,
            ns: ns.name.clone(),
            agent: neighbor.agent.clone(),
            port,
        };
        gobgp.spawn(ns)?;
        Ok(gobgp)
    }

    /// The neighbour's session state from `gobgp neighbor ADDR -j` (the JSON carries the API's
    /// enum number, named here as `gobgp neighbor` prints it).
    fn session_state(&self) -> Result<String> {
        let out = self.gobgp(&["neighbor", &self.agent, "-j"])?;
        let json: Value = serde_json::from_str(&out).with_context(|| format!("not JSON: {out}"))?;
        let state = &json["state"]["session_state"];
        Ok(match state.as_u64() {
            Some(1) => "Idle".to_owned(),
            Some(2) => "Connect".to_owned(),
            Some(3) => "Active".to_owned(),
            Some(4) => "OpenSent".to_owned(),
            Some(5) => "OpenConfirm".to_owned(),
            Some(6) => "Established".to_owned(),
            _ => state
                .as_str()
                .map_or_else(|| state.to_string(), str::to_owned),
        })
    }

    fn has_route(&self, prefix: &str) -> Result<bool> {
        Ok(self.route(prefix)?.is_some())
    }

    fn log_text(&self) -> String {
        self.daemon.log_text()
    }
}

impl Gobgp {
    fn spawn(&mut self, ns: &Netns) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.daemon.log)?;
        let mut command = ns.command("gobgpd");
        command
            .arg("-f")
            .arg(&self.conf)
            .arg(format!("--api-hosts=127.0.0.1:{}", self.port))
            .args(["--pprof-disable", "-p"])
            .stdout(log.try_clone()?)
            .stderr(log);
        let (ns, port, agent) = (&self.ns, self.port, &self.agent);
        // Ready once the API answers and the configured neighbour exists.
        self.daemon.start(&mut command, || {
            gobgp(ns, port, &["neighbor", agent, "-j"]).is_ok()
        })
    }

    /// Runs the `gobgp` client against this daemon.
    pub fn gobgp(&self, args: &[&str]) -> Result<String> {
        gobgp(&self.ns, self.port, args)
    }

    /// `gobgp global rib -a ipv4|ipv6 PREFIX -j`; `None` when the route is not there. Each
    /// path carries `attrs`: type 3 `nexthop`, 8 `communities` (as numbers), 14 (`MP_REACH`)
    /// `nexthop`, 32 `value` (large communities).
    pub fn route(&self, prefix: &str) -> Result<Option<Value>> {
        let out = self.gobgp(&["global", "rib", "-a", family(prefix), prefix, "-j"])?;
        if out.trim().is_empty() {
            return Ok(None);
        }
        let json: Value = serde_json::from_str(&out).with_context(|| format!("not JSON: {out}"))?;
        Ok(json
            .as_object()
            .is_some_and(|o| {
                o.values()
                    .any(|p| p.as_array().is_some_and(|p| !p.is_empty()))
            })
            .then_some(json))
    }

    /// The PID, e.g. to stop the daemon with SIGSTOP.
    pub fn pid(&self) -> Option<u32> {
        self.daemon.pid()
    }

    /// Stops and starts the daemon again (a peer restart).
    pub fn restart(&mut self, ns: &Netns) -> Result<()> {
        self.stop();
        self.spawn(ns)
    }

    pub fn stop(&mut self) {
        self.daemon.stop();
    }
}

fn gobgp(ns: &str, port: u16, args: &[&str]) -> Result<String> {
    client_output(
        in_ns(ns, "gobgp")
            .args(["-u", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .args(args),
        "gobgp",
        &format!("gobgp {}", args.join(" ")),
    )
}

/// Section-wide communities for the agent's `bgp:` section: `65001:100` and large `65001:1:2`.
pub const COMMUNITIES: &str = "  communities: ['65001:100', '65001:1:2']\n";

/// Writes `config.yaml` in `dir` and returns its path: the agent's API on [`API`], monitors
/// every 100 ms, a 1 s cleanup timer, and a session (AS 65001) with the client namespace
/// (AS 65000) as [`Neighbor::toward_agent`] sets it up there. `bgp_extra` goes at the end of
/// the `bgp:` section, `apps` after it.
pub fn agent_config(dir: &Path, topo: &Topology, bgp_extra: &str, apps: &str) -> Result<String> {
    let path = dir.join("config.yaml");
    std::fs::write(
        &path,
        format!(
            "agent:\n  listen_addr: {API}\n  monitor_interval: 100ms\n  cleanup_timer: 1s\n  state_file: {state}\n\
             bgp:\n  local_as: 65001\n  remote_as: 65000\n  peer_ip: {peer}\n{bgp_extra}{apps}",
            state = dir.join("state.json").display(),
            peer = topo.client_ip,
        ),
    )?;
    Ok(path.to_string_lossy().into_owned())
}

/// An `apps:` section: `web` on `v4` and `web6` on `v6`, both behind a TCP port monitor on 8090.
pub fn web_apps(v4: &str, v6: &str) -> String {
    two_apps(v4, "", v6)
}

/// [`web_apps`] where `web` carries communities of its own: `65001:7` and large `65001:7:7`.
pub fn web_apps_with_communities(v4: &str, v6: &str) -> String {
    two_apps(
        v4,
        "    vip_config: {bgp_communities: ['65001:7', '65001:7:7']}\n",
        v6,
    )
}

fn two_apps(v4: &str, web_extra: &str, v6: &str) -> String {
    format!(
        "apps:\n  - name: web\n    vip: {v4}\n{web_extra}    monitor: port:tcp:8090\n\
         \x20 - name: web6\n    vip: {v6}\n    monitor: port:tcp:8090\n"
    )
}

/// Starts the agent in the agent namespace with `run --config CONFIG`, logging to `dir/LOG`.
pub fn start_agent(topo: &Topology, dir: &Path, config: &str, log: &str) -> Result<Agent> {
    Agent::start(
        &topo.agent,
        &["run", "--config", config],
        &dir.join(log),
        API,
    )
}

/// The agent's one peer as `/info` shows it.
pub fn agent_peer(topo: &Topology) -> Result<Value> {
    let (status, info) = topo.agent.http_get(&format!("http://{API}/info"))?;
    ensure!(status == 200, "/info: {status} {info}");
    Ok(info["peers"][0].clone())
}

/// The agent of the FRR and `GoBGP` scenarios: section-wide [`COMMUNITIES`] and
/// [`web_apps_with_communities`] on `vips` (IPv4, IPv6).
fn dual_stack_agent(topo: &Topology, dir: &Path, [v4, v6]: [&str; 2]) -> Result<Agent> {
    let config = agent_config(dir, topo, COMMUNITIES, &web_apps_with_communities(v4, v6))?;
    start_agent(topo, dir, &config, "agent.log")
}

/// `R` and the agent (apps on `vips`, no service behind them) establish a session: waits until
/// `R` says Established, lets `check` look at what `R` negotiated, then the agent's `/info`
/// must say Established too. Skips without root.
pub fn establishes<R: Router>(
    vips: [&str; 2],
    check: impl FnOnce(&R, &Topology) -> Result<()>,
) -> Result<()> {
    require_privileged!();
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    let router = R::start(&topo.client, dir.path(), &Neighbor::toward_agent(&topo))?;
    let agent = dual_stack_agent(&topo, dir.path(), vips)?;

    wait_until(
        &format!("Established at {}", R::NAME),
        Duration::from_secs(5),
        || router.established(),
    )
    .with_context(|| router.context(&agent))?;
    check(&router, &topo)?;

    let peer = agent_peer(&topo)?;
    ensure!(peer["state"] == "Established", "{peer}");
    Ok(())
}

/// Healthy apps on `vips` (IPv4, IPv6) reach `R` and leave it when their service stops: waits
/// until `R` holds both routes, lets `check` look at them, stops the service, waits until both
/// are withdrawn, and the session must still be up. Skips without root.
pub fn learns_and_withdraws<R: Router>(
    vips: [&str; 2],
    check: impl FnOnce(&R, &Topology) -> Result<()>,
) -> Result<()> {
    require_privileged!();
    let [v4, v6] = vips;
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    let router = R::start(&topo.client, dir.path(), &Neighbor::toward_agent(&topo))?;
    let mut service = Service::http(&topo.agent, 8090, dir.path())?;
    let agent = dual_stack_agent(&topo, dir.path(), vips)?;

    wait_until(
        &format!("both routes at {}", R::NAME),
        Duration::from_secs(5),
        || Ok(router.has_route(v4)? && router.has_route(v6)?),
    )
    .with_context(|| router.context(&agent))?;
    check(&router, &topo)?;

    service.stop();
    wait_until(
        &format!("both routes withdrawn at {}", R::NAME),
        Duration::from_secs(5),
        || Ok(!router.has_route(v4)? && !router.has_route(v6)?),
    )
    .with_context(|| router.context(&agent))?;
    ensure!(
        router.established()?,
        "the session stays up after a withdrawal"
    );
    Ok(())
}

/// BIRD's "Since" of a protocol, as printed (`HH:MM:SS.mmm`).
///
/// BIRD keeps the time on its monotonic clock and converts it to wall-clock time when it prints
/// it, so two reads of an unchanged session may differ by a millisecond: compare with
/// [`Since::same_session`], not `==`.
#[derive(Debug, Clone)]
pub struct Since(String);

impl Since {
    /// Within 50 ms of `other`: the same session (a reset, its new connection and OPEN exchange
    /// take longer than the printing's rounding, and the tests reset no session that fast).
    pub fn same_session(&self, other: &Self) -> bool {
        const DAY_MS: u64 = 86_400_000;
        match (self.ms_of_day(), other.ms_of_day()) {
            (Some(a), Some(b)) => {
                let d = a.abs_diff(b);
                d.min(DAY_MS - d) <= 50
            }
            _ => self.0 == other.0,
        }
    }

    fn ms_of_day(&self) -> Option<u64> {
        let (hms, frac) = self.0.split_once('.').unwrap_or((&self.0, "0"));
        let mut parts = hms.split(':').map(|p| p.parse::<u64>().ok());
        let (h, m, s) = (parts.next()??, parts.next()??, parts.next()??);
        let ms = format!("{frac:0<3}").get(..3)?.parse::<u64>().ok()?;
        Some(((h * 60 + m) * 60 + s) * 1000 + ms)
    }
}

impl std::fmt::Display for Since {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::Since;

    fn since(s: &str) -> Since {
        Since(s.to_owned())
    }

    #[test]
    fn a_millisecond_of_printing_is_the_same_session_and_a_reset_is_not() {
        assert!(since("10:53:27.921").same_session(&since("10:53:27.922")));
        assert!(since("23:59:59.990").same_session(&since("00:00:00.010")));
        assert!(!since("10:53:27.921").same_session(&since("10:53:28.066")));
        assert!(!since("10:53:27").same_session(&since("10:53:28")));
        assert!(since("2026-12-03").same_session(&since("2026-12-03")));
        assert!(!since("2026-12-03").same_session(&since("2026-12-04")));
    }
}
