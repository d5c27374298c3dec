//! OPEN (RFC 4271 §4.2) as received, checked per §6.2: version 4, hold time 0 or at least 3, a
//! non-zero BGP Identifier (RFC 6286 §2.2), a non-zero AS (RFC 7607), taken from the 4-octet AS
//! capability when there is one (RFC 6793). Optional parameters come in the RFC 4271 or the
//! RFC 9072 extended encoding, and must be Capabilities (RFC 5492): unknown capabilities are
//! ignored, the ones we use must have their defined length. The OPEN we send is built in
//! `encode.rs`.

use std::net::Ipv4Addr;

use super::{
    BGP_VERSION,
    error::DecodeError,
    nlri::{Family, family_of},
    reader::Reader,
};

/// RFC 6793: the 2-octet AS used in place of a 4-octet one.
pub const AS_TRANS: u16 = 23456;

// OPEN optional parameters and capabilities (RFC 5492, RFC 9072).
const PARAM_CAPABILITIES: u8 = 2;
const PARAM_EXTENDED_LENGTH: u8 = 255;
const CAP_MULTIPROTOCOL: u8 = 1;
const CAP_ROUTE_REFRESH: u8 = 2;
const CAP_FOUR_OCTET_AS: u8 = 65;

/// What an OPEN carries that we use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    /// The speaker's AS: the 4-octet capability's value when present, else the 2-octet field.
    pub asn: u32,
    /// Seconds; 0 or >= 3 (RFC 4271 §4.2).
    pub hold_time: u16,
    /// BGP Identifier (RFC 4271 §4.2, RFC 6286).
    pub router_id: Ipv4Addr,
    /// Multiprotocol capabilities (RFC 4760) announced.
    pub families: Vec<Family>,
    /// 4-octet AS capability present (RFC 6793).
    pub four_octet_as: bool,
    /// Route refresh capability present (RFC 2918).
    pub route_refresh: bool,
}

/// Capabilities of an OPEN that we use.
#[derive(Debug, Default)]
struct Capabilities {
    families: Vec<Family>,
    four_octet_as: Option<u32>,
    route_refresh: bool,
}

/// An OPEN body (RFC 4271 §4.2), checked per §6.2.
pub(super) fn parse_open(body: &[u8]) -> Result<Open, DecodeError> {
    let mut r = Reader::new(body);
    let (Some(version), Some(my_as), Some(hold_time), Some(id), Some(opt_len)) =
        (r.u8(), r.u16(), r.u16(), r.array::<4>(), r.u8())
    else {
        return Err(DecodeError::MalformedOpen {
            reason: "fixed fields truncated",
        });
    };
    // Version first: another version may lay the rest out differently.
    if version != BGP_VERSION {
        return Err(DecodeError::UnsupportedVersion { version });
    }
    if matches!(hold_time, 1 | 2) {
        return Err(DecodeError::UnacceptableHoldTime { hold_time });
    }
    let router_id = Ipv4Addr::from(id);
    // RFC 6286 §2.2: any non-zero value.
    if router_id.is_unspecified() {
        return Err(DecodeError::BadBgpIdentifier { id: router_id });
    }
    let caps = parse_optional_parameters(opt_len, r)?;
    // RFC 6793 §3: the capability carries the real AS; My AS is AS_TRANS when it does not fit.
    let asn = caps.four_octet_as.unwrap_or(u32::from(my_as));
    // RFC 7607 §2: AS 0 in either place is a Bad Peer AS.
    if my_as == 0 || asn == 0 {
        return Err(DecodeError::BadPeerAs { asn: 0 });
    }
    Ok(Open {
        asn,
        hold_time,
        router_id,
        families: caps.families,
        four_octet_as: caps.four_octet_as.is_some(),
        route_refresh: caps.route_refresh,
    })
}

const fn malformed_open(reason: &'static str) -> DecodeError {
    DecodeError::MalformedOpen { reason }
}

/// Optional parameters, in the RFC 4271 §4.2 or the RFC 9072 extended encoding; `r` is just
/// after the Optional Parameters Length.
fn parse_optional_parameters(opt_len: u8, mut r: Reader<'_>) -> Result<Capabilities, DecodeError> {
    // RFC 9072 §2: a length of 255 followed by a parameter type of 255 announces 2-byte lengths.
    let extended = opt_len == 255 && r.peek() == Some(PARAM_EXTENDED_LENGTH);
    let params = if extended {
        r.u8();
        r.u16().and_then(|len| r.take(usize::from(len)))
    } else {
        r.take(usize::from(opt_len))
    }
    .ok_or(malformed_open("optional parameters overrun the message"))?;
    if !r.is_empty() {
        return Err(malformed_open("bytes after the optional parameters"));
    }
    let mut caps = Capabilities::default();
    let mut p = Reader::new(params);
    while !p.is_empty() {
        let param_type = p.u8();
        let len = if extended {
            p.u16().map(usize::from)
        } else {
            p.u8().map(usize::from)
        };
        let (Some(param_type), Some(value)) = (param_type, len.and_then(|len| p.take(len))) else {
            return Err(malformed_open("optional parameter overruns the parameters"));
        };
        if param_type != PARAM_CAPABILITIES {
            return Err(DecodeError::UnsupportedOptionalParameter { param_type });
        }
        parse_capabilities(value, &mut caps)?;
    }
    Ok(caps)
}

/// The capabilities in one Capabilities parameter (RFC 5492 §4). Unknown ones are ignored; the
/// ones we use must have their defined length.
fn parse_capabilities(value: &[u8], caps: &mut Capabilities) -> Result<(), DecodeError> {
    let mut r = Reader::new(value);
    while !r.is_empty() {
        let (Some(code), Some(data)) = (r.u8(), r.u8().and_then(|len| r.take(usize::from(len))))
        else {
            return Err(malformed_open("capability overruns its parameter"));
        };
        match code {
            CAP_MULTIPROTOCOL => {
                // RFC 4760 §8: AFI (2), reserved (1), SAFI (1).
                let [afi_hi, afi_lo, _, safi] = <[u8; 4]>::try_from(data)
                    .map_err(|_| malformed_open("multiprotocol capability length"))?;
                if let Some(family) = family_of(u16::from_be_bytes([afi_hi, afi_lo]), safi)
                    && !caps.families.contains(&family)
                {
                    caps.families.push(family);
                }
            }
            CAP_ROUTE_REFRESH => caps.route_refresh = true,
            CAP_FOUR_OCTET_AS => {
                let asn = <[u8; 4]>::try_from(data)
                    .map_err(|_| malformed_open("4-octet AS capability length"))?;
                caps.four_octet_as = Some(u32::from_be_bytes(asn));
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bgp::codec::{
        Message,
        header::MSG_OPEN,
        testing::{Expect, assert_cases, decode_one, hex, message},
    };

    #[test]
    fn an_open_with_all_capabilities_in_one_parameter_as_bird_sends_it_decodes() {
        // BIRD 2 puts every capability in a single Capabilities parameter; this one also has
        // enhanced route refresh (70) and graceful restart (64), which we ignore.
        let bytes = hex("ffffffffffffffffffffffffffffffff 0039 01
             04 fdea 00f0 c6336402 1c
             02 1a
                01 04 0001 00 01
                01 04 0002 00 01
                02 00
                46 00
                40 02 0078
                41 04 0000fdea");
        let expected = Open {
            asn: 65002,
            hold_time: 240,
            router_id: Ipv4Addr::new(198, 51, 100, 2),
            families: vec![Family::Ipv4Unicast, Family::Ipv6Unicast],
            four_octet_as: true,
            route_refresh: true,
        };
        assert_eq!(decode_one(&bytes).unwrap(), Message::Open(expected));
    }

    #[test]
    fn an_open_in_the_rfc_9072_extended_parameter_encoding_decodes() {
        let bytes = message(
            MSG_OPEN,
            &hex("04 fdea 00b4 c6336402 ff ff 0009 02 0006 41 04 0000fdea"),
        );
        match decode_one(&bytes).unwrap() {
            Message::Open(open) => assert!(open.four_octet_as && open.asn == 65002),
            other => panic!("{other:?}"),
        }
    }

    fn open_body(version: u8, hold_time: u16, id: [u8; 4], params: &[u8]) -> Vec<u8> {
        let mut body = vec![version, 0xfd, 0xe9];
        body.extend_from_slice(&hold_time.to_be_bytes());
        body.extend_from_slice(&id);
        body.push(u8::try_from(params.len()).unwrap());
        body.extend_from_slice(params);
        body
    }

    #[test]
    fn malformed_opens_give_their_exact_notification() {
        let id = [192, 0, 2, 1];
        assert_cases(vec![
            (
                "bad version",
                message(MSG_OPEN, &open_body(3, 90, id, &[])),
                Expect::Notify(2, 1, vec![0, 4]),
            ),
            (
                "hold time 1",
                message(MSG_OPEN, &open_body(4, 1, id, &[])),
                Expect::Notify(2, 6, vec![]),
            ),
            (
                "hold time 2",
                message(MSG_OPEN, &open_body(4, 2, id, &[])),
                Expect::Notify(2, 6, vec![]),
            ),
            (
                "identifier 0",
                message(MSG_OPEN, &open_body(4, 90, [0; 4], &[])),
                Expect::Notify(2, 3, vec![]),
            ),
            (
                "authentication parameter",
                message(MSG_OPEN, &open_body(4, 90, id, &hex("01 02 0000"))),
                Expect::Notify(2, 4, vec![]),
            ),
            (
                "parameters overrun the message",
                message(
                    MSG_OPEN,
                    &[&open_body(4, 90, id, &[])[..9], &[8, 2, 2, 2, 0]].concat(),
                ),
                Expect::Notify(2, 0, vec![]),
            ),
            (
                "capability overruns its parameter",
                message(MSG_OPEN, &open_body(4, 90, id, &hex("02 04 41 04 0000"))),
                Expect::Notify(2, 0, vec![]),
            ),
            (
                "multiprotocol capability of 3 bytes",
                message(MSG_OPEN, &open_body(4, 90, id, &hex("02 05 01 03 000100"))),
                Expect::Notify(2, 0, vec![]),
            ),
            (
                "AS 0",
                message(
                    MSG_OPEN,
                    &open_body(4, 90, id, &hex("02 06 41 04 00000000")),
                ),
                Expect::Notify(2, 2, vec![]),
            ),
        ]);
    }
}
