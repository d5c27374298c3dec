//! NOTIFICATION (RFC 4271 §4.5): [`Notification`], the error codes and Cease subcodes, their
//! names for logs (IANA "BGP Error (Sub)Codes"), and the Shutdown Communication a Cease can carry
//! (RFC 8203, RFC 9003), both built and read. Which NOTIFICATION a refused message gives is
//! [`DecodeError::notification`](super::DecodeError::notification); the bytes are built in
//! `encode.rs`.

use std::fmt;

use self::{
    cease_subcode::{ADMINISTRATIVE_RESET, ADMINISTRATIVE_SHUTDOWN},
    error_code::CEASE,
};
use super::reader::Reader;

/// A NOTIFICATION (RFC 4271 §4.5), with its data (e.g. an RFC 8203 shutdown reason).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// Error code ([`error_code`]).
    pub code: u8,
    /// Error subcode; 0 where the code defines none.
    pub subcode: u8,
    /// Data, as the code and subcode define it.
    pub data: Vec<u8>,
}

/// NOTIFICATION error codes (RFC 4271 §4.5, RFC 7313 §5).
pub mod error_code {
    /// Message Header Error.
    pub const MESSAGE_HEADER: u8 = 1;
    /// OPEN Message Error.
    pub const OPEN_MESSAGE: u8 = 2;
    /// UPDATE Message Error.
    pub const UPDATE_MESSAGE: u8 = 3;
    /// Hold Timer Expired.
    pub const HOLD_TIMER_EXPIRED: u8 = 4;
    /// Finite State Machine Error.
    pub const FSM: u8 = 5;
    /// Cease.
    pub const CEASE: u8 = 6;
    /// ROUTE-REFRESH Message Error (RFC 7313 §5).
    pub const ROUTE_REFRESH_MESSAGE: u8 = 7;
}

/// Cease subcodes (RFC 4486 §4, RFC 8538).
pub mod cease_subcode {
    /// Maximum Number of Prefixes Reached.
    pub const MAX_PREFIXES: u8 = 1;
    /// Administrative Shutdown; may carry a Shutdown Communication.
    pub const ADMINISTRATIVE_SHUTDOWN: u8 = 2;
    /// Peer De-configured.
    pub const PEER_DECONFIGURED: u8 = 3;
    /// Administrative Reset; may carry a Shutdown Communication.
    pub const ADMINISTRATIVE_RESET: u8 = 4;
    /// Connection Rejected.
    pub const CONNECTION_REJECTED: u8 = 5;
    /// Other Configuration Change.
    pub const OTHER_CONFIGURATION_CHANGE: u8 = 6;
    /// Connection Collision Resolution.
    pub const CONNECTION_COLLISION: u8 = 7;
    /// Out of Resources.
    pub const OUT_OF_RESOURCES: u8 = 8;
    /// Hard Reset (RFC 8538).
    pub const HARD_RESET: u8 = 9;
}

/// Longest Shutdown Communication we send: 128 octets (RFC 8203 §2). RFC 9003 allows 255, but
/// an RFC 8203 receiver discards anything longer than 128.
const MAX_SHUTDOWN_COMMUNICATION: usize = 128;

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

/// Cease / Administrative Shutdown (6/2) carrying `reason` as the RFC 8203/9003 Shutdown
/// Communication: a length octet and UTF-8, cut at a character boundary to 128 bytes.
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

/// A NOTIFICATION body (RFC 4271 §4.5): error code, subcode, data.
pub(super) fn parse_notification(body: &[u8]) -> Notification {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bgp::codec::{Message, encode_notification, testing::decode_one};

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
}
