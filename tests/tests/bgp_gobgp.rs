//! The agent's BGP speaker against a real `GoBGP` 3 (`gobgpd`) in a network namespace: the session
//! comes up with both families, healthy apps' VIPs arrive with the configured standard and
//! large communities and the agent's next hops, and stopping the service withdraws them.

use std::{path::Path, time::Duration};

use anyhow::{Context, Result, ensure};
use gocast_tests::{
    Agent, Service, Topology, privileged,
    routers::{Gobgp, Neighbor, wait_until},
};
use serde_json::Value;

const API: &str = "127.0.0.1:8080";
const V4: &str = "192.0.2.80/32";
const V6: &str = "2001:db8:ff00::80/128";

/// Path attribute type codes as `gobgp -j` labels them.
const NEXT_HOP: u64 = 3;
const COMMUNITIES: u64 = 8;
const MP_REACH_NLRI: u64 = 14;
const LARGE_COMMUNITY: u64 = 32;

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

/// The path attribute of `kind` on the best (first) path for `prefix` in `gobgp -j` output.
fn attr<'a>(route: &'a Value, prefix: &str, kind: u64) -> Option<&'a Value> {
    route[prefix][0]["attrs"]
        .as_array()?
        .iter()
        .find(|a| a["type"] == kind)
}

/// Standard communities, which `gobgp -j` prints as 32-bit numbers, as `asn:value`, sorted.
fn communities(route: &Value, prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = attr(route, prefix, COMMUNITIES)
        .and_then(|a| a["communities"].as_array())
        .map(|l| {
            l.iter()
                .filter_map(Value::as_u64)
                .map(|c| format!("{}:{}", c >> 16, c & 0xffff))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Large communities as `asn:data1:data2`, sorted.
fn large_communities(route: &Value, prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = attr(route, prefix, LARGE_COMMUNITY)
        .and_then(|a| a["value"].as_array())
        .map(|l| {
            l.iter()
                .map(|c| format!("{}:{}:{}", c["ASN"], c["LocalData1"], c["LocalData2"]))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn context(gobgp: &Gobgp, agent: &Agent) -> String {
    format!(
        "---- gobgpd log ----\n{}\n{}",
        gobgp.log_text(),
        agent.log_text()
    )
}

#[test]
fn gobgp_establishes_a_session_carrying_ipv4_and_ipv6_unicast() -> Result<()> {
    if !privileged("gobgp_establishes_a_session") {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    let gobgp = Gobgp::start(&topo.client, dir.path(), &neighbor(&topo))?;
    let agent = start_agent(&topo, dir.path())?;

    wait_until("Established at GoBGP", Duration::from_secs(5), || {
        gobgp.established()
    })
    .with_context(|| context(&gobgp, &agent))?;
    let text = gobgp.gobgp(&["neighbor", &topo.agent_ip])?;
    ensure!(text.contains("remote AS 65001"), "remote AS:\n{text}");
    for capability in ["ipv4-unicast:", "ipv6-unicast:", "4-octet-as:"] {
        ensure!(
            text.lines()
                .any(|l| l.trim_start().starts_with(capability)
                    && l.contains("advertised and received")),
            "{capability} not negotiated:\n{text}"
        );
    }

    let (_, info) = topo.agent.http_get(&format!("http://{API}/info"))?;
    ensure!(info["peers"][0]["state"] == "Established", "{info}");
    Ok(())
}

#[test]
fn gobgp_learns_healthy_vips_with_communities_and_loses_them_when_the_service_stops() -> Result<()>
{
    if !privileged("gobgp_learns_healthy_vips") {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    let gobgp = Gobgp::start(&topo.client, dir.path(), &neighbor(&topo))?;
    let mut service = Service::http(&topo.agent, 8090, dir.path())?;
    let agent = start_agent(&topo, dir.path())?;

    wait_until("both routes at GoBGP", Duration::from_secs(5), || {
        Ok(gobgp.route(V4)?.is_some() && gobgp.route(V6)?.is_some())
    })
    .with_context(|| context(&gobgp, &agent))?;

    let v4 = gobgp.route(V4)?.context("IPv4 route")?;
    ensure!(
        communities(&v4, V4) == ["65001:100", "65001:7"],
        "communities (section-wide and the app's):\n{v4:#}"
    );
    ensure!(
        large_communities(&v4, V4) == ["65001:1:2", "65001:7:7"],
        "large communities:\n{v4:#}"
    );
    ensure!(
        attr(&v4, V4, NEXT_HOP).is_some_and(|a| a["nexthop"] == topo.agent_ip.as_str()),
        "next hop:\n{v4:#}"
    );

    let v6 = gobgp.route(V6)?.context("IPv6 route")?;
    ensure!(
        communities(&v6, V6) == ["65001:100"],
        "IPv6 communities (section-wide only):\n{v6:#}"
    );
    ensure!(
        large_communities(&v6, V6) == ["65001:1:2"],
        "IPv6 large communities:\n{v6:#}"
    );
    ensure!(
        attr(&v6, V6, MP_REACH_NLRI).is_some_and(|a| a["nexthop"] == topo.agent_ip6.as_str()),
        "IPv6 next hop {}:\n{v6:#}",
        topo.agent_ip6
    );

    service.stop();
    wait_until(
        "both routes withdrawn at GoBGP",
        Duration::from_secs(5),
        || Ok(gobgp.route(V4)?.is_none() && gobgp.route(V6)?.is_none()),
    )
    .with_context(|| context(&gobgp, &agent))?;
    ensure!(
        gobgp.established()?,
        "the session stays up after a withdrawal"
    );
    Ok(())
}
