//! Self-repair's decisions (docs/design.md, "Self-repair"). The core asks the host worker to
//! compare the host with what it believes is installed ([`Effect::Verify`]) and acts on what
//! is missing ([`Event::Verified`](super::Event::Verified)): the part is marked absent,
//! recorded on the app, counted, and put back by one host operation if the app is up. A failed
//! repair withdraws an announced app the way any failed install does
//! (`Core::settle_announcement`).
//!
//! Why a drift is never our own operation in flight: a verification lists only parts that are
//! present (none being added or removed), it runs on the host worker after every operation
//! asked for before it, and its result reaches the core in order with their results. A drift is
//! still ignored if, by the time it arrives, the part is no longer present or the app's VIP or
//! NAT rules changed (a newer operation decides then).

use std::{collections::BTreeMap, net::IpAddr};

use tracing::{debug, error, info, warn};

use super::Core;
use crate::{
    app::{AppName, Vip},
    lifecycle::{
        entry::{Entry, LastRepair, Outcome, Resource},
        events::{Drift, Effect, Expected, HostDone, Now, OpId, Part, RepairKind, VerifyId},
    },
};

/// The verification of the host in flight, if any: at most one is.
#[derive(Debug, Default)]
pub(super) struct Verification {
    in_flight: Option<VerifyId>,
    /// One was due while another was in flight (with VIPs or without): run it when that one
    /// ends, so a kernel event that arrived meanwhile is not lost.
    again: Option<bool>,
    last: VerifyId,
}

impl Core {
    /// Addresses left `lo`: the VIPs are verified if one of them was an app's VIP that is (or
    /// is being put) there; the agent's own removals and foreign addresses cost a look-up.
    pub(super) fn left_lo(&mut self, addrs: &[IpAddr], out: &mut Vec<Effect>) {
        let drift = addrs.iter().any(|addr| {
            self.conflicts
                .owner_of(*addr)
                .and_then(|name| self.apps.get(name))
                .is_some_and(|e| e.spec.vip.addr() == *addr && e.vip.maybe_present())
        });
        if drift {
            self.verify_due(true, out);
        }
    }

    /// Asks the host worker to verify every app's present NAT rules (and, with `vips`, VIPs),
    /// unless a verification is in flight (then once more after it).
    pub(super) fn verify_due(&mut self, vips: bool, out: &mut Vec<Effect>) {
        if self.verification.in_flight.is_some() {
            self.verification.again = Some(self.verification.again.unwrap_or(false) || vips);
            return;
        }
        self.verification.last += 1;
        let id = self.verification.last;
        self.verification.in_flight = Some(id);
        let expected = self
            .apps
            .values()
            .filter_map(|e| expected(e, vips))
            .collect();
        out.push(Effect::Verify { id, expected });
    }

    /// A verification's result: counts what the host put back itself, then, per app, marks
    /// the missing parts absent and puts them all back in one operation.
    pub(super) fn verified(
        &mut self,
        id: VerifyId,
        drift: Vec<Drift>,
        now: Now,
        out: &mut Vec<Effect>,
    ) {
        if self.verification.in_flight != Some(id) {
            debug!(id, "result of a verification nobody waits for: ignored");
            return;
        }
        self.verification.in_flight = None;
        // Every missing part of an app first: one operation then puts them all back. Put back
        // one by one, the second would wait for the first (`Core::install` does one at a time)
        // and the app would be withdrawn in between.
        let mut lost: BTreeMap<AppName, Vec<(RepairKind, String)>> = BTreeMap::new();
        for d in drift {
            match d {
                Drift::Shared { kind, what, result } => self.shared_repaired(kind, &what, &result),
                Drift::App {
                    app,
                    vip,
                    part,
                    what,
                } => match self
                    .apps
                    .get_mut(&app)
                    .and_then(|e| mark_absent(e, vip, &part))
                {
                    Some(kind) => lost.entry(app).or_default().push((kind, what)),
                    None => {
                        debug!(app = %app, %what, "drift of a part that changed since: ignored");
                    }
                },
            }
        }
        for (name, parts) in lost {
            if let Some(mut entry) = self.apps.remove(&name) {
                self.repair(&mut entry, parts, now, out);
                self.apps.insert(name, entry);
            }
        }
        if let Some(vips) = self.verification.again.take() {
            self.verify_due(vips, out);
        }
    }

    /// Records and counts the app's missing parts, and puts them back if the app is up. An
    /// announced app stays announced meanwhile: withdrawing it would flap the route for the
    /// milliseconds a repair takes, and a failed repair withdraws it.
    fn repair(
        &mut self,
        entry: &mut Entry,
        parts: Vec<(RepairKind, String)>,
        now: Now,
        out: &mut Vec<Effect>,
    ) {
        let (kinds, what): (Vec<RepairKind>, Vec<String>) = parts.into_iter().unzip();
        let what = what.join("; ");
        for kind in &kinds {
            self.metrics.repair(kind.as_str());
        }
        entry.repairs.count += 1;
        let (app, vip) = (&entry.spec.name, entry.spec.vip);
        let outcome = if entry.up {
            warn!(app = %app, %vip, %what, "missing from the host: putting it back");
            // Something is absent: the drift said so.
            self.put_back(entry, out)
                .map_or(Outcome::LeftOff, Outcome::Repairing)
        } else {
            info!(app = %app, %vip, %what, "missing from the host; the app is down, so it stays off");
            Outcome::LeftOff
        };
        entry.repairs.last = Some(Box::new(LastRepair {
            at: now.wall,
            what,
            kinds,
            outcome,
        }));
    }

    /// Installs the parts of the app that are absent (at least the ones just found missing)
    /// and returns the operation. Unlike `Core::install` it does not wait for another part's
    /// operation in flight: the parts it adds are absent, so none of them is being changed.
    fn put_back(&mut self, entry: &mut Entry, out: &mut Vec<Effect>) -> Option<OpId> {
        let add_vip = entry.vip == Resource::Absent;
        let add_nat = !entry.spec.nats.is_empty() && entry.nat == Resource::Absent;
        self.start_install(entry, add_vip, add_nat, out)
    }

    /// Settles the app's repair if `done` is the operation putting its parts back.
    pub(super) fn repair_done(&mut self, entry: &mut Entry, done: &HostDone) {
        let Some(last) = entry.repairs.last.as_mut() else {
            return;
        };
        if last.outcome != Outcome::Repairing(done.id) {
            return;
        }
        let failure = [&done.vip, &done.nat]
            .into_iter()
            .flatten()
            .find_map(|r| r.as_ref().err());
        let (app, what) = (&entry.spec.name, &last.what);
        last.outcome = match failure {
            None => {
                info!(app = %app, %what, "put back");
                Outcome::Repaired
            }
            Some(why) => {
                for kind in &last.kinds {
                    self.metrics.repair_failed(kind.as_str());
                }
                error!(app = %app, %what, error = %why, "cannot put it back: withdrawing");
                Outcome::Failed(why.clone())
            }
        };
    }

    /// Something every app shares, which the host put back itself (and logged): counted.
    fn shared_repaired(&self, kind: RepairKind, what: &str, result: &Result<(), String>) {
        debug!(kind = kind.as_str(), %what, ok = result.is_ok(), "shared host state repaired");
        self.metrics.repair(kind.as_str());
        if result.is_err() {
            self.metrics.repair_failed(kind.as_str());
        }
    }
}

/// What the app has on the host as the core believes it, if anything: only present parts (its
/// VIP only when `vips`, also while being added: the host worker runs the verification after
/// the add, so a VIP taken away right after it was put there is found, and its result comes
/// after the add's, when the VIP counts as present).
fn expected(entry: &Entry, vips: bool) -> Option<Expected> {
    let on_lo = vips && entry.vip.maybe_present();
    let nat =
        (!entry.spec.nats.is_empty() && entry.nat == Resource::Present).then(|| entry.nat_spec());
    (on_lo || nat.is_some()).then(|| Expected {
        app: entry.spec.name.clone(),
        vip: entry.spec.vip,
        on_lo,
        nat,
    })
}

/// Marks the part absent if the drift is about it as it is now: present, with the VIP (and
/// NAT rules) that were verified. Returns what kind of part it was.
fn mark_absent(entry: &mut Entry, vip: Vip, part: &Part) -> Option<RepairKind> {
    if entry.spec.vip != vip {
        return None;
    }
    match part {
        Part::Vip if entry.vip == Resource::Present => {
            entry.vip = Resource::Absent;
            Some(RepairKind::Vip)
        }
        Part::Nat(nat) if entry.nat == Resource::Present && entry.nat_spec() == *nat => {
            entry.nat = Resource::Absent;
            Some(RepairKind::Nat)
        }
        _ => None,
    }
}
