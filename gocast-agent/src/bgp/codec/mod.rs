//! BGP messages on the wire: framing, decoding and encoding (RFC 4271 §4, RFC 2918, RFC 4724,
//! RFC 4760, RFC 6793, RFC 7606, RFC 8092, RFC 8203/9003).
//!
//! # Contract
//!
//! - [`BgpCodec`] is a `tokio_util` codec. Its decoder is total over arbitrary bytes: any input
//!   gives a [`Message`], `Ok(None)` (wait for more bytes), or a [`DecodeError`] whose
//!   [`DecodeError::notification`] is the NOTIFICATION to send before closing (RFC 4271 §6). It
//!   never panics: peer bytes are only read through a checked cursor (no indexing, no slicing, no
//!   unwrap), and the header is checked before the body is waited for, so a bad length cannot
//!   make us buffer more than 4096 bytes per message.
//! - Decoding is ours end to end. zettabgp 0.6 panics on some malformed input (see
//!   `docs/design.md`, "BGP behaviour"), so it never sees peer bytes; it only encodes the OPEN we
//!   send.
//! - UPDATE errors follow RFC 7606: what makes the message unparseable (attribute list or NLRI
//!   framing, a duplicate `MP_REACH_NLRI`/`MP_UNREACH_NLRI`, an unknown well-known attribute) is a
//!   [`DecodeError`] (session reset); a malformed ORIGIN, `AS_PATH`, `NEXT_HOP`, MED,
//!   `LOCAL_PREF`, COMMUNITIES, `LARGE_COMMUNITY`, `ORIGINATOR_ID` or `CLUSTER_LIST`, wrong flags
//!   on a recognised attribute, or a missing mandatory attribute give an `Ok` [`ReceivedUpdate`]
//!   with `treat_as_withdraw` set and the announced prefixes moved into `withdrawn`; a malformed
//!   `ATOMIC_AGGREGATE` or AGGREGATOR is discarded (RFC 7606 §7.6, §7.7); unknown optional
//!   attributes are ignored; `MP_REACH_NLRI`/`MP_UNREACH_NLRI` of families other than IPv4/IPv6
//!   unicast are skipped.
//! - What we send: OPEN, KEEPALIVE, NOTIFICATION and ROUTE-REFRESH through
//!   `Encoder<Message>` (or the `encode_*` functions); UPDATEs only as bytes built by
//!   [`encode_announce`], [`encode_withdraw`] and [`encode_end_of_rib`], sent through
//!   `Encoder<Bytes>`, so one encoding serves every peer with the same attributes.
//!   `Encoder<Message>` refuses [`Message::Update`] (it describes received routes, not ours).
//! - Attributes we encode: `MP_REACH_NLRI`/`MP_UNREACH_NLRI` first (RFC 7606 §5.1), the others in
//!   ascending type code (RFC 4271 §5); the extended length flag only when a value exceeds 255
//!   bytes; every UPDATE at most 4096 bytes, packed with as many prefixes as fit.
//! - 4-octet AS numbers in `AS_PATH` (RFC 6793): the codec reads them once both OPENs carried the
//!   capability. It learns the peer's from the OPEN it decodes and ours from the OPEN it encodes
//!   (assumed until then: ours always carries it); [`BgpCodec::set_four_octet_as`] overrides.
//!
//! # Layout
//!
//! Decoding treats every peer byte as hostile; encoding builds what we send from our own values.
//!
//! - `header.rs`: the 19-byte header, message types, the length each type must have.
//! - `framing.rs`: [`BgpCodec`], the tokio-util `Decoder`/`Encoder`: frames, hands each to its
//!   message's decoder, tracks 4-octet AS; decodes ROUTE-REFRESH.
//! - `reader.rs`: the checked cursor every peer byte is read through.
//! - `open.rs`: [`Open`] and OPEN decoding: optional parameters, capabilities.
//! - `update.rs`: [`ReceivedUpdate`] and UPDATE decoding: its three fields, missing mandatory
//!   attributes, End-of-RIB, treat-as-withdraw.
//! - `attributes.rs`: path attribute codes and flags, the [`Attributes`] we announce, and the
//!   RFC 7606 checks on received ones.
//! - `nlri.rs`: [`Family`] (AFI/SAFI) and received prefixes: IPv4 fields, `MP_REACH_NLRI`,
//!   `MP_UNREACH_NLRI`.
//! - `notification.rs`: [`Notification`], its codes and names, the Shutdown Communication.
//! - `error.rs`: [`DecodeError`], each variant one NOTIFICATION.
//! - `encode.rs`: everything we send.

mod attributes;
mod encode;
mod error;
mod framing;
mod header;
mod nlri;
mod notification;
mod open;
mod reader;
#[cfg(test)]
mod testing;
mod update;

pub use self::{
    attributes::{Attributes, Origin},
    encode::{
        encode_announce, encode_end_of_rib, encode_keepalive, encode_notification,
        encode_route_refresh, encode_withdraw,
    },
    error::DecodeError,
    framing::BgpCodec,
    header::{HEADER_LEN, MAX_MESSAGE_LEN},
    nlri::Family,
    notification::{Notification, cease_subcode, error_code, shutdown_notification},
    open::{AS_TRANS, Open},
    update::ReceivedUpdate,
};

/// The BGP version we speak (RFC 4271 §4.2): what OPEN decoding accepts, and what the
/// NOTIFICATION refusing another version says.
const BGP_VERSION: u8 = 4;

/// A message we send or receive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// RFC 4271 §4.2.
    Open(Open),
    /// Outgoing UPDATEs are built by [`encode_announce`] etc. as bytes; received ones decode here.
    Update(ReceivedUpdate),
    /// RFC 4271 §4.5.
    Notification(Notification),
    /// RFC 4271 §4.4.
    Keepalive,
    /// A request to send our routes of this family again (RFC 2918).
    RouteRefresh(Family),
}

/// The contract above, on arbitrary bytes: every input decodes, waits or fails with a
/// NOTIFICATION, never panics, and decodes the same however it is split.
#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use bytes::BytesMut;
    use proptest::prelude::*;
    use tokio_util::codec::Decoder as _;

    use super::*;
    use crate::bgp::codec::{
        header::MSG_OPEN,
        testing::{attr, encode_open, hex, mandatory, message, mp_reach_v6, net, raw_update},
    };

    /// Valid messages of every kind, to mutate.
    fn corpus() -> Vec<Vec<u8>> {
        let all = Attributes {
            origin: Origin::Egp,
            as_path: vec![65001, 4_200_000_001],
            med: Some(5),
            local_pref: Some(100),
            communities: vec![1, 2],
            large_communities: vec![(1, 2, 3)],
        };
        let mut out = vec![
            encode_open(
                65001,
                90,
                Ipv4Addr::new(192, 0, 2, 1),
                &[Family::Ipv4Unicast, Family::Ipv6Unicast],
            ),
            encode_keepalive(),
            encode_notification(&shutdown_notification("bye")),
            encode_route_refresh(Family::Ipv6Unicast),
            encode_end_of_rib(Family::Ipv4Unicast),
            encode_end_of_rib(Family::Ipv6Unicast),
        ];
        out.extend(encode_announce(
            &all,
            "192.0.2.1".parse().unwrap(),
            &[net("192.0.2.10/32"), net("10.0.0.0/8")],
            true,
        ));
        out.extend(encode_announce(
            &all,
            "192.0.2.1".parse().unwrap(),
            &[net("192.0.2.10/32")],
            false,
        ));
        out.extend(encode_announce(
            &all,
            "2001:db8::1".parse().unwrap(),
            &[net("2001:db8::/32"), net("2001:db8::10/128")],
            true,
        ));
        out.extend(encode_withdraw(&[
            net("192.0.2.10/32"),
            net("2001:db8::/32"),
        ]));
        let mut out: Vec<Vec<u8>> = out.into_iter().map(|b| b.to_vec()).collect();
        out.push(raw_update(
            &[],
            &[
                mp_reach_v6(),
                mandatory(),
                attr(0x80, 9, &[1, 2, 3, 4]),
                attr(0x80, 10, &[1, 2, 3, 4]),
                attr(0xc0, 7, &hex("0000fde9 c0000201")),
            ]
            .concat(),
            &[],
        ));
        out.push(message(
            MSG_OPEN,
            &hex("04 fdea 00b4 c6336402 ff ff 0009 02 0006 41 04 0000fdea"),
        ));
        out
    }

    /// Decodes `bytes` to the end and checks the decoder's promises: no panic, and every error
    /// is a peer error with a NOTIFICATION that fits a message.
    fn outcomes(bytes: &[u8], chunk: usize) -> Vec<Result<Message, Notification>> {
        let mut codec = BgpCodec::new();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in bytes.chunks(chunk.max(1)) {
            buf.extend_from_slice(piece);
            loop {
                match codec.decode(&mut buf) {
                    Ok(Some(message)) => {
                        if let Message::Update(update) = &message {
                            assert!(
                                update.treat_as_withdraw.is_none() || update.announced.is_empty()
                            );
                        }
                        out.push(Ok(message));
                    }
                    Ok(None) => break,
                    Err(err) => {
                        assert!(!err.is_transport(), "{err}");
                        let n = err.notification();
                        assert!((1..=7).contains(&n.code), "{n:?}");
                        assert!(encode_notification(&n).len() <= MAX_MESSAGE_LEN);
                        out.push(Err(n));
                        return out;
                    }
                }
            }
        }
        out
    }

    fn assert_total(bytes: &[u8], chunk: usize) {
        let whole = outcomes(bytes, bytes.len());
        let pieces = outcomes(bytes, chunk);
        assert_eq!(whole, pieces, "framing depends on how bytes arrive");
    }

    #[test]
    fn every_single_byte_change_of_a_valid_message_decodes_or_fails_cleanly() {
        // What the sweep reached, so a decoder that refuses everything cannot pass.
        let mut seen = std::collections::BTreeSet::new();
        for valid in corpus() {
            for position in 0..valid.len() {
                let original = valid[position];
                let values = [
                    0,
                    1,
                    2,
                    0x7f,
                    0x80,
                    0xfe,
                    0xff,
                    original ^ 0x10,
                    original.wrapping_add(1),
                    original.wrapping_sub(1),
                ];
                for value in values {
                    let mut mutated = valid.clone();
                    mutated[position] = value;
                    for outcome in outcomes(&mutated, mutated.len()) {
                        seen.insert(match outcome {
                            Ok(Message::Update(u)) if u.treat_as_withdraw.is_some() => (0, 1),
                            Ok(_) => (0, 0),
                            Err(n) => (n.code, n.subcode),
                        });
                    }
                }
            }
            for cut in 0..valid.len() {
                assert!(outcomes(&valid[..cut], cut).is_empty(), "a prefix waits");
            }
        }
        // AS 0, identifier 0 and a long ROUTE-REFRESH need more than one byte changed; the
        // table above has them. (0, 1) is treat-as-withdraw.
        let reached = [
            (0, 0),
            (0, 1),
            (1, 1),
            (1, 2),
            (1, 3),
            (2, 0),
            (2, 1),
            (2, 4),
            (2, 6),
        ];
        for expected in reached.into_iter().chain([(3, 1), (3, 2), (3, 9), (3, 10)]) {
            assert!(
                seen.contains(&expected),
                "sweep never gave {expected:?}: {seen:?}"
            );
        }
    }

    /// One edit of a valid message.
    #[derive(Debug, Clone)]
    enum Mutation {
        FlipBit(usize, u8),
        SetByte(usize, u8),
        /// Adds to the 1- or 2-byte big-endian field at the position: lengths live there.
        Tweak(usize, i16, bool),
        Truncate(usize),
        Insert(usize, Vec<u8>),
        Remove(usize, usize),
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            (any::<usize>(), 0..8_u8).prop_map(|(p, b)| Mutation::FlipBit(p, b)),
            (any::<usize>(), any::<u8>()).prop_map(|(p, v)| Mutation::SetByte(p, v)),
            (any::<usize>(), -20..20_i16, any::<bool>())
                .prop_map(|(p, d, w)| Mutation::Tweak(p, d, w)),
            any::<usize>().prop_map(Mutation::Truncate),
            (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..8))
                .prop_map(|(p, v)| Mutation::Insert(p, v)),
            (any::<usize>(), 1..8_usize).prop_map(|(p, n)| Mutation::Remove(p, n)),
        ]
    }

    fn apply(bytes: &mut Vec<u8>, mutation: &Mutation) {
        let len = bytes.len().max(1);
        match *mutation {
            Mutation::FlipBit(p, bit) => {
                if let Some(b) = bytes.get_mut(p % len) {
                    *b ^= 1 << bit;
                }
            }
            Mutation::SetByte(p, value) => {
                if let Some(b) = bytes.get_mut(p % len) {
                    *b = value;
                }
            }
            Mutation::Tweak(p, delta, wide) => {
                let p = p % len;
                if wide && p + 1 < bytes.len() {
                    let field =
                        u16::from_be_bytes([bytes[p], bytes[p + 1]]).wrapping_add_signed(delta);
                    bytes[p..p + 2].copy_from_slice(&field.to_be_bytes());
                } else if let Some(b) = bytes.get_mut(p) {
                    *b = b.wrapping_add_signed(i8::try_from(delta).unwrap_or(1));
                }
            }
            Mutation::Truncate(p) => bytes.truncate(p % len),
            Mutation::Insert(p, ref extra) => {
                let p = p % len;
                bytes.splice(p..p, extra.iter().copied());
            }
            Mutation::Remove(p, n) => {
                let p = p % len;
                bytes.drain(p..(p + n).min(bytes.len()));
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 3000,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn random_bytes_never_panic_the_decoder(
            bytes in proptest::collection::vec(any::<u8>(), 0..300),
            chunk in 1..40_usize,
        ) {
            assert_total(&bytes, chunk);
        }

        #[test]
        fn random_bodies_behind_a_valid_marker_never_panic_the_decoder(
            msg_type in 0..8_u8,
            length in 0..4200_u16,
            body in proptest::collection::vec(any::<u8>(), 0..400),
            chunk in 1..40_usize,
        ) {
            let mut bytes = vec![0xff; 16];
            bytes.extend_from_slice(&length.to_be_bytes());
            bytes.push(msg_type);
            bytes.extend_from_slice(&body);
            assert_total(&bytes, chunk);
        }

        #[test]
        fn mutated_valid_messages_never_panic_the_decoder(
            index in any::<proptest::sample::Index>(),
            mutations in proptest::collection::vec(mutation(), 1..5),
            chunk in 1..64_usize,
        ) {
            let corpus = corpus();
            let mut bytes = corpus[index.index(corpus.len())].clone();
            for mutation in &mutations {
                apply(&mut bytes, mutation);
            }
            assert_total(&bytes, chunk);
        }
    }
}
