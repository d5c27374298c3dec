//! BFD (RFC 5880), single hop over UDP (RFC 5881), for the BGP sessions (RFC 5882): a router
//! that runs BFD with the agent withdraws the host's routes within the detection time (900 ms
//! by default) when the host goes silent, instead of after the BGP hold time.
//!
//! ```text
//!  Bfd (handle) ─register─▶ receiver task ── UDP :3784 (IPv4, IPv6), TTL 255 checked
//!                                 │ packets by discriminator
//!  BGP supervisor(peer) ─spawn─▶ supervised Session ─UDP 49152-65535, TTL 255─▶ router
//!                                 └─ BfdStatus (watch) ─▶ BGP session (teardown, strict gate), /info
//! ```
//!
//! [`packet`] is the wire format with its checked decoder, [`fsm`] the pure state machine,
//! [`session`] the task that drives one session, [`receiver`] the shared receive sockets.
//! One session per BGP peer with `bfd` set; it outlives restarts of the BGP session task and
//! is stopped, `AdminDown`, after the BGP session has sent its Cease.

pub mod fsm;
pub mod packet;
pub mod receiver;
pub mod session;

use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::warn;

pub use self::session::BfdStatus;
use self::{receiver::Receiver, session::Session};
use crate::{config::PeerConfig, error_chain, metrics::Metrics, supervise};

/// The destination port of single-hop BFD Control packets (RFC 5881 §4).
pub const PORT: u16 = 3784;
/// The `task` label of BFD session restarts in `gocast_task_restarts_total`.
pub const TASK: &str = "bfd_session";
/// The longest a stopping session may take to say `AdminDown`.
const STOP_WAIT: Duration = Duration::from_secs(5);

/// The agent's BFD: hands sessions to the receiver task. Cheap to clone; the receiver (and its
/// sockets, bound on the first session) lives while a clone does.
#[derive(Clone)]
pub struct Bfd {
    commands: mpsc::Sender<receiver::Command>,
    /// Where sessions send to: [`PORT`], another one in tests that run two speakers on one host.
    port: u16,
}

impl Bfd {
    /// Listens on [`PORT`] (once a session starts) and sends to it.
    pub fn start(metrics: &Metrics) -> Self {
        Self::on_ports(PORT, PORT, metrics)
    }

    /// Listens on `listen` and sends to `send`.
    pub fn on_ports(listen: u16, send: u16, metrics: &Metrics) -> Self {
        let (commands, rx) = mpsc::channel(8);
        tokio::spawn(Receiver::new(listen, metrics.clone()).run(rx));
        Self {
            commands,
            port: send,
        }
    }

    /// Starts `peer`'s session, supervised (a panic restarts it after a backoff); it follows
    /// timer changes in `peer`. Returns its status and what stops it.
    pub fn spawn_session(
        &self,
        peer: watch::Receiver<PeerConfig>,
        metrics: &Metrics,
    ) -> SessionHandle {
        let params = session::params(&peer.borrow());
        let (status, status_rx) = watch::channel(BfdStatus::new(params));
        let stop = CancellationToken::new();
        let bfd = self.clone();
        let task_metrics = metrics.clone();
        let supervised = supervise::spawn(TASK, metrics.clone(), stop.clone(), move |cancel| {
            let (bfd, status, metrics, peer) = (
                bfd.clone(),
                status.clone(),
                task_metrics.clone(),
                peer.clone(),
            );
            async move {
                let config = peer.borrow().clone();
                match Session::start(&bfd, &config, status.clone(), metrics).await {
                    Ok(session) => session.run(peer, cancel).await,
                    Err(e) => {
                        let why = error_chain(&e);
                        warn!(peer = ?config.peer_ip, error = %why, "bfd session cannot start");
                        status.send_modify(|s| s.error = Some(why));
                    }
                }
            }
        });
        SessionHandle {
            status: status_rx,
            stop,
            supervised,
        }
    }
}

/// A running session, as its BGP supervisor holds it.
pub struct SessionHandle {
    pub status: watch::Receiver<BfdStatus>,
    stop: CancellationToken,
    supervised: supervise::Supervised,
}

impl SessionHandle {
    /// Takes the session `AdminDown` and waits (bounded) for it to have told the peer.
    pub async fn stop(self) {
        self.stop.cancel();
        if tokio::time::timeout(STOP_WAIT, self.supervised.done)
            .await
            .is_err()
        {
            warn!("bfd session did not stop within {STOP_WAIT:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, time::Duration};

    use super::{packet::State, *};
    use crate::{config::BfdConfig, netlink::Netlink, testing::in_new_netns};

    const WAIT: Duration = Duration::from_secs(10);
    /// The two test speakers' ports: each listens on one and sends to the other.
    const A: u16 = 3784;
    const B: u16 = 3785;

    fn peer() -> PeerConfig {
        PeerConfig {
            bfd: Some(BfdConfig {
                min_tx: Duration::from_millis(50),
                min_rx: Duration::from_millis(50),
                multiplier: 3,
                strict: true,
            }),
            ..crate::testing::loopback_peer(179)
        }
    }

    async fn wait_state(status: &mut watch::Receiver<BfdStatus>, state: State) -> BfdStatus {
        let reached = tokio::time::timeout(WAIT, status.wait_for(|s| s.state == state))
            .await
            .map(|r| r.unwrap().clone());
        reached.unwrap_or_else(|_| panic!("no {state} within {WAIT:?}: {:?}", *status.borrow()))
    }

    /// Two sessions on loopback, each through its own receiver.
    fn pair(metrics: &Metrics) -> (SessionHandle, SessionHandle) {
        let a = Bfd::on_ports(A, B, metrics).spawn_session(watch::channel(peer()).1, metrics);
        let b = Bfd::on_ports(B, A, metrics).spawn_session(watch::channel(peer()).1, metrics);
        (a, b)
    }

    #[test]
    fn two_sessions_come_up_agree_on_timers_and_an_admin_down_is_not_a_failure() {
        in_new_netns(|| async {
            Netlink::new().await.unwrap();
            let metrics = Metrics::default();
            let (mut a, b) = pair(&metrics);
            let up = wait_state(&mut a.status, State::Up).await;
            assert!(up.remote_discriminator.is_some());
            // The poll sequence after Up moves both to 50 ms: 3 × 50 ms.
            tokio::time::timeout(
                WAIT,
                a.status.wait_for(|s| s.detection_time_ms == Some(150)),
            )
            .await
            .unwrap()
            .unwrap();
            b.stop().await;
            let down = wait_state(&mut a.status, State::Down).await;
            assert_eq!(down.remote_state, Some(State::AdminDown));
            assert!(
                !down.failed(true),
                "RFC 5882 §3.2: AdminDown is not a path failure"
            );
            assert_eq!(
                down.last_down.as_deref(),
                Some("neighbor signaled session down (3)")
            );
            let text = metrics.render();
            assert!(
                text.contains(
                    "gocast_bfd_state_transitions_total{peer=\"127.0.0.1\",state=\"up\"}"
                ),
                "{text}"
            );
            a.stop().await;
        });
    }

    #[test]
    fn a_silent_peer_is_declared_down_within_the_detection_time() {
        in_new_netns(|| async {
            Netlink::new().await.unwrap();
            let metrics = Metrics::default();
            let mut a =
                Bfd::on_ports(A, B, &metrics).spawn_session(watch::channel(peer()).1, &metrics);
            // A peer played by hand: it answers the first packet with Init, then goes silent.
            let fake = tokio::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, B))
                .await
                .unwrap();
            fake.set_ttl(255).unwrap();
            let mut buf = [0u8; 64];
            let (len, _) = tokio::time::timeout(WAIT, fake.recv_from(&mut buf))
                .await
                .unwrap()
                .unwrap();
            let theirs = packet::ControlPacket::decode(&buf[..len]).unwrap();
            let init = packet::ControlPacket {
                diag: packet::Diag::None,
                state: State::Init,
                poll: false,
                final_: false,
                control_plane_independent: false,
                demand: false,
                detect_mult: 3,
                my_discr: std::num::NonZeroU32::new(77).unwrap(),
                your_discr: Some(theirs.my_discr),
                desired_min_tx: Duration::from_millis(50),
                required_min_rx: Duration::from_millis(50),
                required_min_echo_rx: Duration::ZERO,
            };
            fake.send_to(&init.encode(), (Ipv4Addr::LOCALHOST, A))
                .await
                .unwrap();
            let up = wait_state(&mut a.status, State::Up).await;
            assert_eq!(up.detection_time_ms, Some(150));
            let started = std::time::Instant::now();
            let down = wait_state(&mut a.status, State::Down).await;
            assert!(down.failed(true));
            assert_eq!(
                down.last_down.as_deref(),
                Some("control detection time expired (1)")
            );
            // 150 ms plus scheduling slack on a loaded host.
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "{:?}",
                started.elapsed()
            );
            a.stop().await;
        });
    }

    #[test]
    fn hostile_packets_are_counted_and_change_nothing() {
        in_new_netns(|| async {
            Netlink::new().await.unwrap();
            let metrics = Metrics::default();
            let (mut a, b) = pair(&metrics);
            let before = wait_state(&mut a.status, State::Up).await;
            let valid = packet::ControlPacket {
                diag: packet::Diag::None,
                state: State::Down,
                poll: false,
                final_: false,
                control_plane_independent: false,
                demand: false,
                detect_mult: 3,
                my_discr: std::num::NonZeroU32::MIN,
                your_discr: before
                    .local_discriminator
                    .and_then(std::num::NonZeroU32::new),
                desired_min_tx: Duration::from_secs(1),
                required_min_rx: Duration::from_secs(1),
                required_min_echo_rx: Duration::ZERO,
            }
            .encode();
            let to = (Ipv4Addr::LOCALHOST, A);
            let ttl64 = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            ttl64.set_ttl(64).unwrap();
            ttl64.send_to(&valid, to).await.unwrap();
            let ttl255 = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            ttl255.set_ttl(255).unwrap();
            let mut zero_my = valid;
            zero_my[4..8].fill(0);
            let mut unknown_your = valid;
            unknown_your[8..12].copy_from_slice(&1234_u32.to_be_bytes());
            for bad in [
                &valid[..10],
                &zero_my[..],
                &unknown_your[..],
                &[0xff; 40][..],
            ] {
                ttl255.send_to(bad, to).await.unwrap();
            }
            let expected = [
                "reason=\"ttl\"} 1",
                "reason=\"length\"} 1",
                "reason=\"my_discriminator\"} 1",
                "reason=\"your_discriminator\"} 1",
                "reason=\"version\"} 1",
            ];
            let counted = async {
                loop {
                    let text = metrics.render();
                    if expected.iter().all(|e| text.contains(e)) {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            };
            tokio::time::timeout(WAIT, counted)
                .await
                .unwrap_or_else(|_| panic!("{}", metrics.render()));
            assert_eq!(a.status.borrow().state, State::Up, "no state change");
            a.stop().await;
            b.stop().await;
        });
    }
}
