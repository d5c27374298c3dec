//! The agent's BGP speaker against a real FRR 8 `bgpd` (no zebra) in a network namespace: the
//! session comes up with both families, healthy apps' VIPs arrive with the configured standard
//! and large communities and the agent's next hops, and stopping the service withdraws them.

use std::{path::Path, time::Duration};

use anyhow::{Context, Result, ensure};
use gocast_tests::{
    Agent, Service, Topology, privileged,
    routers::{Frr, Neighbor, wait_until},
};
use serde_json::Value;

const API: &str = "127.0.0.1:8080";
const V4: &str = "192.0.2.70/32";
const V6: &str = "2001:db8:ff00::70/128";

fn neighbor(topo: &Topology) -> Neighbor {
    Neighbor {
        local: topo.client_ip.clone(),
        local_as: 65000,
        agent: topo.agent_ip.clone(),
        agent_as: 65001,
        password: None,
        hold_time: None,
    }
}

/// The agent's config: the client namespace as peer, section-wide communities, and two apps
/// (IPv4 with its own communities, IPv6 without) behind one TCP port monitor.
fn config(dir: &Path, topo: &Topology) -> Result<String> {
    let path = dir.join("config.yaml");
    std::fs::write(
        &path,
        format!(
            "agent:\n  listen_addr: {API}\n  monitor_interval: 100ms\n  cleanup_timer: 1s\n  state_file: {state}\n\
             bgp:\n  local_as: 65001\n  remote_as: 65000\n  peer_ip: {peer}\n  communities: ['65001:100', '65001:1:2']\n\
             apps:\n  - name: web\n    vip: {V4}\n    vip_config: {{bgp_communities: ['65001:7', '65001:7:7']}}\n    monitor: port:tcp:8090\n\
             \x20 - name: web6\n    vip: {V6}\n    monitor: port:tcp:8090\n",
            state = dir.join("state.json").display(),
            peer = topo.client_ip,
        ),
    )?;
    Ok(path.to_string_lossy().into_owned())
}

fn start_agent(topo: &Topology, dir: &Path) -> Result<Agent> {
    let config = config(dir, topo)?;
    Agent::start(
        &topo.agent,
        &["run", "--config", &config],
        &dir.join("agent.log"),
        API,
    )
}

/// The strings of `community`/`largeCommunity` (`list`) of the route's first path.
fn list(route: &Value, attr: &str) -> Vec<String> {
    route["paths"][0][attr]["list"]
        .as_array()
        .map(|l| {
            l.iter()
                .filter_map(|c| c.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn sorted(items: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = items.iter().map(|&s| s.to_owned()).collect();
    v.sort();
    v
}

fn sorted_list(route: &Value, attr: &str) -> Vec<String> {
    let mut v = list(route, attr);
    v.sort();
    v
}

fn context(frr: &Frr, agent: &Agent) -> String {
    format!(
        "---- bgpd log ----\n{}\n{}",
        frr.log_text(),
        agent.log_text()
    )
}

#[test]
fn frr_establishes_a_session_carrying_ipv4_and_ipv6_unicast() -> Result<()> {
    if !privileged("frr_establishes_a_session") {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    let frr = Frr::start(&topo.client, dir.path(), &neighbor(&topo))?;
    let agent = start_agent(&topo, dir.path())?;

    wait_until("Established at FRR", Duration::from_secs(5), || {
        frr.established()
    })
    .with_context(|| context(&frr, &agent))?;
    let out = frr.vtysh(&format!("show bgp neighbors {} json", topo.agent_ip))?;
    let peer: Value = serde_json::from_str(&out)?;
    let peer = &peer[&topo.agent_ip];
    ensure!(peer["remoteAs"] == 65001, "remote AS:\n{out}");
    let mp = &peer["neighborCapabilities"]["multiprotocolExtensions"];
    ensure!(
        mp["ipv4Unicast"]["advertisedAndReceived"] == true
            && mp["ipv6Unicast"]["advertisedAndReceived"] == true,
        "both families negotiated:\n{out}"
    );
    ensure!(
        peer["neighborCapabilities"]["4byteAs"] == "advertisedAndReceived",
        "four-octet AS:\n{out}"
    );

    let (_, info) = topo.agent.http_get(&format!("http://{API}/info"))?;
    ensure!(info["peers"][0]["state"] == "Established", "{info}");
    Ok(())
}

#[test]
fn frr_learns_healthy_vips_with_communities_and_loses_them_when_the_service_stops() -> Result<()> {
    if !privileged("frr_learns_healthy_vips") {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    let frr = Frr::start(&topo.client, dir.path(), &neighbor(&topo))?;
    let mut service = Service::http(&topo.agent, 8090, dir.path())?;
    let agent = start_agent(&topo, dir.path())?;

    wait_until("both routes at FRR", Duration::from_secs(5), || {
        Ok(frr.route(V4)?.is_some() && frr.route(V6)?.is_some())
    })
    .with_context(|| context(&frr, &agent))?;

    let v4 = frr.route(V4)?.context("IPv4 route")?;
    ensure!(
        sorted_list(&v4, "community") == sorted(&["65001:100", "65001:7"]),
        "communities (section-wide and the app's):\n{v4:#}"
    );
    ensure!(
        sorted_list(&v4, "largeCommunity") == sorted(&["65001:1:2", "65001:7:7"]),
        "large communities:\n{v4:#}"
    );
    ensure!(
        v4["paths"][0]["nexthops"][0]["ip"] == topo.agent_ip.as_str(),
        "next hop:\n{v4:#}"
    );
    ensure!(
        v4["paths"][0]["aspath"]["string"] == "65001",
        "as path:\n{v4:#}"
    );

    let v6 = frr.route(V6)?.context("IPv6 route")?;
    ensure!(
        list(&v6, "community") == ["65001:100"],
        "IPv6 communities (section-wide only):\n{v6:#}"
    );
    ensure!(
        list(&v6, "largeCommunity") == ["65001:1:2"],
        "IPv6 large communities:\n{v6:#}"
    );
    let hops = v6["paths"][0]["nexthops"]
        .as_array()
        .context("IPv6 next hops")?;
    ensure!(
        hops.iter()
            .any(|h| h["ip"] == topo.agent_ip6.as_str() && h["scope"] == "global"),
        "IPv6 next hop {}:\n{v6:#}",
        topo.agent_ip6
    );

    service.stop();
    wait_until(
        "both routes withdrawn at FRR",
        Duration::from_secs(5),
        || Ok(frr.route(V4)?.is_none() && frr.route(V6)?.is_none()),
    )
    .with_context(|| context(&frr, &agent))?;
    ensure!(
        frr.established()?,
        "the session stays up after a withdrawal"
    );
    Ok(())
}
