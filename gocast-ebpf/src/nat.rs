//! Destination NAT in XDP (VIP:port → target) and its reverse in TC egress (target → VIP:port).
//!
//! XDP rewrites the frame in place with RFC 1624 incremental checksums (pure functions in
//! `gocast_common::csum`). TC egress uses the kernel's `bpf_l3/l4_csum_replace`, which also
//! handle `CHECKSUM_PARTIAL` skbs (locally generated packets whose L4 checksum the NIC
//! finishes), something a pure update cannot see.
//!
//! A new flow, a refused flow-map insert and a failed reverse rewrite are noted for the log
//! programs (`crate::logs`); nothing else is.

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
    logs::{self, INSERT_FAILED, NEW_FLOW, Pending, REVERSE_FAILED},
    parse::{
        Flow, IPV4_CHECK_OFFSET, IPV4_SRC_OFFSET, IPV6_SRC_OFFSET, Ipv4Hdr, Ipv6Hdr, Ports,
        TCP_CHECK_OFFSET, UDP_CHECK_OFFSET, ptr_at,
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

/// If `NAT_MAP` has a rule for this flow's destination, rewrites it to the target, records the
/// flow for the reply direction, and returns `true`. A `syn` (a new TCP connection) or a
/// refused flow-map insert is noted for the log program, and `log` set.
#[inline(always)]
pub fn dnat(ctx: &XdpContext, flow: &Flow, syn: bool, log: &mut bool) -> Result<bool, ()> {
    let key = NatKey {
        vip: flow.dst,
        port: flow.dst_port,
        proto: flow.proto,
        family: flow.family,
        _pad: [0; 4],
    };
    // SAFETY: copied out at once; a concurrent update at worst sends this packet to the old
    // target.
    let Some(target) = (unsafe { NAT.get(key) }).copied() else {
        return Ok(false);
    };

    rewrite_dst(ctx, flow, &target)?;
    let errno = remember(flow, &target);
    if errno != 0 || syn {
        *log = logs::note(
            logs::XDP_SLOT,
            Pending {
                event: if errno != 0 { INSERT_FAILED } else { NEW_FLOW },
                family: flow.family,
                vip_port: u16::from_be(flow.dst_port),
                dest_port: u16::from_be(target.port),
                _pad: [0; 2],
                errno: c_long::from(errno),
                vip: flow.dst,
                dest: target.dest,
            },
        );
    }
    Ok(true)
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
    if let Err(errno) = restore_src(ctx, flow, &orig) {
        *log = logs::note(
            logs::TC_SLOT,
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

/// Rewrites the reply's source to `orig`'s VIP and port with the kernel's checksum helpers;
/// `Err` is the failing helper's (negative) error code.
#[inline(always)]
fn restore_src(ctx: &TcContext, flow: &Flow, orig: &FlowValue) -> Result<(), c_long> {
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
        let old = u32::from_ne_bytes([flow.src[0], flow.src[1], flow.src[2], flow.src[3]]);
        let new = u32::from_ne_bytes([orig.vip[0], orig.vip[1], orig.vip[2], orig.vip[3]]);
        ctx.l4_csum_replace(check_at, u64::from(old), u64::from(new), pseudo | 4)?;
        ctx.l3_csum_replace(
            flow.l3 + IPV4_CHECK_OFFSET,
            u64::from(old),
            u64::from(new),
            4,
        )?;
        ctx.store(flow.l3 + IPV4_SRC_OFFSET, &new, 0)?;
    } else {
        let mut from = words(flow.src);
        let mut to = words(orig.vip);
        // SAFETY: both buffers are 16 bytes on this stack frame, the sizes passed.
        let diff = unsafe { bpf_csum_diff(from.as_mut_ptr(), 16, to.as_mut_ptr(), 16, 0) };
        if diff < 0 {
            return Err(diff);
        }
        #[expect(clippy::cast_sign_loss, reason = "checked non-negative above")]
        let diff = diff as u64;
        // Size 0: `to` is a precomputed checksum difference (16-byte fields have no size flag).
        ctx.l4_csum_replace(check_at, 0, diff, pseudo)?;
        ctx.store(flow.l3 + IPV6_SRC_OFFSET, &orig.vip, 0)?;
    }
    ctx.l4_csum_replace(
        check_at,
        u64::from(flow.src_port),
        u64::from(orig.port),
        udp_flags | 2,
    )?;
    ctx.store(flow.l4, &orig.port, 0)
}
