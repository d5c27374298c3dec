//! Dataplane: NAT for VIPs and per-VIP counters. The eBPF programs (XDP ingress, TC egress) run
//! where they can load; iptables DNAT is the fallback, or forced with `dataplane.mode: iptables`.

pub mod ebpf;
pub mod iptables;

use serde::Serialize;

/// Which dataplane runs and why, for `/info`.
#[derive(Debug, Clone, Serialize)]
pub struct DataplaneInfo {
    pub mode: &'static str,
    pub reason: String,
}

impl DataplaneInfo {
    /// iptables, forced by `dataplane.mode: iptables`.
    pub fn iptables_forced() -> Self {
        Self {
            mode: "iptables",
            reason: "forced by dataplane.mode: iptables".into(),
        }
    }

    /// iptables, because `auto` could not run eBPF for `why`.
    pub fn iptables_fallback(why: &str) -> Self {
        Self {
            mode: "iptables",
            reason: format!("dataplane.mode auto fell back to iptables: {why}"),
        }
    }

    /// The eBPF dataplane, chosen by `mode` (`auto` or `ebpf`), attached to `interfaces`
    /// (each with its ingress hook, e.g. `eth0 (xdp native)`).
    pub fn ebpf(mode: &str, interfaces: &[String]) -> Self {
        Self {
            mode: "ebpf",
            reason: format!(
                "dataplane.mode {mode}: ingress NAT and TC egress on {}",
                interfaces.join(", ")
            ),
        }
    }

    pub fn is_ebpf(&self) -> bool {
        self.mode == "ebpf"
    }
}
