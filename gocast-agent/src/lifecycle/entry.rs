//! One app as the core keeps it: its spec, health, and where its VIP and NAT stand on the host.

use std::time::SystemTime;

use tokio::time::Instant;
use tracing::error;

use super::{
    events::{NatSpec, Now, OpId, RepairKind},
    passive::Passive,
};
use crate::{
    app::{AppSpec, Source},
    messages::{AppView, MonitorView, PassiveView, RepairView},
    monitor::MonitorResult,
};

/// Where one host resource of an app (its VIP, its NAT rules) stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Resource {
    Absent,
    Adding(OpId),
    Present,
    Removing(OpId),
}

impl Resource {
    /// Might be on the host (an add in flight counts): a removal must include it.
    pub(super) fn maybe_present(self) -> bool {
        matches!(self, Self::Adding(_) | Self::Present)
    }

    /// Applies the result of operation `id`; a result of a superseded operation changes nothing.
    pub(super) fn settle(&mut self, id: OpId, ok: bool) {
        *self = match *self {
            Self::Adding(op) if op == id => {
                if ok {
                    Self::Present
                } else {
                    Self::Absent
                }
            }
            Self::Removing(op) if op == id => {
                if ok {
                    Self::Absent
                } else {
                    Self::Present
                }
            }
            other => other,
        };
    }
}

/// Where an app stands in a drain (RFC 8326 graceful shutdown of its route).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Drain {
    Off,
    /// Announced with `GRACEFUL_SHUTDOWN` until then, so the peers move traffic away.
    Draining {
        until: Instant,
    },
    /// Withdrawn; the VIP and NAT stay until cleanup so connections in flight finish.
    Drained,
}

impl Drain {
    pub(super) fn until(self) -> Option<Instant> {
        match self {
            Self::Draining { until } => Some(until),
            Self::Off | Self::Drained => None,
        }
    }
}

/// One app's state.
#[derive(Debug)]
pub(super) struct Entry {
    pub(super) spec: AppSpec,
    /// `spec.name.lo_label()`, computed once: conflicts are checked against every app.
    pub(super) label: String,
    pub(super) source: Source,
    pub(super) generation: u64,
    /// Its monitors say up (after `monitor_rise` passing reports).
    pub(super) up: bool,
    /// In the route set: up, and everything it needs is on the host.
    pub(super) announced: bool,
    pub(super) drain: Drain,
    /// Consecutive results disagreeing with `up`.
    pub(super) streak: u32,
    pub(super) results: Vec<Option<MonitorResult>>,
    pub(super) vip: Resource,
    pub(super) nat: Resource,
    pub(super) since: SystemTime,
    pub(super) cleanup_at: Option<Instant>,
    pub(super) last_error: Option<String>,
    /// Passive health (`passive_health: true` only): what fails the app, its hold-down.
    pub(super) passive: Passive,
    pub(super) repairs: Repairs,
}

/// What self-repair did for one app (docs/design.md, "Self-repair").
#[derive(Debug, Default)]
pub(super) struct Repairs {
    /// Times a part of the app was found missing from the host.
    pub(super) count: u64,
    /// Boxed: most apps are never repaired, and inline it would make every app's entry 80
    /// bytes larger.
    pub(super) last: Option<Box<LastRepair>>,
}

/// The last time a part of the app was found missing.
#[derive(Debug)]
pub(super) struct LastRepair {
    pub(super) at: SystemTime,
    /// What was missing, e.g. "vip missing from lo".
    pub(super) what: String,
    /// The parts being put back, for the failure counter.
    pub(super) kinds: Vec<RepairKind>,
    pub(super) outcome: Outcome,
}

/// How a repair ended, or that it has not yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Outcome {
    /// The host operation putting the parts back is in flight.
    Repairing(OpId),
    Repaired,
    /// The operation failed; the app is withdrawn until an install works.
    Failed(String),
    /// The app is down: nothing is put back now; it is installed again when it comes up.
    LeftOff,
}

impl LastRepair {
    fn view(&self) -> RepairView {
        RepairView {
            at: rfc3339(self.at),
            what: self.what.clone(),
            result: match &self.outcome {
                Outcome::Repairing(_) => "repairing".to_owned(),
                Outcome::Repaired => "repaired".to_owned(),
                Outcome::Failed(why) => format!("failed: {why}"),
                Outcome::LeftOff => "left off: the app is down".to_owned(),
            },
        }
    }
}

impl Entry {
    /// In the route set: announced, and not withdrawn by a drain.
    pub(super) fn routed(&self) -> bool {
        self.announced && self.drain != Drain::Drained
    }

    /// Everything an announced app needs is on the host.
    pub(super) fn installed(&self) -> bool {
        self.vip == Resource::Present
            && (self.spec.nats.is_empty() || self.nat == Resource::Present)
    }

    pub(super) fn installing(&self) -> bool {
        matches!(self.vip, Resource::Adding(_)) || matches!(self.nat, Resource::Adding(_))
    }

    pub(super) fn view(&self, now: Now, passive_available: bool) -> AppView {
        AppView {
            name: self.spec.name.clone(),
            vip: self.spec.vip,
            source: self.source,
            state: if self.announced {
                "healthy"
            } else {
                "unhealthy"
            },
            announced: self.routed(),
            drain: match self.drain {
                Drain::Off => None,
                Drain::Draining { .. } => Some("draining"),
                Drain::Drained => Some("drained"),
            },
            withdraw_in_s: self
                .drain
                .until()
                .map(|t| t.saturating_duration_since(now.mono).as_secs_f64()),
            vip_installed: matches!(self.vip, Resource::Present | Resource::Removing(_)),
            lo_label: self.label.clone(),
            monitors: self
                .spec
                .monitors
                .iter()
                .zip(&self.results)
                .map(|(m, r)| MonitorView {
                    monitor: m.clone(),
                    ok: r.as_ref().map(|r| r.ok),
                    reason: r.as_ref().map(|r| r.reason.to_string()),
                    checked_at: r.as_ref().map(|r| rfc3339(r.at)),
                    latency_ms: r.as_ref().map(|r| r.latency.as_secs_f64() * 1e3),
                })
                .collect(),
            nats: self.spec.nats.clone(),
            communities: self.spec.communities.clone(),
            since: rfc3339(self.since),
            cleanup_in_s: self
                .cleanup_at
                .map(|t| t.saturating_duration_since(now.mono).as_secs_f64()),
            last_error: self.last_error.clone(),
            passive_health: self.spec.passive_health.then(|| PassiveView {
                // The listener's reading needs no counters: it fails the app either way.
                state: match (self.passive.failure(), passive_available) {
                    (Some(_), _) => "failing",
                    (None, false) => "unavailable",
                    (None, true) => "ok",
                },
                reason: match (self.passive.failure(), passive_available) {
                    (Some(why), _) => Some(why.to_owned()),
                    (None, false) => {
                        Some("passive health needs the eBPF dataplane's counters".into())
                    }
                    (None, true) => None,
                },
                failures: self.passive.strikes,
                hold_down_s: self.passive.hold_left(now.mono),
                awaiting_proof: self.passive.needs_proof,
            }),
            repairs: self.repairs.count,
            last_repair: self.repairs.last.as_deref().map(LastRepair::view),
        }
    }

    pub(super) fn nat_spec(&self) -> NatSpec {
        NatSpec {
            rules: self.spec.nats.clone(),
            dest: self.spec.nat_dest,
        }
    }

    /// Keeps a failed host operation on the app; logs it when it is new, not on every retry.
    pub(super) fn record(&mut self, message: String) {
        if self.last_error.as_ref() != Some(&message) {
            error!(app = %self.spec.name, vip = %self.spec.vip, error = %message, "host operation failed");
        }
        self.last_error = Some(message);
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}
