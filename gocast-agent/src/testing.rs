//! Test helpers: run privileged tests in a network namespace of their own, so they never touch
//! the host's addresses, routes or iptables rules.

use std::{
    future::Future,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use nix::sched::{CloneFlags, unshare};
use tokio::sync::watch;

use crate::{
    app::{AppName, NatRule, Vip},
    lifecycle::{Host, HostError},
    messages::Routes,
};

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

/// A [`Host`] that records operations instead of changing the kernel; `remove_vip` also notes whether the route was still announced.
#[derive(Clone, Default)]
pub struct FakeHost {
    pub log: Arc<Mutex<Vec<String>>>,
    pub routes: Arc<Mutex<Option<watch::Receiver<Routes>>>>,
    pub fail_nat: Arc<Mutex<bool>>,
    /// `add_vip` of this VIP never returns, as with a kernel or lock that hangs.
    pub stall_vip: Arc<Mutex<Option<Vip>>>,
}

impl FakeHost {
    fn push(&self, s: String) {
        self.log.lock().unwrap().push(s);
    }
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

impl Host for FakeHost {
    async fn add_vip(&mut self, vip: &Vip, label: &str) -> Result<(), HostError> {
        self.push(format!("add_vip {vip} {label}"));
        if *self.stall_vip.lock().unwrap() == Some(*vip) {
            std::future::pending::<()>().await;
        }
        Ok(())
    }
    async fn remove_vip(&mut self, vip: &Vip) -> Result<(), HostError> {
        let announced = self
            .routes
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|r| r.borrow().contains_key(&vip.prefix()));
        self.push(format!("remove_vip {vip} announced={announced}"));
        Ok(())
    }
    async fn install_nat(
        &mut self,
        app: &AppName,
        _: &Vip,
        rules: &[NatRule],
        _: Option<IpAddr>,
    ) -> Result<(), HostError> {
        if *self.fail_nat.lock().unwrap() {
            return Err(HostError::NoNatDest { family: 4 });
        }
        self.push(format!("install_nat {app} {}", rules.len()));
        Ok(())
    }
    async fn remove_nat(
        &mut self,
        app: &AppName,
        _: &Vip,
        _: &[NatRule],
        _: Option<IpAddr>,
    ) -> Result<(), HostError> {
        self.push(format!("remove_nat {app}"));
        Ok(())
    }
    async fn shutdown(&mut self) -> Result<(), HostError> {
        self.push("shutdown".into());
        Ok(())
    }
}
