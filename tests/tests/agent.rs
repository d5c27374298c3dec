//! The agent in a network namespace, as a GoCast user drives it: HTTP registration, a real
//! service behind a port monitor, iptables NAT reached from a client namespace, cleanup,
//! restart and SIGTERM.

use std::{fmt::Write as _, path::Path, time::Duration};

use anyhow::{Context, Result, ensure};
use gocast_tests::{Agent, Service, Topology, require_privileged};
use serde_json::Value;

const API: &str = "127.0.0.1:8080";

/// Writes the agent's config into `dir`: fast monitors, a short cleanup timer, the client as
/// (unreachable) BGP peer so the NAT destination defaults to the agent's link address, and the
/// iptables dataplane, whose rules these tests read (tests/dataplane.rs covers both).
fn write_config(dir: &Path, topo: &Topology, cleanup: &str, extra_apps: &str) -> Result<String> {
    let path = dir.join("config.yaml");
    let yaml = format!(
        "agent:\n  listen_addr: {API}\n  monitor_interval: 100ms\n  cleanup_timer: {cleanup}\n  state_file: {state}\n\
         bgp:\n  local_as: 65001\n  remote_as: 65000\n  peer_ip: {peer}\ndataplane:\n  mode: iptables\n{extra_apps}",
        state = dir.join("state.json").display(),
        peer = topo.client_ip,
    );
    std::fs::write(&path, yaml)?;
    Ok(path.to_string_lossy().into_owned())
}

fn start(topo: &Topology, dir: &Path, config: &str, log: &str) -> Result<Agent> {
    // GoCast's own flag syntax, as existing unit files use it.
    Agent::start(&topo.agent, &["-config", config], &dir.join(log), API)
}

fn app(topo: &Topology, name: &str) -> Result<Option<Value>> {
    let (status, apps) = topo.agent.http_get(&format!("http://{API}/apps"))?;
    ensure!(status == 200, "/apps: {status}");
    Ok(apps
        .as_array()
        .context("apps array")?
        .iter()
        .find(|a| a["name"] == name)
        .cloned())
}

fn state_is(topo: &Topology, name: &str, state: &str, announced: bool) -> Result<bool> {
    Ok(app(topo, name)?.is_some_and(|a| a["state"] == state && a["announced"] == announced))
}

fn lo_has(topo: &Topology, needle: &str) -> Result<bool> {
    Ok(topo
        .agent
        .ip(&["addr", "show", "dev", "lo"])?
        .contains(needle))
}

fn routes(topo: &Topology) -> Result<Value> {
    Ok(topo.agent.http_get(&format!("http://{API}/routes"))?.1["routes"].clone())
}

/// Checks that neither an address of ours nor a NAT rule is left in the agent's namespace.
fn assert_host_clean(topo: &Topology, vip: &str) -> Result<()> {
    ensure!(!lo_has(topo, vip)?, "vip {vip} left on lo");
    for binary in ["iptables", "ip6tables"] {
        let rules = topo.agent.nat_rules(binary)?;
        ensure!(
            !rules.contains("GOCAST"),
            "{binary} still has our chain:\n{rules}"
        );
    }
    Ok(())
}

#[test]
fn registered_app_is_served_through_nat_withdrawn_when_its_service_stops_and_cleaned_up()
-> Result<()> {
    require_privileged!();
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    let config = write_config(dir.path(), &topo, "1s", "")?;
    let mut agent = start(&topo, dir.path(), &config, "agent.log")?;
    std::fs::write(dir.path().join("hello.txt"), "hello through nat")?;
    let mut service = Service::http(&topo.agent, 8081, dir.path())?;

    let (status, body) = topo.agent.http_get(&format!(
        "http://{API}/register?name=web&vip=192.0.2.10/32&monitor=port:tcp:8081&nat=tcp:80:8081&vip_communities=65001:7"
    ))?;
    ensure!(status == 200, "register: {status} {body}");
    agent.wait_for("healthy and announced", Duration::from_secs(5), |_| {
        state_is(&topo, "web", "healthy", true)
    })?;

    let lo = topo.agent.ip(&["addr", "show", "dev", "lo"])?;
    ensure!(
        lo.contains("192.0.2.10/32") && lo.contains("lo:web"),
        "vip with label on lo:\n{lo}"
    );
    ensure!(routes(&topo)?["192.0.2.10/32"]["communities"] == serde_json::json!(["65001:7"]));
    let rules = topo.agent.nat_rules("iptables")?;
    ensure!(
        rules.contains(&format!("--to-destination {}:8081", topo.agent_ip))
            && rules.contains("gocast:web"),
        "DNAT toward the agent's link address:\n{rules}"
    );
    // `gocast status` reads the same API and prints a table.
    let status_out = topo.agent.run(
        gocast_tests::agent_binary()?.to_str().context("path")?,
        &["status", "--addr", API],
    )?;
    ensure!(
        status_out.lines().any(|l| l.starts_with("web")
            && l.contains("192.0.2.10/32")
            && l.contains("healthy")
            // Wanted, but the peer (nobody listens on the client) is not Established: no
            // peer has the route, and the table says so.
            && l.contains("wanted, 0/1 peers")),
        "status table:\n{status_out}"
    );
    // From another host, VIP:80 reaches the service on 8081.
    let (status, text) = topo.client.http_get("http://192.0.2.10:80/hello.txt")?;
    ensure!(
        status == 200 && text == "hello through nat",
        "through NAT: {status} {text}"
    );

    service.stop();
    agent.wait_for("withdrawn", Duration::from_secs(3), |_| {
        state_is(&topo, "web", "unhealthy", false)
    })?;
    ensure!(
        routes(&topo)? == serde_json::json!({}),
        "route still desired"
    );
    let view = app(&topo, "web")?.context("app kept until cleanup")?;
    ensure!(
        view["monitors"][0]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("no tcp socket listening"),
        "{view}"
    );
    ensure!(
        lo_has(&topo, "192.0.2.10/32")?,
        "the vip stays until the cleanup timer"
    );

    // Forgotten once the state file no longer has it; the VIP leaves lo right after, once the
    // withdrawal reached the peers.
    agent.wait_for("cleaned up", Duration::from_secs(5), |_| {
        Ok(app(&topo, "web")?.is_none() && !lo_has(&topo, "192.0.2.10")?)
    })?;
    ensure!(
        !topo.agent.nat_rules("iptables")?.contains("gocast:web"),
        "rule left after cleanup"
    );

    let (status, elapsed) = agent.signal_and_wait("TERM", Duration::from_secs(5))?;
    ensure!(status.success(), "exit status {status}");
    ensure!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
    assert_host_clean(&topo, "192.0.2.10")
}

#[test]
fn http_registrations_survive_a_restart_and_sigterm_leaves_nothing_behind() -> Result<()> {
    require_privileged!();
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    let config = write_config(dir.path(), &topo, "15m", "")?;
    let _service = Service::http(&topo.agent, 8082, dir.path())?;
    let mut agent = start(&topo, dir.path(), &config, "first.log")?;
    for (name, vip) in [("web4", "192.0.2.20/32"), ("web6", "2001:db8:ff00::20/128")] {
        let (status, body) = topo.agent.http_get(&format!(
            "http://{API}/register?name={name}&vip={vip}&monitor=port:tcp:8082&nat=tcp:80:8082"
        ))?;
        ensure!(status == 200, "register {name}: {status} {body}");
    }
    agent.wait_for("both healthy", Duration::from_secs(5), |_| {
        Ok(state_is(&topo, "web4", "healthy", true)? && state_is(&topo, "web6", "healthy", true)?)
    })?;
    ensure!(lo_has(&topo, "2001:db8:ff00::20/128")?);
    let (status, text) = topo.client.http_get("http://[2001:db8:ff00::20]:80/")?;
    ensure!(status == 200, "IPv6 through NAT: {status} {text}");

    let (status, elapsed) = agent.signal_and_wait("TERM", Duration::from_secs(5))?;
    ensure!(
        status.success() && elapsed < Duration::from_secs(5),
        "{status} after {elapsed:?}"
    );
    assert_host_clean(&topo, "192.0.2.20")?;
    assert_host_clean(&topo, "2001:db8:ff00::20")?;

    let mut agent = start(&topo, dir.path(), &config, "second.log")?;
    let web4 = app(&topo, "web4")?.context("web4 restored")?;
    ensure!(web4["source"] == "http", "{web4}");
    agent.wait_for("restored apps healthy", Duration::from_secs(5), |_| {
        Ok(state_is(&topo, "web4", "healthy", true)? && state_is(&topo, "web6", "healthy", true)?)
    })?;
    ensure!(lo_has(&topo, "192.0.2.20/32")?);
    agent.signal_and_wait("INT", Duration::from_secs(5))?;
    assert_host_clean(&topo, "192.0.2.20")
}

#[test]
fn a_restart_after_a_crash_removes_stale_vips_and_rules_and_nothing_else() -> Result<()> {
    require_privileged!();
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    let apps = "apps:\n  - name: cfg\n    vip: 192.0.2.30/32\n    monitor: port:tcp:8083\n    nats: ['tcp:80:8083']\n";
    let config = write_config(dir.path(), &topo, "15m", apps)?;
    let mut service = Service::http(&topo.agent, 8083, dir.path())?;
    let mut agent = start(&topo, dir.path(), &config, "first.log")?;
    agent.wait_for("config app healthy", Duration::from_secs(5), |_| {
        state_is(&topo, "cfg", "healthy", true)
    })?;
    // An address an operator added by hand, GoCast-style label included: not ours.
    topo.agent.ip(&[
        "addr",
        "add",
        "192.0.2.99/32",
        "dev",
        "lo",
        "label",
        "lo:admin",
    ])?;

    agent.signal_and_wait("KILL", Duration::from_secs(5))?;
    ensure!(
        lo_has(&topo, "192.0.2.30/32")?,
        "a crash leaves the vip behind"
    );
    ensure!(
        topo.agent.nat_rules("iptables")?.contains("gocast:cfg"),
        "and the rule"
    );

    // The service is down now: the restarted agent must not keep the stale state.
    service.stop();
    let mut agent = start(&topo, dir.path(), &config, "second.log")?;
    agent.wait_for("stale vip removed", Duration::from_secs(5), |_| {
        Ok(!lo_has(&topo, "192.0.2.30/32")?)
    })?;
    ensure!(
        !topo.agent.nat_rules("iptables")?.contains("gocast:cfg"),
        "stale rule removed"
    );
    ensure!(
        lo_has(&topo, "192.0.2.99/32")?,
        "the operator's address was touched"
    );
    ensure!(state_is(&topo, "cfg", "unhealthy", false)?);
    agent.signal_and_wait("TERM", Duration::from_secs(5))?;
    ensure!(
        lo_has(&topo, "192.0.2.99/32")?,
        "shutdown removed the operator's address"
    );
    Ok(())
}

#[test]
fn sigterm_with_two_hundred_apps_cleans_up_within_five_seconds() -> Result<()> {
    require_privileged!();
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    let mut apps = String::from("apps:\n");
    for i in 0..200 {
        let (hi, lo) = (i / 250, i % 250 + 1);
        let _ = writeln!(
            apps,
            "  - name: app{i}\n    vip: 2001:db8:ff00::{hi}:{lo}/128\n    monitor: port:tcp:8084\n    nats: ['tcp:80:8084', 'tcp:443:8084']"
        );
    }
    let config = write_config(dir.path(), &topo, "15m", &apps)?;
    let _service = Service::http(&topo.agent, 8084, dir.path())?;
    let mut agent = start(&topo, dir.path(), &config, "agent.log")?;
    agent.wait_for("all healthy", Duration::from_secs(60), |_| {
        let (_, apps) = topo.agent.http_get(&format!("http://{API}/apps"))?;
        Ok(apps
            .as_array()
            .is_some_and(|a| a.len() == 200 && a.iter().all(|a| a["state"] == "healthy")))
    })?;
    let (status, elapsed) = agent.signal_and_wait("TERM", Duration::from_secs(10))?;
    ensure!(
        status.success(),
        "exit status {status}\n{}",
        agent.log_text()
    );
    ensure!(
        elapsed < Duration::from_secs(5),
        "shutdown took {elapsed:?}"
    );
    assert_host_clean(&topo, "2001:db8:ff00::")
}
