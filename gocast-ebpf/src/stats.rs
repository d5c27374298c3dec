//! Per-VIP counters: `VIPS_MAP` gives a VIP's slot, `COUNTERS_MAP` (per CPU, so plain adds)
//! holds its counters at that index, `SLOTS_MAP` the slot's generation. User space sums the
//! CPUs. `VIP_ADDRS_MAP` answers "certainly not a VIP" for most other addresses with an array
//! read instead of a hash lookup.

use gocast_common::maps::{VipCounters, VipKey};

use crate::{COUNTERS, SLOTS, VIP_ADDRS, VIPS};

/// Whether the address whose `gocast_common::maps::addr_bit` is `(index, mask)` may be a VIP:
/// `false` means it is none.
#[inline(always)]
pub fn maybe_vip((index, mask): (u32, u64)) -> bool {
    VIP_ADDRS.get(index).is_some_and(|bits| bits & mask != 0)
}

/// The counter slot of the VIP `addr`, or `None` if it is not one of ours.
#[inline(always)]
pub fn vip_slot(family: u8, addr: &[u8; 16]) -> Option<u32> {
    let key = VipKey {
        addr: *addr,
        family,
        _pad: 0,
        _pad2: 0,
    };
    // SAFETY: the value is a plain `u32` copied out at once; a concurrent update can at worst
    // make this packet count under the old index.
    Some(unsafe { *VIPS.get(key)? })
}

/// The generation of `slot` (0 for an index out of range).
#[inline(always)]
pub fn generation(slot: u32) -> u32 {
    SLOTS.get(slot).copied().unwrap_or(0)
}

/// This CPU's counters in `slot`. The array lookup checks bounds, which keeps a bad index from
/// user space harmless.
#[inline(always)]
pub fn counters(slot: u32) -> Option<*mut VipCounters> {
    COUNTERS.get_ptr_mut(slot)
}

/// Counts a packet to a VIP.
#[inline(always)]
pub fn count_in(c: *mut VipCounters, bytes: u64, syn: bool) {
    // SAFETY: a per-CPU array slot: only this CPU writes it, and the program is not preempted
    // by itself.
    unsafe {
        (*c).packets_in += 1;
        (*c).bytes_in += bytes;
        if syn {
            (*c).syn_in += 1;
        }
    }
}

/// Counts a packet from a VIP.
#[inline(always)]
pub fn count_out(c: *mut VipCounters, bytes: u64, synack: bool, rst: bool) {
    // SAFETY: as in `count_in`.
    unsafe {
        (*c).packets_out += 1;
        (*c).bytes_out += bytes;
        if synack {
            (*c).synack_out += 1;
        }
        if rst {
            (*c).rst_out += 1;
        }
    }
}
