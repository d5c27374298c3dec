//! What a registration must pass besides its own syntax: no clash with another app's VIP or
//! label, no VIP on a protected address (docs/security.md, "Safe VIPs"), and the policy for
//! its source (HTTP `exec:` monitors, the VIP allowlist).

use super::Core;
use crate::{
    app::{AppSpec, Monitor, Source},
    messages::{LifecycleError, Protected},
};

impl Core {
    /// Refuses an app whose VIP or label belongs to another app.
    pub(super) fn check_conflicts(&self, spec: &AppSpec) -> Result<(), LifecycleError> {
        let label = spec.name.lo_label();
        for other in self.apps.values().filter(|e| e.spec.name != spec.name) {
            if other.spec.vip.addr() == spec.vip.addr() {
                return Err(LifecycleError::VipConflict {
                    vip: spec.vip,
                    owner: other.spec.name.clone(),
                });
            }
            // Two addresses of one subnet on lo: removing the primary takes the secondary with
            // it, and both would announce the same prefix.
            if other.spec.vip.prefix().contains(&spec.vip.addr())
                || spec.vip.prefix().contains(&other.spec.vip.addr())
            {
                return Err(LifecycleError::VipOverlap {
                    vip: spec.vip,
                    other: other.spec.vip,
                    owner: other.spec.name.clone(),
                });
            }
            if other.label == label {
                return Err(LifecycleError::LabelConflict {
                    name: spec.name.clone(),
                    label,
                    owner: other.spec.name.clone(),
                });
            }
        }
        Ok(())
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
