//! Safe VIPs (docs/security.md): a VIP equal to or covering the BGP peer's address, the link
//! or an address of the agent's own interfaces is refused with 409 and a clear reason; nothing
//! reaches `lo`, `/apps` stays as it was, and the session with BIRD stays Established.

use std::{net::Ipv4Addr, time::Duration};

use anyhow::{Result, ensure};
use gocast_tests::{
    Topology, require_privileged,
    routers::{API, Bird, Neighbor, agent_config, start_agent, wait_until},
};
use serde_json::Value;

/// The agent's `/apps`, as JSON.
fn apps(topo: &Topology) -> Result<Value> {
    let (status, apps) = topo.agent.http_get(&format!("http://{API}/apps"))?;
    ensure!(status == 200, "/apps: {status} {apps}");
    Ok(apps)
}

#[test]
fn a_vip_covering_the_peer_or_the_link_is_refused_and_the_session_stays_established() -> Result<()>
{
    require_privileged!();
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    let bird = Bird::start(&topo.client, dir.path(), &Neighbor::toward_agent(&topo))?;
    let apps_section = "apps:\n  - name: web\n    vip: 192.0.2.60/32\n";
    let config = agent_config(dir.path(), &topo, "", apps_section)?;
    let agent = start_agent(&topo, dir.path(), &config, "agent.log")?;
    wait_until("Established", Duration::from_secs(5), || bird.established())?;
    wait_until(
        "the config app's route at BIRD",
        Duration::from_secs(5),
        || Ok(!bird.route("192.0.2.60/32")?.is_empty()),
    )?;
    let before = apps(&topo)?;

    let agent_ip: Ipv4Addr = topo.agent_ip.parse()?;
    let link = Ipv4Addr::from(u32::from(agent_ip) & !3);
    let link6 = topo.agent_ip6.trim_end_matches("::1").to_owned() + "::";
    let cases = [
        // (method, vip, what the refusal must name)
        ("POST", format!("{}/32", topo.client_ip), "the BGP peer"),
        ("GET", format!("{}/32", topo.client_ip), "the BGP peer"),
        ("POST", format!("{link}/30"), "the BGP peer"),
        (
            "POST",
            format!("{}/32", topo.agent_ip),
            "an address of interface gca",
        ),
        ("POST", format!("{link6}/64"), "an address of interface gca"),
    ];
    for (method, vip, what) in &cases {
        let url = format!("http://{API}/register?name=x&vip={vip}&monitor=port:tcp:8090");
        let (status, body) = match *method {
            "GET" => topo.agent.http_get(&url)?,
            _ => topo.agent.http_post(&url)?,
        };
        ensure!(status == 409, "{method} {vip}: {status} {body}");
        let error = body["error"].as_str().unwrap_or_default();
        ensure!(
            error.contains(vip.as_str()) && error.contains(what),
            "{method} {vip}: unclear error: {body}"
        );
        ensure!(apps(&topo)? == before, "{vip}: /apps changed");
        let address = vip.split('/').next().unwrap_or_default();
        let lo = topo.agent.ip(&["-o", "addr", "show", "dev", "lo"])?;
        ensure!(
            !lo.contains(&format!(" {address}/")),
            "{vip} reached lo:\n{lo}"
        );
    }
    // A second later BIRD still has the session and the route (a VIP on lo covering the peer
    // would have made the route to it local and the session would be gone by then).
    std::thread::sleep(Duration::from_secs(1));
    ensure!(
        bird.established()?,
        "session lost: {}",
        bird.session_state()?
    );
    ensure!(!bird.route("192.0.2.60/32")?.is_empty(), "route lost");
    ensure!(
        topo.agent.http_get(&format!("http://{API}/info"))?.1["peers"][0]["state"] == "Established"
    );

    // A safe VIP still registers: the refusals were about the addresses, not the request.
    let (status, body) = topo.agent.http_post(&format!(
        "http://{API}/register?name=x&vip=192.0.2.61/32&monitor=port:tcp:8090"
    ))?;
    ensure!(status == 200, "safe vip: {status} {body}");
    drop(agent);
    Ok(())
}

#[test]
fn check_config_refuses_a_config_app_on_the_peer_address() -> Result<()> {
    require_privileged!();
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    let apps_section = format!("apps:\n  - name: bad\n    vip: {}/32\n", topo.client_ip);
    let config = agent_config(dir.path(), &topo, "", &apps_section)?;
    let out = std::process::Command::new(gocast_tests::agent_binary()?)
        .args(["check-config", "--config", &config])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "accepted:\n{stderr}");
    ensure!(
        stderr.contains("apps[0].vip") && stderr.contains("bgp peer_ip"),
        "unclear:\n{stderr}"
    );
    Ok(())
}
