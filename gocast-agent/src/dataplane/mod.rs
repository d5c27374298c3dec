//! Dataplane: NAT for VIPs. iptables is the fallback dataplane; eBPF arrives later.

pub mod iptables;
