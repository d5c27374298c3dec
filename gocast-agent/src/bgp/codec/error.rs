//! Why a peer's bytes were refused: [`DecodeError`], one variant per NOTIFICATION, and
//! [`DecodeError::notification`], the 1:1 mapping to its code, subcode and data (RFC 4271 §6,
//! RFC 7606, RFC 7313 §5). The decoders return it; the session sends the NOTIFICATION and closes.

use std::{io, net::Ipv4Addr};

use super::{
    BGP_VERSION,
    notification::{
        Notification,
        error_code::{CEASE, MESSAGE_HEADER, OPEN_MESSAGE, ROUTE_REFRESH_MESSAGE, UPDATE_MESSAGE},
    },
};

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
