//! The BGP finite state machine of one peer ([RFC 4271 §8]), for a speaker that only announces.
//!
//! No async, no tokio, no global state, no sockets, no clock. [`Fsm::process`] takes one [`Input`]
//! (an RFC 4271 §8.1 event: an operator request, a timer that fired, a change of the TCP
//! connection, a message from the peer) and returns the [`Output`]s the session task applies in
//! order: open or close the connection, send a message, arm (`Some`) or stop (`None`) a timer, and
//! report. The session owns the socket and the timers; the FSM makes every decision.
//!
//! Where we differ from RFC 4271 §8, and why:
//! - At most two connections, and only while no session is up: the session's own connection and,
//!   when the peer connects while ours is in `OpenSent` or `OpenConfirm`, the peer's one, tracked
//!   as a *candidate* until an OPEN tells which survives (collision detection, [RFC 4271 §6.8]):
//!   the connection opened by the side with the higher BGP Identifier (the higher AS when the
//!   identifiers are equal, [RFC 6286 §2.3]) is kept, the other gets Cease / Connection
//!   Collision Resolution (6/7, [RFC 4486]). Both sides apply the same rule, so they keep the
//!   same connection. A connection while Established, or a third one, is closed with 6/7; one
//!   in Idle with Cease / Connection Rejected (6/5). No `DelayOpen` (§8.1.1).
//! - The `ConnectRetryTimer` has two jobs. In Connect it bounds the outgoing connect
//!   ([`CONNECT_RETRY_TIME`]); in Active and Idle it is the reconnect delay: 1 s doubling to
//!   30 s, ±20 % jitter, back to 1 s once Established (`docs/design.md`, "BGP behaviour").
//!   A failed attempt (our connect fails, or the connection breaks in `OpenSent`) goes to
//!   Active as in §8.2.2, which still takes the peer's own connection; a session lost after
//!   the peer's OPEN was accepted goes to Idle (automatic restart, §8.1.1), which refuses
//!   connections until the delay is over, so a peer that keeps dropping sessions is damped.
//!   `ManualStop` turns automatic restart off until `ManualStart`.
//! - A passive peer ([`FsmConfig::passive`]) never leaves Active for Connect.
//! - The jitter of the reconnect [`Backoff`] is seeded from the [`FsmConfig`] (router id, AS
//!   numbers), so tests are reproducible and hosts with different router ids do not reconnect in
//!   lockstep after their router restarts.
//! - The router id of an eBGP peer may equal ours ([RFC 6286 §2.2]); only iBGP rejects it.
//! - Received routes are never installed: an UPDATE re-arms the hold timer and is reported.
//!
//! [RFC 4271 §8]: https://www.rfc-editor.org/rfc/rfc4271#section-8
//! [RFC 4271 §6.8]: https://www.rfc-editor.org/rfc/rfc4271#section-6.8
//! [RFC 6286 §2.3]: https://www.rfc-editor.org/rfc/rfc6286#section-2.3
//! [RFC 4486]: https://www.rfc-editor.org/rfc/rfc4486#section-4
//! [RFC 6286 §2.2]: https://www.rfc-editor.org/rfc/rfc6286#section-2.2

use std::{fmt, net::Ipv4Addr, time::Duration};

use super::codec::{
    Family, Message, Notification, Open, ReceivedUpdate, cease_subcode, error_code,
    shutdown_notification,
};
use crate::backoff::Backoff;

/// Hold time while we wait for the peer's OPEN: [RFC 4271 §8.2.2] (Connect and Active states,
/// on the TCP connection coming up) sets "the `HoldTimer` to a large value"; "A `HoldTimer` value of
/// 4 minutes is suggested."
///
/// [RFC 4271 §8.2.2]: https://www.rfc-editor.org/rfc/rfc4271#section-8.2.2
const LARGE_HOLD_TIME: Duration = Duration::from_secs(240);

/// How long an outgoing connect may take before it is dropped and tried again ([RFC 4271 §8.2.2]
/// Connect state, `ConnectRetryTimer_Expires`). §10 suggests 120 s; our peers are a hop or two
/// away and the reconnect delay is capped at 30 s (`docs/design.md`, "BGP behaviour"), so a
/// stuck SYN must not cost minutes.
///
/// [RFC 4271 §8.2.2]: https://www.rfc-editor.org/rfc/rfc4271#section-8.2.2
pub const CONNECT_RETRY_TIME: Duration = Duration::from_secs(10);

/// First reconnect delay after a session loss (`docs/design.md`, "BGP behaviour").
const INITIAL_BACKOFF: Duration = Duration::from_secs(1);

/// Longest reconnect delay (`docs/design.md`, "BGP behaviour").
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// NOTIFICATION error codes and subcodes ([RFC 4271 §4.5], [RFC 4486], [RFC 6608]).
///
/// [RFC 4271 §4.5]: https://www.rfc-editor.org/rfc/rfc4271#section-4.5
/// [RFC 4486]: https://www.rfc-editor.org/rfc/rfc4486#section-4
/// [RFC 6608]: https://www.rfc-editor.org/rfc/rfc6608#section-3
const OPEN_MESSAGE_ERROR: u8 = error_code::OPEN_MESSAGE;
const BAD_PEER_AS: u8 = 2;
const BAD_BGP_IDENTIFIER: u8 = 3;
const UNACCEPTABLE_HOLD_TIME: u8 = 6;
const HOLD_TIMER_EXPIRED: u8 = error_code::HOLD_TIMER_EXPIRED;
const FSM_ERROR: u8 = error_code::FSM;
const UNEXPECTED_IN_OPEN_SENT: u8 = 1;
const UNEXPECTED_IN_OPEN_CONFIRM: u8 = 2;
const UNEXPECTED_IN_ESTABLISHED: u8 = 3;

/// The session states of [RFC 4271 §8.2.2]; `Display` gives the RFC names (shown by `/info`).
///
/// [RFC 4271 §8.2.2]: https://www.rfc-editor.org/rfc/rfc4271#section-8.2.2
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Not connected; waiting for `ManualStart` or for the reconnect delay.
    Idle,
    /// An outgoing TCP connection is being set up.
    Connect,
    /// Waiting for the peer to connect to us (passive peers).
    Active,
    /// Our OPEN is sent; waiting for the peer's.
    OpenSent,
    /// OPENs exchanged; waiting for the peer's KEEPALIVE.
    OpenConfirm,
    /// The session is up; routes are exchanged.
    Established,
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Idle => "Idle",
            Self::Connect => "Connect",
            Self::Active => "Active",
            Self::OpenSent => "OpenSent",
            Self::OpenConfirm => "OpenConfirm",
            Self::Established => "Established",
        })
    }
}

/// What the FSM needs to know about one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsmConfig {
    /// Our AS number, sent in OPEN (as `AS_TRANS` plus the 4-octet capability when it does not
    /// fit in 16 bits; the codec does that).
    pub local_as: u32,
    /// The AS the peer must announce in its OPEN; anything else is Bad Peer AS (2/2). Equal to
    /// `local_as` makes the session iBGP.
    pub peer_as: u32,
    /// Our BGP Identifier.
    pub router_id: Ipv4Addr,
    /// The hold time we offer ([RFC 4271 §4.2]). Zero offers none: no hold timer and no
    /// KEEPALIVEs once negotiated. Sent in whole seconds; 1 and 2 s, which the wire does not
    /// allow, are sent as 3 s, and more than 65535 s as 65535 s.
    ///
    /// [RFC 4271 §4.2]: https://www.rfc-editor.org/rfc/rfc4271#section-4.2
    pub hold_time: Duration,
    /// The address families we offer (one Multiprotocol capability each, [RFC 4760]).
    ///
    /// [RFC 4760]: https://www.rfc-editor.org/rfc/rfc4760#section-8
    pub families: Vec<Family>,
    /// Never connect; wait in Active for the peer to connect ([RFC 4271 §8.1.1]
    /// `PassiveTcpEstablishment`).
    ///
    /// [RFC 4271 §8.1.1]: https://www.rfc-editor.org/rfc/rfc4271#section-8.1.1
    pub passive: bool,
}

/// What the two OPENs agreed on, reported once the session is Established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// The smaller of the two offered hold times; zero if either side offered zero
    /// ([RFC 4271 §4.2]).
    ///
    /// [RFC 4271 §4.2]: https://www.rfc-editor.org/rfc/rfc4271#section-4.2
    pub hold_time: Duration,
    /// How often we send KEEPALIVE: a third of the hold time ([RFC 4271 §10]); `None` when the
    /// hold time is zero.
    ///
    /// [RFC 4271 §10]: https://www.rfc-editor.org/rfc/rfc4271#section-10
    pub keepalive: Option<Duration>,
    /// The families both sides offered, in our configured order. A peer that sends no
    /// Multiprotocol capability at all speaks IPv4 unicast only ([RFC 4760 §8]). May be empty:
    /// the session then stays up and carries nothing.
    ///
    /// [RFC 4760 §8]: https://www.rfc-editor.org/rfc/rfc4760#section-8
    pub families: Vec<Family>,
    /// Both sides speak 4-octet AS numbers ([RFC 6793]); we always offer it.
    ///
    /// [RFC 6793]: https://www.rfc-editor.org/rfc/rfc6793
    pub four_octet_as: bool,
    /// The peer offered ROUTE-REFRESH ([RFC 2918]); we always offer it.
    ///
    /// [RFC 2918]: https://www.rfc-editor.org/rfc/rfc2918
    pub route_refresh: bool,
    /// The peer's BGP Identifier.
    pub peer_router_id: Ipv4Addr,
    /// Both ends are in the same AS: no AS prepended, `LOCAL_PREF` sent.
    pub ibgp: bool,
}

/// What happened: the events of [RFC 4271 §8.1], named as there, plus ROUTE-REFRESH.
///
/// [RFC 4271 §8.1]: https://www.rfc-editor.org/rfc/rfc4271#section-8.1
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// Event 1 `ManualStart` (Event 4 `ManualStart_with_PassiveTcpEstablishment` when
    /// [`FsmConfig::passive`]): start now, and restart by itself after every session loss.
    /// Ignored outside Idle.
    ManualStart,
    /// Event 2 `ManualStop`: send Cease / Administrative Shutdown (6/2) with `reason` as the
    /// [RFC 8203] Shutdown Communication if a connection is up, close, go Idle and stay there.
    ///
    /// [RFC 8203]: https://www.rfc-editor.org/rfc/rfc8203
    ManualStop {
        /// Why, for the peer's operator (truncated to 128 octets on a character boundary).
        reason: String,
    },
    /// Event 2 `ManualStop` because a reload changed the configuration ([RFC 4486 §4]): the
    /// Cease names the change instead of an administrative shutdown. Otherwise as `ManualStop`.
    ///
    /// [RFC 4486 §4]: https://www.rfc-editor.org/rfc/rfc4486#section-4
    ConfigStop(ConfigChange),
    /// Event 9 `ConnectRetryTimer_Expires`: the reconnect delay is over (Idle, Active), or the
    /// outgoing connect took too long (Connect).
    ConnectRetryTimerExpired,
    /// Event 10 `HoldTimer_Expires`: the peer has been silent for the hold time.
    HoldTimerExpired,
    /// Event 11 `KeepaliveTimer_Expires`: time to send a KEEPALIVE.
    KeepaliveTimerExpired,
    /// Event 16 `Tcp_CR_Acked`: our connect succeeded.
    TcpCrAcked,
    /// Event 17 `TcpConnectionConfirmed`: the peer connected to us (`bgp.listen_port`). Taken
    /// in Connect and Active, tracked as the collision candidate in `OpenSent` and
    /// `OpenConfirm`, refused otherwise; the outputs say which.
    TcpConnectionConfirmed,
    /// Event 19 `BGPOpen` on the collision candidate (the peer's second connection).
    CandidateOpenReceived(Open),
    /// The collision candidate ended: closed by the peer, a NOTIFICATION, any message but OPEN,
    /// or a malformed one. `answer` is the NOTIFICATION to send on it, if any.
    CandidateFailed {
        /// What to send before closing it.
        answer: Option<Notification>,
    },
    /// Event 18 `TcpConnectionFails`: the connect failed, or the connection broke (I/O error).
    TcpConnectionFails,
    /// Event 18 `TcpConnectionFails` as well, when the peer closed the connection; kept apart
    /// so the reason says so.
    TcpConnectionClosed,
    /// Event 19 `BGPOpen`: a well-formed OPEN (version and syntax already checked by the codec).
    OpenReceived(Open),
    /// Event 26 `KeepAliveMsg`.
    KeepaliveReceived,
    /// Event 27 `UpdateMsg`: a well-formed UPDATE (RFC 7606 treat-as-withdraw included).
    UpdateReceived(ReceivedUpdate),
    /// Events 24 `NotifMsgVerErr` and 25 `NotifMsg`: the peer ends the session.
    NotificationReceived(Notification),
    /// ROUTE-REFRESH ([RFC 2918 §4]) for a family.
    ///
    /// [RFC 2918 §4]: https://www.rfc-editor.org/rfc/rfc2918#section-4
    RouteRefreshReceived(Family),
    /// Events 21 `BGPHeaderErr`, 22 `BGPOpenMsgErr` and 28 `UpdateMsgErr`: the codec found a
    /// malformed message and says which NOTIFICATION answers it (1/x, 2/x, 3/x).
    DecodeFailed(Notification),
}

/// The configuration changes that end a session ([`Input::ConfigStop`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigChange {
    /// The peer left the configuration: Cease / Peer De-configured (6/3).
    PeerRemoved,
    /// A session parameter changed (AS numbers, hold time, password, addresses, TTL, router
    /// id), which the peer only learns from a new OPEN: Cease / Other Configuration Change (6/6).
    SessionChanged,
}

/// What the session task must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Open a TCP connection to the peer ([RFC 4271 §8.2.2] Idle and Connect states); answer
    /// with `TcpCrAcked` or `TcpConnectionFails`.
    ///
    /// [RFC 4271 §8.2.2]: https://www.rfc-editor.org/rfc/rfc4271#section-8.2.2
    Connect,
    /// Send this message on the connection ([RFC 4271 §4]).
    ///
    /// [RFC 4271 §4]: https://www.rfc-editor.org/rfc/rfc4271#section-4
    SendMessage(Message),
    /// Use the peer's new connection (`TcpConnectionConfirmed`) as the session's connection,
    /// abandoning our connect in progress.
    AcceptConnection,
    /// Close the peer's new connection after sending this NOTIFICATION.
    RefuseConnection(Notification),
    /// Keep the peer's new connection beside ours until an OPEN decides ([RFC 4271 §6.8]).
    ///
    /// [RFC 4271 §6.8]: https://www.rfc-editor.org/rfc/rfc4271#section-6.8
    TrackCandidate,
    /// Send this message on the collision candidate.
    SendToCandidate(Message),
    /// Close the collision candidate, after sending `notification` if any.
    CloseCandidate {
        /// What to send first.
        notification: Option<Notification>,
        /// Why, for the log.
        reason: String,
    },
    /// The session's connection is closed (by the outputs before this one); the collision
    /// candidate becomes the session's connection.
    PromoteCandidate {
        /// Why, for the log.
        reason: String,
    },
    /// Close the connection, or abandon the connect in progress ([RFC 4271 §8.2.2] "drops the
    /// TCP connection"). Messages still queued before it are sent first.
    ///
    /// [RFC 4271 §8.2.2]: https://www.rfc-editor.org/rfc/rfc4271#section-8.2.2
    CloseConnection,
    /// Arm the hold timer for this long from now, or stop it ([RFC 4271 §4.2], §10).
    ///
    /// [RFC 4271 §4.2]: https://www.rfc-editor.org/rfc/rfc4271#section-4.2
    SetHoldTimer(Option<Duration>),
    /// Arm the keepalive timer for this long from now, or stop it ([RFC 4271 §4.4], §10).
    ///
    /// [RFC 4271 §4.4]: https://www.rfc-editor.org/rfc/rfc4271#section-4.4
    SetKeepaliveTimer(Option<Duration>),
    /// Arm the `ConnectRetryTimer` for this long from now, or stop it ([RFC 4271 §8.1.3], §10).
    ///
    /// [RFC 4271 §8.1.3]: https://www.rfc-editor.org/rfc/rfc4271#section-8.1.3
    SetConnectRetryTimer(Option<Duration>),
    /// The session is up ([RFC 4271 §8.2.2] `OpenConfirm` → `Established`): send the Adj-RIB-Out
    /// for the negotiated families.
    ///
    /// [RFC 4271 §8.2.2]: https://www.rfc-editor.org/rfc/rfc4271#section-8.2.2
    Established(Negotiated),
    /// The session, or the attempt to set one up, ended ([RFC 4271 §8.2.2] "releases all BGP
    /// resources"): forget the Adj-RIB-Out sent, record `reason` (`/info` `last_error`).
    SessionDown {
        /// What happened, for people.
        reason: String,
        /// The NOTIFICATION we sent, if any.
        notification_sent: Option<Notification>,
        /// The NOTIFICATION the peer sent, if any.
        notification_received: Option<Notification>,
    },
    /// The state changed ([RFC 4271 §8.2.2]); emitted once per change, never for a self-loop.
    ///
    /// [RFC 4271 §8.2.2]: https://www.rfc-editor.org/rfc/rfc4271#section-8.2.2
    StateChanged {
        /// The state left.
        from: State,
        /// The state entered.
        to: State,
    },
    /// The peer asked for our routes again ([RFC 2918 §4]): resend the Adj-RIB-Out of this
    /// family.
    ///
    /// [RFC 2918 §4]: https://www.rfc-editor.org/rfc/rfc2918#section-4
    ResendAdjRibOut(Family),
    /// An UPDATE arrived in Established ([RFC 4271 §8.2.2] Event 27), for counters and logs;
    /// nothing is installed.
    ///
    /// [RFC 4271 §8.2.2]: https://www.rfc-editor.org/rfc/rfc4271#section-8.2.2
    UpdateReceived(ReceivedUpdate),
}

/// The state machine of one peer. Create with [`Fsm::new`], start with [`Input::ManualStart`].
#[derive(Debug)]
pub struct Fsm {
    config: FsmConfig,
    state: State,
    /// Between `ManualStart` and `ManualStop`: a session loss schedules a reconnect (automatic
    /// restart, RFC 4271 §8.1.1).
    running: bool,
    /// Set when the peer's OPEN is accepted, cleared when the session goes down.
    negotiated: Option<Negotiated>,
    /// We opened the session's connection (`TcpCrAcked`), rather than the peer: collision
    /// resolution keeps the connection opened by the dominant side.
    ours: bool,
    /// The peer's second connection is tracked beside ours (only in `OpenSent` and
    /// `OpenConfirm`); our OPEN has been sent on it.
    candidate: bool,
    /// Reconnect delays after session losses; its jitter is seeded from the config, so runs are
    /// reproducible.
    backoff: Backoff,
    /// Outputs of the input being processed; `process` hands them over.
    out: Vec<Output>,
}

impl Fsm {
    /// A stopped FSM (Idle) for this peer.
    pub fn new(config: FsmConfig) -> Self {
        let seed = (u64::from(u32::from(config.router_id)) << 32 | u64::from(config.peer_as))
            ^ u64::from(config.local_as).rotate_left(16);
        Self {
            config,
            state: State::Idle,
            running: false,
            negotiated: None,
            ours: false,
            candidate: false,
            backoff: Backoff::seeded(INITIAL_BACKOFF, MAX_BACKOFF, seed),
            out: Vec::new(),
        }
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// What the OPENs agreed on, from `OpenConfirm` until the session goes down.
    pub fn negotiated(&self) -> Option<&Negotiated> {
        self.negotiated.as_ref()
    }

    /// Handles one event; returns what to do, in order.
    pub fn process(&mut self, input: Input) -> Vec<Output> {
        match input {
            Input::ManualStart => self.manual_start(),
            Input::ManualStop { reason } => self.manual_stop(&reason),
            Input::ConfigStop(change) => self.config_stop(change),
            Input::ConnectRetryTimerExpired => self.connect_retry_timer_expired(),
            Input::HoldTimerExpired => {
                if self.connected() {
                    let notification = notification(HOLD_TIMER_EXPIRED, 0);
                    self.session_lost("hold timer expired".to_owned(), Some(notification), None);
                }
            }
            Input::KeepaliveTimerExpired => self.keepalive_timer_expired(),
            Input::TcpCrAcked => self.tcp_cr_acked(),
            Input::TcpConnectionConfirmed => self.tcp_connection_confirmed(),
            Input::CandidateOpenReceived(open) => self.candidate_open_received(&open),
            Input::CandidateFailed { answer } => {
                if self.candidate {
                    self.close_candidate(answer, "the peer's other connection ended".into());
                }
            }
            Input::TcpConnectionFails => self.connection_lost("TCP connection failed"),
            Input::TcpConnectionClosed => self.connection_lost("peer closed the connection"),
            Input::OpenReceived(open) => match self.state {
                State::OpenSent => self.open_received(&open),
                _ => self.unexpected_message("OPEN"),
            },
            Input::KeepaliveReceived => match self.state {
                State::OpenConfirm => self.establish(),
                State::Established => self.rearm_hold_timer(),
                _ => self.unexpected_message("KEEPALIVE"),
            },
            Input::UpdateReceived(update) => match self.state {
                State::Established => {
                    self.rearm_hold_timer();
                    self.out.push(Output::UpdateReceived(update));
                }
                _ => self.unexpected_message("UPDATE"),
            },
            Input::RouteRefreshReceived(family) => match self.state {
                // RFC 2918 §4: a family we did not negotiate is ignored.
                State::Established => {
                    if self
                        .negotiated
                        .as_ref()
                        .is_some_and(|n| n.families.contains(&family))
                    {
                        self.out.push(Output::ResendAdjRibOut(family));
                    }
                }
                _ => self.unexpected_message("ROUTE-REFRESH"),
            },
            Input::NotificationReceived(received) => {
                // The notification itself travels in SessionDown; the session prints it.
                let collision = received.code == error_code::CEASE
                    && received.subcode == cease_subcode::CONNECTION_COLLISION;
                match self.state {
                    // The peer resolved a collision against this connection (RFC 4271 §6.8):
                    // not a misbehaving peer, so no damping; Active takes its other one.
                    State::OpenSent | State::OpenConfirm if collision => {
                        self.attempt_failed("closed by the peer".into(), Some(received));
                    }
                    _ if self.connected() => {
                        self.session_lost("closed by the peer".into(), None, Some(received));
                    }
                    _ => {}
                }
            }
            Input::DecodeFailed(answer) => {
                if self.connected() {
                    self.session_lost("malformed message from peer".into(), Some(answer), None);
                }
            }
        }
        std::mem::take(&mut self.out)
    }

    /// The one place the state changes (RFC 4271 §8.2.2); reports real changes only.
    fn change_state(&mut self, to: State) {
        if self.state != to {
            let from = std::mem::replace(&mut self.state, to);
            self.out.push(Output::StateChanged { from, to });
        }
    }

    /// A TCP connection is up, so messages can be sent and received.
    fn connected(&self) -> bool {
        matches!(
            self.state,
            State::OpenSent | State::OpenConfirm | State::Established
        )
    }

    fn manual_start(&mut self) {
        // RFC 4271 §8.2.2: ManualStart is ignored outside Idle.
        if self.state == State::Idle {
            self.running = true;
            self.start_attempt();
        }
    }

    /// Connect (Connect state), or wait for the peer to connect (Active state) when passive.
    fn start_attempt(&mut self) {
        if self.config.passive {
            self.change_state(State::Active);
            self.out.push(Output::SetConnectRetryTimer(None));
        } else {
            self.change_state(State::Connect);
            self.out
                .push(Output::SetConnectRetryTimer(Some(CONNECT_RETRY_TIME)));
            self.out.push(Output::Connect);
        }
    }

    fn manual_stop(&mut self, reason: &str) {
        self.running = false;
        if self.state == State::Idle {
            // Cancel a pending reconnect.
            self.out.push(Output::SetConnectRetryTimer(None));
        } else {
            self.administrative_shutdown(reason);
        }
    }

    /// `ManualStop` with the Cease subcode of the configuration change (RFC 4486 §4).
    fn config_stop(&mut self, change: ConfigChange) {
        self.running = false;
        if self.state == State::Idle {
            self.out.push(Output::SetConnectRetryTimer(None));
            return;
        }
        let (subcode, reason) = match change {
            ConfigChange::PeerRemoved => (cease_subcode::PEER_DECONFIGURED, "peer de-configured"),
            ConfigChange::SessionChanged => (
                cease_subcode::OTHER_CONFIGURATION_CHANGE,
                "session parameters changed",
            ),
        };
        let sent = self
            .connected()
            .then(|| notification(error_code::CEASE, subcode));
        self.session_lost(reason.to_owned(), sent, None);
    }

    /// Cease / Administrative Shutdown (RFC 4486 §4) with an RFC 8203 Shutdown Communication.
    fn administrative_shutdown(&mut self, reason: &str) {
        let sent = self.connected().then(|| shutdown_notification(reason));
        let reason = if reason.is_empty() {
            "administrative shutdown".to_owned()
        } else {
            format!("administrative shutdown: {reason}")
        };
        self.session_lost(reason, sent, None);
    }

    fn connect_retry_timer_expired(&mut self) {
        match self.state {
            State::Idle if self.running => self.start_attempt(),
            // A passive peer has no retry in Active; a stale expiry changes nothing.
            State::Active if self.running && !self.config.passive => self.start_attempt(),
            State::Connect => {
                // RFC 4271 §8.2.2 Connect state: drop the attempt, start a new one.
                self.out.push(Output::CloseConnection);
                self.start_attempt();
            }
            // Stopped, or a stale expiry: the connection is already up.
            _ => {}
        }
    }

    fn keepalive_timer_expired(&mut self) {
        if matches!(self.state, State::OpenConfirm | State::Established)
            && let Some(keepalive) = self.negotiated.as_ref().and_then(|n| n.keepalive)
        {
            self.out.push(Output::SendMessage(Message::Keepalive));
            self.out.push(Output::SetKeepaliveTimer(Some(keepalive)));
        }
    }

    /// Our connect succeeded (RFC 4271 §8.2.2 Connect state, Event 16).
    fn tcp_cr_acked(&mut self) {
        match self.state {
            State::Connect | State::Active => {
                self.ours = true;
                self.send_open();
            }
            // A stale result: the attempt was abandoned.
            _ => self.out.push(Output::CloseConnection),
        }
    }

    /// The peer connected to us (Event 17).
    fn tcp_connection_confirmed(&mut self) {
        match self.state {
            State::Connect | State::Active => {
                self.ours = false;
                self.out.push(Output::AcceptConnection);
                self.send_open();
            }
            // RFC 4271 §8.2.2 OpenSent and OpenConfirm states: "a second TCP session may be in
            // progress. This second TCP session is tracked per Connection Collision processing
            // (Section 6.8) until an OPEN message is received."
            State::OpenSent | State::OpenConfirm if !self.candidate => {
                self.candidate = true;
                self.out.push(Output::TrackCandidate);
                self.out
                    .push(Output::SendToCandidate(Message::Open(self.our_open())));
            }
            // RFC 4271 §6.8: a collision with an Established session closes the new connection.
            State::OpenSent | State::OpenConfirm | State::Established => self
                .out
                .push(Output::RefuseConnection(collision_notification())),
            // RFC 4271 §8.2.2 Idle state: incoming connections are refused (damping).
            State::Idle => self.out.push(Output::RefuseConnection(notification(
                error_code::CEASE,
                cease_subcode::CONNECTION_REJECTED,
            ))),
        }
    }

    /// Sends our OPEN on the new connection and waits for the peer's (`OpenSent`).
    fn send_open(&mut self) {
        self.out.push(Output::SetConnectRetryTimer(None));
        self.out
            .push(Output::SendMessage(Message::Open(self.our_open())));
        self.out.push(Output::SetHoldTimer(Some(LARGE_HOLD_TIME)));
        self.change_state(State::OpenSent);
    }

    /// The peer's OPEN on its second connection: the BGP Identifiers decide which connection
    /// survives (RFC 4271 §6.8). Ours does only if we opened it and our identifier is the
    /// higher one; if the peer opened both, its newer one wins (a peer has one connection of
    /// its own at a time, so it gave the older one up).
    fn candidate_open_received(&mut self, open: &Open) {
        if !self.candidate {
            return;
        }
        let negotiated = match self.check_open(open) {
            Ok(negotiated) => negotiated,
            Err((reason, answer)) => {
                self.close_candidate(Some(answer), reason);
                return;
            }
        };
        let dominant = (self.config.router_id, self.config.local_as) > (open.router_id, open.asn);
        if self.ours && dominant {
            let reason = format!(
                "connection collision: keeping our connection (BGP identifier {} is higher than the peer's {})",
                self.config.router_id, open.router_id
            );
            self.close_candidate(Some(collision_notification()), reason);
            return;
        }
        let reason = if self.ours {
            format!(
                "connection collision: keeping the peer's connection (its BGP identifier {} is higher than ours {})",
                open.router_id, self.config.router_id
            )
        } else {
            "the peer opened a new connection: keeping it".to_owned()
        };
        self.candidate = false;
        self.ours = false;
        self.out.push(Output::SendMessage(Message::Notification(
            collision_notification(),
        )));
        self.out.push(Output::CloseConnection);
        self.out.push(Output::PromoteCandidate { reason });
        self.accept_open(negotiated);
    }

    fn close_candidate(&mut self, notification: Option<Notification>, reason: String) {
        self.candidate = false;
        self.out.push(Output::CloseCandidate {
            notification,
            reason,
        });
    }

    fn connection_lost(&mut self, reason: &str) {
        match self.state {
            // RFC 4271 §8.2.2 Connect and OpenSent states, Event 18: the attempt failed before
            // any OPEN was accepted, so go to Active, which still takes the peer's own
            // connection, and connect again when the ConnectRetryTimer fires.
            State::Connect | State::OpenSent => self.attempt_failed(reason.to_owned(), None),
            // A session that got as far as the peer's OPEN: Idle, refusing connections until
            // the reconnect delay is over (damping).
            State::OpenConfirm | State::Established => {
                self.session_lost(reason.to_owned(), None, None);
            }
            // No connection to lose.
            State::Idle | State::Active => {}
        }
    }

    /// A connection attempt failed (ours, or the peer's before its OPEN): report it, go to
    /// Active and connect again after the reconnect delay (never, when passive).
    fn attempt_failed(&mut self, reason: String, received: Option<Notification>) {
        if self.end_attempt(reason, None, received, State::Active) {
            return;
        }
        let retry = (self.running && !self.config.passive).then(|| self.backoff.next_delay());
        self.out.push(Output::SetConnectRetryTimer(retry));
    }

    /// Validates the peer's OPEN in `OpenSent` (RFC 4271 §6.2, RFC 6286 §2.2) and answers it with
    /// a KEEPALIVE (§8.2.2 `OpenSent` state, Event 19).
    fn open_received(&mut self, open: &Open) {
        match self.check_open(open) {
            Ok(negotiated) => self.accept_open(negotiated),
            Err((reason, sent)) => self.session_lost(reason, Some(sent), None),
        }
    }

    /// What the OPEN negotiates with ours, or why it is rejected and the NOTIFICATION that
    /// says so (RFC 4271 §6.2).
    fn check_open(&self, open: &Open) -> Result<Negotiated, (String, Notification)> {
        let config = &self.config;
        let ibgp = config.local_as == config.peer_as;
        if open.asn != config.peer_as {
            let reason = format!(
                "OPEN rejected: peer announced AS {}, expected AS {}",
                open.asn, config.peer_as
            );
            return Err((reason, notification(OPEN_MESSAGE_ERROR, BAD_PEER_AS)));
        }
        if matches!(open.hold_time, 1 | 2) {
            let reason = format!(
                "OPEN rejected: hold time {} s (must be 0 or at least 3 s)",
                open.hold_time
            );
            return Err((
                reason,
                notification(OPEN_MESSAGE_ERROR, UNACCEPTABLE_HOLD_TIME),
            ));
        }
        if open.router_id.is_unspecified() || (ibgp && open.router_id == config.router_id) {
            let reason = format!("OPEN rejected: BGP identifier {}", open.router_id);
            return Err((reason, notification(OPEN_MESSAGE_ERROR, BAD_BGP_IDENTIFIER)));
        }

        let hold_time =
            Duration::from_secs(u64::from(self.advertised_hold_time().min(open.hold_time)));
        let keepalive = (!hold_time.is_zero()).then(|| hold_time / 3);
        // RFC 4760 §8: without any Multiprotocol capability the peer speaks IPv4 unicast only.
        let peer_families: &[Family] = if open.families.is_empty() {
            &[Family::Ipv4Unicast]
        } else {
            &open.families
        };
        let families = config
            .families
            .iter()
            .filter(|family| peer_families.contains(family))
            .copied()
            .collect();
        Ok(Negotiated {
            hold_time,
            keepalive,
            families,
            four_octet_as: open.four_octet_as,
            route_refresh: open.route_refresh,
            peer_router_id: open.router_id,
            ibgp,
        })
    }

    /// Answers an accepted OPEN with a KEEPALIVE and waits for the peer's (`OpenConfirm`).
    fn accept_open(&mut self, negotiated: Negotiated) {
        let hold_time = negotiated.hold_time;
        let keepalive = negotiated.keepalive;
        self.negotiated = Some(negotiated);
        self.out.push(Output::SendMessage(Message::Keepalive));
        self.out.push(Output::SetHoldTimer(
            (!hold_time.is_zero()).then_some(hold_time),
        ));
        self.out.push(Output::SetKeepaliveTimer(keepalive));
        self.change_state(State::OpenConfirm);
    }

    /// KEEPALIVE in `OpenConfirm` (RFC 4271 §8.2.2, Event 26).
    fn establish(&mut self) {
        // OpenConfirm is only entered with `negotiated` set.
        let Some(negotiated) = self.negotiated.clone() else {
            return;
        };
        self.backoff.reset();
        if self.candidate {
            // RFC 4271 §6.8: a collision with an Established session closes the new connection.
            self.close_candidate(
                Some(collision_notification()),
                "connection collision: the session is up on the other connection".into(),
            );
        }
        let hold_time = negotiated.hold_time;
        self.out.push(Output::SetHoldTimer(
            (!hold_time.is_zero()).then_some(hold_time),
        ));
        self.out
            .push(Output::SetKeepaliveTimer(negotiated.keepalive));
        self.change_state(State::Established);
        self.out.push(Output::Established(negotiated));
    }

    /// KEEPALIVE or UPDATE in Established restarts the hold timer (RFC 4271 §8.2.2, Events 26,
    /// 27), unless the negotiated hold time is zero.
    fn rearm_hold_timer(&mut self) {
        if let Some(negotiated) = &self.negotiated
            && !negotiated.hold_time.is_zero()
        {
            self.out
                .push(Output::SetHoldTimer(Some(negotiated.hold_time)));
        }
    }

    /// A message not allowed in this state: FSM Error with the RFC 6608 subcode of the state.
    /// Without a connection (Idle, Connect, Active) it is stale and ignored.
    fn unexpected_message(&mut self, kind: &str) {
        let subcode = match self.state {
            State::Idle | State::Connect | State::Active => return,
            State::OpenSent => UNEXPECTED_IN_OPEN_SENT,
            State::OpenConfirm => UNEXPECTED_IN_OPEN_CONFIRM,
            State::Established => UNEXPECTED_IN_ESTABLISHED,
        };
        let reason = format!("unexpected {kind} in {}", self.state);
        self.session_lost(reason, Some(notification(FSM_ERROR, subcode)), None);
    }

    /// Ends the session or the attempt: send `sent` if any, close, stop the timers, report, go
    /// Idle, and schedule a reconnect unless stopped.
    fn session_lost(
        &mut self,
        reason: String,
        sent: Option<Notification>,
        received: Option<Notification>,
    ) {
        if self.end_attempt(reason, sent, received, State::Idle) {
            return;
        }
        let retry = self.running.then(|| self.backoff.next_delay());
        self.out.push(Output::SetConnectRetryTimer(retry));
    }

    /// Sends `sent` if any, closes, stops the hold and keepalive timers, reports, and enters
    /// `to`; the caller sets the `ConnectRetryTimer`. While a collision candidate is tracked
    /// and we are running, it becomes the connection instead (`OpenSent`, our OPEN is on it):
    /// returns `true` then, and nothing is reported.
    fn end_attempt(
        &mut self,
        reason: String,
        sent: Option<Notification>,
        received: Option<Notification>,
        to: State,
    ) -> bool {
        if let Some(sent) = &sent {
            self.out
                .push(Output::SendMessage(Message::Notification(sent.clone())));
        }
        self.out.push(Output::CloseConnection);
        if self.candidate {
            self.candidate = false;
            if self.running {
                self.ours = false;
                self.negotiated = None;
                self.out.push(Output::PromoteCandidate {
                    reason: format!("{reason}: carrying on with the peer's other connection"),
                });
                self.out.push(Output::SetHoldTimer(Some(LARGE_HOLD_TIME)));
                self.out.push(Output::SetKeepaliveTimer(None));
                self.change_state(State::OpenSent);
                return true;
            }
            self.out.push(Output::CloseCandidate {
                notification: sent.clone(),
                reason: reason.clone(),
            });
        }
        self.out.push(Output::SetHoldTimer(None));
        self.out.push(Output::SetKeepaliveTimer(None));
        self.out.push(Output::SessionDown {
            reason,
            notification_sent: sent,
            notification_received: received,
        });
        self.negotiated = None;
        self.change_state(to);
        false
    }

    /// The OPEN we send (RFC 4271 §4.2): our identity and every capability we speak.
    fn our_open(&self) -> Open {
        Open {
            asn: self.config.local_as,
            hold_time: self.advertised_hold_time(),
            router_id: self.config.router_id,
            families: self.config.families.clone(),
            four_octet_as: true,
            route_refresh: true,
        }
    }

    /// The configured hold time as the OPEN can carry it: 0 or 3..=65535 s (RFC 4271 §4.2).
    fn advertised_hold_time(&self) -> u16 {
        match u16::try_from(self.config.hold_time.as_secs()) {
            Ok(1 | 2) => 3,
            Ok(seconds) => seconds,
            Err(_) => u16::MAX,
        }
    }
}

/// Cease / Connection Collision Resolution ([RFC 4486 §4]), for the connection a collision
/// closes.
///
/// [RFC 4486 §4]: https://www.rfc-editor.org/rfc/rfc4486#section-4
fn collision_notification() -> Notification {
    notification(error_code::CEASE, cease_subcode::CONNECTION_COLLISION)
}

/// A NOTIFICATION without data.
fn notification(code: u8, subcode: u8) -> Notification {
    Notification {
        code,
        subcode,
        data: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUR_ID: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
    const PEER_ID: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 254);

    fn config() -> FsmConfig {
        FsmConfig {
            local_as: 65001,
            peer_as: 65000,
            router_id: OUR_ID,
            hold_time: Duration::from_secs(90),
            families: vec![Family::Ipv4Unicast, Family::Ipv6Unicast],
            passive: false,
        }
    }

    fn peer_open() -> Open {
        Open {
            asn: 65000,
            hold_time: 180,
            router_id: PEER_ID,
            families: vec![Family::Ipv4Unicast, Family::Ipv6Unicast],
            four_octet_as: true,
            route_refresh: true,
        }
    }

    fn down_outputs(
        sent: Option<Notification>,
        reason: &str,
        from: State,
        retry: Option<Duration>,
    ) -> Vec<Output> {
        let mut out = Vec::new();
        if let Some(sent) = &sent {
            out.push(Output::SendMessage(Message::Notification(sent.clone())));
        }
        out.extend([
            Output::CloseConnection,
            Output::SetHoldTimer(None),
            Output::SetKeepaliveTimer(None),
            Output::SessionDown {
                reason: reason.to_owned(),
                notification_sent: sent,
                notification_received: None,
            },
            Output::StateChanged {
                from,
                to: State::Idle,
            },
            Output::SetConnectRetryTimer(retry),
        ]);
        out
    }

    /// What a failed attempt outputs: closed, timers stopped, reported, Active, retry armed.
    fn failed_outputs(reason: &str, from: State, retry: Option<Duration>) -> Vec<Output> {
        let mut out = down_outputs(None, reason, from, retry);
        for o in &mut out {
            if let Output::StateChanged { to, .. } = o {
                *to = State::Active;
            }
        }
        out
    }

    /// An FSM in Idle after an Established session was lost, its reconnect pending.
    fn idle_after_session_loss() -> Fsm {
        let mut fsm = established();
        fsm.process(Input::TcpConnectionClosed);
        assert_eq!(fsm.state(), State::Idle);
        fsm
    }

    /// What leaving Idle for Connect outputs: the retry timer armed, a connect started.
    fn starts_connecting() -> [Output; 3] {
        [
            Output::StateChanged {
                from: State::Idle,
                to: State::Connect,
            },
            Output::SetConnectRetryTimer(Some(CONNECT_RETRY_TIME)),
            Output::Connect,
        ]
    }

    /// An FSM after `ManualStart`.
    fn started(config: FsmConfig) -> Fsm {
        let mut fsm = Fsm::new(config);
        fsm.process(Input::ManualStart);
        fsm
    }

    /// An FSM in `OpenSent`.
    fn open_sent(config: FsmConfig) -> Fsm {
        let mut fsm = started(config);
        fsm.process(Input::TcpCrAcked);
        assert_eq!(fsm.state(), State::OpenSent);
        fsm
    }

    /// An FSM in `OpenConfirm` after accepting `open`.
    fn open_confirm(config: FsmConfig, open: Open) -> Fsm {
        let mut fsm = open_sent(config);
        fsm.process(Input::OpenReceived(open));
        assert_eq!(fsm.state(), State::OpenConfirm);
        fsm
    }

    /// An FSM in Established with `open` from the peer; returns the Established outputs too.
    fn established_with(config: FsmConfig, open: Open) -> (Fsm, Negotiated) {
        let mut fsm = open_confirm(config, open);
        let out = fsm.process(Input::KeepaliveReceived);
        let negotiated = out
            .into_iter()
            .find_map(|o| match o {
                Output::Established(n) => Some(n),
                _ => None,
            })
            .expect("Established output");
        (fsm, negotiated)
    }

    fn established() -> Fsm {
        established_with(config(), peer_open()).0
    }

    fn retry_delay(out: &[Output]) -> Option<Duration> {
        out.iter().find_map(|o| match o {
            Output::SetConnectRetryTimer(d) => Some(*d),
            _ => None,
        })?
    }

    fn session_down(out: &[Output]) -> (&str, Option<&Notification>, Option<&Notification>) {
        out.iter()
            .find_map(|o| match o {
                Output::SessionDown {
                    reason,
                    notification_sent,
                    notification_received,
                } => Some((
                    reason.as_str(),
                    notification_sent.as_ref(),
                    notification_received.as_ref(),
                )),
                _ => None,
            })
            .expect("SessionDown output")
    }

    #[test]
    fn state_displays_rfc_names() {
        let names = [
            State::Idle,
            State::Connect,
            State::Active,
            State::OpenSent,
            State::OpenConfirm,
            State::Established,
        ]
        .map(|s| s.to_string());
        assert_eq!(
            names,
            [
                "Idle",
                "Connect",
                "Active",
                "OpenSent",
                "OpenConfirm",
                "Established"
            ]
        );
    }

    #[test]
    fn manual_start_connects_at_once() {
        let mut fsm = Fsm::new(config());
        assert_eq!(fsm.state(), State::Idle);
        assert_eq!(fsm.process(Input::ManualStart), starts_connecting());
    }

    #[test]
    fn manual_start_outside_idle_is_ignored() {
        let mut fsm = started(config());
        assert_eq!(fsm.process(Input::ManualStart), []);
        assert_eq!(fsm.state(), State::Connect);
    }

    #[test]
    fn passive_peer_waits_in_active_without_connecting() {
        let mut fsm = Fsm::new(FsmConfig {
            passive: true,
            ..config()
        });
        let out = fsm.process(Input::ManualStart);
        assert!(!out.contains(&Output::Connect));
        assert_eq!(fsm.state(), State::Active);
        // The peer connects to us.
        let out = fsm.process(Input::TcpConnectionConfirmed);
        assert_eq!(out[0], Output::AcceptConnection);
        assert!(matches!(out[2], Output::SendMessage(Message::Open(_))));
        assert_eq!(fsm.state(), State::OpenSent);
    }

    #[test]
    fn connection_confirmed_sends_open_and_arms_the_large_hold_timer() {
        let mut fsm = started(config());
        assert_eq!(
            fsm.process(Input::TcpCrAcked),
            [
                Output::SetConnectRetryTimer(None),
                Output::SendMessage(Message::Open(Open {
                    asn: 65001,
                    hold_time: 90,
                    router_id: OUR_ID,
                    families: vec![Family::Ipv4Unicast, Family::Ipv6Unicast],
                    four_octet_as: true,
                    route_refresh: true,
                })),
                Output::SetHoldTimer(Some(Duration::from_secs(240))),
                Output::StateChanged {
                    from: State::Connect,
                    to: State::OpenSent
                },
            ]
        );
    }

    #[test]
    fn hold_time_the_wire_cannot_carry_is_adjusted_in_our_open() {
        for (configured, sent) in [(0, 0), (1, 3), (2, 3), (3, 3), (70_000, 65_535)] {
            let fsm = Fsm::new(FsmConfig {
                hold_time: Duration::from_secs(configured),
                ..config()
            });
            assert_eq!(fsm.our_open().hold_time, sent, "configured {configured} s");
        }
    }

    #[test]
    fn holdtime_negotiation_uses_minimum() {
        let mut fsm = open_sent(config());
        let out = fsm.process(Input::OpenReceived(peer_open()));
        assert_eq!(
            out,
            [
                Output::SendMessage(Message::Keepalive),
                Output::SetHoldTimer(Some(Duration::from_secs(90))),
                Output::SetKeepaliveTimer(Some(Duration::from_secs(30))),
                Output::StateChanged {
                    from: State::OpenSent,
                    to: State::OpenConfirm
                },
            ]
        );

        let (_, negotiated) = established_with(
            config(),
            Open {
                hold_time: 9,
                ..peer_open()
            },
        );
        assert_eq!(negotiated.hold_time, Duration::from_secs(9));
        assert_eq!(negotiated.keepalive, Some(Duration::from_secs(3)));
    }

    #[test]
    fn zero_hold_time_disables_keepalives() {
        let ours_zero = FsmConfig {
            hold_time: Duration::ZERO,
            ..config()
        };
        let theirs_zero = Open {
            hold_time: 0,
            ..peer_open()
        };
        for (config, open) in [(ours_zero, peer_open()), (config(), theirs_zero)] {
            let mut fsm = open_sent(config);
            let out = fsm.process(Input::OpenReceived(open));
            assert!(out.contains(&Output::SetHoldTimer(None)));
            assert!(out.contains(&Output::SetKeepaliveTimer(None)));
            let out = fsm.process(Input::KeepaliveReceived);
            let Some(Output::Established(negotiated)) = out.last() else {
                panic!("not established: {out:?}");
            };
            assert_eq!(negotiated.hold_time, Duration::ZERO);
            assert_eq!(negotiated.keepalive, None);
            // Nothing to re-arm, nothing to send.
            assert_eq!(fsm.process(Input::KeepaliveReceived), []);
            assert_eq!(fsm.process(Input::KeepaliveTimerExpired), []);
        }
    }

    #[test]
    fn open_with_wrong_peer_as_sends_bad_peer_as() {
        let mut fsm = open_sent(config());
        let out = fsm.process(Input::OpenReceived(Open {
            asn: 65099,
            ..peer_open()
        }));
        let retry = retry_delay(&out);
        assert_eq!(
            out,
            down_outputs(
                Some(notification(2, 2)),
                "OPEN rejected: peer announced AS 65099, expected AS 65000",
                State::OpenSent,
                retry,
            )
        );
        assert!(retry.is_some());
        assert_eq!(fsm.state(), State::Idle);
    }

    #[test]
    fn open_with_hold_time_of_one_or_two_seconds_is_unacceptable() {
        for hold_time in [1, 2] {
            let mut fsm = open_sent(config());
            let out = fsm.process(Input::OpenReceived(Open {
                hold_time,
                ..peer_open()
            }));
            assert_eq!(session_down(&out).1, Some(&notification(2, 6)));
            assert_eq!(fsm.state(), State::Idle);
        }
    }

    #[test]
    fn open_with_zero_router_id_sends_bad_bgp_identifier() {
        let mut fsm = open_sent(config());
        let out = fsm.process(Input::OpenReceived(Open {
            router_id: Ipv4Addr::UNSPECIFIED,
            ..peer_open()
        }));
        assert_eq!(
            out[0],
            Output::SendMessage(Message::Notification(notification(2, 3)))
        );
        assert_eq!(fsm.state(), State::Idle);
    }

    #[test]
    fn ibgp_open_with_our_router_id_sends_bad_bgp_identifier() {
        let ibgp = FsmConfig {
            peer_as: 65001,
            ..config()
        };
        let mut fsm = open_sent(ibgp);
        let out = fsm.process(Input::OpenReceived(Open {
            asn: 65001,
            router_id: OUR_ID,
            ..peer_open()
        }));
        assert_eq!(session_down(&out).1, Some(&notification(2, 3)));
    }

    #[test]
    fn ebgp_open_with_our_router_id_is_accepted_per_rfc_6286() {
        let (_, negotiated) = established_with(
            config(),
            Open {
                router_id: OUR_ID,
                ..peer_open()
            },
        );
        assert_eq!(negotiated.peer_router_id, OUR_ID);
    }

    #[test]
    fn keepalive_in_open_confirm_establishes_the_session() {
        let mut fsm = open_confirm(config(), peer_open());
        let negotiated = Negotiated {
            hold_time: Duration::from_secs(90),
            keepalive: Some(Duration::from_secs(30)),
            families: vec![Family::Ipv4Unicast, Family::Ipv6Unicast],
            four_octet_as: true,
            route_refresh: true,
            peer_router_id: PEER_ID,
            ibgp: false,
        };
        assert_eq!(fsm.negotiated(), Some(&negotiated));
        assert_eq!(
            fsm.process(Input::KeepaliveReceived),
            [
                Output::SetHoldTimer(Some(Duration::from_secs(90))),
                Output::SetKeepaliveTimer(Some(Duration::from_secs(30))),
                Output::StateChanged {
                    from: State::OpenConfirm,
                    to: State::Established
                },
                Output::Established(negotiated),
            ]
        );
        assert_eq!(fsm.state(), State::Established);
    }

    #[test]
    fn negotiated_families_are_the_intersection_in_our_order() {
        let only_v6 = FsmConfig {
            families: vec![Family::Ipv6Unicast],
            ..config()
        };
        let (_, negotiated) = established_with(only_v6, peer_open());
        assert_eq!(negotiated.families, [Family::Ipv6Unicast]);

        let (_, negotiated) = established_with(
            config(),
            Open {
                families: vec![Family::Ipv6Unicast, Family::Ipv4Unicast],
                ..peer_open()
            },
        );
        assert_eq!(
            negotiated.families,
            [Family::Ipv4Unicast, Family::Ipv6Unicast]
        );
    }

    #[test]
    fn peer_without_mp_capability_gets_ipv4_only() {
        let (_, negotiated) = established_with(
            config(),
            Open {
                families: Vec::new(),
                ..peer_open()
            },
        );
        assert_eq!(negotiated.families, [Family::Ipv4Unicast]);
    }

    #[test]
    fn peer_capabilities_are_reported() {
        let (_, negotiated) = established_with(
            config(),
            Open {
                four_octet_as: false,
                route_refresh: false,
                ..peer_open()
            },
        );
        assert!(!negotiated.four_octet_as);
        assert!(!negotiated.route_refresh);
    }

    #[test]
    fn ibgp_is_detected_from_equal_as_numbers() {
        let (_, ebgp) = established_with(config(), peer_open());
        assert!(!ebgp.ibgp);
        let (_, ibgp) = established_with(
            FsmConfig {
                peer_as: 65001,
                ..config()
            },
            Open {
                asn: 65001,
                ..peer_open()
            },
        );
        assert!(ibgp.ibgp);
    }

    #[test]
    fn keepalive_in_established_rearms_the_hold_timer() {
        let mut fsm = established();
        assert_eq!(
            fsm.process(Input::KeepaliveReceived),
            [Output::SetHoldTimer(Some(Duration::from_secs(90)))]
        );
    }

    #[test]
    fn update_in_established_rearms_the_hold_timer_and_is_reported() {
        let mut fsm = established();
        let update = ReceivedUpdate {
            announced: vec!["198.51.100.0/24".parse().expect("prefix")],
            ..ReceivedUpdate::default()
        };
        assert_eq!(
            fsm.process(Input::UpdateReceived(update.clone())),
            [
                Output::SetHoldTimer(Some(Duration::from_secs(90))),
                Output::UpdateReceived(update),
            ]
        );
        assert_eq!(fsm.state(), State::Established);
    }

    #[test]
    fn keepalive_timer_expiry_sends_keepalive_and_rearms() {
        for mut fsm in [open_confirm(config(), peer_open()), established()] {
            assert_eq!(
                fsm.process(Input::KeepaliveTimerExpired),
                [
                    Output::SendMessage(Message::Keepalive),
                    Output::SetKeepaliveTimer(Some(Duration::from_secs(30))),
                ]
            );
        }
    }

    #[test]
    fn route_refresh_in_established_asks_to_resend() {
        let mut fsm = established();
        assert_eq!(
            fsm.process(Input::RouteRefreshReceived(Family::Ipv6Unicast)),
            [Output::ResendAdjRibOut(Family::Ipv6Unicast)]
        );
    }

    #[test]
    fn route_refresh_for_a_family_not_negotiated_is_ignored() {
        let (mut fsm, _) = established_with(
            config(),
            Open {
                families: vec![Family::Ipv4Unicast],
                ..peer_open()
            },
        );
        assert_eq!(
            fsm.process(Input::RouteRefreshReceived(Family::Ipv6Unicast)),
            []
        );
        assert_eq!(fsm.state(), State::Established);
    }

    #[test]
    fn update_in_open_confirm_is_an_fsm_error() {
        let mut fsm = open_confirm(config(), peer_open());
        let out = fsm.process(Input::UpdateReceived(ReceivedUpdate::default()));
        let retry = retry_delay(&out);
        assert_eq!(
            out,
            down_outputs(
                Some(notification(5, 2)),
                "unexpected UPDATE in OpenConfirm",
                State::OpenConfirm,
                retry,
            )
        );
        assert!(retry.is_some());
        assert_eq!(fsm.negotiated(), None);
    }

    #[test]
    fn messages_before_the_peer_open_are_fsm_errors_in_open_sent() {
        let inputs = [
            Input::KeepaliveReceived,
            Input::UpdateReceived(ReceivedUpdate::default()),
            Input::RouteRefreshReceived(Family::Ipv4Unicast),
        ];
        for input in inputs {
            let mut fsm = open_sent(config());
            let out = fsm.process(input);
            assert_eq!(session_down(&out).1, Some(&notification(5, 1)));
            assert_eq!(fsm.state(), State::Idle);
        }
    }

    #[test]
    fn open_in_established_is_an_fsm_error() {
        let mut fsm = established();
        let out = fsm.process(Input::OpenReceived(peer_open()));
        assert_eq!(
            out[0],
            Output::SendMessage(Message::Notification(notification(5, 3)))
        );
        assert_eq!(session_down(&out).0, "unexpected OPEN in Established");
        assert_eq!(fsm.state(), State::Idle);
    }

    #[test]
    fn hold_timer_expiry_sends_4_0_and_schedules_reconnect() {
        let mut fsm = established();
        let out = fsm.process(Input::HoldTimerExpired);
        let retry = retry_delay(&out).expect("reconnect scheduled");
        assert_eq!(
            out,
            down_outputs(
                Some(notification(4, 0)),
                "hold timer expired",
                State::Established,
                Some(retry),
            )
        );
        assert!(retry >= Duration::from_millis(800) && retry <= Duration::from_millis(1200));
        let out = fsm.process(Input::ConnectRetryTimerExpired);
        assert_eq!(out.last(), Some(&Output::Connect));
        assert_eq!(fsm.state(), State::Connect);
    }

    #[test]
    fn hold_timer_expiry_in_open_sent_ends_the_attempt() {
        let mut fsm = open_sent(config());
        let out = fsm.process(Input::HoldTimerExpired);
        assert_eq!(session_down(&out).1, Some(&notification(4, 0)));
        assert_eq!(fsm.state(), State::Idle);
    }

    #[test]
    fn notification_received_goes_down_without_answering() {
        let mut fsm = established();
        let received = Notification {
            code: 6,
            subcode: 2,
            data: [&[11][..], b"maintenance"].concat(),
        };
        let out = fsm.process(Input::NotificationReceived(received.clone()));
        assert!(
            !out.iter()
                .any(|o| matches!(o, Output::SendMessage(Message::Notification(_))))
        );
        assert_eq!(
            session_down(&out),
            ("closed by the peer", None, Some(&received))
        );
        assert!(out.contains(&Output::CloseConnection));
        assert_eq!(fsm.state(), State::Idle);
    }

    #[test]
    fn decode_failure_sends_its_notification_and_closes() {
        let mut fsm = established();
        let answer = Notification {
            code: 3,
            subcode: 1,
            data: Vec::new(),
        };
        let out = fsm.process(Input::DecodeFailed(answer.clone()));
        let retry = retry_delay(&out);
        assert_eq!(
            out,
            down_outputs(
                Some(answer),
                "malformed message from peer",
                State::Established,
                retry,
            )
        );
    }

    #[test]
    fn manual_stop_sends_cease_admin_shutdown_with_reason() {
        let mut fsm = established();
        let out = fsm.process(Input::ManualStop {
            reason: "agent shutting down".to_owned(),
        });
        let cease = Notification {
            code: 6,
            subcode: 2,
            data: [&[19][..], b"agent shutting down"].concat(),
        };
        assert_eq!(
            out,
            down_outputs(
                Some(cease),
                "administrative shutdown: agent shutting down",
                State::Established,
                None,
            )
        );
    }

    #[test]
    fn config_stop_sends_the_cease_subcode_of_the_change_and_stays_down() {
        for (change, subcode, reason) in [
            (ConfigChange::PeerRemoved, 3, "peer de-configured"),
            (
                ConfigChange::SessionChanged,
                6,
                "session parameters changed",
            ),
        ] {
            let mut fsm = established();
            let out = fsm.process(Input::ConfigStop(change));
            let cease = notification(6, subcode);
            assert_eq!(
                out,
                down_outputs(Some(cease), reason, State::Established, None),
                "{change:?}"
            );
            assert_eq!(fsm.process(Input::ConnectRetryTimerExpired), []);
        }
    }

    #[test]
    fn config_stop_while_connecting_sends_nothing_and_in_idle_cancels_the_reconnect() {
        let mut fsm = started(config());
        assert_eq!(
            fsm.process(Input::ConfigStop(ConfigChange::PeerRemoved)),
            down_outputs(None, "peer de-configured", State::Connect, None)
        );
        let mut fsm = idle_after_session_loss();
        assert_eq!(
            fsm.process(Input::ConfigStop(ConfigChange::SessionChanged)),
            [Output::SetConnectRetryTimer(None)]
        );
    }

    #[test]
    fn manual_stop_stays_idle_until_the_next_manual_start() {
        let mut fsm = idle_after_session_loss();
        assert_eq!(fsm.state(), State::Idle);
        // A reconnect is pending; the stop cancels it.
        assert_eq!(
            fsm.process(Input::ManualStop {
                reason: String::new()
            }),
            [Output::SetConnectRetryTimer(None)]
        );
        assert_eq!(fsm.process(Input::ConnectRetryTimerExpired), []);
        assert_eq!(fsm.state(), State::Idle);
        assert_eq!(
            fsm.process(Input::ManualStart).last(),
            Some(&Output::Connect)
        );
    }

    #[test]
    fn manual_stop_while_connecting_abandons_the_connect_without_a_notification() {
        let mut fsm = started(config());
        let out = fsm.process(Input::ManualStop {
            reason: "bye".to_owned(),
        });
        assert_eq!(
            out,
            down_outputs(None, "administrative shutdown: bye", State::Connect, None)
        );
    }

    #[test]
    fn long_shutdown_reason_is_cut_to_128_octets_on_a_character_boundary() {
        // 'é' is two octets; after one 'x', octet 128 falls inside an 'é', so the cut moves
        // back to 127 octets.
        let reason = format!("x{}", "é".repeat(70));
        let cease = shutdown_notification(&reason);
        assert_eq!(cease.data[0], 127);
        assert_eq!(cease.data.len(), 128);
        let text = std::str::from_utf8(&cease.data[1..]).expect("valid UTF-8");
        assert_eq!(text, format!("x{}", "é".repeat(63)));
    }

    #[test]
    fn a_failed_connect_goes_to_active_and_reports_the_failure() {
        let mut fsm = started(config());
        let out = fsm.process(Input::TcpConnectionFails);
        let retry = retry_delay(&out).expect("connect retry armed");
        assert_eq!(
            out,
            failed_outputs("TCP connection failed", State::Connect, Some(retry))
        );
        assert!(retry >= Duration::from_millis(800) && retry <= Duration::from_millis(1200));
        assert_eq!(fsm.state(), State::Active);
    }

    #[test]
    fn active_accepts_the_peers_connection_after_a_failed_connect() {
        let mut fsm = started(config());
        fsm.process(Input::TcpConnectionFails);
        let out = fsm.process(Input::TcpConnectionConfirmed);
        assert_eq!(out[0], Output::AcceptConnection);
        assert_eq!(out[1], Output::SetConnectRetryTimer(None));
        assert!(matches!(out[2], Output::SendMessage(Message::Open(_))));
        assert!(!out.contains(&Output::CloseConnection));
        assert_eq!(fsm.state(), State::OpenSent);
    }

    #[test]
    fn active_connects_again_when_the_connect_retry_timer_fires() {
        let mut fsm = started(config());
        fsm.process(Input::TcpConnectionFails);
        assert_eq!(
            fsm.process(Input::ConnectRetryTimerExpired),
            [
                Output::StateChanged {
                    from: State::Active,
                    to: State::Connect,
                },
                Output::SetConnectRetryTimer(Some(CONNECT_RETRY_TIME)),
                Output::Connect,
            ]
        );
        assert_eq!(fsm.state(), State::Connect);
    }

    #[test]
    fn a_connection_lost_in_open_sent_goes_to_active() {
        for input in [Input::TcpConnectionFails, Input::TcpConnectionClosed] {
            let mut fsm = open_sent(config());
            let out = fsm.process(input.clone());
            assert!(retry_delay(&out).is_some(), "{input:?}");
            assert_eq!(fsm.state(), State::Active, "{input:?}");
        }
    }

    #[test]
    fn a_session_lost_after_established_still_goes_idle_and_refuses_connections_until_the_delay() {
        let mut fsm = idle_after_session_loss();
        assert_eq!(
            fsm.process(Input::TcpConnectionConfirmed),
            [Output::RefuseConnection(notification(6, 5))]
        );
        assert_eq!(fsm.state(), State::Idle);
        assert_eq!(
            fsm.process(Input::ConnectRetryTimerExpired),
            starts_connecting()
        );
    }

    #[test]
    fn passive_peer_after_a_lost_attempt_waits_in_active_without_a_retry_timer() {
        let mut fsm = Fsm::new(FsmConfig {
            passive: true,
            ..config()
        });
        fsm.process(Input::ManualStart);
        fsm.process(Input::TcpConnectionConfirmed);
        let out = fsm.process(Input::TcpConnectionClosed);
        assert_eq!(
            out,
            failed_outputs("peer closed the connection", State::OpenSent, None)
        );
        assert!(!out.contains(&Output::Connect));
        assert_eq!(fsm.state(), State::Active);
        assert_eq!(fsm.process(Input::ConnectRetryTimerExpired), []);
        assert_eq!(fsm.state(), State::Active);
    }

    #[test]
    fn passive_peer_after_a_lost_session_waits_in_active_again_after_the_delay() {
        let (mut fsm, _) = established_with(
            FsmConfig {
                passive: true,
                ..config()
            },
            peer_open(),
        );
        fsm.process(Input::TcpConnectionClosed);
        assert_eq!(fsm.state(), State::Idle);
        let out = fsm.process(Input::ConnectRetryTimerExpired);
        assert!(!out.contains(&Output::Connect));
        assert_eq!(fsm.state(), State::Active);
    }

    #[test]
    fn manual_stop_in_active_goes_idle_and_stays_there() {
        let mut fsm = started(config());
        fsm.process(Input::TcpConnectionFails);
        let out = fsm.process(Input::ManualStop {
            reason: String::new(),
        });
        assert_eq!(out.last(), Some(&Output::SetConnectRetryTimer(None)));
        assert_eq!(fsm.state(), State::Idle);
        assert_eq!(fsm.process(Input::ConnectRetryTimerExpired), []);
    }

    #[test]
    fn connect_timeout_abandons_the_attempt_and_connects_again() {
        let mut fsm = started(config());
        assert_eq!(
            fsm.process(Input::ConnectRetryTimerExpired),
            [
                Output::CloseConnection,
                Output::SetConnectRetryTimer(Some(CONNECT_RETRY_TIME)),
                Output::Connect,
            ]
        );
        assert_eq!(fsm.state(), State::Connect);
    }

    #[test]
    fn peer_closing_the_connection_reports_session_down() {
        let mut fsm = established();
        let out = fsm.process(Input::TcpConnectionClosed);
        let retry = retry_delay(&out);
        assert_eq!(
            out,
            down_outputs(
                None,
                "peer closed the connection",
                State::Established,
                retry
            )
        );
    }

    #[test]
    fn backoff_doubles_to_thirty_seconds_and_resets_when_established() {
        let mut fsm = started(config());
        let mut delays = Vec::new();
        for _ in 0..7 {
            let out = fsm.process(Input::TcpConnectionFails);
            delays.push(retry_delay(&out).expect("reconnect scheduled"));
            fsm.process(Input::ConnectRetryTimerExpired);
        }
        for (delay, base) in delays.iter().zip([1, 2, 4, 8, 16, 30, 30]) {
            let base = Duration::from_secs(base);
            assert!(
                *delay >= base * 4 / 5 && *delay <= base * 6 / 5,
                "{delay:?} not within 20 % of {base:?}"
            );
        }

        fsm.process(Input::TcpCrAcked);
        fsm.process(Input::OpenReceived(peer_open()));
        // Not yet: the reset comes with Established.
        assert_eq!(fsm.backoff.base(), MAX_BACKOFF);
        fsm.process(Input::KeepaliveReceived);
        let out = fsm.process(Input::HoldTimerExpired);
        let delay = retry_delay(&out).expect("reconnect scheduled");
        assert!(delay >= Duration::from_millis(800) && delay <= Duration::from_millis(1200));
    }

    #[test]
    fn jitter_is_reproducible_and_differs_between_hosts() {
        fn delays(config: FsmConfig) -> Vec<Duration> {
            let mut fsm = Fsm::new(config);
            (0..20)
                .map(|_| {
                    fsm.backoff.reset();
                    fsm.backoff.next_delay()
                })
                .collect()
        }
        let here = delays(config());
        assert_eq!(here, delays(config()));
        let other_host = FsmConfig {
            router_id: Ipv4Addr::new(192, 0, 2, 2),
            ..config()
        };
        assert_ne!(here, delays(other_host));
        assert!(
            here.iter()
                .all(|d| *d >= Duration::from_millis(800) && *d <= Duration::from_millis(1200))
        );
        // Not a constant: the delays actually spread.
        assert!(here.iter().any(|d| *d != here[0]));
    }

    #[test]
    fn stale_events_without_a_connection_are_ignored() {
        let mut fsm = Fsm::new(config());
        let stale = [
            Input::HoldTimerExpired,
            Input::KeepaliveTimerExpired,
            Input::ConnectRetryTimerExpired,
            Input::TcpConnectionFails,
            Input::TcpConnectionClosed,
            Input::KeepaliveReceived,
            Input::OpenReceived(peer_open()),
            Input::NotificationReceived(notification(6, 2)),
            Input::DecodeFailed(notification(1, 1)),
        ];
        for input in stale {
            assert_eq!(fsm.process(input.clone()), [], "{input:?}");
            assert_eq!(fsm.state(), State::Idle);
        }
    }

    #[test]
    fn incoming_connection_in_idle_is_refused() {
        let mut fsm = Fsm::new(config());
        assert_eq!(
            fsm.process(Input::TcpConnectionConfirmed),
            [Output::RefuseConnection(notification(6, 5))]
        );
        assert_eq!(fsm.state(), State::Idle);
    }

    #[test]
    fn state_changes_are_reported_in_order_through_a_whole_session() {
        let mut fsm = Fsm::new(config());
        let mut changes = Vec::new();
        for input in [
            Input::ManualStart,
            Input::TcpCrAcked,
            Input::OpenReceived(peer_open()),
            Input::KeepaliveReceived,
            Input::KeepaliveReceived,
            Input::TcpConnectionClosed,
        ] {
            for output in fsm.process(input) {
                if let Output::StateChanged { from, to } = output {
                    changes.push((from, to));
                }
            }
        }
        assert_eq!(
            changes,
            [
                (State::Idle, State::Connect),
                (State::Connect, State::OpenSent),
                (State::OpenSent, State::OpenConfirm),
                (State::OpenConfirm, State::Established),
                (State::Established, State::Idle),
            ]
        );
    }

    /// A peer's OPEN with this BGP identifier.
    fn peer_open_with_id(router_id: Ipv4Addr) -> Open {
        Open {
            router_id,
            ..peer_open()
        }
    }

    /// An FSM whose own connection is in `OpenSent` and which tracks the peer's second
    /// connection (our OPEN sent on it).
    fn tracking_candidate(config: FsmConfig) -> Fsm {
        let mut fsm = open_sent(config);
        assert_eq!(
            fsm.process(Input::TcpConnectionConfirmed),
            [
                Output::TrackCandidate,
                Output::SendToCandidate(Message::Open(fsm.our_open()))
            ]
        );
        fsm
    }

    const LOWER_ID: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 0);

    #[test]
    fn the_peers_connection_while_ours_is_in_open_sent_is_tracked_with_our_open() {
        let fsm = tracking_candidate(config());
        assert_eq!(fsm.state(), State::OpenSent);
    }

    #[test]
    fn collision_keeps_our_connection_when_our_identifier_is_higher() {
        let mut fsm = tracking_candidate(config());
        let out = fsm.process(Input::CandidateOpenReceived(peer_open_with_id(LOWER_ID)));
        assert!(
            matches!(&out[..], [Output::CloseCandidate { notification: Some(n), .. }] if *n == notification(6, 7)),
            "{out:?}"
        );
        assert_eq!(fsm.state(), State::OpenSent);
        // Our connection carries on as if nothing happened.
        fsm.process(Input::OpenReceived(peer_open_with_id(LOWER_ID)));
        let out = fsm.process(Input::KeepaliveReceived);
        assert!(out.iter().any(|o| matches!(o, Output::Established(_))));
    }

    #[test]
    fn collision_keeps_the_peers_connection_when_its_identifier_is_higher() {
        for ours_in in [State::OpenSent, State::OpenConfirm] {
            let mut fsm = tracking_candidate(config());
            if ours_in == State::OpenConfirm {
                fsm.process(Input::OpenReceived(peer_open()));
            }
            let out = fsm.process(Input::CandidateOpenReceived(peer_open()));
            assert_eq!(
                out[..3],
                [
                    Output::SendMessage(Message::Notification(notification(6, 7))),
                    Output::CloseConnection,
                    Output::PromoteCandidate {
                        reason: "connection collision: keeping the peer's connection (its BGP identifier 192.0.2.254 is higher than ours 192.0.2.1)".into()
                    },
                ],
                "{ours_in}"
            );
            // The peer's OPEN is answered on the connection that is now the session's.
            assert_eq!(out[3], Output::SendMessage(Message::Keepalive));
            assert!(!out.iter().any(|o| matches!(o, Output::SessionDown { .. })));
            assert_eq!(fsm.state(), State::OpenConfirm);
            let out = fsm.process(Input::KeepaliveReceived);
            assert!(out.iter().any(|o| matches!(o, Output::Established(_))));
        }
    }

    #[test]
    fn collision_keeps_our_connection_in_open_confirm_when_our_identifier_is_higher() {
        let mut fsm = tracking_candidate(config());
        fsm.process(Input::OpenReceived(peer_open_with_id(LOWER_ID)));
        let out = fsm.process(Input::CandidateOpenReceived(peer_open_with_id(LOWER_ID)));
        assert!(
            matches!(&out[..], [Output::CloseCandidate { .. }]),
            "{out:?}"
        );
        assert_eq!(fsm.state(), State::OpenConfirm);
    }

    #[test]
    fn collision_with_equal_identifiers_keeps_the_connection_of_the_higher_as() {
        // RFC 6286 §2.3; an eBGP peer may share our identifier. Our AS 65001 > 65000.
        let mut fsm = tracking_candidate(config());
        let out = fsm.process(Input::CandidateOpenReceived(peer_open_with_id(OUR_ID)));
        assert!(
            matches!(&out[..], [Output::CloseCandidate { .. }]),
            "{out:?}"
        );
        let mut fsm = tracking_candidate(FsmConfig {
            local_as: 64999,
            ..config()
        });
        let out = fsm.process(Input::CandidateOpenReceived(peer_open_with_id(OUR_ID)));
        assert!(
            out.iter()
                .any(|o| matches!(o, Output::PromoteCandidate { .. })),
            "{out:?}"
        );
    }

    #[test]
    fn a_newer_connection_from_the_peer_replaces_its_older_one_whatever_the_identifiers() {
        let mut fsm = started(config());
        fsm.process(Input::TcpConnectionFails);
        fsm.process(Input::TcpConnectionConfirmed);
        fsm.process(Input::TcpConnectionConfirmed);
        let out = fsm.process(Input::CandidateOpenReceived(peer_open_with_id(LOWER_ID)));
        assert!(
            out.iter()
                .any(|o| matches!(o, Output::PromoteCandidate { .. })),
            "{out:?}"
        );
        assert_eq!(fsm.state(), State::OpenConfirm);
    }

    #[test]
    fn losing_our_connection_while_tracking_the_peers_carries_on_with_the_peers() {
        for lost in [
            Input::TcpConnectionClosed,
            Input::NotificationReceived(notification(6, 7)),
            Input::NotificationReceived(notification(6, 2)),
            Input::HoldTimerExpired,
        ] {
            let mut fsm = tracking_candidate(config());
            let out = fsm.process(lost.clone());
            assert!(
                out.iter()
                    .any(|o| matches!(o, Output::PromoteCandidate { .. })),
                "{lost:?}: {out:?}"
            );
            assert!(!out.iter().any(|o| matches!(o, Output::SessionDown { .. })));
            assert!(out.contains(&Output::SetHoldTimer(Some(LARGE_HOLD_TIME))));
            assert_eq!(retry_delay(&out), None, "{lost:?}");
            assert_eq!(fsm.state(), State::OpenSent, "{lost:?}");
            // The candidate's OPEN now arrives as the session's.
            fsm.process(Input::OpenReceived(peer_open()));
            assert_eq!(fsm.state(), State::OpenConfirm);
        }
    }

    #[test]
    fn a_collision_cease_before_established_goes_to_active_without_damping() {
        let mut fsm = open_confirm(config(), peer_open());
        let out = fsm.process(Input::NotificationReceived(notification(6, 7)));
        assert_eq!(fsm.state(), State::Active);
        assert!(retry_delay(&out).is_some());
        // Active takes the peer's connection at once.
        let out = fsm.process(Input::TcpConnectionConfirmed);
        assert_eq!(out[0], Output::AcceptConnection);
        // Any other Cease in OpenConfirm still damps.
        let mut fsm = open_confirm(config(), peer_open());
        fsm.process(Input::NotificationReceived(notification(6, 2)));
        assert_eq!(fsm.state(), State::Idle);
    }

    #[test]
    fn established_closes_the_tracked_connection_with_a_collision_cease() {
        let mut fsm = tracking_candidate(config());
        fsm.process(Input::OpenReceived(peer_open_with_id(LOWER_ID)));
        let out = fsm.process(Input::KeepaliveReceived);
        assert!(
            matches!(&out[0], Output::CloseCandidate { notification: Some(n), .. } if *n == notification(6, 7)),
            "{out:?}"
        );
        assert_eq!(fsm.state(), State::Established);
        // A late OPEN on it is stale.
        assert_eq!(fsm.process(Input::CandidateOpenReceived(peer_open())), []);
    }

    #[test]
    fn a_connection_while_established_or_a_third_one_is_refused_with_a_collision_cease() {
        let mut fsm = established();
        assert_eq!(
            fsm.process(Input::TcpConnectionConfirmed),
            [Output::RefuseConnection(notification(6, 7))]
        );
        let mut fsm = tracking_candidate(config());
        assert_eq!(
            fsm.process(Input::TcpConnectionConfirmed),
            [Output::RefuseConnection(notification(6, 7))]
        );
    }

    #[test]
    fn a_bad_open_on_the_tracked_connection_closes_only_that_one() {
        let mut fsm = tracking_candidate(config());
        let out = fsm.process(Input::CandidateOpenReceived(Open {
            asn: 65099,
            ..peer_open()
        }));
        assert!(
            matches!(&out[..], [Output::CloseCandidate { notification: Some(n), .. }] if *n == notification(2, 2)),
            "{out:?}"
        );
        assert_eq!(fsm.state(), State::OpenSent);
    }

    #[test]
    fn a_tracked_connection_that_ends_is_dropped_and_ours_carries_on() {
        let mut fsm = tracking_candidate(config());
        let out = fsm.process(Input::CandidateFailed { answer: None });
        assert!(matches!(
            &out[..],
            [Output::CloseCandidate {
                notification: None,
                ..
            }]
        ));
        assert_eq!(fsm.state(), State::OpenSent);
        // Losing ours now goes to Active as any failed attempt.
        fsm.process(Input::TcpConnectionClosed);
        assert_eq!(fsm.state(), State::Active);
    }

    #[test]
    fn manual_stop_closes_the_tracked_connection_too() {
        let mut fsm = tracking_candidate(config());
        let out = fsm.process(Input::ManualStop {
            reason: String::new(),
        });
        let cease = shutdown_notification("");
        assert!(
            out.iter().any(
                |o| matches!(o, Output::CloseCandidate { notification: Some(n), .. } if *n == cease)
            ),
            "{out:?}"
        );
        assert!(
            !out.iter()
                .any(|o| matches!(o, Output::PromoteCandidate { .. }))
        );
        assert_eq!(fsm.state(), State::Idle);
    }
}
