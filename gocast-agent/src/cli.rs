//! The command line: `gocast run | check-config | status | routes | reload | drain | undrain`, and
//! GoCast's own flags.
//!
//! GoCast is started as `gocast -config=/etc/gocast/config.yaml -logtostderr` (Go's flag
//! package, glog flags). [`normalize`] turns that into `gocast run --config ...` so existing
//! unit files and container commands keep working.

use std::{ffi::OsString, fmt::Write, path::PathBuf};

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::Value;

/// Where GoCast's packaging puts the config; used when `--config` is not given.
pub const DEFAULT_CONFIG: &str = "/etc/gocast/config.yaml";

#[derive(Debug, Parser)]
#[command(
    name = "gocast",
    version,
    about = "Anycast host agent: health checks, VIPs on lo, BGP announcements"
)]
pub struct Cli {
    /// Log output format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter (tracing `EnvFilter` syntax, e.g. `info` or `gocast=debug`); `RUST_LOG` also works.
    #[arg(long, global = true)]
    pub log_level: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent.
    Run {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Validate a config file and print it normalized (exit 2 if invalid).
    CheckConfig {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Show the apps and peers of a running agent.
    Status {
        #[command(flatten)]
        agent: AgentAddr,
        #[command(flatten)]
        output: Output,
    },
    /// Show what the agent's BGP sessions have sent and not withdrawn (their Adj-RIB-Out), with
    /// every attribute.
    Routes {
        /// Only the session with this peer address.
        #[arg(long)]
        peer: Option<String>,
        /// `--json`: the API's answer (`GET /peers/{addr}/routes`; an array of those without
        /// `--peer`).
        #[command(flatten)]
        output: Output,
        #[command(flatten)]
        agent: AgentAddr,
    },
    /// Make a running agent re-read its config file and apply the difference; exit 1 with
    /// the reason if the file is refused (nothing changes then).
    Reload {
        #[command(flatten)]
        agent: AgentAddr,
        #[command(flatten)]
        output: Output,
    },
    /// Drain an app, or the whole host without APP: its routes are re-announced with
    /// `GRACEFUL_SHUTDOWN`, withdrawn after `agent.drain_time`, and stay withdrawn (across
    /// restarts too) until `undrain`.
    Drain {
        app: Option<String>,
        #[command(flatten)]
        agent: AgentAddr,
        #[command(flatten)]
        output: Output,
    },
    /// Undo `drain` for an app, or for the whole host without APP.
    Undrain {
        app: Option<String>,
        #[command(flatten)]
        agent: AgentAddr,
        #[command(flatten)]
        output: Output,
    },
}

/// How a command that talks to the agent prints its answer.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct Output {
    /// Print the agent's JSON instead of tables (schemas: docs/design.md, "The CLI's JSON").
    #[arg(long)]
    pub json: bool,
}

/// Where a running agent's HTTP API is.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentAddr {
    /// The agent's HTTP address (host:port).
    #[arg(long, default_value = "127.0.0.1:8080", conflicts_with = "config")]
    pub addr: String,
    /// Read the address from this config instead: its `agent.listen_unix` socket when that
    /// exists, else `agent.listen_addr`; its `agent.api_token_file` for the token.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The agent's Unix socket (`agent.listen_unix`); wins over `--addr` and the config.
    #[arg(long)]
    pub socket: Option<PathBuf>,
}

/// glog flags GoCast accepted; they have no meaning here and are dropped.
const GLOG_FLAGS: [&str; 6] = [
    "logtostderr",
    "alsologtostderr",
    "v",
    "stderrthreshold",
    "log_dir",
    "vmodule",
];
const SUBCOMMANDS: [&str; 8] = [
    "run",
    "check-config",
    "status",
    "routes",
    "reload",
    "drain",
    "undrain",
    "help",
];

/// Rewrites GoCast-style arguments (`-config F`, `-config=F`, glog flags) into ours.
/// Arguments that already use a subcommand pass through untouched.
pub fn normalize(args: Vec<OsString>) -> Vec<OsString> {
    let mut iter = args.into_iter();
    let mut out: Vec<OsString> = iter.next().into_iter().collect();
    let rest: Vec<OsString> = iter.collect();
    // A subcommand anywhere means our own syntax (global flags may come before it).
    let ours = rest.iter().any(|a| {
        a.to_str().is_some_and(|a| {
            SUBCOMMANDS.contains(&a) || matches!(a, "--version" | "-V" | "--help" | "-h")
        })
    });
    if ours {
        // GoCast's single-dash `-config` is understood in our syntax too.
        out.extend(rest.into_iter().map(|a| match a.to_str() {
            Some("-config") => OsString::from("--config"),
            Some(s) if s.starts_with("-config=") => OsString::from(format!("-{s}")),
            _ => a,
        }));
        return out;
    }
    let mut translated = vec![OsString::from("run")];
    let mut i = 0;
    while i < rest.len() {
        let arg = rest[i].to_string_lossy().into_owned();
        let flag = arg.trim_start_matches('-');
        let (key, inline) = match flag.split_once('=') {
            Some((k, v)) => (k, Some(v.to_owned())),
            None => (flag, None),
        };
        if arg.starts_with('-') && GLOG_FLAGS.contains(&key) {
            // `-v 2` takes a separate value; boolean glog flags do not.
            if inline.is_none() && matches!(key, "v" | "stderrthreshold" | "log_dir" | "vmodule") {
                i += 1;
            }
        } else if arg.starts_with('-') && key == "config" {
            translated.push("--config".into());
            if let Some(v) = inline {
                translated.push(v.into());
            }
        } else if arg.starts_with('-') && !arg.starts_with("--") && key.len() > 1 {
            // Go flags take one dash; ours take two.
            translated.push(format!("--{flag}").into());
        } else {
            translated.push(rest[i].clone());
        }
        i += 1;
    }
    out.extend(translated);
    out
}

/// A peer's BFD session in one cell: `up, detect 900ms`, `down (last: control detection time
/// expired (1))`, or `-` without BFD.
fn bfd_cell(bfd: &Value) -> String {
    let Some(state) = bfd["state"].as_str() else {
        return "-".into();
    };
    let mut cell = state.to_owned();
    if let Some(ms) = bfd["detection_time_ms"].as_u64() {
        let _ = write!(cell, ", detect {ms}ms");
    }
    if let Some(last) = bfd["last_down"].as_str() {
        let _ = write!(cell, " (last down: {last})");
    }
    cell
}

/// A string field, `?` when missing.
fn text_of(v: &Value) -> &str {
    v.as_str().unwrap_or("?")
}

/// What `gocast routes` prints for one peer (a `GET /peers/{addr}/routes` answer): a heading,
/// then one line per route.
pub fn render_peer_routes(answer: &Value) -> String {
    let list = |v: &Value| -> String {
        let items: Vec<String> = v
            .as_array()
            .into_iter()
            .flatten()
            .map(|i| match i {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect();
        if items.is_empty() {
            "-".into()
        } else {
            items.join(" ")
        }
    };
    let number = |v: &Value| v.as_u64().map_or_else(|| "-".into(), |n| n.to_string());
    let routes = answer["routes"].as_array().map_or(&[][..], Vec::as_slice);
    let mut out = format!(
        "peer {} (AS {}, {}): {} routes sent\n",
        text_of(&answer["peer"]),
        number(&answer["asn"]),
        text_of(&answer["state"]),
        routes.len()
    );
    if routes.is_empty() {
        return out;
    }
    let mut rows = vec![[
        "PREFIX".to_owned(),
        "NEXT HOP".into(),
        "AS PATH".into(),
        "ORIGIN".into(),
        "MED".into(),
        "LOCAL PREF".into(),
        "COMMUNITIES".into(),
        "SENT".into(),
    ]];
    for r in routes {
        let communities = [list(&r["communities"]), list(&r["large_communities"])]
            .into_iter()
            .filter(|c| c != "-")
            .collect::<Vec<_>>()
            .join(" ");
        rows.push([
            text_of(&r["prefix"]).to_owned(),
            text_of(&r["next_hop"]).to_owned(),
            list(&r["as_path"]),
            text_of(&r["origin"]).to_owned(),
            number(&r["med"]),
            number(&r["local_pref"]),
            if communities.is_empty() {
                "-".into()
            } else {
                communities
            },
            text_of(&r["sent_at"]).to_owned(),
        ]);
    }
    out += &table(&rows);
    out
}

/// What `gocast reload` prints: the changes, the refusals and what waits for a restart.
pub fn render_reload(report: &Value) -> String {
    let names = |v: &Value| -> String {
        let list: Vec<&str> = v
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        if list.is_empty() {
            "-".into()
        } else {
            list.join(", ")
        }
    };
    let apps = &report["apps"];
    let mut out = format!(
        "config reloaded\napps added: {}\napps changed: {}\napps removed: {}\n",
        names(&apps["added"]),
        names(&apps["changed"]),
        names(&apps["removed"]),
    );
    for r in apps["refused"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "app refused: {}: {}",
            r["app"].as_str().unwrap_or("?"),
            r["reason"].as_str().unwrap_or("?")
        );
    }
    let bgp = &report["bgp"];
    for (what, key) in [("added", "added"), ("removed", "removed")] {
        let _ = writeln!(out, "bgp peers {what}: {}", names(&bgp[key]));
    }
    for (what, key) in [("reset", "reset"), ("sent new attributes", "updated")] {
        for change in bgp[key].as_array().into_iter().flatten() {
            let _ = writeln!(
                out,
                "bgp peer {} {what} ({})",
                text_of(&change["peer"]),
                names(&change["keys"])
            );
        }
    }
    for n in bgp["not_applied"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "not applied: {} ({})",
            text_of(&n["key"]),
            text_of(&n["reason"])
        );
    }
    if let Some(level) = report["log_level"].as_str() {
        let _ = writeln!(out, "log level: {level}");
    }
    if report["consul_restarted"].as_bool() == Some(true) {
        out += "consul: restarted with the new settings\n";
    }
    for n in report["not_applied"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "not applied until a restart: {} ({})",
            n["key"].as_str().unwrap_or("?"),
            n["reason"].as_str().unwrap_or("?")
        );
    }
    out
}

/// What `gocast drain`/`undrain` prints: the host's drain state and each app's.
pub fn render_drain(report: &Value) -> String {
    let mut out = format!(
        "host drained: {}\n",
        if report["host_drained"].as_bool() == Some(true) {
            "yes"
        } else {
            "no"
        }
    );
    for a in report["apps"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "{}: {}{}",
            a["name"].as_str().unwrap_or("?"),
            a["drain"].as_str().unwrap_or("not drained"),
            a["withdraw_in_s"]
                .as_f64()
                .map_or_else(String::new, |s| format!(", withdrawn in {s:.0} s")),
        );
    }
    out
}

/// A table cell: a string as it is, `-` for null, anything else as JSON.
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// The peer table of `gocast status`.
fn peers_table(info: &Value) -> String {
    let mut peers = vec![[
        "PEER".to_owned(),
        "AS".into(),
        "STATE".into(),
        "UPTIME".into(),
        "SENT".into(),
        "RECEIVED".into(),
        "BFD".into(),
        "LAST ERROR".into(),
    ]];
    for p in info["peers"].as_array().into_iter().flatten() {
        peers.push([
            p["address"].as_str().unwrap_or("(autodiscover)").to_owned(),
            text(&p["asn"]),
            text(&p["state"]),
            p["uptime_s"].as_u64().map_or_else(|| "-".into(), uptime),
            text(&p["prefixes_advertised"]),
            text(&p["prefixes_received"]),
            bfd_cell(&p["bfd"]),
            text(&p["last_error"]),
        ]);
    }
    table(&peers)
}

/// `gocast status`: the peers, then one line per app, then the traffic, as `birdc show`
/// prints tables.
pub fn render_status(info: &Value, apps: &Value, stats: Option<&Value>) -> String {
    let mut out = format!(
        "gocast {} (dataplane: {})\n",
        text(&info["version"]),
        text(&info["dataplane"]["mode"])
    );
    out += &peers_table(info);
    out.push('\n');
    let mut rows = vec![[
        "APP".to_owned(),
        "VIP".into(),
        "SOURCE".into(),
        "STATE".into(),
        "ANNOUNCED".into(),
        "MONITORS".into(),
        "REPAIRS".into(),
    ]];
    // A route in the announced set reaches the Established sessions that carry its family
    // (one without a next hop of that family does not get it): "to 1/2 peers" tells a
    // half-announced host from a fully announced one, and "wanted, 0/2 peers" a route that
    // reaches no one, without reading the peer table.
    let peers = info["peers"].as_array().map_or(&[][..], Vec::as_slice);
    let reached = |vip: &str| {
        let family = if vip.contains(':') { "ipv6" } else { "ipv4" };
        peers
            .iter()
            .filter(|p| p["state"] == "Established")
            .filter(|p| {
                p["families"]
                    .as_array()
                    .is_some_and(|f| f.iter().any(|f| f == family))
            })
            .count()
    };
    for a in apps.as_array().into_iter().flatten() {
        let monitors: Vec<String> = a["monitors"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| {
                let verdict = match m["ok"].as_bool() {
                    Some(true) => "ok",
                    Some(false) => "FAIL",
                    None => "pending",
                };
                format!("{} {verdict}", text(&m["monitor"]))
            })
            .collect();
        let mut health = match a["drain"].as_str() {
            Some(drain) => format!("{}, {drain}", text(&a["state"])),
            None => text(&a["state"]),
        };
        health += &passive_hold(&a["passive_health"]);
        rows.push([
            text(&a["name"]),
            text(&a["vip"]),
            text(&a["source"]),
            health,
            match (
                a["announced"].as_bool(),
                reached(a["vip"].as_str().unwrap_or("")),
            ) {
                (Some(true), 0) => format!("wanted, 0/{} peers", peers.len()),
                (Some(true), n) => format!("to {n}/{} peers", peers.len()),
                _ => "no".into(),
            },
            if monitors.is_empty() {
                "-".into()
            } else {
                monitors.join(", ")
            },
            repairs(a),
        ]);
    }
    out += &table(&rows);
    out.push('\n');
    match stats {
        Some(stats) if stats["unavailable"].is_null() => out += &traffic_table(stats),
        _ => out += "traffic: no per-VIP counters (they need the eBPF dataplane)\n",
    }
    out
}

/// After a passive-health failure: `, passive hold-down 12 s` while it runs, then `, passive:
/// awaiting proof` until a check proves the service accepts; empty otherwise.
fn passive_hold(passive: &Value) -> String {
    if passive["awaiting_proof"] != true {
        return String::new();
    }
    match passive["hold_down_s"].as_f64() {
        Some(s) => format!(", passive hold-down {s:.0} s"),
        None => ", passive: awaiting proof".into(),
    }
}

/// A session's uptime for people, to its two largest units: `42s`, `5m 3s`, `2h 5m`, `3d 4h`.
fn uptime(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

/// How often self-repair put back a part of the app, and the last time: `2 (last: vip
/// missing from lo, repaired)`.
fn repairs(app: &Value) -> String {
    let count = app["repairs"].as_u64().unwrap_or(0);
    let last = &app["last_repair"];
    match (last["what"].as_str(), last["result"].as_str()) {
        (Some(what), Some(result)) if count > 0 => format!("{count} (last: {what}, {result})"),
        _ => count.to_string(),
    }
}

/// Per-VIP rates from `/stats`.
fn traffic_table(stats: &Value) -> String {
    let mut rows = vec![[
        "VIP".to_owned(),
        "APP".into(),
        "IN pkt/s".into(),
        "IN B/s".into(),
        "OUT pkt/s".into(),
        "OUT B/s".into(),
        "SYN/s".into(),
        "SYN-ACK/s".into(),
        "RST/s".into(),
    ]];
    for v in stats["vips"].as_array().into_iter().flatten() {
        let rate = |key: &str| {
            v["rates"][key]
                .as_f64()
                .map_or_else(|| "-".into(), |r| format!("{r:.1}"))
        };
        rows.push([
            v["vip"].as_str().unwrap_or("-").to_owned(),
            v["app"].as_str().unwrap_or("-").to_owned(),
            rate("packets_in"),
            rate("bytes_in"),
            rate("packets_out"),
            rate("bytes_out"),
            rate("syn_in"),
            rate("synack_out"),
            rate("rst_out"),
        ]);
    }
    table(&rows)
}

/// Left-aligned columns, two spaces apart.
fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out += line.join("  ").trim_end();
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(args: &[&str]) -> Vec<String> {
        normalize(args.iter().map(OsString::from).collect())
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    #[test]
    fn gocast_single_dash_config_becomes_run() {
        assert_eq!(
            norm(&["gocast", "-config", "c.yaml"]),
            ["gocast", "run", "--config", "c.yaml"]
        );
        assert_eq!(
            norm(&["gocast", "-config=c.yaml"]),
            ["gocast", "run", "--config", "c.yaml"]
        );
        assert_eq!(
            norm(&["gocast", "--config", "c.yaml"]),
            ["gocast", "run", "--config", "c.yaml"]
        );
    }

    #[test]
    fn glog_flags_from_gocast_unit_files_are_dropped() {
        assert_eq!(
            norm(&[
                "gocast",
                "-config=/c.yaml",
                "-logtostderr",
                "-v",
                "2",
                "-alsologtostderr=true"
            ]),
            ["gocast", "run", "--config", "/c.yaml"]
        );
    }

    #[test]
    fn our_own_subcommands_pass_through() {
        assert_eq!(
            norm(&["gocast", "run", "--config", "c"]),
            ["gocast", "run", "--config", "c"]
        );
        assert_eq!(norm(&["gocast", "--version"]), ["gocast", "--version"]);
        assert_eq!(
            norm(&["gocast", "--log-format", "json", "run"]),
            ["gocast", "--log-format", "json", "run"]
        );
        assert_eq!(
            norm(&["gocast", "check-config", "--config", "c"]),
            ["gocast", "check-config", "--config", "c"]
        );
        assert_eq!(
            norm(&["gocast", "run", "-config", "c"]),
            ["gocast", "run", "--config", "c"]
        );
        assert_eq!(
            norm(&["gocast", "run", "-config=c"]),
            ["gocast", "run", "--config=c"]
        );
    }

    #[test]
    fn normalized_gocast_arguments_parse() {
        let cli = Cli::try_parse_from(normalize(
            ["gocast", "-config", "x.yaml", "-log-format", "json"]
                .map(OsString::from)
                .to_vec(),
        ))
        .unwrap();
        assert_eq!(cli.log_format, LogFormat::Json);
        assert!(
            matches!(cli.command, Command::Run { config } if config.as_path() == std::path::Path::new("x.yaml"))
        );
    }

    #[test]
    fn status_counts_the_established_peers_that_carry_the_vips_family() {
        let info = serde_json::json!({"version": "0.1.0", "dataplane": {"mode": "ebpf"}, "peers": [
            {"address": "198.18.0.2", "asn": 65000, "state": "Established", "uptime_s": 93_784,
             "prefixes_advertised": 1, "prefixes_received": 3, "families": ["ipv4"]},
            {"address": "198.18.1.2", "asn": 65000, "state": "Active", "uptime_s": null,
             "prefixes_advertised": 0, "prefixes_received": 0, "families": []}]});
        let apps = serde_json::json!([
            {"name": "web", "vip": "192.0.2.10/32", "state": "healthy", "announced": true, "monitors": []},
            {"name": "web6", "vip": "2001:db8::10/128", "state": "healthy", "announced": true, "monitors": []},
            {"name": "db", "vip": "192.0.2.11/32", "state": "unhealthy", "announced": false, "monitors": []}]);
        let out = render_status(&info, &apps, None);
        assert!(out.contains("Established  1d 2h   1     3"), "{out}");
        let line = |name: &str| {
            out.lines()
                .find(|l| l.starts_with(&format!("{name} ")))
                .unwrap()
                .to_owned()
        };
        assert!(line("web").contains("to 1/2 peers"), "{out}");
        // The only Established session has no IPv6 next hop: the IPv6 VIP reaches no one.
        assert!(line("web6").contains("wanted, 0/2 peers"), "{out}");
        assert!(line("db").contains("  no  "), "{out}");
    }

    #[test]
    fn with_every_peer_down_no_app_reads_as_announced_to_a_peer() {
        let info = serde_json::json!({"version": "0.1.0", "dataplane": {"mode": "iptables"}, "peers": [
            {"address": "198.18.0.2", "asn": 65000, "state": "Idle", "uptime_s": null, "families": []},
            {"address": "198.18.1.2", "asn": 65000, "state": "Connect", "uptime_s": null, "families": []}]});
        let apps = serde_json::json!([
            {"name": "web", "vip": "192.0.2.10/32", "state": "healthy", "announced": true, "monitors": []}]);
        let out = render_status(&info, &apps, None);
        assert!(out.contains("wanted, 0/2 peers"), "{out}");
        assert!(!out.contains("to "), "{out}");
    }

    #[test]
    fn json_output_is_a_flag_of_every_command_that_asks_the_agent() {
        for args in [
            &["gocast", "status", "--json"][..],
            &["gocast", "reload", "--json"],
            &["gocast", "drain", "web", "--json"],
            &["gocast", "undrain", "--json"],
        ] {
            let cli = Cli::try_parse_from(args).unwrap();
            let output = match cli.command {
                Command::Status { output, .. }
                | Command::Reload { output, .. }
                | Command::Drain { output, .. }
                | Command::Undrain { output, .. } => output,
                other => panic!("{other:?}"),
            };
            assert!(output.json, "{args:?}");
        }
    }

    #[test]
    fn uptimes_read_in_their_two_largest_units() {
        assert_eq!(uptime(0), "0s");
        assert_eq!(uptime(42), "42s");
        assert_eq!(uptime(303), "5m 3s");
        assert_eq!(uptime(7_500), "2h 5m");
        assert_eq!(uptime(273_600), "3d 4h");
    }

    #[test]
    fn routes_prints_each_sent_route_with_its_attributes() {
        let answer = serde_json::json!({"peer": "198.18.0.2", "asn": 65000, "state": "Established",
            "routes": [{"prefix": "192.0.2.10/32", "next_hop": "198.18.0.1", "as_path": [65001],
                "origin": "igp", "med": null, "local_pref": null,
                "communities": ["65001:7", "no-export"], "large_communities": ["65001:7:7"],
                "sent_at": "2026-01-01T12:00:00.000Z"}]});
        let out = render_peer_routes(&answer);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[0],
            "peer 198.18.0.2 (AS 65000, Established): 1 routes sent"
        );
        assert!(
            lines[1].starts_with("PREFIX") && lines[1].contains("COMMUNITIES"),
            "{out}"
        );
        for field in [
            "192.0.2.10/32",
            "198.18.0.1",
            "65001",
            "igp",
            "65001:7 no-export 65001:7:7",
            "2026-01-01T12:00:00.000Z",
        ] {
            assert!(lines[2].contains(field), "{field}: {out}");
        }
        let empty = serde_json::json!({"peer": "198.18.0.2", "asn": 65000, "state": "Active", "routes": []});
        assert_eq!(
            render_peer_routes(&empty),
            "peer 198.18.0.2 (AS 65000, Active): 0 routes sent\n"
        );
    }

    #[test]
    fn status_shows_peers_and_apps_as_tables() {
        let info = serde_json::json!({"version": "0.1.0", "dataplane": {"mode": "iptables"}, "peers": [{"address": "198.18.0.2", "asn": 65000, "state": "Established", "uptime_s": 12, "prefixes_advertised": 1, "prefixes_received": 0, "families": ["ipv4", "ipv6"], "last_error": null}]});
        let apps = serde_json::json!([{"name": "web", "vip": "192.0.2.10/32", "source": "http", "state": "healthy", "announced": true, "monitors": [{"monitor": "port:tcp:80", "ok": true}]}]);
        let out = render_status(&info, &apps, None);
        assert!(out.contains("198.18.0.2  65000  Established  12s"), "{out}");
        let with_bfd = serde_json::json!({"version": "0.1.0", "dataplane": {"mode": "iptables"}, "peers": [{"address": "198.18.0.2", "asn": 65000, "state": "Established", "uptime_s": 12, "prefixes_advertised": 1, "bfd": {"state": "up", "detection_time_ms": 900, "last_down": "control detection time expired (1)"}}]});
        let out_bfd = render_status(&with_bfd, &apps, None);
        assert!(
            out_bfd.contains("up, detect 900ms (last down: control detection time expired (1))"),
            "{out_bfd}"
        );
        assert!(
            out.contains("web  192.0.2.10/32  http    healthy  to 1/1 peers  port:tcp:80 ok"),
            "{out}"
        );
        assert!(out.contains("no per-VIP counters"), "{out}");
        assert!(out.lines().nth(4).unwrap().ends_with("REPAIRS"), "{out}");
        assert!(out.contains("port:tcp:80 ok  0"), "{out}");
        let repaired = serde_json::json!([{"name": "web", "vip": "192.0.2.10/32", "state": "healthy", "announced": true, "monitors": [], "repairs": 2, "last_repair": {"at": "2026-01-01T12:00:00.000Z", "what": "vip missing from lo", "result": "repaired"}}]);
        let out = render_status(&info, &repaired, None);
        assert!(
            out.contains("2 (last: vip missing from lo, repaired)"),
            "{out}"
        );
        let held = serde_json::json!([{"name": "web", "vip": "192.0.2.10/32", "state": "unhealthy", "announced": false, "monitors": [], "repairs": 0, "passive_health": {"state": "ok", "reason": null, "failures": 2, "hold_down_s": 9.6, "awaiting_proof": true}}]);
        let out = render_status(&info, &held, None);
        assert!(out.contains("unhealthy, passive hold-down 10 s"), "{out}");
        let stats = serde_json::json!({"vips": [{"vip": "192.0.2.10/32", "app": "web", "rates": {"packets_in": 12.0, "bytes_in": 900.5, "packets_out": 10.0, "bytes_out": 4000.0, "syn_in": 2.0, "synack_out": 2.0, "rst_out": 0.0}}]});
        let out = render_status(&info, &apps, Some(&stats));
        assert!(
            out.contains(
                "192.0.2.10/32  web  12.0      900.5   10.0       4000.0   2.0    2.0        0.0"
            ),
            "{out}"
        );
    }
}
