//! The lifecycle task end to end (driver and core) against a fake host, with real monitors.

use std::{
    net::IpAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::{
    app::Source,
    lifecycle::events::Part,
    messages::{AppView, LifecycleError, RouteSet, Verdict},
};

/// A [`Host`] that records operations instead of changing the kernel; `remove_vip` also notes whether the route was still announced.
#[derive(Clone, Default)]
pub(crate) struct FakeHost {
    pub log: Arc<Mutex<Vec<String>>>,
    pub routes: Arc<Mutex<Option<watch::Receiver<Routes>>>>,
    pub fail_nat: Arc<Mutex<bool>>,
    /// `add_vip` of this VIP never returns, as with a kernel or lock that hangs.
    pub stall_vip: Arc<Mutex<Option<Vip>>>,
    /// VIPs someone took off `lo` behind the agent's back, until `add_vip` puts them back.
    pub lost_vips: Arc<Mutex<Vec<Vip>>>,
    /// `add_vip` fails for these VIPs.
    pub fail_vip: Arc<Mutex<Vec<Vip>>>,
    /// How many verifications ran.
    pub verifications: Arc<AtomicUsize>,
    /// The sending end of the drift hints the lifecycle took.
    pub hint: Arc<Mutex<Option<mpsc::UnboundedSender<IpAddr>>>>,
    /// The host's own addresses ([`Host::local_addresses`]).
    pub local: Arc<Mutex<Vec<Protected>>>,
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
        // As the real host's netlink and iptables lines do: logged inside the lifecycle's span.
        tracing::debug!(%vip, "fake host: adding a vip");
        self.push(format!("add_vip {vip} {label}"));
        if *self.stall_vip.lock().unwrap() == Some(*vip) {
            std::future::pending::<()>().await;
        }
        if self.fail_vip.lock().unwrap().contains(vip) {
            return Err(HostError::NoInterface);
        }
        self.lost_vips.lock().unwrap().retain(|v| v != vip);
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
    async fn verify(&mut self, expected: &[Expected]) -> Vec<Drift> {
        self.verifications.fetch_add(1, Ordering::SeqCst);
        let lost = self.lost_vips.lock().unwrap();
        expected
            .iter()
            .filter(|e| e.on_lo && lost.contains(&e.vip))
            .map(|e| Drift::App {
                app: e.app.clone(),
                vip: e.vip,
                part: Part::Vip,
                what: "vip missing from lo".into(),
            })
            .collect()
    }
    fn drift_hints(&mut self) -> Option<mpsc::UnboundedReceiver<IpAddr>> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.hint.lock().unwrap() = Some(tx);
        Some(rx)
    }
    async fn local_addresses(&mut self) -> Option<Vec<Protected>> {
        Some(self.local.lock().unwrap().clone())
    }
}

struct Harness {
    host: FakeHost,
    owners: watch::Receiver<Owners>,
    running: Running,
    cancel: CancellationToken,
    dir: tempfile::TempDir,
}

fn settings() -> Settings {
    Settings {
        monitor_rise: 1,
        monitor_fall: 1,
        cleanup_timer: Duration::from_millis(300),
        allow_http_exec: true,
        vip_allowlist: Vec::new(),
        drain_time: Duration::from_secs(1),
        monitor: monitor::Settings {
            interval: Duration::from_millis(20),
            exec_timeout: Duration::from_secs(5),
            consul: None,
        },
        passive_health: true,
        passive_window: Duration::from_millis(200),
        protected: Vec::new(),
    }
}

fn start(settings: Settings, config_apps: Vec<AppSpec>, dir: tempfile::TempDir) -> Harness {
    let host = FakeHost::default();
    let cancel = CancellationToken::new();
    let store = Store::new(dir.path().join("state.json"));
    let (owners_tx, owners) = watch::channel(Owners::default());
    let outputs = Outputs {
        routes: watch::channel(Routes::default()).0,
        owners: owners_tx,
        announcer: None,
        metrics: Metrics::default(),
    };
    let running = spawn(
        settings,
        host.clone(),
        config_apps,
        store,
        outputs,
        cancel.clone(),
    );
    *host.routes.lock().unwrap() = Some(running.routes.clone());
    Harness {
        host,
        owners,
        running,
        cancel,
        dir,
    }
}

/// [`start`] in a temp dir of its own.
fn start_fresh(settings: Settings, config_apps: Vec<AppSpec>) -> Harness {
    start(settings, config_apps, tempfile::tempdir().unwrap())
}

/// Cancels the lifecycle and waits until its shutdown is done.
async fn stop(h: &mut Harness) {
    h.cancel.cancel();
    (&mut h.running.task).await.unwrap();
}

/// Registers `spec` as an HTTP app.
async fn register(h: &Harness, spec: AppSpec) -> Result<AppView, LifecycleError> {
    h.running.handle.register(spec, Source::Http).await
}

/// The HTTP apps in the state file.
fn stored(h: &Harness) -> Vec<AppSpec> {
    Store::new(h.dir.path().join("state.json"))
        .load()
        .unwrap()
        .apps
}

/// A flag file whose existence makes `exec:test -e FILE` pass.
fn flag(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

fn spec(name: &str, vip: &str, monitors: &[String]) -> AppSpec {
    AppSpec {
        name: name.parse().unwrap(),
        vip: vip.parse().unwrap(),
        monitors: monitors.iter().map(|m| m.parse().unwrap()).collect(),
        nats: vec!["tcp:80:8080".parse().unwrap()],
        communities: vec!["65000:1".parse().unwrap()],
        nat_dest: None,
        passive_health: false,
    }
}

fn exec_flag(path: &std::path::Path) -> String {
    format!("exec:test -e {}", path.display())
}

async fn app(h: &Harness, name: &str) -> Option<AppView> {
    h.running
        .handle
        .apps()
        .await
        .unwrap()
        .into_iter()
        .find(|a| a.name.as_str() == name)
}

async fn wait_for(
    h: &Harness,
    what: &str,
    mut ok: impl FnMut(Option<&AppView>, &RouteSet) -> bool,
) {
    for _ in 0..500 {
        let apps = h.running.handle.apps().await.unwrap();
        let routes = h.running.routes.borrow().clone();
        let first = apps.first();
        if ok(first, &routes) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}; log: {:?}", h.host.log());
}

async fn wait_healthy(h: &Harness) {
    wait_for(h, "healthy", |a, _| a.is_some_and(|a| a.state == "healthy")).await;
}

fn routed(routes: &RouteSet, vip: &str) -> bool {
    routes.contains_key(&vip.parse::<Vip>().unwrap().prefix())
}

#[tokio::test]
async fn a_passive_health_failure_withdraws_until_cleared_and_only_for_apps_that_opt_in() {
    let mut passive = spec("web", "192.0.2.10/32", &["exec:true".into()]);
    passive.passive_health = true;
    let other = spec("db", "192.0.2.11/32", &["exec:true".into()]);
    let mut h = start_fresh(settings(), vec![passive, other]);
    let owners = h.owners.clone();
    wait_for(&h, "both healthy", |_, r| {
        routed(r, "192.0.2.10/32") && routed(r, "192.0.2.11/32")
    })
    .await;
    let owner = owners.borrow()[&"192.0.2.10".parse::<IpAddr>().unwrap()].clone();
    assert!(owner.passive_health && owner.app.as_str() == "web");

    let failing = |name: &str| {
        let verdict = Verdict::Failing("no SYN-ACKs".to_owned());
        (name.parse().unwrap(), verdict)
    };
    h.running
        .handle
        .passive_health(vec![failing("web"), failing("db")])
        .await
        .unwrap();
    wait_for(&h, "web withdrawn", |_, r| !routed(r, "192.0.2.10/32")).await;
    assert!(
        h.running
            .routes
            .borrow()
            .contains_key(&"192.0.2.11/32".parse::<ipnet::IpNet>().unwrap())
    );
    let web = app(&h, "web").await.unwrap();
    assert_eq!(web.state, "unhealthy");
    let view = web.passive_health.unwrap();
    assert_eq!(
        (view.state, view.reason.as_deref()),
        ("failing", Some("no SYN-ACKs"))
    );
    assert!(app(&h, "db").await.unwrap().passive_health.is_none());
    // Monitors keep passing, but the app stays down while the verdict holds.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!routed(&h.running.routes.borrow(), "192.0.2.10/32"));

    h.running
        .handle
        .passive_health(vec![("web".parse().unwrap(), Verdict::Cleared)])
        .await
        .unwrap();
    wait_for(&h, "web back", |_, r| routed(r, "192.0.2.10/32")).await;
    stop(&mut h).await;
}

#[tokio::test]
async fn one_apps_story_filters_out_of_the_log_by_its_name() {
    let logs = crate::testing::Logs::capture();
    let dir = tempfile::tempdir().unwrap();
    let (web_up, db_up) = (flag(&dir, "web"), flag(&dir, "db"));
    std::fs::write(&web_up, "").unwrap();
    std::fs::write(&db_up, "").unwrap();
    let mut h = start(
        settings(),
        vec![spec("db", "192.0.2.11/32", &[exec_flag(&db_up)])],
        dir,
    );
    register(&h, spec("web", "192.0.2.10/32", &[exec_flag(&web_up)]))
        .await
        .unwrap();
    let announced = |vip: &str| {
        let r = h.running.routes.borrow();
        routed(&r, vip)
    };
    for _ in 0..500 {
        if announced("192.0.2.10/32") && announced("192.0.2.11/32") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    std::fs::remove_file(&web_up).unwrap();
    // Withdrawn, then forgotten after the cleanup timer with its VIP and NAT removed.
    for _ in 0..500 {
        if app(&h, "web").await.is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(app(&h, "web").await.is_none(), "{}", logs.text());
    stop(&mut h).await;

    let text = logs.text();
    let web: Vec<&str> = text.lines().filter(|l| l.contains("app=web")).collect();
    for step in [
        "app registered",
        "monitor passing",
        "add vip: done",
        "install nat: done",
        "app healthy: announcing",
        "monitor failing",
        "app unhealthy: withdrawing",
        "remove nat: done",
        "remove vip: done",
        "cleanup timer passed",
    ] {
        assert!(
            web.iter().any(|l| l.contains(step)),
            "no `{step}` among web's lines:\n{}\n\nall:\n{text}",
            web.join("\n")
        );
    }
    // Nothing the lifecycle says about web is without its name, and nothing of db's is under
    // it. (The host's own lines carry the app only when a run of the host worker is for one
    // app; web and db may share a run here.)
    for line in text
        .lines()
        .filter(|l| l.contains("192.0.2.10") && !l.contains("fake host"))
    {
        assert!(line.contains("app=web"), "{line}");
    }
    assert!(web.iter().all(|l| !l.contains("app=db")), "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains("app=db") && l.contains("announcing"))
    );
}

#[tokio::test]
async fn a_healthy_app_gets_vip_nat_and_route_then_is_withdrawn_before_its_vip_goes() {
    let dir = tempfile::tempdir().unwrap();
    let up = flag(&dir, "up");
    std::fs::write(&up, "").unwrap();
    let mut h = start(
        settings(),
        vec![spec("web", "192.0.2.10/32", &[exec_flag(&up)])],
        dir,
    );
    wait_for(&h, "healthy", |a, r| {
        a.is_some_and(|a| a.state == "healthy") && routed(r, "192.0.2.10/32")
    })
    .await;
    assert_eq!(
        h.host.log(),
        ["add_vip 192.0.2.10/32 lo:web", "install_nat web 1"]
    );
    let route = h.running.routes.borrow().values().next().cloned().unwrap();
    assert_eq!(route.communities, vec!["65000:1".parse().unwrap()]);

    std::fs::remove_file(&up).unwrap();
    wait_for(&h, "withdrawn", |a, r| {
        a.is_some_and(|a| a.state == "unhealthy") && r.is_empty()
    })
    .await;
    let view = app(&h, "web").await.unwrap();
    assert!(
        view.vip_installed && view.cleanup_in_s.is_some(),
        "vip stays until cleanup: {view:?}"
    );
    assert!(
        view.monitors[0]
            .reason
            .as_deref()
            .unwrap()
            .contains("exit status")
    );
    wait_for(&h, "cleanup", |a, _| a.is_some_and(|a| !a.vip_installed)).await;
    assert_eq!(
        &h.host.log()[2..],
        ["remove_nat web", "remove_vip 192.0.2.10/32 announced=false"]
    );
    // A config app stays after cleanup and comes back when healthy again.
    std::fs::write(&up, "").unwrap();
    wait_for(&h, "healthy again", |a, r| {
        a.is_some_and(|a| a.state == "healthy") && !r.is_empty()
    })
    .await;
    stop(&mut h).await;
    let log = h.host.log();
    // Shutdown: withdraw, VIPs off lo, then the NAT chain goes in one piece.
    assert_eq!(
        &log[log.len() - 2..],
        ["remove_vip 192.0.2.10/32 announced=false", "shutdown"]
    );
    assert!(h.running.routes.borrow().is_empty());
}

#[tokio::test]
async fn a_host_call_that_hangs_does_not_hold_up_another_apps_withdrawal() {
    let dir = tempfile::tempdir().unwrap();
    let up = flag(&dir, "up");
    std::fs::write(&up, "").unwrap();
    let h = start(
        settings(),
        vec![spec("web", "192.0.2.10/32", &[exec_flag(&up)])],
        dir,
    );
    wait_for(&h, "web healthy", |a, r| {
        a.is_some_and(|a| a.state == "healthy") && routed(r, "192.0.2.10/32")
    })
    .await;
    *h.host.stall_vip.lock().unwrap() = Some("192.0.2.20/32".parse().unwrap());
    register(&h, spec("stuck", "192.0.2.20/32", &["exec:true".into()]))
        .await
        .unwrap();
    let stuck = |log: Vec<String>| log.iter().any(|l| l.starts_with("add_vip 192.0.2.20/32"));
    while !stuck(h.host.log()) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    std::fs::remove_file(&up).unwrap();
    wait_for(&h, "web withdrawn while the other add_vip hangs", |_, r| {
        r.is_empty()
    })
    .await;
    // Requests are still answered.
    assert_eq!(app(&h, "stuck").await.unwrap().state, "unhealthy");
    h.cancel.cancel();
}

#[tokio::test]
async fn recovery_before_the_cleanup_timer_keeps_the_vip() {
    let dir = tempfile::tempdir().unwrap();
    let up = flag(&dir, "up");
    std::fs::write(&up, "").unwrap();
    let mut s = settings();
    s.cleanup_timer = Duration::from_secs(60);
    let h = start(
        s,
        vec![spec("web", "192.0.2.10/32", &[exec_flag(&up)])],
        dir,
    );
    wait_healthy(&h).await;
    std::fs::remove_file(&up).unwrap();
    wait_for(&h, "unhealthy", |a, r| {
        a.is_some_and(|a| a.state == "unhealthy") && r.is_empty()
    })
    .await;
    std::fs::write(&up, "").unwrap();
    wait_for(&h, "healthy", |a, r| {
        a.is_some_and(|a| a.state == "healthy" && a.cleanup_in_s.is_none()) && !r.is_empty()
    })
    .await;
    assert_eq!(
        h.host.log(),
        ["add_vip 192.0.2.10/32 lo:web", "install_nat web 1"],
        "no remove, no second add"
    );
}

#[tokio::test]
async fn an_http_app_is_forgotten_after_the_cleanup_timer() {
    let dir = tempfile::tempdir().unwrap();
    let up = flag(&dir, "up");
    std::fs::write(&up, "").unwrap();
    let h = start(settings(), Vec::new(), dir);
    register(&h, spec("web", "192.0.2.10/32", &[exec_flag(&up)]))
        .await
        .unwrap();
    wait_healthy(&h).await;
    std::fs::remove_file(&up).unwrap();
    wait_for(&h, "dropped", |a, _| a.is_none()).await;
    assert!(stored(&h).is_empty());
    assert!(
        h.host
            .log()
            .contains(&"remove_vip 192.0.2.10/32 announced=false".to_owned())
    );
}

#[tokio::test]
async fn a_vip_owned_by_another_app_is_refused_and_nothing_changes() {
    let h = start_fresh(settings(), vec![spec("a", "192.0.2.10/32", &[])]);
    let e = register(&h, spec("b", "192.0.2.10/32", &[]))
        .await
        .unwrap_err();
    assert!(matches!(e, LifecycleError::VipConflict { .. }), "{e}");
    assert!(e.to_string().contains("already used by app a"));
    let apps = h.running.handle.apps().await.unwrap();
    assert_eq!(apps.len(), 1);
    assert!(stored(&h).is_empty());
}

#[tokio::test]
async fn same_parameters_are_a_no_op_and_new_ones_replace_the_app() {
    let h = start_fresh(settings(), Vec::new());
    let a = spec("web", "192.0.2.10/32", &[]);
    register(&h, a.clone()).await.unwrap();
    wait_healthy(&h).await;
    register(&h, a.clone()).await.unwrap();
    assert_eq!(h.host.log().len(), 2, "{:?}", h.host.log());
    // Same VIP, new communities: stays healthy, route updated, no flap.
    let mut b = a.clone();
    b.communities = vec!["65000:2".parse().unwrap()];
    let view = register(&h, b).await.unwrap();
    assert_eq!(view.state, "healthy");
    let communities = h
        .running
        .routes
        .borrow()
        .values()
        .next()
        .unwrap()
        .communities
        .clone();
    assert_eq!(communities, vec!["65000:2".parse().unwrap()]);
    // New VIP: the old one is withdrawn and removed first.
    let c = spec("web", "192.0.2.11/32", &[]);
    register(&h, c).await.unwrap();
    wait_for(&h, "moved", |a, r| {
        a.is_some_and(|a| a.state == "healthy") && routed(r, "192.0.2.11/32") && r.len() == 1
    })
    .await;
    let log = h.host.log();
    assert_eq!(
        &log[2..4],
        ["remove_nat web", "remove_vip 192.0.2.10/32 announced=false"]
    );
    assert_eq!(stored(&h)[0].vip.to_string(), "192.0.2.11/32");
}

#[tokio::test]
async fn policy_refuses_http_exec_and_vips_outside_the_allowlist() {
    let mut s = settings();
    s.allow_http_exec = false;
    s.vip_allowlist = vec!["192.0.2.0/28".parse().unwrap()];
    let h = start_fresh(s, Vec::new());
    let e = register(&h, spec("a", "192.0.2.1/32", &["exec:true".into()]))
        .await
        .unwrap_err();
    assert!(matches!(e, LifecycleError::ExecRefused));
    let e = register(&h, spec("a", "192.0.2.100/32", &[]))
        .await
        .unwrap_err();
    assert!(matches!(e, LifecycleError::NotAllowed(_)));
    assert!(h.running.handle.apps().await.unwrap().is_empty());
    register(&h, spec("a", "192.0.2.1/32", &[])).await.unwrap();
}

#[tokio::test]
async fn http_registrations_come_back_after_a_restart() {
    let mut h = start_fresh(settings(), vec![spec("cfg", "192.0.2.1/32", &[])]);
    register(&h, spec("web", "192.0.2.10/32", &[]))
        .await
        .unwrap();
    stop(&mut h).await;
    let again = start(settings(), vec![spec("cfg", "192.0.2.1/32", &[])], h.dir);
    let apps = again.running.handle.apps().await.unwrap();
    let names: Vec<(&str, Source)> = apps.iter().map(|a| (a.name.as_str(), a.source)).collect();
    assert_eq!(names, [("cfg", Source::Config), ("web", Source::Http)]);
}

#[tokio::test]
async fn unregister_withdraws_removes_and_forgets() {
    let h = start_fresh(settings(), Vec::new());
    register(&h, spec("web", "192.0.2.10/32", &[]))
        .await
        .unwrap();
    wait_healthy(&h).await;
    h.running
        .handle
        .unregister("web".parse().unwrap())
        .await
        .unwrap();
    assert!(h.running.routes.borrow().is_empty());
    assert!(h.running.handle.apps().await.unwrap().is_empty());
    assert_eq!(
        &h.host.log()[2..],
        ["remove_nat web", "remove_vip 192.0.2.10/32 announced=false"]
    );
    let e = h
        .running
        .handle
        .unregister("web".parse().unwrap())
        .await
        .unwrap_err();
    assert!(matches!(e, LifecycleError::UnknownApp(_)));
}

#[tokio::test]
async fn a_failed_nat_install_keeps_the_app_unannounced_and_says_why() {
    let h = start_fresh(settings(), Vec::new());
    *h.host.fail_nat.lock().unwrap() = true;
    register(&h, spec("web", "192.0.2.10/32", &[]))
        .await
        .unwrap();
    wait_for(&h, "error shown", |a, _| {
        a.is_some_and(|a| a.last_error.is_some())
    })
    .await;
    let view = app(&h, "web").await.unwrap();
    assert_eq!(view.state, "unhealthy");
    assert!(view.last_error.unwrap().contains("no NAT destination"));
    assert!(h.running.routes.borrow().is_empty());
    *h.host.fail_nat.lock().unwrap() = false;
    wait_for(&h, "healthy", |a, r| {
        a.is_some_and(|a| a.state == "healthy" && a.last_error.is_none()) && !r.is_empty()
    })
    .await;
}

#[tokio::test]
async fn nat_added_to_a_healthy_app_is_installed_without_a_flap() {
    let h = start_fresh(settings(), Vec::new());
    let mut a = spec("web", "192.0.2.10/32", &[]);
    a.nats.clear();
    register(&h, a.clone()).await.unwrap();
    wait_healthy(&h).await;
    a.nats = vec!["tcp:80:8080".parse().unwrap()];
    let view = register(&h, a).await.unwrap();
    assert_eq!(view.state, "healthy");
    assert_eq!(
        h.host.log(),
        ["add_vip 192.0.2.10/32 lo:web", "install_nat web 1"]
    );
}

#[tokio::test]
async fn http_cannot_take_over_a_config_app() {
    let h = start_fresh(settings(), vec![spec("web", "192.0.2.10/32", &[])]);
    let e = register(&h, spec("web", "192.0.2.10/32", &["exec:true".into()]))
        .await
        .unwrap_err();
    assert!(matches!(e, LifecycleError::ConfigApp(_)), "{e}");
    assert_eq!(app(&h, "web").await.unwrap().source, Source::Config);
}

#[tokio::test]
async fn overlapping_vips_are_refused() {
    let h = start_fresh(settings(), vec![spec("a", "192.0.2.10/24", &[])]);
    let e = register(&h, spec("b", "192.0.2.20/32", &[]))
        .await
        .unwrap_err();
    assert!(matches!(e, LifecycleError::VipOverlap { .. }), "{e}");
}

#[tokio::test]
async fn with_a_zero_cleanup_timer_a_new_app_still_gets_its_first_check() {
    let mut s = settings();
    s.cleanup_timer = Duration::ZERO;
    let h = start_fresh(s, Vec::new());
    register(&h, spec("web", "192.0.2.10/32", &[]))
        .await
        .unwrap();
    wait_healthy(&h).await;
}

/// Regression: with more config apps than the channels hold, start-up used to deadlock
/// (the lifecycle waited on the scheduler, which waited on the lifecycle).
#[tokio::test]
async fn five_thousand_config_apps_all_come_up() {
    let dir = tempfile::tempdir().unwrap();
    let apps: Vec<AppSpec> = (0..5000u32)
        .map(|i| {
            spec(
                &format!("app{i}"),
                &format!("2001:db8:ff00::{:x}:{:x}/128", i / 1000, i % 1000 + 1),
                &["port:tcp:1".into()],
            )
        })
        .map(|mut a| {
            a.monitors.clear();
            a
        })
        .collect();
    let h = start(settings(), apps, dir);
    for _ in 0..1000 {
        if h.running.routes.borrow().len() == 5000 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "only {} of 5000 routes after 10 s",
        h.running.routes.borrow().len()
    );
}

/// A Consul app on `vip` without monitors (always healthy).
fn consul_spec(name: &str, vip: &str) -> AppSpec {
    AppSpec {
        nats: Vec::new(),
        communities: Vec::new(),
        ..spec(name, vip, &[])
    }
}

async fn app_names(h: &Harness) -> Vec<(String, Source)> {
    h.running
        .handle
        .apps()
        .await
        .unwrap()
        .into_iter()
        .map(|a| (a.name.as_str().to_owned(), a.source))
        .collect()
}

#[tokio::test]
async fn consul_sync_adds_updates_and_removes_only_consul_apps() {
    let h = start_fresh(settings(), vec![consul_spec("cfg", "192.0.2.1/32")]);
    register(&h, consul_spec("http", "192.0.2.2/32"))
        .await
        .unwrap();
    let handle = &h.running.handle;
    let refused = handle
        .sync_consul(
            vec![
                consul_spec("web", "192.0.2.10/32"),
                // Collides with the config app's VIP, and with the HTTP app's name.
                consul_spec("clash", "192.0.2.1/32"),
                consul_spec("http", "192.0.2.20/32"),
                consul_spec("api", "192.0.2.11/32"),
            ],
            Vec::new(),
        )
        .await
        .unwrap();
    let refused: Vec<String> = refused.iter().map(|(n, e)| format!("{n}: {e}")).collect();
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert!(refused[0].starts_with("clash: vip 192.0.2.1/32 is already used by app cfg"));
    assert!(refused[1].starts_with("http: app name http is taken"));
    let names = app_names(&h).await;
    assert_eq!(
        names,
        [
            ("api".to_owned(), Source::Consul),
            ("cfg".to_owned(), Source::Config),
            ("http".to_owned(), Source::Http),
            ("web".to_owned(), Source::Consul),
        ]
    );
    // Consul apps come back from Consul: never in the HTTP state file.
    assert_eq!(stored(&h).len(), 1);
    wait_for(&h, "routes", |_, r| r.len() == 4).await;

    // web changes its communities (in place, no flap); api leaves the catalog.
    let mut web = consul_spec("web", "192.0.2.10/32");
    web.communities = vec!["65001:9".parse().unwrap()];
    let refused = handle.sync_consul(vec![web], Vec::new()).await.unwrap();
    assert!(refused.is_empty());
    let names = app_names(&h).await;
    assert_eq!(names.len(), 3, "{names:?}");
    assert!(!names.iter().any(|(n, _)| n == "api"));
    let routes = h.running.routes.borrow().clone();
    assert!(!routes.contains_key(&"192.0.2.11/32".parse::<Vip>().unwrap().prefix()));
    let web_route = &routes[&"192.0.2.10/32".parse::<Vip>().unwrap().prefix()];
    assert_eq!(web_route.communities, vec!["65001:9".parse().unwrap()]);
    let log = h.host.log();
    assert!(
        log.contains(&"remove_vip 192.0.2.11/32 announced=false".to_owned()),
        "{log:?}"
    );
    assert!(
        !log.iter().any(|l| l.starts_with("remove_vip 192.0.2.10")),
        "{log:?}"
    );

    // A service whose tags are bad now keeps its app; an empty catalog removes the rest.
    let refused = handle
        .sync_consul(Vec::new(), vec!["web".parse().unwrap()])
        .await
        .unwrap();
    assert!(refused.is_empty());
    assert!(app_names(&h).await.iter().any(|(n, _)| n == "web"));
    handle.sync_consul(Vec::new(), Vec::new()).await.unwrap();
    let names = app_names(&h).await;
    assert_eq!(names.len(), 2, "config and HTTP apps stay: {names:?}");
}

async fn vips(h: &Harness) -> Vec<(String, String)> {
    h.running
        .handle
        .apps()
        .await
        .unwrap()
        .into_iter()
        .map(|a| (a.name.as_str().to_owned(), a.vip.to_string()))
        .collect()
}

/// Regression: services were applied one by one in ID order, so a service taking the VIP
/// a later one leaves was refused until the next catalog change.
#[tokio::test]
async fn consul_sync_takes_a_vip_a_later_service_leaves() {
    let h = start_fresh(settings(), Vec::new());
    let handle = &h.running.handle;
    let refused = handle
        .sync_consul(vec![consul_spec("b", "192.0.2.1/32")], Vec::new())
        .await
        .unwrap();
    assert!(refused.is_empty());
    let refused = handle
        .sync_consul(
            vec![
                consul_spec("a", "192.0.2.1/32"),
                consul_spec("b", "192.0.2.3/32"),
            ],
            Vec::new(),
        )
        .await
        .unwrap();
    assert!(refused.is_empty(), "{refused:?}");
    assert_eq!(
        vips(&h).await,
        [
            ("a".to_owned(), "192.0.2.1/32".to_owned()),
            ("b".to_owned(), "192.0.2.3/32".to_owned()),
        ]
    );
    wait_for(&h, "routes", |_, r| r.len() == 2).await;
}

/// Regression: two services swapping VIPs in one catalog change each waited for the
/// other's VIP, and both were refused forever.
#[tokio::test]
async fn consul_sync_swaps_vips_between_two_services() {
    let h = start_fresh(settings(), Vec::new());
    let handle = &h.running.handle;
    let refused = handle
        .sync_consul(
            vec![
                consul_spec("a", "192.0.2.1/32"),
                consul_spec("b", "192.0.2.2/32"),
                consul_spec("c", "192.0.2.3/32"),
            ],
            Vec::new(),
        )
        .await
        .unwrap();
    assert!(refused.is_empty());
    let refused = handle
        .sync_consul(
            vec![
                consul_spec("a", "192.0.2.2/32"),
                consul_spec("b", "192.0.2.1/32"),
                // Unchanged: never taken down.
                consul_spec("c", "192.0.2.3/32"),
            ],
            Vec::new(),
        )
        .await
        .unwrap();
    assert!(refused.is_empty(), "{refused:?}");
    assert_eq!(
        vips(&h).await,
        [
            ("a".to_owned(), "192.0.2.2/32".to_owned()),
            ("b".to_owned(), "192.0.2.1/32".to_owned()),
            ("c".to_owned(), "192.0.2.3/32".to_owned()),
        ]
    );
    let log = h.host.log();
    assert!(
        !log.iter().any(|l| l.starts_with("remove_vip 192.0.2.3")),
        "{log:?}"
    );
    wait_for(&h, "routes", |_, r| r.len() == 3).await;
    // A VIP held by a non-Consul app is still refused, and only that service.
    register(&h, consul_spec("http", "192.0.2.9/32"))
        .await
        .unwrap();
    let refused = handle
        .sync_consul(
            vec![
                consul_spec("a", "192.0.2.9/32"),
                consul_spec("b", "192.0.2.1/32"),
                consul_spec("c", "192.0.2.3/32"),
            ],
            Vec::new(),
        )
        .await
        .unwrap();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(refused[0].1.to_string().contains("used by app http"));
    // a keeps its last VIP.
    assert!(
        vips(&h)
            .await
            .contains(&("a".to_owned(), "192.0.2.2/32".to_owned()))
    );
}

#[tokio::test]
async fn a_consul_app_stays_after_cleanup_and_is_checked_again() {
    let dir = tempfile::tempdir().unwrap();
    let up = flag(&dir, "up");
    std::fs::write(&up, "").unwrap();
    let h = start(settings(), Vec::new(), dir);
    let web = spec("web", "192.0.2.10/32", &[exec_flag(&up)]);
    h.running
        .handle
        .sync_consul(vec![web], Vec::new())
        .await
        .unwrap();
    wait_healthy(&h).await;
    std::fs::remove_file(&up).unwrap();
    wait_for(&h, "cleaned up", |a, _| {
        a.is_some_and(|a| a.state == "unhealthy" && !a.vip_installed)
    })
    .await;
    std::fs::write(&up, "").unwrap();
    wait_for(&h, "healthy again", |a, r| {
        a.is_some_and(|a| a.state == "healthy") && !r.is_empty()
    })
    .await;
}

#[tokio::test]
async fn a_vip_taken_off_lo_is_put_back_when_the_kernel_says_so_and_shown() {
    let h = start_fresh(settings(), vec![spec("web", "192.0.2.10/32", &[])]);
    wait_healthy(&h).await;
    lose_vip(&h, "192.0.2.10/32".parse().unwrap());
    wait_for(&h, "repaired", |a, _| {
        a.is_some_and(|a| {
            a.repairs == 1
                && a.last_repair
                    .as_ref()
                    .is_some_and(|r| r.result == "repaired")
        })
    })
    .await;
    let web = app(&h, "web").await.unwrap();
    assert_eq!(web.state, "healthy");
    assert_eq!(web.last_repair.unwrap().what, "vip missing from lo");
    assert!(routed(&h.running.routes.borrow(), "192.0.2.10/32"));
    assert_eq!(
        h.host.log(),
        [
            "add_vip 192.0.2.10/32 lo:web",
            "install_nat web 1",
            "add_vip 192.0.2.10/32 lo:web"
        ],
        "only the vip is put back"
    );
}

/// Takes `vip` off the fake `lo` and tells the lifecycle, as the kernel's address event does.
fn lose_vip(h: &Harness, vip: Vip) {
    h.host.lost_vips.lock().unwrap().push(vip);
    let hint = h.host.hint.lock().unwrap().clone().unwrap();
    hint.send(vip.addr()).unwrap();
}

#[tokio::test]
async fn a_drift_hint_verifies_at_once_instead_of_at_the_next_period() {
    let h = start_fresh(settings(), vec![spec("web", "192.0.2.10/32", &[])]);
    wait_healthy(&h).await;
    // Right after a periodic verification, the next one is a whole period away.
    let seen = h.host.verifications.load(Ordering::SeqCst);
    while h.host.verifications.load(Ordering::SeqCst) == seen {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    h.host
        .lost_vips
        .lock()
        .unwrap()
        .push("192.0.2.10/32".parse().unwrap());
    let start = tokio::time::Instant::now();
    let hint = h.host.hint.lock().unwrap().clone().unwrap();
    hint.send("192.0.2.10".parse().unwrap()).unwrap();
    while h.host.lost_vips.lock().unwrap().len() == 1 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(
        start.elapsed() < Duration::from_millis(200),
        "put back after {:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn a_vip_that_cannot_be_put_back_withdraws_the_app_and_says_why() {
    let h = start_fresh(settings(), vec![spec("web", "192.0.2.10/32", &[])]);
    wait_healthy(&h).await;
    let vip: Vip = "192.0.2.10/32".parse().unwrap();
    h.host.fail_vip.lock().unwrap().push(vip);
    lose_vip(&h, vip);
    wait_for(&h, "withdrawn", |a, r| {
        a.is_some_and(|a| a.state == "unhealthy") && r.is_empty()
    })
    .await;
    let web = app(&h, "web").await.unwrap();
    let repair = web.last_repair.unwrap();
    assert!(repair.result.starts_with("failed: add vip: "), "{repair:?}");
    assert!(web.last_error.unwrap().contains("no interface"));
    // Once the vip can be added again, the next passing report brings the app back.
    h.host.fail_vip.lock().unwrap().clear();
    wait_for(&h, "back", |a, r| {
        a.is_some_and(|a| a.state == "healthy") && !r.is_empty()
    })
    .await;
}
