//! Live reload of the `bgp:` section (the config file edited, then SIGHUP) and supervision of
//! session tasks, against real BIRD 2 peers in network namespaces: new route attributes go out
//! as UPDATEs on the running session; a peer added or removed comes or goes alone; a changed
//! session parameter resets that peer alone; a session task that panics is restarted and the
//! route comes back.
//!
//! "Untouched" is checked at the router (BIRD's `Since` time of the session, in milliseconds,
//! is unchanged) and at the agent (`gocast_bgp_sessions_established_total` is unchanged).

use std::{fmt::Write as _, path::Path, time::Duration};

use anyhow::{Context, Result, ensure};
use gocast_tests::{
    Agent, Netns, RouterLink, Topology, agent_binary, require_privileged,
    routers::{API, Bird, Neighbor, agent_peer, start_agent, wait_until},
    sh,
};

/// The VIP every scenario announces (an app without monitor: always healthy).
const VIP: &str = "192.0.2.60/32";

/// One entry of the agent's `bgp.peers`.
struct PeerSpec<'a> {
    ip: &'a str,
    hold_time: u32,
    med: Option<u32>,
}

impl<'a> PeerSpec<'a> {
    fn new(ip: &'a str) -> Self {
        Self {
            ip,
            hold_time: 90,
            med: None,
        }
    }
}

/// Writes the agent's config to `dir/config.yaml`: AS 65001 with `communities` on every
/// announcement, `peers` (AS 65000), and the one app on [`VIP`]. Returns its path.
fn write_config(dir: &Path, communities: &str, peers: &[PeerSpec<'_>]) -> Result<String> {
    let path = dir.join("config.yaml");
    let mut text = format!(
        "agent:\n  listen_addr: {API}\n  monitor_interval: 100ms\n  cleanup_timer: 1s\n  state_file: {state}\n\
         bgp:\n  local_as: 65001\n  communities: [{communities}]\n  peers:\n",
        state = dir.join("state.json").display(),
    );
    for p in peers {
        write!(
            text,
            "    - peer_ip: {}\n      peer_as: 65000\n      hold_time: {}\n",
            p.ip, p.hold_time
        )?;
        if let Some(med) = p.med {
            writeln!(text, "      med: {med}")?;
        }
    }
    writeln!(text, "apps:\n  - name: web\n    vip: {VIP}")?;
    std::fs::write(&path, text)?;
    Ok(path.to_string_lossy().into_owned())
}

/// Sends SIGHUP and waits until the agent logs that it applied the file.
fn reload(agent: &mut Agent) -> Result<()> {
    let done = |agent: &Agent| agent.log_text().matches("bgp section reloaded").count();
    let before = done(agent);
    let pid = agent.pid().context("agent pid")?;
    sh("kill", &["-HUP", &pid.to_string()])?;
    agent.wait_for("the reload", Duration::from_secs(5), |a| {
        Ok(done(a) > before)
    })
}

/// The hold time BIRD negotiated (`Hold timer: 12.345/90` → 90).
fn negotiated_hold_time(bird: &Bird) -> Result<String> {
    let out = bird.birdc(&["show", "protocols", "all", "agent"])?;
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with("Hold timer:"))
        .with_context(|| format!("no hold timer:\n{out}"))?;
    Ok(line
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned())
}

/// A counter of the agent's `/metrics`, e.g.
/// `gocast_bgp_sessions_established_total{peer="x"}`; 0 when absent.
fn metric(ns: &Netns, series: &str) -> Result<u64> {
    let (status, body) = ns.http_get(&format!("http://{API}/metrics"))?;
    ensure!(status == 200, "/metrics: {status}");
    let text = body.as_str().context("/metrics is text")?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0))
}

fn established_count(topo: &Topology, peer: &str) -> Result<u64> {
    metric(
        &topo.agent,
        &format!("gocast_bgp_sessions_established_total{{peer=\"{peer}\"}}"),
    )
}

/// The agent's peers as `/info` lists them.
fn info_peers(topo: &Topology) -> Result<Vec<serde_json::Value>> {
    let (status, info) = topo.agent.http_get(&format!("http://{API}/info"))?;
    ensure!(status == 200, "/info: {status} {info}");
    Ok(info["peers"].as_array().cloned().unwrap_or_default())
}

fn context(birds: &[&Bird], agent: &Agent) -> String {
    let mut s = String::new();
    for bird in birds {
        let _ = write!(
            s,
            "---- bird ----\n{}\n{}\n",
            bird.birdc(&["show", "protocols", "all", "agent"])
                .unwrap_or_default(),
            bird.log_text()
        );
    }
    s + &agent.log_text()
}

/// BIRD in the router namespace of `link`, its files in `dir`.
fn bird_on(link: &RouterLink, topo: &Topology, dir: &Path) -> Result<Bird> {
    std::fs::create_dir_all(dir)?;
    let neighbor = Neighbor {
        local: link.router_ip.clone(),
        agent: link.agent_ip.clone(),
        ..Neighbor::toward_agent(topo)
    };
    Bird::start(&link.ns, dir, &neighbor)
}

#[test]
fn new_communities_and_med_go_out_as_updates_without_resetting_the_session() -> Result<()> {
    require_privileged!();
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    let bird = Bird::start(&topo.client, dir.path(), &Neighbor::toward_agent(&topo))?;
    let config = write_config(dir.path(), "'65001:100'", &[PeerSpec::new(&topo.client_ip)])?;
    let mut agent = start_agent(&topo, dir.path(), &config, "agent.log")?;
    wait_until("the route at BIRD", Duration::from_secs(5), || {
        Ok(bird.route(VIP)?.contains("(65001,100)"))
    })
    .with_context(|| context(&[&bird], &agent))?;
    let up_since = bird.since()?;
    let established = established_count(&topo, &topo.client_ip)?;
    ensure!(established == 1, "established {established} times");

    let peer = PeerSpec {
        med: Some(50),
        ..PeerSpec::new(&topo.client_ip)
    };
    write_config(dir.path(), "'65001:200', '65001:3:4'", &[peer])?;
    reload(&mut agent)?;
    wait_until("the new attributes at BIRD", Duration::from_secs(5), || {
        let route = bird.route(VIP)?;
        Ok(route.contains("(65001,200)")
            && !route.contains("(65001,100)")
            && route.contains("(65001, 3, 4)")
            && route.contains("BGP.med: 50"))
    })
    .with_context(|| context(&[&bird], &agent))?;
    ensure!(bird.established()?, "{}", context(&[&bird], &agent));
    ensure!(
        bird.since()?.same_session(&up_since),
        "BIRD's session was reset: {}",
        context(&[&bird], &agent)
    );
    ensure!(established_count(&topo, &topo.client_ip)? == 1);
    ensure!(
        agent.log_text().contains("updated [") && agent.log_text().contains("communities, med"),
        "{}",
        agent.log_text()
    );
    Ok(())
}

#[test]
fn a_peer_added_by_reload_comes_up_and_a_removed_one_is_closed_and_loses_the_routes() -> Result<()>
{
    require_privileged!();
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    let second = topo.add_router("r2")?;
    let bird = Bird::start(&topo.client, dir.path(), &Neighbor::toward_agent(&topo))?;
    let bird2 = bird_on(&second, &topo, &dir.path().join("r2"))?;
    let first_only = [PeerSpec::new(&topo.client_ip)];
    let config = write_config(dir.path(), "'65001:100'", &first_only)?;
    let mut agent = start_agent(&topo, dir.path(), &config, "agent.log")?;
    wait_until(
        "the route at the first BIRD",
        Duration::from_secs(5),
        || Ok(!bird.route(VIP)?.is_empty()),
    )
    .with_context(|| context(&[&bird], &agent))?;
    let up_since = bird.since()?;

    write_config(
        dir.path(),
        "'65001:100'",
        &[
            PeerSpec::new(&topo.client_ip),
            PeerSpec::new(&second.router_ip),
        ],
    )?;
    reload(&mut agent)?;
    wait_until(
        "the route at the added BIRD",
        Duration::from_secs(10),
        || Ok(bird2.established()? && !bird2.route(VIP)?.is_empty()),
    )
    .with_context(|| context(&[&bird, &bird2], &agent))?;
    let route = bird2.route(VIP)?;
    ensure!(
        route.contains(&format!("BGP.next_hop: {}", second.agent_ip)),
        "next hop on the new session:\n{route}"
    );
    ensure!(info_peers(&topo)?.len() == 2, "{:?}", info_peers(&topo)?);
    ensure!(
        bird.since()?.same_session(&up_since),
        "the first session was touched: {}",
        context(&[&bird, &bird2], &agent)
    );

    write_config(dir.path(), "'65001:100'", &first_only)?;
    reload(&mut agent)?;
    wait_until(
        "the removed session closed, its route gone",
        Duration::from_secs(5),
        || Ok(!bird2.established()? && bird2.route(VIP)?.is_empty()),
    )
    .with_context(|| context(&[&bird, &bird2], &agent))?;
    let closed = bird2.birdc(&["show", "protocols", "all", "agent"])?;
    ensure!(
        closed.to_lowercase().contains("peer de-configured"),
        "BIRD saw no Cease 6/3:\n{closed}"
    );
    ensure!(info_peers(&topo)?.len() == 1, "{:?}", info_peers(&topo)?);
    ensure!(bird.established()? && !bird.route(VIP)?.is_empty());
    ensure!(
        bird.since()?.same_session(&up_since),
        "the first session was touched: {}",
        context(&[&bird, &bird2], &agent)
    );
    ensure!(established_count(&topo, &topo.client_ip)? == 1);
    Ok(())
}

#[test]
fn a_changed_hold_time_resets_that_peer_alone() -> Result<()> {
    require_privileged!();
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    let second = topo.add_router("r2")?;
    let bird = Bird::start(&topo.client, dir.path(), &Neighbor::toward_agent(&topo))?;
    let bird2 = bird_on(&second, &topo, &dir.path().join("r2"))?;
    let config = write_config(
        dir.path(),
        "'65001:100'",
        &[
            PeerSpec::new(&topo.client_ip),
            PeerSpec::new(&second.router_ip),
        ],
    )?;
    let mut agent = start_agent(&topo, dir.path(), &config, "agent.log")?;
    wait_until("the route at both BIRDs", Duration::from_secs(10), || {
        Ok(!bird.route(VIP)?.is_empty() && !bird2.route(VIP)?.is_empty())
    })
    .with_context(|| context(&[&bird, &bird2], &agent))?;
    ensure!(negotiated_hold_time(&bird2)? == "90");
    let up_since = bird.since()?;
    let second_established = established_count(&topo, &second.router_ip)?;

    let changed = PeerSpec {
        hold_time: 30,
        ..PeerSpec::new(&second.router_ip)
    };
    write_config(
        dir.path(),
        "'65001:100'",
        &[PeerSpec::new(&topo.client_ip), changed],
    )?;
    reload(&mut agent)?;
    wait_until(
        "the second session back with the new hold time",
        Duration::from_secs(10),
        || {
            Ok(bird2.established()?
                && negotiated_hold_time(&bird2)? == "30"
                && !bird2.route(VIP)?.is_empty())
        },
    )
    .with_context(|| context(&[&bird, &bird2], &agent))?;
    ensure!(
        established_count(&topo, &second.router_ip)? == second_established + 1,
        "the second session was not reset once"
    );
    let peers = info_peers(&topo)?;
    ensure!(
        peers[1]["last_notification"]
            .as_str()
            .is_some_and(|n| n.starts_with("sent") && n.contains("(6/6)")),
        "no Cease 6/6 sent: {peers:?}"
    );
    ensure!(
        bird.since()?.same_session(&up_since) && established_count(&topo, &topo.client_ip)? == 1,
        "the first session was touched: {}",
        context(&[&bird, &bird2], &agent)
    );
    Ok(())
}

#[test]
fn a_session_task_that_panics_is_restarted_and_the_route_comes_back() -> Result<()> {
    require_privileged!();
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    let bird = Bird::start(&topo.client, dir.path(), &Neighbor::toward_agent(&topo))?;
    let config = write_config(dir.path(), "'65001:100'", &[PeerSpec::new(&topo.client_ip)])?;
    // The debug binary's fault hook: this peer's first session task panics once Established.
    let binary = agent_binary()?;
    let agent = Agent::start_with(
        Path::new("env"),
        &topo.agent,
        &[
            &format!("GOCAST_TEST_PANIC_SESSION={}", topo.client_ip),
            binary.to_str().context("binary path")?,
            "run",
            "--config",
            &config,
        ],
        &dir.path().join("agent.log"),
        API,
    )?;
    let restarts = format!(
        "gocast_task_restarts_total{{task=\"bgp_session\",peer=\"{}\"}}",
        topo.client_ip
    );
    wait_until(
        "the session task restarted",
        Duration::from_secs(10),
        || Ok(metric(&topo.agent, &restarts)? == 1),
    )
    .with_context(|| context(&[&bird], &agent))?;
    let log = agent.log_text();
    ensure!(
        log.contains("BGP session task failed") && log.contains("injected panic"),
        "no ERROR with the panic text:\n{log}"
    );
    wait_until(
        "Established again, the route back at BIRD",
        Duration::from_secs(15),
        || Ok(bird.established()? && !bird.route(VIP)?.is_empty()),
    )
    .with_context(|| context(&[&bird], &agent))?;
    let peer = agent_peer(&topo)?;
    ensure!(peer["state"] == "Established", "{peer}");
    ensure!(established_count(&topo, &topo.client_ip)? == 2);
    // Once only: the restarted session stays up.
    std::thread::sleep(Duration::from_secs(2));
    ensure!(metric(&topo.agent, &restarts)? == 1);
    ensure!(bird.established()?, "{}", context(&[&bird], &agent));
    Ok(())
}
