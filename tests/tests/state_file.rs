//! The state file cannot be turned against the host: a file others could have written is moved
//! aside unread (its `exec:` monitors never run), a saved `exec:` registration needs
//! `allow_http_exec` again at restore, and a file that is not UTF-8 is moved aside, after which
//! registrations save normally.

use std::{os::unix::fs::PermissionsExt, path::Path, time::Duration};

use anyhow::{Result, ensure};
use gocast_tests::{Agent, Topology, require_privileged};

const API: &str = "127.0.0.1:8080";

fn write_config(dir: &Path, topo: &Topology, allow_http_exec: bool) -> Result<String> {
    let path = dir.join("config.yaml");
    let yaml = format!(
        "agent:\n  listen_addr: {API}\n  monitor_interval: 100ms\n  state_file: {state}\n  allow_http_exec: {allow_http_exec}\n\
         bgp:\n  local_as: 65001\n  remote_as: 65000\n  peer_ip: {peer}\ndataplane:\n  mode: iptables\n",
        state = dir.join("state.json").display(),
        peer = topo.client_ip,
    );
    std::fs::write(&path, yaml)?;
    Ok(path.to_string_lossy().into_owned())
}

fn write_state(dir: &Path, body: &[u8], mode: u32) -> Result<()> {
    let path = dir.join("state.json");
    std::fs::write(&path, body)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// The files next to the state file whose name has `.kind-` (`unsafe`, `corrupt`).
fn moved_aside(dir: &Path, kind: &str) -> Result<usize> {
    Ok(std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("state.json.{kind}-"))
        })
        .count())
}

fn apps(topo: &Topology) -> Result<serde_json::Value> {
    let (status, apps) = topo.agent.http_get(&format!("http://{API}/apps"))?;
    ensure!(status == 200, "/apps: {status}");
    Ok(apps)
}

#[test]
fn a_state_file_others_could_write_runs_nothing_and_is_moved_aside() -> Result<()> {
    require_privileged!();
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    let marker = dir.path().join("ran");
    let state = format!(
        r#"{{"version":1,"apps":[{{"name":"evil","vip":"192.0.2.66/32","monitors":["exec:touch {}"],"nats":[],"communities":[]}}]}}"#,
        marker.display()
    );

    // World-writable, even with allow_http_exec: not read at all.
    write_state(dir.path(), state.as_bytes(), 0o666)?;
    let config = write_config(dir.path(), &topo, true)?;
    let mut agent = Agent::start(
        &topo.agent,
        &["--config", &config],
        &dir.path().join("agent.log"),
        API,
    )?;
    std::thread::sleep(Duration::from_millis(800));
    ensure!(
        !marker.exists(),
        "the exec: monitor ran\n{}",
        agent.log_text()
    );
    ensure!(apps(&topo)? == serde_json::json!([]), "{}", apps(&topo)?);
    ensure!(!dir.path().join("state.json").exists(), "left in place");
    ensure!(moved_aside(dir.path(), "unsafe")? == 1, "not moved aside");
    // The lifecycle loads the file (and logs why it refused it) right after the API is up.
    agent.wait_for("the log saying why", Duration::from_secs(5), |a| {
        let log = a.log_text();
        Ok(log.contains("ERROR") && log.contains("writable by group or others"))
    })?;
    agent.signal_and_wait("TERM", Duration::from_secs(10))?;

    // The agent's own file, but allow_http_exec off: the saved exec: app is dropped.
    write_state(dir.path(), state.as_bytes(), 0o600)?;
    let config = write_config(dir.path(), &topo, false)?;
    let mut agent = Agent::start(
        &topo.agent,
        &["--config", &config],
        &dir.path().join("agent2.log"),
        API,
    )?;
    std::thread::sleep(Duration::from_millis(800));
    ensure!(
        !marker.exists(),
        "the exec: monitor ran\n{}",
        agent.log_text()
    );
    ensure!(apps(&topo)? == serde_json::json!([]), "{}", apps(&topo)?);
    let log = agent.log_text();
    ensure!(
        log.contains("saved registration dropped") && log.contains("allow_http_exec"),
        "the log says why:\n{log}"
    );
    agent.signal_and_wait("TERM", Duration::from_secs(10))?;
    Ok(())
}

#[test]
fn a_state_file_that_is_not_utf8_is_moved_aside_and_saving_works_again() -> Result<()> {
    require_privileged!();
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    write_state(dir.path(), b"{\"version\":1,\"apps\":[\xff]}", 0o600)?;
    let config = write_config(dir.path(), &topo, false)?;
    let mut agent = Agent::start(
        &topo.agent,
        &["--config", &config],
        &dir.path().join("agent.log"),
        API,
    )?;
    // The lifecycle loads the file (moves it aside, logs why) right after the API is up.
    agent.wait_for(
        "the file moved aside and the log saying why",
        Duration::from_secs(5),
        |a| Ok(moved_aside(dir.path(), "corrupt")? == 1 && a.log_text().contains("not UTF-8")),
    )?;
    let (status, body) = topo.agent.http_get(&format!(
        "http://{API}/register?name=web&vip=192.0.2.10/32&monitor=port:tcp:8081"
    ))?;
    ensure!(
        status == 200,
        "register: {status} {body}\n{}",
        agent.log_text()
    );
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("state.json"))?)?;
    ensure!(saved["apps"][0]["name"] == "web", "{saved}");
    agent.signal_and_wait("TERM", Duration::from_secs(10))?;
    Ok(())
}

/// Registers `req{i}` for i = first, first + CLIENTS, .. until `halt` is set; returns the
/// names that were answered 200 (acknowledged as saved).
fn storm(
    topo: &Topology,
    first: u32,
    halt: &std::sync::atomic::AtomicBool,
    acked: &std::sync::atomic::AtomicU32,
) -> Vec<String> {
    let mut ok = Vec::new();
    let mut i = first;
    while !halt.load(std::sync::atomic::Ordering::Relaxed) && i < 0xffff {
        let name = format!("req{i}");
        let url = format!(
            "http://{API}/register?name={name}&vip=2001:db8:ff00::{i:x}/128&monitor=port:tcp:{PORT}&nat=tcp:80:8080"
        );
        // A refused connection or a cut answer (the agent was killed) is no acknowledgement.
        if topo.agent.http_post(&url).is_ok_and(|(s, _)| s == 200) {
            ok.push(name);
            acked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        i += CLIENTS;
    }
    ok
}

/// The service the stormed apps' monitors check.
const PORT: u16 = 8081;
/// Concurrent registering clients.
const CLIENTS: u32 = 16;

#[test]
fn every_registration_acknowledged_before_a_sigkill_is_restored_and_installed() -> Result<()> {
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    require_privileged!();
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    let _service = gocast_tests::Service::http(&topo.agent, PORT, dir.path())?;
    let path = dir.path().join("config.yaml");
    std::fs::write(
        &path,
        format!(
            "agent:\n  listen_addr: {API}\n  monitor_interval: 100ms\n  state_file: {state}\n  nat_dest_ip: {dest}\n\
             bgp:\n  local_as: 65001\n  remote_as: 65000\n  peer_ip: {peer}\ndataplane:\n  mode: iptables\n",
            state = dir.path().join("state.json").display(),
            dest = topo.agent_ip6,
            peer = topo.client_ip,
        ),
    )?;
    let config = path.to_string_lossy().into_owned();
    let mut agent = Agent::start(
        &topo.agent,
        &["--config", &config],
        &dir.path().join("agent.log"),
        API,
    )?;
    let (stop, acked) = (AtomicBool::new(false), AtomicU32::new(0));
    let saved: Vec<String> = std::thread::scope(|s| -> Result<Vec<String>> {
        let clients: Vec<_> = (0..CLIENTS)
            .map(|c| {
                let (topo, stop, acked) = (&topo, &stop, &acked);
                s.spawn(move || storm(topo, c, stop, acked))
            })
            .collect();
        // Killed in the middle of the storm: requests in flight, a write maybe half done.
        let killed = agent.wait_for(
            "200 acknowledged registrations",
            Duration::from_secs(60),
            |_| Ok(acked.load(Ordering::Relaxed) >= 200),
        );
        let kill = agent.signal_and_wait("KILL", Duration::from_secs(10));
        stop.store(true, Ordering::Relaxed);
        let mut saved = Vec::new();
        for client in clients {
            saved.extend(
                client
                    .join()
                    .map_err(|_| anyhow::anyhow!("a client panicked"))?,
            );
        }
        killed?;
        kill?;
        Ok(saved)
    })?;
    ensure!(saved.len() >= 200, "{} acknowledged", saved.len());

    let mut agent = Agent::start(
        &topo.agent,
        &["--config", &config],
        &dir.path().join("agent2.log"),
        API,
    )?;
    // Every acknowledged registration is back and, its service being up, on `lo` with its
    // NAT rule again (the start-up clean-up removed what the killed agent left).
    agent.wait_for(
        "every acknowledged app restored and installed",
        Duration::from_secs(60),
        |_| {
            let apps = apps(&topo)?;
            let installed: std::collections::HashSet<&str> = apps
                .as_array()
                .into_iter()
                .flatten()
                .filter(|a| a["vip_installed"] == true)
                .filter_map(|a| a["name"].as_str())
                .collect();
            Ok(saved.iter().all(|n| installed.contains(n.as_str())))
        },
    )?;
    let rules = topo.agent.nat_rules("ip6tables")?;
    for name in &saved {
        ensure!(
            rules.contains(&format!("\"gocast:{name}\"")),
            "no NAT rule for {name}:\n{rules}"
        );
    }
    let lo = topo.agent.ip(&["-6", "addr", "show", "dev", "lo"])?;
    let on_lo = lo.matches("2001:db8:ff00::").count();
    ensure!(
        on_lo >= saved.len(),
        "{on_lo} VIPs on lo for {} apps",
        saved.len()
    );
    agent.signal_and_wait("TERM", Duration::from_secs(30))?;
    Ok(())
}
