//! Logs through aya-log (target `gocast_ebpf::logs`), only on rare paths, never per ordinary
//! packet: a NAT rule matching a TCP SYN (a new flow, debug), a flow-map insert the kernel
//! refused, and a packet whose rewrite failed in TC ingress (destination) or TC egress (the
//! reply's source) (warn).
//!
//! The packet programs do not log themselves. On a rare path they [`note`] a [`Pending`] record
//! in their per-CPU slot and, once the packet's work is done, tail-call `gocast_xdp_log` (from
//! XDP) or `gocast_tc_log` (from either TC program), which emit it and return the verdict
//! (always pass: records are only noted on the way to one). Why not log in place: an aya-log
//! statement needs about 300 bytes of stack for its record and the packet path about 320, more
//! than the 512 a program may use; moving the packet path into a function of its own (a
//! BPF-to-BPF call) fits, but the call and the record's setup cost every packet 15–20 ns. A
//! tail call starts with a fresh stack, and ordinary packets run no log code, only an untaken
//! branch.
//!
//! Each statement first compares its level with `AYA_LOG_LEVEL`, a global in read-only data
//! that the agent sets at load time from its log filter; the map holding it is frozen, so the
//! verifier knows the value and removes a disabled statement. With no log program in the
//! program array (the agent loads none when logs are off), the tail call fails and the packet
//! program returns its verdict itself.

use aya_ebpf::{
    EbpfContext,
    cty::c_long,
    macros::map,
    maps::{PerCpuArray, ProgramArray},
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::{debug, warn};
use gocast_common::maps::FAMILY_V4;

/// No record.
pub const NONE: u8 = 0;
/// A NAT rule matched a TCP SYN: `vip:vip_port` now goes to `dest:dest_port`. One per SYN, so
/// a retransmitted SYN logs again; never for the packets that follow.
pub const NEW_FLOW: u8 = 1;
/// The flow map refused the flow to `vip:vip_port` (`errno`): its replies leave with the
/// backend's address.
pub const INSERT_FAILED: u8 = 2;
/// A reply of a flow to `vip:vip_port` could not be rewritten (`errno`, the helper's): it leaves
/// with the backend's address.
pub const REVERSE_FAILED: u8 = 3;
/// TC ingress could not rewrite a packet to `vip:vip_port` for `dest:dest_port` (`errno`, the
/// helper's): it reaches the host un-NATed.
pub const DNAT_FAILED: u8 = 4;

/// The slot of [`PENDING`] XDP notes in.
pub const XDP_SLOT: u32 = 0;
/// The slot of [`PENDING`] TC egress notes in. TC egress runs with bottom halves disabled and
/// the ingress programs in softirq context, so on one CPU none interrupts another; a slot per
/// program makes that irrelevant anyway.
pub const TC_EGRESS_SLOT: u32 = 1;
/// The slot of [`PENDING`] TC ingress notes in.
pub const TC_INGRESS_SLOT: u32 = 2;

/// A record noted for the log program. Addresses as in `Flow` (IPv4 in bytes `0..4`), ports in
/// host order; no implicit padding.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Pending {
    /// [`NEW_FLOW`], [`INSERT_FAILED`], [`REVERSE_FAILED`] or [`DNAT_FAILED`].
    pub event: u8,
    pub family: u8,
    pub vip_port: u16,
    pub dest_port: u16,
    pub _pad: [u8; 2],
    /// The kernel's (negative) error code for the failures, else 0.
    pub errno: c_long,
    pub vip: [u8; 16],
    pub dest: [u8; 16],
}

/// One [`Pending`] per program per CPU: a program runs to completion on its CPU, tail call
/// included, so the slot is not overwritten between [`note`] and the log program.
#[map(name = "GOCAST_PENDING_LOG")]
static PENDING: PerCpuArray<Pending> = PerCpuArray::with_max_entries(3, 0);

/// `gocast_common::maps::XDP_LOG_MAP`: `gocast_xdp_log` at index 0, if the agent loaded it.
#[map(name = "GOCAST_XDP_LOG")]
pub static XDP_LOG: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// `gocast_common::maps::TC_LOG_MAP`: `gocast_tc_log` at index 0, if the agent loaded it; both
/// TC programs tail-call it.
#[map(name = "GOCAST_TC_LOG")]
pub static TC_LOG: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Notes `pending` in `slot`; `true` if the log program should be tail-called.
#[inline(always)]
pub fn note(slot: u32, pending: Pending) -> bool {
    let Some(p) = PENDING.get_ptr_mut(slot) else {
        return false;
    };
    // SAFETY: a per-CPU slot of this program only, written whole.
    unsafe { *p = pending };
    true
}

/// The record noted in `slot`, taken (the slot is cleared).
#[inline(always)]
fn take(slot: u32) -> Option<Pending> {
    let p = PENDING.get_ptr_mut(slot)?;
    // SAFETY: as in `note`.
    unsafe {
        let pending = *p;
        (*p).event = NONE;
        Some(pending)
    }
}

/// The IPv4 address in bytes `0..4`, for `{:i}`.
#[inline(always)]
fn v4(a: &[u8; 16]) -> [u8; 4] {
    [a[0], a[1], a[2], a[3]]
}

/// Emits the record XDP noted, if any.
#[inline(always)]
pub fn emit_xdp(ctx: &XdpContext) {
    let Some(p) = take(XDP_SLOT) else { return };
    emit_ingress(ctx, &p);
}

/// Emits the record TC ingress or TC egress noted, if any (only the program that tail-called
/// has one).
#[inline(always)]
pub fn emit_tc(ctx: &TcContext) {
    if let Some(p) = take(TC_INGRESS_SLOT) {
        emit_ingress(ctx, &p);
    }
    let Some(p) = take(TC_EGRESS_SLOT) else {
        return;
    };
    match p.event {
        REVERSE_FAILED if p.family == FAMILY_V4 => {
            reverse_failed_v4(ctx, p.errno, v4(&p.vip), p.vip_port);
        }
        REVERSE_FAILED => reverse_failed_v6(ctx, p.errno, &p.vip, p.vip_port),
        _ => {}
    }
}

/// Emits a record an ingress program (XDP or TC) noted. One statement per event and family,
/// each in a function of its own, so each frame holds one record.
#[inline(always)]
fn emit_ingress<C: EbpfContext>(ctx: &C, p: &Pending) {
    let is_v4 = p.family == FAMILY_V4;
    match p.event {
        NEW_FLOW if is_v4 => new_flow_v4(ctx, v4(&p.vip), p.vip_port, v4(&p.dest), p.dest_port),
        NEW_FLOW => new_flow_v6(ctx, &p.vip, p.vip_port, &p.dest, p.dest_port),
        INSERT_FAILED if is_v4 => insert_failed_v4(ctx, p.errno, v4(&p.vip), p.vip_port),
        INSERT_FAILED => insert_failed_v6(ctx, p.errno, &p.vip, p.vip_port),
        DNAT_FAILED if is_v4 => dnat_failed_v4(
            ctx,
            p.errno,
            v4(&p.vip),
            p.vip_port,
            v4(&p.dest),
            p.dest_port,
        ),
        DNAT_FAILED => dnat_failed_v6(ctx, p.errno, &p.vip, p.vip_port, &p.dest, p.dest_port),
        _ => {}
    }
}

#[inline(never)]
fn new_flow_v4<C: EbpfContext>(
    ctx: &C,
    vip: [u8; 4],
    vip_port: u16,
    dest: [u8; 4],
    dest_port: u16,
) {
    debug!(
        ctx,
        "new flow to {:i}:{} NATed to {:i}:{}", vip, vip_port, dest, dest_port
    );
}

#[inline(never)]
fn new_flow_v6<C: EbpfContext>(
    ctx: &C,
    vip: &[u8; 16],
    vip_port: u16,
    dest: &[u8; 16],
    dest_port: u16,
) {
    debug!(
        ctx,
        "new flow to [{:i}]:{} NATed to [{:i}]:{}", *vip, vip_port, *dest, dest_port
    );
}

#[inline(never)]
fn insert_failed_v4<C: EbpfContext>(ctx: &C, errno: c_long, vip: [u8; 4], vip_port: u16) {
    warn!(
        ctx,
        "flow map insert failed (error {}): replies of a flow to {:i}:{} leave un-NATed",
        errno,
        vip,
        vip_port
    );
}

#[inline(never)]
fn insert_failed_v6<C: EbpfContext>(ctx: &C, errno: c_long, vip: &[u8; 16], vip_port: u16) {
    warn!(
        ctx,
        "flow map insert failed (error {}): replies of a flow to [{:i}]:{} leave un-NATed",
        errno,
        *vip,
        vip_port
    );
}

#[inline(never)]
fn dnat_failed_v4<C: EbpfContext>(
    ctx: &C,
    errno: c_long,
    vip: [u8; 4],
    vip_port: u16,
    dest: [u8; 4],
    dest_port: u16,
) {
    warn!(
        ctx,
        "NAT rewrite to {:i}:{} failed (error {}): a packet of a flow to {:i}:{} reaches the \
         host un-NATed",
        dest,
        dest_port,
        errno,
        vip,
        vip_port
    );
}

#[inline(never)]
fn dnat_failed_v6<C: EbpfContext>(
    ctx: &C,
    errno: c_long,
    vip: &[u8; 16],
    vip_port: u16,
    dest: &[u8; 16],
    dest_port: u16,
) {
    warn!(
        ctx,
        "NAT rewrite to [{:i}]:{} failed (error {}): a packet of a flow to [{:i}]:{} reaches \
         the host un-NATed",
        *dest,
        dest_port,
        errno,
        *vip,
        vip_port
    );
}

#[inline(never)]
fn reverse_failed_v4(ctx: &TcContext, errno: c_long, vip: [u8; 4], vip_port: u16) {
    warn!(
        ctx,
        "reverse NAT failed (error {}): a reply of a flow to {:i}:{} leaves un-NATed",
        errno,
        vip,
        vip_port
    );
}

#[inline(never)]
fn reverse_failed_v6(ctx: &TcContext, errno: c_long, vip: &[u8; 16], vip_port: u16) {
    warn!(
        ctx,
        "reverse NAT failed (error {}): a reply of a flow to [{:i}]:{} leaves un-NATed",
        errno,
        *vip,
        vip_port
    );
}
