//! Prometheus metrics, served at `/metrics` as `OpenMetrics` text, or in the Prometheus 0.0.4
//! text format to a scraper that asks only for that ([`Exposition`]).
//!
//! The families are atomics behind `Arc`s: every task records into them without a message
//! round-trip, and only the API renders them.

use std::{
    fmt::Write as _,
    sync::{Arc, OnceLock, atomic::AtomicU64},
    time::{Duration, SystemTime},
};

use prometheus_client::{
    collector::Collector,
    encoding::{
        DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
        text::encode,
    },
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::{Family, MetricConstructor},
        gauge::ConstGauge,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Metric, Registry},
};

use gocast_common::maps::VipCounters;

use crate::app::AppName;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct AppLabels {
    app: AppName,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PeerLabels {
    peer: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct MessageLabels {
    peer: String,
    direction: &'static str,
    r#type: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct NotificationLabels {
    peer: String,
    direction: &'static str,
    code: u8,
    subcode: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BfdStateLabels {
    peer: String,
    state: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DropLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TaskLabels {
    task: String,
    peer: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ConsulLabels {
    endpoint: String,
    result: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct EndpointLabels {
    endpoint: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct MonitorLabels {
    kind: &'static str,
    result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RepairLabels {
    kind: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    commit: &'static str,
    dataplane: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DataplaneLabels {
    mode: String,
    reason: String,
}

/// The commit the agent was built from (`build.rs`), `unknown` without git.
pub const COMMIT: &str = env!("GOCAST_COMMIT");

/// The kinds of self-repair, created at zero so dashboards see the series before the first.
const REPAIR_KINDS: [&str; 3] = ["vip", "nat", "program"];

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct VipLabels {
    vip: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct VipDirectionLabels {
    vip: String,
    direction: &'static str,
}

/// A metric name, its help, and how to pick its value(s) from a VIP's counters.
type Series<T> = (&'static str, &'static str, fn(&VipCounters) -> T);

/// Each VIP (as written, e.g. `192.0.2.10/32`) with its counters, as the stats sampler last read
/// them. A function rather than the sampler's own type, so metrics (which every task records
/// into) needs nothing from the sampler.
pub type VipCounterSource = Arc<dyn Fn() -> Vec<(String, VipCounters)> + Send + Sync>;

/// The media type of [`Metrics::render`]'s output: prometheus-client's text encoder writes
/// `OpenMetrics` 1.0 (`_total` counters under a `_total`-less TYPE name, a closing `# EOF`), so a
/// scraper must be told so rather than take it for the older `text/plain; version=0.0.4`.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The media type of the Prometheus text format 0.0.4 ([`Exposition::Prometheus`]).
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The two text formats `/metrics` speaks, chosen by the scraper's `Accept` header
/// (docs/design.md, "`GET /healthz`, `GET /metrics`").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exposition {
    /// `OpenMetrics` 1.0: what Prometheus asks for first, and the answer to `*/*` or to no
    /// `Accept` at all (curl, a person).
    OpenMetrics,
    /// The Prometheus text format 0.0.4, for a scraper that accepts `text/plain` but not
    /// `OpenMetrics` (Prometheus before 2.5, some agents): it would misread `OpenMetrics`
    /// counters, whose TYPE line names the family without `_total`.
    Prometheus,
}

impl Exposition {
    /// The format for an `Accept` header. Quality values are not weighed: a scraper that
    /// names `OpenMetrics` at all can parse it.
    pub fn negotiate(accept: Option<&str>) -> Self {
        let accept = accept.unwrap_or_default().to_ascii_lowercase();
        if accept.contains("text/plain") && !accept.contains("application/openmetrics-text") {
            Self::Prometheus
        } else {
            Self::OpenMetrics
        }
    }

    pub const fn content_type(self) -> &'static str {
        match self {
            Self::OpenMetrics => CONTENT_TYPE,
            Self::Prometheus => PROMETHEUS_CONTENT_TYPE,
        }
    }
}

/// `OpenMetrics` text as prometheus-client writes it, rewritten into the Prometheus 0.0.4
/// format: a counter family is declared under its sample name (`x_total`), `# UNIT` lines
/// (which 0.0.4 lacks) and the closing `# EOF` go. Gauges and histograms are written alike in
/// both. The encoder writes no `_created` sample, exemplar or info/stateset family, the parts
/// of `OpenMetrics` that 0.0.4 cannot say.
fn prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 64 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let descriptor = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| Some((p, line.strip_prefix(p)?.split_once(' ')?)));
        match descriptor {
            Some((prefix, (name, tail))) if counters.contains(name) => {
                let _ = writeln!(out, "{prefix}{name}_total {tail}");
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// The per-VIP counters of the latest stats snapshot, rendered at scrape time: the kernel
/// counts, so these are constant counters read from the snapshot, not counters we increment.
#[derive(Default)]
struct VipCounterCollector {
    source: Arc<OnceLock<VipCounterSource>>,
}

impl std::fmt::Debug for VipCounterCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VipCounterCollector")
    }
}

impl Collector for VipCounterCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(source) = self.source.get() else {
            return Ok(());
        };
        let vips = source();
        let by_direction: [Series<[u64; 2]>; 2] = [
            (
                "vip_packets",
                "Packets to (in) and from (out) the VIP, counted by eBPF",
                |c| [c.packets_in, c.packets_out],
            ),
            (
                "vip_bytes",
                "Bytes to (in) and from (out) the VIP, counted by eBPF",
                |c| [c.bytes_in, c.bytes_out],
            ),
        ];
        for (name, help, pick) in by_direction {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (vip, counters) in &vips {
                for (direction, value) in ["in", "out"].into_iter().zip(pick(counters)) {
                    let labels = VipDirectionLabels {
                        vip: vip.clone(),
                        direction,
                    };
                    ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        let tcp: [Series<u64>; 3] = [
            ("vip_tcp_syn_in", "TCP SYNs to the VIP", |c| c.syn_in),
            ("vip_tcp_synack_out", "TCP SYN-ACKs from the VIP", |c| {
                c.synack_out
            }),
            ("vip_tcp_rst_out", "TCP RSTs from the VIP", |c| c.rst_out),
        ];
        for (name, help, pick) in tcp {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (vip, counters) in &vips {
                let labels = VipLabels { vip: vip.clone() };
                ConstCounter::new(pick(counters)).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// The standard `process_*` metrics of the agent itself, read from the kernel at scrape time
/// (the names every Prometheus client uses, so the usual dashboards and alerts apply).
#[derive(Debug, Default)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    #[expect(
        clippy::cast_precision_loss,
        reason = "counts, bytes and seconds far below 2^52, exported as floats"
    )]
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // A value that cannot be read is left out rather than failing the whole scrape.
        if let Ok(usage) = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        {
            let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
            let cpu = secs(usage.user_time()) + secs(usage.system_time());
            let family = encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(cpu).encode(family)?;
        }
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                std::fs::read_to_string("/proc/self/status")
                    .ok()
                    .as_deref()
                    .and_then(vm_rss_bytes)
                    .map(|b| b as f64),
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                std::fs::read_dir("/proc/self/fd")
                    .ok()
                    .map(|dir| dir.count() as f64),
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors (the soft limit)",
                nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                    .ok()
                    .map(|(soft, _)| soft as f64),
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                start_time_seconds(),
            ),
        ];
        for (name, help, value) in gauges {
            let Some(value) = value else { continue };
            let family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(value).encode(family)?;
        }
        Ok(())
    }
}

/// `VmRSS` of `/proc/self/status`, in bytes (the kernel writes it in kB).
fn vm_rss_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let kb: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kb * 1024)
}

/// Field 22 of `/proc/self/stat`, `starttime`: clock ticks after boot. Counted after the `)`
/// closing the command name, which may itself hold spaces and parentheses.
fn start_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    // `rest` starts at field 3 (state), so field 22 is its 20th.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// `btime` of `/proc/stat`: boot time, seconds since the epoch.
fn boot_time(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

#[expect(
    clippy::cast_precision_loss,
    reason = "ticks since boot and epoch seconds, far below 2^52"
)]
fn start_time_seconds() -> Option<f64> {
    let ticks = start_ticks(&std::fs::read_to_string("/proc/self/stat").ok()?)?;
    let boot = boot_time(&std::fs::read_to_string("/proc/stat").ok()?)?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??;
    Some(boot as f64 + ticks as f64 / hz as f64)
}

/// Monitor latency buckets: 100 µs (a socket-table read) to ~13 s (a slow exec).
#[derive(Debug, Clone, Copy)]
struct LatencyBuckets;

impl MetricConstructor<Histogram> for LatencyBuckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(exponential_buckets(0.0001, 4.0, 9))
    }
}

/// The agent's metrics. Cheap to clone; clones share the values.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    /// The `process_*` families, outside the `gocast` prefix.
    process: Registry,
    app_healthy: Family<AppLabels, Gauge>,
    app_announced: Family<AppLabels, Gauge>,
    state_changes: Family<AppLabels, Counter>,
    monitor_latency: Family<MonitorLabels, Histogram, LatencyBuckets>,
    routes: Gauge,
    peer_up: Family<PeerLabels, Gauge>,
    peer_transitions: Family<PeerLabels, Counter>,
    peer_established: Family<PeerLabels, Counter>,
    updates_sent: Family<PeerLabels, Counter>,
    prefixes_advertised: Family<PeerLabels, Gauge>,
    bgp: BgpMetrics,
    bfd: BfdMetrics,
    task_restarts: Family<TaskLabels, Counter>,
    info: InfoMetrics,
    vip_counters: Arc<OnceLock<VipCounterSource>>,
    consul: ConsulMetrics,
    repairs: RepairMetrics,
}

/// A new metric, registered under `name`: the registry encodes a clone, the caller records into
/// the one it keeps.
fn registered<M: Metric + Default + Clone>(registry: &mut Registry, name: &str, help: &str) -> M {
    let metric = M::default();
    registry.register(name, help, metric.clone());
    metric
}

/// Consul's families: requests by outcome, when it last answered, what discovery found.
struct ConsulMetrics {
    requests: Family<ConsulLabels, Counter>,
    last_success: Family<EndpointLabels, Gauge<f64, AtomicU64>>,
    apps: Gauge,
    refused: Gauge,
}

impl ConsulMetrics {
    fn register(registry: &mut Registry) -> Self {
        Self {
            requests: registered(
                registry,
                "consul_requests",
                "Requests to Consul by endpoint and result (ok, unreachable, timeout, http_4xx, http_5xx, malformed, unknown_node)",
            ),
            last_success: registered(
                registry,
                "consul_last_success_timestamp_seconds",
                "Unix time of the last good answer from Consul, by endpoint",
            ),
            apps: registered(
                registry,
                "consul_apps",
                "Apps discovered in Consul and accepted at the last good catalog read",
            ),
            refused: registered(
                registry,
                "consul_services_refused",
                "Services tagged enable_gocast refused at the last good catalog read (bad tags, conflicts)",
            ),
        }
    }
}

/// BGP messages by type, NOTIFICATIONs by code, session flaps and received prefixes, per peer.
struct BgpMetrics {
    messages: Family<MessageLabels, Counter>,
    notifications: Family<NotificationLabels, Counter>,
    flaps: Family<PeerLabels, Counter>,
    prefixes_received: Family<PeerLabels, Gauge>,
}

impl BgpMetrics {
    fn register(registry: &mut Registry) -> Self {
        Self {
            messages: registered(
                registry,
                "bgp_messages",
                "BGP messages by peer, direction (in, out) and type (open, update, notification, keepalive, route_refresh)",
            ),
            notifications: registered(
                registry,
                "bgp_notifications",
                "BGP NOTIFICATIONs by peer, direction (in, out), error code and subcode (RFC 4271 4.5)",
            ),
            flaps: registered(
                registry,
                "bgp_session_flaps",
                "Times an Established session went down",
            ),
            prefixes_received: registered(
                registry,
                "bgp_prefixes_received",
                "Prefixes the peer announces to the agent (none is installed)",
            ),
        }
    }
}

/// BFD sessions (RFC 5880): state and transitions per peer, dropped packets by reason.
struct BfdMetrics {
    up: Family<PeerLabels, Gauge>,
    transitions: Family<BfdStateLabels, Counter>,
    dropped: Family<DropLabels, Counter>,
}

impl BfdMetrics {
    fn register(registry: &mut Registry) -> Self {
        Self {
            up: registered(
                registry,
                "bfd_session_up",
                "1 while the peer's BFD session is Up",
            ),
            transitions: registered(
                registry,
                "bfd_state_transitions",
                "BFD session state changes, by peer and new state (admin_down, down, init, up)",
            ),
            dropped: registered(
                registry,
                "bfd_packets_dropped",
                "Received BFD packets dropped, by reason (ttl, length, version, detect_mult, multipoint, my_discriminator, your_discriminator, authentication, source, overload)",
            ),
        }
    }
}

/// What runs: the build and the dataplane, one series each, always 1.
struct InfoMetrics {
    build: Family<BuildLabels, Gauge>,
    dataplane: Family<DataplaneLabels, Gauge>,
}

impl InfoMetrics {
    fn register(registry: &mut Registry) -> Self {
        Self {
            build: registered(
                registry,
                "build_info",
                "1, labelled with the agent's version, commit and running dataplane (ebpf, iptables)",
            ),
            dataplane: registered(
                registry,
                "dataplane_info",
                "1, labelled with the running dataplane and why it was chosen (e.g. the eBPF fallback's cause)",
            ),
        }
    }
}

/// Self-repair's families: what was put back, and what could not be.
struct RepairMetrics {
    repairs: Family<RepairLabels, Counter>,
    failures: Family<RepairLabels, Counter>,
}

impl RepairMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Self {
            repairs: registered(
                registry,
                "repairs",
                "Host state found missing and put back by self-repair, by kind (vip, nat, program)",
            ),
            failures: registered(
                registry,
                "repair_failures",
                "Self-repairs that failed, by kind (an app's failure withdraws it)",
            ),
        };
        for kind in REPAIR_KINDS {
            let labels = RepairLabels { kind: kind.into() };
            drop(m.repairs.get_or_create(&labels));
            drop(m.failures.get_or_create(&labels));
        }
        m
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("gocast");
        let consul = ConsulMetrics::register(&mut registry);
        let repairs = RepairMetrics::register(&mut registry);
        let peer_up = registered(
            &mut registry,
            "bgp_session_up",
            "1 while the BGP session is Established",
        );
        let peer_transitions = registered(
            &mut registry,
            "bgp_state_transitions",
            "BGP FSM state changes",
        );
        let peer_established = registered(
            &mut registry,
            "bgp_sessions_established",
            "Times the session reached Established",
        );
        let updates_sent = registered(&mut registry, "bgp_updates_sent", "UPDATE messages sent");
        let prefixes_advertised = registered(
            &mut registry,
            "bgp_prefixes_advertised",
            "Prefixes in the peer's Adj-RIB-Out",
        );
        let task_restarts = registered(
            &mut registry,
            "task_restarts",
            "Supervised tasks started again after they panicked or ended by themselves",
        );
        let app_healthy = registered(
            &mut registry,
            "app_healthy",
            "1 when all of the app's monitors pass",
        );
        let app_announced = registered(
            &mut registry,
            "app_announced",
            "1 when the app's VIP is in the announced set",
        );
        let state_changes = registered(
            &mut registry,
            "app_state_changes",
            "Health state changes of the app",
        );
        // The one family without a `Default`: its histograms take the latency buckets.
        let monitor_latency = Family::new_with_constructor(LatencyBuckets);
        registry.register(
            "monitor_duration_seconds",
            "Time one monitor run took, by monitor kind and result",
            monitor_latency.clone(),
        );
        let routes = registered(
            &mut registry,
            "announced_routes",
            "Routes in the desired-announcement set",
        );
        let info = InfoMetrics::register(&mut registry);
        let vip_counters = VipCounterCollector::default();
        let vip_source = vip_counters.source.clone();
        registry.register_collector(Box::new(vip_counters));
        Self {
            inner: Arc::new(Inner {
                bgp: BgpMetrics::register(&mut registry),
                bfd: BfdMetrics::register(&mut registry),
                registry,
                process: {
                    let mut process = Registry::default();
                    process.register_collector(Box::new(ProcessCollector));
                    process
                },
                app_healthy,
                app_announced,
                state_changes,
                monitor_latency,
                routes,
                peer_up,
                peer_transitions,
                peer_established,
                updates_sent,
                prefixes_advertised,
                task_restarts,
                info,
                vip_counters: vip_source,
                consul,
                repairs,
            }),
        }
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn app(name: &AppName) -> AppLabels {
    AppLabels { app: name.clone() }
}

impl EncodeLabelValue for AppName {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
        encoder.write_str(self.as_str())
    }
}

impl Metrics {
    /// Records an app's current health and announcement.
    pub fn app_state(&self, name: &AppName, healthy: bool, announced: bool) {
        self.inner
            .app_healthy
            .get_or_create(&app(name))
            .set(i64::from(healthy));
        self.inner
            .app_announced
            .get_or_create(&app(name))
            .set(i64::from(announced));
    }

    pub fn state_changed(&self, name: &AppName) {
        self.inner.state_changes.get_or_create(&app(name)).inc();
    }

    /// Forgets a removed app, so series of apps long gone do not pile up.
    pub fn app_removed(&self, name: &AppName) {
        let labels = app(name);
        self.inner.app_healthy.remove(&labels);
        self.inner.app_announced.remove(&labels);
        self.inner.state_changes.remove(&labels);
    }

    pub fn monitor_observed(&self, kind: &'static str, latency: Duration, ok: bool) {
        let labels = MonitorLabels {
            kind,
            result: if ok { "pass" } else { "fail" },
        };
        self.inner
            .monitor_latency
            .get_or_create(&labels)
            .observe(latency.as_secs_f64());
    }

    pub fn routes(&self, count: usize) {
        self.inner
            .routes
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// A BGP state change; `up` is whether the new state is Established.
    pub fn peer_state(&self, peer: &str, up: bool) {
        let labels = PeerLabels {
            peer: peer.to_owned(),
        };
        self.inner.peer_up.get_or_create(&labels).set(i64::from(up));
        self.inner.peer_transitions.get_or_create(&labels).inc();
    }

    pub fn peer_established(&self, peer: &str) {
        self.inner
            .peer_established
            .get_or_create(&PeerLabels {
                peer: peer.to_owned(),
            })
            .inc();
    }

    pub fn updates_sent(&self, peer: &str, count: usize) {
        let labels = PeerLabels {
            peer: peer.to_owned(),
        };
        self.inner
            .updates_sent
            .get_or_create(&labels)
            .inc_by(count as u64);
    }

    pub fn prefixes_advertised(&self, peer: &str, count: usize) {
        let labels = PeerLabels {
            peer: peer.to_owned(),
        };
        self.inner
            .prefixes_advertised
            .get_or_create(&labels)
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    pub fn prefixes_received(&self, peer: &str, count: usize) {
        let labels = PeerLabels {
            peer: peer.to_owned(),
        };
        self.inner
            .bgp
            .prefixes_received
            .get_or_create(&labels)
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// `count` BGP messages of `kind` (`update`, ...) sent (`out`) to or received (`in`) from `peer`.
    pub fn bgp_messages(
        &self,
        peer: &str,
        direction: &'static str,
        kind: &'static str,
        count: u64,
    ) {
        self.inner
            .bgp
            .messages
            .get_or_create(&MessageLabels {
                peer: peer.to_owned(),
                direction,
                r#type: kind,
            })
            .inc_by(count);
    }

    /// A NOTIFICATION sent (`out`) or received (`in`).
    pub fn bgp_notification(&self, peer: &str, direction: &'static str, code: u8, subcode: u8) {
        self.inner
            .bgp
            .notifications
            .get_or_create(&NotificationLabels {
                peer: peer.to_owned(),
                direction,
                code,
                subcode,
            })
            .inc();
    }

    /// `peer`'s session left Established.
    pub fn bgp_session_flap(&self, peer: &str) {
        self.inner
            .bgp
            .flaps
            .get_or_create(&PeerLabels {
                peer: peer.to_owned(),
            })
            .inc();
    }

    /// `peer`'s BFD session changed to `state` (`up`, `down`, ...).
    pub fn bfd_state(&self, peer: &str, state: &'static str) {
        let peer = peer.to_owned();
        self.inner
            .bfd
            .up
            .get_or_create(&PeerLabels { peer: peer.clone() })
            .set(i64::from(state == "up"));
        self.inner
            .bfd
            .transitions
            .get_or_create(&BfdStateLabels { peer, state })
            .inc();
    }

    /// A received BFD packet was dropped.
    pub fn bfd_dropped(&self, reason: &'static str) {
        self.inner
            .bfd
            .dropped
            .get_or_create(&DropLabels { reason })
            .inc();
    }

    /// A supervised task (`task`, e.g. `bgp_session`, of `peer`; `peer` empty for the agent's
    /// other tasks) was started again.
    pub fn task_restarted(&self, task: &str, peer: &str) {
        self.inner
            .task_restarts
            .get_or_create(&TaskLabels {
                task: task.to_owned(),
                peer: peer.to_owned(),
            })
            .inc();
    }

    /// The dataplane the host started with: sets `gocast_build_info` and `gocast_dataplane_info`
    /// (one series each; a later call replaces it).
    pub fn dataplane(&self, info: &crate::dataplane::DataplaneInfo) {
        self.inner.info.build.clear();
        self.inner
            .info
            .build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                commit: COMMIT,
                dataplane: info.mode.to_owned(),
            })
            .set(1);
        self.inner.info.dataplane.clear();
        self.inner
            .info
            .dataplane
            .get_or_create(&DataplaneLabels {
                mode: info.mode.to_owned(),
                // A label value is a quoted string the encoder does not escape.
                reason: info.reason.replace(['"', '\\', '\n'], " "),
            })
            .set(1);
    }

    /// Self-repair found a part of kind `kind` (`vip`, `nat`, `program`) missing from the host.
    pub fn repair(&self, kind: &str) {
        let labels = RepairLabels { kind: kind.into() };
        self.inner.repairs.repairs.get_or_create(&labels).inc();
    }

    /// Putting back a part of kind `kind` failed.
    pub fn repair_failed(&self, kind: &str) {
        let labels = RepairLabels { kind: kind.into() };
        self.inner.repairs.failures.get_or_create(&labels).inc();
    }

    /// Exports the per-VIP counters the stats sampler last read (eBPF dataplane only).
    pub fn vip_stats(&self, source: VipCounterSource) {
        let _ = self.inner.vip_counters.set(source);
    }

    /// One Consul request and how it ended.
    pub fn consul_request(&self, endpoint: &str, result: &str) {
        self.inner
            .consul
            .requests
            .get_or_create(&ConsulLabels {
                endpoint: endpoint.to_owned(),
                result: result.to_owned(),
            })
            .inc();
        if result == "ok" {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default();
            self.inner
                .consul
                .last_success
                .get_or_create(&EndpointLabels {
                    endpoint: endpoint.to_owned(),
                })
                .set(now.as_secs_f64());
        }
    }

    /// The outcome of the last good catalog read.
    pub fn consul_discovered(&self, apps: usize, refused: usize) {
        self.inner
            .consul
            .apps
            .set(i64::try_from(apps).unwrap_or(i64::MAX));
        self.inner
            .consul
            .refused
            .set(i64::try_from(refused).unwrap_or(i64::MAX));
    }

    /// The exposition in `format`, for `/metrics`.
    pub fn exposition(&self, format: Exposition) -> String {
        match format {
            Exposition::OpenMetrics => self.render(),
            Exposition::Prometheus => prometheus_text(&self.render()),
        }
    }

    /// The `OpenMetrics` text exposition ([`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail. Each `encode` closes with `# EOF`: the first one's
        // goes, so the exposition has one, at its end.
        let _ = encode(&mut out, &self.inner.registry);
        out.truncate(out.strip_suffix("# EOF\n").unwrap_or(&out).len());
        let _ = encode(&mut out, &self.inner.process);
        out
    }
}

#[cfg(test)]
mod tests {
    use gocast_test_guard::exposition::{self, Format};

    use super::*;

    fn web() -> AppName {
        "web".parse().unwrap()
    }

    #[test]
    fn rendered_text_has_app_and_monitor_series() {
        let m = Metrics::default();
        m.app_state(&web(), true, true);
        m.state_changed(&web());
        m.monitor_observed("port", Duration::from_micros(300), true);
        let text = m.render();
        assert!(text.contains("gocast_app_healthy{app=\"web\"} 1"), "{text}");
        assert!(
            text.contains("gocast_app_state_changes_total{app=\"web\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("gocast_monitor_duration_seconds_count{kind=\"port\",result=\"pass\"} 1"),
            "{text}"
        );
        m.app_removed(&web());
        assert!(!m.render().contains("app=\"web\""));
        m.repair("vip");
        let text = m.render();
        for line in [
            "gocast_repairs_total{kind=\"vip\"} 1",
            "gocast_repairs_total{kind=\"program\"} 0",
            "gocast_repair_failures_total{kind=\"nat\"} 0",
        ] {
            assert!(text.contains(line), "{line}\n{text}");
        }
        m.consul_request("catalog_node", "ok");
        m.consul_request("catalog_node", "http_5xx");
        m.consul_discovered(2, 1);
        m.task_restarted("bgp_session", "198.18.0.2");
        let text = m.render();
        for line in [
            "gocast_task_restarts_total{task=\"bgp_session\",peer=\"198.18.0.2\"} 1",
            "gocast_consul_requests_total{endpoint=\"catalog_node\",result=\"http_5xx\"} 1",
            "gocast_consul_apps 2",
            "gocast_consul_services_refused 1",
            "gocast_consul_last_success_timestamp_seconds{endpoint=\"catalog_node\"}",
        ] {
            assert!(text.contains(line), "{line}\n{text}");
        }
    }

    /// Parses `text` with the reference parser in `format`; every family must have its HELP.
    /// `None` when the parser is not installed (the test was skipped).
    fn parsed(text: &str, format: Format) -> Option<Vec<exposition::Family>> {
        let families = exposition::parse(text, format)?
            .unwrap_or_else(|e| panic!("{format:?} parser refuses it: {e}\n{text}"));
        for f in &families {
            assert!(f.help, "{} has no HELP:\n{text}", f.name);
        }
        Some(families)
    }

    /// Checks `text` with the `OpenMetrics` reference parser (strict: it needs `# EOF` at the
    /// end and every sample in the family its TYPE declares).
    pub(crate) fn assert_openmetrics(text: &str) {
        parsed(text, Format::OpenMetrics);
    }

    /// Records into every family, so the exposition holds each kind of series.
    fn every_family() -> Metrics {
        let m = Metrics::default();
        m.app_state(&web(), true, false);
        m.state_changed(&web());
        m.monitor_observed("exec", Duration::from_millis(20), false);
        m.routes(1);
        m.consul_request("catalog_node", "ok");
        m.consul_discovered(1, 0);
        m.peer_state("198.18.0.2", true);
        m.peer_established("198.18.0.2");
        m.updates_sent("198.18.0.2", 2);
        m.prefixes_advertised("198.18.0.2", 1);
        m.prefixes_received("198.18.0.2", 3);
        m.bgp_messages("198.18.0.2", "in", "keepalive", 1);
        m.bgp_notification("198.18.0.2", "out", 6, 2);
        m.bgp_session_flap("198.18.0.2");
        m.task_restarted("stats", "");
        m.repair("vip");
        m.repair_failed("nat");
        m.dataplane(&crate::dataplane::DataplaneInfo::iptables_fallback(
            "loading \"xdp\": EPERM",
        ));
        m.vip_stats(Arc::new(|| {
            vec![("192.0.2.10/32".to_owned(), VipCounters::default())]
        }));
        m
    }

    #[test]
    fn every_family_parses_in_both_formats_with_its_type() {
        let m = every_family();
        for format in [Exposition::OpenMetrics, Exposition::Prometheus] {
            let text = m.exposition(format);
            let parser_format = match format {
                Exposition::OpenMetrics => Format::OpenMetrics,
                Exposition::Prometheus => Format::Prometheus,
            };
            let Some(families) = parsed(&text, parser_format) else {
                return;
            };
            let kind = |name: &str| {
                families
                    .iter()
                    .find(|f| f.name == name && f.samples > 0)
                    .map(|f| f.kind.as_str())
            };
            for (name, expected) in [
                ("gocast_bgp_messages", "counter"),
                ("gocast_bgp_notifications", "counter"),
                ("gocast_bgp_prefixes_received", "gauge"),
                ("gocast_monitor_duration_seconds", "histogram"),
                ("gocast_vip_packets", "counter"),
                ("gocast_build_info", "gauge"),
                ("gocast_task_restarts", "counter"),
                ("process_cpu_seconds", "counter"),
                ("process_open_fds", "gauge"),
            ] {
                assert_eq!(kind(name), Some(expected), "{format:?} {name}:\n{text}");
            }
            // Every family the text declares came out typed, none as "unknown" leftovers.
            let declared = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
            assert_eq!(families.len(), declared, "{format:?}: {families:?}\n{text}");
            assert!(families.iter().all(|f| f.kind != "unknown"), "{families:?}");
        }
    }

    #[test]
    fn the_prometheus_format_names_counters_by_their_samples_and_has_no_eof() {
        let m = every_family();
        let text = m.exposition(Exposition::Prometheus);
        assert!(
            text.contains("# TYPE gocast_bgp_messages_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("# HELP gocast_bgp_messages_total BGP"),
            "{text}"
        );
        assert!(text.contains("# TYPE gocast_app_healthy gauge\n"), "{text}");
        assert!(!text.contains("# EOF"), "{text}");
        let om = m.render();
        assert_eq!(
            text.lines().filter(|l| !l.starts_with('#')).count(),
            om.lines().filter(|l| !l.starts_with('#')).count(),
            "the same samples"
        );
    }

    #[test]
    fn the_format_follows_the_accept_header() {
        for (accept, expected) in [
            (None, Exposition::OpenMetrics),
            (Some("*/*"), Exposition::OpenMetrics),
            // What Prometheus 2.5 and later send.
            (
                Some(
                    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
                ),
                Exposition::OpenMetrics,
            ),
            (Some("text/plain;version=0.0.4"), Exposition::Prometheus),
            (Some("Text/Plain"), Exposition::Prometheus),
        ] {
            assert_eq!(Exposition::negotiate(accept), expected, "{accept:?}");
        }
        assert_eq!(
            Exposition::Prometheus.content_type(),
            "text/plain; version=0.0.4; charset=utf-8"
        );
    }

    #[test]
    fn process_metrics_are_read_at_scrape_time() {
        let text = Metrics::default().render();
        let value = |name: &str| -> f64 {
            let line = text
                .lines()
                .find(|l| l.starts_with(&format!("{name} ")))
                .unwrap_or_else(|| panic!("no {name}:\n{text}"));
            line[name.len() + 1..].parse().unwrap()
        };
        assert!(value("process_cpu_seconds_total") > 0.0);
        assert!(value("process_resident_memory_bytes") > 1_000_000.0);
        assert!(value("process_open_fds") >= 3.0);
        assert!(value("process_max_fds") >= value("process_open_fds"));
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let start = value("process_start_time_seconds");
        assert!(
            start <= now + 1.0 && start > now - 86_400.0,
            "{start} vs {now}"
        );
        assert_eq!(text.matches("# EOF").count(), 1, "{text}");
        assert_openmetrics(&text);
    }

    #[test]
    fn bgp_messages_notifications_and_flaps_are_rendered_per_peer() {
        let m = Metrics::default();
        m.bgp_messages("198.18.0.2", "in", "keepalive", 1);
        m.bgp_messages("198.18.0.2", "in", "keepalive", 1);
        m.bgp_messages("198.18.0.2", "out", "update", 3);
        m.bgp_notification("198.18.0.2", "out", 6, 2);
        m.bgp_session_flap("198.18.0.2");
        let text = m.render();
        for line in [
            "gocast_bgp_messages_total{peer=\"198.18.0.2\",direction=\"in\",type=\"keepalive\"} 2",
            "gocast_bgp_messages_total{peer=\"198.18.0.2\",direction=\"out\",type=\"update\"} 3",
            "gocast_bgp_notifications_total{peer=\"198.18.0.2\",direction=\"out\",code=\"6\",subcode=\"2\"} 1",
            "gocast_bgp_session_flaps_total{peer=\"198.18.0.2\"} 1",
        ] {
            assert!(text.contains(line), "{line}\n{text}");
        }
        assert_openmetrics(&text);
    }

    #[test]
    fn proc_fields_are_parsed() {
        let stat = "4242 (a b) c) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 98765 19 20";
        assert_eq!(start_ticks(stat), Some(98_765));
        assert_eq!(
            boot_time("cpu 1 2\nbtime 1700000000\nprocesses 5\n"),
            Some(1_700_000_000)
        );
        assert_eq!(
            vm_rss_bytes("VmPeak:\t 10 kB\nVmRSS:\t    2048 kB\n"),
            Some(2_097_152)
        );
    }

    #[test]
    fn build_and_dataplane_info_carry_the_running_dataplane() {
        let m = Metrics::default();
        m.dataplane(&crate::dataplane::DataplaneInfo::iptables_forced());
        m.dataplane(&crate::dataplane::DataplaneInfo::iptables_fallback(
            "no BTF",
        ));
        let text = m.render();
        let build = format!(
            "gocast_build_info{{version=\"{}\",commit=\"{COMMIT}\",dataplane=\"iptables\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.contains(&build), "{build}\n{text}");
        assert!(
            text.contains("gocast_dataplane_info{mode=\"iptables\",reason=\"dataplane.mode auto fell back to iptables: no BTF\"} 1"),
            "{text}"
        );
        assert_eq!(text.matches("gocast_build_info{").count(), 1, "{text}");
        assert_eq!(text.matches("gocast_dataplane_info{").count(), 1, "{text}");
        assert!(!COMMIT.is_empty());
    }
}
