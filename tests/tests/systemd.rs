//! The agent under a service manager, as systemd runs it: notifications on `NOTIFY_SOCKET`
//! (ready, status, watchdog pings, stopping), SIGHUP that does not end it, and a lifecycle that
//! stops turning: `/healthz` says so, the BGP sessions close with Cease and the agent exits 1 so
//! systemd restarts it.

use std::{
    os::unix::net::UnixDatagram,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use gocast_tests::{
    Agent, Service, Topology, agent_binary, require_privileged,
    routers::{API, Bird, Neighbor, agent_config, wait_until, web_apps},
    sh,
};

/// The service manager's end of `NOTIFY_SOCKET`: every datagram the agent sent, in order.
struct Manager {
    socket: UnixDatagram,
    seen: Vec<String>,
}

impl Manager {
    fn bind(path: &Path) -> Result<Self> {
        let socket = UnixDatagram::bind(path).context("binding the notify socket")?;
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        Ok(Self {
            socket,
            seen: Vec::new(),
        })
    }

    /// Reads datagrams until `done` holds for what was seen; fails after `limit`.
    fn wait_for(
        &mut self,
        what: &str,
        limit: Duration,
        done: impl Fn(&[String]) -> bool,
    ) -> Result<()> {
        let start = Instant::now();
        let mut buf = [0u8; 4096];
        while !done(&self.seen) {
            if start.elapsed() > limit {
                bail!("no {what} within {limit:?}; seen: {:?}", self.seen);
            }
            match self.socket.recv(&mut buf) {
                Ok(n) => self
                    .seen
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned()),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e).context("reading the notify socket"),
            }
        }
        Ok(())
    }

    fn count(seen: &[String], line: &str) -> usize {
        seen.iter().filter(|m| m.lines().any(|l| l == line)).count()
    }
}

fn start(
    topo: &Topology,
    dir: &Path,
    config: &str,
    env: &[(&str, &str)],
    log: &str,
) -> Result<Agent> {
    Agent::start_with_env(
        &agent_binary()?,
        &topo.agent,
        &["run", "--config", config],
        env,
        &dir.join(log),
        API,
    )
}

#[test]
fn under_a_service_manager_the_agent_notifies_ready_status_watchdog_and_stopping() -> Result<()> {
    require_privileged!();
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    let notify = dir.path().join("notify");
    let mut manager = Manager::bind(&notify)?;
    let _service = Service::http(&topo.agent, 8090, dir.path())?;
    // The client is the BGP peer; nothing answers there, so no session comes up.
    let config = agent_config(
        dir.path(),
        &topo,
        "",
        &web_apps("192.0.2.60/32", "2001:db8:ff00::60/128"),
    )?;
    let notify_socket = notify.to_str().context("socket path")?;
    let mut agent = start(
        &topo,
        dir.path(),
        &config,
        &[
            ("NOTIFY_SOCKET", notify_socket),
            ("WATCHDOG_USEC", "2000000"),
        ],
        "agent.log",
    )?;

    manager
        .wait_for("READY=1", Duration::from_secs(10), |seen| {
            Manager::count(seen, "READY=1") == 1
        })
        .with_context(|| agent.log_text())?;
    // Pinged every half WATCHDOG_USEC: two pings within 3 s of readiness.
    let ready_at = manager.seen.len();
    manager
        .wait_for("two WATCHDOG=1", Duration::from_secs(3), |seen| {
            Manager::count(&seen[ready_at..], "WATCHDOG=1") >= 2
        })
        .with_context(|| agent.log_text())?;
    // The summary, once both apps are healthy and in the route set.
    manager
        .wait_for("the STATUS= summary", Duration::from_secs(10), |seen| {
            seen.iter()
                .any(|m| m == "STATUS=2 apps, 2 announced, 0/1 peers established\n")
        })
        .with_context(|| agent.log_text())?;

    // SIGHUP reloads, tells systemd (RELOADING=1, then READY=1) and never ends the agent.
    let pid = agent.pid().context("agent running")?.to_string();
    sh("kill", &["-HUP", &pid])?;
    agent.wait_for("the reload in the log", Duration::from_secs(5), |a| {
        Ok(a.log_text().contains("config reloaded"))
    })?;
    manager
        .wait_for("RELOADING=1 then READY=1", Duration::from_secs(2), |seen| {
            Manager::count(seen, "RELOADING=1") == 1 && Manager::count(seen, "READY=1") == 2
        })
        .with_context(|| agent.log_text())?;
    std::thread::sleep(Duration::from_millis(500));
    let (status, body) = topo.agent.http_get(&format!("http://{API}/healthz"))?;
    ensure!(
        status == 200 && body == serde_json::json!({"status": "ok"}),
        "after SIGHUP: {status} {body}\n{}",
        agent.log_text()
    );
    // Still pinging.
    let after_hup = manager.seen.len();
    manager.wait_for("WATCHDOG=1 after SIGHUP", Duration::from_secs(3), |seen| {
        Manager::count(&seen[after_hup..], "WATCHDOG=1") >= 1
    })?;

    let (status, _) = agent.signal_and_wait("TERM", Duration::from_secs(5))?;
    ensure!(status.success(), "exit status {status}");
    manager.wait_for("STOPPING=1", Duration::from_secs(1), |seen| {
        Manager::count(seen, "STOPPING=1") == 1
    })?;
    ensure!(
        Manager::count(&manager.seen, "READY=1") == 2,
        "ready at start and after the reload: {:?}",
        manager.seen
    );
    Ok(())
}

#[test]
fn a_stalled_lifecycle_turns_healthz_503_then_closes_the_sessions_and_exits_1() -> Result<()> {
    require_privileged!();
    let v4 = "192.0.2.61/32";
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    let bird = Bird::start(&topo.client, dir.path(), &Neighbor::toward_agent(&topo))?;
    let _service = Service::http(&topo.agent, 8090, dir.path())?;
    let config = agent_config(
        dir.path(),
        &topo,
        "",
        &web_apps(v4, "2001:db8:ff00::61/128"),
    )?;
    // A debug-build fault: the lifecycle loop stops turning 6 s after the start.
    let mut agent = start(
        &topo,
        dir.path(),
        &config,
        &[("GOCAST_TEST_STALL_LIFECYCLE_AFTER", "6")],
        "agent.log",
    )?;
    let context = |agent: &Agent| {
        format!(
            "---- bird log ----\n{}\n{}",
            bird.log_text(),
            agent.log_text()
        )
    };
    wait_until("the route at BIRD", Duration::from_secs(6), || {
        Ok(!bird.route(v4)?.is_empty())
    })
    .with_context(|| context(&agent))?;

    // 3 s without a turn: unhealthy, and says why.
    let url = format!("http://{API}/healthz");
    let mut body = serde_json::Value::Null;
    agent.wait_for("/healthz 503", Duration::from_secs(12), |_| {
        let (status, b) = topo.agent.http_get(&url)?;
        body = b;
        Ok(status == 503)
    })?;
    ensure!(body["status"] == "unhealthy", "{body}");
    let reason = body["reasons"][0].as_str().unwrap_or_default();
    ensure!(
        reason.starts_with("lifecycle has not turned for "),
        "{body}"
    );

    // 10 s without a turn: the agent closes the session with Cease and exits 1.
    let (status, _) = agent.wait_exit(Duration::from_secs(12))?;
    ensure!(
        status.code() == Some(1),
        "exit status {status}\n{}",
        context(&agent)
    );
    ensure!(
        agent.log_text().contains("the lifecycle failed"),
        "{}",
        agent.log_text()
    );
    wait_until("the route gone at BIRD", Duration::from_secs(3), || {
        Ok(bird.route(v4)?.is_empty())
    })
    .with_context(|| context(&agent))?;
    let proto = bird.birdc(&["show", "protocols", "all", "agent"])?;
    ensure!(
        proto.contains("Administrative shutdown"),
        "BIRD saw no Cease:\n{proto}\n{}",
        context(&agent)
    );
    Ok(())
}
