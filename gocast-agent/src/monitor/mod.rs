//! Health monitors: one scheduler task checks every watched app each `monitor_interval` and
//! reports the results to the lifecycle, which alone decides what they mean.
//!
//! ```text
//!  lifecycle ──Command (watch/unwatch)──▶ Scheduler ──Report──▶ lifecycle
//!                                            │ tick: one socket-table snapshot for all port monitors
//!                                            ├─ exec monitors: a task per app check, bounded by exec_timeout
//!                                            └◀─ (proto, port) ── watcher thread ◀── kernel: socket freed
//! ```
//!
//! Port monitors share one snapshot per tick, so 1,000 apps cost one `sock_diag` dump. An app
//! whose exec check is still running skips ticks rather than piling up processes; a slow app
//! never delays another's report.
//!
//! A service that dies between ticks would be noticed up to `monitor_interval` late. While some
//! app has a port monitor, the scheduler also listens for the kernel's socket-destroy broadcasts
//! (see [`port`]): when a listener on a monitored port goes away, the apps monitoring that port are
//! re-checked from a fresh snapshot within [`RECHECK_DELAY`]. Without `CAP_NET_ADMIN` (or on a
//! kernel without the broadcasts) this logs one warning and ticks alone remain.

pub mod exec;
pub mod port;

use std::{
    collections::{HashMap, HashSet},
    fmt,
    time::{Duration, Instant, SystemTime},
};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use self::port::{DestroyWatcher, Destroyed, SocketTable, WatchedPorts};
use crate::{
    app::{AppName, Monitor, Proto},
    consul::health::{self as consul_health, HealthLink as ConsulHealth},
    error_chain,
    metrics::Metrics,
    supervise::{self, Supervised},
    timer::Timer,
};

/// The outcome of one monitor run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MonitorResult {
    pub ok: bool,
    /// What was seen, for `/apps` and logs.
    pub reason: Reason,
    pub at: SystemTime,
    pub latency: Duration,
}

/// What a monitor saw. A port monitor's verdict is kept as values and put in words only when
/// shown: with 1,000 apps checked every second, formatting it on every check was two
/// allocations per app a second (docs/design.md, "Memory").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// A `port:` monitor's socket is there.
    PortOpen(Proto, u16),
    /// A `port:` monitor's socket is not there.
    PortClosed(Proto, u16),
    /// Anything else, in words.
    Text(String),
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PortOpen(proto, port) => write!(f, "{proto} port {port} is open"),
            Self::PortClosed(proto, port) => {
                let how = match proto {
                    Proto::Tcp => "listening on",
                    Proto::Udp => "bound to",
                };
                write!(f, "no {proto} socket {how} port {port}")
            }
            Self::Text(text) => f.write_str(text),
        }
    }
}

impl From<String> for Reason {
    fn from(text: String) -> Self {
        Self::Text(text)
    }
}

impl From<&str> for Reason {
    fn from(text: &str) -> Self {
        Self::Text(text.to_owned())
    }
}

/// All results of one check of one app, in the order of its monitors.
#[derive(Debug, Clone)]
pub struct Report {
    pub app: AppName,
    /// The generation given in [`Command::Watch`]: results for a replaced app are ignored.
    pub generation: u64,
    pub results: Vec<MonitorResult>,
    /// A `port:tcp` monitor's port listens but refuses connections: its accept queue is full
    /// ([`port::SocketTable::accept_queue_full`]). Its monitor still passes (the port is open,
    /// as GoCast judged it); the lifecycle counts this for apps with passive health.
    pub stuck: Option<String>,
    /// Checked with `prove` ([`Command::Watch`]): each `port:tcp` monitor passed only if the
    /// service accepted a connection ([`port::prove_accepts`]).
    pub proved: bool,
}

/// Requests from the lifecycle.
#[derive(Debug)]
pub enum Command {
    /// Start (or restart, with new monitors) checking an app; it is checked at once.
    Watch {
        app: AppName,
        generation: u64,
        monitors: Vec<Monitor>,
        /// Prove that the service accepts: each `port:tcp` monitor connects and waits for the
        /// service to accept (after a passive-health failure, until the app is back).
        prove: bool,
    },
    Unwatch {
        app: AppName,
    },
    /// New settings (a config reload): the next tick follows the new interval.
    Configure(Settings),
}

/// Settings of the scheduler.
#[derive(Debug, Clone)]
pub struct Settings {
    pub interval: Duration,
    pub exec_timeout: Duration,
    /// The Consul health poller, when `consul_addr` is set: `consul` monitors read its last
    /// verdicts, so a check never waits on Consul (see [`crate::consul::health`]).
    pub consul: Option<ConsulHealth>,
}

/// How long a proof waits for the connection and then for the service to accept it.
pub const PROOF_TIMEOUT: Duration = Duration::from_secs(1);

/// How long after a destroy event its apps are re-checked. Events arriving meanwhile join the
/// same re-check, so a service closing its IPv4 and IPv6 listeners costs one snapshot, and a storm
/// of events re-checks an app at most once per this delay.
pub const RECHECK_DELAY: Duration = Duration::from_millis(10);

struct Watched {
    generation: u64,
    monitors: Vec<Monitor>,
    prove: bool,
    /// An exec check or a proof is running: skip this app's ticks until it reports.
    in_flight: bool,
}

/// The subscription to socket-destroy broadcasts.
enum Destroys {
    /// No app has a port monitor. Not subscribed: while anyone is, the kernel queues a message for
    /// every TCP and UDP socket freed in the network namespace.
    Off,
    /// Events from the watcher thread, already limited to monitored ports.
    On(mpsc::Receiver<Destroyed>),
    /// Subscribing failed or the watcher stopped (logged once): ticks only, from now on.
    Unavailable,
}

/// A multiset of keys that remembers whether its set of distinct keys changed.
#[derive(Debug)]
struct Refcounts<K> {
    counts: HashMap<K, usize>,
    changed: bool,
}

impl<K> Default for Refcounts<K> {
    fn default() -> Self {
        Self {
            counts: HashMap::new(),
            // A new scheduler publishes once, even an empty set.
            changed: true,
        }
    }
}

impl<K: std::hash::Hash + Eq> Refcounts<K> {
    fn count(&mut self, key: K, add: bool) {
        if add {
            let n = self.counts.entry(key).or_default();
            *n += 1;
            self.changed |= *n == 1;
        } else if let std::collections::hash_map::Entry::Occupied(mut n) = self.counts.entry(key) {
            *n.get_mut() -= 1;
            if *n.get() == 0 {
                n.remove();
                self.changed = true;
            }
        }
    }

    fn keys(&self) -> impl Iterator<Item = &K> {
        self.counts.keys()
    }

    /// Whether the distinct keys changed since the last call.
    fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }
}

/// The scheduler task's state: one per instance. Created by [`spawn`].
struct Scheduler {
    settings: Settings,
    apps: HashMap<AppName, Watched>,
    reports: mpsc::Sender<Report>,
    /// Exec checks say here that they finished (app, generation).
    done_tx: mpsc::UnboundedSender<(AppName, u64)>,
    metrics: Metrics,
    /// The ports some app monitors, for the watcher thread to filter on.
    ports: watch::Sender<WatchedPorts>,
    /// How many watched apps monitor each port, and each Consul service: kept as watches come
    /// and go, so a command costs O(its monitors), not a walk over every app (issue 14 §2).
    port_refs: Refcounts<(Proto, u16)>,
    consul_refs: Refcounts<String>,
    destroys: Destroys,
    /// Apps to re-check because a socket on a port they monitor went away. Apps whose exec check
    /// is running stay here until it reports.
    stale: HashSet<AppName>,
    /// When to re-check the stale apps; off while nothing is due.
    recheck: Timer,
}

/// Starts the scheduler under supervision ([`supervise::spawn`], task `monitor`); it stops when
/// `cancel` fires or the lifecycle drops the command sender.
///
/// The watches survive a restart of the scheduler: a small inbox task, outside the restarted
/// part, takes the lifecycle's commands, keeps the set of watched apps and forwards each command
/// to the scheduler of the moment; a new scheduler first gets every watch again (and so checks
/// every app at once). The lifecycle does not learn of the restart and re-sends nothing. The
/// inbox only records and forwards, so it has nothing that could fail.
pub fn spawn(
    settings: Settings,
    reports: mpsc::Sender<Report>,
    metrics: Metrics,
    cancel: &CancellationToken,
) -> (mpsc::UnboundedSender<Command>, Supervised) {
    // Unbounded: the lifecycle must never wait on the scheduler, which itself waits on the
    // lifecycle to take its reports. Its length is bounded by the number of apps anyway.
    let (tx, rx) = mpsc::unbounded_channel();
    let (instances_tx, instances) = mpsc::unbounded_channel();
    let stop = cancel.child_token();
    tokio::spawn(inbox(rx, instances, stop.clone()));
    let supervised = supervise::spawn("monitor", metrics.clone(), stop, move |cancel| {
        let (commands_tx, commands) = mpsc::unbounded_channel();
        // Only fails once the inbox is gone, that is at shutdown: the scheduler then ends too.
        let _ = instances_tx.send(commands_tx);
        let (done_tx, done) = mpsc::unbounded_channel();
        let scheduler = Scheduler {
            settings: settings.clone(),
            apps: HashMap::new(),
            reports: reports.clone(),
            done_tx,
            metrics: metrics.clone(),
            ports: watch::Sender::new(WatchedPorts::new()),
            port_refs: Refcounts::default(),
            consul_refs: Refcounts::default(),
            destroys: Destroys::Off,
            stale: HashSet::new(),
            recheck: Timer::default(),
        };
        scheduler.run(commands, done, cancel)
    });
    (tx, supervised)
}

/// Forwards the lifecycle's commands to the scheduler instance of the moment, and replays the
/// latest settings and every watch to a new instance (see [`spawn`]). Ends, stopping the scheduler, when the lifecycle
/// drops its sender.
async fn inbox(
    mut commands: mpsc::UnboundedReceiver<Command>,
    mut instances: mpsc::UnboundedReceiver<mpsc::UnboundedSender<Command>>,
    stop: CancellationToken,
) {
    let mut watched: HashMap<AppName, (u64, Vec<Monitor>, bool)> = HashMap::new();
    // The settings of the last reload, if any: a new instance starts with the original ones.
    let mut configured: Option<Settings> = None;
    let mut current: Option<mpsc::UnboundedSender<Command>> = None;
    loop {
        tokio::select! {
            // A new instance first, so it gets the replay before any later command.
            biased;
            () = stop.cancelled() => return,
            Some(instance) = instances.recv() => {
                if let Some(settings) = &configured {
                    let _ = instance.send(Command::Configure(settings.clone()));
                }
                for (app, (generation, monitors, prove)) in &watched {
                    let _ = instance.send(Command::Watch {
                        app: app.clone(),
                        generation: *generation,
                        monitors: monitors.clone(),
                        prove: *prove,
                    });
                }
                current = Some(instance);
            }
            cmd = commands.recv() => {
                let Some(cmd) = cmd else {
                    stop.cancel();
                    return;
                };
                match &cmd {
                    Command::Watch { app, generation, monitors, prove } => {
                        watched.insert(app.clone(), (*generation, monitors.clone(), *prove));
                    }
                    Command::Unwatch { app } => {
                        watched.remove(app);
                    }
                    Command::Configure(settings) => configured = Some(settings.clone()),
                }
                // A dead instance drops the command; the replay to the next one has it.
                if let Some(instance) = &current {
                    let _ = instance.send(cmd);
                }
            }
        }
    }
}

impl Scheduler {
    async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        mut done: mpsc::UnboundedReceiver<(AppName, u64)>,
        cancel: CancellationToken,
    ) {
        let mut ticker = tokio::time::interval(self.settings.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                cmd = commands.recv() => {
                    let Some(cmd) = cmd else { return };
                    // Take every command already queued (10,000 config apps arrive at once):
                    // one port sync and one socket-table snapshot serve them all.
                    let mut new_apps = Vec::new();
                    let interval = self.settings.interval;
                    self.apply(cmd, &mut new_apps);
                    while let Ok(cmd) = commands.try_recv() {
                        self.apply(cmd, &mut new_apps);
                    }
                    if self.settings.interval != interval {
                        ticker = tokio::time::interval_at(
                            tokio::time::Instant::now() + self.settings.interval,
                            self.settings.interval,
                        );
                        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    }
                    self.sync_ports();
                    self.sync_consul_services();
                    new_apps.retain(|a| self.apps.contains_key(a));
                    self.check(&new_apps).await;
                }
                Some((app, generation)) = done.recv() => {
                    if let Some(w) = self.apps.get_mut(&app).filter(|w| w.generation == generation) {
                        w.in_flight = false;
                        // A port it monitors closed while its exec check ran: re-check it now.
                        if self.stale.contains(&app) {
                            self.schedule_recheck();
                        }
                    }
                }
                event = next_destroyed(&mut self.destroys) => match event {
                    Some(event) => self.on_destroyed(event),
                    // The watcher thread stopped and logged why.
                    None => self.destroys = Destroys::Unavailable,
                },
                () = self.recheck.fired() => self.recheck_stale().await,
                _ = ticker.tick() => {
                    let due: Vec<AppName> = self.apps.iter().filter(|(_, w)| !w.in_flight).map(|(n, _)| n.clone()).collect();
                    self.check(&due).await;
                }
            }
        }
    }

    /// Records a watch or unwatch; new apps are checked by the caller, in one batch.
    fn apply(&mut self, cmd: Command, new_apps: &mut Vec<AppName>) {
        match cmd {
            Command::Watch {
                app,
                generation,
                monitors,
                prove,
            } => {
                self.count(&app, &monitors, true);
                let replaced = self.apps.insert(
                    app.clone(),
                    Watched {
                        generation,
                        monitors,
                        prove,
                        in_flight: false,
                    },
                );
                if let Some(old) = replaced {
                    self.count(&app, &old.monitors, false);
                }
                new_apps.push(app);
            }
            Command::Unwatch { app } => {
                if let Some(old) = self.apps.remove(&app) {
                    self.count(&app, &old.monitors, false);
                }
                self.stale.remove(&app);
            }
            Command::Configure(settings) => {
                self.settings = settings;
                // A reload may bring a new Consul link: it gets the services again.
                self.consul_refs.changed = true;
            }
        }
    }

    /// Counts an app's port and Consul monitors in (`add`) or out.
    fn count(&mut self, app: &AppName, monitors: &[Monitor], add: bool) {
        for monitor in monitors {
            match monitor {
                Monitor::Port { proto, port } => self.port_refs.count((*proto, *port), add),
                Monitor::Consul => self
                    .consul_refs
                    .count(consul_health::service_of(app).to_owned(), add),
                Monitor::Exec { .. } => {}
            }
        }
    }

    /// Publishes the monitored ports to the watcher thread, and subscribes to destroy broadcasts
    /// when the first port monitor appears (unsubscribes when the last one goes).
    fn sync_ports(&mut self) {
        if !self.port_refs.take_changed() {
            return;
        }
        let ports: WatchedPorts = self.port_refs.keys().copied().collect();
        let wanted = !ports.is_empty();
        self.ports.send_replace(ports);
        match (&self.destroys, wanted) {
            (Destroys::Off, true) => self.destroys = self.subscribe(),
            // Dropping the receiver ends the thread and its subscription.
            (Destroys::On(_), false) => self.destroys = Destroys::Off,
            _ => {}
        }
    }

    /// Tells the Consul health poller which services some app monitors with `consul`.
    fn sync_consul_services(&mut self) {
        let Some(link) = &self.settings.consul else {
            return;
        };
        if !self.consul_refs.take_changed() {
            return;
        }
        let services: std::collections::BTreeSet<String> =
            self.consul_refs.keys().cloned().collect();
        link.services.send_if_modified(|current| {
            if *current == services {
                return false;
            }
            *current = services;
            true
        });
    }

    /// Starts a [`DestroyWatcher`] in this thread's network namespace.
    fn subscribe(&self) -> Destroys {
        match DestroyWatcher::subscribe().and_then(|w| w.spawn(self.ports.subscribe())) {
            // The handle is for tests; dropping it detaches the thread.
            Ok((events, _thread)) => {
                debug!("subscribed to socket destroy broadcasts");
                Destroys::On(events)
            }
            Err(e) => {
                warn!(
                    error = error_chain(&e),
                    "cannot watch sockets close: port monitors see a closed port at the next monitor interval only"
                );
                Destroys::Unavailable
            }
        }
    }

    /// Marks the apps monitoring the destroyed socket's port (every app with a port monitor
    /// when events were lost) for a re-check.
    fn on_destroyed(&mut self, event: Destroyed) {
        let mut marked = false;
        for (name, w) in &self.apps {
            let hit = w.monitors.iter().any(|m| match (m, event) {
                (Monitor::Port { proto, port }, Destroyed::Port { proto: p, port: q }) => {
                    (*proto, *port) == (p, q)
                }
                (Monitor::Port { .. }, Destroyed::Lost) => true,
                _ => false,
            });
            if hit {
                self.stale.insert(name.clone());
                marked = true;
            }
        }
        if marked {
            self.schedule_recheck();
        }
    }

    /// Re-checks the stale apps [`RECHECK_DELAY`] from now, unless a re-check is already due.
    fn schedule_recheck(&mut self) {
        if self.recheck.deadline().is_none() {
            self.recheck.set(Some(RECHECK_DELAY));
        }
    }

    /// Checks the stale apps now, from a fresh snapshot; those with an exec check still running
    /// wait for it to report.
    async fn recheck_stale(&mut self) {
        let apps = &self.apps;
        let due: Vec<AppName> = self
            .stale
            .iter()
            .filter(|n| apps.get(*n).is_some_and(|w| !w.in_flight))
            .cloned()
            .collect();
        for name in &due {
            self.stale.remove(name);
        }
        self.check(&due).await;
    }

    /// Checks the given apps: port and consul monitors now from one snapshot, exec monitors in
    /// a task per app.
    async fn check(&mut self, names: &[AppName]) {
        let needs_table = names.iter().any(|n| {
            self.apps
                .get(n)
                .is_some_and(|w| w.monitors.iter().any(|m| matches!(m, Monitor::Port { .. })))
        });
        let started = Instant::now();
        let table = if needs_table {
            Some(
                tokio::task::spawn_blocking(SocketTable::snapshot)
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string())),
            )
        } else {
            None
        };
        let table_latency = started.elapsed();
        for name in names {
            let Some(w) = self.apps.get_mut(name) else {
                continue;
            };
            let listeners = |port| match &table {
                Some(Ok(t)) => t.listeners(port).to_vec(),
                _ => Vec::new(),
            };
            let pending = |m: &Monitor| match m {
                Monitor::Port { proto, port } => {
                    let result = port_result(table.as_ref(), *proto, *port, table_latency);
                    if w.prove && *proto == Proto::Tcp && result.ok {
                        Pending::Prove(*port, listeners(*port))
                    } else {
                        Pending::Ready(result)
                    }
                }
                Monitor::Consul => {
                    let verdict = match &self.settings.consul {
                        Some(link) => link.result(consul_health::service_of(name)),
                        None => consul_health::unconfigured(),
                    };
                    Pending::Ready(MonitorResult {
                        ok: verdict.ok,
                        reason: verdict.reason.into(),
                        at: SystemTime::now(),
                        latency: Duration::ZERO,
                    })
                }
                Monitor::Exec { command } => Pending::Exec(command.clone()),
            };
            // Every result known now (port and consul monitors): one allocation for the report,
            // none for a list of pending runs.
            let ready: Option<Vec<MonitorResult>> =
                w.monitors.iter().map(|m| pending(m).ready()).collect();
            let report = Report {
                app: name.clone(),
                generation: w.generation,
                results: Vec::new(),
                stuck: table
                    .as_ref()
                    .and_then(|t| stuck(t.as_ref().ok()?, &w.monitors)),
                proved: w.prove,
            };
            if let Some(results) = ready {
                observe(&self.metrics, &w.monitors, &results);
                // A closed inbox means the lifecycle is gone: shutting down, nothing to do.
                let _ = self.reports.send(Report { results, ..report }).await;
                continue;
            }
            let pending: Vec<Pending> = w.monitors.iter().map(pending).collect();
            w.in_flight = true;
            let monitors = w.monitors.clone();
            let timeout = self.settings.exec_timeout;
            let (reports, done, metrics) = (
                self.reports.clone(),
                self.done_tx.clone(),
                self.metrics.clone(),
            );
            tokio::spawn(async move {
                let runs = pending.into_iter().map(|p| p.run(timeout));
                let results = futures::future::join_all(runs).await;
                observe(&metrics, &monitors, &results);
                let generation = report.generation;
                let app = report.app.clone();
                let _ = reports.send(Report { results, ..report }).await;
                let _ = done.send((app, generation));
            });
        }
    }
}

/// The next destroy event; pending forever when not subscribed, `None` once the watcher stopped.
async fn next_destroyed(destroys: &mut Destroys) -> Option<Destroyed> {
    match destroys {
        Destroys::On(events) => events.recv().await,
        Destroys::Off | Destroys::Unavailable => std::future::pending().await,
    }
}

/// A monitor's result, known now or still to be run.
enum Pending {
    Ready(MonitorResult),
    Exec(String),
    /// A connection to the listeners of this TCP port, to be accepted.
    Prove(u16, Vec<port::Listener>),
}

impl Pending {
    fn ready(self) -> Option<MonitorResult> {
        match self {
            Self::Ready(r) => Some(r),
            Self::Exec(_) | Self::Prove(..) => None,
        }
    }

    /// The result, running what is still to be run (an exec check bounded by `timeout`).
    async fn run(self, timeout: Duration) -> MonitorResult {
        let started = Instant::now();
        let verdict = match self {
            Self::Ready(r) => return r,
            Self::Prove(port, listeners) => tokio::task::spawn_blocking(move || {
                port::prove_accepts(&listeners, port, PROOF_TIMEOUT)
            })
            .await
            .unwrap_or_else(|e| Err(format!("tcp port {port}: proof failed: {e}"))),
            Self::Exec(command) => exec::run(&command, timeout)
                .await
                .map(|()| "exit status 0".to_owned()),
        };
        let latency = started.elapsed();
        let (ok, reason) = match verdict {
            Ok(reason) => (true, reason),
            Err(reason) => (false, reason),
        };
        MonitorResult {
            ok,
            reason: reason.into(),
            at: SystemTime::now(),
            latency,
        }
    }
}

/// Why a `port:tcp` monitor's listener refuses connections, if one does.
fn stuck(table: &SocketTable, monitors: &[Monitor]) -> Option<String> {
    monitors.iter().find_map(|m| match m {
        Monitor::Port {
            proto: Proto::Tcp,
            port,
        } => table.accept_queue_full(*port),
        _ => None,
    })
}

fn observe(metrics: &Metrics, monitors: &[Monitor], results: &[MonitorResult]) {
    for (m, r) in monitors.iter().zip(results) {
        metrics.monitor_observed(m.kind(), r.latency, r.ok);
    }
}

fn port_result(
    table: Option<&Result<SocketTable, String>>,
    proto: crate::app::Proto,
    port: u16,
    latency: Duration,
) -> MonitorResult {
    let (ok, reason) = match table {
        Some(Ok(t)) if t.is_open(proto, port) => (true, Reason::PortOpen(proto, port)),
        Some(Ok(_)) => (false, Reason::PortClosed(proto, port)),
        Some(Err(e)) => (false, format!("cannot read the socket table: {e}").into()),
        None => (false, "internal: socket table not read".into()),
    };
    MonitorResult {
        ok,
        reason,
        at: SystemTime::now(),
        latency,
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;
    use crate::testing::in_new_netns;

    fn settings() -> Settings {
        Settings {
            interval: Duration::from_millis(50),
            exec_timeout: Duration::from_secs(5),
            consul: None,
        }
    }

    async fn next(rx: &mut mpsc::Receiver<Report>) -> Report {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("a report in time")
            .expect("scheduler alive")
    }

    #[tokio::test]
    async fn a_watched_app_is_checked_at_once_and_then_every_interval() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, mut rx) = mpsc::channel(16);
        let cancel = CancellationToken::new();
        let (cmds, _scheduler) = spawn(settings(), tx, Metrics::default(), &cancel);
        let app: AppName = "web".parse().unwrap();
        let monitors = vec![
            format!("port:tcp:{port}").parse().unwrap(),
            "exec:true".parse().unwrap(),
        ];
        cmds.send(Command::Watch {
            app: app.clone(),
            generation: 7,
            monitors,
            prove: false,
        })
        .unwrap();
        let r = next(&mut rx).await;
        assert_eq!((r.app.as_str(), r.generation), ("web", 7));
        assert!(r.results.iter().all(|m| m.ok), "{r:?}");
        drop(listener);
        let r = loop {
            let r = next(&mut rx).await;
            if !r.results[0].ok {
                break r;
            }
        };
        assert!(
            r.results[0]
                .reason
                .to_string()
                .contains("no tcp socket listening"),
            "{r:?}"
        );
        assert!(r.results[1].ok);
        cancel.cancel();
    }

    #[tokio::test]
    async fn a_slow_exec_check_does_not_delay_other_apps() {
        let (tx, mut rx) = mpsc::channel(64);
        let cancel = CancellationToken::new();
        let (cmds, _scheduler) = spawn(settings(), tx, Metrics::default(), &cancel);
        let slow: AppName = "slow".parse().unwrap();
        let fast: AppName = "fast".parse().unwrap();
        cmds.send(Command::Watch {
            app: slow.clone(),
            generation: 1,
            monitors: vec!["exec:sleep 2".parse().unwrap()],
            prove: false,
        })
        .unwrap();
        cmds.send(Command::Watch {
            app: fast.clone(),
            generation: 1,
            monitors: vec!["exec:true".parse().unwrap()],
            prove: false,
        })
        .unwrap();
        let mut fast_reports = 0;
        while fast_reports < 5 {
            let r = next(&mut rx).await;
            assert_eq!(r.app, fast, "the slow app cannot have reported yet");
            fast_reports += 1;
        }
        cancel.cancel();
    }

    #[tokio::test]
    async fn consul_monitor_without_consul_addr_fails_and_says_why() {
        let (tx, mut rx) = mpsc::channel(16);
        let cancel = CancellationToken::new();
        let (cmds, _scheduler) = spawn(settings(), tx, Metrics::default(), &cancel);
        cmds.send(Command::Watch {
            app: "c".parse().unwrap(),
            generation: 1,
            monitors: vec![Monitor::Consul],
            prove: false,
        })
        .unwrap();
        let r = next(&mut rx).await;
        assert!(!r.results[0].ok && r.results[0].reason.to_string().contains("consul_addr"));
        cancel.cancel();
    }

    #[tokio::test]
    async fn consul_monitor_reads_the_pollers_verdict_and_names_its_services() {
        use crate::consul::health::{HealthView, Verdict};
        let (view_tx, view_rx) = watch::channel(HealthView::new(Duration::from_secs(30)));
        let (services_tx, mut services_rx) = watch::channel(std::collections::BTreeSet::new());
        let mut s = settings();
        s.consul = Some(ConsulHealth {
            view: view_rx,
            services: services_tx,
        });
        let (tx, mut rx) = mpsc::channel(16);
        let cancel = CancellationToken::new();
        let (cmds, _scheduler) = spawn(s, tx, Metrics::default(), &cancel);
        cmds.send(Command::Watch {
            app: "web".parse().unwrap(),
            generation: 1,
            monitors: vec![Monitor::Consul],
            prove: false,
        })
        .unwrap();
        let r = next(&mut rx).await;
        assert!(!r.results[0].ok && r.results[0].reason.to_string().contains("first answer"));
        services_rx.changed().await.unwrap();
        assert!(services_rx.borrow_and_update().contains("web"));
        view_tx.send_modify(|v| {
            let verdict = Verdict {
                ok: true,
                reason: "1 Consul check(s) passing".into(),
            };
            v.answered("web", verdict, tokio::time::Instant::now());
        });
        loop {
            let r = next(&mut rx).await;
            if r.results[0].ok {
                assert!(r.results[0].reason.to_string().contains("passing"));
                break;
            }
        }
        cmds.send(Command::Unwatch {
            app: "web".parse().unwrap(),
        })
        .unwrap();
        services_rx.changed().await.unwrap();
        assert!(services_rx.borrow().is_empty());
        cancel.cancel();
    }

    #[tokio::test]
    async fn a_new_scheduler_instance_gets_every_watch_again_then_later_commands() {
        let (tx, rx) = mpsc::unbounded_channel();
        let (instances_tx, instances) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let inbox = tokio::spawn(inbox(rx, instances, stop.clone()));
        let watch = |name: &str, generation| Command::Watch {
            app: name.parse().unwrap(),
            generation,
            monitors: vec!["exec:true".parse().unwrap()],
            prove: false,
        };
        let (first_tx, mut first) = mpsc::unbounded_channel();
        instances_tx.send(first_tx).unwrap();
        tx.send(watch("a", 1)).unwrap();
        tx.send(watch("b", 1)).unwrap();
        tx.send(watch("a", 2)).unwrap();
        tx.send(Command::Unwatch {
            app: "b".parse().unwrap(),
        })
        .unwrap();
        for _ in 0..4 {
            assert!(first.recv().await.is_some());
        }
        // The first instance died; the second gets what is watched now: a at generation 2.
        drop(first);
        let (second_tx, mut second) = mpsc::unbounded_channel();
        instances_tx.send(second_tx).unwrap();
        tx.send(watch("c", 1)).unwrap();
        let got: Vec<(String, u64)> = [second.recv().await, second.recv().await]
            .into_iter()
            .map(|c| match c {
                Some(Command::Watch {
                    app, generation, ..
                }) => (app.to_string(), generation),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(got, [("a".to_owned(), 2), ("c".to_owned(), 1)]);
        // The lifecycle dropping its sender stops the scheduler.
        drop(tx);
        inbox.await.unwrap();
        assert!(stop.is_cancelled());
    }

    /// A scheduler whose ticks are too far apart to matter, watching a port monitor on a fresh
    /// listener; returns after the first (healthy) report.
    async fn watching_a_listener() -> (
        TcpListener,
        mpsc::Receiver<Report>,
        mpsc::UnboundedSender<Command>,
        CancellationToken,
    ) {
        // `lo` comes up; connections need it.
        crate::netlink::Netlink::new().await.expect("set lo up");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let settings = Settings {
            interval: Duration::from_secs(10),
            exec_timeout: Duration::from_secs(5),
            consul: None,
        };
        let (tx, mut rx) = mpsc::channel(16);
        let cancel = CancellationToken::new();
        let (cmds, _scheduler) = spawn(settings, tx, Metrics::default(), &cancel);
        cmds.send(Command::Watch {
            app: "web".parse().unwrap(),
            generation: 1,
            monitors: vec![format!("port:tcp:{port}").parse().unwrap()],
            prove: false,
        })
        .unwrap();
        assert!(next(&mut rx).await.results[0].ok);
        // The first tick comes at once and may report too.
        while let Ok(r) = tokio::time::timeout(Duration::from_millis(100), rx.recv()).await {
            assert!(r.expect("scheduler alive").results[0].ok);
        }
        (listener, rx, cmds, cancel)
    }

    /// Waits for the report saying the port closed; panics after `within`.
    async fn failing_within(rx: &mut mpsc::Receiver<Report>, within: Duration) -> Report {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let r = tokio::time::timeout_at(deadline, rx.recv())
                .await
                .unwrap_or_else(|_| panic!("no failing report within {within:?}"))
                .expect("scheduler alive");
            if !r.results[0].ok {
                return r;
            }
        }
    }

    #[test]
    fn a_closed_listener_is_reported_long_before_the_next_tick() {
        in_new_netns(|| async {
            let (listener, mut rx, _cmds, cancel) = watching_a_listener().await;
            drop(listener);
            let r = failing_within(&mut rx, Duration::from_millis(200)).await;
            assert!(
                r.results[0]
                    .reason
                    .to_string()
                    .contains("no tcp socket listening"),
                "{r:?}"
            );
            cancel.cancel();
        });
    }

    #[test]
    fn connections_closing_on_a_monitored_port_cause_no_recheck() {
        in_new_netns(|| async {
            let (listener, mut rx, _cmds, cancel) = watching_a_listener().await;
            let addr = listener.local_addr().unwrap();
            // 200 broadcasts: well within the watcher's receive queue, even if its thread is slow.
            for i in 0..100 {
                let client = std::net::TcpStream::connect(addr).unwrap();
                let (server, _) = listener.accept().unwrap();
                if i % 2 == 0 {
                    // Aborted (RST): the kernel zeroes the peer port, not the peer address.
                    socket2::SockRef::from(&server)
                        .set_linger(Some(Duration::ZERO))
                        .unwrap();
                }
                drop((server, client));
            }
            let r = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await;
            assert!(r.is_err(), "connections closing caused a check: {r:?}");
            // The watcher was listening all along.
            drop(listener);
            failing_within(&mut rx, Duration::from_millis(200)).await;
            cancel.cancel();
        });
    }
}
