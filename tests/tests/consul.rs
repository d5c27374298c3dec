//! Consul discovery and the `consul` monitor against a fake Consul (see
//! `gocast_tests::fake_consul`) in the agent's namespace, with BIRD as the peer: a tagged
//! service becomes a route at BIRD and follows its tags; checks decide the `consul` monitor;
//! Consul trouble (down, 5xx, malformed JSON, bad tags) withdraws nothing and loses nothing,
//! until a `consul` monitor's grace runs out.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use gocast_tests::{
    Agent, Service, Topology, agent_binary,
    fake_consul::{FakeConsul, Mode},
    require_privileged,
    routers::{API, Bird, Neighbor, wait_until},
};
use serde_json::Value;

const NODE: &str = "node-1";
const TOKEN: &str = "s3cret-token";

/// Writes the agent's config: monitors every 100 ms, Consul at `consul`, `consul_extra`
/// appended to `agent:`, a session with BIRD in the client namespace, no config apps, and the
/// iptables dataplane, whose rules the tests read to see where NAT sends traffic.
fn config(dir: &Path, topo: &Topology, consul: &str, consul_extra: &str) -> Result<String> {
    let path = dir.join("config.yaml");
    std::fs::write(
        &path,
        format!(
            "agent:\n  listen_addr: {API}\n  monitor_interval: 100ms\n  cleanup_timer: 1s\n  state_file: {state}\n  consul_addr: {consul}\n{consul_extra}\
             bgp:\n  local_as: 65001\n  remote_as: 65000\n  peer_ip: {peer}\n\
             dataplane:\n  mode: iptables\n",
            state = dir.join("state.json").display(),
            peer = topo.client_ip,
        ),
    )?;
    Ok(path.to_string_lossy().into_owned())
}

/// Starts the agent in the agent namespace with GoCast's Consul environment variables.
fn start_agent(topo: &Topology, dir: &Path, config: &str, env: &[(&str, &str)]) -> Result<Agent> {
    let bin = agent_binary()?;
    let mut args: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    args.push(bin.to_string_lossy().into_owned());
    args.extend(["run", "--config", config].map(str::to_owned));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // `env` sets the variables and execs the agent, so the child is still the agent itself.
    Agent::start_with(
        Path::new("/usr/bin/env"),
        &topo.agent,
        &args,
        &dir.join("agent.log"),
        API,
    )
}

fn apps(topo: &Topology) -> Result<Vec<Value>> {
    let (status, body) = topo.agent.http_get(&format!("http://{API}/apps"))?;
    ensure!(status == 200, "/apps: {status} {body}");
    Ok(body.as_array().cloned().unwrap_or_default())
}

fn app(topo: &Topology, name: &str) -> Result<Option<Value>> {
    Ok(apps(topo)?.into_iter().find(|a| a["name"] == name))
}

fn routed(bird: &Bird, prefix: &str) -> Result<bool> {
    Ok(!bird.route(prefix)?.is_empty())
}

fn metrics(topo: &Topology) -> Result<String> {
    let (_, body) = topo.agent.http_get(&format!("http://{API}/metrics"))?;
    Ok(body.as_str().unwrap_or_default().to_owned())
}

/// Every request carried the token; the catalog reads were stale, and blocking after the first.
fn requests_carried_token_stale_and_index(consul: &FakeConsul) -> Result<()> {
    let seen = consul.seen();
    ensure!(
        seen.iter().all(|r| r.token.as_deref() == Some(TOKEN)),
        "{seen:?}"
    );
    let catalog: Vec<_> = seen
        .iter()
        .filter(|r| r.path == format!("/v1/catalog/node/{NODE}"))
        .collect();
    ensure!(
        catalog
            .iter()
            .all(|r| r.query.split('&').any(|p| p == "stale")),
        "{catalog:?}"
    );
    ensure!(
        catalog
            .iter()
            .any(|r| r.query.contains("index=") && r.query.contains("wait=")),
        "{catalog:?}"
    );
    Ok(())
}

/// A service with a bad VIP is refused and named in a WARN; the other apps go on.
fn a_bad_tag_is_refused_and_named(
    agent: &mut Agent,
    consul: &FakeConsul,
    topo: &Topology,
    bird: &Bird,
    web_tags: &[&str],
) -> Result<()> {
    consul.set_service(
        "api",
        "api",
        &["enable_gocast", "gocast_vip=192.0.2.300/32"],
        "",
    );
    let named = |log: &str, service: &str, tag: &str| {
        log.lines().any(|l| {
            l.contains("WARN")
                && l.contains("consul service refused")
                && l.contains(&format!("service \"{service}\", tag \"{tag}\""))
        })
    };
    agent.wait_for("the bad tag in the log", Duration::from_secs(5), |a| {
        Ok(named(&a.log_text(), "api", "gocast_vip=192.0.2.300/32"))
    })?;
    ensure!(app(topo, "api")?.is_none() && routed(bird, "192.0.2.70/32")?);
    ensure!(
        metrics(topo)?.contains("gocast_consul_services_refused 1"),
        "{}",
        metrics(topo)?
    );
    // A known service whose tags turn bad keeps its last good app (and its route).
    let mut bad = web_tags.to_vec();
    bad.push("gocast_nat=tcp:99999");
    consul.set_service("web-1", "web", &bad, "");
    agent.wait_for("the bad web tag in the log", Duration::from_secs(5), |a| {
        Ok(named(&a.log_text(), "web", "gocast_nat=tcp:99999"))
    })?;
    let web = app(topo, "web")?.context("web kept")?;
    ensure!(
        web["state"] == "healthy" && routed(bird, "192.0.2.70/32")?,
        "{web}"
    );
    consul.set_service("web-1", "web", web_tags, "");
    Ok(())
}

/// A service whose VIP an HTTP app holds is refused; once the HTTP app is unregistered, the
/// service comes up within seconds, though the catalog does not change and the blocking
/// query would only answer after `consul_query_interval` (5 minutes here).
fn a_refused_service_gets_a_freed_vip_quickly(
    agent: &mut Agent,
    consul: &FakeConsul,
    topo: &Topology,
    bird: &Bird,
) -> Result<()> {
    let (status, body) = topo.agent.http_get(&format!(
        "http://{API}/register?name=holder&vip=192.0.2.75/32"
    ))?;
    ensure!(status == 200, "/register: {status} {body}");
    consul.set_service(
        "late-1",
        "late",
        &["enable_gocast", "gocast_vip=192.0.2.75/32"],
        "",
    );
    agent.wait_for("late refused", Duration::from_secs(5), |a| {
        Ok(a.log_text().lines().any(|l| {
            l.contains("WARN") && l.contains("\"late\"") && l.contains("used by app holder")
        }))
    })?;
    ensure!(app(topo, "late")?.is_none());
    let (status, body) = topo
        .agent
        .http_get(&format!("http://{API}/unregister?name=holder"))?;
    ensure!(status == 200, "/unregister: {status} {body}");
    let t = Instant::now();
    agent.wait_for("late takes the freed VIP", Duration::from_secs(10), |_| {
        Ok(app(topo, "late")?.is_some_and(|a| a["source"] == "consul")
            && routed(bird, "192.0.2.75/32")?)
    })?;
    ensure!(
        t.elapsed() < Duration::from_secs(6),
        "the freed VIP took {:?}",
        t.elapsed()
    );
    consul.remove_service("late-1");
    agent.wait_for("late gone", Duration::from_secs(5), |_| {
        Ok(app(topo, "late")?.is_none())
    })?;
    Ok(())
}

/// Down, 5xx, malformed JSON, slow: each shorter than the grace; no route leaves BIRD, no app
/// is lost, and each kind of trouble is warned about and counted.
fn short_trouble_moves_nothing(
    consul: &FakeConsul,
    topo: &Topology,
    bird: &Bird,
    agent: &Agent,
) -> Result<()> {
    let both = |bird: &Bird| -> Result<bool> {
        Ok(routed(bird, "192.0.2.71/32")? && routed(bird, "192.0.2.72/32")?)
    };
    for mode in [
        Mode::Refuse,
        Mode::Error500,
        Mode::Malformed,
        Mode::Slow(Duration::from_secs(2)),
    ] {
        consul.set_mode(mode);
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(1500) {
            ensure!(both(bird)?, "a route left BIRD while Consul was {mode:?}");
            let names: Vec<Value> = apps(topo)?.iter().map(|a| a["name"].clone()).collect();
            ensure!(
                names.len() == 2,
                "apps while Consul was {mode:?}: {names:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        consul.set_mode(Mode::Normal);
        // Let the monitor get a fresh answer before the next outage.
        std::thread::sleep(Duration::from_millis(800));
    }
    let log = agent.log_text();
    ensure!(
        log.contains("WARN") && log.contains("Consul request failed"),
        "no warning:\n{log}"
    );
    let m = metrics(topo)?;
    for result in ["unreachable", "http_5xx", "malformed"] {
        ensure!(
            m.contains(&format!("result=\"{result}\"")),
            "{result} not counted:\n{m}"
        );
    }
    Ok(())
}

#[test]
fn a_tagged_service_reaches_bird_follows_its_tags_and_leaves_with_the_catalog() -> Result<()> {
    require_privileged!();
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    let bird = Bird::start(&topo.client, dir.path(), &Neighbor::toward_agent(&topo))?;
    let _service = Service::http(&topo.agent, 8090, dir.path())?;
    let consul = FakeConsul::start(&topo.agent, "127.0.0.1", NODE, Some(TOKEN))?;
    let web_tags = [
        "enable_gocast",
        "gocast_vip=192.0.2.70/32",
        "gocast_monitor=port:tcp:8090",
        "gocast_nat=tcp:80:8090",
        "gocast_vip_communities=65001:70",
        "v1",
    ];
    consul.set_service("web-1", "web", &web_tags, "");
    consul.set_service("db", "db", &["primary"], "");
    // A long query interval: changes must still arrive at once, through blocking queries.
    let config = config(
        dir.path(),
        &topo,
        &consul.url(),
        "  consul_query_interval: 5m\n",
    )?;
    let mut agent = start_agent(
        &topo,
        dir.path(),
        &config,
        &[
            ("CONSUL_NODE", NODE),
            ("CONSUL_STALE", "true"),
            // GoCast's variable wins over Consul's.
            ("CONSUL_TOKEN", TOKEN),
            ("CONSUL_HTTP_TOKEN", "not-the-token"),
            // A proxy that does not exist: Consul on loopback must be reached directly.
            ("HTTP_PROXY", "http://127.0.0.1:9"),
            ("http_proxy", "http://127.0.0.1:9"),
        ],
    )?;

    agent.wait_for("web at BIRD", Duration::from_secs(10), |_| {
        routed(&bird, "192.0.2.70/32")
    })?;
    let route = bird.route("192.0.2.70/32")?;
    ensure!(route.contains("(65001,70)"), "community:\n{route}");
    let web = app(&topo, "web")?.context("web in /apps")?;
    ensure!(
        web["source"] == "consul" && web["state"] == "healthy",
        "{web}"
    );
    ensure!(
        app(&topo, "db")?.is_none(),
        "untagged services are not apps"
    );
    let nat = topo.agent.nat_rules("iptables")?;
    ensure!(
        nat.contains("192.0.2.70/32") && nat.contains(&format!("{}:8090", topo.agent_ip)),
        "NAT to the local address:\n{nat}"
    );
    // Consul apps come back from Consul: not in the HTTP state file.
    let state = std::fs::read_to_string(dir.path().join("state.json")).unwrap_or_default();
    ensure!(!state.contains("192.0.2.70"), "state file: {state}");

    // A tag change arrives within a second, though the query interval is 5 minutes.
    let changed = web_tags.map(|t| {
        if t.starts_with("gocast_vip_communities") {
            "gocast_vip_communities=65001:71"
        } else {
            t
        }
    });
    let t = Instant::now();
    consul.set_service("web-1", "web", &changed, "");
    agent.wait_for("the new community at BIRD", Duration::from_secs(5), |_| {
        Ok(bird.route("192.0.2.70/32")?.contains("(65001,71)"))
    })?;
    ensure!(
        t.elapsed() < Duration::from_millis(1500),
        "tag change took {:?}",
        t.elapsed()
    );

    a_bad_tag_is_refused_and_named(&mut agent, &consul, &topo, &bird, &changed)?;
    a_refused_service_gets_a_freed_vip_quickly(&mut agent, &consul, &topo, &bird)?;
    requests_carried_token_stale_and_index(&consul)?;

    // The service leaves the catalog: withdrawn, VIP and NAT removed, forgotten.
    consul.remove_service("web-1");
    agent.wait_for("web withdrawn and removed", Duration::from_secs(5), |_| {
        Ok(!routed(&bird, "192.0.2.70/32")? && app(&topo, "web")?.is_none())
    })?;
    let nat = topo.agent.nat_rules("iptables")?;
    ensure!(!nat.contains("192.0.2.70"), "NAT left:\n{nat}");
    let lo = topo.agent.ip(&["addr", "show", "dev", "lo"])?;
    ensure!(!lo.contains("192.0.2.70"), "VIP left:\n{lo}");
    Ok(())
}

#[test]
fn consul_checks_decide_and_consul_trouble_withdraws_nothing_until_the_grace() -> Result<()> {
    require_privileged!();
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    let bird = Bird::start(&topo.client, dir.path(), &Neighbor::toward_agent(&topo))?;
    let _service = Service::http(&topo.agent, 8090, dir.path())?;
    let consul = FakeConsul::start(&topo.agent, "127.0.0.1", NODE, None)?;
    consul.set_service(
        "web",
        "web",
        &[
            "enable_gocast",
            "gocast_vip=192.0.2.71/32",
            "gocast_monitor=consul",
        ],
        "",
    );
    consul.set_service(
        "api",
        "api",
        &[
            "enable_gocast",
            "gocast_vip=192.0.2.72/32",
            "gocast_monitor=port:tcp:8090",
        ],
        "",
    );
    consul.set_check(None, "web", "service:web", "passing");
    consul.set_check(None, "web", "web-tcp", "passing");
    // An instance of web not made for GoCast: GoCast's filter leaves its check out.
    consul.set_check_tagged(None, "web", "web-untagged", "critical", &["v2"]);
    let grace = Duration::from_secs(3);
    let config = config(
        dir.path(),
        &topo,
        &consul.url(),
        "  consul_query_interval: 2s\n  consul_monitor_grace: 3s\n  consul_node: node-1\n",
    )?;
    let mut agent = start_agent(&topo, dir.path(), &config, &[])?;
    let both = |bird: &Bird| -> Result<bool> {
        Ok(routed(bird, "192.0.2.71/32")? && routed(bird, "192.0.2.72/32")?)
    };
    agent.wait_for("both at BIRD", Duration::from_secs(10), |_| both(&bird))?;
    let seen = consul.seen();
    let agent_checks: Vec<_> = seen
        .iter()
        .filter(|r| r.path == "/v1/agent/checks")
        .collect();
    ensure!(
        !agent_checks.is_empty()
            && agent_checks
                .iter()
                .all(|r| r.query == "filter=enable_gocast%20in%20ServiceTags"),
        "{agent_checks:?}"
    );

    // One failing check of the service withdraws it; the other app is untouched.
    consul.set_check(None, "web", "web-tcp", "critical");
    agent.wait_for("web withdrawn", Duration::from_secs(5), |_| {
        Ok(!routed(&bird, "192.0.2.71/32")? && routed(&bird, "192.0.2.72/32")?)
    })?;
    let web = app(&topo, "web")?.context("web")?;
    let reason = web["monitors"][0]["reason"].as_str().unwrap_or_default();
    ensure!(
        reason.contains("web-tcp") && reason.contains("critical"),
        "{web}"
    );
    consul.set_check(None, "web", "web-tcp", "passing");
    agent.wait_for("web back", Duration::from_secs(5), |_| both(&bird))?;

    short_trouble_moves_nothing(&consul, &topo, &bird, &agent)?;

    // Down for longer than the grace: the consul monitor fails after it, not before; the
    // port-monitored app stays, and both apps are still known.
    consul.set_mode(Mode::Refuse);
    let down = Instant::now();
    let gone = wait_until(
        "web withdrawn after the grace",
        Duration::from_secs(10),
        || Ok(!routed(&bird, "192.0.2.71/32")?),
    )
    .with_context(|| agent.log_text())?;
    ensure!(
        gone + Duration::from_millis(300) >= grace,
        "withdrawn after {gone:?}, before the {grace:?} grace"
    );
    ensure!(down.elapsed() < grace + Duration::from_secs(3), "{gone:?}");
    ensure!(routed(&bird, "192.0.2.72/32")?, "api must stay");
    let web = app(&topo, "web")?.context("web still known")?;
    let reason = web["monitors"][0]["reason"].as_str().unwrap_or_default();
    ensure!(reason.contains("no answer from Consul"), "{web}");
    consul.set_mode(Mode::Normal);
    agent.wait_for("web back after the outage", Duration::from_secs(10), |_| {
        both(&bird)
    })?;
    Ok(())
}

#[test]
fn a_remote_consul_is_asked_per_service_and_only_this_nodes_checks_count() -> Result<()> {
    require_privileged!();
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    // Not on loopback: the agent reads /v1/health/checks/{service}, not /v1/agent/checks.
    let consul = FakeConsul::start(&topo.agent, &topo.agent_ip, NODE, None)?;
    consul.set_service(
        "web",
        "web",
        &[
            "enable_gocast",
            "gocast_vip=192.0.2.73/32",
            "gocast_monitor=consul",
        ],
        "",
    );
    consul.set_check(None, "web", "service:web", "passing");
    consul.set_check(Some("node-2"), "web", "service:web", "critical");
    let config = config(
        dir.path(),
        &topo,
        &consul.url(),
        "  consul_monitor_grace: 1s\n",
    )?;
    let mut agent = start_agent(&topo, dir.path(), &config, &[("CONSUL_NODE", NODE)])?;
    let state = |topo: &Topology| -> Result<String> {
        Ok(app(topo, "web")?
            .map(|a| a["state"].as_str().unwrap_or_default().to_owned())
            .unwrap_or_default())
    };
    agent.wait_for("web healthy", Duration::from_secs(10), |_| {
        Ok(state(&topo)? == "healthy")
    })?;
    consul.set_check(None, "web", "service:web", "warning");
    agent.wait_for("web unhealthy", Duration::from_secs(5), |_| {
        Ok(state(&topo)? == "unhealthy")
    })?;
    // No checks at all on this node: failing (documented choice, as in GoCast).
    consul.remove_checks();
    agent.wait_for("no checks: unhealthy", Duration::from_secs(5), |_| {
        let web = app(&topo, "web")?.context("web")?;
        Ok(web["monitors"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("no checks")))
    })?;
    let seen = consul.seen();
    ensure!(
        seen.iter().any(|r| r.path == "/v1/health/checks/web")
            && !seen.iter().any(|r| r.path == "/v1/agent/checks"),
        "{seen:?}"
    );
    Ok(())
}
