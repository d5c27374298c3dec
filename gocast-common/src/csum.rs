//! Incremental Internet checksum updates (RFC 1624), for NAT rewrites in XDP.
//!
//! When a NAT rewrites an address or port, the IPv4 header checksum and the TCP/UDP checksum
//! (whose pseudo-header covers the addresses) change by a computable amount: RFC 1624 eqn. 3,
//! `HC' = ~(~HC + ~m + m')` in one's-complement arithmetic, updates a checksum without reading
//! the rest of the packet. <https://www.rfc-editor.org/rfc/rfc1624#section-3>
//!
//! Byte order: checksums and 16-bit fields are passed as the value of the two wire bytes read
//! big-endian (`u16::from_be_bytes`); addresses are passed as their wire bytes. Results use the
//! same convention (write them back with `to_be_bytes`).
//!
//! These functions are pure and small so the eBPF programs inline them and the host tests them
//! against a full recomputation.

#![expect(
    clippy::inline_always,
    reason = "the eBPF hot path must not make BPF-to-BPF calls (they cost verifier state and \
              cannot mix with tail calls); these are a few instructions each"
)]

/// Folds a 32-bit one's-complement accumulator into 16 bits (end-around carry).
#[inline(always)]
#[must_use]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    // Two folds leave at most 16 bits: the first yields ≤ 0x1fffe, the second ≤ 0xffff.
    #[expect(clippy::cast_possible_truncation, reason = "folded to 16 bits above")]
    let folded = sum as u16;
    folded
}

/// The checksum after one 16-bit word of the covered data changes from `old` to `new`.
#[inline(always)]
#[must_use]
pub const fn csum_replace2(check: u16, old: u16, new: u16) -> u16 {
    !fold(!check as u32 + !old as u32 + new as u32)
}

/// What replacing the address `old` by `new` adds to a checksum over it: the folded sum of
/// `~m + m'` over its 16-bit words (RFC 1624 eqn. 3 without the checksum term). Computed once
/// per flow and kept with it, so each packet's update is [`csum_add`]. For an IPv4 address
/// (`N` = 4) or an IPv6 one (16).
#[inline(always)]
#[must_use]
pub const fn addr_diff<const N: usize>(old: &[u8; N], new: &[u8; N]) -> u16 {
    // At most 16 terms of 0xffff: far below u32::MAX, so no overflow before folding.
    let mut sum = 0u32;
    let mut i = 0;
    while i + 1 < N {
        sum += !u16::from_be_bytes([old[i], old[i + 1]]) as u32;
        sum += u16::from_be_bytes([new[i], new[i + 1]]) as u32;
        i += 2;
    }
    fold(sum)
}

/// The checksum after the change whose [`addr_diff`] is `diff`.
#[inline(always)]
#[must_use]
pub const fn csum_add(check: u16, diff: u16) -> u16 {
    !fold(!check as u32 + diff as u32)
}

/// A UDP checksum to write back: over IPv4 a computed 0 is sent as `0xffff`, since 0 on the wire
/// means "no checksum" (RFC 768). An incoming 0 must not be updated at all: see
/// [`udp_has_checksum`].
#[inline(always)]
#[must_use]
pub const fn udp_mangled(check: u16) -> u16 {
    if check == 0 { 0xffff } else { check }
}

/// Whether a UDP checksum field carries a checksum (IPv4 allows 0 for "none"; IPv6 does not).
#[inline(always)]
#[must_use]
pub const fn udp_has_checksum(check: u16) -> bool {
    check != 0
}

/// The Internet checksum of `data` (RFC 1071), with `initial` as a starting sum (e.g. a
/// pseudo-header's). For user space and tests; the eBPF hot path only updates.
#[must_use]
pub fn checksum(initial: u32, data: &[u8]) -> u16 {
    let mut sum = u64::from(initial);
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u64::from(u16::from_be_bytes([*last, 0]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    #[expect(clippy::cast_possible_truncation, reason = "folded to 16 bits above")]
    let folded = sum as u16;
    !folded
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;

    /// splitmix64: deterministic random bytes without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn bytes<const N: usize>(&mut self) -> [u8; N] {
            core::array::from_fn(|_| self.next().to_le_bytes()[0])
        }

        fn vec(&mut self, max: usize) -> Vec<u8> {
            let len = usize::try_from(self.next() % (max as u64 + 1)).unwrap();
            (0..len).map(|_| self.next().to_le_bytes()[0]).collect()
        }
    }

    fn sum_words(data: &[u8]) -> u32 {
        data.chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
            .sum()
    }

    /// TCP/UDP checksum over a pseudo-header (src, dst, proto, length) and `segment`, whose
    /// checksum field at `check_at` is taken as zero.
    fn l4_checksum(src: &[u8], dst: &[u8], proto: u8, segment: &[u8], check_at: usize) -> u16 {
        let mut seg = segment.to_vec();
        seg[check_at..check_at + 2].copy_from_slice(&[0, 0]);
        let len = u32::try_from(seg.len()).unwrap();
        let pseudo =
            sum_words(src) + sum_words(dst) + u32::from(proto) + (len >> 16) + (len & 0xffff);
        checksum(pseudo, &seg)
    }

    fn be(b: &[u8], at: usize) -> u16 {
        u16::from_be_bytes([b[at], b[at + 1]])
    }

    #[test]
    fn ipv4_header_and_tcp_checksums_follow_a_dnat() {
        let mut rng = Rng(1);
        for _ in 0..2000 {
            // IPv4 header: checksum at 10, dst at 16..20.
            let mut ip: [u8; 20] = rng.bytes();
            ip[10..12].copy_from_slice(&[0, 0]);
            let c = checksum(0, &ip);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            let src: [u8; 4] = ip[12..16].try_into().unwrap();
            let old_dst: [u8; 4] = ip[16..20].try_into().unwrap();
            let new_dst: [u8; 4] = rng.bytes();

            // TCP segment: dst port at 2, checksum at 16.
            let mut seg = rng.vec(64);
            seg.resize(seg.len().max(20), 7);
            let c = l4_checksum(&src, &old_dst, 6, &seg, 16);
            seg[16..18].copy_from_slice(&c.to_be_bytes());
            let old_port = be(&seg, 2);
            let new_port: u16 = u16::from_be_bytes(rng.bytes());

            let diff = addr_diff(&old_dst, &new_dst);
            let ip_check = csum_add(be(&ip, 10), diff);
            let mut l4 = csum_add(be(&seg, 16), diff);
            l4 = csum_replace2(l4, old_port, new_port);

            ip[16..20].copy_from_slice(&new_dst);
            ip[10..12].copy_from_slice(&[0, 0]);
            assert_eq!(ip_check, checksum(0, &ip));
            seg[2..4].copy_from_slice(&new_port.to_be_bytes());
            assert_eq!(l4, l4_checksum(&src, &new_dst, 6, &seg, 16));
        }
    }

    #[test]
    fn ipv6_udp_checksum_follows_an_snat() {
        let mut rng = Rng(2);
        for _ in 0..2000 {
            let old_src: [u8; 16] = rng.bytes();
            let new_src: [u8; 16] = rng.bytes();
            let dst: [u8; 16] = rng.bytes();
            // UDP datagram: src port at 0, checksum at 6.
            let mut seg = rng.vec(64);
            seg.resize(seg.len().max(8), 0);
            let c = l4_checksum(&old_src, &dst, 17, &seg, 6);
            seg[6..8].copy_from_slice(&c.to_be_bytes());
            let old_port = be(&seg, 0);
            let new_port = u16::from_be_bytes(rng.bytes());

            let mut l4 = csum_add(be(&seg, 6), addr_diff(&old_src, &new_src));
            l4 = csum_replace2(l4, old_port, new_port);

            seg[0..2].copy_from_slice(&new_port.to_be_bytes());
            assert_eq!(l4, l4_checksum(&new_src, &dst, 17, &seg, 6));
        }
    }

    #[test]
    fn an_updated_header_still_verifies() {
        let mut rng = Rng(3);
        for _ in 0..2000 {
            let mut ip: [u8; 20] = rng.bytes();
            ip[10..12].copy_from_slice(&[0, 0]);
            let c = checksum(0, &ip);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            let new_src: [u8; 4] = rng.bytes();
            let old_src: [u8; 4] = ip[12..16].try_into().unwrap();
            let c = csum_add(be(&ip, 10), addr_diff(&old_src, &new_src));
            ip[12..16].copy_from_slice(&new_src);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            // A correct header sums to all ones, i.e. its checksum over itself is 0.
            assert_eq!(checksum(0, &ip), 0);
        }
    }

    #[test]
    fn replacing_a_word_with_itself_changes_nothing() {
        for check in [0x0000, 0x1234, 0xfffe] {
            assert_eq!(csum_replace2(check, 0xabcd, 0xabcd), check);
        }
    }

    #[test]
    fn udp_zero_means_no_checksum() {
        assert!(!udp_has_checksum(0));
        assert_eq!(udp_mangled(0), 0xffff);
        assert_eq!(udp_mangled(0x1234), 0x1234);
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 §3: the words 0001 f203 f4f5 f6f7 sum to ddf2 (checksum 220d).
        assert_eq!(
            checksum(0, &[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            0x220d
        );
    }
}
