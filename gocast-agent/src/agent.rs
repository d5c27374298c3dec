//! The running agent: wires every task together (API, lifecycle, monitors, BGP speaker, stats,
//! Consul), waits for a signal, and runs the shutdown sequence. The binary (`main.rs`) parses
//! the command line and calls [`run`]; tests start the binary.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::{
    api::{self, ApiState, StaticInfo},
    bgp::{Speaker, SpeakerReload},
    config::{Config, DataplaneMode},
    consul,
    host::SystemHost,
    lifecycle, messages,
    metrics::Metrics,
    monitor, stats,
    store::Store,
};

/// The whole shutdown (API, withdraw, VIPs, NAT) must finish within 5 s; this leaves margin.
const SHUTDOWN_BUDGET: Duration = Duration::from_millis(4500);
/// Time given to in-flight HTTP requests when shutdown starts.
const API_DRAIN: Duration = Duration::from_millis(500);
/// How long a start that fails after the BGP sessions began waits for them to close with Cease.
const ABORTED_START_CEASE: Duration = Duration::from_secs(1);

/// Runs the agent until SIGTERM or SIGINT, then shuts down cleanly. `config_path` is the file
/// `config` was read from, read again on SIGHUP.
pub async fn run(config: Config, config_path: PathBuf) -> Result<()> {
    let listen = config.agent.listen_addr;
    if listen.all_interfaces {
        warn!(addr = %listen, "the HTTP API listens on all interfaces: anyone who can reach it can register VIPs");
    }
    // Signals first: one arriving during start-up must still lead to a clean shutdown.
    let mut signals = Signals::install()?;
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
    let host = match start_host(&config).await {
        Ok(host) => host,
        Err(e) => {
            announcer.stop.cancel();
            let _ = tokio::time::timeout(ABORTED_START_CEASE, announcer.done).await;
            return Err(e);
        }
    };
    let dataplane = host.dataplane_info();
    let counters = host.counter_reader();
    if counters.is_none() && config.apps.iter().any(|a| a.passive_health) {
        warn!(
            dataplane = dataplane.mode,
            "passive_health is set on apps but needs the eBPF counters: it has no effect"
        );
    }
    let consul_health = consul_client
        .clone()
        .map(|c| consul::spawn_health(c, cancel.child_token()));
    let settings = lifecycle_settings(agent, consul_health, counters.is_some());
    let store = Store::new(&agent.state_file);
    let (owners_tx, owners_rx) = tokio::sync::watch::channel(messages::Owners::default());
    let running = lifecycle::spawn(
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
    if let Some(client) = consul_client {
        tokio::spawn(consul::discover(
            client,
            running.handle.clone(),
            metrics.clone(),
            cancel.child_token(),
        ));
    }
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
    };
    info!(addr = %listen, apps = config.apps.len(), peers = config.bgp.peers.len(), "gocast running");
    let api_stop = CancellationToken::new();
    let server = axum::serve(listener, api::router(state))
        .with_graceful_shutdown(api_stop.clone().cancelled_owned());
    let server = tokio::spawn(async move { server.await });

    let signal = loop {
        match signals.recv().await {
            Signal::Hangup => {
                if let Err(e) = reload_bgp(&config_path, &speaker).await {
                    error!("reload on SIGHUP failed, nothing changed: {e:#}");
                }
            }
            stop => break stop,
        }
    };
    info!(%signal, "shutting down");
    shutdown(api_stop, server, &speaker, cancel, running.task).await
}

/// Reads the config file again and applies its `bgp:` section to the running speaker; logs
/// and returns what changed. A file that does not load changes nothing.
pub async fn reload_bgp(config_path: &Path, speaker: &Speaker) -> Result<SpeakerReload> {
    let config =
        Config::load(config_path).with_context(|| format!("reading {}", config_path.display()))?;
    let report = speaker
        .reload(&config.bgp)
        .await
        .context("reloading the BGP speaker")?;
    info!(%report, "bgp section reloaded from {}", config_path.display());
    Ok(report)
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
        monitor: monitor::Settings {
            interval: agent.monitor_interval,
            exec_timeout: agent.exec_timeout,
            consul: consul_health,
        },
        passive_health,
    }
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

/// SIGTERM, SIGINT and SIGHUP, registered as soon as the agent starts.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

/// A signal the agent acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    Terminate,
    Interrupt,
    /// Reload the configuration.
    Hangup,
}

impl std::fmt::Display for Signal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Terminate => "SIGTERM",
            Self::Interrupt => "SIGINT",
            Self::Hangup => "SIGHUP",
        })
    }
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

    /// Waits for the next one.
    async fn recv(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Terminate,
            _ = self.int.recv() => Signal::Interrupt,
            _ = self.hup.recv() => Signal::Hangup,
        }
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
