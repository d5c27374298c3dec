//! Live reload and runtime drain against a real BIRD 2: a reload applies only the difference
//! and never resets the session or withdraws an unchanged route; a broken file changes
//! nothing; SIGHUP never kills the agent. A drained app is re-announced with
//! `GRACEFUL_SHUTDOWN`, withdrawn after the drain time while its VIP stays for connections in
//! flight, comes back on undrain, and stays drained across a restart.

use std::{
    io::Read,
    path::Path,
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use gocast_tests::{
    Agent, Service, Topology, agent_binary, require_privileged,
    routers::{API, Bird, Neighbor, start_agent, wait_until},
    sh,
};

/// The agent's config: monitors every 100 ms, a long cleanup timer (a drained VIP must stay
/// while the test's connection runs), a 2 s drain time, then `bgp_extra` and `apps`.
fn write_config(dir: &Path, topo: &Topology, bgp_extra: &str, apps: &str) -> Result<String> {
    let path = dir.join("config.yaml");
    std::fs::write(
        &path,
        format!(
            "agent:\n  listen_addr: {API}\n  monitor_interval: 100ms\n  cleanup_timer: 60s\n  drain_time: 2s\n  state_file: {state}\n\
             bgp:\n  local_as: 65001\n  remote_as: 65000\n  peer_ip: {peer}\n{bgp_extra}{apps}",
            state = dir.join("state.json").display(),
            peer = topo.client_ip,
        ),
    )?;
    Ok(path.to_string_lossy().into_owned())
}

/// An app entry: `name` on `vip` with one monitor, and communities of its own if any.
fn app(name: &str, vip: &str, monitor: &str, communities: &[&str]) -> String {
    let extra = if communities.is_empty() {
        String::new()
    } else {
        format!(
            "    vip_config: {{bgp_communities: [{}]}}\n",
            communities
                .iter()
                .map(|c| format!("'{c}'"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    format!("  - name: {name}\n    vip: {vip}\n{extra}    monitor: {monitor}\n")
}

fn sighup(agent: &Agent) -> Result<()> {
    let pid = agent.pid().context("agent pid")?;
    sh("kill", &["-HUP", &pid.to_string()])?;
    Ok(())
}

/// Runs `gocast ARGS --addr API` inside the agent's namespace; (success, stdout + stderr).
fn cli(topo: &Topology, args: &[&str]) -> Result<(bool, String)> {
    let out = topo
        .agent
        .command(agent_binary()?.to_str().context("binary path")?)
        .args(args)
        .args(["--addr", API])
        .output()
        .context("running the gocast CLI")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

/// Watches `prefix` at BIRD from another thread until dropped; `lost` is set if it was ever
/// missing.
struct Watch {
    stop: Arc<AtomicBool>,
    lost: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Watch {
    fn start(bird: Arc<Bird>, prefix: &'static str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let lost = Arc::new(AtomicBool::new(false));
        let (s, l) = (stop.clone(), lost.clone());
        let thread = thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if bird.route(prefix).map_or(true, |r| r.is_empty()) {
                    l.store(true, Ordering::Relaxed);
                }
                thread::sleep(Duration::from_millis(10));
            }
        });
        Self {
            stop,
            lost,
            thread: Some(thread),
        }
    }

    /// Stops watching; whether the route was ever missing.
    fn lost(mut self) -> bool {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.lost.load(Ordering::Relaxed)
    }
}

#[test]
fn a_reload_applies_only_the_difference_and_keeps_the_session_and_unchanged_routes() -> Result<()> {
    require_privileged!();
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    let bird = Arc::new(Bird::start(
        &topo.client,
        dir.path(),
        &Neighbor::toward_agent(&topo),
    )?);
    let _service = Service::http(&topo.agent, 8090, dir.path())?;
    let before = format!(
        "apps:\n{}{}{}",
        app("keep", "192.0.2.61/32", "port:tcp:8090", &[]),
        app("gone", "192.0.2.62/32", "port:tcp:8090", &[]),
        app("changed", "192.0.2.63/32", "port:tcp:8090", &[]),
    );
    let config = write_config(dir.path(), &topo, "", &before)?;
    let agent = start_agent(&topo, dir.path(), &config, "agent.log")?;
    wait_until("three routes at BIRD", Duration::from_secs(5), || {
        Ok(["192.0.2.61/32", "192.0.2.62/32", "192.0.2.63/32"]
            .iter()
            .all(|p| bird.route(p).is_ok_and(|r| !r.is_empty())))
    })?;
    let session = bird.since()?;
    let watch = Watch::start(bird.clone(), "192.0.2.61/32");

    let after = format!(
        "apps:\n{}{}{}",
        app("keep", "192.0.2.61/32", "port:tcp:8090", &[]),
        app("changed", "192.0.2.63/32", "exec:true", &["65001:9"]),
        app("added", "192.0.2.64/32", "port:tcp:8090", &[]),
    );
    write_config(dir.path(), &topo, "", &after)?;
    sighup(&agent)?;
    wait_until("the reload at BIRD", Duration::from_secs(5), || {
        Ok(!bird.route("192.0.2.64/32")?.is_empty()
            && bird.route("192.0.2.62/32")?.is_empty()
            && bird.route("192.0.2.63/32")?.contains("(65001,9)"))
    })?;
    let (status, apps) = topo.agent.http_get(&format!("http://{API}/apps"))?;
    ensure!(status == 200, "/apps: {status}");
    let changed = apps
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["name"] == "changed")
        .context("changed app")?;
    ensure!(
        changed["monitors"][0]["monitor"] == "exec:true",
        "{changed}"
    );

    // A broken file changes nothing, says why, and SIGHUP does not kill the agent.
    std::fs::write(&config, "agent:\n  monitor_rise: 0\n")?;
    let (status, body) = topo.agent.http_post(&format!("http://{API}/reload"))?;
    ensure!(status == 400, "broken reload: {status} {body}");
    ensure!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("monitor_rise")),
        "{body}"
    );
    let (ok, text) = cli(&topo, &["reload"])?;
    ensure!(
        !ok && text.contains("monitor_rise"),
        "gocast reload: {text}"
    );
    sighup(&agent)?;
    thread::sleep(Duration::from_millis(300));
    let (status, _) = topo.agent.http_get(&format!("http://{API}/healthz"))?;
    ensure!(status == 200, "the agent died on SIGHUP");
    ensure!(
        !bird.route("192.0.2.64/32")?.is_empty(),
        "the broken file changed routes"
    );

    // The good file again, through the CLI: nothing to change.
    write_config(dir.path(), &topo, "", &after)?;
    let (ok, text) = cli(&topo, &["reload"])?;
    ensure!(
        ok && text.contains("apps added: -"),
        "gocast reload: {text}"
    );

    ensure!(
        !watch.lost(),
        "the unchanged app's route left BIRD during the reloads"
    );
    let now = bird.since()?;
    ensure!(
        now.same_session(&session) && bird.established()?,
        "the BGP session was reset (since {session} → {now}):\n{}\n--- BIRD ---\n{}\n--- agent ---\n{}",
        bird.birdc(&["show", "protocols", "all", "agent"])?,
        bird.log_text(),
        agent.log_text()
    );
    Ok(())
}

/// Opens a TCP connection from the client namespace to `VIP:8090` and keeps it idle until
/// `go` exists, then sends one HTTP request on it; the child prints the status line.
fn idle_connection(topo: &Topology, vip: &str, go: &Path) -> Result<std::process::Child> {
    let script = format!(
        "import os, socket, time\n\
         s = socket.create_connection(('{vip}', 8090), timeout=5)\n\
         print('connected', flush=True)\n\
         while not os.path.exists('{go}'): time.sleep(0.05)\n\
         s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\n\
         print(s.recv(100).split(b'\\r\\n')[0].decode(), flush=True)\n",
        go = go.display(),
    );
    topo.client
        .command("python3")
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the client")
}

#[test]
fn a_drain_announces_graceful_shutdown_then_withdraws_keeps_connections_and_survives_a_restart()
-> Result<()> {
    require_privileged!();
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    let bird = Bird::start(&topo.client, dir.path(), &Neighbor::toward_agent(&topo))?;
    let _service = Service::http(&topo.agent, 8090, dir.path())?;
    let apps = format!(
        "apps:\n{}{}",
        app("web", "192.0.2.71/32", "port:tcp:8090", &[]),
        app("other", "192.0.2.72/32", "port:tcp:8090", &[]),
    );
    let config = write_config(dir.path(), &topo, "", &apps)?;
    let mut agent = start_agent(&topo, dir.path(), &config, "agent.log")?;
    wait_until("routes at BIRD", Duration::from_secs(5), || {
        Ok(!bird.route("192.0.2.71/32")?.is_empty() && !bird.route("192.0.2.72/32")?.is_empty())
    })?;
    let go = dir.path().join("go");
    let mut client = idle_connection(&topo, "192.0.2.71", &go)?;

    let (ok, text) = cli(&topo, &["drain", "web"])?;
    ensure!(ok && text.contains("web: draining"), "gocast drain: {text}");
    wait_until("GRACEFUL_SHUTDOWN at BIRD", Duration::from_secs(2), || {
        Ok(bird.route("192.0.2.71/32")?.contains("(65535,0)"))
    })?;
    ensure!(
        !bird.route("192.0.2.72/32")?.contains("(65535,0)"),
        "only the drained app"
    );
    wait_until(
        "withdrawn after the drain time",
        Duration::from_secs(4),
        || Ok(bird.route("192.0.2.71/32")?.is_empty()),
    )?;
    let lo = topo.agent.ip(&["addr", "show", "dev", "lo"])?;
    ensure!(lo.contains("192.0.2.71/32"), "the VIP left lo:\n{lo}");
    std::fs::write(&go, "")?;
    let mut out = String::new();
    client
        .stdout
        .take()
        .context("client stdout")?
        .read_to_string(&mut out)?;
    ensure!(
        client.wait()?.success() && out.contains("200"),
        "the connection opened before the drain did not complete: {out}"
    );
    let (status, view) = topo.agent.http_get(&format!("http://{API}/apps/web"))?;
    ensure!(status == 200 && view["drain"] == "drained", "{view}");

    // Drained across a restart: the app comes up but is not announced.
    let (status, _) = agent.signal_and_wait("TERM", Duration::from_secs(5))?;
    ensure!(status.success(), "{status}");
    let agent = start_agent(&topo, dir.path(), &config, "agent2.log")?;
    wait_until("the other route back", Duration::from_secs(5), || {
        Ok(!bird.route("192.0.2.72/32")?.is_empty())
    })?;
    thread::sleep(Duration::from_millis(500));
    ensure!(
        bird.route("192.0.2.71/32")?.is_empty(),
        "a restart re-announced a drained app"
    );
    let (ok, text) = cli(&topo, &["undrain", "web"])?;
    ensure!(
        ok && text.contains("web: not drained"),
        "gocast undrain: {text}"
    );
    wait_until("undrained at BIRD", Duration::from_secs(3), || {
        let r = bird.route("192.0.2.71/32")?;
        Ok(!r.is_empty() && !r.contains("(65535,0)"))
    })?;
    let (ok, text) = cli(&topo, &["status"])?;
    ensure!(ok && text.contains("web"), "gocast status: {text}");
    drop(agent);
    Ok(())
}

#[test]
fn a_whole_host_drain_covers_every_app() -> Result<()> {
    require_privileged!();
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    let bird = Bird::start(&topo.client, dir.path(), &Neighbor::toward_agent(&topo))?;
    let _service = Service::http(&topo.agent, 8090, dir.path())?;
    let apps = format!(
        "apps:\n{}{}",
        app("a", "192.0.2.81/32", "port:tcp:8090", &[]),
        app("b", "192.0.2.82/32", "port:tcp:8090", &[]),
    );
    let config = write_config(dir.path(), &topo, "", &apps)?;
    let _agent = start_agent(&topo, dir.path(), &config, "agent.log")?;
    wait_until("routes at BIRD", Duration::from_secs(5), || {
        Ok(!bird.route("192.0.2.81/32")?.is_empty() && !bird.route("192.0.2.82/32")?.is_empty())
    })?;
    let (status, body) = topo.agent.http_post(&format!("http://{API}/drain"))?;
    ensure!(status == 200 && body["host_drained"] == true, "{body}");
    wait_until("both withdrawn", Duration::from_secs(5), || {
        Ok(bird.route("192.0.2.81/32")?.is_empty() && bird.route("192.0.2.82/32")?.is_empty())
    })?;
    let (status, body) = topo.agent.http_post(&format!("http://{API}/undrain"))?;
    ensure!(status == 200 && body["host_drained"] == false, "{body}");
    wait_until("both back", Duration::from_secs(5), || {
        Ok(!bird.route("192.0.2.81/32")?.is_empty() && !bird.route("192.0.2.82/32")?.is_empty())
    })?;
    let (status, body) = topo
        .agent
        .http_post(&format!("http://{API}/drain?name=nope"))?;
    ensure!(status == 404, "{status} {body}");
    Ok(())
}
