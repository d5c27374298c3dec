//! The running agent: wires every task together (API, lifecycle, monitors, BGP speaker, stats,
//! Consul), supervises them ([`crate::supervise`]), tells systemd how it goes
//! ([`crate::systemd`]), reloads the config on `SIGHUP` or `POST /reload` ([`crate::reload`]),
//! and runs the shutdown sequence on `SIGTERM`/`SIGINT`. The binary (`main.rs`) parses the
//! command line and calls [`run`]; tests start the binary.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::{
    api::{self, ApiState, StaticInfo},
    bgp::{Peers, Speaker, fsm::State},
    config::{Config, DataplaneMode},
    consul,
    host::SystemHost,
    lifecycle, messages,
    messages::LifecycleHandle,
    metrics::Metrics,
    monitor,
    reload::{self, ReloadError, ReloadHandle, ReloadReport},
    stats,
    store::Store,
    supervise::{self, Health, Supervised, TaskStatus},
    systemd,
};

/// Sets the log filter (`tracing` `EnvFilter` syntax) of the running process; `None` when the
/// command line or `RUST_LOG` fixed it, which then wins over `agent.log_level`.
pub type LogFilter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// The whole shutdown (API, withdraw, VIPs, NAT) must finish within 5 s; this leaves margin.
const SHUTDOWN_BUDGET: Duration = Duration::from_millis(4500);
/// Time given to in-flight HTTP requests when shutdown starts.
const API_DRAIN: Duration = Duration::from_millis(500);
/// How long a start that fails after the BGP sessions began, or an agent whose lifecycle failed,
/// waits for the sessions to close with Cease.
const ABORTED_START_CEASE: Duration = Duration::from_secs(1);
/// The `STATUS=` line changes at most this often.
const STATUS_EVERY: Duration = Duration::from_secs(1);
/// How long after the first reconcile the start-up's code is paged out: the config's apps
/// are checked, installed and announced by then (`monitor_rise` ticks).
const PAGE_OUT_AFTER: Duration = Duration::from_secs(10);
/// How often freed heap pages go back to the kernel after that: glibc returns only the top of
/// each arena by itself, and the steady state (checks, `/stats` samples, API calls, bursts of
/// registrations) frees pages in the middle that it would keep resident (docs/benchmarks.md,
/// "### Memory").
const TRIM_EVERY: Duration = Duration::from_secs(60);

/// Runs the agent until SIGTERM or SIGINT, then shuts down cleanly; SIGHUP reloads the config
/// file at `path` and never ends the agent.
///
/// If the lifecycle task dies or stops turning, nothing can withdraw routes one by one or take
/// VIPs off `lo` any more: the agent closes the BGP sessions (Cease: the peers drop every route
/// at once) and returns an error, so the binary exits 1 and systemd restarts it; the next start
/// removes the VIPs and NAT rules left behind.
#[expect(
    clippy::too_many_lines,
    reason = "the start-up order is the point: every task, in the order it must start, in one place"
)]
pub async fn run(config: Config, path: PathBuf, log: Option<LogFilter>) -> Result<()> {
    let listen = prepare(&config, log.as_ref())?;
    // Signals first: one arriving during start-up must still lead to a clean shutdown.
    let mut signals = Signals::install()?;
    // Before anything opens a descriptor: the API's cap is sized from this limit.
    let nofile = crate::serve::raise_nofile_limit();
    let auth = api_auth(&config)?;
    // Bind before touching the host, so a taken port changes nothing.
    let sockets = bind_api(&config, listen.addr).await?;
    let cap = crate::serve::connection_cap(config.agent.api.max_connections, nofile);
    let metrics = Metrics::default();
    let cancel = CancellationToken::new();
    let agent = &config.agent;
    let consul_client = consul_client(&config, &metrics)?;
    let (routes_tx, routes_rx) = tokio::sync::watch::channel(messages::Routes::default());
    let (speaker, announcer, host) = start_bgp_and_host(&config, routes_rx, &metrics).await?;
    // The lifecycle owns the Announcer; this copy of its stop lets the agent still close the
    // sessions with Cease when the lifecycle itself has failed.
    let stop_bgp = announcer.stop.clone();
    let dataplane = host.dataplane_info();
    metrics.dataplane(&dataplane);
    let counters = host.counter_reader();
    let counters_present = counters.is_some();
    if counters.is_none() && config.apps.iter().any(|a| a.passive_health) {
        warn!(
            dataplane = dataplane.mode,
            "passive_health is set on apps but needs the eBPF counters: it has no effect"
        );
    }
    // Every supervised task whose being down /healthz reports.
    let mut tasks = Vec::new();
    let mut consul = Consul::new(&cancel, &metrics);
    tasks.extend(consul.start_health(consul_client.clone()));
    let settings = lifecycle_settings(
        agent,
        &config.bgp.peers,
        consul.health.clone(),
        counters_present,
        config.dataplane.passive_health.window,
    );
    let store = Store::new(&agent.state_file);
    let (owners_tx, owners_rx) = tokio::sync::watch::channel(messages::Owners::default());
    let status_owners = owners_tx.subscribe();
    let mut running = lifecycle::spawn(
        settings,
        host,
        config.apps.clone(),
        store,
        lifecycle::Outputs {
            routes: routes_tx,
            owners: owners_tx,
            announcer: Some(announcer),
            metrics: metrics.clone(),
        },
        cancel.clone(),
    );
    tasks.push(running.monitors.clone());
    let snapshots = counters.map(|reader| {
        supervise_stats(
            reader, owners_rx, &running, &config, &metrics, &cancel, &mut tasks,
        )
    });
    tasks.extend(consul.start_discovery(consul_client, &running.handle));
    let (app_count, peer_count) = (config.apps.len(), config.bgp.peers.len());
    // The reloader keeps the one copy of the config the agent still needs (to diff a reload
    // against): with thousands of apps a second copy here would stay resident for good.
    let reloader = reload::spawn(
        path,
        config,
        Reloadable {
            lifecycle: running.handle.clone(),
            speaker: speaker.clone(),
            metrics: metrics.clone(),
            passive_health: counters_present,
            consul,
            log,
        },
    );
    let peers = speaker.peers();
    let state = ApiState {
        lifecycle: running.handle.clone(),
        routes: running.routes.clone(),
        stats: snapshots,
        metrics: metrics.clone(),
        info: Arc::new(StaticInfo {
            version: env!("CARGO_PKG_VERSION"),
            dataplane,
        }),
        peers: peers.clone(),
        reload: Some(reloader.clone()),
        health: health(&running, tasks, &peers),
    };
    info!(addr = %listen, apps = app_count, peers = peer_count, "gocast running");
    let api_stop = CancellationToken::new();
    let router = crate::auth::guard(api::router(state), auth);
    let server = serve_api(sockets, router, cap, &metrics, api_stop.clone());
    let summary = Summary {
        owners: status_owners,
        routes: running.routes.clone(),
        peers: peers.clone(),
    };
    spawn_notifications(running.ready, summary, &cancel);

    let stopped = tokio::select! {
        signal = signals.recv(&reloader) => Ok(signal),
        failure = supervise::lifecycle_failure(&mut running.task, &running.pulse) => Err(failure),
    };
    systemd::notify_stopping();
    let Ok(signal) = stopped else {
        let failure = stopped.unwrap_err();
        return abandon(&failure, api_stop, server.done, &peers, stop_bgp, cancel).await;
    };
    info!(%signal, "shutting down");
    shutdown(api_stop, server.done, &speaker, cancel, running.task).await
}

/// Applies `agent.log_level` and warns about an API open to every interface; returns the API
/// address.
fn prepare(config: &Config, log: Option<&LogFilter>) -> Result<crate::config::ListenAddr> {
    if let (Some(set), Some(filter)) = (log, &config.agent.log_level) {
        set(filter).map_err(|e| anyhow::anyhow!("agent.log_level: {e}"))?;
    }
    let listen = config.agent.listen_addr;
    if listen.all_interfaces {
        warn!(addr = %listen, "the HTTP API listens on all interfaces: anyone who can reach it can register VIPs");
    }
    Ok(listen)
}

/// What `/healthz` checks: the lifecycle's heartbeat, the supervised `tasks` and the BGP
/// speaker's supervised sessions.
fn health(running: &lifecycle::Running, tasks: Vec<TaskStatus>, peers: &Peers) -> Health {
    let peers = peers.clone();
    let sessions: supervise::Check = Arc::new(move || {
        peers
            .down_sessions()
            .into_iter()
            .map(|d| format!("bgp session {} is down (restarting): {}", d.peer, d.reason))
            .collect()
    });
    Health::new(running.pulse.clone(), tasks, vec![sessions])
}

/// The stats sampler under supervision (task `stats`): the reads for `/stats`, whose snapshots
/// are also exported at `/metrics`.
fn supervise_stats(
    reader: crate::dataplane::ebpf::CounterReader,
    owners: tokio::sync::watch::Receiver<messages::Owners>,
    running: &lifecycle::Running,
    config: &Config,
    metrics: &Metrics,
    cancel: &CancellationToken,
    tasks: &mut Vec<TaskStatus>,
) -> stats::Stats {
    let (reads, sampler) = stats::sampler(
        reader,
        owners,
        running.handle.clone(),
        config.dataplane.passive_health,
    );
    let stats = supervise::spawn("stats", metrics.clone(), cancel.clone(), move |cancel| {
        sampler.run(cancel)
    });
    tasks.push(stats.status);
    metrics.vip_stats(stats::counter_source(reads.snapshots()));
    reads
}

/// Serves the API under supervision (task `api`): a server that fails is started again on the
/// same sockets, under the same connection cap.
fn serve_api(
    sockets: crate::serve::Sockets,
    router: axum::Router,
    cap: usize,
    metrics: &Metrics,
    stop: CancellationToken,
) -> Supervised {
    info!(max_connections = cap, "API connection cap");
    let sockets = Arc::new(sockets);
    let cap = Arc::new(tokio::sync::Semaphore::new(cap));
    supervise::spawn("api", metrics.clone(), stop, move |stop| {
        let sockets = sockets.clone();
        let router = router.clone();
        let cap = cap.clone();
        async move { sockets.serve(router, cap, stop).await }
    })
}

/// The API's token (`GOCAST_API_TOKEN_FILE` wins over `agent.api_token_file`), read once: a
/// change needs a restart.
fn api_auth(config: &Config) -> Result<crate::auth::Auth> {
    let path = std::env::var_os("GOCAST_API_TOKEN_FILE")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| config.agent.api.token_file.clone());
    let token = path
        .map(|p| crate::auth::Token::load(&p))
        .transpose()
        .context("agent.api_token_file")?;
    if token.is_none() && config.agent.api.auth == crate::auth::AuthScope::All {
        warn!("agent.api_auth is all but no token is set: the API is open");
    }
    Ok(crate::auth::Auth {
        token,
        scope: config.agent.api.auth,
    })
}

/// The TCP socket and, with `agent.listen_unix`, the Unix one.
async fn bind_api(config: &Config, addr: SocketAddr) -> Result<crate::serve::Sockets> {
    use crate::serve::ApiListener;
    let tcp = bind(addr)
        .await?
        .into_std()
        .context("taking the API socket for its supervisor")?;
    let mut listeners = vec![ApiListener::Tcp(tcp)];
    let api = &config.agent.api;
    if let Some(path) = &api.listen_unix {
        let unix = crate::serve::bind_unix(path, api.unix_mode, api.unix_group.as_deref())
            .context("agent.listen_unix")?;
        info!(path = %path.display(), mode = format_args!("{:04o}", api.unix_mode), "the API also listens on a Unix socket");
        listeners.push(ApiListener::Unix(unix));
    }
    Ok(crate::serve::Sockets::new(listeners))
}

/// Under systemd: `READY=1` after the first reconcile, `STATUS=` as the summary changes.
fn spawn_notifications(
    ready: tokio::sync::oneshot::Receiver<()>,
    summary: Summary,
    cancel: &CancellationToken,
) {
    let systemd = systemd::enabled();
    tokio::spawn(after_ready(ready, systemd, cancel.child_token()));
    if systemd {
        tokio::spawn(report_status(summary, cancel.child_token()));
    }
}

/// Once the lifecycle has done its first reconcile: `READY=1` under systemd, and
/// [`PAGE_OUT_AFTER`] later the start-up's code pages go back to the kernel; from then on, free
/// heap pages every [`TRIM_EVERY`].
async fn after_ready(
    ready: tokio::sync::oneshot::Receiver<()>,
    systemd: bool,
    cancel: CancellationToken,
) {
    // An error: the lifecycle ended before it was ready; the agent is failing anyway.
    if ready.await.is_err() {
        return;
    }
    if systemd {
        info!("start-up reconcile done: ready");
        systemd::notify_ready();
    }
    tokio::select! {
        () = cancel.cancelled() => return,
        () = tokio::time::sleep(PAGE_OUT_AFTER) => page_out_start_up(),
    }
    let mut trim = tokio::time::interval_at(tokio::time::Instant::now() + TRIM_EVERY, TRIM_EVERY);
    trim.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = trim.tick() => gocast_common::heap::trim(),
        }
    }
}

/// Gives back the pages only the start needed: the binary's code (the steady state faults back
/// the little it runs, docs/benchmarks.md "### Memory") and freed heap.
fn page_out_start_up() {
    match gocast_common::code::page_out() {
        Ok(bytes) => debug!(bytes, "start-up code paged out"),
        Err(e) => debug!(error = %e, "cannot page out the start-up code"),
    }
    gocast_common::heap::trim();
}

/// What the `STATUS=` line summarizes.
struct Summary {
    owners: tokio::sync::watch::Receiver<messages::Owners>,
    routes: tokio::sync::watch::Receiver<messages::Routes>,
    peers: Peers,
}

impl Summary {
    /// E.g. `12 apps, 10 announced, 2/2 peers established`.
    fn line(&self) -> String {
        let apps = self.owners.borrow().len();
        let announced = self.routes.borrow().len();
        let peers = self.peers.statuses();
        let up = peers
            .iter()
            .filter(|p| p.state == State::Established)
            .count();
        status_line(apps, announced, up, peers.len())
    }
}

fn status_line(apps: usize, announced: usize, established: usize, peers: usize) -> String {
    let apps = match apps {
        1 => "1 app".to_owned(),
        n => format!("{n} apps"),
    };
    if peers == 0 {
        return format!("{apps}, {announced} routes computed, no BGP peer configured");
    }
    format!("{apps}, {announced} announced, {established}/{peers} peers established")
}

/// Tells systemd the summary line when it changes, at most once a second.
async fn report_status(summary: Summary, cancel: CancellationToken) {
    let mut last = String::new();
    let mut tick = tokio::time::interval(STATUS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while cancel.run_until_cancelled(tick.tick()).await.is_some() {
        let line = summary.line();
        if line != last {
            systemd::notify_status(&line);
            last = line;
        }
    }
}

/// The lifecycle failed: stop the API and the other tasks, close the BGP sessions with Cease
/// (bounded), leave VIPs and NAT to the next start's clean-up, and fail.
async fn abandon(
    failure: &str,
    api_stop: CancellationToken,
    server: tokio::task::JoinHandle<()>,
    peers: &Peers,
    stop_bgp: CancellationToken,
    cancel: CancellationToken,
) -> Result<()> {
    error!(
        reason = %failure,
        "the lifecycle failed: closing the BGP sessions and exiting, so the service manager restarts the agent"
    );
    systemd::notify_status(&format!("lifecycle failed: {failure}; exiting"));
    api_stop.cancel();
    cancel.cancel();
    stop_bgp.cancel();
    // A session leaves Established only after its Cease went out.
    let closed = async {
        while peers
            .statuses()
            .iter()
            .any(|s| s.state == State::Established)
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    if tokio::time::timeout(ABORTED_START_CEASE, closed)
        .await
        .is_err()
    {
        warn!("BGP sessions did not close within {ABORTED_START_CEASE:?}");
    } else {
        info!("BGP sessions closed: the peers have dropped this host's routes");
    }
    if tokio::time::timeout(API_DRAIN, server).await.is_err() {
        warn!("HTTP requests still open after {API_DRAIN:?}; closing them");
    }
    Err(anyhow::anyhow!("the lifecycle failed: {failure}"))
}

/// The BGP speaker, then the host. BGP first: sessions come up while the eBPF programs load and
/// verify, and nothing is announced before the lifecycle runs. A host that cannot be prepared
/// closes the sessions again (Cease) before the error returns.
async fn start_bgp_and_host(
    config: &Config,
    routes: tokio::sync::watch::Receiver<messages::Routes>,
    metrics: &Metrics,
) -> Result<(Speaker, messages::Announcer, SystemHost)> {
    let (speaker, announcer) = start_speaker(config, routes, metrics).await?;
    match start_host(config).await {
        Ok(host) => Ok((speaker, announcer, host)),
        Err(e) => {
            announcer.stop.cancel();
            let _ = tokio::time::timeout(ABORTED_START_CEASE, announcer.done).await;
            Err(e)
        }
    }
}

/// The BGP speaker. Without peers it announces nothing until a reload adds one.
async fn start_speaker(
    config: &Config,
    routes: tokio::sync::watch::Receiver<messages::Routes>,
    metrics: &Metrics,
) -> Result<(Speaker, messages::Announcer)> {
    if config.bgp.peers.is_empty() {
        warn!("no bgp peers configured: routes are computed (GET /routes) but not announced");
    }
    Speaker::start(&config.bgp, routes, metrics)
        .await
        .context("starting the BGP speaker")
}

/// What the lifecycle applies, from the config.
fn lifecycle_settings(
    agent: &crate::config::AgentConfig,
    peers: &[crate::config::PeerConfig],
    consul_health: Option<consul::HealthLink>,
    passive_health: bool,
    passive_window: std::time::Duration,
) -> lifecycle::Settings {
    lifecycle::Settings {
        monitor_rise: agent.monitor_rise,
        monitor_fall: agent.monitor_fall,
        cleanup_timer: agent.cleanup_timer,
        allow_http_exec: agent.allow_http_exec,
        vip_allowlist: agent.vip_allowlist.clone(),
        drain_time: agent.drain_time,
        monitor: monitor::Settings {
            interval: agent.monitor_interval,
            exec_timeout: agent.exec_timeout,
            consul: consul_health,
        },
        passive_health,
        passive_window,
        protected: protected_addresses(peers),
    }
}

/// The configured addresses no VIP may cover: each peer's address, next hop and local
/// addresses (docs/security.md, "Safe VIPs").
fn protected_addresses(peers: &[crate::config::PeerConfig]) -> Vec<lifecycle::Protected> {
    let mut protected = Vec::new();
    for p in peers {
        let peer = |what: &str| match p.peer_ip {
            Some(ip) => format!("{what} of BGP peer {ip}"),
            None => format!("{what} of the autodiscovered BGP peer"),
        };
        if let Some(ip) = p.peer_ip {
            protected.push(lifecycle::Protected::new(ip, "the BGP peer"));
        }
        if let Some(ip) = p.next_hop {
            protected.push(lifecycle::Protected::new(ip.into(), peer("the next hop")));
        }
        if let Some(ip) = p.local_ip {
            protected.push(lifecycle::Protected::new(ip, peer("the local address")));
        }
        if let Some(ip) = p.local_ipv6 {
            protected.push(lifecycle::Protected::new(
                ip.into(),
                peer("the local IPv6 address"),
            ));
        }
    }
    protected
}

/// Connects to the kernel and loads the dataplane, naming the dataplane in any error.
async fn start_host(config: &Config) -> Result<SystemHost> {
    SystemHost::start(config).await.with_context(|| {
        let dataplane = match config.dataplane.mode {
            DataplaneMode::Ebpf => "eBPF dataplane (dataplane.mode: ebpf)",
            DataplaneMode::Auto => "dataplane",
            DataplaneMode::Iptables => "iptables",
        };
        format!("preparing the host (netlink, {dataplane})")
    })
}

/// The Consul client, built (token, `CONSUL_CACERT`) before anything runs, so a bad
/// certificate file stops the start with a clear error.
fn consul_client(config: &Config, metrics: &Metrics) -> Result<Option<consul::Client>> {
    let agent = &config.agent;
    let Some(c) = &agent.consul else {
        return Ok(None);
    };
    let settings = consul::Settings::new(c, agent.monitor_interval, |k| std::env::var(k).ok())
        .context("setting up Consul")?;
    Ok(Some(
        consul::Client::new(settings, metrics.clone()).context("setting up Consul")?,
    ))
}

/// The shutdown sequence, in one place: stop the API; with `graceful_shutdown`, let the peers
/// move traffic away first; then the lifecycle withdraws every route, the sessions close with
/// Cease, and VIPs and NAT go. Each step is bounded and logged.
async fn shutdown(
    api_stop: CancellationToken,
    server: tokio::task::JoinHandle<()>,
    speaker: &Speaker,
    lifecycle: CancellationToken,
    lifecycle_task: tokio::task::JoinHandle<()>,
) -> Result<()> {
    api_stop.cancel();
    if tokio::time::timeout(API_DRAIN, server).await.is_err() {
        warn!("HTTP requests still open after {API_DRAIN:?}; closing them");
    }
    let graceful = speaker.graceful_wait();
    speaker.graceful_shutdown().await;
    let budget = SHUTDOWN_BUDGET.saturating_sub(API_DRAIN);
    lifecycle.cancel();
    match tokio::time::timeout(budget, lifecycle_task).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(anyhow::anyhow!("lifecycle task failed: {e}")),
        Err(_) => Err(anyhow::anyhow!(
            "shutdown did not finish within {:?}",
            budget + API_DRAIN + graceful
        )),
    }
}

/// SIGTERM, SIGINT and SIGHUP, registered as soon as the agent starts (SIGHUP's default action
/// would end the agent).
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            hup: signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
        })
    }

    /// Waits for SIGTERM or SIGINT and names it; each SIGHUP meanwhile reloads the config
    /// (the reloader logs the outcome).
    async fn recv(&mut self, reloader: &ReloadHandle) -> &'static str {
        loop {
            tokio::select! {
                _ = self.term.recv() => return "SIGTERM",
                _ = self.int.recv() => return "SIGINT",
                _ = self.hup.recv() => {
                    info!("SIGHUP: reloading the config file");
                    let reloader = reloader.clone();
                    tokio::spawn(async move { reloader.reload().await });
                }
            }
        }
    }
}

/// The tasks a reload reconfigures.
struct Reloadable {
    lifecycle: LifecycleHandle,
    speaker: Speaker,
    metrics: Metrics,
    /// The eBPF counters run (passive health has an effect).
    passive_health: bool,
    consul: Consul,
    log: Option<LogFilter>,
}

/// Consul discovery and the `consul` monitor's poller, each supervised, restarted as a pair
/// when a reload changes their settings.
struct Consul {
    cancel: CancellationToken,
    health: Option<consul::HealthLink>,
    /// Shutdown of the whole agent; the Consul tasks' token is its child.
    parent: CancellationToken,
    metrics: Metrics,
}

impl Consul {
    fn new(parent: &CancellationToken, metrics: &Metrics) -> Self {
        Self {
            cancel: parent.child_token(),
            health: None,
            parent: parent.clone(),
            metrics: metrics.clone(),
        }
    }

    /// Stops the running pair, if any, so a new one can start.
    fn stop(&mut self) {
        self.cancel.cancel();
        self.cancel = self.parent.child_token();
        self.health = None;
    }

    /// The `consul` monitor's poller (task `consul_health`): first, so the monitor settings
    /// can carry its link. Returns its status for `/healthz`.
    fn start_health(&mut self, client: Option<consul::Client>) -> Option<TaskStatus> {
        let (link, poller) =
            consul::spawn_health(client?, self.metrics.clone(), self.cancel.child_token());
        self.health = Some(link);
        Some(poller.status)
    }

    /// Discovery (task `consul_discovery`). Returns its status for `/healthz`.
    fn start_discovery(
        &self,
        client: Option<consul::Client>,
        lifecycle: &LifecycleHandle,
    ) -> Option<TaskStatus> {
        let client = client?;
        let (lifecycle, metrics) = (lifecycle.clone(), self.metrics.clone());
        let discovery = supervise::spawn(
            "consul_discovery",
            self.metrics.clone(),
            self.cancel.child_token(),
            move |cancel| {
                consul::discover(client.clone(), lifecycle.clone(), metrics.clone(), cancel)
            },
        );
        Some(discovery.status)
    }
}

impl reload::Apply for Reloadable {
    async fn apply(
        &mut self,
        current: &Config,
        new: &Config,
        report: &mut ReloadReport,
    ) -> Result<(), ReloadError> {
        // Everything that can refuse the reload comes before any change.
        let consul_changed = current.agent.consul != new.agent.consul
            || (new.agent.consul.is_some()
                && current.agent.monitor_interval != new.agent.monitor_interval);
        let consul_client = match &new.agent.consul {
            Some(c) if consul_changed => {
                let settings = consul::Settings::new(c, new.agent.monitor_interval, |k| {
                    std::env::var(k).ok()
                })?;
                Some(consul::Client::new(settings, self.metrics.clone())?)
            }
            _ => None,
        };
        if consul_changed {
            // The restarted pair is supervised too; `/healthz` keeps watching the pair it was
            // started with (docs/design.md, "Live reload").
            self.consul.stop();
            self.consul.start_health(consul_client.clone());
            report.consul_restarted = true;
        }
        let settings = lifecycle_settings(
            &new.agent,
            &new.bgp.peers,
            self.consul.health.clone(),
            self.passive_health,
            new.dataplane.passive_health.window,
        );
        report.apps = self.lifecycle.reload(settings, new.apps.clone()).await?;
        match self.speaker.reload(&new.bgp).await {
            Ok(bgp) => {
                info!(report = %bgp, "bgp section reloaded");
                report.bgp = bgp;
            }
            // The speaker stops only at shutdown.
            Err(e) => warn!(error = %e, "bgp section not reloaded"),
        }
        if consul_changed && new.agent.consul.is_none() {
            // Consul turned off: its apps go with it.
            self.lifecycle.sync_consul(Vec::new(), Vec::new()).await?;
        }
        self.consul.start_discovery(consul_client, &self.lifecycle);
        if current.agent.log_level != new.agent.log_level
            && let (Some(set), Some(filter)) = (&self.log, &new.agent.log_level)
        {
            match set(filter) {
                Ok(()) => report.log_level = Some(filter.clone()),
                Err(e) => warn!(error = %e, "agent.log_level not applied"),
            }
        }
        Ok(())
    }
}

/// Binds the API. `[::]` (GoCast's `:port`) is dual-stack; on a host without IPv6 it falls
/// back to `0.0.0.0`.
async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    match tokio::net::TcpListener::bind(addr).await {
        Err(e)
            if addr.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED)
                && e.raw_os_error() == Some(nix::errno::Errno::EAFNOSUPPORT as i32) =>
        {
            let v4 = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), addr.port());
            tokio::net::TcpListener::bind(v4)
                .await
                .with_context(|| format!("binding the HTTP API to {v4}"))
        }
        result => result.with_context(|| format!("binding the HTTP API to {addr}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_line_counts_apps_routes_and_peers() {
        assert_eq!(
            status_line(12, 10, 2, 2),
            "12 apps, 10 announced, 2/2 peers established"
        );
        assert_eq!(
            status_line(1, 0, 0, 1),
            "1 app, 0 announced, 0/1 peers established"
        );
        assert_eq!(
            status_line(3, 3, 0, 0),
            "3 apps, 3 routes computed, no BGP peer configured"
        );
    }
}
