//! Helpers for the codec's unit tests: messages from hex or from their parts, our OPEN, decoding
//! to the one expected message, and the runner for tables of malformed messages and what each
//! must give.

use std::net::Ipv4Addr;

use bytes::{Bytes, BytesMut};
use ipnet::IpNet;
use tokio_util::codec::Decoder as _;

use super::{
    Attributes, BgpCodec, DecodeError, Family, HEADER_LEN, Message, Notification, Open, Origin,
    ReceivedUpdate, encode::encode_open_message, header::MSG_UPDATE,
};

/// The bytes `text` spells in hex; whitespace is ignored.
pub(super) fn hex(text: &str) -> Vec<u8> {
    let digits: Vec<u8> = text
        .bytes()
        .filter(u8::is_ascii_hexdigit)
        .map(|d| match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => d - b'A' + 10,
        })
        .collect();
    assert_eq!(digits.len() % 2, 0, "odd hex: {text}");
    digits.chunks(2).map(|p| p[0] << 4 | p[1]).collect()
}

/// A message with a correct header around `body`.
pub(super) fn message(msg_type: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![0xff; 16];
    out.extend_from_slice(
        &u16::try_from(HEADER_LEN + body.len())
            .unwrap()
            .to_be_bytes(),
    );
    out.push(msg_type);
    out.extend_from_slice(body);
    out
}

/// An UPDATE from its three fields.
pub(super) fn raw_update(withdrawn: &[u8], attributes: &[u8], nlri: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&u16::try_from(withdrawn.len()).unwrap().to_be_bytes());
    body.extend_from_slice(withdrawn);
    body.extend_from_slice(&u16::try_from(attributes.len()).unwrap().to_be_bytes());
    body.extend_from_slice(attributes);
    body.extend_from_slice(nlri);
    message(MSG_UPDATE, &body)
}

/// One path attribute, with a 1-byte length.
pub(super) fn attr(flags: u8, type_code: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![flags, type_code, u8::try_from(value.len()).unwrap()];
    out.extend_from_slice(value);
    out
}

/// ORIGIN IGP.
pub(super) fn origin() -> Vec<u8> {
    attr(0x40, 1, &[0])
}

/// `AS_PATH` [65001] (4-byte).
pub(super) fn as_path() -> Vec<u8> {
    attr(0x40, 2, &hex("02 01 0000fde9"))
}

/// `NEXT_HOP` 192.0.2.1.
pub(super) fn next_hop() -> Vec<u8> {
    attr(0x40, 3, &[192, 0, 2, 1])
}

/// ORIGIN IGP, `AS_PATH` [65001] (4-byte), `NEXT_HOP` 192.0.2.1.
pub(super) fn mandatory() -> Vec<u8> {
    [origin(), as_path(), next_hop()].concat()
}

/// `MP_REACH_NLRI` for `2001:db8:1::/48` via `2001:db8::1`.
pub(super) fn mp_reach_v6() -> Vec<u8> {
    attr(
        0x80,
        14,
        &hex("0002 01 10 20010db8000000000000000000000001 00 30 20010db80001"),
    )
}

/// The OPEN we send (RFC 4271 §4.2): version 4, My AS (`AS_TRANS` above 65535, RFC 6793 §4.2.1),
/// and capabilities: multiprotocol per family (RFC 4760 §8), route refresh (RFC 2918) and 4-octet
/// AS (RFC 6793), always. The session sends the FSM's `Open` through the codec; this builds the
/// same bytes for tests.
pub(super) fn encode_open(
    asn: u32,
    hold_time: u16,
    router_id: Ipv4Addr,
    families: &[Family],
) -> Bytes {
    encode_open_message(&Open {
        asn,
        hold_time,
        router_id,
        families: families.to_vec(),
        four_octet_as: true,
        route_refresh: true,
    })
    .expect("our OPEN encodes")
}

/// A codec that reads 4-octet `AS_PATH`s, as between two speakers of RFC 6793.
pub(super) fn codec() -> BgpCodec {
    let mut codec = BgpCodec::new();
    codec.set_four_octet_as(true);
    codec
}

/// Every message in `bytes`, which must hold whole messages only.
pub(super) fn decode_all(codec: &mut BgpCodec, bytes: &[u8]) -> Result<Vec<Message>, DecodeError> {
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Some(message) = codec.decode(&mut buf)? {
        out.push(message);
    }
    assert!(buf.is_empty(), "{} bytes left over", buf.len());
    Ok(out)
}

/// The one message in `bytes`.
pub(super) fn decode_one(bytes: &[u8]) -> Result<Message, DecodeError> {
    let mut messages = decode_all(&mut codec(), bytes)?;
    assert_eq!(messages.len(), 1, "{messages:?}");
    Ok(messages.remove(0))
}

/// The one UPDATE in `bytes`, which must decode.
pub(super) fn decode_update(bytes: &[u8]) -> ReceivedUpdate {
    match decode_one(bytes) {
        Ok(Message::Update(update)) => update,
        other => panic!("not an UPDATE: {other:?}"),
    }
}

/// A prefix from its text.
pub(super) fn net(text: &str) -> IpNet {
    text.parse().unwrap()
}

/// ORIGIN IGP and `AS_PATH` [65001], nothing else.
pub(super) fn attributes() -> Attributes {
    Attributes {
        origin: Origin::Igp,
        as_path: vec![65001],
        med: None,
        local_pref: None,
        communities: Vec::new(),
        large_communities: Vec::new(),
    }
}

/// A NOTIFICATION from its parts.
pub(super) fn notification(code: u8, subcode: u8, data: &[u8]) -> Notification {
    Notification {
        code,
        subcode,
        data: data.to_vec(),
    }
}

/// An UPDATE announcing 198.51.100.0/24 with these attributes.
pub(super) fn announcing(attributes: &[Vec<u8>]) -> Vec<u8> {
    raw_update(&[], &attributes.concat(), &hex("18 c63364"))
}

/// An UPDATE with these attributes and no IPv4 NLRI.
pub(super) fn only_attributes(attributes: &[Vec<u8>]) -> Vec<u8> {
    raw_update(&[], &attributes.concat(), &[])
}

/// What a malformed message must give.
#[derive(Debug)]
pub(super) enum Expect {
    /// This NOTIFICATION (code, subcode, data).
    Notify(u8, u8, Vec<u8>),
    /// This NOTIFICATION code/subcode, whatever the data.
    NotifyCode(u8, u8),
    /// Treat-as-withdraw with a reason naming this; the announced prefix is withdrawn.
    Withdraw(&'static str),
}

/// A malformed message: its name, its bytes, what it must give.
pub(super) type Case = (&'static str, Vec<u8>, Expect);

/// Decodes each case's bytes and checks the outcome.
pub(super) fn assert_cases(cases: Vec<Case>) {
    for (name, bytes, expect) in cases {
        let result = decode_one(&bytes);
        match (&result, &expect) {
            (Err(err), Expect::Notify(code, subcode, data)) => {
                assert_eq!(
                    err.notification(),
                    notification(*code, *subcode, data),
                    "{name}"
                );
            }
            (Err(err), Expect::NotifyCode(code, subcode)) => {
                let n = err.notification();
                assert_eq!((n.code, n.subcode), (*code, *subcode), "{name}");
            }
            (Ok(Message::Update(update)), Expect::Withdraw(what)) => {
                let reason = update.treat_as_withdraw.as_deref().unwrap_or_default();
                assert!(reason.contains(what), "{name}: {reason:?}");
                assert!(update.announced.is_empty(), "{name}");
                assert!(
                    !update.withdrawn.is_empty(),
                    "{name}: announced prefixes withdrawn"
                );
            }
            _ => panic!("{name}: expected {expect:?}, got {result:?}"),
        }
    }
}
