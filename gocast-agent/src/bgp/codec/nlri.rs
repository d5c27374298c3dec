//! Address families and prefixes, as received: [`Family`] (AFI/SAFI), the (length, prefix)
//! runs of the Withdrawn Routes and NLRI fields (RFC 4271 §4.3) and of `MP_REACH_NLRI` and
//! `MP_UNREACH_NLRI` (RFC 4760 §3-§5). A malformed run is an `Err(reason)` that the caller turns
//! into its NOTIFICATION (3/10 in an UPDATE field, 3/9 in an attribute); an MP attribute of a
//! family we don't speak is skipped whole. Prefixes come out with their host bits cleared.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::reader::Reader;

/// An address family we speak (AFI/SAFI unicast).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    /// AFI 1 (IPv4), SAFI 1 (unicast).
    Ipv4Unicast,
    /// AFI 2 (IPv6), SAFI 1 (unicast).
    Ipv6Unicast,
}

// Address Family Identifiers and Subsequent Address Family Identifiers (RFC 4760 §3).
const AFI_IPV4: u16 = 1;
pub(super) const AFI_IPV6: u16 = 2;
pub(super) const SAFI_UNICAST: u8 = 1;

/// The AFI and SAFI of `family`.
pub(super) const fn afi_safi(family: Family) -> (u16, u8) {
    match family {
        Family::Ipv4Unicast => (AFI_IPV4, SAFI_UNICAST),
        Family::Ipv6Unicast => (AFI_IPV6, SAFI_UNICAST),
    }
}

/// The family an AFI/SAFI pair names, if we speak it.
pub(super) const fn family_of(afi: u16, safi: u8) -> Option<Family> {
    match (afi, safi) {
        (AFI_IPV4, SAFI_UNICAST) => Some(Family::Ipv4Unicast),
        (AFI_IPV6, SAFI_UNICAST) => Some(Family::Ipv6Unicast),
        _ => None,
    }
}

/// `MP_REACH_NLRI` (RFC 4760 §3). Families we don't speak are skipped whole.
pub(super) fn parse_mp_reach(value: &[u8], announced: &mut Vec<IpNet>) -> Result<(), &'static str> {
    let mut r = Reader::new(value);
    let (Some(afi), Some(safi)) = (r.u16(), r.u8()) else {
        return Err("MP_REACH_NLRI shorter than its AFI/SAFI");
    };
    let Some(family) = family_of(afi, safi) else {
        return Ok(());
    };
    let next_hop_len = r.u8().ok_or("MP_REACH_NLRI next hop length missing")?;
    // IPv4: 4, or 16/32 under RFC 8950; IPv6: global, or global + link-local (RFC 2545 §3).
    let plausible = match family {
        Family::Ipv4Unicast => matches!(next_hop_len, 4 | 16 | 32),
        Family::Ipv6Unicast => matches!(next_hop_len, 16 | 32),
    };
    if !plausible {
        return Err("MP_REACH_NLRI next hop length does not fit the family");
    }
    r.take(usize::from(next_hop_len))
        .ok_or("MP_REACH_NLRI next hop overruns the attribute")?;
    r.u8().ok_or("MP_REACH_NLRI reserved octet missing")?;
    parse_prefixes(r.rest(), family, announced)
}

/// `MP_UNREACH_NLRI` (RFC 4760 §4); returns the family if it withdrew nothing (End-of-RIB).
pub(super) fn parse_mp_unreach(
    value: &[u8],
    withdrawn: &mut Vec<IpNet>,
) -> Result<Option<Family>, &'static str> {
    let mut r = Reader::new(value);
    let (Some(afi), Some(safi)) = (r.u16(), r.u8()) else {
        return Err("MP_UNREACH_NLRI shorter than its AFI/SAFI");
    };
    let Some(family) = family_of(afi, safi) else {
        return Ok(None);
    };
    parse_prefixes(r.rest(), family, withdrawn)?;
    Ok(r.is_empty().then_some(family))
}

/// A run of (length, prefix) NLRI (RFC 4271 §4.3, RFC 4760 §5), host bits cleared.
pub(super) fn parse_prefixes(
    bytes: &[u8],
    family: Family,
    out: &mut Vec<IpNet>,
) -> Result<(), &'static str> {
    let mut r = Reader::new(bytes);
    while let Some(len) = r.u8() {
        let max = match family {
            Family::Ipv4Unicast => 32,
            Family::Ipv6Unicast => 128,
        };
        if len > max {
            return Err("prefix length longer than the address");
        }
        let octets = r
            .take(usize::from(len).div_ceil(8))
            .ok_or("prefix runs past the end of its field")?;
        let prefix = match family {
            Family::Ipv4Unicast => Ipv4Net::new(Ipv4Addr::from(padded::<4>(octets)), len)
                .map(|net| IpNet::V4(net.trunc())),
            Family::Ipv6Unicast => Ipv6Net::new(Ipv6Addr::from(padded::<16>(octets)), len)
                .map(|net| IpNet::V6(net.trunc())),
        }
        .map_err(|_| "prefix length longer than the address")?;
        out.push(prefix);
    }
    Ok(())
}

/// `octets` followed by zeros.
fn padded<const N: usize>(octets: &[u8]) -> [u8; N] {
    let mut address = [0; N];
    for (to, from) in address.iter_mut().zip(octets) {
        *to = *from;
    }
    address
}

#[cfg(test)]
mod tests {
    use crate::bgp::codec::testing::{
        Expect, assert_cases, attr, decode_update, hex, mandatory, mp_reach_v6, net,
        only_attributes, raw_update,
    };

    #[test]
    fn a_peer_ipv6_announcement_and_withdrawal_decode() {
        let attrs = [mp_reach_v6(), mandatory()].concat();
        let update = decode_update(&raw_update(&[], &attrs, &[]));
        assert_eq!(update.announced, vec![net("2001:db8:1::/48")]);
        let unreach = attr(
            0x80,
            15,
            &hex("0002 01 30 20010db80001 40 20010db800020000"),
        );
        let update = decode_update(&raw_update(&[], &unreach, &[]));
        assert_eq!(
            update.withdrawn,
            vec![net("2001:db8:1::/48"), net("2001:db8:2::/64")]
        );
        assert_eq!(update.end_of_rib, None);
    }

    #[test]
    fn host_bits_in_received_prefixes_are_cleared() {
        let update = decode_update(&raw_update(&[], &mandatory(), &hex("19 c6336481")));
        assert_eq!(update.announced, vec![net("198.51.100.128/25")]);
    }

    #[test]
    fn malformed_prefixes_give_their_exact_notification() {
        let short_next_hop = attr(0x80, 14, &hex("0002 01 10 20010db800000000"));
        let long_prefix = attr(
            0x80,
            14,
            &hex("0002 01 10 20010db8000000000000000000000001 00 81"),
        );
        let reset = |subcode| Expect::Notify(3, subcode, vec![]);
        assert_cases(vec![
            (
                "NLRI prefix length 33",
                raw_update(&[], &mandatory(), &hex("21 c0000201 00")),
                reset(10),
            ),
            (
                "withdrawn prefix runs past its field",
                raw_update(&hex("18 c633"), &[], &[]),
                reset(10),
            ),
            (
                "truncated MP_REACH",
                only_attributes(&[short_next_hop, mandatory()]),
                Expect::NotifyCode(3, 9),
            ),
            (
                "MP_REACH IPv6 prefix length 129",
                only_attributes(&[long_prefix, mandatory()]),
                Expect::NotifyCode(3, 9),
            ),
            (
                "MP_UNREACH shorter than AFI/SAFI",
                only_attributes(&[attr(0x80, 15, &hex("0002"))]),
                Expect::NotifyCode(3, 9),
            ),
        ]);
    }
}
