//! Config parsing: every GoCast shape, defaults, validation errors, the printed form.

use super::*;

fn parse(yaml: &str) -> Result<Config, ConfigError> {
    Config::parse(yaml, "test.yaml")
}

fn err(yaml: &str) -> String {
    parse(yaml).unwrap_err().to_string()
}

#[test]
fn go_durations_parse_like_go() {
    for (s, d) in [
        ("500ms", Duration::from_millis(500)),
        ("10s", Duration::from_secs(10)),
        ("15m", Duration::from_secs(900)),
        ("1h30m", Duration::from_secs(5400)),
        ("1.5s", Duration::from_millis(1500)),
        ("100us", Duration::from_micros(100)),
        ("0", Duration::ZERO),
    ] {
        assert_eq!(go_duration::parse(s).unwrap(), d, "{s}");
    }
    for bad in ["", "10", "ten", "5 s", "-1s", "1d", "s", "."] {
        assert!(go_duration::parse(bad).is_err(), "{bad:?}");
    }
    assert_eq!(go_duration::format(Duration::from_secs(5400)), "1h30m");
    assert_eq!(go_duration::format(Duration::from_millis(100)), "100ms");
}

#[test]
fn empty_config_gets_safe_defaults() {
    let c = parse("").unwrap();
    assert_eq!(c.agent.state_file, default_state_file("test.yaml"));
    assert!(c.agent.state_file.starts_with(STATE_DIR));
    assert_ne!(
        default_state_file("/etc/a.yaml"),
        default_state_file("/etc/b.yaml")
    );
    assert_eq!(c.agent.listen_addr.addr, "127.0.0.1:8080".parse().unwrap());
    assert!(!c.agent.listen_addr.all_interfaces);
    assert_eq!(c.agent.monitor_interval, DEFAULT_MONITOR_INTERVAL);
    assert_eq!(c.agent.cleanup_timer, DEFAULT_CLEANUP_TIMER);
    assert_eq!((c.agent.monitor_rise, c.agent.monitor_fall), (1, 1));
    assert!(!c.agent.allow_http_exec);
    assert!(c.bgp.peers.is_empty() && c.apps.is_empty());
}

#[test]
fn go_style_listen_addr_binds_all_interfaces() {
    let c = parse("agent:\n  listen_addr: :8080\n").unwrap();
    assert!(c.agent.listen_addr.all_interfaces);
    assert_eq!(c.agent.listen_addr.addr.port(), 8080);
    assert_eq!(
        parse("agent: {listen_addr: 'localhost:9000'}")
            .unwrap()
            .agent
            .listen_addr
            .addr
            .port(),
        9000
    );
    assert!(err("agent: {listen_addr: 'nowhere'}").contains("agent.listen_addr"));
}

#[test]
fn single_peer_form_accepts_remote_as_or_peer_as() {
    for key in ["remote_as", "peer_as"] {
        let c = parse(&format!(
            "bgp:\n  local_as: 65001\n  {key}: 65000\n  local_ip: 198.18.0.1\n  peer_ip: 198.18.0.2\n  communities: [\"65001:100\"]\n  origin: igp\n"
        ))
        .unwrap();
        let p = &c.bgp.peers[0];
        assert_eq!((p.local_as, p.peer_as, p.peer_port), (65001, 65000, 179));
        assert_eq!(p.peer_ip, Some("198.18.0.2".parse().unwrap()));
        assert_eq!(p.communities, vec![Community::Standard(65001 << 16 | 100)]);
        assert_eq!(p.origin, Origin::Igp);
        assert_eq!(p.hold_time, DEFAULT_HOLD_TIME);
    }
}

#[test]
fn multi_peer_form_folds_section_values_into_each_peer() {
    let c = parse(
        "bgp:\n  local_as: 65001\n  local_ip: 198.18.0.1\n  origin: egp\n  communities: ['1:2']\n  hold_time: 30\n  peers:\n    - {peer_ip: 198.18.0.2, peer_as: 65000}\n    - {peer_ip: 198.18.0.6, remote_as: 65002, hold_time: 9s, local_ip: 198.18.0.5}\n",
    )
    .unwrap();
    assert_eq!(c.bgp.peers.len(), 2);
    let (a, b) = (&c.bgp.peers[0], &c.bgp.peers[1]);
    assert_eq!(
        (a.peer_as, a.hold_time, a.origin),
        (65000, Duration::from_secs(30), Origin::Egp)
    );
    assert_eq!(a.local_ip, Some("198.18.0.1".parse().unwrap()));
    assert_eq!((b.peer_as, b.hold_time), (65002, Duration::from_secs(9)));
    assert_eq!(b.local_ip, Some("198.18.0.5".parse().unwrap()));
    assert_eq!(b.communities, a.communities);
}

#[test]
fn list_of_blocks_form_gives_one_peer_per_block() {
    let c = parse(
        "bgp:\n  - {local_as: 65001, remote_as: 65000, peer_ip: 198.18.0.2, origin: incomplete}\n  - {local_as: 65001, remote_as: 65003, peer_ip: 2001:db8::2, communities: ['1:1:1']}\n",
    )
    .unwrap();
    assert_eq!(c.bgp.peers.len(), 2);
    assert_eq!(c.bgp.peers[0].origin, Origin::Incomplete);
    assert_eq!(c.bgp.peers[1].communities, vec![Community::Large(1, 1, 1)]);
}

#[test]
fn absent_peer_ip_means_autodiscovery() {
    let c = parse("bgp: {local_as: 65001, remote_as: 65000}").unwrap();
    assert_eq!(c.bgp.peers[0].peer_ip, None);
}

#[test]
fn apps_take_monitor_or_monitors() {
    let c = parse(
        "apps:\n  - name: a\n    vip: 192.0.2.1/32\n    monitor: port:tcp:5000\n  - name: b\n    vip: 2001:db8::1/128\n    vip_config:\n      bgp_communities: [no-export, '65000:1:2']\n    monitors: ['port:udp:53', 'exec:test -e /tmp/x:y']\n    nats: ['tcp:80:8080', 'udp:53']\n",
    )
    .unwrap();
    assert_eq!(c.apps[0].monitors, vec!["port:tcp:5000".parse().unwrap()]);
    assert_eq!(c.apps[1].monitors.len(), 2);
    assert_eq!(c.apps[1].nats.len(), 2);
    assert_eq!(c.apps[1].communities.len(), 2);
    assert!(
        err("apps: [{name: a, vip: 192.0.2.1/32, monitor: 'port:tcp:1', monitors: []}]")
            .contains("either monitor")
    );
}

#[test]
fn unknown_keys_are_errors_naming_key_and_line() {
    let e = err("agent:\n  listen_addr: 127.0.0.1:1\n  monitor_intervall: 1s\n");
    assert!(
        e.contains("monitor_intervall") && e.contains("line 3"),
        "{e}"
    );
    let e = err("bgp:\n  local_as: 1\n  remote_as: 2\n  peer_addr: 198.18.0.2\n");
    assert!(e.contains("peer_addr"), "{e}");
    let e = err("apps:\n  - name: a\n    vip: 192.0.2.1/32\n    monitorz: x\n");
    assert!(e.contains("monitorz") && e.contains("line 4"), "{e}");
    assert!(err("unknown_section: {}").contains("unknown_section"));
}

#[test]
fn bad_values_are_errors_naming_key_and_line() {
    for (yaml, needle) in [
        ("agent:\n  monitor_interval: 10\n", "invalid duration"),
        ("agent:\n  cleanup_timer: soon\n", "invalid duration"),
        ("agent:\n  monitor_interval: 0s\n", "greater than zero"),
        ("agent:\n  monitor_rise: 0\n", "at least 1"),
        ("agent:\n  allow_http_exec: maybe\n", "allow_http_exec"),
        ("agent:\n  vip_allowlist: [192.0.2.0/33]\n", "vip_allowlist"),
        ("agent:\n  consul_addr: ftp://127.0.0.1:8500\n", "http://"),
        ("agent:\n  consul_addr: 'http://'\n", "consul_addr"),
        (
            "agent:\n  consul_addr: http://a/v1\n  consul_node: ''\n",
            "consul_node",
        ),
        (
            "agent:\n  consul_addr: http://a/v1\n  consul_monitor_grace: 0s\n",
            "greater than zero",
        ),
        ("bgp:\n  local_as: x\n  remote_as: 1\n", "local_as"),
        ("bgp:\n  remote_as: 1\n", "local_as: is required"),
        ("bgp:\n  local_as: 1\n", "peer_as: is required"),
        (
            "bgp:\n  local_as: 1\n  peer_as: 2\n  remote_as: 3\n",
            "disagree",
        ),
        (
            "bgp:\n  local_as: 1\n  remote_as: 2\n  communities: ['70000:1']\n",
            "invalid community",
        ),
        (
            "bgp:\n  local_as: 1\n  remote_as: 2\n  hold_time: 2\n",
            "at least 3s",
        ),
        (
            "bgp:\n  local_as: 1\n  remote_as: 2\n  peer_ip: 198.18.0.300\n",
            "peer_ip",
        ),
        ("apps:\n  - name: a\n    vip: 192.0.2.1/40\n", "invalid vip"),
        ("apps:\n  - name: a\n    vip: 127.0.0.1/32\n", "loopback"),
        (
            "apps:\n  - name: 'a b'\n    vip: 192.0.2.1/32\n",
            "invalid app name",
        ),
        (
            "apps:\n  - name: a\n    vip: 192.0.2.1/32\n    monitor: http:80\n",
            "invalid monitor",
        ),
        (
            "apps:\n  - name: a\n    vip: 192.0.2.1/32\n    nats: ['tcp:80:0']\n",
            "invalid nat",
        ),
        (
            "apps:\n  - name: a\n    vip: 192.0.2.1/32\n    vip_config: {bgp_communities: [bad]}\n",
            "invalid community",
        ),
        (
            "apps: [{name: a, vip: 192.0.2.1/32}, {name: a, vip: 192.0.2.2/32}]",
            "defined twice",
        ),
        (
            "apps: [{name: a, vip: 192.0.2.1/32}, {name: b, vip: 192.0.2.1/32}]",
            "already used by app a",
        ),
        (
            "apps: [{name: a, vip: 192.0.2.1/32}, {name: b, vip: 192.0.2.9/24}]",
            "overlaps vip 192.0.2.1/32 of app a",
        ),
        ("agent: [1, 2]", "agent"),
        ("bgp: {local_as: 0, remote_as: 2}", "AS 0 is reserved"),
        ("bgp: {local_as: 1, remote_as: 0}", "AS 0 is reserved"),
        (
            "bgp: {local_as: 1, remote_as: 2, multihop: 0}",
            "TTL of 1-255",
        ),
        (
            "bgp: {local_as: 1, peers: [{peer_ip: 198.18.0.2, peer_as: 2}, {peer_ip: 198.18.0.2, peer_as: 3, peer_port: 1179}]}",
            "configured twice",
        ),
        ("bgp: 5", "bgp"),
        ("apps:\n  - name: a\n   vip: x\n", "line"),
    ] {
        let e = err(yaml);
        assert!(
            e.contains(needle),
            "{yaml:?} gave {e:?}, expected {needle:?}"
        );
        assert!(e.starts_with("test.yaml"), "{e}");
    }
}

#[test]
fn an_app_vip_on_a_configured_peer_next_hop_or_local_address_is_refused_naming_the_key() {
    for (yaml, needle) in [
        (
            "bgp: {local_as: 1, remote_as: 2, peer_ip: 198.18.1.2}\napps: [{name: a, vip: 198.18.1.2/32}]",
            "apps[0].vip: vip 198.18.1.2/32 equals 198.18.1.2 (bgp peer_ip)",
        ),
        (
            "bgp: {local_as: 1, remote_as: 2, peer_ip: 198.18.1.2}\napps: [{name: a, vip: 192.0.2.1/32}, {name: b, vip: 198.18.1.1/30}]",
            "apps[1].vip: vip 198.18.1.1/30 covers 198.18.1.2 (bgp peer_ip)",
        ),
        (
            "bgp: {local_as: 1, remote_as: 2, peer_ip: 198.18.1.2, next_hop: 203.0.113.9}\napps: [{name: a, vip: 203.0.113.0/24}]",
            "covers 203.0.113.9 (bgp next_hop)",
        ),
        (
            "bgp: {local_as: 1, remote_as: 2, local_ip: 198.18.1.1}\napps: [{name: a, vip: 198.18.1.1/32}]",
            "equals 198.18.1.1 (bgp local_ip)",
        ),
    ] {
        let e = err(yaml);
        assert!(e.contains(needle), "{yaml}: {e}");
    }
}

#[test]
fn bad_dataplane_values_are_errors_naming_the_key() {
    for (yaml, needle) in [
        ("dataplane: {mode: xdp}", "dataplane.mode"),
        ("dataplane: {ingress: skb}", "dataplane.ingress"),
        (
            "dataplane: {passive_health: {window: 100ms}}",
            "dataplane.passive_health.window",
        ),
        (
            "dataplane: {passive_health: {max_unanswered: 1.5}}",
            "dataplane.passive_health.max_unanswered",
        ),
        (
            "dataplane: {passive_health: {min_syn: 0}}",
            "dataplane.passive_health.min_syn",
        ),
        (
            "dataplane: {passive_health: {windw: 10s}}",
            "dataplane.passive_health",
        ),
        ("dataplane: {interfaces: ['a/b']}", "not an interface name"),
    ] {
        let e = err(yaml);
        assert!(
            e.contains(needle),
            "{yaml:?} gave {e:?}, expected {needle:?}"
        );
    }
}

#[test]
fn errors_inside_values_carry_the_line() {
    let e = err("apps:\n  - name: a\n    vip: 192.0.2.1/32\n  - name: b\n    vip: nope\n");
    assert!(
        e.contains("apps[1].vip") && e.contains("\"nope\"") && e.contains("line 5"),
        "{e}"
    );
}

#[test]
fn password_is_never_printed() {
    let c =
        parse("bgp: {local_as: 1, remote_as: 2, peer_ip: 198.18.0.2, password: s3cret}").unwrap();
    assert_eq!(c.bgp.peers[0].password.as_deref(), Some("s3cret"));
    assert!(!c.to_yaml().contains("s3cret"));
}

/// The example configs in `config/`: every file loads, and each shape is what it claims.
#[test]
fn every_file_in_config_dir_loads() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            let c = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
            seen.push((path.file_name().unwrap().to_string_lossy().into_owned(), c));
        }
    }
    let get = |name: &str| {
        &seen
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{name} missing"))
            .1
    };
    let example = get("gocast-example.yaml");
    assert!(example.agent.listen_addr.all_interfaces);
    assert_eq!(example.bgp.peers.len(), 1);
    assert_eq!(example.apps[0].monitors.len(), 1);
    assert_eq!(get("gocast-multipeer.yaml").bgp.peers.len(), 2);
    assert_eq!(get("gocast-threatx-list.yaml").bgp.peers.len(), 2);
    assert!(get("minimal.yaml").apps.is_empty());
}

#[test]
fn dataplane_section_defaults_to_auto() {
    assert_eq!(parse("").unwrap().dataplane.mode, DataplaneMode::Auto);
    let c = parse("dataplane: {mode: iptables, interfaces: [eth0]}").unwrap();
    assert_eq!(
        (c.dataplane.mode, c.dataplane.interfaces.len()),
        (DataplaneMode::Iptables, 1)
    );
    let c = parse("dataplane: {mode: ebpf, interfaces: [eth0, eth1]}").unwrap();
    assert_eq!(
        (c.dataplane.mode, c.dataplane.interfaces.len()),
        (DataplaneMode::Ebpf, 2)
    );
}

#[test]
fn unknown_origin_is_incomplete_as_in_gocast() {
    let c = parse("bgp: {local_as: 1, remote_as: 2, origin: whatever}").unwrap();
    assert_eq!(c.bgp.peers[0].origin, Origin::Incomplete);
    let c = parse("bgp: {local_as: 1, remote_as: 2, origin: EGP}").unwrap();
    assert_eq!(c.bgp.peers[0].origin, Origin::Egp);
}

#[test]
fn a_bad_value_names_its_key_and_its_own_line() {
    let e = err("agent:\n  listen_addr: 127.0.0.1:1\n  monitor_interval: 10\n");
    assert!(
        e.contains("agent.monitor_interval") && e.contains("line 3"),
        "{e}"
    );
    let e = err("apps:\n  - name: a\n    monitor: port:tcp:1\n    vip: nope\n");
    assert!(e.contains("apps[0].vip") && e.contains("line 4"), "{e}");
    let e = err(
        "apps:\n  - name: a\n    vip: 192.0.2.1/32\n    nats:\n      - tcp:1:2\n      - tcp:0\n",
    );
    assert!(e.contains("apps[0].nats[1]") && e.contains("line 6"), "{e}");
}

#[test]
fn consul_keys_and_every_consul_addr_form() {
    for (addr, want) in [
        ("http://127.0.0.1:8500/v1", "http://127.0.0.1:8500/v1"),
        ("http://127.0.0.1:8500/v1/", "http://127.0.0.1:8500/v1"),
        ("127.0.0.1:8500/v1", "http://127.0.0.1:8500/v1"),
        ("http://127.0.0.1:8500", "http://127.0.0.1:8500/v1"),
        ("consul.example:8500", "http://consul.example:8500/v1"),
        (
            "https://consul.example:8501/v1",
            "https://consul.example:8501/v1",
        ),
    ] {
        let c = parse(&format!("agent:\n  consul_addr: {addr}\n")).unwrap();
        assert_eq!(c.agent.consul.unwrap().addr, want, "{addr}");
    }
    let c = parse(
        "agent:\n  consul_addr: http://127.0.0.1:8500/v1\n  consul_query_interval: 30s\n  consul_token: s3cret\n  consul_node: node-a\n  consul_monitor_grace: 1m\n  allow_consul_exec: true\n",
    )
    .unwrap();
    let consul = c.agent.consul.clone().unwrap();
    assert_eq!(consul.query_interval, Duration::from_secs(30));
    assert_eq!(consul.token.as_deref(), Some("s3cret"));
    assert_eq!(consul.node.as_deref(), Some("node-a"));
    assert_eq!(consul.monitor_grace, Duration::from_secs(60));
    assert!(consul.allow_exec);
    let printed = c.to_yaml();
    assert!(!printed.contains("s3cret"), "{printed}");
    assert!(printed.contains("consul_node: node-a"), "{printed}");
    let c = parse("agent:\n  consul_addr: http://127.0.0.1:8500/v1\n").unwrap();
    let consul = c.agent.consul.unwrap();
    assert_eq!(consul.monitor_grace, DEFAULT_CONSUL_MONITOR_GRACE);
    assert!(!consul.allow_exec && consul.node.is_none() && consul.token.is_none());
}

/// GoCast's config templates leave `consul_addr: ""`; that is "no Consul", not an error.
#[test]
fn an_empty_consul_addr_means_no_consul() {
    for yaml in [
        "agent:\n  consul_addr: ''\n",
        "agent:\n  consul_addr: \"  \"\n  consul_query_interval: 1m\n",
        "agent:\n  consul_addr:\n",
    ] {
        let c = parse(yaml).unwrap_or_else(|e| panic!("{yaml:?}: {e}"));
        assert!(c.agent.consul.is_none(), "{yaml:?}");
    }
}

#[test]
fn printed_config_loads_back_to_the_same_config() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let c = Config::load(&path).unwrap();
        let again = Config::parse(&c.to_yaml(), "printed")
            .unwrap_or_else(|e| panic!("{}: {e}\n{}", path.display(), c.to_yaml()));
        assert_eq!(c, again, "{}", path.display());
    }
    let c = parse("bgp: {local_as: 1, remote_as: 2, password: s3cret}").unwrap();
    assert!(!c.to_yaml().contains("s3cret"));
}

#[test]
fn bgp_speaker_keys_are_read_per_peer_and_per_section() {
    let c = parse(
        "bgp:\n  local_as: 65001\n  router_id: 198.18.0.1\n  listen_port: 1179\n  graceful_shutdown: 30s\n  med: 10\n  peers:\n    - {peer_ip: 198.18.0.2, peer_as: 65001, local_pref: 200, next_hop: 198.18.0.9}\n    - {peer_ip: 198.18.0.6, peer_as: 65000, med: 20}\n",
    )
    .unwrap();
    assert_eq!(c.bgp.router_id, Some("198.18.0.1".parse().unwrap()));
    assert_eq!(
        (c.bgp.listen_port, c.bgp.graceful_shutdown),
        (Some(1179), Some(Duration::from_secs(30)))
    );
    let (a, b) = (&c.bgp.peers[0], &c.bgp.peers[1]);
    assert_eq!(
        (a.med, a.local_pref, a.next_hop),
        (Some(10), Some(200), Some("198.18.0.9".parse().unwrap()))
    );
    assert_eq!(b.med, Some(20));
    let e = err(
        "bgp:\n  - {local_as: 1, remote_as: 2, router_id: 198.18.0.1}\n  - {local_as: 1, remote_as: 3, router_id: 198.18.0.2}\n",
    );
    assert!(e.contains("bgp[1].router_id"), "{e}");
}

#[test]
fn passive_is_read_per_peer_and_per_block_printed_and_needs_listen_port() {
    let c = parse("bgp:\n  local_as: 65001\n  listen_port: 1179\n  passive: true\n  peers:\n    - {peer_ip: 198.18.0.2, peer_as: 65000}\n    - {peer_ip: 198.18.0.6, peer_as: 65000, passive: false}\n").unwrap();
    assert!(c.bgp.peers[0].passive);
    assert!(!c.bgp.peers[1].passive);
    let printed = c.to_yaml();
    assert_eq!(printed.matches("passive: true").count(), 1, "{printed}");
    assert_eq!(Config::parse(&printed, "printed").unwrap(), c);
    let e = err("bgp: {local_as: 1, peers: [{peer_ip: 198.18.0.2, peer_as: 2, passive: true}]}");
    assert!(
        e.contains("bgp.passive") && e.contains("listen_port"),
        "{e}"
    );
}

#[test]
fn a_section_local_ip_is_the_default_for_peers_of_its_family_only() {
    let c = parse("bgp:\n  local_as: 65001\n  local_ip: 198.18.0.1\n  peers:\n    - {peer_ip: 198.18.0.2, peer_as: 65000}\n    - {peer_ip: '2001:db8::2', peer_as: 65000}\n").unwrap();
    assert_eq!(c.bgp.peers[0].local_ip, Some("198.18.0.1".parse().unwrap()));
    assert_eq!(c.bgp.peers[1].local_ip, None);
    assert!(err("bgp: {local_as: 1, peers: [{peer_ip: '2001:db8::2', peer_as: 2, local_ip: 198.18.0.1}]}").contains("different families"));
}

/// Every bound docs/design.md and docs/security.md state, one bad value each: the error names
/// the key. What `check-config` refuses here, the agent never has to find out at run time.
#[test]
fn every_documented_bound_is_enforced() {
    let peer = "bgp: {local_as: 1, remote_as: 2, peer_ip: 198.18.0.2";
    let app = |extra: &str| format!("apps: [{{name: a, vip: 192.0.2.1/32{extra}}}]");
    let consul = "agent: {consul_addr: 'http://127.0.0.1:8500/v1'";
    for (yaml, key) in [
        (
            format!("{peer}, password: {}}}", "x".repeat(81)),
            "bgp.password",
        ),
        (format!("{peer}, hold_time: 2}}"), "bgp.hold_time"),
        (format!("{peer}, hold_time: 65536s}}"), "bgp.hold_time"),
        (format!("{peer}, hold_time: 65536}}"), "hold_time"),
        (format!("{peer}, multihop: 0}}"), "bgp.multihop"),
        (format!("{peer}, multihop: 256}}"), "multihop"),
        (format!("{peer}, peer_port: 0}}"), "bgp.peer_port"),
        (format!("{peer}, peer_port: 65536}}"), "peer_port"),
        (format!("{peer}, listen_port: 0}}"), "bgp.listen_port"),
        (format!("{peer}, passive: true}}"), "bgp.passive"),
        (format!("{peer}, bfd: {{min_tx: 5ms}}}}"), "bgp.bfd.min_tx"),
        (format!("{peer}, bfd: {{min_rx: 61s}}}}"), "bgp.bfd.min_rx"),
        (
            format!("{peer}, bfd: {{multiplier: 0}}}}"),
            "bgp.bfd.multiplier",
        ),
        (format!("{peer}, bfd: {{multiplier: 256}}}}"), "multiplier"),
        (format!("{peer}, bfd: {{min_tx: 300}}}}"), "min_tx"),
        (format!("{peer}, bfd: {{interval: 1s}}}}"), "interval"),
        (format!("{peer}, bfd: yes please}}"), "bfd"),
        (
            "bgp: {local_as: 1, remote_as: 2, bfd: true}".to_owned(),
            "bgp.bfd",
        ),
        (
            "bgp: {local_as: 0, remote_as: 2}".to_owned(),
            "bgp.local_as",
        ),
        ("bgp: {local_as: 1, remote_as: 0}".to_owned(), "bgp.peer_as"),
        (
            "bgp: {local_as: 1, peers: [{peer_ip: 198.18.0.2, peer_as: 2, password: '".to_owned()
                + &"y".repeat(81)
                + "'}]}",
            "bgp.peers[0].password",
        ),
        (
            "agent: {monitor_interval: 0s}".to_owned(),
            "agent.monitor_interval",
        ),
        ("agent: {exec_timeout: 0s}".to_owned(), "agent.exec_timeout"),
        ("agent: {monitor_rise: 0}".to_owned(), "agent.monitor_rise"),
        ("agent: {monitor_fall: 0}".to_owned(), "agent.monitor_fall"),
        (
            format!("{consul}, consul_query_interval: 0s}}"),
            "agent.consul_query_interval",
        ),
        (
            format!("{consul}, consul_monitor_grace: 0s}}"),
            "agent.consul_monitor_grace",
        ),
        (format!("{consul}, consul_node: ' '}}"), "agent.consul_node"),
        (
            "agent: {nat_dest_ip: 0.0.0.0}".to_owned(),
            "agent.nat_dest_ip",
        ),
        (
            format!("apps: [{{name: {}, vip: 192.0.2.1/32}}]", "n".repeat(65)),
            "apps[0].name",
        ),
        (app(", monitor: 'port:tcp:0'"), "apps[0].monitor"),
        (app(", nats: ['tcp:0:80']"), "apps[0].nats"),
        (
            app(", vip_config: {bgp_communities: ['65536:1']}"),
            "apps[0].vip_config",
        ),
        (
            "dataplane: {interfaces: [abcdefghijklmnop]}".to_owned(),
            "dataplane.interfaces[0]",
        ),
        (
            "dataplane: {passive_health: {window: 0s}}".to_owned(),
            "dataplane.passive_health.window",
        ),
        (
            "dataplane: {passive_health: {min_syn: 0}}".to_owned(),
            "dataplane.passive_health.min_syn",
        ),
        (
            "dataplane: {passive_health: {max_unanswered: 1.5}}".to_owned(),
            "dataplane.passive_health.max_unanswered",
        ),
    ] {
        let e = err(&yaml);
        assert!(
            e.contains(key),
            "{yaml:.120} gave {e:?}, expected the key {key:?}"
        );
    }
    // The limits themselves are allowed.
    parse(&format!(
        "{peer}, password: {}, hold_time: 65535, multihop: 255, peer_port: 65535}}",
        "x".repeat(80)
    ))
    .unwrap();
}

#[test]
fn bfd_is_off_by_default_true_takes_the_defaults_and_a_peer_overrides_the_section() {
    let c = parse(
        "bgp:\n  local_as: 65001\n  bfd: true\n  peers:\n    - {peer_ip: 198.18.0.2, peer_as: 65000}\n    - {peer_ip: 198.18.0.6, peer_as: 65000, bfd: false}\n    - {peer_ip: 198.18.0.10, peer_as: 65000, bfd: {min_tx: 100ms, multiplier: 5, strict: false}}\n",
    )
    .unwrap();
    let bfd: Vec<_> = c.bgp.peers.iter().map(|p| p.bfd).collect();
    assert_eq!(bfd[0], Some(BfdConfig::default()));
    assert_eq!(
        BfdConfig::default(),
        BfdConfig {
            min_tx: Duration::from_millis(300),
            min_rx: Duration::from_millis(300),
            multiplier: 3,
            strict: true
        }
    );
    assert_eq!(bfd[1], None);
    assert_eq!(
        bfd[2],
        Some(BfdConfig {
            min_tx: Duration::from_millis(100),
            min_rx: Duration::from_millis(300),
            multiplier: 5,
            strict: false
        })
    );
    assert_eq!(
        parse("bgp: {local_as: 1, remote_as: 2, peer_ip: 198.18.0.2}")
            .unwrap()
            .bgp
            .peers[0]
            .bfd,
        None
    );
    let again = Config::parse(&c.to_yaml(), "printed").unwrap();
    assert_eq!(again.bgp.peers, c.bgp.peers, "{}", c.to_yaml());
}
