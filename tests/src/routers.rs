//! Real BGP routers in a test's network namespace: BIRD 2, FRR 8 (`bgpd` alone) and `GoBGP` 3.
//!
//! Each daemon runs in the foreground under `ip netns exec`, so the child is the daemon itself
//! and is stopped by PID on drop. Every file it uses lives in the test's temp dir.

use std::{
    path::{Path, PathBuf},
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::Netns;

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
}

/// A BIRD 2 daemon, killed on drop.
#[derive(Debug)]
pub struct Bird {
    child: Option<Child>,
    ctl: PathBuf,
    conf: PathBuf,
    log: PathBuf,
    ns: String,
}

impl Bird {
    /// Starts BIRD in `ns`: a passive session toward the agent that imports everything, both
    /// families on one session, and a kernel protocol so announced VIPs become routes there.
    /// After a session error BIRD accepts the agent again within 1-5 s (`error wait time`;
    /// its default of 60 s would outlast any test).
    pub fn start(ns: &Netns, dir: &Path, neighbor: &Neighbor) -> Result<Self> {
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
        let text = format!(
            "router id {local};\nlog \"{log}\" all;\nprotocol device {{}}\n\
             protocol kernel {{ ipv4 {{ export all; }}; }}\n\
             protocol kernel {{ ipv6 {{ export all; }}; }}\n\
             protocol bgp agent {{\n  local {local} as {las};\n  neighbor {agent} as {aas};\n  passive on;\n  error wait time 1, 5;\n  {password}\n  {hold}\n\
             ipv4 {{ import all; export none; }};\n  ipv6 {{ import all; export none; }};\n}}\n",
            local = neighbor.local,
            las = neighbor.local_as,
            agent = neighbor.agent,
            aas = neighbor.agent_as,
            log = log.display(),
        );
        std::fs::write(&conf, text)?;
        let mut bird = Self {
            child: None,
            ctl,
            conf,
            log,
            ns: ns.name.clone(),
        };
        bird.spawn(ns)?;
        Ok(bird)
    }

    fn spawn(&mut self, ns: &Netns) -> Result<()> {
        let child = ns
            .command("bird")
            .arg("-f")
            .arg("-c")
            .arg(&self.conf)
            .arg("-s")
            .arg(&self.ctl)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting bird")?;
        self.child = Some(child);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if self
                .birdc(&["show", "status"])
                .is_ok_and(|s| s.contains("Daemon is up"))
            {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "bird did not come up: {}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        )
    }

    /// Runs `birdc` against this daemon.
    pub fn birdc(&self, args: &[&str]) -> Result<String> {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &self.ns, "birdc", "-s"])
            .arg(&self.ctl)
            .args(args)
            .output()
            .context("running birdc")?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
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
        self.child.as_ref().map(Child::id)
    }

    /// Stops and starts the daemon again (a peer restart).
    pub fn restart(&mut self, ns: &Netns) -> Result<()> {
        self.stop();
        self.spawn(ns)
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        self.stop();
    }
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

/// Waits until `ready` holds while `child` keeps running; fails with `log` otherwise.
fn wait_ready(
    what: &str,
    child: &mut Child,
    log: &Path,
    mut ready: impl FnMut() -> bool,
) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if ready() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "{what} exited ({status}) while starting:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
    bail!(
        "{what} did not come up:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    )
}

/// An FRR 8 `bgpd` without zebra, killed on drop.
#[derive(Debug)]
pub struct Frr {
    child: Option<Child>,
    conf: PathBuf,
    pidfile: PathBuf,
    vty: PathBuf,
    log: PathBuf,
    ns: String,
    agent: String,
}

impl Frr {
    /// Starts `bgpd` in `ns`: a passive session toward the agent with IPv4 and IPv6 unicast
    /// activated on it and no import policy required.
    pub fn start(ns: &Netns, dir: &Path, neighbor: &Neighbor) -> Result<Self> {
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
        let text = format!(
            "frr defaults traditional\nhostname gct-frr\n!\n\
             router bgp {las}\n bgp router-id {local}\n no bgp ebgp-requires-policy\n\
             neighbor {agent} remote-as {aas}\n neighbor {agent} passive\n{password}{hold}\
             !\n address-family ipv4 unicast\n  neighbor {agent} activate\n exit-address-family\n\
             !\n address-family ipv6 unicast\n  neighbor {agent} activate\n exit-address-family\n\
             exit\n!\n",
            las = neighbor.local_as,
            local = neighbor.local,
            aas = neighbor.agent_as,
        );
        std::fs::write(&conf, text)?;
        let mut frr = Self {
            child: None,
            conf,
            pidfile: dir.join("bgpd.pid"),
            vty,
            log: dir.join("bgpd.log"),
            ns: ns.name.clone(),
            agent: agent.clone(),
        };
        frr.spawn(ns)?;
        Ok(frr)
    }

    fn spawn(&mut self, ns: &Netns) -> Result<()> {
        let child = ns
            .command("/usr/lib/frr/bgpd")
            .args(["-Z", "-S", "-P", "0", "-f"])
            .arg(&self.conf)
            .arg("-i")
            .arg(&self.pidfile)
            .arg("--vty_socket")
            .arg(&self.vty)
            .arg("--log")
            .arg(format!("file:{}", self.log.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting bgpd")?;
        let child = self.child.insert(child);
        let (ns, vty) = (self.ns.clone(), self.vty.clone());
        wait_ready("bgpd", child, &self.log, || {
            vtysh(&ns, &vty, "show bgp summary json").is_ok()
        })
    }

    /// Runs one `vtysh` command against this `bgpd`.
    pub fn vtysh(&self, command: &str) -> Result<String> {
        vtysh(&self.ns, &self.vty, command)
    }

    fn json(&self, command: &str) -> Result<serde_json::Value> {
        let out = self.vtysh(command)?;
        serde_json::from_str(&out).with_context(|| format!("{command}: not JSON: {out}"))
    }

    /// The session's `bgpState` (`Established`, `Active`, ...).
    pub fn session_state(&self) -> Result<String> {
        let out = self.json(&format!("show bgp neighbors {} json", self.agent))?;
        out[&self.agent]["bgpState"]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("no bgpState in {out}"))
    }

    pub fn established(&self) -> Result<bool> {
        Ok(self.session_state()? == "Established")
    }

    /// `show bgp ipv4|ipv6 unicast PREFIX json`; `None` when the route is not there. The paths
    /// carry `community.string`, `largeCommunity.string` and `nexthops[].ip`.
    pub fn route(&self, prefix: &str) -> Result<Option<serde_json::Value>> {
        let family = if prefix.contains(':') { "ipv6" } else { "ipv4" };
        let out = self.json(&format!("show bgp {family} unicast {prefix} json"))?;
        Ok(out["paths"]
            .as_array()
            .is_some_and(|p| !p.is_empty())
            .then_some(out))
    }

    /// The PID, e.g. to stop the daemon with SIGSTOP.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops and starts the daemon again (a peer restart).
    pub fn restart(&mut self, ns: &Netns) -> Result<()> {
        self.stop();
        self.spawn(ns)
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Frr {
    fn drop(&mut self) {
        self.stop();
    }
}

fn vtysh(ns: &str, vty: &Path, command: &str) -> Result<String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "vtysh", "--vty_socket"])
        .arg(vty)
        .args(["-d", "bgpd", "-c", command])
        .output()
        .context("running vtysh")?;
    if !out.status.success() {
        bail!(
            "vtysh -c '{command}' failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// API ports for `gobgpd` instances of this process (each also lives in its own namespace).
static GOBGP_PORT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(50051);

/// A `GoBGP` 3 daemon (`gobgpd`), killed on drop.
#[derive(Debug)]
pub struct Gobgp {
    child: Option<Child>,
    conf: PathBuf,
    log: PathBuf,
    ns: String,
    agent: String,
    port: u16,
}

impl Gobgp {
    /// Starts `gobgpd` in `ns`: a passive neighbour (the agent) with IPv4 and IPv6 unicast.
    pub fn start(ns: &Netns, dir: &Path, neighbor: &Neighbor) -> Result<Self> {
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
            child: None,
            conf,
            log: dir.join("gobgpd.log"),
            ns: ns.name.clone(),
            agent: neighbor.agent.clone(),
            port,
        };
        gobgp.spawn(ns)?;
        Ok(gobgp)
    }

    fn spawn(&mut self, ns: &Netns) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = ns
            .command("gobgpd")
            .arg("-f")
            .arg(&self.conf)
            .arg(format!("--api-hosts=127.0.0.1:{}", self.port))
            .args(["--pprof-disable", "-p"])
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting gobgpd")?;
        let child = self.child.insert(child);
        let (ns, port, agent) = (self.ns.clone(), self.port, self.agent.clone());
        // Ready once the API answers and the configured neighbour exists.
        wait_ready("gobgpd", child, &self.log, || {
            gobgp(&ns, port, &["neighbor", &agent, "-j"]).is_ok()
        })
    }

    /// Runs the `gobgp` client against this daemon.
    pub fn gobgp(&self, args: &[&str]) -> Result<String> {
        gobgp(&self.ns, self.port, args)
    }

    /// The neighbour's session state from `gobgp neighbor ADDR -j` (`Established`, `Active`,
    /// ...; the JSON carries the API's enum number, named here as `gobgp neighbor` prints it).
    pub fn session_state(&self) -> Result<String> {
        let out = self.gobgp(&["neighbor", &self.agent, "-j"])?;
        let json: serde_json::Value =
            serde_json::from_str(&out).with_context(|| format!("not JSON: {out}"))?;
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

    pub fn established(&self) -> Result<bool> {
        Ok(self.session_state()? == "Established")
    }

    /// `gobgp global rib -a ipv4|ipv6 PREFIX -j`; `None` when the route is not there. Each
    /// path carries `attrs`: type 3 `nexthop`, 8 `communities` (as numbers), 14 (`MP_REACH`)
    /// `nexthop`, 32 `value` (large communities).
    pub fn route(&self, prefix: &str) -> Result<Option<serde_json::Value>> {
        let family = if prefix.contains(':') { "ipv6" } else { "ipv4" };
        let out = self.gobgp(&["global", "rib", "-a", family, prefix, "-j"])?;
        if out.trim().is_empty() {
            return Ok(None);
        }
        let json: serde_json::Value =
            serde_json::from_str(&out).with_context(|| format!("not JSON: {out}"))?;
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
        self.child.as_ref().map(Child::id)
    }

    /// Stops and starts the daemon again (a peer restart).
    pub fn restart(&mut self, ns: &Netns) -> Result<()> {
        self.stop();
        self.spawn(ns)
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Gobgp {
    fn drop(&mut self) {
        self.stop();
    }
}

fn gobgp(ns: &str, port: u16, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "gobgp", "-u", "127.0.0.1", "-p"])
        .arg(port.to_string())
        .args(args)
        .output()
        .context("running gobgp")?;
    if !out.status.success() {
        bail!(
            "gobgp {} failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
