//! Runtime drain (docs/design.md, "Drain"): an app, or the whole host, re-announced with
//! `GRACEFUL_SHUTDOWN` for `drain_time`, then withdrawn; saved before it takes effect.

use tracing::info;

use super::{Core, Pending};
use crate::{
    app::AppName,
    lifecycle::{
        entry::Drain,
        events::{Effect, Now, Reply, RequestId},
    },
    messages::{DrainReport, LifecycleError},
    store::Change,
};

impl Core {
    /// A drain or undrain: checked, saved, then applied ([`Core::apply_drain`]).
    pub(super) fn drain(
        &mut self,
        id: RequestId,
        app: Option<AppName>,
        drain: bool,
        out: &mut Vec<Effect>,
    ) {
        if let Some(name) = &app
            && !self.apps.contains_key(name)
        {
            out.push(Effect::Reply {
                id,
                reply: Reply::Drain(Err(LifecycleError::UnknownApp(name.clone()))),
            });
            return;
        }
        let mut change = self.drain_change();
        if let Change::Drain {
            drained,
            host_drained,
        } = &mut change
        {
            match &app {
                None => *host_drained = drain,
                Some(name) => {
                    drained.retain(|n| n != name);
                    if drain {
                        drained.push(name.clone());
                    }
                }
            }
        }
        // Alone in its write: the drain state it saves is computed from the registry.
        out.push(Effect::Persist(vec![change]));
        self.persisting = Some(vec![Pending::Drain { id, app, drain }]);
    }

    /// Drains or undrains as saved: a routed app is announced with `GRACEFUL_SHUTDOWN` for
    /// `drain_time`, then withdrawn; an undrained app that is up comes back.
    pub(super) fn apply_drain(
        &mut self,
        app: Option<AppName>,
        drain: bool,
        now: Now,
    ) -> DrainReport {
        let names: Vec<AppName> = match app {
            None => {
                self.host_drained = drain;
                self.apps.keys().cloned().collect()
            }
            Some(name) => {
                if drain {
                    self.drained.insert(name.clone());
                } else {
                    self.drained.remove(&name);
                }
                vec![name]
            }
        };
        let mut views = Vec::new();
        for name in names {
            let Some(mut entry) = self.apps.remove(&name) else {
                continue;
            };
            let drained = self.host_drained || self.drained.contains(&name);
            match (drained, entry.drain) {
                (true, Drain::Off) => {
                    entry.drain = if entry.routed() {
                        info!(app = %name, "draining: announcing with GRACEFUL_SHUTDOWN");
                        Drain::Draining {
                            until: now.mono + self.settings.drain_time,
                        }
                    } else {
                        info!(app = %name, "drained");
                        Drain::Drained
                    };
                }
                (false, Drain::Draining { .. } | Drain::Drained) => {
                    info!(app = %name, "undrained");
                    entry.drain = Drain::Off;
                    if entry.up {
                        entry.cleanup_at = None;
                    }
                }
                _ => {}
            }
            self.changed.routes.app(&name);
            // Deadlines this cleared go stale in the index and are dropped when met.
            super::index_deadlines(&mut self.deadlines, &entry);
            views.push(entry.view(now, self.settings.passive_health));
            self.apps.insert(name, entry);
        }
        DrainReport {
            host_drained: self.host_drained,
            apps: views,
        }
    }

    /// Ends the drains whose time has passed: the route is withdrawn; VIP and NAT go at
    /// cleanup, so connections in flight can finish.
    pub(super) fn drains_due(&mut self, now: Now) {
        // From the deadline index, not a walk over every app.
        for name in self.due(now, |e| e.drain.until()) {
            let Some(entry) = self.apps.get_mut(&name) else {
                continue;
            };
            info!(app = %name, "drain time passed: withdrawing; vip and nat go at cleanup");
            entry.drain = Drain::Drained;
            entry.cleanup_at = Some(now.mono + self.settings.cleanup_timer);
            self.changed.routes.app(&name);
            super::index_deadlines(&mut self.deadlines, entry);
        }
    }
}
