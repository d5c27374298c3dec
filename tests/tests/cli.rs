//! The `gocast` binary's command line: config checking and exit codes (no privileges needed).

use std::process::Command;

use anyhow::{Result, ensure};
use gocast_tests::agent_binary;

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
