//! The speaker task: owns the running `bgp:` section, one supervised session per peer and the
//! listener; the [`Speaker`](super::Speaker) handle talks to it over a channel.
//!
//! ```text
//!  Speaker ──Command::Reload + oneshot──▶ SpeakerTask ──stop cause, peer config──▶ supervise(peer)
//!  Announcer.stop (lifecycle) ──────────▶     │ publishes: statuses (api), flushed set, listener table
//!  flushed set ──▶ lowest_flushed ──▶ Announcer.flushed (lifecycle)
//! ```
//!
//! A reload is applied here, one at a time: [`plan`] says which peers are added, removed, reset
//! or only updated; the published lists follow, so `/info` and the lifecycle's flushed version
//! see peers come and go.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
    time::Duration,
};

use tokio::{
    net::TcpStream,
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{
    SpeakerError,
    fsm::ConfigChange,
    listener::{Listener, Table},
    reload::{Action, NotApplied, PeerChange, PeerKey, SpeakerReload, keys, listener_keys, plan},
    router_id,
    session::{PeerStatus, SessionSettings, StopCause},
    supervisor::{self, Supervised},
};
use crate::{
    bfd::Bfd,
    config::{BgpConfig, PeerConfig},
    messages::Routes,
    metrics::Metrics,
    netlink::Netlink,
};

/// What the [`Speaker`](super::Speaker) handle asks of the task.
pub enum Command {
    /// Apply a new `bgp:` section.
    Reload {
        bgp: BgpConfig,
        reply: oneshot::Sender<Result<SpeakerReload, SpeakerError>>,
    },
}

/// One running peer: the speaker's ends of its supervisor's channels.
struct Running {
    key: PeerKey,
    /// Route attributes reach the running session through it.
    config: watch::Sender<PeerConfig>,
    stop: watch::Sender<Option<StopCause>>,
    /// Shared with the supervisor; a reset hands it to the next one, so `/info` keeps the
    /// peer's counters and the Cease that closed the previous session.
    status: watch::Sender<PeerStatus>,
    flushed: watch::Receiver<u64>,
    incoming: mpsc::Sender<TcpStream>,
    task: JoinHandle<()>,
}

/// What the task publishes for the API, the lifecycle and the listener.
pub struct Published {
    /// Each peer's status, in config order.
    pub statuses: watch::Sender<Vec<watch::Receiver<PeerStatus>>>,
    /// Each peer's flushed version, for [`lowest_flushed`].
    pub flushed: watch::Sender<Vec<watch::Receiver<u64>>>,
    /// The listener's routing of incoming connections.
    pub table: watch::Sender<Table>,
    /// `bgp.graceful_shutdown`, read by the handle at shutdown.
    pub graceful_wait: watch::Sender<Option<Duration>>,
}

/// The owner of the sessions.
pub struct SpeakerTask {
    /// The running section (`listen_port` as actually bound).
    bgp: BgpConfig,
    router_id: Ipv4Addr,
    netlink: Netlink,
    metrics: Metrics,
    routes: watch::Receiver<Routes>,
    graceful: watch::Receiver<bool>,
    peers: Vec<Running>,
    /// Sessions removed or replaced that may still be closing: awaited at shutdown.
    retiring: Vec<JoinHandle<()>>,
    listener: Option<Listener>,
    published: Published,
    /// Where peers with `bfd` set run their BFD session.
    bfd: Bfd,
    /// Test-only fault injection: the peer whose first session panics (see
    /// [`supervisor::fault`]); taken by the first session started for it.
    #[cfg(debug_assertions)]
    panic_target: Option<IpAddr>,
}

/// What the task starts from.
pub struct Start {
    pub bgp: BgpConfig,
    pub router_id: Ipv4Addr,
    pub netlink: Netlink,
    pub metrics: Metrics,
    pub routes: watch::Receiver<Routes>,
    pub graceful: watch::Receiver<bool>,
    pub published: Published,
    pub bfd: Bfd,
}

impl SpeakerTask {
    /// Starts a session per peer and the listener (`bgp.listen_port`).
    pub fn start(start: Start) -> Result<Self, SpeakerError> {
        let Start {
            bgp,
            router_id,
            netlink,
            metrics,
            routes,
            graceful,
            published,
            bfd,
        } = start;
        let mut task = Self {
            bgp: BgpConfig::default(),
            router_id,
            netlink,
            metrics,
            routes,
            graceful,
            peers: Vec::new(),
            retiring: Vec::new(),
            listener: None,
            published,
            bfd,
            #[cfg(debug_assertions)]
            panic_target: supervisor::fault::target(),
        };
        task.published
            .graceful_wait
            .send_replace(bgp.graceful_shutdown);
        // The listener first: when its port is taken, no session has started yet. It refuses
        // connections until the table below is published.
        if let Some(port) = bgp.listen_port {
            let listener =
                Listener::bind(port, key_map(&bgp.peers), task.published.table.subscribe())
                    .map_err(|source| SpeakerError::Listen { port, source })?;
            task.listener = Some(listener);
        }
        for (key, peer) in keys(&bgp.peers).into_iter().zip(&bgp.peers) {
            let running = task.start_peer(key, peer, None, None);
            task.peers.push(running);
        }
        task.publish();
        task.bgp = bgp;
        Ok(task)
    }

    /// Serves reloads until `stop`; then closes every session (Cease) and returns once all
    /// are closed.
    pub async fn run(mut self, mut commands: mpsc::Receiver<Command>, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                Some(command) = commands.recv() => match command {
                    Command::Reload { bgp, reply } => {
                        let _ = reply.send(self.reload(bgp).await);
                    }
                },
            }
        }
        // Refuse connections first: nothing new may start while the sessions close.
        self.listener = None;
        for peer in &self.peers {
            peer.stop.send_replace(Some(StopCause::Shutdown));
        }
        // Sessions still closing after a reload are told too (they stop at once).
        let tasks = self
            .peers
            .drain(..)
            .map(|p| p.task)
            .chain(self.retiring.drain(..));
        for task in tasks {
            let _ = task.await;
        }
    }

    /// Starts `peer`'s supervised session. A session that replaces another one (a reset) gets
    /// its status and starts once `predecessor` has closed.
    fn start_peer(
        &mut self,
        key: PeerKey,
        peer: &PeerConfig,
        status: Option<watch::Sender<PeerStatus>>,
        predecessor: Option<JoinHandle<()>>,
    ) -> Running {
        let (config, config_rx) = watch::channel(peer.clone());
        let (stop, stop_rx) = watch::channel(None);
        let status = status.unwrap_or_else(|| watch::channel(PeerStatus::new(peer)).0);
        // Nothing has been sent to a new peer, so it holds no withdrawal up.
        let (flushed, flushed_rx) = watch::channel(self.routes.borrow().version);
        let (incoming, incoming_rx) = mpsc::channel(1);
        #[cfg(debug_assertions)]
        let inject_panic = peer.peer_ip.is_some() && self.panic_target == peer.peer_ip && {
            self.panic_target = None;
            true
        };
        let supervised = Supervised {
            settings: SessionSettings {
                peer: config_rx,
                router_id: self.router_id,
                graceful: self.graceful.clone(),
            },
            metrics: self.metrics.clone(),
            routes: self.routes.clone(),
            stop: stop_rx,
            incoming: incoming_rx,
            status: status.clone(),
            flushed,
            predecessor,
            bfd: self.bfd.clone(),
            #[cfg(debug_assertions)]
            inject_panic,
        };
        Running {
            key,
            config,
            stop,
            status,
            flushed: flushed_rx,
            incoming,
            task: tokio::spawn(supervisor::supervise(supervised)),
        }
    }

    /// Publishes the peer lists after a change.
    fn publish(&self) {
        let p = &self.published;
        p.statuses
            .send_replace(self.peers.iter().map(|r| r.status.subscribe()).collect());
        p.flushed
            .send_replace(self.peers.iter().map(|r| r.flushed.clone()).collect());
        let table = self
            .peers
            .iter()
            .filter_map(|r| match r.key {
                PeerKey::Address(a) => Some((a.ip(), r.incoming.clone())),
                PeerKey::Autodiscovered(_) => None,
            })
            .collect();
        p.table.send_replace(Arc::new(table));
    }

    /// Applies a new `bgp:` section; nothing is applied when the router id cannot be found.
    async fn reload(&mut self, bgp: BgpConfig) -> Result<SpeakerReload, SpeakerError> {
        // A derived router id is kept while none is configured, so adding a peer (which may
        // change what would be derived) does not reset every session.
        let router_id = if bgp.router_id == self.bgp.router_id {
            self.router_id
        } else {
            router_id(&bgp, &self.netlink).await?
        };
        let plan = plan(&self.bgp.peers, self.router_id, &bgp.peers, router_id);
        self.router_id = router_id;
        let mut report = SpeakerReload::default();
        let mut old: BTreeMap<PeerKey, Running> =
            self.peers.drain(..).map(|r| (r.key, r)).collect();
        for key in &plan.removed {
            if let Some(gone) = old.remove(key) {
                gone.stop
                    .send_replace(Some(StopCause::Config(ConfigChange::PeerRemoved)));
                self.retiring.push(gone.task);
                report.removed.push(key.to_string());
            }
        }
        for ((key, action), peer) in plan.peers.into_iter().zip(&bgp.peers) {
            let running = match (action, old.remove(&key)) {
                (Action::Keep, Some(running)) => running,
                (Action::Update(changed), Some(running)) => {
                    running.config.send_replace(peer.clone());
                    report.updated.push(PeerChange {
                        peer: key.to_string(),
                        keys: changed,
                    });
                    running
                }
                (Action::Reset(changed), Some(replaced)) => {
                    replaced
                        .stop
                        .send_replace(Some(StopCause::Config(ConfigChange::SessionChanged)));
                    report.reset.push(PeerChange {
                        peer: key.to_string(),
                        keys: changed,
                    });
                    self.start_peer(key, peer, Some(replaced.status), Some(replaced.task))
                }
                // `Add`, or a peer the plan knew that is not running (cannot happen: the plan
                // is made from the running section).
                (_, _) => {
                    report.added.push(key.to_string());
                    self.start_peer(key, peer, None, None)
                }
            };
            self.peers.push(running);
        }
        self.retiring.retain(|t| !t.is_finished());
        self.publish();
        let listen_port = self.reload_listener(&bgp, &mut report);
        if bgp.graceful_shutdown != self.bgp.graceful_shutdown {
            self.published
                .graceful_wait
                .send_replace(bgp.graceful_shutdown);
            report.applied.push("bgp.graceful_shutdown");
        }
        self.bgp = BgpConfig { listen_port, ..bgp };
        Ok(report)
    }

    /// Follows `bgp.listen_port` and the peers' MD5 keys; returns the port now listened on.
    /// A new port is bound before the old one closes, so a port that cannot be bound leaves
    /// the running listener as it was.
    fn reload_listener(&mut self, bgp: &BgpConfig, report: &mut SpeakerReload) -> Option<u16> {
        let keys = key_map(&bgp.peers);
        let running = self.listener.as_ref().map(|l| l.port);
        if bgp.listen_port == running {
            if let Some(listener) = self.listener.as_mut()
                && let Err(e) = listener.set_keys(keys)
            {
                warn!(error = %e, "bgp listener: cannot update the TCP MD5 keys");
                report.not_applied.push(NotApplied {
                    key: "bgp.password",
                    reason: format!(
                        "the listener's TCP MD5 keys could not be updated ({e}); needs a restart"
                    ),
                });
            }
            return running;
        }
        match bgp.listen_port {
            None => {
                self.listener = None;
                report.applied.push("bgp.listen_port");
                None
            }
            Some(port) => match Listener::bind(port, keys, self.published.table.subscribe()) {
                Ok(listener) => {
                    self.listener = Some(listener);
                    report.applied.push("bgp.listen_port");
                    Some(port)
                }
                Err(e) => {
                    let now = running.map_or_else(|| "off".to_owned(), |p| p.to_string());
                    report.not_applied.push(NotApplied {
                        key: "bgp.listen_port",
                        reason: format!(
                            "cannot listen on port {port} ({e}); the listener stays {now}; needs a restart"
                        ),
                    });
                    running
                }
            },
        }
    }
}

/// The listener's MD5 keys, by peer address.
fn key_map(peers: &[PeerConfig]) -> BTreeMap<IpAddr, String> {
    listener_keys(peers).into_iter().collect()
}

/// Publishes the lowest route-set version every session has been sent, following peers as
/// they come and go. With no peers nothing is waited for (`u64::MAX`); a session whose
/// supervisor has ended (shutdown, removal) has nothing left to send and no longer counts.
pub async fn lowest_flushed(
    mut set: watch::Receiver<Vec<watch::Receiver<u64>>>,
    out: watch::Sender<u64>,
) {
    let mut sessions = set.borrow_and_update().clone();
    let mut set_open = true;
    loop {
        sessions.retain(|r| r.has_changed().is_ok());
        let lowest = sessions
            .iter()
            .map(|r| *r.borrow())
            .min()
            .unwrap_or(u64::MAX);
        out.send_replace(lowest);
        if !set_open && sessions.is_empty() {
            return;
        }
        let any_session = async {
            if sessions.is_empty() {
                std::future::pending::<()>().await;
            }
            let changes = sessions.iter_mut().map(|r| Box::pin(r.changed()));
            let _ = futures::future::select_all(changes).await;
        };
        let set_changed = tokio::select! {
            changed = set.changed(), if set_open => Some(changed.is_ok()),
            () = any_session => None,
        };
        match set_changed {
            Some(true) => sessions.clone_from(&set.borrow_and_update()),
            Some(false) => set_open = false,
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{bgp::Speaker, testing::in_new_netns};

    const ID: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
    const WAIT: Duration = Duration::from_secs(2);

    /// A peer on loopback where nothing listens: its session keeps trying.
    fn unanswered_peer() -> PeerConfig {
        crate::testing::loopback_peer(1)
    }

    fn section(peers: Vec<PeerConfig>, listen_port: Option<u16>) -> BgpConfig {
        BgpConfig {
            peers,
            router_id: Some(ID),
            listen_port,
            graceful_shutdown: None,
        }
    }

    async fn accepts(port: u16) -> bool {
        tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .await
            .is_ok()
    }

    #[test]
    fn a_speaker_without_peers_gains_and_loses_one_by_reload_and_never_holds_withdrawals_up() {
        in_new_netns(|| async {
            let (routes, routes_rx) = watch::channel(Routes::default());
            let empty = section(Vec::new(), None);
            let (speaker, mut announcer) = Speaker::start(&empty, routes_rx, &Metrics::default())
                .await
                .unwrap();
            let flushed = &mut announcer.flushed;
            tokio::time::timeout(WAIT, flushed.wait_for(|v| *v == u64::MAX))
                .await
                .unwrap()
                .unwrap();
            assert!(speaker.peers().statuses().is_empty());

            let one = section(vec![unanswered_peer()], None);
            let report = speaker.reload(&one).await.unwrap();
            assert_eq!(report.added, ["127.0.0.1:1"]);
            assert_eq!(speaker.peers().statuses().len(), 1);
            assert!(speaker.down_sessions().is_empty());
            // A peer that is down has been sent every version.
            routes.send_modify(|r| r.version = 5);
            tokio::time::timeout(WAIT, flushed.wait_for(|v| *v == 5))
                .await
                .unwrap()
                .unwrap();
            assert!(speaker.reload(&one).await.unwrap().is_empty());

            let graceful = BgpConfig {
                graceful_shutdown: Some(Duration::from_secs(3)),
                ..one.clone()
            };
            let report = speaker.reload(&graceful).await.unwrap();
            assert_eq!(report.applied, ["bgp.graceful_shutdown"]);
            assert_eq!(speaker.graceful_wait(), Duration::from_secs(3));

            let report = speaker.reload(&empty).await.unwrap();
            assert_eq!(report.removed, ["127.0.0.1:1"]);
            assert!(speaker.peers().statuses().is_empty());
            tokio::time::timeout(WAIT, flushed.wait_for(|v| *v == u64::MAX))
                .await
                .unwrap()
                .unwrap();

            announcer.stop.cancel();
            tokio::time::timeout(WAIT, announcer.done)
                .await
                .unwrap()
                .unwrap();
            assert!(matches!(
                speaker.reload(&empty).await,
                Err(SpeakerError::Stopped)
            ));
        });
    }

    #[test]
    fn listen_port_moves_to_a_free_port_and_stays_when_the_new_one_is_taken() {
        in_new_netns(|| async {
            let (_routes, routes_rx) = watch::channel(Routes::default());
            let peers = vec![unanswered_peer()];
            let (speaker, announcer) = Speaker::start(
                &section(peers.clone(), Some(1179)),
                routes_rx,
                &Metrics::default(),
            )
            .await
            .unwrap();
            assert!(accepts(1179).await);

            let report = speaker
                .reload(&section(peers.clone(), Some(1180)))
                .await
                .unwrap();
            assert_eq!(report.applied, ["bgp.listen_port"]);
            assert!(accepts(1180).await);
            let closed = async {
                while accepts(1179).await {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            };
            tokio::time::timeout(WAIT, closed).await.unwrap();

            let _taken = std::net::TcpListener::bind("[::]:1181").unwrap();
            let report = speaker
                .reload(&section(peers.clone(), Some(1181)))
                .await
                .unwrap();
            assert_eq!(report.not_applied.len(), 1, "{report}");
            assert_eq!(report.not_applied[0].key, "bgp.listen_port");
            assert!(
                report.not_applied[0].reason.contains("needs a restart"),
                "{report}"
            );
            assert!(accepts(1180).await);
            // Still on 1180, so the same request is tried again, not taken as done.
            assert_eq!(
                speaker
                    .reload(&section(peers.clone(), Some(1181)))
                    .await
                    .unwrap()
                    .not_applied
                    .len(),
                1
            );

            let report = speaker.reload(&section(peers, None)).await.unwrap();
            assert_eq!(report.applied, ["bgp.listen_port"]);
            announcer.stop.cancel();
        });
    }

    async fn settled(rx: &mut watch::Receiver<u64>, want: u64) {
        tokio::time::timeout(Duration::from_secs(1), rx.wait_for(|v| *v == want))
            .await
            .expect("flushed version")
            .expect("publisher alive");
    }

    #[tokio::test]
    async fn lowest_flushed_follows_peers_as_they_come_and_go() {
        let (set_tx, set_rx) = watch::channel(Vec::new());
        let (out_tx, mut out) = watch::channel(0);
        let task = tokio::spawn(lowest_flushed(set_rx, out_tx));
        // No peer: nothing to wait for.
        settled(&mut out, u64::MAX).await;

        let (a_tx, a_rx) = watch::channel(3);
        let (b_tx, b_rx) = watch::channel(5);
        set_tx.send_replace(vec![a_rx.clone(), b_rx.clone()]);
        settled(&mut out, 3).await;
        a_tx.send_replace(7);
        settled(&mut out, 5).await;

        // The slow peer is removed: only the other one counts.
        set_tx.send_replace(vec![a_rx.clone()]);
        settled(&mut out, 7).await;
        b_tx.send_replace(1);
        settled(&mut out, 7).await;

        // Every peer removed: back to nothing to wait for.
        set_tx.send_replace(Vec::new());
        settled(&mut out, u64::MAX).await;

        // A peer whose supervisor ended no longer counts; the speaker gone, the task ends.
        set_tx.send_replace(vec![a_rx]);
        settled(&mut out, 7).await;
        drop(a_tx);
        settled(&mut out, u64::MAX).await;
        drop(set_tx);
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("ends with the speaker")
            .unwrap();
    }
}
