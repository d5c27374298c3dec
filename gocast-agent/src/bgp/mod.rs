//! The BGP speaker: one [`session::Session`] task per configured peer, each keeping its peer in
//! step with the lifecycle's route set.
//!
//! ```text
//!  lifecycle ──Routes (watch)──┬──▶ Session(peer 1) ──TCP──▶ router
//!                              └──▶ Session(peer 2) ──TCP──▶ router
//!  each Session ──flushed version──▶ min over peers ──▶ lifecycle (withdraw before VIP removal)
//!  each Session ──PeerStatus──▶ /info, gocast status
//! ```
//!
//! zettabgp encodes our OPEN; everything else on the wire is ours ([`codec`]), as are the
//! state machine ([`fsm`]), timers and Adj-RIB-Out ([`rib_out`]).

pub mod codec;
pub mod fsm;
pub mod rib_out;
pub mod session;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::{mpsc, watch},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use self::session::{PeerStatus, Session, SessionSettings};
use crate::{
    config::BgpConfig,
    messages::{Announcer, Routes},
    metrics::Metrics,
    netlink::{Netlink, NetlinkError},
};

/// Why the speaker could not start.
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
}

/// The running speaker, as the API and the shutdown sequence see it.
pub struct Speaker {
    /// One per configured peer, in config order.
    pub peers: Vec<watch::Receiver<PeerStatus>>,
    graceful: watch::Sender<bool>,
    graceful_wait: Option<Duration>,
}

impl Speaker {
    /// Starts a session per peer (connecting at once, no start-up delay). Returns the speaker and
    /// the lifecycle's [`Announcer`].
    pub async fn start(
        bgp: &BgpConfig,
        routes: watch::Receiver<Routes>,
        metrics: &Metrics,
    ) -> Result<(Self, Announcer), SpeakerError> {
        let netlink = Netlink::new().await?;
        let router_id = router_id(bgp, &netlink).await?;
        let (graceful, graceful_rx) = watch::channel(false);
        let stop = CancellationToken::new();
        let mut peers = Vec::new();
        let mut flushed = Vec::new();
        let mut tasks = Vec::new();
        let mut listeners = Vec::new();
        for peer in &bgp.peers {
            let settings = SessionSettings {
                peer: peer.clone(),
                router_id,
                graceful: graceful_rx.clone(),
                drain_local_pref: bgp.drain_local_pref.unwrap_or(0),
            };
            let (incoming_tx, incoming) = mpsc::channel(1);
            listeners.push((peer.peer_ip, peer.password.clone(), incoming_tx));
            // A netlink connection per session: dumps from sessions that come up together
            // would otherwise collide (the kernel answers EBUSY).
            let (session, status, sent) = Session::new(
                settings,
                Netlink::new().await?,
                metrics.clone(),
                routes.clone(),
                incoming,
            );
            peers.push(status);
            flushed.push(sent);
            tasks.push(tokio::spawn(session.run(stop.child_token())));
        }
        if let Some(port) = bgp.listen_port {
            let listener =
                listen(port, &listeners).map_err(|source| SpeakerError::Listen { port, source })?;
            tokio::spawn(accept_loop(listener, listeners, stop.child_token()));
        }
        info!(%router_id, peers = bgp.peers.len(), "bgp speaker started");
        let (flushed_tx, flushed_rx) = watch::channel(0);
        tokio::spawn(lowest_flushed(flushed, flushed_tx));
        let done = tokio::spawn(async move {
            for task in tasks {
                // A panicked session dropped its socket, so the peer has dropped our routes;
                // the other sessions go on. It must still be seen.
                if let Err(e) = task.await
                    && e.is_panic()
                {
                    tracing::error!(error = %e, "a BGP session task panicked; that peer stays down until restart");
                }
            }
        });
        let speaker = Self {
            peers,
            graceful,
            graceful_wait: bgp.graceful_shutdown,
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

    /// RFC 8326: re-announce every route with `GRACEFUL_SHUTDOWN` so the peers move traffic
    /// away, and wait the configured time. Does nothing unless `bgp.graceful_shutdown` is set.
    pub async fn graceful_shutdown(&self) {
        if let Some(wait) = self.graceful_wait {
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
        self.graceful_wait.unwrap_or_default()
    }
}

/// The sessions a listener hands connections to: (peer address, MD5 password, session).
type Listeners = Vec<(Option<IpAddr>, Option<String>, mpsc::Sender<TcpStream>)>;

/// Binds `[::]:port` (both families), with each peer's MD5 key set on the listening socket.
fn listen(port: u16, peers: &Listeners) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v6()?;
    socket.set_reuseaddr(true)?;
    for (ip, password, _) in peers {
        if let (Some(ip), Some(password)) = (ip, password) {
            // A v4 peer reaches a dual-stack socket as a v4-mapped address.
            let key_addr = match ip {
                IpAddr::V4(a) => IpAddr::V6(a.to_ipv6_mapped()),
                IpAddr::V6(_) => *ip,
            };
            gocast_common::tcp_md5::set(&socket, key_addr, password.as_bytes())?;
        }
    }
    socket.bind(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port))?;
    socket.listen(16)
}

/// Hands each accepted connection to the session of its peer; strangers are closed.
async fn accept_loop(listener: TcpListener, peers: Listeners, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, remote) = match accepted {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, "bgp listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let from = remote.ip().to_canonical();
        if let Some((_, _, session)) = peers.iter().find(|(ip, _, _)| *ip == Some(from)) {
            // A full queue means the session is busy with a connection already: refuse this one.
            if let Err(
                mpsc::error::TrySendError::Full(stream) | mpsc::error::TrySendError::Closed(stream),
            ) = session.try_send(stream)
            {
                tokio::spawn(session::reject(stream));
            }
        } else {
            debug!(%from, "bgp listener: connection from an unconfigured address refused");
            tokio::spawn(session::reject(stream));
        }
    }
}

/// Publishes the lowest route-set version every session has been sent; with no peers nothing
/// is ever waited for.
async fn lowest_flushed(mut sessions: Vec<watch::Receiver<u64>>, out: watch::Sender<u64>) {
    loop {
        let lowest = sessions
            .iter()
            .map(|r| *r.borrow())
            .min()
            .unwrap_or(u64::MAX);
        out.send_replace(lowest);
        if sessions.is_empty() {
            return;
        }
        let changes = sessions.iter_mut().map(|r| Box::pin(r.changed()));
        let (result, _, _) = futures::future::select_all(changes).await;
        if result.is_err() {
            // A session ended (shutdown): nothing more to wait for.
            out.send_replace(u64::MAX);
            return;
        }
    }
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
