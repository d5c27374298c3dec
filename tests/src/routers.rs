//! Real BGP routers in a test's network namespace: BIRD 2 (and, beside it, FRR and GoBGP).
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
             protocol bgp agent {{\n  local {local} as {las};\n  neighbor {agent} as {aas};\n  passive on;\n  {password}\n  {hold}\n\
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
