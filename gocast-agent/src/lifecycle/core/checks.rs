//! What a registration must pass besides its own syntax: no clash with another app's VIP or
//! label, no VIP on a protected address (docs/security.md, "Safe VIPs"), and the policy for
//! its source (HTTP `exec:` monitors, the VIP allowlist).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use super::Core;
use crate::{
    app::{AppName, AppSpec, Monitor, Source, Vip},
    lifecycle::entry::Entry,
    messages::{LifecycleError, Protected},
};

/// Why `spec` (with `lo` label `label`) cannot sit beside `other`, if it cannot.
fn conflict(spec: &AppSpec, label: &str, other: &Entry) -> Option<LifecycleError> {
    if other.spec.vip.addr() == spec.vip.addr() {
        return Some(LifecycleError::VipConflict {
            vip: spec.vip,
            owner: other.spec.name.clone(),
        });
    }
    // Two addresses of one subnet on lo: removing the primary takes the secondary with it, and
    // both would announce the same prefix.
    if other.spec.vip.prefix().contains(&spec.vip.addr())
        || spec.vip.prefix().contains(&other.spec.vip.addr())
    {
        return Some(LifecycleError::VipOverlap {
            vip: spec.vip,
            other: other.spec.vip,
            owner: other.spec.name.clone(),
        });
    }
    if other.label == label {
        return Some(LifecycleError::LabelConflict {
            name: spec.name.clone(),
            label: label.to_owned(),
            owner: other.spec.name.clone(),
        });
    }
    None
}

/// Where to find the apps a registration may clash with, without a scan of every app (a
/// registration at 10,000 apps would otherwise walk them all). Entries are added when an app is
/// inserted and may go stale (the app removed since): every hit is checked against the
/// registry, and the index is rebuilt from it when stale entries pile up.
#[derive(Debug, Default)]
pub(super) struct ConflictIndex {
    by_addr: BTreeMap<IpAddr, AppName>,
    /// Apps whose VIP is wider than one address (may cover a new VIP's address).
    wide: BTreeSet<AppName>,
    by_label: HashMap<String, AppName>,
}

impl ConflictIndex {
    pub(super) fn add(&mut self, name: &AppName, vip: Vip, label: &str) {
        self.by_addr.insert(vip.addr(), name.clone());
        if vip.prefix().prefix_len() < vip.prefix().max_prefix_len() {
            self.wide.insert(name.clone());
        }
        self.by_label.insert(label.to_owned(), name.clone());
    }

    /// The app that registered VIP address `addr`, if any (the index may be stale: check the
    /// app).
    pub(super) fn owner_of(&self, addr: IpAddr) -> Option<&AppName> {
        self.by_addr.get(&addr)
    }

    pub(super) fn len(&self) -> usize {
        self.by_addr.len() + self.wide.len() + self.by_label.len()
    }
}

impl Core {
    /// Refuses an app whose VIP or label belongs to another app.
    pub(super) fn check_conflicts(&self, spec: &AppSpec) -> Result<(), LifecycleError> {
        let label = spec.name.lo_label();
        let prefix = spec.vip.prefix();
        let index = &self.conflicts;
        // Apps at an address inside the new VIP's prefix, apps whose prefix may cover its
        // address, and the app with its label: the only ones it can clash with.
        let candidates = index
            .by_addr
            .range(prefix.network()..=prefix.broadcast())
            .map(|(_, name)| name)
            .chain(&index.wide)
            .chain(index.by_label.get(&label));
        for name in candidates {
            if let Some(other) = self.apps.get(name).filter(|o| o.spec.name != spec.name)
                && let Some(e) = conflict(spec, &label, other)
            {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Rebuilds the conflict index once most of its entries are stale.
    pub(super) fn tidy_conflict_index(&mut self) {
        if self.conflicts.len() <= 4 * self.apps.len() + 64 {
            return;
        }
        let mut index = ConflictIndex::default();
        for entry in self.apps.values() {
            index.add(&entry.spec.name, entry.spec.vip, &entry.label);
        }
        self.conflicts = index;
    }

    /// Refuses a VIP that equals or covers a protected address: a configured BGP peer, next
    /// hop or local address, or an address of the host (docs/security.md, "Safe VIPs"). For
    /// every source, config apps included.
    pub(super) fn check_protected(&self, spec: &AppSpec) -> Result<(), LifecycleError> {
        let vip = spec.vip;
        if self
            .apps
            .get(&spec.name)
            .is_some_and(|old| old.spec.vip == vip)
        {
            // Already there with this VIP: refusing it would change nothing on the host (an
            // address that appeared since was warned about; see `local_addresses`).
            return Ok(());
        }
        let protected = self.settings.protected.iter().chain(&self.local);
        match protected.into_iter().find(|p| self.unsafe_for(vip, p)) {
            None => Ok(()),
            Some(p) => Err(LifecycleError::ProtectedAddress {
                vip,
                addr: p.addr,
                relation: if vip.addr() == p.addr {
                    "equals"
                } else {
                    "covers"
                },
                what: p.what.clone(),
            }),
        }
    }

    /// `vip` equals or covers `p`, and `p` is not the VIP of one of our apps on `lo` (the host
    /// leaves those out already; this keeps it so on kernels that do not keep `IFA_PROTO`).
    pub(super) fn unsafe_for(&self, vip: crate::app::Vip, p: &Protected) -> bool {
        vip.prefix().contains(&p.addr)
            && !(p.on_lo() && self.apps.values().any(|e| e.spec.vip.addr() == p.addr))
    }

    pub(super) fn check_policy(
        &self,
        spec: &AppSpec,
        source: Source,
    ) -> Result<(), LifecycleError> {
        if source == Source::Config {
            return Ok(());
        }
        if source == Source::Http
            && !self.settings.allow_http_exec
            && spec
                .monitors
                .iter()
                .any(|m| matches!(m, Monitor::Exec { .. }))
        {
            return Err(LifecycleError::ExecRefused);
        }
        let allow = &self.settings.vip_allowlist;
        if !allow.is_empty() && !allow.iter().any(|net| net.contains(&spec.vip.net())) {
            return Err(LifecycleError::NotAllowed(spec.vip));
        }
        Ok(())
    }
}
