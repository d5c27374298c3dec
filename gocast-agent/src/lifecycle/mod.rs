//! The app registry and each app's life: health → announce/withdraw → cleanup.
//!
//! One task owns every app. The API and Consul discovery send requests through a
//! [`LifecycleHandle`](crate::messages::LifecycleHandle); the monitor scheduler sends reports;
//! the stats sampler sends passive-health verdicts. Nothing else changes app state, so there
//! are no locks, and every change is decided in one place:
//!
//! - [`core`]: the decisions, a pure state machine (events in, effects out; no I/O, no clock),
//!   table-tested without sockets; [`events`]: its events and effects; `entry`: one app's state;
//! - [`driver`]: the task around it: channels, clock, the host worker that applies host
//!   changes in order, and state-file writes off the event loop.
//!
//! ```text
//!  api, consul ──Request──▶ ┌────────────────────┐ ──watch/unwatch──▶ monitor::Scheduler
//!  stats ──PassiveHealth──▶ │ driver ⇄ core      │ ◀────Report─────── (every monitor_interval)
//!                           └────────────────────┘ ──Routes (watch)──▶ BGP speaker
//!                              │ host worker: VIP on lo (netlink), NAT (dataplane)
//!                              │ state file: HTTP registrations
//! ```
//!
//! Healthy (after `monitor_rise` passing checks): VIP on `lo`, NAT installed, route in the set.
//! Unhealthy (after `monitor_fall` failing checks): route out of the set at once; VIP and NAT stay
//! until `cleanup_timer` passes, then go, and HTTP apps are forgotten (config and Consul apps stay
//! and are checked again: the config file and the catalog decide whether they exist). Recovery
//! before that only puts the route back. The route always leaves the set before its VIP leaves
//! `lo`. The rules in full: docs/design.md, "App lifecycle".

pub mod core;
mod driver;
mod entry;
pub mod events;
pub mod passive;
#[cfg(test)]
pub(crate) mod tests;

use std::{future::Future, net::IpAddr};

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use self::{
    core::Core,
    driver::Driver,
    events::{Drift, Expected},
};
pub use crate::messages::{Protected, Settings};
use crate::{
    app::{AppName, AppSpec, NatRule, Vip},
    messages::{Announcer, LifecycleHandle, Owners, Routes},
    metrics::Metrics,
    monitor,
    store::Store,
    supervise::{self, Pulse, TaskStatus},
};

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
    /// [`Host::add_vip`] for several VIPs at once (the host worker's batches); one result
    /// per VIP, in order. The real host keeps them in flight together on its netlink socket.
    fn add_vips(
        &mut self,
        vips: &[(&Vip, &str)],
    ) -> impl Future<Output = Vec<Result<(), HostError>>> + Send {
        async move {
            let mut results = Vec::with_capacity(vips.len());
            for (vip, label) in vips {
                results.push(self.add_vip(vip, label).await);
            }
            results
        }
    }
    /// [`Host::remove_vip`] for several VIPs at once; one result per VIP, in order.
    fn remove_vips(
        &mut self,
        vips: &[&Vip],
    ) -> impl Future<Output = Vec<Result<(), HostError>>> + Send {
        async move {
            let mut results = Vec::with_capacity(vips.len());
            for vip in vips {
                results.push(self.remove_vip(vip).await);
            }
            results
        }
    }
    /// [`Host::install_nat`] for several apps at once; one result per app, in order. With
    /// iptables, one `iptables-restore` per address family for the whole batch.
    fn install_nats(
        &mut self,
        jobs: &[NatJob<'_>],
    ) -> impl Future<Output = Vec<Result<(), HostError>>> + Send {
        async move {
            let mut results = Vec::with_capacity(jobs.len());
            for job in jobs {
                results.push(
                    self.install_nat(job.app, job.vip, job.rules, job.dest)
                        .await,
                );
            }
            results
        }
    }
    /// [`Host::remove_nat`] for several apps at once; one result per app, in order.
    fn remove_nats(
        &mut self,
        jobs: &[NatJob<'_>],
    ) -> impl Future<Output = Vec<Result<(), HostError>>> + Send {
        async move {
            let mut results = Vec::with_capacity(jobs.len());
            for job in jobs {
                results.push(self.remove_nat(job.app, job.vip, job.rules, job.dest).await);
            }
            results
        }
    }
    /// Removes what the agent left behind at shutdown (e.g. its NAT chain).
    fn shutdown(&mut self) -> impl Future<Output = Result<(), HostError>> + Send;
    /// Compares the host with `expected` and returns what is missing (docs/design.md,
    /// "Self-repair"). Puts back itself what all apps share (an eBPF program detached from an
    /// interface, the jumps to the NAT chain) and reports it as [`Drift::Shared`]; puts back
    /// nothing of an app: the core decides that. What it cannot check (a listing failed) is
    /// not drift.
    fn verify(&mut self, expected: &[Expected]) -> impl Future<Output = Vec<Drift>> + Send;
    /// Each address that left `lo`, as the kernel reports it: drift if it was a VIP the
    /// lifecycle believes is there (its own removals are not). `None` if the host cannot tell;
    /// the periodic verification still runs. Taken once, by the driver.
    fn drift_hints(&mut self) -> Option<mpsc::UnboundedReceiver<IpAddr>>;
    /// The host's own addresses, which no VIP may cover (docs/security.md, "Safe VIPs"):
    /// every interface's, except loopback addresses and the VIPs the agent put on `lo`; with
    /// an autodiscovered BGP peer, also the default gateway. `None` if they cannot be listed
    /// now (the last known ones stay in force).
    fn local_addresses(&mut self) -> impl Future<Output = Option<Vec<Protected>>> + Send;
}

/// One app's NAT rules, for the batch methods of [`Host`].
#[derive(Debug, Clone, Copy)]
pub struct NatJob<'a> {
    pub app: &'a AppName,
    pub vip: &'a Vip,
    pub rules: &'a [NatRule],
    /// `None`: the agent's NAT destination.
    pub dest: Option<IpAddr>,
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

/// Channels to a running lifecycle.
pub struct Running {
    pub handle: LifecycleHandle,
    pub routes: watch::Receiver<Routes>,
    /// Finishes after shutdown has withdrawn everything and cleaned the host.
    pub task: tokio::task::JoinHandle<()>,
    /// When the loop last turned: it turns at least every [`supervise::Liveness::tick`].
    pub pulse: Pulse,
    /// Fires once the config apps and the saved registrations are restored (the first
    /// reconcile): the agent then tells systemd `READY=1`.
    pub ready: oneshot::Receiver<()>,
    /// The monitor scheduler, which the lifecycle starts (supervised).
    pub monitors: TaskStatus,
}

/// Where the lifecycle's decisions go besides the host.
pub struct Outputs {
    /// The desired-announcement set; the BGP speaker and the API read it.
    pub routes: watch::Sender<Routes>,
    /// Each app's VIP, for the stats sampler.
    pub owners: watch::Sender<Owners>,
    pub announcer: Option<Announcer>,
    pub metrics: Metrics,
}

/// Starts the lifecycle with the config apps and the saved HTTP registrations.
///
/// `cancel` starts shutdown: withdraw every route, close the BGP sessions, remove every VIP,
/// then [`Host::shutdown`].
pub fn spawn<H: Host>(
    settings: Settings,
    host: H,
    config_apps: Vec<AppSpec>,
    store: Store,
    outputs: Outputs,
    cancel: CancellationToken,
) -> Running {
    let Outputs {
        routes,
        owners,
        announcer,
        metrics,
    } = outputs;
    let (req_tx, req_rx) = mpsc::channel(256);
    let (report_tx, report_rx) = mpsc::channel(1024);
    let routes_rx = routes.subscribe();
    // The scheduler stops with the lifecycle: it is cancelled by a child token.
    let (monitors, scheduler) = monitor::spawn(
        settings.monitor.clone(),
        report_tx,
        metrics.clone(),
        &cancel,
    );
    let (heartbeat, pulse, ready) = supervise::heartbeat(supervise::Liveness::current());
    let core = Core::new(settings, metrics);
    let driver = Driver::new(core, host, announcer, (routes, owners), monitors, store);
    let task = tokio::spawn(driver.run(config_apps, req_rx, report_rx, cancel, heartbeat));
    Running {
        handle: LifecycleHandle::from(req_tx),
        routes: routes_rx,
        task,
        pulse,
        ready,
        monitors: scheduler.status,
    }
}
