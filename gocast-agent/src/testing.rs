//! Test helpers: run privileged tests in a network namespace of their own, so they never touch
//! the host's addresses, routes or iptables rules; capture what is logged.

use std::{
    future::Future,
    sync::{Arc, Mutex},
};

use nix::sched::{CloneFlags, unshare};

/// Runs `f` on a current-thread tokio runtime in a thread moved to a new, empty network
/// namespace, and returns its output.
///
/// A network namespace belongs to the thread that unshared it: netlink sockets opened by `f`
/// live in it, and child processes spawned from that thread (iptables) inherit it. `lo` starts
/// down there.
///
/// Returns `None` when the test cannot run (not root, or `unshare` refused), after
/// [`gocast_test_guard`] printed `skipping test - <why>`; with `GOCAST_REQUIRE_PRIVILEGED=1` it
/// panics instead, so CI cannot silently skip. A panic in `f` is re-raised in the caller.
pub fn in_new_netns<F, Fut>(f: F) -> Option<Fut::Output>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future,
    Fut::Output: Send + 'static,
{
    if !gocast_test_guard::privileged() {
        return None;
    }
    let thread = std::thread::spawn(move || {
        unshare(CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("unshare(CLONE_NEWNET) failed: {e}"))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread tokio runtime builds");
        Ok::<_, String>(runtime.block_on(f()))
    });
    match thread.join() {
        Ok(Ok(output)) => Some(output),
        Ok(Err(why)) => {
            gocast_test_guard::skip(&why);
            None
        }
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Every line logged on this thread while it lives, in the agent's text format (no colours):
/// for tests of what a log line carries (`app=web`, `peer=198.18.0.2`).
pub struct Logs {
    buffer: Arc<Mutex<Vec<u8>>>,
    _guard: tracing::subscriber::DefaultGuard,
}

impl Logs {
    /// Starts capturing at every level, on the current thread (a current-thread runtime's
    /// tasks included).
    pub fn capture() -> Self {
        // With only per-thread subscribers, tracing's global "highest level anyone wants"
        // drops to OFF whenever none is alive, and a test whose subscriber starts while
        // another's ends can find its lines filtered out for a while. A global subscriber that
        // takes every level (and keeps nothing) holds it at TRACE.
        static GLOBAL: std::sync::Once = std::sync::Once::new();
        GLOBAL.call_once(|| {
            let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry());
        });
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = Buffer(buffer.clone());
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || writer.clone())
            .finish();
        Self {
            buffer,
            _guard: tracing::subscriber::set_default(subscriber),
        }
    }

    /// What was logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.buffer.lock().unwrap()).into_owned()
    }
}

/// The shared buffer as the subscriber's writer.
#[derive(Clone)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A BGP peer on loopback at `port` (AS 65000, we are 65001), every other setting at its
/// default: what the session, supervisor, speaker and BFD tests start from.
pub fn loopback_peer(port: u16) -> crate::config::PeerConfig {
    crate::config::PeerConfig {
        local_as: 65001,
        peer_as: 65000,
        peer_ip: Some(std::net::Ipv4Addr::LOCALHOST.into()),
        peer_port: port,
        local_ip: None,
        local_ipv6: None,
        password: None,
        multihop: None,
        hold_time: std::time::Duration::from_secs(90),
        communities: Vec::new(),
        origin: crate::config::Origin::Igp,
        next_hop: None,
        med: None,
        local_pref: None,
        drain_local_pref: 0,
        passive: false,
        bfd: None,
    }
}
