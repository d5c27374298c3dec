//! One BGP session: drives the [`Fsm`] over a TCP connection, arms its timers, and keeps the
//! peer's Adj-RIB-Out in step with the lifecycle's route set.
//!
//! ```text
//!   socket ─frames─────────▶ ┌─────────┐ ─Input─▶ Fsm ─Output─▶ apply(): send, timers, status
//!   candidate ─frames──────▶ │         │
//!   listener ─connections──▶ │         │
//!   timers ────────────────▶ │ Session │
//!   routes (watch) ────────▶ │         │ ─UPDATEs (when Established)─▶ socket
//!   peer config, stop (watch)└─────────┘
//! ```
//!
//! All effects of the FSM's outputs happen in one function, [`Session::apply`]; I/O failures it
//! meets become inputs again. A connection the peer opens (`bgp.listen_port`) waits in the session
//! until the FSM takes it, refuses it, or tracks it as the collision candidate beside the
//! session's own (RFC 4271 §6.8, see `fsm.rs`). The session publishes a [`PeerStatus`] for
//! `/info` (with the Adj-RIB-Out as sent, for `/peers/{addr}/routes`) and the route
//! set version it has sent, which the lifecycle waits for before a VIP leaves `lo`; both
//! channels belong to its supervisor, which keeps them when it starts a failed session again.
//! New route attributes from a reload go out on the running session; the speaker's stop says
//! which Cease ends it.
//!
//! With BFD on the peer (RFC 5882 §4.3), the session follows its [`BfdStatus`]: BFD leaving Up
//! because the path failed drops the connection at once (as a TCP failure, event 18; the cause
//! goes to `/info` and the log), and with `bfd.strict` no connection is made or accepted while
//! BFD is not Up, so the session cannot reach Established before BFD does. A peer taking BFD
//! `AdminDown` leaves BGP alone (RFC 5882 §3.2).

use std::{
    collections::{BTreeMap, HashSet, VecDeque},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use ipnet::IpNet;
use tokio::{
    net::{TcpSocket, TcpStream},
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tokio_util::codec::Framed;
use tracing::{debug, info, warn};

use super::{
    codec::{self, Attributes, BgpCodec, Family, Message, Origin, ReceivedUpdate},
    fsm::{ConfigChange, Fsm, FsmConfig, Input, Negotiated, Output, State},
    rib_out::{AdjRibOut, Changes},
};
use crate::{
    app::Community,
    bfd::{BfdStatus, packet::State as BfdState},
    config::{self, PeerConfig},
    messages::Routes,
    metrics::Metrics,
    netlink::Netlink,
    timer::Timer,
};

/// `LOCAL_PREF` sent to iBGP peers when none is configured (the usual default).
const DEFAULT_LOCAL_PREF: u32 = 100;
/// The longest a write may wait for the peer to read.
const MAX_WRITE_WAIT: Duration = Duration::from_secs(30);
/// TTL of eBGP sessions without `multihop`: GoCast's default (multihop for every eBGP peer).
const EBGP_DEFAULT_TTL: u32 = 255;
/// How long a stopping session waits for the peer to close the connection after our Cease.
const CLOSE_WAIT: Duration = Duration::from_millis(500);
/// RFC 8326: the `GRACEFUL_SHUTDOWN` community.
const GRACEFUL_SHUTDOWN: u32 = 0xFFFF_0000;

/// What `/info` shows of a peer.
#[derive(Debug, Clone)]
pub struct PeerStatus {
    pub address: Option<IpAddr>,
    pub asn: u32,
    pub state: State,
    pub established_at: Option<Instant>,
    /// The last session error (kept after the session comes back, for operators).
    pub last_error: Option<String>,
    /// The last NOTIFICATION sent or received, as text (e.g. `received administrative
    /// shutdown (6/2): "maintenance"`).
    pub last_notification: Option<String>,
    pub messages_in: u64,
    pub messages_out: u64,
    pub prefixes_advertised: usize,
    /// Prefixes the peer announces to us now (its Adj-RIB-In's size; we install none).
    pub prefixes_received: usize,
    /// The families whose routes go to this peer: negotiated and with a next hop. Empty
    /// unless Established; a VIP of another family is not announced to this peer.
    pub families: Vec<Family>,
    /// Set while the session's task is down (it panicked or ended by itself) and waits to be
    /// restarted: why. `/healthz` reports it.
    pub task_down: Option<String>,
    /// What the peer was last sent for each prefix and not withdrawn since: the Adj-RIB-Out
    /// as it went out (`GET /peers/{addr}/routes`). Empty while the session is down.
    pub sent: Arc<BTreeMap<IpNet, SentRoute>>,
    /// The peer's BFD session, when `bfd` is set.
    pub bfd: Option<BfdStatus>,
}

/// One route as it was last sent to the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentRoute {
    /// The `NEXT_HOP` (IPv4) or the `MP_REACH_NLRI` next hop (IPv6).
    pub next_hop: IpAddr,
    /// Shared with every route sent with the same attributes.
    pub attributes: Arc<Attributes>,
    /// When the UPDATE carrying it was sent.
    pub sent_at: SystemTime,
}

impl PeerStatus {
    /// A peer whose session has not started yet.
    pub fn new(peer: &PeerConfig) -> Self {
        Self {
            address: peer.peer_ip,
            asn: peer.peer_as,
            state: State::Idle,
            established_at: None,
            last_error: None,
            last_notification: None,
            messages_in: 0,
            messages_out: 0,
            prefixes_advertised: 0,
            prefixes_received: 0,
            families: Vec::new(),
            task_down: None,
            sent: Arc::default(),
            bfd: None,
        }
    }
}

/// Why a connection attempt failed.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("no peer_ip configured and no default gateway to use as the peer")]
    NoPeer,
    #[error(transparent)]
    Netlink(#[from] crate::netlink::NetlinkError),
    #[error("connecting to {addr}: {source}")]
    Io { addr: SocketAddr, source: io::Error },
}

/// Why the speaker ends a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopCause {
    /// The agent is shutting down: Cease / Administrative Shutdown (6/2).
    Shutdown,
    /// A reload removed the peer or changed its session parameters.
    Config(ConfigChange),
}

/// Whether, and why, the speaker wants the session gone; a speaker that is gone (the channel
/// closed) counts as a shutdown.
pub fn stop_requested(stop: &mut watch::Receiver<Option<StopCause>>) -> Option<StopCause> {
    let cause = *stop.borrow_and_update();
    match cause {
        Some(cause) => Some(cause),
        None if stop.has_changed().is_err() => Some(StopCause::Shutdown),
        None => None,
    }
}

/// The speaker-wide settings a session needs.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    /// The peer's configuration. A reload changes only route attributes through it; any other
    /// change starts a new session.
    pub peer: watch::Receiver<PeerConfig>,
    pub router_id: Ipv4Addr,
    /// Set when graceful shutdown (RFC 8326) starts: re-announce everything with
    /// `GRACEFUL_SHUTDOWN`.
    pub graceful: watch::Receiver<bool>,
}

/// What a session shares with its supervisor, which keeps it across restarts of the session
/// task: the API and the lifecycle hold the other ends.
pub struct SessionLinks<'a> {
    /// The route set to announce.
    pub routes: watch::Receiver<Routes>,
    /// `Some` once the speaker wants the session gone.
    pub stop: watch::Receiver<Option<StopCause>>,
    /// Connections the peer opened to our listener (`bgp.listen_port`).
    pub incoming: &'a mut mpsc::Receiver<TcpStream>,
    /// What `/info` shows.
    pub status: &'a watch::Sender<PeerStatus>,
    /// The route-set version this peer has been sent (see `Announcer::flushed`).
    pub flushed: &'a watch::Sender<u64>,
    /// The peer's BFD session, when `bfd` is set.
    pub bfd: Option<watch::Receiver<BfdStatus>>,
}

/// One peer's session task.
pub struct Session<'a> {
    settings: SessionSettings,
    /// The current configuration of the peer (the latest of `settings.peer`).
    peer: PeerConfig,
    fsm: Fsm,
    netlink: Netlink,
    metrics: Metrics,
    conn: Option<Framed<TcpStream, BgpCodec>>,
    /// The peer's connection that just arrived, until the FSM says whether to take it, track
    /// it as the collision candidate, or refuse it.
    arriving: Option<TcpStream>,
    /// The peer's second connection while ours is in `OpenSent`/`OpenConfirm` (RFC 4271 §6.8):
    /// kept until an OPEN decides which connection survives.
    candidate: Option<Framed<TcpStream, BgpCodec>>,
    connecting: Option<JoinHandle<Result<TcpStream, ConnectError>>>,
    hold: Timer,
    keepalive: Timer,
    retry: Timer,
    rib: AdjRibOut,
    /// The prefixes the peer announces to us, for the count in `/info`: nothing else reads
    /// them (the agent installs no route).
    received: HashSet<IpNet>,
    negotiated: Option<Negotiated>,
    /// Next hops announced on this session, found when it is established.
    next_hop4: Option<Ipv4Addr>,
    next_hop6: Option<Ipv6Addr>,
    routes: watch::Receiver<Routes>,
    stop: watch::Receiver<Option<StopCause>>,
    status: &'a watch::Sender<PeerStatus>,
    flushed: &'a watch::Sender<u64>,
    /// The cause of the failure being processed (connect refused, decode error, ...): the FSM's
    /// reason is generic, this is what an operator needs in `/info`.
    cause: Option<String>,
    /// Connections the peer opened to our listener (`bgp.listen_port`).
    incoming: &'a mut mpsc::Receiver<TcpStream>,
    /// Label for logs and metrics: the peer's address, or "autodiscover".
    name: String,
    bfd: Option<watch::Receiver<BfdStatus>>,
    /// Whether BFD was Up at its last status: a failure is a change from Up.
    bfd_up: bool,
    /// The speaker stopped the session: its last connection is closed gracefully.
    stopping: bool,
}

impl<'a> Session<'a> {
    pub fn new(
        mut settings: SessionSettings,
        netlink: Netlink,
        metrics: Metrics,
        links: SessionLinks<'a>,
    ) -> Self {
        let peer = settings.peer.borrow_and_update().clone();
        let fsm = Fsm::new(FsmConfig {
            local_as: peer.local_as,
            peer_as: peer.peer_as,
            router_id: settings.router_id,
            hold_time: peer.hold_time,
            families: vec![Family::Ipv4Unicast, Family::Ipv6Unicast],
            passive: peer.passive,
        });
        let name = peer_name(&peer);
        Self {
            settings,
            peer,
            fsm,
            netlink,
            metrics,
            conn: None,
            arriving: None,
            candidate: None,
            connecting: None,
            hold: Timer::default(),
            keepalive: Timer::default(),
            retry: Timer::default(),
            rib: AdjRibOut::default(),
            received: HashSet::new(),
            negotiated: None,
            next_hop4: None,
            next_hop6: None,
            routes: links.routes,
            stop: links.stop,
            status: links.status,
            flushed: links.flushed,
            cause: None,
            incoming: links.incoming,
            name,
            bfd: links.bfd,
            bfd_up: false,
            stopping: false,
        }
    }

    /// Runs until the speaker sets `stop`; then says goodbye (the Cease of the cause) and
    /// returns.
    pub async fn run(mut self) {
        let mut inputs = VecDeque::from([Input::ManualStart]);
        let mut graceful = self.settings.graceful.clone();
        if let Some(bfd) = self.bfd.as_mut() {
            bfd.mark_changed();
        }
        loop {
            while let Some(input) = inputs.pop_front() {
                let outputs = self.fsm.process(input);
                self.apply(outputs, &mut inputs).await;
            }
            if self.stopping {
                return;
            }
            let input = tokio::select! {
                _ = self.stop.changed() => {
                    let Some(cause) = stop_requested(&mut self.stop) else {
                        continue;
                    };
                    self.stopping = true;
                    match cause {
                        StopCause::Shutdown => Input::ManualStop { reason: "gocast shutting down".into() },
                        StopCause::Config(change) => Input::ConfigStop(change),
                    }
                }
                frame = next_frame(&mut self.conn) => self.on_frame(frame),
                frame = next_frame(&mut self.candidate) => self.on_candidate_frame(frame),
                done = connect_done(&mut self.connecting) => self.on_connect(done),
                Some(stream) = self.incoming.recv() => {
                    if self.bfd_gate().is_some() && !self.bfd_up {
                        debug!("refusing an incoming connection: BFD is not up (bfd.strict)");
                        tokio::spawn(reject(stream));
                        continue;
                    }
                    self.arriving = Some(stream);
                    Input::TcpConnectionConfirmed
                }
                () = self.hold.fired() => Input::HoldTimerExpired,
                () = self.keepalive.fired() => Input::KeepaliveTimerExpired,
                () = self.retry.fired() => Input::ConnectRetryTimerExpired,
                Ok(()) = self.routes.changed() => {
                    self.sync_routes(&mut inputs).await;
                    continue;
                }
                Ok(()) = graceful.changed() => {
                    // Everything goes out again with the new community set.
                    self.sync_routes(&mut inputs).await;
                    continue;
                }
                Ok(()) = self.settings.peer.changed() => {
                    self.reconfigure(&mut inputs).await;
                    continue;
                }
                Some(()) = bfd_changed(&mut self.bfd) => match self.on_bfd() {
                    Some(input) => input,
                    None => continue,
                },
            };
            inputs.push_back(input);
        }
    }

    /// A reload changed this peer's route attributes (communities, MED, origin, `LOCAL_PREF`,
    /// `NEXT_HOP`); the speaker resets the session for anything else. The Adj-RIB-Out diff then
    /// sends UPDATEs for the prefixes whose attributes changed, on the running session.
    async fn reconfigure(&mut self, inputs: &mut VecDeque<Input>) {
        let peer = self.settings.peer.borrow_and_update().clone();
        let next_hop_changed = peer.next_hop != self.peer.next_hop;
        self.peer = peer;
        debug!("route attributes reconfigured");
        if next_hop_changed && self.negotiated.is_some() {
            self.find_next_hops().await;
            // The next hop is not among the attributes the Adj-RIB-Out compares: everything
            // goes out again (each announcement replaces the peer's previous path).
            self.rib.clear();
        }
        self.sync_routes(inputs).await;
    }

    fn on_frame(&mut self, frame: Option<Result<Message, codec::DecodeError>>) -> Input {
        match frame {
            Some(Ok(message)) => {
                self.status.send_modify(|s| s.messages_in += 1);
                self.count_message("in", &message);
                match message {
                    Message::Open(open) => Input::OpenReceived(open),
                    Message::Update(update) => Input::UpdateReceived(update),
                    Message::Notification(n) => Input::NotificationReceived(n),
                    Message::Keepalive => Input::KeepaliveReceived,
                    Message::RouteRefresh(family) => Input::RouteRefreshReceived(family),
                }
            }
            Some(Err(e)) if e.is_transport() => {
                self.note_error(format!("connection lost: {e}"));
                Input::TcpConnectionClosed
            }
            Some(Err(e)) => {
                warn!(error = %e, "malformed message from peer");
                self.note_error(format!("malformed message: {e}"));
                Input::DecodeFailed(e.notification())
            }
            None => Input::TcpConnectionClosed,
        }
    }

    /// A message on the collision candidate: only its OPEN matters; anything else ends it.
    fn on_candidate_frame(&mut self, frame: Option<Result<Message, codec::DecodeError>>) -> Input {
        match frame {
            Some(Ok(message)) => {
                self.count_message("in", &message);
                match message {
                    Message::Open(open) => Input::CandidateOpenReceived(open),
                    Message::Notification(_) => Input::CandidateFailed { answer: None },
                    // RFC 6608: anything but OPEN in OpenSent is an FSM error.
                    _ => Input::CandidateFailed {
                        answer: Some(codec::Notification {
                            code: codec::error_code::FSM,
                            subcode: 1,
                            data: Vec::new(),
                        }),
                    },
                }
            }
            Some(Err(e)) if !e.is_transport() => Input::CandidateFailed {
                answer: Some(e.notification()),
            },
            Some(Err(_)) | None => Input::CandidateFailed { answer: None },
        }
    }

    /// A new BFD status: shown in `/info`; a failure of the path drops the connection.
    fn on_bfd(&mut self) -> Option<Input> {
        let status = self.bfd.as_mut()?.borrow_and_update().clone();
        let was_up = std::mem::replace(&mut self.bfd_up, status.state == BfdState::Up);
        let failed = status.failed(was_up);
        let reason = status.last_down.clone().unwrap_or_default();
        let peer_admin_down = was_up && !failed && status.state != BfdState::Up;
        self.status.send_modify(|s| s.bfd = Some(status));
        if peer_admin_down {
            info!("the peer took BFD down administratively: BGP stays up (RFC 5882 §3.2)");
        }
        if !failed || self.conn.is_none() {
            return None;
        }
        self.note_error(format!("BFD session down: {reason}"));
        Some(Input::TcpConnectionFails)
    }

    /// With `bfd.strict`, BFD's status until it is Up: connections wait for it.
    fn bfd_gate(&self) -> Option<watch::Receiver<BfdStatus>> {
        let strict = self.peer.bfd.is_some_and(|b| b.strict);
        self.bfd.clone().filter(|_| strict)
    }

    fn on_connect(&mut self, done: Result<TcpStream, ConnectError>) -> Input {
        self.connecting = None;
        match done {
            Ok(stream) => {
                self.conn = Some(Self::framed(stream));
                self.show_address();
                Input::TcpCrAcked
            }
            Err(e) => {
                // Logged (once per new cause) with the SessionDown that follows.
                self.note_error(e.to_string());
                Input::TcpConnectionFails
            }
        }
    }

    /// A new connection of this session, ours or the peer's.
    fn framed(stream: TcpStream) -> Framed<TcpStream, BgpCodec> {
        // Small messages (KEEPALIVEs, single withdrawals) must leave at once.
        if let Err(e) = stream.set_nodelay(true) {
            debug!(error = %e, "cannot set TCP_NODELAY");
        }
        Framed::new(stream, BgpCodec::new())
    }

    /// Shows the address the session's connection goes to (an autodiscovered peer's, too).
    fn show_address(&self) {
        if let Some(remote) = self
            .conn
            .as_ref()
            .and_then(|c| c.get_ref().peer_addr().ok())
        {
            self.status
                .send_modify(|s| s.address = Some(remote.ip().to_canonical()));
        }
    }

    /// Remembers why the session is about to go down, for the `SessionDown` that follows.
    fn note_error(&mut self, error: String) {
        self.cause = Some(error);
    }

    /// Carries out the FSM's outputs in order; I/O failures become inputs.
    async fn apply(&mut self, outputs: Vec<Output>, inputs: &mut VecDeque<Input>) {
        for output in outputs {
            match output {
                Output::Connect => self.start_connect(),
                Output::AcceptConnection => {
                    if let Some(task) = self.connecting.take() {
                        task.abort();
                    }
                    self.conn = self.arriving.take().map(Self::framed);
                    self.show_address();
                }
                Output::RefuseConnection(notification) => {
                    if let Some(stream) = self.arriving.take() {
                        debug!(state = %self.fsm.state(), %notification, "refusing the peer's connection");
                        tokio::spawn(close_with(stream, notification));
                    }
                }
                Output::TrackCandidate => {
                    self.candidate = self.arriving.take().map(Self::framed);
                }
                Output::SendToCandidate(message) => self.send_to_candidate(message, inputs).await,
                Output::CloseCandidate {
                    notification,
                    reason,
                } => {
                    if let Some(candidate) = self.candidate.take() {
                        info!(%reason, "closing the peer's other connection");
                        if let Some(n) = notification {
                            self.count_message("out", &Message::Notification(n.clone()));
                            tokio::spawn(close_with(candidate.into_inner(), n));
                        }
                    }
                }
                Output::PromoteCandidate { reason } => {
                    info!(%reason, "using the peer's other connection");
                    self.conn = self.candidate.take();
                    self.show_address();
                    // The failure of the closed connection is not the session's.
                    self.cause = None;
                }
                Output::SendMessage(message) => {
                    let limit = self.write_limit();
                    // Counted before the write takes the message; a failed write is counted
                    // too (the peer may have read part of it), and logged.
                    if self.conn.is_some() {
                        self.count_message("out", &message);
                    }
                    if let Some(conn) = self.conn.as_mut() {
                        let sent =
                            tokio::time::timeout(limit, SinkExt::<Message>::send(conn, message))
                                .await;
                        self.after_write(sent, 1, inputs);
                    }
                }
                Output::CloseConnection => {
                    if let Some(task) = self.connecting.take() {
                        task.abort();
                    }
                    match self.conn.take() {
                        Some(conn) if self.stopping => close_after_peer(conn).await,
                        _ => {}
                    }
                }
                Output::SetHoldTimer(d) => self.hold.set(d),
                Output::SetKeepaliveTimer(d) => self.keepalive.set(d),
                Output::SetConnectRetryTimer(d) => self.retry.set(d),
                Output::Established(negotiated) => self.established(negotiated, inputs).await,
                Output::SessionDown {
                    reason,
                    notification_sent,
                    notification_received,
                } => self.session_down(
                    reason,
                    notification_sent.as_ref(),
                    notification_received.as_ref(),
                ),
                Output::StateChanged { from, to } => {
                    debug!(%from, %to, "bgp state");
                    if from == State::Established && to != State::Established {
                        self.metrics.bgp_session_flap(&self.name);
                    }
                    self.metrics
                        .peer_state(&self.name, to == State::Established);
                    self.status.send_modify(|s| s.state = to);
                }
                Output::ResendAdjRibOut(family) => {
                    let changes = self.rib.all(family);
                    self.send_changes(&changes, inputs).await;
                }
                Output::UpdateReceived(update) => self.received(&update),
            }
        }
    }

    /// The session or the attempt ended: report it once per new cause, forget what the peer
    /// was sent (it dropped our routes), and count every route-set version as sent to it.
    fn session_down(
        &mut self,
        reason: String,
        notification_sent: Option<&codec::Notification>,
        notification_received: Option<&codec::Notification>,
    ) {
        let notification = match (notification_sent, notification_received) {
            (Some(n), _) => Some(format!("sent {n}")),
            (_, Some(n)) => Some(format!("received {n}")),
            _ => None,
        };
        let detail = match (self.cause.take(), &notification) {
            (Some(cause), Some(n)) => format!("{reason}: {cause} ({n})"),
            (Some(cause), None) => format!("{reason}: {cause}"),
            (None, Some(n)) => format!("{reason} ({n})"),
            (None, None) => reason,
        };
        let was_up = self.negotiated.take().is_some();
        let repeated = self.status.borrow().last_error.as_ref() == Some(&detail);
        // A peer that stays down would log every retry: say it once per new cause.
        if was_up || !repeated {
            warn!(reason = %detail, "session down");
        }
        self.rib.clear();
        self.received = HashSet::new();
        self.metrics.prefixes_received(&self.name, 0);
        self.next_hop4 = None;
        self.next_hop6 = None;
        self.status.send_modify(|s| {
            s.last_error = Some(detail);
            if notification.is_some() {
                s.last_notification = notification;
            }
            s.established_at = None;
            s.prefixes_advertised = 0;
            s.prefixes_received = 0;
            s.families.clear();
            s.sent = Arc::default();
        });
        // Nothing is announced to a peer that is down: any version counts as sent.
        self.flushed.send_replace(self.routes.borrow().version);
    }

    /// Sends on the collision candidate; a failed write ends the candidate.
    async fn send_to_candidate(&mut self, message: Message, inputs: &mut VecDeque<Input>) {
        if self.candidate.is_some() {
            self.count_message("out", &message);
        }
        if let Some(candidate) = self.candidate.as_mut() {
            let sent =
                tokio::time::timeout(MAX_WRITE_WAIT, SinkExt::<Message>::send(candidate, message))
                    .await;
            if !matches!(sent, Ok(Ok(()))) {
                inputs.push_back(Input::CandidateFailed { answer: None });
            }
        }
    }

    /// Follows the peer's announcements and withdrawals for the received-prefix count.
    /// Treat-as-withdraw (RFC 7606 §2) withdraws the UPDATE's announced prefixes too.
    fn received(&mut self, update: &ReceivedUpdate) {
        for prefix in &update.withdrawn {
            self.received.remove(prefix);
        }
        if let Some(why) = &update.treat_as_withdraw {
            warn!(reason = %why, "malformed UPDATE treated as withdraw (RFC 7606)");
            for prefix in &update.announced {
                self.received.remove(prefix);
            }
        } else {
            self.received.extend(update.announced.iter().copied());
        }
        let count = self.received.len();
        self.metrics.prefixes_received(&self.name, count);
        self.status.send_modify(|s| s.prefixes_received = count);
    }

    fn start_connect(&mut self) {
        if let Some(task) = self.connecting.take() {
            task.abort();
        }
        let peer = self.peer.clone();
        let netlink = self.netlink.clone();
        let gate = self.bfd_gate();
        self.connecting = Some(tokio::spawn(async move {
            if let Some(mut gate) = gate {
                // The BFD session outlives this task (its supervisor holds it).
                let _ = gate.wait_for(|s| s.state == BfdState::Up).await;
            }
            connect(&peer, &netlink).await
        }));
    }

    /// The global address of a family on the interface toward the peer; errors are logged.
    async fn detect_next_hop(&self, remote: Option<IpAddr>, v6: bool) -> Option<IpAddr> {
        let remote = remote?;
        match self.netlink.global_address_toward(remote, v6).await {
            Ok(found) => found,
            Err(e) => {
                warn!(error = %e, "cannot look up a next hop");
                None
            }
        }
    }

    /// This session's next hops: configured, else the session's own address, else the
    /// interface's address of that family (a session over IPv4 still carries IPv6 VIPs, and
    /// the other way round).
    async fn find_next_hops(&mut self) {
        let (local, remote) = match self.conn.as_ref().map(Framed::get_ref) {
            // Accepted on the dual-stack listener, IPv4 peers show as v4-mapped addresses.
            Some(s) => (
                s.local_addr().ok().map(|a| a.ip().to_canonical()),
                s.peer_addr().ok().map(|a| a.ip().to_canonical()),
            ),
            None => (None, None),
        };
        let configured4 = self.peer.next_hop.or(match self.peer.local_ip {
            Some(IpAddr::V4(a)) => Some(a),
            _ => None,
        });
        self.next_hop4 = match (configured4, local) {
            (Some(a), _) | (None, Some(IpAddr::V4(a))) => Some(a),
            _ => self
                .detect_next_hop(remote, false)
                .await
                .and_then(|a| match a {
                    IpAddr::V4(a) => Some(a),
                    IpAddr::V6(_) => None,
                }),
        };
        self.next_hop6 = match (self.peer.local_ipv6, local) {
            (Some(a), _) => Some(a),
            (None, Some(IpAddr::V6(a))) if !a.is_unicast_link_local() => Some(a),
            _ => self
                .detect_next_hop(remote, true)
                .await
                .and_then(|a| match a {
                    IpAddr::V6(a) => Some(a),
                    IpAddr::V4(_) => None,
                }),
        };
    }

    async fn established(&mut self, negotiated: Negotiated, inputs: &mut VecDeque<Input>) {
        if let Some(conn) = self.conn.as_mut() {
            conn.codec_mut().set_four_octet_as(negotiated.four_octet_as);
        }
        self.find_next_hops().await;
        for (family, missing) in [
            ("IPv4", self.next_hop4.is_none()),
            ("IPv6", self.next_hop6.is_none()),
        ] {
            if missing && negotiated.families.len() > 1 {
                warn!(
                    family,
                    "no address of this family toward the peer: its VIPs are not announced on this session (set local_ip / local_ipv6 / next_hop)"
                );
            }
        }
        info!(
            hold = ?negotiated.hold_time,
            families = ?negotiated.families,
            next_hop4 = ?self.next_hop4,
            next_hop6 = ?self.next_hop6,
            "session established"
        );
        self.metrics.peer_established(&self.name);
        self.negotiated = Some(negotiated);
        self.status
            .send_modify(|s| s.established_at = Some(Instant::now()));
        self.rib.clear();
        self.sync_routes(inputs).await;
        // RFC 4724 §2: End-of-RIB after the initial table, per family.
        let families = self
            .negotiated
            .as_ref()
            .map(|n| n.families.clone())
            .unwrap_or_default();
        for family in families {
            self.send_bytes(vec![codec::encode_end_of_rib(family)], inputs)
                .await;
        }
    }

    /// Brings the peer to the current route set, if established; records the version sent.
    async fn sync_routes(&mut self, inputs: &mut VecDeque<Input>) {
        let routes = self.routes.borrow_and_update().clone();
        let Some(negotiated) = self.negotiated.as_ref() else {
            self.flushed.send_replace(routes.version);
            return;
        };
        let graceful = *self.settings.graceful.borrow();
        let ibgp = negotiated.ibgp;
        let families: Vec<Family> = negotiated
            .families
            .iter()
            .copied()
            .filter(|f| match f {
                Family::Ipv4Unicast => self.next_hop4.is_some(),
                Family::Ipv6Unicast => self.next_hop6.is_some(),
            })
            .collect();
        // Apps share a handful of attribute sets: each is built once and shared by its routes.
        let mut shared: HashSet<Arc<Attributes>> = HashSet::new();
        let desired: BTreeMap<IpNet, Arc<Attributes>> = routes
            .iter()
            .map(|(prefix, route)| {
                let attrs = attributes(
                    &self.peer,
                    &route.communities,
                    ibgp,
                    (graceful || route.drain).then_some(self.peer.drain_local_pref),
                );
                let attrs = if let Some(a) = shared.get(&attrs) {
                    Arc::clone(a)
                } else {
                    let a = Arc::new(attrs);
                    shared.insert(Arc::clone(&a));
                    a
                };
                (*prefix, attrs)
            })
            .collect();
        let changes = self.rib.update(&desired, &families);
        self.send_changes(&changes, inputs).await;
        self.metrics.prefixes_advertised(&self.name, self.rib.len());
        let count = self.rib.len();
        self.status.send_modify(|s| {
            s.prefixes_advertised = count;
            s.families = families;
        });
        self.flushed.send_replace(routes.version);
    }

    async fn send_changes(&mut self, changes: &Changes, inputs: &mut VecDeque<Input>) {
        let four_octet = self.negotiated.as_ref().is_some_and(|n| n.four_octet_as);
        let mut messages = Vec::new();
        let mut sent = Vec::new();
        for (_, prefixes) in &changes.withdraw {
            messages.extend(codec::encode_withdraw(prefixes));
        }
        for (family, attrs, prefixes) in &changes.announce {
            let next_hop = match family {
                Family::Ipv4Unicast => self.next_hop4.map(IpAddr::V4),
                Family::Ipv6Unicast => self.next_hop6.map(IpAddr::V6),
            };
            if let Some(next_hop) = next_hop {
                messages.extend(codec::encode_announce(
                    attrs, next_hop, prefixes, four_octet,
                ));
                sent.push((next_hop, attrs, prefixes));
            }
        }
        if messages.is_empty() {
            return;
        }
        self.metrics.updates_sent(&self.name, messages.len());
        self.send_bytes(messages, inputs).await;
        // Published in place: the map is copied only while a reader holds the previous one.
        let sent_at = SystemTime::now();
        self.status.send_modify(|s| {
            let view = Arc::make_mut(&mut s.sent);
            for (_, prefixes) in &changes.withdraw {
                for prefix in prefixes {
                    view.remove(prefix);
                }
            }
            for (next_hop, attributes, prefixes) in sent {
                for prefix in prefixes {
                    let route = SentRoute {
                        next_hop,
                        attributes: Arc::clone(attributes),
                        sent_at,
                    };
                    view.insert(*prefix, route);
                }
            }
        });
    }

    /// Queues pre-encoded messages and flushes once.
    async fn send_bytes(&mut self, messages: Vec<Bytes>, inputs: &mut VecDeque<Input>) {
        let limit = self.write_limit();
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        let count = messages.len() as u64;
        // Every pre-encoded message is an UPDATE (routes, withdrawals, End-of-RIB).
        self.metrics
            .bgp_messages(&self.name, "out", "update", count);
        let sent = tokio::time::timeout(limit, async {
            for m in messages {
                SinkExt::<Bytes>::feed(conn, m).await?;
            }
            SinkExt::<Bytes>::flush(conn).await
        })
        .await;
        self.after_write(sent, count, inputs);
    }

    /// Counts one message by direction and type, and a NOTIFICATION by its code and subcode.
    fn count_message(&self, direction: &'static str, message: &Message) {
        let kind = match message {
            Message::Open(_) => "open",
            Message::Update(_) => "update",
            Message::Notification(_) => "notification",
            Message::Keepalive => "keepalive",
            Message::RouteRefresh(_) => "route_refresh",
        };
        self.metrics.bgp_messages(&self.name, direction, kind, 1);
        if let Message::Notification(n) = message {
            self.metrics
                .bgp_notification(&self.name, direction, n.code, n.subcode);
        }
    }

    /// How long one write may block: a peer that stops reading (its receive window full)
    /// must not freeze this session's timers, route changes and shutdown.
    fn write_limit(&self) -> Duration {
        self.negotiated
            .as_ref()
            .map(|n| n.hold_time)
            .filter(|h| !h.is_zero())
            .map_or(MAX_WRITE_WAIT, |h| h.min(MAX_WRITE_WAIT))
    }

    /// Counts a finished write, or turns a failed or stuck one into a lost connection.
    fn after_write(
        &mut self,
        sent: Result<io::Result<()>, tokio::time::error::Elapsed>,
        count: u64,
        inputs: &mut VecDeque<Input>,
    ) {
        match sent {
            Ok(Ok(())) => self.status.send_modify(|s| s.messages_out += count),
            Ok(Err(e)) => {
                self.note_error(format!("send failed: {e}"));
                inputs.push_back(Input::TcpConnectionClosed);
            }
            Err(_) => {
                self.note_error(format!("peer stopped reading for {:?}", self.write_limit()));
                // Dropped, not closed politely: a NOTIFICATION would only block again.
                self.conn = None;
                inputs.push_back(Input::TcpConnectionClosed);
            }
        }
    }
}

/// A peer's label in logs and metrics: its address, or "autodiscover".
pub fn peer_name(peer: &PeerConfig) -> String {
    peer.peer_ip
        .map_or_else(|| "autodiscover".to_owned(), |ip| ip.to_string())
}

/// The attributes of one route toward one peer. `graceful`: the route is being shut down
/// (RFC 8326), with this `LOCAL_PREF` for iBGP peers.
fn attributes(
    peer: &PeerConfig,
    route_communities: &[Community],
    ibgp: bool,
    graceful: Option<u32>,
) -> Attributes {
    let mut communities = Vec::new();
    let mut large_communities = Vec::new();
    for c in peer.communities.iter().chain(route_communities) {
        match *c {
            Community::Standard(v) => communities.push(v),
            Community::Large(a, b, c) => large_communities.push((a, b, c)),
        }
    }
    if graceful.is_some() {
        communities.push(GRACEFUL_SHUTDOWN);
    }
    communities.sort_unstable();
    communities.dedup();
    large_communities.sort_unstable();
    large_communities.dedup();
    Attributes {
        origin: match peer.origin {
            config::Origin::Igp => Origin::Igp,
            config::Origin::Egp => Origin::Egp,
            config::Origin::Incomplete => Origin::Incomplete,
        },
        as_path: if ibgp {
            Vec::new()
        } else {
            vec![peer.local_as]
        },
        med: peer.med,
        local_pref: ibgp
            .then(|| graceful.unwrap_or_else(|| peer.local_pref.unwrap_or(DEFAULT_LOCAL_PREF))),
        communities,
        large_communities,
    }
}

/// Opens the TCP connection: source address and TTL as configured, the peer autodiscovered
/// (default gateway) when none is configured, as GoCast does.
async fn connect(peer: &PeerConfig, netlink: &Netlink) -> Result<TcpStream, ConnectError> {
    let (peer_ip, discovered_local) = if let Some(ip) = peer.peer_ip {
        (ip, None)
    } else {
        let (gateway, local) = netlink
            .default_gateway()
            .await?
            .ok_or(ConnectError::NoPeer)?;
        (gateway, Some(local))
    };
    let addr = SocketAddr::new(peer_ip, peer.peer_port);
    let io_err = |source| ConnectError::Io { addr, source };
    let socket = if peer_ip.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(io_err)?;
    if let Some(local) = peer
        .local_ip
        .or(discovered_local)
        .filter(|l| l.is_ipv4() == peer_ip.is_ipv4())
    {
        socket.bind(SocketAddr::new(local, 0)).map_err(io_err)?;
    }
    // eBGP peers are one hop away unless multihop says otherwise (RFC 4271 §5.1.3's usual
    // practice); iBGP keeps the system default.
    // GoCast enables multihop (TTL 255) for every eBGP peer; `multihop` sets the TTL.
    let ttl = match peer.multihop {
        Some(ttl) => Some(u32::from(ttl)),
        None if peer.peer_as != peer.local_as => Some(EBGP_DEFAULT_TTL),
        None => None,
    };
    if let Some(ttl) = ttl {
        let sock = socket2::SockRef::from(&socket);
        if peer_ip.is_ipv6() {
            sock.set_unicast_hops_v6(ttl)
        } else {
            sock.set_ttl_v4(ttl)
        }
        .map_err(io_err)?;
    }
    if let Some(password) = &peer.password {
        gocast_common::tcp_md5::set(&socket, peer_ip, password.as_bytes()).map_err(io_err)?;
    }
    socket.connect(addr).await.map_err(io_err)
}

/// Closes a connection we will not use with Cease / Connection Rejected (RFC 4486 §4), so the
/// peer knows why instead of seeing a bare close.
pub async fn reject(stream: TcpStream) {
    let cease = codec::Notification {
        code: codec::error_code::CEASE,
        subcode: codec::cease_subcode::CONNECTION_REJECTED,
        data: Vec::new(),
    };
    close_with(stream, cease).await;
}

/// Closes a stopping session's connection after its Cease: our side first (FIN after the
/// NOTIFICATION), then waits up to [`CLOSE_WAIT`] for the peer's, reading what it still sends.
///
/// The peer closes once it has processed the NOTIFICATION (RFC 4271 §6.1), so when this returns
/// the peer has seen the Cease: only then does the BFD session go `AdminDown` (BIRD 2.0 takes an
/// `AdminDown` that it reads before the Cease for a failure, "BFD session down"). Reading also
/// keeps the kernel from answering unread data with a reset, which can make the peer drop the
/// NOTIFICATION unread.
async fn close_after_peer(conn: Framed<TcpStream, BgpCodec>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = conn.into_inner();
    let drained = async {
        stream.shutdown().await?;
        let mut buf = [0u8; 4096];
        while stream.read(&mut buf).await? > 0 {}
        std::io::Result::Ok(())
    };
    match tokio::time::timeout(CLOSE_WAIT, drained).await {
        Ok(Ok(())) => debug!("the peer closed the connection after our Cease"),
        Ok(Err(e)) => debug!(error = %e, "closing the connection after our Cease"),
        Err(_) => debug!("the peer did not close the connection within {CLOSE_WAIT:?}"),
    }
}

/// Sends `notification` and closes. Bounded: the peer owes us nothing.
async fn close_with(mut stream: TcpStream, notification: codec::Notification) {
    use tokio::io::AsyncWriteExt;
    let bytes = codec::encode_notification(&notification);
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&bytes)).await;
}

async fn next_frame(
    conn: &mut Option<Framed<TcpStream, BgpCodec>>,
) -> Option<Result<Message, codec::DecodeError>> {
    match conn.as_mut() {
        Some(c) => c.next().await,
        None => std::future::pending().await,
    }
}

/// The next change of BFD's status; pending forever without BFD (or once it is gone).
async fn bfd_changed(bfd: &mut Option<watch::Receiver<BfdStatus>>) -> Option<()> {
    match bfd.as_mut() {
        Some(b) => b.changed().await.ok(),
        None => std::future::pending().await,
    }
}

async fn connect_done(
    task: &mut Option<JoinHandle<Result<TcpStream, ConnectError>>>,
) -> Result<TcpStream, ConnectError> {
    match task.as_mut() {
        Some(t) => match t.await {
            Ok(result) => result,
            Err(e) => Err(ConnectError::Io {
                addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                source: io::Error::other(e),
            }),
        },
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(local_as: u32, peer_as: u32) -> PeerConfig {
        PeerConfig {
            local_as,
            peer_as,
            peer_ip: Some("198.18.0.2".parse().unwrap()),
            peer_port: 179,
            local_ip: None,
            local_ipv6: None,
            password: None,
            multihop: None,
            hold_time: Duration::from_secs(90),
            communities: vec!["65001:1".parse().unwrap(), "1:2:3".parse().unwrap()],
            origin: config::Origin::Igp,
            next_hop: None,
            med: Some(5),
            local_pref: None,
            drain_local_pref: 0,
            passive: false,
            bfd: None,
        }
    }

    #[test]
    fn ebgp_routes_carry_our_as_and_all_communities_sorted() {
        let a = attributes(
            &peer(65001, 65000),
            &["65001:0".parse().unwrap(), "65001:1".parse().unwrap()],
            false,
            None,
        );
        assert_eq!(a.as_path, vec![65001]);
        assert_eq!(a.communities, vec![65001 << 16, 65001 << 16 | 1]);
        assert_eq!(a.large_communities, vec![(1, 2, 3)]);
        assert_eq!((a.med, a.local_pref), (Some(5), None));
    }

    #[test]
    fn ibgp_routes_have_an_empty_path_and_local_pref() {
        let a = attributes(&peer(65001, 65001), &[], true, None);
        assert!(a.as_path.is_empty());
        assert_eq!(a.local_pref, Some(DEFAULT_LOCAL_PREF));
    }

    /// The peer reads our side to its end (the FIN after the Cease), then takes a while before
    /// it closes: the session's connection is only done once the peer has closed.
    #[tokio::test]
    async fn a_stopping_session_closes_only_after_the_peer_has_closed() {
        use std::sync::atomic::{AtomicBool, Ordering};

        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ours = TcpStream::connect(listener.local_addr().unwrap());
        let (ours, theirs) = tokio::join!(ours, listener.accept());
        let (mut theirs, _) = theirs.unwrap();
        let peer_closed = Arc::new(AtomicBool::new(false));
        let flag = peer_closed.clone();
        let peer = tokio::spawn(async move {
            // Unread data of the peer's on our side, as a KEEPALIVE in flight would be.
            theirs.write_all(&[0xff; 19]).await.unwrap();
            let mut got = Vec::new();
            theirs.read_to_end(&mut got).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            flag.store(true, Ordering::SeqCst);
            drop(theirs);
            got
        });
        let mut conn = Framed::new(ours.unwrap(), BgpCodec::default());
        conn.get_mut().write_all(b"cease").await.unwrap();
        close_after_peer(conn).await;
        assert!(
            peer_closed.load(Ordering::SeqCst),
            "returned before the peer closed"
        );
        assert_eq!(
            peer.await.unwrap(),
            b"cease",
            "the peer read everything, then our FIN"
        );
    }

    #[tokio::test]
    async fn a_peer_that_never_closes_holds_the_stop_for_at_most_the_close_wait() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ours = TcpStream::connect(listener.local_addr().unwrap());
        let (ours, theirs) = tokio::join!(ours, listener.accept());
        let _theirs = theirs.unwrap();
        let started = tokio::time::Instant::now();
        close_after_peer(Framed::new(ours.unwrap(), BgpCodec::default())).await;
        assert!(started.elapsed() >= CLOSE_WAIT);
    }

    #[test]
    fn graceful_shutdown_adds_its_community() {
        let a = attributes(&peer(65001, 65000), &[], false, Some(0));
        assert!(a.communities.contains(&GRACEFUL_SHUTDOWN));
        assert_eq!(a.local_pref, None, "eBGP carries no LOCAL_PREF");
    }

    #[test]
    fn a_draining_route_to_an_ibgp_peer_gets_the_drain_local_pref() {
        let a = attributes(&peer(65001, 65001), &[], true, Some(7));
        assert!(a.communities.contains(&GRACEFUL_SHUTDOWN));
        assert_eq!(a.local_pref, Some(7));
    }
}
