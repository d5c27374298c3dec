//! Path attributes (RFC 4271 §4.3, §5): their type codes and flags, [`Attributes`] (what we
//! announce; encoded in `encode.rs`), and the checks on received ones, per RFC 7606:
//!
//! - Session reset ([`DecodeError`]): the list cannot be framed (§4), `MP_REACH_NLRI` or
//!   `MP_UNREACH_NLRI` appears twice (§3.g) or cannot be parsed (§7.11), or a well-known
//!   attribute is unknown (RFC 4271 §6.3).
//! - Treat-as-withdraw (the reason, in [`AttrScan::treat_as_withdraw`]): a malformed ORIGIN,
//!   `AS_PATH`, `NEXT_HOP`, MED, `LOCAL_PREF`, COMMUNITIES, `LARGE_COMMUNITY`, `ORIGINATOR_ID` or
//!   `CLUSTER_LIST`, or wrong flags on an attribute we recognise (§3.c, §7).
//! - Attribute discard: a malformed `ATOMIC_AGGREGATE` or AGGREGATOR (§7.6, §7.7), any repeat of
//!   another attribute (§3.g), malformed `AS4_PATH`/`AS4_AGGREGATOR` (RFC 6793 §6). Unknown
//!   optional attributes are ignored.
//!
//! Only the first occurrence of each type is checked.

use ipnet::IpNet;

use super::{
    error::DecodeError,
    nlri::{Family, parse_mp_reach, parse_mp_unreach},
    reader::Reader,
};

// Attribute flags (RFC 4271 §4.3).
const FLAG_OPTIONAL: u8 = 0x80;
const FLAG_TRANSITIVE: u8 = 0x40;
pub(super) const FLAG_EXTENDED_LENGTH: u8 = 0x10;
pub(super) const WELL_KNOWN: u8 = FLAG_TRANSITIVE;
pub(super) const OPTIONAL_TRANSITIVE: u8 = FLAG_OPTIONAL | FLAG_TRANSITIVE;
pub(super) const OPTIONAL_NON_TRANSITIVE: u8 = FLAG_OPTIONAL;

// Attribute type codes.
pub(super) const ATTR_ORIGIN: u8 = 1;
pub(super) const ATTR_AS_PATH: u8 = 2;
pub(super) const ATTR_NEXT_HOP: u8 = 3;
pub(super) const ATTR_MED: u8 = 4;
pub(super) const ATTR_LOCAL_PREF: u8 = 5;
const ATTR_ATOMIC_AGGREGATE: u8 = 6;
const ATTR_AGGREGATOR: u8 = 7;
pub(super) const ATTR_COMMUNITIES: u8 = 8;
const ATTR_ORIGINATOR_ID: u8 = 9;
const ATTR_CLUSTER_LIST: u8 = 10;
pub(super) const ATTR_MP_REACH: u8 = 14;
pub(super) const ATTR_MP_UNREACH: u8 = 15;
pub(super) const ATTR_AS4_PATH: u8 = 17;
const ATTR_AS4_AGGREGATOR: u8 = 18;
pub(super) const ATTR_LARGE_COMMUNITY: u8 = 32;

// AS_PATH segment types (RFC 4271 §4.3, RFC 5065 §3).
pub(super) const AS_SEQUENCE: u8 = 2;
const AS_CONFED_SET: u8 = 4;

/// ORIGIN attribute values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Origin {
    /// 0: learned from an IGP.
    Igp,
    /// 1: learned from EGP.
    Egp,
    /// 2: learned some other way.
    Incomplete,
}

/// Path attributes of routes we announce.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Attributes {
    /// ORIGIN.
    pub origin: Origin,
    /// `AS_SEQUENCE`; empty for iBGP.
    pub as_path: Vec<u32>,
    /// `MULTI_EXIT_DISC`, if any.
    pub med: Option<u32>,
    /// Sent to iBGP peers only.
    pub local_pref: Option<u32>,
    /// RFC 1997 values (`asn << 16 | value`), sorted, deduplicated.
    pub communities: Vec<u32>,
    /// RFC 8092 (global admin, local 1, local 2), sorted, deduplicated.
    pub large_communities: Vec<(u32, u32, u32)>,
}

/// 3/1, Malformed Attribute List: the UPDATE cannot be framed.
pub(super) const fn malformed_list(reason: &'static str) -> DecodeError {
    DecodeError::MalformedAttributeList { reason }
}

/// What the attribute list held.
pub(super) struct AttrScan {
    /// Type codes seen (first occurrences).
    seen: [bool; 256],
    /// Attributes, repeats included.
    pub(super) count: usize,
    /// What `MP_REACH_NLRI` announced.
    pub(super) announced: Vec<IpNet>,
    /// What `MP_UNREACH_NLRI` withdrew.
    pub(super) withdrawn: Vec<IpNet>,
    /// An `MP_UNREACH_NLRI` of this family without prefixes (an End-of-RIB candidate).
    pub(super) empty_unreach: Option<Family>,
    /// The first RFC 7606 treat-as-withdraw error.
    pub(super) treat_as_withdraw: Option<String>,
}

impl AttrScan {
    /// Whether an attribute of `type_code` was there.
    pub(super) fn has(&self, type_code: u8) -> bool {
        self.seen
            .get(usize::from(type_code))
            .copied()
            .unwrap_or(false)
    }

    /// Marks `type_code` seen; true if it was the first time.
    fn first_sight(&mut self, type_code: u8) -> bool {
        self.seen
            .get_mut(usize::from(type_code))
            .is_some_and(|seen| !std::mem::replace(seen, true))
    }
}

/// One path attribute as read.
struct Attr<'a> {
    flags: u8,
    type_code: u8,
    value: &'a [u8],
    /// The whole attribute (flags, type, length, value): NOTIFICATION data.
    raw: &'a [u8],
}

/// Walks the path attributes of an UPDATE; `four_octet_as` says how wide `AS_PATH` ASNs are.
pub(super) fn parse_attributes(list: &[u8], four_octet_as: bool) -> Result<AttrScan, DecodeError> {
    let mut scan = AttrScan {
        seen: [false; 256],
        count: 0,
        announced: Vec::new(),
        withdrawn: Vec::new(),
        empty_unreach: None,
        treat_as_withdraw: None,
    };
    let mut r = Reader::new(list);
    while !r.is_empty() {
        let start = r.rest();
        let (Some(flags), Some(type_code)) = (r.u8(), r.u8()) else {
            return Err(malformed_list("attribute header truncated"));
        };
        let len = if flags & FLAG_EXTENDED_LENGTH == 0 {
            r.u8().map(usize::from)
        } else {
            r.u16().map(usize::from)
        };
        // RFC 7606 §4: an attribute running past the list leaves nothing to trust.
        let Some(value) = len.and_then(|len| r.take(len)) else {
            return Err(malformed_list(
                "attribute length overruns the path attributes",
            ));
        };
        let raw = start
            .get(..start.len().saturating_sub(r.rest().len()))
            .unwrap_or_default();
        scan.count += 1;
        if !scan.first_sight(type_code) {
            // RFC 7606 §3.g: a repeated MP_REACH/MP_UNREACH resets the session; any other
            // repeat is discarded.
            if matches!(type_code, ATTR_MP_REACH | ATTR_MP_UNREACH) {
                return Err(malformed_list(
                    "MP_REACH_NLRI or MP_UNREACH_NLRI appears more than once",
                ));
            }
            continue;
        }
        let attr = Attr {
            flags,
            type_code,
            value,
            raw,
        };
        if let Some(reason) = check_attribute(&attr, four_octet_as, &mut scan)? {
            scan.treat_as_withdraw.get_or_insert(reason);
        }
    }
    Ok(scan)
}

/// RFC 7606 §3.c: Optional or Transitive bits other than the attribute's are a malformation.
fn flags_error(attr: &Attr<'_>, name: &str, expected: u8) -> Option<String> {
    let got = attr.flags & (FLAG_OPTIONAL | FLAG_TRANSITIVE);
    (got != expected).then(|| format!("{name} attribute flags {:#04x}", attr.flags))
}

fn length_error(attr: &Attr<'_>, name: &str, expected: usize) -> Option<String> {
    (attr.value.len() != expected).then(|| format!("{name} attribute length {}", attr.value.len()))
}

/// RFC 7606 §7.8, §7.10, RFC 8092 §6: a non-zero multiple of `unit`.
fn multiple_error(attr: &Attr<'_>, name: &str, unit: usize) -> Option<String> {
    let len = attr.value.len();
    (len == 0 || !len.is_multiple_of(unit)).then(|| format!("{name} attribute length {len}"))
}

/// Checks one (first-seen) attribute. `Ok(Some(reason))` is treat-as-withdraw; `Err` resets the
/// session.
fn check_attribute(
    attr: &Attr<'_>,
    four_octet_as: bool,
    scan: &mut AttrScan,
) -> Result<Option<String>, DecodeError> {
    let asn_len = if four_octet_as { 4 } else { 2 };
    let withdraw = match attr.type_code {
        // RFC 7606 §7.1.
        ATTR_ORIGIN => flags_error(attr, "ORIGIN", WELL_KNOWN).or_else(|| match attr.value {
            [0..=2] => None,
            [value] => Some(format!("ORIGIN value {value}")),
            _ => length_error(attr, "ORIGIN", 1),
        }),
        // RFC 7606 §7.2.
        ATTR_AS_PATH => flags_error(attr, "AS_PATH", WELL_KNOWN).or_else(|| {
            as_path_error(attr.value, asn_len).map(|why| format!("malformed AS_PATH: {why}"))
        }),
        // RFC 7606 §7.3, §7.4, §7.5, §7.9.
        ATTR_NEXT_HOP => {
            flags_error(attr, "NEXT_HOP", WELL_KNOWN).or_else(|| length_error(attr, "NEXT_HOP", 4))
        }
        ATTR_MED => flags_error(attr, "MULTI_EXIT_DISC", OPTIONAL_NON_TRANSITIVE)
            .or_else(|| length_error(attr, "MULTI_EXIT_DISC", 4)),
        ATTR_LOCAL_PREF => flags_error(attr, "LOCAL_PREF", WELL_KNOWN)
            .or_else(|| length_error(attr, "LOCAL_PREF", 4)),
        ATTR_ORIGINATOR_ID => flags_error(attr, "ORIGINATOR_ID", OPTIONAL_NON_TRANSITIVE)
            .or_else(|| length_error(attr, "ORIGINATOR_ID", 4)),
        // RFC 7606 §7.8, §7.10, RFC 8092 §6.
        ATTR_COMMUNITIES => flags_error(attr, "COMMUNITIES", OPTIONAL_TRANSITIVE)
            .or_else(|| multiple_error(attr, "COMMUNITIES", 4)),
        ATTR_CLUSTER_LIST => flags_error(attr, "CLUSTER_LIST", OPTIONAL_NON_TRANSITIVE)
            .or_else(|| multiple_error(attr, "CLUSTER_LIST", 4)),
        ATTR_LARGE_COMMUNITY => flags_error(attr, "LARGE_COMMUNITY", OPTIONAL_TRANSITIVE)
            .or_else(|| multiple_error(attr, "LARGE_COMMUNITY", 12)),
        // RFC 7606 §7.6, §7.7: attribute discard. We use neither, so discarding is ignoring.
        ATTR_ATOMIC_AGGREGATE => {
            if let Some(why) = flags_error(attr, "ATOMIC_AGGREGATE", WELL_KNOWN)
                .or_else(|| length_error(attr, "ATOMIC_AGGREGATE", 0))
            {
                tracing::debug!(reason = %why, "attribute discarded (RFC 7606 §7.6)");
            }
            None
        }
        ATTR_AGGREGATOR => {
            if let Some(why) = flags_error(attr, "AGGREGATOR", OPTIONAL_TRANSITIVE)
                .or_else(|| length_error(attr, "AGGREGATOR", asn_len + 4))
            {
                tracing::debug!(reason = %why, "attribute discarded (RFC 7606 §7.7)");
            }
            None
        }
        // RFC 6793 §6: malformed AS4_* are discarded; we don't use them either way.
        ATTR_AS4_PATH | ATTR_AS4_AGGREGATOR => None,
        ATTR_MP_REACH => {
            parse_mp_reach(attr.value, &mut scan.announced)
                .map_err(|reason| optional_attribute_error(attr, reason))?;
            // The NLRI could be located, so wrong flags can be treat-as-withdraw (§3.c).
            flags_error(attr, "MP_REACH_NLRI", OPTIONAL_NON_TRANSITIVE)
        }
        ATTR_MP_UNREACH => {
            // Withdrawals stay withdrawals whatever the flags say.
            scan.empty_unreach = parse_mp_unreach(attr.value, &mut scan.withdrawn)
                .map_err(|reason| optional_attribute_error(attr, reason))?;
            None
        }
        _ if attr.flags & FLAG_OPTIONAL == 0 => {
            return Err(DecodeError::UnrecognizedWellKnownAttribute {
                type_code: attr.type_code,
                attribute: attr.raw.to_vec(),
            });
        }
        // RFC 4271 §9: unrecognized optional attributes are ignored (we propagate nothing).
        _ => None,
    };
    Ok(withdraw)
}

fn optional_attribute_error(attr: &Attr<'_>, reason: &'static str) -> DecodeError {
    DecodeError::OptionalAttributeError {
        type_code: attr.type_code,
        reason,
        attribute: attr.raw.to_vec(),
    }
}

/// RFC 7606 §7.2: known segment types, non-empty segments that end inside the attribute.
fn as_path_error(value: &[u8], asn_len: usize) -> Option<&'static str> {
    let mut r = Reader::new(value);
    while let Some(segment_type) = r.u8() {
        if !(1..=AS_CONFED_SET).contains(&segment_type) {
            return Some("unknown segment type");
        }
        match r.u8() {
            None => return Some("segment header truncated"),
            Some(0) => return Some("empty segment"),
            Some(count) => {
                if r.take(usize::from(count) * asn_len).is_none() {
                    return Some("segment overruns the attribute");
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use crate::bgp::codec::testing::{
        Expect, announcing, as_path, assert_cases, attr, decode_update, hex, mandatory,
        mp_reach_v6, net, next_hop, only_attributes, origin, raw_update,
    };

    #[test]
    fn unknown_optional_attributes_and_foreign_mp_families_are_ignored() {
        let attrs = [
            mandatory(),
            attr(0xc0, 99, &[1, 2, 3]),
            // MP_REACH for VPNv4 (1/128): skipped without parsing.
            attr(0x80, 14, &hex("0001 80 ff")),
        ]
        .concat();
        let update = decode_update(&raw_update(&[], &attrs, &hex("18 c63364")));
        assert_eq!(update.announced, vec![net("198.51.100.0/24")]);
        assert_eq!(update.treat_as_withdraw, None);
    }

    #[test]
    fn malformed_atomic_aggregate_and_aggregator_are_discarded_not_withdrawn() {
        let attrs = [mandatory(), attr(0x40, 6, &[1]), attr(0xc0, 7, &[1, 2, 3])].concat();
        let update = decode_update(&raw_update(&[], &attrs, &hex("18 c63364")));
        assert_eq!(update.announced, vec![net("198.51.100.0/24")]);
        assert_eq!(update.treat_as_withdraw, None);
    }

    #[test]
    fn a_repeated_attribute_other_than_mp_is_discarded() {
        let attrs = [mandatory(), attr(0x40, 1, &[9])].concat();
        let update = decode_update(&raw_update(&[], &attrs, &hex("18 c63364")));
        assert_eq!(update.treat_as_withdraw, None);
    }

    #[test]
    fn malformed_attribute_lists_reset_the_session() {
        let unknown_well_known = attr(0x40, 99, &[1]);
        let reset = |subcode| Expect::Notify(3, subcode, vec![]);
        assert_cases(vec![
            (
                "attribute length overrun",
                only_attributes(&[hex("40 01 05 00")]),
                reset(1),
            ),
            (
                "attribute header truncated",
                only_attributes(&[hex("40")]),
                reset(1),
            ),
            (
                "duplicate MP_REACH",
                only_attributes(&[mp_reach_v6(), mandatory(), mp_reach_v6()]),
                reset(1),
            ),
            (
                "unknown well-known attribute",
                announcing(&[mandatory(), unknown_well_known.clone()]),
                Expect::Notify(3, 2, unknown_well_known),
            ),
        ]);
    }

    #[test]
    fn malformed_attributes_are_treat_as_withdraw() {
        let with = |extra: Vec<u8>| announcing(&[mandatory(), extra]);
        assert_cases(vec![
            (
                "bad ORIGIN value",
                announcing(&[attr(0x40, 1, &[3]), as_path(), next_hop()]),
                Expect::Withdraw("ORIGIN"),
            ),
            (
                "ORIGIN length 2",
                announcing(&[attr(0x40, 1, &[0, 0]), as_path(), next_hop()]),
                Expect::Withdraw("ORIGIN"),
            ),
            (
                "COMMUNITIES length 3",
                with(attr(0xc0, 8, &[0, 0, 1])),
                Expect::Withdraw("COMMUNITIES"),
            ),
            (
                "LARGE_COMMUNITY length 5",
                with(attr(0xc0, 32, &[0; 5])),
                Expect::Withdraw("LARGE_COMMUNITY"),
            ),
            (
                "AS_PATH bad segment type",
                announcing(&[origin(), attr(0x40, 2, &hex("05 01 0000fde9")), next_hop()]),
                Expect::Withdraw("AS_PATH"),
            ),
            (
                "AS_PATH segment overrun",
                announcing(&[origin(), attr(0x40, 2, &hex("02 02 0000fde9")), next_hop()]),
                Expect::Withdraw("AS_PATH"),
            ),
            (
                "NEXT_HOP length 5",
                announcing(&[origin(), as_path(), attr(0x40, 3, &[192, 0, 2, 1, 0])]),
                Expect::Withdraw("NEXT_HOP"),
            ),
            (
                "MED length 2",
                with(attr(0x80, 4, &[0, 1])),
                Expect::Withdraw("MULTI_EXIT_DISC"),
            ),
            (
                "MED flagged well-known",
                with(attr(0x40, 4, &[0, 0, 0, 1])),
                Expect::Withdraw("MULTI_EXIT_DISC"),
            ),
            (
                "LOCAL_PREF length 3",
                with(attr(0x40, 5, &[0, 0, 1])),
                Expect::Withdraw("LOCAL_PREF"),
            ),
            (
                "CLUSTER_LIST length 6",
                with(attr(0x80, 10, &[0; 6])),
                Expect::Withdraw("CLUSTER_LIST"),
            ),
        ]);
    }
}
