//! Supervision of one peer's session: when the [`Session`] task panics or ends by itself, it is
//! started again after a backoff, so one bad moment does not leave a peer down until the agent
//! restarts.
//!
//! ```text
//!  speaker ──stop cause, peer config (watch)──▶ supervise ──runs──▶ Session ──TCP──▶ router
//!                                                  │ owns, lends to each Session:
//!                                                  │ status (/info, /healthz), flushed version
//!                                                  └ (lifecycle), incoming connections (listener)
//! ```
//!
//! The supervisor owns what must outlive one session task and lends it to each [`Session`]; a
//! panic unwinds up to its `catch_unwind` (the shape of holo's event loop), which logs it at ERROR
//! with the panic text, counts it (`gocast_task_restarts_total{task="bgp_session"}`), marks the
//! peer's [`PeerStatus::task_down`] for `/healthz`, and starts a new session after the
//! [`Backoff`]'s delay. The socket died with the session, so the peer has dropped our routes:
//! while the session is down, every route-set version counts as sent to it and no withdrawal
//! waits for it.
//!
//! A peer with `bfd` set also has its BFD session here ([`crate::bfd`]): it starts before the
//! first BGP session, outlives their restarts, and is stopped (`AdminDown`) only after the last
//! one has sent its Cease, so the router sees a shutdown, not a path failure (RFC 5882 §3.2).

use std::{
    any::Any,
    panic::AssertUnwindSafe,
    time::{Duration, Instant},
};

use futures::FutureExt;
use tokio::{
    net::TcpStream,
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tracing::{Instrument, error, info, info_span, warn};

use super::{
    fsm::State,
    session::{
        PeerStatus, Session, SessionLinks, SessionSettings, StopCause, peer_name, stop_requested,
    },
};
use crate::{
    backoff::Backoff,
    bfd::{Bfd, BfdStatus},
    error_chain,
    messages::Routes,
    metrics::Metrics,
    netlink::Netlink,
};

/// The `task` label of session restarts in `gocast_task_restarts_total`.
pub const TASK: &str = "bgp_session";
/// First delay before a failed session task is started again; it doubles up to
/// [`RESTART_MAX`]. Short: the peer is without our routes meanwhile.
const RESTART_FIRST: Duration = Duration::from_secs(1);
/// Longest delay between restarts of a session task that keeps failing.
const RESTART_MAX: Duration = Duration::from_secs(60);
/// A session task that ran this long before failing starts the backoff again from
/// [`RESTART_FIRST`]: its failure is a new incident, not the same one repeating.
const STABLE_RUN: Duration = Duration::from_secs(300);
/// How long a session that replaces another one (a reset by reload) waits for it to send its
/// Cease and close, so the peer never sees both connections at once.
const PREDECESSOR_WAIT: Duration = Duration::from_secs(5);

/// One peer's supervisor: what it lends its sessions and what tells it to stop.
pub struct Supervised {
    pub settings: SessionSettings,
    pub metrics: Metrics,
    pub routes: watch::Receiver<Routes>,
    /// `Some` once the speaker wants the session gone; the supervisor then restarts nothing.
    pub stop: watch::Receiver<Option<StopCause>>,
    pub incoming: mpsc::Receiver<TcpStream>,
    pub status: watch::Sender<PeerStatus>,
    pub flushed: watch::Sender<u64>,
    /// The task of the session this one replaces, awaited first (it still writes `status`
    /// until it ends).
    pub predecessor: Option<JoinHandle<()>>,
    /// Where the peer's BFD session (if `bfd` is set) registers.
    pub bfd: Bfd,
    /// Test-only fault injection (see [`fault`]): the first session panics once Established.
    #[cfg(debug_assertions)]
    pub inject_panic: bool,
}

/// Runs the peer's session until the speaker stops it, restarting it whenever it fails; then
/// stops its BFD session.
/// Every line it and its sessions log is in the span `bgp{peer=ADDR}`, so one peer's story
/// filters out of the journal (docs/operations.md, "Logs").
pub async fn supervise(s: Supervised) {
    let span = info_span!("bgp", peer = %peer_name(&s.settings.peer.borrow()));
    supervise_in_span(s).instrument(span).await;
}

async fn supervise_in_span(mut s: Supervised) {
    if let Some(old) = s.predecessor.take()
        && tokio::time::timeout(PREDECESSOR_WAIT, old).await.is_err()
    {
        warn!(
            "the session being replaced did not close within {PREDECESSOR_WAIT:?}; starting anyway"
        );
    }
    let bfd = s
        .settings
        .peer
        .borrow()
        .bfd
        .is_some()
        .then(|| s.bfd.spawn_session(s.settings.peer.clone(), &s.metrics));
    let bfd_status = bfd.as_ref().map(|b| b.status.clone());
    s.status
        .send_modify(|st| st.bfd = bfd_status.as_ref().map(|b| b.borrow().clone()));
    supervise_sessions(&mut s, bfd_status).await;
    if let Some(bfd) = bfd {
        bfd.stop().await;
    }
}

/// The restart loop of [`supervise`].
async fn supervise_sessions(s: &mut Supervised, bfd: Option<watch::Receiver<BfdStatus>>) {
    let (name, address, asn) = {
        let peer = s.settings.peer.borrow();
        (peer_name(&peer), peer.peer_ip, peer.peer_as)
    };
    // A status taken over from the session this one replaces keeps its history.
    s.status.send_modify(|st| {
        st.address = address;
        st.asn = asn;
    });
    let mut backoff = Backoff::new(RESTART_FIRST, RESTART_MAX);
    loop {
        if stop_requested(&mut s.stop).is_some() {
            return;
        }
        let started = Instant::now();
        let why = match run_once(s, bfd.clone()).await {
            Ok(()) => return,
            Err(why) => why,
        };
        if started.elapsed() >= STABLE_RUN {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        error!(task = TASK, error = %why, ?delay, "BGP session task failed; restarting it");
        mark_down(s, &name, &why);
        if !wait_down(s, delay).await {
            return;
        }
        s.metrics.task_restarted(TASK, &name);
        s.status.send_modify(|st| st.task_down = None);
        info!(task = TASK, "BGP session task restarted");
    }
}

/// Runs one session task to its end: `Ok` when the speaker stopped it, else why it ended.
async fn run_once(
    s: &mut Supervised,
    bfd: Option<watch::Receiver<BfdStatus>>,
) -> Result<(), String> {
    // A connection per session: dumps from sessions that come up together would otherwise
    // collide (the kernel answers EBUSY).
    let netlink = Netlink::new()
        .await
        .map_err(|e| format!("cannot open a netlink connection: {}", error_chain(&e)))?;
    let session = Session::new(
        s.settings.clone(),
        netlink,
        s.metrics.clone(),
        SessionLinks {
            routes: s.routes.clone(),
            stop: s.stop.clone(),
            incoming: &mut s.incoming,
            status: &s.status,
            flushed: &s.flushed,
            bfd,
        },
    );
    let run = session.run();
    #[cfg(debug_assertions)]
    let run = fault::inject(
        run,
        std::mem::take(&mut s.inject_panic),
        s.status.subscribe(),
    );
    // The session's state is dropped with it; what it borrowed is left consistent (watch and
    // mpsc channels), so asserting unwind safety is sound here.
    match AssertUnwindSafe(run).catch_unwind().await {
        Ok(()) if stop_requested(&mut s.stop).is_some() => Ok(()),
        Ok(()) => Err("ended by itself".to_owned()),
        Err(panic) => Err(format!("panicked: {}", panic_text(&*panic))),
    }
}

/// What `/info`, `/healthz` and `/metrics` show of a peer whose session task is gone.
fn mark_down(s: &Supervised, name: &str, why: &str) {
    s.status.send_modify(|st| {
        st.task_down = Some(why.to_owned());
        st.state = State::Idle;
        st.established_at = None;
        st.prefixes_advertised = 0;
        st.prefixes_received = 0;
        st.families.clear();
        st.last_error = Some(format!("session task {why}"));
    });
    s.metrics.peer_state(name, false);
    s.metrics.prefixes_advertised(name, 0);
    s.metrics.prefixes_received(name, 0);
    // Nothing is announced to a peer without a session: any version counts as sent.
    s.flushed.send_replace(s.routes.borrow().version);
}

/// Waits out the restart delay, keeping the flushed version current; `false` when the speaker
/// stopped the peer meanwhile.
async fn wait_down(s: &mut Supervised, delay: Duration) -> bool {
    let sleep = tokio::time::sleep(delay);
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            () = &mut sleep => return true,
            Ok(()) = s.routes.changed() => {
                let version = s.routes.borrow_and_update().version;
                s.flushed.send_replace(version);
            }
            _ = s.stop.changed() => {
                if stop_requested(&mut s.stop).is_some() {
                    return false;
                }
            }
        }
    }
}

/// The message of a panic payload (`panic!` gives a `&str` or a `String`).
fn panic_text(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned())
}

/// Test-only fault injection, compiled into debug builds only (the end-to-end tests run the
/// debug binary; a release build has no such hook). `GOCAST_TEST_PANIC_SESSION=<peer address>`,
/// read once when the speaker starts, makes the first session task of that peer panic
/// [`fault::PANIC_AFTER`] after it reaches Established, once per agent run, so a test can watch
/// supervision restart it. The panic happens inside the supervised future, beside the session,
/// so the session code carries no test seam.
#[cfg(debug_assertions)]
pub mod fault {
    use std::{future::Future, net::IpAddr, time::Duration};

    use tokio::sync::watch;

    use super::{PeerStatus, State};

    /// The variable naming the peer whose session panics.
    pub const ENV: &str = "GOCAST_TEST_PANIC_SESSION";
    /// Time between Established and the panic: the route has reached the peer by then.
    pub const PANIC_AFTER: Duration = Duration::from_millis(500);

    /// The peer named by [`ENV`], if any.
    pub fn target() -> Option<IpAddr> {
        std::env::var(ENV).ok()?.trim().parse().ok()
    }

    /// Runs `session`; when `armed`, panics [`PANIC_AFTER`] after `status` says Established.
    pub async fn inject(
        session: impl Future<Output = ()>,
        armed: bool,
        mut status: watch::Receiver<PeerStatus>,
    ) {
        if !armed {
            return session.await;
        }
        let established = async {
            // The supervisor holds the sender for as long as this runs.
            let _ = status.wait_for(|s| s.state == State::Established).await;
            tokio::time::sleep(PANIC_AFTER).await;
        };
        tokio::select! {
            () = session => {}
            () = established => panic!("{ENV}: injected panic of this BGP session task"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use futures::{SinkExt, StreamExt};
    use tokio::net::TcpListener;
    use tokio_util::codec::Framed;

    use bytes::Bytes;
    use ipnet::IpNet;

    use super::*;
    use crate::{
        bgp::codec::{
            Attributes, BgpCodec, Family, Message, Open, Origin as CodecOrigin, encode_announce,
            encode_withdraw,
        },
        config::PeerConfig,
        testing::in_new_netns,
    };

    const WAIT: Duration = Duration::from_secs(5);

    /// A router that answers every connection's OPEN with its own and a KEEPALIVE, so each
    /// session comes up, then sends `updates` (encoded UPDATEs).
    async fn accepting_router(listener: TcpListener, updates: Vec<Bytes>) {
        while let Ok((stream, _)) = listener.accept().await {
            let updates = updates.clone();
            tokio::spawn(async move {
                let mut conn = Framed::new(stream, BgpCodec::new());
                while let Some(Ok(message)) = conn.next().await {
                    if let Message::Open(_) = message {
                        let open = Open {
                            asn: 65000,
                            hold_time: 90,
                            router_id: Ipv4Addr::new(192, 0, 2, 254),
                            families: vec![Family::Ipv4Unicast],
                            four_octet_as: true,
                            route_refresh: true,
                        };
                        let _ = conn.send(Message::Open(open)).await;
                        let _ = conn.send(Message::Keepalive).await;
                        for update in &updates {
                            let _ = SinkExt::<Bytes>::send(&mut conn, update.clone()).await;
                        }
                    }
                }
            });
        }
    }

    /// A peer on `127.0.0.1:port`.
    fn peer(port: u16) -> PeerConfig {
        crate::testing::loopback_peer(port)
    }

    /// A supervised session to `peer`, and the ends the test holds.
    fn supervised(
        peer: PeerConfig,
        metrics: &Metrics,
        inject_panic: bool,
    ) -> (
        Supervised,
        watch::Sender<Option<StopCause>>,
        watch::Receiver<PeerStatus>,
    ) {
        let (stop_tx, stop) = watch::channel(None);
        let (status, status_rx) = watch::channel(PeerStatus::new(&peer));
        let (_incoming_tx, incoming) = mpsc::channel(1);
        let s = Supervised {
            settings: SessionSettings {
                peer: watch::channel(peer).1,
                router_id: Ipv4Addr::new(192, 0, 2, 1),
                graceful: watch::channel(false).1,
            },
            metrics: metrics.clone(),
            routes: watch::channel(Routes::default()).1,
            stop,
            incoming,
            status,
            flushed: watch::channel(0).0,
            predecessor: None,
            bfd: Bfd::start(metrics),
            inject_panic,
        };
        (s, stop_tx, status_rx)
    }

    #[test]
    fn received_prefixes_are_counted_and_every_line_carries_the_peer() {
        in_new_netns(|| async {
            let logs = crate::testing::Logs::capture();
            Netlink::new().await.unwrap();
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let attrs = Attributes {
                origin: CodecOrigin::Igp,
                as_path: vec![65000],
                med: None,
                local_pref: None,
                communities: Vec::new(),
                large_communities: Vec::new(),
            };
            let net = |s: &str| s.parse::<IpNet>().unwrap();
            let mut updates = encode_announce(
                &attrs,
                Ipv4Addr::LOCALHOST.into(),
                &[
                    net("198.18.100.0/24"),
                    net("198.18.101.0/24"),
                    net("0.0.0.0/0"),
                ],
                true,
            );
            updates.extend(encode_withdraw(&[net("198.18.101.0/24")]));
            tokio::spawn(accepting_router(listener, updates));
            let metrics = Metrics::default();
            let (s, stop_tx, mut status) = supervised(peer(port), &metrics, false);
            let task = tokio::spawn(supervise(s));

            // OPEN, KEEPALIVE and two UPDATEs in: three announced, one withdrawn.
            let seen = tokio::time::timeout(
                WAIT,
                status.wait_for(|s| s.messages_in >= 4 && s.prefixes_received == 2),
            )
            .await
            .unwrap()
            .unwrap()
            .clone();
            assert_eq!(seen.families, [Family::Ipv4Unicast]);
            assert!(
                metrics
                    .render()
                    .contains("gocast_bgp_prefixes_received{peer=\"127.0.0.1\"} 2")
            );
            stop_tx.send_replace(Some(StopCause::Shutdown));
            tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
            assert_eq!(status.borrow().prefixes_received, 0, "forgotten when down");

            let text = logs.text();
            let bgp: Vec<&str> = text.lines().filter(|l| l.contains("gocast::bgp")).collect();
            assert!(
                bgp.iter().any(|l| l.contains("session established")),
                "{text}"
            );
            for line in bgp {
                assert!(line.contains("bgp{peer=127.0.0.1}"), "{line}");
            }
        });
    }

    #[test]
    fn a_session_task_that_panics_is_reported_down_counted_and_restarted() {
        in_new_netns(|| async {
            // `lo` comes up; the router listens on it.
            Netlink::new().await.unwrap();
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            tokio::spawn(accepting_router(listener, Vec::new()));
            let metrics = Metrics::default();
            let (s, stop_tx, mut status_rx) = supervised(peer(port), &metrics, true);
            let task = tokio::spawn(supervise(s));

            let down = tokio::time::timeout(WAIT, status_rx.wait_for(|s| s.task_down.is_some()))
                .await
                .unwrap()
                .unwrap()
                .clone();
            assert!(
                down.task_down.unwrap().contains("injected panic"),
                "the panic text is kept"
            );
            assert_eq!(down.state, State::Idle);
            tokio::time::timeout(
                WAIT,
                status_rx.wait_for(|s| s.task_down.is_none() && s.established_at.is_some()),
            )
            .await
            .unwrap()
            .unwrap();
            let text = metrics.render();
            assert!(
                text.contains(
                    "gocast_task_restarts_total{task=\"bgp_session\",peer=\"127.0.0.1\"} 1"
                ),
                "{text}"
            );

            stop_tx.send_replace(Some(StopCause::Shutdown));
            tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
        });
    }

    #[test]
    fn panic_text_reads_both_payload_kinds() {
        let literal = std::panic::catch_unwind(|| panic!("boom")).unwrap_err();
        assert_eq!(panic_text(&*literal), "boom");
        let formatted = std::panic::catch_unwind(|| panic!("boom {}", 2)).unwrap_err();
        assert_eq!(panic_text(&*formatted), "boom 2");
    }
}
