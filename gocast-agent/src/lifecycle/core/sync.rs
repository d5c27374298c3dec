//! Syncs of a whole source's apps: a config reload (settings and config apps) and each Consul
//! catalog read. The apps are applied in passes so their order does not matter
//! (docs/design.md, "Live reload" and "Consul").

use std::collections::{BTreeMap, BTreeSet};

use tracing::info;

use super::Core;
use crate::{
    app::{AppName, AppSpec, Source},
    lifecycle::events::{Effect, Now},
    messages::{LifecycleError, Refused, Settings, SyncReport},
    monitor,
};

impl Core {
    /// Applies a config reload: the new settings from now on (running timers keep their
    /// deadlines), and the config apps synced like Consul's (see [`Core::sync`]).
    pub(super) fn reload(
        &mut self,
        settings: Settings,
        apps: Vec<AppSpec>,
        now: Now,
        out: &mut Vec<Effect>,
    ) -> SyncReport {
        out.push(Effect::Monitor(monitor::Command::Configure(
            settings.monitor.clone(),
        )));
        self.settings = settings;
        let (mut report, refused) = self.sync(Source::Config, apps, &[], now, out);
        report.refused = refused
            .into_iter()
            .map(|(app, e)| Refused {
                app,
                reason: e.to_string(),
            })
            .collect();
        info!(
            added = report.added.len(),
            changed = report.changed.len(),
            removed = report.removed.len(),
            refused = report.refused.len(),
            "config apps reloaded"
        );
        report
    }

    /// Makes the apps of `source` (config or Consul) equal to `apps`: adds new ones, updates
    /// changed ones, removes the others except those in `keep`; never touches another source's
    /// apps (a name another source holds is refused). Applied in passes, so the order does not
    /// matter: removals come first (an app that left frees its VIP for one that takes it), then
    /// every app is registered, and the refused ones are tried again as long as a pass made
    /// progress (a refused app may fit once another one moved away). When no pass can progress
    /// because apps wait for each other's VIPs (two apps swapping VIPs), those that move are
    /// taken down first, then registered anew.
    pub(super) fn sync(
        &mut self,
        source: Source,
        apps: Vec<AppSpec>,
        keep: &[AppName],
        now: Now,
        out: &mut Vec<Effect>,
    ) -> (SyncReport, Vec<(AppName, LifecycleError)>) {
        let before: BTreeMap<AppName, AppSpec> = self
            .apps
            .values()
            .filter(|e| e.source == source)
            .map(|e| (e.spec.name.clone(), e.spec.clone()))
            .collect();
        let gone: Vec<AppName> = before
            .keys()
            .filter(|n| !keep.contains(n) && !apps.iter().any(|a| &a.name == *n))
            .cloned()
            .collect();
        for name in &gone {
            if let Some(entry) = self.apps.remove(name) {
                info!(app = %name, ?source, "app is gone from its source: withdrawing and removing");
                self.teardown(entry, out);
            }
        }
        let mut refused = Vec::new();
        let mut pending = Vec::new();
        for spec in apps {
            match self
                .apps
                .get(&spec.name)
                .map(|e| e.source)
                .filter(|s| *s != source)
            {
                Some(owner) => refused.push((
                    spec.name.clone(),
                    LifecycleError::NameTaken {
                        name: spec.name,
                        owner,
                    },
                )),
                None => pending.push(spec),
            }
        }
        // Each pass registers an app or takes one down for good (a moved app comes back with
        // its new VIP, so it cannot block anyone twice): the passes end.
        loop {
            let mut progress = false;
            let mut failed: Vec<(AppSpec, LifecycleError)> = Vec::new();
            for spec in pending {
                match self.register_now(spec.clone(), source, now, out) {
                    Ok(_) => progress = true,
                    Err(e) => failed.push((spec, e)),
                }
            }
            if !progress {
                progress = self.unblock_moves(source, &failed, out);
            }
            if failed.is_empty() || !progress {
                refused.extend(failed.into_iter().map(|(spec, e)| (spec.name, e)));
                refused.sort_by(|a, b| a.0.cmp(&b.0));
                break;
            }
            pending = failed.into_iter().map(|(spec, _)| spec).collect();
        }
        let mut report = SyncReport::default();
        for entry in self.apps.values().filter(|e| e.source == source) {
            match before.get(&entry.spec.name) {
                None => report.added.push(entry.spec.name.clone()),
                Some(old) if *old != entry.spec => report.changed.push(entry.spec.name.clone()),
                Some(_) => {}
            }
        }
        report.removed = before
            .into_keys()
            .filter(|n| !self.apps.contains_key(n))
            .collect();
        (report, refused)
    }

    /// Takes down the apps of `source` that hold a VIP another refused app wants while they
    /// themselves are waiting to move to another VIP; returns whether it took any down.
    fn unblock_moves(
        &mut self,
        source: Source,
        failed: &[(AppSpec, LifecycleError)],
        out: &mut Vec<Effect>,
    ) -> bool {
        let blockers: BTreeSet<AppName> = failed
            .iter()
            .filter_map(|(_, e)| match e {
                LifecycleError::VipConflict { owner, .. }
                | LifecycleError::VipOverlap { owner, .. } => Some(owner.clone()),
                _ => None,
            })
            .filter(|owner| {
                let wanted = failed.iter().find(|(spec, _)| &spec.name == owner);
                self.apps.get(owner).is_some_and(|entry| {
                    entry.source == source
                        && wanted.is_some_and(|(spec, _)| spec.vip != entry.spec.vip)
                })
            })
            .collect();
        for name in &blockers {
            if let Some(entry) = self.apps.remove(name) {
                info!(
                    app = %name,
                    vip = %entry.spec.vip,
                    "app leaves its vip to another one: taken down, then registered anew"
                );
                self.teardown(entry, out);
            }
        }
        !blockers.is_empty()
    }
}
