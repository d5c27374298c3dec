//! The app registry and each app's life: health → announce/withdraw → cleanup.
//!
//! One task owns every app. The API and Consul discovery send [`Request`]s through a
//! [`LifecycleHandle`]; the monitor scheduler sends [`Report`]s. Nothing else changes app state,
//! so there are no locks, and every change is decided in one place:
//!
//! ```text
//!  api ──Request──▶ ┌───────────┐ ──watch/unwatch──▶ monitor::Scheduler
//!                   │ Lifecycle │ ◀────Report─────── (every monitor_interval)
//!                   └───────────┘ ──RouteSet (watch channel)──▶ BGP speaker
//!                         │ Host: VIP on lo (netlink), NAT (dataplane)
//! ```
//!
//! Healthy (after `monitor_rise` passing checks): VIP on `lo`, NAT installed, route in the set.
//! Unhealthy (after `monitor_fall` failing checks): route out of the set at once; VIP and NAT stay
//! until `cleanup_timer` passes, then go, and HTTP apps are forgotten (config and Consul apps stay
//! and are checked again: the config file and the catalog decide whether they exist). Recovery
//! before that only puts the route back. The route always leaves the set before its VIP leaves
//! `lo`.
//!
//! Consul discovery sends the whole set of Consul apps after each good catalog read
//! ([`Request::SyncConsul`]); the lifecycle adds, updates and removes Consul apps to match, and
//! never touches config or HTTP apps.

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    net::IpAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use ipnet::IpNet;
use tokio::{
    sync::{mpsc, watch},
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::{
    app::{AppName, AppSpec, Monitor, NatRule, Source, Vip},
    messages::{
        Announcer, AppView, LifecycleError, LifecycleHandle, MonitorView, Owners, PassiveView,
        Request, Route, RouteSet, Routes, Verdict, VipOwner,
    },
    metrics::Metrics,
    monitor::{self, MonitorResult, Report},
    store::{Store, StoreError},
};

/// The most monitor reports handled before the route set is published.
const REPORT_BATCH: usize = 4096;

/// How long a VIP waits for its withdrawal to reach the peers before it is removed anyway.
const WITHDRAW_WAIT: Duration = Duration::from_secs(1);

/// Host changes the lifecycle makes; a trait so the registry logic can be tested without
/// privileges, and so the eBPF dataplane can take over NAT without touching this file.
pub trait Host: Send + Sync + 'static {
    /// Puts the VIP on `lo` with the label; idempotent.
    fn add_vip(
        &mut self,
        vip: &Vip,
        label: &str,
    ) -> impl Future<Output = Result<(), HostError>> + Send;
    /// Takes the VIP off `lo`; idempotent.
    fn remove_vip(&mut self, vip: &Vip) -> impl Future<Output = Result<(), HostError>> + Send;
    /// Installs the app's NAT rules toward `dest` (`None`: the agent's NAT destination).
    fn install_nat(
        &mut self,
        app: &AppName,
        vip: &Vip,
        rules: &[NatRule],
        dest: Option<IpAddr>,
    ) -> impl Future<Output = Result<(), HostError>> + Send;
    fn remove_nat(
        &mut self,
        app: &AppName,
        vip: &Vip,
        rules: &[NatRule],
        dest: Option<IpAddr>,
    ) -> impl Future<Output = Result<(), HostError>> + Send;
    /// Removes what the agent left behind at shutdown (e.g. its NAT chain).
    fn shutdown(&mut self) -> impl Future<Output = Result<(), HostError>> + Send;
}

/// A host operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(transparent)]
    Netlink(#[from] crate::netlink::NetlinkError),
    #[error(transparent)]
    Nat(#[from] crate::dataplane::iptables::IptablesError),
    #[error(transparent)]
    Ebpf(#[from] crate::dataplane::ebpf::EbpfError),
    #[error("no NAT destination for IPv{family}: set agent.nat_dest_ip or a bgp local address")]
    NoNatDest { family: u8 },
    #[error(
        "no interface to attach the eBPF dataplane to: no route toward a BGP peer or a default gateway; set dataplane.interfaces"
    )]
    NoInterface,
}

/// Settings the lifecycle applies.
#[derive(Debug, Clone)]
pub struct Settings {
    pub monitor_rise: u32,
    pub monitor_fall: u32,
    pub cleanup_timer: Duration,
    pub allow_http_exec: bool,
    pub vip_allowlist: Vec<IpNet>,
    pub monitor: monitor::Settings,
    /// The eBPF counters run, so `passive_health: true` has an effect.
    pub passive_health: bool,
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// One app's state, owned by the lifecycle task.
#[derive(Debug)]
struct Entry {
    spec: AppSpec,
    /// `spec.name.lo_label()`, computed once: conflicts are checked against every app.
    label: String,
    source: Source,
    generation: u64,
    healthy: bool,
    /// Consecutive results disagreeing with the current state.
    streak: u32,
    results: Vec<Option<MonitorResult>>,
    vip_installed: bool,
    nat_installed: bool,
    since: SystemTime,
    cleanup_at: Option<Instant>,
    last_error: Option<String>,
    /// Why the VIP's traffic fails the app (`passive_health: true` only).
    passive_failure: Option<String>,
}

impl Entry {
    /// Everything a healthy app needs on the host is in place.
    fn installed(&self) -> bool {
        self.vip_installed && (self.spec.nats.is_empty() || self.nat_installed)
    }

    /// The app as `/apps` shows it; a healthy app is in the route set (published at the end of
    /// the lifecycle's current step).
    fn view(&self, passive_available: bool) -> AppView {
        AppView {
            name: self.spec.name.clone(),
            vip: self.spec.vip,
            source: self.source,
            state: if self.healthy { "healthy" } else { "unhealthy" },
            announced: self.healthy,
            vip_installed: self.vip_installed,
            lo_label: self.label.clone(),
            monitors: self
                .spec
                .monitors
                .iter()
                .zip(&self.results)
                .map(|(m, r)| MonitorView {
                    monitor: m.clone(),
                    ok: r.as_ref().map(|r| r.ok),
                    reason: r.as_ref().map(|r| r.reason.clone()),
                    checked_at: r.as_ref().map(|r| rfc3339(r.at)),
                    latency_ms: r.as_ref().map(|r| r.latency.as_secs_f64() * 1e3),
                })
                .collect(),
            nats: self.spec.nats.clone(),
            communities: self.spec.communities.clone(),
            since: rfc3339(self.since),
            cleanup_in_s: self
                .cleanup_at
                .map(|t| t.saturating_duration_since(Instant::now()).as_secs_f64()),
            last_error: self.last_error.clone(),
            passive_health: self.spec.passive_health.then(|| PassiveView {
                state: match (&self.passive_failure, passive_available) {
                    (_, false) => "unavailable",
                    (Some(_), true) => "failing",
                    (None, true) => "ok",
                },
                reason: if passive_available {
                    self.passive_failure.clone()
                } else {
                    Some("passive health needs the eBPF dataplane's counters".into())
                },
            }),
        }
    }
}

/// The lifecycle task's state.
pub struct Lifecycle<H: Host> {
    settings: Settings,
    host: H,
    apps: BTreeMap<AppName, Entry>,
    next_generation: u64,
    routes: watch::Sender<Routes>,
    owners: watch::Sender<Owners>,
    announcer: Option<Announcer>,
    store: Store,
    monitors: mpsc::UnboundedSender<monitor::Command>,
    /// Health changed since the route set was last published: publish once per batch.
    dirty: bool,
    /// An app was added, replaced or removed since the owners were last published (rebuilding
    /// them on every health change would cost O(apps) allocations each time).
    owners_changed: bool,
    /// A cleanup deadline was set: recompute the earliest one.
    cleanup_changed: bool,
    next_cleanup: Option<Instant>,
    metrics: Metrics,
}

/// Channels to a running lifecycle.
pub struct Running {
    pub handle: LifecycleHandle,
    pub routes: watch::Receiver<Routes>,
    /// Finishes after shutdown has withdrawn everything and cleaned the host.
    pub task: tokio::task::JoinHandle<()>,
}

/// Starts the lifecycle with the config apps and the saved HTTP registrations.
///
/// `cancel` starts shutdown: withdraw every route, remove every VIP and NAT rule, then
/// [`Host::shutdown`].
/// Where the lifecycle's decisions go besides the host.
pub struct Outputs {
    /// The desired-announcement set; the BGP speaker and the API read it.
    pub routes: watch::Sender<Routes>,
    /// Each app's VIP, for the stats sampler.
    pub owners: watch::Sender<Owners>,
    pub announcer: Option<Announcer>,
    pub metrics: Metrics,
}

pub fn spawn<H: Host>(
    settings: Settings,
    host: H,
    config_apps: Vec<AppSpec>,
    store: Store,
    outputs: Outputs,
    cancel: CancellationToken,
) -> Running {
    let Outputs {
        routes: routes_tx,
        owners,
        announcer,
        metrics,
    } = outputs;
    let (req_tx, req_rx) = mpsc::channel(256);
    let (report_tx, report_rx) = mpsc::channel(1024);
    let routes_rx = routes_tx.subscribe();
    // The scheduler stops with the lifecycle: it is cancelled by a child token.
    let monitors = monitor::spawn(
        settings.monitor.clone(),
        report_tx,
        metrics.clone(),
        cancel.child_token(),
    );
    let lifecycle = Lifecycle {
        settings,
        host,
        apps: BTreeMap::new(),
        next_generation: 1,
        routes: routes_tx,
        owners,
        announcer,
        store,
        monitors,
        metrics,
        dirty: false,
        owners_changed: false,
        cleanup_changed: false,
        next_cleanup: None,
    };
    let task = tokio::spawn(lifecycle.run(config_apps, req_rx, report_rx, cancel));
    Running {
        handle: LifecycleHandle::from(req_tx),
        routes: routes_rx,
        task,
    }
}

impl<H: Host> Lifecycle<H> {
    async fn run(
        mut self,
        config_apps: Vec<AppSpec>,
        mut requests: mpsc::Receiver<Request>,
        mut reports: mpsc::Receiver<Report>,
        cancel: CancellationToken,
    ) {
        self.restore(config_apps);
        loop {
            if self.cleanup_changed {
                self.cleanup_changed = false;
                self.next_cleanup = self.apps.values().filter_map(|e| e.cleanup_at).min();
            }
            tokio::select! {
                () = cancel.cancelled() => break,
                Some(req) = requests.recv() => self.handle(req).await,
                Some(report) = reports.recv() => {
                    self.on_report(report).await;
                    // Take what else is queued (a tick reports every app at once) before
                    // publishing, so a burst costs one route-set update, not one per app.
                    for _ in 0..REPORT_BATCH {
                        let Ok(report) = reports.try_recv() else { break };
                        self.on_report(report).await;
                    }
                }
                () = sleep_until(self.next_cleanup) => {
                    self.cleanup_changed = true;
                    self.cleanup_due().await;
                }
            }
            if self.dirty {
                self.publish();
            }
        }
        self.shutdown().await;
    }

    /// Config apps first, then saved HTTP registrations that do not clash with them.
    fn restore(&mut self, config_apps: Vec<AppSpec>) {
        for spec in config_apps {
            self.insert(spec, Source::Config);
        }
        let saved = match self.store.load() {
            Ok(saved) => saved,
            Err(e) => {
                error!(error = %e, "starting without saved HTTP registrations");
                Vec::new()
            }
        };
        let count = saved.len();
        for spec in saved {
            if let Err(e) = self.check_conflicts(&spec) {
                error!(app = %spec.name, error = %e, "saved registration dropped");
                continue;
            }
            if self.apps.contains_key(&spec.name) {
                warn!(app = %spec.name, "saved registration dropped: the config defines this app");
                continue;
            }
            self.insert(spec, Source::Http);
        }
        info!(
            config = self.count(Source::Config),
            restored = count,
            "apps loaded"
        );
    }

    fn count(&self, source: Source) -> usize {
        self.apps.values().filter(|e| e.source == source).count()
    }

    async fn handle(&mut self, req: Request) {
        match req {
            Request::Register {
                spec,
                source,
                reply,
            } => {
                let _ = reply.send(self.register(spec, source).await);
            }
            Request::Unregister { name, reply } => {
                let _ = reply.send(self.unregister(&name).await);
            }
            Request::Apps { reply } => {
                let available = self.settings.passive_health;
                let _ = reply.send(self.apps.values().map(|e| e.view(available)).collect());
            }
            Request::PassiveHealth { verdicts } => {
                for (name, verdict) in verdicts {
                    self.on_passive(&name, verdict);
                }
            }
            Request::SyncConsul { apps, keep, reply } => {
                let _ = reply.send(self.sync_consul(apps, &keep).await);
            }
        }
    }

    /// See [`Request::SyncConsul`]. Applied in passes, so the order of the services does not
    /// matter: removals come first (an app that left frees its VIP for a service that takes
    /// it), then every service is registered, and the refused ones are tried again as long as
    /// a pass made progress (a refused app may fit once another one moved away). When no pass
    /// can progress because Consul apps wait for each other's VIPs (two services swapping
    /// VIPs), those that move are taken down first, then registered anew.
    async fn sync_consul(
        &mut self,
        apps: Vec<AppSpec>,
        keep: &[AppName],
    ) -> Vec<(AppName, LifecycleError)> {
        let gone: Vec<AppName> = self
            .apps
            .values()
            .filter(|e| e.source == Source::Consul)
            .map(|e| e.spec.name.clone())
            .filter(|n| !keep.contains(n) && !apps.iter().any(|a| &a.name == n))
            .collect();
        for name in gone {
            if let Some(entry) = self.apps.remove(&name) {
                info!(app = %name, "app left the Consul catalog: withdrawing and removing");
                self.teardown(entry).await;
            }
        }
        let mut refused = Vec::new();
        let mut pending = Vec::new();
        for spec in apps {
            match self
                .apps
                .get(&spec.name)
                .map(|e| e.source)
                .filter(|s| *s != Source::Consul)
            {
                Some(owner) => {
                    let name = spec.name.clone();
                    refused.push((
                        name,
                        LifecycleError::NameTaken {
                            name: spec.name,
                            owner,
                        },
                    ));
                }
                None => pending.push(spec),
            }
        }
        // Each pass registers an app or takes one down for good (a moved app comes back with
        // its new VIP, so it cannot block anyone twice): the passes end.
        loop {
            let mut progress = false;
            let mut failed: Vec<(AppSpec, LifecycleError)> = Vec::new();
            for spec in pending {
                match self.register(spec.clone(), Source::Consul).await {
                    Ok(_) => progress = true,
                    Err(e) => failed.push((spec, e)),
                }
            }
            if !progress {
                progress = self.unblock_consul_moves(&failed).await;
            }
            if failed.is_empty() || !progress {
                refused.extend(failed.into_iter().map(|(spec, e)| (spec.name, e)));
                refused.sort_by(|a, b| a.0.cmp(&b.0));
                return refused;
            }
            pending = failed.into_iter().map(|(spec, _)| spec).collect();
        }
    }

    /// Takes down the Consul apps that hold a VIP another refused service wants while they
    /// themselves are waiting to move to another VIP; returns whether it took any down.
    async fn unblock_consul_moves(&mut self, failed: &[(AppSpec, LifecycleError)]) -> bool {
        let blockers: BTreeSet<AppName> = failed
            .iter()
            .filter_map(|(_, e)| match e {
                LifecycleError::VipConflict { owner, .. }
                | LifecycleError::VipOverlap { owner, .. } => Some(owner.clone()),
                _ => None,
            })
            .filter(|owner| {
                let wanted = failed.iter().find(|(spec, _)| &spec.name == owner);
                self.apps.get(owner).is_some_and(|entry| {
                    entry.source == Source::Consul
                        && wanted.is_some_and(|(spec, _)| spec.vip != entry.spec.vip)
                })
            })
            .collect();
        for name in &blockers {
            if let Some(entry) = self.apps.remove(name) {
                info!(
                    app = %name,
                    vip = %entry.spec.vip,
                    "Consul app leaves its vip to another one: taken down, then registered anew"
                );
                self.teardown(entry).await;
            }
        }
        !blockers.is_empty()
    }

    fn view(&self, name: &AppName) -> Option<AppView> {
        let available = self.settings.passive_health;
        self.apps.get(name).map(|e| e.view(available))
    }

    /// Refuses an app whose VIP or label belongs to another app.
    fn check_conflicts(&self, spec: &AppSpec) -> Result<(), LifecycleError> {
        let label = spec.name.lo_label();
        for other in self.apps.values().filter(|e| e.spec.name != spec.name) {
            if other.spec.vip.addr() == spec.vip.addr() {
                return Err(LifecycleError::VipConflict {
                    vip: spec.vip,
                    owner: other.spec.name.clone(),
                });
            }
            // Two addresses of one subnet on lo: removing the primary takes the secondary with
            // it, and both would announce the same prefix.
            if other.spec.vip.prefix().contains(&spec.vip.addr())
                || spec.vip.prefix().contains(&other.spec.vip.addr())
            {
                return Err(LifecycleError::VipOverlap {
                    vip: spec.vip,
                    other: other.spec.vip,
                    owner: other.spec.name.clone(),
                });
            }
            if other.label == label {
                return Err(LifecycleError::LabelConflict {
                    name: spec.name.clone(),
                    label,
                    owner: other.spec.name.clone(),
                });
            }
        }
        Ok(())
    }

    fn check_policy(&self, spec: &AppSpec, source: Source) -> Result<(), LifecycleError> {
        if source == Source::Config {
            return Ok(());
        }
        if source == Source::Http
            && !self.settings.allow_http_exec
            && spec
                .monitors
                .iter()
                .any(|m| matches!(m, Monitor::Exec { .. }))
        {
            return Err(LifecycleError::ExecRefused);
        }
        let allow = &self.settings.vip_allowlist;
        if !allow.is_empty() && !allow.iter().any(|net| net.contains(&spec.vip.net())) {
            return Err(LifecycleError::NotAllowed(spec.vip));
        }
        Ok(())
    }

    async fn register(&mut self, spec: AppSpec, source: Source) -> Result<AppView, LifecycleError> {
        self.check_policy(&spec, source)?;
        self.check_conflicts(&spec)?;
        if source != Source::Config
            && self
                .apps
                .get(&spec.name)
                .is_some_and(|e| e.source == Source::Config)
        {
            return Err(LifecycleError::ConfigApp(spec.name));
        }
        if let Some(old) = self.apps.get(&spec.name)
            && old.spec == spec
        {
            debug!(app = %spec.name, "registered again with the same parameters: nothing to do");
            return self
                .view(&spec.name)
                .ok_or(LifecycleError::UnknownApp(spec.name));
        }
        if source == Source::Http {
            self.persist_with(Some(&spec), None).await?;
        }
        let name = spec.name.clone();
        match self.apps.remove(&name) {
            Some(old) if old.spec.vip == spec.vip => self.replace_in_place(old, spec, source).await,
            Some(old) => {
                info!(app = %name, old_vip = %old.spec.vip, new_vip = %spec.vip, "app replaced with a new vip");
                self.teardown(old).await;
                self.insert(spec, source);
            }
            None => {
                info!(app = %name, vip = %spec.vip, ?source, "app registered");
                self.insert(spec, source);
            }
        }
        self.view(&name).ok_or(LifecycleError::UnknownApp(name))
    }

    async fn unregister(&mut self, name: &AppName) -> Result<AppView, LifecycleError> {
        let Some(view) = self.view(name) else {
            return Err(LifecycleError::UnknownApp(name.clone()));
        };
        if self
            .apps
            .get(name)
            .is_some_and(|e| e.source == Source::Http)
        {
            self.persist_with(None, Some(name)).await?;
        }
        let Some(entry) = self.apps.remove(name) else {
            return Err(LifecycleError::UnknownApp(name.clone()));
        };
        info!(app = %name, "app unregistered");
        self.teardown(entry).await;
        Ok(view)
    }

    /// Saves the HTTP apps as they will be once `add` is added and `remove` removed.
    fn persist_with(
        &self,
        add: Option<&AppSpec>,
        remove: Option<&AppName>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send + 'static {
        let skip = add.map(|s| &s.name).or(remove);
        let mut apps: Vec<AppSpec> = self
            .apps
            .values()
            .filter(|e| e.source == Source::Http && Some(&e.spec.name) != skip)
            .map(|e| e.spec.clone())
            .collect();
        apps.extend(add.cloned());
        let store = self.store.clone();
        // Built here, awaited by the caller: no borrow of the lifecycle lives across the write.
        async move {
            let path = store.path().to_owned();
            tokio::task::spawn_blocking(move || store.save(&apps))
                .await
                .unwrap_or_else(|e| {
                    Err(StoreError::Io {
                        op: "write",
                        path,
                        source: std::io::Error::other(e),
                    })
                })
        }
    }

    /// Adds a new app: unhealthy until its monitors pass; a cleanup is pending so an HTTP app
    /// that never comes up is forgotten after `cleanup_timer`, as in GoCast.
    fn insert(&mut self, spec: AppSpec, source: Source) {
        let generation = self.next_generation;
        self.next_generation += 1;
        let entry = Entry {
            results: vec![None; spec.monitors.len()],
            label: spec.name.lo_label(),
            spec,
            source,
            generation,
            healthy: false,
            streak: 0,
            vip_installed: false,
            nat_installed: false,
            since: SystemTime::now(),
            cleanup_at: None,
            last_error: None,
            passive_failure: None,
        };
        self.metrics
            .app_state(entry.spec.name.as_str(), false, false);
        self.watch(&entry);
        self.apps.insert(entry.spec.name.clone(), entry);
        // The stats sampler learns the new VIP's owner with the next publish.
        self.owners_changed = true;
        self.dirty = true;
    }

    /// Same name, same VIP, other parameters: keep the health state so the route does not
    /// flap, swap NAT rules and communities, and check the new monitors from now on.
    async fn replace_in_place(&mut self, mut entry: Entry, spec: AppSpec, source: Source) {
        info!(app = %spec.name, "app parameters replaced");
        if entry.spec.nats != spec.nats || entry.spec.nat_dest != spec.nat_dest {
            // The old rules go with the old parameters; the new ones come with go_healthy.
            self.remove_nat(&mut entry).await;
        }
        entry.generation = self.next_generation;
        self.next_generation += 1;
        entry.results = vec![None; spec.monitors.len()];
        entry.streak = 0;
        entry.passive_failure = None;
        entry.spec = spec;
        entry.source = source;
        self.watch(&entry);
        let name = entry.spec.name.clone();
        let healthy = entry.healthy;
        self.apps.insert(name.clone(), entry);
        if healthy {
            self.go_healthy(&name).await;
        }
        self.owners_changed = true;
        self.dirty = true;
    }

    fn watch(&self, entry: &Entry) {
        let cmd = monitor::Command::Watch {
            app: entry.spec.name.clone(),
            generation: entry.generation,
            monitors: entry.spec.monitors.clone(),
        };
        // The scheduler lives as long as we do; a send error only happens during shutdown.
        let _ = self.monitors.send(cmd);
    }

    /// Removes everything of an app from the host: route first, then NAT and VIP.
    async fn teardown(&mut self, mut entry: Entry) {
        let _ = self.monitors.send(monitor::Command::Unwatch {
            app: entry.spec.name.clone(),
        });
        self.owners_changed = true;
        self.publish();
        self.await_withdrawn().await;
        self.remove_nat(&mut entry).await;
        self.remove_vip(&mut entry).await;
        self.metrics.app_removed(entry.spec.name.as_str());
    }

    /// A new passive verdict: a failure withdraws a healthy app at once (the window already
    /// smoothed it); a cleared one lets the next passing monitor report bring it back.
    fn on_passive(&mut self, name: &AppName, verdict: Verdict) {
        let Some(entry) = self.apps.get_mut(name) else {
            return;
        };
        if !entry.spec.passive_health {
            return;
        }
        entry.passive_failure = match verdict {
            Verdict::Failing(reason) => {
                warn!(app = %name, %reason, "passive health failing");
                Some(reason)
            }
            Verdict::Cleared => {
                info!(app = %name, "passive health ok again");
                None
            }
        };
        if entry.passive_failure.is_some() && entry.healthy {
            entry.streak = 0;
            self.go_unhealthy(name);
        }
    }

    async fn on_report(&mut self, report: Report) {
        let Some(entry) = self.apps.get_mut(&report.app) else {
            return;
        };
        if entry.generation != report.generation {
            return;
        }
        let passing = report.results.iter().all(|r| r.ok) && entry.passive_failure.is_none();
        for (slot, r) in entry.results.iter_mut().zip(report.results) {
            *slot = Some(r);
        }
        if !passing
            && !entry.healthy
            && entry.cleanup_at.is_none()
            && (entry.source == Source::Http || entry.vip_installed)
        {
            // An app that never came up is forgotten after cleanup_timer too, as in GoCast.
            entry.cleanup_at = Some(Instant::now() + self.settings.cleanup_timer);
            self.cleanup_changed = true;
        }
        if passing == entry.healthy {
            entry.streak = 0;
            // A healthy app whose install failed earlier is retried on every passing report.
            if passing && !entry.installed() {
                self.go_healthy(&report.app).await;
            }
            return;
        }
        entry.streak += 1;
        let needed = if passing {
            self.settings.monitor_rise
        } else {
            self.settings.monitor_fall
        };
        if entry.streak < needed {
            return;
        }
        entry.streak = 0;
        if passing {
            self.go_healthy(&report.app).await;
        } else {
            self.go_unhealthy(&report.app);
        }
    }

    async fn go_healthy(&mut self, name: &AppName) {
        let Some(mut entry) = self.apps.remove(name) else {
            return;
        };
        if !entry.vip_installed {
            self.add_vip(&mut entry).await;
        }
        if entry.vip_installed && !entry.nat_installed {
            self.install_nat(&mut entry).await;
        }
        let was = entry.healthy;
        // Announcing a VIP that is not on lo, or whose NAT is missing, would black-hole traffic.
        entry.healthy = entry.installed();
        if entry.healthy && !was {
            entry.since = SystemTime::now();
            entry.cleanup_at = None;
            self.metrics.state_changed(name.as_str());
            info!(app = %name, vip = %entry.spec.vip, "app healthy: announcing");
        }
        self.metrics
            .app_state(name.as_str(), entry.healthy, entry.healthy);
        self.apps.insert(name.clone(), entry);
        self.dirty = true;
    }

    fn go_unhealthy(&mut self, name: &AppName) {
        let cleanup_timer = self.settings.cleanup_timer;
        let Some(entry) = self.apps.get_mut(name) else {
            return;
        };
        entry.healthy = false;
        entry.since = SystemTime::now();
        entry.cleanup_at = Some(Instant::now() + cleanup_timer);
        let reasons: Vec<String> = entry
            .spec
            .monitors
            .iter()
            .zip(&entry.results)
            .filter_map(|(m, r)| {
                r.as_ref()
                    .filter(|r| !r.ok)
                    .map(|r| format!("{m}: {}", r.reason))
            })
            .chain(entry.passive_failure.clone())
            .collect();
        warn!(app = %name, vip = %entry.spec.vip, reasons = %reasons.join("; "), "app unhealthy: withdrawing");
        self.metrics.state_changed(name.as_str());
        self.metrics.app_state(name.as_str(), false, false);
        self.dirty = true;
        self.cleanup_changed = true;
    }

    /// Cleans up every app whose timer has passed.
    async fn cleanup_due(&mut self) {
        let now = Instant::now();
        let due: Vec<AppName> = self
            .apps
            .values()
            .filter(|e| e.cleanup_at.is_some_and(|t| t <= now))
            .map(|e| e.spec.name.clone())
            .collect();
        for name in due {
            let Some(mut entry) = self.apps.remove(&name) else {
                continue;
            };
            entry.cleanup_at = None;
            // Consul apps stay while the catalog has them: forgetting one would only bring it
            // back at the next catalog read, which may be `consul_query_interval` away.
            if matches!(entry.source, Source::Config | Source::Consul) {
                info!(app = %name, "cleanup timer passed: removing vip and nat, still monitoring");
                self.await_withdrawn().await;
                self.remove_nat(&mut entry).await;
                self.remove_vip(&mut entry).await;
                self.apps.insert(name, entry);
                continue;
            }
            info!(app = %name, "cleanup timer passed: app removed");
            if entry.source == Source::Http
                && let Err(e) = self.persist_with(None, Some(&name)).await
            {
                // Keep it: forgetting it in memory but not on disk would bring it back later
                // anyway, and an operator can see it in /apps. Try again after the timer.
                error!(app = %name, error = %e, "cannot save the removal; keeping the app");
                entry.cleanup_at = Some(Instant::now() + self.settings.cleanup_timer);
                self.apps.insert(name, entry);
                continue;
            }
            self.teardown(entry).await;
        }
    }

    /// Waits (bounded) until every established peer has been sent the current route set, so a
    /// VIP leaves `lo` only after its withdrawal went out.
    async fn await_withdrawn(&mut self) {
        let Some(announcer) = self.announcer.as_mut() else {
            return;
        };
        let version = self.routes.borrow().version;
        let flushed = announcer.flushed.wait_for(|v| *v >= version);
        if tokio::time::timeout(WITHDRAW_WAIT, flushed).await.is_err() {
            warn!(
                version,
                "withdrawal not confirmed by every peer within {WITHDRAW_WAIT:?}; going on"
            );
        }
    }

    /// Publishes the routes of the healthy apps.
    fn publish(&mut self) {
        self.dirty = false;
        let set: RouteSet = self
            .apps
            .values()
            .filter(|e| e.healthy)
            .map(|e| {
                (
                    e.spec.vip.prefix(),
                    Route {
                        app: e.spec.name.clone(),
                        communities: e.spec.communities.clone(),
                    },
                )
            })
            .collect();
        self.metrics.routes(set.len());
        if std::mem::take(&mut self.owners_changed) {
            let owners: BTreeMap<IpAddr, VipOwner> = self
                .apps
                .values()
                .map(|e| {
                    let owner = VipOwner {
                        vip: e.spec.vip,
                        app: e.spec.name.clone(),
                        passive_health: e.spec.passive_health,
                    };
                    (e.spec.vip.addr(), owner)
                })
                .collect();
            self.owners.send_replace(Arc::new(owners));
        }
        self.routes.send_if_modified(|current| {
            if current.set == set {
                return false;
            }
            current.set = set;
            current.version += 1;
            true
        });
    }

    async fn add_vip(&mut self, entry: &mut Entry) {
        match self.host.add_vip(&entry.spec.vip, &entry.label).await {
            Ok(()) => {
                entry.vip_installed = true;
                entry.last_error = None;
            }
            Err(e) => record(entry, "add vip", &e),
        }
    }

    async fn remove_vip(&mut self, entry: &mut Entry) {
        if !entry.vip_installed {
            return;
        }
        match self.host.remove_vip(&entry.spec.vip).await {
            Ok(()) => entry.vip_installed = false,
            Err(e) => record(entry, "remove vip", &e),
        }
    }

    async fn install_nat(&mut self, entry: &mut Entry) {
        if entry.spec.nats.is_empty() {
            return;
        }
        let s = &entry.spec;
        match self
            .host
            .install_nat(&s.name, &s.vip, &s.nats, s.nat_dest)
            .await
        {
            Ok(()) => {
                entry.nat_installed = true;
                entry.last_error = None;
            }
            Err(e) => record(entry, "install nat", &e),
        }
    }

    async fn remove_nat(&mut self, entry: &mut Entry) {
        if !entry.nat_installed {
            return;
        }
        let s = &entry.spec;
        match self
            .host
            .remove_nat(&s.name, &s.vip, &s.nats, s.nat_dest)
            .await
        {
            Ok(()) => entry.nat_installed = false,
            Err(e) => record(entry, "remove nat", &e),
        }
    }

    /// Withdraws everything, then removes every VIP, then the whole NAT chain at once (rule by
    /// rule would not fit the shutdown budget with many apps).
    async fn shutdown(mut self) {
        info!("shutting down: withdrawing all routes");
        for e in self.apps.values_mut() {
            e.healthy = false;
        }
        self.publish();
        self.await_withdrawn().await;
        if let Some(announcer) = self.announcer.take() {
            announcer.stop.cancel();
            if tokio::time::timeout(WITHDRAW_WAIT, announcer.done)
                .await
                .is_err()
            {
                warn!("BGP sessions did not close within {WITHDRAW_WAIT:?}");
            }
        }
        let names: Vec<AppName> = self.apps.keys().cloned().collect();
        for name in names {
            let Some(mut entry) = self.apps.remove(&name) else {
                continue;
            };
            self.remove_vip(&mut entry).await;
        }
        if let Err(e) = self.host.shutdown().await {
            error!(error = %e, "dataplane cleanup at shutdown failed");
        }
        info!("shutdown complete: no vip, no nat rule left");
    }
}

/// Keeps a failed host operation on the app; logs it when it is new, not on every retry.
fn record(entry: &mut Entry, op: &str, e: &HostError) {
    let mut message = format!("{op}: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        message = format!("{message}: {cause}");
        source = cause.source();
    }
    if entry.last_error.as_ref() != Some(&message) {
        error!(app = %entry.spec.name, vip = %entry.spec.vip, error = %e, "{op} failed");
    }
    entry.last_error = Some(message);
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::testing::FakeHost;

    struct Harness {
        host: FakeHost,
        owners: watch::Receiver<Owners>,
        running: Running,
        cancel: CancellationToken,
        dir: tempfile::TempDir,
    }

    fn settings() -> Settings {
        Settings {
            monitor_rise: 1,
            monitor_fall: 1,
            cleanup_timer: Duration::from_millis(300),
            allow_http_exec: true,
            vip_allowlist: Vec::new(),
            monitor: monitor::Settings {
                interval: Duration::from_millis(20),
                exec_timeout: Duration::from_secs(5),
                consul: None,
            },
            passive_health: true,
        }
    }

    fn start(settings: Settings, config_apps: Vec<AppSpec>, dir: tempfile::TempDir) -> Harness {
        let host = FakeHost::default();
        let cancel = CancellationToken::new();
        let store = Store::new(dir.path().join("state.json"));
        let (owners_tx, owners) = watch::channel(Owners::default());
        let outputs = Outputs {
            routes: watch::channel(Routes::default()).0,
            owners: owners_tx,
            announcer: None,
            metrics: Metrics::default(),
        };
        let running = spawn(
            settings,
            host.clone(),
            config_apps,
            store,
            outputs,
            cancel.clone(),
        );
        *host.routes.lock().unwrap() = Some(running.routes.clone());
        Harness {
            host,
            owners,
            running,
            cancel,
            dir,
        }
    }

    /// [`start`] in a temp dir of its own.
    fn start_fresh(settings: Settings, config_apps: Vec<AppSpec>) -> Harness {
        start(settings, config_apps, tempfile::tempdir().unwrap())
    }

    /// Cancels the lifecycle and waits until its shutdown is done.
    async fn stop(h: &mut Harness) {
        h.cancel.cancel();
        (&mut h.running.task).await.unwrap();
    }

    /// Registers `spec` as an HTTP app.
    async fn register(h: &Harness, spec: AppSpec) -> Result<AppView, LifecycleError> {
        h.running.handle.register(spec, Source::Http).await
    }

    /// The HTTP apps in the state file.
    fn stored(h: &Harness) -> Vec<AppSpec> {
        Store::new(h.dir.path().join("state.json")).load().unwrap()
    }

    /// A flag file whose existence makes `exec:test -e FILE` pass.
    fn flag(dir: &tempfile::TempDir, name: &str) -> PathBuf {
        dir.path().join(name)
    }

    fn spec(name: &str, vip: &str, monitors: &[String]) -> AppSpec {
        AppSpec {
            name: name.parse().unwrap(),
            vip: vip.parse().unwrap(),
            monitors: monitors.iter().map(|m| m.parse().unwrap()).collect(),
            nats: vec!["tcp:80:8080".parse().unwrap()],
            communities: vec!["65000:1".parse().unwrap()],
            nat_dest: None,
            passive_health: false,
        }
    }

    fn exec_flag(path: &std::path::Path) -> String {
        format!("exec:test -e {}", path.display())
    }

    async fn app(h: &Harness, name: &str) -> Option<AppView> {
        h.running
            .handle
            .apps()
            .await
            .unwrap()
            .into_iter()
            .find(|a| a.name.as_str() == name)
    }

    async fn wait_for(
        h: &Harness,
        what: &str,
        mut ok: impl FnMut(Option<&AppView>, &RouteSet) -> bool,
    ) {
        for _ in 0..500 {
            let apps = h.running.handle.apps().await.unwrap();
            let routes = h.running.routes.borrow().clone();
            let first = apps.first();
            if ok(first, &routes) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}; log: {:?}", h.host.log());
    }

    async fn wait_healthy(h: &Harness) {
        wait_for(h, "healthy", |a, _| a.is_some_and(|a| a.state == "healthy")).await;
    }

    fn routed(routes: &RouteSet, vip: &str) -> bool {
        routes.contains_key(&vip.parse::<Vip>().unwrap().prefix())
    }

    #[tokio::test]
    async fn a_passive_health_failure_withdraws_until_cleared_and_only_for_apps_that_opt_in() {
        let mut passive = spec("web", "192.0.2.10/32", &["exec:true".into()]);
        passive.passive_health = true;
        let other = spec("db", "192.0.2.11/32", &["exec:true".into()]);
        let mut h = start_fresh(settings(), vec![passive, other]);
        let owners = h.owners.clone();
        wait_for(&h, "both healthy", |_, r| {
            routed(r, "192.0.2.10/32") && routed(r, "192.0.2.11/32")
        })
        .await;
        let owner = owners.borrow()[&"192.0.2.10".parse::<IpAddr>().unwrap()].clone();
        assert!(owner.passive_health && owner.app.as_str() == "web");

        let failing = |name: &str| {
            let verdict = Verdict::Failing("no SYN-ACKs".to_owned());
            (name.parse().unwrap(), verdict)
        };
        h.running
            .handle
            .passive_health(vec![failing("web"), failing("db")])
            .await
            .unwrap();
        wait_for(&h, "web withdrawn", |_, r| !routed(r, "192.0.2.10/32")).await;
        assert!(
            h.running
                .routes
                .borrow()
                .contains_key(&"192.0.2.11/32".parse().unwrap())
        );
        let web = app(&h, "web").await.unwrap();
        assert_eq!(web.state, "unhealthy");
        let view = web.passive_health.unwrap();
        assert_eq!(
            (view.state, view.reason.as_deref()),
            ("failing", Some("no SYN-ACKs"))
        );
        assert!(app(&h, "db").await.unwrap().passive_health.is_none());
        // Monitors keep passing, but the app stays down while the verdict holds.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!routed(&h.running.routes.borrow(), "192.0.2.10/32"));

        h.running
            .handle
            .passive_health(vec![("web".parse().unwrap(), Verdict::Cleared)])
            .await
            .unwrap();
        wait_for(&h, "web back", |_, r| routed(r, "192.0.2.10/32")).await;
        stop(&mut h).await;
    }

    #[tokio::test]
    async fn a_healthy_app_gets_vip_nat_and_route_then_is_withdrawn_before_its_vip_goes() {
        let dir = tempfile::tempdir().unwrap();
        let up = flag(&dir, "up");
        std::fs::write(&up, "").unwrap();
        let mut h = start(
            settings(),
            vec![spec("web", "192.0.2.10/32", &[exec_flag(&up)])],
            dir,
        );
        wait_for(&h, "healthy", |a, r| {
            a.is_some_and(|a| a.state == "healthy") && routed(r, "192.0.2.10/32")
        })
        .await;
        assert_eq!(
            h.host.log(),
            ["add_vip 192.0.2.10/32 lo:web", "install_nat web 1"]
        );
        let route = h.running.routes.borrow().values().next().cloned().unwrap();
        assert_eq!(route.communities, vec!["65000:1".parse().unwrap()]);

        std::fs::remove_file(&up).unwrap();
        wait_for(&h, "withdrawn", |a, r| {
            a.is_some_and(|a| a.state == "unhealthy") && r.is_empty()
        })
        .await;
        let view = app(&h, "web").await.unwrap();
        assert!(
            view.vip_installed && view.cleanup_in_s.is_some(),
            "vip stays until cleanup: {view:?}"
        );
        assert!(
            view.monitors[0]
                .reason
                .as_deref()
                .unwrap()
                .contains("exit status")
        );
        wait_for(&h, "cleanup", |a, _| a.is_some_and(|a| !a.vip_installed)).await;
        assert_eq!(
            &h.host.log()[2..],
            ["remove_nat web", "remove_vip 192.0.2.10/32 announced=false"]
        );
        // A config app stays after cleanup and comes back when healthy again.
        std::fs::write(&up, "").unwrap();
        wait_for(&h, "healthy again", |a, r| {
            a.is_some_and(|a| a.state == "healthy") && !r.is_empty()
        })
        .await;
        stop(&mut h).await;
        let log = h.host.log();
        // Shutdown: withdraw, VIPs off lo, then the NAT chain goes in one piece.
        assert_eq!(
            &log[log.len() - 2..],
            ["remove_vip 192.0.2.10/32 announced=false", "shutdown"]
        );
        assert!(h.running.routes.borrow().is_empty());
    }

    #[tokio::test]
    async fn recovery_before_the_cleanup_timer_keeps_the_vip() {
        let dir = tempfile::tempdir().unwrap();
        let up = flag(&dir, "up");
        std::fs::write(&up, "").unwrap();
        let mut s = settings();
        s.cleanup_timer = Duration::from_secs(60);
        let h = start(
            s,
            vec![spec("web", "192.0.2.10/32", &[exec_flag(&up)])],
            dir,
        );
        wait_healthy(&h).await;
        std::fs::remove_file(&up).unwrap();
        wait_for(&h, "unhealthy", |a, r| {
            a.is_some_and(|a| a.state == "unhealthy") && r.is_empty()
        })
        .await;
        std::fs::write(&up, "").unwrap();
        wait_for(&h, "healthy", |a, r| {
            a.is_some_and(|a| a.state == "healthy" && a.cleanup_in_s.is_none()) && !r.is_empty()
        })
        .await;
        assert_eq!(
            h.host.log(),
            ["add_vip 192.0.2.10/32 lo:web", "install_nat web 1"],
            "no remove, no second add"
        );
    }

    #[tokio::test]
    async fn an_http_app_is_forgotten_after_the_cleanup_timer() {
        let dir = tempfile::tempdir().unwrap();
        let up = flag(&dir, "up");
        std::fs::write(&up, "").unwrap();
        let h = start(settings(), Vec::new(), dir);
        register(&h, spec("web", "192.0.2.10/32", &[exec_flag(&up)]))
            .await
            .unwrap();
        wait_healthy(&h).await;
        std::fs::remove_file(&up).unwrap();
        wait_for(&h, "dropped", |a, _| a.is_none()).await;
        assert!(stored(&h).is_empty());
        assert!(
            h.host
                .log()
                .contains(&"remove_vip 192.0.2.10/32 announced=false".to_owned())
        );
    }

    #[tokio::test]
    async fn rise_and_fall_need_consecutive_results() {
        let dir = tempfile::tempdir().unwrap();
        let counter = flag(&dir, "n");
        // Passes on every third run only: never three in a row, so rise=3 never makes it healthy.
        let cmd = format!(
            "exec:n=$(cat {p} 2>/dev/null || echo 0); echo $((n+1)) > {p}; [ $((n % 3)) -eq 2 ]",
            p = counter.display()
        );
        let mut s = settings();
        s.monitor_rise = 2;
        let h = start(s, vec![spec("web", "192.0.2.10/32", &[cmd])], dir);
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let n: u32 = std::fs::read_to_string(&counter)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(n >= 6, "checked {n} times");
        assert_eq!(app(&h, "web").await.unwrap().state, "unhealthy");
        assert!(h.host.log().is_empty());
    }

    #[tokio::test]
    async fn a_vip_owned_by_another_app_is_refused_and_nothing_changes() {
        let h = start_fresh(settings(), vec![spec("a", "192.0.2.10/32", &[])]);
        let e = register(&h, spec("b", "192.0.2.10/32", &[]))
            .await
            .unwrap_err();
        assert!(matches!(e, LifecycleError::VipConflict { .. }), "{e}");
        assert!(e.to_string().contains("already used by app a"));
        let apps = h.running.handle.apps().await.unwrap();
        assert_eq!(apps.len(), 1);
        assert!(stored(&h).is_empty());
    }

    #[tokio::test]
    async fn same_parameters_are_a_no_op_and_new_ones_replace_the_app() {
        let h = start_fresh(settings(), Vec::new());
        let a = spec("web", "192.0.2.10/32", &[]);
        register(&h, a.clone()).await.unwrap();
        wait_healthy(&h).await;
        register(&h, a.clone()).await.unwrap();
        assert_eq!(h.host.log().len(), 2, "{:?}", h.host.log());
        // Same VIP, new communities: stays healthy, route updated, no flap.
        let mut b = a.clone();
        b.communities = vec!["65000:2".parse().unwrap()];
        let view = register(&h, b).await.unwrap();
        assert_eq!(view.state, "healthy");
        let communities = h
            .running
            .routes
            .borrow()
            .values()
            .next()
            .unwrap()
            .communities
            .clone();
        assert_eq!(communities, vec!["65000:2".parse().unwrap()]);
        // New VIP: the old one is withdrawn and removed first.
        let c = spec("web", "192.0.2.11/32", &[]);
        register(&h, c).await.unwrap();
        wait_for(&h, "moved", |a, r| {
            a.is_some_and(|a| a.state == "healthy") && routed(r, "192.0.2.11/32") && r.len() == 1
        })
        .await;
        let log = h.host.log();
        assert_eq!(
            &log[2..4],
            ["remove_nat web", "remove_vip 192.0.2.10/32 announced=false"]
        );
        assert_eq!(stored(&h)[0].vip.to_string(), "192.0.2.11/32");
    }

    #[tokio::test]
    async fn policy_refuses_http_exec_and_vips_outside_the_allowlist() {
        let mut s = settings();
        s.allow_http_exec = false;
        s.vip_allowlist = vec!["192.0.2.0/28".parse().unwrap()];
        let h = start_fresh(s, Vec::new());
        let e = register(&h, spec("a", "192.0.2.1/32", &["exec:true".into()]))
            .await
            .unwrap_err();
        assert!(matches!(e, LifecycleError::ExecRefused));
        let e = register(&h, spec("a", "192.0.2.100/32", &[]))
            .await
            .unwrap_err();
        assert!(matches!(e, LifecycleError::NotAllowed(_)));
        assert!(h.running.handle.apps().await.unwrap().is_empty());
        register(&h, spec("a", "192.0.2.1/32", &[])).await.unwrap();
    }

    #[tokio::test]
    async fn http_registrations_come_back_after_a_restart() {
        let mut h = start_fresh(settings(), vec![spec("cfg", "192.0.2.1/32", &[])]);
        register(&h, spec("web", "192.0.2.10/32", &[]))
            .await
            .unwrap();
        stop(&mut h).await;
        let again = start(settings(), vec![spec("cfg", "192.0.2.1/32", &[])], h.dir);
        let apps = again.running.handle.apps().await.unwrap();
        let names: Vec<(&str, Source)> = apps.iter().map(|a| (a.name.as_str(), a.source)).collect();
        assert_eq!(names, [("cfg", Source::Config), ("web", Source::Http)]);
    }

    #[tokio::test]
    async fn unregister_withdraws_removes_and_forgets() {
        let h = start_fresh(settings(), Vec::new());
        register(&h, spec("web", "192.0.2.10/32", &[]))
            .await
            .unwrap();
        wait_healthy(&h).await;
        h.running
            .handle
            .unregister("web".parse().unwrap())
            .await
            .unwrap();
        assert!(h.running.routes.borrow().is_empty());
        assert!(h.running.handle.apps().await.unwrap().is_empty());
        assert_eq!(
            &h.host.log()[2..],
            ["remove_nat web", "remove_vip 192.0.2.10/32 announced=false"]
        );
        let e = h
            .running
            .handle
            .unregister("web".parse().unwrap())
            .await
            .unwrap_err();
        assert!(matches!(e, LifecycleError::UnknownApp(_)));
    }

    #[tokio::test]
    async fn a_failed_nat_install_keeps_the_app_unannounced_and_says_why() {
        let h = start_fresh(settings(), Vec::new());
        *h.host.fail_nat.lock().unwrap() = true;
        register(&h, spec("web", "192.0.2.10/32", &[]))
            .await
            .unwrap();
        wait_for(&h, "error shown", |a, _| {
            a.is_some_and(|a| a.last_error.is_some())
        })
        .await;
        let view = app(&h, "web").await.unwrap();
        assert_eq!(view.state, "unhealthy");
        assert!(view.last_error.unwrap().contains("no NAT destination"));
        assert!(h.running.routes.borrow().is_empty());
        *h.host.fail_nat.lock().unwrap() = false;
        wait_for(&h, "healthy", |a, r| {
            a.is_some_and(|a| a.state == "healthy" && a.last_error.is_none()) && !r.is_empty()
        })
        .await;
    }

    #[tokio::test]
    async fn nat_added_to_a_healthy_app_is_installed_without_a_flap() {
        let h = start_fresh(settings(), Vec::new());
        let mut a = spec("web", "192.0.2.10/32", &[]);
        a.nats.clear();
        register(&h, a.clone()).await.unwrap();
        wait_healthy(&h).await;
        a.nats = vec!["tcp:80:8080".parse().unwrap()];
        let view = register(&h, a).await.unwrap();
        assert_eq!(view.state, "healthy");
        assert_eq!(
            h.host.log(),
            ["add_vip 192.0.2.10/32 lo:web", "install_nat web 1"]
        );
    }

    #[tokio::test]
    async fn http_cannot_take_over_a_config_app() {
        let h = start_fresh(settings(), vec![spec("web", "192.0.2.10/32", &[])]);
        let e = register(&h, spec("web", "192.0.2.10/32", &["exec:true".into()]))
            .await
            .unwrap_err();
        assert!(matches!(e, LifecycleError::ConfigApp(_)), "{e}");
        assert_eq!(app(&h, "web").await.unwrap().source, Source::Config);
    }

    #[tokio::test]
    async fn overlapping_vips_are_refused() {
        let h = start_fresh(settings(), vec![spec("a", "192.0.2.10/24", &[])]);
        let e = register(&h, spec("b", "192.0.2.20/32", &[]))
            .await
            .unwrap_err();
        assert!(matches!(e, LifecycleError::VipOverlap { .. }), "{e}");
    }

    #[tokio::test]
    async fn with_a_zero_cleanup_timer_a_new_app_still_gets_its_first_check() {
        let mut s = settings();
        s.cleanup_timer = Duration::ZERO;
        let h = start_fresh(s, Vec::new());
        register(&h, spec("web", "192.0.2.10/32", &[]))
            .await
            .unwrap();
        wait_healthy(&h).await;
    }

    /// Regression: with more config apps than the channels hold, start-up used to deadlock
    /// (the lifecycle waited on the scheduler, which waited on the lifecycle).
    #[tokio::test]
    async fn five_thousand_config_apps_all_come_up() {
        let dir = tempfile::tempdir().unwrap();
        let apps: Vec<AppSpec> = (0..5000u32)
            .map(|i| {
                spec(
                    &format!("app{i}"),
                    &format!("2001:db8:ff00::{:x}:{:x}/128", i / 1000, i % 1000 + 1),
                    &["port:tcp:1".into()],
                )
            })
            .map(|mut a| {
                a.monitors.clear();
                a
            })
            .collect();
        let h = start(settings(), apps, dir);
        for _ in 0..1000 {
            if h.running.routes.borrow().len() == 5000 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "only {} of 5000 routes after 10 s",
            h.running.routes.borrow().len()
        );
    }

    /// A Consul app on `vip` without monitors (always healthy).
    fn consul_spec(name: &str, vip: &str) -> AppSpec {
        AppSpec {
            nats: Vec::new(),
            communities: Vec::new(),
            ..spec(name, vip, &[])
        }
    }

    async fn app_names(h: &Harness) -> Vec<(String, Source)> {
        h.running
            .handle
            .apps()
            .await
            .unwrap()
            .into_iter()
            .map(|a| (a.name.as_str().to_owned(), a.source))
            .collect()
    }

    #[tokio::test]
    async fn consul_sync_adds_updates_and_removes_only_consul_apps() {
        let h = start_fresh(settings(), vec![consul_spec("cfg", "192.0.2.1/32")]);
        register(&h, consul_spec("http", "192.0.2.2/32"))
            .await
            .unwrap();
        let handle = &h.running.handle;
        let refused = handle
            .sync_consul(
                vec![
                    consul_spec("web", "192.0.2.10/32"),
                    // Collides with the config app's VIP, and with the HTTP app's name.
                    consul_spec("clash", "192.0.2.1/32"),
                    consul_spec("http", "192.0.2.20/32"),
                    consul_spec("api", "192.0.2.11/32"),
                ],
                Vec::new(),
            )
            .await
            .unwrap();
        let refused: Vec<String> = refused.iter().map(|(n, e)| format!("{n}: {e}")).collect();
        assert_eq!(refused.len(), 2, "{refused:?}");
        assert!(refused[0].starts_with("clash: vip 192.0.2.1/32 is already used by app cfg"));
        assert!(refused[1].starts_with("http: app name http is taken"));
        let names = app_names(&h).await;
        assert_eq!(
            names,
            [
                ("api".to_owned(), Source::Consul),
                ("cfg".to_owned(), Source::Config),
                ("http".to_owned(), Source::Http),
                ("web".to_owned(), Source::Consul),
            ]
        );
        // Consul apps come back from Consul: never in the HTTP state file.
        assert_eq!(stored(&h).len(), 1);
        wait_for(&h, "routes", |_, r| r.len() == 4).await;

        // web changes its communities (in place, no flap); api leaves the catalog.
        let mut web = consul_spec("web", "192.0.2.10/32");
        web.communities = vec!["65001:9".parse().unwrap()];
        let refused = handle.sync_consul(vec![web], Vec::new()).await.unwrap();
        assert!(refused.is_empty());
        let names = app_names(&h).await;
        assert_eq!(names.len(), 3, "{names:?}");
        assert!(!names.iter().any(|(n, _)| n == "api"));
        let routes = h.running.routes.borrow().clone();
        assert!(!routes.contains_key(&"192.0.2.11/32".parse::<Vip>().unwrap().prefix()));
        let web_route = &routes[&"192.0.2.10/32".parse::<Vip>().unwrap().prefix()];
        assert_eq!(web_route.communities, vec!["65001:9".parse().unwrap()]);
        let log = h.host.log();
        assert!(
            log.contains(&"remove_vip 192.0.2.11/32 announced=false".to_owned()),
            "{log:?}"
        );
        assert!(
            !log.iter().any(|l| l.starts_with("remove_vip 192.0.2.10")),
            "{log:?}"
        );

        // A service whose tags are bad now keeps its app; an empty catalog removes the rest.
        let refused = handle
            .sync_consul(Vec::new(), vec!["web".parse().unwrap()])
            .await
            .unwrap();
        assert!(refused.is_empty());
        assert!(app_names(&h).await.iter().any(|(n, _)| n == "web"));
        handle.sync_consul(Vec::new(), Vec::new()).await.unwrap();
        let names = app_names(&h).await;
        assert_eq!(names.len(), 2, "config and HTTP apps stay: {names:?}");
    }

    async fn vips(h: &Harness) -> Vec<(String, String)> {
        h.running
            .handle
            .apps()
            .await
            .unwrap()
            .into_iter()
            .map(|a| (a.name.as_str().to_owned(), a.vip.to_string()))
            .collect()
    }

    /// Regression: services were applied one by one in ID order, so a service taking the VIP
    /// a later one leaves was refused until the next catalog change.
    #[tokio::test]
    async fn consul_sync_takes_a_vip_a_later_service_leaves() {
        let h = start_fresh(settings(), Vec::new());
        let handle = &h.running.handle;
        let refused = handle
            .sync_consul(vec![consul_spec("b", "192.0.2.1/32")], Vec::new())
            .await
            .unwrap();
        assert!(refused.is_empty());
        let refused = handle
            .sync_consul(
                vec![
                    consul_spec("a", "192.0.2.1/32"),
                    consul_spec("b", "192.0.2.3/32"),
                ],
                Vec::new(),
            )
            .await
            .unwrap();
        assert!(refused.is_empty(), "{refused:?}");
        assert_eq!(
            vips(&h).await,
            [
                ("a".to_owned(), "192.0.2.1/32".to_owned()),
                ("b".to_owned(), "192.0.2.3/32".to_owned()),
            ]
        );
        wait_for(&h, "routes", |_, r| r.len() == 2).await;
    }

    /// Regression: two services swapping VIPs in one catalog change each waited for the
    /// other's VIP, and both were refused forever.
    #[tokio::test]
    async fn consul_sync_swaps_vips_between_two_services() {
        let h = start_fresh(settings(), Vec::new());
        let handle = &h.running.handle;
        let refused = handle
            .sync_consul(
                vec![
                    consul_spec("a", "192.0.2.1/32"),
                    consul_spec("b", "192.0.2.2/32"),
                    consul_spec("c", "192.0.2.3/32"),
                ],
                Vec::new(),
            )
            .await
            .unwrap();
        assert!(refused.is_empty());
        let refused = handle
            .sync_consul(
                vec![
                    consul_spec("a", "192.0.2.2/32"),
                    consul_spec("b", "192.0.2.1/32"),
                    // Unchanged: never taken down.
                    consul_spec("c", "192.0.2.3/32"),
                ],
                Vec::new(),
            )
            .await
            .unwrap();
        assert!(refused.is_empty(), "{refused:?}");
        assert_eq!(
            vips(&h).await,
            [
                ("a".to_owned(), "192.0.2.2/32".to_owned()),
                ("b".to_owned(), "192.0.2.1/32".to_owned()),
                ("c".to_owned(), "192.0.2.3/32".to_owned()),
            ]
        );
        let log = h.host.log();
        assert!(
            !log.iter().any(|l| l.starts_with("remove_vip 192.0.2.3")),
            "{log:?}"
        );
        wait_for(&h, "routes", |_, r| r.len() == 3).await;
        // A VIP held by a non-Consul app is still refused, and only that service.
        register(&h, consul_spec("http", "192.0.2.9/32"))
            .await
            .unwrap();
        let refused = handle
            .sync_consul(
                vec![
                    consul_spec("a", "192.0.2.9/32"),
                    consul_spec("b", "192.0.2.1/32"),
                    consul_spec("c", "192.0.2.3/32"),
                ],
                Vec::new(),
            )
            .await
            .unwrap();
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert!(refused[0].1.to_string().contains("used by app http"));
        // a keeps its last VIP.
        assert!(
            vips(&h)
                .await
                .contains(&("a".to_owned(), "192.0.2.2/32".to_owned()))
        );
    }

    #[tokio::test]
    async fn a_consul_app_stays_after_cleanup_and_is_checked_again() {
        let dir = tempfile::tempdir().unwrap();
        let up = flag(&dir, "up");
        std::fs::write(&up, "").unwrap();
        let h = start(settings(), Vec::new(), dir);
        let web = spec("web", "192.0.2.10/32", &[exec_flag(&up)]);
        h.running
            .handle
            .sync_consul(vec![web], Vec::new())
            .await
            .unwrap();
        wait_healthy(&h).await;
        std::fs::remove_file(&up).unwrap();
        wait_for(&h, "cleaned up", |a, _| {
            a.is_some_and(|a| a.state == "unhealthy" && !a.vip_installed)
        })
        .await;
        std::fs::write(&up, "").unwrap();
        wait_for(&h, "healthy again", |a, r| {
            a.is_some_and(|a| a.state == "healthy") && !r.is_empty()
        })
        .await;
    }
}
