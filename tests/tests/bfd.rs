//! BFD (RFC 5880/5881/5882) between the agent and real routers in network namespaces, BIRD 2
//! and FRR 8: the session comes up over IPv4 and IPv6; a host that goes silent without closing
//! TCP loses its routes within the detection time instead of the 90 s hold time, and gets them
//! back when it returns; a router whose BFD stops is seen down by the agent; SIGTERM is an
//! administrative shutdown to BIRD, not a BFD failure; hostile BFD packets change nothing; new
//! timers by reload do not reset BGP.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use gocast_tests::{
    Agent, Service, Topology, require_privileged,
    routers::{API, Bird, Neighbor, agent_config, agent_peer, start_agent, wait_until, web_apps},
    sh,
};

const V4: &str = "192.0.2.60/32";
const V6: &str = "2001:db8:ff00::60/128";
/// Long enough for BFD's slow start (1 s packets until Up) and BIRD's `error wait time`.
const COME_UP: Duration = Duration::from_secs(20);

/// BIRD with BFD toward the agent, the agent with `bfd: true` and a healthy service behind
/// both VIPs, routes at BIRD.
struct Setup {
    dir: tempfile::TempDir,
    topo: Topology,
    bird: Bird,
    _service: Service,
    agent: Agent,
}

fn setup() -> Result<Setup> {
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    let bird = Bird::start_with_bfd(&topo.client, dir.path(), &Neighbor::toward_agent(&topo))?;
    let service = Service::http(&topo.agent, 8090, dir.path())?;
    let config = agent_config(
        dir.path(),
        &topo,
        "  hold_time: 90\n  bfd: true\n",
        &web_apps(V4, V6),
    )?;
    let agent = start_agent(&topo, dir.path(), &config, "agent.log")?;
    let s = Setup {
        dir,
        topo,
        bird,
        _service: service,
        agent,
    };
    s.routes_at_bird(true, COME_UP)?;
    Ok(s)
}

impl Setup {
    fn routes_at_bird(&self, present: bool, limit: Duration) -> Result<Duration> {
        let what = if present {
            "routes at BIRD"
        } else {
            "routes gone at BIRD"
        };
        wait_until(what, limit, || {
            Ok(self.bird.route(V4)?.is_empty() != present
                && self.bird.route(V6)?.is_empty() != present)
        })
        .with_context(|| self.context())
    }

    fn context(&self) -> String {
        format!(
            "{}\n---- bird log ----\n{}\n---- bird bfd ----\n{}",
            self.agent.log_text(),
            self.bird.log_text(),
            self.bird
                .birdc(&["show", "bfd", "sessions"])
                .unwrap_or_default()
        )
    }

    fn agent_bfd_state(&self) -> Result<String> {
        let peer = agent_peer(&self.topo)?;
        Ok(peer["bfd"]["state"].as_str().unwrap_or("none").to_owned())
    }

    fn bird_bfd_up(&self) -> Result<bool> {
        Ok(self.bird.bfd_state(&self.topo.agent_ip)?.as_deref() == Some("Up"))
    }

    fn metrics(&self) -> Result<String> {
        let (_, m) = self.topo.agent.http_get(&format!("http://{API}/metrics"))?;
        Ok(m.as_str().unwrap_or_default().to_owned())
    }
}

#[test]
fn bfd_comes_up_with_bird_over_ipv4_and_shows_in_info_and_metrics() -> Result<()> {
    require_privileged!();
    let s = setup()?;
    wait_until("BFD Up at BIRD", COME_UP, || s.bird_bfd_up())?;
    let peer = agent_peer(&s.topo)?;
    let bfd = &peer["bfd"];
    ensure!(bfd["state"] == "up", "{peer}");
    ensure!(bfd["multiplier"] == 3 && bfd["min_tx_ms"] == 300, "{peer}");
    // BIRD asks for 300 ms too: 3 × 300 ms once the poll sequence is over.
    wait_until("agreed detection time", COME_UP, || {
        Ok(agent_peer(&s.topo)?["bfd"]["detection_time_ms"] == 900)
    })?;
    let metrics = s.metrics()?;
    ensure!(
        metrics.contains(&format!(
            "gocast_bfd_session_up{{peer=\"{}\"}} 1",
            s.topo.client_ip
        )),
        "{metrics}"
    );
    Ok(())
}

#[test]
fn bfd_comes_up_with_bird_over_ipv6() -> Result<()> {
    require_privileged!();
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    let neighbor = Neighbor {
        local: topo.client_ip6.clone(),
        agent: topo.agent_ip6.clone(),
        ..Neighbor::toward_agent(&topo)
    };
    let bird = Bird::start_with_bfd(&topo.client, dir.path(), &neighbor)?;
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "agent:\n  listen_addr: {API}\n  state_file: {state}\n\
             bgp:\n  local_as: 65001\n  remote_as: 65000\n  peer_ip: {peer}\n  router_id: 192.0.2.1\n  bfd: true\n",
            state = dir.path().join("state.json").display(),
            peer = topo.client_ip6,
        ),
    )?;
    let agent = start_agent(
        &topo,
        dir.path(),
        config.to_str().context("path")?,
        "agent.log",
    )?;
    wait_until("BFD Up over IPv6 at BIRD", COME_UP, || {
        Ok(bird.bfd_state(&topo.agent_ip6)?.as_deref() == Some("Up"))
    })
    .with_context(|| format!("{}\n{}", agent.log_text(), bird.log_text()))?;
    wait_until("Established over IPv6", COME_UP, || bird.established())?;
    ensure!(agent_peer(&topo)?["bfd"]["state"] == "up");
    Ok(())
}

/// The headline: SIGSTOP freezes the agent (the kernel still acknowledges TCP, so BGP alone
/// would wait out the 90 s hold time); BIRD withdraws within BFD's detection time.
#[test]
fn a_silent_host_loses_its_routes_within_the_detection_time_and_gets_them_back() -> Result<()> {
    require_privileged!();
    let s = setup()?;
    let pid = s.agent.pid().context("agent pid")?.to_string();
    sh("kill", &["-STOP", &pid])?;
    let stopped = Instant::now();
    let gone = s.routes_at_bird(false, Duration::from_secs(30));
    let took = stopped.elapsed();
    sh("kill", &["-CONT", &pid])?;
    gone?;
    eprintln!("host silent -> routes gone at BIRD: {took:?} (hold time 90 s)");
    ensure!(
        took < Duration::from_secs(10),
        "withdrawn after {took:?}: BFD did not act"
    );
    ensure!(
        s.bird
            .birdc(&["show", "protocols", "all", "agent"])?
            .contains("BFD session down"),
        "BIRD took the session down for BFD"
    );
    // Back: BFD comes up again, then BGP (strict), then the routes.
    s.routes_at_bird(true, Duration::from_secs(40))?;
    ensure!(s.agent_bfd_state()? == "up");
    Ok(())
}

/// The router freezes (BFD and BGP both): the agent's BFD goes down within the detection
/// time, the BGP session is dropped with BFD as the cause, and both return with the router.
#[test]
fn the_agent_sees_the_routers_bfd_stop_and_reconnects_when_it_returns() -> Result<()> {
    require_privileged!();
    let s = setup()?;
    wait_until("agreed timers", COME_UP, || {
        Ok(agent_peer(&s.topo)?["bfd"]["detection_time_ms"] == 900)
    })?;
    let pid = s.bird.pid().context("bird pid")?.to_string();
    sh("kill", &["-STOP", &pid])?;
    let stopped = Instant::now();
    let down = wait_until("agent's BFD down", Duration::from_secs(10), || {
        Ok(s.agent_bfd_state()? == "down")
    });
    let took = stopped.elapsed();
    let peer = agent_peer(&s.topo);
    sh("kill", &["-CONT", &pid])?;
    down.with_context(|| s.context())?;
    eprintln!("router silent -> agent's BFD down: {took:?}");
    let peer = peer?;
    ensure!(
        peer["bfd"]["last_down"] == "control detection time expired (1)",
        "{peer}"
    );
    ensure!(
        peer["state"] != "Established"
            && peer["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("BFD session down")),
        "BGP dropped with BFD as the cause: {peer}"
    );
    s.routes_at_bird(true, Duration::from_secs(40))?;
    ensure!(s.metrics()?.contains("gocast_bfd_state_transitions_total"));
    Ok(())
}

#[test]
fn sigterm_is_an_administrative_shutdown_at_bird_not_a_bfd_failure() -> Result<()> {
    require_privileged!();
    let mut s = setup()?;
    wait_until("BFD Up at BIRD", COME_UP, || s.bird_bfd_up())?;
    let (status, _) = s.agent.signal_and_wait("TERM", Duration::from_secs(10))?;
    ensure!(status.success(), "{status}");
    let protocol = s.bird.birdc(&["show", "protocols", "all", "agent"])?;
    ensure!(
        protocol.contains("Administrative shutdown"),
        "BIRD saw the Cease:\n{protocol}"
    );
    ensure!(
        !protocol.contains("BFD session down"),
        "BIRD took our AdminDown for a failure:\n{protocol}\n{}",
        s.bird.log_text()
    );
    Ok(())
}

/// Bad packets from the router's namespace (a TTL below 255, bad lengths, zero and unknown
/// discriminators, random bytes) are dropped and counted; the session stays Up.
#[test]
fn hostile_bfd_packets_are_dropped_counted_and_change_nothing() -> Result<()> {
    require_privileged!();
    let s = setup()?;
    wait_until("agent BFD up", COME_UP, || Ok(s.agent_bfd_state()? == "up"))?;
    let script = format!(
        r#"
import os, socket, struct
to = ("{agent}", 3784)
def send(data, ttl=255):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
    s.bind(("{router}", 0))
    s.sendto(data, to)
def pkt(state=3, mult=3, length=24, my=7, your=9):
    return struct.pack("!BBBBIIIII", 0x20, state << 6, mult, length, my, your, 300000, 300000, 0)
send(pkt(), ttl=64)
send(pkt(length=20))
send(pkt(my=0))
send(pkt(your=0))
send(pkt(mult=0))
send(pkt()[:10])
for _ in range(50):
    send(os.urandom(24 + os.urandom(1)[0] % 40))
"#,
        agent = s.topo.agent_ip,
        router = s.topo.client_ip,
    );
    s.topo.client.run("python3", &["-c", &script])?;
    let counted = |reason: &str, m: &str| {
        m.lines().any(|l| {
            l.starts_with("gocast_bfd_packets_dropped_total{")
                && l.contains(&format!("reason=\"{reason}\""))
                && !l.ends_with(" 0")
        })
    };
    wait_until("drops counted", Duration::from_secs(10), || {
        let m = s.metrics()?;
        Ok([
            "ttl",
            "length",
            "my_discriminator",
            "your_discriminator",
            "detect_mult",
        ]
        .iter()
        .all(|r| counted(r, &m)))
    })
    .with_context(|| s.metrics().unwrap_or_default())?;
    ensure!(s.agent_bfd_state()? == "up", "no state change");
    ensure!(s.bird_bfd_up()?);
    ensure!(s.bird.established()?);
    Ok(())
}

/// A reload with new BFD timers changes the running BFD session (a poll sequence) and leaves
/// the BGP session as it was.
#[test]
fn new_bfd_timers_by_reload_apply_without_resetting_bgp() -> Result<()> {
    require_privileged!();
    let mut s = setup()?;
    wait_until("agreed timers", COME_UP, || {
        Ok(agent_peer(&s.topo)?["bfd"]["detection_time_ms"] == 900)
    })?;
    let since = s.bird.since()?;
    agent_config(
        s.dir.path(),
        &s.topo,
        "  hold_time: 90\n  bfd: {min_tx: 300ms, min_rx: 500ms}\n",
        &web_apps(V4, V6),
    )?;
    let done = |a: &Agent| a.log_text().matches("bgp section reloaded").count();
    let before = done(&s.agent);
    let pid = s.agent.pid().context("agent pid")?;
    sh("kill", &["-HUP", &pid.to_string()])?;
    s.agent
        .wait_for("the reload", Duration::from_secs(5), |a| {
            Ok(done(a) > before)
        })?;
    // BIRD sends every 300 ms; we now accept no faster than 500 ms: 3 × 500 ms.
    wait_until("the new detection time", Duration::from_secs(10), || {
        Ok(agent_peer(&s.topo)?["bfd"]["detection_time_ms"] == 1500)
    })
    .with_context(|| s.context())?;
    ensure!(s.bird_bfd_up()?, "BFD stayed up");
    ensure!(
        s.bird.since()?.same_session(&since),
        "the BGP session was reset"
    );
    Ok(())
}

/// FRR (`bgpd` + `bfdd` through `zebra`): BFD comes up, and a silent host loses its routes
/// within the detection time.
#[test]
fn frr_runs_bfd_with_the_agent_and_withdraws_a_silent_host() -> Result<()> {
    use gocast_tests::routers::{Frr, Router};
    require_privileged!();
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    let frr = Frr::start_with_bfd(&topo.client, dir.path(), &Neighbor::toward_agent(&topo))?;
    let _service = Service::http(&topo.agent, 8090, dir.path())?;
    let config = agent_config(
        dir.path(),
        &topo,
        "  hold_time: 90\n  bfd: true\n",
        &web_apps(V4, V6),
    )?;
    let agent = start_agent(&topo, dir.path(), &config, "agent.log")?;
    wait_until("BFD up at FRR", COME_UP, || {
        Ok(frr.bfd_status(&topo.agent_ip)?.as_deref() == Some("up"))
    })
    .with_context(|| frr.context(&agent))?;
    wait_until("routes at FRR", COME_UP, || {
        Ok(frr.has_route(V4)? && frr.has_route(V6)?)
    })
    .with_context(|| frr.context(&agent))?;
    ensure!(agent_peer(&topo)?["bfd"]["state"] == "up");
    let pid = agent.pid().context("agent pid")?.to_string();
    sh("kill", &["-STOP", &pid])?;
    let stopped = Instant::now();
    let gone = wait_until("routes gone at FRR", Duration::from_secs(30), || {
        Ok(!frr.has_route(V4)? && !frr.has_route(V6)?)
    });
    let took = stopped.elapsed();
    sh("kill", &["-CONT", &pid])?;
    gone.with_context(|| frr.context(&agent))?;
    eprintln!("host silent -> routes gone at FRR: {took:?} (hold time 90 s)");
    ensure!(took < Duration::from_secs(10), "withdrawn after {took:?}");
    wait_until("routes back at FRR", Duration::from_secs(60), || {
        Ok(frr.has_route(V4)? && frr.has_route(V6)?)
    })
    .with_context(|| frr.context(&agent))?;
    Ok(())
}
