//! Destination NAT (VIP:port → target) in XDP or TC ingress, and its reverse in TC egress
//! (target → VIP:port).
//!
//! A packet to a VIP port finds its rule in `NAT_MAP`: a [`NatTarget`] that carries the new
//! address and port, the address's checksum difference and the VIP's counter slot, so a packet
//! of an established flow costs that one hash lookup, an array read (the rule's generation,
//! see `gocast_common::maps::SLOTS_MAP`) and the writes. Each flow has one [`NatFlow`] entry, in
//! its family's flow map (`FLOWS4_MAP`/`FLOWS6_MAP`, [`NatFamily`]) under its reply's 5-tuple:
//! how TC egress puts the VIP back. A TCP SYN writes it; every other packet derives its key from
//! the packet and the rule, and writes it only if it is missing or stale (a UDP flow's first
//! datagram, a TCP flow whose SYN came before the agent). Packets on a port no rule uses, or to
//! an address without the bit of a VIP with a rule on that port, skip `NAT_MAP` (`PORTS_MAP`).
//!
//! XDP rewrites the frame in place with RFC 1624 incremental checksums (pure functions in
//! `gocast_common::csum`). The TC programs use the kernel's `bpf_l4_csum_replace`, which also
//! handles `CHECKSUM_PARTIAL` skbs (packets whose L4 checksum is finished later, e.g. from a
//! veth peer), something a pure update cannot see; the IPv4 header checksum, always complete,
//! they update themselves and store with the address. They write through helpers, never direct
//! packet access, which would make the kernel unclone every cloned skb the program sees (all of
//! TCP's outgoing ones) before it runs.
//!
//! A new flow, a refused flow-map insert and a failed rewrite (TC, either way) are noted for the
//! log programs (`crate::logs`); nothing else is.

use aya_ebpf::{
    bindings::BPF_F_PSEUDO_HDR,
    cty::c_long,
    maps::LruHashMap,
    programs::{TcContext, XdpContext},
};
use gocast_common::{
    csum::{csum_add, csum_replace2, udp_has_checksum, udp_mangled},
    maps::{FAMILY_V4, FlowKey, NatFlow, NatKey, NatTarget, PROTO_TCP, flow_tag, port_bit},
};

use crate::{
    FLOW_TAGS, FLOWS4, FLOWS6, NAT, PORTS,
    logs::{self, DNAT_FAILED, INSERT_FAILED, NEW_FLOW, Pending, REVERSE_FAILED},
    parse::{
        Family, Flow, IPV4_CHECK_OFFSET, IPV6_DST_OFFSET, IPV6_SRC_OFFSET, Ipv4Hdr, Ports,
        TCP_CHECK_OFFSET, UDP_CHECK_OFFSET, V4, V6, ptr_at,
    },
    stats,
};

/// A family's flow map.
type FlowMap<F> = LruHashMap<FlowKey<<F as Family>::Addr>, NatFlow<<F as Family>::Addr>>;

/// What the NAT does per family: its flow map, and how TC writes an address.
pub trait NatFamily: Family {
    /// Replies → how to put the VIP back (`FLOWS4_MAP`, `FLOWS6_MAP`).
    fn flows() -> &'static FlowMap<Self>;
    /// TC: sets `end`'s address and port to `to`'s, and the IPv4 header checksum by
    /// `to.addr_diff` with them (not the TCP/UDP checksum). `Err` is the helper's (negative)
    /// error code.
    fn store_addr_port(
        ctx: &TcContext,
        flow: &Flow<Self>,
        end: End,
        to: &NatFlow<Self::Addr>,
    ) -> Result<(), c_long>;
}

impl NatFamily for V4 {
    #[inline(always)]
    fn flows() -> &'static FlowMap<Self> {
        &FLOWS4
    }

    /// The header checksum sits right before the source address (`Ipv4Hdr`), and without IP
    /// options the ports right after the destination, so one store writes checksum, addresses
    /// and ports: one helper call where `bpf_l3_csum_replace` and two stores were three. The
    /// old checksum and addresses are read directly; only writes through packet pointers make
    /// the kernel unclone an skb. With options, the ports are a second store.
    #[inline(always)]
    fn store_addr_port(
        ctx: &TcContext,
        flow: &Flow<Self>,
        end: End,
        to: &NatFlow<[u8; 4]>,
    ) -> Result<(), c_long> {
        let ip: *const Ipv4Hdr = ptr_at(ctx, flow.l3).map_err(|()| -EFAULT)?;
        // SAFETY: `ptr_at` checked that the header is inside the packet.
        let (check, src, dst) = unsafe { ((*ip).check, (*ip).src, (*ip).dst) };
        let [c0, c1] = csum_add(u16::from_be_bytes(check), to.addr_diff).to_be_bytes();
        let (src, dst, ports) = match end {
            End::Src => (to.addr, dst, [to.port, flow.dst_port]),
            End::Dst => (src, to.addr, [flow.src_port, to.port]),
        };
        let [s0, s1, s2, s3] = src;
        let [d0, d1, d2, d3] = dst;
        let at = flow.l3 + IPV4_CHECK_OFFSET;
        if flow.l4 == flow.l3 + IPV4_HEADER_LEN {
            let [[p0, p1], [p2, p3]] = ports.map(u16::to_ne_bytes);
            let bytes = [c0, c1, s0, s1, s2, s3, d0, d1, d2, d3, p0, p1, p2, p3];
            return ctx.store(at, &bytes, 0);
        }
        ctx.store(at, &[c0, c1, s0, s1, s2, s3, d0, d1, d2, d3], 0)?;
        ctx.store(flow.l4, &ports, 0)
    }
}

impl NatFamily for V6 {
    #[inline(always)]
    fn flows() -> &'static FlowMap<Self> {
        &FLOWS6
    }

    /// No header checksum; the address and the ports are two stores (the other address lies
    /// between the source address and the ports).
    #[inline(always)]
    fn store_addr_port(
        ctx: &TcContext,
        flow: &Flow<Self>,
        end: End,
        to: &NatFlow<[u8; 16]>,
    ) -> Result<(), c_long> {
        let (at, port_at) = match end {
            End::Src => (IPV6_SRC_OFFSET, flow.l4),
            End::Dst => (IPV6_DST_OFFSET, flow.l4 + 2),
        };
        ctx.store(flow.l3 + at, &to.addr, 0)?;
        ctx.store(port_at, &to.port, 0)
    }
}

/// An IPv4 header without options.
const IPV4_HEADER_LEN: usize = core::mem::size_of::<Ipv4Hdr>();

/// `EFAULT`: XDP's rewrite found a header past the end of the frame.
const EFAULT: c_long = 14;

/// An ingress program's context: how long its packet is, how it rewrites the destination,
/// which log slot it notes in.
pub trait Ingress {
    /// `crate::logs` slot of this program.
    const LOG_SLOT: u32;
    /// The packet's length, for the byte counters.
    fn bytes(&self) -> u64;
    /// Sets the destination address and port to `to`'s, checksums included. `Err` is a
    /// (negative) error code.
    fn rewrite_dst<F: NatFamily>(
        &self,
        flow: &Flow<F>,
        to: &NatFlow<F::Addr>,
    ) -> Result<(), c_long>;
}

impl Ingress for XdpContext {
    const LOG_SLOT: u32 = logs::XDP_SLOT;

    #[inline(always)]
    fn bytes(&self) -> u64 {
        (self.data_end() - self.data()) as u64
    }

    #[inline(always)]
    fn rewrite_dst<F: NatFamily>(
        &self,
        flow: &Flow<F>,
        to: &NatFlow<F::Addr>,
    ) -> Result<(), c_long> {
        rewrite_dst(self, flow, to).map_err(|()| -EFAULT)
    }
}

impl Ingress for TcContext {
    const LOG_SLOT: u32 = logs::TC_INGRESS_SLOT;

    #[inline(always)]
    fn bytes(&self) -> u64 {
        u64::from(self.len())
    }

    #[inline(always)]
    fn rewrite_dst<F: NatFamily>(
        &self,
        flow: &Flow<F>,
        to: &NatFlow<F::Addr>,
    ) -> Result<(), c_long> {
        rewrite_skb(self, flow, End::Dst, to)
    }
}

/// Whether a NAT rule may be for this flow's destination: its port is a rule's VIP port and
/// its address has the bit of one of those rules' VIPs (`PORTS_MAP`). One array read, so
/// packets to other ports, or to the host's own addresses on a rule's port, skip `NAT_MAP`.
#[inline(always)]
fn rule_may_match<F: Family>(flow: &Flow<F>) -> bool {
    let (index, port) = port_bit(flow.dst_port);
    let (_, addr) = F::addr_bit(&flow.dst);
    PORTS
        .get(index)
        .is_some_and(|bits| bits.vip & port != 0 && bits.vip_addr & addr != 0)
}

/// The flow's 5-tuple as a key.
#[inline(always)]
fn key<F: Family>(flow: &Flow<F>) -> FlowKey<F::Addr> {
    FlowKey {
        src: flow.src,
        dst: flow.dst,
        src_port: flow.src_port,
        dst_port: flow.dst_port,
        proto: flow.proto,
        _pad: 0,
        _pad2: 0,
    }
}

/// The key of this flow's replies, which come from `src`:`src_port` (the NAT target, or for
/// a flow the NAT did not rewrite, its own destination).
#[inline(always)]
fn reply_key<F: Family>(flow: &Flow<F>, src: F::Addr, src_port: u16) -> FlowKey<F::Addr> {
    FlowKey {
        src,
        dst: flow.src,
        src_port,
        dst_port: flow.src_port,
        proto: flow.proto,
        _pad: 0,
        _pad2: 0,
    }
}

/// How a packet is rewritten by `rule`, counted in `slot` of `generation`.
#[inline(always)]
fn rewrite_by<F: Family>(rule: &NatTarget, (slot, generation): (u32, u32)) -> NatFlow<F::Addr> {
    NatFlow {
        addr: F::from_map_bytes(&rule.dest),
        port: rule.port,
        addr_diff: rule.addr_diff,
        slot,
        generation,
    }
}

/// The rule for this packet's destination, if it has one written under its slot's current
/// generation: all the rewrite and counting need (the common case, one hash lookup).
#[inline(always)]
pub fn rule<F: Family>(flow: &Flow<F>) -> Option<NatFlow<F::Addr>> {
    if !rule_may_match(flow) {
        return None;
    }
    let rule = target(flow)?;
    (stats::generation(rule.slot) == rule.generation)
        .then(|| rewrite_by::<F>(&rule, (rule.slot, rule.generation)))
}

/// Rewrites a packet by its rule (`to`); a failure is noted for the log program.
#[inline(always)]
pub fn forward<C: Ingress, F: NatFamily>(
    ctx: &C,
    flow: &Flow<F>,
    to: &NatFlow<F::Addr>,
    log: &mut bool,
) -> Result<(), ()> {
    if let Err(errno) = ctx.rewrite_dst(flow, to) {
        *log = note_dnat(
            C::LOG_SLOT,
            DNAT_FAILED,
            errno,
            flow,
            F::map_bytes(&to.addr),
            to.port,
        );
        return Err(());
    }
    Ok(())
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
fn target<F: Family>(flow: &Flow<F>) -> Option<NatTarget> {
    let key = NatKey {
        vip: F::map_bytes(&flow.dst),
        port: flow.dst_port,
        proto: flow.proto,
        family: F::FAMILY,
        _pad: [0; 4],
    };
    // SAFETY: copied out at once; a concurrent update at worst sends this packet to the old
    // target.
    (unsafe { NAT.get(key) }).copied()
}

/// A packet to a VIP with counter `slot` of `generation` that found no current rule
/// ([`rule`]: none for its port, or one written under an older generation of its slot): if
/// `NAT_MAP` has a rule for its destination, rewrites it to the target, records the flow
/// ([`remember`]), and returns `true`.
#[inline(always)]
pub fn dnat<C: Ingress, F: NatFamily>(
    ctx: &C,
    flow: &Flow<F>,
    syn: bool,
    (slot, generation): (u32, u32),
    log: &mut bool,
) -> Result<bool, ()> {
    // The port filter `rule` consulted first: without its bits there is no rule to find.
    if !rule_may_match(flow) {
        return Ok(false);
    }
    let Some(target) = target(flow) else {
        return Ok(false);
    };
    let to = rewrite_by::<F>(&target, (slot, generation));
    forward(ctx, flow, &to, log)?;
    remember::<C, F>(flow, &to, syn, log);
    Ok(true)
}

/// Records the flow under its reply's 5-tuple: how TC egress puts the VIP back. A SYN (a new
/// connection) always writes the entry. Any other packet whose tag in `FLOW_TAGS_MAP` matches
/// (its flow was found there lately, under this generation) is done; else it reads the entry
/// and writes it only if it is missing or stale (another VIP slot or port, an older
/// generation): a UDP flow's first datagram, a TCP flow whose SYN came before the programs, a
/// flow whose tag another took over. A SYN or a refused insert is noted for the log program, and
/// `log` set.
#[inline(always)]
pub fn remember<C: Ingress, F: NatFamily>(
    flow: &Flow<F>,
    to: &NatFlow<F::Addr>,
    syn: bool,
    log: &mut bool,
) {
    let (index, tag) = flow_tag(
        F::fold(&flow.src),
        F::fold(&flow.dst),
        (flow.src_port, flow.dst_port),
        flow.proto,
        to.generation,
    );
    let Some(seen) = FLOW_TAGS.get_ptr_mut(index) else {
        return;
    };
    // SAFETY: an array slot inside the map; a racing write from another CPU at worst costs a
    // flow-map lookup.
    if !syn && unsafe { *seen } == tag {
        return;
    }
    let reply = reply_key(flow, to.addr, to.port);
    if !syn && let Some(entry) = F::flows().get_ptr(reply) {
        // SAFETY: a map value pointer from a successful lookup, read at once. The slot stands
        // for the VIP (one slot per VIP per generation), so the address need not be compared.
        let current = unsafe {
            (*entry).slot == to.slot
                && (*entry).generation == to.generation
                && (*entry).port == flow.dst_port
        };
        if current {
            // SAFETY: as above.
            unsafe { *seen = tag };
            return;
        }
    }
    let back = NatFlow {
        addr: flow.dst,
        port: flow.dst_port,
        addr_diff: F::addr_diff(&to.addr, &flow.dst),
        slot: to.slot,
        generation: to.generation,
    };
    // A full map evicts, so an insert fails only on kernel errors: the reply then goes out
    // un-NATed (or the next packet tries again); the warning is the only trace. A plain
    // integer, as a `Result` leaves its error undefined on success, which LLVM may fill with a
    // pointer the verifier rejects.
    let errno = F::flows().insert(reply, back, 0).err().unwrap_or(0);
    if errno == 0 {
        // SAFETY: as above.
        unsafe { *seen = tag };
    }
    if errno != 0 || syn {
        let event = if errno != 0 { INSERT_FAILED } else { NEW_FLOW };
        *log = note_dnat(
            C::LOG_SLOT,
            event,
            c_long::from(errno),
            flow,
            F::map_bytes(&to.addr),
            to.port,
        );
    }
}

/// Notes `event` about `flow`, which a NAT rule sends to `dest`:`port`, in `slot`; `true` if
/// the log program should be tail-called.
#[inline(always)]
fn note_dnat<F: Family>(
    slot: u32,
    event: u8,
    errno: c_long,
    flow: &Flow<F>,
    dest: [u8; 16],
    port: u16,
) -> bool {
    logs::note(
        slot,
        Pending {
            event,
            family: F::FAMILY,
            vip_port: u16::from_be(flow.dst_port),
            dest_port: u16::from_be(port),
            _pad: [0; 2],
            errno,
            vip: F::map_bytes(&flow.dst),
            dest,
        },
    )
}

/// XDP: sets the destination address and port, updating the IPv4 header checksum and the
/// TCP/UDP checksum (whose pseudo-header covers the address) by `to.addr_diff` and the port's
/// change.
#[inline(always)]
fn rewrite_dst<F: Family>(
    ctx: &XdpContext,
    flow: &Flow<F>,
    to: &NatFlow<F::Addr>,
) -> Result<(), ()> {
    let check: *mut [u8; 2] = ptr_at(ctx, flow.l4 + l4_check_offset(flow.proto))?;
    let ports: *mut Ports = ptr_at(ctx, flow.l4)?;
    let dst: *mut F::Addr = ptr_at(ctx, flow.l3 + F::DST_OFFSET)?;
    let diff = to.addr_diff;
    if F::FAMILY == FAMILY_V4 {
        let ip_check: *mut [u8; 2] = ptr_at(ctx, flow.l3 + IPV4_CHECK_OFFSET)?;
        // SAFETY: `ptr_at` checked that the field is inside the packet.
        unsafe { *ip_check = csum_add(u16::from_be_bytes(*ip_check), diff).to_be_bytes() };
    }
    // SAFETY: `ptr_at` checked that the address is inside the packet.
    unsafe { *dst = to.addr };
    // SAFETY: `ptr_at` checked both are inside the packet.
    unsafe {
        (*ports).dst = to.port.to_ne_bytes();
        let old = u16::from_be_bytes(*check);
        // An IPv4 UDP datagram without a checksum keeps none.
        if flow.proto == PROTO_TCP {
            let l4 = csum_add(old, diff);
            *check =
                csum_replace2(l4, u16::from_be(flow.dst_port), u16::from_be(to.port)).to_be_bytes();
        } else if F::FAMILY != FAMILY_V4 || udp_has_checksum(old) {
            let l4 = csum_add(old, diff);
            let l4 = csum_replace2(l4, u16::from_be(flow.dst_port), u16::from_be(to.port));
            *check = udp_mangled(l4).to_be_bytes();
        }
    }
    Ok(())
}

/// For the SYN of a TCP connection that did not go through the NAT (sent to the service's own
/// address, or anywhere else): drops any flow entry its replies would match. That entry belongs
/// to an earlier connection from the same client port through a VIP, and would rewrite these
/// replies to come from the VIP. Only SYNs pay for this.
#[inline(always)]
pub fn forget_direct<F: NatFamily>(flow: &Flow<F>) {
    let _ = F::flows().remove(reply_key(flow, flow.dst, flow.dst_port));
}

/// If the family's `FLOWS4_MAP`/`FLOWS6_MAP` knows this reply, rewrites its source back to the
/// VIP and port the client used and returns the entry. Replies from a port no NAT rule
/// sends to return at once. A failed rewrite is noted for the log program, and `log` set.
#[inline(always)]
pub fn reverse<F: NatFamily>(
    ctx: &TcContext,
    flow: &Flow<F>,
    log: &mut bool,
) -> Result<Option<NatFlow<F::Addr>>, ()> {
    let (index, port) = port_bit(flow.src_port);
    if !PORTS.get(index).is_some_and(|bits| bits.target & port != 0) {
        return Ok(None);
    }
    let Some(orig) = F::flows().get_ptr(key(flow)) else {
        return Ok(None);
    };
    // SAFETY: a map value pointer from a successful lookup, copied out at once.
    let orig = unsafe { *orig };
    if let Err(errno) = rewrite_skb(ctx, flow, End::Src, &orig) {
        *log = logs::note(
            logs::TC_EGRESS_SLOT,
            Pending {
                event: REVERSE_FAILED,
                family: F::FAMILY,
                vip_port: u16::from_be(orig.port),
                dest_port: u16::from_be(flow.src_port),
                _pad: [0; 2],
                errno,
                vip: F::map_bytes(&orig.addr),
                dest: F::map_bytes(&flow.src),
            },
        );
        return Err(());
    }
    Ok(Some(orig))
}

/// Which end of a flow [`rewrite_skb`] changes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum End {
    Src,
    Dst,
}

/// Sets one end's address and port to `to`'s in an skb, with the kernel's checksum helpers:
/// the TCP/UDP pseudo-header by `to.addr_diff`, the TCP/UDP checksum by the port's change; the
/// IPv4 header checksum by `to.addr_diff` too ([`NatFamily::store_addr_port`]). `Err` is the failing
/// helper's (negative) error code.
#[inline(always)]
fn rewrite_skb<F: NatFamily>(
    ctx: &TcContext,
    flow: &Flow<F>,
    end: End,
    to: &NatFlow<F::Addr>,
) -> Result<(), c_long> {
    let old_port = match end {
        End::Src => flow.src_port,
        End::Dst => flow.dst_port,
    };
    let check_at = flow.l4 + l4_check_offset(flow.proto);
    // UDP: with BPF_F_MARK_MANGLED_0 the kernel leaves a 0 checksum (IPv4 "none") alone and
    // writes a computed 0 as 0xffff.
    let udp_flags = if flow.proto == PROTO_TCP {
        0
    } else {
        u64::from(aya_ebpf::bindings::BPF_F_MARK_MANGLED_0)
    };
    // The kernel sums 16-bit words as they sit in memory (little-endian here), `addr_diff`
    // as they read big-endian: the same one's-complement sum, bytes swapped.
    let diff = u64::from(u16::from_be(to.addr_diff));
    // Size 0: `to` is a checksum difference. Pseudo-header: for a `CHECKSUM_PARTIAL` skb the
    // kernel updates the partial sum, which covers the addresses but not the ports.
    ctx.l4_csum_replace(check_at, 0, diff, u64::from(BPF_F_PSEUDO_HDR) | udp_flags)?;
    ctx.l4_csum_replace(
        check_at,
        u64::from(old_port),
        u64::from(to.port),
        udp_flags | 2,
    )?;
    F::store_addr_port(ctx, flow, end, to)
}
