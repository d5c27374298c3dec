//! GoCast's kernel side: destination NAT for VIP ports and per-VIP counters.
//!
//! - `gocast_xdp` (XDP, ingress): counts packets to a VIP in `VIPS_MAP`; for TCP/UDP to a
//!   VIP port in `NAT_MAP`, rewrites destination address and port in place (incremental
//!   checksums, the rule carries all they need, so a packet costs one hash lookup) and records
//!   the flow once, under its reply's 5-tuple (`FLOWS4_MAP`/`FLOWS6_MAP`: a map per family,
//!   see `nat::NatFamily`), for TC egress. Fragments, ICMP, IPv6 extension headers and all
//!   other traffic pass untouched.
//! - `gocast_tc_ingress` (TC classifier, ingress): the same on an skb, for interfaces where XDP
//!   would cost more than it saves (virtual devices such as veth, drivers without native XDP,
//!   whose generic XDP copies every cloned skb). It never drops.
//! - `gocast_tc_egress` (TC classifier, egress): a reply from a NAT target port (`PORTS_MAP`)
//!   whose 5-tuple is in `FLOWS4_MAP`/`FLOWS6_MAP` gets the VIP and port back as its source; replies and
//!   other traffic from a VIP are counted (packets, bytes, SYN-ACKs, RSTs). It never drops.
//! - `gocast_xdp_log` (tail-called by `gocast_xdp`), `gocast_tc_log` (by both TC programs): on
//!   rare paths only (a new NATed flow, a refused flow-map insert, a failed rewrite either way)
//!   to emit an aya-log record; they return the verdict the caller would have. See `logs`.
//! - `gocast_xdp_floor`, `gocast_tc_floor`: pass everything; never attached, `bench nat` times
//!   them as the floor of `BPF_PROG_TEST_RUN`.
//!
//! Map names and layouts are in `gocast_common::maps`; the agent loads the object built by
//! `cargo xtask build-ebpf`.

#![no_std]
#![no_main]
#![expect(
    clippy::inline_always,
    reason = "one flat program per packet entry point: no BPF-to-BPF calls, which cost verifier \
              state and cannot mix with tail calls (only the log programs have them, see `logs`)"
)]

mod logs;
mod nat;
mod parse;
mod stats;

use aya_ebpf::{
    bindings::{TC_ACT_OK, xdp_action},
    macros::{classifier, map, xdp},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{TcContext, XdpContext},
};
use gocast_common::maps::{
    ADDR_WORDS, FLOW_TAGS as FLOW_TAGS_LEN, FlowKey, MAX_FLOWS, MAX_NAT_RULES, MAX_VIPS, NatFlow,
    NatKey, NatTarget, PORT_WORDS, PROTO_TCP, PortBits, VipCounters, VipKey, addr_bit,
};

use crate::{
    logs::{TC_LOG, XDP_LOG},
    nat::{Ingress, NatFamily},
    parse::{Family, Flow, Parsed, TCP_ACK, TCP_RST, TCP_SYN},
};

/// `gocast_common::maps::VIPS_MAP`: VIP → index into `COUNTERS`.
#[map(name = "GOCAST_VIPS")]
static VIPS: HashMap<VipKey, u32> = HashMap::with_max_entries(MAX_VIPS, 0);

/// `gocast_common::maps::NAT_MAP`: VIP port → target. Consulted only for VIPs in `VIPS`.
#[map(name = "GOCAST_NAT")]
static NAT: HashMap<NatKey, NatTarget> = HashMap::with_max_entries(MAX_NAT_RULES, 0);

/// `gocast_common::maps::FLOWS4_MAP`: IPv4 reply 5-tuple → the VIP and port to restore.
#[map(name = "GOCAST_FLOWS4")]
static FLOWS4: LruHashMap<FlowKey<[u8; 4]>, NatFlow<[u8; 4]>> =
    LruHashMap::with_max_entries(MAX_FLOWS, 0);

/// `gocast_common::maps::FLOWS6_MAP`: IPv6 reply 5-tuple → the VIP and port to restore.
#[map(name = "GOCAST_FLOWS6")]
static FLOWS6: LruHashMap<FlowKey<[u8; 16]>, NatFlow<[u8; 16]>> =
    LruHashMap::with_max_entries(MAX_FLOWS, 0);

/// `gocast_common::maps::FLOW_TAGS_MAP`: flows lately found in the flow maps.
#[map(name = "GOCAST_FLOW_TAGS")]
static FLOW_TAGS: Array<u32> = Array::with_max_entries(FLOW_TAGS_LEN, 0);

/// `gocast_common::maps::SLOTS_MAP`: each counter slot's generation.
#[map(name = "GOCAST_SLOTS")]
static SLOTS: Array<u32> = Array::with_max_entries(MAX_VIPS, 0);

/// `gocast_common::maps::PORTS_MAP`: the NAT rules' VIP and target ports.
#[map(name = "GOCAST_PORTS")]
static PORTS: Array<PortBits> = Array::with_max_entries(PORT_WORDS, 0);

/// `gocast_common::maps::VIP_ADDRS_MAP`: a bit per fold of the VIPs' addresses.
#[map(name = "GOCAST_VIP_ADDRS")]
static VIP_ADDRS: Array<u64> = Array::with_max_entries(ADDR_WORDS, 0);

/// `gocast_common::maps::COUNTERS_MAP`: per-CPU counters per VIP index.
#[map(name = "GOCAST_COUNTERS")]
static COUNTERS: PerCpuArray<VipCounters> = PerCpuArray::with_max_entries(MAX_VIPS, 0);

// The names above must match the constants the agent uses to find the maps.
const _: () = {
    assert!(str_eq("GOCAST_VIPS", gocast_common::maps::VIPS_MAP));
    assert!(str_eq("GOCAST_NAT", gocast_common::maps::NAT_MAP));
    assert!(str_eq("GOCAST_FLOWS4", gocast_common::maps::FLOWS4_MAP));
    assert!(str_eq("GOCAST_FLOWS6", gocast_common::maps::FLOWS6_MAP));
    assert!(str_eq("GOCAST_COUNTERS", gocast_common::maps::COUNTERS_MAP));
    assert!(str_eq("GOCAST_SLOTS", gocast_common::maps::SLOTS_MAP));
    assert!(str_eq(
        "GOCAST_FLOW_TAGS",
        gocast_common::maps::FLOW_TAGS_MAP
    ));
    assert!(str_eq("GOCAST_PORTS", gocast_common::maps::PORTS_MAP));
    assert!(str_eq(
        "GOCAST_VIP_ADDRS",
        gocast_common::maps::VIP_ADDRS_MAP
    ));
    assert!(str_eq("GOCAST_XDP_LOG", gocast_common::maps::XDP_LOG_MAP));
    assert!(str_eq("GOCAST_TC_LOG", gocast_common::maps::TC_LOG_MAP));
    assert!(str_eq(
        "gocast_xdp_log",
        gocast_common::maps::XDP_LOG_PROGRAM
    ));
    assert!(str_eq("gocast_tc_log", gocast_common::maps::TC_LOG_PROGRAM));
    assert!(str_eq(
        "gocast_xdp_floor",
        gocast_common::maps::XDP_FLOOR_PROGRAM
    ));
    assert!(str_eq(
        "gocast_tc_floor",
        gocast_common::maps::TC_FLOOR_PROGRAM
    ));
};

/// `a == b` in a `const` context (`#[map(name = ..)]` takes a literal, not a constant).
const fn str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// XDP entry point: ingress counting and destination NAT.
#[xdp]
#[expect(
    clippy::needless_pass_by_value,
    reason = "`#[xdp]` fixes the signature"
)]
pub fn gocast_xdp(ctx: XdpContext) -> u32 {
    let mut log = false;
    let action = match try_gocast_xdp(&ctx, &mut log) {
        Ok(action) => action,
        Err(()) => xdp_action::XDP_ABORTED,
    };
    // Records are only noted on the way to `XDP_PASS`, what the log program returns.
    if log && action == xdp_action::XDP_PASS {
        // SAFETY: on success control never comes back; on failure (no log program loaded) it
        // does, and this program returns its own verdict.
        unsafe { XDP_LOG.tail_call(&ctx, 0) };
    }
    action
}

fn try_gocast_xdp(ctx: &XdpContext, log: &mut bool) -> Result<u32, ()> {
    ingress(ctx, &parse::parse(ctx), log)?;
    Ok(xdp_action::XDP_PASS)
}

/// What both ingress programs do with a parsed packet: a TCP or UDP packet takes
/// [`ingress_flow`]; other IP traffic to a VIP is counted.
#[inline(always)]
fn ingress<C: Ingress>(ctx: &C, parsed: &Parsed, log: &mut bool) -> Result<(), ()> {
    match parsed {
        Parsed::V4(flow) => ingress_flow(ctx, flow, log),
        Parsed::V6(flow) => ingress_flow(ctx, flow, log),
        Parsed::Ip { family, dst } => {
            if stats::maybe_vip(addr_bit(dst))
                && let Some(counters) = stats::vip_slot(*family, dst).and_then(stats::counters)
            {
                stats::count_in(counters, ctx.bytes(), false);
            }
            Ok(())
        }
        Parsed::Other => Ok(()),
    }
}

/// A TCP or UDP packet. To a VIP port with a current rule (the common case): counted in,
/// rewritten, its flow entry written or checked. Any other to a VIP: counted, and NATed if a
/// rule matches. A SYN that bypasses the NAT drops a stale flow entry.
#[inline(always)]
fn ingress_flow<C: Ingress, F: NatFamily>(
    ctx: &C,
    flow: &Flow<F>,
    log: &mut bool,
) -> Result<(), ()> {
    let syn = is_syn(flow);
    if let Some(to) = nat::rule(flow) {
        if let Some(counters) = stats::counters(to.slot) {
            stats::count_in(counters, ctx.bytes(), syn);
        }
        nat::forward(ctx, flow, &to, log)?;
        nat::remember::<C, F>(flow, &to, syn, log);
        return Ok(());
    }
    let slot = if stats::maybe_vip(F::addr_bit(&flow.dst)) {
        stats::vip_slot(F::FAMILY, &F::map_bytes(&flow.dst))
    } else {
        None
    };
    let Some(slot) = slot else {
        if syn {
            nat::forget_direct(flow);
        }
        return Ok(());
    };
    // Read before the NAT rule: the agent bumps it after changing a rule, so an entry written
    // from an old rule carries an old generation.
    let generation = stats::generation(slot);
    if let Some(counters) = stats::counters(slot) {
        stats::count_in(counters, ctx.bytes(), syn);
    }
    if !nat::dnat(ctx, flow, syn, (slot, generation), log)? && syn {
        nat::forget_direct(flow);
    }
    Ok(())
}

/// A TCP SYN without ACK: a new connection.
#[inline(always)]
fn is_syn<F: Family>(flow: &Flow<F>) -> bool {
    flow.proto == PROTO_TCP && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// TC ingress entry point: the XDP program's work on an skb. Never drops.
#[classifier]
#[expect(
    clippy::needless_pass_by_value,
    reason = "`#[classifier]` fixes the signature"
)]
pub fn gocast_tc_ingress(ctx: TcContext) -> i32 {
    let mut log = false;
    // A failed rewrite leaves the packet as it was: it reaches the host un-NATed; the log
    // program says so.
    let _ = try_gocast_tc_ingress(&ctx, &mut log);
    if log {
        // SAFETY: as in `gocast_xdp`; the log program returns `TC_ACT_OK` too.
        unsafe { TC_LOG.tail_call(&ctx, 0) };
    }
    TC_ACT_OK
}

fn try_gocast_tc_ingress(ctx: &TcContext, log: &mut bool) -> Result<(), ()> {
    ingress(ctx, &parse_skb(ctx), log)
}

/// Parses an skb. Direct packet access sees only its linear part; when the headers do not all
/// fit there (they continue in the skb's fragments), pulls them in first. Only such skbs pay
/// for the pull, which may copy: the stack nearly always has the headers linear. One parse, so
/// one [`Flow`] on the stack.
#[inline(always)]
fn parse_skb(ctx: &TcContext) -> Parsed {
    let linear = ctx.data_end() - ctx.data();
    if ctx.len() as usize > linear {
        #[expect(
            clippy::cast_possible_truncation,
            reason = "at most `parse::HEADERS_MAX`"
        )]
        let wanted = parse::headers_len(ctx).min(ctx.len() as usize) as u32;
        if wanted as usize > linear {
            // On failure the parse below sees what is linear and classifies the packet by that.
            let _ = ctx.pull_data(wanted);
        }
    }
    parse::parse(ctx)
}

/// TC egress entry point: reverse NAT and outbound counting. Never drops.
#[classifier]
#[expect(
    clippy::needless_pass_by_value,
    reason = "`#[classifier]` fixes the signature"
)]
pub fn gocast_tc_egress(ctx: TcContext) -> i32 {
    let mut log = false;
    // A failed rewrite leaves the packet as it was: it goes out un-NATed, as if the flow were
    // unknown, rather than being dropped; the log program says so.
    let _ = try_gocast_tc_egress(&ctx, &mut log);
    if log {
        // SAFETY: as in `gocast_xdp`; the log program returns `TC_ACT_OK` too.
        unsafe { TC_LOG.tail_call(&ctx, 0) };
    }
    TC_ACT_OK
}

fn try_gocast_tc_egress(ctx: &TcContext, log: &mut bool) -> Result<(), ()> {
    match parse_skb(ctx) {
        Parsed::V4(flow) => egress_flow(ctx, &flow, log),
        Parsed::V6(flow) => egress_flow(ctx, &flow, log),
        Parsed::Ip { .. } | Parsed::Other => Ok(()),
    }
}

/// What TC egress does with a TCP or UDP packet: the reply of a NATed flow gets the VIP back;
/// it and any other packet from a VIP are counted.
#[inline(always)]
fn egress_flow<F: NatFamily>(ctx: &TcContext, flow: &Flow<F>, log: &mut bool) -> Result<(), ()> {
    let slot = match nat::reverse(ctx, flow, log)? {
        // The flow's slot, unless its VIP changed since: then the VIP's slot now, if any.
        Some(orig) if stats::generation(orig.slot) == orig.generation => Some(orig.slot),
        Some(orig) => stats::vip_slot(F::FAMILY, &F::map_bytes(&orig.addr)),
        None if stats::maybe_vip(F::addr_bit(&flow.src)) => {
            stats::vip_slot(F::FAMILY, &F::map_bytes(&flow.src))
        }
        None => None,
    };
    let Some(counters) = slot.and_then(stats::counters) else {
        return Ok(());
    };
    let is_tcp = flow.proto == PROTO_TCP;
    let synack = is_tcp && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK;
    let rst = is_tcp && flow.tcp_flags & TCP_RST != 0;
    stats::count_out(counters, u64::from(ctx.len()), synack, rst);
    Ok(())
}

/// XDP log program: emits the record `gocast_xdp` noted, then passes the packet.
#[xdp]
#[expect(
    clippy::needless_pass_by_value,
    reason = "`#[xdp]` fixes the signature"
)]
pub fn gocast_xdp_log(ctx: XdpContext) -> u32 {
    logs::emit_xdp(&ctx);
    xdp_action::XDP_PASS
}

/// TC log program: emits the record `gocast_tc_ingress` or `gocast_tc_egress` noted, then lets
/// the packet go.
#[classifier]
#[expect(
    clippy::needless_pass_by_value,
    reason = "`#[classifier]` fixes the signature"
)]
pub fn gocast_tc_log(ctx: TcContext) -> i32 {
    logs::emit_tc(&ctx);
    TC_ACT_OK
}

/// The floor of `BPF_PROG_TEST_RUN` for XDP: passes every packet untouched. Never attached
/// (the agent loads programs by name); `bench nat` times it beside `gocast_xdp`.
#[xdp]
pub fn gocast_xdp_floor(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// The floor of `BPF_PROG_TEST_RUN` for TC, as `gocast_xdp_floor`.
#[classifier]
pub fn gocast_tc_floor(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a program the verifier accepts: it rejects the loop.
    loop {}
}

/// The license the kernel checks before allowing GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
