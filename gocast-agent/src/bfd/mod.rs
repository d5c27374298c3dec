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
//! is stopped, AdminDown, after the BGP session has sent its Cease.

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
/// The longest a stopping session may take to say AdminDown.
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
    /// Takes the session AdminDown and waits (bounded) for it to have told the peer.
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
