//! The BGP speaker: a task that owns one supervised [`session::Session`] per configured peer,
//! each keeping its peer in step with the lifecycle's route set, and that applies reloads of the
//! `bgp:` section without touching the sessions a change does not concern.
//!
//! ```text
//!  Speaker (handle) ──reload──▶ speaker task ──▶ supervise(peer 1) ──▶ Session ──TCP──▶ router
//!                                             └─▶ supervise(peer 2) ──▶ Session ──TCP──▶ router
//!  lifecycle ──Routes (watch)──▶ each Session
//!  each Session ──flushed version──▶ min over peers ──▶ lifecycle (withdraw before VIP removal)
//!  each Session ──PeerStatus──▶ Peers ──▶ /info, /healthz, gocast status
//! ```
//!
//! zettabgp encodes our OPEN; everything else on the wire is ours ([`codec`]), as are the
//! state machine ([`fsm`]), timers and Adj-RIB-Out ([`rib_out`]). [`reload`] is the pure diff
//! of a reload, [`speaker`] the task that applies it, [`supervisor`] restarts a session task
//! that fails, [`listener`] is the optional passive side.

pub mod codec;
pub mod fsm;
pub mod listener;
pub mod reload;
pub mod rib_out;
pub mod session;
pub mod speaker;
pub mod supervisor;

use std::{
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use self::reload::{NotApplied, PeerChange, SpeakerReload};
use self::{
    session::PeerStatus,
    speaker::{Command, Published, SpeakerTask, Start},
};
use crate::{
    bfd::Bfd,
    config::BgpConfig,
    messages::{Announcer, Routes},
    metrics::Metrics,
    netlink::{Netlink, NetlinkError},
};

/// Why the speaker could not start or reload.
#[derive(Debug, thiserror::Error)]
pub enum SpeakerError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("cannot listen for BGP on port {port}")]
    Listen {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("the BGP speaker has stopped")]
    Stopped,
}

/// The running speaker, as the agent, the API and the shutdown sequence see it. Cheap to
/// clone; every clone talks to the same speaker task.
#[derive(Clone)]
pub struct Speaker {
    commands: mpsc::Sender<Command>,
    peers: Peers,
    graceful: watch::Sender<bool>,
    graceful_wait: watch::Receiver<Option<Duration>>,
}

impl Speaker {
    /// Starts the speaker task and a session per peer (connecting at once, no start-up delay);
    /// with no peer it waits for a reload to add one. Returns the speaker and the lifecycle's
    /// [`Announcer`].
    pub async fn start(
        bgp: &BgpConfig,
        routes: watch::Receiver<Routes>,
        metrics: &Metrics,
    ) -> Result<(Self, Announcer), SpeakerError> {
        let netlink = Netlink::new().await?;
        let router_id = router_id(bgp, &netlink).await?;
        let (graceful, graceful_rx) = watch::channel(false);
        let (statuses, statuses_rx) = watch::channel(Vec::new());
        let (flushed_set, flushed_set_rx) = watch::channel(Vec::new());
        let (graceful_wait, graceful_wait_rx) = watch::channel(bgp.graceful_shutdown);
        let task = SpeakerTask::start(Start {
            bgp: bgp.clone(),
            router_id,
            netlink,
            metrics: metrics.clone(),
            routes,
            graceful: graceful_rx,
            bfd: Bfd::start(metrics),
            published: Published {
                statuses,
                flushed: flushed_set,
                table: watch::channel(std::sync::Arc::default()).0,
                graceful_wait,
            },
        })?;
        info!(%router_id, peers = bgp.peers.len(), "bgp speaker started");
        let (flushed_tx, flushed_rx) = watch::channel(0);
        tokio::spawn(speaker::lowest_flushed(flushed_set_rx, flushed_tx));
        let stop = CancellationToken::new();
        let (commands, commands_rx) = mpsc::channel(4);
        let done = tokio::spawn(task.run(commands_rx, stop.clone()));
        let speaker = Self {
            commands,
            peers: Peers(statuses_rx),
            graceful,
            graceful_wait: graceful_wait_rx,
        };
        Ok((
            speaker,
            Announcer {
                flushed: flushed_rx,
                stop,
                done,
            },
        ))
    }

    /// Applies a new `bgp:` section to the running speaker, per peer: added peers start,
    /// removed ones close with Cease 6/3, a peer whose session parameters changed is reset
    /// alone (Cease 6/6), a change of route attributes only goes out as UPDATEs on the running
    /// session (see [`reload`]). Says what it did, and what it could not apply.
    pub async fn reload(&self, bgp: &BgpConfig) -> Result<SpeakerReload, SpeakerError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Reload {
                bgp: bgp.clone(),
                reply,
            })
            .await
            .map_err(|_| SpeakerError::Stopped)?;
        answer.await.map_err(|_| SpeakerError::Stopped)?
    }

    /// The peers' statuses, following reloads: for `/info` and `/healthz`.
    pub fn peers(&self) -> Peers {
        self.peers.clone()
    }

    /// The peers whose session task is down (it failed and waits to be restarted).
    pub fn down_sessions(&self) -> Vec<DownSession> {
        self.peers.down_sessions()
    }

    /// RFC 8326: re-announce every route with `GRACEFUL_SHUTDOWN` so the peers move traffic
    /// away, and wait the configured time. Does nothing unless `bgp.graceful_shutdown` is set.
    pub async fn graceful_shutdown(&self) {
        let wait = *self.graceful_wait.borrow();
        if let Some(wait) = wait {
            info!(
                ?wait,
                "graceful shutdown: announcing GRACEFUL_SHUTDOWN and waiting"
            );
            self.graceful.send_replace(true);
            tokio::time::sleep(wait).await;
        }
    }

    /// How long [`Speaker::graceful_shutdown`] takes.
    pub fn graceful_wait(&self) -> Duration {
        self.graceful_wait.borrow().unwrap_or_default()
    }
}

/// The speaker's peers as the API sees them, in config order; follows peers added and removed
/// by reloads. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Peers(watch::Receiver<Vec<watch::Receiver<PeerStatus>>>);

impl Peers {
    /// Each peer's current status.
    pub fn statuses(&self) -> Vec<PeerStatus> {
        self.0.borrow().iter().map(|p| p.borrow().clone()).collect()
    }

    /// The peers whose session task is down, with why: what `/healthz` reports as a
    /// supervised task down.
    pub fn down_sessions(&self) -> Vec<DownSession> {
        self.0
            .borrow()
            .iter()
            .filter_map(|p| {
                let status = p.borrow();
                let reason = status.task_down.clone()?;
                let peer = status
                    .address
                    .map_or_else(|| "autodiscover".to_owned(), |a| a.to_string());
                Some(DownSession { peer, reason })
            })
            .collect()
    }
}

impl Default for Peers {
    /// No peers (an API without a speaker, in tests).
    fn default() -> Self {
        Self(watch::channel(Vec::new()).1)
    }
}

/// A peer whose session task is down.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DownSession {
    pub peer: String,
    /// Why its task ended (`panicked: ...`, `ended by itself`).
    pub reason: String,
}

/// The BGP Identifier: configured, else an IPv4 local address (a peer's `local_ip`, the
/// source toward the first IPv4 peer, the default route's source), else one derived from the
/// host name (an IPv6-only host still needs a 32-bit identifier, RFC 6286).
async fn router_id(bgp: &BgpConfig, netlink: &Netlink) -> Result<Ipv4Addr, NetlinkError> {
    if let Some(id) = bgp.router_id {
        return Ok(id);
    }
    for peer in &bgp.peers {
        if let Some(IpAddr::V4(a)) = peer.local_ip {
            return Ok(a);
        }
        if let Some(ip @ IpAddr::V4(_)) = peer.peer_ip
            && let Some(IpAddr::V4(a)) = netlink.source_toward(ip).await?
        {
            return Ok(a);
        }
    }
    if let Some((_, IpAddr::V4(a))) = netlink.default_gateway().await? {
        return Ok(a);
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let hash = host.trim().bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    Ok(Ipv4Addr::from(hash | 1))
}
