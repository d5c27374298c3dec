//! The agent's BGP speaker against a real BIRD 2 in a network namespace: the session comes up
//! at once, healthy apps' VIPs arrive with their communities, a failing monitor withdraws, and
//! shutdown says goodbye with an administrative-shutdown Cease.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use gocast_tests::{
    Agent, Service, Topology, require_privileged,
    routers::{
        API, Bird, COMMUNITIES, Neighbor, agent_config, agent_peer, start_agent, wait_until,
        web_apps_with_communities,
    },
};

#[test]
fn bird_learns_healthy_vips_with_communities_and_loses_them_when_the_monitor_fails() -> Result<()> {
    require_privileged!();
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    let bird = Bird::start(&topo.client, dir.path(), &Neighbor::toward_agent(&topo))?;
    let apps = web_apps_with_communities("192.0.2.50/32", "2001:db8:ff00::50/128");
    let config = agent_config(dir.path(), &topo, COMMUNITIES, &apps)?;
    let mut service = Service::http(&topo.agent, 8090, dir.path())?;
    let mut agent = start_agent(&topo, dir.path(), &config, "agent.log")?;

    wait_until("Established", Duration::from_secs(5), || bird.established())?;
    wait_until("both routes at BIRD", Duration::from_secs(5), || {
        Ok(!bird.route("192.0.2.50/32")?.is_empty()
            && !bird.route("2001:db8:ff00::50/128")?.is_empty())
    })?;
    let v4 = bird.route("192.0.2.50/32")?;
    ensure!(
        v4.contains("(65001,7)") && v4.contains("(65001,100)"),
        "communities:\n{v4}"
    );
    ensure!(
        v4.contains("(65001, 7, 7)") && v4.contains("(65001, 1, 2)"),
        "large communities:\n{v4}"
    );
    ensure!(
        v4.contains(&format!("BGP.next_hop: {}", topo.agent_ip)),
        "next hop:\n{v4}"
    );
    ensure!(v4.contains("BGP.as_path: 65001"), "as path:\n{v4}");
    let v6 = bird.route("2001:db8:ff00::50/128")?;
    ensure!(
        v6.contains(&format!("BGP.next_hop: {}", topo.agent_ip6)),
        "IPv6 next hop:\n{v6}"
    );

    let peer = agent_peer(&topo)?;
    ensure!(peer["state"] == "Established", "{peer}");
    ensure!(peer["prefixes_advertised"] == 2, "{peer}");
    // The per-type message counters move with the session: BIRD's OPEN and KEEPALIVE came in,
    // our UPDATEs went out.
    let (status, metrics) = topo.agent.http_get(&format!("http://{API}/metrics"))?;
    let metrics = metrics.as_str().unwrap_or_default();
    ensure!(status == 200, "/metrics: {status}");
    for series in [
        "direction=\"in\",type=\"open\"} 1",
        "direction=\"in\",type=\"keepalive\"} ",
        "direction=\"out\",type=\"update\"} ",
    ] {
        ensure!(
            metrics
                .lines()
                .any(|l| l.starts_with("gocast_bgp_messages_total{")
                    && l.contains(series)
                    && !l.ends_with("} 0")),
            "no {series} in /metrics:\n{metrics}"
        );
    }

    service.stop();
    wait_until("withdrawn at BIRD", Duration::from_secs(3), || {
        Ok(bird.route("192.0.2.50/32")?.is_empty()
            && bird.route("2001:db8:ff00::50/128")?.is_empty())
    })?;

    let (status, elapsed) = agent.signal_and_wait("TERM", Duration::from_secs(5))?;
    ensure!(
        status.success() && elapsed < Duration::from_secs(5),
        "{status} {elapsed:?}"
    );
    let proto = bird.birdc(&["show", "protocols", "all", "agent"])?;
    ensure!(
        proto.contains("Administrative shutdown"),
        "BIRD saw no Cease:\n{proto}"
    );
    Ok(())
}

#[test]
fn without_peer_ip_the_default_gateway_is_the_peer_as_in_gocast() -> Result<()> {
    require_privileged!();
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    let bird = Bird::start(&topo.client, dir.path(), &Neighbor::toward_agent(&topo))?;
    let path = dir.path().join("config.yaml");
    // GoCast's autodiscovery: no peer_ip; the agent's default route points at BIRD.
    std::fs::write(
        &path,
        format!(
            "agent:\n  listen_addr: {API}\n  state_file: {}\nbgp:\n  local_as: 65001\n  remote_as: 65000\napps:\n  - name: web\n    vip: 192.0.2.51/32\n",
            dir.path().join("state.json").display()
        ),
    )?;
    let config = path.to_string_lossy().into_owned();
    let _agent = Agent::start(
        &topo.agent,
        &["-config", &config],
        &dir.path().join("agent.log"),
        API,
    )?;
    wait_until("route at BIRD", Duration::from_secs(5), || {
        Ok(!bird.route("192.0.2.51/32")?.is_empty())
    })?;
    let peer = agent_peer(&topo)?;
    ensure!(peer["address"] == topo.client_ip.as_str(), "{peer}");
    Ok(())
}

#[test]
fn graceful_shutdown_re_announces_with_the_community_before_withdrawing() -> Result<()> {
    require_privileged!();
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    let bird = Bird::start(&topo.client, dir.path(), &Neighbor::toward_agent(&topo))?;
    let bgp_extra = format!("{COMMUNITIES}  graceful_shutdown: 2s\n");
    let apps = "apps:\n  - name: web\n    vip: 192.0.2.52/32\n";
    let config = agent_config(dir.path(), &topo, &bgp_extra, apps)?;
    let mut agent = start_agent(&topo, dir.path(), &config, "agent.log")?;
    wait_until("route at BIRD", Duration::from_secs(5), || {
        Ok(!bird.route("192.0.2.52/32")?.is_empty())
    })?;
    ensure!(!bird.route("192.0.2.52/32")?.contains("(65535,0)"));

    let pid = agent.pid().context("agent pid")?;
    gocast_tests::sh("kill", &["-TERM", &pid.to_string()])?;
    // RFC 8326: the route stays, now carrying GRACEFUL_SHUTDOWN, while the wait lasts.
    wait_until("GRACEFUL_SHUTDOWN at BIRD", Duration::from_secs(2), || {
        Ok(bird.route("192.0.2.52/32")?.contains("(65535,0)"))
    })?;
    let (status, elapsed) = agent.wait_exit(Duration::from_secs(8))?;
    ensure!(status.success(), "{status}");
    ensure!(
        elapsed >= Duration::from_millis(1500),
        "the wait was skipped: {elapsed:?}"
    );
    ensure!(
        bird.route("192.0.2.52/32")?.is_empty(),
        "route left at BIRD"
    );
    ensure!(
        bird.birdc(&["show", "protocols", "all", "agent"])?
            .contains("Administrative shutdown")
    );
    Ok(())
}

#[test]
fn with_listen_port_the_agent_accepts_the_session_bird_opens_with_md5() -> Result<()> {
    require_privileged!();
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    // BIRD connects to the agent's listener; the agent's own connects go to a closed port.
    let neighbor = Neighbor {
        connect_to: Some(1179),
        password: Some("s3cret".into()),
        ..Neighbor::toward_agent(&topo)
    };
    let bird = Bird::start(&topo.client, dir.path(), &neighbor)?;
    let apps = "apps:\n  - name: web\n    vip: 192.0.2.53/32\n";
    let config = agent_config(
        dir.path(),
        &topo,
        "  peer_port: 9\n  listen_port: 1179\n  password: s3cret\n",
        apps,
    )?;
    let _agent = start_agent(&topo, dir.path(), &config, "agent.log")?;
    wait_until(
        "route at BIRD over the session BIRD opened",
        Duration::from_secs(10),
        || Ok(!bird.route("192.0.2.53/32")?.is_empty()),
    )?;
    let route = bird.route("192.0.2.53/32")?;
    ensure!(
        route.contains(&format!("BGP.next_hop: {}", topo.agent_ip)),
        "next hop:\n{route}"
    );
    Ok(())
}

/// Rejects TCP to BIRD's port 179 in its namespace (a reset, as from a router configured to
/// initiate or a filtered port), so the agent's own connects always fail.
fn reject_bgp_port(topo: &Topology) -> Result<()> {
    topo.client.run(
        "iptables",
        &[
            "-I",
            "INPUT",
            "-p",
            "tcp",
            "--dport",
            "179",
            "-j",
            "REJECT",
            "--reject-with",
            "tcp-reset",
        ],
    )?;
    Ok(())
}

/// How many of the agent's SYNs the rule of [`reject_bgp_port`] has answered.
fn rejected_syns(topo: &Topology) -> Result<u64> {
    let out = topo
        .client
        .run("iptables", &["-L", "INPUT", "-v", "-n", "-x"])?;
    let line = out
        .lines()
        .find(|l| l.contains("REJECT") && l.contains("dpt:179"))
        .with_context(|| format!("no REJECT rule:\n{out}"))?;
    let packets = line.split_whitespace().next().unwrap_or_default();
    packets
        .parse()
        .with_context(|| format!("packet count in {line:?}"))
}

/// BIRD initiates toward `listen_port` and the agent cannot reach BIRD's port 179: the agent
/// starts with `bgp_extra`; returns BIRD, the agent and how long the route took to arrive.
fn bird_initiates_while_its_port_is_closed(
    dir: &std::path::Path,
    topo: &Topology,
    bgp_extra: &str,
    vip: &str,
) -> Result<(Bird, Agent, Duration)> {
    let neighbor = Neighbor {
        connect_to: Some(1179),
        ..Neighbor::toward_agent(topo)
    };
    reject_bgp_port(topo)?;
    let bird = Bird::start(&topo.client, dir, &neighbor)?;
    let apps = format!("apps:\n  - name: web\n    vip: {vip}\n");
    let config = agent_config(
        dir,
        topo,
        &format!("  listen_port: 1179\n{bgp_extra}"),
        &apps,
    )?;
    let agent = start_agent(topo, dir, &config, "agent.log")?;
    // BIRD's first connect waits for its `connect delay time` (1 s), from its own start.
    let took = wait_until(
        "route at BIRD over the session BIRD opened",
        Duration::from_secs(10),
        || Ok(!bird.route(vip)?.is_empty()),
    )?;
    ensure!(bird.established()?, "BIRD: {}", bird.session_state()?);
    let peer = agent_peer(topo)?;
    ensure!(peer["state"] == "Established", "{peer}");
    Ok((bird, agent, took))
}

/// The issue: after a failed connect the agent went Idle with a growing backoff and refused
/// the router's connections there; RFC 4271 §8.2.2 goes to Active, which accepts them.
#[test]
fn a_session_bird_opens_comes_up_while_the_agents_own_connects_fail() -> Result<()> {
    require_privileged!();
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    let (bird, agent, took) =
        bird_initiates_while_its_port_is_closed(dir.path(), &topo, "", "192.0.2.54/32")?;
    ensure!(
        rejected_syns(&topo)? > 0,
        "the agent never tried to connect, so nothing failed"
    );
    // Stays up: the agent's retries do not disturb the session BIRD opened.
    let since = bird.since()?;
    std::thread::sleep(Duration::from_secs(3));
    ensure!(
        bird.established()? && bird.since()?.same_session(&since),
        "session reset after {took:?}: {}\n--- BIRD ---\n{}\n--- agent ---\n{}",
        bird.session_state()?,
        bird.log_text(),
        agent.log_text()
    );
    Ok(())
}

#[test]
fn a_passive_peer_is_never_connected_to_and_comes_up_when_bird_connects() -> Result<()> {
    require_privileged!();
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    let (_bird, _agent, _) = bird_initiates_while_its_port_is_closed(
        dir.path(),
        &topo,
        "  passive: true\n",
        "192.0.2.55/32",
    )?;
    std::thread::sleep(Duration::from_secs(2));
    let syns = rejected_syns(&topo)?;
    ensure!(syns == 0, "the passive agent connected {syns} times");
    Ok(())
}

/// Holds back the messages (OPEN, KEEPALIVE, NOTIFICATION: any payload) on connections the
/// agent opens to BIRD's port 179, both ways, while the handshakes pass: neither side sees the
/// other's OPEN there, so BIRD goes on to open its own connection beside it (BIRD gives that
/// up once an OPEN arrives) and the agent has its connection in `OpenSent` when BIRD's arrives:
/// a connection collision every time. Dropped segments are sent again once the rules are gone.
fn hold_back_messages_to_port_179(topo: &Topology, on: bool) -> Result<()> {
    for (chain, port) in [("INPUT", "--dport"), ("OUTPUT", "--sport")] {
        topo.client.run(
            "iptables",
            &[
                if on { "-I" } else { "-D" },
                chain,
                "-p",
                "tcp",
                port,
                "179",
                "-m",
                "length",
                "--length",
                "70:65535",
                "-j",
                "DROP",
            ],
        )?;
    }
    Ok(())
}

/// Both sides connect: the agent to BIRD's port 179 at once, BIRD to `listen_port` 3 s after
/// (re)starting, while the agent's connection is held in `OpenSent`. RFC 4271 §6.8 collision
/// resolution must keep the same connection on both sides, at the start and after BIRD
/// restarts the session; the session must then stay up. Returns the agent's log.
fn crossing_connections_end_in_one_session(agent_router_id: &str) -> Result<String> {
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    let neighbor = Neighbor {
        connect_to: Some(1179),
        connect_delay: Some(3),
        ..Neighbor::toward_agent(&topo)
    };
    let bird = Bird::start(&topo.client, dir.path(), &neighbor)?;
    let apps = "apps:\n  - name: web\n    vip: 192.0.2.56/32\n";
    let config = agent_config(
        dir.path(),
        &topo,
        &format!("  listen_port: 1179\n  router_id: {agent_router_id}\n"),
        apps,
    )?;
    hold_back_messages_to_port_179(&topo, true)?;
    let agent = start_agent(&topo, dir.path(), &config, "agent.log")?;
    let context = |what: &str| {
        format!(
            "{what}\n--- BIRD ---\n{}\n--- agent ---\n{}",
            bird.log_text(),
            agent.log_text()
        )
    };
    for round in 1..=2 {
        if round > 1 {
            hold_back_messages_to_port_179(&topo, true)?;
            bird.birdc(&["restart", "agent"])?;
        }
        wait_until("a collision at the agent", Duration::from_secs(15), || {
            Ok(agent.log_text().matches("connection collision").count() >= round)
        })
        .with_context(|| context(&format!("round {round}")))?;
        hold_back_messages_to_port_179(&topo, false)?;
        wait_until("Established", Duration::from_secs(20), || {
            Ok(bird.established()? && agent_peer(&topo)?["state"] == "Established")
        })
        .with_context(|| context(&format!("round {round}")))?;
        wait_until("route at BIRD", Duration::from_secs(10), || {
            Ok(!bird.route("192.0.2.56/32")?.is_empty())
        })
        .with_context(|| context("route"))?;
    }
    let since = bird.since()?;
    std::thread::sleep(Duration::from_secs(10));
    ensure!(
        bird.established()? && bird.since()?.same_session(&since),
        "{}",
        context(&format!("session reset: {}", bird.session_state()?))
    );
    let peer = agent_peer(&topo)?;
    ensure!(peer["state"] == "Established", "{peer}");
    Ok(agent.log_text())
}

#[test]
fn crossing_connections_keep_birds_when_birds_router_id_is_higher() -> Result<()> {
    require_privileged!();
    // Our router id below BIRD's (198.18.x.y).
    let log = crossing_connections_end_in_one_session("198.18.0.0")?;
    ensure!(
        log.contains("keeping the peer's connection") && !log.contains("keeping our connection"),
        "{log}"
    );
    Ok(())
}

#[test]
fn crossing_connections_keep_the_agents_when_its_router_id_is_higher() -> Result<()> {
    require_privileged!();
    let log = crossing_connections_end_in_one_session("198.19.255.254")?;
    ensure!(
        log.contains("keeping our connection") && !log.contains("keeping the peer's connection"),
        "{log}"
    );
    Ok(())
}

/// The `BGP.<attribute>:` line of `birdc show route all`, without its name ("" when absent).
fn bird_attribute<'a>(route: &'a str, attribute: &str) -> &'a str {
    let key = format!("BGP.{attribute}:");
    route
        .lines()
        .find_map(|l| l.trim().strip_prefix(key.as_str()))
        .unwrap_or_default()
        .trim()
}

/// Checks one route of the agent's `/peers/{addr}/routes` against BIRD's copy: next hop, AS
/// path, and exactly the same standard and large communities.
fn same_route_at_bird(bird: &Bird, sent: &serde_json::Value) -> Result<()> {
    let prefix = sent["prefix"].as_str().context("prefix")?;
    let at_bird = bird.route(prefix)?;
    let strings = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect()
    };
    ensure!(
        bird_attribute(&at_bird, "next_hop").starts_with(sent["next_hop"].as_str().unwrap_or("?")),
        "next hop {} of {prefix} at BIRD:\n{at_bird}",
        sent["next_hop"]
    );
    let path: Vec<String> = sent["as_path"]
        .as_array()
        .into_iter()
        .flatten()
        .map(ToString::to_string)
        .collect();
    ensure!(
        bird_attribute(&at_bird, "as_path") == path.join(" "),
        "AS path {path:?} of {prefix} at BIRD:\n{at_bird}"
    );
    // BIRD writes 65001:7 as (65001,7) and 65001:7:7 as (65001, 7, 7).
    for (attribute, key, separator) in [
        ("community", "communities", ","),
        ("large_community", "large_communities", ", "),
    ] {
        let ours = strings(&sent[key]);
        let theirs = bird_attribute(&at_bird, attribute);
        ensure!(
            theirs.matches('(').count() == ours.len()
                && ours
                    .iter()
                    .all(|c| theirs.contains(&format!("({})", c.replace(':', separator)))),
            "{key} {ours:?} of {prefix}, BIRD has {theirs:?}:\n{at_bird}"
        );
    }
    Ok(())
}

#[test]
fn the_routes_view_shows_what_bird_received_and_follows_a_withdrawal() -> Result<()> {
    require_privileged!();
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    let bird = Bird::start(&topo.client, dir.path(), &Neighbor::toward_agent(&topo))?;
    let (v4, v6) = ("192.0.2.57/32", "2001:db8:ff00::57/128");
    let apps = web_apps_with_communities(v4, v6);
    let config = agent_config(dir.path(), &topo, COMMUNITIES, &apps)?;
    let mut service = Service::http(&topo.agent, 8090, dir.path())?;
    let _agent = start_agent(&topo, dir.path(), &config, "agent.log")?;
    wait_until("both routes at BIRD", Duration::from_secs(5), || {
        Ok(!bird.route(v4)?.is_empty() && !bird.route(v6)?.is_empty())
    })?;

    let url = format!("http://{API}/peers/{}/routes", topo.client_ip);
    let (status, view) = topo.agent.http_get(&url)?;
    ensure!(status == 200, "{url}: {status} {view}");
    ensure!(
        view["state"] == "Established" && view["asn"] == 65000,
        "{view}"
    );
    let routes = view["routes"].as_array().context("routes")?;
    let prefixes: Vec<&str> = routes.iter().filter_map(|r| r["prefix"].as_str()).collect();
    ensure!(prefixes == [v4, v6], "{view}");
    for route in routes {
        same_route_at_bird(&bird, route)?;
        ensure!(
            route["origin"] == "igp" && route["sent_at"].is_string(),
            "{route}"
        );
    }

    // The CLI prints the same: a table, and the API's JSON.
    let (ok, table) = gocast_cli(&topo, &["routes", "--peer", &topo.client_ip])?;
    ensure!(
        ok && table.contains(v4) && table.contains(v6) && table.contains("65001:7:7"),
        "gocast routes:\n{table}"
    );
    let (ok, json) = gocast_cli(&topo, &["routes", "--json"])?;
    let all: serde_json::Value = serde_json::from_str(&json).with_context(|| json.clone())?;
    ensure!(
        ok && all[0]["routes"] == view["routes"],
        "gocast routes --json:\n{json}"
    );

    service.stop();
    wait_until("withdrawn at BIRD", Duration::from_secs(3), || {
        Ok(bird.route(v4)?.is_empty() && bird.route(v6)?.is_empty())
    })?;
    let (_, view) = topo.agent.http_get(&url)?;
    ensure!(
        view["routes"] == serde_json::json!([]),
        "after the withdrawal: {view}"
    );

    let (status, body) = topo
        .agent
        .http_get(&format!("http://{API}/peers/198.18.255.255/routes"))?;
    ensure!(status == 404, "unknown peer: {status} {body}");
    Ok(())
}

/// Runs the agent's CLI against its API in the agent's namespace: success and the output.
fn gocast_cli(topo: &Topology, args: &[&str]) -> Result<(bool, String)> {
    let out = topo
        .agent
        .command(
            gocast_tests::agent_binary()?
                .to_str()
                .context("binary path")?,
        )
        .args(args)
        .args(["--addr", API])
        .output()
        .context("running the gocast CLI")?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text += &String::from_utf8_lossy(&out.stderr);
    Ok((out.status.success(), text))
}
