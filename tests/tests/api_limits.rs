//! The API against hostile local clients: thousands of idle connections under a 1,024
//! descriptor limit starve nothing (health answers, the route stays at BIRD and comes back after
//! BIRD restarts); state changes need the token over TCP; the Unix socket's mode is the gate;
//! every state change leaves an audit line.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use gocast_tests::{
    Agent, Netns, Service, Topology, agent_binary, require_privileged,
    routers::{API, Bird, Neighbor, wait_until},
};

const VIP: &str = "192.0.2.91/32";

fn write_config(dir: &Path, topo: &Topology, agent_extra: &str) -> Result<String> {
    let path = dir.join("config.yaml");
    std::fs::write(
        &path,
        format!(
            "agent:\n  listen_addr: {API}\n  monitor_interval: 100ms\n  state_file: {state}\n{agent_extra}\
             bgp:\n  local_as: 65001\n  remote_as: 65000\n  peer_ip: {peer}\n\
             apps:\n  - name: web\n    vip: {VIP}\n    monitor: port:tcp:8090\n",
            state = dir.join("state.json").display(),
            peer = topo.client_ip,
        ),
    )?;
    Ok(path.to_string_lossy().into_owned())
}

/// Opens `count` TCP connections to the API from inside `ns` and keeps them idle until the
/// child is killed; returns once the script says how many it opened.
fn idle_connections(ns: &Netns, count: u32) -> Result<(Child, u32)> {
    let (host, port) = API.split_once(':').context("API address")?;
    let script = format!(
        "import resource, socket, sys, time\n\
         resource.setrlimit(resource.RLIMIT_NOFILE, (8192, 8192))\n\
         held = []\n\
         for _ in range({count}):\n\
         \x20   try:\n\
         \x20       s = socket.create_connection(('{host}', {port}), timeout=2)\n\
         \x20       held.append(s)\n\
         \x20   except OSError:\n\
         \x20       pass\n\
         print(len(held), flush=True)\n\
         time.sleep(600)\n"
    );
    let mut child = ns
        .command("python3")
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the idle clients")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let opened = line.trim().parse().context("the idle clients' count")?;
    Ok((child, opened))
}

/// `curl ARGS` inside `ns`; (HTTP status or 0, body).
fn curl(ns: &Netns, args: &[&str]) -> Result<(u16, String)> {
    let out = ns
        .command("curl")
        .args(["-sS", "-m", "5", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .context("running curl")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    Ok((code.trim().parse().unwrap_or(0), body.to_owned()))
}

#[test]
fn two_thousand_idle_connections_under_1024_descriptors_starve_nothing() -> Result<()> {
    require_privileged!();
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    let mut bird = Bird::start(&topo.client, dir.path(), &Neighbor::toward_agent(&topo))?;
    let _service = Service::http(&topo.agent, 8090, dir.path())?;
    let config = write_config(dir.path(), &topo, "")?;
    let binary = agent_binary()?;
    let binary = binary.to_str().context("binary path")?;
    // systemd's default soft and hard limit for a service without LimitNOFILE.
    let _agent = Agent::start_with(
        Path::new("/usr/bin/prlimit"),
        &topo.agent,
        &["--nofile=1024:1024", binary, "run", "--config", &config],
        &dir.path().join("agent.log"),
        API,
    )?;
    wait_until("the route at BIRD", Duration::from_secs(5), || {
        Ok(!bird.route(VIP)?.is_empty())
    })?;

    let (mut clients, opened) = idle_connections(&topo.agent, 2000)?;
    let result = (|| -> Result<()> {
        ensure!(opened > 1000, "only {opened} connections opened");
        let t0 = Instant::now();
        let (status, _) = curl(&topo.agent, &[&format!("http://{API}/healthz")])?;
        ensure!(
            status == 200 && t0.elapsed() < Duration::from_secs(2),
            "/healthz under load: {status} after {:?}",
            t0.elapsed()
        );
        ensure!(!bird.route(VIP)?.is_empty(), "the route left BIRD");
        // The BGP session must come back: its socket needs a descriptor too.
        bird.restart(&topo.client)?;
        wait_until("the route back at BIRD", Duration::from_secs(15), || {
            Ok(!bird.route(VIP)?.is_empty())
        })?;
        let (status, body) = curl(&topo.agent, &[&format!("http://{API}/apps/web")])?;
        ensure!(
            status == 200 && body.contains("\"announced\":true"),
            "the app while the clients wait: {status} {body}"
        );
        Ok(())
    })();
    let _ = clients.kill();
    let _ = clients.wait();
    result
}

/// The Unix socket: its mode is the gate; its owner needs no token, another user gets in not.
fn unix_socket_is_gated_by_its_mode(ns: &Netns, socket: &Path) -> Result<()> {
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(socket)?.permissions());
    ensure!(mode & 0o777 == 0o600, "socket mode {mode:o}");
    let sock = socket.to_str().context("socket path")?;
    let (status, body) = curl(
        ns,
        &[
            "--unix-socket",
            sock,
            "-X",
            "POST",
            "http://localhost/unregister?name=h",
        ],
    )?;
    ensure!(status == 200, "owner on the Unix socket: {status} {body}");
    let denied = ns
        .command("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "curl",
            "-sS",
            "-m",
            "5",
            "--unix-socket",
            sock,
            "http://localhost/apps",
        ])
        .output()?;
    // curl exits 7 when it cannot connect: here the socket's mode refuses the user.
    ensure!(
        denied.status.code() == Some(7),
        "another user reached the socket: {}",
        String::from_utf8_lossy(&denied.stderr)
    );

    Ok(())
}

#[test]
fn state_changes_need_the_token_on_tcp_and_the_unix_socket_honours_its_mode() -> Result<()> {
    require_privileged!();
    let dir = tempfile::tempdir()?;
    // Others may walk into the directory: only the socket's own mode keeps them out.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let topo = Topology::new()?;
    let _service = Service::http(&topo.agent, 8090, dir.path())?;
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret-token\n")?;
    std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let socket = dir.path().join("api.sock");
    let config = write_config(
        dir.path(),
        &topo,
        &format!(
            "  api_token_file: {}\n  listen_unix: {}\n  listen_unix_mode: '0600'\n",
            token.display(),
            socket.display()
        ),
    )?;
    let agent = Agent::start(
        &topo.agent,
        &["run", "--config", &config],
        &dir.path().join("agent.log"),
        API,
    )?;
    let register = format!("http://{API}/register?name=h&vip=192.0.2.92/32&monitor=port:tcp:8090");

    let (status, body) = curl(&topo.agent, &["-X", "POST", &register])?;
    ensure!(status == 401, "no token: {status} {body}");
    ensure!(!body.contains("s3cret"), "the token echoed: {body}");
    let (status, body) = curl(
        &topo.agent,
        &["-X", "POST", "-H", "Authorization: Bearer wrong", &register],
    )?;
    ensure!(status == 401, "wrong token: {status} {body}");
    let (status, body) = curl(
        &topo.agent,
        &[
            "-X",
            "POST",
            "-H",
            "Authorization: Bearer s3cret-token",
            &register,
        ],
    )?;
    ensure!(status == 200, "with the token: {status} {body}");
    let (status, _) = curl(&topo.agent, &[&format!("http://{API}/apps")])?;
    ensure!(status == 200, "reads stay open: {status}");

    unix_socket_is_gated_by_its_mode(&topo.agent, &socket)?;

    // One audit line per state change, with its client.
    let log = agent.log_text();
    let audit: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("gocast::audit"))
        .collect();
    ensure!(
        audit.iter().any(|l| l.contains("/register")
            && l.contains("status=401")
            && l.contains("127.0.0.1")),
        "no audit line for the refused registration:\n{}",
        audit.join("\n")
    );
    ensure!(
        audit
            .iter()
            .any(|l| l.contains("/unregister") && l.contains("status=200") && l.contains("uid=0")),
        "no audit line for the Unix-socket removal:\n{}",
        audit.join("\n")
    );
    ensure!(!log.contains("s3cret"), "the token is in the log");
    Ok(())
}
