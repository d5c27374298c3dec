//! The agent's BGP speaker against a real FRR 8 `bgpd` (no zebra) in a network namespace: the
//! session comes up with both families, healthy apps' VIPs arrive with the configured standard
//! and large communities and the agent's next hops, and stopping the service withdraws them.

use anyhow::{Context, Result, ensure};
use gocast_tests::routers::{Frr, establishes, learns_and_withdraws};
use serde_json::Value;

const V4: &str = "192.0.2.70/32";
const V6: &str = "2001:db8:ff00::70/128";

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

#[test]
fn frr_establishes_a_session_carrying_ipv4_and_ipv6_unicast() -> Result<()> {
    establishes([V4, V6], |frr: &Frr, topo| {
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
        Ok(())
    })
}

#[test]
fn frr_learns_healthy_vips_with_communities_and_loses_them_when_the_service_stops() -> Result<()> {
    learns_and_withdraws([V4, V6], |frr: &Frr, topo| {
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
        Ok(())
    })
}
