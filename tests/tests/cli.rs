//! The `gocast` binary's command line: config checking, exit codes and log lines (no
//! privileges needed, but for the running agent's log lines).

use std::{process::Command, time::Duration};

use anyhow::{Result, ensure};
use gocast_tests::{Agent, Topology, agent_binary, require_privileged};

fn check_config(yaml: &str) -> Result<(i32, String, String)> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, yaml)?;
    let out = Command::new(agent_binary()?)
        .args(["check-config", "--config"])
        .arg(&path)
        .output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn check_config_prints_the_normalized_config() -> Result<()> {
    let (code, out, err) = check_config(
        "bgp: {local_as: 65001, remote_as: 65000, peer_ip: 198.18.0.2}\napps: [{name: a, vip: 192.0.2.1/32, monitor: 'port:tcp:80'}]\n",
    )?;
    ensure!(code == 0, "{err}");
    ensure!(
        out.contains("peer_as: 65000")
            && out.contains("port:tcp:80")
            && out.contains("monitor_interval: 10s"),
        "{out}"
    );
    Ok(())
}

#[test]
fn bad_config_exits_2_naming_key_and_line() -> Result<()> {
    for (yaml, needle) in [
        ("agent:\n  listen_addr: 127.0.0.1:1\n  bogus: 1\n", "line 3"),
        ("agent:\n  monitor_interval: fast\n", "invalid duration"),
        ("apps:\n  - name: a\n    vip: 300.1.1.1/32\n", "invalid vip"),
        (
            "bgp:\n  local_as: 1\n  remote_as: 2\n  communities: ['x']\n",
            "invalid community",
        ),
        ("agent: [\n", "line"),
    ] {
        let (code, _, err) = check_config(yaml)?;
        ensure!(code == 2, "{yaml:?}: exit {code}: {err}");
        ensure!(
            err.contains(needle) && err.contains("config.yaml"),
            "{yaml:?}: {err}"
        );
    }
    Ok(())
}

#[test]
fn run_with_a_bad_config_exits_2_before_touching_anything() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("c.yaml");
    std::fs::write(&path, "agent: {nope: 1}\n")?;
    // GoCast's flag syntax reaches the same check.
    let out = Command::new(agent_binary()?)
        .arg("-config")
        .arg(&path)
        .output()?;
    ensure!(out.status.code() == Some(2), "{:?}", out.status);
    ensure!(String::from_utf8_lossy(&out.stderr).contains("nope"));
    Ok(())
}

#[test]
fn version_is_printed() -> Result<()> {
    let out = Command::new(agent_binary()?).arg("--version").output()?;
    ensure!(out.status.success() && String::from_utf8_lossy(&out.stdout).starts_with("gocast "));
    Ok(())
}

#[test]
fn a_password_longer_than_a_tcp_md5_key_exits_2() -> Result<()> {
    let long = "x".repeat(81);
    let (code, out, err) = check_config(&format!(
        "bgp: {{local_as: 65001, remote_as: 65000, peer_ip: 198.18.0.2, password: {long}}}\n"
    ))?;
    ensure!(code == 2, "exit {code}: {out}{err}");
    ensure!(
        err.contains("bgp.password") && err.contains("at most 80"),
        "{err}"
    );
    ensure!(!err.contains(&long), "the password is printed: {err}");
    let (code, _, err) = check_config(&format!(
        "bgp: {{local_as: 65001, remote_as: 65000, peer_ip: 198.18.0.2, password: {}}}\n",
        "x".repeat(80)
    ))?;
    ensure!(code == 0, "80 bytes are allowed: {err}");
    Ok(())
}

const API: &str = "127.0.0.1:8080";

/// Whether every line has a syslog priority prefix journald reads (`<3>` ... `<7>`).
fn all_prioritized(text: &str) -> bool {
    text.lines().filter(|l| !l.is_empty()).all(|l| {
        let b = l.as_bytes();
        b.len() > 3 && b[0] == b'<' && (b'0'..=b'7').contains(&b[1]) && b[2] == b'>'
    })
}

#[test]
fn under_journald_log_lines_carry_their_priority_and_elsewhere_not() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("c.yaml");
    std::fs::write(&path, "agent: {nope: 1}\n")?;
    let run = |journal: bool| -> Result<String> {
        let mut cmd = Command::new(agent_binary()?);
        cmd.args(["run", "--config"]).arg(&path);
        cmd.env_remove("JOURNAL_STREAM");
        if journal {
            cmd.env("JOURNAL_STREAM", "1:1");
        }
        Ok(String::from_utf8_lossy(&cmd.output()?.stderr).into_owned())
    };
    let journal = run(true)?;
    ensure!(
        journal.starts_with("<3>") && journal.contains("nope") && all_prioritized(&journal),
        "{journal}"
    );
    let plain = run(false)?;
    ensure!(plain.contains("nope") && !plain.starts_with('<'), "{plain}");
    Ok(())
}

#[test]
fn the_running_agent_logs_info_and_warnings_with_their_priority_for_the_journal() -> Result<()> {
    require_privileged!();
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    let config = dir.path().join("config.yaml");
    // The client runs no BGP speaker: the refused session is the warning.
    std::fs::write(
        &config,
        format!(
            "agent:\n  listen_addr: {API}\n  state_file: {state}\nbgp:\n  local_as: 65001\n  remote_as: 65000\n  peer_ip: {peer}\ndataplane:\n  mode: iptables\n",
            state = dir.path().join("state.json").display(),
            peer = topo.client_ip,
        ),
    )?;
    let mut agent = Agent::start_with_env(
        &agent_binary()?,
        &topo.agent,
        &["run", "--config", config.to_str().unwrap_or_default()],
        &[("JOURNAL_STREAM", "1:1")],
        &dir.path().join("agent.log"),
        API,
    )?;
    agent.wait_for("a warning", Duration::from_secs(10), |a| {
        Ok(std::fs::read_to_string(&a.log)?
            .lines()
            .any(|l| l.starts_with("<4>")))
    })?;
    let log = std::fs::read_to_string(&agent.log)?;
    ensure!(
        all_prioritized(&log) && log.lines().any(|l| l.starts_with("<6>")),
        "{log}"
    );
    Ok(())
}

/// Runs `gocast ARGS --addr API` inside `ns`; fails with its stderr unless it exits 0.
fn gocast_in(ns: &gocast_tests::Netns, args: &[&str]) -> Result<String> {
    let out = ns
        .command(agent_binary()?.to_str().unwrap_or_default())
        .args(args)
        .args(["--addr", API])
        .output()?;
    ensure!(
        out.status.success(),
        "gocast {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// `/metrics` fetched inside `ns` with `accept`: (content type, body).
fn scrape(ns: &gocast_tests::Netns, accept: &str) -> Result<(String, String)> {
    let out = ns
        .command("curl")
        .args(["-sS", "-m", "10", "-H"])
        .arg(format!("Accept: {accept}"))
        .args(["-w", "\n%{content_type}", &format!("http://{API}/metrics")])
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout)?;
    // `-w` adds a newline and the content type after the body, which ends in its own newline.
    let (body, content_type) = text.rsplit_once('\n').unwrap_or((&text, ""));
    Ok((content_type.to_owned(), body.to_owned()))
}

#[test]
fn every_read_command_prints_json_and_metrics_parse_in_both_formats() -> Result<()> {
    use gocast_test_guard::exposition::{self, Format};

    require_privileged!();
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    let config = dir.path().join("config.yaml");
    // The client runs no BGP speaker: the only peer never comes up.
    std::fs::write(
        &config,
        format!(
            "agent:\n  listen_addr: {API}\n  monitor_interval: 200ms\n  state_file: {state}\nbgp:\n  local_as: 65001\n  remote_as: 65000\n  peer_ip: {peer}\ndataplane:\n  mode: iptables\napps:\n  - name: web\n    vip: 192.0.2.10/32\n    monitors: ['exec:true']\n",
            state = dir.path().join("state.json").display(),
            peer = topo.client_ip,
        ),
    )?;
    let mut agent = Agent::start(
        &topo.agent,
        &["run", "--config", config.to_str().unwrap_or_default()],
        &dir.path().join("agent.log"),
        API,
    )?;
    agent.wait_for("web announced", Duration::from_secs(20), |_| {
        let (_, apps) = topo.agent.http_get(&format!("http://{API}/apps"))?;
        Ok(apps[0]["announced"] == true)
    })?;

    let status: serde_json::Value =
        serde_json::from_str(&gocast_in(&topo.agent, &["status", "--json"])?)?;
    let peer = &status["info"]["peers"][0];
    ensure!(
        peer["address"] == topo.client_ip.as_str()
            && peer["state"] != "Established"
            && peer["prefixes_received"] == 0
            && peer["families"] == serde_json::json!([]),
        "{status:#}"
    );
    let web = &status["apps"][0];
    ensure!(
        web["name"] == "web" && web["announced"] == true && web["state"] == "healthy",
        "{status:#}"
    );
    // iptables: no counters, which `stats` says rather than leaving out.
    ensure!(status["stats"]["unavailable"].is_string(), "{status:#}");
    // The table does not claim that a route nobody receives is announced.
    let table = gocast_in(&topo.agent, &["status"])?;
    ensure!(
        table.contains("wanted, 0/1 peers") && !table.contains("to 0/1"),
        "{table}"
    );

    let drained: serde_json::Value =
        serde_json::from_str(&gocast_in(&topo.agent, &["drain", "web", "--json"])?)?;
    ensure!(
        drained["host_drained"] == false && drained["apps"][0]["name"] == "web",
        "{drained:#}"
    );
    let undrained: serde_json::Value =
        serde_json::from_str(&gocast_in(&topo.agent, &["undrain", "web", "--json"])?)?;
    ensure!(undrained["apps"][0]["drain"].is_null(), "{undrained:#}");
    let reloaded: serde_json::Value =
        serde_json::from_str(&gocast_in(&topo.agent, &["reload", "--json"])?)?;
    ensure!(reloaded["reloaded"]["apps"].is_object(), "{reloaded:#}");

    // What Prometheus sends, then what a scraper that knows only the old format sends.
    for (accept, content_type, format) in [
        (
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::OpenMetrics,
        ),
        (
            "text/plain;version=0.0.4",
            "text/plain; version=0.0.4; charset=utf-8",
            Format::Prometheus,
        ),
    ] {
        let (got, body) = scrape(&topo.agent, accept)?;
        ensure!(got == content_type, "{accept}: {got}");
        let Some(parsed) = exposition::parse(&body, format) else {
            return Ok(());
        };
        let families = parsed.map_err(|e| anyhow::anyhow!("{format:?}: {e}\n{body}"))?;
        for name in [
            "gocast_app_announced",
            "gocast_bgp_session_up",
            "gocast_build_info",
            "process_resident_memory_bytes",
        ] {
            ensure!(
                families.iter().any(|f| f.name == name && f.samples > 0),
                "{format:?}: no {name}\n{body}"
            );
        }
        ensure!(
            families.iter().all(|f| f.help),
            "{format:?}: a family without HELP\n{body}"
        );
    }
    Ok(())
}
