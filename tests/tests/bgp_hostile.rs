//! A hostile BGP peer, written byte by byte here, against the real agent in a network namespace.
//!
//! The peer listens on the client's address, port 179, inside the client namespace (a thread
//! enters it with `setns` to create the listening socket; the root namespace is never changed).
//! It completes the handshake, reads the agent's UPDATEs, then sends malformed messages, one case
//! at a time, on one agent. After each one the agent must still run and answer its API, and
//! behave as the RFCs say (`docs/design.md`, "BGP behaviour", malformed input from a peer):
//! - header, OPEN, attribute-list and NLRI errors: the right NOTIFICATION (RFC 4271 §6, RFC 6608,
//!   RFC 7313, RFC 7606 §3.g, §5), the connection closes, and the agent connects again;
//! - malformed ORIGIN, `AS_PATH`, `NEXT_HOP`, COMMUNITIES, `LARGE_COMMUNITY`, wrong flags, a
//!   missing mandatory attribute: treat-as-withdraw (RFC 7606 §3, §7), no NOTIFICATION, the
//!   session stays up: it still answers a ROUTE-REFRESH and `/info` says Established;
//! - a repeated attribute or a malformed `ATOMIC_AGGREGATE`: discarded, the session stays up.
//!
//! The agent reconnects after 1 s (doubling, reset once Established), so every reset is followed
//! by a full handshake before the next case; the two OPEN cases use the connection that follows
//! a reset, which costs 2 s each. Finally a well-behaved session from scratch gets the VIP.

use std::{
    fmt,
    fs::File,
    io::{ErrorKind, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Shutdown, TcpListener, TcpStream},
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use gocast_tests::{
    Agent, Netns, Topology, require_privileged,
    routers::{API, agent_peer, start_agent},
};
use nix::sched::{CloneFlags, setns};

/// The one config app: no monitors, so it is healthy (and announced) at once.
const VIP: &str = "192.0.2.77/32";
/// The VIP as IPv4 NLRI: prefix length, then the address.
const VIP_NLRI: [u8; 5] = [32, 192, 0, 2, 77];
const PEER_AS: u16 = 65000;
const AGENT_AS: u16 = 65001;
const HOLD_TIME: u16 = 90;

const ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// From our KEEPALIVE to the VIP and both End-of-RIBs.
const ROUTES_TIMEOUT: Duration = Duration::from_secs(10);

// Message types (RFC 4271 §4.1, RFC 2918 §3).
const OPEN: u8 = 1;
const UPDATE: u8 = 2;
const NOTIFICATION: u8 = 3;
const KEEPALIVE: u8 = 4;
const ROUTE_REFRESH: u8 = 5;

// Attribute flags.
const WELL_KNOWN: u8 = 0x40;
const OPTIONAL: u8 = 0x80;
const OPTIONAL_TRANSITIVE: u8 = 0xc0;
const EXTENDED_LENGTH: u8 = 0x10;

/// Logged by the agent for each treat-as-withdraw UPDATE (session.rs).
const WITHDRAW_LOG: &str = "treated as withdraw";

// ---------------------------------------------------------------------------------------------
// Building messages.

fn u16_of(n: usize) -> u16 {
    u16::try_from(n).expect("a test message field fits in 16 bits")
}

fn u8_of(n: usize) -> u8 {
    u8::try_from(n).expect("a test message field fits in 8 bits")
}

/// A header with any marker, length and type.
fn header(marker: [u8; 16], length: u16, msg_type: u8) -> Vec<u8> {
    let mut m = marker.to_vec();
    m.extend(length.to_be_bytes());
    m.push(msg_type);
    m
}

/// A well-framed message.
fn msg(msg_type: u8, body: &[u8]) -> Vec<u8> {
    let mut m = header([0xff; 16], u16_of(19 + body.len()), msg_type);
    m.extend_from_slice(body);
    m
}

fn keepalive() -> Vec<u8> {
    msg(KEEPALIVE, &[])
}

fn notification(code: u8, subcode: u8, data: &[u8]) -> Vec<u8> {
    msg(NOTIFICATION, &[&[code, subcode], data].concat())
}

/// ROUTE-REFRESH for IPv4 unicast (RFC 2918 §3).
fn route_refresh_v4() -> Vec<u8> {
    msg(ROUTE_REFRESH, &[0, 1, 0, 1])
}

/// An OPEN: capabilities multiprotocol IPv4 and IPv6 unicast, route refresh, 4-octet AS.
fn open(version: u8, asn: u16, router_id: Ipv4Addr) -> Vec<u8> {
    let capability = |code: u8, value: &[u8]| [&[code, u8_of(value.len())], value].concat();
    let caps = [
        capability(1, &[0, 1, 0, 1]),
        capability(1, &[0, 2, 0, 1]),
        capability(2, &[]),
        capability(65, &u32::from(asn).to_be_bytes()),
    ]
    .concat();
    let params = [&[2, u8_of(caps.len())], caps.as_slice()].concat();
    let mut body = vec![version];
    body.extend(asn.to_be_bytes());
    body.extend(HOLD_TIME.to_be_bytes());
    body.extend(router_id.octets());
    body.push(u8_of(params.len()));
    body.extend(params);
    msg(OPEN, &body)
}

fn update(withdrawn: &[u8], attributes: &[u8], nlri: &[u8]) -> Vec<u8> {
    let mut body = u16_of(withdrawn.len()).to_be_bytes().to_vec();
    body.extend_from_slice(withdrawn);
    body.extend(u16_of(attributes.len()).to_be_bytes());
    body.extend_from_slice(attributes);
    body.extend_from_slice(nlri);
    msg(UPDATE, &body)
}

/// A path attribute with a one-octet length.
fn attr(flags: u8, type_code: u8, value: &[u8]) -> Vec<u8> {
    [&[flags, type_code, u8_of(value.len())], value].concat()
}

fn origin_igp() -> Vec<u8> {
    attr(WELL_KNOWN, 1, &[0])
}

/// `AS_SEQUENCE` [65000] with 4-octet AS numbers (both OPENs carry the capability).
fn as_path() -> Vec<u8> {
    attr(WELL_KNOWN, 2, &[2, 1, 0, 0, 0xfd, 0xe8])
}

fn next_hop(ip: Ipv4Addr) -> Vec<u8> {
    attr(WELL_KNOWN, 3, &ip.octets())
}

/// The prefix our UPDATEs announce: 198.19.7.0/24.
const NLRI: [u8; 4] = [24, 198, 19, 7];

/// `MP_REACH_NLRI` for `2001:db8:ff99::/48` via `2001:db8:1::2`.
fn mp_reach() -> Vec<u8> {
    let hop: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    let value = [
        &[0, 2, 1, 16][..],
        &hop,
        &[0],
        &[48, 0x20, 0x01, 0x0d, 0xb8, 0xff, 0x99],
    ]
    .concat();
    attr(OPTIONAL, 14, &value)
}

/// Deterministic noise (xorshift64).
fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_be_bytes()[0]
        })
        .collect()
}

/// An UPDATE (at most 4096 bytes) of correctly framed attributes with random flags, type codes
/// (mostly ones the agent checks), lengths and values, then an NLRI.
fn random_framed_attributes(seed: u64) -> Vec<u8> {
    const CODES: [u8; 17] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 14, 15, 17, 18, 32, 99, 200];
    let mut bytes = noise(seed, 16_384).into_iter();
    let mut next = move || bytes.next().unwrap_or(0);
    let mut attributes = Vec::new();
    loop {
        let flags = next() & !EXTENDED_LENGTH;
        let code = CODES[usize::from(next()) % CODES.len()];
        let value: Vec<u8> = (0..next() % 24).map(|_| next()).collect();
        if 19 + 4 + attributes.len() + 3 + value.len() + NLRI.len() > 4096 {
            break;
        }
        attributes.extend(attr(flags, code, &value));
    }
    update(&[], &attributes, &NLRI)
}

// ---------------------------------------------------------------------------------------------
// The cases.

/// When a case's bytes are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// On an Established session.
    Established,
    /// Instead of our OPEN, on a connection where the agent has sent its OPEN.
    Open,
}

/// What the agent must do.
#[derive(Debug, Clone)]
enum Expect {
    /// Send this NOTIFICATION (with this data, when given), close, and reconnect.
    Notify(u8, u8, Option<Vec<u8>>),
    /// Close without a NOTIFICATION (there is nothing to answer), and reconnect.
    Close,
    /// RFC 7606 treat-as-withdraw: no NOTIFICATION, the session stays up, the agent logs it.
    Withdraw,
    /// Discarded or ignored: no NOTIFICATION, the session stays up, no treat-as-withdraw.
    Ignore,
    /// Random bytes: an UPDATE error (3/x) and a reconnect, or the session stays up.
    AnyUpdateError,
}

impl fmt::Display for Expect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Notify(code, subcode, None) => {
                write!(f, "NOTIFICATION {code}/{subcode}, close, reconnect")
            }
            Self::Notify(code, subcode, Some(data)) => write!(
                f,
                "NOTIFICATION {code}/{subcode} with data {data:02x?}, close, reconnect"
            ),
            Self::Close => f.write_str("close without NOTIFICATION, reconnect"),
            Self::Withdraw => {
                f.write_str("treat-as-withdraw: no NOTIFICATION, session stays up, logged")
            }
            Self::Ignore => f.write_str("discarded: no NOTIFICATION, session stays up"),
            Self::AnyUpdateError => {
                f.write_str("NOTIFICATION 3/x then close and reconnect, or session stays up")
            }
        }
    }
}

struct Case {
    name: &'static str,
    phase: Phase,
    bytes: Vec<u8>,
    /// Half-close our side after sending.
    close_after: bool,
    expect: Expect,
}

fn case(name: &'static str, bytes: Vec<u8>, expect: Expect) -> Case {
    Case {
        name,
        phase: Phase::Established,
        bytes,
        close_after: false,
        expect,
    }
}

fn notify(code: u8, subcode: u8) -> Expect {
    Expect::Notify(code, subcode, None)
}

fn notify_data(code: u8, subcode: u8, data: &[u8]) -> Expect {
    Expect::Notify(code, subcode, Some(data.to_vec()))
}

#[expect(
    clippy::too_many_lines,
    reason = "one table: each case is its bytes and the answer the RFCs ask for"
)]
fn cases(peer_ip: Ipv4Addr) -> Vec<Case> {
    let hop = next_hop(peer_ip);
    let base = |first: Vec<u8>, rest: &[Vec<u8>]| [vec![first], rest.to_vec()].concat().concat();

    let mut bad_marker = header([0xff; 16], 19, KEEPALIVE);
    bad_marker[3] = 0x00;

    let mut truncated = header([0xff; 16], 200, UPDATE);
    truncated.extend([0, 0, 0, 4]);
    truncated.extend(origin_igp());

    let unknown_well_known = attr(WELL_KNOWN, 99, &[1, 2]);
    let mp_truncated = attr(OPTIONAL, 14, &[0, 2, 1, 16, 0x20, 0x01, 0x0d, 0xb8]);
    let refresh_long = msg(ROUTE_REFRESH, &[0, 1, 0, 1, 0xaa]);

    let random_update = [
        header([0xff; 16], 4096, UPDATE),
        noise(0x9e37_79b9_7f4a_7c15, 4077),
    ]
    .concat();
    let random_attributes = [
        header([0xff; 16], 4096, UPDATE),
        vec![0, 0],
        4073_u16.to_be_bytes().to_vec(),
        noise(0xd1b5_4a32_d192_ed03, 4073),
    ]
    .concat();

    vec![
        case(
            "bad marker",
            bad_marker,
            notify(1, 1), // RFC 4271 §6.1
        ),
        Case {
            phase: Phase::Open,
            ..case(
                "OPEN with version 3",
                open(3, PEER_AS, peer_ip),
                notify_data(2, 1, &[0, 4]), // RFC 4271 §6.2: data is the version we speak
            )
        },
        case(
            "ORIGIN value 7",
            update(
                &[],
                &base(attr(WELL_KNOWN, 1, &[7]), &[as_path(), hop.clone()]),
                &NLRI,
            ),
            Expect::Withdraw, // RFC 7606 §7.1
        ),
        case(
            "length 18",
            header([0xff; 16], 18, KEEPALIVE),
            notify_data(1, 2, &[0, 18]), // RFC 4271 §6.1: data is the length field
        ),
        case(
            "ORIGIN length 2",
            update(
                &[],
                &base(attr(WELL_KNOWN, 1, &[0, 0]), &[as_path(), hop.clone()]),
                &NLRI,
            ),
            Expect::Withdraw, // RFC 7606 §7.1
        ),
        case(
            "length 4097 (header only)",
            header([0xff; 16], 4097, UPDATE),
            notify_data(1, 2, &[0x10, 0x01]),
        ),
        case(
            "AS_PATH segment type 9",
            update(
                &[],
                &base(
                    origin_igp(),
                    &[attr(WELL_KNOWN, 2, &[9, 1, 0, 0, 0xfd, 0xe8]), hop.clone()],
                ),
                &NLRI,
            ),
            Expect::Withdraw, // RFC 7606 §7.2
        ),
        case(
            "KEEPALIVE of length 20",
            msg(KEEPALIVE, &[0]),
            notify_data(1, 2, &[0, 20]), // RFC 4271 §6.1
        ),
        case(
            "AS_PATH segment overruns the attribute",
            update(
                &[],
                &base(
                    origin_igp(),
                    &[attr(WELL_KNOWN, 2, &[2, 5, 0, 0, 0xfd, 0xe8]), hop.clone()],
                ),
                &NLRI,
            ),
            Expect::Withdraw, // RFC 7606 §7.2
        ),
        Case {
            close_after: true,
            ..case(
                "length 200 announced, 27 bytes sent, then close",
                truncated,
                Expect::Close,
            )
        },
        case(
            "unknown message type 9",
            msg(9, &[]),
            notify_data(1, 3, &[9]), // RFC 4271 §6.1: data is the type
        ),
        Case {
            phase: Phase::Open,
            ..case(
                "OPEN from AS 65099 (65000 configured)",
                open(4, 65099, peer_ip),
                notify(2, 2), // RFC 4271 §6.2
            )
        },
        case(
            "COMMUNITIES length 3",
            update(
                &[],
                &base(
                    origin_igp(),
                    &[
                        as_path(),
                        hop.clone(),
                        attr(OPTIONAL_TRANSITIVE, 8, &[0xfd, 0xe8, 0]),
                    ],
                ),
                &NLRI,
            ),
            Expect::Withdraw, // RFC 7606 §7.8
        ),
        case(
            "OPEN in Established",
            open(4, PEER_AS, peer_ip),
            notify(5, 3), // RFC 6608 §3
        ),
        case(
            "LARGE_COMMUNITY length 5",
            update(
                &[],
                &base(
                    origin_igp(),
                    &[
                        as_path(),
                        hop.clone(),
                        attr(OPTIONAL_TRANSITIVE, 32, &[0, 0, 0xfd, 0xe8, 1]),
                    ],
                ),
                &NLRI,
            ),
            Expect::Withdraw, // RFC 8092 §6
        ),
        case(
            "attribute length overruns the attribute list",
            update(&[], &[WELL_KNOWN, 1, 10, 0], &NLRI),
            notify(3, 1), // RFC 7606 §4
        ),
        case(
            "NEXT_HOP length 5",
            update(
                &[],
                &base(
                    origin_igp(),
                    &[as_path(), attr(WELL_KNOWN, 3, &[198, 18, 0, 2, 9])],
                ),
                &NLRI,
            ),
            Expect::Withdraw, // RFC 7606 §7.3
        ),
        case(
            "total path attribute length overruns the message",
            msg(UPDATE, &[0, 0, 0, 200, WELL_KNOWN, 1, 1, 0]),
            notify(3, 1), // RFC 4271 §6.3
        ),
        case(
            "NLRI without NEXT_HOP",
            update(&[], &base(origin_igp(), &[as_path()]), &NLRI),
            Expect::Withdraw, // RFC 7606 §3.d
        ),
        case(
            "unrecognized well-known attribute 99",
            update(
                &[],
                &base(
                    origin_igp(),
                    &[as_path(), hop.clone(), unknown_well_known.clone()],
                ),
                &NLRI,
            ),
            Expect::Notify(3, 2, Some(unknown_well_known)), // RFC 4271 §6.3: data is the attribute
        ),
        case(
            "ORIGIN flagged optional",
            update(
                &[],
                &base(
                    attr(OPTIONAL_TRANSITIVE, 1, &[0]),
                    &[as_path(), hop.clone()],
                ),
                &NLRI,
            ),
            Expect::Withdraw, // RFC 7606 §3.c
        ),
        case(
            "NLRI prefix length 33",
            update(
                &[],
                &base(origin_igp(), &[as_path(), hop.clone()]),
                &[33, 198, 19, 7, 0, 0],
            ),
            notify(3, 10), // RFC 4271 §6.3, RFC 7606 §5.3
        ),
        case(
            "ORIGIN twice, the second one 7",
            update(
                &[],
                &base(
                    origin_igp(),
                    &[attr(WELL_KNOWN, 1, &[7]), as_path(), hop.clone()],
                ),
                &NLRI,
            ),
            Expect::Ignore, // RFC 7606 §3.g: repeats are discarded
        ),
        case(
            "MP_REACH_NLRI next hop truncated",
            update(
                &[],
                &base(origin_igp(), &[as_path(), mp_truncated.clone()]),
                &[],
            ),
            Expect::Notify(3, 9, Some(mp_truncated)), // RFC 4760 §7, RFC 7606 §7.11
        ),
        case(
            "ATOMIC_AGGREGATE length 1",
            update(
                &[],
                &base(
                    origin_igp(),
                    &[as_path(), hop.clone(), attr(WELL_KNOWN, 6, &[0])],
                ),
                &NLRI,
            ),
            Expect::Ignore, // RFC 7606 §7.6: attribute discard
        ),
        case(
            "MP_REACH_NLRI twice",
            update(
                &[],
                &base(mp_reach(), &[origin_igp(), as_path(), mp_reach()]),
                &[],
            ),
            notify(3, 1), // RFC 7606 §3.g
        ),
        case(
            "NOTIFICATION 6/2 with a garbage shutdown communication",
            notification(6, 2, &[200, 0xff, 0xfe, 0x80, 0xc0, 0x00, 0x41]),
            Expect::Close, // RFC 4271 §6.4: a NOTIFICATION is never answered
        ),
        case(
            "ROUTE-REFRESH of 24 bytes",
            refresh_long.clone(),
            Expect::Notify(7, 1, Some(refresh_long)), // RFC 7313 §5: data is the message
        ),
        case(
            "ROUTE-REFRESH of 22 bytes",
            msg(ROUTE_REFRESH, &[0, 1, 0]),
            notify_data(1, 2, &[0, 22]), // RFC 4271 §6.1
        ),
        case(
            "4096-byte UPDATE of random bytes",
            random_update,
            Expect::AnyUpdateError,
        ),
        case(
            "4096-byte UPDATE of random attributes",
            random_attributes,
            Expect::AnyUpdateError,
        ),
        case(
            "UPDATE of random well-framed attributes",
            random_framed_attributes(0x2545_f491_4f6c_dd1d),
            Expect::AnyUpdateError,
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// The peer.

/// What one read found.
enum Event {
    Message(u8, Vec<u8>),
    /// EOF or reset; says which.
    Closed(String),
}

/// What the agent did with a case.
#[derive(Debug)]
enum Outcome {
    /// A NOTIFICATION, then the connection closed.
    Notified(u8, u8, Vec<u8>),
    /// The connection closed without a NOTIFICATION.
    Closed(String),
    /// No NOTIFICATION; the session answered our ROUTE-REFRESH with the VIP.
    StillUp,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Notified(code, subcode, data) => write!(
                f,
                "NOTIFICATION {code}/{subcode} with data {data:02x?}, then the connection closed"
            ),
            Self::Closed(how) => write!(f, "connection closed without NOTIFICATION ({how})"),
            Self::StillUp => f.write_str("no NOTIFICATION; the session answered a ROUTE-REFRESH"),
        }
    }
}

/// What an UPDATE from the agent carried that we check.
#[derive(Debug, Default)]
struct Received {
    /// IPv4 NLRI, each as (length, address octets).
    nlri: Vec<Vec<u8>>,
    origin: Option<Vec<u8>>,
    as_path: Option<Vec<u8>>,
    next_hop: Option<Vec<u8>>,
    end_of_rib: Option<&'static str>,
}

impl Received {
    fn announces_vip(&self) -> bool {
        self.nlri.iter().any(|p| p == &VIP_NLRI)
    }
}

fn split(bytes: &[u8], n: usize) -> Result<(&[u8], &[u8])> {
    bytes.split_at_checked(n).with_context(|| {
        format!(
            "agent's UPDATE truncated: {n} bytes wanted, {} left",
            bytes.len()
        )
    })
}

fn be16(bytes: &[u8]) -> usize {
    usize::from(u16::from_be_bytes([bytes[0], bytes[1]]))
}

/// Parses an UPDATE the agent sent; a malformed one is an error.
fn parse_update(body: &[u8]) -> Result<Received> {
    let (len, rest) = split(body, 2)?;
    let (withdrawn, rest) = split(rest, be16(len))?;
    let (len, rest) = split(rest, 2)?;
    let (attributes, nlri) = split(rest, be16(len))?;
    let mut out = Received::default();
    let (mut list, mut count, mut unreach) = (attributes, 0, None);
    while !list.is_empty() {
        let (head, rest) = split(list, 2)?;
        let (flags, type_code) = (head[0], head[1]);
        let (len, rest) = if flags & EXTENDED_LENGTH == 0 {
            let (l, r) = split(rest, 1)?;
            (usize::from(l[0]), r)
        } else {
            let (l, r) = split(rest, 2)?;
            (be16(l), r)
        };
        let (value, rest) = split(rest, len)?;
        list = rest;
        count += 1;
        match type_code {
            1 => out.origin = Some(value.to_vec()),
            2 => out.as_path = Some(value.to_vec()),
            3 => out.next_hop = Some(value.to_vec()),
            15 => unreach = Some(value),
            _ => {}
        }
    }
    let mut prefixes = nlri;
    while let Some((&len, rest)) = prefixes.split_first() {
        let (octets, rest) = split(rest, usize::from(len).div_ceil(8))?;
        out.nlri.push([&[len], octets].concat());
        prefixes = rest;
    }
    if withdrawn.is_empty() && nlri.is_empty() {
        if attributes.is_empty() {
            out.end_of_rib = Some("IPv4");
        } else if count == 1 && unreach == Some(&[0, 2, 1][..]) {
            out.end_of_rib = Some("IPv6");
        }
    }
    Ok(out)
}

/// One TCP connection from the agent, seen from the peer's side.
struct Peer {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Peer {
    /// Waits (bounded) for the agent to connect.
    fn accept(listener: &TcpListener, agent_ip: Ipv4Addr) -> Result<Self> {
        let deadline = Instant::now() + ACCEPT_TIMEOUT;
        loop {
            match listener.accept() {
                Ok((stream, from)) => {
                    ensure!(
                        from.ip() == IpAddr::V4(agent_ip),
                        "connection from {from}, expected the agent at {agent_ip}"
                    );
                    stream.set_nonblocking(false)?;
                    stream.set_nodelay(true)?;
                    stream.set_write_timeout(Some(READ_TIMEOUT))?;
                    return Ok(Self {
                        stream,
                        buf: Vec::new(),
                    });
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    ensure!(
                        Instant::now() < deadline,
                        "the agent did not connect within {ACCEPT_TIMEOUT:?}"
                    );
                    thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(e).context("accept"),
            }
        }
    }

    fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes).context("sending to the agent")
    }

    /// A complete message from the buffer, if there is one; the agent's framing is checked.
    fn take_frame(&mut self) -> Result<Option<(u8, Vec<u8>)>> {
        let Some(head) = self.buf.get(..19) else {
            return Ok(None);
        };
        ensure!(
            head[..16] == [0xff; 16],
            "the agent sent a bad marker: {head:02x?}"
        );
        let len = be16(&head[16..18]);
        let msg_type = head[18];
        ensure!(
            (19..=4096).contains(&len),
            "the agent sent a message of length {len}"
        );
        if self.buf.len() < len {
            return Ok(None);
        }
        let frame: Vec<u8> = self.buf.drain(..len).collect();
        Ok(Some((msg_type, frame[19..].to_vec())))
    }

    /// The next message or the end of the connection, within `limit`.
    fn read_event(&mut self, limit: Duration) -> Result<Event> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some((msg_type, body)) = self.take_frame()? {
                return Ok(Event::Message(msg_type, body));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            ensure!(
                !left.is_zero(),
                "nothing from the agent within {limit:?} ({} bytes of a message buffered)",
                self.buf.len()
            );
            self.stream.set_read_timeout(Some(left))?;
            let mut chunk = [0_u8; 8192];
            match self.stream.read(&mut chunk) {
                Ok(0) if self.buf.is_empty() => return Ok(Event::Closed("EOF".into())),
                Ok(0) => {
                    return Ok(Event::Closed(format!(
                        "EOF in the middle of a message: {:02x?}",
                        self.buf
                    )));
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
                    ) =>
                {
                    return Ok(Event::Closed(e.to_string()));
                }
                Err(e) => return Err(e).context("reading from the agent"),
            }
        }
    }

    /// The next message; the connection ending is an error.
    fn next_message(&mut self, limit: Duration) -> Result<(u8, Vec<u8>)> {
        match self.read_event(limit)? {
            Event::Message(msg_type, body) => Ok((msg_type, body)),
            Event::Closed(how) => bail!("the agent closed the connection ({how})"),
        }
    }

    /// The agent's OPEN, first thing on a new connection: version 4, AS 65001 with the 4-octet
    /// AS capability, both families.
    fn read_agent_open(&mut self) -> Result<()> {
        let (msg_type, body) = self.next_message(READ_TIMEOUT)?;
        ensure!(
            msg_type == OPEN,
            "first message type {msg_type}, not OPEN: {body:02x?}"
        );
        let (fixed, params) = split(&body, 10)?;
        ensure!(fixed[0] == 4, "OPEN version {}", fixed[0]);
        ensure!(
            be16(&fixed[1..3]) == usize::from(AGENT_AS),
            "OPEN My AS {:?}",
            &fixed[1..3]
        );
        let hold = be16(&fixed[3..5]);
        ensure!(hold == 0 || hold >= 3, "OPEN hold time {hold}");
        ensure!(fixed[5..9] != [0; 4], "OPEN BGP identifier 0");
        ensure!(
            usize::from(fixed[9]) == params.len(),
            "OPEN optional parameters length"
        );
        let (mut caps, mut p) = (Vec::new(), params);
        while let Some((&param_type, rest)) = p.split_first() {
            let (len, rest) = split(rest, 1)?;
            let (value, rest) = split(rest, usize::from(len[0]))?;
            ensure!(param_type == 2, "OPEN optional parameter {param_type}");
            let mut c = value;
            while let Some((&code, rest)) = c.split_first() {
                let (len, rest) = split(rest, 1)?;
                let (data, rest) = split(rest, usize::from(len[0]))?;
                caps.push((code, data.to_vec()));
                c = rest;
            }
            p = rest;
        }
        for (code, data) in [
            (1, vec![0, 1, 0, 1]),
            (1, vec![0, 2, 0, 1]),
            (65, u32::from(AGENT_AS).to_be_bytes().to_vec()),
        ] {
            ensure!(
                caps.contains(&(code, data.clone())),
                "OPEN lacks capability {code} {data:?}: {caps:?}"
            );
        }
        Ok(())
    }

    /// Our OPEN and KEEPALIVE; the agent's KEEPALIVE; then its UPDATEs until the VIP and both
    /// End-of-RIBs have arrived. Returns the UPDATE that announced the VIP.
    fn finish_handshake(&mut self, peer_ip: Ipv4Addr) -> Result<Received> {
        self.send(&[open(4, PEER_AS, peer_ip), keepalive()].concat())?;
        let (msg_type, body) = self.next_message(READ_TIMEOUT)?;
        ensure!(
            msg_type == KEEPALIVE,
            "the agent answered our OPEN with type {msg_type} {body:02x?}, not KEEPALIVE"
        );
        let deadline = Instant::now() + ROUTES_TIMEOUT;
        let (mut vip, mut eor4, mut eor6) = (None, false, false);
        while vip.is_none() || !eor4 || !eor6 {
            let left = deadline.saturating_duration_since(Instant::now());
            let (msg_type, body) = self
                .next_message(left)
                .with_context(|| format!("waiting for {VIP} and the End-of-RIBs"))?;
            match msg_type {
                KEEPALIVE => {}
                UPDATE => {
                    let update = parse_update(&body)?;
                    eor4 |= update.end_of_rib == Some("IPv4");
                    eor6 |= update.end_of_rib == Some("IPv6");
                    if update.announces_vip() {
                        vip = Some(update);
                    }
                }
                _ => bail!("unexpected message type {msg_type} after the handshake: {body:02x?}"),
            }
        }
        vip.context("no VIP")
    }

    /// A new connection from the agent, up to its OPEN.
    fn reconnect(listener: &TcpListener, agent_ip: Ipv4Addr) -> Result<Self> {
        let mut peer = Self::accept(listener, agent_ip).context("the agent did not reconnect")?;
        peer.read_agent_open()?;
        Ok(peer)
    }

    /// What the agent does next: a NOTIFICATION (then it must close), a close, or — when we
    /// probed with a ROUTE-REFRESH — an UPDATE with the VIP. KEEPALIVEs are skipped.
    fn observe(&mut self) -> Result<Outcome> {
        loop {
            match self.read_event(READ_TIMEOUT)? {
                Event::Message(NOTIFICATION, body) => {
                    let [code, subcode, data @ ..] = body.as_slice() else {
                        bail!("NOTIFICATION of {} bytes", body.len());
                    };
                    return match self.read_event(READ_TIMEOUT)? {
                        Event::Closed(_) => Ok(Outcome::Notified(*code, *subcode, data.to_vec())),
                        Event::Message(t, b) => bail!(
                            "after NOTIFICATION {code}/{subcode} the agent sent type {t} {b:02x?} instead of closing"
                        ),
                    };
                }
                Event::Message(KEEPALIVE, _) => {}
                Event::Message(UPDATE, body) => {
                    if parse_update(&body)?.announces_vip() {
                        return Ok(Outcome::StillUp);
                    }
                }
                Event::Message(t, body) => bail!("unexpected message type {t}: {body:02x?}"),
                Event::Closed(how) => return Ok(Outcome::Closed(how)),
            }
        }
    }
}

/// The connection the next case starts from.
enum Conn {
    Up(Peer),
    /// The agent sent its OPEN and waits for ours.
    OpenSent(Peer),
}

/// A TCP listener on `ip:179` inside namespace `ns`. A thread enters the namespace to create it;
/// the socket stays there, and the test's own threads never change namespace.
fn listen_in(ns: &Netns, ip: Ipv4Addr) -> Result<TcpListener> {
    let path = format!("/var/run/netns/{}", ns.name);
    thread::spawn(move || -> Result<TcpListener> {
        let file = File::open(&path).with_context(|| format!("opening {path}"))?;
        setns(&file, CloneFlags::CLONE_NEWNET).context("setns into the client namespace")?;
        let listener = TcpListener::bind((ip, 179)).context("binding port 179")?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    })
    .join()
    .map_err(|_| anyhow!("the listener thread panicked"))?
}

/// The agent still runs, `/healthz` and `/info` answer, and (if `established`) `/info` says so.
fn check_api(agent: &mut Agent, ns: &Netns, what: &str, established: bool) -> Result<()> {
    agent.wait_for(what, Duration::from_secs(5), |_| {
        let (health, _) = ns.http_get(&format!("http://{API}/healthz"))?;
        let (status, info) = ns.http_get(&format!("http://{API}/info"))?;
        Ok(health == 200
            && status == 200
            && (!established || info["peers"][0]["state"] == "Established"))
    })
}

fn withdraw_logs(agent: &Agent) -> usize {
    std::fs::read_to_string(&agent.log)
        .unwrap_or_default()
        .matches(WITHDRAW_LOG)
        .count()
}

/// The last `lines` lines of the agent's log, without terminal colours.
fn log_tail(agent: &Agent, lines: usize) -> String {
    let raw = std::fs::read_to_string(&agent.log).unwrap_or_default();
    let mut text = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // An SGR sequence: ESC [ ... m.
            chars.by_ref().find(|&c| c == 'm');
        } else {
            text.push(c);
        }
    }
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn config(dir: &Path, topo: &Topology) -> Result<String> {
    let path = dir.join("config.yaml");
    std::fs::write(
        &path,
        format!(
            "agent:\n  listen_addr: {API}\n  monitor_interval: 100ms\n  state_file: {state}\n\
             bgp:\n  local_as: {AGENT_AS}\n  remote_as: {PEER_AS}\n  peer_ip: {peer}\n\
             apps:\n  - name: hostile\n    vip: {VIP}\n",
            state = dir.join("state.json").display(),
            peer = topo.client_ip,
        ),
    )?;
    Ok(path.to_string_lossy().into_owned())
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one agent through every case, in order"
)]
fn malformed_messages_get_the_rfc_answer_and_the_agent_survives() -> Result<()> {
    require_privileged!();
    let test_start = Instant::now();
    let dir = tempfile::tempdir()?;
    let topo = Topology::new()?;
    let peer_ip: Ipv4Addr = topo.client_ip.parse()?;
    let agent_ip: Ipv4Addr = topo.agent_ip.parse()?;
    // Listening before the agent starts, so its first connect succeeds (a refused one would
    // double its reconnect delay).
    let listener = listen_in(&topo.client, peer_ip)?;
    let config = config(dir.path(), &topo)?;
    let mut agent = start_agent(&topo, dir.path(), &config, "agent.log")?;

    let mut first = Peer::reconnect(&listener, agent_ip)?;
    first
        .finish_handshake(peer_ip)
        .context("the first handshake")?;
    check_api(
        &mut agent,
        &topo.agent,
        "Established after the first handshake",
        true,
    )?;
    let mut conn = Conn::Up(first);

    for case in cases(peer_ip) {
        let started = Instant::now();
        let mut peer = match (case.phase, conn) {
            (Phase::Established, Conn::Up(peer)) | (Phase::Open, Conn::OpenSent(peer)) => peer,
            (Phase::Established, Conn::OpenSent(mut peer)) => {
                // A full handshake resets the agent's reconnect delay to 1 s.
                peer.finish_handshake(peer_ip)
                    .with_context(|| format!("handshake before case {:?}", case.name))?;
                check_api(
                    &mut agent,
                    &topo.agent,
                    &format!("Established before case {:?}", case.name),
                    true,
                )?;
                peer
            }
            (Phase::Open, Conn::Up(mut peer)) => {
                // A fresh connection: say goodbye and wait for the next one.
                peer.send(&notification(6, 4, &[]))?;
                ensure!(
                    matches!(peer.observe()?, Outcome::Closed(_)),
                    "the agent did not just close after our Cease"
                );
                Peer::reconnect(&listener, agent_ip)?
            }
        };
        let withdraws_before = withdraw_logs(&agent);

        peer.send(&case.bytes)
            .with_context(|| format!("case {:?}: sending", case.name))?;
        if case.close_after {
            peer.stream.shutdown(Shutdown::Write)?;
        }
        if matches!(
            case.expect,
            Expect::Withdraw | Expect::Ignore | Expect::AnyUpdateError
        ) {
            // Proof of life: the agent answers a ROUTE-REFRESH with its routes, after it has
            // handled the case's bytes. Ignore a failure: the agent may have closed already.
            let _ = peer.send(&[keepalive(), route_refresh_v4()].concat());
        }
        let outcome = peer.observe().with_context(|| {
            format!(
                "case {:?}: expected {}\n---- agent log (tail) ----\n{}",
                case.name,
                case.expect,
                log_tail(&agent, 40)
            )
        })?;
        let as_expected = match (&case.expect, &outcome) {
            (Expect::Notify(code, subcode, data), Outcome::Notified(c, s, d)) => {
                code == c && subcode == s && data.as_ref().is_none_or(|data| data == d)
            }
            (Expect::Close, Outcome::Closed(_))
            | (Expect::Withdraw | Expect::Ignore, Outcome::StillUp)
            | (Expect::AnyUpdateError, Outcome::Notified(3, _, _) | Outcome::StillUp) => true,
            _ => false,
        };
        ensure!(
            as_expected,
            "case {:?}: expected {}, observed {outcome}\n---- agent log (tail) ----\n{}",
            case.name,
            case.expect,
            log_tail(&agent, 40)
        );
        match (&case.expect, &outcome) {
            (Expect::Withdraw, _) => agent.wait_for(
                &format!("case {:?}: the treat-as-withdraw log line", case.name),
                Duration::from_secs(3),
                |a| Ok(withdraw_logs(a) > withdraws_before),
            )?,
            (Expect::Ignore, _) => ensure!(
                withdraw_logs(&agent) == withdraws_before,
                "case {:?}: discarded attribute made the UPDATE treat-as-withdraw\n{}",
                case.name,
                log_tail(&agent, 20)
            ),
            _ => {}
        }

        let still_up = matches!(outcome, Outcome::StillUp);
        check_api(
            &mut agent,
            &topo.agent,
            &format!("the API after case {:?}", case.name),
            still_up,
        )?;
        conn = if still_up {
            Conn::Up(peer)
        } else {
            drop(peer);
            let next = Peer::reconnect(&listener, agent_ip).with_context(|| {
                format!(
                    "after case {:?} ({outcome})\n---- agent log (tail) ----\n{}",
                    case.name,
                    log_tail(&agent, 40)
                )
            })?;
            Conn::OpenSent(next)
        };
        eprintln!(
            "case {:?}: {outcome} ({:?}{})",
            case.name,
            started.elapsed(),
            if still_up { "" } else { ", reconnected" }
        );
    }

    // A well-behaved session from scratch still gets the VIP, with the right attributes.
    let mut peer = match conn {
        Conn::Up(mut peer) => {
            peer.send(&notification(6, 4, &[]))?;
            ensure!(
                matches!(peer.observe()?, Outcome::Closed(_)),
                "the agent did not just close after our Cease"
            );
            Peer::reconnect(&listener, agent_ip)?
        }
        Conn::OpenSent(peer) => peer,
    };
    let vip = peer
        .finish_handshake(peer_ip)
        .context("the final, well-behaved handshake")?;
    ensure!(vip.origin == Some(vec![0]), "ORIGIN {:?}", vip.origin);
    ensure!(
        vip.as_path == Some(vec![2, 1, 0, 0, 0xfd, 0xe9]),
        "AS_PATH {:02x?}",
        vip.as_path
    );
    ensure!(
        vip.next_hop == Some(agent_ip.octets().to_vec()),
        "NEXT_HOP {:?}",
        vip.next_hop
    );
    check_api(&mut agent, &topo.agent, "Established at the end", true)?;
    let view = agent_peer(&topo)?;
    ensure!(view["prefixes_advertised"] == 1, "{view}");
    let log = std::fs::read_to_string(&agent.log)?;
    ensure!(!log.contains("panicked"), "the agent panicked:\n{log}");

    // And it still says goodbye properly.
    agent.signal_and_wait("TERM", Duration::from_secs(5))?;
    let goodbye = peer.observe()?;
    ensure!(
        matches!(goodbye, Outcome::Notified(6, 2, _)),
        "on SIGTERM: {goodbye}"
    );
    eprintln!("all cases in {:?}", test_start.elapsed());
    Ok(())
}
