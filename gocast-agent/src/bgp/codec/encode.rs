//! Everything we send. The inputs are ours, so sizes are invariants; they are still computed
//! with checked conversions so a broken invariant gives a wrong message, never a panic.
//!
//! - OPEN (built by zettabgp, the one thing it does for us), KEEPALIVE, NOTIFICATION (data cut
//!   to fit 4096 bytes) and ROUTE-REFRESH, for `Encoder<Message>`.
//! - UPDATEs as bytes ([`encode_announce`], [`encode_withdraw`], [`encode_end_of_rib`]) for
//!   `Encoder<Bytes>`, so one encoding serves every peer with the same attributes:
//!   `MP_REACH_NLRI`/`MP_UNREACH_NLRI` first (RFC 7606 §5.1), the others in ascending type code
//!   (RFC 4271 §5), the extended length flag only when a value exceeds 255 bytes, each UPDATE at
//!   most 4096 bytes, packed with as many prefixes as fit.

use std::{
    io,
    net::{IpAddr, Ipv4Addr},
};

use bytes::{BufMut, Bytes, BytesMut};
use ipnet::IpNet;
use zettabgp::BgpMessage as _;

use super::{
    attributes::{
        AS_SEQUENCE, ATTR_AS_PATH, ATTR_AS4_PATH, ATTR_COMMUNITIES, ATTR_LARGE_COMMUNITY,
        ATTR_LOCAL_PREF, ATTR_MED, ATTR_MP_REACH, ATTR_MP_UNREACH, ATTR_NEXT_HOP, ATTR_ORIGIN,
        Attributes, FLAG_EXTENDED_LENGTH, OPTIONAL_NON_TRANSITIVE, OPTIONAL_TRANSITIVE, Origin,
        WELL_KNOWN,
    },
    header::{
        HEADER_LEN, MARKER, MAX_MESSAGE_LEN, MSG_KEEPALIVE, MSG_NOTIFICATION, MSG_OPEN,
        MSG_ROUTE_REFRESH, MSG_UPDATE, NOTIFICATION_MIN_LEN,
    },
    nlri::{AFI_IPV6, Family, SAFI_UNICAST, afi_safi},
    notification::Notification,
    open::{AS_TRANS, Open},
};

// Sizes used to pack UPDATEs.
/// Header plus the two 2-byte length fields of an UPDATE.
const UPDATE_OVERHEAD: usize = HEADER_LEN + 4;
/// An attribute header with the extended length flag.
const EXTENDED_ATTR_HEADER: usize = 4;
/// `MP_REACH_NLRI` before its NLRI, with an IPv6 global next hop: AFI, SAFI, length, 16, reserved.
const MP_REACH_IPV6_FIXED: usize = 2 + 1 + 1 + 16 + 1;
/// `MP_UNREACH_NLRI` before its withdrawn routes: AFI, SAFI.
const MP_UNREACH_FIXED: usize = 2 + 1;

/// `len` as a 2-byte length field; every caller keeps it within a 4096-byte message.
fn len16(len: usize) -> u16 {
    u16::try_from(len).unwrap_or(u16::MAX)
}

/// Header plus body.
fn frame(msg_type: u8, body: &[u8]) -> Bytes {
    let len = HEADER_LEN + body.len();
    debug_assert!(len <= MAX_MESSAGE_LEN, "BGP message of {len} bytes");
    let mut out = BytesMut::with_capacity(len);
    out.put_slice(&MARKER);
    out.put_u16(len16(len));
    out.put_u8(msg_type);
    out.put_slice(body);
    out.freeze()
}

/// One path attribute, with the extended length flag only when the value needs it.
fn put_attribute(out: &mut BytesMut, flags: u8, type_code: u8, value: &[u8]) {
    if let Ok(len) = u8::try_from(value.len()) {
        out.put_u8(flags);
        out.put_u8(type_code);
        out.put_u8(len);
    } else {
        out.put_u8(flags | FLAG_EXTENDED_LENGTH);
        out.put_u8(type_code);
        out.put_u16(len16(value.len()));
    }
    out.put_slice(value);
}

/// An OPEN with the capabilities `open` says, each in its own Capabilities parameter (the
/// layout zettabgp writes; RFC 5492 §4 allows either).
pub(super) fn encode_open_message(open: &Open) -> Result<Bytes, io::Error> {
    let mut families = open.families.clone();
    families.sort_unstable();
    families.dedup();
    let mut caps: Vec<zettabgp::BgpCapability> = families
        .iter()
        .map(|family| match family {
            Family::Ipv4Unicast => zettabgp::BgpCapability::SafiIPv4u,
            Family::Ipv6Unicast => zettabgp::BgpCapability::SafiIPv6u,
        })
        .collect();
    if open.route_refresh {
        caps.push(zettabgp::BgpCapability::CapRR);
    }
    if open.four_octet_as {
        caps.push(zettabgp::BgpCapability::CapASN32(open.asn));
    }
    let message = zettabgp::message::BgpOpenMessage {
        // zettabgp writes AS_TRANS for an AS above 65535.
        as_num: open.asn,
        hold_time: open.hold_time,
        router_id: open.router_id,
        caps,
    };
    // zettabgp's encoder ignores the session parameters for an OPEN.
    let params = zettabgp::BgpSessionParams::new(
        open.asn,
        open.hold_time,
        zettabgp::BgpTransportMode::IPv4,
        open.router_id,
        Vec::new(),
    );
    let mut body = [0_u8; MAX_MESSAGE_LEN - HEADER_LEN];
    let len = message
        .encode_to(&params, &mut body)
        .map_err(|e| io::Error::other(format!("encoding our OPEN: {e:?}")))?;
    Ok(frame(MSG_OPEN, body.get(..len).unwrap_or_default()))
}

/// A KEEPALIVE (RFC 4271 §4.4): the header alone.
pub fn encode_keepalive() -> Bytes {
    frame(MSG_KEEPALIVE, &[])
}

/// A NOTIFICATION (RFC 4271 §4.5); data beyond what fits in 4096 bytes is cut.
pub fn encode_notification(notification: &Notification) -> Bytes {
    let room = MAX_MESSAGE_LEN - NOTIFICATION_MIN_LEN;
    let data = notification.data.get(..room).unwrap_or(&notification.data);
    let mut body = Vec::with_capacity(2 + data.len());
    body.push(notification.code);
    body.push(notification.subcode);
    body.extend_from_slice(data);
    frame(MSG_NOTIFICATION, &body)
}

/// A ROUTE-REFRESH request for `family` (RFC 2918 §3).
pub fn encode_route_refresh(family: Family) -> Bytes {
    let (afi, safi) = afi_safi(family);
    let [afi_hi, afi_lo] = afi.to_be_bytes();
    frame(MSG_ROUTE_REFRESH, &[afi_hi, afi_lo, 0, safi])
}

/// End-of-RIB for `family` (RFC 4724 §2): an empty UPDATE for IPv4, an UPDATE holding only an
/// `MP_UNREACH_NLRI` with the AFI/SAFI for IPv6.
pub fn encode_end_of_rib(family: Family) -> Bytes {
    match family {
        Family::Ipv4Unicast => update_message(&[], &[], &[]),
        Family::Ipv6Unicast => {
            let mut attributes = BytesMut::new();
            put_attribute(
                &mut attributes,
                OPTIONAL_NON_TRANSITIVE,
                ATTR_MP_UNREACH,
                &mp_unreach_value(&[]),
            );
            update_message(&[], &attributes, &[])
        }
    }
}

/// UPDATEs announcing `prefixes` with `attrs` and `next_hop`, as few as fit in 4096 bytes each
/// (RFC 4271 §4.3). IPv4 prefixes go in the NLRI field with `NEXT_HOP`; IPv6 prefixes in
/// `MP_REACH_NLRI` with `next_hop` as the 16-byte global next hop (RFC 4760 §3, RFC 2545 §3), or
/// its IPv4-mapped form if `next_hop` is IPv4. `AS_PATH` holds 4-byte ASNs when
/// `four_octet_as` (both OPENs had the capability), else 2-byte ones with `AS_TRANS` for larger
/// ASNs and an `AS4_PATH` holding the real path (RFC 6793 §4.2.2).
///
/// Meant for one family per call; mixed input gives each family its own messages. IPv4 prefixes
/// with an IPv6 next hop (RFC 8950, a capability we don't announce) and attributes too large for
/// any prefix to fit give no message and are logged.
pub fn encode_announce(
    attrs: &Attributes,
    next_hop: IpAddr,
    prefixes: &[IpNet],
    four_octet_as: bool,
) -> Vec<Bytes> {
    let (v4, v6): (Vec<IpNet>, Vec<IpNet>) = prefixes
        .iter()
        .partition(|prefix| matches!(prefix, IpNet::V4(_)));
    let mut out = Vec::new();
    if !v4.is_empty() {
        match next_hop {
            IpAddr::V4(next_hop) => {
                let path = path_attributes(attrs, four_octet_as, Some(next_hop));
                let budget = (MAX_MESSAGE_LEN - UPDATE_OVERHEAD).checked_sub(path.len());
                match budget.and_then(|budget| pack_prefixes(&v4, budget)) {
                    Some(chunks) => {
                        out.extend(chunks.iter().map(|nlri| update_message(&[], &path, nlri)));
                    }
                    None => too_large(v4.len(), path.len()),
                }
            }
            IpAddr::V6(next_hop) => tracing::warn!(
                %next_hop,
                prefixes = v4.len(),
                "IPv4 prefixes need an IPv4 next hop; not announced"
            ),
        }
    }
    if !v6.is_empty() {
        let next_hop = match next_hop {
            IpAddr::V6(address) => address,
            IpAddr::V4(address) => address.to_ipv6_mapped(),
        };
        let path = path_attributes(attrs, four_octet_as, None);
        let budget =
            (MAX_MESSAGE_LEN - UPDATE_OVERHEAD - EXTENDED_ATTR_HEADER - MP_REACH_IPV6_FIXED)
                .checked_sub(path.len());
        match budget.and_then(|budget| pack_prefixes(&v6, budget)) {
            Some(chunks) => out.extend(chunks.iter().map(|nlri| {
                let mut reach = BytesMut::with_capacity(MP_REACH_IPV6_FIXED + nlri.len());
                reach.put_u16(AFI_IPV6);
                reach.put_u8(SAFI_UNICAST);
                reach.put_u8(16);
                reach.put_slice(&next_hop.octets());
                reach.put_u8(0);
                reach.put_slice(nlri);
                // RFC 7606 §5.1: MP_REACH_NLRI first.
                let mut attributes = BytesMut::with_capacity(MAX_MESSAGE_LEN);
                put_attribute(
                    &mut attributes,
                    OPTIONAL_NON_TRANSITIVE,
                    ATTR_MP_REACH,
                    &reach,
                );
                attributes.put_slice(&path);
                update_message(&[], &attributes, &[])
            })),
            None => too_large(v6.len(), path.len()),
        }
    }
    out
}

fn too_large(prefixes: usize, attributes: usize) {
    tracing::error!(
        prefixes,
        attributes,
        "path attributes leave no room for a prefix in a 4096-byte UPDATE; not announced"
    );
}

/// UPDATEs withdrawing `prefixes`, as few as fit in 4096 bytes each: IPv4 in the Withdrawn
/// Routes field, IPv6 in `MP_UNREACH_NLRI` (RFC 4760 §4). Meant for one family per call; mixed
/// input gives each family its own messages.
pub fn encode_withdraw(prefixes: &[IpNet]) -> Vec<Bytes> {
    let (v4, v6): (Vec<IpNet>, Vec<IpNet>) = prefixes
        .iter()
        .partition(|prefix| matches!(prefix, IpNet::V4(_)));
    let mut out = Vec::new();
    // A /128 is 17 bytes, far below either budget, so packing cannot fail.
    if let Some(chunks) = pack_prefixes(&v4, MAX_MESSAGE_LEN - UPDATE_OVERHEAD) {
        out.extend(
            chunks
                .iter()
                .map(|withdrawn| update_message(withdrawn, &[], &[])),
        );
    }
    let budget = MAX_MESSAGE_LEN - UPDATE_OVERHEAD - EXTENDED_ATTR_HEADER - MP_UNREACH_FIXED;
    if let Some(chunks) = pack_prefixes(&v6, budget) {
        out.extend(chunks.iter().map(|withdrawn| {
            let mut attributes = BytesMut::with_capacity(MAX_MESSAGE_LEN);
            put_attribute(
                &mut attributes,
                OPTIONAL_NON_TRANSITIVE,
                ATTR_MP_UNREACH,
                &mp_unreach_value(withdrawn),
            );
            update_message(&[], &attributes, &[])
        }));
    }
    out
}

fn mp_unreach_value(withdrawn: &[u8]) -> BytesMut {
    let mut value = BytesMut::with_capacity(MP_UNREACH_FIXED + withdrawn.len());
    value.put_u16(AFI_IPV6);
    value.put_u8(SAFI_UNICAST);
    value.put_slice(withdrawn);
    value
}

/// An UPDATE from its three variable parts (RFC 4271 §4.3).
fn update_message(withdrawn: &[u8], attributes: &[u8], nlri: &[u8]) -> Bytes {
    let mut body = BytesMut::with_capacity(4 + withdrawn.len() + attributes.len() + nlri.len());
    body.put_u16(len16(withdrawn.len()));
    body.put_slice(withdrawn);
    body.put_u16(len16(attributes.len()));
    body.put_slice(attributes);
    body.put_slice(nlri);
    frame(MSG_UPDATE, &body)
}

/// Encoded prefixes, in order, cut into runs of at most `budget` bytes; `None` if a prefix
/// alone exceeds it. Cutting greedily in order gives the fewest messages for prefixes of one
/// size, which is what we announce (/32s and /128s).
fn pack_prefixes(prefixes: &[IpNet], budget: usize) -> Option<Vec<BytesMut>> {
    let mut chunks = Vec::new();
    let mut current = BytesMut::new();
    for prefix in prefixes {
        let prefix = prefix.trunc();
        let octets = usize::from(prefix.prefix_len()).div_ceil(8);
        if current.len() + 1 + octets > budget {
            if current.is_empty() {
                return None;
            }
            chunks.push(std::mem::take(&mut current));
        }
        current.put_u8(prefix.prefix_len());
        match prefix.addr() {
            IpAddr::V4(address) => current.put_slice(address.octets().get(..octets)?),
            IpAddr::V6(address) => current.put_slice(address.octets().get(..octets)?),
        }
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    Some(chunks)
}

/// The path attributes other than `MP_REACH_NLRI`, in ascending type code (RFC 4271 §5).
fn path_attributes(
    attrs: &Attributes,
    four_octet_as: bool,
    next_hop: Option<Ipv4Addr>,
) -> BytesMut {
    let mut out = BytesMut::new();
    let origin = match attrs.origin {
        Origin::Igp => 0,
        Origin::Egp => 1,
        Origin::Incomplete => 2,
    };
    put_attribute(&mut out, WELL_KNOWN, ATTR_ORIGIN, &[origin]);
    put_attribute(
        &mut out,
        WELL_KNOWN,
        ATTR_AS_PATH,
        &as_path_value(&attrs.as_path, four_octet_as),
    );
    if let Some(next_hop) = next_hop {
        put_attribute(&mut out, WELL_KNOWN, ATTR_NEXT_HOP, &next_hop.octets());
    }
    if let Some(med) = attrs.med {
        put_attribute(
            &mut out,
            OPTIONAL_NON_TRANSITIVE,
            ATTR_MED,
            &med.to_be_bytes(),
        );
    }
    if let Some(local_pref) = attrs.local_pref {
        put_attribute(
            &mut out,
            WELL_KNOWN,
            ATTR_LOCAL_PREF,
            &local_pref.to_be_bytes(),
        );
    }
    if !attrs.communities.is_empty() {
        let value: Vec<u8> = attrs
            .communities
            .iter()
            .flat_map(|c| c.to_be_bytes())
            .collect();
        put_attribute(&mut out, OPTIONAL_TRANSITIVE, ATTR_COMMUNITIES, &value);
    }
    // RFC 6793 §4.2.2: a peer without the capability gets AS_TRANS in AS_PATH and the real
    // path in AS4_PATH, only when some AS does not fit 2 bytes.
    if !four_octet_as && attrs.as_path.iter().any(|&asn| asn > u32::from(u16::MAX)) {
        put_attribute(
            &mut out,
            OPTIONAL_TRANSITIVE,
            ATTR_AS4_PATH,
            &as_path_value(&attrs.as_path, true),
        );
    }
    if !attrs.large_communities.is_empty() {
        let value: Vec<u8> = attrs
            .large_communities
            .iter()
            .flat_map(|&(global, local1, local2)| {
                [global, local1, local2]
                    .into_iter()
                    .flat_map(u32::to_be_bytes)
            })
            .collect();
        put_attribute(&mut out, OPTIONAL_TRANSITIVE, ATTR_LARGE_COMMUNITY, &value);
    }
    out
}

/// `AS_SEQUENCE` segments of at most 255 ASNs (RFC 4271 §4.3), 4- or 2-byte.
fn as_path_value(asns: &[u32], four_octet_as: bool) -> BytesMut {
    let mut value = BytesMut::new();
    for segment in asns.chunks(usize::from(u8::MAX)) {
        value.put_u8(AS_SEQUENCE);
        value.put_u8(u8::try_from(segment.len()).unwrap_or(u8::MAX));
        for &asn in segment {
            if four_octet_as {
                value.put_u32(asn);
            } else {
                value.put_u16(u16::try_from(asn).unwrap_or(AS_TRANS));
            }
        }
    }
    value
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use ipnet::{Ipv4Net, Ipv6Net};

    use super::*;
    use crate::bgp::codec::{
        BgpCodec, Message, ReceivedUpdate,
        reader::Reader,
        testing::{
            attributes, decode_all, decode_one, decode_update, encode_open, hex, net, notification,
        },
    };

    #[test]
    fn our_open_has_the_exact_rfc_4271_layout() {
        let bytes = encode_open(
            65001,
            90,
            Ipv4Addr::new(192, 0, 2, 1),
            &[Family::Ipv4Unicast, Family::Ipv6Unicast],
        );
        let expected = hex("ffffffffffffffffffffffffffffffff 0039 01
             04 fde9 005a c0000201 1c
             02 06 01 04 0001 00 01
             02 06 01 04 0002 00 01
             02 02 02 00
             02 06 41 04 0000fde9");
        assert_eq!(bytes.as_ref(), expected.as_slice());
    }

    #[test]
    fn our_open_decodes_to_what_was_encoded() {
        let families = [Family::Ipv4Unicast, Family::Ipv6Unicast];
        let bytes = encode_open(65001, 90, Ipv4Addr::new(192, 0, 2, 1), &families);
        let expected = Open {
            asn: 65001,
            hold_time: 90,
            router_id: Ipv4Addr::new(192, 0, 2, 1),
            families: families.to_vec(),
            four_octet_as: true,
            route_refresh: true,
        };
        assert_eq!(decode_one(&bytes).unwrap(), Message::Open(expected));
    }

    #[test]
    fn an_asn_above_65535_goes_in_the_capability_with_as_trans_in_my_as() {
        let bytes = encode_open(4_200_000_001, 0, Ipv4Addr::new(10, 0, 0, 1), &[]);
        assert_eq!(&bytes[20..22], &AS_TRANS.to_be_bytes());
        match decode_one(&bytes).unwrap() {
            Message::Open(open) => {
                assert_eq!(open.asn, 4_200_000_001);
                assert!(open.families.is_empty());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn zettabgp_reads_our_open_the_same_way() {
        use zettabgp::BgpMessage as _;
        let bytes = encode_open(
            65001,
            90,
            Ipv4Addr::new(192, 0, 2, 1),
            &[Family::Ipv6Unicast],
        );
        let params = zettabgp::BgpSessionParams::new(
            1,
            90,
            zettabgp::BgpTransportMode::IPv4,
            Ipv4Addr::LOCALHOST,
            Vec::new(),
        );
        let mut open = zettabgp::message::BgpOpenMessage::new();
        open.decode_from(&params, &bytes[HEADER_LEN..]).unwrap();
        assert_eq!(open.hold_time, 90);
        assert_eq!(
            open.caps,
            vec![
                zettabgp::BgpCapability::SafiIPv6u,
                zettabgp::BgpCapability::CapRR,
                zettabgp::BgpCapability::CapASN32(65001),
            ]
        );
    }

    #[test]
    fn keepalive_is_a_bare_19_byte_header_both_ways() {
        let bytes = encode_keepalive();
        assert_eq!(
            bytes.as_ref(),
            hex("ffffffffffffffffffffffffffffffff 0013 04").as_slice()
        );
        assert_eq!(decode_one(&bytes).unwrap(), Message::Keepalive);
    }

    #[test]
    fn route_refresh_round_trips_for_both_families() {
        assert_eq!(
            encode_route_refresh(Family::Ipv6Unicast).as_ref(),
            hex("ffffffffffffffffffffffffffffffff 0017 05 0002 00 01").as_slice()
        );
        for family in [Family::Ipv4Unicast, Family::Ipv6Unicast] {
            let bytes = encode_route_refresh(family);
            assert_eq!(decode_one(&bytes).unwrap(), Message::RouteRefresh(family));
        }
    }

    #[test]
    fn notification_round_trips_with_its_data() {
        let sent = notification(3, 2, &hex("40 63 01 00"));
        let bytes = encode_notification(&sent);
        assert_eq!(
            bytes.as_ref(),
            hex("ffffffffffffffffffffffffffffffff 0019 03 03 02 40630100").as_slice()
        );
        assert_eq!(decode_one(&bytes).unwrap(), Message::Notification(sent));
    }

    #[test]
    fn oversized_notification_data_is_cut_to_fit_4096_bytes() {
        let bytes = encode_notification(&notification(3, 9, &[0xab; 5000]));
        assert_eq!(bytes.len(), MAX_MESSAGE_LEN);
        assert!(decode_one(&bytes).is_ok());
    }

    // ---- UPDATE: what we send ------------------------------------------------------------------

    #[test]
    fn an_ipv4_announcement_has_the_exact_rfc_4271_layout() {
        let bytes = encode_announce(
            &attributes(),
            "192.0.2.1".parse().unwrap(),
            &[net("198.51.100.0/24")],
            true,
        );
        let expected = hex("ffffffffffffffffffffffffffffffff 002f 02
             0000 0014
             40 01 01 00
             40 02 06 02 01 0000fde9
             40 03 04 c0000201
             18 c63364");
        assert_eq!(bytes, vec![Bytes::from(expected)]);
        let update = decode_update(&bytes[0]);
        assert_eq!(update.announced, vec![net("198.51.100.0/24")]);
        assert_eq!(update.treat_as_withdraw, None);
    }

    #[test]
    fn an_ipv6_announcement_puts_mp_reach_first_with_the_global_next_hop() {
        let attrs = Attributes {
            as_path: Vec::new(),
            local_pref: Some(100),
            ..attributes()
        };
        let bytes = encode_announce(
            &attrs,
            "2001:db8::1".parse().unwrap(),
            &[net("2001:db8:100::/48")],
            true,
        );
        let expected = hex("ffffffffffffffffffffffffffffffff 0044 02
             0000 002d
             80 0e 1c 0002 01 10 20010db8000000000000000000000001 00 30 20010db80100
             40 01 01 00
             40 02 00
             40 05 04 00000064");
        assert_eq!(bytes, vec![Bytes::from(expected)]);
        assert_eq!(
            decode_update(&bytes[0]).announced,
            vec![net("2001:db8:100::/48")]
        );
    }

    #[test]
    fn every_attribute_we_send_is_in_type_order_with_the_right_flags() {
        let attrs = Attributes {
            origin: Origin::Incomplete,
            as_path: vec![65001, 65002],
            med: Some(7),
            local_pref: Some(200),
            communities: vec![65001 << 16 | 100],
            large_communities: vec![(65001, 1, 2)],
        };
        let bytes = encode_announce(
            &attrs,
            "192.0.2.1".parse().unwrap(),
            &[net("192.0.2.10/32")],
            true,
        );
        let body = &bytes[0][HEADER_LEN + 4..];
        let mut r = Reader::new(body);
        let mut seen = Vec::new();
        while let (Some(flags), Some(code), Some(len)) = (r.u8(), r.u8(), r.u8()) {
            seen.push((code, flags));
            r.take(usize::from(len)).unwrap();
            if code == ATTR_LARGE_COMMUNITY {
                break;
            }
        }
        assert_eq!(
            seen,
            vec![
                (1, 0x40),
                (2, 0x40),
                (3, 0x40),
                (4, 0x80),
                (5, 0x40),
                (8, 0xc0),
                (32, 0xc0)
            ]
        );
        let update = decode_update(&bytes[0]);
        assert_eq!(update.announced, vec![net("192.0.2.10/32")]);
        assert_eq!(update.treat_as_withdraw, None);
    }

    #[test]
    fn a_peer_without_4_octet_as_gets_as_trans_and_an_as4_path() {
        let attrs = Attributes {
            as_path: vec![4_200_000_001],
            ..attributes()
        };
        let bytes = encode_announce(
            &attrs,
            "192.0.2.1".parse().unwrap(),
            &[net("192.0.2.10/32")],
            false,
        );
        let raw = bytes[0].as_ref();
        let as_path = hex("40 02 04 02 01 5ba0");
        let as4_path = hex("c0 11 06 02 01 fa56ea01");
        assert!(
            raw.windows(as_path.len()).any(|w| w == as_path),
            "{raw:02x?}"
        );
        assert!(
            raw.windows(as4_path.len()).any(|w| w == as4_path),
            "{raw:02x?}"
        );
        let mut codec = BgpCodec::new();
        codec.set_four_octet_as(false);
        match decode_all(&mut codec, raw).unwrap().as_slice() {
            [Message::Update(update)] => assert!(update.treat_as_withdraw.is_none()),
            other => panic!("{other:?}"),
        }
        // A 2-byte ASN path needs no AS4_PATH.
        let bytes = encode_announce(
            &attributes(),
            "192.0.2.1".parse().unwrap(),
            &[net("192.0.2.10/32")],
            false,
        );
        assert!(!bytes[0].windows(2).any(|w| w == [0xc0, 0x11]));
    }

    #[test]
    fn many_communities_use_the_extended_length_flag() {
        let attrs = Attributes {
            communities: (0..70).map(|i| 65001 << 16 | i).collect(),
            ..attributes()
        };
        let bytes = encode_announce(
            &attrs,
            "192.0.2.1".parse().unwrap(),
            &[net("192.0.2.10/32")],
            true,
        );
        let header = hex("d0 08 0118");
        assert!(bytes[0].windows(4).any(|w| w == header.as_slice()));
        let update = decode_update(&bytes[0]);
        assert_eq!(update.announced, vec![net("192.0.2.10/32")]);
        assert_eq!(update.treat_as_withdraw, None);
    }

    /// Every message fits, and none but the last could take the next prefix: with prefixes of
    /// one size that is the fewest messages.
    fn assert_tightly_packed(messages: &[Bytes], prefix_size: usize) {
        for (i, message) in messages.iter().enumerate() {
            assert!(message.len() <= MAX_MESSAGE_LEN);
            if i + 1 < messages.len() {
                assert!(
                    message.len() + prefix_size > MAX_MESSAGE_LEN,
                    "message {i} not full"
                );
            }
        }
    }

    #[test]
    fn two_thousand_ipv4_host_routes_pack_into_the_fewest_full_updates() {
        let prefixes: Vec<IpNet> = (0..2000_u32)
            .map(|i| IpNet::V4(Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 + i), 32).unwrap()))
            .collect();
        let messages =
            encode_announce(&attributes(), "192.0.2.1".parse().unwrap(), &prefixes, true);
        // 20 bytes of attributes leave 4053 bytes, 810 /32s, per message.
        assert_eq!(messages.len(), 3);
        assert_tightly_packed(&messages, 5);
        let mut decoded = Vec::new();
        for message in &messages {
            decoded.extend(decode_update(message).announced);
        }
        assert_eq!(decoded, prefixes);

        let withdrawals = encode_withdraw(&prefixes);
        assert_eq!(withdrawals.len(), 3);
        assert_tightly_packed(&withdrawals, 5);
        let mut decoded = Vec::new();
        for message in &withdrawals {
            decoded.extend(decode_update(message).withdrawn);
        }
        assert_eq!(decoded, prefixes);
    }

    #[test]
    fn ipv6_host_routes_pack_into_full_mp_reach_and_mp_unreach_updates() {
        let prefixes: Vec<IpNet> = (0..600_u128)
            .map(|i| {
                IpNet::V6(Ipv6Net::new(Ipv6Addr::from(0x2001_0db8_u128 << 96 | i), 128).unwrap())
            })
            .collect();
        let messages = encode_announce(
            &attributes(),
            "2001:db8::1".parse().unwrap(),
            &prefixes,
            true,
        );
        assert_tightly_packed(&messages, 17);
        let mut decoded = Vec::new();
        for message in &messages {
            decoded.extend(decode_update(message).announced);
        }
        assert_eq!(decoded, prefixes);

        let withdrawals = encode_withdraw(&prefixes);
        assert_tightly_packed(&withdrawals, 17);
        let mut decoded = Vec::new();
        for message in &withdrawals {
            decoded.extend(decode_update(message).withdrawn);
        }
        assert_eq!(decoded, prefixes);
    }

    #[test]
    fn nothing_to_announce_or_withdraw_gives_no_message() {
        assert!(encode_announce(&attributes(), "192.0.2.1".parse().unwrap(), &[], true).is_empty());
        assert!(encode_withdraw(&[]).is_empty());
    }

    #[test]
    fn ipv4_prefixes_with_an_ipv6_next_hop_are_not_announced() {
        let messages = encode_announce(
            &attributes(),
            "2001:db8::1".parse().unwrap(),
            &[net("192.0.2.10/32")],
            true,
        );
        assert!(messages.is_empty());
    }

    #[test]
    fn end_of_rib_markers_have_the_rfc_4724_layout_and_decode_as_such() {
        assert_eq!(
            encode_end_of_rib(Family::Ipv4Unicast).as_ref(),
            hex("ffffffffffffffffffffffffffffffff 0017 02 0000 0000").as_slice()
        );
        assert_eq!(
            encode_end_of_rib(Family::Ipv6Unicast).as_ref(),
            hex("ffffffffffffffffffffffffffffffff 001d 02 0000 0006 80 0f 03 0002 01").as_slice()
        );
        for family in [Family::Ipv4Unicast, Family::Ipv6Unicast] {
            let update = decode_update(&encode_end_of_rib(family));
            assert_eq!(
                update,
                ReceivedUpdate {
                    end_of_rib: Some(family),
                    ..ReceivedUpdate::default()
                }
            );
        }
    }
}
