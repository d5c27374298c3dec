//! The lifecycle task: turns requests, monitor reports, host results and timers into
//! [`Event`]s for the [`Core`], and carries out the [`Effect`]s it returns. It owns every
//! channel and the clock; the host and the state file are worked on by tasks of their own, so a
//! slow netlink call, xtables lock or fsync never holds up another app's withdrawal.
//!
//! ```text
//!  requests ─┐                                   ┌─▶ replies (oneshot)
//!  reports ──┤                                   ├─▶ routes, owners (watch)
//!  host done ┼─▶ Event ─▶ Core::step ─▶ Effect ──┼─▶ monitor::Command
//!  persisted ┤                                   ├─▶ host worker (in order) ─▶ host done
//!  timer ────┤                                   └─▶ state-file write ─▶ persisted
//!  verify ───┘ (every VERIFY_INTERVAL, and when the host hints at drift)
//! ```
//!
//! The host worker also runs the verifications of self-repair (docs/design.md, "Self-repair"),
//! in order with the host operations, and sends their results on the same channel as theirs.
//! Every turn of the loop beats the [`Heartbeat`] (an idle tick turns it too): `/healthz`, the
//! agent's guard and systemd's watchdog read it, so a loop that stops turning is noticed.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
    time::SystemTime,
};

use tokio::{
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
    time::{Duration, Instant},
};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};

use super::{
    Host, NatJob,
    core::{Core, Effect, Event, HostDone, HostOp, NatSpec, Now, OpId, Reply, RequestId},
    events::{Expected, VerifyId},
};
use crate::{
    app::{AppName, AppSpec, Vip},
    error_chain,
    messages::{
        Announcer, AppView, DrainReport, LifecycleError, Owners, Request, Routes, SyncReport,
    },
    monitor::{self, Report},
    store::{Store, StoreError},
    supervise::Heartbeat,
    timer::Timer,
};

/// The most monitor reports or host results handled before the route set is published.
const BATCH: usize = 4096;

/// The most host operations applied together (one `iptables-restore`, one netlink round).
const MAX_RUN: usize = 1024;

/// A batch of host results at least this large is a burst worth returning memory after.
const TRIM_AFTER: usize = 512;

/// Every this many verification periods, VIPs on `lo` are checked without an address event,
/// and the host's addresses (for safe VIPs) are listed again.
const SWEEP_EVERY: u64 = 60;

/// How long a VIP waits for its withdrawal to reach the peers before it is removed anyway.
const WITHDRAW_WAIT: Duration = Duration::from_secs(1);

/// How often the host is compared with what the core believes is installed. Half of the
/// 1 s within which a lost NAT rule or detached program must be back (no kernel event says
/// so; a VIP leaving `lo` is verified at once); one netlink dump and, with iptables, one
/// `iptables -S` per address family in use.
const VERIFY_INTERVAL: Duration = Duration::from_millis(500);

/// Where a reply goes.
enum ReplyTo {
    App(oneshot::Sender<Result<AppView, LifecycleError>>),
    Apps(oneshot::Sender<Vec<AppView>>),
    Consul(oneshot::Sender<Vec<(AppName, LifecycleError)>>),
    Reload(oneshot::Sender<SyncReport>),
    Drain(oneshot::Sender<Result<DrainReport, LifecycleError>>),
}

/// Work for the host worker, in order.
enum Work {
    /// `after`: wait until the peers were sent this route-set version first.
    Op {
        op: HostOp,
        after: Option<u64>,
    },
    StopSpeaker {
        version: u64,
    },
    Shutdown,
    Verify {
        id: VerifyId,
        expected: Vec<Expected>,
    },
    /// List the host's addresses ([`Event::LocalAddresses`]). `first`: at start, answered even
    /// if the listing failed, so the driver can wait for it.
    Addresses {
        first: bool,
    },
}

/// The lifecycle task's state: the core and the ends of every channel.
pub(super) struct Driver {
    pub core: Core,
    pub routes: watch::Sender<Routes>,
    pub owners: watch::Sender<Owners>,
    pub monitors: mpsc::UnboundedSender<monitor::Command>,
    pub store: Store,
    replies: HashMap<RequestId, ReplyTo>,
    next_request: RequestId,
    work: mpsc::UnboundedSender<Work>,
    worker: JoinHandle<()>,
    persisted_tx: mpsc::Sender<Result<(), StoreError>>,
    persisted_rx: mpsc::Receiver<Result<(), StoreError>>,
    /// What the host worker did: [`Event::HostDone`] and [`Event::Verified`], in its order.
    done_rx: mpsc::UnboundedReceiver<Vec<Event>>,
    effects: Vec<Effect>,
    /// The host's "verify now" ([`Host::drift_hints`]); `None` once it closed.
    hints: Option<mpsc::UnboundedReceiver<IpAddr>>,
    /// Verification periods so far, for the sweep every [`SWEEP_EVERY`].
    verifications: u64,
}

fn now() -> Now {
    Now {
        mono: Instant::now(),
        wall: SystemTime::now(),
    }
}

impl Driver {
    pub fn new<H: Host>(
        core: Core,
        mut host: H,
        announcer: Option<Announcer>,
        outputs: (watch::Sender<Routes>, watch::Sender<Owners>),
        monitors: mpsc::UnboundedSender<monitor::Command>,
        store: Store,
    ) -> Self {
        let (work, work_rx) = mpsc::unbounded_channel();
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let (persisted_tx, persisted_rx) = mpsc::channel(1);
        let hints = host.drift_hints();
        let worker = tokio::spawn(host_worker(host, announcer, work_rx, done_tx));
        Self {
            core,
            routes: outputs.0,
            owners: outputs.1,
            monitors,
            store,
            replies: HashMap::new(),
            next_request: 1,
            work,
            worker,
            persisted_tx,
            persisted_rx,
            done_rx,
            effects: Vec::new(),
            verifications: 0,
            hints,
        }
    }

    pub async fn run(
        mut self,
        config_apps: Vec<AppSpec>,
        mut requests: mpsc::Receiver<Request>,
        mut reports: mpsc::Receiver<Report>,
        cancel: CancellationToken,
        mut heartbeat: Heartbeat,
    ) {
        // The host's addresses before any app: a config app or saved registration that would
        // cover one is refused from the start.
        let _ = self.work.send(Work::Addresses { first: true });
        if let Some(results) = self.done_rx.recv().await {
            for event in results {
                self.step(event);
            }
        }
        let saved = self.store.load_off_thread().await;
        let mut out = std::mem::take(&mut self.effects);
        self.core.restore(config_apps, saved, now(), &mut out);
        self.apply(&mut out);
        heartbeat.ready();
        // Turns the loop when nothing else does, so the heartbeat proves the loop is alive.
        let mut idle = heartbeat.ticker();
        let mut timer = Timer::default();
        let mut verify = Timer::default();
        verify.set(Some(VERIFY_INTERVAL));
        loop {
            timer.set_at(self.core.next_deadline());
            let mut burst = false;
            tokio::select! {
                () = cancel.cancelled() => break,
                Some(req) = requests.recv() => {
                    let event = self.accept(req);
                    self.step(event);
                }
                Some(report) = reports.recv() => {
                    self.step(Event::Report(report));
                    // Take what else is queued (a tick reports every app at once) before
                    // publishing, so a burst costs one route-set update, not one per app.
                    for _ in 0..BATCH {
                        let Ok(report) = reports.try_recv() else { break };
                        self.step(Event::Report(report));
                    }
                }
                Some(results) = self.done_rx.recv() => {
                    burst = results.len() >= TRIM_AFTER;
                    for event in results {
                        self.step(event);
                    }
                }
                Some(result) = self.persisted_rx.recv() => self.step(Event::Persisted(result)),
                () = timer.fired() => self.step(Event::Deadline),
                () = verify.fired() => {
                    verify.set(Some(VERIFY_INTERVAL));
                    // Listing `lo` and the host's addresses costs a dump of every address:
                    // VIPs are checked when the kernel said an address left `lo` and, as a
                    // safety net, every 60th period (30 s); NAT and programs, which
                    // raise no event, every period.
                    self.verifications += 1;
                    let sweep = self.verifications.is_multiple_of(SWEEP_EVERY);
                    if sweep {
                        drop(self.work.send(Work::Addresses { first: false }));
                    }
                    self.step(Event::VerifyDue { vips: sweep });
                }
                hint = next_hint(self.hints.as_mut()) => {
                    if let Some(addr) = hint {
                        // Every address already queued: a burst of removals (the agent's own,
                        // mostly) costs one look-up each, not a verification each.
                        let mut left = vec![addr];
                        while let Some(addr) = self.hints.as_mut().and_then(|h| h.try_recv().ok()) {
                            left.push(addr);
                        }
                        self.step(Event::LeftLo(left));
                    } else {
                        warn!("the host's drift hints stopped; a VIP taken off lo is found by the periodic sweep only");
                        self.hints = None;
                    }
                }
                _ = idle.tick() => {}
            }
            let mut out = std::mem::take(&mut self.effects);
            self.core.flush(&mut out);
            self.apply(&mut out);
            if burst {
                // Thousands of apps came up (or went) at once: the operations, results and
                // effects of that burst are freed now that its routes are published; give the
                // pages back rather than keep the peak resident for the agent's whole life.
                self.effects = Vec::new();
                gocast_common::heap::trim();
            }
            heartbeat.beat();
            heartbeat.test_stall().await;
        }
        self.step(Event::Shutdown);
        drop(self.work);
        if let Err(e) = self.worker.await {
            error!(error = %e, "the host worker failed during shutdown");
        }
    }

    /// Gives the request an id and keeps where its reply goes.
    fn accept(&mut self, req: Request) -> Event {
        let id = self.next_request;
        self.next_request += 1;
        let (event, reply) = match req {
            Request::Register {
                spec,
                source,
                reply,
            } => (Event::Register { id, spec, source }, ReplyTo::App(reply)),
            Request::Unregister { name, reply } => {
                (Event::Unregister { id, name }, ReplyTo::App(reply))
            }
            Request::Apps { reply } => (Event::Apps { id }, ReplyTo::Apps(reply)),
            Request::SyncConsul { apps, keep, reply } => {
                (Event::SyncConsul { id, apps, keep }, ReplyTo::Consul(reply))
            }
            Request::Reload {
                settings,
                apps,
                reply,
            } => (Event::Reload { id, settings, apps }, ReplyTo::Reload(reply)),
            Request::Drain { app, drain, reply } => {
                (Event::Drain { id, app, drain }, ReplyTo::Drain(reply))
            }
            Request::PassiveHealth { verdicts } => return Event::PassiveHealth(verdicts),
        };
        self.replies.insert(id, reply);
        event
    }

    fn step(&mut self, event: Event) {
        let mut out = std::mem::take(&mut self.effects);
        self.core.step(event, now(), &mut out);
        self.apply(&mut out);
    }

    /// Carries out the effects in order; none of them waits.
    fn apply(&mut self, out: &mut Vec<Effect>) {
        for effect in out.drain(..) {
            match effect {
                Effect::Reply { id, reply } => self.reply(id, reply),
                // One write for the whole batch (group commit): the core sends the next only
                // after this one's result.
                Effect::Persist(changes) => {
                    let store = self.store.clone();
                    let tx = self.persisted_tx.clone();
                    tokio::spawn(async move {
                        let _ = tx.send(store.save_off_thread(changes).await).await;
                    });
                }
                // The scheduler lives as long as we do; a send error only happens at shutdown.
                Effect::Monitor(cmd) => drop(self.monitors.send(cmd)),
                // The core publishes only a changed set; the pointer test (O(1)) guards the
                // watchers against a version without a change.
                Effect::PublishRoutes(set) => {
                    self.routes.send_if_modified(|current| {
                        if current.set.ptr_eq(&set) {
                            return false;
                        }
                        current.set = set;
                        current.version += 1;
                        true
                    });
                }
                // In place: the map is copied only while the sampler holds the previous one.
                Effect::PublishOwners(changes) => self.owners.send_modify(|owners| {
                    let owners = Arc::make_mut(owners);
                    for (addr, owner) in changes {
                        match owner {
                            Some(owner) => drop(owners.insert(addr, owner)),
                            None => drop(owners.remove(&addr)),
                        }
                    }
                }),
                Effect::Host(op) => {
                    let after = matches!(
                        op,
                        HostOp::Remove {
                            after_withdrawal: true,
                            ..
                        }
                    )
                    .then(|| self.routes.borrow().version);
                    let _ = self.work.send(Work::Op { op, after });
                }
                Effect::StopSpeaker => {
                    let version = self.routes.borrow().version;
                    let _ = self.work.send(Work::StopSpeaker { version });
                }
                Effect::ShutdownHost => drop(self.work.send(Work::Shutdown)),
                Effect::Verify { id, expected } => {
                    drop(self.work.send(Work::Verify { id, expected }));
                }
            }
        }
        self.effects = std::mem::take(out);
    }

    fn reply(&mut self, id: RequestId, reply: Reply) {
        // A caller that gave up (dropped its receiver) gets nothing; that is fine.
        match (self.replies.remove(&id), reply) {
            (Some(ReplyTo::App(tx)), Reply::App(r)) => drop(tx.send(*r)),
            (Some(ReplyTo::Apps(tx)), Reply::Apps(r)) => drop(tx.send(r)),
            (Some(ReplyTo::Consul(tx)), Reply::Consul(r)) => drop(tx.send(r)),
            (Some(ReplyTo::Reload(tx)), Reply::Reload(r)) => drop(tx.send(r)),
            (Some(ReplyTo::Drain(tx)), Reply::Drain(r)) => drop(tx.send(r)),
            (None, _) => warn!(id, "reply to an unknown request"),
            (Some(_), _) => error!(id, "reply of the wrong kind; request dropped"),
        }
    }
}

/// Applies host operations in the order the core asked for them and reports each result.
async fn host_worker<H: Host>(
    mut host: H,
    mut announcer: Option<Announcer>,
    mut work: mpsc::UnboundedReceiver<Work>,
    done: mpsc::UnboundedSender<Vec<Event>>,
) {
    while let Some(first) = work.recv().await {
        // What is queued behind the first item is taken too (thousands of apps come up in one
        // batch of monitor reports) and answered in one message, so the lifecycle publishes
        // their routes once, not once per app. A queue per batch: one kept across batches would
        // hold the largest batch's capacity (a start with thousands of apps) for good.
        let mut queue = vec![first];
        while queue.len() < BATCH {
            let Ok(item) = work.try_recv() else { break };
            queue.push(item);
        }
        let mut results = Vec::new();
        let mut answer = false;
        let mut items = queue.into_iter().peekable();
        while let Some(item) = items.next() {
            match item {
                Work::Op { op, after } => {
                    // The operations right behind it of the same kind, each for another app,
                    // go to the host together: one netlink round of requests in flight, one
                    // iptables-restore. Different apps never share a VIP or a rule, so only
                    // each app's own order matters, and a run keeps it.
                    let install = matches!(op, HostOp::Install { .. });
                    let mut apps = HashSet::from([op.app().clone()]);
                    let (mut run, mut wait) = (vec![op], after);
                    while run.len() < MAX_RUN
                        && let Some(Work::Op { op, .. }) = items.peek()
                        && matches!(op, HostOp::Install { .. }) == install
                        && apps.insert(op.app().clone())
                    {
                        let Some(Work::Op { op, after }) = items.next() else {
                            break;
                        };
                        // Versions only grow: waiting for the last waits for every one.
                        wait = wait.max(after);
                        run.push(op);
                    }
                    if let Some(version) = wait {
                        await_flushed(announcer.as_mut(), version).await;
                    }
                    let done = apply_run(&mut host, install, run).await;
                    results.extend(done.into_iter().map(Event::HostDone));
                }
                // Listings can take tens of milliseconds (`iptables -S` of thousands of rules):
                // the results before them go first, so the answers they hold do not wait.
                Work::Verify { id, expected } => {
                    send_now(&done, &mut results);
                    let drift = host.verify(&expected).await;
                    results.push(Event::Verified { id, drift });
                }
                Work::Addresses { first } => {
                    send_now(&done, &mut results);
                    answer |= first;
                    if let Some(addresses) = host.local_addresses().await {
                        results.push(Event::LocalAddresses(addresses));
                    }
                }
                Work::StopSpeaker { version } => {
                    await_flushed(announcer.as_mut(), version).await;
                    if let Some(announcer) = announcer.take() {
                        announcer.stop.cancel();
                        if tokio::time::timeout(WITHDRAW_WAIT, announcer.done)
                            .await
                            .is_err()
                        {
                            warn!("BGP sessions did not close within {WITHDRAW_WAIT:?}");
                        }
                    }
                }
                Work::Shutdown => {
                    if let Err(e) = host.shutdown().await {
                        error!(error = %e, "dataplane cleanup at shutdown failed");
                    }
                    info!("shutdown complete: no vip, no nat rule left");
                    return;
                }
            }
        }
        drop(items);
        if !results.is_empty() || answer {
            let _ = done.send(results);
        }
    }
}

/// Sends the results gathered so far, if any.
fn send_now(done: &mpsc::UnboundedSender<Vec<Event>>, results: &mut Vec<Event>) {
    if !results.is_empty() {
        let _ = done.send(std::mem::take(results));
    }
}

/// One operation of a run, taken apart.
struct Part {
    id: OpId,
    app: AppName,
    vip: Vip,
    /// Install: the label; unused for a removal.
    label: String,
    /// Add (install) or remove (removal) the VIP.
    touch_vip: bool,
    nat: Option<NatSpec>,
}

/// A result for [`HostDone`]: `None` when not attempted.
type Outcome = Option<Result<(), String>>;

/// Applies a run of installs (VIPs, then the NAT of each app whose VIP is there) or removals
/// (NAT, then VIPs), each step for the whole run at once; one [`HostDone`] per operation.
async fn apply_run<H: Host>(host: &mut H, install: bool, run: Vec<HostOp>) -> Vec<HostDone> {
    let parts: Vec<Part> = run
        .into_iter()
        .map(|op| match op {
            HostOp::Install {
                id,
                app,
                vip,
                label,
                add_vip,
                nat,
            } => Part {
                id,
                app,
                vip,
                label,
                touch_vip: add_vip,
                nat,
            },
            HostOp::Remove {
                id,
                app,
                vip,
                remove_vip,
                nat,
                after_withdrawal: _,
            } => Part {
                id,
                app,
                vip,
                label: String::new(),
                touch_vip: remove_vip,
                nat,
            },
        })
        .collect();
    let mut vips: Vec<Outcome> = vec![None; parts.len()];
    let mut nats: Vec<Outcome> = vec![None; parts.len()];
    // What the host logs while it works for a single app (netlink, iptables, eBPF maps)
    // carries the app's name, as the lifecycle's own lines do; a run's results do, one by one.
    let span = match parts.as_slice() {
        [one] => info_span!("app", app = %one.app, vip = %one.vip),
        _ => tracing::Span::none(),
    };
    async {
        if install {
            vip_step(host, &parts, true, &mut vips).await;
            nat_step(host, &parts, true, &vips, &mut nats).await;
        } else {
            nat_step(host, &parts, false, &vips, &mut nats).await;
            vip_step(host, &parts, false, &mut vips).await;
        }
    }
    .instrument(span)
    .await;
    parts
        .into_iter()
        .zip(vips.into_iter().zip(nats))
        .map(|(p, (vip, nat))| HostDone {
            id: p.id,
            app: p.app,
            vip,
            nat,
        })
        .collect()
}

/// One app's result, logged in the app's span when it changed the host (failures are logged
/// once, by the core: `Entry::record`).
fn described(part: &Part, what: &str, r: Result<(), super::HostError>) -> Result<(), String> {
    if r.is_ok() {
        info_span!("app", app = %part.app, vip = %part.vip).in_scope(|| info!("{what}: done"));
    }
    r.map_err(|e| format!("{what}: {}", error_chain(&e)))
}

async fn vip_step<H: Host>(host: &mut H, parts: &[Part], add: bool, out: &mut [Outcome]) {
    let which: Vec<usize> = (0..parts.len()).filter(|&i| parts[i].touch_vip).collect();
    if which.is_empty() {
        return;
    }
    let (what, results) = if add {
        let vips: Vec<(&Vip, &str)> = which
            .iter()
            .map(|&i| (&parts[i].vip, parts[i].label.as_str()))
            .collect();
        ("add vip", host.add_vips(&vips).await)
    } else {
        let vips: Vec<&Vip> = which.iter().map(|&i| &parts[i].vip).collect();
        ("remove vip", host.remove_vips(&vips).await)
    };
    for (i, r) in which.into_iter().zip(results) {
        out[i] = Some(described(&parts[i], what, r));
    }
}

/// Installs need the VIP there (or not to be added); removals go ahead regardless.
async fn nat_step<H: Host>(
    host: &mut H,
    parts: &[Part],
    install: bool,
    vips: &[Outcome],
    out: &mut [Outcome],
) {
    let (which, jobs): (Vec<usize>, Vec<NatJob<'_>>) = parts
        .iter()
        .enumerate()
        .filter(|(i, _)| !install || vips[*i].as_ref().is_none_or(Result::is_ok))
        .filter_map(|(i, p)| {
            let nat = p.nat.as_ref()?;
            Some((
                i,
                NatJob {
                    app: &p.app,
                    vip: &p.vip,
                    rules: &nat.rules,
                    dest: nat.dest,
                },
            ))
        })
        .unzip();
    if jobs.is_empty() {
        return;
    }
    let (what, results) = if install {
        ("install nat", host.install_nats(&jobs).await)
    } else {
        ("remove nat", host.remove_nats(&jobs).await)
    };
    for (i, r) in which.into_iter().zip(results) {
        out[i] = Some(described(&parts[i], what, r));
    }
}

/// The next address that left `lo`; pending forever without hints. `None`: they stopped.
async fn next_hint(hints: Option<&mut mpsc::UnboundedReceiver<IpAddr>>) -> Option<IpAddr> {
    match hints {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Waits (bounded) until every established peer has been sent route-set `version`, so a VIP
/// leaves `lo` only after its withdrawal went out.
async fn await_flushed(announcer: Option<&mut Announcer>, version: u64) {
    let Some(announcer) = announcer else {
        return;
    };
    let flushed = announcer.flushed.wait_for(|v| *v >= version);
    if tokio::time::timeout(WITHDRAW_WAIT, flushed).await.is_err() {
        warn!(
            version,
            "withdrawal not confirmed by every peer within {WITHDRAW_WAIT:?}; going on"
        );
    }
}
