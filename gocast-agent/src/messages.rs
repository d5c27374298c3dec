//! The lifecycle's contracts: every message that crosses into or out of the app lifecycle, in
//! one place (holo's `messages` style), so the tasks around it (API, Consul discovery, stats
//! sampler, BGP speaker) depend on this module and never on each other or on the lifecycle's
//! insides.
//!
//! ```text
//!  api, consul discovery ──Request (LifecycleHandle)──▶ lifecycle
//!  stats sampler ─────────Request::PassiveHealth─────▶ lifecycle
//!  lifecycle ──Routes (watch)──▶ BGP speaker, api      lifecycle ──Owners (watch)──▶ stats
//!  BGP speaker ──Announcer (flushed version)──▶ lifecycle
//! ```

use std::{collections::BTreeMap, net::IpAddr, sync::Arc, time::Duration};

use ipnet::IpNet;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::{
    app::{AppName, AppSpec, Community, Monitor, NatRule, Source, Vip},
    monitor,
    store::StoreError,
};

/// Settings the lifecycle applies; a config reload replaces them ([`Request::Reload`]).
#[derive(Debug, Clone)]
pub struct Settings {
    pub monitor_rise: u32,
    pub monitor_fall: u32,
    pub cleanup_timer: Duration,
    pub allow_http_exec: bool,
    pub vip_allowlist: Vec<IpNet>,
    /// How long a drained app's route stays announced with `GRACEFUL_SHUTDOWN` before it is
    /// withdrawn.
    pub drain_time: Duration,
    pub monitor: monitor::Settings,
    /// The eBPF counters run, so `passive_health: true` has an effect.
    pub passive_health: bool,
    /// `dataplane.passive_health.window`: the unit of the hold-down after a passive failure
    /// (see [`crate::lifecycle::passive`]).
    pub passive_window: Duration,
    /// Addresses from the config that no VIP may equal or cover (docs/security.md, "Safe
    /// VIPs"): each BGP peer, next hop and local address. The addresses of the host's
    /// interfaces come from the host instead ([`crate::lifecycle::events::Event::LocalAddresses`]).
    pub protected: Vec<Protected>,
}

/// An address no VIP may equal or cover: on `lo`, a VIP covering it makes the kernel route it
/// locally, so the host loses its BGP peer, next hop or the interface's own traffic.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Protected {
    pub addr: IpAddr,
    /// What it is, for the refusal: "the BGP peer", "an address of interface eth0".
    pub what: String,
}

impl Protected {
    pub fn new(addr: IpAddr, what: impl Into<String>) -> Self {
        Self {
            addr,
            what: what.into(),
        }
    }

    /// An address of the host's interface `name`.
    pub fn interface(addr: IpAddr, name: &str) -> Self {
        Self::new(addr, format!("an address of interface {name}"))
    }

    /// An address on `lo` that is not one of the agent's VIPs.
    pub fn on_lo(&self) -> bool {
        self.what == "an address of interface lo"
    }
}

/// What the lifecycle wants announced: one route per healthy app, keyed by prefix. A
/// persistent map: a new version shares all but the changed paths with the one before, so the
/// lifecycle publishes in O(changes) and cloning is O(1) whatever the number of apps.
pub type RouteSet = imbl::OrdMap<IpNet, Route>;

/// The route set with a version that grows with every change, so the BGP speaker can say which
/// version every peer has been sent (see [`Announcer`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routes {
    pub version: u64,
    /// Every BGP session takes the current set on each change: a clone of the persistent map,
    /// O(1) whatever the number of routes.
    pub set: RouteSet,
}

impl std::ops::Deref for Routes {
    type Target = RouteSet;

    fn deref(&self) -> &RouteSet {
        &self.set
    }
}

/// The lifecycle's side of the BGP speaker: when peers have been sent a route-set version, and
/// how to stop the speaker. Withdrawals must reach the peers before a VIP leaves `lo`, and the
/// speaker must say goodbye (Cease) before the VIPs go at shutdown.
pub struct Announcer {
    /// The lowest version every established peer has been sent.
    pub flushed: watch::Receiver<u64>,
    pub stop: CancellationToken,
    pub done: tokio::task::JoinHandle<()>,
}

/// One desired announcement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Route {
    pub app: AppName,
    /// The app's own communities; each peer adds its `bgp.communities`.
    pub communities: Vec<Community>,
    /// The app is draining: announce with `GRACEFUL_SHUTDOWN` (RFC 8326) and, to iBGP peers, a
    /// low `LOCAL_PREF`, so the peers move traffic away before the withdrawal.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub drain: bool,
}

/// Why a request was refused. A refused request changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("vip {vip} is already used by app {owner}")]
    VipConflict { vip: Vip, owner: AppName },
    #[error("vip {vip} overlaps vip {other} of app {owner}")]
    VipOverlap {
        vip: Vip,
        other: Vip,
        owner: AppName,
    },
    #[error("app {0} is defined in the config file; change it there")]
    ConfigApp(AppName),
    #[error("app {0} comes from the Consul catalog; change the service there")]
    ConsulApp(AppName),
    #[error(
        "app name {name} would get lo label {label}, already used by app {owner}; choose another name"
    )]
    LabelConflict {
        name: AppName,
        label: String,
        owner: AppName,
    },
    #[error("app {0} is not registered")]
    UnknownApp(AppName),
    #[error("app name {name} is taken by an app from {owner:?}")]
    NameTaken { name: AppName, owner: Source },
    #[error("exec monitors are refused over HTTP (set agent.allow_http_exec: true to allow them)")]
    ExecRefused,
    #[error(
        "vip {vip} refused: it {relation} {addr}, {what}; on lo it would take that address from the host"
    )]
    ProtectedAddress {
        vip: Vip,
        addr: IpAddr,
        /// "equals" or "covers".
        relation: &'static str,
        what: String,
    },
    #[error("vip {0} is outside agent.vip_allowlist")]
    NotAllowed(Vip),
    /// Shared: one failed write refuses every request of its batch.
    #[error("registration not saved, nothing changed: {0}")]
    Store(std::sync::Arc<StoreError>),
    #[error("the agent is shutting down")]
    ShuttingDown,
}

/// Requests to the lifecycle task.
#[derive(Debug)]
pub enum Request {
    Register {
        spec: AppSpec,
        source: Source,
        reply: oneshot::Sender<Result<AppView, LifecycleError>>,
    },
    Unregister {
        name: AppName,
        reply: oneshot::Sender<Result<AppView, LifecycleError>>,
    },
    Apps {
        reply: oneshot::Sender<Vec<AppView>>,
    },
    /// Changes of passive-health verdict from the stats sampler.
    PassiveHealth { verdicts: Vec<(AppName, Verdict)> },
    /// Makes the Consul apps equal to `apps`: adds new ones, updates changed ones, removes the
    /// others except those in `keep` (services whose tags are bad now keep their last good
    /// app). Replies with the apps refused and why; the rest are applied regardless.
    SyncConsul {
        apps: Vec<AppSpec>,
        keep: Vec<AppName>,
        reply: oneshot::Sender<Vec<(AppName, LifecycleError)>>,
    },
    /// A config reload: new settings, and the config apps made equal to `apps` (added,
    /// changed, removed; HTTP and Consul apps are never touched). A config app that clashes
    /// with an HTTP or Consul app is refused and reported; the rest are applied.
    Reload {
        settings: Box<Settings>,
        apps: Vec<AppSpec>,
        reply: oneshot::Sender<SyncReport>,
    },
    /// Drains (`drain: true`) or undrains one app, or the whole host (`app: None`). Saved, so
    /// a restart keeps it.
    Drain {
        app: Option<AppName>,
        drain: bool,
        reply: oneshot::Sender<Result<DrainReport, LifecycleError>>,
    },
}

/// What a sync of one source's apps changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SyncReport {
    pub added: Vec<AppName>,
    pub changed: Vec<AppName>,
    pub removed: Vec<AppName>,
    /// Refused, with why; the rest were applied regardless.
    pub refused: Vec<Refused>,
}

/// An app a sync refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refused {
    pub app: AppName,
    pub reason: String,
}

/// The drain state after a drain or undrain.
#[derive(Debug, Clone, Serialize)]
pub struct DrainReport {
    /// The whole host is drained.
    pub host_drained: bool,
    /// The apps the request changed, as they are now.
    pub apps: Vec<AppView>,
}

/// The client side of the lifecycle; cheap to clone.
#[derive(Debug, Clone)]
pub struct LifecycleHandle {
    tx: mpsc::Sender<Request>,
}

impl From<mpsc::Sender<Request>> for LifecycleHandle {
    fn from(tx: mpsc::Sender<Request>) -> Self {
        Self { tx }
    }
}

impl LifecycleHandle {
    pub async fn register(&self, spec: AppSpec, source: Source) -> Result<AppView, LifecycleError> {
        self.ask(|reply| Request::Register {
            spec,
            source,
            reply,
        })
        .await?
    }

    pub async fn unregister(&self, name: AppName) -> Result<AppView, LifecycleError> {
        self.ask(|reply| Request::Unregister { name, reply })
            .await?
    }

    pub async fn apps(&self) -> Result<Vec<AppView>, LifecycleError> {
        self.ask(|reply| Request::Apps { reply }).await
    }

    /// Tells the lifecycle which apps the traffic counters now fail (or no longer fail).
    pub async fn passive_health(
        &self,
        verdicts: Vec<(AppName, Verdict)>,
    ) -> Result<(), LifecycleError> {
        self.tx
            .send(Request::PassiveHealth { verdicts })
            .await
            .map_err(|_| LifecycleError::ShuttingDown)
    }

    /// See [`Request::SyncConsul`].
    pub async fn sync_consul(
        &self,
        apps: Vec<AppSpec>,
        keep: Vec<AppName>,
    ) -> Result<Vec<(AppName, LifecycleError)>, LifecycleError> {
        self.ask(|reply| Request::SyncConsul { apps, keep, reply })
            .await
    }

    /// See [`Request::Reload`].
    pub async fn reload(
        &self,
        settings: Settings,
        apps: Vec<AppSpec>,
    ) -> Result<SyncReport, LifecycleError> {
        self.ask(|reply| Request::Reload {
            settings: Box::new(settings),
            apps,
            reply,
        })
        .await
    }

    /// See [`Request::Drain`].
    pub async fn drain(
        &self,
        app: Option<AppName>,
        drain: bool,
    ) -> Result<DrainReport, LifecycleError> {
        self.ask(|reply| Request::Drain { app, drain, reply })
            .await?
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Request,
    ) -> Result<T, LifecycleError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| LifecycleError::ShuttingDown)?;
        rx.await.map_err(|_| LifecycleError::ShuttingDown)
    }
}

/// An app as `/apps` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct AppView {
    pub name: AppName,
    pub vip: Vip,
    pub source: Source,
    /// `healthy` or `unhealthy`.
    pub state: &'static str,
    /// The route is in the desired-announcement set.
    pub announced: bool,
    /// `draining` (announced with `GRACEFUL_SHUTDOWN` until the drain time passes) or
    /// `drained` (withdrawn; VIP and NAT stay until cleanup); absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain: Option<&'static str>,
    /// Seconds until a draining app's route is withdrawn.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub withdraw_in_s: Option<f64>,
    /// The VIP is on `lo` (it stays there while cleanup is pending).
    pub vip_installed: bool,
    pub lo_label: String,
    pub monitors: Vec<MonitorView>,
    pub nats: Vec<NatRule>,
    pub communities: Vec<Community>,
    /// When the state last changed (RFC 3339).
    pub since: String,
    /// Seconds until cleanup removes VIP and NAT, while one is pending.
    pub cleanup_in_s: Option<f64>,
    /// The last host operation that failed for this app, if it has not succeeded since.
    pub last_error: Option<String>,
    /// For apps with `passive_health: true`: what the VIP's traffic counters say.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub passive_health: Option<PassiveView>,
    /// How many times a part of the app (its VIP on `lo`, its NAT) went missing from the host
    /// and was handled by self-repair.
    pub repairs: u64,
    /// The last of those.
    pub last_repair: Option<RepairView>,
}

/// A part of an app that went missing from the host, and what self-repair did about it.
#[derive(Debug, Clone, Serialize)]
pub struct RepairView {
    /// When verification found it missing (RFC 3339).
    pub at: String,
    /// What was missing, e.g. `vip missing from lo`.
    pub what: String,
    /// `repairing`, `repaired`, `failed: <why>` (the app is withdrawn until an install works),
    /// or `left off: the app is down` (it is installed again when the app comes up).
    pub result: String,
}

/// The passive health of an app that asked for it.
#[derive(Debug, Clone, Serialize)]
pub struct PassiveView {
    /// `ok`, `failing`, or `unavailable` (the counters need the eBPF dataplane).
    pub state: &'static str,
    pub reason: Option<String>,
    /// Passive failures in a row (reset after a stable period).
    pub failures: u32,
    /// Seconds left of the hold-down after a passive failure, while one runs.
    pub hold_down_s: Option<f64>,
    /// Withdrawn by passive health: it comes back only once a check proved that the service
    /// accepts a connection.
    pub awaiting_proof: bool,
}

/// A monitor and its last result.
#[derive(Debug, Clone, Serialize)]
pub struct MonitorView {
    pub monitor: Monitor,
    /// `None` until the first check.
    pub ok: Option<bool>,
    pub reason: Option<String>,
    pub checked_at: Option<String>,
    pub latency_ms: Option<f64>,
}

/// An installed VIP's app, as the lifecycle publishes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipOwner {
    pub vip: Vip,
    pub app: AppName,
    pub passive_health: bool,
}

/// Every app's VIP by address; the lifecycle is the only writer.
pub type Owners = Arc<BTreeMap<IpAddr, VipOwner>>;

/// A change of an app's passive verdict, for the lifecycle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The VIP's traffic fails the app, for this reason.
    Failing(String),
    /// It no longer does.
    Cleared,
}
