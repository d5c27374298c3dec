//! One BFD session (RFC 5881 single hop): drives the [`Fsm`] with the packets the receiver
//! hands it and with its two timers, sends from a socket of its own (source port 49152–65535,
//! TTL / hop limit 255) and publishes a [`BfdStatus`].
//!
//! ```text
//!  receiver ─Received (mpsc)─▶ ┌─────────┐ ─Input─▶ Fsm ─Output─▶ apply(): send, timers, status
//!  transmit / detect timers ─▶ │ session │
//!  peer config (watch) ──────▶ │         │ ─BfdStatus (watch)─▶ BGP session, /info
//!  stop (token) ─────────────▶ └─────────┘ ─`AdminDown` packets, then ends
//! ```
//!
//! All effects of the FSM's outputs happen in [`Session::apply`]. On stop the session goes
//! `AdminDown` (Diag 7) and repeats it [`ADMIN_DOWN_PACKETS`] times, so the router sees a
//! deliberate shutdown and not a failure (RFC 5882 §3.2).

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    num::NonZeroU32,
    time::{Duration, Instant},
};

use serde::Serialize;
use tokio::{
    net::UdpSocket,
    sync::{mpsc, oneshot, watch},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    Bfd, PORT,
    fsm::{Fsm, Input, Output, Params, jittered},
    packet::{Diag, State},
    receiver::{self, Command, Received, TTL},
};
use crate::{backoff::XorShift, config::PeerConfig, metrics::Metrics, timer::Timer};

/// `AdminDown` packets sent at stop, one transmit interval apart (the first at once): one lost
/// packet must not turn a shutdown into a detection-time failure at the router.
pub const ADMIN_DOWN_PACKETS: u32 = 3;
/// Repeats that would end later than this after the first are left out: the shutdown waits
/// for them, and a session at the slow (not Up) rate has no failure to hide.
const ADMIN_DOWN_WITHIN: Duration = Duration::from_millis(800);
/// Source ports of single-hop sessions (RFC 5881 §4).
const SOURCE_PORTS: std::ops::RangeInclusive<u16> = 49152..=65535;
/// Tries at a free source port before giving up.
const BIND_TRIES: usize = 32;

/// What `/info`, `gocast status` and the BGP session see of a BFD session.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BfdStatus {
    pub state: State,
    pub remote_state: Option<State>,
    pub local_discriminator: Option<u32>,
    pub remote_discriminator: Option<u32>,
    /// Configured timers.
    pub min_tx_ms: u64,
    pub min_rx_ms: u64,
    pub multiplier: u8,
    /// The interval we send at now (before jitter), as agreed with the peer.
    pub transmit_interval_ms: Option<u64>,
    /// The time without a packet after which the session goes down.
    pub detection_time_ms: Option<u64>,
    /// Why the session last left Up (its diagnostic), e.g. `control detection time expired (1)`.
    pub last_down: Option<String>,
    /// When it went Up (for the uptime), while Up.
    #[serde(skip)]
    pub up_since: Option<Instant>,
    /// A socket error that keeps the session from running (it is retried).
    pub error: Option<String>,
}

impl BfdStatus {
    /// A session that has not started yet.
    pub fn new(params: Params) -> Self {
        Self {
            state: State::Down,
            remote_state: None,
            local_discriminator: None,
            remote_discriminator: None,
            min_tx_ms: millis(params.min_tx),
            min_rx_ms: millis(params.min_rx),
            multiplier: params.multiplier,
            transmit_interval_ms: None,
            detection_time_ms: None,
            last_down: None,
            up_since: None,
            error: None,
        }
    }

    /// Whether the session just left Up because the path failed, as opposed to the peer
    /// taking BFD down on purpose (`AdminDown`), which RFC 5882 §3.2 says must not take the
    /// client (BGP) down. `was_up`: the state before this status.
    pub fn failed(&self, was_up: bool) -> bool {
        was_up && self.state != State::Up && self.remote_state != Some(State::AdminDown)
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The timers of `peer.bfd` (the defaults when a reload has just turned it off: the session
/// is then being replaced).
pub fn params(peer: &PeerConfig) -> Params {
    let b = peer.bfd.unwrap_or_default();
    Params {
        min_tx: b.min_tx,
        min_rx: b.min_rx,
        multiplier: b.multiplier,
    }
}

/// Why a session cannot start.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("cannot bind the BFD receive port {PORT}: {0}")]
    Register(#[source] io::Error),
    #[error("cannot open a BFD transmit socket: {0}")]
    Transmit(#[source] io::Error),
    #[error("the BFD receiver has stopped")]
    ReceiverGone,
}

/// One running session.
pub struct Session {
    peer: IpAddr,
    dest_port: u16,
    name: String,
    fsm: Fsm,
    socket: UdpSocket,
    packets: mpsc::Receiver<Received>,
    transmit: Timer,
    detect: Timer,
    rng: XorShift,
    status: watch::Sender<BfdStatus>,
    metrics: Metrics,
}

impl Session {
    /// Registers with the receiver and opens the transmit socket. `peer_config` gives the
    /// peer's address, source address and timers.
    pub async fn start(
        bfd: &Bfd,
        peer_config: &PeerConfig,
        status: watch::Sender<BfdStatus>,
        metrics: Metrics,
    ) -> Result<Self, SessionError> {
        let peer = peer_config
            .peer_ip
            .ok_or(SessionError::Register(io::Error::other("no peer address")))?
            .to_canonical();
        let (packets_tx, packets) = mpsc::channel(receiver::QUEUE_LEN);
        let (reply, answer) = oneshot::channel();
        bfd.commands
            .send(Command::Register {
                peer,
                packets: packets_tx,
                reply,
            })
            .await
            .map_err(|_| SessionError::ReceiverGone)?;
        let discr = answer
            .await
            .map_err(|_| SessionError::ReceiverGone)?
            .map_err(SessionError::Register)?;
        let local = peer_config
            .local_ip
            .filter(|l| l.is_ipv4() == peer.is_ipv4());
        let mut rng = XorShift::from_os();
        let socket = transmit_socket(peer, local, &mut rng).map_err(SessionError::Transmit)?;
        let params = params(peer_config);
        Ok(Self {
            peer,
            dest_port: bfd.port,
            name: peer.to_string(),
            fsm: Fsm::new(discr, params),
            socket,
            packets,
            transmit: Timer::default(),
            detect: Timer::default(),
            rng,
            status,
            metrics,
        })
    }

    /// Runs until `stop`; then goes `AdminDown`, tells the peer, and returns.
    pub async fn run(
        mut self,
        mut peer_config: watch::Receiver<PeerConfig>,
        stop: CancellationToken,
    ) {
        info!(peer = %self.name, discriminator = self.fsm.local_discr(), "bfd session started");
        self.status.send_modify(|s| {
            s.error = None;
            s.local_discriminator = Some(self.fsm.local_discr().get());
        });
        let start = self.fsm.start();
        self.apply(start).await;
        loop {
            let input = tokio::select! {
                () = stop.cancelled() => break,
                Some(r) = self.packets.recv() => Input::Received(r.packet),
                () = self.transmit.fired() => Input::TransmitTimer,
                () = self.detect.fired() => Input::DetectTimer,
                Ok(()) = peer_config.changed() => {
                    let new = params(&peer_config.borrow_and_update());
                    // Any key of the peer may have changed; only new timers concern BFD.
                    if new == self.fsm.params() {
                        continue;
                    }
                    Input::Reconfigure(new)
                }
            };
            if let Input::Reconfigure(p) = &input {
                let p = *p;
                self.status.send_modify(|s| {
                    s.min_tx_ms = millis(p.min_tx);
                    s.min_rx_ms = millis(p.min_rx);
                    s.multiplier = p.multiplier;
                });
            }
            let outputs = self.fsm.process(input);
            self.apply(outputs).await;
        }
        self.admin_down().await;
    }

    /// `AdminDown` (§6.8.16), repeated [`ADMIN_DOWN_PACKETS`] times at the transmit interval.
    async fn admin_down(&mut self) {
        let outputs = self.fsm.process(Input::AdminDown);
        self.apply(outputs).await;
        let interval = self.fsm.transmit_interval().unwrap_or(super::fsm::SLOW_TX);
        let repeats = (1..ADMIN_DOWN_PACKETS)
            .take_while(|n| interval * *n <= ADMIN_DOWN_WITHIN)
            .count();
        for _ in 0..repeats {
            tokio::time::sleep(interval).await;
            let outputs = self.fsm.process(Input::TransmitTimer);
            self.apply(outputs).await;
        }
        debug!(peer = %self.name, "bfd session stopped (AdminDown sent)");
    }

    /// Carries out the FSM's outputs in order, then publishes the timing.
    async fn apply(&mut self, outputs: Vec<Output>) {
        for output in outputs {
            match output {
                Output::Send(packet) => {
                    let to = SocketAddr::new(self.peer, self.dest_port);
                    if let Err(e) = self.socket.send_to(&packet.encode(), to).await {
                        // The link may be down: detection handles it; not worth more than debug.
                        debug!(peer = %self.name, error = %e, "bfd: send failed");
                    }
                }
                Output::SetTransmitTimer(interval) => {
                    let mult = self.fsm.multiplier();
                    let next = interval.map(|i| jittered(i, mult, self.rng.below(u32::MAX)));
                    self.transmit.set(next);
                }
                Output::SetDetectTimer(after) => self.detect.set(after),
                Output::StateChanged { from, to, diag } => self.state_changed(from, to, diag),
            }
        }
        let (tx, detect) = (self.fsm.transmit_interval(), self.fsm.detection_time());
        let remote = self.fsm.remote_discr().map(NonZeroU32::get);
        self.status.send_if_modified(|s| {
            let new = (tx.map(millis), detect.map(millis), remote);
            let changed = (
                s.transmit_interval_ms,
                s.detection_time_ms,
                s.remote_discriminator,
            ) != new;
            (
                s.transmit_interval_ms,
                s.detection_time_ms,
                s.remote_discriminator,
            ) = new;
            changed
        });
    }

    fn state_changed(&mut self, from: State, to: State, diag: Diag) {
        let remote = self.fsm.remote_state();
        if to == State::Up {
            info!(peer = %self.name, %from, "bfd session up");
        } else if from == State::Up {
            warn!(peer = %self.name, %to, reason = %diag, "bfd session down");
        } else {
            debug!(peer = %self.name, %from, %to, "bfd state");
        }
        self.metrics.bfd_state(&self.name, to.name());
        self.status.send_modify(|s| {
            s.state = to;
            s.remote_state = remote;
            if from == State::Up {
                s.last_down = Some(diag.to_string());
            }
            s.up_since = (to == State::Up).then(Instant::now);
        });
    }
}

/// The session's own sending socket: source port in 49152–65535, TTL / hop limit 255.
fn transmit_socket(
    peer: IpAddr,
    local: Option<IpAddr>,
    rng: &mut XorShift,
) -> io::Result<UdpSocket> {
    let ip = local.unwrap_or(match peer {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    });
    let span = u32::from(SOURCE_PORTS.end() - SOURCE_PORTS.start()) + 1;
    let mut last = io::Error::other("no port tried");
    for _ in 0..BIND_TRIES {
        let offset = u16::try_from(rng.below(span)).unwrap_or(0);
        let port = SOURCE_PORTS.start() + offset;
        match receiver::udp(SocketAddr::new(ip, port)) {
            Ok(socket) => {
                let sock = socket2::SockRef::from(&socket);
                if peer.is_ipv6() {
                    sock.set_unicast_hops_v6(u32::from(TTL))?;
                } else {
                    sock.set_ttl_v4(u32::from(TTL))?;
                }
                return Ok(socket);
            }
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => last = e,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}
