//! The BFD session state machine (RFC 5880 §6.2, §6.8): no async, no tokio, no sockets, no
//! clock. [`Fsm::process`] takes one [`Input`] and returns the [`Output`]s the driver
//! ([`super::session`]) carries out: packets to send and timers to arm. Asynchronous mode only
//! (no Demand mode, no Echo function), no authentication.
//!
//! Timing (§6.8.2–§6.8.4, §6.8.7):
//! - while the session is not Up we advertise a Desired Min TX of at least 1 s (§6.8.3); once
//!   Up, the configured `min_tx` is advertised with a Poll Sequence (§6.5), as is any change of
//!   parameters by a reload;
//! - the values our timers use change only when the Poll Sequence ends (the peer's Final), so a
//!   slower peer is never declared down by a detection time it has not agreed to;
//! - we send every `max(our Desired Min TX, the peer's Required Min RX)`, jittered by the driver
//!   with [`jittered`], and nothing while the peer's Required Min RX is zero;
//! - the detection time is the peer's Detect Mult × `max(our Required Min RX, the peer's
//!   Desired Min TX)`.

use std::{num::NonZeroU32, time::Duration};

use super::packet::{ControlPacket, Diag, State};

/// The slowest rate we may advertise while the session is not Up (§6.8.3).
pub const SLOW_TX: Duration = Duration::from_secs(1);

/// A session's configured timers (`bfd:` on a peer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    pub min_tx: Duration,
    pub min_rx: Duration,
    pub multiplier: u8,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A packet the decoder and the demultiplexer accepted for this session (§6.8.6).
    Received(ControlPacket),
    /// The transmit timer fired: time for the next periodic packet (§6.8.7).
    TransmitTimer,
    /// The detection time passed without a packet from the peer (§6.8.4).
    DetectTimer,
    /// New parameters from a reload: taken with a Poll Sequence when Up (§6.8.3).
    Reconfigure(Params),
    /// The agent is stopping: tell the peer we go down on purpose (§6.8.16, Diag 7), so it
    /// does not take it for a failure.
    AdminDown,
}

/// What the driver must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send this packet now.
    Send(ControlPacket),
    /// Arm the transmit timer for this base interval (the driver jitters it); `None` stops
    /// periodic transmission.
    SetTransmitTimer(Option<Duration>),
    /// Arm the detection timer; `None` turns it off.
    SetDetectTimer(Option<Duration>),
    /// The session changed state; `diag` is our diagnostic (why it went down).
    StateChanged { from: State, to: State, diag: Diag },
}

/// One session's RFC 5880 §6.8.1 state variables.
#[derive(Debug, Clone)]
pub struct Fsm {
    state: State,
    /// `None` until the peer is heard.
    remote_state: Option<State>,
    local_discr: NonZeroU32,
    remote_discr: Option<NonZeroU32>,
    diag: Diag,
    params: Params,
    /// Desired Min TX and Required Min RX we advertise.
    desired_min_tx: Duration,
    required_min_rx: Duration,
    /// The same two as our timers use: they follow the advertised ones when a Poll Sequence
    /// ends, or at once when none is needed.
    active_min_tx: Duration,
    active_min_rx: Duration,
    /// A Poll Sequence is in progress (§6.5).
    polling: bool,
    remote_min_rx: Duration,
    remote_desired_min_tx: Duration,
    remote_detect_mult: Option<u8>,
}

impl Fsm {
    /// A session in Down with the slow start rate; [`Fsm::start`] gives the first outputs.
    pub fn new(local_discr: NonZeroU32, params: Params) -> Self {
        let desired = params.min_tx.max(SLOW_TX);
        Self {
            state: State::Down,
            remote_state: None,
            local_discr,
            remote_discr: None,
            diag: Diag::None,
            params,
            desired_min_tx: desired,
            required_min_rx: params.min_rx,
            active_min_tx: desired,
            active_min_rx: params.min_rx,
            polling: false,
            // §6.8.1: initialized to 1 (µs), so we send at our own rate until we hear.
            remote_min_rx: Duration::from_micros(1),
            remote_desired_min_tx: Duration::ZERO,
            remote_detect_mult: None,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn diag(&self) -> Diag {
        self.diag
    }

    /// The peer's state as it last said it.
    pub fn remote_state(&self) -> Option<State> {
        self.remote_state
    }

    /// The configured timers.
    pub fn params(&self) -> Params {
        self.params
    }

    /// Our Detect Mult (it sets the jitter range, [`jittered`]).
    pub fn multiplier(&self) -> u8 {
        self.params.multiplier
    }

    pub fn local_discr(&self) -> NonZeroU32 {
        self.local_discr
    }

    pub fn remote_discr(&self) -> Option<NonZeroU32> {
        self.remote_discr
    }

    /// The interval we send at now (before jitter), `None` while the peer asks for nothing.
    pub fn transmit_interval(&self) -> Option<Duration> {
        (!self.remote_min_rx.is_zero()).then(|| self.active_min_tx.max(self.remote_min_rx))
    }

    /// The detection time now, once the peer has been heard.
    pub fn detection_time(&self) -> Option<Duration> {
        let mult = self.remote_detect_mult?;
        Some(self.active_min_rx.max(self.remote_desired_min_tx) * u32::from(mult))
    }

    /// The outputs that start the session: a first packet and the transmit timer.
    pub fn start(&self) -> Vec<Output> {
        vec![
            Output::Send(self.packet(false)),
            Output::SetTransmitTimer(self.transmit_interval()),
        ]
    }

    pub fn process(&mut self, input: Input) -> Vec<Output> {
        match input {
            Input::Received(packet) => self.received(&packet),
            Input::TransmitTimer => vec![
                Output::Send(self.packet(false)),
                Output::SetTransmitTimer(self.transmit_interval()),
            ],
            Input::DetectTimer => self.detect_expired(),
            Input::Reconfigure(params) => self.reconfigure(params),
            Input::AdminDown => {
                let mut out = Vec::new();
                self.set_state(State::AdminDown, Diag::AdministrativelyDown, &mut out);
                out.push(Output::SetDetectTimer(None));
                out.push(Output::Send(self.packet(false)));
                out
            }
        }
    }

    /// §6.8.6, from "Set bfd.RemoteDiscr" on: the packet already passed every check that
    /// needs no session state.
    fn received(&mut self, p: &ControlPacket) -> Vec<Output> {
        let mut out = Vec::new();
        if self.state == State::AdminDown {
            return out;
        }
        self.remote_discr = Some(p.my_discr);
        self.remote_state = Some(p.state);
        self.remote_detect_mult = Some(p.detect_mult);
        self.remote_desired_min_tx = p.desired_min_tx;
        let old_interval = self.transmit_interval();
        self.remote_min_rx = p.required_min_rx;
        if p.final_ && self.polling {
            self.polling = false;
            self.active_min_tx = self.desired_min_tx;
            self.active_min_rx = self.required_min_rx;
        }
        match (self.state, p.state) {
            (State::Init | State::Up, State::AdminDown) | (State::Up, State::Down) => {
                self.set_state(State::Down, Diag::NeighborSignaledSessionDown, &mut out);
            }
            (State::Down, State::Down) => self.set_state(State::Init, Diag::None, &mut out),
            (State::Down, State::Init) | (State::Init, State::Init | State::Up) => {
                self.set_state(State::Up, Diag::None, &mut out);
            }
            _ => {}
        }
        // The detection timer restarts on every packet, in every state: in Down it only
        // clears the peer's discriminator (§6.8.1).
        out.push(Output::SetDetectTimer(self.detection_time()));
        if p.poll {
            // §6.8.7: the Final goes out at once, whatever the transmit timer says.
            out.push(Output::Send(self.packet(true)));
        }
        let interval = self.transmit_interval();
        if interval != old_interval || out.iter().any(|o| matches!(o, Output::StateChanged { .. }))
        {
            out.push(Output::SetTransmitTimer(interval));
        }
        out
    }

    fn detect_expired(&mut self) -> Vec<Output> {
        let mut out = Vec::new();
        // §6.8.1: the peer's discriminator is forgotten once it has been silent this long.
        self.remote_discr = None;
        self.remote_detect_mult = None;
        self.remote_min_rx = Duration::from_micros(1);
        if matches!(self.state, State::Init | State::Up) {
            self.set_state(State::Down, Diag::ControlDetectionTimeExpired, &mut out);
            out.push(Output::SetTransmitTimer(self.transmit_interval()));
        }
        out
    }

    fn reconfigure(&mut self, params: Params) -> Vec<Output> {
        self.params = params;
        let mut out = Vec::new();
        if self.state == State::Up {
            self.start_poll(&mut out);
        } else {
            self.desired_min_tx = params.min_tx.max(SLOW_TX);
            self.required_min_rx = params.min_rx;
            self.active_min_tx = self.desired_min_tx;
            self.active_min_rx = self.required_min_rx;
            out.push(Output::SetTransmitTimer(self.transmit_interval()));
            out.push(Output::SetDetectTimer(self.detection_time()));
        }
        out
    }

    /// Advertises the configured intervals with the P bit; a packet goes out at once so the
    /// change does not wait a full (slow) interval.
    fn start_poll(&mut self, out: &mut Vec<Output>) {
        self.desired_min_tx = self.params.min_tx;
        self.required_min_rx = self.params.min_rx;
        if self.desired_min_tx == self.active_min_tx && self.required_min_rx == self.active_min_rx {
            return;
        }
        self.polling = true;
        out.push(Output::Send(self.packet(false)));
    }

    fn set_state(&mut self, to: State, diag: Diag, out: &mut Vec<Output>) {
        let from = self.state;
        if from == to {
            return;
        }
        self.state = to;
        if to != State::Up {
            // §6.8.3: at most one packet a second while not Up; a pending poll is moot.
            self.polling = false;
            self.desired_min_tx = self.params.min_tx.max(SLOW_TX);
            self.required_min_rx = self.params.min_rx;
            self.active_min_tx = self.desired_min_tx;
            self.active_min_rx = self.required_min_rx;
        }
        if to != State::Up || diag != Diag::None {
            self.diag = diag;
        }
        out.push(Output::StateChanged {
            from,
            to,
            diag: self.diag,
        });
        if to == State::Up {
            self.start_poll(out);
        }
    }

    /// Our next packet (§6.8.7); `final_` answers a Poll, which never carries P itself.
    fn packet(&self, final_: bool) -> ControlPacket {
        ControlPacket {
            diag: self.diag,
            state: self.state,
            poll: self.polling && !final_,
            final_,
            control_plane_independent: false,
            demand: false,
            detect_mult: self.params.multiplier,
            my_discr: self.local_discr,
            your_discr: self.remote_discr,
            desired_min_tx: self.desired_min_tx,
            required_min_rx: self.required_min_rx,
            required_min_echo_rx: Duration::ZERO,
        }
    }
}

/// §6.8.7: each interval is reduced by a random 0–25 %, or 10–25 % when our Detect Mult is 1
/// (so the peer never sees a gap of a full interval). `random` is any number; only its value
/// modulo 1000 counts.
pub fn jittered(interval: Duration, detect_mult: u8, random: u32) -> Duration {
    let (low, high) = if detect_mult == 1 {
        (750, 900)
    } else {
        (750, 1000)
    };
    let permille = low + random % (high - low + 1);
    interval * permille / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    fn params() -> Params {
        Params {
            min_tx: MS(300),
            min_rx: MS(300),
            multiplier: 3,
        }
    }

    fn fsm() -> Fsm {
        Fsm::new(NonZeroU32::new(1).unwrap(), params())
    }

    fn from_peer(state: State) -> ControlPacket {
        ControlPacket {
            diag: Diag::None,
            state,
            poll: false,
            final_: false,
            control_plane_independent: false,
            demand: false,
            detect_mult: 3,
            my_discr: NonZeroU32::new(99).unwrap(),
            your_discr: NonZeroU32::new(1),
            desired_min_tx: MS(1000),
            required_min_rx: MS(300),
            required_min_echo_rx: Duration::ZERO,
        }
    }

    fn sent(out: &[Output]) -> Vec<&ControlPacket> {
        out.iter()
            .filter_map(|o| match o {
                Output::Send(p) => Some(p),
                _ => None,
            })
            .collect()
    }

    fn changes(out: &[Output]) -> Vec<(State, State, Diag)> {
        out.iter()
            .filter_map(|o| match o {
                Output::StateChanged { from, to, diag } => Some((*from, *to, *diag)),
                _ => None,
            })
            .collect()
    }

    /// Down → Up through the three-way handshake, the peer answering our Poll.
    fn up() -> Fsm {
        let mut f = fsm();
        f.process(Input::Received(from_peer(State::Init)));
        assert_eq!(f.state(), State::Up);
        f.process(Input::Received(ControlPacket {
            final_: true,
            desired_min_tx: MS(300),
            ..from_peer(State::Up)
        }));
        f
    }

    #[test]
    fn a_new_session_sends_once_a_second_without_the_peers_discriminator() {
        let f = fsm();
        let out = f.start();
        let p = sent(&out)[0];
        assert_eq!(
            (p.state, p.your_discr, p.desired_min_tx),
            (State::Down, None, SLOW_TX)
        );
        assert_eq!(out[1], Output::SetTransmitTimer(Some(SLOW_TX)));
    }

    #[test]
    fn down_hearing_down_goes_to_init_then_up_on_init() {
        let mut f = fsm();
        let out = f.process(Input::Received(from_peer(State::Down)));
        assert_eq!(changes(&out), [(State::Down, State::Init, Diag::None)]);
        assert_eq!(f.remote_discr(), NonZeroU32::new(99));
        let out = f.process(Input::Received(from_peer(State::Up)));
        assert_eq!(changes(&out), [(State::Init, State::Up, Diag::None)]);
    }

    #[test]
    fn down_hearing_init_goes_straight_up() {
        let mut f = fsm();
        let out = f.process(Input::Received(from_peer(State::Init)));
        assert_eq!(changes(&out), [(State::Down, State::Up, Diag::None)]);
    }

    #[test]
    fn down_ignores_a_peer_that_says_up() {
        let mut f = fsm();
        let out = f.process(Input::Received(from_peer(State::Up)));
        assert!(changes(&out).is_empty());
        assert_eq!(f.state(), State::Down);
    }

    #[test]
    fn coming_up_polls_to_the_configured_rate_and_the_final_applies_it() {
        let mut f = fsm();
        let out = f.process(Input::Received(from_peer(State::Init)));
        let poll = sent(&out)[0];
        assert!(poll.poll && !poll.final_);
        assert_eq!(poll.desired_min_tx, MS(300));
        assert_eq!(
            f.transmit_interval(),
            Some(SLOW_TX),
            "the old rate stays until the Final"
        );
        f.process(Input::Received(ControlPacket {
            final_: true,
            ..from_peer(State::Up)
        }));
        assert_eq!(f.transmit_interval(), Some(MS(300)));
        let next = f.process(Input::TransmitTimer);
        assert!(!sent(&next)[0].poll, "the sequence is over");
    }

    #[test]
    fn detection_time_is_the_peers_multiplier_times_the_agreed_interval() {
        let mut f = up();
        assert_eq!(f.detection_time(), Some(MS(900)));
        let out = f.process(Input::Received(ControlPacket {
            detect_mult: 5,
            desired_min_tx: MS(500),
            ..from_peer(State::Up)
        }));
        assert!(out.contains(&Output::SetDetectTimer(Some(MS(2500)))));
    }

    #[test]
    fn we_send_no_faster_than_the_peer_accepts() {
        let mut f = up();
        f.process(Input::Received(ControlPacket {
            required_min_rx: MS(700),
            ..from_peer(State::Up)
        }));
        assert_eq!(f.transmit_interval(), Some(MS(700)));
    }

    #[test]
    fn a_peer_that_wants_nothing_gets_no_periodic_packets() {
        let mut f = up();
        let out = f.process(Input::Received(ControlPacket {
            required_min_rx: Duration::ZERO,
            ..from_peer(State::Up)
        }));
        assert!(out.contains(&Output::SetTransmitTimer(None)));
    }

    #[test]
    fn a_poll_is_answered_at_once_with_a_final() {
        let mut f = up();
        let out = f.process(Input::Received(ControlPacket {
            poll: true,
            ..from_peer(State::Up)
        }));
        let p = sent(&out)[0];
        assert!(p.final_ && !p.poll);
    }

    #[test]
    fn silence_for_the_detection_time_takes_the_session_down_with_diag_1() {
        let mut f = up();
        let out = f.process(Input::DetectTimer);
        assert_eq!(
            changes(&out),
            [(State::Up, State::Down, Diag::ControlDetectionTimeExpired)]
        );
        assert_eq!(f.remote_discr(), None);
        assert_eq!(
            f.transmit_interval(),
            Some(SLOW_TX),
            "back to the slow rate"
        );
        let p = f.process(Input::TransmitTimer);
        assert_eq!(sent(&p)[0].diag, Diag::ControlDetectionTimeExpired);
    }

    #[test]
    fn silence_while_down_only_forgets_the_peer() {
        let mut f = fsm();
        let out = f.process(Input::DetectTimer);
        assert!(changes(&out).is_empty());
        assert_eq!(f.state(), State::Down);
    }

    #[test]
    fn the_peer_going_down_or_admin_down_takes_us_down_with_diag_3() {
        for remote in [State::Down, State::AdminDown] {
            let mut f = up();
            let out = f.process(Input::Received(from_peer(remote)));
            assert_eq!(
                changes(&out),
                [(State::Up, State::Down, Diag::NeighborSignaledSessionDown)]
            );
        }
    }

    #[test]
    fn init_hearing_admin_down_goes_down() {
        let mut f = fsm();
        f.process(Input::Received(from_peer(State::Down)));
        let out = f.process(Input::Received(from_peer(State::AdminDown)));
        assert_eq!(
            changes(&out),
            [(State::Init, State::Down, Diag::NeighborSignaledSessionDown)]
        );
    }

    #[test]
    fn admin_down_is_sent_with_diag_7_and_packets_are_then_ignored() {
        let mut f = up();
        let out = f.process(Input::AdminDown);
        assert_eq!(
            changes(&out),
            [(State::Up, State::AdminDown, Diag::AdministrativelyDown)]
        );
        let p = sent(&out)[0];
        assert_eq!(
            (p.state, p.diag),
            (State::AdminDown, Diag::AdministrativelyDown)
        );
        assert!(f.process(Input::Received(from_peer(State::Up))).is_empty());
        assert_eq!(f.state(), State::AdminDown);
    }

    #[test]
    fn a_reload_while_up_polls_and_keeps_the_old_detection_time_until_the_final() {
        let mut f = up();
        let slower = Params {
            min_tx: MS(500),
            min_rx: MS(100),
            multiplier: 3,
        };
        let out = f.process(Input::Reconfigure(slower));
        let p = sent(&out)[0];
        assert!(p.poll);
        assert_eq!((p.desired_min_tx, p.required_min_rx), (MS(500), MS(100)));
        assert_eq!(
            f.detection_time(),
            Some(MS(900)),
            "not shortened before the Final"
        );
        assert_eq!(
            f.transmit_interval(),
            Some(MS(300)),
            "not slowed before the Final"
        );
        f.process(Input::Received(ControlPacket {
            final_: true,
            desired_min_tx: MS(100),
            ..from_peer(State::Up)
        }));
        assert_eq!(f.detection_time(), Some(MS(300)));
        assert_eq!(f.transmit_interval(), Some(MS(500)));
        assert_eq!(f.state(), State::Up, "no state change");
    }

    #[test]
    fn a_reload_that_changes_nothing_sends_no_poll() {
        let mut f = up();
        assert!(f.process(Input::Reconfigure(params())).is_empty());
    }

    #[test]
    fn a_reload_while_down_applies_at_once() {
        let mut f = fsm();
        let out = f.process(Input::Reconfigure(Params {
            min_tx: MS(2000),
            ..params()
        }));
        assert!(out.contains(&Output::SetTransmitTimer(Some(MS(2000)))));
        assert!(sent(&out).is_empty());
    }

    #[test]
    fn jitter_stays_within_75_to_100_percent_and_90_with_multiplier_1() {
        let base = MS(1000);
        let all = |mult| (0..2000).map(move |r| jittered(base, mult, r));
        assert!(all(3).all(|d| (MS(750)..=MS(1000)).contains(&d)));
        assert_eq!(all(3).min(), Some(MS(750)));
        assert_eq!(all(3).max(), Some(MS(1000)));
        assert!(all(1).all(|d| (MS(750)..=MS(900)).contains(&d)));
        assert_eq!(all(1).max(), Some(MS(900)));
    }
}
