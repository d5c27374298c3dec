//! NAT and counters end to end, with each dataplane: a client namespace reaches services in the
//! agent's namespace through VIPs (TCP and UDP, IPv4 and IPv6, two VIPs on one backend port);
//! with eBPF the per-VIP counters match the packets sent and `/stats` reads them when asked,
//! and passive health withdraws a service that still listens but no longer answers, holds it
//! down without flapping and brings it back once it accepts.

use std::{
    io::Write as _,
    path::Path,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use gocast_tests::{Agent, Netns, Service, Topology, require_privileged};
use serde_json::Value;

const API: &str = "127.0.0.1:8080";

/// The agent's config: the client as (unreachable) BGP peer, so the eBPF dataplane attaches to
/// the link toward it and NAT sends traffic to the agent's link address.
fn write_config(dir: &Path, topo: &Topology, dataplane: &str, apps: &str) -> Result<String> {
    let path = dir.join("config.yaml");
    let yaml = format!(
        "agent:\n  listen_addr: {API}\n  monitor_interval: 100ms\n  cleanup_timer: 10s\n  state_file: {state}\n\
         bgp:\n  local_as: 65001\n  remote_as: 65000\n  peer_ip: {peer}\n\
         dataplane:\n  {dataplane}\n  passive_health: {{window: 3s, min_syn: 5, max_unanswered: 0.5}}\n\
         apps:\n{apps}",
        state = dir.join("state.json").display(),
        peer = topo.client_ip,
    );
    std::fs::write(&path, yaml)?;
    Ok(path.to_string_lossy().into_owned())
}

fn app(name: &str, vip: &str, monitor: &str, nat: &str) -> String {
    format!("  - name: {name}\n    vip: {vip}\n    monitor: {monitor}\n    nats: ['{nat}']\n")
}

fn apps(topo: &Topology) -> Result<Vec<Value>> {
    let (status, apps) = topo.agent.http_get(&format!("http://{API}/apps"))?;
    ensure!(status == 200, "/apps: {status}");
    Ok(apps.as_array().context("apps array")?.clone())
}

fn all_healthy(topo: &Topology, count: usize) -> Result<bool> {
    let apps = apps(topo)?;
    Ok(apps.len() == count && apps.iter().all(|a| a["state"] == "healthy"))
}

/// Starts the agent with `config` and waits until its `count` apps are healthy.
fn start_healthy(topo: &Topology, dir: &Path, config: &str, count: usize) -> Result<Agent> {
    let mut agent = Agent::start(
        &topo.agent,
        &["--config", config],
        &dir.join("agent.log"),
        API,
    )?;
    agent.wait_for("all apps healthy", Duration::from_secs(10), |_| {
        all_healthy(topo, count)
    })?;
    Ok(agent)
}

/// A child process, killed and reaped on drop (by its PID, whatever happens in the test).
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A UDP echo server on `port` (all addresses).
fn udp_echo(ns: &Netns, port: u16) -> Result<Running> {
    let script = format!(
        "import socket\ns = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n\
         s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)\ns.bind(('::', {port}))\n\
         while True:\n    data, peer = s.recvfrom(2048)\n    s.sendto(data, peer)\n"
    );
    let child = ns
        .command("python3")
        .args(["-c", &script])
        .spawn()
        .context("starting the UDP echo server")?;
    Ok(Running(child))
}

/// Sends `count` datagrams from a connected socket (which only accepts replies from the
/// address it sent to) and returns how many echoes came back.
fn udp_exchange(ns: &Netns, vip: &str, port: u16, count: u32) -> Result<u32> {
    let script = format!(
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.settimeout(1)\n\
         s.connect(('{vip}', {port}))\nn = 0\nfor i in range({count}):\n    s.send(b'ping %d' % i)\n\
         \x20   try:\n        n += s.recv(2048) == b'ping %d' % i\n    except socket.timeout:\n        pass\nprint(n)\n"
    );
    let out = ns.run("python3", &["-c", &script])?;
    out.trim().parse().context("echo count")
}

/// Waits until `/stats` shows counters for `vip` satisfying `ok`.
fn stats_until(
    agent: &mut Agent,
    topo: &Topology,
    vip: &str,
    ok: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let mut last = Value::Null;
    agent.wait_for("counters", Duration::from_secs(12), |_| {
        let (status, v) = topo.agent.http_get(&format!("http://{API}/stats/{vip}"))?;
        ensure!(status == 200, "/stats/{vip}: {status} {v}");
        last = v;
        Ok(ok(&last))
    })?;
    Ok(last)
}

/// One client port, first through the VIP, then straight to the service: the second
/// connection's replies must not be taken for the first one's. Prints whether each got the page.
fn vip_then_direct_from_one_port(topo: &Topology) -> Result<String> {
    let script = format!(
        "import socket\ndef get(addr, port):\n    s = socket.socket()\n    \
         s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n    s.bind(('', 45000))\n    \
         s.settimeout(3)\n    s.connect((addr, port))\n    s.sendall(b'GET /who.txt HTTP/1.0\\r\\n\\r\\n')\n    \
         data = b''\n    while True:\n        chunk = s.recv(4096)\n        if not chunk:\n            break\n        \
         data += chunk\n    s.close()\n    return data.endswith(b'backend 8081')\n\
         print(get('192.0.2.10', 80), get('{agent}', 8081))\n",
        agent = topo.agent_ip
    );
    Ok(topo
        .client
        .run("python3", &["-c", &script])?
        .trim()
        .to_owned())
}

/// The agent runs with `RUST_LOG=gocast=debug`, which covers the eBPF programs' target
/// `gocast_ebpf::logs`: the ingress program, XDP or TC, logs each new flow through aya-log.
fn new_flows_logged(agent: &Agent) -> Result<()> {
    let log = agent.log_text();
    for line in [
        "new flow to 192.0.2.11:80 NATed to ",
        "new flow to [2001:db8:ff00::10]:80 NATed to [",
    ] {
        ensure!(log.contains(line), "no eBPF log {line:?}:\n{log}");
    }
    Ok(())
}

/// The suite every dataplane must pass: TCP through two VIPs that share one backend port, UDP
/// request/response, IPv6; and what `/info` and `/stats` say about the dataplane. `ingress`
/// is the eBPF ingress hook expected on the veth (`dataplane.ingress: auto` picks TC there).
fn nat_suite(mode: &str, ingress: &str) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    std::fs::write(dir.path().join("who.txt"), "backend 8081")?;
    let _http = Service::http(&topo.agent, 8081, dir.path())?;
    let _echo = udp_echo(&topo.agent, 5353)?;
    let app_config = [
        app("web1", "192.0.2.10/32", "port:tcp:8081", "tcp:80:8081"),
        app("web2", "192.0.2.11/32", "port:tcp:8081", "tcp:80:8081"),
        app("dns", "192.0.2.12/32", "port:udp:5353", "udp:53:5353"),
        app(
            "web6",
            "2001:db8:ff00::10/128",
            "port:tcp:8081",
            "tcp:80:8081",
        ),
    ]
    .concat();
    let dataplane = match (mode, ingress) {
        ("ebpf", "xdp native") => "mode: ebpf\n  ingress: xdp".to_owned(),
        _ => format!("mode: {mode}"),
    };
    let config = write_config(dir.path(), &topo, &dataplane, &app_config)?;
    let mut agent = start_healthy(&topo, dir.path(), &config, 4)?;
    let (_, info) = topo.agent.http_get(&format!("http://{API}/info"))?;
    ensure!(
        info["dataplane"]["mode"] == mode
            && (mode == "iptables"
                || info["dataplane"]["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains(&format!("({ingress})")))),
        "dataplane in /info: {}",
        info["dataplane"]
    );

    for url in [
        "http://192.0.2.10:80/who.txt",
        "http://192.0.2.11:80/who.txt",
        "http://[2001:db8:ff00::10]:80/who.txt",
    ] {
        // Twice each, interleaved across VIPs: flows to one backend port stay apart.
        for _ in 0..2 {
            let (status, body) = topo.client.http_get(url)?;
            ensure!(
                status == 200 && body == "backend 8081",
                "{mode}: {url}: {status} {body}"
            );
        }
    }
    let both = vip_then_direct_from_one_port(&topo)?;
    ensure!(
        both == "True True",
        "{mode}: VIP then direct from one port: {both}"
    );
    let echoed = udp_exchange(&topo.client, "192.0.2.12", 53, 20)?;
    ensure!(echoed == 20, "{mode}: {echoed} of 20 UDP echoes came back");

    let (code, all) = topo.agent.http_get(&format!("http://{API}/stats"))?;
    if mode == "iptables" {
        ensure!(
            code == 200 && all["vips"] == serde_json::json!([]) && all["unavailable"].is_string(),
            "/stats without eBPF: {code} {all}"
        );
    } else {
        ensure!(code == 200, "/stats: {code} {all}");
        // eBPF NAT never instantiates iptables' nat table, which would turn on connection
        // tracking for all traffic.
        let tables = topo.agent.run("iptables-save", &[])?;
        ensure!(
            !tables.contains("*nat"),
            "{mode}: a nat table exists:\n{tables}"
        );
        // Exactly the datagrams sent, in and out.
        let dns = stats_until(&mut agent, &topo, "192.0.2.12", |v| {
            v["packets_in"] == 20 && v["packets_out"] == 20
        })?;
        ensure!(dns["vip"] == "192.0.2.12/32", "{dns}");
        ensure!(dns["bytes_in"].as_u64() > Some(20 * 28), "{dns}");
        // Two connections to web2: two SYNs in, two SYN-ACKs out, no RST.
        let web2 = stats_until(&mut agent, &topo, "192.0.2.11/32", |v| {
            v["syn_in"] == 2 && v["synack_out"] == 2
        })?;
        ensure!(web2["rst_out"] == 0, "{web2}");
        let metrics = topo
            .agent
            .run("curl", &["-sS", &format!("http://{API}/metrics")])?;
        ensure!(
            metrics.contains("gocast_vip_packets_total{vip=\"192.0.2.12/32\",direction=\"in\"} 20"),
            "metrics:\n{metrics}"
        );
        let status = topo.agent.run(
            gocast_tests::agent_binary()?.to_str().context("path")?,
            &["status", "--addr", API],
        )?;
        ensure!(
            status.contains("192.0.2.12/32") && status.contains("pkt/s"),
            "gocast status shows rates:\n{status}"
        );
        new_flows_logged(&agent)?;
    }

    let (status, elapsed) = agent.signal_and_wait("TERM", Duration::from_secs(5))?;
    ensure!(status.success(), "exit status {status}");
    ensure!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
    Ok(())
}

#[test]
fn ebpf_nat_serves_tcp_udp_ipv6_and_shared_backend_ports_and_counts_every_packet() -> Result<()> {
    require_privileged!();
    nat_suite("ebpf", "tc")
}

#[test]
fn ebpf_nat_with_xdp_ingress_serves_the_same_suite() -> Result<()> {
    require_privileged!();
    nat_suite("ebpf", "xdp native")
}

#[test]
fn iptables_nat_serves_the_same_suite() -> Result<()> {
    require_privileged!();
    nat_suite("iptables", "")
}

/// A service that listens (backlog 1) but does not accept until told to: the port stays open,
/// but once two connections wait the accept queue is full and the kernel drops new SYNs, which
/// is what passive health must catch.
struct Stuck(Running);

impl Stuck {
    fn start(ns: &Netns, port: u16) -> Result<Self> {
        let script = format!(
            "import socket, sys\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
             s.bind(('0.0.0.0', {port}))\ns.listen(1)\nprint('listening', flush=True)\nsys.stdin.readline()\n\
             while True:\n    s.accept()[0].close()\n"
        );
        let mut child = ns
            .command("python3")
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the stuck service")?;
        let stdout = child.stdout.take().context("stdout")?;
        let stuck = Self(Running(child));
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)?;
        ensure!(line.starts_with("listening"), "stuck service: {line:?}");
        Ok(stuck)
    }

    /// From now on the service accepts (and closes) every connection.
    fn accept(&mut self) -> Result<()> {
        let stdin = self.0.0.stdin.as_mut().context("stdin")?;
        stdin.write_all(b"accept\n")?;
        stdin.flush()?;
        Ok(())
    }
}

#[test]
fn passive_health_withdraws_a_service_that_listens_but_no_longer_answers() -> Result<()> {
    require_privileged!();
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    let _stuck = Stuck::start(&topo.agent, 8090)?;
    let app_config = format!(
        "{}    passive_health: true\n{}",
        app("stuck", "192.0.2.20/32", "port:tcp:8090", "tcp:80:8090"),
        // Same service, no passive health: it must stay announced.
        app("plain", "192.0.2.21/32", "port:tcp:8090", "tcp:80:8090"),
    );
    let config = write_config(dir.path(), &topo, "mode: ebpf", &app_config)?;
    let mut agent = start_healthy(&topo, dir.path(), &config, 2)?;

    // Connection attempts in the background: the first two fill the accept queue, the rest
    // get no SYN-ACK.
    let mut client = topo
        .client
        .command("python3")
        .args([
            "-c",
            "import socket\nfor i in range(40):\n    s = socket.socket()\n    s.settimeout(0.25)\n    \
             try:\n        s.connect(('192.0.2.20', 80))\n    except OSError:\n        pass\n",
        ])
        .spawn()
        .context("starting the client")?;
    let withdrawn = agent.wait_for("passive health failing", Duration::from_secs(15), |_| {
        let (_, routes) = topo.agent.http_get(&format!("http://{API}/routes"))?;
        Ok(routes["routes"].get("192.0.2.20/32").is_none())
    });
    let _ = client.kill();
    let _ = client.wait();
    withdrawn?;
    let apps = apps(&topo)?;
    let stuck = apps
        .iter()
        .find(|a| a["name"] == "stuck")
        .context("stuck")?;
    ensure!(stuck["state"] == "unhealthy", "{stuck}");
    ensure!(stuck["passive_health"]["state"] == "failing", "{stuck}");
    // The counters (SYNs without SYN-ACK) or the listener's full accept queue, whichever
    // noticed first.
    let reason = stuck["passive_health"]["reason"].as_str().unwrap_or("");
    ensure!(
        reason.contains("got no SYN-ACK") || reason.contains("does not accept"),
        "{stuck}"
    );
    // The port is open, but after a passive failure the port monitor wants proof that the
    // service accepts: it cannot get it.
    let monitor = stuck["monitors"][0]["reason"].as_str().unwrap_or("");
    ensure!(
        stuck["monitors"][0]["ok"] == false && monitor.contains("tcp port 8090"),
        "the port monitor asks for proof: {stuck}"
    );
    let plain = apps
        .iter()
        .find(|a| a["name"] == "plain")
        .context("plain")?;
    ensure!(plain["state"] == "healthy", "{plain}");
    Ok(())
}

/// The namespace's links with their XDP programs (`prog/xdp id N name gocast_xdp`). The TC
/// program is attached the same way, through a BPF link the agent's process holds (tcx).
fn attached_programs(ns: &Netns) -> Result<String> {
    ns.ip(&["-d", "link", "show"])
}

#[test]
fn programs_are_attached_while_the_agent_runs_and_gone_after_a_crash_or_a_stop() -> Result<()> {
    require_privileged!();
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    let config = write_config(dir.path(), &topo, "mode: auto\n  ingress: xdp", "  []\n")?;
    let start = |log: &str| {
        Agent::start(
            &topo.agent,
            &["--config", &config],
            &dir.path().join(log),
            API,
        )
    };
    let mut agent = start("first.log")?;
    agent.wait_for("programs attached", Duration::from_secs(5), |_| {
        let progs = attached_programs(&topo.agent)?;
        Ok(progs.contains("name gocast_xdp"))
    })?;
    // SIGKILL: no shutdown code runs; the kernel detaches programs held by the dead process.
    agent.signal_and_wait("KILL", Duration::from_secs(5))?;
    let mut gone = false;
    for _ in 0..100 {
        let progs = attached_programs(&topo.agent)?;
        if !progs.contains("gocast_xdp") {
            gone = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    ensure!(
        gone,
        "programs left after a crash:\n{}",
        attached_programs(&topo.agent)?
    );

    // A new agent attaches again (nothing stale in the way), then detaches on SIGTERM.
    let mut agent = start("second.log")?;
    agent.wait_for("the API", Duration::from_secs(5), |_| {
        Ok(topo.agent.http_get(&format!("http://{API}/info"))?.0 == 200)
    })?;
    let (_, info) = topo.agent.http_get(&format!("http://{API}/info"))?;
    ensure!(info["dataplane"]["mode"] == "ebpf", "{}", info["dataplane"]);
    ensure!(attached_programs(&topo.agent)?.contains("gocast_xdp"));
    let (status, _) = agent.signal_and_wait("TERM", Duration::from_secs(5))?;
    ensure!(status.success(), "exit status {status}");
    let progs = attached_programs(&topo.agent)?;
    ensure!(
        !progs.contains("gocast_xdp"),
        "programs left after SIGTERM:\n{progs}"
    );
    Ok(())
}

/// The route set has `vip`.
fn routed(topo: &Topology, vip: &str) -> Result<bool> {
    let (status, routes) = topo.agent.http_get(&format!("http://{API}/routes"))?;
    ensure!(status == 200, "/routes: {status}");
    Ok(routes["routes"].get(vip).is_some())
}

#[test]
fn passive_health_holds_a_stuck_service_down_without_flapping_until_it_accepts() -> Result<()> {
    require_privileged!();
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    let mut stuck = Stuck::start(&topo.agent, 8090)?;
    let app_config = format!(
        "{}    passive_health: true\n",
        app("stuck", "192.0.2.20/32", "port:tcp:8090", "tcp:80:8090")
    );
    let config = write_config(dir.path(), &topo, "mode: ebpf", &app_config)?;
    let mut agent = start_healthy(&topo, dir.path(), &config, 1)?;

    // Two connections fill the queue and stay open; the SYNs after them get no answer.
    let _client = Running(
        topo.client
            .command("python3")
            .args([
                "-c",
                "import socket, time\nheld = []\nfor i in range(12):\n    s = socket.socket()\n    \
                 s.settimeout(0.25)\n    try:\n        s.connect(('192.0.2.20', 80))\n        held.append(s)\n    \
                 except OSError:\n        pass\ntime.sleep(3600)\n",
            ])
            .spawn()
            .context("starting the client")?,
    );
    agent.wait_for("withdrawn", Duration::from_secs(15), |_| {
        Ok(!routed(&topo, "192.0.2.20/32")?)
    })?;
    // Three windows (3 s each) with no traffic reaching the withdrawn VIP: it stays withdrawn.
    let withdrawn_at = Instant::now();
    while withdrawn_at.elapsed() < Duration::from_secs(9) {
        ensure!(
            !routed(&topo, "192.0.2.20/32")?,
            "announced again {:?} after the withdrawal while the service does not accept",
            withdrawn_at.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, view) = topo.agent.http_get(&format!("http://{API}/apps/stuck"))?;
    let passive = &view["passive_health"];
    ensure!(
        passive["state"] == "failing"
            && passive["awaiting_proof"] == true
            && passive["failures"] == 1,
        "{view}"
    );
    ensure!(
        passive["reason"]
            .as_str()
            .is_some_and(|r| r.contains("does not accept")),
        "the full accept queue keeps it down: {view}"
    );

    stuck.accept()?;
    agent.wait_for("announced again", Duration::from_secs(15), |_| {
        routed(&topo, "192.0.2.20/32")
    })?;
    let (_, view) = topo.agent.http_get(&format!("http://{API}/apps/stuck"))?;
    let passive = &view["passive_health"];
    ensure!(
        passive["state"] == "ok" && passive["awaiting_proof"] == false,
        "{view}"
    );
    ensure!(
        agent
            .log_text()
            .contains("passive health: the service accepts again"),
        "log:\n{}",
        agent.log_text()
    );
    Ok(())
}

#[test]
fn stats_show_traffic_at_once_and_a_vip_registered_now() -> Result<()> {
    require_privileged!();
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    let _echo = udp_echo(&topo.agent, 5353)?;
    let config = write_config(
        dir.path(),
        &topo,
        "mode: ebpf",
        &app("dns", "192.0.2.12/32", "port:udp:5353", "udp:53:5353"),
    )?;
    let _agent = start_healthy(&topo, dir.path(), &config, 1)?;
    let read = |path: &str| -> Result<Value> {
        let (status, v) = topo.agent.http_get(&format!("http://{API}{path}"))?;
        ensure!(status == 200, "{path}: {status} {v}");
        Ok(v)
    };

    // One read right after the traffic, no waiting: exact.
    for round in 1..=3 {
        let echoed = udp_exchange(&topo.client, "192.0.2.12", 53, 10)?;
        ensure!(echoed == 10, "{echoed} of 10 echoes");
        let dns = read("/stats/192.0.2.12")?;
        ensure!(
            dns["packets_in"] == 10 * round && dns["packets_out"] == 10 * round,
            "round {round}: {dns}"
        );
    }
    // Rates over the caller's interval: two reads that far apart. The first may be one taken up
    // to 100 ms before the request (requests that close together share a read), so the answer
    // can come that much sooner than the interval.
    let asked = Instant::now();
    let dns = read("/stats/192.0.2.12?interval=500ms")?;
    let span = dns["rates_interval_s"]
        .as_f64()
        .context("rates_interval_s")?;
    ensure!(
        (0.5..2.0).contains(&span) && asked.elapsed() >= Duration::from_millis(400),
        "{dns}"
    );
    ensure!(
        dns["rates"]["packets_in"] == 0.0,
        "no traffic in the interval: {dns}"
    );
    let (status, bad) = topo
        .agent
        .http_get(&format!("http://{API}/stats?interval=1h"))?;
    ensure!(status == 400, "{status} {bad}");

    // A VIP registered now is in /stats as soon as its app is healthy and its VIP is on `lo`
    // (the counter slot is taken when the VIP is installed, a moment after the verdict).
    let (status, view) = topo.agent.http_post(&format!(
        "http://{API}/register?name=late&vip=192.0.2.13/32&monitor=port:udp:5353&nat=udp:53:5353"
    ))?;
    ensure!(status == 200, "register: {status} {view}");
    let started = Instant::now();
    loop {
        let (_, app) = topo.agent.http_get(&format!("http://{API}/apps/late"))?;
        if app["state"] == "healthy" && app["vip_installed"] == true {
            break;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(10),
            "late never healthy with its VIP installed: {app}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let all = read("/stats")?;
    let late = all["vips"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["vip"] == "192.0.2.13/32"))
        .with_context(|| format!("192.0.2.13 in {all}"))?;
    ensure!(late["app"] == "late" && late["packets_in"] == 0, "{late}");
    let echoed = udp_exchange(&topo.client, "192.0.2.13", 53, 5)?;
    ensure!(echoed == 5, "{echoed} of 5 echoes");
    let late = read("/stats/192.0.2.13/32")?;
    ensure!(
        late["packets_in"] == 5 && late["packets_out"] == 5,
        "{late}"
    );
    Ok(())
}
