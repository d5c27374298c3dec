//! Self-repair end to end (docs/design.md, "Self-repair"): the agent serves a VIP through NAT
//! to a backend in its namespace; a piece of host state is taken away behind its back (the VIP
//! off `lo`, the iptables rules, an eBPF program's link) and must be back within 1 s, with the
//! VIP answering through the NAT again, the repair counted in `/metrics` and shown in `/apps`
//! and `gocast status`.
//!
//! The eBPF programs are attached through BPF links the agent holds, which `ip link set dev X
//! xdp off` (EBUSY) and `tc filter del` (tcx is not a filter) cannot remove: the tests detach
//! the link itself with `bpftool link detach`, finding it in the agent's `/proc/PID/fdinfo`.

use std::{
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use gocast_tests::{Agent, Service, Topology, agent_binary, require_privileged, sh};
use serde_json::Value;

const API: &str = "127.0.0.1:8080";
const VIP: &str = "192.0.2.10";
/// Within this a lost piece must be back.
const BOUND: Duration = Duration::from_secs(1);

/// An agent serving `web` (VIP:80 → backend 8081) in a topology of its own.
struct Setup {
    topo: Topology,
    agent: Agent,
    _backend: Service,
    _dir: tempfile::TempDir,
}

impl Setup {
    /// Starts the backend and the agent with `dataplane` (YAML under `dataplane:`), and waits
    /// until the VIP answers through the NAT.
    fn start(dataplane: &str) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let topo = Topology::new()?;
        std::fs::write(dir.path().join("who.txt"), "backend 8081")?;
        let backend = Service::http(&topo.agent, 8081, dir.path())?;
        let config = write_config(dir.path(), &topo, dataplane)?;
        let mut agent = Agent::start(
            &topo.agent,
            &["--config", &config],
            &dir.path().join("agent.log"),
            API,
        )?;
        agent.wait_for("web healthy", Duration::from_secs(10), |_| {
            Ok(web(&topo)?["state"] == "healthy")
        })?;
        let setup = Self {
            topo,
            agent,
            _backend: backend,
            _dir: dir,
        };
        setup.serves().context("before anything is taken away")?;
        Ok(setup)
    }

    /// A new connection to the VIP reaches the backend through the NAT.
    fn serves(&self) -> Result<()> {
        let (status, body) = self
            .topo
            .client
            .http_get(&format!("http://{VIP}:80/who.txt"))?;
        ensure!(
            status == 200 && body == "backend 8081",
            "through the VIP: {status} {body}\n{}",
            self.agent.log_text()
        );
        Ok(())
    }

    /// Runs `take_away`, then polls `back` every 5 ms; the time from the start of `take_away`
    /// until `back` held. Fails after 5 s.
    fn time_repair(
        &self,
        take_away: impl FnOnce() -> Result<()>,
        mut back: impl FnMut() -> Result<bool>,
    ) -> Result<Duration> {
        let start = Instant::now();
        take_away()?;
        while start.elapsed() < Duration::from_secs(5) {
            if back()? {
                return Ok(start.elapsed());
            }
            thread::sleep(Duration::from_millis(5));
        }
        bail!("not put back within 5 s\n{}", self.agent.log_text())
    }

    /// The repair took less than [`BOUND`], the VIP answers again, `/metrics` counts `kind`,
    /// and, for a part of the app, `/apps` and `gocast status` show it as its last repair.
    fn check_repaired(&self, kind: &str, took: Duration, what: Option<&str>) -> Result<()> {
        eprintln!("{kind} repaired in {took:?}");
        ensure!(
            took < BOUND,
            "{kind} took {took:?}\n{}",
            self.agent.log_text()
        );
        self.serves().context("after the repair")?;
        let metrics = self
            .topo
            .agent
            .run("curl", &["-sS", &format!("http://{API}/metrics")])?;
        let line = format!("gocast_repairs_total{{kind=\"{kind}\"}} ");
        let count = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&line))
            .with_context(|| format!("no {line} in\n{metrics}"))?;
        ensure!(count.trim() != "0", "{line}{count}");
        let web = web(&self.topo)?;
        ensure!(web["state"] == "healthy", "{web}");
        let Some(what) = what else {
            return Ok(());
        };
        let last = &web["last_repair"];
        ensure!(
            web["repairs"].as_u64() >= Some(1)
                && last["what"].as_str().is_some_and(|w| w.contains(what))
                && last["result"] == "repaired",
            "{web}"
        );
        let status = self.topo.agent.run(
            agent_binary()?.to_str().context("path")?,
            &["status", "--addr", API],
        )?;
        ensure!(
            status.contains(&format!("(last: {what}")),
            "gocast status shows the repair:\n{status}"
        );
        Ok(())
    }

    /// The agent's BPF links of `link_type` (`xdp`, `tcx`) whose `/proc/PID/fdinfo` contains
    /// `extra`, as (link id, attached to an interface).
    fn links(&self, link_type: &str, extra: &str) -> Result<Vec<(u32, bool)>> {
        let pid = self.agent.pid().context("agent not running")?;
        let mut links = Vec::new();
        for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
            let Ok(info) = std::fs::read_to_string(entry?.path()) else {
                continue;
            };
            let field = |name: &str| {
                info.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(str::trim)
            };
            if field("link_type:") != Some(link_type) || !info.contains(extra) {
                continue;
            }
            let id = field("link_id:").context("link_id")?.parse()?;
            let attached = field("ifindex:").is_some_and(|i| i != "0");
            links.push((id, attached));
        }
        Ok(links)
    }

    /// Detaches the one attached link of `link_type` matching `extra`, and waits until another
    /// one is attached again: the repair's time.
    fn detach_link_and_time_repair(&self, link_type: &str, extra: &str) -> Result<Duration> {
        let attached: Vec<u32> = self
            .links(link_type, extra)?
            .into_iter()
            .filter_map(|(id, attached)| attached.then_some(id))
            .collect();
        let [id] = attached[..] else {
            bail!("expected one attached {link_type} link ({extra}): {attached:?}");
        };
        self.time_repair(
            || {
                sh("bpftool", &["link", "detach", "id", &id.to_string()])?;
                Ok(())
            },
            || {
                Ok(self
                    .links(link_type, extra)?
                    .iter()
                    .any(|(other, attached)| *attached && *other != id))
            },
        )
    }
}

/// The client is the (unreachable) BGP peer, so the eBPF dataplane attaches to the link toward
/// it and NAT sends traffic to the agent's link address. Monitors run every 100 ms.
fn write_config(dir: &Path, topo: &Topology, dataplane: &str) -> Result<String> {
    let path = dir.join("config.yaml");
    let yaml = format!(
        "agent:\n  listen_addr: {API}\n  monitor_interval: 100ms\n  cleanup_timer: 10s\n  state_file: {state}\n\
         bgp:\n  local_as: 65001\n  remote_as: 65000\n  peer_ip: {peer}\n\
         dataplane:\n  {dataplane}\n\
         apps:\n  - name: web\n    vip: {VIP}/32\n    monitor: port:tcp:8081\n    nats: ['tcp:80:8081']\n",
        state = dir.join("state.json").display(),
        peer = topo.client_ip,
    );
    std::fs::write(&path, yaml)?;
    Ok(path.to_string_lossy().into_owned())
}

fn web(topo: &Topology) -> Result<Value> {
    let (status, web) = topo.agent.http_get(&format!("http://{API}/apps/web"))?;
    ensure!(status == 200, "/apps/web: {status} {web}");
    Ok(web)
}

fn vip_on_lo(topo: &Topology) -> Result<bool> {
    let lo = topo.agent.ip(&["-o", "addr", "show", "dev", "lo"])?;
    Ok(lo.contains(&format!("{VIP}/32")))
}

fn dnat_rule_in_chain(topo: &Topology) -> Result<bool> {
    let chain = topo
        .agent
        .run("iptables", &["-w", "-t", "nat", "-S", "GOCAST"])?;
    Ok(chain.contains(&format!("-d {VIP}/32")))
}

fn jumps_to_chain(topo: &Topology) -> Result<bool> {
    let table = topo.agent.run("iptables", &["-w", "-t", "nat", "-S"])?;
    Ok(["PREROUTING", "OUTPUT"]
        .iter()
        .all(|hook| table.contains(&format!("-A {hook} -j GOCAST"))))
}

#[test]
fn a_vip_deleted_from_lo_is_back_within_a_second_and_answers_again() -> Result<()> {
    require_privileged!();
    let s = Setup::start("mode: ebpf")?;
    let took = s.time_repair(
        || {
            s.topo
                .agent
                .ip(&["addr", "del", &format!("{VIP}/32"), "dev", "lo"])?;
            Ok(())
        },
        || vip_on_lo(&s.topo),
    )?;
    s.check_repaired("vip", took, Some("vip missing from lo"))
}

#[test]
fn flushed_iptables_rules_are_back_within_a_second_and_answer_again() -> Result<()> {
    require_privileged!();
    let s = Setup::start("mode: iptables")?;
    let took = s.time_repair(
        || {
            s.topo
                .agent
                .run("iptables", &["-w", "-t", "nat", "-F", "GOCAST"])?;
            Ok(())
        },
        || dnat_rule_in_chain(&s.topo),
    )?;
    s.check_repaired("nat", took, Some("nat rules missing"))?;
    // The whole table, the jumps from PREROUTING and OUTPUT included.
    let took = s.time_repair(
        || {
            s.topo.agent.run("iptables", &["-w", "-t", "nat", "-F"])?;
            Ok(())
        },
        || Ok(dnat_rule_in_chain(&s.topo)? && jumps_to_chain(&s.topo)?),
    )?;
    s.check_repaired("nat", took, Some("nat rules missing"))
}

#[test]
fn a_detached_tc_ingress_program_is_attached_again_within_a_second() -> Result<()> {
    require_privileged!();
    // On a veth, `ingress: auto` runs the ingress program at TC.
    let s = Setup::start("mode: ebpf")?;
    let took = s.detach_link_and_time_repair("tcx", "(ingress)")?;
    s.check_repaired("program", took, None)
}

#[test]
fn a_detached_xdp_program_is_attached_again_within_a_second() -> Result<()> {
    require_privileged!();
    let s = Setup::start("mode: ebpf\n  ingress: xdp")?;
    let took = s.detach_link_and_time_repair("xdp", "")?;
    s.check_repaired("program", took, None)?;
    let links = s.topo.agent.ip(&["-d", "link", "show"])?;
    ensure!(links.contains("name gocast_xdp"), "{links}");
    Ok(())
}
