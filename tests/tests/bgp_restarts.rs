//! Sessions that break and come back, against a real BIRD 2: a peer restart gets the whole
//! table again, an agent restart leaves exactly the current routes, a silent peer trips the
//! hold timer and the session returns when it wakes up, and TCP MD5 lets in only the right
//! password.

use std::{collections::BTreeSet, path::Path, time::Duration};

use anyhow::{Context, Result, ensure};
use gocast_tests::{
    Agent, Service, Topology, require_privileged,
    routers::{API, Bird, Neighbor, agent_config, agent_peer, start_agent, wait_until, web_apps},
    sh,
};

/// The prefixes BIRD learned from the agent, from `show route protocol agent`, with a count
/// of route entries (a duplicate or stale path would show up as a second entry).
fn bird_prefixes(bird: &Bird) -> Result<(BTreeSet<String>, usize)> {
    let out = bird.birdc(&["show", "route", "protocol", "agent"])?;
    let mut prefixes = BTreeSet::new();
    let mut entries = 0;
    for line in out.lines() {
        if !line.contains("[agent ") {
            continue;
        }
        entries += 1;
        if !line.starts_with(char::is_whitespace) {
            let prefix = line.split_whitespace().next().unwrap_or_default();
            prefixes.insert(prefix.to_owned());
        }
    }
    Ok((prefixes, entries))
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|&s| s.to_owned()).collect()
}

fn context(bird: &Bird, agent: &Agent) -> String {
    format!(
        "---- bird log ----\n{}\n---- bird protocol ----\n{}\n{}",
        bird.log_text(),
        bird.birdc(&["show", "protocols", "all", "agent"])
            .unwrap_or_default(),
        agent.log_text()
    )
}

/// BIRD expecting the TCP MD5 password `s3cret`, and the agent configured with `password`.
fn start_md5(topo: &Topology, dir: &Path, password: &str) -> Result<(Bird, Agent)> {
    let neighbor = Neighbor {
        password: Some("s3cret".to_owned()),
        ..Neighbor::toward_agent(topo)
    };
    let bird = Bird::start(&topo.client, dir, &neighbor)?;
    let config = agent_config(dir, topo, &format!("  password: {password}\n"), "")?;
    let agent = start_agent(topo, dir, &config, "agent.log")?;
    Ok((bird, agent))
}

#[test]
fn a_restarted_peer_gets_the_session_back_and_the_whole_table_again() -> Result<()> {
    require_privileged!();
    let (v4, v6) = ("192.0.2.90/32", "2001:db8:ff00::90/128");
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    let mut bird = Bird::start(&topo.client, dir.path(), &Neighbor::toward_agent(&topo))?;
    let _service = Service::http(&topo.agent, 8090, dir.path())?;
    let config = agent_config(dir.path(), &topo, "", &web_apps(v4, v6))?;
    let agent = start_agent(&topo, dir.path(), &config, "agent.log")?;

    wait_until("both routes at BIRD", Duration::from_secs(5), || {
        Ok(bird_prefixes(&bird)?.0 == set(&[v4, v6]))
    })
    .with_context(|| context(&bird, &agent))?;

    bird.restart(&topo.client)?;
    // A fresh BIRD process holds nothing: whatever arrives now was sent again. The agent
    // notices the closed connection and reconnects after its ~1 s backoff (a second
    // attempt, if the first hit the restart, waits ~2 s more).
    wait_until("Established again", Duration::from_secs(8), || {
        bird.established()
    })
    .with_context(|| context(&bird, &agent))?;
    wait_until("the whole table re-sent", Duration::from_secs(3), || {
        Ok(bird_prefixes(&bird)? == (set(&[v4, v6]), 2))
    })
    .with_context(|| context(&bird, &agent))?;
    let route = bird.route(v4)?;
    ensure!(
        route.contains(&format!("BGP.next_hop: {}", topo.agent_ip)),
        "next hop after the restart:\n{route}"
    );
    let peer = agent_peer(&topo)?;
    ensure!(
        peer["state"] == "Established" && peer["prefixes_advertised"] == 2,
        "{peer}"
    );
    Ok(())
}

#[test]
fn a_restarted_agent_announces_exactly_its_current_routes_and_nothing_stale() -> Result<()> {
    require_privileged!();
    let (v4, v6) = ("192.0.2.91/32", "2001:db8:ff00::91/128");
    let (kept, gone) = ("192.0.2.92/32", "192.0.2.93/32");
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    let bird = Bird::start(&topo.client, dir.path(), &Neighbor::toward_agent(&topo))?;
    let _service = Service::http(&topo.agent, 8090, dir.path())?;
    let config = agent_config(dir.path(), &topo, "", &web_apps(v4, v6))?;
    let mut agent = start_agent(&topo, dir.path(), &config, "first.log")?;

    // Two HTTP registrations beside the config apps; one is unregistered before the restart.
    for (name, vip) in [("kept", kept), ("gone", gone)] {
        let (status, body) = topo.agent.http_get(&format!(
            "http://{API}/register?name={name}&vip={vip}&monitor=port:tcp:8090"
        ))?;
        ensure!(status == 200, "register {name}: {status} {body}");
    }
    wait_until("four routes at BIRD", Duration::from_secs(5), || {
        Ok(bird_prefixes(&bird)? == (set(&[v4, v6, kept, gone]), 4))
    })
    .with_context(|| context(&bird, &agent))?;
    let (status, body) = topo
        .agent
        .http_get(&format!("http://{API}/unregister?name=gone"))?;
    ensure!(status == 200, "unregister: {status} {body}");
    wait_until(
        "the unregistered route withdrawn",
        Duration::from_secs(3),
        || Ok(bird_prefixes(&bird)? == (set(&[v4, v6, kept]), 3)),
    )
    .with_context(|| context(&bird, &agent))?;

    let (status, elapsed) = agent.signal_and_wait("TERM", Duration::from_secs(5))?;
    ensure!(status.success(), "{status} after {elapsed:?}");
    wait_until(
        "BIRD dropped the agent's routes",
        Duration::from_secs(3),
        || Ok(bird_prefixes(&bird)?.1 == 0),
    )
    .with_context(|| context(&bird, &agent))?;

    let agent = start_agent(&topo, dir.path(), &config, "second.log")?;
    wait_until("Established again", Duration::from_secs(5), || {
        bird.established()
    })
    .with_context(|| context(&bird, &agent))?;
    let expected = (set(&[v4, v6, kept]), 3);
    wait_until("the current routes at BIRD", Duration::from_secs(5), || {
        Ok(bird_prefixes(&bird)? == expected)
    })
    .with_context(|| {
        format!(
            "BIRD holds {:?}\n{}",
            bird_prefixes(&bird).ok(),
            context(&bird, &agent)
        )
    })?;
    // And it stays that way: nothing trickles in after the table is complete.
    std::thread::sleep(Duration::from_millis(500));
    let now = bird_prefixes(&bird)?;
    ensure!(now == expected, "BIRD holds {now:?}, expected {expected:?}");
    let peer = agent_peer(&topo)?;
    ensure!(peer["prefixes_advertised"] == 3, "{peer}");
    Ok(())
}

#[test]
fn a_silent_peer_trips_the_hold_timer_and_the_session_returns_when_it_wakes_up() -> Result<()> {
    require_privileged!();
    let (v4, v6) = ("192.0.2.94/32", "2001:db8:ff00::94/128");
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    let bird = Bird::start(
        &topo.client,
        dir.path(),
        &Neighbor {
            hold_time: Some(3),
            ..Neighbor::toward_agent(&topo)
        },
    )?;
    let _service = Service::http(&topo.agent, 8090, dir.path())?;
    let config = agent_config(dir.path(), &topo, "  hold_time: 3\n", &web_apps(v4, v6))?;
    let agent = start_agent(&topo, dir.path(), &config, "agent.log")?;
    wait_until("routes at BIRD", Duration::from_secs(5), || {
        Ok(bird_prefixes(&bird)?.0 == set(&[v4, v6]))
    })
    .with_context(|| context(&bird, &agent))?;
    let proto = bird.birdc(&["show", "protocols", "all", "agent"])?;
    ensure!(proto.contains("Hold timer:"), "{proto}");

    let pid = bird.pid().context("bird pid")?.to_string();
    sh("kill", &["-STOP", &pid])?;
    // Nothing between STOP and CONT may return early: a stopped BIRD would hang `birdc`.
    let tripped = wait_until(
        "the agent's hold timer to expire",
        Duration::from_secs(5),
        || {
            let peer = agent_peer(&topo)?;
            Ok(peer["state"] != "Established"
                && peer["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("hold timer")))
        },
    );
    let peer = agent_peer(&topo);
    sh("kill", &["-CONT", &pid])?;
    let elapsed = tripped.with_context(|| format!("peer {peer:?}\n{}", agent.log_text()))?;
    ensure!(
        elapsed <= Duration::from_secs(5),
        "expired after {elapsed:?}"
    );

    wait_until("Established again", Duration::from_secs(10), || {
        Ok(agent_peer(&topo)?["state"] == "Established" && bird.established()?)
    })
    .with_context(|| context(&bird, &agent))?;
    wait_until("routes back at BIRD", Duration::from_secs(3), || {
        Ok(bird_prefixes(&bird)? == (set(&[v4, v6]), 2))
    })
    .with_context(|| context(&bird, &agent))?;
    Ok(())
}

#[test]
fn tcp_md5_with_the_right_password_establishes() -> Result<()> {
    require_privileged!();
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    let (bird, agent) = start_md5(&topo, dir.path(), "s3cret")?;
    wait_until("Established with MD5", Duration::from_secs(5), || {
        bird.established()
    })
    .with_context(|| context(&bird, &agent))?;
    ensure!(
        agent_peer(&topo)?["state"] == "Established",
        "{}",
        agent_peer(&topo)?
    );
    Ok(())
}

#[test]
fn tcp_md5_with_a_wrong_password_never_establishes() -> Result<()> {
    require_privileged!();
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    let (bird, agent) = start_md5(&topo, dir.path(), "wrong")?;
    let result = wait_until(
        "Established with a wrong password",
        Duration::from_secs(3),
        || Ok(bird.established()? || agent_peer(&topo)?["state"] == "Established"),
    );
    ensure!(
        result.is_err(),
        "a wrong MD5 password established a session\n{}",
        context(&bird, &agent)
    );
    let peer = agent_peer(&topo)?;
    ensure!(peer["state"] != "Established", "{peer}");
    Ok(())
}
