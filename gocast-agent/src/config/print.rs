//! The normalized config `gocast check-config` prints: it loads again.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use ipnet::IpNet;
use serde::Serialize;

use crate::app::{AppName, Community, Monitor, NatRule, Vip};

use super::{Config, DataplaneMode, IngressMode, Origin, go_duration};

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
    #[serde(skip_serializing_if = "Option::is_none")]
    api_token_file: Option<&'a Path>,
    api_auth: crate::auth::AuthScope,
    api_max_connections: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    listen_unix: Option<&'a Path>,
    listen_unix_mode: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    listen_unix_group: Option<&'a str>,
    drain_time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    log_level: Option<&'a str>,
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
    drain_local_pref: u32,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    passive: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    bfd: Option<OutBfd>,
    #[serde(skip_serializing_if = "Option::is_none")]
    router_id: Option<Ipv4Addr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    listen_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    graceful_shutdown: Option<String>,
}

#[derive(Serialize)]
struct OutBfd {
    min_tx: String,
    min_rx: String,
    multiplier: u8,
    strict: bool,
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
                api_token_file: a.api.token_file.as_deref(),
                api_auth: a.api.auth,
                api_max_connections: a.api.max_connections,
                listen_unix: a.api.listen_unix.as_deref(),
                listen_unix_mode: format!("{:04o}", a.api.unix_mode),
                listen_unix_group: a.api.unix_group.as_deref(),
                drain_time: go_duration::format(a.drain_time),
                log_level: a.log_level.as_deref(),
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
                    drain_local_pref: p.drain_local_pref,
                    passive: p.passive,
                    bfd: p.bfd.map(|b| OutBfd {
                        min_tx: go_duration::format(b.min_tx),
                        min_rx: go_duration::format(b.min_rx),
                        multiplier: b.multiplier,
                        strict: b.strict,
                    }),
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
