//! The GoCast YAML config, read with serde and turned once into typed values.
//!
//! Every shape GoCast users have in the wild is accepted (`docs/design.md`, "Configuration
//! semantics"): the single-peer `bgp:` block (`peer_as` or `remote_as`), the multi-peer block
//! with `peers:`, and a YAML list of single-peer blocks; apps with `monitor:` or `monitors:`.
//! All of them become one [`Config`].
//! Unknown keys, wrong types and bad values are errors that name the key and, where the YAML
//! parser knows it, the line.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, de};

use crate::app::{AppName, AppSpec, Community, Monitor, NatRule, Vip};

/// Defaults, as GoCast has them where it has them.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_MONITOR_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_CLEANUP_TIMER: Duration = Duration::from_mins(15);
pub const DEFAULT_CONSUL_QUERY_INTERVAL: Duration = Duration::from_mins(5);
/// How long a `consul` monitor keeps Consul's last answer when Consul does not answer.
pub const DEFAULT_CONSUL_MONITOR_GRACE: Duration = Duration::from_secs(30);
pub const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(10);
/// Where state files live unless `agent.state_file` says otherwise.
pub const STATE_DIR: &str = "/var/lib/gocast";
pub const DEFAULT_HOLD_TIME: Duration = Duration::from_secs(90);
pub const BGP_PORT: u16 = 179;

/// A config that could not be used; nothing has been started when this is returned.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Syntax, unknown keys, wrong types and bad values caught while parsing: `serde_yaml`'s
    /// message carries the key path and the line.
    #[error("{path}: {message}")]
    Yaml { path: String, message: String },
    /// Rules that span several keys, checked after parsing.
    #[error("{path}: {key}: {message}")]
    Invalid {
        path: String,
        key: String,
        message: String,
    },
}

/// The whole agent configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub agent: AgentConfig,
    pub bgp: BgpConfig,
    pub apps: Vec<AppSpec>,
    pub dataplane: DataplaneConfig,
}

/// The `dataplane:` section: which NAT implementation runs, on which interfaces, and when the
/// per-VIP counters mark an app failing.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DataplaneConfig {
    pub mode: DataplaneMode,
    /// Interfaces the eBPF dataplane attaches to; empty = the interfaces toward the BGP peers
    /// (else the default route's).
    pub interfaces: Vec<String>,
    pub ingress: IngressMode,
    pub passive_health: PassiveHealthConfig,
}

/// `dataplane.ingress`: where the eBPF ingress program runs. `auto`: XDP in native mode on
/// physical interfaces, TC ingress on virtual ones (veth, bridges, bonds...) and where the
/// driver has no native XDP; `xdp` and `tc` force one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IngressMode {
    #[default]
    Auto,
    Xdp,
    Tc,
}

/// `dataplane.passive_health`: thresholds for apps with `passive_health: true`. Over the last
/// `window`, when at least `min_syn` SYNs came in for the VIP and the share of them left without
/// a SYN-ACK (or answered by a RST) reaches `max_unanswered`, the app fails.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PassiveHealthConfig {
    pub window: Duration,
    pub min_syn: u64,
    pub max_unanswered: f64,
}

impl Default for PassiveHealthConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(10),
            min_syn: 10,
            max_unanswered: 0.5,
        }
    }
}

/// `auto` runs eBPF and falls back to iptables when it cannot load; the others force one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataplaneMode {
    #[default]
    Auto,
    Ebpf,
    Iptables,
}

/// The `agent:` section.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    pub listen_addr: ListenAddr,
    pub monitor_interval: Duration,
    pub cleanup_timer: Duration,
    pub consul: Option<ConsulConfig>,
    /// Consecutive passing results that make an unhealthy app healthy.
    pub monitor_rise: u32,
    /// Consecutive failing results that make a healthy app unhealthy.
    pub monitor_fall: u32,
    pub exec_timeout: Duration,
    pub state_file: PathBuf,
    pub allow_http_exec: bool,
    /// When not empty, HTTP and Consul registrations must have their VIP inside one of these.
    pub vip_allowlist: Vec<IpNet>,
    /// Where NAT sends traffic; `None` = the local BGP address, resolved at start.
    pub nat_dest_ip: Option<IpAddr>,
}

/// Consul discovery settings; present when `consul_addr` is set and not empty.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsulConfig {
    /// Includes the API prefix, e.g. `http://127.0.0.1:8500/v1`, as GoCast writes it; a
    /// scheme-less `127.0.0.1:8500/v1` gets `http://`, a bare `http://host:8500` gets `/v1`.
    pub addr: String,
    /// Upper bound between two catalog reads (the `wait` of a blocking query).
    pub query_interval: Duration,
    /// ACL token; `CONSUL_HTTP_TOKEN` is used when this is absent.
    pub token: Option<String>,
    /// The Consul node whose services are discovered; `CONSUL_NODE` wins over it, the
    /// hostname is used when both are absent.
    pub node: Option<String>,
    /// How long a `consul` monitor keeps the last answer while Consul does not answer (never
    /// less than 3 × `monitor_interval`).
    pub monitor_grace: Duration,
    /// Allow `gocast_monitor=exec:..` tags: whoever can register a service in Consul would
    /// otherwise run commands as the agent's user.
    pub allow_exec: bool,
}

/// The HTTP listen address. GoCast's `:8080` (Go's "all interfaces") is kept and flagged so
/// the agent can warn that the API is reachable from the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenAddr {
    pub addr: SocketAddr,
    pub all_interfaces: bool,
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad =
            || format!("invalid listen address {s:?}: expected host:port, [v6]:port or :port");
        if let Some(port) = s.strip_prefix(':') {
            let port = port.parse::<u16>().map_err(|_| bad())?;
            // Go's `:port` is every address of both families: `[::]` with dual stack.
            let addr = SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port);
            return Ok(Self {
                addr,
                all_interfaces: true,
            });
        }
        let addr = match s.rsplit_once(':') {
            Some(("localhost", port)) => {
                SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port.parse().map_err(|_| bad())?)
            }
            _ => s.parse::<SocketAddr>().map_err(|_| bad())?,
        };
        Ok(Self {
            addr,
            all_interfaces: addr.ip().is_unspecified(),
        })
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.addr)
    }
}

/// All BGP peers, whichever shape the file used.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BgpConfig {
    pub peers: Vec<PeerConfig>,
    /// BGP identifier; default: an IPv4 local address (see the BGP speaker).
    pub router_id: Option<Ipv4Addr>,
    /// Also accept sessions from configured peers on this port (off by default, as in GoCast).
    pub listen_port: Option<u16>,
    /// At shutdown, re-announce with `GRACEFUL_SHUTDOWN` (RFC 8326) and wait this long first.
    pub graceful_shutdown: Option<Duration>,
}

/// One BGP session, with the section-wide values already folded in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub local_as: u32,
    pub peer_as: u32,
    /// `None`: autodiscover, as GoCast does — the default gateway is the peer.
    pub peer_ip: Option<IpAddr>,
    pub peer_port: u16,
    /// Source address of the session and IPv4 next hop; `None` = what the kernel picks.
    pub local_ip: Option<IpAddr>,
    /// IPv6 next hop; `None` = the global address on the interface toward the peer.
    pub local_ipv6: Option<Ipv6Addr>,
    /// TCP MD5 key. Never printed.
    pub password: Option<String>,
    /// eBGP multihop TTL.
    pub multihop: Option<u8>,
    pub hold_time: Duration,
    pub communities: Vec<Community>,
    pub origin: Origin,
    /// IPv4 `NEXT_HOP` announced instead of the local address.
    pub next_hop: Option<Ipv4Addr>,
    /// `MULTI_EXIT_DISC`, when set.
    pub med: Option<u32>,
    /// `LOCAL_PREF` sent to iBGP peers (default 100).
    pub local_pref: Option<u32>,
}

/// The ORIGIN attribute of announcements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    Igp,
    Egp,
    Incomplete,
}

/// GoCast's rule: `igp`, `egp`, anything else is incomplete. An unexpected word is kept that
/// way for compatibility, with a warning, since it is most likely a typo.
impl FromStr for Origin {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "igp" => Self::Igp,
            "egp" => Self::Egp,
            "incomplete" => Self::Incomplete,
            _ => {
                tracing::warn!(
                    origin = s,
                    "bgp origin is not igp, egp or incomplete: using incomplete, as GoCast does"
                );
                Self::Incomplete
            }
        })
    }
}

impl<'de> Deserialize<'de> for Origin {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(crate::app::FromStrVisitor::<Self>::new())
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        // The default state file is keyed by the config's full path.
        let origin = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
        Self::parse(&text, &origin.display().to_string())
    }

    /// Parses config text; `origin` names the source in error messages.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = if text.trim().is_empty() {
            RawConfig::default()
        } else {
            serde_yaml::from_str(text).map_err(|e| ConfigError::Yaml {
                path: origin.to_owned(),
                message: e.to_string(),
            })?
        };
        raw.into_config(origin)
            .map_err(|(key, message)| ConfigError::Invalid {
                path: origin.to_owned(),
                key,
                message,
            })
    }
}

// ---- the file as `check-config` prints it --------------------------------------------------

/// The normalized config in the file's own schema, so the output loads again: every default
/// written out, and `bgp:` as a list of single-peer blocks (the one shape that carries every
/// per-peer key). Passwords are left out.
#[derive(Serialize)]
struct OutConfig<'a> {
    agent: OutAgent<'a>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    bgp: Vec<OutPeer<'a>>,
    apps: Vec<OutApp<'a>>,
    dataplane: OutDataplane<'a>,
}

#[derive(Serialize)]
struct OutDataplane<'a> {
    mode: DataplaneMode,
    interfaces: &'a [String],
    ingress: IngressMode,
    passive_health: OutPassiveHealth,
}

#[derive(Serialize)]
struct OutPassiveHealth {
    window: String,
    min_syn: u64,
    max_unanswered: f64,
}

#[derive(Serialize)]
struct OutAgent<'a> {
    listen_addr: String,
    monitor_interval: String,
    cleanup_timer: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    consul_addr: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    consul_query_interval: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    consul_node: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    consul_monitor_grace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    allow_consul_exec: Option<bool>,
    monitor_rise: u32,
    monitor_fall: u32,
    exec_timeout: String,
    state_file: &'a Path,
    allow_http_exec: bool,
    vip_allowlist: &'a [IpNet],
    #[serde(skip_serializing_if = "Option::is_none")]
    nat_dest_ip: Option<IpAddr>,
}

#[derive(Serialize)]
struct OutPeer<'a> {
    local_as: u32,
    peer_as: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    peer_ip: Option<IpAddr>,
    peer_port: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    local_ip: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    local_ipv6: Option<Ipv6Addr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    multihop: Option<u8>,
    hold_time: String,
    communities: &'a [Community],
    origin: Origin,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_hop: Option<Ipv4Addr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    med: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    local_pref: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    router_id: Option<Ipv4Addr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    listen_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    graceful_shutdown: Option<String>,
}

#[derive(Serialize)]
struct OutApp<'a> {
    name: &'a AppName,
    vip: &'a Vip,
    #[serde(skip_serializing_if = "Option::is_none")]
    vip_config: Option<OutVipConfig<'a>>,
    monitors: &'a [Monitor],
    nats: &'a [NatRule],
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    passive_health: bool,
}

#[derive(Serialize)]
struct OutVipConfig<'a> {
    bgp_communities: &'a [Community],
}

impl Config {
    /// The config as YAML in the input schema (see [`OutConfig`]).
    pub fn to_yaml(&self) -> String {
        let a = &self.agent;
        let out = OutConfig {
            agent: OutAgent {
                listen_addr: a.listen_addr.to_string(),
                monitor_interval: go_duration::format(a.monitor_interval),
                cleanup_timer: go_duration::format(a.cleanup_timer),
                consul_addr: a.consul.as_ref().map(|c| c.addr.as_str()),
                consul_query_interval: a
                    .consul
                    .as_ref()
                    .map(|c| go_duration::format(c.query_interval)),
                // `consul_token` is a secret and never printed, like peer passwords.
                consul_node: a.consul.as_ref().and_then(|c| c.node.as_deref()),
                consul_monitor_grace: a
                    .consul
                    .as_ref()
                    .map(|c| go_duration::format(c.monitor_grace)),
                allow_consul_exec: a.consul.as_ref().map(|c| c.allow_exec),
                monitor_rise: a.monitor_rise,
                monitor_fall: a.monitor_fall,
                exec_timeout: go_duration::format(a.exec_timeout),
                state_file: &a.state_file,
                allow_http_exec: a.allow_http_exec,
                vip_allowlist: &a.vip_allowlist,
                nat_dest_ip: a.nat_dest_ip,
            },
            bgp: self
                .bgp
                .peers
                .iter()
                .enumerate()
                .map(|(i, p)| OutPeer {
                    local_as: p.local_as,
                    peer_as: p.peer_as,
                    peer_ip: p.peer_ip,
                    peer_port: p.peer_port,
                    local_ip: p.local_ip,
                    local_ipv6: p.local_ipv6,
                    multihop: p.multihop,
                    hold_time: go_duration::format(p.hold_time),
                    communities: &p.communities,
                    origin: p.origin,
                    next_hop: p.next_hop,
                    med: p.med,
                    local_pref: p.local_pref,
                    // Section-wide keys ride on the first block.
                    router_id: self.bgp.router_id.filter(|_| i == 0),
                    listen_port: self.bgp.listen_port.filter(|_| i == 0),
                    graceful_shutdown: self
                        .bgp
                        .graceful_shutdown
                        .filter(|_| i == 0)
                        .map(go_duration::format),
                })
                .collect(),
            apps: self
                .apps
                .iter()
                .map(|app| OutApp {
                    name: &app.name,
                    vip: &app.vip,
                    vip_config: (!app.communities.is_empty()).then_some(OutVipConfig {
                        bgp_communities: &app.communities,
                    }),
                    monitors: &app.monitors,
                    nats: &app.nats,
                    passive_health: app.passive_health,
                })
                .collect(),
            dataplane: OutDataplane {
                mode: self.dataplane.mode,
                interfaces: &self.dataplane.interfaces,
                ingress: self.dataplane.ingress,
                passive_health: OutPassiveHealth {
                    window: go_duration::format(self.dataplane.passive_health.window),
                    min_syn: self.dataplane.passive_health.min_syn,
                    max_unanswered: self.dataplane.passive_health.max_unanswered,
                },
            },
        };
        // Plain data of strings, numbers and lists: serializing cannot fail.
        serde_yaml::to_string(&out).unwrap_or_default()
    }
}

// ---- the file as written -------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
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
    state_file: Option<PathBuf>,
    allow_http_exec: Option<bool>,
    vip_allowlist: Option<Vec<IpNet>>,
    nat_dest_ip: Option<IpAddr>,
}

/// `bgp:` is a block (single peer, or `peers:`) or a list of single-peer blocks.
#[derive(Debug)]
enum RawBgp {
    Block(RawBgpBlock),
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
                    .map(RawBgp::Block)
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

/// A semantic error: (key path, message).
type Invalid = (String, String);

fn invalid(key: impl Into<String>, message: impl Into<String>) -> Invalid {
    (key.into(), message.into())
}

impl RawConfig {
    fn into_config(self, origin: &str) -> Result<Config, Invalid> {
        let agent = self.agent.into_agent(origin)?;
        let bgp = match self.bgp {
            None => BgpConfig::default(),
            Some(RawBgp::Block(block)) => {
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
        for (i, p) in bgp.peers.iter().enumerate() {
            // One session per address: /info and metrics name a peer by it.
            let twin = bgp.peers[..i].iter().any(|q| q.peer_ip == p.peer_ip);
            if twin {
                let who = p
                    .peer_ip
                    .map_or_else(|| "autodiscovered peer".to_owned(), |ip| ip.to_string());
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
        Ok(PeerConfig {
            local_as: section.local_as,
            peer_as,
            peer_ip,
            peer_port: peer.peer_port.or(defaults.peer_port).unwrap_or(BGP_PORT),
            local_ip,
            local_ipv6: peer.local_ipv6.or(defaults.local_ipv6),
            password: peer.password.clone().or_else(|| defaults.password.clone()),
            multihop,
            hold_time,
            communities: section.communities.to_vec(),
            origin: section.origin,
            next_hop: peer.next_hop.or(defaults.next_hop),
            med: peer.med.or(defaults.med),
            local_pref: peer.local_pref.or(defaults.local_pref),
        })
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

/// `hold_time` as BGP people write it: seconds (`90`) or a duration (`90s`).
fn hold_time<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Secs {
        Int(u16),
        Text(String),
    }
    match Option::<Secs>::deserialize(d)? {
        None => Ok(None),
        Some(Secs::Int(s)) => Ok(Some(Duration::from_secs(u64::from(s)))),
        Some(Secs::Text(t)) => go_duration::parse(&t).map(Some).map_err(de::Error::custom),
    }
}

/// Go's `time.ParseDuration` syntax (`500ms`, `10s`, `1h30m`, `1.5h`), which GoCast configs use.
pub mod go_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    /// Parses a Go duration. Negative durations are refused: nothing here can be negative.
    pub fn parse(s: &str) -> Result<Duration, String> {
        let bad = |why: &str| {
            format!("invalid duration {s:?}: {why} (Go syntax, e.g. 500ms, 10s, 15m, 1h30m)")
        };
        if s == "0" {
            return Ok(Duration::ZERO);
        }
        let mut rest = s.strip_prefix('+').unwrap_or(s);
        if rest.starts_with('-') {
            return Err(bad("must not be negative"));
        }
        if rest.is_empty() {
            return Err(bad("empty"));
        }
        let mut total_ns: f64 = 0.0;
        while !rest.is_empty() {
            let num_len = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(rest.len());
            let (num, after) = rest.split_at(num_len);
            if num.is_empty() || num == "." {
                return Err(bad("expected a number"));
            }
            let value: f64 = num.parse().map_err(|_| bad("bad number"))?;
            let unit_len = after
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(after.len());
            let (unit, next) = after.split_at(unit_len);
            let scale = match unit {
                "ns" => 1.0,
                "us" | "µs" | "μs" => 1e3,
                "ms" => 1e6,
                "s" => 1e9,
                "m" => 60e9,
                "h" => 3600e9,
                "" => return Err(bad("missing unit")),
                _ => return Err(bad("unknown unit")),
            };
            total_ns += value * scale;
            rest = next;
        }
        if total_ns > 1e18 {
            return Err(bad("too large"));
        }
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "bounded and non-negative above"
        )]
        Ok(Duration::from_nanos(total_ns.round() as u64))
    }

    /// Formats like Go's `Duration.String` for the common cases (`1h30m0s` becomes `1h30m`).
    pub fn format(d: Duration) -> String {
        let ms = d.as_millis();
        if d.is_zero() {
            return "0s".into();
        }
        if !d.subsec_nanos().is_multiple_of(1_000_000) {
            return format!("{}ns", d.as_nanos());
        }
        if !ms.is_multiple_of(1000) {
            return format!("{ms}ms");
        }
        let secs = d.as_secs();
        let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
        let mut out = String::new();
        for (n, unit) in [(h, 'h'), (m, 'm'), (s, 's')] {
            if n > 0 {
                out += &n.to_string();
                out.push(unit);
            }
        }
        out
    }

    /// A Go duration string, parsed while the deserializer still knows where it is.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct GoDuration(pub Duration);

    impl std::str::FromStr for GoDuration {
        type Err = String;

        fn from_str(s: &str) -> Result<Self, String> {
            parse(s).map(Self)
        }
    }

    impl<'de> Deserialize<'de> for GoDuration {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_str(crate::app::FromStrVisitor::<Self>::new())
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        GoDuration::deserialize(d).map(|g| g.0)
    }

    /// For `Option<Duration>` fields.
    pub mod option {
        use std::time::Duration;

        use serde::{Deserialize, Deserializer};

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            Ok(Option::<super::GoDuration>::deserialize(d)?.map(|g| g.0))
        }
    }
}

#[cfg(test)]
mod tests {
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
        let c = parse("bgp: {local_as: 1, remote_as: 2, peer_ip: 198.18.0.2, password: s3cret}")
            .unwrap();
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
    fn a_section_local_ip_is_the_default_for_peers_of_its_family_only() {
        let c = parse("bgp:\n  local_as: 65001\n  local_ip: 198.18.0.1\n  peers:\n    - {peer_ip: 198.18.0.2, peer_as: 65000}\n    - {peer_ip: '2001:db8::2', peer_as: 65000}\n").unwrap();
        assert_eq!(c.bgp.peers[0].local_ip, Some("198.18.0.1".parse().unwrap()));
        assert_eq!(c.bgp.peers[1].local_ip, None);
        assert!(err("bgp: {local_as: 1, peers: [{peer_ip: '2001:db8::2', peer_as: 2, local_ip: 198.18.0.1}]}").contains("different families"));
    }
}
