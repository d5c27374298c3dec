//! [`BgpCodec`], the tokio-util `Decoder`/`Encoder` on a BGP byte stream. Decoding is
//! check-then-parse: the header is checked (`header.rs`) before the body is waited for, so a bad
//! length fails at once and no more than 4096 bytes are buffered per message; each complete
//! frame goes to its message's decoder. Too few bytes is `Ok(None)`; a stream ending inside a
//! message is a transport error. The codec also knows whether received `AS_PATH`s carry 4-octet
//! ASNs (RFC 6793). ROUTE-REFRESH (RFC 2918 §3) is decoded here: its body is four fixed octets.

use std::io;

use bytes::{Buf, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use super::{
    Message,
    encode::{encode_keepalive, encode_notification, encode_open_message, encode_route_refresh},
    error::DecodeError,
    header::{
        HEADER_LEN, MSG_KEEPALIVE, MSG_NOTIFICATION, MSG_OPEN, MSG_ROUTE_REFRESH, MSG_UPDATE,
        ROUTE_REFRESH_LEN, check_header,
    },
    nlri::family_of,
    notification::parse_notification,
    open::parse_open,
    reader::Reader,
    update::parse_update,
};

/// Frames BGP messages on a byte stream: decodes [`Message`]s, encodes [`Message`]s (not
/// UPDATEs) and pre-encoded [`Bytes`] (UPDATEs from
/// [`encode_announce`](super::encode_announce) etc.).
#[derive(Debug, Clone)]
pub struct BgpCodec {
    /// Our OPEN carried the 4-octet AS capability; assumed until we send one (ours always do).
    local_four_octet_as: bool,
    /// The peer's OPEN carried it.
    peer_four_octet_as: bool,
    /// Set by [`BgpCodec::set_four_octet_as`]; wins over what the OPENs said.
    four_octet_as_override: Option<bool>,
}

impl Default for BgpCodec {
    fn default() -> Self {
        Self::new()
    }
}

impl BgpCodec {
    /// A codec for a new connection: 2-octet `AS_PATH`s until the peer's OPEN says otherwise.
    pub fn new() -> Self {
        Self {
            local_four_octet_as: true,
            peer_four_octet_as: false,
            four_octet_as_override: None,
        }
    }

    /// Whether received `AS_PATH`s carry 4-octet AS numbers (RFC 6793 §4.1: both OPENs had the
    /// capability).
    pub fn four_octet_as(&self) -> bool {
        self.four_octet_as_override
            .unwrap_or(self.local_four_octet_as && self.peer_four_octet_as)
    }

    /// Fixes the `AS_PATH` encoding of received UPDATEs, whatever the OPENs said.
    pub fn set_four_octet_as(&mut self, four_octet_as: bool) {
        self.four_octet_as_override = Some(four_octet_as);
    }

    /// The message in one complete frame whose header passed [`check_header`]; `None` for a
    /// message to skip (a ROUTE-REFRESH we must ignore).
    fn parse_frame(&mut self, msg_type: u8, frame: &[u8]) -> Result<Option<Message>, DecodeError> {
        let body = frame.get(HEADER_LEN..).unwrap_or_default();
        match msg_type {
            MSG_OPEN => {
                let open = parse_open(body)?;
                self.peer_four_octet_as = open.four_octet_as;
                Ok(Some(Message::Open(open)))
            }
            MSG_UPDATE => {
                parse_update(body, self.four_octet_as()).map(|u| Some(Message::Update(u)))
            }
            MSG_NOTIFICATION => Ok(Some(Message::Notification(parse_notification(body)))),
            MSG_KEEPALIVE => Ok(Some(Message::Keepalive)),
            MSG_ROUTE_REFRESH => parse_route_refresh(frame),
            _ => Err(DecodeError::BadMessageType { msg_type }),
        }
    }
}

impl Decoder for BgpCodec {
    type Item = Message;
    type Error = DecodeError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, DecodeError> {
        // Loops only to skip messages that must be ignored (RFC 2918 §4).
        loop {
            let Some(header) = src
                .get(..HEADER_LEN)
                .and_then(|h| <[u8; HEADER_LEN]>::try_from(h).ok())
            else {
                src.reserve(HEADER_LEN.saturating_sub(src.len()));
                return Ok(None);
            };
            // Checked before waiting for the body: a bogus length fails now instead of
            // stalling until the hold timer fires.
            let (msg_type, length) = check_header(header)?;
            let Some(frame) = src.get(..length) else {
                src.reserve(length.saturating_sub(src.len()));
                return Ok(None);
            };
            let parsed = self.parse_frame(msg_type, frame);
            // `get(..length)` succeeded, so `length` bytes are there.
            src.advance(length);
            if let Some(message) = parsed? {
                return Ok(Some(message));
            }
        }
    }
}

impl Encoder<Message> for BgpCodec {
    type Error = io::Error;

    /// OPEN, NOTIFICATION, KEEPALIVE and ROUTE-REFRESH. An UPDATE is refused with
    /// `InvalidInput`: ours are sent as bytes from [`encode_announce`](super::encode_announce)
    /// and friends.
    fn encode(&mut self, item: Message, dst: &mut BytesMut) -> Result<(), io::Error> {
        let bytes = match item {
            Message::Open(open) => {
                self.local_four_octet_as = open.four_octet_as;
                encode_open_message(&open)?
            }
            Message::Update(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "UPDATEs are sent as bytes from encode_announce/encode_withdraw",
                ));
            }
            Message::Notification(notification) => encode_notification(&notification),
            Message::Keepalive => encode_keepalive(),
            Message::RouteRefresh(family) => encode_route_refresh(family),
        };
        dst.extend_from_slice(&bytes);
        Ok(())
    }
}

impl Encoder<Bytes> for BgpCodec {
    type Error = io::Error;

    /// A message encoded by the codec's `encode_*` functions, sent as is.
    fn encode(&mut self, item: Bytes, dst: &mut BytesMut) -> Result<(), io::Error> {
        dst.extend_from_slice(&item);
        Ok(())
    }
}

/// A ROUTE-REFRESH (RFC 2918 §3); `None` for one to ignore: a family we don't speak (RFC 2918
/// §4) or an RFC 7313 subtype other than a plain request.
fn parse_route_refresh(frame: &[u8]) -> Result<Option<Message>, DecodeError> {
    if frame.len() != ROUTE_REFRESH_LEN {
        return Err(DecodeError::RouteRefreshInvalidLength {
            message: frame.to_vec(),
        });
    }
    let mut r = Reader::new(frame.get(HEADER_LEN..).unwrap_or_default());
    let (Some(afi), Some(subtype), Some(safi)) = (r.u16(), r.u8(), r.u8()) else {
        return Err(DecodeError::RouteRefreshInvalidLength {
            message: frame.to_vec(),
        });
    };
    Ok(family_of(afi, safi)
        .filter(|_| subtype == 0)
        .map(Message::RouteRefresh))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use bytes::BufMut as _;

    use super::*;
    use crate::bgp::codec::{
        Family, MAX_MESSAGE_LEN, Open, ReceivedUpdate, encode_announce, encode_end_of_rib,
        testing::{
            attributes, codec, decode_all, decode_one, encode_open, hex, message, net, notification,
        },
    };

    #[test]
    fn an_open_without_optional_capabilities_round_trips_through_the_encoder() {
        let open = Open {
            asn: 64512,
            hold_time: 3,
            router_id: Ipv4Addr::new(198, 51, 100, 7),
            families: vec![Family::Ipv6Unicast],
            four_octet_as: false,
            route_refresh: false,
        };
        let mut buf = BytesMut::new();
        codec()
            .encode(Message::Open(open.clone()), &mut buf)
            .unwrap();
        assert_eq!(decode_one(&buf).unwrap(), Message::Open(open));
    }

    #[test]
    fn the_codec_reads_4_octet_as_paths_once_the_peer_open_has_the_capability() {
        let mut codec = BgpCodec::new();
        assert!(!codec.four_octet_as());
        let open = encode_open(65002, 90, Ipv4Addr::new(192, 0, 2, 2), &[]);
        decode_all(&mut codec, &open).unwrap();
        assert!(codec.four_octet_as());
        let two_octet = encode_open(65002, 90, Ipv4Addr::new(192, 0, 2, 2), &[]);
        let mut no_cap = two_octet.to_vec();
        // Drop the last parameter (the 4-octet AS capability) and fix the lengths.
        no_cap.truncate(no_cap.len() - 8);
        no_cap[28] -= 8;
        no_cap[17] -= 8;
        let mut codec = BgpCodec::new();
        decode_all(&mut codec, &no_cap).unwrap();
        assert!(!codec.four_octet_as());
    }

    #[test]
    fn a_route_refresh_for_a_family_we_dont_speak_is_skipped() {
        let bytes = [
            message(MSG_ROUTE_REFRESH, &hex("0001 00 80")),
            encode_keepalive().to_vec(),
        ]
        .concat();
        assert_eq!(
            decode_all(&mut codec(), &bytes).unwrap(),
            vec![Message::Keepalive]
        );
    }

    #[test]
    fn a_route_refresh_of_24_bytes_gives_7_1_carrying_the_message() {
        let bytes = message(MSG_ROUTE_REFRESH, &hex("0001 00 01 00"));
        let err = decode_one(&bytes).unwrap_err();
        assert_eq!(err.notification(), notification(7, 1, &bytes));
    }

    #[test]
    fn encoder_sends_messages_and_preencoded_updates_on_one_stream() {
        let mut codec = codec();
        let mut buf = BytesMut::new();
        codec.encode(Message::Keepalive, &mut buf).unwrap();
        codec
            .encode(encode_end_of_rib(Family::Ipv6Unicast), &mut buf)
            .unwrap();
        codec
            .encode(Message::RouteRefresh(Family::Ipv4Unicast), &mut buf)
            .unwrap();
        let err = codec
            .encode(Message::Update(ReceivedUpdate::default()), &mut buf)
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let messages = decode_all(&mut codec, &buf).unwrap();
        assert_eq!(messages.len(), 3);
        assert_eq!(messages[2], Message::RouteRefresh(Family::Ipv4Unicast));
    }

    #[tokio::test]
    async fn a_framed_socket_sends_messages_and_bytes_and_yields_messages() {
        use futures::{SinkExt as _, StreamExt as _};
        use tokio_util::codec::Framed;

        let (ours, theirs) = tokio::io::duplex(MAX_MESSAGE_LEN);
        let mut ours = Framed::new(ours, BgpCodec::new());
        let mut theirs = Framed::new(theirs, BgpCodec::new());
        ours.send(Message::Keepalive).await.unwrap();
        ours.send(encode_end_of_rib(Family::Ipv4Unicast))
            .await
            .unwrap();
        assert_eq!(theirs.next().await.unwrap().unwrap(), Message::Keepalive);
        match theirs.next().await.unwrap().unwrap() {
            Message::Update(update) => assert_eq!(update.end_of_rib, Some(Family::Ipv4Unicast)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn messages_arriving_one_byte_at_a_time_decode_the_same() {
        let stream = [
            encode_open(
                65001,
                90,
                Ipv4Addr::new(192, 0, 2, 1),
                &[Family::Ipv4Unicast],
            ),
            encode_keepalive(),
            encode_announce(
                &attributes(),
                "192.0.2.1".parse().unwrap(),
                &[net("192.0.2.10/32")],
                true,
            )
            .remove(0),
            encode_end_of_rib(Family::Ipv4Unicast),
        ]
        .concat();
        let whole = decode_all(&mut codec(), &stream).unwrap();
        let mut codec = codec();
        let mut buf = BytesMut::new();
        let mut trickled = Vec::new();
        for &byte in &stream {
            buf.put_u8(byte);
            while let Some(message) = codec.decode(&mut buf).unwrap() {
                trickled.push(message);
            }
        }
        assert_eq!(whole.len(), 4);
        assert_eq!(trickled, whole);
    }

    #[test]
    fn a_bad_header_fails_before_its_body_arrives() {
        let mut buf = BytesMut::from(&hex("ffffffffffffffffffffffffffffffff 1001 02")[..]);
        assert!(matches!(
            codec().decode(&mut buf),
            Err(DecodeError::BadMessageLength { length: 4097 })
        ));
    }

    #[test]
    fn an_incomplete_message_waits_for_more_bytes() {
        let bytes = encode_open(65001, 90, Ipv4Addr::new(192, 0, 2, 1), &[]);
        for cut in 0..bytes.len() {
            let mut buf = BytesMut::from(&bytes[..cut]);
            assert_eq!(codec().decode(&mut buf).unwrap(), None, "cut at {cut}");
            assert_eq!(buf.len(), cut, "nothing consumed");
        }
    }

    #[test]
    fn a_stream_ending_inside_a_message_is_a_transport_error() {
        let bytes = encode_keepalive();
        let mut buf = BytesMut::from(&bytes[..10]);
        let err = codec().decode_eof(&mut buf).unwrap_err();
        assert!(err.is_transport());
    }
}
