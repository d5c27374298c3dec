//! The GoCast YAML config, read with serde and turned once into typed values.
//!
//! Every shape GoCast users have in the wild is accepted (`docs/design.md`, "Configuration
//! semantics"): the single-peer `bgp:` block (`peer_as` or `remote_as`), the multi-peer block
//! with `peers:`, and a YAML list of single-peer blocks; apps with `monitor:` or `monitors:`.
//! All of them become one [`Config`].
//! Unknown keys, wrong types and bad values are errors that name the key and, where the YAML
//! parser knows it, the line.
//!
//! - this file: the typed [`Config`] and [`Config::load`];
//! - `raw`: the file as written (serde structs mirroring GoCast's keys) and its validation into
//!   [`Config`];
//! - `print`: the normalized file `gocast check-config` prints;
//! - [`go_duration`]: Go's duration syntax.

pub mod go_duration;
mod print;
mod raw;
#[cfg(test)]
mod tests;

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize};

use self::raw::RawConfig;
pub use self::raw::default_state_file;
use crate::app::{AppSpec, Community};

/// A key that changed in the file but keeps its running value, with why (e.g. "needs a
/// restart").
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NotApplied {
    /// The config key, e.g. `agent.listen_addr`.
    pub key: &'static str,
    pub reason: String,
}

/// Defaults, as GoCast has them where it has them.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_MONITOR_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_CLEANUP_TIMER: Duration = Duration::from_mins(15);
pub const DEFAULT_CONSUL_QUERY_INTERVAL: Duration = Duration::from_mins(5);
/// How long a `consul` monitor keeps Consul's last answer when Consul does not answer.
pub const DEFAULT_CONSUL_MONITOR_GRACE: Duration = Duration::from_secs(30);
pub const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(10);
/// Long enough for routers to move traffic after a `GRACEFUL_SHUTDOWN` re-announcement.
pub const DEFAULT_DRAIN_TIME: Duration = Duration::from_secs(30);
/// Where state files live unless `agent.state_file` says otherwise.
pub const STATE_DIR: &str = "/var/lib/gocast";
pub const DEFAULT_HOLD_TIME: Duration = Duration::from_secs(90);
/// BFD's default `min_tx` and `min_rx`: with [`DEFAULT_BFD_MULTIPLIER`], a silent host is
/// detected within 900 ms (what BIRD and FRR offer as their own defaults, 100–300 ms × 3).
pub const DEFAULT_BFD_INTERVAL: Duration = Duration::from_millis(300);
pub const DEFAULT_BFD_MULTIPLIER: u8 = 3;
/// The bounds of `bfd.min_tx` / `bfd.min_rx`: below 10 ms a loaded host would flap its own
/// sessions; above a minute BFD detects nothing the hold timer would not.
pub const BFD_INTERVAL_MIN: Duration = Duration::from_millis(10);
pub const BFD_INTERVAL_MAX: Duration = Duration::from_secs(60);
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
    /// Who may use the API and how much of the agent it may take (read at start only).
    pub api: ApiConfig,
    /// How long a drained app's route stays announced with `GRACEFUL_SHUTDOWN` before it is
    /// withdrawn.
    pub drain_time: Duration,
    /// The log filter (`tracing` `EnvFilter` syntax, e.g. `info,gocast::bgp=debug`); the
    /// command line's `--log-level` and `RUST_LOG` win over it. Applied live on reload.
    pub log_level: Option<String>,
}

/// `agent.listen_unix_mode` when not set: owner and group read and write.
pub const DEFAULT_UNIX_MODE: u32 = 0o660;

/// The API's access and limits: `agent.api_*` and `agent.listen_unix*`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiConfig {
    /// A file holding the bearer token state-changing TCP requests need; `GOCAST_API_TOKEN_FILE`
    /// wins over it. `None`: no token (GoCast's open API).
    pub token_file: Option<PathBuf>,
    /// Whether reads need the token too.
    pub auth: crate::auth::AuthScope,
    /// Open API connections at most (TCP and Unix together); lowered to keep descriptors in
    /// reserve (`serve::connection_cap`).
    pub max_connections: usize,
    /// A Unix-socket API besides TCP, gated by the file's owner, group and mode.
    pub listen_unix: Option<PathBuf>,
    pub unix_mode: u32,
    /// The socket file's group; `None` keeps the agent's.
    pub unix_group: Option<String>,
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
    /// `LOCAL_PREF` sent to an iBGP peer with gracefully shut down routes (a drain, or
    /// `graceful_shutdown` at stop); default 0, the least preferred.
    pub drain_local_pref: u32,
    /// Never connect to the peer: wait in Active for its connection on `bgp.listen_port`
    /// (RFC 4271 §8.1.1 `PassiveTcpEstablishment`).
    pub passive: bool,
    /// BFD on this peer's session (RFC 5880/5881/5882), when set.
    pub bfd: Option<BfdConfig>,
}

/// `bfd:` on a peer (or as the section's default): `bfd: true` takes the defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BfdConfig {
    /// Our Desired Min TX Interval once the session is Up.
    pub min_tx: Duration,
    /// Our Required Min RX Interval.
    pub min_rx: Duration,
    /// Our Detect Mult: the peer declares us down after this many intervals of silence.
    pub multiplier: u8,
    /// Hold the BGP session until BFD is Up (RFC 5882 §4.3 leaves it to the client).
    pub strict: bool,
}

impl Default for BfdConfig {
    fn default() -> Self {
        Self {
            min_tx: DEFAULT_BFD_INTERVAL,
            min_rx: DEFAULT_BFD_INTERVAL,
            multiplier: DEFAULT_BFD_MULTIPLIER,
            strict: true,
        }
    }
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
