//! The file as written: serde structs that mirror GoCast's keys, and their validation into
//! the typed [`Config`](super::Config).

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, de};

use crate::app::{AppName, AppSpec, Community, Monitor, NatRule, Vip};
use crate::auth::AuthScope;

use super::{
    AgentConfig, ApiConfig, BFD_INTERVAL_MAX, BFD_INTERVAL_MIN, BGP_PORT, BfdConfig, BgpConfig,
    Config, ConsulConfig, DEFAULT_CLEANUP_TIMER, DEFAULT_CONSUL_MONITOR_GRACE,
    DEFAULT_CONSUL_QUERY_INTERVAL, DEFAULT_DRAIN_TIME, DEFAULT_EXEC_TIMEOUT, DEFAULT_HOLD_TIME,
    DEFAULT_LISTEN, DEFAULT_MONITOR_INTERVAL, DEFAULT_UNIX_MODE, DataplaneConfig, DataplaneMode,
    IngressMode, ListenAddr, Origin, PassiveHealthConfig, PeerConfig, STATE_DIR, go_duration,
};

// ---- the file as written -------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    agent: RawAgent,
    #[serde(default)]
    bgp: Option<RawBgp>,
    #[serde(default)]
    apps: Vec<RawApp>,
    #[serde(default)]
    dataplane: RawDataplane,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDataplane {
    #[serde(default)]
    mode: DataplaneMode,
    #[serde(default)]
    interfaces: Vec<String>,
    #[serde(default)]
    ingress: IngressMode,
    #[serde(default)]
    passive_health: RawPassiveHealth,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPassiveHealth {
    #[serde(default, with = "go_duration::option")]
    window: Option<Duration>,
    min_syn: Option<u64>,
    max_unanswered: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    listen_addr: Option<String>,
    #[serde(default, with = "go_duration::option")]
    monitor_interval: Option<Duration>,
    #[serde(default, with = "go_duration::option")]
    cleanup_timer: Option<Duration>,
    consul_addr: Option<String>,
    #[serde(default, with = "go_duration::option")]
    consul_query_interval: Option<Duration>,
    consul_token: Option<String>,
    consul_node: Option<String>,
    #[serde(default, with = "go_duration::option")]
    consul_monitor_grace: Option<Duration>,
    allow_consul_exec: Option<bool>,
    monitor_rise: Option<u32>,
    monitor_fall: Option<u32>,
    #[serde(default, with = "go_duration::option")]
    exec_timeout: Option<Duration>,
    #[serde(default, with = "go_duration::option")]
    drain_time: Option<Duration>,
    log_level: Option<String>,
    state_file: Option<PathBuf>,
    allow_http_exec: Option<bool>,
    vip_allowlist: Option<Vec<IpNet>>,
    nat_dest_ip: Option<IpAddr>,
    api_token_file: Option<PathBuf>,
    #[serde(default)]
    api_auth: AuthScope,
    api_max_connections: Option<usize>,
    listen_unix: Option<PathBuf>,
    listen_unix_mode: Option<FileMode>,
    listen_unix_group: Option<String>,
}

/// A file mode in octal as `chmod` reads it: `0660`, `"0660"` or `660` all mean `rw-rw----`
/// (YAML 1.2 reads an unquoted `0660` as the decimal number 660).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum FileMode {
    Number(u64),
    Text(String),
}

impl FileMode {
    fn bits(&self) -> Result<u32, String> {
        let digits = match self {
            Self::Number(n) => n.to_string(),
            Self::Text(s) => s.trim().to_owned(),
        };
        u32::from_str_radix(&digits, 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| format!("{digits:?} is not an octal mode like 0660"))
    }
}

/// `bgp:` is a block (single peer, or `peers:`) or a list of single-peer blocks.
#[derive(Debug)]
enum RawBgp {
    /// Boxed: a block is large next to a list's pointer.
    Block(Box<RawBgpBlock>),
    List(Vec<RawBgpBlock>),
}

impl<'de> Deserialize<'de> for RawBgp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = RawBgp;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a bgp block or a list of bgp blocks")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<RawBgp, A::Error> {
                RawBgpBlock::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(|block| RawBgp::Block(Box::new(block)))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<RawBgp, A::Error> {
                Vec::deserialize(de::value::SeqAccessDeserializer::new(seq)).map(RawBgp::List)
            }
        }
        d.deserialize_any(V)
    }
}

/// Keys a peer can have, at `bgp:` level (defaults for every peer) or in a `peers:` entry.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeerKeys {
    peer_ip: Option<IpAddr>,
    peer_as: Option<u32>,
    /// GoCast's README and example spell the peer AS this way.
    remote_as: Option<u32>,
    peer_port: Option<u16>,
    local_ip: Option<IpAddr>,
    local_ipv6: Option<Ipv6Addr>,
    password: Option<String>,
    multihop: Option<u8>,
    #[serde(default, deserialize_with = "hold_time")]
    hold_time: Option<Duration>,
    next_hop: Option<Ipv4Addr>,
    med: Option<u32>,
    local_pref: Option<u32>,
    drain_local_pref: Option<u32>,
    /// Never connect; wait for the peer's connection (needs `listen_port`).
    passive: Option<bool>,
    /// BFD on the session: `true`, `false` or the timers.
    bfd: Option<RawBfd>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBgpBlock {
    /// Section-wide only (in the list form, any block may set them, consistently).
    router_id: Option<Ipv4Addr>,
    listen_port: Option<u16>,
    #[serde(default, with = "go_duration::option")]
    graceful_shutdown: Option<Duration>,
    local_as: Option<u32>,
    #[serde(default)]
    communities: Vec<Community>,
    origin: Option<Origin>,
    peers: Option<Vec<RawPeerKeys>>,
    // The peer keys again: serde's `flatten` would switch off `deny_unknown_fields`.
    peer_ip: Option<IpAddr>,
    peer_as: Option<u32>,
    remote_as: Option<u32>,
    peer_port: Option<u16>,
    local_ip: Option<IpAddr>,
    local_ipv6: Option<Ipv6Addr>,
    password: Option<String>,
    multihop: Option<u8>,
    #[serde(default, deserialize_with = "hold_time")]
    hold_time: Option<Duration>,
    next_hop: Option<Ipv4Addr>,
    med: Option<u32>,
    local_pref: Option<u32>,
    drain_local_pref: Option<u32>,
    /// Never connect; wait for the peer's connection (needs `listen_port`).
    passive: Option<bool>,
    /// BFD on the session: `true`, `false` or the timers.
    bfd: Option<RawBfd>,
}

/// `bfd: true`, `bfd: false` or `bfd: {min_tx: 300ms, ...}`. A peer's own `bfd:` replaces the
/// section's as a whole.
#[derive(Debug, Clone)]
enum RawBfd {
    Switch(bool),
    Timers(RawBfdTimers),
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBfdTimers {
    #[serde(default, with = "go_duration::option")]
    min_tx: Option<Duration>,
    #[serde(default, with = "go_duration::option")]
    min_rx: Option<Duration>,
    multiplier: Option<u8>,
    strict: Option<bool>,
}

impl<'de> Deserialize<'de> for RawBfd {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = RawBfd;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("true, false or {min_tx, min_rx, multiplier, strict}")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<RawBfd, E> {
                Ok(RawBfd::Switch(v))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<RawBfd, A::Error> {
                RawBfdTimers::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(RawBfd::Timers)
            }
        }
        d.deserialize_any(V)
    }
}

impl RawBfd {
    /// The checked config, `None` when off.
    fn to_config(&self, key: &str) -> Result<Option<BfdConfig>, Invalid> {
        let timers = match self {
            Self::Switch(false) => return Ok(None),
            Self::Switch(true) => RawBfdTimers::default(),
            Self::Timers(t) => t.clone(),
        };
        let defaults = BfdConfig::default();
        let interval = |value: Option<Duration>, name: &str, default| {
            let v = value.unwrap_or(default);
            if (BFD_INTERVAL_MIN..=BFD_INTERVAL_MAX).contains(&v) {
                Ok(v)
            } else {
                Err(invalid(
                    format!("{key}.bfd.{name}"),
                    format!(
                        "must be between {} and {}",
                        go_duration::format(BFD_INTERVAL_MIN),
                        go_duration::format(BFD_INTERVAL_MAX)
                    ),
                ))
            }
        };
        let multiplier = timers.multiplier.unwrap_or(defaults.multiplier);
        if multiplier == 0 {
            return Err(invalid(
                format!("{key}.bfd.multiplier"),
                "must be 1-255 (RFC 5880 Detect Mult)",
            ));
        }
        Ok(Some(BfdConfig {
            min_tx: interval(timers.min_tx, "min_tx", defaults.min_tx)?,
            min_rx: interval(timers.min_rx, "min_rx", defaults.min_rx)?,
            multiplier,
            strict: timers.strict.unwrap_or(defaults.strict),
        }))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApp {
    name: AppName,
    vip: Vip,
    #[serde(default)]
    vip_config: RawVipConfig,
    monitors: Option<Vec<Monitor>>,
    /// The GoCast example config writes one `monitor:` string.
    monitor: Option<Monitor>,
    #[serde(default)]
    nats: Vec<NatRule>,
    #[serde(default)]
    passive_health: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVipConfig {
    #[serde(default)]
    bgp_communities: Vec<Community>,
}

/// The longest TCP MD5 key the kernel takes (`TCP_MD5SIG_MAXKEYLEN`).
pub(super) const MAX_PASSWORD: usize = 80;

/// A semantic error: (key path, message).
type Invalid = (String, String);

fn invalid(key: impl Into<String>, message: impl Into<String>) -> Invalid {
    (key.into(), message.into())
}

impl RawConfig {
    pub(super) fn into_config(self, origin: &str) -> Result<Config, Invalid> {
        let agent = self.agent.into_agent(origin)?;
        let bgp = match self.bgp {
            None => BgpConfig::default(),
            Some(RawBgp::Block(block)) => {
                let block = *block;
                let mut bgp = BgpConfig::default();
                bgp.take_section_keys(&block, "bgp")?;
                bgp.peers = block.into_peers("bgp")?;
                bgp
            }
            Some(RawBgp::List(blocks)) => {
                let mut bgp = BgpConfig::default();
                for (i, block) in blocks.into_iter().enumerate() {
                    let key = format!("bgp[{i}]");
                    if block.peers.is_some() {
                        return Err(invalid(
                            key,
                            "a list entry is one peer: peers: is not allowed here",
                        ));
                    }
                    bgp.take_section_keys(&block, &key)?;
                    bgp.peers.extend(block.into_peers(&key)?);
                }
                bgp
            }
        };
        if bgp.listen_port == Some(0) {
            return Err(invalid("bgp.listen_port", "must be 1-65535"));
        }
        for (i, p) in bgp.peers.iter().enumerate() {
            let who = p
                .peer_ip
                .map_or_else(|| "autodiscovered peer".to_owned(), |ip| ip.to_string());
            if p.passive && bgp.listen_port.is_none() {
                return Err(invalid(
                    "bgp.passive",
                    format!(
                        "peer {who}: passive: true needs bgp.listen_port (a passive peer never \
                         connects; it waits for the peer's connection)"
                    ),
                ));
            }
            // One session per address: /info and metrics name a peer by it.
            let twin = bgp.peers[..i].iter().any(|q| q.peer_ip == p.peer_ip);
            if twin {
                return Err(invalid("bgp", format!("peer {who} is configured twice")));
            }
        }
        let apps = self
            .apps
            .into_iter()
            .enumerate()
            .map(|(i, app)| app.into_spec(&format!("apps[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        check_unique(&apps)?;
        check_protected(&apps, &bgp.peers)?;
        let dataplane = self.dataplane.into_dataplane()?;
        Ok(Config {
            agent,
            bgp,
            apps,
            dataplane,
        })
    }
}

/// Names, VIP addresses and `lo` labels must be unique, and no VIP may lie inside another's
/// prefix (two addresses of one subnet on `lo` fall together). Hash lookups keep 10,000 apps
/// fast; only the rare VIPs shorter than a host route are compared with every app.
fn check_unique(apps: &[AppSpec]) -> Result<(), Invalid> {
    use std::collections::HashMap;
    let mut names: HashMap<&AppName, usize> = HashMap::new();
    let mut addrs: HashMap<IpAddr, usize> = HashMap::new();
    let mut labels: HashMap<String, usize> = HashMap::new();
    for (i, app) in apps.iter().enumerate() {
        if let Some(&prev) = names.get(&app.name) {
            return Err(invalid(
                format!("apps[{i}].name"),
                format!("app {} is defined twice", apps[prev].name),
            ));
        }
        if let Some(&prev) = addrs.get(&app.vip.addr()) {
            return Err(invalid(
                format!("apps[{i}].vip"),
                format!("vip {} is already used by app {}", app.vip, apps[prev].name),
            ));
        }
        let label = app.name.lo_label();
        if let Some(&prev) = labels.get(&label) {
            return Err(invalid(
                format!("apps[{i}].name"),
                format!(
                    "label {label} collides with app {}; rename one",
                    apps[prev].name
                ),
            ));
        }
        names.insert(&app.name, i);
        addrs.insert(app.vip.addr(), i);
        labels.insert(label, i);
    }
    let wide = |a: &AppSpec| a.vip.prefix().prefix_len() < a.vip.prefix().max_prefix_len();
    for (i, app) in apps.iter().enumerate().filter(|(_, a)| wide(a)) {
        if let Some(other) = apps
            .iter()
            .find(|o| o.name != app.name && app.vip.prefix().contains(&o.vip.addr()))
        {
            return Err(invalid(
                format!("apps[{i}].vip"),
                format!(
                    "vip {} overlaps vip {} of app {}",
                    app.vip, other.vip, other.name
                ),
            ));
        }
    }
    Ok(())
}

/// No VIP may equal or cover a configured BGP peer, next hop or local address: on `lo` it
/// would take that address from the host and end the session (docs/security.md, "Safe VIPs").
/// The host's interface addresses are checked by the agent when it runs.
fn check_protected(apps: &[AppSpec], peers: &[PeerConfig]) -> Result<(), Invalid> {
    let protected: Vec<(IpAddr, &str)> = peers
        .iter()
        .flat_map(|p| {
            [
                p.peer_ip.map(|ip| (ip, "bgp peer_ip")),
                p.next_hop.map(|ip| (ip.into(), "bgp next_hop")),
                p.local_ip.map(|ip| (ip, "bgp local_ip")),
                p.local_ipv6.map(|ip| (ip.into(), "bgp local_ipv6")),
            ]
        })
        .flatten()
        .collect();
    for (i, app) in apps.iter().enumerate() {
        if let Some((addr, key)) = protected
            .iter()
            .find(|(addr, _)| app.vip.prefix().contains(addr))
        {
            let relation = if app.vip.addr() == *addr {
                "equals"
            } else {
                "covers"
            };
            return Err(invalid(
                format!("apps[{i}].vip"),
                format!(
                    "vip {} {relation} {addr} ({key}); on lo it would take that address from the host",
                    app.vip
                ),
            ));
        }
    }
    Ok(())
}

/// The state file of a config without `agent.state_file`: one per config file (named after a
/// hash of its full path), so two agents run from different configs on one host never restore
/// each other's registrations, while a restart with the same config finds its own.
pub fn default_state_file(config_path: &str) -> PathBuf {
    let hash = crate::app::fnv1a64(config_path.as_bytes());
    Path::new(STATE_DIR).join(format!("state-{:08x}.json", hash & 0xffff_ffff))
}

impl RawDataplane {
    fn into_dataplane(self) -> Result<DataplaneConfig, Invalid> {
        for (i, name) in self.interfaces.iter().enumerate() {
            let ok = (1..=15).contains(&name.len()) && !name.contains(['/', ' ', ':']);
            if !ok {
                return Err(invalid(
                    format!("dataplane.interfaces[{i}]"),
                    format!("{name:?} is not an interface name"),
                ));
            }
        }
        Ok(DataplaneConfig {
            mode: self.mode,
            interfaces: self.interfaces,
            ingress: self.ingress,
            passive_health: self.passive_health.into_passive_health()?,
        })
    }
}

impl RawPassiveHealth {
    fn into_passive_health(self) -> Result<PassiveHealthConfig, Invalid> {
        let default = PassiveHealthConfig::default();
        let window = self.window.unwrap_or(default.window);
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&window) {
            return Err(invalid(
                "dataplane.passive_health.window",
                "must be between 1s and 1h (counters are sampled once a second)",
            ));
        }
        let min_syn = self.min_syn.unwrap_or(default.min_syn);
        if min_syn == 0 {
            return Err(invalid(
                "dataplane.passive_health.min_syn",
                "must be at least 1: no verdict without traffic",
            ));
        }
        let max_unanswered = self.max_unanswered.unwrap_or(default.max_unanswered);
        if !(max_unanswered > 0.0 && max_unanswered <= 1.0) {
            return Err(invalid(
                "dataplane.passive_health.max_unanswered",
                "must be a share in (0, 1], e.g. 0.5",
            ));
        }
        Ok(PassiveHealthConfig {
            window,
            min_syn,
            max_unanswered,
        })
    }
}

impl RawAgent {
    fn into_agent(self, origin: &str) -> Result<AgentConfig, Invalid> {
        let listen_addr = self
            .listen_addr
            .as_deref()
            .unwrap_or(DEFAULT_LISTEN)
            .parse::<ListenAddr>()
            .map_err(|m| invalid("agent.listen_addr", m))?;
        let positive = |key: &str, d: Option<Duration>, default: Duration| match d {
            Some(d) if d.is_zero() => {
                Err(invalid(format!("agent.{key}"), "must be greater than zero"))
            }
            Some(d) => Ok(d),
            None => Ok(default),
        };
        let at_least_one = |key: &str, n: Option<u32>| match n {
            Some(0) => Err(invalid(format!("agent.{key}"), "must be at least 1")),
            n => Ok(n.unwrap_or(1)),
        };
        // GoCast takes an empty consul_addr as "no Consul", as a config template leaves it.
        let consul = match self.consul_addr.filter(|a| !a.trim().is_empty()) {
            None => None,
            Some(addr) => Some(ConsulConfig {
                addr: consul_addr(&addr).map_err(|m| invalid("agent.consul_addr", m))?,
                query_interval: positive(
                    "consul_query_interval",
                    self.consul_query_interval,
                    DEFAULT_CONSUL_QUERY_INTERVAL,
                )?,
                token: self.consul_token.filter(|t| !t.is_empty()),
                node: match self.consul_node {
                    Some(n) if n.trim().is_empty() => {
                        return Err(invalid("agent.consul_node", "must not be empty"));
                    }
                    n => n,
                },
                monitor_grace: positive(
                    "consul_monitor_grace",
                    self.consul_monitor_grace,
                    DEFAULT_CONSUL_MONITOR_GRACE,
                )?,
                allow_exec: self.allow_consul_exec.unwrap_or(false),
            }),
        };
        let api = ApiConfig {
            token_file: self.api_token_file,
            auth: self.api_auth,
            max_connections: match self.api_max_connections {
                Some(0) => return Err(invalid("agent.api_max_connections", "must be at least 1")),
                n => n.unwrap_or(crate::serve::DEFAULT_MAX_CONNECTIONS),
            },
            listen_unix: self.listen_unix,
            unix_mode: match &self.listen_unix_mode {
                Some(m) => m.bits().map_err(|e| invalid("agent.listen_unix_mode", e))?,
                None => DEFAULT_UNIX_MODE,
            },
            unix_group: self.listen_unix_group.filter(|g| !g.is_empty()),
        };
        if let Some(ip) = self.nat_dest_ip
            && (ip.is_unspecified() || ip.is_multicast() || ip.is_loopback())
        {
            return Err(invalid(
                "agent.nat_dest_ip",
                format!("{ip} cannot be a NAT destination"),
            ));
        }
        Ok(AgentConfig {
            listen_addr,
            monitor_interval: positive(
                "monitor_interval",
                self.monitor_interval,
                DEFAULT_MONITOR_INTERVAL,
            )?,
            cleanup_timer: self.cleanup_timer.unwrap_or(DEFAULT_CLEANUP_TIMER),
            consul,
            monitor_rise: at_least_one("monitor_rise", self.monitor_rise)?,
            monitor_fall: at_least_one("monitor_fall", self.monitor_fall)?,
            exec_timeout: positive("exec_timeout", self.exec_timeout, DEFAULT_EXEC_TIMEOUT)?,
            state_file: self
                .state_file
                .unwrap_or_else(|| default_state_file(origin)),
            allow_http_exec: self.allow_http_exec.unwrap_or(false),
            vip_allowlist: self.vip_allowlist.unwrap_or_default(),
            nat_dest_ip: self.nat_dest_ip,
            api,
            drain_time: self.drain_time.unwrap_or(DEFAULT_DRAIN_TIME),
            log_level: match self.log_level {
                Some(filter) => Some(
                    tracing_subscriber::EnvFilter::try_new(&filter)
                        .map(|_| filter)
                        .map_err(|e| invalid("agent.log_level", e.to_string()))?,
                ),
                None => None,
            },
        })
    }
}

/// Normalizes `agent.consul_addr` to `scheme://host:port/prefix`. GoCast appends paths to the
/// string as written, so `http://127.0.0.1:8500/v1` is the documented form; a scheme-less
/// address gets `http://` and an address without a path gets Consul's `/v1`, since neither
/// could ever have worked otherwise.
fn consul_addr(addr: &str) -> Result<String, String> {
    let trimmed = addr.trim();
    let with_scheme = if trimmed.contains("://") {
        trimmed.to_owned()
    } else {
        format!("http://{trimmed}")
    };
    let url = reqwest::Url::parse(&with_scheme)
        .map_err(|e| format!("{addr:?} is not an address like http://127.0.0.1:8500/v1: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "{addr:?}: the scheme must be http:// or https:// (e.g. http://127.0.0.1:8500/v1)"
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!(
            "{addr:?} has no host (e.g. http://127.0.0.1:8500/v1)"
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("{addr:?}: no query or fragment allowed"));
    }
    let with_scheme = with_scheme.trim_end_matches('/');
    if url.path() == "/" {
        Ok(format!("{with_scheme}/v1"))
    } else {
        Ok(with_scheme.to_owned())
    }
}

impl BgpConfig {
    /// Takes the section-wide keys of one block; two blocks may not disagree on them.
    fn take_section_keys(&mut self, block: &RawBgpBlock, key: &str) -> Result<(), Invalid> {
        fn merge<T: PartialEq + Copy + fmt::Debug>(
            slot: &mut Option<T>,
            value: Option<T>,
            key: String,
        ) -> Result<(), Invalid> {
            match (*slot, value) {
                (Some(a), Some(b)) if a != b => Err(invalid(
                    key,
                    format!("{b:?} disagrees with {a:?} set in another bgp block"),
                )),
                (_, Some(b)) => {
                    *slot = Some(b);
                    Ok(())
                }
                (_, None) => Ok(()),
            }
        }
        merge(
            &mut self.router_id,
            block.router_id,
            format!("{key}.router_id"),
        )?;
        merge(
            &mut self.listen_port,
            block.listen_port,
            format!("{key}.listen_port"),
        )?;
        merge(
            &mut self.graceful_shutdown,
            block.graceful_shutdown,
            format!("{key}.graceful_shutdown"),
        )
    }
}

/// What a block gives every one of its peers.
struct Section<'a> {
    local_as: u32,
    communities: &'a [Community],
    origin: Origin,
}

impl RawPeerKeys {
    /// One peer: its own keys, else the block's (`defaults`).
    fn to_peer(
        &self,
        defaults: &RawPeerKeys,
        section: &Section<'_>,
        key: &str,
    ) -> Result<PeerConfig, Invalid> {
        let peer = self;
        let peer_as = match (peer.peer_as, peer.remote_as) {
            (Some(a), Some(b)) if a != b => {
                return Err(invalid(
                    key,
                    format!("peer_as {a} and remote_as {b} disagree"),
                ));
            }
            (Some(a), _) | (None, Some(a)) => a,
            (None, None) => {
                return Err(invalid(
                    format!("{key}.peer_as"),
                    "is required (or remote_as)",
                ));
            }
        };
        let hold_time = peer
            .hold_time
            .or(defaults.hold_time)
            .unwrap_or(DEFAULT_HOLD_TIME);
        if hold_time != Duration::ZERO && hold_time < Duration::from_secs(3) {
            return Err(invalid(
                format!("{key}.hold_time"),
                "must be 0 or at least 3s (RFC 4271)",
            ));
        }
        if hold_time > Duration::from_secs(u64::from(u16::MAX)) {
            return Err(invalid(
                format!("{key}.hold_time"),
                "must be at most 65535s (16 bits in the OPEN message)",
            ));
        }
        let password = peer.password.clone().or_else(|| defaults.password.clone());
        if let Some(p) = &password
            && p.len() > MAX_PASSWORD
        {
            return Err(invalid(
                format!("{key}.password"),
                format!(
                    "is {} bytes; a TCP MD5 key is at most {MAX_PASSWORD} (the kernel's limit)",
                    p.len()
                ),
            ));
        }
        let peer_port = peer.peer_port.or(defaults.peer_port).unwrap_or(BGP_PORT);
        if peer_port == 0 {
            return Err(invalid(format!("{key}.peer_port"), "must be 1-65535"));
        }
        let peer_ip = peer.peer_ip;
        // A section-wide local_ip is the default for the peers of its family only.
        let local_ip = peer.local_ip.or(defaults
            .local_ip
            .filter(|l| peer_ip.is_none_or(|p| p.is_ipv4() == l.is_ipv4())));
        if peer_as == 0 {
            return Err(invalid(
                format!("{key}.peer_as"),
                "AS 0 is reserved (RFC 7607)",
            ));
        }
        let multihop = peer.multihop.or(defaults.multihop);
        if multihop == Some(0) {
            return Err(invalid(format!("{key}.multihop"), "must be a TTL of 1-255"));
        }
        if let (Some(l), Some(p)) = (local_ip, peer_ip)
            && l.is_ipv4() != p.is_ipv4()
        {
            return Err(invalid(
                format!("{key}.local_ip"),
                format!("{l} and peer {p} are of different families"),
            ));
        }
        let bfd = self.bfd(defaults, key)?;
        Ok(PeerConfig {
            local_as: section.local_as,
            peer_as,
            peer_ip,
            peer_port,
            local_ip,
            local_ipv6: peer.local_ipv6.or(defaults.local_ipv6),
            password,
            multihop,
            hold_time,
            communities: section.communities.to_vec(),
            origin: section.origin,
            next_hop: peer.next_hop.or(defaults.next_hop),
            med: peer.med.or(defaults.med),
            local_pref: peer.local_pref.or(defaults.local_pref),
            drain_local_pref: peer
                .drain_local_pref
                .or(defaults.drain_local_pref)
                .unwrap_or(0),
            passive: peer.passive.or(defaults.passive).unwrap_or(false),
            bfd,
        })
    }
}

impl RawPeerKeys {
    /// The peer's `bfd:`, else the block's; only toward a configured `peer_ip`.
    fn bfd(&self, defaults: &RawPeerKeys, key: &str) -> Result<Option<BfdConfig>, Invalid> {
        let bfd = match self.bfd.as_ref().or(defaults.bfd.as_ref()) {
            Some(raw) => raw.to_config(key)?,
            None => None,
        };
        if bfd.is_some() && self.peer_ip.is_none() {
            return Err(invalid(
                format!("{key}.bfd"),
                "needs peer_ip: a BFD session is set up toward a known neighbour address",
            ));
        }
        Ok(bfd)
    }
}

impl RawBgpBlock {
    /// Turns one block into its peers, folding block-level values into each.
    fn into_peers(self, key: &str) -> Result<Vec<PeerConfig>, Invalid> {
        let local_as = self
            .local_as
            .ok_or_else(|| invalid(format!("{key}.local_as"), "is required"))?;
        if local_as == 0 {
            return Err(invalid(
                format!("{key}.local_as"),
                "AS 0 is reserved (RFC 7607)",
            ));
        }
        let defaults = &RawPeerKeys {
            peer_ip: self.peer_ip,
            peer_as: self.peer_as,
            remote_as: self.remote_as,
            peer_port: self.peer_port,
            local_ip: self.local_ip,
            local_ipv6: self.local_ipv6,
            password: self.password.clone(),
            multihop: self.multihop,
            hold_time: self.hold_time,
            next_hop: self.next_hop,
            med: self.med,
            local_pref: self.local_pref,
            drain_local_pref: self.drain_local_pref,
            passive: self.passive,
            bfd: self.bfd.clone(),
        };
        let origin = self.origin.unwrap_or(Origin::Igp);
        let section = Section {
            local_as,
            communities: &self.communities,
            origin,
        };
        let build = |peer: &RawPeerKeys, key: &str| peer.to_peer(defaults, &section, key);
        match &self.peers {
            None => Ok(vec![build(defaults, key)?]),
            Some(peers) => {
                if defaults.peer_ip.is_some()
                    || defaults.peer_as.is_some()
                    || defaults.remote_as.is_some()
                {
                    return Err(invalid(
                        key,
                        "peer_ip/peer_as belong inside peers: when peers: is used",
                    ));
                }
                peers
                    .iter()
                    .enumerate()
                    .map(|(i, p)| build(p, &format!("{key}.peers[{i}]")))
                    .collect()
            }
        }
    }
}

impl RawApp {
    fn into_spec(self, key: &str) -> Result<AppSpec, Invalid> {
        let monitors = match (self.monitors, self.monitor) {
            (Some(_), Some(_)) => {
                return Err(invalid(key, "use either monitor: or monitors:, not both"));
            }
            (Some(list), None) => list,
            (None, Some(one)) => vec![one],
            (None, None) => Vec::new(),
        };
        Ok(AppSpec {
            name: self.name,
            vip: self.vip,
            monitors,
            nats: self.nats,
            communities: self.vip_config.bgp_communities,
            nat_dest: None,
            passive_health: self.passive_health,
        })
    }
}

/// `hold_time` as BGP people write it: seconds (`90`) or a duration (`90s`). Out-of-range
/// numbers are read as they are, for the bound check to name the key.
fn hold_time<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    struct V;
    impl de::Visitor<'_> for V {
        type Value = Option<Duration>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("seconds (90) or a duration (90s)")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(Duration::from_secs(v)))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            u64::try_from(v)
                .map(|v| Some(Duration::from_secs(v)))
                .map_err(|_| E::custom("hold_time must not be negative"))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            go_duration::parse(v).map(Some).map_err(E::custom)
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }
    d.deserialize_any(V)
}
