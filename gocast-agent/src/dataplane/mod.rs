//! Dataplane: NAT for VIPs. iptables by default; the eBPF dataplane (XDP + TC) is opt-in with
//! `dataplane.mode: ebpf`.

pub mod ebpf;
pub mod iptables;

use serde::Serialize;

use crate::config::DataplaneMode;

/// Which dataplane runs and why, for `/info`.
#[derive(Debug, Clone, Serialize)]
pub struct DataplaneInfo {
    pub mode: &'static str,
    pub reason: String,
}

impl DataplaneInfo {
    /// iptables, as `auto` (and tests) run it.
    pub fn iptables() -> Self {
        Self::for_iptables(DataplaneMode::Auto)
    }

    /// iptables, chosen by `mode` (`auto` or `iptables`).
    pub fn for_iptables(mode: DataplaneMode) -> Self {
        let reason = match mode {
            DataplaneMode::Iptables => "forced by dataplane.mode: iptables",
            DataplaneMode::Auto | DataplaneMode::Ebpf => {
                "dataplane.mode auto uses iptables; the eBPF dataplane is opt-in (dataplane.mode: ebpf)"
            }
        };
        Self {
            mode: "iptables",
            reason: reason.into(),
        }
    }

    /// The eBPF dataplane, attached to `interfaces`.
    pub fn ebpf(interfaces: &[String]) -> Self {
        Self {
            mode: "ebpf",
            reason: format!(
                "forced by dataplane.mode: ebpf; XDP ingress and TC egress on {}",
                interfaces.join(", ")
            ),
        }
    }
}
