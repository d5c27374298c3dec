//! The BFD Control packet (RFC 5880 §4.1): encode, and a checked decode that applies every
//! reception rule of §6.8.6 that needs no session state. Peer bytes are read through fixed-size
//! array conversions only (no indexing, no unwrap), so no input can panic the decoder; each
//! rejection is a [`DecodeError`] whose [`DecodeError::reason`] labels the drop counter.
//!
//! We never use authentication, so a packet with the A bit is discarded (§6.8.6: "If the A bit
//! is set and no authentication is in use"). Demand mode and the Echo function are not
//! implemented: we send D = 0 and Required Min Echo RX Interval = 0 (§6.8.3, §6.8.9).

use std::{num::NonZeroU32, time::Duration};

/// The protocol version we speak and accept (§4.1).
pub const VERSION: u8 = 1;
/// The length of a Control packet without authentication (§4.1).
pub const LEN: usize = 24;

/// A session state on the wire (§4.1, "Sta").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    AdminDown,
    Down,
    Init,
    Up,
}

impl State {
    fn from_bits(bits: u8) -> Self {
        match bits & 0b11 {
            0 => Self::AdminDown,
            1 => Self::Down,
            2 => Self::Init,
            _ => Self::Up,
        }
    }

    fn bits(self) -> u8 {
        match self {
            Self::AdminDown => 0,
            Self::Down => 1,
            Self::Init => 2,
            Self::Up => 3,
        }
    }

    /// The lowercase name `/info` and `/metrics` use.
    pub fn name(self) -> &'static str {
        match self {
            Self::AdminDown => "admin_down",
            Self::Down => "down",
            Self::Init => "init",
            Self::Up => "up",
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A diagnostic code (§4.1, "Diag"): why the sender's session last went down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Diag {
    None,
    ControlDetectionTimeExpired,
    EchoFunctionFailed,
    NeighborSignaledSessionDown,
    ForwardingPlaneReset,
    PathDown,
    ConcatenatedPathDown,
    AdministrativelyDown,
    ReverseConcatenatedPathDown,
    /// 9–31, reserved: kept as received.
    Reserved(u8),
}

impl Diag {
    fn from_bits(bits: u8) -> Self {
        match bits & 0x1f {
            0 => Self::None,
            1 => Self::ControlDetectionTimeExpired,
            2 => Self::EchoFunctionFailed,
            3 => Self::NeighborSignaledSessionDown,
            4 => Self::ForwardingPlaneReset,
            5 => Self::PathDown,
            6 => Self::ConcatenatedPathDown,
            7 => Self::AdministrativelyDown,
            8 => Self::ReverseConcatenatedPathDown,
            other => Self::Reserved(other),
        }
    }

    /// The code on the wire.
    pub fn code(self) -> u8 {
        match self {
            Self::None => 0,
            Self::ControlDetectionTimeExpired => 1,
            Self::EchoFunctionFailed => 2,
            Self::NeighborSignaledSessionDown => 3,
            Self::ForwardingPlaneReset => 4,
            Self::PathDown => 5,
            Self::ConcatenatedPathDown => 6,
            Self::AdministrativelyDown => 7,
            Self::ReverseConcatenatedPathDown => 8,
            Self::Reserved(code) => code & 0x1f,
        }
    }
}

impl std::fmt::Display for Diag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = match self {
            Self::None => "no diagnostic",
            Self::ControlDetectionTimeExpired => "control detection time expired",
            Self::EchoFunctionFailed => "echo function failed",
            Self::NeighborSignaledSessionDown => "neighbor signaled session down",
            Self::ForwardingPlaneReset => "forwarding plane reset",
            Self::PathDown => "path down",
            Self::ConcatenatedPathDown => "concatenated path down",
            Self::AdministrativelyDown => "administratively down",
            Self::ReverseConcatenatedPathDown => "reverse concatenated path down",
            Self::Reserved(code) => return write!(f, "reserved diagnostic {code}"),
        };
        write!(f, "{text} ({})", self.code())
    }
}

/// A valid Control packet. Intervals are microseconds on the wire, [`Duration`] here.
#[derive(Debug, Clone, PartialEq, Eq)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "the packet's flag bits, one field each as RFC 5880 §4.1 names them"
)]
pub struct ControlPacket {
    pub diag: Diag,
    pub state: State,
    /// P: the sender asks us to confirm a parameter change (§6.5).
    pub poll: bool,
    /// F: the sender confirms our Poll.
    pub final_: bool,
    /// C: the sender's BFD does not share fate with its control plane.
    pub control_plane_independent: bool,
    /// D: demand mode, which we never use ourselves.
    pub demand: bool,
    pub detect_mult: u8,
    pub my_discr: NonZeroU32,
    /// Zero (`None`) until the sender has heard from us.
    pub your_discr: Option<NonZeroU32>,
    pub desired_min_tx: Duration,
    pub required_min_rx: Duration,
    pub required_min_echo_rx: Duration,
}

/// Why a received packet was dropped (§6.8.6; RFC 5881 §5 for the TTL, checked by the socket).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("shorter than a BFD Control packet ({0} bytes)")]
    Truncated(usize),
    #[error("version {0}, not 1")]
    Version(u8),
    #[error("length field {length} is below {LEN} or beyond the {received} bytes received")]
    Length { length: u8, received: usize },
    #[error("detect multiplier is zero")]
    DetectMultZero,
    #[error("multipoint bit set")]
    Multipoint,
    #[error("my discriminator is zero")]
    MyDiscriminatorZero,
    #[error("your discriminator is zero in state {0}")]
    YourDiscriminatorZero(State),
    #[error("authentication present, none configured")]
    Authentication,
}

impl DecodeError {
    /// The `reason` label of `gocast_bfd_packets_dropped_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Truncated(_) | Self::Length { .. } => "length",
            Self::Version(_) => "version",
            Self::DetectMultZero => "detect_mult",
            Self::Multipoint => "multipoint",
            Self::MyDiscriminatorZero => "my_discriminator",
            Self::YourDiscriminatorZero(_) => "your_discriminator",
            Self::Authentication => "authentication",
        }
    }
}

const POLL: u8 = 0x20;
const FINAL: u8 = 0x10;
const CPI: u8 = 0x08;
const AUTH: u8 = 0x04;
const DEMAND: u8 = 0x02;
const MULTIPOINT: u8 = 0x01;

impl ControlPacket {
    /// Decodes one datagram, applying §6.8.6 in its order.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let head: &[u8; LEN] = bytes
            .first_chunk()
            .ok_or(DecodeError::Truncated(bytes.len()))?;
        let [vers_diag, flags, detect_mult, length] = word(head, 0);
        let version = vers_diag >> 5;
        if version != VERSION {
            return Err(DecodeError::Version(version));
        }
        let auth = flags & AUTH != 0;
        // With the A bit the minimum is 26 (§6.8.6); we reject A below in any case.
        let minimum = if auth { LEN + 2 } else { LEN };
        if usize::from(length) < minimum || usize::from(length) > bytes.len() {
            return Err(DecodeError::Length {
                length,
                received: bytes.len(),
            });
        }
        if detect_mult == 0 {
            return Err(DecodeError::DetectMultZero);
        }
        if flags & MULTIPOINT != 0 {
            return Err(DecodeError::Multipoint);
        }
        let my_discr = NonZeroU32::new(u32::from_be_bytes(word(head, 4)))
            .ok_or(DecodeError::MyDiscriminatorZero)?;
        let your_discr = NonZeroU32::new(u32::from_be_bytes(word(head, 8)));
        let state = State::from_bits(flags >> 6);
        if your_discr.is_none() && !matches!(state, State::Down | State::AdminDown) {
            return Err(DecodeError::YourDiscriminatorZero(state));
        }
        if auth {
            return Err(DecodeError::Authentication);
        }
        let micros =
            |offset| Duration::from_micros(u64::from(u32::from_be_bytes(word(head, offset))));
        Ok(Self {
            diag: Diag::from_bits(vers_diag),
            state,
            poll: flags & POLL != 0,
            final_: flags & FINAL != 0,
            control_plane_independent: flags & CPI != 0,
            demand: flags & DEMAND != 0,
            detect_mult,
            my_discr,
            your_discr,
            desired_min_tx: micros(12),
            required_min_rx: micros(16),
            required_min_echo_rx: micros(20),
        })
    }

    /// The packet on the wire; intervals beyond `u32::MAX` µs (71 minutes) are clamped
    /// (configuration caps them far below).
    pub fn encode(&self) -> [u8; LEN] {
        let mut out = [0u8; LEN];
        let flag = |set: bool, bit: u8| if set { bit } else { 0 };
        let flags = (self.state.bits() << 6)
            | flag(self.poll, POLL)
            | flag(self.final_, FINAL)
            | flag(self.control_plane_independent, CPI)
            | flag(self.demand, DEMAND);
        let micros = |d: Duration| u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
        let fields = [
            u32::from_be_bytes([
                (VERSION << 5) | self.diag.code(),
                flags,
                self.detect_mult,
                u8::try_from(LEN).unwrap_or(u8::MAX),
            ]),
            self.my_discr.get(),
            self.your_discr.map_or(0, NonZeroU32::get),
            micros(self.desired_min_tx),
            micros(self.required_min_rx),
            micros(self.required_min_echo_rx),
        ];
        for (chunk, field) in out.chunks_exact_mut(4).zip(fields) {
            chunk.copy_from_slice(&field.to_be_bytes());
        }
        out
    }
}

/// The 4 bytes at `offset` of the mandatory section (offsets are constants below [`LEN`]).
fn word(head: &[u8; LEN], offset: usize) -> [u8; 4] {
    let mut out = [0; 4];
    if let Some(bytes) = head.get(offset..offset + 4) {
        out.copy_from_slice(bytes);
    }
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn packet() -> ControlPacket {
        ControlPacket {
            diag: Diag::ControlDetectionTimeExpired,
            state: State::Up,
            poll: true,
            final_: false,
            control_plane_independent: false,
            demand: false,
            detect_mult: 3,
            my_discr: NonZeroU32::new(0x0102_0304).unwrap(),
            your_discr: NonZeroU32::new(7),
            desired_min_tx: Duration::from_millis(300),
            required_min_rx: Duration::from_millis(300),
            required_min_echo_rx: Duration::ZERO,
        }
    }

    #[test]
    fn a_packet_encodes_to_the_rfc_layout_and_back() {
        let bytes = packet().encode();
        assert_eq!(
            bytes,
            [
                0x21, 0xe0, 3, 24, 1, 2, 3, 4, 0, 0, 0, 7, 0, 0x04, 0x93, 0xe0, 0, 0x04, 0x93,
                0xe0, 0, 0, 0, 0
            ]
        );
        assert_eq!(ControlPacket::decode(&bytes), Ok(packet()));
    }

    #[test]
    fn bytes_after_the_length_are_ignored() {
        let mut bytes = packet().encode().to_vec();
        bytes.extend_from_slice(&[0xde, 0xad]);
        assert_eq!(ControlPacket::decode(&bytes), Ok(packet()));
    }

    /// Each §6.8.6 rule, on a valid packet with one field broken.
    #[test]
    fn every_reception_rule_drops_its_packet() {
        let valid = packet().encode();
        let broken = |edit: fn(&mut Vec<u8>)| {
            let mut b = valid.to_vec();
            edit(&mut b);
            ControlPacket::decode(&b)
        };
        assert_eq!(broken(|b| b.truncate(23)), Err(DecodeError::Truncated(23)));
        assert_eq!(broken(|b| b[0] = 0x41), Err(DecodeError::Version(2)));
        assert_eq!(
            broken(|b| b[3] = 23),
            Err(DecodeError::Length {
                length: 23,
                received: 24
            })
        );
        assert_eq!(
            broken(|b| b[3] = 25),
            Err(DecodeError::Length {
                length: 25,
                received: 24
            })
        );
        assert_eq!(broken(|b| b[2] = 0), Err(DecodeError::DetectMultZero));
        assert_eq!(broken(|b| b[1] |= MULTIPOINT), Err(DecodeError::Multipoint));
        assert_eq!(
            broken(|b| b[4..8].fill(0)),
            Err(DecodeError::MyDiscriminatorZero)
        );
        assert_eq!(
            broken(|b| b[8..12].fill(0)),
            Err(DecodeError::YourDiscriminatorZero(State::Up))
        );
        assert_eq!(
            broken(|b| {
                b[1] |= AUTH;
                b[3] = 26;
                b.extend_from_slice(&[1, 2]);
            }),
            Err(DecodeError::Authentication)
        );
    }

    #[test]
    fn your_discriminator_may_be_zero_while_down() {
        for state in [State::Down, State::AdminDown] {
            let p = ControlPacket {
                state,
                your_discr: None,
                ..packet()
            };
            assert_eq!(ControlPacket::decode(&p.encode()), Ok(p));
        }
    }

    #[test]
    fn reserved_diagnostics_are_kept() {
        let mut b = packet().encode();
        b[0] = 0x20 | 31;
        assert_eq!(
            ControlPacket::decode(&b).map(|p| p.diag),
            Ok(Diag::Reserved(31))
        );
    }

    fn any_packet() -> impl Strategy<Value = ControlPacket> {
        (
            (0..32_u8, 0..4_u8, any::<[bool; 4]>(), 1..=255_u8),
            (1..=u32::MAX, any::<u32>(), any::<[u32; 3]>()),
        )
            .prop_map(|((diag, state, flags, mult), (my, your, intervals))| {
                let state = State::from_bits(state);
                let your = NonZeroU32::new(your).or_else(|| {
                    (!matches!(state, State::Down | State::AdminDown)).then_some(NonZeroU32::MIN)
                });
                let us = |v: u32| Duration::from_micros(u64::from(v));
                ControlPacket {
                    diag: Diag::from_bits(diag),
                    state,
                    poll: flags[0],
                    final_: flags[1],
                    control_plane_independent: flags[2],
                    demand: flags[3],
                    detect_mult: mult,
                    my_discr: NonZeroU32::new(my).unwrap_or(NonZeroU32::MIN),
                    your_discr: your,
                    desired_min_tx: us(intervals[0]),
                    required_min_rx: us(intervals[1]),
                    required_min_echo_rx: us(intervals[2]),
                }
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 3000,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn random_bytes_never_panic_the_decoder(
            bytes in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let _ = ControlPacket::decode(&bytes);
        }

        #[test]
        fn every_valid_packet_round_trips(p in any_packet()) {
            prop_assert_eq!(ControlPacket::decode(&p.encode()), Ok(p));
        }

        #[test]
        fn mutated_valid_packets_decode_or_are_dropped_without_panic(
            p in any_packet(),
            flips in proptest::collection::vec((0..24_usize, any::<u8>()), 1..4),
            cut in 0..30_usize,
        ) {
            let mut bytes = p.encode().to_vec();
            for (at, x) in flips {
                bytes[at] ^= x;
            }
            bytes.truncate(cut);
            if let Ok(decoded) = ControlPacket::decode(&bytes) {
                let encoded = decoded.encode();
                prop_assert_eq!(encoded.as_slice(), &bytes[..LEN]);
            }
        }
    }
}
