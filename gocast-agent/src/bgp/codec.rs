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
//!   `DECISIONS.md`), so it never sees peer bytes; it only encodes the OPEN we send.
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
//!   (bytes from [`encode_open`] always carry it); [`BgpCodec::set_four_octet_as`] overrides.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use tokio_util::codec::{Decoder, Encoder};
use zettabgp::BgpMessage as _;

/// RFC 4271 §4.1: a message is 19..=4096 bytes.
pub const HEADER_LEN: usize = 19;
pub const MAX_MESSAGE_LEN: usize = 4096;
/// RFC 6793: the 2-octet AS used in place of a 4-octet one.
pub const AS_TRANS: u16 = 23456;

/// An address family we speak (AFI/SAFI unicast).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    Ipv4Unicast,
    Ipv6Unicast,
}

/// What an OPEN carries that we use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    /// The speaker's AS: the 4-octet capability's value when present, else the 2-octet field.
    pub asn: u32,
    /// Seconds; 0 or >= 3 (RFC 4271 §4.2).
    pub hold_time: u16,
    pub router_id: Ipv4Addr,
    /// Multiprotocol capabilities (RFC 4760) announced.
    pub families: Vec<Family>,
    /// 4-octet AS capability present (RFC 6793).
    pub four_octet_as: bool,
    /// Route refresh capability present (RFC 2918).
    pub route_refresh: bool,
}

/// ORIGIN attribute values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Igp,
    Egp,
    Incomplete,
}

/// Path attributes of routes we announce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attributes {
    pub origin: Origin,
    /// `AS_SEQUENCE`; empty for iBGP.
    pub as_path: Vec<u32>,
    pub med: Option<u32>,
    /// Sent to iBGP peers only.
    pub local_pref: Option<u32>,
    /// RFC 1997 values (`asn << 16 | value`), sorted, deduplicated.
    pub communities: Vec<u32>,
    /// RFC 8092 (global admin, local 1, local 2), sorted, deduplicated.
    pub large_communities: Vec<(u32, u32, u32)>,
}

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

/// A NOTIFICATION (RFC 4271 §4.5), with its data (e.g. an RFC 8203 shutdown reason).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub code: u8,
    pub subcode: u8,
    pub data: Vec<u8>,
}

/// A message we send or receive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Open(Open),
    /// Outgoing UPDATEs are built by [`encode_announce`] etc. as bytes; received ones decode here.
    Update(ReceivedUpdate),
    Notification(Notification),
    Keepalive,
    /// RFC 2918.
    RouteRefresh(Family),
}

/// NOTIFICATION error codes (RFC 4271 §4.5, RFC 7313 §5).
pub mod error_code {
    pub const MESSAGE_HEADER: u8 = 1;
    pub const OPEN_MESSAGE: u8 = 2;
    pub const UPDATE_MESSAGE: u8 = 3;
    pub const HOLD_TIMER_EXPIRED: u8 = 4;
    pub const FSM: u8 = 5;
    pub const CEASE: u8 = 6;
    pub const ROUTE_REFRESH_MESSAGE: u8 = 7;
}

/// Cease subcodes (RFC 4486 §4, RFC 8538).
pub mod cease_subcode {
    pub const MAX_PREFIXES: u8 = 1;
    pub const ADMINISTRATIVE_SHUTDOWN: u8 = 2;
    pub const PEER_DECONFIGURED: u8 = 3;
    pub const ADMINISTRATIVE_RESET: u8 = 4;
    pub const CONNECTION_REJECTED: u8 = 5;
    pub const OTHER_CONFIGURATION_CHANGE: u8 = 6;
    pub const CONNECTION_COLLISION: u8 = 7;
    pub const OUT_OF_RESOURCES: u8 = 8;
    pub const HARD_RESET: u8 = 9;
}

use cease_subcode::{ADMINISTRATIVE_RESET, ADMINISTRATIVE_SHUTDOWN};
use error_code::{CEASE, MESSAGE_HEADER, OPEN_MESSAGE, ROUTE_REFRESH_MESSAGE, UPDATE_MESSAGE};

const MARKER: [u8; 16] = [0xff; 16];
const BGP_VERSION: u8 = 4;

// Message types (RFC 4271 §4.1, RFC 2918 §3).
const MSG_OPEN: u8 = 1;
const MSG_UPDATE: u8 = 2;
const MSG_NOTIFICATION: u8 = 3;
const MSG_KEEPALIVE: u8 = 4;
const MSG_ROUTE_REFRESH: u8 = 5;

// Minimum lengths per type, header included (RFC 4271 §4.2-4.5, RFC 2918 §3).
const OPEN_MIN_LEN: usize = 29;
const UPDATE_MIN_LEN: usize = 23;
const NOTIFICATION_MIN_LEN: usize = 21;
const ROUTE_REFRESH_LEN: usize = 23;

// Attribute flags (RFC 4271 §4.3).
const FLAG_OPTIONAL: u8 = 0x80;
const FLAG_TRANSITIVE: u8 = 0x40;
const FLAG_EXTENDED_LENGTH: u8 = 0x10;
const WELL_KNOWN: u8 = FLAG_TRANSITIVE;
const OPTIONAL_TRANSITIVE: u8 = FLAG_OPTIONAL | FLAG_TRANSITIVE;
const OPTIONAL_NON_TRANSITIVE: u8 = FLAG_OPTIONAL;

// Attribute type codes.
const ATTR_ORIGIN: u8 = 1;
const ATTR_AS_PATH: u8 = 2;
const ATTR_NEXT_HOP: u8 = 3;
const ATTR_MED: u8 = 4;
const ATTR_LOCAL_PREF: u8 = 5;
const ATTR_ATOMIC_AGGREGATE: u8 = 6;
const ATTR_AGGREGATOR: u8 = 7;
const ATTR_COMMUNITIES: u8 = 8;
const ATTR_ORIGINATOR_ID: u8 = 9;
const ATTR_CLUSTER_LIST: u8 = 10;
const ATTR_MP_REACH: u8 = 14;
const ATTR_MP_UNREACH: u8 = 15;
const ATTR_AS4_PATH: u8 = 17;
const ATTR_AS4_AGGREGATOR: u8 = 18;
const ATTR_LARGE_COMMUNITY: u8 = 32;

// AS_PATH segment types (RFC 4271 §4.3, RFC 5065 §3).
const AS_SEQUENCE: u8 = 2;
const AS_CONFED_SET: u8 = 4;

const AFI_IPV4: u16 = 1;
const AFI_IPV6: u16 = 2;
const SAFI_UNICAST: u8 = 1;

// OPEN optional parameters and capabilities (RFC 5492, RFC 9072).
const PARAM_CAPABILITIES: u8 = 2;
const PARAM_EXTENDED_LENGTH: u8 = 255;
const CAP_MULTIPROTOCOL: u8 = 1;
const CAP_ROUTE_REFRESH: u8 = 2;
const CAP_FOUR_OCTET_AS: u8 = 65;

// Sizes used to pack UPDATEs.
/// Header plus the two 2-byte length fields of an UPDATE.
const UPDATE_OVERHEAD: usize = HEADER_LEN + 4;
/// An attribute header with the extended length flag.
const EXTENDED_ATTR_HEADER: usize = 4;
/// `MP_REACH_NLRI` before its NLRI, with an IPv6 global next hop: AFI, SAFI, length, 16, reserved.
const MP_REACH_IPV6_FIXED: usize = 2 + 1 + 1 + 16 + 1;
/// `MP_UNREACH_NLRI` before its withdrawn routes: AFI, SAFI.
const MP_UNREACH_FIXED: usize = 2 + 1;
/// Longest Shutdown Communication we send: 128 octets (RFC 8203 §2). RFC 9003 allows 255, but
/// an RFC 8203 receiver discards anything longer than 128.
const MAX_SHUTDOWN_COMMUNICATION: usize = 128;

/// Why a peer's bytes were refused. Each variant but `Io` is one NOTIFICATION
/// ([`DecodeError::notification`]), to send before closing the connection.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The transport failed or closed in the middle of a message; nothing can be sent.
    #[error("bgp transport: {0}")]
    Io(#[from] io::Error),
    /// 1/1: the marker is not all ones (RFC 4271 §6.1).
    #[error("message header marker is not all ones")]
    ConnectionNotSynchronized,
    /// 1/2: length outside 19..=4096 or below its type's minimum (RFC 4271 §6.1).
    #[error("bad message length {length}")]
    BadMessageLength { length: u16 },
    /// 1/3: unknown message type (RFC 4271 §6.1).
    #[error("bad message type {msg_type}")]
    BadMessageType { msg_type: u8 },
    /// 2/0: an OPEN whose parameters or capabilities we use are malformed (RFC 4271 §6.2).
    #[error("malformed open: {reason}")]
    MalformedOpen { reason: &'static str },
    /// 2/1: version other than 4 (RFC 4271 §6.2).
    #[error("unsupported bgp version {version}")]
    UnsupportedVersion { version: u8 },
    /// 2/2: AS 0 (RFC 7607), or not the configured peer AS (checked by the FSM).
    #[error("bad peer as {asn}")]
    BadPeerAs { asn: u32 },
    /// 2/3: BGP Identifier 0, or ours within one AS (RFC 6286 §2.2, checked by the FSM).
    #[error("bad bgp identifier {id}")]
    BadBgpIdentifier { id: Ipv4Addr },
    /// 2/4: an optional parameter other than capabilities (RFC 4271 §6.2, RFC 5492).
    #[error("unsupported optional parameter {param_type}")]
    UnsupportedOptionalParameter { param_type: u8 },
    /// 2/6: hold time 1 or 2 seconds (RFC 4271 §6.2).
    #[error("unacceptable hold time {hold_time}")]
    UnacceptableHoldTime { hold_time: u16 },
    /// 3/1: the attribute list or withdrawn routes cannot be framed, or `MP_REACH_NLRI` or
    /// `MP_UNREACH_NLRI` appears twice (RFC 4271 §6.3, RFC 7606 §3.g, §5.1).
    #[error("malformed attribute list: {reason}")]
    MalformedAttributeList { reason: &'static str },
    /// 3/2: a well-known attribute we don't know; data is the attribute (RFC 4271 §6.3).
    #[error("unrecognized well-known attribute {type_code}")]
    UnrecognizedWellKnownAttribute { type_code: u8, attribute: Vec<u8> },
    /// 3/9: a malformed `MP_REACH_NLRI` or `MP_UNREACH_NLRI`, whose NLRI cannot be located
    /// (RFC 4760 §7, RFC 7606 §7.11); data is the attribute.
    #[error("optional attribute {type_code} error: {reason}")]
    OptionalAttributeError {
        type_code: u8,
        reason: &'static str,
        attribute: Vec<u8>,
    },
    /// 3/10: withdrawn routes or NLRI syntactically wrong (RFC 4271 §6.3, RFC 7606 §5.3).
    #[error("invalid network field: {reason}")]
    InvalidNetworkField { reason: &'static str },
    /// 7/1: a ROUTE-REFRESH longer than 23 bytes; data is the message (RFC 7313 §5).
    #[error("route-refresh of {} bytes", message.len())]
    RouteRefreshInvalidLength { message: Vec<u8> },
}

impl DecodeError {
    /// The NOTIFICATION that reports this error (code/subcode/data per RFC 4271 §6, RFC 7606,
    /// RFC 7313 §5). For `Io` the connection is gone and nothing can be sent; it still returns
    /// Cease (6/0) so logs and counters have a value (see [`DecodeError::is_transport`]).
    pub fn notification(&self) -> Notification {
        let (code, subcode, data) = match self {
            Self::Io(_) => (CEASE, 0, Vec::new()),
            Self::ConnectionNotSynchronized => (MESSAGE_HEADER, 1, Vec::new()),
            Self::BadMessageLength { length } => (MESSAGE_HEADER, 2, length.to_be_bytes().to_vec()),
            Self::BadMessageType { msg_type } => (MESSAGE_HEADER, 3, vec![*msg_type]),
            Self::MalformedOpen { .. } => (OPEN_MESSAGE, 0, Vec::new()),
            // The data is the version we support, as 2 bytes (RFC 4271 §6.2).
            Self::UnsupportedVersion { .. } => (
                OPEN_MESSAGE,
                1,
                u16::from(BGP_VERSION).to_be_bytes().to_vec(),
            ),
            Self::BadPeerAs { .. } => (OPEN_MESSAGE, 2, Vec::new()),
            Self::BadBgpIdentifier { .. } => (OPEN_MESSAGE, 3, Vec::new()),
            Self::UnsupportedOptionalParameter { .. } => (OPEN_MESSAGE, 4, Vec::new()),
            Self::UnacceptableHoldTime { .. } => (OPEN_MESSAGE, 6, Vec::new()),
            Self::MalformedAttributeList { .. } => (UPDATE_MESSAGE, 1, Vec::new()),
            Self::UnrecognizedWellKnownAttribute { attribute, .. } => {
                (UPDATE_MESSAGE, 2, attribute.clone())
            }
            Self::OptionalAttributeError { attribute, .. } => {
                (UPDATE_MESSAGE, 9, attribute.clone())
            }
            Self::InvalidNetworkField { .. } => (UPDATE_MESSAGE, 10, Vec::new()),
            Self::RouteRefreshInvalidLength { message } => {
                (ROUTE_REFRESH_MESSAGE, 1, message.clone())
            }
        };
        Notification {
            code,
            subcode,
            data,
        }
    }

    /// The transport failed: close without sending anything.
    pub fn is_transport(&self) -> bool {
        matches!(self, Self::Io(_))
    }
}

impl Notification {
    /// The RFC 8203/9003 Shutdown Communication of a Cease / Administrative Shutdown or Reset,
    /// if it carries one (invalid UTF-8 replaced: it is the peer's text).
    pub fn shutdown_communication(&self) -> Option<String> {
        if self.code != CEASE
            || !matches!(self.subcode, ADMINISTRATIVE_SHUTDOWN | ADMINISTRATIVE_RESET)
        {
            return None;
        }
        let (&len, rest) = self.data.split_first()?;
        let text = rest.get(..usize::from(len)).filter(|t| !t.is_empty())?;
        Some(String::from_utf8_lossy(text).into_owned())
    }
}

impl fmt::Display for Notification {
    /// `administrative shutdown (6/2): "maintenance"`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}/{})",
            notification_name(self.code, self.subcode),
            self.code,
            self.subcode
        )?;
        if let Some(text) = self.shutdown_communication() {
            write!(f, ": {text:?}")?;
        }
        Ok(())
    }
}

/// Names from the IANA BGP Error (Sub)Codes registry.
fn notification_name(code: u8, subcode: u8) -> &'static str {
    match (code, subcode) {
        (1, 1) => "connection not synchronized",
        (1, 2) => "bad message length",
        (1, 3) => "bad message type",
        (1, _) => "message header error",
        (2, 1) => "unsupported version number",
        (2, 2) => "bad peer AS",
        (2, 3) => "bad BGP identifier",
        (2, 4) => "unsupported optional parameter",
        (2, 6) => "unacceptable hold time",
        (2, 7) => "unsupported capability",
        (2, _) => "OPEN message error",
        (3, 1) => "malformed attribute list",
        (3, 2) => "unrecognized well-known attribute",
        (3, 3) => "missing well-known attribute",
        (3, 4) => "attribute flags error",
        (3, 5) => "attribute length error",
        (3, 6) => "invalid ORIGIN attribute",
        (3, 8) => "invalid NEXT_HOP attribute",
        (3, 9) => "optional attribute error",
        (3, 10) => "invalid network field",
        (3, 11) => "malformed AS_PATH",
        (3, _) => "UPDATE message error",
        (4, _) => "hold timer expired",
        (5, _) => "finite state machine error",
        (6, 1) => "maximum number of prefixes reached",
        (6, 2) => "administrative shutdown",
        (6, 3) => "peer de-configured",
        (6, 4) => "administrative reset",
        (6, 5) => "connection rejected",
        (6, 6) => "other configuration change",
        (6, 7) => "connection collision resolution",
        (6, 8) => "out of resources",
        (6, 9) => "hard reset",
        (6, 10) => "BFD down",
        (6, _) => "cease",
        (7, 1) => "invalid ROUTE-REFRESH message length",
        (7, _) => "ROUTE-REFRESH message error",
        _ => "unknown error code",
    }
}

/// Frames BGP messages on a byte stream: decodes [`Message`]s, encodes [`Message`]s (not
/// UPDATEs) and pre-encoded [`Bytes`] (UPDATEs from [`encode_announce`] etc.).
#[derive(Debug, Clone)]
pub struct BgpCodec {
    /// Our OPEN carried the 4-octet AS capability (bytes from [`encode_open`] always do).
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
    /// `InvalidInput`: ours are sent as bytes from [`encode_announce`] and friends.
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

    /// A message encoded by this module's `encode_*` functions, sent as is.
    fn encode(&mut self, item: Bytes, dst: &mut BytesMut) -> Result<(), io::Error> {
        dst.extend_from_slice(&item);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Decoding. Every read of peer bytes goes through `Reader`, which returns `None` instead of
// panicking; callers turn `None` into the NOTIFICATION the RFCs ask for.

/// A cursor over peer bytes with checked reads.
#[derive(Debug, Clone, Copy)]
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// What has not been read yet.
    fn rest(&self) -> &'a [u8] {
        self.rest
    }

    fn peek(&self) -> Option<u8> {
        self.rest.first().copied()
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (taken, rest) = self.rest.split_at_checked(n)?;
        self.rest = rest;
        Some(taken)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    fn u8(&mut self) -> Option<u8> {
        let (&byte, rest) = self.rest.split_first()?;
        self.rest = rest;
        Some(byte)
    }

    fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }
}

/// RFC 4271 §6.1 header checks; returns the type and the total length.
fn check_header(header: [u8; HEADER_LEN]) -> Result<(u8, usize), DecodeError> {
    let [marker @ .., len_hi, len_lo, msg_type] = header;
    if marker != MARKER {
        return Err(DecodeError::ConnectionNotSynchronized);
    }
    let length = u16::from_be_bytes([len_hi, len_lo]);
    let len = usize::from(length);
    if !(HEADER_LEN..=MAX_MESSAGE_LEN).contains(&len) {
        return Err(DecodeError::BadMessageLength { length });
    }
    let long_enough = match msg_type {
        MSG_OPEN => len >= OPEN_MIN_LEN,
        MSG_UPDATE => len >= UPDATE_MIN_LEN,
        MSG_NOTIFICATION => len >= NOTIFICATION_MIN_LEN,
        MSG_KEEPALIVE => len == HEADER_LEN,
        MSG_ROUTE_REFRESH => len >= ROUTE_REFRESH_LEN,
        _ => return Err(DecodeError::BadMessageType { msg_type }),
    };
    if !long_enough {
        return Err(DecodeError::BadMessageLength { length });
    }
    Ok((msg_type, len))
}

const fn afi_safi(family: Family) -> (u16, u8) {
    match family {
        Family::Ipv4Unicast => (AFI_IPV4, SAFI_UNICAST),
        Family::Ipv6Unicast => (AFI_IPV6, SAFI_UNICAST),
    }
}

const fn family_of(afi: u16, safi: u8) -> Option<Family> {
    match (afi, safi) {
        (AFI_IPV4, SAFI_UNICAST) => Some(Family::Ipv4Unicast),
        (AFI_IPV6, SAFI_UNICAST) => Some(Family::Ipv6Unicast),
        _ => None,
    }
}

/// Capabilities of an OPEN that we use.
#[derive(Debug, Default)]
struct Capabilities {
    families: Vec<Family>,
    four_octet_as: Option<u32>,
    route_refresh: bool,
}

/// An OPEN body (RFC 4271 §4.2), checked per §6.2.
fn parse_open(body: &[u8]) -> Result<Open, DecodeError> {
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

fn parse_notification(body: &[u8]) -> Notification {
    let mut r = Reader::new(body);
    // The header check guarantees the two octets; 0/0 stands in if it did not.
    let code = r.u8().unwrap_or(0);
    let subcode = r.u8().unwrap_or(0);
    Notification {
        code,
        subcode,
        data: r.rest().to_vec(),
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

const fn malformed_list(reason: &'static str) -> DecodeError {
    DecodeError::MalformedAttributeList { reason }
}

/// An UPDATE body (RFC 4271 §4.3) with RFC 7606 error handling.
fn parse_update(body: &[u8], four_octet_as: bool) -> Result<ReceivedUpdate, DecodeError> {
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
    let scan = parse_attributes(attributes, four_octet_as, &mut update)?;

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

/// What the attribute list held, beyond the prefixes written into the update.
struct AttrScan {
    /// Type codes seen (first occurrences).
    seen: [bool; 256],
    count: usize,
    /// An `MP_UNREACH_NLRI` of this family without prefixes (an End-of-RIB candidate).
    empty_unreach: Option<Family>,
    /// The first RFC 7606 treat-as-withdraw error.
    treat_as_withdraw: Option<String>,
}

impl AttrScan {
    fn has(&self, type_code: u8) -> bool {
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

/// Walks the path attributes; `MP_REACH_NLRI` and `MP_UNREACH_NLRI` prefixes go into `update`.
fn parse_attributes(
    list: &[u8],
    four_octet_as: bool,
    update: &mut ReceivedUpdate,
) -> Result<AttrScan, DecodeError> {
    let mut scan = AttrScan {
        seen: [false; 256],
        count: 0,
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
        if let Some(reason) = check_attribute(&attr, four_octet_as, update, &mut scan)? {
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
    update: &mut ReceivedUpdate,
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
            parse_mp_reach(attr.value, &mut update.announced)
                .map_err(|reason| optional_attribute_error(attr, reason))?;
            // The NLRI could be located, so wrong flags can be treat-as-withdraw (§3.c).
            flags_error(attr, "MP_REACH_NLRI", OPTIONAL_NON_TRANSITIVE)
        }
        ATTR_MP_UNREACH => {
            // Withdrawals stay withdrawals whatever the flags say.
            scan.empty_unreach = parse_mp_unreach(attr.value, &mut update.withdrawn)
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

/// `MP_REACH_NLRI` (RFC 4760 §3). Families we don't speak are skipped whole.
fn parse_mp_reach(value: &[u8], announced: &mut Vec<IpNet>) -> Result<(), &'static str> {
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
fn parse_mp_unreach(
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
fn parse_prefixes(bytes: &[u8], family: Family, out: &mut Vec<IpNet>) -> Result<(), &'static str> {
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

// ---------------------------------------------------------------------------------------------
// Encoding. The inputs are ours, so sizes are invariants; they are still computed with checked
// conversions so a broken invariant gives a wrong message, never a panic.

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

/// The OPEN we send (RFC 4271 §4.2): version 4, My AS (`AS_TRANS` above 65535, RFC 6793 §4.2.1),
/// and capabilities: multiprotocol per family (RFC 4760 §8), route refresh (RFC 2918) and 4-octet
/// AS (RFC 6793), always. The session sends the FSM's `Open` through the codec; this builds the
/// same bytes for tests.
#[cfg(test)]
fn encode_open(asn: u32, hold_time: u16, router_id: Ipv4Addr, families: &[Family]) -> Bytes {
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

/// An OPEN with the capabilities `open` says, each in its own Capabilities parameter (the
/// layout zettabgp writes; RFC 5492 §4 allows either).
fn encode_open_message(open: &Open) -> Result<Bytes, io::Error> {
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

/// Cease / Administrative Shutdown (6/2) carrying `reason` as the RFC 8203/9003 Shutdown
/// Communication: a length octet and UTF-8, cut at a character boundary to 255 bytes.
pub fn shutdown_notification(reason: &str) -> Notification {
    let mut end = reason.len().min(MAX_SHUTDOWN_COMMUNICATION);
    // Terminates: 0 is always a boundary.
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let text = reason.as_bytes().get(..end).unwrap_or_default();
    let mut data = Vec::with_capacity(1 + text.len());
    data.push(u8::try_from(text.len()).unwrap_or(u8::MAX));
    data.extend_from_slice(text);
    Notification {
        code: CEASE,
        subcode: ADMINISTRATIVE_SHUTDOWN,
        data,
    }
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
    use super::*;

    use proptest::prelude::*;

    // ---- helpers -------------------------------------------------------------------------------

    fn hex(text: &str) -> Vec<u8> {
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
    fn message(msg_type: u8, body: &[u8]) -> Vec<u8> {
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

    fn raw_update(withdrawn: &[u8], attributes: &[u8], nlri: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&u16::try_from(withdrawn.len()).unwrap().to_be_bytes());
        body.extend_from_slice(withdrawn);
        body.extend_from_slice(&u16::try_from(attributes.len()).unwrap().to_be_bytes());
        body.extend_from_slice(attributes);
        body.extend_from_slice(nlri);
        message(MSG_UPDATE, &body)
    }

    fn attr(flags: u8, type_code: u8, value: &[u8]) -> Vec<u8> {
        let mut out = vec![flags, type_code, u8::try_from(value.len()).unwrap()];
        out.extend_from_slice(value);
        out
    }

    /// ORIGIN IGP, `AS_PATH` [65001] (4-byte), `NEXT_HOP` 192.0.2.1.
    fn mandatory() -> Vec<u8> {
        [
            attr(0x40, 1, &[0]),
            attr(0x40, 2, &hex("02 01 0000fde9")),
            attr(0x40, 3, &[192, 0, 2, 1]),
        ]
        .concat()
    }

    /// `MP_REACH_NLRI` for `2001:db8:1::/48` via `2001:db8::1`.
    fn mp_reach_v6() -> Vec<u8> {
        attr(
            0x80,
            14,
            &hex("0002 01 10 20010db8000000000000000000000001 00 30 20010db80001"),
        )
    }

    fn codec() -> BgpCodec {
        let mut codec = BgpCodec::new();
        codec.set_four_octet_as(true);
        codec
    }

    /// Every message in `bytes`, which must hold whole messages only.
    fn decode_all(codec: &mut BgpCodec, bytes: &[u8]) -> Result<Vec<Message>, DecodeError> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(message) = codec.decode(&mut buf)? {
            out.push(message);
        }
        assert!(buf.is_empty(), "{} bytes left over", buf.len());
        Ok(out)
    }

    fn decode_one(bytes: &[u8]) -> Result<Message, DecodeError> {
        let mut messages = decode_all(&mut codec(), bytes)?;
        assert_eq!(messages.len(), 1, "{messages:?}");
        Ok(messages.remove(0))
    }

    fn decode_update(bytes: &[u8]) -> ReceivedUpdate {
        match decode_one(bytes) {
            Ok(Message::Update(update)) => update,
            other => panic!("not an UPDATE: {other:?}"),
        }
    }

    fn net(text: &str) -> IpNet {
        text.parse().unwrap()
    }

    fn attributes() -> Attributes {
        Attributes {
            origin: Origin::Igp,
            as_path: vec![65001],
            med: None,
            local_pref: None,
            communities: Vec::new(),
            large_communities: Vec::new(),
        }
    }

    fn notification(code: u8, subcode: u8, data: &[u8]) -> Notification {
        Notification {
            code,
            subcode,
            data: data.to_vec(),
        }
    }

    // ---- OPEN ----------------------------------------------------------------------------------

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
    fn shutdown_notification_carries_the_rfc_8203_communication() {
        let sent = shutdown_notification("maintenance");
        assert_eq!((sent.code, sent.subcode), (6, 2));
        assert_eq!(sent.data, [&[11_u8][..], b"maintenance"].concat());
        let received = match decode_one(&encode_notification(&sent)).unwrap() {
            Message::Notification(n) => n,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            received.shutdown_communication().as_deref(),
            Some("maintenance")
        );
        assert_eq!(
            received.to_string(),
            "administrative shutdown (6/2): \"maintenance\""
        );
    }

    #[test]
    fn a_long_shutdown_reason_is_cut_at_a_character_boundary_within_128_bytes() {
        let reason = "é".repeat(200);
        let sent = shutdown_notification(&reason);
        assert_eq!(sent.data[0], 128);
        assert_eq!(sent.data.len(), 129);
        assert_eq!(
            sent.shutdown_communication().unwrap(),
            "é".repeat(64),
            "whole characters only"
        );
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

    // ---- UPDATE: what peers send ---------------------------------------------------------------

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

    /// What a malformed message must give.
    #[derive(Debug)]
    enum Expect {
        /// This NOTIFICATION (code, subcode, data).
        Notify(u8, u8, Vec<u8>),
        /// This NOTIFICATION code/subcode, whatever the data.
        NotifyCode(u8, u8),
        /// Treat-as-withdraw with a reason naming this; the announced prefix is withdrawn.
        Withdraw(&'static str),
    }

    fn open_body(version: u8, hold_time: u16, id: [u8; 4], params: &[u8]) -> Vec<u8> {
        let mut body = vec![version, 0xfd, 0xe9];
        body.extend_from_slice(&hold_time.to_be_bytes());
        body.extend_from_slice(&id);
        body.push(u8::try_from(params.len()).unwrap());
        body.extend_from_slice(params);
        body
    }

    fn header_cases() -> Vec<(&'static str, Vec<u8>, Expect)> {
        let mut bad_marker = encode_keepalive().to_vec();
        bad_marker[3] = 0xfe;
        vec![
            ("bad marker", bad_marker, Expect::Notify(1, 1, vec![])),
            (
                "length 18",
                hex("ffffffffffffffffffffffffffffffff 0012 04"),
                Expect::Notify(1, 2, vec![0, 18]),
            ),
            (
                "length 4097",
                hex("ffffffffffffffffffffffffffffffff 1001 02"),
                Expect::Notify(1, 2, vec![0x10, 0x01]),
            ),
            (
                "keepalive of 20 bytes",
                message(MSG_KEEPALIVE, &[0]),
                Expect::Notify(1, 2, vec![0, 20]),
            ),
            (
                "notification of 20 bytes",
                message(MSG_NOTIFICATION, &[6]),
                Expect::Notify(1, 2, vec![0, 20]),
            ),
            (
                "update of 22 bytes",
                message(MSG_UPDATE, &[0, 0, 0]),
                Expect::Notify(1, 2, vec![0, 22]),
            ),
            ("bad type", message(6, &[]), Expect::Notify(1, 3, vec![6])),
            (
                "open too short",
                message(MSG_OPEN, &hex("04 fde9 005a c0000201")),
                Expect::Notify(1, 2, vec![0, 28]),
            ),
            (
                "route-refresh of 24 bytes",
                message(MSG_ROUTE_REFRESH, &hex("0001 00 01 00")),
                Expect::Notify(7, 1, message(MSG_ROUTE_REFRESH, &hex("0001 00 01 00"))),
            ),
        ]
    }

    fn open_cases() -> Vec<(&'static str, Vec<u8>, Expect)> {
        let id = [192, 0, 2, 1];
        vec![
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
        ]
    }

    /// An UPDATE announcing 198.51.100.0/24 with these attributes.
    fn announcing(attributes: &[Vec<u8>]) -> Vec<u8> {
        raw_update(&[], &attributes.concat(), &hex("18 c63364"))
    }

    /// An UPDATE with these attributes and no IPv4 NLRI.
    fn only_attributes(attributes: &[Vec<u8>]) -> Vec<u8> {
        raw_update(&[], &attributes.concat(), &[])
    }

    fn update_reset_cases() -> Vec<(&'static str, Vec<u8>, Expect)> {
        let unknown_well_known = attr(0x40, 99, &[1]);
        let mut inconsistent = raw_update(&[], &mandatory(), &[]);
        inconsistent[HEADER_LEN + 3] += 1;
        let short_next_hop = attr(0x80, 14, &hex("0002 01 10 20010db800000000"));
        let long_prefix = attr(
            0x80,
            14,
            &hex("0002 01 10 20010db8000000000000000000000001 00 81"),
        );
        let reset = |subcode| Expect::Notify(3, subcode, vec![]);
        vec![
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
        ]
    }

    fn update_withdraw_cases() -> Vec<(&'static str, Vec<u8>, Expect)> {
        let origin = || attr(0x40, 1, &[0]);
        let as_path = || attr(0x40, 2, &hex("02 01 0000fde9"));
        let next_hop = || attr(0x40, 3, &[192, 0, 2, 1]);
        let with = |extra: Vec<u8>| announcing(&[mandatory(), extra]);
        vec![
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
        ]
    }

    #[test]
    fn malformed_messages_give_their_exact_notification_or_treat_as_withdraw() {
        let cases: Vec<_> = [
            header_cases(),
            open_cases(),
            update_reset_cases(),
            update_withdraw_cases(),
        ]
        .into_iter()
        .flatten()
        .collect();
        assert!(cases.len() >= 40);
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

    // ---- robustness ----------------------------------------------------------------------------

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
