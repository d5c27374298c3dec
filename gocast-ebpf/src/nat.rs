//! Destination NAT (VIP:port → target) in XDP or TC ingress, and its reverse in TC egress
//! (target → VIP:port).
//!
//! XDP rewrites the frame in place with RFC 1624 incremental checksums (pure functions in
//! `gocast_common::csum`). The TC programs use the kernel's `bpf_l3/l4_csum_replace`, which
//! also handle `CHECKSUM_PARTIAL` skbs (packets whose L4 checksum is finished later, e.g. from
//! a veth peer), something a pure update cannot see.
//!
//! A new flow, a refused flow-map insert and a failed rewrite (TC, either way) are noted for the
//! log programs (`crate::logs`); nothing else is.

use aya_ebpf::{
    bindings::{BPF_F_PSEUDO_HDR, BPF_NOEXIST},
    cty::c_long,
    helpers::bpf_csum_diff,
    programs::{TcContext, XdpContext},
};
use gocast_common::{
    csum::{csum_replace2, csum_replace4, csum_replace16, udp_has_checksum, udp_mangled},
    maps::{FAMILY_V4, FlowKey, FlowValue, NatKey, NatTarget, PROTO_TCP},
};

use crate::{
    FLOWS, NAT,
    logs::{self, DNAT_FAILED, INSERT_FAILED, NEW_FLOW, Pending, REVERSE_FAILED},
    parse::{
        Flow, IPV4_CHECK_OFFSET, IPV4_DST_OFFSET, IPV4_SRC_OFFSET, IPV6_DST_OFFSET,
        IPV6_SRC_OFFSET, Ipv4Hdr, Ipv6Hdr, Ports, TCP_CHECK_OFFSET, UDP_CHECK_OFFSET, ptr_at,
    },
};

/// `EEXIST`: a `BPF_NOEXIST` insert lost a race with another CPU inserting the same flow.
const EEXIST: i32 = 17;

/// An IPv6 address as the four `__be32` words `bpf_csum_diff` takes.
#[inline(always)]
fn words(a: [u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

/// Offset of the L4 checksum for `proto`.
#[inline(always)]
fn l4_check_offset(proto: u8) -> usize {
    if proto == PROTO_TCP {
        TCP_CHECK_OFFSET
    } else {
        UDP_CHECK_OFFSET
    }
}

/// The NAT rule for this flow's destination, if `NAT_MAP` has one.
#[inline(always)]
fn target(flow: &Flow) -> Option<NatTarget> {
    let key = NatKey {
        vip: flow.dst,
        port: flow.dst_port,
        proto: flow.proto,
        family: flow.family,
        _pad: [0; 4],
    };
    // SAFETY: copied out at once; a concurrent update at worst sends this packet to the old
    // target.
    (unsafe { NAT.get(key) }).copied()
}

/// XDP: if `NAT_MAP` has a rule for this flow's destination, rewrites it to the target,
/// records the flow for the reply direction, and returns `true`. A `syn` (a new TCP connection)
/// or a refused flow-map insert is noted for the log program, and `log` set.
#[inline(always)]
pub fn dnat(ctx: &XdpContext, flow: &Flow, syn: bool, log: &mut bool) -> Result<bool, ()> {
    let Some(target) = target(flow) else {
        return Ok(false);
    };
    rewrite_dst(ctx, flow, &target)?;
    let errno = remember(flow, &target);
    if errno != 0 || syn {
        let event = if errno != 0 { INSERT_FAILED } else { NEW_FLOW };
        *log = note_dnat(logs::XDP_SLOT, event, c_long::from(errno), flow, &target);
    }
    Ok(true)
}

/// TC ingress: the same as [`dnat`] on an skb; a failed rewrite is noted too.
#[inline(always)]
pub fn dnat_skb(ctx: &TcContext, flow: &Flow, syn: bool, log: &mut bool) -> Result<bool, ()> {
    let Some(target) = target(flow) else {
        return Ok(false);
    };
    if let Err(errno) = rewrite_skb(ctx, flow, End::Dst, target.dest, target.port) {
        *log = note_dnat(logs::TC_INGRESS_SLOT, DNAT_FAILED, errno, flow, &target);
        return Err(());
    }
    let errno = remember(flow, &target);
    if errno != 0 || syn {
        let event = if errno != 0 { INSERT_FAILED } else { NEW_FLOW };
        *log = note_dnat(
            logs::TC_INGRESS_SLOT,
            event,
            c_long::from(errno),
            flow,
            &target,
        );
    }
    Ok(true)
}

/// Notes `event` about `flow`, which a NAT rule sends to `target`, in `slot`; `true` if the log
/// program should be tail-called.
#[inline(always)]
fn note_dnat(slot: u32, event: u8, errno: c_long, flow: &Flow, target: &NatTarget) -> bool {
    logs::note(
        slot,
        Pending {
            event,
            family: flow.family,
            vip_port: u16::from_be(flow.dst_port),
            dest_port: u16::from_be(target.port),
            _pad: [0; 2],
            errno,
            vip: flow.dst,
            dest: target.dest,
        },
    )
}

/// Rewrites the destination address and port, updating the IPv4 header checksum and the
/// TCP/UDP checksum (whose pseudo-header covers the address).
#[inline(always)]
fn rewrite_dst(ctx: &XdpContext, flow: &Flow, target: &NatTarget) -> Result<(), ()> {
    let check: *mut [u8; 2] = ptr_at(ctx, flow.l4 + l4_check_offset(flow.proto))?;
    let ports: *mut Ports = ptr_at(ctx, flow.l4)?;
    // SAFETY: `ptr_at` checked that the checksum is inside the packet.
    let old_l4 = u16::from_be_bytes(unsafe { *check });
    // An IPv4 UDP datagram without a checksum keeps none.
    let l4_sum = flow.proto == PROTO_TCP || flow.family != FAMILY_V4 || udp_has_checksum(old_l4);
    let old_port = u16::from_be(flow.dst_port);
    let new_port = u16::from_be(target.port);
    let mut l4 = old_l4;

    if flow.family == FAMILY_V4 {
        let ip: *mut Ipv4Hdr = ptr_at(ctx, flow.l3)?;
        let old = [flow.dst[0], flow.dst[1], flow.dst[2], flow.dst[3]];
        let new = [
            target.dest[0],
            target.dest[1],
            target.dest[2],
            target.dest[3],
        ];
        // SAFETY: `ptr_at` checked that the header is inside the packet.
        unsafe {
            let l3 = csum_replace4(u16::from_be_bytes((*ip).check), old, new);
            (*ip).check = l3.to_be_bytes();
            (*ip).dst = new;
        }
        l4 = csum_replace4(l4, old, new);
    } else {
        let ip: *mut Ipv6Hdr = ptr_at(ctx, flow.l3)?;
        // SAFETY: `ptr_at` checked that the header is inside the packet.
        unsafe { (*ip).dst = target.dest };
        l4 = csum_replace16(l4, &flow.dst, &target.dest);
    }
    l4 = csum_replace2(l4, old_port, new_port);

    // SAFETY: `ptr_at` checked both are inside the packet.
    unsafe {
        (*ports).dst = target.port.to_ne_bytes();
        if l4_sum {
            let l4 = if flow.proto == PROTO_TCP {
                l4
            } else {
                udp_mangled(l4)
            };
            *check = l4.to_be_bytes();
        }
    }
    Ok(())
}

/// Records the flow under its reply's 5-tuple so TC egress can restore the VIP. Returns 0, or
/// the kernel's (negative) error code if it refused: a plain integer, as a `Result` leaves its
/// error undefined on success, which LLVM may fill with a pointer the verifier rejects.
#[inline(always)]
fn remember(flow: &Flow, target: &NatTarget) -> i32 {
    let key = FlowKey {
        src: target.dest,
        dst: flow.src,
        src_port: target.port,
        dst_port: flow.src_port,
        proto: flow.proto,
        family: flow.family,
        _pad: [0; 2],
    };
    let value = FlowValue {
        vip: flow.dst,
        port: flow.dst_port,
        _pad: [0; 2],
    };
    // Most packets belong to a known flow: a lookup (which also refreshes the LRU) is cheaper
    // than an update. An entry for another VIP is replaced.
    if let Some(known) = FLOWS.get_ptr(key) {
        // SAFETY: a map value pointer from a successful lookup.
        let known = unsafe { *known };
        if known.vip == value.vip && known.port == value.port {
            return 0;
        }
        // A full flows map evicts, so insert fails only on kernel errors: the reply then goes
        // out un-NATed, the same as with no entry; the warning is the only trace of it.
        return FLOWS.insert(key, value, 0).err().unwrap_or(0);
    }
    match FLOWS.insert(key, value, u64::from(BPF_NOEXIST)) {
        // Another CPU recorded the flow first: it is there.
        Ok(()) => 0,
        Err(errno) if errno == -EEXIST => 0,
        Err(errno) => errno,
    }
}

/// For the SYN of a TCP connection that did not go through the NAT (sent to the service's own
/// address, or anywhere else): drops any flow entry its replies would match. That entry belongs
/// to an earlier connection from the same client port through a VIP, and would rewrite these
/// replies to come from the VIP. Only SYNs pay for this.
#[inline(always)]
pub fn forget_direct(flow: &Flow) {
    let reply = FlowKey {
        src: flow.dst,
        dst: flow.src,
        src_port: flow.dst_port,
        dst_port: flow.src_port,
        proto: flow.proto,
        family: flow.family,
        _pad: [0; 2],
    };
    let _ = FLOWS.remove(&reply);
}

/// If `FLOWS_MAP` knows this reply, rewrites its source back to the VIP and port the client
/// used and returns the VIP (family is the flow's). A failed rewrite is noted for the log
/// program, and `log` set.
#[inline(always)]
pub fn reverse(ctx: &TcContext, flow: &Flow, log: &mut bool) -> Result<Option<[u8; 16]>, ()> {
    let key = FlowKey {
        src: flow.src,
        dst: flow.dst,
        src_port: flow.src_port,
        dst_port: flow.dst_port,
        proto: flow.proto,
        family: flow.family,
        _pad: [0; 2],
    };
    let Some(orig) = FLOWS.get_ptr(key) else {
        return Ok(None);
    };
    // SAFETY: a map value pointer from a successful lookup, copied out at once.
    let orig = unsafe { *orig };
    if let Err(errno) = rewrite_skb(ctx, flow, End::Src, orig.vip, orig.port) {
        *log = logs::note(
            logs::TC_EGRESS_SLOT,
            Pending {
                event: REVERSE_FAILED,
                family: flow.family,
                vip_port: u16::from_be(orig.port),
                dest_port: u16::from_be(flow.src_port),
                _pad: [0; 2],
                errno,
                vip: orig.vip,
                dest: flow.src,
            },
        );
        return Err(());
    }
    Ok(Some(orig.vip))
}

/// Which end of a flow [`rewrite_skb`] changes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    Src,
    Dst,
}

/// Sets one end's address and port (network order) in an skb, with the kernel's checksum
/// helpers: the IPv4 header checksum, and the TCP/UDP checksum whose pseudo-header covers the
/// address. `Err` is the failing helper's (negative) error code.
#[inline(always)]
fn rewrite_skb(
    ctx: &TcContext,
    flow: &Flow,
    end: End,
    addr: [u8; 16],
    port: u16,
) -> Result<(), c_long> {
    let (old_addr, old_port, port_at) = match end {
        End::Src => (flow.src, flow.src_port, flow.l4),
        End::Dst => (flow.dst, flow.dst_port, flow.l4 + 2),
    };
    let check_at = flow.l4 + l4_check_offset(flow.proto);
    // UDP: with BPF_F_MARK_MANGLED_0 the kernel leaves a 0 checksum (IPv4 "none") alone and
    // writes a computed 0 as 0xffff.
    let udp_flags = if flow.proto == PROTO_TCP {
        0
    } else {
        u64::from(aya_ebpf::bindings::BPF_F_MARK_MANGLED_0)
    };
    let pseudo = u64::from(BPF_F_PSEUDO_HDR) | udp_flags;

    if flow.family == FAMILY_V4 {
        let addr_at = flow.l3
            + if end == End::Src {
                IPV4_SRC_OFFSET
            } else {
                IPV4_DST_OFFSET
            };
        let old = u32::from_ne_bytes([old_addr[0], old_addr[1], old_addr[2], old_addr[3]]);
        let new = u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]]);
        ctx.l4_csum_replace(check_at, u64::from(old), u64::from(new), pseudo | 4)?;
        ctx.l3_csum_replace(
            flow.l3 + IPV4_CHECK_OFFSET,
            u64::from(old),
            u64::from(new),
            4,
        )?;
        ctx.store(addr_at, &new, 0)?;
    } else {
        let addr_at = flow.l3
            + if end == End::Src {
                IPV6_SRC_OFFSET
            } else {
                IPV6_DST_OFFSET
            };
        let mut from = words(old_addr);
        let mut to = words(addr);
        // SAFETY: both buffers are 16 bytes on this stack frame, the sizes passed.
        let diff = unsafe { bpf_csum_diff(from.as_mut_ptr(), 16, to.as_mut_ptr(), 16, 0) };
        if diff < 0 {
            return Err(diff);
        }
        #[expect(clippy::cast_sign_loss, reason = "checked non-negative above")]
        let diff = diff as u64;
        // Size 0: `to` is a precomputed checksum difference (16-byte fields have no size flag).
        ctx.l4_csum_replace(check_at, 0, diff, pseudo)?;
        ctx.store(addr_at, &addr, 0)?;
    }
    ctx.l4_csum_replace(
        check_at,
        u64::from(old_port),
        u64::from(port),
        udp_flags | 2,
    )?;
    ctx.store(port_at, &port, 0)
}
