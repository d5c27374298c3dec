//! Header layouts and bounds-checked packet access, shared by the XDP and TC programs.
//!
//! Every field is a byte array (alignment 1), so a header may sit at any offset without an
//! unaligned load; values are network order, converted with `u16::from_be_bytes` where needed.
//! Only what the NAT reads or writes is parsed: Ethernet, IPv4 (with options), IPv6 without
//! extension headers, TCP, UDP. Anything else is "not ours" and passes untouched.

use core::mem;

use aya_ebpf::programs::{TcContext, XdpContext};
use gocast_common::{
    csum,
    maps::{self, FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP},
};

/// `ETH_P_IP`, the `EtherType` of IPv4.
const ETH_P_IP: u16 = 0x0800;
/// `ETH_P_IPV6`, the `EtherType` of IPv6.
const ETH_P_IPV6: u16 = 0x86dd;
/// IPv4 "more fragments" flag and fragment offset bits of `frag_off`.
const IPV4_MF_OFFSET: u16 = 0x3fff;
/// TCP flags (byte 13 of the header).
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// `struct ethhdr`.
#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ether_type: [u8; 2],
}

/// `struct iphdr` without options.
#[repr(C)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: [u8; 2],
    pub id: [u8; 2],
    pub frag_off: [u8; 2],
    pub ttl: u8,
    pub protocol: u8,
    pub check: [u8; 2],
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

/// `struct ipv6hdr`.
#[repr(C)]
pub struct Ipv6Hdr {
    pub version_tc_flow: [u8; 4],
    pub payload_len: [u8; 2],
    pub next_hdr: u8,
    pub hop_limit: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

/// The ports of a TCP or UDP header (its first 4 bytes).
#[repr(C)]
pub struct Ports {
    pub src: [u8; 2],
    pub dst: [u8; 2],
}

/// Offset of the checksum in a TCP header.
pub const TCP_CHECK_OFFSET: usize = 16;
/// Offset of the flags byte in a TCP header.
const TCP_FLAGS_OFFSET: usize = 13;
/// Offset of the checksum in a UDP header.
pub const UDP_CHECK_OFFSET: usize = 6;
/// Offset of the checksum in an IPv4 header.
pub const IPV4_CHECK_OFFSET: usize = mem::offset_of!(Ipv4Hdr, check);
/// Offset of the destination address in an IPv4 header.
pub const IPV4_DST_OFFSET: usize = mem::offset_of!(Ipv4Hdr, dst);
/// Offset of the source address in an IPv6 header.
pub const IPV6_SRC_OFFSET: usize = mem::offset_of!(Ipv6Hdr, src);
/// Offset of the destination address in an IPv6 header.
pub const IPV6_DST_OFFSET: usize = mem::offset_of!(Ipv6Hdr, dst);
/// Ethernet + IPv6 (or IPv4 with options) + TCP: what must be in an skb's linear part for
/// direct access to see every header the NAT reads or writes.
pub const HEADERS_MAX: usize = 14 + 60 + 20;
/// A TCP header without options: the part [`parse`] reads (up to the checksum).
const TCP_HDR_LEN: usize = 20;
/// A UDP header.
const UDP_HDR_LEN: usize = 8;

/// A program context with direct packet access.
pub trait Packet {
    fn start(&self) -> usize;
    fn end(&self) -> usize;
}

impl Packet for XdpContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
}

impl Packet for TcContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
}

/// A pointer to a `T` at `offset` into the packet, or `Err` if it would run past the end.
///
/// The comparison against `end` is what lets the verifier accept the dereference.
#[inline(always)]
pub fn ptr_at<T>(ctx: &impl Packet, offset: usize) -> Result<*mut T, ()> {
    let start = ctx.start();
    let end = ctx.end();
    if start + offset + mem::size_of::<T>() > end {
        return Err(());
    }
    Ok((start + offset) as *mut T)
}

/// An IP version: its addresses as the packet carries them, and where they sit.
pub trait Family: Sized {
    /// `[u8; 4]` or `[u8; 16]`, network order.
    type Addr: Copy + 'static;
    /// `FAMILY_V4` or `FAMILY_V6`.
    const FAMILY: u8;
    /// Offset of the destination address in the IP header.
    const DST_OFFSET: usize;
    /// `addr` as map bytes (`gocast_common::maps::addr_bytes`: IPv4 in bytes `0..4`), for the
    /// maps shared by both families.
    fn map_bytes(addr: &Self::Addr) -> [u8; 16];
    /// The inverse of [`Family::map_bytes`].
    fn from_map_bytes(addr: &[u8; 16]) -> Self::Addr;
    /// `gocast_common::csum::addr_diff` for this family's addresses.
    fn addr_diff(old: &Self::Addr, new: &Self::Addr) -> u16;
    /// `gocast_common::maps::addr_bit` for this family's addresses.
    fn addr_bit(addr: &Self::Addr) -> (u32, u64);
    /// `addr` folded to 32 bits (XOR of its words), for `gocast_common::maps::flow_tag`.
    fn fold(addr: &Self::Addr) -> u32;
    /// A parsed packet of this family.
    fn parsed(flow: Flow<Self>) -> Parsed;
}

/// IPv4.
pub struct V4;

impl Family for V4 {
    type Addr = [u8; 4];
    const FAMILY: u8 = FAMILY_V4;
    const DST_OFFSET: usize = IPV4_DST_OFFSET;

    #[inline(always)]
    fn map_bytes(addr: &[u8; 4]) -> [u8; 16] {
        // One 16-byte value rather than zeroing the array and copying in four bytes, which LLVM
        // may turn into a call to a byte-wise `memset`.
        u128::from(u32::from_le_bytes(*addr)).to_le_bytes()
    }

    #[inline(always)]
    fn from_map_bytes(addr: &[u8; 16]) -> [u8; 4] {
        [addr[0], addr[1], addr[2], addr[3]]
    }

    #[inline(always)]
    fn addr_diff(old: &[u8; 4], new: &[u8; 4]) -> u16 {
        csum::addr_diff(old, new)
    }

    #[inline(always)]
    fn addr_bit(addr: &[u8; 4]) -> (u32, u64) {
        maps::addr_bit(addr)
    }

    #[inline(always)]
    fn fold(addr: &[u8; 4]) -> u32 {
        u32::from_ne_bytes(*addr)
    }

    #[inline(always)]
    fn parsed(flow: Flow<Self>) -> Parsed {
        Parsed::V4(flow)
    }
}

/// IPv6.
pub struct V6;

impl Family for V6 {
    type Addr = [u8; 16];
    const FAMILY: u8 = FAMILY_V6;
    const DST_OFFSET: usize = IPV6_DST_OFFSET;

    #[inline(always)]
    fn map_bytes(addr: &[u8; 16]) -> [u8; 16] {
        *addr
    }

    #[inline(always)]
    fn from_map_bytes(addr: &[u8; 16]) -> [u8; 16] {
        *addr
    }

    #[inline(always)]
    fn addr_diff(old: &[u8; 16], new: &[u8; 16]) -> u16 {
        csum::addr_diff(old, new)
    }

    #[inline(always)]
    fn addr_bit(addr: &[u8; 16]) -> (u32, u64) {
        maps::addr_bit(addr)
    }

    #[inline(always)]
    fn fold(a: &[u8; 16]) -> u32 {
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]])
            ^ u32::from_ne_bytes([a[4], a[5], a[6], a[7]])
            ^ u32::from_ne_bytes([a[8], a[9], a[10], a[11]])
            ^ u32::from_ne_bytes([a[12], a[13], a[14], a[15]])
    }

    #[inline(always)]
    fn parsed(flow: Flow<Self>) -> Parsed {
        Parsed::V6(flow)
    }
}

/// A TCP or UDP packet this dataplane may act on: unfragmented, with its addresses, ports and
/// header offsets.
pub struct Flow<F: Family> {
    pub proto: u8,
    /// Addresses, network order.
    pub src: F::Addr,
    pub dst: F::Addr,
    /// Ports, network order (wire bytes as a native `u16`).
    pub src_port: u16,
    pub dst_port: u16,
    /// TCP flags, 0 for UDP.
    pub tcp_flags: u8,
    /// Offset of the IP header.
    pub l3: usize,
    /// Offset of the TCP/UDP header.
    pub l4: usize,
}

/// What a packet turned out to be.
pub enum Parsed {
    /// TCP or UDP over IPv4, not a fragment.
    V4(Flow<V4>),
    /// TCP or UDP over IPv6 without extension headers.
    V6(Flow<V6>),
    /// Other IP traffic (ICMP, fragments, IPv6 extension headers): only its destination is known
    /// (map bytes), for counting.
    Ip { family: u8, dst: [u8; 16] },
    /// Not IP (ARP, VLAN-tagged, ...).
    Other,
}

/// Parses Ethernet, IP and the TCP/UDP ports. A frame cut short where a header should be is
/// classified by what could be read (`Other`, or `Ip` without ports) and so passes untouched:
/// malformed traffic is the kernel's to drop, not ours.
#[inline(always)]
pub fn parse(ctx: &impl Packet) -> Parsed {
    let Ok(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Parsed::Other;
    };
    // SAFETY: `ptr_at` checked that the header is inside the packet.
    let ether_type = u16::from_be_bytes(unsafe { (*eth).ether_type });
    let l3 = mem::size_of::<EthHdr>();
    match ether_type {
        ETH_P_IP => parse_ipv4(ctx, l3),
        ETH_P_IPV6 => parse_ipv6(ctx, l3),
        _ => Parsed::Other,
    }
}

/// How many bytes from the start [`parse`] reads of this packet: Ethernet, IP and TCP/UDP
/// headers (less for other traffic), judged from what is readable; [`HEADERS_MAX`] when even
/// the IP header is not. Cheaper than a parse, for deciding whether an skb needs a pull first.
#[inline(always)]
pub fn headers_len(ctx: &impl Packet) -> usize {
    let l3 = mem::size_of::<EthHdr>();
    let Ok(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return HEADERS_MAX;
    };
    // SAFETY: `ptr_at` checked that each header is inside the packet.
    let (ip_len, proto) = match u16::from_be_bytes(unsafe { (*eth).ether_type }) {
        ETH_P_IP => {
            let Ok(ip) = ptr_at::<Ipv4Hdr>(ctx, l3) else {
                return HEADERS_MAX;
            };
            // SAFETY: as above.
            let (version_ihl, proto) = unsafe { ((*ip).version_ihl, (*ip).protocol) };
            (usize::from(version_ihl & 0x0f) * 4, proto)
        }
        ETH_P_IPV6 => {
            let Ok(ip) = ptr_at::<Ipv6Hdr>(ctx, l3) else {
                return HEADERS_MAX;
            };
            // SAFETY: as above.
            (mem::size_of::<Ipv6Hdr>(), unsafe { (*ip).next_hdr })
        }
        _ => return l3,
    };
    l3 + ip_len
        + match proto {
            PROTO_TCP => TCP_HDR_LEN,
            PROTO_UDP => UDP_HDR_LEN,
            _ => 0,
        }
}

#[inline(always)]
fn parse_ipv4(ctx: &impl Packet, l3: usize) -> Parsed {
    let Ok(ip) = ptr_at::<Ipv4Hdr>(ctx, l3) else {
        return Parsed::Other;
    };
    // SAFETY: `ptr_at` checked that the header is inside the packet.
    let (version_ihl, frag_off, proto, src4, dst4) = unsafe {
        (
            (*ip).version_ihl,
            u16::from_be_bytes((*ip).frag_off),
            (*ip).protocol,
            (*ip).src,
            (*ip).dst,
        )
    };
    // Masked to 4 bits, so the verifier sees an offset of at most 60 bytes.
    let ihl = usize::from(version_ihl & 0x0f) * 4;
    if version_ihl >> 4 != 4 || ihl < mem::size_of::<Ipv4Hdr>() {
        return Parsed::Other;
    }
    if frag_off & IPV4_MF_OFFSET != 0 || (proto != PROTO_TCP && proto != PROTO_UDP) {
        return Parsed::Ip {
            family: FAMILY_V4,
            dst: V4::map_bytes(&dst4),
        };
    }
    transport::<V4>(ctx, proto, src4, dst4, l3, l3 + ihl)
}

#[inline(always)]
fn parse_ipv6(ctx: &impl Packet, l3: usize) -> Parsed {
    let Ok(ip) = ptr_at::<Ipv6Hdr>(ctx, l3) else {
        return Parsed::Other;
    };
    // SAFETY: `ptr_at` checked that the header is inside the packet.
    let (version, proto, src, dst) = unsafe {
        (
            (*ip).version_tc_flow[0] >> 4,
            (*ip).next_hdr,
            (*ip).src,
            (*ip).dst,
        )
    };
    if version != 6 {
        return Parsed::Other;
    }
    // Extension headers (including fragments) are not walked: such packets pass untouched.
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Parsed::Ip {
            family: FAMILY_V6,
            dst,
        };
    }
    transport::<V6>(ctx, proto, src, dst, l3, l3 + mem::size_of::<Ipv6Hdr>())
}

#[inline(always)]
fn transport<F: Family>(
    ctx: &impl Packet,
    proto: u8,
    src: F::Addr,
    dst: F::Addr,
    l3: usize,
    l4: usize,
) -> Parsed {
    let short = || Parsed::Ip {
        family: F::FAMILY,
        dst: F::map_bytes(&dst),
    };
    let Ok(ports) = ptr_at::<Ports>(ctx, l4) else {
        return short();
    };
    // SAFETY: `ptr_at` checked that the ports are inside the packet.
    let (src_port, dst_port) = unsafe {
        (
            u16::from_ne_bytes((*ports).src),
            u16::from_ne_bytes((*ports).dst),
        )
    };
    let tcp_flags = if proto == PROTO_TCP {
        // The whole TCP header must be there: NAT rewrites its checksum.
        if ptr_at::<[u8; 2]>(ctx, l4 + TCP_CHECK_OFFSET).is_err() {
            return short();
        }
        let Ok(flags) = ptr_at::<u8>(ctx, l4 + TCP_FLAGS_OFFSET) else {
            return short();
        };
        // SAFETY: `ptr_at` checked that the byte is inside the packet.
        unsafe { *flags }
    } else {
        if ptr_at::<[u8; 2]>(ctx, l4 + UDP_CHECK_OFFSET).is_err() {
            return short();
        }
        0
    };
    F::parsed(Flow {
        proto,
        src,
        dst,
        src_port,
        dst_port,
        tcp_flags,
        l3,
        l4,
    })
}
