//! The running agent: wires every task together (API, lifecycle, monitors, BGP speaker, stats,
//! Consul), reloads the config on `SIGHUP` or `POST /reload` ([`crate::reload`]), and runs the
//! shutdown sequence on `SIGTERM`/`SIGINT`. The binary (`main.rs`) parses the command line and
//! calls [`run`]; tests start the binary.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    api::{self, ApiState, StaticInfo},
    bgp::Speaker,
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
};

/// Sets the log filter (`tracing` `EnvFilter` syntax) of the running process; `None` when the
/// command line or `RUST_LOG` fixed it, which then wins over `agent.log_level`.
pub type LogFilter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// The whole shutdown (API, withdraw, VIPs, NAT) must finish within 5 s; this leaves margin.
const SHUTDOWN_BUDGET: Duration = Duration::from_millis(4500);
/// Time given to in-flight HTTP requests when shutdown starts.
const API_DRAIN: Duration = Duration::from_millis(500);
/// How long a start that fails after the BGP sessions began waits for them to close with Cease.
const ABORTED_START_CEASE: Duration = Duration::from_secs(1);

/// Runs the agent until SIGTERM or SIGINT, then shuts down cleanly; `SIGHUP` reloads the
/// config file at `path`.
pub async fn run(config: Config, path: PathBuf, log: Option<LogFilter>) -> Result<()> {
    if let (Some(set), Some(filter)) = (&log, &config.agent.log_level) {
        set(filter).map_err(|e| anyhow::anyhow!("agent.log_level: {e}"))?;
    }
    let listen = config.agent.listen_addr;
    if listen.all_interfaces {
        warn!(addr = %listen, "the HTTP API listens on all interfaces: anyone who can reach it can register VIPs");
    }
    // Signals first: one arriving during start-up must still lead to a clean shutdown.
    let signals = Signals::install()?;
    // Bind before touching the host, so a taken port changes nothing.
    let listener = bind(listen.addr).await?;
    let metrics = Metrics::default();
    let cancel = CancellationToken::new();
    let agent = &config.agent;
    let consul_client = consul_client(&config, &metrics)?;
    let (routes_tx, routes_rx) = tokio::sync::watch::channel(messages::Routes::default());
    // BGP before the dataplane: sessions come up while the eBPF programs load and verify, and
    // nothing is announced before the lifecycle runs.
    let (speaker, announcer) = start_speaker(&config, routes_rx, &metrics).await?;
    let (host, announcer) = start_host(&config, announcer).await?;
    let dataplane = host.dataplane_info();
    let counters = host.counter_reader();
    let counters_present = counters.is_some();
    if counters.is_none() && config.apps.iter().any(|a| a.passive_health) {
        warn!(
            dataplane = dataplane.mode,
            "passive_health is set on apps but needs the eBPF counters: it has no effect"
        );
    }
    let mut consul = Consul::new(&cancel);
    consul.start_health(consul_client.clone());
    let (owners_tx, owners_rx) = tokio::sync::watch::channel(messages::Owners::default());
    let running = lifecycle::spawn(
        lifecycle_settings(agent, consul.health.clone(), counters.is_some()),
        host,
        config.apps.clone(),
        Store::new(&agent.state_file),
        lifecycle::Outputs {
            routes: routes_tx,
            owners: owners_tx,
            announcer: Some(announcer),
            metrics: metrics.clone(),
        },
        cancel.clone(),
    );
    let snapshots = counters.map(|reader| {
        stats::spawn(
            reader,
            owners_rx,
            running.handle.clone(),
            config.dataplane.passive_health,
            cancel.clone(),
        )
    });
    if let Some(rx) = &snapshots {
        metrics.vip_stats(rx.clone());
    }
    consul.start_discovery(consul_client, &running.handle, &metrics);
    let reloader = reload::spawn(
        path,
        config.clone(),
        Reloadable {
            lifecycle: running.handle.clone(),
            speaker: speaker.clone(),
            metrics: metrics.clone(),
            passive_health: counters_present,
            consul,
            log,
        },
    );
    let state = ApiState {
        lifecycle: running.handle.clone(),
        routes: running.routes.clone(),
        stats: snapshots,
        metrics,
        info: Arc::new(StaticInfo {
            version: env!("CARGO_PKG_VERSION"),
            dataplane,
        }),
        peers: speaker.peers(),
        reload: Some(reloader.clone()),
    };
    info!(addr = %listen, apps = config.apps.len(), peers = config.bgp.peers.len(), "gocast running");
    let api_stop = CancellationToken::new();
    let server = axum::serve(listener, api::router(state))
        .with_graceful_shutdown(api_stop.clone().cancelled_owned());
    let server = tokio::spawn(async move { server.await });

    let signal = signals.recv(&reloader).await;
    info!(%signal, "shutting down");
    shutdown(api_stop, server, &speaker, cancel, running.task).await
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
    consul_health: Option<consul::HealthLink>,
    passive_health: bool,
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
    }
}

/// Connects to the kernel and loads the dataplane, naming the dataplane in any error; on
/// failure the BGP sessions that already started close with a Cease.
async fn start_host(
    config: &Config,
    announcer: messages::Announcer,
) -> Result<(SystemHost, messages::Announcer)> {
    match SystemHost::start(config).await {
        Ok(host) => Ok((host, announcer)),
        Err(e) => {
            announcer.stop.cancel();
            let _ = tokio::time::timeout(ABORTED_START_CEASE, announcer.done).await;
            let dataplane = match config.dataplane.mode {
                DataplaneMode::Ebpf => "eBPF dataplane (dataplane.mode: ebpf)",
                DataplaneMode::Auto => "dataplane",
                DataplaneMode::Iptables => "iptables",
            };
            Err(anyhow::Error::new(e).context(format!("preparing the host (netlink, {dataplane})")))
        }
    }
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
    server: tokio::task::JoinHandle<std::io::Result<()>>,
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

/// SIGTERM, SIGINT and SIGHUP, registered as soon as the agent starts (SIGHUP's default
/// action would end the agent without cleanup).
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

    /// Reloads on each SIGHUP (the outcome is logged by the reloader); returns the name of the
    /// signal that asks to stop.
    async fn recv(mut self, reloader: &ReloadHandle) -> &'static str {
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

/// Consul discovery and the `consul` monitor's poller, restarted as a pair when their settings
/// change.
struct Consul {
    cancel: CancellationToken,
    health: Option<consul::HealthLink>,
    /// Shutdown of the whole agent; the Consul tasks' token is its child.
    parent: CancellationToken,
}

impl Consul {
    fn new(parent: &CancellationToken) -> Self {
        Self {
            cancel: parent.child_token(),
            health: None,
            parent: parent.clone(),
        }
    }

    /// Stops the running pair, if any, so a new one can start.
    fn stop(&mut self) {
        self.cancel.cancel();
        self.cancel = self.parent.child_token();
        self.health = None;
    }

    /// The `consul` monitor's poller: first, so the monitor settings can carry its link.
    fn start_health(&mut self, client: Option<consul::Client>) {
        self.health = client.map(|c| consul::spawn_health(c, self.cancel.child_token()));
    }

    fn start_discovery(
        &self,
        client: Option<consul::Client>,
        lifecycle: &LifecycleHandle,
        metrics: &Metrics,
    ) {
        if let Some(client) = client {
            tokio::spawn(consul::discover(
                client,
                lifecycle.clone(),
                metrics.clone(),
                self.cancel.child_token(),
            ));
        }
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
            self.consul.stop();
            self.consul.start_health(consul_client.clone());
            report.consul_restarted = true;
        }
        let settings =
            lifecycle_settings(&new.agent, self.consul.health.clone(), self.passive_health);
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
        self.consul
            .start_discovery(consul_client, &self.lifecycle, &self.metrics);
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
