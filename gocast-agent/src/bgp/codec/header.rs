//! The message header (RFC 4271 §4.1): marker, length and type, and the length each type must
//! have. [`check_header`] applies the §6.1 checks to the 19 header bytes alone, so a bad length
//! fails before the body is waited for.

use super::error::DecodeError;

/// The header's length: the shortest message (RFC 4271 §4.1).
pub const HEADER_LEN: usize = 19;
/// The longest message (RFC 4271 §4.1).
pub const MAX_MESSAGE_LEN: usize = 4096;

pub(super) const MARKER: [u8; 16] = [0xff; 16];

// Message types (RFC 4271 §4.1, RFC 2918 §3).
pub(super) const MSG_OPEN: u8 = 1;
pub(super) const MSG_UPDATE: u8 = 2;
pub(super) const MSG_NOTIFICATION: u8 = 3;
pub(super) const MSG_KEEPALIVE: u8 = 4;
pub(super) const MSG_ROUTE_REFRESH: u8 = 5;

// Minimum lengths per type, header included (RFC 4271 §4.2-4.5, RFC 2918 §3).
const OPEN_MIN_LEN: usize = 29;
const UPDATE_MIN_LEN: usize = 23;
pub(super) const NOTIFICATION_MIN_LEN: usize = 21;
pub(super) const ROUTE_REFRESH_LEN: usize = 23;

/// RFC 4271 §6.1 header checks; returns the type and the total length.
pub(super) fn check_header(header: [u8; HEADER_LEN]) -> Result<(u8, usize), DecodeError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bgp::codec::{
        encode_keepalive,
        testing::{Expect, assert_cases, hex, message},
    };

    #[test]
    fn malformed_headers_give_their_exact_notification() {
        let mut bad_marker = encode_keepalive().to_vec();
        bad_marker[3] = 0xfe;
        assert_cases(vec![
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
        ]);
    }
}
