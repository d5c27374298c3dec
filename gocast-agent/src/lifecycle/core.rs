//! The lifecycle's decisions, as a pure state machine: [`Core::step`] takes an [`Event`] and the
//! time it happened and appends [`Effect`]s. No I/O, no clock, no async: the driver
//! ([`super::driver`]) owns the host, the state file, the channels and the clock, and feeds the
//! results of what it did back in as events ([`Event::HostDone`], [`Event::Persisted`]).
//!
//! Rules it keeps (docs/design.md, "App lifecycle"):
//! - an app is announced only once its VIP is on `lo` and its NAT is installed, as reported by
//!   the host, and only after `monitor_rise` passing reports; `monitor_fall` failing reports
//!   withdraw it at once;
//! - the route leaves the set before the VIP leaves `lo`: every removal follows the publish of
//!   the route set without it, and asks the driver to wait until the peers were sent it;
//! - an HTTP registration or removal changes nothing until the state file has it
//!   ([`Effect::Persist`], then [`Event::Persisted`]); requests that arrive meanwhile wait, in
//!   order, while monitor reports, host results and timers go on; when the write is done, the
//!   registrations and removals that waited go into the next write together (group commit) as
//!   long as none touches an app, label or VIP another of them touches, so each is decided as
//!   it would have been one after the other;
//! - a refused request changes nothing.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    net::IpAddr,
    sync::Arc,
};

use ipnet::IpNet;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

pub use super::events::{Effect, Event, HostDone, HostOp, NatSpec, Now, OpId, Reply, RequestId};
use super::{
    Settings,
    entry::{Drain, Entry, Repairs, Resource},
    passive::Passive,
};
use crate::{
    app::{AppName, AppSpec, Monitor, Source, Vip},
    messages::{AppView, LifecycleError, Protected, Route, RouteSet, Verdict, VipOwner},
    metrics::Metrics,
    monitor::{self, MonitorResult, Report},
    store::{Change, Saved, StoreError},
};

mod checks;
mod drain;
mod repair;
mod sync;

/// A state-file write in flight and what it completes.
#[derive(Debug)]
enum Pending {
    Register {
        id: RequestId,
        spec: AppSpec,
    },
    Unregister {
        id: RequestId,
        name: AppName,
    },
    /// HTTP apps whose cleanup timer passed.
    Forget(Vec<AppName>),
    Drain {
        id: RequestId,
        app: Option<AppName>,
        drain: bool,
    },
}

/// Registrations and removals gathered for one state-file write (group commit). Each is
/// admitted against the registry before any of them is applied, which decides as admitting it
/// after the previous ones took effect would, because none of them touches what another does.
#[derive(Debug, Default)]
struct Staged {
    pending: Vec<Pending>,
    changes: Vec<Change>,
    /// The apps the batch registers, replaces or removes.
    names: BTreeSet<AppName>,
    /// Their `lo` labels (two names can share one).
    labels: BTreeSet<String>,
    /// The VIPs the batch adds, and those of the apps it replaces or removes.
    vips: Vec<Vip>,
}

impl Staged {
    /// Whether `event` can join: a registration or removal independent of every request in
    /// the batch. Anything else waits until the batch is saved (and goes first when it is
    /// empty).
    fn joins(&self, event: &Event) -> bool {
        if self.pending.is_empty() {
            return true;
        }
        let overlaps =
            |a: Vip, b: Vip| a.prefix().contains(&b.addr()) || b.prefix().contains(&a.addr());
        match event {
            Event::Register { spec, .. } => {
                !self.names.contains(&spec.name)
                    && !self.labels.contains(&spec.name.lo_label())
                    && !self.vips.iter().any(|v| overlaps(*v, spec.vip))
            }
            Event::Unregister { name, .. } => {
                !self.names.contains(name) && !self.labels.contains(&name.lo_label())
            }
            _ => false,
        }
    }
}

/// What a registration needs after its checks.
enum Admission {
    /// Registered again with the same parameters.
    Unchanged,
    Change,
}

/// Apps whose route may have changed since the route set was last published.
#[derive(Debug, Default)]
struct DirtyRoutes {
    /// Every app's (at shutdown): rebuild the set.
    all: bool,
    apps: Vec<AppName>,
}

impl DirtyRoutes {
    fn app(&mut self, name: &AppName) {
        self.apps.push(name.clone());
    }

    fn is_empty(&self) -> bool {
        !self.all && self.apps.is_empty()
    }
}

/// What changed since it was last published or computed.
#[derive(Debug, Default)]
struct Changed {
    /// The route set: updated and published once per batch, for the apps named here only.
    routes: DirtyRoutes,
    /// The VIPs whose owner came, changed or went, in order: published as changes, so a
    /// batch costs O(batch), not a rebuild of every app's owner.
    owners: Vec<(IpAddr, Option<VipOwner>)>,
}

/// The lifecycle's state and decisions.
pub struct Core {
    settings: Settings,
    metrics: Metrics,
    /// Boxed: an entry is a few hundred bytes, and a B-tree node holds eleven values and is
    /// rarely full, so unboxed entries would cost about half as much again in empty slots.
    apps: BTreeMap<AppName, Box<Entry>>,
    next_generation: u64,
    next_op: OpId,
    changed: Changed,
    /// The route set as last published, and the prefix each app has in it: a batch updates
    /// the apps it touched, not every app (issue 14 §2).
    routes: RouteSet,
    route_of: HashMap<AppName, IpNet>,
    /// Every app's cleanup and drain deadlines by time, so the next one is found without a
    /// walk over every app (issue 14 §2). Entries go stale when a deadline is cleared or an
    /// app leaves; a stale one is dropped when it comes first or falls due.
    deadlines: BTreeSet<(Instant, AppName)>,
    /// The state-file write in flight: what it completes, in order.
    persisting: Option<Vec<Pending>>,
    /// The next write, gathered while handling requests (sent at the end of the step).
    staged: Staged,
    /// The apps a registration may clash with, by address and label.
    conflicts: checks::ConflictIndex,
    /// Requests that arrived while a state-file write was in flight, in order.
    deferred: VecDeque<Event>,
    shutting_down: bool,
    /// Apps drained by name (saved): they stay drained across restarts and re-registrations.
    drained: BTreeSet<AppName>,
    /// The whole host is drained (saved): every app, present and future.
    host_drained: bool,
    /// Self-repair: the verification of the host in flight.
    verification: repair::Verification,
    /// The host's own addresses ([`Event::LocalAddresses`]), sorted: no VIP may cover one.
    local: Vec<Protected>,
    /// Unregistrations answered once their host operation is done, so a 200 means the VIP
    /// and NAT rules are gone (as GoCast's answer did).
    replies_after: BTreeMap<OpId, (RequestId, AppView)>,
    /// Removals of routed apps, sent right after the route set without them: one publish
    /// for every app a step takes down, not one each (O(apps) every time).
    after_publish: Vec<Effect>,
}

/// An app's route as announced.
fn announced_route(e: &Entry) -> (IpNet, Route) {
    (
        e.spec.vip.prefix(),
        Route {
            app: e.spec.name.clone(),
            communities: e.spec.communities.clone(),
            drain: matches!(e.drain, Drain::Draining { .. }),
        },
    )
}

/// Adds an entry's cleanup and drain deadlines to the index (see `Core::deadlines`).
fn index_deadlines(deadlines: &mut BTreeSet<(Instant, AppName)>, entry: &Entry) {
    for t in [entry.cleanup_at, entry.drain.until()]
        .into_iter()
        .flatten()
    {
        deadlines.insert((t, entry.spec.name.clone()));
    }
}

impl Core {
    pub fn new(settings: Settings, metrics: Metrics) -> Self {
        Self {
            settings,
            metrics,
            apps: BTreeMap::new(),
            next_generation: 1,
            next_op: 1,
            changed: Changed::default(),
            routes: RouteSet::new(),
            route_of: HashMap::new(),
            deadlines: BTreeSet::new(),
            persisting: None,
            staged: Staged::default(),
            conflicts: checks::ConflictIndex::default(),
            deferred: VecDeque::new(),
            shutting_down: false,
            drained: BTreeSet::new(),
            host_drained: false,
            verification: repair::Verification::default(),
            replies_after: BTreeMap::new(),
            local: Vec::new(),
            after_publish: Vec::new(),
        }
    }

    /// Config apps first, then the saved HTTP registrations that do not clash with them; the
    /// saved drain state holds from the start (a restart during maintenance announces nothing
    /// drained).
    pub fn restore(
        &mut self,
        config_apps: Vec<AppSpec>,
        saved: Result<Saved, StoreError>,
        now: Now,
        out: &mut Vec<Effect>,
    ) {
        let saved = saved.unwrap_or_else(|e| {
            error!(error = %e, "starting without saved HTTP registrations and drain state");
            Saved::default()
        });
        self.drained = saved.drained.into_iter().collect();
        self.host_drained = saved.host_drained;
        if self.host_drained || !self.drained.is_empty() {
            warn!(
                host = self.host_drained,
                apps = self.drained.len(),
                "drained before the restart: staying drained until undrained"
            );
        }
        for spec in config_apps {
            if let Err(e) = self.check_protected(&spec) {
                error!(app = %spec.name, error = %e, "config app refused; the others run");
                continue;
            }
            self.insert(spec, Source::Config, now, out);
        }
        let count = saved.apps.len();
        let mut dropped = 0;
        for spec in saved.apps {
            // What a registration over HTTP must pass, it must pass again from the file:
            // `exec:` monitors only with allow_http_exec, VIPs inside the allowlist.
            if let Err(e) = self
                .check_policy(&spec, Source::Http)
                .and_then(|()| self.check_protected(&spec))
                .and_then(|()| self.check_conflicts(&spec))
            {
                error!(app = %spec.name, error = %e, "saved registration dropped");
                dropped += 1;
                continue;
            }
            if self.apps.contains_key(&spec.name) {
                warn!(app = %spec.name, "saved registration dropped: the config defines this app");
                dropped += 1;
                continue;
            }
            self.insert(spec, Source::Http, now, out);
        }
        info!(
            config = self.count(Source::Config),
            restored = self.count(Source::Http),
            saved = count,
            dropped,
            "apps loaded"
        );
        self.flush(out);
    }

    fn count(&self, source: Source) -> usize {
        self.apps.values().filter(|e| e.source == source).count()
    }

    /// When [`Event::Deadline`] is next wanted (a cleanup, the end of a drain). None while a
    /// state-file write is in flight: forgetting an HTTP app needs one, and the write's
    /// completion looks again.
    pub fn next_deadline(&mut self) -> Option<Instant> {
        loop {
            let first = self.deadlines.first();
            match first.map(|d| self.deadline_holds(d)) {
                Some(false) => drop(self.deadlines.pop_first()),
                _ => break,
            }
        }
        if self.persisting.is_some() || self.shutting_down {
            return None;
        }
        self.deadlines.first().map(|(t, _)| *t)
    }

    /// The apps whose deadline of one kind (`which`: cleanup or drain) has passed, from the
    /// index.
    fn due(&self, now: Now, which: fn(&Entry) -> Option<Instant>) -> Vec<AppName> {
        self.deadlines
            .iter()
            .take_while(|(t, _)| *t <= now.mono)
            .filter(|(t, name)| self.apps.get(name).is_some_and(|e| which(e) == Some(*t)))
            .map(|(_, name)| name.clone())
            .collect()
    }

    /// Whether an indexed deadline is still one of its app's.
    fn deadline_holds(&self, (t, name): &(Instant, AppName)) -> bool {
        self.apps
            .get(name)
            .is_some_and(|e| e.cleanup_at == Some(*t) || e.drain.until() == Some(*t))
    }

    /// Handles one event.
    pub fn step(&mut self, event: Event, now: Now, out: &mut Vec<Effect>) {
        if self.shutting_down {
            return;
        }
        self.handle(event, now, out);
        if !self.after_publish.is_empty() {
            self.publish(out);
        }
        self.seal(out);
    }

    /// Sends the gathered registrations and removals as one write.
    fn seal(&mut self, out: &mut Vec<Effect>) {
        if self.staged.pending.is_empty() {
            return;
        }
        let staged = std::mem::take(&mut self.staged);
        out.push(Effect::Persist(staged.changes));
        self.persisting = Some(staged.pending);
    }

    /// Adds a registration or removal of `name` (to `vip`) to the next write.
    fn stage(&mut self, pending: Pending, change: Change, name: &AppName, vip: Option<Vip>) {
        let staged = &mut self.staged;
        staged.names.insert(name.clone());
        staged.labels.insert(name.lo_label());
        staged.vips.extend(vip);
        staged.vips.extend(self.apps.get(name).map(|e| e.spec.vip));
        staged.pending.push(pending);
        staged.changes.push(change);
    }

    fn handle(&mut self, event: Event, now: Now, out: &mut Vec<Effect>) {
        match event {
            Event::Register { .. }
            | Event::Unregister { .. }
            | Event::SyncConsul { .. }
            | Event::Reload { .. }
            | Event::Drain { .. }
                if self.persisting.is_some() =>
            {
                self.deferred.push_back(event);
            }
            Event::Register { id, spec, source } => self.register(id, spec, source, now, out),
            Event::Unregister { id, name } => self.unregister(id, name, out),
            Event::Apps { id } => {
                let available = self.settings.passive_health;
                let views = self.apps.values().map(|e| e.view(now, available)).collect();
                out.push(Effect::Reply {
                    id,
                    reply: Reply::Apps(views),
                });
            }
            Event::SyncConsul { id, apps, keep } => {
                let (_, refused) = self.sync(Source::Consul, apps, &keep, now, out);
                out.push(Effect::Reply {
                    id,
                    reply: Reply::Consul(refused),
                });
            }
            Event::Reload { id, settings, apps } => {
                let report = self.reload(*settings, apps, now, out);
                out.push(Effect::Reply {
                    id,
                    reply: Reply::Reload(report),
                });
            }
            Event::Drain { id, app, drain } => self.drain(id, app, drain, out),
            Event::PassiveHealth(verdicts) => {
                for (name, verdict) in verdicts {
                    self.on_passive(&name, verdict, now, out);
                }
            }
            Event::Report(report) => self.on_report(report, now, out),
            Event::Persisted(result) => self.persisted(result, now, out),
            Event::HostDone(done) => {
                if let Some((id, view)) = self.replies_after.remove(&done.id) {
                    Self::reply(id, Ok(view), out);
                }
                self.host_done(done, now);
            }
            Event::Deadline => {
                self.drains_due(now);
                self.cleanup_due(now, out);
            }
            Event::VerifyDue { vips } => self.verify_due(vips, out),
            Event::LeftLo(addrs) => self.left_lo(&addrs, out),
            Event::Verified { id, drift } => self.verified(id, drift, now, out),
            Event::LocalAddresses(addresses) => self.local_addresses(addresses),
            Event::Shutdown => self.shutdown(out),
        }
    }

    /// The host's addresses changed (or are known for the first time): new registrations are
    /// checked against them. An app they make unsafe stays (its VIP is on `lo` already, and
    /// withdrawing a healthy route because an address appeared elsewhere would be an outage
    /// of its own); it is logged, and the operator decides.
    fn local_addresses(&mut self, mut addresses: Vec<Protected>) {
        addresses.sort();
        addresses.dedup();
        if addresses == self.local {
            return;
        }
        debug!(count = addresses.len(), "the host's addresses changed");
        let old = std::mem::replace(&mut self.local, addresses);
        for entry in self.apps.values() {
            let vip = entry.spec.vip;
            if let Some(p) = self.local.iter().find(|p| self.unsafe_for(vip, p))
                && !old.iter().any(|o| self.unsafe_for(vip, o))
            {
                warn!(
                    app = %entry.spec.name,
                    %vip,
                    addr = %p.addr,
                    what = %p.what,
                    "an app's vip now covers an address of the host; it stays (unregister or change it)"
                );
            }
        }
    }

    /// Publishes the route set and the owners if they changed; the driver calls it after each
    /// batch of events, so a burst of reports costs one route-set update.
    pub fn flush(&mut self, out: &mut Vec<Effect>) {
        if !self.changed.routes.is_empty() || !self.changed.owners.is_empty() {
            self.publish(out);
        }
        self.tidy_conflict_index();
    }

    fn reply(id: RequestId, result: Result<AppView, LifecycleError>, out: &mut Vec<Effect>) {
        out.push(Effect::Reply {
            id,
            reply: Reply::App(Box::new(result)),
        });
    }

    fn view(&self, name: &AppName, now: Now) -> Result<AppView, LifecycleError> {
        let available = self.settings.passive_health;
        self.apps
            .get(name)
            .map(|e| e.view(now, available))
            .ok_or_else(|| LifecycleError::UnknownApp(name.clone()))
    }

    fn register(
        &mut self,
        id: RequestId,
        spec: AppSpec,
        source: Source,
        now: Now,
        out: &mut Vec<Effect>,
    ) {
        match self.admit(&spec, source) {
            Err(e) => Self::reply(id, Err(e), out),
            Ok(Admission::Unchanged) => Self::reply(id, self.view(&spec.name, now), out),
            Ok(Admission::Change) if source == Source::Http => {
                let (name, vip, change) = (spec.name.clone(), spec.vip, Change::Put(spec.clone()));
                self.stage(Pending::Register { id, spec }, change, &name, Some(vip));
            }
            Ok(Admission::Change) => {
                let result = self.apply_register(spec, source, now, out);
                Self::reply(id, result, out);
            }
        }
    }

    /// Registers an app that needs no state-file write (or whose write is done).
    fn register_now(
        &mut self,
        spec: AppSpec,
        source: Source,
        now: Now,
        out: &mut Vec<Effect>,
    ) -> Result<AppView, LifecycleError> {
        match self.admit(&spec, source)? {
            Admission::Unchanged => self.view(&spec.name, now),
            Admission::Change => self.apply_register(spec, source, now, out),
        }
    }

    /// Every check a registration must pass; a refused one changes nothing.
    fn admit(&self, spec: &AppSpec, source: Source) -> Result<Admission, LifecycleError> {
        self.check_policy(spec, source)?;
        self.check_protected(spec)?;
        self.check_conflicts(spec)?;
        match self.apps.get(&spec.name) {
            Some(old) if source != Source::Config && old.source == Source::Config => {
                Err(LifecycleError::ConfigApp(spec.name.clone()))
            }
            Some(old) if old.spec == *spec => {
                debug!(app = %spec.name, "registered again with the same parameters: nothing to do");
                Ok(Admission::Unchanged)
            }
            _ => Ok(Admission::Change),
        }
    }

    fn apply_register(
        &mut self,
        spec: AppSpec,
        source: Source,
        now: Now,
        out: &mut Vec<Effect>,
    ) -> Result<AppView, LifecycleError> {
        let name = spec.name.clone();
        match self.apps.remove(&name) {
            Some(old) if old.spec.vip == spec.vip => {
                self.replace_in_place(old, spec, source, out);
            }
            Some(old) => {
                info!(app = %name, old_vip = %old.spec.vip, new_vip = %spec.vip, "app replaced with a new vip");
                self.teardown(old, out);
                self.insert(spec, source, now, out);
            }
            None => {
                info!(app = %name, vip = %spec.vip, ?source, "app registered");
                self.insert(spec, source, now, out);
            }
        }
        self.view(&name, now)
    }

    fn unregister(&mut self, id: RequestId, name: AppName, out: &mut Vec<Effect>) {
        // Only HTTP apps: the config file and the catalog decide whether the others exist.
        match self.apps.get(&name).map(|e| e.source) {
            None => Self::reply(id, Err(LifecycleError::UnknownApp(name)), out),
            Some(Source::Config) => Self::reply(id, Err(LifecycleError::ConfigApp(name)), out),
            Some(Source::Consul) => Self::reply(id, Err(LifecycleError::ConsulApp(name)), out),
            Some(Source::Http) => {
                let change = Change::Remove(name.clone());
                let staged = name.clone();
                self.stage(Pending::Unregister { id, name }, change, &staged, None);
            }
        }
    }

    /// Removes an app at once; replies with the app as it was.
    /// Removes an app at once; replies with the app as it was, once the host removed its VIP
    /// and NAT rules (at once if it had none).
    fn remove_now(&mut self, id: RequestId, name: &AppName, now: Now, out: &mut Vec<Effect>) {
        let view = match self.view(name, now) {
            Ok(view) => view,
            Err(e) => return Self::reply(id, Err(e), out),
        };
        let Some(entry) = self.apps.remove(name) else {
            return Self::reply(id, Ok(view), out);
        };
        info!(app = %name, "app unregistered");
        match self.teardown(entry, out) {
            Some(op) => drop(self.replies_after.insert(op, (id, view))),
            None => Self::reply(id, Ok(view), out),
        }
    }

    /// The drain state as saved, for [`Change::Drain`].
    fn drain_change(&self) -> Change {
        Change::Drain {
            drained: self.drained.iter().cloned().collect(),
            host_drained: self.host_drained,
        }
    }

    /// The state file has (or failed to take) the pending changes: apply or refuse each, in
    /// order, then take the requests that waited.
    fn persisted(&mut self, result: Result<(), StoreError>, now: Now, out: &mut Vec<Effect>) {
        let Some(batch) = self.persisting.take() else {
            warn!("a state-file write finished that nothing waited for");
            return;
        };
        let result = result.map_err(Arc::new);
        for pending in batch {
            match (pending, &result) {
                (Pending::Register { id, spec }, Ok(())) => {
                    let result = self.apply_register(spec, Source::Http, now, out);
                    Self::reply(id, result, out);
                }
                (Pending::Unregister { id, name }, Ok(())) => {
                    self.remove_now(id, &name, now, out);
                }
                (Pending::Forget(names), Ok(())) => {
                    for name in names {
                        if let Some(entry) = self.apps.remove(&name) {
                            info!(app = %name, "cleanup timer passed: app removed");
                            self.teardown(entry, out);
                        }
                    }
                }
                (Pending::Drain { id, app, drain }, Ok(())) => {
                    let report = self.apply_drain(app, drain, now);
                    out.push(Effect::Reply {
                        id,
                        reply: Reply::Drain(Ok(report)),
                    });
                }
                (Pending::Register { id, .. } | Pending::Unregister { id, .. }, Err(e)) => {
                    Self::reply(id, Err(LifecycleError::Store(e.clone())), out);
                }
                (Pending::Drain { id, .. }, Err(e)) => {
                    out.push(Effect::Reply {
                        id,
                        reply: Reply::Drain(Err(LifecycleError::Store(e.clone()))),
                    });
                }
                (Pending::Forget(names), Err(e)) => {
                    // Keep them: forgetting them in memory but not on disk would bring them
                    // back later anyway, and an operator sees them in /apps. Try again after
                    // the timer.
                    for name in names {
                        error!(app = %name, error = %e, "cannot save the removal; keeping the app");
                        if let Some(entry) = self.apps.get_mut(&name) {
                            entry.cleanup_at = Some(now.mono + self.settings.cleanup_timer);
                            index_deadlines(&mut self.deadlines, entry);
                        }
                    }
                }
            }
        }
        // The requests that waited, in order: those independent of each other go into one
        // write; the first that is not stays first in line for the write after.
        while self.persisting.is_none() {
            match self.deferred.front() {
                Some(event) if self.staged.joins(event) => {}
                _ => break,
            }
            if let Some(event) = self.deferred.pop_front() {
                self.handle(event, now, out);
            }
        }
        self.seal(out);
        if self.persisting.is_none() {
            self.cleanup_due(now, out);
        }
    }

    fn next_op(&mut self) -> OpId {
        let id = self.next_op;
        self.next_op += 1;
        id
    }

    fn next_generation(&mut self) -> u64 {
        let generation = self.next_generation;
        self.next_generation += 1;
        generation
    }

    /// Adds a new app: unhealthy until its monitors pass; a cleanup is pending so an HTTP app
    /// that never comes up is forgotten after `cleanup_timer`, as in GoCast.
    fn insert(&mut self, spec: AppSpec, source: Source, now: Now, out: &mut Vec<Effect>) {
        let entry = Box::new(Entry {
            results: vec![None; spec.monitors.len()],
            label: spec.name.lo_label(),
            spec,
            source,
            generation: self.next_generation(),
            up: false,
            announced: false,
            drain: Drain::Off,
            streak: 0,
            vip: Resource::Absent,
            nat: Resource::Absent,
            since: now.wall,
            cleanup_at: None,
            last_error: None,
            passive: Passive::default(),
            repairs: Repairs::default(),
        });
        let mut entry = entry;
        if self.host_drained || self.drained.contains(&entry.spec.name) {
            // Never announced while drained: it comes up when undrained.
            entry.drain = Drain::Drained;
        }
        self.metrics.app_state(&entry.spec.name, false, false);
        watch(&entry, out);
        self.conflicts
            .add(&entry.spec.name, entry.spec.vip, &entry.label);
        // The stats sampler learns the new VIP's owner with the next publish; the route set
        // does not change: a new app is down until its monitors pass.
        self.owner_changed(&entry, true);
        self.apps.insert(entry.spec.name.clone(), entry);
    }

    /// Records that `entry`'s VIP has it as owner now (`present`) or no owner any more.
    fn owner_changed(&mut self, entry: &Entry, present: bool) {
        let owner = present.then(|| VipOwner {
            vip: entry.spec.vip,
            app: entry.spec.name.clone(),
            passive_health: entry.spec.passive_health,
        });
        self.changed.owners.push((entry.spec.vip.addr(), owner));
    }

    /// Same name, same VIP, other parameters: keep the health state so the route does not
    /// flap, swap NAT rules and communities, and check the new monitors from now on.
    fn replace_in_place(
        &mut self,
        mut entry: Box<Entry>,
        spec: AppSpec,
        source: Source,
        out: &mut Vec<Effect>,
    ) {
        info!(app = %spec.name, "app parameters replaced");
        if entry.spec.nats != spec.nats || entry.spec.nat_dest != spec.nat_dest {
            // The old rules go with the old parameters; the new ones are installed below.
            self.remove(&mut entry, false, false, out);
        }
        entry.generation = self.next_generation();
        entry.results = vec![None; spec.monitors.len()];
        entry.streak = 0;
        if !spec.passive_health {
            entry.passive = Passive::default();
        }
        entry.spec = spec;
        entry.source = source;
        watch(&entry, out);
        if entry.up {
            self.install(&mut entry, out);
        }
        self.owner_changed(&entry, true);
        self.changed.routes.app(&entry.spec.name);
        self.apps.insert(entry.spec.name.clone(), entry);
    }

    /// Removes everything of an app from the host: route first, then NAT and VIP. The
    /// removal of a routed app waits in `after_publish` for the route set without it (at the
    /// end of the step). Returns the host operation removing its parts, if any.
    fn teardown(&mut self, mut entry: Box<Entry>, out: &mut Vec<Effect>) -> Option<OpId> {
        out.push(Effect::Monitor(monitor::Command::Unwatch {
            app: entry.spec.name.clone(),
        }));
        self.owner_changed(&entry, false);
        // Also when a route change is not published yet: it may be this app's withdrawal.
        let op = if entry.routed() || !self.changed.routes.is_empty() {
            self.changed.routes.app(&entry.spec.name);
            let mut later = std::mem::take(&mut self.after_publish);
            let op = self.remove(&mut entry, true, true, &mut later);
            self.after_publish = later;
            op
        } else {
            self.remove(&mut entry, true, true, out)
        };
        self.metrics.app_removed(&entry.spec.name);
        op
    }

    /// Starts an operation on the chosen resources (its id marks them, so only its result
    /// settles them); `None` when there is nothing to do.
    fn claim(
        &mut self,
        entry: &mut Entry,
        vip: bool,
        nat: bool,
        state: fn(OpId) -> Resource,
    ) -> Option<OpId> {
        if !vip && !nat {
            return None;
        }
        let id = self.next_op();
        if vip {
            entry.vip = state(id);
        }
        if nat {
            entry.nat = state(id);
        }
        Some(id)
    }

    /// Asks for what the app lacks on the host (VIP, then NAT), unless that is already under
    /// way; it is announced when the host confirms ([`Core::host_done`]).
    fn install(&mut self, entry: &mut Entry, out: &mut Vec<Effect>) {
        // A drained app gets its VIP back when undrained.
        if entry.installing() || entry.drain == Drain::Drained {
            return;
        }
        let add_vip = !entry.vip.maybe_present();
        let add_nat = !entry.spec.nats.is_empty() && !entry.nat.maybe_present();
        self.start_install(entry, add_vip, add_nat, out);
    }

    /// Asks the host to add the chosen parts (VIP, then NAT); `None` when there is none.
    fn start_install(
        &mut self,
        entry: &mut Entry,
        add_vip: bool,
        add_nat: bool,
        out: &mut Vec<Effect>,
    ) -> Option<OpId> {
        let id = self.claim(entry, add_vip, add_nat, Resource::Adding)?;
        out.push(Effect::Host(HostOp::Install {
            id,
            app: entry.spec.name.clone(),
            vip: entry.spec.vip,
            label: entry.label.clone(),
            add_vip,
            nat: add_nat.then(|| entry.nat_spec()),
        }));
        Some(id)
    }

    /// Asks for the app's NAT rules (and, with `vip`, its VIP) to go. `after_withdrawal`: the
    /// route set just published must reach the peers first.
    fn remove(
        &mut self,
        entry: &mut Entry,
        vip: bool,
        after_withdrawal: bool,
        out: &mut Vec<Effect>,
    ) -> Option<OpId> {
        let remove_vip = vip && entry.vip.maybe_present();
        let remove_nat = !entry.spec.nats.is_empty() && entry.nat.maybe_present();
        let id = self.claim(entry, remove_vip, remove_nat, Resource::Removing)?;
        out.push(Effect::Host(HostOp::Remove {
            id,
            app: entry.spec.name.clone(),
            vip: entry.spec.vip,
            remove_vip,
            nat: remove_nat.then(|| entry.nat_spec()),
            after_withdrawal,
        }));
        Some(id)
    }

    /// The host did (or failed) an operation: settle each part, then announce an app that is
    /// up and now complete, or withdraw one that lost a part.
    fn host_done(&mut self, done: HostDone, now: Now) {
        let Some(mut entry) = self.apps.remove(&done.app) else {
            return;
        };
        for (resource, result) in [(&mut entry.vip, &done.vip), (&mut entry.nat, &done.nat)] {
            if let Some(result) = result {
                resource.settle(done.id, result.is_ok());
            }
        }
        self.repair_done(&mut entry, &done);
        let failure = [done.vip, done.nat]
            .into_iter()
            .flatten()
            .find_map(Result::err);
        match failure {
            Some(message) => entry.record(message),
            None if entry.installed() => entry.last_error = None,
            None => {}
        }
        self.settle_announcement(&mut entry, now);
        self.apps.insert(done.app, entry);
    }

    /// Announces an app that is up and complete on the host; withdraws an announced one that
    /// lost a part (a VIP not on lo, or whose NAT is missing, would black-hole traffic).
    fn settle_announcement(&mut self, entry: &mut Entry, now: Now) {
        let name = &entry.spec.name;
        if entry.up && !entry.announced && entry.installed() {
            entry.announced = true;
            entry.since = now.wall;
            // Its indexed deadline goes stale and is dropped when it comes up.
            entry.cleanup_at = None;
            self.changed.routes.app(&entry.spec.name);
            self.metrics.state_changed(name);
            self.metrics.app_state(name, true, true);
            info!(app = %name, vip = %entry.spec.vip, "app healthy: announcing");
        } else if entry.announced && !entry.installed() && !entry.installing() {
            entry.announced = false;
            self.changed.routes.app(&entry.spec.name);
            self.metrics.app_state(name, false, false);
            warn!(app = %name, vip = %entry.spec.vip, "host state incomplete: withdrawing");
        }
    }

    /// A new passive verdict from the counters: a failure withdraws a healthy app at once (the
    /// window already smoothed it); a cleared one lets a later check bring it back, after the
    /// hold-down and with proof that the service accepts (see [`super::passive`]).
    fn on_passive(&mut self, name: &AppName, verdict: Verdict, now: Now, out: &mut Vec<Effect>) {
        let Some(mut entry) = self.apps.remove(name) else {
            return;
        };
        if entry.spec.passive_health {
            let reason = match verdict {
                Verdict::Failing(reason) => Some(reason),
                Verdict::Cleared => {
                    info!(app = %name, "passive health: the traffic no longer fails the app");
                    None
                }
            };
            self.passive_reading(&mut entry, true, reason, now, out);
        }
        self.apps.insert(name.clone(), entry);
    }

    /// Records a passive reading (the counters', or the listener's when not `traffic`); a
    /// failure that begins sets the hold-down, asks the monitors for proof and withdraws.
    fn passive_reading(
        &mut self,
        entry: &mut Entry,
        traffic: bool,
        reason: Option<String>,
        now: Now,
        out: &mut Vec<Effect>,
    ) {
        let window = self.settings.passive_window;
        if !entry.passive.set(traffic, reason, now.mono, window) {
            return;
        }
        warn!(
            app = %entry.spec.name,
            reason = entry.passive.failure().unwrap_or_default(),
            failures = entry.passive.strikes,
            hold_down_s = entry.passive.hold_left(now.mono).unwrap_or_default(),
            "passive health failing: held down until the service proves it accepts"
        );
        watch(entry, out);
        if entry.up {
            entry.streak = 0;
            self.go_down(entry, now);
        }
    }

    fn on_report(&mut self, report: Report, now: Now, out: &mut Vec<Effect>) {
        let Some(mut entry) = self.apps.remove(&report.app) else {
            return;
        };
        if entry.generation == report.generation {
            if entry.spec.passive_health {
                self.passive_reading(&mut entry, false, report.stuck, now, out);
            }
            self.judge(&mut entry, report.results, report.proved, now, out);
        }
        self.apps.insert(report.app, entry);
    }

    /// Rise and fall: `monitor_rise` consecutive passing reports bring an app up,
    /// `monitor_fall` failing ones take it down. After a passive failure a report passes only
    /// once the hold-down is over and it `proved` that the service accepts.
    fn judge(
        &mut self,
        entry: &mut Entry,
        results: Vec<MonitorResult>,
        proved: bool,
        now: Now,
        out: &mut Vec<Effect>,
    ) {
        let passing = results.iter().all(|r| r.ok) && entry.passive.allows(now.mono, proved);
        for ((slot, r), monitor) in entry
            .results
            .iter_mut()
            .zip(results)
            .zip(&entry.spec.monitors)
        {
            log_verdict(&entry.spec.name, monitor, slot.as_ref(), &r);
            *slot = Some(r);
        }
        if !passing
            && !entry.up
            && entry.cleanup_at.is_none()
            && (entry.source == Source::Http || entry.vip.maybe_present())
        {
            // An app that never came up is forgotten after cleanup_timer too, as in GoCast.
            entry.cleanup_at = Some(now.mono + self.settings.cleanup_timer);
            index_deadlines(&mut self.deadlines, entry);
        }
        if passing == entry.up {
            entry.streak = 0;
            // An up app whose install failed earlier is retried on every passing report.
            if passing && !entry.installed() {
                self.install(entry, out);
            }
            return;
        }
        entry.streak += 1;
        let needed = if passing {
            self.settings.monitor_rise
        } else {
            self.settings.monitor_fall
        };
        if entry.streak < needed {
            return;
        }
        entry.streak = 0;
        if passing {
            entry.up = true;
            if entry.passive.needs_proof {
                info!(app = %entry.spec.name, "passive health: the service accepts again");
                entry.passive.back(now.mono);
                watch(entry, out);
            }
            // Announced now if complete, else once the host confirms the install.
            self.install(entry, out);
            self.settle_announcement(entry, now);
        } else {
            self.go_down(entry, now);
        }
    }

    fn go_down(&mut self, entry: &mut Entry, now: Now) {
        let name = &entry.spec.name;
        entry.up = false;
        entry.announced = false;
        entry.since = now.wall;
        entry.cleanup_at = Some(now.mono + self.settings.cleanup_timer);
        let reasons: Vec<String> = entry
            .spec
            .monitors
            .iter()
            .zip(&entry.results)
            .filter_map(|(m, r)| {
                r.as_ref()
                    .filter(|r| !r.ok)
                    .map(|r| format!("{m}: {}", r.reason))
            })
            .chain(entry.passive.failure().map(str::to_owned))
            .collect();
        warn!(app = %name, vip = %entry.spec.vip, reasons = %reasons.join("; "), "app unhealthy: withdrawing");
        self.metrics.state_changed(name);
        self.metrics.app_state(name, false, false);
        self.changed.routes.app(&entry.spec.name);
        index_deadlines(&mut self.deadlines, entry);
    }

    /// Cleans up every app whose timer has passed: config and Consul apps lose VIP and NAT and
    /// are checked again; HTTP apps are forgotten once the state file no longer has them.
    fn cleanup_due(&mut self, now: Now, out: &mut Vec<Effect>) {
        let due = self.due(now, |e| e.cleanup_at);
        let mut forget = Vec::new();
        for name in due {
            let Some(mut entry) = self.apps.remove(&name) else {
                continue;
            };
            // A drained app that is up stays: the operator undrains it.
            if entry.source == Source::Http && !(entry.up && entry.drain == Drain::Drained) {
                if self.persisting.is_none() {
                    entry.cleanup_at = None;
                    forget.push(name.clone());
                }
            } else {
                // Consul apps stay while the catalog has them: forgetting one would only bring
                // it back at the next catalog read, which may be `consul_query_interval` away.
                info!(app = %name, "cleanup timer passed: removing vip and nat, still monitoring");
                entry.cleanup_at = None;
                self.remove(&mut entry, true, true, out);
            }
            self.apps.insert(name, entry);
        }
        if !forget.is_empty() {
            out.push(Effect::Persist(
                forget.iter().cloned().map(Change::Remove).collect(),
            ));
            self.persisting = Some(vec![Pending::Forget(forget)]);
        }
    }

    /// Publishes the owners if apps came or went, and the routes of the announced apps if
    /// they changed (a registration alone does not change them: a new app is down).
    fn publish(&mut self, out: &mut Vec<Effect>) {
        let owners = std::mem::take(&mut self.changed.owners);
        if !owners.is_empty() {
            out.push(Effect::PublishOwners(owners));
        }
        let dirty = std::mem::take(&mut self.changed.routes);
        if dirty.is_empty() {
            return;
        }
        let modified = if dirty.all {
            self.rebuild_routes()
        } else {
            self.update_routes(dirty.apps)
        };
        self.metrics.routes(self.routes.len());
        if modified {
            out.push(Effect::PublishRoutes(self.routes.clone()));
        }
        out.append(&mut self.after_publish);
    }

    /// Brings the named apps' routes up to date; whether the set changed.
    fn update_routes(&mut self, mut names: Vec<AppName>) -> bool {
        names.sort_unstable();
        names.dedup();
        // Every old route goes before any new one is added: within a batch, a prefix can pass
        // from an app that left to one that came.
        let mut gone: Vec<(IpNet, Route)> = names
            .iter()
            .filter_map(|name| self.route_of.remove(name))
            .filter_map(|prefix| self.routes.remove(&prefix).map(|r| (prefix, r)))
            .collect();
        let mut new: Vec<(IpNet, Route)> = names
            .iter()
            .filter_map(|name| self.apps.get(name))
            .filter(|e| e.routed())
            .map(|e| announced_route(e))
            .collect();
        for (prefix, route) in &new {
            self.route_of.insert(route.app.clone(), *prefix);
            self.routes.insert(*prefix, route.clone());
        }
        gone.sort_unstable_by_key(|(prefix, _)| *prefix);
        new.sort_unstable_by_key(|(prefix, _)| *prefix);
        gone != new
    }

    /// The route set from a walk over every app.
    fn walked_routes(&self) -> RouteSet {
        self.apps
            .values()
            .filter(|e| e.routed())
            .map(|e| announced_route(e))
            .collect()
    }

    /// Recomputes the route set from every app; whether it changed.
    fn rebuild_routes(&mut self) -> bool {
        let set = self.walked_routes();
        self.route_of = set.iter().map(|(p, r)| (r.app.clone(), *p)).collect();
        let modified = set != self.routes;
        self.routes = set;
        modified
    }

    /// Withdraws everything, waits for the peers, closes the sessions, removes every VIP, then
    /// the whole NAT chain at once (rule by rule would not fit the shutdown budget).
    fn shutdown(&mut self, out: &mut Vec<Effect>) {
        info!("shutting down: withdrawing all routes");
        self.shutting_down = true;
        for e in self.apps.values_mut() {
            e.announced = false;
        }
        self.changed.routes.all = true;
        self.publish(out);
        out.push(Effect::StopSpeaker);
        let names: Vec<AppName> = self.apps.keys().cloned().collect();
        for name in names {
            if let Some(mut entry) = self.apps.remove(&name) {
                // The NAT chain goes as a whole with the host.
                entry.spec.nats.clear();
                self.remove(&mut entry, true, false, out);
            }
        }
        out.push(Effect::ShutdownHost);
    }
}

fn watch(entry: &Entry, out: &mut Vec<Effect>) {
    out.push(Effect::Monitor(monitor::Command::Watch {
        app: entry.spec.name.clone(),
        generation: entry.generation,
        monitors: entry.spec.monitors.clone(),
        prove: entry.passive.needs_proof,
    }));
}

/// A monitor's verdict when it changes: INFO when a known verdict flips (what an on-call
/// engineer reads before the app's own "unhealthy: withdrawing"), DEBUG for the first one.
fn log_verdict(
    app: &AppName,
    monitor: &Monitor,
    before: Option<&MonitorResult>,
    now: &MonitorResult,
) {
    let verdict = if now.ok { "passing" } else { "failing" };
    match before {
        Some(b) if b.ok == now.ok => {}
        Some(_) => info!(app = %app, %monitor, reason = %now.reason, "monitor {verdict}"),
        None => debug!(app = %app, %monitor, reason = %now.reason, "monitor {verdict}"),
    }
}

#[cfg(test)]
mod tests {
    //! Table tests of the core: events in, effects out; no sockets, no tasks, no clock (time is
    //! a value the test moves).

    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::messages::{DrainReport, SyncReport};

    const CLEANUP: Duration = Duration::from_secs(10);
    const DRAIN: Duration = Duration::from_secs(3);
    const PASSIVE_WINDOW: Duration = Duration::from_secs(5);

    fn settings(rise: u32, fall: u32) -> Settings {
        Settings {
            monitor_rise: rise,
            monitor_fall: fall,
            cleanup_timer: CLEANUP,
            allow_http_exec: false,
            vip_allowlist: Vec::new(),
            drain_time: DRAIN,
            monitor: monitor::Settings {
                interval: Duration::from_secs(1),
                exec_timeout: Duration::from_secs(1),
                consul: None,
            },
            passive_health: true,
            passive_window: PASSIVE_WINDOW,
            protected: Vec::new(),
        }
    }

    fn spec(name: &str, vip: &str) -> AppSpec {
        AppSpec {
            name: name.parse().unwrap(),
            vip: vip.parse().unwrap(),
            monitors: vec!["port:tcp:80".parse().unwrap()],
            nats: vec!["tcp:80:8080".parse().unwrap()],
            communities: Vec::new(),
            nat_dest: None,
            passive_health: true,
        }
    }

    fn name(s: &str) -> AppName {
        s.parse().unwrap()
    }

    impl Core {
        /// The route set and the deadline index, kept up to date change by change, agree with
        /// a walk over every app (checked after every step of every test here).
        fn assert_indexes_agree(&mut self) {
            assert_eq!(self.routes, self.walked_routes(), "the published route set");
            let earliest = self
                .apps
                .values()
                .flat_map(|e| [e.cleanup_at, e.drain.until()])
                .flatten()
                .min();
            let paused = self.persisting.is_some() || self.shutting_down;
            assert_eq!(
                self.next_deadline(),
                earliest.filter(|_| !paused),
                "the next deadline"
            );
        }
    }

    /// A core, the time, and what it said last.
    struct T {
        core: Core,
        now: Now,
        out: Vec<Effect>,
        next_id: RequestId,
    }

    impl T {
        fn new(rise: u32, fall: u32, config: Vec<AppSpec>) -> Self {
            Self::with(settings(rise, fall), Vec::new(), config)
        }

        /// A core that knows the host's addresses `local` before it restores `config`, as
        /// the driver starts it.
        fn with(settings: Settings, local: Vec<Protected>, config: Vec<AppSpec>) -> Self {
            let mut core = Core::new(settings, Metrics::default());
            let mut out = Vec::new();
            core.step(
                Event::LocalAddresses(local),
                Now {
                    mono: Instant::now(),
                    wall: SystemTime::UNIX_EPOCH,
                },
                &mut out,
            );
            assert!(out.is_empty());
            let mut t = Self {
                core,
                now: Now {
                    mono: Instant::now(),
                    wall: SystemTime::UNIX_EPOCH,
                },
                out: Vec::new(),
                next_id: 1,
            };
            t.core
                .restore(config, Ok(Saved::default()), t.now, &mut t.out);
            t
        }

        /// Feeds an event, then flushes as the driver does after each batch; returns the effects.
        fn step(&mut self, event: Event) -> &[Effect] {
            self.out.clear();
            self.core.step(event, self.now, &mut self.out);
            self.core.flush(&mut self.out);
            self.core.assert_indexes_agree();
            &self.out
        }

        fn advance(&mut self, by: Duration) {
            self.now.mono += by;
        }

        fn id(&mut self) -> RequestId {
            self.next_id += 1;
            self.next_id
        }

        fn register(&mut self, spec: AppSpec, source: Source) -> &[Effect] {
            let id = self.id();
            self.step(Event::Register { id, spec, source })
        }

        /// The generation the monitors were last told for `app`.
        fn generation(&self, app: &str) -> u64 {
            self.core.apps[&name(app)].generation
        }

        fn report(&mut self, app: &str, ok: bool) -> &[Effect] {
            self.report_with(app, ok, None, false)
        }

        /// A report with the listener's reading (`stuck`) and whether it `proved` the service
        /// accepts.
        fn report_with(
            &mut self,
            app: &str,
            ok: bool,
            stuck: Option<&str>,
            proved: bool,
        ) -> &[Effect] {
            let generation = self.generation(app);
            let result = MonitorResult {
                ok,
                reason: if ok { "ok" } else { "refused" }.into(),
                at: SystemTime::UNIX_EPOCH,
                latency: Duration::ZERO,
            };
            self.step(Event::Report(Report {
                app: name(app),
                generation,
                results: vec![result],
                stuck: stuck.map(str::to_owned),
                proved,
            }))
        }

        /// Confirms (or fails) the host operation in the last effects.
        fn host_done(&mut self, ok: bool) -> &[Effect] {
            let done = self
                .out
                .iter()
                .find_map(|e| match e {
                    Effect::Host(op) => Some(done_for(op, ok)),
                    _ => None,
                })
                .expect("a host operation to answer");
            self.step(Event::HostDone(done))
        }

        fn view(&mut self, app: &str) -> AppView {
            self.core.apps[&name(app)].view(self.now, true)
        }

        /// Brings a registered app up: passing reports, host confirms.
        fn bring_up(&mut self, app: &str) {
            for _ in 0..self.core.settings.monitor_rise {
                self.report(app, true);
            }
            self.host_done(true);
            assert!(self.announced(app), "{app} announced");
        }

        fn announced(&self, app: &str) -> bool {
            self.core.apps[&name(app)].announced
        }
    }

    fn done_for(op: &HostOp, ok: bool) -> HostDone {
        let result =
            |attempted: bool| attempted.then(|| if ok { Ok(()) } else { Err("boom".into()) });
        match op {
            HostOp::Install {
                id,
                app,
                add_vip,
                nat,
                ..
            } => HostDone {
                id: *id,
                app: app.clone(),
                vip: result(*add_vip),
                nat: result(nat.is_some()),
            },
            HostOp::Remove {
                id,
                app,
                remove_vip,
                nat,
                ..
            } => HostDone {
                id: *id,
                app: app.clone(),
                vip: result(*remove_vip),
                nat: result(nat.is_some()),
            },
        }
    }

    fn routes(effects: &[Effect]) -> Option<Vec<String>> {
        effects.iter().rev().find_map(|e| match e {
            Effect::PublishRoutes(set) => Some(set.keys().map(ToString::to_string).collect()),
            _ => None,
        })
    }

    fn host_ops(effects: &[Effect]) -> Vec<&HostOp> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Host(op) => Some(op),
                _ => None,
            })
            .collect()
    }

    fn kinds(effects: &[Effect]) -> Vec<&'static str> {
        effects
            .iter()
            .map(|e| match e {
                Effect::Reply { .. } => "reply",
                Effect::Persist(_) => "persist",
                Effect::Monitor(monitor::Command::Watch { .. }) => "watch",
                Effect::Monitor(monitor::Command::Unwatch { .. }) => "unwatch",
                Effect::Monitor(monitor::Command::Configure(_)) => "configure",
                Effect::PublishRoutes(_) => "routes",
                Effect::PublishOwners(_) => "owners",
                Effect::Host(HostOp::Install { .. }) => "install",
                Effect::Host(HostOp::Remove { .. }) => "remove",
                Effect::StopSpeaker => "stop-speaker",
                Effect::ShutdownHost => "shutdown-host",
                Effect::Verify { .. } => "verify",
            })
            .collect()
    }

    fn app_reply(effects: &[Effect]) -> &Result<AppView, LifecycleError> {
        effects
            .iter()
            .find_map(|e| match e {
                Effect::Reply {
                    reply: Reply::App(r),
                    ..
                } => Some(&**r),
                _ => None,
            })
            .expect("a reply")
    }

    #[test]
    fn rise_needs_consecutive_passes_and_the_hosts_confirmation_before_announcing() {
        let mut t = T::new(2, 2, vec![spec("web", "192.0.2.10/32")]);
        assert!(
            host_ops(t.report("web", true)).is_empty(),
            "one pass of two"
        );
        assert!(host_ops(t.report("web", false)).is_empty());
        t.report("web", true);
        let effects = t.report("web", true);
        assert_eq!(
            host_ops(effects),
            [&HostOp::Install {
                id: 1,
                app: name("web"),
                vip: "192.0.2.10/32".parse().unwrap(),
                label: "lo:web".into(),
                add_vip: true,
                nat: Some(NatSpec {
                    rules: vec!["tcp:80:8080".parse().unwrap()],
                    dest: None,
                }),
            }]
        );
        assert_eq!(
            routes(effects),
            None,
            "not announced before the host confirms"
        );
        assert!(!t.announced("web"));
        let effects = t.host_done(true);
        assert_eq!(routes(effects).unwrap(), ["192.0.2.10/32"]);
        assert_eq!(t.view("web").state, "healthy");
    }

    #[test]
    fn fall_withdraws_at_once_and_keeps_the_vip_until_cleanup() {
        let mut t = T::new(1, 2, vec![spec("web", "192.0.2.10/32")]);
        t.bring_up("web");
        assert_eq!(routes(t.report("web", false)), None, "one failure of two");
        let effects = t.report("web", false);
        assert_eq!(routes(effects).unwrap(), Vec::<String>::new());
        assert!(host_ops(effects).is_empty(), "the vip stays on lo");
        assert_eq!(t.core.next_deadline(), Some(t.now.mono + CLEANUP));
        assert!(t.view("web").vip_installed);
    }

    #[test]
    fn recovery_before_cleanup_only_puts_the_route_back() {
        let mut t = T::new(1, 1, vec![spec("web", "192.0.2.10/32")]);
        t.bring_up("web");
        t.report("web", false);
        let effects = t.report("web", true);
        assert!(host_ops(effects).is_empty(), "vip and nat are still there");
        assert_eq!(routes(effects).unwrap(), ["192.0.2.10/32"]);
        assert_eq!(t.core.next_deadline(), None);
    }

    #[test]
    fn a_failed_install_is_not_announced_is_shown_and_is_retried_on_the_next_pass() {
        let mut t = T::new(1, 1, vec![spec("web", "192.0.2.10/32")]);
        t.report("web", true);
        let effects = t.host_done(false);
        assert_eq!(routes(effects), None);
        let view = t.view("web");
        assert_eq!(view.state, "unhealthy");
        assert_eq!(view.last_error.as_deref(), Some("boom"));
        let effects = t.report("web", true);
        assert_eq!(kinds(effects), ["install"]);
        t.host_done(true);
        assert!(t.announced("web"));
        assert_eq!(t.view("web").last_error, None);
    }

    #[test]
    fn a_config_app_loses_vip_and_nat_at_cleanup_after_its_withdrawal_and_stays() {
        let mut t = T::new(1, 1, vec![spec("web", "192.0.2.10/32")]);
        t.bring_up("web");
        t.report("web", false);
        t.advance(CLEANUP);
        let effects = t.step(Event::Deadline);
        assert_eq!(
            host_ops(effects),
            [&HostOp::Remove {
                id: 2,
                app: name("web"),
                vip: "192.0.2.10/32".parse().unwrap(),
                remove_vip: true,
                nat: Some(NatSpec {
                    rules: vec!["tcp:80:8080".parse().unwrap()],
                    dest: None,
                }),
                after_withdrawal: true,
            }]
        );
        t.host_done(true);
        assert!(!t.view("web").vip_installed);
        assert_eq!(t.core.next_deadline(), None);
        // Still monitored: it comes back by itself.
        assert_eq!(kinds(t.report("web", true)), ["install"]);
    }

    #[test]
    fn an_http_registration_changes_nothing_until_the_state_file_has_it() {
        let mut t = T::new(1, 1, vec![spec("web", "192.0.2.10/32")]);
        let effects = t.register(spec("api", "192.0.2.20/32"), Source::Http);
        assert_eq!(kinds(effects), ["persist"]);
        let Effect::Persist(saved) = &effects[0] else {
            unreachable!()
        };
        assert_eq!(saved, &[Change::Put(spec("api", "192.0.2.20/32"))]);
        // Meanwhile: a second request waits; monitor reports go on.
        assert!(
            t.register(spec("db", "192.0.2.30/32"), Source::Http)
                .is_empty()
        );
        t.report("web", true);
        assert_eq!(kinds(&t.out), ["install"]);
        let effects = t.step(Event::Persisted(Ok(())));
        // A new app is down: its owner is published, the route set has not changed.
        assert_eq!(kinds(effects), ["watch", "reply", "persist", "owners"]);
        assert!(app_reply(effects).is_ok());
        let Effect::Persist(saved) = &effects[2] else {
            unreachable!()
        };
        assert_eq!(
            saved,
            &[Change::Put(spec("db", "192.0.2.30/32"))],
            "only db"
        );
        let effects = t.step(Event::Persisted(Err(StoreError::Io {
            op: "write",
            path: "/state".into(),
            source: std::io::Error::other("disk full"),
        })));
        assert!(matches!(app_reply(effects), Err(LifecycleError::Store(_))));
        assert!(
            !t.core.apps.contains_key(&name("db")),
            "refused: nothing changed"
        );
    }

    #[test]
    fn an_http_app_is_forgotten_only_once_the_state_file_no_longer_has_it() {
        let mut t = T::new(1, 1, Vec::new());
        t.register(spec("api", "192.0.2.20/32"), Source::Http);
        t.step(Event::Persisted(Ok(())));
        t.report("api", false);
        t.advance(CLEANUP);
        let effects = t.step(Event::Deadline);
        assert_eq!(kinds(effects), ["persist"]);
        assert!(t.core.apps.contains_key(&name("api")));
        let effects = t.step(Event::Persisted(Ok(())));
        // It was never announced: no route to withdraw.
        assert_eq!(kinds(effects), ["unwatch", "owners"]);
        assert!(!t.core.apps.contains_key(&name("api")));
    }

    #[test]
    fn a_failed_removal_write_keeps_the_http_app_and_tries_again_later() {
        let mut t = T::new(1, 1, Vec::new());
        t.register(spec("api", "192.0.2.20/32"), Source::Http);
        t.step(Event::Persisted(Ok(())));
        t.report("api", false);
        t.advance(CLEANUP);
        t.step(Event::Deadline);
        t.step(Event::Persisted(Err(StoreError::Io {
            op: "write",
            path: "/state".into(),
            source: std::io::Error::other("read-only"),
        })));
        assert!(t.core.apps.contains_key(&name("api")));
        assert_eq!(t.core.next_deadline(), Some(t.now.mono + CLEANUP));
    }

    #[test]
    fn unregistering_withdraws_then_removes_the_vip_then_answers() {
        let mut t = T::new(1, 1, Vec::new());
        t.register(spec("api", "192.0.2.20/32"), Source::Http);
        t.step(Event::Persisted(Ok(())));
        t.bring_up("api");
        let id = t.id();
        let effects = t.step(Event::Unregister {
            id,
            name: name("api"),
        });
        assert_eq!(kinds(effects), ["persist"]);
        let effects = t.step(Event::Persisted(Ok(())));
        assert_eq!(kinds(effects), ["unwatch", "owners", "routes", "remove"]);
        assert_eq!(routes(effects).unwrap(), Vec::<String>::new());
        assert!(matches!(
            host_ops(effects)[0],
            HostOp::Remove {
                remove_vip: true,
                after_withdrawal: true,
                ..
            }
        ));
        // The answer waits for the host: a 200 means the VIP and NAT rules are gone.
        let effects = t.host_done(true);
        assert_eq!(kinds(effects), ["reply"]);
        assert!(app_reply(effects).is_ok());
    }

    #[test]
    fn config_and_consul_apps_cannot_be_unregistered_over_http() {
        let mut t = T::new(1, 1, vec![spec("web", "192.0.2.10/32")]);
        t.register(spec("svc", "192.0.2.30/32"), Source::Consul);
        for (app, want) in [("web", "config file"), ("svc", "Consul catalog")] {
            let id = t.id();
            let effects = t.step(Event::Unregister {
                id,
                name: name(app),
            });
            assert_eq!(kinds(effects), ["reply"]);
            let err = app_reply(effects).as_ref().unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        }
        assert_eq!(t.core.apps.len(), 2);
    }

    #[test]
    fn shutdown_withdraws_then_stops_the_speaker_then_removes_vips_then_cleans_the_host() {
        let mut t = T::new(
            1,
            1,
            vec![spec("web", "192.0.2.10/32"), spec("api", "192.0.2.20/32")],
        );
        t.bring_up("web");
        t.bring_up("api");
        let effects = t.step(Event::Shutdown);
        assert_eq!(
            kinds(effects),
            [
                "routes",
                "stop-speaker",
                "remove",
                "remove",
                "shutdown-host"
            ]
        );
        assert_eq!(routes(effects).unwrap(), Vec::<String>::new());
        for op in host_ops(effects) {
            assert!(matches!(
                op,
                HostOp::Remove {
                    remove_vip: true,
                    nat: None,
                    ..
                }
            ));
        }
        let id = t.id();
        assert!(
            t.step(Event::Apps { id }).is_empty(),
            "nothing after shutdown"
        );
    }

    #[test]
    fn conflicting_registrations_are_refused_and_change_nothing() {
        let mut t = T::new(1, 1, vec![spec("web", "192.0.2.10/32")]);
        for (bad, want) in [
            (spec("other", "192.0.2.10/32"), "is already used by app web"),
            (spec("wide", "192.0.2.0/24"), "overlaps vip"),
            (
                spec("web", "192.0.2.11/32"),
                "is defined in the config file",
            ),
        ] {
            let effects = t.register(bad, Source::Consul);
            assert_eq!(kinds(effects), ["reply"]);
            let err = app_reply(effects).as_ref().unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        }
        let mut exec = spec("x", "192.0.2.40/32");
        exec.monitors = vec!["exec:true".parse().unwrap()];
        let effects = t.register(exec, Source::Http);
        assert!(matches!(
            app_reply(effects),
            Err(LifecycleError::ExecRefused)
        ));
        assert_eq!(t.core.apps.len(), 1);
    }

    #[test]
    fn conflicts_are_found_through_the_index_after_churn_and_a_wide_vip_covers_later_ones() {
        let mut t = T::new(1, 1, vec![spec("wide", "192.0.2.0/28")]);
        let effects = t.register(spec("inside", "192.0.2.5/32"), Source::Consul);
        let err = app_reply(effects).as_ref().unwrap_err().to_string();
        assert!(err.contains("overlaps vip"), "{err}");
        // Apps come and go (stale index entries pile up and the index is rebuilt); a freed
        // VIP is free, a taken one is still refused.
        for round in 0..100 {
            let id = t.id();
            let apps = vec![spec(&format!("c{round}"), "192.0.2.100/32")];
            t.step(Event::SyncConsul {
                id,
                apps,
                keep: Vec::new(),
            });
        }
        assert!(t.core.conflicts.len() <= 4 * t.core.apps.len() + 64);
        let effects = t.register(spec("late", "192.0.2.100/32"), Source::Http);
        let err = app_reply(effects).as_ref().unwrap_err().to_string();
        assert!(err.contains("is already used by app c99"), "{err}");
        let effects = t.register(spec("free", "192.0.2.101/32"), Source::Http);
        assert_eq!(kinds(effects), ["persist"]);
    }

    #[test]
    fn consul_passes_swap_vips_between_two_services() {
        let mut t = T::new(1, 1, Vec::new());
        let id = t.id();
        t.step(Event::SyncConsul {
            id,
            apps: vec![spec("a", "192.0.2.1/32"), spec("b", "192.0.2.2/32")],
            keep: Vec::new(),
        });
        let id = t.id();
        let effects = t.step(Event::SyncConsul {
            id,
            apps: vec![spec("a", "192.0.2.2/32"), spec("b", "192.0.2.1/32")],
            keep: Vec::new(),
        });
        let refused = effects.iter().find_map(|e| match e {
            Effect::Reply {
                reply: Reply::Consul(r),
                ..
            } => Some(r),
            _ => None,
        });
        assert!(refused.unwrap().is_empty());
        assert_eq!(t.core.apps[&name("a")].spec.vip.to_string(), "192.0.2.2/32");
        assert_eq!(t.core.apps[&name("b")].spec.vip.to_string(), "192.0.2.1/32");
    }

    #[test]
    fn a_nat_change_keeps_the_route_and_a_superseded_result_is_ignored() {
        let mut t = T::new(1, 1, Vec::new());
        let mut consul = spec("web", "192.0.2.10/32");
        t.register(consul.clone(), Source::Consul);
        t.bring_up("web");
        consul.nats = vec!["tcp:443:8443".parse().unwrap()];
        let effects = kinds(t.register(consul, Source::Consul));
        // The route itself is unchanged: no new route set is published.
        assert_eq!(effects, ["remove", "watch", "install", "reply", "owners"]);
        let ops: Vec<HostOp> = host_ops(&t.out).into_iter().cloned().collect();
        // The removal of the old rules succeeds, the new rules fail: withdrawn.
        t.step(Event::HostDone(done_for(&ops[0], true)));
        assert!(t.announced("web"), "the old rules' removal changes nothing");
        let effects = t.step(Event::HostDone(done_for(&ops[1], false)));
        assert_eq!(routes(effects).unwrap(), Vec::<String>::new());
    }

    /// Whether the effects ask the monitors to prove that `app` accepts (`Some(prove)` for a
    /// watch of it).
    fn prove(effects: &[Effect], app: &str) -> Option<bool> {
        effects.iter().rev().find_map(|e| match e {
            Effect::Monitor(monitor::Command::Watch { app: a, prove, .. }) if a.as_str() == app => {
                Some(*prove)
            }
            _ => None,
        })
    }

    fn failing(app: &str) -> Event {
        Event::PassiveHealth(vec![(name(app), Verdict::Failing("no SYN-ACK".into()))])
    }

    #[test]
    fn a_passive_failure_withdraws_and_comes_back_after_the_hold_down_on_proof_only() {
        let mut t = T::new(1, 1, vec![spec("web", "192.0.2.10/32")]);
        t.bring_up("web");
        let effects = t.step(failing("web"));
        assert_eq!(routes(effects).unwrap(), Vec::<String>::new());
        assert_eq!(
            prove(effects, "web"),
            Some(true),
            "the monitors are asked for proof"
        );
        assert_eq!(
            routes(t.report_with("web", true, None, true)),
            None,
            "monitors cannot bring it back while the traffic fails it"
        );
        t.step(Event::PassiveHealth(vec![(name("web"), Verdict::Cleared)]));
        assert_eq!(
            routes(t.report_with("web", true, None, true)),
            None,
            "held down"
        );
        t.advance(PASSIVE_WINDOW);
        assert_eq!(routes(t.report("web", true)), None, "a check without proof");
        let effects = t.report_with("web", true, None, true);
        assert_eq!(
            prove(effects, "web"),
            Some(false),
            "proved: no more proof asked"
        );
        assert!(t.announced("web"), "VIP and NAT stayed: announced at once");
        let view = t.core.view(&name("web"), t.now).unwrap();
        let passive = view.passive_health.unwrap();
        assert_eq!((passive.state, passive.failures), ("ok", 1));
        assert_eq!((passive.hold_down_s, passive.awaiting_proof), (None, false));
    }

    #[test]
    fn a_full_accept_queue_withdraws_an_app_with_passive_health_until_it_accepts() {
        let mut plain = spec("plain", "192.0.2.11/32");
        plain.passive_health = false;
        let mut t = T::new(1, 1, vec![spec("web", "192.0.2.10/32"), plain]);
        t.bring_up("web");
        t.bring_up("plain");
        let stuck = Some("tcp port 80 listens but does not accept");
        let effects = t.report_with("web", true, stuck, false);
        assert_eq!(routes(effects).unwrap(), ["192.0.2.11/32"]);
        t.report_with("plain", true, stuck, false);
        assert!(
            t.announced("plain"),
            "no passive health: the open port passes"
        );
        // No traffic reaches a withdrawn VIP, but the queue stays full: no flapping.
        for _ in 0..10 {
            t.advance(PASSIVE_WINDOW);
            assert_eq!(routes(t.report_with("web", true, stuck, true)), None);
        }
        let view = t.core.view(&name("web"), t.now).unwrap();
        let passive = view.passive_health.unwrap();
        assert_eq!(passive.state, "failing");
        assert!(passive.reason.unwrap().contains("does not accept"));
        assert!(passive.awaiting_proof);
        t.report_with("web", true, None, true);
        assert!(t.announced("web"), "back once it accepts");
    }

    #[test]
    fn repeated_passive_failures_hold_down_twice_as_long_up_to_eight_windows() {
        let mut t = T::new(1, 1, vec![spec("web", "192.0.2.10/32")]);
        t.bring_up("web");
        let mut holds = Vec::new();
        for _ in 0..5 {
            t.step(failing("web"));
            t.step(Event::PassiveHealth(vec![(name("web"), Verdict::Cleared)]));
            let view = t.core.view(&name("web"), t.now).unwrap();
            let hold = view.passive_health.unwrap().hold_down_s.unwrap();
            holds.push(hold / PASSIVE_WINDOW.as_secs_f64());
            t.advance(Duration::from_secs_f64(hold));
            t.report_with("web", true, None, true);
            assert!(t.announced("web"));
            t.advance(PASSIVE_WINDOW);
        }
        assert_eq!(holds, [1.0, 2.0, 4.0, 8.0, 8.0]);
        // Announced for the stable period: the next failure counts as the first again.
        t.advance(PASSIVE_WINDOW * super::super::passive::STABLE_FACTOR);
        t.step(failing("web"));
        let view = t.core.view(&name("web"), t.now).unwrap();
        let passive = view.passive_health.unwrap();
        assert_eq!(passive.failures, 1);
        assert_eq!(passive.hold_down_s, Some(PASSIVE_WINDOW.as_secs_f64()));
    }

    #[test]
    fn a_stalled_host_operation_does_not_hold_up_another_apps_withdrawal() {
        let mut t = T::new(
            1,
            1,
            vec![spec("web", "192.0.2.10/32"), spec("api", "192.0.2.20/32")],
        );
        t.bring_up("web");
        t.report("api", true);
        assert_eq!(kinds(&t.out), ["install"], "api's install never answers");
        let effects = t.report("web", false);
        assert_eq!(routes(effects).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn requests_are_answered_in_order_after_a_write() {
        let mut t = T::new(1, 1, Vec::new());
        t.register(spec("api", "192.0.2.20/32"), Source::Http);
        let id = t.id();
        assert!(
            t.step(Event::Unregister {
                id,
                name: name("api"),
            })
            .is_empty()
        );
        // The registration completes, then the removal asks for its own write.
        let effects = t.step(Event::Persisted(Ok(())));
        // A new app is down: its owner is published, the route set has not changed.
        assert_eq!(kinds(effects), ["watch", "reply", "persist", "owners"]);
        let effects = t.step(Event::Persisted(Ok(())));
        // Never announced and nothing on the host: answered at once, the owner goes after.
        assert_eq!(kinds(effects), ["unwatch", "reply", "owners"]);
    }

    fn routes_with_drain(effects: &[Effect]) -> Option<Vec<(String, bool)>> {
        effects.iter().rev().find_map(|e| match e {
            Effect::PublishRoutes(set) => Some(
                set.iter()
                    .map(|(prefix, route)| (prefix.to_string(), route.drain))
                    .collect(),
            ),
            _ => None,
        })
    }

    fn reload_report(effects: &[Effect]) -> &SyncReport {
        effects
            .iter()
            .find_map(|e| match e {
                Effect::Reply {
                    reply: Reply::Reload(r),
                    ..
                } => Some(r),
                _ => None,
            })
            .expect("a reload reply")
    }

    fn drain_reply(effects: &[Effect]) -> &Result<DrainReport, LifecycleError> {
        effects
            .iter()
            .find_map(|e| match e {
                Effect::Reply {
                    reply: Reply::Drain(r),
                    ..
                } => Some(r),
                _ => None,
            })
            .expect("a drain reply")
    }

    impl T {
        fn drain(&mut self, app: Option<&str>, drain: bool) -> &[Effect] {
            let id = self.id();
            self.step(Event::Drain {
                id,
                app: app.map(name),
                drain,
            })
        }
    }

    #[test]
    fn a_reload_syncs_config_apps_and_never_touches_http_apps() {
        let mut t = T::new(
            1,
            1,
            vec![spec("web", "192.0.2.10/32"), spec("api", "192.0.2.20/32")],
        );
        t.bring_up("web");
        t.register(spec("h", "192.0.2.30/32"), Source::Http);
        t.step(Event::Persisted(Ok(())));
        let mut web = spec("web", "192.0.2.10/32");
        web.communities = vec!["65000:7".parse().unwrap()];
        let mut new_settings = settings(3, 1);
        new_settings.cleanup_timer = Duration::from_secs(99);
        let id = t.id();
        let effects = t.step(Event::Reload {
            id,
            settings: Box::new(new_settings),
            apps: vec![
                web,
                spec("db", "192.0.2.40/32"),
                spec("h", "192.0.2.50/32"),
                spec("clash", "192.0.2.30/32"),
            ],
        });
        assert_eq!(kinds(&effects[..1]), ["configure"]);
        let report = reload_report(effects);
        assert_eq!(report.added, [name("db")]);
        assert_eq!(report.changed, [name("web")]);
        assert_eq!(report.removed, [name("api")]);
        let refused: Vec<_> = report.refused.iter().map(|r| r.app.as_str()).collect();
        assert_eq!(refused, ["clash", "h"], "{report:?}");
        // The changed app kept its route, now with the new community; the HTTP app is as it was.
        let routes = routes(effects).unwrap();
        assert_eq!(routes, ["192.0.2.10/32"]);
        assert!(
            !host_ops(effects)
                .iter()
                .any(|op| matches!(op, HostOp::Remove { app, .. } if app.as_str() == "web"))
        );
        assert_eq!(t.core.apps[&name("h")].source, Source::Http);
        assert_eq!(
            t.core.apps[&name("h")].spec.vip.to_string(),
            "192.0.2.30/32"
        );
        assert_eq!(t.core.settings.monitor_rise, 3);
    }

    /// The replies in `effects`: request id and whether it succeeded.
    fn app_replies(effects: &[Effect]) -> Vec<(RequestId, bool)> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Reply {
                    id,
                    reply: Reply::App(r),
                } => Some((*id, r.is_ok())),
                _ => None,
            })
            .collect()
    }

    fn persisted(effects: &[Effect]) -> Vec<&Vec<Change>> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Persist(changes) => Some(changes),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn registrations_that_waited_for_a_write_are_saved_together_in_the_next_one() {
        let mut t = T::new(1, 1, vec![]);
        t.register(spec("a", "192.0.2.1/32"), Source::Http);
        let waiting: Vec<RequestId> = (2..=5)
            .map(|i| {
                let id = t.id();
                let spec = spec(&format!("app{i}"), &format!("192.0.2.{i}/32"));
                let effects = t.step(Event::Register {
                    id,
                    spec,
                    source: Source::Http,
                });
                assert!(effects.is_empty(), "waits for the write in flight");
                id
            })
            .collect();
        let effects = t.step(Event::Persisted(Ok(())));
        assert_eq!(app_replies(effects).len(), 1, "only a's write is done");
        let batch = persisted(effects);
        assert_eq!(batch.len(), 1, "one write for all four");
        assert_eq!(batch[0].len(), 4);
        let effects = t.step(Event::Persisted(Ok(())));
        let replies = app_replies(effects);
        assert_eq!(
            replies,
            waiting.iter().map(|id| (*id, true)).collect::<Vec<_>>(),
            "answered in order"
        );
        assert!(persisted(effects).is_empty());
        assert_eq!(t.core.apps.len(), 5);
    }

    #[test]
    fn a_request_touching_an_app_or_vip_of_the_batch_waits_for_the_next_write() {
        let mut t = T::new(1, 1, vec![]);
        t.register(spec("a", "192.0.2.1/32"), Source::Http);
        t.register(spec("b", "192.0.2.2/32"), Source::Http);
        let id = t.id();
        t.step(Event::Unregister {
            id,
            name: name("b"),
        });
        // Same VIP as b: refused while b exists, as one after the other would decide.
        t.register(spec("c", "192.0.2.2/32"), Source::Http);
        let effects = t.step(Event::Persisted(Ok(())));
        assert_eq!(
            persisted(effects),
            [&vec![Change::Put(spec("b", "192.0.2.2/32"))]]
        );
        let effects = t.step(Event::Persisted(Ok(())));
        assert_eq!(persisted(effects), [&vec![Change::Remove(name("b"))]]);
        let effects = t.step(Event::Persisted(Ok(())));
        assert_eq!(
            persisted(effects),
            [&vec![Change::Put(spec("c", "192.0.2.2/32"))]],
            "c's VIP is free once b is gone"
        );
        t.step(Event::Persisted(Ok(())));
        assert!(t.core.apps.contains_key(&name("c")) && !t.core.apps.contains_key(&name("b")));
    }

    #[test]
    fn a_failed_group_write_refuses_every_request_of_the_batch() {
        let mut t = T::new(1, 1, vec![]);
        t.register(spec("a", "192.0.2.1/32"), Source::Http);
        t.register(spec("b", "192.0.2.2/32"), Source::Http);
        t.register(spec("c", "192.0.2.3/32"), Source::Http);
        t.step(Event::Persisted(Ok(())));
        let effects = t.step(Event::Persisted(Err(StoreError::Io {
            op: "write",
            path: "/state".into(),
            source: std::io::Error::other("disk full"),
        })));
        let replies = app_replies(effects);
        assert_eq!(replies.len(), 2);
        assert!(replies.iter().all(|(_, ok)| !ok), "{replies:?}");
        assert_eq!(t.core.apps.len(), 1, "only a");
    }

    #[test]
    fn a_drained_app_is_announced_with_graceful_shutdown_then_withdrawn_and_keeps_its_vip() {
        let mut t = T::new(1, 1, vec![spec("web", "192.0.2.10/32")]);
        t.bring_up("web");
        let effects = t.drain(Some("web"), true);
        assert_eq!(kinds(effects), ["persist"], "saved before it takes effect");
        let Effect::Persist(saved) = &effects[0] else {
            unreachable!()
        };
        assert_eq!(
            saved,
            &[Change::Drain {
                drained: vec![name("web")],
                host_drained: false
            }]
        );
        let effects = t.step(Event::Persisted(Ok(())));
        assert_eq!(
            routes_with_drain(effects).unwrap(),
            [("192.0.2.10/32".to_owned(), true)]
        );
        assert_eq!(
            drain_reply(effects).as_ref().unwrap().apps[0].drain,
            Some("draining")
        );
        assert_eq!(t.core.next_deadline(), Some(t.now.mono + DRAIN));
        t.advance(DRAIN);
        let effects = t.step(Event::Deadline);
        assert_eq!(routes(effects).unwrap(), Vec::<String>::new());
        assert!(
            host_ops(effects).is_empty(),
            "the vip stays for connections in flight"
        );
        assert_eq!(t.view("web").drain, Some("drained"));
        // Passing reports do not bring it back while drained.
        assert_eq!(routes(t.report("web", true)), None);
        t.advance(CLEANUP);
        let effects = t.step(Event::Deadline);
        assert!(matches!(
            host_ops(effects)[..],
            [HostOp::Remove {
                remove_vip: true,
                ..
            }]
        ));
        t.host_done(true);
        assert!(t.core.apps.contains_key(&name("web")));
        // Undrain: installed again, then announced without GRACEFUL_SHUTDOWN.
        t.drain(Some("web"), false);
        let effects = t.step(Event::Persisted(Ok(())));
        assert!(drain_reply(effects).is_ok());
        let effects = t.report("web", true);
        assert_eq!(kinds(effects), ["install"]);
        let effects = t.host_done(true);
        assert_eq!(
            routes_with_drain(effects).unwrap(),
            [("192.0.2.10/32".to_owned(), false)]
        );
    }

    #[test]
    fn an_undrain_during_the_drain_time_keeps_the_route() {
        let mut t = T::new(1, 1, vec![spec("web", "192.0.2.10/32")]);
        t.bring_up("web");
        t.drain(None, true);
        t.step(Event::Persisted(Ok(())));
        t.drain(None, false);
        let effects = t.step(Event::Persisted(Ok(())));
        assert_eq!(
            routes_with_drain(effects).unwrap(),
            [("192.0.2.10/32".to_owned(), false)]
        );
        assert_eq!(t.core.next_deadline(), None);
    }

    #[test]
    fn a_host_drain_is_restored_and_covers_new_apps() {
        let mut t = T::new(1, 1, Vec::new());
        t.core.restore(
            vec![spec("web", "192.0.2.10/32")],
            Ok(Saved {
                host_drained: true,
                ..Saved::default()
            }),
            t.now,
            &mut t.out,
        );
        assert!(
            host_ops(t.report("web", true)).is_empty(),
            "drained: not even installed"
        );
        t.register(spec("new", "192.0.2.20/32"), Source::Consul);
        assert_eq!(routes(t.report("new", true)), None);
        assert_eq!(t.view("new").drain, Some("drained"));
        let effects = t.drain(Some("nope"), true);
        assert!(matches!(
            drain_reply(effects),
            Err(LifecycleError::UnknownApp(_))
        ));
    }
    #[test]
    fn saved_registrations_pass_the_http_policy_again_at_restore() {
        let exec = |name: &str, vip: &str| {
            let mut s = spec(name, vip);
            s.monitors = vec!["exec:touch /tmp/gocast-should-not-run".parse().unwrap()];
            s
        };
        // (allow_http_exec, vip_allowlist, saved app, restored?)
        for (allow_exec, allowlist, app, restored) in [
            (false, "", exec("x", "192.0.2.1/32"), false),
            (true, "", exec("x", "192.0.2.1/32"), true),
            (false, "", spec("p", "192.0.2.1/32"), true),
            (false, "198.51.100.0/24", spec("p", "192.0.2.1/32"), false),
            (false, "192.0.2.0/24", spec("p", "192.0.2.1/32"), true),
        ] {
            let mut settings = settings(1, 1);
            settings.allow_http_exec = allow_exec;
            settings.vip_allowlist = allowlist.parse().into_iter().collect();
            let mut core = Core::new(settings, Metrics::default());
            let mut out = Vec::new();
            let now = Now {
                mono: Instant::now(),
                wall: SystemTime::UNIX_EPOCH,
            };
            let name = app.name.clone();
            let saved = Saved {
                apps: vec![app],
                ..Saved::default()
            };
            core.restore(Vec::new(), Ok(saved), now, &mut out);
            assert_eq!(
                core.apps.contains_key(&name),
                restored,
                "allow_http_exec {allow_exec}, allowlist {allowlist:?}, app {name}"
            );
            if !restored {
                assert!(
                    !out.iter()
                        .any(|e| matches!(e, Effect::Monitor(monitor::Command::Watch { .. }))),
                    "nothing of a dropped app is watched: {:?}",
                    kinds(&out)
                );
            }
        }
    }

    /// Self-repair (docs/design.md, "Self-repair"): verification results in, repairs out.
    mod repair {
        use super::*;
        use crate::{
            app::Vip,
            lifecycle::events::{Drift, Expected, Part, RepairKind, VerifyId},
        };

        fn vip(s: &str) -> Vip {
            s.parse().unwrap()
        }

        /// The NAT rules `spec` gives every app.
        fn nat80() -> NatSpec {
            NatSpec {
                rules: vec!["tcp:80:8080".parse().unwrap()],
                dest: None,
            }
        }

        fn lost(app: &str, at: &str, part: Part) -> Drift {
            let what = match part {
                Part::Vip => "vip missing from lo",
                Part::Nat(_) => "nat rules missing",
            };
            Drift::App {
                app: name(app),
                vip: vip(at),
                part,
                what: what.into(),
            }
        }

        impl T {
            /// Asks for a verification; returns what the host worker is to check.
            fn verify(&mut self) -> (VerifyId, Vec<Expected>) {
                let effects = self.step(Event::VerifyDue { vips: true });
                match effects {
                    [Effect::Verify { id, expected }] => (*id, expected.clone()),
                    other => panic!("expected one verification, got {:?}", kinds(other)),
                }
            }

            fn last_repair(&mut self, app: &str) -> (u64, String, String) {
                let view = self.view(app);
                let last = view.last_repair.expect("a repair");
                (view.repairs, last.what, last.result)
            }

            fn metric(&self, line: &str) -> bool {
                self.core.metrics.render().lines().any(|l| l == line)
            }
        }

        #[test]
        fn only_parts_that_are_present_are_verified() {
            let mut t = T::new(
                1,
                1,
                vec![spec("web", "192.0.2.10/32"), spec("api", "192.0.2.20/32")],
            );
            let web = |nat| {
                [Expected {
                    app: name("web"),
                    vip: vip("192.0.2.10/32"),
                    on_lo: true,
                    nat,
                }]
            };
            let install = host_ops(t.report("web", true))[0].clone();
            let (id, expected) = t.verify();
            // Its VIP is checked (the host checks after the add), its rules not yet.
            assert_eq!(expected, web(None), "web's install is in flight");
            t.step(Event::Verified {
                id,
                drift: Vec::new(),
            });
            t.step(Event::HostDone(done_for(&install, true)));
            let (_, expected) = t.verify();
            assert_eq!(expected, web(Some(nat80())));
        }

        #[test]
        fn a_vip_found_missing_is_put_back_while_the_app_stays_announced() {
            let mut t = T::new(1, 1, vec![spec("web", "192.0.2.10/32")]);
            t.bring_up("web");
            let (id, _) = t.verify();
            let effects = t.step(Event::Verified {
                id,
                drift: vec![lost("web", "192.0.2.10/32", Part::Vip)],
            });
            assert_eq!(
                host_ops(effects),
                [&HostOp::Install {
                    id: 2,
                    app: name("web"),
                    vip: vip("192.0.2.10/32"),
                    label: "lo:web".into(),
                    add_vip: true,
                    nat: None,
                }],
                "only the vip, and the nat stays"
            );
            assert_eq!(routes(effects), None, "no flap while it is put back");
            assert!(t.announced("web"));
            assert_eq!(
                t.last_repair("web"),
                (1, "vip missing from lo".into(), "repairing".into())
            );
            t.host_done(true);
            assert_eq!(t.last_repair("web").2, "repaired");
            assert!(t.announced("web"));
            assert!(t.metric("gocast_repairs_total{kind=\"vip\"} 1"));
            assert!(t.metric("gocast_repair_failures_total{kind=\"vip\"} 0"));
        }

        #[test]
        fn a_repair_that_fails_withdraws_the_app_and_says_why() {
            let mut t = T::new(1, 1, vec![spec("web", "192.0.2.10/32")]);
            t.bring_up("web");
            let (id, _) = t.verify();
            t.step(Event::Verified {
                id,
                drift: vec![lost("web", "192.0.2.10/32", Part::Nat(nat80()))],
            });
            let effects = t.host_done(false);
            assert_eq!(routes(effects).unwrap(), Vec::<String>::new());
            let view = t.view("web");
            assert_eq!(view.state, "unhealthy");
            assert_eq!(view.last_error.as_deref(), Some("boom"));
            assert_eq!(t.last_repair("web").2, "failed: boom");
            assert!(t.metric("gocast_repair_failures_total{kind=\"nat\"} 1"));
            // Still up: the next passing report installs it again and it is announced.
            assert_eq!(kinds(t.report("web", true)), ["install"]);
            t.host_done(true);
            assert!(t.announced("web"));
            assert_eq!(t.last_repair("web").2, "failed: boom", "history stays");
        }

        #[test]
        fn a_vip_and_nat_lost_together_come_back_in_one_operation() {
            let mut t = T::new(1, 1, vec![spec("web", "192.0.2.10/32")]);
            t.bring_up("web");
            let (id, _) = t.verify();
            let effects = t.step(Event::Verified {
                id,
                drift: vec![
                    lost("web", "192.0.2.10/32", Part::Vip),
                    lost("web", "192.0.2.10/32", Part::Nat(nat80())),
                ],
            });
            assert!(matches!(
                host_ops(effects)[..],
                [HostOp::Install {
                    add_vip: true,
                    nat: Some(_),
                    ..
                }]
            ));
            assert_eq!(
                t.last_repair("web"),
                (
                    1,
                    "vip missing from lo; nat rules missing".into(),
                    "repairing".into()
                )
            );
            t.host_done(true);
            assert!(t.announced("web"));
        }

        #[test]
        fn a_drift_of_a_part_that_changed_since_is_ignored() {
            let mut t = T::new(1, 1, vec![spec("web", "192.0.2.10/32")]);
            let mut consul = spec("svc", "192.0.2.30/32");
            t.register(consul.clone(), Source::Consul);
            t.bring_up("web");
            t.bring_up("svc");
            // A result nobody waits for.
            let stale = |t: &mut T, id| {
                t.step(Event::Verified {
                    id,
                    drift: vec![
                        lost("web", "192.0.2.10/32", Part::Vip),
                        lost("svc", "192.0.2.30/32", Part::Nat(nat80())),
                    ],
                })
                .len()
            };
            assert_eq!(stale(&mut t, 99), 0);
            let (id, _) = t.verify();
            // Meanwhile web goes down and is cleaned up (its vip is being removed), and svc gets
            // other NAT rules.
            t.report("web", false);
            t.advance(CLEANUP);
            assert_eq!(kinds(t.step(Event::Deadline)), ["remove"]);
            consul.nats = vec!["tcp:443:8443".parse().unwrap()];
            let ops: Vec<HostOp> = host_ops(t.register(consul, Source::Consul))
                .into_iter()
                .cloned()
                .collect();
            for op in &ops {
                t.step(Event::HostDone(done_for(op, true)));
            }
            // Present again, but with other rules than the ones verified.
            assert_eq!(t.core.apps[&name("svc")].nat, Resource::Present);
            assert_eq!(stale(&mut t, id), 0);
            assert_eq!(t.view("web").repairs, 0);
            assert_eq!(t.view("svc").repairs, 0);
            assert!(t.announced("svc"));
            assert!(t.metric("gocast_repairs_total{kind=\"vip\"} 0"));
        }

        #[test]
        fn only_a_vip_believed_on_lo_that_left_it_is_verified() {
            let mut t = T::new(1, 1, vec![spec("web", "192.0.2.10/32")]);
            // The verification asked for, if any; finished at once with no drift.
            let left = |t: &mut T, addr: &str| -> bool {
                let id = match t.step(Event::LeftLo(vec![addr.parse().unwrap()])) {
                    [] => return false,
                    [Effect::Verify { id, .. }] => *id,
                    other => panic!("{:?}", kinds(other)),
                };
                t.step(Event::Verified {
                    id,
                    drift: Vec::new(),
                });
                true
            };
            // Installing: a removal seen now may be of the address just added.
            let install: Vec<HostOp> = host_ops(t.report("web", true))
                .into_iter()
                .cloned()
                .collect();
            assert!(left(&mut t, "192.0.2.10"));
            t.step(Event::HostDone(done_for(&install[0], true)));
            // Not a VIP (another address on lo): nothing to look at.
            assert!(!left(&mut t, "192.0.2.99"));
            assert!(left(&mut t, "192.0.2.10"));
            // The agent's own removal (the app went down and its cleanup took the VIP).
            t.report("web", false);
            t.advance(Duration::from_secs(3600));
            t.step(Event::Deadline);
            t.host_done(true);
            assert!(!t.core.apps[&name("web")].vip.maybe_present());
            assert!(!left(&mut t, "192.0.2.10"));
        }

        #[test]
        fn a_vip_taken_away_right_after_it_was_added_is_put_back() {
            let mut t = T::new(1, 1, vec![spec("web", "192.0.2.10/32")]);
            let install = host_ops(t.report("web", true))[0].clone();
            // The kernel says the address left lo before the add's result is in.
            let id = match t.step(Event::LeftLo(vec!["192.0.2.10".parse().unwrap()])) {
                [Effect::Verify { id, expected }] if expected[0].on_lo => *id,
                other => panic!("{:?}", kinds(other)),
            };
            t.step(Event::HostDone(done_for(&install, true)));
            let effects = t.step(Event::Verified {
                id,
                drift: vec![lost("web", "192.0.2.10/32", Part::Vip)],
            });
            assert!(
                kinds(effects).contains(&"install"),
                "put back: {:?}",
                kinds(effects)
            );
            assert_eq!(t.view("web").repairs, 1);
        }

        #[test]
        fn verifications_run_one_at_a_time_and_one_asked_meanwhile_follows() {
            let mut t = T::new(1, 1, vec![spec("web", "192.0.2.10/32")]);
            let (first, _) = t.verify();
            assert!(
                t.step(Event::VerifyDue { vips: true }).is_empty(),
                "one in flight"
            );
            assert!(t.step(Event::VerifyDue { vips: true }).is_empty());
            let effects = t.step(Event::Verified {
                id: first,
                drift: Vec::new(),
            });
            assert!(
                matches!(effects, [Effect::Verify { id, .. }] if *id == first + 1),
                "{:?}",
                kinds(effects)
            );
            assert!(
                t.step(Event::Verified {
                    id: first + 1,
                    drift: Vec::new(),
                })
                .is_empty()
            );
        }

        #[test]
        fn a_down_app_that_lost_its_vip_is_left_off_and_cleanup_leaves_the_vip_alone() {
            let mut t = T::new(1, 1, vec![spec("web", "192.0.2.10/32")]);
            t.bring_up("web");
            t.report("web", false);
            let (id, _) = t.verify();
            let effects = t.step(Event::Verified {
                id,
                drift: vec![lost("web", "192.0.2.10/32", Part::Vip)],
            });
            assert!(host_ops(effects).is_empty());
            assert_eq!(t.last_repair("web").2, "left off: the app is down");
            assert!(!t.view("web").vip_installed);
            t.advance(CLEANUP);
            let effects = t.step(Event::Deadline);
            assert!(matches!(
                host_ops(effects)[..],
                [HostOp::Remove {
                    remove_vip: false,
                    nat: Some(_),
                    ..
                }]
            ));
            t.host_done(true);
            // Back up: installed in full again.
            let effects = t.report("web", true);
            assert!(matches!(
                host_ops(effects)[..],
                [HostOp::Install {
                    add_vip: true,
                    nat: Some(_),
                    ..
                }]
            ));
        }

        #[test]
        fn what_the_host_put_back_itself_is_counted() {
            let mut t = T::new(1, 1, Vec::new());
            let (id, _) = t.verify();
            let effects = t.step(Event::Verified {
                id,
                drift: vec![
                    Drift::Shared {
                        kind: RepairKind::Program,
                        what: "gocast_xdp detached from eth0".into(),
                        result: Ok(()),
                    },
                    Drift::Shared {
                        kind: RepairKind::Nat,
                        what: "iptables chain GOCAST or its jumps".into(),
                        result: Err("iptables failed".into()),
                    },
                ],
            });
            assert!(effects.is_empty());
            for line in [
                "gocast_repairs_total{kind=\"program\"} 1",
                "gocast_repair_failures_total{kind=\"program\"} 0",
                "gocast_repairs_total{kind=\"nat\"} 1",
                "gocast_repair_failures_total{kind=\"nat\"} 1",
            ] {
                assert!(t.metric(line), "{line}");
            }
        }
    }

    /// Safe VIPs (docs/security.md): the configured peer and next hop, and the host's
    /// addresses (an operator's address on `lo` included, the agent's own VIPs not).
    fn guarded(config: Vec<AppSpec>) -> T {
        let mut s = settings(1, 1);
        s.protected = vec![
            Protected::new("198.18.1.2".parse().unwrap(), "the BGP peer"),
            Protected::new(
                "198.18.1.5".parse().unwrap(),
                "the next hop of BGP peer 198.18.1.2",
            ),
        ];
        let local = vec![
            Protected::interface("198.18.1.1".parse().unwrap(), "eth0"),
            Protected::interface("2001:db8:1::1".parse().unwrap(), "eth0"),
            Protected::interface("203.0.113.7".parse().unwrap(), "lo"),
        ];
        T::with(s, local, config)
    }

    #[test]
    fn a_vip_equal_to_or_covering_a_protected_address_is_refused_from_every_source() {
        let cases = [
            // (vip, source, the protected address named, or None: accepted)
            (
                "198.18.1.2/32",
                Source::Http,
                Some(("198.18.1.2", "equals", "the BGP peer")),
            ),
            (
                "198.18.1.0/30",
                Source::Http,
                Some(("198.18.1.2", "covers", "the BGP peer")),
            ),
            (
                "198.18.1.2/32",
                Source::Consul,
                Some(("198.18.1.2", "equals", "the BGP peer")),
            ),
            (
                "198.18.1.4/30",
                Source::Consul,
                Some(("198.18.1.5", "covers", "the next hop")),
            ),
            (
                "198.18.1.1/32",
                Source::Http,
                Some(("198.18.1.1", "equals", "interface eth0")),
            ),
            (
                "198.18.0.0/16",
                Source::Consul,
                Some(("198.18.1.2", "covers", "the BGP peer")),
            ),
            (
                "2001:db8:1::/64",
                Source::Http,
                Some(("2001:db8:1::1", "covers", "interface eth0")),
            ),
            (
                "203.0.113.7/32",
                Source::Http,
                Some(("203.0.113.7", "equals", "interface lo")),
            ),
            ("198.18.1.6/32", Source::Http, None),
            ("198.18.1.8/30", Source::Consul, None),
            ("2001:db8:2::1/128", Source::Http, None),
        ];
        for (vip, source, refused) in cases {
            let mut t = guarded(Vec::new());
            let effects = t.register(spec("x", vip), source);
            if refused.is_none() && source == Source::Http {
                assert_eq!(kinds(effects), ["persist"], "{vip}");
                continue;
            }
            match (refused, app_reply(effects)) {
                (None, reply) => assert!(reply.is_ok(), "{vip}: {reply:?}"),
                (Some((addr, relation, what)), Err(err)) => {
                    let LifecycleError::ProtectedAddress {
                        addr: found,
                        relation: rel,
                        what: named,
                        ..
                    } = err
                    else {
                        panic!("{vip}: {err}");
                    };
                    assert_eq!(
                        (found.to_string().as_str(), *rel),
                        (addr, relation),
                        "{vip}"
                    );
                    assert!(named.contains(what), "{vip}: {named}");
                    let message = err.to_string();
                    assert!(message.contains(vip) && message.contains(addr), "{message}");
                    assert_eq!(kinds(effects), ["reply"], "{vip}: refused, nothing changed");
                }
                (Some(_), Ok(view)) => panic!("{vip} accepted: {view:?}"),
            }
        }
    }

    #[test]
    fn config_apps_that_cover_a_protected_address_are_refused_and_the_others_run() {
        let mut t = guarded(vec![
            spec("peer", "198.18.1.2/32"),
            spec("web", "192.0.2.10/32"),
        ]);
        assert_eq!(t.core.apps.keys().collect::<Vec<_>>(), [&name("web")]);
        let mut s = settings(1, 1);
        s.protected = t.core.settings.protected.clone();
        let id = t.id();
        let effects = t.step(Event::Reload {
            id,
            settings: Box::new(s),
            apps: vec![
                spec("web", "192.0.2.10/32"),
                spec("link", "198.18.1.0/30"),
                spec("db", "192.0.2.20/32"),
            ],
        });
        let report = reload_report(effects);
        assert_eq!(report.added, [name("db")]);
        assert_eq!(report.refused.len(), 1);
        assert_eq!(report.refused[0].app, name("link"));
        assert!(
            report.refused[0]
                .reason
                .contains("198.18.1.2, the BGP peer"),
            "{}",
            report.refused[0].reason
        );
        assert!(!t.core.apps.contains_key(&name("link")));
    }

    #[test]
    fn the_agents_own_vips_on_lo_are_not_protected_and_an_address_that_appears_later_leaves_apps_alone()
     {
        let mut t = guarded(Vec::new());
        t.register(spec("web", "192.0.2.10/32"), Source::Consul);
        t.bring_up("web");
        // A kernel without IFA_PROTO lists our own VIP as an address of lo: still ours.
        let mut local = t.core.local.clone();
        local.push(Protected::interface("192.0.2.10".parse().unwrap(), "lo"));
        assert!(t.step(Event::LocalAddresses(local.clone())).is_empty());
        let mut changed = spec("web", "192.0.2.10/31");
        changed.communities = vec!["65000:1".parse().unwrap()];
        assert!(app_reply(t.register(changed.clone(), Source::Consul)).is_ok());
        t.bring_up("web");
        // An address of eth0 that the running app now covers: the app stays announced.
        local.push(Protected::interface("192.0.2.11".parse().unwrap(), "eth0"));
        assert!(t.step(Event::LocalAddresses(local)).is_empty());
        assert!(t.view("web").announced);
        // Registered again unchanged: fine; a new app on that address: refused.
        assert!(app_reply(t.register(changed, Source::Consul)).is_ok());
        assert!(matches!(
            app_reply(t.register(spec("other", "192.0.2.11/32"), Source::Http)),
            Err(LifecycleError::ProtectedAddress { .. })
        ));
    }
}
