//! The eBPF maps shared by the agent and `gocast-ebpf`: names, sizes, key and value types.
//!
//! Every type is `#[repr(C)]` + `Copy`, made of fixed-width integers and byte arrays with
//! explicit `_pad` fields (no `bool`, `Option` or enum), and has a compile-time size check, so
//! both sides agree on the layout and the kernel never hashes uninitialised padding. Writers must
//! zero `_pad` (use the constructors or `Default`).
//!
//! Byte order: keys and addresses are in **network order** exactly as they sit in the packet, so
//! the hot path copies bytes and never converts. A `u16` port "in network order" holds the two
//! wire bytes as they are in memory (`u16::from_ne_bytes(wire)`, i.e. `port.to_be()` from a host
//! value). Counters are host order.
//!
//! Addresses are `[u8; 16]`: an IPv6 address as is; an IPv4 address in bytes `0..4` with bytes
//! `4..16` zero (not v4-mapped, so the eBPF side copies the 4 header bytes and nothing else). The
//! `family` field ([`FAMILY_V4`] or [`FAMILY_V6`]) tells them apart.

#![expect(
    clippy::pub_underscore_fields,
    reason = "explicit padding is named `_pad` so readers see it carries nothing; it is public \
              so both sides can build keys with struct literals"
)]

use core::net::IpAddr;

/// `family` of an IPv4 key (the IP version number).
pub const FAMILY_V4: u8 = 4;
/// `family` of an IPv6 key (the IP version number).
pub const FAMILY_V6: u8 = 6;
/// `proto` of TCP (IANA protocol number).
pub const PROTO_TCP: u8 = 6;
/// `proto` of UDP (IANA protocol number).
pub const PROTO_UDP: u8 = 17;

/// `HashMap<VipKey, u32>`: the VIPs this host announces, each with its index into
/// [`COUNTERS_MAP`]. The agent assigns indices below [`MAX_VIPS`].
pub const VIPS_MAP: &str = "GOCAST_VIPS";
/// `HashMap<NatKey, NatTarget>`: where traffic to a VIP port is sent (XDP destination NAT).
pub const NAT_MAP: &str = "GOCAST_NAT";
/// `LruHashMap<FlowKey<[u8; 4]>, NatFlow<[u8; 4]>>`: IPv4 flows the NAT rewrote, one entry per
/// flow, keyed by its reply as TC egress sees it (NAT target → client): egress finds the VIP to
/// put back as the reply's source; ingress derives the same key from the packet and its rule, so
/// a flow's first packet (a TCP SYN, a UDP flow's first datagram) writes one entry; a later one
/// reads it only when its tag in [`FLOW_TAGS_MAP`] does not match. LRU: idle flows age out
/// without a sweeper (egress lookups keep an active flow's entry young). One map per family, so
/// an IPv4 key is 16 bytes, not an IPv6-sized 40: the kernel hashes and compares the whole key
/// on every lookup.
pub const FLOWS4_MAP: &str = "GOCAST_FLOWS4";
/// [`FLOWS4_MAP`] for IPv6: `LruHashMap<FlowKey<[u8; 16]>, NatFlow<[u8; 16]>>`.
pub const FLOWS6_MAP: &str = "GOCAST_FLOWS6";
/// `Array<u32>` of [`FLOW_TAGS`]: which flows ingress has lately found (or put) in
/// [`FLOWS4_MAP`]/[`FLOWS6_MAP`], as [`flow_tag`]s, so a packet of an established flow skips
/// that lookup: an array read instead of a hash lookup. A tag that does not match (another
/// flow's in the same place, a new generation, a flow from before the agent started) sends its
/// packet to the flow map, which writes the entry if missing; two flows match each other's tag
/// only by chance ([`flow_tag`]). Only the eBPF programs use it.
pub const FLOW_TAGS_MAP: &str = "GOCAST_FLOW_TAGS";
/// `Array<u32>` of [`MAX_VIPS`]: the generation of each counter slot. The agent bumps it after
/// changing the slot's VIP or its NAT rules, and rewrites the VIP's rules with it; a
/// [`NatTarget`] or [`NatFlow`] of an older generation is stale: its packet takes the long way
/// through [`VIPS_MAP`] (ingress), or is counted by its VIP's current slot (egress).
pub const SLOTS_MAP: &str = "GOCAST_SLOTS";
/// `Array<PortBits>` of [`PORT_WORDS`]: which ports are a NAT rule's VIP port or target port, so
/// packets on other ports skip the flow maps; with the VIP port bits, a few bits of the rules'
/// VIPs, so packets to other addresses on those ports skip them too.
pub const PORTS_MAP: &str = "GOCAST_PORTS";
/// `Array<u64>` of [`ADDR_WORDS`]: a bit per value of [`addr_bit`]'s fold of an address, set
/// for every VIP in [`VIPS_MAP`] (and possibly for addresses that were VIPs). A packet whose
/// destination's bit is clear is no VIP's: ingress skips the flow maps and [`VIPS_MAP`],
/// egress counting skips [`VIPS_MAP`] for its source.
pub const VIP_ADDRS_MAP: &str = "GOCAST_VIP_ADDRS";
/// `PerCpuArray<VipCounters>`: per-VIP counters at the index [`VIPS_MAP`] gives; user space sums
/// the per-CPU values.
pub const COUNTERS_MAP: &str = "GOCAST_COUNTERS";
/// `ProgramArray` with [`XDP_LOG_PROGRAM`] at index 0: XDP tail-calls it to log a rare event.
/// Left empty, the tail call fails and XDP goes on without logging.
pub const XDP_LOG_MAP: &str = "GOCAST_XDP_LOG";
/// `ProgramArray` with [`TC_LOG_PROGRAM`] at index 0, as [`XDP_LOG_MAP`] for TC ingress and
/// egress.
pub const TC_LOG_MAP: &str = "GOCAST_TC_LOG";
/// The XDP program that emits a record XDP noted (aya-log), then passes the packet.
pub const XDP_LOG_PROGRAM: &str = "gocast_xdp_log";
/// The TC program that emits a record TC ingress or egress noted (aya-log), then lets the
/// packet go.
pub const TC_LOG_PROGRAM: &str = "gocast_tc_log";

/// An XDP program that only returns `XDP_PASS`. Never attached: `bench nat` times it with
/// `BPF_PROG_TEST_RUN` on the same frame as the real programs, as the floor of what the harness
/// itself charges per run.
pub const XDP_FLOOR_PROGRAM: &str = "gocast_xdp_floor";
/// [`XDP_FLOOR_PROGRAM`]'s TC twin (returns `TC_ACT_OK`), the floor of the TC figures.
pub const TC_FLOOR_PROGRAM: &str = "gocast_tc_floor";

/// Capacity of [`VIPS_MAP`] and [`COUNTERS_MAP`].
pub const MAX_VIPS: u32 = 4096;
/// Capacity of [`NAT_MAP`].
pub const MAX_NAT_RULES: u32 = 4096;
/// Capacity of each flow map ([`FLOWS4_MAP`], [`FLOWS6_MAP`]); beyond it the least recently
/// used flows are evicted.
pub const MAX_FLOWS: u32 = 65_536;
/// Entries of [`FLOW_TAGS_MAP`] (a power of two; 256 KiB).
pub const FLOW_TAGS: u32 = 65_536;
/// Entries of [`PORTS_MAP`]: one bit per port.
pub const PORT_WORDS: u32 = 65_536 / 64;
/// Entries of [`VIP_ADDRS_MAP`]: one bit per 16-bit fold of an address.
pub const ADDR_WORDS: u32 = 65_536 / 64;

/// An address as map bytes and its family, per the module's layout rule.
#[must_use]
pub const fn addr_bytes(addr: IpAddr) -> ([u8; 16], u8) {
    match addr {
        IpAddr::V4(a) => {
            let o = a.octets();
            (
                [o[0], o[1], o[2], o[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                FAMILY_V4,
            )
        }
        IpAddr::V6(a) => (a.octets(), FAMILY_V6),
    }
}

/// Key of [`VIPS_MAP`]: a VIP address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VipKey {
    /// The VIP, network order (IPv4 in bytes `0..4`).
    pub addr: [u8; 16],
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// Zero; with `_pad2`, 3 bytes in two fields (see [`FlowKey`]'s).
    pub _pad: u8,
    /// Zero.
    pub _pad2: u16,
}
#[cfg(feature = "user")]
// SAFETY: `repr(C)`, integers and byte arrays only, no implicit padding (size checked below).
unsafe impl aya::Pod for VipKey {}
const _: () = assert!(size_of::<VipKey>() == 20);

impl VipKey {
    /// The key of `vip`.
    #[must_use]
    pub const fn new(vip: IpAddr) -> Self {
        let (addr, family) = addr_bytes(vip);
        Self {
            addr,
            family,
            _pad: 0,
            _pad2: 0,
        }
    }

    /// The VIP this key stands for; `None` for a family that is neither.
    #[must_use]
    pub const fn ip(&self) -> Option<IpAddr> {
        let a = self.addr;
        match self.family {
            FAMILY_V4 => Some(IpAddr::V4(core::net::Ipv4Addr::new(a[0], a[1], a[2], a[3]))),
            FAMILY_V6 => Some(IpAddr::V6(core::net::Ipv6Addr::from_octets(a))),
            _ => None,
        }
    }
}

/// Key of [`NAT_MAP`]: traffic to a VIP port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NatKey {
    /// The VIP, network order (IPv4 in bytes `0..4`).
    pub vip: [u8; 16],
    /// Destination port, network order.
    pub port: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// Zero; rounds the key to 8 bytes.
    pub _pad: [u8; 4],
}
#[cfg(feature = "user")]
// SAFETY: `repr(C)`, integers and byte arrays only, no implicit padding (size checked below).
unsafe impl aya::Pod for NatKey {}
const _: () = assert!(size_of::<NatKey>() == 24);

impl NatKey {
    /// The key of `vip`:`port` (host order) over `proto`.
    #[must_use]
    pub const fn new(vip: IpAddr, port: u16, proto: u8) -> Self {
        let (vip, family) = addr_bytes(vip);
        Self {
            vip,
            port: port.to_be(),
            proto,
            family,
            _pad: [0; 4],
        }
    }
}

/// Value of [`NAT_MAP`]: the real destination, and all a packet of the rule needs besides, so a
/// packet of an established flow costs this one hash lookup (and the generation's array read):
/// its checksum difference and its VIP's counter slot. Same family as the key (no 4↔6
/// translation).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NatTarget {
    /// New destination address, network order (IPv4 in bytes `0..4`).
    pub dest: [u8; 16],
    /// New destination port, network order.
    pub port: u16,
    /// What replacing the VIP by `dest` adds to a checksum over it ([`NatFlow::addr_diff`]).
    pub addr_diff: u16,
    /// The VIP's counter slot (index into [`COUNTERS_MAP`]).
    pub slot: u32,
    /// [`SLOTS_MAP`]'s generation of `slot` when the rule was written.
    pub generation: u32,
}
#[cfg(feature = "user")]
// SAFETY: `repr(C)`, integers and byte arrays only, no implicit padding (size checked below).
unsafe impl aya::Pod for NatTarget {}
const _: () = assert!(size_of::<NatTarget>() == 28);

impl NatTarget {
    /// Send traffic to `vip` to `dest`:`port` (host order), counted in `slot` of `generation`.
    /// `dest` must have the VIP's family.
    #[must_use]
    pub const fn new(vip: IpAddr, dest: IpAddr, port: u16, (slot, generation): (u32, u32)) -> Self {
        let addr_diff = match (vip, dest) {
            (IpAddr::V4(v), IpAddr::V4(d)) => crate::csum::addr_diff(&v.octets(), &d.octets()),
            (v, d) => crate::csum::addr_diff(&addr_bytes(v).0, &addr_bytes(d).0),
        };
        Self {
            dest: addr_bytes(dest).0,
            port: port.to_be(),
            addr_diff,
            slot,
            generation,
        }
    }

    /// Whether this rule sends to `dest`:`port` (host order), whatever its slot.
    #[must_use]
    pub fn sends_to(&self, dest: IpAddr, port: u16) -> bool {
        self.dest == addr_bytes(dest).0 && self.port == port.to_be()
    }
}

/// Key of the flow maps ([`FLOWS4_MAP`], [`FLOWS6_MAP`]): a flow the NAT rewrote, its **reply** 5-tuple as
/// seen on egress (NAT target → client); also the key of a 5-tuple in the eBPF programs. `A` is
/// the address as in the packet: `[u8; 4]` (16-byte key) or `[u8; 16]` (40 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey<A> {
    /// Source address, network order.
    pub src: A,
    /// Destination address, network order.
    pub dst: A,
    /// Source port, network order.
    pub src_port: u16,
    /// Destination port, network order.
    pub dst_port: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// Zero. The 3 bytes of padding are two fields, not a `[u8; 3]`: the eBPF build zeroes a
    /// 3-byte array with a call to a byte-wise `memset` (a BPF-to-BPF call and a loop, on
    /// every packet that builds a key), a byte and a 16-bit field with two stores.
    pub _pad: u8,
    /// Zero.
    pub _pad2: u16,
}
#[cfg(feature = "user")]
// SAFETY: `repr(C)`, integers and byte arrays only, no implicit padding (size checked below).
unsafe impl aya::Pod for FlowKey<[u8; 4]> {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for FlowKey<[u8; 16]> {}
const _: () = assert!(size_of::<FlowKey<[u8; 4]>>() == 16);
const _: () = assert!(size_of::<FlowKey<[u8; 16]>>() == 40);

/// Value of the flow maps ([`FLOWS4_MAP`], [`FLOWS6_MAP`]): how TC egress rewrites a reply of a
/// flow the NAT rewrote: the new source (the VIP and port the client used). In the eBPF
/// programs also how ingress rewrites a packet (the new destination, from its [`NatTarget`]).
/// `A` as in [`FlowKey`]: 16 bytes for IPv4, 28 for IPv6.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NatFlow<A> {
    /// The address to write, network order.
    pub addr: A,
    /// The port to write, network order.
    pub port: u16,
    /// What replacing the packet's address by `addr` adds to a checksum over it: the folded
    /// one's-complement sum of `~old + new` over its 16-bit words (RFC 1624 eqn. 3, see
    /// `csum::addr_diff`). The IPv4 header checksum and the TCP/UDP pseudo-header change by the
    /// same amount.
    pub addr_diff: u16,
    /// The VIP's counter slot (index into [`COUNTERS_MAP`]).
    pub slot: u32,
    /// [`SLOTS_MAP`]'s generation of `slot` when the entry was written.
    pub generation: u32,
}
#[cfg(feature = "user")]
// SAFETY: `repr(C)`, integers and byte arrays only, no implicit padding (size checked below).
unsafe impl aya::Pod for NatFlow<[u8; 4]> {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for NatFlow<[u8; 16]> {}
const _: () = assert!(size_of::<NatFlow<[u8; 4]>>() == 16);
const _: () = assert!(size_of::<NatFlow<[u8; 16]>>() == 28);

/// Value of [`PORTS_MAP`]: 64 ports each. A port `p` in network order (the `u16` of its wire
/// bytes, as in the keys) is bit `p % 64` of entry `p / 64`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortBits {
    /// Ports some NAT rule has as its VIP port (ingress looks up [`NAT_MAP`]).
    pub vip: u64,
    /// Ports some NAT rule has as its target port (egress looks up [`FLOWS4_MAP`] or
    /// [`FLOWS6_MAP`]).
    pub target: u64,
    /// For the rules whose VIP port is in `vip`: bit [`addr_bit`]`(vip).1` of each one's VIP.
    /// Clear for a packet's destination: no rule of these ports is for it.
    pub vip_addr: u64,
}
#[cfg(feature = "user")]
// SAFETY: `repr(C)`, `u64`s only, no padding (size checked below).
unsafe impl aya::Pod for PortBits {}
const _: () = assert!(size_of::<PortBits>() == 24);

/// Where a port (network order) sits in [`PORTS_MAP`]: entry index and bit mask.
#[inline(always)]
#[expect(
    clippy::inline_always,
    reason = "on the eBPF hot path, which must not make BPF-to-BPF calls"
)]
#[must_use]
pub const fn port_bit(port: u16) -> (u32, u64) {
    ((port / 64) as u32, 1 << (port % 64))
}

/// Where an address sits in [`VIP_ADDRS_MAP`]: entry index and bit mask. For map bytes (`N` =
/// 16, either family) the fold is bytes `2..4` XOR bytes `14..16`: an IPv4 address's last two
/// bytes (its bytes `4..16` are zero), an IPv6 address's last two XOR a prefix constant; for an
/// IPv4 address as in the packet (`N` = 4), the same last two bytes. VIPs differ in those
/// bytes, and so, mostly, do the host's other addresses; two loads and an XOR at most.
#[inline(always)]
#[expect(
    clippy::inline_always,
    reason = "on the eBPF hot path, which must not make BPF-to-BPF calls"
)]
#[must_use]
pub const fn addr_bit<const N: usize>(addr: &[u8; N]) -> (u32, u64) {
    let head = u16::from_ne_bytes([addr[2], addr[3]]);
    let fold = if N > 4 {
        head ^ u16::from_ne_bytes([addr[N - 2], addr[N - 1]])
    } else {
        head
    };
    port_bit(fold)
}

/// Value of [`COUNTERS_MAP`]: one VIP's traffic on one CPU, host order. "In" is traffic to the
/// VIP seen by XDP; "out" is traffic from the VIP (or rewritten back to it) seen by TC egress.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
pub struct VipCounters {
    /// Packets to the VIP.
    pub packets_in: u64,
    /// Bytes to the VIP (whole frames as XDP sees them).
    pub bytes_in: u64,
    /// Packets from the VIP.
    pub packets_out: u64,
    /// Bytes from the VIP.
    pub bytes_out: u64,
    /// TCP SYNs (without ACK) to the VIP: new connections.
    pub syn_in: u64,
    /// TCP SYN-ACKs from the VIP: accepted connections.
    pub synack_out: u64,
    /// TCP RSTs from the VIP: refused or reset connections.
    pub rst_out: u64,
}
#[cfg(feature = "user")]
// SAFETY: `repr(C)`, `u64`s only, no padding (size checked below).
unsafe impl aya::Pod for VipCounters {}
const _: () = assert!(size_of::<VipCounters>() == 56);

impl VipCounters {
    /// Adds `other` field by field (summing per-CPU values in user space).
    #[must_use]
    pub const fn sum(self, other: &Self) -> Self {
        Self {
            packets_in: self.packets_in.wrapping_add(other.packets_in),
            bytes_in: self.bytes_in.wrapping_add(other.bytes_in),
            packets_out: self.packets_out.wrapping_add(other.packets_out),
            bytes_out: self.bytes_out.wrapping_add(other.bytes_out),
            syn_in: self.syn_in.wrapping_add(other.syn_in),
            synack_out: self.synack_out.wrapping_add(other.synack_out),
            rst_out: self.rst_out.wrapping_add(other.rst_out),
        }
    }

    /// `self - earlier` field by field, or `None` when a counter went backwards (the VIP was
    /// removed and added again, which zeroes its counters).
    #[must_use]
    pub const fn checked_since(self, earlier: &Self) -> Option<Self> {
        let (Some(packets_in), Some(bytes_in), Some(packets_out), Some(bytes_out)) = (
            self.packets_in.checked_sub(earlier.packets_in),
            self.bytes_in.checked_sub(earlier.bytes_in),
            self.packets_out.checked_sub(earlier.packets_out),
            self.bytes_out.checked_sub(earlier.bytes_out),
        ) else {
            return None;
        };
        let (Some(syn_in), Some(synack_out), Some(rst_out)) = (
            self.syn_in.checked_sub(earlier.syn_in),
            self.synack_out.checked_sub(earlier.synack_out),
            self.rst_out.checked_sub(earlier.rst_out),
        ) else {
            return None;
        };
        Some(Self {
            packets_in,
            bytes_in,
            packets_out,
            bytes_out,
            syn_in,
            synack_out,
            rst_out,
        })
    }
}

/// Where a flow sits in [`FLOW_TAGS_MAP`], and its tag there: from its packets' addresses
/// (folded to 32 bits), their ports (as the `u16`s of [`FlowKey`]), its protocol and the rule's
/// generation. For given ports and protocol, the mix (multiply by odd constants, xor-shift,
/// after `splitmix64`) is a bijection of the two addresses' 64 bits, so two flows share index
/// and tag (48 bits of it) only by chance, about 1 in 2^48, never by a pattern in their
/// addresses; a few 64-bit multiplies on the eBPF path. The tag is never 0, what an unused
/// entry holds.
#[inline(always)]
#[expect(
    clippy::inline_always,
    reason = "on the eBPF hot path, which must not make BPF-to-BPF calls"
)]
#[expect(
    clippy::cast_possible_truncation,
    reason = "the index has FLOW_TAGS' 16 bits; the tag takes the low 32 on purpose"
)]
#[must_use]
pub const fn flow_tag(
    src: u32,
    dst: u32,
    (src_port, dst_port): (u16, u16),
    proto: u8,
    generation: u32,
) -> (u32, u32) {
    let rest = (src_port as u64) << 24 | (dst_port as u64) << 8 | proto as u64;
    let mut h = ((src as u64) << 32 | dst as u64) ^ rest.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    let index = (h >> (64 - FLOW_TAGS.trailing_zeros())) as u32;
    let tag = (h as u32 ^ generation.wrapping_mul(0x9e37_79b1)) | 1;
    (index, tag)
}

#[cfg(test)]
mod tests {
    use core::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    #[test]
    fn a_flow_tag_is_never_an_unused_entry_and_changes_with_the_generation() {
        let (mut indices, mut zero) = (std::collections::HashSet::new(), false);
        for port in 1024..u16::MAX {
            let (index, tag) = flow_tag(0x0a00_0001, 0xc000_020a, (port.to_be(), 80), 6, 7);
            assert!(index < FLOW_TAGS);
            zero |= tag == 0;
            indices.insert(index);
            assert_ne!(
                flow_tag(0x0a00_0001, 0xc000_020a, (port.to_be(), 80), 6, 8).1,
                tag
            );
            // UDP between the same ends is another flow.
            assert_ne!(
                flow_tag(0x0a00_0001, 0xc000_020a, (port.to_be(), 80), 17, 7),
                (index, tag)
            );
        }
        assert!(!zero);
        // One client's ports spread over the table as a random function would: 64,511 flows
        // in 65,536 entries leave ~41,000 distinct (1 - 1/e of them), not a few thousand.
        assert!(indices.len() > 39_000, "{} entries used", indices.len());
    }

    #[test]
    fn counters_since_an_earlier_read_are_none_when_one_went_backwards() {
        let earlier = VipCounters {
            packets_in: 5,
            syn_in: 2,
            ..VipCounters::default()
        };
        let now = VipCounters {
            packets_in: 9,
            syn_in: 3,
            rst_out: 1,
            ..VipCounters::default()
        };
        let delta = now.checked_since(&earlier).unwrap();
        assert_eq!((delta.packets_in, delta.syn_in, delta.rst_out), (4, 1, 1));
        assert_eq!(earlier.checked_since(&now), None);
    }

    #[test]
    fn vip_keys_give_back_their_address() {
        for ip in [
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)),
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
        ] {
            assert_eq!(VipKey::new(ip).ip(), Some(ip));
        }
        assert_eq!(VipKey::default().ip(), None);
    }

    #[test]
    fn ipv4_keys_hold_the_address_in_the_first_four_bytes() {
        let k = NatKey::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 80, PROTO_TCP);
        assert_eq!(&k.vip[..4], &[192, 0, 2, 1]);
        assert!(k.vip[4..].iter().all(|&b| b == 0));
        assert_eq!(k.family, FAMILY_V4);
        // Network order: the wire bytes 0x00 0x50 in memory.
        assert_eq!(k.port.to_ne_bytes(), [0, 80]);
    }

    #[test]
    fn ipv6_keys_hold_the_whole_address() {
        let a = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
        let k = VipKey::new(IpAddr::V6(a));
        assert_eq!(k.addr, a.octets());
        assert_eq!(k.family, FAMILY_V6);
    }

    #[test]
    fn an_ipv4_address_folds_to_its_last_two_bytes_and_ipv6_to_theirs_xor_a_prefix_constant() {
        let v4 = VipKey::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 81))).addr;
        assert_eq!(addr_bit(&v4), port_bit(u16::from_ne_bytes([2, 81])));
        let v6 = VipKey::new(IpAddr::V6(Ipv6Addr::new(
            0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x281,
        )))
        .addr;
        assert_eq!(
            addr_bit(&v6),
            port_bit(u16::from_ne_bytes([0x0d ^ 0x02, 0xb8 ^ 0x81]))
        );
        let other = VipKey::new(IpAddr::V4(Ipv4Addr::new(198, 18, 255, 2))).addr;
        assert_ne!(addr_bit(&other), addr_bit(&v4));
        // As the packet carries it, an IPv4 address folds as its map bytes do.
        assert_eq!(addr_bit(&[192, 0, 2, 81]), addr_bit(&v4));
    }

    #[test]
    fn counters_sum_field_by_field() {
        let a = VipCounters {
            packets_in: 1,
            bytes_in: 2,
            packets_out: 3,
            bytes_out: 4,
            syn_in: 5,
            synack_out: 6,
            rst_out: 7,
        };
        let s = a.sum(&a);
        assert_eq!((s.packets_in, s.rst_out), (2, 14));
    }
}
