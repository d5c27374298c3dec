//! The agent's BGP speaker against a real `GoBGP` 3 (`gobgpd`) in a network namespace: the session
//! comes up with both families, healthy apps' VIPs arrive with the configured standard and
//! large communities and the agent's next hops, and stopping the service withdraws them; what
//! `GoBGP` announces to the agent is counted in `/info`.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use gocast_tests::routers::{Gobgp, agent_peer, establishes, learns_and_withdraws, wait_until};
use serde_json::Value;

const V4: &str = "192.0.2.80/32";
const V6: &str = "2001:db8:ff00::80/128";

/// Path attribute type codes as `gobgp -j` labels them.
const NEXT_HOP: u64 = 3;
const COMMUNITIES: u64 = 8;
const MP_REACH_NLRI: u64 = 14;
const LARGE_COMMUNITY: u64 = 32;

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

#[test]
fn gobgp_establishes_a_session_carrying_ipv4_and_ipv6_unicast() -> Result<()> {
    establishes([V4, V6], |gobgp: &Gobgp, topo| {
        let text = gobgp.gobgp(&["neighbor", &topo.agent_ip])?;
        ensure!(text.contains("remote AS 65001"), "remote AS:\n{text}");
        for capability in ["ipv4-unicast:", "ipv6-unicast:", "4-octet-as:"] {
            ensure!(
                text.lines().any(|l| l.trim_start().starts_with(capability)
                    && l.contains("advertised and received")),
                "{capability} not negotiated:\n{text}"
            );
        }
        Ok(())
    })
}

#[test]
fn gobgp_learns_healthy_vips_with_communities_and_loses_them_when_the_service_stops() -> Result<()>
{
    learns_and_withdraws([V4, V6], |gobgp: &Gobgp, topo| {
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
        Ok(())
    })
}

#[test]
fn the_agent_counts_the_prefixes_gobgp_announces_and_withdraws() -> Result<()> {
    establishes([V4, V6], |gobgp: &Gobgp, topo| {
        let rib =
            |op: &str, prefix: &str| gobgp.gobgp(&["global", "rib", "-a", "ipv4", op, prefix]);
        let received = |n: u64| {
            wait_until(
                &format!("{n} received prefixes in /info"),
                Duration::from_secs(10),
                || Ok(agent_peer(topo)?["prefixes_received"] == n),
            )
        };
        rib("add", "198.18.200.0/24")?;
        rib("add", "198.18.201.0/24")?;
        received(2)?;
        rib("del", "198.18.201.0/24")?;
        received(1)?;
        let peer = agent_peer(topo)?;
        ensure!(
            peer["families"] == serde_json::json!(["ipv4", "ipv6"]),
            "both families carry VIPs: {peer}"
        );
        Ok(())
    })
}
