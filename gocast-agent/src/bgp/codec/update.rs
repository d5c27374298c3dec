//! UPDATE (RFC 4271 §4.3) as received, with RFC 7606 error handling: the three fields are
//! framed here (a field overrunning the message resets the session, §4), their prefixes read by
//! `nlri.rs` and the path attributes checked by `attributes.rs`. Here too: the mandatory
//! attributes an announcement lacks (treat-as-withdraw, §3.d), End-of-RIB (RFC 4724 §2), and
//! treat-as-withdraw itself: the announced prefixes move into `withdrawn` and the session stays
//! up.

use ipnet::IpNet;

use super::{
    attributes::{
        ATTR_AS_PATH, ATTR_MP_REACH, ATTR_NEXT_HOP, ATTR_ORIGIN, malformed_list, parse_attributes,
    },
    error::DecodeError,
    nlri::{Family, parse_prefixes},
    reader::Reader,
};

/// A received UPDATE, decoded (we never install routes; this is for logs and counters).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReceivedUpdate {
    /// Reachable prefixes, IPv4 NLRI and `MP_REACH` together.
    pub announced: Vec<IpNet>,
    /// Withdrawn prefixes, IPv4 withdrawn routes and `MP_UNREACH` together.
    pub withdrawn: Vec<IpNet>,
    /// RFC 7606: an attribute was malformed in a way that makes the announced routes
    /// treat-as-withdraw; says which and why. The session stays up.
    pub treat_as_withdraw: Option<String>,
    /// End-of-RIB marker (RFC 4724) for this family.
    pub end_of_rib: Option<Family>,
}

/// An UPDATE body (RFC 4271 §4.3) with RFC 7606 error handling.
pub(super) fn parse_update(
    body: &[u8],
    four_octet_as: bool,
) -> Result<ReceivedUpdate, DecodeError> {
    let mut r = Reader::new(body);
    let withdrawn = r
        .u16()
        .and_then(|len| r.take(usize::from(len)))
        .ok_or(malformed_list(
            "withdrawn routes length overruns the message",
        ))?;
    let attributes = r
        .u16()
        .and_then(|len| r.take(usize::from(len)))
        .ok_or(malformed_list(
            "total path attribute length overruns the message",
        ))?;
    let nlri = r.rest();

    let mut update = ReceivedUpdate::default();
    parse_prefixes(withdrawn, Family::Ipv4Unicast, &mut update.withdrawn)
        .map_err(|reason| DecodeError::InvalidNetworkField { reason })?;
    parse_prefixes(nlri, Family::Ipv4Unicast, &mut update.announced)
        .map_err(|reason| DecodeError::InvalidNetworkField { reason })?;
    let mut scan = parse_attributes(attributes, four_octet_as)?;
    update.announced.append(&mut scan.announced);
    update.withdrawn.append(&mut scan.withdrawn);

    let mut withdraw_reason = scan.treat_as_withdraw.clone();
    // RFC 7606 §3.d: a missing well-known mandatory attribute is treat-as-withdraw. They are
    // mandatory only with reachable NLRI; NEXT_HOP only with IPv4 NLRI outside MP_REACH_NLRI
    // (RFC 4760 §3).
    let mut missing = Vec::new();
    if !nlri.is_empty() || scan.has(ATTR_MP_REACH) {
        missing.extend([(ATTR_ORIGIN, "ORIGIN"), (ATTR_AS_PATH, "AS_PATH")]);
    }
    if !nlri.is_empty() {
        missing.push((ATTR_NEXT_HOP, "NEXT_HOP"));
    }
    if let Some((_, name)) = missing.iter().find(|(code, _)| !scan.has(*code)) {
        withdraw_reason.get_or_insert_with(|| format!("missing well-known attribute {name}"));
    }

    // RFC 4724 §2: End-of-RIB is an empty UPDATE (IPv4) or one holding only an empty
    // MP_UNREACH_NLRI of the family.
    if withdrawn.is_empty() && nlri.is_empty() {
        if attributes.is_empty() {
            update.end_of_rib = Some(Family::Ipv4Unicast);
        } else if scan.count == 1 {
            update.end_of_rib = scan.empty_unreach;
        }
    }
    if let Some(reason) = withdraw_reason {
        let announced = std::mem::take(&mut update.announced);
        update.withdrawn.extend(announced);
        update.treat_as_withdraw = Some(reason);
    }
    Ok(update)
}

#[cfg(test)]
mod tests {
    use crate::bgp::codec::{
        HEADER_LEN,
        header::MSG_UPDATE,
        testing::{
            Expect, announcing, as_path, assert_cases, hex, mandatory, message, mp_reach_v6,
            next_hop, only_attributes, origin, raw_update,
        },
    };

    #[test]
    fn fields_overrunning_the_update_reset_the_session() {
        let mut inconsistent = raw_update(&[], &mandatory(), &[]);
        inconsistent[HEADER_LEN + 3] += 1;
        let reset = |subcode| Expect::Notify(3, subcode, vec![]);
        assert_cases(vec![
            (
                "withdrawn length overrun",
                message(MSG_UPDATE, &hex("0032 0000")),
                reset(1),
            ),
            (
                "total attribute length inconsistent",
                inconsistent,
                reset(1),
            ),
        ]);
    }

    #[test]
    fn missing_mandatory_attributes_are_treat_as_withdraw() {
        assert_cases(vec![
            (
                "missing AS_PATH",
                announcing(&[origin(), next_hop()]),
                Expect::Withdraw("AS_PATH"),
            ),
            (
                "missing NEXT_HOP",
                announcing(&[origin(), as_path()]),
                Expect::Withdraw("NEXT_HOP"),
            ),
            (
                "MP_REACH without ORIGIN",
                only_attributes(&[mp_reach_v6(), as_path()]),
                Expect::Withdraw("ORIGIN"),
            ),
        ]);
    }
}
