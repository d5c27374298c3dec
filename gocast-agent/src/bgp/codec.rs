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
/// RFC 9003 §2: a Shutdown Communication is at most 255 bytes of UTF-8.
const MAX_SHUTDOWN_COMMUNICATION: usize = 255;

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
    /// 2/2: AS 0 (RFC 7607), or not the configured peer AS ([`check_open`]).
    #[error("bad peer as {asn}")]
    BadPeerAs { asn: u32 },
    /// 2/3: BGP Identifier 0, or ours within one AS (RFC 6286 §2.2, [`check_open`]).
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

/// The checks on a peer's OPEN that need our configuration (RFC 4271 §6.2): its AS must be the
/// configured one, and within one AS its BGP Identifier must differ from ours (RFC 6286 §2.2;
/// eBGP peers may share ours).
pub fn check_open(
    open: &Open,
    expected_peer_as: u32,
    local_as: u32,
    local_router_id: Ipv4Addr,
) -> Result<(), DecodeError> {
    if open.asn != expected_peer_as {
        return Err(DecodeError::BadPeerAs { asn: open.asn });
    }
    if open.asn == local_as && open.router_id == local_router_id {
        return Err(DecodeError::BadBgpIdentifier { id: open.router_id });
    }
    Ok(())
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
                encode_open_message(&open)
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
/// AS (RFC 6793), always.
pub fn encode_open(asn: u32, hold_time: u16, router_id: Ipv4Addr, families: &[Family]) -> Bytes {
    encode_open_message(&Open {
        asn,
        hold_time,
        router_id,
        families: families.to_vec(),
        four_octet_as: true,
        route_refresh: true,
    })
}

/// An OPEN with the capabilities `open` says, each in its own Capabilities parameter (the
/// layout zettabgp writes; RFC 5492 §4 allows either).
fn encode_open_message(open: &Open) -> Bytes {
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
        .expect("an OPEN with at most 4 capabilities fits in 4077 bytes");
    frame(MSG_OPEN, body.get(..len).unwrap_or_default())
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
