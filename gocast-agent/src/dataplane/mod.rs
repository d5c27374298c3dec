//! Dataplane: NAT for VIPs. iptables is the fallback dataplane; eBPF arrives later.

pub mod iptables;

use serde::Serialize;

/// Which dataplane runs and why, for `/info`.
#[derive(Debug, Clone, Serialize)]
pub struct DataplaneInfo {
    pub mode: &'static str,
    pub reason: String,
}

impl DataplaneInfo {
    /// The only dataplane of this version.
    pub fn iptables() -> Self {
        Self {
            mode: "iptables",
            reason: "eBPF dataplane not part of this build; NAT through iptables".into(),
        }
    }
}
